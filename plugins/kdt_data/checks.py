"""Parameter checks of the built-in datasets, kept apart from the modules that define them.

They import no torch (nor Pillow), so that checking a recipe does not either
(see :mod:`kdtoolkit.plugin.schema_cache` and ``docs/plugins.md``). Each raises
``ValueError(key, message)``; ``kdt validate`` reports it naming the recipe
key. The factories check the same again when called directly.
"""

from __future__ import annotations

#: The largest ``image_size`` of the image datasets (``image_folder``, ``cub200``, ``stanford_cars``).
MAX_IMAGE_SIZE = 4096
#: The largest ``image_size`` of ``digits``: its splits are upsampled once and kept in memory
#: (1437 training images of 512² floats take 1.5 GB).
MAX_DIGITS_IMAGE_SIZE = 512
#: The largest ``resize`` of ``image_folder`` (the shorter side before cropping).
MAX_RESIZE = 2 * MAX_IMAGE_SIZE


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_image_size(value, least: int = 1, most: int = MAX_IMAGE_SIZE) -> None:
    """``image_size`` is an integer in ``[least, most]``."""
    if not _is_int(value) or not least <= value <= most:
        raise ValueError("image_size", f"must be an integer from {least} to {most}, got {value!r}")


def _check_mean_std(params: dict) -> None:
    for key in ("mean", "std"):
        values = params[key]
        if not isinstance(values, (list, tuple)) or len(values) != 3:
            raise ValueError(key, f"must be a list of 3 numbers (R, G, B), got {values!r}")
    if any(float(v) <= 0 for v in params["std"]):
        raise ValueError("std", f"values must be positive, got {list(params['std'])!r}")


def _check_cache_mb(params: dict) -> None:
    if params["cache_mb"] < 0:
        raise ValueError("cache_mb", f"must be >= 0 (MiB; 0 turns the cache off), got {params['cache_mb']}")


def check_digits_params(params: dict) -> None:
    """``image_size`` from 8 to :data:`MAX_DIGITS_IMAGE_SIZE`; ``test_fraction`` between 0 and 1."""
    check_image_size(params["image_size"], 8, MAX_DIGITS_IMAGE_SIZE)
    if not 0.0 < float(params["test_fraction"]) < 1.0:
        raise ValueError("test_fraction", f"must be between 0 and 1 (exclusive), got {params['test_fraction']!r}")


def check_image_folder_params(params: dict) -> None:
    """``image_size`` from 1 to :data:`MAX_IMAGE_SIZE`; ``resize`` from ``image_size`` to
    :data:`MAX_RESIZE`; 3 ``mean`` and 3 positive ``std`` values; ``cache_mb`` >= 0."""
    check_image_size(params["image_size"])
    resize = params["resize"]
    if resize is not None and not params["image_size"] <= resize <= MAX_RESIZE:
        raise ValueError(
            "resize", f"must be an integer from image_size ({params['image_size']}) to {MAX_RESIZE}, got {resize!r}"
        )
    _check_mean_std(params)
    _check_cache_mb(params)


def check_paper_params(params: dict) -> None:
    """``cub200``, ``stanford_cars``: ``image_size`` from 1 to :data:`MAX_IMAGE_SIZE`; 3 ``mean``
    and 3 positive ``std`` values; ``cache_mb`` >= 0."""
    check_image_size(params["image_size"])
    _check_mean_std(params)
    _check_cache_mb(params)
