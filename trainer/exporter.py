"""Export: `student.pt`, the one TorchScript file the grader loads (and optionally ONNX), with its sidecar
`student.json`; `trainer export`, which exports a finished run again without the store, or several runs
as one ensemble.

What the file runs (`ForTheGrader`) is what `trainer fit` validates every epoch and scores at the end:
the grader's input (any H x W, normalised with ImageNet's mean/std) resized, antialiased, to the
training size where it differs, renormalised to the student's own mean/std, the student (and its
mirror image, averaged, with `--tta flip`), plus a per-class logit bias (a constant, `--calibrate
bias`). Resizing a normalised image equals normalising the resized one (bilinear weights sum to 1), so
a student trained at 64 px sees at 224 px what it saw in training.
"""
from __future__ import annotations

import hashlib
import io
import json
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from featurestore.common.errors import KdstoreError
from featurestore.common.options import ConfigError
from featurestore.common.untrusted import load_yaml, read_json
from trainer.checkpoints import load as load_checkpoint
from trainer.checkpoints import write_bytes_atomic, write_text_atomic
from trainer.run_folder import BEST
from trainer.students import IMAGENET_MEAN as GRADER_MEAN
from trainer.students import IMAGENET_STD as GRADER_STD
from trainer.students import create_student, spec_of

GRADER_SIZE = 224                     # the grader's Resize((224, 224))
TTA = ["none", "flip"]


class ExportError(KdstoreError, RuntimeError):
    """The export failed a check (size budget, numerical agreement)."""


class ForTheGrader(nn.Module):
    """The student as the grader feeds it: x (B, 3, H, W), normalised with ImageNet's mean/std -> (B, C).

    size: the training resolution (x is resized to it, antialiased, where H x W differs); mean/std: the
    student's own normalisation; tta: also run the mirror image and average the logits; bias (C,): added
    to the logits (a per-class threshold shift chosen for macro-F1)."""

    def __init__(self, student: nn.Module, size: int, mean: Sequence[float], std: Sequence[float],
                 num_classes: int, tta: bool = False, bias: Sequence[float] | None = None):
        super().__init__()
        self.student, self.size, self.tta = student, int(size), bool(tta)
        own_mean, own_std = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
        grader_mean, grader_std = torch.tensor(GRADER_MEAN).view(1, 3, 1, 1), torch.tensor(GRADER_STD).view(1, 3, 1, 1)
        self.register_buffer("scale", grader_std / own_std)                     # x * scale + shift
        self.register_buffer("shift", (grader_mean - own_mean) / own_std)
        self.register_buffer("bias", torch.zeros(num_classes) if bias is None else
                             torch.tensor(list(bias), dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2] != self.size or x.shape[-1] != self.size:
            x = F.interpolate(x, size=[self.size, self.size], mode="bilinear", align_corners=False, antialias=True)
        return self.logits(x)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, 3, size, size) at the training size, the grader's normalisation -> (B, C)."""
        x = x * self.scale + self.shift
        logits = self.student(x)                                                # (B, C)
        if self.tta:
            logits = (logits + self.student(x.flip(-1))) / 2
        return logits + self.bias


class Ensemble(nn.Module):
    """Several students as one file: the mean of their logits (each with its own resize, normalisation,
    TTA and bias)."""

    def __init__(self, members: list[nn.Module]):
        super().__init__()
        self.members = nn.ModuleList(members)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([m(x) for m in self.members]).mean(0)


def for_the_grader(student: nn.Module, size: int, mean, std, num_classes: int, tta: bool = False,
                   bias=None) -> ForTheGrader:
    """The eager module student.pt runs (validation runs this very one)."""
    return ForTheGrader(student, size, mean, std, num_classes, tta, bias)


