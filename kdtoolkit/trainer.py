"""The trainer: runs a recipe's stages, phases and evaluation.

A run writes into its directory ``DIR``::

    DIR/recipe.resolved.toml      the validated recipe, defaults filled in
    DIR/run.json                  versions, seed, device, command
    DIR/<stage>/model.safetensors final weights + JSON metadata
    DIR/<stage>/checkpoint.safetensors  resumable state while a stage trains
    DIR/<stage>/metrics.jsonl     one line per epoch
    DIR/<stage>/records.safetensors  evaluation records on the test set
    DIR/<stage>/result.json       the stage's test metrics
    DIR/results.json, DIR/results.md

Stages run in dependency order (teachers first). A stage whose
``result.json`` carries the same stage hash is not trained again. A stage
interrupted mid-way resumes from its checkpoint (see :mod:`kdtoolkit.checkpoint`):
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

import contextlib
import hashlib
import json
import math
import os
import signal
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from . import __version__
from .checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from .components import Model, Step, select_parameters
from .distributed import Dist
from .errors import CheckpointError, KdtError, RecipeError
from .io import (atomic_save_safetensors, atomic_write_json, atomic_write_text, load_external_state_dict,
                 read_kdt_safetensors, remove_stale_temps)
from .plugins import PluginManager
from .progress import Progress
from .recipe import Recipe
from .records import Records
from .report import write_reports
from . import teachercache
from .teachercache import TeacherCache, needed_outputs

MODEL_FORMAT = "kdtoolkit.model/1"


class TrainingError(KdtError):
    """Training cannot go on (e.g. a non-finite loss); the last checkpoint is kept."""


class Interrupted(Exception):
    """Raised after SIGINT once a checkpoint has been written (the message says where)."""


# ---------------------------------------------------------------------------
# small helpers


def resolve_device(spec: str) -> torch.device:
    """``auto`` → CUDA if available, else CPU; otherwise the named device.

    :raises KdtError: when the named device is not available.
    """
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(spec)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise KdtError(f"device '{spec}' requested but CUDA is not available (use --device cpu or auto)")
    if dev.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise KdtError(f"device '{spec}' requested but MPS is not available")
    return dev


def derive_seed(*parts: int) -> int:
    """A 63-bit seed derived deterministically from integers."""
    h = hashlib.sha256(",".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)


def versions(plugins: PluginManager | None = None) -> dict[str, Any]:
    """Versions of Python, torch, kdtoolkit and every loaded plugin."""
    out: dict[str, Any] = {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "kdtoolkit": __version__,
    }
    try:  # the installed version, without importing timm (slow) in runs that do not use it
        from importlib import metadata

        out["timm"] = metadata.version("timm")
    except Exception:  # pragma: no cover - timm is a dependency
        pass
    if plugins is not None:
        out["plugins"] = {i.name: i.version for i in plugins.infos.values() if i.status == "loaded"}
    return out


# ---------------------------------------------------------------------------
# model building


def build_model(stage: dict[str, Any], num_classes: int, plugins: PluginManager) -> Model:
    """Build the stage's backbone + head (random or pretrained init)."""
    bspec = dict(stage["model"]["backbone"])
    hspec = dict(stage["model"]["head"])
    backbone = plugins.registry("backbone").get(bspec.pop("name")).factory(**bspec)
    head = plugins.registry("head").get(hspec.pop("name")).factory(backbone.out_channels, num_classes, **hspec)
    model = Model(backbone, head)
    if stage["model"].get("weights"):
        path = Path(stage["model"]["weights"])
        state = load_external_state_dict(path)
        own = model.state_dict()
        wrong = [k for k in state if k in own and tuple(state[k].shape) != tuple(own[k].shape)]
        if wrong:
            raise CheckpointError(f"weights do not fit this model (shape of {wrong[0]}: {tuple(state[wrong[0]].shape)} "
                                  f"in the file, {tuple(own[wrong[0]].shape)} in the model)", source=str(path))
        missing, unexpected = model.load_state_dict(state, strict=False)
        if unexpected or len(missing) == len(own):
            raise CheckpointError(
                f"weights do not fit this model ({len(unexpected)} unexpected, {len(missing)} missing keys)",
                source=str(path),
            )
    return model


def model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict as contiguous CPU tensors (for safetensors)."""
    return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}


def load_model_file(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Weights and decoded metadata of a ``model.safetensors``."""
    return read_kdt_safetensors(path, MODEL_FORMAT, "model file")


def load_state_strict(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Load ``state`` into ``model``; any missing, unexpected or mis-shaped key is a :class:`CheckpointError` naming ``source``."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or wrong:
        detail = (missing and f"missing {missing[0]}") or (unexpected and f"unexpected {unexpected[0]}") or f"shape of {wrong[0]}"
        raise CheckpointError(f"weights do not match the model ({detail})", source=source)
    model.load_state_dict(state)


# ---------------------------------------------------------------------------
# data


@dataclass
class StageData:
    """The datasets of a stage: augmented train, un-augmented train, test."""

    train: Any
    train_eval: Any
    test: Any
    spec: dict[str, Any]

    @property
    def num_classes(self) -> int:
        return int(self.train.num_classes)


def build_data(stage: dict[str, Any], plugins: PluginManager) -> StageData:
    """The stage's datasets: augmented train (unless ``data.augment = false``), un-augmented train, test."""
    spec = dict(stage["data"])
    comp = plugins.registry("dataset").get(spec["dataset"])
    params = {k: v for k, v in spec.items() if k in comp.params}
    train = comp.factory("train", bool(spec.get("augment", True)), **params)
    train_eval = comp.factory("train", False, **params)
    test = comp.factory("test", False, **params)
    return StageData(train, train_eval, test, spec)


def batch_plan(n: int, batch_size: int, *, shuffle: bool, seed: int, drop_last: bool = False,
               limit: int | None = None, world: int = 1) -> list[list[int]]:
    """The global batches (dataset indices) of one pass over ``n`` items.

    The order is a permutation drawn from a generator seeded with ``seed``
    (or ``0..n-1``). Under DDP (``world > 1``) a last batch with fewer items
    than ranks is left out, so that every rank has a share of every batch.
    """
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)) if shuffle else torch.arange(n)
    idx = order.tolist()
    nb = num_batches(n, batch_size, drop_last, limit)
    plan = [idx[b * batch_size : (b + 1) * batch_size] for b in range(nb)]
    if world > 1 and plan and len(plan[-1]) < world:
        plan.pop()
    return plan


