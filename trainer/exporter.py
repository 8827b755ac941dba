"""Export: TorchScript `student.pt` (what the grader loads), optional ONNX, and a sidecar JSON; and
`trainer export`, which exports a finished run's best student again without the store."""
from __future__ import annotations

import hashlib
import io
import json
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from featurestore.errors import KdstoreError
from featurestore.options import ConfigError
from featurestore.untrusted import load_yaml, read_json
from trainer.checkpoints import load as load_checkpoint
from trainer.checkpoints import write_bytes_atomic, write_text_atomic
from trainer.run_folder import BEST
from trainer.students import IMAGENET_MEAN as GRADER_MEAN
from trainer.students import IMAGENET_STD as GRADER_STD
from trainer.students import create_student, spec_of


class ExportError(KdstoreError, RuntimeError):
    """The export failed a check (size budget, numerical agreement)."""


class Renormalize(nn.Module):
    """Input normalised with the grader's mean/std -> normalised with the student's own."""

    def __init__(self, student: nn.Module, mean, std):
        super().__init__()
        self.student = student
        own_mean, own_std = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
        grader_mean, grader_std = torch.tensor(GRADER_MEAN).view(1, 3, 1, 1), torch.tensor(GRADER_STD).view(1, 3, 1, 1)
        self.register_buffer("scale", grader_std / own_std)                     # x * scale + shift
        self.register_buffer("shift", (grader_mean - own_mean) / own_std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.student(x * self.scale + self.shift)


def for_the_grader(student: nn.Module, mean, std) -> nn.Module:
    """The student as the grader feeds it (ImageNet mean/std): itself, or behind a Renormalize where its
    own normalisation differs."""
    student = student.eval().cpu().float()
    if tuple(mean) == GRADER_MEAN and tuple(std) == GRADER_STD:
        return student
    return Renormalize(student, mean, std).eval()


def export_torchscript(student: nn.Module, path: Path, sidecar: dict, max_mb: float = 25.0,
                       mean=GRADER_MEAN, std=GRADER_STD) -> Path:
    """Script (or trace, where scripting fails) the student, taking input as the grader normalises it
    (mean/std: the student's own); refuse files over max_mb (10^6 bytes)."""
    student = for_the_grader(student, mean, std)
    bad = [k for k, v in student.state_dict().items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise ExportError(f"the student has non-finite weights ({', '.join(bad[:3])}); nothing exported")
    size = sidecar["input_size"][-1]
    example = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    warnings.filterwarnings("ignore", message=r"`torch\.jit\.\w+` is deprecated", category=FutureWarning)
    try:
        scripted = torch.jit.script(student)      # the grader loads TorchScript with torch.jit.load
    except Exception:  # noqa: BLE001 - not every timm model scripts; tracing covers the rest
        scripted = torch.jit.trace(student, example, check_trace=False)
    with torch.no_grad():
        for shape in (example, torch.randn(1, 3, size + 32, size + 32)):
            ref, got = student(shape), scripted(shape)
            if not torch.allclose(ref, got, atol=1e-4, rtol=1e-4):
                worst = float((ref - got).abs().max())
                raise ExportError(f"TorchScript output differs from the eager model (max {worst:.2e})")
    path = Path(path)
    buf = io.BytesIO()
    torch.jit.save(scripted, buf)
    mb = buf.getbuffer().nbytes / 1e6
    if mb > max_mb:
        raise ExportError(f"{path.name} would be {mb:.2f} MB, over the budget of {max_mb} MB (--max-mb); "
                          "choose a smaller student")
    write_bytes_atomic(buf.getbuffer(), path)
    sidecar = sidecar | {"mean": list(GRADER_MEAN), "std": list(GRADER_STD), "format": "torchscript", "size_mb": mb,
                         "sha256": hashlib.sha256(buf.getbuffer()).hexdigest()}
    write_text_atomic(json.dumps(sidecar, indent=2), path.with_suffix(".json"))
    return path


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def sidecar_check(model: Path, sidecar: dict | None) -> str:
    """"matches" when the sidecar (student.json) was written for exactly this file, "differs" when it
    was written for another (the file was replaced or edited since), "unknown" when it cannot tell."""
    if not sidecar or not sidecar.get("sha256"):
        return "unknown"
    return "matches" if file_sha256(model) == sidecar["sha256"] else "differs"


def export_onnx(student: nn.Module, path: Path, size: int, mean=GRADER_MEAN, std=GRADER_STD) -> Path:
    """ONNX with a dynamic batch axis, input as the grader normalises it, checked against onnxruntime."""
    import onnxruntime as ort

    student = for_the_grader(student, mean, std)
    x = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(0))
    buf = io.BytesIO()
    torch.onnx.export(student, (x,), buf, input_names=["input"], output_names=["logits"],
                      dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}}, opset_version=17, dynamo=False)
    session = ort.InferenceSession(buf.getvalue(), providers=["CPUExecutionProvider"])
    got = session.run(None, {"input": x.numpy()})[0]
    with torch.no_grad():
        ref = student(x).numpy()
    if not np.allclose(ref, got, atol=1e-4, rtol=1e-3):
        raise ExportError(f"ONNX output differs from the eager model (max {np.abs(ref - got).max():.2e})")
    write_bytes_atomic(buf.getbuffer(), Path(path))
    return Path(path)


def export_run(run: Path, fmt: str, max_mb: float) -> Path:
    best, sidecar_path, config = run / BEST, run / "student.json", run / "config.yaml"
    for p in (best, sidecar_path, config):
        if not p.is_file():
            raise ConfigError(f"{run} is not a finished run ({p.name} is missing)")
    sidecar = read_json(sidecar_path, f"it is written by `trainer fit`; {run} cannot be exported without it")
    cfg = load_yaml(config)
    student = create_student(cfg["student"], len(sidecar["classes"]))
    student.load_state_dict(load_checkpoint(best)["student"])
    spec = spec_of(cfg["student"])
    if fmt == "onnx":
        return export_onnx(student, run / "student.onnx", sidecar["input_size"][-1], spec.mean, spec.std)
    keep = {k: v for k, v in sidecar.items() if k not in ("format", "size_mb", "mean", "std", "sha256")}
    return export_torchscript(student, run / "student.pt", keep, max_mb, spec.mean, spec.std)
