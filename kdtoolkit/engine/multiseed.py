"""Several seeds in one command: ``kdt run RECIPE --seeds 0,1,2`` (or the recipe's ``seeds`` key).

The recipe runs once per seed *n*, into ``OUT/seed-<n>/``: each a complete,
ordinary run directory (``kdt metrics OUT/seed-0`` works as for any run),
with its own resume. Then ``OUT/report.md`` aggregates them
(:mod:`kdtoolkit.results.aggregate`: mean ± standard deviation over the seeds).

The seed rule: the run of seed *n* is the recipe with

- the top-level ``seed`` replaced by *n*;
- every stage seed *s* (the stage's own ``seed``, or the top-level one it
  inherited) replaced by :func:`stage_seed` ``(s, n)`` =
  ``derive_seed(s, n, 3)``: a 63-bit SHA-256 hash of ``"s,n,3"`` (3 marks
  the purpose, as 1 and 2 mark the per-epoch seeds of
  :mod:`kdtoolkit.engine.data`);
- ``seeds`` unset (``null``: each folder holds one run).

So the seeds of a stage differ between seed folders, are the same on every
machine, and stages that share a seed in the recipe share it in every seed
folder. No seed folder equals the run without ``--seeds`` (whose stage seeds
are the recipe's own). The values are in each folder's
``recipe.resolved.toml`` (and ``run.json``'s ``seed`` is *n*), and in
``OUT/seeds.json``. The stage hashes include the stage seed, so a seed
folder never reuses another seed's stages.
"""

from __future__ import annotations

import copy
import signal
from dataclasses import replace
from pathlib import Path

from kdtoolkit.foundation.errors import Interrupted, KdtError
from kdtoolkit.foundation.paths import inside

#: The last part of the hash input of :func:`stage_seed` (the purpose).
SEED_PURPOSE = 3


def parse_seeds(text: str, source: str = "--seeds") -> list[int]:
    """``"0,1,2"`` → ``[0, 1, 2]``: distinct integers from 0 to 2^63-1, comma-separated.

    :raises KdtError: (exit code 2) for an empty item, a non-integer, a
        negative value, a value over 2^63-1 (a 64-bit generator seed) or a
        seed listed twice.
    """
    from kdtoolkit.plugin.params import MAX_SEED

    seeds: list[int] = []
    for item in text.split(","):
        item = item.strip()
        if not (item.isascii() and item.isdigit()):
            what = "an empty item" if not item else repr(item[:40])
            raise KdtError(f"expected comma-separated integers >= 0 (e.g. 0,1,2), got {what}", source=source)
        if len(item.lstrip("0")) > 19 or int(item) > MAX_SEED:
            raise KdtError(
                f"seed {item[:40]}{'...' if len(item) > 40 else ''} is over {MAX_SEED} (2^63-1, a 64-bit "
                "generator seed)",
                source=source,
            )
        if int(item) in seeds:
            raise KdtError(f"seed {int(item)} is listed twice", source=source)
        seeds.append(int(item))
    return seeds


def stage_seed(seed: int, n: int) -> int:
    """The seed of a stage whose recipe seed is ``seed``, in the run of seed ``n`` (a 63-bit integer).

    It is :func:`kdtoolkit.engine.data.derive_seed` ``(seed, n, SEED_PURPOSE)``.
    """
    from kdtoolkit.engine.data import derive_seed

    return derive_seed(seed, n, SEED_PURPOSE)


def seed_recipe(recipe, n: int):
    """The :class:`~kdtoolkit.recipe.loader.Recipe` of seed ``n`` (see the module's seed rule)."""
    from kdtoolkit.recipe.loader import Recipe

    resolved = copy.deepcopy(recipe.resolved)
    resolved["seed"] = n
    resolved["seeds"] = None
    for st in resolved["stages"].values():
        st["seed"] = stage_seed(st["seed"], n)
    return Recipe(path=recipe.path, resolved=resolved, order=list(recipe.order))


def seed_dir(out: str | Path, n: int) -> Path:
    """``out/seed-<n>``: where the run of seed ``n`` goes (checked to lie inside ``out``:
    :func:`kdtoolkit.foundation.paths.inside`)."""
    return inside(Path(out), f"seed-{n}", what="output folder")


def chosen_seeds(option: str | None, recipe) -> list[int] | None:
    """The seeds of a ``kdt run``: ``--seeds`` if given, else the recipe's ``seeds``; ``None`` for a single run."""
    if option is not None:
        return parse_seeds(option) or None
    return recipe.resolved.get("seeds") or None


def _stop_between(stop, dist, device) -> bool:
    from kdtoolkit.foundation.device import collective_device

    return dist.any(stop.requested, collective_device(device))


def run_seeds(recipe, seeds: list[int], options, plugins, dist, *, as_json: bool = False) -> None:
    """Run ``recipe`` once per seed into ``options.out/seed-<n>``, then write and print ``report.md``.

    Every rank of a distributed run runs the seeds in turn; rank 0 writes
    ``seeds.json`` and the report and prints the summary (with ``as_json``
    the aggregated numbers as JSON instead). Ctrl-C behaves as in a single
    run (checkpoint, exit code 130); one pressed after a seed's last stage
    stops before the next seed.
    """
    from kdtoolkit.engine.context import StopFlag
    from kdtoolkit.foundation.device import resolve_device
    from kdtoolkit.engine.runner import run_recipe
    from kdtoolkit.foundation.progress import Progress

    out = Path(options.out)
    runs = {n: seed_recipe(recipe, n) for n in seeds}
    device = dist.device(resolve_device(options.device or recipe.resolved["device"]))
    stop = StopFlag()
    previous = _install_sigint(stop)
    try:
        with Progress(enabled=not options.quiet and dist.is_main) as progress:
            for i, n in enumerate(seeds):
                if _stop_between(stop, dist, device):
                    raise Interrupted(f"interrupted before seed {n}; run the same command again to go on")
                progress.log(f"seed {n} ({i + 1} of {len(seeds)}): {seed_dir(out, n)}")
                run_recipe(runs[n], replace(options, out=seed_dir(out, n)), plugins, progress, dist, stop)
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
    if not dist.is_main:
        return
    from kdtoolkit.results.runs_report import report_command

    _record_seeds(out, runs)

    report_command([seed_dir(out, n) for n in seeds], out / "report.md", as_json, plugins)


def _record_seeds(out: Path, runs: dict) -> None:
    """``out/seeds.json``: every seed folder's stage seeds (those of earlier commands kept)."""
    from kdtoolkit.foundation.io import atomic_write_json
    from kdtoolkit.results.rundir_files import load_json

    try:  # a regular file of at most 64 MiB, as every run file read back
        known = load_json(out / "seeds.json").get("runs", {})
    except (KdtError, OSError, ValueError, AttributeError, RecursionError):
        known = {}
    known = known if isinstance(known, dict) else {}
    known.update({f"seed-{n}": {s: st["seed"] for s, st in r.resolved["stages"].items()} for n, r in runs.items()})
    atomic_write_json(
        out / "seeds.json", {"rule": "top-level seed -> n; stage seed s -> derive_seed(s, n, 3)", "runs": known}
    )


def _install_sigint(stop):
    """Between seeds, Ctrl-C sets ``stop`` (a second one exits at once with 130), as during a run."""
    import os

    def on_sigint(signum, frame):  # pragma: no cover - needs a real SIGINT
        if stop.requested:
            os._exit(130)
        stop.requested = True

    try:
        return signal.signal(signal.SIGINT, on_sigint)
    except ValueError:  # not the main thread
        return None
