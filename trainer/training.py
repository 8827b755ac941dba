"""`trainer fit`: a student from the store, with KD and feature losses; checkpoints and resume.

The run, read top to bottom: take the run folder (lock, refuse or clear, run_folder.py), open the
store's data, make the loaders, the model and its TrainState (or load it from the last checkpoint),
then per epoch: train, validate, checkpoint (last and best), log; at the end export the best student
and write the summary and the pictures. A step reads nothing back from the device: loss parts and
sample counts are summed there and read every `log_every` steps, where a non-finite loss fails the
run naming the step range.
"""
from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path

import numpy as np
import torch
import yaml
from torch import nn
from tqdm import tqdm

from featurestore.common import devices
from featurestore.common.errors import KdstoreError
from featurestore.common.lock import FileLock
from featurestore.common.log import logger
from featurestore.common.options import ConfigError, to_dict
from featurestore.common.provenance import record
from featurestore.common.ranks import check_launch
from featurestore.store.schema import SPLIT_HELD_OUT, SPLIT_UNLABELED
from trainer import checkpoints, run_folder, terms
from trainer.calibration import class_prior
from trainer.config import FitConfig
from trainer.data import NonFiniteError, StoreData
from trainer.loader import Loader, LoaderConfig
from trainer.run_folder import BEST, LAST
from trainer.state import TrainState, best_dict, build_model
from trainer.students import create_student, size_mb, spec_of
from trainer.terms import total_loss
from trainer.trackers import Trackers, tags_of


def fit(cfg: FitConfig, resume: bool = False, progress: bool = True, batches=Loader,
        config_file: str | None = None) -> Path:
    """Train (or resume) the run in cfg.out, on one process or all of a `torchrun`/`accelerate launch`.
    Rank 0 alone owns the run folder: it holds the run lock throughout and makes the folder ready
    while the other ranks wait (a refusal stops them all); a full disk ends in one sentence that says
    how to go on. batches: what makes the training batches, called as Loader is (a Loader subclass:
    the same plan, other targets). config_file: the YAML the config came from (never overwritten)."""
    cfg.validate()
    check_launch()
    out = Path(cfg.out)
    device = devices.pick_device("cpu" if cfg.cpu else cfg.device)
    mp = devices.mixed_precision(cfg.mixed_precision, devices.caps_of(device))
    accelerator = _accelerator(device.type == "cpu", mp)
    with contextlib.ExitStack() as stack, run_folder.disk_full(out):
        error = None
        if accelerator.is_main_process:
            try:
                stack.enter_context(FileLock(out, "trainer fit"))
                run_folder.prepare(out, resume, config_file)
            except Exception as e:  # noqa: BLE001 - raised below, once the other ranks heard of it
                error = e
        stopped = _share(accelerator, None if error is None else " ".join(str(error).split()))
        if error is not None:
            raise error
        if stopped is not None:
            raise KdstoreError(f"rank {accelerator.process_index}: rank 0 stopped: {stopped}")
        return _fit(cfg, out, resume, progress, accelerator, mp, batches)


def _share(accelerator, value):
    """Rank 0's `value` on every rank."""
    if accelerator.num_processes == 1:
        return value
    from accelerate.utils import broadcast_object_list
    return broadcast_object_list([value], from_process=0)[0]


def _fit(cfg: FitConfig, out: Path, resume: bool, progress: bool, accelerator, mp: str, batches) -> Path:
    from accelerate.utils import set_seed

    set_seed(cfg.seed)
    try:
        data = open_data(cfg)
    except NonFiniteError as e:
        run_folder.fail(out, str(e))
    with contextlib.closing(data):                   # the store's reader lock, held while it is read
        return _train(cfg, data, out, resume, progress, accelerator, mp, batches)


