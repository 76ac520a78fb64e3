"""One owner per concept: dataset splits, run-directory files, report tables once per run, no private
names across modules, one validator in layers."""

from __future__ import annotations

import ast
import os
import types
from pathlib import Path

import pytest
import torch
from torch import nn

from kdtoolkit.cli.commands import main
from kdtoolkit.foundation.errors import KdtError
from kdtoolkit.foundation.tables import Table
from kdtoolkit.plugin.hookspecs import hookimpl

ROOT = Path(__file__).resolve().parents[1]
CORE = ROOT / "kdtoolkit"
PLUGINS = ROOT / "plugins"


# ---------------------------------------------------------------------------
# a tiny plugin: a one-convolution backbone, and a report hook that counts its calls


class PixelBackbone(nn.Module):
    """One strided 3x3 convolution: a backbone for tests.

    :param width: output channels.
    """

    reduction = 2

    def __init__(self, *, width: int = 8):
        super().__init__()
        self.out_channels = width
        self.conv = nn.Conv2d(3, width, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.conv(x))


def _counting_plugin(calls: list[int | None]) -> types.ModuleType:
    mod = types.ModuleType("kdt_one_owner_b_example")

    @hookimpl
    def kdt_register_backbones(registry):
        registry.add("pixel", PixelBackbone)

    @hookimpl
    def kdt_report_tables(results, recipe):
        calls.append(recipe.get("seed"))
        return [Table("Counted table", ["stage"], [[name] for name in results["stages"]])]

    mod.kdt_register_backbones = kdt_register_backbones
    mod.kdt_report_tables = kdt_report_tables
    return mod


RECIPE = """
name = "owner"
[data]
dataset = "tiny"
batch_size = 8
[stages.s]
model.backbone = { name = "pixel" }
model.head = { name = "linear" }
losses = [{ name = "cross_entropy" }]
[[stages.s.phases]]
epochs = 1
groups = [{ params = ["backbone", "head"], lr = 0.01 }]
"""


@pytest.fixture
def counted(kdt_plugin, tmp_path):
    """``(recipe path, calls)``: the tiny recipe, and the list every report-hook call appends to."""
    calls: list[int | None] = []
    kdt_plugin(_counting_plugin(calls), "counting")
    recipe = tmp_path / "owner.toml"
    recipe.write_text(RECIPE)
    return recipe, calls


# ---------------------------------------------------------------------------
# report hooks: once per run


def test_report_hook_runs_once_per_kdt_run_and_the_summary_shows_its_table(counted, tmp_path, capsys):
    recipe, calls = counted
    assert main(["run", str(recipe), "--out", str(tmp_path / "run"), "-q"]) == 0
    assert len(calls) == 1, calls  # results.md and the summary printed share the tables
    out = capsys.readouterr().out
    assert "Counted table" in out and "Test metrics per stage" in out
    assert "Counted table" in (tmp_path / "run" / "results.md").read_text()


def test_report_hook_runs_once_per_seed_run_and_once_per_run_the_report_reads_back(counted, tmp_path, capsys):
    recipe, calls = counted
    assert main(["run", str(recipe), "--seeds", "0,1", "--out", str(tmp_path / "run"), "-q"]) == 0
    # each seed run builds its tables once (results.md); report.md reads the finished runs back, as
    # kdt report does, and builds each run's tables once more to aggregate them
    assert sorted(calls) == [0, 0, 1, 1], calls
    assert "Counted table" in (tmp_path / "run" / "report.md").read_text()


def test_run_results_carry_the_tables_of_results_md(counted, tmp_path):
    from kdtoolkit.results.report import RunResults
    from kdtoolkit.testing import run_recipe

    recipe, calls = counted
    results = run_recipe(recipe, out=tmp_path / "run")
    assert isinstance(results, RunResults) and isinstance(results, dict) and len(calls) == 1
    assert [t.title for t in results.tables] == ["Test metrics per stage", "Counted table"]
    assert set(results) == {"name", "stages"}  # the content of results.json, nothing added


