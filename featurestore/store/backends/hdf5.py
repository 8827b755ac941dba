"""One HDF5 file on a local disk: chunks as the schema's inner chunks, fletcher32; attributes that are
not plain values are stored as JSON text."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from featurestore.store.backends.base import (
    HDF5_SUFFIXES,
    first_line,
    foreign_entries,
    is_local,
    local_path,
    register_backend,
)
from featurestore.store.schema import Field, Layout, StoreError, layouts
from featurestore.store.shards import ShardReader

_JSON_ATTRS = "json_attributes"              # names of the attributes stored as JSON text


@register_backend
class Hdf5Backend:
    kind, checksum, one_writer = "hdf5", "fletcher32", True
    priority = 20

    @classmethod
    def claims(cls, path: str) -> bool:
        return str(path).lower().endswith(HDF5_SUFFIXES)

    def __init__(self, path: str, mode: str, options: dict | None = None):
        import h5py
        if not is_local(path):
            raise StoreError(f"{path}: an HDF5 store is one file on a local disk; write it there, then copy it "
                             "(or use a .zarr store, which lives in a bucket too)")
        path = local_path(path)
        self.path, self.mode = path, mode
        if mode == "w":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        elif not self.exists():
            raise FileNotFoundError(path)
        self.root = h5py.File(path, mode)
        self._attrs: dict[str, Any] | None = None

    def exists(self) -> bool:
        return Path(self.path).exists()

    def seal(self) -> None:
        self.root.flush()

    @classmethod
    def occupied(cls, path: str, options: dict | None = None) -> bool:
        return Path(local_path(path)).exists()

    # ---- attributes: scalars stored natively, lists and mappings as JSON text ----------------------
    def get_attrs(self) -> dict[str, Any]:
        raw = dict(self.root.attrs.items())
        as_json = set(json.loads(raw.pop(_JSON_ATTRS, "[]")))
        return {k: json.loads(v) if k in as_json else _native(v) for k, v in raw.items()}

    def set_attrs(self, values: dict[str, Any]) -> None:
        as_json = set(json.loads(self.root.attrs.get(_JSON_ATTRS, "[]")))
        for k, v in values.items():
            if isinstance(v, (bool, int, float, str)):
                self.root.attrs[k] = np.bool_(v) if isinstance(v, bool) else v
                as_json.discard(k)
            else:
                self.root.attrs[k] = json.dumps(v)
                as_json.add(k)
        self.root.attrs[_JSON_ATTRS] = json.dumps(sorted(as_json))

    # ---- arrays ------------------------------------------------------------------------------
    def create(self, field: Field, layout: Layout, compression: str, id_bytes: int) -> None:
        import h5py
        codec = hdf5_codec(compression, field.codec)
        dtype = h5py.string_dtype("utf-8", length=id_bytes) if field.dtype == "str" else field.dtype
        self.root.create_dataset(field.name, shape=layout.shape, dtype=dtype, chunks=layout.inner, fletcher32=True,
                                 fillvalue=field.fill, **({"compression": codec} if codec else {}))

    def write_small(self, key: str, value: np.ndarray) -> None:
        if self.has(key):
            self.delete(key)
        self.root.create_dataset(key, data=value, chunks=value.shape, fletcher32=True)

    def delete(self, key: str) -> None:
        del self.root[key]

    def has(self, key: str) -> bool:
        return key in self.root

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.root[key].shape)

    def dtype(self, key: str) -> np.dtype:
        return np.dtype(self.root[key].dtype)

    def read(self, key: str, selection) -> np.ndarray:
        return np.asarray(self.root[key][selection])

    def read_rows(self, key: str, rows: np.ndarray, view: int | None) -> np.ndarray:
        ds = self.root[key]
        return np.asarray(ds[rows] if view is None else ds[rows, view])

    def write(self, key: str, start: int, value: np.ndarray) -> None:
        self.root[key][start:start + len(value)] = value

    def present(self, key: str, chunk: int) -> bool:
        return True                          # an unwritten chunk reads as the fill value (NaN for floats)

    def stored_bytes(self, key: str) -> int:
        return int(self.root[key].id.get_storage_size())

    def payload_bytes(self, key: str) -> int:
        return self.stored_bytes(key)

    def direct(self, key: str) -> ShardReader | None:
        return None

    def foreign_links(self) -> list[str]:
        """Soft and external links and virtual datasets: kdstore writes none, and they can point at any file."""
        import h5py
        found: list[str] = []

        def link(name: str, obj) -> None:
            if isinstance(obj, h5py.ExternalLink):
                found.append(f"{name}, an external link to {obj.filename}:{obj.path}")
            elif isinstance(obj, h5py.SoftLink):
                found.append(f"{name}, a soft link to {obj.path}")

        def virtual(name: str, obj) -> None:
            if isinstance(obj, h5py.Dataset) and obj.is_virtual:
                found.append(f"{name}, a virtual dataset")
        self.root.visititems_links(link)
        self.root.visititems(virtual)
        return found

    def flush(self) -> None:
        self.root.flush()

    def close(self) -> None:
        self.root.close()

    # ---- what kdstore made ---------------------------------------------------------------------
    @classmethod
    def not_made_by_kdstore(cls, path: str, options: dict | None = None) -> str | None:
        """None if the file at `path` is a store kdstore made, holding no group or dataset a store does
        not, else why not."""
        p = Path(local_path(path))
        if not p.is_file():
            return "it is not a file"
        try:
            store = cls(str(p), "r")
        except Exception as e:  # noqa: BLE001 - unreadable: it cannot be shown to be a store
            return f"it cannot be read as HDF5 ({first_line(e)})"
        try:
            names: list[str] = []
            store.root.visit(names.append)
            attrs = store.get_attrs()
        except Exception:  # noqa: BLE001 - attributes that do not parse cannot be a store's
            attrs = {}
        finally:
            store.close()

        def manifest(a: dict) -> set[str]:
            return {"/".join(n.split("/")[:i]) for n in layouts(a) for i in range(1, n.count("/") + 2)}
        return foreign_entries(names, attrs, manifest)

    @classmethod
    def remove(cls, path: str, options: dict | None = None) -> None:
        Path(local_path(path)).unlink()


def _native(v: Any) -> Any:
    if isinstance(v, bytes):
        return v.decode()
    if isinstance(v, np.generic):
        return v.item()
    return v


def hdf5_codec(name: str, role: str) -> str | None:
    """The compression filter of an HDF5 dataset: "default" is lzf."""
    if role == "none":
        return None
    name = "lzf" if name == "default" else name
    if name not in ("none", "gzip", "lzf"):
        raise StoreError(f"HDF5 stores support compression none|gzip|lzf, not {name!r}")
    return None if name == "none" else name
