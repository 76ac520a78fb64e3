"""The fine-grained datasets of the prototype papers, read in their official layouts.

``cub200`` (Caltech-UCSD Birds-200-2011) and ``stanford_cars`` (Stanford
Cars, torchvision's ``StanfordCars`` layout).  Building a dataset reads only
the annotation files, never an image: a missing or malformed file is one
:class:`~kdtoolkit.foundation.errors.DataError` naming the path and what was expected,
raised during a run's preflight.  Images are decoded when an item is read
(``kdt check`` decodes them all ahead of training).

Every item is the image cropped to its bounding box (``bbox_crop``, as
ProtoPNet trains and tests on CUB; ProtoTree crops only its projection set,
and the Proto2Proto Cars data was not cropped: set ``bbox_crop = false``
for those), resized directly to ``image_size`` x ``image_size`` and
normalised.  Training items first go through the
dataset's ``augmentation`` (default: a random horizontal flip).  The
un-augmented train split, the push set of prototype projection, is the same
cropped, resized images without augmentation.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Literal

from torch.utils.data import Dataset

from kdtoolkit.foundation import DataError
from kdt_data.checks import check_paper_params
from kdt_data.imagelist import (
    DEFAULT_CACHE_MB,
    IMAGENET_MEAN,
    IMAGENET_STD,
    ImageListDataset,
    check_cache_mb,
    check_image_params,
    train_augmentation,
)

__all__ = ["cub200", "stanford_cars", "BoxCropDataset", "CUB_URL", "CARS_URL"]

CUB_URL = "https://www.vision.caltech.edu/datasets/cub_200_2011/"
CARS_URL = "https://ai.stanford.edu/~jkrause/cars/car_dataset.html"
_CUB_HINT = f"is this the CUB_200_2011 folder? (download: {CUB_URL})"
_CARS_HINT = (
    "is this the Stanford Cars folder? (torchvision StanfordCars layout: devkit/cars_meta.mat, "
    "devkit/cars_train_annos.mat, cars_test_annos_withlabels.mat, cars_train/, cars_test/; "
    f"{CARS_URL})"
)


class BoxCropDataset(ImageListDataset):
    """Images cropped to their bounding box (when boxes are given) and resized to an ``image_size`` square."""

    def preprocess(self, im):
        """The evaluation transform of any PIL image (no box): resized to ``image_size`` squared, normalised."""
        from PIL import Image

        im = im if im.mode == "RGB" else im.convert("RGB")
        size = (self.image_size, self.image_size)
        if im.size != size:
            im = im.resize(size, Image.Resampling.BILINEAR)
        return self.to_tensor(im)


def _augmentation(name):
    """The training augmentation named by a paper dataset's ``augmentation`` key (None for ``none``)."""
    if name == "flip":
        return train_augmentation(True)
    if name == "protopnet":
        from kdt_data.augment import build_augmentation

        return build_augmentation("protopnet")
    return None


#: Where to get each dataset, for the message about a missing root folder.
_DOWNLOAD = {
    "cub200": f"the CUB_200_2011 folder of the official archive ({CUB_URL})",
    "stanford_cars": f"the Stanford Cars folder ({CARS_URL}; torchvision's StanfordCars layout)",
}


def _check_common(source, split, root, image_size, mean, std):
    if split not in ("train", "test"):
        raise DataError(f"split must be 'train' or 'test', got {split!r}", source=source, key="split")
    if not isinstance(root, (str, os.PathLike)) or not str(root):
        raise DataError(f"root must be a folder path, got {root!r}", source=source, key="root")
    check_image_params(source, image_size, mean, std)
    path = Path(root).expanduser()
    if not path.is_dir():
        what = "is not a folder" if path.exists() else "does not exist"
        raise DataError(
            f"dataset root folder {what}: put {_DOWNLOAD[source]} there, or point root at it "
            "(kdt run: --set data.root=PATH; kdt predict, evaluate, export: --data root=PATH)",
            source=str(path),
        )
    return path.resolve()


# --------------------------------------------------------------------------- CUB-200-2011


