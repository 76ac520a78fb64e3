"""Parameter checks of the built-in optimisers and schedules, kept apart from :mod:`kdtoolkit.engine.optim`.

They import no torch, so that checking a recipe does not either (see
:mod:`kdtoolkit.plugin.schema_cache`). Each raises ``ValueError(key, message)``.
"""

from __future__ import annotations


def _betas(params: dict) -> None:
    betas = params["betas"]
    if len(betas) != 2 or not all(0 <= b < 1 for b in betas):
        raise ValueError("betas", f"expected two numbers in [0, 1), got {betas}")


def check_adam(params: dict) -> None:
    """The parameters of ``adam`` and ``adamw``: two ``betas`` in [0, 1), ``eps`` > 0."""
    _betas(params)
    if params["eps"] <= 0:
        raise ValueError("eps", f"must be > 0, got {params['eps']}")


def check_sgd(params: dict) -> None:
    """The parameters of ``sgd``: ``momentum`` in [0, 1]; Nesterov momentum needs momentum > 0 and no dampening."""
    if not 0 <= params["momentum"] <= 1:
        raise ValueError("momentum", f"must be in [0, 1], got {params['momentum']}")
    if params["nesterov"] and (params["momentum"] <= 0 or params["dampening"] != 0):
        raise ValueError("nesterov", "Nesterov momentum needs momentum > 0 and dampening = 0")


def check_gamma(params: dict) -> None:
    """The parameters of ``step`` and ``exponential``: ``gamma`` > 0, ``step_size`` >= 1."""
    if params["gamma"] <= 0:
        raise ValueError("gamma", f"must be > 0, got {params['gamma']}")
    if params.get("step_size", 1) < 1:
        raise ValueError("step_size", f"must be >= 1, got {params['step_size']}")


def check_multistep(params: dict) -> None:
    """The parameters of ``multistep``: ``gamma`` > 0 and increasing ``milestones`` >= 1."""
    check_gamma(params)
    ms = params["milestones"]
    if not ms or any(m < 1 for m in ms) or sorted(set(ms)) != ms:
        raise ValueError("milestones", f"expected increasing epochs >= 1, got {ms}")


def check_cosine(params: dict) -> None:
    """The parameters of ``cosine``: ``min_lr`` >= 0."""
    if params["min_lr"] < 0:
        raise ValueError("min_lr", f"must be >= 0, got {params['min_lr']}")
