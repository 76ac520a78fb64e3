"""Parameter checks of the ProtoTree head and phases, kept apart from the modules that define them.

They import no torch, so that checking a recipe does not either (see
:mod:`kdtoolkit.plugin.schema_cache` and ``docs/plugins.md``). Each raises
``ValueError(key, message)``.
"""

from __future__ import annotations

from kdtoolkit.plugin import MAX_BATCH_SIZE

#: The deepest tree the head builds (2**depth leaves).
MAX_DEPTH = 16
#: The deepest prototype and the largest projection batch: bounds that refuse at validation a
#: value that would only fail allocating memory at run time.
MAX_PROTOTYPE_DEPTH = 65536


def check_head_params(params: dict) -> None:
    """``depth`` an integer in [1, MAX_DEPTH], a positive prototype depth, a known leaf optimisation."""
    depth = params["depth"]
    if isinstance(depth, bool) or not isinstance(depth, int) or not 1 <= depth <= MAX_DEPTH:
        raise ValueError("depth", f"must be an integer in [1, {MAX_DEPTH}], got {depth!r}")
    if not 1 <= params["prototype_depth"] <= MAX_PROTOTYPE_DEPTH:
        raise ValueError("prototype_depth", f"must be from 1 to {MAX_PROTOTYPE_DEPTH}, got {params['prototype_depth']}")
    if params["leaves"] not in ("derivative_free", "gradient"):
        raise ValueError("leaves", f"must be 'derivative_free' or 'gradient', got {params['leaves']!r}")


def check_prune_params(params: dict) -> None:
    """``threshold`` in [0, 1)."""
    if not 0 <= params["threshold"] < 1:
        raise ValueError("threshold", f"must be in [0, 1), got {params['threshold']}")


def check_project_params(params: dict) -> None:
    """A batch size, when given, from 1 to 65536."""
    if params["batch_size"] is not None and not 1 <= params["batch_size"] <= MAX_BATCH_SIZE:
        raise ValueError("batch_size", f"must be from 1 to {MAX_BATCH_SIZE}, got {params['batch_size']}")
