"""Drop-in modules built on fastpeft.ops."""
from .lora import LoRALinear

__all__ = ["LoRALinear"]