# ---------------------------------------------------------------------------
# dataset splits: one owner (kdtoolkit.engine.data)


def _modules(*roots: Path) -> list[Path]:
    return sorted(p for root in roots for p in root.rglob("*.py") if "__pycache__" not in p.parts)


def _rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def _call_name(call: ast.Call) -> str:
    f = call.func
    return f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else ""


def _is_split_arg(node: ast.expr) -> bool:
    return (isinstance(node, ast.Constant) and node.value in ("train", "test")) or (
        isinstance(node, ast.Name) and node.id == "split"
    )


def test_only_engine_data_builds_dataset_splits():
    """No core module but :mod:`kdtoolkit.engine.data` calls a dataset factory (``build(split, ...)``,
    ``instantiate("dataset", ...)``) or filters a data table by the factory's parameters itself."""
    owners = {"kdtoolkit/engine/data.py", "kdtoolkit/plugin/instantiation.py", "kdtoolkit/plugin/registry.py"}
    found = []
    for path in _modules(CORE):
        if _rel(path) in owners or "testing" in path.parts:
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call):
                name = _call_name(node)
                if name in ("build", "build_component") and any(_is_split_arg(a) for a in node.args):
                    found.append(f"{_rel(path)}:{node.lineno}: {name}(split, ...)")
                first = node.args[0] if node.args else None
                if name == "instantiate" and isinstance(first, ast.Constant) and first.value == "dataset":
                    found.append(f"{_rel(path)}:{node.lineno}: instantiate('dataset', ...)")
            if isinstance(node, ast.DictComp) and "comp.params" in ast.unparse(node):
                found.append(f"{_rel(path)}:{node.lineno}: a data table filtered by comp.params")
    assert not found, "\n".join(found)
    users = {"datacheck.py": "component_split", "evaluate.py": "dataset_split", "predict.py": "dataset_split"}
    for module, name in users.items():
        assert name in (CORE / "use" / module).read_text(encoding="utf-8"), module


def test_every_command_builds_its_split_through_the_owner_with_the_training_transforms(counted, tmp_path, monkeypatch):
    import kdtoolkit.engine.data as data
    from kdtoolkit.plugin.manager import get_manager
    from kdtoolkit.recipe.loader import load_recipe
    from kdtoolkit.testing import run_recipe
    from kdtoolkit.use.datacheck import check_data
    from kdtoolkit.use.evaluate import evaluate_stage
    from kdtoolkit.use.predict import stage_test_split
    from kdtoolkit.use.rundir import StageDir

    recipe, _ = counted
    run_recipe(recipe, out=tmp_path / "run")
    built: list[tuple[str, bool]] = []
    owner = data.component_split

    def counting(comp, spec, split, *, augment=False):
        built.append((split, augment))
        return owner(comp, spec, split, augment=augment)

    monkeypatch.setattr(data, "component_split", counting)
    stage = StageDir.open(tmp_path / "run" / "s")
    trained = data.build_data(stage.spec, stage.run.plugins)
    assert built == [("train", True), ("train", False), ("test", False)]
    test = stage_test_split(stage)  # kdt predict and kdt export
    assert built[3:] == [("test", False)]
    assert torch.equal(torch.stack([test[i][0] for i in range(len(test))]), trained.test.images)
    evaluate_stage(stage, out=tmp_path / "evaluation")  # kdt evaluate
    assert built[4:] == [("test", False)]
    check_data(load_recipe(recipe, (), plugins=get_manager()), get_manager(), quiet=True)  # kdt check
    assert built[5:] == [("train", False), ("test", False)]


# ---------------------------------------------------------------------------
# run-directory files: one reader (kdtoolkit.results.rundir_files)


