"""Hostile names: nothing a recipe (or a run directory, or a records file) names is written outside
the output folder (issue 29, defects 1, 2 and 5).

- a push or projection phase named ``"/../../../../tmp/x/PWNED"`` is refused by
  ``kdt validate`` and ``kdt run`` (one line, exit 2), and nothing appears
  outside the output folder, nor the output folder itself;
- a recipe ``name`` that leaves ``runs/`` (``"../../escaped"``, an absolute path)
  is refused the same way;
- stage and phase names that are the run directory's own files
  (``results.json``, ``recipe.resolved.toml``, ...), in any case, over the
  length limit, with a trailing newline, or differing from another only in
  case are refused when the recipe is validated, before anything trains;
- the joined-path API (``kdtoolkit.foundation.paths.inside``, ``PhaseContext.stage_file``,
  ``StageDir.file``) refuses an escaping name even when validation was
  bypassed, before anything is written;
- the reserved names cover what a real run writes.

Validation-only cases run in process and train nothing; one tiny run (16 px
digits, ResNet-10t cut at stride 8, one batch) checks the reserved names
against a real run directory.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from kdtoolkit.cli.commands import main
from kdtoolkit.plugin.contracts import Model
from kdtoolkit.foundation.distributed import Dist
from kdtoolkit.engine.context import StageState
from kdtoolkit.engine.data import StageData
from kdtoolkit.engine.phases import PhaseContext
from kdtoolkit.use.rundir import RunDir
from kdtoolkit.foundation.errors import KdtError
from kdtoolkit.foundation.paths import MAX_NAME_LENGTH, RESERVED_NAMES, inside, key_name, name_problem, safe_name
from kdtoolkit.foundation.progress import Progress

DATA = """
[data]
dataset = "digits"
image_size = 16
batch_size = 32
eval_batch_size = 256
"""

BACKBONE = 'model.backbone = { name = "timm", model = "resnet10t", out_index = 2 }\n'


def protopnet_recipe(push_name: str = "push", *, name: str | None = None, stage: str = "p") -> str:
    """One ProtoPNet stage: a train phase of one batch, then a push phase named ``push_name``."""
    top = f"name = {json.dumps(name)}\n" if name is not None else ""
    s = json.dumps(stage)
    return (
        top
        + DATA
        + f"""
[stages.{s}]
{BACKBONE}model.head = {{ name = "protopnet", prototypes_per_class = 1, prototype_depth = 8 }}
losses = ["cross_entropy"]
[[stages.{s}.phases]]
name = "warm"
epochs = 1
limit_batches = 1
groups = [{{ params = ["backbone", "head"], lr = 1e-3 }}]
[[stages.{s}.phases]]
name = {json.dumps(push_name)}
kind = "push"
"""
    )


def prototree_recipe(project_name: str = "project") -> str:
    """One ProtoTree stage: a train phase of one batch, then a projection phase named ``project_name``."""
    return (
        DATA
        + f"""
