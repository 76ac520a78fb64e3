"""Faults: every bad input or failure is one clear line and exit code 2.

- a non-finite loss stops the run naming stage, phase, epoch, step and the
  loss terms, and keeps the last good checkpoint;
- a recipe changed since a checkpoint was written is refused (``--force``
  retrains);
- weights never unpickle anything: a pickled object is refused;
- an unwritable output directory is refused before training;
- a plugin raising in an observer hook is named;
- a seeded fuzz feeds truncated and random files as weights, teacher weights
  in a run directory, records, checkpoints and dataset images.

Most runs are in-process (``kdtoolkit.cli.commands.main``) on a BN-free two-layer
backbone (``tinyconv`` from the gate plugin of ``kdt_faultutil``); the fuzz
runs its cases in one subprocess with a timeout (a hang fails, it does not
block), and a few cases go through the real ``python -m kdtoolkit``.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from kdt_faultutil import ROOT, load_gate_module, make_gate_plugin, metrics_lines, one_line_error, plugin_env, run
from kdtoolkit.foundation.checkpoint import load_checkpoint
from kdtoolkit.cli.commands import main
from kdtoolkit.plugin.hookspecs import hookimpl
from kdtoolkit.plugin.manager import PluginManager, set_manager

DATA = """
[data]
dataset = "digits"
image_size = 16
batch_size = 32
eval_batch_size = 256
"""

STAGE = """
[stages.{name}]
model.backbone = {{ name = "tinyconv" }}
model.head = {{ name = "linear" }}
{extra}
[[stages.{name}.phases]]
epochs = {epochs}
limit_batches = 2
groups = [{{ params = ["backbone", "head"], lr = 1e-2 }}]
"""

# teacher, then kd with the gate loss (calls 1-4: 2 epochs of 2 batches)
BASE = (
    DATA
    + STAGE.format(name="teacher", epochs=1, extra='losses = [{ name = "cross_entropy" }]')
    + STAGE.format(
        name="kd",
        epochs=2,
        extra='teacher = "teacher"\nlosses = [{ name = "cross_entropy" }, { name = "hinton_kd" }, { name = "gate" }]',
    )
)


def solo(extra: str = "", epochs: int = 2, data: str = DATA) -> str:
    return data + STAGE.format(name="solo", epochs=epochs, extra='losses = [{ name = "cross_entropy" }]\n' + extra)


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    return make_gate_plugin(tmp_path_factory.mktemp("faults") / "site")


@pytest.fixture
def plugins(site):
    """Use the gate plugin (and ``extra``) in-process; restores the default manager after."""

    def use(*extra):
        set_manager(PluginManager(extra=[(load_gate_module(site), "gate"), *extra]))

    yield use
    set_manager(None)


def _main(capsys, *args: str) -> tuple[int, str]:
    code = main(list(args))
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, err


def _line(err: str) -> str:
    lines = [l for l in err.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("kdt: error: "), err
    return lines[0]


# --------------------------------------------------------------------------- a non-finite loss


class _TurnsNonFinite:
    """A throwaway plugin whose loss ``bad`` is 0 until its ``at``-th call, then ``value``."""

    def __init__(self, at: int, value: float):
        self.at, self.value, self.calls = at, value, 0

    @hookimpl
    def kdt_register_losses(self, registry):
        outer = self

        class Bad:
            """Zero, then non-finite at a chosen call."""

            requires_teacher = False
            requires_outputs = ("logits",)

            def __call__(self, step):
                outer.calls += 1
                zero = step.outputs["logits"].float().mean() * 0.0
                return zero + outer.value if outer.calls == outer.at else zero

        registry.add("bad", Bad)


@pytest.mark.parametrize("value", [float("inf"), float("nan")])
def test_non_finite_loss_stops_with_exit_2_and_keeps_the_last_good_checkpoint(tmp_path, plugins, capsys, value):
    plugins((_TurnsNonFinite(at=4, value=value), "nonfinite"))  # epoch 2, step 2
    recipe = tmp_path / "r.toml"
    recipe.write_text(
        solo(extra="", epochs=2).replace(
            'losses = [{ name = "cross_entropy" }]', 'losses = [{ name = "cross_entropy" }, { name = "bad" }]'
        )
    )
    out = tmp_path / "run"
    code, err = _main(capsys, "run", str(recipe), "--out", str(out), "-q")
    assert code == 2
    line = _line(err)
    ck = out / "solo" / "checkpoint.safetensors"
    assert f"non-finite loss in stage 'solo', phase 'train0', epoch 2, step 2: total {value}" in line
    assert f"bad = {value}" in line and "cross_entropy = " in line
    assert f"last good checkpoint kept: {ck}" in line
    c = load_checkpoint(ck)
    assert (c.phase, c.epoch, c.batch) == (0, 1, 0)
    assert all(torch.isfinite(t).all() for t in c.model.values())
    assert len((out / "solo" / "metrics.jsonl").read_text().splitlines()) == 1
    assert not (out / "solo" / "model.safetensors").exists()


def test_checkpoint_every_n_epochs_and_resume_after_a_failure(tmp_path, plugins, capsys):
    recipe = tmp_path / "r.toml"
    recipe.write_text(
        "checkpoint_every = 2\n"
        + solo(epochs=4).replace(
            'losses = [{ name = "cross_entropy" }]', 'losses = [{ name = "cross_entropy" }, { name = "bad" }]'
        )
    )
    out = tmp_path / "run"
    plugins((_TurnsNonFinite(at=7, value=float("inf")), "nonfinite"))  # epoch 4, step 1
    code, err = _main(capsys, "run", str(recipe), "--out", str(out), "-q")
    assert code == 2 and "epoch 4, step 1" in _line(err)
    ck = load_checkpoint(out / "solo" / "checkpoint.safetensors")
    assert (ck.phase, ck.epoch, ck.batch) == (0, 2, 0)  # every 2 epochs: not after epoch 3
    assert len((out / "solo" / "metrics.jsonl").read_text().splitlines()) == 3
    # the same command again (the loss is finite this time): epochs 3 and 4 are redone, each logged once
    plugins((_TurnsNonFinite(at=0, value=float("inf")), "nonfinite"))
    code, err = _main(capsys, "run", str(recipe), "--out", str(out), "-q")
    assert code == 0, err
    assert [json.loads(l)["epoch"] for l in (out / "solo" / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4]
    assert not (out / "solo" / "checkpoint.safetensors").exists()


# --------------------------------------------------------------------------- Ctrl-C in-process, changed recipes


@pytest.fixture(scope="module")
def interrupted(site, tmp_path_factory):
    """BASE run interrupted (SIGINT from its own loss) in kd's epoch 2, batch 1: (recipe, run dir)."""
    d = tmp_path_factory.mktemp("interrupted")
    recipe = d / "base.toml"
    recipe.write_text(BASE)
    out = d / "run"
    set_manager(PluginManager(extra=[(load_gate_module(site), "gate")]))
    os.environ["KDT_GATE_SIGINT"] = "3"
    handler = signal.getsignal(signal.SIGINT)
    try:
        code = main(["run", str(recipe), "--out", str(out), "-q"])
    finally:
        del os.environ["KDT_GATE_SIGINT"]
        set_manager(None)
    assert code == 130
    assert signal.getsignal(signal.SIGINT) is handler  # the run's own handler is removed again
    return recipe, out


