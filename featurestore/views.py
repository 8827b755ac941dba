"""The view contract shared by the builder and the trainer.

A view is a pure function of (source image, params, output size). Params of view k of image i
are drawn from (seed, i, k) alone; view 0 is canonical (full box, nothing else). Rendering order:
crop + resize (antialiased) -> hflip -> vflip -> rot90 -> colour -> mix. The crop box is in
normalised [0, 1] coordinates, so the teacher rendering at 448 px from the original file and the
student rendering at 224 px from the stored S x S image see the same region.

Mixing partners are images of the same chunk, so whoever holds a chunk can render all its views.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

PARAM_NAMES = (
    "y0", "x0", "y1", "x1",                 # crop box, normalised
    "hflip", "vflip", "rot90",              # 0/1, 0/1, quarter turns 0..3
    "brightness", "contrast", "saturation", "hue",   # factors (1 = identity), hue in turns
    "mix_partner", "mix_lambda", "mix_mode",         # image index or -1, weight of this image, MIX_*
    "mix_y0", "mix_x0", "mix_y1", "mix_x1", # cutmix box taken from the partner, normalised
)
COL = {name: i for i, name in enumerate(PARAM_NAMES)}
MIX_NONE, MIX_MIXUP, MIX_CUTMIX = 0, 1, 2
_INTERP = {"bilinear": InterpolationMode.BILINEAR, "bicubic": InterpolationMode.BICUBIC,
           "nearest": InterpolationMode.NEAREST}


def canonical_params() -> np.ndarray:
    p = np.zeros(len(PARAM_NAMES), dtype=np.float32)
    p[[COL["y1"], COL["x1"], COL["brightness"], COL["contrast"], COL["saturation"], COL["mix_lambda"]]] = 1
    p[COL["mix_partner"]] = -1
    return p


def sample_view(policy, i: int, k: int, chunk: tuple[int, int]) -> np.ndarray:
    """Params (P,) of view k of image i; `chunk` = (start, stop) of the chunk holding image i."""
    p = canonical_params()
    if k == 0:
        return p
    rng = np.random.default_rng([policy.seed, i, k])
    p[:4] = _sample_box(rng, policy.scale, policy.ratio)
    p[COL["hflip"]] = rng.random() < policy.hflip
    p[COL["vflip"]] = rng.random() < policy.vflip
    p[COL["rot90"]] = rng.integers(1, 4) if rng.random() < policy.rot90 else 0
    for name in ("brightness", "contrast", "saturation"):
        s = getattr(policy, name)
        p[COL[name]] = rng.uniform(1 - s, 1 + s)
    p[COL["hue"]] = rng.uniform(-policy.hue, policy.hue)
    start, stop = chunk
    if stop - start > 1 and rng.random() < policy.mix_prob:
        j = start + int(rng.integers(0, stop - start - 1))
        p[COL["mix_partner"]] = j + (j >= i)            # any other image of the chunk
        lam = float(rng.beta(policy.mixup_alpha, policy.mixup_alpha))
        if rng.random() < policy.cutmix_share:
            y0, y1, x0, x1 = _cut_box(rng.random(), rng.random(), lam)
            lam = 1.0 - (y1 - y0) * (x1 - x0)           # exact area kept from this image
            p[COL["mix_mode"]] = MIX_CUTMIX
            p[[COL["mix_y0"], COL["mix_x0"], COL["mix_y1"], COL["mix_x1"]]] = (y0, x0, y1, x1)
        else:
            p[COL["mix_mode"]] = MIX_MIXUP
        p[COL["mix_lambda"]] = lam
    return p


def sample_params(policy, start: int, stop: int, chunk_size: int, num_images: int) -> np.ndarray:
    """Params (stop-start, K, P) for images [start, stop) of a store of num_images."""
    out = np.empty((stop - start, policy.views, len(PARAM_NAMES)), dtype=np.float32)
    for i in range(start, stop):
        c0 = (i // chunk_size) * chunk_size
        bounds = (c0, min(c0 + chunk_size, num_images))
        for k in range(policy.views):
            out[i - start, k] = sample_view(policy, i, k, bounds)
    return out


def _sample_box(rng: np.random.Generator, scale, ratio) -> np.ndarray:
    """RandomResizedCrop's box, normalised, in the squashed square frame the grader uses."""
    log_r = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        area = rng.uniform(*scale)
        r = math.exp(rng.uniform(*log_r))
        w, h = math.sqrt(area * r), math.sqrt(area / r)
        if w <= 1 and h <= 1:
            y0, x0 = rng.uniform(0, 1 - h), rng.uniform(0, 1 - w)
            return np.array([y0, x0, y0 + h, x0 + w], dtype=np.float32)
    return np.array([0, 0, 1, 1], dtype=np.float32)


def _cut_box(cy: float, cx: float, lam: float) -> tuple[float, float, float, float]:
    side = math.sqrt(1.0 - lam)
    y0, y1 = max(cy - side / 2, 0.0), min(cy + side / 2, 1.0)
    x0, x1 = max(cx - side / 2, 0.0), min(cx + side / 2, 1.0)
    return y0, y1, x0, x1


