"""`trainer eval`: score a TorchScript file on an image folder exactly as the grader does.

Grader preprocessing: PIL open -> RGB, Resize((224, 224)) (squash, no crop), ToTensor(),
Normalize(ImageNet mean, std); class indices follow sorted() of the folder names. Files PIL cannot
read are skipped and listed in the report (`on_bad_image="skip"`), or stop the evaluation naming
the file (`"fail"`).
"""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision import transforms
from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes

from featurestore.children import worker_init
from featurestore.errors import KdstoreError
from featurestore.log import logger
from featurestore.sources import image_files
from featurestore.untrusted import read_json
from trainer.exporter import file_sha256, sidecar_check
from trainer.metrics import classification
from trainer.students import IMAGENET_MEAN, IMAGENET_STD


class EvalError(KdstoreError, ValueError):
    """The model or folder cannot be evaluated; the message says why."""


def grader_transform(size: int = 224, mean=IMAGENET_MEAN, std=IMAGENET_STD):
    return transforms.Compose([transforms.Resize((size, size)), transforms.ToTensor(), transforms.Normalize(mean, std)])


class GraderFolder(torch.utils.data.Dataset):
    """ImageFolder's classes and files (its extensions, sorted() class order) with the grader's transform;
    an unreadable file gives its reason. Links below the class folders are followed only into the
    folder (a link to a folder never: a loop would score its images again and again), and each one
    left out is listed with its reason in `skipped`."""

    def __init__(self, root: Path, transform):
        self.root, self.transform = root, transform
        self.classes, index = find_classes(str(root))
        self.samples, self.skipped = [], []
        for name in self.classes:
            found, ignored = image_files(root / name, root, extensions=IMG_EXTENSIONS)
            self.samples += [(str(p), index[name]) for p, _ in found]
            self.skipped += [{"file": rel, "reason": why} for rel, why in ignored
                             if not why.startswith("not an image file extension")]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i):
        path, label = self.samples[i]
        try:
            with open(path, "rb") as f:
                img = Image.open(f).convert("RGB")          # what torchvision's pil_loader does
            return self.transform(img), label, ""
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
            where = Path(path).relative_to(self.root).as_posix()
            return torch.zeros(0), label, f"{where}: {str(e) or type(e).__name__}"


def _collate(items):
    good = [(x, y) for x, y, why in items if not why]
    xs = torch.stack([x for x, _ in good]) if good else torch.zeros(0)
    return xs, torch.tensor([y for _, y in good], dtype=torch.long), [why for _, _, why in items if why]


def load_sidecar(model_path: Path) -> dict | None:
    side = model_path.with_suffix(".json")
    return read_json(side, f"delete it to score {model_path.name} without it, or export the run again "
                     "(`trainer export --run RUN`)") if side.is_file() else None


def evaluate(model_path: str | Path, images: str | Path, batch_size: int = 64, workers: int = 2,
             on_bad_image: str = "skip") -> dict:
    model_path, images = Path(model_path), Path(images)
    if not model_path.is_file():
        raise EvalError(f"model not found: {model_path}")
    if not images.is_dir():
        raise EvalError(f"image folder not found: {images}")
    warnings.filterwarnings("ignore", message=r"`torch\.jit\.\w+` is deprecated", category=FutureWarning)
    try:
        model = torch.jit.load(str(model_path), map_location="cpu").eval()   # as the grader loads it
    except Exception as e:  # noqa: BLE001
        raise EvalError(f"{model_path} is not a TorchScript file torch.jit.load can read ({e})") from None
    try:
        data = GraderFolder(images, grader_transform())
    except (FileNotFoundError, RuntimeError) as e:
        raise EvalError(f"{images}: {' '.join(str(e).split())}") from None
    sidecar = load_sidecar(model_path)
    match = sidecar_check(model_path, sidecar)
    if match == "differs":
        logger.warning(f"warning: {model_path} is not the file its sidecar {model_path.with_suffix('.json').name} was "
                       "written for (its SHA-256 differs): it was replaced or changed since the export, so the run "
                       "that sidecar names did not make it; scoring it anyway, without the sidecar's classes")
        sidecar = None
    if sidecar is not None and sidecar["classes"] != data.classes:
        missing = sorted(set(sidecar["classes"]) - set(data.classes))
        extra = sorted(set(data.classes) - set(sidecar["classes"]))
        raise EvalError(f"the classes of {model_path.name} and of {images} disagree: model has no {extra}, "
                        f"folder has no {missing}" if (missing or extra) else
                        f"the class order of {model_path.name} differs from sorted() of the folders in {images}")
    loader = torch.utils.data.DataLoader(data, batch_size=batch_size, num_workers=workers, collate_fn=_collate,
                                         worker_init_fn=worker_init() if workers else None)
    preds, labels, skipped = [], [], []
    with torch.no_grad():
        for x, y, bad in loader:
            if bad and on_bad_image == "fail":
                raise EvalError(f"cannot read {images / bad[0].split(': ', 1)[0]}: {bad[0].split(': ', 1)[1]} "
                                "(--on-bad-image skip evaluates the other files and lists this one)")
            skipped += bad
            if not len(y):
                continue
            out = model(x)
            if out.shape[-1] != len(data.classes):
                raise EvalError(f"{model_path.name} outputs {out.shape[-1]} classes, {images} has {len(data.classes)}")
            preds.append(out.argmax(-1).numpy())
            labels.append(y.numpy())
    if not labels:
        raise EvalError(f"no readable image in {images} ({len(skipped)} skipped)")
    m = classification(np.concatenate(labels), np.concatenate(preds), data.classes)
    return m | {"model": str(model_path), "model_sha256": file_sha256(model_path), "sidecar": match,
                "skipped": data.skipped + [{"file": s.split(": ", 1)[0], "reason": s.split(": ", 1)[1]}
                                           for s in skipped]}
