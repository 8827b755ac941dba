"""`featurestore verify [--fix] [--digest HEX]`: read every chunk of every array and say, one line
each, what is wrong.

Problems: checksum mismatches, unreadable or missing chunks (a deleted shard, a damaged shard
index), arrays of another shape or dtype than the format lays out, non-finite or constant teacher
outputs (all-zero: never written), labels, splits and ids that cannot be, view params that are not the
ones the view seed draws (rows swapped or edited), and a store digest that differs from the one its
build recorded (or from the published one). The whole-store checks (`index_problems`) are the very
ones `trainer fit` refuses a store on. `fix` marks what the same `featurestore build` command can
recompute: damaged chunks of the teacher pass become not done, damaged index arrays are rewritten
from the image files, damaged heads are refitted; the build then repairs exactly those.
"""
from __future__ import annotations

import contextlib
from collections import Counter
from dataclasses import dataclass

import numpy as np

from featurestore import views
from featurestore.common.lock import store_lock
from featurestore.common.options import ConfigError
from featurestore.pipeline.config import stored_policy
from featurestore.store.digest import Digest
from featurestore.store.reader import ChunkError, StoreReader
from featurestore.store.schema import (
    FORMAT_VERSION,
    NO_LABEL,
    SPLIT_UNLABELED,
    StoreError,
    bad_target_rows,
    progress_fields,
    small_arrays,
)
from featurestore.store.writer import StoreWriter


@dataclass(frozen=True)
class Problem:
    array: str
    chunk: int | None          # store chunk; None for a whole small array or the store itself
    images: tuple[int, int] | None
    what: str

    def line(self) -> str:
        where = self.array
        if self.chunk is not None:
            where += f" chunk {self.chunk}"
        if self.images is not None:
            where += f" (images {self.images[0]}..{self.images[1] - 1})"
        return f"{where}: {self.what}"


_WORDS = {"checksum": "checksum mismatch (the bytes on disk were changed)",
          "missing": "missing (file deleted or never written)"}


@dataclass
class Verification:
    problems: list[Problem]
    digest: str | None          # the store digest computed from what was read; None where it is not whole
    recorded: str | None        # the digest its build recorded


def check(path: str, fix: bool = False, storage_options: dict | None = None,
          published: str | None = None) -> tuple[Verification, list[str]]:
    """Open the store at `path` and verify it (against the `published` digest too, when given); with fix,
    mark what is damaged (see `fix`), holding the build lock as a build does, so that no build writes
    the store meanwhile. Returns what was found and what was marked. A store that cannot be opened
    raises StoreError."""
    if not fix:
        with StoreReader.open(path, storage_options, reader="featurestore verify") as store:
            return examine(store, published), []
    with store_lock(path, "build", storage_options), StoreWriter.open(path, storage_options) as writer:
        found = examine(writer.reader, published)
        actions = fix_store(writer, found.problems) if found.problems else []
        if actions:
            writer.seal()
        return found, actions


def verify(store: StoreReader) -> list[Problem]:
    """Every problem found; an empty list means the store is whole (links out of a store, and arrays of
    another layout, are refused when it is opened, naming them)."""
    return examine(store).problems


