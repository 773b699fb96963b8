"""One module per op family: the registered ``fastpeft::`` ops (torch.library, see _library.py),
their autograd Functions, input checks and backend choice."""
from .int8 import int8_linear, int8_vectorwise_quant
from .lora import lora_linear, lora_update

__all__ = ["int8_linear", "int8_vectorwise_quant", "lora_linear", "lora_update"]
