"""The renderer's resize: torchvision's v2 `resize` of an image tensor with antialiasing, value for value
(a test compares the two), written here so that building a store does not load torchvision."""
from __future__ import annotations

import platform

import torch
import torch.nn.functional as F


def resize(img: torch.Tensor, size: int, mode: str) -> torch.Tensor:
    """(C, H, W) -> (C, size, size) with antialiasing, the value torchvision's v2 `resize` gives: uint8
    resized natively on a CPU where torch has a uint8 kernel (bilinear with AVX2/AVX-512 or on ARM,
    bicubic), otherwise through float32, clamped (bicubic) and rounded back."""
    c, h, w = img.shape
    if (h, w) == (size, size):
        return img
    native = img.dtype != torch.uint8 or mode == "nearest" or (img.device.type == "cpu" and _native_uint8(mode))
    x = img.reshape(1, c, h, w)
    if x.is_contiguous(memory_format=torch.channels_last) and x.numel() != x.stride(0):
        # a (1, C, H, W) view of channels-last pixels: restrided so that interpolate keeps the layout (and
        # takes its uint8 fast path), pytorch#68430
        x = x.as_strided((1, c, h, w), (x.numel(), *x.stride()[1:]))
    y = F.interpolate(x if native else x.float(), size=[size, size], mode=mode,
                      align_corners=None if mode == "nearest" else False, antialias=mode != "nearest")
    if not native:
        if mode == "bicubic":
            y = y.clamp_(0, 255)
        y = y.round_().to(torch.uint8)
    return y.reshape(c, size, size)


def _native_uint8(mode: str) -> bool:
    """Whether torch resizes uint8 natively on this CPU (as torchvision decides)."""
    if mode == "bilinear":
        return torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512") or platform.machine() in ("aarch64",
                                                                                                      "arm64")
    return mode == "bicubic"
