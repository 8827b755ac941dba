"""Scale: the reference widths (D = 1152, K = 32, g = 8) at two store sizes, built through the public
`featurestore build` with a cheap wide teacher (a SiglipVisionModel of width 1152 and one layer at
112 px: real shapes, little compute), then one epoch of `trainer fit` with the patch loss on:
peak resident memory (the child's ru_maxrss) and samples/s of the streaming path against the in-RAM
path (everything read into RAM first, as every trainer run did before streaming) on the same store,
in the same run. Both are extrapolated to N = 10,000: streaming memory is flat in N by construction
(a window of chunks), in-RAM memory grows linearly (fitted through the two sizes).
"""
from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REFERENCE_N = 10_000
TOWER = dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=1, num_attention_heads=16,
             image_size=112, patch_size=14)                      # 8 x 8 patch tokens


def _wide_teacher(out: Path) -> Path:
    import torch
    from transformers import SiglipImageProcessor, SiglipVisionConfig, SiglipVisionModel
    torch.manual_seed(0)
    SiglipVisionModel(SiglipVisionConfig(**TOWER)).save_pretrained(out)
    SiglipImageProcessor(size={"height": 112, "width": 112}, image_mean=[0.5] * 3,
                         image_std=[0.5] * 3).save_pretrained(out)
    return out


def _child(cmd: list[str]) -> dict:
    """Run a command as a child process; its wall time and peak resident memory (ru_maxrss)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError(f"{' '.join(cmd[:4])} failed: {r.stderr[-2000:]}")
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    if peak <= before:
        raise RuntimeError("ru_maxrss of the children did not grow; run each measurement in a fresh parent")
    return {"seconds": time.perf_counter() - t0, "peak_rss_gb": peak * 1024 / 1e9}


def _measure(cmd: list[str]) -> dict:
    """Each measurement in its own parent, so RUSAGE_CHILDREN's maximum is that child's alone."""
    code = ("import json, sys; from benchmarks.bench_scale import _child; "
            "print(json.dumps(_child(json.loads(sys.argv[1]))))")
    r = subprocess.run([sys.executable, "-c", code, json.dumps(cmd)], capture_output=True, text=True,
                       cwd=Path(__file__).resolve().parents[1])
    if r.returncode:
        raise RuntimeError(r.stderr[-2000:])
    return json.loads(r.stdout.strip().splitlines()[-1])


def _disk(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def run(profile: dict) -> dict:
    sizes, py = profile["scale_sizes"], sys.executable
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        teacher = _wide_teacher(tmp / "wide-teacher")
        out = {"sizes": sizes, "views": 32, "patch_grid": 8, "embed_dim": 1152, "student": profile["scale_student"],
               "image_size": profile["scale_image_size"], "runs": []}
        for n in sizes:
            from featurestore.demo import write_demo_data
            images = write_demo_data(tmp / f"img{n}", per_class=n // 10, seed=0, sizes=(96, 160))
            store = tmp / f"s{n}.zarr"
            build = _measure([py, "-m", "featurestore", "build", "--images", str(images), "--out", str(store),
                              "--teacher", str(teacher), "--views", "32", "--patch-grid", "8", "--image-size", "256",
                              "--chunk-size", "64", "--workers", str(profile["workers"]), "--no-zeroshot"])
            from featurestore.store.reader import StoreReader
            with StoreReader.open(store) as s:
                fields = {f.name: s.stored_bytes(f.name) for f in s.fields()}
            row = {"n": n, "store_bytes": _disk(store), "fields": fields, "build": build}
            for mode, budget in (("streaming", "0"), ("in_ram", "1000")):
                run_dir = tmp / f"run-{n}-{mode}"
                row[mode] = _measure([py, "-m", "trainer", "fit", "--store", str(store), "--out", str(run_dir),
                                      "--student", profile["scale_student"], "--image-size",
                                      str(profile["scale_image_size"]), "--batch-size", "32", "--epochs", "1",
                                      "--cpu", "--w-patches", "0.5", "--w-pooled", "0.5", "--ram-budget-gb", budget])
                summary = json.loads((run_dir / "summary.json").read_text())
                row[mode]["samples_per_s"] = summary["samples_per_s"]
            out["runs"].append(row)
            import shutil
            shutil.rmtree(store)
            shutil.rmtree(images)
    a, b = out["runs"][0], out["runs"][-1]
    slope = (b["in_ram"]["peak_rss_gb"] - a["in_ram"]["peak_rss_gb"]) / (b["n"] - a["n"])
    out["reference"] = {
        "n": REFERENCE_N,
        "store_bytes": b["store_bytes"] * REFERENCE_N / b["n"],
        "streaming_peak_rss_gb": b["streaming"]["peak_rss_gb"],
        "in_ram_peak_rss_gb": b["in_ram"]["peak_rss_gb"] + slope * (REFERENCE_N - b["n"]),
    }
    out["streaming_rss_ratio_large_over_small"] = b["streaming"]["peak_rss_gb"] / a["streaming"]["peak_rss_gb"]
    out["streaming_over_in_ram_samples_per_s"] = [r["streaming"]["samples_per_s"] / r["in_ram"]["samples_per_s"]
                                                  for r in out["runs"]]
    return out


def rows(r: dict) -> list[list]:
    out = []
    for run in r["runs"]:
        n = run["n"]
        out += [
            [f"scale: store N={n} (K=32, g=8, D=1152, zstd, images lz4, crc32c)", f"{run['store_bytes'] / 1e9:.2f} GB",
             f"build {run['build']['seconds']:.0f} s, peak RSS {run['build']['peak_rss_gb']:.2f} GB"],
            [f"scale: trainer fit N={n}, streaming (1 epoch, patch loss on)",
             f"peak RSS {run['streaming']['peak_rss_gb']:.2f} GB, {run['streaming']['samples_per_s']:.1f} samples/s",
             f"RSS {run['streaming']['peak_rss_gb'] / run['in_ram']['peak_rss_gb']:.2f}x, samples/s "
             f"{run['streaming']['samples_per_s'] / run['in_ram']['samples_per_s']:.2f}x of in-RAM"],
            [f"scale: trainer fit N={n}, everything in RAM (the previous behaviour)",
             f"peak RSS {run['in_ram']['peak_rss_gb']:.2f} GB, {run['in_ram']['samples_per_s']:.1f} samples/s", "1x"],
        ]
    ref = r["reference"]
    out += [[f"scale: N={ref['n']:,} extrapolated", f"store {ref['store_bytes'] / 1e9:.1f} GB",
             f"trainer peak RSS: streaming {ref['streaming_peak_rss_gb']:.2f} GB (flat in N; measured "
             f"{r['streaming_rss_ratio_large_over_small']:.2f}x from N={r['sizes'][0]} to N={r['sizes'][-1]}), "
             f"in RAM {ref['in_ram_peak_rss_gb']:.1f} GB (linear)"]]
    return out


if __name__ == "__main__":
    print(json.dumps(run({"scale_sizes": [250, 1000], "workers": os.cpu_count() or 2,
                          "scale_student": "shufflenet_v2_x0_5", "scale_image_size": 224}), indent=2))
