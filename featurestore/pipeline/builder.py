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
import dataclasses
import errno
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import numpy as np

from featurestore import views
from featurestore.common.errors import KdstoreError
from featurestore.common.lock import store_lock
from featurestore.common.log import logger
from featurestore.common.options import ConfigError, config_diff, to_dict
from featurestore.common.provenance import now, record
from featurestore.common.ranks import Rank, check_launch
from featurestore.pipeline.config import BuildConfig, stored_identity
from featurestore.pipeline.index import make_index, write_index
from featurestore.pipeline.pass_parts import Decoded
from featurestore.pipeline.scan import decode_side, scan
from featurestore.pipeline.sources import Listing, class_display_name, discover, file_fingerprint
from featurestore.pipeline.teacher_pass import (
    fit_patch_basis,
    images_of,
    load_basis,
    pending_chunks,
    prepare_teacher,
    store_basis,
    teacher_pass,
)
from featurestore.store.backends import backend_class
from featurestore.store.integrity import seal_with_digest
from featurestore.store.schema import FORMAT_VERSION, StoreError, store_attrs
from featurestore.store.writer import StoreWriter, not_a_kdstore_store, occupied, remove_store
from featurestore.teachers import check_patch_grid

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
    entries = resolve_teachers(cfg.teacher.entries(), cfg.teacher.revision)
    for _, spec in entries:
        check_patch_grid(cfg.store.patch_grid, spec, cfg.teacher.revision)
    fingerprint = file_fingerprint(listing.sources)
    identity = build_identity(cfg, entries)
    store = main_first(rank, lambda: _resume(out, cfg, identity, fingerprint, overwrite),
                       lambda: _resume(out, cfg, identity, fingerprint, False))
    if store is not None and store.reader.complete:
        logger.info(f"{out} is already complete; nothing to do")
        return {"views": 0}
    teachers = _load(entries, cfg, clock)
    if store is None:
        store = main_first(rank, lambda: _create(out, cfg, identity, listing, fingerprint, teachers),
                           lambda: StoreWriter.open(out, options))
    elif store.attrs.get("rewrite_index") and rank.main:
        _rewrite_index(store, cfg, listing, next(iter(teachers.values())))
    for name, teacher in teachers.items():
        held = store.reader.teacher(name).embed_dim
        if teacher.info.embed_dim != held:
            raise StoreError(f"{out} was built with a teacher {name!r} {held} wide; this one is "
                             f"{teacher.info.embed_dim}")
    return _pass_and_heads(store, teachers, cfg, rank, listing, lock, clock, images=True)


def add_teacher(cfg: BuildConfig, store_path: str) -> dict:
    """`featurestore add-teacher`: the --teacher(s) of cfg over the very views a finished store holds,
    each in a group of its own, resumable like a build; the same arrays as building with them all at once."""
    cfg.validate(out=False)
    check_launch()
    rank = Rank.from_env()
    cfg = dataclasses.replace(cfg, out=store_path)
    try:
        with build_lock(store_path, rank, cfg.storage_options) as lock, disk_errors(store_path):
            return _add(cfg, rank, lock)
    finally:
        rank.close()


