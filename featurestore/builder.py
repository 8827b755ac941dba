"""`featurestore build`: images -> views -> teacher -> (patch basis) -> heads -> store.

Phases: take the build lock (before anything else), list and check the dataset (errors before any
teacher work), decode-check every file (bad ones are skipped with a reason or stop the build),
assign splits and a seeded store order, create the store with everything known up front (labels,
splits, ids, view params), fit the PCA basis of the patch tokens if asked, run the teacher chunk by
chunk (a writer thread writes each finished chunk, then marks it done), then fit the heads reading
the store chunk by chunk. An interrupted build resumes from the done chunks; resuming equals never
stopping. `featurestore verify --fix` marks damaged chunks not done, so the same command repairs them.
"""
from __future__ import annotations

import contextlib
import datetime
import errno
import multiprocessing
import os
import queue
import subprocess
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from . import heads as heads_mod
from . import views
from .config import BuildConfig, ConfigError, config_diff, to_dict
from .errors import KdstoreError
from .lock import FileLock
from .pca import Moments, PatchBasis, fit_basis
from .schema import FORMAT_VERSION, SPLIT_UNLABELED, StoreError
from .sources import BadImage, DatasetError, DecodeSet, Listing, Source, class_display_name, decode, discover, \
    file_fingerprint
from .store import Store, backend_of, is_local, not_a_kdstore_store, remove_store
from .teacher import zeroshot_logits

PCA_KEYS = {"mean": "pca/patches/mean", "basis": "pca/patches/basis", "eigenvalues": "pca/patches/eigenvalues"}
PCA_VIEWS_PER_IMAGE = 4          # unmixed views of each sampled image whose patch tokens fit the basis


@dataclass
class Rank:
    rank: int = 0
    world: int = 1

    @classmethod
    def from_env(cls) -> Rank:
        return cls(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)))

    def owns(self, chunk: int) -> bool:
        return chunk % self.world == self.rank

    def barrier(self) -> None:
        """Wait for every rank. A gloo group on the launcher's rendezvous: it needs no GPU per rank, so
        several ranks may share one GPU, and phases between barriers (PCA fit, a rank's teacher pass)
        may take hours."""
        if self.world == 1:
            return
        import torch.distributed as dist
        if not dist.is_initialized():
            dist.init_process_group("gloo", rank=self.rank, world_size=self.world,
                                    timeout=datetime.timedelta(hours=24))
        dist.barrier()

    def close(self) -> None:
        import torch.distributed as dist
        if self.world > 1 and dist.is_initialized():
            dist.destroy_process_group()


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def decode_side(teacher_size: int, image_size: int) -> int:
    """Longest side kept when decoding: crops never need more than twice the larger render size."""
    return 2 * max(teacher_size, image_size)


# ---- the lock --------------------------------------------------------------------------------
def build_lock(out: str, rank: Rank):
    """The build's lock on `<out>.lock`, taken before any other work (local stores)."""
    if not is_local(out):
        return contextlib.nullcontext()
    return FileLock(out, "build", f".lock.{rank.rank}" if rank.world > 1 else ".lock")


@contextlib.contextmanager
def disk_errors(out: str):
    """A full disk or a refused write becomes one sentence that says what to do."""
    try:
        yield
    except OSError as e:
        text = str(e)
        if e.errno == errno.ENOSPC or "No space left" in text or "errno = 28" in text:
            raise StoreError(f"no space left on device while writing {out}; free space and run the same command "
                             "to resume") from None
        if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise StoreError(f"cannot write {e.filename or out}: {e.strerror}") from None
        raise


# ---- phase 1: check every file ---------------------------------------------------------------
@dataclass
class ScanResult:
    valid: list[Source]
    sha256: list[str]
    skipped: list[tuple[str, str]]         # (id, reason)
    converted: dict[str, int]
    notes: list[tuple[str, str]]           # (id, note) worth a look, e.g. extreme aspect ratios


