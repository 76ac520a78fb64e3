"""The generated reference pages are up to date and nothing public is undocumented."""

from __future__ import annotations

from kdtoolkit import docgen


def test_generated_reference_pages_are_current():
    for path, text in docgen.generate().items():
        assert path.exists(), f"{path} missing: run python -m kdtoolkit.docgen"
        assert path.read_text(encoding="utf-8") == text, f"{path} is out of date: run python -m kdtoolkit.docgen"


def test_every_public_function_and_component_key_is_documented():
    assert docgen.undocumented() == []


def test_component_keys_appear_in_components_page():
    text = (docgen.DOCS / "components.md").read_text(encoding="utf-8")
    for key in ("`prototypes_per_class`", "`mask_source`", "`temperature`", "`image_size`", "`taus`", "`class_specific`"):
        assert key in text


def test_every_recipe_key_is_in_the_recipes_page():
    """Each key the validator accepts has a row (or a mention in backticks) in docs/recipes.md."""
    from pathlib import Path

    from kdtoolkit import recipe

    text = (Path(__file__).resolve().parents[1] / "docs" / "recipes.md").read_text(encoding="utf-8")
    groups = ("TOP_KEYS", "DATA_KEYS", "EVAL_KEYS", "STAGE_KEYS", "MODEL_KEYS", "LOSS_CORE_KEYS", "PHASE_CORE_KEYS",
              "TRAIN_KEYS", "OPTIMIZER_KEYS", "GROUP_KEYS", "SCHEDULER_KEYS")
    missing = [f"{g}: {k}" for g in groups for k in getattr(recipe, g) if f"`{k}`" not in text]
    assert not missing, missing
    for values in (recipe.OPTIMIZERS, recipe.SCHEDULERS, recipe.PRECISIONS, recipe.TEACHER_CACHE):
        assert all(f"`{v}`" in text for v in values), values
