"""The bottleneck adapter (Houlsby) as an autograd op: input checks, backend choice, the Function.

    y = x + scaling * (act(x W_d^T + b_d) W_u^T + b_u)

Numerics: fastpeft/reference/adapter.py. Forward keeps no activation: backward recomputes
h = x W_d^T + b_d from x (one [M, R] pass), so only x and the weights are saved.

Backends: ``triton`` (forward and backward kernels, bottleneck <= MAX_BOTTLENECK), ``cuda``
(forward only, ``fastpeft.ops._cext.adapter_forward`` where the extension has it; its backward
runs on triton when Triton can, else torch) and ``torch`` (the reference, by autograd).
"""
from __future__ import annotations

import contextlib

import torch

from .. import _backend, _checks
from ..reference import adapter as ref

OP = "adapter"
ACTIVATIONS = ref.ACTIVATIONS
# Preference on CUDA tensors; benchmarks/results records the measurement behind it.
PREFERRED_CUDA = ("triton", "cuda", "torch")
MAX_BOTTLENECK = 256  # kernels.adapter.MAX_BLOCK_R; auto sends wider bottlenecks to a backend that takes them


def supported() -> tuple[str, ...]:
    """The backends this op has: "cuda" only when the extension wrapper has adapter_forward."""
    from . import _cext
    return ("triton", "cuda", "torch") if hasattr(_cext, "adapter_forward") else ("triton", "torch")


def _on_device(t: torch.Tensor):
    """Kernels launch on the current CUDA device: make it the tensors' device."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _triton_can_run(device: torch.device, R: int) -> bool:
    return R <= MAX_BOTTLENECK and _backend.why_cannot_run("triton", device, ("triton",)) is None


def _cuda_forward(x, wd, bd, wu, bu, activation, scaling):
    from . import _cext
    c = lambda t: None if t is None else t.contiguous()
    return _cext.adapter_forward(x.contiguous(), c(wd), c(bd), c(wu), c(bu), activation, float(scaling))


class AdapterFunction(torch.autograd.Function):
    """The fused adapter on 2-D x with a kernel backend ('triton' or 'cuda' forward)."""

    @staticmethod
    def forward(ctx, x, down_weight, down_bias, up_weight, up_bias, activation, scaling, backend):
        with _on_device(x):
            if backend == "cuda":
                y = _cuda_forward(x, down_weight, down_bias, up_weight, up_bias, activation, scaling)
            else:
                from ..kernels import adapter as k
                y = k.adapter_fwd(x, down_weight, down_bias, up_weight, up_bias, activation, scaling)
        ctx.save_for_backward(x, down_weight, down_bias, up_weight)
        ctx.cfg = (activation, scaling, backend)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, wd, bd, wu = ctx.saved_tensors
        activation, scaling, backend = ctx.cfg
        need_x, need_wd, need_bd, need_wu, need_bu = ctx.needs_input_grad[:5]
        dy = dy if dy.stride(-1) == 1 else dy.contiguous()
        need_w = need_wd or need_bd or need_wu or need_bu
        if backend == "triton" or _triton_can_run(dy.device, wd.shape[0]):
            from ..kernels import adapter as k
            with _on_device(dy):
                dx, a, dh = k.adapter_bwd_rows(x, dy, wd, bd, wu, activation, scaling,
                                               need_dx=need_x, store_ah=need_w)
                dwd = dbd = dwu = dbu = None
                if need_w:
                    dwd, dbd, dwu, dbu = k.adapter_bwd_weights(x, dy, a, dh, scaling)
        else:  # cuda forward without Triton: the reference's recomputing backward
            dx, dwd, dbd, dwu, dbu = ref.adapter_backward(x, dy, wd, bd, wu, activation, scaling)
        cast = lambda g, p, need: g.to(p.dtype) if (need and g is not None) else None
        return (dx if need_x else None, cast(dwd, wd, need_wd), cast(dbd, wd, need_bd),
                cast(dwu, wu, need_wu), cast(dbu, wu, need_bu), None, None, None)


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
    _checks.same_dtype(x=x, down_weight=down_weight, down_bias=down_bias, up_weight=up_weight, up_bias=up_bias)
    return _checks.same_device(x=x, down_weight=down_weight, down_bias=down_bias, up_weight=up_weight,
                               up_bias=up_bias)


def _max_bottleneck(backend: str) -> int | None:
    """The widest bottleneck a kernel backend takes (None: no limit)."""
    if backend == "triton":
        return MAX_BOTTLENECK
    if backend == "cuda":
        from . import _cext
        return getattr(_cext, "ADAPTER_MAX_RANK", MAX_BOTTLENECK)
    return None


def _select(device: torch.device, R: int, explicit: str | None) -> str:
    sup = supported()
    too_narrow = [b for b in sup if (_max_bottleneck(b) or R) < R]
    forced = _backend.forced_backend(explicit)
    if forced in too_narrow:
        raise _backend.BackendUnavailableError(
            f"{OP}: backend {forced!r} was forced but cannot run: its kernels take a bottleneck of at "
            f"most {_max_bottleneck(forced)}, got {R}")
    sup = tuple(b for b in sup if b not in too_narrow)
    return _backend.select(OP, device, PREFERRED_CUDA, sup, explicit=explicit)


def adapter(x: torch.Tensor, down_weight: torch.Tensor, down_bias: torch.Tensor | None,
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
    """
    device = _validate(x, down_weight, down_bias, up_weight, up_bias, activation)
    scaling = _checks.finite_float("scaling", scaling)
    R, d = down_weight.shape
    name = _select(device, R, backend)
    x2 = x.reshape(-1, d)
    if x2.shape[0] == 0 or name == "torch":
        return ref.adapter(x, down_weight, down_bias, up_weight, up_bias, activation, scaling)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    y = AdapterFunction.apply(x2, down_weight, down_bias, up_weight, up_bias, activation, scaling, name)
    return y.reshape(x.shape)
