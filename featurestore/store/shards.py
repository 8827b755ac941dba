"""Direct reads of whole inner chunks from the shard files of a Zarr v3 store.

A trainer epoch reads, per store chunk, the images (a few inner chunks) and one view of each teacher
array (one inner chunk each). Through zarr each such read costs milliseconds of Python and event-loop
hops, more than decoding the bytes. Here a read is: the shard's index (read once per shard, its
crc32c checked), the inner chunks' bytes as one byte range, each crc32c checked, the compressor
undone with the codec zarr itself uses (numcodecs), and the bytes laid out as the inner chunk's
array, in place in the caller's buffer if given. The bytes come from a `source` (`LocalFiles`: files
on a disk), so the same reader serves any place that can return byte ranges of a key.

Only the layouts kdstore writes are read here (sharding with the index at the end, or one chunk
per file; codecs bytes -> zstd | blosc | none -> crc32c; default chunk keys); for any other layout
`ShardReader.of` returns None. Any failure (a missing shard or inner chunk, a checksum, a short file) raises
ShardReadError, and the caller reads through zarr instead, which yields the fill value or the
canonical error; the fast path never answers where zarr would not give the same array.
"""
from __future__ import annotations

import math
import os
import sys
import threading
from pathlib import Path

import google_crc32c
import numpy as np

_MISSING = 2 ** 64 - 1


class ShardReadError(Exception):
    """This read cannot be served from the shard file directly (zarr will say why, or fill)."""


class LocalFiles:
    """Byte ranges of the files under one folder (an array's folder on a local disk)."""

    def __init__(self, root: Path):
        self.root = Path(root)

    def whole(self, key: str) -> bytes:
        return (self.root / key).read_bytes()

    def tail(self, key: str, n: int) -> bytes:
        """The last n bytes of `key` (fewer if it is shorter)."""
        with open(self.root / key, "rb") as f:
            size = f.seek(0, 2)
            f.seek(max(0, size - n))
            return f.read(n)

    def range(self, key: str, lo: int, hi: int) -> bytes:
        with open(self.root / key, "rb") as f:
            f.seek(lo)
            return f.read(hi - lo)


class FsspecFiles:
    """Byte ranges of the objects under one prefix of an fsspec filesystem (object storage): a suffix
    read for a shard's index, one ranged read for a run of inner chunks."""

    def __init__(self, fs, root: str):
        self.fs, self.root = fs, root

    def whole(self, key: str) -> bytes:
        return self.fs.cat_file(f"{self.root}/{key}")

    def tail(self, key: str, n: int) -> bytes:
        return self.fs.cat_file(f"{self.root}/{key}", start=-n)

    def range(self, key: str, lo: int, hi: int) -> bytes:
        return self.fs.cat_file(f"{self.root}/{key}", start=lo, end=hi)


class CachedFiles:
    """The objects of a read-only store kept on a local disk: an object (a shard) is downloaded whole
    the first time any of it is read, in one request, and every later read of it is a local one. A
    run reads each shard's images every epoch and each view's targets in turn, so over a run this
    moves the store once, where ranged reads would move its images once an epoch. The checksums are
    checked on every read as before, so a damaged cache file is never trusted."""

    def __init__(self, remote: FsspecFiles, folder: Path):
        self.remote, self.local = remote, LocalFiles(folder)

    def _fetch(self, key: str) -> None:
        path = self.local.root / key
        if path.exists():
            return
        data = self.remote.whole(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)                          # whole or absent, whoever reads it meanwhile

    def whole(self, key: str) -> bytes:
        self._fetch(key)
        return self.local.whole(key)

    def tail(self, key: str, n: int) -> bytes:
        self._fetch(key)
        return self.local.tail(key, n)

    def range(self, key: str, lo: int, hi: int) -> bytes:
        self._fetch(key)
        return self.local.range(key, lo, hi)


