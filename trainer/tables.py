"""The tables a person reads at the end: one run's summary, several runs side by side, markdown."""
from __future__ import annotations

import json
from pathlib import Path

from featurestore.options import ConfigError


def md_table(header: list[str], rows: list) -> str:
    cols = list(zip(header, *rows))
    width = [max(len(str(v)) for v in col) for col in cols]

    def line(r) -> str:
        return "| " + " | ".join(f"{str(v):<{w}}" for v, w in zip(r, width)) + " |"
    return "\n".join([line(header), "|" + "|".join("-" * (w + 2) for w in width) + "|"] + [line(r) for r in rows])


def summary_of(run: Path) -> dict:
    path = Path(run) / "summary.json"
    if not path.is_file():
        raise ConfigError(f"{run} has no summary.json (the run did not finish)")
    return json.loads(path.read_text())


def compare_table(runs: list[Path]) -> str:
    """One row per run, under the teacher probe's held-out macro-F1 (from the first run's store)."""
    rows, fresh = [], None
    for run in runs:
        s = summary_of(run)
        e = json.loads((run / "eval.json").read_text()) if (run / "eval.json").is_file() else None
        fresh = fresh or (e and e["num_images"])
        rows.append((run.name, s["student"], s.get("steps", "-"), f3(s.get("val_macro_f1")),
                     f3(e["macro_f1"]) if e else "-", f"{s['size_mb']:.2f}"))
    teacher = summary_of(runs[0]).get("teacher_probe_val_macro_f1")
    rows.insert(0, ("teacher probe", "-", "-", f3(teacher), "-", "-"))
    return md_table(["run", "student", "optimizer steps", "held-out macro-F1",
                     f"macro-F1 on {fresh or 'fresh'} fresh images", "MB"], rows)


def report_table(run: Path, eval_json: str | None = None) -> str:
    s = summary_of(run)
    if eval_json is None and (Path(run) / "eval.json").is_file():
        eval_json = str(Path(run) / "eval.json")
    rows = [("student", s["student"]),
            ("teacher probe macro-F1 (cross-validated)", f3(s.get("teacher_probe_cv_macro_f1"))),
            ("teacher probe macro-F1 (held-out)", f3(s.get("teacher_probe_val_macro_f1"))),
            ("student macro-F1 (held-out, from store)", f3(s.get("val_macro_f1")))]
    if eval_json:
        e = json.loads(Path(eval_json).read_text())
        rows.append((f"student macro-F1 (grader eval, {e['num_images']} images)", f3(e["macro_f1"])))
    rows += [("student.pt size (MB)", f"{s['size_mb']:.2f}"), ("time per epoch (s)", f"{s['seconds_per_epoch']:.1f}"),
             ("training samples/s", f"{s['samples_per_s']:.0f}"), ("best epoch", str(s["best_epoch"])),
             ("optimizer steps", str(s.get("steps", "-")))]
    return md_table(["", "value"], rows)


def f3(v) -> str:
    return "-" if v is None else f"{v:.3f}"
