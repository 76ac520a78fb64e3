"""The paper datasets (cub200, stanford_cars) on tiny fixtures in the official layouts, relative recipe
paths, and ``kdt check``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torch
from PIL import Image

from kdt_data import datasets as D
from kdt_data import paper as P
from kdtoolkit.cli.commands import main
from kdtoolkit.foundation.errors import DataError

BG = (40, 40, 40)
COLORS = [(230, 20, 20), (20, 230, 20), (20, 20, 230)]
IDENTITY = {"mean": [0.0, 0.0, 0.0], "std": [1.0, 1.0, 1.0]}
# (class 1-based, train?, 0-based box left, top, right, bottom): boxes on the 8-pixel JPEG grid
CUB_IMAGES = [
    (1, 1, (8, 8, 24, 24)),
    (1, 0, (16, 8, 32, 16)),
    (2, 1, (0, 0, 16, 16)),
    (2, 0, (8, 16, 40, 32)),
    (3, 1, (24, 8, 40, 24)),
    (3, 0, (8, 8, 16, 16)),
]


def _jpeg(path: Path, box, color, size=(40, 32)):
    im = Image.new("RGB", size, BG)
    im.paste(color, box)
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path, quality=95, subsampling=0)


def make_cub(base: Path) -> Path:
    root = base / "CUB_200_2011"
    names = ["001.Black_footed_Albatross", "002.Laysan_Albatross", "003.Sooty_Albatross"]
    lines = {k: [] for k in ("images", "labels", "split", "boxes")}
    for i, (cls, train, box) in enumerate(CUB_IMAGES, 1):
        rel = f"{names[cls - 1]}/{names[cls - 1][4:]}_{i:04d}.jpg"
        _jpeg(root / "images" / rel, box, COLORS[cls - 1])
        lines["images"].append(f"{i} {rel}")
        lines["labels"].append(f"{i} {cls}")
        lines["split"].append(f"{i} {train}")
        left, top, right, bottom = box
        lines["boxes"].append(f"{i} {left}.0 {top}.0 {right - left}.0 {bottom - top}.0")
    files = {
        "images.txt": "images",
        "image_class_labels.txt": "labels",
        "train_test_split.txt": "split",
        "bounding_boxes.txt": "boxes",
    }
    for fname, k in files.items():
        (root / fname).write_text("\n".join(lines[k]) + "\n")
    (root / "classes.txt").write_text("".join(f"{i} {n}\n" for i, n in enumerate(names, 1)))
    return root


CARS_NAMES = ["AM General Hummer SUV 2000", "Acura RL Sedan 2012", "Acura TL Sedan 2012"]
# (file, class 1-based, 0-based box) per split
CARS = {
    "train": [("00001.jpg", 1, (8, 8, 24, 24)), ("00002.jpg", 3, (16, 0, 40, 16))],
    "test": [("00001.jpg", 2, (0, 8, 16, 32)), ("00002.jpg", 3, (24, 16, 40, 32)), ("00003.jpg", 1, (8, 8, 16, 16))],
}


def _annotations(rows, with_class=True):
    """A struct array as in the official files: bbox_x1..bbox_y2 1-based inclusive, class, fname."""
    fields = ["bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2"] + (["class"] if with_class else []) + ["fname"]
    out = np.zeros((1, len(rows)), dtype=[(f, "O") for f in fields])
    for j, (fname, cls, (left, top, right, bottom)) in enumerate(rows):
        values = [left + 1, top + 1, right, bottom] + ([cls] if with_class else [])
        out[0, j] = tuple(np.array([[v]], dtype=np.uint16) for v in values) + (np.array([fname]),)
    return out


def make_cars(base: Path, test_in_devkit=False) -> Path:
    root = base / "cars"
    (root / "devkit").mkdir(parents=True)
    scipy.io.savemat(root / "devkit" / "cars_meta.mat", {"class_names": np.array([CARS_NAMES], dtype=object)})
    scipy.io.savemat(root / "devkit" / "cars_train_annos.mat", {"annotations": _annotations(CARS["train"])})
    test_dir = root / "devkit" if test_in_devkit else root
    scipy.io.savemat(test_dir / "cars_test_annos_withlabels.mat", {"annotations": _annotations(CARS["test"])})
    for split, rows in CARS.items():
        for fname, cls, box in rows:
            _jpeg(root / f"cars_{split}" / fname, box, COLORS[cls - 1])
    return root


@pytest.fixture
def cub(tmp_path):
    return make_cub(tmp_path)


@pytest.fixture
def cars(tmp_path):
    return make_cars(tmp_path)


def _assert_color(img, color, tol=0.04):
    expected = torch.tensor(color, dtype=torch.float32).view(3, 1, 1) / 255
    assert (img - expected).abs().max() < tol, (img.mean((1, 2)) * 255).tolist()


# --------------------------------------------------------------------------- CUB-200-2011


def test_cub_splits_labels_classes(cub):
    train, test = P.cub200("train", root=str(cub), image_size=8), P.cub200("test", root=str(cub), image_size=8)
    assert (len(train), len(test)) == (3, 3)
    assert train.classes == test.classes and train.classes[0] == "001.Black_footed_Albatross"
    assert train.num_classes == 3 and train.targets == [0, 1, 2] and test.targets == [0, 1, 2]
    assert train.name == f"cub200:{cub.resolve()}" and train.image_size == 8
    assert (
        Path(train.samples[0][0]) == cub / "images" / "001.Black_footed_Albatross" / "Black_footed_Albatross_0001.jpg"
    )
    img, label = test[1]
    assert img.shape == (3, 8, 8) and img.dtype == torch.float32 and type(label) is int


@pytest.mark.parametrize("split", ["train", "test"])
def test_cub_bounding_box_crop_is_the_box(cub, split):
    ds = P.cub200(split, root=str(cub), image_size=16, **IDENTITY)
    for i in range(len(ds)):
        img, label = ds[i]
        _assert_color(img, COLORS[label])
    whole = P.cub200(split, root=str(cub), image_size=16, bbox_crop=False, **IDENTITY)
    assert whole.boxes is None and whole.image(0).size == (40, 32)
    assert any(abs(whole[i][0][:, 0, 0] * 255 - torch.tensor(BG)).max() < 10 for i in range(len(whole)))


def test_cub_eval_is_preprocess_of_the_crop_and_augmentation_is_a_flip(cub):
    ds = P.cub200("train", root=str(cub), image_size=12)
    assert torch.equal(ds.preprocess(ds.image(2)), ds[2][0])
    photo = Image.new("L", (30, 20), 128)  # any PIL image, any mode: resized to the square
    assert ds.preprocess(photo).shape == (3, 12, 12)
    aug = P.cub200("train", True, root=str(cub), image_size=12)
    torch.manual_seed(0)
    draws = {tuple(aug[1][0].flatten().tolist()) for _ in range(12)}
    plain = ds.preprocess(ds.image(1))
    assert draws == {tuple(plain.flatten().tolist()), tuple(plain.flip(-1).flatten().tolist())}
    no_flip = P.cub200("train", True, root=str(cub), image_size=12, augmentation="none")
    assert no_flip.augmentation is None and torch.equal(no_flip[1][0], plain)
    proto = P.cub200("train", True, root=str(cub), image_size=12, bbox_crop=False, augmentation="protopnet")
    torch.manual_seed(0)
    varied = {tuple(proto[1][0].flatten().tolist()) for _ in range(6)}
    assert len(varied) > 2 and proto[1][0].shape == (3, 12, 12)  # rotations, skews, ... beyond the two flips


def test_push_set_is_the_unaugmented_bounding_box_crops(cub):
    from kdtoolkit.engine.data import build_data
    from kdtoolkit.plugin.manager import get_manager

    stage = {"data": {"dataset": "cub200", "root": str(cub), "image_size": 12, "augment": True, **IDENTITY}}
    data = build_data(stage, get_manager())
    assert data.train.augment and not data.train_eval.augment and not data.test.augment
    push = data.train_eval
    assert push.boxes is not None and len(push) == len(data.train) and push.targets == data.train.targets
    for i in range(len(push)):
        img, label = push[i]
        assert torch.equal(img, push.preprocess(push.image(i)))
        _assert_color(img, COLORS[label])


@pytest.mark.parametrize(
    "fname", ["images.txt", "image_class_labels.txt", "train_test_split.txt", "bounding_boxes.txt", "classes.txt"]
)
def test_cub_missing_annotation_file(cub, fname):
    (cub / fname).unlink()
    with pytest.raises(DataError) as info:
        P.cub200("train", root=str(cub))
    msg = str(info.value)
    assert msg.startswith(f"{cub.resolve()}: root has no {fname}: is this the CUB_200_2011 folder?")
    assert P.CUB_URL in msg and len(msg.splitlines()) == 1


def test_cub_bounding_boxes_needed_only_for_the_crop(cub):
    (cub / "bounding_boxes.txt").unlink()
    assert len(P.cub200("test", root=str(cub), bbox_crop=False)) == 3


@pytest.mark.parametrize(
    "fname, line, fragment",
    [
        ("bounding_boxes.txt", "2 8.0 eight 16.0 8.0", "line 2: expected '<id> <x> <y> <width> <height>'"),
        ("bounding_boxes.txt", "2 8.0 8.0 0.0 8.0", "image id 2: expected x, y >= 0 and width, height > 0"),
        ("image_class_labels.txt", "2 7", "image id 2: class id must be 1..3"),
        ("train_test_split.txt", "2 2", "is_training_image must be 0 or 1"),
        ("train_test_split.txt", "1 1", "line 2: id 1 appears twice"),
    ],
)
def test_cub_malformed_lines(cub, fname, line, fragment):
    path = cub / fname
    rows = path.read_text().splitlines()
    rows[1] = line
    path.write_text("\n".join(rows) + "\n")
    with pytest.raises(DataError, match=fragment) as info:
        P.cub200("test", root=str(cub))
    assert str(info.value).startswith(str(path.resolve()))


def test_cub_image_without_label_and_missing_root(cub, tmp_path):
    path = cub / "image_class_labels.txt"
    path.write_text("\n".join(path.read_text().splitlines()[:-1]) + "\n")
    with pytest.raises(DataError, match=r"image id 6 \(.*_0006.jpg\) has no line"):
        P.cub200("train", root=str(cub))
    with pytest.raises(DataError, match="dataset root folder does not exist"):
        P.cub200("train", root=str(tmp_path / "nowhere"))


def test_building_12k_images_reads_only_the_annotations(tmp_path):
    root = tmp_path / "CUB_200_2011"
    (root / "images").mkdir(parents=True)  # no image at all: building never opens one
    n = 12000
    (root / "classes.txt").write_text("".join(f"{c} {c:03d}.Bird_{c}\n" for c in range(1, 201)))
    (root / "images.txt").write_text("".join(f"{i} {i % 200 + 1:03d}.Bird/img_{i}.jpg\n" for i in range(1, n + 1)))
    (root / "image_class_labels.txt").write_text("".join(f"{i} {i % 200 + 1}\n" for i in range(1, n + 1)))
    (root / "train_test_split.txt").write_text("".join(f"{i} {i % 2}\n" for i in range(1, n + 1)))
    (root / "bounding_boxes.txt").write_text("".join(f"{i} 10.0 12.0 100.0 80.0\n" for i in range(1, n + 1)))
    ds = P.cub200("train", root=str(root))  # the images do not exist: nothing but the text files was read
    assert len(ds) == n // 2 and ds.num_classes == 200 and ds.boxes[0] == (10, 12, 110, 92)


# --------------------------------------------------------------------------- Stanford Cars


def test_cars_splits_labels_classes_and_boxes(cars):
    train = P.stanford_cars("train", root=str(cars), image_size=16, **IDENTITY)
    test = P.stanford_cars("test", root=str(cars), image_size=16, **IDENTITY)
    assert train.classes == CARS_NAMES and train.num_classes == 3
    assert train.targets == [0, 2] and test.targets == [1, 2, 0]
    assert test.boxes == [box for _, _, box in CARS["test"]]  # 1-based inclusive -> 0-based, end exclusive
    assert Path(test.samples[2][0]) == cars / "cars_test" / "00003.jpg"
    for ds in (train, test):
        for i in range(len(ds)):
            img, label = ds[i]
            assert img.shape == (3, 16, 16)
            _assert_color(img, COLORS[label])
            assert ds.image(i).size == tuple(np.subtract(ds.boxes[i][2:], ds.boxes[i][:2]))


def test_cars_layout_variants(tmp_path):
    devkit = make_cars(tmp_path / "a", test_in_devkit=True)
    assert len(P.stanford_cars("test", root=str(devkit))) == 3
    tv = make_cars(tmp_path / "b" / "tv")
    tv.rename(tv.parent / "stanford_cars")  # torchvision's root holds stanford_cars/
    assert len(P.stanford_cars("train", root=str(tmp_path / "b" / "tv"), bbox_crop=False)) == 2


def test_cars_missing_and_malformed_files(cars):
    (cars / "cars_test_annos_withlabels.mat").unlink()
    scipy.io.savemat(cars / "devkit" / "cars_test_annos.mat", {"annotations": _annotations(CARS["test"], False)})
    with pytest.raises(DataError, match="file not found") as info:
        P.stanford_cars("test", root=str(cars))
    assert str(info.value).startswith(str((cars / "cars_test_annos_withlabels.mat").resolve()))
    scipy.io.savemat(cars / "cars_test_annos_withlabels.mat", {"annotations": _annotations(CARS["test"], False)})
    with pytest.raises(DataError, match="no field class.*must carry labels"):
        P.stanford_cars("test", root=str(cars))
    (cars / "devkit" / "cars_meta.mat").write_bytes(b"not a mat file")
    with pytest.raises(DataError, match="cannot read the class names") as info:
        P.stanford_cars("train", root=str(cars))
    assert len(str(info.value).splitlines()) == 1
    (cars / "devkit" / "cars_meta.mat").unlink()
    with pytest.raises(DataError, match=r"cars_meta.mat: file not found \(the class names\)"):
        P.stanford_cars("train", root=str(cars))


def test_cars_bad_class_and_box(cars):
    rows = [("00001.jpg", 4, (8, 8, 24, 24))]
    scipy.io.savemat(cars / "devkit" / "cars_train_annos.mat", {"annotations": _annotations(rows)})
    with pytest.raises(DataError, match=r"annotation 0 \(00001.jpg\): class must be 1..3"):
        P.stanford_cars("train", root=str(cars))
    rows = [("00001.jpg", 1, (8, 8, 4, 24))]
    scipy.io.savemat(cars / "devkit" / "cars_train_annos.mat", {"annotations": _annotations(rows)})
    with pytest.raises(DataError, match="expected 1 <= bbox_x1 <= bbox_x2"):
        P.stanford_cars("train", root=str(cars))


def test_box_outside_the_image_is_a_data_error_on_reading(cars):
    rows = [("00001.jpg", 1, (50, 40, 60, 50))]
    scipy.io.savemat(cars / "devkit" / "cars_train_annos.mat", {"annotations": _annotations(rows)})
    ds = P.stanford_cars("train", root=str(cars))
    with pytest.raises(DataError, match=r"lies outside the 40x32 image") as info:
        ds.check_item(0)
    assert str(cars / "cars_train" / "00001.jpg") in str(info.value)


def test_image_folder_preprocess_is_its_evaluation_transform(tmp_path):
    for split in ("train", "test"):
        _jpeg(tmp_path / "f" / split / "a" / "x.jpg", (8, 8, 24, 24), COLORS[0], size=(40, 30))
    ds = D.image_folder("test", root=str(tmp_path / "f"), image_size=16)
    assert torch.equal(ds.preprocess(Image.open(ds.samples[0][0])), ds[0][0])


# --------------------------------------------------------------------------- through the command line

RECIPE = """
[data]
dataset = "{dataset}"
root = "{root}"
image_size = 16
batch_size = 2
[stages.s]
model.backbone = {{ name = "timm", model = "resnet10t", out_index = 2 }}
model.head = {{ name = "linear" }}
losses = ["cross_entropy"]
[[stages.s.phases]]
epochs = 1
groups = [{{ params = ["backbone", "head"], lr = 1e-3 }}]
"""


def _recipe(path: Path, dataset: str, root: str, extra: str = "") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(RECIPE.format(dataset=dataset, root=root) + extra)
    return path


def _cli(argv, capsys):
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("dataset, missing", [("cub200", "images.txt"), ("stanford_cars", "devkit/cars_meta.mat")])
def test_missing_file_is_one_line_exit_2_in_the_run_preflight(tmp_path, capsys, dataset, missing):
    root = make_cub(tmp_path) if dataset == "cub200" else make_cars(tmp_path)
    (root / missing).unlink()
    recipe = _recipe(tmp_path / "r.toml", dataset, str(root))
    for argv in (["run", str(recipe), "--out", str(tmp_path / "run"), "-q"], ["check", str(recipe), "-q"]):
        code, out, err = _cli(argv, capsys)
        assert code == 2 and len(err.strip().splitlines()) == 1, err
        assert err.startswith(f"kdt: error: {recipe}: stages.s.data: ") and str(root.resolve()) in err
        assert Path(missing).name in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()


def test_relative_paths_resolve_against_the_recipe_folder(tmp_path, monkeypatch, capsys):
    from kdtoolkit.use.rundir import StageDir
    from kdtoolkit.recipe.loader import load_recipe

    cub = make_cub(tmp_path / "data")
    (tmp_path / "recipes" / "w").mkdir(parents=True)
    (tmp_path / "recipes" / "w" / "backbone.safetensors").write_bytes(b"")
    _recipe(
        tmp_path / "recipes" / "base.toml",
        "cub200",
        "../data/CUB_200_2011",
        '[stages.t]\nbase = "s"\n'
        'model.backbone = { name = "timm", model = "resnet10t", weights = "w/backbone.safetensors" }\n',
    )
    child = tmp_path / "recipes" / "sub" / "child.toml"
    child.parent.mkdir()
    child.write_text('extends = "../base.toml"\n[stages.u]\nbase = "s"\ndata.image_size = 8\n')
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    rec = load_recipe("../recipes/sub/child.toml")
    for stage in ("s", "t", "u"):
        assert rec.stage(stage)["data"]["root"] == str(cub)
    assert rec.stage("t")["model"]["backbone"]["weights"] == str(tmp_path / "recipes" / "w" / "backbone.safetensors")
    (elsewhere / "cub").symlink_to(cub)
    over = load_recipe("../recipes/sub/child.toml", ["data.root=cub"])  # --set: relative to the working directory
    assert over.stage("u")["data"]["root"] == str(elsewhere / "cub")
    run = tmp_path / "run"
    (run / "u").mkdir(parents=True)
    (run / "recipe.resolved.json").write_text(json.dumps(rec.resolved))
    monkeypatch.chdir(tmp_path / "recipes")  # another directory again: the stored paths are absolute
    assert StageDir.open(run / "u").data().test.targets == [0, 1, 2]
    code, out, err = _cli(["validate", "sub/child.toml", "--set", "stages.s.model.weights=missing.safetensors"], capsys)
    assert code == 2 and f"file not found: missing.safetensors ({tmp_path / 'recipes' / 'missing.safetensors'})" in err


def _truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def test_kdt_check_lists_every_unreadable_image(tmp_path, capsys):
    cub = make_cub(tmp_path)
    recipe = _recipe(
        tmp_path / "r.toml",
        "cub200",
        str(cub),
        '[stages.k]\nbase = "s"\ndata.batch_size = 3\n[stages.d]\nbase = "s"\ndata.dataset = "digits"\n',
    )
    code, out, err = _cli(["check", str(recipe), "-q"], capsys)
    assert code == 0, err
    assert "| cub200:" in out and "| s, k |" in out and "| digits | test | d |" in out
    ds = P.cub200("train", root=str(cub))
    bad = [Path(ds.samples[0][0]), Path(P.cub200("test", root=str(cub)).samples[2][0])]
    _truncate(bad[0])
    bad[1].write_bytes(b"")
    code, out, err = _cli(["check", str(recipe), "-q"], capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 3, err
    assert [l.split(": ")[0] for l in lines[:2]] == [str(p) for p in bad]
    assert lines[2] == f"kdt: error: {recipe}: 2 of {6 + 1797} images cannot be read (listed above); fix or remove them"
    code, out, err = _cli(["run", str(recipe), "--check-data", "--out", str(tmp_path / "run"), "-q"], capsys)
    assert code == 2 and err.strip().splitlines()[-1].startswith(f"kdt: error: {recipe}: 2 of")
    assert not (tmp_path / "run").exists()
