"""The vision-encoder cache: soft tokens of images already encoded, shared by the requests that show them.

A serving engine encodes each image once while any request holds it, and keeps it afterwards while
memory allows (MAX's ``vision_encoder_cache``, vLLM's ``EncoderCacheManager``):

* :func:`image_content_hash` keys an image by the bytes, shape and dtype of its preprocessed tensor
  (and positions), the model, the soft-token budget and the output dtype;
* :class:`VisionEncoderCache` maps keys to soft-token tensors (``[tokens, hidden]``, owned copies),
  with a reference count per request: :meth:`~VisionEncoderCache.acquire` returns the cached tensor
  (or computes it) and references it for the request, :meth:`~VisionEncoderCache.release` drops every
  reference of a finished request. Entries no request holds are evicted least recently used first
  when the cache needs room; held entries are never evicted.

Thread-safe: one lock guards the state; encoding (``compute``) and copies run outside it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import operator
import threading
from collections import Counter, OrderedDict
from collections.abc import Callable, Hashable
from typing import Any

import torch

__all__ = ["VisionEncoderCache", "VisionEncoderCacheStats", "image_content_hash"]

# blake2b's personalisation (at most 16 bytes): a key of another format or purpose never collides
_HASH_PERSON = b"vitops.venc.v1"


# ---------------------------------------------------------------------------------------------
# Keys
# ---------------------------------------------------------------------------------------------
def _update_field(h, tag: bytes, data: bytes) -> None:
    """Length-prefixed fields: no two field sequences share a byte stream."""
    h.update(len(tag).to_bytes(1, "little") + tag + len(data).to_bytes(8, "little"))
    h.update(data)


def _host_bytes(t: torch.Tensor, name: str) -> memoryview:
    """The tensor's values in row-major order as bytes (the same for any strides or device)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"image_content_hash: `{name}` must be a torch.Tensor, got {type(t).__name__}")
    if t.layout != torch.strided or t.is_nested or t.is_quantized:
        raise TypeError(f"image_content_hash: `{name}` must be a dense (strided) tensor, got layout {t.layout}")
    if t.device.type == "meta":
        raise ValueError(f"image_content_hash: `{name}` is on the meta device (it has no values to hash)")
    t = t.detach().resolve_conj().resolve_neg()
    if t.device.type != "cpu":
        # The digest is computed on the host: this copy waits for the device (a sync). Hash the
        # processor's output before moving it to the device where possible.
        t = t.cpu()
    t = t.contiguous()
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


def _update_tensor(h, tag: bytes, t: torch.Tensor, name: str) -> None:
    data = _host_bytes(t, name)
    _update_field(h, tag + b".dtype", str(t.dtype).encode())
    _update_field(h, tag + b".shape", b"".join(int(n).to_bytes(8, "little") for n in t.shape))
    _update_field(h, tag, data)


