"""Reference bottleneck adapter (Houlsby): the specification every backend follows.

    y = x + s * (act(x W_d^T + b_d) W_u^T + b_u)

Shapes: x [..., d]; down_weight W_d [R, d]; down_bias b_d [R] or None; up_weight W_u [d, R];
up_bias b_u [d] or None; R is the bottleneck. Weights and biases have x's dtype (fp32, fp16
or bf16; float64 runs everything in float64, which is what the tests compare against).

Forward numerics, per row of the 2-D view x2 = x.reshape(-1, d):
  1. h = x W_d^T + b_d          products summed in fp32 (the inputs are exact in fp32), b_d
                                added in fp32
  2. a = act(h)                 evaluated in fp32, then ROUNDED TO x's DTYPE: a is the operand
                                of the second GEMM (a no-op for fp32 x)
  3. z = a W_u^T + b_u          fp32 accumulation, b_u added in fp32
  4. y = x + s * z              in fp32 (s = scaling, a Python float taken as fp32), rounded
                                once to x's dtype. Steps 3-4 run as one GEMM whose C operand
                                is x + s b_u: y = (x + s b_u) + s (a W_u^T), the same value up
                                to fp32 rounding order, with fewer passes over [M, d]
Activations (h in fp32):
  "relu"       max(h, 0)
  "gelu"       0.5 h (1 + erf(h / sqrt(2)))                               (exact, erf)
  "gelu_tanh"  0.5 h (1 + tanh(sqrt(2 / pi) (h + 0.044715 h^3)))           (tanh approximation)
  "silu"       h sigmoid(h)
Their derivatives (``activation_grad``): relu 1 where h > 0 else 0 (0 at h = 0, as torch);
gelu Phi(h) + h phi(h); gelu_tanh 0.5 (1 + t) + 0.5 h (1 - t^2) sqrt(2 / pi) (1 + 3 * 0.044715 h^2)
with t the tanh above; silu sg (1 + h (1 - sg)) with sg = sigmoid(h).

Backward (``bottleneck_adapter_backward``) stores no activation: it recomputes h and a from x, as in
steps 1-2, then with dy in x's dtype and fp32 accumulation everywhere:
  da   = s * (dy W_u)                    [M, R] fp32
  dh   = da * act'(h)                    [M, R] fp32
  dx   = dy + dh' W_d                    rounded to x's dtype;  dh' = dh rounded to x's dtype
  dW_u = s * dy^T a                      [d, R]   (a as rounded in step 2)
  db_u = s * sum_rows(dy)                [d]
  dW_d = dh'^T x                         [R, d]
  db_d = sum_rows(dh)                    [R]      (from the fp32 dh)
each weight/bias gradient rounded once to its parameter's dtype.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

ACTIVATIONS = ("relu", "gelu", "gelu_tanh", "silu")
GELU_TANH_K = math.sqrt(2.0 / math.pi)
GELU_TANH_C = 0.044715


def activation(h: torch.Tensor, name: str) -> torch.Tensor:
    """act(h) in h's dtype, for ``name`` in ACTIVATIONS."""
    if name == "relu":
        return torch.relu(h)
    if name == "gelu":
        return F.gelu(h)
    if name == "gelu_tanh":
        return F.gelu(h, approximate="tanh")
    if name == "silu":
        return F.silu(h)
    raise ValueError(f"unknown activation {name!r}; expected one of {ACTIVATIONS}")


