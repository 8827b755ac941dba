"""Experiment trackers: `trainer fit --logger tensorboard,mlflow,wandb,csv` sends a run where its user
already looks, beside metrics.jsonl (which is always written).

Each tracker gets the same things: the config as hyperparameters (flattened, `optim.lr`), the loss at
every --log-every steps (`step/loss`, `step/lr`), each epoch's row (the loss terms `train_<term>`, each
teacher's `train_<term>:<teacher>`, `val_macro_f1`, lr, samples/s, peak GPU memory), and at the end the
exported student's own score and size (`final/...`) and the run's pictures. A sweep names each run
`<recipe>-s<seed>` and tags it with its recipe and seed.

- csv: `<run>/metrics.csv`, one row per logged value: step, epoch, name, value.
- tensorboard: event files under `<run>/tensorboard/` (torch's SummaryWriter; `tensorboard --logdir runs`).
- mlflow: a run in the experiment `--tracker-project` at MLFLOW_TRACKING_URI (mlflow's own default
  otherwise), the pictures and student.pt's sidecar as artifacts.
- wandb: a run in the project `--tracker-project` (WANDB_MODE=offline keeps it on the disk, under
  `<run>/wandb/`, for `wandb sync` later).

Only the main process logs. A resumed run continues the same tracker run (its ids are kept in
`<run>/trackers.json`). A tracker that fails while the run trains (a server gone) is warned about once
and left out; the training goes on. The libraries are optional: `pip install 'kdstore[track]'`.
"""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

from featurestore.common.log import logger
from featurestore.common.options import ConfigError

NAMES = ("csv", "tensorboard", "mlflow", "wandb")
PACKAGES = {"tensorboard": "tensorboard", "mlflow": "mlflow", "wandb": "wandb"}
IDS = "trackers.json"


def parse_loggers(text: str) -> list[str]:
    """`--logger tensorboard,csv` -> ["tensorboard", "csv"] (empty: none)."""
    return [v.strip() for v in text.split(",") if v.strip()] if isinstance(text, str) else list(text)


def check(names: list[str]) -> None:
    """Unknown names and trackers whose library is not installed are refused before any work."""
    import importlib.util
    for name in names:
        if name not in NAMES:
            raise ConfigError(f"unknown logger {name!r}; choose from {', '.join(NAMES)} (several: comma-separated)")
        package = PACKAGES.get(name)
        if package and importlib.util.find_spec(package) is None:
            raise ConfigError(f"--logger {name} needs the {package} package, which is not installed: "
                              f"pip install 'kdstore[track]' (or pip install {package})")


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    """A nested config as flat hyperparameters: {"optim": {"lr": 1}} -> {"optim.lr": 1}; lists and
    mappings below become text."""
    out: dict[str, Any] = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value and all(isinstance(k, str) for k in value):
            out |= flatten(value, name + ".")
        elif isinstance(value, (list, tuple, dict)):
            out[name] = json.dumps(value)
        else:
            out[name] = value
    return out


class Csv:
    def __init__(self, out: Path, run_name: str, params: dict, tags: dict, ids: dict, resume: bool):
        self.path = out / "metrics.csv"
        fresh = not (resume and self.path.is_file())
        self.file = open(self.path, "w" if fresh else "a", newline="")           # noqa: SIM115
        self.rows = csv.writer(self.file)
        if fresh:
            self.rows.writerow(["step", "epoch", "name", "value"])

    def log(self, metrics: dict[str, float], step: int, epoch: int | None) -> None:
        for name, value in metrics.items():
            self.rows.writerow([step, "" if epoch is None else epoch, name, repr(float(value))])
        self.file.flush()

    def finish(self, summary: dict[str, float], images: list[Path], files: list[Path]) -> None:
        self.log(summary, -1, None)
        self.file.close()


class TensorBoard:
    def __init__(self, out: Path, run_name: str, params: dict, tags: dict, ids: dict, resume: bool):
        from torch.utils.tensorboard import SummaryWriter
        self.writer = SummaryWriter(str(out / "tensorboard"))
        self.params = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in params.items()}
        if not resume:
            text = "\n".join(f"    {k}: {v}" for k, v in sorted(params.items()))
            self.writer.add_text("config", text + "".join(f"\n    tag {k}: {v}" for k, v in tags.items()))

    def log(self, metrics: dict[str, float], step: int, epoch: int | None) -> None:
        for name, value in metrics.items():
            self.writer.add_scalar(name, value, step)
        self.writer.flush()

    def finish(self, summary: dict[str, float], images: list[Path], files: list[Path]) -> None:
        import numpy as np
        from PIL import Image
        for path in images:
            self.writer.add_image(path.stem, np.asarray(Image.open(path).convert("RGB")), dataformats="HWC")
        self.writer.add_hparams({k: v for k, v in self.params.items() if v is not None}, dict(summary),
                                run_name=".")
        self.writer.close()


