"""What every backend shares: the protocol the reader and the writer use, local paths and URLs, the
small groups, and the check that a folder or file is a kdstore store."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from featurestore.schema import MARKER_ATTRS, Field, Layout
from featurestore.shards import ShardReader

HDF5_SUFFIXES = (".h5", ".hdf5")
SMALL_GROUPS = ("heads", "pca")              # small arrays: a head's weights, the patch basis


def is_local(path: str | Path) -> bool:
    return "://" not in str(path) or str(path).startswith("file://")


def local_path(path: str | Path) -> str:
    """A local path without a file:// prefix."""
    return str(path)[len("file://"):] if str(path).startswith("file://") else str(path)


class Backend(Protocol):
    kind: str                  # zarr | hdf5
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
    def small_keys(self) -> list[str]: ...
    def direct(self, key: str) -> ShardReader | None: ...
    def foreign_links(self) -> list[str]: ...
    def flush(self) -> None: ...
    def close(self) -> None: ...


def not_a_store(names: list[str], read_root, entries: set[str]) -> str | None:
    foreign = sorted(n for n in names if n not in entries)
    if foreign:
        return f"it holds {', '.join(foreign[:5])}{' ...' if len(foreign) > 5 else ''}, which a store does not"
    try:
        attrs = set(json.loads(read_root()).get("attributes") or {})
    except (OSError, ValueError, AttributeError):
        return "it has no readable zarr.json"
    return None if all(a in attrs for a in MARKER_ATTRS) else "it lacks kdstore's format attributes"


def first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


