"""Storage: bytes per view for each field, and codecs compared on size, write MB/s, random-batch
read MB/s: Zarr (none, zstd, blosc) against HDF5 (none, gzip, lzf), through the store API.

Images are real (the demo JPEGs squashed to 256 px); embeddings are fp16 Gaussian at MedSigLIP's
width (D = 1152): teacher embeddings are close to incompressible, so this is the honest case.
"""
from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from featurestore.demo import write_demo_data
from featurestore.schema import FORMAT_VERSION
from featurestore.sources import decode, squash
from featurestore.store import Store
from featurestore.views import PARAM_NAMES

D, C, K = 1152, 10, 8


def _attrs(n: int, grid: int) -> dict:
    return {"format_version": FORMAT_VERSION, "classes": [str(i) for i in range(C)], "num_images": n,
            "views_per_image": K, "image_size": 256, "chunk_size": 32, "embed_dim": D, "patch_grid": grid,
            "heads": ["probe"], "param_names": list(PARAM_NAMES), "teacher": {"id": "bench"}}


def _arrays(n: int, grid: int, images: np.ndarray) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    out = {"images": images[:n], "views/params": rng.random((n, K, len(PARAM_NAMES)), dtype=np.float32),
           "teacher/pooled": rng.standard_normal((n, K, D)).astype(np.float16),
           "teacher/logits/probe": rng.standard_normal((n, K, C)).astype(np.float32)}
    if grid:
        out["teacher/patches"] = rng.standard_normal((n, K, grid, grid, D)).astype(np.float16)
    return out


def run(profile: dict) -> dict:
    n = profile["storage_images"]
    with tempfile.TemporaryDirectory() as tmp:
        src = write_demo_data(Path(tmp) / "img", per_class=max(1, n // 10), seed=0, sizes=(450, 1000))
        images = np.stack([squash(decode(str(p)).rgb, 256) for p in sorted(src.rglob("*")) if p.is_file()])
        n = len(images)
        per_field = []
        for grid in (0, 4, 8, 16):
            path = Path(tmp) / f"g{grid}.zarr"
            s = Store.create(path, _attrs(n, grid), "zstd")
            for name, arr in _arrays(n, grid, images).items():
                s[name][:] = arr
            for f in s.fields():
                if f.per_view and (grid == 0 or f.name == "teacher/patches"):
                    name = f.name if f.name != "teacher/patches" else f"teacher/patches g={grid}"
                    raw = s[f.name].nbytes / (n * K)
                    per_field.append({"field": name, "raw_bytes_per_view": raw,
                                      "zstd_bytes_per_view": s.stored_bytes(f.name) / (n * K)})
            shutil.rmtree(path)
        codecs = []
        arrays = _arrays(n, 8, images)
        for suffix, codec in [(".zarr", "none"), (".zarr", "zstd"), (".zarr", "blosc"),
                              (".h5", "none"), (".h5", "gzip"), (".h5", "lzf")]:
            path = Path(tmp) / f"c{codec}{suffix}"
            t0 = time.perf_counter()
            s = Store.create(path, _attrs(n, 8), codec)
            for name, arr in arrays.items():
                for a in range(0, n, 32):                      # whole chunks, as the builder writes
                    s[name][a:a + 32] = arr[a:a + 32]
            s.close()
            write_s = time.perf_counter() - t0
            payload = sum(a.nbytes for a in arrays.values())
            r = Store.open(path)
            size = sum(r.stored_bytes(name) for name in arrays)
            rng = np.random.default_rng(1)
            t0, read = time.perf_counter(), 0
            for _ in range(profile["storage_reads"]):         # random batches of 64 images, one view each
                for i in np.sort(rng.choice(n, size=min(64, n), replace=False)):
                    for name in ("images", "teacher/pooled", "teacher/patches"):
                        read += np.asarray(r[name][i]).nbytes
            read_s = time.perf_counter() - t0
            r.close()
            codecs.append({"backend": "zarr" if suffix == ".zarr" else "hdf5", "codec": codec,
                           "size_mb": size / 1e6, "ratio": payload / size, "write_mb_s": payload / 1e6 / write_s,
                           "random_read_mb_s": read / 1e6 / read_s})
    return {"images": n, "views_per_image": K, "embed_dim": D, "per_field": per_field, "codecs": codecs}


def rows(r: dict) -> list[list]:
    out = [[f"storage: {f['field']} bytes/view", f"{f['zstd_bytes_per_view']:.0f} B (zstd)",
            f"{f['raw_bytes_per_view']:.0f} B raw"] for f in r["per_field"]]
    base = next(c for c in r["codecs"] if c["backend"] == "hdf5" and c["codec"] == "none")
    for c in r["codecs"]:
        out.append([f"storage: {c['backend']} {c['codec']} (images + pooled + patches g=8)",
                    f"{c['size_mb']:.1f} MB, write {c['write_mb_s']:.0f} MB/s, random read {c['random_read_mb_s']:.0f} MB/s",
                    f"size {c['size_mb'] / base['size_mb']:.2f}x, write {c['write_mb_s'] / base['write_mb_s']:.2g}x, "
                    f"random read {c['random_read_mb_s'] / base['random_read_mb_s']:.2g}x of HDF5 none"])
    return out
