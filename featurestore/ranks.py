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

    def barrier(self) -> None:
        """Wait for every rank."""
        if self.world == 1:
            return
        import torch.distributed as dist
        if not dist.is_initialized():
            dist.init_process_group("gloo", rank=self.rank, world_size=self.world,
                                    timeout=datetime.timedelta(hours=24))
        dist.barrier()

    def close(self) -> None:
        import torch.distributed as dist
        if self.world > 1 and dist.is_initialized():
            dist.destroy_process_group()
