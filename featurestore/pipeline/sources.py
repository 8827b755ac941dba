"""Image sources: an ImageFolder tree or a CSV manifest (plus unlabelled images), the class order,
and safe decoding.

Decoding turns every readable file into an RGB uint8 array the same way (EXIF orientation
applied, CMYK/palette/16-bit/alpha converted, alpha composited on white as transformers does)
and turns every unreadable one into a `BadImage` with a reason for the build report.
"""
from __future__ import annotations

import csv
import hashlib
import io
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from featurestore.common.errors import KdstoreError
from featurestore.store.schema import NO_LABEL

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")
UNLABELED_PREFIX = "unlabeled:"     # ids of unlabelled images: this prefix + path relative to their root
EXTREME_ASPECT = 4.0                # longer / shorter side above this is noted in the build report


class DatasetError(KdstoreError, ValueError):
    """A dataset-level problem found before any teacher work."""


class BadImage(Exception):
    """One file that cannot be used; `reason` goes into the build report."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class Source:
    path: str       # absolute path
    rel: str        # path relative to the image root, stored as the image id
    label: int      # class index, or -1 for an unlabelled image


@dataclass
class Listing:
    classes: list[str]
    sources: list[Source]
    ignored: list[tuple[str, str]]      # (relative path, reason) for files that are not images


def read_classes_file(path: str | Path) -> list[str]:
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"classes file not found: {path}")
    names = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not names:
        raise DatasetError(f"classes file {path} is empty")
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise DatasetError(f"classes file {path} repeats {dupes}")
    return names


def discover(images: str | None, manifest: str | None = None, classes_file: str | None = None,
             unlabeled: str | None = None, allow_outside_paths: bool = False) -> Listing:
    """List the images; the class order is sorted() of the names unless a file sets it.

    `unlabeled` is any tree of images without classes; they come after the labelled ones with label -1.
    A classifier needs two classes or more, and each file is one image: listed twice, it is refused.
    """
    explicit = read_classes_file(classes_file) if classes_file else None
    if manifest:
        listing = _from_manifest(Path(manifest), Path(images) if images else None, explicit, allow_outside_paths)
    elif images is None:
        raise DatasetError("no image source given")
    else:
        listing = _from_folder(Path(images), explicit)
    if len(listing.classes) < 2:
        raise DatasetError(f"{manifest or images} has {len(listing.classes)} class ({', '.join(listing.classes)}); "
                           "a classifier needs at least two (one class would score macro-F1 1.0 and learn nothing)")
    if unlabeled:
        extra, ignored = _unlabeled_tree(Path(unlabeled))
        listing.sources.extend(extra)
        listing.ignored.extend(ignored)
    _refuse_repeats(listing.sources)
    return listing


def _refuse_repeats(sources: list[Source]) -> None:
    """One file, one image: the same file under two ids (labelled and unlabelled, say) is refused."""
    seen: dict[str, Source] = {}
    for s in sources:
        first = seen.setdefault(s.path, s)
        if first is not s:
            raise DatasetError(f"{s.path} is listed twice, as {first.rel!r} and as {s.rel!r}; each image may be "
                               "listed once (an image in --unlabeled must not be among the labelled ones)")


def image_files(root: Path, rel_to: Path, prefix: str = "", extensions: tuple[str, ...] = IMAGE_EXTENSIONS
                ) -> tuple[list[tuple[Path, str]], list[tuple[str, str]]]:
    """(path, id) of every image file below `root`, ids relative to `rel_to`, and (id, reason) of every
    other entry. Links are followed only into the tree: a link to a folder never (it can lead out of
    the tree, or back into it, and list its files twice or without end), a link to a file only when
    it resolves inside `rel_to`. A name that is not valid UTF-8 gets an id with those bytes escaped."""
    found, ignored = [], []
    inside = rel_to.resolve()
    for folder, dirs, files in os.walk(root):                  # followlinks=False: linked folders not entered
        here = Path(folder)
        for name in sorted(dirs):
            if (here / name).is_symlink():
                ignored.append((prefix + _shown((here / name).relative_to(rel_to)), "a link to a folder (not "
                                "followed: it could lead out of the folder or back into it)"))
        for name in files:
            p = here / name
            rel = prefix + _shown(p.relative_to(rel_to))
            if p.name.startswith(".") or p.suffix.lower() not in extensions:
                ignored.append((rel, f"not an image file extension ({p.suffix or 'none'})"))
            elif p.is_symlink() and not p.resolve().is_relative_to(inside):
                ignored.append((rel, f"a link out of the folder, to {p.resolve()} (not followed)"))
            elif not p.is_file():
                ignored.append((rel, "not a file (a broken link, a device or a pipe)"))
            else:
                found.append((p, rel))
    return sorted(found), sorted(ignored)


def _shown(rel: Path) -> str:
    """A path as text, bytes that are not UTF-8 escaped (\\xNN): every id and report line is valid UTF-8."""
    return os.fsencode(rel.as_posix()).decode("utf-8", "backslashreplace")


def _unlabeled_tree(root: Path) -> tuple[list[Source], list[tuple[str, str]]]:
    if not root.is_dir():
        raise DatasetError(f"unlabelled image folder not found: {root}")
    found, ignored = image_files(root, root, UNLABELED_PREFIX)
    if not found:
        raise DatasetError(f"{root} holds no image files (--unlabeled takes any tree of images)")
    return [Source(str(p.resolve()), rel, NO_LABEL) for p, rel in found], ignored


def _from_folder(root: Path, explicit: list[str] | None) -> Listing:
    if not root.is_dir():
        raise DatasetError(f"image folder not found: {root}")
    folders = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise DatasetError(f"{root} has no class subfolders (expected ImageFolder layout: {root}/<class>/<image>)")
    classes = folders
    if explicit is not None:
        missing, extra = sorted(set(explicit) - set(folders)), sorted(set(folders) - set(explicit))
        if missing or extra:
            raise DatasetError(
                f"class list disagrees with the folders in {root}: "
                f"no folder for {missing}, no class for folders {extra}")
        classes = explicit
    sources, ignored = [], []
    for label, name in enumerate(classes):
        found, skipped = image_files(root / name, root)
        ignored += skipped
        sources += [Source(str(p.resolve()), rel, label) for p, rel in found]
        if not found:
            raise DatasetError(f"class folder {root / name} holds no image files")
    return Listing(classes, sources, ignored)


def _from_manifest(path: Path, root: Path | None, explicit: list[str] | None, allow_outside: bool) -> Listing:
    if not path.is_file():
        raise DatasetError(f"manifest not found: {path}")
    base = (root if root is not None else path.parent).resolve()
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None or not {"path", "label"} <= set(reader.fieldnames):
            raise DatasetError(f"{path}: needs a header with columns path,label (got {reader.fieldnames})")
        rows = [(line, r["path"] or "", r["label"] or "") for line, r in enumerate(reader, start=2)]
    if not rows:
        raise DatasetError(f"{path}: no rows")
    names = sorted({label for _, _, label in rows if label.strip()})
    classes = explicit if explicit is not None else names
    if not classes:
        raise DatasetError(f"{path}: no row has a label; at least one labelled image per class is needed")
    index = {n: i for i, n in enumerate(classes)}
    sources, first_row = [], {}
    for line, rel, label in rows:
        if not rel.strip():
            raise DatasetError(f"{path}:{line}: the path is empty")
        p = (Path(rel) if Path(rel).is_absolute() else base / rel).resolve()
        if not allow_outside and (Path(rel).is_absolute() or not p.is_relative_to(base)):
            raise DatasetError(f"{path}:{line}: {rel!r} is outside {base}, the folder manifest paths are relative "
                               "to; pass --allow-outside-paths to take images from elsewhere")
        if str(p) in first_row:
            line0, label0 = first_row[str(p)]
            same = "with the same label" if label0 == label else f"with different labels ({label0!r} and {label!r})"
            raise DatasetError(f"{path}: rows {line0} and {line} list the same image {rel!r} {same}; list each "
                               "image once")
        first_row[str(p)] = (line, label)
        if not label.strip():                      # an empty label: an unlabelled image
            sources.append(Source(str(p), UNLABELED_PREFIX + rel, NO_LABEL))
            continue
        if label not in index:
            raise DatasetError(f"{path}:{line}: unknown label {label!r} (classes: {classes})")
        sources.append(Source(str(p), rel, index[label]))
    empty = [c for c in classes if c not in names]
    if empty:
        raise DatasetError(f"{path}: no images for classes {empty}")
    return Listing(classes, sources, [])


def class_display_name(folder: str) -> str:
    """The class as a person would name it in a prompt: leading numbers and trailing image counts go.

    '4. Basal Cell Carcinoma (BCC)' -> 'Basal Cell Carcinoma (BCC)', '1. Eczema 1677' -> 'Eczema',
    '5. Melanocytic Nevi (NV) - 7970' -> 'Melanocytic Nevi (NV)', '2. Melanoma 15.75k' -> 'Melanoma'.
    """
    name = re.sub(r"^\s*\d+\s*[.)_-]\s*", "", folder)
    name = re.sub(r"\s*(?:[-_:]\s*)?\d+(?:[.,]\d+)?\s*[kKmM]?\s*$", "", name)
    return name.strip(" -_") or folder.strip()


@dataclass
class Decoded:
    rgb: np.ndarray          # (H, W, 3) uint8
    sha256: str
    notes: tuple[str, ...]   # conversions applied, e.g. ("cmyk", "exif")


def decode(path: str, min_side: int = 8, max_pixels: int = 200_000_000, max_side: int | None = None) -> Decoded:
    """Read one file as RGB uint8, or raise BadImage with the reason.

    `max_side` bounds the longer side (antialiased reduction); rendering never needs more
    detail than a few times the teacher's input size.
    """
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise BadImage(f"unreadable: {e.strerror or e}") from None
    if not data:
        raise BadImage("empty file (0 bytes)")
    sha = hashlib.sha256(data).hexdigest()
    notes: list[str] = []
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            w, h = img.size
            if w * h > max_pixels:
                raise BadImage(f"too large ({w}x{h} pixels, limit {max_pixels})")
            if max_side and img.format == "JPEG" and max(w, h) > 2 * max_side:
                img.draft("RGB", (max_side, max_side))
                notes.append("downscaled")
            ImageFile.LOAD_TRUNCATED_IMAGES = False
            img.load()
    except BadImage:
        raise
    except UnidentifiedImageError:
        raise BadImage("not an image (format not recognised)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise BadImage("too large (decompression bomb limit)") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise BadImage(f"truncated or corrupt: {e}") from None
    if img.getexif().get(0x0112, 1) != 1:
        notes.append("exif")
    img = ImageOps.exif_transpose(img)
    img = _to_rgb(img, notes)
    if min(img.size) < min_side:
        raise BadImage(f"too small ({img.size[0]}x{img.size[1]}, minimum side {min_side})")
    if max(img.size) > EXTREME_ASPECT * min(img.size):
        notes.append(f"extreme aspect {img.size[0]}x{img.size[1]} squashed to a square")
    if max_side and max(img.size) > max_side:
        scale = max_side / max(img.size)
        img = img.resize((max(1, round(img.size[0] * scale)), max(1, round(img.size[1] * scale))),
                         Image.Resampling.BICUBIC, reducing_gap=3.0)
        if "downscaled" not in notes:
            notes.append("downscaled")
    return Decoded(np.asarray(img, dtype=np.uint8).copy(), sha, tuple(notes))


def _to_rgb(img: Image.Image, notes: list[str]) -> Image.Image:
    mode = img.mode
    if mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img).astype(np.float64)
        hi = 65535.0 if mode.startswith("I;16") or arr.max() > 255 else 255.0
        arr = np.clip(arr / hi * 255.0 + 0.5, 0, 255).astype(np.uint8)
        notes.append("16bit")
        return Image.fromarray(arr).convert("RGB")
    if mode == "CMYK":
        notes.append("cmyk")
        return img.convert("RGB")
    if mode == "P":
        notes.append("palette")
    has_alpha = "A" in img.getbands() or img.info.get("transparency") is not None
    if has_alpha:
        notes.append("alpha")
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode != "RGB":
        if mode in ("L", "1"):
            notes.append("grayscale")
        return img.convert("RGB")
    return img


def squash(rgb: np.ndarray, size: int) -> np.ndarray:
    """Resize to size x size ignoring aspect, as the grader's Resize((size, size)) does on PIL."""
    img = Image.fromarray(rgb)
    if img.size != (size, size):
        img = img.resize((size, size), Image.Resampling.BILINEAR)
    return np.array(img, dtype=np.uint8)


