"""CLIP (and OpenCLIP checkpoints saved as a transformers CLIPModel): with the text tower, the pooled
embedding is the projected image embedding (CLIP's shared space, where zero-shot compares it with the
class prompts: exp(logit_scale) * cos, no bias); a vision tower alone gives its pooled CLS token. The
patch tokens are the last hidden states without the CLS token."""
from __future__ import annotations

import torch

from featurestore.teachers.base import Teacher, class_embeddings, one_thread, register


@register
class ClipTeacher(Teacher):
    family = "clip"
    model_types = ("clip", "clip_vision_model")

    @classmethod
    def model_class(cls, config):
        from transformers import CLIPModel, CLIPVisionModel
        return CLIPModel if config.model_type == "clip" else CLIPVisionModel

    @classmethod
    def tower_class(cls, config):
        from transformers import CLIPVisionModel
        return CLIPVisionModel, cls.vision_config(config)

    @classmethod
    def widths(cls, config) -> tuple[int, int]:
        hidden = int(cls.vision_config(config).hidden_size)
        return (int(config.projection_dim) if config.model_type == "clip" else hidden), hidden

    @classmethod
    def text_capable(cls, config) -> bool:
        return config.model_type == "clip"

    def tower_of(self, model):
        return getattr(model, "vision_model", model)

    def read_out(self, out, n: int):
        pooled = out.pooler_output[:n]                                          # (B, hidden): the CLS token
        if hasattr(self.model, "visual_projection"):
            pooled = self.model.visual_projection(pooled)                       # (B, projection_dim)
        return pooled, out.last_hidden_state[:n, 1:]

    @torch.inference_mode()
    def text_head(self, prompts: list[list[str]]):
        """Class embeddings (C, D), logit_scale and a logit_bias of 0, as CLIPModel's logits_per_image."""
        if not self.info.has_text:
            return super().text_head(prompts)
        flat = [p for group in prompts for p in group]
        tok = self.tokenizer(flat, padding=True, truncation=True, return_tensors="pt",
                             max_length=self.model.config.text_config.max_position_embeddings)
        with one_thread(self.device):
            text = self.model.get_text_features(input_ids=tok["input_ids"].to(self.device),
                                                attention_mask=tok["attention_mask"].to(self.device))
        text = getattr(text, "pooler_output", text)
        return class_embeddings(text, prompts), float(self.model.logit_scale.float()), 0.0