class Mlflow:
    def __init__(self, out: Path, run_name: str, params: dict, tags: dict, ids: dict, resume: bool):
        import mlflow
        self.mlflow = mlflow
        mlflow.set_experiment(tags.get("project", "kdstore"))
        self.run = mlflow.start_run(run_id=ids.get("mlflow") if resume else None,
                                    run_name=None if resume and ids.get("mlflow") else run_name,
                                    tags={k: str(v) for k, v in tags.items()})
        ids["mlflow"] = self.run.info.run_id
        if not (resume and "mlflow" in ids):
            mlflow.log_params({k[:250]: str(v)[:6000] for k, v in params.items()})

    def log(self, metrics: dict[str, float], step: int, epoch: int | None) -> None:
        self.mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, step=step)

    def finish(self, summary: dict[str, float], images: list[Path], files: list[Path]) -> None:
        self.mlflow.log_metrics({k: float(v) for k, v in summary.items()})
        for path in images + files:
            self.mlflow.log_artifact(str(path))
        self.mlflow.end_run()


class Wandb:
    def __init__(self, out: Path, run_name: str, params: dict, tags: dict, ids: dict, resume: bool):
        import wandb
        self.wandb = wandb
        self.run = wandb.init(project=tags.get("project", "kdstore"), name=run_name, dir=str(out), config=params,
                              tags=[f"{k}:{v}" for k, v in tags.items() if k != "project"],
                              id=ids.get("wandb") if resume else None, resume="allow" if resume else None,
                              reinit="finish_previous")
        ids["wandb"] = self.run.id

    def log(self, metrics: dict[str, float], step: int, epoch: int | None) -> None:
        self.run.log(dict(metrics), step=step)

    def finish(self, summary: dict[str, float], images: list[Path], files: list[Path]) -> None:
        for key, value in summary.items():
            self.run.summary[key] = value
        if images:
            self.run.log({path.stem: self.wandb.Image(str(path)) for path in images})
        self.run.finish()


KINDS = {"csv": Csv, "tensorboard": TensorBoard, "mlflow": Mlflow, "wandb": Wandb}


class Trackers:
    """The run's trackers, as one: each call goes to every tracker still working."""

    def __init__(self, active: dict[str, Any]):
        self.active = active

    @classmethod
    def none(cls) -> Trackers:
        return cls({})

    @classmethod
    def open(cls, names: list[str], out: Path, run_name: str, config: dict, tags: dict,
             resume: bool) -> Trackers:
        if not names:
            return cls.none()
        check(names)
        ids_file = out / IDS
        ids = json.loads(ids_file.read_text()) if resume and ids_file.is_file() else {}
        params = flatten(config)
        active = {}
        for name in dict.fromkeys(names):
            try:
                active[name] = KINDS[name](out, run_name, params, tags, ids, resume)
            except ConfigError:
                raise
            except Exception as e:  # noqa: BLE001 - a tracker that cannot start: said, and the run goes on
                logger.warning(f"warning: --logger {name} could not start ({_first(e)}); the run goes on without it")
        ids_file.write_text(json.dumps(ids))
        return cls(active)

    def _each(self, what: str, *args) -> None:
        for name, tracker in list(self.active.items()):
            try:
                getattr(tracker, what)(*args)
            except Exception as e:  # noqa: BLE001 - a failing tracker never stops the training
                logger.warning(f"warning: --logger {name} failed ({_first(e)}); the run goes on without it")
                del self.active[name]

    def log(self, metrics: dict[str, float], step: int, epoch: int | None = None) -> None:
        if self.active:
            self._each("log", {k: v for k, v in metrics.items() if _number(v)}, step, epoch)

    def finish(self, summary: dict, images: list[Path], files: list[Path]) -> None:
        if self.active:
            final = {f"final/{k}": v for k, v in summary.items() if _number(v)}
            self._each("finish", final, [p for p in images if p.is_file()], [p for p in files if p.is_file()])
            self.active = {}


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _first(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


def tags_of(cfg) -> dict[str, str]:
    """The tags every tracker gets: the store, the student, the seed, the tracker project, and the sweep's
    recipe where the run is one of a sweep."""
    out = {"project": cfg.tracker_project, "student": cfg.student, "seed": str(cfg.seed), "store": str(cfg.store)}
    return out | {k: str(v) for k, v in cfg.run_tags.items()}
