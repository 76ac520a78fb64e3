"""``kdt prepare``: write ProtoPNet's offline augmented copies of a training split.

This module only declares the command (it is imported when the CLI starts,
so it imports neither torch nor Pillow); the work is in
:mod:`kdt_data.prepare`.
"""

from __future__ import annotations

from pathlib import Path

import click


@click.command()
@click.argument("src_root", type=click.Path(path_type=Path))
@click.argument("out_root", type=click.Path(path_type=Path))
@click.option("--copies", default=10, show_default=True, type=int, help="Augmented copies per image and operation.")
@click.option(
    "--ops",
    "ops_text",
    default="rotate,skew,shear,distort",
    show_default=True,
    help="Comma-separated operations (rotate, skew, shear, distort).",
)
@click.option(
    "--seed",
    default=0,
    show_default=True,
    type=int,
    help="Seed: with the image and the operation, it fixes every output.",
)
@click.option("--workers", default=0, show_default=True, type=int, help="Worker threads (0: none).")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar; the summary line still prints.")
def prepare(src_root: Path, out_root: Path, copies: int, ops_text: str, seed: int, workers: int, quiet: bool) -> None:
    """Write ProtoPNet's offline augmentation of SRC_ROOT (one sub-folder of images per class) to OUT_ROOT.

    For every image and operation, --copies outputs, each flipped left-right
    with probability 0.5, in OUT_ROOT/<class>/. Outputs that exist are kept:
    run the same command again to finish an interrupted run.
    """
    from .prepare import parse_ops, run_prepare

    summary = run_prepare(
        src_root, out_root, copies=copies, ops=parse_ops(ops_text), seed=seed, workers=workers, quiet=quiet
    )
    click.echo(
        f"{summary['written']} images written, {summary['existing']} already there "
        f"({summary['images']} source images, {summary['classes']} classes, "
        f"{summary['seconds']:.1f} s): {summary['out']}"
    )
