"""Round trips through both backends, across chunk and shard boundaries and a partial last chunk."""
from __future__ import annotations

import numpy as np
import pytest

from featurestore.schema import FORMAT_VERSION, StoreError
from featurestore.store import Store
from featurestore.views import PARAM_NAMES


def _attrs(n, k, chunk, grid):
    return {"format_version": FORMAT_VERSION, "classes": [f"c{i}" for i in range(5)], "num_images": n,
            "views_per_image": k, "image_size": 16, "chunk_size": chunk, "embed_dim": 12, "patch_grid": grid,
            "heads": ["probe", "zeroshot"], "param_names": list(PARAM_NAMES), "teacher": {"id": "x"}}


def _seeded(name, shape, dtype, i):
    """Data for image i of field `name`: a pure function of (name, i)."""
    rng = np.random.default_rng([i, sum(map(ord, name))])
    if np.dtype(dtype).kind in "iu":
        return rng.integers(0, 100, size=shape).astype(dtype)
    return rng.standard_normal(shape).astype(dtype)


@pytest.mark.parametrize("suffix,compression", [(".zarr", "zstd"), (".zarr", "none"), (".zarr", "blosc"),
                                                (".h5", "lzf"), (".h5", "gzip"), (".h5", "none")])
@pytest.mark.parametrize("grid", [0, 2])
def test_round_trip_across_chunks(tmp_path, suffix, compression, grid):
    n, k, chunk = 23, 3, 5                   # 5 chunks, the last one partial (3 images)
    store = Store.create(tmp_path / f"s{suffix}", _attrs(n, k, chunk, grid), compression)
    written = {}
    for c in range(store.num_chunks):       # write whole chunks, as the builder does
        a, b = store.chunk_range(c)
        for f in store.fields():
            shape = store[f.name].shape[1:]
            block = np.stack([_seeded(f.name, shape, f.dtype, i) for i in range(a, b)])
            store[f.name][a:b] = block
            written.setdefault(f.name, []).append(block)
        store["progress/done"][c] = True
    store["ids"][:] = np.array([f"cls/img_{i}.jpg" for i in range(n)], dtype=object)
    store.close()

    with Store.open(tmp_path / f"s{suffix}") as r:
        assert r.num_images == n and r.num_chunks == 5 and r.chunk_range(4) == (20, 23)
        assert r.done().all()
        assert r.ids() == [f"cls/img_{i}.jpg" for i in range(n)]
        for f in r.fields():
            full = np.concatenate(written[f.name])
            np.testing.assert_array_equal(r.read(f.name), full)
            assert r.read(f.name).dtype == np.dtype(f.dtype)
            np.testing.assert_array_equal(r.read(f.name, 4, 11), full[4:11])   # straddles a boundary
        chunk3 = r.read_chunk(3)
        np.testing.assert_array_equal(chunk3["teacher/pooled"], np.concatenate(written["teacher/pooled"])[15:20])
        assert ("teacher/patches" in r) == bool(grid)


@pytest.mark.parametrize("suffix", [".zarr", ".h5"])
def test_open_refuses_other_format_version(tmp_path, suffix):
    path = tmp_path / f"s{suffix}"
    store = Store.create(path, _attrs(4, 1, 2, 0), "none")
    store.set_attrs({"format_version": 99})
    store.close()
    with pytest.raises(StoreError, match="format_version 99"):
        Store.open(path)


def test_open_missing_and_foreign(tmp_path):
    with pytest.raises(StoreError, match="store not found"):
        Store.open(tmp_path / "nope.zarr")
    import zarr
    zarr.open_group(tmp_path / "other.zarr", mode="w")
    with pytest.raises(StoreError, match="not a kdstore store"):
        Store.open(tmp_path / "other.zarr")


def test_open_reports_missing_array(tmp_path):
    path = tmp_path / "s.h5"
    Store.create(path, _attrs(4, 1, 2, 0), "none").close()
    import h5py
    with h5py.File(path, "r+") as f:
        del f["teacher/pooled"]
    with pytest.raises(StoreError, match="teacher/pooled"):
        Store.open(path)
