"""Student registry: a plain dict from name to its entry, plus any timm model as `timm:<name>`.

Each entry (`StudentSpec`, as timm's pretrained_cfg) declares what the model expects: its input size,
the mean/std its weights were trained with, and the width F of its feature map and pooled vector.
Every student is wrapped as `Student`: forward_features(x) -> (B, F, h, w) map, pool -> (B, F), head ->
(B, C), so the feature losses can reach the pooled vector and the last map. forward(x) returns logits.
"""
from __future__ import annotations

import http.client
import pickle
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torchvision
from torch import nn

from featurestore.common.errors import KdstoreError


class StudentError(KdstoreError, ValueError):
    """Unknown student, or weights that are not available."""


class Student(nn.Module):
    def __init__(self, features: nn.Module, head: nn.Module):
        super().__init__()
        self.features = features
        self.head = head

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)                                  # (B, F, h, w)

    def pool(self, fmap: torch.Tensor) -> torch.Tensor:
        return fmap.mean((2, 3))                                 # (B, F)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool(self.forward_features(x)))   # (B, C)


def _shufflenet(name):
    def make(num_classes: int, weights) -> Student:
        m = getattr(torchvision.models, name)(weights=weights)
        feats = nn.Sequential(m.conv1, m.maxpool, m.stage2, m.stage3, m.stage4, m.conv5)
        return Student(feats, _fresh_linear(m.fc, num_classes))
    return make


def _mobilenet_v3(name):
    def make(num_classes: int, weights) -> Student:
        m = getattr(torchvision.models, name)(weights=weights)
        # classifier: Linear -> Hardswish -> Dropout -> Linear; the pooled feature is its input
        head = nn.Sequential(*list(m.classifier[:-1]), _fresh_linear(m.classifier[-1], num_classes))
        return Student(m.features, head)
    return make


def _efficientnet(name):
    def make(num_classes: int, weights) -> Student:
        m = getattr(torchvision.models, name)(weights=weights)
        head = nn.Sequential(m.classifier[0], _fresh_linear(m.classifier[1], num_classes))
        return Student(m.features, head)
    return make


def _regnet(name):
    def make(num_classes: int, weights) -> Student:
        m = getattr(torchvision.models, name)(weights=weights)
        return Student(nn.Sequential(m.stem, m.trunk_output), _fresh_linear(m.fc, num_classes))
    return make


def _fresh_linear(old: nn.Linear, num_classes: int) -> nn.Linear:
    return nn.Linear(old.in_features, num_classes)


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class StudentSpec:
    make: Callable                                  # (num_classes, weights) -> Student
    features: int                                   # F: channels of the feature map and width of the pooled vector
    input_size: int = 224
    mean: tuple[float, float, float] = IMAGENET_MEAN   # what its (pretrained) weights expect
    std: tuple[float, float, float] = IMAGENET_STD


TORCHVISION: dict[str, StudentSpec] = {
    "shufflenet_v2_x0_5": StudentSpec(_shufflenet("shufflenet_v2_x0_5"), 1024),
    "shufflenet_v2_x1_0": StudentSpec(_shufflenet("shufflenet_v2_x1_0"), 1024),
    "shufflenet_v2_x1_5": StudentSpec(_shufflenet("shufflenet_v2_x1_5"), 1024),
    "shufflenet_v2_x2_0": StudentSpec(_shufflenet("shufflenet_v2_x2_0"), 2048),
    "mobilenet_v3_small": StudentSpec(_mobilenet_v3("mobilenet_v3_small"), 576),
    "mobilenet_v3_large": StudentSpec(_mobilenet_v3("mobilenet_v3_large"), 960),
    "efficientnet_b0": StudentSpec(_efficientnet("efficientnet_b0"), 1280),
    "regnet_y_400mf": StudentSpec(_regnet("regnet_y_400mf"), 440),
    "regnet_y_800mf": StudentSpec(_regnet("regnet_y_800mf"), 784),
}


class TimmStudent(nn.Module):
    """A timm model behind the Student interface (its own pooling and pre-logits layers)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.forward_features(x)                   # (B, F, h, w)

    def pool(self, fmap: torch.Tensor) -> torch.Tensor:
        return self.model.forward_head(fmap, pre_logits=True)   # (B, F')

    def head(self, v: torch.Tensor) -> torch.Tensor:
        return self.model.get_classifier()(v)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


def _timm_check(name: str) -> None:
    import timm
    if name not in timm.list_models():
        close = timm.list_models(f"*{name}*")[:5]
        raise StudentError(f"unknown timm model {name!r}" + (f"; similar: {close}" if close else ""))


def _timm(name: str, num_classes: int, pretrained: bool) -> TimmStudent:
    import timm
    _timm_check(name)
    try:
        model = timm.create_model(name, pretrained=pretrained, num_classes=num_classes)
    except Exception as e:  # noqa: BLE001 - download failures become one clear message
        raise StudentError(f"timm could not provide pretrained weights for {name} ({str(e).splitlines()[0]}); "
                           "without network access, drop --pretrained or place the weights in the HF cache") from None
    return TimmStudent(model)


def available() -> list[str]:
    return sorted(TORCHVISION) + ["timm:<any timm model name>"]


def spec_of(name: str) -> StudentSpec:
    """The registry entry of a student; for timm:<name>, made from timm's own pretrained_cfg."""
    if name.startswith("timm:"):
        import timm
        _timm_check(name[5:])
        model = timm.create_model(name[5:], pretrained=False, num_classes=0)
        cfg = model.pretrained_cfg
        return StudentSpec(lambda c, w: _timm(name[5:], c, w), model.num_features, int(cfg["input_size"][-1]),
                           tuple(cfg["mean"]), tuple(cfg["std"]))
    if name not in TORCHVISION:
        raise StudentError(f"unknown student {name!r}; choose one of {available()}")
    return TORCHVISION[name]


def create_student(name: str, num_classes: int, pretrained: bool = False) -> Student | TimmStudent:
    """A student with a fresh `num_classes` head. pretrained: ImageNet weights as torchvision loads
    them, from the torch hub cache ($TORCH_HOME/hub/checkpoints) or downloaded into it once."""
    if name.startswith("timm:"):
        return _timm(name[5:], num_classes, pretrained)
    spec = spec_of(name)
    if not pretrained:
        return spec.make(num_classes, None)
    weights = torchvision.models.get_model_weights(name).DEFAULT
    cache = Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name
    try:
        return spec.make(num_classes, weights)
    except (OSError, http.client.HTTPException) as e:         # no network, refused, interrupted download
        raise StudentError(f"ImageNet weights for {name} are not in the local cache ({cache}) and could not be "
                           f"downloaded ({_reason(e)}); run once with network access, copy {cache.name} there, "
                           "or train without --pretrained") from None
    except (RuntimeError, EOFError, pickle.UnpicklingError) as e:   # a damaged file in the cache, a bad hash
        raise StudentError(f"the ImageNet weights for {name} at {cache} are damaged ({_reason(e)}); delete the "
                           "file and run again") from None


def _reason(e: BaseException) -> str:
    return (str(getattr(e, "reason", "")) or str(e) or type(e).__name__).splitlines()[0]


def size_mb(model: nn.Module) -> float:
    tensors = {id(t): t for t in list(model.parameters()) + list(model.buffers())}
    return sum(t.numel() * t.element_size() for t in tensors.values()) / 1e6
