"""Stores in a bucket, against a real S3 protocol server on the loopback (moto): a fresh path is built
without --overwrite, a killed build resumes, and the store is verified, trained from and slimmed into; one
lease lets one build write a store; HDF5 stores and run folders at a URL are refused in one line."""
from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, SMALL, run_cli, run_module
from test_build import assert_same_store

from featurestore.store.reader import StoreReader
from trainer import cli as tcli

FIT = ["--student", "shufflenet_v2_x0_5", "--image-size", "32", "--batch-size", "16", "--cpu", "--epochs", "1"]


def last_line(err: str) -> str:
    assert "Traceback" not in err and "Exception ignored" not in err, err
    return err.strip().splitlines()[-1]


def done_chunks(s3, url: str) -> int:
    key = url[len("s3://"):] + "/progress/done/c"
    return len(s3["fs"].ls(key, refresh=True)) if s3["fs"].exists(key) else 0


@pytest.mark.slow(30)
def test_a_fresh_bucket_path_killed_resumes_and_is_verified_trained_from_and_slimmed_into(
        s3, demo_images, unlabeled_images, small_store, tmp_path, capsys):
    """A fresh bucket path, no --overwrite. While one build writes it, a second is refused naming the
    holder of the lease; the first, killed, leaves its lease behind, and the same command run at once
    resumes it to the bits the same build makes on a disk. The store opens from one metadata document,
    trains a student, is slimmed into another bucket path (verified), and a second build does nothing."""
    url = f"{s3['bucket']}/fresh.zarr"
    args = [str(a) for a in ("--images", demo_images, "--unlabeled", unlabeled_images, "--out", url, *SMALL)]
    proc = subprocess.Popen([sys.executable, "-m", "featurestore", "build", *args], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and done_chunks(s3, url) < 1:
        time.sleep(0.1)
    assert run_cli("build", *args) == 2
    line = last_line(capsys.readouterr().err)
    assert f"another build is writing {url}: process {proc.pid} on {socket.gethostname()} holds the lease" in line
    while time.time() < deadline and proc.poll() is None and done_chunks(s3, url) < 2:
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the build finished before it could be killed"
    assert s3["fs"].exists(url[5:] + ".lock")                     # the dead build's lease is still there
    assert 2 <= done_chunks(s3, url) < 10                          # of 10 chunks
    assert run_cli("build", *args) == 0                            # at once
    assert_same_store(small_store, url)                           # the same bits as the same build on a disk
    root = json.loads(s3["fs"].cat_file(url[5:] + "/zarr.json"))
    assert "teachers/siglip/pooled" in root["consolidated_metadata"]["metadata"]   # opening reads one document
    assert not s3["fs"].exists(url[5:] + ".lock")                 # the lease is gone with the build
    run = tmp_path / "run"
    assert tcli.main([str(a) for a in ("fit", "--store", url, "--out", run, *FIT, "--ram-budget-gb", "0")]) == 0
    assert (run / "student.pt").is_file()
    slim = f"{s3['bucket']}/slim.zarr"
    assert run_cli("slim", url, slim, "--fields", "images,views/params,teachers/siglip/logits/probe") == 0  # verified
    with StoreReader.open(slim) as s:
        assert "teachers/siglip/pooled" in s.attrs["dropped"] and s.complete
    capsys.readouterr()
    assert run_cli("build", *args) == 0
    assert "is already complete; nothing to do" in capsys.readouterr().err


def test_an_unreachable_endpoint_is_one_line(tmp_path, demo_images):
    r = run_module("featurestore", "build", "--images", demo_images, "--out", "s3://nowhere/x.zarr", *SMALL,
                   env={"AWS_ENDPOINT_URL": "http://127.0.0.1:9", "AWS_ACCESS_KEY_ID": "x",
                        "AWS_SECRET_ACCESS_KEY": "x", "AWS_MAX_ATTEMPTS": "1"}, cwd=tmp_path)
    assert r.returncode == 2
    line = last_line(r.stderr)
    assert line.startswith("featurestore build: error: object storage: Could not connect to the endpoint URL")
    assert "AWS_ENDPOINT_URL" in line and "--storage-options" in line
    assert r.stderr.strip().count("\n") == 0 and not list(tmp_path.iterdir())      # no folder named "s3:"


def test_an_expired_lease_is_taken_over_and_a_live_one_is_refused(s3, demo_images, capsys):
    url = f"{s3['bucket']}/leased.zarr"
    lease = url[5:] + ".lock"

    def holder(expires: float) -> None:
        s3["fs"].pipe_file(lease, json.dumps({"pid": 4242, "host": "gpu-box-7", "token": "t",
                                              "expires": expires}).encode())
    holder(time.time() + 600)
    assert run_cli("build", "--images", demo_images, "--out", url, *SMALL) == 2
    assert "process 4242 on gpu-box-7 holds the lease" in last_line(capsys.readouterr().err)
    holder(time.time() - 1)
    assert run_cli("build", "--images", demo_images, "--out", url, *SMALL) == 0
    assert not s3["fs"].exists(lease)


def test_hdf5_stores_and_run_folders_at_a_url_are_refused(s3, demo_images, small_store, tmp_path, monkeypatch,
                                                         capsys):
    monkeypatch.chdir(tmp_path)
    assert run_cli("build", "--images", demo_images, "--out", f"{s3['bucket']}/x.h5", *SMALL) == 2
    assert "an HDF5 store is one file on a local disk" in last_line(capsys.readouterr().err)
    assert tcli.main([str(a) for a in ("fit", "--store", small_store, "--out", f"{s3['bucket']}/run", *FIT)]) == 2
    assert "a run directory lives on a local disk" in last_line(capsys.readouterr().err)
    assert not list(Path(tmp_path).iterdir())                     # nothing written to a local folder "s3:"


def test_a_bucket_store_is_read_from_the_local_cache_once_fetched_and_a_damaged_copy_is_not_trusted(
        s3, small_store, tmp_path, monkeypatch):
    url = f"{s3['bucket']}/cached.zarr"
    s3["fs"].put(str(small_store), url[5:], recursive=True)
    cache = tmp_path / "cache"
    monkeypatch.setenv("KDSTORE_CACHE", str(cache))
    with StoreReader.open(small_store) as s:
        want = {c: (s.read_chunk("images", c), s.read_view("teachers/siglip/logits/probe", c, 1))
                for c in range(s.num_chunks)}
    with StoreReader.open(url) as s:
        for c, (images, logits) in want.items():
            np.testing.assert_array_equal(s.read_chunk("images", c), images)
            np.testing.assert_array_equal(s.read_view("teachers/siglip/logits/probe", c, 1), logits)
    shards = [p for p in cache.rglob("*") if p.is_file() and "images" in p.parts]
    assert shards                                                 # the image shards are now on the disk
    objects = {k: s3["fs"].cat_file(k) for k in s3["fs"].find(url[5:] + "/images/c")}
    for k in objects:                                             # the bucket's copy damaged: still read right,
        s3["fs"].pipe_file(k, b"\1" * s3["fs"].size(k))            # from the disk
    with StoreReader.open(url) as s:
        for c, (images, _) in want.items():
            np.testing.assert_array_equal(s.read_chunk("images", c), images)
    for k, data in objects.items():
        s3["fs"].pipe_file(k, data)
    for p in shards:                                              # a damaged copy on the disk: read from the bucket
        p.write_bytes(b"\0" * p.stat().st_size)
    with StoreReader.open(url) as s:
        for c, (images, _) in want.items():
            np.testing.assert_array_equal(s.read_chunk("images", c), images)
    monkeypatch.setenv("KDSTORE_CACHE", "off")
    shutil.rmtree(cache)
    with StoreReader.open(url) as s:
        s.read_chunk("images", 0)
    assert not cache.exists()
