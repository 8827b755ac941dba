"""One writer per store and per run folder, wherever it lives, and no writer while a store is read.

- On a disk (`FileLock`): a POSIX record lock on `<path>.lock`, exclusive for a writer, shared for a
  reader (`shared=True`: a fit streaming the store, a verify). Record locks (lockf) belong to a process
  and are not inherited across fork, so worker processes that outlive a killed build never hold one,
  and the kernel drops the lock of a process that dies, however it dies. A writer's file names it
  (pid and host) and is removed when it is done; one left by a killed process is simply taken over.
  The lock file is opened without following a link (a link at that path is refused, never written
  through), and a file there that is not a kdstore lock file is refused and left as it is.
- On object storage (`LeaseLock`, `ReaderLease`): a lease object `<url>.lock` for the writer, created
  with a conditional put (`If-None-Match: *`: S3, GCS and MinIO create it for one writer only), naming
  its holder and when it expires, renewed by the holder (a put conditional on the object being the one
  it wrote), deleted on exit; readers put lease objects of their own under `<url>.readers/`. An expiry
  is trusted no further than the object's own time plus the lease length. A lease that expired, or
  whose holder is a dead process of this host, is taken over (a reader's is ignored); any other is
  refused, naming it and how to remove it. A holder whose lease was taken over stops at its next chunk.
Either way one lock serves every rank of a build: rank 0 takes it for them all.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import socket
import stat
import struct
import sys
import threading
import time
import uuid
from pathlib import Path

from featurestore.common.errors import KdstoreError


class LockedError(KdstoreError, RuntimeError):
    """Another process writes (or reads) this store or run folder; the message names it."""


LOCK_TEXT = re.compile(r"\d+ \S+\n?")          # what a writer's lock file holds: "pid host"
_FLOCK = "@hhqqi4x"                            # Linux's struct flock: type, whence, start, len, pid


def _open_lock_file(path: Path, writable: bool = True) -> int:
    """The lock file at `path` (made if absent), never through a link, and only if it is a kdstore lock
    file (empty, or "pid host"). writable: opened for writing (else read-only where writing is refused)."""
    flags = os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(path, flags | os.O_RDWR, 0o644)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise LockedError(f"{path} is a symbolic link; kdstore never writes a lock file through a link (it "
                              "would change the file the link points at): remove the link, then run the same "
                              "command") from None
        if e.errno == errno.EISDIR:
            raise LockedError(f"{path} is a folder, where kdstore keeps a lock file; move it away, then run the "
                              "same command") from None
        if writable or e.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise LockedError(f"{path} is not a regular file, where kdstore keeps a lock file; move it away, then run "
                          "the same command")
    text = os.pread(fd, 256, 0)
    if text and not LOCK_TEXT.fullmatch(text.decode(errors="replace")):
        os.close(fd)
        raise LockedError(f"{path} exists and is not a kdstore lock file (it begins {text[:40]!r}); kdstore never "
                          "overwrites or deletes it: move it away, then run the same command")
    return fd


def _same_file(fd: int, path: Path) -> bool:
    """fd is the file at `path` still (not one its last holder removed, nor replaced by a link)."""
    try:
        return os.fstat(fd).st_ino == os.lstat(path).st_ino
    except FileNotFoundError:
        return False


def _holder(fd: int) -> tuple[str, int | None]:
    """("read" or "write", pid) of a lock that conflicts with an exclusive one on fd (Linux: F_GETLK),
    or ("write", None) where the system does not say."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError):
            kind, _, _, _, pid = struct.unpack(_FLOCK, fcntl.fcntl(fd, fcntl.F_GETLK,
                                                                   struct.pack(_FLOCK, fcntl.F_WRLCK, 0, 0, 0, 0)))
            if kind == fcntl.F_RDLCK:
                return "read", pid
            if kind == fcntl.F_WRLCK:
                return "write", pid
    return "write", None


