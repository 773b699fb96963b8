"""Model-level post-training quantization (PTQ; Nagel et al., 2021, "A White Paper on Neural Network
Quantization") and quantization-aware training (QAT; Jacob et al., 2018) on fastpeft's layers.

Weights: int8 or int4 zero-point codes (groups of ``group_size`` input features), with int8
activations and int8 weights LLM.int8()'s per-row absmax codes, or QLoRA's 4-bit NF4 / FP4 base
(Dettmers et al., 2023: flat blocks of 64 weights, optionally double-quantized absmax), on which
``fastpeft.inject_lora`` then trains LoRA (QLoRA). ``from_bnb_4bit`` converts a model quantized by
bitsandbytes (Linear4bit) to fastpeft's layers, keeping bitsandbytes' codes.

Activations (the static-vs-dynamic trade-off):
- None: they stay 16-bit (weight-only W8A16 / W4A16, ``QuantLinear``).
- "dynamic": each token (row) gets its own absmax int8 scale at run time: one extra reduction
  over the row per layer call, no calibration, robust to any input range.
- "static": one int8 step per layer and tensor, fixed by a calibration pass over
  ``calibration_data``: the quantization is a single multiply-round (no reduction), but one
  token with a large range either clips (percentile observer) or costs every other token
  resolution (min/max observer).
Activation codes are symmetric (absmax, [-127, 127]): the int8 x int8 tensor-core product needs
no zero-point correction on the activation side.

Observers (``observer=``): "minmax" takes the largest |x| seen; "percentile" takes the
``percentile``-th percentile of |x| over every element of every calibration batch, from a
histogram (2048 bins over [0, range], the range doubled when a larger |x| arrives, so old bins
merge exactly in pairs; the percentile is interpolated linearly inside its bin).
"""
from __future__ import annotations

import math
from typing import Iterable, Sequence

import torch
from torch import nn

from . import _checks
from .modules import plain_linear_names, replace_module
from .nn.int8 import Int8Linear
from .nn.qat import QATLinear, check_config as check_qat_config
from .nn.qlinear import QUANT_STORAGE, QuantLinear
from .reference.nf4 import BLOCK_SIZES as NF4_BLOCK_SIZES
from .reference.quant import qrange

WEIGHTS = ("int8", "int4", "nf4", "fp4")
FLOAT4 = ("nf4", "fp4")  # QLoRA's 4-bit data types (fastpeft.ops.nf4)
NF4_BLOCK_SIZE = 64  # QLoRA's and bitsandbytes' default block of the 4-bit types
INT_GROUP_SIZE = 128  # the default group of the int8 / int4 zero-point codes
ACTIVATIONS = (None, "dynamic", "static")
OBSERVERS = ("minmax", "percentile")
_QMAX = qrange(8, "absmax")[1]


class MinMaxObserver:
    """The largest |x| over every element seen."""

    def __init__(self) -> None:
        self.amax = 0.0
        self.count = 0

    def update(self, x: torch.Tensor) -> None:
        if x.numel():
            self.amax = max(self.amax, float(x.detach().abs().amax()))
            self.count += x.numel()

    def absmax(self) -> float:
        return self.amax


