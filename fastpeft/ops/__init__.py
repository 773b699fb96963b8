"""One module per op family: the autograd Functions, input checks and backend choice."""
from .lora import lora_linear

__all__ = ["lora_linear"]
