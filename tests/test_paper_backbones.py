"""The papers' backbones through the ``timm`` backbone: the 7x7 grid at 224 px, and the weight files they
come in (torchvision's VGG and DenseNet files, ProtoTree's iNaturalist ResNet-50 from BBN). No downloads:
random weights, models built on the meta device where only shapes matter, fixtures written by the tests."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import timm
import torch
import torchvision

from kdt_timm.backbone import TimmBackbone
from kdt_timm.layouts import convert_torchvision, to_timm_layout
from kdtoolkit.foundation.errors import CheckpointError

try:
    import tomllib
except ModuleNotFoundError:  # Python < 3.11
    import tomli as tomllib

RECIPES = Path(__file__).resolve().parents[1] / "kdtoolkit" / "recipes" / "paper"

#: model (with the pretrained tag the paper recipes use) -> channels of the last stage (out_index -1).
PAPER_BACKBONES = {
    "resnet18.tv_in1k": 512,
    "resnet34.tv_in1k": 512,
    "resnet50.tv_in1k": 2048,
    "vgg11.tv_in1k": 512,
    "vgg16.tv_in1k": 512,
    "vgg19.tv_in1k": 512,
    "densenet121.tv_in1k": 1024,
}


def _meta_shapes(module: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


@pytest.mark.parametrize("model,channels", PAPER_BACKBONES.items())
def test_last_stage_is_a_7x7_grid_at_224_px(model, channels):
    with torch.device("meta"):  # shapes only: no memory, no random numbers
        backbone = TimmBackbone(model=model, out_index=-1, pretrained=False)
        out = backbone(torch.empty(2, 3, 224, 224))
    assert tuple(out.shape) == (2, channels, 7, 7)
    assert backbone.out_channels == channels and backbone.reduction == 32


def test_vgg_features_end_after_the_last_max_pool_on_the_cpu():
    """As ProtoPNet's VGG features: every conv of the configuration and the final 2x2 max-pool, 512 channels."""
    with torch.device("meta"):
        backbone = TimmBackbone(model="vgg19", out_index=-1)
    backbone = backbone.to_empty(device="cpu")  # real kernels; the values do not matter
    layers = list(backbone.body.children())
    assert isinstance(layers[-1], torch.nn.MaxPool2d)
    assert sum(isinstance(m, torch.nn.Conv2d) for m in layers) == 16
    with torch.no_grad():
        assert tuple(backbone(torch.zeros(1, 3, 224, 224)).shape) == (1, 512, 7, 7)


# --------------------------------------------------------------------------- torchvision layouts


@pytest.mark.parametrize("name", ["resnet18", "resnet34", "resnet50"])
def test_torchvision_resnets_have_timms_names(name):
    with torch.device("meta"):
        assert _meta_shapes(getattr(torchvision.models, name)()) == _meta_shapes(timm.create_model(name))


@pytest.mark.parametrize("name", ["vgg11", "vgg16", "vgg19"])
def test_torchvision_vgg_classifier_converts_to_timms(name):
    with torch.device("meta"):
        tv = getattr(torchvision.models, name)().state_dict()
        shapes = _meta_shapes(timm.create_model(name))
    assert "classifier.0.weight" in tv and "pre_logits.fc1.weight" in shapes
    converted, n = convert_torchvision(tv, shapes)
    assert n == 6 and {k: tuple(v.shape) for k, v in converted.items()} == shapes  # Linear 25088 -> conv 512x7x7


def test_legacy_densenet_names_convert_to_timms():
    with torch.device("meta"):
        shapes = _meta_shapes(timm.create_model("densenet121"))
        assert _meta_shapes(torchvision.models.densenet121()) == shapes  # today's torchvision names
    legacy = {
        re.sub(r"(denselayer\d+\.(?:norm|relu|conv))([12])\.", r"\1.\2.", k): torch.empty(s, device="meta")
        for k, s in shapes.items()
    }
    assert "features.denseblock1.denselayer1.norm.1.weight" in legacy
    converted, n = convert_torchvision(legacy, shapes)
    assert set(converted) == set(shapes) and n > 0
    # a file already in timm's layout is left alone
    same, none = convert_torchvision({k: torch.empty(s, device="meta") for k, s in shapes.items()}, shapes)
    assert none == 0 and set(same) == set(shapes)


def test_vgg_features_file_of_torchvision_names_loads_strictly(tmp_path):
    """ProtoPNet's VGG features (torchvision's ``features.N.*`` without the classifier) fit the cut backbone."""
    # A 4-channel pre-logits block (mlp_ratio) instead of timm's 4096 x 512 x 7 x 7 convolution, only so that
    # the model builds fast: the features, all a cut backbone has, are the same.
    small = {"mlp_ratio": 4 / 4096}
    with torch.device("meta"):
        shapes = _meta_shapes(TimmBackbone(model="vgg11", out_index=-1, model_kwargs=small).body)
    gen = torch.Generator().manual_seed(0)
    state = {k.replace("features_", "features.", 1): torch.randn(s, generator=gen) for k, s in shapes.items()}
    torch.save(state, tmp_path / "vgg11_features.pth")
    loaded = TimmBackbone(model="vgg11", out_index=-1, weights=str(tmp_path / "vgg11_features.pth"), model_kwargs=small)
    assert torch.equal(loaded.body.features_18.weight, state["features.18.weight"])
    assert loaded.weights_report["missing"] == loaded.weights_report["unexpected"] == 0


