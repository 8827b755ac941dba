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
from featurestore import views
from featurestore.common.devices import caps_of, mixed_precision, pick_device
from featurestore.demo import write_demo_data
from featurestore.pipeline.config import BuildConfig, StoreLayout, TeacherConfig, ViewPolicy
from featurestore.teachers import load_teacher
from featurestore.views import COL
from featurestore.views.batch_render import render_batch
from trainer.data import StoreData
from trainer.loader import Loader, LoaderConfig
from trainer.students import IMAGENET_MEAN, IMAGENET_STD, create_student
from trainer.terms import LossWeights, total_loss


def _step_fn(student, optimizer, device: torch.device, precision: str, channels_last: bool):
    """The trainer's step: channels_last input, autocast in the device's reduced precision (a grad
    scaler for float16), KD on the stored logits and CE; nothing read back from the device."""
    w = LossWeights(pooled=0.0)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")

    def step(x, targets, teacher_logits):
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            logits = student(x)
            loss, _ = total_loss(w, logits, targets, torch.ones(len(x), dtype=torch.bool, device=x.device),
                                 teacher_logits)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
    return step


def _student(name: str, classes: int, device: torch.device, channels_last: bool, mode: str | None):
    """The student, and what the step calls: itself, or compiled (mode: default, or reduce-overhead for
    CUDA graphs)."""
    student = create_student(name, classes).to(device).train()
    if channels_last:
        student = student.to(memory_format=torch.channels_last)
    return student, (torch.compile(student, mode=mode) if mode else student)


def _optimizer(student, device: torch.device):
    """AdamW as the trainer makes it: one fused kernel per step on CUDA."""
    return torch.optim.AdamW(student.parameters(), lr=1e-3, **({"fused": True} if device.type == "cuda" else {}))


def _profile(device: torch.device, fn) -> dict:
    """Where a few steps spend their time: host and device totals, the top device kernels."""
    if device.type != "cuda":
        return {}
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    events = prof.key_averages()
    device_total = sum(e.self_device_time_total for e in events) / 1e3
    top = sorted(events, key=lambda e: e.self_device_time_total, reverse=True)[:8]
    return {"device_ms": device_total, "wall_cpu_ms": sum(e.self_cpu_time_total for e in events) / 1e3,
            "kernel_launches": int(sum(e.count for e in events if e.key.startswith(("cudaLaunchKernel",
                                                                                    "cuLaunchKernel")))),
            "top_device_ms": {e.key[:90]: round(e.self_device_time_total / 1e3, 3) for e in top}}


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _rate(device, fn, batches: int, batch: int) -> float:
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return batches * batch / (time.perf_counter() - t0)


