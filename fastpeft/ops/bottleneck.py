"""The bottleneck adapter (Houlsby) as an autograd op: input checks, backend choice, the Function.

    y = x + scaling * (act(x W_d^T + b_d) W_u^T + b_u)

Numerics: fastpeft/reference/bottleneck.py. Forward keeps no activation: backward recomputes
h = x W_d^T + b_d from x (one [M, R] pass), so only x and the weights are saved.

Backends: ``triton`` (forward and backward kernels, bottleneck <= MAX_BOTTLENECK), ``cuda``
(forward only, ``fastpeft.ops._cext.bottleneck_adapter_forward``; its backward runs on triton when Triton
can, else torch) and ``torch`` (the reference and its recomputing backward).

Registered ops (fastpeft/ops/_library.py): ``fastpeft::bottleneck_adapter`` (autograd and an
autocast rule) and ``fastpeft::bottleneck_adapter_backward``. No host sync.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .. import _backend, _checks
from ..reference import bottleneck as ref
from ._common import building_graph, on_device, rows, vjp_with_graph
from ._library import _NUMBERS, _PLAIN, below_autograd, call, define, eager, needs_grad, register_autograd, still_eager

OP = "bottleneck_adapter"
ACTIVATIONS = ref.ACTIVATIONS
KERNELS = ("triton", "cuda", "torch")  # in the order preferred on CUDA tensors
MAX_BOTTLENECK = 256  # kernels.bottleneck.MAX_BLOCK_R; auto sends wider bottlenecks to a backend that takes them


def _max_bottleneck(backend: str) -> int | None:
    """The widest bottleneck a kernel backend takes (None: no limit)."""
    if backend == "triton":
        return MAX_BOTTLENECK
    if backend == "cuda":
        from . import _cext
        return getattr(_cext, "BOTTLENECK_MAX_RANK", MAX_BOTTLENECK)
    return None


def _choose(device: torch.device, R: int, explicit: str | None) -> str:
    too_narrow = [b for b in KERNELS if (_max_bottleneck(b) or R) < R]
    forced = _backend.forced_backend(explicit)
    if forced in too_narrow:
        raise _backend.BackendUnavailableError(
            f"{OP}: backend {forced!r} was forced but cannot run: its kernels take a bottleneck of at "
            f"most {_max_bottleneck(forced)}, got {R}")
    return _backend.choose(OP, device, tuple(b for b in KERNELS if b not in too_narrow), explicit)


def _triton_can_run(device: torch.device, R: int) -> bool:
    return R <= MAX_BOTTLENECK and _backend.why_cannot_run("triton", device, ("triton",)) is None


def _forward_kernel(x, down_weight, down_bias, up_weight, up_bias, activation, scaling, backend):
    name = _choose(x.device, down_weight.shape[0], backend)
    x2 = rows(x)
    if x2.shape[0] == 0 or name == "torch":
        return ref.bottleneck_adapter(x, down_weight, down_bias, up_weight, up_bias, activation, scaling).contiguous()
    with on_device(x2):
        if name == "cuda":
            from . import _cext
            c = lambda t: None if t is None else t.contiguous()
            y = _cext.bottleneck_adapter_forward(x2.contiguous(), c(down_weight), c(down_bias), c(up_weight), c(up_bias),
                                      activation, float(scaling))
        else:
            from ..kernels import bottleneck as k
            y = k.bottleneck_fwd(x2, down_weight, down_bias, up_weight, up_bias, activation, scaling)
    return y.reshape(x.shape)


def _backward_kernel(x, dy, down_weight, down_bias, up_weight, activation, scaling, need_x, need_weights,
                     backend):
    """(dx or an empty placeholder, dW_d, db_d, dW_u, db_u or empty placeholders), in the dtypes of
    x and of the weights. The cuda backend has no backward kernel: triton runs it where it can."""
    R = down_weight.shape[0]
    name = _choose(x.device, R, backend)
    x2, dy2 = rows(x), rows(dy)
    if name == "triton" or (name == "cuda" and _triton_can_run(x.device, R)):
        from ..kernels import bottleneck as k
        with on_device(x2):
            dx, a, dh = k.bottleneck_bwd_rows(x2, dy2, down_weight, down_bias, up_weight, activation, scaling,
                                           need_dx=need_x, store_ah=need_weights)
            grads = k.bottleneck_bwd_weights(x2, dy2, a, dh, scaling) if need_weights else None
    else:
        dx, *grads = ref.bottleneck_adapter_backward(x2, dy2, down_weight, down_bias, up_weight, activation, scaling)
    dx = dx.reshape(x.shape) if need_x else x.new_empty(0)
    if not need_weights:
        return (dx, *(t.new_empty(0) for t in (down_weight, down_weight, up_weight, up_weight)))
    dwd, dbd, dwu, dbu = grads
    return (dx, dwd.to(down_weight.dtype), dbd.to(down_weight.dtype), dwu.to(up_weight.dtype),
            dbu.to(up_weight.dtype))


def _backward_fake(x, dy, down_weight, down_bias, up_weight, activation, scaling, need_x, need_weights, backend):
    R, D = down_weight.shape
    dx = x.new_empty(x.shape if need_x else (0,))
    if not need_weights:
        return (dx, *(t.new_empty(0) for t in (down_weight, down_weight, up_weight, up_weight)))
    return dx, down_weight.new_empty((R, D)), down_weight.new_empty((R,)), up_weight.new_empty((D, R)), \
        up_weight.new_empty((D,))


bottleneck_adapter_op = define(
    "bottleneck_adapter(Tensor x, Tensor down_weight, Tensor? down_bias, Tensor up_weight, Tensor? up_bias, "
    "str activation, float scaling, str? backend) -> Tensor", _forward_kernel,
    lambda x, *rest: torch.empty_like(x, memory_format=torch.contiguous_format), autocast=(0, 1, 2, 3, 4))
bottleneck_adapter_backward_op = define(
    "bottleneck_adapter_backward(Tensor x, Tensor dy, Tensor down_weight, Tensor? down_bias, Tensor up_weight, "
    "str activation, float scaling, bool need_x, bool need_weights, str? backend) "
    "-> (Tensor, Tensor, Tensor, Tensor, Tensor)", _backward_kernel, _backward_fake)


class BottleneckAdapterFunction(torch.autograd.Function):
    """Autograd of fastpeft::bottleneck_adapter: forward keeps only x and the weights; backward
    recomputes h = x W_d^T + b_d."""

    @staticmethod
    def forward(ctx, x, down_weight, down_bias, up_weight, up_bias, activation, scaling, backend, direct=False):
        """``direct``: an eager call on plain tensors: the kernels run without the dispatcher."""
        with below_autograd():
            y = call(bottleneck_adapter_op, direct, x, down_weight, down_bias, up_weight, up_bias, activation,
                     scaling, backend)
        ctx.save_for_backward(x, down_weight, down_bias, up_weight, up_bias)
        ctx.cfg = (activation, scaling, backend, direct)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, wd, bd, wu, bu = ctx.saved_tensors
        activation, scaling, backend, direct = ctx.cfg
        need_x, need_wd, need_bd, need_wu, need_bu = ctx.needs_input_grad[:5]
        if building_graph():  # create_graph: the reference's gradients, recorded
            grads = vjp_with_graph(lambda *t: ref.bottleneck_adapter(*t, activation, scaling), (x, wd, bd, wu, bu),
                                   ctx.needs_input_grad[:5], dy)
            return (*grads, None, None, None, None)
        need_w = need_wd or need_bd or need_wu or need_bu
        with below_autograd():
            dx, dwd, dbd, dwu, dbu = call(bottleneck_adapter_backward_op, direct and still_eager(), x, dy, wd, bd, wu,
                                          activation, scaling, need_x, need_w, backend)
        keep = lambda g, need: g if need else None
        return (keep(dx, need_x), keep(dwd, need_wd), keep(dbd, need_bd), keep(dwu, need_wu), keep(dbu, need_bu),
                None, None, None, None)


register_autograd(bottleneck_adapter_op, BottleneckAdapterFunction)


def _validate(x, down_weight, down_bias, up_weight, up_bias, activation):
    _checks.tensor("x", x, min_ndim=1, dtypes=_checks.FLOAT_DTYPES)
    _checks.tensor("down_weight", down_weight, ndim=2, dtypes=_checks.FLOAT_DTYPES)
    _checks.tensor("up_weight", up_weight, ndim=2, dtypes=_checks.FLOAT_DTYPES)
    if down_bias is not None:
        _checks.tensor("down_bias", down_bias, ndim=1, dtypes=_checks.FLOAT_DTYPES)
    if up_bias is not None:
        _checks.tensor("up_bias", up_bias, ndim=1, dtypes=_checks.FLOAT_DTYPES)
    if not isinstance(activation, str):
        raise TypeError(f"activation must be a str (one of {ACTIVATIONS}), got {type(activation).__name__}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; expected one of {ACTIVATIONS}")
    d = x.shape[-1]
    R = down_weight.shape[0]
    if d == 0:
        raise ValueError(f"d_model must be > 0: x has shape {tuple(x.shape)}")
    if R == 0:
        raise ValueError(f"bottleneck must be > 0: down_weight has shape {tuple(down_weight.shape)}")
    if down_weight.shape[1] != d:
        raise ValueError(f"down_weight shape {tuple(down_weight.shape)} must be [bottleneck, {d}] "
                         f"(x has {d} features, shape {tuple(x.shape)})")
    if tuple(up_weight.shape) != (d, R):
        raise ValueError(f"up_weight shape {tuple(up_weight.shape)} must be [{d}, {R}] ([d_model, bottleneck] "
                         f"for down_weight {tuple(down_weight.shape)})")
    if down_bias is not None and down_bias.shape[0] != R:
        raise ValueError(f"down_bias shape {tuple(down_bias.shape)} must be [{R}] (the bottleneck)")
    if up_bias is not None and up_bias.shape[0] != d:
        raise ValueError(f"up_bias shape {tuple(up_bias.shape)} must be [{d}] (d_model)")
    device = _checks.same_device(x=x, down_weight=down_weight, down_bias=down_bias, up_weight=up_weight,
                                 up_bias=up_bias)
    if not torch.is_autocast_enabled(device.type):  # under autocast the op casts them all
        _checks.same_dtype(x=x, down_weight=down_weight, down_bias=down_bias, up_weight=up_weight,
                           up_bias=up_bias)
    return device


class TorchBottleneckFunction(torch.autograd.Function):
    """The torch backend of an eager fp32 call that needs gradients: the reference's forward, and
    its backward by the formulas of fastpeft/reference/bottleneck.py with a = act(h) (and h, for
    activations other than relu) kept from the forward instead of recomputed: the [M, bottleneck]
    activations torch's autograd keeps for the reference too. Against autograd through the
    reference it saves the passes over [M, d] that autograd adds: s * dy for db_u, and the sum of
    x's two gradient terms (dx = dy + dh W_d is one GEMM here, dy its C operand)."""

    @staticmethod
    def forward(ctx, x, down_weight, down_bias, up_weight, up_bias, activation, scaling):
        x2 = x.reshape(-1, x.shape[-1])
        h = F.linear(x2, down_weight, down_bias)  # fp32 throughout: the reference's steps 1-4
        a = ref.activation(h, activation)
        y = ref.residual_expand(x2, a, up_weight, up_bias, scaling)
        ctx.save_for_backward(x, x2, down_weight, down_bias, up_weight, up_bias, a,
                              None if activation == "relu" else h)  # relu' is (a > 0)
        ctx.cfg = (activation, scaling)
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy):
        x, x2, wd, bd, wu, bu, a, h = ctx.saved_tensors
        activation, s = ctx.cfg
        need_x, need_wd, need_bd, need_wu, need_bu = ctx.needs_input_grad[:5]
        if building_graph():  # create_graph: the reference's gradients, recorded
            grads = vjp_with_graph(lambda *t: ref.bottleneck_adapter(*t, activation, s), (x, wd, bd, wu, bu),
                                   ctx.needs_input_grad[:5], dy)
            return (*grads, None, None)
        dy2 = dy.reshape(x2.shape)
        dx = dwd = dbd = dwu = dbu = dh = None
        if need_x or need_wd or need_bd:  # dh = s (dy W_u) act'(h), in the reference's order
            dh = torch.mm(dy2, wu).mul_(s).mul_(a > 0 if h is None else ref.activation_grad(h, activation))
        if need_x:
            dx = torch.addmm(dy2, dh, wd).view(x.shape)
        if need_wd:
            dwd = torch.mm(dh.t(), x2)
        if need_bd and bd is not None:
            dbd = dh.sum(0)
        if need_wu:
            dwu = torch.mm(dy2.t(), a).mul_(s)
        if need_bu and bu is not None:
            dbu = dy2.sum(0).mul_(s)
        return dx, dwd, dbd, dwu, dbu, None, None


