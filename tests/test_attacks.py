"""The second attack corpus: each case a hostile or unlucky user tried against an earlier kdstore, where
code ran, files were lost or a wrong result passed, now refused in one line (or handled) and left as
it was. The numbers are the cases of the attack's report."""
from __future__ import annotations

import contextlib
import json
import os
import re
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
import zarr
from conftest import LAYOUT, REPO, SMALL, made_once, run_cli, run_module

from featurestore.demo import write_demo_data
from featurestore.store.reader import StoreReader
from featurestore.store.writer import StoreWriter
from trainer import cli as tcli

FIT = ["--student", "shufflenet_v2_x0_5", "--image-size", "32", "--batch-size", "16", "--cpu"]


def run_trainer(*args) -> int:
    return tcli.main([str(a) for a in args])


def last_line(err: str) -> str:
    assert "Traceback" not in err and "internal error" not in err, err
    return err.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def run(tmp_path_factory, small_store) -> Path:
    out = tmp_path_factory.mktemp("attacks") / "run"
    assert run_trainer("fit", "--store", small_store, "--out", out, *FIT, "--epochs", "1") == 0
    return out


@pytest.fixture(scope="session")
def h5_store(tmp_path_factory, demo_images) -> Path:
    def build(out: Path) -> None:
        assert run_cli("build", "--images", demo_images, "--out", out, *SMALL) == 0
    return made_once(tmp_path_factory, "small.h5", build)


def copy(store: Path, dst: Path) -> Path:
    (shutil.copytree if store.is_dir() else shutil.copyfile)(store, dst)
    return dst


# ---- 1. a teacher folder's own code never runs ------------------------------------------------------
def evil_teacher(folder: Path, marker: Path) -> Path:
    folder.mkdir()
    code = {"AutoConfig": "evil.EvilConfig", "AutoModel": "evil.EvilModel"}
    (folder / "config.json").write_text(json.dumps({"model_type": "evil", "auto_map": code}))
    (folder / "evil.py").write_text(f"import os\nos.mkdir({str(marker)!r})\n")
    return folder


@pytest.mark.parametrize("command", ["plan", "build"])
def test_1_a_teacher_folder_that_ships_code_never_runs_it(tmp_path, demo_images, command):
    marker = tmp_path / "evil-ran"
    teacher = evil_teacher(tmp_path / "teacher", marker)
    args = ["featurestore", command, "--images", demo_images, "--teacher", teacher, "--workers", "0"]
    args += ["--out", tmp_path / "s.zarr"] if command == "build" else ["--sample-images", "1"]
    r = subprocess.run([sys.executable, "-m", *map(str, args)], input="y\ny\n", capture_output=True, text=True,
                       cwd=REPO, timeout=120)
    assert r.returncode == 2, r.stderr
    line = last_line(r.stderr)
    assert f"{teacher / 'config.json'} names code of its own (auto_map: evil.py)" in line
    assert "trust_remote_code stays off" in line
    assert not marker.exists()


def test_1_every_transformers_load_keeps_remote_code_off():
    """The one place that calls from_pretrained passes trust_remote_code=False; nothing else calls it."""
    calls = []
    for path in sorted((REPO / "featurestore").rglob("*.py")) + sorted((REPO / "trainer").rglob("*.py")):
        for m in re.finditer(r"\.from_pretrained\((?P<args>[^)]*)\)", path.read_text()):
            calls.append((path.relative_to(REPO).as_posix(), m.group("args")))
    assert calls, "no from_pretrained call found"
    assert all("trust_remote_code=False" in args for _, args in calls), calls
    assert {p for p, _ in calls} == {"featurestore/common/untrusted.py"}


def pickled_teacher(tiny_vision_dir: Path, folder: Path, marker: Path) -> Path:
    """The tiny SigLIP vision checkpoint with its weights as a pickle that also carries a payload."""
    from test_safety import Payload
    from transformers import SiglipVisionModel
    shutil.copytree(tiny_vision_dir, folder)
    state = SiglipVisionModel.from_pretrained(folder).state_dict()
    (folder / "model.safetensors").unlink()
    torch.save(state | {"note": Payload(marker)}, folder / "pytorch_model.bin")
    return folder


