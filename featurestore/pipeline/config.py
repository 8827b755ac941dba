"""Typed build configuration: dataclasses loaded from YAML (unknown keys are errors); each field
declares its flag and help once (options.py makes the command line and the API from them)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from featurestore.common.options import (
    STORAGE_HELP,
    ConfigError,
    coerce,
    from_dict,
    in_range,
    json_options,
    merge,
    opt,
    to_dict,
)
from featurestore.common.untrusted import load_yaml
from featurestore.store.schema import TEACHER_NAME

MAX_VIEWS = 1024
MAX_WORKERS = 64                # decoding processes; more is a typo, and each holds decoded images in memory
MAX_IMAGE_SIDE = 2048           # stored image side S: crops are rendered from it at the student's size


def batch_arg(text: str) -> int:
    """--batch-size: a number of views, or auto (0)."""
    if text.strip().lower() == "auto":
        return 0
    try:
        return int(text)
    except ValueError:
        raise ConfigError(f"--batch-size takes a number of views or auto, got {text!r}") from None


def load_prompts(path: str | Path) -> dict[str, list[str]]:
    """A YAML file mapping class name -> prompt or list of prompts."""
    data = load_yaml(path)
    out = coerce(dict[str, list[str]], data, f"{path}")
    for name, texts in out.items():
        if not texts or not all(isinstance(t, str) and t.strip() for t in texts):
            raise ConfigError(f"{path}: class {name!r} needs a non-empty list of prompts")
    return out


def parse_heads(text: str) -> list[str]:
    """--heads probe,spread -> ["probe", "spread"] (the probe always first)."""
    names = [h.strip() for h in text.split(",") if h.strip()]
    return ["probe"] + [h for h in names if h != "probe"]


@dataclass
class ViewPolicy:
    """How the K views of each image are drawn (see views.py for the contract)."""

    views: int = opt(8, "K, views per image (view 0 is the whole image)", flag="--views")
    seed: int = opt(0, "seed of the view parameters", flag="--view-seed")
    scale: tuple[float, float] = (0.35, 1.0)    # crop area as a fraction of the image
    ratio: tuple[float, float] = (0.75, 1.3333333)
    hflip: float = 0.5                          # probabilities
    vflip: float = 0.5
    rot90: float = 0.5                          # probability of a quarter turn (1, 2 or 3)
    brightness: float = 0.2                     # factor drawn from [1-b, 1+b]
    contrast: float = 0.2
    saturation: float = 0.2
    hue: float = 0.02                           # shift drawn from [-h, h] turns
    mix_prob: float = opt(0.0, "probability that a view is mixed (mixup/cutmix) with a partner", flag="--mix-prob")
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
        in_range("views.seed", self.seed, 0)


@dataclass
class TeacherConfig:
    id: list[str] = opt(help="the teacher: a hub id, a local directory (save_pretrained), or random:medsiglip-448 / "
                        "random:tiny; NAME=ID names it (default name: its family, such as siglip or dinov2); give "
                        "--teacher again for a store of several teachers over the same views (default: "
                        "google/medsiglip-448)", flag="--teacher", default_factory=lambda: ["google/medsiglip-448"])
    revision: str | None = opt(None, "hub revision (branch, tag or commit) of the teacher", flag="--revision")
    dtype: str = opt("auto", "teacher compute dtype (auto: bfloat16 on GPUs with native support, float16 on older "
                     "GPUs such as T4/V100, float32 on CPU)", flag="--dtype",
                     choices=["auto", "float32", "bfloat16", "float16"])
    batch_size: int = opt(0, "views per teacher forward, or auto (0): on a GPU the largest of 256, 128, 64, ... "
                          "whose forward fits in half the free memory, 16 on a CPU (default: auto)",
                          flag="--batch-size", parse=batch_arg)
    compile: bool = opt(True, "run the vision tower eagerly; by default a CUDA build compiles it with torch.compile "
                        "for one batch shape (a minute or two before the first batch; CPU builds run eagerly)",
                        flag="--no-compile", negate=True)
    prompt_template: str = opt("{name}", "zero-shot prompt with {name} for the class name (numbers and image counts "
                               "removed from folder names)", flag="--prompt-template")
    prompts: dict[str, list[str]] = opt(help="YAML file: class name -> list of prompts, whose text embeddings are "
                                        "averaged (default: the template above)", flag="--prompts",
                                        parse=load_prompts, default_factory=dict)
    zeroshot: bool = opt(True, "skip the text tower (default: the zero-shot head is stored when the model has one)",
                         flag="--no-zeroshot", negate=True)

    def validate(self) -> None:
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ConfigError(f"teacher.dtype must be auto|float32|bfloat16|float16, got {self.dtype!r}")
        in_range("teacher.batch_size", self.batch_size, 0, 4096, "views per teacher forward (0: auto)")
        if "{name}" not in self.prompt_template:
            raise ConfigError(f"teacher.prompt_template must contain {{name}}, got {self.prompt_template!r}")
        names = [name for name, _ in self.entries() if name]
        if len(set(names)) != len(names):
            raise ConfigError(f"--teacher names must differ, got {names}")
        for name, texts in self.prompts.items():
            if not texts or not all(isinstance(t, str) and t.strip() for t in texts):
                raise ConfigError(f"teacher.prompts[{name!r}] must be a non-empty list of prompts")


    def __post_init__(self) -> None:
        if isinstance(self.id, str):                  # TeacherConfig(id="random:tiny") from Python
            self.id = [self.id]

    def entries(self) -> list[tuple[str | None, str]]:
        """(name or None, spec) of each --teacher, in order; NAME=ID names one."""
        if not self.id:
            raise ConfigError("give a --teacher")
        out = []
        for entry in self.id:
            name, sep, spec = entry.partition("=")
            if not sep:
                out.append((None, entry))
                continue
            if not TEACHER_NAME.fullmatch(name) or not spec:
                raise ConfigError(f"--teacher {entry!r}: NAME=ID takes a name of lowercase letters, digits, - and _ "
                                  "(starting with a letter) and a teacher id")
            out.append((name, spec))
        return out


@dataclass
class StoreLayout:
    image_size: int = opt(256, "S: side of the stored squashed images the student renders from", flag="--image-size")
    chunk_size: int = opt(64, "images per chunk (one Zarr shard, one unit of resume)", flag="--chunk-size")
    compression: str = opt("default", "zarr: none|zstd|blosc|lz4, hdf5: none|gzip|lzf (default: zarr zstd, images "
                           "lz4; hdf5 lzf)", flag="--compression")
    patch_grid: int = opt(0, "store patch tokens average-pooled to g x g (0: none)", flag="--patch-grid")
    patch_dim: int = opt(0, "store patch tokens at d dims through a PCA basis fitted during the build (0: the "
                         "teacher's full width)", flag="--patch-dim")
    pca_images: int = opt(128, "images whose patch tokens (4 views each) fit the PCA basis", flag="--pca-images")

    def validate(self) -> None:
        in_range("store.image_size", self.image_size, 8, MAX_IMAGE_SIDE, "the side of the stored square images")
        in_range("store.chunk_size", self.chunk_size, 1, 4096, "images per chunk, which a writer and a reader hold "
                 "in memory at once")
        if self.compression not in ("default", "none", "zstd", "blosc", "lz4", "gzip", "lzf"):
            raise ConfigError(f"store.compression unknown: {self.compression!r}")
        in_range("store.patch_grid", self.patch_grid, 0, 64)
        if self.patch_dim < 0 or (self.patch_dim and not self.patch_grid):
            raise ConfigError(f"store.patch_dim needs a patch grid and must be >= 0, got {self.patch_dim}")
        in_range("store.pca_images", self.pca_images, 1)


@dataclass
class ProbeConfig:
    folds: int = opt(5, "cross-fitting folds of the linear probe", flag="--folds")
    val_fraction: float = opt(0.1, "fraction of each class held out for validation", flag="--val-fraction")
    c: float = 1.0                              # inverse L2 strength of the logistic regression
    class_weight: str = opt("none", "balanced: the probe (and spread head) weighs each class's rows inversely to "
                            "its share, as scikit-learn's class_weight='balanced' does, so that a head fitted on "
                            "imbalanced classes does not starve the small ones", flag="--probe-class-weight",
                            choices=["none", "balanced"])
    max_rows: int = opt(50_000, "at most this many pooled embeddings fit the probe (bounds the heads phase's "
                        "memory: rows x D x 4 bytes)", flag="--probe-max-rows")
    seed: int = 0                               # split and store order
    heads: list[str] = opt(help="heads fitted on the labels, comma-separated: probe (always), spread (the probe "
                           "refitted with the unlabelled images, their labels spread from their neighbours in the "
                           "teacher's embedding; needs --unlabeled)", flag="--heads", parse=parse_heads,
                           default_factory=lambda: ["probe"])
    spread_neighbors: int = 10                  # k of the spread head's nearest-neighbour graph
    spread_confidence: float = 0.5              # spread rows below this share of their class are left out

    def validate(self) -> None:
        if not self.heads or self.heads[0] != "probe" or set(self.heads) - {"probe", "spread"} or \
                len(set(self.heads)) != len(self.heads):
            raise ConfigError(f"probe.heads must be probe or probe,spread, got {self.heads}")
        if self.spread_neighbors < 1:
            raise ConfigError(f"probe.spread_neighbors must be >= 1, got {self.spread_neighbors}")
        if not 0 <= self.spread_confidence <= 1:
            raise ConfigError(f"probe.spread_confidence must be in [0, 1], got {self.spread_confidence}")
        in_range("probe.folds", self.folds, 2, 100)
        in_range("probe.max_rows", self.max_rows, 1)
        in_range("probe.seed", self.seed, 0)
        if not 0 <= self.val_fraction < 1:
            raise ConfigError(f"probe.val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.c <= 0:
            raise ConfigError(f"probe.c must be > 0, got {self.c}")
        if self.class_weight not in ("none", "balanced"):
            raise ConfigError(f"probe.class_weight must be none|balanced, got {self.class_weight!r}")


@dataclass
class BuildConfig:
    images: str | None = opt(None, "ImageFolder root (one subfolder per class), or the root for manifest paths",
                             flag="--images")
    manifest: str | None = opt(None, "CSV with columns path,label instead of an ImageFolder (an empty label marks an "
                               "unlabelled image)", flag="--manifest")
    unlabeled: str | None = opt(None, "any tree of images without labels: they get every view and teacher output, "
                                "never fit the probe, and train the student through the teacher terms only",
                                flag="--unlabeled")
    classes_file: str | None = opt(None, "file with one class name per line, in index order (default: sorted() of "
                                   "the names, as torchvision's ImageFolder)", flag="--classes")
    allow_outside_paths: bool = opt(False, "take manifest rows whose path is absolute or leaves the manifest's "
                                    "folder (or --images, when given); default: refused, so a manifest from "
                                    "elsewhere reads only the folder it came with", flag="--allow-outside-paths")
    out: str | None = opt(None, "store path: *.zarr (a local folder, or any fsspec URL: s3://bucket/derm.zarr, "
                          "gs://...) or *.h5 (one local file)", flag="--out")
    storage_options: dict[str, Any] = opt(help=STORAGE_HELP, flag="--storage-options", parse=json_options,
                                          default_factory=dict, secret=True)
    views: ViewPolicy = opt(default_factory=ViewPolicy)
    teacher: TeacherConfig = opt(default_factory=TeacherConfig)
    store: StoreLayout = opt(default_factory=StoreLayout)
    probe: ProbeConfig = opt(default_factory=ProbeConfig)
    on_bad_image: str = opt("skip", "skip bad files (listed in the report) or stop", flag="--on-bad-image",
                            choices=["skip", "fail"])
    min_side: int = 8                           # smaller images are skipped as too small
    max_pixels: int = 200_000_000               # larger images are skipped as too large
    workers: int = opt(2, "decoding processes", flag="--workers")
    device: str = opt("auto", "auto (cuda, then mps, then cpu), cpu, cuda, cuda:1, ...", flag="--device")

    def decoding(self) -> Decoding:
        """The settings decoding the source files takes (the scan and the teacher pass)."""
        return Decoding(self.workers, self.min_side, self.max_pixels, self.on_bad_image)

    def validate(self, out: bool = True) -> None:
        """out: the store path is needed (`plan` needs none)."""
        if self.images is None and self.manifest is None:
            raise ConfigError("give --images (an ImageFolder root) or --manifest (a CSV of path,label)")
        if out and self.out is None:
            raise ConfigError("give --out, the store path (.zarr or .h5)")
        if self.out is not None:
            check_store_url(self.out, "--out")
        if self.on_bad_image not in ("skip", "fail"):
            raise ConfigError(f"on_bad_image must be skip|fail, got {self.on_bad_image!r}")
        in_range("workers", self.workers, 0, MAX_WORKERS, "decoding processes")
        in_range("min_side", self.min_side, 1)
        in_range("max_pixels", self.max_pixels, 1)
        for part in (self.views, self.teacher, self.store, self.probe):
            part.validate()
        if "spread" in self.probe.heads and self.unlabeled is None and self.manifest is None:
            raise ConfigError("--heads spread refits the probe with unlabelled images: give them with --unlabeled "
                              "(or as manifest rows with an empty label)")

    def identity(self) -> dict[str, Any]:
        """The settings that decide the store's content; a resumed build must match them."""
        d = to_dict(self)
        for key in ("out", "workers", "device", "images", "manifest", "unlabeled", "allow_outside_paths"):
            d.pop(key)
        d["teacher"].pop("batch_size")
        d["teacher"].pop("compile")
        return d


