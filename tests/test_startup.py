"""Fast start-up: listing commands and plugins imports no torch; lazy component references.

The built-in bundles register their components as ``"module:Name"``
references (``docs/plugins.md``, "Fast start-up"): the factory module is
imported when a recipe names the component. These tests check the
import graph in fresh interpreters, never timings.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import types

import pytest

from kdtoolkit.foundation.errors import PluginError
from kdtoolkit.plugin.hookspecs import hookimpl
from kdtoolkit.plugin.manager import PluginManager
from kdtoolkit.plugin.registry import Registry

HEAVY = ("torch", "scipy", "timm", "torchvision", "numpy", "matplotlib", "PIL")


def _imported_after(code: str, env_extra: dict | None = None) -> dict:
    """Run ``code`` in a fresh interpreter; return which heavy packages it imported."""
    probe = "\n".join(
        [
            "import json, sys",
            code,
            f"heavy = sorted({{m.split('.')[0] for m in sys.modules}} & set({HEAVY!r}))",
            "sys.__stdout__.write('\\nIMPORTED=' + json.dumps(heavy) + '\\n')",
        ]
    )
    import os

    env = dict(os.environ, **(env_extra or {}))
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr
    line = [l for l in proc.stdout.splitlines() if l.startswith("IMPORTED=")][-1]
    return {"heavy": json.loads(line.split("=", 1)[1]), "stdout": proc.stdout}


@pytest.mark.parametrize(
    "args",
    [
        ["--help"],
        ["plugins"],
        ["plugins", "--json"],
        ["metrics", "--help"],
        ["run", "--help"],
        ["check", "--help"],
        ["report", "--help"],
        ["explain", "--help"],
    ],
)
def test_listing_commands_import_no_torch(args):
    got = _imported_after(f"from kdtoolkit.cli.commands import _main\ncode = _main({args!r})\nassert code == 0, code")
    assert got["heavy"] == [], f"kdt {' '.join(args)} imported {got['heavy']}"


def test_plugins_listing_names_every_builtin_component_without_importing_them():
    got = _imported_after("from kdtoolkit.cli.commands import _main\n_main(['plugins', '--json'])")
    infos = {i["name"]: i for i in json.loads(got["stdout"].split("\nIMPORTED=")[0])}
    assert "protopnet" in infos["protopnet"]["components"]["head"]
    assert "prototree" in infos["prototree"]["components"]["head"]
    assert infos["classic"]["components"]["loss"][:2] == ["attention", "crd"]
    assert got["heavy"] == []


def test_builtin_components_are_registered_lazily_and_resolve():
    pm = PluginManager()
    lazy = [c for kind in pm.registries for c in pm.registry(kind) if c.reference]
    assert len(lazy) >= 30  # every built-in component
    for comp in lazy:
        module, _, attr = comp.reference.partition(":")
        assert comp.factory is getattr(sys.modules[module], attr.split(".")[0])
        assert isinstance(comp.params, dict) and comp.summary


def _plugin(**hooks) -> types.ModuleType:
    mod = types.ModuleType("kdt_lazy_test")
    for hook, fn in hooks.items():
        setattr(mod, hook, fn)
    return mod


def test_reference_is_imported_only_when_used(tmp_path, monkeypatch):
    pkg = tmp_path / "kdt_lazy_pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "losses.py").write_text(
        textwrap.dedent('''
        class Toy:
            """A toy loss."""
            requires_outputs = ("logits",)

            def __init__(self, *, scale: float = 2.0):
                self.scale = scale
    ''')
    )
    monkeypatch.syspath_prepend(str(tmp_path))

    @hookimpl
    def kdt_register_losses(registry):
        registry.add("toy", "kdt_lazy_pkg.losses:Toy")

    pm = PluginManager(autoload=False, extra=[(_plugin(kdt_register_losses=kdt_register_losses), "lazy")])
    comp = pm.registry("loss").get("toy")
    assert "kdt_lazy_pkg.losses" not in sys.modules and not comp.loaded
    assert comp.params["scale"].default == 2.0 and comp.summary == "A toy loss."
    assert comp.loaded and comp.attr("requires_outputs") == ("logits",)
    sys.modules.pop("kdt_lazy_pkg.losses", None)
    sys.modules.pop("kdt_lazy_pkg", None)


def test_broken_reference_names_plugin_component_and_reference():
    @hookimpl
    def kdt_register_losses(registry):
        registry.add("ghost", "kdt_no_such_module.losses:Ghost")

    pm = PluginManager(autoload=False, extra=[(_plugin(kdt_register_losses=kdt_register_losses), "haunted")])
    assert pm.infos["haunted"].status == "loaded"  # nothing is imported at registration
    comp = pm.registry("loss").get("ghost")
    with pytest.raises(
        PluginError,
        match=r"plugin 'haunted': loss 'ghost': cannot import "
        r"kdt_no_such_module.losses:Ghost \(ModuleNotFoundError",
    ):
        comp.factory
    with pytest.raises(PluginError, match="cannot import"):  # and again: never half-resolved
        comp.params


def test_reference_to_a_bad_signature_is_a_plugin_error(tmp_path, monkeypatch):
    (tmp_path / "kdt_badsig.py").write_text("class Bad:\n    def __init__(self, *, scale=1.0):\n        pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    reg = Registry("loss").bound("badsig")
    reg.add("bad", "kdt_badsig:Bad")
    with pytest.raises(PluginError, match="plugin 'badsig': loss 'bad': parameter 'scale' has no type annotation"):
        reg.get("bad").params
    sys.modules.pop("kdt_badsig", None)


@pytest.mark.parametrize("ref", ["no_colon", "a.b:", ":Name", "a b:C", "a.b:C D", 42])
def test_malformed_reference_fails_the_plugin(ref):
    @hookimpl
    def kdt_register_losses(registry):
        registry.add("odd", ref)

    pm = PluginManager(autoload=False, extra=[(_plugin(kdt_register_losses=kdt_register_losses), "odd")])
    assert pm.infos["odd"].status == "failed"
    assert "odd" not in pm.registry("loss")


def test_validating_a_recipe_imports_only_the_named_components(tmp_path):
    """A ProtoPNet recipe imports no ProtoTree module (only its plugin registrations), nor timm itself;
    once the components' schemas are kept, it imports no torch either (only the parameter checks)."""
    cache = tmp_path / "cache"
    code = textwrap.dedent("""
        from kdtoolkit.cli.commands import _main
        assert _main(['validate', 'recipes/proto2proto.toml']) == 0
        print('LOADED=' + ','.join(sorted(m for m in sys.modules if m.startswith('kdt_'))))
    """)
    first = _imported_after(code, {"KDT_CACHE_DIR": str(cache)})  # builds the timm name cache
    assert (cache / next(p.name for p in cache.iterdir())).name.startswith("timm-")
    second = _imported_after(code, {"KDT_CACHE_DIR": str(cache)})
    loaded = [l for l in second["stdout"].splitlines() if l.startswith("LOADED=")][-1]
    assert [m for m in loaded.split("=")[1].split(",") if m.startswith("kdt_prototree.")] == ["kdt_prototree.plugin"]
    assert "kdt_protopnet.checks" in loaded and "kdt_protopnet.head" not in loaded
    assert "timm" in first["heavy"] and "torch" in first["heavy"]  # the first check lists timm's models once
    assert (cache / "component-schemas-v2.json").is_file()
    assert not {"torch", "timm", "scipy"} & set(second["heavy"]), second["heavy"]
    first_out = first["stdout"].split("LOADED=")[0]
    assert first_out == second["stdout"].split("LOADED=")[0]  # the same report


