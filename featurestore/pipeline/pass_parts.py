"""The teacher pass's moving parts: images decoded ahead by worker processes (`Decoded`), the clock
of each stage (`Stages`), a chunk's outputs on their way from the device (`ChunkOutputs`) and the
thread that checks and writes finished chunks (`ChunkWriter`). teacher_pass.py runs the pass with them.
"""
from __future__ import annotations

import queue
import threading
import time
from collections import defaultdict

import numpy as np
import torch
from torch.utils.data import DataLoader

from featurestore.common.children import mp_context, worker_init
from featurestore.pipeline.config import Decoding
from featurestore.pipeline.scan import decode_side, worker_deaths
from featurestore.pipeline.sources import DatasetError, DecodeSet
from featurestore.store.reader import StoreReader
from featurestore.store.writer import StoreWriter
from featurestore.teachers import Teacher


class Decoded:
    """(store index, {longest side: original uint8 (3, H, W)}, squashed (S, S, 3)) of `images`, in order,
    decoded by worker processes that start, and read ahead, as soon as this is made: a build makes it
    before it compiles the teachers, so that the pass does not open with a wait for the workers. Each
    teacher takes the original at `side_of(teacher)`."""

    def __init__(self, store: StoreReader, dec: Decoding, teachers: list[Teacher], images: list[int],
                 paths: list[str], shas: list[str]):
        s = store.attrs["image_size"]
        self.workers, self.size = dec.workers, s
        data = DecodeSet([(i, paths[i], shas[i]) for i in images], s, tuple(self.side_of(t) for t in teachers),
                         dec.min_side, dec.max_pixels)
        kw = ({"prefetch_factor": 8, "multiprocessing_context": mp_context(), "worker_init_fn": worker_init()}
              if dec.workers else {})
        pin = teachers[0].device.type == "cuda"              # copied to the GPU without blocking the loop
        with worker_deaths(dec.workers):
            self._items = iter(DataLoader(data, batch_size=None, num_workers=dec.workers, pin_memory=pin, **kw)
                               if images else ())

    def __iter__(self):
        with worker_deaths(self.workers):
            for i, orig, small, problem in self._items:
                if problem:
                    raise DatasetError(problem)
                yield i, orig, small

    def side_of(self, teacher: Teacher) -> int:
        return decode_side(teacher.pre.size, self.size)

    def close(self) -> None:
        """Stop the workers (also when the images were not all taken)."""
        self._items = iter(())


class Stages:
    """Seconds per stage of the pass. Device stages are timed by CUDA events, read once at the end, so
    timing them never stalls the loop; on a CPU they are the host's clock."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.seconds: dict[str, float] = defaultdict(float)
        self.events: list[tuple[str, object, object]] = []

    def mark(self):
        if self.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            return e
        return time.perf_counter()

    def add(self, name: str, start, end) -> None:
        if self.cuda and not isinstance(start, float):
            self.events.append((name, start, end))
        else:
            self.seconds[name] += end - start

    def host(self, name: str, since: float) -> None:
        self.seconds[name] += time.perf_counter() - since

    def result(self) -> dict[str, float]:
        if self.events:
            torch.cuda.synchronize()
            for name, a, b in self.events:
                self.seconds[name] += a.elapsed_time(b) / 1000
            self.events.clear()
        return {k: round(v, 3) for k, v in self.seconds.items()}


class ChunkOutputs:
    """A chunk's arrays, the teacher's still on their way from the device: the pinned host tensors
    its copies fill, and the event recorded after the last of them."""

    def __init__(self, arrays: dict[str, np.ndarray], copies: dict[str, torch.Tensor], shapes: dict[str, tuple],
                 event=None):
        self.host, self.copies, self.shapes, self.event = arrays, copies, shapes, event

    def arrays(self) -> dict[str, np.ndarray]:
        if self.event is not None:
            self.event.synchronize()
        return self.host | {k: v.numpy().reshape(self.shapes[k]) for k, v in self.copies.items()}


class ChunkWriter:
    """Writes finished chunks on a thread, then marks each done (for `teachers`, and for the store's images
    unless images is False); errors surface on the next call. guard: called before each chunk is written
    (the build's lock: raises if it was lost); check: called with each chunk's arrays before they are
    written (raises on outputs the store cannot keep)."""

    def __init__(self, store: StoreWriter, guard=None, check=None, stages: Stages | None = None,
                 teachers: list[str] | None = None, images: bool = True):
        self.store, self.q, self.error, self.guard, self.check = store, queue.Queue(maxsize=2), None, guard, check
        self.teachers, self.images = list(teachers or ()), images
        self.stages = stages
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        while (item := self.q.get()) is not None:
            c, outputs = item
            if self.error is not None:
                continue
            try:
                t0 = time.perf_counter()
                arrays = outputs.arrays() if isinstance(outputs, ChunkOutputs) else outputs
                t1 = time.perf_counter()
                if self.check is not None:
                    self.check(c, arrays)
                if self.guard is not None:
                    self.guard()
                a, _ = self.store.reader.chunk_range(c)
                for name, value in arrays.items():
                    self.store.write(name, a, value)
                self.store.flush()
                self.store.mark_done(c, teachers=self.teachers, images=self.images)
                self.store.flush()
                if self.stages is not None:
                    self.stages.seconds["writer: copy wait"] += t1 - t0
                    self.stages.host("writer: write", t1)
            except Exception as e:  # noqa: BLE001 - re-raised in the main thread
                self.error = e

    def put(self, c: int, arrays) -> None:
        """Queue chunk c's arrays (a dict, or ChunkOutputs still being copied)."""
        self._raise()
        self.q.put((c, arrays))

    def close(self, raise_error: bool = True) -> None:
        """Write what is queued, stop; re-raise a write error unless another error is on its way."""
        self.q.put(None)
        self.thread.join()
        if raise_error:
            self._raise()

    def _raise(self):
        if self.error is not None:
            raise self.error
