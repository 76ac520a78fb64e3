"""Hostile plugins cannot take the CLI down (issue 29, defects 6-8).

Each test is written as the hostile plugin:

- a plugin that calls ``sys.exit(3)`` (and prints) while it is imported is
  marked failed; ``kdt plugins`` (``--json`` too) and ``kdt validate`` keep
  working;
- ``SystemExit`` or ``GeneratorExit`` raised in a registration hook, in an
  observer hook, in ``kdt_add_commands`` or by a module ``__getattr__`` marks
  the plugin failed or is one line naming it, never a silent end;
- a third-party entry point named like a built-in bundle (``classic``), and a
  third-party component named like a built-in one (even with ``trylast``),
  are refused; the built-in is kept;
- a factory that raises (loss, backbone, head, metric, dataset, phase) is one
  line naming the plugin, the component and its recipe key, raised by the
  preflight's dry build before any stage trains; a factory that raises only at
  the real build is one line too;
- the dry build changes no trained number.

The plugins installed for subprocesses are a module plus a ``*.dist-info``
folder on ``PYTHONPATH`` (how an installed third-party plugin is found; put
first on the path, so that ``importlib.metadata`` lists them before
kdtoolkit's own bundles); the other tests register plugin modules in-process.
"""

from __future__ import annotations

import json
import random
import sys
import textwrap
import types
from pathlib import Path
from typing import Any
from collections.abc import Callable

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from kdt_faultutil import one_line_error, plugin_env, run
from kdtoolkit.foundation.errors import PluginError
from kdtoolkit.plugin.hookspecs import hookimpl
from kdtoolkit.plugin.manager import PluginManager
from kdtoolkit.testing import run_recipe

BUILTIN_BUNDLES = ("timm", "classic", "data", "protopnet", "prototree", "proto2proto")


def make_dist(root: Path, dist: str, entry_points: dict[str, str], modules: dict[str, str]) -> Path:
    """An "installed" distribution ``dist`` 0.1 under ``root``: modules plus a dist-info folder."""
    root.mkdir(parents=True, exist_ok=True)
    for name, src in modules.items():
        (root / f"{name}.py").write_text(textwrap.dedent(src))
    info = root / f"{dist.replace('-', '_')}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1\n")
    eps = "".join(f"{k} = {v}\n" for k, v in entry_points.items())
    (info / "entry_points.txt").write_text(f"[kdt]\n{eps}")
    return root


