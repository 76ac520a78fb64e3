"""Tests of the dataset factories in plugins/kdt_data/datasets.py."""

import inspect
import os
from collections import Counter

import pytest
import torch
from PIL import Image
from torch.utils.data import Dataset

from kdt_data import datasets as D
from kdtoolkit.foundation.errors import DataError

ALLOWED_TYPES = {int, float, bool, str, list[int], list[float], list[str], str | None, int | None, float | None}


# --------------------------------------------------------------------------- signatures


@pytest.mark.parametrize("factory", [D.digits, D.image_folder])
def test_factory_params_are_typed_keywords_and_documented(factory):
    sig = inspect.signature(factory)
    names = list(sig.parameters)
    assert names[:2] == ["split", "augment"]
    doc = inspect.getdoc(factory)
    for name in names[2:]:
        p = sig.parameters[name]
        assert p.kind is inspect.Parameter.KEYWORD_ONLY, name
        assert p.annotation in ALLOWED_TYPES, (name, p.annotation)
        assert f"{name}:" in doc, f"{name} not documented"


# --------------------------------------------------------------------------- digits


def test_digits_items_shapes_dtypes_labels():
    ds = D.digits("train", image_size=16)
    assert isinstance(ds, Dataset)
    assert ds.classes == [str(i) for i in range(10)]
    assert ds.num_classes == 10 and ds.image_size == 16 and ds.name == "digits"
    img, label = ds[0]
    assert img.dtype == torch.float32 and img.shape == (3, 16, 16)
    assert type(label) is int and 0 <= label < 10
    assert torch.equal(img[0], img[1]) and torch.equal(img[0], img[2])
    labels = {ds[i][1] for i in range(len(ds))}
    assert labels == set(range(10))


def test_digits_normalize_and_range():
    raw, _ = D.digits("test", normalize=False)[3]
    assert raw.min() >= 0.0 and raw.max() <= 1.0 and raw.max() > 0.5
    norm, _ = D.digits("test", normalize=True)[3]
    assert torch.allclose(norm, (raw - D.DIGITS_MEAN) / D.DIGITS_STD, atol=1e-6)


def test_digits_split_sizes_and_stratification():
    train, test = D.digits("train"), D.digits("test")
    assert len(train) + len(test) == 1797
    assert abs(len(test) - 0.2 * 1797) <= 10
    train_counts, test_counts = Counter(train.targets), Counter(test.targets)
    for c in range(10):
        total = train_counts[c] + test_counts[c]
        assert abs(test_counts[c] - 0.2 * total) <= 1, c
    half = D.digits("test", test_fraction=0.5)
    assert abs(len(half) - 1797 / 2) <= 10


def test_digits_split_disjoint_fixed_and_independent_of_torch_seed():
    torch.manual_seed(1)
    D._DIGITS_CACHE.pop(("split", 0.2, 0), None)
    a_train, a_test = D.digits("train"), D.digits("test")
    assert set(a_train.indices.tolist()).isdisjoint(a_test.indices.tolist())
    assert len(set(a_train.indices.tolist()) | set(a_test.indices.tolist())) == 1797
    torch.manual_seed(12345)
    D._DIGITS_CACHE.pop(("split", 0.2, 0), None)  # recompute under another torch seed
    b_test = D.digits("test")
    assert torch.equal(a_test.indices, b_test.indices)
    assert torch.equal(a_test[5][0], b_test[5][0])
    other = D.digits("test", split_seed=1)
    assert not torch.equal(a_test.indices, other.indices)


def test_digits_augmentation_changes_images_keeps_shape_and_is_repeatable():
    plain = D.digits("train", image_size=32)
    aug = D.digits("train", True, image_size=32)
    torch.manual_seed(0)
    first = torch.stack([aug[i][0] for i in range(8)])
    torch.manual_seed(0)
    second = torch.stack([aug[i][0] for i in range(8)])
    base = torch.stack([plain[i][0] for i in range(8)])
    assert first.shape == base.shape == (8, 3, 32, 32)
    assert torch.equal(first, second)
    assert not torch.allclose(first, base, atol=1e-3)
    assert [aug[i][1] for i in range(8)] == [plain[i][1] for i in range(8)]
    third = torch.stack([aug[i][0] for i in range(8)])  # RNG moved on: different draws
    assert not torch.equal(first, third)
    # Un-augmented items do not touch the RNG and are deterministic.
    torch.manual_seed(0)
    plain[0]
    after_item = torch.rand(3)
    torch.manual_seed(0)
    assert torch.equal(after_item, torch.rand(3))


