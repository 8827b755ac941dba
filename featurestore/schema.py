"""Store format version 2: the one table of fields, and the layout each field owns.

N images, K views, P view params, C classes, D pooled width, g patch grid, d patch width (D, or
fewer through a PCA basis), S stored image side. docs/store-format.md is the reference; creating a
store, the direct shard reader, verify, slim, plan and the storage benchmark all read this table.

Every array is chunked along N in whole chunks of `chunk_size` images ("store chunks"; in Zarr one
shard file each, the unit of resume and of a writer's ownership). Kinds:
- "index": one value per image, written when the store is created (labels, split, ids, ...);
- "image": per image, written by the teacher pass (the squashed images);
- "view": per (image, view); one view index of one store chunk is one stored inner chunk, so an
  epoch that uses one view per store chunk reads exactly 1/K of these bytes;
- "progress": one flag per store chunk, set once all of the chunk's arrays are written.
Rows larger than `INNER_CHUNK_BYTES` (the images) are stored in inner chunks of a few rows, so that
a whole-chunk read decodes few frames and a row read few extra rows.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from featurestore.errors import KdstoreError

FORMAT_VERSION = 2
NO_LABEL = -1           # the label of an unlabelled image
SPLIT_HELD_OUT = -1     # split of a labelled validation image
SPLIT_UNLABELED = -2    # split of an unlabelled image (never a fold, never validation)
ROWS_PER_INNER_CHUNK = 8
INNER_CHUNK_BYTES = 4096
# attributes that say kdstore made a store (written before any array, so a store killed while being
# created says it too)
MARKER_ATTRS = ("format_version", "param_names", "views_per_image", "chunk_size")
REQUIRED_ATTRS = ("format_version", "classes", "num_images", "views_per_image", "image_size",
                  "chunk_size", "embed_dim", "patch_grid", "heads", "param_names", "teacher")


class StoreError(KdstoreError, ValueError):
    """The store is missing, of another format, damaged or inconsistent; the message says what."""


@dataclass(frozen=True)
class Layout:
    """How one field is stored: the whole array, one store chunk, one stored (checksummed) chunk."""
    shape: tuple[int, ...]
    chunk: tuple[int, ...]
    inner: tuple[int, ...]

    @property
    def sharded(self) -> bool:
        return self.inner != self.chunk


@dataclass(frozen=True)
class Field:
    name: str
    dtype: str                    # a numpy dtype, or "str"
    dims: tuple[str, ...]         # symbolic shape, resolved from the store's sizes
    kind: str                     # index | image | view | progress
    codec: str = "arrays"         # arrays | images (read whole every epoch: a fast codec) | none

    @property
    def per_view(self) -> bool:
        return self.kind == "view"

    @property
    def fill(self):
        """What an unwritten element reads as: NaN for floats (never mistaken for a target)."""
        if self.dtype == "str":
            return None
        return {"f": float("nan"), "b": False}.get(np.dtype(self.dtype).kind, 0)

    def layout(self, size: dict[str, int], chunk_size: int) -> Layout:
        shape = tuple(int(d) if d.isdigit() else size[d] for d in self.dims)
        if self.kind == "progress":
            return Layout(shape, (1,), (1,))
        chunk = (min(chunk_size, shape[0]),) + shape[1:]
        if self.kind == "view":
            inner = chunk[:1] + (1,) + shape[2:]                               # (chunk, 1 view, ...)
        elif self.dtype != "str" and math.prod(shape[1:]) * np.dtype(self.dtype).itemsize > INNER_CHUNK_BYTES:
            inner = (math.gcd(ROWS_PER_INNER_CHUNK, chunk_size),) + shape[1:]  # shards hold whole inner chunks
        else:
            inner = chunk
        return Layout(shape, chunk, inner)


PROGRESS = Field("progress/done", "bool", ("Nc",), "progress", "none")
INDEX_FIELDS = ("labels", "split", "sha256", "ids", "views/params")

# The small arrays, each written whole as one checksummed chunk: what recomputes each head's logits
# (under heads/<head>/), and the patch basis (under pca/patches/). F: the probe's folds.
HEAD_ARRAYS = {
    "probe": {"weight": ("C", "D"), "bias": ("C",), "fold_weight": ("F", "C", "D"), "fold_bias": ("F", "C")},
    "spread": {"weight": ("C", "D"), "bias": ("C",), "fold_weight": ("F", "C", "D"), "fold_bias": ("F", "C")},
    "zeroshot": {"text_embeds": ("C", "D"), "logit_scale": ("1",), "logit_bias": ("1",)},
}
PCA_ARRAYS = {"mean": ("D",), "basis": ("d", "D"), "eigenvalues": ("D",)}
PCA_GROUP = "pca/patches"


def fields(attrs: dict) -> list[Field]:
    """The data arrays of a store with these attributes (slim stores list what they dropped)."""
    dropped = set(attrs.get("dropped", ()))
    out = [
        Field("images", "uint8", ("N", "S", "S", "3"), "image", "images"),
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
    n, chunk = attrs["num_images"], attrs["chunk_size"]
    return {"N": n, "K": attrs["views_per_image"], "P": len(attrs["param_names"]), "C": len(attrs["classes"]),
            "D": attrs["embed_dim"], "g": attrs["patch_grid"], "d": patch_width(attrs),
            "S": attrs["image_size"], "Nc": num_chunks(n, chunk),
            "F": attrs.get("identity", {}).get("probe", {}).get("folds", 0)}


def patch_width(attrs: dict) -> int:
    """d: the stored patch tokens' width (the tokens' own width D', or fewer through a PCA basis)."""
    return attrs.get("patch_dim") or attrs.get("token_dim") or attrs["embed_dim"]


def small_arrays(attrs: dict) -> dict[str, tuple[int, ...]]:
    """key -> shape of every small array a finished store with these attributes holds."""
    size = sizes(attrs) | {"1": 1}
    dims = {f"heads/{h}/{name}": d for h in attrs["heads"] for name, d in HEAD_ARRAYS[h].items()}
    if attrs.get("patch_basis_fitted"):
        dims |= {f"{PCA_GROUP}/{name}": d for name, d in PCA_ARRAYS.items()}
    return {key: tuple(size[x] for x in d) for key, d in dims.items()}


def layouts(attrs: dict) -> dict[str, Layout]:
    """Every array a store with these attributes holds (once finished), by name: the fields, the progress
    marks and the small arrays (one chunk each). What `--overwrite` may delete, and what verify checks
    the store's arrays against, derive from this."""
    size, chunk = sizes(attrs), attrs["chunk_size"]
    out = {f.name: f.layout(size, chunk) for f in fields(attrs) + [PROGRESS]}
    return out | {key: Layout(shape, shape, shape) for key, shape in small_arrays(attrs).items()}


def num_chunks(n: int, chunk_size: int) -> int:
    return (n + chunk_size - 1) // chunk_size


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
