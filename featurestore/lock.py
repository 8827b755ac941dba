"""One writer per store and per run folder: an exclusive POSIX record lock on `<path>.lock`.

Record locks (lockf) belong to a process and are not inherited across fork, so worker processes that
outlive a killed build never hold it, and the kernel drops the lock of a process that dies, however
it dies. The file names the holder (pid and host) and is removed on every exit; one left by a killed
process is simply taken over.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import socket
from pathlib import Path

from featurestore.errors import KdstoreError


class LockedError(KdstoreError, RuntimeError):
    """Another process writes this store or run folder; the message names it."""


class FileLock:
    """`with FileLock(path, "build"):` holds `<path>.lock` or raises LockedError naming the holder.

    what: the kind of writer, for the message ("build", "trainer fit").
    """

    def __init__(self, path: str | Path, what: str, suffix: str = ".lock"):
        self.target, self.what = str(path), what
        self.path = Path(self.target.rstrip("/") + suffix)
        self.fd: int | None = None

    def __enter__(self) -> FileLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                if e.errno not in (errno.EACCES, errno.EAGAIN):
                    os.close(fd)
                    raise
                holder = os.pread(fd, 200, 0).decode(errors="replace").split()
                os.close(fd)
                who = f"process {holder[0]} on {holder[1]}" if len(holder) >= 2 else "another process"
                raise LockedError(f"another {self.what} is writing {self.target}: {who} holds {self.path}; wait "
                                  "for it to finish (or stop it), then run the same command") from None
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:                                   # not a file its last holder just removed
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)
        self.fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self.fd is None:
            return
        with contextlib.suppress(OSError):
            self.path.unlink()
        os.close(self.fd)
        self.fd = None
