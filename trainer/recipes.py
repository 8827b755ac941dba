"""Named training recipes for `trainer sweep`: a plain dict from name to the loss terms it turns on.

A recipe keeps the base config's weight for each term it uses (flags or YAML; the built-in defaults
otherwise) and turns every other teacher term of the loss-term table (trainer/terms/) off; a term it
needs that the base leaves at 0 gets the term's standard weight (KD 1, pooled 0.5, patches 0.5). `base`
is the base config as given. ':labelled' after a name ignores the store's unlabelled images.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from featurestore.common.options import ConfigError
from trainer import terms
from trainer.config import FitConfig


@dataclass(frozen=True)
class Recipe:
    about: str
    ce: bool                             # cross-entropy on the labels
    terms: tuple[str, ...] | None        # teacher terms kept; None: the base config unchanged


RECIPES: dict[str, Recipe] = {
    "labels": Recipe("cross-entropy only", True, ()),
    "kd": Recipe("cross-entropy + KD", True, ("kd",)),
    "kd+features": Recipe("cross-entropy + KD + pooled (+ patches when stored)", True, ("kd", "pooled", "patches")),
    "kd-only": Recipe("KD + pooled (+ patches), no cross-entropy", False, ("kd", "pooled", "patches")),
    "base": Recipe("the fit config as given (the defaults, or --config and flags)", True, None),
}
DEFAULT_RECIPES = ",".join(RECIPES)


def apply(spec: str, base: FitConfig, has_patches: bool) -> FitConfig:
    """The run config of recipe `spec` ('name' or 'name:labelled') on top of `base`."""
    name, _, modifier = spec.partition(":")
    if name not in RECIPES or modifier not in ("", "labelled"):
        raise ConfigError(f"unknown recipe {spec!r}; choose from {sorted(RECIPES)}, optionally with ':labelled'")
    r, w = RECIPES[name], base.loss
    if r.terms is not None:
        weights = {t.name: (getattr(w, t.name) or t.standard) if t.name in r.terms else 0.0
                   for t in terms.ordered() if t.teacher}
        if not has_patches:
            weights = {k: 0.0 if terms.TERMS[k].needs == "patches" else v for k, v in weights.items()}
        w = dataclasses.replace(w, ce=(w.ce or 1.0) if r.ce else 0.0, **weights)
    teacher = bool(terms.teacher_terms(w))                          # unlabelled images need a teacher term
    return dataclasses.replace(base, loss=w, unlabeled=base.unlabeled and modifier != "labelled" and teacher)
