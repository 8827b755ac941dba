"""DINOv2 (with or without registers): the pooled embedding is the CLS token after the last layer norm
(`pooler_output`), the patch tokens are the last hidden states without the CLS and register tokens. No
text tower: the store's heads are the probe (and spread)."""
from __future__ import annotations

from featurestore.teachers.base import Teacher, register


@register
class Dinov2Teacher(Teacher):
    family = "dinov2"
    model_types = ("dinov2", "dinov2_with_registers")

    def read_out(self, out, n: int):
        prefix = 1 + int(getattr(self.config, "num_register_tokens", 0) or 0)
        return out.pooler_output[:n], out.last_hidden_state[:n, prefix:]
