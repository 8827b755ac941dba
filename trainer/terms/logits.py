"""The teacher's logits: Hinton KD (with its gate) and DIST."""
from __future__ import annotations

from trainer.losses import dist_loss, kd_loss, teacher_confidence
from trainer.terms import term


@term("kd", 1.0, "weight of Hinton KD on the teacher logits", needs="logits", teacher=True, order=20)
def kd(x, w):
    """kd_loss at w.temperature; the gate (w.kd_gate) keeps or weighs the views whose teacher is trusted."""
    keep = weight = None
    if w.kd_gate == "correct":            # unlabelled views always; labelled ones where the teacher is right
        keep = ~x.labelled | (x.teacher_logits.argmax(-1) == x.targets.argmax(-1))
    elif w.kd_gate == "confidence":
        weight = teacher_confidence(x.teacher_logits, x.targets, x.labelled)
    return kd_loss(x.logits, x.teacher_logits, w.temperature, keep, weight)


@term("dist", 0.0, "weight of the DIST loss", needs="logits", teacher=True, order=30)
def dist(x, w):
    return dist_loss(x.logits, x.teacher_logits, w.temperature)