class _Failed:
    """A :class:`KdtError` raised by a dataset inside a DataLoader worker, carried to the main process."""

    def __init__(self, exc: KdtError):
        self.cls, self.message, self.source, self.key = type(exc), exc.message, exc.source, exc.key

    def reraise(self) -> None:
        try:
            exc = self.cls(self.message, source=self.source, key=self.key)
        except Exception:  # a subclass with another signature
            exc = KdtError(self.message, source=self.source, key=self.key)
        raise exc


class _Carrying(torch.utils.data.Dataset):
    """Wraps a dataset so that its :class:`KdtError` survives a worker process as one clear line."""

    def __init__(self, dataset: Any):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> Any:
        try:
            return self.dataset[i]
        except KdtError as exc:
            return _Failed(exc)


def _collate_carrying(items: list[Any]) -> Any:
    for item in items:
        if isinstance(item, _Failed):
            return item
    return torch.utils.data.default_collate(items)


def batches(dataset: Any, batch_size: int, *, shuffle: bool, seed: int, start: int = 0,
            drop_last: bool = False, num_workers: int = 0, dist: Dist | None = None,
            limit: int | None = None, plan: list[list[int]] | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Mini-batches of ``dataset`` in a seeded order, from batch ``start`` on.

    ``plan`` (from :func:`batch_plan`) gives the global batches directly
    (training does; without it no item is left out). Under DDP each rank
    receives its shard of every global batch, and skips a batch whose shard
    is empty (in a pass without collectives, e.g. evaluation). The loader
    draws nothing from the global torch RNG (its base seed comes from
    ``seed``), so augmentation draws are the same whether or not a run
    resumed mid-epoch. A :class:`KdtError` raised by the dataset in a worker
    process is raised again here, unchanged.
    """
    world = dist.world if dist is not None else 1
    if plan is None:
        plan = batch_plan(len(dataset), batch_size, shuffle=shuffle, seed=seed, drop_last=drop_last, limit=limit)
    plan = plan[start:]
    if world > 1:
        plan = [p[dist.rank :: world] for p in plan]
        plan = [p for p in plan if p]
    if not plan:
        return
    if num_workers > 0:
        dataset, collate = _Carrying(dataset), _collate_carrying
    else:
        collate = None
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=plan, num_workers=num_workers, collate_fn=collate,
                                         generator=torch.Generator().manual_seed(seed))
    for batch in loader:
        if isinstance(batch, _Failed):
            batch.reraise()
        yield batch


def num_batches(n: int, batch_size: int, drop_last: bool, limit: int | None) -> int:
    """Batches of one pass over ``n`` items."""
    nb = n // batch_size if drop_last else math.ceil(n / batch_size)
    return min(nb, limit) if limit is not None else nb


# ---------------------------------------------------------------------------
# contexts


@dataclass
class PhaseContext:
    """What a phase sees.

    :ivar stage: the stage name.
    :ivar phase: the phase's resolved recipe table.
    :ivar model: the student model (unwrapped).
    :ivar teacher: the frozen teacher, or ``None``.
    :ivar data: the stage's :class:`StageData`.
    :ivar device: the torch device.
    :ivar progress: the run's :class:`~kdtoolkit.progress.Progress`.
    :ivar seed: a seed derived for this phase.
    :ivar dist: the distributed context (rank, world size).
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

    def loader(self, split: str = "train_eval", batch_size: int | None = None, *, shard: bool = False) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Un-shuffled batches of ``split`` (``train``, ``train_eval``, ``test``).

        Every rank of a distributed run sees the whole split unless ``shard``.
        """
        ds = getattr(self.data, split)
        return batches(ds, batch_size or self.data.spec["eval_batch_size"], shuffle=False, seed=0,
                       num_workers=self.data.spec["num_workers"], dist=self.dist if shard else None)


def autocast(device: torch.device, precision: str):
    """Autocast context for ``bf16``/``fp16``; a no-op for ``fp32``."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


# ---------------------------------------------------------------------------
# evaluation


@torch.inference_mode()
def evaluate(model: Model, dataset: Any, *, batch_size: int, device: torch.device, record_keys: tuple[str, ...],
             meta: dict[str, Any], progress: Progress | None = None, dist: Dist | None = None,
             precision: str = "fp32", num_workers: int = 0) -> Records:
    """One forward pass over ``dataset``: the model's evaluation records."""
    model.eval()
    out: dict[str, list[torch.Tensor]] = {k: [] for k in ("logits", "labels", *record_keys)}
    grid = None
    n = len(dataset)
    task = progress.add(f"evaluate {meta.get('stage', '')}", total=num_batches(n, batch_size, False, None)) if progress else None
    for x, y in batches(dataset, batch_size, shuffle=False, seed=0, dist=dist, num_workers=num_workers):
        with autocast(device, precision):
            o = model(x.to(device))
        out["labels"].append(y.cpu())
        for k in ("logits", *record_keys):
            v = o[k].detach()
            out[k].append((v.float() if v.is_floating_point() else v).cpu())
        if grid is None and isinstance(o.get("features"), torch.Tensor):
            grid = tuple(o["features"].shape[-2:])
        if progress:
            progress.advance(task)
    if progress:
        progress.finish(task)
    tensors = {k: torch.cat(v) if v else torch.empty(0) for k, v in out.items()}
    if dist is not None and dist.world > 1:
        tensors = dist.gather_records(tensors, n, batch_size)
    meta = dict(meta)
    if grid is not None:
        meta["H"], meta["W"] = int(grid[0]), int(grid[1])
    meta["n"] = int(tensors["labels"].shape[0])
    return Records(tensors, meta)


def compute_metrics(stage: dict[str, Any], records: Records, reference: Records | None, plugins: PluginManager) -> dict[str, Any]:
    """All of the stage's metrics from records (one forward pass, any thresholds)."""
    result: dict[str, Any] = {}
    for spec in stage["metrics"]:
        spec = dict(spec)
        comp = plugins.registry("metric").get(spec.pop("name"))
        metric = comp.factory(**spec)
        ref = reference
        if ref is None and comp.attr("requires_reference", False):
            ref = records  # a model against itself (e.g. a teacher: AJS 1 wherever it has active patches)
        result.update(metric(records, ref))
    return result


# ---------------------------------------------------------------------------
# the run


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

    def __init__(self, recipe: Recipe, options: RunOptions, plugins: PluginManager, progress: Progress, dist: Dist | None = None):
        self.recipe = recipe
        self.opt = options
        self.plugins = plugins
        self.progress = progress
        self.dist = dist or Dist.from_env()
        self.out = Path(options.out)
        self.device = self.dist.device(resolve_device(options.device or recipe.resolved["device"]))
        self.precision = recipe.resolved["precision"]
        self.channels_last = bool(recipe.resolved.get("channels_last", False))
        if self.precision == "fp16" and self.device.type == "cpu":
            raise KdtError("precision 'fp16' needs a GPU; use bf16 or fp32 on the CPU", source=str(recipe.path), key="precision")
        self.interrupted = False
        self._records: dict[str, Records] = {}
        self._data: dict[str, StageData] = {}
        self._teacher_cache: TeacherCache | None = None
        self._teacher_cache_user: str | None = None
        self._file_hashes: dict[tuple, str] = {}

    # -- preflight --------------------------------------------------------
    def preflight(self) -> None:
        """Checks done before any training: output directory, stale or unreadable
        stage files, datasets, free disk space; last, the output directory is
        created and a probe file written in it (so an unwritable directory is
        a one-line error, for root and on read-only filesystems too)."""
        out = self.out
        if out.exists() and not out.is_dir():
            raise KdtError("output path exists and is not a directory", source=str(out))
        probe_dir = out if out.exists() else next((p for p in out.parents if p.exists()), Path("."))
        if not probe_dir.is_dir():
            raise KdtError(f"cannot create the output directory: {probe_dir} is not a directory", source=str(out))
        if not os.access(probe_dir, os.W_OK):
            raise KdtError("output directory is not writable", source=str(out))
        for name in self.recipe.order:
            sdir = out / name
            for fname in ("result.json", "checkpoint.safetensors"):
                f = sdir / fname
                if not f.exists():
                    continue
                found, problem = self._stored_hash(f)
                if self.opt.force or found == self.recipe.stage_hash(name):
                    continue
                if problem is not None:
                    raise KdtError(
                        f"stage '{name}': cannot resume from this file ({problem}); delete it to train the stage "
                        "again, or use --force", source=str(f))
                raise KdtError(
                    f"stage '{name}' in this directory was produced by a different recipe (stage hash {found} != "
                    f"{self.recipe.stage_hash(name)}); use --force to retrain it, or another --out",
                    source=str(f),
                )
        for name in self.recipe.order:
            self.data_for(name)
        try:
            out.mkdir(parents=True, exist_ok=True)
            fd, probe = tempfile.mkstemp(prefix=".kdt-write-probe.", suffix=".tmp", dir=out)
            os.close(fd)
            os.unlink(probe)
        except OSError as exc:
            raise KdtError(f"output directory is not writable ({exc.strerror or type(exc).__name__})", source=str(out)) from None
        try:
            usage = __import__("shutil").disk_usage(out)
        except OSError:
            usage = None
        if usage is not None and usage.total > 0 and usage.free < 50 * 2**20:
            raise KdtError(f"only {usage.free // 2**20} MiB free on the output disk", source=str(out))

    def data_for(self, name: str) -> StageData:
        """The stage's datasets, built once per distinct data table.

        Built during preflight for every stage, so a bad dataset (missing
        folder, unreadable image list, bad parameter) stops the run before
        anything is trained or written.
        """
        spec = self.recipe.stage(name)["data"]
        key = json.dumps(spec, sort_keys=True)
        if key not in self._data:
            try:
                self._data[key] = build_data(self.recipe.stage(name), self.plugins)
            except KdtError as exc:
                where = f"stages.{name}.data" + (f".{exc.key}" if exc.key else "")
                src = f"{self.recipe.path}: {where}: {exc.source}" if exc.source else str(self.recipe.path)
                raise type(exc)(exc.message, source=src, key=None if exc.source else where) from None
        return self._data[key]

    @staticmethod
    def _stored_hash(path: Path) -> tuple[str | None, str | None]:
        """``(stage hash, None)`` stored in a ``result.json`` or checkpoint, or ``(None, why it is unreadable)``."""
        try:
            if path.suffix == ".json":
                found = json.loads(path.read_text(encoding="utf-8")).get("stage_hash")
            else:
                found = load_checkpoint(path).stage_hash
        except KdtError as exc:
            return None, exc.message
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError) as exc:
            return None, f"unreadable: {type(exc).__name__}"
        return found, None

    def stop_requested(self) -> bool:
        """Whether Ctrl-C was pressed (on any rank: all ranks get the same answer)."""
        return self.dist.any(self.interrupted, self.device if self.device.type == "cuda" else None)

    def check_interrupt(self, message: str) -> None:
        """Raise :class:`Interrupted` with ``message`` when Ctrl-C was pressed."""
        if self.stop_requested():
            raise Interrupted(message)

    # -- main -------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        self.preflight()
        if self.dist.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            remove_stale_temps(self.out)
            atomic_write_text(self.out / "recipe.resolved.toml", self.recipe.to_toml())
            atomic_write_json(self.out / "run.json", {
                "recipe": str(self.recipe.path),
                "name": self.recipe.resolved["name"],
                "seed": self.recipe.resolved["seed"],
                "device": str(self.device),
                "world_size": self.dist.world,
                "precision": self.precision,
                "versions": versions(self.plugins),
                "command": self.opt.command,
                "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "stage_hashes": {s: self.recipe.stage_hash(s) for s in self.recipe.order},
            })
        self.dist.barrier()
        results: dict[str, Any] = {"name": self.recipe.resolved["name"], "stages": {}}
        for name in self.recipe.order:
            results["stages"][name] = self.run_stage(name)
            self.dist.barrier()  # every rank sees the stage's files before the next stage reads them
        if self.dist.is_main:
            write_reports(self.out, results, self.recipe.resolved, self.plugins)
            self.plugins.call("kdt_after_run", run_dir=self.out, results=results)
        self.dist.barrier()
        return results

    def stage_dir(self, name: str) -> Path:
        return self.out / name

    def run_stage(self, name: str) -> dict[str, Any]:
        st = self.recipe.stage(name)
        sdir = self.stage_dir(name)
        shash = self.recipe.stage_hash(name)
        result_file = sdir / "result.json"
        if result_file.exists() and (sdir / "model.safetensors").exists():
            try:
                res = json.loads(result_file.read_text())
            except (OSError, json.JSONDecodeError):
                res = {}
            if res.get("stage_hash") == shash:
                if self.dist.is_main and (sdir / "checkpoint.safetensors").exists():
                    (sdir / "checkpoint.safetensors").unlink()  # killed after result.json was written
                self.progress.log(f"stage [bold]{name}[/]: already complete in {sdir}, reused")
                return res
        self.check_interrupt(f"interrupted before stage '{name}' started; run the same command again to go on")
        if self.opt.force and self.dist.is_main:
            # --force: results of a different recipe are retrained (stages whose hash still matches are reused)
            for f in ("result.json", "checkpoint.safetensors"):
                if (sdir / f).exists() and self._stored_hash(sdir / f)[0] != shash:
                    (sdir / f).unlink()
        self.dist.barrier()

        data = self.data_for(name)
        torch.manual_seed(st["seed"])
        model = self.placed(build_model(st, data.num_classes, self.plugins))
        teacher = self._teacher(st, data) if st["teacher"] else None
        if teacher is not None and st["model"]["init_from_teacher"]:
            self._init_from_teacher(name, model, teacher, st["model"]["init_from_teacher"])
        # Check every phase's parameter selectors against the built model now,
        # before anything of this stage is written.
        for i, ph in enumerate(st["phases"]):
            if ph["kind"] == "train":
                for g, grp in enumerate(ph["groups"]):
                    if not select_parameters(model, grp["params"]):
                        raise RecipeError(f"selects no parameter of this model ({', '.join(grp['params'])})",
                                          source=str(self.recipe.path), key=f"stages.{name}.phases[{i}].groups[{g}].params")

        trainer = StageTrainer(self, name, st, model, teacher, data, shash)
        # Losses that depend on both models (e.g. matching prototype counts) check them now.
        for i, l in enumerate(st["losses"]):
            check = getattr(trainer.losses[l["id"]], "check_models", None)
            if check is not None and l["weight"] != 0:
                try:
                    check(model, teacher)
                except ValueError as exc:
                    raise RecipeError(str(exc), source=str(self.recipe.path), key=f"stages.{name}.losses[{i}]") from None
        if self.dist.is_main:
            sdir.mkdir(parents=True, exist_ok=True)
            remove_stale_temps(sdir)
        t0 = time.perf_counter()
        history, flags = trainer.train()
        train_seconds = time.perf_counter() - t0 + trainer.previous_seconds
        self.release_teacher_cache(name)
        self.check_interrupt(f"interrupted: stage '{name}' is trained and its checkpoint {trainer.ckpt_path} kept; "
                             "run the same command again to evaluate it and go on")

        meta = {"stage": name, "dataset": data.test.name if hasattr(data.test, "name") else st["data"]["dataset"],
                "num_classes": data.num_classes, "stage_hash": shash}
        if self.dist.is_main:
            atomic_save_safetensors(model_state(model), sdir / "model.safetensors", {
                "format": MODEL_FORMAT,
                **{k: json.dumps(v) for k, v in {
                    "stage": name, "stage_hash": shash, "recipe": str(self.recipe.path),
                    "epochs": sum(h.get("epochs", 0) for h in history), "history": history, "flags": flags,
                    "num_classes": data.num_classes, "model": st["model"], "versions": versions(self.plugins),
                }.items()},
            })
        records = self.evaluate_stage(name, st, model, data, meta)
        reference_name = st["teacher"] or st["compare_to"]
        reference = self.records_of(reference_name) if reference_name else None
        metrics = compute_metrics(st, records, reference, self.plugins)
        result = {
            "description": st["description"],
            "teacher": st["teacher"],
            "compare_to": st["compare_to"],
            "reference": reference_name or "self",
            **metrics,
            "flags": flags,
            "losses": {l["id"]: l["weight"] for l in st["losses"]},
            "loss_names": {l["id"]: l["name"] for l in st["losses"]},
            "history": history,
            "num_parameters": sum(p.numel() for p in model.parameters()),
            "train_seconds": round(train_seconds, 2),
            "test_images": records.n,
            "stage_hash": shash,
        }
        if self.dist.is_main:
            atomic_write_json(sdir / "result.json", result)
            ck = sdir / "checkpoint.safetensors"
            if ck.exists():
                ck.unlink()
        if self.dist.is_main:
            self.plugins.call("kdt_after_stage", stage=name, result=result, stage_dir=sdir)
        self.progress.log(f"stage [bold]{name}[/]: accuracy {result.get('accuracy', float('nan')):.4f} ({train_seconds:.1f} s)")
        return result

    def evaluate_stage(self, name: str, st: dict[str, Any], model: Model, data: StageData, meta: dict[str, Any]) -> Records:
        head_cls = self.plugins.registry("head").get(st["model"]["head"]["name"])
        records = evaluate(model, data.test, batch_size=st["data"]["eval_batch_size"], device=self.device,
                           record_keys=tuple(head_cls.attr("record_keys", ())), meta=meta, progress=self.progress,
                           dist=self.dist, precision=self.precision, num_workers=st["data"]["num_workers"])
        if self.dist.is_main:
            records.save(self.stage_dir(name) / "records.safetensors")
        self._records[name] = records
        return records

    def records_of(self, name: str) -> Records:
        if name not in self._records:
            self._records[name] = Records.load(self.stage_dir(name) / "records.safetensors")
        return self._records[name]

    def placed(self, model: nn.Module) -> nn.Module:
        """``model`` on the run's device; with ``channels_last = true`` its 4-D weights in channels-last layout."""
        if self.channels_last:
            return model.to(self.device, memory_format=torch.channels_last)
        return model.to(self.device)

    def teacher_cache(self, name: str, st: dict[str, Any], teacher: Model, data: StageData,
                      needs: set[str] | None) -> TeacherCache:
        """The teacher's outputs ``needs`` for every training image of stage ``name``
        (``teacher_cache = "memory"`` or ``"disk"``; see :mod:`kdtoolkit.teachercache`).

        The last cache built stays in memory while a later stage may use it
        (e.g. ablations sharing a teacher and data). With ``disk`` the file in
        the teacher's stage directory is read, or written by rank 0.
        """
        tname = st["teacher"]
        tdir = self.stage_dir(tname)
        vers = versions(self.plugins)
        key = teachercache.cache_key(self._teacher_file_id(tname, tdir / "model.safetensors"), st["data"],
                                     self.precision, needs, self.dist.world, vers)
        path = tdir / f"teacher-cache-{key}.safetensors"
        meta = {"teacher": tname, "teacher_stage_hash": self.recipe.stage_hash(tname), "data": st["data"],
                "precision": self.precision, "world_size": self.dist.world, "versions": vers}
        disk = st["teacher_cache"] == "disk"
        if self._teacher_cache is not None and self._teacher_cache.key == key:
            if self._teacher_cache_user != name:
                self._teacher_cache_user = name
                self.progress.log(f"stage [bold]{name}[/]: teacher outputs from the cache built for an earlier stage "
                                  f"({teachercache.describe(self._teacher_cache)})")
                if disk:
                    if self.dist.is_main and not path.is_file():
                        self._save_cache(name, path, self._teacher_cache, meta)
                    self.dist.barrier()  # every rank, whatever it sees on disk
            return self._teacher_cache
        self._teacher_cache = None  # free the previous one before building another
        n = len(data.train)
        cache = None
        if disk:
            cache, why = teachercache.load(path, key, n, needs)
            if self.dist.any(cache is None):
                if cache is None and path.exists():
                    self.progress.log(f"stage [bold]{name}[/]: teacher cache {path} {why}; computing it again")
                cache = None
            else:
                self.progress.log(f"stage [bold]{name}[/]: teacher outputs read from {path.name} ({teachercache.describe(cache)})")
        if cache is None:
            t0 = time.perf_counter()
            ebs = data.spec["eval_batch_size"]
            task = self.progress.add(f"{name} · teacher cache", total=num_batches(n, ebs, False, None))
            it = batches(data.train, ebs, shuffle=False, seed=0, num_workers=data.spec["num_workers"], dist=self.dist)
            try:
                tensors = teachercache.compute(teacher, it, keys=needs, device=self.device,
                                               autocast=lambda: autocast(self.device, self.precision),
                                               progress=self.progress, task=task)
            except KeyError as exc:
                raise TrainingError(f"stage '{name}': the teacher ('{tname}') does not produce output {exc}, "
                                    "which a loss of this stage reads") from None
            self.progress.finish(task)
            if self.dist.world > 1:
                tensors = self.dist.gather_records(tensors, n, ebs)
            cache = TeacherCache(tensors, key)
            self.progress.log(f"stage [bold]{name}[/]: teacher outputs cached {'on disk' if disk else 'in memory'} "
                              f"({teachercache.describe(cache, time.perf_counter() - t0)})")
            if disk:
                if self.dist.is_main:
                    self._save_cache(name, path, cache, meta)
                self.dist.barrier()
        self._teacher_cache, self._teacher_cache_user = cache, name
        return cache

    def release_teacher_cache(self, after: str) -> None:
        """Drop the cache held in memory unless a stage after ``after`` may use it (same teacher, a cache on)."""
        if self._teacher_cache is None:
            return
        later = self.recipe.order[self.recipe.order.index(after) + 1 :] if after in self.recipe.order else []
        teacher = self.recipe.stage(after).get("teacher")
        if not any(self.recipe.stage(s).get("teacher") == teacher and self.recipe.stage(s)["teacher_cache"] != "off"
                   for s in later):
            self._teacher_cache = self._teacher_cache_user = None

    def _teacher_file_id(self, tname: str, path: Path) -> str:
        """What identifies the teacher's weights: its stage hash and a hash of its
        ``model.safetensors`` (hashed once per file version, not every phase)."""
        stat = path.stat() if path.is_file() else None
        ident = (str(path), stat.st_size, stat.st_mtime_ns) if stat else (str(path), None, None)
        if self._file_hashes.get(ident) is None:
            h = hashlib.sha256()
            if stat:
                with open(path, "rb") as fh:
                    for block in iter(lambda: fh.read(1 << 20), b""):
                        h.update(block)
            self._file_hashes[ident] = h.hexdigest()
        return f"{self.recipe.stage_hash(tname)}:{self._file_hashes[ident]}"

    def _save_cache(self, name: str, path: Path, cache: TeacherCache, meta: dict[str, Any]) -> None:
        """Write a teacher cache file; a full or read-only disk leaves the run going with the cache in memory."""
        try:
            remove_stale_temps(path.parent)  # of an earlier writer that was killed
            teachercache.save(path, cache, meta)
        except OSError as exc:
            self.progress.log(f"stage [bold]{name}[/]: could not write the teacher cache {path} "
                              f"({exc.strerror or type(exc).__name__}); going on with it in memory")

    def _teacher(self, st: dict[str, Any], data: StageData) -> Model:
        tname = st["teacher"]
        tst = self.recipe.stage(tname)
        teacher = build_model(tst, data.num_classes, self.plugins)
        path = self.stage_dir(tname) / "model.safetensors"
        state, _ = load_model_file(path)
        load_state_strict(teacher, state, str(path))
        self.placed(teacher).eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
        return teacher

    def _init_from_teacher(self, name: str, model: Model, teacher: Model, selectors: list[str]) -> None:
        tstate = teacher.state_dict()
        sstate = model.state_dict()
        copied = 0
        for k in sstate:
            if any(k == s or k.startswith(s + ".") for s in selectors):
                if k not in tstate or tstate[k].shape != sstate[k].shape:
                    raise RecipeError(
                        f"cannot copy '{k}' from the teacher: shapes {tuple(tstate[k].shape) if k in tstate else 'absent'} vs {tuple(sstate[k].shape)}",
                        source=str(self.recipe.path), key=f"stages.{name}.model.init_from_teacher")
                sstate[k] = tstate[k].detach().clone()
                copied += 1
        if not copied:
            raise RecipeError("selects no parameter of the model", source=str(self.recipe.path), key=f"stages.{name}.model.init_from_teacher")
        model.load_state_dict(sstate)


