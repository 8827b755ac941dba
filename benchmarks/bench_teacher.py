"""Teacher pass: views/s of `featurestore build` (files -> finished store) with MedSigLIP-448's
architecture, against (a) the plain transformers loop and (b) the arithmetic bound.

(a) what a user would write: torchvision augmentation on PIL images, SiglipImageProcessor,
    SiglipModel in float32, one view of each image per call, `batch` images per call.
(b) FLOPs per view (counted by torch's FlopCounterMode) / dense matmul rate measured now.
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import build_store, matmul_tflops
from featurestore.config import BuildConfig, ProbeConfig, StoreLayout, TeacherConfig, ViewPolicy
from featurestore.demo import write_demo_data
from featurestore.devices import pick_device
from featurestore.teacher import flops_per_view, random_config


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
        stats = build_store(cfg)
        ours = {"views": stats["views"], "pass_s": stats["pass_s"], "total_s": stats["total_s"],
                "load_s": stats["load_s"], "heads_s": stats["heads_s"], "views_per_s": stats["views"] / stats["pass_s"],
                "views_per_s_end_to_end": stats["views"] / (stats["total_s"] - stats["load_s"])}
        plain = plain_loop(paths, profile["plain_views"], profile["plain_batch"], arch, device)
    flops = flops_per_view(random_config(arch).vision_config)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    tflops = matmul_tflops(device, dtype, n=8192 if device.type == "cuda" else 2048)
    bound = tflops * 1e12 / flops
    return {"arch": arch, "device": str(device), "images": stats["views"] // views, "views_per_image": views,
            "ours": ours, "plain": plain, "flops_per_view": flops, "matmul_tflops": tflops,
            "matmul_dtype": str(dtype), "bound_views_per_s": bound,
            "mfu_pass": ours["views_per_s"] / bound, "mfu_end_to_end": ours["views_per_s_end_to_end"] / bound,
            "speedup_vs_plain": ours["views_per_s"] / plain["views_per_s"],
            "speedup_vs_plain_end_to_end": ours["views_per_s_end_to_end"] / plain["views_per_s"]}


def rows(r: dict) -> list[list]:
    return [
        ["teacher: featurestore build, teacher pass", f"{r['ours']['views_per_s']:.3f} views/s",
         f"{r['speedup_vs_plain']:.2f}x plain, {100 * r['mfu_pass']:.0f}% of bound"],
        ["teacher: featurestore build, files to finished store (no model load)",
         f"{r['ours']['views_per_s_end_to_end']:.3f} views/s",
         f"{r['speedup_vs_plain_end_to_end']:.2f}x plain, {100 * r['mfu_end_to_end']:.0f}% of bound"],
        ["teacher: plain transformers loop (processor + fp32, 1 view/call)", f"{r['plain']['views_per_s']:.3f} views/s",
         "1.00x"],
        [f"teacher: arithmetic bound ({r['flops_per_view'] / 1e12:.3f} TFLOP/view at {r['matmul_tflops']:.2f} "
         f"TFLOP/s {r['matmul_dtype'].replace('torch.', '')} matmul)", f"{r['bound_views_per_s']:.3f} views/s",
         "bound"],
    ]
