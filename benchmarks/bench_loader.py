"""Loader: samples/s delivering rendered 224 px training views with teacher targets, against
torchvision ImageFolder + RandomResizedCrop + RandomHorizontalFlip + ColorJitter over the same JPEG
files, and against the memory-bandwidth bound (copy rate / bytes moved per sample).
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torchvision import datasets, transforms

from benchmarks.common import copy_gbps
from featurestore.build import build
from featurestore.config import BuildConfig, StoreLayout, TeacherConfig, ViewPolicy
from featurestore.demo import write_demo_data
from trainer.loader import IMAGENET_MEAN, IMAGENET_STD, Loader, StoreData


def _rate(make_iter, epochs: int) -> dict:
    rates = []
    for e in range(epochs + 1):                     # epoch 0 is the warm-up
        t0, n = time.perf_counter(), 0
        for batch in make_iter(e):
            n += len(batch[1]) if isinstance(batch, (list, tuple)) else len(batch.labels)
        if e:
            rates.append(n / (time.perf_counter() - t0))
    return {"samples_per_s": float(np.median(rates)), "epochs": rates}


def run(profile: dict) -> dict:
    n_per_class, workers, batch, size = profile["loader_per_class"], profile["workers"], 64, 224
    with tempfile.TemporaryDirectory() as tmp:
        images = write_demo_data(Path(tmp) / "images", per_class=n_per_class, seed=0, sizes=(450, 1000))
        store = Path(tmp) / "s.zarr"
        build(BuildConfig(images=str(images), out=str(store), workers=workers,
                          teacher=TeacherConfig(id="random:tiny"), views=ViewPolicy(views=8, mix_prob=0.2),
                          store=StoreLayout(image_size=256, chunk_size=64, patch_grid=4)))
        data = StoreData(str(store), "probe", need_pooled=True, need_patches=True)
        idx = np.arange(data.n)
        loader = Loader(data, idx, batch, size, seed=0, device=torch.device("cpu"), train=True)
        ours = _rate(loader.epoch, profile["loader_epochs"])

        tf = transforms.Compose([transforms.RandomResizedCrop(size, scale=(0.35, 1.0)), transforms.RandomHorizontalFlip(),
                                 transforms.ColorJitter(0.2, 0.2, 0.2, 0.02), transforms.ToTensor(),
                                 transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
        folder = torch.utils.data.DataLoader(datasets.ImageFolder(str(images), transform=tf), batch_size=batch,
                                             shuffle=True, num_workers=workers, persistent_workers=workers > 0,
                                             drop_last=True)
        plain = _rate(lambda e: folder, profile["loader_epochs"])
    gbps = copy_gbps()
    s = data.store.attrs["image_size"]
    # per sample: read the stored image, write the float32 view, gather targets
    moved = s * s * 3 + 3 * size * size * 4 + 4 * (data.logits.shape[-1] + data.pooled.shape[-1])
    bound = gbps * 1e9 / moved
    return {"images": int(data.n), "batch": batch, "size": size, "workers_plain": workers,
            "ours_render_threads": 2, "ours": ours, "plain": plain, "copy_gbps": gbps,
            "bytes_moved_per_sample": moved, "bound_samples_per_s": bound,
            "speedup_vs_plain": ours["samples_per_s"] / plain["samples_per_s"],
            "fraction_of_bound": ours["samples_per_s"] / bound}


def rows(r: dict) -> list[list]:
    return [
        ["loader: trainer Loader (store, 224 px views + targets, 2 render threads)",
         f"{r['ours']['samples_per_s']:.0f} samples/s",
         f"{r['speedup_vs_plain']:.1f}x ImageFolder, {100 * r['fraction_of_bound']:.1f}% of bound"],
        [f"loader: ImageFolder JPEG + RandomResizedCrop/Flip/ColorJitter ({r['workers_plain']} workers)",
         f"{r['plain']['samples_per_s']:.0f} samples/s", "1.0x"],
        [f"loader: memory-bandwidth bound ({r['copy_gbps']:.1f} GB/s copy, {r['bytes_moved_per_sample'] / 1e3:.0f} kB/sample)",
         f"{r['bound_samples_per_s']:.0f} samples/s", "bound"],
    ]
