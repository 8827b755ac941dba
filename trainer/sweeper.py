"""`trainer sweep`: recipes x seeds on one store, compared on its held-out images.

Each run is an ordinary `trainer fit` run under <out>/runs/<recipe>-s<seed>; a finished run is
reused and an interrupted one resumed, so a sweep stopped at any point continues where it was.
`--search N` tunes lr, temperature and loss weights with Optuna (TPE, the study kept in
<out>/search.db) on the same held-out images and adds the best trial as the recipe "search".
Writes sweep.json, sweep.md, sweep.png and the best run's student.pt (+ .json).
"""
from __future__ import annotations

import dataclasses
import json
import shutil
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from featurestore.common.options import ConfigError
from featurestore.common.untrusted import read_json
from featurestore.store.reader import StoreReader
from trainer import recipes as recipes_mod
from trainer.config import FitConfig
from trainer.tables import md_table

SWEEP_MARKER = ".kdstore-sweep"


@dataclass
class SweepResult:
    path: Path
    summary: dict
    table: str


def sweep(base: FitConfig, recipes: list[str], seeds: int = 3, search: int = 0,
          eval_images: str | None = None) -> SweepResult:
    if not base.store or not base.out:
        raise ConfigError("give --store (a featurestore store) and --out (the sweep directory)")
    if seeds < 1:
        raise ConfigError(f"--seeds must be >= 1, got {seeds}")
    out = Path(base.out)
    from trainer.run_folder import claim
    claim(out, SWEEP_MARKER, "sweep", made_before=("sweep.json", "runs"))
    with StoreReader.open(base.store, base.storage_options) as s:
        has_patches = any(f.teacher and f.name.endswith("/patches") for f in s.fields())
        teacher = s.teacher().metrics.get("probe", {}).get("val_macro_f1")
        split = s.read("split")
    specs = {name: recipes_mod.apply(name, base, has_patches) for name in recipes}     # checks every name first
    base = equal_steps(base, specs.values(), split)
    specs = {name: dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, steps=base.optim.steps))
             for name, cfg in specs.items()}
    if search:
        specs["search"] = _search(base, has_patches, search, out)
    rows = []
    for name, cfg in specs.items():
        runs = [fit_or_reuse(dataclasses.replace(cfg, seed=base.seed + j,
                                         out=str(out / "runs" / f"{_slug(name)}-s{base.seed + j}"),
                                         run_name=f"{out.name}/{_slug(name)}-s{base.seed + j}",
                                         run_tags=cfg.run_tags | {"recipe": name, "sweep": out.name}),
                     eval_images) for j in range(seeds)]
        f1 = [r["val_macro_f1"] for r in runs]
        row = {"name": name, "val_macro_f1_mean": statistics.fmean(f1),
               "val_macro_f1_std": statistics.stdev(f1) if len(f1) > 1 else 0.0,
               "seeds": [r["seed"] for r in runs], "val_macro_f1": f1,
               "seconds": statistics.fmean(r["seconds"] for r in runs), "runs": [r["run"] for r in runs],
               "loss": dataclasses.asdict(cfg.loss), "unlabeled": cfg.unlabeled,
               "optim": dataclasses.asdict(cfg.optim), "steps": cfg.optim.steps}
        if eval_images:
            e = [r["eval_macro_f1"] for r in runs]
            row |= {"eval_macro_f1_mean": statistics.fmean(e),
                    "eval_macro_f1_std": statistics.stdev(e) if len(e) > 1 else 0.0}
        rows.append(row)
        print(f"sweep: {name}: held-out macro-F1 {row['val_macro_f1_mean']:.4f} +- {row['val_macro_f1_std']:.4f} "
              f"over {seeds} seed(s)", file=sys.stderr, flush=True)
    best = max(rows, key=lambda r: r["val_macro_f1_mean"])
    best_run = Path(max(zip(best["val_macro_f1"], best["runs"]))[1])
    for suffix in (".pt", ".json"):
        shutil.copyfile(best_run / f"student{suffix}", out / f"student{suffix}")
    summary = {"store": str(base.store), "recipes": rows, "best": best["name"], "best_run": str(best_run),
               "teacher_probe_val_macro_f1": teacher, "eval_images": eval_images}
    (out / "sweep.json").write_text(json.dumps(summary, indent=2))
    table = format_table(summary)
    (out / "sweep.md").write_text(table + "\n")
    _plot(summary, out / "sweep.png")
    return SweepResult(out, summary, table)


def equal_steps(base: FitConfig, configs, split) -> FitConfig:
    """`base` with optim.steps set, when it is not, to what `base.optim.epochs` passes take for the
    recipe with the most training images: every recipe then learns for the same number of optimizer
    steps (labels alone on a few images would otherwise get a fraction of them)."""
    from trainer.plan import steps_per_epoch
    from trainer.training import training_images
    if base.optim.steps:
        return base
    most = max(len(training_images(cfg, split)[0]) for cfg in configs)
    steps = steps_per_epoch(most, base.optim.batch_size) * base.optim.epochs
    return dataclasses.replace(base, optim=dataclasses.replace(base.optim, steps=steps))


