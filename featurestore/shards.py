"""Direct reads of whole inner chunks from the shard files of a local Zarr v3 store.

A trainer epoch reads, per store chunk, the images (a few inner chunks) and one view of each teacher
array (one inner chunk each). Through zarr each such read costs milliseconds of Python and event-loop
hops, more than decoding the bytes. Here a read is: the shard's index (its crc32c checked), the
inner chunks' bytes, each crc32c checked, the compressor undone with the codec zarr itself uses
(numcodecs), and the bytes laid out as the inner chunk's array, in place in the caller's buffer if
given.

Only the layouts kdstore writes are read here (sharding with the index at the end, or one chunk
per file; codecs bytes -> zstd | blosc | none -> crc32c; default chunk keys); for any other layout
`ShardReader.of` returns None. Any failure (a missing shard or inner chunk, a checksum, a short file) raises
ShardReadError, and the caller reads through zarr instead, which yields the fill value or the
canonical error; the fast path never answers where zarr would not give the same array.
"""
from __future__ import annotations

import math
import sys
from pathlib import Path

import google_crc32c
import numpy as np

_MISSING = 2 ** 64 - 1


class ShardReadError(Exception):
    """This read cannot be served from the shard file directly (zarr will say why, or fill)."""


class ShardReader:
    """Inner chunks of one Zarr array on a local disk: sharded, or one chunk per file (a shard of
    one inner chunk, without an index)."""

    def __init__(self, root: Path, shape: tuple[int, ...], shard: tuple[int, ...], inner: tuple[int, ...],
                 dtype: np.dtype, compressor, key, sharded: bool = True):
        self.root, self.shape, self.shard, self.inner, self.key = root, shape, shard, inner, key
        self.sharded = sharded
        self.dtype, self.compressor = dtype, compressor
        self.per_shard = tuple(s // i for s, i in zip(shard, inner))          # inner chunks per shard, per axis
        self.n_inner = math.prod(self.per_shard)
        self.index_bytes = self.n_inner * 16 + 4 if sharded else 0

    @classmethod
    def of(cls, arr, directory: Path) -> ShardReader | None:
        """A reader for zarr array `arr` stored under `directory`, or None for another layout."""
        meta = arr.metadata.to_dict()
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
            dtype = np.dtype(arr.dtype)
            if dtype.kind not in "biuf" or (dtype.itemsize > 1 and (
                    codecs[0].get("configuration", {}).get("endian") != "little" or sys.byteorder != "little")):
                return None
            compressor = _compressor(codecs[1]) if len(codecs) == 3 else None
        except (KeyError, TypeError, ValueError):
            return None
        if compressor is False or any(s % i for s, i in zip(shard, inner)):
            return None
        return cls(directory, tuple(arr.shape), shard, inner, dtype, compressor, arr.metadata.encode_chunk_key,
                   sharded)

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

    def inner_chunk(self, shard: int, k: int) -> np.ndarray:
        """Inner chunk k (C order within the shard) of shard (shard, 0, ..., 0), in its full shape."""
        out = np.empty(self.inner, self.dtype)
        (body,) = self._bodies(shard, k, 1)
        self._decode(body, out.reshape(-1).view(np.uint8))
        return out

    def _bodies(self, shard: int, first: int, count: int) -> list[np.ndarray]:
        """The stored bytes of inner chunks first..first+count-1, each crc32c checked and stripped."""
        path = self.root / self.key((shard,) + (0,) * (len(self.shape) - 1))
        try:
            if not self.sharded:                    # the file is the one chunk
                chunk = np.frombuffer(path.read_bytes(), np.uint8)
                if first != 0 or count != 1 or len(chunk) < 4 or _crc(chunk[:-4]) != chunk[-4:].tobytes():
                    raise ShardReadError(f"{path}: checksum")
                return [chunk[:-4]]
            with open(path, "rb") as f:
                size = f.seek(0, 2)
                if size < self.index_bytes:
                    raise ShardReadError(f"{path}: shorter than its index")
                f.seek(size - self.index_bytes)
                raw = f.read(self.index_bytes)
                if _crc(np.frombuffer(raw, np.uint8)[:-4]) != raw[-4:]:
                    raise ShardReadError(f"{path}: index checksum")
                index = np.frombuffer(raw, "<u8", count=2 * self.n_inner).reshape(-1, 2)[first:first + count]
                if len(index) != count or (index == _MISSING).any():
                    raise ShardReadError(f"{path}: inner chunk missing")
                lo, hi = int(index[:, 0].min()), int((index[:, 0] + index[:, 1]).max())
                if hi > size - self.index_bytes:
                    raise ShardReadError(f"{path}: index points past the data")
                f.seek(lo)
                data = np.frombuffer(f.read(hi - lo), np.uint8)
        except OSError as e:
            raise ShardReadError(str(e)) from None
        bodies = []
        for j, (offset, nbytes) in enumerate(index.tolist()):
            chunk = data[offset - lo:offset - lo + nbytes]
            if nbytes < 4 or _crc(chunk[:-4]) != chunk[-4:].tobytes():
                raise ShardReadError(f"{path}: inner chunk {first + j} checksum")
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
