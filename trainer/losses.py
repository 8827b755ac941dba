"""Distillation losses, the functions the loss terms (trainer/terms/) are made of, and the projection
heads of the feature terms. Every term is averaged over the samples it applies to (never over numel):
the cross-entropy over the labelled samples of the batch, every teacher term over all samples.

s: student logits (B, C); t: teacher logits (B, C), raw as stored; q: target distribution (B, C).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def soft_cross_entropy(s: torch.Tensor, q: torch.Tensor, label_smoothing: float = 0.0,
                       labelled: torch.Tensor | None = None) -> torch.Tensor:
    """CE = -1/|L| sum_{i in L} sum_c q'_ic log softmax(s_i)_c, with q' = (1 - eps) q + eps / C.

    q is one-hot for plain views and the lambda-weighted pair of labels for mixed views. L is the
    set of labelled samples (all of them when `labelled` is None); with none, the term is 0 and
    sends no gradient, so no cross-entropy ever uses a label that does not exist.
    """
    c = s.shape[-1]
    q = q * (1 - label_smoothing) + label_smoothing / c
    per_sample = -(q * F.log_softmax(s.float(), dim=-1)).sum(-1)                  # (B,)
    if labelled is None:
        return per_sample.mean()
    return (per_sample * labelled).sum() / labelled.sum().clamp(min=1)


def kd_loss(s: torch.Tensor, t: torch.Tensor, temperature: float, keep: torch.Tensor | None = None,
            weight: torch.Tensor | None = None) -> torch.Tensor:
    """Hinton et al. 2015, "Distilling the Knowledge in a Neural Network":

    KD = T^2 / |S| * sum_{i in S} w_i KL(softmax(t_i / T) || softmax(s_i / T)), S the kept samples (all
    when `keep` is None), w_i per-sample weights (1 when `weight` is None). The T^2 keeps gradient
    magnitudes comparable across temperatures.
    """
    log_p_s = F.log_softmax(s.float() / temperature, dim=-1)
    log_p_t = F.log_softmax(t.float() / temperature, dim=-1)
    kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum(-1)                    # (B,)
    if weight is not None:
        kl = kl * weight
    if keep is None:
        return kl.mean() * temperature ** 2
    return (kl * keep).sum() / keep.sum().clamp(min=1) * temperature ** 2


def teacher_confidence(t: torch.Tensor, targets: torch.Tensor, labelled: torch.Tensor) -> torch.Tensor:
    """(B,) how far to trust each teacher target: the probability the teacher (T = 1) gives the view's
    label distribution, sum_c q_c softmax(t)_c, on labelled views; its top probability on unlabelled
    ones (its expected accuracy, for a calibrated teacher such as the logistic probe)."""
    p = F.softmax(t.float(), dim=-1)
    return torch.where(labelled, (p * targets).sum(-1), p.max(-1).values).detach()


def _pearson_distance(a: torch.Tensor, b: torch.Tensor, dim: int) -> torch.Tensor:
    a = a - a.mean(dim, keepdim=True)
    b = b - b.mean(dim, keepdim=True)
    return 1 - F.cosine_similarity(a, b, dim=dim, eps=1e-8)


def dist_loss(s: torch.Tensor, t: torch.Tensor, temperature: float, beta: float = 1.0,
              gamma: float = 1.0) -> torch.Tensor:
    """Huang et al. 2022, "Knowledge Distillation from A Stronger Teacher" (DIST):

    with p = softmax(./T): inter = 1/B sum_i (1 - pearson(p_s[i, :], p_t[i, :])),
    intra = 1/C sum_c (1 - pearson(p_s[:, c], p_t[:, c])); DIST = T^2 (beta inter + gamma intra).
    """
    p_s = F.softmax(s.float() / temperature, dim=-1)
    p_t = F.softmax(t.float() / temperature, dim=-1)
    inter = _pearson_distance(p_s, p_t, dim=1).mean()
    intra = _pearson_distance(p_s, p_t, dim=0).mean()
    return temperature ** 2 * (beta * inter + gamma * intra)


def cosine_loss(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """1 - cos(a_i, b_i) over the last dim, averaged over every other index (samples, locations)."""
    return (1 - F.cosine_similarity(a.float(), b.float(), dim=-1)).mean()


class PooledProjector(nn.Module):
    """Student pooled features (B, F) -> teacher pooled width (B, D). Training only; not exported."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.proj = nn.Sequential(nn.Linear(in_dim, out_dim), nn.GELU(), nn.Linear(out_dim, out_dim))

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        return self.proj(v)


class PatchProjector(nn.Module):
    """Student map (B, F, h, w) -> (B, g, g, d): pooled to the teacher's grid, then 1x1 conv."""

    def __init__(self, in_ch: int, out_dim: int, grid: int):
        super().__init__()
        self.grid = grid
        self.proj = nn.Sequential(nn.Conv2d(in_ch, out_dim, 1), nn.GELU(), nn.Conv2d(out_dim, out_dim, 1))

    def forward(self, fmap: torch.Tensor) -> torch.Tensor:
        x = F.adaptive_avg_pool2d(fmap, self.grid)                            # (B, F, g, g)
        return self.proj(x).permute(0, 2, 3, 1)                               # (B, g, g, d)
