"""Dataset factories: scikit-learn's bundled digits and a class-per-folder image tree.

A factory is called as ``factory(split, augment, **params)``; ``split`` is
``"train"`` or ``"test"`` and ``augment`` turns training augmentation on.  The
keyword parameters come from a recipe and are documented in each docstring.

Every dataset returned here is a :class:`torch.utils.data.Dataset` whose items
are ``(image, label)`` with ``image`` a float32 tensor ``[3, S, S]`` and
``label`` an ``int``, and which carries ``classes``, ``num_classes``,
``image_size`` and ``name``.  Augmentation draws from torch's global RNG only,
so seeding torch makes runs repeatable.  Problems with user data raise
:class:`kdtoolkit.foundation.errors.DataError`.
"""

import math
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from kdtoolkit.foundation import DataError
from kdt_data.checks import MAX_DIGITS_IMAGE_SIZE, MAX_RESIZE, check_digits_params, check_image_folder_params
from kdt_data.imagelist import (
    DEFAULT_CACHE_MB,
    IMAGENET_MEAN,
    IMAGENET_STD,
    ImageListDataset,
    check_cache_mb,
    check_image_params,
    train_augmentation,
)

__all__ = ["digits", "image_folder", "describe_dataset", "IMAGE_EXTENSIONS", "DigitsDataset", "ImageFolderDataset"]

SPLITS = ("train", "test")

# Fixed statistics of the digits images scaled to [0, 1] (same for every channel).
DIGITS_MEAN = 0.305
DIGITS_STD = 0.33

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


def _check_split(split, source):
    if split not in SPLITS:
        raise DataError(f"split must be 'train' or 'test', got {split!r}", source=source, key="split")


def _is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# --------------------------------------------------------------------------- digits

#: ``"arrays"``: the images and labels; ``("split", fraction, seed)``: the train and test indices.
_DIGITS_CACHE: dict[str | tuple[str, float, int], tuple[torch.Tensor, torch.Tensor]] = {}


def _load_digits():
    """Load scikit-learn's digits once: (images float32 [N,8,8] in [0,1], labels int64 [N])."""
    if "arrays" not in _DIGITS_CACHE:
        try:
            from sklearn.datasets import load_digits

            bunch = load_digits()
        except Exception as exc:  # pragma: no cover - depends on the installation
            raise DataError(f"cannot load scikit-learn's digits data: {exc}", source="digits") from exc
        images = torch.as_tensor(bunch.images, dtype=torch.float32) / 16.0
        labels = torch.as_tensor(bunch.target, dtype=torch.int64)
        _DIGITS_CACHE["arrays"] = (images, labels)
    return _DIGITS_CACHE["arrays"]


def _digits_split(test_fraction, split_seed):
    """Stratified (train_idx, test_idx) from ``split_seed`` alone; cached per (fraction, seed)."""
    key = ("split", float(test_fraction), int(split_seed))
    if key not in _DIGITS_CACHE:
        _, labels = _load_digits()
        gen = torch.Generator().manual_seed(int(split_seed))
        train_parts, test_parts = [], []
        for cls in range(int(labels.max()) + 1):
            idx = torch.nonzero(labels == cls).flatten()
            idx = idx[torch.randperm(len(idx), generator=gen)]
            n_test = min(max(int(round(len(idx) * test_fraction)), 1), len(idx) - 1)
            test_parts.append(idx[:n_test])
            train_parts.append(idx[n_test:])
        train_idx = torch.sort(torch.cat(train_parts)).values
        test_idx = torch.sort(torch.cat(test_parts)).values
        _DIGITS_CACHE[key] = (train_idx, test_idx)
    return _DIGITS_CACHE[key]


