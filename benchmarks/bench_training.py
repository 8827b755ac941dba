"""Training: student samples/s training from the store, against online distillation (the teacher
forward on every batch), same student, same batch size, same device, measured in one run.
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import build_store
from featurestore.config import BuildConfig, StoreLayout, TeacherConfig, ViewPolicy
from featurestore.demo import write_demo_data
from featurestore.devices import pick_device
from featurestore.teacher import load_teacher
from trainer.data import StoreData
from trainer.loader import Loader, LoaderConfig
from trainer.losses import LossWeights, total_loss
from trainer.students import create_student


def _step_fn(student, optimizer):
    w = LossWeights(pooled=0.0)

    def step(x, targets, teacher_logits):
        logits = student(x)
        loss, _ = total_loss(w, logits, targets, torch.ones(len(x), dtype=torch.bool, device=x.device), teacher_logits)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def run(profile: dict) -> dict:
    device = pick_device("auto")
    batch, steps = profile["train_batch"], profile["train_steps"]
    with tempfile.TemporaryDirectory() as tmp:
        images = write_demo_data(Path(tmp) / "images", per_class=max(2, batch * (steps + 2) // 10 + 1), seed=0,
                                 sizes=(450, 1000))
        store = Path(tmp) / "s.zarr"
        build_store(BuildConfig(images=str(images), out=str(store), workers=profile["workers"],
                                teacher=TeacherConfig(id="random:tiny"), views=ViewPolicy(views=4),
                                store=StoreLayout(image_size=256, chunk_size=64)))
        data = StoreData(str(store), "probe", need_pooled=False, need_patches=False)
        loader = Loader(data, np.arange(data.n), 0, device,
                        LoaderConfig(batch, 224, threads=2 if device.type != "cpu" else 0))
        student = create_student(profile["student"], len(data.classes)).to(device).train()
        step = _step_fn(student, torch.optim.AdamW(student.parameters(), lr=1e-3))
        it = loader.epoch(0)
        b = next(it)
        step(b.pixels, b.targets, b.logits)                                   # warm-up
        t0, n = time.perf_counter(), 0
        for _, b in zip(range(steps), it):
            step(b.pixels, b.targets, b.logits)
            n += len(b.labels)
            b.release()
        if device.type == "cuda":
            torch.cuda.synchronize()
        store_rate = n / (time.perf_counter() - t0)

        # online: render at the teacher's size, run the teacher, then the same student step
        teacher = load_teacher(f"random:{profile['teacher_arch']}", device="auto")
        probe = torch.randn(len(data.classes), teacher.info.embed_dim, device=device) * 0.01
        online_steps = profile["online_steps"]
        it = loader.epoch(1)
        t_teacher = t_total = 0.0
        for _, b in zip(range(online_steps), it):
            t0 = time.perf_counter()
            idx = torch.from_numpy(data.params[b.index.numpy(), b.view.numpy()])
            srcs = torch.from_numpy(data.rows(np.sort(b.index.numpy()))).permute(0, 3, 1, 2).to(device)
            order = np.argsort(np.argsort(b.index.numpy()))                      # rows come back sorted
            srcs = srcs[torch.from_numpy(order)]
            pix = teacher.render(srcs, torch.arange(len(idx)), idx, torch.full((len(idx),), -1))
            pooled, _ = teacher.encode(pix)
            t_logits = torch.nn.functional.normalize(pooled, dim=-1) @ probe.T
            if device.type == "cuda":
                torch.cuda.synchronize()
            t_teacher += time.perf_counter() - t0
            step(b.pixels, b.targets, t_logits)
            if device.type == "cuda":
                torch.cuda.synchronize()
            t_total += time.perf_counter() - t0
        online_rate = online_steps * batch / t_total
    return {"student": profile["student"], "batch": batch, "device": str(device),
            "teacher_arch": profile["teacher_arch"],
            "store_samples_per_s": store_rate, "online_samples_per_s": online_rate,
            "online_teacher_share": t_teacher / t_total, "online_steps": online_steps,
            "speedup": store_rate / online_rate}


def rows(r: dict) -> list[list]:
    return [
        [f"training: {r['student']} from the store (batch {r['batch']})", f"{r['store_samples_per_s']:.1f} samples/s",
         f"{r['speedup']:.0f}x online"],
        [f"training: {r['student']} with online {r['teacher_arch']} teacher (batch {r['batch']}, "
         f"{100 * r['online_teacher_share']:.0f}% of time in the teacher)",
         f"{r['online_samples_per_s']:.3f} samples/s", "1x"],
    ]
