"""`featurestore build`: images -> views -> teacher -> heads -> store.

Phases: list and check the dataset (errors before any teacher work), decode-check every file
(bad ones are skipped with a reason or stop the build), assign splits and a seeded store order,
create the store with everything known up front (labels, splits, ids, view params), run the teacher
chunk by chunk (a writer thread writes each finished chunk, then marks it done), then fit the heads.
An interrupted build resumes from the done chunks; resuming equals never stopping.
"""
from __future__ import annotations

import contextlib
import datetime
import fcntl
import os
import queue
import shutil
import subprocess
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from . import heads as heads_mod
from . import views
from .config import BuildConfig, ConfigError, to_dict
from .schema import FORMAT_VERSION, StoreError
from .sources import BadImage, DatasetError, Listing, Source, class_display_name, decode, discover, \
    file_fingerprint, squash
from .store import Store, backend_of
from .teacher import zeroshot_logits


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
        if self.world > 1:
            from accelerate import PartialState
            PartialState(cpu=not torch.cuda.is_available()).wait_for_everyone()


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def decode_side(teacher_size: int, image_size: int) -> int:
    """Longest side kept when decoding: crops never need more than twice the larger render size."""
    return 2 * max(teacher_size, image_size)


# ---- phase 1: check every file ---------------------------------------------------------------
@dataclass
class ScanResult:
    valid: list[Source]
    sha256: list[str]
    skipped: list[tuple[str, str]]         # (id, reason)
    converted: dict[str, int]


def _check(args):
    src, min_side, max_pixels, max_side = args
    try:
        d = decode(src.path, min_side, max_pixels, max_side)
        return src, d.sha256, None, d.notes
    except BadImage as e:
        return src, None, e.reason, ()


def scan(listing: Listing, cfg: BuildConfig, max_side: int) -> ScanResult:
    jobs = [(s, cfg.min_side, cfg.max_pixels, max_side) for s in listing.sources]
    pool = ProcessPoolExecutor(cfg.workers) if cfg.workers > 1 else contextlib.nullcontext()
    with pool as ex:
        results = (ex.map(_check, jobs, chunksize=16) if cfg.workers > 1 else map(_check, jobs))
        results = list(tqdm(results, total=len(jobs), desc="checking images", unit="img",
                            disable=None, file=sys.stderr))
    valid, shas, skipped, converted = [], [], list(listing.ignored), Counter()
    for src, sha, reason, notes in results:
        if reason is None:
            valid.append(src)
            shas.append(sha)
            converted.update(notes)
        else:
            skipped.append((src.rel, reason))
    bad = [(i, r) for i, r in skipped if not r.startswith("not an image file extension")]
    if bad and cfg.on_bad_image == "fail":
        lines = "\n".join(f"  {i}: {r}" for i, r in bad[:20])
        raise DatasetError(f"{len(bad)} bad image(s) and --on-bad-image fail:\n{lines}")
    counts = Counter(s.label for s in valid)
    empty = [c for i, c in enumerate(listing.classes) if counts[i] == 0]
    if empty:
        raise DatasetError(f"no readable images left for classes {empty}")
    return ScanResult(valid, shas, skipped, dict(converted))