def _train(cfg: FitConfig, data: StoreData, out: Path, resume: bool, progress: bool, accelerator, mp: str,
           batches) -> Path:
    train_idx, val_idx = training_images(cfg, data.split)
    device, spec = accelerator.device, spec_of(cfg.student)
    batched = devices.caps_of(device).batched_kernels
    c = len(data.classes)
    prior = class_prior(data.labels[train_idx], c)                     # of the labelled training images
    weights = balanced_weights(data.labels, train_idx, prior) if cfg.sampling == "balanced" else None
    loader = batches(data, train_idx, cfg.seed, device,
                    LoaderConfig(cfg.optim.batch_size, cfg.image_size, spec.mean, spec.std, cfg.buffer_chunks,
                                 threads=2 if batched else 0,            # a training CPU has no core to spare
                                 readers=4 if data.remote else 2,        # several chunks in flight from a bucket
                                 workers=cfg.loader_workers, weights=weights),
                    accelerator.process_index, accelerator.num_processes)
    steps = len(loader)
    if steps == 0:
        raise ConfigError(f"{len(train_idx)} training images make no batch")
    cfg, total = cfg.schedule(steps)
    log_prior = torch.from_numpy(np.log(prior)).float().to(device)
    choose, why = selection(data, val_idx)
    if accelerator.is_main_process and not choose:
        logger.warning(f"warning: {why}")
    if not resume:
        loader.read_ahead(0)                         # the first window is read while the model is set up

    model = build_model(cfg, len(data.classes), data.shapes)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    state = TrainState.create(cfg, model, steps, total, fused=device.type == "cuda")
    if resume:
        state.load_state_dict(checkpoints.load(out / LAST), cfg, str(out))
        if accelerator.is_main_process:
            logger.info(f"resuming {out} at epoch {state.epochs_done + 1}/{cfg.optim.epochs}")
    elif accelerator.is_main_process:
        checkpoints.write_text_atomic(yaml.safe_dump(to_dict(cfg) | {"store_attrs": _store_summary(data)} | record(),
                                                     sort_keys=False), out / "config.yaml")
    track = (Trackers.open(cfg.logger, out, cfg.run_name or out.name, to_dict(cfg), tags_of(cfg), resume)
             if accelerator.is_main_process else Trackers.none())
    train_model, state.optimizer, state.scheduler = accelerator.prepare(model, state.optimizer, state.scheduler)
    if cfg.compile:
        train_model = torch.compile(train_model, mode=cfg.compile_mode)
    if accelerator.is_main_process:
        logger.info(f"training {cfg.student} on {len(train_idx)} images "
                    f"({int((data.split[train_idx] == SPLIT_UNLABELED).sum())} unlabelled), {total} steps "
                    f"({steps} per epoch, {cfg.optim.epochs} epochs) on "
                    f"{device} ({mp} mixed precision), {'in RAM' if data.in_memory else 'streaming chunks'}")
    try:
        if state.epochs_done < cfg.optim.epochs:
            loader.read_ahead(state.epochs_done)     # a resumed run learns its first epoch only here
        while state.epochs_done < cfg.optim.epochs:
            t0 = time.perf_counter()
            row = train_epoch(cfg, accelerator, train_model, state, loader, out, progress,
                              min(steps, total - state.epochs_done * steps), log_prior, track)
            val = validate(cfg, state.eval_student, data, val_idx, device) if len(val_idx) else None
            row |= {"val_macro_f1": val["macro_f1"], "val_accuracy": val["accuracy"]} if val else {}
            elapsed = time.perf_counter() - t0
            row |= {"epoch_seconds": elapsed, "samples_per_s": row.pop("samples") * accelerator.num_processes / elapsed}
            if device.type == "cuda":
                row["peak_gpu_mb"] = torch.cuda.max_memory_allocated(device) / 2 ** 20
            end_epoch(cfg, state, row, val if choose else None, out, accelerator.is_main_process)
            track.log({k: v for k, v in row.items() if k != "epoch"}, state.epochs_done * steps, row["epoch"])
    except NonFiniteError as e:
        track.finish({"failed": 1}, [], [])
        run_folder.fail(out, str(e))
    finally:
        loader.close()                               # render threads or worker processes
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        summary = finish(cfg, data, out, val_idx, choose, why)
        track.finish(summary, [out / n for n in ("curves.png", "confusion.png", "per_class_f1.png")],
                     [out / "summary.json", out / "student.json"])
        teacher = summary.get("teacher_probe_val_macro_f1")
        if "val_macro_f1" in summary:
            logger.info(f"held-out macro-F1 of the exported {out / 'student.pt'}, scored as the grader scores "
                        f"({len(val_idx)} images at {cfg.eval_size} px): {summary['val_macro_f1']:.4f}; teacher "
                        "probe " + (f"{teacher:.4f}" if teacher is not None else "-")
                        + ("" if choose else " (too few images to mean much)"))
    accelerator.wait_for_everyone()                  # no rank ends (and is reaped) before the export is written
    return out