def file_fingerprint(sources: list[Source]) -> str:
    """Hash of the listing (ids, labels, sizes): a changed folder is refused on resume."""
    h = hashlib.sha256()
    for s in sources:
        try:
            size = os.path.getsize(s.path)
        except OSError:
            size = -1
        h.update(f"{s.rel}\t{s.label}\t{size}\n".encode())
    return h.hexdigest()


class DecodeSet:
    """Decodes store images [i] from their files: the original once for each longest side a teacher needs
    (each teacher renders from the decode it would have alone, so that a store's teachers are the same
    bits whether built together or added one by one), and S x S, squashed from the first decode.

    A file that became unreadable or changed since the scan gives (i, None, None, reason): the
    reason travels to the main process as a value, where it becomes one DatasetError.
    """

    def __init__(self, items: list[tuple[int, str, str]], size: int, max_sides: tuple[int, ...], min_side: int,
                 max_pixels: int):
        self.items, self.size, self.max_sides = items, size, tuple(dict.fromkeys(max_sides))
        self.min_side, self.max_pixels = min_side, max_pixels

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, j):
        import torch  # here: the scan's workers never load torch
        i, path, sha = self.items[j]
        origs = {}
        for side in self.max_sides:
            try:
                d = decode(path, self.min_side, self.max_pixels, side)
            except BadImage as e:
                return i, None, None, f"{path} became unreadable during the build: {e.reason}"
            if d.sha256 != sha:
                return i, None, None, f"{path} changed since the build started (sha256 differs); rebuild the store"
            if not origs:
                small = torch.from_numpy(squash(d.rgb, self.size))
            origs[side] = torch.from_numpy(d.rgb).permute(2, 0, 1).contiguous()
        return i, origs, small, ""
