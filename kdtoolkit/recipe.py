"""TOML recipes: loading, ``extends``, ``--set`` overrides and validation.

A recipe is validated completely — every key, type, range, component name,
cross-reference and file — before anything is built or written. Any problem
raises :class:`~kdtoolkit.errors.RecipeError` naming the file and the key path,
e.g. ``recipes/x.toml: stages.kd.losses[1].weight: expected a number, got "ten"``.

The result of :func:`load_recipe` is a :class:`Recipe` whose ``resolved`` dict
has every default filled in; it is what ``kdt validate`` prints and what a run
records in ``recipe.resolved.toml``. The recipe keys are documented in
``docs/recipes.md``.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

try:  # Python 3.11+
    import tomllib
except ModuleNotFoundError:  # pragma: no cover - Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

from .errors import RecipeError
from .params import REQUIRED, ParamTypeError, coerce, describe_value
from .plugins import PluginManager
from .registry import Component, suggest

OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULERS = ("none", "step", "multistep", "cosine", "exponential")
PRECISIONS = ("fp32", "bf16", "fp16")
DEVICE_RE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")
NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")

TOP_KEYS = (
    "extends", "name", "description", "seed", "device", "precision", "data",
    "evaluate", "checkpoint_every", "channels_last", "stages",
)
DATA_KEYS = ("dataset", "batch_size", "eval_batch_size", "num_workers", "drop_last", "augment")
EVAL_KEYS = ("metrics",)
STAGE_KEYS = (
    "base", "description", "teacher", "compare_to", "seed", "data", "model", "losses",
    "phases", "metrics", "teacher_cache",
)
TEACHER_CACHE = ("off", "memory", "disk")
MODEL_KEYS = ("backbone", "head", "init_from_teacher", "weights")
LOSS_CORE_KEYS = ("name", "id", "weight")
PHASE_CORE_KEYS = ("name", "kind")
TRAIN_KEYS = (
    "epochs", "losses", "optimizer", "groups", "scheduler", "clip_grad_norm",
    "limit_batches", "accumulate",
)
OPTIMIZER_KEYS = ("name", "betas", "eps", "momentum", "nesterov", "weight_decay")
GROUP_KEYS = ("params", "lr", "weight_decay")
SCHEDULER_KEYS = ("name", "step_size", "gamma", "milestones", "min_lr")


@dataclass
class Recipe:
    """A loaded, validated recipe.

    :ivar path: the recipe file.
    :ivar resolved: the recipe with every default filled in (a plain dict).
    :ivar order: stage names in dependency order (teachers first).
    """

    path: Path
    resolved: dict[str, Any]
    order: list[str]

    def stage(self, name: str) -> dict[str, Any]:
        return self.resolved["stages"][name]

    def stage_hash(self, name: str) -> str:
        """A hash of everything that determines the stage's result.

        It covers the stage's resolved table, the global seed, device-independent
        settings and, recursively, the hashes of the stages it depends on.
        """
        st = self.stage(name)
        deps = [d for d in (st.get("teacher"), st.get("compare_to")) if d]
        # "memory" and "disk" give the same numbers; "off" leaves the hashes of earlier runs unchanged
        st = {k: v for k, v in st.items() if k != "teacher_cache"}
        if self.stage(name).get("teacher_cache", "off") != "off":
            st["teacher_cache"] = "on"
        payload = {
            "stage": st,
            "precision": self.resolved["precision"],
            "deps": {d: self.stage_hash(d) for d in deps},
        }
        if self.resolved.get("channels_last"):  # only when set: the hashes of earlier runs stay valid
            payload["channels_last"] = True
        return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def to_toml(self) -> str:
        from .tomlwrite import dumps

        return dumps(self.resolved)


# ---------------------------------------------------------------------------
# loading


def _read_toml(path: Path, *, source: str, key: str | None) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RecipeError(f"file not found: {path}", source=source, key=key) from None
    except (IsADirectoryError, PermissionError, UnicodeDecodeError) as exc:
        raise RecipeError(f"cannot read {path}: {type(exc).__name__}", source=source, key=key) from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise RecipeError(f"invalid TOML: {exc}", source=str(path)) from None


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """``over`` merged into a copy of ``base``: tables merge, everything else replaces."""
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def _load_with_extends(path: Path, chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    data = _read_toml(path, source=str(chain[-1]) if chain else str(path), key="extends" if chain else None)
    parent = data.pop("extends", None)
    if parent is None:
        return data
    if not isinstance(parent, str):
        raise RecipeError(f"expected a string, got {describe_value(parent)}", source=str(path), key="extends")
    parent_path = (path.parent / parent).resolve()
    if parent_path in chain or parent_path == path.resolve():
        raise RecipeError(f"'extends' forms a cycle through {parent}", source=str(path), key="extends")
    if not parent_path.is_file():
        raise RecipeError(f"file not found: {parent}", source=str(path), key="extends")
    base = _load_with_extends(parent_path, chain + (path.resolve(),))
    return deep_merge(base, data)


_SEGMENT = re.compile(r"([^.\[\]]+)|\[(\d+)\]")


def parse_key_path(path: str) -> list[str | int]:
    """``"stages.kd.phases[0].epochs"`` → ``["stages", "kd", "phases", 0, "epochs"]``."""
    out: list[str | int] = []
    pos = 0
    for m in _SEGMENT.finditer(path):
        gap = path[pos : m.start()]
        if gap not in ("", "."):
            raise ValueError(f"malformed key path {path!r}")
        out.append(m.group(1) if m.group(1) is not None else int(m.group(2)))
        pos = m.end()
    if pos != len(path) or not out or not isinstance(out[0], str):
        raise ValueError(f"malformed key path {path!r}")
    return out


def parse_override_value(text: str) -> Any:
    """A TOML value (``3``, ``1e-3``, ``true``, ``"x"``, ``[1, 2]``, ``inf``) or a bare string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_override(data: dict[str, Any], assignment: str) -> None:
    """Apply one ``key.path=value`` override in place.

    :raises RecipeError: (source ``--set``) for a malformed assignment or a
        path through a non-table.
    """
    if "=" not in assignment:
        raise RecipeError(f"expected KEY=VALUE, got {assignment!r}", source="--set")
    key, _, raw = assignment.partition("=")
    key = key.strip()
    try:
        parts = parse_key_path(key)
    except ValueError as exc:
        raise RecipeError(str(exc), source="--set") from None
    node: Any = data
    for i, part in enumerate(parts[:-1]):
        nxt = parts[i + 1]
        if isinstance(part, int):
            if not isinstance(node, list) or part >= len(node):
                raise RecipeError(f"no item [{part}] to set", source="--set", key=key)
            node = node[part]
            continue
        if not isinstance(node, dict):
            raise RecipeError(f"'{part}' is not inside a table", source="--set", key=key)
        if part not in node:
            node[part] = [] if isinstance(nxt, int) else {}
        node = node[part]
    last = parts[-1]
    value = parse_override_value(raw.strip())
    if isinstance(last, int):
        if not isinstance(node, list) or last >= len(node):
            raise RecipeError(f"no item [{last}] to set", source="--set", key=key)
        node[last] = value
    else:
        if not isinstance(node, dict):
            raise RecipeError("the parent of this key is not a table", source="--set", key=key)
        node[last] = value


