"""The runner: a recipe's stages, in dependency order, into one run directory.

A run writes into its directory ``DIR``::

    DIR/recipe.resolved.toml      the validated recipe, defaults filled in
    DIR/recipe.resolved.json      the same as JSON (read back by RunDir)
    DIR/run.json                  versions, seed, device, command
    DIR/<stage>/model.safetensors final weights + JSON metadata
    DIR/<stage>/losses.safetensors  state of loss modules (connectors, memory banks), if any
    DIR/<stage>/checkpoint.safetensors  resumable state while a stage trains
    DIR/<stage>/metrics.jsonl     one line per epoch
    DIR/<stage>/records.safetensors  evaluation records on the test set
    DIR/<stage>/result.json       the stage's test metrics
    DIR/results.json, DIR/results.md

Stages run in dependency order (teachers first). A stage whose
``result.json`` carries the same stage hash is not trained again. A stage
interrupted mid-way resumes from its checkpoint (see :mod:`kdtoolkit.foundation.checkpoint`):
one is written every ``checkpoint_every`` epochs, at the end of every phase
and on Ctrl-C (mid-epoch, with the RNG state and the batch index); a
checkpoint stays until the stage's ``result.json`` is written.

Repeatability: at the start of every epoch (and of every plugin phase) the
torch RNG is reseeded from (stage seed, phase index, epoch) and the data
order is a permutation drawn from a generator seeded the same way; the data
loader draws nothing from the global RNG. So CPU runs are bit-for-bit
repeatable, and a run killed at any point (even with SIGKILL) and run again
ends with the same weights and the same ``metrics.jsonl`` as an uninterrupted
run: lines of epochs redone after a resume are not written twice. (With
``num_workers > 0`` and augmentation, a resume from a mid-epoch Ctrl-C
checkpoint replays the rest of that epoch with other augmentation draws.)
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from kdtoolkit import __version__
from kdtoolkit.foundation.distributed import Dist
from kdtoolkit.foundation.errors import KdtError, PluginError, RecipeError
from kdtoolkit.foundation.io import atomic_write_json, atomic_write_text, remove_stale_temps
from kdtoolkit.plugin.declared import record_keys
from kdtoolkit.plugin.manager import PluginManager
from kdtoolkit.foundation.progress import Progress
from kdtoolkit.recipe.loader import Recipe
from kdtoolkit.results.records import Records
from kdtoolkit.results.report import RunResults, write_reports
from kdtoolkit.results.rundir_files import STAGE_RESULT, load_json, stage_path
from kdtoolkit.foundation.tensorfiles import atomic_save_safetensors
from kdtoolkit.engine.context import RunContext, StopFlag
from kdtoolkit.engine.data import StageData, build_data
from kdtoolkit.foundation.device import resolve_device
from kdtoolkit.engine.evaluation import compute_metrics, evaluate
from kdtoolkit.engine.losses import LossSet
from kdtoolkit.engine.models import (
    build_model,
    check_phase_selectors,
    init_from_teacher,
    save_model_file,
    trainable_parameters,
)
from kdtoolkit.engine.phases import StageTrainer
from kdtoolkit.engine.preflight import Preflight, model_error
from kdtoolkit.engine.preflight import isolated_rng, stored_hash  # noqa: F401 -- importable from here, as before
from kdtoolkit.engine.taps import check_tap_paths
from kdtoolkit.engine.teacher import TeacherCaches, load_teacher

LOSSES_FORMAT = "kdtoolkit.losses/1"


def versions(plugins: PluginManager | None = None) -> dict[str, Any]:
    """Versions of Python, torch, kdtoolkit and every loaded plugin."""
    out: dict[str, Any] = {"python": sys.version.split()[0], "torch": torch.__version__, "kdtoolkit": __version__}
    try:  # the installed version, without importing timm (slow) in runs that do not use it
        from importlib import metadata

        out["timm"] = metadata.version("timm")
    except Exception:  # pragma: no cover - timm is a dependency
        pass
    if plugins is not None:
        out["plugins"] = {i.name: i.version for i in plugins.infos.values() if i.status == "loaded"}
    return out


@dataclass
class RunOptions:
    """Options of :func:`run_recipe` from the command line."""

    out: Path
    device: str | None = None
    force: bool = False
    quiet: bool = False
    command: str = ""


class Runner:
    """Runs the stages of one recipe into one run directory."""

    def __init__(
        self,
        recipe: Recipe,
        options: RunOptions,
        plugins: PluginManager,
        progress: Progress,
        dist: Dist | None = None,
        stop: StopFlag | None = None,
    ):
        self.recipe = recipe
        self.opt = options
        self.out = Path(options.out)
        dist = dist or Dist.from_env()
        device = dist.device(resolve_device(options.device or recipe.resolved["device"]))
        precision = recipe.resolved["precision"]
        if precision == "fp16" and device.type == "cpu":
            raise KdtError(
                "precision 'fp16' needs a GPU; use bf16 or fp32 on the CPU", source=str(recipe.path), key="precision"
            )
        self.ctx = RunContext(
            device=device,
            precision=precision,
            channels_last=recipe.resolved.get("channels_last", False),
            dist=dist,
            progress=progress,
            plugins=plugins,
            checkpoint_every=recipe.resolved["checkpoint_every"],
            source=str(recipe.path),
            stop=stop or StopFlag(),
        )
        self.versions = versions(plugins)
        self.caches = TeacherCaches(self.ctx, self.versions)
        self._records: dict[str, Records] = {}
        self._data: dict[str, StageData] = {}

    # -- preflight --------------------------------------------------------
    def preflight(self) -> None:
        """Checks done before any training: output directory, stale or unreadable
        stage files, datasets, tap paths, the dry build of every component a stage will
        build, free disk space; last, the output directory is
        created and a probe file written in it (so an unwritable directory is
        a one-line error, for root and on read-only filesystems too). The checks are
        :class:`~kdtoolkit.engine.preflight.Preflight`'s."""
        Preflight(
            self.out, self.recipe, self.ctx, force=self.opt.force, stage_dir=self.stage_dir, data_for=self.data_for
        ).run()

    def data_for(self, name: str) -> StageData:
        """The stage's datasets, built once per distinct data table (during preflight
        for every stage, so a bad dataset stops the run before anything is written)."""
        spec = self.recipe.stage(name)["data"]
        key = json.dumps(spec, sort_keys=True)
        if key not in self._data:
            try:
                self._data[key] = build_data(self.recipe.stage(name), self.ctx.plugins)
            except KdtError as exc:
                where = f"stages.{name}.data" + (f".{exc.key}" if exc.key else "")
                src = f"{self.recipe.path}: {where}: {exc.source}" if exc.source else str(self.recipe.path)
                raise type(exc)(exc.message, source=src, key=None if exc.source else where) from None
        return self._data[key]

    # -- main -------------------------------------------------------------
    def run(self) -> RunResults:
        """Preflight, then every stage in order, then the reports; the results with the report's tables
        (built once, on rank 0)."""
        self.preflight()
        ctx, dist = self.ctx, self.ctx.dist
        if dist.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            for folder in (self.out, *(self.stage_dir(s) for s in self.recipe.order)):  # reused stages' too
                remove_stale_temps(folder, unmarked=True)  # of killed writers (a live concurrent one's are kept)
            atomic_write_text(self.out / "recipe.resolved.toml", self.recipe.to_toml())
            atomic_write_json(self.out / "recipe.resolved.json", self.recipe.resolved)
            atomic_write_json(
                self.out / "run.json",
                {
                    "recipe": str(self.recipe.path),
                    "name": self.recipe.resolved["name"],
                    "seed": self.recipe.resolved["seed"],
                    "device": str(ctx.device),
                    "world_size": dist.world,
                    "precision": ctx.precision,
                    "versions": self.versions,
                    "command": self.opt.command,
                    "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                    "stage_order": self.recipe.order,
                    "stage_hashes": {s: self.recipe.stage_hash(s) for s in self.recipe.order},
                },
            )
        dist.barrier()
        results: dict[str, Any] = {"name": self.recipe.resolved["name"], "stages": {}}
        for name in self.recipe.order:
            results["stages"][name] = self.run_stage(name)
            dist.barrier()  # every rank sees the stage's files before the next stage reads them
        tables = None
        if dist.is_main:
            tables = write_reports(self.out, results, self.recipe.resolved, ctx.plugins)
            ctx.plugins.call("kdt_after_run", run_dir=self.out, results=results)
        dist.barrier()
        return RunResults(results, tables)

    def stage_dir(self, name: str) -> Path:
        """``out/<name>``, checked to lie inside the run directory
        (:func:`kdtoolkit.results.rundir_files.stage_path`)."""
        return stage_path(self.out, name)

    def _finished(self, name: str, shash: str) -> dict[str, Any] | None:
        sdir = self.stage_dir(name)
        result_file = sdir / STAGE_RESULT
        if not (result_file.exists() and (sdir / "model.safetensors").exists()):
            return None
        try:
            res = load_json(result_file)
        except (
            KdtError,
            OSError,
            ValueError,
            RecursionError,
        ):  # not a regular file, unreadable, not JSON, too deep: trained again
            return None
        if not isinstance(res, dict) or res.get("stage_hash") != shash:
            return None
        if self.ctx.dist.is_main and (sdir / "checkpoint.safetensors").exists():
            (sdir / "checkpoint.safetensors").unlink()  # killed after result.json was written
        self.ctx.progress.log(f"stage [bold]{name}[/]: already complete in {sdir}, reused")
        return res

    def run_stage(self, name: str) -> dict[str, Any]:
        """Train (or reuse) and evaluate one stage; returns its result."""
        sdir, shash, ctx = self.stage_dir(name), self.recipe.stage_hash(name), self.ctx
        done = self._finished(name, shash)
        if done is not None:
            return done
        ctx.check_interrupt(f"interrupted before stage '{name}' started; run the same command again to go on")
        if self.opt.force and ctx.dist.is_main:
            # --force: results of a different recipe are retrained (stages whose hash still matches are reused)
            for f in ("result.json", "checkpoint.safetensors"):
                if (sdir / f).exists() and stored_hash(sdir / f)[0] != shash:
                    (sdir / f).unlink()
        ctx.dist.barrier()
        trainer = self.build_stage(name)
        if ctx.dist.is_main:
            sdir.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        history = trainer.train()
        seconds = time.perf_counter() - t0 + trainer.previous_seconds
        self.caches.release(name, self.recipe.order, self.recipe.resolved["stages"])
        ctx.check_interrupt(
            f"interrupted: stage '{name}' is trained and its checkpoint {trainer.ckpt_path} kept; "
            "run the same command again to evaluate it and go on"
        )
        return self.finish_stage(trainer, history, seconds)

    def build_stage(self, name: str) -> StageTrainer:
        """The stage's models, losses and checks, before anything of it is written."""
        st, ctx, src = self.recipe.stage(name), self.ctx, str(self.recipe.path)
        data = self.data_for(name)
        torch.manual_seed(st["seed"])
        try:
            model = ctx.place(build_model(st, data.num_classes, ctx.plugins))
        except PluginError as exc:
            raise model_error(exc, name, src) from None
        teacher, tdir = None, None
        if st["teacher"]:
            tdir = self.stage_dir(st["teacher"])
            teacher = load_teacher(ctx, self.recipe.stage(st["teacher"]), data.num_classes, tdir / "model.safetensors")
            if st["model"]["init_from_teacher"]:
                init_from_teacher(
                    model, teacher, st["model"]["init_from_teacher"], src, f"stages.{name}.model.init_from_teacher"
                )
        check_tap_paths(model, st["model"].get("taps") or {}, src, f"stages.{name}.model.taps")
        if teacher is not None:
            check_tap_paths(teacher, st.get("teacher_taps") or {}, src, f"stages.{name}.teacher_taps")
        losses = LossSet(st["losses"], ctx.plugins, name, source=src)
        trainer = StageTrainer(
            ctx,
            name,
            st,
            model,
            teacher,
            data,
            self.recipe.stage_hash(name),
            self.stage_dir(name),
            losses,
            self.caches,
            self.recipe.stage_hash(st["teacher"]) if teacher is not None else None,
            tdir,
        )
        if losses.needs_setup():
            losses.setup(trainer.probe())
        losses.place(ctx)
        check_phase_selectors(trainable_parameters(model, losses.modules), st, name, src)
        # Losses that depend on both models (e.g. matching prototype counts) check them now.
        for i, l in enumerate(st["losses"]):
            check = getattr(losses.fns[l["id"]], "check_models", None)
            if check is not None and l["weight"] != 0:
                try:
                    check(model, teacher)
                except ValueError as exc:
                    raise RecipeError(str(exc), source=src, key=f"stages.{name}.losses[{i}]") from None
        return trainer

    def finish_stage(self, trainer: StageTrainer, history: list[dict[str, Any]], seconds: float) -> dict[str, Any]:
        """Save the model (and loss state), evaluate, compute the metrics, write ``result.json``."""
        name, st, ctx, sdir = trainer.name, trainer.st, self.ctx, trainer.sdir
        data, model, shash = trainer.data, trainer.model, trainer.shash
        meta = {
            "stage": name,
            "dataset": data.test.name if hasattr(data.test, "name") else st["data"]["dataset"],
            "num_classes": data.num_classes,
            "stage_hash": shash,
        }
        if ctx.dist.is_main:
            save_model_file(
                sdir / "model.safetensors",
                model,
                {
                    "stage": name,
                    "stage_hash": shash,
                    "recipe": str(self.recipe.path),
                    "epochs": sum(h.get("epochs", 0) for h in history),
                    "history": history,
                    "state": trainer.state.values,
                    "num_classes": data.num_classes,
                    "classes": [str(c) for c in getattr(data.test, "classes", [])],
                    "model": st["model"],
                    "versions": self.versions,
                },
            )
            loss_state = trainer.losses.state_tensors()
            if loss_state:
                atomic_save_safetensors(
                    loss_state,
                    sdir / "losses.safetensors",
                    {"format": LOSSES_FORMAT, "stage": json.dumps(name), "stage_hash": json.dumps(shash)},
                )
        records = self.evaluate_stage(name, st, model, data, meta)
        reference_name = st["teacher"] or st["compare_to"]
        reference = self.records_of(reference_name) if reference_name else None
        result = {
            "description": st["description"],
            "teacher": st["teacher"],
            "compare_to": st["compare_to"],
            "reference": reference_name or "self",
            **compute_metrics(st, records, reference, ctx.plugins),
            "state": trainer.state.values,
            "losses": {l["id"]: l["weight"] for l in st["losses"]},
            "loss_names": {l["id"]: l["name"] for l in st["losses"]},
            "history": history,
            "num_parameters": sum(p.numel() for p in model.parameters()),
            "train_seconds": round(seconds, 2),
            "test_images": records.n,
            "stage_hash": shash,
        }
        if ctx.dist.is_main:
            atomic_write_json(sdir / "result.json", result)
            if trainer.ckpt_path.exists():
                trainer.ckpt_path.unlink()
            ctx.plugins.call("kdt_after_stage", stage=name, result=result, stage_dir=sdir)
        ctx.progress.log(
            f"stage [bold]{name}[/]: accuracy {result.get('accuracy', float('nan')):.4f} ({seconds:.1f} s)"
        )
        return result

    def evaluate_stage(self, name: str, st: dict[str, Any], model, data: StageData, meta: dict[str, Any]) -> Records:
        """The stage's records on its test set (saved by rank 0)."""
        head_cls = self.ctx.plugins.registry("head").get(st["model"]["head"]["name"])
        records = evaluate(
            model,
            data.test,
            batch_size=st["data"]["eval_batch_size"],
            device=self.ctx.device,
            record_keys=record_keys(head_cls),
            meta=meta,
            progress=self.ctx.progress,
            dist=self.ctx.dist,
            precision=self.ctx.precision,
            num_workers=st["data"]["num_workers"],
        )
        if self.ctx.dist.is_main:
            records.save(self.stage_dir(name) / "records.safetensors")
        self._records[name] = records
        return records

    def records_of(self, name: str) -> Records:
        """A finished stage's records (from memory, or read from its directory)."""
        if name not in self._records:
            self._records[name] = Records.load(self.stage_dir(name) / "records.safetensors")
        return self._records[name]