def test_only_rundir_files_reads_run_files():
    """Run files are read through :mod:`kdtoolkit.results.rundir_files` only: no other module reads a
    JSON run file itself (``read_text_file``), and the results layer imports no higher layer."""
    reader = "kdtoolkit/results/rundir_files.py"
    found = []
    for path in _modules(CORE):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and _call_name(node) == "read_text_file" and _rel(path) != reader:
                found.append(f"{_rel(path)}:{node.lineno}: read_text_file(...)")
            if isinstance(node, ast.FunctionDef) and node.name == "_read_json":
                found.append(f"{_rel(path)}:{node.lineno}: def _read_json")
            if "results" in path.parts and isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [node.module or ""] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
                for name in names:
                    if name.startswith(("kdtoolkit.use", "kdtoolkit.engine", "kdtoolkit.cli", "kdtoolkit.testing")):
                        found.append(f"{_rel(path)}:{node.lineno}: imports {name} (a higher layer)")
    assert not found, "\n".join(found)
    for module in ("results/aggregate.py", "use/rundir.py", "engine/runner.py", "engine/preflight.py"):
        assert "kdtoolkit.results.rundir_files" in (CORE / module).read_text(encoding="utf-8"), module


def test_rundir_and_the_report_read_the_same_files(counted, tmp_path):
    from kdtoolkit.results import rundir_files
    from kdtoolkit.results.aggregate import load_run
    from kdtoolkit.testing import run_recipe
    from kdtoolkit.use.rundir import RunDir

    recipe, _ = counted
    results = run_recipe(recipe, out=tmp_path / "run")
    run = RunDir(tmp_path / "run")
    loaded = load_run(tmp_path / "run")
    assert run.results == loaded.results == rundir_files.run_results(tmp_path / "run") == dict(results)
    assert run.recipe == loaded.recipe == rundir_files.resolved_recipe(tmp_path / "run")
    assert run.info == rundir_files.run_info(tmp_path / "run") and loaded.seed == run.info["seed"] == 0
    assert run.stage("s").result == rundir_files.stage_result(tmp_path / "run" / "s") == results["stages"]["s"]
    assert run.stage("s").path == rundir_files.stage_path(tmp_path / "run", "s")


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_hostile_run_files_are_one_line_for_every_reader(counted, tmp_path):
    from kdtoolkit.results.aggregate import load_run
    from kdtoolkit.testing import run_recipe
    from kdtoolkit.use.rundir import RunDir

    recipe, _ = counted
    run_recipe(recipe, out=tmp_path / "run")
    (tmp_path / "run" / "s" / "result.json").unlink()
    os.mkfifo(tmp_path / "run" / "s" / "result.json")  # read without blocking
    with pytest.raises(KdtError, match="not a regular file"):
        RunDir(tmp_path / "run").stage("s").result
    (tmp_path / "run" / "run.json").write_text("[" * 200 + "]" * 200)
    with pytest.raises(KdtError, match="unreadable run.json|nested more than"):
        load_run(tmp_path / "run")
    (tmp_path / "run" / "recipe.resolved.json").write_text("[]")  # JSON, but no recipe
    with pytest.raises(KdtError, match="no stages"):
        RunDir(tmp_path / "run")
    with pytest.raises(KdtError, match="not a run directory"):
        load_run(tmp_path / "run")


# ---------------------------------------------------------------------------
# private names stay in their module


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PLUGINS if path.is_relative_to(PLUGINS) else ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _first_party(module: str) -> bool:
    top = module.split(".")[0]
    return top == "kdtoolkit" or (PLUGINS / top).is_dir()


