"""The Python API: `trainer fit`, `sweep`, `eval` and `export` as functions, with the flags' names and
defaults (the command line calls these same functions).

    import trainer
    run = trainer.fit(store="stores/derm.zarr", out="runs/shufflenet", student="shufflenet_v2_x1_0")
    run.summary["val_macro_f1"], run.student          # the exported TorchScript file
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from featurestore.common import log
from featurestore.common.errors import not_in_a_reimported_script
from featurestore.common.options import load_config
from trainer.config import FitConfig
from trainer.recipes import DEFAULT_RECIPES
from trainer.tables import summary_of


@dataclass
class Run:
    path: Path
    summary: dict

    @property
    def student(self) -> Path:
        return self.path / "student.pt"


def fit(*, config: str | None = None, resume: bool = False, progress: bool = True, **kwargs) -> Run:
    """`trainer fit`; returns the finished run."""
    not_in_a_reimported_script("trainer.fit")
    from trainer.training import fit as run_fit
    log.enable()
    out = run_fit(load_config(FitConfig, config, kwargs), resume=resume, progress=progress, config_file=config)
    return Run(out, summary_of(out))


def sweep(*, recipes: str | list[str] = DEFAULT_RECIPES, seeds: int = 3, search: int = 0,
          eval_images: str | None = None, config: str | None = None, **kwargs):
    """`trainer sweep`; returns its result (path, summary as in sweep.json, table)."""
    not_in_a_reimported_script("trainer.sweep")
    from trainer.sweeper import sweep as run_sweep
    log.enable()
    names = recipes.split(",") if isinstance(recipes, str) else list(recipes)
    return run_sweep(load_config(FitConfig, config, kwargs), names, seeds, search, eval_images)


def eval(*, model: str, images: str, batch_size: int = 64, workers: int = 2, on_bad_image: str = "skip",  # noqa: A001
         image_size: int = 224) -> dict:
    """`trainer eval`: the grader's preprocessing and macro-F1 (scikit-learn) on an ImageFolder."""
    from trainer.evaluate import evaluate
    return evaluate(model, images, batch_size, workers, on_bad_image, image_size)


def export(*, run: str | None = None, format: str = "torchscript", max_mb: float = 25.0,  # noqa: A002
           ensemble: list[str] | None = None, out: str | None = None) -> Path:
    """`trainer export`: a finished run's student again, as TorchScript or ONNX; or `ensemble` (runs) as one
    TorchScript file at `out`."""
    from featurestore.common.options import ConfigError
    from trainer.exporter import export_ensemble, export_run
    if ensemble:
        if run or not out or format != "torchscript":
            raise ConfigError("--ensemble RUN RUN ... writes one TorchScript file: give --out FILE.pt, and no --run")
        return export_ensemble([Path(r) for r in ensemble], Path(out), max_mb)
    if not run:
        raise ConfigError("give --run (a finished run) or --ensemble RUN RUN ... --out FILE.pt")
    return export_run(Path(run), format, max_mb)
