"""``kdt predict``, ``kdt evaluate`` and ``kdt export``: use a trained stage.

Click declarations only; the work is in :mod:`kdtoolkit.use.predict`,
:mod:`kdtoolkit.use.evaluate` and :mod:`kdtoolkit.use.export`,
imported when a command runs (``kdt --help`` imports no torch).
"""

from __future__ import annotations

import json
from pathlib import Path

import click

STAGE_DIR = click.Path(file_okay=False, path_type=Path)
DATA_OPTION = click.option(
    "--data",
    "assignments",
    multiple=True,
    metavar="KEY=VALUE",
    help="Change a key of the stage's data table, e.g. --data root=PATH where the data lies "
    "elsewhere on this machine (repeatable).",
)


def _json_out(obj, target: str) -> None:
    from kdtoolkit.foundation.io import atomic_write_text, is_resource_error, json_default

    from kdtoolkit.foundation.errors import KdtError

    text = json.dumps(obj, indent=2, default=json_default)
    if target == "-":
        click.echo(text)
        return
    try:
        atomic_write_text(Path(target), text + "\n")
    except OSError as exc:
        if is_resource_error(exc):  # a full disk: the command line's one line for resource errors
            raise
        raise KdtError(f"cannot write the JSON: {exc.strerror or exc}", source=target) from None


@click.command()
@click.argument("stage_dir", type=STAGE_DIR)
@click.argument("images", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option(
    "--top",
    default=3,
    show_default=True,
    type=click.IntRange(min=0),
    help="Most activated prototypes listed per image (prototype heads).",
)
@click.option(
    "--batch-size", default=32, show_default=True, type=click.IntRange(min=1), help="Images per forward pass."
)
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:N or mps.")
@click.option(
    "--json",
    "json_out",
    metavar="FILE",
    default=None,
    help="Write the predictions as JSON to FILE ('-': standard output) instead of a table.",
)
@DATA_OPTION
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
def predict(
    stage_dir: Path,
    images: tuple[Path, ...],
    top: int,
    batch_size: int,
    device: str,
    json_out: str | None,
    assignments: tuple[str, ...],
    quiet: bool,
) -> None:
    """Predict the class of IMAGES (files or folders) with the trained stage STAGE_DIR.

    Each image is preprocessed as the stage's test split is (from the run's
    resolved recipe). For prototype heads the most activated prototypes are
    listed with their similarity, class, contribution to the predicted
    class's logit and latent location.
    """
    from kdtoolkit.foundation.device import check_device_spec
    from kdtoolkit.use.predict import predict as run_predict
    from kdtoolkit.use.rundir import StageDir
    from kdtoolkit.foundation.progress import Progress
    from kdtoolkit.foundation.tables import Table, fmt, print_tables

    check_device_spec(device, "--device")
    stage = StageDir.open(stage_dir)
    with Progress(enabled=not quiet and json_out != "-") as progress:
        rows = run_predict(
            stage, images, top=top, batch_size=batch_size, device=device, progress=progress, data=assignments
        )
    if json_out is not None:
        _json_out(rows, json_out)
        return
    body = []
    for r in rows:
        protos = "; ".join(_prototype_text(p) for p in r.get("top_prototypes", []))
        body.append([r["image"], r["class"], fmt(r["probability"]), protos or "—"])
    print_tables([Table(f"kdt predict · {stage.name}", ["image", "class", "probability", "top prototypes"], body)])


def _prototype_text(p: dict) -> str:
    text = f"#{p['prototype']}"
    if "class" in p:
        text += f" ({p['class']})"
    text += f" sim {p['similarity']:.3g}"
    if "contribution" in p:
        text += f" → {p['contribution']:+.3g}"
    return text


@click.command()
@click.argument("stage_dir", type=STAGE_DIR)
@click.option(
    "--data",
    "assignments",
    multiple=True,
    metavar="KEY=VALUE",
    help="Change a key of the stage's data table, e.g. --data root=other/folder (repeatable); "
    "naming another dataset starts from its defaults.",
)
@click.option(
    "--split",
    default="test",
    show_default=True,
    type=click.Choice(["test", "train"]),
    help="The split to evaluate (never augmented).",
)
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Output folder (default: STAGE_DIR/evaluations/<dataset>-<split>-<hash>).",
)
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:N or mps.")
@click.option("--json", "as_json", is_flag=True, help="Print evaluation.json instead of a table.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars.")
def evaluate(
    stage_dir: Path, assignments: tuple[str, ...], split: str, out: Path | None, device: str, as_json: bool, quiet: bool
) -> None:
    """Evaluate the trained stage STAGE_DIR on another split or dataset and write its metrics.

    Writes evaluation.json and records.safetensors into the output folder
    (the stage's own files are never changed). Metrics that compare with a
    reference (AJS, PMS, agreement) also evaluate the stage's teacher or
    compare_to stage on the same data.
    """
    from kdtoolkit.foundation.device import check_device_spec
    from kdtoolkit.use.evaluate import evaluate_stage
    from kdtoolkit.use.rundir import StageDir
    from kdtoolkit.foundation.progress import Progress
    from kdtoolkit.foundation.tables import Table, print_tables

    check_device_spec(device, "--device")
    stage = StageDir.open(stage_dir)
    with Progress(enabled=not quiet and not as_json) as progress:
        result = evaluate_stage(stage, assignments, split=split, out=out, device=device, progress=progress)
    if as_json:
        _json_out(result, "-")
        return
    from kdtoolkit.results import threshold_tables

    symbols = {key: table.symbol for key, table in threshold_tables(stage.run.recipe, stage.run.plugins).items()}
    rows = _metric_rows(result, symbols)
    print_tables(
        [Table(f"kdt evaluate · {stage.name} on {result['data']['dataset']} ({split})", ["metric", "value"], rows)]
    )
    click.echo(f"written: {result['out']}")


