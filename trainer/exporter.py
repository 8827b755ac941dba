"""Export: TorchScript `student.pt` (what the grader loads), optional ONNX, and a sidecar JSON."""
from __future__ import annotations

import io
import json
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from featurestore.errors import KdstoreError
from trainer.checkpoints import write_bytes_atomic, write_text_atomic


class ExportError(KdstoreError, RuntimeError):
    """The export failed a check (size budget, numerical agreement)."""


def export_torchscript(student: nn.Module, path: Path, sidecar: dict, max_mb: float = 25.0) -> Path:
    """Script (or trace, where scripting fails) the student; refuse files over max_mb (10^6 bytes)."""
    student = student.eval().cpu().float()
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
                raise ExportError(f"TorchScript output differs from the eager model (max {float((ref - got).abs().max()):.2e})")
    path = Path(path)
    buf = io.BytesIO()
    torch.jit.save(scripted, buf)
    mb = buf.getbuffer().nbytes / 1e6
    if mb > max_mb:
        raise ExportError(f"{path.name} would be {mb:.2f} MB, over the budget of {max_mb} MB (--max-mb); "
                          "choose a smaller student")
    write_bytes_atomic(buf.getbuffer(), path)
    write_text_atomic(json.dumps(sidecar | {"format": "torchscript", "size_mb": mb}, indent=2), path.with_suffix(".json"))
    return path


def export_onnx(student: nn.Module, path: Path, size: int) -> Path:
    """ONNX with a dynamic batch axis, checked against onnxruntime."""
    import onnxruntime as ort

    student = student.eval().cpu().float()
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