# ---------------------------------------------------------------------------
# one stage's phases


def _overlaps(a: str, b: str) -> bool:
    return a == b or a.startswith(b + ".") or b.startswith(a + ".")


class StageTrainer:
    """Runs the phases of one stage, with checkpoints and exact resume."""

    def __init__(self, runner: Runner, name: str, st: dict[str, Any], model: Model, teacher: Model | None, data: StageData, shash: str):
        self.r = runner
        self.name = name
        self.st = st
        self.model = model
        self.teacher = teacher
        self.data = data
        self.shash = shash
        self.sdir = runner.stage_dir(name)
        self.ckpt_path = self.sdir / "checkpoint.safetensors"
        self.metrics_path = self.sdir / "metrics.jsonl"
        self.loss_specs = {l["id"]: l for l in st["losses"]}
        self.losses = {}
        for l in st["losses"]:
            params = {k: v for k, v in l.items() if k not in ("name", "id", "weight")}
            self.losses[l["id"]] = runner.plugins.registry("loss").get(l["name"]).factory(**params)
        self.previous_seconds = 0.0
        self.history: list[dict[str, Any]] = []
        self.cached = False
        self.flags: dict[str, Any] = {}
        self.watch: dict[str, str] = {}

    # -- checkpoints --------------------------------------------------------
    def save(self, phase_idx: int, epoch: int, batch: int, optimizer=None, scheduler=None, scaler=None, rng: bool = False,
             running: dict[str, Any] | None = None) -> None:
        """Write the checkpoint (rank 0). With ``rng`` (a mid-epoch checkpoint) every
        rank must call it: the RNG states of all ranks are gathered."""
        rng_states = self.r.dist.gather_rng() if rng else None
        if not self.r.dist.is_main:
            return
        rng_cuda = None
        if rng and self.r.device.type == "cuda":
            rng_cuda = torch.cuda.get_rng_state(self.r.device)
        ck = Checkpoint(
            stage=self.name, stage_hash=self.shash, phase=phase_idx, epoch=epoch, batch=batch,
            model=model_state(self.model), optimizer=optimizer.state_dict() if optimizer else None,
            scheduler=scheduler.state_dict() if scheduler else None, scaler=scaler.state_dict() if scaler else None,
            rng=rng_states, history=self.history, flags=self.flags, watch=self.watch,
            seconds=self.previous_seconds + time.perf_counter() - self.t0,
            rng_cuda=rng_cuda, running=running,
            metrics_bytes=self.metrics_path.stat().st_size if self.metrics_path.exists() else 0,
        )
        save_checkpoint(self.ckpt_path, ck)

    def _metrics_line(self, obj: dict[str, Any]) -> None:
        """Append one line to ``metrics.jsonl`` (rank 0), flushed to disk before the next checkpoint."""
        if self.r.dist.is_main:
            with open(self.metrics_path, "a", encoding="utf-8") as fh:
                fh.write(json.dumps(obj) + "\n")
                fh.flush()
                os.fsync(fh.fileno())

    def _restore_metrics(self, ck: Checkpoint) -> None:
        """Cut ``metrics.jsonl`` back to its length when ``ck`` was written: the
        lines of epochs (and phases) about to be redone are written again."""
        if not self.r.dist.is_main or ck.metrics_bytes is None or not self.metrics_path.exists():
            return
        if self.metrics_path.stat().st_size > ck.metrics_bytes:
            with open(self.metrics_path, "r+b") as fh:
                fh.truncate(ck.metrics_bytes)
                fh.flush()
                os.fsync(fh.fileno())

    def _bad_checkpoint(self, exc: Exception) -> CheckpointError:
        return CheckpointError(f"does not fit this stage ({type(exc).__name__}: {' '.join(str(exc).split())[:160]}); "
                               "delete it to train the stage again", source=str(self.ckpt_path))

    # -- main loop ------------------------------------------------------------
    def train(self) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        self.t0 = time.perf_counter()
        start = None
        if self.ckpt_path.exists():
            start = load_checkpoint(self.ckpt_path)
            if start.stage_hash != self.shash:
                start = None  # preflight already refused unless --force
            else:
                load_state_strict(self.model, start.model, str(self.ckpt_path))
                self.model.to(self.r.device)
                self.history, self.flags, self.watch = list(start.history), dict(start.flags), dict(start.watch)
                self.previous_seconds = start.seconds
                self._restore_metrics(start)
                where = (f"phase {start.phase + 1}, epoch {start.epoch + 1}, batch {start.batch}"
                         if start.phase < len(self.st["phases"]) else "every phase done")
                self.r.progress.log(f"stage [bold]{self.name}[/]: resuming from {self.ckpt_path.name} ({where})")
        if start is None and self.r.dist.is_main and self.metrics_path.exists():
            self.metrics_path.unlink()
        for i, ph in enumerate(self.st["phases"]):
            if start is not None and i < start.phase:
                continue
            resume = start if start is not None and i == start.phase else None
            if ph["kind"] == "train":
                entry = self.train_phase(i, ph, resume)
            else:
                entry = self.plugin_phase(i, ph)
            if entry is not None:
                self.history.append(entry)
            self.save(i + 1, 0, 0)
            if i + 1 < len(self.st["phases"]):
                self.r.check_interrupt(f"interrupted: checkpoint saved in {self.ckpt_path} (after phase '{ph['name']}'); "
                                       "run the same command again to resume")
        return self.history, self.flags

    def plugin_phase(self, i: int, ph: dict[str, Any]) -> dict[str, Any]:
        comp = self.r.plugins.registry("phase").get(ph["kind"])
        params = {k: v for k, v in ph.items() if k not in ("name", "kind")}
        phase = comp.factory(**params)
        ctx = PhaseContext(self.name, ph, self.model, self.teacher, self.data, self.r.device, self.r.progress,
                           derive_seed(self.st["seed"], i), self.r.dist, self.r.precision, self.sdir)
        self.model.eval()
        torch.manual_seed(ctx.seed)  # the same RNG state whether or not the run resumed just before this phase
        out = phase.run(ctx) or {}
        for flag, value in (out.get("flags") or {}).items():
            self.flags[flag] = value
        for flag, sel in (out.get("watch") or {}).items():
            self.watch[flag] = sel
        entry = {"name": ph["name"], "kind": ph["kind"], **{k: v for k, v in out.items() if k not in ("flags", "watch")}}
        self._metrics_line({"stage": self.name, "phase": ph["name"], "kind": ph["kind"], **entry})
        return entry

    def _loss_terms(self, step: Step, active: list[str], ph: dict[str, Any]) -> dict[str, torch.Tensor]:
        terms = {}
        for lid in active:
            try:
                terms[lid] = self.losses[lid](step)
            except (ValueError, TypeError) as exc:
                hint = ""
                if isinstance(exc, TypeError) and step.teacher_outputs is None and self.teacher is not None:
                    hint = ("; the teacher was not run in this phase because no loss declares teacher outputs it reads "
                            "(requires_teacher_outputs)")
                raise TrainingError(f"stage '{self.name}', phase '{ph['name']}': loss '{lid}' cannot be computed: {exc}{hint}") from None
            except KeyError as exc:
                hint = (" (the teacher cache holds only the outputs the losses declare in requires_teacher_outputs)"
                        if self.cached else "")
                raise TrainingError(f"stage '{self.name}', phase '{ph['name']}': loss '{lid}' reads output {exc} "
                                    f"that the model does not produce{hint}") from None
        return terms

    def _selected_losses(self, ph: dict[str, Any]) -> list[str]:
        return [lid for lid in ph["losses"] if self.loss_specs[lid]["weight"] != 0]

    def train_phase(self, i: int, ph: dict[str, Any], resume: Checkpoint | None) -> dict[str, Any] | None:
        active = self._selected_losses(ph)
        if not active or ph["epochs"] == 0:
            why = "no loss with a non-zero weight" if not active else "epochs = 0"
            self.r.progress.log(f"stage [bold]{self.name}[/]: phase '{ph['name']}' skipped ({why})")
            return {"name": ph["name"], "kind": "train", "epochs": 0, "skipped": why}
        selectors = [s for g in ph["groups"] for s in g["params"]]
        # a phase training a watched parameter invalidates the flag (e.g. prototypes moved after a push)
        for flag, sel in list(self.watch.items()):
            if any(_overlaps(sel, s) for s in selectors):
                self.flags[flag] = False
        trainable: set[int] = set()
        groups = []
        for g in ph["groups"]:
            params = [p for _, p in select_parameters(self.model, g["params"]) if id(p) not in trainable]
            trainable.update(id(p) for p in params)
            groups.append({"params": params, "lr": g["lr"], "weight_decay": g["weight_decay"]})
        for p in self.model.parameters():
            p.requires_grad_(id(p) in trainable)
        dist = self.r.dist
        model = dist.wrap(self.model)
        opt = make_optimizer(ph["optimizer"], groups)
        sched = make_scheduler(ph["scheduler"], opt, ph["epochs"])
        scaler = torch.amp.GradScaler(self.r.device.type) if self.r.precision == "fp16" else None
        start_epoch, start_batch = 0, 0
        if resume is not None:
            start_epoch, start_batch = resume.epoch, resume.batch
            try:
                if resume.optimizer is not None:
                    opt.load_state_dict(resume.optimizer)
                if resume.scheduler is not None and sched is not None:
                    sched.load_state_dict(resume.scheduler)
                if resume.scaler is not None and scaler is not None:
                    scaler.load_state_dict(resume.scaler)
            except (ValueError, KeyError, TypeError, RuntimeError, IndexError) as exc:
                raise self._bad_checkpoint(exc) from None
        needs = needed_outputs(self.losses[lid] for lid in active) if self.teacher is not None else set()
        run_teacher = needs != set()  # no forward pass when the losses read only the teacher's parameters
        cache = self.r.teacher_cache(self.name, self.st, self.teacher, self.data, needs) \
            if run_teacher and self.st["teacher_cache"] != "off" else None
        self.cached = cache is not None
        spec = self.data.spec
        accumulate = ph["accumulate"]
        seed = self.st["seed"]
        n = len(self.data.train)

        def plan_of(epoch: int) -> list[list[int]]:
            return batch_plan(n, spec["batch_size"], shuffle=True, seed=derive_seed(seed, i, epoch, 2),
                              drop_last=spec["drop_last"], limit=ph["limit_batches"], world=dist.world)

        nb = len(plan_of(start_epoch))
        task = self.r.progress.add(f"{self.name} · {ph['name']}", total=ph["epochs"] * nb, completed=start_epoch * nb + start_batch)
        every = self.r.recipe.resolved["checkpoint_every"]
        for epoch in range(start_epoch, ph["epochs"]):
            first = epoch == start_epoch and resume is not None and start_batch > 0
            running = (resume.running or {}) if first else {}
            rng = resume.rng_for(dist.rank, dist.world) if first else None
            if rng is not None:
                try:
                    torch.set_rng_state(rng)
                    if resume.rng_cuda is not None and self.r.device.type == "cuda":
                        torch.cuda.set_rng_state(resume.rng_cuda, self.r.device)
                except (RuntimeError, TypeError) as exc:
                    raise self._bad_checkpoint(exc) from None
            else:
                torch.manual_seed(derive_seed(seed, i, epoch, 1))
            model.train()
            sums: dict[str, float] = dict(running.get("sums") or {})
            count = int(running.get("count", 0))
            correct = int(running.get("correct", 0))
            seen = int(running.get("seen", 0))
            b = start_batch if first else 0
            plan = plan_of(epoch)
            nb = len(plan)
            it = batches(self.data.train, spec["batch_size"], shuffle=True, seed=derive_seed(seed, i, epoch, 2),
                         start=b, num_workers=spec["num_workers"], dist=dist, plan=plan)
            opt.zero_grad(set_to_none=True)
            stop = False
            for x, y in it:
                x, y = x.to(self.r.device, non_blocking=True), y.to(self.r.device, non_blocking=True)
                if self.r.channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                n_global, n_local = len(plan[b]), int(y.shape[0])
                with autocast(self.r.device, self.r.precision):
                    outputs = model(x)
                    t_out = None
                    if cache is not None:
                        t_out = cache.batch(plan[b] if dist.world == 1 else plan[b][dist.rank :: dist.world], self.r.device)
                    elif run_teacher:
                        with torch.no_grad():
                            t_out = self.teacher(x)
                    step = Step(x, y, outputs, self.model, t_out, self.teacher)
                    terms = self._loss_terms(step, active, ph)
                    total = sum(self.loss_specs[lid]["weight"] * v.float() for lid, v in terms.items())
                values = {lid: float(v.detach()) for lid, v in terms.items()}
                tval = float(total.detach())
                with torch.no_grad():
                    batch_correct = int((outputs["logits"].argmax(1) == y).sum())
                stop = stop or self.r.interrupted
                if dist.world > 1:
                    # One small all-reduce per step: every rank logs the global batch's
                    # loss values and accuracy, sees a non-finite loss on any rank and
                    # stops at the same step after a Ctrl-C on any rank.
                    shared = torch.tensor([tval * n_local, *(v * n_local for v in values.values()), batch_correct,
                                           1.0 if stop else 0.0], dtype=torch.float64,
                                          device=self.r.device if self.r.device.type == "cuda" else "cpu")
                    dist.all_reduce_sum(shared)
                    tval = shared[0].item() / n_global
                    values = {k: shared[1 + j].item() / n_global for j, k in enumerate(values)}
                    batch_correct = int(shared[-2].item())
                    stop = shared[-1].item() > 0
                if not math.isfinite(tval):
                    raise TrainingError(
                        f"non-finite loss in stage '{self.name}', phase '{ph['name']}', epoch {epoch + 1}, step {b + 1}: total {tval}; "
                        + ", ".join(f"{k} = {v}" for k, v in values.items())
                        + f" (last good checkpoint kept: {self.ckpt_path if self.ckpt_path.exists() else 'none yet'})")
                if not total.requires_grad:
                    raise TrainingError(f"stage '{self.name}', phase '{ph['name']}': the losses {', '.join(active)} do not depend on the trained parameters")
                loss = total
                if n_local * dist.world != n_global:
                    loss = loss * (n_local * dist.world / n_global)  # DDP averages over ranks: weight by this rank's share
                loss = loss / accumulate
                if scaler is not None:
                    scaler.scale(loss).backward()
                else:
                    loss.backward()
                stepped = (b + 1) % accumulate == 0 or b + 1 == nb
                if stepped:
                    if ph["clip_grad_norm"]:
                        if scaler is not None:
                            scaler.unscale_(opt)
                        torch.nn.utils.clip_grad_norm_([p for g in groups for p in g["params"]], ph["clip_grad_norm"])
                    if scaler is not None:
                        scaler.step(opt)
                        scaler.update()
                    else:
                        opt.step()
                    opt.zero_grad(set_to_none=True)
                for k, v in values.items():
                    sums[k] = sums.get(k, 0.0) + v
                sums["total"] = sums.get("total", 0.0) + tval
                count += 1
                correct += batch_correct
                seen += n_global
                b += 1
                self.r.progress.advance(task, loss=tval, epoch=f"{epoch + 1}/{ph['epochs']}")
                if stop and stepped:  # never with gradients half accumulated
                    self.save(i, epoch, b, opt, sched, scaler, rng=True,
                              running={"sums": sums, "count": count, "correct": correct, "seen": seen})
                    raise Interrupted(f"interrupted: checkpoint saved in {self.ckpt_path} (phase '{ph['name']}', "
                                      f"epoch {epoch + 1}, batch {b}); run the same command again to resume")
            if sched is not None:
                sched.step()
            line = {"stage": self.name, "phase": ph["name"], "epoch": epoch + 1,
                    **{f"loss/{k}": v / max(count, 1) for k, v in sums.items()},
                    "train_accuracy": correct / max(seen, 1),
                    "lr": [g["lr"] for g in opt.param_groups]}
            self._metrics_line(line)
            if dist.is_main:  # observers run where files are written
                self.r.plugins.call("kdt_after_epoch", stage=self.name, phase=ph["name"], epoch=epoch + 1, metrics=line)
            if every and (epoch + 1) % every == 0 and epoch + 1 < ph["epochs"]:
                self.save(i, epoch + 1, 0, opt, sched, scaler)
        self.r.progress.finish(task)
        for p in self.model.parameters():
            p.requires_grad_(True)
        return {"name": ph["name"], "kind": "train", "epochs": ph["epochs"], "trained": selectors, "losses": active}


