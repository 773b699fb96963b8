"""LLM.int8(): quantization and the int8 linear layer against the reference, float64 math and
bitsandbytes; Int8Linear, quantize_int8, LoRA on an int8 base."""
import copy

import pytest
import torch
from torch import nn

import fastpeft
from fastpeft import _backend
from fastpeft.reference import int8 as ref

from _dtypes import case_id, dtype_cases
from _utils import DEVICE, assert_close, rel_err

KERNEL_BACKENDS = ["triton"] + (["cuda"] if DEVICE == "cuda" and _backend.cuda_ext_status()[0] else [])
BACKENDS = KERNEL_BACKENDS + ["torch"]


def activations(M, K, dtype, n_outlier_cols=0, seed=0, device=DEVICE):
    """Random activations; ``n_outlier_cols`` columns get a few entries of magnitude 8-20."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g, dtype=torch.float64)
    if n_outlier_cols and M:
        cols = torch.randperm(K, generator=g)[:n_outlier_cols]
        for c in cols.tolist():
            rows = torch.randint(0, M, (max(1, M // 4),), generator=g)
            x[rows, c] = (8 + 12 * torch.rand(rows.numel(), generator=g, dtype=torch.float64)) * \
                torch.sign(torch.randn(rows.numel(), generator=g, dtype=torch.float64))
    return x.to(device, dtype)


def int8_weight(N, K, seed=1, device=DEVICE):
    g = torch.Generator().manual_seed(seed)
    return ref.quantize_weight((torch.randn(N, K, generator=g) / K ** 0.5).to(device))


# --------------------------------------------------------------------------------- quantization


QUANT_CASES = [(shape, n_out, threshold) for shape, n_out in [((1, 37), 1), ((5, 70), 0), ((33, 130), 3), ((64, 64), 2)]
               for threshold in (0.0, 6.0)]
# bf16 on the CPU: each shape once, both thresholds
QUANT_BF16 = [((1, 37), 1, 6.0), ((5, 70), 0, 0.0), ((33, 130), 3, 6.0), ((64, 64), 2, 0.0)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype,shape,n_out,threshold", dtype_cases(QUANT_CASES, QUANT_BF16), ids=case_id)
def test_quant_matches_reference(backend, dtype, shape, n_out, threshold):
    x = activations(*shape, dtype, n_outlier_cols=n_out)
    q, s, cols = fastpeft.int8_vectorwise_quant(x, threshold, backend=backend)
    qr, sr, cr = ref.int8_vectorwise_quant(x, threshold)
    assert q.dtype == torch.int8 and s.dtype == torch.float32
    assert torch.equal(s, sr)
    assert torch.equal(q, qr)
    if threshold == 0:
        assert cols is None
    else:
        assert torch.equal(cols.cpu().long(), cr.cpu())
        assert bool((q[:, cols] == 0).all())


def test_quant_matches_bitsandbytes():
    bnb = pytest.importorskip("bitsandbytes.functional")
    for threshold, n_out in ((0.0, 0), (6.0, 4)):
        x = activations(48, 96, torch.float16, n_outlier_cols=n_out, seed=3, device="cpu")
        qb, sb, cb = bnb.int8_vectorwise_quant(x.clone(), threshold)
        q, s, cols = fastpeft.int8_vectorwise_quant(x, threshold, backend="torch")
        assert torch.equal(s, sb.float())
        if threshold == 0:
            assert cols is None
        else:
            assert torch.equal(cols, cb.long())
        # bitsandbytes multiplies in fp16: codes may differ by one where x * 127 / s is near a tie
        exact = x.double() * 127 / s.double()[:, None]
        near_tie = ((exact - exact.floor()) - 0.5).abs() < 2e-2
        diff = (q.int() - qb.int()).abs()
        assert int(diff.max()) <= 1 and bool((diff[~near_tie] == 0).all())


def test_zero_and_nonfinite_rows_stay_in_their_row():
    x = activations(6, 40, torch.float32, device="cpu")
    x[1] = 0.0
    x[3, 5] = float("nan")
    x[4, 7] = float("inf")
    for backend in ("torch",) + tuple(b for b in KERNEL_BACKENDS if DEVICE == "cpu"):
        q, s, _ = fastpeft.int8_vectorwise_quant(x, 0.0, backend=backend)
        assert s[1] == 0 and bool((q[1] == 0).all())
        clean = [0, 2, 5]
        qr, sr, _ = ref.int8_vectorwise_quant(x[clean], 0.0)
        assert torch.equal(q[clean], qr) and torch.equal(s[clean], sr)
        w, sw = int8_weight(12, 40, device="cpu")
        y = fastpeft.int8_linear(x, w, sw, None, threshold=0.0, backend=backend)
        assert torch.isfinite(y[clean]).all() and bool((y[1] == 0).all())
        assert_close("clean rows", y[clean], ref.int8_linear(x[clean].double(), w, sw), torch.float32)


# --------------------------------------------------------------------------------- the linear layer


def float64_linear(x, w, sw, bias):
    W = ref.dequantize_weight(w, sw).double()
    y = x.double() @ W.t()
    return y if bias is None else y + bias.double()


LINEAR_CASES = [(shape, threshold, n_out) for shape in [(1, 37, 45), (7, 64, 48), (33, 130, 70)]
                for threshold, n_out in [(0.0, 0), (6.0, 3)]]
# bf16 on the CPU: each shape once, both thresholds
LINEAR_BF16 = [((1, 37, 45), 6.0, 3), ((7, 64, 48), 0.0, 0), ((33, 130, 70), 6.0, 3)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype,shape,threshold,n_out", dtype_cases(LINEAR_CASES, LINEAR_BF16), ids=case_id)
def test_int8_linear_matches_reference_and_grads(backend, dtype, shape, threshold, n_out):
    M, K, N = shape
    x = activations(M, K, dtype, n_outlier_cols=n_out, seed=M).requires_grad_()
    w, sw = int8_weight(N, K)
    b = torch.randn(N, dtype=torch.float64).to(DEVICE, dtype).requires_grad_()
    y = fastpeft.int8_linear(x, w, sw, b, threshold=threshold, backend=backend)
    assert y.dtype == dtype and y.shape == (M, N)
    assert_close("y", y, ref.int8_linear(x.detach().double(), w, sw, b.detach().double(), threshold), dtype)
    dy = torch.randn(M, N, dtype=torch.float64).to(DEVICE)
    y.backward(dy.to(dtype))
    dx_ref = dy @ ref.dequantize_weight(w, sw).double()
    assert_close("dx", x.grad, dx_ref, dtype)
    assert_close("db", b.grad, dy.sum(0), dtype)


@pytest.mark.parametrize("threshold,n_out", [(0.0, 0), (6.0, 4)])
def test_error_no_worse_than_bitsandbytes(threshold, n_out):
    pytest.importorskip("bitsandbytes")
    x = activations(64, 256, torch.float16, n_outlier_cols=n_out, seed=9, device="cpu")
    lin = nn.Linear(256, 128).half()
    w, sw = ref.quantize_weight(lin.weight)
    exact = x.double() @ lin.weight.double().t() + lin.bias.double()
    ours = fastpeft.int8_linear(x, w, sw, lin.bias.detach(), threshold=threshold, backend="torch")
    qa, sa, cols = torch.ops.bitsandbytes.int8_vectorwise_quant(x.clone(), threshold)
    theirs, _ = torch.ops.bitsandbytes.int8_mixed_scaled_mm(x, qa, w, sa, sw, cols, lin.bias.detach())
    assert rel_err(ours, exact) <= rel_err(theirs, exact) * 1.001 + 1e-6


def test_bad_inputs():
    x = torch.randn(4, 16)
    w, sw = int8_weight(8, 16, device="cpu")
    with pytest.raises(TypeError, match="int8"):
        fastpeft.int8_linear(x, w.float(), sw)
    with pytest.raises(ValueError, match="features"):
        fastpeft.int8_linear(x[:, :15], w, sw)
    with pytest.raises(ValueError, match="weight_scale"):
        fastpeft.int8_linear(x, w, sw[:7])
    with pytest.raises(ValueError, match="threshold"):
        fastpeft.int8_linear(x, w, sw, threshold=-1.0)
    with pytest.raises(ValueError, match="threshold"):
        fastpeft.int8_vectorwise_quant(x, -0.5)
    with pytest.raises(TypeError, match="dtype"):
        fastpeft.int8_vectorwise_quant(x.int())
    with pytest.raises(ValueError, match="bias"):
        fastpeft.int8_linear(x, w, sw, torch.zeros(7))
    y = fastpeft.int8_linear(x[:0], w, sw)
    assert y.shape == (0, 8)
    with pytest.raises(ValueError, match="threshold"):
        fastpeft.Int8Linear(4, 4, threshold=-1)


# --------------------------------------------------------------------------------- Int8Linear


def test_int8linear_from_linear_state_dict_and_memory():
    lin = nn.Linear(96, 40).half()
    m = fastpeft.Int8Linear.from_linear(lin, threshold=6.0)
    w_bytes = m.weight_int8.numel() * m.weight_int8.element_size()
    assert w_bytes * 2 == lin.weight.numel() * lin.weight.element_size()
    sd = m.state_dict()
    assert set(sd) == {"weight_int8", "weight_scale", "bias"}
    m2 = fastpeft.Int8Linear(96, 40, dtype=torch.float16)
    m2.load_state_dict(sd)
    assert torch.equal(m2.weight_int8, m.weight_int8) and torch.equal(m2.weight_scale, m.weight_scale)
    m3 = fastpeft.Int8Linear(96, 40, dtype=torch.float16)
    m3.load_state_dict(lin.state_dict())  # a 16-bit nn.Linear state_dict is quantized on load
    assert torch.equal(m3.weight_int8, m.weight_int8) and torch.equal(m3.weight_scale, m.weight_scale)
    x = torch.randn(3, 96, dtype=torch.float16)
    assert torch.isfinite(m(x)).all()
    assert rel_err(m(x), lin(x).double()) < 2e-2
    with pytest.raises(RuntimeError, match="shape"):
        fastpeft.Int8Linear(95, 40).load_state_dict(lin.state_dict())


def test_int8linear_to_half_keeps_float32_scales():
    lin = nn.Linear(32, 16)
    m = fastpeft.Int8Linear.from_linear(lin)
    scale = m.weight_scale.clone()
    m = m.to(torch.bfloat16)
    assert m.weight_scale.dtype == torch.float32 and torch.equal(m.weight_scale, scale)
    assert m.weight_int8.dtype == torch.int8 and m.bias.dtype == torch.bfloat16
    y = m(torch.randn(3, 32, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16 and torch.isfinite(y).all()


def test_int8linear_passes_gradient_to_input():
    m = fastpeft.Int8Linear.from_linear(nn.Linear(32, 16))
    assert not any(p.requires_grad for p in m.parameters())
    x = torch.randn(5, 32, requires_grad=True)
    m(x).sum().backward()
    assert_close("dx", x.grad, torch.ones(5, 16, dtype=torch.float64) @ m.dequantized_weight().double(),
                 torch.float32)


# --------------------------------------------------------------------------------- models, LoRA


def test_lora_on_int8_base_trains_merges_and_unmerges_exactly():
    base = fastpeft.Int8Linear.from_linear(nn.Linear(48, 24))
    m = fastpeft.LoRALinear.from_linear(base, r=4, lora_alpha=8)
    assert m.base_layer is base and m.lora_A.dtype == torch.float32
    x = torch.randn(10, 48)
    assert torch.equal(m(x), base(x)), "B starts at zero"
    opt = torch.optim.SGD([m.lora_A, m.lora_B], lr=0.1)
    codes, scales = base.weight_int8.clone(), base.weight_scale.clone()
    target = torch.randn(10, 24)
    losses = []
    for _ in range(5):
        loss = (m(x) - target).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert torch.equal(base.weight_int8, codes), "the int8 base never trains"
    y = m(x)
    m.merge()
    assert not torch.equal(base.weight_int8, codes)
    assert rel_err(m(x), y.double()) < 2e-2, "merged int8 layer approximates base + LoRA"
    m.unmerge()
    assert torch.equal(base.weight_int8, codes) and torch.equal(base.weight_scale, scales)
    assert isinstance(m.to_linear(), fastpeft.Int8Linear)


def test_quantize_int8_and_inject_lora_on_a_transformers_model():
    pytest.importorskip("transformers")
    from _hf import tiny_llama
    model = tiny_llama()
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    with fastpeft.use_backend("torch"):
        ref_logits = model(ids).logits
        qmodel = fastpeft.quantize_int8(copy.deepcopy(model), threshold=6.0)
        kinds = {n: type(m) for n, m in qmodel.named_modules() if isinstance(m, (nn.Linear, fastpeft.Int8Linear))}
        assert kinds["lm_head"] is nn.Linear
        assert sum(k is fastpeft.Int8Linear for k in kinds.values()) == 2 * 7
        logits = qmodel(ids).logits
        cos = torch.nn.functional.cosine_similarity(logits.flatten(1), ref_logits.flatten(1)).min()
        assert cos > 0.99
        fastpeft.inject_lora(qmodel, ["q_proj", "v_proj"], r=4, lora_alpha=8)
        trainable = {n for n, p in qmodel.named_parameters() if p.requires_grad}
        assert trainable and all(".lora_" in n for n in trainable)
        before = {n: t.clone() for n, t in qmodel.state_dict().items()}
        opt = torch.optim.AdamW([p for p in qmodel.parameters() if p.requires_grad], lr=1e-2)
        for _ in range(3):
            loss = qmodel(ids, labels=ids).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
        changed = {n for n, t in qmodel.state_dict().items() if not torch.equal(t, before[n])}
        assert changed and all(".lora_" in n for n in changed)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("K", [0, 1])
def test_one_or_no_input_feature(backend, K):
    """K == 1 (torch._int_mm on the CPU returns wrong sums there, differing between runs) and
    K == 0 (y is the bias): the reference's values, the same on every call, layer included."""
    g = torch.Generator().manual_seed(K)
    x = torch.randn(5, K, generator=g).to(DEVICE)
    w_int8, w_scale = ref.quantize_weight(torch.randn(8, K, generator=g).to(DEVICE))
    bias = torch.randn(8, generator=g).to(DEVICE)
    want = ref.int8_linear(x.cpu(), w_int8.cpu(), w_scale.cpu(), bias.cpu())
    for _ in range(3):
        y = fastpeft.int8_linear(x, w_int8, w_scale, bias, threshold=0.0, backend=backend)
        assert rel_err(y.cpu(), want.float()) <= 1e-6
    lin = nn.Linear(K, 8).to(DEVICE)
    layer = fastpeft.Int8Linear.from_linear(lin, threshold=0.0)
    with _backend.use_backend(backend):
        out = layer(x)
    assert rel_err(out.cpu(), ref.int8_linear(x.cpu(), layer.weight_int8.cpu(), layer.weight_scale.cpu(),
                                              lin.bias.detach().cpu()).float()) <= 1e-6
