"""The teacher cache (``teacher_cache = "memory" | "disk"``), skipping unneeded
teacher forward passes, and ``channels_last``.

One module-scoped run trains a tiny ProtoPNet teacher and three identical
Proto2Proto students on un-augmented digits: ``kd`` (teacher run on every
batch), ``kd_disk`` (cache written to the teacher's stage directory) and
``kd_mem`` (cache in memory; reuses the one built for ``kd_disk``).
"""

from __future__ import annotations

import json
import shutil
import tomllib
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from kdt_faultutil import assert_same_weights, gated, kill_hard, make_gate_plugin, metrics_lines, plugin_env, run
from kdt_testutil import TINY_CLASSIC, proto_recipe
from kdtoolkit.foundation.io import CHECKSUM_KEY
from kdtoolkit.engine import teacher as teachercache
from kdtoolkit.cli.commands import main
from kdtoolkit.plugin.hookspecs import hookimpl
from kdtoolkit.plugin.manager import PluginManager, get_manager, set_manager
from kdtoolkit.recipe.loader import load_recipe
from kdtoolkit.engine.data import build_data
from kdtoolkit.engine.models import build_model, load_model_file

# Same numbers up to float rounding: the cache is computed in batches of eval_batch_size.
ATOL, RTOL = 1e-5, 1e-4


def _cached_recipe() -> str:
    r = proto_recipe().replace("eval_batch_size = 128\n", "eval_batch_size = 128\naugment = false\n")
    start = r.index("\n[stages.baseline]")
    end = r.index("\n[stages.kd]")
    r = r[:start] + r[end:]  # teacher and kd only
    return (
        r
        + '\n[stages.kd_disk]\nbase = "kd"\nteacher_cache = "disk"\n'
        + '\n[stages.kd_mem]\nbase = "kd"\nteacher_cache = "memory"\n'
    )


def _run(recipe: Path, out: Path, *extra: str) -> int:
    return main(["run", str(recipe), "--out", str(out), "-q", *extra])


@pytest.fixture(scope="module")
def cached(tmp_path_factory):
    d = tmp_path_factory.mktemp("tcache")
    recipe = d / "r.toml"
    recipe.write_text(_cached_recipe())
    out = d / "run"
    assert _run(recipe, out) == 0
    return d, recipe, out


def _cache_files(out: Path) -> list[Path]:
    return sorted((out / "teacher").glob("teacher-cache-*.safetensors"))


def _weights(out: Path, stage: str) -> dict[str, torch.Tensor]:
    return load_file(str(out / stage / "model.safetensors"))


def test_cached_students_match_the_student_trained_with_the_live_teacher(cached):
    _, _, out = cached
    live, disk, mem = _weights(out, "kd"), _weights(out, "kd_disk"), _weights(out, "kd_mem")
    assert live.keys() == disk.keys() == mem.keys()
    for k in live:
        torch.testing.assert_close(disk[k], live[k], atol=ATOL, rtol=RTOL, msg=k)
        assert torch.equal(disk[k], mem[k]), k  # the same cache: bit-identical
    for a, b in zip(metrics_lines(out, "kd"), metrics_lines(out, "kd_disk")):
        for key, value in a.items():
            if key.startswith("loss/"):
                assert b[key] == pytest.approx(value, rel=1e-4, abs=1e-6), key


def test_disk_cache_holds_only_what_the_losses_read_in_dataset_order(cached):
    """With mask_source = "student" the correspondence loss reads only the
    teacher's add-on features; the global explanation loss reads its
    prototypes (parameters). Row i of the cache is the teacher's output for
    training image i."""
    _, recipe, out = cached
    files = _cache_files(out)
    assert len(files) == 1
    with safe_open(str(files[0]), "pt") as fh:
        meta = fh.metadata()
    assert meta["format"] == teachercache.CACHE_FORMAT
    assert json.loads(meta["teacher"]) == "teacher"
    key = json.loads(meta["key"])
    assert files[0].name == f"teacher-cache-{key}.safetensors"
    tensors = load_file(str(files[0]))
    assert set(tensors) == {"features"}

    r = load_recipe(recipe)
    data = build_data(r.stage("kd"), get_manager())
    n = len(data.train)
    assert json.loads(meta["n"]) == n and tensors["features"].shape == (n, 16, 2, 2)
    assert tensors["features"].dtype == torch.float32

    teacher = build_model(r.stage("teacher"), data.num_classes, get_manager())
    teacher.load_state_dict(load_model_file(out / "teacher" / "model.safetensors")[0])
    teacher.eval()
    picks = [0, 1, 57, n - 1]
    x = torch.stack([data.train[i][0] for i in picks])
    with torch.no_grad():
        expected = teacher(x)["features"]
    torch.testing.assert_close(tensors["features"][picks], expected, atol=1e-5, rtol=1e-4)


