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
