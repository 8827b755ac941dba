"""Child processes (decoding, scanning, rendering workers): started clean, and ended with the process
that started them.

They are spawned, so they inherit no open store, lock or thread. A process killed by SIGKILL runs no
clean-up, and a worker it leaves behind can wait forever (a DataLoader worker whose result queue is
full, a pool worker waiting for its next task), holding gigabytes of decoded images. So each worker
asks the kernel (Linux's PR_SET_PDEATHSIG) to end it the moment the process that started it dies, and
ends at once if that process is already gone when it starts.
"""
from __future__ import annotations

import contextlib
import ctypes
import multiprocessing
import os
import signal
import sys
from functools import partial

PR_SET_PDEATHSIG = 1


def mp_context():
    """Spawned processes: they inherit no open store, lock or thread of the parent."""
    return multiprocessing.get_context("spawn")


def end_with(parent: int, *_) -> None:
    """In a worker: end when `parent` (the pid that started it) dies. Extra arguments are ignored (a
    DataLoader passes the worker's id)."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):   # no prctl: the parent's shutdown still ends it
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:                          # the parent died before the request took effect
        os._exit(1)


def worker_init():
    """The initializer that ties a worker to this process (picklable, for spawned workers)."""
    return partial(end_with, os.getpid())
