"""Drop-in modules built on fastpeft.ops."""
from .bottleneck import BottleneckAdapter
from .fakequant import FakeQuantize
from .int8 import Int8Linear
from .lora import LoRALinear
from .prompt import PromptTuning
from .qat import QATLinear
from .qlinear import QuantLinear

__all__ = ["Int8Linear", "LoRALinear", "QuantLinear"]
__all__ += ["FakeQuantize", "QATLinear"]
__all__ += ["BottleneckAdapter"]
__all__ += ["PromptTuning"]
