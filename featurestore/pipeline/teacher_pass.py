"""Phase 3 of a build: the teacher over every view of this rank's unfinished chunks.

Images are decoded ahead in worker processes (the original for the teacher, the S x S squash for the
store); each chunk's K views are rendered on the teacher's device from the original at the teacher's
resolution, encoded in batches, pooled (and the patch grid reduced), and handed to a writer thread
that writes the chunk's arrays and then marks it done. Before the pass, when the store keeps the patch
grid at d < D dims, the PCA basis is fitted on the patch tokens of a sample of views.

On a GPU nothing in the loop waits for the device: sources arrive in pinned memory and are copied
without blocking, each batch's outputs are copied into pinned host buffers as the device reaches them,
and the writer thread waits for a chunk's copies; the loop meanwhile queues the next chunk's work.
Each stage's time is kept (`Stages`): the decoding wait, render and teacher (device time on a GPU),
the writer wait, and the writer's own copy wait and writes. The parts it runs with are in pass_parts.py.
"""
from __future__ import annotations

import sys
import time

import numpy as np
import torch
from tqdm import tqdm

from featurestore import views
from featurestore.common.log import logger
from featurestore.common.options import ConfigError
from featurestore.common.ranks import Rank
from featurestore.pipeline.config import Decoding, TeacherConfig
from featurestore.pipeline.pass_parts import ChunkOutputs, ChunkWriter, Decoded, Stages
from featurestore.pipeline.pca import Moments, PatchBasis, fit_basis
from featurestore.store.reader import StoreReader
from featurestore.store.schema import PCA_ARRAYS
from featurestore.store.writer import StoreWriter
from featurestore.teachers import Teacher, TeacherError

PCA_VIEWS_PER_IMAGE = 4          # unmixed views of each sampled image whose patch tokens fit the basis


def pending_chunks(store: StoreReader, rank: Rank, teachers: list[str], images: bool = True) -> list[int]:
    """This rank's chunks not yet done: their images (images True) or any of these teachers' outputs."""
    done = np.ones(store.num_chunks, bool)
    for name in teachers:
        if store.teacher(name).done is not None:
            done &= store.done(name)
    if images or any(store.teacher(name).done is None for name in teachers):
        done &= store.done()
    return [c for c in range(store.num_chunks) if rank.owns(c) and not done[c]]


def images_of(store: StoreReader, chunks: list[int]) -> list[int]:
    return [i for c in chunks for i in range(*store.chunk_range(c))]


def batch_size(tcfg: TeacherConfig, teacher: Teacher) -> int:
    """Views per forward: the batch prepare_teacher fixed (the configured one, else 16)."""
    return teacher.batch or tcfg.batch_size or 16


def prepare_teacher(teacher: Teacher, tcfg: TeacherConfig, chunk_views: int, patch_grid: int) -> None:
    """Fix the teacher's batch (the configured one, or auto) and, on CUDA unless --no-compile, compile
    the tower for it."""
    cuda = teacher.device.type == "cuda"
    batch = tcfg.batch_size or (auto_batch(teacher, chunk_views, patch_grid) if cuda else 16)
    teacher.prepare(batch, compiled=tcfg.compile and cuda)
    logger.info(f"teacher batch {batch}" + (" (auto)" if not tcfg.batch_size else "")
                + (", tower compiled" if teacher.compiled else ""))


def auto_batch(teacher: Teacher, chunk_views: int, patch_grid: int = 0, top: int = 256) -> int:
    """The largest power of two up to `top` (and up to a chunk's views: a batch never spans chunks)
    whose forward fits in half the device's free memory, from the peak memory of an 8-view forward."""
    dev, probe = teacher.device, 8
    torch.cuda.synchronize(dev)
    torch.cuda.reset_peak_memory_stats(dev)
    base = torch.cuda.memory_allocated(dev)
    teacher.encode(torch.zeros(probe, 3, teacher.pre.size, teacher.pre.size, device=dev), patch_grid, check=False)
    torch.cuda.synchronize(dev)
    per_view = max(1, torch.cuda.max_memory_allocated(dev) - base) / probe
    free, _ = torch.cuda.mem_get_info(dev)
    return pick_batch(per_view, free, chunk_views, top)


