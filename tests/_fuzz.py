"""Hypothesis strategies of the fuzz suites: shapes, dtypes, memory layouts and special values.

The suites run few examples by default (CI), derandomized so that a CI run is reproducible;
FASTPEFT_FUZZ_EXAMPLES=N runs N examples per property with fresh random draws.
"""
import os

import hypothesis
import torch
from hypothesis import strategies as st

_ENV = os.environ.get("FASTPEFT_FUZZ_EXAMPLES")
EXAMPLES = int(_ENV) if _ENV else 12


def fuzz_settings(examples: int = EXAMPLES):
    """The settings of every fuzz property (the interpreter is slow: no deadline)."""
    return hypothesis.settings(max_examples=examples if not _ENV else int(_ENV), deadline=None,
                               derandomize=not _ENV, suppress_health_check=list(hypothesis.HealthCheck),
                               database=None)


# sizes: empty, one, primes, powers of two, and more than one tile of the interpreter's configs
SIZES = [0, 1, 2, 3, 5, 7, 13, 16, 31, 37, 64, 67]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
LAYOUTS = ["contiguous", "transposed", "sliced", "offset", "expanded"]
SPECIALS = ["none", "nan_row", "inf", "zero_row", "subnormal_row", "max"]


def sizes(min_value: int = 0, max_value: int = 67):
    return st.sampled_from([s for s in SIZES if min_value <= s <= max_value])


def lay(t: torch.Tensor, layout: str) -> torch.Tensor:
    """``t``'s values in another memory layout: "transposed" (dims 0 and -1 swapped in memory:
    column-major for 2-D; "sliced" for 1-D, torch has no negative strides), "sliced" (every other
    element of a wider buffer), "offset" (a view at a storage offset), "expanded" (stride 0 along
    dim 0: t's first slice repeated, equal to t only when t is constant along dim 0)."""
    if layout == "contiguous":
        return t.contiguous()
    if layout == "offset" or t.dim() == 0:
        flat = torch.zeros(t.numel() + 3, dtype=t.dtype, device=t.device)
        view = flat[3:].view(t.shape)
        view.copy_(t)
        return view
    if layout == "sliced" or (layout == "transposed" and t.dim() == 1):
        big = torch.zeros((*t.shape[:-1], 2 * t.shape[-1] + 1), dtype=t.dtype, device=t.device)
        view = big[..., 1::2]
        view.copy_(t)
        return view
    if layout == "transposed":
        return t.transpose(0, -1).contiguous().transpose(0, -1)
    if layout == "expanded":
        return t if t.shape[0] == 0 else t[:1].expand(t.shape)
    raise ValueError(f"unknown layout {layout!r}")


def plant(t: torch.Tensor, special: str) -> torch.Tensor:
    """``t`` (float, at least 1-D and not empty) with one kind of special value planted in its first row."""
    t = t.clone()
    row = t[0] if t.dim() > 1 else t
    if special == "nan_row":
        row[..., 0] = float("nan")
    elif special == "inf":
        row[..., -1] = float("-inf")
    elif special == "zero_row":
        row.zero_()
    elif special == "subnormal_row":
        row.mul_(torch.finfo(t.dtype).tiny / 4)
    elif special == "max":
        row[..., 0] = torch.finfo(t.dtype).max
    return t


@st.composite
def tensors(draw, shape, dtype=torch.float32, layouts=LAYOUTS, specials=("none",), scale=1.0):
    """(tensor, layout, special): randn * scale values in ``shape`` and ``dtype``, a special value
    planted when the tensor is not empty, in a drawn memory layout."""
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    t = (torch.randn(shape, generator=g) * scale).to(dtype)
    special = draw(st.sampled_from(specials))
    if t.numel() and special != "none":
        t = plant(t, special)
    layout = draw(st.sampled_from(layouts))
    return lay(t, layout), layout, special
