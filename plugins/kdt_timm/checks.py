"""Parameter checks of the timm backbone, kept apart from :mod:`kdt_timm.backbone`.

They import neither torch nor timm (model names come from the cached list of
:mod:`kdt_timm.names`), so that checking a recipe does not either (see
:mod:`kdtoolkit.plugin.schema_cache` and ``docs/plugins.md``). Each raises
``ValueError(key, message)``.
"""

from __future__ import annotations

#: ``timm.create_model`` arguments the plugin sets itself (not allowed in ``model_kwargs``).
OWN_KWARGS = {
    "pretrained": "pretrained",
    "features_only": "classifier",
    "out_indices": "out_index",
    "num_classes": "classifier",
    "drop_path_rate": "drop_path_rate",
    "pretrained_cfg_overlay": "weights",
    "checkpoint_path": "weights",
}


def check_backbone_params(params: dict) -> None:
    """Validation before anything is built: the model exists, arguments do not clash."""
    from .names import is_model, similar

    name = params["model"]
    if not is_model(name):  # from the cached list of timm's names: validation does not import timm
        close = similar(name)
        hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise ValueError("model", f"unknown timm model {name!r}{hint}")
    if params.get("pretrained") and params.get("weights"):
        raise ValueError("weights", "set either pretrained = true or weights, not both")
    for key in ("weights_rename", "weights_ignore"):
        if params.get(key) and not params.get("weights"):
            raise ValueError(key, "applies to a weights file: set weights too")
    for prefix in params.get("weights_ignore") or []:
        if not prefix:
            raise ValueError("weights_ignore", "an empty prefix would drop every key")
    for key in params.get("model_kwargs") or {}:
        if key in OWN_KWARGS:
            raise ValueError("model_kwargs", f"'{key}' is set by the backbone itself (use its key '{OWN_KWARGS[key]}')")