def assign(labels: np.ndarray, folds: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Stratified split (fold 0..F-1, -1 held out) per scanned image, and a seeded store order."""
    rng = np.random.default_rng([seed, 1])
    split = np.empty(len(labels), dtype=np.int8)
    offset = 0                            # round-robin continues across classes: folds stay balanced
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n_val = int(round(val_fraction * len(idx))) if len(idx) > folds else 0
        split[idx[:n_val]] = -1
        split[idx[n_val:]] = (offset + np.arange(len(idx) - n_val)) % folds
        offset += len(idx) - n_val
    if (split >= 0).sum() < folds:
        raise DatasetError(f"{int((split >= 0).sum())} training images are too few for {folds}-fold cross-fitting")
    order = np.random.default_rng([seed, 2]).permutation(len(labels))
    return split, order


# ---- phase 3: teacher pass -------------------------------------------------------------------
class DecodeSet(Dataset):
    """Decodes store images [i] from their files: the original (for the teacher) and S x S."""

    def __init__(self, items: list[tuple[int, str, str]], size: int, max_side: int, min_side: int, max_pixels: int):
        self.items, self.size, self.max_side = items, size, max_side
        self.min_side, self.max_pixels = min_side, max_pixels

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, j):
        i, path, sha = self.items[j]
        try:
            d = decode(path, self.min_side, self.max_pixels, self.max_side)
        except BadImage as e:
            raise DatasetError(f"{path} became unreadable during the build: {e.reason}") from None
        if d.sha256 != sha:
            raise DatasetError(f"{path} changed since the build started (sha256 differs); rebuild the store")
        return i, torch.from_numpy(d.rgb).permute(2, 0, 1).contiguous(), torch.from_numpy(squash(d.rgb, self.size))


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
                a, b = self.store.chunk_range(c)
                for name, value in arrays.items():
                    self.store[name][a:b] = value
                self.store.flush()
                self.store["progress/done"][c] = True
                self.store.flush()
            except Exception as e:  # noqa: BLE001 - re-raised in the main thread
                self.error = e

    def put(self, c: int, arrays: dict[str, np.ndarray]) -> None:
        self._raise()
        self.q.put((c, arrays))

    def close(self) -> None:
        self.q.put(None)
        self.thread.join()
        self._raise()

    def _raise(self):
        if self.error is not None:
            raise RuntimeError(f"writing the store failed: {self.error}") from self.error


def teacher_pass(store: Store, teacher, cfg: BuildConfig, rank: Rank, paths: list[str], shas: list[str],
                 text_head) -> int:
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
    items = [(i, paths[i], shas[i]) for c in mine for i in range(*store.chunk_range(c))]
    data = DecodeSet(items, store.attrs["image_size"], decode_side(teacher.pre.size, store.attrs["image_size"]),
                     cfg.min_side, cfg.max_pixels)
    loader = DataLoader(data, batch_size=None, num_workers=cfg.workers, prefetch_factor=8 if cfg.workers else None)
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
            writer.put(c, _run_chunk(store, teacher, c, got, batch, g, text_head, bar))
            got = []
            c = next(pending, None)
            if c is not None:
                a, b = store.chunk_range(c)
    finally:
        writer.close()
        bar.close()
    return left_views


def _run_chunk(store: Store, teacher, c: int, got, batch: int, g: int, text_head, bar) -> dict[str, np.ndarray]:
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
            patches.append(q.to(torch.float16).cpu())
        bar.update(sl.stop - sl.start)
    out = {"images": np.stack([s.numpy() for _, s in got]),
           "teacher/pooled": torch.cat(pooled).reshape(n, k, -1).numpy()}
    if g:
        out["teacher/patches"] = torch.cat(patches).reshape(n, k, g, g, -1).numpy()
    if text_head is not None:
        out["teacher/logits/zeroshot"] = torch.cat(zeroshot).reshape(n, k, -1).numpy()
    return out


# ---- phase 4: heads --------------------------------------------------------------------------
def fit_heads(store: Store, cfg: BuildConfig) -> dict:
    labels = store.read("labels").astype(np.int64)
    split = store.read("split")
    pooled = store.read("teacher/pooled").astype(np.float32)                             # (N, K, D)
    c = len(store.classes)
    log(f"fitting the cross-fitted probe on {pooled.shape[0]} images x {pooled.shape[1]} views")
    res = heads_mod.cross_fit_probe(pooled, labels, split, c, cfg.probe.c, cfg.probe.max_rows, cfg.probe.seed)
    store["teacher/logits/probe"][:] = res.logits
    store.write_head("probe", {"weight": res.weight, "bias": res.bias,
                               "fold_weight": res.fold_weight, "fold_bias": res.fold_bias})
    metrics = {"probe": res.metrics}
    if "zeroshot" in store.heads():
        metrics["zeroshot"] = heads_mod.zeroshot_metrics(store.read("teacher/logits/zeroshot"), labels, c)
    return metrics


# ---- orchestration ---------------------------------------------------------------------------
@contextlib.contextmanager
def build_lock(out: str, rank: Rank):
    if "://" in out:
        yield
        return
    path = Path(out.rstrip("/") + (f".lock.{rank.rank}" if rank.world > 1 else ".lock"))
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise StoreError(f"another build is writing {out} (lock {path} is held)") from None
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
    with contextlib.suppress(OSError):
        path.unlink()


def build(cfg: BuildConfig, overwrite: bool = False) -> dict:
    """Build or resume the store at cfg.out; returns phase timings (seconds) and view counts."""
    cfg.validate()
    clock = {"start": time.perf_counter()}
    rank = Rank.from_env()
    out = cfg.out
    if rank.world > 1 and backend_of(out) == "hdf5":
        raise ConfigError("multi-process builds need the Zarr backend (one HDF5 file has one writer); use a .zarr path")
    listing = discover(cfg.images, cfg.manifest, cfg.classes_file)
    fingerprint = file_fingerprint(listing.sources)
    with build_lock(out, rank):
        store = _open_existing(out, cfg, fingerprint, overwrite and rank.rank == 0)
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
        if teacher.info.embed_dim != store.attrs["embed_dim"]:
            raise StoreError(f"{out} was built with embed_dim {store.attrs['embed_dim']}, this teacher has "
                             f"{teacher.info.embed_dim}")
        text_head = None
        if "zeroshot" in store.heads():
            text, scale, bias = teacher.text_head(store.attrs["prompts"])
            text_head = (text, scale, bias)
            if rank.rank == 0:
                store.write_head("zeroshot", {"text_embeds": text.cpu().numpy(),
                                              "logit_scale": np.float32(scale), "logit_bias": np.float32(bias)})
        paths, shas = _paths_and_shas(store, listing)
        t0 = time.perf_counter()
        views_run = teacher_pass(store, teacher, cfg, rank, paths, shas, text_head)
        clock["pass_s"] = time.perf_counter() - t0
        rank.barrier()
        if rank.rank == 0:
            missing = int((~store.done()).sum())
            if missing:
                raise StoreError(f"{missing} chunk(s) of {out} are not done; run the same command again to resume")
            t0 = time.perf_counter()
            store.set_attrs({"metrics": fit_heads(store, cfg), "complete": True,
                             "finished": _now()})
            clock["heads_s"] = time.perf_counter() - t0
        store.close()
    total = time.perf_counter() - clock.pop("start")
    stats = {"views": views_run, "total_s": total} | clock
    if views_run:
        log(f"done: {out}  teacher pass {views_run} views in {stats['pass_s']:.1f}s "
            f"({views_run / stats['pass_s']:.2f} views/s), total {total:.1f}s")
    return stats


def _open_existing(out: str, cfg: BuildConfig, fingerprint: str, overwrite: bool) -> Store | None:
    local = "://" not in out
    if local and not Path(out).exists():
        return None
    if overwrite:
        if local:
            shutil.rmtree(out) if Path(out).is_dir() else Path(out).unlink()
        return None
    try:
        store = Store.open(out, mode="r+")
    except StoreError as e:
        raise StoreError(f"{out} exists but is not a usable store ({e}); pass --overwrite to rebuild it") from None
    old, new = store.attrs.get("identity", {}), cfg.identity()
    diffs = _diff(old, new)
    if diffs:
        raise ConfigError(f"{out} was built with a different configuration; refusing to mix them:\n  "
                          + "\n  ".join(diffs) + "\nuse a new --out, or --overwrite to rebuild")
    if store.attrs.get("fingerprint") != fingerprint:
        raise ConfigError(f"the images under {cfg.images or cfg.manifest} changed since {out} was started "
                          "(files added, removed or resized); use a new --out, or --overwrite")
    log(f"resuming {out}: {int(store.done().sum())}/{store.num_chunks} chunks done")
    return store


def _diff(old, new, prefix=""):
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key, "<absent>"), new.get(key, "<absent>")
        if isinstance(a, dict) and isinstance(b, dict):
            out += _diff(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: stored {a!r}, now {b!r}")
    return out


def _create(out: str, cfg: BuildConfig, listing: Listing, fingerprint: str, teacher) -> Store:
    res = scan(listing, cfg, decode_side(teacher.pre.size, cfg.store.image_size))
    labels = np.array([s.label for s in res.valid], dtype=np.int16)
    split, order = assign(labels, cfg.probe.folds, cfg.probe.val_fraction, cfg.probe.seed)
    n, chunk = len(res.valid), min(cfg.store.chunk_size, len(res.valid))
    heads = ["probe"] + (["zeroshot"] if teacher.info.has_text and cfg.teacher.zeroshot else [])
    prompts = [cfg.teacher.prompt_template.format(name=class_display_name(c)) for c in listing.classes]
    attrs = {
        "format_version": FORMAT_VERSION, "classes": listing.classes, "num_images": n,
        "views_per_image": cfg.views.views, "image_size": cfg.store.image_size, "chunk_size": chunk,
        "embed_dim": teacher.info.embed_dim, "patch_grid": cfg.store.patch_grid, "heads": heads,
        "param_names": list(views.PARAM_NAMES), "teacher": to_dict(teacher.info), "prompts": prompts,
        "view_policy": to_dict(cfg.views), "identity": cfg.identity(), "config": to_dict(cfg),
        "fingerprint": fingerprint, "package_version": _version(), "git_sha": _git_sha(), "created": _now(),
        "report": {"files_found": len(listing.sources) + len(listing.ignored), "images": n,
                   "skipped": [{"id": i, "reason": r} for i, r in res.skipped], "converted": res.converted},
        "complete": False,
    }
    log(f"creating {out}: {n} images x {cfg.views.views} views, {len(res.skipped)} skipped")
    store = Store.create(out, attrs | {"format_version": None}, cfg.store.compression)
    store["labels"][:] = labels[order]
    store["split"][:] = split[order]
    store["ids"][:] = np.array([res.valid[j].rel for j in order], dtype=object)
    store["sha256"][:] = np.stack([np.frombuffer(bytes.fromhex(res.sha256[j]), np.uint8) for j in order])
    params = np.concatenate([views.sample_params(cfg.views, a, min(a + chunk, n), chunk, n)
                             for a in range(0, n, chunk)])
    store["views/params"][:] = params
    store.set_attrs({"format_version": FORMAT_VERSION})
    store.flush()
    return store


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