def activation_grad(h: torch.Tensor, name: str) -> torch.Tensor:
    """d act / d h at h, in h's dtype (the formulas in the module docstring)."""
    if name == "relu":
        return (h > 0).to(h.dtype)
    if name == "gelu":
        cdf = 0.5 * (1.0 + torch.erf(h * (1.0 / math.sqrt(2.0))))
        pdf = torch.exp(-0.5 * h * h) * (1.0 / math.sqrt(2.0 * math.pi))
        return cdf + h * pdf
    if name == "gelu_tanh":
        t = torch.tanh(GELU_TANH_K * (h + GELU_TANH_C * h * h * h))
        return 0.5 * (1.0 + t) + 0.5 * h * (1.0 - t * t) * GELU_TANH_K * (1.0 + 3.0 * GELU_TANH_C * h * h)
    if name == "silu":
        sg = torch.sigmoid(h)
        return sg * (1.0 + h * (1.0 - sg))
    raise ValueError(f"unknown activation {name!r}; expected one of {ACTIVATIONS}")


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _as(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """``t.to(dtype)``, skipping the call where it would be a no-op (None stays None)."""
    return t if t is None or t.dtype == dtype else t.to(dtype)


def _hidden(x2, down_weight, down_bias, name):
    """(h in the accumulation dtype, a = act(h) rounded to x's dtype)."""
    acc = _acc_dtype(x2.dtype)
    h = F.linear(_as(x2, acc), _as(down_weight, acc), _as(down_bias, acc))
    return h, _as(activation(h, name), x2.dtype)


def residual_expand(xa: torch.Tensor, a: torch.Tensor, up_weight: torch.Tensor, up_bias: torch.Tensor | None,
                    scaling: float) -> torch.Tensor:
    """Steps 3-4 on 2-D operands already in the accumulation dtype: y = x + s (a W_u^T + b_u).

    Fewest passes over [M, d] (as fast as, or faster than, nn.Linear -> act -> nn.Linear -> * s
    -> + x, forward and backward): the bias and the residual ride in the GEMM's C operand
    (y = (x + s b_u) + s a W_u^T). scaling == 0 takes the explicit product, so that a
    non-finite z still gives NaN (a GEMM with alpha = 0 may skip its product)."""
    if scaling == 0.0:
        return xa + scaling * F.linear(a, up_weight, up_bias)
    if up_bias is None:
        return torch.addmm(xa, a, up_weight.t(), alpha=scaling)
    # into x + s b_u in place: a fresh tensor whose backward does not need it
    return torch.add(xa, up_bias, alpha=scaling).addmm_(a, up_weight.t(), alpha=scaling)


def bottleneck_adapter(x: torch.Tensor, down_weight: torch.Tensor, down_bias: torch.Tensor | None,
            up_weight: torch.Tensor, up_bias: torch.Tensor | None, activation: str = "relu",
            scaling: float = 1.0) -> torch.Tensor:
    """y = x + scaling * (act(x W_d^T + b_d) W_u^T + b_u), with the rounding of steps 1-4 above.

    Differentiable (torch autograd): the ``torch`` backend of ``fastpeft.bottleneck_adapter``.
    """
    x2 = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
    acc = _acc_dtype(x.dtype)
    _, a = _hidden(x2, down_weight, down_bias, activation)
    y = residual_expand(_as(x2, acc), _as(a, acc), _as(up_weight, acc), _as(up_bias, acc), scaling)
    y = _as(y, x.dtype)
    return y if x.dim() == 2 else y.reshape(x.shape)


def bottleneck_adapter_backward(x: torch.Tensor, dy: torch.Tensor, down_weight: torch.Tensor,
                     down_bias: torch.Tensor | None, up_weight: torch.Tensor, activation: str = "relu",
                     scaling: float = 1.0):
    """(dx, dW_d, db_d, dW_u, db_u) of ``bottleneck_adapter`` by the recomputing backward of the module
    docstring; x and dy [..., d]; db_d is returned even when down_bias is None (it is the
    gradient a bias would get), db_u likewise."""
    d = x.shape[-1]
    x2, dy2 = x.reshape(-1, d), dy.reshape(-1, d)
    acc = _acc_dtype(x.dtype)
    h, a = _hidden(x2, down_weight, down_bias, activation)
    dyf = dy2.to(acc)
    dh = scaling * (dyf @ up_weight.to(acc)) * activation_grad(h, activation)
    dh_op = dh.to(x.dtype).to(acc)
    dx = (dyf + dh_op @ down_weight.to(acc)).to(x.dtype).reshape(x.shape)
    dw_u = (scaling * (dyf.t() @ a.to(acc))).to(up_weight.dtype)
    db_u = (scaling * dyf.sum(0)).to(up_weight.dtype)
    dw_d = (dh_op.t() @ x2.to(acc)).to(down_weight.dtype)
    db_d = dh.sum(0).to(down_weight.dtype)
    return dx, dw_d, db_d, dw_u, db_u
