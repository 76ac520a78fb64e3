"""The ProtoTree table of ``results.md``: accuracy per inference mode, fidelity, path length."""

from __future__ import annotations

from kdtoolkit.foundation import Number, Table


def _pct(x):
    return None if x is None else Number(x, ".2%")


def _pruned(res: dict) -> str | None:
    for h in res.get("history", []):
        if h.get("kind") == "prune":
            return f"{h['leaves_kept']}/{h['leaves']}"
    return None


def report_tables(results: dict, recipe: dict) -> list[Table]:
    """One table over every stage with a ``tree_modes`` result."""
    rows = []
    for name, r in results["stages"].items():
        tm = r.get("tree_modes")
        if not isinstance(tm, dict):
            continue
        acc, fid, path = tm.get("accuracy", {}), tm.get("fidelity", {}), tm.get("mean_path_length", {})
        rows.append(
            [
                name,
                _pct(acc.get("soft")),
                _pct(acc.get("sample_max")),
                _pct(acc.get("greedy")),
                _pct(fid.get("sample_max")),
                _pct(fid.get("greedy")),
                path.get("soft"),
                path.get("sample_max"),
                path.get("greedy"),
                _pruned(r),
            ]
        )
    if not rows:
        return []
    return [
        Table(
            "ProtoTree inference modes",
            [
                "stage",
                "soft acc.",
                "sample_max acc.",
                "greedy acc.",
                "sample_max fidelity",
                "greedy fidelity",
                "path soft",
                "path sample_max",
                "path greedy",
                "leaves kept",
            ],
            rows,
            note="Fidelity: fraction of test images where the deterministic mode predicts the soft mode's class. "
            "Path: mean number of decisions (soft uses every path: the longest kept one). "
            "Leaves kept: after the prune phase.",
            key="prototree_modes",
        )
    ]
