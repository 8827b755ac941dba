"""Zarr v3 on a local disk: each store chunk of an array is one shard file with inner chunks as the
schema lays them out, crc32c after the compressor; direct shard reads (shards.py). A finished store
carries consolidated metadata (`seal`), so opening it is one read of its root document."""
from __future__ import annotations

import contextlib
import json
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from featurestore.store.backends.base import foreign_entries, is_local, local_path, register_backend, zarr_manifest
from featurestore.store.schema import Field, Layout, StoreError
from featurestore.store.shards import LocalFiles, ShardReader


@register_backend
class ZarrBackend:
    kind, checksum, one_writer = "zarr", "crc32c", False
    priority = 0

    @classmethod
    def claims(cls, path: str) -> bool:
        return is_local(path)

    def __init__(self, path: str, mode: str, options: dict | None = None):
        import zarr
        self.path, self.mode = path, mode
        if mode != "w" and not self.exists():
            raise FileNotFoundError(path)
        # consolidated metadata is trusted for reading only: a writer sees the arrays as they are
        with quiet_consolidated():
            self.root = zarr.open_group(self._zarr_store(options), mode=mode,
                                        use_consolidated=None if mode == "r" else False)
        self._arrays: dict[str, Any] = {}
        self._direct: dict[str, ShardReader | None] = {}

    def _zarr_store(self, options: dict | None):
        return local_path(self.path)

    def _files(self, key: str):
        """Where direct reads of array `key` get their bytes."""
        return LocalFiles(Path(local_path(self.path)) / key)

    def exists(self) -> bool:
        return Path(local_path(self.path)).exists()

    def seal(self) -> None:
        """Consolidate the metadata of every array into the root document (a finished store)."""
        import zarr
        with quiet_consolidated():
            zarr.consolidate_metadata(self.root.store)

    # ---- attributes --------------------------------------------------------------------------
    def get_attrs(self) -> dict[str, Any]:
        return dict(self.root.attrs)

    def set_attrs(self, values: dict[str, Any]) -> None:
        """One write of the root document (`attrs.update` writes it once per key)."""
        self.root.update_attributes(values)

    # ---- arrays ------------------------------------------------------------------------------
    def create(self, field: Field, layout: Layout, compression: str, id_bytes: int) -> None:
        from zarr.codecs import Crc32cCodec
        codec = zarr_codec(compression, field.codec)
        codecs = ([codec] if codec else []) + [Crc32cCodec()]
        if field.dtype == "str":
            self.root.create_array(field.name, shape=layout.shape, dtype=str, chunks=layout.chunk, compressors=codecs)
            return
        self.root.create_array(field.name, shape=layout.shape, dtype=field.dtype, chunks=layout.inner,
                               shards=layout.chunk if layout.sharded else None, compressors=codecs,
                               fill_value=field.fill)

    def write_small(self, key: str, value: np.ndarray) -> None:
        from zarr.codecs import Crc32cCodec
        if self.has(key):
            self.delete(key)
        arr = self.root.create_array(key, shape=value.shape, dtype=value.dtype, fill_value=0,
                                     compressors=[Crc32cCodec()], config={"write_empty_chunks": True})
        arr[...] = value

    def delete(self, key: str) -> None:
        del self.root[key]
        self._arrays.pop(key, None)
        self._direct.pop(key, None)

    def _array(self, key: str):
        """Each array opened once (opening parses its metadata document: a request in a bucket)."""
        arr = self._arrays.get(key)
        if arr is None:
            arr = self._arrays[key] = self.root[key]
        return arr

    def has(self, key: str) -> bool:
        try:
            self._array(key)
        except KeyError:
            return False
        return True

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._array(key).shape)

    def dtype(self, key: str) -> np.dtype:
        return np.dtype(self._array(key).dtype)

    def read(self, key: str, selection) -> np.ndarray:
        return np.asarray(self._array(key)[selection])

    def read_rows(self, key: str, rows: np.ndarray, view: int | None) -> np.ndarray:
        return np.asarray(self._array(key).get_orthogonal_selection((rows,) if view is None else (rows, view)))

    def write(self, key: str, start: int, value: np.ndarray) -> None:
        arr = self._array(key).with_config({"write_empty_chunks": True})    # a chunk equal to the fill is still one
        arr[start:start + len(value)] = value

    def present(self, key: str, chunk: int) -> bool:
        """Whether store chunk `chunk` of `key` has a stored file (a deleted shard has none)."""
        from zarr.core.sync import sync
        arr = self._array(key)
        name = arr.metadata.encode_chunk_key((chunk,) + (0,) * (arr.ndim - 1))
        sp = arr.store_path
        return bool(sync(sp.store.exists(f"{sp.path}/{name}" if sp.path else name)))

    def stored_bytes(self, key: str) -> int:
        return int(self._array(key).nbytes_stored())

    def payload_bytes(self, key: str) -> int:
        """Bytes of the array's chunks alone, without its metadata document."""
        files = (Path(local_path(self.path)) / key).rglob("*")
        return sum(p.stat().st_size for p in files if p.is_file() and p.name != "zarr.json")

    def direct(self, key: str) -> ShardReader | None:
        """Direct reads of whole inner chunks; shard indexes are kept only while nothing is written."""
        if key not in self._direct:
            self._direct[key] = ShardReader.of(self._array(key).metadata.to_dict(), self._files(key),
                                               keep_indexes=self.mode == "r")
        return self._direct[key]

    def foreign_links(self) -> list[str]:
        """Symbolic links inside the store's folder: kdstore writes none, and every reader follows them."""
        out, root = [], local_path(self.path)
        for folder, dirs, files in os.walk(root):
            for name in dirs + files:
                p = Path(folder) / name
                if p.is_symlink():
                    out.append(f"{p.relative_to(root).as_posix()}, a symbolic link to {os.readlink(p)}")
        return out

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass

    # ---- what kdstore made ---------------------------------------------------------------------
    @classmethod
    def occupied(cls, path: str, options: dict | None = None) -> bool:
        """Whether anything is at `path` (an empty folder is nothing)."""
        p = Path(local_path(path))
        return p.exists() and not (p.is_dir() and not any(p.iterdir()))

    @classmethod
    def _entries(cls, p: Path) -> list[str]:
        """Every file, folder and link below p, relative (links are entries, never followed)."""
        out = []
        for folder, dirs, files in os.walk(p):
            here = Path(folder).relative_to(p)
            out += [(here / n).as_posix() for n in dirs + files]
        return out

    @classmethod
    def _root_attrs(cls, p: Path) -> dict | None:
        try:
            return json.loads((p / "zarr.json").read_text()).get("attributes") or {}
        except (OSError, ValueError, AttributeError):
            return None

    @classmethod
    def not_made_by_kdstore(cls, path: str, options: dict | None = None) -> str | None:
        """None if the folder at `path` is a store kdstore made, holding nothing else, else why not."""
        p = Path(local_path(path))
        if not p.is_dir():
            return "it is not a folder"
        return foreign_entries(cls._entries(p), cls._root_attrs(p), zarr_manifest)

    @classmethod
    def remove(cls, path: str, options: dict | None = None) -> None:
        """Delete the store's own files (its manifest), then the folders they leave empty."""
        p = Path(local_path(path))
        if p.is_symlink():
            p.unlink()
            return
        known = zarr_manifest(cls._root_attrs(p))
        for name in sorted(known, key=lambda n: -n.count("/")):         # files first, deepest folders first
            q = p / name
            if q.is_file() and not q.is_symlink():
                q.unlink()
        for name in sorted(known, key=lambda n: -n.count("/")):
            q = p / name
            if q.is_dir() and not q.is_symlink() and not any(q.iterdir()):
                q.rmdir()
        if not any(p.iterdir()):
            p.rmdir()


@contextlib.contextmanager
def quiet_consolidated():
    """zarr warns that consolidated metadata is an extension of Zarr v3 (kdstore reads stores without
    it too)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Consolidated metadata is currently not part")
        yield


def zarr_codec(name: str, role: str):
    """The compressor of a Zarr array. "default": zstd (level 3), but blosc-lz4 for `images`, which every
    epoch reads whole: it decodes about 7x faster than zstd and the pixels shrink little under either (the
    teacher arrays, read 1/K per epoch, keep zstd). Role "none" (progress marks): no compressor."""
    if role == "none":
        return None
    name = ("lz4" if role == "images" else "zstd") if name == "default" else name
    if name not in ("none", "zstd", "blosc", "lz4"):
        raise StoreError(f"Zarr stores support compression none|zstd|blosc|lz4, not {name!r}")
    from zarr.codecs import BloscCodec, ZstdCodec
    return {"none": None, "zstd": ZstdCodec(level=3), "blosc": BloscCodec(cname="zstd", clevel=5),
            "lz4": BloscCodec(cname="lz4", clevel=5, shuffle="noshuffle")}[name]


