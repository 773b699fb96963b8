"""fastpeft: fused Triton and CUDA C++ kernels for parameter-efficient fine-tuning and efficient
inference of large language models.

Layers, each importing only from the ones above it: reference/ (the specification, plain
PyTorch) -> kernels/ and csrc/ (they compute) -> ops/ (the registered fastpeft:: ops, their
autograd, input checks, backend choice) -> nn/ (modules) -> model-level helpers (modules.py,
lora.py, quantization.py, bottleneck.py, freezing.py, prompt_tuning.py, serving.py,
adapter_io.py, distillation.py, precision.py).
"""
from ._backend import BackendUnavailableError, use_backend
from .adapter_io import load_adapter, save_adapter
from .bottleneck import add_bottleneck_adapters
from .distillation import distill
from .freezing import bitfit, freeze, trainable_parameters
from .lora import (add_adapter, delete_adapter, fsdp_auto_wrap_policy, inject_lora, lora_state_dict,
                   mark_only_lora_as_trainable, set_adapter, wrap_fsdp1)
from .nn import (BottleneckAdapter, FakeQuantize, FusedLinearDistillationLoss, Int8Linear, LoRALinear, PromptTuning,
                 QATLinear, QuantLinear)
from .ops.bottleneck import bottleneck_adapter
from .ops.distill import distillation_loss, fused_linear_distillation_loss
from .ops.fakequant import fake_quantize
from .ops.int8 import int8_linear, int8_vectorwise_quant
from .ops.lora import lora_linear
from .ops.multi_lora import multi_lora
from .ops.qlinear import quant_linear
from .ops.quant import QuantizedTensor, dequantize, quantize
from .precision import to_half
from .prompt_tuning import add_prompt_tuning, strip_prompt
from .quantization import convert_qat, prepare_qat, quantize_int8, quantize_model
from .serving import adapter_batch

__version__ = "0.1.0"

__all__ = [
    "BackendUnavailableError", "use_backend",
    "LoRALinear", "lora_linear", "multi_lora",
    "BottleneckAdapter", "bottleneck_adapter",
    "inject_lora", "mark_only_lora_as_trainable", "lora_state_dict", "save_adapter", "load_adapter",
    "add_adapter", "delete_adapter", "set_adapter", "adapter_batch", "fsdp_auto_wrap_policy", "wrap_fsdp1",
    "Int8Linear", "int8_linear", "int8_vectorwise_quant", "quantize_int8",
    "QuantizedTensor", "quantize", "dequantize", "QuantLinear", "quant_linear", "to_half", "quantize_model",
    "FakeQuantize", "fake_quantize",
    "QATLinear", "prepare_qat", "convert_qat",
    "add_bottleneck_adapters", "bitfit", "freeze", "trainable_parameters",
    "PromptTuning", "add_prompt_tuning", "strip_prompt",
    "distillation_loss", "fused_linear_distillation_loss", "FusedLinearDistillationLoss", "distill",
]

# The Hugging Face transformers integration (fastpeft/integrations.py) imports transformers, which
# fastpeft does not need otherwise: its names load on first use, and are listed when it is installed.
_INTEGRATIONS = ("AdapterTrainer", "AdapterCheckpointMixin", "base_state_dict")


def __getattr__(name: str):
    if name in _INTEGRATIONS:
        from . import integrations
        return getattr(integrations, name)
    raise AttributeError(f"module 'fastpeft' has no attribute {name!r}")


import importlib.util as _importlib_util  # noqa: E402

if _importlib_util.find_spec("transformers") is not None:
    __all__ += list(_INTEGRATIONS)
