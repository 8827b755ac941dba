"""Everything a run is at the end of an epoch, and how it is saved and read back.

`TrainState` holds the model (student and training-only projection heads), optimizer, schedule, EMA,
RNG state, metric history, best score and the number of finished epochs; `state_dict()` and
`load_state_dict()` are the one place a checkpoint's keys are written and read. Data order is a
function of (seed, epoch), so resuming from a checkpoint equals never stopping.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

import torch
from torch import nn

from featurestore.common.options import ConfigError, config_diff
from trainer.config import FitConfig
from trainer.losses import PatchProjector, PooledProjector
from trainer.students import create_student, spec_of


class DistillModel(nn.Module):
    """Student plus training-only projection heads, one per teacher and feature target; forward returns
    everything the losses need: logits, {teacher: pooled prediction}, {teacher: patch prediction}."""

    def __init__(self, student: nn.Module, pooled: nn.ModuleDict | None, patches: nn.ModuleDict | None):
        super().__init__()
        self.student, self.pooled_proj, self.patch_proj = student, pooled, patches

    def forward(self, x: torch.Tensor):
        fmap = self.student.forward_features(x)                         # (B, F, h, w)
        v = self.student.pool(fmap)                                     # (B, F)
        logits = self.student.head(v)                                   # (B, C)
        p = {t: proj(v) for t, proj in self.pooled_proj.items()} if self.pooled_proj is not None else None  # (B, D)
        q = {t: proj(fmap) for t, proj in self.patch_proj.items()} if self.patch_proj is not None else None
        return logits, p, q                                             # q: teacher -> (B, g, g, d)


def build_model(cfg: FitConfig, num_classes: int, target_shapes: dict[str, tuple[int, ...]]) -> DistillModel:
    """The student (seeded) and a projection head per teacher and feature target. target_shapes:
    "pooled:<teacher>" -> (D,), "patches:<teacher>" -> (g, g, d) (what StoreData.shapes holds)."""
    torch.manual_seed(cfg.seed)
    width = spec_of(cfg.student).features
    student = create_student(cfg.student, num_classes, cfg.pretrained)

    def heads(kind: str, make) -> nn.ModuleDict | None:
        shapes = {k.split(":", 1)[1]: v for k, v in target_shapes.items() if k.startswith(kind + ":")}
        return nn.ModuleDict({t: make(shape) for t, shape in shapes.items()}) if shapes else None
    return DistillModel(student, heads("pooled", lambda s: PooledProjector(width, s[-1])),
                        heads("patches", lambda s: PatchProjector(width, s[-1], s[0])))


class EMA:
    """An exponential moving average of the student's parameters and buffers (use_buffers): the first
    update copies, later ones move each float tensor a share 1 - decay towards the student's
    (torch._foreach_lerp_). Its counts live on the host, so an update never waits for the device."""

    def __init__(self, student: nn.Module, decay: float):
        self.module, self.decay, self.updates = copy.deepcopy(student), decay, 0
        for p in self.module.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, student: nn.Module) -> None:
        mine = list(self.module.parameters()) + list(self.module.buffers())
        theirs = list(student.parameters()) + list(student.buffers())
        if self.updates == 0:
            torch._foreach_copy_(mine, theirs)
        else:
            floats = [(a, b) for a, b in zip(mine, theirs) if a.is_floating_point()]
            torch._foreach_lerp_([a for a, _ in floats], [b for _, b in floats], 1 - self.decay)
            for a, b in zip(mine, theirs):
                if not a.is_floating_point():
                    a.copy_(b)
        self.updates += 1

    def state_dict(self) -> dict:
        return {"module": self.module.state_dict(), "updates": self.updates}

    def load_state_dict(self, d: dict) -> None:
        self.module.load_state_dict(d["module"])
        self.updates = d["updates"]


def lr_lambda(warmup_steps: int, total_steps: int):
    """Linear warm-up to 1, then cosine decay to 0 (per optimiser step)."""
    def f(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return f


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: weight decay on weights (2+ dimensions), none on biases and norms."""
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


@dataclass
class TrainState:
    model: DistillModel
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    ema: EMA | None
    history: list[dict] = field(default_factory=list)
    best: float = -1.0                     # the best validation macro-F1 so far
    epochs_done: int = 0

    @classmethod
    def create(cls, cfg: FitConfig, model: DistillModel, steps_per_epoch: int, total_steps: int,
               fused: bool = False) -> TrainState:
        """fused: AdamW's one-kernel update (CUDA: a step launches one optimizer kernel, not one per
        tensor group); elsewhere the default."""
        optimizer = torch.optim.AdamW(param_groups(model, cfg.optim.weight_decay), lr=cfg.optim.lr,
                                      **({"fused": True} if fused else {}))
        warmup = int(round(cfg.optim.warmup_epochs * steps_per_epoch))
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(max(warmup, 1), total_steps))
        ema = EMA(model.student, cfg.optim.ema) if cfg.optim.ema else None
        return cls(model, optimizer, scheduler, ema)

    @property
    def eval_student(self) -> nn.Module:
        """The weights that are validated and exported: the EMA's, when there is one."""
        return self.ema.module if self.ema is not None else self.model.student

    def state_dict(self, cfg: FitConfig) -> dict:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "ema": self.ema.state_dict() if self.ema else None,
                "rng": torch.get_rng_state(), "history": self.history, "best": self.best,
                "epochs_done": self.epochs_done, "config": cfg.identity()}

    def load_state_dict(self, d: dict, cfg: FitConfig, where: str) -> None:
        diffs = config_diff(d["config"], cfg.identity())
        if diffs:
            raise ConfigError(f"{where} was trained with different settings: {'; '.join(diffs)}; resume with the "
                              "same ones")
        self.model.load_state_dict(d["model"])
        self.optimizer.load_state_dict(d["optimizer"])
        self.scheduler.load_state_dict(d["scheduler"])
        if self.ema is not None:
            self.ema.load_state_dict(d["ema"])
        torch.set_rng_state(d["rng"])
        self.history, self.best, self.epochs_done = d["history"], d["best"], d["epochs_done"]


def best_dict(state: TrainState, row: dict, val: dict | None) -> dict:
    """What best.pt holds: the exported weights (on the CPU) and the validation that chose them."""
    student = {k: v.detach().cpu().clone() for k, v in state.eval_student.state_dict().items()}
    return {"student": student, "epoch": state.epochs_done - 1, "metrics": row, "val": val}