@dataclass(frozen=True)
class Decoding:
    """What decoding the source files takes: the scan and the teacher pass's worker processes."""
    workers: int = 2
    min_side: int = 8
    max_pixels: int = 200_000_000
    on_bad_image: str = "skip"


def check_store_url(path: str, flag: str) -> None:
    """A store path: an HDF5 file on a local disk, or a Zarr folder (locally or under a bucket, never a
    bucket's root, which holds other things than the store)."""
    remote = "://" in path and not path.startswith("file://")
    if remote and path.lower().endswith((".h5", ".hdf5")):
        raise ConfigError(f"{flag} {path}: an HDF5 store is one file on a local disk; write it there, then copy it "
                          "(or use a .zarr store, which lives in a bucket too)")
    if remote and not path.split("://", 1)[1].strip("/").partition("/")[2]:
        raise ConfigError(f"{flag} {path}: a store is a folder inside a bucket (such as {path.rstrip('/')}/derm.zarr), "
                          "never the bucket itself")


def stored_policy(attrs: dict[str, Any]) -> ViewPolicy:
    """The view policy a store records (settings added since it was written at their defaults)."""
    return from_dict(ViewPolicy, merge(to_dict(ViewPolicy()), attrs["view_policy"]), "view_policy.")


def stored_identity(stored: dict[str, Any]) -> dict[str, Any]:
    """A store's recorded identity, with any setting added since it was written at its default (what
    the build that wrote it did), so that stores from before a new setting still resume and compare."""
    return merge(BuildConfig().identity(), stored)
