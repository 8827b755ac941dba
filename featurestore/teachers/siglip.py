"""SigLIP and SigLIP 2 at fixed resolution (MedSigLIP-448 is a SiglipModel): the attention-pool output is
the pooled embedding, every token is a patch (no CLS), and the text tower gives SigLIP's zero-shot
logits, exp(logit_scale) * cos + logit_bias. `random:<arch>` teachers are SigLIPs with seeded weights."""
from __future__ import annotations

import torch

from featurestore.teachers.base import Preprocess, Teacher, TeacherError, class_embeddings, one_thread, register

RANDOM_ARCHS = {
    # vision and text towers share width; sizes follow the published configs
    "medsiglip-448": dict(width=1152, layers=27, heads=16, mlp=4304, patch=14, image=448,
                          vocab=32000, text_len=64),
    "tiny": dict(width=64, layers=2, heads=2, mlp=128, patch=14, image=112, vocab=128, text_len=16),
}


@register
class SiglipTeacher(Teacher):
    family = "siglip"
    model_types = ("siglip", "siglip_vision_model")

    @classmethod
    def model_class(cls, config):
        from transformers import SiglipModel, SiglipVisionModel
        return SiglipModel if config.model_type == "siglip" else SiglipVisionModel

    @classmethod
    def tower_class(cls, config):
        from transformers import SiglipVisionModel
        return SiglipVisionModel, cls.vision_config(config)

    @classmethod
    def text_capable(cls, config) -> bool:
        return config.model_type == "siglip"

    def tower_of(self, model):
        return getattr(model, "vision_model", model)              # SiglipVisionModel is the tower in v5

    def read_out(self, out, n: int):
        return out.pooler_output[:n], out.last_hidden_state[:n]

    @torch.inference_mode()
    def text_head(self, prompts: list[list[str]]):
        """Class embeddings (C, D), logit_scale, logit_bias, as SiglipModel uses them: each class's prompts
        embedded and L2-normalised, averaged, normalised again; one prompt gives SiglipModel's own."""
        if not self.info.has_text:
            return super().text_head(prompts)
        max_len = self.model.config.text_config.max_position_embeddings
        flat = [p for group in prompts for p in group]
        tok = self.tokenizer(flat, padding="max_length", truncation=True, max_length=max_len, return_tensors="pt")
        with one_thread(self.device):
            text = self.model.text_model(input_ids=tok["input_ids"].to(self.device)).pooler_output
        return (class_embeddings(text, prompts), float(self.model.logit_scale.float()),
                float(self.model.logit_bias.float()))


def random_config(arch: str):
    """SiglipConfig of a named architecture (random:<arch>)."""
    from transformers import SiglipConfig

    if arch not in RANDOM_ARCHS:
        raise TeacherError(f"unknown random architecture {arch!r}; choose one of {sorted(RANDOM_ARCHS)}")
    a = RANDOM_ARCHS[arch]
    tower = dict(hidden_size=a["width"], intermediate_size=a["mlp"], num_hidden_layers=a["layers"],
                 num_attention_heads=a["heads"])
    config = SiglipConfig(
        vision_config=dict(tower, image_size=a["image"], patch_size=a["patch"]),
        text_config=dict(tower, vocab_size=a["vocab"], max_position_embeddings=a["text_len"],
                         pad_token_id=0, bos_token_id=2, eos_token_id=2))
    config._attn_implementation = "sdpa"
    return config


def random_teacher(arch: str):
    """(model, preprocess, tokenizer) of random:<arch>: the same seeded weights in every process and run."""
    from transformers import SiglipModel

    config = random_config(arch)
    a = RANDOM_ARCHS[arch]
    state = torch.random.get_rng_state()
    torch.manual_seed(0)
    model = SiglipModel(config)
    torch.random.set_rng_state(state)
    return model, Preprocess(a["image"], (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "bicubic"), char_tokenizer(a["vocab"])


def char_tokenizer(vocab_size: int):
    """An offline character-level tokenizer for random teachers (their text weights are random)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = [chr(c) for c in range(32, 127)][: vocab_size - 3]
    vocab = {"<pad>": 0, "<unk>": 1, "</s>": 2} | {c: i + 3 for i, c in enumerate(chars)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", eos_token="</s>")
