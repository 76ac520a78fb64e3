"""Recipe validation: every key, type, range, component name, cross-reference and file.

:class:`Validator` checks a raw recipe dict (after ``extends`` and ``--set``)
and returns it with every default filled in. Any problem raises
:class:`~kdtoolkit.foundation.errors.RecipeError` naming the file and the key path. The
recipe keys are documented in ``docs/recipes.md``.
"""

from __future__ import annotations

import copy
import math
import os
from typing import Any

from kdtoolkit.foundation.device import DEVICE_CHOICES, DEVICE_PATTERN
from kdtoolkit.foundation.errors import KdtError, PluginError, RecipeError
from kdtoolkit.plugin.params import (
    MAX_BATCH_SIZE,
    MAX_INPUT_BATCH_BYTES,
    MAX_NUM_WORKERS,
    MAX_SEED,
    REQUIRED,
    ParamTypeError,
    coerce,
    describe_value,
    is_path_annotation,
)
from kdtoolkit.foundation.paths import NAME_RE, key_name, name_problem, safe_name  # noqa: F401  (NAME_RE: the name rule, kept importable here)
from kdtoolkit.plugin.manager import PluginManager
from kdtoolkit.plugin.registry import RESERVED_KEYS, Component, describe_raise, suggest
from kdtoolkit.recipe.stage_checks import StageChecks

PRECISIONS = ("fp32", "bf16", "fp16")

TOP_KEYS = (
    "extends",
    "name",
    "description",
    "seed",
    "seeds",
    "device",
    "precision",
    "data",
    "evaluate",
    "checkpoint_every",
    "channels_last",
    "stages",
)
DATA_KEYS = RESERVED_KEYS["dataset"]
EVAL_KEYS = ("metrics",)


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """``over`` merged into a copy of ``base``: tables merge, everything else replaces."""
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


# ---------------------------------------------------------------------------
# validation