def _random_affine(img, max_shift_px, max_degrees=10.0, scale_range=(0.9, 1.1)):
    """Random rotation/scale/translation of ``img`` [C,S,S] with torch's global RNG."""
    size = img.shape[-1]
    r = torch.rand(4)
    angle = math.radians((2 * r[0].item() - 1) * max_degrees)
    scale = scale_range[0] + (scale_range[1] - scale_range[0]) * r[1].item()
    # Translation in normalized coordinates: 2 / size per pixel.
    tx = (2 * r[2].item() - 1) * max_shift_px * 2.0 / size
    ty = (2 * r[3].item() - 1) * max_shift_px * 2.0 / size
    cos, sin = math.cos(angle) / scale, math.sin(angle) / scale
    theta = torch.tensor([[cos, -sin, tx], [sin, cos, ty]], dtype=img.dtype).unsqueeze(0)
    grid = F.affine_grid(theta, [1, *img.shape], align_corners=False)
    out = F.grid_sample(img.unsqueeze(0), grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return out.squeeze(0)


class DigitsDataset(Dataset):
    """One split of scikit-learn's 8x8 digits, upsampled to RGB ``image_size`` squares."""

    def __init__(self, split, augment, image_size, test_fraction, split_seed, normalize):
        images, labels = _load_digits()
        train_idx, test_idx = _digits_split(test_fraction, split_seed)
        self.indices = train_idx if split == "train" else test_idx
        self._images = images
        self._labels = labels
        self.split = split
        self.augment = bool(augment)
        self.image_size = int(image_size)
        self.normalize = bool(normalize)
        self.classes = [str(c) for c in range(10)]
        self.num_classes = len(self.classes)
        self.name = "digits"
        self.targets = [int(labels[i]) for i in self.indices]
        self._up = self._done = None  # filled on first access (see _upsampled, _finished)

    def __len__(self):
        return len(self.indices)

    def _upsampled(self):
        """Every image of the split upsampled to ``[1,S,S]`` once (the same values as one image at a time)."""
        if self._up is None:
            self._up = F.interpolate(
                self._images[self.indices].unsqueeze(1),
                size=(self.image_size, self.image_size),
                mode="bilinear",
                align_corners=False,
            )  # [n,1,S,S]
        return self._up

    def _finished(self):
        """Every un-augmented image, clamped and normalised, one channel ``[n,1,S,S]``: the per-channel work
        done once (the 3 channels are copies), so that reading an image is an index and a copy."""
        if self._done is None:
            img = self._upsampled().clamp(0.0, 1.0)
            self._done = (img - DIGITS_MEAN) / DIGITS_STD if self.normalize else img
            self._up = None  # an un-augmented split needs only the finished images
        return self._done

    def preprocess(self, image):
        """One image file's evaluation tensor ``[3, S, S]``, prepared as the dataset's own images are.

        The image is converted to grey levels in [0, 1], shrunk to 8x8 by
        area averaging unless it already is 8x8 (the dataset's resolution),
        then upsampled, clamped and normalised like a test image. Digits are
        bright strokes on a dark background, as in the dataset.

        :param image: a PIL image (any mode).
        """
        from PIL import Image

        grey = image.convert("L")
        if grey.size != (8, 8):
            grey = grey.resize((8, 8), Image.Resampling.BOX)
        x = torch.frombuffer(bytearray(grey.tobytes()), dtype=torch.uint8).view(1, 1, 8, 8).to(torch.float32) / 255.0
        img = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False)[0]
        img = img.clamp(0.0, 1.0)
        if self.normalize:
            img = (img - DIGITS_MEAN) / DIGITS_STD
        return img.expand(3, -1, -1).contiguous()

    def __getitem__(self, i):
        j = int(self.indices[i])
        if not self.augment:
            return self._finished()[i].expand(3, -1, -1).contiguous(), int(self._labels[j])
        img = _random_affine(self._upsampled()[i].clone(), max_shift_px=2.0 * self.image_size / 32.0)
        img = img.clamp_(0.0, 1.0).expand(3, -1, -1).contiguous()
        if self.normalize:
            img = (img - DIGITS_MEAN) / DIGITS_STD
        return img, int(self._labels[j])

    def get_batch(self, indices):
        """Items ``indices`` collated, ``(images [B,3,S,S], labels [B])``: the batch that collating
        ``[self[i] for i in indices]`` gives (the same values, the same random draws), without a
        DataLoader; un-augmented images are one indexing of the prepared split."""
        labels = torch.tensor([self.targets[i] for i in indices], dtype=torch.int64)
        if self.augment:
            return torch.stack([self[i][0] for i in indices]), labels
        return self._finished()[list(indices)].expand(-1, 3, -1, -1).contiguous(), labels

    def __repr__(self):
        return (
            f"DigitsDataset(split={self.split!r}, size={len(self)}, image_size={self.image_size}, "
            f"augment={self.augment})"
        )


