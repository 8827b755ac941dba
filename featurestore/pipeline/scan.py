"""Phase 1 of a build: decode-check every listed file before any teacher work.

Each file is decoded once in worker processes (spawned: they inherit no open store or lock); a bad
one is skipped with its reason for the build report, or stops the build (`--on-bad-image fail`).
A class left without readable images stops the build here, before any GPU time is paid.
"""
from __future__ import annotations

import contextlib
import os
import sys
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass

from tqdm import tqdm

from featurestore.common.children import end_with, mp_context
from featurestore.common.errors import KdstoreError
from featurestore.pipeline.config import Decoding
from featurestore.pipeline.sources import BadImage, DatasetError, Listing, Source, decode


@dataclass
class ScanResult:
    valid: list[Source]
    sha256: list[str]
    skipped: list[tuple[str, str]]         # (id, reason)
    converted: dict[str, int]
    notes: list[tuple[str, str]]           # (id, note) worth a look, e.g. extreme aspect ratios


def decode_side(teacher_size: int, image_size: int) -> int:
    """Longest side kept when decoding: crops never need more than twice the larger render size."""
    return 2 * max(teacher_size, image_size)


@contextlib.contextmanager
def worker_deaths(workers: int):
    """A decoding process that dies (killed, out of memory, or a script that starts the build at
    import time, which every spawned worker then re-runs) becomes one clear error."""
    try:
        yield
    except (BrokenProcessPool, RuntimeError) as e:
        if not isinstance(e, BrokenProcessPool) and "DataLoader worker" not in str(e):
            raise
        raise KdstoreError(
            f"a decoding worker process stopped unexpectedly ({type(e).__name__}). Worker processes re-import "
            "the script that started the build: from Python, call featurestore.build under "
            "`if __name__ == \"__main__\":`, or pass workers=0. If memory ran out, lower --workers "
            f"(now {workers}). Finished chunks are kept; run the same command again to resume.") from e


def _check(args):
    src, min_side, max_pixels, max_side = args
    try:
        d = decode(src.path, min_side, max_pixels, max_side)
        return src, d.sha256, None, d.notes
    except BadImage as e:
        return src, None, e.reason, ()


def scan(listing: Listing, dec: Decoding, max_side: int) -> ScanResult:
    jobs = [(s, dec.min_side, dec.max_pixels, max_side) for s in listing.sources]
    pool = (ProcessPoolExecutor(dec.workers, mp_context=mp_context(), initializer=end_with, initargs=(os.getpid(),))
            if dec.workers > 1 else contextlib.nullcontext())
    with pool as ex, worker_deaths(dec.workers):
        results = (ex.map(_check, jobs, chunksize=16) if dec.workers > 1 else map(_check, jobs))
        results = list(tqdm(results, total=len(jobs), desc="checking images", unit="img",
                            disable=None, file=sys.stderr))
    valid, shas, skipped, converted, notes = [], [], list(listing.ignored), Counter(), []
    for src, sha, reason, found in results:
        if reason is None:
            valid.append(src)
            shas.append(sha)
            for note in found:
                if note.startswith("extreme aspect"):
                    notes.append((src.rel, note))
                    converted["extreme aspect"] += 1
                else:
                    converted[note] += 1
        else:
            skipped.append((src.rel, reason))
    bad = [(i, r) for i, r in skipped if not r.startswith("not an image file extension")]
    if bad and dec.on_bad_image == "fail":
        listed = "; ".join(f"{i}: {r}" for i, r in bad[:20]) + (f"; and {len(bad) - 20} more" if len(bad) > 20 else "")
        raise DatasetError(f"{len(bad)} bad image(s) and --on-bad-image fail: {listed}")
    counts = Counter(s.label for s in valid)
    empty = [c for i, c in enumerate(listing.classes) if counts[i] == 0]
    if empty:
        raise DatasetError(f"no readable images left for classes {empty}")
    return ScanResult(valid, shas, skipped, dict(converted), notes)
