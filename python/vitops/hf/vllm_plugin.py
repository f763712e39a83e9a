"""vLLM general plugin (``[project.entry-points."vllm.general_plugins"] vitops = ...:register``).

vLLM calls every installed general plugin in each of its processes before it builds a model. vLLM
builds Gemma 4's vision tower from HF's own classes, so the class patch (:func:`vitops.hf.patch`
with ``model=None``) makes every tower it builds afterwards run on vitops ops. ``register`` is
idempotent and never raises: without transformers, or with a transformers whose code differs from
the supported releases, it logs why nothing was patched and returns.

Set ``VITOPS_VLLM_PATCH=0`` to keep the plugin installed but inactive.
"""

from __future__ import annotations

import logging
import os

logger = logging.getLogger("vitops.hf")


def register() -> None:
    """Apply the class-level patch once per process (safe to call any number of times)."""
    if os.environ.get("VITOPS_VLLM_PATCH", "1") == "0":
        logger.info("vitops vLLM plugin: VITOPS_VLLM_PATCH=0, HF vision classes left unpatched")
        return
    import importlib.util

    if importlib.util.find_spec("transformers") is None:
        logger.info("vitops vLLM plugin: transformers is not installed, nothing to patch")
        return
    from ._patch import UnsupportedTransformersError, patch

    try:
        report = patch()
    except UnsupportedTransformersError as e:
        logger.warning("vitops vLLM plugin: HF vision classes left unpatched: %s", e)
        return
    logger.info("vitops vLLM plugin: %s", report)