def image_content_hash(pixel_values: torch.Tensor, position_ids: torch.Tensor | None = None, *, model: str,
                       dtype: torch.dtype, budget: int | None = None, extra: str | None = None) -> str:
    """The cache key of one preprocessed image: a 64-hex-digit blake2b-256 digest of

    * ``pixel_values``' values (row-major bytes), shape and dtype: the same image in a tensor of other
      strides or on another device gets the same key; one changed value, another shape or dtype
      another key;
    * ``position_ids`` the same way when given (Gemma 4's patch positions; any tensor that changes
      the tower's output, e.g. Llama 4's aspect ratio);
    * ``model``: the weights' identity (e.g. ``"google/gemma-4-e2b-it@<revision>"``), ``budget``:
      the soft-token budget (Gemma 4's ``max_soft_tokens``; None when the family has none),
      ``dtype``: the soft tokens' dtype, ``extra``: anything else that changes the output (an
      adapter's name); the same pixels under another of these miss.

    The digest is computed on the host: a CUDA tensor is copied to the CPU first, which waits for
    the device; hashing the processor's CPU output avoids that. Keys are stable across processes and
    runs on machines of the same byte order."""
    if not isinstance(model, str) or not model:
        raise TypeError(f"image_content_hash: `model` must be a non-empty str naming the weights, got {model!r}")
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"image_content_hash: `dtype` must be a torch.dtype (the soft tokens' dtype), got {dtype!r}")
    if budget is not None and (isinstance(budget, bool) or not isinstance(budget, int) or budget < 1):
        raise ValueError(f"image_content_hash: `budget` must be None or a positive int, got {budget!r}")
    if extra is not None and not isinstance(extra, str):
        raise TypeError(f"image_content_hash: `extra` must be None or a str, got {type(extra).__name__}")
    h = hashlib.blake2b(digest_size=32, person=_HASH_PERSON)
    _update_field(h, b"model", model.encode())
    _update_field(h, b"budget", b"" if budget is None else str(budget).encode())
    _update_field(h, b"dtype", str(dtype).encode())
    _update_field(h, b"extra", b"\x00" if extra is None else b"\x01" + extra.encode())
    _update_tensor(h, b"pixels", pixel_values, "pixel_values")
    if position_ids is not None:
        _update_tensor(h, b"positions", position_ids, "position_ids")
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------
# The cache
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class VisionEncoderCacheStats:
    """A snapshot of :meth:`VisionEncoderCache.stats`.

    Counters since construction (or :meth:`VisionEncoderCache.reset_stats`): ``hits`` / ``misses``
    (one of them per :meth:`~VisionEncoderCache.acquire`), ``inserts`` (entries stored),
    ``evictions`` (entries dropped for room), ``rejected`` (tensors larger than ``max_bytes`` on their
    own: returned, not kept), ``over_capacity_inserts`` (inserts that left ``bytes_in_use`` above
    ``max_bytes`` because held entries could not be evicted). State: ``entries``, ``held_entries``
    (referenced by a live request), ``requests`` (live requests holding references),
    ``bytes_in_use``, ``peak_bytes`` (the most ever held), ``max_bytes``."""

    hits: int
    misses: int
    inserts: int
    evictions: int
    rejected: int
    over_capacity_inserts: int
    entries: int
    held_entries: int
    requests: int
    bytes_in_use: int
    peak_bytes: int
    max_bytes: int

    @property
    def hit_rate(self) -> float:
        """hits / (hits + misses); 0.0 before the first acquire."""
        total = self.hits + self.misses
        return self.hits / total if total else 0.0


@dataclasses.dataclass
class _Entry:
    tensor: torch.Tensor
    nbytes: int
    refs: int = 0  # references of live requests (an acquire of the same key twice counts twice)


def _check_hashable(name: str, value: Any) -> None:
    if not isinstance(value, Hashable):
        raise TypeError(f"VisionEncoderCache: `{name}` must be hashable, got {type(value).__name__}")


def _check_max_bytes(max_bytes: Any) -> int:
    if isinstance(max_bytes, bool):
        raise TypeError(f"VisionEncoderCache: `max_bytes` must be an int (bytes), got {max_bytes!r}")
    try:
        value = operator.index(max_bytes)
    except TypeError:
        raise TypeError(f"VisionEncoderCache: `max_bytes` must be an int (bytes), got {type(max_bytes).__name__}") \
            from None
    if value < 0:
        raise ValueError(f"VisionEncoderCache: `max_bytes` must be >= 0, got {value}")
    return value


def _check_value(value: Any, where: str) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"VisionEncoderCache.{where}: the soft tokens must be a torch.Tensor, got {type(value).__name__}")
    if value.layout != torch.strided or value.is_nested:
        raise TypeError(f"VisionEncoderCache.{where}: the soft tokens must be a dense (strided) tensor, got layout "
                        f"{value.layout}")
    if value.device.type == "meta":
        raise ValueError(f"VisionEncoderCache.{where}: the soft tokens are on the meta device (no data to cache)")
    return value


def _owned_copy(value: torch.Tensor) -> torch.Tensor:
    """A compact copy with its own storage: a view of a batch's output must not keep the whole batch
    alive, and the caller may reuse its buffer (a CUDA graph's static output) afterwards."""
    return value.detach().clone(memory_format=torch.contiguous_format)


