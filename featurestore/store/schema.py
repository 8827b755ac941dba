"""Store format version 3: the one table of fields, and the layout each field owns.

N images, K views, P view params, C classes, S stored image side, g patch grid; and per teacher D its
pooled width, E its patch tokens' width, d the stored patch width (E, or fewer through a PCA basis).
docs/store-format.md is the reference; creating a store, the direct shard reader, verify, slim, plan,
--overwrite and the storage benchmark all read this table.

A store holds one or more teachers' outputs over the same views: each teacher is a group
`teachers/<name>/` (pooled, patches, logits/<head>, its heads' small arrays, its patch basis, its
progress marks), its attributes under attrs["teachers"][name]. A version 2 store reads as one teacher
named "teacher" whose arrays lie where version 2 put them (`teacher/pooled`, `heads/<head>/...`,
`pca/patches/...`); `TeacherLayout` says where each array of a teacher lies, whatever the version.

Every array is chunked along N in whole chunks of `chunk_size` images ("store chunks"; in Zarr one
shard file each, the unit of resume and of a writer's ownership). Kinds:
- "index": one value per image, written when the store is created (labels, split, ids, ...);
- "image": per image, written by the teacher pass (the squashed images);
- "view": per (image, view); one view index of one store chunk is one stored inner chunk, so an
  epoch that uses one view per store chunk reads exactly 1/K of these bytes;
- "progress": one flag per store chunk, set once all of the chunk's arrays of its pass are written.
Each field says when it is written (`written`: creation, pass or heads): verify --fix, slim and the
builds read that here rather than keep lists of their own. Rows larger than `INNER_CHUNK_BYTES` (the
images) are stored in inner chunks of a few rows, so that a whole-chunk read decodes few frames.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np

from featurestore.common.errors import KdstoreError

FORMAT_VERSION = 3
READABLE_VERSIONS = (2, 3)
NO_LABEL = -1           # the label of an unlabelled image
SPLIT_HELD_OUT = -1     # split of a labelled validation image
SPLIT_UNLABELED = -2    # split of an unlabelled image (never a fold, never validation)
ROWS_PER_INNER_CHUNK = 8
INNER_CHUNK_BYTES = 4096
TEACHER_NAME = re.compile(r"[a-z][a-z0-9_-]{0,31}")
# attributes that say kdstore made a store (written before any array, so a store killed while being
# created says it too)
MARKER_ATTRS = ("format_version", "param_names", "views_per_image", "chunk_size")
REQUIRED_ATTRS = {2: ("format_version", "classes", "num_images", "views_per_image", "image_size", "chunk_size",
                      "embed_dim", "patch_grid", "heads", "param_names", "teacher"),
                  3: ("format_version", "classes", "num_images", "views_per_image", "image_size", "chunk_size",
                      "patch_grid", "param_names", "teachers")}
# what a teacher's attributes hold (version 3: attrs["teachers"][name]; version 2: the root's own keys)
TEACHER_KEYS = ("teacher", "embed_dim", "token_dim", "patch_dim", "heads", "prompts", "metrics",
                "patch_basis_fitted", "patch_variance_kept")


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
    written: str = "creation"     # creation | pass (the teacher pass) | heads (after the pass) | progress
    teacher: str | None = None    # the teacher whose output it is

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


PROGRESS = Field("progress/done", "bool", ("Nc",), "progress", "none", "progress")

# The small arrays of a teacher, each written whole as one checksummed chunk: what recomputes each head's
# logits (<teacher>/heads/<head>/...), the patch basis (<teacher>/pca/...) and the statistics its targets
# are standardised with (<teacher>/stats/...). F: the probe's folds.
HEAD_ARRAYS = {
    "probe": {"weight": ("C", "D"), "bias": ("C",), "fold_weight": ("F", "C", "D"), "fold_bias": ("F", "C")},
    "spread": {"weight": ("C", "D"), "bias": ("C",), "fold_weight": ("F", "C", "D"), "fold_bias": ("F", "C")},
    "zeroshot": {"text_embeds": ("C", "D"), "logit_scale": ("1",), "logit_bias": ("1",)},
}
PCA_ARRAYS = {"mean": ("E",), "basis": ("d", "E"), "eigenvalues": ("E",)}
STATS_ARRAYS = {"pooled_mean": ("D",), "pooled_std": ("D",), "patches_mean": ("d",), "patches_std": ("d",)}


@dataclass(frozen=True)
class TeacherLayout:
    """Where one teacher's arrays lie in a store, and its attributes."""
    name: str
    attrs: dict                   # teacher (its TeacherInfo), embed_dim, token_dim, patch_dim, heads, ...
    version: int

    @property
    def root(self) -> str:
        return f"teachers/{self.name}" if self.version >= 3 else "teacher"

    @property
    def pooled(self) -> str:
        return f"{self.root}/pooled"

    @property
    def patches(self) -> str:
        return f"{self.root}/patches"

    def logits(self, head: str) -> str:
        return f"{self.root}/logits/{head}"

    def head_key(self, head: str, array: str) -> str:
        return f"{self.root}/heads/{head}/{array}" if self.version >= 3 else f"heads/{head}/{array}"

    def head_prefix(self, head: str) -> str:
        return self.head_key(head, "")

    def pca_key(self, array: str) -> str:
        return f"{self.root}/pca/{array}" if self.version >= 3 else f"pca/patches/{array}"

    def stats_key(self, array: str) -> str | None:
        return f"{self.root}/stats/{array}" if self.version >= 3 else None

    @property
    def done(self) -> Field | None:
        """The teacher's own progress marks (version 3: a teacher added to a store keeps its own)."""
        return Field(f"{self.root}/done", "bool", ("Nc",), "progress", "none", "progress", self.name) \
            if self.version >= 3 else None

    @property
    def heads(self) -> list[str]:
        return list(self.attrs["heads"])

    @property
    def info(self) -> dict:
        return self.attrs["teacher"]

    @property
    def embed_dim(self) -> int:
        return int(self.attrs["embed_dim"])

    @property
    def token_dim(self) -> int:
        return int(self.attrs.get("token_dim") or self.attrs["embed_dim"])

    @property
    def patch_dim(self) -> int:
        return int(self.attrs.get("patch_dim") or self.token_dim)

    @property
    def metrics(self) -> dict:
        return self.attrs.get("metrics", {})

    def sizes(self) -> dict[str, int]:
        return {"D": self.embed_dim, "E": self.token_dim, "d": self.patch_dim}