def _read_rows(path, fields, hint):
    """``{image_id: [values]}`` of an annotation file of lines ``<id> <field> ...``; DataError naming the path."""
    if not path.is_file():
        raise DataError(f"root has no {path.name}: {hint}", source=str(path.parent))
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read annotation file: {exc}", source=str(path)) from None
    expected = "'" + " ".join(f"<{f[0]}>" for f in (("id", int),) + fields) + "'"
    rows = {}
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split(maxsplit=len(fields))
        try:
            if len(parts) != len(fields) + 1:
                raise ValueError
            key = int(parts[0])
            values = [conv(p) for (_, conv), p in zip(fields, parts[1:])]
        except ValueError:
            raise DataError(f"line {n}: expected {expected}, got {line.strip()!r}", source=str(path)) from None
        if key in rows:
            raise DataError(f"line {n}: id {key} appears twice", source=str(path))
        rows[key] = values
    if not rows:
        raise DataError(f"no lines (expected {expected} per line)", source=str(path))
    return rows


def _cub_classes(root):
    rows = _read_rows(root / "classes.txt", (("class_name", str),), _CUB_HINT)
    if sorted(rows) != list(range(1, len(rows) + 1)):
        raise DataError(f"class ids must be 1..{len(rows)}", source=str(root / "classes.txt"))
    return [rows[k][0].strip() for k in range(1, len(rows) + 1)]


def _cub_boxes(root, ids):
    path = root / "bounding_boxes.txt"
    rows = _read_rows(path, tuple((f, float) for f in ("x", "y", "width", "height")), _CUB_HINT)
    boxes = {}
    for i in ids:
        if i not in rows:
            raise DataError(f"image id {i} has no bounding box", source=str(path))
        x, y, w, h = rows[i]
        if not (all(map(math.isfinite, (x, y, w, h))) and w > 0 and h > 0 and x >= 0 and y >= 0):
            raise DataError(
                f"image id {i}: expected x, y >= 0 and width, height > 0, got {x} {y} {w} {h}", source=str(path)
            )
        boxes[i] = (int(round(x)), int(round(y)), int(round(x + w)), int(round(y + h)))
    return boxes


def _cub_samples(root, split, bbox_crop):
    """(classes, samples, boxes or None) of one split of the CUB_200_2011 folder ``root``."""
    classes = _cub_classes(root)
    images = _read_rows(root / "images.txt", (("image_name", str),), _CUB_HINT)
    labels = _read_rows(root / "image_class_labels.txt", (("class_id", int),), _CUB_HINT)
    flags = _read_rows(root / "train_test_split.txt", (("is_training_image", int),), _CUB_HINT)
    if not (root / "images").is_dir():
        raise DataError(f"root has no images folder: {_CUB_HINT}", source=str(root))
    want = 1 if split == "train" else 0
    ids = []
    for i in images:
        for rows, name in ((labels, "image_class_labels.txt"), (flags, "train_test_split.txt")):
            if i not in rows:
                raise DataError(f"image id {i} ({images[i][0].strip()}) has no line", source=str(root / name))
        if flags[i][0] not in (0, 1):
            raise DataError(
                f"image id {i}: is_training_image must be 0 or 1, got {flags[i][0]}",
                source=str(root / "train_test_split.txt"),
            )
        if not 1 <= labels[i][0] <= len(classes):
            raise DataError(
                f"image id {i}: class id must be 1..{len(classes)} (classes.txt), got {labels[i][0]}",
                source=str(root / "image_class_labels.txt"),
            )
        if flags[i][0] == want:
            ids.append(i)
    if not ids:
        raise DataError(f"no {split} images (train_test_split.txt marks none)", source=str(root))
    samples = [(str(root / "images" / images[i][0].strip()), labels[i][0] - 1) for i in ids]
    boxes = None
    if bbox_crop:
        by_id = _cub_boxes(root, ids)
        boxes = [by_id[i] for i in ids]
    return classes, samples, boxes


