"""The teacher: a SigLIP-family model through transformers (MedSigLIP-448 is a SiglipModel).

`--teacher` is a hub id, a local directory in Hugging Face format, or `random:<arch>` (the same
architecture with seeded random weights, for demos, tests and throughput benchmarks). Input size,
mean/std and resize method come from the model's own preprocessor config.
"""
from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from featurestore import devices, untrusted, views
from featurestore.errors import KdstoreError

RANDOM_ARCHS = {
    # vision and text towers share width; sizes follow the published configs
    "medsiglip-448": dict(width=1152, layers=27, heads=16, mlp=4304, patch=14, image=448,
                          vocab=32000, text_len=64),
    "tiny": dict(width=64, layers=2, heads=2, mlp=128, patch=14, image=112, vocab=128, text_len=16),
}
_RESAMPLE = {0: "nearest", 2: "bilinear", 3: "bicubic", 1: "bicubic", 4: "bilinear", 5: "bicubic"}


class TeacherError(KdstoreError, RuntimeError):
    """The teacher could not be loaded; the message says why and what to do."""


@dataclass
class Preprocess:
    size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    resample: str                     # bilinear | bicubic | nearest, as the processor config says


@dataclass
class TeacherInfo:
    id: str
    revision: str | None
    weights: str                      # "pretrained" or "random"
    dtype: str
    image_size: int
    mean: list[float]
    std: list[float]
    resize: str
    embed_dim: int
    num_patches: int
    has_text: bool
    extra: dict = field(default_factory=dict)


class Teacher:
    """Runs the vision tower on rendered views; the text tower once for zero-shot prompts.

    `prepare(batch, compiled=True)` compiles the tower for one batch shape (a shorter batch is padded)."""

    def __init__(self, model, preprocess: Preprocess, info: TeacherInfo, tokenizer, device, dtype, vision_config):
        self.model, self.pre, self.info, self.tokenizer = model, preprocess, info, tokenizer
        self.device, self.dtype, self.vision_config = device, dtype, vision_config
        self.vision = getattr(model, "vision_model", model)     # SiglipVisionModel is the tower in v5
        self._mean = torch.tensor(preprocess.mean, device=device).view(1, 3, 1, 1)
        self._std = torch.tensor(preprocess.std, device=device).view(1, 3, 1, 1)
        self.batch: int | None = None                            # fixed forward batch (padded), once prepared
        self.compiled = False
        self._tower = self.vision

    def prepare(self, batch: int, compiled: bool = False) -> None:
        """compiled: torch.compile the tower for batches of `batch` views (fewer are padded to it, so it
        meets one shape) and run it once now, so that the first batch of a pass does not wait for it."""
        self.batch = batch
        if compiled and not self.compiled:
            self._tower = torch.compile(self.vision, backend=COMPILE_BACKEND, dynamic=False)
            self.compiled = True
            self.info.extra["compiled"] = True
        if self.compiled:
            self.encode(torch.zeros(1, 3, self.pre.size, self.pre.size, device=self.device), check=False)

    @torch.inference_mode()
    def encode(self, pixels: torch.Tensor, patch_grid: int = 0, check: bool = True):
        """pixels: float (B, 3, size, size) in [0, 1] -> pooled (B, D), patches (B, g, g, D) or None, in the
        compute dtype, on the teacher's device: the patch grid is pooled before any upcast (a GPU moves
        a bfloat16 token grid, not a float32 one). check: in float16, raise if an output overflowed
        (reads a flag back from the device; the teacher pass checks its stored arrays instead).
        On a CPU the tower runs on one thread (see `one_thread`)."""
        n = len(pixels)
        x = ((pixels.to(self.device, non_blocking=True) - self._mean) / self._std).to(self.dtype)
        if self.compiled and n < self.batch:
            x = torch.cat([x, x.new_zeros((self.batch - n,) + tuple(x.shape[1:]))])
        with one_thread(self.device), attention_kernels(self.device):
            out = self._tower(pixel_values=x)
        pooled = out.pooler_output[:n]                                       # (B, D)
        patches = None
        if patch_grid:
            tokens = out.last_hidden_state[:n]                               # (B, T, D)
            b, t, d = tokens.shape
            side = math.isqrt(t)
            grid = tokens.transpose(1, 2).reshape(b, d, side, side)          # (B, D, h, w)
            patches = F.adaptive_avg_pool2d(grid, patch_grid).permute(0, 2, 3, 1)  # (B, g, g, D)
        if check and self.dtype == torch.float16 and not (torch.isfinite(pooled).all() and
                                                          (patches is None or torch.isfinite(patches).all())):
            raise TeacherError(self.overflow_message())
        return pooled, patches

    def overflow_message(self) -> str:
        if self.dtype == torch.float16:
            return (f"the teacher's outputs overflow float16 on {self.device}; this model needs --dtype float32 "
                    "(or bfloat16 on a GPU that supports it)")
        return (f"the teacher's outputs (computed in {str(self.dtype).replace('torch.', '')}) are not finite or "
                "exceed float16's range (65504), the store's dtype for them; this teacher cannot be stored as is")

    @torch.inference_mode()
    def text_head(self, prompts: list[list[str]]):
        """Class embeddings (C, D), logit_scale, logit_bias, as SiglipModel uses them.

        Each class's prompts are embedded and L2-normalised, averaged, and normalised again, so
        logits = exp(logit_scale) * cos(image, class) + logit_bias; one prompt gives SiglipModel's own.
        """
        if not self.info.has_text:
            raise TeacherError("this teacher has no text tower; the zero-shot head needs a SiglipModel")
        max_len = self.model.config.text_config.max_position_embeddings
        flat = [p for group in prompts for p in group]
        tok = self.tokenizer(flat, padding="max_length", truncation=True, max_length=max_len, return_tensors="pt")
        with one_thread(self.device):
            text = self.model.text_model(input_ids=tok["input_ids"].to(self.device)).pooler_output.float()
        text = F.normalize(text, dim=-1)                                     # (sum of prompts, D)
        owner = torch.tensor([c for c, group in enumerate(prompts) for _ in group], device=text.device)
        classes = torch.zeros(len(prompts), text.shape[-1], device=text.device).index_add_(0, owner, text)
        return (F.normalize(classes, dim=-1), float(self.model.logit_scale.float()),
                float(self.model.logit_bias.float()))

    def render(self, sources, index, params, partner_index=None):
        """Render views at the teacher's input size with its resize method, on the teacher's device."""
        return views.render(sources, index, params, self.pre.size, self.pre.resample, partner_index)


