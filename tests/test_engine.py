"""The general engine: taps, losses with parameters and state, optimiser and
schedule registries, per-step hooks, strict weights, the run-directory API."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import types

import pytest
import torch
from safetensors.torch import load_file

from kdt_faultutil import (
    ROOT,
    assert_same_weights,
    gated,
    kill_hard,
    load_gate_module,
    make_gate_plugin,
    one_line_error,
    plugin_env,
    run,
)
from kdtoolkit.cli.commands import main
from kdtoolkit.engine.optim import build_optimizer, build_scheduler
from kdtoolkit.use.rundir import RunDir, StageDir
from kdtoolkit.plugin.hookspecs import hookimpl
from kdtoolkit.plugin.manager import PluginManager, get_manager, set_manager
from kdtoolkit.recipe.loader import load_recipe

DATA = """
[data]
dataset = "digits"
image_size = 16
batch_size = 16
eval_batch_size = 64
augment = false
"""

TEACHER = """
[stages.teacher]
model.backbone = { name = "tinyconv" }
model.head = { name = "linear" }
losses = [{ name = "cross_entropy" }]
[[stages.teacher.phases]]
epochs = 1
limit_batches = 2
optimizer = { name = "sgd" }
groups = [{ params = ["backbone", "head"], lr = 0.05 }]
"""

RECORDED: dict = {}


class Recorder:
    """Records what the first step of each phase sees."""

    requires_teacher = False
    requires_outputs = ("logits",)
    requires_taps = ("s",)
    requires_teacher_taps = ("t",)

    def __call__(self, step):
        if step.phase not in RECORDED:
            RECORDED[step.phase] = {
                "x": step.inputs.detach().clone(),
                "features": {k: v.detach().clone() for k, v in step.features.items()},
                "teacher_features": {k: v.detach().clone() for k, v in step.teacher_features.items()},
                "indices": step.indices.clone(),
                "model": copy.deepcopy(step.model),
            }
        return step.outputs["logits"].float().sum() * 0.0


HOOK_CALLS: list = []


class CountingPhase:
    """A train phase kind whose per-step hooks are recorded.

    :param note: a free text.
    """

    trains = True

    def __init__(self, *, note: str = ""):
        self.note = note

    def on_epoch_start(self, state):
        HOOK_CALLS.append(("epoch", state.epoch, state.num_batches, state.optimizer_steps))

    def on_optimizer_step(self, state):
        HOOK_CALLS.append(("step", state.epoch, state.batch, len(state.steps)))


class EnginePlugin(types.ModuleType):
    pass


engine_plugin = EnginePlugin("kdt_engine_test_plugin")


@hookimpl
def _losses(registry):
    registry.add("recorder", Recorder)


@hookimpl
def _phases(registry):
    registry.add("counting_train", CountingPhase)


engine_plugin.kdt_register_losses = _losses
engine_plugin.kdt_register_phases = _phases


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    return make_gate_plugin(tmp_path_factory.mktemp("engine") / "site")


@pytest.fixture
def plugins(site):
    before = get_manager()
    pm = PluginManager(extra=[(load_gate_module(site), "gate"), (engine_plugin, "engine_test")])
    set_manager(pm)
    yield pm
    set_manager(before)


def _run(tmp_path, text, *extra):
    recipe = tmp_path / "r.toml"
    recipe.write_text(text)
    return main(["run", str(recipe), "--out", str(tmp_path / "run"), "-q", *extra]), tmp_path / "run"


TAPPED_STAGE = """
[stages.s]
teacher = "{teacher}"
teacher_cache = "{cache}"
model.backbone = {{ name = "tinyconv" }}
model.head = {{ name = "linear" }}
model.taps = {{ s = "backbone.body.1" }}
teacher_taps = {{ t = "backbone.body.3" }}
losses = [{{ name = "cross_entropy" }}, {{ name = "recorder" }}]
[[stages.s.phases]]
name = "{phase}"
epochs = 1
limit_batches = 2
optimizer = {{ name = "sgd" }}
groups = [{{ params = ["backbone", "head"], lr = 0.05 }}]
"""


def tapped(**kw) -> str:
    return DATA + TEACHER + TAPPED_STAGE.format(**kw)


@pytest.mark.parametrize("cache", ["off", "memory"])
def test_student_and_teacher_taps_equal_a_manual_forward_pass(plugins, tmp_path, cache):
    phase = f"tapped_{cache}"
    code, out = _run(tmp_path, tapped(teacher="teacher", cache=cache, phase=phase))
    assert code == 0
    rec = RECORDED[phase]
    x, student = rec["x"], rec["model"]
    teacher = StageDir.open(out / "teacher").model()
    with torch.no_grad():
        s_manual = student.backbone.body[:2](x)
        t_manual = teacher.backbone.body[:4](x)
    assert torch.equal(rec["features"]["s"], s_manual)
    if cache == "off":
        assert torch.equal(rec["teacher_features"]["t"], t_manual)
    else:  # the cache was computed in batches of eval_batch_size: equal up to float rounding, never stale
        torch.testing.assert_close(rec["teacher_features"]["t"], t_manual, atol=1e-6, rtol=1e-5)
    n = len(StageDir.open(out / "s").data().train)
    assert rec["indices"].dtype == torch.long and 0 <= int(rec["indices"].min()) and int(rec["indices"].max()) < n
    if cache == "memory":
        cache_meta = {"taps": {"t": "backbone.body.3"}}
        assert cache_meta  # the cache key includes the taps: see test_teacher_cache_key_depends_on_taps


def test_teacher_cache_key_depends_on_taps():
    from kdtoolkit.engine.teacher import cache_key

    data = {"dataset": "digits"}
    assert cache_key("t", data, "fp32", set()) == cache_key("t", data, "fp32", set(), taps={})
    assert cache_key("t", data, "fp32", set(), taps={"t": "a"}) != cache_key("t", data, "fp32", set(), taps={"t": "b"})


def test_tap_paths_and_declarations_are_checked(plugins, tmp_path):
    bad_path = tapped(teacher="teacher", cache="off", phase="p").replace('"backbone.body.1"', '"backbone.bdy.1"')
    recipe = tmp_path / "bad.toml"
    recipe.write_text(bad_path)
    from kdtoolkit.foundation.errors import RecipeError

    with pytest.raises(
        RecipeError, match=r"model\.taps\.s: no module 'backbone\.bdy\.1'.*did you mean 'backbone\.body\.1'"
    ):
        from kdtoolkit.engine.runner import Runner, RunOptions
        from kdtoolkit.foundation.progress import Progress

        Runner(
            load_recipe(recipe, plugins=plugins), RunOptions(out=tmp_path / "o"), plugins, Progress(enabled=False)
        ).preflight()
    undeclared = tapped(teacher="teacher", cache="off", phase="p").replace(
        'teacher_taps = { t = "backbone.body.3" }', ""
    )
    recipe.write_text(undeclared)
    with pytest.raises(RecipeError, match=r"losses\[1\]\.name: loss 'recorder' reads the tap 't'.*teacher_taps"):
        load_recipe(recipe, plugins=plugins)


def test_kdt_inspect_lists_module_paths_and_shapes(site, tmp_path):
    recipe = tmp_path / "r.toml"
    recipe.write_text(tapped(teacher="teacher", cache="off", phase="p").replace('"recorder"', '"tap_regress"'))
    proc = run(["inspect", str(recipe), "--stage", "s"], plugin_env(site))
    assert proc.returncode == 0, proc.stderr
    assert "backbone.body.1" in proc.stdout and "2×8×8×8" in proc.stdout and "teacher" in proc.stdout
    bad = run(["inspect", str(recipe), "--stage", "x"], plugin_env(site))
    assert bad.returncode == 2 and "no stage named 'x'" in one_line_error(bad)
    # piped: Markdown, every path in full; --json: the same rows as data
    assert proc.stdout.startswith("## stage 's': student (input 2×3×16×16)")
    as_json = run(["inspect", str(recipe), "--stage", "s", "--json"], plugin_env(site))
    models = json.loads(as_json.stdout)
    assert [m["model"] for m in models] == ["student", "teacher"] and models[0]["input"] == [2, 3, 16, 16]
    row = next(r for r in models[0]["modules"] if r["path"] == "backbone.body.1")
    assert row["output_shape"] == "2×8×8×8" and row["tap"] == "s"
    assert sum(r["parameters"] for r in models[0]["modules"]) > 0


# ---------------------------------------------------------------------------- per-step hooks


def test_per_step_hook_is_called_once_per_optimizer_step_under_accumulation(plugins, tmp_path):
    HOOK_CALLS.clear()
    text = (
        DATA
        + """
