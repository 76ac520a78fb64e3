"""The paper recipes (kdtoolkit/recipes/paper/): each validates, and each runs end to end on tiny generated
datasets in the official layouts, shrunk with --set overrides (32 px, small random-init backbones, one batch
per epoch and one epoch per phase); ProtoTree's teacher loads a synthetic iNaturalist ResNet-50 file through
the recipe's own key mapping."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kdtoolkit.recipe.catalog import RECIPES_DIR
from kdtoolkit.cli.commands import main
from kdtoolkit.recipe.loader import load_recipe
from kdtoolkit.testing import run_recipe
from kdtoolkit.recipe.validator import deep_merge
from test_paper_backbones import bbn_state
from test_paper_datasets import make_cars, make_cub

try:
    import tomllib
except ModuleNotFoundError:  # Python < 3.11
    import tomli as tomllib

PAPER = RECIPES_DIR / "paper"
RECIPES = {  # recipe -> dataset builder
    "cars_resnet50_resnet18": make_cars,
    "cub_vgg19_vgg11": make_cub,
    "cub_vgg19_vgg16": make_cub,
    "cub_prototree_resnet50": make_cub,
}
STAGES = ["teacher", "baseline", "kd", "kd_no_global", "kd_no_ppc"]
SMALL = '{ name = "timm", model = "resnet10t", out_index = -1 }'


def _raw(path: Path) -> dict:
    """The recipe's own tables, with ``extends`` merged (as the loader merges them)."""
    data = tomllib.loads(path.read_text())
    parent = data.pop("extends", None)
    return deep_merge(_raw(path.parent / parent), data) if parent else data


def _shrink(raw: dict, root: Path, weights: Path | None) -> list[str]:
    """--set overrides: fixture data at 32 px, small backbones and trees, 1 batch x 1 epoch per train phase."""
    out = [
        f"data.root={root}",
        "data.image_size=32",
        "data.batch_size=2",
        "data.eval_batch_size=8",
        "data.num_workers=0",
    ]
    for name, stage in raw["stages"].items():
        backbone = stage.get("model", {}).get("backbone")
        if backbone is not None and "weights" in backbone:  # the teacher of ProtoTree: the recipe's own mapping
            out.append(f"stages.{name}.model.backbone.weights={weights}")
        elif backbone is not None:
            out.append(f"stages.{name}.model.backbone={SMALL}")
        if stage.get("model", {}).get("head", {}).get("name") == "prototree":
            out += [f"stages.{name}.model.head.depth=2", f"stages.{name}.model.head.prototype_depth=16"]
        if "batch_size" in stage.get("data", {}):
            out.append(f"stages.{name}.data.batch_size=2")
        for i, phase in enumerate(stage.get("phases", [])):
            if phase.get("kind", "train") == "train":
                out += [f"stages.{name}.phases[{i}].epochs=1", f"stages.{name}.phases[{i}].limit_batches=1"]
            elif phase["kind"] in ("push", "project"):
                out.append(f"stages.{name}.phases[{i}].figure=false")  # the figures take most of a tiny run
    return out


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: these tiny models only lose to thread synchronisation (20x slower on a busy
    2-core machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def bbn(tmp_path_factory) -> Path:
    """A file in the layout of ProtoTree's iNaturalist ResNet-50 (see tests/test_paper_backbones.py)."""
    path = tmp_path_factory.mktemp("weights") / "BBN.iNaturalist2017.res50.180epoch.best_model.pth"
    torch.save(bbn_state(), path)
    return path


@pytest.mark.parametrize("recipe", RECIPES)
def test_paper_recipe_validates(recipe, bbn):
    weights = [f"stages.teacher.model.backbone.weights={bbn}"] if "prototree" in recipe else []
    rec = load_recipe(PAPER / f"{recipe}.toml", weights)
    assert rec.order == STAGES
    for name in STAGES:
        stage = rec.stage(name)
        assert stage["data"]["image_size"] == 224
        assert stage["model"]["backbone"]["out_index"] == -1  # the 7x7 grid (tests/test_paper_backbones.py)
    weights = {name: {loss["id"]: loss["weight"] for loss in rec.stage(name)["losses"]} for name in STAGES[2:]}
    assert rec.stage("kd")["teacher"] == "teacher" and rec.stage("baseline")["compare_to"] == "teacher"
    assert weights["kd"]["global_explanation"] == weights["kd"]["patch_prototype_correspondence"] == 10.0
    assert weights["kd_no_global"]["global_explanation"] == weights["kd_no_ppc"]["patch_prototype_correspondence"] == 0


# cub_vgg19_vgg16 differs from cub_vgg19_vgg11 only in the student backbones, which the run replaces.
@pytest.mark.parametrize("recipe", [r for r in RECIPES if r != "cub_vgg19_vgg16"])
def test_paper_recipe_runs_on_tiny_data(recipe, tmp_path, bbn):
    path = PAPER / f"{recipe}.toml"
    root = RECIPES[recipe](tmp_path / "data")
    results = run_recipe(path, _shrink(_raw(path), root, bbn), out=tmp_path / "run")
    assert list(results["stages"]) == STAGES, results
    for name in STAGES:
        assert 0.0 <= results["stages"][name]["accuracy"] <= 1.0, results["stages"][name]
    assert (tmp_path / "run" / "results.md").is_file()


def test_missing_data_is_one_line_naming_the_folder(tmp_path, capsys):
    code = main(["run", "paper/cars_resnet50_resnet18", "--out", str(tmp_path / "run"), "-q"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert str(PAPER / "data" / "stanford_cars") in err and "Traceback" not in err
    assert (
        "put the Stanford Cars folder (https://ai.stanford.edu/" in err
        and "--set data.root=PATH" in err
        and "--data root=PATH" in err
    )
    assert not (tmp_path / "run").exists()  # the preflight stops before anything is written
