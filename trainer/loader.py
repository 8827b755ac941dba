"""Streams a store into training batches, replaying the exact views the teacher scored.

Each epoch picks one stored view k per image and renders it from the stored S x S image with the
shared renderer, at the student's resolution, on the training device; the batch carries that view's
teacher outputs. Order and view choice are a pure function of (seed, epoch), so a resumed run sees
the same batches as an uninterrupted one. Images stay in RAM when they fit; otherwise chunks are
streamed in a seeded order through a shuffle buffer of whole chunks (mix partners share a chunk).
"""
from __future__ import annotations

import functools
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from featurestore import views
from featurestore.schema import StoreError
from featurestore.store import Store

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class Batch:
    pixels: torch.Tensor              # (B, 3, R, R) float, normalised
    labels: torch.Tensor              # (B,) int64, the image's own label
    targets: torch.Tensor             # (B, C) float: label distribution after mixing
    logits: torch.Tensor | None       # (B, C) teacher logits of the rendered view
    pooled: torch.Tensor | None       # (B, D)
    patches: torch.Tensor | None      # (B, g, g, D)
    index: torch.Tensor               # (B,) store image index
    view: torch.Tensor                # (B,) store view index


class StoreData:
    """The arrays of a store a run needs, in RAM (`images` may stay on disk and stream)."""

    def __init__(self, path: str, head: str | None, need_pooled: bool, need_patches: bool,
                 ram_budget_gb: float = 8.0):
        self.store = Store.open(path)
        s = self.store
        if not s.complete:
            raise StoreError(f"{path} is not complete ({int(s.done().sum())}/{s.num_chunks} chunks); "
                             "finish it with the same `featurestore build` command first")
        if head is not None and head not in s.heads():
            raise StoreError(f"{path} has no {head!r} head; it has {s.heads()}")
        if need_patches and not s.attrs["patch_grid"]:
            raise StoreError(f"{path} stores no patch grid; rebuild with --patch-grid or set the patch loss weight to 0")
        self.classes, self.n, self.k = s.classes, s.num_images, s.views_per_image
        self.labels = s.read("labels").astype(np.int64)
        self.split = s.read("split")
        self.params = s.read("views/params")                                        # (N, K, P)
        self.logits = s.read(f"teacher/logits/{head}") if head else None            # (N, K, C)
        self.pooled = s.read("teacher/pooled") if need_pooled else None             # (N, K, D) fp16
        self.patches = s.read("teacher/patches") if need_patches else None          # (N, K, g, g, D)
        image_bytes = int(np.prod(s["images"].shape))
        self.in_memory = image_bytes <= ram_budget_gb * 1e9
        self.images = s.read("images") if self.in_memory else None                  # (N, S, S, 3) uint8
        self.chunk_size = s.chunk_size
        self.chunk_images = functools.lru_cache(maxsize=32)(self._read_chunk)

    def _read_chunk(self, c: int) -> np.ndarray:
        """Images of chunk c (chunk_size, S, S, 3), read whole from disk."""
        return self.store.read("images", *self.store.chunk_range(c))


