"""`trainer export`: re-export a finished run's best student without the store."""
from __future__ import annotations

import json
from pathlib import Path

import yaml

from featurestore.config import ConfigError
from trainer import checkpoints, export
from trainer.students import create_student


def export_run(run: Path, fmt: str, max_mb: float) -> Path:
    best, sidecar_path, config = run / "checkpoints" / "best.pt", run / "student.json", run / "config.yaml"
    for p in (best, sidecar_path, config):
        if not p.is_file():
            raise ConfigError(f"{run} is not a finished run ({p.name} is missing)")
    sidecar = json.loads(sidecar_path.read_text())
    cfg = yaml.safe_load(config.read_text())
    student = create_student(cfg["student"], len(sidecar["classes"]))
    student.load_state_dict(checkpoints.load(best)["student"])
    if fmt == "onnx":
        return export.export_onnx(student, run / "student.onnx", sidecar["input_size"][-1])
    keep = {k: v for k, v in sidecar.items() if k not in ("format", "size_mb")}
    return export.export_torchscript(student, run / "student.pt", keep, max_mb)
