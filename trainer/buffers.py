"""Reused CPU tensors with explicit ownership: `take` hands one out, `give_back` returns it.

A batch of 64 views at 224 px is 38 MB: a fresh one comes from the OS page by page (glibc maps
allocations over 32 MB anew each time), which cost about a quarter of a CPU render. A buffer is handed
out again only after its holder gave it back (`Batch.release()`, a chunk's last use); one never given
back is simply freed by Python, so keeping a batch is always safe. Shared buffers live in shared
memory, for the render worker processes. On a GPU the caching allocator already reuses memory.
"""
from __future__ import annotations

import threading

import torch


class BufferPool:
    def __init__(self, keep: int = 12, shared: bool = False):
        self.keep, self.shared = keep, shared
        self.free: list[torch.Tensor] = []
        self.lock = threading.Lock()

    def take(self, shape: tuple[int, ...], dtype: torch.dtype = torch.float32,
             device: torch.device | None = None) -> torch.Tensor:
        if device is not None and device.type != "cpu":
            return torch.empty(shape, dtype=dtype, device=device)
        with self.lock:
            for i in reversed(range(len(self.free))):        # the most recently returned first: warm in cache
                buf = self.free[i]
                if tuple(buf.shape) == tuple(shape) and buf.dtype == dtype:
                    return self.free.pop(i)
        buf = torch.empty(shape, dtype=dtype)
        return buf.share_memory_() if self.shared else buf

    def give_back(self, buf: torch.Tensor | None) -> None:
        if buf is None or buf.device.type != "cpu":
            return
        with self.lock:
            if all(b is not buf for b in self.free):
                self.free.append(buf)
                del self.free[:-self.keep]                    # the oldest go
