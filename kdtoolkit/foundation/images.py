"""Reading image files safely: regular files only, and a pixel limit checked before decoding.

Every image kdtoolkit and the built-in bundles read (dataset items, ``kdt
predict``, ``kdt explain --image``, ``kdt prepare``) goes through
:func:`open_image`:

- a FIFO, a device, a socket or a link to one is refused by name ("not a
  regular file") before it is opened, so a read never blocks on a FIFO nor
  reads ``/dev/zero`` forever;
- the image's width and height are read from its header, and an image of
  more than :func:`max_image_pixels` pixels is refused with one line naming
  the file, its size and the limit, before it is decoded (a 12000x12000 PNG
  of a few kilobytes would take over 400 MB decoded). The limit is
  :data:`DEFAULT_MAX_IMAGE_PIXELS` (Pillow's own default, about 9459x9459),
  or the environment variable ``KDT_MAX_IMAGE_PIXELS`` (``0``: no limit).
  Pillow's own decompression-bomb check is set to the same limit and its
  ``DecompressionBombWarning`` is never printed: the limit is kdtoolkit's.

The limit changes no number of a run that reads no image over it, and is not
part of a recipe (nor of a stage hash).

This module imports neither torch nor Pillow until an image is read.
"""

from __future__ import annotations

import os
import re
import threading
import warnings
from pathlib import Path
from typing import Any

from kdtoolkit.foundation.errors import DataError, KdtError
from kdtoolkit.foundation.limits import open_regular_file

#: The environment variable that sets the pixel limit (an integer; ``0`` turns the limit off).
MAX_PIXELS_ENV = "KDT_MAX_IMAGE_PIXELS"

#: The default pixel limit: Pillow's own (``PIL.Image.MAX_IMAGE_PIXELS``), about 9459x9459.
DEFAULT_MAX_IMAGE_PIXELS = 89_478_485

_LOCK = threading.Lock()


def max_image_pixels() -> int | None:
    """The pixel limit of an image read: ``$KDT_MAX_IMAGE_PIXELS``, else :data:`DEFAULT_MAX_IMAGE_PIXELS`;
    ``None`` when the variable is ``0`` (no limit).

    :raises DataError: naming the variable when it is not an integer >= 0.
    """
    text = os.environ.get(MAX_PIXELS_ENV, "").strip()
    if not text:
        return DEFAULT_MAX_IMAGE_PIXELS
    if not (text.isascii() and text.isdigit()) or len(text) > 18:
        raise DataError(
            f"expected a number of pixels (an integer >= 0; 0 turns the limit off), got {text[:40]!r}",
            source=MAX_PIXELS_ENV,
        )
    return int(text) or None


def _pillow(limit: int | None):
    """Pillow's ``Image`` module with its decompression-bomb limit set to ``limit`` and its warning silenced."""
    from PIL import Image

    warning = Image.DecompressionBombWarning
    if not any(f[0] == "ignore" and f[2] is warning for f in warnings.filters):  # again after a reset of the filters
        with _LOCK:
            warnings.filterwarnings("ignore", category=warning)
    Image.MAX_IMAGE_PIXELS = limit
    return Image


def _megapixels(n: int) -> str:
    return f"{n / 1e6:.1f} megapixels"


def _too_large(path: str, pixels: int, limit: int, size: str = "") -> DataError:
    what = f"{size} ({_megapixels(pixels)})" if size else _megapixels(pixels)
    return DataError(
        f"image of {what} is over the limit of {_megapixels(limit)} ({limit} pixels); it was not "
        f"decoded: set {MAX_PIXELS_ENV} to read larger images (0: no limit)",
        source=path,
    )


def open_image(path: str | os.PathLike) -> Any:
    """``path`` decoded by Pillow (a loaded ``PIL.Image.Image``, in the file's own mode).

    :raises DataError: naming the file when it is not a regular file, has more
        pixels than :func:`max_image_pixels` (checked from its header, before
        decoding), or cannot be decoded.
    """
    src = str(path)
    limit = max_image_pixels()
    Image = _pillow(limit)
    try:
        fh = open_regular_file(path, DataError)
    except FileNotFoundError:
        raise DataError("cannot read image: no such file", source=src) from None
    except OSError as exc:
        raise DataError(f"cannot read image: {exc.strerror or type(exc).__name__}", source=src) from None
    try:
        with fh, Image.open(fh) as im:
            w, h = im.size
            if limit is not None and w * h > limit:
                raise _too_large(src, w * h, limit, f"{w}x{h}")
            im.load()
            return im
    except KdtError:
        raise
    except Image.DecompressionBombError as exc:  # over twice the limit: refused by Pillow while opening
        m = re.search(r"\((\d+) pixels\)", str(exc))
        raise _too_large(src, int(m.group(1)) if m else 2 * (limit or 0), limit or 0) from None
    except MemoryError:
        raise DataError("cannot read image: out of memory decoding it", source=src) from None
    except Exception as exc:  # Pillow raises OSError, SyntaxError, ValueError, ...
        detail = " ".join(str(exc).split()) or type(exc).__name__
        raise DataError(f"cannot read image: {detail}", source=src) from None


def special_files_line(path: str | os.PathLike) -> str:
    """One ``kdt check`` line for a special file found among images: ``PATH: not a regular file (a FIFO ...)``."""
    from kdtoolkit.foundation.limits import special_file_kind

    try:
        kind = special_file_kind(path) or "now a regular file"
    except OSError as exc:
        kind = exc.strerror or type(exc).__name__
    return f"{Path(path)}: not a regular file ({kind}); it is not read"
