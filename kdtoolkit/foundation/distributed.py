"""Multi-GPU and multi-node training through ``torchrun`` and ``torch.distributed``.

Launch with ``torchrun --nproc-per-node N -m kdtoolkit run RECIPE`` (or
the ``kdt`` script path); the trainer reads ``RANK``, ``WORLD_SIZE`` and
``LOCAL_RANK`` from the environment torchrun sets. Only the trainable student
is wrapped in ``DistributedDataParallel``; the teacher stays unwrapped, in
eval mode, without gradients. Each rank reads its shard of every global
batch (in training, a last global batch with fewer images than ranks is
skipped); the loss of each rank is weighted by its share of the global
batch, so that the averaged gradient is the global batch's; one small
all-reduce per step shares the loss values, the accuracy counts and a
Ctrl-C, so that every rank logs the same numbers and stops at the same step.
Evaluation records are gathered to every rank in dataset order; only rank 0
writes files, shows progress and calls the observer hooks
(``kdt_after_epoch``, ``kdt_after_stage``, ``kdt_after_run``). CPU runs use
the ``gloo`` backend; with CUDA, CPU tensors go through ``gloo`` and CUDA
tensors through ``nccl``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import nn

from kdtoolkit.foundation.errors import KdtError


#: Set once :meth:`Dist.shutdown` has destroyed a process group (see :func:`exit_now`).
_SHUT_DOWN = False


def exit_now(code: int) -> None:
    """End a process that took part in a distributed run, skipping interpreter finalisation.

    After the process group is destroyed, gloo can still abort the process at
    exit ("terminate called without an active exception", SIGABRT; about one
    run in a hundred on a busy CPU), after every file was written. Once the
    output streams are flushed, ``os._exit`` ends the process with ``code``
    instead. Does nothing (returns) when no process group was shut down.
    """
    if not _SHUT_DOWN:
        return
    import logging
    import sys

    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # pragma: no cover
            pass
    logging.shutdown()
    os._exit(code)


@dataclass
class Dist:
    """The process's place in a distributed run (``world == 1`` when not distributed)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @classmethod
    def from_env(cls) -> Dist:
        """Read torchrun's variables and initialise the process group once."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        import torch.distributed as dist

        if not dist.is_initialized():
            backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
            try:
                dist.init_process_group(backend=backend)
            except (ValueError, RuntimeError) as exc:
                raise KdtError(
                    f"cannot join the distributed run (WORLD_SIZE={world}): {' '.join(str(exc).split())[:200]}; "
                    "launch with torchrun, which sets RANK, LOCAL_RANK, MASTER_ADDR and MASTER_PORT",
                    source="torch.distributed",
                ) from None
        return cls(rank=dist.get_rank(), world=dist.get_world_size(), local_rank=int(os.environ.get("LOCAL_RANK", "0")))

    @staticmethod
    def shutdown(sync: bool = True) -> None:
        """Destroy the process group (if one was initialised); call once at the end of a run.

        With ``sync`` (an outcome every rank shares: success, or a Ctrl-C
        agreed on by all ranks) the ranks meet at a barrier first, so that no
        rank tears its connections down while another still uses them.
        After another failure other ranks may be gone or stuck in a
        collective: no barrier; they fail on their next collective (or the
        launcher stops them).
        """
        if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
            return
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            if sync:
                try:
                    dist.barrier()
                except Exception:  # pragma: no cover - a rank is gone; the launcher reports it
                    pass
            dist.destroy_process_group()
            global _SHUT_DOWN
            _SHUT_DOWN = True

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

            _collective(dist.barrier)

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        """Sum ``t`` over ranks, in place (a no-op when not distributed)."""
        if self.world > 1:
            import torch.distributed as dist

            _collective(dist.all_reduce, t, op=dist.ReduceOp.SUM)
        return t

    def any(self, flag: bool, device: torch.device | None = None) -> bool:
        """``True`` on every rank when ``flag`` is true on any rank."""
        if self.world <= 1:
            return bool(flag)
        t = torch.tensor([1.0 if flag else 0.0], device=device or "cpu")
        return bool(self.all_reduce_sum(t).item() > 0)

    def gather_rng(self) -> torch.Tensor:
        """Every rank's CPU RNG state, stacked ``[world, n]`` (on every rank)."""
        state = torch.get_rng_state()
        if self.world <= 1:
            return state.unsqueeze(0)
        import torch.distributed as dist

        states: list = [None] * self.world
        _collective(dist.all_gather_object, states, state)
        return torch.stack(states)

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
            _collective(dist.all_gather_object, gathered, v)
            parts[k] = gathered
        return _interleave(parts, n, self.world, batch_size)


def _collective(fn, *args, **kwargs):
    """Run a collective; a peer that failed or left becomes one clear line, not a traceback."""
    try:
        return fn(*args, **kwargs)
    except RuntimeError as exc:  # torch.distributed.DistBackendError is a RuntimeError
        detail = " ".join(str(exc).split())
        raise KdtError(
            f"another process of the distributed run failed or left ({detail[:160]}); see its error",
            source="torch.distributed",
        ) from None


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
        full = torch.cat([p for p in ps if p.numel()] or ps[:1])  # a rank that saw no image sent an empty tensor
        res = torch.empty_like(full)
        res[order] = full
        out[k] = res
    return out
