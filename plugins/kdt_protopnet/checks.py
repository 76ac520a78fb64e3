"""Parameter checks of the ProtoPNet head and the push phase, kept apart from the modules that define them.

They import no torch, so that checking a recipe does not either (see
:mod:`kdtoolkit.schemas` and ``docs/plugins.md``). Each raises
``ValueError(key, message)``.
"""

from __future__ import annotations


def check_head_params(params: dict) -> None:
    """At least one prototype per class, a positive prototype depth."""
    if params["prototypes_per_class"] < 1:
        raise ValueError("prototypes_per_class", f"must be >= 1, got {params['prototypes_per_class']}")
    if params["prototype_depth"] < 1:
        raise ValueError("prototype_depth", f"must be >= 1, got {params['prototype_depth']}")


def check_push_params(params: dict) -> None:
    """A batch size, when given, of at least 1."""
    if params["batch_size"] is not None and params["batch_size"] < 1:
        raise ValueError("batch_size", f"must be >= 1, got {params['batch_size']}")
