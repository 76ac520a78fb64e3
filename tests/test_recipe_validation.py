"""Malformed recipes through the real command line: one clear line, exit code 2.

Every case starts from a tiny valid recipe (digits at 16 px, a timm
``resnet10t`` cut at ``out_index = 2``, a linear head, one 1-epoch phase),
breaks one thing and checks that ``kdt validate`` (or ``kdt run``) answers
with exit code 2 and a single ``kdt: error: <file>: <key.path>: <message>``
line on stderr, without a traceback.

Most cases run in-process through :func:`kdtoolkit.cli.commands.main` (which returns the
exit code instead of raising for user errors) because every interpreter start
costs seconds of imports; a few run as real subprocesses to prove that nothing
but that one line reaches the terminal.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from collections.abc import Callable

import pytest

from kdtoolkit.cli.commands import main

REPO = Path(__file__).resolve().parents[1]
RECIPES = REPO / "recipes"


# --------------------------------------------------------------------------- a tiny TOML writer
# Independent of kdtoolkit.foundation.tomlwrite on purpose: the recipes under test must not
# depend on the code under test.


def _key(k: str) -> str:
    return k if k and all(c.isalnum() or c in "_-" for c in k) else json.dumps(k)


def _val(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, list):
        return "[" + ", ".join(_val(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{_key(k)} = {_val(x)}" for k, x in v.items()) + " }"
    raise TypeError(type(v))


def to_toml(d: dict[str, Any], path: tuple[str, ...] = ()) -> str:
    """Scalars (and lists, inline) first, then one ``[section]`` per sub-table."""
    lines = [f"{_key(k)} = {_val(v)}" for k, v in d.items() if not isinstance(v, dict)]
    for k, v in d.items():
        if isinstance(v, dict):
            p = path + (_key(k),)
            lines.append(f"\n[{'.'.join(p)}]")
            lines.append(to_toml(v, p))
    return "\n".join(lines)


# --------------------------------------------------------------------------- the valid base


def base_recipe() -> dict[str, Any]:
    """A valid two-stage recipe: a teacher and a Hinton-KD student."""

    def stage(losses):
        return {
            "model": {
                "backbone": {"name": "timm", "model": "resnet10t", "out_index": 2},
                "head": {"name": "linear"},
            },
            "losses": losses,
            "phases": [
                {
                    "name": "train",
                    "epochs": 1,
                    "limit_batches": 2,
                    "groups": [{"params": ["backbone", "head"], "lr": 1e-3}],
                }
            ],
        }

    teacher = stage([{"name": "cross_entropy"}])
    kd = stage([{"name": "cross_entropy", "weight": 0.5}, {"name": "hinton_kd", "weight": 0.5, "temperature": 4.0}])
    kd = {"teacher": "teacher", **kd}
    return {
        "name": "tiny",
        "device": "cpu",
        "data": {"dataset": "digits", "image_size": 16, "batch_size": 32},
        "stages": {"teacher": teacher, "kd": kd},
    }


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    capsys.readouterr()  # drop anything printed earlier
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_base_recipe_is_valid(tmp_path, capsys):
    """The base every malformed case starts from must itself validate."""
    path = tmp_path / "base.toml"
    path.write_text(to_toml(base_recipe()))
    code, out, err = run_cli(["validate", str(path)], capsys)
    assert code == 0, err
    assert err == ""
    assert "valid; stages in order: teacher, kd" in out


# --------------------------------------------------------------------------- the cases


@dataclass
class Case:
    id: str
    #: changes the base recipe in place (or returns raw text for the recipe file)
    mutate: Callable[[dict[str, Any]], Any] | None
    #: the key path the error must name, or None (e.g. invalid TOML)
    key: str | None
    #: fragments that must appear in the error line
    fragments: tuple[str, ...]
    #: extra files written next to the recipe: name -> TOML text
    files: dict[str, str] = field(default_factory=dict)
    #: extra command-line arguments (after the recipe path)
    args: tuple[str, ...] = ()
    #: the "source" the error must name: None means the recipe file; "{dir}" is
    #: the folder the recipe is written to
    source: str | None = None
    command: str = "validate"
    marks: tuple = ()


def _set(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    """A mutator setting ``a.b[1].c`` to ``value``."""
    import re

    parts = [int(p[1:-1]) if p.startswith("[") else p for p in re.findall(r"[^.\[\]]+|\[\d+\]", path)]

    def mutate(d):
        node = d
        for p in parts[:-1]:
            node = node[p]
        node[parts[-1]] = value

    return mutate


def _del(path: str) -> Callable[[dict[str, Any]], None]:
    import re

    parts = [int(p[1:-1]) if p.startswith("[") else p for p in re.findall(r"[^.\[\]]+|\[\d+\]", path)]

    def mutate(d):
        node = d
        for p in parts[:-1]:
            node = node[p]
        del node[parts[-1]]

    return mutate


def _chain(*fns):
    def mutate(d):
        for f in fns:
            f(d)

    return mutate


def _raw(text: str):
    return lambda d: text


KD = "stages.kd"
P0 = "stages.kd.phases[0]"

CASES = [
    # -- syntax and unknown keys
    Case("invalid_toml_syntax", _raw('name = "tiny"\n[data\ndataset = "digits"\n'), None, ("invalid TOML", "line 2")),
    Case("unknown_top_level_key", _set("seeed", 3), "seeed", ("unknown key (did you mean 'seed'?)", "allowed here:")),
    Case("unknown_stage_key", _set(f"{KD}.lossess", []), f"{KD}.lossess", ("unknown key (did you mean 'losses'?)",)),
    Case("unknown_phase_key", _set(f"{P0}.epoch", 2), f"{P0}.epoch", ("unknown key (did you mean 'epochs'?)",)),
    # -- wrong types
    Case(
        "string_for_number",
        _set(f"{KD}.losses[1].weight", "ten"),
        f"{KD}.losses[1].weight",
        ('expected a number, got "ten"',),
    ),
    Case("bool_for_int", _set(f"{P0}.epochs", True), f"{P0}.epochs", ("expected an integer, got true",)),
    Case("bool_for_number", _set(f"{P0}.groups[0].lr", True), f"{P0}.groups[0].lr", ("expected a number, got true",)),
    Case("list_for_table", _set(f"{P0}.optimizer", ["adam"]), f"{P0}.optimizer", ("expected a table, got a list",)),
    Case(
        "string_for_list",
        _set(f"{KD}.losses", "cross_entropy"),
        f"{KD}.losses",
        ('expected a list, got "cross_entropy"',),
    ),
    Case(
        "dataset_param_wrong_type",
        _set("data.image_size", "big"),
        "data.image_size",
        ('expected an integer, got "big"',),
    ),
    Case(
        "loss_param_wrong_type",
        _set(f"{KD}.losses[1].temperature", "hot"),
        f"{KD}.losses[1].temperature",
        ('expected a number, got "hot"',),
    ),
    Case(
        "loss_table_form_wrong_type",
        _set(f"{KD}.losses", {"cross_entropy": {"weight": "ten"}, "hinton_kd": {"weight": 0.5}}),
        f"{KD}.losses.cross_entropy.weight",
        ('expected a number, got "ten"',),
    ),
    Case(
        "loss_table_form_entry_not_a_table",
        _set(f"{KD}.losses", {"cross_entropy": 1.0}),
        f"{KD}.losses.cross_entropy",
        ("expected a table, got 1.0",),
    ),
    # -- out of range
    Case("negative_epochs", _set(f"{P0}.epochs", -1), f"{P0}.epochs", ("must be >= 0, got -1",)),
    Case("zero_lr", _set(f"{P0}.groups[0].lr", 0), f"{P0}.groups[0].lr", ("must be > 0",)),
    Case("zero_batch_size", _set("data.batch_size", 0), "data.batch_size", ("must be >= 1, got 0",)),
    Case(
        "betas_out_of_range",
        _set(f"{P0}.optimizer", {"name": "adam", "betas": [0.9, 1.5]}),
        f"{P0}.optimizer.betas",
        ("expected two numbers in [0, 1)",),
    ),
    Case(
        "negative_temperature",
        _set(f"{KD}.losses[1].temperature", -1.0),
        f"{KD}.losses[1].temperature",
        ("must be > 0",),
    ),
    Case("unknown_device", _set("device", "gpu"), "device", ('expected auto, cpu, cuda, cuda:N or mps, got "gpu"',)),
    Case("precision_fp8", _set("precision", "fp8"), "precision", ('expected one of fp32, bf16, fp16, got "fp8"',)),
    Case(
        "unknown_optimizer",
        _set(f"{P0}.optimizer", {"name": "adamm"}),
        f"{P0}.optimizer.name",
        ("unknown optimizer 'adamm' (did you mean 'adam", "registered: adam, adamw, sgd"),
    ),
    Case(
        "optimizer_key_of_another_optimizer",
        _set(f"{P0}.optimizer", {"name": "adam", "momentum": 0.9}),
        f"{P0}.optimizer.momentum",
        ("unknown key", "allowed here: name, weight_decay, betas, eps, amsgrad"),
    ),
    Case(
        "unknown_scheduler_table",
        _set(f"{P0}.scheduler", {"name": "cosin"}),
        f"{P0}.scheduler.name",
        ("unknown scheduler 'cosin' (did you mean 'cosine'?)",),
    ),
    Case(
        "loss_selector_of_unknown_loss",
        _set(f"{P0}.groups[0].params", ["loss.nope"]),
        f"{P0}.groups[0].params[0]",
        ("unknown parameter group 'loss.nope'",),
    ),
    # -- unknown components
    Case(
        "unknown_backbone",
        _set(f"{KD}.model.backbone.name", "tim"),
        f"{KD}.model.backbone.name",
        ("unknown backbone 'tim' (did you mean 'timm'?)", "registered: timm"),
    ),
    Case(
        "unknown_head",
        _set(f"{KD}.model.head", {"name": "linaer"}),
        f"{KD}.model.head.name",
        ("unknown head 'linaer' (did you mean 'linear'?)", "registered: ", "linear", "protopnet"),
    ),
    Case(
        "unknown_loss",
        _set(f"{KD}.losses[1].name", "hinton"),
        f"{KD}.losses[1].name",
        ("unknown loss 'hinton' (did you mean 'hinton_kd'?)", "registered: ", "cross_entropy"),
    ),
    Case(
        "unknown_dataset",
        _set("data.dataset", "digit"),
        "data.dataset",
        ("unknown dataset 'digit' (did you mean 'digits'?)", "registered: cub200, digits, image_folder, stanford_cars"),
    ),
    Case(
        "unknown_stage_dataset",
        _set(f"{KD}.data", {"dataset": "digitz"}),
        f"{KD}.data.dataset",
        ("unknown dataset 'digitz' (did you mean 'digits'?)",),
    ),
    Case("dataset_wrong_type", _set("data.dataset", 3), "data.dataset", ("expected a string, got 3",)),
    Case("data_name_is_not_a_key", _set("data.name", "image_folder"), "data.name", ("unknown key",)),
    Case(
        "data_key_typo",
        _set("data.batch_sise", 3),
        "data.batch_sise",
        ("unknown key (did you mean 'batch_size'?)", "dataset", "eval_batch_size"),
    ),
    Case(
        "data_param_typo", _set("data.image_sise", 3), "data.image_sise", ("unknown key (did you mean 'image_size'?)",)
    ),
    Case(
        "stage_dataset_param_wrong_type",
        _set(f"{KD}.data", {"image_size": "big"}),
        f"{KD}.data.image_size",
        ('expected an integer, got "big"',),
    ),
    Case(
        "metric_needs_records_head_lacks",
        _set("evaluate", {"metrics": [{"name": "accuracy"}, {"name": "aap"}]}),
        "evaluate.metrics[1].name",
        ("metric 'aap' needs records", "head 'linear'"),
    ),
    Case("unknown_scheduler", _set(f"{P0}.scheduler", "cosin"), f"{P0}.scheduler.name", ("(did you mean 'cosine'?)",)),
    Case(
        "infinite_weight",
        _set(f"{KD}.losses[1].weight", math.inf),
        f"{KD}.losses[1].weight",
        ("expected a finite number, got inf",),
    ),
    Case(
        "unknown_metric",
        _set("evaluate", {"metrics": [{"name": "acuracy"}]}),
        "evaluate.metrics[0].name",
        ("unknown metric 'acuracy' (did you mean 'accuracy'?)", "registered: ", "agreement"),
    ),
    Case(
        "unknown_phase_kind",
        _set(f"{P0}.kind", "pushh"),
        f"{P0}.kind",
        ("unknown phase 'pushh' (did you mean 'push'?)", "registered: "),
    ),
    Case(
        "unknown_phase_kind_suggests_train",
        _set(f"{P0}.kind", "trian"),
        f"{P0}.kind",
        ("unknown phase 'trian' (did you mean 'train'?)",),
    ),
    Case(
        "unknown_timm_model",
        _set(f"{KD}.model.backbone.model", "resnet10tt"),
        f"{KD}.model.backbone.model",
        ("unknown timm model 'resnet10tt'", "resnet10t"),
    ),
    Case(
        "unknown_component_param",
        _set(f"{KD}.model.head.dropuot", 0.1),
        f"{KD}.model.head.dropuot",
        ("unknown key (did you mean 'dropout'?)",),
    ),
    # -- cross references
    Case(
        "teacher_names_missing_stage",
        _set(f"{KD}.teacher", "teachr"),
        f"{KD}.teacher",
        ("no stage named 'teachr' (did you mean 'teacher'?)", "stages: teacher, kd"),
    ),
    Case(
        "dependency_cycle",
        _set("stages.teacher.teacher", "kd"),
        "stages.teacher.teacher",
        ("cycle", "teacher -> kd -> teacher"),
    ),
    Case(
        "dependency_cycle_through_compare_to",
        _set("stages.teacher.compare_to", "kd"),
        "stages.teacher.compare_to",
        ("cycle", "teacher -> kd -> teacher"),
    ),
    Case("self_reference", _set(f"{KD}.teacher", "kd"), f"{KD}.teacher", ("a stage cannot refer to itself",)),
    Case(
        "kd_loss_without_teacher", _del(f"{KD}.teacher"), f"{KD}.losses[1].name", ("loss 'hinton_kd' needs a teacher",)
    ),
    Case(
        "kd_loss_without_teacher_table_form",
        _chain(_del(f"{KD}.teacher"), _set(f"{KD}.losses", {"cross_entropy": {}, "hinton_kd": {"weight": 0.5}})),
        f"{KD}.losses.hinton_kd.name",
        ("loss 'hinton_kd' needs a teacher",),
    ),
    Case(
        "phase_loss_not_in_stage",
        _set(f"{P0}.losses", ["cross_entropy", "hinton"]),
        f"{P0}.losses[1]",
        (
            "no loss with id 'hinton' in this stage (did you mean 'hinton_kd'?)",
            "stage losses: cross_entropy, hinton_kd",
        ),
    ),
    Case(
        "unknown_param_group",
        _chain(_set(f"{KD}.model.head", {"name": "protopnet"}), _set(f"{P0}.groups[0].params", ["head.protoypes"])),
        f"{P0}.groups[0].params[0]",
        ("unknown parameter group 'head.protoypes' (did you mean 'head.prototypes'?)",),
    ),
    Case(
        "init_from_teacher_unknown_group",
        _set(f"{KD}.model.init_from_teacher", ["head.clasifier"]),
        f"{KD}.model.init_from_teacher[0]",
        ("unknown parameter group 'head.clasifier' (did you mean 'head.classifier'?)",),
    ),
    Case(
        "duplicate_loss_ids",
        _set(f"{KD}.losses", [{"name": "cross_entropy"}, {"name": "cross_entropy", "weight": 0.1}]),
        f"{KD}.losses[1].id",
        ("loss id 'cross_entropy' is used twice",),
    ),
    Case(
        "teacher_cache_with_augmentation",
        _set(f"{KD}.teacher_cache", "memory"),
        f"{KD}.teacher_cache",
        ("only for un-augmented training data", "data.augment = false"),
    ),
    Case(
        "teacher_cache_without_teacher",
        _chain(_set("data.augment", False), _set("stages.teacher.teacher_cache", "disk")),
        "stages.teacher.teacher_cache",
        ("caches a teacher's outputs: set stages.teacher.teacher",),
    ),
    Case(
        "teacher_cache_unknown_mode",
        _set(f"{KD}.teacher_cache", "ram"),
        f"{KD}.teacher_cache",
        ('expected one of off, memory, disk, got "ram"',),
    ),
    Case(
        "channels_last_wrong_type",
        _set("channels_last", "yes"),
        "channels_last",
        ('expected true, false or "auto", got "yes"',),
    ),
    Case("channels_last_number", _set("channels_last", 1), "channels_last", ('expected true, false or "auto", got 1',)),
    # -- missing required keys
    Case("no_stages", _del("stages"), "stages", ("missing required key",)),
    Case("empty_stages", _set("stages", {}), "stages", ("at least one stage",)),
    Case("no_phases", _del(f"{KD}.phases"), f"{KD}.phases", ("missing required key",)),
    Case("no_groups", _del(f"{P0}.groups"), f"{P0}.groups", ("missing required key",)),
    Case("no_epochs", _del(f"{P0}.epochs"), f"{P0}.epochs", ("missing required key",)),
    Case("no_backbone", _del(f"{KD}.model.backbone"), f"{KD}.model.backbone", ("missing required key",)),
    Case("no_dataset", _set("data", {"image_size": 16}), "data.dataset", ("missing required key",)),
    # -- extends and base
    Case("extends_missing_file", _set("extends", "nowhere.toml"), "extends", ("file not found: nowhere.toml",)),
    # the cycle closes in other.toml, whose 'extends' is named
    Case(
        "extends_cycle",
        _set("extends", "other.toml"),
        "extends",
        ("'extends' forms a cycle through recipe.toml",),
        files={"other.toml": 'extends = "recipe.toml"\nseed = 1\n'},
        source="{dir}/other.toml",
    ),
    Case(
        "extends_parent_invalid",
        _set("extends", "parent.toml"),
        "seeed",
        ("unknown key (did you mean 'seed'?)",),
        files={"parent.toml": "seeed = 1\n"},
    ),
    Case(
        "base_cycle",
        _chain(_set("stages.a", {"base": "b"}), _set("stages.b", {"base": "a"})),
        "stages.b.base",
        ("stage bases form a cycle", "a -> b -> a"),
    ),
    Case(
        "base_names_missing_stage",
        _set("stages.kd2", {"base": "kdd"}),
        "stages.kd2.base",
        ("no stage named 'kdd' (did you mean 'kd'?)",),
    ),
    # -- files
    Case(
        "weights_missing_file",
        _set(f"{KD}.model.weights", "missing/student.safetensors"),
        f"{KD}.model.weights",
        ("file not found: missing/student.safetensors",),
    ),
    # -- --set overrides
    Case(
        "set_without_equals", None, None, ("expected KEY=VALUE, got 'nokey'",), args=("--set", "nokey"), source="--set"
    ),
    Case(
        "set_unknown_key",
        None,
        f"{P0}.epoch",
        ("unknown key (did you mean 'epochs'?)",),
        args=("--set", "stages.kd.phases[0].epoch=3"),
    ),
    Case(
        "set_wrong_type",
        None,
        f"{KD}.losses[1].weight",
        ('expected a number, got "ten"',),
        args=("--set", "stages.kd.losses[1].weight=ten"),
    ),
    Case(
        "set_index_out_of_range",
        None,
        "stages.kd.phases[5].epochs",
        ("no item [5]",),
        args=("--set", "stages.kd.phases[5].epochs=1"),
        source="--set",
    ),
    # -- kdt run validates before anything runs or is written
    Case(
        "run_unknown_loss",
        _set(f"{KD}.losses[1].name", "hinton"),
        f"{KD}.losses[1].name",
        ("did you mean 'hinton_kd'",),
        command="run",
    ),
    Case(
        "run_bad_device_option",
        None,
        None,
        ("expected auto, cpu, cuda, cuda:N or mps, got 'gpu'",),
        args=("--device", "gpu"),
        source="--device",
        command="run",
    ),
]


def write_case(case: Case, tmp_path: Path) -> Path:
    recipe = base_recipe()
    text = None
    if case.mutate is not None:
        text = case.mutate(recipe)
    path = tmp_path / "recipe.toml"
    path.write_text(text if isinstance(text, str) else to_toml(recipe))
    for name, content in case.files.items():
        (tmp_path / name).write_text(content)
    return path


def check_error(case: Case, code: int, out: str, err: str, path: Path) -> None:
    assert "Traceback" not in out + err
    assert code == 2, f"exit code {code}\nstdout: {out}\nstderr: {err}"
    lines = err.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got:\n{err}"
    line = lines[0]
    source = (case.source or str(path)).replace("{dir}", str(path.parent))
    prefix = f"kdt: error: {source}: "
    assert line.startswith(prefix), f"{line!r} does not start with {prefix!r}"
    rest = line[len(prefix) :]
    if case.key is not None:
        assert rest.startswith(case.key + ": "), f"expected key path {case.key!r} in {line!r}"
    for frag in case.fragments:
        assert frag in rest, f"{frag!r} not in {line!r}"
    assert "valid; stages in order" not in out


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id, marks=c.marks) for c in CASES])
def test_malformed_recipe_in_process(case: Case, tmp_path, capsys):
    path = write_case(case, tmp_path)
    argv = [case.command, str(path), *case.args]
    out_dir = tmp_path / "run"
    if case.command == "run":
        argv += ["--out", str(out_dir), "-q"]
    code, out, err = run_cli(argv, capsys)
    check_error(case, code, out, err, path)
    if case.command == "run":
        assert not out_dir.exists(), "kdt run wrote its run directory before the recipe was validated"


def test_at_least_25_cases():
    assert len(CASES) >= 25
    assert len({c.id for c in CASES}) == len(CASES)


# --------------------------------------------------------------------------- real subprocesses


@pytest.mark.parametrize(
    "case_id,command",
    [
        ("invalid_toml_syntax", ["-m", "kdtoolkit", "validate"]),
        ("string_for_number", ["-m", "kdtoolkit", "run"]),
        ("set_without_equals", ["-m", "kdtoolkit", "run"]),
    ],
)
def test_malformed_recipe_subprocess(case_id, command, tmp_path):
    case = next(c for c in CASES if c.id == case_id)
    path = write_case(case, tmp_path)
    out_dir = tmp_path / "run"
    argv = [sys.executable, *command, str(path), *case.args]
    if command[-1] == "run":
        argv += ["--out", str(out_dir), "-q"]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(argv, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120)
    check_error(case, proc.returncode, proc.stdout, proc.stderr, path)
    assert proc.stdout == ""
    assert not out_dir.exists()


# --------------------------------------------------------------------------- shipped recipes


def _strip_header(text: str) -> str:
    first, _, rest = text.partition("\n")
    assert first.startswith("# ") and "valid; stages in order:" in first, first
    return rest


@pytest.mark.parametrize(
    "name,stages",
    [
        ("classic_kd", ["teacher", "student", "kd"]),
        ("proto2proto", ["teacher", "baseline", "kd", "kd_no_global", "kd_no_ppc"]),
    ],
)
def test_shipped_recipe_validates_and_round_trips(name, stages, tmp_path, capsys):
    path = RECIPES / f"{name}.toml"
    code, out, err = run_cli(["validate", str(path)], capsys)
    assert code == 0, err
    assert err == ""
    header = out.partition("\n")[0]
    assert header == f"# {path}: valid; stages in order: {', '.join(stages)}"

    resolved = tomllib.loads(out)  # the header is a TOML comment
    original = tomllib.loads(path.read_text())
    assert resolved["name"] == original["name"]
    assert list(resolved["stages"]) == list(original["stages"])
    # defaults are filled in
    assert resolved["precision"] == "fp32"
    for st in resolved["stages"].values():
        assert "base" not in st
        assert isinstance(st["losses"], list) and st["losses"]
        for loss in st["losses"]:
            assert {"name", "id", "weight"} <= set(loss)
        for ph in st["phases"]:
            assert {"name", "kind"} <= set(ph)

    # the printed TOML is itself a valid recipe, and resolving it changes nothing
    again = tmp_path / f"{name}.resolved.toml"
    again.write_text(out)
    code2, out2, err2 = run_cli(["validate", str(again)], capsys)
    assert code2 == 0, err2
    assert tomllib.loads(out2) == resolved
    assert _strip_header(out2) == _strip_header(out)


def test_proto2proto_base_stages_inherit(capsys):
    """``base = "kd"`` copies the stage and merges the ablation's own keys over it."""
    code, out, err = run_cli(["validate", str(RECIPES / "proto2proto.toml")], capsys)
    assert code == 0, err
    st = tomllib.loads(out)["stages"]
    weights = {s: {l["id"]: l["weight"] for l in st[s]["losses"]} for s in ("kd", "kd_no_global", "kd_no_ppc")}
    assert weights["kd"]["global_explanation"] == 10.0
    assert weights["kd_no_global"]["global_explanation"] == 0.0
    assert weights["kd_no_global"]["patch_prototype_correspondence"] == 10.0
    assert weights["kd_no_ppc"]["patch_prototype_correspondence"] == 0.0
    assert st["kd_no_global"]["teacher"] == "teacher"
    assert st["kd_no_global"]["phases"] == st["kd"]["phases"]
    assert st["kd_no_global"]["description"] == "KD without the global explanation loss"
