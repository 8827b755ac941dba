"""The labels' term: cross-entropy, logit-adjusted where --logit-adjust tau > 0."""
from __future__ import annotations

from trainer.losses import soft_cross_entropy
from trainer.terms import term


@term("ce", 1.0, "weight of cross-entropy on the labels", order=10)
def ce(x, w):
    """soft_cross_entropy over the labelled samples; with tau = w.logit_adjust > 0 on s + tau log(prior)
    (Menon et al. 2021, "Long-tail learning via logit adjustment", eq. 11)."""
    s = x.logits + w.logit_adjust * x.log_prior if w.logit_adjust and x.log_prior is not None else x.logits
    return soft_cross_entropy(s, x.targets, w.label_smoothing, x.labelled)
