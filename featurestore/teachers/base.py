"""What every teacher gives, whatever its family: the protocol the build, the heads and the planner use.

A teacher renders a view at its own input size with its own resize (views.py), normalises it with its
own mean/std (from the checkpoint's preprocessor config), runs its vision tower and reads out
- a pooled embedding (B, D): the vector a student's pooled features are fitted to, and that the probe
  (and a zero-shot head) scores;
- its patch tokens (B, h, w, D') on a square grid, prefix tokens (CLS, registers) left out, which the
  store pools to g x g;
- optionally a text tower (`has_text`), whose class embeddings give zero-shot logits
  exp(logit_scale) * cos(image, class) + logit_bias.
A family (SigLIP, CLIP, DINOv2, any transformers vision backbone) is one subclass of `Teacher` that
says which transformers class holds its weights, which module is its tower, and how its outputs read
out; `featurestore.teachers` finds it by the checkpoint's model_type.
"""
from __future__ import annotations

import contextlib
import copy
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from featurestore import views
from featurestore.common.errors import KdstoreError

COMPILE_BACKEND = "inductor"


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
    embed_dim: int                    # D, the pooled embedding's width
    num_patches: int                  # h * w patch tokens
    has_text: bool
    family: str = "siglip"
    token_dim: int = 0                # D', the patch tokens' width (D where 0)
    extra: dict = field(default_factory=dict)


FAMILIES: dict[str, type] = {}              # model_type -> family


def register(cls: type) -> type:
    """Make a family a teacher: every model_type it names loads through it (a class decorator; the
    package imports every module in featurestore/teachers/, so a family is one file)."""
    for model_type in cls.model_types:
        FAMILIES[model_type] = cls
    return cls


def eager(config):
    """A copy of a config whose attention is written out as matrix products."""
    config = copy.deepcopy(config)
    config._attn_implementation = "eager"
    return config


class Teacher:
    """Runs a vision tower on rendered views; a text tower once for zero-shot prompts (where it has one).

    `prepare(batch, compiled=True)` compiles the tower for one batch shape (a shorter batch is padded).
    Subclasses give `model_class`, `tower_of`, `read_out` and the config readers below."""

    family = "base"
    model_types: tuple[str, ...] = ()

    def __init__(self, model, preprocess: Preprocess, info: TeacherInfo, tokenizer, device, dtype, config):
        self.model, self.pre, self.info, self.tokenizer = model, preprocess, info, tokenizer
        self.device, self.dtype, self.config = device, dtype, config
        self.vision = self.tower_of(model)
        self._mean = torch.tensor(preprocess.mean, device=device).view(1, 3, 1, 1)
        self._std = torch.tensor(preprocess.std, device=device).view(1, 3, 1, 1)
        self.batch: int | None = None                            # fixed forward batch (padded), once prepared
        self.compiled = False
        self._tower = self.vision

    # ---- what a family says (class level: known from config.json, before any weight is loaded) -------
    @classmethod
    def model_class(cls, config):
        """The transformers class that holds the checkpoint's weights (AutoModel unless a family says)."""
        from transformers import AutoModel
        return AutoModel

    @classmethod
    def tower_class(cls, config):
        """The transformers class of the vision tower alone, and its config (FLOPs are counted on it)."""
        from transformers import AutoModel
        return AutoModel, config

    @classmethod
    def meta_forward(cls, config):
        """The vision tower on the meta device, attention written out as matrix products, and one view's
        input: what FLOPs are counted on."""
        model_cls, tower = cls.tower_class(config)
        tower = eager(tower)
        with torch.device("meta"):
            model = model_cls.from_config(tower) if hasattr(model_cls, "from_config") else model_cls(tower)
        size = int(getattr(cls.vision_config(config), "image_size", 224))
        return model, torch.zeros(1, 3, size, size, device="meta")

    @classmethod
    def vision_config(cls, config):
        """The vision tower's config (image_size, patch_size, hidden_size, num_hidden_layers)."""
        return getattr(config, "vision_config", config)

    @classmethod
    def grid_side(cls, config) -> int:
        """Side of the square grid of patch tokens at the checkpoint's input size."""
        v = cls.vision_config(config)
        return int(v.image_size) // int(v.patch_size)

    @classmethod
    def widths(cls, config) -> tuple[int, int]:
        """(D, D'): the pooled embedding's width and the patch tokens' width."""
        d = int(cls.vision_config(config).hidden_size)
        return d, d

    @classmethod
    def text_capable(cls, config) -> bool:
        return False

    # ---- what an instance does ------------------------------------------------------------------
    def tower_of(self, model):
        """The module run on pixel_values."""
        return model

    def read_out(self, out, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The tower's output -> pooled (n, D) and patch tokens (n, h * w, D'), prefix tokens left out."""
        raise NotImplementedError

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
        """pixels: float (B, 3, size, size) in [0, 1] -> pooled (B, D), patches (B, g, g, D') or None, in the
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
            pooled, tokens = self.read_out(out, n)                         # (B, D), (B, T, D')
        patches = pool_grid(tokens, patch_grid) if patch_grid else None
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

    def text_head(self, prompts: list[list[str]]):
        """Class embeddings (C, D), logit_scale, logit_bias for the zero-shot head."""
        raise TeacherError(f"{self.info.id} ({self.family}) has no text tower; the zero-shot head needs one "
                           "(a SiglipModel or a CLIPModel); pass --no-zeroshot")

    def render(self, sources, index, params, partner_index=None):
        """Render views at the teacher's input size with its resize method, on the teacher's device."""
        return views.render(sources, index, params, self.pre.size, self.pre.resample, partner_index)


def class_embeddings(text: torch.Tensor, prompts: list[list[str]]) -> torch.Tensor:
    """(sum of prompts, D) prompt embeddings -> (C, D): each class's prompts L2-normalised, averaged and
    normalised again (one prompt gives the model's own embedding)."""
    text = F.normalize(text.float(), dim=-1)
    owner = torch.tensor([c for c, group in enumerate(prompts) for _ in group], device=text.device)
    classes = torch.zeros(len(prompts), text.shape[-1], device=text.device).index_add_(0, owner, text)
    return F.normalize(classes, dim=-1)


def pool_grid(tokens: torch.Tensor, grid: int) -> torch.Tensor:
    """Patch tokens (B, T, D') of a square grid, or a feature map (B, D', h, w) -> (B, g, g, D'), each cell
    the mean of the tokens it covers."""
    if tokens.dim() == 3:
        b, t, d = tokens.shape
        side = math.isqrt(t)
        if side * side != t:
            raise TeacherError(f"the teacher's {t} patch tokens make no square grid")
        tokens = tokens.transpose(1, 2).reshape(b, d, side, side)             # (B, D', h, w)
    return F.adaptive_avg_pool2d(tokens, grid).permute(0, 2, 3, 1)


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
