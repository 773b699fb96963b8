"""QLoRA at the module level (Dettmers et al., 2023): LoRALinear on a 4-bit (or 8-bit) QuantLinear
base, the base's merge_ / unmerge_ / merged_copy, quantize_model(weights="nf4" / "fp4") +
inject_lora, PEFT-format adapter files, and interop with bitsandbytes' Linear4bit + PEFT.

Oracle: plain PyTorch in float64, the base weight dequantized by the references
(fastpeft/reference/nf4.py; the torch backend of fastpeft.dequantize for the int codes) plus the
LoRA formula of fastpeft/reference/lora.py (its counter-based dropout mask), for y and for every
gradient (x, lora_A, lora_B), on awkward shapes (M = 1, 3-D and non-contiguous x, N odd, K not a
multiple of the 4-bit block, odd K). Shapes stay tiny: Triton runs in the interpreter here.
"""
import copy

import pytest
import torch

import fastpeft
from fastpeft.nn.qlinear import QuantLinear
from fastpeft.ops import lora as lora_ops
from fastpeft.reference import lora as ref_lora
from fastpeft.reference import nf4 as ref_nf4

from _dtypes import case_id, dtype_cases
from _utils import DEVICE, assert_close

pytestmark = pytest.mark.filterwarnings("ignore:.*encountered in:RuntimeWarning")

SEED = 1234  # the dropout seed the layers draw in these tests (see fixed_seed)

# base config (bits, scheme, group / block size, double quantization), leading dims of x, K, N, bias, dropout
CASES = [
    ((4, "nf4", 64, True), (1,), 72, 7, True, 0.0),         # M = 1, blocks straddle rows (K = 72, block 64)
    ((4, "fp4", 32, False), (2, 3), 40, 9, False, 0.25),    # 3-D non-contiguous x, N odd, dropout, no bias
    ((4, "nf4", 32, False), (5,), 33, 16, True, 0.5),       # odd K: the nibble parity alternates by row
    ((4, "zeropoint", 16, False), (3,), 48, 11, False, 0.0),  # int4 zero-point groups
    ((4, "absmax", None, False), (2, 2), 37, 5, True, 0.3),  # int4 absmax, per output row, odd K
    ((8, "zeropoint", 24, False), (4,), 48, 10, True, 0.0),  # 8-bit codes, a group size off the kernel's
]
BF16_CASES = [0, 1]


@pytest.fixture
def fixed_seed(monkeypatch):
    """The dropout seed every LoRA layer draws (fastpeft.ops.lora.new_seed) fixed to SEED, so the
    reference applies the same counter-based mask."""
    monkeypatch.setattr(lora_ops, "new_seed",
                        lambda device, seed=None: torch.full((1,), SEED, dtype=torch.int64, device=device))


