"""One store API over two backends: Zarr v3 (default, sharded, fsspec URLs) and HDF5.

Arrays are chunked along N in whole chunks of `chunk_size` images; in Zarr each chunk of images is
one shard, so each writer owns whole shard files and two writers never touch one.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from .schema import FORMAT_VERSION, Field, StoreError, check_attrs, fields, resolve

HDF5_SUFFIXES = (".h5", ".hdf5")


def backend_of(path: str) -> str:
    return "hdf5" if str(path).lower().endswith(HDF5_SUFFIXES) else "zarr"


def _is_local(path: str) -> bool:
    return "://" not in str(path)


class Store:
    """A kdstore store. `Store.open(path)` to read; the builder uses `Store.create`."""

    def __init__(self, root: Any, backend: str, path: str, mode: str):
        self._root, self.backend, self.path, self.mode = root, backend, str(path), mode
        self._attrs: dict[str, Any] | None = None

    # ---- opening -------------------------------------------------------------------------
    @classmethod
    def open(cls, path: str | Path, mode: str = "r") -> Store:
        path, backend = str(path), backend_of(str(path))
        if _is_local(path) and not Path(path).exists():
            raise StoreError(f"store not found: {path}")
        try:
            if backend == "hdf5":
                import h5py
                root = h5py.File(path, "r" if mode == "r" else "r+")
            else:
                import zarr
                root = zarr.open_group(path, mode="r" if mode == "r" else "r+")
        except StoreError:
            raise
        except Exception as e:  # noqa: BLE001 - any backend failure becomes one clear message
            raise StoreError(f"cannot open {path} as a {backend} store: {e}") from None
        store = cls(root, backend, path, mode)
        check_attrs(store.attrs, path)
        missing = [f.name for f in store.fields() if f.name not in store]
        if missing:
            raise StoreError(f"{path} lacks arrays {missing}")
        return store

    @classmethod
    def create(cls, path: str | Path, attrs: dict[str, Any], compression: str) -> Store:
        path, backend = str(path), backend_of(str(path))
        if backend == "hdf5":
            import h5py
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            root = h5py.File(path, "w")
        else:
            import zarr
            root = zarr.open_group(path, mode="w")
        store = cls(root, backend, path, "w")
        store._compression = _codec(backend, compression)
        n, chunk = attrs["num_images"], attrs["chunk_size"]
        sizes = store.sizes(attrs)
        for f in fields(attrs["patch_grid"], tuple(attrs["heads"])):
            store._create(f.name, resolve(f.dims, sizes), f.dtype, chunk)
        store._create_plain("progress/done", (store.num_chunks_for(n, chunk),), "bool", 1)
        store._create_strings("ids", n)
        store.set_attrs(attrs)
        return store

    # ---- attributes ----------------------------------------------------------------------
    @property
    def attrs(self) -> dict[str, Any]:
        if self._attrs is None:
            if self.backend == "hdf5":
                self._attrs = {k: json.loads(v) for k, v in self._root.attrs.items()}
            else:
                self._attrs = dict(self._root.attrs)
        return self._attrs

    def set_attrs(self, values: dict[str, Any]) -> None:
        if self.backend == "hdf5":
            for k, v in values.items():
                self._root.attrs[k] = json.dumps(v)
        else:
            self._root.attrs.update(values)
        self._attrs = None

    @staticmethod
    def sizes(attrs: dict[str, Any]) -> dict[str, int]:
        return {"N": attrs["num_images"], "K": attrs["views_per_image"], "P": len(attrs["param_names"]),
                "C": len(attrs["classes"]), "D": attrs["embed_dim"], "g": attrs["patch_grid"],
                "S": attrs["image_size"]}

    def fields(self) -> list[Field]:
        a = self.attrs
        return fields(a["patch_grid"], tuple(a["heads"]))

    # ---- arrays --------------------------------------------------------------------------
    def __contains__(self, name: str) -> bool:
        try:
            self._root[name]
        except KeyError:
            return False
        return True

    def __getitem__(self, name: str):
        return self._root[name]

    def _create(self, name: str, shape: tuple[int, ...], dtype: str, chunk: int) -> None:
        n_chunk = (min(chunk, shape[0]),) + shape[1:]
        big = int(np.prod(shape[1:])) * np.dtype(dtype).itemsize > 4096
        inner = (1,) + shape[1:] if big else n_chunk          # one image per (inner) chunk for big rows
        if self.backend == "hdf5":
            kw = {"compression": self._compression} if self._compression else {}
            self._root.create_dataset(name, shape=shape, dtype=dtype, chunks=inner, **kw)
            return
        self._root.create_array(name, shape=shape, dtype=dtype, chunks=inner, shards=n_chunk,
                                compressors=self._compression, fill_value=0)

    def _create_plain(self, name: str, shape: tuple[int, ...], dtype: str, chunk: int) -> None:
        if self.backend == "hdf5":
            self._root.create_dataset(name, shape=shape, dtype=dtype, chunks=(chunk,))
        else:
            self._root.create_array(name, shape=shape, dtype=dtype, chunks=(chunk,), fill_value=False)

    def _create_strings(self, name: str, n: int) -> None:
        if self.backend == "hdf5":
            import h5py
            self._root.create_dataset(name, shape=(n,), dtype=h5py.string_dtype("utf-8"))
        else:
            self._root.create_array(name, shape=(n,), dtype=str)

    def write_head(self, head: str, arrays: dict[str, np.ndarray]) -> None:
        """heads/<head>/<name>: small arrays needed to recompute a head's logits."""
        for name, value in arrays.items():
            key = f"heads/{head}/{name}"
            if key in self:
                del self._root[key]
            value = np.asarray(value)
            if self.backend == "hdf5":
                self._root.create_dataset(key, data=value)
            else:
                self._root.create_array(key, shape=value.shape, dtype=value.dtype, fill_value=0)[...] = value

    # ---- reading -------------------------------------------------------------------------
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

    @staticmethod
    def num_chunks_for(n: int, chunk: int) -> int:
        return (n + chunk - 1) // chunk

    @property
    def num_chunks(self) -> int:
        return self.num_chunks_for(self.num_images, self.chunk_size)

    def chunk_range(self, c: int) -> tuple[int, int]:
        return c * self.chunk_size, min((c + 1) * self.chunk_size, self.num_images)

    def done(self) -> np.ndarray:
        return np.asarray(self._root["progress/done"][:], dtype=bool)

    @property
    def complete(self) -> bool:
        return bool(self.attrs.get("complete", False))

    def ids(self) -> list[str]:
        raw = self._root["ids"][:]
        return [x.decode() if isinstance(x, bytes) else str(x) for x in raw]

    def read(self, name: str, start: int | None = None, stop: int | None = None) -> np.ndarray:
        return np.asarray(self._root[name][slice(start, stop)])

    def read_chunk(self, c: int, names: list[str] | None = None) -> dict[str, np.ndarray]:
        a, b = self.chunk_range(c)
        names = names or [f.name for f in self.fields()]
        return {n: self.read(n, a, b) for n in names}

    def heads(self) -> list[str]:
        return list(self.attrs["heads"])

    def head_arrays(self, head: str) -> dict[str, np.ndarray]:
        group = self._root[f"heads/{head}"]
        return {k: np.asarray(group[k][...]) for k in group.keys()}

    def stored_bytes(self, name: str) -> int:
        arr = self._root[name]
        if self.backend == "hdf5":
            return int(arr.id.get_storage_size())
        return int(arr.nbytes_stored())

    def close(self) -> None:
        if self.backend == "hdf5":
            self._root.close()

    def flush(self) -> None:
        if self.backend == "hdf5":
            self._root.flush()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _codec(backend: str, name: str):
    if backend == "hdf5":
        name = "lzf" if name == "default" else name
        if name not in ("none", "gzip", "lzf"):
            raise StoreError(f"HDF5 stores support compression none|gzip|lzf, not {name!r}")
        return None if name == "none" else name
    name = "zstd" if name == "default" else name
    if name not in ("none", "zstd", "blosc"):
        raise StoreError(f"Zarr stores support compression none|zstd|blosc, not {name!r}")
    from zarr.codecs import BloscCodec, ZstdCodec
    return {"none": None, "zstd": ZstdCodec(level=3), "blosc": BloscCodec(cname="zstd", clevel=5)}[name]


__all__ = ["Store", "StoreError", "FORMAT_VERSION", "backend_of"]