def fit_or_reuse(cfg: FitConfig, eval_images: str | None, batches=None) -> dict:
    """Fit (or reuse, or resume) one run; returns its seed, held-out macro-F1, seconds, eval macro-F1
    (scored as `trainer eval` scores). batches: as `fit` takes it (default: the store's Loader)."""
    from trainer.loader import Loader
    from trainer.run_folder import FAILED
    from trainer.training import fit
    run = Path(cfg.out)
    record = run / "sweep_run.json"
    if not record.is_file():
        if (run / FAILED).is_file():
            raise ConfigError(f"run {run} of this sweep failed: {(run / FAILED).read_text().strip()}")
        resume = (run / "checkpoints" / "last.pt").is_file()     # a run started anew if no epoch finished
        t0 = time.perf_counter()
        fit(cfg, resume=resume, progress=False, batches=batches or Loader)
        summary = read_json(run / "summary.json", f"delete the run folder {run} and run the sweep again")
        record.write_text(json.dumps({"seed": cfg.seed, "run": str(run), "val_macro_f1": summary["val_macro_f1"],
                                      "seconds": time.perf_counter() - t0}))
    result = read_json(record, f"delete {record} and run the sweep again: it takes the run's summary anew")
    if eval_images and "eval_macro_f1" not in result:
        from trainer.evaluate import evaluate
        m = evaluate(run / "student.pt", eval_images, workers=0)
        (run / "eval.json").write_text(json.dumps(m, indent=2))
        result["eval_macro_f1"] = m["macro_f1"]
        record.write_text(json.dumps(result))
    return result


def _search(base: FitConfig, has_patches: bool, trials: int, out: Path) -> FitConfig:
    """Optuna TPE over lr, temperature and loss weights; the best trial's config (held-out macro-F1)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)

    def config(t) -> FitConfig:
        w = dataclasses.replace(base.loss, ce=t.suggest_float("ce", 0.0, 1.0), kd=t.suggest_float("kd", 0.0, 2.0),
                                temperature=t.suggest_float("temperature", 1.0, 6.0),
                                pooled=t.suggest_float("pooled", 0.0, 1.0),
                                patches=t.suggest_float("patches", 0.0, 1.0) if has_patches else 0.0)
        optim = dataclasses.replace(base.optim, lr=t.suggest_float("lr", 3e-4, 1e-2, log=True))
        return dataclasses.replace(base, loss=w, optim=optim)

    def objective(t) -> float:
        cfg = dataclasses.replace(config(t), out=str(out / "search" / f"trial-{t.number}"))
        return fit_or_reuse(cfg, None)["val_macro_f1"]

    out.mkdir(parents=True, exist_ok=True)
    study = optuna.create_study(direction="maximize", study_name="kdstore", load_if_exists=True,
                                storage=f"sqlite:///{out / 'search.db'}",
                                sampler=optuna.samplers.TPESampler(seed=base.seed))
    left = trials - len([t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE])
    if left > 0:
        study.optimize(objective, n_trials=left)
    print(f"sweep: search best held-out macro-F1 {study.best_value:.4f} with {study.best_params}",
          file=sys.stderr, flush=True)
    return config(optuna.trial.FixedTrial(study.best_params))


def format_table(summary: dict) -> str:
    fresh = summary.get("eval_images")
    header = ["recipe", "held-out macro-F1 (mean +- std)", "seeds", "steps/run", "s/run"]
    header += ["fresh-image macro-F1"] if fresh else []
    rows = []
    if summary.get("teacher_probe_val_macro_f1") is not None:
        teacher = f"{summary['teacher_probe_val_macro_f1']:.3f}"
        rows.append(["teacher probe", teacher, "-", "-", "-"] + (["-"] if fresh else []))
    for r in summary["recipes"]:
        mark = " (best)" if r["name"] == summary["best"] else ""
        row = [r["name"] + mark, f"{r['val_macro_f1_mean']:.3f} +- {r['val_macro_f1_std']:.3f}", len(r["seeds"]),
               r.get("steps", "-"), f"{r['seconds']:.0f}"]
        if fresh:
            row.append(f"{r['eval_macro_f1_mean']:.3f} +- {r['eval_macro_f1_std']:.3f}")
        rows.append(row)
    return md_table(header, rows)


def _plot(summary: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = summary["recipes"]
    fig, ax = plt.subplots(figsize=(1.6 + 1.3 * len(rows), 4))
    names = [r["name"] for r in rows]
    ax.bar(names, [r["val_macro_f1_mean"] for r in rows], yerr=[r["val_macro_f1_std"] for r in rows], capsize=6,
           color=["tab:orange" if r["name"] == summary["best"] else "tab:blue" for r in rows])
    if summary.get("teacher_probe_val_macro_f1") is not None:
        ax.axhline(summary["teacher_probe_val_macro_f1"], color="tab:red", linestyle="--", label="teacher probe")
        ax.legend(loc="lower right")
    ax.set(ylim=(0, 1), ylabel="held-out macro-F1 (mean, std over seeds)", title="trainer sweep")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _slug(name: str) -> str:
    return name.replace(":", "_").replace("+", "_")
