"""`featurestore build`: files -> views -> teacher -> heads -> store, as its phases.

    lock      the build lock, before anything else (lock.py)
    list      the files and classes; errors before any teacher work (sources.py)
    open      resume the store at --out, or refuse what must not be mixed or deleted
    scan      decode-check every file, then create the store with its index (scan.py, index.py)
    teacher   the teacher over every view of this rank's unfinished chunks (teacher_pass.py)
    heads     the cross-fitted probe and the zero-shot head, from the stored embeddings (heads.py)

Ranks (ranks.py) split the teacher pass by whole chunks; rank 0 alone decides how to open the store,
creates it, fits the patch basis and the heads, and the others follow it across a barrier. An
interrupted build resumes from the chunks marked done, and resuming equals never stopping;
`featurestore verify --fix` marks damaged chunks not done, so the same command repairs them.
"""
from __future__ import annotations

import contextlib
import errno
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import numpy as np

from featurestore import views
from featurestore.backends import backend_class
from featurestore.config import BuildConfig, stored_identity
from featurestore.errors import KdstoreError
from featurestore.index import make_index, write_index
from featurestore.integrity import seal_with_digest
from featurestore.lock import store_lock
from featurestore.log import logger
from featurestore.options import ConfigError, config_diff, to_dict
from featurestore.pass_parts import Decoded
from featurestore.provenance import now, record
from featurestore.ranks import Rank, check_launch
from featurestore.scan import decode_side, scan
from featurestore.schema import FORMAT_VERSION, StoreError
from featurestore.sources import Listing, class_display_name, discover, file_fingerprint
from featurestore.teacher_pass import (
    fit_patch_basis,
    images_of,
    load_basis,
    pending_chunks,
    prepare_teacher,
    store_basis,
    teacher_pass,
)
from featurestore.teachers import check_patch_grid
from featurestore.writer import StoreWriter, not_a_kdstore_store, occupied, remove_store

T = TypeVar("T")


def build(cfg: BuildConfig, overwrite: bool = False) -> dict:
    """Build, resume or repair the store at cfg.out; returns phase timings (seconds) and view counts."""
    cfg.validate()
    check_launch()
    rank = Rank.from_env()
    if rank.world > 1 and backend_class(cfg.out).one_writer:
        raise ConfigError("multi-process builds need the Zarr backend (one HDF5 file has one writer); use a .zarr path")
    try:
        with build_lock(cfg.out, rank, cfg.storage_options) as lock, disk_errors(cfg.out):
            return _build(cfg, rank, overwrite, lock)
    finally:
        rank.close()


