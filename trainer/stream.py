"""Chunks read ahead of the batches that need them, on background threads.

`ChunkStream` reads the chunks an epoch's plan needs, in first-use order, on `readers` threads, and
holds at most the chunks live at any point of the plan (a window, or two where a batch straddles
windows): memory is bounded by the window whatever N, K, g and D are. A chunk is freed once its last
batch has been rendered. `ReadAhead` reads the first window of the next epoch while the current one
ends (a finite list, on one thread), so an epoch does not open with a wait.
"""
from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from trainer.data import Chunk
from trainer.plan import EpochPlan

Read = Callable[[int], Chunk]                 # store chunk -> its images and its planned view's targets


class ReadAhead:
    """Chunks of an epoch read on a background thread before the epoch starts."""

    def __init__(self, read: Read, epoch: int, chunks: list[int]):
        self.epoch, self.chunks = epoch, {}
        self.thread = threading.Thread(target=self._read, args=(read, chunks), name="chunk-ahead")
        self.thread.start()

    def _read(self, read: Read, chunks: list[int]) -> None:
        for c in chunks:
            try:
                self.chunks[c] = read(c)
            except BaseException:  # noqa: BLE001 - the epoch reads this chunk again and reports the error
                return

    def take(self) -> dict[int, Chunk]:
        self.thread.join()
        return self.chunks


class ChunkStream:
    """preloaded: chunks already read (by ReadAhead); on_read_all: called once every chunk is read;
    on_free: called with each chunk once its last batch is done (its buffers may be reused)."""

    def __init__(self, read: Read, plan: EpochPlan, chunk_size: int, buffer_chunks: int, readers: int,
                 preloaded: dict[int, Chunk] | None = None, on_read_all: Callable[[], None] | None = None,
                 on_free: Callable[[Chunk], None] | None = None):
        order, uses, first, last = plan.chunk_order(chunk_size), Counter(), {}, {}
        for b in range(len(plan.batches)):
            for c in plan.chunks_of(b, chunk_size).tolist():
                first.setdefault(c, b)
                uses[c] += 1
                last[c] = b
        live = np.zeros(len(plan.batches) + 1, np.int64)   # chunks first used at or before b, last at or after
        for c in order:
            live[first[c]] += 1
            live[last[c] + 1] -= 1
        self.limit = int(max(2 * buffer_chunks, np.cumsum(live).max(initial=0)))
        self.read, self.uses, self.on_free = read, uses, on_free
        self.loaded: dict[int, Chunk] = {}
        self.ready = {c: threading.Event() for c in order}
        self.room = threading.Semaphore(self.limit)
        self.lock, self.error, self.stopped = threading.Lock(), None, False
        preloaded = {c: ch for c, ch in (preloaded or {}).items() if c in self.ready}
        for c, chunk in preloaded.items():
            self.room.acquire()
            self.loaded[c] = chunk
            self.ready[c].set()
        self.todo = iter([c for c in order if c not in preloaded])
        self.on_read_all, self.readers_left = on_read_all, max(1, readers)
        self.pool = ThreadPoolExecutor(max(1, readers), thread_name_prefix="chunk-reader")
        for _ in range(max(1, readers)):
            self.pool.submit(self._read_loop)

    def _read_loop(self) -> None:
        while True:
            self.room.acquire()
            with self.lock:
                c = next(self.todo, None)
            if c is None or self.stopped:
                self.room.release()
                with self.lock:
                    self.readers_left -= 1
                    last = self.readers_left == 0 and not self.stopped and self.error is None
                if last and self.on_read_all is not None:
                    self.on_read_all()
                return
            try:
                chunk = self.read(c)
            except BaseException as e:  # noqa: BLE001 - surfaced to the training loop by get()
                self.error = e
                for ev in self.ready.values():
                    ev.set()
                return
            with self.lock:
                self.loaded[c] = chunk
            self.ready[c].set()

    def is_ready(self, c: int) -> bool:
        return self.ready[c].is_set()

    def get(self, c: int) -> Chunk:
        self.ready[c].wait()
        if self.error is not None:
            raise self.error
        return self.loaded[c]

    def release(self, c: int) -> None:
        with self.lock:
            self.uses[c] -= 1
            freed = self.loaded.pop(c) if self.uses[c] == 0 else None
        if freed is not None:
            if self.on_free is not None:
                self.on_free(freed)
            self.room.release()

    def close(self) -> None:
        self.stopped = True
        for _ in range(self.limit + 2):
            self.room.release()
        self.pool.shutdown(wait=True, cancel_futures=True)
