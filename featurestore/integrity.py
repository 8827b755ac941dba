"""`featurestore verify [--fix]`: read every chunk of every array and say, one line each, what is wrong.

Problems: checksum mismatches, unreadable or missing chunks (a deleted shard, a damaged shard
index), non-finite or constant teacher outputs (all-zero: never written), values outside their range.
`fix` marks what the same `featurestore build` command can recompute: damaged chunks of the teacher
pass become not done, damaged index arrays are rewritten from the image files, damaged heads are
refitted; the build then repairs exactly those.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from featurestore import views
from featurestore.lock import store_lock
from featurestore.reader import ChunkError, StoreReader
from featurestore.schema import INDEX_FIELDS, NO_LABEL, PROGRESS, SPLIT_UNLABELED, StoreError, bad_target_rows
from featurestore.writer import StoreWriter

PASS_ARRAYS = ("images", "teacher/pooled", "teacher/patches")                              # teacher pass
TEACHER_OUTPUTS = ("teacher/pooled", "teacher/patches", "teacher/logits/zeroshot", "teacher/logits/probe")


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


def check(path: str, fix: bool = False, storage_options: dict | None = None) -> tuple[list[Problem], list[str]]:
    """Open the store at `path` and verify it; with fix, mark what is damaged (see `fix`), holding the
    build lock as a build does, so that no build writes the store meanwhile. Returns the problems and
    what was marked. A store that cannot be opened raises StoreError."""
    if not fix:
        with StoreReader.open(path, storage_options) as store:
            return verify(store), []
    with store_lock(path, "build", storage_options), StoreWriter.open(path, storage_options) as writer:
        problems = verify(writer.reader)
        actions = fix_store(writer, problems) if problems else []
        if actions:
            writer.seal()
        return problems, actions


def verify(store: StoreReader) -> list[Problem]:
    """Every problem found; an empty list means the store is whole (links out of a store are refused
    when it is opened, naming them)."""
    problems: list[Problem] = []
    try:
        done = store.done()
    except ChunkError as e:
        problems.append(Problem(PROGRESS.name, None, None, _describe(e)))
        done = np.ones(store.num_chunks, bool)
    waiting = np.flatnonzero(~done)
    if len(waiting):
        problems.append(Problem("progress/done", None, None, f"{len(waiting)} of {len(done)} chunks are not done "
                                f"{waiting[:10].tolist()}{' ...' if len(waiting) > 10 else ''}; run the build again"))
    for f in store.fields():
        per_chunk = f.kind != "index"
        for c in range(store.num_chunks):
            if per_chunk and not done[c]:
                continue
            if f.name.startswith("teacher/logits/") and not store.complete:
                continue
            problems += _check_chunk(store, f.name, c)
    problems += _check_index(store)
    for key in store.small_keys():
        try:
            value = store.small(key)
        except ChunkError as e:
            problems.append(Problem(key, None, None, _describe(e)))
            continue
        if value.dtype.kind == "f" and not np.isfinite(value).all():
            problems.append(Problem(key, None, None, "non-finite values"))
    if store.attrs.get("patch_dim") and store.attrs["patch_dim"] != store.attrs["embed_dim"] \
            and store.attrs.get("patch_basis_fitted") and "pca/patches/basis" not in store.small_keys():
        problems.append(Problem("pca/patches/basis", None, None, "missing"))
    if not store.complete and not len(waiting):
        problems.append(Problem("heads", None, None, "the heads are not fitted (the build did not finish); "
                                "run the build again"))
    return problems


def _describe(e: ChunkError) -> str:
    return _WORDS.get(e.kind, e.text)


def _check_chunk(store: StoreReader, name: str, c: int) -> list[Problem]:
    a, b = store.chunk_range(c)

    def problem(what: str) -> Problem:
        return Problem(name, c, (a, b), what)
    try:
        x = store.read(name, a, b)
    except ChunkError as e:
        return [problem(_describe(e))]
    out = []
    if name in TEACHER_OUTPUTS:                                    # per (image, view), as the trainer checks
        for what, rows in bad_target_rows(x, lead=2):
            out.append(problem(f"teacher outputs with {what} in images {_listing(a + np.flatnonzero(rows.any(1)))}"))
    elif x.dtype.kind == "f":
        bad = ~np.isfinite(x).reshape(len(x), -1).all(1)
        if bad.any():
            out.append(problem(f"non-finite values in images {_listing(a + np.flatnonzero(bad))}"))
    if name == "views/params":
        out += [problem(w) for w in _param_problems(store, x, a, b)]
    return out


def _param_problems(store: StoreReader, params: np.ndarray, a: int, b: int) -> list[str]:
    out = []
    if not np.allclose(params[:, 0], views.canonical_params()):
        out.append("view 0 is not canonical")
    box = params[..., :4]
    if (box < 0).any() or (box > 1).any() or (box[..., 2] <= box[..., 0]).any() or (box[..., 3] <= box[..., 1]).any():
        out.append("invalid crop boxes")
    partner = params[..., views.COL["mix_partner"]]
    if ((partner >= 0) & ((partner < a) | (partner >= b))).any():
        out.append("mix partners outside their chunk")
    return out


def _check_index(store: StoreReader) -> list[Problem]:
    """Whole-store checks of the index arrays (each read chunk by chunk first, so damage is named)."""
    try:
        labels, split, ids = store.read("labels"), store.read("split"), store.ids()
    except ChunkError:
        return []                                   # already reported by the chunk pass
    c, folds = len(store.classes), store.attrs["identity"]["probe"]["folds"]
    out = []
    if labels.min() < NO_LABEL or labels.max() >= c:
        out.append(Problem("labels", None, None, f"labels outside {NO_LABEL}..{c - 1}"))
    if split.min() < SPLIT_UNLABELED or split.max() >= folds or ((labels < 0) != (split == SPLIT_UNLABELED)).any():
        out.append(Problem("split", None, None, f"split values outside {SPLIT_UNLABELED}..{folds - 1} or not matching "
                           "the labels"))
    if len(set(ids)) != len(ids):
        out.append(Problem("ids", None, None, "ids are repeated"))
    return out


def _listing(idx: np.ndarray) -> str:
    return ", ".join(map(str, idx[:8].tolist())) + (f" and {len(idx) - 8} more" if len(idx) > 8 else "")


def fix_store(store: StoreWriter, problems: list[Problem]) -> list[str]:
    """Mark what the build command will recompute; returns what was done, one sentence each."""
    redo: set[int] = set()
    actions, refit, index = [], False, False
    for p in problems:
        if p.array in PASS_ARRAYS and p.chunk is not None:
            redo.add(p.chunk)
        elif p.array.startswith(("teacher/logits/", "heads/")) or p.array == "heads":
            refit = True
        elif p.array in INDEX_FIELDS:
            index = True
        elif p.array.startswith("pca/"):
            redo.update(range(store.reader.num_chunks))
            store.set_attrs({"patch_basis_fitted": False})
            actions.append("the patch basis will be fitted again and every chunk recomputed with it")
        elif p.array == PROGRESS.name and p.chunk is None and "not done" not in p.what:
            actions.append(_rewrite_done(store, problems))
    if index:
        store.set_attrs({"rewrite_index": True})
        actions.append("the index arrays (labels, split, ids, sha256, view params) will be rewritten from the image "
                       "files")
        refit = True
    for c in sorted(redo):
        store.mark_done(c, False)
    if redo:
        actions.append(f"{len(redo)} chunk(s) marked not done: {sorted(redo)[:20]}")
        refit = True
    if refit:
        store.set_attrs({"complete": False})
        actions.append("the heads will be fitted again")
    store.flush()
    return actions


def _rewrite_done(store: StoreWriter, problems: list[Problem]) -> str:
    """A damaged progress array: every chunk whose pass arrays are whole counts as done again."""
    bad = {p.chunk for p in problems if p.array in PASS_ARRAYS and p.chunk is not None}
    r = store.reader
    done = np.array([c not in bad and not any(_check_chunk(r, f.name, c) for f in r.fields()
                                              if f.name in PASS_ARRAYS) for c in range(r.num_chunks)])
    store.reset_done(done)
    return f"progress/done rewritten: {int(done.sum())}/{len(done)} chunks done"


__all__ = ["Problem", "check", "verify", "fix_store", "StoreError"]