def cub200(
    split: str,
    augment: bool = False,
    *,
    root: str,
    image_size: int = 224,
    bbox_crop: bool = True,
    mean: list[float] = IMAGENET_MEAN,
    std: list[float] = IMAGENET_STD,
    augmentation: Literal["flip", "protopnet", "none"] = "flip",
    cache_mb: int = DEFAULT_CACHE_MB,
) -> Dataset:
    """Caltech-UCSD Birds-200-2011: 11,788 bird photographs of 200 species, in the official archive layout.

    ``root`` is the ``CUB_200_2011`` folder of the official archive
    (https://www.vision.caltech.edu/datasets/cub_200_2011/): ``images.txt``,
    ``image_class_labels.txt``, ``train_test_split.txt``,
    ``bounding_boxes.txt``, ``classes.txt`` and ``images/``.  The split is the
    official one (5,994 train, 5,794 test images; ``is_training_image`` 1 is
    train); labels are the 1-based class ids minus one, class names the
    ``classes.txt`` names (``001.Black_footed_Albatross``, ...).  Each image
    is cropped to its bounding box (``x y width height``, 0-based pixels),
    resized to ``image_size`` squared and normalised; with augmentation it is
    augmented (``augmentation``) before the resize.  Building reads only the text files.

    Parameters:
        root: the CUB_200_2011 folder (relative paths: against the recipe's folder).
        image_size: side in pixels of the square images fed to the model.
        bbox_crop: crop each image to its bounding box before resizing (as ProtoPNet does on CUB).
        mean: per-channel (R, G, B) mean subtracted after scaling to [0, 1].
        std: per-channel (R, G, B) std divided by after subtracting the mean.
        augmentation: the training augmentation of the cropped image, before the resize: ``flip`` (a
            horizontal flip with probability 0.5), ``protopnet`` (ProtoPNet's rotation, skew, shear or
            distortion, then the flip; see :mod:`kdt_data.augment`) or ``none``.
        cache_mb: MiB of decoded images kept in memory between epochs when items are loaded in the main
            process (``num_workers = 0``); 0 turns the cache off. Changes no number.
    """
    path = _check_common("cub200", split, root, image_size, mean, std)
    check_cache_mb("cub200", cache_mb)
    classes, samples, boxes = _cub_samples(path, split, bool(bbox_crop))
    return BoxCropDataset(
        name=f"cub200:{path}",
        split=split,
        augment=augment,
        classes=classes,
        samples=samples,
        image_size=image_size,
        mean=mean,
        std=std,
        boxes=boxes,
        augmentation=_augmentation(augmentation),
        cache_mb=cache_mb,
    )


# --------------------------------------------------------------------------- Stanford Cars


def _loadmat(path, what):
    if not path.is_file():
        raise DataError(f"file not found ({what}): {_CARS_HINT}", source=str(path))
    import scipy.io

    try:
        return scipy.io.loadmat(str(path), squeeze_me=True)
    except Exception as exc:  # scipy raises ValueError, TypeError, MatReadError, OSError, ...
        detail = str(exc).strip() or type(exc).__name__
        raise DataError(f"cannot read {what} (expected a MATLAB .mat file): {detail}", source=str(path)) from None


def _cars_folder(root):
    """``root``, or its ``stanford_cars`` sub-folder (torchvision's root), whichever holds ``devkit``."""
    for folder in (root, root / "stanford_cars"):
        if (folder / "devkit").is_dir():
            return folder
    raise DataError(f"root has no devkit folder: {_CARS_HINT}", source=str(root))


def _cars_classes(folder):
    import numpy as np

    path = folder / "devkit" / "cars_meta.mat"
    meta = _loadmat(path, "the class names")
    if "class_names" not in meta:
        raise DataError("no 'class_names' variable (expected the cell array of 196 class names)", source=str(path))
    names = [str(n).strip() for n in np.atleast_1d(meta["class_names"]).tolist()]
    if not names:
        raise DataError("'class_names' is empty", source=str(path))
    return names


def _cars_rows(path, what, bbox_crop):
    """``[(fname, class id, (x1, y1, x2, y2) or None)]`` of an annotations .mat file."""
    import numpy as np

    mat = _loadmat(path, what)
    ann = mat.get("annotations")
    names = getattr(getattr(ann, "dtype", None), "names", None)
    need = ("fname", "class") + (("bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2") if bbox_crop else ())
    missing = [f for f in need if f not in (names or ())]
    if ann is None or names is None or missing:
        found = "no 'annotations' struct array" if names is None else f"no field {', '.join(missing)}"
        hint = " (the test annotations must carry labels: cars_test_annos_withlabels.mat)" if "class" in missing else ""
        raise DataError(f"{found}; expected 'annotations' with fields {', '.join(need)}{hint}", source=str(path))
    rows = []
    for n, a in enumerate(np.atleast_1d(ann)):
        try:
            box = tuple(int(a[f]) for f in need[2:]) if bbox_crop else None
            rows.append((str(a["fname"]).strip(), int(a["class"]), box))
        except (TypeError, ValueError):
            raise DataError(
                f"annotation {n}: expected a file name, an integer class and integer box corners", source=str(path)
            ) from None
    if not rows:
        raise DataError("no annotations", source=str(path))
    return rows


