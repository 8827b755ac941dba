"""A corpus of damage, each case with its exact one-line outcome: byte flips in every array of both
backends, a deleted shard, a damaged shard index, a truncated HDF5 file, a full disk; and
`verify --fix` followed by the same build command gives back a store equal to an undamaged build."""
from __future__ import annotations

import errno
import shutil
from pathlib import Path

import h5py
import pytest
from conftest import SMALL, run_cli
from test_build import assert_same_store

from featurestore.store.reader import StoreReader
from featurestore.store.writer import StoreWriter
from trainer import cli as tcli

FIT = ["--student", "shufflenet_v2_x0_5", "--image-size", "32", "--batch-size", "16", "--cpu", "--epochs", "1",
       "--w-patches", "0.5"]                       # every teacher array is read


@pytest.fixture(scope="module")
def stores(tmp_path_factory, demo_images, unlabeled_images, small_store) -> dict[str, Path]:
    """The same build in both backends."""
    h5 = tmp_path_factory.mktemp("h5") / "small.h5"
    assert run_cli("build", "--images", demo_images, "--unlabeled", unlabeled_images, "--out", h5, *SMALL) == 0
    return {".zarr": small_store, ".h5": h5}


def copy(src: Path, dst_dir: Path) -> Path:
    dst = dst_dir / src.name
    (shutil.copytree if src.is_dir() else shutil.copyfile)(src, dst)
    return dst


def failure(err: str, prog: str) -> str:
    """The one line a failed command ends with (progress lines may come before it; no traceback)."""
    assert "Traceback" not in err, err
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"{prog}: error: "), err
    return last


def chunk_file(path: Path, name: str, c: int) -> Path:
    import zarr
    arr = zarr.open_group(path, mode="r")[name]
    return path / name / arr.metadata.encode_chunk_key((c,) + (0,) * (arr.ndim - 1))


