"""LoRALinear: a frozen linear layer plus a trainable low-rank update, on the fused op."""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .. import _backend, _checks
from ..ops import nf4 as nf4_ops
from ..ops import qlinear as qlinear_ops
from ..ops.lora import lora_linear, lora_update
from ..ops.nf4 import nf4_lora_linear
from ..ops.qlinear import quant_lora_linear
from ..ops.multi_lora import multi_lora
from ..reference.lora import lora_delta_weight
from ._common import MergeableQuantized, new_module
from .int8 import Int8Linear
from .qlinear import QuantLinear

DEFAULT_ADAPTER = "default"
BASE_ADAPTER = "__base__"  # reserved: "no adapter" in fastpeft.adapter_batch


# Quantized layers LoRA trains on top of (the frozen ``base_layer``): LLM.int8()'s Int8Linear and
# QuantLinear (QLoRA's NF4 / FP4 base, Dettmers et al., 2023, and int4 / int8 weight-only codes).
QUANTIZED_BASES = (Int8Linear, QuantLinear)

EXTRA_STATE = "_extra_state"  # nn.Module's key of get_extra_state() in a state dict


def lora_scaling(r: int, lora_alpha: float, use_rslora: bool) -> float:
    """lora_alpha / r, or lora_alpha / sqrt(r) with rank-stabilized LoRA."""
    return lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r


@dataclass(frozen=True)
class AdapterSpec:
    """One named adapter's configuration: scaling = lora_alpha / r (/ sqrt(r) with rsLoRA)."""
    r: int
    lora_alpha: float
    lora_dropout: float
    use_rslora: bool

    @property
    def scaling(self) -> float:
        return lora_scaling(self.r, self.lora_alpha, self.use_rslora)


def _spec(r, lora_alpha, lora_dropout, use_rslora) -> AdapterSpec:
    """An AdapterSpec from checked arguments."""
    return AdapterSpec(_checks.positive_int("r", r), _checks.finite_float("lora_alpha", lora_alpha),
                       _checks.probability("lora_dropout", lora_dropout), bool(use_rslora))


def check_adapter_name(name: object) -> str:
    """A usable adapter name: a non-empty str without ".", not the reserved "__base__"."""
    if not isinstance(name, str):
        raise TypeError(f"adapter name must be a str, got {type(name).__name__}")
    if not name or "." in name or name == BASE_ADAPTER:
        raise ValueError(f"adapter name must be non-empty, without '.', and not {BASE_ADAPTER!r}; "
                         f"got {name!r}")
    return name


