"""Every expected failure of every command ends in one line on stderr and a non-zero exit.

Project errors derive from KdstoreError and carry their own sentence; operating-system errors are
put in words (disk full, permission denied, file missing); anything else is reported as an internal
error. `--debug` (or KDSTORE_DEBUG=1) shows the traceback instead.
"""
from __future__ import annotations

import contextlib
import errno
import logging
import multiprocessing
import os
import signal
import sys
import threading
from collections.abc import Callable

logger = logging.getLogger("kdstore")


class KdstoreError(Exception):
    """An expected failure; str(error) is the whole message for the user."""


def not_in_a_reimported_script(call: str) -> None:
    """Refuse `call` inside a spawned worker that is re-importing the script which started it: a script
    that calls it at import time (no main guard) would otherwise run it again in every worker."""
    preparing = getattr(multiprocessing.current_process(), "_inheriting", False)   # a child, before its task
    if preparing and "__mp_main__" in sys.modules:
        raise KdstoreError(f"{call} was called again by a worker process re-importing the script that started "
                           f"it: call {call} under `if __name__ == \"__main__\":`, or pass workers=0")


def debug_wanted(flag: bool = False) -> bool:
    return flag or os.environ.get("KDSTORE_DEBUG", "") not in ("", "0")


def os_error_words(e: OSError) -> str:
    where = f" {e.filename}" if e.filename else ""
    if e.errno == errno.ENOSPC:
        return f"no space left on device{where}; free space and run the same command to resume"
    if e.errno in (errno.EACCES, errno.EPERM):
        return f"permission denied:{where or ' ' + str(e)}"
    if e.errno == errno.ENOENT:
        return f"no such file or directory:{where or ' ' + str(e)}"
    if e.errno == errno.EROFS:
        return f"read-only file system:{where}"
    return str(e).splitlines()[0] if str(e) else type(e).__name__


class Terminated(KeyboardInterrupt):
    """SIGTERM (a job scheduler, `timeout`, `docker stop`): unwinds like Ctrl-C, so locks are released,
    finished work is kept and the same command continues."""


def _terminate(signum, frame) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)        # a second SIGTERM must not break the clean-up
    raise Terminated()


@contextlib.contextmanager
def sigterm_unwinds():
    """While running a command, SIGTERM raises Terminated in the main thread."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = signal.signal(signal.SIGTERM, _terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


STORAGE_HINT = ("check the endpoint and credentials (AWS_ENDPOINT_URL, AWS_PROFILE, ~/.aws, or --storage-options "
                "'{\"endpoint_url\": ...}')")


def storage_error_words(e: BaseException) -> str | None:
    """One sentence for a failure of the object-storage client (unreachable endpoint, no credentials,
    access refused), or None for anything else."""
    module = type(e).__module__ or ""
    if not module.startswith(("botocore", "aiobotocore", "aiohttp", "google.auth", "gcsfs", "azure")):
        return None
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return f"object storage: {first}; {STORAGE_HINT}"


def run_command(prog: str, fn: Callable[[], int], debug: bool = False,
                next_step: Callable[[], str] | None = None) -> int:
    """Run one command; failures become one line on stderr (exit 2 expected, 1 internal, 130 after
    Ctrl-C, 143 after SIGTERM). next_step: what to run to continue after an interruption."""
    with sigterm_unwinds():
        if debug_wanted(debug):
            return fn()
        try:
            return fn()
        except KeyboardInterrupt as e:
            term = isinstance(e, Terminated)
            step = next_step() if next_step is not None else "finished work is kept; run the same command to continue"
            logger.error(f"{prog}: {'stopped by SIGTERM' if term else 'interrupted'}; {step}")
            return 143 if term else 130
        except KdstoreError as e:
            logger.error(f"{prog}: error: {' '.join(str(e).split())}")
            return 2
        except OSError as e:
            logger.error(f"{prog}: error: {os_error_words(e)}")
            return 2
        except Exception as e:  # noqa: BLE001 - a bug still ends in one line; --debug shows where
            words = storage_error_words(e)
            if words is not None:
                logger.error(f"{prog}: error: {words}")
                return 2
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            logger.error(f"{prog}: internal error: {type(e).__name__}: {first} (run with --debug or KDSTORE_DEBUG=1 "
                         "for the traceback)")
            return 1
