"""timm backbones as teachers: `timm:<name>` (timm's own pretrained weights, from the hub, as
`timm.create_model(name, pretrained=True)` finds them), `timm:hf-hub:<org>/<repo>`, or `timm:<folder>` (a
folder `timm.models.save_for_hf` wrote: config.json and model.safetensors).

The pooled embedding is timm's own pre-logits (`forward_head(forward_features(x), pre_logits=True)`: the
CLS token, or the pooled feature map, as the model was trained to be read); the patch grid is the
feature map of a convolutional network, or a transformer's tokens after its prefix tokens
(`num_prefix_tokens`: CLS, registers). Input size, mean, std and interpolation come from the weights'
pretrained config. Weights are read from safetensors only in a folder; from the hub timm prefers
safetensors and reads other weights with `weights_only=True`. timm runs no code from a checkpoint."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from featurestore.common import untrusted
from featurestore.teachers.base import Preprocess, Teacher, TeacherError, register

PREFIX = "timm:"


@dataclass
class TimmConfig:
    """What a timm teacher is, known before any weight is read."""
    name: str                       # what timm.create_model takes: a model name, hf-hub:..., or local-dir:...
    architecture: str
    input_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str
    embed_dim: int
    token_dim: int
    grid: int
    model_args: dict
    model_type: str = "timm"


class _Tower(torch.nn.Module):
    """A timm model as a tower run on pixel_values: (pooled (B, D), patch tokens (B, h * w, D'))."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model
        self.prefix = int(getattr(model, "num_prefix_tokens", 0) or 0)

    def forward(self, pixel_values: torch.Tensor):
        feats = self.model.forward_features(pixel_values)
        pooled = self.model.forward_head(feats, pre_logits=True)
        return pooled.flatten(1), _tokens(feats, self.prefix, int(self.model.num_features))


def _tokens(feats: torch.Tensor, prefix: int, width: int) -> torch.Tensor:
    if feats.dim() == 4:                                              # a feature map, NCHW or NHWC
        if feats.shape[1] != width and feats.shape[-1] == width:
            feats = feats.permute(0, 3, 1, 2)
        return feats.flatten(2).transpose(1, 2)
    return feats[:, prefix:]


@register
class TimmTeacher(Teacher):
    family = "timm"
    model_types = ("timm",)

    @classmethod
    def vision_config(cls, config):
        return config

    @classmethod
    def grid_side(cls, config) -> int:
        return int(config.grid)

    @classmethod
    def widths(cls, config) -> tuple[int, int]:
        return int(config.embed_dim), int(config.token_dim)

    @classmethod
    def meta_forward(cls, config):
        """The tower on the meta device and one view's input (FLOPs are counted on them)."""
        with torch.device("meta"):
            tower = _Tower(_create(config.name if not config.name.startswith("local-dir:") else config.architecture,
                                   False, config.model_args))
        return tower, torch.zeros(1, 3, config.input_size, config.input_size, device="meta")

    def read_out(self, out, n: int):
        pooled, tokens = out
        return pooled[:n], tokens[:n]


def is_timm(spec: str) -> bool:
    return spec.startswith(PREFIX)


def _create(name: str, pretrained: bool, model_args: dict | None = None):
    import timm
    return timm.create_model(name, pretrained=pretrained, **(model_args or {}))


def _name(spec: str) -> tuple[str, Path | None]:
    rest = spec[len(PREFIX):]
    if not rest:
        raise TeacherError("a timm teacher is timm:<model name>, timm:hf-hub:<org>/<repo> or timm:<folder>")
    folder = Path(rest).expanduser()
    if folder.is_dir():
        untrusted.check_teacher_folder(folder, weights=True)
        return f"local-dir:{folder}", folder
    if rest.startswith((".", "/", "~")):
        raise TeacherError(f"teacher directory not found: {rest}")
    return rest, None


def describe(spec: str) -> TimmConfig:
    """The config of a timm teacher from its name or folder, without its weights: the model is made on
    the meta device and one view run through it there."""
    import timm
    name, folder = _name(spec)
    args: dict = {}
    try:
        if folder is not None:
            data = json.loads((folder / "config.json").read_text())
            arch, args = data["architecture"], dict(data.get("model_args") or {})
            args.pop("num_classes", None)
            cfg = data.get("pretrained_cfg") or {}
        else:
            arch = name
            with torch.device("meta"):
                cfg = _create(name, False).pretrained_cfg
        with torch.device("meta"):
            model = _create(arch, False, args)
    except (KeyError, ValueError, TypeError, RuntimeError) as e:
        raise TeacherError(f"{spec}: timm cannot make this model ({untrusted.first_line(e)}); "
                           f"`timm.list_models()` names those it has") from None
    data_cfg = timm.data.resolve_data_config(dict(cfg), model=model)
    size = int(data_cfg["input_size"][-1])
    with torch.device("meta"):
        pooled, tokens = _Tower(model)(torch.zeros(1, 3, size, size))
    side = math.isqrt(tokens.shape[1])
    if side * side != tokens.shape[1]:
        raise TeacherError(f"{spec}: its {tokens.shape[1]} patch tokens make no square grid")
    return TimmConfig(name, arch, size, tuple(data_cfg["mean"]), tuple(data_cfg["std"]),
                      data_cfg.get("interpolation", "bicubic"), int(pooled.shape[-1]), int(tokens.shape[-1]), side,
                      args)


def load(spec: str, dtype: torch.dtype):
    """(config, tower, preprocessing) of a timm teacher, its pretrained weights read."""
    config = describe(spec)
    try:
        model = _create(config.name, True, config.model_args if config.name.startswith("local-dir:") else None)
    except Exception as e:  # noqa: BLE001 - hub and file errors become one actionable message
        raise TeacherError(f"cannot load teacher {spec!r} ({untrusted.first_line(e)}); offline, pass a folder "
                           "timm.models.save_for_hf wrote (timm:<folder>)") from None
    model.reset_classifier(0)
    resample = config.interpolation if config.interpolation in ("bilinear", "bicubic", "nearest") else "bicubic"
    return config, _Tower(model).to(dtype=dtype), Preprocess(config.input_size, config.mean, config.std, resample)
