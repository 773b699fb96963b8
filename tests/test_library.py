"""Every fastpeft op is a registered PyTorch operator: torch.library.opcheck on each, autocast rules,
and the list of host syncs that remain in fastpeft's code.

opcheck runs the op eagerly and checks its schema (mutations and aliasing as declared), that
autograd is registered where an input requires grad, that the fake implementation gives the
real outputs' metadata, and that AOTAutograd (dynamic shapes) gives the eager outputs and
gradients. Each case runs on the torch backend and on the triton one (the interpreter on the
CPU), in float32 and float16.
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

import fastpeft
from fastpeft.ops import lora as lora_ops

from _utils import DEVICE

ROOT = Path(__file__).resolve().parents[1]
DTYPES = [torch.float32, torch.float16]
BACKENDS = ["torch", "triton"]


def _rnd(*shape, dtype=torch.float32, grad=False, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed + sum(shape))
    t = (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(DEVICE, dtype)
    return t.requires_grad_(grad)


def _seed():
    return lora_ops.new_seed(torch.device(DEVICE), 1234)


def _qweight(bits, scheme, group_size, N=12, K=64):
    w = _rnd(N, K, seed=5)
    return fastpeft.quantize(w, bits, scheme, axis=0 if group_size is None else None, group_size=group_size,
                             backend="torch")


def cases(dtype):
    """op name -> list of argument tuples (each a fresh set of tensors)."""
    M, K, N, r = 5, 40, 24, 4
    x = lambda grad=True: _rnd(2, M, K, dtype=dtype, grad=grad)
    w, b = _rnd(N, K, dtype=dtype, scale=0.2), _rnd(N, dtype=dtype)
    A = lambda grad=True: _rnd(r, K, dtype=dtype, grad=grad, seed=1, scale=0.2)
    B = lambda grad=True: _rnd(N, r, dtype=dtype, grad=grad, seed=2, scale=0.2)
    lora = [
        (x(), w, b, A(), B(), 0.5, 0.0, None, None, None),
        (x(), w, None, A(), B(), 2.0, 0.25, _seed(), None, True),
        (x(), w, b, A(False), B(), 1.0, 0.1, _seed(), None, False),
    ]
    q8, s8 = fastpeft.ops.int8.quantize_weight(_rnd(N, K, scale=0.2))
    int8 = [
        (x(), q8, s8, b, 0.0, None, None),
        (x(), q8, s8, b, 1.5, None, None),
        (x(), q8, s8, None, 0.0, torch.tensor(0.02, device=DEVICE), None),
    ]
    q4, qz8 = _qweight(4, "zeropoint", 32, K=64), _qweight(8, "absmax", None, K=64)
    xq = lambda: _rnd(3, 64, dtype=dtype, grad=True, seed=3)
    qargs = lambda q: (q.data, q.scale, q.zero_point, q.bits, q.scheme, q.axis, q.group_size)
    qargs4 = lambda q: (q.data, q.scale, q.nested_scale, q.nested_offset, q.scheme, q.group_size)
    quant_linear = [
        (xq(), *qargs(q4), _rnd(12, dtype=dtype), None, None, None),
        (xq(), *qargs(q4), None, "dynamic", None, None),
        (xq(), *qargs(qz8), None, "static", torch.tensor(0.03, device=DEVICE), None),
    ]
    xs = _rnd(6, 10, dtype=dtype, seed=4)
    scale = lambda grad=True: (torch.rand(6, generator=torch.Generator().manual_seed(9)) * 0.1 + 0.05).to(DEVICE) \
        .requires_grad_(grad)
    zp = lambda: torch.full((6,), 3.4, device=DEVICE, requires_grad=True)
    fake_quantize = [
        (xs.clone().requires_grad_(), scale(), zp(), 4, "zeropoint", 0, None),
        (xs.clone().requires_grad_(), torch.tensor(0.05, device=DEVICE, requires_grad=True), None, 8, "absmax",
         None, None),
    ]
    x4 = _rnd(3, 40, dtype=dtype, seed=30)
    n4 = fastpeft.quantize(x4, 4, "nf4", block_size=32, double_quant=True, backend="torch")
    f4 = fastpeft.quantize(x4, 4, "fp4", block_size=32, backend="torch")
    n4l = fastpeft.quantize(_rnd(12, 40, seed=31, scale=0.2), 4, "nf4", block_size=32, double_quant=True,
                            backend="torch")
    f4l = fastpeft.quantize(_rnd(12, 40, seed=32, scale=0.2), 4, "fp4", block_size=64, backend="torch")
    nf4_lora = [  # QLoRA's fused layer: x, the 4-bit weight, bias, lora_A, lora_B, scaling, dropout, seed
        (_rnd(2, 3, 40, dtype=dtype, grad=True, seed=37), *qargs4(n4l), 12, _rnd(12, dtype=dtype, grad=True, seed=38),
         _rnd(4, 40, dtype=dtype, grad=True, seed=39, scale=0.2), _rnd(12, 4, dtype=dtype, grad=True, seed=40,
                                                                       scale=0.2), 0.5, 0.2, _seed(), None),
        (_rnd(3, 40, dtype=dtype, grad=True, seed=41), *qargs4(f4l), 12, None,
         _rnd(2, 40, dtype=dtype, grad=True, seed=42, scale=0.2), _rnd(12, 2, dtype=dtype, grad=True, seed=43,
                                                                       scale=0.2), 2.0, 0.0, None, None)]
    q_lora = [  # LoRA on an int4 / int8 base: x, the weight, bias, lora_A, lora_B, scaling, dropout, seed
        (_rnd(2, 3, 64, dtype=dtype, grad=True, seed=48), *qargs(q4), _rnd(12, dtype=dtype, grad=True, seed=49),
         _rnd(4, 64, dtype=dtype, grad=True, seed=50, scale=0.2), _rnd(12, 4, dtype=dtype, grad=True, seed=51,
                                                                       scale=0.2), 0.5, 0.2, _seed(), None),
        (_rnd(2, 64, dtype=dtype, grad=True, seed=52), *qargs(qz8), None,
         _rnd(3, 64, dtype=dtype, grad=True, seed=53, scale=0.2), _rnd(12, 3, dtype=dtype, grad=True, seed=54,
                                                                       scale=0.2), 2.0, 0.0, None, None)]
    d, R = 24, 8
    ad = lambda: (_rnd(3, 7, d, dtype=dtype, grad=True, seed=6), _rnd(R, d, dtype=dtype, grad=True, seed=7, scale=0.2),
                  _rnd(R, dtype=dtype, grad=True, seed=8), _rnd(d, R, dtype=dtype, grad=True, seed=9, scale=0.2),
                  _rnd(d, dtype=dtype, grad=True, seed=10))
    n, r_max = 3, 4
    ml = lambda: (_rnd(7, K, dtype=dtype, seed=11), _rnd(n, r_max, K, dtype=dtype, seed=12, scale=0.2),
                  _rnd(n, N, r_max, dtype=dtype, seed=13, scale=0.2),
                  torch.tensor([1, 4, 2], dtype=torch.int32, device=DEVICE),
                  torch.tensor([0.5, 1.0, 2.0], device=DEVICE),
                  torch.tensor([0, 2, -1, 1, 1, 0, 2], device=DEVICE))
    V = 30
    z = lambda: _rnd(2, 3, V, dtype=dtype, grad=True, seed=14)
    u = _rnd(2, 3, V, dtype=dtype, seed=15)
    labels = torch.tensor([[1, -100, 29], [0, 5, 7]], device=DEVICE)
    hs = lambda: _rnd(2, 3, 16, dtype=dtype, grad=True, seed=16)
    ws = lambda: _rnd(V, 16, dtype=dtype, grad=True, seed=17, scale=0.3)
    ht, wt = _rnd(2, 3, 20, dtype=dtype, seed=18), _rnd(V, 20, dtype=dtype, seed=19, scale=0.3)
    bs = lambda: _rnd(V, dtype=dtype, grad=True, seed=20)
    fused = (*[hs(), ws(), ht, wt, labels, bs(), None, 2.0, 0.5, -100, "forward_kl", "mean", 4],)
    return {
        "lora_linear": lora,
        "lora_linear_fwd": [tuple(t.detach() if isinstance(t, torch.Tensor) else t for t in c) for c in lora],
        "lora_linear_dx": [(_rnd(2, M, N, dtype=dtype), w, A(False), B(False), 0.5, 0.2, _seed(), None, None)],
        "lora_linear_da": [(_rnd(10, r, seed=21), x(False), 0.5, 0.2, _seed(), None)],
        "int8_vectorwise_quant": [(x(False) * 3, 0.0, None), (x(False) * 3, 2.0, None)],
        "int8_linear": int8,
        "int8_linear_grad_input": [(_rnd(2, M, N, dtype=dtype), q8, s8, None)],
        "quantize": [(_rnd(4, 64, dtype=dtype), 4, "zeropoint", None, 16, None),
                     (_rnd(4, 9, dtype=dtype), 8, "absmax", 1, None, None)],
        "dequantize": [(*qargs(q4), [12, 64], dtype, None), (*qargs(qz8), [12, 64], dtype, None)],
        "quantize_4bit": [(x4, "nf4", 32, None), (x4, "fp4", 64, None)],
        "double_quant": [(f4.scale, None)],
        "dequantize_4bit": [(*qargs4(n4), [3, 40], dtype, None), (*qargs4(f4), [3, 40], dtype, None)],
        "nf4_linear": [(_rnd(2, 3, 40, dtype=dtype, grad=True, seed=33), *qargs4(n4l), 12,
                        _rnd(12, dtype=dtype, grad=True, seed=34), None),
                       (_rnd(3, 40, dtype=dtype, grad=True, seed=35), *qargs4(f4l), 12, None, None)],
        "nf4_linear_grad_input": [(_rnd(3, 12, dtype=dtype, seed=36), *qargs4(n4l), 40, None)],
        "nf4_lora_linear": nf4_lora,
        "nf4_lora_linear_fwd": [tuple(t.detach() if isinstance(t, torch.Tensor) else t for t in c) for c in nf4_lora],
        "nf4_lora_linear_grad_input": [  # dy, the 4-bit weight, in_features, lora_A, lora_B, scaling, dropout, seed
            (_rnd(2, 3, 12, dtype=dtype, seed=44), *qargs4(n4l), 40, *[t.detach() for t in nf4_lora[0][9:11]], 0.5,
             0.2, _seed(), None),
            (_rnd(3, 12, dtype=dtype, seed=45), *qargs4(f4l), 40, *[t.detach() for t in nf4_lora[1][9:11]], 2.0,
             0.0, None, None)],
        "quant_linear": quant_linear,
        "quant_linear_grad_input": [(_rnd(2, 3, 12, dtype=dtype, seed=46), *qargs(q4), 64, None),
                                    (_rnd(3, 12, dtype=dtype, seed=47), *qargs(qz8), 64, None)],
        "quant_lora_linear": q_lora,
        "quant_lora_linear_fwd": [tuple(t.detach() if isinstance(t, torch.Tensor) else t for t in c) for c in q_lora],
        "quant_lora_linear_grad_input": [  # dy, the weight, in_features, lora_A, lora_B, scaling, dropout, seed
            (_rnd(2, 3, 12, dtype=dtype, seed=55), *qargs(q4), 64, *[t.detach() for t in q_lora[0][9:11]], 0.5,
             0.2, _seed(), None),
            (_rnd(2, 12, dtype=dtype, seed=56), *qargs(qz8), 64, *[t.detach() for t in q_lora[1][9:11]], 2.0,
             0.0, None, None)],
        "fake_quantize": fake_quantize,
        "fake_quantize_backward": [(xs, _rnd(6, 10, dtype=dtype, seed=22), scale(False), zp().detach(), 4,
                                    "zeropoint", 0, None)],
        "bottleneck_adapter": [(*ad(), "gelu", 0.7, None), (*ad()[:2], None, ad()[3], None, "relu", 1.0, None)],
        "bottleneck_adapter_backward": [
            (*[t.detach() for t in ad()[:1]], _rnd(3, 7, d, dtype=dtype, seed=23),
             *[t.detach() for t in ad()[1:4]], "silu", 0.5, True, True, None),
            (*[t.detach() for t in ad()[:1]], _rnd(3, 7, d, dtype=dtype, seed=23),
             *[t.detach() for t in ad()[1:4]], "silu", 0.5, False, True, None)],
        "multi_lora": [(*ml(), True, None)],
        "multi_lora_add_": [(_rnd(7, N, dtype=dtype, seed=24), *ml(), False, None)],
        "distillation_loss": [(z(), u, labels, 2.0, 0.5, -100, "forward_kl", "mean", None),
                              (z(), u, None, 1.0, 0.5, -100, "jsd", "none", None),
                              (z(), u, labels, 3.0, 0.3, -100, "reverse_kl", "sum", None)],
        "distillation_loss_fwd": [(z().detach(), u, labels, 2.0, 0.5, -100, "forward_kl", "mean", True, None)],
        "fused_linear_distillation_loss": [(*fused, None)],
        "fused_linear_distillation_loss_fwd": [
            (*[t.detach() if isinstance(t, torch.Tensor) else t for t in fused], True, True, True, None)],
    }


def registered_ops() -> list[str]:
    return sorted(n.split("::")[1] for n in torch._C._dispatch_get_all_op_names() if n.startswith("fastpeft::"))


def test_every_registered_op_has_a_case():
    assert sorted(cases(torch.float32)) == registered_ops()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", registered_ops())
def test_opcheck(name, dtype, backend):
    if backend == "triton" and not fastpeft._backend.interpreter_active() and DEVICE == "cpu":
        pytest.skip("triton on CPU tensors needs TRITON_INTERPRET=1")
    op = getattr(torch.ops.fastpeft, name).default
    with fastpeft.use_backend(backend):
        for args in cases(dtype)[name]:
            torch.library.opcheck(op, args)


def _to_fake_cuda(v):
    if isinstance(v, torch.Tensor):
        return torch.empty_strided(v.shape, v.stride(), dtype=v.dtype, device="cuda")
    return v


@pytest.mark.parametrize("name", registered_ops())
def test_cuda_registration_traces_on_fake_cuda_tensors(name):
    """Every op (forward, backward and in-place ones) traces on fake CUDA tensors: make_fx records
    the fastpeft node with CUDA outputs of the fake implementation's shapes; no GPU, no kernel
    runs. (Autograd itself on fake CUDA tensors aborts a CPU-only torch build, so the backward
    ops are traced as ops here; test_compile.py traces whole models.)"""
    from torch.fx.experimental.proxy_tensor import make_fx
    from torch.fx.experimental.symbolic_shapes import ShapeEnv
    from torch._subclasses.fake_tensor import FakeTensorMode
    op = getattr(torch.ops.fastpeft, name).default
    for args in cases(torch.float32)[name]:
        with FakeTensorMode(shape_env=ShapeEnv()):
            fake = [_to_fake_cuda(a) for a in args]
            tensors = [i for i, a in enumerate(fake) if isinstance(a, torch.Tensor)]

            def run(*ts):
                full = list(fake)
                for i, t in zip(tensors, ts):
                    full[i] = t
                out = op(*full)
                return full[0] if out is None else out  # an in-place op: its mutated input

            gm = make_fx(run, tracing_mode="fake")(*[fake[i] for i in tensors])
        nodes = [n for n in gm.graph.nodes if n.op == "call_function" and str(n.target).startswith("fastpeft.")]
        assert [str(n.target) for n in nodes] == [f"fastpeft.{name}.default"], gm.graph
        vals = nodes[0].meta.get("val")  # None for an in-place op: check what it mutates
        vals = [fake[0]] if vals is None else vals if isinstance(vals, (list, tuple)) else [vals]
        assert all(v.device.type == "cuda" for v in vals if isinstance(v, torch.Tensor))


# --------------------------------------------------------------------------------- autocast


def _linear_layers():
    torch.manual_seed(0)
    base = torch.nn.Linear(64, 24)
    return {
        "LoRALinear": fastpeft.LoRALinear.from_linear(torch.nn.Linear(64, 24), r=4),
        "Int8Linear": fastpeft.Int8Linear.from_linear(base, threshold=3.0),
        "Int8Linear+LoRA": fastpeft.LoRALinear.from_linear(fastpeft.Int8Linear.from_linear(base), r=4),
        "QuantLinear": fastpeft.QuantLinear.from_linear(base, bits=4, group_size=32),
        "QuantLinear W4A8": fastpeft.QuantLinear.from_linear(base, bits=4, group_size=32, activations="dynamic"),
        "QuantLinear nf4": fastpeft.QuantLinear.from_linear(base, bits=4, scheme="nf4", group_size=64, double_quant=True),
        "BottleneckAdapter": fastpeft.BottleneckAdapter(64, bottleneck=8),
    }


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(_linear_layers()))
def test_autocast_output_dtype_as_f_linear(name, backend):
    """Under torch.autocast(bfloat16) every linear-like op casts its inputs as F.linear does: a float32
    input gives a bfloat16 output on every backend, and the float32 parameters get float32 grads."""
    if backend == "triton" and not fastpeft._backend.interpreter_active() and DEVICE == "cpu":
        pytest.skip("triton on CPU tensors needs TRITON_INTERPRET=1")
    layer = _linear_layers()[name].to(DEVICE)
    x = torch.randn(3, 64, device=DEVICE, requires_grad=True)
    with fastpeft.use_backend(backend), torch.autocast(DEVICE, dtype=torch.bfloat16):
        y = layer(x)
        assert y.dtype == torch.nn.functional.linear(x, torch.randn(5, 64, device=DEVICE)).dtype == torch.bfloat16
        y.float().sum().backward()
    assert x.grad is not None and x.grad.dtype == torch.float32
    for p in layer.parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.dtype == p.dtype == torch.float32
    with torch.no_grad():  # and the values are the layer's in bfloat16, to bf16 precision
        want = _linear_layers()[name].to(DEVICE, torch.bfloat16)(x.detach().bfloat16()).float()
    assert (y.float() - want).norm() <= 2e-2 * want.norm() + 1e-6


def test_autocast_does_not_reach_inside_the_kernels():
    """The fused distillation loss runs its own matmuls; under autocast they stay in the inputs'
    dtype (the op runs with autocast off inside), so float32 inputs give float32 gradients."""
    hs = torch.randn(6, 16, device=DEVICE, requires_grad=True)
    ws = torch.randn(30, 16, device=DEVICE, requires_grad=True)
    ht, wt = torch.randn(6, 20, device=DEVICE), torch.randn(30, 20, device=DEVICE)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        loss = fastpeft.fused_linear_distillation_loss(hs, ws, ht, wt, chunk_size=4)
    loss.backward()
    ref = fastpeft.fused_linear_distillation_loss(hs.detach(), ws.detach(), ht, wt, chunk_size=4)
    assert loss.dtype == torch.float32 and hs.grad.dtype == torch.float32
    assert torch.allclose(loss, ref)


# --------------------------------------------------------------------------------- host syncs

# Every place in fastpeft/ that reads a tensor value on the host through .item(), .tolist(),
# nonzero, .cpu(), .numpy(), synchronize or bool() (int() / float() of a tensor are not greppable
# apart from Python numbers; on the traced paths torch.compile(fullgraph=True) catches them, see
# test_compile.py), with why it is allowed. A new one fails the test below: remove it (keep the work on the
# device, or move it into an op's kernel behind fastpeft._checks.check_values) or add it here
# with its reason. Keys: (file, the line stripped).
ALLOWED_SYNCS = {
    ("fastpeft/ops/nf4.py", 'extra = json.loads(bytes(value.tolist()).decode("utf-8"))'):
        "QuantizedTensor.from_bnb: the packed JSON quant state of a bitsandbytes checkpoint, read once at conversion",
    ("fastpeft/_checks.py", "elif not bool(ok.all()):  # host memory: no device to wait for"):
        "check_values on CPU tensors only (CUDA: torch._assert_async)",
    ("fastpeft/ops/int8.py", "cols = torch.nonzero(flags).flatten()  # the index list is the API: its length syncs"):
        "int8_vectorwise_quant returns the outlier columns: an output whose length depends on the data",
    ("fastpeft/ops/multi_lora.py", "pos = int(bad_idx.nonzero()[0, 0])"): "error message, CPU failure path",
    ("fastpeft/ops/multi_lora.py", "pos = int(bad_rank.nonzero()[0, 0])"): "error message, CPU failure path",
    ("fastpeft/ops/fakequant.py",
     "f\"scale must be finite and > 0 in every slot, got {s[:8].tolist()}{' ...' if s.numel() > 8 else ''}\"))"):
        "error message, CPU failure path",
    ("fastpeft/ops/distill.py", "f\"got {labels[bad].flatten()[:4].tolist()}\"))"): "error message, CPU failure path",
    ("fastpeft/nn/fakequant.py", "self._initialized = bool(self.initialized)  # loading is not a training step: read it once"):
        "load_state_dict, not a step",
    ("fastpeft/nn/lora.py", "self._merge_after_load = bool(state)"): "load_state_dict (the merged flag), not a step",
    ("fastpeft/nn/qat.py", "if not bool(torch.isfinite(w).all()):"): "QATLinear set-up (reset_weight_quantizer)",
    ("fastpeft/nn/qat.py", "if not bool((torch.isfinite(s) & (s > 0)).all()):"): "convert_qat, once",
    ("fastpeft/nn/qat.py", "f\"{s.flatten()[:8].tolist()}\")"): "convert_qat error message",
    ("fastpeft/reference/multi_lora.py", "counts = torch.bincount(key, minlength=n + 1).tolist()"):
        "torch backend on CPU tensors only (HOST_GROUPED): rows grouped by adapter; other devices gather per row",
    ("fastpeft/reference/multi_lora.py", "rank_list = ranks.long().clamp(0, r_max).tolist()"):
        "torch backend on CPU tensors only (HOST_GROUPED): rows grouped by adapter; other devices gather per row",
    ("fastpeft/reference/distill.py", "idx = valid.nonzero().squeeze(1)"):
        "the reference (the torch backend; CUDA tensors default to triton, which has no sync)",
    ("fastpeft/reference/int8.py", "cols = torch.nonzero(out.any(dim=0)).flatten()"):
        "the reference's outlier columns (the torch backend; triton and cuda keep them on the device)",
    ("fastpeft/quantization.py", "self.hist += torch.bincount(idx.cpu(), minlength=self.bins).double()"):
        "calibration observer, before quantize_model converts: not a step",
}
# bool() of Python values (config flags), not tensors
PYTHON_BOOLS = {
    ("fastpeft/adapter_io.py", "return bool(exclude) and name_matches(name, exclude)"),
    ("fastpeft/adapter_io.py", "use_rslora = bool(config.get(\"use_rslora\", False))"),
    ("fastpeft/ops/lora.py", "return M <= FUSE_SHRINK_MAX_M if fuse_shrink is None else bool(fuse_shrink)"),
    ("fastpeft/ops/multi_lora.py", "check = bool(check)"),
    ("fastpeft/adapter_io.py", "return bool(params) and all(p.requires_grad for p in params)"),
    ("fastpeft/lora.py", "return (fsdp is not None and bool(fsdp.fsdp_modules(model))) or \\"),
    ("fastpeft/nn/lora.py", "_checks.probability(\"lora_dropout\", lora_dropout), bool(use_rslora))"),
}
SYNC_PATTERN = re.compile(r"\.item\(\)|\.tolist\(\)|nonzero\(|\.cpu\(\)|synchronize\(|\bbool\(|\.numpy\(\)")


def test_host_syncs_are_the_listed_ones():
    found = set()
    for path in sorted((ROOT / "fastpeft").rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        for line in path.read_text().splitlines():
            s = line.strip()
            if s.startswith("#") or not SYNC_PATTERN.search(s.split("#")[0] if "#" in s and '"' not in s else s):
                continue
            found.add((rel, s))
    new = sorted(found - set(ALLOWED_SYNCS) - PYTHON_BOOLS)
    gone = sorted((set(ALLOWED_SYNCS) | PYTHON_BOOLS) - found)
    assert not new, "new host reads of tensor values (a GPU sync; remove or list with a reason):\n" + \
        "\n".join(f"  {f}: {s}" for f, s in new)
    assert not gone, "listed sync sites no longer in the code (drop them from the list):\n" + \
        "\n".join(f"  {f}: {s}" for f, s in gone)


# --------------------------------------------------------------------------------- no host reads


def _public_calls(dtype=torch.float32):
    """name -> a call of a public function, forward (and backward where it trains) on fresh inputs."""
    g = lambda *s, grad=False, seed=0, scale=1.0: _rnd(*s, dtype=dtype, grad=grad, seed=seed, scale=scale)
    w = g(24, 40, scale=0.2)

    def backward(y):
        if y.requires_grad:
            y.float().sum().backward()

    def lora():
        backward(fastpeft.lora_linear(g(2, 5, 40, grad=True), w, g(24), g(4, 40, grad=True, scale=0.2),
                                      g(24, 4, grad=True, scale=0.2), 0.5, dropout_p=0.2, training=True))

    def int8(threshold, static=False):
        q, s = fastpeft.ops.int8.quantize_weight(w)
        step = torch.tensor(0.02, device=DEVICE) if static else None
        backward(fastpeft.int8_linear(g(2, 5, 40, grad=True) * 3, q, s, g(24), threshold, input_scale=step))

    def quant(activations):
        qw = fastpeft.quantize(g(12, 64), 4, "zeropoint", group_size=32)
        step = torch.tensor(0.03, device=DEVICE) if activations == "static" else None
        backward(fastpeft.quant_linear(g(3, 64, grad=True), qw, g(12), activations=activations, input_scale=step))

    def qlora():  # LoRALinear on QLoRA's 4-bit base (nf4, double quantization), training with dropout
        lin = torch.nn.Linear(72, 24, device=DEVICE, dtype=dtype)
        base = fastpeft.QuantLinear.from_linear(lin, bits=4, scheme="nf4", group_size=64, double_quant=True)
        backward(fastpeft.LoRALinear.from_linear(base, r=4, lora_dropout=0.1)(g(2, 3, 72, grad=True)))

    def lora_int4():  # LoRALinear on an int4 zero-point base (groups of 32), training with dropout
        lin = torch.nn.Linear(64, 24, device=DEVICE, dtype=dtype)
        base = fastpeft.QuantLinear.from_linear(lin, bits=4, scheme="zeropoint", group_size=32)
        backward(fastpeft.LoRALinear.from_linear(base, r=4, lora_dropout=0.1)(g(2, 3, 64, grad=True)))

    def fake_quantize():
        s = torch.full((6,), 0.05, device=DEVICE, requires_grad=True)
        backward(fastpeft.fake_quantize(g(6, 10, grad=True), s, torch.full((6,), 3.0, device=DEVICE), 4, "zeropoint", 0))

    def bottleneck_adapter():
        backward(fastpeft.bottleneck_adapter(g(3, 7, 24, grad=True), g(8, 24, grad=True, scale=0.2), g(8, grad=True),
                                  g(24, 8, grad=True, scale=0.2), g(24, grad=True), "gelu", 0.7))

    def multi_lora():
        with torch.no_grad():
            fastpeft.multi_lora(g(7, 40), g(3, 4, 40), g(3, 24, 4), torch.tensor([1, 4, 2], device=DEVICE),
                                torch.tensor([0.5, 1.0, 2.0], device=DEVICE),
                                torch.tensor([0, 2, -1, 1, 1, 0, 2], device=DEVICE), check=True)

    labels = torch.tensor([[1, -100, 29], [0, 5, 7]], device=DEVICE)

    def distill():
        backward(fastpeft.distillation_loss(g(2, 3, 30, grad=True), g(2, 3, 30), labels))

    def fused():
        backward(fastpeft.fused_linear_distillation_loss(g(2, 3, 16, grad=True), g(30, 16, grad=True, scale=0.3),
                                                         g(2, 3, 20), g(30, 20, scale=0.3), labels, chunk_size=4))

    return {"lora_linear": lora, "int8_linear t0": lambda: int8(0.0), "int8_linear t2": lambda: int8(2.0),
            "int8_linear static": lambda: int8(0.0, True), "quant_linear": lambda: quant(None),
            "quant_linear dynamic": lambda: quant("dynamic"), "quant_linear static": lambda: quant("static"),
            "qlora LoRALinear(QuantLinear nf4)": qlora, "LoRALinear(QuantLinear int4)": lora_int4,
            "fake_quantize": fake_quantize, "bottleneck_adapter": bottleneck_adapter, "multi_lora": multi_lora,
            "distillation_loss": distill, "fused_linear_distillation_loss": fused,
            "quantize + dequantize": lambda: fastpeft.dequantize(fastpeft.quantize(g(4, 64), 4, "zeropoint",
                                                                                  group_size=16)),
            "nf4 quantize + dequantize": lambda: fastpeft.dequantize(fastpeft.quantize(g(4, 72), 4, "nf4",
                                                                                      double_quant=True))}


def _forbidden(*args, **kwargs):
    raise AssertionError("a host read of a tensor value in a kernel path")


@pytest.mark.parametrize("name", list(_public_calls()))
def test_kernel_paths_read_no_tensor_value_on_the_host(name, monkeypatch):
    """The default CUDA path (triton; here in the interpreter) forward and backward with every way
    to read a tensor value on the host made to fail, and the value checks in their device form
    (as on CUDA: nothing read): the CPU stand-in for a GPU's torch.cuda.set_sync_debug_mode."""
    if DEVICE == "cpu" and not fastpeft._backend.interpreter_active():
        pytest.skip("needs the Triton interpreter (TRITON_INTERPRET=1) on the CPU")
    call = _public_calls()[name]
    from fastpeft import _checks
    monkeypatch.setattr(_checks, "check_values", lambda ok, message, exc=ValueError: None)
    with monkeypatch.context() as m, fastpeft.use_backend("triton"):
        for method in ("item", "tolist", "__bool__", "nonzero"):
            m.setattr(torch.Tensor, method, _forbidden)
        call()


@pytest.mark.gpu
@pytest.mark.parametrize("name", list(_public_calls()))
def test_gpu_kernel_paths_do_not_sync(name):
    """On a GPU: forward and backward of each op on its default backend under
    torch.cuda.set_sync_debug_mode("error") (which raises on any synchronizing call)."""
    call = _public_calls(torch.bfloat16)[name]
    call()  # first call: compiles, autotunes (may sync)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        call()
    finally:
        torch.cuda.set_sync_debug_mode("default")
