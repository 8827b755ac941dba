"""`featurestore demo-data`: a synthetic 10-class ImageFolder of JPEG and PNG files.

Each class is a lesion shape (disc, ring, square, stripes, speckles) in a warm or cool tint, on a
noisy skin-like background, at random sizes, positions and image dimensions: learnable, but a
lesion's tint overlaps between the two palettes and noise hides the small ones.
Folder names are the reference dataset's, so sorted() puts "10. ..." at index 1, as the grader does.
"""
from __future__ import annotations

import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from featurestore.common.children import end_with, mp_context

REFERENCE_CLASSES = [
    "1. Eczema", "2. Melanoma", "3. Atopic Dermatitis", "4. Basal Cell Carcinoma (BCC)",
    "5. Melanocytic Nevi (NV)", "6. Benign Keratosis-like Lesions (BKL)",
    "7. Psoriasis pictures Lichen Planus and related diseases",
    "8. Seborrheic Keratoses and other Benign Tumors",
    "9. Tinea Ringworm Candidiasis and other Fungal Infections",
    "10. Warts Molluscum and other Viral Infections",
]
# the reference dataset's images per class, in the order above (2,381 nevi down to 563 atopic dermatitis)
REFERENCE_COUNTS = (751, 938, 563, 993, 2381, 931, 921, 828, 763, 931)
SHAPES = ("disc", "ring", "square", "stripes", "speckles")


def class_counts(per_class: int, spec: str | None = None) -> list[int]:
    """Images of each class: per_class each (spec None), the reference dataset's proportions at a mean of
    per_class ("reference"), or ten comma-separated numbers."""
    if spec is None:
        return [per_class] * len(REFERENCE_CLASSES)
    if spec == "reference":
        return [max(1, round(per_class * n * len(REFERENCE_COUNTS) / sum(REFERENCE_COUNTS))) for n in REFERENCE_COUNTS]
    from featurestore.common.options import ConfigError
    try:
        counts = [int(v) for v in spec.split(",")]
    except ValueError:
        counts = []
    if len(counts) != len(REFERENCE_CLASSES) or min(counts) < 1:
        raise ConfigError(f"--class-counts takes 'reference' or {len(REFERENCE_CLASSES)} comma-separated counts of at "
                          f"least 1, got {spec!r}")
    return counts


def make_image(class_index: int, rng: np.random.Generator, sizes: tuple[int, int] = (96, 320)) -> Image.Image:
    w, h = (int(v) for v in rng.integers(sizes[0], sizes[1] + 1, size=2))
    skin = np.array([200, 160, 130]) + rng.normal(0, 18, 3)
    base = np.clip(skin + rng.normal(0, 14, (h, w, 3)), 0, 255).astype(np.uint8)
    img = Image.fromarray(base)
    draw = ImageDraw.Draw(img)
    shape, warm = SHAPES[class_index % 5], class_index < 5
    tint = np.array([150, 60, 50]) if warm else np.array([90, 70, 120])
    colour = tuple(int(v) for v in np.clip(tint + rng.normal(0, 22, 3), 0, 255))
    side = min(w, h)
    r = side * rng.uniform(0.2, 0.4)
    cx, cy = w * rng.uniform(0.3, 0.7), h * rng.uniform(0.3, 0.7)
    box = (cx - r, cy - r, cx + r, cy + r)
    if shape == "disc":
        draw.ellipse(box, fill=colour)
    elif shape == "ring":
        draw.ellipse(box, outline=colour, width=max(2, int(r * 0.3)))
    elif shape == "square":
        draw.rectangle(box, fill=colour)
    elif shape == "stripes":
        for k in range(-3, 4):
            x = cx + k * r * 0.35
            draw.line((x, cy - r, x, cy + r), fill=colour, width=max(1, int(r * 0.12)))
    else:
        for _ in range(int(rng.integers(12, 30))):
            px, py = cx + rng.normal(0, r * 0.6), cy + rng.normal(0, r * 0.6)
            q = r * rng.uniform(0.05, 0.15)
            draw.ellipse((px - q, py - q, px + q, py + q), fill=colour)
    return img.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.3, 1.5))))


def _write_one(job: tuple[Path, int, int, int, tuple[int, int]]) -> None:
    path, c, j, seed, sizes = job
    img = make_image(c, np.random.default_rng([seed, c, j]), sizes)
    img.save(path, **({} if path.suffix == ".png" else {"quality": 90}))


def write_demo_data(out: str | Path, per_class: int = 40, seed: int = 0, sizes: tuple[int, int] = (96, 320),
                    flat: bool = False, workers: int | None = None, counts: list[int] | None = None) -> Path:
    """per_class images of each class (or counts[c] of class c: `class_counts`), sides drawn from `sizes`
    (the reference photos are 300..1000). Each image is seeded by (seed, class, index), so any number of
    workers writes the same files.

    flat: all images in one folder under shuffled names, as unlabelled images arrive.
    workers: processes drawing the images (default: one per core, up to 16; 0 draws them here).
    """
    out = Path(out)
    counts = counts or [per_class] * len(REFERENCE_CLASSES)
    names = np.random.default_rng([seed, 99]).permutation(sum(counts))
    first = np.concatenate([[0], np.cumsum(counts)[:-1]])
    jobs = []
    for c, name in enumerate(REFERENCE_CLASSES):
        folder = out if flat else out / name
        folder.mkdir(parents=True, exist_ok=True)
        for j in range(counts[c]):
            stem = f"img_{names[first[c] + j]:05d}" if flat else f"img_{j:04d}"
            jobs.append((folder / f"{stem}{'.png' if j % 3 == 2 else '.jpg'}", c, j, seed, sizes))
    workers = min(16, os.cpu_count() or 1) if workers is None else workers
    if workers > 1 and len(jobs) >= 4 * workers:
        with ProcessPoolExecutor(workers, mp_context=mp_context(), initializer=end_with,
                                 initargs=(os.getpid(),)) as pool:
            list(pool.map(_write_one, jobs, chunksize=8))
    else:
        for job in jobs:
            _write_one(job)
    return out
