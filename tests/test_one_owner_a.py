"""One owner per concept: building a component from its recipe table, a loss's declared taps, hooking
taps, and a head's record keys are each done in one place, which every user goes through."""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from kdtoolkit.foundation.errors import PluginError, RecipeError
from kdtoolkit.plugin import (
    NAME_KEYS,
    RESERVED_KEYS,
    Registry,
    build_component,
    declared_taps,
    declares_taps,
    factory_kwargs,
    instantiate,
    record_keys,
)
from kdtoolkit.engine.taps import capturing, hook_taps, tapped

ROOT = Path(__file__).resolve().parents[1]
CORE = ROOT / "kdtoolkit"
OWNERS = {
    "build": CORE / "plugin" / "instantiation.py",
    "declared": CORE / "plugin" / "declared.py",
    "taps": CORE / "engine" / "taps.py",
}


def _calls(roots: list[Path]) -> list[tuple[Path, ast.Call]]:
    out = []
    for root in roots:
        for path in sorted(root.rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, ast.Call):
                    out.append((path, node))
    return out


def _where(path: Path, node: ast.AST) -> str:
    return f"{path.relative_to(ROOT)}:{node.lineno}"


def _method(node: ast.Call, name: str) -> bool:
    return isinstance(node.func, ast.Attribute) and node.func.attr == name


def _reads_attr(node: ast.Call, names: set[str]) -> bool:
    """``getattr(x, "<name>", ...)`` or ``x.attr("<name>", ...)`` for one of ``names``."""
    if isinstance(node.func, ast.Name) and node.func.id == "getattr" and len(node.args) >= 2:
        arg = node.args[1]
    elif _method(node, "attr") and node.args:
        arg = node.args[0]
    else:
        return False
    return isinstance(arg, ast.Constant) and arg.value in names


# --------------------------------------------------------------------------- component instantiation


class _Plugins:
    """The part of a plugin manager that building components uses: one registry per kind."""

    def __init__(self) -> None:
        self.registries: dict[str, Registry] = {}

    def registry(self, kind: str) -> Registry:
        return self.registries.setdefault(kind, Registry(kind))


def _recorder(calls: list):
    def loss(*, scale: float = 1.0, temperature: float = 4.0):
        """A loss that records what it receives."""
        calls.append(("loss", (), {"scale": scale, "temperature": temperature}))
        return "built"

    def backbone(*, depth: int = 2, num_classes: int = 0):
        """A backbone that records what it receives."""
        calls.append(("backbone", (), {"depth": depth, "num_classes": num_classes}))
        return "backbone"

    def dataset(split, augment, *, image_size: int = 8):
        """A dataset that records what it receives."""
        calls.append(("dataset", (split, augment), {"image_size": image_size}))
        return "dataset"

    def phase(*, rounds: int = 1):
        """A phase that records what it receives."""
        calls.append(("phase", (), {"rounds": rounds}))
        return "phase"

    return {"loss": loss, "backbone": backbone, "dataset": dataset, "phase": phase}


@pytest.fixture
def plugins():
    pm, calls = _Plugins(), []
    for kind, factory in _recorder(calls).items():
        pm.registry(kind).add("rec", factory)
    pm.calls = calls
    return pm


def test_a_factory_receives_its_parameters_and_never_the_core_keys(plugins):
    spec = {"name": "rec", "id": "a", "weight": 0.5, "scale": 3.0}
    assert instantiate("loss", spec, plugins=plugins) == "built"
    assert plugins.calls == [("loss", (), {"scale": 3.0, "temperature": 4.0})]
    assert factory_kwargs(plugins.registry("loss").get("rec"), spec) == {"scale": 3.0}
    assert set(RESERVED_KEYS["loss"]) & set(factory_kwargs(plugins.registry("loss").get("rec"), spec)) == set()


def test_the_name_key_of_a_dataset_and_a_phase_and_the_core_arguments(plugins):
    assert NAME_KEYS == {"dataset": "dataset", "phase": "kind"}
    data = {"dataset": "rec", "batch_size": 4, "eval_batch_size": 8, "augment": True, "image_size": 16}
    assert instantiate("dataset", data, "train", True, plugins=plugins) == "dataset"
    phase = {"name": "push0", "kind": "rec", "epochs": 3, "groups": [], "rounds": 2}  # a phase that trains
    assert instantiate("phase", phase, plugins=plugins) == "phase"
    assert plugins.calls == [
        ("dataset", ("train", True), {"image_size": 16}),
        ("phase", (), {"rounds": 2}),
    ]


