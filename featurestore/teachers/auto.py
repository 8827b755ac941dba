"""Any transformers vision backbone through AutoModel, where its outputs are well defined: a
convolutional one (ResNet, ConvNeXt, ...) gives a feature map (B, C, h, w), pooled by its own pooler
(else the mean); a transformer (ViT, DeiT, BEiT, ...) gives tokens, of which the trailing square grid
are the patches and the first (the CLS token) is the pooled embedding."""
from __future__ import annotations

import math

from featurestore.teachers.base import Teacher, TeacherError


class AutoTeacher(Teacher):
    family = "auto"

    @classmethod
    def grid_side(cls, config) -> int:
        v = cls.vision_config(config)
        if hasattr(v, "patch_size") and hasattr(v, "image_size"):
            return int(v.image_size) // int(v.patch_size)
        return 7                                                                # a /32 network at 224 px

    @classmethod
    def widths(cls, config) -> tuple[int, int]:
        v = cls.vision_config(config)
        width = getattr(v, "hidden_size", None)
        if isinstance(width, (list, tuple)) or width is None:
            width = (getattr(v, "hidden_sizes", None) or [None])[-1]
        if width is None:
            raise TeacherError(f"cannot tell the output width of a {config.model_type!r} model; kdstore teachers "
                               "are SigLIP, CLIP, DINOv2 or transformers vision backbones with a hidden size")
        return int(width), int(width)

    def read_out(self, out, n: int):
        h = out.last_hidden_state[:n]
        if h.dim() == 4:                                                        # (B, C, h, w) feature map
            pooled = getattr(out, "pooler_output", None)
            pooled = h.mean((2, 3)) if pooled is None else pooled[:n].flatten(1)
            return pooled, h.flatten(2).transpose(1, 2)                         # (B, h * w, C)
        t = h.shape[1]
        side = math.isqrt(t)
        prefix = t - side * side
        pooled = h[:, 0] if prefix else h.mean(1)
        return pooled, h[:, prefix:]
