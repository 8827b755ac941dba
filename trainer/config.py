"""Typed run configuration (YAML under configs/, flags override, unknown keys are errors); each field
declares its flag and help once (featurestore/common/options.py makes the command line and the API)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from featurestore.common.options import STORAGE_HELP, ConfigError, in_range, json_options, opt, to_dict
from featurestore.pipeline.config import MAX_WORKERS, check_store_url
from trainer.exporter import GRADER_SIZE, TTA
from trainer.students import available
from trainer.terms import LossWeights
from trainer.trackers import NAMES as LOGGERS
from trainer.trackers import parse_loggers

HEADS = ["probe", "spread", "zeroshot"]
SAMPLING = ["uniform", "balanced"]
STANDARDIZE = ["auto", "on", "off"]
CALIBRATE = ["none", "bias"]
MAX_TRAIN_SIDE = 1024
PRECISIONS = ["auto", "no", "bf16", "fp16"]
COMPILE_MODES = ["default", "reduce-overhead", "max-autotune"]


@dataclass
class OptimConfig:
    epochs: int = opt(30, "passes over the training images (one stored view each)", flag="--epochs")
    steps: int = opt(0, "optimizer steps in all, whatever the number of training images (0: --epochs passes). Given, "
                     "it decides the length: as many passes as the steps take, the last one cut short, so that runs "
                     "over different images (labels alone, with unlabelled images) learn equally long",
                     flag="--steps")
    batch_size: int = opt(64, "samples per step (per process)", flag="--batch-size")
    lr: float = opt(2e-3, "peak AdamW learning rate", flag="--lr")
    weight_decay: float = opt(0.05, "AdamW weight decay (not on biases and norms)", flag="--weight-decay")
    warmup_epochs: float = opt(1.0, "linear warm-up length, then cosine decay", flag="--warmup-epochs")
    ema: float = opt(0.0, "EMA decay per step (0: off); the EMA weights are exported", flag="--ema")

    def validate(self) -> None:
        in_range("optim.epochs", self.epochs, 1, 100_000)
        in_range("optim.batch_size", self.batch_size, 1, 8192)
        in_range("optim.steps", self.steps, 0, 100_000_000, "0: --epochs passes")
        if not 0 < self.lr <= 10:
            raise ConfigError(f"optim.lr must be in (0, 10], got {self.lr}")
        in_range("optim.weight_decay", self.weight_decay, 0, 10)
        in_range("optim.warmup_epochs", self.warmup_epochs, 0, 100_000)
        if not 0 <= self.ema < 1:
            raise ConfigError(f"optim.ema is a decay in [0, 1), got {self.ema}")


@dataclass
class FitConfig:
    store: str | None = opt(None, "featurestore store (.zarr folder or URL, or .h5)", flag="--store")
    storage_options: dict[str, Any] = opt(help=STORAGE_HELP, flag="--storage-options", parse=json_options,
                                          default_factory=dict, secret=True)
    out: str | None = opt(None, "run directory on a local disk (checkpoints, metrics.jsonl, student.pt, plots)",
                          flag="--out")
    student: str = opt("shufflenet_v2_x1_0", "one of " + ", ".join(available()), flag="--student")
    pretrained: bool = opt(False, "start from ImageNet weights (downloaded once, then taken from the local cache; "
                           "default: random initialisation)", flag="--pretrained")
    image_size: int = opt(224, "training resolution; the exported file resizes what the grader gives it (224 px) to "
                          "this side, so any resolution is graded as it was trained", flag="--image-size")
    eval_size: int = opt(GRADER_SIZE, "side the held-out images are resized to when they are scored, every epoch "
                         "and on the exported file, as the grader resizes its files", flag="--eval-size")
    head: str = opt("probe", "teacher head whose logits KD follows", flag="--head", choices=HEADS)
    kd_teacher: str = opt("first", "the teacher whose head KD follows, in a store of several: a teacher's name, "
                          "first, or mean (the average of every teacher's logits of that head)",
                          flag="--kd-teacher")
    standardize: str = opt("auto", "feature targets standardised per dimension by the statistics the build stored "
                           "for each teacher, so that teachers of different scales weigh alike (auto: where the "
                           "store holds several teachers)", flag="--standardize-targets", choices=STANDARDIZE)
    seed: int = opt(0, "seed of the student's weights and of the data order", flag="--seed")
    loss: LossWeights = opt(default_factory=LossWeights)
    optim: OptimConfig = opt(default_factory=OptimConfig)
    unlabeled: bool = opt(True, "ignore the store's unlabelled images (default: they train the teacher terms)",
                          flag="--no-unlabeled", negate=True)
    device: str = opt("auto", "auto (cuda, then mps, then cpu), cpu, cuda, cuda:1, mps", flag="--device")
    mixed_precision: str = opt("auto", "autocast dtype (auto: bf16 where the GPU has it natively, fp16 on older GPUs "
                               "and mps, none on CPU)", flag="--mixed-precision", choices=PRECISIONS)
    cpu: bool = opt(False, "train on the CPU even if a GPU is present", flag="--cpu")
    channels_last: bool = opt(False, "channels_last memory format (default: off)", flag="--channels-last")
    compile: bool = opt(False, "torch.compile the training model (default: off)", flag="--compile")
    compile_mode: str = opt("default", "torch.compile mode with --compile: reduce-overhead replays each step's "
                            "kernels as CUDA graphs (a small student on a big GPU spends its step launching them); "
                            "max-autotune also searches kernel configurations (minutes)", flag="--compile-mode",
                            choices=COMPILE_MODES)
    train_on_all: bool = opt(False, "train on held-out images too (final model; no validation; default: off)",
                             flag="--train-on-all")
    max_mb: float = opt(25.0, "refuse to export a student.pt larger than this", flag="--max-mb")
    ram_budget_gb: float = opt(2.0, "read everything the run needs into RAM when it fits, else stream chunks (same "
                               "batches either way)", flag="--ram-budget-gb")
    buffer_chunks: int = opt(8, "shuffle window in whole chunks (memory ~ 2 windows)", flag="--buffer-chunks")
    loader_workers: int = opt(0, "training on a CPU: processes that render the views beside the training loop (one "
                              "core each; 0 renders them in the loop). Same batches either way",
                              flag="--loader-workers")
    log_every: int = opt(50, "steps between reads of the loss on the host (a read waits for the device; the loss "
                         "is checked for finiteness there)", flag="--log-every")
    onnx: bool = opt(False, "also export student.onnx (default: off)", flag="--onnx")
    sampling: str = opt("uniform", "uniform: every training image once an epoch; balanced: each class drawn "
                        "equally often (small classes repeat, large ones are thinned; epochs keep their length)",
                        flag="--sampling", choices=SAMPLING)
    tta: str = opt("none", "flip: the exported file averages the logits of the image and its mirror image (twice "
                   "the compute per image, the same file size)", flag="--tta", choices=TTA)
    calibrate: str = opt("none", "bias: fold into the exported file the per-class logit bias that maximises "
                         "macro-F1 on the held-out images, where a bias fitted on half of them raises macro-F1 on "
                         "the other half", flag="--calibrate", choices=CALIBRATE)

    logger: list[str] = opt(help=f"experiment trackers to log the run to, comma-separated: {', '.join(LOGGERS)} "
                            "(metrics.jsonl is always written; the libraries: pip install 'kdstore[track]')",
                            flag="--logger", parse=parse_loggers, default_factory=list)
    tracker_project: str = opt("kdstore", "the trackers' project (MLflow experiment, W&B project)",
                               flag="--tracker-project")
    run_name: str | None = opt(None, "the run's name in the trackers (default: the run folder's name)",
                               flag="--run-name")
    run_tags: dict[str, str] = opt(help="tags the trackers give the run (YAML; a sweep tags each run with its "
                                   "recipe)", default_factory=dict)

    def validate(self) -> None:
        if not self.store or not self.out:
            raise ConfigError("give --store (a featurestore store) and --out (the run directory)")
        check_store_url(self.store, "--store")
        if "://" in self.out and not self.out.startswith("file://"):
            raise ConfigError(f"--out {self.out}: a run directory lives on a local disk (its checkpoints are written "
                              "whole and renamed into place); train into a local folder, then copy the run")
        if self.head not in HEADS:
            raise ConfigError(f"head must be {'|'.join(HEADS)}, got {self.head!r}")
        if self.mixed_precision not in PRECISIONS:
            raise ConfigError(f"mixed_precision must be auto|no|bf16|fp16, got {self.mixed_precision!r}")
        if self.compile_mode not in COMPILE_MODES:
            raise ConfigError(f"compile_mode must be {'|'.join(COMPILE_MODES)}, got {self.compile_mode!r}")
        in_range("loader_workers", self.loader_workers, 0, MAX_WORKERS, "render processes")
        in_range("buffer_chunks", self.buffer_chunks, 1, 1024)
        in_range("image_size", self.image_size, 32, MAX_TRAIN_SIDE, "the training resolution (the grader feeds 224)")
        in_range("eval_size", self.eval_size, 32, MAX_TRAIN_SIDE, "the grader resizes its files to 224")
        for name, allowed in (("sampling", SAMPLING), ("tta", TTA), ("calibrate", CALIBRATE),
                              ("standardize", STANDARDIZE)):
            if getattr(self, name) not in allowed:
                raise ConfigError(f"{name} must be {'|'.join(allowed)}, got {getattr(self, name)!r}")
        in_range("log_every", self.log_every, 1)
        from trainer.trackers import check
        check(self.logger)
        in_range("seed", self.seed, 0)
        if not self.max_mb > 0:
            raise ConfigError(f"max_mb must be > 0, got {self.max_mb}")
        in_range("ram_budget_gb", self.ram_budget_gb, 0)
        self.loss.validate()
        self.optim.validate()

    def identity(self) -> dict:
        """Settings a resumed run must share with the interrupted one."""
        d = to_dict(self)
        for key in ("out", "cpu", "device", "ram_budget_gb", "onnx", "max_mb", "loader_workers", "log_every",
                    "compile_mode", "logger", "tracker_project", "run_name", "run_tags"):
            d.pop(key)
        return d

    def schedule(self, per_epoch: int) -> tuple[FitConfig, int]:
        """(this config with the passes that `optim.steps` takes, total optimizer steps), given the
        steps of one pass."""
        o = self.optim
        if not o.steps:
            return self, per_epoch * o.epochs
        return dataclasses.replace(self, optim=dataclasses.replace(o, epochs=-(-o.steps // per_epoch))), o.steps
