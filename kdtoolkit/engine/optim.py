"""Optimisers and learning-rate schedules as registered components.

Plugins add their own through the ``kdt_register_optimizers`` and
``kdt_register_schedulers`` hooks. An optimiser factory is called as
``factory(param_groups, **params)`` — the groups carry each one's ``lr`` and
``weight_decay`` — and returns a ``torch.optim.Optimizer``. A scheduler
factory is called as ``factory(optimizer, epochs, **params)`` and returns a
``torch.optim.lr_scheduler.LRScheduler`` stepped once per epoch (or ``None``).

The scheduler table's core keys ``warmup_epochs`` and
``warmup_start_factor`` compose a linear warm-up with any schedule: torch's
``LinearLR`` (from ``warmup_start_factor``·lr to lr over ``warmup_epochs``
epochs) chained with the schedule (``ChainedScheduler``: both stepped every
epoch, so milestones count from the phase's first epoch).
"""

from __future__ import annotations

from typing import Any

import torch

from kdtoolkit.plugin.instantiation import build_component, instantiate
from kdtoolkit.plugin.manager import PluginManager
from kdtoolkit.plugin.registry import RESERVED_KEYS
from kdtoolkit.engine.optim_checks import check_adam, check_cosine, check_gamma, check_multistep, check_sgd


def adam(
    params: list[dict[str, Any]], *, betas: list[float] = [0.9, 0.999], eps: float = 1e-8, amsgrad: bool = False
) -> torch.optim.Optimizer:
    """Adam (``torch.optim.Adam``); weight decay per group, added to the gradient (L2).

    :param betas: the two running-average coefficients, each in [0, 1).
    :param eps: the denominator term (> 0).
    :param amsgrad: use the AMSGrad variant.
    """
    return torch.optim.Adam(params, betas=(betas[0], betas[1]), eps=eps, amsgrad=amsgrad)


def adamw(
    params: list[dict[str, Any]], *, betas: list[float] = [0.9, 0.999], eps: float = 1e-8, amsgrad: bool = False
) -> torch.optim.Optimizer:
    """AdamW (``torch.optim.AdamW``): decoupled weight decay per group.

    :param betas: the two running-average coefficients, each in [0, 1).
    :param eps: the denominator term (> 0).
    :param amsgrad: use the AMSGrad variant.
    """
    return torch.optim.AdamW(params, betas=(betas[0], betas[1]), eps=eps, amsgrad=amsgrad)


def sgd(
    params: list[dict[str, Any]], *, momentum: float = 0.9, nesterov: bool = False, dampening: float = 0.0
) -> torch.optim.Optimizer:
    """SGD with momentum (``torch.optim.SGD``); weight decay per group.

    :param momentum: the momentum factor in [0, 1] (the CIFAR KD protocol: 0.9).
    :param nesterov: Nesterov momentum (needs momentum > 0 and dampening 0).
    :param dampening: dampening of the momentum.
    """
    return torch.optim.SGD(params, lr=params[0]["lr"], momentum=momentum, nesterov=nesterov, dampening=dampening)


# torch-free parameter checks (kdtoolkit.engine.optim_checks); a function's attribute, which mypy does not model
adam.check_params = check_adam  # type: ignore[attr-defined]
adamw.check_params = check_adam  # type: ignore[attr-defined]
sgd.check_params = check_sgd  # type: ignore[attr-defined]


def no_schedule(optimizer: torch.optim.Optimizer, epochs: int):
    """A constant learning rate (no schedule)."""
    return None


def step(optimizer: torch.optim.Optimizer, epochs: int, *, step_size: int = 1, gamma: float = 0.1):
    """Multiply the learning rate by ``gamma`` every ``step_size`` epochs (``StepLR``).

    :param step_size: epochs between decays (>= 1).
    :param gamma: the decay factor (> 0).
    """
    return torch.optim.lr_scheduler.StepLR(optimizer, step_size=step_size, gamma=gamma)


def multistep(optimizer: torch.optim.Optimizer, epochs: int, *, milestones: list[int], gamma: float = 0.1):
    """Multiply the learning rate by ``gamma`` at each milestone epoch (``MultiStepLR``);
    the CIFAR-100 KD protocol is ``milestones = [150, 180, 210]``, ``gamma = 0.1``.

    :param milestones: the epochs (counted from the phase's start) after which the rate decays.
    :param gamma: the decay factor (> 0).
    """
    return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=milestones, gamma=gamma)


def cosine(optimizer: torch.optim.Optimizer, epochs: int, *, min_lr: float = 0.0):
    """Cosine annealing over the phase's epochs down to ``min_lr`` (``CosineAnnealingLR``).

    :param min_lr: the final learning rate (>= 0).
    """
    return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(epochs, 1), eta_min=min_lr)


def exponential(optimizer: torch.optim.Optimizer, epochs: int, *, gamma: float = 0.1):
    """Multiply the learning rate by ``gamma`` every epoch (``ExponentialLR``).

    :param gamma: the decay factor (> 0).
    """
    return torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=gamma)


# torch-free parameter checks (kdtoolkit.engine.optim_checks); a function's attribute, which mypy does not model
step.check_params = check_gamma  # type: ignore[attr-defined]
multistep.check_params = check_multistep  # type: ignore[attr-defined]
exponential.check_params = check_gamma  # type: ignore[attr-defined]
cosine.check_params = check_cosine  # type: ignore[attr-defined]

#: Keys of a phase's ``optimizer`` table that are not the optimiser's own parameters.
OPTIMIZER_CORE_KEYS = RESERVED_KEYS["optimizer"]
#: Keys of a phase's ``scheduler`` table that are not the schedule's own parameters.
SCHEDULER_CORE_KEYS = RESERVED_KEYS["scheduler"]


def build_optimizer(
    spec: dict[str, Any], groups: list[dict[str, Any]], plugins: PluginManager
) -> torch.optim.Optimizer:
    """The phase's optimiser over its parameter groups, from its resolved ``optimizer`` table."""
    return instantiate("optimizer", spec, groups, plugins=plugins)


def build_scheduler(spec: dict[str, Any], opt: torch.optim.Optimizer, epochs: int, plugins: PluginManager):
    """The phase's learning-rate schedule (stepped once per epoch), with the warm-up if any, or ``None``."""
    comp = plugins.registry("scheduler").get(spec["name"])
    warmup = spec.get("warmup_epochs", 0)
    if warmup:
        linear = torch.optim.lr_scheduler.LinearLR(
            opt, start_factor=spec["warmup_start_factor"], end_factor=1.0, total_iters=warmup
        )
    main = build_component(comp, spec, opt, epochs)
    if not warmup:
        return main
    return linear if main is None else torch.optim.lr_scheduler.ChainedScheduler([linear, main], optimizer=opt)