def examine(store: StoreReader, published: str | None = None) -> Verification:
    """verify's pass: every chunk of every array read and checked, the digest computed on the way."""
    problems: list[Problem] = []
    digest = Digest()
    done: dict[str | None, np.ndarray] = {}
    waiting = 0
    for marks in progress_fields(store.attrs):
        try:
            done[marks.teacher] = store.done(marks.teacher)
        except ChunkError as e:
            problems.append(Problem(marks.name, None, None, _describe(e)))
            done[marks.teacher] = np.ones(store.num_chunks, bool)
        left = np.flatnonzero(~done[marks.teacher])
        waiting += len(left)
        if len(left):
            problems.append(Problem(marks.name, None, None, f"{len(left)} of {store.num_chunks} chunks are not done "
                                    f"{left[:10].tolist()}{' ...' if len(left) > 10 else ''}; run the build again"))
    fitted = {t.name: t.attrs.get("complete", store.complete) for t in store.teachers}
    for f in store.fields():
        per_chunk = f.kind != "index"
        marks = done.get(f.teacher, done[None])
        for c in range(store.num_chunks):
            if per_chunk and not (marks[c] and done[None][c]):
                continue
            if f.written == "heads" and not (store.complete and fitted.get(f.teacher, True)):
                continue
            found, x = _check_chunk(store, f.name, c)
            problems += found
            if x is not None:
                digest.array(f.name, c, x)
    with contextlib.suppress(ChunkError):           # a damaged chunk: already named by the chunk pass
        problems += index_problems(store)
    for key in store.small_keys():
        try:
            value = store.small(key)
        except ChunkError as e:
            problems.append(Problem(key, None, None, _describe(e)))
            continue
        digest.small(key, value)
        if value.dtype.kind == "f" and not np.isfinite(value).all():
            problems.append(Problem(key, None, None, "non-finite values"))
    if store.complete:
        held = set(store.small_keys())
        problems += [Problem(key, None, None, "missing (the build writes it with the heads; run the build again "
                             "after `verify --fix`)") for key in small_arrays(store.attrs) if key not in held]
    if not store.complete and not waiting:
        problems.append(Problem("heads", None, None, "the heads are not fitted (the build did not finish); "
                                "run the build again"))
    whole = store.complete and not problems
    computed = digest.finish(store.attrs) if whole else None
    recorded = store.attrs.get("digest")
    if whole and recorded is not None and computed != recorded:
        problems.append(Problem("digest", None, None, f"the store's content gives the digest {computed}, not the "
                                f"{recorded} its build recorded: it was changed after the build (a chunk rewritten "
                                "with its checksum recomputed, or an attribute edited)"))
    if published is not None and computed != published.lower():
        got = computed or "not computable (see the problems above)"
        problems.append(Problem("digest", None, None, f"the store's digest is {got}, not the published {published}: "
                                "it is not the store that was published, or it was changed since"))
    return Verification(problems, computed, recorded)


def seal_with_digest(store: StoreWriter) -> None:
    """Read the finished store back as `verify` does and record its digest (the store must verify)."""
    store.set_attrs({"digest": None})                # a repaired store's old digest no longer holds
    store.seal()
    found = examine(store.reader)
    if found.problems:
        raise StoreError(f"{store.path} was written but does not verify: {found.problems[0].line()}"
                         + (f" (and {len(found.problems) - 1} more problems)" if len(found.problems) > 1 else ""))
    store.set_attrs({"digest": found.digest})
    store.seal()


def _describe(e: ChunkError) -> str:
    return _WORDS.get(e.kind, e.text)


def _check_chunk(store: StoreReader, name: str, c: int) -> tuple[list[Problem], np.ndarray | None]:
    """The problems of store chunk c of `name`, and its rows (None where they could not be read)."""
    a, b = store.chunk_range(c)

    def problem(what: str) -> Problem:
        return Problem(name, c, (a, b), what)
    try:
        x = store.read(name, a, b)
    except ChunkError as e:
        return [problem(_describe(e))], None
    out = []
    if store.field(name).teacher is not None:                     # per (image, view), as the trainer checks
        for what, rows in bad_target_rows(x, lead=2):
            out.append(problem(f"teacher outputs with {what} in images {_listing(a + np.flatnonzero(rows.any(1)))}"))
    elif x.dtype.kind == "f":
        bad = ~np.isfinite(x).reshape(len(x), -1).all(1)
        if bad.any():
            out.append(problem(f"non-finite values in images {_listing(a + np.flatnonzero(bad))}"))
    return out, x


def index_problems(store: StoreReader) -> list[Problem]:
    """The whole-store checks `verify` and `trainer fit` share: labels, splits and ids that cannot be,
    and view params that are not the ones the store's view seed draws. A damaged chunk of these arrays
    raises ChunkError."""
    labels, split, ids = store.read("labels"), store.read("split"), store.ids()
    c, folds = len(store.classes), store.attrs["identity"]["probe"]["folds"]
    out = []
    if labels.min() < NO_LABEL or labels.max() >= c:
        bad = np.flatnonzero((labels < NO_LABEL) | (labels >= c))
        values = sorted(set(labels[bad].tolist()))[:5]
        out.append(Problem("labels", None, None, f"labels outside {NO_LABEL}..{c - 1} ({values}) in images "
                           f"{_listing(bad)}"))
    if split.min() < SPLIT_UNLABELED or split.max() >= folds or ((labels < 0) != (split == SPLIT_UNLABELED)).any():
        out.append(Problem("split", None, None, f"split values outside {SPLIT_UNLABELED}..{folds - 1} or not matching "
                           "the labels"))
    twice = sorted(i for i, n in Counter(ids).items() if n > 1)
    if twice:
        out.append(Problem("ids", None, None, f"ids are repeated ({', '.join(twice[:3])}): one file stored as two "
                           "images"))
    if "views/params" in {f.name for f in store.fields()}:
        out += _param_problems(store, split)
    return out