def test_1_pickled_weights_are_refused_in_one_line(tmp_path, demo_images, tiny_vision_dir, capsys):
    marker = tmp_path / "payload-ran"
    teacher = pickled_teacher(tiny_vision_dir, tmp_path / "teacher", marker)
    assert run_cli("build", "--images", demo_images, "--out", tmp_path / "s.zarr", *LAYOUT, "--teacher", teacher) == 2
    line = last_line(capsys.readouterr().err)
    assert f"{teacher} holds only pickled weights (pytorch_model.bin)" in line and "safetensors only" in line
    assert "weights_only" not in line and not marker.exists()
    assert not (tmp_path / "s.zarr").exists()


def test_1_a_damaged_local_teacher_is_named_as_a_folder(tmp_path, demo_images, tiny_vision_dir, capsys):
    teacher = shutil.copytree(tiny_vision_dir, tmp_path / "teacher")
    (teacher / "model.safetensors").write_bytes(b"not safetensors")
    assert run_cli("build", "--images", demo_images, "--out", tmp_path / "s.zarr", *LAYOUT, "--teacher", teacher) == 2
    line = last_line(capsys.readouterr().err)
    assert line.startswith(f"featurestore build: error: cannot load the teacher folder {teacher}: ")
    assert "not a local directory" not in line and "hub" not in line


# ---- 2. lock files: never through a link, never a user's file --------------------------------------
def test_2_a_lock_path_that_is_a_link_or_a_users_file_is_refused_and_left_alone(tmp_path, demo_images, small_store,
                                                                               capsys):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    store = tmp_path / "out.zarr"
    Path(str(store) + ".lock").symlink_to(victim)
    assert run_cli("build", "--images", demo_images, "--out", store, *SMALL) == 2
    line = last_line(capsys.readouterr().err)
    assert f"{store}.lock is a symbolic link; kdstore never writes a lock file through a link" in line
    run = tmp_path / "run"
    Path(str(run) + ".lock").symlink_to(victim)
    assert run_trainer("fit", "--store", small_store, "--out", run, *FIT, "--epochs", "1") == 2
    assert f"{run}.lock is a symbolic link" in last_line(capsys.readouterr().err)
    assert victim.read_text() == "precious" and not store.exists() and not run.exists()
    other = tmp_path / "other.zarr"
    mine = Path(str(other) + ".lock")
    mine.write_text("my shopping list\n")
    assert run_cli("build", "--images", demo_images, "--out", other, *SMALL) == 2
    line = last_line(capsys.readouterr().err)
    assert f"{mine} exists and is not a kdstore lock file" in line and "never overwrites or deletes it" in line
    assert mine.read_text() == "my shopping list\n"


# ---- 3. --overwrite deletes only what the store's manifest lists -------------------------------------
def test_3_overwrite_refuses_a_store_holding_a_users_nested_files(tmp_path, small_store, demo_images, capsys):
    store = copy(small_store, tmp_path / "s.zarr")
    (store / "images" / "c" / "0" / "notes.txt").write_text("mine")
    np.save(store / "teachers" / "siglip" / "mydata.npy", np.arange(3))
    before = sorted(p.relative_to(store) for p in store.rglob("*"))
    assert run_cli("build", "--images", demo_images, "--out", store, *SMALL, "--overwrite") == 2
    line = last_line(capsys.readouterr().err)
    assert "not a store kdstore made" in line and "images/c/0/notes.txt" in line
    assert "teachers/siglip/mydata.npy" in line
    assert sorted(p.relative_to(store) for p in store.rglob("*")) == before
    (store / "images" / "c" / "0" / "notes.txt").unlink()
    (store / "teachers" / "siglip" / "mydata.npy").unlink()
    assert run_cli("build", "--images", demo_images, "--out", store, *SMALL, "--views", "2", "--overwrite") == 0
    with StoreReader.open(store) as s:
        assert s.views_per_image == 2


