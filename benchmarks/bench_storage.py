"""Storage: bytes per view of each array; codecs compared on size and on write and read MB/s; and
what the checksums cost. Writes go in whole store chunks (as the builder writes); reads are the
trainer's: one store chunk's images and one view of its per-view arrays.

Images are real (the demo JPEGs squashed to 256 px); embeddings are fp16 Gaussian at MedSigLIP's
width (D = 1152): teacher embeddings are close to incompressible, so this is the honest case.
Checksum cost: the store's own layout (crc32c after the compressor in Zarr, fletcher32 in HDF5)
against the same layout written by zarr / h5py with the checksum left out, in the same run.
"""
from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from featurestore.demo import write_demo_data
from featurestore.pipeline.sources import decode, squash
from featurestore.store.backends import hdf5_codec, zarr_codec
from featurestore.store.schema import FORMAT_VERSION, TeacherLayout, fields, sizes, store_attrs
from featurestore.store.writer import StoreWriter
from featurestore.views import PARAM_NAMES

D, C, K, CHUNK = 1152, 10, 8, 32
TEACHER = TeacherLayout("bench", {"teacher": {"id": "bench"}, "embed_dim": D, "heads": ["probe"]}, FORMAT_VERSION)
TIMED = ("images", TEACHER.pooled, TEACHER.patches)


def _attrs(n: int, grid: int) -> dict:
    return store_attrs(classes=[str(i) for i in range(C)], num_images=n, views=K, image_size=256, chunk_size=CHUNK,
                       patch_grid=grid, param_names=list(PARAM_NAMES), teachers={TEACHER.name: TEACHER.attrs},
                       id_bytes=16)


def _arrays(n: int, grid: int, images: np.ndarray) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    out = {"images": images[:n], "views/params": rng.random((n, K, len(PARAM_NAMES)), dtype=np.float32),
           TEACHER.pooled: rng.standard_normal((n, K, D)).astype(np.float16),
           TEACHER.logits("probe"): rng.standard_normal((n, K, C)).astype(np.float32)}
    if grid:
        out[TEACHER.patches] = rng.standard_normal((n, K, grid, grid, D)).astype(np.float16)
    return out


class _Unchecked:
    """The store's layout for the timed arrays (the schema's own: store chunks, inner chunks, codecs),
    written with zarr / h5py directly and no checksum."""

    def __init__(self, path: Path, attrs: dict, codec: str):
        self.path, self.hdf5 = path, path.suffix == ".h5"
        if self.hdf5:
            import h5py
            self.root = h5py.File(path, "w")
        else:
            import zarr
            self.root = zarr.open_group(path, mode="w")
        for f in fields(attrs):
            if f.name not in TIMED:
                continue
            lay = f.layout(sizes(attrs), attrs["chunk_size"])
            if self.hdf5:
                comp = hdf5_codec(codec, f.codec)
                self.root.create_dataset(f.name, shape=lay.shape, dtype=f.dtype, chunks=lay.inner,
                                         **({"compression": comp} if comp else {}))
            else:
                comp = zarr_codec(codec, f.codec)
                self.root.create_array(f.name, shape=lay.shape, dtype=f.dtype, chunks=lay.inner,
                                       shards=lay.chunk if lay.sharded else None,
                                       compressors=[comp] if comp else None, fill_value=0)

    def write(self, name, start, value):
        self.root[name][start:start + len(value)] = value

    def read_chunk(self, name, a, b, k):
        return np.asarray(self.root[name][a:b] if name == "images" else self.root[name][a:b, k])

    def close(self):
        if self.hdf5:
            self.root.close()


