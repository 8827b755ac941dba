"""The tables a person reads at the end: one run's summary, several runs side by side, markdown."""
from __future__ import annotations

from pathlib import Path

from featurestore.common.options import ConfigError
from featurestore.common.untrusted import read_json


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
    return read_json(path, f"run `trainer fit ... --out {run} --resume` to write it again")


def eval_of(path: Path) -> dict:
    """What `trainer eval --save` wrote."""
    return read_json(path, f"run `trainer eval --model ... --save {path}` to write it again")


def file_state(run: Path, e: dict | None = None) -> str:
    """Whether run/student.pt is the file the run exported (its sidecar's SHA-256), and whether the
    grader-style score in eval.json was taken of that very file."""
    from trainer.evaluate import load_sidecar
    from trainer.exporter import file_sha256, sidecar_check
    model = Path(run) / "student.pt"
    if not model.is_file():
        return "missing"
    state = {"matches": "as exported", "differs": "CHANGED since the export (SHA-256 differs from student.json)",
             "unknown": "not checked (student.json records no SHA-256)"}[sidecar_check(model, load_sidecar(model))]
    if e is not None and e.get("model_sha256") and e["model_sha256"] != file_sha256(model):
        state += "; eval.json scored another file"
    return state


def compare_table(runs: list[Path]) -> str:
    """One row per run, under the teacher probe's held-out macro-F1 (from the first run's store)."""
    rows, fresh = [], None
    for run in runs:
        s = summary_of(run)
        e = eval_of(run / "eval.json") if (run / "eval.json").is_file() else None
        fresh = fresh or (e and e["num_images"])
        state = file_state(run, e)
        name = run.name if state == "as exported" else f"{run.name} (student.pt {state})"
        rows.append((name, s["student"], s.get("steps", "-"), f3(s.get("val_macro_f1")),
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
            (held_out_label(s), f3(s.get("val_macro_f1")))]
    e = eval_of(Path(eval_json)) if eval_json else None
    if e is not None:
        rows.append((f"student macro-F1 (grader eval, {e['num_images']} images)", f3(e["macro_f1"])))
    rows.append(("student.pt", file_state(Path(run), e)))
    rows += [("student.pt size (MB)", f"{s['size_mb']:.2f}"), ("time per epoch (s)", f"{s['seconds_per_epoch']:.1f}"),
             ("training samples/s", f"{s['samples_per_s']:.0f}"), ("best epoch", str(s["best_epoch"])),
             ("optimizer steps", str(s.get("steps", "-")))]
    return md_table(["", "value"], rows)


def held_out_label(s: dict) -> str:
    """What the held-out figure of a summary is: the exported file's score, as the grader scores."""
    if "val_scored" not in s:
        return "student macro-F1 (held-out, from store)"
    note = "" if s.get("val_meaningful", True) else "; too few images to mean much"
    return f"student.pt macro-F1 (held-out, {s['val_images']} images at {s['eval_size']} px, as graded{note})"


def f3(v) -> str:
    return "-" if v is None else f"{v:.3f}"
