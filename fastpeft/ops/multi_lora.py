"""Many LoRA adapters in one batch (inference): input checks, backend and regime choice.

    y[i] = out[i] + s_a * (x[i] A_a[:r_a]^T) B_a[:, :r_a]^T,    a = indices[i]

Numerics: fastpeft/reference/multi_lora.py. Backends: ``triton`` (kernels/multi_lora.py),
``cuda`` (``fastpeft.ops._cext.multi_lora_shrink`` / ``multi_lora_expand``) and ``torch`` (the
reference). Registered ops (fastpeft/ops/_library.py), inference only (no autograd):
  fastpeft::multi_lora       the update alone, a new tensor
  fastpeft::multi_lora_add_  the update added into ``out`` in place (mutates ``out``)
Nothing reads a tensor value on the host on a device: the optional value check of the indices
and ranks runs on the device (fastpeft._checks.check_values: on CUDA a device-side assertion),
so the op can be captured in a CUDA graph and replayed with new indices, ranks and scalings.
The one exception is the torch backend on CPU tensors (device types in HOST_GROUPED), where
host memory makes a read free: it groups the rows by adapter (reading the per-adapter row
counts and the ranks) and runs one shrink and one expand per adapter present (per window of
its rows, so that no temporary is whole-batch sized), as PEFT's mixed batch does
(reference.multi_lora.add_grouped_), instead of the per-row gathers of
reference.multi_lora.multi_lora_delta that it runs, sync-free, on any other device.
"""
from __future__ import annotations

import torch

from .. import _backend, _checks
from ..reference import multi_lora as ref
from ._common import on_device
from ._library import define, eager

OP = "multi_lora"
KERNELS = ("triton", "cuda", "torch")  # in the order preferred on CUDA tensors
INT_DTYPES = (torch.int32, torch.int64)
# Regime choice (shapes only, never values). Per-row programs (decode, BGMV) give every row
# its own program and read each row's adapter on its own: best while rows are few, since the
# adapter reads it repeats (T * r * (in + out) elements, served from L2 when rows share an
# adapter) stay small and there is no sort to pay. Tiles of rows grouped by adapter (prefill,
# SGMV) read each adapter once per tile, but pay a device sort and, where a tile holds several
# adapters, one serial pass per adapter: worth it once rows outnumber the adapters that can
# be in the batch. So: decode up to DECODE_MAX_ROWS rows, and up to DECODE_MAX_MIXED_ROWS rows
# while T < ROWS_PER_ADAPTER * n (the stack's adapters could each hold only a few rows, so
# sorted tiles would mostly mix adapters); prefill otherwise.
DECODE_MAX_ROWS = 128
DECODE_MAX_MIXED_ROWS = 1024
ROWS_PER_ADAPTER = 4
# Device types on which the torch backend groups rows by adapter on the host (a read of the
# indices and ranks: free in host memory, a sync anywhere else). Elsewhere it gathers per row.
HOST_GROUPED = ("cpu",)


def regime(T: int, n: int) -> str:
    """"decode" (per-row programs) or "prefill" (adapter-sorted row tiles), from shapes only."""
    if T <= DECODE_MAX_ROWS or (T <= DECODE_MAX_MIXED_ROWS and T < ROWS_PER_ADAPTER * n):
        return "decode"
    return "prefill"