def make_optimizer(spec: dict[str, Any], groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
    """The phase's optimiser over its parameter groups."""
    name = spec["name"]
    if name == "adam":
        return torch.optim.Adam(groups, betas=tuple(spec["betas"]), eps=spec["eps"])
    if name == "adamw":
        return torch.optim.AdamW(groups, betas=tuple(spec["betas"]), eps=spec["eps"])
    return torch.optim.SGD(groups, lr=groups[0]["lr"], momentum=spec["momentum"], nesterov=spec["nesterov"])


def make_scheduler(spec: dict[str, Any], opt: torch.optim.Optimizer, epochs: int):
    """The phase's learning-rate schedule, stepped once per epoch (or ``None``)."""
    name = spec["name"]
    if name == "step":
        return torch.optim.lr_scheduler.StepLR(opt, step_size=spec["step_size"], gamma=spec["gamma"])
    if name == "multistep":
        return torch.optim.lr_scheduler.MultiStepLR(opt, milestones=spec["milestones"], gamma=spec["gamma"])
    if name == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(epochs, 1), eta_min=spec["min_lr"])
    if name == "exponential":
        return torch.optim.lr_scheduler.ExponentialLR(opt, gamma=spec["gamma"])
    return None


def run_recipe(recipe: Recipe, options: RunOptions, plugins: PluginManager, progress: Progress,
               dist: Dist | None = None) -> dict[str, Any]:
    """Run every stage of ``recipe`` into ``options.out``.

    SIGINT (Ctrl-C) writes a checkpoint at the current step (or, outside a
    train phase, at the next phase or stage boundary) and raises
    :class:`Interrupted`; a second Ctrl-C exits at once with code 130.
    """
    runner = Runner(recipe, options, plugins, progress, dist)
    previous = None

    def on_sigint(signum, frame):  # pragma: no cover - exercised through a subprocess test
        if runner.interrupted:
            os._exit(130)
        runner.interrupted = True
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
