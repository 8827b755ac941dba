"""`trainer fit`: students from the store, with KD and feature losses; checkpoints and resume.

Resume: the checkpoint of each epoch holds model, optimiser, schedule, EMA, RNG state and the
metric history; data order is a function of (seed, epoch), so resuming equals never stopping.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import yaml
from torch import nn
from tqdm import tqdm

from featurestore.config import ConfigError, to_dict
from trainer import metrics as metrics_mod
from trainer.config import FitConfig
from trainer.loader import IMAGENET_MEAN, IMAGENET_STD, Loader, StoreData
from trainer.losses import PatchProjector, PooledProjector, total_loss
from trainer.students import create_student, size_mb



class DistillModel(nn.Module):
    """Student plus training-only projection heads; forward returns everything the losses need."""

    def __init__(self, student: nn.Module, pooled: PooledProjector | None, patches: PatchProjector | None):
        super().__init__()
        self.student, self.pooled_proj, self.patch_proj = student, pooled, patches

    def forward(self, x: torch.Tensor):
        fmap = self.student.forward_features(x)                         # (B, F, h, w)
        v = self.student.pool(fmap)                                     # (B, F')
        logits = self.student.head(v)                                   # (B, C)
        p = self.pooled_proj(v) if self.pooled_proj is not None else None
        q = self.patch_proj(fmap) if self.patch_proj is not None else None
        return logits, p, q


def build_model(cfg: FitConfig, data: StoreData) -> DistillModel:
    torch.manual_seed(cfg.seed)
    student = create_student(cfg.student, len(data.classes), cfg.pretrained)
    student.eval()
    with torch.no_grad():
        fmap = student.forward_features(torch.zeros(2, 3, cfg.image_size, cfg.image_size))
        pooled_dim = student.pool(fmap).shape[-1]
    pooled = PooledProjector(pooled_dim, data.pooled.shape[-1]) if data.pooled is not None else None
    patches = None
    if data.patches is not None:
        patches = PatchProjector(fmap.shape[1], data.patches.shape[-1], data.patches.shape[2])
    return DistillModel(student, pooled, patches)


def lr_lambda(warmup_steps: int, total_steps: int):
    """Linear warm-up to 1, then cosine decay to 0 (per optimiser step)."""
    def f(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return f


def _param_groups(model: nn.Module, weight_decay: float):
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _save_atomic(obj, path: Path) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _write_text_atomic(text: str, path: Path) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def fit(cfg: FitConfig, resume: bool = False, progress: bool = True) -> Path:
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    cfg.validate()
    out = Path(cfg.out)
    ckpt_path = out / "checkpoints" / "last.pt"
    if out.exists() and any(out.iterdir()) and not resume:
        raise ConfigError(f"run directory {out} is not empty; pass --resume to continue it, or pick a new --out")
    if resume and not ckpt_path.is_file():
        raise ConfigError(f"nothing to resume in {out} (no {ckpt_path})")
    (out / "checkpoints").mkdir(parents=True, exist_ok=True)

    accelerator = Accelerator(cpu=cfg.cpu, mixed_precision=cfg.mixed_precision)
    set_seed(cfg.seed)
    w = cfg.loss
    data = StoreData(cfg.store, cfg.head if (w.kd or w.dist) else None, w.pooled > 0, w.patches > 0,
                     cfg.ram_budget_gb)
    train_idx = np.arange(data.n) if cfg.train_on_all else np.flatnonzero(data.split >= 0)
    val_idx = np.zeros(0, np.int64) if cfg.train_on_all else np.flatnonzero(data.split < 0)
    device = accelerator.device
    loader = Loader(data, train_idx, cfg.optim.batch_size, cfg.image_size, cfg.seed, device, train=True,
                    buffer_chunks=cfg.buffer_chunks, rank=accelerator.process_index, world=accelerator.num_processes)
    if len(loader) == 0:
        raise ConfigError(f"{len(train_idx)} training images make no full batch of {cfg.optim.batch_size}")
    val_loader = Loader(data, val_idx, 128, cfg.image_size, cfg.seed, device, train=False)

    model = build_model(cfg, data)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(_param_groups(model, cfg.optim.weight_decay), lr=cfg.optim.lr)
    steps = len(loader) * cfg.optim.epochs
    warmup = int(round(cfg.optim.warmup_epochs * len(loader)))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(max(warmup, 1), steps))
    ema = None
    if cfg.optim.ema:
        from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
        ema = AveragedModel(model.student, device=accelerator.device, multi_avg_fn=get_ema_multi_avg_fn(cfg.optim.ema),
                            use_buffers=True)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    train_model = torch.compile(model) if cfg.compile else model

    history, best, start = [], -1.0, 0
    if resume:
        state = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        saved = state["config"]
        if saved != cfg.identity():
            diffs = [k for k in saved if saved[k] != cfg.identity().get(k)]
            raise ConfigError(f"{out} was trained with different settings ({', '.join(diffs)}); resume with the same ones")
        accelerator.unwrap_model(model).load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if ema is not None:
            ema.load_state_dict(state["ema"])
        torch.set_rng_state(state["rng"])
        history, best, start = state["history"], state["best"], state["epoch"] + 1
        _log(accelerator, f"resuming {out} at epoch {start + 1}/{cfg.optim.epochs}")
    else:
        (out / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg) | {"store_attrs": _store_summary(data)},
                                                        sort_keys=False))

    for epoch in range(start, cfg.optim.epochs):
        t0 = time.perf_counter()
        model.train()
        sums: dict[str, float] = {}
        seen = 0
        bar = tqdm(loader.epoch(epoch), total=len(loader), desc=f"epoch {epoch + 1}/{cfg.optim.epochs}",
                   unit="batch", disable=None if progress and accelerator.is_main_process else True,
                   file=sys.stderr, leave=False)
        for batch in bar:
            x = batch.pixels.contiguous(memory_format=torch.channels_last) if cfg.channels_last else batch.pixels
            with accelerator.autocast():
                logits, p, q = train_model(x)
                loss, parts = total_loss(w, logits, batch.targets, batch.logits, p, batch.pooled, q, batch.patches)
            accelerator.backward(loss)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            if ema is not None:
                ema.update_parameters(accelerator.unwrap_model(model).student)
            n = len(batch.labels)
            seen += n
            for k, v in parts.items():
                sums[k] = sums.get(k, 0.0) + v * n
            sums["loss"] = sums.get("loss", 0.0) + float(loss.detach()) * n
            bar.set_postfix(loss=f"{float(loss.detach()):.3f}", samples_s=f"{seen / (time.perf_counter() - t0):.0f}")
        elapsed = time.perf_counter() - t0
        row = {"epoch": epoch + 1, "lr": scheduler.get_last_lr()[0]} | {f"train_{k}": v / seen for k, v in sums.items()}
        eval_student = ema.module if ema is not None else accelerator.unwrap_model(model).student
        m = None
        if len(val_idx):
            m = evaluate_loader(eval_student, val_loader, data.classes)
            row |= {"val_macro_f1": m["macro_f1"], "val_accuracy": m["accuracy"]}
        row |= {"epoch_seconds": elapsed, "samples_per_s": seen * accelerator.num_processes / elapsed}
        history.append(row)
        score = row.get("val_macro_f1", -epoch)
        is_best = score > best if len(val_idx) else True
        if accelerator.is_main_process:
            if is_best:
                best = score if len(val_idx) else best
                _save_atomic({"student": _cpu_state(eval_student), "epoch": epoch, "metrics": row, "val": m},
                             out / "checkpoints" / "best.pt")
            _save_atomic({"model": accelerator.unwrap_model(model).state_dict(), "optimizer": optimizer.state_dict(),
                          "scheduler": scheduler.state_dict(), "ema": ema.state_dict() if ema is not None else None,
                          "rng": torch.get_rng_state(), "history": history, "best": best, "epoch": epoch,
                          "config": cfg.identity()}, ckpt_path)
            _write_text_atomic("".join(json.dumps(r) + "\n" for r in history), out / "metrics.jsonl")
        msg = f"epoch {epoch + 1}/{cfg.optim.epochs}  loss {row['train_loss']:.4f}"
        if "val_macro_f1" in row:
            msg += f"  val macro-F1 {row['val_macro_f1']:.4f}  acc {row['val_accuracy']:.4f}"
        _log(accelerator, msg + f"  {row['samples_per_s']:.0f} samples/s  {elapsed:.1f}s")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        finish(cfg, data, out)
    return out


def finish(cfg: FitConfig, data: StoreData, out: Path) -> None:
    """Export the best student, write the summary and the pictures."""
    from trainer import export, plots

    student = create_student(cfg.student, len(data.classes))
    best = torch.load(out / "checkpoints" / "best.pt", map_location="cpu", weights_only=False)
    student.load_state_dict(best["student"])
    student.eval()
    sidecar = {"classes": data.classes, "input_size": [3, cfg.image_size, cfg.image_size],
               "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD),
               "student": cfg.student, "store": str(cfg.store), "teacher": data.store.attrs["teacher"]["id"],
               "teacher_weights": data.store.attrs["teacher"]["weights"], "epoch": best["epoch"] + 1}
    path = export.export_torchscript(student, out / "student.pt", sidecar, cfg.max_mb)
    if cfg.onnx:
        export.export_onnx(student, out / "student.onnx", cfg.image_size)
    history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    summary = {"student": cfg.student, "size_mb": path.stat().st_size / 1e6, "params_mb": size_mb(student),
               "best_epoch": best["epoch"] + 1,
               "teacher_probe_cv_macro_f1": data.store.attrs.get("metrics", {}).get("probe", {}).get("cv_macro_f1"),
               "teacher_probe_val_macro_f1": data.store.attrs.get("metrics", {}).get("probe", {}).get("val_macro_f1"),
               "seconds_per_epoch": float(np.median([h["epoch_seconds"] for h in history])),
               "samples_per_s": float(np.median([h["samples_per_s"] for h in history]))}
    plots.training_curves(history, out / "curves.png")
    m = best["val"]                       # validation of exactly these weights, from the epoch loop
    if m is not None:
        summary |= {"val_macro_f1": m["macro_f1"], "val_accuracy": m["accuracy"]}
        plots.confusion(m, out / "confusion.png")
        plots.per_class_f1(m, out / "per_class_f1.png")
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"exported {path} ({summary['size_mb']:.2f} MB); run summary in {out / 'summary.json'}", file=sys.stderr)


@torch.no_grad()
def evaluate_loader(student: nn.Module, loader: Loader, classes: list[str]) -> dict:
    was_training = student.training
    student.eval()
    preds, labels = [], []
    for batch in loader.epoch(0):
        preds.append(student(batch.pixels.to(next(student.parameters()).device)).argmax(-1).cpu())
        labels.append(batch.labels.cpu())
    student.train(was_training)
    return metrics_mod.classification(torch.cat(labels).numpy(), torch.cat(preds).numpy(), classes)


def _cpu_state(module: nn.Module) -> dict:
    return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}


def _store_summary(data: StoreData) -> dict:
    a = data.store.attrs
    return {"path": data.store.path, "teacher": a["teacher"]["id"], "weights": a["teacher"]["weights"],
            "created": a["created"], "num_images": data.n, "views_per_image": data.k}


def _log(accelerator, msg: str) -> None:
    if accelerator.is_main_process:
        print(msg, file=sys.stderr, flush=True)
