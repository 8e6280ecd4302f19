"""Training: RoSTESFTConfig / RoSTESFTTrainer (TRL), LoRA inside the quantizer, monitoring."""

from .config import RoSTESFTConfig
from .lora import QATLoraLinear, load_roste_adapter, register_roste_lora
from .trainer import RoSTESFTTrainer

__all__ = ["RoSTESFTConfig", "RoSTESFTTrainer", "QATLoraLinear", "load_roste_adapter", "register_roste_lora"]