[stages.t]
{BACKBONE}model.head = {{ name = "prototree", depth = 2, prototype_depth = 8 }}
losses = ["prototree_nll"]
[[stages.t.phases]]
name = "joint"
epochs = 1
limit_batches = 1
groups = [{{ params = ["backbone", "head"], lr = 1e-3 }}]
[[stages.t.phases]]
name = {json.dumps(project_name)}
kind = "project"
"""
    )


def snapshot(root: Path) -> set[str]:
    """Every path under ``root`` (files and folders), relative."""
    return {p.relative_to(root).as_posix() for p in root.rglob("*")}


def kdt(capsys, *args: str) -> tuple[int, str]:
    """``kdt ARGS`` in process: (exit code, stderr); never a traceback."""
    code = main(list(args))
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err + captured.out
    return code, captured.err


def one_line(err: str) -> str:
    lines = [l for l in err.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("kdt: error: "), err
    return lines[0]


def refused(capsys, *args: str) -> str:
    """``kdt ARGS`` exits 2 with one error line; returns it."""
    code, err = kdt(capsys, *args)
    assert code == 2, err
    return one_line(err)


# --------------------------------------------------------------------------- defect 1: phase names


ISSUE_NAME = "/../../../../tmp/x/PWNED"
# from <tmp>/work/out/<stage>: "push-/../../../../escaped/PWNED.json" resolves to <tmp>/escaped/PWNED.json
LOCAL_NAME = "/../../../../escaped/PWNED"


@pytest.mark.parametrize(
    "recipe_of, kind, stage", [(protopnet_recipe, "push", "p"), (prototree_recipe, "project", "t")]
)
@pytest.mark.parametrize("hostile", [ISSUE_NAME, LOCAL_NAME, "../PWNED", "x/../../../PWNED"])
def test_escaping_phase_name_is_refused_and_nothing_is_written_outside(
    tmp_path, monkeypatch, capsys, recipe_of, kind, stage, hostile
):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    sane = work / "sane.toml"
    sane.write_text(recipe_of())
    assert kdt(capsys, "validate", str(sane))[0] == 0  # the same recipe with a plain phase name is valid
    recipe = work / "r.toml"
    recipe.write_text(recipe_of(hostile))
    before = snapshot(tmp_path)
    issue_targets = [Path("/tmp/x/PWNED.json"), Path("/tmp/x/PWNED.png")]
    existed = {p: p.exists() for p in issue_targets}

    line = refused(capsys, "validate", str(recipe))
    assert f"r.toml: stages.{stage}.phases[1].name:" in line and "not a valid name" in line
    line = refused(capsys, "run", str(recipe), "--out", str(work / "out"), "-q")
    assert f"stages.{stage}.phases[1].name" in line

    assert snapshot(tmp_path) == before  # nothing outside the output folder, and no output folder either
    assert not (tmp_path / "escaped").exists() and not (work / "out").exists()
    for p in issue_targets:
        assert p.exists() == existed[p], p


def _toy_push_context(stage_dir: Path, phase_name: str) -> tuple[PhaseContext, object]:
    """A ProtoPNet model on a toy dataset and the context of a push phase named ``phase_name``
    (as the engine builds it, but without validation)."""
    from kdt_protopnet.head import ProtoPNetHead

    class Backbone(torch.nn.Module):
        out_channels, reduction = 4, 1

        def forward(self, x):
            return x

    class Toy(torch.utils.data.Dataset):
        num_classes, name, classes = 3, "toy", ["a", "b", "c"]

        def __init__(self):
            g = torch.Generator().manual_seed(0)
            self.x, self.y = torch.rand(9, 4, 3, 3, generator=g), torch.tensor([0, 1, 2] * 3)

        def __len__(self):
            return len(self.y)

        def __getitem__(self, i):
            return self.x[i], int(self.y[i])

    torch.manual_seed(0)
    model = Model(Backbone(), ProtoPNetHead(4, 3, prototypes_per_class=1, prototype_depth=4))
    data = Toy()
    ctx = PhaseContext(
        "p",
        {"name": phase_name, "kind": "push"},
        model,
        None,
        StageData(data, data, data, {"eval_batch_size": 5, "num_workers": 0}),
        torch.device("cpu"),
        Progress(enabled=False),
        0,
        Dist(),
        stage_dir=stage_dir,
        state=StageState(),
    )
    return ctx, model


def test_push_phase_refuses_an_escaping_name_even_without_validation(tmp_path):
    from kdt_protopnet.push import PushPhase

    stage_dir = tmp_path / "work" / "out" / "p"
    stage_dir.mkdir(parents=True)
    before = snapshot(tmp_path)
    ctx, _ = _toy_push_context(stage_dir, LOCAL_NAME)
    with pytest.raises(KdtError, match="not a single file name"):
        PushPhase(figure=False).run(ctx)
    assert snapshot(tmp_path) == before
    ok, _ = _toy_push_context(stage_dir, "push")
    PushPhase(figure=False).run(ok)
    assert (stage_dir / "push-push.json").is_file()  # a plain name still writes its record in the stage


def test_projection_phase_refuses_an_escaping_name_even_without_validation(tmp_path):
    from kdt_prototree.head import ProtoTreeHead
    from kdt_prototree.phases import ProjectPhase

    stage_dir = tmp_path / "work" / "out" / "t"
    stage_dir.mkdir(parents=True)
    ctx, _ = _toy_push_context(stage_dir, LOCAL_NAME)
    ctx.model = Model(ctx.model.backbone, ProtoTreeHead(4, 3, depth=2, prototype_depth=4))
    ctx.phase = {"name": LOCAL_NAME, "kind": "project"}
    before = snapshot(tmp_path)
    with pytest.raises(KdtError, match="not a single file name"):
        ProjectPhase(figure=False).run(ctx)
    assert snapshot(tmp_path) == before


# --------------------------------------------------------------------------- defect 2: the recipe name


@pytest.mark.parametrize("hostile", ["../../escaped", "ABSOLUTE", "runs/../../escaped", "..", "escaped\n"])
def test_recipe_name_leaving_runs_is_refused_and_nothing_is_written(tmp_path, monkeypatch, capsys, hostile):
    cwd = tmp_path / "a" / "b"
    cwd.mkdir(parents=True)
    monkeypatch.chdir(cwd)
    name = str(tmp_path / "escaped") if hostile == "ABSOLUTE" else hostile
    recipe = cwd / "r.toml"
    recipe.write_text(protopnet_recipe(name=name))
    before = snapshot(tmp_path)

    line = refused(capsys, "validate", str(recipe))
    assert "r.toml: name:" in line
    line = refused(capsys, "run", str(recipe), "-q")  # no --out: the default would be runs/<name>
    assert "r.toml: name:" in line and "not a valid name" in line
    assert snapshot(tmp_path) == before
    assert not (cwd / "runs").exists() and not (tmp_path / "escaped").exists()


def test_default_recipe_name_from_an_odd_file_name_stays_inside_runs(tmp_path, monkeypatch, capsys):
    """Without ``name`` the file's stem is the run name, made a valid one: ``...toml`` (stem ``..``)
    does not make ``runs/..``."""
    monkeypatch.chdir(tmp_path)
    for file_name, expected in (
        ("...toml", "_."),
        ("my recipe (1).toml", "my_recipe__1_"),
        ("results.json.toml", "results.json_run"),
    ):
        recipe = tmp_path / file_name
        recipe.write_text(protopnet_recipe())
        code, _ = kdt(capsys, "validate", str(recipe))
        assert code == 0
        from kdtoolkit.recipe.loader import load_recipe

        assert load_recipe(recipe).resolved["name"] == expected
        assert name_problem(expected) is None


# --------------------------------------------------------------------------- defect 5: reserved and malformed names


BAD_STAGE_NAMES = [
    "results.json",
    "recipe.resolved.toml",
    "RESULTS.JSON",
    "Recipe.Resolved.Toml",
    "Results.md",
    "run.JSON",
    "seed-0",
    "Seed-12",
    "x" * 300,
    "x" * (MAX_NAME_LENGTH + 1),
    "kd\n",
    "kd\r",
    "kd ",
    " kd",
    ".hidden",
    "-kd",
    "a/b",
    "a\\b",
    "k\u00e9",
    "kd\x00",
]


@pytest.mark.parametrize("bad", BAD_STAGE_NAMES + sorted(RESERVED_NAMES - {".", ".."}), ids=repr)
def test_bad_stage_names_are_refused_at_validation_before_anything_runs(tmp_path, capsys, bad):
    recipe = tmp_path / "r.toml"
    recipe.write_text(protopnet_recipe(stage=bad))
    before = snapshot(tmp_path)
    line = refused(capsys, "validate", str(recipe))
    assert line.startswith(f"kdt: error: {recipe}: stages.{key_name(bad)}: ".replace("\n", " ")), line
    assert len(line) < 400  # a 300-character name is cut in the message
    line2 = refused(capsys, "run", str(recipe), "--out", str(tmp_path / "out"), "-q")
    assert line2 == line
    assert snapshot(tmp_path) == before  # no output folder, nothing trained


@pytest.mark.parametrize(
    "bad", ["results.json", "RESULT.JSON", "model.safetensors", "seed-3", "x" * 300, "push\n", "..", "."]
)
def test_bad_phase_names_are_refused_at_validation(tmp_path, capsys, bad):
    recipe = tmp_path / "r.toml"
    recipe.write_text(protopnet_recipe(bad))
    line = refused(capsys, "validate", str(recipe))
    assert "r.toml: stages.p.phases[1].name: " in line and "\n" not in line


def test_names_differing_only_in_case_are_refused(tmp_path, capsys):
    recipe = tmp_path / "r.toml"
    two = protopnet_recipe(stage="kd") + protopnet_recipe(stage="KD").split(DATA, 1)[1]
    recipe.write_text(two)
    line = refused(capsys, "validate", str(recipe))
    assert "stages.KD:" in line and "differ only in case" in line
    recipe.write_text(protopnet_recipe("Warm"))  # the first phase is "warm"
    line = refused(capsys, "validate", str(recipe))
    assert "stages.p.phases[1].name:" in line and "'warm' and 'Warm' differ only in case" in line


def test_a_name_of_the_length_limit_is_valid(tmp_path, capsys):
    recipe = tmp_path / "r.toml"
    recipe.write_text(protopnet_recipe("p" * MAX_NAME_LENGTH, name="n" * MAX_NAME_LENGTH, stage="s" * MAX_NAME_LENGTH))
    assert kdt(capsys, "validate", str(recipe))[0] == 0


def test_name_rule():
    for good in (
        "kd",
        "kd_t4",
        "stage.2",
        "_x",
        "9",
        "A-b.c_d",
        "x" * MAX_NAME_LENGTH,
        "seed",
        "seed-x",
        "results",
        "push-push.json",
    ):
        assert name_problem(good) is None, good
    for bad in (
        "",
        "kd\n",
        "../x",
        "/abs",
        "a b",
        ".x",
        "-x",
        "x" * (MAX_NAME_LENGTH + 1),
        "RUN.json",
        "seed-7",
        "explanations",
        "Metrics.JSONL",
        3,
        None,
    ):
        assert name_problem(bad) is not None, bad
    assert safe_name("..") == "_." and name_problem(safe_name("seed-1")) is None
    assert key_name("kd") == "kd" and key_name("kd\n") == "'kd\\n'"


# --------------------------------------------------------------------------- the joined-path API


@pytest.mark.parametrize(
    "hostile",
    [
        "../x",
        "push-/../../x.json",
        "/abs/x",
        "..",
        ".",
        "",
        "a/b",
        "a\\b",
        "x\0y",
        "x" * 256,
        "pms_matching_vs_x\ny.json",
        "x\ty",
        "x\x7f",
    ],
)
def test_inside_refuses_a_name_that_is_no_plain_file_name(tmp_path, hostile):
    base = tmp_path / "run" / "kd"
    before = snapshot(tmp_path)
    with pytest.raises(KdtError) as info:
        inside(base, hostile, what="stage directory")
    assert "\n" not in str(info.value) and str(base) in str(info.value)
    assert snapshot(tmp_path) == before  # nothing created, not even the directory


def test_inside_follows_links_planted_in_the_directory(tmp_path):
    base = tmp_path / "run" / "kd"
    base.mkdir(parents=True)
    (tmp_path / "victim").mkdir()
    (base / "push-push.json").symlink_to(tmp_path / "victim" / "file.json")
    (base / "sub").symlink_to(tmp_path / "victim")
    for args in (("push-push.json",), ("sub", "x.png")):
        with pytest.raises(KdtError, match="outside the stage directory"):
            inside(base, *args, what="stage directory")
    assert inside(base, "push-other.json") == base / "push-other.json"
    assert inside(base) == base
    assert inside(tmp_path / "runs", "kd", follow_links=False) == tmp_path / "runs" / "kd"


def test_inside_refuses_a_link_loop_in_one_line(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "teacher").symlink_to(run / "teacher")  # a loop: resolving it fails
    with pytest.raises(KdtError, match="cannot be resolved") as info:
        inside(run, "teacher", "result.json", what="run directory")
    assert "\n" not in str(info.value)


def test_default_output_folders_inside_a_run_are_checked(tmp_path):
    """``kdt explain``'s ``explanations/``, ``kdt evaluate``'s ``evaluations/`` and the ``seed-<n>/``
    folders of a multi-seed run: a link planted there by an unpacked run directory is refused."""
    from kdt_proto2proto.explain_stage import out_dir_for
    from kdtoolkit.use.evaluate import default_out
    from kdtoolkit.engine.multiseed import seed_dir

    run, victim = tmp_path / "run", tmp_path / "victim"
    (run / "kd").mkdir(parents=True)
    victim.mkdir()
    for link in (run / "explanations", run / "kd" / "evaluations", run / "seed-0"):
        link.symlink_to(victim)

    class Stage:
        path = run / "kd"

    with pytest.raises(KdtError, match="outside the run directory"):
        out_dir_for(None, run)
    with pytest.raises(KdtError, match="outside the stage directory"):
        default_out(Stage(), {"dataset": "digits"}, "test")
    with pytest.raises(KdtError, match="outside the output folder"):
        seed_dir(run, 0)
    assert out_dir_for(tmp_path / "mine", run) == tmp_path / "mine"  # a folder the user names is the user's
    assert seed_dir(run, 1) == run / "seed-1"
    assert list(victim.iterdir()) == []


def test_phase_context_stage_file(tmp_path):
    ctx, _ = _toy_push_context(tmp_path / "kd", "push")
    assert ctx.stage_file("push-push.json") == tmp_path / "kd" / "push-push.json"
    for hostile in (f"push-{LOCAL_NAME}.json", "../x.json", "/etc/passwd"):
        with pytest.raises(KdtError):
            ctx.stage_file(hostile)
    ctx.stage_dir = None
    with pytest.raises(KdtError, match="no stage directory"):
        ctx.stage_file("push-push.json")
    assert not (tmp_path / "kd").exists()


def test_hostile_run_directory_cannot_lead_outside(tmp_path, capsys):
    """A run directory whose ``recipe.resolved.json`` names a stage ``../../escaped`` (a downloaded one):
    ``StageDir`` paths, ``StageDir.file`` and ``kdt metrics`` refuse it, and nothing is written."""
    run = tmp_path / "work" / "run"
    run.mkdir(parents=True)
    (run / "recipe.resolved.json").write_text(
        json.dumps({"name": "x", "stages": {"t": {}, "../../escaped": {"teacher": "t"}}})
    )
    before = snapshot(tmp_path)
    rd = RunDir(run)
    with pytest.raises(KdtError, match="not a single file name"):
        rd.stage("../../escaped")
    with pytest.raises(KdtError):
        rd.stage("t").file("../../x.json")
    with pytest.raises(KdtError):
        rd.file("../x")
    line = refused(capsys, "metrics", str(run))
    assert "not a single file name" in line
    assert snapshot(tmp_path) == before


def test_a_records_stage_name_cannot_place_the_pms_matching_outside(tmp_path):
    from kdt_proto2proto.compare import _matching_path

    student = tmp_path / "run" / "kd"
    student.mkdir(parents=True)
    assert _matching_path(student, "teacher") == student / "pms_matching_vs_teacher.json"
    with pytest.raises(KdtError):
        _matching_path(student, "../../../escaped")


# --------------------------------------------------------------------------- the reserved names match a real run


PLUGIN_PREFIXES = ("push-", "prototypes-", "project-", "teacher-cache-", "pms_matching_vs_")


def test_reserved_names_cover_what_a_run_writes(tmp_path, monkeypatch, capsys):
    """A tiny two-stage run with a push and a disk teacher cache, through ``--seeds`` and without
    ``--out`` (so into ``runs/<name>``): every file or folder of the run and stage directories that is
    not a stage is a reserved name (or a plugin's prefixed file)."""
    monkeypatch.chdir(tmp_path)
    recipe = tmp_path / "r.toml"
    recipe.write_text(
        protopnet_recipe(name="tiny", stage="t")
        + f"""
[stages.s]
teacher = "t"
teacher_cache = "disk"
data.augment = false
{BACKBONE}model.head = {{ name = "linear" }}
losses = ["cross_entropy", "hinton_kd"]
[[stages.s.phases]]
epochs = 1
limit_batches = 1
groups = [{{ params = ["backbone", "head"], lr = 1e-3 }}]
"""
    )
    code, err = kdt(capsys, "run", str(recipe), "--seeds", "0", "-q")
    assert code == 0, err
    top = tmp_path / "runs" / "tiny"
    assert snapshot(tmp_path) - {"r.toml"} <= {"runs"} | {f"runs/{p}" for p in snapshot(tmp_path / "runs")}
    run = top / "seed-0"
    assert (run / "t" / "push-push.json").is_file() and (run / "t" / "prototypes-push.png").is_file()
    seen = set()

    def check(folder: Path, allowed_dirs: set[str]) -> None:
        for entry in folder.iterdir():
            if entry.name.startswith(".") or entry.name in allowed_dirs:
                continue
            seen.add(entry.name)
            assert (
                entry.name.casefold() in RESERVED_NAMES
                or entry.name.startswith(PLUGIN_PREFIXES)
                or re.fullmatch(r"seed-\d+", entry.name)
            ), f"{entry} is not a reserved name"

    check(top, {"seed-0"})
    check(run, {"t", "s"})
    check(run / "t", set())
    check(run / "s", set())
    assert {"results.json", "recipe.resolved.toml", "model.safetensors", "seeds.json", "report.md"} <= seen