def _meta(path: Path) -> dict[str, str]:
    with safe_open(str(path), "pt") as fh:
        return fh.metadata()


def _rerun_copy(out: Path, dest: Path, stage: str) -> Path:
    """A copy of the run without ``stage``: running the recipe again trains only that stage."""
    shutil.copytree(out, dest)
    shutil.rmtree(dest / stage)
    return dest


def test_the_student_learns_from_the_cache_file(cached, tmp_path):
    """A cache file whose features were altered (same key) changes what kd_disk learns:
    the rows of the file, not a hidden teacher pass, feed the correspondence loss."""
    _, recipe, out = cached
    copy = _rerun_copy(out, tmp_path / "run", "kd_disk")
    shutil.rmtree(copy / "kd_mem")
    path = _cache_files(copy)[0]
    tensors = {k: v.clone() for k, v in load_file(str(path)).items()}
    with safe_open(str(path), "pt") as fh:
        meta = {k: json.loads(v) for k, v in fh.metadata().items() if k not in ("format", CHECKSUM_KEY)}
    tampered = teachercache.TeacherCache({"features": tensors["features"] * 0.0}, meta["key"])
    teachercache.save(path, tampered, {k: v for k, v in meta.items() if k not in ("key", "n")})
    assert _run(recipe, copy) == 0
    a, b = _weights(copy, "kd_disk"), _weights(out, "kd_disk")
    assert any(not torch.allclose(a[k], b[k]) for k in a)
    # kd_mem shares the key: it was served the same (altered) cache
    m = _weights(copy, "kd_mem")
    assert all(torch.equal(a[k], m[k]) for k in a)