def _scripted(module: ForTheGrader, size: int) -> torch.jit.ScriptModule:
    """TorchScript of the wrapper; a student that does not script (some timm models) is traced at its
    training size inside it, so the resize, TTA and bias stay scripted."""
    warnings.filterwarnings("ignore", message=r"`torch\.jit\.\w+` is deprecated", category=FutureWarning)
    try:
        return torch.jit.script(module)
    except Exception:  # noqa: BLE001 - not every timm model scripts; tracing the student covers the rest
        example = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
        traced = torch.jit.trace(module.student, example, check_trace=False)
        clone = ForTheGrader(traced, module.size, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), len(module.bias), module.tta,
                             module.bias.tolist())
        clone.scale.copy_(module.scale)
        clone.shift.copy_(module.shift)
        return torch.jit.script(clone)


def save_torchscript(module: nn.Module, path: Path, sidecar: dict, max_mb: float, sizes: Sequence[int]) -> Path:
    """Script `module` (a ForTheGrader or an Ensemble), check it against the eager module at the
    grader's size and at each training size, refuse a file over max_mb (10^6 bytes), write it whole with
    its sidecar (which records the file's SHA-256)."""
    module = module.eval().cpu().float()
    bad = [k for k, v in module.state_dict().items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise ExportError(f"the student has non-finite weights ({', '.join(bad[:3])}); nothing exported")
    if isinstance(module, Ensemble):
        scripted = torch.jit.script(Ensemble([_scripted(m, m.size) for m in module.members]))
    else:
        scripted = _scripted(module, module.size)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for side in sorted({GRADER_SIZE, *sizes, max(sizes) + 32}):
            x = torch.randn(2, 3, side, side, generator=g)
            ref, got = module(x), scripted(x)
            if not torch.allclose(ref, got, atol=1e-4, rtol=1e-4):
                worst = float((ref - got).abs().max())
                raise ExportError(f"TorchScript output differs from the eager model at {side} px (max {worst:.2e})")
    buf = io.BytesIO()
    torch.jit.save(scripted, buf)
    mb = buf.getbuffer().nbytes / 1e6
    if mb > max_mb:
        raise ExportError(f"{Path(path).name} would be {mb:.2f} MB, over the budget of {max_mb} MB (--max-mb); "
                          "choose a smaller student" + (" or fewer members" if isinstance(module, Ensemble) else ""))
    write_bytes_atomic(buf.getbuffer(), Path(path))
    sidecar = sidecar | {"mean": list(GRADER_MEAN), "std": list(GRADER_STD), "grader_input": [3, GRADER_SIZE,
                         GRADER_SIZE], "accepts_any_size": True, "format": "torchscript", "size_mb": mb,
                         "sha256": hashlib.sha256(buf.getbuffer()).hexdigest()}
    write_text_atomic(json.dumps(sidecar, indent=2), Path(path).with_suffix(".json"))
    return Path(path)


def export_torchscript(student: nn.Module, path: Path, sidecar: dict, max_mb: float = 25.0,
                       mean=GRADER_MEAN, std=GRADER_STD, tta: bool = False, bias=None) -> Path:
    """student.pt of one student (mean/std: its own; sidecar["input_size"]: its training size)."""
    size = sidecar["input_size"][-1]
    module = for_the_grader(student.eval().cpu().float(), size, mean, std, len(sidecar["classes"]), tta, bias)
    extra = {"resizes_to": size, "tta": "flip" if tta else "none",
             "logit_bias": [float(v) for v in module.bias.tolist()]}
    return save_torchscript(module, path, sidecar | extra, max_mb, [size])


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


class FixedInput(nn.Module):
    """A ForTheGrader for one input side (ONNX has no antialiased resize): the resize to the training side
    as two products with the antialiased bilinear filter's weights, which equal F.interpolate's."""

    def __init__(self, inner: ForTheGrader, side: int = GRADER_SIZE):
        super().__init__()
        from featurestore.views.batch_render import resample_weights
        self.inner = inner
        one = torch.zeros(1, dtype=torch.long)
        self.register_buffer("rows", resample_weights(one, one + side, side, inner.size)[0])   # (size, side)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner.logits(self.rows @ x @ self.rows.T)                                # (B, 3, size, size)


def export_onnx(module: ForTheGrader, path: Path) -> Path:
    """ONNX of the module student.pt runs, taking the grader's [B, 3, 224, 224] (dynamic batch), checked
    against onnxruntime."""
    import onnxruntime as ort

    module = FixedInput(module.eval().cpu().float()).eval()
    x = torch.randn(3, 3, GRADER_SIZE, GRADER_SIZE, generator=torch.Generator().manual_seed(0))
    buf = io.BytesIO()
    torch.onnx.export(module, (x,), buf, input_names=["input"], output_names=["logits"],
                      dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}}, opset_version=18, dynamo=False)
    session = ort.InferenceSession(buf.getvalue(), providers=["CPUExecutionProvider"])
    got = session.run(None, {"input": x.numpy()})[0]
    with torch.no_grad():
        ref = module(x).numpy()
    if not np.allclose(ref, got, atol=1e-4, rtol=1e-3):
        raise ExportError(f"ONNX output differs from the eager model (max {np.abs(ref - got).max():.2e})")
    write_bytes_atomic(buf.getbuffer(), Path(path))
    return Path(path)


