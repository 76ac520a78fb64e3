"""Recipes: loading, ``extends``, ``--set`` overrides, validation and the resolved recipe.

Owns TOML loading and the resolved recipe (:mod:`.loader`: :class:`Recipe`, :func:`load_recipe`), complete
validation as one validator in three layers (:mod:`.checks`: the primitives; :mod:`.stage_checks`: one
stage; :mod:`.validator`: the recipe as a whole) and the recipes
shipped inside the package (:mod:`.catalog`).

May import: :mod:`kdtoolkit.plugin`, :mod:`kdtoolkit.foundation`.

The public API is what this module exports (``__all__``); names are imported lazily, so importing
the package costs nothing until one is used.
"""

from __future__ import annotations

from kdtoolkit.foundation.lazy import lazy_exports

_EXPORTS = {
    "RECIPES_DIR": "catalog",
    "packaged_recipes": "catalog",
    "resolve_recipe": "catalog",
    "Recipe": "loader",
    "MAX_DEPTH": "loader",
    "check_depth": "loader",
    "key_string": "loader",
    "parse_key_path": "loader",
    "parse_override_value": "loader",
    "apply_override": "loader",
    "load_recipe": "loader",
    "Checks": "checks",
    "STAGE_KEYS": "stage_checks",
    "TEACHER_CACHE": "stage_checks",
    "MODEL_KEYS": "stage_checks",
    "LOSS_CORE_KEYS": "stage_checks",
    "PHASE_CORE_KEYS": "stage_checks",
    "TRAIN_KEYS": "stage_checks",
    "GROUP_KEYS": "stage_checks",
    "OPTIMIZER_CORE_KEYS": "stage_checks",
    "SCHEDULER_CORE_KEYS": "stage_checks",
    "StageChecks": "stage_checks",
    "PRECISIONS": "validator",
    "TOP_KEYS": "validator",
    "DATA_KEYS": "validator",
    "EVAL_KEYS": "validator",
    "deep_merge": "validator",
    "Validator": "validator",
}

__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
