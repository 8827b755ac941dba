"""What every store and every run records about how it was made: package version, git sha, time."""
from __future__ import annotations

import datetime
import subprocess
from pathlib import Path


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version("kdstore")
    except PackageNotFoundError:
        return "unknown"


def git_sha() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                              text=True, timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def record() -> dict:
    return {"package_version": package_version(), "git_sha": git_sha()}