def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = (), *, plugins: PluginManager | None = None) -> Recipe:
    """Read, merge (``extends``), override (``--set``) and validate a recipe.

    :param path: the recipe file.
    :param overrides: ``KEY=VALUE`` assignments applied after ``extends``.
    :param plugins: the plugin manager whose registries name the components
        (default: the process-wide one).
    :raises RecipeError: on the first problem, naming file and key.
    """
    from .plugins import get_manager

    path = Path(path)
    if not path.is_file():
        raise RecipeError("recipe file not found" if not path.exists() else "not a file", source=str(path))
    data = _load_with_extends(path)
    for assignment in overrides:
        if assignment.partition("=")[0].strip() == "extends":
            raise RecipeError("'extends' is resolved before overrides; edit the recipe file instead", source="--set", key="extends")
        apply_override(data, assignment)
    resolved, order = Validator(str(path), plugins or get_manager()).recipe(data, default_name=path.stem)
    return Recipe(path=path, resolved=resolved, order=order)


# ---------------------------------------------------------------------------
# validation


class Validator:
    """Checks a raw recipe dict and returns it with defaults filled in."""

    def __init__(self, source: str, plugins: PluginManager):
        self.source = source
        self.plugins = plugins

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
            self.fail(where, f"expected one of {', '.join(choices)}, got {describe_value(v)}{suggest(str(v), list(choices))}")
        return v

    def component(self, kind: str, spec: Any, key: str, core_keys: tuple[str, ...] = ("name",)) -> tuple[Component, dict[str, Any]]:
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
            out[pname] = self.value(spec, key, pname, p.annotation, p.default)
        check = getattr(comp.factory, "check_params", None)
        if check is not None:
            try:
                check(dict(out))
            except ValueError as exc:
                if len(exc.args) == 2:
                    self.fail(f"{key}.{exc.args[0]}", str(exc.args[1]))
                self.fail(key, str(exc))
        return out

    # -- sections --------------------------------------------------------
    def recipe(self, raw: dict[str, Any], default_name: str) -> tuple[dict[str, Any], list[str]]:
        self.known(raw, "", TOP_KEYS)
        res: dict[str, Any] = {}
        res["name"] = self.value(raw, "", "name", str, default_name)
        res["description"] = self.value(raw, "", "description", str, "")
        res["seed"] = self.number(raw, "", "seed", 0, lo=0, integer=True)
        res["device"] = self.value(raw, "", "device", str, "auto")
        if not DEVICE_RE.match(res["device"]):
            self.fail("device", f"expected auto, cpu, cuda, cuda:N or mps, got {describe_value(res['device'])}")
        res["precision"] = self.choice(raw, "", "precision", PRECISIONS, "fp32")
        res["checkpoint_every"] = self.number(raw, "", "checkpoint_every", 1, lo=0, integer=True)
        res["channels_last"] = self.value(raw, "", "channels_last", bool, False)
        top_data = self.table(raw.get("data", {}), "data")
        evaluate = self.table(raw.get("evaluate", {}), "evaluate")
        self.known(evaluate, "evaluate", EVAL_KEYS)
        default_metrics = evaluate.get("metrics", [{"name": "accuracy"}])
        res["evaluate"] = {"metrics": self.metrics(default_metrics, "evaluate.metrics")}

        stages_raw = self.table(raw.get("stages"), "stages") if "stages" in raw else self.fail("stages", "missing required key: a recipe needs at least one stage")
        if not stages_raw:
            self.fail("stages", "a recipe needs at least one stage")
        stages_raw = self.stage_bases(stages_raw)
        stages: dict[str, Any] = {}
        for sname, sraw in stages_raw.items():
            if not NAME_RE.match(sname):
                self.fail(f"stages.{sname}", "stage names use letters, digits, '_', '-' and '.'")
            stages[sname] = self.stage(sname, sraw, res, top_data, evaluate)
        res["stages"] = stages
        order = self.order(stages)
        for sname in order:
            self.cross_check(sname, stages)
        return res, order

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
            self.fail(f"{key}.dataset", "missing required key: name a dataset (e.g. \"digits\")")
        name = self.value(raw, key, "dataset", str)
        comp = self.plugins.registry("dataset").get(name, source=self.source, key=f"{key}.dataset")
        params = self.params(comp, raw, key, DATA_KEYS)
        out = {
            "dataset": comp.name,
            "batch_size": self.number(raw, key, "batch_size", 64, lo=1, integer=True),
            "eval_batch_size": self.number(raw, key, "eval_batch_size", 256, lo=1, integer=True),
            "num_workers": self.number(raw, key, "num_workers", 0, lo=0, integer=True),
            "drop_last": self.value(raw, key, "drop_last", bool, False),
            "augment": self.value(raw, key, "augment", bool, True),
        }
        out.update(params)
        return out

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

    def stage(self, name: str, raw: Any, top: dict[str, Any], top_data: dict[str, Any], evaluate: dict[str, Any]) -> dict[str, Any]:
        key = f"stages.{name}"
        raw = self.table(raw, key)
        self.known(raw, key, STAGE_KEYS)
        st: dict[str, Any] = {}
        st["description"] = self.value(raw, key, "description", str, name)
        st["teacher"] = self.value(raw, key, "teacher", str | None, None)
        st["compare_to"] = self.value(raw, key, "compare_to", str | None, None)
        st["teacher_cache"] = self.choice(raw, key, "teacher_cache", TEACHER_CACHE, "off")
        st["seed"] = self.number(raw, key, "seed", top["seed"], lo=0, integer=True)
        stage_data = self.table(raw.get("data", {}), f"{key}.data")
        merged = dict(top_data)
        if "dataset" in stage_data and stage_data.get("dataset") != top_data.get("dataset"):
            merged = {k: v for k, v in top_data.items() if k in DATA_KEYS}
        merged.update(stage_data)
        st["data"] = self.data(merged, f"{key}.data" if stage_data else "data")

        model = self.table(raw.get("model") if "model" in raw else self.fail(f"{key}.model", "missing required key"), f"{key}.model")
        self.known(model, f"{key}.model", MODEL_KEYS)
        bb, bb_params = self.component("backbone", model.get("backbone") if "backbone" in model else self.fail(f"{key}.model.backbone", "missing required key"), f"{key}.model.backbone")
        hd, hd_params = self.component("head", model.get("head") if "head" in model else self.fail(f"{key}.model.head", "missing required key"), f"{key}.model.head")
        init = self.value(model, f"{key}.model", "init_from_teacher", list[str], [])
        weights = self.value(model, f"{key}.model", "weights", str | None, None)
        if weights is not None and not Path(weights).is_file():
            self.fail(f"{key}.model.weights", f"file not found: {weights}")
        st["model"] = {
            "backbone": {"name": bb.name, **bb_params},
            "head": {"name": hd.name, **hd_params},
            "init_from_teacher": init,
            "weights": weights,
        }
        groups_ok = ("backbone", "head") + tuple(f"head.{g}" for g in hd.attr("param_groups", ()))
        for i, sel in enumerate(init):
            self.selector(sel, groups_ok, f"{key}.model.init_from_teacher[{i}]")

        # losses
        head_outputs = set(hd.attr("outputs", ("logits",)))
        losses = []
        ids: set[str] = set()
        losses_raw = raw.get("losses", [])
        if isinstance(losses_raw, dict):  # table form: id -> {name = ..., weight = ...}
            items = []
            for lid, lraw in losses_raw.items():
                lkey = f"{key}.losses.{lid}"
                lraw = dict(self.table(lraw, lkey))
                if "id" in lraw and lraw["id"] != lid:
                    self.fail(f"{lkey}.id", "in the table form the key is the id")
                lraw.setdefault("name", lid)
                lraw["id"] = lid
                items.append((lkey, lraw))
        else:
            items = [(f"{key}.losses[{i}]", l) for i, l in enumerate(self.array(losses_raw, f"{key}.losses"))]
        for i, (lkey, lraw) in enumerate(items):
            lraw = self.table(lraw, lkey) if not isinstance(lraw, str) else {"name": lraw}
            comp, params = self.component("loss", lraw, lkey, LOSS_CORE_KEYS)
            lid = self.value(lraw, lkey, "id", str, comp.name)
            if lid in ids:
                self.fail(f"{lkey}.id", f"loss id '{lid}' is used twice in this stage; give one an 'id'")
            ids.add(lid)
            weight = self.number(lraw, lkey, "weight", 1.0)
            if math.isinf(weight):
                self.fail(f"{lkey}.weight", "expected a finite number, got inf")
            missing = [o for o in comp.attr("requires_outputs", ()) if o not in head_outputs]
            if missing:
                self.fail(f"{lkey}.name", f"loss '{comp.name}' needs head outputs {', '.join(missing)}, which head '{hd.name}' does not produce")
            losses.append({"name": comp.name, "id": lid, "weight": weight, **params})
        st["losses"] = losses
        st["_losses_list"] = not isinstance(losses_raw, dict)

        # phases
        phases_raw = self.array(raw.get("phases") if "phases" in raw else self.fail(f"{key}.phases", "missing required key: a stage needs at least one phase"), f"{key}.phases")
        if not phases_raw:
            self.fail(f"{key}.phases", "a stage needs at least one phase")
        phases = []
        names: set[str] = set()
        for i, praw in enumerate(phases_raw):
            pkey = f"{key}.phases[{i}]"
            praw = self.table(praw, pkey)
            kind = self.value(praw, pkey, "kind", str, "train")
            pname = self.value(praw, pkey, "name", str, f"{kind}{i}")
            if pname in names:
                self.fail(f"{pkey}.name", f"phase name '{pname}' is used twice in this stage")
            names.add(pname)
            if kind == "train":
                phases.append(self.train_phase(praw, pkey, pname, ids, groups_ok, losses))
            else:
                if kind not in self.plugins.registry("phase"):
                    kinds = ["train"] + self.plugins.registry("phase").names()
                    self.fail(f"{pkey}.kind", f"unknown phase {kind!r}{suggest(kind, kinds)}; registered: {', '.join(kinds)}")
                comp = self.plugins.registry("phase").get(kind, source=self.source, key=f"{pkey}.kind")
                _, params = self.component("phase", {"name": kind, **{k: v for k, v in praw.items() if k not in PHASE_CORE_KEYS}}, pkey, ("name",))
                required_outputs = [o for o in comp.attr("requires_outputs", ()) if o not in head_outputs]
                if required_outputs:
                    self.fail(f"{pkey}.kind", f"phase '{kind}' needs a head producing {', '.join(required_outputs)}; head '{hd.name}' does not")
                phases.append({"name": pname, "kind": kind, **params})
        st["phases"] = phases
        st["metrics"] = self.metrics(raw["metrics"], f"{key}.metrics") if "metrics" in raw else copy.deepcopy(top["evaluate"]["metrics"])
        for i, m in enumerate(st["metrics"]):
            comp = self.plugins.registry("metric").get(m["name"])
            needs = [r for r in comp.attr("requires_records", ()) if r not in set(hd.attr("record_keys", ())) | {"logits", "labels"}]
            if needs:
                where = f"{key}.metrics[{i}]" if "metrics" in raw else f"evaluate.metrics[{i}]"
                self.fail(f"{where}.name", f"metric '{comp.name}' needs records {', '.join(needs)}, which head '{hd.name}' of stage '{name}' does not record")
        st["_head_cls"] = hd  # removed after cross-checks
        return st

    def selector(self, sel: str, groups_ok: tuple[str, ...], where: str) -> None:
        head_groups = [g for g in groups_ok if g.startswith("head.")]
        if sel in groups_ok or sel.startswith("backbone."):
            return
        if any(sel.startswith(g + ".") for g in head_groups):
            return
        self.fail(where, f"unknown parameter group {sel!r}{suggest(sel, list(groups_ok))}; use one of {', '.join(groups_ok)} (or backbone.<module path>)")

    def train_phase(self, raw, key, name, loss_ids, groups_ok, losses) -> dict[str, Any]:
        self.known(raw, key, PHASE_CORE_KEYS + TRAIN_KEYS)
        ph: dict[str, Any] = {"name": name, "kind": "train"}
        ph["epochs"] = self.number(raw, key, "epochs", REQUIRED, lo=0, integer=True)
        sel = self.value(raw, key, "losses", list[str], [l["id"] for l in losses])
        for i, lid in enumerate(sel):
            if lid not in loss_ids:
                self.fail(f"{key}.losses[{i}]", f"no loss with id '{lid}' in this stage{suggest(lid, sorted(loss_ids))}; stage losses: {', '.join(sorted(loss_ids)) or 'none'}")
        ph["losses"] = sel
        opt = self.table(raw.get("optimizer", {}), f"{key}.optimizer")
        okey = f"{key}.optimizer"
        self.known(opt, okey, OPTIMIZER_KEYS)
        o = {"name": self.choice(opt, okey, "name", OPTIMIZERS, "adam")}
        betas = self.value(opt, okey, "betas", list[float], [0.9, 0.999])
        if len(betas) != 2 or not all(0 <= b < 1 for b in betas):
            self.fail(f"{okey}.betas", f"expected two numbers in [0, 1), got {betas}")
        o["betas"] = betas
        o["eps"] = self.number(opt, okey, "eps", 1e-8, lo=0, lo_open=True)
        o["momentum"] = self.number(opt, okey, "momentum", 0.9, lo=0, hi=1)
        o["nesterov"] = self.value(opt, okey, "nesterov", bool, False)
        o["weight_decay"] = self.number(opt, okey, "weight_decay", 0.0, lo=0)
        ph["optimizer"] = o
        groups = self.array(raw.get("groups") if "groups" in raw else self.fail(f"{key}.groups", "missing required key: list the parameter groups this phase trains"), f"{key}.groups")
        if not groups:
            self.fail(f"{key}.groups", "a train phase needs at least one parameter group")
        out_groups = []
        for i, g in enumerate(groups):
            gkey = f"{key}.groups[{i}]"
            g = self.table(g, gkey)
            self.known(g, gkey, GROUP_KEYS)
            params = self.value(g, gkey, "params", Any)
            if isinstance(params, str):
                params = [params]
            if not isinstance(params, list) or not params or not all(isinstance(p, str) for p in params):
                self.fail(f"{gkey}.params", f"expected a string or a list of strings, got {describe_value(g.get('params'))}")
            for j, p in enumerate(params):
                self.selector(p, groups_ok, f"{gkey}.params" + (f"[{j}]" if isinstance(g["params"], list) else ""))
            out_groups.append({
                "params": params,
                "lr": self.number(g, gkey, "lr", REQUIRED, lo=0, lo_open=True),
                "weight_decay": self.number(g, gkey, "weight_decay", o["weight_decay"], lo=0),
            })
        ph["groups"] = out_groups
        sch = raw.get("scheduler", {"name": "none"})
        if isinstance(sch, str):
            sch = {"name": sch}
        skey = f"{key}.scheduler"
        sch = self.table(sch, skey)
        self.known(sch, skey, SCHEDULER_KEYS)
        s = {"name": self.choice(sch, skey, "name", SCHEDULERS, "none")}
        s["step_size"] = self.number(sch, skey, "step_size", 1, lo=1, integer=True)
        s["gamma"] = self.number(sch, skey, "gamma", 0.1, lo=0, lo_open=True)
        s["milestones"] = self.value(sch, skey, "milestones", list[int], [])
        s["min_lr"] = self.number(sch, skey, "min_lr", 0.0, lo=0)
        if s["name"] == "multistep" and not s["milestones"]:
            self.fail(f"{skey}.milestones", "a multistep schedule needs milestones (epochs)")
        ph["scheduler"] = s
        ph["clip_grad_norm"] = self.number(raw, key, "clip_grad_norm", None, lo=0, lo_open=True)
        ph["limit_batches"] = self.number(raw, key, "limit_batches", None, lo=1, integer=True)
        ph["accumulate"] = self.number(raw, key, "accumulate", 1, lo=1, integer=True)
        return ph

    def order(self, stages: dict[str, Any]) -> list[str]:
        for name, st in stages.items():
            for ref in ("teacher", "compare_to"):
                other = st.get(ref)
                if other is None:
                    continue
                if other not in stages:
                    self.fail(f"stages.{name}.{ref}", f"no stage named '{other}'{suggest(other, list(stages))}; stages: {', '.join(stages)}")
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

    def cross_check(self, name: str, stages: dict[str, Any]) -> None:
        st = stages[name]
        key = f"stages.{name}"
        hd = st.pop("_head_cls")
        is_list = st.pop("_losses_list", True)
        teacher = st.get("teacher")
        for i, l in enumerate(st["losses"]):
            comp = self.plugins.registry("loss").get(l["name"])
            if comp.attr("requires_teacher", False) and not teacher and l["weight"] != 0:
                self.fail(f"{key}.losses[{i}].name" if is_list else f"{key}.losses.{l['id']}.name",
                          f"loss '{l['name']}' needs a teacher: set {key}.teacher to an earlier stage")
        if st["model"]["init_from_teacher"] and not teacher:
            self.fail(f"{key}.model.init_from_teacher", f"needs a teacher: set {key}.teacher")
        if st["teacher_cache"] != "off":
            if not teacher:
                self.fail(f"{key}.teacher_cache", f"caches a teacher's outputs: set {key}.teacher, or teacher_cache = \"off\"")
            if st["data"]["augment"]:
                self.fail(f"{key}.teacher_cache", "the teacher's outputs can be cached only for un-augmented training data "
                          "(augmentation shows the teacher new images every epoch): set data.augment = false, "
                          "or teacher_cache = \"off\"")
        del hd
