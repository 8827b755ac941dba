"""Typed build configuration: dataclasses loaded from YAML, unknown keys are errors."""
from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import KdstoreError


class ConfigError(KdstoreError, ValueError):
    """A configuration file or flag is invalid; the message names the key and the problem."""


MAX_VIEWS = 1024


@dataclass
class ViewPolicy:
    """How the K views of each image are drawn (see views.py for the contract)."""

    views: int = 8                              # K, view 0 is always canonical
    seed: int = 0
    scale: tuple[float, float] = (0.35, 1.0)    # crop area as a fraction of the image
    ratio: tuple[float, float] = (0.75, 1.3333333)
    hflip: float = 0.5                          # probabilities
    vflip: float = 0.5
    rot90: float = 0.5                          # probability of a quarter turn (1, 2 or 3)
    brightness: float = 0.2                     # factor drawn from [1-b, 1+b]
    contrast: float = 0.2
    saturation: float = 0.2
    hue: float = 0.02                           # shift drawn from [-h, h] turns
    mix_prob: float = 0.0                       # probability a view mixes with a partner
    mixup_alpha: float = 0.4                    # lambda ~ Beta(alpha, alpha)
    cutmix_share: float = 0.5                   # share of mixed views that are cutmix

    def validate(self) -> None:
        if not 1 <= self.views <= MAX_VIEWS:
            raise ConfigError(f"views.views must be 1..{MAX_VIEWS}, got {self.views}: each view is one teacher pass "
                              f"per image ({MAX_VIEWS} views of 10,000 images is about 10 million MedSigLIP passes, "
                              "over a week on one H100), and an epoch of training reads one view per image")
        lo, hi = self.scale
        if not 0 < lo <= hi <= 1:
            raise ConfigError(f"views.scale must satisfy 0 < lo <= hi <= 1, got {self.scale}")
        if not 0 < self.ratio[0] <= self.ratio[1]:
            raise ConfigError(f"views.ratio must satisfy 0 < lo <= hi, got {self.ratio}")
        for name in ("hflip", "vflip", "rot90", "mix_prob", "cutmix_share"):
            p = getattr(self, name)
            if not 0 <= p <= 1:
                raise ConfigError(f"views.{name} is a probability, got {p}")
        for name in ("brightness", "contrast", "saturation"):
            if not 0 <= getattr(self, name) < 1:
                raise ConfigError(f"views.{name} must be in [0, 1), got {getattr(self, name)}")
        if not 0 <= self.hue <= 0.5:
            raise ConfigError(f"views.hue must be in [0, 0.5], got {self.hue}")
        if self.mixup_alpha <= 0:
            raise ConfigError(f"views.mixup_alpha must be > 0, got {self.mixup_alpha}")


@dataclass
class TeacherConfig:
    id: str = "google/medsiglip-448"            # hub id, local directory, or random:<arch>
    revision: str | None = None
    dtype: str = "auto"                         # auto: bfloat16 on GPUs with native support, float16 on
                                                # older GPUs (compute capability < 8.0), float32 on CPU
    batch_size: int = 0                         # views per forward; 0: 64 on GPU, 16 on CPU
    prompt_template: str = "{name}"             # zero-shot prompt of classes without prompts below;
                                                # {name} is the class name without numbers and counts
    prompts: dict[str, list[str]] = field(default_factory=dict)   # class -> prompts, embeddings averaged
    zeroshot: bool = True                       # use the text tower when the model has one

    def validate(self) -> None:
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ConfigError(f"teacher.dtype must be auto|float32|bfloat16|float16, got {self.dtype!r}")
        if self.batch_size < 0:
            raise ConfigError(f"teacher.batch_size must be >= 0, got {self.batch_size}")
        if "{name}" not in self.prompt_template:
            raise ConfigError(f"teacher.prompt_template must contain {{name}}, got {self.prompt_template!r}")
        for name, texts in self.prompts.items():
            if not texts or not all(isinstance(t, str) and t.strip() for t in texts):
                raise ConfigError(f"teacher.prompts[{name!r}] must be a non-empty list of prompts")


