"""``kdt inspect``: a stage's models, every module path and its output shape for one batch."""

from __future__ import annotations

import torch

from kdtoolkit.foundation.errors import RecipeError
from kdtoolkit.plugin.manager import PluginManager
from kdtoolkit.recipe.loader import Recipe
from kdtoolkit.plugin.registry import suggest
from kdtoolkit.engine.data import batches, build_data
from kdtoolkit.engine.models import build_model
from kdtoolkit.engine.taps import output_shapes


def _modules(rows: list[tuple[str, str, str, int]], taps: dict[str, str]) -> list[dict]:
    marks = {path: name for name, path in taps.items()}
    return [
        {"path": path, "type": kind, "output_shape": shape, "parameters": n, "tap": marks.get(path)}
        for path, kind, shape, n in rows
    ]


def tables(models: list[dict]):
    """The inspection as :class:`kdtoolkit.foundation.tables.Table` objects, one per model."""
    from kdtoolkit.foundation.tables import Table

    return [
        Table(
            m["title"],
            ["module path", "type", "output shape", "parameters", "tap"],
            [
                [
                    r["path"],
                    r["type"],
                    r["output_shape"],
                    f"{r['parameters']:,}" if r["parameters"] else "",
                    r["tap"] or "",
                ]
                for r in m["modules"]
            ],
        )
        for m in models
    ]


def inspect_stage(recipe: Recipe, stage: str, plugins: PluginManager) -> list[dict]:
    """The student (and the teacher) of ``stage``: every module path, its type, output shape
    for one batch, parameter count and tap name.

    :returns: one dict per model: ``model`` (``student``/``teacher``), ``title``, ``input``
        (the batch shape) and ``modules`` (``path``, ``type``, ``output_shape``,
        ``parameters``, ``tap``), as ``kdt inspect --json`` prints them.
    """
    if stage not in recipe.resolved["stages"]:
        names = list(recipe.resolved["stages"])
        raise RecipeError(
            f"no stage named '{stage}'{suggest(stage, names)}; stages: {', '.join(names)}",
            source=str(recipe.path),
            key="--stage",
        )
    st = recipe.stage(stage)
    data = build_data(st, plugins)
    x, _ = next(iter(batches(data.test, 2, shuffle=False, seed=0, limit=1)))
    shape = "×".join(map(str, x.shape))
    out = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(st["seed"])
        student = build_model(st, data.num_classes, plugins).eval()
        out.append(
            {
                "model": "student",
                "title": f"stage '{stage}': student (input {shape})",
                "input": list(x.shape),
                "modules": _modules(output_shapes(student, x), st["model"].get("taps") or {}),
            }
        )
        if st["teacher"]:
            teacher = build_model(recipe.stage(st["teacher"]), data.num_classes, plugins).eval()
            out.append(
                {
                    "model": "teacher",
                    "title": f"stage '{stage}': teacher '{st['teacher']}' (architecture only)",
                    "input": list(x.shape),
                    "modules": _modules(output_shapes(teacher, x), st.get("teacher_taps") or {}),
                }
            )
    return out
