"""One train phase as small steps: setup, epoch, step, reduce, backward-and-step.

Per-step hooks: the student's head and backbone, the phase's active losses
and a phase kind that trains (``trains = True``) may define

- ``on_epoch_start(state)``: called before the first batch of every epoch
  (not when a run resumes in the middle of one: state that must survive a
  resume lives in buffers, which checkpoints carry);
- ``on_optimizer_step(state)``: called once after every optimiser step, with
  ``state.steps`` the micro-batches accumulated into it.

``state`` is a :class:`TrainState`. This is how a head updates parameters
that have no gradient (ProtoTree's leaves) without copying the loop.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from kdtoolkit.plugin.contracts import Model, Step
from kdtoolkit.foundation.distributed import Dist
from kdtoolkit.foundation.errors import Interrupted, TrainingError
from kdtoolkit.engine.context import StageState
from kdtoolkit.engine.data import batch_plan, batches, derive_seed
from kdtoolkit.engine.losses import LossSet
from kdtoolkit.engine.models import select, trainable_parameters
from kdtoolkit.engine.optim import build_optimizer, build_scheduler
from kdtoolkit.engine.taps import Taps, capturing, hook_taps
from kdtoolkit.engine.teacher import TeacherSource, needed_outputs

if TYPE_CHECKING:
    from kdtoolkit.engine.phases import StageTrainer

#: Keys of a ``metrics.jsonl`` line that measure time (they differ between two
#: runs of the same recipe; every other key is reproducible).
TIMING_KEYS = ("seconds", "images_per_s")


@dataclass
class TrainState:
    """What per-step hooks see.

    :ivar stage: the stage name.
    :ivar phase: the phase name.
    :ivar epoch: the epoch within the phase, from 1.
    :ivar batch: batches done in this epoch.
    :ivar num_batches: batches in this epoch.
    :ivar optimizer_steps: optimiser steps in this epoch (batches / ``accumulate``, rounded up).
    :ivar steps: the micro-batches (:class:`~kdtoolkit.plugin.contracts.Step`) of the optimiser step just taken.
    :ivar model: the student (unwrapped).
    :ivar stage_state: the stage's generic state.
    :ivar dist: the distributed context.
    """

    stage: str
    phase: str
    epoch: int
    batch: int
    num_batches: int
    optimizer_steps: int
    steps: list[Step]
    model: Model
    stage_state: StageState
    dist: Dist


class Forward(nn.Module):
    """The student and the loss modules in one forward pass: what DDP wraps,
    so that the gradients of loss parameters are synchronised too."""

    def __init__(self, model: Model, losses: LossSet, taps: Taps | None):
        super().__init__()
        self.model = model
        self.loss_modules = nn.ModuleList(losses.modules.values())
        self._extra = (losses, taps)  # a tuple: not registered as submodules

    def forward(self, x: torch.Tensor, y: torch.Tensor, info: dict[str, Any]):
        losses, taps = self._extra
        with capturing(taps) as feats:
            outputs = self.model(x)
        step = Step(
            x,
            y,
            outputs,
            self.model,
            info["teacher_outputs"],
            info["teacher"],
            features=dict(feats),
            teacher_features=info["teacher_features"],
            indices=info["indices"],
            epoch=info["epoch"],
            phase=info["phase"],
        )
        return outputs, losses.terms(step, info["active"], info["phase"], info["cached"]), step


@dataclass
class Running:
    """The running sums of one epoch's metrics line (carried by mid-epoch checkpoints)."""

    sums: dict[str, float] = field(default_factory=dict)
    count: int = 0
    correct: int = 0
    seen: int = 0

    def to_json(self) -> dict[str, Any]:
        return {"sums": self.sums, "count": self.count, "correct": self.correct, "seen": self.seen}

    @classmethod
    def from_json(cls, d: dict[str, Any] | None) -> Running:
        d = d or {}
        return cls(dict(d.get("sums") or {}), int(d.get("count", 0)), int(d.get("correct", 0)), int(d.get("seen", 0)))