def train_epoch(cfg: FitConfig, accelerator, train_model: nn.Module, state: TrainState, loader: Loader, out: Path,
                progress: bool, steps: int, log_prior: torch.Tensor | None = None,
                track: Trackers | None = None) -> dict:
    """One epoch of `steps` optimizer steps (the plan's first ones: all of them but in the last epoch of
    a run of --steps); returns its row of means per sample (train_<part>), lr, samples."""
    epoch, w = state.epochs_done, cfg.loss
    train_model.train()
    sums: dict[str, torch.Tensor] = {}                     # on the device: summed over samples
    window = torch.zeros((), device=accelerator.device)    # loss summed since the last read
    seen, first, t0 = 0, 0, time.perf_counter()
    images = np.zeros(loader.data.n, bool)                 # the store images this rank trained on
    bar = tqdm(total=steps, desc=f"epoch {epoch + 1}/{cfg.optim.epochs}", unit="batch", leave=False,
               disable=None if progress and accelerator.is_main_process else True)
    batches = loader.epoch(epoch, ahead=epoch + 1 < cfg.optim.epochs)     # the last epoch reads nothing ahead
    for step, batch in zip(range(steps), batches):
        x = batch.pixels.contiguous(memory_format=torch.channels_last) if cfg.channels_last else batch.pixels
        with accelerator.autocast():
            logits, p, q = train_model(x)
            loss, parts = total_loss(w, logits, batch.targets, batch.labelled, batch.logits, p, batch.pooled,
                                     q, batch.patches, log_prior)
        accelerator.backward(loss)
        state.optimizer.step()
        state.scheduler.step()
        state.optimizer.zero_grad(set_to_none=True)
        if state.ema is not None:
            state.ema.update(state.model.student)
        n = len(batch.labels)
        seen += n
        images[batch.index.numpy()] = True
        for k, v in (parts | {"loss": loss.detach()}).items():
            sums[k] = sums.get(k, 0) + v.float() * n
        window += loss.detach().float()
        batch.release()
        if (step + 1) % cfg.log_every == 0 or step + 1 == steps:
            value = float(window)                           # the one read from the device, every log_every steps
            if not np.isfinite(value):
                run_folder.fail(out, f"non-finite loss at epoch {epoch + 1}, steps {first + 1}..{step + 1} ("
                                f"{ {k: float(v) for k, v in parts.items()} }); check the store with "
                                f"`featurestore verify {cfg.store}`")
            if track is not None:
                track.log({"step/loss": value / (step + 1 - first), "step/lr": state.scheduler.get_last_lr()[0]},
                          epoch * len(loader) + step + 1)
            bar.set_postfix(loss=f"{value / (step + 1 - first):.3f}",
                            samples_s=f"{seen / (time.perf_counter() - t0):.0f}")
            bar.update(step + 1 - first)
            window.zero_()
            first = step + 1
    batches.close()                                        # an epoch cut short stops its reads here
    bar.close()
    # distinct store images trained on this epoch, summed over the ranks: every training image once
    distinct = accelerator.reduce(torch.tensor(int(images.sum()), device=accelerator.device), "sum")
    return {"epoch": epoch + 1, "lr": state.scheduler.get_last_lr()[0], "samples": seen, "steps": steps,
            "images_seen": int(distinct)} | {f"train_{k}": float(v) / seen for k, v in sums.items()}


def end_epoch(cfg: FitConfig, state: TrainState, row: dict, val: dict | None, out: Path, main: bool) -> None:
    """Count the epoch, keep the best weights (val None: the last epoch's), checkpoint (best, then last),
    log."""
    state.epochs_done += 1
    state.history.append(row)
    score = row.get("val_macro_f1", -row["epoch"])
    is_best = score > state.best if val is not None else True
    if is_best and val is not None:
        state.best = score
    if main:
        if is_best:
            checkpoints.save(best_dict(state, row, val), out / BEST)
        checkpoints.save(state.state_dict(cfg), out / LAST)
        checkpoints.write_text_atomic("".join(json.dumps(r) + "\n" for r in state.history), out / "metrics.jsonl")
        msg = f"epoch {row['epoch']}/{cfg.optim.epochs}  loss {row['train_loss']:.4f}"
        if "val_macro_f1" in row:
            msg += f"  val macro-F1 {row['val_macro_f1']:.4f}  acc {row['val_accuracy']:.4f}"
        logger.info(msg + f"  {row['samples_per_s']:.0f} samples/s  {row['epoch_seconds']:.1f}s")