def _private_uses(path: Path, text: str | None = None) -> list[tuple[int, str, str]]:
    """``(line, module, name)`` for every private name of another first-party module that ``path``
    (holding ``text``, default: read) uses."""
    here = _module_name(path)
    package = here if path.name == "__init__.py" else here.rpartition(".")[0]
    tree = ast.parse(text if text is not None else path.read_text(encoding="utf-8"))
    modules: dict[str, str] = {}  # a local name bound to a first-party module -> that module
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + [base]).strip(".")
            for alias in node.names:
                modules[alias.asname or alias.name] = f"{base}.{alias.name}"
                if _first_party(base) and _private(alias.name) and base != here:  # here: a package's own _compat
                    out.append((node.lineno, base, alias.name))
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.asname:
                    modules[alias.asname] = alias.name
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and _private(node.attr) and isinstance(node.value, ast.Name):
            target = modules.get(node.value.id)
            if target is not None and _first_party(target) and target != here:
                out.append((node.lineno, target, node.attr))
    return out


def test_no_module_uses_another_modules_private_name():
    found = []
    for path in _modules(CORE, PLUGINS):
        for line, module, name in _private_uses(path):
            found.append(f"{_rel(path)}:{line}: {module}.{name}")
    assert not found, "private names used across modules:\n" + "\n".join(found)


def test_the_private_name_check_finds_what_it_should():
    text = (
        "from __future__ import annotations\nfrom os import _exit\nfrom kdtoolkit.foundation.io import _fsync_dir\n"
        "import kdtoolkit.plugin.manager as pm\nfrom kdt_proto2proto import metrics as M\nfrom . import _own\n"
        "x = pm._MANAGER, M._helper, M.__name__, _exit, _own\n"
    )
    found = _private_uses(PLUGINS / "kdt_classic" / "probe.py", text)  # a module never written
    assert sorted((m, n) for _, m, n in found) == [
        ("kdt_classic", "_own"),
        ("kdt_proto2proto.metrics", "_helper"),
        ("kdtoolkit.foundation.io", "_fsync_dir"),
        ("kdtoolkit.plugin.manager", "_MANAGER"),
    ]


# ---------------------------------------------------------------------------
# one validator: Checks -> StageChecks -> Validator


def _self_uses(cls: ast.ClassDef) -> set[str]:
    return {
        n.attr
        for n in ast.walk(cls)
        if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name) and n.value.id == "self"
    }


def _defined(cls: ast.ClassDef) -> set[str]:
    names = set()
    for node in cls.body:
        if isinstance(node, ast.FunctionDef):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names |= {t.id for t in targets if isinstance(t, ast.Name)}
    for node in ast.walk(cls):  # attributes the class sets on itself
        if isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names |= {
                t.attr
                for t in targets
                if isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name) and t.value.id == "self"
            }
    return names


def _class(module: str, name: str) -> ast.ClassDef:
    tree = ast.parse((CORE / "recipe" / module).read_text(encoding="utf-8"))
    return next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == name)


def test_the_validator_is_one_class_in_three_layers_each_calling_only_what_it_inherits():
    from kdtoolkit.recipe.checks import Checks
    from kdtoolkit.recipe.stage_checks import StageChecks
    from kdtoolkit.recipe.validator import DATA_KEYS, Validator

    assert Validator.__mro__[1:4] == (StageChecks, Checks, object)
    assert DATA_KEYS == Validator.DATA_KEYS
    checks = _class("checks.py", "Checks")
    stage = _class("stage_checks.py", "StageChecks")
    top = _class("validator.py", "Validator")
    assert [ast.unparse(b) for b in stage.bases] == ["Checks"] and [ast.unparse(b) for b in top.bases] == [
        "StageChecks"
    ]
    primitives = {"fail", "value", "table", "array", "known", "number", "choice", "component", "params"}
    assert primitives <= _defined(checks)
    assert _self_uses(checks) <= _defined(checks)
    assert _self_uses(stage) <= _defined(checks) | _defined(stage), _self_uses(stage) - _defined(checks)
    assert _self_uses(top) <= _defined(checks) | _defined(stage) | _defined(top)
    assert not primitives & (_defined(stage) | _defined(top))  # one definition of each primitive