def test_3_overwrite_in_a_bucket_deletes_only_the_manifest(s3, small_store, demo_images, capsys):
    url = f"{s3['bucket']}/nested.zarr"
    s3["fs"].put(str(small_store), url[5:], recursive=True)
    s3["fs"].pipe_file(url[5:] + "/teachers/siglip/mydata.npy", b"mine")
    assert run_cli("build", "--images", demo_images, "--out", url, *SMALL, "--overwrite") == 2
    assert "teachers/siglip/mydata.npy" in last_line(capsys.readouterr().err)
    assert s3["fs"].cat_file(url[5:] + "/teachers/siglip/mydata.npy") == b"mine"
    s3["fs"].rm_file(url[5:] + "/teachers/siglip/mydata.npy")
    s3["fs"].pipe_file(f"{s3['bucket'][5:]}/nested.zarr-notes.txt", b"beside it")    # another key, same prefix
    assert run_cli("build", "--images", demo_images, "--out", url, *SMALL, "--views", "2", "--overwrite") == 0
    assert s3["fs"].cat_file(f"{s3['bucket'][5:]}/nested.zarr-notes.txt") == b"beside it"


def test_3_an_hdf5_store_holding_other_datasets_is_not_overwritten(tmp_path, h5_store, demo_images, capsys):
    store = copy(h5_store, tmp_path / "s.h5")
    with h5py.File(store, "r+") as f:
        f["teachers/siglip/mine"] = np.arange(3)
    assert run_cli("build", "--images", demo_images, "--out", store, *SMALL, "--overwrite") == 2
    assert "teachers/siglip/mine" in last_line(capsys.readouterr().err)
    with h5py.File(store, "r") as f:
        assert list(f["teachers/siglip/mine"][:]) == [0, 1, 2]


# ---- 4. a run folder is one `trainer fit` made ----------------------------------------------------
def test_4_fit_never_overwrites_a_folder_it_did_not_make(tmp_path, small_store, capsys):
    folder = tmp_path / "mine"
    folder.mkdir()
    config = folder / "config.yaml"
    config.write_text("# my settings, with comments\noptim:\n  epochs: 1\n")
    text = config.read_text()
    assert run_trainer("fit", "--config", config, "--store", small_store, "--out", folder, *FIT) == 2
    assert f"--config {config} lies in the run folder {folder}" in last_line(capsys.readouterr().err)
    (folder / "notes.txt").write_text("mine")
    assert run_trainer("fit", "--store", small_store, "--out", folder, *FIT, "--epochs", "1") == 2
    assert "is not a run folder kdstore made (it holds config.yaml, notes.txt" in last_line(capsys.readouterr().err)
    assert config.read_text() == text
    only = tmp_path / "only"
    only.mkdir()
    (only / "metrics.jsonl").write_text("my own log\n")
    assert run_trainer("fit", "--store", small_store, "--out", only, *FIT, "--epochs", "1") == 2
    assert "is not a run folder kdstore made (it holds metrics.jsonl" in last_line(capsys.readouterr().err)
    assert (only / "metrics.jsonl").read_text() == "my own log\n"
    assert run_trainer("fit", "--config", config, "--store", small_store, "--out", tmp_path / "fresh", *FIT) == 0
    assert (tmp_path / "fresh" / ".kdstore-run").is_file() and config.read_text() == text


def test_4_a_run_folder_holding_its_own_config_is_refused(tmp_path, small_store, capsys):
    out = tmp_path / "run"
    assert run_trainer("fit", "--store", small_store, "--out", out, *FIT, "--epochs", "1") == 0
    shutil.rmtree(out / "checkpoints")                     # as if the first epoch never finished
    mine = out / "config.yaml"
    mine.write_text("optim:\n  epochs: 1\n")
    assert run_trainer("fit", "--config", mine, "--store", small_store, "--out", out, *FIT) == 2
    assert f"--config {mine} lies in the run folder {out}" in last_line(capsys.readouterr().err)
    assert mine.read_text() == "optim:\n  epochs: 1\n"


