"""Peak memory of a computation, measured on the CPU: the largest total size of the tensor storages
that ops create and that are alive at the same time (a ``TorchDispatchMode`` records each new
storage an op returns and a ``weakref.finalize`` on it notes when it is freed)."""

from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class LiveTensorBytes(TorchDispatchMode):
    """``with LiveTensorBytes() as m: fn()`` -> ``m.peak``: the peak of the bytes held by storages
    created inside the block (inputs, weights and other storages made before it are not counted),
    ``m.live`` the bytes still held at the end, ``m.peak_owners`` (op name, bytes) of the storages
    alive at the peak, largest first.

    What it sees: every storage an op returns, i.e. what a caching allocator would hand out for
    tensors; scratch buffers a kernel allocates and frees inside itself (SDPA's per-thread blocks on
    the CPU, a vitops kernel's internal tables) are not visible here (``torch.cuda.max_memory_allocated``
    sees them on a GPU)."""

    def __init__(self, keep_owners: bool = True):
        super().__init__()
        self.live = 0
        self.peak = 0
        self.peak_owners: list[tuple[str, int]] = []
        self._owners: dict[int, tuple[str, int]] = {}
        self._keep_owners = keep_owners
        self._seen: set[int] = set()

    def _freed(self, key: int, nbytes: int) -> None:
        self.live -= nbytes
        self._owners.pop(key, None)
        self._seen.discard(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor) or t.device.type == "meta":
                continue
            storage = t.untyped_storage()
            key = id(storage)
            if key in self._seen:
                continue
            inputs = {id(a.untyped_storage()) for a in tree_flatten((args, kwargs))[0] if isinstance(a, torch.Tensor)}
            if key in inputs:
                continue  # in-place op or a view: not a new storage
            nbytes = storage.nbytes()
            self._seen.add(key)
            self.live += nbytes
            if self._keep_owners:
                self._owners[key] = (str(func), nbytes)
            weakref.finalize(storage, self._freed, key, nbytes)
            if self.live > self.peak:
                self.peak = self.live
                if self._keep_owners:
                    self.peak_owners = sorted(self._owners.values(), key=lambda o: -o[1])
        return out

