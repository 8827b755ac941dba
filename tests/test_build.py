"""featurestore build end to end: resume after SIGKILL, multi-process, refusals, locks, CLI output."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
from conftest import REPO, SLOW, SMALL, run_cli

from benchmarks.common import DONE_LINE, STAGES_LINE
from featurestore.store.reader import StoreReader


def assert_same_store(a: Path, b: Path) -> None:
    with StoreReader.open(a) as x, StoreReader.open(b) as y:
        assert x.complete and y.complete
        assert x.ids() == y.ids()
        for f in x.fields():
            if f.name != "ids":
                np.testing.assert_array_equal(x.read(f.name), y.read(f.name), err_msg=f.name)
        for head in x.heads():
            for k, v in x.head_arrays(head).items():
                np.testing.assert_array_equal(v, y.head_arrays(head)[k], err_msg=f"heads/{head}/{k}")
        assert x.teacher().metrics == y.teacher().metrics


def done_count(path: Path) -> int:
    if path.suffix == ".zarr":
        return len(list((path / "progress" / "done").glob("c/*")))
    return -1


@pytest.mark.parametrize("suffix,workers", [pytest.param(".zarr", 1, marks=pytest.mark.slow(22)),
                                            pytest.param(".h5", 0, marks=pytest.mark.slow(12))])
def test_resume_after_sigkill_equals_uninterrupted(tmp_path, demo_images, slow_reference, suffix, workers):
    """Killed mid-write (with its decoding workers alive, where it has any), the same command run at
    once resumes (the lock is the build's own, not its workers'), and the result equals an
    uninterrupted build."""
    ref, out = slow_reference(suffix), tmp_path / f"killed{suffix}"
    cmd = [sys.executable, "-m", "featurestore", "build", "--images", str(demo_images), "--out", str(out), *SLOW,
           "--workers", str(workers)]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if suffix == ".zarr" and done_count(out) >= 2:
            break
        if suffix == ".h5" and out.exists() and out.stat().st_size > 200_000:
            break
        time.sleep(0.02)
    children = psutil.Process(proc.pid).children(recursive=True)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the build finished before it could be killed"
    assert not workers or any(w.is_running() for w in children), "the decoding workers were not alive at the kill"
    if suffix == ".zarr":
        assert 2 <= done_count(out) < 15
    rc = run_cli("build", "--images", demo_images, "--out", out, *SLOW, "--workers", "0")       # at once
    assert rc == 0
    assert_same_store(ref, out)
    gone, alive = psutil.wait_procs(children, timeout=30)                          # orphans notice and leave
    assert not alive, [p.cmdline()[:3] for p in alive]


def test_the_done_line_gives_the_clock_the_benchmarks_read(tmp_path, demo_images, capsys):
    """... and the stage line its stage times, batch and whether the tower was compiled."""
    out = tmp_path / "s.zarr"
    assert run_cli("build", "--images", demo_images, "--out", out, *SMALL, "--batch-size", "auto") == 0
    err = capsys.readouterr().err
    views, pass_s, total_s, load_s, compile_s, heads_s = DONE_LINE.search(err).groups()
    with StoreReader.open(out) as s:
        assert int(views) == s.num_images * s.views_per_image
    assert 0 < float(pass_s) <= float(total_s) and float(load_s) + float(heads_s) < float(total_s)
    assert float(compile_s) < 1                                             # a CPU build runs eagerly
    m = STAGES_LINE.search(err)
    assert m is not None and m.group(2) == "16" and m.group(3) == "eager"  # auto on a CPU: 16 views
    stages = {k: float(v) for k, v in (part.rsplit(" ", 1) for part in m.group(1).split(", "))}
    assert {"decode wait", "render", "teacher", "writer wait", "writer: write", "writer: copy wait"} <= set(stages)
    assert stages["teacher"] > 0 and all(v >= 0 for v in stages.values())
    in_loop = sum(stages[k] for k in ("decode wait", "render", "teacher", "writer wait"))
    assert in_loop <= float(pass_s) + 0.1                                   # the loop's stages fit in the pass


def test_different_config_is_refused_with_the_difference(tmp_path, demo_images, capsys):
    out = tmp_path / "s.zarr"
    assert run_cli("build", "--images", demo_images, "--out", out, *SMALL) == 0
    assert run_cli("build", "--images", demo_images, "--out", out, *SMALL, "--views", "5") == 2
    err = capsys.readouterr().err
    assert "views.views: stored 3, now 5" in err
    assert run_cli("build", "--images", demo_images, "--out", out, *SMALL) == 0       # same config: no-op
    assert "already complete" in capsys.readouterr().err


def test_lock_is_taken_first_names_its_holder_and_goes_away(tmp_path, demo_images, capsys):
    out = tmp_path / "s.zarr"
    lock = tmp_path / "s.zarr.lock"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, os, socket, sys, time; fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT); "
        "fcntl.lockf(fd, fcntl.LOCK_EX); os.write(fd, f'{os.getpid()} {socket.gethostname()}'.encode()); "
        "print('locked', flush=True); time.sleep(60)"), str(lock)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        # a missing image folder would be an error too: the lock is looked at before anything else
        assert run_cli("build", "--images", tmp_path / "missing", "--out", out, *SMALL) == 2
        err = capsys.readouterr().err
        assert f"process {holder.pid} on {socket.gethostname()} holds {lock}" in err
        assert err.count("\n") == 1 and not out.exists() and lock.exists()      # one line; the holder's file stays
    finally:
        holder.kill()
        holder.wait()
    assert run_cli("build", "--images", tmp_path / "missing", "--out", out, *SMALL) == 2   # failed: no lock left
    assert "image folder not found" in capsys.readouterr().err and not lock.exists()
    assert run_cli("build", "--images", demo_images, "--out", out, *SMALL) == 0           # a stale file is taken over
    assert not lock.exists()


def test_the_lock_is_not_inherited_by_forked_workers(tmp_path):
    """POSIX record locks belong to the process: a child forked while the build holds it does not hold it."""
    from featurestore.common.lock import FileLock
    out = str(tmp_path / "s.zarr")
    with FileLock(out, "build"):
        pid = os.fork()
        if pid == 0:                                    # the child lives on after the parent lets go
            time.sleep(3)
            os._exit(0)
    try:
        with FileLock(out, "build"):                   # the child is still alive: the lock is free anyway
            assert os.waitpid(pid, os.WNOHANG) == (0, 0)
    finally:
        os.waitpid(pid, 0)


def test_inspect_json_and_class_order(small_store, capsys):
    assert run_cli("inspect", small_store, "--json") == 0
    s = json.loads(capsys.readouterr().out)
    assert s["num_images"] == 80 and s["views_per_image"] == 3 and s["unlabeled"] == 20
    assert s["classes"] == sorted(s["classes"]) and s["classes"][1].startswith("10. Warts")
    assert s["teacher"] == {**s["teacher"], "id": "random:tiny", "weights": "random"}
    names = {f["name"]: f for f in s["fields"]}
    pooled = names["teachers/siglip/pooled"]
    assert pooled["shape"] == [80, 3, 64] and pooled["dtype"] == "float16"
    assert names["teachers/siglip/patches"]["shape"] == [80, 3, 2, 2, 64]
    assert s["bytes_per_view"] > 0 and s["skipped"]["count"] == 0
    assert 0 <= s["probe"]["cv_macro_f1"] <= 1 and 0 <= s["probe"]["cv_accuracy"] <= 1
    assert sum(r["train"] + r["heldout"] for r in s["class_counts"]) == 60
    b = s["last_build"]
    assert b["device"] == "cpu" and b["views"] == 240 and b["batch"] == 16 and not b["compiled"]
    assert {"load_s", "compile_s", "pass_s", "heads_s"} <= set(b["seconds"]) and b["stages"]["teacher"] > 0
    assert run_cli("inspect", small_store) == 0
    text = capsys.readouterr().out
    assert "RANDOM TEACHER WEIGHTS" in text and "    1      " in text and "10. Warts" in text
    assert "20 unlabelled images" in text
    assert "last build 240 views on cpu, batch 16, eager: model load" in text and "(decode wait " in text


def test_classes_file_sets_the_order(tmp_path, demo_images):
    names = sorted(p.name for p in demo_images.iterdir())
    order = sorted(names, key=lambda n: int(n.split(".")[0]))          # 1, 2, ..., 10
    (tmp_path / "classes.txt").write_text("\n".join(order))
    out = tmp_path / "s.zarr"
    assert run_cli("build", "--images", demo_images, "--out", out, *SMALL, "--classes", tmp_path / "classes.txt") == 0
    with StoreReader.open(out) as s:
        assert s.classes == order
        ids, labels = s.ids(), s.read("labels")
        assert all(order[label] == i.split("/")[0] for i, label in zip(ids, labels))


def test_cli_help_explains_flags(capsys):
    from featurestore.cli import main as featurestore_main
    from trainer.cli import main as trainer_main
    for main, argv in ((featurestore_main, ["build", "--help"]), (trainer_main, ["fit", "--help"])):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 0
        out = capsys.readouterr().out
        text = " ".join(out.split())
        assert "(default: None)" not in text and "(default: True)" not in text and "(default: False)" not in text
        if argv[0] == "build":
            for flag in ("--teacher", "--views", "--patch-grid", "--on-bad-image", "--classes", "--overwrite"):
                assert flag in out
            assert "(view 0 is the whole image) (default: 8)" in text and "(default: google/medsiglip-448)" in text
            assert "skip the text tower (default: the zero-shot head is stored when the model has one)" in text
        else:
            assert "(default: shufflenet_v2_x1_0)" in text and "(default: 30)" in text


def test_missing_store_is_a_clear_error(tmp_path, capsys):
    assert run_cli("inspect", tmp_path / "nope.zarr") == 2
    assert "store not found" in capsys.readouterr().err


def test_manifest_source(tmp_path, demo_images, unlabeled_images):
    """A manifest row with an empty label is an unlabelled image."""
    files = [p for p in sorted(demo_images.rglob("*")) if p.is_file()]
    rows = ["path,label"] + [f"{p.relative_to(demo_images)},{p.parent.name}" for p in files]
    rows += [f"{p}," for p in sorted(unlabeled_images.iterdir())[:3]]
    (tmp_path / "m.csv").write_text("\n".join(rows))
    out = tmp_path / "m.zarr"
    assert run_cli("build", "--manifest", tmp_path / "m.csv", "--images", demo_images, "--out", out, *SMALL,
                   "--allow-outside-paths") == 0                        # the unlabelled rows are absolute paths
    with StoreReader.open(out) as s:
        assert s.num_images == 63 and s.classes[1].startswith("10. Warts") and s.attrs["num_unlabeled"] == 3
        labels, split = s.read("labels"), s.read("split")
        assert ((labels == -1) == (split == -2)).all() and (labels == -1).sum() == 3


def test_hdf5_and_zarr_builds_hold_the_same_arrays(tmp_path, demo_images, unlabeled_images, small_store):
    out = tmp_path / "s.h5"
    assert run_cli("build", "--images", demo_images, "--unlabeled", unlabeled_images, "--out", out, *SMALL) == 0
    assert_same_store(small_store, out)
    with StoreReader.open(out) as s:
        assert s.backend.kind == "hdf5" and s.ids()[0].endswith((".jpg", ".png"))


@pytest.mark.slow(9)
def test_a_script_without_a_main_guard_gets_a_clear_error(tmp_path, demo_images):
    """Spawned decoding workers re-import the calling script; one that builds at import time must be
    told so, in one line, instead of a broken process pool."""
    script = tmp_path / "build_store.py"
    script.write_text(f"import featurestore\nfeaturestore.build(images={str(demo_images)!r}, "
                      f"out={str(tmp_path / 's.zarr')!r}, teacher='random:tiny', views=2, workers=1)\n")
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, cwd=tmp_path, timeout=300,
                       env={**os.environ, "PYTHONPATH": str(REPO)})
    assert r.returncode != 0
    assert 'call featurestore.build under `if __name__ == "__main__":`, or pass workers=0' in r.stderr.splitlines()[-1]
    # the worker stops before doing any of the build again (it never reaches the store's lock)
    assert "featurestore.build was called again by a worker process re-importing the script" in r.stderr
    assert "LockedError" not in r.stderr