def run_recipe(
    recipe: Recipe,
    options: RunOptions,
    plugins: PluginManager,
    progress: Progress,
    dist: Dist | None = None,
    stop: StopFlag | None = None,
) -> RunResults:
    """Run every stage of ``recipe`` into ``options.out``; the results (a dict, the content of
    ``results.json``) with the tables of ``results.md`` (:class:`~kdtoolkit.results.report.RunResults`).

    SIGINT (Ctrl-C) writes a checkpoint at the current step (or, outside a
    train phase, at the next phase or stage boundary) and raises
    :class:`~kdtoolkit.foundation.errors.Interrupted`; a second Ctrl-C exits at once with code 130.
    ``stop``: the flag Ctrl-C sets (default: a new one); runs in a row share one
    (:mod:`kdtoolkit.engine.multiseed`), so that a Ctrl-C that came too late for one run stops the next.
    """
    runner = Runner(recipe, options, plugins, progress, dist, stop)
    stop = runner.ctx.stop

    def on_sigint(signum, frame):  # pragma: no cover - exercised through a subprocess test
        if stop.requested:
            os._exit(130)
        stop.requested = True
        progress.log("interrupt: saving a checkpoint (Ctrl-C again to exit at once)")

    try:
        previous = signal.signal(signal.SIGINT, on_sigint)
    except ValueError:  # not the main thread
        previous = None
    try:
        return runner.run()
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