def _digits_item_one_at_a_time(ds, i):
    """An item computed as the dataset computed it before it kept its images upsampled:
    one image interpolated, (augmented,) clamped, made RGB and normalised on its own."""
    import torch.nn.functional as F

    j = int(ds.indices[i])
    img = F.interpolate(
        ds._images[j].reshape(1, 1, 8, 8), size=(ds.image_size, ds.image_size), mode="bilinear", align_corners=False
    ).squeeze(0)
    if ds.augment:
        img = D._random_affine(img, max_shift_px=2.0 * ds.image_size / 32.0)
    img = img.clamp_(0.0, 1.0).expand(3, -1, -1).contiguous()
    if ds.normalize:
        img = (img - D.DIGITS_MEAN) / D.DIGITS_STD
    return img, int(ds._labels[j])


@pytest.mark.parametrize("augment", [False, True])
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("size", [32, 56])
def test_digits_items_equal_the_one_image_at_a_time_computation(augment, normalize, size):
    ds = D.digits("train", augment, image_size=size, normalize=normalize)
    for i in (0, 1, 17, len(ds) - 1):
        torch.manual_seed(i)
        got, label = ds[i]
        torch.manual_seed(i)
        want, want_label = _digits_item_one_at_a_time(ds, i)
        assert label == want_label and got.shape == want.shape == (3, size, size) and got.is_contiguous()
        assert torch.equal(got, want), (i, (got - want).abs().max())
    got[:] = 7.0  # an item is a copy: changing it changes nothing kept
    assert not torch.equal(ds[len(ds) - 1][0], got)


@pytest.mark.parametrize("augment", [False, True])
def test_digits_get_batch_equals_collating_its_items(augment):
    from kdtoolkit.engine.data import batch_plan, batches

    ds = D.digits("train", augment, image_size=32)
    idx = [5, 0, 17, 5, len(ds) - 1]
    torch.manual_seed(3)
    x, y = ds.get_batch(idx)
    torch.manual_seed(3)
    want_x, want_y = torch.utils.data.default_collate([ds[i] for i in idx])
    assert torch.equal(x, want_x) and torch.equal(y, want_y) and y.dtype == want_y.dtype and x.is_contiguous()
    # batches() uses it without workers: the same batches, the same global RNG draws, as the DataLoader gives
    plan = batch_plan(len(ds), 64, shuffle=True, seed=7, limit=3)
    torch.manual_seed(4)
    fast = list(batches(ds, 64, shuffle=True, seed=7, plan=plan))
    after_fast = torch.rand(3)
    torch.manual_seed(4)
    loader = torch.utils.data.DataLoader(ds, batch_sampler=plan, generator=torch.Generator().manual_seed(7))
    slow = list(loader)
    assert torch.equal(torch.rand(3), after_fast)
    assert len(fast) == len(slow) == 3
    for (fx, fy), (sx, sy) in zip(fast, slow):
        assert torch.equal(fx, sx) and torch.equal(fy, sy)


@pytest.mark.parametrize(
    "params, key",
    [
        ({"image_size": 4}, "image_size"),
        ({"image_size": 32.0}, "image_size"),
        ({"test_fraction": 0.0}, "test_fraction"),
        ({"test_fraction": 1.0}, "test_fraction"),
        ({"test_fraction": -0.3}, "test_fraction"),
    ],
)
def test_digits_param_validation(params, key):
    with pytest.raises(DataError) as info:
        D.digits("train", **params)
    assert info.value.key == key
    assert key in str(info.value)


def test_bad_split_name():
    with pytest.raises(DataError, match="split"):
        D.digits("validation")


def test_describe_dataset():
    ds = D.digits("test", image_size=12)
    assert D.describe_dataset(ds) == {"name": "digits", "num_classes": 10, "size": len(ds), "image_size": 12}


# --------------------------------------------------------------------------- image folders

COLORS = {"zebra": (250, 10, 10), "apple": (10, 250, 10), "mango": (10, 10, 250)}


def _make_tree(root, classes=("zebra", "apple", "mango"), per_class=3, splits=("train", "test"), size=12):
    for split in splits:
        for cls in classes:
            folder = root / split / cls
            folder.mkdir(parents=True, exist_ok=True)
            for k in range(per_class):
                im = Image.new("RGB", (size, size), COLORS.get(cls, (128, 128, 128)))
                for x in range(size):  # a gradient so crops/flips are visible
                    im.putpixel((x, k % size), (x * 20 % 256, 0, 0))
                im.save(folder / f"img{k}.png")
    return root


