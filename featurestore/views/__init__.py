"""The view contract shared by the builder and the trainer.

A view is a pure function of (source image, params, output size). Params of view k of image i
are drawn from (seed, i, k) alone; view 0 is canonical (full box, nothing else). Rendering order:
crop + resize (antialiased) -> hflip -> vflip -> rot90 -> colour -> mix. The crop box is in
normalised [0, 1] coordinates, so the teacher rendering at 448 px from the original file and the
student rendering at 224 px from the stored S x S image see the same region.

Mixing partners are images of the same store chunk and the same group (labelled training,
held-out, unlabelled), so whoever holds a chunk can render all its views, a held-out image never
leaks into a training view, and a mixed labelled view always has two labels.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from featurestore.common.devices import caps_of
from featurestore.views.resize import resize

PARAM_NAMES = (
    "y0", "x0", "y1", "x1",                 # crop box, normalised
    "hflip", "vflip", "rot90",              # 0/1, 0/1, quarter turns 0..3
    "brightness", "contrast", "saturation", "hue",   # factors (1 = identity), hue in turns
    "mix_partner", "mix_lambda", "mix_mode",         # image index or -1, weight of this image, MIX_*
    "mix_y0", "mix_x0", "mix_y1", "mix_x1", # cutmix box taken from the partner, normalised
)
COL = {name: i for i, name in enumerate(PARAM_NAMES)}
MIX_NONE, MIX_MIXUP, MIX_CUTMIX = 0, 1, 2
_INTERP = ("bilinear", "bicubic", "nearest")


def canonical_params() -> np.ndarray:
    p = np.zeros(len(PARAM_NAMES), dtype=np.float32)
    p[[COL["y1"], COL["x1"], COL["brightness"], COL["contrast"], COL["saturation"], COL["mix_lambda"]]] = 1
    p[COL["mix_partner"]] = -1
    return p


def sample_view(policy, i: int, k: int, partners: np.ndarray) -> np.ndarray:
    """Params (P,) of view k of image i; `partners` are the images it may mix with (sorted, not i)."""
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
    if len(partners) and rng.random() < policy.mix_prob:
        p[COL["mix_partner"]] = partners[int(rng.integers(0, len(partners)))]
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


def mixing_groups(split: np.ndarray) -> np.ndarray:
    """Each store image's mixing group: labelled training, held-out and unlabelled images apart."""
    return np.where(split >= 0, 0, split)


def partners(groups: np.ndarray, start: int) -> list[np.ndarray]:
    """For the images [start, start + len(groups)) of one store chunk, the images each may mix with:
    the others of its group in the chunk."""
    others = np.arange(len(groups))
    return [start + np.flatnonzero((groups == g) & (others != j)) for j, g in enumerate(groups)]


def sample_params(policy, start: int, stop: int, groups: np.ndarray) -> np.ndarray:
    """Params (stop-start, K, P) for the images [start, stop) of one store chunk.

    groups (stop-start,): each image's group; partners are the other images of its group here.
    """
    out = np.empty((stop - start, policy.views, len(PARAM_NAMES)), dtype=np.float32)
    for j, mates in enumerate(partners(groups, start)):
        for k in range(policy.views):
            out[j, k] = sample_view(policy, start + j, k, mates)
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
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    batched: bool | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Render views as float (V, 3, size, size): in [0, 1], or normalised if mean/std are given.
    out: a float32 (V, 3, size, size) tensor on the device to render into (a reused buffer).

    sources: uint8 images (3, H, W) of any sizes, or one (N, 3, H, W) tensor, on the target device.
    index: (V,) which source each view is cut from. params: (V, P).
    partner_index: (V,) source holding each view's mix partner (-1 for none); needed when mixing.
    Geometry runs per view on uint8 (crop, resize, flips, rot90); colour is one affine map per
    view, clamped once; normalisation is folded into that map. batched: the colour map as one
    batched kernel (default on GPUs) rather than per view (default on CPUs); both give the same result.
    `batch_render.render_batch` renders one (N, 3, H, W) tensor of sources with the geometry batched too.
    """
    device = sources.device if isinstance(sources, torch.Tensor) else sources[0].device
    host = params.detach().to("cpu", torch.float32)           # control flow reads params on the host
    params = params.to(device=device, dtype=torch.float32)     # colour maths runs where the pixels are
    if interpolation not in _INTERP:
        raise ValueError(f"interpolation must be one of {_INTERP}, got {interpolation!r}")
    mode = interpolation
    if batched is None:
        batched = caps_of(device).batched_kernels
    crops = [_geometry(sources[int(s)], host[v], size, mode) for v, s in enumerate(index.tolist())]
    # per view on a CPU, each crop becomes float once, in its place in `out`, and is summed there:
    # float32 sums of integers stay exact while every partial sum is below 2**24, in any order
    in_place = not batched and 255 * size * size < 2 ** 24
    if in_place:
        out = _out(out, len(crops), size, device)
        for o, c in zip(out, crops):
            o.copy_(c)
        sums = out.sum(dim=(2, 3))                                                         # (V, 3)
    else:
        exact = torch.int32 if 255 * size * size < 2 ** 31 else torch.int64              # integer sums are exact
        sums = torch.stack([c.sum(dim=(1, 2), dtype=exact) for c in crops]).double().float()  # (V, 3)
    m, t, lo, hi = colour_map(sums, params, size, mean, std)
    if in_place:
        _colour_in_place(out, m, t, lo, hi)
    else:
        out = apply_colour(crops, m, t, lo, hi, per_view=not batched, out=out)           # (V, 3, size, size)
    if (host[:, COL["mix_mode"]].round() != MIX_NONE).any():
        if partner_index is None:
            raise ValueError("views mix with partners but no partner_index was given")
        out = _mix(out, sources, partner_index.cpu(), host, size, mode, torch.tensor(lo), torch.tensor(hi))
    return out


def colour_map(sums: torch.Tensor, params: torch.Tensor, size: int, mean, std):
    """Each view's colour jitter and normalisation as one map on uint8 levels, x -> m x + t ((V, 3, 3),
    (V, 3)), and the bounds of [0, 1] after it; sums (V, 3): each crop's channel sums, size x size pixels."""
    mean_gray = sums @ torch.tensor(_GRAY, device=sums.device) / (255.0 * size * size)     # (V,)
    m, t = colour_affine(mean_gray, params[:, COL["brightness"]], params[:, COL["contrast"]],
                         params[:, COL["saturation"]], params[:, COL["hue"]])             # (V,3,3), (V,3)
    m = m / 255.0
    if mean is None:
        return m, t, [0.0] * 3, [1.0] * 3
    sd = torch.tensor(std, device=m.device)
    m, t = m / sd.view(1, 3, 1), (t - torch.tensor(mean, device=m.device)) / sd
    return m, t, [(0.0 - mu) / s for mu, s in zip(mean, std)], [(1.0 - mu) / s for mu, s in zip(mean, std)]


