"""Files a user receives never run code, nothing is deleted that kdstore did not make, no silent wrong
result: each case as a hostile or unlucky user would try it."""
from __future__ import annotations

import contextlib
import errno
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from conftest import REPO, SLOW, SMALL, build_lock_held, run_cli

from featurestore.demo import write_demo_data
from featurestore.store.reader import StoreReader
from featurestore.store.writer import StoreWriter
from trainer import cli as tcli

FIT = ["--student", "shufflenet_v2_x0_5", "--image-size", "32", "--batch-size", "16", "--cpu"]


def run_trainer(*args) -> int:
    return tcli.main([str(a) for a in args])


def last_line(err: str) -> str:
    assert "Traceback" not in err, err
    return err.strip().splitlines()[-1]


class Payload:
    """What a hostile pickle carries: unpickling it creates `marker` (any call could run instead)."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


@pytest.fixture(scope="module")
def run(tmp_path_factory, small_store) -> Path:
    out = tmp_path_factory.mktemp("safety") / "run"
    assert run_trainer("fit", "--store", small_store, "--out", out, *FIT, "--epochs", "1") == 0
    return out


def poisoned(run: Path, dst: Path, name: str, marker: Path) -> Path:
    """A copy of `run` whose checkpoints/<name> carries a payload beside its real contents."""
    shutil.copytree(run, dst)
    state = torch.load(run / "checkpoints" / name, weights_only=True)
    torch.save(state | {"note": Payload(marker)}, dst / "checkpoints" / name)
    return dst


# ---- received checkpoints ---------------------------------------------------------------------
def test_a_payload_checkpoint_does_not_run_on_resume_export_or_sweep(tmp_path, run, small_store, capsys):
    marker = tmp_path / "payload-ran"
    bad = poisoned(run, tmp_path / "resume", "last.pt", marker)
    assert run_trainer("fit", "--store", small_store, "--out", bad, *FIT, "--epochs", "2", "--resume") == 2
    line = last_line(capsys.readouterr().err)
    assert f"{bad / 'checkpoints' / 'last.pt'}: refused" in line and "nothing that could run code" in line

    bad = poisoned(run, tmp_path / "export", "best.pt", marker)
    assert run_trainer("export", "--run", bad) == 2
    assert f"{bad / 'checkpoints' / 'best.pt'}: refused" in last_line(capsys.readouterr().err)

    sweep = tmp_path / "sweep"                         # a sweep resumes the runs it finds started
    poisoned(run, sweep / "runs" / "labels-s0", "last.pt", marker)
    (sweep / "runs" / "labels-s0" / "summary.json").unlink()
    assert run_trainer("sweep", "--store", small_store, "--out", sweep, *FIT, "--epochs", "2", "--recipes", "labels",
                       "--seeds", "1") == 2
    assert "last.pt: refused" in last_line(capsys.readouterr().err)
    assert not marker.exists()
    import pickle
    with pytest.raises(pickle.UnpicklingError):       # the oracle: a plain pickle load would have run it
        torch.load(bad / "checkpoints" / "best.pt", weights_only=True)
    torch.load(bad / "checkpoints" / "best.pt", weights_only=False)
    assert marker.is_dir()


def test_checkpoints_are_written_whole_or_not_at_all(tmp_path, monkeypatch):
    from trainer import checkpoints
    target = tmp_path / "last.pt"
    checkpoints.save({"w": torch.ones(3)}, target)

    def broken(src, dst):
        raise OSError(errno.EIO, "I/O error")
    monkeypatch.setattr(checkpoints.os, "replace", broken)
    with pytest.raises(OSError):
        checkpoints.save({"w": torch.zeros(3)}, target)
    monkeypatch.undo()
    assert torch.equal(checkpoints.load(target)["w"], torch.ones(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]                # no temporary left behind


# ---- --overwrite deletes only what kdstore made --------------------------------------------------
def test_overwrite_leaves_a_folder_that_is_not_a_store_untouched(tmp_path, demo_images, capsys):
    folder = tmp_path / "project"
    write_demo_data(folder / "images", per_class=1, seed=5)
    (folder / "notes.txt").write_text("my notes")
    before = sorted(p.relative_to(folder) for p in folder.rglob("*"))
    for extra in ([], ["--overwrite"]):
        assert run_cli("build", "--images", demo_images, "--out", folder, *SMALL, *extra) == 2
        line = last_line(capsys.readouterr().err)
        assert "not a store kdstore made" in line and "notes.txt" in line and "--overwrite" not in line
    assert sorted(p.relative_to(folder) for p in folder.rglob("*")) == before
    h5 = tmp_path / "data.h5"
    with h5py.File(h5, "w") as f:
        f["x"] = np.arange(3)
    assert run_cli("build", "--images", demo_images, "--out", h5, *SMALL, "--overwrite") == 2
    assert "lacks kdstore's format attributes" in last_line(capsys.readouterr().err)
    with h5py.File(h5, "r") as f:
        assert list(f["x"][:]) == [0, 1, 2]


def test_overwrite_never_deletes_the_current_home_or_image_folder(tmp_path, small_store, demo_images, monkeypatch,
                                                                 capsys):
    """Even a folder that is a store is not deleted when it is the current directory, the home folder,
    or holds the input images."""
    store = tmp_path / "s.zarr"
    shutil.copytree(small_store, store)
    files = sorted(store.rglob("*"))
    with monkeypatch.context() as m:
        m.chdir(store)
        assert run_cli("build", "--images", demo_images, "--out", ".", *SMALL, "--overwrite") == 2
        assert "it is the current directory" in last_line(capsys.readouterr().err)
    with monkeypatch.context() as m:
        m.setenv("HOME", str(store / "images"))
        assert run_cli("build", "--images", demo_images, "--out", store, *SMALL, "--overwrite") == 2
        assert "it holds your home folder" in last_line(capsys.readouterr().err)
    shutil.copytree(demo_images, store / "mine")
    assert run_cli("build", "--images", store / "mine", "--out", store, *SMALL, "--overwrite") == 2
    assert "it holds the input images" in last_line(capsys.readouterr().err)
    shutil.rmtree(store / "mine")
    assert sorted(store.rglob("*")) == files


def test_overwrite_rebuilds_a_store_and_an_empty_folder_needs_none(tmp_path, small_store, demo_images):
    store = tmp_path / "s.zarr"
    shutil.copytree(small_store, store)
    assert run_cli("build", "--images", demo_images, "--out", store, *SMALL, "--views", "2", "--overwrite") == 0
    with StoreReader.open(store) as s:
        assert s.views_per_image == 2 and s.complete
    empty = tmp_path / "empty.zarr"
    empty.mkdir()
    assert run_cli("build", "--images", demo_images, "--out", empty, *SMALL, "--views", "2") == 0


# ---- wrong results refused ---------------------------------------------------------------------
@pytest.mark.parametrize("ram_gb", ["8", "0"])
def test_all_zero_teacher_targets_are_refused_by_verify_and_fit_alike(tmp_path, small_store, ram_gb, capsys):
    store = tmp_path / "zero.zarr"
    shutil.copytree(small_store, store)
    with StoreWriter.open(store) as s:
        s.write("teachers/siglip/pooled", 0, np.zeros(s.reader.shape("teachers/siglip/pooled"), np.float16))
        n = s.reader.num_chunks
    assert run_cli("verify", store) == 1
    err = capsys.readouterr().err.splitlines()
    zero = [line for line in err if "teachers/siglip/pooled chunk" in line and "constant values" in line]
    assert len(zero) == n and err[-1] == f"{store}: {n} problem(s)"
    assert run_trainer("fit", "--store", store, "--out", tmp_path / "r", *FIT, "--epochs", "1",
                       "--ram-budget-gb", ram_gb) == 2
    line = last_line(capsys.readouterr().err)
    assert "teachers/siglip/pooled holds constant values" in line and f"verify --fix {store}" in line
    assert not (tmp_path / "r" / "student.pt").exists()


def test_an_hdf5_external_link_or_virtual_dataset_is_refused(tmp_path, demo_images, capsys):
    store = tmp_path / "s.h5"
    assert run_cli("build", "--images", demo_images, "--out", store, *SMALL) == 0
    other = tmp_path / "other.h5"
    with h5py.File(store, "r") as src, h5py.File(other, "w") as dst:
        dst["pooled"] = np.random.default_rng(0).standard_normal(src["teachers/siglip/pooled"].shape).astype(np.float16)
    for kind in ("external", "virtual"):
        bad = tmp_path / f"{kind}.h5"
        shutil.copyfile(store, bad)
        with h5py.File(bad, "r+") as f:
            del f["teachers/siglip/pooled"]
            if kind == "external":
                f["teachers/siglip/pooled"] = h5py.ExternalLink(str(other), "/pooled")
            else:
                shape = f["teachers/siglip/logits/probe"].shape[:2] + (64,)
                layout = h5py.VirtualLayout(shape, np.float16)
                layout[...] = h5py.VirtualSource(str(other), "pooled", shape)
                f.create_virtual_dataset("teachers/siglip/pooled", layout)
        assert run_cli("verify", bad) == 1
        err = capsys.readouterr().err
        named = ("teachers/siglip/pooled, an external link to" if kind == "external" else
                 "teachers/siglip/pooled, a virtual dataset")
        assert named in err
        assert run_trainer("fit", "--store", bad, "--out", tmp_path / f"r-{kind}", *FIT, "--epochs", "1") == 2
        assert "refuses links and virtual datasets" in last_line(capsys.readouterr().err)


def test_a_symbolic_link_inside_a_zarr_store_is_named_by_verify(tmp_path, small_store, capsys):
    store = tmp_path / "s.zarr"
    shutil.copytree(small_store, store)
    chunk = next(p for p in (store / "teachers" / "siglip" / "pooled" / "c").rglob("*") if p.is_file())
    shutil.copyfile(chunk, tmp_path / "elsewhere")
    chunk.unlink()
    chunk.symlink_to(tmp_path / "elsewhere")
    assert run_cli("verify", store) == 1
    assert "teachers/siglip/pooled/c/" in (err := capsys.readouterr().err) and ", a symbolic link to " in err


def test_one_class_is_refused_by_build_and_by_fit(tmp_path, demo_images, small_store, capsys):
    one = tmp_path / "one"
    shutil.copytree(sorted(demo_images.iterdir())[0], one / "only")
    assert run_cli("build", "--images", one, "--out", tmp_path / "one.zarr", *SMALL) == 2
    assert "a classifier needs at least two" in last_line(capsys.readouterr().err)
    store = tmp_path / "s.zarr"                            # a store made before the build refused this
    shutil.copytree(small_store, store)
    import zarr
    zarr.open_group(store, mode="r+").attrs["classes"] = ["only"]
    assert run_trainer("fit", "--store", store, "--out", tmp_path / "r", *FIT, "--epochs", "1") == 2
    assert "has 1 class (only); a classifier needs at least two" in last_line(capsys.readouterr().err)


def test_manifest_rows_that_conflict_or_leave_the_folder_are_named(tmp_path, demo_images, capsys):
    images = shutil.copytree(demo_images, tmp_path / "data" / "images")      # manifests are written beside it
    files = sorted(p for p in images.rglob("*") if p.is_file())
    rows = [f"{p.relative_to(images)},{p.parent.name}" for p in files]
    twice = files[4]
    manifest = tmp_path / "m.csv"
    manifest.write_text("\n".join(["path,label", *rows, f"{twice.relative_to(images)},{files[-1].parent.name}"]))
    assert run_cli("build", "--manifest", manifest, "--images", images, "--out", tmp_path / "a.zarr", *SMALL) == 2
    line = last_line(capsys.readouterr().err)
    assert f"rows 6 and {len(files) + 2} list the same image" in line and "with different labels" in line
    outside = tmp_path / "elsewhere.jpg"                                     # ../elsewhere.jpg from the manifest
    shutil.copyfile(files[0], outside)
    for path in (f"../{outside.name}", str(outside)):
        (images.parent / "m.csv").write_text("\n".join(["path,label", *[f"images/{r}" for r in rows],
                                                        f"{path},{files[0].parent.name}"]))
        args = ["build", "--manifest", images.parent / "m.csv", "--out", tmp_path / "b.zarr", *SMALL]
        assert run_cli(*args) == 2
        line = last_line(capsys.readouterr().err)
        assert f"{path!r} is outside {images.parent}" in line and "--allow-outside-paths" in line
    assert run_cli(*args, "--allow-outside-paths") == 0
    with StoreReader.open(tmp_path / "b.zarr") as s:
        assert str(outside) in s.ids()


def test_unlabelled_images_among_the_labelled_ones_are_refused(tmp_path, demo_images, capsys):
    assert run_cli("build", "--images", demo_images, "--unlabeled", demo_images, "--out", tmp_path / "s.zarr",
                   *SMALL) == 2
    assert "is listed twice" in last_line(capsys.readouterr().err)


def test_views_have_an_upper_bound_with_its_reason(tmp_path, demo_images, capsys):
    assert run_cli("build", "--images", demo_images, "--out", tmp_path / "s.zarr", *SMALL, "--views", "100000") == 2
    line = last_line(capsys.readouterr().err)
    assert "views.views must be 1..1024, got 100000" in line and "teacher pass" in line
    assert not (tmp_path / "s.zarr").exists()


def test_yaml_errors_are_one_line_naming_file_and_line(tmp_path, demo_images, small_store, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("views:\n  views: 3\n   seed: 1\n")
    assert run_cli("build", "--config", bad, "--images", demo_images, "--out", tmp_path / "s.zarr") == 2
    line = last_line(capsys.readouterr().err)
    assert line.startswith(f"featurestore build: error: {bad}, line 3, column ") and "(not valid YAML" in line
    marker = tmp_path / "yaml-ran"
    prompts = tmp_path / "prompts.yaml"
    prompts.write_text(f"a: !!python/object/apply:os.mkdir [{str(marker)!r}]\n")
    assert run_cli("build", "--images", demo_images, "--out", tmp_path / "s.zarr", *SMALL, "--prompts", prompts) == 2
    line = last_line(capsys.readouterr().err)
    assert f"{prompts}, line 1, column 4: could not determine a constructor" in line and not marker.exists()
    bad.write_text("optim: {epochs: 2\n")
    assert run_trainer("fit", "--config", bad, "--store", small_store, "--out", tmp_path / "r") == 2
    assert last_line(capsys.readouterr().err).startswith(f"trainer fit: error: {bad}, line 2, column 1")


# ---- full disk, signals, one writer --------------------------------------------------------------
@contextlib.contextmanager
def disk_of(folder: Path, size: int, monkeypatch):
    """`folder` on a disk of `size` bytes: a tmpfs where this machine lets the test mount one, else every
    checkpoint write fails with ENOSPC once the folder would hold more than `size` bytes."""
    folder.mkdir(parents=True)
    mounted = os.geteuid() == 0 and shutil.which("mount") is not None and subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], capture_output=True).returncode == 0
    if not mounted:
        real = os.fsync

        def fsync(fd):
            if sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) > size:
                raise OSError(errno.ENOSPC, "No space left on device")
            return real(fd)
        monkeypatch.setattr(os, "fsync", fsync)
    try:
        yield mounted
    finally:
        if mounted:
            moved = folder.parent / (folder.name + ".kept")          # "free space": the files go to a big disk
            shutil.copytree(folder, moved)
            subprocess.run(["umount", str(folder)], check=True)
            folder.rmdir()
            moved.rename(folder)
        monkeypatch.undo()


@pytest.fixture(scope="module")
def reference(tmp_path_factory, small_store) -> tuple[list[str], Path]:
    """The fit flags the interrupted runs below use, and the run they give when nothing stops them."""
    args = ["--store", str(small_store), *FIT, "--epochs", "5", "--no-unlabeled"]
    ref = tmp_path_factory.mktemp("reference") / "run"
    assert run_trainer("fit", "--out", ref, *args) == 0
    return args, ref


@pytest.mark.slow(6)
def test_a_full_disk_in_fit_ends_in_one_line_and_resume_equals_an_uninterrupted_run(tmp_path, reference, capsys,
                                                                                    monkeypatch):
    args, ref = reference
    epoch_one = sum(p.stat().st_size for p in (ref / "checkpoints").iterdir()) + 16384
    out = tmp_path / "disk" / "run"
    with disk_of(out.parent, int(1.4 * epoch_one), monkeypatch):         # epoch 1 fits, epoch 2 does not
        assert run_trainer("fit", "--out", out, *args) == 2
        line = last_line(capsys.readouterr().err)
    assert line.startswith("trainer fit: error: no space left on device while writing ")
    assert line.endswith("; free space and run the same command with --resume")
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 1
    assert not list(out.rglob("*.tmp"))
    assert run_trainer("fit", "--out", out, *args, "--resume") == 0
    a, b = (torch.load(d / "checkpoints" / "last.pt", weights_only=True) for d in (ref, out))
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    assert (out / "student.pt").is_file()


def test_a_full_disk_before_the_first_epoch_leaves_a_folder_the_same_command_starts(tmp_path, small_store, capsys,
                                                                                   monkeypatch):
    out = tmp_path / "disk" / "run"
    args = ["--store", small_store, "--out", out, *FIT, "--epochs", "1"]
    with disk_of(out.parent, 300_000, monkeypatch):
        assert run_trainer("fit", *args) == 2
        line = last_line(capsys.readouterr().err)
    assert "no space left on device" in line and line.endswith("run the same command (no epoch had finished)")
    assert run_trainer("fit", *args) == 0
    assert (out / "student.pt").is_file()


@contextlib.contextmanager
def signal_when(ready, sig: int):
    """Send `sig` to this process as soon as ready() holds, while the block runs a command in it; a
    signal that comes late finds it ignored, never pytest."""
    import threading
    fired, stop = threading.Event(), threading.Event()

    def watch():
        while not stop.is_set():
            if ready():
                fired.set()
                os.kill(os.getpid(), sig)
                return
            time.sleep(0.01)
    old = signal.signal(sig, signal.default_int_handler if sig == signal.SIGINT else signal.SIG_IGN)
    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        yield fired
    finally:
        stop.set()
        watcher.join()
        signal.signal(sig, signal.SIG_IGN)
        time.sleep(0.05)                                  # a signal in flight lands on SIG_IGN
        signal.signal(sig, old)


@pytest.mark.slow(9)
def test_sigterm_stops_fit_in_one_line_that_says_exactly_what_to_run(tmp_path, reference):
    """A real SIGTERM to a real process (as `timeout` or `docker stop` send it): exit 143, one line with
    the exact command that continues the run, and that command equals never stopping."""
    args, ref = reference
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "trainer", "fit", "--out", str(out), *args], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if (out / "metrics.jsonl").is_file():
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    line = last_line(err)
    assert line.startswith("trainer fit: stopped by SIGTERM; ") and "to continue, run: trainer fit " in line, line
    assert not Path(str(out) + ".lock").exists()
    command = shlex.split(line.split("to continue, run: ", 1)[1])
    assert command[-1] == "--resume"
    assert run_trainer(*command[1:]) == 0
    a, b = (torch.load(d / "checkpoints" / "last.pt", weights_only=True) for d in (ref, out))
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key


def test_ctrl_c_stops_fit_likewise(tmp_path, reference, capsys):
    args, ref = reference
    out = tmp_path / "run"
    with signal_when(lambda: (out / "metrics.jsonl").is_file(), signal.SIGINT) as fired:
        assert run_trainer("fit", "--out", out, *args) == 130
    assert fired.is_set()
    line = last_line(capsys.readouterr().err)
    assert line.startswith("trainer fit: interrupted; ") and "to continue, run: trainer fit " in line, line
    assert not Path(str(out) + ".lock").exists()
    assert run_trainer(*shlex.split(line.split("to continue, run: ", 1)[1])[1:]) == 0
    a, b = (torch.load(d / "checkpoints" / "last.pt", weights_only=True) for d in (ref, out))
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key


def test_sigterm_stops_a_build_in_one_line_and_the_same_command_resumes(tmp_path, demo_images, slow_reference,
                                                                         capsys):
    ref, out = slow_reference(".zarr"), tmp_path / "s.zarr"
    args = ["build", "--images", demo_images, "--out", out, *SLOW, "--workers", "0"]
    with signal_when(lambda: len(list((out / "progress" / "done").glob("c/*"))) >= 2, signal.SIGTERM) as fired:
        assert run_cli(*args) == 143
    assert fired.is_set()
    assert last_line(capsys.readouterr().err) == ("featurestore build: stopped by SIGTERM; finished chunks are kept; "
                                                  "run the same command to continue")
    assert not Path(str(out) + ".lock").exists()
    with StoreReader.open(out) as s:
        assert 2 <= int(s.done().sum()) < s.num_chunks
    assert run_cli(*args) == 0
    from test_build import assert_same_store
    assert_same_store(ref, out)


def test_a_second_fit_on_the_same_folder_is_refused(tmp_path, small_store, capsys):
    out = tmp_path / "run"
    args = ["--store", str(small_store), "--out", str(out), *FIT, "--epochs", "30"]
    proc = subprocess.Popen([sys.executable, "-m", "trainer", "fit", *args], cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not (out / "checkpoints" / "last.pt").is_file():
            time.sleep(0.01)
        assert proc.poll() is None, "the first fit ended before the second started"
        for extra in ([], ["--resume"]):
            assert run_trainer("fit", *args, *extra) == 2
            line = last_line(capsys.readouterr().err)
            assert f"another trainer fit is writing {out}: process {proc.pid} on {socket.gethostname()}" in line
    finally:
        proc.kill()
        proc.wait()


def test_verify_fix_takes_the_build_lock_and_verify_waits_for_a_writer(tmp_path, small_store, capsys):
    store = tmp_path / "s.zarr"
    shutil.copytree(small_store, store)
    with build_lock_held(store) as pid:
        assert run_cli("verify", store, "--fix") == 2
        assert f"another build is writing {store}: process {pid}" in last_line(capsys.readouterr().err)
        assert run_cli("verify", store) == 2                  # what it read could be half written
        assert f"{store} is being written: process {pid} on " in last_line(capsys.readouterr().err)
        assert run_cli("inspect", store) == 0                 # a look at its progress needs no lock
    assert run_cli("verify", store) == 0


def test_an_interrupted_first_epoch_leaves_a_folder_the_same_command_accepts(tmp_path, small_store, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / ".kdstore-run").write_text("{}\n")                  # a fit writes its marker before anything else
    (out / "config.yaml").write_text("left by a start that was killed\n")
    (out / "checkpoints").mkdir()
    (out / "checkpoints" / ".last.pt.123.tmp").write_bytes(b"half")
    args = ["--store", small_store, "--out", out, *FIT, "--epochs", "1"]
    assert run_trainer("fit", *args, "--resume") == 2
    assert "no epoch had finished); run the same command without --resume" in last_line(capsys.readouterr().err)
    (out / "mine.txt").write_text("a file of the user's")
    assert run_trainer("fit", *args) == 2
    assert "holds files a run does not write (mine.txt)" in last_line(capsys.readouterr().err)
    (out / "mine.txt").unlink()
    assert run_trainer("fit", *args) == 0
    assert json.loads((out / "summary.json").read_text())["best_epoch"] == 1
    assert not list(out.rglob("*.tmp"))