def test_image_folder_items_and_class_order(tmp_path):
    root = _make_tree(tmp_path / "data")
    (root / "train" / "apple" / "notes.txt").write_text("not an image")
    ds = D.image_folder("train", root=str(root), image_size=8)
    assert ds.classes == ["apple", "mango", "zebra"]
    assert ds.num_classes == 3 and len(ds) == 9 and ds.image_size == 8
    assert ds.name == f"image_folder:{root.resolve()}"
    img, label = ds[0]
    assert img.dtype == torch.float32 and img.shape == (3, 8, 8) and type(label) is int
    assert ds.targets == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    # Class 'apple' is green: after normalization green channel is the largest at a plain pixel.
    assert img[1, 6, 6] > img[0, 6, 6] and img[1, 6, 6] > img[2, 6, 6]
    test = D.image_folder("test", root=str(root), image_size=8)
    assert test.classes == ds.classes and len(test) == 9
    assert D.describe_dataset(test)["size"] == 9


def test_image_folder_eval_transform_deterministic_and_normalized(tmp_path):
    root = _make_tree(tmp_path / "data")
    ds = D.image_folder("test", root=str(root), image_size=12, resize=12, mean=[0.0, 0.0, 0.0], std=[1.0, 1.0, 1.0])
    torch.manual_seed(0)
    a = ds[4][0]
    torch.manual_seed(99)
    b = ds[4][0]
    assert torch.equal(a, b)
    # With resize == image_size and identity normalization the pixels are exact.
    expected = torch.tensor([10, 10, 250], dtype=torch.float32) / 255
    assert torch.allclose(a[:, 6, 6], expected)


def test_image_folder_augmentation_repeatable(tmp_path):
    root = _make_tree(tmp_path / "data", size=24)
    ds = D.image_folder("train", True, root=str(root), image_size=12, resize=24)
    torch.manual_seed(3)
    first = torch.stack([ds[i][0] for i in range(len(ds))])
    torch.manual_seed(3)
    second = torch.stack([ds[i][0] for i in range(len(ds))])
    assert first.shape == (9, 3, 12, 12)
    assert torch.equal(first, second)
    draws = {tuple(ds[0][0].flatten().tolist()) for _ in range(20)}
    assert len(draws) > 1
    fixed = D.image_folder("train", True, root=str(root), image_size=12, resize=24, hflip=False, random_crop=False)
    assert len({tuple(fixed[0][0].flatten().tolist()) for _ in range(5)}) == 1


