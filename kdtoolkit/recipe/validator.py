"""Recipe validation: every key, type, range, component name, cross-reference and file.

:class:`Validator` checks a raw recipe dict (after ``extends`` and ``--set``)
and returns it with every default filled in. Any problem raises
:class:`~kdtoolkit.foundation.errors.RecipeError` naming the file and the key path. The
recipe keys are documented in ``docs/recipes.md``.

One validator in three layers, each readable alone: the primitives (:class:`kdtoolkit.recipe.checks.Checks`:
values, numbers, tables, components, paths), the checks of one stage and of the tables a stage holds
(:class:`kdtoolkit.recipe.stage_checks.StageChecks`: data, model, taps, losses, phases, optimisers,
schedules, metrics) and, here, the recipe as a whole: its top-level keys, seeds, stage bases, the order
of the stages and what a stage needs of its teacher.
"""

from __future__ import annotations

import copy
from typing import Any

from kdtoolkit.foundation.device import DEVICE_CHOICES, DEVICE_PATTERN
from kdtoolkit.foundation.paths import NAME_RE, key_name, safe_name  # noqa: F401  (NAME_RE: the name rule, kept importable here)
from kdtoolkit.plugin.params import MAX_SEED, describe_value
from kdtoolkit.plugin.registry import suggest
from kdtoolkit.recipe.stage_checks import DATA_KEYS as DATA_KEYS, StageChecks  # DATA_KEYS: importable here too

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

    def cross_check(self, name: str, stages: dict[str, Any]) -> None:
        """What stage ``name`` needs of a teacher (its losses, ``init_from_teacher``, ``teacher_taps``,
        ``teacher_cache``), once every stage is read; removes the markers :meth:`StageChecks.stage` left."""
        st = stages[name]
        key = f"stages.{name}"
        st.pop("_head_cls")
        is_list = st.pop("_losses_list", True)
        teacher = st.get("teacher")
        for i, l in enumerate(st["losses"]):
            comp = self.plugins.registry("loss").get(l["name"])
            if comp.attr("requires_teacher", False) and not teacher and l["weight"] != 0:
                self.fail(
                    f"{key}.losses[{i}].name" if is_list else f"{key}.losses.{l['id']}.name",
                    f"loss '{l['name']}' needs a teacher: set {key}.teacher to an earlier stage",
                )
        if st["model"]["init_from_teacher"] and not teacher:
            self.fail(f"{key}.model.init_from_teacher", f"needs a teacher: set {key}.teacher")
        if st.get("teacher_taps") and not teacher:
            self.fail(f"{key}.teacher_taps", f"taps a teacher: set {key}.teacher")
        if st["teacher_cache"] != "off":
            if not teacher:
                self.fail(
                    f"{key}.teacher_cache", f'caches a teacher\'s outputs: set {key}.teacher, or teacher_cache = "off"'
                )
            if st["data"]["augment"]:
                self.fail(
                    f"{key}.teacher_cache",
                    "the teacher's outputs can be cached only for un-augmented training data "
                    "(augmentation shows the teacher new images every epoch): set data.augment = false, "
                    'or teacher_cache = "off"',
                )