def _add(cfg: BuildConfig, rank: Rank, lock) -> dict:
    clock = {"start": time.perf_counter()}
    out = cfg.out
    store = StoreWriter.open(out, cfg.storage_options)
    if store.attrs["format_version"] < 3:
        raise StoreError(f"{out} is a version {store.attrs['format_version']} store, which holds one teacher; "
                         "rebuild it with this kdstore (--overwrite) to add teachers")
    built = stored_identity(store.attrs["identity"])
    listing = discover(cfg.images, cfg.manifest, cfg.classes_file, cfg.unlabeled, cfg.allow_outside_paths)
    if store.attrs.get("fingerprint") != file_fingerprint(listing.sources):
        raise ConfigError(f"the images under {cfg.images or cfg.manifest} are not the ones {out} was built from "
                          "(files added, removed or resized); a teacher is added over the very same images")
    entries = resolve_teachers(cfg.teacher.entries(), cfg.teacher.revision)
    held = {t.name: t for t in store.reader.teachers}
    known = dict(e.split("=", 1) for e in built["teacher"]["id"] if "=" in e)
    for name, spec in entries:
        if name in held and known.get(name) != spec:
            raise ConfigError(f"{out} has a teacher {name!r} already ({held[name].info['id']}); name this one "
                              "otherwise (--teacher NAME=ID)")
        check_patch_grid(store.attrs["patch_grid"], spec, cfg.teacher.revision)
    new = [(name, spec) for name, spec in entries if name not in held or not store.reader.done(name).all()
           or not held[name].attrs.get("complete")]
    if not new:
        logger.info(f"{out} holds every teacher asked for; nothing to do")
        return {"views": 0}
    teachers = _load(new, cfg, clock)
    if rank.main:
        for name, teacher in teachers.items():
            if name not in held:
                store.add_teacher(name, teacher_attrs(teacher, cfg, listing.classes, store.attrs["patch_grid"]),
                                  store.attrs.get("config", {}).get("store", {}).get("compression", "default"))
        ids = list(built["teacher"]["id"]) + [f"{n}={s}" for n, s in new if n not in held]
        store.set_attrs({"complete": False, "identity": built | {"teacher": built["teacher"] | {"id": ids}}})
    rank.barrier()
    if not rank.main:
        store.reader.refresh()
    return _pass_and_heads(store, teachers, cfg, rank, listing, lock, clock, images=False)


def _load(entries: list[tuple[str, str]], cfg: BuildConfig, clock: dict) -> dict:
    from featurestore.teachers import load_teacher
    t0 = time.perf_counter()
    teachers = {name: load_teacher(spec, cfg.teacher.revision, cfg.device, cfg.teacher.dtype) for name, spec in entries}
    clock["load_s"] = time.perf_counter() - t0
    return teachers


