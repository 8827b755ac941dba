"""Store format version 1: which arrays exist, their dtypes and shapes.

N images, K views, P view params, C classes, D pooled width, g patch grid, S stored image side.
"""
from __future__ import annotations

from dataclasses import dataclass

FORMAT_VERSION = 1


class StoreError(ValueError):
    """The store is missing, of another format, or inconsistent; the message says what."""


@dataclass(frozen=True)
class Field:
    name: str
    dtype: str
    dims: tuple[str, ...]         # symbolic shape, resolved from the store's sizes
    per_view: bool                # counts towards bytes per view


def fields(patch_grid: int, heads: tuple[str, ...]) -> list[Field]:
    out = [
        Field("images", "uint8", ("N", "S", "S", "3"), False),
        Field("labels", "int16", ("N",), False),
        Field("split", "int8", ("N",), False),
        Field("sha256", "uint8", ("N", "32"), False),
        Field("views/params", "float32", ("N", "K", "P"), True),
        Field("teacher/pooled", "float16", ("N", "K", "D"), True),
    ]
    if patch_grid:
        out.append(Field("teacher/patches", "float16", ("N", "K", "g", "g", "D"), True))
    out += [Field(f"teacher/logits/{h}", "float32", ("N", "K", "C"), True) for h in heads]
    return out


def resolve(dims: tuple[str, ...], sizes: dict[str, int]) -> tuple[int, ...]:
    return tuple(int(d) if d.isdigit() else sizes[d] for d in dims)


REQUIRED_ATTRS = ("format_version", "classes", "num_images", "views_per_image", "image_size",
                  "chunk_size", "embed_dim", "patch_grid", "heads", "param_names", "teacher")


def check_attrs(attrs: dict, where: str) -> None:
    version = attrs.get("format_version")
    if version is None:
        raise StoreError(f"{where} is not a kdstore store (no format_version attribute)")
    if version != FORMAT_VERSION:
        raise StoreError(f"{where} has format_version {version}; this kdstore reads version {FORMAT_VERSION}"
                         " (rebuild the store, or use the kdstore release that wrote it)")
    missing = [a for a in REQUIRED_ATTRS if a not in attrs]
    if missing:
        raise StoreError(f"{where} lacks attributes {missing}; the store is damaged or was not finished")
