"""Typed run configuration (YAML under configs/, flags override, unknown keys are errors)."""
from __future__ import annotations

from dataclasses import dataclass, field

from featurestore.config import ConfigError
from trainer.losses import LossWeights


@dataclass
class OptimConfig:
    epochs: int = 30
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    ema: float = 0.0                    # EMA decay per step; 0 disables

    def validate(self) -> None:
        if self.epochs < 1 or self.batch_size < 1:
            raise ConfigError("optim.epochs and optim.batch_size must be >= 1")
        if self.lr <= 0:
            raise ConfigError(f"optim.lr must be > 0, got {self.lr}")
        if not 0 <= self.ema < 1:
            raise ConfigError(f"optim.ema is a decay in [0, 1), got {self.ema}")


@dataclass
class FitConfig:
    store: str | None = None
    out: str | None = None
    student: str = "shufflenet_v2_x1_0"
    pretrained: bool = False
    image_size: int = 224               # the grader feeds 224 x 224
    head: str = "probe"                 # teacher head whose logits KD uses: probe | zeroshot
    seed: int = 0
    loss: LossWeights = field(default_factory=LossWeights)
    optim: OptimConfig = field(default_factory=OptimConfig)
    unlabeled: bool = True              # unlabelled store images train the teacher terms (when any is on)
    device: str = "auto"                # auto: cuda, then mps, then cpu
    mixed_precision: str = "auto"       # auto (bf16 where native, fp16 on older GPUs and mps, none on CPU) | no | bf16 | fp16
    cpu: bool = False                   # train on the CPU even when a GPU is present
    channels_last: bool = False
    compile: bool = False
    train_on_all: bool = False          # also train on the held-out images (final model, no validation)
    max_mb: float = 25.0
    ram_budget_gb: float = 2.0          # read everything a run needs into RAM below this size, else stream
    buffer_chunks: int = 8              # shuffle window (whole chunks) of the epoch plan
    loader_workers: int = 0             # CPU training: processes rendering views beside training (0: in the loop)
    onnx: bool = False                  # also export ONNX at the end

    def validate(self) -> None:
        if not self.store or not self.out:
            raise ConfigError("give --store (a featurestore store) and --out (the run directory)")
        if self.head not in ("probe", "zeroshot"):
            raise ConfigError(f"head must be probe|zeroshot, got {self.head!r}")
        if self.mixed_precision not in ("auto", "no", "bf16", "fp16"):
            raise ConfigError(f"mixed_precision must be auto|no|bf16|fp16, got {self.mixed_precision!r}")
        if self.loader_workers < 0:
            raise ConfigError(f"loader_workers must be >= 0, got {self.loader_workers}")
        if self.buffer_chunks < 1:
            raise ConfigError(f"buffer_chunks must be >= 1, got {self.buffer_chunks}")
        if self.image_size < 32:
            raise ConfigError(f"image_size must be >= 32, got {self.image_size}")
        if self.loss.temperature <= 0:
            raise ConfigError("loss.temperature must be > 0")
        if self.loss.kd_gate not in ("none", "correct", "confidence"):
            raise ConfigError(f"loss.kd_gate must be none|correct|confidence, got {self.loss.kd_gate!r}")
        self.optim.validate()

    def identity(self) -> dict:
        """Settings a resumed run must share with the interrupted one."""
        from featurestore.config import to_dict
        d = to_dict(self)
        for key in ("out", "cpu", "device", "ram_budget_gb", "onnx", "max_mb", "loader_workers"):
            d.pop(key)
        return d
