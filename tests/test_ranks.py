"""Several processes, correct: `torchrun` builds and fits on the CPU (gloo). A build of N ranks equals a
one-process build bit for bit whatever the thread counts; one lock excludes every other build, of any
number of ranks; a fit of N ranks trains on every image once an epoch, exports from rank 0 alone, and
resumes with another number of processes."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from conftest import REPO, SMALL, build_lock_held, run_cli
from test_build import assert_same_store

ODD = [*SMALL, "--chunk-size", "7"]                  # 60 images in 9 chunks: no even split between 2 ranks
FIT = ["--student", "shufflenet_v2_x0_5", "--image-size", "32", "--batch-size", "8", "--cpu"]


def torchrun(*args, wait: bool = True, **kw):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
           *map(str, args)]
    if not wait:
        return subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300, **kw)


def images_seen(run: Path) -> list[int]:
    return [json.loads(line)["images_seen"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_a_two_rank_build_equals_a_one_process_build_whatever_the_threads(tmp_path, demo_images):
    one, two = tmp_path / "one.zarr", tmp_path / "two.zarr"
    threads = torch.get_num_threads()
    torch.set_num_threads(2)                          # torchrun gives each of its ranks one
    try:
        assert run_cli("build", "--images", demo_images, "--out", one, *ODD) == 0
    finally:
        torch.set_num_threads(threads)
    r = torchrun("featurestore", "build", "--images", demo_images, "--out", two, *ODD)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "rank 0/2: teacher pass over 5 chunk(s)" in r.stderr and "rank 1/2: teacher pass over 4 chunk(s)" in r.stderr
    assert_same_store(one, two)


def test_one_lock_excludes_a_one_process_and_a_two_rank_build(tmp_path, demo_images):
    out = tmp_path / "s.zarr"
    with build_lock_held(out) as pid:
        r = torchrun("featurestore", "build", "--images", demo_images, "--out", out, *ODD)
        assert r.returncode != 0
        assert f"another build is writing {out}: process {pid}" in r.stderr
        assert "rank 1: rank 0 stopped: another build is writing" in r.stderr or \
            "rank 1/2: rank 0 stopped: another build is writing" in r.stderr
        assert not out.exists()


def test_a_two_rank_fit_trains_on_every_image_and_exports_from_rank_zero(tmp_path, small_store):
    two = tmp_path / "two"
    args = ["--store", small_store, *FIT, "--epochs", "2"]
    r = torchrun("trainer", "fit", "--out", two, *args)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (two / "student.pt").is_file() and (two / "summary.json").is_file()
    assert images_seen(two) == [70, 70]                                  # 50 labelled + 20 unlabelled, each once
    assert r.stdout.count("teacher probe macro-F1 (held-out)") == 1        # one report, from rank 0


def test_a_two_rank_run_resumes_with_one_process(tmp_path, small_store):
    out = tmp_path / "run"
    args = ["--store", small_store, "--out", out, *FIT, "--epochs", "3"]
    proc = torchrun("trainer", "fit", *args, wait=False)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and not (out / "metrics.jsonl").is_file():
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)                  # torchrun hands it to its ranks
    proc.communicate(timeout=60)
    done = len(images_seen(out))
    assert 1 <= done < 3, "the run finished before it could be stopped"
    from trainer.cli import main
    assert main([str(a) for a in (*("fit",), *args, "--resume")]) == 0
    assert images_seen(out) == [70] * 3 and (out / "student.pt").is_file()


def test_accelerate_launch_with_cpu_says_it_would_run_one_process(tmp_path, demo_images):
    r = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "2",
                        "-m", "featurestore", "build", "--images", str(demo_images), "--out", str(tmp_path / "s.zarr"),
                        *ODD], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode != 0
    assert "`accelerate launch --cpu --num_processes N` started one process, not N" in r.stderr
    assert "torchrun --nproc_per_node N" in r.stderr and not (tmp_path / "s.zarr").exists()
