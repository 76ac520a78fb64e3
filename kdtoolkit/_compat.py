"""Old module paths of kdtoolkit 0.2, importable for one more version with a deprecation warning.

kdtoolkit 0.3 moved its modules into layered packages (``docs/architecture.md``). A plugin written
against 0.2 that imports, say, ``kdtoolkit.io`` or ``kdtoolkit.engine.rundir`` still works: the import
finder below answers the old name with the module at its new place (the same module object, so
``isinstance`` checks and monkeypatching behave as before) and warns once per old name.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import warnings
from types import ModuleType

MOVED = {
    "kdtoolkit.errors": "kdtoolkit.foundation.errors",
    "kdtoolkit.paths": "kdtoolkit.foundation.paths",
    "kdtoolkit.limits": "kdtoolkit.foundation.limits",
    "kdtoolkit.io": "kdtoolkit.foundation.io",
    "kdtoolkit.tensorfiles": "kdtoolkit.foundation.tensorfiles",
    "kdtoolkit.images": "kdtoolkit.foundation.images",
    "kdtoolkit.checkpoint": "kdtoolkit.foundation.checkpoint",
    "kdtoolkit.progress": "kdtoolkit.foundation.progress",
    "kdtoolkit.distributed": "kdtoolkit.foundation.distributed",
    "kdtoolkit.engine.device": "kdtoolkit.foundation.device",
    "kdtoolkit.tables": "kdtoolkit.foundation.tables",
    "kdtoolkit.tomlwrite": "kdtoolkit.foundation.tomlwrite",
    "kdtoolkit.hookspecs": "kdtoolkit.plugin.hookspecs",
    "kdtoolkit.builtin": "kdtoolkit.plugin.builtin",
    "kdtoolkit.plugins": "kdtoolkit.plugin.manager",
    "kdtoolkit.registry": "kdtoolkit.plugin.registry",
    "kdtoolkit.params": "kdtoolkit.plugin.params",
    "kdtoolkit.schemas": "kdtoolkit.plugin.schema_cache",
    "kdtoolkit.components": "kdtoolkit.plugin.contracts",
    "kdtoolkit.validate": "kdtoolkit.recipe.validator",
    "kdtoolkit.validate_stage": "kdtoolkit.recipe.stage_checks",
    "kdtoolkit.catalog": "kdtoolkit.recipe.catalog",
    "kdtoolkit.records": "kdtoolkit.results.records",
    "kdtoolkit.report": "kdtoolkit.results.report",
    "kdtoolkit.reportplots": "kdtoolkit.results.plots",
    "kdtoolkit.aggregate": "kdtoolkit.results.aggregate",
    "kdtoolkit.multirun": "kdtoolkit.results.runs_report",
    "kdtoolkit.seeds": "kdtoolkit.engine.multiseed",
    "kdtoolkit.engine.predict": "kdtoolkit.use.predict",
    "kdtoolkit.engine.reevaluate": "kdtoolkit.use.evaluate",
    "kdtoolkit.engine.export": "kdtoolkit.use.export",
    "kdtoolkit.engine.inspect": "kdtoolkit.use.inspect",
    "kdtoolkit.engine.rundir": "kdtoolkit.use.rundir",
    "kdtoolkit.datacheck": "kdtoolkit.use.datacheck",
    "kdtoolkit.cli_use": "kdtoolkit.cli.use",
    "kdtoolkit.docgen": "kdtoolkit.cli.docgen",
}


class _Alias(importlib.abc.Loader):
    def __init__(self, new: str) -> None:
        self.new = new
        self.spec: importlib.machinery.ModuleSpec | None = None

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        warnings.warn(
            f"{spec.name} moved to {self.new}; the old name goes in the next version",
            DeprecationWarning,
            stacklevel=2,
        )
        module = importlib.import_module(self.new)
        self.spec = module.__spec__
        return module

    def exec_module(self, module: ModuleType) -> None:
        module.__spec__ = self.spec  # the import system set the old name's spec on the shared module


class _MovedFinder(importlib.abc.MetaPathFinder):
    def find_spec(
        self, fullname: str, path: object = None, target: object = None
    ) -> importlib.machinery.ModuleSpec | None:
        new = MOVED.get(fullname)
        if new is None:
            return None
        return importlib.machinery.ModuleSpec(fullname, _Alias(new))


def install() -> None:
    """Put the finder of old module paths first on ``sys.meta_path`` (once)."""
    if not any(isinstance(f, _MovedFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _MovedFinder())