@dataclass
class StoreLayout:
    image_size: int = 256                       # S: stored images are squashed to S x S
    chunk_size: int = 64                        # images per chunk (and per Zarr shard)
    compression: str = "default"                # zarr: none|zstd|blosc|lz4, hdf5: none|gzip|lzf
    patch_grid: int = 0                         # g: patch tokens pooled to g x g; 0 stores none
    patch_dim: int = 0                          # d: patch tokens reduced to d dims by PCA; 0 keeps D
    pca_images: int = 128                       # images whose patch tokens fit the PCA basis

    def validate(self) -> None:
        if self.image_size < 8:
            raise ConfigError(f"store.image_size must be >= 8, got {self.image_size}")
        if self.chunk_size < 1:
            raise ConfigError(f"store.chunk_size must be >= 1, got {self.chunk_size}")
        if self.compression not in ("default", "none", "zstd", "blosc", "lz4", "gzip", "lzf"):
            raise ConfigError(f"store.compression unknown: {self.compression!r}")
        if self.patch_grid < 0:
            raise ConfigError(f"store.patch_grid must be >= 0, got {self.patch_grid}")
        if self.patch_dim < 0 or (self.patch_dim and not self.patch_grid):
            raise ConfigError(f"store.patch_dim needs a patch grid and must be >= 0, got {self.patch_dim}")
        if self.pca_images < 1:
            raise ConfigError(f"store.pca_images must be >= 1, got {self.pca_images}")


