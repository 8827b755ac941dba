"""featurestore build | add-teacher | plan | slim | inspect | show | verify | demo-data | demo-teacher: the
command line over the Python API (api.py), with the flags declared by the config dataclasses."""
from __future__ import annotations

import argparse
import json
import sys

from featurestore import api
from featurestore.common import log
from featurestore.common.errors import run_command
from featurestore.common.log import logger
from featurestore.common.options import (
    add_options,
    command_parser,
    json_options,
    storage_options_flag,
    values_of,
    whole,
)
from featurestore.pipeline.config import BuildConfig

EPILOG = """examples:
  featurestore demo-data data/demo
  featurestore plan  --images data/train --teacher google/medsiglip-448 --views 32 --patch-grid 8
  featurestore build --images data/train --out stores/derm.zarr --teacher google/medsiglip-448 --views 32 --patch-grid 8
  featurestore build --images data/demo --unlabeled data/more --out stores/demo.zarr --teacher random:tiny --views 4
  featurestore build ... --teacher siglip=google/medsiglip-448 --teacher dino=facebook/dinov2-base
  featurestore add-teacher stores/derm.zarr --teacher dino=facebook/dinov2-base
  featurestore slim stores/derm.zarr stores/derm-laptop.zarr \
      --fields images,views/params,teachers/siglip/pooled,teachers/siglip/logits/probe
  featurestore inspect stores/derm.zarr [--json]
  featurestore show stores/derm.zarr --images 0,5,9 --out views.png
  featurestore verify stores/derm.zarr [--fix]
multi-process (each rank owns whole shards; Zarr stores only):
  accelerate launch --num_processes 2 -m featurestore build ...     # GPU box, one GPU per rank
  torchrun --nproc_per_node 2 -m featurestore build ...              # same, also on CPU-only machines
"""