COMPILE_BACKEND = "inductor"


@contextlib.contextmanager
def attention_kernels(device: torch.device):
    """On CUDA, attention through the fused kernels only (flash, memory-efficient or cuDNN): a shape or
    dtype they cannot take fails loudly instead of falling back to the unfused math kernel."""
    if device.type != "cuda":
        yield
        return
    from torch.nn.attention import SDPBackend, sdpa_kernel
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION]):
        yield


@contextlib.contextmanager
def one_thread(device: torch.device):
    """On a CPU, the teacher's sums on one thread: a matrix product split over a different number of
    threads can round differently, and a store must come out the same bits whatever the launch (one
    process of many threads, or torchrun's ranks of one thread each). A CPU build uses its cores
    through ranks and decoding processes instead."""
    if device.type != "cpu":
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def zeroshot_logits(pooled: torch.Tensor, text: torch.Tensor, scale: float, bias: float) -> torch.Tensor:
    """logits = exp(logit_scale) * cos(image, text) + logit_bias  (B, C)."""
    return F.normalize(pooled.float(), dim=-1) @ text.T * math.exp(scale) + bias


def load_teacher(spec: str, revision: str | None = None, device: str = "auto", dtype: str = "auto") -> Teacher:
    dev = devices.pick_device(device)
    dt = devices.teacher_dtype(dtype, devices.caps_of(dev))
    if spec.startswith("random:"):
        model, pre, tokenizer, rev, weights = _random_teacher(spec.split(":", 1)[1])
    else:
        model, pre, tokenizer, rev, weights = _pretrained_teacher(spec, revision, dt)
    model = model.to(dev, dt).eval()
    vcfg = model.config.vision_config if hasattr(model.config, "vision_config") else model.config
    has_text = hasattr(model, "text_model")
    info = TeacherInfo(
        id=spec, revision=rev, weights=weights, dtype=str(dt).replace("torch.", ""),
        image_size=pre.size, mean=list(pre.mean), std=list(pre.std), resize=pre.resample,
        embed_dim=vcfg.hidden_size, num_patches=token_grid(vcfg) ** 2,
        has_text=has_text and tokenizer is not None,
        extra={"layers": vcfg.num_hidden_layers, "patch_size": vcfg.patch_size,
               "attn_implementation": getattr(model.config, "_attn_implementation", None)})
    return Teacher(model, pre, info, tokenizer, dev, dt, vcfg)


def vision_config(spec: str, revision: str | None = None):
    """The vision tower's config of a teacher spec, without loading weights (config.json only)."""
    if spec.startswith("random:"):
        return random_config(spec.split(":", 1)[1]).vision_config
    from transformers import AutoConfig
    config = _hub_call(spec, lambda: untrusted.hf_load(AutoConfig, spec, revision))
    return getattr(config, "vision_config", config)