def _fast_path(x, down_weight, down_bias, up_weight, up_bias, activation, scaling, backend) -> bool:
    """Whether ``bottleneck_adapter`` can take its per-call fast path: plain tensors (no subclass),
    every check of ``_validate`` passing with one dtype throughout (no autocast), ``scaling`` a
    finite number, the call eager (``fastpeft.ops._library.eager``) on the torch backend. The
    general path's checks in one expression; an input that fails one takes the general path,
    which refuses it with its message."""
    if not (type(x) in _PLAIN and type(down_weight) in _PLAIN and type(up_weight) in _PLAIN
            and (down_bias is None or type(down_bias) in _PLAIN) and (up_bias is None or type(up_bias) in _PLAIN)
            and type(scaling) in _NUMBERS and type(activation) is str and activation in ACTIVATIONS
            and (backend is None or backend == "torch") and down_weight.dim() == 2 and x.dim() >= 1):
        return False
    R, d = down_weight.shape
    dt, device = x.dtype, x.device
    return (R > 0 and d > 0 and x.shape[-1] == d and up_weight.shape == (d, R) and dt in _checks.FLOAT_DTYPES
            and down_weight.dtype == dt and up_weight.dtype == dt and down_weight.device == device
            and up_weight.device == device
            and (down_bias is None or (down_bias.shape == (R,) and down_bias.dtype == dt
                                       and down_bias.device == device))
            and (up_bias is None or (up_bias.shape == (d,) and up_bias.dtype == dt and up_bias.device == device))
            and math.isfinite(scaling) and eager(device.type) and _backend.torch_chosen(device, backend))


