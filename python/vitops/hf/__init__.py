"""HF ``transformers`` interop, one module per family: configs, checkpoint loading and export.

* ``vitops.hf.gemma4``: Gemma 4 vision tower + embedder (``Gemma4Config`` / ``Gemma4VisionConfig``);
* ``vitops.hf.llama4``: Llama 4 vision model + projector (``Llama4Config`` / ``Llama4VisionConfig``);
* ``vitops.hf.gemma3``: Gemma 3 SigLIP tower + projector (``Gemma3Config`` / ``SiglipVisionConfig``).

``vitops.hf.patch`` / ``unpatch`` route HF's own vision classes (a model, or the classes for models
built later, as vLLM builds Gemma 4's tower) through vitops ops in place (``vitops.hf._patch``).

The checkpoint mapping they share (key maps, prefix detection, mismatch errors, load reports,
meta-device loading) is ``vitops.hf._checkpoint``. Modules load on first use; the Gemma 4 functions
stay importable from here (``vitops.hf.from_hf`` and the rest).
"""

from .._lazy import lazy_getattr

_GEMMA4 = ("config_from_hf", "to_hf_vision_config", "from_hf", "load_hf_state_dict", "to_hf_state_dict",
           "save_hf_safetensors", "DEFAULT_VISION_PREFIX", "DEFAULT_EMBEDDER_PREFIX")
_SHARED = ("CheckpointMismatchError", "LoadReport", "read_checkpoint")
_PATCH = ("patch", "unpatch", "is_patched", "PatchReport", "UnsupportedTransformersError", "SUPPORTED_TRANSFORMERS")
_NAMES = {**{n: "gemma4" for n in _GEMMA4}, **{n: "_checkpoint" for n in _SHARED}, **{n: "_patch" for n in _PATCH}}
__all__ = ["gemma3", "gemma4", "llama4", *_SHARED, *_GEMMA4, *_PATCH]
__getattr__ = lazy_getattr(__name__, ("gemma3", "gemma4", "llama4"), _NAMES)


def __dir__():
    return sorted(set(globals()) | set(__all__))
