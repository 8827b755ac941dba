"""One writer per store and per run folder, wherever it lives.

- On a disk (`FileLock`): an exclusive POSIX record lock on `<path>.lock`. Record locks (lockf)
  belong to a process and are not inherited across fork, so worker processes that outlive a killed
  build never hold it, and the kernel drops the lock of a process that dies, however it dies. The
  file names the holder (pid and host) and is removed on every exit; one left by a killed process is
  simply taken over.
- On object storage (`LeaseLock`): a lease object `<url>.lock`, created with a conditional put
  (`If-None-Match: *`: S3, GCS and MinIO create it for one writer only), naming its holder and when it
  expires, renewed by the holder (a put conditional on the object being the one it wrote), deleted on
  exit. A lease that expired, or whose holder is a dead process of this host, is taken over; any
  other is refused. A holder whose lease was taken over stops at its next chunk.
Either way one lock serves every rank of a build: rank 0 takes it for them all.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import threading
import time
import uuid
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

    def check(self) -> None:
        """Still ours (a POSIX lock cannot be taken from a living process)."""


LEASE_SECONDS = float(os.environ.get("KDSTORE_LEASE_SECONDS", "120"))


class LeaseLock:
    """`with LeaseLock(fs, url, "build"):` holds the lease object `<url>.lock` or raises LockedError."""

    def __init__(self, fs, url: str, what: str, seconds: float = LEASE_SECONDS):
        self.fs, self.url, self.what, self.seconds = fs, url, what, seconds
        self.path = fs._strip_protocol(url.rstrip("/")) + ".lock"
        self.token, self.etag, self.lost = uuid.uuid4().hex, None, None
        self.stop = threading.Event()
        self.renewer: threading.Thread | None = None

    def _body(self) -> bytes:
        return json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "token": self.token,
                           "expires": time.time() + self.seconds}).encode()

    def _put(self, **condition) -> None:
        self.fs.pipe_file(self.path, self._body(), **condition)
        self.fs.invalidate_cache(self.path)
        self.etag = self.fs.info(self.path)["ETag"]

    def __enter__(self) -> LeaseLock:
        while True:
            try:
                self._put(mode="create")
                break
            except FileExistsError:
                if self._take_over():
                    break
        self.renewer = threading.Thread(target=self._renew, name="lease", daemon=True)
        self.renewer.start()
        return self

    def _take_over(self) -> bool:
        """The lease exists: take it over if it is stale (True), or find it gone meanwhile (False: try
        again); refuse naming its holder if it is live."""
        self.fs.invalidate_cache(self.path)
        try:
            held = json.loads(self.fs.cat_file(self.path))
            etag = self.fs.info(self.path)["ETag"]
        except FileNotFoundError:
            return False
        dead = held.get("host") == socket.gethostname() and not _alive(int(held.get("pid", -1)))
        if time.time() < held.get("expires", 0) and not dead:
            left = held["expires"] - time.time()
            raise LockedError(f"another {self.what} is writing {self.url}: process {held.get('pid')} on "
                              f"{held.get('host')} holds the lease {self.path} (renewed while it runs; it expires "
                              f"in {left:.0f} s if that process is gone); wait for it to finish (or stop it), then "
                              "run the same command")
        try:
            self._put(IfMatch=etag)                      # only if nobody took it over first
        except OSError:
            raise LockedError(f"another {self.what} took over the stale lease {self.path} just now; wait for it "
                              "to finish, then run the same command") from None
        return True

    def _renew(self) -> None:
        while not self.stop.wait(self.seconds / 3):
            try:
                self._put(IfMatch=self.etag)
            except Exception as e:  # noqa: BLE001 - reported at the holder's next check
                self.lost = e
                return

    def check(self) -> None:
        """Raise if the lease was taken over (this process stalled past its expiry)."""
        if self.lost is not None:
            raise LockedError(f"lost the lease {self.path} on {self.url} (another {self.what} took it over: "
                              f"{self.lost}); finished chunks are kept, run the same command to continue")

    def __exit__(self, *exc) -> None:
        self.stop.set()
        if self.renewer is not None:
            self.renewer.join()
        if self.lost is None:
            with contextlib.suppress(Exception):
                held = json.loads(self.fs.cat_file(self.path))
                if held.get("token") == self.token:
                    self.fs.rm_file(self.path)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return pid > 0


def store_lock(path: str, what: str, storage_options: dict | None = None, suffix: str = ".lock"):
    """The lock of the store (or folder) at `path`: a POSIX lock on a disk, a lease in a bucket."""
    from featurestore.backends import filesystem, is_local, local_path
    if is_local(path):
        return FileLock(local_path(path), what, suffix)
    fs, _ = filesystem(path, storage_options or {})
    return LeaseLock(fs, path, what)
