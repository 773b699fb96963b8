"""Reference LLM.int8() (Dettmers et al. 2022): the specification the int8 kernels follow.

Vector-wise quantization of a 2-D x [M, K] with outlier threshold t (bitsandbytes'
``int8_vectorwise_quant`` semantics):

    outlier(i, k)   = t > 0 and |x[i, k]| >= t
    outlier_cols    = sorted {k : outlier(i, k) for some i}      (None when t == 0)
    row_scale[i]    = max_k |x[i, k]| over the entries that are not outliers   (float32)
    q[i, k]         = round(x[i, k] * 127 / row_scale[i])  as int8  (0 where row_scale is 0)
                      in float32 as round((x * L) * (127 / (row_scale * L))), L = 1, or LIFT for
                      the rows too small for 127 / row_scale to be finite (see LIFT_BELOW)
    q[:, outlier_cols] = 0

and the int8 linear layer, with the weight quantized per output row with t = 0
(w_int8, w_scale = quantize_weight(W)):

    y = (q @ w_int8^T) * row_scale[:, None] * w_scale[None, :] / 127**2     (int32 GEMM)
      + x[:, outlier_cols] @ (w_int8[:, outlier_cols] * w_scale[:, None] / 127)^T
      + bias,                                     cast to x's dtype.

Rounding is half-to-even (torch.round). A NaN or inf in x only affects its own row.
"""
from __future__ import annotations

import torch

INT8_MAX = 127.0
# 127 / row_scale overflows float32 when row_scale < 127 / FLT_MAX (about 3.7e-37; subnormal rows
# included), and every nonzero code would be +-127. Rows whose scale is below LIFT_BELOW are first
# multiplied by LIFT, an exact power of two (it neither overflows nor rounds such small values),
# which leaves each quotient x / row_scale as it is. Other rows are computed as before (L = 1).
LIFT_BELOW = 2.0**-64
LIFT = 2.0**64


def outlier_mask(x: torch.Tensor, threshold: float) -> torch.Tensor | None:
    """Boolean [M, K] of the outlier entries, or None when threshold == 0."""
    return (x.abs() >= threshold) if threshold > 0 else None


def int8_vectorwise_quant(x: torch.Tensor, threshold: float = 0.0):
    """(q int8 [M, K], row_scale float32 [M], outlier_cols int64 sorted or None) of 2-D x."""
    xf = x.float()
    out = outlier_mask(xf, threshold)
    kept = xf if out is None else xf.masked_fill(out, 0.0)
    row_scale = kept.abs().amax(dim=1) if x.shape[1] else torch.zeros(x.shape[0], device=x.device)
    q = row_codes(kept, row_scale)
    cols = None
    if out is not None:
        cols = torch.nonzero(out.any(dim=0)).flatten()
        q[:, cols] = 0
    return q, row_scale.float(), cols


def row_codes(x: torch.Tensor, row_scale: torch.Tensor) -> torch.Tensor:
    """int8 codes round(x[i, k] * 127 / row_scale[i]) of float32 x [M, K], clamped to [-127, 127],
    as the kernels compute them (rows below LIFT_BELOW lifted); 0 where the scale is 0 or NaN and
    for NaN entries (+-inf entries clamp to +-127)."""
    lift = torch.where(row_scale < LIFT_BELOW, LIFT, 1.0)
    inv = torch.where(row_scale > 0, INT8_MAX / (row_scale * lift), torch.zeros_like(row_scale))
    q = torch.round((x * lift[:, None]) * inv[:, None]).clamp_(-INT8_MAX, INT8_MAX)
    return torch.nan_to_num(q, nan=0.0).to(torch.int8)


def quantize_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row-wise absmax int8 codes and float32 scales of a [out, in] weight (threshold 0)."""
    q, scale, _ = int8_vectorwise_quant(weight, 0.0)
    return q, scale


def dequantize_weight(weight_int8: torch.Tensor, weight_scale: torch.Tensor) -> torch.Tensor:
    """float32 W ~= w_int8 * w_scale / 127 (per output row)."""
    return weight_int8.float() * (weight_scale.float()[:, None] / INT8_MAX)


def int8_linear(x: torch.Tensor, weight_int8: torch.Tensor, weight_scale: torch.Tensor,
                bias: torch.Tensor | None = None, threshold: float = 0.0) -> torch.Tensor:
    """The int8 linear layer above on x [..., in], computed exactly (int64 GEMM, float64 scaling)."""
    lead = x.shape[:-1]
    x2 = x.reshape(lead.numel(), x.shape[-1])  # (-1 is ambiguous when x is empty)
    q, row_scale, cols = int8_vectorwise_quant(x2, threshold)
    acc = (q.long() @ weight_int8.long().t()).double()
    y = acc * (row_scale.double()[:, None] * weight_scale.double()[None, :]) / INT8_MAX**2
    if cols is not None and cols.numel():
        w_cols = weight_int8[:, cols].double() * (weight_scale.double()[:, None] / INT8_MAX)
        y = y + x2[:, cols].double() @ w_cols.t()
    if bias is not None:
        y = y + bias.double()
    return y.to(x.dtype).reshape(*lead, weight_int8.shape[0])