@dataclass
class ProbeConfig:
    folds: int = 5                              # cross-fitting folds over the training images
    val_fraction: float = 0.1                   # held out per class, split = -1
    c: float = 1.0                              # inverse L2 strength of the logistic regression
    max_rows: int = 50_000                      # embeddings used to fit (views 0.. per image); bounds
                                                # the heads phase's memory: max_rows x D x 4 bytes
    seed: int = 0                               # split and store order

    def validate(self) -> None:
        if self.folds < 2:
            raise ConfigError(f"probe.folds must be >= 2, got {self.folds}")
        if not 0 <= self.val_fraction < 1:
            raise ConfigError(f"probe.val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.c <= 0:
            raise ConfigError(f"probe.c must be > 0, got {self.c}")


@dataclass
class BuildConfig:
    images: str | None = None                   # ImageFolder root (or root for manifest paths)
    manifest: str | None = None                 # CSV with columns path,label (empty label: unlabelled)
    unlabeled: str | None = None                # any tree of images without labels (teacher terms only)
    classes_file: str | None = None             # one class name per line, in index order
    allow_outside_paths: bool = False           # manifest paths may be absolute or leave the manifest's folder
    out: str | None = None
    views: ViewPolicy = field(default_factory=ViewPolicy)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    store: StoreLayout = field(default_factory=StoreLayout)
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    on_bad_image: str = "skip"                  # skip | fail
    min_side: int = 8                           # smaller images are skipped as too small
    max_pixels: int = 200_000_000               # larger images are skipped as too large
    workers: int = 2                            # decoding processes
    device: str = "auto"

    def validate(self) -> None:
        if self.images is None and self.manifest is None:
            raise ConfigError("give --images (an ImageFolder root) or --manifest (a CSV of path,label)")
        if self.out is None:
            raise ConfigError("give --out, the store path (.zarr or .h5)")
        if self.on_bad_image not in ("skip", "fail"):
            raise ConfigError(f"on_bad_image must be skip|fail, got {self.on_bad_image!r}")
        if self.workers < 0:
            raise ConfigError(f"workers must be >= 0, got {self.workers}")
        for part in (self.views, self.teacher, self.store, self.probe):
            part.validate()

    def identity(self) -> dict[str, Any]:
        """The settings that decide the store's content; a resumed build must match them."""
        d = to_dict(self)
        for key in ("out", "workers", "device", "images", "manifest", "unlabeled", "allow_outside_paths"):
            d.pop(key)
        d["teacher"].pop("batch_size")
        return d


def to_dict(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, tuple):
        return [to_dict(v) for v in obj]
    return obj


def from_dict(cls: type, data: dict[str, Any], where: str = "") -> Any:
    """Build dataclass `cls` from `data`; unknown keys raise ConfigError with a suggestion."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'} must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else f" (known: {', '.join(names)})"
            raise ConfigError(f"unknown key {where + key!r}{hint}")
        kwargs[key] = _coerce(hints[key], value, where + key)
    return cls(**kwargs)


def _coerce(hint: Any, value: Any, where: str) -> Any:
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value or {}, where + ".")
    origin = typing.get_origin(hint)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must be a mapping, got {value!r}")
        return {str(k): [v] if isinstance(v, str) else list(v or []) for k, v in value.items()}
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(typing.get_args(hint)):
            raise ConfigError(f"{where} must be a list of {len(typing.get_args(hint))} numbers, got {value!r}")
        return tuple(float(v) for v in value)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    expected = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
    if value is not None and not any(isinstance(value, t) for t in expected if isinstance(t, type)):
        raise ConfigError(f"{where} expects {' or '.join(t.__name__ for t in expected)}, got {value!r}")
    return value


def load_yaml(path: str | Path) -> dict[str, Any]:
    """A YAML mapping (safe_load: plain data, no tags that build objects); a problem is one line naming
    the file, line and column."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        with path.open(encoding="utf-8") as f:
            data = yaml.safe_load(f) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
        where = f"{path}, line {mark.line + 1}, column {mark.column + 1}" if mark is not None else str(path)
        problem = getattr(e, "problem", None) or getattr(e, "context", None) or str(e).splitlines()[0]
        raise ConfigError(f"{where}: {problem} (not valid YAML for kdstore)") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a text file (YAML expected)") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    return data


def config_diff(old, new, prefix=""):
    """'key: stored X, now Y' for every setting that differs, nested keys dotted."""
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key, "<absent>"), new.get(key, "<absent>")
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_diff(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: stored {a!r}, now {b!r}")
    return out


def merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Deep-merge `override` (e.g. CLI flags) onto `base` (e.g. YAML)."""
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def overrides(args: Any, table: dict[str, str]) -> dict[str, Any]:
    """Nested overrides from parsed flags: table maps a flag's dest to a dotted config key."""
    out: dict[str, Any] = {}
    for dest, key in table.items():
        value = getattr(args, dest, None)
        if value is None:
            continue
        node = out
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return out


def document_defaults(parser: Any, table: dict[str, str], defaults: Any) -> None:
    """Append each flag's real default (from the config dataclass) to its --help text."""
    for action in parser._actions:
        key = table.get(action.dest)
        if key is None:
            continue
        value = defaults
        for part in key.split("."):
            value = getattr(value, part)
        if value is None or action.nargs == 0 or isinstance(value, (bool, dict)):
            continue                      # switches and files say in their own help what the default does
        if isinstance(value, tuple):
            value = list(value)
        action.help = f"{action.help or ''} (default: {value})".strip()


def load_prompts(path: str | Path) -> dict[str, list[str]]:
    """A YAML file mapping class name -> prompt or list of prompts."""
    data = load_yaml(path)
    out = _coerce(dict[str, list[str]], data, f"{path}")
    for name, texts in out.items():
        if not texts or not all(isinstance(t, str) and t.strip() for t in texts):
            raise ConfigError(f"{path}: class {name!r} needs a non-empty list of prompts")
    return out


def load_config(cls: type, config_path: str | None, args: Any, table: dict[str, str]) -> Any:
    """YAML (if given), then the flags in `table` on top, into dataclass `cls` (unknown keys are errors)."""
    base = load_yaml(config_path) if config_path else {}
    return from_dict(cls, merge(base, overrides(args, table)))
