"""The teachers' features: the student's pooled vector and feature map, through a projection head per
teacher, fitted to each teacher's pooled embedding and patch grid by cosine."""
from __future__ import annotations

from trainer.losses import cosine_loss
from trainer.terms import term


@term("pooled", 0.5, "weight of the pooled-embedding cosine loss: one number for every teacher, or NAME=W,... per "
      "teacher", needs="pooled", teacher=True, per_teacher=True, order=40)
def pooled(pred, target, w):
    return cosine_loss(pred, target)                   # (B, D) each


@term("patches", 0.0, "weight of the patch-grid cosine loss: one number for every teacher, or NAME=W,... per "
      "teacher", needs="patches", teacher=True, per_teacher=True, order=50, standard=0.5)
def patches(pred, target, w):
    return cosine_loss(pred, target)                   # (B, g, g, d) each, averaged over samples and cells
