"""The timm backbone: model_kwargs, RNG parity with the earlier construction,
classifier mode with the ``identity`` head, strict loading of weight files."""

from __future__ import annotations

import types

import pytest
import timm
import torch
from safetensors.torch import save_file
from torch import nn

from kdt_classic.heads import IdentityHead
from kdt_timm.backbone import TimmBackbone
from kdtoolkit.engine.models import build_model
from kdtoolkit.cli.commands import main
from kdtoolkit.foundation.errors import CheckpointError, RecipeError
from kdtoolkit.plugin.registry import RESERVED_ARGS, Registry
from kdt_testutil import TINY_DATA, run_kdt


def _save(model: nn.Module, path, prefix: str = "") -> str:
    save_file({prefix + k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return str(path)


def _old_construction(model: str, out_index: int) -> nn.Module:
    """The construction of earlier releases: a probe to count stages, then the model."""
    probe = timm.create_model(model, pretrained=False, features_only=True)
    n = len(probe.feature_info)
    index = out_index if out_index >= 0 else n + out_index
    del probe
    return timm.create_model(model, pretrained=False, features_only=True, out_indices=(index,))


# --------------------------------------------------------------------------- construction


@pytest.mark.parametrize("model,out_index", [("resnet10t", 2), ("resnet18", -1)])
def test_same_weights_and_random_state_as_earlier_construction(model, out_index):
    torch.manual_seed(3)
    old = _old_construction(model, out_index)
    after_old = torch.rand(4)
    torch.manual_seed(3)
    new = TimmBackbone(model=model, out_index=out_index)
    after_new = torch.rand(4)
    a, b = old.state_dict(), new.body.state_dict()
    assert list(a) == list(b)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(after_old, after_new)  # the head built next gets the same init


def test_out_of_range_out_index_is_a_clear_error():
    with pytest.raises(RecipeError, match="out_index: timm model 'resnet10t' has 5 feature stages"):
        TimmBackbone(model="resnet10t", out_index=5)


def test_model_kwargs_reach_timm():
    default = TimmBackbone(model="resnet10t", out_index=2)
    assert torch.count_nonzero(default.body.layer1[0].bn2.weight) == 0  # timm's zero_init_last
    off = TimmBackbone(model="resnet10t", out_index=2, model_kwargs={"zero_init_last": False})
    assert torch.all(off.body.layer1[0].bn2.weight == 1)


def test_unknown_model_kwargs_name_the_key():
    with pytest.raises(RecipeError, match=r"^model_kwargs: timm model 'resnet10t' does not accept.*zero_init_lst"):
        TimmBackbone(model="resnet10t", model_kwargs={"zero_init_lst": False})


def test_model_kwargs_may_not_override_own_keys():
    with pytest.raises(ValueError) as exc:
        TimmBackbone.check_params({"model": "resnet10t", "model_kwargs": {"num_classes": 3}})
    assert exc.value.args[0] == "model_kwargs" and "classifier" in exc.value.args[1]


def test_model_kwargs_recipe_validation(tmp_path):
    recipe = tmp_path / "r.toml"
    recipe.write_text(
        TINY_DATA
        + """
[stages.s]
model.backbone = { name = "timm", model = "resnet10t", out_index = 2, model_kwargs = { features_only = true } }
model.head = { name = "linear" }
losses = [{ name = "cross_entropy" }]
[[stages.s.phases]]
epochs = 1
groups = [{ params = ["backbone", "head"], lr = 1e-3 }]
"""
    )
    r = run_kdt("validate", str(recipe))
    assert r.returncode == 2
    assert r.stderr.startswith("kdt: error:") and "model.backbone.model_kwargs" in r.stderr, r.stderr


# --------------------------------------------------------------------------- classifier mode


def test_num_classes_is_reserved_for_backbones():
    assert "num_classes" in RESERVED_ARGS["backbone"]


def test_classifier_mode_outputs_logits():
    b = TimmBackbone(7, model="resnet10t", classifier=True)
    assert b.out_channels == 7 and b.reduction is None
    head = IdentityHead(b.out_channels, 7)
    out = head(b(torch.randn(2, 3, 32, 32)))
    assert out["logits"].shape == (2, 7)
    with pytest.raises(ValueError, match=r"expects logits \[B, 7\]"):
        head(torch.randn(2, 5))
    with pytest.raises(RecipeError, match="head 'identity' needs a backbone that outputs logits"):
        IdentityHead(128, 7)
    with pytest.raises(RecipeError, match="classifier"):
        TimmBackbone(model="resnet10t", classifier=True)


def test_core_passes_num_classes_to_backbones_that_accept_it():
    seen = {}

    class Probe(nn.Module):
        out_channels = 3

        def __init__(self, num_classes: int | None = None):
            super().__init__()
            seen["n"] = num_classes

    def head(in_channels: int, num_classes: int) -> nn.Module:
        return nn.Identity()

    registries = {"backbone": Registry("backbone"), "head": Registry("head")}
    registries["backbone"].add("p", Probe)
    registries["head"].add("h", head)

    def registry(kind):
        return registries[kind]

    build_model(
        {"model": {"backbone": {"name": "p"}, "head": {"name": "h"}, "weights": None}},
        7,
        types.SimpleNamespace(registry=registry),
    )
    assert seen["n"] == 7


def test_classifier_mode_trains_with_identity_head(tmp_path):
    recipe = tmp_path / "r.toml"
    recipe.write_text(
        TINY_DATA
        + """
[stages.s]
model.backbone = { name = "timm", model = "resnet10t", classifier = true }
model.head = { name = "identity" }
losses = [{ name = "cross_entropy" }]
[[stages.s.phases]]
epochs = 1
limit_batches = 3
groups = [{ params = ["backbone"], lr = 1e-3 }]
"""
    )
    assert main(["run", str(recipe), "--out", str(tmp_path / "run"), "-q"]) == 0


# --------------------------------------------------------------------------- weight files


def test_matching_file_loads_and_ignores_cut_stages(tmp_path):
    src = timm.create_model("resnet18")
    path = _save(src, tmp_path / "r18.safetensors")
    b = TimmBackbone(model="resnet18", out_index=2, weights=path)
    assert torch.equal(b.body.layer2[1].conv2.weight, src.layer2[1].conv2.weight)
    assert b.weights_report["missing"] == b.weights_report["unexpected"] == b.weights_report["shape"] == 0
    assert b.weights_report["ignored"] > 0  # layer3, layer4, fc


def test_deeper_architecture_is_refused(tmp_path):
    path = _save(timm.create_model("resnet34"), tmp_path / "r34.safetensors")
    with pytest.raises(CheckpointError) as exc:
        TimmBackbone(model="resnet18", weights=path)
    msg = str(exc.value)
    assert "0 missing, 96 unexpected, 0 with another shape" in msg
    assert "another architecture or depth" in msg and "\n" not in msg


def test_other_shapes_are_refused(tmp_path):
    state = {k: v.contiguous() for k, v in timm.create_model("resnet10t").state_dict().items()}
    state["layer1.0.conv1.weight"] = torch.zeros(3, 3, 1, 1)
    state["layer1.0.conv2.weight"] = torch.zeros(3, 3, 1, 1)
    del state["layer1.0.bn1.bias"]
    save_file(state, str(tmp_path / "w.safetensors"))
    with pytest.raises(CheckpointError, match="1 missing, 0 unexpected, 2 with another shape.*layer1.0.bn1.bias"):
        TimmBackbone(model="resnet10t", out_index=2, weights=str(tmp_path / "w.safetensors"))


def test_non_strict_loads_what_fits(tmp_path):
    src = timm.create_model("resnet34")
    path = _save(src, tmp_path / "r34.safetensors")
    b = TimmBackbone(model="resnet18", weights=path, strict=False)
    assert b.weights_report["unexpected"] == 96 and b.weights_report["missing"] == 0
    assert torch.equal(b.body.layer3[1].conv1.weight, src.layer3[1].conv1.weight)


@pytest.mark.parametrize("prefix", ["module.", "model.", "module.model."])
def test_prefixed_keys_are_stripped(tmp_path, prefix):
    src = timm.create_model("resnet10t")
    b = TimmBackbone(model="resnet10t", out_index=2, weights=_save(src, tmp_path / "w.safetensors", prefix))
    assert torch.equal(b.body.layer2[0].conv1.weight, src.layer2[0].conv1.weight)


@pytest.mark.parametrize("nested", [False, True])
def test_pth_state_dict_loads_with_weights_only(tmp_path, nested):
    src = timm.create_model("resnet10t")
    state = src.state_dict()
    torch.save({"state_dict": state, "epoch": 3} if nested else state, tmp_path / "w.pth")
    b = TimmBackbone(model="resnet10t", out_index=-1, weights=str(tmp_path / "w.pth"))
    assert torch.equal(b.body.layer4[0].conv1.weight, src.layer4[0].conv1.weight)


def test_classifier_mode_keeps_its_own_classifier_for_other_class_counts(tmp_path):
    src = timm.create_model("resnet10t")  # 1000 classes
    b = TimmBackbone(10, model="resnet10t", classifier=True, weights=_save(src, tmp_path / "w.safetensors"))
    assert torch.equal(b.body.layer1[0].conv1.weight, src.layer1[0].conv1.weight)
    assert b.body.fc.weight.shape == (10, 512)


def test_wrong_depth_via_cli_is_one_line_exit_2(tmp_path):
    path = _save(timm.create_model("resnet18"), tmp_path / "r18.safetensors")
    recipe = tmp_path / "r.toml"
    recipe.write_text(
        TINY_DATA
        + """
[stages.s]
model.backbone = { name = "timm", model = "resnet10t", out_index = 2 }
model.head = { name = "linear" }
losses = [{ name = "cross_entropy" }]
[[stages.s.phases]]
epochs = 1
limit_batches = 1
groups = [{ params = ["backbone", "head"], lr = 1e-3 }]
"""
    )
    r = run_kdt(
        "run", str(recipe), "--out", str(tmp_path / "run"), "-q", "--set", f'stages.s.model.backbone.weights="{path}"'
    )
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("kdt: error:"), r.stderr
    assert "weights do not fit timm model 'resnet10t'" in lines[0]
