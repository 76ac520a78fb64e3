"""Resumable training checkpoints, without pickle.

A checkpoint is one safetensors file written atomically (temporary file,
fsync, rename). Its tensors are the model weights (``model/<name>``), the
state of loss modules (``loss/<id>/<name>``: connector weights, memory
banks), the optimiser's state tensors (``optim/<param index>/<name>``) and, for a
checkpoint taken mid-epoch, the torch RNG states (``rng``: one row per rank of
the run; ``rng_cuda``: the current CUDA device's); everything else — stage,
phase, epoch, batch, scheduler and gradient-scaler state, the optimiser's
non-tensor state, the history of phases, the stage's generic state, the running sums of the epoch's
metrics line and the length of ``metrics.jsonl`` when the checkpoint was
written — is JSON in the file's metadata. Loading never unpickles anything.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from kdtoolkit.foundation.errors import CheckpointError
from kdtoolkit.foundation.tensorfiles import atomic_save_safetensors, read_kdt_safetensors

CHECKPOINT_FORMAT = "kdtoolkit.foundation.checkpoint/1"


@dataclass
class Checkpoint:
    """Trainer state at a point of a stage.

    ``phase``/``epoch``/``batch`` say where training continues: phase index,
    epoch within it, batch within that epoch (0 at an epoch boundary).
    ``rng`` is ``[world, n]`` (one CPU RNG state per rank) or ``[n]``;
    ``running`` holds the partial sums of the current epoch's metrics line
    (mid-epoch checkpoints); ``state`` and ``watch`` are the stage's
    :class:`~kdtoolkit.engine.context.StageState`; ``losses`` the state
    tensors of loss modules (``<id>/<name>``); ``metrics_bytes`` is the size ``metrics.jsonl``
    had when the checkpoint was written (``None``: unknown), so that lines of
    epochs redone after a resume are not written twice.
    """

    stage: str
    stage_hash: str
    phase: int
    epoch: int
    batch: int
    model: dict[str, torch.Tensor]
    optimizer: dict[str, Any] | None = None
    scheduler: dict[str, Any] | None = None
    scaler: dict[str, Any] | None = None
    rng: torch.Tensor | None = None
    history: list[dict[str, Any]] = field(default_factory=list)
    state: dict[str, Any] = field(default_factory=dict)
    watch: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0
    rng_cuda: torch.Tensor | None = None
    running: dict[str, Any] | None = None
    metrics_bytes: int | None = None
    losses: dict[str, torch.Tensor] = field(default_factory=dict)

    def rng_for(self, rank: int, world: int) -> torch.Tensor | None:
        """The CPU RNG state of ``rank`` (rank 0's when the world size changed)."""
        if self.rng is None:
            return None
        if self.rng.dim() == 1:
            return self.rng
        # a copy: torch.set_rng_state misreads a row view (storage offset) of the stacked tensor
        return (self.rng[rank] if self.rng.shape[0] == world else self.rng[0]).clone()


def _split_optimizer(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors: dict[str, torch.Tensor] = {}
    plain_state: dict[str, dict[str, Any]] = {}
    for pid, pstate in state["state"].items():
        entry: dict[str, Any] = {}
        for k, v in pstate.items():
            if isinstance(v, torch.Tensor):
                tensors[f"optim/{pid}/{k}"] = v
                entry[k] = {"__tensor__": f"optim/{pid}/{k}"}
            else:
                entry[k] = v
        plain_state[str(pid)] = entry
    return tensors, {"state": plain_state, "param_groups": state["param_groups"]}


def _join_optimizer(tensors: dict[str, torch.Tensor], plain: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for pid, entry in plain["state"].items():
        state[int(pid)] = {
            k: tensors[v["__tensor__"]] if isinstance(v, dict) and "__tensor__" in v else v for k, v in entry.items()
        }
    return {"state": state, "param_groups": plain["param_groups"]}


def save_checkpoint(path: Path, ck: Checkpoint) -> None:
    """Write ``ck`` atomically to ``path``."""
    tensors = {f"model/{k}": v for k, v in ck.model.items()}
    tensors.update({f"loss/{k}": v for k, v in ck.losses.items()})
    meta: dict[str, Any] = {
        "stage": ck.stage,
        "stage_hash": ck.stage_hash,
        "phase": ck.phase,
        "epoch": ck.epoch,
        "batch": ck.batch,
        "scheduler": ck.scheduler,
        "scaler": ck.scaler,
        "history": ck.history,
        "state": ck.state,
        "watch": ck.watch,
        "seconds": ck.seconds,
        "optimizer": None,
        "running": ck.running,
        "metrics_bytes": ck.metrics_bytes,
    }
    if ck.optimizer is not None:
        otensors, oplain = _split_optimizer(ck.optimizer)
        tensors.update(otensors)
        meta["optimizer"] = oplain
    if ck.rng is not None:
        tensors["rng"] = ck.rng
    if ck.rng_cuda is not None:
        tensors["rng_cuda"] = ck.rng_cuda
    encoded = {"format": CHECKPOINT_FORMAT, **{k: json.dumps(v) for k, v in meta.items()}}
    atomic_save_safetensors(tensors, path, encoded)


def load_checkpoint(path: Path) -> Checkpoint:
    """Read a checkpoint written by :func:`save_checkpoint`.

    :raises CheckpointError: for a missing, truncated or foreign file.
    """
    tensors, m = read_kdt_safetensors(path, CHECKPOINT_FORMAT, "checkpoint")
    try:
        ck = Checkpoint(
            stage=m["stage"],
            stage_hash=m["stage_hash"],
            phase=int(m["phase"]),
            epoch=int(m["epoch"]),
            batch=int(m["batch"]),
            model={k[len("model/") :]: v for k, v in tensors.items() if k.startswith("model/")},
            optimizer=_join_optimizer(tensors, m["optimizer"]) if m.get("optimizer") else None,
            scheduler=m.get("scheduler"),
            scaler=m.get("scaler"),
            rng=tensors.get("rng"),
            history=m.get("history") or [],
            state=m.get("state") or m.get("flags") or {},
            watch=m.get("watch") or {},
            seconds=float(m.get("seconds") or 0.0),
            rng_cuda=tensors.get("rng_cuda"),
            running=m.get("running"),
            metrics_bytes=int(m["metrics_bytes"]) if m.get("metrics_bytes") is not None else None,
            losses={k[len("loss/") :]: v for k, v in tensors.items() if k.startswith("loss/")},
        )
        if ck.rng is not None and (ck.rng.dtype != torch.uint8 or ck.rng.dim() not in (1, 2)):
            raise ValueError("tensor 'rng' is not an RNG state")
    except (KeyError, TypeError, ValueError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"corrupt checkpoint metadata ({type(exc).__name__}: {exc})", source=str(path)) from None
    return ck
