"""Round trips through both backends, across chunk and shard boundaries and a partial last chunk;
the v2 layout (one view of one chunk is one stored chunk), checksums, native HDF5 attributes."""
from __future__ import annotations

import json

import numpy as np
import pytest

from featurestore.store.reader import StoreReader
from featurestore.store.schema import FORMAT_VERSION, StoreError, store_attrs
from featurestore.store.writer import StoreWriter
from featurestore.views import PARAM_NAMES


def _attrs(n, k, chunk, grid, **kw):
    teacher = {"teacher": {"id": "x"}, "embed_dim": 12, "patch_dim": 12, "heads": ["probe", "zeroshot"]}
    return store_attrs(classes=[f"c{i}" for i in range(5)], num_images=n, views=k, image_size=16, chunk_size=chunk,
                       patch_grid=grid, param_names=list(PARAM_NAMES), teachers={"siglip": teacher}, id_bytes=20) | kw


def _seeded(name, shape, dtype, i):
    """Data for image i of field `name`: a pure function of (name, i)."""
    rng = np.random.default_rng([i, sum(map(ord, name))])
    if dtype == "str":
        return np.array(f"cls/img_{i}.jpg", dtype=object)
    if np.dtype(dtype).kind in "iu":
        return rng.integers(0, 100, size=shape).astype(dtype)
    return rng.standard_normal(shape).astype(dtype)


def write_seeded(store: StoreWriter) -> dict[str, np.ndarray]:
    written, r = {}, store.reader
    for c in range(r.num_chunks):           # write whole chunks, as the builder does
        a, b = r.chunk_range(c)
        for f in r.fields():
            shape = r.shape(f.name)[1:]
            block = np.stack([_seeded(f.name, shape, f.dtype, i) for i in range(a, b)])
            store.write(f.name, a, block)
            written.setdefault(f.name, []).append(block)
        store.mark_done(c)
    return {k: np.concatenate(v) for k, v in written.items()}


@pytest.mark.parametrize("suffix,compression", [(".zarr", "zstd"), (".zarr", "none"), (".zarr", "blosc"),
                                                (".h5", "lzf"), (".h5", "gzip"), (".h5", "none")])
@pytest.mark.parametrize("grid", [0, 2])
def test_round_trip_across_chunks(tmp_path, suffix, compression, grid):
    n, k, chunk = 23, 3, 5                   # 5 chunks, the last one partial (3 images)
    store = StoreWriter.create(tmp_path / f"s{suffix}", _attrs(n, k, chunk, grid), compression)
    written = write_seeded(store)
    store.close()

    with StoreReader.open(tmp_path / f"s{suffix}") as r:
        assert r.num_images == n and r.num_chunks == 5 and r.chunk_range(4) == (20, 23)
        assert r.done().all()
        assert r.ids() == [f"cls/img_{i}.jpg" for i in range(n)]
        for f in r.fields():
            if f.dtype == "str":
                continue
            full = written[f.name]
            np.testing.assert_array_equal(r.read(f.name), full)
            assert r.read(f.name).dtype == np.dtype(f.dtype)
            np.testing.assert_array_equal(r.read(f.name, 4, 11), full[4:11])   # straddles a boundary
            if f.per_view:
                for c, v in ((0, 0), (4, 2), (2, 1)):
                    a, b = r.chunk_range(c)
                    np.testing.assert_array_equal(r.read_view(f.name, c, v), full[a:b, v])
        rows = np.array([1, 4, 5, 17, 22])
        np.testing.assert_array_equal(r.read_rows("images", rows), written["images"][rows])
        np.testing.assert_array_equal(r.read_rows("teachers/siglip/pooled", rows, view=2),
                                      written["teachers/siglip/pooled"][rows, 2])
        assert ("teachers/siglip/patches" in r) == bool(grid)