def _build(cfg: BuildConfig, rank: Rank, overwrite: bool, lock) -> dict:
    clock = {"start": time.perf_counter()}
    out, options = cfg.out, cfg.storage_options
    listing = discover(cfg.images, cfg.manifest, cfg.classes_file, cfg.unlabeled, cfg.allow_outside_paths)
    check_patch_grid(cfg.store.patch_grid, cfg.teacher.id, cfg.teacher.revision)
    fingerprint = file_fingerprint(listing.sources)
    store = main_first(rank, lambda: _resume(out, cfg, fingerprint, overwrite),
                       lambda: _resume(out, cfg, fingerprint, False))
    if store is not None and store.reader.complete:
        logger.info(f"{out} is already complete; nothing to do")
        return {"views": 0}
    from featurestore.teachers import load_teacher
    t0 = time.perf_counter()
    teacher = load_teacher(cfg.teacher.id, cfg.teacher.revision, cfg.device, cfg.teacher.dtype)
    clock["load_s"] = time.perf_counter() - t0
    if store is None:
        store = main_first(rank, lambda: _create(out, cfg, listing, fingerprint, teacher),
                           lambda: StoreWriter.open(out, options))
    elif store.attrs.get("rewrite_index") and rank.main:
        _rewrite_index(store, cfg, listing, teacher)
    if teacher.info.embed_dim != store.attrs["embed_dim"]:
        raise StoreError(f"{out} was built with embed_dim {store.attrs['embed_dim']}, this teacher has "
                         f"{teacher.info.embed_dim}")
    paths, shas = _paths_and_shas(store, listing)
    mine = pending_chunks(store.reader, rank)

    def decoding() -> Decoded:                     # the pass's images; its workers start when it is made
        return Decoded(store.reader, cfg, teacher, images_of(store.reader, mine), paths, shas)
    fit_basis_first = bool(cfg.store.patch_dim) and not store.attrs.get("patch_basis_fitted")
    images = None if fit_basis_first else decoding()          # before the compile, unless the basis decodes first
    try:
        t0 = time.perf_counter()
        prepare_teacher(teacher, cfg, store.reader.chunk_size * store.reader.views_per_image,
                        store.attrs["patch_grid"])
        clock["compile_s"] = time.perf_counter() - t0
        text_head = _zeroshot_head(store, teacher, rank)
        basis = None
        if cfg.store.patch_dim:
            if rank.main and not store.attrs.get("patch_basis_fitted"):
                store_basis(store, fit_patch_basis(store.reader, teacher, cfg, paths, shas))
            rank.barrier()
            basis = load_basis(store.reader)
        images = images or decoding()
        t0 = time.perf_counter()
        views_run, stages = teacher_pass(store, teacher, cfg, rank, mine, images, basis, lock.check if lock else None)
    finally:
        if images is not None:
            images.close()
    clock["pass_s"] = time.perf_counter() - t0
    rank.barrier()
    if rank.main:
        missing = int((~store.reader.done()).sum())
        if missing:
            raise StoreError(f"{missing} chunk(s) of {out} are not done; run the same command again to resume")
        t0 = time.perf_counter()
        from featurestore.heads import fit_heads  # scikit-learn: loaded by the one process that fits
        metrics = fit_heads(store, cfg, text_head)
        clock["heads_s"] = time.perf_counter() - t0
        store.set_attrs({"metrics": metrics, "complete": True, "finished": now(),
                         "last_build": {"device": str(teacher.device), "ranks": rank.world, "views": views_run,
                                        "batch": teacher.batch, "compiled": teacher.compiled, "stages": stages,
                                        "seconds": {k: round(v, 2) for k, v in clock.items() if k != "start"}}})
        t0 = time.perf_counter()
        seal_with_digest(store)
        logger.info(f"verified {out} and recorded its digest {store.attrs['digest']} "
                    f"({time.perf_counter() - t0:.1f}s)")
    store.close()
    total = time.perf_counter() - clock.pop("start")
    stats = {"views": views_run, "total_s": total, "batch": teacher.batch, "compiled": teacher.compiled,
             "stages": stages} | clock
    if views_run:
        logger.info("teacher pass stages (s): " + ", ".join(f"{k} {v:.2f}" for k, v in stages.items())
                    + f"; batch {teacher.batch}, {'compiled' if teacher.compiled else 'eager'}")
        logger.info(f"done: {out}  teacher pass {views_run} views in {stats['pass_s']:.1f}s "
                    f"({views_run / stats['pass_s']:.2f} views/s), total {total:.1f}s "
                    f"(model load {stats['load_s']:.1f}s, compile {stats['compile_s']:.1f}s, "
                    f"heads {stats.get('heads_s', 0.0):.1f}s)")
    return stats


def main_first(rank: Rank, main: Callable[[], T], others: Callable[[], T]) -> T:
    """Rank 0 runs `main` (it decides: resume, refuse, overwrite, create); the others then run `others`
    and see what it left. Should rank 0 stop, every rank stops with its reason."""
    result, error = None, None
    if rank.main:
        try:
            result = main()
        except Exception as e:  # noqa: BLE001 - raised below, after the other ranks heard of it
            error = e
    stopped = rank.share(None if error is None else " ".join(str(error).split()))
    if error is not None:
        raise error
    if stopped is not None:
        raise KdstoreError(f"{rank.prefix}rank 0 stopped: {stopped}")
    return result if rank.main else others()


# ---- the lock and the disk -------------------------------------------------------------------
@contextlib.contextmanager
def build_lock(out: str, rank: Rank, options: dict):
    """One lock for every writer of `out`, taken before any other work: `<out>.lock`, a POSIX lock on a
    disk or a lease in a bucket. Rank 0 takes it for all the ranks of its build (a 1-process and an
    N-process build exclude each other); yields it on rank 0, None on the others."""
    with contextlib.ExitStack() as stack:
        yield main_first(rank, lambda: stack.enter_context(store_lock(out, "build", options)), lambda: None)


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


# ---- open: resume, or make room --------------------------------------------------------------
def _resume(out: str, cfg: BuildConfig, fingerprint: str, overwrite: bool) -> StoreWriter | None:
    """The store to resume at `out`, or None to create one there (nothing there, an empty folder, or a
    store kdstore made and --overwrite). Anything else at `out` is refused and left untouched."""
    options = cfg.storage_options
    if not occupied(out, options):
        return None
    if overwrite:
        remove_store(out, _protected(cfg), options)
        return None
    try:
        store = StoreWriter.open(out, options)
    except StoreError as e:
        why = not_a_kdstore_store(out, options)
        if why is not None:
            raise StoreError(f"{out} exists and is not a store kdstore made ({why}); choose another --out "
                             "(kdstore deletes only stores it made)") from None
        raise StoreError(f"{out} exists but is not a usable store ({e}); pass --overwrite to rebuild it") from None
    diffs = config_diff(stored_identity(store.attrs.get("identity", {})), cfg.identity())
    if diffs:
        raise ConfigError(f"{out} was built with a different configuration; refusing to mix them: "
                          + "; ".join(diffs) + ". Use a new --out, or --overwrite to rebuild")
    if store.attrs.get("fingerprint") != fingerprint:
        raise ConfigError(f"the images under {cfg.images or cfg.manifest} changed since {out} was started "
                          "(files added, removed or resized); use a new --out, or --overwrite")
    r = store.reader
    logger.info(f"resuming {out}: {int(r.done().sum())}/{r.num_chunks} chunks done")
    return store


