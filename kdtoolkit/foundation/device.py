"""Devices and mixed precision: the one place that knows device names.

``auto`` picks CUDA when it is available and the CPU otherwise; the core names CUDA
nowhere else (the distributed module picks nccl for CUDA tensors). :data:`DEVICE_PATTERN` is the spelling a
recipe's ``device`` key and every ``--device`` option accept.
"""

from __future__ import annotations

import contextlib
import re
from typing import TYPE_CHECKING

from kdtoolkit.foundation.errors import KdtError

if TYPE_CHECKING:  # torch is imported where it is used: validation and the CLI start without it
    import torch

#: The accepted device spellings: ``auto``, ``cpu``, ``mps``, ``cuda`` or ``cuda:N``.
DEVICE_PATTERN = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")
#: How :data:`DEVICE_PATTERN` reads in an error message.
DEVICE_CHOICES = "auto, cpu, cuda, cuda:N or mps"


def check_device_spec(spec: str, source: str, key: str | None = None) -> str:
    """``spec`` when it is a device spelling kdtoolkit accepts.

    :param spec: the text given (``auto``, ``cpu``, ``cuda:1``, ...).
    :param source: where it came from, for the error (``--device``, a file).
    :param key: the key inside ``source``, if any.
    :raises KdtError: naming ``source`` and ``key`` otherwise.
    """
    if not isinstance(spec, str) or not DEVICE_PATTERN.match(spec):
        raise KdtError(f"expected {DEVICE_CHOICES}, got {spec!r}", source=source, key=key)
    return spec


def resolve_device(spec: str) -> torch.device:
    """``auto`` → CUDA if available, else CPU; otherwise the named device.

    :raises KdtError: when the named device is not available.
    """
    import torch

    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(spec)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise KdtError(f"device '{spec}' requested but CUDA is not available (use --device cpu or auto)")
    if dev.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise KdtError(f"device '{spec}' requested but MPS is not available")
    return dev


def full_precision(device_type: str):
    """A context that turns autocast off where it is on (a head's float32 region), else does nothing.

    Entering ``torch.autocast(enabled=False)`` unconditionally would put an
    autocast node into graphs that :func:`torch.export.export` captures even
    when no autocast is active, and some such graphs fail to load.

    :param device_type: ``cpu``, ``cuda``, ... (a tensor's ``device.type``).
    """
    import torch

    try:
        enabled = torch.is_autocast_enabled(device_type)
    except TypeError:  # torch < 2.4: no device argument
        enabled = torch.is_autocast_cpu_enabled() if device_type == "cpu" else torch.is_autocast_enabled()
    if enabled:
        return torch.autocast(device_type=device_type, enabled=False)
    return contextlib.nullcontext()


def autocast(device: torch.device, precision: str):
    """Autocast context for ``bf16``/``fp16``; a no-op for ``fp32``."""
    if precision == "fp32":
        return contextlib.nullcontext()
    import torch

    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def collective_device(device: torch.device) -> torch.device | None:
    """Where small collective tensors live: the GPU for CUDA runs (nccl), else the CPU (gloo)."""
    return device if device.type == "cuda" else None
