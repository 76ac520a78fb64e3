"""Registers the built-in datasets: ``digits`` (embedded default) and ``image_folder``."""

from __future__ import annotations

from kdtoolkit.hookspecs import hookimpl

from .datasets import digits, image_folder


@hookimpl
def kdt_register_datasets(registry):
    registry.add("digits", digits)
    registry.add("image_folder", image_folder)