def rnd(*shape, dtype=torch.float32, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(DEVICE, dtype)


def quant_base(cfg, K, N, bias=True, dtype=torch.float32, seed=0):
    bits, scheme, group, double = cfg
    lin = torch.nn.Linear(K, N, bias=bias, device=DEVICE, dtype=dtype)
    with torch.no_grad():
        lin.weight.copy_(rnd(N, K, seed=seed, scale=0.1))
        if bias:
            lin.bias.copy_(rnd(N, seed=seed + 1, scale=0.1))
    return QuantLinear.from_linear(lin, bits=bits, scheme=scheme, group_size=group, double_quant=double)


def ref_weight(layer: QuantLinear) -> torch.Tensor:
    """float64 [N, K]: the base's dequantized weight by the references (not the layer's own path)."""
    q = layer.qweight
    if q.scheme in ref_nf4.SCHEMES:
        absmax = q.scale if q.nested_scale is None else ref_nf4.dequantize_absmax(q.scale.cpu(), q.nested_scale.cpu(),
                                                                                 q.nested_offset.cpu())
        return ref_nf4.dequantize_4bit(q.data.cpu(), absmax.cpu(), q.scheme, q.group_size, q.shape,
                                       torch.float32).double()
    with fastpeft.use_backend("torch"):
        return fastpeft.dequantize(q, torch.float32).double().cpu()


def qlora(cfg, K, N, bias=True, dropout=0.0, r=4, dtype=torch.float32, seed=0):
    """A LoRALinear on a quantized base with a nonzero update (random lora_A, lora_B)."""
    layer = fastpeft.LoRALinear.from_linear(quant_base(cfg, K, N, bias, dtype, seed), r=r, lora_alpha=2 * r,
                                            lora_dropout=dropout)
    with torch.no_grad():
        layer.lora_A.copy_(rnd(r, K, seed=seed + 2, scale=0.2))
        layer.lora_B.copy_(rnd(N, r, seed=seed + 3, scale=0.2))
    return layer


def reference(layer, x, dy, training):
    """(y, dx, dA, dB) in float64: x W_deq^T + b + s * (dropout(x) A^T) B^T."""
    x64 = x.detach().double().cpu().requires_grad_()
    A = layer.lora_A.detach().double().cpu().requires_grad_()
    B = layer.lora_B.detach().double().cpu().requires_grad_()
    bias = layer.base_bias
    b = None if bias is None else bias.detach().double().cpu()
    p = layer.lora_dropout if training else 0.0
    y = ref_lora.lora_linear(x64, ref_weight(layer.base_layer), b, A, B, layer.scaling, p, SEED)
    y.backward(dy.double().cpu())
    return y.detach(), x64.grad, A.grad, B.grad


@pytest.mark.parametrize("dtype,case", dtype_cases(range(len(CASES)), BF16_CASES,
                                                   dtypes=[torch.float32, torch.bfloat16]), ids=case_id)
def test_forward_and_gradients_match_reference(fixed_seed, poison_outputs, dtype, case):
    cfg, lead, K, N, bias, p = CASES[case]
    layer = qlora(cfg, K, N, bias, p, dtype=dtype, seed=case)
    assert isinstance(layer.base_layer, QuantLinear) and layer.lora_A.dtype == torch.float32
    assert [n for n, q in layer.named_parameters() if q.requires_grad] == ["lora_A", "lora_B"]
    x = rnd(*lead, K, dtype=dtype, seed=10 + case)
    if case == 1:  # non-contiguous x
        x = rnd(*lead[:-1], K, lead[-1], dtype=dtype, seed=10 + case).transpose(-1, -2)
    dy = rnd(*lead, N, dtype=dtype, seed=20 + case)
    for training in ([False, True] if p else [True]):
        layer.train(training)
        layer.zero_grad()
        xg = x.detach().clone().requires_grad_()
        y = layer(xg)
        assert y.dtype == dtype and y.shape == (*lead, N)
        y.backward(dy)
        want_y, want_dx, want_dA, want_dB = reference(layer, x, dy, training)
        assert_close("y", y, want_y, dtype)
        assert_close("dx", xg.grad, want_dx, dtype)
        assert layer.lora_A.grad.dtype == torch.float32
        assert_close("dA", layer.lora_A.grad, want_dA, dtype)
        assert_close("dB", layer.lora_B.grad, want_dB, dtype)
        assert layer.base_bias is None or layer.base_bias.grad is None
    if p:  # dropout changed the training output (the mask is not all ones)
        layer.eval()
        assert (layer(x) - y.detach()).abs().max() > 0



# The fused forward on a quantized base (the LoRA shrink, then the base's dequantize-GEMM with s * U B^T
# in its accumulator), which LoRALinear takes with the triton backend: QLoRA's on an nf4 / fp4 base
# (fastpeft.ops.nf4.nf4_lora_linear), and on an int4 / int8 weight-only one whose group size the kernel
# takes (fastpeft.ops.qlinear.quant_lora_linear). (base config, leading dims of x, K, N, bias, dropout, r)
FUSED_CASES = [
    ((4, "nf4", 64, True), (1,), 72, 7, True, 0.0, 4),       # M = 1, K not a multiple of the block, odd N
    ((4, "fp4", 32, False), (3, 2), 33, 9, False, 0.25, 3),  # odd K, 3-D x, no bias, dropout, r = 3
    ((4, "nf4", 32, True), (17,), 64, 20, True, 0.0, 20),    # M past one row tile, r = 20 (a masked rank tile)
    ((4, "nf4", 64, True), (2,), 256, 10, True, 0.25, 5),    # decode: the GEMV (split K), its update by split 0
    ((4, "nf4", 32, False), (3, 3), 192, 20, False, 0.0, 20),  # M = 9: the decode path's tl.dot (MMA) variant
    ((4, "zeropoint", 16, False), (3,), 48, 11, True, 0.25, 3),  # int4 zero-point groups (4 a K tile), dropout
    ((4, "absmax", None, False), (3,), 37, 5, False, 0.0, 4),  # int4 per row (scaled in the tile), odd K
    ((8, "zeropoint", 32, False), (2, 9), 64, 10, True, 0.3, 20),  # int8 zero point, M = 18, r = 20
    ((8, "absmax", None, False), (1,), 256, 7, True, 0.0, 5),  # int8 per row, M = 1: the GEMV (words, split K)
    ((4, "zeropoint", 32, False), (2,), 96, 9, False, 0.25, 2),  # int4 groups, M = 2: the GEMV (words), dropout
]
FUSED_BF16 = [1, 4, 5, 7]


def _fused_calls(monkeypatch, cfg=(4, "nf4"), dx=False):
    """The launches of the base's GEMM (the forward; ``dx``: the transposed one), each recorded as
    whether it carried the LoRA update: kernels/nf4.py's for nf4 / fp4, kernels/qlinear.py's else."""
    from fastpeft.kernels import nf4 as knf4
    from fastpeft.kernels import qlinear as kq
    module, kernel = (knf4, "nf4_linear") if cfg[1] in ref_nf4.SCHEMES else (kq, "quant_linear")
    kernel += "_dx" if dx else ""
    calls = []
    launch = getattr(module, kernel)
    monkeypatch.setattr(module, kernel,
                        lambda *a, **k: (calls.append(k.get("lora") is not None), launch(*a, **k))[1])
    return calls


def _run_layer(layer, x, dy, fused, monkeypatch):
    """(y, dx, dA, dB) of the layer, on the fused path or forced onto the unfused one."""
    layer.zero_grad()
    xg = x.detach().clone().requires_grad_()
    with monkeypatch.context() as m:
        if not fused:
            m.setattr(fastpeft.LoRALinear, "_fused_op", lambda self, x: None)
        y = layer(xg)
        y.backward(dy)
    return y.detach(), xg.grad, layer.lora_A.grad.clone(), layer.lora_B.grad.clone()


@pytest.mark.parametrize("dtype,case", dtype_cases(range(len(FUSED_CASES)), FUSED_BF16,
                                                   dtypes=[torch.float32, torch.bfloat16]), ids=case_id)
def test_fused_forward_matches_unfused_and_reference(fixed_seed, poison_outputs, monkeypatch, dtype, case):
    """y and every gradient of the fused path (forward and dx) against the unfused one (the base
    layer plus lora_update) and the float64 reference. fp32: equal within fp32 rounding (relative
    error <= 1e-6, not bit for bit: the fused kernels sum x W^T and s U B^T (dy W and
    s dropout'(V A)) in one fp32 accumulator, U and V come from the fp32 shrink, while the
    unfused path rounds the base GEMM and the update apart and adds them; dB reads that U, dA
    that V). bf16: within bf16's tolerance (the unfused path rounds y and dx twice, the fused
    once)."""
    cfg, lead, K, N, bias, p, r = FUSED_CASES[case]
    layer = qlora(cfg, K, N, bias, p, r=r, dtype=dtype, seed=40 + case).train(True)
    x = rnd(*lead, K, dtype=dtype, seed=50 + case)
    dy = rnd(*lead, N, dtype=dtype, seed=60 + case)
    calls = _fused_calls(monkeypatch, cfg)
    dx_calls = _fused_calls(monkeypatch, cfg, dx=True)
    fused = _run_layer(layer, x, dy, True, monkeypatch)
    assert calls == [True]  # one dequantize-GEMM, the update in its accumulator
    assert dx_calls == [True]  # dx: one transposed dequantize-GEMM, the masked update in its accumulator
    unfused = _run_layer(layer, x, dy, False, monkeypatch)
    assert calls == [True, False] and dx_calls == [True, False]
    want = reference(layer, x, dy, True)
    factor = 0.1 if dtype == torch.float32 else 1.0
    for name, got, other, ref in zip(("y", "dx", "dA", "dB"), fused, unfused, want):
        assert got.dtype == other.dtype and got.shape == other.shape
        assert_close(name + " (fused vs unfused)", got, other.double(), dtype, factor)
        assert_close(name, got, ref, dtype)
        assert_close(name + " (unfused)", other, ref, dtype)


def test_fused_forward_is_taken_only_where_it_applies(monkeypatch):
    """The fused op on an nf4 / fp4 base (triton backend); the base layer plus lora_update with a
    compute_dtype cast, a forward hook on the base, under the torch backend, when merged; on an int
    base, the int kernels' fused op unless the activations are int8 or the group size is one the
    kernel does not take."""
    from fastpeft.kernels import lora as klora
    calls = _fused_calls(monkeypatch)
    shrinks = []
    shrink = klora.shrink
    monkeypatch.setattr(klora, "shrink", lambda *a, **k: (shrinks.append(1), shrink(*a, **k))[1])
    layer = qlora((4, "nf4", 32, False), 40, 6, r=2)
    x = rnd(3, 40, seed=70)
    with torch.no_grad():
        want = layer(x)
        assert calls == [True] and shrinks == [1]
        with fastpeft.use_backend("torch"):
            assert_close("y (torch backend)", layer(x), want.double(), torch.float32)
        assert calls == [True]
        layer.merge()
        layer(x)
        layer.unmerge()
        assert calls == [True, False]
        layer.base_layer.compute_dtype = torch.bfloat16
        layer(x)
        assert calls == [True, False, False]
        layer.base_layer.compute_dtype = None
        hook = layer.base_layer.register_forward_pre_hook(lambda module, args: None)  # as FSDP2's gather
        layer(x)
        hook.remove()
        assert calls == [True, False, False, False]
        assert_close("y", layer(x), want.double(), torch.float32, 0.0)  # deterministic: the same bits
        assert calls[-1] is True
        calls.clear()
        int_calls = _fused_calls(monkeypatch, (4, "zeropoint"))
        qlora((4, "zeropoint", 16, False), 48, 5)(rnd(3, 48, seed=71))
        assert calls == [] and int_calls == [True]
        qlora((8, "zeropoint", 24, False), 48, 5)(rnd(3, 48, seed=71))  # groups of 24: the torch composition
        assert int_calls == [True]
        a8 = qlora((4, "zeropoint", 16, False), 48, 5)
        a8.base_layer.activations = "dynamic"  # W4A8: its own kernel, then lora_update
        a8(rnd(3, 48, seed=71))
        assert calls == [] and int_calls == [True]

@pytest.mark.parametrize("cfg", [(4, "nf4", 64, True), (4, "fp4", 32, False), (4, "zeropoint", 16, False),
                                 (8, "absmax", None, False)], ids=str)
def test_merge_unmerge_is_exact(cfg):
    K, N = 80, 13
    layer = qlora(cfg, K, N, seed=3)
    base = layer.base_layer
    x = rnd(3, K, seed=4)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    delta = layer.delta_weight()
    # merged: the codes of (W_deq + delta) re-quantized with the same scheme / group / double quant
    want = fastpeft.quantize(base.dequantized_weight() + delta, cfg[0], cfg[1],
                             axis=0 if cfg[2] is None and cfg[1] not in ref_nf4.SCHEMES else None,
                             **({"block_size": cfg[2], "double_quant": cfg[3]} if cfg[1] in ref_nf4.SCHEMES
                                else {"group_size": cfg[2]}))
    copy_ = layer.to_linear()  # merged_copy: this layer untouched
    assert type(copy_) is QuantLinear and all(torch.equal(base.state_dict()[k], v) for k, v in before.items())
    layer.eval()
    y0 = layer(x)
    layer.merge()
    assert layer.merged and base.base_merged
    for field, buf in (("data", "weight_data"), ("scale", "weight_scale"), ("nested_scale", "weight_nested_scale"),
                       ("nested_offset", "weight_nested_offset")):
        if getattr(want, field) is not None:
            assert torch.equal(getattr(base, buf), getattr(want, field)), field
            assert torch.equal(getattr(copy_, buf), getattr(want, field)), field
    y1 = layer(x)
    assert torch.equal(y1, copy_(x))
    assert (y1 - y0).norm() / y0.norm() < 0.1  # the merged layer computes about the same (re-quantized)
    # while merged, state_dict holds the base from before the merge, and a round trip restores the merge
    sd = layer.state_dict()
    assert all(torch.equal(sd["base_layer." + k], v) for k, v in before.items())
    other = qlora(cfg, K, N, seed=9)
    other.load_state_dict(sd)
    assert other.merged and torch.equal(other(x), y1)
    # a 16-bit cast keeps the saved float32 fields float32
    half = copy.deepcopy(layer).to(torch.bfloat16)
    assert all(getattr(half.base_layer, "_original_" + n).dtype == torch.float32
               for n in half.base_layer._float32_buffers if getattr(half.base_layer, "_original_" + n, None) is not None)
    layer.unmerge()
    assert not layer.merged and not base.base_merged
    after = base.state_dict()
    assert all(torch.equal(after[k], v) and after[k].dtype == v.dtype for k, v in before.items())
    assert torch.equal(layer(x), y0)


def test_quantize_model_nf4_then_inject_lora_and_adapter_files(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(40, 24), torch.nn.ReLU(), torch.nn.Linear(24, 40))
    model.add_module("lm_head", torch.nn.Linear(40, 6, bias=False))
    x = rnd(2, 3, 40, seed=1)
    q = fastpeft.quantize_model(copy.deepcopy(model), weights="nf4", double_quant=True)
    assert type(q.lm_head) is torch.nn.Linear  # skip=("lm_head",)
    for i in (0, 2):
        assert isinstance(q[i], QuantLinear) and q[i].scheme == "nf4" and q[i].group_size == 64
        assert q[i].weight_nested_scale is not None
    plain = q(x)
    fastpeft.inject_lora(q, ["0", "2"], r=4, lora_alpha=8)
    assert isinstance(q[0], fastpeft.LoRALinear) and isinstance(q[0].base_layer, QuantLinear)
    assert torch.equal(q(x), plain)  # B = 0: the quantized model, unchanged
    assert sorted(n for n, p in q.named_parameters() if p.requires_grad) == \
        ["0.lora_A", "0.lora_B", "2.lora_A", "2.lora_B"]
    with torch.no_grad():
        for m in (q[0], q[2]):
            m.lora_B.normal_(std=0.1)
    xg = x.clone().requires_grad_()
    q(xg).sum().backward()
    assert xg.grad is not None and q[0].lora_A.grad.abs().sum() > 0 and q[2].lora_B.grad.abs().sum() > 0
    # "all-linear" targets the 4-bit layers too
    q2 = fastpeft.inject_lora(fastpeft.quantize_model(copy.deepcopy(model), weights="fp4"), "all-linear")
    assert isinstance(q2[0].base_layer, QuantLinear) and q2[2].base_layer.scheme == "fp4"
    # PEFT-format files: PEFT's keys, nothing of the 4-bit base
    fastpeft.save_adapter(q, tmp_path)
    from safetensors.torch import load_file
    keys = sorted(load_file(str(tmp_path / "adapter_model.safetensors")))
    assert keys == [f"base_model.model.{n}.lora_{w}.weight" for n in ("0", "2") for w in "AB"]
    again = fastpeft.load_adapter(fastpeft.quantize_model(copy.deepcopy(model), weights="nf4", double_quant=True),
                                  tmp_path)
    assert isinstance(again[2].base_layer, QuantLinear)
    assert torch.equal(again(x), q(x))
    # compute_dtype: float32 inputs, bfloat16 compute, float32 outputs (bitsandbytes' compute_dtype)
    qb = fastpeft.quantize_model(copy.deepcopy(model), weights="nf4", compute_dtype=torch.bfloat16)
    assert qb[0].bias.dtype == torch.bfloat16 and "compute_dtype" in repr(qb[0])
    yb = qb(x)
    assert yb.dtype == torch.float32
    assert_close("bf16 compute", yb, fastpeft.quantize_model(copy.deepcopy(model), weights="nf4")(x), torch.bfloat16,
                 factor=2)


def _bnb_mlp(seed):
    """A float MLP and the same MLP with bitsandbytes' Linear4bit (nf4, double quantization)."""
    bnb = pytest.importorskip("bitsandbytes")
    torch.manual_seed(seed)

    class MLP(torch.nn.Module):
        def __init__(self, make):
            super().__init__()
            # K not a multiple of the block (64): blocks straddle rows; odd N. (bitsandbytes' CPU
            # dequantize kernel departs from its flat-block layout when K is a multiple of 16 but not
            # of the block, e.g. K = 32 or 80: such K are left out of this comparison)
            self.up = make(72, 40, True)
            self.down = make(40, 33, False)

        def forward(self, x):
            return self.down(torch.relu(self.up(x)))

    fp = MLP(lambda i, o, b: torch.nn.Linear(i, o, bias=b))
    q = MLP(lambda i, o, b: bnb.nn.Linear4bit(i, o, bias=b, compute_dtype=torch.float32, compress_statistics=True,
                                              quant_type="nf4"))
    q.load_state_dict(fp.state_dict())
    return q.to("cpu")  # quantizes the weights


@pytest.mark.skipif(DEVICE != "cpu", reason="bitsandbytes' 4-bit layers are run on the CPU here")
def test_peft_qlora_interop(tmp_path):
    """bitsandbytes Linear4bit (nf4 + double quant) + PEFT LoRA with a nonzero update vs the same
    model read by fastpeft (from_bnb_4bit: the same codes) with the adapter loaded from PEFT's
    files; and back: fastpeft's adapter files loaded by PEFT."""
    peft = pytest.importorskip("peft")
    pm = peft.get_peft_model(_bnb_mlp(0), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["up", "down"],
                                                         init_lora_weights=False))
    # train mode (lora_dropout 0: deterministic) under no_grad: bitsandbytes keeps its standard layout
    # (an eval-mode CPU forward repacks the codes for its own kernel, see test_from_bnb_after_cpu_repack)
    pm.train()
    x = rnd(3, 72, seed=5)
    with torch.no_grad():
        want = pm(x)
    pm.save_pretrained(tmp_path / "peft")
    ours = fastpeft.quantization.from_bnb_4bit(_bnb_mlp(0))
    assert isinstance(ours.up, QuantLinear) and ours.up.weight_nested_scale is not None
    fastpeft.load_adapter(ours, tmp_path / "peft")
    ours.eval()
    assert isinstance(ours.up, fastpeft.LoRALinear) and isinstance(ours.down.base_layer, QuantLinear)
    with torch.no_grad():
        assert_close("fastpeft vs PEFT on bitsandbytes", ours(x), want, torch.float32, factor=10)
    # the reverse: a fastpeft QLoRA adapter (changed update) loaded by PEFT onto bitsandbytes' model
    with torch.no_grad():
        ours.up.lora_B.mul_(-2.0)
        ours.down.lora_A.add_(0.05)
        mine = ours(x)
    fastpeft.save_adapter(ours, tmp_path / "ours")
    back = peft.PeftModel.from_pretrained(_bnb_mlp(0), tmp_path / "ours")
    back.train()
    with torch.no_grad():
        assert_close("PEFT loading fastpeft's adapter", back(x), mine, torch.float32, factor=10)


