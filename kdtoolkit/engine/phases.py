"""The phases of one stage, with checkpoints and exact resume.

A :class:`StageTrainer` never sees the runner: it receives the frozen
:class:`~kdtoolkit.engine.context.RunContext` and what the stage is made of.
``train`` phases (and registered phase kinds with ``trains = True``) run
through :class:`~kdtoolkit.engine.loop.TrainPhase`; other phase kinds get a
:class:`PhaseContext` and run themselves (e.g. the push).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast
from collections.abc import Iterator

import torch

from kdtoolkit.foundation.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from kdtoolkit.plugin.contracts import Model, Step
from kdtoolkit.plugin.instantiation import build_component
from kdtoolkit.foundation.distributed import Dist
from kdtoolkit.foundation.errors import CheckpointError, KdtError
from kdtoolkit.foundation.io import append_line, open_for_update
from kdtoolkit.foundation.paths import inside
from kdtoolkit.foundation.progress import Progress
from kdtoolkit.engine.context import RunContext, StageState
from kdtoolkit.engine.data import StageData, batches, derive_seed
from kdtoolkit.engine.losses import LossSet
from kdtoolkit.engine.loop import TrainPhase
from kdtoolkit.engine.models import load_state_strict, model_state
from kdtoolkit.engine.taps import capturing, hook_taps, tapped
from kdtoolkit.engine.teacher import TeacherCaches


@dataclass
class PhaseContext:
    """What a plugin phase sees.

    :ivar stage: the stage name.
    :ivar phase: the phase's resolved recipe table.
    :ivar model: the student model (unwrapped).
    :ivar teacher: the frozen teacher, or ``None``.
    :ivar data: the stage's :class:`~kdtoolkit.engine.data.StageData`.
    :ivar device: the torch device.
    :ivar progress: the run's :class:`~kdtoolkit.foundation.progress.Progress`.
    :ivar seed: a seed derived for this phase.
    :ivar dist: the distributed context (rank, world size).
    :ivar precision: ``fp32``, ``bf16`` or ``fp16``.
    :ivar stage_dir: the stage's run directory (files a phase writes go there, on rank 0); name
        each file with :meth:`stage_file`, never by joining ``stage_dir`` yourself.
    :ivar state: the stage's :class:`~kdtoolkit.engine.context.StageState`; a
        phase sets values there (``ctx.state.set("pushed", True,
        reset_when_trained="head.prototypes")``), checkpoints carry them.
    """

    stage: str
    phase: dict[str, Any]
    model: Model
    teacher: Model | None
    data: StageData
    device: torch.device
    progress: Progress
    seed: int
    dist: Dist
    precision: str = "fp32"
    stage_dir: Path | None = None
    state: StageState | None = None

    def stage_file(self, name: str) -> Path:
        """The path of the file ``name`` in the stage directory, checked; nothing is created.

        Every file a phase writes is named through this method, so that no
        name, however it was built, writes outside the stage directory::

            atomic_write_json(ctx.stage_file(f"push-{ctx.phase['name']}.json"), info)

        ``name`` must be one file name (no ``/`` or ``\\``, not ``.`` or
        ``..``, at most 255 bytes), and the path, resolved with symbolic links
        followed, must lie inside the stage directory
        (:func:`kdtoolkit.foundation.paths.inside`). Phase and stage names already
        passed :func:`kdtoolkit.foundation.paths.name_problem` when the recipe was
        validated; this check holds for any other string too.

        :raises KdtError: one line (exit code 2) when ``name`` fails the check, or when the
            phase has no stage directory.
        """
        if self.stage_dir is None:
            raise KdtError(
                f"phase '{self.phase.get('name')}' of stage '{self.stage}' has no stage directory to write "
                f"{name!r} into"
            )
        return inside(self.stage_dir, name, what=f"stage directory of '{self.stage}'")

    def loader(
        self, split: str = "train_eval", batch_size: int | None = None, *, shard: bool = False
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Un-shuffled batches of ``split`` (``train``, ``train_eval``, ``test``).

        Every rank of a distributed run sees the whole split unless ``shard``.
        """
        ds = getattr(self.data, split)
        return batches(
            ds,
            batch_size or self.data.spec["eval_batch_size"],
            shuffle=False,
            seed=0,
            num_workers=self.data.spec["num_workers"],
            dist=self.dist if shard else None,
        )


