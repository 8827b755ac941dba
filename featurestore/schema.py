"""Store format version 2: which arrays exist, their dtypes, shapes and chunking.

N images, K views, P view params, C classes, D pooled width, g patch grid, d patch width (D, or
fewer through a PCA basis), S stored image side. docs/store-format.md is the reference.

Every array is chunked along N in whole chunks of `chunk_size` images ("store chunks"). Kinds:
- "index": one value per image, written when the store is created (labels, split, ids, ...);
- "image": per image, written by the teacher pass (the squashed images);
- "view": per (image, view); one view index of one store chunk is one contiguous stored chunk, so
  an epoch that uses one view per store chunk reads exactly 1/K of these bytes.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import KdstoreError

FORMAT_VERSION = 2
UNLABELED = -1          # label of an image without a class
SPLIT_HELD_OUT = -1     # split of a labelled validation image
SPLIT_UNLABELED = -2    # split of an unlabelled image (never a fold, never validation)


class StoreError(KdstoreError, ValueError):
    """The store is missing, of another format, damaged or inconsistent; the message says what."""


@dataclass(frozen=True)
class Field:
    name: str
    dtype: str
    dims: tuple[str, ...]         # symbolic shape, resolved from the store's sizes
    kind: str                     # index | image | view

    @property
    def per_view(self) -> bool:
        return self.kind == "view"


INDEX_FIELDS = ("labels", "split", "sha256", "ids", "views/params")
TEACHER_FIELDS = ("teacher/pooled", "teacher/patches")          # plus teacher/logits/<head>


def fields(attrs: dict) -> list[Field]:
    """The arrays of a store with these attributes (slim stores list what they dropped)."""
    dropped = set(attrs.get("dropped", ()))
    out = [
        Field("images", "uint8", ("N", "S", "S", "3"), "image"),
        Field("labels", "int16", ("N",), "index"),
        Field("split", "int8", ("N",), "index"),
        Field("sha256", "uint8", ("N", "32"), "index"),
        Field("ids", "str", ("N",), "index"),
        Field("views/params", "float32", ("N", "K", "P"), "view"),
        Field("teacher/pooled", "float16", ("N", "K", "D"), "view"),
    ]
    if attrs["patch_grid"]:
        out.append(Field("teacher/patches", "float16", ("N", "K", "g", "g", "d"), "view"))
    out += [Field(f"teacher/logits/{h}", "float32", ("N", "K", "C"), "view") for h in attrs["heads"]]
    return [f for f in out if f.name not in dropped]


def sizes(attrs: dict) -> dict[str, int]:
    return {"N": attrs["num_images"], "K": attrs["views_per_image"], "P": len(attrs["param_names"]),
            "C": len(attrs["classes"]), "D": attrs["embed_dim"], "g": attrs["patch_grid"],
            "d": attrs.get("patch_dim") or attrs["embed_dim"], "S": attrs["image_size"]}


def resolve(dims: tuple[str, ...], size: dict[str, int]) -> tuple[int, ...]:
    return tuple(int(d) if d.isdigit() else size[d] for d in dims)


REQUIRED_ATTRS = ("format_version", "classes", "num_images", "views_per_image", "image_size",
                  "chunk_size", "embed_dim", "patch_grid", "heads", "param_names", "teacher")


def check_attrs(attrs: dict, where: str) -> None:
    version = attrs.get("format_version")
    if version is None:
        raise StoreError(f"{where} is not a kdstore store (no format_version attribute)")
    if version != FORMAT_VERSION:
        older = isinstance(version, int) and version < FORMAT_VERSION
        hint = ("it was written by an older kdstore; rebuild it with `featurestore build` (a new --out, or "
                "--overwrite)" if older else "use the kdstore release that wrote it")
        raise StoreError(f"{where} has format_version {version}; this kdstore reads version {FORMAT_VERSION}: "
                         + hint)
    missing = [a for a in REQUIRED_ATTRS if a not in attrs]
    if missing:
        raise StoreError(f"{where} lacks attributes {missing}; the store is damaged or was not finished")


def bad_target_rows(x: np.ndarray, lead: int = 1) -> list[tuple[str, np.ndarray]]:
    """Rows of teacher outputs that no working teacher writes, as (what, mask over the `lead` leading
    axes): rows with a non-finite value, and constant rows (every value equal, all-zero included: a
    chunk never written, or a broken teacher), which carry no target a student could learn from.
    Used by `verify` and by the trainer alike, so the two always agree."""
    flat = x.reshape(x.shape[:lead] + (-1,))
    finite = np.isfinite(flat).all(-1)
    out = []
    if not finite.all():
        out.append(("non-finite values", ~finite))
    with np.errstate(invalid="ignore"):
        constant = finite & (flat.max(-1, initial=-np.inf) == flat.min(-1, initial=np.inf))
    if constant.any():
        out.append(("constant values (every value equal: never written, or a broken teacher)", constant))
    return out
