"""Model modules built on the vitops operators (thin nn.Modules; the math lives in the ops)."""

from . import gemma4_vision
from .gemma4_vision import (
    Gemma4Attention,
    Gemma4EncoderBlock,
    Gemma4VisionConfig,
    Gemma4VisionEncoderLayer,
    Gemma4VisionProjector,
    Gemma4VisionRotaryEmbedding,
    VisionEntry,
    VisionExit,
)

__all__ = [
    "gemma4_vision",
    "Gemma4Attention",
    "Gemma4EncoderBlock",
    "Gemma4VisionConfig",
    "Gemma4VisionEncoderLayer",
    "Gemma4VisionProjector",
    "Gemma4VisionRotaryEmbedding",
    "VisionEntry",
    "VisionExit",
]