[stages.s]
model.backbone = { name = "tinyconv" }
model.head = { name = "linear" }
losses = [{ name = "cross_entropy" }]
[[stages.s.phases]]
kind = "counting_train"
note = "x"
epochs = 2
limit_batches = 5
accumulate = 2
optimizer = { name = "sgd" }
groups = [{ params = ["backbone", "head"], lr = 0.05 }]
"""
    )
    code, _ = _run(tmp_path, text)
    assert code == 0
    epoch_calls = [c for c in HOOK_CALLS if c[0] == "epoch"]
    step_calls = [c for c in HOOK_CALLS if c[0] == "step"]
    assert epoch_calls == [("epoch", 1, 5, 3), ("epoch", 2, 5, 3)]
    # 5 batches, accumulate 2: optimiser steps after batches 2, 4 and 5, with 2, 2 and 1 micro-batches
    assert step_calls == [("step", e, b, n) for e in (1, 2) for b, n in ((2, 2), (4, 2), (5, 1))]


# ---------------------------------------------------------------------------- optimisers and schedules


def _params():
    torch.manual_seed(0)
    return [torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(3))]


@pytest.mark.parametrize(
    "name, spec, torch_cls, kwargs",
    [
        (
            "adam",
            {"betas": [0.8, 0.99], "eps": 1e-6, "amsgrad": True},
            torch.optim.Adam,
            {"betas": (0.8, 0.99), "eps": 1e-6, "amsgrad": True},
        ),
        ("adamw", {"betas": [0.9, 0.999], "eps": 1e-8, "amsgrad": False}, torch.optim.AdamW, {}),
        (
            "sgd",
            {"momentum": 0.9, "nesterov": True, "dampening": 0.0},
            torch.optim.SGD,
            {"momentum": 0.9, "nesterov": True},
        ),
    ],
)
def test_each_optimizer_matches_torch(name, spec, torch_cls, kwargs):
    pm = get_manager()
    a, b = _params(), _params()
    groups = lambda ps: [
        {"params": [ps[0]], "lr": 0.1, "weight_decay": 5e-4},
        {"params": [ps[1]], "lr": 0.01, "weight_decay": 0.0},
    ]
    ours = build_optimizer({"name": name, **spec, "weight_decay": 0.0}, groups(a), pm)
    ref = torch_cls(groups(b), lr=0.1, **kwargs)
    for i in range(5):
        for opt, ps in ((ours, a), (ref, b)):
            opt.zero_grad()
            loss = sum((p * (i + 1)).sin().sum() for p in ps)
            loss.backward()
            opt.step()
    for p, q in zip(a, b):
        assert torch.equal(p, q)


@pytest.mark.parametrize(
    "spec, make",
    [
        ({"name": "step", "step_size": 3, "gamma": 0.5}, lambda o: torch.optim.lr_scheduler.StepLR(o, 3, 0.5)),
        (
            {"name": "multistep", "milestones": [2, 5], "gamma": 0.1},
            lambda o: torch.optim.lr_scheduler.MultiStepLR(o, [2, 5], 0.1),
        ),
        ({"name": "cosine", "min_lr": 0.001}, lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, 8, 0.001)),
        ({"name": "exponential", "gamma": 0.9}, lambda o: torch.optim.lr_scheduler.ExponentialLR(o, 0.9)),
        (
            {"name": "cosine", "min_lr": 0.0, "warmup_epochs": 3, "warmup_start_factor": 0.1},
            lambda o: torch.optim.lr_scheduler.ChainedScheduler(
                [
                    torch.optim.lr_scheduler.LinearLR(o, 0.1, 1.0, 3),
                    torch.optim.lr_scheduler.CosineAnnealingLR(o, 8, 0.0),
                ],
                optimizer=o,
            ),
        ),
        (
            {"name": "none", "warmup_epochs": 2, "warmup_start_factor": 0.5},
            lambda o: torch.optim.lr_scheduler.LinearLR(o, 0.5, 1.0, 2),
        ),
    ],
)
def test_each_scheduler_matches_torch(spec, make):
    pm = get_manager()
    oa, ob = torch.optim.SGD(_params(), lr=0.1), torch.optim.SGD(_params(), lr=0.1)
    ours, ref = build_scheduler(spec, oa, 8, pm), make(ob)
    for _ in range(8):
        assert oa.param_groups[0]["lr"] == pytest.approx(ob.param_groups[0]["lr"], rel=1e-12, abs=1e-15)
        oa.step(), ob.step()
        ours.step(), ref.step()


def test_the_cifar100_kd_protocol_is_expressible(tmp_path):
    recipe = tmp_path / "cifar.toml"
    recipe.write_text(
        DATA
        + """
