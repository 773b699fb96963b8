"""fastpeft: fused Triton and CUDA C++ kernels for parameter-efficient fine-tuning and
efficient inference of large language models."""
from ._backend import BackendUnavailableError, use_backend
from .nn.bottleneck import BottleneckAdapter
from .nn.fakequant import FakeQuantize
from .nn.int8 import Int8Linear
from .nn.lora import LoRALinear
from .nn.qlinear import QuantLinear
from .ops.bottleneck import bottleneck_adapter
from .ops.fakequant import fake_quantize
from .ops.int8 import int8_linear, int8_vectorwise_quant
from .ops.lora import lora_linear
from .ops.multi_lora import multi_lora
from .ops.qlinear import quant_linear
from .ops.quant import QuantizedTensor, dequantize, quantize
from .model import inject_lora, lora_state_dict, mark_only_lora_as_trainable, quantize_int8
from .adapter_io import load_adapter, save_adapter
from .model import add_adapter, delete_adapter, set_adapter
from .serving import adapter_batch
from .precision import to_half
from .quantization import quantize_model
from .nn.qat import QATLinear
from .qat import convert_qat, prepare_qat
from .methods import add_bottleneck_adapters, bitfit, freeze, trainable_parameters
from .nn.prompt import PromptTuning
from .prompt_tuning import add_prompt_tuning, strip_prompt
from .ops.distill import distillation_loss, fused_linear_distillation_loss
from .nn.distill import FusedLinearDistillationLoss
from .distillation import distill

__version__ = "0.1.0"

__all__ = [
    "BackendUnavailableError", "use_backend",
    "LoRALinear", "lora_linear", "multi_lora",
    "BottleneckAdapter", "bottleneck_adapter",
    "inject_lora", "mark_only_lora_as_trainable", "lora_state_dict", "save_adapter", "load_adapter",
    "add_adapter", "delete_adapter", "set_adapter", "adapter_batch",
    "Int8Linear", "int8_linear", "int8_vectorwise_quant", "quantize_int8",
    "QuantizedTensor", "quantize", "dequantize", "QuantLinear", "quant_linear", "to_half", "quantize_model",
    "FakeQuantize", "fake_quantize",
    "QATLinear", "prepare_qat", "convert_qat",
    "add_bottleneck_adapters", "bitfit", "freeze", "trainable_parameters",
    "PromptTuning", "add_prompt_tuning", "strip_prompt",
    "distillation_loss", "fused_linear_distillation_loss", "FusedLinearDistillationLoss", "distill",
]