def token_grid(vcfg) -> int:
    """Side of the tower's square grid of patch tokens (448 px / 14 px patches: 32)."""
    return vcfg.image_size // vcfg.patch_size


def check_patch_grid(grid: int, vcfg, spec: str) -> None:
    """A stored patch grid pools the tower's token grid: it cannot be finer than that grid."""
    side = token_grid(vcfg)
    if grid > side:
        raise TeacherError(f"--patch-grid {grid} exceeds the {side} x {side} grid of patch tokens of {spec} "
                           f"({vcfg.image_size} px in {vcfg.patch_size} px patches); choose 1..{side} (0: no patches)")


def _hub_call(spec: str, call):
    """A transformers call on a teacher spec; what fails becomes one TeacherError saying why."""
    try:
        return call()
    except KdstoreError:
        raise
    except Exception as e:  # noqa: BLE001 - hub and file errors become one actionable message
        raise TeacherError(_access_message(spec, e)) from None


def flops_per_view(vcfg) -> float:
    """FLOPs of one view through the vision tower, counted by torch's FlopCounterMode on the meta device,
    with attention written out as matrix products (eager), so that every product is counted."""
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import SiglipVisionModel
    vcfg = eager(vcfg)
    with torch.device("meta"):
        model = SiglipVisionModel(vcfg)
    size = vcfg.image_size
    with FlopCounterMode(display=False) as counter:
        model(pixel_values=torch.zeros(1, 3, size, size, device="meta"))
    return float(counter.get_total_flops())


def eager(config):
    """A copy of a config whose attention is written out as matrix products."""
    import copy
    config = copy.deepcopy(config)
    config._attn_implementation = "eager"
    return config


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


def _random_teacher(arch: str):
    from transformers import SiglipModel

    config = random_config(arch)
    a = RANDOM_ARCHS[arch]
    state = torch.random.get_rng_state()
    torch.manual_seed(0)                  # the same random weights in every process and run
    model = SiglipModel(config)
    torch.random.set_rng_state(state)
    pre = Preprocess(a["image"], (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "bicubic")
    return model, pre, char_tokenizer(a["vocab"]), None, "random"


def char_tokenizer(vocab_size: int):
    """An offline character-level tokenizer for random teachers (their text weights are random)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = [chr(c) for c in range(32, 127)][: vocab_size - 3]
    vocab = {"<pad>": 0, "<unk>": 1, "</s>": 2} | {c: i + 3 for i, c in enumerate(chars)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", eos_token="</s>")


def _pretrained_teacher(spec: str, revision: str | None, dtype: torch.dtype):
    from transformers import AutoConfig, AutoTokenizer, SiglipImageProcessor, SiglipModel, SiglipVisionModel

    local = Path(spec).is_dir()
    if not local and (spec.startswith((".", "/", "~")) or os.sep in spec and Path(spec).parent.exists()):
        raise TeacherError(f"teacher directory not found: {spec}")
    config = _hub_call(spec, lambda: untrusted.hf_load(AutoConfig, spec, revision))
    model_type = getattr(config, "model_type", "")
    if model_type == "siglip":
        cls = SiglipModel
    elif model_type == "siglip_vision_model":
        cls = SiglipVisionModel
    else:
        raise TeacherError(f"{spec} is a {model_type!r} model; kdstore teachers are SigLIP models "
                           "(SiglipModel or SiglipVisionModel)")
    model = _hub_call(spec, lambda: untrusted.hf_load(cls, spec, revision, weights=True, dtype=dtype,
                                                              attn_implementation="sdpa"))
    try:
        proc = untrusted.hf_load(SiglipImageProcessor, spec, revision)
    except Exception as e:  # noqa: BLE001
        raise TeacherError(f"{spec} has no usable preprocessor_config.json ({untrusted.first_line(e)}); it sets the "
                           "input size, mean/std and resize method") from None
    size = proc.size.get("height") or proc.size.get("shortest_edge")
    pre = Preprocess(int(size), tuple(proc.image_mean), tuple(proc.image_std),
                     _RESAMPLE.get(int(proc.resample), "bicubic"))
    tokenizer = None
    if cls is SiglipModel:
        try:
            tokenizer = untrusted.hf_load(AutoTokenizer, spec, revision)
        except Exception:  # noqa: BLE001 - a model without tokenizer files still gives the probe head
            tokenizer = None
    rev = getattr(config, "_commit_hash", None) or revision
    return model, pre, tokenizer, rev, "pretrained"


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