def parser() -> argparse.ArgumentParser:
    p, sub, common = command_parser("featurestore", "Run a vision teacher once over K augmented views of every "
                                    "image and store its outputs for offline distillation.", EPILOG)

    b = sub.add_parser("build", parents=[common], help="build (or resume, or repair) a store",
                       description="Build a store, or resume an interrupted build (or repair one after "
                       "`verify --fix`) with the same command. Flags override --config; defaults shown are "
                       "the built-in ones.")
    add_options(b, BuildConfig)
    b.add_argument("--overwrite", action="store_true", help="delete the store at --out and start again (only a "
                   "store kdstore made: any other file or folder is refused and left as it is)")

    a = sub.add_parser("add-teacher", parents=[common], help="add a teacher's outputs to a finished store, over "
                       "its very views", description="Run --teacher (NAME=ID names it; give it again for several) "
                       "over every stored view of a finished store, into a group of its own, with its heads: the "
                       "same arrays as building with it from the start. The store's views, layout and probe settings "
                       "are its own; --images defaults to the folder it was built from. Resumable: kill it and run "
                       "the same command.")
    a.add_argument("store", help="a finished store (format 3)")
    add_options(a, BuildConfig, skip=("out",))

    pl = sub.add_parser("plan", parents=[common], help="before a build: views, bytes per field, store size and "
                        "teacher time on common GPUs", description="Takes the flags of `build` (without --out) "
                        "and estimates the store and the teacher pass before any GPU time is paid.")
    add_options(pl, BuildConfig)
    pl.add_argument("--sample-images", type=whole(0, 1000), default=8, help="images run through the teacher here to "
                    "measure bytes per view and this machine's speed (default: 8)")
    pl.add_argument("--json", action="store_true", help="print one JSON object")

    s = sub.add_parser("slim", parents=[common], help="copy a store keeping only the arrays named",
                       description="Copy SRC to DST keeping only the arrays named (labels, split, ids, sha256, "
                       "progress and the heads' small arrays always come along), then verify DST.")
    s.add_argument("src", help="a complete store")
    s.add_argument("dst", help="the new store (.zarr or .h5); must not exist")
    s.add_argument("--fields", required=True, help="comma-separated array names to keep, e.g. "
                   "images,views/params,teachers/siglip/pooled,teachers/siglip/logits/probe")
    storage_options_flag(s)

    i = sub.add_parser("inspect", parents=[common], help="what is in a store, how big, how good the teacher is")
    i.add_argument("store")
    i.add_argument("--json", action="store_true", help="print one JSON object")
    storage_options_flag(i)

    w = sub.add_parser("show", parents=[common], help="a picture of what the teacher saw: each image's crop boxes, "
                       "its rendered views and the teacher's top classes", description="Draws, for each image "
                       "named, the stored image with every view's crop box (view k in colour k), the views as the "
                       "trainer renders them (crops, flips, rotations, colour, mixing) and under each the teacher's "
                       "top classes with their probabilities. Writes a PNG.")
    w.add_argument("store")
    w.add_argument("--images", required=True, type=index_list, help="comma-separated store indices (0 .. N-1, as "
                   "`inspect` counts them), e.g. 0,5,9")
    w.add_argument("--out", required=True, help="the PNG to write")
    w.add_argument("--teacher", help="whose logits to show, in a store of several (default: the first)")
    w.add_argument("--head", help="which head's logits: probe, zeroshot, spread (default: probe)")
    w.add_argument("--size", type=whole(16, 1024), default=128, help="side of each drawn view in pixels (default: 128)")
    w.add_argument("--top", type=whole(1, 10), default=3, help="classes listed under each view (default: 3)")
    w.add_argument("--max-views", type=whole(1, 1024), default=16, help="views drawn per image, the first ones "
                   "(default: 16)")
    storage_options_flag(w)

    v = sub.add_parser("verify", parents=[common], help="read every chunk of every array; one line per problem "
                       "(exit 1 if any)")
    v.add_argument("store")
    v.add_argument("--fix", action="store_true", help="mark what is damaged for repair: then run the same "
                   "`featurestore build` command, which recomputes exactly that")
    v.add_argument("--digest", type=hex_digest, help="the store digest its builder published (64 hex digits, as "
                   "`featurestore inspect` prints it): the store must give exactly this one")
    storage_options_flag(v)

    d = sub.add_parser("demo-data", parents=[common], help="write a synthetic 10-class ImageFolder of JPEG/PNG files")
    d.add_argument("out")
    d.add_argument("--per-class", type=whole(1, 100_000), default=40, help="images per class (default: 40)")
    d.add_argument("--seed", type=whole(0), default=0, help="seed of the images (default: 0)")
    d.add_argument("--flat", action="store_true", help="one folder without class subfolders (unlabelled images)")
    d.add_argument("--class-counts", help="'reference': the reference dataset's imbalance (2,381 nevi to 563 atopic "
                   "dermatitis, 4.2x) at a mean of --per-class images; or ten comma-separated counts (default: "
                   "--per-class of each)")

    t = sub.add_parser("demo-teacher", parents=[common], help="train a small SigLIP (or DINOv2) vision teacher "
                       "on synthetic demo images and save it like a hub checkpoint", description="Trains a small "
                       "SiglipVisionModel (or Dinov2Model) on a large synthetic corpus (its own seed, disjoint "
                       "from demo-data's) on the CPU for a fixed number of seeded steps (the same weights on any "
                       "machine), then saves it with save_pretrained plus a preprocessor config.")
    t.add_argument("out", help="directory for the checkpoint")
    t.add_argument("--images", type=whole(10, 1_000_000), default=3000,
                   help="synthetic training images (default: 3000)")
    t.add_argument("--steps", type=whole(1, 1_000_000), default=300, help="optimizer steps of 64 views (default: 300)")
    t.add_argument("--seed", type=whole(0), default=1000, help="seed of the corpus and the weights (default: 1000)")
    t.add_argument("--family", choices=("siglip", "dinov2"), default="siglip",
                   help="the teacher's architecture: siglip (SiglipVisionModel: attention-pool embedding, mean and "
                   "std 0.5) or dinov2 (Dinov2Model: CLS token, ImageNet mean and std), to build a store of two "
                   "teachers of different families (default: siglip)")
    return p