def test_4_a_sweep_never_takes_a_folder_it_did_not_make(tmp_path, small_store, capsys):
    folder = tmp_path / "sweep"
    folder.mkdir()
    (folder / "student.pt").write_bytes(b"my model")
    assert run_trainer("sweep", "--store", small_store, "--out", folder, *FIT, "--epochs", "1", "--recipes",
                       "labels", "--seeds", "1") == 2
    assert "is not a sweep folder kdstore made" in last_line(capsys.readouterr().err)
    assert (folder / "student.pt").read_bytes() == b"my model"


# ---- 5. a killed build takes its workers with it ----------------------------------------------------
@pytest.mark.slow(10)
def test_5_the_workers_of_a_killed_build_end_with_it(tmp_path, demo_images):
    import psutil
    out = tmp_path / "s.zarr"
    proc = subprocess.Popen([sys.executable, "-m", "featurestore", "build", "--images", str(demo_images), "--out",
                             str(out), *SMALL, "--views", "8", "--chunk-size", "4", "--workers", "2"], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    parent = psutil.Process(proc.pid)

    def workers() -> list:                             # the teacher pass's decoding workers, once the store exists
        with contextlib.suppress(psutil.Error):
            if (out / "progress").is_dir():
                return [p for p in parent.children(recursive=True) if "spawn_main" in " ".join(p.cmdline())]
        return []
    deadline, children = time.time() + 120, []
    while time.time() < deadline and proc.poll() is None and len(children) < 2:
        children = workers()
        time.sleep(0.05)
    assert proc.poll() is None and len(children) >= 2, "the build ended before its workers could be seen"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    gone, alive = psutil.wait_procs(children, timeout=20)
    assert not alive, f"{len(alive)} worker(s) outlived the killed build: {[p.pid for p in alive]}"


# ---- 6. eval follows no link out of or back into the folder ----------------------------------------
def test_6_eval_follows_no_link_loop_and_no_link_out(tmp_path, run, demo_images):
    images = shutil.copytree(demo_images, tmp_path / "images")
    third = sorted(p for p in images.iterdir())[3]
    (third / "loop").symlink_to("..")
    outside = tmp_path / "elsewhere.jpg"
    shutil.copyfile(next(third.glob("*.jpg")), outside)
    (third / "out.jpg").symlink_to(outside)
    (third / "in.jpg").symlink_to(next(third.glob("img_*.jpg")))               # inside the folder: followed
    r = run_module("trainer", "eval", "--model", run / "student.pt", "--images", images, "--json", "--workers", "0")
    assert r.returncode == 0, r.stderr
    m = json.loads(r.stdout)
    assert m["num_images"] == 61 and m["per_class"][3]["support"] == 7
    reasons = {s["file"]: s["reason"] for s in m["skipped"]}
    assert reasons[f"{third.name}/loop"].startswith("a link to a folder (not followed")
    assert reasons[f"{third.name}/out.jpg"].startswith("a link out of the folder")


# ---- 7-9. what verify refuses, fit refuses: params, shapes, ids, labels ------------------------------
def refused_alike(store: Path, tmp_path: Path, capsys, words: str) -> None:
    """verify names the problem, inspect shouts it, and fit refuses the store in one line saying it."""
    assert run_cli("verify", store) == 1
    assert words in capsys.readouterr().err
    assert run_cli("inspect", store) == 0
    assert "PROBLEM(S)" in (out := capsys.readouterr().out) and words in out
    assert run_trainer("fit", "--store", store, "--out", tmp_path / "r", *FIT, "--epochs", "1") == 2
    assert words in last_line(capsys.readouterr().err)
    assert not (tmp_path / "r" / "student.pt").exists()


@pytest.mark.parametrize("edit", ["swap", "nudge"])
def test_7_view_params_that_the_seed_does_not_draw_are_refused(tmp_path, small_store, edit, capsys):
    store = copy(small_store, tmp_path / "s.zarr")
    with StoreWriter.open(store) as s:
        rows = s.reader.read("views/params", 0, 8)
        if edit == "swap":
            rows[[0, 1]] = rows[[1, 0]]
        else:
            rows[2, 1, 0] += 0.01                                          # one crop edge moved
        s.write("views/params", 0, rows)                                  # checksums recomputed: they pass
    refused_alike(store, tmp_path, capsys, "are not the ones the store's view seed draws")


def test_8_arrays_of_another_shape_are_refused_at_open(tmp_path, small_store, capsys):
    for name, rows in (("labels", -1), ("images", 0)):
        store = copy(small_store, tmp_path / f"{name}.zarr")
        root = zarr.open_group(store, mode="r+")
        old = root[name][:]
        del root[name]
        new = old[:rows] if rows else old[:, :16, :16]
        root.create_array(name, data=new, chunks=new.shape)
        zarr.consolidate_metadata(store)                                # as a careful editor would
        assert run_cli("verify", store) == 1
        err = capsys.readouterr().err
        assert f"{name} has shape {new.shape} where the store format has {old.shape}" in err, err
        assert run_trainer("fit", "--store", store, "--out", tmp_path / f"r-{name}", *FIT, "--epochs", "1") == 2
        assert f"{name} has shape {new.shape}" in last_line(capsys.readouterr().err)


def test_8_an_hdf5_dataset_of_opaque_type_is_one_line(tmp_path, h5_store, capsys):
    store = copy(h5_store, tmp_path / "s.h5")
    with h5py.File(store, "r+") as f:
        shape = f["teachers/siglip/pooled"].shape
        del f["teachers/siglip/pooled"]
        f.create_dataset("teachers/siglip/pooled", shape=shape, dtype=h5py.opaque_dtype(np.dtype("V2")))
    assert run_cli("verify", store) == 1
    assert "teachers/siglip/pooled has dtype |V2 where the store format has float16" in capsys.readouterr().err
    assert run_trainer("fit", "--store", store, "--out", tmp_path / "r", *FIT, "--epochs", "1") == 2
    assert "teachers/siglip/pooled has dtype |V2" in last_line(capsys.readouterr().err)


@pytest.mark.parametrize("edit", ["ids", "labels"])
def test_9_repeated_ids_and_impossible_labels_are_refused_by_fit_as_by_verify(tmp_path, small_store, edit, capsys):
    store = copy(small_store, tmp_path / "s.zarr")
    with StoreWriter.open(store) as s:
        if edit == "ids":
            ids = np.array(s.reader.ids(), dtype=object)
            ids[1] = ids[0]
            s.write("ids", 0, ids)
        else:
            labels = s.reader.read("labels")
            labels[int(np.flatnonzero(labels >= 0)[0])] = 57
            s.write("labels", 0, labels)
    refused_alike(store, tmp_path, capsys, "ids are repeated" if edit == "ids" else "labels outside -1..9 ([57])")


# ---- 10. a student.pt that is not the one the run exported ----------------------------------------
def test_10_a_replaced_student_file_is_named_by_eval_and_report(tmp_path, run, demo_images, capsys):
    mine = shutil.copytree(run, tmp_path / "run")
    side = json.loads((mine / "student.json").read_text())
    assert side["sha256"] == __import__("hashlib").sha256((mine / "student.pt").read_bytes()).hexdigest()
    other = torch.jit.script(torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                                                 torch.nn.Linear(3, 10)))
    torch.jit.save(other, str(mine / "student.pt"))
    assert run_trainer("eval", "--model", mine / "student.pt", "--images", demo_images, "--workers", "0",
                       "--save", mine / "eval.json") == 0
    assert "is not the file its sidecar student.json was written for" in capsys.readouterr().err
    assert json.loads((mine / "eval.json").read_text())["sidecar"] == "differs"
    assert run_trainer("report", mine) == 0
    assert "CHANGED since the export" in capsys.readouterr().out


