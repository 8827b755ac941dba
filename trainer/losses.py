"""Distillation losses. Every term is averaged over the samples it applies to (never over numel):
the cross-entropy over the labelled samples of the batch, every teacher term over all samples.

s: student logits (B, C); t: teacher logits (B, C), raw as stored; q: target distribution (B, C).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from featurestore.options import ConfigError, in_range, opt


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


GATES = ["none", "correct", "confidence"]


@dataclass
class LossWeights:
    ce: float = opt(1.0, "weight of cross-entropy on the labels", flag="--w-ce")
    kd: float = opt(1.0, "weight of Hinton KD on the teacher logits", flag="--w-kd")
    dist: float = opt(0.0, "weight of the DIST loss", flag="--w-dist")
    pooled: float = opt(0.5, "weight of the pooled-embedding cosine loss", flag="--w-pooled")
    patches: float = opt(0.0, "weight of the patch-grid cosine loss", flag="--w-patches")
    temperature: float = opt(2.0, "KD/DIST temperature T", flag="--temperature")
    label_smoothing: float = opt(0.1, "label smoothing of the cross-entropy term", flag="--label-smoothing")
    logit_adjust: float = opt(0.0, "tau of the logit-adjusted cross-entropy (Menon et al. 2021): the labels' loss "
                              "is taken on logits + tau log(class prior), the prior from the store's labelled "
                              "training images, so the small classes are not crowded out; the student's own "
                              "logits are exported (0: plain cross-entropy)", flag="--logit-adjust")
    kd_gate: str = opt("confidence", "which views KD trusts: all (none); labelled ones only where the teacher's top "
                       "class is the label (correct); each weighted by the teacher's probability of the view's "
                       "label, or of its own top class when unlabelled (confidence)", flag="--kd-gate",
                       choices=GATES)

    def validate(self) -> None:
        for term in ("ce", "kd", "dist", "pooled", "patches"):
            in_range(f"loss.{term}", getattr(self, term), 0, 1000, "a loss weight")
        if not 0 < self.temperature <= 100:
            raise ConfigError(f"loss.temperature must be in (0, 100], got {self.temperature}")
        in_range("loss.logit_adjust", self.logit_adjust, 0, 10)
        if not 0 <= self.label_smoothing < 1:
            raise ConfigError(f"loss.label_smoothing must be in [0, 1), got {self.label_smoothing}")
        if self.kd_gate not in GATES:
            raise ConfigError(f"loss.kd_gate must be none|correct|confidence, got {self.kd_gate!r}")


def total_loss(w: LossWeights, logits, targets, labelled, teacher_logits, pooled_pred=None, pooled_t=None,
               patches_pred=None, patches_t=None, log_prior=None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Weighted sum of the enabled terms; returns the total and each term (detached, on the device: reading
    one on the host waits for the device, so the caller reads them only when it logs).

    labelled (B,) bool: which samples carry a label (the cross-entropy sees only those). log_prior (C,):
    log class prior for the logit-adjusted cross-entropy (Menon et al. 2021, "Long-tail learning via
    logit adjustment"): CE(s + tau log pi, y), when w.logit_adjust = tau > 0."""
    parts: dict[str, torch.Tensor] = {}
    if w.ce:
        adjusted = logits + w.logit_adjust * log_prior if w.logit_adjust and log_prior is not None else logits
        parts["ce"] = soft_cross_entropy(adjusted, targets, w.label_smoothing, labelled)
    if w.kd:
        keep = weight = None
        if w.kd_gate == "correct":            # unlabelled views always; labelled ones where the teacher is right
            keep = ~labelled | (teacher_logits.argmax(-1) == targets.argmax(-1))
        elif w.kd_gate == "confidence":
            weight = teacher_confidence(teacher_logits, targets, labelled)
        parts["kd"] = kd_loss(logits, teacher_logits, w.temperature, keep, weight)
    if w.dist:
        parts["dist"] = dist_loss(logits, teacher_logits, w.temperature)
    if w.pooled:
        parts["pooled"] = cosine_loss(pooled_pred, pooled_t)
    if w.patches:
        parts["patches"] = cosine_loss(patches_pred, patches_t)
    total = sum(getattr(w, k) * v for k, v in parts.items())
    return total, {k: v.detach() for k, v in parts.items()}
