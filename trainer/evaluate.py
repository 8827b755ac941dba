"""`trainer eval`: score a TorchScript file on an image folder exactly as the grader does.

Grader preprocessing: PIL open -> RGB, Resize((224, 224)) (squash, no crop), ToTensor(),
Normalize(ImageNet mean, std); class indices follow sorted() of the folder names.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import torch
from torchvision import datasets, transforms

from trainer.loader import IMAGENET_MEAN, IMAGENET_STD
from trainer.metrics import classification


class EvalError(ValueError):
    """The model or folder cannot be evaluated; the message says why."""


def grader_transform(size: int = 224, mean=IMAGENET_MEAN, std=IMAGENET_STD):
    return transforms.Compose([transforms.Resize((size, size)), transforms.ToTensor(), transforms.Normalize(mean, std)])


def load_sidecar(model_path: Path) -> dict | None:
    side = model_path.with_suffix(".json")
    return json.loads(side.read_text()) if side.is_file() else None


def evaluate(model_path: str | Path, images: str | Path, batch_size: int = 64, workers: int = 2) -> dict:
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
        data = datasets.ImageFolder(str(images), transform=grader_transform())
    except (FileNotFoundError, RuntimeError) as e:
        raise EvalError(f"{images}: {e}") from None
    sidecar = load_sidecar(model_path)
    if sidecar is not None and sidecar["classes"] != data.classes:
        missing = sorted(set(sidecar["classes"]) - set(data.classes))
        extra = sorted(set(data.classes) - set(sidecar["classes"]))
        raise EvalError(f"the classes of {model_path.name} and of {images} disagree: model has no {extra}, "
                        f"folder has no {missing}" if (missing or extra) else
                        f"the class order of {model_path.name} differs from sorted() of the folders in {images}")
    loader = torch.utils.data.DataLoader(data, batch_size=batch_size, num_workers=workers)
    preds, labels = [], []
    with torch.no_grad():
        for x, y in loader:
            out = model(x)
            if out.shape[-1] != len(data.classes):
                raise EvalError(f"{model_path.name} outputs {out.shape[-1]} classes, {images} has {len(data.classes)}")
            preds.append(out.argmax(-1).numpy())
            labels.append(y.numpy())
    return classification(np.concatenate(labels), np.concatenate(preds), data.classes)