def _check(args):
    src, min_side, max_pixels, max_side = args
    try:
        d = decode(src.path, min_side, max_pixels, max_side)
        return src, d.sha256, None, d.notes
    except BadImage as e:
        return src, None, e.reason, ()


def scan(listing: Listing, cfg: BuildConfig, max_side: int) -> ScanResult:
    jobs = [(s, cfg.min_side, cfg.max_pixels, max_side) for s in listing.sources]
    pool = ProcessPoolExecutor(cfg.workers, mp_context=_mp_context()) if cfg.workers > 1 else contextlib.nullcontext()
    with pool as ex, _worker_deaths(cfg.workers):
        results = (ex.map(_check, jobs, chunksize=16) if cfg.workers > 1 else map(_check, jobs))
        results = list(tqdm(results, total=len(jobs), desc="checking images", unit="img",
                            disable=None, file=sys.stderr))
    valid, shas, skipped, converted, notes = [], [], list(listing.ignored), Counter(), []
    for src, sha, reason, found in results:
        if reason is None:
            valid.append(src)
            shas.append(sha)
            for note in found:
                if note.startswith("extreme aspect"):
                    notes.append((src.rel, note))
                    converted["extreme aspect"] += 1
                else:
                    converted[note] += 1
        else:
            skipped.append((src.rel, reason))
    bad = [(i, r) for i, r in skipped if not r.startswith("not an image file extension")]
    if bad and cfg.on_bad_image == "fail":
        listed = "; ".join(f"{i}: {r}" for i, r in bad[:20]) + (f"; and {len(bad) - 20} more" if len(bad) > 20 else "")
        raise DatasetError(f"{len(bad)} bad image(s) and --on-bad-image fail: {listed}")
    counts = Counter(s.label for s in valid)
    empty = [c for i, c in enumerate(listing.classes) if counts[i] == 0]
    if empty:
        raise DatasetError(f"no readable images left for classes {empty}")
    return ScanResult(valid, shas, skipped, dict(converted), notes)


