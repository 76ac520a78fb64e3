"""Parameter checks (and the taps they declare) of the classic bundle, kept apart from its modules.

They import no torch, so that checking a recipe does not either (see
:mod:`kdtoolkit.plugin.schema_cache` and ``docs/plugins.md``). Each check raises
``ValueError(key, message)``; the ``*_tap*`` functions give the taps a
loss reads, from its parameters.
"""

from __future__ import annotations


def _positive(params: dict, *keys: str) -> None:
    for k in keys:
        if not params[k] > 0:
            raise ValueError(k, f"must be > 0, got {params[k]}")


def _non_negative(params: dict, *keys: str) -> None:
    for k in keys:
        if not params[k] >= 0:
            raise ValueError(k, f"must be >= 0, got {params[k]}")


def _tap_names(params: dict, *keys: str) -> None:
    for k in keys:
        if not params[k]:
            raise ValueError(k, "must name a tap declared in the stage")


def check_paired_taps_params(params: dict) -> None:
    """The tap names are not empty."""
    _tap_names(params, "student_tap", "teacher_tap")


def check_cross_entropy_params(params: dict) -> None:
    """``label_smoothing`` lies in [0, 1)."""
    if not 0 <= params["label_smoothing"] < 1:
        raise ValueError("label_smoothing", f"must be in [0, 1), got {params['label_smoothing']}")


def check_hinton_kd_params(params: dict) -> None:
    """``temperature`` is positive."""
    _positive(params, "temperature")


def check_dkd_params(params: dict) -> None:
    """Weights non-negative, temperature positive, warm-up non-negative."""
    _non_negative(params, "alpha", "beta", "warmup_epochs")
    _positive(params, "temperature")


def check_dist_params(params: dict) -> None:
    """Weights non-negative, temperature positive."""
    _non_negative(params, "beta", "gamma")
    _positive(params, "temperature")


def check_attention_params(params: dict) -> None:
    """At least one pair, as many teacher taps as student taps, ``p`` positive."""
    if not params["taps"]:
        raise ValueError("taps", "name at least one student tap")
    if len(params["teacher_taps"]) != len(params["taps"]):
        raise ValueError(
            "teacher_taps",
            f"must pair the {len(params['taps'])} student taps in order, got {len(params['teacher_taps'])}",
        )
    _positive(params, "p")


def check_rkd_params(params: dict) -> None:
    """Tap names given, weights non-negative."""
    check_paired_taps_params(params)
    _non_negative(params, "distance_weight", "angle_weight")


def check_crd_params(params: dict) -> None:
    """Tap names given; ``feat_dim``, ``nce_k`` >= 1; ``nce_t`` > 0; ``nce_m`` in [0, 1]."""
    check_paired_taps_params(params)
    for k in ("feat_dim", "nce_k"):
        if params[k] < 1:
            raise ValueError(k, f"must be >= 1, got {params[k]}")
    _positive(params, "nce_t")
    if not 0 <= params["nce_m"] <= 1:
        raise ValueError("nce_m", f"must be in [0, 1], got {params['nce_m']}")


def check_linear_head_params(params: dict) -> None:
    """``dropout`` lies in [0, 1)."""
    if not 0 <= params["dropout"] < 1:
        raise ValueError("dropout", f"must be in [0, 1), got {params['dropout']}")


def student_tap(params: dict) -> tuple[str, ...]:
    """The student tap of a loss reading one pair of taps (``student_tap``)."""
    return (params["student_tap"],)


def teacher_tap(params: dict) -> tuple[str, ...]:
    """The teacher tap of a loss reading one pair of taps (``teacher_tap``)."""
    return (params["teacher_tap"],)


def student_taps_list(params: dict) -> tuple[str, ...]:
    """The student taps of a loss reading a list of them (``taps``)."""
    return tuple(params["taps"])


def teacher_taps_list(params: dict) -> tuple[str, ...]:
    """The teacher taps of a loss reading a list of them (``teacher_taps``)."""
    return tuple(params["teacher_taps"])