def test_one_view_of_one_chunk_is_one_stored_chunk(tmp_path):
    """Zarr: per-view arrays are sharded by store chunk with inner chunks (chunk, 1 view, ...); HDF5 alike;
    and every chunk carries a checksum (crc32c after the compressor; fletcher32)."""
    import h5py
    import zarr
    StoreWriter.create(tmp_path / "s.zarr", _attrs(23, 3, 5, 2, image_size=40), "zstd").close()
    z = zarr.open_group(tmp_path / "s.zarr", mode="r")
    arr = z["teachers/siglip/patches"]
    assert arr.shards == (5, 3, 2, 2, 12) and arr.chunks == (5, 1, 2, 2, 12)
    names = [type(c).__name__ for c in arr.metadata.codecs[0].codecs]
    assert names == ["BytesCodec", "ZstdCodec", "Crc32cCodec"]
    assert z["images"].chunks == (1, 40, 40, 3) and z["images"].shards == (5, 40, 40, 3)   # gcd(5, 8) images
    StoreWriter.create(tmp_path / "s8.zarr", _attrs(40, 3, 12, 2, image_size=40), "zstd").close()
    z8 = zarr.open_group(tmp_path / "s8.zarr", mode="r")
    assert z8["images"].chunks == (4, 40, 40, 3) and z8["images"].shards == (12, 40, 40, 3)
    for name in ("labels", "split", "ids", "sha256", "progress/done"):
        assert "Crc32cCodec" in [type(c).__name__ for c in z[name].metadata.codecs], name
    StoreWriter.create(tmp_path / "s.h5", _attrs(23, 3, 5, 2), "lzf").close()
    with h5py.File(tmp_path / "s.h5", "r") as h:
        assert h["teachers/siglip/patches"].chunks == (5, 1, 2, 2, 12)
        assert h["views/params"].chunks == (5, 1, len(PARAM_NAMES))
        for name in ("images", "labels", "split", "sha256", "ids", "views/params", "teachers/siglip/pooled",
                     "teachers/siglip/patches", "teachers/siglip/logits/probe", "teachers/siglip/logits/zeroshot",
                     "progress/done"):
            assert h[name].fletcher32, name


def test_hdf5_attributes_are_native_scalars(tmp_path):
    import h5py
    path = tmp_path / "s.h5"
    StoreWriter.create(path, _attrs(4, 1, 2, 0, complete=True), "none").close()
    with h5py.File(path, "r") as f:
        assert f.attrs["chunk_size"] == 2 and isinstance(f.attrs["chunk_size"], np.integer)
        assert f.attrs["complete"] == np.True_ and f.attrs["format_version"] == FORMAT_VERSION
        assert json.loads(f.attrs["classes"]) == [f"c{i}" for i in range(5)]      # lists stay JSON
    with StoreReader.open(path) as s:
        assert s.attrs["chunk_size"] == 2 and s.attrs["complete"] is True and s.teacher().info == {"id": "x"}


@pytest.mark.parametrize("suffix", [".zarr", ".h5"])
@pytest.mark.parametrize("version,message", [
    (99, "format_version 99"),
    (1, r"format_version 1; this kdstore reads versions 2, 3: it was written by an older kdstore; rebuild it with "
        r"`featurestore build`")])
def test_other_format_versions_are_refused_with_what_to_do(tmp_path, suffix, version, message):
    path = tmp_path / f"s{suffix}"
    store = StoreWriter.create(path, _attrs(4, 1, 2, 0), "none")
    store.set_attrs({"format_version": version})
    store.close()
    with pytest.raises(StoreError, match=message):
        StoreReader.open(path)


def test_open_missing_and_foreign(tmp_path):
    with pytest.raises(StoreError, match="store not found"):
        StoreReader.open(tmp_path / "nope.zarr")
    import zarr
    zarr.open_group(tmp_path / "other.zarr", mode="w")
    with pytest.raises(StoreError, match="not a kdstore store"):
        StoreReader.open(tmp_path / "other.zarr")


def test_open_reports_missing_array(tmp_path):
    path = tmp_path / "s.h5"
    StoreWriter.create(path, _attrs(4, 1, 2, 0), "none").close()
    import h5py
    with h5py.File(path, "r+") as f:
        del f["teachers/siglip/pooled"]
    with pytest.raises(StoreError, match="teachers/siglip/pooled"):
        StoreReader.open(path)


@pytest.mark.parametrize("compression", ["default", "zstd", "none", "blosc", "lz4"])
@pytest.mark.parametrize("n,chunk,side", [(23, 5, 16), (23, 5, 40), (40, 16, 40)])
def test_direct_shard_reads_equal_what_was_written(tmp_path, monkeypatch, compression, n, chunk, side):
    """A trainer's reads (a store chunk's images, one view of a per-view array) come straight from the
    chunk files, never through zarr, and equal what was written: every codec, a partial last chunk,
    images unsharded (small rows), in inner chunks of one image (gcd(5, 8)) and of eight."""
    store = StoreWriter.create(tmp_path / "s.zarr", _attrs(n, 3, chunk, 2, image_size=side), compression)
    written = write_seeded(store)
    store.close()
    r = StoreReader.open(tmp_path / "s.zarr")
    per_view = [f.name for f in r.fields() if f.per_view]
    assert all(r.backend.direct(name) is not None for name in ["images", *per_view])

    def no_zarr(*a, **k):
        raise AssertionError("read through zarr")
    monkeypatch.setattr(r, "read", no_zarr)
    monkeypatch.setattr(r, "_guard", no_zarr)
    for c in range(r.num_chunks):
        a, b = r.chunk_range(c)
        got = r.read_chunk("images", c)
        assert got.dtype == np.uint8 and np.array_equal(got, written["images"][a:b])
        out = np.zeros_like(got)
        assert r.read_chunk("images", c, out) is out and np.array_equal(out, got)
        for name in per_view:
            for v in range(3):
                got = r.read_view(name, c, v)
                assert got.dtype == written[name].dtype and np.array_equal(got, written[name][a:b, v]), (name, c, v)


