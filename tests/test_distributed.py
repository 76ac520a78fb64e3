"""Scale: multi-process DDP (torchrun, gloo on the CPU), Ctrl-C under DDP, gradient accumulation, bf16.

The models here use ``tinyconv`` (from the gate plugin of ``kdt_faultutil``,
discovered by the subprocesses through a ``dist-info`` on ``PYTHONPATH``): it
has no BatchNorm, whose batch statistics would differ when a batch is split
across ranks or accumulation steps. ``data.augment = false`` keeps the two
ranks from drawing different augmentations, and SGD keeps the update linear
in the gradient (Adam would amplify rounding in near-zero gradients).
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from kdt_faultutil import ROOT, assert_same_weights, load_gate_module, make_gate_plugin, metrics_lines, plugin_env, run
from kdtoolkit.foundation.checkpoint import load_checkpoint
from kdtoolkit.cli.commands import main
from kdtoolkit.plugin.manager import PluginManager, set_manager

RECIPE = """
[data]
dataset = "digits"
image_size = 16
batch_size = 32
eval_batch_size = 100
augment = false

[stages.teacher]
model.backbone = { name = "tinyconv" }
model.head = { name = "linear" }
losses = [{ name = "cross_entropy" }]
[[stages.teacher.phases]]
epochs = 2
limit_batches = 3
optimizer = { name = "sgd" }
groups = [{ params = ["backbone", "head"], lr = 0.05 }]

[stages.kd]
teacher = "teacher"
model.backbone = { name = "tinyconv" }
model.head = { name = "linear" }
losses = [{ name = "cross_entropy", weight = 0.5 }, { name = "hinton_kd", weight = 0.5 }]
[[stages.kd.phases]]
epochs = 1
limit_batches = 3
optimizer = { name = "sgd" }
groups = [{ params = ["backbone", "head"], lr = 0.05 }]

[stages.kd_mem]
base = "kd"
teacher_cache = "memory"

[stages.kd_cached]
base = "kd"
teacher_cache = "disk"

[stages.kd_taps]
teacher = "teacher"
model.backbone = { name = "tinyconv" }
model.head = { name = "linear" }
model.taps = { s = "backbone.body.1" }
teacher_taps = { t = "backbone.body.3" }
losses = [{ name = "cross_entropy" }, { name = "tap_regress", weight = 0.5 }]
[[stages.kd_taps.phases]]
epochs = 1
limit_batches = 3
optimizer = { name = "sgd" }
groups = [{ params = ["backbone", "head", "loss.tap_regress"], lr = 0.05 }]

