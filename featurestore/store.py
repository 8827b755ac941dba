"""One store API over two backends: Zarr v3 (default, sharded, fsspec URLs) and HDF5.

Arrays are chunked along N in whole store chunks of `chunk_size` images. In Zarr each store chunk
of an array is one shard file (each writer owns whole shards; two writers never touch one), with
inner chunks of a few images ("image" and "index" arrays with large rows: gcd(chunk_size,
IMAGES_PER_INNER_CHUNK) images per inner chunk, so a whole-chunk read decodes few frames and a row
read few extra images) or of one view index ("view" arrays: (chunk, 1, ...)). HDF5 uses the inner
chunk shapes.
Every stored chunk carries a checksum (Zarr: crc32c after the compressor; HDF5: fletcher32), and
every read goes through `read`/`read_view`/`read_rows`, which turn a damaged, missing or unreadable
chunk into one StoreError naming the array and the store chunk.
"""
from __future__ import annotations

import json
import math
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from .shards import ShardReadError, ShardReader
from .schema import FORMAT_VERSION, Field, StoreError, check_attrs, fields, resolve, sizes

HDF5_SUFFIXES = (".h5", ".hdf5")
IMAGES_PER_INNER_CHUNK = 8
_JSON_ATTRS = "json_attributes"          # HDF5: names of the attributes stored as JSON text


def backend_of(path: str) -> str:
    return "hdf5" if str(path).lower().endswith(HDF5_SUFFIXES) else "zarr"


def is_local(path: str) -> bool:
    return "://" not in str(path)


# what a store kdstore made holds: its format attributes (written first), and in Zarr only these entries
MARKER_ATTRS = ("format_version", "param_names", "views_per_image", "chunk_size")
ZARR_ENTRIES = {"zarr.json", "images", "labels", "split", "sha256", "ids", "views", "teacher", "progress", "heads", "pca"}


def not_a_kdstore_store(path: str | Path) -> str | None:
    """None if `path` (local) is a store kdstore made, else why not: it holds kdstore's format attributes
    and, as a Zarr folder, nothing a store does not hold."""
    p = Path(path)
    if backend_of(str(path)) == "hdf5":
        if not p.is_file():
            return "it is not a file"
        try:
            import h5py
            with h5py.File(p, "r") as f:
                names = set(f.attrs)
        except Exception as e:  # noqa: BLE001 - unreadable: it cannot be shown to be a store
            return f"it cannot be read as HDF5 ({_first_line(e)})"
    else:
        if not p.is_dir():
            return "it is not a folder"
        foreign = sorted(e.name for e in p.iterdir() if e.name not in ZARR_ENTRIES)
        if foreign:
            return f"it holds {', '.join(foreign[:5])}{' ...' if len(foreign) > 5 else ''}, which a store does not"
        try:
            doc = json.loads((p / "zarr.json").read_text())
            names = set(doc.get("attributes") or {})
        except (OSError, ValueError, AttributeError):
            return "it has no readable zarr.json"
    if not all(a in names for a in MARKER_ATTRS):
        return "it lacks kdstore's format attributes"
    return None


def remove_store(path: str | Path, protect: dict[str, Path]) -> None:
    """Delete the local store at `path` for --overwrite: only a store kdstore made, never a folder
    in `protect` ({what: path}: the current directory, the home folder, the input images) or one
    that holds any of them."""
    target = Path(path).absolute()
    for what, p in protect.items():
        for q in {Path(p).absolute(), Path(p).resolve()}:
            if q == target or target in q.parents or q == target.resolve() or target.resolve() in q.parents:
                raise StoreError(f"refusing to delete {path}: it "
                                 + ("is " if q in (target, target.resolve()) else "holds ") + what
                                 + "; choose another --out")
    why = not_a_kdstore_store(path)
    if why is not None:
        raise StoreError(f"refusing to delete {path}: it is not a store kdstore made ({why}); choose another --out "
                         "(kdstore deletes only stores it made)")
    if target.is_dir() and not target.is_symlink():
        shutil.rmtree(target)
    else:
        target.unlink()


