"""`trainer fit`: students from the store, with KD and feature losses; checkpoints and resume.

Resume: the checkpoint of each epoch holds model, optimiser, schedule, EMA, RNG state and the
metric history; data order is a function of (seed, epoch), so resuming equals never stopping.
A run that meets a non-finite loss stops, names the store images, and is marked failed (FAILED in
the run directory): it exports nothing and cannot be resumed.
"""
from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
import yaml
from torch import nn
from tqdm import tqdm

from featurestore import devices
from featurestore.config import ConfigError, config_diff, to_dict
from featurestore.errors import KdstoreError
from featurestore.schema import SPLIT_HELD_OUT, SPLIT_UNLABELED
from featurestore.lock import FileLock
from trainer import checkpoints
from trainer import metrics as metrics_mod
from trainer.config import FitConfig
from trainer.loader import IMAGENET_MEAN, IMAGENET_STD, Loader, NonFiniteError, StoreData
from trainer.losses import PatchProjector, PooledProjector, total_loss
from trainer.students import create_student, size_mb

FAILED = "FAILED"


class TrainingError(KdstoreError, RuntimeError):
    """Training cannot go on (a non-finite loss); the run directory is marked failed."""


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
    shapes = data.shapes
    pooled = PooledProjector(pooled_dim, shapes["pooled"][-1]) if "pooled" in shapes else None
    patches = PatchProjector(fmap.shape[1], shapes["patches"][-1], shapes["patches"][0]) if "patches" in shapes else None
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


def training_images(cfg: FitConfig, data: StoreData) -> tuple[np.ndarray, np.ndarray]:
    """(train, validation) store indices: labelled folds, plus unlabelled images when a teacher term
    can use them, plus held-out images with train_on_all (then no validation)."""
    w = cfg.loss
    use = data.split >= 0
    if cfg.unlabeled and (w.kd or w.dist or w.pooled or w.patches):
        use |= data.split == SPLIT_UNLABELED
    held = data.split == SPLIT_HELD_OUT
    if cfg.train_on_all:
        return np.flatnonzero(use | held), np.zeros(0, np.int64)
    return np.flatnonzero(use), np.flatnonzero(held)


def open_data(cfg: FitConfig) -> StoreData:
    w = cfg.loss
    return StoreData(cfg.store, cfg.head if (w.kd or w.dist) else None, w.pooled > 0, w.patches > 0, cfg.ram_budget_gb)


