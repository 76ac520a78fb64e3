"""Registers the built-in datasets: ``digits`` (embedded default) and ``image_folder``."""

from __future__ import annotations

from kdtoolkit.hookspecs import hookimpl


@hookimpl
def kdt_register_datasets(registry):
    registry.add("digits", "kdt_data.datasets:digits")
    registry.add("image_folder", "kdt_data.datasets:image_folder")