def test_runtime_keywords_go_through_extra_and_may_not_repeat_a_recipe_key(plugins):
    comp = plugins.registry("backbone").get("rec")
    assert build_component(comp, {"name": "rec", "depth": 5}, num_classes=7) == "backbone"
    assert plugins.calls == [("backbone", (), {"depth": 5, "num_classes": 7})]
    with pytest.raises(TypeError, match="'depth' is given both"):
        build_component(comp, {"name": "rec", "depth": 5}, depth=6)


def test_a_name_alone_builds_with_the_defaults(plugins):
    instantiate("loss", "rec", plugins=plugins)
    assert plugins.calls == [("loss", (), {"scale": 1.0, "temperature": 4.0})]


def test_an_unknown_component_is_the_registrys_recipe_error(plugins):
    with pytest.raises(RecipeError, match=r"unknown loss 'recc' \(did you mean 'rec'\?\); registered: rec"):
        instantiate("loss", {"name": "recc"}, plugins=plugins)


def test_a_factory_that_raises_is_one_plugin_error(plugins):
    def broken(*, scale: float = 1.0):
        """Raises."""
        raise ValueError("no good")

    plugins.registry("loss").bound("example").add("broken", broken)
    with pytest.raises(PluginError, match=r"plugin 'example': loss 'broken': cannot be built: ValueError: no good"):
        instantiate("loss", {"name": "broken", "id": "x", "weight": 1.0}, plugins=plugins)


def test_the_rule_gives_every_shipped_recipe_the_keys_of_the_former_rules():
    """For every component of every shipped recipe, the keys the factory receives are those that the
    former per-site rules passed (the table less its name and the kind's reserved keys; the parameters
    for datasets and phases)."""
    from kdtoolkit.plugin import get_manager
    from kdtoolkit.recipe import load_recipe

    pm = get_manager()

    def less(spec: dict[str, Any], keys: tuple[str, ...]) -> dict[str, Any]:
        return {k: v for k, v in spec.items() if k not in keys}

    checked = 0
    for path in sorted((CORE / "recipes").glob("*.toml")):
        rec = load_recipe(path, plugins=pm)
        for name in rec.order:
            st = rec.stage(name)
            pairs = [
                ("backbone", st["model"]["backbone"], less(st["model"]["backbone"], ("name",))),
                ("head", st["model"]["head"], less(st["model"]["head"], ("name",))),
                *[("loss", s, less(s, RESERVED_KEYS["loss"])) for s in st["losses"]],
                *[("metric", s, less(s, ("name",))) for s in st["metrics"]],
            ]
            for ph in st["phases"]:
                if "optimizer" in ph:
                    pairs.append(("optimizer", ph["optimizer"], less(ph["optimizer"], RESERVED_KEYS["optimizer"])))
                    pairs.append(("scheduler", ph["scheduler"], less(ph["scheduler"], RESERVED_KEYS["scheduler"])))
            for kind, spec, before in pairs:
                comp = pm.registry(kind).get(spec["name"])
                assert factory_kwargs(comp, spec) == before, (path.name, name, kind)
                checked += 1
    assert checked > 40


def test_only_the_instantiation_module_builds_components():
    found = [
        _where(path, node)
        for path, node in _calls([CORE, ROOT / "plugins"])
        if (_method(node, "build") and path != OWNERS["build"]) or _method(node, "factory")
    ]
    assert found == [], f"components built outside kdtoolkit/plugin/instantiation.py: {found}"


# --------------------------------------------------------------------------- declared taps


class _TapLoss:
    """A loss whose taps depend on its parameters."""

    requires_taps = staticmethod(lambda p: p["taps"])
    requires_teacher_taps = "t"

    def __init__(self, *, taps: list[str] | None = None):
        self.taps = taps