# ---- 11. a zero-shot head that says nothing is not stored ------------------------------------------
def test_11_a_zero_shot_head_with_constant_logits_is_left_out_not_stored(tmp_path, capsys):
    images = tmp_path / "images"
    write_demo_data(images, per_class=3, seed=3)
    folders = sorted(images.iterdir())
    for i, folder in enumerate(folders[:3]):                           # prompts cut to 16 characters: equal
        folder.rename(images / f"Seborrheic keratosis type {i}x")
    for folder in folders[3:]:
        shutil.rmtree(folder)
    store = tmp_path / "s.zarr"
    assert run_cli("build", "--images", images, "--out", store, "--teacher", "random:tiny", "--workers", "0",
                   "--folds", "2") == 0
    assert "the zero-shot head is left out: its logits are constant" in capsys.readouterr().err
    assert run_cli("verify", store) == 0
    with StoreReader.open(store) as s:
        assert s.heads() == ["probe"]
        assert not any(k.startswith("teachers/siglip/heads/zeroshot") for k in s.small_keys())
    assert run_cli("inspect", store) == 0
    assert "teachers/siglip/heads/zeroshot: the zero-shot head is left out" in capsys.readouterr().out


# ---- 12. no build changes a store while it is read -------------------------------------------------
@pytest.mark.slow(8)
def test_12_an_overwrite_waits_for_a_fit_that_streams_the_store(tmp_path, small_store, demo_images, capsys):
    store = copy(small_store, tmp_path / "s.zarr")
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "trainer", "fit", "--store", str(store), "--out", str(out), *FIT,
                             "--epochs", "30", "--ram-budget-gb", "0"], cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None and not (out / "metrics.jsonl").is_file():
            time.sleep(0.05)
        assert proc.poll() is None, "the fit ended before the overwrite was tried"
        for extra in (["--overwrite"], []):
            assert run_cli("build", "--images", demo_images, "--out", store, *SMALL, "--views", "2", *extra) == 2
            line = last_line(capsys.readouterr().err)
            assert f"{store} is being read by process {proc.pid} on {socket.gethostname()}" in line
        assert run_cli("verify", store, "--fix") == 2
    finally:
        proc.kill()
        proc.wait()
    with StoreReader.open(store) as s:
        assert s.views_per_image == 3
    assert run_cli("build", "--images", demo_images, "--out", store, *SMALL, "--views", "2", "--overwrite") == 0


