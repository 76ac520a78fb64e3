"""The testing kit for plugin authors (``kdtoolkit.testing``, loaded by pytest through ``pytest11``)."""

from __future__ import annotations

import sys
import types

import pytest
import torch
from torch import nn

from kdtoolkit.errors import RecipeError
from kdtoolkit.hookspecs import hookimpl
from kdtoolkit.plugins import get_manager
from kdtoolkit.testing import TinyDataset, check_component, run_recipe


class PixelBackbone(nn.Module):
    """One strided 3x3 convolution: a backbone for tests.

    :param width: output channels.
    """

    reduction = 2

    def __init__(self, *, width: int = 8):
        super().__init__()
        self.out_channels = width
        self.conv = nn.Conv2d(3, width, 3, stride=2, padding=1)

    def forward(self, x):
        return torch.relu(self.conv(x))


class LogitNorm:
    """Mean squared logit (a toy regulariser).

    :param scale: multiplies the value.
    """

    requires_teacher = False
    requires_outputs = ("logits",)

    def __init__(self, *, scale: float = 1.0):
        self.scale = scale

    def __call__(self, step):
        return self.scale * step.outputs["logits"].pow(2).mean()


class Undocumented:
    """A loss whose parameter is not documented."""

    requires_outputs = ("logits",)

    def __init__(self, *, gain: float = 1.0):
        self.gain = gain

    def __call__(self, step):
        return step.outputs["logits"].sum() * 0


def _module() -> types.ModuleType:
    mod = types.ModuleType("kdt_kit_example")

    @hookimpl
    def kdt_register_backbones(registry):
        registry.add("pixel", PixelBackbone)

    @hookimpl
    def kdt_register_losses(registry):
        registry.add("logit_norm", LogitNorm)
        registry.add("undocumented", Undocumented)

    mod.kdt_register_backbones = kdt_register_backbones
    mod.kdt_register_losses = kdt_register_losses
    return mod


RECIPE = """
name = "kit"
[data]
dataset = "tiny"
batch_size = 8
[stages.s]
model.backbone = { name = "pixel" }
model.head = { name = "linear" }
losses = [{ name = "cross_entropy" }, { name = "logit_norm", weight = 0.1, scale = 2.0 }]
[[stages.s.phases]]
epochs = 2
groups = [{ params = ["backbone", "head"], lr = 0.01 }]
"""


def test_run_recipe_in_process_with_a_registered_plugin_and_the_tiny_dataset(kdt_plugin, tmp_path):
    pm = kdt_plugin(_module(), "example")
    assert pm is get_manager() and pm.infos["example"].status == "loaded"
    results = run_recipe(RECIPE, out=tmp_path / "run")
    assert 0.0 <= results["stages"]["s"]["accuracy"] <= 1.0
    assert (tmp_path / "run" / "s" / "model.safetensors").is_file()
    again = run_recipe(RECIPE, out=tmp_path / "run2")  # a second run: the same numbers (seeded, CPU)
    assert again["stages"]["s"]["accuracy"] == results["stages"]["s"]["accuracy"]
    with pytest.raises(RecipeError, match="unknown loss 'nope'"):
        run_recipe(RECIPE.replace('"logit_norm"', '"nope"'), out=tmp_path / "bad")


def test_an_installed_plugin_module_can_be_registered_again_for_a_test(kdt_plugin):
    import kdt_classic.plugin

    pm = kdt_plugin(kdt_classic.plugin, "classic_under_test")  # before the kit: "already registered" failure
    assert pm.infos["classic_under_test"].status == "loaded"
    assert pm.infos["classic"].status == "blocked"
    assert pm.registry("loss").get("hinton_kd").owner == "classic_under_test"
    same_name = kdt_plugin(kdt_classic.plugin, "classic")  # under its own entry point's name
    assert same_name.infos["classic"].status == "loaded" and "hinton_kd" in same_name.registry("loss")


def test_the_fixture_restores_the_process_manager(kdt_plugin):
    before = get_manager()
    kdt_plugin(_module(), "example")
    assert get_manager() is not before and "pixel" in get_manager().registry("backbone")


def test_the_manager_is_back_after_the_previous_test():
    assert "pixel" not in get_manager().registry("backbone")


def test_check_component_passes_good_components_and_names_the_fault(kdt_plugin):
    kdt_plugin(_module(), "example")
    loss = check_component("loss", "logit_norm", {"scale": 3.0})
    assert loss.scale == 3.0
    with pytest.raises(AssertionError, match=r"loss 'undocumented' \(plugin 'example'\): parameters not documented "
                                             r"in the docstring: gain"):
        check_component("loss", "undocumented")


def test_tiny_dataset_is_seeded_and_learnable():
    a, b = TinyDataset("train"), TinyDataset("train")
    assert torch.equal(a.images, b.images) and len(a) == 32 and a.num_classes == 3
    assert not torch.equal(a.images, TinyDataset("test").images)
    x, y = a[4]
    assert x.shape == (3, 16, 16) and x[y % 3].mean() > x[(y + 1) % 3].mean()


BUILT_IN_PARAMS = {
    ("loss", "attention"): {"taps": ["s"], "teacher_taps": ["t"]},
    **{("loss", n): {"student_tap": "s", "teacher_tap": "t"}
       for n in ("crd", "fitnet", "pkt", "rkd", "similarity_preserving")},
}


@pytest.mark.parametrize("kind", ["head", "loss", "metric"])
def test_every_built_in_component_meets_the_contract(kind):
    pm = get_manager()
    checked = 0
    for comp in pm.registry(kind):
        if comp.owner == "kdt.testing":
            continue
        params = BUILT_IN_PARAMS.get((kind, comp.name), {})
        if kind == "head" and comp.name == "identity":
            continue  # needs a backbone that outputs logits
        check_component(kind, comp.name, params)
        checked += 1
    assert checked >= {"head": 3, "loss": 15, "metric": 5}[kind]
