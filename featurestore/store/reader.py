"""Reading a store: numpy arrays out, every read checked.

`StoreReader.open(path)` opens a store read-only, checks its format and that it holds its own data
(no links out of it), and serves the arrays the schema lays out. Every read goes through
`read`/`read_chunk`/`read_view`/`read_rows`, which turn a damaged, missing or unreadable chunk into
one ChunkError naming the array and the store chunk. The trainer's reads (a store chunk's images, one
view of a per-view array) come straight from the shard files where the backend allows it (checksums
checked there too); whatever that path cannot serve is read through the backend, which gives the
fill value or the canonical error.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from featurestore.common.errors import STORAGE_HINT
from featurestore.store.backends import Backend, is_local, local_path, open_backend
from featurestore.store.schema import (
    PROGRESS,
    Field,
    StoreError,
    TeacherLayout,
    check_attrs,
    fields,
    layouts,
    num_chunks,
    progress_fields,
    small_arrays,
    teacher_of,
    teachers,
)
from featurestore.store.shards import ShardReadError


class ChunkError(StoreError):
    """One stored chunk of one array is damaged, missing or unreadable (kind: checksum | missing | unreadable)."""

    def __init__(self, where: str, path: str, array: str, chunk: int | None, kind: str, text: str):
        self.array, self.chunk, self.kind, self.text = array, chunk, kind, text
        super().__init__(f"{path}: {where} {text}; run `featurestore verify --fix {path}`")


class StoreReader:
    """A kdstore store, for reading. `StoreReader.open(path)`; the writer hands out one over its own
    backend (`StoreWriter.reader`) for the reads a build makes of what it wrote."""

    def __init__(self, backend: Backend, lock=None):
        self.backend = backend
        self.path = backend.path
        self._attrs: dict[str, Any] | None = None
        self._lock = lock

    @classmethod
    def open(cls, path: str | Path, storage_options: dict | None = None, reader: str | None = None) -> StoreReader:
        """storage_options: fsspec options for a store at a URL (endpoint, credentials, ...). reader: who
        reads ("trainer fit"): hold a reader's lock until `close`, so that no build or repair changes the
        store meanwhile (and none is under way now); None: a short look, no lock."""
        lock = None
        if reader is not None:
            from featurestore.common.lock import reader_lock
            lock = reader_lock(str(path), reader, storage_options)
            lock.__enter__()
        try:
            return cls(open_checked(str(path), "r", storage_options), lock)
        except BaseException:
            if lock is not None:
                lock.__exit__(None, None, None)
            raise

    # ---- what the store is ---------------------------------------------------------------------
    @property
    def attrs(self) -> dict[str, Any]:
        if self._attrs is None:
            self._attrs = self.backend.get_attrs()
        return self._attrs

    def refresh(self) -> None:
        """Read the attributes again (after a writer changed them)."""
        self._attrs = None

    def fields(self) -> list[Field]:
        return fields(self.attrs)

    def field(self, name: str) -> Field:
        """The field of array `name` (a data array or progress marks)."""
        for f in fields(self.attrs) + progress_fields(self.attrs):
            if f.name == name:
                return f
        raise StoreError(f"{self.path} has no array {name!r}")

    @property
    def num_images(self) -> int:
        return self.attrs["num_images"]

    @property
    def views_per_image(self) -> int:
        return self.attrs["views_per_image"]

    @property
    def classes(self) -> list[str]:
        return list(self.attrs["classes"])

    @property
    def chunk_size(self) -> int:
        return self.attrs["chunk_size"]

    @property
    def num_chunks(self) -> int:
        return num_chunks(self.num_images, self.chunk_size)

    def chunk_range(self, c: int) -> tuple[int, int]:
        return c * self.chunk_size, min((c + 1) * self.chunk_size, self.num_images)

    @property
    def complete(self) -> bool:
        return bool(self.attrs.get("complete", False))

    @property
    def teachers(self) -> list[TeacherLayout]:
        return teachers(self.attrs)

    def teacher(self, name: str | None = None) -> TeacherLayout:
        """A teacher of the store by name (None: the first)."""
        return teacher_of(self.attrs, name)

    def heads(self, teacher: str | None = None) -> list[str]:
        """The heads whose logits the store holds, of a teacher (None: the first)."""
        t = self.teacher(teacher)
        return [h for h in t.heads if t.logits(h) not in self.attrs.get("dropped", ())]

    def __contains__(self, name: str) -> bool:
        return self.backend.has(name)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.backend.shape(name)

    def nbytes(self, name: str) -> int:
        """Bytes of the whole array, uncompressed."""
        return int(np.prod(self.shape(name))) * self.backend.dtype(name).itemsize

    def stored_bytes(self, name: str) -> int:
        return self.backend.stored_bytes(name)

    # ---- reads ------------------------------------------------------------------------------
    def done(self, teacher: str | None = None) -> np.ndarray:
        """(num_chunks,) which store chunks are finished: of the store's own pass (images, and every
        teacher that was built with it), or of one teacher's (version 3)."""
        name = PROGRESS.name if teacher is None else self.teacher(teacher).done.name
        with self._guard(name, None):
            return np.asarray(self.backend.read(name, slice(None)), dtype=bool)

    def ids(self) -> list[str]:
        return [x.decode() if isinstance(x, bytes) else str(x) for x in self.read("ids")]

    def read(self, name: str, start: int | None = None, stop: int | None = None) -> np.ndarray:
        """Rows [start, stop) of `name`, checked: a bad chunk raises ChunkError naming it. A whole store
        chunk of a per-image or per-view array comes straight from its shard."""
        n = self.backend.shape(name)[0]
        start, stop = start or 0, n if stop is None else stop
        c = start // self.chunk_size
        if name != PROGRESS.name and (start, stop) == self.chunk_range(c) and stop > start:
            return self.read_chunk(name, c)
        return self._read_rows(name, start, stop)

    def _read_rows(self, name: str, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) through the backend (which gives the fill value or the canonical error)."""
        chunks = range(start // self.chunk_size, max(start, stop - 1) // self.chunk_size + 1)
        try:
            self._check_present(name, chunks)
            with self._guard(name, None):
                return self.backend.read(name, slice(start, stop))
        except StoreError:
            for c in chunks:                       # name the first bad store chunk
                with self._guard(name, c):
                    self._check_present(name, [c])
                    a, b = self.chunk_range(c)
                    self.backend.read(name, slice(max(a, start), min(b, stop)))
            raise

    def read_chunk(self, name: str, c: int, out: np.ndarray | None = None) -> np.ndarray:
        """All rows of store chunk c of `name`, into `out` ((rows, ...) C-contiguous) if given."""
        a, b = self.chunk_range(c)
        direct = self.backend.direct(name)
        if direct is not None:
            try:
                if direct.per_shard[0] == direct.n_inner:              # rows tiled along N only (images)
                    return direct.rows(c, b - a, out)
                if out is None:
                    return direct.whole(c, b - a)                       # per-view arrays: every view
            except ShardReadError:
                pass                                   # the backend reads it: the fill value or the canonical error
        x = self._read_rows(name, a, b)
        if out is None:
            return x
        out[...] = x
        return out

    def read_view(self, name: str, c: int, k: int) -> np.ndarray:
        """View k of store chunk c of a per-view array: (chunk images, ...), one stored chunk."""
        a, b = self.chunk_range(c)
        direct = self.backend.direct(name)
        if direct is not None and direct.per_shard[1] == direct.n_inner:
            try:
                return direct.inner_chunk(c, k)[:b - a, 0]
            except ShardReadError:
                pass
        with self._guard(name, c):
            self._check_present(name, [c])
            return self.backend.read(name, (slice(a, b), k))

    def read_rows(self, name: str, rows: np.ndarray, view: int | None = None) -> np.ndarray:
        """Selected rows (sorted image indices), reading only the inner chunks that hold them."""
        rows = np.asarray(rows, dtype=np.int64)
        out = []
        for c in np.unique(rows // self.chunk_size):
            sel = rows[rows // self.chunk_size == c]
            with self._guard(name, int(c)):
                self._check_present(name, [int(c)])
                out.append(self.backend.read_rows(name, sel, view))
        shape = self.shape(name)[1:] if view is None else self.shape(name)[2:]
        return np.concatenate(out) if out else np.zeros((0,) + shape, self.backend.dtype(name))

    def head_arrays(self, head: str, teacher: str | None = None) -> dict[str, np.ndarray]:
        prefix = self.teacher(teacher).head_prefix(head)
        return {key[len(prefix):]: self.small(key) for key in self.small_keys() if key.startswith(prefix)}

    def small_keys(self) -> list[str]:
        """Keys of the small arrays the store holds (heads' weights and embeddings, patch bases, target
        statistics), as the schema lists them."""
        return sorted(k for k in small_arrays(self.attrs) if self.backend.has(k))

    def small(self, key: str) -> np.ndarray:
        with self._guard(key, None):
            return self.backend.read(key, ...)

    # ---- errors -----------------------------------------------------------------------------
    def describe(self, name: str, c: int | None) -> str:
        if c is None:
            return name
        a, b = self.chunk_range(c) if name != PROGRESS.name else (c, c + 1)
        return f"{name} chunk {c} (images {a}..{b - 1})"

    @contextmanager
    def _guard(self, name: str, c: int | None) -> Iterator[None]:
        """Backend failures while reading `name` (store chunk c) become one ChunkError."""
        try:
            yield
        except StoreError:
            raise
        except Exception as e:  # noqa: BLE001 - checksum, codec, index and I/O errors alike
            kind, text = read_problem(e)
            raise ChunkError(self.describe(name, c), self.path, name, c, kind, text) from None

    def _check_present(self, name: str, chunks) -> None:
        for c in chunks:
            if not self.backend.present(name, c):
                raise ChunkError(self.describe(name, c), self.path, name, c, "missing",
                                 "is missing (its file was deleted or never written)")

    def close(self) -> None:
        self.backend.close()
        if self._lock is not None:
            self._lock.__exit__(None, None, None)
            self._lock = None

    def __enter__(self) -> StoreReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_checked(path: str, mode: str, options: dict | None = None) -> Backend:
    """The backend of the kdstore store at `path`, its format and contents checked."""
    if is_local(path) and not Path(local_path(path)).exists():
        raise StoreError(f"store not found: {path}")
    try:
        backend = open_backend(path, mode, options)
    except StoreError:
        raise
    except FileNotFoundError:
        raise StoreError(f"store not found: {path}") from None
    except PermissionError as e:
        raise StoreError(f"cannot open {path}: permission denied ({e.filename or path})") from None
    except Exception as e:  # noqa: BLE001 - any backend failure becomes one clear message
        hint = "" if is_local(path) else f"; {STORAGE_HINT}"
        raise StoreError(f"cannot open {path} as a {_kind(path)} store: {first_line(e)}{hint}") from None
    try:
        attrs = backend.get_attrs()
        check_attrs(attrs, path)
        if len(attrs["classes"]) < 2:
            raise StoreError(f"{path} has {len(attrs['classes'])} class ({', '.join(attrs['classes'])}); a classifier "
                             "needs at least two (one class would score macro-F1 1.0 and learn nothing)")
        links = backend.foreign_links()
        if links:
            raise StoreError(f"{path} holds {'; '.join(links[:5])}: a store holds its own data, and kdstore refuses "
                             "links and virtual datasets, which can point at any other file; rebuild the store or "
                             "copy the data in")
        missing = [f.name for f in fields(attrs) + progress_fields(attrs) if not backend.has(f.name)]
        if missing:
            raise StoreError(f"{path} lacks arrays {missing}; the store is damaged (rebuild it with --overwrite)")
        wrong = layout_problems(backend, attrs)
        if wrong:
            more = f" (and {len(wrong) - 3} more)" if len(wrong) > 3 else ""
            raise StoreError(f"{path}: {'; '.join(wrong[:3])}{more}; the store is damaged or was edited: rebuild it "
                             "with --overwrite")
    except StoreError:
        backend.close()
        raise
    except Exception as e:  # noqa: BLE001
        backend.close()
        raise StoreError(f"cannot open {path} as a {_kind(path)} store: {first_line(e)}") from None
    return backend


def layout_problems(backend: Backend, attrs: dict) -> list[str]:
    """Arrays whose shape or dtype is not the one the store format lays out for these attributes."""
    out = []
    dtypes = {f.name: f.dtype for f in fields(attrs) + progress_fields(attrs)}
    for name, layout in layouts(attrs).items():
        if not backend.has(name):
            continue
        shape = backend.shape(name)
        if shape != layout.shape:
            out.append(f"{name} has shape {shape} where the store format has {layout.shape}")
        want = dtypes.get(name)
        if want not in (None, "str") and backend.dtype(name) != np.dtype(want):
            out.append(f"{name} has dtype {backend.dtype(name)} where the store format has {want}")
    return out


def _kind(path: str) -> str:
    from featurestore.store.backends import backend_class
    return backend_class(path).kind


def read_problem(e: BaseException) -> tuple[str, str]:
    """(kind, words) for a failed read of a stored chunk. HDF5 applies fletcher32 last when writing,
    so it is the first filter to run on a read: a filter failure there is the checksum's."""
    text = first_line(e)
    if any(s in text.lower() for s in ("checksum", "fletcher32", "filter returned failure during read")):
        return "checksum", "failed its checksum (the bytes on disk were changed)"
    return "unreadable", f"could not be read ({text})"


def first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
