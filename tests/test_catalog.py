"""Recipes shipped in the package: ``kdt recipes`` and ``kdt run NAME`` from any directory."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from kdtoolkit.recipe.catalog import RECIPES_DIR, packaged_recipes

REPO = Path(__file__).resolve().parents[1]


def _kdt(args, cwd):
    return subprocess.run(
        [sys.executable, "-m", "kdtoolkit", *args], capture_output=True, text=True, cwd=cwd, timeout=300
    )


def test_the_repository_recipes_are_the_shipped_ones():
    assert (REPO / "recipes").resolve() == RECIPES_DIR
    names = [r["name"] for r in packaged_recipes()]
    assert names == [
        "classic_kd",
        "kd_methods",
        "proto2proto",
        "prototree",
        "paper/cars_resnet50_resnet18",
        "paper/cub_prototree_resnet50",
        "paper/cub_vgg19_vgg11",
        "paper/cub_vgg19_vgg16",
    ]
    assert all(r["description"] for r in packaged_recipes())


def test_kdt_recipes_lists_them(tmp_path):
    proc = _kdt(["recipes", "--json"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    listed = json.loads(proc.stdout)
    assert [r["name"] for r in listed] == [r["name"] for r in packaged_recipes()]
    table = _kdt(["recipes"], tmp_path).stdout
    assert "| proto2proto | Proto2Proto on scikit-learn's digits" in table


def test_a_recipe_name_works_from_any_directory(tmp_path):
    proc = _kdt(["validate", "proto2proto", "--set", "stages.teacher.phases[1].epochs=2"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert (
        proc.stdout.splitlines()[0] == f"# {RECIPES_DIR / 'proto2proto.toml'}: valid; stages in order: "
        "teacher, baseline, kd, kd_no_global, kd_no_ppc"
    )
    bad = _kdt(["validate", "protopnet"], tmp_path)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1
    assert "no shipped recipe of that name (did you mean 'proto2proto'?)" in bad.stderr
    # a file of that name in the working directory wins over the shipped recipe
    (tmp_path / "proto2proto").write_text((RECIPES_DIR / "classic_kd.toml").read_text())
    local = _kdt(["validate", "proto2proto"], tmp_path)
    assert local.returncode == 0 and local.stdout.startswith(
        "# proto2proto: valid; stages in order: teacher, student, kd"
    )


def test_recipes_in_a_sub_folder_are_named_by_their_path(tmp_path):
    proc = _kdt(["validate", "paper/cub_vgg19_vgg11"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"# {RECIPES_DIR / 'paper' / 'cub_vgg19_vgg11.toml'}: valid")
    assert "| paper/cars_resnet50_resnet18 | Proto2Proto paper, Stanford Cars" in _kdt(["recipes"], tmp_path).stdout
    for wrong, hint in (
        ("paper/cars_resnet50_resnet81", "paper/cars_resnet50_resnet18"),
        ("cars_resnet50_resnet18", "paper/cars_resnet50_resnet18"),
    ):
        bad = _kdt(["validate", wrong], tmp_path)
        assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1, bad.stderr
        assert f"no shipped recipe of that name (did you mean '{hint}'?)" in bad.stderr