def _param_problems(store: StoreReader, split: np.ndarray) -> list[Problem]:
    """View params are a pure function of the view policy, the image and the view (and the image's
    mixing group in its chunk): each row is drawn again and compared."""
    try:
        policy = stored_policy(store.attrs)
    except ConfigError as e:
        return [Problem("views/params", None, None, f"the store's view_policy attribute cannot be read ({e})")]
    groups, bad = views.mixing_groups(split), []
    for c in range(store.num_chunks):
        a, b = store.chunk_range(c)
        x = store.read("views/params", a, b)
        want = views.sample_params(policy, a, b, groups[a:b])
        bad += (a + np.flatnonzero(~(x == want).reshape(b - a, -1).all(1))).tolist()
    if not bad:
        return []
    return [Problem("views/params", None, None, f"the view params of images {_listing(np.array(bad))} are not the ones "
                    "the store's view seed draws (rows swapped or edited): the teacher scored other views than these "
                    "rows say")]


def _listing(idx: np.ndarray) -> str:
    return ", ".join(map(str, idx[:8].tolist())) + (f" and {len(idx) - 8} more" if len(idx) > 8 else "")


def fix_store(store: StoreWriter, problems: list[Problem]) -> list[str]:
    """Mark what the build command will recompute; returns what was done, one sentence each."""
    if store.attrs["format_version"] < FORMAT_VERSION:
        raise StoreError(f"{store.path} is a store of format version {store.attrs['format_version']}, written by an "
                         "older kdstore, which this one reads but does not repair: rebuild it (--overwrite)")
    r = store.reader
    kinds = {f.name: f for f in r.fields() + progress_fields(r.attrs)}
    redo: set[int] = set()
    actions, refit, index = [], False, False
    for p in problems:
        f = kinds.get(p.array)
        if f is not None and f.written == "pass" and p.chunk is not None:
            redo.add(p.chunk)
        elif (f is not None and f.written == "heads") or "/heads/" in p.array or "/stats/" in p.array \
                or p.array.startswith("heads") or p.array == "digest":
            refit = True
        elif f is not None and f.written == "creation":
            index = True
        elif "/pca/" in p.array:
            name = p.array.split("/")[1]
            redo.update(range(r.num_chunks))
            store.set_teacher_attrs(name, {"patch_basis_fitted": False})
            actions.append(f"the patch basis of {name} will be fitted again and every chunk recomputed with it")
        elif f is not None and f.kind == "progress" and p.chunk is None and "not done" not in p.what:
            actions.append(_rewrite_done(store, problems, f))
    if index:
        store.set_attrs({"rewrite_index": True})
        actions.append("the index arrays (labels, split, ids, sha256, view params) will be rewritten from the image "
                       "files")
        refit = True
    names = [t.name for t in r.teachers]
    for c in sorted(redo):
        store.mark_done(c, False, teachers=names)
    if redo:
        actions.append(f"{len(redo)} chunk(s) marked not done: {sorted(redo)[:20]}")
        refit = True
    if refit:
        store.set_attrs({"complete": False})
        for name in names:
            store.set_teacher_attrs(name, {"complete": False})
        actions.append("the heads will be fitted again")
    store.flush()
    return actions


def _rewrite_done(store: StoreWriter, problems: list[Problem], marks) -> str:
    """A damaged progress array: every chunk whose pass arrays (of its teacher, or the images) are whole
    counts as done again."""
    r = store.reader
    mine = [f.name for f in r.fields() if f.written == "pass" and (f.teacher == marks.teacher or
                                                                   (marks.teacher is None and f.teacher is None))]
    bad = {p.chunk for p in problems if p.array in mine and p.chunk is not None}
    done = np.array([c not in bad and not any(_check_chunk(r, name, c)[0] for name in mine)
                     for c in range(r.num_chunks)])
    store.reset_done(done, marks)
    return f"{marks.name} rewritten: {int(done.sum())}/{len(done)} chunks done"


__all__ = ["Problem", "Verification", "check", "examine", "fix_store", "index_problems", "verify", "StoreError"]