class PercentileObserver:
    """The ``percentile``-th percentile of |x| over every element seen, from a histogram of
    ``bins`` bins over [0, range]; when a larger |x| arrives the range doubles (as often as
    needed) and pairs of old bins merge, so counts are never re-estimated."""

    def __init__(self, percentile: float = 99.99, bins: int = 2048) -> None:
        if isinstance(percentile, bool) or not isinstance(percentile, (int, float)) \
                or not 0 < float(percentile) <= 100:
            raise ValueError(f"percentile must be a number in (0, 100], got {percentile!r}")
        if isinstance(bins, bool) or not isinstance(bins, int) or bins < 2 or bins % 2:
            raise ValueError(f"bins must be an even int >= 2, got {bins!r}")
        self.percentile, self.bins = float(percentile), bins
        self.hist: torch.Tensor | None = None  # float64 counts
        self.range = 0.0
        self.count = 0

    def update(self, x: torch.Tensor) -> None:
        a = x.detach().abs().float().flatten()
        if a.numel() == 0:
            return
        m = float(a.max())
        if self.hist is None:
            self.hist = torch.zeros(self.bins, dtype=torch.float64)
            self.range = m if m > 0 else 0.0
        if m > self.range:
            if self.range == 0.0:  # only zeros so far: they stay in bin 0
                self.range = m
            while m > self.range:
                self.hist = self.hist.view(-1, 2).sum(1)
                self.hist = torch.cat([self.hist, torch.zeros(self.bins // 2, dtype=torch.float64)])
                self.range *= 2.0
        if self.range == 0.0:
            self.hist[0] += a.numel()
        else:
            idx = (a * (self.bins / self.range)).long().clamp_(0, self.bins - 1)
            self.hist += torch.bincount(idx.cpu(), minlength=self.bins).double()
        self.count += a.numel()

    def absmax(self) -> float:
        if self.hist is None or self.range == 0.0:
            return 0.0
        cdf = torch.cumsum(self.hist, 0)
        target = self.percentile / 100.0 * float(cdf[-1])
        i = int(torch.searchsorted(cdf, torch.tensor([target], dtype=torch.float64)).clamp(max=self.bins - 1))
        below = float(cdf[i - 1]) if i > 0 else 0.0
        inside = float(self.hist[i])
        frac = 1.0 if inside == 0 else min(1.0, max(0.0, (target - below) / inside))
        return (i + frac) * self.range / self.bins


def _observer(kind: str, percentile: float):
    if kind == "minmax":
        return MinMaxObserver()
    return PercentileObserver(percentile)


def _run(model: nn.Module, batch) -> None:
    if isinstance(batch, torch.Tensor):
        model(batch)
    elif isinstance(batch, dict) or hasattr(batch, "keys"):
        model(**batch)
    elif isinstance(batch, (tuple, list)):
        model(*batch)
    else:
        raise TypeError(f"calibration_data must yield tensors, tuples / lists of positional inputs or "
                        f"dicts of keyword inputs; got {type(batch).__name__}")


@torch.no_grad()
def calibrate(model: nn.Module, names: Sequence[str], calibration_data: Iterable,
              observer: str = "minmax", percentile: float = 99.99) -> dict[str, float]:
    """Run ``model`` (in eval mode, restored afterwards) over every batch of ``calibration_data``
    and return, per module name in ``names``, the static int8 step of its input: the observed
    absmax / 127 (1.0 for an input that was all zeros, as fastpeft.quantize treats a zero
    range). A batch is a tensor (``model(batch)``), a tuple / list (``model(*batch)``) or a
    dict (``model(**batch)``). Raises if no batch reached a layer or an input was not finite."""
    if observer not in OBSERVERS:
        raise ValueError(f"observer must be one of {OBSERVERS}, got {observer!r}")
    if isinstance(calibration_data, (torch.Tensor, dict)):
        raise TypeError("calibration_data must be an iterable of batches (e.g. a list of tensors or a "
                        "DataLoader), not a single " + type(calibration_data).__name__)
    obs = {n: _observer(observer, percentile) for n in names}
    bad: list[str] = []

    def hook(name):
        def pre(module, args, kwargs):
            x = args[0] if args else kwargs.get("input")
            if not torch.isfinite(x).all():
                bad.append(name)
            obs[name].update(x)
        return pre

    handles = [model.get_submodule(n).register_forward_pre_hook(hook(n), with_kwargs=True) for n in names]
    was_training = model.training
    model.eval()
    batches = 0
    try:
        for batch in calibration_data:
            _run(model, batch)
            batches += 1
            if bad:
                raise ValueError(f"calibration batch {batches - 1} gave NaN or inf inputs to layer {bad[0]!r}")
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    if batches == 0:
        raise ValueError("calibration_data yielded no batch")
    unseen = [n for n in names if obs[n].count == 0]
    if unseen:
        raise ValueError(f"no calibration batch reached {len(unseen)} layer(s), e.g. {unseen[0]!r}: "
                         f"their static activation scale cannot be set")
    steps = {}
    for n in names:
        amax = obs[n].absmax()
        steps[n] = amax / _QMAX if amax > 0 else 1.0
        if not math.isfinite(steps[n]):
            raise ValueError(f"layer {n!r}: calibration gave a non-finite activation range")
    return steps


def quantize_model(model: nn.Module, weights: str = "int8", activations: str | None = None,
                   group_size: int | None | str = "auto", calibration_data=None,
                   skip: Sequence[str] = ("lm_head",), observer: str = "minmax",
                   percentile: float = 99.99, double_quant: bool = False,
                   compute_dtype: torch.dtype | None = None,
                   quant_storage: torch.dtype | None = None) -> nn.Module:
    """Replace every nn.Linear of ``model`` (but those matching ``skip``: equal to an entry or
    ending with "." + entry) by a quantized layer, in place; returns ``model``.

    weights="int8"/"int4" with activations=None: weight-only ``QuantLinear`` (zero-point codes,
    groups of ``group_size`` input features, "auto": 128; None: one scale per output row); a
    layer whose in_features is not a multiple of group_size gets one scale per output row.
    weights="int8" with int8 activations: ``Int8Linear`` (per-row absmax int8 weights, threshold
    0, the int8 GEMM). weights="int4" with int8 activations: ``QuantLinear(bits=4,
    activations=...)`` (zero-point groups as above; the W4A8 kernel).
    weights="nf4"/"fp4" (QLoRA's frozen base, Dettmers et al., 2023): ``QuantLinear(scheme=
    weights)`` in bitsandbytes' layout, blocks of ``group_size`` weights ("auto": 64, QLoRA's;
    one of bitsandbytes' block sizes, any in_features), ``double_quant`` quantizing the block
    absmax to 8 bits; 16-bit activations only. Then ``fastpeft.inject_lora`` trains LoRA on it.
    ``quant_storage`` (nf4 / fp4 only; None: uint8 / float32 buffers): the 4-bit codes and their
    quant state frozen Parameters of this dtype holding their bytes (torch.uint8 for FSDP2; the
    model's dtype for FSDP1, which flattens one dtype a unit), so that FSDP shards the base (see
    ``QuantLinear``).
    ``compute_dtype`` (weight-only layers): the dtype the layers compute in (their input and bias
    cast to it, the output back), as bitsandbytes' Linear4bit(compute_dtype=); None: the input's.
    activations="dynamic": a scale per token at run time. activations="static": one step per
    layer from a calibration pass of the float model over ``calibration_data`` (an iterable of
    batches: tensors, tuples or dicts of model inputs), with the ``observer`` "minmax" or
    "percentile" (``percentile`` of |x|, default 99.99); see the module docstring.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"quantize_model expects an nn.Module, got {type(model).__name__}")
    if weights not in WEIGHTS:
        raise ValueError(f"weights must be one of {WEIGHTS}, got {weights!r}")
    if activations not in ACTIVATIONS:
        raise ValueError(f"activations must be one of {ACTIVATIONS}, got {activations!r}")
    if observer not in OBSERVERS:
        raise ValueError(f"observer must be one of {OBSERVERS}, got {observer!r}")
    if not isinstance(double_quant, bool):
        raise TypeError(f"double_quant must be a bool, got {type(double_quant).__name__}")
    if compute_dtype is not None and compute_dtype not in _checks.FLOAT_DTYPES:
        raise TypeError(f"compute_dtype must be None or one of {_checks.FLOAT_DTYPES}, got {compute_dtype!r}")
    float4 = weights in FLOAT4
    if quant_storage is not None:
        if not isinstance(quant_storage, torch.dtype) or quant_storage not in QUANT_STORAGE:
            raise TypeError(f"quant_storage must be None or one of {QUANT_STORAGE}, got {quant_storage!r}")
        if not float4:
            raise ValueError(f"quant_storage is for weights='nf4' / 'fp4' (QLoRA's), not {weights!r}")
    if group_size == "auto":
        group_size = NF4_BLOCK_SIZE if float4 else INT_GROUP_SIZE
    elif float4:
        if group_size not in NF4_BLOCK_SIZES or isinstance(group_size, bool):
            raise ValueError(f"weights={weights!r}: group_size is the block size of the flattened weight, one of "
                             f"{NF4_BLOCK_SIZES} (bitsandbytes' block sizes) or 'auto' ({NF4_BLOCK_SIZE}), got "
                             f"{group_size!r}")
    elif group_size is not None:  # an int > 0 (2.5 or True would silently mean one scale per row)
        if isinstance(group_size, str):
            raise TypeError(f"group_size must be an int, None or 'auto', got {group_size!r}")
        _checks.positive_int("group_size", group_size)
    if float4 and activations is not None:
        raise ValueError(f"weights={weights!r} takes 16-bit activations only (activations=None), got "
                         f"activations={activations!r}")
    if double_quant and not float4:
        raise ValueError(f"double_quant is for weights='nf4' / 'fp4' (QLoRA's), not {weights!r}")
    if compute_dtype is not None and activations is not None:
        raise ValueError(f"compute_dtype is for weight-only layers (activations=None), got activations={activations!r}")
    if activations == "static":
        if calibration_data is None:
            raise ValueError("activations='static' needs calibration_data (an iterable of model inputs) "
                             "to fix each layer's activation scale")
        PercentileObserver(percentile)  # validates percentile before the calibration pass
    elif calibration_data is not None:
        raise ValueError("calibration_data is only used with activations='static'")
    names = plain_linear_names(model, _skip(skip))
    steps = calibrate(model, names, calibration_data, observer, percentile) if activations == "static" else {}
    new = {}  # every layer is built before any is replaced: an error leaves the model as it was
    for name in names:
        linear = model.get_submodule(name)
        step = steps.get(name)
        if float4:
            new[name] = QuantLinear.from_linear(linear, bits=4, group_size=group_size, scheme=weights,
                                                double_quant=double_quant, compute_dtype=compute_dtype,
                                                quant_storage=quant_storage)
        elif weights == "int8" and activations is not None:
            new[name] = Int8Linear.from_linear(linear, threshold=0.0, input_scale=step)
        else:
            g = group_size if group_size is not None and linear.in_features % group_size == 0 else None
            new[name] = QuantLinear.from_linear(linear, bits=8 if weights == "int8" else 4, group_size=g,
                                                activations=activations, input_scale=step,
                                                compute_dtype=compute_dtype)
    for name, module in new.items():
        replace_module(model, name, module)
    return model


BNB_4BIT_TYPES = ("Linear4bit", "LinearNF4", "LinearFP4")  # bitsandbytes' 4-bit layers, by class name


def from_bnb_4bit(model: nn.Module) -> nn.Module:
    """Replace every bitsandbytes 4-bit layer (``bnb.nn.Linear4bit`` / LinearNF4 / LinearFP4, by
    class name: bitsandbytes itself is not imported) of ``model`` in place by
    ``QuantLinear.from_bnb(layer)``: the same nf4 / fp4 codes, block size and (double-quantized)
    absmax, read as they are, the bias copied, the layer's compute_dtype kept. A model quantized
    by transformers' ``BitsAndBytesConfig(load_in_4bit=True)`` or wrapped by PEFT afterwards
    (QLoRA) thus runs on fastpeft's kernels; ``fastpeft.load_adapter`` then loads a PEFT adapter
    onto it. Returns ``model``; raises ValueError when it holds no such layer."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"from_bnb_4bit expects an nn.Module, got {type(model).__name__}")
    names = [n for n, m in model.named_modules() if n and type(m).__name__ in BNB_4BIT_TYPES]
    if not names:
        raise ValueError(f"from_bnb_4bit: {type(model).__name__} has no bitsandbytes 4-bit layer "
                         f"({', '.join(BNB_4BIT_TYPES)})")
    new = {n: QuantLinear.from_bnb(model.get_submodule(n)) for n in names}  # all built before any is replaced
    for name, module in new.items():
        replace_module(model, name, module)
    return model


def _skip(skip: object) -> Sequence[str]:
    """``skip``: a module name or a sequence of them (matched as in ``name_matches``)."""
    names = [skip] if isinstance(skip, str) else skip
    if not isinstance(names, (list, tuple, set, frozenset)) or not all(isinstance(n, str) and n for n in names):
        raise TypeError(f"skip must be a module name or a list of module names, got {skip!r}")
    return list(names)


def quantize_int8(model: nn.Module, threshold: float = 6.0, skip: Sequence[str] = ("lm_head",)) -> nn.Module:
    """Replace every nn.Linear of ``model`` in place by ``Int8Linear.from_linear(linear, threshold)``.

    Modules whose qualified name equals an entry of ``skip`` or ends with "." + entry stay
    as they are (by default the LM head). Works on Hugging Face transformers models; LoRA
    can be injected afterwards (``inject_lora`` adapts Int8Linear layers). Returns ``model``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"quantize_int8 expects an nn.Module, got {type(model).__name__}")
    new = {n: Int8Linear.from_linear(model.get_submodule(n), threshold=threshold)
           for n in plain_linear_names(model, _skip(skip))}
    for name, module in new.items():
        replace_module(model, name, module)
    return model


# ---------------------------------------------------------------------------------------------
# quantization-aware training


def prepare_qat(model: nn.Module, bits: int = 8, scheme: str = "zeropoint", activations: bool = True,
                skip: Sequence[str] = ("lm_head",)) -> nn.Module:
    """Replace every nn.Linear of ``model`` (but those matching ``skip``: equal to an entry or
    ending with "." + entry) in place by ``QATLinear.from_linear(linear, bits, scheme,
    activations)``; returns ``model``.

    Each layer then trains its float weight through a learnable per-output-row fake quantizer
    (``bits`` 8 or 4, ``scheme`` "zeropoint" or "absmax"), initialized from the weight's min /
    max, i.e. the post-training quantizer. activations=True also fake-quantizes each layer's
    input to int8 (symmetric, one learnable step per tensor, initialized from the first batch
    the layer sees): the form of fastpeft's static int8-activation kernel. The weight and bias
    Parameters are the nn.Linear's own (not copied); nothing is frozen or unfrozen. Train as
    usual (the scales and zero points are Parameters too), then call ``convert_qat``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"prepare_qat expects an nn.Module, got {type(model).__name__}")
    check_qat_config(bits, scheme, activations)
    names = plain_linear_names(model, _skip(skip))
    if not names:
        done = sum(isinstance(m, QATLinear) for m in model.modules())
        hint = f" (it already holds {done} QATLinear layers)" if done else ""
        raise ValueError(f"prepare_qat: {type(model).__name__} has no nn.Linear submodule outside "
                         f"skip={tuple(skip) if not isinstance(skip, str) else skip!r}{hint}")
    new = {n: QATLinear.from_linear(model.get_submodule(n), bits, scheme, activations) for n in names}
    for name, module in new.items():
        replace_module(model, name, module)
    return model


def convert_qat(model: nn.Module) -> nn.Module:
    """Replace every QATLinear of ``model`` in place by its real quantized layer; returns ``model``.

    Each becomes ``fastpeft.QuantLinear.from_quantized`` over the weight's codes under the
    learned quantizer (per output row; dequantized, they equal the fake-quantized weight bit for
    bit), with activations="static" and the learned input step when the layer fake-quantized its
    input (W8A8 / W4A8 on the int8 kernel), weight-only otherwise. Every layer must have seen
    data first (RuntimeError otherwise; the model is then left unchanged).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"convert_qat expects an nn.Module, got {type(model).__name__}")
    if isinstance(model, QATLinear):
        raise ValueError("convert_qat converts the QATLinear submodules of a model; for a single layer "
                         "call its .to_quant_linear()")
    names = [n for n, m in model.named_modules() if isinstance(m, QATLinear)]
    if not names:
        raise ValueError(f"convert_qat: {type(model).__name__} has no QATLinear layer; "
                         f"call fastpeft.prepare_qat(model, ...) and train it first")
    new = {}
    for n in names:
        try:
            new[n] = model.get_submodule(n).to_quant_linear()
        except (RuntimeError, ValueError) as e:
            raise type(e)(f"convert_qat: layer {n!r}: {e}") from None
    for name, module in new.items():
        replace_module(model, name, module)
    return model
