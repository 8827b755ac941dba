"""Several processes, correct: `torchrun` builds and fits on the CPU (gloo). A build of N ranks equals a
one-process build bit for bit whatever the thread counts; one lock excludes every other build, of any
number of ranks; a fit stopped in one process resumes on N ranks, which train on every image once an
epoch, and rank 0 alone exports."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
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


@pytest.mark.slow(18)
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


@pytest.mark.slow(7)
def test_one_lock_excludes_a_one_process_and_a_two_rank_build(tmp_path, demo_images):
    out = tmp_path / "s.zarr"
    with build_lock_held(out) as pid:
        r = torchrun("featurestore", "build", "--images", demo_images, "--out", out, *ODD)
        assert r.returncode != 0
        assert f"another build is writing {out}: process {pid}" in r.stderr
        assert "rank 1: rank 0 stopped: another build is writing" in r.stderr or \
            "rank 1/2: rank 0 stopped: another build is writing" in r.stderr
        assert not out.exists()


@pytest.mark.slow(22)
def test_a_fit_stopped_in_one_process_resumes_on_two_ranks_over_every_image_exporting_from_rank_zero(
        tmp_path, small_store):
    """One process, stopped after its first epoch; resumed by two ranks, which cover every image once an
    epoch between them, and rank 0 alone reports and exports."""
    out = tmp_path / "run"
    args = [str(a) for a in ("--store", small_store, "--out", out, *FIT, "--epochs", "3")]
    proc = subprocess.Popen([sys.executable, "-m", "trainer", "fit", *args], cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and not (out / "metrics.jsonl").is_file():
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=60)
    done = len(images_seen(out))
    assert 1 <= done < 3, "the run finished before it could be stopped"
    r = torchrun("trainer", "fit", *args, "--resume")
    assert r.returncode == 0, r.stderr[-3000:]
    assert images_seen(out) == [70] * 3                                   # 50 labelled + 20 unlabelled, each once
    assert (out / "student.pt").is_file() and (out / "summary.json").is_file()
    assert r.stdout.count("teacher probe macro-F1 (held-out)") == 1        # one report, from rank 0


def test_accelerate_launch_with_cpu_says_it_would_run_one_process(tmp_path, demo_images):
    r = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "2",
                        "-m", "featurestore", "build", "--images", str(demo_images), "--out", str(tmp_path / "s.zarr"),
                        *ODD], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode != 0
    assert "`accelerate launch --cpu --num_processes N` started one process, not N" in r.stderr
    assert "torchrun --nproc_per_node N" in r.stderr and not (tmp_path / "s.zarr").exists()
