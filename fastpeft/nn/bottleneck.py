"""BottleneckAdapter: a Houlsby bottleneck adapter on the fused op; AdaptedProjection: a projection
followed by one (what fastpeft.add_bottleneck_adapters puts into a model)."""
from __future__ import annotations

import math

import torch
from torch import nn

from .. import _checks
from ..ops.bottleneck import ACTIVATIONS, bottleneck_adapter


class BottleneckAdapter(nn.Module):
    """y = x + scaling * up(act(down(x))), fused (``fastpeft.bottleneck_adapter``).

    ``down`` = nn.Linear(d_model, bottleneck) and ``up`` = nn.Linear(bottleneck, d_model), so
    the state dict holds ``down.weight`` [bottleneck, d_model], ``down.bias``, ``up.weight``
    [d_model, bottleneck] and ``up.bias``. Init (Houlsby: near-identity): ``down`` keeps
    nn.Linear's default (weight kaiming-uniform with a=sqrt(5), i.e. U(+-1/sqrt(d_model)),
    about the scale of Houlsby's N(0, 1e-2) at d_model ~ 4096; bias U(+-1/sqrt(d_model)));
    ``up`` weight and bias are zeros, so a new BottleneckAdapter is exactly the identity and its first
    gradients reach ``up`` only. Parameters in another dtype than x (fp32 adapters on a
    half-precision model) are cast to x's dtype for the op; their gradients come back in theirs.
    """

    def __init__(self, d_model: int, bottleneck: int = 64, activation: str = "relu", scaling: float = 1.0,
                 device=None, dtype=None) -> None:
        super().__init__()
        _checks.positive_int("d_model", d_model)
        _checks.positive_int("bottleneck", bottleneck)
        if not isinstance(activation, str) or activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {activation!r}; expected one of {ACTIVATIONS}")
        self.d_model, self.bottleneck, self.activation = d_model, bottleneck, activation
        self.scaling = _checks.finite_float("scaling", scaling)
        self.down = nn.Linear(d_model, bottleneck, device=device, dtype=dtype)
        self.up = nn.Linear(bottleneck, d_model, device=device, dtype=dtype)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """down: nn.Linear's init (kaiming-uniform a=sqrt(5), bias U(+-1/sqrt(d_model))); up: zeros."""
        nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
        bound = 1 / math.sqrt(self.d_model)
        nn.init.uniform_(self.down.bias, -bound, bound)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x):
        # the Parameters read from the submodules' dicts (nn.Module.__getattr__ is a Python call per
        # attribute: a good part of a small adapter's per-call cost on the CPU)
        down, up = self._modules["down"], self._modules["up"]
        dp, up_p = down._parameters, up._parameters
        wd, wu = dp.get("weight"), up_p.get("weight")
        if wd is None or wu is None:  # not held there (e.g. parametrized)
            wd, wu = down.weight, up.weight
        bd = dp["bias"] if "bias" in dp else down.bias
        bu = up_p["bias"] if "bias" in up_p else up.bias
        dt = x.dtype
        if not (wd.dtype == dt and wu.dtype == dt and (bd is None or bd.dtype == dt)
                and (bu is None or bu.dtype == dt)):
            wd, bd, wu, bu = (p if p is None else p.to(dt) for p in (wd, bd, wu, bu))
        return bottleneck_adapter(x, wd, bd, wu, bu, self.activation, self.scaling)

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, bottleneck={self.bottleneck}, activation={self.activation!r}, "
                f"scaling={self.scaling:g}")


class AdaptedProjection(nn.Module):
    """y = adapter(base_layer(x)): a bottleneck adapter right after a projection, before the
    residual add and the norm that follow it in the block (Houlsby et al., 2019).

    The projection is kept, untouched, as ``base_layer``; its state_dict keys move from
    ``<path>.weight`` / ``<path>.bias`` to ``<path>.base_layer.weight`` / ``.base_layer.bias``,
    and the adapter's are ``<path>.adapter.down.weight`` [bottleneck, width],
    ``<path>.adapter.down.bias``, ``<path>.adapter.up.weight`` [width, bottleneck] and
    ``<path>.adapter.up.bias``. A state_dict written before the wrapping (keys
    ``<path>.weight`` ...) still loads: the old keys are read into ``base_layer``. Any
    attribute the wrapper lacks (``weight``, ``bias``, ``in_features``, ``nf`` ...) is read
    from ``base_layer``.
    """

    def __init__(self, base_layer: nn.Module, adapter: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.adapter = adapter
        self._register_load_state_dict_pre_hook(_read_unwrapped_keys, with_module=True)

    def forward(self, *args, **kwargs) -> torch.Tensor:
        return self.adapter(self.base_layer(*args, **kwargs))

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_layer":
                raise
            return getattr(self.base_layer, name)


def _read_unwrapped_keys(module: AdaptedProjection, state_dict, prefix, *_) -> None:
    for key in module.base_layer.state_dict(keep_vars=True):
        old, new = prefix + key, prefix + "base_layer." + key
        if old in state_dict and new not in state_dict:
            state_dict[new] = state_dict.pop(old)
