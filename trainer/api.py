"""The Python API: `trainer fit`, `sweep` and `eval` as functions, with the flags' names and defaults.

    import trainer
    run = trainer.fit(store="stores/derm.zarr", out="runs/shufflenet", student="shufflenet_v2_x1_0")
    run.summary["val_macro_f1"], run.student          # the exported TorchScript file
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from featurestore.api import config_from


@dataclass
class Run:
    path: Path
    summary: dict

    @property
    def student(self) -> Path:
        return self.path / "student.pt"


def fit(*, config: str | None = None, resume: bool = False, progress: bool = True, **kwargs) -> Run:
    """`trainer fit`; returns the finished run."""
    from trainer.cli import FLAGS
    from trainer.config import FitConfig
    from trainer.training import fit as run_fit
    out = run_fit(config_from(FitConfig, FLAGS, kwargs, config), resume=resume, progress=progress)
    return Run(out, json.loads((out / "summary.json").read_text()))


def sweep(*, recipes: str | list[str] = "labels,kd,kd+features,kd-only", seeds: int = 3, search: int = 0,
          eval_images: str | None = None, config: str | None = None, **kwargs):
    """`trainer sweep`; returns its result (path, summary as in sweep.json, table)."""
    from trainer.cli import FLAGS
    from trainer.config import FitConfig
    from trainer.sweeper import sweep as run_sweep
    names = recipes.split(",") if isinstance(recipes, str) else list(recipes)
    return run_sweep(config_from(FitConfig, FLAGS, kwargs, config), names, seeds, search, eval_images)


def eval(*, model: str, images: str, batch_size: int = 64, workers: int = 2, on_bad_image: str = "skip") -> dict:  # noqa: A001
    """`trainer eval`: the grader's preprocessing and macro-F1 (scikit-learn) on an ImageFolder."""
    from trainer.evaluate import evaluate
    return evaluate(model, images, batch_size, workers, on_bad_image)
