"""fastpeft.distillation_loss, fastpeft.FusedLinearDistillationLoss and fastpeft.distill against
fastpeft/reference/distill.py (run in float64 on the same inputs), for the triton (interpreter
on CPU) and torch backends; the reference in turn against F.kl_div / F.cross_entropy and the
JSD written with probabilities. Every gradient is checked, not only the loss.
"""
import copy
import math
import os
import sys

import pytest
import torch
import torch.nn.functional as F

import fastpeft
from fastpeft.kernels import distill as k
from fastpeft.reference import distill as rd

from _dtypes import dtype_cases
from _utils import DEVICE, assert_close, rel_err

pytestmark = [pytest.mark.filterwarnings("ignore:.*encountered in:RuntimeWarning"),
              pytest.mark.usefixtures("poison_outputs")]
BACKENDS = ["triton", "torch"]
DIVERGENCES = ["forward_kl", "reverse_kl", "jsd"]
V = 300  # not a multiple of the interpreter's 128-wide tiles


def make(shape, dtype=torch.float32, seed=0, ignore=(1, 6), vocab=V):
    """Student and teacher logits [*shape, vocab] (teacher correlated with the student), labels
    with a few rows set to -100."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(*shape, vocab, generator=g, dtype=torch.float64) * 2.0
    u = 0.6 * z + torch.randn(*shape, vocab, generator=g, dtype=torch.float64) * 1.5
    labels = torch.randint(0, vocab, tuple(shape), generator=g)
    flat = labels.view(-1)
    for i in ignore:
        if i < flat.numel():
            flat[i] = -100
    return z.to(dtype).to(DEVICE), u.to(dtype).to(DEVICE), labels.to(DEVICE)


def reference(z, u, labels, grad_out, **kw):
    """(loss, d loss / dz . grad_out) of the reference in float64 on the (rounded) inputs."""
    zz = z.detach().cpu().double().requires_grad_()
    out = rd.distillation_loss(zz, u.detach().cpu().double(), None if labels is None else labels.cpu(), **kw)
    (gz,) = torch.autograd.grad(out, zz, grad_out.cpu().double())
    return out.detach(), gz


def run(backend, z, u, labels, grad_out, **kw):
    zz = z.detach().clone().requires_grad_()
    out = fastpeft.distillation_loss(zz, u, labels, backend=backend, **kw)
    (gz,) = torch.autograd.grad(out, zz, grad_out)
    return out.detach(), gz


def grad_outputs(reduction, shape, seed=3):
    if reduction == "none":
        g = torch.Generator().manual_seed(seed)
        return torch.rand(shape, generator=g, dtype=torch.float32).add_(0.5).to(DEVICE)
    return torch.tensor(1.0 if reduction == "mean" else 0.7, device=DEVICE)


def check(backend, z, u, labels, dtype, factor=1.0, reductions=("mean", "sum", "none"), **kw):
    for reduction in reductions:
        go = grad_outputs(reduction, z.shape[:-1])
        out, gz = run(backend, z, u, labels, go, reduction=reduction, **kw)
        ref, rgz = reference(z, u, labels, go, reduction=reduction, **kw)
        assert out.dtype == torch.float32 and gz.dtype == z.dtype and gz.shape == z.shape
        assert_close(f"loss {reduction}", out, ref, dtype, factor)
        assert_close(f"grad {reduction}", gz, rgz, dtype, factor)


CASES = [(2.0, 0.5), (1.0, 0.3), (0.7, 0.0), (3.0, 1.0)]  # (temperature, alpha)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype,divergence,case",  # bf16 on the CPU: each divergence once, at three (T, alpha)
                         dtype_cases([(d, c) for d in DIVERGENCES for c in CASES], list(zip(DIVERGENCES, CASES[1:])),
                                     dtypes=[torch.float32, torch.float16, torch.bfloat16]),
                         ids=lambda v: f"T{v[0]}-a{v[1]}" if isinstance(v, tuple) else str(v))
def test_matches_reference(backend, dtype, divergence, case):
    """Value and gradient, [2, 5, V] logits with two ignored rows; every reduction in fp32."""
    T, alpha = case
    z, u, labels = make((2, 5), dtype)
    reductions = ("mean", "sum", "none") if dtype == torch.float32 else ("none",)
    check(backend, z, u, labels, dtype, temperature=T, alpha=alpha, divergence=divergence, reductions=reductions)


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_student_and_teacher_in_different_dtypes(backend, divergence):
    """An fp32 student against an fp16 teacher (and the reverse): each is read in its own dtype;
    the gradient comes in the student's."""
    z, u, labels = make((2, 5), torch.float32, seed=4)
    check(backend, z, u.half(), labels, torch.float16, divergence=divergence)
    check(backend, z.half(), u, labels, torch.float16, divergence=divergence, reductions=("none",))


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_without_labels(backend, divergence):
    """labels None: every row counts, the loss is T^2 * D whatever alpha is."""
    z, u, _ = make((6,))
    check(backend, z, u, None, torch.float32, temperature=1.5, alpha=0.3, divergence=divergence)
    a = fastpeft.distillation_loss(z, u, None, 1.5, 0.3, divergence=divergence, backend=backend)
    b = fastpeft.distillation_loss(z, u, None, 1.5, 1.0, divergence=divergence, backend=backend)
    assert torch.equal(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_rows_one_row_and_small_vocab(backend):
    """Rows with a row stride > V (a view of wider storage), non-contiguous along V, one row, V = 1."""
    z, u, labels = make((7,), vocab=V + 9)
    zs, us = z[:, :V], u[:, 3:V + 3]
    check(backend, zs, us, labels.clamp(max=V - 1), torch.float32, temperature=2.0, alpha=0.5)
    zt = z.t().contiguous().t()[:, :V]  # stride 7 along V
    assert zt.stride(-1) != 1
    check(backend, zt, u[:, :V], labels.clamp(max=V - 1), torch.float32, divergence="jsd")
    z1, u1, l1 = make((1,), ignore=())
    check(backend, z1[0], u1[0], l1[0], torch.float32, temperature=0.5, divergence="reverse_kl")
    z2, u2, l2 = make((4,), vocab=1, ignore=(2,))
    check(backend, z2, u2, l2, torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_interpreter_tile_loop(backend, monkeypatch):
    """A 1000-wide vocab in 64-wide tiles: many online-softmax rescalings per row."""
    monkeypatch.setattr(k, "INTERP_BLOCK_V", 64)
    z, u, labels = make((3,), vocab=1000, ignore=(1,))
    z[0, 900:] += 6.0  # the running maxima grow late in the row
    check(backend, z, u, labels, torch.float32, temperature=2.0, alpha=0.5, divergence="jsd", reductions=("sum",))
    check(backend, z, u, labels, torch.float32, temperature=1.0, alpha=0.7, divergence="reverse_kl",
          reductions=("none",))


# ---------------------------------------------------------------------------------------------
# -inf logits, ignored rows, empty inputs


def masked(where, seed=0):
    """Logits with -inf entries: "both" (the same entries in student and teacher, including a
    whole first tile), "student" or "teacher" only. Labels avoid the student's -inf entries."""
    z, u, labels = make((6,), seed=seed, ignore=(2,))
    g = torch.Generator().manual_seed(seed + 1)
    cols = torch.randperm(V, generator=g)[:40].to(DEVICE)
    if where == "both":
        cols = torch.cat([cols, torch.arange(0, 130, device=DEVICE)])
    for t in ((z, u) if where == "both" else (z,) if where == "student" else (u,)):
        t[:, cols] = float("-inf")
    if where != "teacher":
        ok = torch.ones(V, dtype=torch.bool, device=DEVICE)
        ok[cols] = False
        live = ok.nonzero().squeeze(1)
        labels = torch.where(labels == -100, labels, live[labels % live.numel()])
    return z, u, labels, cols


FINITE = [("both", d) for d in DIVERGENCES] + [("student", "reverse_kl"), ("student", "jsd"),
                                               ("teacher", "forward_kl"), ("teacher", "jsd")]


@pytest.mark.parametrize("where,divergence", FINITE, ids=lambda v: str(v))
@pytest.mark.parametrize("backend", BACKENDS)
def test_neg_inf_entries(backend, where, divergence):
    """Masked vocabulary entries: finite loss and gradient where the math is finite, equal to the
    reference; the gradient at the student's -inf entries is 0."""
    for dtype in (torch.float32, torch.float16):
        z, u, labels, cols = masked(where)
        z, u = z.to(dtype), u.to(dtype)
        check(backend, z, u, labels, dtype, temperature=2.0, alpha=0.5, divergence=divergence,
              reductions=("none",) if dtype == torch.float32 else ("mean",))
        zz = z.clone().requires_grad_()
        loss = fastpeft.distillation_loss(zz, u, labels, divergence=divergence, backend=backend)
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(zz.grad).all()
        if where != "teacher":
            assert (zz.grad[:, cols] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_neg_inf_infinite_divergence_is_inf_not_nan(backend):
    """forward_kl with entries -inf only in the student is +inf (as the math), not NaN; with
    alpha == 0 the KD term is not computed and the CE stays finite."""
    z, u, labels, _ = masked("student")
    loss = fastpeft.distillation_loss(z, u, labels, divergence="forward_kl", backend=backend)
    assert math.isinf(loss.item()) and loss.item() > 0
    loss = fastpeft.distillation_loss(z, u, labels, alpha=0.0, divergence="forward_kl", backend=backend)
    assert math.isfinite(loss.item())


@pytest.mark.parametrize("backend", BACKENDS)
def test_jsd_disjoint_supports_is_log_2(backend):
    """Student and teacher with disjoint supports (each -inf where the other is finite, and a row
    where they overlap in one entry): JSD is log 2 per row where disjoint (every entry counted),
    equal to the reference with its gradient, finite."""
    V = 40
    z = torch.randn(3, V, dtype=torch.float64).float()
    u = torch.randn(3, V, dtype=torch.float64).float()
    z[:, V // 2:] = float("-inf")
    u[:, :V // 2] = float("-inf")
    u[2, V // 2 - 1] = 0.5  # row 2: one shared entry
    zz = z.clone().requires_grad_()
    loss = fastpeft.distillation_loss(zz, u, None, temperature=1.0, alpha=1.0, divergence="jsd",
                                      reduction="none", backend=backend)
    zr = z.clone().requires_grad_()
    ref = rd.distillation_loss(zr, u, None, temperature=1.0, alpha=1.0, divergence="jsd", reduction="none")
    torch.testing.assert_close(loss[:2], torch.full((2,), math.log(2.0)), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(loss, ref, atol=1e-6, rtol=1e-5)
    loss.sum().backward()
    ref.sum().backward()
    assert torch.isfinite(zz.grad).all()
    torch.testing.assert_close(zz.grad, zr.grad, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_rows_ignored(backend):
    z, u, labels = make((2, 3), dtype=torch.float16)
    labels = torch.full_like(labels, -7)
    for reduction in ("mean", "sum", "none"):
        zz = z.clone().requires_grad_()
        out = fastpeft.distillation_loss(zz, u, labels, ignore_index=-7, reduction=reduction, backend=backend)
        assert (out == 0).all() and out.shape == (() if reduction != "none" else (2, 3))
        out.sum().backward()
        assert (zz.grad == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_rows(backend):
    z = torch.zeros(0, 7, device=DEVICE, requires_grad=True)
    u = torch.zeros(0, 7, device=DEVICE)
    labels = torch.zeros(0, dtype=torch.long, device=DEVICE)
    assert fastpeft.distillation_loss(z, u, labels, backend=backend).item() == 0.0
    out = fastpeft.distillation_loss(z, u, labels, reduction="none", backend=backend)
    assert out.shape == (0,)
    fastpeft.distillation_loss(z, u, labels, reduction="sum", backend=backend).backward()
    assert z.grad.shape == (0, 7)


def test_teacher_gets_no_gradient_and_int32_labels():
    z, u, labels = make((4,))
    uu = u.clone().requires_grad_()
    zz = z.clone().requires_grad_()
    out = fastpeft.distillation_loss(zz, uu, labels.to(torch.int32), backend="triton")
    out.backward()
    assert uu.grad is None and zz.grad is not None
    assert_close("int32 labels", out, reference(z, u, labels, torch.tensor(1.0))[0], torch.float32)


# ---------------------------------------------------------------------------------------------
# accuracy at any temperature: D is a sum of terms of order delta^2 (delta = log p - log q), not a
# difference of terms of order log V; float32 keeps a few ulps of D where T^2 multiplies it

TEMPERATURES = [1.0, 10.0, 1e2, 1e3, 1e4]


def check_kd_accuracy(backend, z, u, T, divergence, check_grad=True):
    """KD only (no labels: the row loss is T^2 D), per-row losses and a random grad_out, against
    the reference run in float64 on the same (rounded) logits. The loss is float32 whatever the
    logits' dtype: it gets float32's tolerance; the gradient comes in the logits' dtype."""
    go = grad_outputs("none", z.shape[:-1])
    kw = dict(temperature=T, divergence=divergence, reduction="none")
    out, gz = run(backend, z, u, None, go, **kw)
    ref, rgz = reference(z, u, None, go, **kw)
    assert_close(f"loss T={T:g}", out, ref, torch.float32)
    if check_grad:
        assert_close(f"grad T={T:g}", gz, rgz, z.dtype)


@pytest.mark.parametrize("T", TEMPERATURES, ids=lambda t: f"T{t:g}")
@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_accuracy_at_any_temperature(backend, divergence, T):
    """fp32 logits, V = 400: float32's tolerance at every temperature. (The log-softmax form lost
    ~eps log V / delta^2 relative: 2e-3 at T = 100, the loss ~10x off at T = 1e4.)"""
    z, u, _ = make((2,), vocab=400, seed=11, ignore=())
    check_kd_accuracy(backend, z, u, T, divergence)


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_accuracy_large_vocab_and_bf16(backend, divergence):
    """V = 2000 at T = 1e4; bf16 logits at T = 1e3 (the loss in float32's tolerance, the bf16
    gradient in bf16's)."""
    z, u, _ = make((2,), vocab=2000, seed=12, ignore=())
    check_kd_accuracy(backend, z, u, 1e4, divergence)
    z, u, _ = make((2,), torch.bfloat16, vocab=400, seed=13, ignore=())
    check_kd_accuracy(backend, z, u, 1e3, divergence)


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_accuracy_hard_logits(backend, divergence):
    """Logits that break the log-softmax form even at T = 1, or the naive fixes of it: a student
    nearly equal to the teacher; a teacher offset by 100 from the student (T = 1e3); finite
    masks (-1e4, where softmax underflows to 0); a 30x logit scale (most probabilities underflow,
    the log-ratios span far more than e^x can hold; its rows are saturated: their gradients, 1e-9
    to 1e-30, are below float32's resolution of the terms they cancel from, in any formulation)."""
    z, u, _ = make((2,), vocab=200, seed=14, ignore=())
    g = torch.Generator().manual_seed(15)
    near = z + 1e-3 * torch.randn(z.shape, generator=g).to(DEVICE)
    check_kd_accuracy(backend, z, near, 1.0, divergence)
    check_kd_accuracy(backend, z, u + 100.0, 1e3, divergence)
    zm, um = z.clone(), u.clone()
    zm[:, :20] = -1e4
    um[:, 40:60] = -1e4
    check_kd_accuracy(backend, zm, um, 2.0, divergence)
    check_kd_accuracy(backend, 30.0 * z, 30.0 * u, 1.0, divergence, check_grad=False)


def test_reference_series_helpers():
    """e^x - 1 - x and y - log1p(y) in float32 to a few ulps across the series' cut, against
    float64 (the expressions as written lose everything near 0)."""
    x = torch.cat([torch.linspace(-3, 3, 2001), torch.tensor([1e-6, -1e-6, 1e-3, 0.5, -0.5, 0.49, -0.51])])
    e2 = rd.expm1_minus_x(x).double()
    want = torch.expm1(x.double()) - x.double()
    nz = want != 0
    assert ((e2 - want).abs()[nz] / want[nz]).max() < 2e-6
    y = torch.cat([torch.linspace(-0.9, 3, 2001), torch.tensor([1e-6, -1e-6, 1.0, -0.5, 1.01, -0.51])])
    h = rd.y_minus_log1p(y).double()
    want = y.double() - torch.log1p(y.double())
    nz = want != 0
    assert ((h - want).abs()[nz] / want[nz]).max() < 2e-6
    assert (rd.expm1_minus_x(torch.tensor([float("-inf")])) == float("inf")).all()


# ---------------------------------------------------------------------------------------------
# the reference against other formulations


def test_reference_matches_kl_div_and_cross_entropy():
    """Hinton's loss as usually written: alpha T^2 kl_div(batchmean) + (1 - alpha) cross_entropy."""
    z, u, labels = make((9,), dtype=torch.float64, ignore=())
    T, alpha = 2.5, 0.4
    ours = rd.distillation_loss(z, u, labels, T, alpha)
    kl = F.kl_div(F.log_softmax(z / T, -1), F.log_softmax(u / T, -1), log_target=True, reduction="batchmean")
    theirs = alpha * T * T * kl + (1 - alpha) * F.cross_entropy(z, labels)
    assert torch.allclose(ours, theirs, rtol=1e-12)
    rev = rd.distillation_loss(z, u, None, T, divergence="reverse_kl")
    kl_rev = F.kl_div(F.log_softmax(u / T, -1), F.log_softmax(z / T, -1), log_target=True, reduction="batchmean")
    assert torch.allclose(rev, T * T * kl_rev, rtol=1e-12)


def test_reference_jsd_matches_probability_formula():
    z, u, _ = make((5,), dtype=torch.float64)
    T = 1.7
    p, q = F.softmax(u / T, -1), F.softmax(z / T, -1)
    m = (p + q) / 2
    jsd = 0.5 * (p * (p / m).log()).sum(-1) + 0.5 * (q * (q / m).log()).sum(-1)
    ours = rd.distillation_loss(z, u, None, T, divergence="jsd", reduction="none")
    assert torch.allclose(ours, T * T * jsd, rtol=1e-10)
    assert (ours <= T * T * math.log(2) + 1e-12).all()


def test_reference_gradient_matches_finite_differences():
    z, u, labels = make((3,), dtype=torch.float64, vocab=11, ignore=(1,))
    for div in DIVERGENCES:
        f = lambda zz: rd.distillation_loss(zz, u, labels, 1.3, 0.6, divergence=div)
        assert torch.autograd.gradcheck(f, (z.cpu().clone().requires_grad_(),), fast_mode=True)


# ---------------------------------------------------------------------------------------------
# errors


def test_errors():
    z, u, labels = make((3, 4))
    dl = fastpeft.distillation_loss
    with pytest.raises(ValueError, match="vocab mismatch"):
        dl(z, u[..., :-1], labels)
    with pytest.raises(ValueError, match="same shape"):
        dl(z, u[:2], labels)
    with pytest.raises(ValueError, match="labels must have shape"):
        dl(z, u, labels[:, :3])
    with pytest.raises(TypeError, match="integer"):
        dl(z, u, labels.float())
    with pytest.raises(TypeError, match="labels"):
        dl(z, u, [1, 2, 3])
    with pytest.raises(ValueError, match=r"labels must be in \[0, 300\)"):
        dl(z, u, labels.masked_fill(labels == -100, 300))
    with pytest.raises(ValueError, match="labels must be in"):
        dl(z, u, labels.masked_fill(labels == -100, -5))
    for bad in (0.0, -1.0):
        with pytest.raises(ValueError, match="temperature must be > 0"):
            dl(z, u, labels, temperature=bad)
    with pytest.raises(ValueError, match="temperature"):
        dl(z, u, labels, temperature=float("inf"))
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="alpha"):
            dl(z, u, labels, alpha=bad)
    with pytest.raises(ValueError, match="needs labels"):
        dl(z, u, None, alpha=0.0)
    with pytest.raises(ValueError, match="divergence"):
        dl(z, u, labels, divergence="kl")
    with pytest.raises(ValueError, match="reduction"):
        dl(z, u, labels, reduction="batchmean")
    with pytest.raises(TypeError, match="ignore_index"):
        dl(z, u, labels, ignore_index=-100.0)
    with pytest.raises(TypeError, match="dtype"):
        dl(z.double(), u.double(), labels)
    with pytest.raises(ValueError, match="empty"):
        dl(z[..., :0], u[..., :0], labels)
    with pytest.raises(ValueError, match="at least 1 dims"):
        dl(z[0, 0, 0], u[0, 0, 0])
    with pytest.raises(ValueError, match="one device"):
        dl(z, u.to("meta"), labels)
    with pytest.raises(ValueError, match="labels is on"):
        dl(z, u, labels.to("meta"))
    with pytest.raises(ValueError, match="backend"):
        dl(z, u, labels, backend="nope")
    loss_fn = fastpeft.FusedLinearDistillationLoss
    with pytest.raises(ValueError, match="reduction"):
        loss_fn(reduction="none")
    with pytest.raises(ValueError, match="chunk_size"):
        loss_fn(chunk_size=0)
    with pytest.raises(ValueError, match="temperature"):
        loss_fn(temperature=0)
    hs, ws, ht, wt, _, _, _ = make_linear(5)
    mod = loss_fn()
    with pytest.raises(ValueError, match="features"):
        mod(hs[:, :-1], ws, ht, wt)
    with pytest.raises(ValueError, match="vocab mismatch"):
        mod(hs, ws, ht, wt[:-1])
    with pytest.raises(ValueError, match="same rows"):
        mod(hs, ws, ht[:-1], wt)
    with pytest.raises(ValueError, match="student_bias"):
        mod(hs, ws, ht, wt, student_bias=torch.zeros(V - 1, device=DEVICE))
    with pytest.raises(TypeError, match="dtypes must match"):
        mod(hs, ws.half(), ht, wt)
    with pytest.raises(ValueError, match="labels must have shape"):
        mod(hs, ws, ht, wt, torch.zeros(4, dtype=torch.long, device=DEVICE))


# ---------------------------------------------------------------------------------------------
# the fused-linear loss


def make_linear(N, dtype=torch.float32, Hs=24, Ht=40, vocab=V, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s, scale=1.0: (torch.randn(*s, generator=g, dtype=torch.float64) * scale).to(dtype).to(DEVICE)
    hs, ht = r(N, Hs), r(N, Ht)
    ws, wt = r(vocab, Hs, scale=Hs ** -0.5 * 2), r(vocab, Ht, scale=Ht ** -0.5 * 2)
    bs, bt = r(vocab, scale=0.5), r(vocab, scale=0.5)
    labels = torch.randint(0, vocab, (N,), generator=g)
    labels[::4] = -100
    return hs, ws, ht, wt, bs, bt, labels.to(DEVICE)


def fused_reference(hs, ws, ht, wt, bs, bt, labels, grad_out, **kw):
    leaves = [t.detach().cpu().double().requires_grad_() for t in (hs, ws, bs)]
    out = rd.fused_linear_distillation_loss(leaves[0], leaves[1], ht.cpu().double(), wt.cpu().double(), labels.cpu(),
                                            leaves[2], bt.cpu().double(), **kw)
    return (out.detach(), *torch.autograd.grad(out, leaves, grad_out.cpu().double()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_linear_matches_unfused(backend, dtype):
    """Loss and the gradients of hidden, weight and bias; 13 rows in chunks of 5."""
    hs, ws, ht, wt, bs, bt, labels = make_linear(13, dtype)
    for reduction, divergence, T, alpha in (("mean", "forward_kl", 2.0, 0.5), ("sum", "jsd", 1.0, 0.8)):
        kw = dict(temperature=T, alpha=alpha, divergence=divergence, reduction=reduction)
        go = torch.tensor(1.0 if reduction == "mean" else 0.6, device=DEVICE)
        leaves = [t.clone().requires_grad_() for t in (hs, ws, bs)]
        mod = fastpeft.FusedLinearDistillationLoss(chunk_size=5, **kw)
        with fastpeft.use_backend(backend):
            out = mod(leaves[0], leaves[1], ht, wt, labels, leaves[2], bt)
        grads = torch.autograd.grad(out, leaves, go)
        ref = fused_reference(hs, ws, ht, wt, bs, bt, labels, go, **kw)
        assert out.dtype == torch.float32
        for name, a, b in zip(("loss", "d hidden", "d weight", "d bias"), (out, *grads), ref):
            assert_close(f"{name} ({reduction})", a, b, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_linear_frozen_head_no_bias_no_labels(backend):
    """Only the hidden states need a gradient (a LoRA student's frozen head); no biases; labels
    None; [2, 3, H] hidden states; the default chunk size."""
    hs, ws, ht, wt, _, _, _ = make_linear(6)
    h = hs.reshape(2, 3, -1).clone().requires_grad_()
    out = fastpeft.fused_linear_distillation_loss(h, ws, ht.reshape(2, 3, -1), wt, temperature=3.0,
                                                  divergence="reverse_kl", backend=backend)
    (gh,) = torch.autograd.grad(out, h)
    hh = hs.double().cpu().requires_grad_()
    ref = rd.fused_linear_distillation_loss(hh, ws.double().cpu(), ht.double().cpu(), wt.double().cpu(),
                                            temperature=3.0, divergence="reverse_kl")
    (rgh,) = torch.autograd.grad(ref, hh)
    assert_close("loss", out, ref, torch.float32)
    assert_close("d hidden", gh.reshape(6, -1), rgh, torch.float32)


def test_fused_linear_equals_distillation_loss_on_logits():
    """The fused-linear op and the logits op agree (triton, chunk 4 of 10 rows, all rows ignored
    in one chunk)."""
    hs, ws, ht, wt, bs, bt, labels = make_linear(10)
    labels[4:8] = -100
    a = fastpeft.fused_linear_distillation_loss(hs, ws, ht, wt, labels, bs, bt, chunk_size=4, backend="triton")
    b = fastpeft.distillation_loss(F.linear(hs, ws, bs), F.linear(ht, wt, bt), labels, backend="triton")
    assert rel_err(a, b) <= 1e-6
    labels[:] = -100
    h = hs.clone().requires_grad_()
    out = fastpeft.fused_linear_distillation_loss(h, ws, ht, wt, labels, chunk_size=4, backend="triton")
    out.backward()
    assert out.item() == 0.0 and (h.grad == 0).all()


# ---------------------------------------------------------------------------------------------
# the training helper and the example, on tiny Hugging Face models (torch backend, one thread)


@pytest.fixture
def one_thread():
    """The model-level tests here run on the torch path (tests/_hf.py); the kernel tests above
    do not, so this fixture is not autouse."""
    from _hf import torch_path  # imports transformers, which only these tests need
    with torch_path():
        yield


def _hf_models():
    transformers = pytest.importorskip("transformers")
    from _hf import tiny_llama

    def small():
        cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
        torch.manual_seed(1)
        return transformers.LlamaForCausalLM(cfg).float()

    return tiny_llama(), small


def _batches(n=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        mask = torch.ones(4, 12, dtype=torch.long)
        mask[0, 8:] = 0
        out.append({"input_ids": torch.randint(0, 128, (4, 12), generator=g), "attention_mask": mask})
    return out


def _students(teacher, small):
    lora = fastpeft.inject_lora(copy.deepcopy(teacher), "all-linear", r=4)
    int8 = fastpeft.inject_lora(fastpeft.quantize_int8(copy.deepcopy(teacher)), "all-linear", r=4)
    int4 = fastpeft.quantize_model(copy.deepcopy(teacher), "int4", group_size=None,
                                   skip=("lm_head", "q_proj", "v_proj"))
    int4 = fastpeft.inject_lora(int4, ["q_proj", "v_proj"], r=4)
    return {"smaller": small(), "lora": lora, "int8+lora": int8, "int4+lora": int4}


def test_distill_helper_student_kinds(one_thread):
    """A smaller model, a LoRA copy (self-distillation), int8 and int4 copies with LoRA: each
    trains (only its trainable parameters move) and its loss goes down, the teacher does not
    change. The teacher's head is scaled up so its distributions are peaked and the quantized
    copies start measurably away from it; they learn by pure KD (alpha = 1) with plain SGD,
    the smaller model and the LoRA copy with the default AdamW."""
    teacher, small = _hf_models()
    with torch.no_grad():
        teacher.lm_head.weight.mul_(30.0)
    before = {n: p.detach().clone() for n, p in teacher.named_parameters()}
    for name, student in _students(teacher, small).items():
        frozen = {n: p.detach().clone() for n, p in student.named_parameters() if not p.requires_grad}
        trained = {n: p.detach().clone() for n, p in student.named_parameters() if p.requires_grad}
        if name.startswith("int"):
            opt = torch.optim.SGD([p for p in student.parameters() if p.requires_grad], lr=0.01)
            hist = fastpeft.distill(student, teacher, _batches(1), opt, steps=8, alpha=1.0, progress=False)
        else:
            hist = fastpeft.distill(student, teacher, _batches(), steps=8, lr=1e-2, progress=False)
        assert len(hist) == 8 and all(math.isfinite(v) for v in hist), name
        assert hist[-1] < 0.8 * hist[0], (name, hist)
        assert all(torch.equal(p, frozen[n]) for n, p in student.named_parameters() if n in frozen), name
        assert any(not torch.equal(p, trained[n]) for n, p in student.named_parameters() if n in trained), name
    assert all(torch.equal(p, before[n]) for n, p in teacher.named_parameters())
    assert not teacher.training


def test_distill_helper_paths_agree(one_thread):
    """The fused-linear path equals the logits path; next-token labels skip padding; the triton
    kernel (interpreter) gives the torch backend's loss; tensor batches; errors."""
    from fastpeft.distillation import distillation_step_loss, shifted_labels
    teacher, small = _hf_models()
    student = small()
    inputs = _batches(1)[0]
    labels = shifted_labels(inputs)
    assert (labels[:, -1] == -100).all() and (labels[0, 7:] == -100).all()
    assert torch.equal(labels[1, :-1], inputs["input_ids"][1, 1:])
    a = distillation_step_loss(student, teacher, inputs, divergence="jsd")
    b = distillation_step_loss(student, teacher, inputs, divergence="jsd", fused_linear=True, chunk_size=5)
    assert rel_err(b, a) <= 1e-5
    with fastpeft.use_backend("triton"):
        c = distillation_step_loss(student, teacher, inputs, divergence="jsd")
    assert rel_err(c, a) <= 1e-5
    hist = fastpeft.distill(student, teacher, [inputs["input_ids"]] * 3, progress=False, fused_linear=True)
    assert len(hist) == 3
    with pytest.raises(ValueError, match="same module"):
        fastpeft.distill(student, student, [inputs])
    frozen = small().requires_grad_(False)
    with pytest.raises(ValueError, match="nothing to train"):
        fastpeft.distill(frozen, teacher, [inputs])
    with pytest.raises(TypeError, match="input_ids"):
        fastpeft.distill(student, teacher, [{"ids": inputs["input_ids"]}], progress=False)


def test_distill_helper_progress_line(one_thread, capsys, monkeypatch):
    """Without tqdm the helper prints a status line."""
    monkeypatch.setitem(sys.modules, "tqdm", None)
    teacher, small = _hf_models()
    fastpeft.distill(small(), teacher, _batches(), steps=3, progress=True)
    assert "distill step 3/3" in capsys.readouterr().out


def test_example_distills_teacher_into_smaller_student(one_thread):
    """examples/distill_llama.py, shortened: a 4-layer Llama teacher trained on generated text,
    a 2-layer student; the student's KL to the teacher on held-out text drops at least 5x."""
    pytest.importorskip("transformers")
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "examples"))
    try:
        import distill_llama
    finally:
        sys.path.pop(0)
    res = distill_llama.run(teacher_steps=40, steps=40, batch_size=16, seq_len=16, sentences=600, progress=False,
                            log=lambda *a: None)
    assert res["kl_after"] * 5 <= res["kl_before"], res


# ---------------------------------------------------------------------------------------------
# GPU: bf16, Llama-3's vocabulary


@pytest.mark.gpu
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_gpu_bf16_large_vocab(divergence):
    z, u, labels = make((48,), torch.bfloat16, vocab=128256)
    check("triton", z, u, labels, torch.bfloat16, temperature=2.0, alpha=0.5, divergence=divergence)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_gpu_large_vocab_other_dtypes(dtype):
    z, u, labels = make((16,), dtype, vocab=128256)
    check("triton", z, u, labels, dtype, temperature=1.0, alpha=0.3, divergence="jsd", factor=2.0)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_gpu_fused_linear_large_vocab(dtype):
    hs, ws, ht, wt, bs, bt, labels = make_linear(100, dtype, Hs=256, Ht=384, vocab=128256)
    leaves = [t.clone().requires_grad_() for t in (hs, ws, bs)]
    out = fastpeft.FusedLinearDistillationLoss(chunk_size=32)(leaves[0], leaves[1], ht, wt, labels, leaves[2], bt)
    grads = torch.autograd.grad(out, leaves)
    ref = fused_reference(hs, ws, ht, wt, bs, bt, labels, torch.tensor(1.0))
    for name, a, b in zip(("loss", "d hidden", "d weight", "d bias"), (out, *grads), ref):
        assert_close(name, a, b, dtype)