class TrainPhase:
    """Runs one ``train`` phase (or a phase kind that trains) of a stage."""

    def __init__(self, stage: StageTrainer, index: int, ph: dict[str, Any], resume, hook_owner: Any = None):
        self.s = stage
        self.ctx = stage.ctx
        self.i = index
        self.ph = ph
        self.resume = resume
        self.hook_owner = hook_owner

    # -- setup ------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        s, ph = self.s, self.ph
        self.active = s.losses.active(ph["losses"])
        if not self.active or ph["epochs"] == 0:
            why = "no loss with a non-zero weight" if not self.active else "epochs = 0"
            self.ctx.progress.log(f"stage [bold]{s.name}[/]: phase '{ph['name']}' skipped ({why})")
            return {"name": ph["name"], "kind": ph["kind"], "epochs": 0, "skipped": why}
        selectors = [sel for g in ph["groups"] for sel in g["params"]]
        s.state.trained(selectors)  # e.g. prototypes moved after a push: "pushed" is false again
        self._setup()
        self.channels_last = self.ctx.channels_last_for(s.model)
        start_epoch, start_batch = self._restore()
        nb = len(self.plan(start_epoch))
        self.task = self.ctx.progress.add(
            f"{s.name} · {ph['name']}", total=ph["epochs"] * nb, completed=start_epoch * nb + start_batch
        )
        for epoch in range(start_epoch, ph["epochs"]):
            self.epoch(epoch, start_batch if epoch == start_epoch and self.resume is not None else 0)
        self.ctx.progress.finish(self.task)
        if self.source is not None and self.source.taps:
            self.source.taps.remove()
        for _, p in self.named:
            p.requires_grad_(True)
        return {
            "name": ph["name"],
            "kind": ph["kind"],
            "epochs": ph["epochs"],
            "trained": selectors,
            "losses": self.active,
        }

    def _setup(self) -> None:
        s, ph, ctx = self.s, self.ph, self.ctx
        self.named = trainable_parameters(s.model, s.losses.modules)
        taken: set[int] = set()
        self.groups = []
        for g in ph["groups"]:
            params = [p for _, p in select(self.named, g["params"]) if id(p) not in taken]
            taken.update(id(p) for p in params)
            self.groups.append({"params": params, "lr": g["lr"], "weight_decay": g["weight_decay"]})
        for _, p in self.named:
            p.requires_grad_(id(p) in taken)
        self.wrapped = ctx.dist.wrap(Forward(s.model, s.losses, s.taps))
        self.opt = build_optimizer(ph["optimizer"], self.groups, ctx.plugins)
        self.sched = build_scheduler(ph["scheduler"], self.opt, ph["epochs"], ctx.plugins)
        self.scaler = torch.amp.GradScaler(ctx.device.type) if ctx.precision == "fp16" else None
        self.source, self.cached = self._teacher_source()
        owners = [s.model.head, s.model.backbone, *(s.losses.fns[lid] for lid in self.active), self.hook_owner]
        self.on_epoch = [o.on_epoch_start for o in owners if hasattr(o, "on_epoch_start")]
        self.on_step = [o.on_optimizer_step for o in owners if hasattr(o, "on_optimizer_step")]

    def _teacher_source(self) -> tuple[TeacherSource | None, bool]:
        s = self.s
        if s.teacher is None:
            return None, False
        needs = needed_outputs(s.losses.fns[lid] for lid in self.active)
        tap_names = s.losses.taps(self.active, "requires_teacher_taps")
        taps = hook_taps(s.teacher, s.st.get("teacher_taps"), tap_names)
        run = needs != set() or bool(tap_names)  # no forward pass when the losses read only the teacher's parameters
        cache = None
        if run and s.st["teacher_cache"] != "off":
            assert s.teacher_hash is not None and s.teacher_dir is not None  # given with the teacher
            cache = s.caches.get(s.name, s.st, s.teacher, s.data, needs, taps, s.teacher_hash, s.teacher_dir)
        return TeacherSource(s.teacher, taps, cache, run), cache is not None

    def _restore(self) -> tuple[int, int]:
        if self.resume is None:
            return 0, 0
        r = self.resume
        try:
            if r.optimizer is not None:
                self.opt.load_state_dict(r.optimizer)
            if r.scheduler is not None and self.sched is not None:
                self.sched.load_state_dict(r.scheduler)
            if r.scaler is not None and self.scaler is not None:
                self.scaler.load_state_dict(r.scaler)
        except (ValueError, KeyError, TypeError, RuntimeError, IndexError) as exc:
            raise self.s.bad_checkpoint(exc) from None
        return r.epoch, r.batch

    def plan(self, epoch: int) -> list[list[int]]:
        """The global batches (dataset indices) of ``epoch``."""
        spec = self.s.data.spec
        return batch_plan(
            len(self.s.data.train),
            spec["batch_size"],
            shuffle=True,
            seed=derive_seed(self.s.st["seed"], self.i, epoch, 2),
            drop_last=spec["drop_last"],
            limit=self.ph["limit_batches"],
            world=self.ctx.dist.world,
        )

    # -- one epoch ----------------------------------------------------------
    def epoch(self, epoch: int, start: int) -> None:
        s, ph, ctx = self.s, self.ph, self.ctx
        first = start > 0
        running = Running.from_json(self.resume.running) if first else Running()
        self._seed(epoch, first)
        self.wrapped.train()
        plan = self.plan(epoch)
        self.pending: list[Step] = []
        it = batches(
            s.data.train,
            s.data.spec["batch_size"],
            shuffle=True,
            seed=derive_seed(s.st["seed"], self.i, epoch, 2),
            start=start,
            num_workers=s.data.spec["num_workers"],
            dist=ctx.dist,
            plan=plan,
        )
        self.opt.zero_grad(set_to_none=True)
        if start == 0:
            self._call(self.on_epoch, epoch, 0, len(plan))
        self.clock = [time.perf_counter(), 0]  # this process's part of the epoch: start, images trained
        b = start
        for x, y in it:
            self.step(x, y, epoch, b, plan, running)
            b += 1
        if self.sched is not None:
            self.sched.step()
        seconds = time.perf_counter() - self.clock[0]
        line = {
            "stage": s.name,
            "phase": ph["name"],
            "epoch": epoch + 1,
            **{f"loss/{k}": v / max(running.count, 1) for k, v in running.sums.items()},
            "train_accuracy": running.correct / max(running.seen, 1),
            "lr": [g["lr"] for g in self.opt.param_groups],
            "seconds": round(seconds, 3),
            "images_per_s": round(self.clock[1] / max(seconds, 1e-9), 1),
        }
        s.metrics_line(line)
        if ctx.dist.is_main:  # observers run where files are written
            ctx.plugins.call("kdt_after_epoch", stage=s.name, phase=ph["name"], epoch=epoch + 1, metrics=line)
        every = ctx.checkpoint_every
        if every and (epoch + 1) % every == 0 and epoch + 1 < ph["epochs"]:
            s.save(self.i, epoch + 1, 0, self.opt, self.sched, self.scaler)

    def _seed(self, epoch: int, first: bool) -> None:
        rng = self.resume.rng_for(self.ctx.dist.rank, self.ctx.dist.world) if first else None
        if rng is None:
            torch.manual_seed(derive_seed(self.s.st["seed"], self.i, epoch, 1))
            return
        try:
            torch.set_rng_state(rng)
            if self.resume.rng_cuda is not None and self.ctx.device.type == "cuda":
                torch.cuda.set_rng_state(self.resume.rng_cuda, self.ctx.device)
        except (RuntimeError, TypeError) as exc:
            raise self.s.bad_checkpoint(exc) from None

    def _call(self, hooks: list, epoch: int, batch: int, nb: int) -> None:
        if not hooks:
            return
        acc = self.ph["accumulate"]
        state = TrainState(
            self.s.name,
            self.ph["name"],
            epoch + 1,
            batch,
            nb,
            -(-nb // acc),
            list(self.pending),
            self.s.model,
            self.s.state,
            self.ctx.dist,
        )
        for hook in hooks:
            hook(state)

    # -- one step -------------------------------------------------------------
    def step(
        self, x: torch.Tensor, y: torch.Tensor, epoch: int, b: int, plan: list[list[int]], running: Running
    ) -> None:
        s, ctx = self.s, self.ctx
        dist = ctx.dist
        x, y = x.to(ctx.device, non_blocking=True), y.to(ctx.device, non_blocking=True)
        if self.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        local = plan[b] if dist.world == 1 else plan[b][dist.rank :: dist.world]
        n_global, n_local = len(plan[b]), int(y.shape[0])
        with ctx.autocast():
            t_out, t_feats = self.source.batch(x, local, ctx.device) if self.source else (None, {})
            info = {
                "teacher_outputs": t_out,
                "teacher": s.teacher,
                "teacher_features": t_feats,
                "active": self.active,
                "indices": torch.as_tensor(local, dtype=torch.long, device=ctx.device),
                "epoch": epoch + 1,
                "phase": self.ph["name"],
                "cached": self.cached,
            }
            outputs, terms, step = self.wrapped(x, y, info)
            total = sum(s.losses.weight(lid) * v.float() for lid, v in terms.items())
        values = {lid: float(v.detach()) for lid, v in terms.items()}
        tval = float(total.detach())
        with torch.no_grad():
            correct = int((outputs["logits"].argmax(1) == y).sum())
        stop = ctx.stop.requested
        if dist.world > 1:
            tval, values, correct, stop = self.reduce(tval, values, correct, stop, n_local, n_global)
        self._check(total, tval, values, epoch, b)
        stepped = self.backward_and_step(total, n_local, n_global, b, len(plan), step)
        for k, v in values.items():
            running.sums[k] = running.sums.get(k, 0.0) + v
        running.sums["total"] = running.sums.get("total", 0.0) + tval
        running.count += 1
        running.correct += correct
        running.seen += n_global
        self.clock[1] += n_global
        ips = self.clock[1] / max(time.perf_counter() - self.clock[0], 1e-9)
        ctx.progress.advance(self.task, loss=tval, epoch=f"{epoch + 1}/{self.ph['epochs']}", images_per_s=ips)
        if stop and stepped:  # never with gradients half accumulated
            s.save(self.i, epoch, b + 1, self.opt, self.sched, self.scaler, rng=True, running=running.to_json())
            raise Interrupted(
                f"interrupted: checkpoint saved in {s.ckpt_path} (phase '{self.ph['name']}', "
                f"epoch {epoch + 1}, batch {b + 1}); run the same command again to resume"
            )

    def reduce(
        self, tval: float, values: dict[str, float], correct: int, stop: bool, n_local: int, n_global: int
    ) -> tuple[float, dict[str, float], int, bool]:
        """One small all-reduce per step: every rank logs the global batch's loss values and
        accuracy, sees a non-finite loss on any rank and stops at the same step after a Ctrl-C."""
        dev = self.ctx.device if self.ctx.device.type == "cuda" else "cpu"
        shared = torch.tensor(
            [tval * n_local, *(v * n_local for v in values.values()), correct, 1.0 if stop else 0.0],
            dtype=torch.float64,
            device=dev,
        )
        self.ctx.dist.all_reduce_sum(shared)
        values = {k: shared[1 + j].item() / n_global for j, k in enumerate(values)}
        return shared[0].item() / n_global, values, int(shared[-2].item()), shared[-1].item() > 0

    def _check(self, total: torch.Tensor, tval: float, values: dict[str, float], epoch: int, b: int) -> None:
        s, ph = self.s, self.ph
        if not math.isfinite(tval):
            raise TrainingError(
                f"non-finite loss in stage '{s.name}', phase '{ph['name']}', epoch {epoch + 1}, step {b + 1}: "
                f"total {tval}; "
                + ", ".join(f"{k} = {v}" for k, v in values.items())
                + f" (last good checkpoint kept: {s.ckpt_path if s.ckpt_path.exists() else 'none yet'})"
            )
        if not total.requires_grad:
            raise TrainingError(
                f"stage '{s.name}', phase '{ph['name']}': the losses {', '.join(self.active)} "
                "do not depend on the trained parameters"
            )

    def backward_and_step(self, total: torch.Tensor, n_local: int, n_global: int, b: int, nb: int, step: Step) -> bool:
        """Backward pass (scaled for DDP shares, accumulation and fp16); an optimiser step when due.
        Returns whether it stepped."""
        dist, ph = self.ctx.dist, self.ph
        loss = total
        if n_local * dist.world != n_global:
            loss = loss * (n_local * dist.world / n_global)  # DDP averages over ranks: weight by this rank's share
        loss = loss / ph["accumulate"]
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
        else:
            loss.backward()
        if self.on_step:
            self.pending.append(step)
        if not ((b + 1) % ph["accumulate"] == 0 or b + 1 == nb):
            return False
        if ph["clip_grad_norm"]:
            if self.scaler is not None:
                self.scaler.unscale_(self.opt)
            torch.nn.utils.clip_grad_norm_([p for g in self.groups for p in g["params"]], ph["clip_grad_norm"])
        if self.scaler is not None:
            self.scaler.step(self.opt)
            self.scaler.update()
        else:
            self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        if self.on_step:
            self._call(self.on_step, int(step.epoch) - 1, b + 1, nb)
            self.pending = []
        return True
