"""The one parameter check of the classic bundle that rules cannot state, kept apart from its modules.

Every other check and tap declaration of the bundle is declared on its class, as data the schema
cache keeps (:class:`~kdtoolkit.plugin.params.ParamChecks`, :class:`~kdtoolkit.plugin.params.TapsFrom`).
A check across keys is a function; it lives here, in a module that imports no torch, so that
checking a recipe does not either (see ``docs/plugins.md``, "Parameter checks"). It raises
``ValueError(key, message)``.
"""

from __future__ import annotations


def check_attention_pairs(params: dict) -> None:
    """As many teacher taps as student taps (``taps`` and ``teacher_taps``, paired in order)."""
    if len(params["teacher_taps"]) != len(params["taps"]):
        raise ValueError(
            "teacher_taps",
            f"must pair the {len(params['taps'])} student taps in order, got {len(params['teacher_taps'])}",
        )