def plugins_json(env: dict[str, str]) -> dict[str, dict]:
    """``kdt plugins --json`` by plugin name; a refused plugin of a taken name as ``"name (distribution)"``."""
    proc = run(["plugins", "--json"], env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    infos: dict[str, dict] = {}
    for info in json.loads(proc.stdout):  # stdout is pure JSON
        key = info["name"] if info["name"] not in infos else f"{info['name']} ({info['distribution']})"
        assert key not in infos, key
        infos[key] = info
    return infos


def assert_builtins_loaded(infos: dict[str, dict]) -> None:
    for name in BUILTIN_BUNDLES:
        assert infos[name]["status"] == "loaded", infos[name]
        assert infos[name]["distribution"] == "kdtoolkit", infos[name]
    assert {"cross_entropy", "hinton_kd"} <= set(infos["classic"]["components"]["loss"])
    assert "linear" in infos["classic"]["components"]["head"]


# --------------------------------------------------------------------------- defect 6: sys.exit


EXITING = """
import sys
print("a plugin talking on stdout while it is imported")
sys.exit(3)
"""

EXIT_IN_COMMANDS = """
import sys
from kdtoolkit.plugin.hookspecs import hookimpl


@hookimpl
def kdt_add_commands(cli):
    print("a plugin talking on stdout while commands are added")
    sys.exit(5)
"""


@pytest.fixture(scope="module")
def exiting_site(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("site") / "exiting"
    make_dist(root, "kdt-exiting", {"exiting": "kdt_exiting_plugin"}, {"kdt_exiting_plugin": EXITING})
    return make_dist(
        root,
        "kdt-exit-commands",
        {"exit_commands": "kdt_exit_commands_plugin"},
        {"kdt_exit_commands_plugin": EXIT_IN_COMMANDS},
    )


def test_sys_exit_at_import_marks_the_plugin_failed_and_kdt_plugins_works(exiting_site):
    env = plugin_env(exiting_site)
    infos = plugins_json(env)
    bad = infos["exiting"]
    assert bad["status"] == "failed", bad
    assert bad["error"] == "called sys.exit(3) while being imported"
    assert bad["distribution"] == "kdt-exiting"
    cmd = infos["exit_commands"]
    assert cmd["status"] == "loaded" and cmd["hooks"] == ["kdt_add_commands"], cmd  # its hook fails when called
    assert_builtins_loaded(infos)

    table = run(["plugins"], env, timeout=120)
    assert table.returncode == 0, table.stderr
    row = next(line for line in table.stdout.splitlines() if line.startswith("| exiting "))
    assert "failed" in row and "sys.exit(3)" in row, row
    # the plugin's print and the failing kdt_add_commands went to stderr, on one line each
    assert "a plugin talking on stdout while it is imported" in table.stderr
    assert "a plugin talking on stdout while commands are added" in table.stderr
    assert "a plugin talking" not in table.stdout
    assert "kdt: error: plugin 'exit_commands' failed in kdt_add_commands: called sys.exit(5)" in table.stderr


def test_sys_exit_at_import_leaves_validate_working(exiting_site):
    proc = run(["validate", "recipes/classic_kd.toml"], plugin_env(exiting_site), timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "recipes/classic_kd.toml: valid" in proc.stdout


def _module(name: str, **attrs: Any) -> types.ModuleType:
    mod = types.ModuleType(name)
    for key, value in attrs.items():
        setattr(mod, key, value)
    return mod


def test_system_exit_and_generator_exit_in_registration_hooks_fail_only_that_plugin():
    @hookimpl
    def kdt_register_losses(registry):
        registry.add("exit_loss", _RaisingLoss)
        sys.exit(4)

    @hookimpl
    def kdt_register_heads(registry):
        raise GeneratorExit

    class Haunted(types.ModuleType):
        def __dir__(self):
            return ["kdt_register_losses"]

        def __getattr__(self, name):  # pluggy and the hook checks read the attributes dir() lists
            if name.startswith("__"):
                raise AttributeError(name)
            raise SystemExit(6)

    pm = PluginManager(
        extra=[
            (_module("kdt_exit_hook", kdt_register_losses=kdt_register_losses), "exit_hook"),
            (_module("kdt_genexit", kdt_register_heads=kdt_register_heads), "genexit"),
            (Haunted("kdt_haunted"), "haunted"),
        ]
    )
    assert pm.infos["exit_hook"].status == "failed"
    assert pm.infos["exit_hook"].error == "kdt_register_losses called sys.exit(4)"
    assert "exit_loss" not in pm.registry("loss")  # a failed plugin contributes nothing
    assert pm.infos["genexit"].status == "failed"
    assert pm.infos["genexit"].error == "kdt_register_heads raised GeneratorExit"
    assert pm.infos["haunted"].status == "failed"
    assert pm.infos["haunted"].error == "called sys.exit(6) while being registered"
    assert pm.infos["classic"].status == "loaded" and "cross_entropy" in pm.registry("loss")


def test_system_exit_in_an_observer_hook_is_one_line_naming_the_plugin(kdt_plugin, tmp_path, capsys):
    @hookimpl
    def kdt_after_stage(stage):
        sys.exit(3)

    from kdtoolkit.cli.commands import main

    pm = kdt_plugin(
        _module(
            "kdt_exit_observer",
            kdt_after_stage=kdt_after_stage,
            kdt_register_backbones=hookimpl(lambda registry: registry.add("tiny", _Tiny)),
        ),
        "exit_observer",
    )
    with pytest.raises(PluginError, match=r"^plugin 'exit_observer' failed in kdt_after_stage: called sys.exit\(3\)$"):
        pm.call("kdt_after_stage", stage="s", result={}, stage_dir=tmp_path)
    recipe = tmp_path / "r.toml"
    recipe.write_text(DATA + _stage("s", 'losses = [{ name = "cross_entropy" }]'))
    capsys.readouterr()
    assert main(["run", str(recipe), "--out", str(tmp_path / "run"), "-q"]) == 2  # returns: the process goes on
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["kdt: error: plugin 'exit_observer' failed in kdt_after_stage: called sys.exit(3)"], err
    assert (tmp_path / "run" / "s" / "result.json").exists()  # the stage is kept


def test_a_full_disk_in_an_observer_hook_is_the_resource_error_line(kdt_plugin, tmp_path, capsys):
    import errno
    import os

    @hookimpl
    def kdt_after_stage(stage, stage_dir):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(stage_dir / "gallery.png"))

    from kdtoolkit.cli.commands import main

    kdt_plugin(
        _module(
            "kdt_full_observer",
            kdt_after_stage=kdt_after_stage,
            kdt_register_backbones=hookimpl(lambda registry: registry.add("tiny", _Tiny)),
        ),
        "full_observer",
    )
    recipe = tmp_path / "r.toml"
    recipe.write_text(DATA + _stage("s", 'losses = [{ name = "cross_entropy" }]'))
    capsys.readouterr()
    assert main(["run", str(recipe), "--out", str(tmp_path / "run"), "-q"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith(
        f"kdt: error: {tmp_path / 'run' / 's' / 'gallery.png'}: no space left on device; nothing finished was lost"
    ), err
    assert (tmp_path / "run" / "s" / "result.json").exists()


# --------------------------------------------------------------------------- defect 7: name clashes


NAMED_CLASSIC = '''
"""A third-party plugin whose entry point is named like the built-in bundle."""

from kdtoolkit.plugin.hookspecs import hookimpl


class Other:
    """Another loss."""

    requires_teacher = False

    def __call__(self, step):
        return step.outputs["logits"].sum() * 0.0


@hookimpl
def kdt_register_losses(registry):
    registry.add("impostor_loss", Other)
'''

CLASHING = '''
"""A third-party plugin registering a loss named like a built-in one, asking to go first."""

from kdtoolkit.plugin.hookspecs import hookimpl


class Other:
    """Another cross entropy."""

    requires_teacher = False

    def __call__(self, step):
        return step.outputs["logits"].sum() * 0.0


@hookimpl(trylast=True)
def kdt_register_losses(registry):
    registry.add("clash_ok", Other)
    registry.add("cross_entropy", Other)
'''


@pytest.fixture(scope="module")
def clash_site(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("site") / "clash"
    make_dist(root, "kdt-impostor", {"classic": "kdt_impostor_plugin"}, {"kdt_impostor_plugin": NAMED_CLASSIC})
    return make_dist(root, "kdt-clashing", {"clashing": "kdt_clashing_plugin"}, {"kdt_clashing_plugin": CLASHING})


def test_entry_point_named_like_a_builtin_bundle_is_refused(clash_site):
    infos = plugins_json(plugin_env(clash_site))
    assert_builtins_loaded(infos)  # "classic" is still the built-in bundle
    assert infos["classic"]["module"] == "kdt_classic.plugin"
    newcomer = infos["classic (kdt-impostor)"]
    assert newcomer["status"] == "failed" and newcomer["module"] == "kdt_impostor_plugin", newcomer
    assert newcomer["distribution"] == "kdt-impostor"
    for text in (
        "plugin name 'classic' is already taken by the built-in bundle kdt_classic.plugin",
        "distribution kdtoolkit",
        "distribution kdt-impostor",
        "refused",
    ):
        assert text in newcomer["error"], (text, newcomer["error"])
    assert newcomer["hooks"] == [] and newcomer["components"] == {}  # refused before it was imported
    assert "impostor_loss" not in json.dumps(infos)


def test_component_named_like_a_builtin_one_is_refused(clash_site):
    infos = plugins_json(plugin_env(clash_site))
    bad = infos["clashing"]
    assert bad["status"] == "failed", bad
    assert (
        "loss 'cross_entropy' is registered twice: by plugin 'classic' and by plugin 'clashing' "
        "(the first keeps the name)"
    ) in bad["error"]
    assert bad["components"] == {}  # its other loss is dropped too
    assert_builtins_loaded(infos)


def test_validate_uses_the_builtin_head_and_loss_despite_the_clashes(clash_site):
    proc = run(["validate", "recipes/classic_kd.toml"], plugin_env(clash_site), timeout=120)
    assert proc.returncode == 0, proc.stderr  # head 'linear', loss 'cross_entropy' of the built-in bundle
    assert "recipes/classic_kd.toml: valid" in proc.stdout


def test_component_clash_between_two_third_party_plugins_keeps_the_first():
    @hookimpl
    def first(registry):
        registry.add("shared_loss", _RaisingLoss)

    @hookimpl
    def second(registry):
        registry.add("shared_loss", _RaisingLoss)

    pm = PluginManager(
        autoload=False,
        extra=[
            (_module("kdt_first", kdt_register_losses=first), "first"),
            (_module("kdt_second", kdt_register_losses=second), "second"),
        ],
    )
    assert pm.registry("loss").get("shared_loss").owner == "first"
    assert pm.infos["first"].status == "loaded"
    assert pm.infos["second"].status == "failed"
    assert "by plugin 'first' and by plugin 'second'" in pm.infos["second"].error


# --------------------------------------------------------------------------- defect 8: factories that raise


class _RaisingLoss:
    """A loss whose factory raises."""

    requires_teacher = False
    requires_outputs = ("logits",)

    def __init__(self, *, scale: float = 1.0):
        raise RuntimeError("kaboom in the loss factory")


class _Tiny(nn.Module):
    """A BN-free 3x3 convolution of stride 4 (fast, repeatable)."""

    def __init__(self, *, channels: int = 4):
        super().__init__()
        self.conv = nn.Conv2d(3, channels, 3, 4, 1)
        self.out_channels = channels

    def forward(self, x):
        return torch.relu(self.conv(x))


def _raising(kind: str) -> Callable[..., Any]:
    """A factory of component ``kind`` that raises, with the signature the core calls it with."""

    def fail():
        raise ValueError(f"kaboom in the {kind} factory")

    def plain(*, scale: float = 1.0):
        """A factory that raises."""
        fail()

    def head(in_channels, num_classes, *, scale: float = 1.0):
        """A head factory that raises."""
        fail()

    def dataset(split, augment, *, scale: float = 1.0):
        """A dataset factory that raises."""
        fail()

    return {"head": head, "dataset": dataset}.get(kind, plain)


DATA = """
name = "hostile"
device = "cpu"
seed = 1

[data]
dataset = "digits"
image_size = 16
batch_size = 32
eval_batch_size = 512
"""


def _stage(name: str, extra: str = "", backbone: str = "tiny", head: str = "linear") -> str:
    return f"""
[stages.{name}]
model.backbone = {{ name = "{backbone}" }}
model.head = {{ name = "{head}" }}
{extra}
[[stages.{name}.phases]]
epochs = 1
limit_batches = 2
groups = [{{ params = ["backbone", "head"], lr = 1e-2 }}]
"""


def _recipe(kd_extra: str, **kd) -> str:
    """A teacher stage, then stage ``kd`` (its losses and other keys from ``kd_extra``)."""
    return (
        DATA
        + _stage("s", 'losses = [{ name = "cross_entropy" }]')
        + _stage("kd", kd_extra or 'teacher = "s"\nlosses = [{ name = "cross_entropy" }]', **kd)
    )


def _hostile_module(kind: str | None) -> types.ModuleType:
    """The tiny backbone, and a raising component of ``kind`` named ``boom`` (or ``boom_<kind>``)."""
    hooks = {
        "kdt_register_backbones": hookimpl(
            lambda registry: (registry.add("tiny", _Tiny), kind == "backbone" and registry.add("boom", _raising(kind)))
        )
    }
    if kind is not None and kind != "backbone":
        from kdtoolkit.plugin.registry import HOOKS

        factory = _RaisingLoss if kind == "loss" else _raising(kind)
        hooks[HOOKS[kind]] = hookimpl(lambda registry: registry.add("boom", factory))
    return _module("kdt_hostile_factories", **hooks)


#: per kind: the stage ``kd`` using the raising component ``boom``, the recipe key named
KD_USING = {
    "loss": (
        'teacher = "s"\nlosses = [{ name = "cross_entropy" }, { name = "boom", weight = 0.5 }]',
        {},
        "stages.kd.losses[1]",
    ),
    "backbone": ('losses = [{ name = "cross_entropy" }]', {"backbone": "boom"}, "stages.kd.model.backbone"),
    "head": ('losses = [{ name = "cross_entropy" }]', {"head": "boom"}, "stages.kd.model.head"),
    "metric": (
        'losses = [{ name = "cross_entropy" }]\nmetrics = [{ name = "accuracy" }, { name = "boom" }]',
        {},
        "stages.kd.metrics[1]",
    ),
    "phase": (
        'losses = [{ name = "cross_entropy" }]\n[[stages.kd.phases]]\nname = "p"\nkind = "boom"\n',
        {},
        "stages.kd.phases[0]",
    ),
}


@pytest.mark.parametrize("kind", sorted(KD_USING))
def test_a_raising_factory_stops_the_run_in_preflight_naming_plugin_and_component(kdt_plugin, tmp_path, kind):
    kd_extra, kd, key = KD_USING[kind]
    kdt_plugin(_hostile_module(kind), "hostile")
    out = tmp_path / "run"
    with pytest.raises(PluginError) as info:
        run_recipe(_recipe(kd_extra, **kd), out=out)
    text = str(info.value)
    assert f"{key}: plugin 'hostile': {kind} 'boom': cannot be built: " in text, text
    assert f"kaboom in the {kind} factory" in text and "\n" not in text
    assert not (out / "s").exists()  # nothing trained, not even the stage before


def test_a_raising_dataset_factory_stops_the_run_in_preflight(kdt_plugin, tmp_path):
    kdt_plugin(_hostile_module("dataset"), "hostile")
    out = tmp_path / "run"
    with pytest.raises(
        PluginError,
        match=r"stages.s.data: plugin 'hostile': dataset 'boom': cannot be built: "
        r"ValueError: kaboom in the dataset factory",
    ):
        run_recipe(_recipe("").replace('dataset = "digits"\nimage_size = 16', 'dataset = "boom"'), out=out)
    assert not (out / "s").exists()


LOSS_PLUGIN = '''
"""A kdt plugin whose loss factory raises: always, or from its call number $KDT_BOOM_FROM on."""

import os

import torch
from torch import nn

from kdtoolkit.plugin.hookspecs import hookimpl

CALLS = [0]


class Tiny(nn.Module):
    """A BN-free 3x3 convolution of stride 4."""

    def __init__(self, *, channels: int = 4):
        super().__init__()
        self.conv = nn.Conv2d(3, channels, 3, 4, 1)
        self.out_channels = channels

    def forward(self, x):
        return torch.relu(self.conv(x))


class Boom:
    """A loss whose factory raises."""

    requires_teacher = False
    requires_outputs = ("logits",)

    def __init__(self, *, scale: float = 1.0):
        CALLS[0] += 1
        if CALLS[0] >= int(os.environ.get("KDT_BOOM_FROM", "1")):
            raise RuntimeError("kaboom in the loss factory")

    def __call__(self, step):
        return step.outputs["logits"].float().pow(2).mean()


@hookimpl
def kdt_register_backbones(registry):
    registry.add("tiny", Tiny)


@hookimpl
def kdt_register_losses(registry):
    registry.add("boom", Boom)
'''


@pytest.fixture(scope="module")
def boom_site(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("site") / "boom"
    return make_dist(root, "kdt-boomer", {"boomer": "kdt_boomer_plugin"}, {"kdt_boomer_plugin": LOSS_PLUGIN})


def test_kdt_run_with_a_raising_loss_factory_is_one_line_and_trains_nothing(boom_site, tmp_path):
    recipe = tmp_path / "boom.toml"
    recipe.write_text(_recipe('teacher = "s"\nlosses = [{ name = "cross_entropy" }, { name = "boom" }]'))
    out = tmp_path / "run"
    proc = run(["run", str(recipe), "--out", str(out), "-q"], plugin_env(boom_site), timeout=240)
    assert proc.returncode == 2, proc.stderr
    line = one_line_error(proc)
    assert line == (
        f"kdt: error: {recipe}: stages.kd.losses[1]: plugin 'boomer': loss 'boom': cannot be built: "
        "RuntimeError: kaboom in the loss factory"
    ), line
    assert not (out / "s" / "model.safetensors").exists()  # the teacher was not trained
    assert not (out / "s").exists()


def test_a_loss_factory_raising_only_at_the_real_build_is_one_line_too(boom_site, tmp_path):
    recipe = tmp_path / "boom.toml"
    recipe.write_text(_recipe('teacher = "s"\nlosses = [{ name = "cross_entropy" }, { name = "boom" }]'))
    out = tmp_path / "run"
    # call 1 is the dry build (passes); call 2, the stage's real build, raises
    proc = run(["run", str(recipe), "--out", str(out), "-q"], plugin_env(boom_site, KDT_BOOM_FROM="2"), timeout=240)
    assert proc.returncode == 2, proc.stderr
    line = one_line_error(proc)
    assert line == (
        f"kdt: error: {recipe}: stages.kd.losses[1]: plugin 'boomer': loss 'boom': cannot be built: "
        "RuntimeError: kaboom in the loss factory"
    ), line
    assert (out / "s" / "model.safetensors").exists()  # the stage before is kept
    assert not (out / "kd" / "model.safetensors").exists()


def test_sys_exit_in_a_factory_is_one_line(kdt_plugin, tmp_path):
    class Exiting(_RaisingLoss):
        def __init__(self, *, scale: float = 1.0):
            sys.exit(7)

    kdt_plugin(
        _module(
            "kdt_exit_factory",
            kdt_register_backbones=hookimpl(lambda registry: registry.add("tiny", _Tiny)),
            kdt_register_losses=hookimpl(lambda registry: registry.add("boom", Exiting)),
        ),
        "exit_factory",
    )
    with pytest.raises(
        PluginError, match=r"plugin 'exit_factory': loss 'boom': cannot be built: called sys.exit\(7\)$"
    ):
        run_recipe(_recipe('teacher = "s"\nlosses = [{ name = "boom" }]'), out=tmp_path / "run")


def test_a_resource_error_in_a_factory_keeps_its_own_line(kdt_plugin, tmp_path):
    """A factory that fills the disk (a dataset cache, a download) or runs out of memory is a resource
    error, not a broken plugin: it reaches the command line's resource-error line unchanged."""
    import errno
    import os

    class Full(_RaisingLoss):
        def __init__(self, *, scale: float = 1.0):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp_path / "cache.bin"))

    kdt_plugin(
        _module(
            "kdt_full_factory",
            kdt_register_backbones=hookimpl(lambda registry: registry.add("tiny", _Tiny)),
            kdt_register_losses=hookimpl(lambda registry: registry.add("full", Full)),
        ),
        "full_factory",
    )
    with pytest.raises(OSError) as info:
        run_recipe(_recipe('teacher = "s"\nlosses = [{ name = "full" }]'), out=tmp_path / "run")
    assert info.value.errno == errno.ENOSPC and not isinstance(info.value, PluginError)


# --------------------------------------------------------------------------- the dry build changes no number


class _Drawing(nn.Module):
    """A loss that draws from every global generator when built and scales itself by a draw of
    Python's ``random`` at every step: weights depend on every draw made before."""

    requires_teacher = False
    requires_outputs = ("logits",)

    def __init__(self, *, scale: float = 1.0):
        super().__init__()
        self.scale = scale * (1.0 + random.random() + float(torch.rand(())))
        import numpy

        numpy.random.random()

    def forward(self, step):
        return self.scale * random.random() * step.outputs["logits"].float().pow(2).mean()


def test_the_dry_build_leaves_every_random_stream_as_it_was(kdt_plugin, tmp_path, monkeypatch):
    from kdtoolkit.engine.preflight import Preflight

    kdt_plugin(
        _module(
            "kdt_drawing",
            kdt_register_backbones=hookimpl(lambda registry: registry.add("tiny", _Tiny)),
            kdt_register_losses=hookimpl(lambda registry: registry.add("drawing", _Drawing)),
        ),
        "drawing",
    )
    text = _recipe('teacher = "s"\nlosses = [{ name = "cross_entropy" }, { name = "drawing", weight = 0.5 }]')
    random.seed(5)
    run_recipe(text, out=tmp_path / "with")
    calls = []
    monkeypatch.setattr(Preflight, "_dry_build", lambda self, name: calls.append(name))
    random.seed(5)
    run_recipe(text, out=tmp_path / "without")
    assert calls == ["s", "kd"]
    for stage in ("s", "kd"):
        a = load_file(str(tmp_path / "with" / stage / "model.safetensors"))
        b = load_file(str(tmp_path / "without" / stage / "model.safetensors"))
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), stage


def test_a_check_params_that_breaks_or_exits_is_one_line_at_validate(kdt_plugin, tmp_path, capsys):
    from kdtoolkit.cli.commands import main

    def breaking(params):
        raise KeyError("tau")

    def exiting(params):
        sys.exit(9)

    class Broken(_RaisingLoss):
        check_params = staticmethod(breaking)

    class Exiting(_RaisingLoss):
        check_params = staticmethod(exiting)

    kdt_plugin(
        _module(
            "kdt_checks",
            kdt_register_backbones=hookimpl(lambda registry: registry.add("tiny", _Tiny)),
            kdt_register_losses=hookimpl(
                lambda registry: (registry.add("broken", Broken), registry.add("exiting", Exiting))
            ),
        ),
        "checks",
    )
    for loss, text in (
        ("broken", "check_params raised KeyError: 'tau'"),
        ("exiting", "check_params called sys.exit(9)"),
    ):
        recipe = tmp_path / f"{loss}.toml"
        recipe.write_text(DATA + _stage("s", f'losses = [{{ name = "{loss}" }}]'))
        capsys.readouterr()
        assert main(["validate", str(recipe)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err == [f"kdt: error: {recipe}: stages.s.losses[0]: plugin 'checks': loss '{loss}': {text}"], err
