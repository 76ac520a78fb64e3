"""The Proto2Proto result tables, in the shape of the reproduction's Tables 1 and 2.

Table 1: AAP, AJS (τ = ∞), PMS and accuracy of every prototype model.
Table 2: the same per combination of losses (the model's own loss, ProtoPNet's
or ProtoTree's; patch-prototype correspondence loss; global explanation loss)
for every model compared with the same teacher, then the teacher.
A third table lists AAP and AJS at every evaluated τ.
"""

from __future__ import annotations

import math

from kdtoolkit.foundation import Number, Table

from .evaluation import at_tau
from .metrics import tau_key

#: The prototype model's own loss: ProtoPNet's (cross-entropy, cluster, separation, L1) or ProtoTree's NLL.
MODEL_LOSSES = {"cross_entropy", "cluster", "separation", "l1_last_layer", "prototree_nll"}


def _is_proto(res: dict) -> bool:
    return isinstance(res.get("aap"), dict)


def _pct(x):
    return None if x is None else Number(x, ".2%")


def _uses(res: dict, names: set[str]) -> bool:
    return any(res.get("loss_names", {}).get(lid) in names and w != 0 for lid, w in res.get("losses", {}).items())


def _evaluated(res: dict) -> str:
    pushed = (res.get("state") or res.get("flags") or {}).get("pushed")
    return "pushed" if pushed else ("not pushed" if pushed is False else "no push")


def report_tables(results: dict, recipe: dict) -> list[Table]:
    """Table 1, Table 2 (one per teacher) and the per-τ table for a run's prototype stages."""
    stages = {n: r for n, r in results["stages"].items() if _is_proto(r)}
    if not stages:
        return []
    tau = math.inf
    rows1 = []
    for name, r in stages.items():
        rows1.append(
            [
                r.get("description", name),
                name,
                at_tau(r.get("aap"), tau),
                at_tau(r.get("ajs"), tau),
                r.get("pms"),
                _pct(r.get("accuracy")),
                _evaluated(r),
            ]
        )
    t1 = Table(
        "Table 1: accuracy and interpretability (τ = ∞)",
        ["model", "stage", "AAP", "AJS (↑)", "PMS (↑)", "accuracy (↑)", "evaluated"],
        rows1,
        note="AJS and PMS of a student are against its teacher (or its compare_to stage); a teacher is compared "
        "with itself. 'evaluated' says whether the evaluated prototypes are the pushed ones.",
        key="proto2proto_table1",
    )
    tables = [t1]
    # Table 2: loss ablations, grouped by reference model
    refs: dict[str, list[str]] = {}
    for name, r in stages.items():
        ref = r.get("teacher") or r.get("compare_to")
        if ref and ref in stages:
            refs.setdefault(ref, []).append(name)
    for ref, names in refs.items():
        mark = lambda b: "✓" if b else ""
        rows2 = []
        for name in names:
            r = stages[name]
            rows2.append(
                [
                    name,
                    mark(_uses(r, MODEL_LOSSES)),
                    mark(_uses(r, {"patch_prototype_correspondence"})),
                    mark(_uses(r, {"global_explanation"})),
                    at_tau(r.get("aap"), tau),
                    at_tau(r.get("ajs"), tau),
                    r.get("pms"),
                    _pct(r.get("accuracy")),
                ]
            )
        tr = stages[ref]
        rows2.append(
            [
                f"{ref} (teacher)",
                "",
                "",
                "",
                at_tau(tr.get("aap"), tau),
                at_tau(tr.get("ajs"), tau),
                tr.get("pms"),
                _pct(tr.get("accuracy")),
            ]
        )
        tables.append(
            Table(
                f"Table 2: loss combinations against teacher '{ref}' (τ = ∞)",
                ["stage", "L_model", "L_ppc", "L_global", "AAP", "AJS (↑)", "PMS (↑)", "accuracy (↑)"],
                rows2,
                note="L_model: the prototype model's own loss (ProtoPNet: cross-entropy, cluster, separation, L1; "
                "ProtoTree: NLL); L_ppc: patch-prototype correspondence loss; L_global: global explanation loss. "
                "A ✓ means the loss had a non-zero weight.",
                key="proto2proto_table2",
            )
        )
    taus: list[str] = []
    for r in stages.values():
        for k in list(r.get("aap") or {}) + list(r.get("ajs") or {}):
            if k not in taus:
                taus.append(k)
    rows3 = []
    for name, r in stages.items():
        rows3.append([name, "AAP", *[(r.get("aap") or {}).get(k) for k in taus]])
        if r.get("ajs"):
            rows3.append([name, "AJS", *[(r.get("ajs") or {}).get(k) for k in taus]])
    tables.append(
        Table(
            "AAP and AJS at every threshold τ",
            ["stage", "metric", *[f"τ={k}" for k in taus]],
            rows3,
            key="proto2proto_tau",
        )
    )
    return tables


__all__ = ["report_tables", "tau_key"]
