"""What the image datasets share: decoding, boxes, tensors, training augmentation.

:class:`ImageListDataset` is a dataset of ``(path, label)`` samples, each
with an optional bounding box, decoded lazily one file per item.  A subclass
defines :meth:`~ImageListDataset.preprocess`, the un-augmented evaluation
transform of an RGB image; training items apply the dataset's
``augmentation`` (a callable from a PIL image to a PIL image, drawing from
torch's global RNG; :func:`train_augmentation` builds the default, a random
horizontal flip) to the decoded, box-cropped image before it.

Decoded images are kept in memory between epochs, up to ``cache_mb`` MiB for
all the image datasets of the process together (one copy of a file and box,
whichever dataset read it), when items are loaded in the main process
(``num_workers = 0``): from the second epoch on an item costs its transforms,
not a file read and a decode. Worker processes (``num_workers > 0``) decode
every time (each would hold a copy, and workers start anew every epoch).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.utils.data import Dataset

from kdtoolkit.foundation import DataError
from kdt_data.checks import MAX_IMAGE_SIZE

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "DEFAULT_CACHE_MB",
    "check_cache_mb",
    "kept_images_bytes",
    "clear_kept_images",
    "load_rgb",
    "crop_box",
    "random_hflip",
    "train_augmentation",
    "check_image_params",
    "ImageListDataset",
]

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]

#: Default ``cache_mb`` of the image datasets: MiB of decoded images kept in memory between epochs.
DEFAULT_CACHE_MB = 1024


def load_rgb(path):
    """Open ``path`` with Pillow as a fully decoded RGB image, or raise DataError naming it: also for a
    special file (never opened) and an image over the pixel limit (see
    :func:`kdtoolkit.foundation.images.open_image`)."""
    from kdtoolkit.foundation import open_image

    im = open_image(path)
    return im.convert("RGB")


def crop_box(im, box, path):
    """``im`` cropped to ``box`` = (left, top, right, bottom), 0-based pixels, right and bottom exclusive.

    The box is clipped to the image; a box with nothing inside the image raises DataError naming ``path``.
    """
    w, h = im.size
    left, top, right, bottom = box
    left, top, right, bottom = max(0, left), max(0, top), min(w, right), min(h, bottom)
    if right <= left or bottom <= top:
        raise DataError(
            f"bounding box {tuple(box)} (left, top, right, bottom) lies outside the {w}x{h} image", source=str(path)
        )
    if (left, top, right, bottom) == (0, 0, w, h):
        return im
    return im.crop((left, top, right, bottom))


def random_hflip(im):
    """Flip ``im`` horizontally with probability 0.5 (one draw from torch's global RNG)."""
    if torch.rand(()).item() < 0.5:
        from PIL import Image

        return im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return im


def train_augmentation(hflip: bool) -> Callable | None:
    """The training-time augmentation of a dataset's images (PIL image to PIL image), or None for none."""
    return random_hflip if hflip else None


def _is_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_image_params(source, image_size, mean, std):
    """Check ``image_size`` (an integer from 1 to 4096, :data:`kdt_data.checks.MAX_IMAGE_SIZE`) and
    ``mean``/``std`` (3 numbers each, std > 0); raise DataError."""
    if not isinstance(image_size, int) or isinstance(image_size, bool) or not 1 <= image_size <= MAX_IMAGE_SIZE:
        raise DataError(
            f"image_size must be an integer from 1 to {MAX_IMAGE_SIZE}, got {image_size!r}",
            source=source,
            key="image_size",
        )
    for key, values in (("mean", mean), ("std", std)):
        if not isinstance(values, (list, tuple)) or len(values) != 3 or not all(_is_number(v) for v in values):
            raise DataError(f"{key} must be a list of 3 numbers (R, G, B), got {values!r}", source=source, key=key)
    if any(float(v) <= 0 for v in std):
        raise DataError(f"std values must be positive, got {list(std)!r}", source=source, key="std")


def check_cache_mb(source, cache_mb):
    """Check ``cache_mb`` (a non-negative integer, MiB); raise DataError naming the key."""
    if not isinstance(cache_mb, int) or isinstance(cache_mb, bool) or cache_mb < 0:
        raise DataError(
            f"cache_mb must be a non-negative integer (MiB; 0 turns the cache off), got {cache_mb!r}",
            source=source,
            key="cache_mb",
        )


def _in_worker() -> bool:
    return torch.utils.data.get_worker_info() is not None


#: Decoded images kept by the image datasets of this process: ``(path, box)`` → RGB image (Pillow's).
_KEPT: dict[tuple, Any] = {}
_KEPT_BYTES = [0]
_BYTES_PER_PIXEL = 4  # Pillow stores an RGB pixel in 4 bytes


def kept_images_bytes() -> int:
    """Bytes of decoded images kept in memory by the image datasets of this process."""
    return _KEPT_BYTES[0]


def clear_kept_images() -> None:
    """Forget every decoded image kept in memory (the next reads decode the files again)."""
    _KEPT.clear()
    _KEPT_BYTES[0] = 0


class ImageListDataset(Dataset):
    """Images listed as ``(path, label)`` samples, each with an optional box; decoded lazily, one file per item.

    :ivar samples: ``(path, label)`` per item.
    :ivar boxes: ``None``, or per item ``(left, top, right, bottom)`` in 0-based pixels (right and bottom
        exclusive) that :meth:`image` crops to.
    :ivar augmentation: applied to the decoded (cropped) image of a training item when ``augment`` is on.
    :ivar cache_mb: MiB of decoded (cropped) images that reading this dataset may keep in memory, counted
        over every image dataset of the process, in the main process only (0: none).
    :ivar special_files: paths found where images are listed that are not regular files (FIFOs,
        devices, sockets, links to them, broken links): never opened, not items; ``kdt check``
        reports each.
    """

    def __init__(
        self,
        *,
        name,
        split,
        augment,
        classes,
        samples,
        image_size,
        mean,
        std,
        boxes=None,
        augmentation=None,
        cache_mb=DEFAULT_CACHE_MB,
        special_files=(),
    ):
        self.name = name
        self.split = split
        self.augment = bool(augment)
        self.classes = list(classes)
        self.num_classes = len(self.classes)
        self.samples = samples
        self.targets = [label for _, label in samples]
        self.boxes = boxes
        self.image_size = int(image_size)
        self.mean = torch.tensor([float(v) for v in mean], dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor([float(v) for v in std], dtype=torch.float32).view(3, 1, 1)
        self.augmentation = augmentation
        self.cache_mb = int(cache_mb)
        self.special_files = [str(p) for p in special_files]

    def __len__(self):
        return len(self.samples)

    def _decode(self, i):
        path = self.samples[i][0]
        im = load_rgb(path)
        if self.boxes is not None:
            im = crop_box(im, self.boxes[i], path)
        return im

    def image(self, i):
        """Item ``i`` decoded as an RGB PIL image, cropped to its box if it has one.

        Kept in memory (see ``cache_mb``) when decoded in the main process; every call returns
        a new image, so changing it changes nothing kept.
        """
        key = (self.samples[i][0], None if self.boxes is None else tuple(self.boxes[i]))
        kept = _KEPT.get(key) if self.cache_mb else None
        if kept is not None:
            return kept.copy()
        im = self._decode(i)
        if self.cache_mb and not _in_worker():
            size = im.width * im.height * _BYTES_PER_PIXEL
            if _KEPT_BYTES[0] + size <= self.cache_mb * 2**20:
                _KEPT[key] = im
                _KEPT_BYTES[0] += size
                return im.copy()
        return im

    def preprocess(self, im) -> torch.Tensor:
        """The un-augmented transform of a PIL image: a normalised float tensor ``[3, S, S]``."""
        raise NotImplementedError

    def train_transform(self, im) -> torch.Tensor:
        """The training transform of a decoded (cropped) image: ``augmentation``, then :meth:`preprocess`."""
        if self.augmentation is not None:
            im = self.augmentation(im)
        return self.preprocess(im)

    def __getitem__(self, i):
        im = self.image(i)
        img = self.train_transform(im) if self.augment else self.preprocess(im)
        return img, int(self.samples[i][1])

    def check_item(self, i) -> None:
        """Decode item ``i`` completely (and crop it to its box); raise DataError naming the file if that fails."""
        self._decode(i)

    def to_tensor(self, im) -> torch.Tensor:
        """An RGB PIL image as a float tensor ``[3, H, W]``, scaled to [0, 1] and normalised with mean/std."""
        w, h = im.size
        data = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8)
        img = data.view(h, w, 3).permute(2, 0, 1).to(torch.float32).div_(255.0)
        return ((img - self.mean) / self.std).contiguous()

    def __repr__(self):
        return (
            f"{type(self).__name__}(name={self.name!r}, split={self.split!r}, size={len(self)}, "
            f"classes={self.num_classes}, image_size={self.image_size}, augment={self.augment})"
        )
