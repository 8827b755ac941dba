"""Streams a store into training batches, replaying the exact views the teacher scored.

One epoch is one path: the plan (plan.py, a pure function of seed and epoch), the chunks it needs
read ahead on background threads (stream.py), and for each batch its parts gathered from the chunks
that hold it and its pixels rendered (batches.py) by one renderer chosen when the loader is made:
in the loop, on threads or in worker processes. Up to `depth` batches are in flight; they come out
in plan order. Validation reads the canonical views of the selected images alone (`eval_batches`).
"""
from __future__ import annotations

import contextlib
import os
import shutil
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from featurestore import views
from featurestore.common.devices import Caps, caps_of
from featurestore.common.log import logger
from trainer.batches import Batch, InlineRenderer, ProcessRenderer, ThreadRenderer, parts
from trainer.buffers import BufferPool
from trainer.data import Chunk, StoreData
from trainer.plan import EpochPlan, eval_plan, plan_epoch
from trainer.stream import ChunkStream, ReadAhead
from trainer.students import IMAGENET_MEAN, IMAGENET_STD

_SHM = "/dev/shm"


@dataclass
class LoaderConfig:
    batch_size: int
    size: int                                   # the student's input side R
    mean: tuple[float, ...] = IMAGENET_MEAN     # the student's normalisation
    std: tuple[float, ...] = IMAGENET_STD
    buffer_chunks: int = 8                      # shuffle window in whole chunks
    prefetch: int = 2                           # batches rendered ahead beyond one per render thread/process
    threads: int = 2                            # render threads (0: render in the calling thread)
    readers: int = 2                            # chunk-reading threads
    workers: int = 0                            # render worker processes (CPU training; 0: none)
    weights: np.ndarray | None = None           # (N,) class-balanced sampling weights (None: every image once)


