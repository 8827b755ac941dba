"""`featurestore demo-teacher`: a small vision tower that knows the demo classes (SigLIP, or DINOv2).

Trained on the CPU for a fixed number of seeded steps (so the same weights on a free machine and on
a busy one) on a synthetic corpus drawn from the demo generator with its own seed (disjoint from
`demo-data`'s images), with the store's own view augmentation, as a classifier whose linear head is
then dropped: what remains is a SiglipVisionModel (or a Dinov2Model, with a CLS token, ImageNet
mean and std) whose pooled embedding separates the classes, saved with save_pretrained plus a
preprocessor config, exactly as a hub checkpoint is laid out, so `featurestore build --teacher <dir>`
loads it like any other: two families to compare, or to distil from at once.
"""
from __future__ import annotations

import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from featurestore import views
from featurestore.common.children import end_with, mp_context
from featurestore.demo import REFERENCE_CLASSES, make_image
from featurestore.pipeline.config import ViewPolicy

SIZE, PATCH = 64, 8                   # 8 x 8 patch tokens
TOWER = dict(hidden_size=96, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4)
THREADS = 2                           # fixed: the same sums, so the same weights, on any machine
FAMILIES = ("siglip", "dinov2")
IMAGENET = ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])


def _corpus_part(args) -> np.ndarray:
    seed, start, stop = args
    out = np.empty((stop - start, 2 * SIZE, 2 * SIZE, 3), np.uint8)
    for j, i in enumerate(range(start, stop)):
        rng = np.random.default_rng([seed, i])
        img = make_image(i % len(REFERENCE_CLASSES), rng)
        out[j] = np.asarray(img.resize((2 * SIZE, 2 * SIZE)))          # squashed, as a store holds images
    return out


def corpus(n: int, seed: int, workers: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """n synthetic demo images (balanced classes) at 2x the teacher's input side, and their labels."""
    parts = [(seed, a, min(a + 250, n)) for a in range(0, n, 250)]
    with ProcessPoolExecutor(workers, mp_context=mp_context(), initializer=end_with, initargs=(os.getpid(),)) as ex:
        images = np.concatenate(list(ex.map(_corpus_part, parts)))
    return images, np.arange(n) % len(REFERENCE_CLASSES)


def train_demo_teacher(out: str | Path, images: int = 3000, steps: int = 300, seed: int = 1000,
                       family: str = "siglip") -> str:
    """Train and save the demo teacher on THREADS threads, whatever the machine's cores: a sum split over
    another number of threads rounds differently, and the same seed must give the same weights on a
    2-core laptop, on a busy core (`taskset -c 0`) and on a 64-core box."""
    if family not in FAMILIES:
        from featurestore.common.options import ConfigError
        raise ConfigError(f"demo teachers are of the families {', '.join(FAMILIES)}, not {family!r}")
    threads = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    try:
        return _train(out, images, steps, seed, family)
    finally:
        torch.set_num_threads(threads)


def _model(family: str):
    """The untrained tower, its preprocessor (to save beside it) and its input mean and std."""
    if family == "dinov2":
        from transformers import BitImageProcessor, Dinov2Config, Dinov2Model
        config = Dinov2Config(hidden_size=TOWER["hidden_size"], num_hidden_layers=TOWER["num_hidden_layers"],
                              num_attention_heads=TOWER["num_attention_heads"],
                              mlp_ratio=TOWER["intermediate_size"] // TOWER["hidden_size"], image_size=SIZE,
                              patch_size=PATCH)
        pre = BitImageProcessor(size={"shortest_edge": SIZE}, crop_size={"height": SIZE, "width": SIZE},
                                do_center_crop=True, resample=3, image_mean=IMAGENET[0], image_std=IMAGENET[1])
        return Dinov2Model(config), pre, IMAGENET
    from transformers import SiglipImageProcessor, SiglipVisionConfig, SiglipVisionModel
    pre = SiglipImageProcessor(size={"height": SIZE, "width": SIZE}, resample=3, image_mean=[0.5] * 3,
                               image_std=[0.5] * 3)
    return SiglipVisionModel(SiglipVisionConfig(**TOWER, image_size=SIZE, patch_size=PATCH)), pre, ([0.5] * 3,) * 2


def _train(out: str | Path, images: int, steps: int, seed: int, family: str) -> str:
    t_start = time.perf_counter()
    torch.manual_seed(seed)
    x, y = corpus(images, seed)
    xv, yv = corpus(min(500, images), seed + 1)
    model, pre, (mean, std) = _model(family)
    config = model.config
    head = torch.nn.Linear(config.hidden_size, len(REFERENCE_CLASSES))
    params = list(model.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=2e-3, weight_decay=0.05)
    policy = ViewPolicy(views=2, seed=seed, mix_prob=0.0)
    sources = torch.from_numpy(x).permute(0, 3, 1, 2)                              # (n, 3, 2S, 2S) uint8
    batch = 64
    bar = tqdm(total=steps, desc="training the demo teacher", unit="step", disable=None, file=sys.stderr)
    model.train()
    for step in range(steps):
        idx = torch.from_numpy(np.random.default_rng([seed, step]).integers(0, len(x), batch))
        p = torch.from_numpy(np.stack([views.sample_view(policy, int(i), 1 + step % 1000, np.zeros(0)) for i in idx]))
        pix = views.render(sources, idx, p, SIZE, "bicubic", None, mean, std)
        lr = 2e-3 * min(1.0, (step + 1) / 50) * max(0.05, 1 - step / steps)
        for g in opt.param_groups:
            g["lr"] = lr
        loss = F.cross_entropy(head(model(pixel_values=pix).pooler_output), torch.from_numpy(y[idx.numpy()]))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        bar.update()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    model.eval()
    with torch.no_grad():
        canon = torch.from_numpy(views.canonical_params())[None].expand(len(xv), -1)
        pix = views.render(torch.from_numpy(xv).permute(0, 3, 1, 2), torch.arange(len(xv)), canon, SIZE, "bicubic",
                           None, mean, std)
        acc = float((head(model(pixel_values=pix).pooler_output).argmax(-1).numpy() == yv).mean())
    out = Path(out)
    model.save_pretrained(out)
    pre.save_pretrained(out)
    record = {"family": family, "steps": steps, "images": images, "seed": seed, "fresh_accuracy": acc,
              "seconds": time.perf_counter() - t_start}
    (out / "demo_teacher.json").write_text(json.dumps(record))
    return (f"saved the {family} demo teacher to {out}: {steps} steps in {time.perf_counter() - t_start:.0f}s, "
            f"accuracy of its training head on {len(xv)} fresh images {acc:.3f}")
