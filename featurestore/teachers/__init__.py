"""Teachers: one class per model family (base.py's protocol), found by the checkpoint's model_type.

`--teacher` takes a hub id, a local directory in Hugging Face format, or `random:<arch>` (a SigLIP of the
named size with seeded random weights, for demos, tests and throughput benchmarks). Every load goes
through featurestore/common/untrusted.py: no remote code, safetensors weights only. Input size, mean/std and
resize method come from the checkpoint's own preprocessor config.

    siglip   SiglipModel, SiglipVisionModel (MedSigLIP, SigLIP 2 at fixed resolution)   siglip.py
    clip     CLIPModel, CLIPVisionModel                                                    clip.py
    dinov2   Dinov2Model, Dinov2WithRegistersModel                                         dinov2.py
    auto     any other transformers vision backbone with a hidden size (ViT, ConvNeXt, ...)  auto.py
    timm     `timm:<name>`, `timm:hf-hub:<repo>`, `timm:<folder>`: any timm backbone          timm_backbones.py

A new family is one module here with a `Teacher` subclass under `@register` (base.py): every module of
this package is imported, so nothing else lists it.
"""
from __future__ import annotations

import importlib
import os
import pkgutil
from pathlib import Path

import torch

from featurestore.common import devices, untrusted
from featurestore.common.errors import KdstoreError
from featurestore.teachers.auto import AutoTeacher
from featurestore.teachers.base import (
    COMPILE_BACKEND,
    FAMILIES,
    Preprocess,
    Teacher,
    TeacherError,
    TeacherInfo,
    attention_kernels,
    eager,
    one_thread,
    register,
    zeroshot_logits,
)
from featurestore.teachers.clip import ClipTeacher
from featurestore.teachers.dinov2 import Dinov2Teacher
from featurestore.teachers.siglip import RANDOM_ARCHS, SiglipTeacher, char_tokenizer, random_config, random_teacher
from featurestore.teachers.timm_backbones import TimmTeacher, is_timm

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

_RESAMPLE = {0: "nearest", 2: "bilinear", 3: "bicubic", 1: "bicubic", 4: "bilinear", 5: "bicubic"}

__all__ = ["COMPILE_BACKEND", "FAMILIES", "RANDOM_ARCHS", "AutoTeacher", "ClipTeacher", "Dinov2Teacher",
           "Preprocess", "SiglipTeacher", "Teacher", "TeacherError", "TeacherInfo", "attention_kernels",
           "char_tokenizer", "check_patch_grid", "describe", "eager", "flops_per_view", "load_teacher", "one_thread",
           "random_config", "register", "TimmTeacher", "zeroshot_logits"]


def family_of(config) -> type[Teacher]:
    return FAMILIES.get(getattr(config, "model_type", ""), AutoTeacher)


def describe(spec: str, revision: str | None = None) -> tuple[type[Teacher], object]:
    """(family, config) of a teacher spec, from config.json alone (no weights)."""
    if spec.startswith("random:"):
        return SiglipTeacher, random_config(spec.split(":", 1)[1])
    if is_timm(spec):
        from featurestore.teachers import timm_backbones
        return TimmTeacher, timm_backbones.describe(spec)
    from transformers import AutoConfig
    config = _hub_call(spec, lambda: untrusted.hf_load(AutoConfig, spec, revision))
    return family_of(config), config


def check_patch_grid(grid: int, spec: str, revision: str | None = None) -> None:
    """A stored patch grid pools the tower's token grid: it cannot be finer than that grid."""
    family, config = describe(spec, revision)
    side = family.grid_side(config)
    if grid > side:
        raise TeacherError(f"--patch-grid {grid} exceeds the {side} x {side} grid of patch tokens of {spec}; "
                           f"choose 1..{side} (0: no patches)")


def flops_per_view(family: type[Teacher], config) -> float:
    """FLOPs of one view through the vision tower, counted by torch's FlopCounterMode on the meta device,
    with attention written out as matrix products (eager), so that every product is counted."""
    from torch.utils.flop_counter import FlopCounterMode
    model, x = family.meta_forward(config)
    with FlopCounterMode(display=False) as counter:
        model(pixel_values=x)
    return float(counter.get_total_flops())


def load_teacher(spec: str, revision: str | None = None, device: str = "auto", dtype: str = "auto") -> Teacher:
    dev = devices.pick_device(device)
    dt = devices.teacher_dtype(dtype, devices.caps_of(dev))
    if spec.startswith("random:"):
        arch = spec.split(":", 1)[1]
        config = random_config(arch)
        model, pre, tokenizer = random_teacher(arch)
        family, rev, weights = SiglipTeacher, None, "random"
    elif is_timm(spec):
        from featurestore.teachers import timm_backbones
        config, model, pre = timm_backbones.load(spec, dt)
        family, rev, weights, tokenizer = TimmTeacher, None, "pretrained", None
    else:
        family, config, model, pre, tokenizer, rev = _pretrained(spec, revision, dt)
        weights = "pretrained"
    model = model.to(dev, dt).eval()
    vcfg = family.vision_config(config)
    embed, token = family.widths(config)
    info = TeacherInfo(
        id=spec, revision=rev, weights=weights, dtype=str(dt).replace("torch.", ""),
        image_size=pre.size, mean=list(pre.mean), std=list(pre.std), resize=pre.resample,
        embed_dim=embed, token_dim=token, num_patches=family.grid_side(config) ** 2, family=family.family,
        has_text=family.text_capable(config) and tokenizer is not None,
        extra={"layers": getattr(vcfg, "num_hidden_layers", None), "patch_size": getattr(vcfg, "patch_size", None),
               "model_type": getattr(config, "model_type", None),
               "attn_implementation": getattr(getattr(model, "config", None), "_attn_implementation", None)})
    teacher = family(model, pre, info, tokenizer, dev, dt, config)
    if family is AutoTeacher:
        _read_out_check(teacher)
    return teacher


