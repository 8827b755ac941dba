"""What a run reads from a store: labels, splits and view params in RAM; each chunk's images and the
teacher targets of one view on demand (or everything in RAM when it fits `ram_budget_gb`: the same
values either way). Every target read is checked as `featurestore verify` checks it."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from featurestore.backends import is_local
from featurestore.integrity import index_problems
from featurestore.reader import StoreReader
from featurestore.schema import StoreError, bad_target_rows


class NonFiniteError(StoreError):
    """A teacher target read from the store is NaN, infinite or constant (never written); the message
    names the store images."""


@dataclass
class Chunk:
    images: np.ndarray                   # (n, S, S, 3) uint8
    targets: dict[str, np.ndarray]       # per-view array -> (n, ...) of this chunk's view
    shared: torch.Tensor | None = None   # the images in shared memory, for render worker processes
    on_device: torch.Tensor | None = None  # the images on the training GPU, copied once when the chunk is read


class StoreData:
    def __init__(self, path: str, head: str | None, need_pooled: bool, need_patches: bool,
                 ram_budget_gb: float = 2.0, storage_options: dict | None = None):
        self.store = StoreReader.open(path, storage_options, reader="trainer fit")
        try:
            self._open(path, head, need_pooled, need_patches, ram_budget_gb)
        except BaseException:
            self.store.close()
            raise

    def _open(self, path: str, head: str | None, need_pooled: bool, need_patches: bool, ram_budget_gb: float) -> None:
        s = self.store
        if not s.complete:
            raise StoreError(f"{path} is not complete ({int(s.done().sum())}/{s.num_chunks} chunks done, or its "
                             "heads not fitted); finish it with the same `featurestore build` command first")
        if head is not None and head not in s.heads():
            raise StoreError(f"{path} has no {head!r} head; it has {s.heads()}")
        present = {f.name for f in s.fields()}
        for name in ("images", "views/params"):
            if name not in present:
                raise StoreError(f"{path} holds no {name} (slimmed away); the trainer renders every view from "
                                 "images and view params: slim again keeping them")
        if need_patches and "teacher/patches" not in present:
            raise StoreError(f"{path} stores no patch grid; rebuild with --patch-grid or set the patch loss weight "
                             "to 0")
        if need_pooled and "teacher/pooled" not in present:
            raise StoreError(f"{path} holds no teacher/pooled (slimmed away); set the pooled loss weight to 0")
        problems = index_problems(s)                              # what verify refuses, fit refuses
        if problems:
            more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
            raise StoreError(f"{path}: {problems[0].line()}{more}; `featurestore verify {path}` lists every problem, "
                             f"and `featurestore verify --fix {path}` then the build command repair them")
        s.read("sha256"), s.done()                                # the small arrays are read whole: damage stops here
        for key in s.small_keys():
            s.small(key)
        self.classes, self.n, self.k, self.chunk_size = s.classes, s.num_images, s.views_per_image, s.chunk_size
        self.num_chunks = s.num_chunks
        self.image_shape = s.shape("images")[1:]                                   # (S, S, 3)
        self.labels = s.read("labels").astype(np.int64)
        self.split = s.read("split")
        self.params = s.read("views/params")                                        # (N, K, P) float32
        self.names = {key: name for key, name in (("logits", f"teacher/logits/{head}" if head else None),
                                                   ("pooled", "teacher/pooled" if need_pooled else None),
                                                   ("patches", "teacher/patches" if need_patches else None)) if name}
        self.shapes = {key: s.shape(name)[2:] for key, name in self.names.items()}
        self.in_memory = self.bytes_needed() <= ram_budget_gb * 1e9
        self.remote = not is_local(path)
        self.ram: dict[str, np.ndarray] | None = None
        if self.in_memory:
            self.ram = {"images": s.read("images")}
            for name in self.names.values():
                self.ram[name] = s.read(name)
                check_targets(s, name, self.ram[name], 0)

    def close(self) -> None:
        """Done reading: the store's reader lock is released."""
        self.store.close()

    def bytes_needed(self) -> int:
        """Raw bytes of everything a run reads: images and every view of each needed target."""
        return self.store.nbytes("images") + sum(self.store.nbytes(name) for name in self.names.values())

    def chunk(self, c: int, k: int, shared: torch.Tensor | None = None) -> Chunk:
        """Images of store chunk c and the targets of its view k: one contiguous read per array.
        shared: a (n, S, S, 3) uint8 shared-memory tensor the images are decoded into (for render
        worker processes)."""
        a, b = self.store.chunk_range(c)
        if self.ram is not None:
            targets = {n: self.ram[n][a:b, k] for n in self.names.values()}
            if shared is None:
                return Chunk(self.ram["images"][a:b], targets)
            shared.numpy()[...] = self.ram["images"][a:b]
            return Chunk(shared.numpy(), targets, shared)
        targets = {}
        for name in self.names.values():
            targets[name] = self.store.read_view(name, c, k)
            check_targets(self.store, name, targets[name], a, k)
        if shared is not None:                                  # decoded straight into shared memory
            return Chunk(self.store.read_chunk("images", c, shared.numpy()), targets, shared)
        return Chunk(self.store.read_chunk("images", c), targets)

    def chunk_rows(self, c: int) -> int:
        a, b = self.store.chunk_range(c)
        return b - a

    def rows(self, idx: np.ndarray) -> np.ndarray:
        """Images of selected (sorted) indices, reading only what holds them: (B, S, S, 3)."""
        return self.ram["images"][idx] if self.ram is not None else self.store.read_rows("images", idx)


def check_targets(store: StoreReader, name: str, x: np.ndarray, start: int, view: int | None = None) -> None:
    """Teacher targets must be what a teacher writes (as `verify` checks them): a bad row stops the
    run naming the store images. x: (n, ...) one view, or (n, K, ...) every view."""
    for what, rows in bad_target_rows(x, lead=1 if view is not None else 2):
        where = (start + np.flatnonzero(rows.reshape(len(x), -1).any(1)))[:8].tolist()
        raise NonFiniteError(f"{store.path}: {name} holds {what} for store images {where}"
                             + (f" (view {view})" if view is not None else "") +
                             f"; run `featurestore verify --fix {store.path}` and the build command again")
