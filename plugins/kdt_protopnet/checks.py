"""Parameter checks of the ProtoPNet head and the push phase, kept apart from the modules that define them.

They import no torch, so that checking a recipe does not either (see
:mod:`kdtoolkit.plugin.schema_cache` and ``docs/plugins.md``). Each raises
``ValueError(key, message)``.
"""

from __future__ import annotations

from kdtoolkit.plugin import MAX_BATCH_SIZE

#: The most prototypes per class, the deepest prototype and the largest push batch: bounds that
#: refuse at validation a value that would only fail allocating memory at run time.
MAX_PROTOTYPES_PER_CLASS = 4096
MAX_PROTOTYPE_DEPTH = 65536


def check_head_params(params: dict) -> None:
    """1 to 4096 prototypes per class, a prototype depth from 1 to 65536."""
    if not 1 <= params["prototypes_per_class"] <= MAX_PROTOTYPES_PER_CLASS:
        raise ValueError(
            "prototypes_per_class",
            f"must be from 1 to {MAX_PROTOTYPES_PER_CLASS}, got {params['prototypes_per_class']}",
        )
    if not 1 <= params["prototype_depth"] <= MAX_PROTOTYPE_DEPTH:
        raise ValueError("prototype_depth", f"must be from 1 to {MAX_PROTOTYPE_DEPTH}, got {params['prototype_depth']}")


def check_push_params(params: dict) -> None:
    """A batch size, when given, from 1 to 65536."""
    if params["batch_size"] is not None and not 1 <= params["batch_size"] <= MAX_BATCH_SIZE:
        raise ValueError("batch_size", f"must be from 1 to {MAX_BATCH_SIZE}, got {params['batch_size']}")