class Validator(StageChecks):
    """Checks a raw recipe dict and returns it with defaults filled in.

    With ``base_dir``, relative paths (a dataset's ``root``, ``model.weights``,
    component parameters annotated ``pathlib.Path``) are made absolute against
    the folder of the file that set them: ``origins`` maps a key path (such
    as ``"data.root"`` or ``"stages.kd.losses[0]"``) to that folder; a key without an entry
    resolves against ``base_dir``. Without ``base_dir`` paths are kept as written.
    """

    DATA_KEYS = DATA_KEYS

    def __init__(
        self, source: str, plugins: PluginManager, *, base_dir: str | None = None, origins: dict[str, str] | None = None
    ):
        self.source = source
        self.plugins = plugins
        self.base_dir = base_dir
        self.origins = origins or {}
        self.stage_base: dict[str, str] = {}
        self.stage_names: list[str] = []

    # -- helpers ---------------------------------------------------------
    def fail(self, key: str, message: str) -> None:
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

    # -- sections --------------------------------------------------------
    def recipe(self, raw: dict[str, Any], default_name: str) -> tuple[dict[str, Any], list[str]]:
        self.known(raw, "", TOP_KEYS)
        res: dict[str, Any] = {}
        res["name"] = self.value(raw, "", "name", str, safe_name(default_name))
        self.path_name(res["name"], "name")
        res["description"] = self.value(raw, "", "description", str, "")
        res["seed"] = self.number(raw, "", "seed", 0, lo=0, hi=MAX_SEED, integer=True)
        res["seeds"] = self.seeds(raw)
        res["device"] = self.value(raw, "", "device", str, "auto")
        if not DEVICE_PATTERN.match(res["device"]):
            self.fail("device", f"expected {DEVICE_CHOICES}, got {describe_value(res['device'])}")
        res["precision"] = self.choice(raw, "", "precision", PRECISIONS, "fp32")
        res["checkpoint_every"] = self.number(raw, "", "checkpoint_every", 1, lo=0, integer=True)
        res["channels_last"] = raw.get("channels_last", "auto")
        if not isinstance(res["channels_last"], bool) and res["channels_last"] != "auto":
            self.fail("channels_last", f'expected true, false or "auto", got {describe_value(res["channels_last"])}')
        top_data = self.table(raw.get("data", {}), "data")
        evaluate = self.table(raw.get("evaluate", {}), "evaluate")
        self.known(evaluate, "evaluate", EVAL_KEYS)
        default_metrics = evaluate.get("metrics", [{"name": "accuracy"}])
        res["evaluate"] = {"metrics": self.metrics(default_metrics, "evaluate.metrics")}

        stages_raw = (
            self.table(raw.get("stages"), "stages")
            if "stages" in raw
            else self.fail("stages", "missing required key: a recipe needs at least one stage")
        )
        if not stages_raw:
            self.fail("stages", "a recipe needs at least one stage")
        self.stage_names = list(stages_raw)
        self.path_names(self.stage_names, lambda n: f"stages.{key_name(n)}", "stage")
        stages_raw = self.stage_bases(stages_raw)
        stages: dict[str, Any] = {}
        for sname, sraw in stages_raw.items():
            stages[sname] = self.stage(sname, sraw, res, top_data, evaluate)
        res["stages"] = stages
        order = self.order(stages)
        for sname in order:
            self.cross_check(sname, stages)
        return res, order

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

    def seeds(self, raw: dict[str, Any]) -> list[int] | None:
        """``seeds``: distinct integers >= 0 (``kdt run`` runs once per seed); ``None`` when absent or empty."""
        out: list[int] = []
        for i, v in enumerate(self.array(raw.get("seeds", []), "seeds")):
            if isinstance(v, bool) or not isinstance(v, int):
                self.fail(f"seeds[{i}]", f"expected an integer, got {describe_value(v)}")
            if v < 0 or v > MAX_SEED:
                self.fail(
                    f"seeds[{i}]",
                    f"must be >= 0, got {v}"
                    if v < 0
                    else f"must be <= {MAX_SEED} (2^63-1, a 64-bit generator seed), got {describe_value(v)}",
                )
            if v in out:
                self.fail(f"seeds[{i}]", f"seed {v} is listed twice")
            out.append(v)
        return out or None

    def stage_bases(self, stages_raw: dict[str, Any]) -> dict[str, Any]:
        """Resolve ``base = "other"``: a stage starts as a copy of another stage's
        table, and its own keys are merged over it (tables merge, lists replace)."""
        out: dict[str, Any] = {}

        def resolve(name: str, trail: tuple[str, ...]) -> dict[str, Any]:
            if name in out:
                return out[name]
            raw = self.table(stages_raw[name], f"stages.{name}")
            base = raw.get("base")
            if base is None:
                out[name] = raw
                return raw
            if not isinstance(base, str):
                self.fail(f"stages.{name}.base", f"expected a stage name, got {describe_value(base)}")
            if base not in stages_raw:
                self.fail(f"stages.{name}.base", f"no stage named '{base}'{suggest(base, list(stages_raw))}")
            if base in trail or base == name:
                self.fail(f"stages.{name}.base", "stage bases form a cycle: " + " -> ".join(trail + (name, base)))
            self.stage_base[name] = base
            merged = deep_merge(resolve(base, trail + (name,)), {k: v for k, v in raw.items() if k != "base"})
            merged.pop("base", None)
            if "description" not in raw:
                merged["description"] = name
            out[name] = merged
            return merged

        for name in stages_raw:
            resolve(name, ())
        return {name: out[name] for name in stages_raw}

    def data(self, raw: dict[str, Any], key: str) -> dict[str, Any]:
        raw = self.table(raw, key)
        if "dataset" not in raw:
            self.fail(f"{key}.dataset", 'missing required key: name a dataset (e.g. "digits")')
        name = self.value(raw, key, "dataset", str)
        comp = self.plugins.registry("dataset").get(name, source=self.source, key=f"{key}.dataset")
        params = self.params(comp, raw, key, DATA_KEYS)
        out = {
            "dataset": comp.name,
            "batch_size": self.number(raw, key, "batch_size", 64, lo=1, hi=MAX_BATCH_SIZE, integer=True),
            "eval_batch_size": self.number(raw, key, "eval_batch_size", 256, lo=1, hi=MAX_BATCH_SIZE, integer=True),
            "num_workers": self.number(raw, key, "num_workers", 0, lo=0, hi=MAX_NUM_WORKERS, integer=True),
            "drop_last": self.value(raw, key, "drop_last", bool, False),
            "augment": self.value(raw, key, "augment", bool, True),
        }
        out.update(params)
        self.input_batch_memory(out, key)
        return out

    def input_batch_memory(self, data: dict[str, Any], key: str) -> None:
        """Refuse a batch of input images over :data:`MAX_INPUT_BATCH_BYTES`, estimated from the
        dataset's ``image_size`` parameter (square float32 RGB images), before anything is built."""
        size = data.get("image_size")
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            return
        for name in ("batch_size", "eval_batch_size"):
            need = data[name] * 3 * size * size * 4
            if need > MAX_INPUT_BATCH_BYTES:
                self.fail(
                    f"{key}.{name}",
                    f"one batch of {data[name]} images of 3x{size}x{size} float32 takes "
                    f"{need / 2**30:.1f} GiB, over the {MAX_INPUT_BATCH_BYTES // 2**30} GiB limit of an input "
                    f"batch: lower {name} or image_size",
                )

    def metrics(self, raw: Any, key: str) -> list[dict[str, Any]]:
        out = []
        seen = set()
        for i, m in enumerate(self.array(raw, key)):
            comp, params = self.component("metric", m, f"{key}[{i}]")
            if comp.name in seen:
                self.fail(f"{key}[{i}].name", f"metric '{comp.name}' is listed twice")
            seen.add(comp.name)
            out.append({"name": comp.name, **params})
        return out

    def order(self, stages: dict[str, Any]) -> list[str]:
        for name, st in stages.items():
            for ref in ("teacher", "compare_to"):
                other = st.get(ref)
                if other is None:
                    continue
                if other not in stages:
                    self.fail(
                        f"stages.{name}.{ref}",
                        f"no stage named '{other}'{suggest(other, list(stages))}; stages: {', '.join(stages)}",
                    )
                if other == name:
                    self.fail(f"stages.{name}.{ref}", "a stage cannot refer to itself")
        order: list[str] = []
        state: dict[str, int] = {}

        def visit(n: str, trail: list[tuple[str, str]], via: str) -> None:
            if state.get(n) == 2:
                return
            if state.get(n) == 1:
                nodes = [t for t, _ in trail]
                i = nodes.index(n)
                first_edge = trail[i + 1][1] if i + 1 < len(trail) else via  # the key leaving n
                self.fail(first_edge, "stages depend on each other in a cycle: " + " -> ".join(nodes[i:] + [n]))
            state[n] = 1
            for ref in ("teacher", "compare_to"):
                if stages[n].get(ref):
                    visit(stages[n][ref], trail + [(n, via)], f"stages.{n}.{ref}")
            state[n] = 2
            order.append(n)

        for n in stages:
            visit(n, [], f"stages.{n}")
        return order