class VisionEncoderCache:
    """A reference-counted LRU of soft-token tensors, at most ``max_bytes`` of them not held by a request.

    Typical use in an engine, per image of a request::

        key = image_content_hash(pixels, positions, model=name, budget=560, dtype=torch.bfloat16)
        tokens = cache.acquire(request_id, key, lambda: encode(pixels, positions))
        ...                                   # when the request finishes (with or without images):
        cache.release(request_id)

    or, to encode a batch's misses together: ``acquire(request_id, key)`` returns None on a miss,
    the engine encodes the misses and :meth:`put` s each result (a view of the batch output is
    fine: the cache stores a compact copy).

    Semantics:

    * every :meth:`acquire` that returns a cached tensor, and every :meth:`put` that stores or finds
      one, adds one reference of the request to the entry and makes it the most recently used; :meth:`release` drops all of a
      request's references (releasing an unknown or already released request does nothing, as MAX's
      ``release``: engines release every finished request);
    * an entry with references is never evicted. To make room, entries without references go least
      recently used first; when held entries leave no room the new entry is stored anyway (the cache
      is over ``max_bytes``, counted in ``over_capacity_inserts``) and the excess is drained at the
      next :meth:`release` (or ``max_bytes`` change);
    * a tensor larger than ``max_bytes`` on its own is returned to the caller but not kept (counted
      in ``rejected``); ``max_bytes=0`` therefore disables caching;
    * entries are owned, compact copies (bytes = their own storage); the tensors handed out are
      shared by every request that hits: treat them as read-only;
    * with ``compute``, concurrent acquires of the same missing key run ``compute`` once: the others
      wait for it and hit (if it raises, the exception goes to its caller, and a waiter computes; so
      does a waiter when the result was too large to keep).
    """

    def __init__(self, max_bytes: int):
        self._max_bytes = _check_max_bytes(max_bytes)
        self._lock = threading.Lock()
        self._entries: OrderedDict[Hashable, _Entry] = OrderedDict()  # least recently used first
        self._requests: dict[Hashable, Counter] = {}  # request -> {key: references}
        self._pending: dict[Hashable, threading.Event] = {}  # keys being computed
        self._bytes = 0
        self._zero_counters()

    # -- reading ---------------------------------------------------------------------------
    @property
    def max_bytes(self) -> int:
        return self._max_bytes

    @max_bytes.setter
    def max_bytes(self, value: int) -> None:
        """A new capacity; unheld entries are evicted at once to fit it."""
        value = _check_max_bytes(value)
        with self._lock:
            self._max_bytes = value
            self._evict_to(value)

    @property
    def bytes_in_use(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: Hashable) -> bool:
        with self._lock:
            return key in self._entries

    def keys(self) -> list[Hashable]:
        """The cached keys, least recently used first."""
        with self._lock:
            return list(self._entries)

    def refcount(self, key: Hashable) -> int:
        """References live requests hold on ``key`` (0 when it is not cached)."""
        with self._lock:
            entry = self._entries.get(key)
            return 0 if entry is None else entry.refs

    def stats(self) -> VisionEncoderCacheStats:
        with self._lock:
            return VisionEncoderCacheStats(
                hits=self._hits, misses=self._misses, inserts=self._inserts, evictions=self._evictions,
                rejected=self._rejected, over_capacity_inserts=self._over_capacity, entries=len(self._entries),
                held_entries=sum(1 for e in self._entries.values() if e.refs), requests=len(self._requests),
                bytes_in_use=self._bytes, peak_bytes=self._peak, max_bytes=self._max_bytes)

    def reset_stats(self) -> None:
        """Zero the counters (``peak_bytes`` restarts from the bytes in use)."""
        with self._lock:
            self._zero_counters()

    def _zero_counters(self) -> None:
        self._hits = self._misses = self._inserts = self._evictions = self._rejected = self._over_capacity = 0
        self._peak = self._bytes

    def __repr__(self) -> str:
        return (f"VisionEncoderCache(max_bytes={self._max_bytes}, entries={len(self._entries)}, "
                f"bytes_in_use={self._bytes})")

    # -- requests --------------------------------------------------------------------------
    def acquire(self, request_id: Hashable, key: Hashable,
                compute: Callable[[], torch.Tensor] | None = None) -> torch.Tensor | None:
        """The soft tokens cached under ``key``, referenced for ``request_id`` (a hit). On a miss,
        ``compute()`` (when given) produces them: they are stored (see the class semantics) and
        returned; without ``compute`` a miss returns None and references nothing (encode, then
        :meth:`put`)."""
        _check_hashable("request_id", request_id)
        _check_hashable("key", key)
        if compute is not None and not callable(compute):
            raise TypeError(f"VisionEncoderCache.acquire: `compute` must be callable or None, got "
                            f"{type(compute).__name__}")
        while True:
            with self._lock:
                entry = self._entries.get(key)
                if entry is not None:
                    self._hits += 1
                    self._reference(request_id, key, entry)
                    return entry.tensor
                if compute is None:
                    self._misses += 1
                    return None
                event = self._pending.get(key)
                if event is None:  # this call computes
                    self._misses += 1
                    event = self._pending[key] = threading.Event()
                    break
            event.wait()  # another thread computes this key: look again when it is done
        try:
            value = _check_value(compute(), "acquire")
            return self._store(request_id, key, value)
        finally:
            with self._lock:
                del self._pending[key]
            event.set()

    def put(self, request_id: Hashable, key: Hashable, value: torch.Tensor) -> torch.Tensor:
        """Store ``value`` (a compact copy) under ``key``, referenced for ``request_id``, and return
        the tensor to use: the stored copy, the entry already cached under ``key`` (the first one
        stored wins), or ``value`` itself when it is larger than ``max_bytes`` (not kept)."""
        _check_hashable("request_id", request_id)
        _check_hashable("key", key)
        _check_value(value, "put")
        return self._store(request_id, key, value)

    def release(self, request_id: Hashable) -> int:
        """Drop every reference ``request_id`` holds, then evict unheld entries (least recently used
        first) until the cache is within ``max_bytes``. Returns the number of references dropped (0
        for a request that holds none: releasing it is a no-op)."""
        _check_hashable("request_id", request_id)
        with self._lock:
            held = self._requests.pop(request_id, None)
            if held is None:
                return 0
            for key, count in held.items():
                self._entries[key].refs -= count
            self._evict_to(self._max_bytes)
            return sum(held.values())

    def clear(self) -> None:
        """Drop every entry and every request's references (the counters stay; tensors already
        handed out stay valid for whoever holds them)."""
        with self._lock:
            self._entries.clear()
            self._requests.clear()
            self._bytes = 0

    # -- internals (called with the lock held, but _store) -----------------------------------
    def _reference(self, request_id: Hashable, key: Hashable, entry: _Entry) -> None:
        self._entries.move_to_end(key)
        entry.refs += 1
        self._requests.setdefault(request_id, Counter())[key] += 1

    def _store(self, request_id: Hashable, key: Hashable, value: torch.Tensor) -> torch.Tensor:
        nbytes = value.numel() * value.element_size()  # the owned copy's storage
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                self._reference(request_id, key, entry)
                return entry.tensor
            if nbytes > self._max_bytes:
                self._rejected += 1
                return value
        copy = _owned_copy(value)  # outside the lock: a large device copy
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:  # stored by another thread meanwhile
                self._reference(request_id, key, entry)
                return entry.tensor
            if nbytes > self._max_bytes:  # max_bytes shrank meanwhile
                self._rejected += 1
                return value
            self._evict_to(self._max_bytes - nbytes)
            entry = self._entries[key] = _Entry(copy, nbytes)
            self._bytes += nbytes
            self._inserts += 1
            if self._bytes > self._max_bytes:
                self._over_capacity += 1
            self._peak = max(self._peak, self._bytes)
            self._reference(request_id, key, entry)
            return copy

    def _evict_to(self, limit: int) -> None:
        """Evict unheld entries, least recently used first, until at most ``limit`` bytes are in use
        (or only held entries are left)."""
        victims, freed = [], 0
        for key, entry in self._entries.items():
            if self._bytes - freed <= limit:
                break
            if entry.refs == 0:
                victims.append(key)
                freed += entry.nbytes
        for key in victims:
            del self._entries[key]
        self._bytes -= freed
        self._evictions += len(victims)