def _protected(cfg: BuildConfig) -> dict[str, Path]:
    """Folders --overwrite never deletes, nor any folder that holds one of them."""
    out = {"the current directory": Path.cwd(), "your home folder": Path.home()}
    for what, p in (("the input images", cfg.images), ("the unlabelled images", cfg.unlabeled),
                    ("the manifest", cfg.manifest)):
        if p:
            out[f"{what} ({p})"] = Path(p)
    return out


# ---- scan and create -------------------------------------------------------------------------
def _create(out: str, cfg: BuildConfig, listing: Listing, fingerprint: str, teacher) -> StoreWriter:
    res = scan(listing, cfg, decode_side(teacher.pre.size, cfg.store.image_size))
    n, chunk = len(res.valid), min(cfg.store.chunk_size, len(res.valid))
    index = make_index(res, cfg, chunk)
    heads = cfg.probe.heads + (["zeroshot"] if teacher.info.has_text and cfg.teacher.zeroshot else [])
    unlabeled = int((index.labels < 0).sum())
    attrs = {
        "format_version": FORMAT_VERSION, "classes": listing.classes, "num_images": n,
        "num_unlabeled": unlabeled, "views_per_image": cfg.views.views, "image_size": cfg.store.image_size,
        "chunk_size": chunk, "embed_dim": teacher.info.embed_dim, "patch_grid": cfg.store.patch_grid,
        "token_dim": teacher.info.token_dim or teacher.info.embed_dim,
        "patch_dim": cfg.store.patch_dim or teacher.info.token_dim or teacher.info.embed_dim, "heads": heads,
        "param_names": list(views.PARAM_NAMES), "teacher": to_dict(teacher.info),
        "prompts": prompts_for(listing.classes, cfg) if "zeroshot" in heads else [],
        "view_policy": to_dict(cfg.views), "identity": cfg.identity(), "config": to_dict(cfg),
        "fingerprint": fingerprint, **record(), "created": now(),
        "id_bytes": max(len(i.encode()) for i in index.ids), "checksums": backend_class(out).checksum,
        "report": {"files_found": len(listing.sources) + len(listing.ignored), "images": n,
                   "labelled": n - unlabeled, "unlabeled": unlabeled,
                   "skipped": [{"id": i, "reason": r} for i, r in res.skipped], "converted": res.converted,
                   "notes": [{"id": i, "note": t} for i, t in res.notes]},
        "complete": False,
    }
    logger.info(f"creating {out}: {n} images ({unlabeled} unlabelled) x {cfg.views.views} views, "
                f"{len(res.skipped)} skipped")
    store = StoreWriter.create(out, attrs | {"format_version": None}, cfg.store.compression, cfg.storage_options)
    write_index(store, index)
    store.set_attrs({"format_version": FORMAT_VERSION})          # readable as a store from here on
    store.flush()
    return store


def _rewrite_index(store: StoreWriter, cfg: BuildConfig, listing: Listing, teacher) -> None:
    """Rewrite the arrays written at creation (after `verify --fix` found them damaged)."""
    logger.info(f"rewriting the index arrays of {store.path} from the image files")
    res = scan(listing, cfg, decode_side(teacher.pre.size, store.attrs["image_size"]))
    index = make_index(res, cfg, store.reader.chunk_size)
    if len(index.ids) != store.reader.num_images:
        raise StoreError(f"{store.path}: the images now give {len(index.ids)} usable files, the store holds "
                         f"{store.reader.num_images}; rebuild it with --overwrite")
    write_index(store, index)
    store.set_attrs({"rewrite_index": False})
    store.flush()


def _paths_and_shas(store: StoreWriter, listing: Listing) -> tuple[list[str], list[str]]:
    """Current file path and stored sha256 of every store image, by id."""
    by_id = {s.rel: s.path for s in listing.sources}
    shas = [row.tobytes().hex() for row in store.reader.read("sha256")]
    return [by_id[i] for i in store.reader.ids()], shas


# ---- the zero-shot head's prompts ------------------------------------------------------------
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


def _zeroshot_head(store: StoreWriter, teacher, rank: Rank):
    """On rank 0: the text tower's class embeddings (C, D), logit_scale and logit_bias, stored (the heads
    phase scores the stored embeddings with them, in one place whatever the ranks); else None."""
    if not rank.main or "zeroshot" not in store.reader.heads():
        return None
    text, scale, bias = teacher.text_head(store.attrs["prompts"])
    head = {"text_embeds": text.cpu().numpy(), "logit_scale": np.float32(scale), "logit_bias": np.float32(bias)}
    store.write_head("zeroshot", head)
    return head
