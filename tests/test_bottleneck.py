"""fastpeft.adapter / fastpeft.BottleneckAdapter against the float64 reference: output and every gradient."""

import pytest
import torch

import fastpeft
from fastpeft import _backend
from fastpeft.kernels import bottleneck as kadapter
from fastpeft.ops import bottleneck as ops
from fastpeft.reference import bottleneck as ref

from _dtypes import case_id, dtype_cases
from _utils import DEVICE, assert_close

ACTS = ["relu", "gelu", "gelu_tanh", "silu"]
KERNEL_BACKENDS = ["triton"]
GRAD_NAMES = ("dx", "dW_d", "db_d", "dW_u", "db_u")


def make(M, d, R, dtype, lead=(), bias=True, device=DEVICE, seed=0):
    """Fresh inputs: h = x W_d^T + b_d ~ N(0, 1.25) (every activation bends there); the adapter
    branch and the residual of the same size, so a missing term shows."""
    g = torch.Generator().manual_seed(seed + 1000 * M + 10 * d + R)
    rnd = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)
    x = rnd(*lead, M, d).to(device, dtype).requires_grad_()
    wd = (rnd(R, d) / d ** 0.5).to(device, dtype).requires_grad_()
    wu = (rnd(d, R) / R ** 0.5).to(device, dtype).requires_grad_()
    bd = (0.5 * rnd(R)).to(device, dtype).requires_grad_() if bias else None
    bu = (0.5 * rnd(d)).to(device, dtype).requires_grad_() if bias else None
    return x, wd, bd, wu, bu


def check(x, wd, bd, wu, bu, act, s, backend, dtype, x_in=None, factor=1.0):
    """y and the gradients of x, W_d, b_d, W_u, b_u against autograd of the float64 reference
    on the same (rounded) inputs. ``x_in``: a view of the leaf x to pass instead of it."""
    x_in = x if x_in is None else x_in
    y = fastpeft.bottleneck_adapter(x_in, wd, bd, wu, bu, activation=act, scaling=s, backend=backend)
    assert y.dtype == x.dtype and y.shape == x_in.shape
    # the reference gets dy rounded to y's dtype, as the op does: in bf16 that rounding alone moves
    # db_d at bottleneck 1 (one sum over rows, with cancellation) by more than the tolerance
    dy = torch.randn(y.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(7)).to(y.dtype).double()
    y.backward(dy.to(y.device, y.dtype))
    params = (x, wd, bd, wu, bu)
    leaves = [None if t is None else t.detach().cpu().double().requires_grad_() for t in params]
    x64 = leaves[0] if x_in is x else _same_view(leaves[0], x, x_in)
    yr = ref.bottleneck_adapter(x64, *leaves[1:], act, s)
    yr.backward(dy)
    assert_close("y", y, yr, dtype, factor)
    for name, t, leaf in zip(GRAD_NAMES, params, leaves):
        if t is None:
            continue
        assert t.grad is not None, f"{name} missing"
        assert t.grad.dtype == t.dtype and t.grad.shape == t.shape
        assert_close(name, t.grad, leaf.grad, dtype, factor)


def _same_view(leaf64, base, view):
    return leaf64.as_strided(view.shape, view.stride(), view.storage_offset() - base.storage_offset())


# (M, d, bottleneck): M = 1, odd M; d not a multiple of the 32-wide interpreter tiles; a
# bottleneck that is not a power of two (24), one below the 16 padding (5), and 1
SHAPES = [(1, 40, 24), (37, 72, 5), (19, 33, 1)]


@pytest.mark.parametrize("backend", KERNEL_BACKENDS + ["torch"])
@pytest.mark.parametrize("dtype,act,shape", dtype_cases([(a, s) for a in ACTS for s in SHAPES],  # bf16 on the CPU:
                                                        zip(ACTS, SHAPES + SHAPES[:1])),  # each act and shape once
                         ids=case_id)
