"""The shared prototype layer: what every prototype architecture and method uses.

Owns:

- :mod:`.functional`: the patch distances (squared L2, true L2), ProtoPNet's similarity, min-pooling
  with the argmin location, the streaming projection ("push") and the input checks;
- :mod:`.protocol`: the prototype-head protocol, what a method needs from a head;
- :mod:`.receptive_field`: receptive fields of latent locations (ProtoPNet's formula);
- :mod:`.figures`: the activation box and the PNG of prototypes after a push or projection;
- :mod:`.explain`: explanation building blocks (activation maps, boxes, patch flags, a prototype's
  source and view, the greedy path of a tree);
- :mod:`.sheet`: figures laid out in pixels.

Architectures (``kdt_protopnet``, ``kdt_prototree``) and methods (``kdt_proto2proto``) depend on this
package and never on each other; this package imports none of them (a head's kind is told by what it
provides, e.g. a tree head has ``leaves`` and ``depth``). It registers no components and has no entry
point.

The public API is what this module exports (``__all__``); names are imported lazily, so importing the
package imports neither torch nor matplotlib until a name that needs them is used.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    # functional
    "LN2": "functional",
    "as_matrix": "functional",
    "check_latent": "functional",
    "squared_l2_distances": "functional",
    "l2_distances": "functional",
    "min_pool_distances": "functional",
    "distance_to_similarity": "functional",
    "ProjectionResult": "functional",
    "PrototypeProjector": "functional",
    # protocol
    "prototype_head": "protocol",
    "prototype_matrix": "protocol",
    "missing": "protocol",
    # receptive fields
    "RFInfo": "receptive_field",
    "rf_box": "receptive_field",
    "model_rf_info": "receptive_field",
    "proto_layer_rf_info": "receptive_field",
    "backbone_layers": "receptive_field",
    # figures
    "activation_box": "figures",
    "prototype_boxes": "figures",
    "prototype_figure": "figures",
    # explanation building blocks
    "PrototypeSource": "explain",
    "PrototypeView": "explain",
    "heat_overlay": "explain",
    "display_image": "explain",
    "upsample_map": "explain",
    "patch_flags": "explain",
    "similarity_maps": "explain",
    "sources_from_record": "explain",
    "nearest_patches": "explain",
    "explain_prototypes": "explain",
    "explain_image": "explain",
    "greedy_path": "explain",
    "is_tree": "explain",
    # sheets
    "Sheet": "sheet",
    "boxed_tile": "sheet",
    "crop_tile": "sheet",
    "fit": "sheet",
    "tile_scale": "sheet",
    "zoom": "sheet",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