def digits(
    split: str,
    augment: bool = False,
    *,
    image_size: int = 32,
    test_fraction: float = 0.2,
    split_seed: int = 0,
    normalize: bool = True,
) -> Dataset:
    """scikit-learn's bundled handwritten digits (1797 8x8 images, 10 classes; no download).

    Each image is scaled to [0, 1], bilinearly upsampled to ``image_size`` and
    replicated to 3 channels.  The train/test split is stratified by class and
    fixed by ``split_seed`` alone (the same every run, whatever the training
    seed).  Training augmentation is a small random rotation (up to 10 degrees),
    scale (0.9 to 1.1) and translation (up to 2 px at 32 px, scaled with
    ``image_size``).

    Parameters:
        image_size: side in pixels of the square RGB images (8 to 512).
        test_fraction: fraction of each class held out as the test split (between 0 and 1).
        split_seed: seed of the fixed stratified train/test split.
        normalize: subtract a fixed mean (0.305) and divide by a fixed std (0.33).
    """
    source = "digits"
    _check_split(split, source)
    if not _is_int(image_size) or not 8 <= image_size <= MAX_DIGITS_IMAGE_SIZE:
        raise DataError(
            f"image_size must be an integer from 8 to {MAX_DIGITS_IMAGE_SIZE}, got {image_size!r}",
            source=source,
            key="image_size",
        )
    if not _is_number(test_fraction) or not 0.0 < float(test_fraction) < 1.0:
        raise DataError(
            f"test_fraction must be between 0 and 1 (exclusive), got {test_fraction!r}",
            source=source,
            key="test_fraction",
        )
    if not _is_int(split_seed):
        raise DataError(f"split_seed must be an integer, got {split_seed!r}", source=source, key="split_seed")
    return DigitsDataset(split, augment, image_size, float(test_fraction), split_seed, normalize)


# --------------------------------------------------------------------------- image folders


def _class_dirs(split_dir):
    """Sorted class names (non-hidden sub-folders) of ``split_dir``."""
    try:
        entries = sorted(os.scandir(split_dir), key=lambda e: e.name)
    except OSError as exc:
        raise DataError(f"cannot list folder: {exc.strerror or exc}", source=str(split_dir)) from exc
    return [e.name for e in entries if not e.name.startswith(".") and e.is_dir()]


def _split_dir(root, sub, key):
    path = root / sub
    if not path.is_dir():
        what = "is not a folder" if path.exists() else "does not exist"
        raise DataError(f"{sub!r} split folder {what} (set {key} to the sub-folder of root)", source=str(path))
    return path


def _image_files(class_dir):
    """``(images, special files)`` of a class folder: the regular files (or links to them) with an image
    extension, and every other entry that is neither a regular file nor a folder (a FIFO, a device, a
    socket, a link to one, a broken link), found from the folder listing alone: never opened."""
    try:
        entries = sorted(os.scandir(class_dir), key=lambda e: e.name)
    except OSError as exc:
        raise DataError(f"cannot list folder: {exc.strerror or exc}", source=str(class_dir)) from exc
    files, special = [], []
    for e in entries:
        if e.name.startswith("."):
            continue
        try:
            regular, folder = e.is_file(), e.is_dir()
        except OSError:  # e.g. a link loop
            regular = folder = False
        if regular and e.name.lower().endswith(IMAGE_EXTENSIONS):
            files.append(Path(e.path))
        elif not regular and not folder:
            special.append(Path(e.path))
    return files, special


#: Values of image_folder's ``augmentation`` key.
FOLDER_AUGMENTATIONS = ("crop_flip", "protopnet", "none")


def folder_augmentation(name, hflip):
    """The PIL-to-PIL training augmentation of an ``image_folder`` ``augmentation`` value, or None for none.

    Parameters:
        name: ``crop_flip`` (the flip of ``hflip``; the crop is the dataset's), ``protopnet`` or ``none``.
        hflip: with ``crop_flip``, flip horizontally with probability 0.5.
    """
    if name == "crop_flip":
        return train_augmentation(hflip)
    if name == "protopnet":
        from kdt_data.augment import build_augmentation

        return build_augmentation("protopnet")
    return None