def teachers(attrs: dict) -> list[TeacherLayout]:
    """The store's teachers, in order."""
    version = attrs.get("format_version") or FORMAT_VERSION
    if version < 3:
        return [TeacherLayout("teacher", {k: attrs[k] for k in TEACHER_KEYS if k in attrs}, version)]
    return [TeacherLayout(name, t, version) for name, t in attrs["teachers"].items()]


def teacher_of(attrs: dict, name: str | None = None) -> TeacherLayout:
    """One teacher of the store (None: the first), or a StoreError naming those it has."""
    found = teachers(attrs)
    if name is None:
        return found[0]
    for t in found:
        if t.name == name:
            return t
    raise StoreError(f"the store has no teacher {name!r}; it has {', '.join(t.name for t in found)}")


def fields(attrs: dict) -> list[Field]:
    """The data arrays of a store with these attributes (slim stores list what they dropped)."""
    dropped = set(attrs.get("dropped", ()))
    out = [
        Field("images", "uint8", ("N", "S", "S", "3"), "image", "images", "pass"),
        Field("labels", "int16", ("N",), "index"),
        Field("split", "int8", ("N",), "index"),
        Field("sha256", "uint8", ("N", "32"), "index"),
        Field("ids", "str", ("N",), "index"),
        Field("views/params", "float32", ("N", "K", "P"), "view"),
    ]
    for t in teachers(attrs):
        d = t.sizes()
        out.append(Field(t.pooled, "float16", ("N", "K", str(d["D"])), "view", written="pass", teacher=t.name))
        if attrs["patch_grid"]:
            out.append(Field(t.patches, "float16", ("N", "K", "g", "g", str(d["d"])), "view", written="pass",
                             teacher=t.name))
        out += [Field(t.logits(h), "float32", ("N", "K", "C"), "view", written="heads", teacher=t.name)
                for h in t.heads]
    return [f for f in out if f.name not in dropped]


