"""The run folder: one writer (rank 0, under the run lock), what may be started over, what must be
resumed, and the sentence that says how to go on after a full disk or an interruption.

A folder with a finished epoch (checkpoints/last.pt) is continued with --resume, never started over;
one whose start was interrupted before its first epoch finished holds nothing to lose, and the same
command starts it again. Files kdstore did not write are never touched. A run that met a non-finite
loss or target is marked failed (FAILED, with the reason) and exports nothing.
"""
from __future__ import annotations

import contextlib
import errno
import json
import shutil
from pathlib import Path

from featurestore.common.errors import KdstoreError
from featurestore.common.options import ConfigError
from trainer import checkpoints

FAILED = "FAILED"
MARKER = ".kdstore-run"               # written by `trainer fit` before anything else: the folder is a run's
LAST = Path("checkpoints") / "last.pt"
BEST = Path("checkpoints") / "best.pt"
STARTED = {"config.yaml", "metrics.jsonl", "checkpoints", FAILED,   # what a run writes before its first epoch ends
           "metrics.csv", "tensorboard", "wandb", "trackers.json"}


class TrainingError(KdstoreError, RuntimeError):
    """Training cannot go on (a non-finite loss or target); the run directory is marked failed."""


def claim(out: Path, marker: str, what: str, made_before: tuple[str, ...] = ()) -> None:
    """Make `out` a folder of `what` (a run, a sweep), marked by the file `marker`, or refuse it: a folder
    that holds anything and carries no marker is someone else's (made_before: files that show it was made
    by a kdstore from before the markers, which is taken as marked)."""
    if out.is_dir() and not (out / marker).is_file():
        held = sorted(p.name for p in out.iterdir())
        if held and not any((out / p).exists() for p in made_before):
            raise ConfigError(f"{out} is not empty and is not a {what} folder kdstore made (it holds "
                              f"{', '.join(held[:5])}{' ...' if len(held) > 5 else ''}, and no {marker} marker); pick "
                              "a new --out (kdstore never overwrites what it did not write)")
    out.mkdir(parents=True, exist_ok=True)
    if not (out / marker).is_file():
        from featurestore.common.provenance import now, record
        checkpoints.write_text_atomic(json.dumps({"made_by": f"kdstore {what}", "created": now()} | record()) + "\n",
                                      out / marker)


def prepare(out: Path, resume: bool, config_file: str | None = None) -> None:
    """Refuse what must not be overwritten; claim the folder (its marker first); clear what an interrupted
    start left. config_file: the YAML the run was configured from, which the run must not overwrite."""
    ckpt, failed = out / LAST, out / FAILED
    if config_file and not resume and Path(config_file).resolve().parent == out.resolve():
        raise ConfigError(f"--config {config_file} lies in the run folder {out}, where a run writes its own "
                          "config.yaml and metrics; keep your config outside the run folder")
    if failed.is_file() and (resume or ckpt.is_file()):
        reason = failed.read_text().strip()
        raise ConfigError(f"{out} failed and cannot be resumed: {reason}" if resume else
                          f"run directory {out} holds a run that failed ({reason}); pick a new --out")
    if resume and not ckpt.is_file():
        raise ConfigError(f"nothing to resume in {out} (no {ckpt}: no epoch had finished); run the same command "
                          "without --resume to start it")
    if not resume and ckpt.is_file():
        raise ConfigError(f"run directory {out} is not empty; pass --resume to continue the run it holds, or "
                          "pick a new --out")
    claim(out, MARKER, "run", made_before=(str(LAST),))
    if not resume:
        foreign = sorted(p.name for p in out.iterdir() if p.name not in STARTED | {MARKER})
        if (out / "checkpoints").is_dir():
            foreign += sorted(f"checkpoints/{p.name}" for p in (out / "checkpoints").iterdir()
                              if p.name != BEST.name and not p.name.endswith(checkpoints.TMP_SUFFIX))
        if foreign:
            raise ConfigError(f"run directory {out} holds files a run does not write ({', '.join(foreign[:5])}); "
                              "pick a new --out (kdstore never deletes what it did not write)")
        for name in STARTED:
            p = out / name
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink(missing_ok=True)
    (out / "checkpoints").mkdir(parents=True, exist_ok=True)
    checkpoints.remove_stale_temporaries(out)
    checkpoints.remove_stale_temporaries(out / "checkpoints")


def next_step(out: Path) -> str:
    """What to run to go on with the run in `out` after it stopped."""
    return "run the same command with --resume" if (out / LAST).is_file() else \
        "run the same command (no epoch had finished)"


@contextlib.contextmanager
def disk_full(out: Path):
    """A full disk anywhere in the run becomes one sentence; what was written before stays whole."""
    try:
        yield
    except OSError as e:
        if e.errno != errno.ENOSPC:
            raise
        raise KdstoreError(f"no space left on device while writing {e.filename or out}; free space and "
                           f"{next_step(out)}") from None


def fail(out: Path, reason: str) -> None:
    """Mark the run failed and stop it."""
    (out / FAILED).write_text(reason + "\n")
    raise TrainingError(f"{reason}; the run is marked failed ({out / FAILED}) and exports nothing")