# TorchBottleneckFunction from this many elements of x on: below it the Function's own per-call
# cost (apply, ctx, a Python backward) outweighs the passes it saves (measured on the CPU)
FUNCTION_MIN_NUMEL = 1 << 16


def _torch_eager(x, down_weight, down_bias, up_weight, up_bias, activation, scaling):
    """The torch backend of an eager call: TorchBottleneckFunction for large enough fp32 inputs that
    need gradients, else the reference, differentiated by torch's autograd where it must be (its
    16-bit numerics convert to fp32 and back; autograd follows the conversions)."""
    if (x.dtype == torch.float32 and x.numel() >= FUNCTION_MIN_NUMEL
            and needs_grad(x, down_weight, down_bias, up_weight, up_bias)):
        return TorchBottleneckFunction.apply(x, down_weight, down_bias, up_weight, up_bias, activation, scaling)
    return ref.bottleneck_adapter(x, down_weight, down_bias, up_weight, up_bias, activation, scaling)


def bottleneck_adapter(x: torch.Tensor, down_weight: torch.Tensor, down_bias: torch.Tensor | None,
            up_weight: torch.Tensor, up_bias: torch.Tensor | None, activation: str = "relu",
            scaling: float = 1.0, *, backend: str | None = None) -> torch.Tensor:
    """Fused bottleneck adapter: y = x + scaling * (act(x W_d^T + b_d) W_u^T + b_u).

    x: [..., d_model] (any leading dims, any strides); down_weight: [bottleneck, d_model];
    down_bias: [bottleneck] or None; up_weight: [d_model, bottleneck]; up_bias: [d_model] or
    None; all in x's dtype (fp32, fp16, bf16), on x's device. ``activation``: "relu", "gelu"
    (erf), "gelu_tanh" or "silu". Output in x's dtype and shape. One pass over each tile of
    rows: x is read and y written once, the bottleneck activations stay on chip; backward
    recomputes them. Gradients for x, both weights and both biases. 0 rows give an empty
    output. ``backend`` forces 'triton' | 'cuda' | 'torch' (see fastpeft._backend); the triton
    kernels take a bottleneck of at most MAX_BOTTLENECK (256), above it auto uses cuda or torch.
    Under ``torch.autocast`` x and the weights are cast to the autocast dtype first.

    Runs as the registered op ``torch.ops.fastpeft.bottleneck_adapter``; no host sync.
    """
    if _fast_path(x, down_weight, down_bias, up_weight, up_bias, activation, scaling, backend):
        return _torch_eager(x, down_weight, down_bias, up_weight, up_bias, activation, float(scaling))
    device = _validate(x, down_weight, down_bias, up_weight, up_bias, activation)
    scaling = _checks.finite_float("scaling", scaling)
    if backend is not None:
        _backend.check_name(backend)
    args = (x, down_weight, down_bias, up_weight, up_bias, activation, scaling, backend)
    if eager(device.type, x, down_weight, down_bias, up_weight, up_bias):  # no dispatcher round trips
        if _choose(device, down_weight.shape[0], backend) == "torch":
            return _torch_eager(x, down_weight, down_bias, up_weight, up_bias, activation, scaling)
        if needs_grad(x, down_weight, down_bias, up_weight, up_bias):
            return BottleneckAdapterFunction.apply(*args, True)
        return _forward_kernel(*args)
    return bottleneck_adapter_op(*args)
