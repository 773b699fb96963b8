"""One module per op family: the autograd Functions, input checks and backend choice."""
from .int8 import int8_linear, int8_vectorwise_quant
from .lora import lora_linear, lora_update

__all__ = ["int8_linear", "int8_vectorwise_quant", "lora_linear", "lora_update"]
