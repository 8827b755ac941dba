"""Streams a store into training batches, replaying the exact views the teacher scored.

The epoch plan is a pure function of (seed, epoch): the store chunks come in a seeded order, each
chunk uses one stored view index k (drawn from (seed, epoch, chunk)), and samples are shuffled
within windows of `buffer_chunks` whole chunks. An epoch therefore reads every chunk's images once
and exactly 1/K of every per-view array (logits, pooled, patches). Chunks are read ahead on
background threads and released when their last batch is rendered, so memory is bounded by the
window, whatever N, K, g and D are; only labels, splits and view params stay in RAM. When
everything a run needs fits `ram_budget_gb`, it is read once into RAM instead: the same plan, the
same batches. Each view is rendered from the stored S x S image with the shared renderer, at the
student's resolution, on the training device: on a GPU in batched kernels; on a CPU per view, in the
calling thread, on render threads, or in render worker processes (`workers`), which the GIL does not
serialise. With several processes each rank owns whole chunks.
"""
from __future__ import annotations

import os
import shutil
import sys
import threading
import warnings
from collections import Counter, deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from featurestore import views
from featurestore.devices import Caps, caps_of
from featurestore.schema import StoreError, bad_target_rows
from featurestore.store import Store
from trainer.render_pool import RenderPool, RenderWorkerError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class Batch:
    pixels: torch.Tensor              # (B, 3, R, R) float, normalised
    labels: torch.Tensor              # (B,) int64, the image's own label, -1 if it has none
    targets: torch.Tensor             # (B, C) float: label distribution after mixing (zeros if unlabelled)
    logits: torch.Tensor | None       # (B, C) teacher logits of the rendered view
    pooled: torch.Tensor | None       # (B, D)
    patches: torch.Tensor | None      # (B, g, g, d)
    index: torch.Tensor               # (B,) store image index
    view: torch.Tensor                # (B,) store view index

    @property
    def labelled(self) -> torch.Tensor:
        return self.labels >= 0


class NonFiniteError(StoreError):
    """A teacher target read from the store is NaN, infinite or constant (never written); the message
    names the store images."""


@dataclass
class Chunk:
    images: np.ndarray                # (n, S, S, 3) uint8
    targets: dict[str, np.ndarray]    # per-view array -> (n, ...) of this chunk's view
    shared: torch.Tensor | None = None   # the images in shared memory, for render worker processes