def flip(path: Path, name: str, c: int) -> None:
    """Flip one byte inside the stored data of chunk c of `name` (store chunk c; chunk 0 of a small array)."""
    if path.suffix == ".zarr":
        f = chunk_file(path, name, c)
        data = bytearray(f.read_bytes())
        data[min(20, len(data) // 3)] ^= 0xFF
        f.write_bytes(bytes(data))
        return
    with h5py.File(path, "r") as h:
        ds = h[name]
        step = 1 if name == "progress/done" or name.startswith("heads/") else h.attrs["chunk_size"]
        info = ds.id.get_chunk_info_by_coord((c * step,) + (0,) * (ds.ndim - 1))
        pos = info.byte_offset + info.size // 2
    with open(path, "r+b") as f:
        f.seek(pos)
        byte = f.read(1)[0]
        f.seek(pos)
        f.write(bytes([byte ^ 0xFF]))


ARRAYS = ["images", "labels", "split", "sha256", "ids", "views/params", "teachers/siglip/pooled",
          "teachers/siglip/patches", "teachers/siglip/logits/probe", "teachers/siglip/logits/zeroshot", "progress/done",
          "teachers/siglip/heads/probe/weight"]


@pytest.mark.parametrize("suffix", [".zarr", ".h5"])
@pytest.mark.parametrize("name", ARRAYS)
def test_a_flipped_byte_is_found_named_and_refused(tmp_path, stores, suffix, name, capsys):
    path = copy(stores[suffix], tmp_path)
    c = 0 if "/heads/" in name else 2
    flip(path, name, c)
    assert run_cli("verify", path) == 1
    err = capsys.readouterr().err.splitlines()
    if "/heads/" in name or name == "progress/done":
        where = f"{name}: checksum mismatch"
    else:
        where = f"{name} chunk 2 (images 16..23): checksum mismatch"
    assert any(line == f"{path}: {where} (the bytes on disk were changed)" for line in err), err
    assert err[-1] == f"{path}: 1 problem(s)"
    head = ["--head", "zeroshot"] if name == "teachers/siglip/logits/zeroshot" else []
    assert tcli.main([str(a) for a in ("fit", "--store", path, "--out", tmp_path / "run", *FIT, *head,
                                       "--ram-budget-gb", "0")]) == 2
    err = failure(capsys.readouterr().err, "trainer fit")
    assert "failed its checksum" in err and f"verify --fix {path}" in err, err
    assert name in err and (f"chunk {c}" in err or "/heads/" in name or name == "progress/done")


def test_a_deleted_shard_and_a_damaged_shard_index(tmp_path, stores, capsys):
    path = copy(stores[".zarr"], tmp_path)
    chunk_file(path, "teachers/siglip/pooled", 3).unlink()
    f = chunk_file(path, "teachers/siglip/patches", 5)
    data = bytearray(f.read_bytes())
    data[-10] ^= 0xFF                                           # the shard index sits at the end
    f.write_bytes(bytes(data))
    assert run_cli("verify", path) == 1
    err = capsys.readouterr().err.splitlines()
    assert f"{path}: teachers/siglip/pooled chunk 3 (images 24..31): missing (file deleted or never written)" in err
    assert (f"{path}: teachers/siglip/patches chunk 5 (images 40..47): checksum mismatch (the bytes on disk were "
            "changed)") in err
    assert err[-1] == f"{path}: 2 problem(s)" and not any("Traceback" in line for line in err)
    assert tcli.main([str(a) for a in ("fit", "--store", path, "--out", tmp_path / "run", *FIT, "--ram-budget-gb",
                                       "0", "--w-patches", "0")]) == 2
    err = failure(capsys.readouterr().err, "trainer fit")
    assert "teachers/siglip/pooled chunk 3 (images 24..31) is missing" in err


def test_a_truncated_hdf5_file(tmp_path, stores, capsys):
    path = copy(stores[".h5"], tmp_path)
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size // 2)
    assert run_cli("verify", path) == 1
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and err[0].startswith(f"{path}: cannot open {path} as a hdf5 store") and "1 problem" in err[1]
    assert tcli.main([str(a) for a in ("fit", "--store", path, "--out", tmp_path / "run", *FIT)]) == 2
    assert "cannot open" in failure(capsys.readouterr().err, "trainer fit")


@pytest.mark.parametrize("suffix", [".zarr", ".h5"])
def test_verify_fix_then_the_same_build_restores_the_store(tmp_path, stores, demo_images, unlabeled_images, suffix,
                                                            capsys):
    path = copy(stores[suffix], tmp_path)
    for name, c in (("images", 1), ("teachers/siglip/pooled", 3), ("labels", 0), ("teachers/siglip/logits/probe", 2),
                    ("teachers/siglip/heads/probe/bias", 0)):
        flip(path, name, c)
    if suffix == ".zarr":
        chunk_file(path, "teachers/siglip/patches", 6).unlink()
    assert run_cli("verify", path, "--fix") == 1
    err = capsys.readouterr().err
    assert "chunk(s) marked not done: [1, 3" in err and "index arrays" in err and "heads will be fitted again" in err
    assert run_cli("verify", path) == 1                      # still damaged until the build runs
    capsys.readouterr()
    assert run_cli("build", "--images", demo_images, "--unlabeled", unlabeled_images, "--out", path, *SMALL) == 0
    err = capsys.readouterr().err
    assert "teacher pass over " + ("3" if suffix == ".zarr" else "2") + " chunk(s)" in err
    assert run_cli("verify", path) == 0
    assert_same_store(stores[suffix], path)


@pytest.mark.parametrize("suffix", [".zarr", ".h5"])
def test_a_full_disk_ends_in_one_line_and_resumes_to_the_same_store(tmp_path, stores, demo_images, unlabeled_images,
                                                                     suffix, monkeypatch, capsys):
    """ENOSPC from the storage layer in the middle of the teacher pass: one sentence, finished chunks
    kept; the same command then completes a store equal to an uninterrupted build."""
    out = tmp_path / f"full{suffix}"
    writes = {"n": 0}
    if suffix == ".zarr":
        import zarr.storage._local as local
        real = local._put

        def put(path, value, *a, **kw):
            if "teachers/siglip/pooled/c/" in str(path):
                writes["n"] += 1
                if writes["n"] > 4:
                    raise OSError(errno.ENOSPC, "No space left on device", str(path))
            return real(path, value, *a, **kw)
        monkeypatch.setattr(local, "_put", put)
    else:
        real = StoreWriter.write

        def write(self, name, start, value):
            if name == "teachers/siglip/pooled":
                writes["n"] += 1
                if writes["n"] > 4:
                    raise OSError(errno.ENOSPC, "Can't write data (file write failed: errno = 28)")
            return real(self, name, start, value)
        monkeypatch.setattr(StoreWriter, "write", write)
    args = ["build", "--images", demo_images, "--unlabeled", unlabeled_images, "--out", out, *SMALL]
    assert run_cli(*args) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[-1] == (f"featurestore build: error: no space left on device while writing {out}; free space and "
                       "run the same command to resume")
    with StoreReader.open(out) as s:
        assert 1 <= int(s.done().sum()) < s.num_chunks
    monkeypatch.undo()
    assert run_cli(*args) == 0
    assert_same_store(stores[suffix], out)
    assert not Path(str(out) + ".lock").exists()