def _out(out: torch.Tensor | None, v: int, r: int, device: torch.device) -> torch.Tensor:
    """The float32 (V, 3, R, R) tensor to render into: the caller's, checked, or a new one."""
    if out is None:
        return torch.empty(v, 3, r, r, device=device)
    if out.shape != (v, 3, r, r) or out.dtype != torch.float32 or out.device != device:
        raise ValueError(f"out must be float32 {(v, 3, r, r)} on {device}, got {out.dtype} {tuple(out.shape)} "
                         f"on {out.device}")
    return out


def _colour_in_place(x: torch.Tensor, m: torch.Tensor, t: torch.Tensor, lo: list[float], hi: list[float]) -> None:
    """x[i] <- clamp(m[i] @ x[i] + t[i]) per view of float (V, 3, R, R), through one scratch view
    that stays in cache."""
    scratch = torch.empty(3, x.shape[-1] * x.shape[-2], device=x.device)
    for i in range(len(x)):
        o = x[i].view(3, -1)
        torch.addmm(t[i].unsqueeze(-1), m[i], o, out=scratch)
        for ch in range(3):                                                      # scalar bounds: a fast kernel
            torch.clamp(scratch[ch], lo[ch], hi[ch], out=o[ch])


def apply_colour(crops: list[torch.Tensor] | torch.Tensor, m: torch.Tensor, t: torch.Tensor, lo: list[float],
                  hi: list[float], per_view: bool, out: torch.Tensor | None = None) -> torch.Tensor:
    """clamp(m @ crop + t) for each crop (3, R, R) of whole levels (uint8, or float as one (V, 3, R, R)
    tensor). Per view on a CPU (the crop stays in cache); as one batched kernel on a GPU (few large
    launches beat many small ones)."""
    v, r = len(crops), crops[0].shape[-1]
    out = _out(out, v, r, m.device)
    if not per_view:
        x = (crops if isinstance(crops, torch.Tensor) else torch.stack(crops)).float().reshape(v, 3, -1)
        torch.baddbmm(t.unsqueeze(-1), m, x, out=out.view(v, 3, -1))
        return torch.clamp(out, out.new_tensor(lo).view(1, 3, 1, 1), out.new_tensor(hi).view(1, 3, 1, 1), out=out)
    for i, crop in enumerate(crops):
        o = out[i].view(3, -1)
        torch.addmm(t[i].unsqueeze(-1), m[i], crop.reshape(3, -1).float(), out=o)
        for ch in range(3):                                                      # scalar bounds: a fast kernel
            o[ch].clamp_(lo[ch], hi[ch])
    return out


def _geometry(img: torch.Tensor, p: torch.Tensor, size: int, mode) -> torch.Tensor:
    """uint8 (3, H, W) -> uint8 (3, size, size): crop + resize, hflip, vflip, rot90."""
    x = _crop_resize(img, p[:4], size, mode)
    hflip, vflip, rot = (int(round(float(v))) for v in p[COL["hflip"]:COL["rot90"] + 1])
    if hflip:
        x = x.flip(-1)
    if vflip:
        x = x.flip(-2)
    if rot:
        x = torch.rot90(x, rot, dims=(-2, -1))
    return x.contiguous()                     # channels-first in memory, whatever the source layout