class StoreData:
    """What a run reads from a store: labels, splits and view params in RAM; images and the teacher
    targets of one view per chunk on demand (or all in RAM when they fit `ram_budget_gb`)."""

    def __init__(self, path: str, head: str | None, need_pooled: bool, need_patches: bool,
                 ram_budget_gb: float = 2.0):
        self.store = s = Store.open(path)
        if not s.complete:
            raise StoreError(f"{path} is not complete ({int(s.done().sum())}/{s.num_chunks} chunks done, or its "
                             "heads not fitted); finish it with the same `featurestore build` command first")
        if len(s.classes) < 2:
            raise StoreError(f"{path} has {len(s.classes)} class ({', '.join(s.classes)}); a classifier needs at least "
                             "two (one class would score macro-F1 1.0 and learn nothing)")
        if head is not None and head not in s.heads():
            raise StoreError(f"{path} has no {head!r} head; it has {s.heads()}")
        present = {f.name for f in s.fields()}
        for name in ("images", "views/params"):
            if name not in present:
                raise StoreError(f"{path} holds no {name} (slimmed away); the trainer renders every view from "
                                 "images and view params: slim again keeping them")
        if need_patches and "teacher/patches" not in present:
            raise StoreError(f"{path} stores no patch grid; rebuild with --patch-grid or set the patch loss weight to 0")
        if need_pooled and "teacher/pooled" not in present:
            raise StoreError(f"{path} holds no teacher/pooled (slimmed away); set the pooled loss weight to 0")
        s.ids(), s.read("sha256"), s.done()                       # the small arrays are read whole: damage stops here
        for key in s.small_keys():
            s.small(key)
        self.classes, self.n, self.k, self.chunk_size = s.classes, s.num_images, s.views_per_image, s.chunk_size
        self.num_chunks = s.num_chunks
        self.labels = s.read("labels").astype(np.int64)
        self.split = s.read("split")
        self.params = s.read("views/params")                                        # (N, K, P) float32
        self.names = {key: name for key, name in (("logits", f"teacher/logits/{head}" if head else None),
                                                   ("pooled", "teacher/pooled" if need_pooled else None),
                                                   ("patches", "teacher/patches" if need_patches else None)) if name}
        self.shapes = {key: s[name].shape[2:] for key, name in self.names.items()}
        self.in_memory = self.bytes_needed() <= ram_budget_gb * 1e9
        self.ram: dict[str, np.ndarray] | None = None
        self._shared = _Buffers(keep=64)        # chunk images in shared memory, for render processes
        if self.in_memory:
            self.ram = {"images": s.read("images")}
            for name in self.names.values():
                self.ram[name] = s.read(name)
                _check_targets(s, name, self.ram[name], 0)

    def bytes_needed(self) -> int:
        """Raw bytes of everything a run reads: images and every view of each needed target."""
        total = self.store["images"].nbytes
        return int(total + sum(self.store[name].nbytes for name in self.names.values()))

    def chunk(self, c: int, k: int, shared: bool = False) -> Chunk:
        """Images of store chunk c and the targets of its view k: one contiguous read per array.
        shared: the images also as a shared-memory tensor (for render worker processes)."""
        a, b = self.store.chunk_range(c)
        t = self._shared.take((b - a,) + self.store["images"].shape[1:], torch.device("cpu"), True,
                              torch.uint8) if shared else None
        if self.ram is not None:
            if t is None:
                return Chunk(self.ram["images"][a:b], {n: self.ram[n][a:b, k] for n in self.names.values()})
            t.numpy()[...] = self.ram["images"][a:b]
            return Chunk(t.numpy(), {n: self.ram[n][a:b, k] for n in self.names.values()}, t)
        targets = {}
        for name in self.names.values():
            targets[name] = self.store.read_view(name, c, k)
            _check_targets(self.store, name, targets[name], a, k)
        if t is not None:                                       # decoded straight into shared memory
            return Chunk(self.store.read_chunk("images", c, t.numpy()), targets, t)
        return Chunk(self.store.read_chunk("images", c), targets)

    def rows(self, idx: np.ndarray) -> np.ndarray:
        """Images of selected (sorted) indices, reading only what holds them: (B, S, S, 3)."""
        return self.ram["images"][idx] if self.ram is not None else self.store.read_rows("images", idx)


_SHM = "/dev/shm"


def _shared_memory_fits(nbytes: int) -> bool:
    """Whether the shared-memory file system (where a container often allows only 64 MB) has room."""
    if not os.path.isdir(_SHM):
        return True                                 # another OS: its own shared memory, not a small mount
    return shutil.disk_usage(_SHM).free >= nbytes


def _check_targets(store: Store, name: str, x: np.ndarray, start: int, view: int | None = None) -> None:
    """Teacher targets must be what a teacher writes (as `verify` checks them): a bad row stops the
    run naming the store images. x: (n, ...) one view, or (n, K, ...) every view."""
    for what, rows in bad_target_rows(x, lead=1 if view is not None else 2):
        where = (start + np.flatnonzero(rows.reshape(len(x), -1).any(1)))[:8].tolist()
        raise NonFiniteError(f"{store.path}: {name} holds {what} for store images {where}"
                             + (f" (view {view})" if view is not None else "") +
                             f"; run `featurestore verify --fix {store.path}` and the build command again")


