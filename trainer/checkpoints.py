"""Run files: written whole or not at all, read without running anything they hold.

Checkpoints travel (a run folder shared with a classmate, a `best.pt` from a forum), and a pickle can
carry code that runs when it is read. Every checkpoint kdstore reads is loaded by
`featurestore.common.untrusted.load_checkpoint` (`torch.load(weights_only=True)`): tensors, numbers, strings
and plain containers only; a file that needs anything else is refused in one line naming it. kdstore
writes nothing else into them.

Writes go to a temporary file with a name of this process's own in the same folder, then replace the
target in one rename: a crash, a kill or a full disk leaves the previous file whole, and two
processes never write the same temporary file. A checkpoint is serialised in memory first, so a full
disk is an OSError with its errno (ENOSPC), not a message from inside the serialiser.
"""
from __future__ import annotations

import contextlib
import io
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from featurestore.common.untrusted import load_checkpoint

TMP_SUFFIX = ".tmp"


def write_bytes_atomic(data: bytes | memoryview, path: Path) -> None:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TMP_SUFFIX)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(e, OSError) and e.filename is None:
            e.filename = str(path)                 # a full disk names the file it was writing
        raise


def write_text_atomic(text: str, path: Path) -> None:
    write_bytes_atomic(text.encode(), path)


def save(obj: Any, path: Path) -> None:
    """torch.save of tensors and plain data, atomically."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    write_bytes_atomic(buf.getbuffer(), path)


def load(path: Path) -> Any:
    """A checkpoint's tensors and plain data; anything else is refused, and nothing in it runs."""
    return load_checkpoint(path)


def remove_stale_temporaries(folder: Path) -> None:
    """Temporary files a killed process left behind (only under the run lock: nobody writes them)."""
    for p in Path(folder).glob(f".*{TMP_SUFFIX}"):
        with contextlib.suppress(OSError):
            p.unlink()