def render(
    sources: Sequence[torch.Tensor] | torch.Tensor,
    index: torch.Tensor,
    params: torch.Tensor,
    size: int,
    interpolation: str = "bilinear",
    partner_index: torch.Tensor | None = None,
) -> torch.Tensor:
    """Render views as float (V, 3, size, size) in [0, 1].

    sources: uint8 images (3, H, W) of any sizes, or one (N, 3, H, W) tensor, on the target device.
    index: (V,) which source each view is cut from. params: (V, P).
    partner_index: (V,) source holding each view's mix partner (-1 for none); needed when mixing.
    """
    params = params.to(device=index.device, dtype=torch.float32)
    mode = _INTERP[interpolation]
    crops = [_crop_resize(sources[int(s)], params[v, :4], size, mode) for v, s in enumerate(index.tolist())]
    x = torch.stack(crops).float().div_(255)                             # (V, 3, size, size)
    x = torch.where(params[:, COL["hflip"], None, None, None] > 0.5, x.flip(-1), x)
    x = torch.where(params[:, COL["vflip"], None, None, None] > 0.5, x.flip(-2), x)
    rot = params[:, COL["rot90"]].round().long()
    for r in (1, 2, 3):
        m = rot == r
        if m.any():
            x[m] = torch.rot90(x[m], r, dims=(-2, -1))
    x = adjust_colour(x, params[:, COL["brightness"]], params[:, COL["contrast"]],
                      params[:, COL["saturation"]], params[:, COL["hue"]])
    mixed = params[:, COL["mix_mode"]].round().long()
    if (mixed != MIX_NONE).any():
        if partner_index is None:
            raise ValueError("views mix with partners but no partner_index was given")
        x = _mix(x, sources, partner_index, params, size, mode)
    return x


def _crop_resize(img: torch.Tensor, box: torch.Tensor, size: int, mode) -> torch.Tensor:
    """uint8 (3, H, W) -> uint8 (3, size, size); the box is snapped to whole source pixels."""
    h, w = img.shape[-2:]
    y0, x0, y1, x1 = box.tolist()
    top, left = min(int(round(y0 * h)), h - 1), min(int(round(x0 * w)), w - 1)
    bottom, right = max(int(round(y1 * h)), top + 1), max(int(round(x1 * w)), left + 1)
    crop = img[:, top:bottom, left:right]
    if crop.shape[-2:] == (size, size):
        return crop
    return TF.resize(crop, [size, size], interpolation=mode, antialias=True)


_GRAY = (0.299, 0.587, 0.114)
# RGB <-> YIQ: hue rotates the (I, Q) chroma plane
_YIQ = torch.tensor([[0.299, 0.587, 0.114], [0.595716, -0.274453, -0.321263], [0.211456, -0.522591, 0.311135]])


def adjust_colour(x: torch.Tensor, brightness, contrast, saturation, hue) -> torch.Tensor:
    """Per-sample colour jitter on float (V, 3, H, W) in [0, 1]; factor 1 / hue 0 is identity."""
    def col(v):
        return v.to(x.dtype).view(-1, 1, 1, 1)
    gray_w = x.new_tensor(_GRAY).view(1, 3, 1, 1)
    x = (x * col(brightness)).clamp_(0, 1)
    mean = (x * gray_w).sum(1, keepdim=True).mean((-2, -1), keepdim=True)     # (V, 1, 1, 1)
    x = ((x - mean) * col(contrast) + mean).clamp_(0, 1)
    gray = (x * gray_w).sum(1, keepdim=True)                                   # (V, 1, H, W)
    x = ((x - gray) * col(saturation) + gray).clamp_(0, 1)
    if bool((hue != 0).any()):
        yiq_m = _YIQ.to(x)
        theta = hue.to(x.dtype) * 2 * math.pi
        cos, sin = theta.cos(), theta.sin()
        rot = torch.zeros(len(x), 3, 3, dtype=x.dtype, device=x.device)        # (V, 3, 3)
        rot[:, 0, 0] = 1
        rot[:, 1, 1], rot[:, 1, 2], rot[:, 2, 1], rot[:, 2, 2] = cos, -sin, sin, cos
        m = torch.linalg.inv(yiq_m) @ rot @ yiq_m                               # RGB -> RGB
        x = torch.einsum("vij,vjhw->vihw", m, x).clamp_(0, 1)
    return x


def _mix(x, sources, partner_index, params, size, mode):
    partners = {}
    for s in partner_index[partner_index >= 0].unique().tolist():
        full = torch.tensor([0.0, 0.0, 1.0, 1.0])
        partners[s] = _crop_resize(sources[int(s)], full, size, mode).float().div_(255)
    out = x.clone()
    for v in torch.nonzero(params[:, COL["mix_mode"]].round() != MIX_NONE).flatten().tolist():
        p = partners[int(partner_index[v])]
        mode_v = int(round(float(params[v, COL["mix_mode"]])))
        if mode_v == MIX_MIXUP:
            lam = float(params[v, COL["mix_lambda"]])
            out[v] = lam * x[v] + (1 - lam) * p
        else:
            y0, x0, y1, x1 = (round(float(params[v, COL[c]]) * size) for c in ("mix_y0", "mix_x0", "mix_y1", "mix_x1"))
            out[v, :, y0:y1, x0:x1] = p[:, y0:y1, x0:x1]
    return out
