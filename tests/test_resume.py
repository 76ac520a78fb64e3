"""Crash and Ctrl-C safety: a real ``kdt run`` killed at many points, then resumed.

Each test starts ``python -m kdtoolkit run`` as a subprocess, stops it at
exact points — the throwaway *gate* plugin (``kdt_faultutil``) holds the run
at a named point (a loss call, the push phase, a stage's evaluation, an
observer hook) until the test has killed it — or as soon as a file appears,
then runs the same command again until the run completes. The resumed run
must end with weights bit-identical to an uninterrupted run (every tensor of
every stage's ``model.safetensors``, ``torch.equal``), the same records and
the same ``metrics.jsonl`` (no line written twice).

The recipe has a ProtoPNet teacher (two warm-up epochs, the push phase, a
last-layer epoch) and a KD student with dropout, augmentation, SGD and a
cosine schedule, so that BatchNorm statistics, RNG states, optimiser and
scheduler state and plugin phases all have to survive a resume. The
subprocesses run with one thread (``OMP_NUM_THREADS=1``), fast on a busy CPU.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from kdt_faultutil import assert_same_weights, gated, kill_hard, make_gate_plugin, metrics_lines, plugin_env, run, start
from kdtoolkit.foundation.checkpoint import load_checkpoint

STAGES = ["teacher", "kd"]

RECIPE = """
seed = 3
checkpoint_every = 1

[data]
dataset = "digits"
image_size = 16
batch_size = 32
eval_batch_size = 128

[evaluate]
metrics = [{ name = "accuracy" }, { name = "gate_metric" }]

[stages.teacher]
model.backbone = { name = "timm", model = "resnet10t", out_index = 2 }
model.head = { name = "protopnet", prototypes_per_class = 1, prototype_depth = 16 }
[stages.teacher.losses]
cross_entropy = { weight = 1.0 }
cluster = { weight = 0.8 }
separation = { weight = -0.08 }
l1_last_layer = { weight = 1e-4 }
gate = { weight = 1.0 }
[[stages.teacher.phases]]
name = "warm"
epochs = 2
limit_batches = 2
groups = [
    { params = "backbone", lr = 1e-3 },
    { params = "head.add_on", lr = 3e-3 },
    { params = "head.prototypes", lr = 3e-3 },
]
[[stages.teacher.phases]]
name = "push"
kind = "gated_push"
figure = false
[[stages.teacher.phases]]
name = "last_layer"
epochs = 1
limit_batches = 2
losses = ["cross_entropy", "l1_last_layer", "gate"]
groups = [{ params = "head.last_layer", lr = 1e-3 }]