class ShardReader:
    """Inner chunks of one Zarr array: sharded, or one chunk per file (a shard of one inner chunk,
    without an index). The shard indexes are kept once read when the array is not being written."""

    def __init__(self, source, shape: tuple[int, ...], shard: tuple[int, ...], inner: tuple[int, ...],
                 dtype: np.dtype, compressor, key, sharded: bool = True, keep_indexes: bool = True):
        self.source, self.shape, self.shard, self.inner, self.key = source, shape, shard, inner, key
        self.keep_indexes = keep_indexes
        self.sharded = sharded
        self.dtype, self.compressor = dtype, compressor
        self.per_shard = tuple(s // i for s, i in zip(shard, inner))          # inner chunks per shard, per axis
        self.n_inner = math.prod(self.per_shard)
        self.index_bytes = self.n_inner * 16 + 4 if sharded else 0
        self._indexes: dict[str, np.ndarray] = {}

    @classmethod
    def of(cls, meta: dict, source, keep_indexes: bool = True) -> ShardReader | None:
        """A reader for the array whose zarr.json is `meta`, its bytes in `source`, or None for
        another layout. keep_indexes: shard indexes read once (the array is not being written)."""
        if meta.get("zarr_format") != 3:
            return None
        try:
            grid = meta["chunk_grid"]
            keys = meta["chunk_key_encoding"]
            if grid["name"] != "regular" or keys["name"] != "default":
                return None
            shard = tuple(grid["configuration"]["chunk_shape"])
            sharded = meta["codecs"][0]["name"] == "sharding_indexed"
            if sharded:
                (sharding,) = meta["codecs"]
                conf = sharding["configuration"]
                if (conf.get("index_location", "end") != "end"
                        or [c["name"] for c in conf["index_codecs"]] != ["bytes", "crc32c"]
                        or conf["index_codecs"][0].get("configuration", {}).get("endian", "little") != "little"):
                    return None
                codecs, inner = conf["codecs"], tuple(conf["chunk_shape"])
            else:                                   # one chunk per file: a shard of one inner chunk, no index
                codecs, inner = meta["codecs"], shard
            if [c["name"] for c in (codecs[:1] + codecs[-1:])] != ["bytes", "crc32c"] or len(codecs) > 3:
                return None
            dtype = np.dtype(meta["data_type"])
            if dtype.kind not in "biuf" or (dtype.itemsize > 1 and (
                    codecs[0].get("configuration", {}).get("endian") != "little" or sys.byteorder != "little")):
                return None
            compressor = _compressor(codecs[1]) if len(codecs) == 3 else None
            separator = keys.get("configuration", {}).get("separator", "/")
        except (KeyError, TypeError, ValueError):
            return None
        if compressor is False or any(s % i for s, i in zip(shard, inner)):
            return None

        def key(coords: tuple[int, ...]) -> str:
            return separator.join(["c", *map(str, coords)])
        return cls(source, tuple(meta["shape"]), shard, inner, dtype, compressor, key, sharded, keep_indexes)

    def rows(self, shard: int, n: int, out: np.ndarray | None = None) -> np.ndarray:
        """The first n rows of shard (shard, 0, ..., 0) of an array tiled by inner chunks along axis 0
        only (n within the array), decoded into `out` ((n, ...) C-contiguous) if given."""
        if self.per_shard[0] != self.n_inner:
            raise ValueError("rows() needs inner chunks that tile the shard along axis 0 only")
        per = self.inner[0]
        count = -(-n // per)
        shape = (n,) + self.inner[1:]
        if out is None:
            out = np.empty(shape, self.dtype)
        elif out.shape != shape or out.dtype != self.dtype or not out.flags.c_contiguous:
            raise ValueError(f"out must be C-contiguous {shape} of {self.dtype}, got {out.shape} {out.dtype}")
        flat = out.reshape(-1).view(np.uint8)
        step = math.prod(self.inner) * self.dtype.itemsize
        for j, body in enumerate(self._bodies(shard, 0, count)):
            dest = flat[j * step:(j + 1) * step]
            if len(dest) < step:                    # the last inner chunk reaches past n: decode, then cut
                full = np.empty(step, np.uint8)
                self._decode(body, full)
                dest[:] = full[:len(dest)]
            else:
                self._decode(body, dest)
        return out

    def whole(self, shard: int, n: int) -> np.ndarray:
        """The first n rows of shard (shard, 0, ..., 0), whatever its inner chunks: (n, ...) of the
        array's row shape."""
        out = np.empty(self.shard, self.dtype)
        for j, body in enumerate(self._bodies(shard, 0, self.n_inner)):
            at = np.unravel_index(j, self.per_shard)                 # inner chunk coordinates, C order
            block = np.empty(self.inner, self.dtype)
            self._decode(body, block.reshape(-1).view(np.uint8))
            out[tuple(slice(i * s, (i + 1) * s) for i, s in zip(at, self.inner))] = block
        return out[:n]

    def inner_chunk(self, shard: int, k: int) -> np.ndarray:
        """Inner chunk k (C order within the shard) of shard (shard, 0, ..., 0), in its full shape."""
        out = np.empty(self.inner, self.dtype)
        (body,) = self._bodies(shard, k, 1)
        self._decode(body, out.reshape(-1).view(np.uint8))
        return out

    def _index(self, key: str) -> np.ndarray:
        """(n_inner, 2) offsets and sizes of a shard's inner chunks, its crc32c checked."""
        index = self._indexes.get(key)
        if index is None:
            raw = self.source.tail(key, self.index_bytes)
            if len(raw) < self.index_bytes:
                raise ShardReadError(f"{key}: shorter than its index")
            if _crc(np.frombuffer(raw, np.uint8)[:-4]) != raw[-4:]:
                raise ShardReadError(f"{key}: index checksum")
            index = np.frombuffer(raw, "<u8", count=2 * self.n_inner).reshape(-1, 2)
            if self.keep_indexes:
                self._indexes[key] = index
        return index

    def _bodies(self, shard: int, first: int, count: int) -> list[np.ndarray]:
        """The stored bytes of inner chunks first..first+count-1, each crc32c checked and stripped."""
        key = self.key((shard,) + (0,) * (len(self.shape) - 1))
        try:
            if not self.sharded:                    # the file is the one chunk
                chunk = np.frombuffer(self.source.whole(key), np.uint8)
                if first != 0 or count != 1 or len(chunk) < 4 or _crc(chunk[:-4]) != chunk[-4:].tobytes():
                    raise ShardReadError(f"{key}: checksum")
                return [chunk[:-4]]
            index = self._index(key)[first:first + count]
            if len(index) != count or (index == _MISSING).any():
                raise ShardReadError(f"{key}: inner chunk missing")
            lo, hi = int(index[:, 0].min()), int((index[:, 0] + index[:, 1]).max())
            data = np.frombuffer(self.source.range(key, lo, hi), np.uint8)
            if len(data) != hi - lo:
                raise ShardReadError(f"{key}: shorter than its index says")
        except ShardReadError:
            raise
        except Exception as e:  # noqa: BLE001 - a missing or unreadable object: zarr says which
            raise ShardReadError(str(e)) from None
        bodies = []
        for j, (offset, nbytes) in enumerate(index.tolist()):
            chunk = data[offset - lo:offset - lo + nbytes]
            if nbytes < 4 or _crc(chunk[:-4]) != chunk[-4:].tobytes():
                raise ShardReadError(f"{key}: inner chunk {first + j} checksum")
            bodies.append(chunk[:-4])
        return bodies

    def _decode(self, body: np.ndarray, dest: np.ndarray) -> None:
        """Undo the compressor of one inner chunk into dest (its uint8 bytes, exactly its size)."""
        if self.compressor is None:
            if len(body) != len(dest):
                raise ShardReadError(f"an inner chunk has {len(body)} bytes, not {len(dest)}")
            dest[:] = body
            return
        try:
            got = self.compressor.decode(body, out=dest)
        except Exception as e:  # noqa: BLE001 - a codec failure: zarr reports it
            raise ShardReadError(f"an inner chunk failed to decode: {e}") from None
        if np.asarray(got).nbytes != len(dest):
            raise ShardReadError("an inner chunk decoded to the wrong size")


def _crc(b) -> bytes:
    return np.uint32(google_crc32c.value(b)).tobytes()


def _compressor(codec: dict):
    """numcodecs' codec for a zarr v3 compressor entry; False if it is not one read here."""
    conf = codec.get("configuration", {})
    if codec["name"] == "zstd":
        from numcodecs import Zstd
        return Zstd(level=conf.get("level", 0))
    if codec["name"] == "blosc":
        from numcodecs import Blosc
        return Blosc()                              # blosc frames describe themselves
    return False