class LoRALinear(nn.Module):
    """y = x W^T + b + scaling * (dropout(x) A^T) B^T with W and b frozen.

    ``weight`` [out, in] and ``bias`` [out] are frozen; ``lora_A`` [r, in]
    (kaiming-uniform, a=sqrt(5)) and ``lora_B`` [out, r] (zeros) train, so a new
    layer computes exactly its base linear. ``scaling`` is lora_alpha / r
    (lora_alpha / sqrt(r) with ``use_rslora``). ``merge()`` folds the update into
    ``weight`` and keeps the original, so ``unmerge()`` restores it bit for bit.

    On a quantized base (``from_linear(Int8Linear | QuantLinear)``: LoRA on LLM.int8() weights,
    or QLoRA on a 4-bit NF4 / FP4 / int4 base, Dettmers et al., 2023) the frozen layer is
    ``base_layer`` and y = base_layer(x) + scaling * (dropout(x) A^T) B^T (the low-rank term by
    ``fastpeft.ops.lora.lora_update``; dx flows through the quantized weight by the base layer's
    own backward); the adapters are float32; merge re-quantizes the base with its own quantizer
    (``base_layer.merge_``) and unmerge restores its codes and scales exactly.

    Several named adapters (``add_adapter`` / ``set_adapter`` / ``delete_adapter``): the first
    one is "default". ``lora_A``, ``lora_B``, ``r``, ``lora_alpha``, ``lora_dropout``,
    ``use_rslora`` and ``scaling`` always describe the *active* adapter (``active_adapter``);
    forward, training, merge and ``to_linear`` use it alone. The others wait in the
    ParameterDicts ``lora_A_adapters[name]`` / ``lora_B_adapters[name]``; ``set_adapter`` moves
    the Parameter objects (no copy) between the two places. state_dict layout:

        lora_A, lora_B                               the active adapter [r, in], [out, r]
        lora_A_adapters.<name>, lora_B_adapters.<name>  every other adapter

    so a single-adapter layer's keys are unchanged, and loading a state_dict needs the same
    adapters with the same one active. ``set_adapter(None)`` leaves no adapter active (the layer
    computes its base; ``lora_A`` / ``lora_B`` are None and r / lora_alpha / scaling are None):
    what a layer gets when a model switches to an adapter this layer does not hold. Under
    ``fastpeft.adapter_batch`` each row uses the adapter its sample names (mixed batch).
    """

    def __init__(self, in_features: int, out_features: int, r: int = 8, lora_alpha: float = 8,
                 lora_dropout: float = 0.0, bias: bool = True, use_rslora: bool = False,
                 device=None, dtype=None) -> None:
        super().__init__()
        _checks.positive_int("in_features", in_features)
        _checks.positive_int("out_features", out_features)
        spec = _spec(r, lora_alpha, lora_dropout, use_rslora)  # checked before the weight is made
        weight = nn.Parameter(torch.empty(out_features, in_features, device=device, dtype=dtype),
                              requires_grad=False)
        nn.init.kaiming_uniform_(weight, a=math.sqrt(5))  # nn.Linear's init
        b = None
        if bias:
            b = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype), requires_grad=False)
            nn.init.uniform_(b, -1 / math.sqrt(in_features), 1 / math.sqrt(in_features))
        self._build(weight, b, None, spec)

    def _build(self, weight: nn.Parameter | None, bias: nn.Parameter | None,
               base_layer: MergeableQuantized | None, spec: AdapterSpec) -> None:
        """The one constructor path: a frozen ``weight`` [out, in] and ``bias`` (shared, not copied),
        or a frozen quantized ``base_layer``; then the "default" adapter of ``spec`` (float32 on a
        quantized base, else in the weight's dtype)."""
        self.r, self.lora_alpha, self.lora_dropout = spec.r, spec.lora_alpha, spec.lora_dropout
        self.use_rslora, self.scaling = spec.use_rslora, spec.scaling
        self.merged = False
        self._merge_after_load = False
        self.register_load_state_dict_post_hook(LoRALinear._merge_loaded)
        self.base_layer = base_layer
        if base_layer is not None:
            base_layer.requires_grad_(False)
            self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
            self._init_adapter(base_layer.device, torch.float32)
            return
        self.out_features, self.in_features = (int(v) for v in weight.shape)
        self.weight = weight.requires_grad_(False)
        self.bias = bias if bias is None else bias.requires_grad_(False)
        self._init_adapter(weight.device, weight.dtype)

    def _init_adapter(self, device, dtype) -> None:
        self.lora_A = nn.Parameter(torch.empty(self.r, self.in_features, device=device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, self.r, device=device, dtype=dtype))
        self.register_buffer("_unmerged_weight", None, persistent=False)
        self.active_adapter: str | None = DEFAULT_ADAPTER
        self.lora_A_adapters = nn.ParameterDict()  # the inactive adapters
        self.lora_B_adapters = nn.ParameterDict()
        self._specs: dict[str, AdapterSpec] = {}  # of the inactive adapters
        self._order: list[str] = [DEFAULT_ADAPTER]  # every adapter, in the order added (= slots)
        self._adapters_version = 0  # bumped by add / delete / set_adapter
        self._stack_cache: tuple | None = None
        # While set (by fastpeft.adapter_batch: an object with row_indices(layer, x) giving each row's
        # adapter slot), forward runs the mixed batch: every row with its own adapter.
        self.routing = None
        self.reset_lora_parameters()

    def reset_lora_parameters(self) -> None:
        """A: kaiming-uniform (a=sqrt(5)), as nn.Linear and PEFT do; B: zeros."""
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)

    @classmethod
    def from_linear(cls, linear: nn.Linear | Int8Linear | QuantLinear, r: int = 8, lora_alpha: float = 8,
                    lora_dropout: float = 0.0, use_rslora: bool = False) -> "LoRALinear":
        """Wrap ``linear``: its weight and bias are shared (not copied) and frozen.

        An ``Int8Linear`` or ``QuantLinear`` (any bits / scheme: QLoRA's nf4 / fp4, int4 / int8
        zeropoint / absmax) becomes ``base_layer``, frozen, shared (LoRA on a quantized base,
        float32 adapters).
        """
        if not isinstance(linear, (nn.Linear,) + QUANTIZED_BASES):
            raise TypeError(f"from_linear expects an nn.Linear, Int8Linear or QuantLinear, got "
                            f"{type(linear).__name__}")
        spec = _spec(r, lora_alpha, lora_dropout, use_rslora)
        if isinstance(linear, QUANTIZED_BASES) and linear.base_merged:
            raise ValueError(f"from_linear: the {type(linear).__name__} holds a merged update (merge_); "
                             f"unmerge_() it first")
        self = new_module(cls)
        if isinstance(linear, QUANTIZED_BASES):
            self._build(None, None, linear, spec)
        else:
            self._build(linear.weight, linear.bias, None, spec)
        return self

    @property
    def base_bias_name(self) -> str:
        """Name of the frozen bias within this module ("bias", or "base_layer.bias" on a quantized base)."""
        return "bias" if self.base_layer is None else "base_layer.bias"

    @property
    def base_bias(self) -> nn.Parameter | None:
        return (self if self.base_layer is None else self.base_layer).bias

    def delta_weight(self) -> torch.Tensor:
        """scaling * B A in fp32, shape [out, in] (of the active adapter)."""
        self._need_active("delta_weight")
        return lora_delta_weight(self.lora_A.detach().float(), self.lora_B.detach().float(), self.scaling)

    def _base_forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base_layer(x) if self.base_layer is not None else F.linear(x, self.weight, self.bias)

    def _fused_op(self, x):
        """The fused op the forward takes on a quantized base, or None (then the base layer plus
        lora_update): fastpeft.ops.nf4.nf4_lora_linear on an nf4 / fp4 QuantLinear (QLoRA),
        fastpeft.ops.qlinear.quant_lora_linear on an int4 / int8 weight-only one whose group size
        the triton kernel takes (the LoRA shrink, then the base's dequantize-GEMM with the
        expand in its accumulator). Either needs the QuantLinear itself without forward hooks,
        computing in x's dtype (no compute_dtype cast, the bias in x's dtype), no autocast, and
        the triton backend chosen for x's device (under torch.compile: the op, whose kernel
        chooses when it runs)."""
        base = self.base_layer
        # a QuantLinear itself, its forward unhooked: the fused op reads its codes without calling it, so
        # a wrapper (FSDP2's fully_shard gathers the codes in a forward pre-hook) keeps the unfused path
        if not (type(base) is QuantLinear and not base._forward_pre_hooks and not base._forward_hooks
                and isinstance(x, torch.Tensor)
                and x.dtype in _checks.FLOAT_DTYPES and base.compute_dtype in (None, x.dtype)
                and (base.bias is None or base.bias.dtype == x.dtype)
                and not torch.is_autocast_enabled(x.device.type)):
            return None
        if base.scheme in nf4_ops.SCHEMES:
            op, name, kernels = nf4_lora_linear, "nf4_linear", nf4_ops.KERNELS
        elif base.activations is None and qlinear_ops._triton_takes(base.group_size, None):
            op, name, kernels = quant_lora_linear, qlinear_ops.OP, qlinear_ops.KERNELS
        else:  # int8 activations, or a group size the kernel does not take
            return None
        if torch.compiler.is_compiling():  # traced: one graph node, whose kernel picks the backend when it runs
            return op
        try:
            return op if _backend.choose(name, x.device, kernels) == "triton" else None
        except _backend.BackendUnavailableError:  # the unfused path says why
            return None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.routing is None and self.base_layer is None and not self.merged and self.active_adapter is not None:
            # the common case, its Parameters read from the module's dict (nn.Module.__getattr__ is a
            # Python call per attribute: a good part of a small layer's per-call cost on the CPU)
            params = self._parameters
            w, A, B = params.get("weight"), params.get("lora_A"), params.get("lora_B")
            if w is not None and A is not None and B is not None:
                b = params["bias"] if "bias" in params else self.bias
                return lora_linear(x, w, b, A, B, self.scaling, dropout_p=self.lora_dropout, training=self.training)
        if self.routing is not None:
            return self._mixed_forward(x)
        if self.active_adapter is None:
            if x.shape[-1] != self.in_features:
                raise ValueError(f"x has {x.shape[-1]} features (shape {tuple(x.shape)}) but the layer "
                                 f"expects {self.in_features}")
            return self._base_forward(x)
        if self.base_layer is not None:
            fused = None if self.merged else self._fused_op(x)
            if fused is not None:
                return fused(x, self.base_layer.qweight, self.base_layer.bias, self.lora_A, self.lora_B,
                             self.scaling, dropout_p=self.lora_dropout, training=self.training)
            y = self.base_layer(x)
            if self.merged:
                return y
            return y + lora_update(x, self.lora_A, self.lora_B, self.scaling,
                                   dropout_p=self.lora_dropout, training=self.training)
        if self.merged:
            return F.linear(x, self.weight, self.bias)
        return lora_linear(x, self.weight, self.bias, self.lora_A, self.lora_B, self.scaling,
                           dropout_p=self.lora_dropout, training=self.training)

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the update into the base weight (rounded once from fp32, or re-quantized for a
        quantized base); keep the original for unmerge."""
        if self.merged:
            warnings.warn("LoRALinear.merge(): already merged; nothing done", stacklevel=2)
            return
        self._need_active("merge")
        if self.base_layer is not None:
            self.base_layer.merge_(self.delta_weight())
        else:
            self._unmerged_weight = self.weight.detach().clone()
            self.weight.copy_((self.weight.float() + self.delta_weight()).to(self.weight.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Restore the original base weight bit for bit (the codes and scales of a quantized base)."""
        if not self.merged:
            warnings.warn("LoRALinear.unmerge(): not merged; nothing done", stacklevel=2)
            return
        if self.base_layer is not None:
            self.base_layer.unmerge_()
        else:
            self.weight.copy_(self._unmerged_weight)
            self._unmerged_weight = None
        self.merged = False

    # The merge is state. state_dict() holds the base weight from before the merge (the merged
    # one derives from it and the adapter) and, as extra state, whether the layer is merged;
    # load_state_dict unmerges a merged layer first (the load then replaces its original weight)
    # and merges again after the load when the state says so: merged or not, both ways, a round
    # trip gives the saved layer bit for bit.

    def get_extra_state(self) -> torch.Tensor:
        return torch.tensor(self.merged)

    def set_extra_state(self, state) -> None:
        self._merge_after_load = bool(state)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.merged and self.base_layer is None:  # (a quantized base saves its own original codes)
            destination[prefix + "weight"] = self._unmerged_weight

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        if self.merged:
            self.unmerge()
        self._merge_after_load = False
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        if prefix + EXTRA_STATE in missing_keys:  # a state saved without the flag: an unmerged layer
            missing_keys.remove(prefix + EXTRA_STATE)

    @staticmethod
    def _merge_loaded(module: "LoRALinear", incompatible_keys) -> None:
        """load_state_dict post-hook (after the children: a quantized base's codes are in place)."""
        if getattr(module, "_merge_after_load", False):
            module._merge_after_load = False
            module.merge()

    @torch.no_grad()
    def to_linear(self) -> nn.Linear | Int8Linear | QuantLinear:
        """A new layer holding the merged weight (this layer is left as it is): an nn.Linear,
        or for a quantized base a layer of its type with the re-quantized merged weight."""
        if self.base_layer is not None:
            fold = not self.merged and self.active_adapter is not None
            return self.base_layer.merged_copy(self.delta_weight() if fold else None)
        w = self.weight.detach().clone() if self.merged or self.active_adapter is None else \
            (self.weight.float() + self.delta_weight()).to(self.weight.dtype)
        out = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                        device=w.device, dtype=w.dtype)
        out.weight.copy_(w)
        if self.bias is not None:
            out.bias.copy_(self.bias)
        return out

    def extra_repr(self) -> str:
        has_bias = self.base_bias is not None
        if self.active_adapter is None:
            lora = "no active adapter"
        else:
            lora = (f"r={self.r}, lora_alpha={self.lora_alpha:g}, lora_dropout={self.lora_dropout:g}")
        text = (f"in_features={self.in_features}, out_features={self.out_features}, {lora}, "
                f"bias={has_bias}, use_rslora={self.use_rslora}, merged={self.merged}")
        if self._order != [DEFAULT_ADAPTER]:
            text += f", adapters={self._order}, active_adapter={self.active_adapter!r}"
        return text

    # -----------------------------------------------------------------------------------------
    # several named adapters

    @property
    def adapter_names(self) -> tuple[str, ...]:
        """Every adapter this layer holds, in the order they were added (their stack slots)."""
        return tuple(self._order)

    def has_adapter(self, name: str) -> bool:
        return name in self._order

    def _need_active(self, what: str) -> None:
        if self.active_adapter is None:
            raise ValueError(f"LoRALinear.{what}: no adapter is active (adapters: {self._order}); "
                             f"call set_adapter(name) first")

    def _need_adapter(self, name: object) -> str:
        if not isinstance(name, str) or name not in self._order:
            raise ValueError(f"LoRALinear has no adapter {name!r}; its adapters: {self._order}")
        return name

    def adapter_spec(self, name: str) -> AdapterSpec:
        """r, lora_alpha, lora_dropout, use_rslora (and .scaling) of adapter ``name``."""
        self._need_adapter(name)
        if name == self.active_adapter:
            return AdapterSpec(self.r, self.lora_alpha, self.lora_dropout, self.use_rslora)
        return self._specs[name]

    def adapter_weights(self, name: str) -> tuple[nn.Parameter, nn.Parameter]:
        """The Parameters (lora_A [r, in], lora_B [out, r]) of adapter ``name``."""
        self._need_adapter(name)
        if name == self.active_adapter:
            return self.lora_A, self.lora_B
        return self.lora_A_adapters[name], self.lora_B_adapters[name]

    def _adapter_place(self):
        """(device, dtype) for a new adapter: those of the existing ones, else of the base."""
        if self._order:
            A, _ = self.adapter_weights(self._order[0])
            return A.device, A.dtype
        if self.base_layer is not None:
            return self.base_layer.device, torch.float32
        return self.weight.device, self.weight.dtype

    def add_adapter(self, name: str, r: int = 8, lora_alpha: float = 8, lora_dropout: float = 0.0,
                    use_rslora: bool = False) -> None:
        """Add adapter ``name`` (inactive; A kaiming-uniform, B zeros, so it starts as a no-op).
        Its Parameters have requires_grad False until it becomes the active adapter."""
        check_adapter_name(name)
        if name in self._order:
            raise ValueError(f"LoRALinear already has an adapter {name!r} (adapters: {self._order}); "
                             f"delete_adapter it first to replace it")
        spec = _spec(r, lora_alpha, lora_dropout, use_rslora)
        device, dtype = self._adapter_place()
        A = nn.Parameter(torch.empty(spec.r, self.in_features, device=device, dtype=dtype), requires_grad=False)
        B = nn.Parameter(torch.zeros(self.out_features, spec.r, device=device, dtype=dtype), requires_grad=False)
        with torch.no_grad():
            nn.init.kaiming_uniform_(A, a=math.sqrt(5))
        self.lora_A_adapters[name] = A
        self.lora_B_adapters[name] = B
        self._specs[name] = spec
        self._order.append(name)
        self._adapters_version += 1

    def delete_adapter(self, name: str) -> None:
        """Remove adapter ``name``. The active adapter cannot be deleted: set_adapter another one
        (or None) first."""
        self._need_adapter(name)
        if name == self.active_adapter:
            others = [n for n in self._order if n != name]
            raise ValueError(f"LoRALinear.delete_adapter: {name!r} is the active adapter; call "
                             f"set_adapter(other) first (other adapters: {others}, or None)")
        del self.lora_A_adapters[name]
        del self.lora_B_adapters[name]
        del self._specs[name]
        self._order.remove(name)
        self._adapters_version += 1

    def set_adapter(self, name: str | None) -> None:
        """Make adapter ``name`` the active one (None: none; the layer computes its base).

        lora_A / lora_B / r / lora_alpha / lora_dropout / use_rslora / scaling then describe it.
        The new active adapter's Parameters take the requires_grad of the previous active one
        (True when there was none); the now inactive ones get requires_grad False, so only the
        active adapter trains. Refused while merged (unmerge first).
        """
        if name is not None:
            self._need_adapter(name)
        if name == self.active_adapter:
            return
        if self.merged:
            raise ValueError(f"LoRALinear.set_adapter({name!r}): the layer is merged with adapter "
                             f"{self.active_adapter!r}; call unmerge() first")
        trains = True
        old = self.active_adapter
        if old is not None:
            trains = self.lora_A.requires_grad
            A, B = self.lora_A, self.lora_B
            A.requires_grad_(False)
            B.requires_grad_(False)
            self.lora_A_adapters[old], self.lora_B_adapters[old] = A, B
            self._specs[old] = AdapterSpec(self.r, self.lora_alpha, self.lora_dropout, self.use_rslora)
        if name is None:
            self.lora_A = self.lora_B = None
            self.r = self.lora_alpha = self.scaling = None
        else:
            A, B = self.lora_A_adapters.pop(name), self.lora_B_adapters.pop(name)
            spec = self._specs.pop(name)
            self.lora_A, self.lora_B = A.requires_grad_(trains), B.requires_grad_(trains)
            self.r, self.lora_alpha = spec.r, spec.lora_alpha
            self.lora_dropout, self.use_rslora, self.scaling = spec.lora_dropout, spec.use_rslora, spec.scaling
        self.active_adapter = name
        self._adapters_version += 1

    def rename_adapter(self, old: str, new: str) -> None:
        """Give adapter ``old`` the name ``new`` (its Parameters stay the same objects)."""
        self._need_adapter(old)
        check_adapter_name(new)
        if new == old:
            return
        if new in self._order:
            raise ValueError(f"LoRALinear already has an adapter {new!r} (adapters: {self._order})")
        if old == self.active_adapter:
            self.active_adapter = new
        else:
            self.lora_A_adapters[new] = self.lora_A_adapters.pop(old)
            self.lora_B_adapters[new] = self.lora_B_adapters.pop(old)
            self._specs[new] = self._specs.pop(old)
        self._order[self._order.index(old)] = new
        self._adapters_version += 1

    def adapter_stacks(self, dtype: torch.dtype, device: torch.device):
        """Every adapter stacked in slot order (``adapter_names``), for ``fastpeft.multi_lora``:
        A [n, r_max, in] and B [n, out, r_max] in ``dtype``, zero beyond each adapter's rank,
        ranks int32 [n], scalings float32 [n], all on ``device``. Cached; rebuilt when an adapter
        is added, deleted or activated, changes in place (its version counter) or moves; a
        write through ``.data`` bypasses the version counter: call ``clear_adapter_cache()``."""
        params = [p for name in self._order for p in self.adapter_weights(name)]
        key = (dtype, torch.device(device), self._adapters_version,
               tuple((id(p), p._version, p.data_ptr()) for p in params))
        if self._stack_cache is not None and self._stack_cache[0] == key:
            return self._stack_cache[1]
        specs = [self.adapter_spec(n) for n in self._order]
        n, r_max = len(specs), max(s.r for s in specs)
        A = torch.zeros(n, r_max, self.in_features, dtype=dtype, device=device)
        B = torch.zeros(n, self.out_features, r_max, dtype=dtype, device=device)
        with torch.no_grad():
            for i, (name, s) in enumerate(zip(self._order, specs)):
                a, b = self.adapter_weights(name)
                A[i, :s.r].copy_(a.detach())
                B[i, :, :s.r].copy_(b.detach())
        ranks = torch.tensor([s.r for s in specs], dtype=torch.int32).to(device)
        scalings = torch.tensor([s.scaling for s in specs], dtype=torch.float32).to(device)
        stacks = (A, B, ranks, scalings)
        self._stack_cache = (key, stacks)
        return stacks

    def clear_adapter_cache(self) -> None:
        """Drop the cached adapter stacks (rebuilt at the next mixed batch)."""
        self._stack_cache = None

    def _mixed_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Each row with the adapter its sample names (fastpeft.adapter_batch): one multi_lora call."""
        if self.training and torch.is_grad_enabled():
            raise RuntimeError("fastpeft.adapter_batch is for inference: the layer is in training mode "
                               "with gradients enabled (call model.eval() or use torch.no_grad())")
        if self.merged:
            raise RuntimeError(f"fastpeft.adapter_batch: the layer is merged with adapter "
                               f"{self.active_adapter!r}; unmerge() first")
        if torch.is_grad_enabled() and x.requires_grad:
            raise RuntimeError("fastpeft.adapter_batch is for inference: x requires grad; run the "
                               "model under torch.no_grad() / torch.inference_mode()")
        if x.dim() < 2 or x.shape[-1] != self.in_features:
            raise ValueError(f"x has shape {tuple(x.shape)}; the layer expects [batch, ..., "
                             f"{self.in_features}] under adapter_batch")
        indices = self.routing.row_indices(self, x)  # validates the batch size
        y = self._base_forward(x)
        if not self._order or x.numel() == 0:
            return y
        A, B, ranks, scalings = self.adapter_stacks(x.dtype, x.device)
        y2 = y.reshape(-1, self.out_features)  # a view: F.linear's output is contiguous
        res = multi_lora(x.reshape(-1, self.in_features), A, B, ranks, scalings, indices,
                         out=y2, check=False)
        return (y2 if res is None else res).view(y.shape)