def run(profile: dict) -> dict:
    device = pick_device("auto")
    batch, steps = profile["train_batch"], profile["train_steps"]
    precision = mixed_precision("auto", caps_of(device))
    cl = device.type == "cuda"
    compile_too = device.type == "cuda" and profile.get("train_compile", True)
    with tempfile.TemporaryDirectory() as tmp:
        per_class = max(2, batch * profile.get("train_batches_per_epoch", steps + 2) // 10 + 1)
        images = write_demo_data(Path(tmp) / "images", per_class=per_class, seed=0, sizes=(450, 1000))
        store = Path(tmp) / "s.zarr"
        build_store(BuildConfig(images=str(images), out=str(store), workers=profile["workers"],
                                teacher=TeacherConfig(id="random:tiny"), views=ViewPolicy(views=4),
                                store=StoreLayout(image_size=256, chunk_size=64)))
        data = StoreData(str(store), "probe", need_pooled=False, need_patches=False)
        loader = Loader(data, np.arange(data.n), 0, device,
                        LoaderConfig(batch, 224, threads=2 if device.type != "cpu" else 0))
        classes = len(data.classes)

        def batches(n: int):
            """n training batches, epoch after epoch."""
            epoch = 0
            while n > 0:
                it = loader.epoch(epoch)
                try:
                    for b in it:
                        if n == 0:
                            break
                        yield b
                        n -= 1
                finally:
                    it.close()
                epoch += 1
        first = next(batches(1))                                           # warms the loader's threads
        x0, t0, l0 = first.pixels.clone(), first.targets.clone(), first.logits.clone()
        first.release()

        def loader_only():
            for b in batches(steps):
                b.release()
        loader_rate = _rate(device, loader_only, steps, batch)
        # do more render threads feed the GPU faster (they share the GIL)?
        by_threads = _loader_by_threads(data, device, batch, steps, (1, 4, 8)) if device.type == "cuda" else {}
        render_routes = _render_routes(data, device, batch, min(steps, 10))

        variants, peak, profiles = {}, {}, {}
        # (name, compile mode, autocast precision, channels_last): the trainer's default first
        modes = [("eager", None, precision, cl)]
        if device.type == "cuda":
            modes += [("eager, float32, contiguous", None, "no", False), ("compiled", "default", precision, cl),
                      ("compiled, CUDA graphs", "reduce-overhead", precision, cl)][: 3 if compile_too else 1]
        for name, mode, prec, last in modes:
            student, model = _student(profile["student"], classes, device, last, mode)
            step = _step_fn(model, _optimizer(student, device), device, prec, last)
            for _ in range(3):
                step(x0, t0, l0)                                            # warm-up (and the compile)

            def step_only(step=step):
                for _ in range(steps):
                    step(x0, t0, l0)
            step_rate = _rate(device, step_only, steps, batch)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)

            def full(step=step):
                for b in batches(steps):
                    step(b.pixels, b.targets, b.logits)
                    b.release()
            variants[name] = {"step_only_samples_per_s": step_rate,
                              "store_samples_per_s": _rate(device, full, steps, batch)}
            if device.type == "cuda":
                peak[name] = torch.cuda.max_memory_allocated(device) / 2 ** 20
            profiles[name] = _profile(device, lambda step=step: [step(x0, t0, l0) for _ in range(5)])
        loader.close()
        best = max(variants, key=lambda k: variants[k]["store_samples_per_s"])
        store_rate = variants[best]["store_samples_per_s"]

        online_steps = profile["online_steps"]
        online = {}
        if online_steps:   # render at the teacher's size, run the teacher, then the same student step
            online = _online(profile, data, device, batch, online_steps, precision, cl)
    out = {"student": profile["student"], "batch": batch, "device": str(device), "precision": precision,
           "channels_last": cl, "teacher_arch": profile["teacher_arch"], "steps": steps,
           "store_samples_per_s": store_rate, "best": best, "variants": variants,
           "loader_only_samples_per_s": loader_rate, "loader_only_by_render_threads": by_threads,
           "render_views_per_s": render_routes, "peak_gpu_mb": peak.get(best), "peak_gpu_mb_by_variant": peak,
           "step_profiles": profiles}
    if online:
        out |= online | {"speedup": store_rate / online["online_samples_per_s"]}
    return out


def _render_routes(data, device: torch.device, batch: int, reps: int) -> dict[str, float]:
    """Views/s of rendering one batch (224 px, the student's normalisation) from one chunk's images on
    the device: each view's geometry on its own, and the whole batch's geometry as batched matrix products."""
    chunk = torch.from_numpy(data.rows(np.arange(min(data.chunk_size, data.n)))).to(device).permute(0, 3, 1, 2)
    index = torch.arange(batch) % len(chunk)
    params = torch.from_numpy(data.params[index.numpy(), (torch.arange(batch) % data.k).numpy()])
    partner = params[:, COL["mix_partner"]].long() % len(chunk)          # partners among the chunk's images
    out = torch.empty(batch, 3, 224, 224, device=device)
    rates = {}
    for name, batched_geometry in (("per_view_geometry", False), ("batched_geometry", True)):
        def render(batched_geometry=batched_geometry):
            for _ in range(reps):
                if batched_geometry:
                    render_batch(chunk, index, params, 224, partner, IMAGENET_MEAN, IMAGENET_STD, out=out)
                else:
                    views.render(chunk, index, params, 224, "bilinear", partner, IMAGENET_MEAN, IMAGENET_STD,
                                 batched=device.type != "cpu", out=out)
        render()                                                            # warm-up
        rates[name] = _rate(device, render, reps, batch)
    return rates


