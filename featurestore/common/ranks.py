"""The ranks of a multi-process build: which process owns which store chunks, and where they wait
for each other. Everything the build does differently per rank is asked of this one object.

Ranks come from the launcher's environment (`torchrun`, `accelerate launch`: RANK, WORLD_SIZE).
They wait on a gloo barrier: it needs no GPU per rank, so several ranks may share one GPU, and a
phase between two barriers (the patch basis, a rank's teacher pass) may take hours.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass


def check_launch() -> None:
    """`accelerate launch --cpu --num_processes N` starts one process (its CPU launcher runs one unless
    it is given an MPI hostfile), which would then build or train alone: say so instead."""
    from featurestore.common.errors import KdstoreError
    if os.environ.get("ACCELERATE_USE_CPU") and os.environ.get("MASTER_ADDR") and "WORLD_SIZE" not in os.environ:
        raise KdstoreError("`accelerate launch --cpu --num_processes N` started one process, not N: accelerate's CPU "
                           "launcher runs one unless it has an MPI hostfile. For N processes on CPUs run "
                           "`torchrun --nproc_per_node N -m featurestore build ...` (or `-m trainer fit ...`), or "
                           "`accelerate launch --multi_gpu --num_processes N ...`, which also runs N CPU processes")


@dataclass
class Rank:
    rank: int = 0
    world: int = 1

    @classmethod
    def from_env(cls) -> Rank:
        return cls(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)))

    @property
    def main(self) -> bool:
        """Rank 0 decides (resume, refuse or overwrite), creates the store and fits the heads."""
        return self.rank == 0

    @property
    def prefix(self) -> str:
        return f"rank {self.rank}/{self.world}: " if self.world > 1 else ""

    def owns(self, chunk: int) -> bool:
        return chunk % self.world == self.rank

    def _group(self):
        import torch.distributed as dist
        if not dist.is_initialized():
            dist.init_process_group("gloo", rank=self.rank, world_size=self.world,
                                    timeout=datetime.timedelta(hours=24))
        return dist

    def barrier(self) -> None:
        """Wait for every rank."""
        if self.world > 1:
            self._group().barrier()

    def share(self, value):
        """Rank 0's `value` on every rank (an outcome every rank acts on: a refusal, say)."""
        if self.world == 1:
            return value
        box = [value]
        self._group().broadcast_object_list(box, src=0)
        return box[0]

    def close(self) -> None:
        import torch.distributed as dist
        if self.world > 1 and dist.is_initialized():
            dist.destroy_process_group()
