"""Reference multi-adapter LoRA: many adapters in one batch, one adapter per row.

    y[i] = out[i] + s_a * (x[i] A_a[:r_a]^T) B_a[:, :r_a]^T     with a = indices[i]

for every row i of x [T, in]; rows with no adapter (a = -1, or any a outside [0, n)) get
nothing. A [n, r_max, in] and B [n, out, r_max] stack the adapters; ranks [n] (1..r_max)
and scalings [n] describe them. Entries of A and B beyond an adapter's rank are never part of
the result (they may hold anything, NaN included): they are selected away with ``where``,
never multiplied by zero.

Two formulations of the same update: ``multi_lora_delta`` gathers each row's adapter slices
(one batched matmul over rows, no host read: the specification, and the torch backend on
non-CPU tensors) and ``add_grouped_`` groups the rows by adapter and runs one pair of matmuls
per adapter present, as PEFT's mixed-batch forward does (the torch backend on CPU tensors: it
reads the indices and ranks on the host, free for host memory, a sync on a device).
"""
from __future__ import annotations

import torch

# The per-row gather materializes A and B slices of each row: rows go in chunks of at most
# this many gathered elements, so memory stays bounded on long inputs.
_GATHER_ELEMENTS = 1 << 26
# add_grouped_ gathers rows in windows of at most this many bytes (see there)
_WINDOW_BYTES = 1 << 19


def row_keep(ranks: torch.Tensor, indices: torch.Tensor, n: int, r_max: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(safe adapter index per row (0 where none), keep [T, r_max]: rank slot j of row i counts)."""
    idx = indices.long()
    valid = (idx >= 0) & (idx < n)
    safe = torch.where(valid, idx, torch.zeros_like(idx))
    rank = ranks.long().clamp(0, r_max)[safe]
    keep = (torch.arange(r_max, device=idx.device)[None, :] < rank[:, None]) & valid[:, None]
    return safe, keep


def multi_lora_delta(x2: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, ranks: torch.Tensor,
                     scalings: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """The update alone, on 2-D x [T, in] -> [T, out] in x's dtype: a gathered shrink
    u = x A_idx^T (masked beyond each rank) and a gathered expand s_idx u B_idx^T."""
    T, K = x2.shape
    n, r_max, _ = lora_A.shape
    N = lora_B.shape[1]
    safe, keep = row_keep(ranks, indices, n, r_max)
    zero = torch.zeros((), dtype=x2.dtype, device=x2.device)
    scale = torch.where(keep[:, 0], scalings.to(x2.dtype)[safe], zero)
    # B beyond each rank is zeroed once per adapter (u beyond the rank is zeroed per row below)
    rank_mask = torch.arange(r_max, device=x2.device)[None, :] < ranks.long().clamp(0, r_max)[:, None]
    B_m = torch.where(rank_mask[:, None, :], lora_B, zero)
    out = torch.empty(T, N, dtype=x2.dtype, device=x2.device)
    step = max(1, _GATHER_ELEMENTS // max(1, r_max * max(K, N)))
    for i0 in range(0, T, step):  # chunks of rows, not rows: bounded memory for the gathers
        sl = slice(i0, i0 + step)
        u = torch.bmm(lora_A[safe[sl]], x2[sl, :, None])[:, :, 0]            # [t, r_max]
        u = torch.where(keep[sl], u * scale[sl, None], zero)                   # NaN beyond rank -> 0
        # rows without an adapter gathered adapter 0 as a stand-in: select their zeros (a
        # non-finite weight of adapter 0 would otherwise reach them as 0 * inf)
        out[sl] = torch.where(keep[sl, :1], torch.bmm(B_m[safe[sl]], u[:, :, None])[:, :, 0], zero)
    return out


def add_grouped_(y2: torch.Tensor, x2: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor,
                 ranks: torch.Tensor, scalings: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """y2 [T, out] += the update of x2 [T, in], in place; returns y2. The rows are grouped by
    adapter (a stable sort of the indices) and each adapter present runs one shrink and one expand
    per window of its rows, on A[a, :r_a] and B[a, :, :r_a] only (entries beyond the rank are
    never read); each window's rows are gathered from x2 and its results scatter-added into y2.
    Rows with no adapter are left untouched; an adapter of rank <= 0 adds zeros. Same values as
    ``multi_lora_delta`` (summation order aside).

    Windows hold at most _WINDOW_BYTES of gathered rows (as PEFT's per-adapter gathers of one
    prompt's tokens do): whole-batch temporaries of several MiB would go back to the OS at each
    free and fault their pages in again at the next call, which on the CPU costs more than the
    low-rank matmuls. Reads the indices' adapter counts and the ranks on the host (to size each
    adapter's matmuls): meant for CPU tensors, where that costs no sync; on a device it would
    synchronize (and could not be captured in a CUDA graph), which is why the torch backend uses
    ``multi_lora_delta`` there.
    """
    T = x2.shape[0]
    n, r_max, _ = lora_A.shape
    idx = indices.long()
    key = torch.where((idx >= 0) & (idx < n), idx, torch.full_like(idx, n))  # n: no adapter
    counts = torch.bincount(key, minlength=n + 1).tolist()
    rank_list = ranks.long().clamp(0, r_max).tolist()
    scale = scalings.to(y2.dtype)
    valid = T - counts[n]
    if valid == 0:
        return y2
    if valid == T and max(counts[:n]) == T:  # one adapter for every row: no gather, no scatter
        a = counts.index(T)
        r = rank_list[a]
        if r > 0:
            u = torch.mm(x2, lora_A[a, :r].t()).mul_(scale[a])
            y2.addmm_(u, lora_B[a, :, :r].t())
        return y2
    order = torch.argsort(key, stable=True)  # the rows grouped by adapter, those without one last
    step = max(1, _WINDOW_BYTES // (max(x2.shape[1], y2.shape[1], 1) * x2.element_size()))
    a, seg_end = 0, counts[0]  # the adapter of the window's first row, where its rows end
    for w0 in range(0, valid, step):
        w1 = min(valid, w0 + step)
        rows = order[w0:w1]
        xs = x2.index_select(0, rows)
        delta = y2.new_empty(w1 - w0, y2.shape[1])
        lo = w0
        while lo < w1:
            while seg_end <= lo:  # the adapter that holds row lo (adapters with no rows skipped)
                a += 1
                seg_end += counts[a]
            hi = min(seg_end, w1)
            part = slice(lo - w0, hi - w0)
            r = rank_list[a]
            if r == 0:
                delta[part].zero_()
            else:
                u = torch.mm(xs[part], lora_A[a, :r].t()).mul_(scale[a])
                torch.mm(u, lora_B[a, :, :r].t(), out=delta[part])
            lo = hi
        y2.index_add_(0, rows, delta)
    return y2


def multi_lora(x: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, ranks: torch.Tensor,
               scalings: torch.Tensor, indices: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """out + delta, or delta alone when ``out`` is None (zero rows where there is no adapter).

    x [..., in]; lora_A [n, r_max, in]; lora_B [n, out, r_max]; ranks, scalings [n];
    indices [prod(...)] (the rows of x flattened). Returns [..., out] in x's dtype (a new
    tensor: ``out`` is not modified here).
    """
    K = x.shape[-1]
    x2 = x.reshape(-1, K)
    delta = multi_lora_delta(x2, lora_A, lora_B, ranks, scalings, indices.reshape(-1))
    delta = delta.reshape(*x.shape[:-1], lora_B.shape[1])
    return delta if out is None else out + delta
