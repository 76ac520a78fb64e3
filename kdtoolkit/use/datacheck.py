"""``kdt check`` and ``kdt run --check-data``: decode every image a recipe's datasets hold.

Training reads an image when a batch needs it, so an unreadable file stops a
run wherever it happens to come up, hours in.  :func:`check_data` builds the
train and test split of every distinct dataset of a recipe (stages with the
same dataset parameters share one check), reads every item once, on a few
threads, with a progress bar, and reports every unreadable file at once: one
line per file, then one :class:`~kdtoolkit.foundation.errors.DataError` (exit code 2).

A dataset checks an item with its ``check_item(i)`` method when it has one
(the built-in image datasets decode the file, and crop it to its box, without
resizing); otherwise by reading ``dataset[i]``. A dataset may also list, in
``special_files``, paths it found where images lie that are not regular files
(FIFOs, devices, sockets, links to them, broken links) and skipped without
opening them: each is reported as a problem too (``image_folder`` does).
Every image read is subject to the pixel limit of :mod:`kdtoolkit.foundation.images`.
"""

from __future__ import annotations

import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any
from collections.abc import Callable

from kdtoolkit.foundation.errors import DataError, KdtError
from kdtoolkit.foundation.images import special_files_line
from kdtoolkit.plugin.manager import PluginManager
from kdtoolkit.foundation.tables import Table

SPLITS = ("train", "test")


@dataclass
class SplitCheck:
    """The outcome of checking one split of one dataset.

    :ivar dataset: the dataset's ``name``.
    :ivar split: ``train`` or ``test``.
    :ivar stages: the stages that use it.
    :ivar images: items checked.
    :ivar classes: the dataset's ``num_classes``.
    :ivar problems: one line per unreadable item, naming its file, then one per special file.
    :ivar special: how many of ``problems`` are special files (not regular files; not items).
    :ivar seconds: wall-clock time of the check.
    """

    dataset: str
    split: str
    stages: list[str]
    images: int
    classes: int
    problems: list[str] = field(default_factory=list)
    seconds: float = 0.0
    special: int = 0


def distinct_data(recipe, plugins: PluginManager) -> list[tuple[Any, dict[str, Any], list[str]]]:
    """``(dataset component, its parameters, stages)`` for every distinct dataset of ``recipe``, in stage order."""
    from kdtoolkit.engine.data import dataset_params

    found: dict[str, tuple[Any, dict[str, Any], list[str]]] = {}
    for name in recipe.order:
        spec = recipe.stage(name)["data"]
        comp = plugins.registry("dataset").get(spec["dataset"])
        params = dataset_params(comp, spec)
        key = json.dumps({"dataset": comp.name, **params}, sort_keys=True, default=str)
        found.setdefault(key, (comp, params, []))[2].append(name)
    return list(found.values())


def build_split(recipe, stage: str, comp, params: dict[str, Any], split: str):
    """The un-augmented ``split`` of a dataset; a :class:`KdtError` names the recipe and the stage's data key,
    as in a run's preflight."""
    from kdtoolkit.engine.data import component_split

    try:
        return component_split(comp, params, split)
    except KdtError as exc:
        where = f"stages.{stage}.data" + (f".{exc.key}" if exc.key else "")
        src = f"{recipe.path}: {where}: {exc.source}" if exc.source else str(recipe.path)
        raise type(exc)(exc.message, source=src, key=None if exc.source else where) from None


def _item_name(dataset, split: str, i: int) -> str:
    samples: Any = getattr(dataset, "samples", None)
    try:
        return str(samples[i][0])
    except Exception:  # no sample list: name the item by its index
        return f"{getattr(dataset, 'name', type(dataset).__name__)} ({split}) item {i}"