def pick_batch(per_view_bytes: float, free_bytes: float, chunk_views: int, top: int = 256) -> int:
    b = top
    while b > 1 and (b * per_view_bytes > free_bytes / 2 or b > chunk_views):
        b //= 2
    return b


def finite_outputs(teacher: Teacher):
    """The writer's check: every stored teacher output finite (float16 keeps up to 65504)."""
    def check(c: int, arrays: dict[str, np.ndarray]) -> None:
        for name, value in arrays.items():
            if name != "images" and not np.isfinite(value).all():
                raise TeacherError(f"{name} of chunk {c}: {teacher.overflow_message()}")
    return check


def teacher_pass(store: StoreWriter, teachers: dict[str, Teacher], tcfg: TeacherConfig, rank: Rank, mine: list[int],
                 images: Decoded, bases: dict[str, PatchBasis | None], write_images: bool = True,
                 guard=None) -> tuple[int, dict[str, float]]:
    """Run the teachers over `mine`, this rank's unfinished chunks, whose images `images` decodes;
    returns the number of views computed (of each teacher) and the seconds of each stage. write_images:
    the store's images are written too (not when a teacher is added). guard: checks before each chunk's
    writes that this build still holds its lock."""
    r = store.reader
    k, g = r.views_per_image, r.attrs["patch_grid"]
    teacher = next(iter(teachers.values()))

    def views_in(chunks) -> int:
        return k * sum(b - a for a, b in map(r.chunk_range, chunks))
    total_views = len(teachers) * views_in(c for c in range(r.num_chunks) if rank.owns(c))
    left_views = len(teachers) * views_in(mine)
    logger.info(f"{rank.prefix}teacher pass over {len(mine)} chunk(s), {left_views} views "
                f"({', '.join(teachers)}), on {teacher.device}")
    stages = Stages(teacher.device)
    if not mine:
        return 0, {}
    bar = tqdm(total=total_views, initial=total_views - left_views, unit="view", desc=f"teacher r{rank.rank}",
               position=rank.rank, disable=None, file=sys.stderr, smoothing=0.1)
    writer = ChunkWriter(store, guard, finite_outputs(teacher), stages, list(teachers), write_images)
    pending = iter(mine)
    c = next(pending)
    a, b = r.chunk_range(c)
    got: list = []
    try:
        t0 = time.perf_counter()
        for _, orig, small in images:
            stages.host("decode wait", t0)
            got.append((orig, small))
            if len(got) < b - a:
                t0 = time.perf_counter()
                continue
            outputs = run_chunk(r, teachers, c, got, tcfg, g, bases, images, bar, stages, write_images)
            t0 = time.perf_counter()
            writer.put(c, outputs)
            stages.host("writer wait", t0)
            got = []
            c = next(pending, None)
            if c is not None:
                a, b = r.chunk_range(c)
            t0 = time.perf_counter()
    finally:
        bar.close()
        writer.close(raise_error=sys.exc_info()[0] is None)
    return left_views, stages.result()