def _pass_and_heads(store: StoreWriter, teachers: dict, cfg: BuildConfig, rank: Rank, listing: Listing, lock,
                    clock: dict, images: bool) -> dict:
    """The teacher pass over this rank's unfinished chunks, then (rank 0) the heads, the digest.
    images: the pass writes the store's images too (a build; adding a teacher writes only its arrays)."""
    out = store.path
    first = next(iter(teachers.values()))
    paths, shas = _paths_and_shas(store, listing)
    mine = pending_chunks(store.reader, rank, list(teachers), images)

    def decoding() -> Decoded:                     # the pass's images; its workers start when it is made
        return Decoded(store.reader, cfg.decoding(), list(teachers.values()), images_of(store.reader, mine), paths,
                       shas)
    basis_first = bool(cfg.store.patch_dim) and not all(store.reader.teacher(n).attrs.get("patch_basis_fitted")
                                                        for n in teachers)
    decoded = None if basis_first else decoding()          # before the compile, unless a basis decodes first
    try:
        t0 = time.perf_counter()
        for teacher in teachers.values():
            prepare_teacher(teacher, cfg.teacher, store.reader.chunk_size * store.reader.views_per_image,
                            store.attrs["patch_grid"])
        clock["compile_s"] = time.perf_counter() - t0
        text_heads = {name: _zeroshot_head(store, name, teacher, rank) for name, teacher in teachers.items()}
        bases = {}
        for name, teacher in teachers.items():
            if store.reader.teacher(name).patch_dim == store.reader.teacher(name).token_dim:
                bases[name] = None
                continue
            if rank.main and not store.reader.teacher(name).attrs.get("patch_basis_fitted"):
                store_basis(store, name, fit_patch_basis(store.reader, name, teacher, cfg.teacher, cfg.decoding(),
                                                         cfg.store.pca_images, paths, shas))
            rank.barrier()
            store.reader.refresh()
            bases[name] = load_basis(store.reader, name)
        decoded = decoded or decoding()
        t0 = time.perf_counter()
        views_run, stages = teacher_pass(store, teachers, cfg.teacher, rank, mine, decoded, bases, images,
                                         lock.check if lock else None)
    finally:
        if decoded is not None:
            decoded.close()
    clock["pass_s"] = time.perf_counter() - t0
    rank.barrier()
    if rank.main:
        store.reader.refresh()
        missing = int(sum((~store.reader.done(n)).sum() for n in teachers) + (~store.reader.done()).sum())
        if missing:
            raise StoreError(f"{missing} chunk(s) of {out} are not done; run the same command again to resume")
        t0 = time.perf_counter()
        from featurestore.pipeline.heads import fit_heads  # scikit-learn: loaded by the one process that fits
        for name in teachers:
            metrics = fit_heads(store, cfg.probe, name, text_heads[name])
            store.set_teacher_attrs(name, {"metrics": metrics, "complete": True})
        clock["heads_s"] = time.perf_counter() - t0
        store.set_attrs({"complete": True, "finished": now(),
                         "last_build": {"device": str(first.device), "ranks": rank.world, "views": views_run,
                                        "teachers": list(teachers), "batch": first.batch, "compiled": first.compiled,
                                        "stages": stages,
                                        "seconds": {k: round(v, 2) for k, v in clock.items() if k != "start"}}})
        t0 = time.perf_counter()
        seal_with_digest(store)
        logger.info(f"verified {out} and recorded its digest {store.attrs['digest']} "
                    f"({time.perf_counter() - t0:.1f}s)")
    store.close()
    total = time.perf_counter() - clock.pop("start")
    stats = {"views": views_run, "total_s": total, "batch": first.batch, "compiled": first.compiled,
             "stages": stages} | clock
    if views_run:
        logger.info("teacher pass stages (s): " + ", ".join(f"{k} {v:.2f}" for k, v in stages.items())
                    + f"; batch {first.batch}, {'compiled' if first.compiled else 'eager'}")
        logger.info(f"done: {out}  teacher pass {views_run} views in {stats['pass_s']:.1f}s "
                    f"({views_run / stats['pass_s']:.2f} views/s), total {total:.1f}s "
                    f"(model load {stats['load_s']:.1f}s, compile {stats['compile_s']:.1f}s, "
                    f"heads {stats.get('heads_s', 0.0):.1f}s)")
    return stats


def resolve_teachers(entries: list[tuple[str | None, str]], revision: str | None) -> list[tuple[str, str]]:
    """(name, spec) of each --teacher: an unnamed one takes its family's name (siglip, dinov2, clip, auto),
    numbered where several share one."""
    from featurestore.teachers import describe
    out: list[tuple[str, str]] = []
    taken = {name for name, _ in entries if name}
    for name, spec in entries:
        if name is None:
            base = describe(spec, revision)[0].family
            name, k = base, 2
            while name in taken:
                name, k = f"{base}{k}", k + 1
            taken.add(name)
        out.append((name, spec))
    return out


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
def _resume(out: str, cfg: BuildConfig, identity: dict, fingerprint: str, overwrite: bool) -> StoreWriter | None:
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
    if store.attrs["format_version"] < FORMAT_VERSION:
        if store.reader.complete:
            return store                                  # finished by an older kdstore: read as it is
        store.close()
        raise StoreError(f"{out} is an unfinished store of format version {store.attrs['format_version']}, written by "
                         "an older kdstore: finish it with that release, or rebuild it (--overwrite)")
    diffs = config_diff(stored_identity(store.attrs.get("identity", {})), identity)
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
def teacher_attrs(teacher, cfg: BuildConfig, classes: list[str], patch_grid: int) -> dict:
    """A teacher's attributes in a store: what it is, its widths, its heads and prompts."""
    heads = cfg.probe.heads + (["zeroshot"] if teacher.info.has_text and cfg.teacher.zeroshot else [])
    token = teacher.info.token_dim or teacher.info.embed_dim
    return {"teacher": to_dict(teacher.info), "embed_dim": teacher.info.embed_dim, "token_dim": token,
            "patch_dim": (cfg.store.patch_dim or token) if patch_grid else token, "heads": heads,
            "prompts": prompts_for(classes, cfg) if "zeroshot" in heads else [], "complete": False}