def index_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"store indices are comma-separated whole numbers, got {text!r}") from None
    if not values or min(values) < 0:
        raise argparse.ArgumentTypeError(f"store indices are comma-separated whole numbers from 0, got {text!r}")
    return values


def hex_digest(text: str) -> str:
    value = text.strip().lower().removeprefix("sha256:")
    if len(value) != 64 or any(ch not in "0123456789abcdef" for ch in value):
        raise argparse.ArgumentTypeError(f"a store digest is 64 hex digits, got {text!r}")
    return value


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    log.enable()
    resumable = args.command in ("build", "add-teacher")
    step = "finished chunks are kept; run the same command to continue" if resumable else "run the same command again"
    return run_command(f"featurestore {args.command}", lambda: _run(args), args.debug, next_step=lambda: step)


def _run(args: argparse.Namespace) -> int:
    if args.command == "build":
        api.build(config=args.config, overwrite=args.overwrite, **values_of(args, BuildConfig)).close()
        return 0
    if args.command == "add-teacher":
        values = values_of(args, BuildConfig)
        values.pop("out", None)
        api.add_teacher(args.store, config=args.config, **values).close()
        return 0
    if args.command == "plan":
        from featurestore.pipeline.planner import format_plan
        p = api.plan(config=args.config, sample_images=args.sample_images, **values_of(args, BuildConfig))
        print(json.dumps(p, indent=2) if args.json else format_plan(p))
        return 0
    if args.command == "slim":
        api.slim(args.src, args.dst, args.fields, json_options(args.storage_options)).close()
        return 0
    if args.command == "demo-data":
        from featurestore.demo import class_counts
        counts = class_counts(args.per_class, args.class_counts)
        out = api.demo_data(args.out, args.per_class, args.seed, flat=args.flat, counts=counts)
        print(f"wrote {sum(counts)} images to {out}" + (f" ({', '.join(map(str, counts))} per class)"
                                                       if args.class_counts else ""))
        return 0
    if args.command == "demo-teacher":
        print(api.demo_teacher(args.out, args.images, args.steps, args.seed, args.family))
        return 0
    if args.command == "inspect":
        from featurestore.store.report import format_summary
        s = api.inspect(args.store, json_options(args.storage_options))
        print(json.dumps(s, indent=2) if args.json else format_summary(s))
        return 0
    if args.command == "show":
        r = api.show(args.store, args.images, args.out, teacher=args.teacher, head=args.head, size=args.size,
                     top=args.top, max_views=args.max_views, storage_options=json_options(args.storage_options))
        print(f"wrote {args.out}: {len(r['images'])} image(s), {len(r['views'])} view(s) each, {r['teacher']}'s "
              f"{r['head']} head ({r['size'][0]} x {r['size'][1]} px)")
        return 0
    return _verify(args.store, args.fix, json_options(args.storage_options), args.digest)


def _verify(path: str, fix: bool, options: dict, published: str | None) -> int:
    from featurestore.store.integrity import check
    from featurestore.store.schema import StoreError
    try:
        found, actions = check(path, fix, options, published)
    except StoreError as e:
        logger.error(f"{path}: {e}")
        logger.error(f"{path}: 1 problem(s); it cannot be opened, so --fix cannot mark it: rebuild it with --overwrite"
                     if fix else f"{path}: 1 problem(s)")
        return 1
    if not found.problems:
        print(f"{path}: OK, every chunk of every array read back whole and finite; digest {found.digest}"
              + (" (the published one)" if published else " (as its build recorded)" if found.recorded else
                 " (computed now: its build recorded none)"))
        return 0
    for p in found.problems:
        logger.error(f"{path}: {p.line()}")
    logger.error(f"{path}: {len(found.problems)} problem(s)")
    for a in actions:
        logger.info(f"fixed: {a}")
    if actions:
        logger.info("now run the same `featurestore build` command: it recomputes what was marked")
    return 1


if __name__ == "__main__":
    sys.exit(main())