def training_images(cfg: FitConfig, split: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(train, validation) store indices, from the store's split: labelled folds, plus unlabelled
    images when a teacher term can use them, plus held-out images with train_on_all (then no
    validation)."""
    use = split >= 0
    if cfg.unlabeled and terms.teacher_terms(cfg.loss):
        use |= split == SPLIT_UNLABELED
    held = split == SPLIT_HELD_OUT
    if cfg.train_on_all:
        return np.flatnonzero(use | held), np.zeros(0, np.int64)
    return np.flatnonzero(use), np.flatnonzero(held)


def open_data(cfg: FitConfig) -> StoreData:
    """The store's data the run's terms need: the KD head's logits where a term reads logits, and each
    feature target of the teachers whose weight for it is above 0."""
    w, used = cfg.loss, [t for t in terms.ordered() if terms.uses(cfg.loss, t.name)]
    need = {kind: _merged([getattr(w, t.name) for t in used if t.needs == kind]) for kind in ("pooled", "patches")}
    return StoreData(cfg.store, cfg.head if any(t.needs == "logits" for t in used) else None, need["pooled"],
                     need["patches"], cfg.ram_budget_gb, cfg.storage_options, cfg.kd_teacher, cfg.standardize)


def _merged(weights: list) -> float | dict[str, float]:
    """The weights of the terms that read one kind of target, as one: a teacher is read if any weighs it."""
    if not weights:
        return 0.0
    if all(not isinstance(v, dict) for v in weights):
        return max(weights)
    out: dict[str, float] = {}
    for v in weights:
        for name, x in (v.items() if isinstance(v, dict) else [("*", v)]):
            out[name] = max(out.get(name, 0.0), x)
    if "*" in out:                                 # a plain number covers every teacher
        return out["*"] or max(out.values())
    return out


def _accelerator(cpu: bool, mixed_precision: str):
    """An Accelerator for this run. Outside a multi-process launch the process-wide state is cleared
    first, so that a second run in one process (a notebook, the sweep, the API) may pick another
    device or precision."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        AcceleratorState._reset_state(reset_partial_state=True)
    return Accelerator(cpu=cpu, mixed_precision=mixed_precision)


MIN_HELD_OUT = 5                      # held-out images of the rarest class below which no epoch is chosen by them


def selection(data: StoreData, val_idx: np.ndarray) -> tuple[bool, str]:
    """(choose, why): whether the held-out images are enough to choose the best epoch (and a logit bias)
    by; else the last epoch is exported, and `why` says so."""
    labels = data.labels[val_idx]
    counts = np.bincount(labels[labels >= 0], minlength=len(data.classes))
    if len(val_idx) and counts.min() >= MIN_HELD_OUT:
        return True, f"the best epoch on {len(val_idx)} held-out images"
    return False, (f"the held-out split has {len(val_idx)} images ({int(counts.min())} of the rarest class, under "
                   f"{MIN_HELD_OUT}): too few to choose an epoch or a bias by, so the last epoch is exported and its "
                   "held-out score carries little information (build with a larger --val-fraction, or score on "
                   "images of your own with `trainer eval`)")


def balanced_weights(labels: np.ndarray, train_idx: np.ndarray, prior: np.ndarray) -> np.ndarray:
    """(N,) sampling weights that draw each class equally often: 1 / prior of the image's class;
    unlabelled images weigh what an average labelled image does."""
    w = np.zeros(len(labels))
    lab = train_idx[labels[train_idx] >= 0]
    w[lab] = 1.0 / prior[labels[lab]]
    w[train_idx[labels[train_idx] < 0]] = w[lab].mean() if len(lab) else 1.0
    return w


def grader_module(cfg: FitConfig, student: nn.Module, num_classes: int, bias=None):
    """The very module student.pt runs, around `student` (eager: validation runs it every epoch)."""
    from trainer.exporter import for_the_grader
    spec = spec_of(cfg.student)
    return for_the_grader(student, cfg.image_size, spec.mean, spec.std, num_classes, cfg.tta == "flip", bias)


def validate(cfg: FitConfig, student: nn.Module, data: StoreData, val_idx: np.ndarray, device) -> dict:
    """The held-out images scored as the grader scores the exported file: resized to --eval-size, normalised
    with ImageNet's mean/std, through the module student.pt runs (resize to the training size, TTA)."""
    from trainer.evaluate import evaluate_held_out
    return evaluate_held_out(grader_module(cfg, student, len(data.classes)).to(device), data, val_idx, cfg.eval_size)


def finish(cfg: FitConfig, data: StoreData, out: Path, val_idx: np.ndarray, choose: bool, why: str) -> dict:
    """Export the selected student (with its logit bias, when one helps), score the exported file itself on
    the held-out images as the grader scores, write the summary and the pictures."""
    from trainer import exporter, plots
    from trainer.calibration import choose_bias
    from trainer.evaluate import evaluate_held_out, load_model

    c = len(data.classes)
    student = create_student(cfg.student, c)
    best = checkpoints.load(out / BEST)
    student.load_state_dict(best["student"])
    student.eval()
    spec = spec_of(cfg.student)
    bias, calibration = None, None
    if cfg.calibrate == "bias":
        if choose:
            logits: list = []
            evaluate_held_out(grader_module(cfg, student, c), data, val_idx, cfg.eval_size, logits_out=logits)
            choice = choose_bias(logits[0], data.labels[np.sort(val_idx)], cfg.seed)
            bias, calibration = choice.bias, choice.record()
            logger.info(f"logit bias {'folded into the export' if choice.applied else 'left out'}: cross-fitted "
                        f"held-out macro-F1 {choice.f1_without:.4f} without, {choice.f1_with:.4f} with")
        else:
            calibration = {"applied": False, "why": why}
    sidecar = {"classes": data.classes, "input_size": [3, cfg.image_size, cfg.image_size],
               "student": cfg.student, "store": str(cfg.store), "teacher": data.store.teacher().info["id"],
               "teacher_weights": data.store.teacher().info["weights"],
               "store_digest": data.store.attrs.get("digest"), "epoch": best["epoch"] + 1}
    path = exporter.export_torchscript(student, out / "student.pt", sidecar, cfg.max_mb, spec.mean, spec.std,
                                       cfg.tta == "flip", bias)
    if cfg.onnx:
        exporter.export_onnx(grader_module(cfg, student, c, bias), out / "student.onnx")
    probe = data.store.teacher().metrics.get("probe", {})
    summary = {"student": cfg.student, "size_mb": path.stat().st_size / 1e6, "params_mb": size_mb(student),
               "student_sha256": exporter.file_sha256(path), "store_digest": data.store.attrs.get("digest"),
               "best_epoch": best["epoch"] + 1, "selection": why if not choose else "best held-out epoch",
               "steps": sum(h.get("steps", 0) for h in _history(out)),
               "image_size": cfg.image_size, "eval_size": cfg.eval_size, "tta": cfg.tta, "calibration": calibration,
               "teacher_probe_cv_macro_f1": probe.get("cv_macro_f1"),
               "teacher_probe_val_macro_f1": probe.get("val_macro_f1"),
               "seconds_per_epoch": float(np.median([h["epoch_seconds"] for h in _history(out)])),
               "peak_gpu_mb": max((h.get("peak_gpu_mb", 0.0) for h in _history(out)), default=0.0) or None,
               "samples_per_s": float(np.median([h["samples_per_s"] for h in _history(out)]))}
    plots.training_curves(_history(out), out / "curves.png")
    if len(val_idx):                      # the exported file itself, fed as the grader feeds it
        m = evaluate_held_out(load_model(path), data, val_idx, cfg.eval_size, model_path=path)
        summary |= {"val_macro_f1": m["macro_f1"], "val_accuracy": m["accuracy"], "val_images": m["num_images"],
                    "val_scored": f"student.pt at {cfg.eval_size} px", "val_weakest": m["weakest"],
                    "val_meaningful": choose}
        checkpoints.write_text_atomic(json.dumps(m, indent=2), out / "held_out.json")
        plots.confusion(m, out / "confusion.png")
        plots.per_class_f1(m, out / "per_class_f1.png")
    checkpoints.write_text_atomic(json.dumps(summary, indent=2), out / "summary.json")
    logger.info(f"exported {path} ({summary['size_mb']:.2f} MB); run summary in {out / 'summary.json'}")
    return summary


def _history(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _store_summary(data: StoreData) -> dict:
    a = data.store.attrs
    info = data.store.teacher().info
    return {"path": data.store.path, "teacher": info["id"], "weights": info["weights"],
            "teachers": [t.name for t in data.store.teachers],
            "created": a["created"], "digest": a.get("digest"), "num_images": data.n, "views_per_image": data.k}
