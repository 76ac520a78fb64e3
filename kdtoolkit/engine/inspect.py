"""``kdt inspect``: a stage's models, every module path and its output shape for one batch."""

from __future__ import annotations

import torch

from ..errors import RecipeError
from ..plugins import PluginManager
from ..recipe import Recipe
from ..registry import suggest
from .data import batches, build_data
from .models import build_model
from .taps import output_shapes


def _table(title: str, rows: list[tuple[str, str, str, int]], taps: dict[str, str]):
    from rich.table import Table

    marks = {path: name for name, path in taps.items()}
    t = Table(title=title)
    t.add_column("module path", no_wrap=True, min_width=max((len(r[0]) for r in rows), default=10))
    for col in ("type", "output shape", "parameters", "tap"):
        t.add_column(col, overflow="fold")
    for path, kind, shape, n in rows:
        t.add_row(path, kind, shape, f"{n:,}" if n else "", marks.get(path, ""))
    return t


def inspect_stage(recipe: Recipe, stage: str, plugins: PluginManager) -> None:
    """Print the student (and the teacher) of ``stage`` with module paths and output shapes."""
    from rich.console import Console

    if stage not in recipe.resolved["stages"]:
        names = list(recipe.resolved["stages"])
        raise RecipeError(f"no stage named '{stage}'{suggest(stage, names)}; stages: {', '.join(names)}",
                          source=str(recipe.path), key="--stage")
    st = recipe.stage(stage)
    data = build_data(st, plugins)
    x, _ = next(iter(batches(data.test, 2, shuffle=False, seed=0, limit=1)))
    console = Console(width=max(Console().width, 120))  # paths are never cut, even in a pipe
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(st["seed"])
        student = build_model(st, data.num_classes, plugins).eval()
        console.print(_table(f"stage '{stage}': student (input {'×'.join(map(str, x.shape))})",
                             output_shapes(student, x), st["model"].get("taps") or {}))
        if st["teacher"]:
            teacher = build_model(recipe.stage(st["teacher"]), data.num_classes, plugins).eval()
            console.print(_table(f"stage '{stage}': teacher '{st['teacher']}' (architecture only)",
                                 output_shapes(teacher, x), st.get("teacher_taps") or {}))
