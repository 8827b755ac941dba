"""featurestore build | plan | slim | inspect | verify | demo-data | demo-teacher."""
from __future__ import annotations

import argparse
import json
import sys

from .config import BuildConfig, document_defaults, load_config, load_prompts
from .errors import command_parser, run_command

FLAGS = {  # flag dest -> build config key (the Python API takes the same names)
    "images": "images", "manifest": "manifest", "unlabeled": "unlabeled", "classes_file": "classes_file",
    "allow_outside_paths": "allow_outside_paths",
    "out": "out", "on_bad_image": "on_bad_image", "workers": "workers", "device": "device",
    "teacher": "teacher.id", "revision": "teacher.revision", "dtype": "teacher.dtype",
    "batch_size": "teacher.batch_size", "prompt_template": "teacher.prompt_template", "prompts": "teacher.prompts",
    "zeroshot": "teacher.zeroshot", "views": "views.views", "view_seed": "views.seed", "mix_prob": "views.mix_prob",
    "patch_grid": "store.patch_grid", "patch_dim": "store.patch_dim", "pca_images": "store.pca_images",
    "image_size": "store.image_size", "chunk_size": "store.chunk_size", "compression": "store.compression",
    "folds": "probe.folds", "val_fraction": "probe.val_fraction", "probe_max_rows": "probe.max_rows",
}

EPILOG = """examples:
  featurestore demo-data data/demo
  featurestore plan  --images data/train --teacher google/medsiglip-448 --views 32 --patch-grid 8
  featurestore build --images data/train --out stores/derm.zarr --teacher google/medsiglip-448 --views 32 --patch-grid 8
  featurestore build --images data/demo --unlabeled data/more --out stores/demo.zarr --teacher random:tiny --views 4
  featurestore slim stores/derm.zarr stores/derm-laptop.zarr --fields images,views/params,teacher/pooled,teacher/logits/probe
  featurestore inspect stores/derm.zarr [--json]
  featurestore verify stores/derm.zarr [--fix]
multi-process (each rank owns whole shards; Zarr stores only):
  accelerate launch --num_processes 2 -m featurestore build ...     # GPU box, one GPU per rank
  torchrun --nproc_per_node 2 -m featurestore build ...              # same, also on CPU-only machines
"""


