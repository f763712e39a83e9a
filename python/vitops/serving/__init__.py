"""Serving pieces around the vision towers (the MAX / vLLM serving architecture, in PyTorch).

* ``vitops.serving.merge``: ``merge_soft_tokens`` (the op: soft-token rows written at given positions
  of the text embeddings, negative indices skipped, no host sync), ``soft_token_indices`` (the
  indices from token ids and the placeholder token id, in HF's placeholder-mask order, for windows of
  a chunked prefill and ragged batches) and ``check_soft_token_count`` (the deferred count check);
* ``vitops.serving.cache``: ``VisionEncoderCache``, a reference-counted LRU of soft-token tensors keyed
  by a content hash of the preprocessed image;
* ``vitops.serving.estimates``: ``estimate_vision_cache_entry_bytes`` (``vision_cache_entry_shape``) and
  ``estimate_activation_memory`` from an HF config, for Gemma 4, Gemma 3 and Llama 4;
* ``vitops.serving.packed``: ``encode_packed``, many images of different sizes in one packed sequence
  (block-diagonal attention, no padding FLOPs).

Modules load on first use.
"""

from .._lazy import lazy_getattr

_SUBMODULES = ("merge", "cache", "estimates", "packed")
_NAMES = {
    "merge_soft_tokens": "merge",
    "soft_token_indices": "merge",
    "check_soft_token_count": "merge",
    "VisionEncoderCache": "cache",
    "VisionEncoderCacheStats": "cache",
    "image_content_hash": "cache",
    "estimate_vision_cache_entry_bytes": "estimates",
    "estimate_activation_memory": "estimates",
    "vision_cache_entry_shape": "estimates",
    "encode_packed": "packed",
    "PackedImages": "packed",
}
__all__ = [*_SUBMODULES, *_NAMES]
__getattr__ = lazy_getattr(__name__, _SUBMODULES, _NAMES)


def __dir__():
    return sorted(set(globals()) | set(__all__))
