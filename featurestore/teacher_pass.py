"""Phase 3 of a build: the teacher over every view of this rank's unfinished chunks.

Images are decoded ahead in worker processes (the original for the teacher, the S x S squash for the
store); each chunk's K views are rendered on the teacher's device from the original at the teacher's
resolution, encoded in batches, pooled (and the patch grid reduced), and handed to a writer thread
that writes the chunk's arrays and then marks it done. Before the pass, when the store keeps the patch
grid at d < D dims, the PCA basis is fitted on the patch tokens of a sample of views.
"""
from __future__ import annotations

import queue
import sys
import threading

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from featurestore import views
from featurestore.config import BuildConfig
from featurestore.log import logger
from featurestore.options import ConfigError
from featurestore.pca import Moments, PatchBasis, fit_basis
from featurestore.ranks import Rank
from featurestore.reader import StoreReader
from featurestore.scan import decode_side, mp_context, worker_deaths
from featurestore.sources import DatasetError, DecodeSet
from featurestore.teacher import Teacher
from featurestore.writer import StoreWriter

PCA_KEYS = {"mean": "pca/patches/mean", "basis": "pca/patches/basis", "eigenvalues": "pca/patches/eigenvalues"}
PCA_VIEWS_PER_IMAGE = 4          # unmixed views of each sampled image whose patch tokens fit the basis


def decoded(store: StoreReader, cfg: BuildConfig, teacher: Teacher, images: list[int], paths: list[str],
            shas: list[str]):
    """(store index, original uint8 (3, H, W), squashed (S, S, 3)) of `images`, in order, decoded by workers."""
    s = store.attrs["image_size"]
    data = DecodeSet([(i, paths[i], shas[i]) for i in images], s, decode_side(teacher.pre.size, s),
                     cfg.min_side, cfg.max_pixels)
    kw = {"prefetch_factor": 8, "multiprocessing_context": mp_context()} if cfg.workers else {}
    with worker_deaths(cfg.workers):
        for i, orig, small, problem in DataLoader(data, batch_size=None, num_workers=cfg.workers, **kw):
            if problem:
                raise DatasetError(problem)
            yield i, orig, small


class ChunkWriter:
    """Writes finished chunks on a thread, then marks each done; errors surface on the next call.
    guard: called before each chunk is written (the build's lock: raises if it was lost)."""

    def __init__(self, store: StoreWriter, guard=None):
        self.store, self.q, self.error, self.guard = store, queue.Queue(maxsize=2), None, guard
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        while (item := self.q.get()) is not None:
            c, arrays = item
            if self.error is not None:
                continue
            try:
                if self.guard is not None:
                    self.guard()
                a, _ = self.store.reader.chunk_range(c)
                for name, value in arrays.items():
                    self.store.write(name, a, value)
                self.store.flush()
                self.store.mark_done(c)
                self.store.flush()
            except Exception as e:  # noqa: BLE001 - re-raised in the main thread
                self.error = e

    def put(self, c: int, arrays: dict[str, np.ndarray]) -> None:
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


def batch_size(cfg: BuildConfig, teacher: Teacher) -> int:
    return cfg.teacher.batch_size or (64 if teacher.device.type == "cuda" else 16)


def teacher_pass(store: StoreWriter, teacher: Teacher, cfg: BuildConfig, rank: Rank, paths: list[str],
                 shas: list[str], basis: PatchBasis | None, guard=None) -> int:
    """Run the teacher over this rank's unfinished chunks; returns the number of views computed.
    guard: checks before each chunk's writes that this build still holds its lock."""
    r = store.reader
    done = r.done()
    mine = [c for c in range(r.num_chunks) if rank.owns(c) and not done[c]]
    k, g = r.views_per_image, r.attrs["patch_grid"]

    def views_in(chunks) -> int:
        return k * sum(b - a for a, b in map(r.chunk_range, chunks))
    total_views = views_in(c for c in range(r.num_chunks) if rank.owns(c))
    left_views = views_in(mine)
    logger.info(f"{rank.prefix}teacher pass over {len(mine)} chunk(s), {left_views} views, on {teacher.device}")
    if not mine:
        return 0
    loader = decoded(r, cfg, teacher, [i for c in mine for i in range(*r.chunk_range(c))], paths, shas)
    bar = tqdm(total=total_views, initial=total_views - left_views, unit="view", desc=f"teacher r{rank.rank}",
               position=rank.rank, disable=None, file=sys.stderr, smoothing=0.1)
    writer = ChunkWriter(store, guard)
    pending = iter(mine)
    c = next(pending)
    a, b = r.chunk_range(c)
    got: list = []
    try:
        for _, orig, small in loader:
            got.append((orig, small))
            if len(got) < b - a:
                continue
            writer.put(c, run_chunk(r, teacher, c, got, batch_size(cfg, teacher), g, basis, bar))
            got = []
            c = next(pending, None)
            if c is not None:
                a, b = r.chunk_range(c)
    finally:
        bar.close()
        writer.close(raise_error=sys.exc_info()[0] is None)
    return left_views


