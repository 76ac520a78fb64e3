"""Diagnostics for plugin authors: failed plugins named where a component is missing, undecorated hooks,
reserved parameter names, and lists summarised rather than cut."""

from __future__ import annotations

import sys
import types

import pytest

from kdtoolkit.foundation.errors import PluginError, RecipeError
from kdtoolkit.plugin.hookspecs import hookimpl
from kdtoolkit.plugin.manager import PluginManager
from kdtoolkit.plugin.registry import LIST_LIMIT, RESERVED_KEYS, Registry, summarize


def _plugin(name: str, **attrs) -> types.ModuleType:
    mod = types.ModuleType(name)
    for key, value in attrs.items():
        setattr(mod, key, value)
    return mod


class _WeightedLoss:
    """A loss whose parameter clashes with the core's ``weight``."""

    def __init__(self, *, weight: float = 1.0):
        self.weight = weight


def test_a_parameter_named_like_a_reserved_key_fails_the_plugin_at_registration():
    @hookimpl
    def kdt_register_losses(registry):
        registry.add("weighted", _WeightedLoss)

    pm = PluginManager(autoload=False, extra=[(_plugin("kdt_w", kdt_register_losses=kdt_register_losses), "w")])
    info = pm.infos["w"]
    assert info.status == "failed" and "weighted" not in pm.registry("loss")
    assert "loss 'weighted': parameter 'weight' is a key the core reads itself" in info.error
    assert "rename it" in info.error


def test_a_reserved_parameter_behind_a_reference_fails_on_first_use(tmp_path, monkeypatch):
    (tmp_path / "kdt_reserved_ds.py").write_text(
        "def ds(split, augment, *, batch_size: int = 4):\n    '''A dataset with a clashing key.'''\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    reg = Registry("dataset").bound("rds")
    reg.add("clash", "kdt_reserved_ds:ds")
    with pytest.raises(PluginError, match="dataset 'clash': parameter 'batch_size' is a key the core reads"):
        reg.get("clash").params
    sys.modules.pop("kdt_reserved_ds", None)


def test_reserved_keys_are_the_keys_validation_reads():
    from kdtoolkit.recipe import stage_checks as validate_stage, validator as validate
    from kdtoolkit.engine import optim

    assert validate.DATA_KEYS == RESERVED_KEYS["dataset"]
    assert validate_stage.LOSS_CORE_KEYS == RESERVED_KEYS["loss"]
    assert optim.OPTIMIZER_CORE_KEYS == validate_stage.OPTIMIZER_CORE_KEYS == RESERVED_KEYS["optimizer"]
    assert optim.SCHEDULER_CORE_KEYS == validate_stage.SCHEDULER_CORE_KEYS == RESERVED_KEYS["scheduler"]


def test_unknown_component_message_names_the_plugins_that_failed():
    @hookimpl
    def kdt_register_heads(registry):
        raise ImportError("No module named 'cosine_kernels'")

    pm = PluginManager(extra=[(_plugin("kdt_cosine_proto", kdt_register_heads=kdt_register_heads), "cosine_proto")])
    assert pm.infos["cosine_proto"].status == "failed"
    with pytest.raises(RecipeError) as err:
        pm.registry("head").get("cosine_proto", source="r.toml", key="stages.s.model.head.name")
    msg = str(err.value)
    assert msg.startswith("r.toml: stages.s.model.head.name: unknown head 'cosine_proto'")
    assert "registered: identity, linear, protopnet, prototree" in msg
    assert "plugins that failed to load: 'cosine_proto' (kdt_register_heads raised ImportError: " in msg
    assert "see kdt plugins" in msg


def test_hook_functions_without_hookimpl_are_reported():
    def kdt_register_losses(registry):  # not decorated: pluggy never calls it
        registry.add("never", _WeightedLoss)

    pm = PluginManager(autoload=False, extra=[(_plugin("kdt_plain", kdt_register_losses=kdt_register_losses), "plain")])
    info = pm.infos["plain"]
    assert info.status == "loaded" and info.components == {}
    assert info.warnings == [
        "kdt_register_losses not decorated with @hookimpl, so never called "
        "(from kdtoolkit.plugin.hookspecs import hookimpl)"
    ]
    assert info.to_json()["warnings"] == info.warnings


def test_long_lists_are_summarised_never_cut():
    names = [f"loss_{i:02d}" for i in range(LIST_LIMIT + 10)]
    text = summarize(names)
    assert text.endswith(", … and 10 more; see kdt plugins") and text.count("loss_") == LIST_LIMIT
    assert summarize(names[:3]) == "loss_00, loss_01, loss_02" and summarize([]) == "none"
    reg = Registry("loss")
    for n in names:
        reg.add(n, _plain_loss)
    with pytest.raises(RecipeError, match=r"registered: loss_00, .*loss_19, … and 10 more; see kdt plugins$"):
        reg.get("missing")


def _plain_loss(*, scale: float = 1.0):
    """A loss factory."""
    return None