def test_image_folder_missing_root(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(DataError) as info:
        D.image_folder("train", root=str(missing))
    assert str(missing) in str(info.value) and "does not exist" in str(info.value)


def test_image_folder_missing_split_folder(tmp_path):
    root = _make_tree(tmp_path / "data", splits=("train",))
    with pytest.raises(DataError) as info:
        D.image_folder("test", root=str(root))
    assert str(root / "test") in str(info.value)


def test_image_folder_no_class_folders(tmp_path):
    (tmp_path / "data" / "train").mkdir(parents=True)
    with pytest.raises(DataError, match="no class sub-folders") as info:
        D.image_folder("train", root=str(tmp_path / "data"))
    assert str(tmp_path / "data" / "train") in str(info.value)


def test_image_folder_empty_class_folder(tmp_path):
    root = _make_tree(tmp_path / "data")
    (root / "train" / "kiwi").mkdir()
    (root / "train" / "kiwi" / "readme.txt").write_text("no images here")
    with pytest.raises(DataError, match="no images") as info:
        D.image_folder("train", root=str(root))
    assert str(root / "train" / "kiwi") in str(info.value)


def test_image_folder_mismatched_class_sets(tmp_path):
    root = _make_tree(tmp_path / "data", splits=("train",))
    _make_tree(root, classes=("apple", "mango", "pear"), splits=("test",))
    with pytest.raises(DataError) as info:
        D.image_folder("test", root=str(root))
    msg = str(info.value)
    assert "zebra" in msg and "pear" in msg and "apple" not in msg.split("differ")[1]
    assert len(msg.splitlines()) == 1


def test_image_folder_corrupt_image_names_file(tmp_path):
    root = _make_tree(tmp_path / "data")
    bad = root / "train" / "apple" / "img9.png"
    bad.write_bytes(os.urandom(200))
    truncated = root / "train" / "mango" / "img9.png"
    good_bytes = (root / "train" / "mango" / "img0.png").read_bytes()
    truncated.write_bytes(good_bytes[: len(good_bytes) // 2])
    ds = D.image_folder("train", root=str(root), image_size=8)  # lazy: construction succeeds
    paths = [p for p, _ in ds.samples]
    for broken in (bad, truncated):
        with pytest.raises(DataError) as info:
            ds[paths.index(str(broken.resolve()))]
        assert str(broken.resolve()) in str(info.value)
        assert len(str(info.value).splitlines()) == 1


@pytest.mark.parametrize(
    "params, key",
    [
        ({"mean": [0.5, 0.5]}, "mean"),
        ({"std": [0.2, 0.0, 0.2]}, "std"),
        ({"resize": 4, "image_size": 8}, "resize"),
        ({"image_size": 0}, "image_size"),
    ],
)
def test_image_folder_param_validation(tmp_path, params, key):
    root = _make_tree(tmp_path / "data")
    with pytest.raises(DataError) as info:
        D.image_folder("train", root=str(root), **params)
    assert info.value.key == key


# --------------------------------------------------------------------------- decoded images kept in memory


@pytest.fixture
def kept():
    from kdt_data import imagelist

    imagelist.clear_kept_images()
    yield imagelist
    imagelist.clear_kept_images()


def _items(ds, seed):
    torch.manual_seed(seed)
    return [ds[i] for i in range(len(ds))]


@pytest.mark.parametrize("augmentation", ["crop_flip", "protopnet", "none"])
def test_image_folder_cache_changes_no_item(tmp_path, kept, augmentation):
    _make_tree(tmp_path, size=20)
    cached = D.image_folder("train", True, root=str(tmp_path), image_size=16, augmentation=augmentation)
    fresh = D.image_folder("train", True, root=str(tmp_path), image_size=16, augmentation=augmentation, cache_mb=0)
    first = _items(cached, 1)
    assert len(kept._KEPT) == len(cached) and kept.kept_images_bytes() == len(cached) * 20 * 20 * 4
    for epoch_seed in (2, 3):  # later epochs read the kept images: the same items as decoding again
        for (a, la), (b, lb) in zip(_items(cached, epoch_seed), _items(fresh, epoch_seed)):
            assert la == lb and torch.equal(a, b)
    assert all(torch.equal(a, b) for (a, _), (b, _) in zip(first, _items(fresh, 1)))
    # one copy per file: the un-augmented train split of the same folder reads the same kept images
    D.image_folder("train", False, root=str(tmp_path), image_size=16)[0]
    assert kept.kept_images_bytes() == len(cached) * 20 * 20 * 4
    # the files are no longer read: with them removed, every item still loads, the same as before
    want = _items(fresh, 2)
    for path, _ in cached.samples:
        os.remove(path)
    assert all(torch.equal(a, b) for (a, _), (b, _) in zip(_items(cached, 2), want))
    with pytest.raises(DataError):
        fresh[0]  # cache_mb = 0 reads the file


def test_image_cache_returns_copies_keeps_its_budget_and_stays_in_its_process(tmp_path, kept):
    import pickle

    _make_tree(tmp_path, per_class=4, size=24)
    ds = D.image_folder("test", False, root=str(tmp_path), image_size=16, cache_mb=1)
    kept._KEPT_BYTES[0] = 2**20 - 5 * 24 * 24 * 4  # as if nearly full: room for exactly 5 more images
    for i in range(len(ds)):
        ds.image(i)
    assert len(kept._KEPT) == 5
    im = ds.image(0)
    im.putpixel((0, 0), (1, 2, 3))  # a returned image is a copy
    assert ds.image(0).getpixel((0, 0)) != (1, 2, 3)
    assert "_KEPT" not in pickle.dumps(ds).decode("latin-1")  # what is kept is not part of the dataset
    kept.clear_kept_images()
    ds2 = D.image_folder("test", False, root=str(tmp_path), image_size=16)
    ds2.check_item(0)  # checking the data decodes without keeping
    assert not kept._KEPT


def test_image_cache_is_not_filled_in_workers(tmp_path, kept):
    from kdtoolkit.engine.data import batches

    _make_tree(tmp_path, size=16)
    ds = D.image_folder("train", False, root=str(tmp_path), image_size=16)
    seen = [x for x, _ in batches(ds, 4, shuffle=False, seed=0, num_workers=1)]
    assert seen and not kept._KEPT
    again = [x for x, _ in batches(ds, 4, shuffle=False, seed=0)]
    assert len(kept._KEPT) == len(ds) and all(torch.equal(a, b) for a, b in zip(seen, again))


@pytest.mark.parametrize("value", [-1, 1.5, True, "big"])
def test_cache_mb_validation(tmp_path, value):
    _make_tree(tmp_path)
    with pytest.raises(DataError) as info:
        D.image_folder("train", root=str(tmp_path), cache_mb=value)
    assert info.value.key == "cache_mb"