class FileLock:
    """`with FileLock(path, "build"):` holds `<path>.lock` or raises LockedError naming the holder.

    what: the kind of holder, for the message ("build", "trainer fit"). shared: a reader's lock, which
    any number of readers hold at once and which no writer gets while one is held.
    """

    _readers: dict[str, list] = {}                 # this process's shared locks: path -> [fd, holders]
    _guard = threading.Lock()

    def __init__(self, path: str | Path, what: str, suffix: str = ".lock", shared: bool = False):
        self.target, self.what, self.shared = str(path), what, shared
        self.path = Path(self.target.rstrip("/") + suffix)
        self.fd: int | None = None

    def __enter__(self) -> FileLock:
        if self.shared:
            self._enter_shared()
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = _open_lock_file(self.path)
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                message = self._refusal(fd) if e.errno in (errno.EACCES, errno.EAGAIN) else None
                os.close(fd)
                if message is None:
                    raise
                raise LockedError(message) from None
            if _same_file(fd, self.path):
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)
        self.fd = fd
        return self

    def _refusal(self, fd: int) -> str:
        kind, pid = _holder(fd)
        if kind == "read":
            return (f"{self.target} is being read by process {pid} on {socket.gethostname()} (a `trainer fit`, "
                    f"`featurestore verify` or another reader of it holds {self.path}); a {self.what} would change "
                    "it under that reader: wait for it to finish (or stop it), then run the same command")
        words = os.pread(fd, 200, 0).decode(errors="replace").split()
        who = (f"process {words[0]} on {words[1]}" if len(words) >= 2 else
               f"process {pid}" if pid else "another process")
        return (f"another {self.what} is writing {self.target}: {who} holds {self.path}; wait for it to finish (or "
                "stop it), then run the same command")

    def _enter_shared(self) -> None:
        key = str(self.path.absolute())
        with self._guard:
            if key in self._readers:                # one lock per file and process: closing a second
                self._readers[key][1] += 1          # descriptor of it would drop the first's lock
                return
            while True:
                try:
                    fd = _open_lock_file(self.path, writable=False)
                except OSError as e:
                    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOENT):
                        return                      # nobody can write beside this store either
                    raise
                try:
                    fcntl.lockf(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
                except OSError as e:
                    words = os.pread(fd, 200, 0).decode(errors="replace").split()
                    os.close(fd)
                    if e.errno not in (errno.EACCES, errno.EAGAIN):
                        raise
                    who = f"process {words[0]} on {words[1]}" if len(words) >= 2 else "another process"
                    raise LockedError(f"{self.target} is being written: {who} holds {self.path} (a build or a "
                                      "repair); wait for it to finish, then run the same command") from None
                if _same_file(fd, self.path):
                    break
                os.close(fd)
            self._readers[key] = [fd, 1]
            self.fd = fd

    def __exit__(self, *exc) -> None:
        if self.shared:
            self._exit_shared()
            return
        if self.fd is None:
            return
        if _same_file(self.fd, self.path):
            with contextlib.suppress(OSError):
                self.path.unlink()
        os.close(self.fd)
        self.fd = None

    def _exit_shared(self) -> None:
        key = str(self.path.absolute())
        with self._guard:
            held = self._readers.get(key)
            if held is None:
                return
            held[1] -= 1
            if held[1]:
                return
            del self._readers[key]
            fd = held[0]
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)     # the last reader anywhere: tidy up
                if _same_file(fd, self.path):
                    self.path.unlink()
            except OSError:
                pass                                                  # another reader still holds it
            os.close(fd)

    def check(self) -> None:
        """Still ours (a POSIX lock cannot be taken from a living process)."""


LEASE_SECONDS = float(os.environ.get("KDSTORE_LEASE_SECONDS", "120"))


