"""One logger for kdstore's messages: `logger.info(...)` lines on stderr (progress bars are tqdm's).

The commands and the Python API call `enable()`, which sends the "kdstore" logger's INFO lines to
whatever `sys.stderr` is at the time (so a notebook or a test capturing stderr sees them); a program
that configures logging itself can leave it out.
"""
from __future__ import annotations

import logging
import sys

logger = logging.getLogger("kdstore")


class _Stderr(logging.StreamHandler):
    """A handler writing to the current sys.stderr, not to the one there was when it was made."""

    def __init__(self):
        super().__init__(sys.stderr)

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def enable() -> None:
    if not any(isinstance(h, _Stderr) for h in logger.handlers):
        handler = _Stderr()
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
