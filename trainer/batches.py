"""A training batch: the views the teacher scored, rendered again at the student's resolution, with
their teacher targets; and the three places a CPU or GPU can render them.

`parts()` gathers what a batch needs from the chunks that hold its images (labels, the mixed label
distribution, the stored teacher outputs of each view, and the render job: sources, view params,
partners); a renderer then fills its pixels:
- `InlineRenderer`: in the calling thread (a CPU that trains uses every core already);
- `ThreadRenderer`: on threads (a GPU: one transfer and batched kernels per batch);
- `ProcessRenderer`: in worker processes, one core each, outside this process's GIL (a CPU with cores
  to spare); the same renderer runs there, so a batch is the same bits wherever it is rendered.
"""
from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from featurestore import views
from featurestore.common.devices import Caps
from featurestore.views.batch_render import render_batch
from trainer.buffers import BufferPool
from trainer.data import Chunk, StoreData
from trainer.render_pool import RenderPool


@dataclass
class Batch:
    pixels: torch.Tensor | None       # (B, 3, R, R) float, normalised
    labels: torch.Tensor              # (B,) int64, the image's own label, -1 if it has none
    targets: torch.Tensor             # (B, C) float: label distribution after mixing (zeros if unlabelled)
    logits: torch.Tensor | None       # (B, C) teacher logits of the rendered view (the mean, over several)
    pooled: dict[str, torch.Tensor] | None    # teacher -> (B, D)
    patches: dict[str, torch.Tensor] | None   # teacher -> (B, g, g, d)
    index: torch.Tensor               # (B,) store image index
    view: torch.Tensor                # (B,) store view index
    _pool: BufferPool | None = field(default=None, repr=False)

    @property
    def labelled(self) -> torch.Tensor:
        return self.labels >= 0

    def release(self) -> None:
        """Done with this batch: its pixel buffer may hold the next batch. A batch never released is
        simply freed; its tensors are never written again."""
        if self._pool is not None:
            self._pool.give_back(self.pixels)
            self._pool, self.pixels = None, None


@dataclass
class RenderJob:
    sources: list[tuple[int, int]]    # (store chunk, row) of each source image
    index: torch.Tensor               # (B,) which source each view is cut from
    params: torch.Tensor              # (B, P) view params
    partner: torch.Tensor             # (B,) the source of each view's mix partner, -1 for none