def _time_layout(store, arrays: dict[str, np.ndarray], n: int) -> tuple[float, float]:
    """(write MB/s, read MB/s) of the timed arrays, whole store chunks, reads of one view per chunk."""
    payload = sum(arrays[name].nbytes for name in TIMED)
    t0 = time.perf_counter()
    for name in TIMED:
        for a in range(0, n, CHUNK):
            store.write(name, a, arrays[name][a:a + CHUNK])
    write_s = time.perf_counter() - t0
    read, t0 = 0, time.perf_counter()
    for a in range(0, n, CHUNK):
        k = (a // CHUNK) % K
        for name in TIMED:
            if isinstance(store, StoreWriter):
                r = store.reader
                x = r.read("images", a, a + CHUNK) if name == "images" else r.read_view(name, a // CHUNK, k)
            else:
                x = store.read_chunk(name, a, a + CHUNK, k)
            read += x.nbytes
    return payload / 1e6 / write_s, read / 1e6 / (time.perf_counter() - t0)


def run(profile: dict) -> dict:
    n = profile["storage_images"]
    with tempfile.TemporaryDirectory() as tmp:
        src = write_demo_data(Path(tmp) / "img", per_class=max(1, n // 10), seed=0, sizes=(450, 1000))
        images = np.stack([squash(decode(str(p)).rgb, 256) for p in sorted(src.rglob("*")) if p.is_file()])
        n = len(images) // CHUNK * CHUNK
        per_field = []
        for grid in (0, 4, 8, 16):
            path = Path(tmp) / f"g{grid}.zarr"
            s = StoreWriter.create(path, _attrs(n, grid), "zstd")
            for name, arr in _arrays(n, grid, images).items():
                s.write(name, 0, arr)
            r = s.reader
            for f in r.fields():
                if f.per_view and (grid == 0 or f.name == TEACHER.patches):
                    name = f.name if f.name != TEACHER.patches else f"{TEACHER.patches} g={grid}"
                    per_field.append({"field": name, "raw_bytes_per_view": r.nbytes(f.name) / (n * K),
                                      "zstd_bytes_per_view": r.stored_bytes(f.name) / (n * K)})
            s.close()
            shutil.rmtree(path)
        arrays = _arrays(n, 8, images)
        codecs = []
        for suffix, codec in [(".zarr", "none"), (".zarr", "zstd"), (".zarr", "blosc"),
                              (".h5", "none"), (".h5", "gzip"), (".h5", "lzf")]:
            row = {"backend": "zarr" if suffix == ".zarr" else "hdf5", "codec": codec}
            for checked in (True, False):
                path = Path(tmp) / f"c{codec}{int(checked)}{suffix}"
                attrs = _attrs(n, 8)
                store = StoreWriter.create(path, attrs, codec) if checked else _Unchecked(path, attrs, codec)
                write, read = _time_layout(store, arrays, n)
                size = sum((store.reader.stored_bytes(name) if checked else _size(path, name)) for name in TIMED)
                store.close()
                key = "checked" if checked else "unchecked"
                row |= {f"{key}_write_mb_s": write, f"{key}_read_mb_s": read, f"{key}_size_mb": size / 1e6}
                (shutil.rmtree if path.is_dir() else Path.unlink)(path)
            row["ratio"] = sum(arrays[name].nbytes for name in TIMED) / 1e6 / row["checked_size_mb"]
            codecs.append(row)
    return {"images": n, "views_per_image": K, "embed_dim": D, "per_field": per_field, "codecs": codecs}


def _size(path: Path, name: str) -> int:
    if path.suffix == ".h5":
        import h5py
        with h5py.File(path, "r") as f:
            return int(f[name].id.get_storage_size())
    return sum(p.stat().st_size for p in (path / name).rglob("*") if p.is_file())


def rows(r: dict) -> list[list]:
    out = [[f"storage: {f['field']} bytes/view", f"{f['zstd_bytes_per_view']:.0f} B (zstd)",
            f"{f['raw_bytes_per_view']:.0f} B raw"] for f in r["per_field"]]
    base = next(c for c in r["codecs"] if c["backend"] == "hdf5" and c["codec"] == "none")
    for c in r["codecs"]:
        out.append([f"storage: {c['backend']} {c['codec']} (images + pooled + patches g=8, one view per chunk read)",
                    f"{c['checked_size_mb']:.1f} MB, write {c['checked_write_mb_s']:.0f} MB/s, "
                    f"read {c['checked_read_mb_s']:.0f} MB/s",
                    f"size {c['checked_size_mb'] / base['checked_size_mb']:.2f}x, write "
                    f"{c['checked_write_mb_s'] / base['checked_write_mb_s']:.2g}x, read "
                    f"{c['checked_read_mb_s'] / base['checked_read_mb_s']:.2g}x of HDF5 none"])
    for c in r["codecs"]:
        check = "crc32c" if c["backend"] == "zarr" else "fletcher32"
        out.append([f"checksums: {c['backend']} {c['codec']} with {check}",
                    f"write {c['checked_write_mb_s']:.0f} MB/s, read {c['checked_read_mb_s']:.0f} MB/s",
                    f"write {c['checked_write_mb_s'] / c['unchecked_write_mb_s']:.2f}x, read "
                    f"{c['checked_read_mb_s'] / c['unchecked_read_mb_s']:.2f}x, size "
                    f"{c['checked_size_mb'] / c['unchecked_size_mb']:.4f}x of the same layout without"])
    return out
