"""``kdt metrics`` (AAP, AJS and PMS of students against their teacher) and ``kdt explain`` (figures).

Each model is a stage directory of a run (evaluated once on its recipe's
test set if it has no records yet; the records are then saved) or a records
file. ``kdt metrics RUN_DIR`` compares every student stage of a run with its
teacher. This module only declares the command (it is imported when the CLI
starts, so it imports neither torch nor scipy); the work is in
:mod:`kdt_proto2proto.compare` and :mod:`kdt_proto2proto.explain`.
"""

from __future__ import annotations

from pathlib import Path

import click


@click.command()
@click.argument("run_dir", required=False, type=click.Path(path_type=Path))
@click.option("--teacher", type=click.Path(path_type=Path), help="Teacher: a stage directory or a records file.")
@click.option(
    "--student",
    "students",
    multiple=True,
    type=click.Path(path_type=Path),
    help="Student: a stage directory or a records file (repeatable).",
)
@click.option("--tau", "tau_text", default=None, help="Thresholds, e.g. 0.01,0.1,0.2,0.45,1,3,5,inf (default).")
@click.option("--pms", "with_pms", is_flag=True, help="Also compute the Prototype Matching Score.")
@click.option(
    "--json",
    "json_out",
    type=click.Path(dir_okay=False, allow_dash=True, path_type=Path),
    help="Write the metrics as JSON to this file; '-' prints them instead of the tables.",
)
@click.option("--device", default="auto", help="Device for evaluating stages without records.")
@click.option(
    "--figures/--no-figures",
    default=True,
    help="With --pms, draw each matching as a PNG beside its JSON (default: on).",
)
def metrics(
    run_dir: Path | None,
    teacher: Path | None,
    students: tuple[Path, ...],
    tau_text: str | None,
    with_pms: bool,
    json_out: Path | None,
    device: str,
    figures: bool,
) -> None:
    """AAP and AJS per τ, and PMS (--pms), of students against their teacher.

    Either RUN_DIR (every student stage of a run against its teacher) or
    --teacher T --student S [--student S2 ...].
    """
    from .compare import run_metrics

    run_metrics(run_dir, teacher, students, tau_text, with_pms, json_out, device, figures)


@click.command()
@click.argument("path", type=click.Path(path_type=Path))
@click.option(
    "--global",
    "global_",
    is_flag=True,
    help="Gallery of the stage's prototypes on their training patches (PATH: a stage directory).",
)
@click.option(
    "--image",
    default=None,
    metavar="IMAGE",
    help="A test index or an image file: the local explanation of its prediction (PATH: a stage "
    "directory), or with --compare the image the stages are compared on.",
)
@click.option(
    "--compare",
    default=None,
    metavar="STAGES",
    help="Comma-separated stages of the run PATH shown side by side on --image, e.g. teacher,baseline,kd.",
)
@click.option(
    "--pairs",
    default=None,
    metavar="STUDENT",
    help="The best and worst teacher-student prototype pairs of STUDENT's PMS matching (PATH: a run directory).",
)
@click.option(
    "--top",
    type=int,
    default=None,
    help="Prototypes per image (default 5 with --image, 3 with --compare) or pairs of each kind with --pairs (5).",
)
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Folder of the figures (default: PATH/explanations).",
)
@click.option("--device", default="auto", help="Device of the forward passes (default: auto).")
@click.option(
    "--data",
    "assignments",
    multiple=True,
    metavar="KEY=VALUE",
    help="Change a key of the stages' data tables, e.g. --data root=PATH where the data lies elsewhere "
    "on this machine (repeatable).",
)
def explain(
    path: Path,
    global_: bool,
    image: str | None,
    compare: str | None,
    pairs: str | None,
    top: int | None,
    out: Path | None,
    device: str,
    assignments: tuple[str, ...],
) -> None:
    """Figures explaining prototype models, each with a JSON of its numbers.

    \b
    kdt explain STAGE_DIR --global              the prototypes on their training patches
    kdt explain STAGE_DIR --image IDX_OR_FILE   why the stage predicts what it does
    kdt explain RUN_DIR --compare a,b,c --image IDX_OR_FILE
    kdt explain RUN_DIR --pairs STUDENT         matched teacher-student prototype pairs
    """
    from .explain import run_explain

    run_explain(
        path,
        global_=global_,
        image=image,
        compare=compare,
        pairs=pairs,
        top=top,
        out=out,
        device=device,
        data=assignments,
    )
