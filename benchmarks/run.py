"""Run the benchmarks: `python -m benchmarks.run --profile cpu|gpu [--only teacher,loader,...]`.

Every figure is printed beside its baseline measured in the same run, with the machine's name,
and written to benchmarks/results/ as JSON and a markdown table.
"""
from __future__ import annotations

import argparse
import datetime
import sys
import time
import traceback

import torch
import yaml

from benchmarks import bench_loader, bench_remote, bench_scale, bench_storage, bench_teacher, bench_training, fidelity
from benchmarks.common import machine, md_table, write_results

PROFILES = {
    # a few minutes on a 2-core CPU: the teacher is the full MedSigLIP-448 architecture, so few views
    "cpu": {"teacher_arch": "medsiglip-448", "teacher_images": 10, "teacher_views": 2, "teacher_batch": 8,
            "model_iters": 1,
            "plain_images": 4, "plain_views": 2, "plain_batch": 4, "workers": 2, "loader_per_class": 60,
            "loader_epochs": 2,
            "student": "shufflenet_v2_x1_0", "train_batch": 8, "train_steps": 12, "online_steps": 1,
            "train_batches_per_epoch": 14, "teacher_compile": False, "train_compile": False,
            "storage_images": 128, "remote_per_class": 64,
            "scale_sizes": [250, 1000], "scale_student": "shufflenet_v2_x0_5", "scale_image_size": 224},
    # full size, for a lent GPU (H100/H200)
    # (the heads fit on random-teacher embeddings, slow to converge and not what is measured, uses 1,600 rows)
    "gpu": {"teacher_arch": "medsiglip-448", "teacher_images": 400, "teacher_views": 16, "teacher_batch": 128,
            "model_iters": 10,
            "probe_rows": 1600,
            "plain_images": 64, "plain_views": 4, "plain_batch": 32, "workers": 12, "loader_per_class": 100,
            "loader_epochs": 3,
            "student": "shufflenet_v2_x1_0", "train_batch": 128, "train_steps": 20, "online_steps": 5,
            "train_batches_per_epoch": 8, "teacher_compile": True, "train_compile": True,
            "storage_images": 512, "remote_per_class": 128,
            "scale_sizes": [1000, 4000], "scale_student": "shufflenet_v2_x1_0", "scale_image_size": 224},
}
BENCHES = {"teacher": bench_teacher, "loader": bench_loader, "training": bench_training, "storage": bench_storage,
           "remote": bench_remote, "scale": bench_scale, "fidelity": fidelity}
# fidelity trains 12 students (about 30 minutes on 2 cores) beside the stores it builds: run it by name
DEFAULT = {"cpu": "teacher,loader,training,storage,remote,scale", "gpu": "teacher,loader,training,storage"}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--profile", choices=sorted(PROFILES), default="cpu", help="problem sizes (cpu: a few minutes here)")
    p.add_argument("--only", help="comma-separated subset of " + ",".join(BENCHES)
                   + "; default: " + "; ".join(f"{k}: {v}" for k, v in DEFAULT.items()))
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override one setting of the profile (YAML value), e.g. --set online_steps=0; repeatable")
    args = p.parse_args(argv)
    args.only = args.only or DEFAULT[args.profile]
    unknown = set(args.only.split(",")) - set(BENCHES)
    if unknown:
        p.error(f"unknown benchmark(s) {', '.join(sorted(unknown))}; choose from {', '.join(BENCHES)}")
    if args.profile == "gpu" and not torch.cuda.is_available():
        print("the gpu profile needs a CUDA device; use --profile cpu here", file=sys.stderr)
        return 2
    profile = dict(PROFILES[args.profile])
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep or key not in profile:
            p.error(f"--set {item}: give KEY=VALUE with KEY one of {', '.join(sorted(profile))}")
        profile[key] = yaml.safe_load(value)
    names = args.only.split(",")
    subset = "" if args.only == DEFAULT[args.profile] else "-" + "-".join(names)
    payload = {"machine": machine(), "date": datetime.date.today().isoformat(), "profile": args.profile,
               "settings": profile, "torch": torch.__version__, "results": {}, "failed": {}, "seconds": {}}
    rows, failed = [], 0
    for name in names:
        print(f"== {name}", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        try:
            payload["results"][name] = BENCHES[name].run(profile)
            rows += BENCHES[name].rows(payload["results"][name])
        except Exception:  # noqa: BLE001 - one broken benchmark must not cost the others' figures
            failed += 1
            payload["failed"][name] = traceback.format_exc()
            print(payload["failed"][name], file=sys.stderr, flush=True)
            rows.append([f"{name}: FAILED", "-", "see failed in the JSON file"])
        payload["seconds"][name] = round(time.perf_counter() - t0, 1)
        print(f"== {name}: {payload['seconds'][name]} s", file=sys.stderr, flush=True)
        table = (f"# kdstore benchmarks: {payload['machine']}, {payload['date']}, profile {args.profile}\n\n"
                 + md_table(["what", "figure", "against the baseline in this run"], rows))
        json_path, md_path = write_results(f"bench-{args.profile}{subset}", payload, table)   # after each one
    print(table)
    print(f"\nwrote {json_path} and {md_path}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
