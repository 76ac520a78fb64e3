"""The generated reference pages are up to date and nothing public is undocumented."""

from __future__ import annotations

from kdtoolkit.cli import docgen


def test_generated_reference_pages_are_current():
    for path, text in docgen.generate().items():
        assert path.exists(), f"{path} missing: run python -m kdtoolkit.cli.docgen"
        assert path.read_text(encoding="utf-8") == text, f"{path} is out of date: run python -m kdtoolkit.cli.docgen"


def test_every_public_function_and_component_key_is_documented():
    assert docgen.undocumented() == []


def test_component_keys_appear_in_components_page():
    text = (docgen.DOCS / "components.md").read_text(encoding="utf-8")
    for key in (
        "`prototypes_per_class`",
        "`mask_source`",
        "`temperature`",
        "`image_size`",
        "`taus`",
        "`class_specific`",
    ):
        assert key in text


def test_every_recipe_key_is_in_the_recipes_page():
    """Each key the validator accepts has a row (or a mention in backticks) in docs/recipes.md,
    and so do the built-in optimisers and schedules with their keys."""
    from pathlib import Path

    from kdtoolkit.recipe import stage_checks as validate_stage, validator as validate
    from kdtoolkit.plugin.manager import get_manager

    text = (Path(__file__).resolve().parents[1] / "docs" / "recipes.md").read_text(encoding="utf-8")
    groups = [(validate, g) for g in ("TOP_KEYS", "DATA_KEYS", "EVAL_KEYS")]
    groups += [
        (validate_stage, g)
        for g in (
            "STAGE_KEYS",
            "MODEL_KEYS",
            "LOSS_CORE_KEYS",
            "PHASE_CORE_KEYS",
            "TRAIN_KEYS",
            "GROUP_KEYS",
            "OPTIMIZER_CORE_KEYS",
            "SCHEDULER_CORE_KEYS",
        )
    ]
    missing = [f"{g}: {k}" for mod, g in groups for k in getattr(mod, g) if f"`{k}`" not in text]
    assert not missing, missing
    for values in (validate.PRECISIONS, validate_stage.TEACHER_CACHE):
        assert all(f"`{v}`" in text for v in values), values
    pm = get_manager()
    for kind in ("optimizer", "scheduler"):
        for comp in pm.registry(kind):
            if comp.owner != "kdt.core":
                continue
            assert f"`{comp.name}`" in text, comp.name
            assert all(f"`{p}`" in text for p in comp.params), (comp.name, list(comp.params))