def _modified(info: dict) -> float | None:
    """An object's last-modified time (seconds since the epoch), as the object store keeps it."""
    for key in ("LastModified", "last_modified", "mtime", "updated"):
        value = info.get(key)
        if hasattr(value, "timestamp"):
            return float(value.timestamp())
        if isinstance(value, (int, float)):
            return float(value)
    return None


class _Lease:
    """What a writer's and a reader's lease share: the body, the puts, the renewal, and how a lease
    found in the bucket is judged."""

    def __init__(self, fs, url: str, what: str, seconds: float | None):
        self.fs, self.url, self.what = fs, url, what
        self.seconds = LEASE_SECONDS if seconds is None else seconds
        self.key = fs._strip_protocol(url.rstrip("/"))
        self.token, self.etag, self.lost = uuid.uuid4().hex, None, None
        self.stop = threading.Event()
        self.renewer: threading.Thread | None = None

    def _body(self) -> bytes:
        return json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "token": self.token,
                           "what": self.what, "expires": time.time() + self.seconds}).encode()

    def _put(self, path: str, **condition) -> None:
        self.fs.pipe_file(path, self._body(), **condition)
        self.fs.invalidate_cache(path)
        self.etag = self.fs.info(path)["ETag"]

    def _start_renewing(self, path: str, conditional: bool) -> None:
        def renew() -> None:
            while not self.stop.wait(self.seconds / 3):
                try:
                    self._put(path, **({"IfMatch": self.etag} if conditional else {}))
                except Exception as e:  # noqa: BLE001 - reported at the holder's next check
                    self.lost = e
                    return
        self.renewer = threading.Thread(target=renew, name="lease", daemon=True)
        self.renewer.start()

    def _stop_renewing(self) -> None:
        self.stop.set()
        if self.renewer is not None:
            self.renewer.join()

    def judge(self, path: str) -> tuple[dict | None, str | None, float]:
        """(what the lease at `path` says, or None if it is damaged; its ETag, or None if it is gone;
        seconds it is still live, 0 when it expired or its holder is a dead process of this host). An
        expiry is believed no further than the object's own time plus the lease length."""
        self.fs.invalidate_cache(path)
        try:
            info = self.fs.info(path)
            raw = self.fs.cat_file(path)
        except FileNotFoundError:
            return None, None, 0.0
        now, modified = time.time(), _modified(info)
        cap = (modified if modified is not None else now) + self.seconds
        try:
            held = json.loads(raw)
            expires = min(float(held["expires"]), cap)
            pid = int(held.get("pid", -1))
        except (ValueError, TypeError, KeyError):
            return None, info.get("ETag"), max(0.0, cap - now)
        if held.get("host") == socket.gethostname() and not _alive(pid):
            return held, info.get("ETag"), 0.0
        return held, info.get("ETag"), max(0.0, expires - now)

    def damaged(self, path: str, left: float) -> LockedError:
        return LockedError(f"the lease object {path} is damaged (not the JSON kdstore writes); if no kdstore command "
                           f"is using {self.url}, delete that object (for example `aws s3 rm s3://{path}`) and run the "
                           f"same command, or wait {left:.0f} s for it to expire")


