"""The prototype-head protocol: what a prototype method needs from a head.

Proto2Proto's losses and metrics (``kdt_proto2proto``) work with any head that provides

- ``prototypes``: a parameter ``[P, D]`` (or ``[P, D, 1, 1]``), one row per prototype;
- ``latent(features)``: the add-on output ``z`` ``[B, D, H, W]`` for backbone features;
- forward outputs ``min_distances`` ``[B, P]`` (each prototype's smallest
  patch distance, in the head's own units), ``argmin`` ``[B, P]`` (its flat
  location ``h·W + w``) and ``features`` (``z`` itself);
- ``record_keys`` containing ``min_distances`` and ``argmin``, and
  ``record_meta(outputs)`` returning the latent grid ``{"H": h, "W": w}``.

The ProtoPNet head (``kdt_protopnet``) and the ProtoTree head
(``kdt_prototree``) both do; a third-party head that does works unchanged.
"""

from __future__ import annotations

from typing import Any

__all__ = ["OUTPUTS", "ATTRIBUTES", "missing", "prototype_head", "prototype_matrix"]

#: Forward outputs a prototype head produces.
OUTPUTS = ("min_distances", "argmin", "features")
#: Attributes a prototype head has.
ATTRIBUTES = ("prototypes", "latent", "record_meta")


def missing(head: Any) -> list[str]:
    """What ``head`` lacks of the protocol (empty when it satisfies it)."""
    lacks = [a for a in ATTRIBUTES if not hasattr(head, a)]
    outputs = set(getattr(head, "outputs", ()))
    lacks += [f"output '{o}'" for o in OUTPUTS if o not in outputs]
    return lacks


def prototype_head(model: Any, who: str = "student", use: str = "this loss") -> Any:
    """The model's head, checked against the protocol.

    :raises ValueError: one line naming what the head lacks.
    """
    head = model.head
    lacks = missing(head)
    if lacks:
        raise ValueError(
            f"{use} needs a prototype head; the {who}'s {type(head).__name__} lacks {', '.join(lacks)} "
            "(see the prototype-head protocol in docs/prototree.md)"
        )
    return head


def prototype_matrix(head: Any) -> Any:
    """The head's prototypes as ``[P, D]``."""
    p = head.prototypes
    return p.flatten(1) if p.dim() == 4 else p
