"""The store digest: one SHA-256 that names a store's content end to end.

It hashes every chunk of every array (decoded, in the schema's order, each with its name, chunk,
dtype and shape), then every small array, then the root attributes (all of them but the digest
itself and `last_build`, the clock of the last build, which informs and is never compared). A build
writes it as the attribute `digest` once the store is finished; `featurestore inspect` prints it;
`featurestore verify` computes it again from what it reads and compares it with the attribute, and
with `--digest HEX` against the one the builder published. Two stores with the same digest hold
the same arrays and the same attributes, byte for byte, whatever their backend or compression.

What it proves: a store copied, downloaded or slimmed is the one that was published. The per-chunk
checksums already catch a changed byte (a chunk fails its checksum on every read); a chunk rewritten
with its checksum recomputed, or an attribute edited, reads back whole and differs only here, and a
digest recorded inside the store can itself be rewritten: only the digest published beside the
store (a README, a model card) catches that.
"""
from __future__ import annotations

import hashlib
import json

import numpy as np

VOLATILE = ("digest", "last_build")
VERSION = b"kdstore store digest 1\n"


class Digest:
    """Fed every chunk of a store in order (`array`, `small`), then `finish(attrs)` -> hex SHA-256."""

    def __init__(self):
        self.h = hashlib.sha256(VERSION)

    def array(self, name: str, chunk: int | None, x: np.ndarray) -> None:
        x = np.asarray(x)
        if x.dtype.kind in "OSUT":                                  # ids: text, each with its length
            text = [v.decode() if isinstance(v, bytes) else str(v) for v in x.reshape(-1)]
            data = b"".join(len(t.encode()).to_bytes(4, "little") + t.encode() for t in text)
            dtype = "str"
        else:
            data = np.ascontiguousarray(x, dtype=x.dtype.newbyteorder("<")).tobytes()
            dtype = x.dtype.newbyteorder("<").str
        self.h.update(f"{name}\t{chunk}\t{dtype}\t{list(x.shape)}\t{len(data)}\n".encode())
        self.h.update(data)

    def small(self, key: str, x: np.ndarray) -> None:
        self.array(key, None, x)

    def finish(self, attrs: dict) -> str:
        kept = {k: attrs[k] for k in sorted(attrs) if k not in VOLATILE}
        self.h.update(json.dumps(kept, sort_keys=True, separators=(",", ":"), default=str).encode())
        return self.h.hexdigest()
