"""Writing a store: create it from the schema's table, write whole store chunks, mark them done.

A store is created with its attributes first (the marker that kdstore made it, whatever happens
next), then every array of the schema with the layout the schema gives it. Writers write whole store
chunks (in Zarr, whole shards: two writers never touch one shard) and mark a chunk done only after
all its arrays are written. `--overwrite` deletes only a store kdstore made (`remove_store`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from featurestore.store.backends import Backend, backend_class, is_local, local_path, open_backend
from featurestore.store.reader import StoreReader, open_checked
from featurestore.store.schema import PROGRESS, Field, StoreError, fields, progress_fields, sizes


class StoreWriter:
    """A store open for writing; `reader` reads what it holds (through the same backend)."""

    def __init__(self, backend: Backend):
        self.backend = backend
        self.path = backend.path
        self.reader = StoreReader(backend)

    @classmethod
    def create(cls, path: str | Path, attrs: dict[str, Any], compression: str,
               storage_options: dict | None = None) -> StoreWriter:
        """A new, empty store with every array of `attrs`' layout (written by the caller)."""
        backend = open_backend(str(path), "w", storage_options)
        backend.set_attrs(attrs)
        size, chunk = sizes(attrs), attrs["chunk_size"]
        for f in fields(attrs) + progress_fields(attrs):
            backend.create(f, f.layout(size, chunk), compression, attrs.get("id_bytes", 256))
        return cls(backend)

    def add_teacher(self, name: str, values: dict[str, Any], compression: str) -> None:
        """A new teacher's group, empty, with its attributes (its arrays are written by its pass)."""
        known = dict(self.attrs["teachers"])
        if name in known:
            raise StoreError(f"{self.path} has a teacher {name!r} already")
        attrs = dict(self.attrs) | {"teachers": known | {name: values}}
        size = sizes(attrs)
        for f in fields(attrs) + progress_fields(attrs):
            if f.teacher == name:
                self.backend.create(f, f.layout(size, attrs["chunk_size"]), compression, 0)
        self.set_attrs({"teachers": attrs["teachers"]})

    @classmethod
    def open(cls, path: str | Path, storage_options: dict | None = None) -> StoreWriter:
        """An existing store, to resume or repair it."""
        return cls(open_checked(str(path), "r+", storage_options))

    @property
    def attrs(self) -> dict[str, Any]:
        return self.reader.attrs

    def set_attrs(self, values: dict[str, Any]) -> None:
        self.backend.set_attrs(values)
        self.reader.refresh()

    def write(self, name: str, start: int, value: np.ndarray) -> None:
        """value into rows [start, start + len(value)) of array `name`, every chunk stored."""
        self.backend.write(name, start, value)

    def write_small(self, key: str, value: np.ndarray) -> None:
        """A small array written whole (one checksummed chunk), replacing any previous one."""
        self.backend.write_small(key, np.atleast_1d(value))       # a chunk (and its checksum) needs one dimension

    def set_teacher_attrs(self, name: str, values: dict[str, Any]) -> None:
        """Update one teacher's attributes (version 3: attrs["teachers"][name])."""
        known = dict(self.attrs["teachers"])
        known[name] = dict(known[name]) | values
        self.set_attrs({"teachers": known})

    def write_head(self, teacher: str, head: str, arrays: dict[str, np.ndarray]) -> None:
        """A teacher's head: the small arrays needed to recompute its logits."""
        t = self.reader.teacher(teacher)
        for name, value in arrays.items():
            self.write_small(t.head_key(head, name), np.asarray(value))

    def drop_head(self, teacher: str, head: str, why: str) -> None:
        """Remove a teacher's head (its logits and small arrays), noting why in the build report."""
        t = self.reader.teacher(teacher)
        for key in (t.logits(head), t.head_prefix(head).rstrip("/")):          # an array and a group
            if self.backend.has(key):
                self.backend.delete(key)
        report = dict(self.attrs["report"])
        report["notes"] = list(report.get("notes", [])) + [{"id": t.head_prefix(head).rstrip("/"), "note": why}]
        self.set_attrs({"report": report})
        self.set_teacher_attrs(teacher, {"heads": [h for h in t.heads if h != head]})

    def mark_done(self, c: int, value: bool = True, teachers: list[str] | None = None, images: bool = True) -> None:
        """Store chunk c is finished (value) for these teachers' progress marks, and for the store's own
        (images) unless images is False."""
        for name in teachers or ():
            done = self.reader.teacher(name).done
            if done is not None:
                self.backend.write(done.name, c, np.array([value]))
        if images:
            self.backend.write(PROGRESS.name, c, np.array([value]))

    def reset_done(self, done: np.ndarray, field: Field = PROGRESS) -> None:
        """Replace a progress array (one chunk per store chunk) with these values."""
        self.backend.delete(field.name)
        self.backend.create(field, field.layout({"Nc": len(done)}, 1), "none", 0)
        self.backend.write(field.name, 0, done)

    def flush(self) -> None:
        self.backend.flush()

    def seal(self) -> None:
        """The store is finished (or repaired): its arrays' metadata is consolidated for fast opening."""
        self.backend.flush()
        self.backend.seal()

    def close(self) -> None:
        self.backend.close()

    def __enter__(self) -> StoreWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def occupied(path: str | Path, storage_options: dict | None = None) -> bool:
    """Whether anything is at `path` (an empty folder is nothing)."""
    return backend_class(path).occupied(str(path), storage_options)


def not_a_kdstore_store(path: str | Path, storage_options: dict | None = None) -> str | None:
    """None if `path` is a store kdstore made (its format attributes, and nothing a store does not
    hold), else why not."""
    return backend_class(path).not_made_by_kdstore(str(path), storage_options)


def remove_store(path: str | Path, protect: dict[str, Path], storage_options: dict | None = None) -> None:
    """Delete the store at `path` for --overwrite: only a store kdstore made, never a folder in
    `protect` ({what: path}: the current directory, the home folder, the input images) or one that
    holds any of them."""
    if is_local(path):
        target = Path(local_path(path)).absolute()
        for what, p in protect.items():
            for q in {Path(p).absolute(), Path(p).resolve()}:
                for t in {target, target.resolve()}:
                    if q == t or t in q.parents:
                        raise StoreError(f"refusing to delete {path}: it {'is' if q == t else 'holds'} {what}; "
                                         "choose another --out")
    why = not_a_kdstore_store(path, storage_options)
    if why is not None:
        raise StoreError(f"refusing to delete {path}: it is not a store kdstore made ({why}); choose another --out "
                         "(kdstore deletes only stores it made)")
    backend_class(path).remove(str(path), storage_options)