# --------------------------------------------------------------------------- ProtoTree's iNaturalist ResNet-50


def bbn_state() -> dict[str, torch.Tensor]:
    """A state dict in the layout of BBN.iNaturalist2017.res50.180epoch.best_model.pth, random values.

    DataParallel names (``module.``); the BBN backbone holds the torchvision ResNet-50 stem and layers with
    two blocks in layer4, then the conventional (``cb_block``) and re-balancing (``rb_block``) branches'
    last blocks; the classifier reads both branches (2 x 2048 features, iNaturalist 2017's 5,089 classes).
    """
    gen = torch.Generator().manual_seed(0)
    with torch.device("meta"):
        shapes = _meta_shapes(timm.create_model("resnet50"))
    state = {}
    for key, shape in shapes.items():
        if key.startswith("fc."):
            continue
        value = (
            torch.randn(shape, generator=gen)
            if key.endswith(("weight", "bias", "running_mean"))
            else torch.ones(shape)
            if key.endswith("running_var")
            else torch.zeros(shape, dtype=torch.int64)
        )
        if key.startswith("layer4.2."):
            state["module.backbone.cb_block." + key[len("layer4.2.") :]] = value
            state["module.backbone.rb_block." + key[len("layer4.2.") :]] = value + 1  # unlike cb_block
        else:
            state["module.backbone." + key] = value
    state["module.classifier.weight"] = torch.randn(5089, 4096, generator=gen)
    state["module.classifier.bias"] = torch.zeros(5089)
    return state


@pytest.fixture(scope="module")
def bbn_file(tmp_path_factory) -> tuple[Path, dict[str, torch.Tensor]]:
    state = bbn_state()
    path = tmp_path_factory.mktemp("bbn") / "BBN.iNaturalist2017.res50.180epoch.best_model.pth"
    torch.save(state, path)
    return path, state


def _prototree_teacher_backbone() -> dict:
    recipe = tomllib.loads((RECIPES / "cub_prototree_resnet50.toml").read_text())
    return dict(recipe["stages"]["teacher"]["model"]["backbone"])


def test_prototree_inaturalist_resnet50_loads_strictly_with_the_recipes_mapping(bbn_file):
    path, state = bbn_file
    params = _prototree_teacher_backbone()
    assert Path(params.pop("weights")).name == path.name and params.pop("name") == "timm"
    backbone = TimmBackbone(**params, weights=str(path))
    assert backbone.weights_report["missing"] == backbone.weights_report["unexpected"] == 0
    assert backbone.weights_report["shape"] == 0
    dropped = [k for k in state if k.startswith(("module.backbone.rb_block.", "module.classifier."))]
    assert backbone.weights_report["dropped"] == len(dropped) == 18 + 2  # one bottleneck block, the classifier
    assert torch.equal(backbone.body.layer4[2].conv3.weight, state["module.backbone.cb_block.conv3.weight"])
    assert torch.equal(backbone.body.conv1.weight, state["module.backbone.conv1.weight"])
    assert backbone.out_channels == 2048


def test_bbn_file_without_the_mapping_is_refused_in_one_line(bbn_file):
    with pytest.raises(CheckpointError) as exc:
        TimmBackbone(model="resnet50", out_index=-1, weights=str(bbn_file[0]))
    assert "weights do not fit timm model 'resnet50'" in str(exc.value) and "\n" not in str(exc.value)


def test_mapping_keys_need_a_weights_file():
    with pytest.raises(ValueError) as exc:
        TimmBackbone.check_params({"model": "resnet50", "weights_rename": {"module.": ""}})
    assert exc.value.args[0] == "weights_rename"
    with pytest.raises(ValueError) as exc:
        TimmBackbone.check_params({"model": "resnet50", "weights": "w.pth", "weights_ignore": [""]})
    assert exc.value.args[0] == "weights_ignore"


def test_rename_uses_the_longest_prefix_and_ignore_sees_the_stored_names():
    state = {
        "module.backbone.cb_block.conv1.weight": torch.zeros(1),
        "module.backbone.conv1.weight": torch.zeros(1),
        "module.backbone.rb_block.conv1.weight": torch.zeros(1),
        "module.classifier.bias": torch.zeros(1),
    }
    out, counts = to_timm_layout(
        state,
        {},
        rename={"module.backbone.": "", "module.backbone.cb_block.": "layer4.2."},
        ignore=["module.backbone.rb_block.", "module.classifier."],
    )
    assert sorted(out) == ["conv1.weight", "layer4.2.conv1.weight"] and counts["dropped"] == 2