def add_build_flags(b: argparse.ArgumentParser) -> None:
    b.add_argument("--config", help="YAML build config; flags below override it")
    b.add_argument("--images", help="ImageFolder root (one subfolder per class), or the root for manifest paths")
    b.add_argument("--manifest", help="CSV with columns path,label instead of an ImageFolder (an empty label "
                   "marks an unlabelled image)")
    b.add_argument("--allow-outside-paths", action="store_true", default=None, help="take manifest rows whose "
                   "path is absolute or leaves the manifest's folder (or --images, when given); default: refused, "
                   "so a manifest from elsewhere reads only the folder it came with")
    b.add_argument("--unlabeled", help="any tree of images without labels: they get every view and teacher "
                   "output, never fit the probe, and train the student through the teacher terms only")
    b.add_argument("--classes", dest="classes_file", help="file with one class name per line, in index order "
                   "(default: sorted() of the names, as torchvision's ImageFolder)")
    b.add_argument("--out", help="store path: *.zarr (default backend, also fsspec URLs) or *.h5")
    b.add_argument("--teacher", help="hub id, local directory (save_pretrained), or random:medsiglip-448 / random:tiny")
    b.add_argument("--revision", help="hub revision (branch, tag or commit) of the teacher")
    b.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], help="teacher compute dtype "
                   "(auto: bfloat16 on GPUs with native support, float16 on older GPUs such as T4/V100, "
                   "float32 on CPU)")
    b.add_argument("--batch-size", type=int, help="views per teacher forward (0: 64 on GPU, 16 on CPU)")
    b.add_argument("--views", type=int, help="K, views per image (view 0 is the whole image)")
    b.add_argument("--view-seed", type=int, help="seed of the view parameters")
    b.add_argument("--mix-prob", type=float, help="probability that a view is mixed (mixup/cutmix) with a partner")
    b.add_argument("--patch-grid", type=int, help="store patch tokens average-pooled to g x g (0: none)")
    b.add_argument("--patch-dim", type=int, help="store patch tokens at d dims through a PCA basis fitted during "
                   "the build (0: the teacher's full width)")
    b.add_argument("--pca-images", type=int, help="images whose patch tokens (4 views each) fit the PCA basis")
    b.add_argument("--image-size", type=int, help="S: side of the stored squashed images the student renders from")
    b.add_argument("--chunk-size", type=int, help="images per chunk (one Zarr shard, one unit of resume)")
    b.add_argument("--compression", help="zarr: none|zstd|blosc|lz4, hdf5: none|gzip|lzf (default: zarr zstd, images lz4; hdf5 lzf)")
    b.add_argument("--folds", type=int, help="cross-fitting folds of the linear probe")
    b.add_argument("--val-fraction", type=float, help="fraction of each class held out for validation")
    b.add_argument("--probe-max-rows", type=int, help="at most this many pooled embeddings fit the probe")
    b.add_argument("--prompt-template", help="zero-shot prompt with {name} for the class name (numbers and "
                   "image counts removed from folder names)")
    b.add_argument("--prompts", help="YAML file: class name -> list of prompts, whose text "
                   "embeddings are averaged (default: the template above)")
    b.add_argument("--no-zeroshot", dest="zeroshot", action="store_false", default=None,
                   help="skip the text tower (default: the zero-shot head is stored when the model has one)")
    b.add_argument("--on-bad-image", choices=["skip", "fail"], help="skip bad files (listed in the report) or stop")
    b.add_argument("--workers", type=int, help="decoding processes")
    b.add_argument("--device", help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:1, ...")
    document_defaults(b, FLAGS, BuildConfig())


def _parser() -> argparse.ArgumentParser:
    p, sub, common = command_parser("featurestore", "Run a vision teacher once over K augmented views of every "
                                    "image and store its outputs for offline distillation.", EPILOG)

    b = sub.add_parser("build", parents=[common], help="build (or resume, or repair) a store",
                       description="Build a store, or resume an interrupted build (or repair one after "
                       "`verify --fix`) with the same command. Flags override --config; defaults shown are "
                       "the built-in ones.")
    add_build_flags(b)
    b.add_argument("--overwrite", action="store_true", help="delete the store at --out and start again (only a "
                   "store kdstore made: any other file or folder is refused and left as it is)")

    pl = sub.add_parser("plan", parents=[common], help="before a build: views, bytes per field, store size and "
                        "teacher time on common GPUs", description="Takes the flags of `build` (without --out) "
                        "and estimates the store and the teacher pass before any GPU time is paid.")
    add_build_flags(pl)
    pl.add_argument("--sample-images", type=int, default=8, help="images run through the teacher here to measure "
                    "bytes per view and this machine's speed (default: 8)")
    pl.add_argument("--json", action="store_true", help="print one JSON object")

    s = sub.add_parser("slim", parents=[common], help="copy a store keeping only the arrays named",
                       description="Copy SRC to DST keeping only the arrays named (labels, split, ids, sha256, "
                       "progress and the heads' small arrays always come along), then verify DST.")
    s.add_argument("src", help="a complete store")
    s.add_argument("dst", help="the new store (.zarr or .h5); must not exist")
    s.add_argument("--fields", required=True, help="comma-separated array names to keep, e.g. "
                   "images,views/params,teacher/pooled,teacher/logits/probe")

    i = sub.add_parser("inspect", parents=[common], help="what is in a store, how big, how good the teacher is")
    i.add_argument("store")
    i.add_argument("--json", action="store_true", help="print one JSON object")

    v = sub.add_parser("verify", parents=[common], help="read every chunk of every array; one line per problem "
                       "(exit 1 if any)")
    v.add_argument("store")
    v.add_argument("--fix", action="store_true", help="mark what is damaged for repair: then run the same "
                   "`featurestore build` command, which recomputes exactly that")

    d = sub.add_parser("demo-data", parents=[common], help="write a synthetic 10-class ImageFolder of JPEG/PNG files")
    d.add_argument("out")
    d.add_argument("--per-class", type=int, default=40, help="images per class (default: 40)")
    d.add_argument("--seed", type=int, default=0, help="seed of the images (default: 0)")
    d.add_argument("--flat", action="store_true", help="one folder without class subfolders (unlabelled images)")

    t = sub.add_parser("demo-teacher", parents=[common], help="train a small SigLIP vision teacher on synthetic "
                       "demo images and save it like a hub checkpoint", description="Trains a small "
                       "SiglipVisionModel on a large synthetic corpus (its own seed, disjoint from demo-data's) "
                       "on the CPU, then saves it with save_pretrained plus a preprocessor config.")
    t.add_argument("out", help="directory for the checkpoint")
    t.add_argument("--images", type=int, default=3000, help="synthetic training images (default: 3000)")
    t.add_argument("--seconds", type=float, default=100.0, help="training time budget (default: 100)")
    t.add_argument("--seed", type=int, default=1000, help="seed of the corpus and the weights (default: 1000)")
    return p


def build_config(args: argparse.Namespace) -> BuildConfig:
    if isinstance(args.prompts, str):
        args.prompts = load_prompts(args.prompts)
    return load_config(BuildConfig, args.config, args, FLAGS)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    step = "finished chunks are kept; run the same command to continue" if args.command == "build" else \
        "run the same command again"
    return run_command(f"featurestore {args.command}", lambda: _run(args), args.debug, next_step=lambda: step)


def _run(args: argparse.Namespace) -> int:
    if args.command == "build":
        from .builder import build
        build(build_config(args), overwrite=args.overwrite)
        return 0
    if args.command == "plan":
        from .planner import format_plan, plan
        p = plan(build_config(args), args.sample_images)
        print(json.dumps(p, indent=2) if args.json else format_plan(p))
        return 0
    if args.command == "slim":
        from .slimming import slim
        print(slim(args.src, args.dst, args.fields.split(",")))
        return 0
    if args.command == "demo-data":
        from .demo import write_demo_data
        out = write_demo_data(args.out, args.per_class, args.seed, flat=args.flat)
        print(f"wrote {10 * args.per_class} images to {out}")
        return 0
    if args.command == "demo-teacher":
        from .demo_teacher import train_demo_teacher
        print(train_demo_teacher(args.out, args.images, args.seconds, args.seed))
        return 0
    from .store import Store
    if args.command == "inspect":
        from .report import format_summary, summarize
        with Store.open(args.store) as store:
            s = summarize(store)
        print(json.dumps(s, indent=2) if args.json else format_summary(s))
        return 0
    return _verify(args.store, args.fix)


def _verify(path: str, fix: bool) -> int:
    from .integrity import check
    from .schema import StoreError
    try:
        problems, actions = check(path, fix)
    except StoreError as e:
        print(f"{path}: {e}", file=sys.stderr)
        print(f"{path}: 1 problem(s); it cannot be opened, so --fix cannot mark it: rebuild it with --overwrite"
              if fix else f"{path}: 1 problem(s)", file=sys.stderr)
        return 1
    if not problems:
        print(f"{path}: OK, every chunk of every array read back whole and finite")
        return 0
    for p in problems:
        print(f"{path}: {p.line()}", file=sys.stderr)
    print(f"{path}: {len(problems)} problem(s)", file=sys.stderr)
    for a in actions:
        print(f"fixed: {a}", file=sys.stderr)
    if actions:
        print("now run the same `featurestore build` command: it recomputes what was marked", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