def parts(data: StoreData, idx: np.ndarray, vw: np.ndarray, held: dict[int, Chunk],
          device: torch.device) -> tuple[Batch, RenderJob]:
    """A Batch without its pixels, and what rendering them takes."""
    cs = data.chunk_size
    params = data.params[idx, vw]                                               # (B, P)
    partner = params[:, views.COL["mix_partner"]].astype(np.int64)
    needed = np.unique(np.concatenate([idx, partner[partner >= 0]]))
    slot = {int(i): j for j, i in enumerate(needed)}
    job = RenderJob([(int(i) // cs, int(i) % cs) for i in needed], torch.tensor([slot[int(i)] for i in idx]),
                    torch.from_numpy(params), torch.tensor([slot[int(p)] if p >= 0 else -1 for p in partner]))
    labels = torch.from_numpy(data.labels[idx])
    targets = mixed_targets(labels, data.labels, partner, params[:, views.COL["mix_lambda"]], len(data.classes))

    def gather(key: str) -> np.ndarray:
        name = data.names[key]
        rows = np.stack([held[int(i) // cs].targets[name][int(i) % cs] for i in idx]).astype(np.float32)
        if key in data.stats:                                   # standardised per dimension, as the build measured
            mean, std = data.stats[key]
            rows = (rows - mean) / std
        return rows

    def by_teacher(kind: str) -> dict[str, torch.Tensor] | None:
        keys = [k for k in data.names if k.startswith(kind + ":")]
        return {k.split(":", 1)[1]: torch.from_numpy(gather(k)).to(device) for k in keys} or None
    kd = [k for k in data.names if k.startswith("logits:")]
    logits = None
    if kd:                                                      # (B, C): one teacher's, or the teachers' mean
        logits = torch.from_numpy(gather(kd[0]) if len(kd) == 1 else
                                  np.mean([gather(k) for k in kd], 0, dtype=np.float32)).to(device)
    batch = Batch(None, labels.to(device), targets.to(device), logits, by_teacher("pooled"), by_teacher("patches"),
                  torch.from_numpy(idx), torch.from_numpy(vw))
    return batch, job


def mixed_targets(labels: torch.Tensor, all_labels: np.ndarray, partner: np.ndarray, lam: np.ndarray,
                  c: int) -> torch.Tensor:
    """(B, C) label distribution of each view: lambda on its own label, 1 - lambda on the partner's;
    rows of unlabelled images are zero (they carry no label, mixed or not)."""
    lam = torch.from_numpy(lam).float()
    targets = F.one_hot(labels.clamp(min=0), c).float() * lam[:, None]
    mixed = torch.from_numpy(partner >= 0)
    if mixed.any():
        other = torch.from_numpy(all_labels[partner[partner >= 0]])
        targets[mixed] += F.one_hot(other.clamp(min=0), c).float() * (1 - lam[mixed, None])
    targets[labels < 0] = 0
    return targets


# ---- renderers: submit(job, chunks, out) -> a handle; wait(handle) ---------------------------------
class InlineRenderer:
    """Renders in the calling thread, at submit."""

    def __init__(self, size: int, mean: Sequence[float], std: Sequence[float], caps: Caps, device: torch.device):
        self.size, self.mean, self.std, self.caps, self.device = size, tuple(mean), tuple(std), caps, device

    def render(self, job: RenderJob, held: dict[int, Chunk], out: torch.Tensor) -> None:
        if self.caps.batched_kernels and all(held[c].on_device is not None for c, _ in job.sources):
            # gathered on the device from chunks copied there once each: no per-batch transfer
            src = torch.stack([held[c].on_device[r] for c, r in job.sources]).permute(0, 3, 1, 2)   # (U, 3, S, S)
        elif self.caps.batched_kernels:                                             # one transfer to the device
            images = [held[c].images[r] for c, r in job.sources]                    # U x (S, S, 3)
            src = torch.from_numpy(np.stack(images)).to(self.device).permute(0, 3, 1, 2)
        else:                                                                       # zero-copy views
            src = [torch.from_numpy(held[c].images[r]).permute(2, 0, 1) for c, r in job.sources]
        if self.caps.batched_kernels:                                               # the whole batch at once
            render_batch(src, job.index, job.params, self.size, job.partner, self.mean, self.std, out=out)
        else:
            views.render(src, job.index, job.params, self.size, "bilinear", job.partner, self.mean, self.std,
                         False, out=out)

    def submit(self, job: RenderJob, held: dict[int, Chunk], out: torch.Tensor):
        self.render(job, held, out)

    def wait(self, handle) -> None:
        pass

    def close(self) -> None:
        pass


class ThreadRenderer(InlineRenderer):
    """Renders on `threads` threads."""

    def __init__(self, threads: int, *args):
        super().__init__(*args)
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix="render")

    def submit(self, job: RenderJob, held: dict[int, Chunk], out: torch.Tensor) -> Future:
        return self.pool.submit(self.render, job, held, out)

    def wait(self, handle: Future) -> None:
        handle.result()

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


class ProcessRenderer:
    """Renders in worker processes, from the chunks' shared-memory images into a shared `out`."""

    def __init__(self, workers: int, size: int, mean: Sequence[float], std: Sequence[float]):
        self.pool = RenderPool(workers, size, mean, std)

    def submit(self, job: RenderJob, held: dict[int, Chunk], out: torch.Tensor) -> int:
        return self.pool.submit({c: ch.shared for c, ch in held.items()}, job.sources, job.index, job.params,
                                job.partner, out)

    def wait(self, handle: int) -> None:
        self.pool.wait(handle)

    def close(self) -> None:
        self.pool.close()