class Store:
    """A kdstore store. `Store.open(path)` to read; the builder uses `Store.create`."""

    def __init__(self, root: Any, backend: str, path: str, mode: str):
        self._root, self.backend, self.path, self.mode = root, backend, str(path), mode
        self._arrays: dict[str, Any] = {}          # array handles of a read-only store, opened once
        self._shards: dict[str, ShardReader | None] = {}   # direct shard readers (local Zarr, read-only)
        self._attrs: dict[str, Any] | None = None
        self._compression = self._image_compression = None

    # ---- opening -------------------------------------------------------------------------
    @classmethod
    def open(cls, path: str | Path, mode: str = "r") -> Store:
        path, backend = str(path), backend_of(str(path))
        if is_local(path) and not Path(path).exists():
            raise StoreError(f"store not found: {path}")
        try:
            if backend == "hdf5":
                import h5py
                root = h5py.File(path, "r" if mode == "r" else "r+")
            else:
                import zarr
                root = zarr.open_group(path, mode="r" if mode == "r" else "r+")
            store = cls(root, backend, path, mode)
            attrs = store.attrs
        except StoreError:
            raise
        except PermissionError as e:
            raise StoreError(f"cannot open {path}: permission denied ({e.filename or path})") from None
        except Exception as e:  # noqa: BLE001 - any backend failure becomes one clear message
            raise StoreError(f"cannot open {path} as a {backend} store: {_first_line(e)}") from None
        check_attrs(attrs, path)
        if backend == "hdf5":
            links = _hdf5_links(root)
            if links:
                raise StoreError(f"{path} holds {'; '.join(links[:5])}: a store holds its own data, and kdstore "
                                 "refuses links and virtual datasets, which can point at any other file; rebuild "
                                 "the store or copy the data in")
        missing = [f.name for f in store.fields() if f.name not in store]
        if missing:
            raise StoreError(f"{path} lacks arrays {missing}; the store is damaged (rebuild it with --overwrite)")
        return store

    @classmethod
    def create(cls, path: str | Path, attrs: dict[str, Any], compression: str) -> Store:
        """A new, empty store with every array of `attrs`' layout (written by the caller)."""
        path, backend = str(path), backend_of(str(path))
        if backend == "hdf5":
            import h5py
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            root = h5py.File(path, "w")
        else:
            import zarr
            root = zarr.open_group(path, mode="w")
        store = cls(root, backend, path, "w")
        store.set_attrs(attrs)                 # first: whatever happens next, the folder says kdstore made it
        store._compression = _codec(backend, compression)
        store._image_compression = _codec(backend, compression, images=True)
        chunk, size = attrs["chunk_size"], sizes(attrs)
        for f in fields(attrs):
            store._create(f, resolve(f.dims, size), chunk, attrs)
        store._create_plain("progress/done", (store.num_chunks_for(attrs["num_images"], chunk),), "bool", 1)
        return store

    # ---- attributes ----------------------------------------------------------------------
    @property
    def attrs(self) -> dict[str, Any]:
        if self._attrs is None:
            if self.backend == "hdf5":
                raw = dict(self._root.attrs.items())
                as_json = set(json.loads(raw.pop(_JSON_ATTRS, "[]")))
                self._attrs = {k: json.loads(v) if k in as_json else _native(v) for k, v in raw.items()}
            else:
                self._attrs = dict(self._root.attrs)
        return self._attrs

    def set_attrs(self, values: dict[str, Any]) -> None:
        """Scalars are stored natively (HDF5 and Zarr alike); lists and mappings as JSON in HDF5."""
        if self.backend == "hdf5":
            as_json = set(json.loads(self._root.attrs.get(_JSON_ATTRS, "[]")))
            for k, v in values.items():
                if isinstance(v, (bool, int, float, str)):
                    self._root.attrs[k] = np.bool_(v) if isinstance(v, bool) else v
                    as_json.discard(k)
                else:
                    self._root.attrs[k] = json.dumps(v)
                    as_json.add(k)
            self._root.attrs[_JSON_ATTRS] = json.dumps(sorted(as_json))
        else:
            self._root.attrs.update(values)
        self._attrs = None

    def fields(self) -> list[Field]:
        return fields(self.attrs)

    def field(self, name: str) -> Field:
        for f in self.fields():
            if f.name == name:
                return f
        raise StoreError(f"{self.path} has no array {name!r}" + (" (dropped by `featurestore slim`)"
                                                                 if name in self.attrs.get("dropped", ()) else ""))

    # ---- layout --------------------------------------------------------------------------
    def _create(self, f: Field, shape: tuple[int, ...], chunk: int, attrs: dict) -> None:
        n_chunk = (min(chunk, shape[0]),) + shape[1:]                      # one store chunk
        if f.kind == "view":
            inner = n_chunk[:1] + (1,) + shape[2:]                         # (chunk, 1 view, ...)
        elif int(np.prod(shape[1:])) * np.dtype(_np_dtype(f.dtype)).itemsize > 4096:
            inner = (math.gcd(IMAGES_PER_INNER_CHUNK, chunk),) + shape[1:]   # shards hold whole inner chunks
        else:
            inner = n_chunk
        fill = float("nan") if f.dtype.startswith("float") else 0
        codec = self._image_compression if f.name == "images" else self._compression
        if self.backend == "hdf5":
            import h5py
            dtype = h5py.string_dtype("utf-8", length=attrs.get("id_bytes", 256)) if f.dtype == "str" else f.dtype
            kw = {"compression": codec} if codec else {}
            self._root.create_dataset(f.name, shape=shape, dtype=dtype, chunks=inner, fletcher32=True,
                                      fillvalue=None if f.dtype == "str" else fill, **kw)
            return
        from zarr.codecs import Crc32cCodec
        codecs = ([codec] if codec else []) + [Crc32cCodec()]
        if f.dtype == "str":
            self._root.create_array(f.name, shape=shape, dtype=str, chunks=n_chunk, compressors=codecs)
            return
        shards = None if inner == n_chunk else n_chunk
        self._root.create_array(f.name, shape=shape, dtype=f.dtype, chunks=inner, shards=shards,
                                compressors=codecs, fill_value=fill)

    def _create_plain(self, name: str, shape: tuple[int, ...], dtype: str, chunk: int) -> None:
        if self.backend == "hdf5":
            self._root.create_dataset(name, shape=shape, dtype=dtype, chunks=(chunk,), fletcher32=True)
        else:
            from zarr.codecs import Crc32cCodec
            self._root.create_array(name, shape=shape, dtype=dtype, chunks=(chunk,), fill_value=False,
                                    compressors=[Crc32cCodec()])

    def write_head(self, head: str, arrays: dict[str, np.ndarray]) -> None:
        """heads/<head>/<name>: small arrays needed to recompute a head's logits."""
        for name, value in arrays.items():
            self.write_small(f"heads/{head}/{name}", np.asarray(value))

    def write_small(self, key: str, value: np.ndarray) -> None:
        """A small array written whole (one checksummed chunk), replacing any previous one."""
        if key in self:
            del self._root[key]
        value = np.atleast_1d(value)                 # a chunk (and its checksum) needs one dimension
        if self.backend == "hdf5":
            self._root.create_dataset(key, data=value, chunks=value.shape, fletcher32=True)
        else:
            from zarr.codecs import Crc32cCodec
            arr = self._root.create_array(key, shape=value.shape, dtype=value.dtype, fill_value=0,
                                          compressors=[Crc32cCodec()], config={"write_empty_chunks": True})
            arr[...] = value

    # ---- writing -------------------------------------------------------------------------
    def write(self, name: str, start: int, value: np.ndarray) -> None:
        """value into rows [start, start + len(value)) of array `name`, every chunk stored."""
        arr = self._root[name]
        if self.backend == "zarr":
            arr = arr.with_config({"write_empty_chunks": True})     # a chunk equal to the fill is still a chunk
        arr[start:start + len(value)] = value

    def reset_done(self, done: np.ndarray) -> None:
        """Replace the progress array (one chunk per store chunk) with these values."""
        del self._root["progress/done"]
        self._create_plain("progress/done", (len(done),), "bool", 1)
        self.write("progress/done", 0, done)

    def mark_done(self, c: int, value: bool = True) -> None:
        self.write("progress/done", c, np.array([value]))

    def flush(self) -> None:
        if self.backend == "hdf5":
            self._root.flush()

    # ---- reading -------------------------------------------------------------------------
    def __contains__(self, name: str) -> bool:
        try:
            self._root[name]
        except KeyError:
            return False
        return True

    def __getitem__(self, name: str):
        return self._arr(name)

    def _arr(self, name: str):
        """The array `name`. A read-only store opens each array once: opening one in Zarr parses its
        metadata file (about 1 ms), which would double the cost of a trainer's per-chunk reads."""
        if self.mode != "r":
            return self._root[name]
        arr = self._arrays.get(name)
        if arr is None:
            arr = self._arrays[name] = self._root[name]
        return arr

    def _shard_reader(self, name: str) -> ShardReader | None:
        """Direct reads of whole inner chunks, for a read-only local Zarr store (else None)."""
        if self.backend != "zarr" or self.mode != "r" or not is_local(self.path):
            return None
        if name not in self._shards:
            self._shards[name] = ShardReader.of(self._arr(name), Path(self.path) / name)
        return self._shards[name]

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

    @property
    def complete(self) -> bool:
        return bool(self.attrs.get("complete", False))

    def heads(self) -> list[str]:
        return [h for h in self.attrs["heads"] if f"teacher/logits/{h}" not in self.attrs.get("dropped", ())]

    def done(self) -> np.ndarray:
        with self._guard("progress/done", None):
            return np.asarray(self._root["progress/done"][:], dtype=bool)

    def ids(self) -> list[str]:
        raw = self.read("ids")
        return [x.decode() if isinstance(x, bytes) else str(x) for x in raw]

    def read(self, name: str, start: int | None = None, stop: int | None = None) -> np.ndarray:
        """Rows [start, stop) of `name`, checked: a bad chunk raises StoreError naming it."""
        n = self._arr(name).shape[0]
        start, stop = start or 0, n if stop is None else stop
        chunks = range(start // self.chunk_size, max(start, stop - 1) // self.chunk_size + 1)
        try:
            self._check_present(name, chunks)
            with self._guard(name, None):
                return np.asarray(self._arr(name)[start:stop])
        except StoreError:
            for c in chunks:                       # name the first bad store chunk
                with self._guard(name, c):
                    self._check_present(name, [c])
                    a, b = self.chunk_range(c)
                    self._arr(name)[max(a, start):min(b, stop)]
            raise

    def read_chunk(self, name: str, c: int, out: np.ndarray | None = None) -> np.ndarray:
        """All rows of store chunk c of `name`, into `out` ((rows, ...) C-contiguous) if given."""
        a, b = self.chunk_range(c)
        reader = self._shard_reader(name)
        if reader is not None and reader.per_shard[0] == reader.n_inner:
            try:
                return reader.rows(c, b - a, out)
            except ShardReadError:
                pass                                   # zarr reads it: the fill value or the canonical error
        x = self.read(name, a, b)
        if out is None:
            return x
        out[...] = x
        return out

    def read_view(self, name: str, c: int, k: int) -> np.ndarray:
        """View k of store chunk c of a per-view array: (chunk images, ...), one stored chunk."""
        a, b = self.chunk_range(c)
        reader = self._shard_reader(name)
        if reader is not None and reader.per_shard[1] == reader.n_inner:
            try:
                return reader.inner_chunk(c, k)[:b - a, 0]
            except ShardReadError:
                pass
        with self._guard(name, c):
            self._check_present(name, [c])
            return np.asarray(self._arr(name)[a:b, k])

    def read_rows(self, name: str, rows: np.ndarray, view: int | None = None) -> np.ndarray:
        """Selected rows (sorted image indices), reading only the inner chunks that hold them."""
        rows = np.asarray(rows, dtype=np.int64)
        out = []
        for c in np.unique(rows // self.chunk_size):
            sel = rows[rows // self.chunk_size == c]
            with self._guard(name, int(c)):
                self._check_present(name, [int(c)])
                arr = self._arr(name)
                if self.backend == "zarr":
                    got = arr.get_orthogonal_selection((sel,) if view is None else (sel, view))
                else:
                    got = arr[sel] if view is None else arr[sel, view]
            out.append(np.asarray(got))
        shape = self._arr(name).shape[1:] if view is None else self._arr(name).shape[2:]
        return np.concatenate(out) if out else np.zeros((0,) + shape, self._arr(name).dtype)

    def head_arrays(self, head: str) -> dict[str, np.ndarray]:
        group = self._root[f"heads/{head}"]
        out = {}
        for k in group.keys():
            with self._guard(f"heads/{head}/{k}", None):
                out[k] = np.asarray(group[k][...])
        return out

    def small_keys(self) -> list[str]:
        """Keys of the small arrays (heads' weights and embeddings, the patch basis)."""
        out: list[str] = []
        for top in ("heads", "pca"):
            if top not in self:
                continue
            if self.backend == "hdf5":
                import h5py
                self._root[top].visititems(lambda n, o, t=top: out.append(f"{t}/{n}") if isinstance(o, h5py.Dataset)
                                           else None)
            else:
                import zarr
                out += [f"{top}/{n}" for n, o in self._root[top].members(max_depth=None) if isinstance(o, zarr.Array)]
        return sorted(out)

    def small(self, key: str) -> np.ndarray:
        with self._guard(key, None):
            return np.asarray(self._arr(key)[...])

    @contextmanager
    def _guard(self, name: str, c: int | None) -> Iterator[None]:
        """Backend failures while reading `name` (store chunk c) become one ChunkError."""
        try:
            yield
        except StoreError:
            raise
        except Exception as e:  # noqa: BLE001 - checksum, codec, index and I/O errors alike
            kind, text = read_problem(e)
            raise ChunkError(self, name, c, kind, text) from None

    def describe(self, name: str, c: int | None) -> str:
        if c is None:
            return name
        a, b = self.chunk_range(c) if name != "progress/done" else (c, c + 1)
        return f"{name} chunk {c} (images {a}..{b - 1})"

    # ---- presence of stored chunks -------------------------------------------------------
    def missing_chunks(self, name: str, chunks) -> list[int]:
        """Store chunks of `name` (among `chunks`) with no stored data: a deleted shard, a chunk
        never written. Zarr: the chunk's key; HDF5: allocation of its first inner chunk."""
        arr = self._arr(name)
        out = []
        for c in chunks:
            coords = (c,) + (0,) * (arr.ndim - 1)
            if self.backend == "zarr":
                key = arr.metadata.encode_chunk_key(coords)
                present = _zarr_exists(arr, key)
            else:
                if arr.chunks is None:
                    continue
                offset = (c * (self.chunk_size if name != "progress/done" else 1),) + (0,) * (arr.ndim - 1)
                present = arr.id.get_chunk_info_by_coord(offset).byte_offset is not None
            if not present:
                out.append(c)
        return out

    def _check_present(self, name: str, chunks) -> None:
        if self.backend != "zarr":
            return                                 # HDF5: unwritten float chunks read as NaN (fill)
        missing = self.missing_chunks(name, chunks)
        if missing:
            raise ChunkError(self, name, missing[0], "missing", "is missing (its file was deleted or never written)")

    def stored_bytes(self, name: str) -> int:
        arr = self._root[name]
        if self.backend == "hdf5":
            return int(arr.id.get_storage_size())
        return int(arr.nbytes_stored())

    def close(self) -> None:
        if self.backend == "hdf5":
            self._root.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class ChunkError(StoreError):
    """One stored chunk of one array is damaged, missing or unreadable (kind: checksum | missing | unreadable)."""

    def __init__(self, store: Store, array: str, chunk: int | None, kind: str, text: str):
        self.array, self.chunk, self.kind, self.text = array, chunk, kind, text
        super().__init__(f"{store.path}: {store.describe(array, chunk)} {text}; "
                         f"run `featurestore verify --fix {store.path}`")


def read_problem(e: BaseException) -> tuple[str, str]:
    """(kind, words) for a failed read of a stored chunk. HDF5 applies fletcher32 last when writing,
    so it is the first filter to run on a read: a filter failure there is the checksum's."""
    text = _first_line(e)
    if any(s in text.lower() for s in ("checksum", "fletcher32", "filter returned failure during read")):
        return "checksum", "failed its checksum (the bytes on disk were changed)"
    return "unreadable", f"could not be read ({text})"


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _hdf5_links(root) -> list[str]:
    """Soft and external links and virtual datasets in an HDF5 file: kdstore writes none of them."""
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
    root.visititems_links(link)
    root.visititems(virtual)
    return found


def _zarr_exists(arr, key: str) -> bool:
    from zarr.core.sync import sync
    sp = arr.store_path
    return bool(sync(sp.store.exists(f"{sp.path}/{key}" if sp.path else key)))


def _native(v: Any) -> Any:
    if isinstance(v, bytes):
        return v.decode()
    if isinstance(v, np.generic):
        return v.item()
    return v


def _np_dtype(dtype: str):
    return np.dtype("O") if dtype == "str" else np.dtype(dtype)


def _codec(backend: str, name: str, images: bool = False):
    """The compressor of a store's arrays. "default": HDF5 lzf; Zarr zstd (level 3), but blosc-lz4 for
    `images`, which every epoch reads whole: it decodes about 7x faster than zstd and the pixels shrink
    little under either (the teacher arrays, read 1/K per epoch, keep zstd)."""
    if backend == "hdf5":
        name = "lzf" if name == "default" else name
        if name not in ("none", "gzip", "lzf"):
            raise StoreError(f"HDF5 stores support compression none|gzip|lzf, not {name!r}")
        return None if name == "none" else name
    name = ("lz4" if images else "zstd") if name == "default" else name
    if name not in ("none", "zstd", "blosc", "lz4"):
        raise StoreError(f"Zarr stores support compression none|zstd|blosc|lz4, not {name!r}")
    from zarr.codecs import BloscCodec, ZstdCodec
    return {"none": None, "zstd": ZstdCodec(level=3), "blosc": BloscCodec(cname="zstd", clevel=5),
            "lz4": BloscCodec(cname="lz4", clevel=5, shuffle="noshuffle")}[name]


__all__ = ["Store", "StoreError", "ChunkError", "FORMAT_VERSION", "backend_of", "is_local"]
