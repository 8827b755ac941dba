"""Device choice and what each device can do, as plain data, so every device-dependent branch is a
function of declared capabilities (and tests can run each branch on a CPU with capabilities mocked).

- Teacher dtype `auto`: bfloat16 on CUDA GPUs with native bfloat16 (compute capability >= 8.0:
  A100, L4, H100, ...), float16 on older CUDA GPUs (T4, V100, P100) and on Apple's mps, float32 on CPU.
- Trainer device `auto`: cuda, then mps, then cpu; mixed precision `auto` follows the dtype rule.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Caps:
    type: str                                 # cuda | mps | cpu
    capability: tuple[int, int] | None = None  # CUDA compute capability

    @property
    def native_bf16(self) -> bool:
        return self.type == "cuda" and self.capability is not None and self.capability >= (8, 0)

    @property
    def half(self) -> str | None:
        """The reduced precision this device runs fast: bf16, fp16, or None (CPU)."""
        if self.native_bf16:
            return "bf16"
        return "fp16" if self.type in ("cuda", "mps") else None

    @property
    def batched_kernels(self) -> bool:
        """Few large launches (GPU) rather than per-view loops that stay in cache (CPU)."""
        return self.type != "cpu"


def caps_of(device: torch.device) -> Caps:
    if device.type == "cuda":
        return Caps("cuda", torch.cuda.get_device_capability(device))
    return Caps(device.type)


def available() -> dict[str, int]:
    mps = getattr(torch.backends, "mps", None)
    return {"cuda": torch.cuda.is_available(), "gpus": torch.cuda.device_count(),
            "mps": bool(mps is not None and mps.is_available())}


def pick_device(name: str = "auto", have: dict[str, bool] | None = None) -> torch.device:
    """auto: cuda (this process's LOCAL_RANK GPU; ranks beyond the GPUs share them round-robin), then
    mps, then cpu; otherwise the named device."""
    if name != "auto":
        return torch.device(name)
    have = available() if have is None else have
    if have.get("cuda"):
        gpus = have.get("gpus") or max(1, torch.cuda.device_count())
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)) % gpus)
    if have.get("mps"):
        return torch.device("mps")
    return torch.device("cpu")


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_HALF = {"bf16": torch.bfloat16, "fp16": torch.float16, None: torch.float32}


def teacher_dtype(name: str, caps: Caps) -> torch.dtype:
    return _HALF[caps.half] if name == "auto" else _DTYPES[name]


def mixed_precision(name: str, caps: Caps) -> str:
    """accelerate's mixed_precision: auto -> bf16 | fp16 | no by the device's capabilities."""
    if name != "auto":
        return name
    return caps.half or "no"
