"""The preflight of a run: every check done before any stage trains.

:class:`Preflight` is what :meth:`kdtoolkit.engine.runner.Runner.preflight`
runs: the output directory, stale or unreadable stage files
(:func:`stored_hash`), the datasets, the tap paths, the dry build of every
component a stage will build (on the meta device where it can, the run's
random streams left as they were: :func:`isolated_rng`), then a probe file
in the output directory and the free disk space. A bad recipe, dataset or
plugin stops the run here, with one line, before anything is trained or
written.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any
from collections.abc import Callable, Iterator

import torch

from kdtoolkit.foundation.checkpoint import load_checkpoint
from kdtoolkit.foundation.errors import KdtError, PluginError
from kdtoolkit.plugin.instantiation import build_component
from kdtoolkit.engine.losses import LossSet
from kdtoolkit.engine.models import build_model
from kdtoolkit.results.rundir_files import load_json, trained_spec
from kdtoolkit.engine.taps import check_tap_paths

if TYPE_CHECKING:
    from kdtoolkit.recipe.loader import Recipe
    from kdtoolkit.engine.context import RunContext
    from kdtoolkit.engine.data import StageData


@contextlib.contextmanager
def isolated_rng() -> Iterator[None]:
    """Within the block, draws from torch's CPU generator, Python's :mod:`random` and numpy's
    global generator are undone on leaving it: the preflight's dry build leaves the run's random
    streams exactly as they were (a run is bit-identical with and without it)."""
    py_state = random.getstate()
    np_random = getattr(sys.modules.get("numpy"), "random", None)
    np_state = np_random.get_state() if np_random is not None else None
    try:
        with torch.random.fork_rng(devices=[]):
            yield
    finally:
        random.setstate(py_state)
        if np_random is not None and np_state is not None:  # np_state is set exactly when np_random is
            np_random.set_state(np_state)


def stored_hash(path: Path) -> tuple[str | None, str | None]:
    """``(stage hash, None)`` stored in a ``result.json`` or checkpoint, or ``(None, why it is unreadable)``."""
    try:
        if path.suffix == ".json":
            found = load_json(path).get("stage_hash")
        else:
            found = load_checkpoint(path).stage_hash
    except KdtError as exc:
        return None, exc.message
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError) as exc:
        return None, f"unreadable: {type(exc).__name__}"
    except RecursionError:
        return None, "unreadable: JSON nested too deeply"
    return found, None


def model_error(exc: PluginError, owner: str, source: str) -> PluginError:
    """``exc`` (raised building stage ``owner``'s model) with the recipe (``source``) and the key of the
    component that failed, ``stages.<owner>.model.backbone`` or ``.head``, unless it names its own."""
    if exc.source or exc.key:
        return exc
    parts = exc.message.split(": ")  # "plugin 'x': backbone 'y': cannot be built: ..."
    kind = parts[1].split(" ")[0] if len(parts) > 1 else ""
    key = f"stages.{owner}.model" + (f".{kind}" if kind in ("backbone", "head") else "")
    return PluginError(exc.message, source=source, key=key)


class Preflight:
    """The checks of :meth:`Runner.preflight <kdtoolkit.engine.runner.Runner.preflight>`, for one run.

    :param out: the run directory.
    :param recipe: the run's recipe.
    :param ctx: the run's context (its plugin manager builds the components).
    :param force: ``--force``: stage files of a different recipe are not an error.
    :param stage_dir: the runner's ``stage_dir`` (``out/<name>``, checked).
    :param data_for: the runner's ``data_for`` (a stage's datasets, built once and kept for the run).
    """

    def __init__(
        self,
        out: Path,
        recipe: Recipe,
        ctx: RunContext,
        *,
        force: bool,
        stage_dir: Callable[[str], Path],
        data_for: Callable[[str], StageData],
    ):
        self.out = out
        self.recipe = recipe
        self.ctx = ctx
        self.force = force
        self.stage_dir = stage_dir
        self.data_for = data_for
        self._dry_models: dict[tuple[str, int], torch.nn.Module] = {}  # (stage, classes) -> model, during the preflight

    def run(self) -> None:
        """Run every check, in order (see :meth:`kdtoolkit.engine.runner.Runner.preflight`).

        :raises KdtError: with one line for the first check that fails.
        """
        out = self.out
        if out.exists() and not out.is_dir():
            raise KdtError("output path exists and is not a directory", source=str(out))
        probe_dir = out if out.exists() else next((p for p in out.parents if p.exists()), Path("."))
        if not probe_dir.is_dir():
            raise KdtError(f"cannot create the output directory: {probe_dir} is not a directory", source=str(out))
        if not os.access(probe_dir, os.W_OK):
            raise KdtError("output directory is not writable", source=str(out))
        for name in self.recipe.order:
            self._check_stage_files(name)
        for name in self.recipe.order:
            self.data_for(name)
        for name in self.recipe.order:
            self._check_taps(name)
        for name in self.recipe.order:
            self._dry_build(name)
        self._dry_models.clear()
        try:
            out.mkdir(parents=True, exist_ok=True)
            fd, probe = tempfile.mkstemp(prefix=".kdt-write-probe.", suffix=".tmp", dir=out)
            os.close(fd)
            os.unlink(probe)
        except OSError as exc:
            raise KdtError(
                f"output directory is not writable ({exc.strerror or type(exc).__name__})", source=str(out)
            ) from None
        try:
            usage = shutil.disk_usage(out)
        except OSError:
            usage = None
        if usage is not None and usage.total > 0 and usage.free < 50 * 2**20:
            raise KdtError(f"only {usage.free // 2**20} MiB free on the output disk", source=str(out))

    def _check_stage_files(self, name: str) -> None:
        for fname in ("result.json", "checkpoint.safetensors"):
            f = self.stage_dir(name) / fname  # also checks every stage folder before anything is written
            if not f.exists():
                continue
            found, problem = stored_hash(f)
            if self.force or found == self.recipe.stage_hash(name):
                continue
            if problem is not None:
                raise KdtError(
                    f"stage '{name}': cannot resume from this file ({problem}); delete it to train the stage "
                    "again, or use --force",
                    source=str(f),
                )
            raise KdtError(
                f"stage '{name}' in this directory was produced by a different recipe (stage hash {found} != "
                f"{self.recipe.stage_hash(name)}); use --force to retrain it, or another --out",
                source=str(f),
            )

    def _check_taps(self, name: str) -> None:
        """The tap paths of a stage name modules of its student and teacher: both architectures are
        built on the meta device (no memory, no weights, the RNG left as it was)."""
        st, src = self.recipe.stage(name), str(self.recipe.path)
        checks = [(name, st["model"].get("taps") or {}, f"stages.{name}.model.taps")]
        if st["teacher"]:
            checks.append((st["teacher"], st.get("teacher_taps") or {}, f"stages.{name}.teacher_taps"))
        for owner, taps, key in checks:
            if not taps:
                continue
            check_tap_paths(self._dry_model(owner, self.data_for(name).num_classes), taps, src, key)

    def _dry_model(self, owner: str, num_classes: int) -> torch.nn.Module:
        """Stage ``owner``'s backbone + head for ``num_classes`` classes, built without weights on the meta
        device (no memory; initial weights, ``pretrained`` downloads and weight files are left out, as
        :func:`~kdtoolkit.results.rundir_files.trained_spec` does: shapes do not depend on them) and with the RNG
        left as it was (:func:`isolated_rng`); kept for the rest of the preflight. A factory that cannot build on
        the meta device is tried once more on the CPU, so only a factory that fails for real stops the run: a
        :class:`PluginError` naming the plugin, the component and the stage's ``model`` key."""
        key = (owner, num_classes)
        if key not in self._dry_models:
            spec = trained_spec(self.recipe.stage(owner))  # no initial weights: no download, no file read twice
            try:
                with isolated_rng(), torch.device("meta"):
                    model = build_model(spec, num_classes, self.ctx.plugins)
            except KeyboardInterrupt:
                raise
            except BaseException:
                try:
                    with isolated_rng():
                        model = build_model(spec, num_classes, self.ctx.plugins)
                except PluginError as exc:
                    raise model_error(exc, owner, str(self.recipe.path)) from None
            self._dry_models[key] = model
        return self._dry_models[key]

    def _reusable(self, name: str) -> bool:
        """Whether stage ``name`` is finished in the run directory with the current stage hash (it will
        be reused, not built)."""
        sdir = self.stage_dir(name)
        return (
            (sdir / "model.safetensors").exists()
            and (sdir / "result.json").exists()
            and stored_hash(sdir / "result.json")[0] == self.recipe.stage_hash(name)
        )

    def _dry_build(self, name: str) -> None:
        """The dry build of a stage, before any stage trains: every component the stage will build is
        built once and thrown away — its model (backbone and head, on the meta device) and its teacher's,
        its losses, its metrics and its plugin phases (its datasets are built by
        :meth:`~kdtoolkit.engine.runner.Runner.data_for`). A
        factory that raises stops the run here with one :class:`PluginError` line naming the plugin, the
        component and its recipe key, instead of after earlier stages have trained. Nothing is drawn
        from the run's random streams (:func:`isolated_rng`), so trained numbers are unchanged. A stage
        that will be reused is skipped (its teacher role is covered by the stages that read it)."""
        if self._reusable(name):
            return
        st, src, plugins = self.recipe.stage(name), str(self.recipe.path), self.ctx.plugins
        num_classes = self.data_for(name).num_classes
        self._dry_model(name, num_classes)
        if st["teacher"]:
            self._dry_model(st["teacher"], num_classes)
        with isolated_rng():
            LossSet(st["losses"], plugins, name, source=src)
            built: list[tuple[Any, dict[str, Any], str]] = []
            for i, m in enumerate(st["metrics"]):
                built.append((plugins.registry("metric").get(m["name"]), m, f"stages.{name}.metrics[{i}]"))
            for i, ph in enumerate(st["phases"]):
                if ph["kind"] != "train":
                    built.append((plugins.registry("phase").get(ph["kind"]), ph, f"stages.{name}.phases[{i}]"))
            for comp, spec, key in built:
                try:
                    build_component(comp, spec)
                except PluginError as exc:
                    raise PluginError(exc.message, source=exc.source or src, key=exc.key or key) from None
