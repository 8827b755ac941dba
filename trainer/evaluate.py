"""`trainer eval`: score a TorchScript file on an image folder exactly as the grader does; and the same
scoring of a store's held-out images, which `trainer fit` uses every epoch and on the file it exports.

Grader preprocessing: PIL open -> RGB, Resize((224, 224)) (squash, no crop), ToTensor(),
Normalize(ImageNet mean, std); class indices follow sorted() of the folder names. Files PIL cannot
read are skipped and listed in the report (`on_bad_image="skip"`), or stop the evaluation naming
the file (`"fail"`). A store's images are fed the same way (`held_out_batches`): the stored squashed
image resized to the grader's side, scaled and normalised. Both go through `predict` and `scored`.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision import transforms
from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes

from featurestore.common.children import worker_init
from featurestore.common.errors import KdstoreError
from featurestore.common.log import logger
from featurestore.common.untrusted import read_json
from featurestore.pipeline.sources import image_files
from trainer.exporter import GRADER_SIZE, file_sha256, sidecar_check
from trainer.metrics import classification
from trainer.students import IMAGENET_MEAN, IMAGENET_STD


class EvalError(KdstoreError, ValueError):
    """The model or folder cannot be evaluated; the message says why."""


def grader_transform(size: int = 224, mean=IMAGENET_MEAN, std=IMAGENET_STD):
    """The grader's preprocessing: Resize((size, size)) (squash), ToTensor(), Normalize(ImageNet)."""
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


def load_model(model_path: Path) -> torch.jit.ScriptModule:
    """A TorchScript file, loaded as the grader loads it."""
    model_path = Path(model_path)
    if not model_path.is_file():
        raise EvalError(f"model not found: {model_path}")
    warnings.filterwarnings("ignore", message=r"`torch\.jit\.\w+` is deprecated", category=FutureWarning)
    try:
        return torch.jit.load(str(model_path), map_location="cpu").eval()
    except Exception as e:  # noqa: BLE001
        raise EvalError(f"{model_path} is not a TorchScript file torch.jit.load can read ({e})") from None


def size_warning(model_path: Path, sidecar: dict | None, size: int) -> str | None:
    """Why a file's scores at `size` px mean little: it was trained at another size and does not resize its
    input (exported by a kdstore from before files resized it)."""
    if sidecar is None or sidecar.get("accepts_any_size") or sidecar["input_size"][-1] == size:
        return None
    trained = sidecar["input_size"][-1]
    return (f"warning: {model_path.name} was trained at {trained} px and does not resize its input; fed {size} px "
            f"images it sees a scale it never saw in training: export the run again (`trainer export --run RUN`), "
            f"and the file resizes what the grader gives it to {trained} px")


def predict(model, batches, device: torch.device | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(labels, logits) of `model` over (x, y) batches of the grader's input (moved to `device`)."""
    labels, logits = [], []
    with torch.no_grad():
        for x, y in batches:
            labels.append(np.asarray(y))
            logits.append(model(x if device is None else x.to(device)).float().cpu().numpy())
    return np.concatenate(labels), np.concatenate(logits)


def scored(labels: np.ndarray, logits: np.ndarray, classes: list[str], model_path: Path | None = None) -> dict:
    """The grader's metrics of these predictions, the three weakest classes and the file's size."""
    if logits.shape[-1] != len(classes):
        raise EvalError(f"{model_path.name if model_path else 'the model'} outputs {logits.shape[-1]} classes, the "
                        f"images have {len(classes)}")
    m = classification(labels, logits.argmax(-1), classes)
    m["weakest"] = [r["name"] for r in sorted(m["per_class"], key=lambda r: (r["f1"], r["index"]))[:3]]
    if model_path is not None:
        m |= {"model": str(model_path), "size_mb": Path(model_path).stat().st_size / 1e6,
              "model_sha256": file_sha256(model_path)}
    return m


def evaluate(model_path: str | Path, images: str | Path, batch_size: int = 64, workers: int = 2,
             on_bad_image: str = "skip", size: int = GRADER_SIZE) -> dict:
    """Score a TorchScript file on an ImageFolder as the grader does (size: the Resize side; 224 is the
    grader's)."""
    model_path, images = Path(model_path), Path(images)
    model = load_model(model_path)
    if not images.is_dir():
        raise EvalError(f"image folder not found: {images}")
    try:
        data = GraderFolder(images, grader_transform(size))
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
    warning = size_warning(model_path, sidecar, size)
    if warning:
        logger.warning(warning)
    loader = torch.utils.data.DataLoader(data, batch_size=batch_size, num_workers=workers, collate_fn=_collate,
                                         worker_init_fn=worker_init() if workers else None)
    skipped = []

    def batches():
        for x, y, bad in loader:
            if bad and on_bad_image == "fail":
                raise EvalError(f"cannot read {images / bad[0].split(': ', 1)[0]}: {bad[0].split(': ', 1)[1]} "
                                "(--on-bad-image skip evaluates the other files and lists this one)")
            skipped.extend(bad)
            if len(y):
                yield x, y
    labels, logits = predict(model, batches())
    if not len(labels):
        raise EvalError(f"no readable image in {images} ({len(skipped)} skipped)")
    m = scored(labels, logits, data.classes, model_path)
    return m | {"image_size": size, "sidecar": match, "size_warning": warning,
                "skipped": data.skipped + [{"file": s.split(": ", 1)[0], "reason": s.split(": ", 1)[1]}
                                           for s in skipped]}


def held_out_batches(data, indices: np.ndarray, size: int = GRADER_SIZE, batch_size: int = 64):
    """(x, y) batches of stored images as the grader feeds its files: each squashed S x S image resized
    (antialiased bilinear, to whole levels, as torchvision's Resize on the file) to size x size, scaled
    to [0, 1] and normalised with ImageNet's mean/std. data: the run's StoreData."""
    from featurestore.views.resize import resize
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    idx = np.sort(np.asarray(indices))
    for a in range(0, len(idx), batch_size):
        rows = idx[a:a + batch_size]
        images = torch.from_numpy(data.rows(rows)).permute(0, 3, 1, 2)                  # (B, 3, S, S) uint8
        x = torch.stack([resize(img.contiguous(), size, "bilinear") for img in images]).float() / 255
        yield (x - mean) / std, data.labels[rows]


def evaluate_held_out(model, data, indices: np.ndarray, size: int = GRADER_SIZE, model_path: Path | None = None,
                      logits_out: list | None = None) -> dict:
    """The grader's metrics of `model` (a loaded student.pt, or the eager module it holds) on the store's
    images `indices`, fed as the grader feeds files (`held_out_batches`). logits_out: receives the logits."""
    modes = [(m, m.training) for m in model.modules()]
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    model.eval()
    try:
        labels, logits = predict(model, held_out_batches(data, indices, size), device)
    finally:
        for m, training in modes:
            m.train(training)
    if logits_out is not None:
        logits_out.append(logits)
    return scored(labels, logits, data.classes, model_path) | {"image_size": size}
