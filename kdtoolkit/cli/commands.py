"""The ``kdt`` command line.

Commands: ``run``, ``validate``, ``check``, ``inspect``, ``plugins``, ``recipes``, ``report``,
``predict``, ``evaluate`` and ``export`` (:mod:`kdtoolkit.cli.use`), plus those plugins add through
``kdt_add_commands`` (the Proto2Proto bundle adds ``metrics``). Errors in
user input print one line on stderr and exit with code 2, as do resource
errors (a full disk, a quota, a read-only file system, a name too long, out of
memory: :func:`kdtoolkit.foundation.io.resource_error_message`); Ctrl-C during
``run`` saves a checkpoint and exits with 130. See ``docs/cli.md``.
"""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path

import click

from kdtoolkit.recipe.catalog import resolve_recipe
from kdtoolkit.foundation.errors import KdtError
from kdtoolkit.plugin.manager import get_manager, stdout_to_stderr


def _err(message: str | Exception) -> None:
    click.echo(f"kdt: error: {' '.join(str(message).split())}", err=True)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="kdtoolkit", prog_name="kdt")
def cli() -> None:
    """kdtoolkit: knowledge distillation recipes, Proto2Proto and interpretability metrics."""


@cli.command()
@click.argument("recipe", type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "--out",
    "out",
    type=click.Path(file_okay=True, path_type=Path),
    default=None,
    help="Run directory (default: runs/<recipe name>).",
)
@click.option("--device", type=str, default=None, help="auto, cpu, cuda, cuda:N or mps (default: the recipe's, auto).")
@click.option(
    "--set",
    "overrides",
    multiple=True,
    metavar="KEY=VALUE",
    help="Override a recipe key, e.g. --set stages.kd.phases[0].epochs=3 (repeatable).",
)
@click.option(
    "--force",
    is_flag=True,
    help="Retrain stages whose stored results came from a different recipe (others are reused).",
)
@click.option("-q", "--quiet", is_flag=True, help="No progress bars or log lines; the summary still prints.")
@click.option("--json", "as_json", is_flag=True, help="Print the results (results.json) instead of the summary tables.")
@click.option("--check-data", is_flag=True, help="First decode every image of every dataset (as kdt check does).")
@click.option(
    "--seeds",
    "seeds_text",
    metavar="N,N,...",
    default=None,
    help="Run once per seed into OUT/seed-<n>/, then write OUT/report.md (mean ± sd); overrides the recipe's seeds.",
)
def run(
    recipe: Path,
    out: Path | None,
    device: str | None,
    overrides: tuple[str, ...],
    force: bool,
    quiet: bool,
    as_json: bool,
    check_data: bool,
    seeds_text: str | None,
) -> None:
    """Run every stage of RECIPE (teachers first) and write the run directory."""
    from kdtoolkit.foundation.distributed import Dist
    from kdtoolkit.foundation.device import check_device_spec, resolve_device
    from kdtoolkit.engine.runner import RunOptions, run_recipe
    from kdtoolkit.foundation.progress import Progress
    from kdtoolkit.recipe.loader import load_recipe
    from kdtoolkit.results.report import collect_tables, print_tables
    from kdtoolkit.engine.multiseed import chosen_seeds, run_seeds

    plugins = get_manager()
    rec = load_recipe(resolve_recipe(recipe), overrides, plugins=plugins)
    seeds = chosen_seeds(seeds_text, rec)
    if device is not None:
        resolve_device(check_device_spec(device, "--device"))
    if out is None:  # the recipe name passed kdtoolkit.foundation.paths.name_problem; checked here once more
        from kdtoolkit.foundation.paths import inside

        out = inside(Path("runs"), rec.resolved["name"], what="runs folder", follow_links=False)
    dist = Dist.from_env()  # the process group is destroyed in main(), once the outcome is printed
    if check_data:
        from kdtoolkit.use.datacheck import check_data as check_images

        check_images(rec, plugins, quiet=quiet or not dist.is_main)
    opts = RunOptions(
        out=out,
        device=device,
        force=force,
        quiet=quiet,
        command="kdt " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
    )
    if seeds:
        return run_seeds(rec, seeds, opts, plugins, dist, as_json=as_json)
    with Progress(enabled=not quiet and dist.is_main) as progress:
        results = run_recipe(rec, opts, plugins, progress, dist)
    if dist.is_main and as_json:
        from kdtoolkit.foundation.io import json_default

        click.echo(json.dumps(results, indent=2, default=json_default))
    elif dist.is_main:  # the tables the run built for results.md: each plugin's report hook runs once per run
        tables = getattr(results, "tables", None)
        print_tables(tables if tables is not None else collect_tables(results, rec.resolved, plugins))
        click.echo(f"results: {out / 'results.md'}")