def _metric_rows(result: dict, symbols: dict[str, str]) -> list[list[str]]:
    """One row per value; a result keyed by a threshold gives one row per threshold, labelled with the
    symbol its metric declares in ``threshold_tables`` (``t`` without one)."""
    from kdtoolkit.foundation.tables import fmt

    rows: list[list[str]] = []
    for k, v in result.items():
        if k in ("stage", "split", "data", "out", "precision"):
            continue
        if isinstance(v, dict) and all(isinstance(x, (int, float)) for x in v.values()):
            symbol = symbols.get(k, "t")
            rows.extend([f"{k} {symbol}={t}", fmt(x)] for t, x in v.items())
        else:
            rows.append([k, fmt(v) if isinstance(v, float) else json.dumps(v, default=str).strip('"')])
    return rows


@click.command()
@click.argument("stage_dir", type=STAGE_DIR)
@click.option(
    "--format",
    "fmt_name",
    required=True,
    type=click.Choice(["exported-program", "torchscript"]),
    help="exported-program (torch.export, .pt2) or torchscript (torch.jit.trace, .pt).",
)
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="The file to write (default: STAGE_DIR/model.pt2 or model.pt).",
)
@DATA_OPTION
def export(stage_dir: Path, fmt_name: str, out: Path | None, assignments: tuple[str, ...]) -> None:
    """Write the trained stage STAGE_DIR as a self-contained model (no kdtoolkit needed to run it).

    The model maps preprocessed images [B, 3, S, S] to a dict with logits and
    the head's recorded outputs; the file's kdtoolkit.json extra file holds
    the input size, class names and the data table (mean and std).
    """
    from kdtoolkit.use.export import export_stage
    from kdtoolkit.use.rundir import StageDir

    info = export_stage(StageDir.open(stage_dir), fmt_name, out, assignments)
    click.echo(f"written: {info['path']} ({info['format']}; outputs: {', '.join(info['outputs'])})")
