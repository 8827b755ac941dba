"""The views of a whole batch rendered at once, for GPUs: the trainer's loader there.

`views.render` runs each view's geometry on its own: a crop, an antialiased resize and flips, each a few
small kernels. Here every view's crop and resize is one weight matrix per axis (the flips reverse its
rows), and two batched matrix products apply them all; colour and mixing are batched too. That is
torch's antialiased bilinear resize of the crop, rounded once to whole levels: within one uint8 level of
the per-view route on a CPU (which rounds in fixed point after each axis).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from featurestore.views import COL, MIX_MIXUP, MIX_NONE, apply_colour, canonical_params, colour_map


def render_batch(
    sources: torch.Tensor,
    index: torch.Tensor,
    params: torch.Tensor,
    size: int,
    partner_index: torch.Tensor | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """`views.render` with bilinear resizing, for sources that are one uint8 (N, 3, H, W) tensor."""
    host = params.detach().to("cpu", torch.float32)
    params = params.to(device=sources.device, dtype=torch.float32)
    crops = geometry(sources, index, host, size)                                           # (V, 3, R, R)
    sums = crops.sum(dim=(2, 3), dtype=torch.float64).float()                              # whole levels: exact
    m, t, lo, hi = colour_map(sums, params, size, mean, std)
    out = apply_colour(crops, m, t, lo, hi, per_view=False, out=out)
    mixed = torch.nonzero(host[:, COL["mix_mode"]].round() != MIX_NONE).flatten()
    if len(mixed):
        if partner_index is None:
            raise ValueError("views mix with partners but no partner_index was given")
        _mix(out, sources, partner_index.cpu()[mixed], host[mixed], mixed, size, lo, hi)
    return out


def geometry(sources: torch.Tensor, index: torch.Tensor, host: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 (N, 3, H, W) -> float (V, 3, size, size) of whole uint8 levels: crop + antialiased bilinear
    resize, hflip, vflip, rot90 of every view at once. Columns and rows resample separately, each
    through one weight matrix per view; the flips reverse those matrices' rows."""
    h, w = sources.shape[-2:]
    box = host[:, :4].double()
    top = (box[:, 0] * h).round().clamp(max=h - 1)
    left = (box[:, 1] * w).round().clamp(max=w - 1)
    bottom = torch.maximum((box[:, 2] * h).round(), top + 1)
    right = torch.maximum((box[:, 3] * w).round(), left + 1)
    flips = host[:, COL["hflip"]:COL["vflip"] + 1].round()
    dev = sources.device
    # whole pixels and 0/1 flags, exact in float32: one small copy to the device, weights made there
    geo = torch.stack([top, bottom - top, left, right - left, flips[:, 1], flips[:, 0]], 1).float().to(dev)
    wy = resample_weights(geo[:, 0], geo[:, 1], h, size, geo[:, 4].bool())                  # (V, size, H)
    wx = resample_weights(geo[:, 2], geo[:, 3], w, size, geo[:, 5].bool())                  # (V, size, W)
    x = sources[index.to(dev)].float()                                                      # (V, 3, H, W)
    y = (wy.unsqueeze(1) @ x @ wx.unsqueeze(1).transpose(-1, -2)).round_()                 # (V, 3, size, size)
    rot = host[:, COL["rot90"]].round().long()
    for k in (1, 2, 3):
        sel = torch.nonzero(rot == k).flatten().to(dev)
        if len(sel):
            y[sel] = torch.rot90(y[sel], k, dims=(-2, -1))
    return y


def resample_weights(start: torch.Tensor, length: torch.Tensor, n: int, size: int,
                     flip: torch.Tensor | None = None) -> torch.Tensor:
    """(V, size, n) float32 on start's device: row i holds the weights, over a source axis of n pixels,
    of output pixel i of the crop [start, start + length) resized to `size` by torch's antialiased
    bilinear filter (a triangle, stretched by the scale when shrinking, normalised over the crop's
    pixels); rows reversed where `flip`. start, length: (V,) whole pixels."""
    dev = start.device
    scale = (length.float() / size).view(-1, 1, 1)
    stretch = torch.where(scale >= 1, 1 / scale, torch.ones_like(scale))
    i = torch.arange(size, dtype=torch.float32, device=dev).view(1, -1, 1)
    if flip is not None:
        i = torch.where(flip.view(-1, 1, 1), size - 1 - i, i)
    centre = scale * (i + 0.5)                                                              # (V, size, 1)
    j = torch.arange(n, dtype=torch.float32, device=dev).view(1, 1, -1) - start.float().view(-1, 1, 1)
    weight = (1 - ((j - centre + 0.5) * stretch).abs()).clamp_(min=0)                       # j: crop coordinates
    weight = weight * ((j >= 0) & (j < length.view(-1, 1, 1)))
    return weight / weight.sum(-1, keepdim=True)


def _mix(out: torch.Tensor, sources: torch.Tensor, partner_index: torch.Tensor, host: torch.Tensor,
         mixed: torch.Tensor, size: int, lo: list[float], hi: list[float]) -> None:
    """Mix the views `mixed` of `out` in place with their partners' canonical views, all at once."""
    dev = out.device
    lo_t, hi_t = out.new_tensor(lo).view(1, 3, 1, 1), out.new_tensor(hi).view(1, 3, 1, 1)
    canon = torch.from_numpy(canonical_params()).expand(len(mixed), -1)
    partner = geometry(sources, partner_index, canon, size).div_(255) * (hi_t - lo_t) + lo_t
    lam = host[:, COL["mix_lambda"]].to(dev).view(-1, 1, 1, 1)
    mixup = (host[:, COL["mix_mode"]].round() == MIX_MIXUP).to(dev).view(-1, 1, 1, 1)
    cut = torch.stack([(host[:, COL[c]].double() * size).round() for c in ("mix_y0", "mix_x0", "mix_y1", "mix_x1")],
                      dim=1).to(dev)                                                        # (M, 4)
    pos = torch.arange(size, device=dev, dtype=cut.dtype)
    rows = (pos >= cut[:, 0:1]) & (pos < cut[:, 2:3])                                       # (M, size)
    cols = (pos >= cut[:, 1:2]) & (pos < cut[:, 3:4])
    inside = (rows.unsqueeze(-1) & cols.unsqueeze(-2)).unsqueeze(1)                         # (M, 1, size, size)
    mixed = mixed.to(dev)
    x = out[mixed]
    out[mixed] = torch.where(mixup, lam * x + (1 - lam) * partner, torch.where(inside, partner, x))