def _accelerator(cpu: bool, mixed_precision: str):
    """An Accelerator for this run. Outside a multi-process launch the process-wide state is cleared
    first, so that a second run in one process (a notebook, the sweep, the API) may pick another
    device or precision."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        AcceleratorState._reset_state(reset_partial_state=True)
    return Accelerator(cpu=cpu, mixed_precision=mixed_precision)


def fit(cfg: FitConfig, resume: bool = False, progress: bool = True) -> Path:
    """Train (or resume) the run in cfg.out. The run folder has one writer: the run lock is held
    throughout; a full disk ends in one sentence that says how to go on."""
    cfg.validate()
    out = Path(cfg.out)
    owner = int(os.environ.get("RANK", "0")) == 0          # rank 0 alone owns the run folder
    with FileLock(out, "trainer fit") if owner else contextlib.nullcontext(), _disk_full(out):
        if owner:
            prepare_run_dir(out, resume)
        return _fit(cfg, out, resume, progress)


# what a run folder holds before its first epoch has finished (a fresh start may clear these)
STARTED = {"config.yaml", "metrics.jsonl", "checkpoints", FAILED}


def prepare_run_dir(out: Path, resume: bool) -> None:
    """Refuse what must not be overwritten; clear what an interrupted start left; make the folder.

    A folder with a finished epoch (checkpoints/last.pt) is continued with --resume, never started
    over; one whose start was interrupted before its first epoch finished holds nothing to lose,
    and the same command starts it again. Files kdstore did not write are never touched."""
    ckpt, failed = out / "checkpoints" / "last.pt", out / FAILED
    if failed.is_file() and (resume or ckpt.is_file()):
        reason = failed.read_text().strip()
        raise ConfigError(f"{out} failed and cannot be resumed: {reason}" if resume else
                          f"run directory {out} holds a run that failed ({reason}); pick a new --out")
    if resume and not ckpt.is_file():
        raise ConfigError(f"nothing to resume in {out} (no {ckpt}: no epoch had finished); run the same command "
                          "without --resume to start it")
    if not resume and out.is_dir():
        if ckpt.is_file():
            raise ConfigError(f"run directory {out} is not empty; pass --resume to continue the run it holds, or "
                              "pick a new --out")
        foreign = sorted(p.name for p in out.iterdir() if p.name not in STARTED)
        if (out / "checkpoints").is_dir():
            foreign += sorted(f"checkpoints/{p.name}" for p in (out / "checkpoints").iterdir()
                              if p.name != "best.pt" and not p.name.endswith(checkpoints.TMP_SUFFIX))
        if foreign:
            raise ConfigError(f"run directory {out} holds files a run does not write ({', '.join(foreign[:5])}); "
                              "pick a new --out (kdstore never deletes what it did not write)")
        for name in STARTED:
            p = out / name
            shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
    (out / "checkpoints").mkdir(parents=True, exist_ok=True)
    checkpoints.remove_stale_temporaries(out)
    checkpoints.remove_stale_temporaries(out / "checkpoints")


def next_step(out: Path) -> str:
    """What to run to go on with the run in `out` after it stopped."""
    return "run the same command with --resume" if (out / "checkpoints" / "last.pt").is_file() else \
        "run the same command (no epoch had finished)"


@contextlib.contextmanager
def _disk_full(out: Path):
    """A full disk anywhere in the run becomes one sentence; what was written before stays whole."""
    try:
        yield
    except OSError as e:
        if e.errno != errno.ENOSPC:
            raise
        raise KdstoreError(f"no space left on device while writing {e.filename or out}; free space and "
                           f"{next_step(out)}") from None


def _fit(cfg: FitConfig, out: Path, resume: bool, progress: bool) -> Path:
    from accelerate.utils import set_seed

    ckpt_path = out / "checkpoints" / "last.pt"
    device = devices.pick_device("cpu" if cfg.cpu else cfg.device)
    mp = devices.mixed_precision(cfg.mixed_precision, devices.caps_of(device))
    accelerator = _accelerator(device.type == "cpu", mp)
    set_seed(cfg.seed)
    w = cfg.loss
    try:
        data = open_data(cfg)
    except NonFiniteError as e:
        _fail(out, str(e))
    train_idx, val_idx = training_images(cfg, data)
    device = accelerator.device
    loader = Loader(data, train_idx, cfg.optim.batch_size, cfg.image_size, cfg.seed, device, train=True,
                    buffer_chunks=cfg.buffer_chunks, rank=accelerator.process_index, world=accelerator.num_processes,
                    threads=2 if devices.caps_of(device).batched_kernels else 0,   # a training CPU has no core to spare
                    workers=cfg.loader_workers)
    if len(loader) == 0:
        raise ConfigError(f"{len(train_idx)} training images make no full batch of {cfg.optim.batch_size}"
                          + (" per process" if accelerator.num_processes > 1 else ""))
    val_loader = Loader(data, val_idx, 128, cfg.image_size, cfg.seed, device, train=False)
    if not resume:
        loader.read_ahead(0)                         # the first window is read while the model is set up

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
        state = checkpoints.load(ckpt_path)
        diffs = config_diff(state["config"], cfg.identity())
        if diffs:
            raise ConfigError(f"{out} was trained with different settings: {'; '.join(diffs)}; resume with the "
                              "same ones")
        accelerator.unwrap_model(model).load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if ema is not None:
            ema.load_state_dict(state["ema"])
        torch.set_rng_state(state["rng"])
        history, best, start = state["history"], state["best"], state["epoch"] + 1
        _log(accelerator, f"resuming {out} at epoch {start + 1}/{cfg.optim.epochs}")
    else:
        checkpoints.write_text_atomic(yaml.safe_dump(to_dict(cfg) | {"store_attrs": _store_summary(data)},
                                                     sort_keys=False), out / "config.yaml")
    _log(accelerator, f"training {cfg.student} on {len(train_idx)} images ({int((data.split[train_idx] == -2).sum())} "
         f"unlabelled), {len(loader)} steps per epoch on {device} ({mp} mixed precision), "
         f"{'in RAM' if data.in_memory else 'streaming chunks'}")

    try:
        train_epochs(cfg, accelerator, model, train_model, optimizer, scheduler, ema, loader, val_loader, data,
                     history, best, start, len(val_idx), progress)
    except NonFiniteError as e:
        _fail(out, str(e))
    finally:
        loader.close()                               # render worker processes, if any
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        summary = finish(cfg, data, out)
        teacher = summary.get("teacher_probe_val_macro_f1")
        if "val_macro_f1" in summary:
            _log(accelerator, f"held-out macro-F1: student {summary['val_macro_f1']:.4f}, teacher probe "
                 + (f"{teacher:.4f}" if teacher is not None else "-") + f" ({len(val_idx)} images)")
    return out


def train_epochs(cfg: FitConfig, accelerator, model, train_model, optimizer, scheduler, ema, loader: Loader,
                 val_loader: Loader, data: StoreData, history: list, best: float, start: int, num_val: int,
                 progress: bool) -> None:
    """Epochs start.. of the run: train, validate, checkpoint (last and best), log."""
    out, w = Path(cfg.out), cfg.loss
    ckpt_path = out / "checkpoints" / "last.pt"
    if start < cfg.optim.epochs:
        loader.read_ahead(start)                     # a resumed run learns its first epoch only here
    for epoch in range(start, cfg.optim.epochs):
        t0 = time.perf_counter()
        model.train()
        sums: dict[str, float] = {}
        seen = 0
        batches = loader.epoch(epoch, ahead=epoch + 1 < cfg.optim.epochs)      # the last epoch reads nothing ahead
        bar = tqdm(batches, total=len(loader), desc=f"epoch {epoch + 1}/{cfg.optim.epochs}",
                   unit="batch", disable=None if progress and accelerator.is_main_process else True,
                   file=sys.stderr, leave=False)
        for step, batch in enumerate(bar):
            x = batch.pixels.contiguous(memory_format=torch.channels_last) if cfg.channels_last else batch.pixels
            with accelerator.autocast():
                logits, p, q = train_model(x)
                loss, parts = total_loss(w, logits, batch.targets, batch.labelled, batch.logits, p, batch.pooled,
                                         q, batch.patches)
            if not torch.isfinite(loss.detach()):
                _fail(out, f"non-finite loss ({parts}) at epoch {epoch + 1}, step {step + 1}, store images "
                      f"{batch.index[:8].tolist()}{' ...' if len(batch.index) > 8 else ''}; check the store with "
                      f"`featurestore verify {cfg.store}`")
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
        if num_val:
            m = evaluate_loader(eval_student, val_loader, data.classes)
            row |= {"val_macro_f1": m["macro_f1"], "val_accuracy": m["accuracy"]}
        row |= {"epoch_seconds": elapsed, "samples_per_s": seen * accelerator.num_processes / elapsed}
        history.append(row)
        score = row.get("val_macro_f1", -epoch)
        is_best = score > best if num_val else True
        if accelerator.is_main_process:
            if is_best:
                best = score if num_val else best
                checkpoints.save({"student": _cpu_state(eval_student), "epoch": epoch, "metrics": row, "val": m},
                            out / "checkpoints" / "best.pt")
            checkpoints.save({"model": accelerator.unwrap_model(model).state_dict(), "optimizer": optimizer.state_dict(),
                         "scheduler": scheduler.state_dict(), "ema": ema.state_dict() if ema is not None else None,
                         "rng": torch.get_rng_state(), "history": history, "best": best, "epoch": epoch,
                         "config": cfg.identity()}, ckpt_path)
            checkpoints.write_text_atomic("".join(json.dumps(r) + "\n" for r in history), out / "metrics.jsonl")
        msg = f"epoch {epoch + 1}/{cfg.optim.epochs}  loss {row['train_loss']:.4f}"
        if "val_macro_f1" in row:
            msg += f"  val macro-F1 {row['val_macro_f1']:.4f}  acc {row['val_accuracy']:.4f}"
        _log(accelerator, msg + f"  {row['samples_per_s']:.0f} samples/s  {elapsed:.1f}s")


def _fail(out: Path, reason: str) -> None:
    (out / FAILED).write_text(reason + "\n")
    raise TrainingError(f"{reason}; the run is marked failed ({out / FAILED}) and exports nothing")


def finish(cfg: FitConfig, data: StoreData, out: Path) -> dict:
    """Export the best student, write the summary and the pictures."""
    from trainer import export, plots

    student = create_student(cfg.student, len(data.classes))
    best = checkpoints.load(out / "checkpoints" / "best.pt")
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
    probe = data.store.attrs.get("metrics", {}).get("probe", {})
    summary = {"student": cfg.student, "size_mb": path.stat().st_size / 1e6, "params_mb": size_mb(student),
               "best_epoch": best["epoch"] + 1,
               "teacher_probe_cv_macro_f1": probe.get("cv_macro_f1"),
               "teacher_probe_val_macro_f1": probe.get("val_macro_f1"),
               "seconds_per_epoch": float(np.median([h["epoch_seconds"] for h in history])),
               "samples_per_s": float(np.median([h["samples_per_s"] for h in history]))}
    plots.training_curves(history, out / "curves.png")
    m = best["val"]                       # validation of exactly these weights, from the epoch loop
    if m is not None:
        summary |= {"val_macro_f1": m["macro_f1"], "val_accuracy": m["accuracy"]}
        plots.confusion(m, out / "confusion.png")
        plots.per_class_f1(m, out / "per_class_f1.png")
    checkpoints.write_text_atomic(json.dumps(summary, indent=2), out / "summary.json")
    print(f"exported {path} ({summary['size_mb']:.2f} MB); run summary in {out / 'summary.json'}", file=sys.stderr)
    return summary


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
