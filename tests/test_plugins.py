"""Plugins: discovery through the ``kdt`` entry-point group, failures, blocking.

Part (a) builds a throwaway plugin *package* in a temporary folder — a module
plus a ``*.dist-info`` folder declaring the ``kdt`` entry point — and puts it on
``PYTHONPATH``, exactly how an installed third-party plugin is found; real
``kdt`` subprocesses then list it and train with its loss.

Part (b) drives :class:`kdtoolkit.plugins.PluginManager` in-process: duplicate
names, broken imports, hook typos, ``KDT_BLOCK_PLUGINS``,
``KDT_DISABLE_PLUGIN_AUTOLOAD``, suggestions and hooks that raise.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import tomllib
import types
from pathlib import Path

import pytest

from kdtoolkit.errors import PluginError, RecipeError
from kdtoolkit.hookspecs import hookimpl
from kdtoolkit.plugins import AUTOLOAD_ENV, BLOCK_ENV, PluginManager

REPO = Path(__file__).resolve().parents[1]
BUILTIN_BUNDLES = ("timm", "classic", "data", "proto2proto")

PLUGIN_MODULE = "kdt_throwaway_plugin"
PLUGIN_SOURCE = '''
"""A throwaway kdt plugin: one loss and two observer hooks."""

import json
import os

from kdtoolkit.hookspecs import hookimpl


class LogitL2:
    """Mean squared logit, times ``scale`` (a toy regulariser)."""

    requires_teacher = False
    requires_outputs = ("logits",)

    def __init__(self, *, scale: float = 1.0):
        self.scale = scale

    def __call__(self, step):
        return self.scale * step.outputs["logits"].pow(2).mean()


def _log(**event):
    path = os.environ.get("KDT_THROWAWAY_LOG")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(event, default=str) + "\\n")


@hookimpl
def kdt_register_losses(registry):
    registry.add("logit_l2", LogitL2)


@hookimpl
def kdt_after_epoch(stage, phase, epoch, metrics):
    _log(hook="kdt_after_epoch", stage=stage, phase=phase, epoch=epoch, metrics=metrics)


@hookimpl
def kdt_after_run(run_dir):
    _log(hook="kdt_after_run", run_dir=str(run_dir))
'''


def make_dist(root: Path, dist: str, version: str, entry_points: dict[str, str], modules: dict[str, str]) -> Path:
    """An "installed" distribution under ``root``: modules plus a dist-info folder."""
    root.mkdir(parents=True, exist_ok=True)
    for name, src in modules.items():
        (root / f"{name}.py").write_text(textwrap.dedent(src))
    info = root / f"{dist}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
    eps = "".join(f"{k} = {v}\n" for k, v in entry_points.items())
    (info / "entry_points.txt").write_text(f"[kdt]\n{eps}")
    return root


@pytest.fixture(scope="module")
def throwaway_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("site") / "throwaway"
    return make_dist(root, PLUGIN_MODULE, "0.1", {"throwaway": PLUGIN_MODULE}, {PLUGIN_MODULE: PLUGIN_SOURCE})


@pytest.fixture(scope="module")
def broken_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("site") / "broken"
    src = 'raise RuntimeError("kaboom: this plugin cannot be imported")\n'
    return make_dist(root, "kdt_broken_plugin", "0.3", {"broken": "kdt_broken_plugin"}, {"kdt_broken_plugin": src})


def subprocess_env(*paths: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in (AUTOLOAD_ENV, BLOCK_ENV)}
    env["PYTHONPATH"] = os.pathsep.join([*(str(p) for p in paths), *filter(None, [env.get("PYTHONPATH")])])
    env["PYTHONWARNINGS"] = "ignore"
    env.update(extra)
    return env


def kdt(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "kdtoolkit", *args], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=300)
    assert "Traceback" not in proc.stdout + proc.stderr, proc.stderr
    return proc


@pytest.fixture
def on_path(monkeypatch):
    """Put plugin folders on sys.path for in-process discovery; forget their modules after."""
    added: list[Path] = []

    def add(path: Path) -> None:
        monkeypatch.syspath_prepend(str(path))
        added.append(path)

    monkeypatch.delenv(AUTOLOAD_ENV, raising=False)
    monkeypatch.delenv(BLOCK_ENV, raising=False)
    yield add
    for name in (PLUGIN_MODULE, "kdt_broken_plugin"):
        sys.modules.pop(name, None)


# --------------------------------------------------------------------------- (a) a real plugin package


def test_plugins_json_lists_throwaway_plugin(throwaway_dir, tmp_path):
    proc = kdt(["plugins", "--json"], subprocess_env(throwaway_dir), tmp_path)
    assert proc.returncode == 0, proc.stderr
    infos = {i["name"]: i for i in json.loads(proc.stdout)}
    mine = infos["throwaway"]
    assert mine["status"] == "loaded", mine
    assert mine["error"] is None
    assert mine["version"] == "0.1"
    assert mine["distribution"] == PLUGIN_MODULE
    assert mine["module"] == PLUGIN_MODULE
    assert mine["components"] == {"loss": ["logit_l2"]}
    assert {"kdt_register_losses", "kdt_after_epoch", "kdt_after_run"} <= set(mine["hooks"])
    # the built-in bundles are discovered the same way and are unaffected
    for name in BUILTIN_BUNDLES:
        assert infos[name]["status"] == "loaded", infos[name]
        assert infos[name]["distribution"] == "kdtoolkit"
    assert "cross_entropy" in infos["classic"]["components"]["loss"]


def test_plugins_table_shows_throwaway_plugin(throwaway_dir, tmp_path):
    proc = kdt(["plugins"], subprocess_env(throwaway_dir), tmp_path)
    assert proc.returncode == 0, proc.stderr
    rows = [line for line in proc.stdout.splitlines() if "throwaway" in line]
    assert rows, proc.stdout
    row = rows[0]
    for text in ("0.1", "loaded", "losses: logit_l2", "kdt_after_epoch"):
        assert text in row, (text, row)


def test_run_with_throwaway_loss(throwaway_dir, tmp_path):
    recipe = tmp_path / "l2.toml"
    recipe.write_text(textwrap.dedent("""
        name = "l2"
        device = "cpu"

        [data]
        dataset = "digits"
        image_size = 16
        batch_size = 32

        [stages.s]
        model.backbone = { name = "timm", model = "resnet10t", out_index = 2 }
        model.head = { name = "linear" }
        losses = [{ name = "cross_entropy" }, { name = "logit_l2", weight = 0.1, scale = 2.0 }]

        [[stages.s.phases]]
        name = "train"
        epochs = 1
        limit_batches = 2
        groups = [{ params = ["backbone", "head"], lr = 1e-3 }]
    """))
    out = tmp_path / "run"
    log = tmp_path / "hooks.jsonl"
    proc = kdt(["run", str(recipe), "--out", str(out), "-q"], subprocess_env(throwaway_dir, KDT_THROWAWAY_LOG=str(log)),
               tmp_path)
    assert proc.returncode == 0, proc.stderr

    results = json.loads((out / "results.json").read_text())
    stage = results["stages"]["s"]
    assert 0.0 <= stage["accuracy"] <= 1.0
    assert stage["losses"] == {"cross_entropy": 1.0, "logit_l2": 0.1}

    resolved = tomllib.loads((out / "recipe.resolved.toml").read_text())
    l2 = next(loss for loss in resolved["stages"]["s"]["losses"] if loss["name"] == "logit_l2")
    assert l2 == {"name": "logit_l2", "id": "logit_l2", "weight": 0.1, "scale": 2.0}

    # the loss really took part in training
    epochs = [json.loads(line) for line in (out / "s" / "metrics.jsonl").read_text().splitlines()]
    assert epochs and all(e.get("loss/logit_l2", -1.0) >= 0.0 for e in epochs), epochs

    # the plugin's observer hooks were called with the documented arguments
    events = [json.loads(line) for line in log.read_text().splitlines()]
    after_epoch = [e for e in events if e["hook"] == "kdt_after_epoch"]
    assert [(e["stage"], e["phase"], e["epoch"]) for e in after_epoch] == [("s", "train", 1)]
    assert "loss/logit_l2" in after_epoch[0]["metrics"]
    assert [Path(e["run_dir"]).resolve() for e in events if e["hook"] == "kdt_after_run"] == [out.resolve()]


# --------------------------------------------------------------------------- (b) the plugin manager in-process


class _Loss:
    """A do-nothing loss for registration tests."""

    requires_teacher = False
    requires_outputs = ("logits",)

    def __init__(self, *, scale: float = 1.0):
        self.scale = scale


def plugin(name: str, **hooks) -> types.ModuleType:
    """A plugin object: a module whose attributes are the given functions."""
    mod = types.ModuleType(name)
    for hook, fn in hooks.items():
        setattr(mod, hook, fn)
    return mod


def test_duplicate_component_names_both_owners():
    @hookimpl
    def kdt_register_backbones(registry):
        registry.add("dup_backbone", _Loss)

    @hookimpl
    def kdt_register_losses(registry):
        registry.add("dup_ok", _Loss)
        registry.add("cross_entropy", _Loss)  # already the classic bundle's

    pm = PluginManager(extra=[(plugin("kdt_dup", kdt_register_backbones=kdt_register_backbones,
                                      kdt_register_losses=kdt_register_losses), "dup")])
    info = pm.infos["dup"]
    assert info.status == "failed"
    assert "loss 'cross_entropy' is registered twice" in info.error
    assert "plugin 'classic'" in info.error and "plugin 'dup'" in info.error
    assert info in pm.failed()
    # the first owner keeps its name and stays loaded
    assert pm.infos["classic"].status == "loaded"
    assert pm.registry("loss").get("cross_entropy").owner == "classic"
    assert "hinton_kd" in pm.registry("loss")
    # a failed plugin contributes nothing, not even what it registered before failing
    assert "dup_ok" not in pm.registry("loss")
    assert "dup_backbone" not in pm.registry("backbone")
    assert info.components == {}


def test_plugin_name_clash_does_not_disable_the_first():
    @hookimpl
    def kdt_register_losses(registry):
        registry.add("impostor", _Loss)

    pm = PluginManager(extra=[(plugin("kdt_impostor", kdt_register_losses=kdt_register_losses), "classic")])
    assert pm.infos["classic"].status == "loaded"
    assert "cross_entropy" in pm.registry("loss")
    assert "impostor" not in pm.registry("loss")
    clash = [i for i in pm.failed() if i.module == "kdt_impostor"]
    assert len(clash) == 1 and "already registered" in clash[0].error


def test_broken_plugin_import_is_reported_not_fatal(broken_dir, on_path):
    on_path(broken_dir)
    pm = PluginManager()
    info = pm.infos["broken"]
    assert info.status == "failed"
    assert "RuntimeError" in info.error and "kaboom" in info.error
    assert info.version == "0.3"
    assert info in pm.failed()
    for name in BUILTIN_BUNDLES:
        assert pm.infos[name].status == "loaded"
    assert "cross_entropy" in pm.registry("loss")


def test_broken_plugin_does_not_break_other_commands(broken_dir, tmp_path):
    proc = kdt(["validate", str(REPO / "recipes" / "classic_kd.toml")], subprocess_env(broken_dir), tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "valid; stages in order: teacher, student, kd" in proc.stdout
    assert proc.stderr == ""


@pytest.mark.parametrize("decorated", [True, False], ids=["hookimpl", "plain_function"])
def test_hook_name_typo_is_refused(decorated):
    def kdt_register_losss(registry):  # noqa: typo on purpose
        registry.add("typo_loss", _Loss)

    fn = hookimpl(kdt_register_losss) if decorated else kdt_register_losss
    pm = PluginManager(autoload=False, extra=[(plugin("kdt_typo", kdt_register_losss=fn), "typo")])
    info = pm.infos["typo"]
    assert info.status == "failed"
    assert "kdt_register_losss" in info.error
    assert "unknown hook" in info.error
    assert "typo_loss" not in pm.registry("loss")


def test_hook_typo_refused_after_another_plugin_made_the_same_typo():
    """pluggy remembers every hook name it has seen; the second typo must still be refused."""

    @hookimpl
    def kdt_register_losss(registry):
        pass

    def kdt_register_losss_plain(registry):
        pass

    first = plugin("kdt_typo1", kdt_register_losss=kdt_register_losss)
    second = plugin("kdt_typo2", kdt_register_losss=kdt_register_losss_plain)
    pm = PluginManager(autoload=False, extra=[(first, "typo1"), (second, "typo2")])
    assert pm.infos["typo1"].status == "failed"
    assert pm.infos["typo2"].status == "failed"
    assert "kdt_register_losss" in pm.infos["typo2"].error


def test_throwaway_discovered_in_process(throwaway_dir, on_path):
    on_path(throwaway_dir)
    pm = PluginManager()
    info = pm.infos["throwaway"]
    assert info.status == "loaded", info.error
    assert info.version == "0.1"
    assert info.components == {"loss": ["logit_l2"]}
    comp = pm.registry("loss").get("logit_l2")
    assert comp.owner == "throwaway"
    assert set(comp.params) == {"scale"} and comp.params["scale"].default == 1.0


def test_block_plugins_env(throwaway_dir, on_path, monkeypatch):
    on_path(throwaway_dir)
    monkeypatch.setenv(BLOCK_ENV, "nosuchplugin, throwaway")
    pm = PluginManager()
    info = pm.infos["throwaway"]
    assert info.status == "blocked"
    assert "logit_l2" not in pm.registry("loss")
    assert PLUGIN_MODULE not in sys.modules  # never imported
    for name in BUILTIN_BUNDLES:
        assert pm.infos[name].status == "loaded"


def test_block_plugins_env_can_block_a_builtin_bundle(on_path, monkeypatch):
    monkeypatch.setenv(BLOCK_ENV, "classic")
    pm = PluginManager()
    assert pm.infos["classic"].status == "blocked"
    assert "hinton_kd" not in pm.registry("loss")
    assert pm.infos["timm"].status == "loaded"


def test_disable_autoload_keeps_builtin_bundles(throwaway_dir, on_path, monkeypatch):
    on_path(throwaway_dir)
    monkeypatch.setenv(AUTOLOAD_ENV, "1")
    pm = PluginManager()
    assert pm.infos["throwaway"].status == "disabled"
    assert "logit_l2" not in pm.registry("loss")
    assert PLUGIN_MODULE not in sys.modules
    for name in BUILTIN_BUNDLES:
        assert pm.infos[name].status == "loaded", pm.infos[name]
    assert "timm" in pm.registry("backbone")
    assert "linear" in pm.registry("head")
    assert "digits" in pm.registry("dataset")
    assert "push" in pm.registry("phase")


@pytest.mark.parametrize("value", ["0", "", "false"])
def test_autoload_env_falsy_values_keep_autoload(throwaway_dir, on_path, monkeypatch, value):
    on_path(throwaway_dir)
    monkeypatch.setenv(AUTOLOAD_ENV, value)
    assert PluginManager().infos["throwaway"].status == "loaded"


def test_autoload_false_loads_only_the_core():
    pm = PluginManager(autoload=False)
    assert list(pm.infos) == ["kdt.core"]
    assert pm.registry("metric").names() == ["accuracy", "agreement"]
    assert len(pm.registry("loss")) == 0


def test_unknown_name_suggests_closest():
    @hookimpl
    def kdt_register_losses(registry):
        registry.add("logit_l2", _Loss)

    pm = PluginManager(extra=[(plugin("kdt_l2", kdt_register_losses=kdt_register_losses), "l2")])
    with pytest.raises(RecipeError) as exc:
        pm.registry("loss").get("logit_l3", source="r.toml", key="stages.s.losses[0].name")
    msg = str(exc.value)
    assert msg.startswith("r.toml: stages.s.losses[0].name: unknown loss 'logit_l3'")
    assert "(did you mean 'logit_l2'?)" in msg
    assert "registered: " in msg and "cross_entropy" in msg and "logit_l2" in msg

    with pytest.raises(RecipeError, match=r"unknown backbone 'resnet' \(did you mean 'timm'\?\)|unknown backbone 'resnet'; registered: timm"):
        pm.registry("backbone").get("resnet")
    with pytest.raises(RecipeError, match=r"\(did you mean 'image_folder'\?\); registered: cub200, digits, image_folder, stanford_cars"):
        pm.registry("dataset").get("imagefolder")


def test_hook_raising_is_reported_by_plugin_name():
    seen = []

    @hookimpl
    def kdt_after_epoch(stage, phase, epoch, metrics):
        raise RuntimeError("boom")

    @hookimpl
    def kdt_after_epoch_ok(stage, epoch):  # accepts fewer arguments than the spec
        seen.append((stage, epoch))

    ok = plugin("kdt_ok", kdt_after_epoch=kdt_after_epoch_ok)
    raiser = plugin("kdt_raiser", kdt_after_epoch=kdt_after_epoch)
    pm = PluginManager(autoload=False, extra=[(raiser, "raiser"), (ok, "ok")])
    assert pm.infos["raiser"].status == "loaded"
    assert pm.infos["raiser"].hooks == ["kdt_after_epoch"]
    with pytest.raises(PluginError) as exc:
        pm.call("kdt_after_epoch", stage="s", phase="train", epoch=0, metrics={"loss/total": 1.0})
    assert str(exc.value).startswith("plugin 'raiser' failed in kdt_after_epoch: RuntimeError: boom")
    assert exc.value.exit_code == 2
    assert isinstance(exc.value.__cause__, RuntimeError)

    pm_ok = PluginManager(autoload=False, extra=[(ok, "ok")])
    assert pm_ok.call("kdt_after_epoch", stage="s", phase="train", epoch=3, metrics={}) == []
    assert seen[-1] == ("s", 3)


def test_registration_hook_raising_marks_plugin_failed():
    @hookimpl
    def kdt_register_heads(registry):
        raise ValueError("no heads today")

    pm = PluginManager(autoload=False, extra=[(plugin("kdt_bad_heads", kdt_register_heads=kdt_register_heads), "bad")])
    info = pm.infos["bad"]
    assert info.status == "failed"
    assert info.error == "kdt_register_heads raised ValueError: no heads today"


def test_untyped_component_parameter_is_refused():
    class Untyped:
        def __init__(self, *, scale=1.0):
            pass

    @hookimpl
    def kdt_register_losses(registry):
        registry.add("untyped", Untyped)

    pm = PluginManager(autoload=False, extra=[(plugin("kdt_untyped", kdt_register_losses=kdt_register_losses), "untyped")])
    info = pm.infos["untyped"]
    assert info.status == "failed"
    assert "loss 'untyped'" in info.error and "'scale' has no type annotation" in info.error
    assert "untyped" not in pm.registry("loss")