@dataclass
class EpochPlan:
    batches: list[tuple[np.ndarray, np.ndarray]]     # (image indices, view indices) per batch
    chunk_view: np.ndarray                           # (num_chunks,) the view index each chunk uses

    def chunks_of(self, b: int, chunk_size: int) -> np.ndarray:
        return np.unique(self.batches[b][0] // chunk_size)

    def chunk_order(self, chunk_size: int) -> list[int]:
        """Chunks in the order of their first use."""
        return list(dict.fromkeys(int(c) for b in range(len(self.batches)) for c in self.chunks_of(b, chunk_size)))


class Loader:
    """Batches of rendered views for one epoch; `rank`/`world` give each process whole chunks."""

    def __init__(self, data: StoreData, indices: np.ndarray, batch_size: int, size: int, seed: int,
                 device: torch.device, train: bool, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                 buffer_chunks: int = 8, rank: int = 0, world: int = 1, prefetch: int = 2, threads: int = 2,
                 readers: int = 2, caps: Caps | None = None, workers: int = 0):
        self.data, self.indices, self.batch_size, self.size = data, np.sort(np.asarray(indices)), batch_size, size
        self.seed, self.device, self.train = seed, device, train
        self.mean_std = (tuple(mean), tuple(std))
        self.buffer_chunks, self.rank, self.world, self.prefetch = max(1, buffer_chunks), rank, world, prefetch
        self.threads, self.readers = threads, readers
        self.caps = caps or caps_of(device)          # per-view loops on CPUs, batched kernels on GPUs
        # CPU views rendered in `workers` processes (one core each) instead of threads of this one
        self.workers = workers if train and not self.caps.batched_kernels else 0
        if self.workers and not _shared_memory_fits(self._shared_bytes()):
            warnings.warn(f"{_SHM} has too little free space for {self._shared_bytes() / 1e6:.0f} MB of shared "
                          "buffers; rendering on threads instead of worker processes (enlarge it, e.g. "
                          "`docker run --shm-size`, to use them)", stacklevel=2)
            self.workers = 0
        self.buffers = _Buffers()
        self._ahead: _Ahead | None = None
        self._pool: RenderPool | None = None

    def _shared_bytes(self) -> int:
        """Shared memory the render processes use at most: chunk images (two windows and the next
        epoch's first) and the batches in flight or held by the caller."""
        d = self.data
        image = int(np.prod(d.store["images"].shape[1:]))
        batch = 4 * 3 * self.size * self.size * self.batch_size
        return (3 * self.buffer_chunks + 2) * d.chunk_size * image + (self.workers + self.prefetch + 12) * batch

    def close(self) -> None:
        """Stop the render worker processes (if any); a later epoch starts them again."""
        if self._pool is not None:
            self._pool.close()
            self._pool = None

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass

    def __len__(self) -> int:
        if not self.train:
            return -(-len(self.indices) // self.batch_size)
        return self._steps()

    # ---- the plan ------------------------------------------------------------------------
    def _wanted(self) -> np.ndarray:
        wanted = np.zeros(self.data.n, bool)
        wanted[self.indices] = True
        return wanted

    def _steps(self) -> int:
        """Steps per epoch, the same every epoch and on every rank: the full batches of the fewest
        samples any rank can be dealt (its num_chunks // world smallest chunks)."""
        per_chunk = np.sort(np.bincount(self.indices // self.data.chunk_size, minlength=self.data.num_chunks))
        return int(per_chunk[:self.data.num_chunks // self.world].sum()) // self.batch_size

    def plan(self, epoch: int) -> EpochPlan:
        """A pure function of (seed, epoch)."""
        cs = self.data.chunk_size
        if not self.train:
            idx = self.indices
            return EpochPlan([(idx[s:s + self.batch_size], np.zeros(len(idx[s:s + self.batch_size]), np.int64))
                              for s in range(0, len(idx), self.batch_size)], np.zeros(self.data.num_chunks, np.int64))
        order = np.random.default_rng([self.seed, epoch]).permutation(self.data.num_chunks)
        chunk_view = np.random.default_rng([self.seed, epoch, 1]).integers(0, self.data.k, self.data.num_chunks)
        mine, wanted = order[self.rank::self.world], self._wanted()
        shuffle = np.random.default_rng([self.seed, epoch, 2, self.rank])
        samples = []
        for w in range(0, len(mine), self.buffer_chunks):
            members = np.concatenate([np.arange(c * cs, min((c + 1) * cs, self.data.n))
                                      for c in mine[w:w + self.buffer_chunks]])
            samples.append(shuffle.permutation(members[wanted[members]]))
        samples = np.concatenate(samples) if samples else np.zeros(0, np.int64)
        batches = [samples[s * self.batch_size:(s + 1) * self.batch_size] for s in range(self._steps())]
        return EpochPlan([(b, chunk_view[b // cs]) for b in batches], chunk_view)

    # ---- the epoch -----------------------------------------------------------------------
    def read_ahead(self, epoch: int) -> None:
        """Start reading the first window of `epoch`'s chunks now, on one background thread, so that
        the epoch does not open with a wait for its first window. Streaming only; the work is finite
        (at most buffer_chunks chunks), and an epoch other than `epoch` drops it."""
        if not self.train or self.data.ram is not None:
            return
        if self._ahead is not None and self._ahead.epoch == epoch:
            return
        plan = self.plan(epoch)
        first = plan.chunk_order(self.data.chunk_size)[:self.buffer_chunks]
        self._ahead = _Ahead(self.data, epoch, first, plan.chunk_view, self.workers > 0)

    def epoch(self, epoch: int, ahead: bool = True) -> Iterator[Batch]:
        """Batches in plan order: rendered by `threads` background threads up to `prefetch` ahead,
        or in the calling thread when threads is 0 (a CPU that trains uses every core already).
        ahead: once this epoch's chunks are all read, start reading the next epoch's first window."""
        plan = self.plan(epoch)
        if not self.train:
            yield from self._eval_batches(plan)
            return
        preloaded, self._ahead = (self._ahead.take() if self._ahead is not None and self._ahead.epoch == epoch
                                  else {}), None
        chunks = _ChunkStream(self.data, plan, self.buffer_chunks, self.readers, preloaded,
                              on_read_all=(lambda: self.read_ahead(epoch + 1)) if ahead else None,
                              shared=self.workers > 0)
        try:
            if self.workers > 0:
                yield from self._process_batches(plan, chunks)
                return
            if self.threads == 0:
                for b in range(len(plan.batches)):
                    yield self._render_batch(plan, b, chunks)
                return
            todo = iter(range(len(plan.batches)))
            pending: deque[Future] = deque()
            with ThreadPoolExecutor(self.threads, thread_name_prefix="render") as pool:
                def submit():
                    b = next(todo, None)
                    if b is not None:
                        pending.append(pool.submit(self._render_batch, plan, b, chunks))
                try:
                    for _ in range(self.threads + self.prefetch):
                        submit()
                    while pending:
                        batch = pending.popleft().result()
                        submit()
                        yield batch
                finally:
                    for f in pending:
                        f.cancel()
        finally:
            chunks.close()

    def _render_batch(self, plan: EpochPlan, b: int, chunks: _ChunkStream) -> Batch:
        idx, vw = plan.batches[b]
        cs = self.data.chunk_size
        held = {int(c): chunks.get(int(c)) for c in np.unique(idx // cs)}
        try:
            return self.make_batch(idx, vw, held)
        finally:
            for c in held:
                chunks.release(c)

    def _process_batches(self, plan: EpochPlan, chunks: _ChunkStream) -> Iterator[Batch]:
        """The epoch's batches rendered by the worker processes, up to workers + prefetch ahead, in
        plan order. Every submitted batch is waited for before its buffer or chunks can be reused."""
        if self._pool is None:
            self._pool = RenderPool(self.workers, self.size, *self.mean_std)
        pool, cs, depth = self._pool, self.data.chunk_size, self.workers + self.prefetch
        pending: deque[tuple[int, Batch, list[int]]] = deque()
        todo = iter(range(len(plan.batches)))

        def ready(b: int) -> bool:
            return all(chunks.ready[int(c)].is_set() for c in plan.chunks_of(b, cs))

        def submit(b: int) -> None:
            idx, vw = plan.batches[b]
            held = {int(c): chunks.get(int(c)) for c in np.unique(idx // cs)}
            try:
                batch, (sources, index, params, partner) = self._batch_parts(idx, vw, held)
                batch.pixels = self.buffers.take((len(idx), 3, self.size, self.size), self.device, shared=True)
                job = pool.submit({c: ch.shared for c, ch in held.items()}, sources, index, params, partner,
                                  batch.pixels)
            except BaseException:
                for c in held:
                    chunks.release(c)
                raise
            pending.append((job, batch, list(held)))

        try:
            b = next(todo, None)
            while b is not None or pending:
                while b is not None and len(pending) < depth and (not pending or ready(b)):
                    submit(b)
                    b = next(todo, None)
                job, batch, held = pending.popleft()
                try:
                    pool.wait(job)
                finally:
                    for c in held:
                        chunks.release(c)
                yield batch
        finally:
            for job, _, held in pending:              # a worker may still write into these buffers
                try:
                    pool.wait(job)
                except RenderWorkerError:
                    pass
                for c in held:
                    chunks.release(c)

    def make_batch(self, idx: np.ndarray, vw: np.ndarray, held: dict[int, Chunk]) -> Batch:
        """Render store images idx at views vw from the chunks that hold them (partners included)."""
        batch, (sources, index, params, partner) = self._batch_parts(idx, vw, held)
        images = [held[c].images[r] for c, r in sources]                            # U x (S, S, 3)
        if self.caps.batched_kernels:                                               # one transfer to the device
            src = torch.from_numpy(np.stack(images)).to(self.device).permute(0, 3, 1, 2)   # (U, 3, S, S)
        else:                                                                       # zero-copy views
            src = [torch.from_numpy(im).permute(2, 0, 1) for im in images]
        x = views.render(src, index, params, self.size, "bilinear", partner, self.mean_std[0], self.mean_std[1],
                         self.caps.batched_kernels,
                         out=self.buffers.take((len(idx), 3, self.size, self.size), self.device))  # normalised
        batch.pixels = x.contiguous()
        return batch

    def _batch_parts(self, idx: np.ndarray, vw: np.ndarray, held: dict[int, Chunk]):
        """A Batch without its pixels, and what rendering them takes: the source images (chunk, row),
        each view's source, its params and its partner's source (-1 for none)."""
        d, cs = self.data, self.data.chunk_size
        params = d.params[idx, vw]                                                  # (B, P)
        partner = params[:, views.COL["mix_partner"]].astype(np.int64)
        needed = np.unique(np.concatenate([idx, partner[partner >= 0]]))
        slot = {int(i): j for j, i in enumerate(needed)}
        sources = [(int(i) // cs, int(i) % cs) for i in needed]
        render_args = (sources, torch.tensor([slot[int(i)] for i in idx]), torch.from_numpy(params),
                       torch.tensor([slot[int(p)] if p >= 0 else -1 for p in partner]))
        labels = torch.from_numpy(d.labels[idx])
        targets = _mixed_targets(labels, d.labels, partner, params[:, views.COL["mix_lambda"]], len(d.classes))

        def gather(key):
            name = d.names.get(key)
            if name is None:
                return None
            rows = np.stack([held[int(i) // cs].targets[name][int(i) % cs] for i in idx])
            return torch.from_numpy(rows.astype(np.float32)).to(self.device)
        return Batch(None, labels.to(self.device), targets.to(self.device), gather("logits"),
                     gather("pooled"), gather("patches"), torch.from_numpy(idx), torch.from_numpy(vw)), render_args

    def _eval_batches(self, plan: EpochPlan) -> Iterator[Batch]:
        """Canonical views of the selected images (validation): reads only their images."""
        with ThreadPoolExecutor(1, thread_name_prefix="read") as pool:
            reads = deque(pool.submit(self.data.rows, idx) for idx, _ in plan.batches[:2])
            for b, (idx, vw) in enumerate(plan.batches):
                images = reads.popleft().result()
                if b + 2 < len(plan.batches):
                    reads.append(pool.submit(self.data.rows, plan.batches[b + 2][0]))
                sources = torch.from_numpy(images).to(self.device).permute(0, 3, 1, 2)
                x = views.render(sources, torch.arange(len(idx)), torch.from_numpy(self.data.params[idx, vw]), self.size,
                                 "bilinear", None, self.mean_std[0], self.mean_std[1])
                labels = torch.from_numpy(self.data.labels[idx])
                yield Batch(x.contiguous(), labels.to(self.device), F.one_hot(labels.clamp(min=0), len(self.data.classes))
                            .float().to(self.device), None, None, None, torch.from_numpy(idx), torch.from_numpy(vw))


def _mixed_targets(labels: torch.Tensor, all_labels: np.ndarray, partner: np.ndarray, lam: np.ndarray,
                   c: int) -> torch.Tensor:
    """(B, C) label distribution of each view: lambda on its own label, 1 - lambda on the partner's;
    rows of unlabelled images are zero (they carry no label, mixed or not)."""
    lam = torch.from_numpy(lam).float()
    targets = F.one_hot(labels.clamp(min=0), c).float() * lam[:, None]
    mixed = torch.from_numpy(partner >= 0)
    if mixed.any():
        other = torch.from_numpy(all_labels[partner[partner >= 0]])
        targets[mixed] += F.one_hot(other.clamp(min=0), c).float() * (1 - lam[mixed, None])
    targets[labels < 0] = 0
    return targets


class _Buffers:
    """Batch tensors for reuse, handed out again only once nothing holds them or any view of them.

    A batch of 64 views at 224 px is 38 MB: a fresh one comes from the OS page by page (glibc maps
    allocations over 32 MB anew each time), which cost about a quarter of a CPU render. A buffer is
    free when the pool's list is its only holder (Python references) and no other tensor shares its
    storage, so batches kept by the caller (a list of batches, a slice of one) are never written.
    """

    def __init__(self, keep: int = 12):
        self.keep, self.pool, self.lock = keep, [], threading.Lock()

    def take(self, shape: tuple[int, ...], device: torch.device, shared: bool = False,
             dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """shared: a buffer in shared memory (other processes read or write it)."""
        if device.type != "cpu":                            # a GPU's caching allocator already reuses
            return torch.empty(shape, device=device, dtype=dtype)
        with self.lock:
            for i in reversed(range(len(self.pool))):      # the most recently used first: warm in cache
                if self._free(i, shape) and self.pool[i].dtype == dtype and self.pool[i].is_shared() == shared:
                    buf = self.pool.pop(i)
                    self.pool.append(buf)                   # most recently used last
                    return buf
            buf = torch.empty(shape, dtype=dtype)
            if shared:
                buf.share_memory_()
            self.pool.append(buf)
            del self.pool[:-self.keep]                      # the oldest go
            return buf

    def _free(self, i: int, shape: tuple[int, ...]) -> bool:
        buf = self.pool[i]                                  # references: the list, buf, getrefcount's argument
        return (tuple(buf.shape) == tuple(shape) and sys.getrefcount(buf) == 3
                and torch._C._storage_Use_Count(buf.untyped_storage()._cdata) <= 2)


class _Ahead:
    """Chunks of an epoch read on a background thread before the epoch starts (a finite list)."""

    def __init__(self, data: StoreData, epoch: int, chunks: list[int], chunk_view: np.ndarray, shared: bool):
        self.epoch, self.chunks = epoch, {}
        self.thread = threading.Thread(target=self._read, args=(data, chunks, chunk_view, shared), name="chunk-ahead")
        self.thread.start()

    def _read(self, data: StoreData, chunks: list[int], chunk_view: np.ndarray, shared: bool) -> None:
        for c in chunks:
            try:
                self.chunks[c] = data.chunk(c, int(chunk_view[c]), shared)
            except BaseException:  # noqa: BLE001 - the epoch reads this chunk again and reports the error
                return

    def take(self) -> dict[int, Chunk]:
        self.thread.join()
        return self.chunks


class _ChunkStream:
    """Reads the chunks an epoch needs, in first-use order, on background threads; holds at most
    the chunks live at any point of the plan (a window, or two where a batch straddles windows).
    preloaded: chunks already read (by read_ahead); on_read_all: called once every chunk is read."""

    def __init__(self, data: StoreData, plan: EpochPlan, buffer_chunks: int, readers: int,
                 preloaded: dict[int, Chunk] | None = None, on_read_all=None, shared: bool = False):
        order, uses, first, last = plan.chunk_order(data.chunk_size), Counter(), {}, {}
        for b in range(len(plan.batches)):
            for c in plan.chunks_of(b, data.chunk_size).tolist():
                first.setdefault(c, b)
                uses[c] += 1
                last[c] = b
        live = np.zeros(len(plan.batches) + 1, np.int64)   # chunks first used at or before b, last at or after
        for c in order:
            live[first[c]] += 1
            live[last[c] + 1] -= 1
        self.limit = int(max(2 * buffer_chunks, np.cumsum(live).max(initial=0)))
        self.data, self.plan, self.uses, self.shared = data, plan, uses, shared
        self.loaded: dict[int, Chunk] = {}
        self.ready = {c: threading.Event() for c in order}
        self.room = threading.Semaphore(self.limit)
        self.lock, self.error, self.stopped = threading.Lock(), None, False
        preloaded = {c: ch for c, ch in (preloaded or {}).items() if c in self.ready}
        for c, chunk in preloaded.items():
            self.room.acquire()
            self.loaded[c] = chunk
            self.ready[c].set()
        self.todo = iter([c for c in order if c not in preloaded])
        self.on_read_all, self.readers_left = on_read_all, max(1, readers)
        self.pool = ThreadPoolExecutor(max(1, readers), thread_name_prefix="chunk-reader")
        for _ in range(max(1, readers)):
            self.pool.submit(self._read_loop)

    def _read_loop(self) -> None:
        while True:
            self.room.acquire()
            with self.lock:
                c = next(self.todo, None)
            if c is None or self.stopped:
                self.room.release()
                with self.lock:
                    self.readers_left -= 1
                    last = self.readers_left == 0 and not self.stopped and self.error is None
                if last and self.on_read_all is not None:
                    self.on_read_all()
                return
            try:
                chunk = self.data.chunk(c, int(self.plan.chunk_view[c]), self.shared)
            except BaseException as e:  # noqa: BLE001 - surfaced to the training loop by get()
                self.error = e
                for ev in self.ready.values():
                    ev.set()
                return
            with self.lock:
                self.loaded[c] = chunk
            self.ready[c].set()

    def get(self, c: int) -> Chunk:
        self.ready[c].wait()
        if self.error is not None:
            raise self.error
        return self.loaded[c]

    def release(self, c: int) -> None:
        with self.lock:
            self.uses[c] -= 1
            if self.uses[c] == 0:
                del self.loaded[c]
                self.room.release()

    def close(self) -> None:
        self.stopped = True
        for _ in range(self.limit + 2):
            self.room.release()
        self.pool.shutdown(wait=True, cancel_futures=True)