def run_chunk(store: StoreReader, teacher: Teacher, c: int, got, batch: int, g: int, basis,
              bar) -> dict[str, np.ndarray]:
    """The teacher's outputs on every view of store chunk c (its decoded images in `got`)."""
    a, b = store.chunk_range(c)
    n, k = b - a, store.views_per_image
    sources = [orig.to(teacher.device) for orig, _ in got]
    params = torch.from_numpy(store.read("views/params", a, b)).reshape(n * k, -1)      # (n*K, P)
    index = torch.arange(n).repeat_interleave(k)                                          # (n*K,)
    partner = params[:, views.COL["mix_partner"]].long()
    partner = torch.where(partner >= 0, partner - a, partner)
    pooled, patches = [], []
    for s in range(0, n * k, batch):
        sl = slice(s, min(s + batch, n * k))
        pix = teacher.render(sources, index[sl], params[sl], partner[sl])
        p, q = teacher.encode(pix, g)                                      # (B, D), (B, g, g, D) float32
        pooled.append(p.to(torch.float16).cpu())                           # stored dtype, cast on device
        if q is not None:
            q = basis.project(q) if basis is not None else q               # (B, g, g, d)
            patches.append(q.to(torch.float16).cpu())
        bar.update(sl.stop - sl.start)
    out = {"images": np.stack([s.numpy() for _, s in got]),
           "teacher/pooled": torch.cat(pooled).reshape(n, k, -1).numpy()}
    if g:
        out["teacher/patches"] = torch.cat(patches).reshape(n, k, g, g, -1).numpy()
    return out


# ---- before the pass: the patch basis ---------------------------------------------------------
def fit_patch_basis(store: StoreReader, teacher: Teacher, cfg: BuildConfig, paths: list[str],
                    shas: list[str]) -> PatchBasis:
    """PCA of the g x g patch tokens of up to 4 unmixed views of the first `pca_images` store images
    (the store order is a seeded permutation, so these are a random sample)."""
    g, dim = store.attrs["patch_grid"], cfg.store.patch_dim
    m = min(cfg.store.pca_images, store.num_images)
    params = store.read("views/params", 0, m)                                              # (m, K, P)
    batch = batch_size(cfg, teacher)
    moments, queued = Moments(store.attrs["embed_dim"]), []
    logger.info(f"fitting the patch basis (d = {dim}) on views of {m} images")

    def flush():
        srcs = [s for s, _ in queued]
        pix = teacher.render(srcs, torch.arange(len(srcs)), torch.from_numpy(np.stack([p for _, p in queued])))
        moments.add(teacher.encode(pix, g)[1])                                             # (B, g, g, D)
        queued.clear()
    for i, orig, _ in decoded(store, cfg, teacher, list(range(m)), paths, shas):
        unmixed = np.flatnonzero(params[i, :, views.COL["mix_mode"]] == views.MIX_NONE)[:PCA_VIEWS_PER_IMAGE]
        queued += [(orig.to(teacher.device), params[i, k]) for k in unmixed]
        if len(queued) >= batch:
            flush()
    if queued:
        flush()
    if dim > moments.n:
        raise ConfigError(f"store.patch_dim {dim} exceeds the {moments.n} patch tokens sampled; raise "
                          "store.pca_images or lower the dimension")
    return fit_basis(moments, dim)


def store_basis(store: StoreWriter, basis: PatchBasis) -> None:
    for name, key in PCA_KEYS.items():
        store.write_small(key, getattr(basis, name))
    store.set_attrs({"patch_variance_kept": basis.variance_kept, "patch_basis_fitted": True})


def load_basis(store: StoreReader) -> PatchBasis:
    return PatchBasis(**{name: store.small(key) for name, key in PCA_KEYS.items()})
