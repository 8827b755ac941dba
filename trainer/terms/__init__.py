"""Loss terms: one module each in this package, each term one entry of `TERMS`, found by name.

A term declares the flag of its weight (`--w-<name>`), the store target it reads (`needs`: the teacher's
logits, its pooled embedding or its patch grid; None for the labels alone), whether it is a teacher term
(a teacher term trains on unlabelled images too, and `trainer sweep`'s recipes turn it on and off), and
whether it takes one weight per teacher (`--w-pooled siglip=0.5,dino=0.5`). `trainer fit` (which targets
to read, which projection heads to build, which images to train on), the loss weights' flags and YAML
keys, the recipes, the sweep and the logs all read this table; nothing lists the terms again.

A new term is one module here:

    from trainer.terms import term

    @term("cos_logits", default=0.0, help="weight of ...", needs="logits", teacher=True, order=60)
    def cos_logits(x, w):          # x: Inputs, w: the run's LossWeights -> a scalar, averaged per sample
        return (1 - torch.cosine_similarity(x.logits, x.teacher_logits)).mean()

A per-teacher term is called once per teacher with (prediction, target, w) and weighted per teacher.
"""
from __future__ import annotations

import dataclasses
import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

NEEDS = ("logits", "pooled", "patches")


@dataclass(frozen=True)
class Term:
    name: str
    default: float
    help: str
    compute: Callable
    needs: str | None = None       # logits | pooled | patches | None (the labels alone)
    teacher: bool = False          # trains unlabelled images too; recipes switch it
    per_teacher: bool = False      # one weight per teacher; compute(pred, target, w) per teacher
    order: int = 100               # the place of its flag and its column in the logs
    standard: float = 0.0          # the weight a sweep recipe gives it when it turns it on from 0


@dataclass
class Inputs:
    """What a step's terms are computed from. Shapes: B samples, C classes."""
    logits: torch.Tensor                              # (B, C) the student's
    targets: torch.Tensor                             # (B, C) label distribution (zeros when unlabelled)
    labelled: torch.Tensor                            # (B,) bool
    teacher_logits: torch.Tensor | None = None        # (B, C) raw, of the KD head
    log_prior: torch.Tensor | None = None             # (C,) log class prior of the training labels
    features: dict[str, dict] = field(default_factory=dict)   # needs -> {teacher: (prediction, target)}


TERMS: dict[str, Term] = {}


def term(name: str, default: float, help: str, needs: str | None = None, teacher: bool = False,  # noqa: A002
         per_teacher: bool = False, order: int = 100, standard: float | None = None):
    """Register the decorated function as the loss term `name`."""
    if needs not in (None, *NEEDS):
        raise ValueError(f"term {name!r} needs one of {NEEDS} or None, not {needs!r}")

    def register(fn: Callable) -> Callable:
        TERMS[name] = Term(name, default, help, fn, needs, teacher, per_teacher, order,
                           default if standard is None else standard)
        return fn
    return register


def ordered() -> list[Term]:
    return sorted(TERMS.values(), key=lambda t: (t.order, t.name))


for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")


# ---- the weights: one field per term, with its flag; the settings the terms share ------------------
GATES = ["none", "correct", "confidence"]


def teacher_weights(text: str) -> float | dict[str, float]:
    """--w-pooled 0.5 (every teacher) or siglip=0.5,dino=0.3 (per teacher; others 0)."""
    from featurestore.common.options import ConfigError
    text = str(text).strip()
    try:
        if "=" not in text:
            return float(text)
        return {name.strip(): float(value) for name, value in (part.split("=", 1) for part in text.split(","))}
    except ValueError:
        raise ConfigError(f"a teacher term's weight is a number or NAME=W,NAME=W, got {text!r}") from None


def _weight_field(t: Term):
    from featurestore.common.options import opt
    if t.per_teacher:
        return t.name, float | dict[str, float], opt(t.default, t.help, flag=f"--w-{t.name}", parse=teacher_weights)
    return t.name, float, opt(t.default, t.help, flag=f"--w-{t.name}")


