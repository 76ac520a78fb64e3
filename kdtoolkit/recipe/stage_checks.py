"""Validation of one stage: data, model, taps, losses, phases, optimisers, schedules, metrics.

:class:`StageChecks` checks a stage's table, and the tables a stage holds, with the primitives of
:class:`kdtoolkit.recipe.checks.Checks` (``fail``, ``table``, ``value``, ``number``, ``component``, ...),
which it inherits. The top level (the recipe's keys, stage bases, the order of the stages) is
:class:`kdtoolkit.recipe.validator.Validator`'s, which inherits these checks.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

from kdtoolkit.plugin.declared import declared_taps, record_keys
from kdtoolkit.plugin.params import (
    MAX_BATCH_SIZE,
    MAX_EPOCHS,
    MAX_INPUT_BATCH_BYTES,
    MAX_NUM_WORKERS,
    MAX_SEED,
    REQUIRED,
    describe_value,
)
from kdtoolkit.plugin.registry import RESERVED_KEYS, suggest
from kdtoolkit.recipe.checks import Checks

STAGE_KEYS = (
    "base",
    "description",
    "teacher",
    "compare_to",
    "seed",
    "data",
    "model",
    "losses",
    "phases",
    "metrics",
    "teacher_cache",
    "teacher_taps",
)
TEACHER_CACHE = ("off", "memory", "disk")
MODEL_KEYS = ("backbone", "head", "init_from_teacher", "weights", "strict", "taps")
LOSS_CORE_KEYS = RESERVED_KEYS["loss"]
PHASE_CORE_KEYS = RESERVED_KEYS["phase"]
TRAIN_KEYS = (
    "epochs",
    "losses",
    "optimizer",
    "groups",
    "scheduler",
    "clip_grad_norm",
    "limit_batches",
    "accumulate",
)
GROUP_KEYS = ("params", "lr", "weight_decay")
OPTIMIZER_CORE_KEYS = RESERVED_KEYS["optimizer"]
SCHEDULER_CORE_KEYS = RESERVED_KEYS["scheduler"]
#: The keys of a ``data`` table the core reads itself (the dataset's own parameters are the others).
DATA_KEYS = RESERVED_KEYS["dataset"]


class StageChecks(Checks):
    """Stage-level checks of the recipe validator: a stage's table and the tables it holds."""

    DATA_KEYS = DATA_KEYS

    def stage(
        self, name: str, raw: Any, top: dict[str, Any], top_data: dict[str, Any], evaluate: dict[str, Any]
    ) -> dict[str, Any]:
        key = f"stages.{name}"
        raw = self.table(raw, key)
        self.known(raw, key, STAGE_KEYS)
        st: dict[str, Any] = {}
        st["description"] = self.value(raw, key, "description", str, name)
        st["teacher"] = self.value(raw, key, "teacher", str | None, None)
        st["compare_to"] = self.value(raw, key, "compare_to", str | None, None)
        st["teacher_cache"] = self.choice(raw, key, "teacher_cache", TEACHER_CACHE, "off")
        st["seed"] = self.number(raw, key, "seed", top["seed"], lo=0, hi=MAX_SEED, integer=True)
        stage_data = self.table(raw.get("data", {}), f"{key}.data")
        merged = dict(top_data)
        if "dataset" in stage_data and stage_data.get("dataset") != top_data.get("dataset"):
            merged = {k: v for k, v in top_data.items() if k in self.DATA_KEYS}
        merged.update(stage_data)
        st["data"] = self.data(merged, f"{key}.data" if stage_data else "data")
        hd = self.model(raw, key, st)
        teacher_taps = self.taps(raw.get("teacher_taps", {}), f"{key}.teacher_taps")
        if teacher_taps:
            st["teacher_taps"] = teacher_taps
        groups_ok = ("backbone", "head") + tuple(f"head.{g}" for g in hd.attr("param_groups", ()))
        st["losses"], st["_losses_list"] = self.losses(raw, key, st, hd)
        groups_ok += tuple(f"loss.{l['id']}" for l in st["losses"])
        st["phases"] = self.phases(raw, key, {l["id"] for l in st["losses"]}, groups_ok, st["losses"], hd)
        st["metrics"] = (
            self.metrics(raw["metrics"], f"{key}.metrics")
            if "metrics" in raw
            else copy.deepcopy(top["evaluate"]["metrics"])
        )
        for i, m in enumerate(st["metrics"]):
            comp = self.plugins.registry("metric").get(m["name"])
            needs = [
                r for r in comp.attr("requires_records", ()) if r not in set(record_keys(hd)) | {"logits", "labels"}
            ]
            if needs:
                where = f"{key}.metrics[{i}]" if "metrics" in raw else f"evaluate.metrics[{i}]"
                self.fail(
                    f"{where}.name",
                    f"metric '{comp.name}' needs records {', '.join(needs)}, which head '{hd.name}' of stage "
                    f"'{name}' does not record",
                )
        st["_head_cls"] = hd  # removed after cross-checks
        return st

    def taps(self, raw: Any, key: str) -> dict[str, str]:
        """A tap table: tap name → dotted module path (checked against the built model later)."""
        taps = self.value({"taps": raw}, "", "taps", dict[str, str]) if raw else {}
        for name, path in taps.items():
            if not name or not path or not all(part for part in path.split(".")):
                self.fail(
                    f"{key}.{name}",
                    f'expected a dotted module path such as "backbone.body.layer3", got {describe_value(path)}',
                )
        return taps

    def model(self, raw: dict[str, Any], key: str, st: dict[str, Any]):
        mkey = f"{key}.model"
        model = self.table(raw.get("model") if "model" in raw else self.fail(mkey, "missing required key"), mkey)
        self.known(model, mkey, MODEL_KEYS)
        bb, bb_params = self.component(
            "backbone",
            model.get("backbone") if "backbone" in model else self.fail(f"{mkey}.backbone", "missing required key"),
            f"{mkey}.backbone",
        )
        hd, hd_params = self.component(
            "head",
            model.get("head") if "head" in model else self.fail(f"{mkey}.head", "missing required key"),
            f"{mkey}.head",
        )
        init = self.value(model, mkey, "init_from_teacher", list[str], [])
        written = self.value(model, mkey, "weights", str | None, None)
        weights = self.resolve_path(written, f"{mkey}.weights")
        if weights is not None and not Path(weights).is_file():
            self.fail(f"{mkey}.weights", f"file not found: {written}" + (f" ({weights})" if weights != written else ""))
        st["model"] = {
            "backbone": {"name": bb.name, **bb_params},
            "head": {"name": hd.name, **hd_params},
            "init_from_teacher": init,
            "weights": weights,
        }
        if weights is not None:
            st["model"]["strict"] = self.value(model, mkey, "strict", bool, True)
        taps = self.taps(model.get("taps", {}), f"{mkey}.taps")
        if taps:
            st["model"]["taps"] = taps
        groups_ok = ("backbone", "head") + tuple(f"head.{g}" for g in hd.attr("param_groups", ()))
        for i, sel in enumerate(init):
            self.selector(sel, groups_ok, f"{mkey}.init_from_teacher[{i}]")
        return hd

    def losses(self, raw: dict[str, Any], key: str, st: dict[str, Any], hd) -> tuple[list[dict[str, Any]], bool]:
        head_outputs = set(hd.attr("outputs", ("logits",)))
        losses, ids = [], set()
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
        for lkey, lraw in items:
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
                self.fail(
                    f"{lkey}.name",
                    f"loss '{comp.name}' needs head outputs {', '.join(missing)}, which head '{hd.name}' "
                    "does not produce",
                )
            self.loss_inputs(comp, params, lkey, st)
            losses.append({"name": comp.name, "id": lid, "weight": weight, **params})
        return losses, not isinstance(losses_raw, dict)

    def loss_inputs(self, comp, params: dict[str, Any], lkey: str, st: dict[str, Any]) -> None:
        """The taps, labels and per-sample indices a loss reads exist."""
        for attr, declared, where in (
            ("requires_taps", st["model"].get("taps") or {}, "model.taps"),
            ("requires_teacher_taps", st.get("teacher_taps") or {}, "teacher_taps"),
        ):
            for tap in declared_taps(comp, attr, params):
                if tap not in declared:
                    known = ", ".join(declared) or "none"
                    self.fail(
                        f"{lkey}.name",
                        f"loss '{comp.name}' reads the tap '{tap}', which the stage's {where} does not "
                        f'declare (declared: {known}); add {where} = {{ {tap} = "<module path>" }}',
                    )
        dataset = self.plugins.registry("dataset").get(st["data"]["dataset"])
        if comp.attr("requires_labels", True) and not dataset.attr("provides_labels", True):
            self.fail(
                f"{lkey}.name", f"loss '{comp.name}' needs labels, which dataset '{dataset.name}' does not provide"
            )

    def phases(
        self, raw: dict[str, Any], key: str, ids: set[str], groups_ok: tuple[str, ...], losses: list, hd
    ) -> list[dict[str, Any]]:
        phases_raw = self.array(
            raw.get("phases")
            if "phases" in raw
            else self.fail(f"{key}.phases", "missing required key: a stage needs at least one phase"),
            f"{key}.phases",
        )
        if not phases_raw:
            self.fail(f"{key}.phases", "a stage needs at least one phase")
        head_outputs = set(hd.attr("outputs", ("logits",)))
        phases: list[dict[str, Any]] = []
        names: dict[str, str] = {}
        for i, praw in enumerate(phases_raw):
            pkey = f"{key}.phases[{i}]"
            praw = self.table(praw, pkey)
            kind = self.value(praw, pkey, "kind", str, "train")
            pname = self.value(praw, pkey, "name", str, f"{kind}{i}")
            self.path_name(pname, f"{pkey}.name")  # phases name files: push-<phase>.json
            other = names.get(pname.casefold())
            if other == pname:
                self.fail(f"{pkey}.name", f"phase name '{pname}' is used twice in this stage")
            if other is not None:
                self.fail(
                    f"{pkey}.name",
                    f"phase names '{other}' and '{pname}' differ only in case: one file on a "
                    "case-insensitive file system",
                )
            names[pname.casefold()] = pname
            if kind == "train":
                phases.append(self.train_phase(praw, pkey, pname, ids, groups_ok, losses))
                continue
            if kind not in self.plugins.registry("phase"):
                kinds = ["train"] + self.plugins.registry("phase").names()
                self.fail(
                    f"{pkey}.kind", f"unknown phase {kind!r}{suggest(kind, kinds)}; registered: {', '.join(kinds)}"
                )
            comp = self.plugins.registry("phase").get(kind, source=self.source, key=f"{pkey}.kind")
            trains = bool(comp.attr("trains", False))
            own = {k: v for k, v in praw.items() if k not in PHASE_CORE_KEYS and not (trains and k in TRAIN_KEYS)}
            _, params = self.component("phase", {"name": kind, **own}, pkey, ("name",))
            required_outputs = [o for o in comp.attr("requires_outputs", ()) if o not in head_outputs]
            if required_outputs:
                self.fail(
                    f"{pkey}.kind",
                    f"phase '{kind}' needs a head producing {', '.join(required_outputs)}; head '{hd.name}' does not",
                )
            entry = {"name": pname, "kind": kind, **params}
            if trains:
                train_raw = {k: v for k, v in praw.items() if k in TRAIN_KEYS or k in PHASE_CORE_KEYS}
                entry.update(
                    {
                        k: v
                        for k, v in self.train_phase(train_raw, pkey, pname, ids, groups_ok, losses).items()
                        if k not in PHASE_CORE_KEYS
                    }
                )
            phases.append(entry)
        return phases

    def selector(self, sel: str, groups_ok: tuple[str, ...], where: str) -> None:
        if sel in groups_ok or sel.startswith("backbone."):
            return
        if any(sel.startswith(g + ".") for g in groups_ok if g.startswith(("head.", "loss."))):
            return
        self.fail(
            where,
            f"unknown parameter group {sel!r}{suggest(sel, list(groups_ok))}; use one of {', '.join(groups_ok)} "
            "(or backbone.<module path>)",
        )

    def train_phase(self, raw, key, name, loss_ids, groups_ok, losses) -> dict[str, Any]:
        self.known(raw, key, PHASE_CORE_KEYS + TRAIN_KEYS)
        ph: dict[str, Any] = {"name": name, "kind": "train"}
        ph["epochs"] = self.number(raw, key, "epochs", REQUIRED, lo=0, hi=MAX_EPOCHS, integer=True)
        sel = self.value(raw, key, "losses", list[str], [l["id"] for l in losses])
        for i, lid in enumerate(sel):
            if lid not in loss_ids:
                self.fail(
                    f"{key}.losses[{i}]",
                    f"no loss with id '{lid}' in this stage{suggest(lid, sorted(loss_ids))}; stage losses: "
                    f"{', '.join(sorted(loss_ids)) or 'none'}",
                )
        ph["losses"] = sel
        ph["optimizer"] = self.optimizer(raw.get("optimizer", {}), f"{key}.optimizer")
        ph["groups"] = self.groups(raw, key, groups_ok, ph["optimizer"]["weight_decay"])
        ph["scheduler"] = self.scheduler(raw.get("scheduler", {"name": "none"}), f"{key}.scheduler")
        ph["clip_grad_norm"] = self.number(raw, key, "clip_grad_norm", None, lo=0, lo_open=True)
        ph["limit_batches"] = self.number(raw, key, "limit_batches", None, lo=1, integer=True)
        ph["accumulate"] = self.number(raw, key, "accumulate", 1, lo=1, hi=MAX_BATCH_SIZE, integer=True)
        return ph

    def optimizer(self, raw: Any, okey: str) -> dict[str, Any]:
        opt = self.table({"name": raw} if isinstance(raw, str) else raw, okey)
        comp, params = self.component("optimizer", {"name": "adam", **opt}, okey, OPTIMIZER_CORE_KEYS)
        return {"name": comp.name, **params, "weight_decay": self.number(opt, okey, "weight_decay", 0.0, lo=0)}

    def scheduler(self, raw: Any, skey: str) -> dict[str, Any]:
        sch = self.table({"name": raw} if isinstance(raw, str) else raw, skey)
        comp, params = self.component("scheduler", {"name": "none", **sch}, skey, SCHEDULER_CORE_KEYS)
        out = {"name": comp.name, **params}
        warmup = self.number(sch, skey, "warmup_epochs", 0, lo=0, hi=MAX_EPOCHS, integer=True)
        if warmup:
            out["warmup_epochs"] = warmup
            out["warmup_start_factor"] = self.number(sch, skey, "warmup_start_factor", 0.1, lo=0, lo_open=True, hi=1)
        elif "warmup_start_factor" in sch:
            self.fail(f"{skey}.warmup_start_factor", "applies only with warmup_epochs > 0")
        return out

    def groups(
        self, raw: dict[str, Any], key: str, groups_ok: tuple[str, ...], weight_decay: float
    ) -> list[dict[str, Any]]:
        groups = self.array(
            raw.get("groups")
            if "groups" in raw
            else self.fail(f"{key}.groups", "missing required key: list the parameter groups this phase trains"),
            f"{key}.groups",
        )
        if not groups:
            self.fail(f"{key}.groups", "a train phase needs at least one parameter group")
        out = []
        for i, g in enumerate(groups):
            gkey = f"{key}.groups[{i}]"
            g = self.table(g, gkey)
            self.known(g, gkey, GROUP_KEYS)
            params = self.value(g, gkey, "params", Any)
            if isinstance(params, str):
                params = [params]
            if not isinstance(params, list) or not params or not all(isinstance(p, str) for p in params):
                self.fail(
                    f"{gkey}.params", f"expected a string or a list of strings, got {describe_value(g.get('params'))}"
                )
            for j, p in enumerate(params):
                self.selector(p, groups_ok, f"{gkey}.params" + (f"[{j}]" if isinstance(g["params"], list) else ""))
            out.append(
                {
                    "params": params,
                    "lr": self.number(g, gkey, "lr", REQUIRED, lo=0, lo_open=True),
                    "weight_decay": self.number(g, gkey, "weight_decay", weight_decay, lo=0),
                }
            )
        return out

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
