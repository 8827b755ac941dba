"""The epoch plan: which images each process trains on in which batch, at which stored view. A pure
function of (seed, epoch, the images, the chunks, the ranks): any process, any time, draws the same.

Every store chunk uses one stored view index per epoch (drawn from (seed, epoch)), so an epoch reads
each chunk's images once and exactly 1/K of every per-view array. The chunks come in a seeded order;
the wanted images of each window of `buffer_chunks` chunks are shuffled together (memory holds about
two windows, whatever N is). This global order is cut into one contiguous slice per rank, sizes
differing by at most one image: every epoch covers every image exactly once across the ranks, and a
rank reads only the windows its slice crosses. Each rank cuts its slice into the same number of
batches (DDP needs equal steps), batch sizes differing by at most one: no image is dropped and no
batch is a straggler of one or two images.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from featurestore.common.options import ConfigError


@dataclass(frozen=True)
class EpochPlan:
    batches: list[tuple[np.ndarray, np.ndarray]]     # (image indices, view indices) of each batch of this rank
    chunk_view: np.ndarray                           # (num_chunks,) the view index each chunk uses

    def chunks_of(self, b: int, chunk_size: int) -> np.ndarray:
        return np.unique(self.batches[b][0] // chunk_size)

    def chunk_order(self, chunk_size: int) -> list[int]:
        """Chunks in the order of their first use."""
        return list(dict.fromkeys(int(c) for b in range(len(self.batches)) for c in self.chunks_of(b, chunk_size)))

    @property
    def images(self) -> int:
        return sum(len(idx) for idx, _ in self.batches)


def rank_slices(total: int, world: int) -> list[tuple[int, int]]:
    """[start, stop) of each rank's contiguous slice of `total` samples, sizes differing by at most one."""
    sizes = [total // world + (r < total % world) for r in range(world)]
    starts = np.concatenate([[0], np.cumsum(sizes)]).tolist()
    return list(zip(starts[:-1], starts[1:]))


def steps_per_epoch(total: int, batch_size: int, world: int = 1) -> int:
    """Optimizer steps per epoch: the same on every rank, every image used (the largest slice in full
    batches, the last one partial)."""
    return _ceil_div(_ceil_div(total, world), batch_size)


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def cut(samples: np.ndarray, steps: int) -> list[np.ndarray]:
    """`samples` in `steps` consecutive batches whose sizes differ by at most one."""
    sizes = [len(samples) // steps + (i < len(samples) % steps) for i in range(steps)]
    return np.split(samples, np.cumsum(sizes)[:-1])


def plan_epoch(indices: np.ndarray, chunk_size: int, num_images: int, views: int, seed: int, epoch: int,
               batch_size: int, buffer_chunks: int, rank: int = 0, world: int = 1,
               weights: np.ndarray | None = None) -> EpochPlan:
    """The training plan of one rank for one epoch; `indices`: the store images trained on. weights (N,):
    class-balanced sampling: the epoch draws as many samples as there are images, with replacement, in
    proportion to these weights (small classes repeat, large ones are thinned; the epoch keeps its
    length), each window its share of the draws from its own images, so memory stays one window."""
    num_chunks = -(-num_images // chunk_size)
    order = np.random.default_rng([seed, epoch]).permutation(num_chunks)
    chunk_view = np.random.default_rng([seed, epoch, 1]).integers(0, views, num_chunks)
    wanted = np.zeros(num_images, bool)
    wanted[indices] = True
    shuffle = np.random.default_rng([seed, epoch, 2])
    members = [m[wanted[m]] for m in (np.concatenate([np.arange(c * chunk_size, min((c + 1) * chunk_size, num_images))
                                                      for c in order[w:w + buffer_chunks]])
                                      for w in range(0, num_chunks, buffer_chunks))]
    if weights is None:
        windows = [shuffle.permutation(m) for m in members]
    else:
        draws = _share(np.array([weights[m].sum() for m in members]), int(wanted.sum()))
        windows = [shuffle.choice(m, size=k, replace=True, p=weights[m] / weights[m].sum()) if k else m[:0]
                   for m, k in zip(members, draws)]
    samples = np.concatenate(windows) if windows else np.zeros(0, np.int64)
    steps = steps_per_epoch(len(samples), batch_size, world)
    start, stop = rank_slices(len(samples), world)[rank]
    batches = cut(samples[start:stop], steps) if steps else []
    if any(len(b) < 2 for b in batches):
        raise ConfigError(f"{len(samples)} training images over {world} process(es) leave a batch of fewer than two "
                          "images (batch normalisation needs two); use fewer processes or more images")
    return EpochPlan([(b, chunk_view[b // chunk_size]) for b in batches], chunk_view)


def _share(mass: np.ndarray, total: int) -> np.ndarray:
    """`total` whole draws shared among windows in proportion to `mass` (largest remainders)."""
    want = mass / mass.sum() * total
    out = np.floor(want).astype(np.int64)
    out[np.argsort(-(want - out), kind="stable")[: total - out.sum()]] += 1
    return out


def eval_plan(indices: np.ndarray, batch_size: int, num_chunks: int) -> EpochPlan:
    """The canonical view (0) of each selected image, in store order."""
    idx = np.sort(np.asarray(indices))
    return EpochPlan([(b, np.zeros(len(b), np.int64)) for b in
                      (idx[s:s + batch_size] for s in range(0, len(idx), batch_size))], np.zeros(num_chunks, np.int64))