def _validate(x, lora_A, lora_B, ranks, scalings, indices, out) -> torch.device:
    _checks.tensor("x", x, min_ndim=1, dtypes=_checks.FLOAT_DTYPES)
    _checks.tensor("lora_A", lora_A, ndim=3, dtypes=_checks.FLOAT_DTYPES)
    _checks.tensor("lora_B", lora_B, ndim=3, dtypes=_checks.FLOAT_DTYPES)
    _checks.tensor("ranks", ranks, ndim=1, dtypes=INT_DTYPES)
    _checks.tensor("scalings", scalings, ndim=1, dtypes=_checks.FLOAT_DTYPES + (torch.float64,))
    _checks.tensor("indices", indices, dtypes=INT_DTYPES)
    n, r_max, K = lora_A.shape
    if n == 0 or r_max == 0:
        raise ValueError(f"lora_A {tuple(lora_A.shape)} must be [n, r_max, in] with n >= 1 adapters and "
                         f"r_max >= 1")
    if x.shape[-1] != K:
        raise ValueError(f"x has {x.shape[-1]} features (shape {tuple(x.shape)}) but lora_A "
                         f"{tuple(lora_A.shape)} expects {K} ([n, r_max, in])")
    if lora_B.shape[0] != n or lora_B.shape[2] != r_max:
        raise ValueError(f"lora_B shape {tuple(lora_B.shape)} must be [{n}, out, {r_max}] ([n, out, r_max], "
                         f"lora_A is {tuple(lora_A.shape)})")
    if ranks.shape[0] != n or scalings.shape[0] != n:
        raise ValueError(f"ranks {tuple(ranks.shape)} and scalings {tuple(scalings.shape)} must both be "
                         f"[{n}] (one per adapter of lora_A {tuple(lora_A.shape)})")
    T = torch.Size(x.shape[:-1]).numel()
    if tuple(indices.shape) not in ((T,), tuple(x.shape[:-1])):
        raise ValueError(f"indices shape {tuple(indices.shape)} must be [{T}] (one per row of x "
                         f"{tuple(x.shape)}) or x's leading dims {tuple(x.shape[:-1])}")
    _checks.same_dtype(x=x, lora_A=lora_A, lora_B=lora_B)
    if out is not None:
        _checks.tensor("out", out, dtypes=(x.dtype,))
        want = (*x.shape[:-1], lora_B.shape[1])
        if tuple(out.shape) != want:
            raise ValueError(f"out shape {tuple(out.shape)} must be {want} (x's leading dims, out features "
                             f"of lora_B {tuple(lora_B.shape)})")
        if any(st == 0 and sz > 1 for st, sz in zip(out.stride(), out.shape)):
            raise ValueError(f"out (shape {tuple(out.shape)}, strides {out.stride()}) has elements sharing "
                             f"memory (a stride of 0): it cannot be written in place")
    device = _checks.same_device(x=x, lora_A=lora_A, lora_B=lora_B, ranks=ranks, scalings=scalings,
                                 indices=indices, out=out)
    if torch.is_grad_enabled():
        needs = [k for k, t in (("x", x), ("lora_A", lora_A), ("lora_B", lora_B), ("scalings", scalings),
                                ("out", out)) if t is not None and t.requires_grad]
        if needs:
            raise RuntimeError(f"multi-adapter batches are inference-only: {', '.join(needs)} requires grad "
                               f"with grad mode on; run under torch.no_grad() or torch.inference_mode() "
                               f"(train adapters with fastpeft.lora_linear / LoRALinear)")
    return device


def _check_values(ranks: torch.Tensor, indices: torch.Tensor, n: int, r_max: int) -> None:
    """Index values in [-1, n) and ranks in [1, r_max], on the device (no host sync on CUDA)."""
    bad_idx = (indices < -1) | (indices >= n)
    bad_rank = (ranks < 1) | (ranks > r_max)

    def index_message():
        pos = int(bad_idx.nonzero()[0, 0])
        return (f"indices must be in [-1, {n}) (-1: no adapter; {n} adapters in the stack); "
                f"row {pos} has {int(indices[pos])}")

    def rank_message():
        pos = int(bad_rank.nonzero()[0, 0])
        return f"ranks must be in [1, r_max={r_max}]; adapter {pos} has rank {int(ranks[pos])}"

    _checks.check_values(~bad_idx, index_message)
    _checks.check_values(~bad_rank, rank_message)


def _cuda_path(x2, A, B, ranks, scalings, idx, y2, regime_name):
    """The CUDA C++ gathered kernels (fastpeft.ops._cext): u [T, r_max] fp32 is fully written by
    the shrink; the expand adds into y2. In the prefill regime the rows go in adapter order
    (a device sort, no sync) so that consecutive rows share weight tiles."""
    from . import _cext
    n = A.shape[0]
    u = torch.empty(x2.shape[0], A.shape[1], device=x2.device, dtype=torch.float32)
    r32 = ranks.to(torch.int32).contiguous()
    row_order = None
    if regime_name == "prefill":
        key = torch.where((idx >= 0) & (idx < n), idx, torch.full_like(idx, n))
        row_order = torch.sort(key, stable=True).indices.to(torch.int32)
    _cext.multi_lora_shrink(x2, A.contiguous(), r32, idx, u, row_order)
    _cext.multi_lora_expand(y2, u, B.contiguous(), r32, scalings, idx, row_order)
    return y2