[stages.tree]
model.backbone = { name = "tinyconv" }
model.head = { name = "prototree", depth = 2, prototype_depth = 8 }
losses = [{ name = "prototree_nll" }]
[[stages.tree.phases]]
epochs = 1
limit_batches = 3
optimizer = { name = "sgd" }
groups = [{ params = ["backbone", "head.add_on", "head.prototypes"], lr = 0.05 }]
"""

# Same global batches, summed in another order: float32 rounding only.
ATOL, RTOL = 1e-5, 1e-4


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    return make_gate_plugin(tmp_path_factory.mktemp("dist") / "site")


def _close(a: Path, b: Path, stage: str) -> None:
    ta, tb = load_file(str(a / stage / "model.safetensors")), load_file(str(b / stage / "model.safetensors"))
    assert ta.keys() == tb.keys()
    for k in ta:
        torch.testing.assert_close(ta[k], tb[k], atol=ATOL, rtol=RTOL, msg=f"{stage}: {k}")


def _ddp_recipe() -> str:
    # odd batch sizes: the ranks' shards differ in size (16 and 15 images, 50 and 49 ...); the gate loss
    # (always 0) lets a test press Ctrl-C in one rank (KDT_GATE_SIGINT)
    return (
        RECIPE.replace("batch_size = 32", "batch_size = 31")
        .replace("eval_batch_size = 100", "eval_batch_size = 99")
        .replace('losses = [{ name = "cross_entropy" }]', 'losses = [{ name = "cross_entropy" }, { name = "gate" }]')
    )


@pytest.fixture(scope="module")
def ddp_runs(site, tmp_path_factory):
    """The DDP recipe run by one process, and by two through torchrun: (recipe, env, single, ddp, torchrun's result)."""
    d = tmp_path_factory.mktemp("ddp")
    recipe = d / "r.toml"
    recipe.write_text(_ddp_recipe())
    env = plugin_env(site, OMP_NUM_THREADS="1")
    single = d / "single"
    proc = run(["run", str(recipe), "--out", str(single), "-q"], env)
    assert proc.returncode == 0, proc.stderr
    ddp = d / "ddp"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        "-m",
        "kdtoolkit",
        "run",
        str(recipe),
        "--out",
        str(ddp),
        "-q",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    return recipe, env, single, ddp, proc


def test_two_process_ddp_matches_one_process_with_the_same_global_batch(ddp_runs):
    """2 CPU processes (torchrun, gloo), each with about half of every global batch
    of 31, end with the weights of a single process training on the whole batches:
    equal within ``ATOL``/``RTOL`` (1e-5/1e-4; the runs differ only in the order
    float32 gradients are summed). Both stages (teacher, then KD with the
    teacher loaded by every rank) are compared; the evaluation records
    gathered from the ranks list the test images in dataset order; only rank 0
    writes (one ``metrics.jsonl`` line per epoch), with the global batch's
    loss values; both processes finish cleanly."""
    recipe, env, single, ddp, proc = ddp_runs
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr and "destroy_process_group" not in proc.stderr
    assert json.loads((ddp / "run.json").read_text())["world_size"] == 2

    for stage in ("teacher", "kd", "kd_mem", "kd_cached"):
        _close(ddp, single, stage)
        a, b = metrics_lines(ddp, stage), metrics_lines(single, stage)
        assert [l["epoch"] for l in a] == [l["epoch"] for l in b]
        for la, lb in zip(a, b):
            assert la["train_accuracy"] == lb["train_accuracy"]
            assert la["loss/total"] == pytest.approx(lb["loss/total"], rel=1e-5)
        ra, rb = (
            load_file(str(ddp / stage / "records.safetensors")),
            load_file(str(single / stage / "records.safetensors")),
        )
        assert torch.equal(ra["labels"], rb["labels"])
        torch.testing.assert_close(ra["logits"], rb["logits"], atol=1e-4, rtol=1e-4)
    # the teacher cache computed by two ranks (each half of every batch, gathered back into dataset
    # order, written by rank 0) is the one a single process computes, and trains the same student
    (fa,), (fb,) = list((ddp / "teacher").glob("teacher-cache-*")), list((single / "teacher").glob("teacher-cache-*"))
    ca, cb = load_file(str(fa)), load_file(str(fb))
    assert (
        set(ca) == set(cb) == {"logits"}
    )  # (file names differ: the key hashes the teacher's weights, equal only within ATOL)
    torch.testing.assert_close(ca["logits"], cb["logits"], atol=1e-5, rtol=1e-5)
    ta, tb = (
        load_file(str(single / "kd" / "model.safetensors")),
        load_file(str(single / "kd_cached" / "model.safetensors")),
    )
    for k in ta:
        torch.testing.assert_close(tb[k], ta[k], atol=ATOL, rtol=RTOL, msg=k)
    # kd_cached took kd_mem's cache from memory (rank 0 wrote the file, every rank met at the barrier)
    tm = load_file(str(ddp / "kd_mem" / "model.safetensors"))
    tc = load_file(str(ddp / "kd_cached" / "model.safetensors"))
    assert all(torch.equal(tm[k], tc[k]) for k in tm)
    # a loss with parameters (a connector built from a dry forward pass) trains inside the DDP-wrapped
    # forward: its gradients are averaged like the student's, so its weights match one process too
    _close(ddp, single, "kd_taps")
    la, lb = (
        load_file(str(ddp / "kd_taps" / "losses.safetensors")),
        load_file(str(single / "kd_taps" / "losses.safetensors")),
    )
    for k in ("tap_regress/connector.weight", "tap_regress/connector.bias"):
        torch.testing.assert_close(la[k], lb[k], atol=ATOL, rtol=RTOL, msg=k)
    assert int(la["tap_regress/steps"]) == int(lb["tap_regress/steps"]) == 3
    # ProtoTree's derivative-free leaf update (the head's per-step hook, no gradient): each rank's
    # update from its shard is all-reduced, so every rank holds the leaves of one process
    _close(ddp, single, "tree")
    leaves = load_file(str(ddp / "tree" / "model.safetensors"))["head.leaves"]
    assert leaves.abs().sum() > 0  # updated from their zero initialisation
    results = json.loads((ddp / "results.json").read_text())
    assert (
        results["stages"]["kd"]["test_images"]
        == json.loads((single / "results.json").read_text())["stages"]["kd"]["test_images"]
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn_ranks(
    recipe: Path, out: Path, env: dict[str, str], rank1_env: dict[str, str]
) -> list[subprocess.CompletedProcess]:
    """Two ranks started by hand (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT), as torchrun would."""
    port = str(_free_port())
    procs = []
    for rank in (0, 1):
        e = {
            **env,
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": port,
            "WORLD_SIZE": "2",
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            **(rank1_env if rank == 1 else {}),
        }
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "kdtoolkit", "run", str(recipe), "--out", str(out), "-q"],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                env=e,
                cwd=ROOT,
            )
        )
    done = []
    try:
        for p in procs:
            stdout, stderr = p.communicate(timeout=240)
            done.append(subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()
    return done


def test_ctrl_c_in_one_rank_stops_every_rank_at_the_same_step_and_resumes_exactly(ddp_runs, tmp_path):
    """Ctrl-C reaching only rank 1 (its loss sends itself SIGINT in the 3rd batch):
    the per-step all-reduce stops both ranks after that batch, rank 0 saves one
    checkpoint with both ranks' RNG states, both exit with 130; the same
    command resumes and ends bit-identical to the uninterrupted DDP run."""
    recipe, env, _, ddp, proc = ddp_runs
    assert proc.returncode == 0, proc.stderr
    out = tmp_path / "run"
    first = _spawn_ranks(recipe, out, env, {"KDT_GATE_SIGINT": "3"})
    ck_path = out / "teacher" / "checkpoint.safetensors"
    for p in first:
        assert p.returncode == 130, p.stderr
        assert f"interrupted: checkpoint saved in {ck_path} (phase 'train0', epoch 1, batch 3)" in p.stderr
    ck = load_checkpoint(ck_path)
    assert (ck.phase, ck.epoch, ck.batch) == (0, 0, 3) and tuple(ck.rng.shape)[0] == 2
    assert ck.running["seen"] == 3 * 31
    for p in _spawn_ranks(recipe, out, env, {}):
        assert p.returncode == 0, p.stderr
    assert_same_weights(out, ddp, ["teacher", "kd", "kd_mem", "kd_cached"])
    for stage in ("teacher", "kd", "kd_mem", "kd_cached"):
        assert metrics_lines(out, stage) == metrics_lines(ddp, stage)


def test_a_failure_on_one_rank_ends_every_rank_with_one_line(ddp_runs, tmp_path):
    """A plugin hook raising on rank 0 (observers run there only): rank 0 names the
    plugin, rank 1 fails on its next collective with one line too, nobody hangs."""
    recipe, env, _, _, _ = ddp_runs
    results = _spawn_ranks(recipe, tmp_path / "run", {**env, "KDT_GATE_RAISE": "after_epoch"}, {})
    for rank, p in enumerate(results):
        assert p.returncode == 2, p.stderr
        assert "Traceback" not in p.stderr
        lines = [l for l in p.stderr.splitlines() if l.startswith("kdt: error:")]
        assert len(lines) == 1, p.stderr
        expected = "plugin 'gate' failed in kdt_after_epoch" if rank == 0 else "another process of the distributed run"
        assert expected in lines[0]


@pytest.fixture
def plugins(site):
    set_manager(PluginManager(extra=[(load_gate_module(site), "gate")]))
    yield
    set_manager(None)


def _train(tmp_path: Path, name: str, recipe_text: str, *args: str) -> Path:
    recipe = tmp_path / f"{name}.toml"
    recipe.write_text(recipe_text)
    out = tmp_path / name
    assert main(["run", str(recipe), "--out", str(out), "-q", *args]) == 0
    return out


def test_gradient_accumulation_matches_a_larger_batch(plugins, tmp_path):
    """Batches of 16 with ``accumulate = 2`` see the same images as batches of 32
    and end with the same weights (``ATOL``/``RTOL``: summation order only)."""
    teacher_only = RECIPE.split("[stages.kd]")[0]
    big = _train(tmp_path, "big", teacher_only)
    small = _train(
        tmp_path,
        "small",
        teacher_only.replace("batch_size = 32", "batch_size = 16").replace(
            "limit_batches = 3", "limit_batches = 6\naccumulate = 2"
        ),
    )
    _close(small, big, "teacher")
    # and it is not vacuous: without accumulation the same batches of 16 give other weights
    plain = _train(
        tmp_path,
        "plain",
        teacher_only.replace("batch_size = 32", "batch_size = 16").replace("limit_batches = 3", "limit_batches = 6"),
    )
    with pytest.raises(AssertionError):
        _close(plain, big, "teacher")


def test_bf16_autocast_run_completes_on_the_cpu(plugins, tmp_path):
    out = _train(tmp_path, "bf16", 'precision = "bf16"\n' + RECIPE, "--device", "cpu")
    assert json.loads((out / "run.json").read_text())["precision"] == "bf16"
    (cache,) = (out / "teacher").glob("teacher-cache-*")
    assert load_file(str(cache))["logits"].dtype == torch.bfloat16  # as the teacher produced them under autocast
    for stage in ("teacher", "kd", "kd_mem", "kd_cached"):
        weights = load_file(str(out / stage / "model.safetensors"))
        assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in weights.values())
        assert 0.0 <= json.loads((out / stage / "result.json").read_text())["accuracy"] <= 1.0
    fp32 = _train(tmp_path, "fp32", RECIPE, "--device", "cpu")
    a, b = load_file(str(out / "kd" / "model.safetensors")), load_file(str(fp32 / "kd" / "model.safetensors"))
    assert any(not torch.equal(a[k], b[k]) for k in a), "bf16 autocast had no effect"
