"""fastpeft: fused Triton and CUDA C++ kernels for parameter-efficient fine-tuning and
efficient inference of large language models."""
from ._backend import BackendUnavailableError, use_backend
from .nn.lora import LoRALinear
from .ops.lora import lora_linear

__version__ = "0.1.0"

__all__ = [
    "BackendUnavailableError", "use_backend",
    "LoRALinear", "lora_linear",
]
