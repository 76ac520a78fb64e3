"""Run directories as a public API: what ``kdt metrics`` and any plugin read.

>>> run = RunDir("runs/proto2proto")
>>> kd = run.stage("kd")
>>> kd.spec["teacher"], kd.result["accuracy"]
>>> records = kd.records()          # evaluated once (and saved) if missing
>>> model = kd.model()              # weights loaded strictly, eval mode

A stage directory may also be opened on its own (``StageDir.open(path)``);
its run is the parent directory. Nothing here re-validates a recipe that a
run already resolved: the run's ``recipe.resolved.json`` is read as it is
(a run directory written before that file existed is validated once from its
``recipe.resolved.toml``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any
from collections.abc import Iterator

from kdtoolkit.foundation.errors import KdtError
from kdtoolkit.foundation.paths import inside
from kdtoolkit.plugin.declared import record_keys
from kdtoolkit.plugin.manager import PluginManager, get_manager
import kdtoolkit.results.rundir_files as rundir_files
from kdtoolkit.results.rundir_files import trained_spec as trained_spec  # importable here, as before


def stage_order(stages: dict[str, Any]) -> list[str]:
    """Stage names with every stage after its ``teacher`` and ``compare_to`` stage."""
    order: list[str] = []

    def visit(n: str, trail: tuple[str, ...]) -> None:
        if n in order or n in trail or n not in stages:
            return
        for ref in ("teacher", "compare_to"):
            if stages[n].get(ref):
                visit(stages[n][ref], trail + (n,))
        order.append(n)

    for n in stages:
        visit(n, ())
    return order


class RunDir:
    """A run directory written by ``kdt run``.

    :param path: the directory.
    :param plugins: the plugin manager used to build datasets and models
        (default: the process-wide one).
    :param data: ``KEY=VALUE`` changes to every stage's ``data`` table, applied
        by :meth:`StageDir.data` (e.g. ``root=...`` where the data lies
        elsewhere on this machine; validated as ``kdt evaluate --data``).
    :raises KdtError: when ``path`` holds no resolved recipe.
    """

    def __init__(self, path: str | Path, plugins: PluginManager | None = None, data: tuple[str, ...] | list[str] = ()):
        self.path = Path(path)
        self.plugins = plugins or get_manager()
        self.data_changes = tuple(data)
        json_path, toml_path = self.path / rundir_files.RESOLVED_RECIPE, self.path / rundir_files.RESOLVED_TOML
        recipe = rundir_files.resolved_recipe(self.path)
        if recipe is None and toml_path.is_file():
            recipe = self._validated_toml(toml_path)
        elif recipe is None:
            raise KdtError(
                "not a run directory (no recipe.resolved.json or recipe.resolved.toml)", source=str(self.path)
            )
        self.recipe: dict[str, Any] = recipe
        if not isinstance(self.recipe, dict) or not isinstance(self.recipe.get("stages"), dict):
            raise KdtError("the resolved recipe has no stages", source=str(json_path))
        self.order = stage_order(self.recipe["stages"])

    def _validated_toml(self, path: Path) -> dict[str, Any]:
        from kdtoolkit.recipe.loader import Validator, tomllib

        try:
            raw = tomllib.loads(path.read_text(encoding="utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise KdtError(f"invalid TOML: {exc}", source=str(path)) from None
        except RecursionError:
            raise KdtError("invalid TOML: nested too deeply", source=str(path)) from None
        resolved, _ = Validator(str(path), self.plugins).recipe(raw, default_name=self.path.name)
        return resolved

    @property
    def info(self) -> dict[str, Any]:
        """``run.json``: versions, seed, device, command (``{}`` when absent)."""
        return rundir_files.run_info(self.path)

    @property
    def results(self) -> dict[str, Any]:
        """``results.json`` of a finished run."""
        return rundir_files.run_results(self.path)

    def file(self, name: str) -> Path:
        """The path of the file ``name`` of the run directory (whether or not it exists), checked as
        :meth:`StageDir.file` checks a stage's files (e.g. for a ``kdt_after_run`` hook that writes a report).

        :raises KdtError: one line, when ``name`` is no plain file name or leads outside the run directory.
        """
        return inside(self.path, name, what="run directory")

    def stage(self, name: str) -> StageDir:
        """The stage ``name``.

        :raises KdtError: when the recipe has no such stage.
        """
        if name not in self.recipe["stages"]:
            raise KdtError(
                f"stage '{name}' is not in the run's recipe (stages: {', '.join(self.order)})", source=str(self.path)
            )
        return StageDir(self, name)

    def __iter__(self) -> Iterator[StageDir]:
        return iter(self.stage(n) for n in self.order)

    def students_by_reference(self) -> dict[str, list[str]]:
        """Reference stage (a ``teacher`` or ``compare_to``) → the stages compared with it, in run order."""
        refs: dict[str, list[str]] = {}
        for name in self.order:
            st = self.recipe["stages"][name]
            ref = st.get("teacher") or st.get("compare_to")
            if ref:
                refs.setdefault(ref, []).append(name)
        return refs


class StageDir:
    """One stage of a run: its table, files, model and records."""

    def __init__(self, run: RunDir, name: str):
        self.run = run
        self.name = name
        self.path = rundir_files.stage_path(run.path, name)  # a hostile recipe.resolved.json cannot leave the run
        self.spec: dict[str, Any] = run.recipe["stages"][name]

    @classmethod
    def open(
        cls, path: str | Path, plugins: PluginManager | None = None, data: tuple[str, ...] | list[str] = ()
    ) -> StageDir:
        """The stage at ``path`` (a directory inside a run directory); ``data`` as for :class:`RunDir`."""
        path = Path(path)
        if not path.is_dir():
            raise KdtError("no such directory", source=str(path))
        return RunDir(path.parent, plugins, data).stage(path.name)

    @property
    def reference(self) -> str | None:
        """The stage this one is compared with: its teacher, else its ``compare_to`` stage."""
        return self.spec.get("teacher") or self.spec.get("compare_to")

    @property
    def result(self) -> dict[str, Any]:
        """``result.json`` of the finished stage."""
        return rundir_files.stage_result(self.path)

    def file(self, name: str) -> Path:
        """The path of the file ``name`` of this stage (whether or not it exists), checked.

        ``name`` must be one file name, and the resolved path must lie inside
        the stage directory (:func:`kdtoolkit.foundation.paths.inside`): a plugin that
        builds a name from recipe or records content (``f"pms_matching_vs_{teacher}.json"``)
        cannot read or write outside the stage this way. Nothing is created.

        :raises KdtError: one line, when ``name`` is no plain file name or leads outside the stage directory.
        """
        return inside(self.path, name, what=f"stage directory of '{self.name}'")

    def data(self):
        """The stage's :class:`~kdtoolkit.engine.data.StageData` (with the run's ``data`` changes, if any)."""
        from kdtoolkit.engine.data import build_data

        if self.run.data_changes:
            from kdtoolkit.use.evaluate import data_spec

            return build_data({**self.spec, "data": data_spec(self, self.run.data_changes)}, self.run.plugins)
        return build_data(self.spec, self.run.plugins)

    def model(self, device: str = "cpu", data=None):
        """The trained model (weights loaded strictly from ``model.safetensors``), in eval mode on ``device``,
        in the memory layout the run trained and evaluated it in (the recipe's ``channels_last``).

        The class count comes from ``data`` when given, else from the model
        file's metadata (no dataset is built), else from the stage's data.
        """
        from kdtoolkit.engine.context import uses_channels_last
        from kdtoolkit.foundation.device import resolve_device
        from kdtoolkit.engine.models import build_model, load_model_file, load_state_strict

        weights = self.path / "model.safetensors"
        if not weights.is_file():
            raise KdtError("not a trained stage (no model.safetensors)", source=str(self.path))
        state, meta = load_model_file(weights)
        if data is not None:
            num_classes = data.num_classes
        elif isinstance(meta.get("num_classes"), int):
            num_classes = meta["num_classes"]
        else:
            num_classes = self.data().num_classes
        model = build_model(trained_spec(self.spec), num_classes, self.run.plugins)
        load_state_strict(model, state, str(weights))
        # the memory layout of the run's own evaluation, so that evaluating again gives its records
        if uses_channels_last(self.run.recipe.get("channels_last", False), model):
            import torch

            # torch's stubs have no Module.to(device, memory_format=...), which torch accepts
            return model.to(resolve_device(device), memory_format=torch.channels_last).eval()  # type: ignore[call-overload]
        return model.to(resolve_device(device)).eval()

    def num_classes(self) -> int:
        """The trained model's class count (from ``model.safetensors``' metadata, else from the stage's data)."""
        n = self.model_meta().get("num_classes")
        return n if isinstance(n, int) else self.data().num_classes

    def classes(self) -> list[str] | None:
        """The class names the model was trained with, in label order (``None`` for a model file
        written before they were recorded)."""
        names = self.model_meta().get("classes")
        return [str(c) for c in names] if isinstance(names, list) and names else None

    def model_meta(self) -> dict[str, Any]:
        """The decoded metadata of ``model.safetensors``, read from its header (no weight is read)."""
        from kdtoolkit.foundation.tensorfiles import read_kdt_metadata
        from kdtoolkit.engine.models import MODEL_FORMAT

        weights = self.path / "model.safetensors"
        if not weights.is_file():
            raise KdtError("not a trained stage (no model.safetensors)", source=str(self.path))
        return read_kdt_metadata(weights, MODEL_FORMAT, "model file")

    def records(self, device: str = "auto", progress=None, save: bool = True):
        """The stage's evaluation :class:`~kdtoolkit.results.records.Records`: read from
        ``records.safetensors``, or computed with one pass over the test set (and saved)."""
        from kdtoolkit.results.records import Records
        from kdtoolkit.foundation.device import resolve_device
        from kdtoolkit.engine.evaluation import evaluate

        saved = self.path / "records.safetensors"
        if saved.is_file():
            return Records.load(saved)
        data = self.data()
        model = self.model(device, data)
        head = self.run.plugins.registry("head").get(self.spec["model"]["head"]["name"])
        recs = evaluate(
            model,
            data.test,
            batch_size=self.spec["data"]["eval_batch_size"],
            device=resolve_device(device),
            record_keys=record_keys(head),
            progress=progress,
            meta={
                "stage": self.name,
                "dataset": getattr(data.test, "name", self.spec["data"]["dataset"]),
                "num_classes": data.num_classes,
            },
        )
        if save:
            recs.save(saved)
        return recs