def test_declared_taps_are_read_alike_from_the_registry_the_class_and_the_loss():
    registry = Registry("loss")
    registry.add("taps", _TapLoss)
    params = {"taps": ["x", "y"]}
    for obj in (registry.get("taps"), _TapLoss, _TapLoss(**params)):
        assert declared_taps(obj, "requires_taps", params) == ("x", "y")
        assert declared_taps(obj, "requires_teacher_taps", params) == ("t",)
        assert declares_taps(obj)
    assert declared_taps(object(), "requires_taps", {}) == () and not declares_taps(object())


def test_only_the_declared_module_reads_a_losss_taps():
    names = {"requires_taps", "requires_teacher_taps"}
    found = [
        _where(path, node)
        for path, node in _calls([CORE, ROOT / "plugins"])
        if _reads_attr(node, names) and path != OWNERS["declared"]
    ]
    assert found == [], f"tap declarations read outside kdtoolkit/plugin/declared.py: {found}"


def test_validation_and_training_use_the_one_reader():
    import kdtoolkit.engine.losses as losses
    import kdtoolkit.recipe.stage_checks as stage_checks

    assert losses.declared_taps is declared_taps and stage_checks.declared_taps is declared_taps
    assert not hasattr(stage_checks, "_taps_of")


# --------------------------------------------------------------------------- hooking taps


def _net() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))


def _hooks(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) for m in model.modules())


def test_hook_taps_hooks_what_is_asked_or_nothing():
    model = _net()
    assert hook_taps(model, None) is None and hook_taps(model, {}) is None
    assert hook_taps(model, {"a": "0", "b": "2"}, names=set()) is None
    taps = hook_taps(model, {"b": "2", "a": "0", "c": "1"}, names={"c", "a"})
    assert taps.taps == {"a": "0", "c": "1"} and _hooks(model) == 2
    x = torch.ones(1, 4)
    with capturing(taps) as feats:
        out = model(x)
    assert sorted(feats) == ["a", "c"] and torch.equal(feats["c"], torch.relu(model[0](x)))
    model(x)  # outside a capture: nothing recorded
    assert sorted(feats) == ["a", "c"]
    taps.remove()
    assert _hooks(model) == 0
    with capturing(None) as feats:
        assert torch.equal(model(x), out)
    assert feats == {}


def test_tapped_removes_its_hooks_even_when_the_pass_raises():
    model = _net()
    with tapped(model, {"a": "0"}) as feats:
        model(torch.ones(1, 4))
    assert list(feats) == ["a"] and _hooks(model) == 0
    with pytest.raises(RuntimeError), tapped(model, {"a": "0"}):
        model(torch.ones(1, 5))
    assert _hooks(model) == 0


def test_only_the_taps_module_hooks_modules():
    found = [
        _where(path, node)
        for path, node in _calls([CORE])
        if path != OWNERS["taps"]
        and (
            _method(node, "register_forward_hook")
            or _method(node, "capture")
            or (isinstance(node.func, ast.Name) and node.func.id == "Taps")
        )
    ]
    assert found == [], f"taps hooked outside kdtoolkit/engine/taps.py: {found}"


# --------------------------------------------------------------------------- record keys


def test_record_keys_of_a_registered_head_its_class_and_a_built_head():
    class Head:
        """A head with records."""

        record_keys = ("min_distances", "argmin")

        def __init__(self, in_channels, num_classes):
            pass

    registry = Registry("head")
    registry.add("h", Head)
    for obj in (registry.get("h"), Head, Head(2, 3)):
        assert record_keys(obj) == ("min_distances", "argmin")
    assert record_keys(object()) == ()


def test_only_the_declared_module_reads_record_keys():
    found = [
        _where(path, node)
        for path, node in _calls([CORE, ROOT / "plugins"])
        if _reads_attr(node, {"record_keys"}) and path != OWNERS["declared"]
    ]
    attributes = []
    for path in sorted(CORE.rglob("*.py")):
        if path == OWNERS["declared"]:
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Attribute) and node.attr == "record_keys" and isinstance(node.ctx, ast.Load):
                attributes.append(_where(path, node))
    assert found == [] and attributes == [], (
        f"record_keys read outside kdtoolkit/plugin/declared.py: {found + attributes}"
    )
