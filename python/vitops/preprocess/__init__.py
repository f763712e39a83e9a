"""Image (and video) preprocessing, one module per family, each reproducing its HF processor:

* ``vitops.preprocess.gemma4``: :class:`Gemma4ImageProcessor` (``Gemma4ImageProcessorPil``) and
  :class:`Gemma4VideoProcessor` (``Gemma4VideoProcessor``);
* ``vitops.preprocess.llama4``: :class:`Llama4ImageProcessor` (``Llama4ImageProcessor``);
* ``vitops.preprocess.gemma3``: :class:`Gemma3ImageProcessor` (``Gemma3ImageProcessorPil``, pan-and-scan).

The input forms and resizes they share live in ``vitops.preprocess._images`` (videos:
``vitops.preprocess._videos``). Modules load on first use; the Gemma 4 names stay importable from
here.
"""

from .._lazy import lazy_getattr

_NAMES = {
    "SUPPORTED_SOFT_TOKENS": "gemma4",
    "Gemma4ImageProcessor": "gemma4",
    "Gemma4Preprocessed": "gemma4",
    "get_aspect_ratio_preserving_size": "gemma4",
    "preprocess_gemma4": "gemma4",
    "Gemma4VideoProcessor": "gemma4",
    "Gemma4VideoPreprocessed": "gemma4",
    "VideoMetadata": "_videos",
    "demo_image": "_images",
    "Llama4ImageProcessor": "llama4",
    "Llama4Preprocessed": "llama4",
    "Gemma3ImageProcessor": "gemma3",
    "Gemma3Preprocessed": "gemma3",
}
__all__ = ["gemma3", "gemma4", "llama4", *_NAMES]
__getattr__ = lazy_getattr(__name__, ("gemma3", "gemma4", "llama4"), _NAMES)


def __dir__():
    return sorted(set(globals()) | set(__all__))