def test_12_a_bucket_store_being_read_is_not_overwritten(s3, small_store, demo_images, capsys):
    url = f"{s3['bucket']}/read.zarr"
    s3["fs"].put(str(small_store), url[5:], recursive=True)
    with StoreReader.open(url, reader="trainer fit"):
        assert run_cli("build", "--images", demo_images, "--out", url, *SMALL, "--overwrite") == 2
        line = last_line(capsys.readouterr().err)
        assert f"{url} is being read by process {os.getpid()} on {socket.gethostname()} (trainer fit)" in line
    assert not s3["fs"].find(url[5:] + ".readers")                    # the reader's lease went with it
    assert run_cli("build", "--images", demo_images, "--out", url, *SMALL, "--views", "2", "--overwrite") == 0


# ---- 13. the demo teacher, whatever the cores --------------------------------------------------------
@pytest.mark.slow(20)
def test_13_the_demo_teacher_is_the_same_bits_on_one_busy_core_and_on_two(tmp_path):
    weights = []
    for name, pin, threads in (("one", ["taskset", "-c", "0"], "1"), ("two", [], "2")):
        if pin and shutil.which("taskset") is None:
            pin = []
        r = subprocess.run([*pin, sys.executable, "-m", "featurestore", "demo-teacher", str(tmp_path / name),
                            "--images", "60", "--steps", "6"], capture_output=True, text=True, cwd=REPO, timeout=300,
                           env={**os.environ, "OMP_NUM_THREADS": threads})
        assert r.returncode == 0, r.stderr
        weights.append((tmp_path / name / "model.safetensors").read_bytes())
    assert weights[0] == weights[1]


# ---- 14. leases: an expiry is capped, a damaged lease is named --------------------------------------
def test_14_a_lease_claiming_a_far_expiry_or_damaged_is_capped_and_named(s3, demo_images, capsys, monkeypatch):
    from featurestore.common import lock
    monkeypatch.setattr(lock, "LEASE_SECONDS", 2.0)
    for body, words in ((json.dumps({"pid": 4242, "host": "gpu-box-7", "token": "t", "expires": 1e12}),
                         "process 4242 on gpu-box-7 holds the lease"), ("not json", "is damaged")):
        url = f"{s3['bucket']}/lease-{len(body)}.zarr"
        s3["fs"].pipe_file(url[5:] + ".lock", body.encode())
        assert run_cli("build", "--images", demo_images, "--out", url, *SMALL) == 2
        line = last_line(capsys.readouterr().err)
        assert words in line and re.search(r"(expires in|wait) [0-2] s", line), line
        assert f"(for example `aws s3 rm s3://{url[5:]}.lock`)" in line
        time.sleep(2.5)                                 # the lease length passes: no longer believed
        assert run_cli("build", "--images", demo_images, "--out", url, *SMALL) == 0
        assert not s3["fs"].exists(url[5:] + ".lock")


