"""Multi-GPU and multi-node training through ``torchrun`` and ``torch.distributed``.

Launch with ``torchrun --nproc-per-node N -m kdtoolkit.cli run RECIPE`` (or
the ``kdt`` script path); the trainer reads ``RANK``, ``WORLD_SIZE`` and
``LOCAL_RANK`` from the environment torchrun sets. Only the trainable student
is wrapped in ``DistributedDataParallel``; the teacher stays unwrapped, in
eval mode, without gradients. Each rank reads its shard of every global
batch; evaluation records are gathered to every rank in dataset order; only
rank 0 writes files and shows progress.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class Dist:
    """The process's place in a distributed run (``world == 1`` when not distributed)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @classmethod
    def from_env(cls) -> "Dist":
        """Read torchrun's variables and initialise the process group once."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        import torch.distributed as dist

        if not dist.is_initialized():
            backend = "nccl" if torch.cuda.is_available() else "gloo"
            dist.init_process_group(backend=backend)
        return cls(rank=dist.get_rank(), world=dist.get_world_size(), local_rank=int(os.environ.get("LOCAL_RANK", "0")))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def device(self, base: torch.device) -> torch.device:
        """One GPU per process: ``cuda:LOCAL_RANK`` under torchrun."""
        if self.world > 1 and base.type == "cuda":
            torch.cuda.set_device(self.local_rank)
            return torch.device("cuda", self.local_rank)
        return base

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()

    def wrap(self, model: nn.Module) -> nn.Module:
        """``DistributedDataParallel(model)`` when distributed, else ``model``."""
        if self.world <= 1:
            return model
        from torch.nn.parallel import DistributedDataParallel as DDP

        dev = next(model.parameters()).device
        return DDP(model, device_ids=[dev.index] if dev.type == "cuda" else None, find_unused_parameters=True)

    def gather_records(self, tensors: dict[str, torch.Tensor], n: int, batch_size: int) -> dict[str, torch.Tensor]:
        """Gather per-rank evaluation tensors and restore dataset order.

        In an un-shuffled pass each rank evaluated ``batch[rank::world]`` of
        every batch of ``batch_size``; gathering, then scattering rows back to
        their dataset index, restores the order ``0..n-1`` on every rank.
        """
        import torch.distributed as dist

        parts = {}
        for k, v in tensors.items():
            gathered: list = [None] * self.world
            dist.all_gather_object(gathered, v)
            parts[k] = gathered
        return _interleave(parts, n, self.world, batch_size)


def shard_indices(n: int, batch_size: int, rank: int, world: int) -> list[int]:
    """Dataset indices a rank sees in an un-shuffled pass (batch by batch)."""
    out: list[int] = []
    for start in range(0, n, batch_size):
        out.extend(range(start, min(start + batch_size, n))[rank::world])
    return out


def _interleave(parts: dict[str, list[torch.Tensor]], n: int, world: int, batch_size: int) -> dict[str, torch.Tensor]:
    order = torch.cat([torch.tensor(shard_indices(n, batch_size, r, world), dtype=torch.long) for r in range(world)])
    out = {}
    for k, ps in parts.items():
        full = torch.cat(ps)
        res = torch.empty_like(full)
        res[order] = full
        out[k] = res
    return out
