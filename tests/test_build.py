"""featurestore build end to end: resume after SIGKILL, multi-process, refusals, CLI output."""
from __future__ import annotations

import fcntl
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO, SMALL, run_cli, run_module
from featurestore.store import Store


def assert_same_store(a: Path, b: Path) -> None:
    with Store.open(a) as x, Store.open(b) as y:
        assert x.complete and y.complete
        assert x.ids() == y.ids()
        for f in x.fields():
            np.testing.assert_array_equal(x.read(f.name), y.read(f.name), err_msg=f.name)
        for head in x.heads():
            for k, v in x.head_arrays(head).items():
                np.testing.assert_array_equal(v, y.head_arrays(head)[k], err_msg=f"heads/{head}/{k}")
        assert x.attrs["metrics"] == y.attrs["metrics"]


def done_count(path: Path) -> int:
    if path.suffix == ".zarr":
        return len(list((path / "progress" / "done").glob("c/*")))
    return -1


SLOW = [a for a in SMALL] + ["--views", "8", "--chunk-size", "4"]      # 15 chunks, more work per chunk


@pytest.mark.parametrize("suffix", [".zarr", ".h5"])
def test_resume_after_sigkill_equals_uninterrupted(tmp_path, demo_images, suffix):
    ref, out = tmp_path / f"ref{suffix}", tmp_path / f"killed{suffix}"
    assert run_cli("build", "--images", demo_images, "--out", ref, *SLOW) == 0
    cmd = [sys.executable, "-m", "featurestore", "build", "--images", str(demo_images), "--out", str(out), *SLOW]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if suffix == ".zarr" and done_count(out) >= 2:
            break
        if suffix == ".h5" and out.exists() and out.stat().st_size > 200_000:
            break
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the build finished before it could be killed"
    if suffix == ".zarr":
        assert 2 <= done_count(out) < 15
    rc = run_cli("build", "--images", demo_images, "--out", out, *SLOW)
    assert rc == 0
    assert_same_store(ref, out)