def run_module(run: Path) -> tuple[ForTheGrader, dict]:
    """The module a finished run exported (its selected weights, resize, TTA and bias), and its sidecar."""
    best, sidecar_path, config = run / BEST, run / "student.json", run / "config.yaml"
    for p in (best, sidecar_path, config):
        if not p.is_file():
            raise ConfigError(f"{run} is not a finished run ({p.name} is missing)")
    sidecar = read_json(sidecar_path, f"it is written by `trainer fit`; {run} cannot be exported without it")
    cfg = load_yaml(config)
    student = create_student(cfg["student"], len(sidecar["classes"]))
    student.load_state_dict(load_checkpoint(best)["student"])
    spec = spec_of(cfg["student"])
    module = for_the_grader(student.eval(), sidecar["input_size"][-1], spec.mean, spec.std, len(sidecar["classes"]),
                            sidecar.get("tta") == "flip", sidecar.get("logit_bias"))
    return module, sidecar


def export_run(run: Path, fmt: str, max_mb: float) -> Path:
    module, sidecar = run_module(run)
    if fmt == "onnx":
        return export_onnx(module, run / "student.onnx")
    keep = {k: v for k, v in sidecar.items() if k not in ("format", "size_mb", "mean", "std", "sha256",
                                                         "grader_input", "accepts_any_size")}
    return save_torchscript(module, run / "student.pt", keep, max_mb, [module.size])


def export_ensemble(runs: list[Path], out: Path, max_mb: float) -> Path:
    """One TorchScript averaging the students of `runs` (the same classes in the same order)."""
    if len(runs) < 2:
        raise ConfigError("--ensemble takes two or more finished runs")
    members, sidecars = zip(*(run_module(Path(r)) for r in runs))
    classes = sidecars[0]["classes"]
    for run, side in zip(runs[1:], sidecars[1:]):
        if side["classes"] != classes:
            raise ConfigError(f"{run} was trained on other classes (or another class order) than {runs[0]}; an "
                              "ensemble averages logits class by class")
    if Path(out).suffix != ".pt":
        raise ConfigError(f"--out {out}: the ensemble is a TorchScript file ending in .pt")
    sidecar = {"classes": classes, "input_size": [3, GRADER_SIZE, GRADER_SIZE], "ensemble": [str(r) for r in runs],
               "members": [{k: s.get(k) for k in ("student", "input_size", "tta", "logit_bias", "store_digest",
                                                   "sha256")} for s in sidecars]}
    return save_torchscript(Ensemble(list(members)), Path(out), sidecar, max_mb, [m.size for m in members])
