"""Worker processes that render CPU batches, each on one core, outside the training process's GIL.

The training process reads the store and plans every batch; a worker receives the batch's source
images (shared-memory tensors: a store chunk's images, mapped, not copied), its view params and a
shared output tensor, and renders the views into it with the same renderer as everywhere else, so a
batch is the same bytes whichever process renders it. Shared tensors are reused buffers: each is
sent to a worker once and named by a key afterwards (sending one costs a file-descriptor exchange
with this process, and mapping it anew, page faults on every touch), and forgotten there once this
process has dropped it. Workers start once per Loader and stay up across epochs; a worker that dies
or fails stops the epoch with its error.
"""
from __future__ import annotations

import contextlib
import itertools
import os
import queue
import traceback
import weakref
from collections.abc import Sequence

import torch
import torch.multiprocessing as mp

from featurestore import views
from featurestore.common.children import end_with
from featurestore.common.errors import KdstoreError


class RenderWorkerError(KdstoreError, RuntimeError):
    """A render worker failed or died; the message carries its error."""


def _work(tasks, results, size: int, mean: Sequence[float], std: Sequence[float], parent_pid: int) -> None:
    end_with(parent_pid)                           # a killed training process takes its workers with it
    torch.set_num_threads(1)                       # one core each: the workers are the parallelism
    known: dict[int, torch.Tensor] = {}            # shared buffers by key, mapped once
    parent = mp.parent_process()
    while True:
        try:
            task = tasks.get(timeout=2.0)
        except queue.Empty:
            if parent is not None and not parent.is_alive():
                return                             # the training process was killed: no orphans
            continue
        if task is None:
            return
        job, (lo, hi), forget, images, sources, index, params, partner, out = task
        for key in forget:
            known.pop(key, None)
        try:
            for key, t in [out, *images.values()]:
                if t is not None:
                    known[key] = t
            chunk = {c: known[key] for c, (key, _) in images.items()}
            src = [chunk[c][r].permute(2, 0, 1) for c, r in sources]               # (3, S, S) uint8 views
            views.render(src, index[lo:hi], params[lo:hi], size, "bilinear", partner[lo:hi], mean, std,
                         batched=False, out=known[out[0]][lo:hi])
            results.put((job, None))
        except BaseException:  # noqa: BLE001 - reported to the training process, which raises it
            results.put((job, traceback.format_exc(limit=6)))
        del task, images, out


_keys = itertools.count()


def _key(t: torch.Tensor) -> int:
    """A key for a shared buffer, unique for the life of this process (ids are reused, keys are not)."""
    key = getattr(t, "_render_key", None)
    if key is None:
        key = t._render_key = next(_keys)
    return key


def _handle(sent: dict[int, weakref.ref], t: torch.Tensor) -> tuple[int, torch.Tensor | None]:
    """(key, tensor) the first time a worker gets buffer t, (key, None) after (it keeps the mapping)."""
    key = _key(t)
    if key in sent:
        return key, None
    sent[key] = weakref.ref(t)
    return key, t


class RenderPool:
    """`workers` processes rendering (V, 3, size, size) float views into shared tensors."""

    def __init__(self, workers: int, size: int, mean: Sequence[float], std: Sequence[float]):
        ctx = mp.get_context("spawn")                # no fork: the parent runs threads (readers, BLAS)
        self.tasks, self.results = [ctx.Queue() for _ in range(workers)], ctx.Queue()
        self.procs = [ctx.Process(target=_work, args=(q, self.results, size, tuple(mean), tuple(std), os.getpid()),
                                  name=f"kdstore-render-{i}", daemon=True) for i, q in enumerate(self.tasks)]
        for p in self.procs:
            p.start()
        self.next_job = 0
        self.waiting: dict[int, int] = {}           # job -> parts not yet rendered
        self.errors: dict[int, str] = {}
        self.sent: list[dict[int, weakref.ref]] = [{} for _ in range(workers)]   # per worker: key -> buffer

    @property
    def workers(self) -> int:
        return len(self.procs)

    def submit(self, images: dict[int, torch.Tensor], sources: list[tuple[int, int]], index: torch.Tensor,
               params: torch.Tensor, partner: torch.Tensor, out: torch.Tensor) -> int:
        """Render views of sources (chunk, row) of images {chunk: shared (n, S, S, 3) uint8} into out
        (a shared float tensor); returns the job's number for wait(). The views are split in one
        contiguous part per worker: a batch is ready sooner, and no worker idles while another
        finishes a whole batch (at the end of an epoch, say). Each view renders alone: the same bits."""
        job, self.next_job = self.next_job, self.next_job + 1
        v, n = len(index), len(self.procs)
        cuts = [round(i * v / n) for i in range(n + 1)]
        parts = [(w, (lo, hi)) for w, (lo, hi) in enumerate(zip(cuts, cuts[1:])) if hi > lo]
        self.waiting[job] = len(parts)
        for w, span in parts:
            sent = self.sent[w]
            forget = [key for key, ref in sent.items() if ref() is None]       # dropped here: unmap there
            for key in forget:
                del sent[key]
            self.tasks[w].put((job, span, forget, {c: _handle(sent, t) for c, t in images.items()}, sources, index,
                               params, partner, _handle(sent, out)))
        return job

    def wait(self, job: int) -> None:
        """Block until `job` is rendered; raise RenderWorkerError if it failed or a worker died."""
        while self.waiting.get(job, 0) > 0:
            try:
                done, error = self.results.get(timeout=1.0)
            except queue.Empty:
                dead = [p for p in self.procs if not p.is_alive()]
                if dead:
                    raise RenderWorkerError(f"render worker {dead[0].name} died (exit code {dead[0].exitcode}); "
                                            "the epoch stopped with no batch lost before it") from None
                continue
            self.waiting[done] -= 1
            if error is not None:
                self.errors.setdefault(done, error)
        self.waiting.pop(job, None)
        error = self.errors.pop(job, None)
        if error is not None:
            raise RenderWorkerError(f"a render worker failed:\n{error}")

    def close(self) -> None:
        for q in self.tasks:
            with contextlib.suppress(ValueError, OSError):
                q.put(None)
        for p in self.procs:
            p.join(timeout=5)
            if p.is_alive():
                p.terminate()
        self.procs = []