[stages.s]
model.backbone = { name = "timm", model = "resnet10t", out_index = 2 }
model.head = { name = "linear" }
losses = [{ name = "cross_entropy" }]
[[stages.s.phases]]
epochs = 240
optimizer = { name = "sgd", momentum = 0.9, weight_decay = 5e-4 }
scheduler = { name = "multistep", milestones = [150, 180, 210], gamma = 0.1 }
groups = [{ params = ["backbone", "head"], lr = 0.05 }]
"""
    )
    ph = load_recipe(recipe).stage("s")["phases"][0]
    assert ph["optimizer"] == {
        "name": "sgd",
        "momentum": 0.9,
        "nesterov": False,
        "dampening": 0.0,
        "weight_decay": 5e-4,
    }
    assert ph["groups"][0]["weight_decay"] == 5e-4
    opt = build_optimizer(ph["optimizer"], [{"params": _params(), "lr": 0.05, "weight_decay": 5e-4}], get_manager())
    sched = build_scheduler(ph["scheduler"], opt, 240, get_manager())
    lrs = []
    for _ in range(240):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[149] == pytest.approx(0.05) and lrs[150] == pytest.approx(0.005)
    assert lrs[180] == pytest.approx(5e-4) and lrs[210] == pytest.approx(5e-5)


def test_unknown_optimizer_and_bad_milestones_are_recipe_errors(tmp_path):
    from kdtoolkit.foundation.errors import RecipeError

    recipe = tmp_path / "r.toml"
    base = (
        DATA
        + """
