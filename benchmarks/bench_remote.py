"""Remote reads: one epoch of the trainer's reads (each chunk's images and one view of each teacher
target, in the plan's order, by the trainer's own reading threads: 2 from a disk, 8 in flight from a
bucket) from a store behind an S3 protocol server on the loopback (moto), against the same store on a
local disk, measured in one run; and the time to open the store as the trainer does (its small arrays
included). Rounds alternate local and remote; each round is a new epoch (new views), its median taken.
"""
from __future__ import annotations

import logging
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.common import build_store
from featurestore.config import BuildConfig, StoreLayout, TeacherConfig, ViewPolicy
from featurestore.demo import write_demo_data
from trainer.data import StoreData
from trainer.plan import plan_epoch
from trainer.stream import ChunkStream

ROUNDS = 3


def _server():
    from moto.server import ThreadedMotoServer
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    os.environ.update({"AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "bench",
                       "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1"})
    return server


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
            remote = "s3://bench/s.zarr"
            rounds = {"local": [], "remote": []}
            opens = {"local": [], "remote": []}
            nbytes = 0
            for epoch in range(ROUNDS):
                for where, path, readers in (("local", str(local), 2), ("remote", remote, 8)):
                    data, opened = _open(path)
                    seconds, nbytes = _epoch_reads(data, epoch, readers)
                    rounds[where].append(seconds)
                    opens[where].append(opened)
                    data.store.close()
            n, chunks = data.n, data.num_chunks
    finally:
        server.stop()
    local_s, remote_s = statistics.median(rounds["local"]), statistics.median(rounds["remote"])
    return {"images": n, "chunks": chunks, "epoch_bytes": nbytes, "local_read_s": local_s, "remote_read_s": remote_s,
            "rounds_s": rounds, "read_ratio_vs_local": local_s / remote_s,
            "local_mb_per_s": nbytes / 1e6 / local_s, "remote_mb_per_s": nbytes / 1e6 / remote_s,
            "open_local_s": statistics.median(opens["local"]), "open_remote_s": statistics.median(opens["remote"])}


def rows(r: dict) -> list[list]:
    return [
        [f"remote: one epoch of the trainer's reads from S3 on the loopback (moto; {r['images']} images in "
         f"{r['chunks']} chunks, {r['epoch_bytes'] / 1e6:.0f} MB)", f"{r['remote_read_s']:.2f} s "
         f"({r['remote_mb_per_s']:.0f} MB/s)", f"{r['read_ratio_vs_local']:.2f}x the local disk's speed"],
        ["remote: the same epoch from the local disk", f"{r['local_read_s']:.2f} s ({r['local_mb_per_s']:.0f} MB/s)",
         "1x"],
        ["remote: opening the store as the trainer does (S3 / local disk)",
         f"{r['open_remote_s']:.2f} s / {r['open_local_s']:.2f} s", f"{r['open_remote_s'] / r['open_local_s']:.1f}x"],
    ]
