"""Parameter checks of the Proto2Proto losses, kept apart from the modules that define them.

They import no torch, so that checking a recipe does not either (see
:mod:`kdtoolkit.plugin.schema_cache` and ``docs/plugins.md``). Each raises
``ValueError(key, message)``.
"""

from __future__ import annotations


def check_correspondence_params(params: dict) -> None:
    """``tau`` (the correspondence loss's distance threshold) is positive."""
    if not params["tau"] > 0:
        raise ValueError("tau", f"must be > 0, got {params['tau']}")


def check_tree_kd_params(params: dict) -> None:
    """``temperature`` is positive."""
    if not params["temperature"] > 0:
        raise ValueError("temperature", f"must be > 0, got {params['temperature']}")