def test_default_zarr_compression_is_zstd_and_lz4_for_images(tmp_path):
    """Images, read whole every epoch, take blosc-lz4 (decodes several times faster than zstd); the
    teacher arrays, read one view in K, take zstd."""
    import zarr
    StoreWriter.create(tmp_path / "s.zarr", _attrs(40, 2, 16, 2, image_size=40), "default").close()
    s = zarr.open_group(tmp_path / "s.zarr", mode="r")
    images = s["images"].metadata.codecs[0].codecs
    assert [type(c).__name__ for c in images] == ["BytesCodec", "BloscCodec", "Crc32cCodec"]
    assert images[1].cname.value == "lz4"
    assert [type(c).__name__ for c in s["teachers/siglip/patches"].metadata.codecs[0].codecs] == [
        "BytesCodec", "ZstdCodec", "Crc32cCodec"]


def test_direct_reads_leave_damage_and_gaps_to_zarr(tmp_path):
    """What the direct path cannot serve, zarr answers as before: a flipped byte fails its checksum,
    a deleted shard is missing (both named), a view never written reads as NaN (the fill)."""
    import zarr

    from featurestore.store.reader import ChunkError
    path = tmp_path / "s.zarr"
    store = StoreWriter.create(path, _attrs(23, 3, 5, 2), "default")
    written = write_seeded(store)
    store.close()
    pooled = zarr.open_array(path / "teachers/siglip/pooled", mode="r+", config={"write_empty_chunks": False})
    pooled[5:10, 1] = np.nan                                    # chunk 1, view 1: dropped from its shard
    key = lambda name, c: path / name / zarr.open_array(path / name).metadata.encode_chunk_key(   # noqa: E731
        (c,) + (0,) * (zarr.open_array(path / name).ndim - 1))
    (key("teachers/siglip/patches", 2)).unlink()
    f = key("images", 3)
    data = bytearray(f.read_bytes())
    data[20] ^= 0xFF
    f.write_bytes(bytes(data))

    r = StoreReader.open(path)
    assert np.isnan(r.read_view("teachers/siglip/pooled", 1, 1)).all()
    assert np.array_equal(r.read_view("teachers/siglip/pooled", 1, 2), written["teachers/siglip/pooled"][5:10, 2])
    with pytest.raises(ChunkError, match=r"teachers/siglip/patches chunk 2 \(images 10..14\) is missing") as e:
        r.read_view("teachers/siglip/patches", 2, 0)
    assert e.value.kind == "missing"
    with pytest.raises(ChunkError, match=r"images chunk 3 \(images 15..19\) failed its checksum") as e:
        r.read_chunk("images", 3)
    assert e.value.kind == "checksum"
    assert np.array_equal(r.read_chunk("images", 4), written["images"][20:23])


def test_a_backend_is_one_registered_class_that_claims_its_paths(tmp_path):
    from featurestore.store import backends
    assert backends.backend_class("a.h5") is backends.Hdf5Backend
    assert backends.backend_class("s3://bucket/a.zarr") is backends.RemoteZarr
    assert backends.backend_class(tmp_path / "a.zarr") is backends.ZarrBackend

    class Mine(backends.ZarrBackend):
        priority = 30

        @classmethod
        def claims(cls, path: str) -> bool:
            return path.endswith(".mine")
    try:
        backends.register_backend(Mine)
        assert backends.backend_class(tmp_path / "a.mine") is Mine
        assert backends.backend_class(tmp_path / "a.zarr") is backends.ZarrBackend
        path = tmp_path / "s.mine"
        with StoreWriter.create(path, _attrs(8, 2, 4, 0), "default") as w:
            assert type(w.backend) is Mine
    finally:
        backends.BACKENDS.remove(Mine)
    assert backends.backend_class(tmp_path / "a.mine") is backends.ZarrBackend