def assign(labels: np.ndarray, folds: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Stratified split per scanned image (fold 0..F-1, -1 held out, -2 unlabelled) and a seeded
    store order."""
    rng = np.random.default_rng([seed, 1])
    split = np.full(len(labels), SPLIT_UNLABELED, dtype=np.int8)
    offset = 0                            # round-robin continues across classes: folds stay balanced
    for c in np.unique(labels[labels >= 0]):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n_val = int(round(val_fraction * len(idx))) if len(idx) > folds else 0
        split[idx[:n_val]] = -1
        split[idx[n_val:]] = (offset + np.arange(len(idx) - n_val)) % folds
        offset += len(idx) - n_val
    if (split >= 0).sum() < folds:
        raise DatasetError(f"{int((split >= 0).sum())} training images are too few for {folds}-fold cross-fitting")
    order = np.random.default_rng([seed, 2]).permutation(len(labels))
    return split, order


@dataclass
class Index:
    """The arrays written when a store is created, in store order."""
    order: np.ndarray            # store position -> scanned image
    labels: np.ndarray           # (N,) int16, -1 unlabelled
    split: np.ndarray            # (N,) int8
    ids: list[str]
    sha256: np.ndarray           # (N, 32) uint8
    params: np.ndarray           # (N, K, P) float32


def make_index(res: ScanResult, cfg: BuildConfig, chunk: int) -> Index:
    labels = np.array([s.label for s in res.valid], dtype=np.int16)
    split, order = assign(labels, cfg.probe.folds, cfg.probe.val_fraction, cfg.probe.seed)
    labels, split, n = labels[order], split[order], len(order)
    groups = np.where(split >= 0, 0, split)          # partners: training, held-out, unlabelled apart
    params = np.concatenate([views.sample_params(cfg.views, a, min(a + chunk, n), groups[a:a + chunk])
                             for a in range(0, n, chunk)])
    return Index(order, labels, split, [res.valid[j].rel for j in order],
                 np.stack([np.frombuffer(bytes.fromhex(res.sha256[j]), np.uint8) for j in order]), params)


def write_index(store: Store, index: Index) -> None:
    store.write("labels", 0, index.labels)
    store.write("split", 0, index.split)
    store.write("ids", 0, np.array(index.ids, dtype=object))
    store.write("sha256", 0, index.sha256)
    store.write("views/params", 0, index.params)


# ---- phase 3: teacher pass -------------------------------------------------------------------
def _mp_context():
    """Decoding processes started clean: spawned, they inherit no open store or lock, and they are
    the build's own children, so they notice within seconds when a killed build leaves them behind."""
    return multiprocessing.get_context("spawn")


def decoded(store: Store, cfg: BuildConfig, teacher, images: list[int], paths: list[str], shas: list[str]):
    """(store index, original uint8 (3, H, W), squashed (S, S, 3)) of `images`, in order, decoded by workers."""
    s = store.attrs["image_size"]
    data = DecodeSet([(i, paths[i], shas[i]) for i in images], s, decode_side(teacher.pre.size, s),
                     cfg.min_side, cfg.max_pixels)
    kw = {"prefetch_factor": 8, "multiprocessing_context": _mp_context()} if cfg.workers else {}
    with _worker_deaths(cfg.workers):
        for i, orig, small, problem in DataLoader(data, batch_size=None, num_workers=cfg.workers, **kw):
            if problem:
                raise DatasetError(problem)
            yield i, orig, small


@contextlib.contextmanager
def _worker_deaths(workers: int):
    """A decoding process that dies (killed, out of memory, or a script that starts the build at
    import time, which every spawned worker then re-runs) becomes one clear error."""
    try:
        yield
    except (BrokenProcessPool, RuntimeError) as e:
        if not isinstance(e, BrokenProcessPool) and "DataLoader worker" not in str(e):
            raise
        raise KdstoreError(
            f"a decoding worker process stopped unexpectedly ({type(e).__name__}). Worker processes re-import "
            "the script that started the build: from Python, call featurestore.build under "
            "`if __name__ == \"__main__\":`, or pass workers=0. If memory ran out, lower --workers "
            f"(now {workers}). Finished chunks are kept; run the same command again to resume.") from e


class ChunkWriter:
    """Writes finished chunks on a thread, then marks each done; errors surface on the next call."""

    def __init__(self, store: Store):
        self.store, self.q, self.error = store, queue.Queue(maxsize=2), None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        while (item := self.q.get()) is not None:
            c, arrays = item
            if self.error is not None:
                continue
            try:
                a, _ = self.store.chunk_range(c)
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


def teacher_pass(store: Store, teacher, cfg: BuildConfig, rank: Rank, paths: list[str], shas: list[str],
                 text_head, basis: PatchBasis | None) -> int:
    """Run the teacher over this rank's unfinished chunks; returns the number of views computed."""
    done = store.done()
    mine = [c for c in range(store.num_chunks) if rank.owns(c) and not done[c]]
    k, g = store.views_per_image, store.attrs["patch_grid"]

    def views_in(chunks) -> int:
        return k * sum(b - a for a, b in map(store.chunk_range, chunks))
    total_views = views_in(c for c in range(store.num_chunks) if rank.owns(c))
    left_views = views_in(mine)
    who = f"rank {rank.rank}/{rank.world}: " if rank.world > 1 else ""
    log(f"{who}teacher pass over {len(mine)} chunk(s), {left_views} views, on {teacher.device}")
    if not mine:
        return 0
    loader = decoded(store, cfg, teacher, [i for c in mine for i in range(*store.chunk_range(c))], paths, shas)
    batch = cfg.teacher.batch_size or (64 if teacher.device.type == "cuda" else 16)
    bar = tqdm(total=total_views, initial=total_views - left_views, unit="view", desc=f"teacher r{rank.rank}",
               position=rank.rank, disable=None, file=sys.stderr, smoothing=0.1)
    writer = ChunkWriter(store)
    pending = iter(mine)
    c = next(pending)
    a, b = store.chunk_range(c)
    got: list = []
    try:
        for _, orig, small in loader:
            got.append((orig, small))
            if len(got) < b - a:
                continue
            writer.put(c, _run_chunk(store, teacher, c, got, batch, g, text_head, basis, bar))
            got = []
            c = next(pending, None)
            if c is not None:
                a, b = store.chunk_range(c)
    finally:
        bar.close()
        writer.close(raise_error=sys.exc_info()[0] is None)
    return left_views


def _run_chunk(store: Store, teacher, c: int, got, batch: int, g: int, text_head, basis, bar) -> dict[str, np.ndarray]:
    a, b = store.chunk_range(c)
    n, k = b - a, store.views_per_image
    sources = [orig.to(teacher.device) for orig, _ in got]
    params = torch.from_numpy(store.read("views/params", a, b)).reshape(n * k, -1)      # (n*K, P)
    index = torch.arange(n).repeat_interleave(k)                                          # (n*K,)
    partner = params[:, views.COL["mix_partner"]].long()
    partner = torch.where(partner >= 0, partner - a, partner)
    pooled, patches, zeroshot = [], [], []
    for s in range(0, n * k, batch):
        sl = slice(s, min(s + batch, n * k))
        pix = teacher.render(sources, index[sl], params[sl], partner[sl])
        p, q = teacher.encode(pix, g)                                      # (B, D), (B, g, g, D) float32
        if text_head is not None:
            zeroshot.append(zeroshot_logits(p, *text_head).cpu())          # (B, C) from float pooled
        pooled.append(p.to(torch.float16).cpu())                           # stored dtype, cast on device
        if q is not None:
            q = basis.project(q) if basis is not None else q               # (B, g, g, d)
            patches.append(q.to(torch.float16).cpu())
        bar.update(sl.stop - sl.start)
    out = {"images": np.stack([s.numpy() for _, s in got]),
           "teacher/pooled": torch.cat(pooled).reshape(n, k, -1).numpy()}
    if g:
        out["teacher/patches"] = torch.cat(patches).reshape(n, k, g, g, -1).numpy()
    if text_head is not None:
        out["teacher/logits/zeroshot"] = torch.cat(zeroshot).reshape(n, k, -1).numpy()
    return out


# ---- phase 2b: the patch basis ---------------------------------------------------------------
def fit_patch_basis(store: Store, teacher, cfg: BuildConfig, paths: list[str], shas: list[str]) -> PatchBasis:
    """PCA of the g x g patch tokens of up to 4 unmixed views of the first `pca_images` store images
    (the store order is a seeded permutation, so these are a random sample)."""
    g, dim = store.attrs["patch_grid"], cfg.store.patch_dim
    m = min(cfg.store.pca_images, store.num_images)
    params = store.read("views/params", 0, m)                                              # (m, K, P)
    batch = cfg.teacher.batch_size or (64 if teacher.device.type == "cuda" else 16)
    moments, queued = Moments(store.attrs["embed_dim"]), []
    log(f"fitting the patch basis (d = {dim}) on views of {m} images")

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


def store_basis(store: Store, basis: PatchBasis) -> None:
    for name, key in PCA_KEYS.items():
        store.write_small(key, getattr(basis, name))
    store.set_attrs({"patch_variance_kept": basis.variance_kept, "patch_basis_fitted": True})


def load_basis(store: Store) -> PatchBasis:
    return PatchBasis(**{name: store.small(key) for name, key in PCA_KEYS.items()})


# ---- phase 4: heads --------------------------------------------------------------------------
def fit_heads(store: Store, cfg: BuildConfig) -> dict:
    """Cross-fitted probe from at most probe.max_rows pooled rows, then scoring chunk by chunk:
    memory stays bounded whatever N x K x D."""
    labels, split = store.read("labels").astype(np.int64), store.read("split")
    c, k, n = len(store.classes), store.views_per_image, store.num_images
    train = np.flatnonzero(split >= 0)
    m = heads_mod.views_per_row(len(train), k, cfg.probe.max_rows)
    log(f"fitting the cross-fitted probe on {len(train)} labelled training images x {m} view(s)")
    rows = []
    for ch in range(store.num_chunks):
        a, b = store.chunk_range(ch)
        sel = train[(train >= a) & (train < b)] - a
        if len(sel):
            rows.append(np.stack([store.read_view("teacher/pooled", ch, v)[sel] for v in range(m)], 1))   # (s, m, D)
    x = heads_mod.l2_normalize(np.concatenate(rows).reshape(len(train) * m, -1))
    folds = sorted(int(f) for f in np.unique(split[train]))
    probes = heads_mod.fit_probes(x, np.repeat(labels[train], m), np.repeat(split[train], m), folds, c,
                                  cfg.probe.c, cfg.probe.seed)
    del x, rows
    view0 = np.empty((n, c), np.float32)
    zeroshot0 = np.empty((n, c), np.float32) if "zeroshot" in store.heads() else None
    for ch in range(store.num_chunks):
        a, b = store.chunk_range(ch)
        logits = probes.score(store.read("teacher/pooled", a, b), split[a:b])                # (chunk, K, C)
        store.write("teacher/logits/probe", a, logits)
        view0[a:b] = logits[:, 0]
        if zeroshot0 is not None:
            zeroshot0[a:b] = store.read_view("teacher/logits/zeroshot", ch, 0)
    store.write_head("probe", probes.arrays())
    metrics = {"probe": heads_mod.probe_metrics(labels, split, view0, c, cfg.probe.c, len(folds))}
    if zeroshot0 is not None:
        metrics["zeroshot"] = heads_mod.zeroshot_metrics(zeroshot0, labels, c)
    return metrics


# ---- orchestration ---------------------------------------------------------------------------
def build(cfg: BuildConfig, overwrite: bool = False) -> dict:
    """Build, resume or repair the store at cfg.out; returns phase timings (seconds) and view counts."""
    cfg.validate()
    rank = Rank.from_env()
    out = cfg.out
    if rank.world > 1 and backend_of(out) == "hdf5":
        raise ConfigError("multi-process builds need the Zarr backend (one HDF5 file has one writer); use a .zarr path")
    try:
        with build_lock(out, rank), disk_errors(out):
            return _build(cfg, rank, overwrite)
    finally:
        rank.close()


def _build(cfg: BuildConfig, rank: Rank, overwrite: bool) -> dict:
    clock = {"start": time.perf_counter()}
    out = cfg.out
    listing = discover(cfg.images, cfg.manifest, cfg.classes_file, cfg.unlabeled, cfg.allow_outside_paths)
    fingerprint = file_fingerprint(listing.sources)
    # rank 0 decides first (resume, refuse or overwrite); the others then see what it left
    store = _open_existing(out, cfg, fingerprint, overwrite) if rank.rank == 0 else None
    rank.barrier()
    if rank.rank != 0:
        store = _open_existing(out, cfg, fingerprint, False)
    if store is not None and store.complete:
        log(f"{out} is already complete; nothing to do")
        return {"views": 0}
    from .teacher import load_teacher
    t0 = time.perf_counter()
    teacher = load_teacher(cfg.teacher.id, cfg.teacher.revision, cfg.device, cfg.teacher.dtype)
    clock["load_s"] = time.perf_counter() - t0
    if store is None:
        if rank.rank == 0:
            store = _create(out, cfg, listing, fingerprint, teacher)
        rank.barrier()
        if store is None:
            store = Store.open(out, mode="r+")
    elif store.attrs.get("rewrite_index") and rank.rank == 0:
        _rewrite_index(store, cfg, listing, teacher)
    if teacher.info.embed_dim != store.attrs["embed_dim"]:
        raise StoreError(f"{out} was built with embed_dim {store.attrs['embed_dim']}, this teacher has "
                         f"{teacher.info.embed_dim}")
    text_head = None
    if "zeroshot" in store.heads():
        text_head = teacher.text_head(store.attrs["prompts"])
        if rank.rank == 0:
            text, scale, bias = text_head
            store.write_head("zeroshot", {"text_embeds": text.cpu().numpy(), "logit_scale": np.float32(scale),
                                          "logit_bias": np.float32(bias)})
    paths, shas = _paths_and_shas(store, listing)
    basis = None
    if cfg.store.patch_dim:
        if rank.rank == 0 and not store.attrs.get("patch_basis_fitted"):
            store_basis(store, fit_patch_basis(store, teacher, cfg, paths, shas))
        rank.barrier()
        basis = load_basis(store)
    t0 = time.perf_counter()
    views_run = teacher_pass(store, teacher, cfg, rank, paths, shas, text_head, basis)
    clock["pass_s"] = time.perf_counter() - t0
    rank.barrier()
    if rank.rank == 0:
        missing = int((~store.done()).sum())
        if missing:
            raise StoreError(f"{missing} chunk(s) of {out} are not done; run the same command again to resume")
        t0 = time.perf_counter()
        store.set_attrs({"metrics": fit_heads(store, cfg), "complete": True, "finished": _now()})
        clock["heads_s"] = time.perf_counter() - t0
    store.close()
    total = time.perf_counter() - clock.pop("start")
    stats = {"views": views_run, "total_s": total} | clock
    if views_run:
        log(f"done: {out}  teacher pass {views_run} views in {stats['pass_s']:.1f}s "
            f"({views_run / stats['pass_s']:.2f} views/s), total {total:.1f}s "
            f"(model load {stats['load_s']:.1f}s, heads {stats.get('heads_s', 0.0):.1f}s)")
    return stats


def _open_existing(out: str, cfg: BuildConfig, fingerprint: str, overwrite: bool) -> Store | None:
    """The store to resume at `out`, or None to create one there (nothing there, an empty folder, or a
    store kdstore made and --overwrite). Anything else at `out` is refused and left untouched."""
    local = is_local(out)
    if local and (not Path(out).exists() or (Path(out).is_dir() and not any(Path(out).iterdir()))):
        return None
    if overwrite:
        if local:
            remove_store(out, _protected(cfg))
        return None
    try:
        store = Store.open(out, mode="r+")
    except StoreError as e:
        why = not_a_kdstore_store(out) if local else None
        if why is not None:
            raise StoreError(f"{out} exists and is not a store kdstore made ({why}); choose another --out "
                             "(kdstore deletes only stores it made)") from None
        raise StoreError(f"{out} exists but is not a usable store ({e}); pass --overwrite to rebuild it") from None
    old, new = store.attrs.get("identity", {}), cfg.identity()
    diffs = config_diff(old, new)
    if diffs:
        raise ConfigError(f"{out} was built with a different configuration; refusing to mix them: "
                          + "; ".join(diffs) + ". Use a new --out, or --overwrite to rebuild")
    if store.attrs.get("fingerprint") != fingerprint:
        raise ConfigError(f"the images under {cfg.images or cfg.manifest} changed since {out} was started "
                          "(files added, removed or resized); use a new --out, or --overwrite")
    log(f"resuming {out}: {int(store.done().sum())}/{store.num_chunks} chunks done")
    return store


def _protected(cfg: BuildConfig) -> dict[str, Path]:
    """Folders --overwrite never deletes, nor any folder that holds one of them."""
    out = {"the current directory": Path.cwd(), "your home folder": Path.home()}
    for what, p in (("the input images", cfg.images), ("the unlabelled images", cfg.unlabeled),
                    ("the manifest", cfg.manifest)):
        if p:
            out[f"{what} ({p})"] = Path(p)
    return out


def prompts_for(classes: list[str], cfg: BuildConfig) -> list[list[str]]:
    """Each class's zero-shot prompts: from teacher.prompts (by folder name or cleaned name), else the
    template filled with the cleaned name."""
    given = cfg.teacher.prompts
    unknown = sorted(set(given) - set(classes) - {class_display_name(c) for c in classes})
    if unknown:
        raise ConfigError(f"teacher.prompts names classes that do not exist: {unknown} (classes: {classes})")
    out = []
    for c in classes:
        name = class_display_name(c)
        out.append(list(given.get(c) or given.get(name) or [cfg.teacher.prompt_template.format(name=name)]))
    return out


def _create(out: str, cfg: BuildConfig, listing: Listing, fingerprint: str, teacher) -> Store:
    res = scan(listing, cfg, decode_side(teacher.pre.size, cfg.store.image_size))
    n, chunk = len(res.valid), min(cfg.store.chunk_size, len(res.valid))
    index = make_index(res, cfg, chunk)
    heads = ["probe"] + (["zeroshot"] if teacher.info.has_text and cfg.teacher.zeroshot else [])
    unlabeled = int((index.labels < 0).sum())
    attrs = {
        "format_version": FORMAT_VERSION, "classes": listing.classes, "num_images": n,
        "num_unlabeled": unlabeled, "views_per_image": cfg.views.views, "image_size": cfg.store.image_size,
        "chunk_size": chunk, "embed_dim": teacher.info.embed_dim, "patch_grid": cfg.store.patch_grid,
        "patch_dim": cfg.store.patch_dim or teacher.info.embed_dim, "heads": heads,
        "param_names": list(views.PARAM_NAMES), "teacher": to_dict(teacher.info),
        "prompts": prompts_for(listing.classes, cfg) if "zeroshot" in heads else [],
        "view_policy": to_dict(cfg.views), "identity": cfg.identity(), "config": to_dict(cfg),
        "fingerprint": fingerprint, "package_version": _version(), "git_sha": _git_sha(), "created": _now(),
        "id_bytes": max(len(i.encode()) for i in index.ids),
        "checksums": "crc32c" if backend_of(out) == "zarr" else "fletcher32",
        "report": {"files_found": len(listing.sources) + len(listing.ignored), "images": n,
                   "labelled": n - unlabeled, "unlabeled": unlabeled,
                   "skipped": [{"id": i, "reason": r} for i, r in res.skipped], "converted": res.converted,
                   "notes": [{"id": i, "note": t} for i, t in res.notes]},
        "complete": False,
    }
    log(f"creating {out}: {n} images ({unlabeled} unlabelled) x {cfg.views.views} views, {len(res.skipped)} skipped")
    store = Store.create(out, attrs | {"format_version": None}, cfg.store.compression)
    write_index(store, index)
    store.set_attrs({"format_version": FORMAT_VERSION})
    store.flush()
    return store


def _rewrite_index(store: Store, cfg: BuildConfig, listing: Listing, teacher) -> None:
    """Rewrite the arrays written at creation (after `verify --fix` found them damaged)."""
    log(f"rewriting the index arrays of {store.path} from the image files")
    res = scan(listing, cfg, decode_side(teacher.pre.size, store.attrs["image_size"]))
    index = make_index(res, cfg, store.chunk_size)
    if len(index.ids) != store.num_images:
        raise StoreError(f"{store.path}: the images now give {len(index.ids)} usable files, the store holds "
                         f"{store.num_images}; rebuild it with --overwrite")
    write_index(store, index)
    store.set_attrs({"rewrite_index": False})
    store.flush()


def _paths_and_shas(store: Store, listing: Listing) -> tuple[list[str], list[str]]:
    """Current file path and stored sha256 of every store image, by id."""
    by_id = {s.rel: s.path for s in listing.sources}
    shas = [row.tobytes().hex() for row in store.read("sha256")]
    return [by_id[i] for i in store.ids()], shas


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version("kdstore")
    except PackageNotFoundError:
        return "unknown"


def _git_sha() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                              text=True, timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None