def _shared_fields():
    from featurestore.common.options import opt
    return [
        ("temperature", float, opt(2.0, "KD/DIST temperature T", flag="--temperature")),
        ("label_smoothing", float, opt(0.1, "label smoothing of the cross-entropy term", flag="--label-smoothing")),
        ("logit_adjust", float, opt(0.0, "tau of the logit-adjusted cross-entropy (Menon et al. 2021): the labels' "
                                    "loss is taken on logits + tau log(class prior), the prior from the store's "
                                    "labelled training images, so the small classes are not crowded out; the "
                                    "student's own logits are exported (0: plain cross-entropy)",
                                    flag="--logit-adjust")),
        ("kd_gate", str, opt("confidence", "which views KD trusts: all (none); labelled ones only where the teacher's "
                             "top class is the label (correct); each weighted by the teacher's probability of the "
                             "view's label, or of its own top class when unlabelled (confidence)", flag="--kd-gate",
                             choices=GATES)),
    ]


def weight(w, name: str, teacher: str | None = None) -> float:
    """The weight of term `name` (for `teacher`, where it is per teacher)."""
    value = getattr(w, name)
    if isinstance(value, dict):
        return float(value.get(teacher, 0.0)) if teacher is not None else max(value.values(), default=0.0)
    return float(value)


def uses(w, name: str) -> bool:
    return weight(w, name) > 0


def teacher_terms(w) -> list[str]:
    """The teacher terms with a weight above 0."""
    return [t.name for t in ordered() if t.teacher and uses(w, t.name)]


def _validate(self) -> None:
    from featurestore.common.options import ConfigError, in_range
    for t in ordered():
        value = getattr(self, t.name)
        for v in (value.values() if isinstance(value, dict) else [value]):
            in_range(f"loss.{t.name}", v, 0, 1000, "a loss weight")
    if not 0 < self.temperature <= 100:
        raise ConfigError(f"loss.temperature must be in (0, 100], got {self.temperature}")
    in_range("loss.logit_adjust", self.logit_adjust, 0, 10)
    if not 0 <= self.label_smoothing < 1:
        raise ConfigError(f"loss.label_smoothing must be in [0, 1), got {self.label_smoothing}")
    if self.kd_gate not in GATES:
        raise ConfigError(f"loss.kd_gate must be none|correct|confidence, got {self.kd_gate!r}")


LossWeights = dataclasses.make_dataclass(
    "LossWeights", [_weight_field(t) for t in ordered()] + _shared_fields(),
    namespace={"validate": _validate, "__doc__": "The weight of each loss term (TERMS) and the settings the terms "
               "share; flags --w-<term>, YAML under loss:.", "__module__": __name__})


def total_loss(w, logits, targets, labelled, teacher_logits=None, pooled_pred=None, pooled_t=None,
               patches_pred=None, patches_t=None, log_prior=None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Weighted sum of the enabled terms; returns the total and each term (detached, on the device: reading
    one on the host waits for the device, so the caller reads them only when it logs).

    labelled (B,) bool: which samples carry a label (the cross-entropy sees only those). The feature
    predictions and targets are {teacher: tensor} (or one tensor for a store of one teacher); a
    per-teacher term reports the weighted mean over its teachers (and, for several, each as "<term>:<teacher>")
    and adds sum_t w_t loss_t to the total.
    log_prior (C,): for the logit-adjusted cross-entropy."""
    def by_teacher(x):
        return x if isinstance(x, dict) or x is None else {None: x}
    preds = {"pooled": by_teacher(pooled_pred), "patches": by_teacher(patches_pred)}
    targs = {"pooled": by_teacher(pooled_t), "patches": by_teacher(patches_t)}
    x = Inputs(logits, targets, labelled, teacher_logits, log_prior,
               {k: {t: (preds[k][t], targs[k][t]) for t in preds[k]} for k in preds if preds[k] is not None})
    parts: dict[str, torch.Tensor] = {}
    total = 0
    for t in ordered():
        if not uses(w, t.name):
            continue
        if t.per_teacher:
            pairs = x.features.get(t.needs, {})
            ws = {name: weight(w, t.name, name) for name in pairs}
            if not sum(ws.values()):
                continue
            losses = {name: t.compute(p, q, w) for name, (p, q) in pairs.items() if ws[name]}
            contribution = sum(ws[name] * loss for name, loss in losses.items())
            parts[t.name] = contribution / sum(ws[name] for name in losses)
            if len(losses) > 1:                                   # each teacher's own, to compare them
                parts |= {f"{t.name}:{name}": loss.detach() for name, loss in losses.items()}
            total = total + contribution
        else:
            parts[t.name] = t.compute(x, w)
            total = total + weight(w, t.name) * parts[t.name]
    return total, {k: v.detach() for k, v in parts.items()}
