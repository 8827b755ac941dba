"""What every backend shares: the protocol the reader and the writer use, local paths and URLs, the
small groups, and the check that a folder or file is a kdstore store."""
from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from featurestore.store.schema import MARKER_ATTRS, Field, Layout, layouts
from featurestore.store.shards import ShardReader

HDF5_SUFFIXES = (".h5", ".hdf5")


def is_local(path: str | Path) -> bool:
    return "://" not in str(path) or str(path).startswith("file://")


def local_path(path: str | Path) -> str:
    """A local path without a file:// prefix."""
    return str(path)[len("file://"):] if str(path).startswith("file://") else str(path)


class Backend(Protocol):
    kind: str                  # zarr | hdf5
    priority: int              # backends are asked in descending priority which claims a path
    checksum: str              # the per-chunk checksum this backend writes
    one_writer: bool           # one process writes it (HDF5: one file); else each rank writes its own chunks
    path: str
    mode: str

    def exists(self) -> bool: ...
    def seal(self) -> None: ...
    def get_attrs(self) -> dict[str, Any]: ...
    def set_attrs(self, values: dict[str, Any]) -> None: ...
    def create(self, field: Field, layout: Layout, compression: str, id_bytes: int) -> None: ...
    def write_small(self, key: str, value: np.ndarray) -> None: ...
    def delete(self, key: str) -> None: ...
    def has(self, key: str) -> bool: ...
    def shape(self, key: str) -> tuple[int, ...]: ...
    def dtype(self, key: str) -> np.dtype: ...
    def read(self, key: str, selection) -> np.ndarray: ...
    def read_rows(self, key: str, rows: np.ndarray, view: int | None) -> np.ndarray: ...
    def write(self, key: str, start: int, value: np.ndarray) -> None: ...
    def present(self, key: str, chunk: int) -> bool: ...
    def stored_bytes(self, key: str) -> int: ...
    def payload_bytes(self, key: str) -> int: ...
    def direct(self, key: str) -> ShardReader | None: ...
    def foreign_links(self) -> list[str]: ...
    def flush(self) -> None: ...
    def close(self) -> None: ...
    @classmethod
    def claims(cls, path: str) -> bool: ...


BACKENDS: list[type] = []                   # every backend, in descending priority: register_backend


def register_backend(cls: type) -> type:
    """Make a class a backend: `open_backend` gives it every path its `claims(path)` accepts, unless one of
    higher `priority` claims the path first."""
    BACKENDS.append(cls)
    BACKENDS.sort(key=lambda c: -c.priority)
    return cls


def foreign_entries(entries: list[str], attrs: dict | None, expected) -> str | None:
    """None if `entries` (what is at a store's path: files, folders, objects, relative names) are all
    what a store kdstore made with these attributes may hold (`expected(attrs)`, the manifest the schema
    gives), else why not, naming what else is there. attrs None: its root document could not be read."""
    if attrs is None:
        shown = sorted(e for e in entries if "/" not in e)
        return (f"it holds {', '.join(shown[:5])}{' ...' if len(shown) > 5 else ''} and no readable zarr.json"
                if shown else "it has no readable zarr.json")
    if not all(a in attrs for a in MARKER_ATTRS):
        return "it lacks kdstore's format attributes"
    try:
        known = expected(attrs)
    except (KeyError, TypeError, ValueError, AttributeError):
        return "its attributes are damaged, so what it should hold cannot be told"
    foreign = sorted(set(entries) - known)
    if foreign:
        return f"it holds {', '.join(foreign[:5])}{' ...' if len(foreign) > 5 else ''}, which a store does not"
    return None


def zarr_manifest(attrs: dict) -> set[str]:
    """Every file (object) a Zarr store with these attributes may hold, and the folders they lie in:
    the root's, each group's and each array's zarr.json, and each chunk (shard) of each array, as
    zarr's default chunk keys name them (`<array>/c/<i>/<j>/...`)."""
    out = {"zarr.json"}
    for name, layout in layouts(attrs).items():
        parts = name.split("/")
        out |= {"/".join(parts[:i]) for i in range(1, len(parts) + 1)}                 # folders
        out |= {"/".join(parts[:i]) + "/zarr.json" for i in range(1, len(parts) + 1)}
        grid = [-(-size // chunk) for size, chunk in zip(layout.shape, layout.chunk)]
        for index in itertools.product(*map(range, grid)):
            key = "/".join(map(str, index))
            out |= {f"{name}/c", f"{name}/c/{key}"} | {f"{name}/c/" + "/".join(map(str, index[:i]))
                                                       for i in range(1, len(index))}
    return out


def first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