def check_item(dataset, split: str, i: int) -> str | None:
    """``None`` if item ``i`` reads, else one line naming it and what went wrong."""
    check = getattr(dataset, "check_item", None)
    try:
        if check is not None:
            check(i)
        else:
            dataset[i]
    except KdtError as exc:
        return str(exc) if exc.source else f"{_item_name(dataset, split, i)}: {exc}"
    except Exception as exc:  # a dataset's own failure: reported with the item, never a traceback
        detail = " ".join(str(exc).split()) or type(exc).__name__
        return f"{_item_name(dataset, split, i)}: {type(exc).__name__}: {detail}"
    return None


def _bar(quiet: bool):
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return Progress(
        TextColumn("[bold blue]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[bad]}"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        disable=quiet,
    )


def check_split(dataset, split: str, bar, workers: int, label: str = "") -> list[str]:
    """Check every item of ``dataset`` on ``workers`` threads, advancing the rich progress ``bar``;
    the problem lines in item order."""
    n = len(dataset)
    task = bar.add_task(f"check {label or getattr(dataset, 'name', type(dataset).__name__)} {split}", total=n, bad="")
    problems = []
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for problem in pool.map(lambda i: check_item(dataset, split, i), range(n)):
            if problem is not None:
                problems.append(problem)
            bar.update(task, advance=1, bad=f"[red]{len(problems)} unreadable" if problems else "")
    return problems


def check_data(
    recipe,
    plugins: PluginManager,
    *,
    quiet: bool = False,
    workers: int | None = None,
    echo: Callable[[str], None] | None = None,
) -> list[SplitCheck]:
    """Read every item of the train and test split of every distinct dataset of ``recipe``.

    :param quiet: no progress bar.
    :param workers: threads decoding images (default: the CPU count, at most 8).
    :param echo: where problem lines go (default: standard error).
    :raises KdtError: when a dataset cannot be built (as in a run's preflight), or, after every
        unreadable item has been listed through ``echo``, one :class:`DataError` counting them.
    """
    workers = workers or min(8, os.cpu_count() or 1)
    checks = []
    with _bar(quiet) as bar:
        for comp, params, stages in distinct_data(recipe, plugins):
            for split in SPLITS:
                ds = build_split(recipe, stages[0], comp, params, split)
                start = time.perf_counter()
                problems = check_split(ds, split, bar, workers, label=comp.name)
                special_lines = [special_files_line(p) for p in (getattr(ds, "special_files", None) or ())]
                checks.append(
                    SplitCheck(
                        str(getattr(ds, "name", comp.name)),
                        split,
                        stages,
                        len(ds),
                        int(getattr(ds, "num_classes", 0)),
                        problems + special_lines,
                        time.perf_counter() - start,
                        len(special_lines),
                    )
                )
    bad = [p for c in checks for p in c.problems]
    if bad:
        echo = echo or (lambda line: print(line, file=sys.stderr, flush=True))
        for line in bad:
            echo(line)
        total = sum(c.images for c in checks)
        special = sum(c.special for c in checks)
        what = [f"{len(bad) - special} of {total} images cannot be read"] if len(bad) > special else []
        if special:
            what.append(
                f"{special} special file{'s' if special > 1 else ''} (a FIFO, device or socket, a link to one, "
                f"or a broken link) {'lie' if special > 1 else 'lies'} among the images"
            )
        raise DataError(f"{' and '.join(what)} (listed above); fix or remove them", source=str(recipe.path))
    return checks


def summary_table(checks: list[SplitCheck]) -> Table:
    """The table ``kdt check`` prints: one row per dataset split."""
    rows = [
        [c.dataset, c.split, ", ".join(c.stages), c.images, c.classes, len(c.problems), f"{c.seconds:.1f}"]
        for c in checks
    ]
    total = sum(c.images for c in checks)
    return Table(
        "kdt check: every image decoded",
        ["dataset", "split", "stages", "images", "classes", "unreadable", "seconds"],
        rows,
        note=f"{total} images in {len(checks)} splits, all readable.",
    )
