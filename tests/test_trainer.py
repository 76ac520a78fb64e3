"""The trainer on tiny recipes: run directory, repeatability, reuse, KD teacher."""

from __future__ import annotations

import json
import tomllib

import pytest
import torch
from safetensors.torch import load_file

from kdtoolkit.cli.commands import main
from kdtoolkit.plugin.hookspecs import hookimpl
from kdtoolkit.plugin.manager import PluginManager, set_manager

from kdt_testutil import TINY_CLASSIC, run_kdt


def _run(recipe, out, *extra):
    return main(["run", str(recipe), "--out", str(out), "-q", *extra])


@pytest.fixture(scope="module")
def classic(tmp_path_factory):
    d = tmp_path_factory.mktemp("classic")
    recipe = d / "tiny.toml"
    recipe.write_text(TINY_CLASSIC)
    out = d / "run"
    assert _run(recipe, out) == 0
    return recipe, out


def test_run_directory_layout(classic):
    recipe, out = classic
    for rel in (
        "recipe.resolved.toml",
        "run.json",
        "results.json",
        "results.md",
        "teacher/model.safetensors",
        "teacher/metrics.jsonl",
        "teacher/result.json",
        "teacher/records.safetensors",
        "kd/model.safetensors",
        "kd/metrics.jsonl",
    ):
        assert (out / rel).is_file(), rel
    assert not (out / "teacher" / "checkpoint.safetensors").exists()  # removed once the stage is complete
    run = json.loads((out / "run.json").read_text())
    assert run["seed"] == 0 and "torch" in run["versions"] and run["versions"]["kdtoolkit"]
    resolved = tomllib.loads((out / "recipe.resolved.toml").read_text())
    assert resolved["stages"]["kd"]["teacher"] == "teacher"
    results = json.loads((out / "results.json").read_text())
    for stage in ("teacher", "kd"):
        acc = results["stages"][stage]["accuracy"]
        assert 0.0 <= acc <= 1.0
    md = (out / "results.md").read_text()
    assert "| teacher |" in md and "| kd |" in md and "accuracy" in md
    lines = [json.loads(l) for l in (out / "kd" / "metrics.jsonl").read_text().splitlines()]
    assert [l["epoch"] for l in lines] == [1, 2]
    assert {"loss/cross_entropy", "loss/hinton_kd", "loss/total"} <= set(lines[0])
    # each epoch's wall-clock seconds and throughput (this process's images / seconds)
    images = [line["images_per_s"] * line["seconds"] for line in lines]
    assert all(line["seconds"] > 0 and line["images_per_s"] > 0 for line in lines)
    assert images[0] == pytest.approx(images[1], rel=0.02) and images[0] <= 1797 * 1.02  # the same train split


def test_model_file_has_json_metadata(classic):
    from kdtoolkit.engine.models import load_model_file

    _, out = classic
    tensors, meta = load_model_file(out / "kd" / "model.safetensors")
    assert meta["stage"] == "kd" and meta["epochs"] == 2 and meta["num_classes"] == 10
    assert "torch" in meta["versions"] and len(meta["stage_hash"]) == 16
    assert any(k.startswith("backbone.") for k in tensors)


def test_cpu_runs_are_repeatable(classic, tmp_path):
    recipe, out = classic
    again = tmp_path / "again"
    assert _run(recipe, again) == 0
    a = load_file(str(out / "kd" / "model.safetensors"))
    b = load_file(str(again / "kd" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_finished_stages_are_reused(classic, capsys):
    recipe, out = classic
    before = (out / "teacher" / "model.safetensors").stat().st_mtime_ns
    assert main(["run", str(recipe), "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "already complete" in err
    assert (out / "teacher" / "model.safetensors").stat().st_mtime_ns == before


def test_changed_recipe_is_refused_without_force(classic, tmp_path, capsys):
    recipe, out = classic
    results_before = (out / "results.json").read_bytes()
    code = main(["run", str(recipe), "--out", str(out), "-q", "--set", "stages.kd.phases[0].groups[0].lr=0.01"])
    err = capsys.readouterr().err
    assert code == 2
    assert "different recipe" in err and "--force" in err
    assert (out / "results.json").read_bytes() == results_before  # nothing written


_SEEN: list = []


class _TeacherProbe:
    @hookimpl
    def kdt_register_losses(self, registry):
        class Probe:
            """Records the teacher seen by a loss."""

            requires_teacher = True
            requires_outputs = ("logits",)

            def __call__(self, step):
                _SEEN.append(step.teacher)
                assert step.teacher_outputs["logits"].requires_grad is False
                return step.outputs["logits"].sum() * 0.0

        registry.add("teacher_probe", Probe)


def test_teacher_is_frozen_and_gets_no_gradient(tmp_path):
    _SEEN.clear()
    set_manager(PluginManager(extra=[(_TeacherProbe(), "probe")]))
    try:
        recipe = tmp_path / "r.toml"
        recipe.write_text(
            TINY_CLASSIC.replace(
                '{ name = "hinton_kd", weight = 0.5 }',
                '{ name = "hinton_kd", weight = 0.5 }, { name = "teacher_probe" }',
            )
        )
        assert _run(recipe, tmp_path / "run") == 0
    finally:
        set_manager(None)
    assert _SEEN, "the probe loss never ran"
    teacher = _SEEN[-1]
    assert not teacher.training
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())


def test_unknown_device_and_missing_cuda_are_one_line_errors(classic):
    recipe, _ = classic
    r = run_kdt("run", str(recipe), "--device", "tpu")
    assert r.returncode == 2 and "Traceback" not in r.stderr and "--device" in r.stderr
    if not torch.cuda.is_available():
        r = run_kdt("run", str(recipe), "--device", "cuda")
        assert r.returncode == 2 and "CUDA is not available" in r.stderr and "Traceback" not in r.stderr