def _read_out_check(teacher: Teacher) -> None:
    """One view through a backbone of no known family: pooled and patch outputs must read out."""
    size = teacher.pre.size
    try:
        pooled, patches = teacher.encode(torch.zeros(1, 3, size, size), patch_grid=1, check=False)
    except KdstoreError:
        raise
    except Exception as e:  # noqa: BLE001 - a model whose outputs kdstore cannot read: one line
        raise TeacherError(f"{teacher.info.id} ({teacher.info.extra['model_type']}) gives no pooled embedding and "
                           f"patch grid kdstore can read ({untrusted.first_line(e)}); kdstore teachers are SigLIP, "
                           "CLIP, DINOv2 or transformers vision backbones") from None
    if pooled.shape[-1] != teacher.info.embed_dim or patches.shape[-1] != teacher.info.token_dim:
        raise TeacherError(f"{teacher.info.id}: its outputs ({tuple(pooled.shape)}, {tuple(patches.shape)}) are not "
                           f"the widths its config gives ({teacher.info.embed_dim})")


def _pretrained(spec: str, revision: str | None, dtype: torch.dtype):
    from transformers import AutoImageProcessor, AutoTokenizer

    local = Path(spec).is_dir()
    if not local and (spec.startswith((".", "/", "~")) or os.sep in spec and Path(spec).parent.exists()):
        raise TeacherError(f"teacher directory not found: {spec}")
    family, config = describe(spec, revision)
    if family is AutoTeacher and not _is_vision(config):
        raise TeacherError(f"{spec} is a {config.model_type!r} model, not a vision model; kdstore teachers are SigLIP, "
                           "CLIP, DINOv2 or transformers vision backbones")
    kw = {"dtype": dtype}
    if family is not AutoTeacher:
        kw["attn_implementation"] = "sdpa"
    model = _hub_call(spec, lambda: untrusted.hf_load(family.model_class(config), spec, revision, weights=True, **kw))
    try:
        proc = untrusted.hf_load(AutoImageProcessor, spec, revision)
    except Exception as e:  # noqa: BLE001
        raise TeacherError(f"{spec} has no usable preprocessor_config.json ({untrusted.first_line(e)}); it sets the "
                           "input size, mean/std and resize method") from None
    pre = Preprocess(_input_side(proc), tuple(proc.image_mean), tuple(proc.image_std),
                     _RESAMPLE.get(int(getattr(proc, "resample", 3) or 3), "bicubic"))
    tokenizer = None
    if family.text_capable(config):
        try:
            tokenizer = untrusted.hf_load(AutoTokenizer, spec, revision)
        except Exception:  # noqa: BLE001 - a model without tokenizer files still gives the probe head
            tokenizer = None
    rev = getattr(config, "_commit_hash", None) or revision
    return family, config, model, pre, tokenizer, rev


def _is_vision(config) -> bool:
    v = getattr(config, "vision_config", config)
    return any(hasattr(v, key) for key in ("image_size", "num_channels", "hidden_sizes"))


def _input_side(proc) -> int:
    """The side the processor feeds the model: its crop where it crops, else its resize."""
    for name in ("crop_size", "size"):
        size = getattr(proc, name, None)
        if size is None or (name == "crop_size" and not getattr(proc, "do_center_crop", True)):
            continue
        get = size.get if isinstance(size, dict) else lambda k, s=size: getattr(s, k, None)
        side = get("height") or get("shortest_edge")
        if side:
            return int(side)
    raise TeacherError("the checkpoint's preprocessor config gives no input size")


def _hub_call(spec: str, call):
    """A transformers call on a teacher spec; what fails becomes one TeacherError saying why."""
    try:
        return call()
    except KdstoreError:
        raise
    except Exception as e:  # noqa: BLE001 - hub and file errors become one actionable message
        raise TeacherError(_access_message(spec, e)) from None


def _access_message(spec: str, err: Exception) -> str:
    text = untrusted.first_line(err)
    if Path(spec).is_dir():
        return f"cannot load the teacher folder {spec}: {text}"
    if any(s in str(err) for s in ("401", "403", "gated", "restricted", "awaiting a review")):
        return (f"access to {spec} was refused: it is a gated model. Accept its terms on the Hugging Face "
                f"page of {spec}, then set HF_TOKEN (or run `hf auth login`) and retry. ({text})")
    if "model.safetensors" in str(err):
        return (f"{spec} publishes no safetensors weights, and kdstore loads teacher weights from safetensors only "
                "(pickled .bin weights can run code when they are read); convert them where you trust the file")
    return (f"cannot load teacher {spec!r}: it is not a local folder, and the hub could not provide it ({text}). "
            "Offline? Pass a local directory saved with save_pretrained, or random:medsiglip-448 / random:tiny for "
            "random weights.")
