"""Drop-in modules built on fastpeft.ops."""
from .bottleneck import AdaptedProjection, BottleneckAdapter
from .distill import FusedLinearDistillationLoss
from .fakequant import FakeQuantize
from .int8 import Int8Linear
from .lora import LoRALinear
from .prompt import PromptTuning
from .qat import QATLinear
from .qlinear import QuantLinear

__all__ = ["AdaptedProjection", "BottleneckAdapter", "FakeQuantize", "FusedLinearDistillationLoss", "Int8Linear",
           "LoRALinear", "PromptTuning", "QATLinear", "QuantLinear"]