@pytest.mark.skipif(DEVICE != "cpu", reason="bitsandbytes' 4-bit layers are run on the CPU here")
def test_from_bnb_after_cpu_repack():
    """An eval-mode forward may repack a Linear4bit's codes for bitsandbytes' CPU kernel (absmax
    then in bfloat16, double quantization undone); from_bnb reads the weight it computes with."""
    bnb = pytest.importorskip("bitsandbytes")
    torch.manual_seed(1)
    l4 = bnb.nn.Linear4bit(128, 32, bias=True, compute_dtype=torch.float32, compress_statistics=True,
                           quant_type="nf4").to("cpu").eval()
    x = rnd(2, 128, seed=6)
    with torch.no_grad():
        want = l4(x)
    ours = QuantLinear.from_bnb(l4)
    assert not getattr(l4.weight.quant_state, "packing_format_for_cpu", False)
    assert_close("from_bnb after an eval forward", ours(x), want, torch.bfloat16)


def test_bad_input_fails_clearly():
    lin = torch.nn.Linear(40, 6)
    with pytest.raises(ValueError, match="bits must be 8 or 4"):
        QuantLinear.from_linear(lin, bits=3, scheme="nf4", group_size=64)
    with pytest.raises(ValueError, match="scheme must be one of"):
        QuantLinear.from_linear(lin, bits=4, scheme="nf8", group_size=8)
    with pytest.raises(TypeError, match="compute_dtype"):
        QuantLinear.from_linear(lin, bits=4, scheme="nf4", group_size=64, compute_dtype=torch.int8)
    with pytest.raises(TypeError, match="nn.Linear, Int8Linear or QuantLinear"):
        fastpeft.LoRALinear.from_linear(torch.nn.Conv1d(4, 4, 1))
    with pytest.raises(TypeError, match="Linear4bit"):
        QuantLinear.from_bnb(lin)
    base = QuantLinear.from_linear(lin, bits=4, scheme="nf4", group_size=32, double_quant=True)
    with pytest.raises(ValueError, match=r"delta shape \(40, 6\)"):
        base.merge_(torch.zeros(40, 6))
    with pytest.raises(TypeError, match="floating-point"):
        base.merge_(torch.zeros(6, 40, dtype=torch.int32))
    with pytest.raises(TypeError, match="torch.Tensor"):
        base.merged_copy([[0.0]])
    with pytest.raises(RuntimeError, match="not merged"):
        base.unmerge_()
    base.merge_(torch.zeros(6, 40))
    with pytest.raises(RuntimeError, match="already merged"):
        base.merge_(torch.zeros(6, 40))
    with pytest.raises(ValueError, match="unmerge_"):
        fastpeft.LoRALinear.from_linear(base)
    model = torch.nn.Sequential(torch.nn.Linear(40, 6))
    with pytest.raises(ValueError, match="16-bit activations"):
        fastpeft.quantize_model(model, weights="nf4", activations="dynamic")
    with pytest.raises(ValueError, match="double_quant"):
        fastpeft.quantize_model(model, weights="int4", double_quant=True)
    with pytest.raises(TypeError, match="double_quant"):
        fastpeft.quantize_model(model, weights="nf4", double_quant=1)
    with pytest.raises(ValueError, match="block size"):
        fastpeft.quantize_model(model, weights="nf4", group_size=48)
    with pytest.raises(TypeError, match="compute_dtype"):
        fastpeft.quantize_model(model, weights="nf4", compute_dtype="bf16")
    with pytest.raises(ValueError, match="weights must be one of"):
        fastpeft.quantize_model(model, weights="nf2")
    with pytest.raises(ValueError, match="no bitsandbytes 4-bit layer"):
        fastpeft.quantization.from_bnb_4bit(model)
    assert type(model[0]) is torch.nn.Linear  # nothing replaced by a failed call


