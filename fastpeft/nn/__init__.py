"""Drop-in modules built on fastpeft.ops."""
from .int8 import Int8Linear
from .lora import LoRALinear
from .qlinear import QuantLinear

__all__ = ["Int8Linear", "LoRALinear", "QuantLinear"]