@cli.command()
@click.argument("recipe", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a recipe key (repeatable).")
def validate(recipe: Path, overrides: tuple[str, ...]) -> None:
    """Check RECIPE completely and print it resolved (defaults filled in)."""
    from kdtoolkit.recipe.loader import load_recipe

    rec = load_recipe(resolve_recipe(recipe), overrides, plugins=get_manager())
    click.echo(f"# {rec.path}: valid; stages in order: {', '.join(rec.order)}")
    click.echo(rec.to_toml(), nl=False)


@cli.command()
@click.argument("recipe", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a recipe key (repeatable).")
@click.option(
    "--workers", type=click.IntRange(min=1), default=None, help="Threads decoding images (default: CPUs, at most 8)."
)
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
def check(recipe: Path, overrides: tuple[str, ...], workers: int | None, quiet: bool) -> None:
    """Decode every image of every split of RECIPE's datasets; list every unreadable file (exit 2)."""
    from kdtoolkit.use.datacheck import check_data, summary_table
    from kdtoolkit.recipe.loader import load_recipe
    from kdtoolkit.foundation.tables import print_tables

    plugins = get_manager()
    rec = load_recipe(resolve_recipe(recipe), overrides, plugins=plugins)
    print_tables([summary_table(check_data(rec, plugins, quiet=quiet, workers=workers))])


@cli.command()
@click.argument("recipe", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--stage", "stage", required=True, help="The stage whose models to show.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a recipe key (repeatable).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of tables.")
def inspect(recipe: Path, stage: str, overrides: tuple[str, ...], as_json: bool) -> None:
    """Print a stage's student (and teacher) with every module path and its output shape for one batch.

    The paths are what ``model.taps`` and ``teacher_taps`` name. Models are
    built with random weights (shapes do not depend on them); nothing is written.
    """
    from kdtoolkit.use.inspect import inspect_stage, tables
    from kdtoolkit.recipe.loader import load_recipe
    from kdtoolkit.foundation.tables import print_tables

    rec = load_recipe(resolve_recipe(recipe), overrides, plugins=get_manager())
    models = inspect_stage(rec, stage, get_manager())
    if as_json:
        click.echo(json.dumps(models, indent=2))
    else:
        print_tables(tables(models))


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def plugins(as_json: bool) -> None:
    """List plugins (name, version, origin, status) and what each contributes."""
    pm = get_manager()
    infos = list(pm.infos.values())
    if as_json:
        click.echo(json.dumps([i.to_json() for i in infos], indent=2))
        return
    from kdtoolkit.plugin.registry import PLURALS
    from kdtoolkit.foundation.tables import Table, print_tables

    rows = []
    for i in infos:
        contributes = "; ".join(f"{PLURALS[kind]}: {', '.join(names)}" for kind, names in sorted(i.components.items()))
        if i.status != "loaded":
            contributes = i.error or i.status
        extra = [h for h in i.hooks if not h.startswith("kdt_register_")]
        if extra and i.status == "loaded":
            contributes += ("; " if contributes else "") + "hooks: " + ", ".join(extra)
        if i.warnings:
            contributes += ("; " if contributes else "") + "; ".join(f"warning: {w}" for w in i.warnings)
        rows.append([i.name, i.version or "—", i.source or i.module, i.status, contributes or "—"])
    print_tables([Table("kdt plugins", ["plugin", "version", "from", "status", "contributes"], rows)])


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def recipes(as_json: bool) -> None:
    """List the recipes shipped with kdtoolkit (kdt run NAME runs one from any directory)."""
    from kdtoolkit.recipe.catalog import packaged_recipes
    from kdtoolkit.foundation.tables import Table, print_tables

    shipped = packaged_recipes()
    if as_json:
        click.echo(json.dumps(shipped, indent=2))
        return
    print_tables(
        [
            Table(
                "Shipped recipes (kdt run NAME, kdt validate NAME)",
                ["name", "description", "file"],
                [[r["name"], r["description"], r["path"]] for r in shipped],
            )
        ]
    )


@cli.command()
@click.argument("runs", nargs=-1, required=True, type=click.Path(file_okay=False, path_type=Path))
@click.option(
    "--out",
    "out",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="The report (default: report.md in the one folder given, or in the folder holding them all).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the aggregated numbers as JSON instead of the tables.")
def report(runs: tuple[Path, ...], out: Path | None, as_json: bool) -> None:
    """Aggregate runs of one recipe (run directories, or a folder of seed-<n>/ runs) into report.md: mean ± sd."""
    from kdtoolkit.results.runs_report import report_command

    report_command(list(runs), out, as_json, get_manager())


from kdtoolkit.cli.use import evaluate as _evaluate, export as _export, predict as _predict  # noqa: E402  (click only)

for _command in (_predict, _evaluate, _export):
    cli.add_command(_command)


def build_cli() -> click.Group:
    """The root command with plugin commands added (once)."""
    if not getattr(cli, "_kdt_plugins_added", False):
        pm = get_manager()
        try:
            with stdout_to_stderr():  # stdout is for the command's own output (kdt plugins --json)
                pm.call("kdt_add_commands", cli=cli)
        except KdtError as exc:
            _err(exc)
        cli._kdt_plugins_added = True  # type: ignore[attr-defined]
    return cli


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``kdt`` script; returns the exit code.

    A process of a distributed run (torchrun) destroys its process group
    here, once its outcome is printed, and ends with
    :func:`kdtoolkit.foundation.distributed.exit_now` instead of returning. Commands
    that never import :mod:`kdtoolkit.foundation.distributed` skip this, and so never
    import torch for it.
    """
    code = _main(argv)
    if "kdtoolkit.foundation.distributed" in sys.modules:  # only a command that trains can have joined a process group
        from kdtoolkit.foundation.distributed import Dist, exit_now

        Dist.shutdown(sync=code in (0, 130))  # after other failures, other ranks may be gone or stuck: no barrier
        exit_now(code)
    return code


def _main(argv: list[str] | None) -> int:
    from kdtoolkit.foundation.errors import Interrupted

    group = build_cli()
    try:
        group.main(args=argv, prog_name="kdt", standalone_mode=False)
    except click.exceptions.Abort:
        _err("aborted")
        return 130
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except KdtError as exc:
        _err(exc)
        return exc.exit_code
    except Interrupted as exc:
        _err(str(exc) or "interrupted: checkpoint saved; run the same command again to resume")
        return 130
    except (OSError, MemoryError, RuntimeError) as exc:
        # resource errors (a full disk, a quota, a read-only file system, a name too long, out of
        # memory, GPU memory included) are one line naming the file, exit 2; any other error stays
        # a traceback (a bug)
        from kdtoolkit.foundation.io import resource_error_message

        message = resource_error_message(exc)
        if message is None:
            raise
        _err(message)
        return 2
    except KeyboardInterrupt:
        _err("interrupted")
        return 130
    return 0


if __name__ == "__main__":  # python -m kdtoolkit.cli.commands
    sys.exit(main())
