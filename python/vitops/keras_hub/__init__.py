"""KerasHub-style entry points, one module per family, with KerasHub's constructor arguments and
call conventions over the shared towers:

* ``vitops.keras_hub.gemma4``: :class:`Gemma4VisionEncoder` (``keras_hub.models.Gemma4VisionEncoder``);
* ``vitops.keras_hub.gemma3``: :class:`Gemma3VisionEncoder` (``keras_hub.models.Gemma3VisionEncoder``).

Modules load on first use; the class names are importable from here.
"""

from .._lazy import lazy_getattr

_NAMES = {"Gemma4VisionEncoder": "gemma4", "Gemma3VisionEncoder": "gemma3"}
__all__ = ["gemma3", "gemma4", *_NAMES]
__getattr__ = lazy_getattr(__name__, ("gemma3", "gemma4"), _NAMES)


def __dir__():
    return sorted(set(globals()) | set(__all__))