def test_matches_reference(backend, dtype, act, shape, poison_outputs):
    M, d, R = shape
    check(*make(M, d, R, dtype), act, 0.7, backend, dtype)


@pytest.mark.parametrize("dtype,act", dtype_cases(ACTS, ["gelu"], dtypes=[torch.float32, torch.bfloat16]), ids=case_id)
def test_weight_grads_split_over_rows(dtype, act, poison_outputs):
    """Enough rows that the weight-gradient kernel splits them and sums partials."""
    M, d, R = 70, 40, 24
    assert kadapter.split_m(M, d, R, dtype, torch.device(DEVICE)) > 1
    check(*make(M, d, R, dtype), act, -1.3, "triton", dtype)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS + ["torch"])
def test_leading_dims_and_non_contiguous_input(backend, poison_outputs):
    # a non-contiguous view: every other feature of a wider tensor, batch dims transposed
    x, wd, bd, wu, bu = make(5, 24, 12, torch.float32, seed=3)
    wide = torch.randn(3, 2, 5, 48, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    leaf = wide.requires_grad_()
    xv = leaf.transpose(0, 1)[..., ::2]
    assert not xv.is_contiguous() and xv.shape == (2, 3, 5, 24)
    check(leaf, wd, bd, wu, bu, "gelu", 0.5, backend, torch.float32, x_in=xv)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS + ["torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_no_biases(backend, dtype, poison_outputs):
    check(*make(9, 40, 8, dtype, bias=False), "silu", 2.0, backend, dtype)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_non_contiguous_weights(backend, poison_outputs):
    x, wd, bd, wu, bu = make(11, 36, 20, torch.float32)
    wd_t = wd.detach().t().contiguous().t().requires_grad_()   # column-major [R, d]
    wu_t = wu.detach().t().contiguous().t().requires_grad_()
    assert not wd_t.is_contiguous() and not wu_t.is_contiguous()
    check(x, wd_t, bd, wu_t, bu, "relu", 0.9, backend, torch.float32)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("wants", [(1, 0, 0, 0, 0), (0, 1, 1, 1, 1), (0, 0, 0, 1, 0), (0, 1, 0, 0, 0)],
                         ids=lambda w: "".join(map(str, w)))
def test_partial_gradients(backend, wants, poison_outputs):
    """Only the requested gradients come back, and each is right on its own."""
    x, wd, bd, wu, bu = make(13, 40, 16, torch.float32)
    params = (x, wd, bd, wu, bu)
    for t, want in zip(params, wants):
        t.requires_grad_(bool(want))
    y = fastpeft.bottleneck_adapter(x, wd, bd, wu, bu, activation="gelu_tanh", scaling=0.6, backend=backend)
    dy = torch.randn_like(y)
    y.backward(dy)
    leaves = [t.detach().double().requires_grad_() for t in params]
    ref.bottleneck_adapter(*leaves, "gelu_tanh", 0.6).backward(dy.double())
    for name, t, leaf, want in zip(GRAD_NAMES, params, leaves, wants):
        if want:
            assert_close(name, t.grad, leaf.grad, torch.float32)
        else:
            assert t.grad is None, name


@pytest.mark.parametrize("backend", KERNEL_BACKENDS + ["torch"])
def test_empty_rows(backend):
    x, wd, bd, wu, bu = make(0, 16, 4, torch.float32, lead=(3,))
    y = fastpeft.bottleneck_adapter(x, wd, bd, wu, bu, backend=backend)
    assert y.shape == (3, 0, 16)
    y.sum().backward()
    assert wd.grad is not None and wd.grad.abs().sum() == 0 and bu.grad.abs().sum() == 0


def test_backward_of_sum_reads_broadcast_dy(poison_outputs):
    """y.sum().backward() hands backward an expanded (stride-0) dy."""
    x, wd, bd, wu, bu = make(6, 20, 4, torch.float32)
    fastpeft.bottleneck_adapter(x, wd, bd, wu, bu, "silu", 1.5, backend="triton").sum().backward()
    leaves = [t.detach().double().requires_grad_() for t in (x, wd, bd, wu, bu)]
    ref.bottleneck_adapter(*leaves, "silu", 1.5).sum().backward()
    for name, t, leaf in zip(GRAD_NAMES, (x, wd, bd, wu, bu), leaves):
        assert_close(name, t.grad, leaf.grad, torch.float32)


# --------------------------------------------------------------------------------- reference


@pytest.mark.parametrize("act", ACTS)
def test_reference_backward_and_activation_grad_match_autograd(act):
    x, wd, bd, wu, bu = (t.detach().double() for t in make(23, 30, 7, torch.float64, device="cpu"))
    h = torch.linspace(-6, 6, 101, dtype=torch.float64, requires_grad=True)
    ref.activation(h, act).sum().backward()
    assert torch.allclose(ref.activation_grad(h.detach(), act), h.grad, rtol=1e-12, atol=1e-12)
    leaves = [t.clone().requires_grad_() for t in (x, wd, bd, wu, bu)]
    dy = torch.randn(23, 30, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    ref.bottleneck_adapter(*leaves, act, 0.8).backward(dy)
    got = ref.bottleneck_adapter_backward(x, dy, wd, bd, wu, act, 0.8)
    for name, g, leaf in zip(GRAD_NAMES, got, leaves):
        assert_close(name, g, leaf.grad, torch.float64)


def test_gelu_tanh_is_the_tanh_formula():
    h = torch.linspace(-5, 5, 41, dtype=torch.float64)
    want = 0.5 * h * (1 + torch.tanh((2 / torch.pi) ** 0.5 * (h + 0.044715 * h ** 3)))
    assert torch.allclose(ref.activation(h, "gelu_tanh"), want, rtol=1e-14, atol=1e-14)
    assert not torch.allclose(ref.activation(h, "gelu"), want, rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------------------- module


def test_module_is_identity_at_init_and_its_names():
    torch.manual_seed(0)
    m = fastpeft.BottleneckAdapter(40, bottleneck=12, activation="gelu", scaling=2.0, device=DEVICE)
    assert [n for n, _ in m.named_parameters()] == ["down.weight", "down.bias", "up.weight", "up.bias"]
    assert m.down.weight.shape == (12, 40) and m.up.weight.shape == (40, 12)
    assert m.up.weight.abs().sum() == 0 and m.up.bias.abs().sum() == 0
    assert m.down.weight.abs().max() <= 1 / 40 ** 0.5 and m.down.weight.std() > 0
    x = torch.randn(2, 7, 40, device=DEVICE, requires_grad=True)
    y = m(x)
    assert torch.equal(y, x)
    y.backward(torch.randn_like(y))
    assert m.up.weight.grad.abs().sum() > 0 and m.up.bias.grad.abs().sum() > 0
    assert m.down.weight.grad.abs().sum() == 0  # up = 0: nothing reaches down yet
    assert fastpeft.nn.BottleneckAdapter is fastpeft.BottleneckAdapter
    assert "bottleneck=12" in repr(m)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS + ["torch"])
def test_module_matches_functional_and_casts_fp32_params(backend, poison_outputs):
    torch.manual_seed(1)
    m = fastpeft.BottleneckAdapter(24, bottleneck=8, activation="silu", scaling=0.5, device=DEVICE)
    torch.nn.init.normal_(m.up.weight)
    torch.nn.init.normal_(m.up.bias)
    x = torch.randn(3, 5, 24, device=DEVICE, dtype=torch.float16)
    with fastpeft.use_backend(backend):
        y = m(x)
    assert y.dtype == torch.float16
    y.float().sum().backward()
    assert m.down.weight.grad.dtype == torch.float32 and m.down.weight.grad.abs().sum() > 0
    p64 = [p.detach().half().double() for p in (m.down.weight, m.down.bias, m.up.weight, m.up.bias)]
    assert_close("y", y, ref.bottleneck_adapter(x.double(), *p64, "silu", 0.5), torch.float16)


# --------------------------------------------------------------------------------- backends


def test_cuda_backend_is_wired(monkeypatch, poison_outputs):
    """With a stand-in for _cext.bottleneck_adapter_forward (and the cuda backend let run on CPU tensors):
    its forward is called with 2-D row-major x, and backward runs on the triton kernels (the
    interpreter here)."""
    from fastpeft.ops import _cext
    assert "cuda" in ops.KERNELS
    calls = []

    def fake(x2, wd, bd, wu, bu, activation, scaling):
        assert x2.dim() == 2 and x2.is_contiguous() and isinstance(activation, str)
        calls.append(activation)
        return ref.bottleneck_adapter(x2, wd, bd, wu, bu, activation, scaling)

    monkeypatch.setattr(_cext, "bottleneck_adapter_forward", fake, raising=False)
    why_not = _backend.why_cannot_run
    monkeypatch.setattr(_backend, "why_cannot_run", lambda backend, device, kernels: (
        None if backend == "cuda" else why_not(backend, device, kernels)))
    x, wd, bd, wu, bu = make(9, 40, 8, torch.float32)
    y = fastpeft.bottleneck_adapter(x, wd, bd, wu, bu, "gelu", 0.9, backend="cuda")
    y.backward(torch.ones_like(y))
    assert calls == ["gelu"]
    leaves = [t.detach().double().requires_grad_() for t in (x, wd, bd, wu, bu)]
    ref.bottleneck_adapter(*leaves, "gelu", 0.9).backward(torch.ones(9, 40, dtype=torch.float64))
    for name, t, leaf in zip(GRAD_NAMES, (x, wd, bd, wu, bu), leaves):
        assert_close(name, t.grad, leaf.grad, torch.float32)


def test_large_bottleneck_leaves_the_kernels(monkeypatch):
    from fastpeft.ops import _cext
    monkeypatch.setattr(_cext, "BOTTLENECK_MAX_RANK", 256, raising=False)
    x, wd, bd, wu, bu = make(3, 8, ops.MAX_BOTTLENECK + 1, torch.float32)
    with pytest.raises(fastpeft.BackendUnavailableError, match="'triton' was forced.*bottleneck of at most 256"):
        fastpeft.bottleneck_adapter(x, wd, bd, wu, bu, backend="triton")
    with pytest.raises(fastpeft.BackendUnavailableError, match="'cuda' was forced.*bottleneck of at most 256"):
        fastpeft.bottleneck_adapter(x, wd, bd, wu, bu, backend="cuda")
    for dev in ("cpu", "cuda"):  # whatever the device, auto falls back to torch
        assert ops._choose(torch.device(dev), ops.MAX_BOTTLENECK + 1, None) == "torch"
    check(x, wd, bd, wu, bu, "relu", 1.0, None, torch.float32)  # auto: the torch path
    with pytest.raises(ValueError, match="1..256"):
        kadapter.block_r(257)


def test_auto_on_cpu_picks_interpreter_or_torch():
    got = ops._choose(torch.device("cpu"), 16, None)
    assert got == ("triton" if _backend.interpreter_active() else "torch")


# --------------------------------------------------------------------------------- errors


def test_bad_inputs_raise_clear_errors():
    x, wd, bd, wu, bu = (t.detach() for t in make(4, 8, 3, torch.float32, device="cpu"))
    cases = [
        ((x, wd, bd, wu, bu, "tanh"), ValueError, "unknown activation"),
        ((x, wd, bd, wu, bu, None), TypeError, "activation must be a str"),
        ((x, wd[:0], bd[:0], wu[:, :0], bu), ValueError, "bottleneck must be > 0"),
        ((x[:, :0], wd[:, :0], bd, wu[:0], bu[:0]), ValueError, "d_model must be > 0"),
        ((x[:, :7], wd, bd, wu, bu), ValueError, "down_weight shape"),
        ((x, wd, bd, wu[:, :2], bu), ValueError, "up_weight shape"),
        ((x, wd, bd, wu[:7], bu), ValueError, "up_weight shape"),
        ((x, wd, bd[:2], wu, bu), ValueError, "down_bias shape"),
        ((x, wd, bd, wu, bu[:7]), ValueError, "up_bias shape"),
        ((x.half(), wd, bd, wu, bu), TypeError, "dtypes must match"),
        ((x, wd, bd, wu.half(), bu), TypeError, "dtypes must match"),
        ((x.int(), wd, bd, wu, bu), TypeError, "dtype"),
        (("x", wd, bd, wu, bu), TypeError, "torch.Tensor"),
        ((x, wd[0], bd, wu, bu), ValueError, "2-D"),
        ((x, wd, bd[:, None], wu, bu), ValueError, "1-D"),
        ((x, wd, bd, wu.to("meta"), bu), ValueError, "one device"),
    ]
    for args, exc, msg in cases:
        with pytest.raises(exc, match=msg):
            fastpeft.bottleneck_adapter(*args)
    for s in (float("nan"), float("inf"), "1"):
        with pytest.raises((ValueError, TypeError), match="scaling"):
            fastpeft.bottleneck_adapter(x, wd, bd, wu, bu, scaling=s)


def test_module_bad_arguments():
    for args, kw, exc, msg in [((0,), {}, ValueError, "d_model must be > 0"),
                               ((8, 0), {}, ValueError, "bottleneck must be > 0"),
                               ((8, -2), {}, ValueError, "bottleneck must be > 0"),
                               ((8.0,), {}, TypeError, "d_model must be an int"),
                               ((8, 4), {"activation": "gelu_new"}, ValueError, "unknown activation"),
                               ((8, 4), {"scaling": float("nan")}, ValueError, "scaling")]:
        with pytest.raises(exc, match=msg):
            fastpeft.BottleneckAdapter(*args, **kw)


def test_forced_backend_that_cannot_run():
    x, wd, bd, wu, bu = make(4, 8, 2, torch.float32, device="cpu")
    with pytest.raises(fastpeft.BackendUnavailableError, match="forced"):
        fastpeft.bottleneck_adapter(x, wd, bd, wu, bu, backend="cuda")
    with pytest.raises(ValueError, match="unknown backend"):
        fastpeft.bottleneck_adapter(x, wd, bd, wu, bu, backend="cutlass")


# --------------------------------------------------------------------------------- GPU only


# every activation in bf16; gelu in fp16 and fp32 (tests/_aot.py --warm compiles these)
GPU_CASES = [(torch.bfloat16, act) for act in ACTS] + [(torch.float16, "gelu"), (torch.float32, "gelu")]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,act", GPU_CASES, ids=lambda v: str(v).replace("torch.", ""))
@pytest.mark.parametrize("shape", [(1, 1032, 64), (300, 776, 24), (1100, 4096, 64), (257, 520, 200)],
                         ids=lambda s: "x".join(map(str, s)))
def test_gpu_realistic_shapes(dtype, act, shape, poison_outputs):
    M, d, R = shape
    # fp32 dots run as 3xTF32 (tf32 off) or tf32: DESIGN's 5e-4 where tf32 is used
    factor = 50.0 if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32 else 1.0
    check(*make(M, d, R, dtype), act, 0.7, "triton", dtype, factor=factor)


@pytest.mark.gpu
@pytest.mark.parametrize("M", [1, 4096])
def test_gpu_autotuned_configs_are_correct(M, monkeypatch, poison_outputs):
    monkeypatch.setenv("FASTPEFT_AUTOTUNE", "1")
    check(*make(M, 1024, 64, torch.bfloat16), "gelu_tanh", 1.0, "triton", torch.bfloat16)