# ---- one-line errors and validation -----------------------------------------------------------------
def test_received_run_files_that_are_damaged_or_tagged_are_one_line(tmp_path, run, small_store, demo_images, capsys):
    marker = tmp_path / "yaml-ran"
    tagged = shutil.copytree(run, tmp_path / "tagged")
    (tagged / "config.yaml").write_text(f"student: !!python/object/apply:os.mkdir [{str(marker)!r}]\n")
    assert run_trainer("export", "--run", tagged) == 2
    assert f"{tagged / 'config.yaml'}, line 1, column 10: could not determine a constructor" in \
        last_line(capsys.readouterr().err)
    assert not marker.exists()
    damaged = shutil.copytree(run, tmp_path / "damaged")
    (damaged / "summary.json").write_text("{broken")
    assert run_trainer("report", damaged) == 2
    assert f"{damaged / 'summary.json'}: damaged (not the JSON kdstore writes" in last_line(capsys.readouterr().err)
    (damaged / "student.json").write_text("[1, 2]")
    assert run_trainer("eval", "--model", damaged / "student.pt", "--images", demo_images, "--workers", "0") == 2
    line = last_line(capsys.readouterr().err)
    assert f"{damaged / 'student.json'}: damaged (a JSON list where kdstore writes a dict)" in line
    sweep = tmp_path / "sweep"
    (sweep / "runs" / "labels-s0").mkdir(parents=True)
    (sweep / ".kdstore-sweep").write_text("{}")
    (sweep / "runs" / "labels-s0" / "sweep_run.json").write_text("\x00\x01")
    assert run_trainer("sweep", "--store", small_store, "--out", sweep, *FIT, "--epochs", "1", "--recipes", "labels",
                       "--seeds", "1") == 2
    assert "sweep_run.json: damaged" in last_line(capsys.readouterr().err)


def test_a_file_name_that_is_not_utf8_is_stored_with_its_bytes_escaped(tmp_path, run, capsys):
    images = tmp_path / "images"
    write_demo_data(images, per_class=3, seed=4)
    first = sorted(images.iterdir())[0]
    src = next(first.glob("*.jpg"))
    os.rename(os.fsencode(src), os.fsencode(first) + b"/caf\xe9.jpg")
    store = tmp_path / "s.zarr"
    assert run_cli("build", "--images", images, "--out", store, *SMALL, "--folds", "2") == 0
    with StoreReader.open(store) as s:
        assert f"{first.name}/caf\\xe9.jpg" in s.ids() and s.num_images == 30
    assert run_trainer("eval", "--model", run / "student.pt", "--images", images, "--workers", "0", "--json") == 0
    assert json.loads(capsys.readouterr().out)["num_images"] == 30


@pytest.mark.parametrize("args, words", [
    (["--lr", "nan"], "optim.lr must be a finite number, got nan"),
    (["--image-size", "100000"], "image_size must be 32..1024, got 100000"),
    (["--loader-workers", "1000"], "loader_workers must be 0..64, got 1000"),
    (["--seed", "-1"], "seed must be >= 0, got -1"),
    (["--w-kd", "-1"], "loss.kd must be 0..1000, got -1.0"),
])
def test_fit_flags_are_range_checked(tmp_path, small_store, args, words, capsys):
    assert run_trainer("fit", "--store", small_store, "--out", tmp_path / "r", *FIT, *args) == 2
    assert words in last_line(capsys.readouterr().err)
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("yaml_text, words", [
    ("optim: [1, 2]\n", "optim must be a mapping of its settings, got [1, 2]"),
    ("optim:\n  epochs: true\n", "optim.epochs expects a number, got True"),
    ("loader_workers: -2\n", "loader_workers must be 0..64, got -2"),
])
def test_fit_yaml_values_are_checked_even_under_flags(tmp_path, small_store, yaml_text, words, capsys):
    config = tmp_path / "c.yaml"
    config.write_text(yaml_text)
    assert run_trainer("fit", "--config", config, "--store", small_store, "--out", tmp_path / "r", *FIT,
                       "--epochs", "1") == 2
    assert words in last_line(capsys.readouterr().err)