class ImageFolderDataset(ImageListDataset):
    """Images under ``<split_dir>/<class>/``; loaded lazily, one file per item.

    Evaluation: the shorter side resized to ``resize``, then the centre ``image_size`` square.  Training
    (``augmentation_name`` ``crop_flip``): the same resize, a random (or centre) crop, then the dataset's
    ``augmentation`` (random horizontal flip with ``hflip``); ``protopnet``: the whole image augmented
    (:mod:`kdt_data.augment`), then the evaluation transform; ``none``: the evaluation transform.
    """

    def __init__(
        self,
        split,
        augment,
        root,
        split_dir,
        classes,
        samples,
        image_size,
        resize,
        mean,
        std,
        hflip,
        random_crop,
        augmentation="crop_flip",
        cache_mb=DEFAULT_CACHE_MB,
        special_files=(),
    ):
        super().__init__(
            name=f"image_folder:{root}",
            split=split,
            augment=augment,
            classes=classes,
            samples=samples,
            image_size=image_size,
            mean=mean,
            std=std,
            augmentation=folder_augmentation(augmentation, hflip),
            cache_mb=cache_mb,
            special_files=special_files,
        )
        self.augmentation_name = augmentation
        self.root = root
        self.split_dir = split_dir
        self.resize = int(resize)
        self.hflip = bool(hflip)
        self.random_crop = bool(random_crop)

    def _resize_shorter(self, im):
        from PIL import Image

        w, h = im.size
        short = min(w, h)
        if short != self.resize:
            nw = max(1, int(round(w * self.resize / short)))
            nh = max(1, int(round(h * self.resize / short)))
            if w <= h:
                nw = self.resize
            else:
                nh = self.resize
            im = im.resize((nw, nh), Image.Resampling.BILINEAR)
        return im

    def _crop(self, im, random):
        w, h = im.size
        s = self.image_size
        if random:
            top = int(torch.randint(0, h - s + 1, ()).item())
            left = int(torch.randint(0, w - s + 1, ()).item())
        else:
            top = int(round((h - s) / 2.0))
            left = int(round((w - s) / 2.0))
        return im.crop((left, top, left + s, top + s))

    def preprocess(self, im):
        """The evaluation transform of any PIL image: shorter side to ``resize``, centre crop, normalise."""
        im = im if im.mode == "RGB" else im.convert("RGB")
        return self.to_tensor(self._crop(self._resize_shorter(im), random=False))

    def train_transform(self, im):
        """Shorter side to ``resize``, a random crop (with ``random_crop``), ``augmentation``, normalise;
        with ``protopnet`` or ``none``: ``augmentation`` (if any) on the whole image, then :meth:`preprocess`."""
        if self.augmentation_name != "crop_flip":
            return super().train_transform(im)
        im = self._crop(self._resize_shorter(im), random=self.random_crop)
        if self.augmentation is not None:
            im = self.augmentation(im)
        return self.to_tensor(im)

    def __repr__(self):
        return (
            f"ImageFolderDataset(root={self.root!r}, split={self.split!r}, size={len(self)}, "
            f"classes={self.num_classes}, image_size={self.image_size}, augment={self.augment})"
        )