class StageTrainer:
    """Runs the phases of one stage, with checkpoints and exact resume.

    :param ctx: the run context.
    :param name: the stage name.
    :param st: the stage's resolved recipe table.
    :param model: the student, on the device.
    :param teacher: the frozen teacher, or ``None``.
    :param data: the stage's datasets.
    :param shash: the stage hash.
    :param sdir: the stage directory.
    :param losses: the stage's built losses.
    :param caches: the run's teacher caches.
    :param teacher_hash: the teacher stage's hash (``None`` without teacher).
    :param teacher_dir: the teacher stage's directory (``None`` without teacher).
    """

    def __init__(
        self,
        ctx: RunContext,
        name: str,
        st: dict[str, Any],
        model: Model,
        teacher: Model | None,
        data: StageData,
        shash: str,
        sdir: Path,
        losses: LossSet,
        caches: TeacherCaches,
        teacher_hash: str | None = None,
        teacher_dir: Path | None = None,
    ):
        self.ctx, self.name, self.st, self.model, self.teacher, self.data = ctx, name, st, model, teacher, data
        self.shash, self.sdir, self.losses, self.caches = shash, sdir, losses, caches
        self.teacher_hash, self.teacher_dir = teacher_hash, teacher_dir
        self.ckpt_path = sdir / "checkpoint.safetensors"
        self.metrics_path = sdir / "metrics.jsonl"
        self.taps = hook_taps(model, st["model"].get("taps"))
        self.previous_seconds = 0.0
        self.history: list[dict[str, Any]] = []
        self.state = StageState()
        self.t0 = time.perf_counter()

    # -- checkpoints --------------------------------------------------------
    def save(
        self,
        phase_idx: int,
        epoch: int,
        batch: int,
        optimizer=None,
        scheduler=None,
        scaler=None,
        rng: bool = False,
        running: dict[str, Any] | None = None,
    ) -> None:
        """Write the checkpoint (rank 0). With ``rng`` (a mid-epoch checkpoint) every
        rank must call it: the RNG states of all ranks are gathered."""
        dist = self.ctx.dist
        rng_states = dist.gather_rng() if rng else None
        if not dist.is_main:
            return
        rng_cuda = None
        if rng and self.ctx.device.type == "cuda":
            rng_cuda = torch.cuda.get_rng_state(self.ctx.device)
        ck = Checkpoint(
            stage=self.name,
            stage_hash=self.shash,
            phase=phase_idx,
            epoch=epoch,
            batch=batch,
            model=model_state(self.model),
            optimizer=optimizer.state_dict() if optimizer else None,
            scheduler=scheduler.state_dict() if scheduler else None,
            scaler=scaler.state_dict() if scaler else None,
            rng=rng_states,
            history=self.history,
            state=self.state.values,
            watch=self.state.watch,
            seconds=self.previous_seconds + time.perf_counter() - self.t0,
            rng_cuda=rng_cuda,
            running=running,
            metrics_bytes=self.metrics_path.stat().st_size if self.metrics_path.exists() else 0,
            losses=self.losses.state_tensors(),
        )
        save_checkpoint(self.ckpt_path, ck)

    def metrics_line(self, obj: dict[str, Any]) -> None:
        """Append one line to ``metrics.jsonl`` (rank 0), flushed to disk before the next checkpoint
        (:func:`kdtoolkit.foundation.io.append_line`: whole or not at all)."""
        if self.ctx.dist.is_main:
            append_line(self.metrics_path, json.dumps(obj))

    def _restore_metrics(self, ck: Checkpoint) -> None:
        """Cut ``metrics.jsonl`` back to its length when ``ck`` was written: the
        lines of epochs (and phases) about to be redone are written again."""
        if not self.ctx.dist.is_main or ck.metrics_bytes is None or not self.metrics_path.exists():
            return
        fd = open_for_update(self.metrics_path, os.O_RDWR)  # never through a planted link
        try:
            if os.fstat(fd).st_size > ck.metrics_bytes:
                os.ftruncate(fd, ck.metrics_bytes)
                os.fsync(fd)
        finally:
            os.close(fd)

    def bad_checkpoint(self, exc: Exception) -> CheckpointError:
        """The error for a checkpoint whose state does not fit this stage."""
        return CheckpointError(
            f"does not fit this stage ({type(exc).__name__}: {' '.join(str(exc).split())[:160]}); "
            "delete it to train the stage again",
            source=str(self.ckpt_path),
        )

    def _resume(self) -> Checkpoint | None:
        if not self.ckpt_path.exists():
            if self.ctx.dist.is_main and self.metrics_path.exists():
                self.metrics_path.unlink()
            return None
        start = load_checkpoint(self.ckpt_path)
        if start.stage_hash != self.shash:  # preflight already refused unless --force
            if self.ctx.dist.is_main and self.metrics_path.exists():
                self.metrics_path.unlink()
            return None
        load_state_strict(self.model, start.model, str(self.ckpt_path))
        self.losses.load_state_tensors(start.losses, str(self.ckpt_path))
        self.model.to(self.ctx.device)
        self.history = list(start.history)
        self.state = StageState(start.state, start.watch)
        self.previous_seconds = start.seconds
        self._restore_metrics(start)
        where = (
            f"phase {start.phase + 1}, epoch {start.epoch + 1}, batch {start.batch}"
            if start.phase < len(self.st["phases"])
            else "every phase done"
        )
        self.ctx.progress.log(f"stage [bold]{self.name}[/]: resuming from {self.ckpt_path.name} ({where})")
        return start

    # -- main loop ------------------------------------------------------------
    def train(self) -> list[dict[str, Any]]:
        """Run every phase not done yet; returns the history of phases."""
        self.t0 = time.perf_counter()
        start = self._resume()
        for i, ph in enumerate(self.st["phases"]):
            if start is not None and i < start.phase:
                continue
            resume = start if start is not None and i == start.phase else None
            entry = self.run_phase(i, ph, resume)
            if entry is not None:
                self.history.append(entry)
            self.save(i + 1, 0, 0)
            if i + 1 < len(self.st["phases"]):
                self.ctx.check_interrupt(
                    f"interrupted: checkpoint saved in {self.ckpt_path} (after phase '{ph['name']}'); "
                    "run the same command again to resume"
                )
        if self.taps is not None:
            self.taps.remove()
        return self.history

    def run_phase(self, i: int, ph: dict[str, Any], resume: Checkpoint | None) -> dict[str, Any]:
        """Run phase ``i``: a training loop, or a plugin phase kind."""
        if ph["kind"] == "train":
            return TrainPhase(self, i, ph, resume).run()
        comp = self.ctx.plugins.registry("phase").get(ph["kind"])
        phase = build_component(comp, ph)
        if comp.attr("trains", False):
            return TrainPhase(self, i, ph, resume, hook_owner=phase).run()
        ctx = PhaseContext(
            self.name,
            ph,
            self.model,
            self.teacher,
            self.data,
            self.ctx.device,
            self.ctx.progress,
            derive_seed(self.st["seed"], i),
            self.ctx.dist,
            self.ctx.precision,
            self.sdir,
            self.state,
        )
        self.model.eval()
        torch.manual_seed(ctx.seed)  # the same RNG state whether or not the run resumed just before this phase
        out = phase.run(ctx) or {}
        for key, value in (out.get("flags") or {}).items():  # the older way to set stage state
            self.state.set(key, value)
        for key, sel in (out.get("watch") or {}).items():
            self.state.watch[key] = sel
        entry = {
            "name": ph["name"],
            "kind": ph["kind"],
            **{k: v for k, v in out.items() if k not in ("flags", "watch")},
        }
        self.metrics_line({"stage": self.name, "phase": ph["name"], "kind": ph["kind"], **entry})
        return entry

    def probe(self) -> Step:
        """A dry forward pass (eval mode, no gradients) of student and teacher on a few
        un-augmented training images, with every declared tap: what loss ``setup`` sees.
        ``probe.num_train`` is the number of training images."""
        x, y = next(iter(batches(self.data.train_eval, min(4, len(self.data.train_eval)), shuffle=False, seed=0)))
        x, y = x.to(self.ctx.device), y.to(self.ctx.device)
        self.model.eval()
        t_out, t_feats = None, {}
        with torch.no_grad(), self.ctx.autocast():
            with capturing(self.taps) as feats:
                outputs = self.model(x)
            if self.teacher is not None:
                with tapped(self.teacher, self.st.get("teacher_taps")) as t_feats:
                    t_out = self.teacher(x)
        probe = Step(
            x,
            y,
            outputs,
            self.model,
            t_out,
            self.teacher,
            features=dict(feats),
            teacher_features=dict(t_feats),
            indices=torch.arange(len(y), device=self.ctx.device),
            phase="setup",
        )
        cast(Any, probe).num_train = len(self.data.train)  # for losses with per-sample memory (CRD's memory bank)
        return probe