class Loader:
    """Batches of rendered views for one epoch; `rank`/`world` give each process its share."""

    def __init__(self, data: StoreData, indices: np.ndarray, batch_size: int, size: int, seed: int,
                 device: torch.device, train: bool, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                 buffer_chunks: int = 8, rank: int = 0, world: int = 1, prefetch: int = 2, threads: int = 2):
        self.data, self.indices, self.batch_size, self.size = data, np.asarray(indices), batch_size, size
        self.seed, self.device, self.train = seed, device, train
        self.mean_std = (tuple(mean), tuple(std))
        self.buffer_chunks, self.rank, self.world, self.prefetch = buffer_chunks, rank, world, prefetch
        self.threads = threads

    def __len__(self) -> int:
        n = len(self.indices)
        return n // self.batch_size if self.train else -(-n // self.batch_size)

    def plan(self, epoch: int) -> list[tuple[np.ndarray, np.ndarray]]:
        """[(image indices, view indices)] per batch: a pure function of (seed, epoch)."""
        idx = self.indices
        if not self.train:
            return [(idx[s:s + self.batch_size], np.zeros(len(idx[s:s + self.batch_size]), np.int64))
                    for s in range(0, len(idx), self.batch_size)]
        rng = np.random.default_rng([self.seed, epoch])
        if self.data.in_memory:
            order = rng.permutation(idx)
        else:
            order = self._buffered_order(rng)
        chosen = np.random.default_rng([self.seed, epoch, 1]).integers(0, self.data.k, size=self.data.n)
        full = len(order) // self.batch_size * self.batch_size                 # drop the ragged tail
        return [(order[s:s + self.batch_size], chosen[order[s:s + self.batch_size]])
                for s in range(0, full, self.batch_size)]

    def _buffered_order(self, rng: np.random.Generator) -> np.ndarray:
        """Chunks in a seeded order, shuffled within windows of `buffer_chunks` whole chunks."""
        cs, wanted = self.data.chunk_size, np.zeros(self.data.n, bool)
        wanted[self.indices] = True
        chunks = rng.permutation(-(-self.data.n // cs))
        out = []
        for w in range(0, len(chunks), self.buffer_chunks):
            members = np.concatenate([np.arange(c * cs, min((c + 1) * cs, self.data.n)) for c in chunks[w:w + self.buffer_chunks]])
            out.append(rng.permutation(members[wanted[members]]))
        return np.concatenate(out) if out else np.zeros(0, np.int64)

    def epoch(self, epoch: int) -> Iterator[Batch]:
        """Batches rendered by `threads` threads, up to `prefetch` ahead, yielded in plan order."""
        plan = iter(self.plan(epoch))
        pending: deque[Future] = deque()
        with ThreadPoolExecutor(self.threads, thread_name_prefix="render") as pool:
            def submit():
                item = next(plan, None)
                if item is not None:
                    idx, vw = item
                    pending.append(pool.submit(self.make_batch, idx[self.rank::self.world], vw[self.rank::self.world]))
            try:
                for _ in range(self.threads + self.prefetch):
                    submit()
                while pending:
                    batch = pending.popleft().result()
                    submit()
                    yield batch
            finally:
                for f in pending:
                    f.cancel()

    def make_batch(self, idx: np.ndarray, vw: np.ndarray) -> Batch:
        d = self.data
        params = d.params[idx, vw]                                                  # (B, P)
        partner = params[:, views.COL["mix_partner"]].astype(np.int64)
        needed = np.unique(np.concatenate([idx, partner[partner >= 0]]))
        slot = {int(i): j for j, i in enumerate(needed)}
        if d.in_memory and self.device.type == "cpu":                               # zero-copy views
            sources = [torch.from_numpy(d.images[i]).permute(2, 0, 1) for i in needed]   # U x (3, S, S)
        else:
            sources = torch.from_numpy(self._images(needed)).to(self.device).permute(0, 3, 1, 2)  # (U, 3, S, S)
        src_index = torch.tensor([slot[int(i)] for i in idx])
        partner_index = torch.tensor([slot[int(p)] if p >= 0 else -1 for p in partner])
        x = views.render(sources, src_index, torch.from_numpy(params), self.size, "bilinear", partner_index,
                         self.mean_std[0], self.mean_std[1])                          # (B, 3, R, R) normalised
        labels = torch.from_numpy(d.labels[idx])
        c = len(d.classes)
        lam = torch.from_numpy(params[:, views.COL["mix_lambda"]]).float()
        targets = F.one_hot(labels, c).float() * lam[:, None]
        mixed = partner >= 0
        if mixed.any():
            other = torch.from_numpy(d.labels[partner[mixed]])
            targets[torch.from_numpy(mixed)] += F.one_hot(other, c).float() * (1 - lam[torch.from_numpy(mixed), None])

        def gather(arr):
            return None if arr is None else torch.from_numpy(np.asarray(arr[idx, vw], dtype=np.float32)).to(self.device)
        return Batch(x.contiguous(), labels.to(self.device), targets.to(self.device), gather(d.logits),
                     gather(d.pooled), gather(d.patches), torch.from_numpy(idx), torch.from_numpy(vw))

    def _images(self, needed: np.ndarray) -> np.ndarray:
        d = self.data
        if d.in_memory:
            return d.images[needed]
        # sorted indices -> contiguous reads of whole chunk ranges
        out = np.empty((len(needed),) + d.store["images"].shape[1:], np.uint8)
        cs = d.chunk_size
        for c in np.unique(needed // cs):
            sel = np.flatnonzero(needed // cs == c)
            block = d.chunk_images(int(c))
            out[sel] = block[needed[sel] - c * cs]
        return out
