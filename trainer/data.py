"""What a run reads from a store: labels, splits and view params in RAM; each chunk's images and the
teacher targets of one view on demand (or everything in RAM when it fits `ram_budget_gb`: the same
values either way). Every target read is checked as `featurestore verify` checks it."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from featurestore.store.backends import is_local
from featurestore.store.integrity import index_problems
from featurestore.store.reader import StoreReader
from featurestore.store.schema import StoreError, bad_target_rows


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
    """head: the teacher head KD reads (None: no logit term); kd_teacher: whose head (a name, "first" or
    "mean": every teacher's logits of that head, averaged); need_pooled / need_patches: which teachers'
    feature targets to read: True (every teacher), False, or a term's weight (a number: every teacher; a
    mapping name -> weight: those above 0). standardize: auto | on | off (see FitConfig)."""

    def __init__(self, path: str, head: str | None, need_pooled, need_patches, ram_budget_gb: float = 2.0,
                 storage_options: dict | None = None, kd_teacher: str = "first", standardize: str = "off"):
        self.store = StoreReader.open(path, storage_options, reader="trainer fit")
        try:
            self._open(path, head, need_pooled, need_patches, ram_budget_gb, kd_teacher, standardize)
        except BaseException:
            self.store.close()
            raise

    def _open(self, path: str, head: str | None, need_pooled, need_patches, ram_budget_gb: float, kd_teacher: str,
              standardize: str) -> None:
        s = self.store
        if not s.complete:
            raise StoreError(f"{path} is not complete ({int(s.done().sum())}/{s.num_chunks} chunks done, or its "
                             "heads not fitted); finish it with the same `featurestore build` command first")
        present = {f.name for f in s.fields()}
        for name in ("images", "views/params"):
            if name not in present:
                raise StoreError(f"{path} holds no {name} (slimmed away); the trainer renders every view from "
                                 "images and view params: slim again keeping them")
        self.teachers = [t.name for t in s.teachers]
        kd = [] if head is None else (self.teachers if kd_teacher == "mean" else
                                      [self.teachers[0] if kd_teacher == "first" else s.teacher(kd_teacher).name])
        for name in kd:
            if head not in s.heads(name):
                logits = s.teacher(name).logits(head)
                why = " (slimmed away)" if logits in s.attrs.get("dropped", ()) else ""
                others = [t for t in self.teachers if head in s.heads(t)]
                raise StoreError(f"{path} has no {head!r} logits of teacher {name}{why}; it has "
                                 f"{s.heads(name) or 'none'}"
                                 + (f"; follow another teacher's (--kd-teacher {others[0]})" if others else "")
                                 + " or train without KD (--w-kd 0)")
        self.names: dict[str, str] = {f"logits:{t}": s.teacher(t).logits(head) for t in kd}
        for key, need in (("pooled", need_pooled), ("patches", need_patches)):
            for t in chosen(need, self.teachers, path):
                array = getattr(s.teacher(t), key)
                if array not in present:
                    raise StoreError(f"{path} holds no {array} (" + ("no patch grid stored: rebuild with --patch-grid"
                                     if key == "patches" and not s.attrs["patch_grid"] else "slimmed away")
                                     + f"); set the {key} loss weight of {t} to 0")
                self.names[f"{key}:{t}"] = array
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
        self.shapes = {key: s.shape(name)[2:] for key, name in self.names.items()}
        self.stats = self._stats(standardize)
        self.in_memory = self.bytes_needed() <= ram_budget_gb * 1e9
        self.remote = not is_local(path)
        self.ram: dict[str, np.ndarray] | None = None
        if self.in_memory:
            self.ram = {"images": s.read("images")}
            for name in self.names.values():
                self.ram[name] = s.read(name)
                check_targets(s, name, self.ram[name], 0)

    def targets_of(self, kind: str) -> dict[str, tuple]:
        """{teacher: target shape} of one kind of target (logits, pooled, patches) the run reads."""
        return {key.split(":", 1)[1]: shape for key, shape in self.shapes.items() if key.startswith(kind + ":")}

    def _stats(self, standardize: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """{target key: (mean, std)} of the feature targets to standardise (the build's statistics)."""
        if standardize == "off" or (standardize == "auto" and len(self.teachers) < 2):
            return {}
        out = {}
        for key in self.names:
            kind, name = key.split(":", 1)
            if kind == "logits":
                continue
            t = self.store.teacher(name)
            mean_key, std_key = t.stats_key(f"{kind}_mean"), t.stats_key(f"{kind}_std")
            if mean_key is None or mean_key not in self.store.small_keys():
                if standardize == "on":
                    raise StoreError(f"{self.store.path} keeps no statistics of {name}'s {kind} (built by an older "
                                     "kdstore); train with --standardize-targets off, or rebuild the store")
                continue
            out[key] = (self.store.small(mean_key).astype(np.float32), self.store.small(std_key).astype(np.float32))
        return out

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


def chosen(need, teachers: list[str], path: str) -> list[str]:
    """The teachers a feature term with this weight (True/False, a number, or name -> weight) reads."""
    if isinstance(need, dict):
        unknown = sorted(set(need) - set(teachers))
        if unknown:
            raise StoreError(f"{path} has no teacher {unknown[0]!r} (loss weights name it); it has "
                             f"{', '.join(teachers)}")
        return [t for t in teachers if need.get(t, 0) > 0]
    return list(teachers) if need else []


def check_targets(store: StoreReader, name: str, x: np.ndarray, start: int, view: int | None = None) -> None:
    """Teacher targets must be what a teacher writes (as `verify` checks them): a bad row stops the
    run naming the store images. x: (n, ...) one view, or (n, K, ...) every view."""
    for what, rows in bad_target_rows(x, lead=1 if view is not None else 2):
        where = (start + np.flatnonzero(rows.reshape(len(x), -1).any(1)))[:8].tolist()
        raise NonFiniteError(f"{store.path}: {name} holds {what} for store images {where}"
                             + (f" (view {view})" if view is not None else "") +
                             f"; run `featurestore verify --fix {store.path}` and the build command again")