def _add_into(out, x, lora_A, lora_B, ranks, scalings, indices, check, backend):
    """out (or None: a new zero-filled result) += the update; returns the result."""
    n, r_max, K = lora_A.shape
    N = lora_B.shape[1]
    idx = indices.reshape(-1)
    T = idx.shape[0]
    if check:
        _check_values(ranks, idx, n, r_max)
    name = _backend.choose(OP, x.device, KERNELS, backend)
    if scalings.dtype != torch.float32:
        scalings = scalings.float()
    lead = x.shape[:-1]
    if name == "torch" and x.device.type in HOST_GROUPED:
        # rows grouped by adapter, one shrink + expand per adapter present (as PEFT): reads the
        # indices and ranks on the host, which costs nothing for host memory
        y2 = None
        if out is None:
            y2 = x.new_zeros(T, N)
        else:
            try:
                y2 = out.view(T, N)
            except RuntimeError:  # not viewable as rows: the update alone, then added
                pass
        if y2 is None:
            delta = ref.add_grouped_(x.new_zeros(T, N), x.reshape(T, K), lora_A, lora_B, ranks, scalings, idx)
            out.add_(delta.view(out.shape))
            return out
        ref.add_grouped_(y2, x.reshape(T, K), lora_A, lora_B, ranks, scalings, idx)
        return y2.view(*lead, N) if out is None else out
    if T == 0 or N == 0 or K == 0 or name == "torch":
        delta = ref.multi_lora_delta(x.reshape(T, K), lora_A, lora_B, ranks, scalings, idx)
        if out is None:
            return delta.reshape(*lead, N)
        out.add_(delta.reshape(out.shape))
        return out
    x2 = x.reshape(T, K)
    ranks, scalings, idx = ranks.contiguous(), scalings.contiguous(), idx.contiguous()
    y2, write_back = None, False
    if out is not None:
        try:
            y2 = out.view(T, N)
        except RuntimeError:  # not viewable as rows: accumulate into a copy, then write it back
            y2, write_back = out.reshape(T, N).clone(), True
    with on_device(x2):
        if name == "cuda":
            if x2.stride(-1) != 1:
                x2 = x2.contiguous()
            if y2 is None:
                y2 = torch.zeros(T, N, device=x2.device, dtype=x2.dtype)
            dst = y2 if y2.stride(-1) == 1 else y2.contiguous()
            _cuda_path(x2, lora_A, lora_B, ranks, scalings, idx, dst, regime(T, n))
            if dst is not y2:
                y2.copy_(dst)
        else:
            from ..kernels import multi_lora as k
            y2 = k.multi_lora(x2, lora_A, lora_B, ranks, scalings, idx, y2, regime(T, n))
    if out is None:
        return y2.reshape(*lead, N)
    if write_back:
        out.copy_(y2.view(out.shape))
    return out


def _delta_kernel(x, lora_A, lora_B, ranks, scalings, indices, check, backend):
    return _add_into(None, x, lora_A, lora_B, ranks, scalings, indices, check, backend)


def _add_kernel(out, x, lora_A, lora_B, ranks, scalings, indices, check, backend):
    _add_into(out, x, lora_A, lora_B, ranks, scalings, indices, check, backend)


_ARGS = "Tensor x, Tensor lora_A, Tensor lora_B, Tensor ranks, Tensor scalings, Tensor indices, bool check, str? backend"
multi_lora_op = define(f"multi_lora({_ARGS}) -> Tensor", _delta_kernel,
                       lambda x, A, B, *rest: x.new_empty((*x.shape[:-1], B.shape[1])))
multi_lora_add_op = define(f"multi_lora_add_(Tensor(a!) out, {_ARGS}) -> ()", _add_kernel, lambda *args: None)


def multi_lora(x: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, ranks: torch.Tensor,
               scalings: torch.Tensor, indices: torch.Tensor, out: torch.Tensor | None = None, *,
               check: bool = True, backend: str | None = None) -> torch.Tensor:
    """Many LoRA adapters in one batch: each row of x through its own adapter (inference).

        y[i] = out[i] + s_a * (x[i] A_a[:r_a]^T) B_a[:, :r_a]^T,   a = indices[i], r_a = ranks[a],
                                                                    s_a = scalings[a]

    x: [..., in] (rows = the leading dims flattened); lora_A: [n, r_max, in] and lora_B:
    [n, out, r_max] in x's dtype (fp32, fp16, bf16), entries beyond each adapter's rank are
    ignored (never read into the result); ranks: int [n] in [1, r_max]; scalings: float [n];
    indices: int [rows] (or x's leading shape), -1 = no adapter. Returns ``out`` with the
    update added in place when given ([..., out], x's dtype), else a new tensor holding the
    update alone (zero rows where there is no adapter).

    ``check=True`` validates the index and rank values on the device: a ValueError on CPU
    tensors, a device-side assertion on CUDA ones (no host sync: fine inside CUDA-graph
    capture). With ``check=False`` nothing is checked, and an out-of-range index counts as "no
    adapter" (never an out-of-bounds read). The torch backend on CPU tensors reads the indices
    and ranks on the host (to group the rows by adapter, as PEFT does; free in host memory);
    on CUDA tensors, forced with ``backend='torch'``, it gathers per row and reads nothing.
    Inference only: raises RuntimeError when autograd would need a gradient. ``backend``
    forces 'triton' | 'cuda' | 'torch' (see fastpeft._backend). Runs as
    ``torch.ops.fastpeft.multi_lora`` (``multi_lora_add_`` with ``out``).
    """
    _validate(x, lora_A, lora_B, ranks, scalings, indices, out)
    if backend is not None:
        _backend.check_name(backend)
    check = bool(check)
    direct = eager(x.device.type, x, lora_A, lora_B, ranks, scalings, indices, out)  # no dispatcher round trips
    if out is None:
        if direct:
            return _delta_kernel(x, lora_A, lora_B, ranks, scalings, indices, check, backend)
        return multi_lora_op(x, lora_A, lora_B, ranks, scalings, indices, check, backend)
    if direct:
        _add_kernel(out, x, lora_A, lora_B, ranks, scalings, indices, check, backend)
    else:
        multi_lora_add_op(out, x, lora_A, lora_B, ranks, scalings, indices, check, backend)
    return out