def _cars_samples(folder, split, bbox_crop, num_classes):
    if split == "train":
        ann_path, images = folder / "devkit" / "cars_train_annos.mat", folder / "cars_train"
    else:
        name = "cars_test_annos_withlabels.mat"
        ann_path = next((p for p in (folder / name, folder / "devkit" / name) if p.is_file()), folder / name)
        images = folder / "cars_test"
    rows = _cars_rows(ann_path, f"the {split} annotations", bbox_crop)
    if not images.is_dir():
        raise DataError(f"root has no {images.name} folder: {_CARS_HINT}", source=str(folder))
    samples, boxes = [], []
    for n, (fname, cls, box) in enumerate(rows):
        if not 1 <= cls <= num_classes:
            raise DataError(
                f"annotation {n} ({fname}): class must be 1..{num_classes} (cars_meta.mat), got {cls}",
                source=str(ann_path),
            )
        samples.append((str(images / fname), cls - 1))
        if bbox_crop:
            x1, y1, x2, y2 = box
            if not (1 <= x1 <= x2 and 1 <= y1 <= y2):
                raise DataError(
                    f"annotation {n} ({fname}): expected 1 <= bbox_x1 <= bbox_x2 and 1 <= bbox_y1 <= "
                    f"bbox_y2, got {box}",
                    source=str(ann_path),
                )
            boxes.append((x1 - 1, y1 - 1, x2, y2))  # 1-based inclusive -> 0-based, right/bottom exclusive
    return samples, (boxes if bbox_crop else None)


def stanford_cars(
    split: str,
    augment: bool = False,
    *,
    root: str,
    image_size: int = 224,
    bbox_crop: bool = True,
    mean: list[float] = IMAGENET_MEAN,
    std: list[float] = IMAGENET_STD,
    augmentation: Literal["flip", "protopnet", "none"] = "flip",
    cache_mb: int = DEFAULT_CACHE_MB,
) -> Dataset:
    """Stanford Cars: 16,185 photographs of 196 car models, in torchvision's ``StanfordCars`` layout.

    ``root`` holds ``devkit/cars_meta.mat``, ``devkit/cars_train_annos.mat``,
    ``cars_test_annos_withlabels.mat`` (also found in ``devkit/``),
    ``cars_train/`` and ``cars_test/`` (torchvision's root, the folder above
    ``stanford_cars/``, works too).  The split is the official one (8,144
    train, 8,041 test images); labels are the 1-based ``class`` fields minus
    one, class names the ``class_names`` of ``cars_meta.mat``.  Each image is
    cropped to its bounding box (``bbox_x1..bbox_x2``, ``bbox_y1..bbox_y2``:
    1-based, inclusive), resized to ``image_size`` squared and normalised;
    with augmentation it is augmented (``augmentation``) before the resize.  Building reads only
    the ``.mat`` files (with scipy).

    Parameters:
        root: the Stanford Cars folder (relative paths: against the recipe's folder).
        image_size: side in pixels of the square images fed to the model.
        bbox_crop: crop each image to its bounding box before resizing (as ProtoPNet does on CUB).
        mean: per-channel (R, G, B) mean subtracted after scaling to [0, 1].
        std: per-channel (R, G, B) std divided by after subtracting the mean.
        augmentation: the training augmentation of the cropped image, before the resize: ``flip`` (a
            horizontal flip with probability 0.5), ``protopnet`` (ProtoPNet's rotation, skew, shear or
            distortion, then the flip; see :mod:`kdt_data.augment`) or ``none``.
        cache_mb: MiB of decoded images kept in memory between epochs when items are loaded in the main
            process (``num_workers = 0``); 0 turns the cache off. Changes no number.
    """
    path = _check_common("stanford_cars", split, root, image_size, mean, std)
    check_cache_mb("stanford_cars", cache_mb)
    folder = _cars_folder(path)
    classes = _cars_classes(folder)
    samples, boxes = _cars_samples(folder, split, bool(bbox_crop), len(classes))
    return BoxCropDataset(
        name=f"stanford_cars:{path}",
        split=split,
        augment=augment,
        classes=classes,
        samples=samples,
        image_size=image_size,
        mean=mean,
        std=std,
        boxes=boxes,
        augmentation=_augmentation(augmentation),
        cache_mb=cache_mb,
    )


# torch-free checks of the recipe parameters, run by kdt validate (see kdt_data.checks); a function's
# attribute, which mypy does not model
cub200.check_params = check_paper_params  # type: ignore[attr-defined]
stanford_cars.check_params = check_paper_params  # type: ignore[attr-defined]
