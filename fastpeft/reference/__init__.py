"""Plain-PyTorch references: the specification of every op (torch only)."""
from . import dropout, lora

__all__ = ["dropout", "lora"]
