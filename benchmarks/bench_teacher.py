"""Teacher pass: views/s of `featurestore build` (files -> finished store) with MedSigLIP-448's
architecture, against (a) the plain transformers loop, (b) a careful plain loop, (c) the model alone
and (d) the arithmetic bound.

(a) what a user would write first: torchvision augmentation on PIL images, SiglipImageProcessor,
    SiglipModel in float32, one view of each image per call, `batch` images per call.
(b) what a careful user writes: the same crops, flips and colour jitter on the GPU (torchvision v2 on
    tensors decoded once per image), the tower in the compute dtype with SDPA, batch 64.
(c) model only: the same tower, dtype and batch on synthetic input in a tight loop, eager and compiled;
    the attention kernels that ran are read from the profiler.
(d) FLOPs per view (counted by torch's FlopCounterMode) / dense matmul rate measured now.
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import build_store, matmul_tflops
from featurestore.common.devices import pick_device
from featurestore.demo import write_demo_data
from featurestore.pipeline.config import BuildConfig, ProbeConfig, StoreLayout, TeacherConfig, ViewPolicy
from featurestore.teachers import SiglipTeacher, attention_kernels, flops_per_view, load_teacher, random_config


def plain_loop(paths: list[Path], views: int, batch: int, arch: str, device: torch.device) -> dict:
    """The plain way: PIL augment -> processor -> fp32 model, one view per image per call."""
    from PIL import Image
    from torchvision import transforms
    from transformers import SiglipImageProcessor, SiglipVisionModel
    cfg = random_config(arch).vision_config
    model = SiglipVisionModel(cfg).to(device).eval()
    size = cfg.image_size
    proc = SiglipImageProcessor(size={"height": size, "width": size}, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    aug = transforms.Compose([transforms.RandomResizedCrop(size, scale=(0.35, 1.0)), transforms.RandomHorizontalFlip(),
                              transforms.ColorJitter(0.2, 0.2, 0.2, 0.02)])
    outputs = []

    def one_pass():
        for k in range(views):
            for s in range(0, len(paths), batch):
                imgs = [Image.open(p).convert("RGB") for p in paths[s:s + batch]]
                if k:
                    imgs = [aug(im) for im in imgs]
                pix = proc(images=imgs, return_tensors="pt")["pixel_values"].to(device)
                with torch.no_grad():
                    outputs.append(model(pixel_values=pix).pooler_output.cpu().numpy())
        if device.type == "cuda":
            torch.cuda.synchronize()
    model(pixel_values=torch.zeros(1, 3, size, size, device=device))     # warm-up
    t0 = time.perf_counter()
    one_pass()
    seconds = time.perf_counter() - t0
    return {"views": views * len(paths), "seconds": seconds, "views_per_s": views * len(paths) / seconds}


def model_only(vision, batch: int, size: int, dtype: torch.dtype, device: torch.device, compiled: bool,
               iters: int) -> dict:
    """views/s of the tower alone on one synthetic batch, in a tight loop (after its warm-up, which
    holds the compile when compiled)."""
    fn = torch.compile(vision, dynamic=False) if compiled else vision
    x = torch.rand(batch, 3, size, size, device=device).to(dtype)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()
    with torch.inference_mode(), attention_kernels(device):
        t0 = time.perf_counter()
        for _ in range(2):
            fn(pixel_values=x)
        sync()
        warm = time.perf_counter() - t0
        t0 = time.perf_counter()
        for _ in range(iters):
            fn(pixel_values=x)
        sync()
        seconds = time.perf_counter() - t0
    return {"batch": batch, "iters": iters, "compiled": compiled, "warmup_s": warm,
            "views_per_s": batch * iters / seconds}


def attention_kernel_names(vision, size: int, dtype: torch.dtype, device: torch.device) -> list[str]:
    """Names of the GPU kernels whose name says attention, in one eager forward (the profiler's view)."""
    if device.type != "cuda":
        return []
    from torch.profiler import ProfilerActivity, profile
    x = torch.rand(2, 3, size, size, device=device).to(dtype)
    with torch.inference_mode(), attention_kernels(device), profile(activities=[ProfilerActivity.CUDA]) as prof:
        vision(pixel_values=x)
        torch.cuda.synchronize()
    names = {e.key for e in prof.key_averages()}
    return sorted(n for n in names if any(w in n.lower() for w in ("flash", "fmha", "attention", "efficient")))


def careful_loop(paths: list[Path], views: int, batch: int, vision, size: int, dtype: torch.dtype,
                 device: torch.device) -> dict:
    """A careful user's loop: each image decoded once, its views cut on the GPU by torchvision v2
    (RandomResizedCrop, flip, ColorJitter), normalised, the tower in `dtype` with SDPA, pooled output
    copied back per batch."""
    from torchvision.io import decode_image
    from torchvision.transforms import v2
    aug = v2.Compose([v2.RandomResizedCrop(size, scale=(0.35, 1.0), antialias=True), v2.RandomHorizontalFlip(),
                      v2.ColorJitter(0.2, 0.2, 0.2, 0.02)])
    outputs, queue = [], []

    def run_batch():
        x = torch.stack(queue).sub_(0.5).div_(0.5).to(dtype)
        with torch.inference_mode(), attention_kernels(device):
            outputs.append(vision(pixel_values=x).pooler_output.cpu())
        queue.clear()
    t0 = time.perf_counter()
    for p in paths:
        img = decode_image(str(p), mode=torchvision_rgb()).to(device, non_blocking=True).float().div_(255)
        for _ in range(views):
            queue.append(aug(img))
            if len(queue) == batch:
                run_batch()
    if queue:
        run_batch()
    seconds = time.perf_counter() - t0
    return {"views": views * len(paths), "batch": batch, "seconds": seconds,
            "views_per_s": views * len(paths) / seconds}


def torchvision_rgb():
    from torchvision.io import ImageReadMode
    return ImageReadMode.RGB


def run(profile: dict) -> dict:
    arch, n_images, views = profile["teacher_arch"], profile["teacher_images"], profile["teacher_views"]
    device = pick_device("auto")
    with tempfile.TemporaryDirectory() as tmp:
        images = write_demo_data(Path(tmp) / "images", per_class=max(1, n_images // 10), seed=0, sizes=(450, 1000))
        paths = sorted(p for p in images.rglob("*") if p.is_file())[:profile["plain_images"]]
        cfg = BuildConfig(images=str(images), out=str(Path(tmp) / "s.zarr"), workers=profile["workers"],
                          teacher=TeacherConfig(id=f"random:{arch}", batch_size=profile["teacher_batch"]),
                          views=ViewPolicy(views=views, mix_prob=0.2),
                          store=StoreLayout(image_size=256, chunk_size=16, patch_grid=8),
                          probe=ProbeConfig(max_rows=profile.get("probe_rows", 50_000)))
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        teacher = load_teacher(f"random:{arch}", device=str(device), dtype=str(dtype).replace("torch.", ""))
        size, batch = teacher.pre.size, profile["teacher_batch"]
        compiled = device.type == "cuda" and profile.get("teacher_compile", True)
        models = {"eager": model_only(teacher.vision, batch, size, dtype, device, False, profile["model_iters"])}
        if compiled:          # the same compile the build makes; the build reads it back from the cache
            models["compiled"] = model_only(teacher.vision, batch, size, dtype, device, True, profile["model_iters"])
        kernels = attention_kernel_names(teacher.vision, size, dtype, device)
        careful = careful_loop(paths, profile["plain_views"], 64, teacher.vision, size, dtype, device)
        del teacher
        stats = build_store(cfg)
        end_to_end_s = stats["total_s"] - stats["load_s"] - stats.get("compile_s", 0.0)
        ours = {"views": stats["views"], "pass_s": stats["pass_s"], "total_s": stats["total_s"],
                "load_s": stats["load_s"], "compile_s": stats.get("compile_s", 0.0), "heads_s": stats["heads_s"],
                "stages": stats.get("stages", {}), "batch": stats.get("batch"), "compiled": stats.get("compiled"),
                "views_per_s": stats["views"] / stats["pass_s"],
                "views_per_s_end_to_end": stats["views"] / end_to_end_s,
                "views_per_s_end_to_end_with_compile": stats["views"] / (stats["total_s"] - stats["load_s"])}
        plain = plain_loop(paths, profile["plain_views"], profile["plain_batch"], arch, device)
    flops = flops_per_view(SiglipTeacher, random_config(arch))
    tflops = matmul_tflops(device, dtype, n=8192 if device.type == "cuda" else 2048)
    bound = tflops * 1e12 / flops
    best = max(m["views_per_s"] for m in models.values())
    return {"arch": arch, "device": str(device), "images": stats["views"] // views, "views_per_image": views,
            "ours": ours, "plain": plain, "careful": careful, "model_only": models, "attention_kernels": kernels,
            "flops_per_view": flops, "matmul_tflops": tflops,
            "matmul_dtype": str(dtype), "bound_views_per_s": bound,
            "model_only_views_per_s": best, "mfu_model_only": best / bound,
            "pipeline_efficiency": ours["views_per_s"] / best,
            "end_to_end_vs_model_only": ours["views_per_s_end_to_end"] / best,
            "mfu_pass": ours["views_per_s"] / bound, "mfu_end_to_end": ours["views_per_s_end_to_end"] / bound,
            "speedup_vs_plain": ours["views_per_s"] / plain["views_per_s"],
            "speedup_vs_careful": ours["views_per_s"] / careful["views_per_s"],
            "speedup_vs_plain_end_to_end": ours["views_per_s_end_to_end"] / plain["views_per_s"]}


def rows(r: dict) -> list[list]:
    out = [
        ["teacher: featurestore build, teacher pass", f"{r['ours']['views_per_s']:.3f} views/s",
         f"{r['pipeline_efficiency']:.2f}x model only, {r['speedup_vs_careful']:.2f}x careful, "
         f"{r['speedup_vs_plain']:.2f}x plain, {100 * r['mfu_pass']:.0f}% of bound"],
        ["teacher: featurestore build, files to finished store (no model load or compile)",
         f"{r['ours']['views_per_s_end_to_end']:.3f} views/s",
         f"{r['end_to_end_vs_model_only']:.2f}x model only, {r['speedup_vs_plain_end_to_end']:.2f}x plain, "
         f"{100 * r['mfu_end_to_end']:.0f}% of bound"],
    ]
    out += [[f"teacher: model only, {name} (batch {m['batch']}, synthetic input)", f"{m['views_per_s']:.3f} views/s",
             f"{100 * m['views_per_s'] / r['bound_views_per_s']:.0f}% of bound"] for name, m in r["model_only"].items()]
    return out + [
        [f"teacher: careful plain loop (crops on the device, compute dtype, SDPA, batch {r['careful']['batch']})",
         f"{r['careful']['views_per_s']:.3f} views/s", f"{r['careful']['views_per_s'] / r['plain']['views_per_s']:.2f}x"
         " plain"],
        ["teacher: plain transformers loop (processor + fp32, 1 view/call)", f"{r['plain']['views_per_s']:.3f} views/s",
         "1.00x"],
        [f"teacher: arithmetic bound ({r['flops_per_view'] / 1e12:.3f} TFLOP/view at {r['matmul_tflops']:.2f} "
         f"TFLOP/s {r['matmul_dtype'].replace('torch.', '')} matmul)", f"{r['bound_views_per_s']:.3f} views/s",
         "bound"],
    ]