def test_ctrl_c_in_process_leaves_a_resumable_checkpoint(interrupted):
    _, out = interrupted
    assert (out / "teacher" / "result.json").exists()
    c = load_checkpoint(out / "kd" / "checkpoint.safetensors")
    assert (c.phase, c.epoch, c.batch) == (0, 1, 1) and c.rng is not None
    assert c.metrics_bytes == (out / "kd" / "metrics.jsonl").stat().st_size


def test_changed_recipe_is_refused_while_a_checkpoint_exists_unless_force(interrupted, tmp_path, plugins, capsys):
    recipe, base = interrupted
    out = tmp_path / "run"
    shutil.copytree(base, out)
    ck = out / "kd" / "checkpoint.safetensors"
    before = ck.read_bytes()
    plugins()
    change = "stages.kd.phases[0].groups[0].lr=0.05"
    code, err = _main(capsys, "run", str(recipe), "--out", str(out), "-q", "--set", change)
    assert code == 2
    line = _line(err)
    assert str(ck) in line and "stage 'kd'" in line and "different recipe" in line and "--force" in line
    assert ck.read_bytes() == before and not (out / "kd" / "model.safetensors").exists()

    # --force: kd is trained again from scratch with the new recipe, the teacher is reused
    teacher = (out / "teacher" / "model.safetensors").stat().st_mtime_ns
    code, err = _main(capsys, "run", str(recipe), "--out", str(out), "-q", "--set", change, "--force")
    assert code == 0, err
    assert not ck.exists() and (out / "teacher" / "model.safetensors").stat().st_mtime_ns == teacher
    assert [json.loads(l)["epoch"] for l in (out / "kd" / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    assert json.loads((out / "kd" / "result.json").read_text())["history"][0]["epochs"] == 2


def test_resuming_the_interrupted_run_matches_an_uninterrupted_one(interrupted, tmp_path, plugins, capsys):
    recipe, base = interrupted
    out = tmp_path / "resumed"
    shutil.copytree(base, out)
    plugins()
    assert _main(capsys, "run", str(recipe), "--out", str(out), "-q")[0] == 0
    plugins()
    assert _main(capsys, "run", str(recipe), "--out", str(tmp_path / "straight"), "-q")[0] == 0
    for stage in ("teacher", "kd"):
        a, b = (
            load_file(str(out / stage / "model.safetensors")),
            load_file(str(tmp_path / "straight" / stage / "model.safetensors")),
        )
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert metrics_lines(out, "kd") == metrics_lines(tmp_path / "straight", "kd")


# --------------------------------------------------------------------------- weights never unpickle


class _Evil:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _Custom:
    pass


def test_pickled_objects_in_weights_are_refused(tmp_path, plugins, capsys):
    plugins()
    marker = tmp_path / "code-ran"
    cases = {
        "evil.pth": ({"backbone.body.0.weight": torch.zeros(8, 3, 3, 3), "x": _Evil(marker)}, "posix.system"),
        "custom.pt": ({"backbone.body.0.weight": torch.zeros(8, 3, 3, 3), "x": _Custom()}, "_Custom"),
    }
    for name, (obj, named) in cases.items():
        torch.save(obj, tmp_path / name)
        recipe = tmp_path / f"{name}.toml"
        recipe.write_text(solo(f'model.weights = "{tmp_path / name}"', epochs=0))
        code, err = _main(capsys, "run", str(recipe), "--out", str(tmp_path / f"run-{name}"), "-q")
        assert code == 2
        line = _line(err)
        assert str(tmp_path / name) in line and "pickles a Python object" in line and named in line
        assert "weights_only=True" in line
    assert not marker.exists(), "the pickle ran code"


def test_plain_state_dicts_and_safetensors_load_as_weights(tmp_path, plugins, capsys):
    plugins()
    torch.manual_seed(5)
    state = {"backbone.body.0.weight": torch.randn(8, 3, 3, 3), "head.classifier.bias": torch.randn(10)}
    torch.save(state, tmp_path / "plain.pth")
    torch.save({"state_dict": state}, tmp_path / "wrapped.pth")
    save_file(state, str(tmp_path / "st.safetensors"))
    save_file(state, str(tmp_path / "st-named.pt"))  # safetensors content, PyTorch suffix: recognised, no pickle
    for name in ("plain.pth", "wrapped.pth", "st.safetensors", "st-named.pt"):
        recipe = tmp_path / f"{name}.toml"
        recipe.write_text(solo(f'model.weights = "{tmp_path / name}"\nmodel.strict = false', epochs=0))
        out = tmp_path / f"run-{name}"
        code, err = _main(capsys, "run", str(recipe), "--out", str(out), "-q")
        assert code == 0, err  # a partial file loads with strict = false (strict, it is refused: test_engine)
        got = load_file(str(out / "solo" / "model.safetensors"))
        for k, v in state.items():
            assert torch.equal(got[k], v), (name, k)


# --------------------------------------------------------------------------- output directory, plugin hooks, precision


def test_unwritable_output_directory_is_refused_before_training(tmp_path, plugins, capsys):
    plugins()
    recipe = tmp_path / "r.toml"
    recipe.write_text(solo())
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    code, err = _main(capsys, "run", str(recipe), "--out", str(blocker / "run"), "-q")
    assert code == 2 and "is not a directory" in _line(err)
    if os.geteuid() != 0:
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        target = locked / "run"
    elif Path("/proc/self").is_dir():
        target = Path("/proc/kdt-test-unwritable/run")  # root may write anywhere, except here
    else:  # pragma: no cover
        pytest.skip("no unwritable directory for root on this system")
    code, err = _main(capsys, "run", str(recipe), "--out", str(target), "-q")
    assert code == 2
    line = _line(err)
    assert str(target) in line and "not writable" in line


def test_plugin_raising_in_a_hook_is_named_on_one_line(site, tmp_path):
    recipe = tmp_path / "r.toml"
    recipe.write_text(BASE)
    proc = run(
        ["run", str(recipe), "--out", str(tmp_path / "run"), "-q"],
        plugin_env(site, OMP_NUM_THREADS="1", KDT_GATE_RAISE="after_epoch"),
    )
    assert proc.returncode == 2
    line = one_line_error(proc)
    assert (
        "plugin 'gate' failed in kdt_after_epoch: RuntimeError: the gate plugin refuses epoch 1 of stage teacher"
        in line
    )


def test_fp16_is_refused_on_the_cpu(tmp_path, plugins, capsys):
    plugins()
    recipe = tmp_path / "r.toml"
    recipe.write_text('precision = "fp16"\n' + solo())
    code, err = _main(capsys, "run", str(recipe), "--out", str(tmp_path / "run"), "-q", "--device", "cpu")
    assert code == 2
    line = _line(err)
    assert "precision" in line and "fp16" in line and "GPU" in line and str(recipe) in line


# --------------------------------------------------------------------------- fuzz

DRIVER = r"""
import contextlib, io, json, sys, traceback
from kdtoolkit.cli.commands import main
for case in json.load(open(sys.argv[1])):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(case["argv"])
        except BaseException:
            code = "uncaught"
            err.write(traceback.format_exc())
    print(json.dumps({"id": case["id"], "code": code, "stderr": err.getvalue()}), flush=True)
"""

TARGETS = ("weights", "weights_pth", "teacher", "records", "checkpoint", "image")


def _image_folder(root: Path, rng: random.Random) -> Path:
    from PIL import Image

    for split, n in (("train", 4), ("test", 2)):
        for cls in ("a", "b"):
            d = root / split / cls
            d.mkdir(parents=True)
            for i in range(n):
                color = tuple(rng.randrange(256) for _ in range(3))
                Image.new("RGB", (20, 20), color).save(d / f"{i}.png")
    return root


def _decodable(path: Path) -> bool:
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.load()
        return True
    except Exception:
        return False


def _corrupt(data: bytes, kind: str, rng: random.Random) -> bytes:
    if kind == "empty":
        return b""
    if kind == "random":
        return bytes(rng.randrange(256) for _ in range(rng.randrange(1, 4096)))
    return data[: rng.randrange(1, len(data))]  # truncated somewhere inside


@pytest.fixture(scope="module")
def fuzz_cases(site, interrupted, tmp_path_factory):
    """30 seeded cases: 6 targets x (empty, truncated x3, random bytes)."""
    recipe, base = interrupted
    d = tmp_path_factory.mktemp("fuzz")
    rng = random.Random(1234)
    images = _image_folder(d / "images", rng)
    teacher_weights = base / "teacher" / "model.safetensors"
    torch.save(load_file(str(teacher_weights)), d / "teacher.pth")
    good_records = base / "teacher" / "records.safetensors"
    cases = []
    for target in TARGETS:
        for j, kind in enumerate(("empty", "truncate", "truncate", "truncate", "random")):
            cid = f"{target}-{j}-{kind}"
            c = d / cid
            c.mkdir()
            expect = 2
            if target in ("weights", "weights_pth"):
                src = teacher_weights if target == "weights" else d / "teacher.pth"
                bad = c / ("w.safetensors" if target == "weights" else "w.pth")
                bad.write_bytes(_corrupt(src.read_bytes(), kind, rng))
                (c / "r.toml").write_text(solo(f'model.weights = "{bad}"', epochs=0))
                argv = ["run", str(c / "r.toml"), "--out", str(c / "run"), "-q"]
            elif target in ("teacher", "checkpoint"):
                shutil.copytree(base, c / "run")
                bad = c / "run" / ("teacher/model.safetensors" if target == "teacher" else "kd/checkpoint.safetensors")
                bad.write_bytes(_corrupt(bad.read_bytes(), kind, rng))
                argv = ["run", str(recipe), "--out", str(c / "run"), "-q"]
            elif target == "records":
                bad = c / "teacher.safetensors"
                bad.write_bytes(_corrupt(good_records.read_bytes(), kind, rng))
                argv = ["metrics", "--teacher", str(bad), "--student", str(good_records)]
            else:
                root = c / "images"
                shutil.copytree(images, root)
                bad = root / "train" / "b" / f"{j % 4}.png"
                bad.write_bytes(_corrupt(bad.read_bytes(), kind, rng))
                expect = 0 if _decodable(bad) else 2
                data = DATA.replace(
                    'dataset = "digits"',
                    f'dataset = "image_folder"\nroot = "{root}"\nnum_workers = {1 if kind == "random" else 0}',
                ).replace("batch_size = 32", "batch_size = 4")
                (c / "r.toml").write_text(solo(data=data, epochs=1))
                argv = ["run", str(c / "r.toml"), "--out", str(c / "run"), "-q"]
            cases.append({"id": cid, "argv": argv, "expect": expect, "file": str(bad)})
    (d / "cases.json").write_text(json.dumps(cases))
    return d, cases


def test_fuzzed_files_give_one_clear_line_and_exit_2(site, fuzz_cases):
    d, cases = fuzz_cases
    assert len(cases) == 30
    (d / "driver.py").write_text(DRIVER)
    try:
        proc = subprocess.run(
            [sys.executable, str(d / "driver.py"), str(d / "cases.json")],
            capture_output=True,
            text=True,
            env=plugin_env(site, OMP_NUM_THREADS="1"),
            cwd=ROOT,
            timeout=240,
        )
    except subprocess.TimeoutExpired as exc:  # a hang: show the cases that finished
        raise AssertionError(f"fuzz cases hung; finished:\n{exc.stdout}") from None
    results = {r["id"]: r for r in map(json.loads, proc.stdout.splitlines())}
    assert len(results) == len(cases), proc.stderr
    for case in cases:
        r = results[case["id"]]
        assert r["code"] == case["expect"], (case["id"], r["stderr"])
        if case["expect"] == 2:
            line = _line(r["stderr"])
            assert case["file"] in line, (case["id"], line)


@pytest.mark.parametrize("target", ["weights-4-random", "checkpoint-1-truncate"])
def test_fuzzed_files_through_the_real_command(site, fuzz_cases, target):
    _, cases = fuzz_cases
    case = next(c for c in cases if c["id"] == target)
    proc = run(case["argv"], plugin_env(site, OMP_NUM_THREADS="1"), timeout=120)
    assert proc.returncode == 2
    assert case["file"] in one_line_error(proc)