[stages.kd]
teacher = "teacher"
model.backbone = { name = "timm", model = "resnet10t", out_index = 2 }
model.head = { name = "linear", dropout = 0.2 }
losses = [{ name = "cross_entropy", weight = 0.5 }, { name = "hinton_kd", weight = 0.5 }, { name = "gate" }]
[[stages.kd.phases]]
epochs = 2
limit_batches = 3
optimizer = { name = "sgd" }
scheduler = { name = "cosine" }
groups = [{ params = ["backbone", "head"], lr = 1e-2 }]
"""
# Calls of the gate loss in a fresh process: teacher warm 1-4, last_layer 5-6, kd 7-12
# (in a resumed process the count restarts at the resume point).


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("resume")
    recipe = d / "recipe.toml"
    recipe.write_text(RECIPE)
    env = plugin_env(make_gate_plugin(d / "site"), OMP_NUM_THREADS="1")
    ref = d / "reference"
    proc = run(["run", str(recipe), "--out", str(ref), "-q"], env)
    assert proc.returncode == 0, proc.stderr
    return d, recipe, env, ref


def _args(recipe: Path, out: Path) -> list[str]:
    return ["run", str(recipe), "--out", str(out), "-q"]


def _assert_same_as_reference(out: Path, ref: Path) -> None:
    assert_same_weights(out, ref, STAGES)
    for stage in STAGES:
        assert metrics_lines(out, stage) == metrics_lines(ref, stage), f"{stage}/metrics.jsonl differs"
        ra, rb = (
            load_file(str(out / stage / "records.safetensors")),
            load_file(str(ref / stage / "records.safetensors")),
        )
        assert ra.keys() == rb.keys() and all(torch.equal(ra[k], rb[k]) for k in ra), stage
        assert not (out / stage / "checkpoint.safetensors").exists()
        assert not [f.name for f in (out / stage).iterdir() if f.name.endswith(".tmp")]
    a, b = json.loads((out / "results.json").read_text()), json.loads((ref / "results.json").read_text())
    for stage in STAGES:
        assert a["stages"][stage]["accuracy"] == b["stages"][stage]["accuracy"]


def test_sigkill_at_gated_points_then_resume_is_bit_identical(setup):
    d, recipe, env, ref = setup
    out, mark = d / "gated", d / "gate.mark"
    args = _args(recipe, out)
    ck = out / "teacher" / "checkpoint.safetensors"

    # teacher, warm-up epoch 1, batch 2: nothing saved yet
    kill_hard(gated(args, env, "loss:2", mark))
    assert not ck.exists()
    # epoch 1 done (checkpoint), killed in epoch 2
    kill_hard(gated(args, env, "loss:3", mark))
    c = load_checkpoint(ck)
    assert (c.phase, c.epoch, c.batch) == (0, 1, 0) and len(metrics_lines(out, "teacher")) == 1
    # during the push phase (a plugin phase), half-way through its pass, then once it has written push-push.json
    kill_hard(gated(args, env, "push:mid", mark))
    assert load_checkpoint(ck).phase == 1
    kill_hard(gated(args, env, "push:end", mark))
    assert (out / "teacher" / "push-push.json").exists() and load_checkpoint(ck).phase == 1
    # while the teacher is evaluated: model.safetensors and records written, result.json not yet
    kill_hard(gated(args, env, "metric:teacher", mark))
    assert (out / "teacher" / "model.safetensors").exists() and not (out / "teacher" / "result.json").exists()
    assert [l.get("epoch", l["phase"]) for l in metrics_lines(out, "teacher")] == [1, 2, "push", 1]
    # between the stages: the teacher's result.json is written
    kill_hard(gated(args, env, "after_stage:teacher", mark))
    assert (out / "teacher" / "result.json").exists() and not ck.exists()
    # kd's last epoch has written its metrics line; the checkpoint is still the one after epoch 1
    kill_hard(gated(args, env, "after_epoch:kd:2", mark))
    assert len(metrics_lines(out, "kd")) == 2 and load_checkpoint(out / "kd" / "checkpoint.safetensors").epoch == 1

    proc = run(args, env)
    assert proc.returncode == 0, proc.stderr
    _assert_same_as_reference(out, ref)


def test_sigkill_as_files_appear_then_resume_is_bit_identical(setup):
    """Kills a few milliseconds after a file appears: wherever that lands, the result is the same."""
    d, recipe, env, ref = setup
    out = d / "polled"
    args = _args(recipe, out)
    for f in (
        "teacher/checkpoint.safetensors",
        "teacher/push-push.json",
        "teacher/result.json",
        "kd/checkpoint.safetensors",
    ):
        proc = start(args, env)
        deadline = time.monotonic() + 240
        while not (out / f).exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        if proc.poll() is None:
            kill_hard(proc)
        else:  # the file came and went between two looks (a very slow poll): the run is complete
            assert proc.wait() == 0, proc.communicate()[1]
    proc = run(args, env)
    assert proc.returncode == 0, proc.stderr
    _assert_same_as_reference(out, ref)


def _teacher_only_copy(ref: Path, dest: Path) -> Path:
    """The reference run without its kd stage: a rerun trains only kd."""
    shutil.copytree(ref, dest)
    shutil.rmtree(dest / "kd")
    for f in ("results.json", "results.md"):
        (dest / f).unlink()
    return dest


def test_ctrl_c_saves_a_mid_epoch_checkpoint_exits_130_and_resumes_bit_identical(setup):
    d, recipe, env, ref = setup
    out, mark = _teacher_only_copy(ref, d / "sigint"), d / "sigint.mark"
    args = _args(recipe, out)
    proc = gated(args, env, "loss:2", mark)  # kd, epoch 1, batch 2 of 3
    proc.send_signal(signal.SIGINT)
    Path(f"{mark}.go").touch()  # the handler has run (the gate sleeps): let the batch finish
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr
    ck_path = out / "kd" / "checkpoint.safetensors"
    assert f"interrupted: checkpoint saved in {ck_path} (phase 'train0', epoch 1, batch 2)" in stderr
    assert "run the same command again to resume" in stderr
    ck = load_checkpoint(ck_path)
    assert (ck.phase, ck.epoch, ck.batch) == (0, 0, 2)
    assert ck.rng is not None and ck.optimizer is not None and ck.running["count"] == 2
    assert not (out / "kd" / "metrics.jsonl").exists()

    proc = run(args, env)
    assert proc.returncode == 0, proc.stderr
    _assert_same_as_reference(out, ref)


def test_second_ctrl_c_exits_at_once(setup):
    d, recipe, env, ref = setup
    out, mark = _teacher_only_copy(ref, d / "sigint2"), d / "sigint2.mark"
    proc = gated(_args(recipe, out), env, "loss:1", mark)  # held inside a batch: no checkpoint can be written
    try:
        for _ in range(100):  # the first Ctrl-C asks for a checkpoint, any later one exits
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=0.2)
                break
            except subprocess.TimeoutExpired:
                continue
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert not (out / "kd" / "checkpoint.safetensors").exists()