class Loader:
    """Batches of rendered views of `indices`, for training (`epoch`) or validation (`eval_batches`);
    rank/world give each process its slice of every epoch."""

    def __init__(self, data: StoreData, indices: np.ndarray, seed: int, device: torch.device, cfg: LoaderConfig,
                 rank: int = 0, world: int = 1, caps: Caps | None = None):
        self.data, self.indices, self.seed, self.device, self.cfg = data, np.sort(indices), seed, device, cfg
        self.rank, self.world = rank, world
        self.caps = caps or caps_of(device)          # per-view loops on CPUs, batched kernels on GPUs
        workers = cfg.workers if not self.caps.batched_kernels else 0
        if workers and not _shared_memory_fits(self._shared_bytes(workers)):
            logger.warning(f"{_SHM} has too little free space for {self._shared_bytes(workers) / 1e6:.0f} MB of shared "
                           "buffers; rendering on threads instead of worker processes (enlarge it, e.g. "
                           "`docker run --shm-size`, to use them)")
            workers = 0
        self.workers = workers
        self.pixels = BufferPool(keep=12, shared=workers > 0)       # batch pixels (CPU)
        self.images = BufferPool(keep=3 * cfg.buffer_chunks + 2, shared=True)   # chunk images for the workers
        self._renderer = None
        self._ahead: ReadAhead | None = None

    # ---- how batches are rendered ------------------------------------------------------------
    def renderer(self):
        """One renderer for the loader's life: worker processes stay up across epochs."""
        if self._renderer is None:
            c = self.cfg
            local = (c.size, c.mean, c.std, self.caps, self.device)
            self._renderer = (ProcessRenderer(self.workers, c.size, c.mean, c.std) if self.workers else
                              ThreadRenderer(c.threads, *local) if c.threads else InlineRenderer(*local))
        return self._renderer

    @property
    def depth(self) -> int:
        """Batches in flight: one per render thread or process, plus `prefetch`; one when rendering inline."""
        c = self.cfg
        return (self.workers or c.threads) + c.prefetch if (self.workers or c.threads) else 1

    def _shared_bytes(self, workers: int) -> int:
        """Shared memory the render processes use at most: chunk images (two windows and the next
        epoch's first) and the batches in flight or held by the caller."""
        c, d = self.cfg, self.data
        batch = 4 * 3 * c.size * c.size * c.batch_size
        chunk = d.chunk_size * int(np.prod(d.image_shape))
        return (3 * c.buffer_chunks + 2) * chunk + (workers + c.prefetch + 12) * batch

    def close(self) -> None:
        """Stop the render threads or worker processes; a later epoch starts them again."""
        if self._renderer is not None:
            self._renderer.close()
            self._renderer = None

    def __del__(self):
        with contextlib.suppress(Exception):      # interpreter shutdown
            self.close()

    # ---- the plan ----------------------------------------------------------------------------
    def plan(self, epoch: int) -> EpochPlan:
        d, c = self.data, self.cfg
        return plan_epoch(self.indices, d.chunk_size, d.n, d.k, self.seed, epoch, c.batch_size, c.buffer_chunks,
                          self.rank, self.world, c.weights)

    def __len__(self) -> int:
        """Steps per epoch (the same on every rank and every epoch)."""
        return len(self.plan(0).batches)

    # ---- training epochs ---------------------------------------------------------------------
    def _read(self, plan: EpochPlan):
        """Store chunk -> its images (in shared memory for worker processes) and its planned view's targets."""
        d = self.data

        def read(c: int) -> Chunk:
            shared = None
            if self.workers:
                shared = self.images.take((d.chunk_rows(c),) + d.image_shape, torch.uint8)
            chunk = d.chunk(c, int(plan.chunk_view[c]), shared)
            if self.caps.batched_kernels:            # one copy per chunk, on the reading thread
                chunk.on_device = torch.from_numpy(chunk.images).to(self.device)
            return chunk
        return read

    def read_ahead(self, epoch: int) -> None:
        """Start reading the first window of `epoch`'s chunks now, on one background thread, so that
        the epoch does not open with a wait for its first window. Streaming only; an epoch other than
        `epoch` drops it."""
        if self.data.ram is not None or (self._ahead is not None and self._ahead.epoch == epoch):
            return
        plan = self.plan(epoch)
        first = plan.chunk_order(self.data.chunk_size)[:self.cfg.buffer_chunks]
        self._ahead = ReadAhead(self._read(plan), epoch, first)

    def epoch(self, epoch: int, ahead: bool = True) -> Iterator[Batch]:
        """The epoch's batches in plan order. ahead: once this epoch's chunks are all read, start
        reading the next epoch's first window."""
        plan, d = self.plan(epoch), self.data
        preloaded = self._ahead.take() if self._ahead is not None and self._ahead.epoch == epoch else {}
        self._ahead = None
        chunks = ChunkStream(self._read(plan), plan, d.chunk_size, self.cfg.buffer_chunks, self.cfg.readers, preloaded,
                             on_read_all=(lambda: self.read_ahead(epoch + 1)) if ahead else None,
                             on_free=lambda chunk: self.images.give_back(chunk.shared))
        renderer, pending = self.renderer(), deque()

        def ready(b: int) -> bool:
            return all(chunks.is_ready(int(c)) for c in plan.chunks_of(b, d.chunk_size))

        def start(b: int) -> tuple:
            idx, vw = plan.batches[b]
            held = {int(c): chunks.get(int(c)) for c in np.unique(idx // d.chunk_size)}
            try:
                batch, job = parts(d, idx, vw, held, self.device)
                batch.pixels = self.pixels.take((len(idx), 3, self.cfg.size, self.cfg.size), device=self.device)
                batch._pool = self.pixels
                return renderer.submit(job, held, batch.pixels), batch, list(held)
            except BaseException:
                for c in held:
                    chunks.release(c)
                raise

        def finish(item: tuple) -> Batch:
            handle, batch, held = item
            try:
                renderer.wait(handle)
            finally:
                for c in held:
                    chunks.release(c)
            return batch

        try:
            for b in range(len(plan.batches)):
                while pending and (len(pending) >= self.depth or not ready(b)):
                    yield finish(pending.popleft())      # never wait on a read while rendered batches wait
                pending.append(start(b))
            while pending:
                yield finish(pending.popleft())
        finally:
            for item in pending:                         # a renderer may still write into these buffers
                with contextlib.suppress(Exception):     # the epoch is being left; its error is on its way
                    finish(item)
            chunks.close()

    # ---- validation --------------------------------------------------------------------------
    def eval_batches(self) -> Iterator[Batch]:
        """Canonical views of the selected images (validation), in store order: reads only their images."""
        plan, d = eval_plan(self.indices, self.cfg.batch_size, self.data.num_chunks), self.data
        with ThreadPoolExecutor(1, thread_name_prefix="read") as pool:
            reads = deque(pool.submit(d.rows, idx) for idx, _ in plan.batches[:2])
            for b, (idx, vw) in enumerate(plan.batches):
                images = reads.popleft().result()
                if b + 2 < len(plan.batches):
                    reads.append(pool.submit(d.rows, plan.batches[b + 2][0]))
                sources = torch.from_numpy(images).to(self.device).permute(0, 3, 1, 2)
                x = views.render(sources, torch.arange(len(idx)), torch.from_numpy(d.params[idx, vw]), self.cfg.size,
                                 "bilinear", None, self.cfg.mean, self.cfg.std)
                labels = torch.from_numpy(d.labels[idx])
                yield Batch(x.contiguous(), labels.to(self.device),
                            F.one_hot(labels.clamp(min=0), len(d.classes)).float().to(self.device), None, None, None,
                            torch.from_numpy(idx), torch.from_numpy(vw))


def _shared_memory_fits(nbytes: int) -> bool:
    """Whether the shared-memory file system (where a container often allows only 64 MB) has room."""
    if not os.path.isdir(_SHM):
        return True                                 # another OS: its own shared memory, not a small mount
    return shutil.disk_usage(_SHM).free >= nbytes
