"""The primitives of recipe validation: what every check of :mod:`kdtoolkit.recipe` is made of.

:class:`Checks` holds the validator's state (the recipe file, the plugins, where relative paths are
relative to) and the checks every section uses: a value of a type (:meth:`Checks.value`), a number in a
range, a choice, a table or a list, the keys a table may have, a component's name and parameters
(:meth:`Checks.component`, with the factory's ``check_params``), a path made absolute against the file
that set it and a name that becomes a file name. Each failure raises one
:class:`~kdtoolkit.foundation.errors.RecipeError` naming the file and the key path.

The per-stage checks (:class:`kdtoolkit.recipe.stage_checks.StageChecks`) build on these, and the
top-level :class:`kdtoolkit.recipe.validator.Validator` on those. Torch-free.
"""

from __future__ import annotations

import copy
import math
import os
from typing import Any, NoReturn

from kdtoolkit.foundation.errors import KdtError, PluginError, RecipeError
from kdtoolkit.foundation.paths import name_problem
from kdtoolkit.plugin.manager import PluginManager
from kdtoolkit.plugin.params import REQUIRED, ParamTypeError, coerce, describe_value, is_path_annotation
from kdtoolkit.plugin.registry import Component, describe_raise, suggest


class Checks:
    """The state and the primitive checks of recipe validation.

    :param source: the recipe file (or ``--data``, ``--set``) that errors name.
    :param plugins: the plugin manager whose registries name the components.
    :param base_dir: with it, relative paths (a dataset's ``root``, ``model.weights``, component
        parameters annotated ``pathlib.Path``) are made absolute against the folder of the file that set
        them (``origins``); without it paths are kept as written.
    :param origins: key path (``"data.root"``, ``"stages.kd.losses[0]"``) → the folder of the file that
        set it; a key without an entry resolves against ``base_dir``.
    """

    def __init__(
        self, source: str, plugins: PluginManager, *, base_dir: str | None = None, origins: dict[str, str] | None = None
    ):
        self.source = source
        self.plugins = plugins
        self.base_dir = base_dir
        self.origins = origins or {}
        self.stage_base: dict[str, str] = {}
        self.stage_names: list[str] = []

    def fail(self, key: str, message: str) -> NoReturn:
        """Raise the :class:`~kdtoolkit.foundation.errors.RecipeError` ``message`` at the key path ``key``
        (``""``: the recipe as a whole), naming the recipe file."""
        raise RecipeError(message, source=self.source, key=key or None)

    def table(self, value: Any, key: str) -> dict[str, Any]:
        if not isinstance(value, dict):
            self.fail(key, f"expected a table, got {describe_value(value)}")
        return value

    def array(self, value: Any, key: str) -> list[Any]:
        if not isinstance(value, list):
            self.fail(key, f"expected a list, got {describe_value(value)}")
        return value

    def known(self, d: dict[str, Any], key: str, allowed: tuple[str, ...] | list[str]) -> None:
        for k in d:
            if k not in allowed:
                where = f"{key}.{k}" if key else k
                hint = suggest(k, list(allowed))
                self.fail(where, f"unknown key{hint}; allowed here: {', '.join(allowed)}")

    def value(self, d: dict[str, Any], key: str, name: str, ann: Any, default: Any = REQUIRED) -> Any:
        where = f"{key}.{name}" if key else name
        if name not in d:
            if default is REQUIRED:
                self.fail(where, "missing required key")
            return copy.deepcopy(default)
        try:
            return coerce(d[name], ann)
        except ParamTypeError as exc:
            self.fail(where + exc.path_suffix, str(exc))

    def number(self, d, key, name, default=REQUIRED, *, lo=None, hi=None, lo_open=False, integer=False):
        v = self.value(d, key, name, int if integer else float, default)
        if v is None:
            return v
        where = f"{key}.{name}" if key else name
        if not integer and math.isinf(v) and (lo is not None or hi is not None):
            self.fail(where, f"expected a finite number, got {v}")
        if lo is not None and (v < lo or (lo_open and v == lo)):
            self.fail(where, f"must be {'>' if lo_open else '>='} {lo}, got {v}")
        if hi is not None and v > hi:
            self.fail(where, f"must be <= {hi}, got {v}")
        return v

    def choice(self, d, key, name, choices, default=REQUIRED):
        v = self.value(d, key, name, str, default)
        if v not in choices:
            where = f"{key}.{name}" if key else name
            self.fail(
                where, f"expected one of {', '.join(choices)}, got {describe_value(v)}{suggest(str(v), list(choices))}"
            )
        return v

    def component(
        self, kind: str, spec: Any, key: str, core_keys: tuple[str, ...] = ("name",)
    ) -> tuple[Component, dict[str, Any]]:
        """Validate ``{name = "...", <params>}`` against the registered factory."""
        if isinstance(spec, str):
            spec = {"name": spec}
        spec = self.table(spec, key)
        name = self.value(spec, key, "name", str)
        comp = self.plugins.registry(kind).get(name, source=self.source, key=f"{key}.name")
        return comp, self.params(comp, spec, key, core_keys)

    def params(self, comp: Component, spec: dict[str, Any], key: str, core_keys: tuple[str, ...]) -> dict[str, Any]:
        """The component's parameters from ``spec`` (other keys: ``core_keys``), checked."""
        self.known(spec, key, list(core_keys) + list(comp.params))
        out: dict[str, Any] = {}
        for pname, p in comp.params.items():
            if pname in spec and (is_path_annotation(p.annotation) or (comp.kind == "dataset" and pname == "root")):
                spec = {**spec, pname: self.resolve_path(spec[pname], f"{key}.{pname}")}
            out[pname] = self.value(spec, key, pname, p.annotation, p.default)
        check = comp.check_params()
        if check is not None:
            try:
                check(dict(out))
            except ValueError as exc:
                if len(exc.args) == 2:
                    self.fail(f"{key}.{exc.args[0]}", str(exc.args[1]))
                self.fail(key, str(exc))
            except (KdtError, KeyboardInterrupt):
                raise
            except BaseException as exc:
                raise PluginError(
                    f"plugin '{comp.owner}': {comp.kind} '{comp.name}': check_params {describe_raise(exc)}",
                    source=self.source,
                    key=key,
                ) from None
        return out

    def resolve_path(self, value: Any, key: str) -> Any:
        """A relative path made absolute against the folder of the recipe file that set ``key``
        (the working directory for a ``--set`` override); other values are returned as they are."""
        if (
            self.base_dir is None
            or not isinstance(value, str)
            or not value
            or value.startswith("~")
            or os.path.isabs(value)
        ):
            return value
        return os.path.normpath(os.path.join(self.origin(key), value))

    def origin(self, key: str) -> str:
        """The folder that a relative path at ``key`` is relative to: that of the file that set the key
        (or a table above it), following a stage's ``base`` and the top-level ``data`` a stage inherits;
        else ``base_dir``."""
        while True:
            found = [k for k in self.origins if key == k or key.startswith((k + ".", k + "["))]
            if found:
                return self.origins[max(found, key=len)]
            stages = [n for n in self.stage_names if key.startswith(f"stages.{n}.")]
            if not stages:
                return str(self.base_dir)
            stage = max(stages, key=len)
            rest = key[len(f"stages.{stage}.") :]
            if stage in self.stage_base:
                key = f"stages.{self.stage_base[stage]}.{rest}"
            elif rest.startswith("data."):
                key = rest
            else:
                return str(self.base_dir)

    def path_name(self, name: Any, key: str) -> None:
        """A name that becomes a file or folder name (stage, phase, recipe): the rule of
        :func:`kdtoolkit.foundation.paths.name_problem`, failing at ``key``."""
        problem = name_problem(name)
        if problem is not None:
            self.fail(key, problem)

    def path_names(self, names: list[Any], key_of, what: str) -> None:
        """Each of ``names`` passes :meth:`path_name` (at ``key_of(name)``), and no two differ only in case
        (one folder or file on a case-insensitive file system)."""
        seen: dict[str, Any] = {}
        for name in names:
            self.path_name(name, key_of(name))
            other = seen.setdefault(name.casefold(), name)
            if other != name:
                self.fail(
                    key_of(name),
                    f"{what} names '{other}' and '{name}' differ only in case: one file or folder "
                    "on a case-insensitive file system",
                )