def progress_fields(attrs: dict) -> list[Field]:
    """The progress marks: the store's own (images), and each teacher's (version 3)."""
    return [PROGRESS] + [t.done for t in teachers(attrs) if t.done is not None]


def sizes(attrs: dict) -> dict[str, int]:
    n, chunk = attrs["num_images"], attrs["chunk_size"]
    return {"N": n, "K": attrs["views_per_image"], "P": len(attrs["param_names"]), "C": len(attrs["classes"]),
            "g": attrs["patch_grid"], "S": attrs["image_size"], "Nc": num_chunks(n, chunk),
            "F": attrs.get("identity", {}).get("probe", {}).get("folds", 0)}


def small_arrays(attrs: dict) -> dict[str, tuple[int, ...]]:
    """key -> shape of every small array a finished store with these attributes holds."""
    out = {}
    for t in teachers(attrs):
        size = sizes(attrs) | t.sizes() | {"1": 1}
        dims = {t.head_key(h, name): d for h in t.heads for name, d in HEAD_ARRAYS[h].items()}
        if t.attrs.get("patch_basis_fitted"):
            dims |= {t.pca_key(name): d for name, d in PCA_ARRAYS.items()}
        if t.attrs.get("stats"):
            dims |= {t.stats_key(name): d for name, d in STATS_ARRAYS.items()
                     if attrs["patch_grid"] or not name.startswith("patches")}
        out |= {key: tuple(size[x] for x in d) for key, d in dims.items()}
    return out


def layouts(attrs: dict) -> dict[str, Layout]:
    """Every array a store with these attributes holds (once finished), by name: the fields, the progress
    marks and the small arrays (one chunk each). What `--overwrite` may delete, and what verify checks
    the store's arrays against, derive from this."""
    size, chunk = sizes(attrs), attrs["chunk_size"]
    out = {f.name: f.layout(size, chunk) for f in fields(attrs) + progress_fields(attrs)}
    return out | {key: Layout(shape, shape, shape) for key, shape in small_arrays(attrs).items()}


def store_attrs(*, classes: list[str], num_images: int, views: int, image_size: int, chunk_size: int,
                patch_grid: int, param_names: list[str], teachers: dict[str, dict], **more) -> dict:
    """The root attributes of a new store (the one place they are put together: the build, the planner's
    sample store and the storage benchmark use it). teachers: name -> attributes (teacher, embed_dim,
    token_dim, patch_dim, heads, prompts); more: provenance and the build's records."""
    return {"format_version": FORMAT_VERSION, "classes": list(classes), "num_images": int(num_images),
            "views_per_image": int(views), "image_size": int(image_size), "chunk_size": int(chunk_size),
            "patch_grid": int(patch_grid), "param_names": list(param_names), "teachers": dict(teachers)} | more


def num_chunks(n: int, chunk_size: int) -> int:
    return (n + chunk_size - 1) // chunk_size


def check_attrs(attrs: dict, where: str) -> None:
    version = attrs.get("format_version")
    if version is None:
        raise StoreError(f"{where} is not a kdstore store (no format_version attribute)")
    if version not in READABLE_VERSIONS:
        older = isinstance(version, int) and version < min(READABLE_VERSIONS)
        hint = ("it was written by an older kdstore; rebuild it with `featurestore build` (a new --out, or "
                "--overwrite)" if older else "use the kdstore release that wrote it")
        raise StoreError(f"{where} has format_version {version}; this kdstore reads versions "
                         f"{', '.join(map(str, READABLE_VERSIONS))}: " + hint)
    missing = [a for a in REQUIRED_ATTRS[version] if a not in attrs]
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