def run_chunk(store: StoreReader, teachers: dict[str, Teacher], c: int, got, tcfg: TeacherConfig, g: int,
              bases: dict[str, PatchBasis | None], decoded: Decoded, bar, stages: Stages | None = None,
              write_images: bool = True) -> ChunkOutputs:
    """Each teacher's outputs on every view of store chunk c (its decoded images in `got`), in the same
    batches whatever the other teachers, cast to the stored float16 on the device and copied into host
    buffers as each batch finishes."""
    first = next(iter(teachers.values()))
    stages = stages or Stages(first.device)
    a, b = store.chunk_range(c)
    n, k = b - a, store.views_per_image
    cuda = first.device.type == "cuda"
    params = torch.from_numpy(store.read("views/params", a, b)).reshape(n * k, -1)      # (n*K, P)
    index = torch.arange(n).repeat_interleave(k)                                          # (n*K,)
    partner = params[:, views.COL["mix_partner"]].long()
    partner = torch.where(partner >= 0, partner - a, partner)
    copies: dict[str, torch.Tensor] = {}

    def into(name: str, x: torch.Tensor, sl: slice) -> None:
        if name not in copies:
            copies[name] = torch.empty((n * k,) + tuple(x.shape[1:]), dtype=torch.float16, pin_memory=cuda)
        copies[name][sl].copy_(x.to(torch.float16), non_blocking=cuda)      # stored dtype, cast on device
    for name, teacher in teachers.items():
        t, basis, batch = store.teacher(name), bases.get(name), batch_size(tcfg, teacher)
        side = decoded.side_of(teacher)
        sources = [orig[side].to(teacher.device, non_blocking=True) for orig, _ in got]
        for s in range(0, n * k, batch):
            sl = slice(s, min(s + batch, n * k))
            t0 = stages.mark()
            pix = teacher.render(sources, index[sl], params[sl], partner[sl])
            t1 = stages.mark()
            p, q = teacher.encode(pix, g, check=False)                      # (B, D), (B, g, g, D') compute dtype
            stages.add("teacher", t1, stages.mark())
            stages.add("render", t0, t1)
            into(t.pooled, p, sl)
            if q is not None:
                into(t.patches, basis.project(q.float()) if basis is not None else q, sl)   # (B, g, g, d)
            bar.update(sl.stop - sl.start)
    shapes = {name: (n, k) + tuple(x.shape[1:]) for name, x in copies.items()}
    event = None
    if cuda:
        event = torch.cuda.Event()
        event.record()
    host = {"images": np.stack([s.numpy() for _, s in got])} if write_images else {}
    return ChunkOutputs(host, copies, shapes, event)


# ---- before the pass: the patch basis ---------------------------------------------------------
def fit_patch_basis(store: StoreReader, name: str, teacher: Teacher, tcfg: TeacherConfig, dec: Decoding,
                    pca_images: int, paths: list[str],
                    shas: list[str]) -> PatchBasis:
    """PCA of a teacher's g x g patch tokens of up to 4 unmixed views of the first `pca_images` store
    images (the store order is a seeded permutation, so these are a random sample)."""
    g, dim = store.attrs["patch_grid"], store.teacher(name).patch_dim
    m = min(pca_images, store.num_images)
    params = store.read("views/params", 0, m)                                              # (m, K, P)
    batch = batch_size(tcfg, teacher)
    moments, queued = Moments(store.teacher(name).token_dim), []
    logger.info(f"fitting the patch basis of {name} (d = {dim}) on views of {m} images")

    def flush():                                              # batches of at most `batch`: the compiled shape
        take = queued[:batch]
        srcs = [s for s, _ in take]
        pix = teacher.render(srcs, torch.arange(len(srcs)), torch.from_numpy(np.stack([p for _, p in take])))
        moments.add(teacher.encode(pix, g)[1])                                             # (B, g, g, D)
        del queued[:batch]
    sample = Decoded(store, dec, [teacher], list(range(m)), paths, shas)
    side = sample.side_of(teacher)
    for i, orig, _ in sample:
        unmixed = np.flatnonzero(params[i, :, views.COL["mix_mode"]] == views.MIX_NONE)[:PCA_VIEWS_PER_IMAGE]
        queued += [(orig[side].to(teacher.device), params[i, k]) for k in unmixed]
        while len(queued) >= batch:
            flush()
    while queued:
        flush()
    if dim > moments.n:
        raise ConfigError(f"store.patch_dim {dim} exceeds the {moments.n} patch tokens sampled; raise "
                          "store.pca_images or lower the dimension")
    return fit_basis(moments, dim)


def store_basis(store: StoreWriter, teacher: str, basis: PatchBasis) -> None:
    t = store.reader.teacher(teacher)
    for name in PCA_ARRAYS:
        store.write_small(t.pca_key(name), getattr(basis, name))
    store.set_teacher_attrs(teacher, {"patch_variance_kept": basis.variance_kept, "patch_basis_fitted": True})


def load_basis(store: StoreReader, teacher: str | None = None) -> PatchBasis:
    t = store.teacher(teacher)
    return PatchBasis(**{name: store.small(t.pca_key(name)) for name in PCA_ARRAYS})