@pytest.mark.parametrize("damage", ["truncated", "random_bytes", "other_key"])
def test_an_unusable_cache_file_is_computed_again(cached, tmp_path, damage, capsys):
    _, recipe, out = cached
    copy = _rerun_copy(out, tmp_path / "run", "kd_disk")
    path = _cache_files(copy)[0]
    good = {k: v.clone() for k, v in load_file(str(path)).items()}  # not a view of the file, which is damaged below
    good_meta = _meta(path)
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif damage == "random_bytes":
        path.write_bytes(
            torch.randint(0, 256, (4096,), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
            .numpy()
            .tobytes()
        )
    else:
        teachercache.save(path, teachercache.TeacherCache(good, "0" * 16), {"teacher": "teacher"})
    capsys.readouterr()
    assert main(["run", str(recipe), "--out", str(copy)]) == 0
    err = "".join(capsys.readouterr().err.split())
    assert "computingitagain" in err, err
    again = load_file(str(path))  # written again, identically
    assert (
        _meta(path) == good_meta and again.keys() == good.keys() and all(torch.equal(again[k], good[k]) for k in good)
    )
    assert_same_weights(copy, out, ["kd_disk"])


def test_disk_cache_is_read_back_by_a_later_run(cached, tmp_path, capsys):
    _, recipe, out = cached
    copy = _rerun_copy(out, tmp_path / "run", "kd_disk")
    before = _cache_files(copy)[0].stat().st_mtime_ns
    capsys.readouterr()
    assert main(["run", str(recipe), "--out", str(copy)]) == 0
    err = "".join(capsys.readouterr().err.split())  # lines wrap at the terminal's width
    assert "kd_disk:teacheroutputsreadfromteacher-cache-" in err, err
    assert _cache_files(copy)[0].stat().st_mtime_ns == before
    assert_same_weights(copy, out, ["kd_disk"])


def test_stage_hash_ignores_the_default_and_the_cache_location(tmp_path):
    base = tmp_path / "a.toml"
    base.write_text(_cached_recipe())
    r = load_recipe(base)

    def kd_hash(mode: str) -> str:
        p = tmp_path / f"{mode}.toml"
        p.write_text(
            _cached_recipe().replace(
                '[stages.kd]\nteacher = "teacher"\n', f'[stages.kd]\nteacher = "teacher"\nteacher_cache = "{mode}"\n'
            )
        )
        return load_recipe(p).stage_hash("kd")

    assert kd_hash("off") == r.stage_hash("kd")
    assert kd_hash("memory") == kd_hash("disk") != r.stage_hash("kd")
    cl = tmp_path / "c.toml"
    # the layout is part of the hash (its arithmetic differs): the default "auto", true and false differ
    cl.write_text("channels_last = false\n" + _cached_recipe())
    off = load_recipe(cl).stage_hash("kd")
    cl.write_text("channels_last = true\n" + _cached_recipe())
    on = load_recipe(cl).stage_hash("kd")
    assert len({off, on, r.stage_hash("kd")}) == 3


def test_needed_outputs_follow_the_losses_declarations():
    class Declares:
        requires_teacher = True
        requires_teacher_outputs = ("logits",)

    class ParamsOnly:
        requires_teacher = True
        requires_teacher_outputs = ()

    class NoTeacher:
        requires_teacher = False

    class Undeclared:
        pass

    class TeacherUndeclared:
        requires_teacher = True

    assert teachercache.needed_outputs([Declares(), NoTeacher()]) == {"logits"}
    assert teachercache.needed_outputs([ParamsOnly(), NoTeacher()]) == set()
    assert teachercache.needed_outputs([Declares(), Undeclared()]) is None
    assert teachercache.needed_outputs([TeacherUndeclared()]) is None
    from kdt_proto2proto.losses import PatchPrototypeCorrespondenceLoss

    assert teachercache.needed_outputs([PatchPrototypeCorrespondenceLoss()]) == {"features"}
    assert teachercache.needed_outputs([PatchPrototypeCorrespondenceLoss(mask_source="either")]) == {
        "features",
        "min_distances",
        "distances",
    }
    assert teachercache.needed_outputs([PatchPrototypeCorrespondenceLoss(mask_source="either", mask_ties="first")]) == {
        "features",
        "min_distances",
        "argmin",
    }


# --------------------------------------------------------------------------- what losses are given

_SEEN: list[tuple[str, object]] = []


class _Probes:
    @hookimpl
    def kdt_register_losses(self, registry):
        class ParamsProbe:
            """Reads only the teacher's parameters."""

            requires_teacher = True
            requires_teacher_outputs = ()

            def __call__(self, step):
                _SEEN.append(("params", step.teacher_outputs))
                return step.outputs["logits"].float().sum() * 0.0

        class LogitsProbe:
            """Reads the teacher's logits."""

            requires_teacher = True
            requires_teacher_outputs = ("logits",)

            def __call__(self, step):
                _SEEN.append(("logits", dict(step.teacher_outputs)))
                return step.outputs["logits"].float().sum() * 0.0

        class Greedy:
            """Declares logits, reads more."""

            requires_teacher = True
            requires_teacher_outputs = ("logits",)

            def __call__(self, step):
                return step.teacher_outputs["features"].sum()

        class Undeclared:
            """Declares that it reads no teacher output, then reads one."""

            requires_teacher = True
            requires_teacher_outputs = ()

            def __call__(self, step):
                return step.teacher_outputs["logits"].sum()

        class Layout:
            """Records the memory layout of the training batch and of the models' first convolution."""

            requires_teacher = True
            requires_teacher_outputs = ()

            def __call__(self, step):
                def conv(m):
                    return next(p for p in m.parameters() if p.dim() == 4)

                cl = torch.channels_last
                _SEEN.append(
                    (
                        "layout",
                        (
                            step.inputs.is_contiguous(memory_format=cl),
                            conv(step.model).is_contiguous(memory_format=cl),
                            conv(step.teacher).is_contiguous(memory_format=cl),
                        ),
                    )
                )
                return step.outputs["logits"].float().sum() * 0.0

        registry.add("undeclared_probe", Undeclared)
        registry.add("layout_probe", Layout)
        registry.add("params_probe", ParamsProbe)
        registry.add("logits_probe", LogitsProbe)
        registry.add("greedy_probe", Greedy)


@pytest.fixture
def probes():
    _SEEN.clear()
    set_manager(PluginManager(extra=[(_Probes(), "probes")]))
    yield
    set_manager(None)


def _probe_recipe(losses: str, cache: str = "off") -> str:
    r = TINY_CLASSIC.replace("eval_batch_size = 128\n", "eval_batch_size = 128\naugment = false\n")
    r = r.replace('teacher = "teacher"\n', f'teacher = "teacher"\nteacher_cache = "{cache}"\n')
    return r.replace(
        'losses = [{ name = "cross_entropy", weight = 0.5 }, { name = "hinton_kd", weight = 0.5 }]', losses
    )


def test_no_teacher_pass_when_the_losses_read_no_teacher_output(probes, tmp_path):
    recipe = tmp_path / "r.toml"
    recipe.write_text(_probe_recipe('losses = [{ name = "cross_entropy" }, { name = "params_probe" }]', cache="disk"))
    assert _run(recipe, tmp_path / "run") == 0
    assert _SEEN and all(kind == "params" and outputs is None for kind, outputs in _SEEN)
    assert not _cache_files(tmp_path / "run")  # nothing to cache: no teacher pass at all


def test_a_loss_reading_outputs_it_did_not_declare_gets_a_hint(probes, tmp_path, capsys):
    recipe = tmp_path / "r.toml"
    recipe.write_text(_probe_recipe('losses = [{ name = "cross_entropy" }, { name = "undeclared_probe" }]'))
    capsys.readouterr()
    assert _run(recipe, tmp_path / "run") == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert "loss 'undeclared_probe' cannot be computed" in err and "requires_teacher_outputs" in err


def test_cache_key_covers_what_changes_the_numbers():
    data = {
        "dataset": "digits",
        "batch_size": 32,
        "eval_batch_size": 128,
        "num_workers": 0,
        "drop_last": False,
        "augment": False,
        "image_size": 16,
    }
    key = teachercache.cache_key("t", data, "fp32", {"features"})
    assert key == teachercache.cache_key(
        "t", {**data, "batch_size": 8, "num_workers": 2, "drop_last": True}, "fp32", {"features"}
    )
    others = [
        teachercache.cache_key("t2", data, "fp32", {"features"}),
        teachercache.cache_key("t", {**data, "eval_batch_size": 64}, "fp32", {"features"}),
        teachercache.cache_key("t", {**data, "image_size": 32}, "fp32", {"features"}),
        teachercache.cache_key("t", data, "bf16", {"features"}),
        teachercache.cache_key("t", data, "fp32", {"features", "argmin"}),
        teachercache.cache_key("t", data, "fp32", None),
        teachercache.cache_key("t", data, "fp32", {"features"}, world=2),
        teachercache.cache_key("t", data, "fp32", {"features"}, versions={"torch": "x"}),
    ]
    assert key not in others and len(set(others)) == len(others)


@pytest.mark.parametrize("cache", ["off", "memory"])
def test_losses_get_the_teacher_outputs_they_declare(probes, tmp_path, cache):
    recipe = tmp_path / "r.toml"
    recipe.write_text(_probe_recipe('losses = [{ name = "cross_entropy" }, { name = "logits_probe" }]', cache=cache))
    assert _run(recipe, tmp_path / "run") == 0
    assert _SEEN
    for kind, outputs in _SEEN:
        assert kind == "logits" and outputs["logits"].shape[1] == 10 and not outputs["logits"].requires_grad
        if cache == "memory":  # cached: only what the losses declare
            assert set(outputs) == {"logits"}


def test_reading_an_output_the_cache_does_not_hold_is_one_line(probes, tmp_path, capsys):
    recipe = tmp_path / "r.toml"
    recipe.write_text(_probe_recipe('losses = [{ name = "cross_entropy" }, { name = "greedy_probe" }]', cache="memory"))
    capsys.readouterr()
    assert _run(recipe, tmp_path / "run") == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert "loss 'greedy_probe' reads output 'features'" in err and "requires_teacher_outputs" in err


# --------------------------------------------------------------------------- resume and channels_last

RESUME_RECIPE = """
seed = 5
checkpoint_every = 1

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
epochs = 1
limit_batches = 3
groups = [{ params = ["backbone", "head"], lr = 1e-2 }]

[stages.kd]
teacher = "teacher"
teacher_cache = "disk"
model.backbone = { name = "tinyconv" }
model.head = { name = "linear", dropout = 0.2 }
losses = [{ name = "cross_entropy", weight = 0.5 }, { name = "hinton_kd", weight = 0.5 }, { name = "gate" }]
[[stages.kd.phases]]
epochs = 2
limit_batches = 3
groups = [{ params = ["backbone", "head"], lr = 1e-2 }]
"""


@pytest.mark.parametrize("keep_file", [True, False])
def test_killed_cached_run_resumes_bit_identical(tmp_path, keep_file):
    """SIGKILL in kd's second epoch, then the same command: the same weights and
    metrics as an uninterrupted run, whether the resumed run reads the cache
    file or computes the cache again."""
    recipe = tmp_path / "r.toml"
    recipe.write_text(RESUME_RECIPE)
    env = plugin_env(make_gate_plugin(tmp_path / "site"), OMP_NUM_THREADS="1")
    ref, out = tmp_path / "ref", tmp_path / "out"
    args = ["run", str(recipe), "--out", str(out), "-q"]
    assert run(["run", str(recipe), "--out", str(ref), "-q"], env).returncode == 0
    kill_hard(gated(args, env, "loss:5", tmp_path / "mark"))  # kd, epoch 2, batch 2
    files = list((out / "teacher").glob("teacher-cache-*.safetensors"))
    assert len(files) == 1 and (out / "kd" / "checkpoint.safetensors").exists()
    if not keep_file:
        files[0].unlink()
    proc = run(args, env)
    assert proc.returncode == 0, proc.stderr
    assert_same_weights(out, ref, ["teacher", "kd"])
    assert metrics_lines(out, "kd") == metrics_lines(ref, "kd")


def test_channels_last_trains_the_same_model(probes, tmp_path):
    text = TINY_CLASSIC.replace(
        '{ name = "hinton_kd", weight = 0.5 }', '{ name = "hinton_kd", weight = 0.5 }, { name = "layout_probe" }'
    )
    recipe = tmp_path / "r.toml"
    recipe.write_text("channels_last = false\n" + text)
    assert _run(recipe, tmp_path / "plain") == 0
    assert _SEEN and all(layout == (False, False, False) for _, layout in _SEEN)
    _SEEN.clear()
    recipe.write_text("channels_last = true\n" + text)
    assert _run(recipe, tmp_path / "cl") == 0
    assert _SEEN and all(layout == (True, True, True) for _, layout in _SEEN)  # batch, student, teacher
    resolved = tomllib.loads((tmp_path / "cl" / "recipe.resolved.toml").read_text())
    assert resolved["channels_last"] is True
    # the default, "auto": channels-last for these convolutional networks, the same arithmetic as true
    _SEEN.clear()
    recipe.write_text(text)
    assert _run(recipe, tmp_path / "auto") == 0
    assert _SEEN and all(layout == (True, True, True) for _, layout in _SEEN)
    assert tomllib.loads((tmp_path / "auto" / "recipe.resolved.toml").read_text())["channels_last"] == "auto"
    for stage in ("teacher", "kd"):
        a, b = _weights(tmp_path / "cl", stage), _weights(tmp_path / "auto", stage)
        assert all(torch.equal(a[k], b[k]) for k in a), stage
    for stage in ("teacher", "kd"):
        a, b = _weights(tmp_path / "plain", stage), _weights(tmp_path / "cl", stage)
        for k in a:
            torch.testing.assert_close(b[k], a[k], atol=1e-4, rtol=1e-3, msg=f"{stage}: {k}")


def test_channels_last_auto_is_for_models_with_convolutions():
    from kdtoolkit.engine.context import RunContext

    def ctx(value):
        return RunContext(
            device=torch.device("cpu"), precision="fp32", channels_last=value, dist=None, progress=None, plugins=None
        )

    conv, mlp = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU()), torch.nn.Linear(8, 2)
    assert ctx("auto").channels_last_for(conv) and not ctx("auto").channels_last_for(mlp)
    assert ctx(True).channels_last_for(mlp) and not ctx(False).channels_last_for(conv)
    placed = ctx("auto").place(conv)
    assert placed[0].weight.is_contiguous(memory_format=torch.channels_last)