def _loader_by_threads(data, device: torch.device, batch: int, steps: int, counts) -> dict[int, float]:
    """samples/s of the loader alone over (at most `steps` batches of) one epoch, by render threads."""
    out = {}
    for threads in counts:
        loader = Loader(data, np.arange(data.n), 0, device, LoaderConfig(batch, 224, threads=threads))
        n = min(steps, len(loader))
        next(loader.epoch(0)).release()                                      # starts its threads

        def drain(loader=loader, n=n):
            it = loader.epoch(0)
            for _, b in zip(range(n), it):
                b.release()
            it.close()
        out[threads] = _rate(device, drain, n, batch)
        loader.close()
    return out


def _online(profile: dict, data, device, batch: int, online_steps: int, precision: str, cl: bool) -> dict:
    teacher = load_teacher(f"random:{profile['teacher_arch']}", device="auto")
    probe = torch.randn(len(data.classes), teacher.info.embed_dim, device=device) * 0.01
    student, _ = _student(profile["student"], len(data.classes), device, cl, None)
    step = _step_fn(student, _optimizer(student, device), device, precision, cl)
    loader = Loader(data, np.arange(data.n), 0, device, LoaderConfig(batch, 224, threads=2 if cl else 0))
    t_teacher = t_total = 0.0
    for _, b in zip(range(online_steps), loader.epoch(1)):
        t0 = time.perf_counter()
        idx = torch.from_numpy(data.params[b.index.numpy(), b.view.numpy()])
        srcs = torch.from_numpy(data.rows(np.sort(b.index.numpy()))).permute(0, 3, 1, 2).to(device)
        order = np.argsort(np.argsort(b.index.numpy()))                      # rows come back sorted
        srcs = srcs[torch.from_numpy(order)]
        pix = teacher.render(srcs, torch.arange(len(idx)), idx, torch.full((len(idx),), -1))
        pooled, _ = teacher.encode(pix)
        t_logits = torch.nn.functional.normalize(pooled.float(), dim=-1) @ probe.T
        _sync(device)
        t_teacher += time.perf_counter() - t0
        step(b.pixels, b.targets, t_logits)
        _sync(device)
        t_total += time.perf_counter() - t0
    loader.close()
    return {"online_samples_per_s": online_steps * batch / t_total, "online_teacher_share": t_teacher / t_total,
            "online_steps": online_steps}


def rows(r: dict) -> list[list]:
    peak = f", peak {r['peak_gpu_mb']:.0f} MB on the GPU" if r.get("peak_gpu_mb") else ""
    best = r.get("best", "eager")
    if best.startswith(("eager", "compiled")) and "float32" not in best:
        best += f", {r.get('precision', 'no')} mixed precision"
    out = [[f"training: {r['student']} from the store (batch {r['batch']}, {best}{peak})",
            f"{r['store_samples_per_s']:.1f} samples/s", f"{r['speedup']:.0f}x online" if "speedup" in r else "-"]]
    for name, v in r.get("variants", {}).items():
        out.append([f"training: {name}: the step alone (one batch again and again) / fed by the loader",
                    f"{v['step_only_samples_per_s']:.1f} / {v['store_samples_per_s']:.1f} samples/s",
                    "the step's bound / as trained"])
    if "loader_only_samples_per_s" in r:
        out.append(["training: the loader alone (batches rendered, no step)",
                    f"{r['loader_only_samples_per_s']:.1f} samples/s", "bound of the loader"])
    for route, rate in r.get("render_views_per_s", {}).items():
        out.append([f"training: rendering one batch from device-resident images, {route.replace('_', ' ')}",
                    f"{rate:.1f} views/s", "-"])
    for threads, rate in r.get("loader_only_by_render_threads", {}).items():
        out.append([f"training: the loader alone, {threads} render thread(s), one epoch", f"{rate:.1f} samples/s",
                    "-"])
    if "online_samples_per_s" in r:
        out.append([f"training: {r['student']} with online {r['teacher_arch']} teacher (batch {r['batch']}, "
                    f"{100 * r['online_teacher_share']:.0f}% of time in the teacher)",
                    f"{r['online_samples_per_s']:.3f} samples/s", "1x"])
    return out
