"""Benchmark plumbing: the machine's name, median-of-repeats timing, results files."""
from __future__ import annotations

import datetime
import json
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import yaml

from featurestore.common.options import to_dict

RESULTS = Path(__file__).parent / "results"


def machine() -> str:
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)} + {torch.get_num_threads()} CPU threads"
    cpu = platform.processor() or "cpu"
    try:
        text = Path("/proc/cpuinfo").read_text()
        cpu = re.search(r"model name\s*:\s*(.+)", text).group(1).strip()
    except (OSError, AttributeError):
        pass
    import os
    return f"{cpu}, {os.cpu_count()} cores, no GPU"


def timed(fn: Callable[[], object], repeats: int = 3, warmup: int = 1) -> dict:
    """Run fn warmup + repeats times; seconds of each timed repeat and their median."""
    for _ in range(warmup):
        fn()
    runs = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - t0)
    return {"median_s": statistics.median(runs), "runs_s": runs}


def matmul_tflops(device: torch.device, dtype: torch.dtype, n: int = 2048, repeats: int = 5) -> float:
    """Dense matrix-multiply rate measured on this device now (the arithmetic bound's denominator)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)

    def run():
        for _ in range(repeats):
            a @ b
        if device.type == "cuda":
            torch.cuda.synchronize()
    t = timed(run, repeats=3)["median_s"]
    return 2 * n ** 3 * repeats / t / 1e12


def copy_gbps(mb: int = 256) -> float:
    """Memory copy rate (bytes copied per second), the loader's bandwidth bound."""
    src = np.ones(mb * 1024 * 1024, dtype=np.uint8)
    dst = np.empty_like(src)
    t = timed(lambda: np.copyto(dst, src), repeats=5)["median_s"]
    return src.nbytes / t / 1e9


def write_results(name: str, payload: dict, table: str, json_path: str | None = None) -> tuple[Path, Path]:
    """benchmarks/results/<name>-<machine>-<date>.json (or json_path) and the markdown table beside it."""
    slug = re.sub(r"[^a-z0-9]+", "-", payload["machine"].lower()).strip("-")[:60]
    stem = Path(json_path).with_suffix("") if json_path else \
        RESULTS / f"{name}-{slug}-{datetime.date.today().isoformat()}"
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(payload, indent=2))
    stem.with_suffix(".md").write_text(table + "\n")
    return stem.with_suffix(".json"), stem.with_suffix(".md")


def md_table(header: list[str], rows: list[list]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


DONE_LINE = re.compile(r"^done: .*teacher pass (\d+) views in ([\d.]+)s .*total ([\d.]+)s "
                       r"\(model load ([\d.]+)s, compile ([\d.]+)s, heads ([\d.]+)s\)$", re.M)
STAGES_LINE = re.compile(r"^teacher pass stages \(s\): (.*); batch (\d+), (compiled|eager)$", re.M)


def build_store(cfg) -> dict:
    """`featurestore build --config` in a fresh process, as a user runs it (a build started from the
    benchmark's own process would have its decoding workers re-import every benchmark module); with
    no decoding workers (workers: 0) in this process, sparing a second start of torch. Returns the
    build's own clock: views, pass_s, total_s, load_s, compile_s, heads_s, stages (seconds by stage of
    the pass), batch and compiled."""
    if cfg.workers == 0:
        from featurestore.common.log import enable
        from featurestore.pipeline.builder import build
        enable()
        t = build(cfg)
        return {"views": int(t["views"]), "pass_s": float(t.get("pass_s", 0.0)), "total_s": float(t["total_s"]),
                "load_s": float(t.get("load_s", 0.0)), "compile_s": float(t.get("compile_s", 0.0)),
                "heads_s": float(t.get("heads_s", 0.0)), "stages": t.get("stages", {}), "batch": t.get("batch"),
                "compiled": t.get("compiled", False)}
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        yaml.safe_dump(to_dict(cfg), f)
    try:
        r = subprocess.run([sys.executable, "-m", "featurestore", "build", "--config", f.name],
                           capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
    finally:
        Path(f.name).unlink()
    if r.returncode:
        raise RuntimeError(f"featurestore build failed: {r.stderr[-3000:]}")
    m = DONE_LINE.search(r.stderr)
    if m is None:
        raise RuntimeError(f"featurestore build printed no timing line: {r.stderr[-2000:]}")
    views, pass_s, total_s, load_s, compile_s, heads_s = m.groups()
    stages, batch, compiled = {}, None, False
    if (s := STAGES_LINE.search(r.stderr)) is not None:
        stages = {k: float(v) for k, v in (part.rsplit(" ", 1) for part in s.group(1).split(", "))}
        batch, compiled = int(s.group(2)), s.group(3) == "compiled"
    return {"views": int(views), "pass_s": float(pass_s), "total_s": float(total_s), "load_s": float(load_s),
            "compile_s": float(compile_s), "heads_s": float(heads_s), "stages": stages, "batch": batch,
            "compiled": compiled}