@pytest.mark.parametrize("scheme", ["nf4", "zeropoint"])
def test_fused_functions_reject_bad_adapters_and_weights(scheme):
    """fastpeft.ops.nf4.nf4_lora_linear and fastpeft.ops.qlinear.quant_lora_linear (and their
    registered ops, which check the weight's fields again: they are public too) fail clearly."""
    from fastpeft.ops import nf4 as onf4
    from fastpeft.ops import qlinear as oq
    K, N, r = 64, 6, 4
    q = quant_base((4, scheme, 32, False), K, N).qweight
    fn = onf4.nf4_lora_linear if scheme == "nf4" else oq.quant_lora_linear
    x, A, B = rnd(3, K, seed=1), rnd(r, K, seed=2), rnd(N, r, seed=3)
    with pytest.raises(ValueError, match=r"must be \[r, 64\] and \[6, r\]"):
        fn(x, q, None, A, B[:, :2], 1.0)
    with pytest.raises(ValueError, match=r"must be \[r, 64\] and \[6, r\]"):
        fn(x, q, None, A[:0], B[:, :0], 1.0)
    with pytest.raises(TypeError, match="lora_A"):
        fn(x, q, None, A.to(torch.int32), B, 1.0)
    with pytest.raises(ValueError, match="scaling"):
        fn(x, q, None, A, B, float("nan"))
    with pytest.raises(ValueError, match="dropout_p"):
        fn(x, q, None, A, B, 1.0, 1.5, True)
    with pytest.raises(ValueError, match="features"):
        fn(rnd(3, K + 1, seed=1), q, None, A, B, 1.0)
    with pytest.raises(ValueError, match="bias shape"):
        fn(x, q, rnd(N + 1, seed=4), A, B, 1.0)
    if scheme == "nf4":
        op, grad = torch.ops.fastpeft.nf4_lora_linear, torch.ops.fastpeft.nf4_lora_linear_grad_input
        w = (q.data, q.scale, q.nested_scale, q.nested_offset, q.scheme, q.group_size)
        fwd_w = (*w, N)
    else:
        op, grad = torch.ops.fastpeft.quant_lora_linear, torch.ops.fastpeft.quant_lora_linear_grad_input
        w = fwd_w = (q.data, q.scale, q.zero_point, q.bits, q.scheme, q.axis, q.group_size)
    # the registered ops (public too) check the adapters' shapes: the kernels index them
    with pytest.raises(ValueError, match=r"must be \[r, 64\] and \[6, r\]"):
        op(x, *fwd_w, None, A, B[:-1], 1.0, 0.0, None, None)
    with pytest.raises(ValueError, match=r"must be \[r, 64\] and \[6, r\]"):
        grad(rnd(3, N, seed=5), *w, K, A[:, :-1], B, 1.0, 0.0, None, None)
    if scheme == "zeropoint":
        op = torch.ops.fastpeft.quant_lora_linear
        w = (q.data, q.scale, q.zero_point, q.bits, q.scheme, q.axis, q.group_size)
        with pytest.raises(ValueError, match="zero_point has shape"):  # a quant state that does not match
            op(x, q.data, q.scale, q.zero_point[:, :1], 4, "zeropoint", None, 32, None, A, B, 1.0, 0.0, None, None)
        with pytest.raises(ValueError, match="group_size 24 must be > 0 and divide"):
            op(x, *w[:6], 24, None, A, B, 1.0, 0.0, None, None)
        with pytest.raises(ValueError, match="data has shape"):  # in_features that the codes do not hold
            torch.ops.fastpeft.quant_lora_linear_grad_input(rnd(3, N, seed=5), *w, 2 * K, A, B, 1.0, 0.0, None, None)
        per_in = fastpeft.quantize(rnd(N, K, seed=6), 4, "zeropoint", axis=1)
        with pytest.raises(ValueError, match="axis=1"):  # one scale per input feature: not a kernel layout
            op(x, per_in.data, per_in.scale, per_in.zero_point, 4, "zeropoint", 1, None, None, A, B, 1.0, 0.0,
               None, None)