def test_two_process_build_equals_one_process(tmp_path, demo_images):
    """Same thread count per process (torchrun sets OMP_NUM_THREADS=1), one process vs two: equal bits."""
    one, out = tmp_path / "one.zarr", tmp_path / "two.zarr"
    r = run_module("featurestore", "build", "--images", demo_images, "--out", one, *SMALL, env={"OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        "-m", "featurestore", "build", "--images", str(demo_images), "--out", str(out), *SMALL],
                       cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "rank 0/2: teacher pass over 4 chunk(s)" in r.stderr     # 8 chunks, split between the ranks
    assert "rank 1/2: teacher pass over 4 chunk(s)" in r.stderr
    assert_same_store(one, out)


def test_different_config_is_refused_with_the_difference(tmp_path, demo_images, capsys):
    out = tmp_path / "s.zarr"
    assert run_cli("build", "--images", demo_images, "--out", out, *SMALL) == 0
    assert run_cli("build", "--images", demo_images, "--out", out, *SMALL, "--views", "5") == 2
    err = capsys.readouterr().err
    assert "views.views: stored 3, now 5" in err
    assert run_cli("build", "--images", demo_images, "--out", out, *SMALL) == 0       # same config: no-op
    assert "already complete" in capsys.readouterr().err


def test_lock_stops_a_second_build(tmp_path, demo_images, capsys):
    out = tmp_path / "s.zarr"
    with open(str(out) + ".lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert run_cli("build", "--images", demo_images, "--out", out, *SMALL) == 2
    assert "another build is writing" in capsys.readouterr().err
    assert not out.exists()


def test_inspect_json_and_class_order(small_store, capsys):
    assert run_cli("inspect", small_store, "--json") == 0
    s = json.loads(capsys.readouterr().out)
    assert s["num_images"] == 60 and s["views_per_image"] == 3
    assert s["classes"] == sorted(s["classes"]) and s["classes"][1].startswith("10. Warts")
    assert s["teacher"] == {**s["teacher"], "id": "random:tiny", "weights": "random"}
    names = {f["name"]: f for f in s["fields"]}
    assert names["teacher/pooled"]["shape"] == [60, 3, 64] and names["teacher/pooled"]["dtype"] == "float16"
    assert names["teacher/patches"]["shape"] == [60, 3, 2, 2, 64]
    assert s["bytes_per_view"] > 0 and s["skipped"]["count"] == 0
    assert 0 <= s["probe"]["cv_macro_f1"] <= 1 and 0 <= s["probe"]["cv_accuracy"] <= 1
    assert sum(r["train"] + r["heldout"] for r in s["class_counts"]) == 60
    assert run_cli("inspect", small_store) == 0
    text = capsys.readouterr().out
    assert "RANDOM TEACHER WEIGHTS" in text and "    1      " in text and "10. Warts" in text


def test_classes_file_sets_the_order(tmp_path, demo_images):
    names = sorted(p.name for p in demo_images.iterdir())
    order = sorted(names, key=lambda n: int(n.split(".")[0]))          # 1, 2, ..., 10
    (tmp_path / "classes.txt").write_text("\n".join(order))
    out = tmp_path / "s.zarr"
    assert run_cli("build", "--images", demo_images, "--out", out, *SMALL, "--classes", tmp_path / "classes.txt") == 0
    with Store.open(out) as s:
        assert s.classes == order
        ids, labels = s.ids(), s.read("labels")
        assert all(order[label] == i.split("/")[0] for i, label in zip(ids, labels))


def test_verify_finds_damage(tmp_path, small_store, capsys):
    assert run_cli("verify", small_store) == 0
    import shutil
    broken = tmp_path / "broken.zarr"
    shutil.copytree(small_store, broken)
    import zarr
    g = zarr.open_group(broken, mode="r+")
    g["teacher/pooled"][9, 1, 0] = np.nan
    g["progress/done"][3] = False
    assert run_cli("verify", broken) == 1
    err = capsys.readouterr().err
    assert "non-finite values in images 8..15" in err and "1 of 8 chunks are not done: [3]" in err


def test_cli_help_explains_flags():
    r = run_module("featurestore", "build", "--help")
    assert r.returncode == 0
    for flag in ("--teacher", "--views", "--patch-grid", "--on-bad-image", "--classes", "--overwrite"):
        assert flag in r.stdout
    text = " ".join(r.stdout.split())
    assert "(view 0 is the whole image) (default: 8)" in text and "(default: google/medsiglip-448)" in text
    assert "(default: None)" not in text
    r = run_module("trainer", "fit", "--help")
    text = " ".join(r.stdout.split())
    assert r.returncode == 0 and "(default: shufflenet_v2_x1_0)" in text and "(default: 30)" in text


def test_missing_store_is_a_clear_error(tmp_path, capsys):
    assert run_cli("inspect", tmp_path / "nope.zarr") == 2
    assert "store not found" in capsys.readouterr().err


def test_manifest_source(tmp_path, demo_images):
    rows = ["path,label"] + [f"{p.relative_to(demo_images)},{p.parent.name}" for p in sorted(demo_images.rglob("*")) if p.is_file()]
    (tmp_path / "m.csv").write_text("\n".join(rows))
    out = tmp_path / "m.zarr"
    assert run_cli("build", "--manifest", tmp_path / "m.csv", "--images", demo_images, "--out", out, *SMALL) == 0
    with Store.open(out) as s:
        assert s.num_images == 60 and s.classes[1].startswith("10. Warts")


def test_env_is_clean():
    assert "HF_HUB_OFFLINE" in os.environ


def test_hdf5_and_zarr_builds_hold_the_same_arrays(tmp_path, demo_images, small_store):
    out = tmp_path / "s.h5"
    assert run_cli("build", "--images", demo_images, "--out", out, *SMALL) == 0
    assert_same_store(small_store, out)
    with Store.open(out) as s:
        assert s.backend == "hdf5" and s.ids()[0].endswith((".jpg", ".png"))
