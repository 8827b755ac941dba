"""Loader: samples/s delivering rendered 224 px training views with teacher targets, streamed from
the store (chunks read on background threads, one view per chunk, the next epoch's first window read
while the last one renders; views rendered in as many worker processes as the baseline has), against
torchvision ImageFolder
+ RandomResizedCrop + RandomHorizontalFlip + ColorJitter over the same JPEG files, and against the
memory-bandwidth bound (copy rate / bytes moved per sample). Ours and the baseline alternate, three
rounds of `loader_epochs` back-to-back epochs each, every round starting cold; the ratio is taken per
round and its median reported.
"""
from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torchvision import datasets, transforms

from benchmarks.common import build_store, copy_gbps
from featurestore.demo import write_demo_data
from featurestore.pipeline.config import BuildConfig, StoreLayout, TeacherConfig, ViewPolicy
from trainer.data import StoreData
from trainer.loader import Loader, LoaderConfig
from trainer.students import IMAGENET_MEAN, IMAGENET_STD

ROUNDS = 3


def _rate(make_iter, first: int, epochs: int) -> float:
    """Samples/s over `epochs` back-to-back epochs, as training runs them. make_iter(epoch, last)."""
    t0, n = time.perf_counter(), 0
    for e in range(first, first + epochs):
        for batch in make_iter(e, e == first + epochs - 1):
            if isinstance(batch, (list, tuple)):
                n += len(batch[1])
            else:
                n += len(batch.labels)
                batch.release()                           # as the training loop does: its buffer is reused
    return n / (time.perf_counter() - t0)


def run(profile: dict) -> dict:
    n_per_class, workers, batch, size = profile["loader_per_class"], profile["workers"], 64, 224
    with tempfile.TemporaryDirectory() as tmp:
        images = write_demo_data(Path(tmp) / "images", per_class=n_per_class, seed=0, sizes=(450, 1000))
        store = Path(tmp) / "s.zarr"
        build_store(BuildConfig(images=str(images), out=str(store), workers=workers,
                                teacher=TeacherConfig(id="random:tiny"), views=ViewPolicy(views=8, mix_prob=0.2),
                                store=StoreLayout(image_size=256, chunk_size=64, patch_grid=4)))
        data = StoreData(str(store), "probe", need_pooled=True, need_patches=True, ram_budget_gb=0)   # streaming
        loader = Loader(data, np.arange(data.n), 0, torch.device("cpu"), LoaderConfig(batch, size, workers=workers))
        ram_data = StoreData(str(store), "probe", need_pooled=True, need_patches=True, ram_budget_gb=100)
        ram_loader = Loader(ram_data, np.arange(data.n), 0, torch.device("cpu"),
                            LoaderConfig(batch, size, workers=workers))
        tf = transforms.Compose([transforms.RandomResizedCrop(size, scale=(0.35, 1.0)),
                                 transforms.RandomHorizontalFlip(),
                                 transforms.ColorJitter(0.2, 0.2, 0.2, 0.02), transforms.ToTensor(),
                                 transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
        folder = torch.utils.data.DataLoader(datasets.ImageFolder(str(images), transform=tf), batch_size=batch,
                                             shuffle=True, num_workers=workers, persistent_workers=workers > 0,
                                             drop_last=True)
        # each round starts cold: the last epoch of a round reads nothing ahead for the next round
        stream = lambda ld: lambda e, last: ld.epoch(e, ahead=not last)     # noqa: E731
        epochs = profile["loader_epochs"]
        _rate(stream(loader), 0, 1), _rate(lambda e, last: folder, 0, 1)   # warm-up (workers, caches)
        ours, in_ram, plain = [], [], []
        for r in range(ROUNDS):
            ours.append(_rate(stream(loader), 1 + r * epochs, epochs))
            in_ram.append(_rate(stream(ram_loader), 1 + r * epochs, epochs))
            plain.append(_rate(lambda e, last: folder, 1 + r * epochs, epochs))
        loader.close(), ram_loader.close()
    gbps = copy_gbps()
    s = data.store.attrs["image_size"]
    # per sample: read the stored image, write the float32 view, gather targets
    moved = s * s * 3 + 3 * size * size * 4 + 4 * sum(int(np.prod(v)) for v in data.shapes.values())
    bound = gbps * 1e9 / moved
    ratios = [o / p for o, p in zip(ours, plain)]
    return {"images": int(data.n), "batch": batch, "size": size, "workers_plain": workers, "streaming": True,
            "epochs_per_round": epochs,
            "ours_render_threads": loader.cfg.threads, "ours_render_workers": loader.workers,
            "ours_samples_per_s": ours, "plain_samples_per_s": plain,
            "in_ram_samples_per_s": in_ram, "chunks": int(data.num_chunks),
            "ratios": ratios, "speedup_vs_plain": statistics.median(ratios), "copy_gbps": gbps,
            "bytes_moved_per_sample": moved, "bound_samples_per_s": bound,
            "fraction_of_bound": statistics.median(ours) / bound}


def _median(r: dict, key: str) -> float:
    return statistics.median(r[f"{key}_samples_per_s"])


def rows(r: dict) -> list[list]:
    return [
        [f"loader: trainer Loader streaming from the store ({r['images']} images in {r.get('chunks', '?')} chunks, "
         f"224 px views + targets, " + (f"{r['ours_render_workers']} render processes)" if r.get("ours_render_workers")
                                       else f"{r['ours_render_threads']} render threads)"),
         f"{statistics.median(r['ours_samples_per_s']):.0f} samples/s (median of {len(r['ratios'])})",
         f"{r['speedup_vs_plain']:.1f}x ImageFolder (median of per-round ratios "
         f"{', '.join(f'{x:.1f}' for x in r['ratios'])}), {100 * r['fraction_of_bound']:.1f}% of bound"],
        ["loader: trainer Loader with the store in RAM (same batches)",
         f"{statistics.median(r['in_ram_samples_per_s']):.0f} samples/s",
         f"{_median(r, 'in_ram') / _median(r, 'plain'):.1f}x ImageFolder; "
         f"streaming is {_median(r, 'ours') / _median(r, 'in_ram'):.2f}x of it"],
        [f"loader: ImageFolder JPEG + RandomResizedCrop/Flip/ColorJitter ({r['workers_plain']} workers)",
         f"{statistics.median(r['plain_samples_per_s']):.0f} samples/s", "1.0x"],
        [f"loader: memory-bandwidth bound ({r['copy_gbps']:.1f} GB/s copy, "
         f"{r['bytes_moved_per_sample'] / 1e3:.0f} kB/sample)",
         f"{r['bound_samples_per_s']:.0f} samples/s", "bound"],
    ]