class LeaseLock(_Lease):
    """`with LeaseLock(fs, url, "build"):` holds the lease object `<url>.lock` or raises LockedError; it
    is refused while a reader's lease under `<url>.readers/` is live."""

    def __init__(self, fs, url: str, what: str, seconds: float | None = None):
        super().__init__(fs, url, what, seconds)
        self.path = self.key + ".lock"

    def __enter__(self) -> LeaseLock:
        while True:
            try:
                self._put(self.path, mode="create")
                break
            except FileExistsError:
                if self._take_over():
                    break
        self._start_renewing(self.path, conditional=True)
        try:
            self._refuse_readers()
        except BaseException:
            self.__exit__()
            raise
        return self

    def _take_over(self) -> bool:
        """The lease exists: take it over if it is stale (True), or find it gone meanwhile (False: try
        again); refuse naming its holder if it is live."""
        held, etag, left = self.judge(self.path)
        if etag is None:
            return False
        if left > 0:
            if held is None:
                raise self.damaged(self.path, left)
            raise LockedError(f"another {held.get('what', self.what)} is writing {self.url}: process "
                              f"{held.get('pid')} on {held.get('host')} holds the lease {self.path} (renewed while it "
                              "runs); wait for it to finish (or stop it), then run the same command. If that process "
                              f"is gone, the lease expires in {left:.0f} s, or delete it now (for example `aws s3 rm "
                              f"s3://{self.path}`)")
        try:
            self._put(self.path, IfMatch=etag)            # only if nobody took it over first
        except OSError:
            raise LockedError(f"another {self.what} took over the stale lease {self.path} just now; wait for it "
                              "to finish, then run the same command") from None
        return True

    def _refuse_readers(self) -> None:
        folder = self.key + ".readers"
        try:
            names = self.fs.find(folder)
        except FileNotFoundError:
            names = []
        for name in names:
            held, _, left = self.judge(name)
            if left > 0:
                who = (f"process {held.get('pid')} on {held.get('host')} ({held.get('what', 'a reader')})"
                       if held is not None else "a reader whose lease is damaged")
                raise LockedError(f"{self.url} is being read by {who}, whose lease is {name}; a {self.what} would "
                                  "change it under that reader: wait for it to finish (or stop it), then run the same "
                                  "command")

    def check(self) -> None:
        """Raise if the lease was taken over (this process stalled past its expiry)."""
        if self.lost is not None:
            raise LockedError(f"lost the lease {self.path} on {self.url} (another {self.what} took it over: "
                              f"{self.lost}); finished chunks are kept, run the same command to continue")

    def __exit__(self, *exc) -> None:
        self._stop_renewing()
        if self.lost is None:
            with contextlib.suppress(Exception):
                held = json.loads(self.fs.cat_file(self.path))
                if held.get("token") == self.token:
                    self.fs.rm_file(self.path)


class ReaderLease(_Lease):
    """`with ReaderLease(fs, url, "trainer fit"):` a reader's lease under `<url>.readers/`, renewed while
    it reads, which a writer's lease respects; refused while a writer's lease is live."""

    def __init__(self, fs, url: str, what: str, seconds: float | None = None):
        super().__init__(fs, url, what, seconds)
        self.path = f"{self.key}.readers/{self.token}.json"

    def __enter__(self) -> ReaderLease:
        self._put(self.path)
        self._start_renewing(self.path, conditional=False)
        held, _, left = self.judge(self.key + ".lock")            # put first, then look: one of the two sees
        if left > 0:                                              # the other, whichever comes first
            self.__exit__()
            who = f"process {held.get('pid')} on {held.get('host')}" if held else "a writer whose lease is damaged"
            raise LockedError(f"{self.url} is being written by {who} (lease {self.key}.lock); wait for it to finish, "
                              "then run the same command")
        return self

    def __exit__(self, *exc) -> None:
        self._stop_renewing()
        with contextlib.suppress(Exception):
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
    """The writer's lock of the store (or folder) at `path`: a POSIX lock on a disk, a lease in a bucket."""
    from featurestore.store.backends import filesystem, is_local, local_path
    if is_local(path):
        return FileLock(local_path(path), what, suffix)
    fs, _ = filesystem(path, storage_options or {})
    return LeaseLock(fs, path, what)


def reader_lock(path: str, what: str, storage_options: dict | None = None):
    """A reader's lock of the store at `path`, which writers respect: shared on a disk, a reader's lease
    in a bucket."""
    from featurestore.store.backends import filesystem, is_local, local_path
    if is_local(path):
        return FileLock(local_path(path), what, shared=True)
    fs, _ = filesystem(path, storage_options or {})
    return ReaderLease(fs, path, what)
