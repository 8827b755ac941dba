"""Remote reads: epochs of the trainer's reads (each chunk's images and one view of each teacher target,
in the plan's order, by the trainer's own reading threads: 2 from a disk, 4 in flight from a bucket) from
a store behind an S3 protocol server on the loopback (moto, in a process of its own, as a real server is),
against the same store on a local disk, measured in one run. The bucket is read two ways: as a run reads
it (the local read cache: the first epoch downloads each shard whole, later epochs read the disk's copy)
and with the cache off (every epoch reads byte ranges from the bucket). Each location is opened once, as
a run opens it (the time to open is reported); rounds alternate the three, each a new epoch (new views),
and later epochs' median is taken. Beside them, the server's own rate for whole objects of half a chunk.
"""
from __future__ import annotations

import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.common import build_store
from featurestore.demo import write_demo_data
from featurestore.pipeline.config import BuildConfig, StoreLayout, TeacherConfig, ViewPolicy
from featurestore.store.backends import CACHE_ENV
from trainer.data import StoreData
from trainer.plan import plan_epoch
from trainer.stream import ChunkStream

ROUNDS = 3


def _server() -> subprocess.Popen:
    """moto's S3 server in its own process on a free loopback port; the environment points clients at it."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    os.environ.update({"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "bench",
                       "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1"})
    deadline = time.time() + 60
    while time.time() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return server
        time.sleep(0.1)
    server.kill()
    raise RuntimeError("moto's server did not start")


def _server_rate(fs, chunk_bytes: int, count: int = 8) -> float:
    """MB/s the server gives a client reading whole objects of a chunk's size one after another."""
    data = np.random.default_rng(0).integers(0, 256, chunk_bytes, dtype=np.uint8).tobytes()
    for i in range(count):
        fs.pipe_file(f"bench/rate/{i}", data)
    t0 = time.perf_counter()
    for i in range(count):
        fs.cat_file(f"bench/rate/{i}")
    return count * chunk_bytes / 1e6 / (time.perf_counter() - t0)


def _open(path: str) -> tuple[StoreData, float]:
    t0 = time.perf_counter()
    data = StoreData(path, "probe", need_pooled=True, need_patches=True, ram_budget_gb=0)     # streaming
    return data, time.perf_counter() - t0


def _epoch_reads(data: StoreData, epoch: int, readers: int) -> tuple[float, int]:
    """Seconds to read every chunk an epoch uses (images and one view of each target), and the bytes."""
    plan = plan_epoch(np.arange(data.n), data.chunk_size, data.n, data.k, 0, epoch, 64, 8)
    stream = ChunkStream(lambda c: data.chunk(c, int(plan.chunk_view[c])), plan, data.chunk_size, 8, readers)
    t0, nbytes = time.perf_counter(), 0
    try:
        for c in plan.chunk_order(data.chunk_size):
            chunk = stream.get(c)
            nbytes += chunk.images.nbytes + sum(t.nbytes for t in chunk.targets.values())
            for _ in range(stream.uses[c]):
                stream.release(c)
    finally:
        stream.close()
    return time.perf_counter() - t0, nbytes


def run(profile: dict) -> dict:
    import s3fs
    server = _server()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            images = write_demo_data(Path(tmp) / "images", per_class=profile["remote_per_class"], seed=0,
                                     sizes=(300, 600))
            local = Path(tmp) / "s.zarr"
            build_store(BuildConfig(images=str(images), out=str(local), workers=profile["workers"],
                                    teacher=TeacherConfig(id="random:tiny"), views=ViewPolicy(views=8),
                                    store=StoreLayout(image_size=256, chunk_size=64, patch_grid=4)))
            s3fs.S3FileSystem.clear_instance_cache()
            fs = s3fs.S3FileSystem()
            fs.mkdir("bench")
            fs.put(str(local), "bench/s.zarr", recursive=True)
            cache = Path(tmp) / "cache"
            where = {"local": (str(local), str(cache), 2), "remote": ("s3://bench/s.zarr", str(cache), 4),
                     "uncached": ("s3://bench/s.zarr", "off", 4)}
            opened, rounds, nbytes = {}, {w: [] for w in where}, 0
            for w, (path, cached, _) in where.items():
                os.environ[CACHE_ENV] = cached                 # read when a store is opened
                opened[w] = _open(path)
            for epoch in range(ROUNDS):
                for w, (_, _, readers) in where.items():
                    seconds, nbytes = _epoch_reads(opened[w][0], epoch, readers)
                    rounds[w].append(seconds)
            data = opened["local"][0]
            n, chunks = data.n, data.num_chunks
            rate = _server_rate(fs, nbytes // (chunks * 2))
            for d, _ in opened.values():
                d.store.close()
    finally:
        server.kill()
        server.wait()
    later = {w: statistics.median(r[1:]) for w, r in rounds.items()}
    first = rounds["remote"][0]
    return {"images": n, "chunks": chunks, "epoch_bytes": nbytes, "rounds_s": rounds,
            "local_read_s": later["local"], "remote_read_s": later["remote"], "remote_first_epoch_s": first,
            "uncached_read_s": later["uncached"],
            "read_ratio_vs_local": later["local"] / later["remote"],
            "first_epoch_ratio_vs_local": later["local"] / first,
            "uncached_ratio_vs_local": later["local"] / later["uncached"],
            "local_mb_per_s": nbytes / 1e6 / later["local"], "remote_mb_per_s": nbytes / 1e6 / later["remote"],
            "first_epoch_mb_per_s": nbytes / 1e6 / first, "uncached_mb_per_s": nbytes / 1e6 / later["uncached"],
            "server_mb_per_s": rate, "open_local_s": opened["local"][1], "open_remote_s": opened["remote"][1]}


def rows(r: dict) -> list[list]:
    def epoch(seconds: float, mb: float) -> str:
        return f"{seconds:.2f} s ({mb:.0f} MB/s)"
    return [
        [f"remote: a later epoch of the trainer's reads of a store in S3 on the loopback (moto; {r['images']} "
         f"images in {r['chunks']} chunks, {r['epoch_bytes'] / 1e6:.0f} MB), as a run reads it (the read cache)",
         epoch(r["remote_read_s"], r["remote_mb_per_s"]), f"{r['read_ratio_vs_local']:.2f}x the local disk's speed"],
        ["remote: its first epoch (each shard downloaded whole once)",
         epoch(r["remote_first_epoch_s"], r["first_epoch_mb_per_s"]),
         f"{r['first_epoch_ratio_vs_local']:.2f}x the local disk's speed"],
        ["remote: an epoch with the read cache off (KDSTORE_CACHE=off: byte ranges from the bucket every epoch)",
         epoch(r["uncached_read_s"], r["uncached_mb_per_s"]),
         f"{r['uncached_ratio_vs_local']:.2f}x the local disk's speed"],
        ["remote: the same epoch from the local disk", epoch(r["local_read_s"], r["local_mb_per_s"]), "1x"],
        ["remote: the server's own rate, whole objects of half a chunk, one after another",
         f"{r['server_mb_per_s']:.0f} MB/s",
         f"the first epoch reads {r['first_epoch_mb_per_s'] / r['server_mb_per_s']:.2f}x of it"],
        ["remote: opening the store as the trainer does (S3 / local disk)",
         f"{r['open_remote_s']:.2f} s / {r['open_local_s']:.2f} s", f"{r['open_remote_s'] / r['open_local_s']:.1f}x"],
    ]