def image_folder(
    split: str,
    augment: bool = False,
    *,
    root: str,
    train_dir: str = "train",
    test_dir: str = "test",
    image_size: int = 224,
    resize: int | None = None,
    mean: list[float] = IMAGENET_MEAN,
    std: list[float] = IMAGENET_STD,
    hflip: bool = True,
    random_crop: bool = True,
    augmentation: str = "crop_flip",
    cache_mb: int = DEFAULT_CACHE_MB,
) -> Dataset:
    """Images in one sub-folder per class: ``root/<train_dir>/<class>/*`` and ``root/<test_dir>/<class>/*``.

    Classes are the sorted sub-folder names; the test split must have the same
    classes as the train split.  Files are read with Pillow (jpg, jpeg, png,
    bmp, gif, tif, tiff, webp, ppm, pgm; other files are ignored; special
    files such as FIFOs, devices and links to them are never opened, and
    ``kdt check`` lists them) when an item
    is loaded, converted to RGB, resized so the shorter side is ``resize``,
    then center-cropped (evaluation) or randomly cropped and optionally
    flipped (training augmentation), and normalized with ``mean``/``std``.

    Parameters:
        root: dataset folder holding the train and test split folders.
        train_dir: name of the train split folder inside root.
        test_dir: name of the test split folder inside root.
        image_size: side in pixels of the square crops fed to the model (1 to 4096).
        resize: shorter side in pixels before cropping (default: image_size * 8 / 7, rounded; at most 8192).
        mean: per-channel (R, G, B) mean subtracted after scaling to [0, 1].
        std: per-channel (R, G, B) std divided by after subtracting the mean.
        hflip: with augmentation, flip images horizontally with probability 0.5.
        random_crop: with augmentation, crop at a random position instead of the center.
        augmentation: training augmentation: ``crop_flip`` (the crop and flip above), ``protopnet``
            (ProtoPNet's: the whole image rotated, skewed, sheared or distorted, each equally likely,
            then flipped with probability 0.5, then center-cropped; hflip and random_crop unused;
            see kdt_data.augment) or ``none``.
        cache_mb: MiB of decoded images kept in memory between epochs when items are loaded in the main
            process (``num_workers = 0``); 0 turns the cache off. Changes no number.
    """
    source = "image_folder"
    _check_split(split, source)
    if augmentation not in FOLDER_AUGMENTATIONS:
        raise DataError(
            f"augmentation must be one of {', '.join(map(repr, FOLDER_AUGMENTATIONS))}, got {augmentation!r}",
            source=source,
            key="augmentation",
        )
    if not isinstance(root, (str, os.PathLike)) or not str(root):
        raise DataError(f"root must be a folder path, got {root!r}", source=source, key="root")
    check_image_params(source, image_size, mean, std)
    check_cache_mb(source, cache_mb)
    if resize is None:
        resize = int(round(image_size * 8 / 7))
    if not _is_int(resize) or not image_size <= resize <= MAX_RESIZE:
        raise DataError(
            f"resize must be an integer from image_size ({image_size}) to {MAX_RESIZE}, got {resize!r}",
            source=source,
            key="resize",
        )
    for key, sub in (("train_dir", train_dir), ("test_dir", test_dir)):
        if not isinstance(sub, str) or not sub:
            raise DataError(f"{key} must be a folder name, got {sub!r}", source=source, key=key)

    root_path = Path(root).expanduser().resolve()
    if not root_path.is_dir():
        what = "is not a folder" if root_path.exists() else "does not exist"
        raise DataError(f"dataset root folder {what}", source=str(root_path))

    train_path = _split_dir(root_path, train_dir, "train_dir")
    train_classes = _class_dirs(train_path)
    if not train_classes:
        raise DataError(
            "no class sub-folders found (expected one sub-folder of images per class)", source=str(train_path)
        )
    if split == "train":
        split_path, classes = train_path, train_classes
    else:
        split_path = _split_dir(root_path, test_dir, "test_dir")
        classes = _class_dirs(split_path)
        if not classes:
            raise DataError(
                "no class sub-folders found (expected one sub-folder of images per class)", source=str(split_path)
            )
        if classes != train_classes:
            only_train = sorted(set(train_classes) - set(classes))
            only_test = sorted(set(classes) - set(train_classes))
            raise DataError(
                f"test classes differ from train classes ({train_path}): "
                f"only in train: {only_train or 'none'}; only in test: {only_test or 'none'}",
                source=str(split_path),
            )

    samples: list[tuple[str, int]] = []
    special: list[str] = []
    for label, cls in enumerate(classes):
        class_dir = split_path / cls
        files, odd = _image_files(class_dir)
        special.extend(str(p) for p in odd)  # skipped, never opened; kdt check lists them
        if not files:
            raise DataError(
                f"class folder has no images (extensions: {', '.join(IMAGE_EXTENSIONS)})", source=str(class_dir)
            )
        samples.extend((str(p), label) for p in files)

    return ImageFolderDataset(
        split,
        augment,
        str(root_path),
        str(split_path),
        classes,
        samples,
        image_size,
        resize,
        [float(v) for v in mean],
        [float(v) for v in std],
        hflip,
        random_crop,
        augmentation,
        cache_mb,
        special,
    )


# torch-free checks of the recipe parameters, run by kdt validate (see kdt_data.checks); a function's
# attribute, which mypy does not model
digits.check_params = check_digits_params  # type: ignore[attr-defined]
image_folder.check_params = check_image_folder_params  # type: ignore[attr-defined]


# --------------------------------------------------------------------------- metadata


def describe_dataset(ds) -> dict:
    """Run metadata of a dataset: ``{name, num_classes, size, image_size}``."""
    return {
        "name": str(getattr(ds, "name", type(ds).__name__)),
        "num_classes": int(ds.num_classes),
        "size": len(ds),
        "image_size": int(ds.image_size),
    }