def _crop_resize(img: torch.Tensor, box: torch.Tensor, size: int, mode) -> torch.Tensor:
    """uint8 (3, H, W) -> uint8 (3, size, size); the box is snapped to whole source pixels."""
    h, w = img.shape[-2:]
    y0, x0, y1, x1 = box.tolist()
    top, left = min(int(round(y0 * h)), h - 1), min(int(round(x0 * w)), w - 1)
    bottom, right = max(int(round(y1 * h)), top + 1), max(int(round(x1 * w)), left + 1)
    crop = img[:, top:bottom, left:right]
    if crop.shape[-2:] == (size, size):
        return crop
    return resize(crop, size, mode)


_GRAY = (0.299, 0.587, 0.114)        # sums to 1: gray stays gray under saturation and hue
# RGB <-> YIQ: hue rotates the (I, Q) chroma plane
_YIQ = torch.tensor([[0.299, 0.587, 0.114], [0.595716, -0.274453, -0.321263], [0.211456, -0.522591, 0.311135]])
# inverted once, here on the CPU: every device renders with the same matrix, and render threads never
# call CUDA linear algebra (its lazily loaded library is not thread-safe on first use, pytorch#90613)
_YIQ_INV = torch.linalg.inv(_YIQ)


def colour_affine(mean_gray, brightness, contrast, saturation, hue):
    """Per-view colour jitter as one affine map x -> M x + t on RGB in [0, 1].

    brightness b: x * b; contrast c: blend with the view's mean gray m (after brightness, b * m);
    saturation s: blend with the pixel's gray; hue h: rotate chroma in YIQ by 2 pi h turns.
    Saturation and hue keep gray fixed (gray weights sum to 1), so
    M = c b H S,  t = (1 - c) b m (1, 1, 1).   Shapes: (V,) in, (V, 3, 3) and (V, 3) out.
    """
    v, dev = len(brightness), brightness.device
    w = torch.tensor(_GRAY, device=dev)
    eye = torch.eye(3, device=dev).expand(v, 3, 3)
    s = saturation.view(-1, 1, 1)
    sat = s * eye + (1 - s) * w.view(1, 1, 3).expand(v, 3, 3)                 # each row: s e_i + (1-s) w
    yiq = _YIQ.to(dev)
    theta = hue * 2 * math.pi
    rot = torch.zeros(v, 3, 3, device=dev)
    rot[:, 0, 0] = 1
    rot[:, 1, 1], rot[:, 1, 2], rot[:, 2, 1], rot[:, 2, 2] = theta.cos(), -theta.sin(), theta.sin(), theta.cos()
    hue_m = _YIQ_INV.to(dev) @ rot @ yiq
    m = (contrast * brightness).view(-1, 1, 1) * (hue_m @ sat)
    t = ((1 - contrast) * brightness * mean_gray).view(-1, 1).expand(v, 3)
    return m, t


def adjust_colour(x: torch.Tensor, brightness, contrast, saturation, hue) -> torch.Tensor:
    """Colour jitter on float (V, 3, H, W) in [0, 1], clamped once; factor 1 / hue 0 is identity."""
    mean_gray = torch.einsum("c,vchw->v", x.new_tensor(_GRAY), x) / (x.shape[-1] * x.shape[-2])
    m, t = colour_affine(mean_gray, brightness.float(), contrast.float(), saturation.float(), hue.float())
    out = torch.baddbmm(t.unsqueeze(-1), m, x.reshape(len(x), 3, -1)).view_as(x)
    return out.clamp_(0, 1)


def _mix(x, sources, partner_index, params, size, mode, lo, hi):
    """Mix each mixed view with its partner's canonical view, in the same value space as x."""
    scale, shift = (hi - lo).to(x).view(3, 1, 1), lo.to(x).view(3, 1, 1)     # [0, 1] -> x's space
    partners = {}
    for s in partner_index[partner_index >= 0].unique().tolist():
        full = torch.tensor([0.0, 0.0, 1.0, 1.0])
        partners[s] = _crop_resize(sources[int(s)], full, size, mode).float().div_(255) * scale + shift
    out = x                                   # in place: view v reads only itself and its partner
    for v in torch.nonzero(params[:, COL["mix_mode"]].round() != MIX_NONE).flatten().tolist():
        p = partners[int(partner_index[v])]
        if int(round(float(params[v, COL["mix_mode"]]))) == MIX_MIXUP:
            lam = float(params[v, COL["mix_lambda"]])
            out[v] = lam * x[v] + (1 - lam) * p
        else:
            y0, x0, y1, x1 = (round(float(params[v, COL[c]]) * size) for c in ("mix_y0", "mix_x0", "mix_y1", "mix_x1"))
            out[v, :, y0:y1, x0:x1] = p[:, y0:y1, x0:x1]
    return out
