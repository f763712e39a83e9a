"""vitops.serving.VisionEncoderCache and image_content_hash: LRU order and reference counts against a
plain Python model of the rules (seeded random acquire / put / release sequences), eviction only of
unheld entries, the over-capacity drain, owned copies, key sensitivity and stability, threads, and a
real use with the Gemma 4 tower."""

from __future__ import annotations

import gc
import random
import threading
import time
import weakref
from collections import Counter

import numpy as np
import pytest
import torch

from vitops.serving import VisionEncoderCache, VisionEncoderCacheStats, image_content_hash


def tokens(value: float, nbytes: int) -> torch.Tensor:
    """A soft-token tensor of ``nbytes`` bytes (float32), every value ``value``."""
    return torch.full((nbytes // 4,), float(value))


# ---------------------------------------------------------------------------------------------
# The rules, as a plain model
# ---------------------------------------------------------------------------------------------
class CacheModel:
    """The documented semantics with lists and dicts: order = keys least recently used first."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.order: list = []
        self.size: dict = {}
        self.refs: Counter = Counter()
        self.held: dict = {}  # request -> Counter(key)
        self.counts = Counter()

    def bytes(self) -> int:
        return sum(self.size.values())

    def evict(self, limit: int) -> None:
        for key in list(self.order):
            if self.bytes() <= limit:
                return
            if self.refs[key] == 0:
                self.order.remove(key)
                del self.size[key]
                self.counts["evictions"] += 1

    def reference(self, request, key) -> None:
        self.order.remove(key)
        self.order.append(key)
        self.refs[key] += 1
        self.held.setdefault(request, Counter())[key] += 1

    def acquire(self, request, key, nbytes: int | None) -> str:
        """nbytes None: acquire without compute. Returns "hit", "miss" or "rejected"."""
        if key in self.size:
            self.counts["hits"] += 1
            self.reference(request, key)
            return "hit"
        self.counts["misses"] += 1
        if nbytes is None:
            return "miss"
        return self.store(request, key, nbytes)

    def store(self, request, key, nbytes: int) -> str:
        if key in self.size:
            self.reference(request, key)
            return "hit"
        if nbytes > self.max_bytes:
            self.counts["rejected"] += 1
            return "rejected"
        self.evict(self.max_bytes - nbytes)
        self.order.append(key)
        self.size[key] = nbytes
        self.counts["inserts"] += 1
        if self.bytes() > self.max_bytes:
            self.counts["over_capacity_inserts"] += 1
        self.reference(request, key)
        return "stored"

    def release(self, request) -> int:
        held = self.held.pop(request, Counter())
        for key, n in held.items():
            self.refs[key] -= n
        self.evict(self.max_bytes)
        return sum(held.values())


def check_against(cache: VisionEncoderCache, model: CacheModel) -> None:
    assert cache.keys() == model.order
    assert cache.bytes_in_use == model.bytes()
    assert len(cache) == len(model.order)
    stats = cache.stats()
    for name in ("hits", "misses", "inserts", "evictions", "rejected", "over_capacity_inserts"):
        assert getattr(stats, name) == model.counts[name], name
    assert stats.entries == len(model.order)
    assert stats.held_entries == sum(1 for k in model.order if model.refs[k])
    assert stats.requests == len(model.held)
    for key in model.order:
        assert cache.refcount(key) == model.refs[key]
        assert key in cache


@pytest.mark.parametrize("seed", range(12))
def test_random_sequences_follow_the_rules(seed):
    rng = random.Random(seed)
    max_bytes = rng.choice([0, 64, 400, 1000, 4000])
    cache, model = VisionEncoderCache(max_bytes), CacheModel(max_bytes)
    sizes = {f"img{i}": 4 * rng.randint(0, 150) for i in range(12)}
    requests = [f"req{i}" for i in range(6)]
    for _ in range(300):
        op = rng.random()
        request = rng.choice(requests)
        if op < 0.45:  # acquire with compute
            key = rng.choice(list(sizes))
            want = model.acquire(request, key, sizes[key])
            calls = []
            out = cache.acquire(request, key, lambda: calls.append(1) or tokens(hash(key) % 97, sizes[key]))
            assert len(calls) == (want != "hit")
            assert torch.equal(out, tokens(hash(key) % 97, sizes[key]))
            if want == "rejected":
                assert key not in cache
        elif op < 0.7:  # acquire without compute, then put on a miss (an engine batching its misses)
            key = rng.choice(list(sizes))
            want = model.acquire(request, key, None)
            out = cache.acquire(request, key)
            assert (out is None) == (want == "miss")
            if out is None:
                model.store(request, key, sizes[key])
                out = cache.put(request, key, tokens(hash(key) % 97, sizes[key]))
            assert torch.equal(out, tokens(hash(key) % 97, sizes[key]))
        elif op < 0.97:
            assert cache.release(request) == model.release(request)
        else:  # a capacity change drains at once
            max_bytes = rng.choice([0, 64, 400, 1000, 4000])
            cache.max_bytes = max_bytes
            model.max_bytes = max_bytes
            model.evict(max_bytes)
        check_against(cache, model)
        # over max_bytes only while every entry is held (what could be evicted, was)
        assert cache.bytes_in_use <= max_bytes or all(cache.refcount(k) for k in cache.keys())
    for request in requests:
        cache.release(request)
        model.release(request)
    check_against(cache, model)
    assert cache.bytes_in_use <= max_bytes


# ---------------------------------------------------------------------------------------------
# Reference counts, eviction, capacity
# ---------------------------------------------------------------------------------------------
def test_reference_counts_and_release():
    cache = VisionEncoderCache(10_000)
    a = cache.acquire("r1", "A", lambda: tokens(1, 400))
    assert cache.acquire("r1", "A") is a  # the same image twice in one request: two references
    assert cache.acquire("r2", "A") is a
    assert cache.refcount("A") == 3 and cache.refcount("missing") == 0
    assert cache.release("r1") == 2
    assert cache.refcount("A") == 1
    assert cache.release("r1") == 0  # already released: a no-op (MAX's release of any finished request)
    assert cache.release("never-seen") == 0
    assert cache.release("r2") == 1
    assert cache.refcount("A") == 0 and "A" in cache  # kept while it fits
    stats = cache.stats()
    assert (stats.hits, stats.misses, stats.inserts, stats.requests, stats.held_entries) == (2, 1, 1, 0, 0)
    assert stats.hit_rate == pytest.approx(2 / 3)
    assert isinstance(stats, VisionEncoderCacheStats)


def test_eviction_never_touches_held_entries_and_drains_on_release():
    cache = VisionEncoderCache(1000)
    for i in range(4):  # 4 x 400 bytes, all held: the cache goes over capacity instead of evicting
        cache.acquire(f"r{i}", f"k{i}", lambda: tokens(i, 400))
    stats = cache.stats()
    assert stats.entries == 4 and stats.bytes_in_use == 1600 and stats.evictions == 0
    assert stats.over_capacity_inserts == 2 and stats.peak_bytes == 1600
    cache.release("r3")  # k3 unheld: evicted; the held k0, k1, k2 stay (1200 bytes)
    assert cache.keys() == ["k0", "k1", "k2"] and cache.bytes_in_use == 1200
    cache.release("r1")  # k1 unheld: evicted (and nothing else is evictable)
    assert cache.keys() == ["k0", "k2"] and cache.bytes_in_use == 800
    cache.release("r0")
    assert cache.keys() == ["k0", "k2"]  # within max_bytes: nothing more to evict
    cache.acquire("r5", "k5", lambda: tokens(5, 400))  # needs room: the least recently used unheld goes
    assert cache.keys() == ["k2", "k5"] and cache.stats().evictions == 3  # k3, k1, k0


def test_lru_order_follows_use_not_release():
    cache = VisionEncoderCache(1200)
    for key in "ABC":
        cache.acquire("r", key, lambda: tokens(0, 400))
    cache.acquire("r2", "A")  # A becomes the most recently used
    cache.release("r")
    cache.release("r2")
    assert cache.keys() == ["B", "C", "A"]
    cache.acquire("r3", "D", lambda: tokens(0, 400))
    assert cache.keys() == ["C", "A", "D"]


def test_entries_larger_than_the_cache_are_returned_not_kept():
    cache = VisionEncoderCache(100)
    big = tokens(3, 400)
    out = cache.acquire("r", "big", lambda: big)
    assert out is big and "big" not in cache and cache.refcount("big") == 0
    assert cache.put("r", "big2", big) is big and "big2" not in cache
    assert cache.stats().rejected == 2 and cache.stats().requests == 0
    off = VisionEncoderCache(0)  # max_bytes=0 turns caching off
    assert torch.equal(off.acquire("r", "k", lambda: tokens(1, 4)), tokens(1, 4)) and len(off) == 0
    assert off.acquire("r", "k", lambda: torch.empty(0)).numel() == 0 and len(off) == 1  # 0 bytes fit


def test_max_bytes_change_drains_and_clear():
    cache = VisionEncoderCache(2000)
    for key in "ABCD":
        cache.acquire("r", key, lambda: tokens(0, 400))
    cache.acquire("held", "D")
    cache.release("r")
    cache.max_bytes = 500
    assert cache.keys() == ["D"] and cache.max_bytes == 500
    cache.max_bytes = 0
    assert cache.keys() == ["D"]  # held: stays
    before = cache.stats()
    cache.clear()
    assert len(cache) == 0 and cache.bytes_in_use == 0 and cache.stats().requests == 0
    assert cache.stats().inserts == before.inserts  # counters survive clear()
    assert cache.release("held") == 0
    cache.reset_stats()
    assert cache.stats() == VisionEncoderCacheStats(0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0)
    assert repr(cache) == "VisionEncoderCache(max_bytes=0, entries=0, bytes_in_use=0)"


def test_entries_are_owned_compact_copies():
    cache = VisionEncoderCache(1 << 20)
    batch = torch.randn(8, 16, 32)
    batch_storage = weakref.ref(batch.untyped_storage())
    row = cache.put("r", "img3", batch[3])
    assert row.untyped_storage().nbytes() == 16 * 32 * 4  # its own storage, not the batch's
    assert cache.bytes_in_use == 16 * 32 * 4
    expected = batch[3].clone()
    batch.zero_()  # the caller reuses its buffer (a CUDA graph's static output): the entry keeps its values
    assert torch.equal(row, expected)
    del batch
    gc.collect()
    assert batch_storage() is None  # the entry does not keep the batch alive
    strided = torch.randn(32, 16).t()  # non-contiguous
    out = cache.put("r", "t", strided)
    assert out.is_contiguous() and torch.equal(out, strided)
    grad = torch.randn(4, 8, requires_grad=True)
    assert not cache.acquire("r", "g", lambda: grad * 2).requires_grad
    assert cache.put("r2", "img3", torch.zeros(16, 32)) is row  # the first stored wins


def test_bad_input():
    with pytest.raises(ValueError, match="`max_bytes` must be >= 0, got -1"):
        VisionEncoderCache(-1)
    for bad in (1.5, "10", True, None):
        with pytest.raises(TypeError, match="`max_bytes` must be an int"):
            VisionEncoderCache(bad)
    assert VisionEncoderCache(np.int64(5)).max_bytes == 5
    cache = VisionEncoderCache(1000)
    with pytest.raises(ValueError, match="`max_bytes` must be >= 0"):
        cache.max_bytes = -5
    with pytest.raises(TypeError, match="must be a torch.Tensor, got list"):
        cache.put("r", "k", [1, 2])
    with pytest.raises(TypeError, match="must be a torch.Tensor, got ndarray"):
        cache.acquire("r", "k", lambda: np.zeros(3))
    assert "k" not in cache
    assert torch.equal(cache.acquire("r", "k", lambda: tokens(1, 8)), tokens(1, 8))  # not left pending
    with pytest.raises(TypeError, match="dense"):
        cache.put("r", "s", torch.eye(3).to_sparse())
    with pytest.raises(ValueError, match="meta device"):
        cache.put("r", "m", torch.empty(3, device="meta"))
    with pytest.raises(TypeError, match="`key` must be hashable, got list"):
        cache.acquire("r", ["k"])
    with pytest.raises(TypeError, match="`request_id` must be hashable, got dict"):
        cache.release({})
    with pytest.raises(TypeError, match="`compute` must be callable"):
        cache.acquire("r", "x", compute=tokens(1, 4))

    def failing():
        raise RuntimeError("encoder failed")

    with pytest.raises(RuntimeError, match="encoder failed"):
        cache.acquire("r", "f", failing)
    assert "f" not in cache and cache.acquire("r", "f", lambda: tokens(2, 4)) is not None


# ---------------------------------------------------------------------------------------------
# Keys
# ---------------------------------------------------------------------------------------------
def key_of(pixels, positions=None, **kw):
    args = dict(model="gemma-4-e2b", dtype=torch.bfloat16, budget=280)
    args.update(kw)
    return image_content_hash(pixels, positions, **args)


def test_hash_sensitivity():
    g = torch.Generator().manual_seed(0)
    pixels = torch.rand(2520, 48, generator=g)
    positions = torch.randint(0, 60, (2520, 2), generator=g)
    base = key_of(pixels, positions)
    assert isinstance(base, str) and len(base) == 64 and int(base, 16) >= 0
    changed = pixels.clone()
    changed[1234, 17] = torch.nextafter(changed[1234, 17], torch.tensor(2.0))  # one value, one ulp
    moved = positions.clone()
    moved[7, 0] += 1
    variants = [
        key_of(changed, positions),
        key_of(pixels, moved),
        key_of(pixels),  # without positions
        key_of(pixels.to(torch.float64), positions),  # the pixels' dtype
        key_of(pixels.reshape(1260, 96), positions),  # same bytes, another shape
        key_of(pixels, positions, model="gemma-4-e4b"),
        key_of(pixels, positions, budget=560),
        key_of(pixels, positions, budget=None),
        key_of(pixels, positions, dtype=torch.float16),
        key_of(pixels, positions, extra="lora:a"),
        key_of(pixels, positions.to(torch.int32)),
    ]
    assert len({base, *variants}) == len(variants) + 1


def test_hash_stability():
    g = torch.Generator().manual_seed(1)
    pixels = torch.rand(630, 48, generator=g)
    positions = torch.randint(0, 30, (630, 2), generator=g)
    base = key_of(pixels, positions)
    strided = torch.empty(48, 630).t()  # another layout, same values
    strided.copy_(pixels)
    assert not strided.is_contiguous()
    spread = torch.empty(630, 96)[:, ::2]
    spread.copy_(pixels)
    assert key_of(strided, positions) == key_of(spread, positions.clone()) == key_of(pixels.clone(), positions) == base
    assert key_of(pixels, positions) == base  # deterministic
    # bfloat16 pixels (Llama 4's processor output) and a conjugate view hash by value
    bf = pixels.to(torch.bfloat16)
    assert key_of(bf) == key_of(bf.clone()) != key_of(bf.to(torch.float32))
    z = torch.complex(pixels, pixels)
    assert key_of(z.conj()) == key_of(z.conj().resolve_conj())
    # a pinned key: the format is part of the contract (keys may be persisted or shared between processes)
    fixed = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    assert image_content_hash(fixed, model="m", dtype=torch.bfloat16) == (
        "2ec2389f6eb60ff12ebd23542086e2fb479ccebeb0d226e6f06013e84748a90b")


def test_hash_bad_input():
    x = torch.rand(4, 3)
    with pytest.raises(TypeError, match="`model` must be a non-empty str"):
        image_content_hash(x, dtype=torch.bfloat16, model="")
    with pytest.raises(TypeError, match="`dtype` must be a torch.dtype"):
        image_content_hash(x, model="m", dtype="bfloat16")
    with pytest.raises(ValueError, match="`budget` must be None or a positive int"):
        image_content_hash(x, model="m", dtype=torch.bfloat16, budget=0)
    with pytest.raises(TypeError, match="`pixel_values` must be a torch.Tensor"):
        image_content_hash(x.numpy(), model="m", dtype=torch.bfloat16)
    with pytest.raises(TypeError, match="`position_ids` must be a torch.Tensor"):
        image_content_hash(x, [1, 2], model="m", dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="meta device"):
        image_content_hash(x.to("meta"), model="m", dtype=torch.bfloat16)
    with pytest.raises(TypeError, match="dense"):
        image_content_hash(x.to_sparse(), model="m", dtype=torch.bfloat16)
    with pytest.raises(TypeError, match="`extra` must be None or a str"):
        image_content_hash(x, model="m", dtype=torch.bfloat16, extra=3)


@pytest.mark.cuda
def test_hash_of_a_cuda_tensor_equals_the_host_tensor():
    x = torch.rand(100, 48)
    assert key_of(x.cuda()) == key_of(x)
    cache = VisionEncoderCache(1 << 20)
    out = cache.put("r", "k", torch.rand(16, 8, device="cuda")[::2])
    assert out.is_cuda and out.is_contiguous() and cache.bytes_in_use == 8 * 8 * 4


# ---------------------------------------------------------------------------------------------
# Threads
# ---------------------------------------------------------------------------------------------
def test_concurrent_acquires_compute_once():
    cache = VisionEncoderCache(1 << 20)
    calls = []
    start = threading.Barrier(8)
    results = [None] * 8

    def compute():
        calls.append(1)
        time.sleep(0.05)
        return tokens(7, 64)

    def worker(i):
        start.wait()
        results[i] = cache.acquire(f"r{i}", "same", compute)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1
    assert all(r is results[0] for r in results)
    stats = cache.stats()
    assert (stats.misses, stats.hits, cache.refcount("same")) == (1, 7, 8)


def test_thread_safety_smoke():
    cache = VisionEncoderCache(3000)
    sizes = {f"k{i}": 4 * (20 + 17 * i) for i in range(10)}
    errors, acquires = [], Counter()

    def worker(seed):
        rng = random.Random(seed)
        try:
            for step in range(150):
                request = f"t{seed}-{step // 5}"
                key = rng.choice(list(sizes))
                out = None
                if rng.random() < 0.3:
                    out = cache.acquire(request, key)
                    acquires[seed] += 1
                if out is None:
                    out = cache.acquire(request, key, lambda: tokens(int(key[1:]), sizes[key]))
                    acquires[seed] += 1
                assert torch.equal(out, tokens(int(key[1:]), sizes[key]))
                assert cache.refcount(key) >= 1 or out.numel() * 4 > cache.max_bytes
                if step % 5 == 4:
                    cache.release(request)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(s,)) for s in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    stats = cache.stats()
    assert stats.hits + stats.misses == sum(acquires.values())
    assert stats.requests == 0 and stats.held_entries == 0
    assert cache.bytes_in_use == sum(sizes[k] for k in cache.keys()) <= cache.max_bytes


# ---------------------------------------------------------------------------------------------
# A real use: the Gemma 4 tower + projector behind the cache
# ---------------------------------------------------------------------------------------------
def test_gemma4_requests_share_an_encoded_image():
    from vitops.models.gemma4_vision import Gemma4VisionConfig, Gemma4VisionEncoderLayer, Gemma4VisionProjector
    from vitops.preprocess import Gemma4ImageProcessor

    config = Gemma4VisionConfig(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2, patch_size=4,
                                position_embedding_size=128, text_hidden_size=48)
    tower = Gemma4VisionEncoderLayer(config).eval()
    projector = Gemma4VisionProjector(config).eval()
    processor = Gemma4ImageProcessor(patch_size=4, pooling_kernel_size=3, max_soft_tokens=70)
    rng = np.random.default_rng(0)
    picture = rng.integers(0, 256, (50, 70, 3), dtype=np.uint8)
    other = rng.integers(0, 256, (50, 70, 3), dtype=np.uint8)
    encodes = []

    def encoder(batch, i):
        def encode():
            encodes.append(i)
            with torch.no_grad():
                out, mask = tower(batch.pixel_values[i:i + 1], image_position_ids=batch.pixel_position_ids[i:i + 1])
                return projector(out)[mask]  # [tokens of this image, text hidden]
        return encode

    cache = VisionEncoderCache(1 << 20)
    first = processor([picture, other])
    second = processor(picture.copy())  # the same picture, another array, another request

    def key(batch, i, budget=70):
        return image_content_hash(batch.pixel_values[i], batch.pixel_position_ids[i], model="tiny-gemma4",
                                  budget=budget, dtype=torch.float32)

    a = cache.acquire("req-1", key(first, 0), encoder(first, 0))
    b = cache.acquire("req-1", key(first, 1), encoder(first, 1))
    assert encodes == [0, 1]
    assert a.shape == (first.num_soft_tokens_per_image[0], 48) and not torch.equal(a, b)
    c = cache.acquire("req-2", key(second, 0), encoder(second, 0))
    assert c is a and encodes == [0, 1]  # a hit: the tower did not run
    assert torch.equal(c, encoder(second, 0)())  # and it is what encoding gives
    assert cache.stats().hits == 1 and cache.refcount(key(first, 0)) == 2
    assert key(second, 0, budget=140) not in cache  # another budget: another key
    cache.release("req-1")
    assert cache.refcount(key(first, 0)) == 1 and cache.refcount(key(first, 1)) == 0
    cache.release("req-2")
    assert cache.stats().held_entries == 0 and len(cache) == 2
