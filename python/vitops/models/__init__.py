"""Model modules built on the vitops operators, one module per MaxText module name (thin
``nn.Module``\\ s; the math lives in the ops and ``vitops.layers``):

* ``vitops.models.gemma4_vision``: the Gemma 4 vision tower (``maxtext.models.gemma4_vision``);
* ``vitops.models.llama4``: the Llama 4 vision model and projector (``maxtext.models.llama4``);
* ``vitops.models.gemma3``: Gemma 3 (``maxtext.models.gemma3``).

Each loads on first use. The Gemma 4 names stay importable from here.
"""

from .._lazy import lazy_getattr

_GEMMA4 = ("Gemma4Attention", "Gemma4EncoderBlock", "Gemma4VisionConfig", "Gemma4VisionEncoderLayer",
           "Gemma4VisionProjector", "Gemma4VisionRotaryEmbedding", "VisionEntry", "VisionExit")
__all__ = ["gemma3", "gemma4_vision", "llama4", *_GEMMA4]
__getattr__ = lazy_getattr(__name__, ("gemma4_vision", "llama4", "gemma3"), {n: "gemma4_vision" for n in _GEMMA4})


def __dir__():
    return sorted(set(globals()) | set(__all__))