@pytest.mark.parametrize("command, args, words", [
    ("build", ["--image-size", "100000"], "store.image_size must be 8..2048, got 100000"),
    ("build", ["--workers", "1000"], "workers must be 0..64, got 1000"),
    ("build", ["--patch-grid", "20"], "--patch-grid 20 exceeds the 8 x 8 grid of patch tokens of random:tiny"),
    ("plan", ["--patch-grid", "20"], "--patch-grid 20 exceeds the 8 x 8 grid of patch tokens of random:tiny"),
    ("plan", ["--workers", "-2"], "workers must be 0..64, got -2"),
    ("build", ["--view-seed", "-3"], "views.seed must be >= 0, got -3"),
])
def test_build_and_plan_flags_are_range_checked(tmp_path, demo_images, command, args, words, capsys):
    out = ["--out", tmp_path / "s.zarr"] if command == "build" else []
    assert run_cli(command, "--images", demo_images, *out, *SMALL, *args) == 2
    assert words in last_line(capsys.readouterr().err)
    assert not (tmp_path / "s.zarr").exists()


def test_a_bucket_root_is_never_a_store(demo_images, capsys):
    assert run_cli("build", "--images", demo_images, "--out", "s3://bucket", *SMALL, "--overwrite") == 2
    assert "a store is a folder inside a bucket (such as s3://bucket/derm.zarr), never the bucket itself" in \
        last_line(capsys.readouterr().err)


def test_eval_workers_are_bounded(run, demo_images, capsys):
    with pytest.raises(SystemExit):
        run_trainer("eval", "--model", run / "student.pt", "--images", demo_images, "--workers", "1000")
    assert "argument --workers: must be 0..64, got 1000" in capsys.readouterr().err


# ---- the store digest -------------------------------------------------------------------------------
def test_the_digest_is_recorded_printed_and_changes_with_any_chunk(tmp_path, small_store, capsys):
    from featurestore.store.integrity import examine
    with StoreReader.open(small_store) as s:
        recorded, names = s.attrs["digest"], [f.name for f in s.fields()] + s.small_keys()
        assert examine(s).digest == recorded
    assert run_cli("inspect", small_store) == 0
    assert f"digest     {recorded}" in capsys.readouterr().out
    assert run_cli("verify", small_store, "--digest", recorded.upper()) == 0
    assert f"digest {recorded} (the published one)" in capsys.readouterr().out
    assert run_cli("verify", small_store, "--digest", "0" * 64) == 1
    assert f"the store's digest is {recorded}, not the published {'0' * 64}" in capsys.readouterr().err
    store = copy(small_store, tmp_path / "s.zarr")
    seen = {recorded}
    for name in names:                                 # one element of each array, rewritten with its checksum
        root = zarr.open_group(store, mode="r+")
        arr = root[name]
        index = (arr.shape[0] - 1,) + (0,) * (arr.ndim - 1)
        old = arr[index]
        arr[index] = "renamed" if arr.dtype.kind in "OTU" else (not old if arr.dtype == bool else old + 1)
        with StoreReader.open(store) as s:
            now = examine(s)
        assert now.digest is None or now.digest not in seen, name
        assert any(p.array == "digest" for p in now.problems) or now.problems, name
        seen.add(now.digest)
        arr[index] = old
    with StoreReader.open(store) as s:
        assert examine(s).digest == recorded                     # every change undone: the same digest again
    root = zarr.open_group(store, mode="r+")
    root.attrs["classes"] = list(reversed(root.attrs["classes"]))            # an edited attribute
    assert run_cli("verify", store) == 1
    assert "not the" in (err := capsys.readouterr().err) and "its build recorded: it was changed after the build" in err