def build_identity(cfg: BuildConfig, entries: list[tuple[str, str]]) -> dict:
    """The settings that decide a store's content, its teachers by the names they get."""
    identity = cfg.identity()
    identity["teacher"]["id"] = [f"{name}={spec}" for name, spec in entries]
    return identity


def _create(out: str, cfg: BuildConfig, identity: dict, listing: Listing, fingerprint: str,
            teachers: dict) -> StoreWriter:
    first = next(iter(teachers.values()))
    res = scan(listing, cfg.decoding(), decode_side(first.pre.size, cfg.store.image_size))
    n, chunk = len(res.valid), min(cfg.store.chunk_size, len(res.valid))
    index = make_index(res, cfg.probe, cfg.views, chunk)
    unlabeled = int((index.labels < 0).sum())
    attrs = store_attrs(
        classes=listing.classes, num_images=n, views=cfg.views.views, image_size=cfg.store.image_size,
        chunk_size=chunk, patch_grid=cfg.store.patch_grid, param_names=list(views.PARAM_NAMES),
        teachers={name: teacher_attrs(t, cfg, listing.classes, cfg.store.patch_grid) for name, t in teachers.items()},
        num_unlabeled=unlabeled, view_policy=to_dict(cfg.views), identity=identity, config=to_dict(cfg),
        fingerprint=fingerprint, id_bytes=max(len(i.encode()) for i in index.ids),
        checksums=backend_class(out).checksum, complete=False,
        report={"files_found": len(listing.sources) + len(listing.ignored), "images": n,
                "labelled": n - unlabeled, "unlabeled": unlabeled,
                "skipped": [{"id": i, "reason": r} for i, r in res.skipped], "converted": res.converted,
                "notes": [{"id": i, "note": t} for i, t in res.notes]}) | record() | {"created": now()}
    logger.info(f"creating {out}: {n} images ({unlabeled} unlabelled) x {cfg.views.views} views, "
                f"{len(res.skipped)} skipped; teachers {', '.join(teachers)}")
    store = StoreWriter.create(out, attrs | {"format_version": None}, cfg.store.compression, cfg.storage_options)
    write_index(store, index)
    store.set_attrs({"format_version": FORMAT_VERSION})          # readable as a store from here on
    store.flush()
    return store


def _rewrite_index(store: StoreWriter, cfg: BuildConfig, listing: Listing, teacher) -> None:
    """Rewrite the arrays written at creation (after `verify --fix` found them damaged)."""
    logger.info(f"rewriting the index arrays of {store.path} from the image files")
    res = scan(listing, cfg.decoding(), decode_side(teacher.pre.size, store.attrs["image_size"]))
    index = make_index(res, cfg.probe, cfg.views, store.reader.chunk_size)
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


def _zeroshot_head(store: StoreWriter, name: str, teacher, rank: Rank):
    """On rank 0: a teacher's class embeddings (C, D), logit_scale and logit_bias, stored (the heads phase
    scores the stored embeddings with them, in one place whatever the ranks); else None."""
    if not rank.main or "zeroshot" not in store.reader.heads(name):
        return None
    text, scale, bias = teacher.text_head(store.reader.teacher(name).attrs["prompts"])
    head = {"text_embeds": text.cpu().numpy(), "logit_scale": np.float32(scale), "logit_bias": np.float32(bias)}
    store.write_head(name, "zeroshot", head)
    return head