def test_timm_names_cache_is_built_reused_and_rebuilt(tmp_path, monkeypatch):
    from kdt_timm import names

    monkeypatch.setenv("KDT_CACHE_DIR", str(tmp_path))
    calls = []
    real = names._from_timm
    monkeypatch.setattr(names, "_from_timm", lambda: calls.append(1) or real())
    first = names.model_names()
    assert "resnet18" in first and len(calls) == 1
    (path,) = tmp_path.glob("timm-*-models-v2.json")
    assert names.model_names() == first and len(calls) == 1  # read from the cache
    path.write_text("{not json")
    assert names.model_names() == first and len(calls) == 2  # unreadable: rebuilt
    data = json.loads(path.read_text())
    path.write_text(json.dumps({"timm": "0.0.1", "models": ["only_this"]}))
    assert names.model_names() == first and len(calls) == 3  # another timm version: rebuilt
    assert json.loads(path.read_text()) == data
    monkeypatch.setenv("KDT_CACHE_DIR", str(tmp_path / "file" / "sub"))
    (tmp_path / "file").write_text("a file where the folder should be")
    assert names.model_names() == first  # unwritable: listed each time, no error


def test_timm_name_check_and_suggestions(tmp_path, monkeypatch):
    from kdt_timm import names
    from kdt_timm.backbone import TimmBackbone

    monkeypatch.setenv("KDT_CACHE_DIR", str(tmp_path))
    import timm

    assert names.is_model("resnet50.a1_in1k") and timm.is_model("resnet50.a1_in1k")
    assert names.is_model("convnext_tiny_in22ft1k") and timm.is_model(
        "convnext_tiny_in22ft1k"
    )  # deprecated, still built
    assert not names.is_model("resnet181") and not timm.is_model("resnet181")
    assert names.similar("resnet181")[0] == "resnet18"  # no '_' in the name: still a suggestion
    assert "resnet18" in names.similar("resnt18")
    with pytest.raises(ValueError) as err:
        TimmBackbone.check_params({"model": "resnet181"})
    assert err.value.args[0] == "model" and "did you mean 'resnet18'" in err.value.args[1]


def test_reference_to_a_callable_without_signature_is_a_plugin_error():
    reg = Registry("loss").bound("builtin_ref")
    reg.add("hypot", "math:hypot")  # a C function: inspect.signature raises ValueError
    with pytest.raises(PluginError, match="plugin 'builtin_ref': loss 'hypot'"):
        reg.get("hypot").params
