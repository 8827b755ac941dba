"""Format 2 across code changes: stores written by an earlier kdstore (tests/fixtures/v2) still open as
one teacher, verify and train, and the same files and flags still build the same arrays (in format 3,
where the teacher's arrays lie under teachers/<name>/)."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import run_cli

from featurestore.pipeline.config import stored_identity
from featurestore.store.reader import StoreReader

FIXTURE = Path(__file__).parent / "fixtures" / "v2"
FLAGS = ["--teacher", "random:tiny", "--views", "3", "--image-size", "32", "--chunk-size", "4", "--patch-grid", "2",
         "--folds", "2", "--mix-prob", "0.5", "--val-fraction", "0.25", "--workers", "0"]
# computed by numpy and PIL alone: equal bit for bit on any machine
EXACT = ("images", "labels", "split", "sha256", "views/params")


@pytest.mark.parametrize("suffix", [".zarr", ".h5"])
def test_a_store_written_before_opens_and_the_same_build_gives_the_same_arrays(tmp_path, suffix):
    old = tmp_path / f"old{suffix}"
    (shutil.copytree if suffix == ".zarr" else shutil.copyfile)(FIXTURE / f"reference{suffix}", old)
    assert run_cli("verify", old) == 0
    new = tmp_path / f"new{suffix}"
    assert run_cli("build", "--images", FIXTURE / "images", "--unlabeled", FIXTURE / "unlabelled", "--out", new,
                   *FLAGS) == 0
    with StoreReader.open(old) as a, StoreReader.open(new) as b:
        assert a.complete and b.complete and a.ids() == b.ids() and a.classes == b.classes
        assert a.num_images == 14 and a.num_chunks == 4 and a.attrs["num_unlabeled"] == 2
        assert (a.attrs["format_version"], b.attrs["format_version"]) == (2, 3)
        ta, tb = a.teacher(), b.teacher()
        assert (ta.name, tb.name) == ("teacher", "siglip") and ta.pooled == "teacher/pooled"

        def now(name: str) -> str:                                  # a version 2 array's version 3 name
            return name.replace(ta.root + "/", tb.root + "/", 1)
        assert [now(f.name) for f in a.fields()] == [f.name for f in b.fields()]
        for f in a.fields():
            if f.name == "ids":
                continue
            x, y = a.read(f.name), b.read(now(f.name))
            assert x.dtype == y.dtype and x.shape == y.shape, f.name
            if f.name in EXACT:
                np.testing.assert_array_equal(x, y, err_msg=f.name)
            else:                        # the teacher's float arithmetic may round differently on another CPU
                np.testing.assert_allclose(x.astype(np.float64), y.astype(np.float64), rtol=2e-3, atol=2e-3,
                                           err_msg=f.name)
        for head in a.heads():
            for key, value in a.head_arrays(head).items():
                np.testing.assert_allclose(value, b.head_arrays(head)[key], rtol=2e-3, atol=2e-3, err_msg=key)
        for key in ("classes", "views_per_image", "image_size", "chunk_size", "patch_grid", "param_names",
                    "view_policy"):
            assert a.attrs[key] == b.attrs[key], key
        for key in ("embed_dim", "patch_dim", "heads", "prompts"):
            assert ta.attrs[key] == tb.attrs[key], key
        # settings added since the store was written count at their defaults, what its build did; the
        # teacher is now named
        was = stored_identity(a.attrs["identity"])
        assert was | {"teacher": was["teacher"] | {"id": ["siglip=random:tiny"]}} == b.attrs["identity"]
    # and the same build command accepts it as its own (a resume finds nothing to do)
    assert run_cli("build", "--images", FIXTURE / "images", "--unlabeled", FIXTURE / "unlabelled", "--out", old,
                   *FLAGS) == 0