[stages.s]
model.backbone = { name = "timm", model = "resnet10t", out_index = 2 }
model.head = { name = "linear" }
losses = [{ name = "cross_entropy" }]
[[stages.s.phases]]
epochs = 1
groups = [{ params = ["backbone", "head"], lr = 0.05 }]
"""
    )
    recipe.write_text(base.replace("epochs = 1", 'epochs = 1\noptimizer = { name = "sgdd" }'))
    with pytest.raises(
        RecipeError, match=r"phases\[0\]\.optimizer\.name: unknown optimizer 'sgdd' \(did you mean 'sgd'\?\)"
    ):
        load_recipe(recipe)
    recipe.write_text(base.replace("epochs = 1", 'epochs = 1\nscheduler = { name = "multistep", milestones = [5, 2] }'))
    with pytest.raises(RecipeError, match=r"scheduler\.milestones: expected increasing epochs"):
        load_recipe(recipe)


# ---------------------------------------------------------------------------- strict weights


def test_model_weights_of_another_architecture_fail_with_one_line(tmp_path):
    from kdtoolkit.engine.models import model_state
    from kdtoolkit.foundation.io import atomic_save_safetensors
    from kdtoolkit.plugin.contracts import Model
    from kdt_classic.heads import LinearHead
    from kdt_timm.backbone import TimmBackbone

    bb = TimmBackbone(model="resnet18", out_index=2)
    atomic_save_safetensors(model_state(Model(bb, LinearHead(bb.out_channels, 10))), tmp_path / "r18.safetensors")
    recipe = tmp_path / "r.toml"
    recipe.write_text(
        DATA
        + f"""
[stages.s]
model.backbone = {{ name = "timm", model = "resnet10t", out_index = 2 }}
model.head = {{ name = "linear" }}
model.weights = "{tmp_path / "r18.safetensors"}"
losses = [{{ name = "cross_entropy" }}]
[[stages.s.phases]]
epochs = 0
groups = [{{ params = ["backbone", "head"], lr = 0.05 }}]
"""
    )
    proc = subprocess.run(
        [sys.executable, "-m", "kdtoolkit", "run", str(recipe), "--out", str(tmp_path / "o"), "-q"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert proc.returncode == 2
    line = one_line_error(proc)
    assert "weights do not match the model" in line and "missing" in line and "unexpected" in line
    assert "another architecture" in line


# ---------------------------------------------------------------------------- losses with parameters and state

STATEFUL = (
    DATA
    + TEACHER
    + """
[stages.kd]
teacher = "teacher"
model.backbone = { name = "tinyconv" }
model.head = { name = "linear" }
model.taps = { s = "backbone.body.1" }
teacher_taps = { t = "backbone.body.3" }
losses = [{ name = "cross_entropy" }, { name = "tap_regress", weight = 0.5 }, { name = "gate" }]
[[stages.kd.phases]]
name = "connector"
epochs = 1
limit_batches = 2
losses = ["tap_regress", "gate"]
optimizer = { name = "sgd" }
groups = [{ params = "loss.tap_regress", lr = 0.05 }]
[[stages.kd.phases]]
name = "joint"
epochs = 2
limit_batches = 3
optimizer = { name = "sgd" }
groups = [{ params = ["backbone", "head", "loss.tap_regress"], lr = 0.05 }]
"""
)


@pytest.fixture(scope="module")
def stateful(site, tmp_path_factory):
    d = tmp_path_factory.mktemp("stateful")
    recipe = d / "r.toml"
    recipe.write_text(STATEFUL)
    env = plugin_env(site, OMP_NUM_THREADS="1")
    ref = d / "reference"
    proc = run(["run", str(recipe), "--out", str(ref), "-q"], env)
    assert proc.returncode == 0, proc.stderr
    return d, recipe, env, ref


def test_a_loss_with_parameters_trains_and_is_saved_beside_the_model(stateful):
    _, _, _, ref = stateful
    losses = load_file(str(ref / "kd" / "losses.safetensors"))
    model = load_file(str(ref / "kd" / "model.safetensors"))
    assert set(losses) == {
        "tap_regress/connector.weight",
        "tap_regress/connector.bias",
        "tap_regress/steps",
        "tap_regress/seen",
    }
    assert not any("connector" in k for k in model)  # kept out of the student's weights
    assert int(losses["tap_regress/steps"]) == 2 + 6  # one per optimiser step: the per-step hook of a loss
    assert losses["tap_regress/connector.weight"].shape == (16, 8, 1, 1)  # inferred from the dry forward pass
    assert float(losses["tap_regress/seen"].sum()) == 16 * (2 + 6)  # per-sample indices of every batch
    history = json.loads((ref / "kd" / "result.json").read_text())["history"]
    assert history[0]["trained"] == ["loss.tap_regress"]


def test_a_loss_with_parameters_resumes_bit_exactly_after_sigkill(stateful):
    d, recipe, env, ref = stateful
    out, mark = d / "killed", d / "gate.mark"
    args = ["run", str(recipe), "--out", str(out), "-q"]
    # gate loss calls: kd connector 1-2, joint 3-8; kill in the joint phase's second epoch
    kill_hard(gated(args, env, "loss:6", mark))
    assert (out / "kd" / "checkpoint.safetensors").exists()
    from kdtoolkit.foundation.checkpoint import load_checkpoint

    ck = load_checkpoint(out / "kd" / "checkpoint.safetensors")
    assert "tap_regress/connector.weight" in ck.losses and (ck.phase, ck.epoch) == (1, 1)
    proc = run(args, env)
    assert proc.returncode == 0, proc.stderr
    assert_same_weights(out, ref, ["teacher", "kd"])
    a, b = load_file(str(out / "kd" / "losses.safetensors")), load_file(str(ref / "kd" / "losses.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------------------- run directories


def test_rundir_api_reads_a_run_without_engine_internals(proto_run):
    _, out, results = proto_run
    run_dir = RunDir(out)
    assert run_dir.order == ["teacher", "baseline", "kd"]
    assert run_dir.students_by_reference() == {"teacher": ["baseline", "kd"]}
    kd = run_dir.stage("kd")
    assert kd.reference == "teacher" and kd.spec["teacher"] == "teacher"
    assert kd.result["accuracy"] == results["stages"]["kd"]["accuracy"]
    saved = kd.records()
    fresh = kd.records(device="cpu", save=False) if False else None
    model = kd.model()
    data = kd.data()
    x, _ = data.test[0]
    with torch.no_grad():
        logits = model(x[None])["logits"]
    torch.testing.assert_close(logits[0], saved["logits"][0], atol=1e-5, rtol=1e-5)
    assert saved.meta["H"] == 2 and saved.meta["W"] == 2  # declared by the head (record_meta)
    assert fresh is None
    from kdtoolkit.foundation.errors import KdtError

    with pytest.raises(KdtError, match="stage 'nope' is not in the run's recipe"):
        run_dir.stage("nope")


def test_records_are_evaluated_once_when_missing(proto_run, tmp_path):
    import shutil

    _, out, _ = proto_run
    copy_dir = tmp_path / "run"
    shutil.copytree(out, copy_dir)
    (copy_dir / "kd" / "records.safetensors").unlink()
    recs = StageDir.open(copy_dir / "kd").records(device="cpu")
    assert (copy_dir / "kd" / "records.safetensors").is_file()
    ref = load_file(str(out / "kd" / "records.safetensors"))
    torch.testing.assert_close(recs["logits"], ref["logits"], atol=1e-5, rtol=1e-5)
    assert torch.equal(recs["argmin"], ref["argmin"])


def test_docgen_ignores_an_installed_third_party_plugin(tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    (site / "kdt_thirdparty.py").write_text(
        "from kdtoolkit.plugin.hookspecs import hookimpl\n\n"
        'class Mine:\n    """A third-party loss."""\n    requires_teacher = False\n'
        "    def __call__(self, step):\n        return step.outputs['logits'].sum() * 0\n\n"
        "@hookimpl\ndef kdt_register_losses(registry):\n    registry.add('third_party_loss', Mine)\n"
    )
    info = site / "kdt_thirdparty-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: kdt-thirdparty\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[kdt]\nthirdparty = kdt_thirdparty\n")
    env = plugin_env(site)
    listed = run(["plugins", "--json"], env)
    assert "third_party_loss" in listed.stdout  # installed and loaded
    proc = subprocess.run(
        [sys.executable, "-m", "kdtoolkit.cli.docgen", "--check"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
