"""ProtoPNet's augmentation online (kdt_data.augment, image_folder's ``augmentation``) and offline (``kdt prepare``)."""

from __future__ import annotations

import json
import pickle
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from kdt_data import augment as A
from kdt_data import datasets as D
from kdt_data.prepare import output_name, run_prepare
from kdtoolkit.cli.commands import _main
from kdtoolkit.foundation.errors import DataError, KdtError


def _picture(w=60, h=48, mode="RGB", seed=0):
    """A smooth, asymmetric picture (a flip or a warp changes it)."""
    rng = np.random.default_rng(seed)
    small = (rng.random((h // 6, w // 6, 3)) * 255).astype(np.uint8)
    im = Image.fromarray(small).resize((w, h), Image.Resampling.BICUBIC)
    return im.convert(mode)


def _tree(root: Path, classes=("b", "a"), per_class=2, size=(40, 32), ext=".jpg"):
    for c, cls in enumerate(classes):
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            _picture(*size, seed=10 * c + i).save(root / cls / f"img{i}{ext}")
    return root


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# --------------------------------------------------------------------------- operations


@pytest.mark.parametrize("mode", ["RGB", "L"])
@pytest.mark.parametrize("op", A.OPS)
def test_each_op_changes_the_image_and_keeps_size_and_mode(op, mode):
    im = _picture(mode=mode)
    g = torch.Generator().manual_seed(1)
    outs = [A.apply_op(im, op, g) for _ in range(3)]
    for out in outs:
        assert out.size == im.size and out.mode == mode
        assert np.abs(np.asarray(out, dtype=float) - np.asarray(im, dtype=float)).mean() > 1.0
    assert not np.array_equal(np.asarray(outs[0]), np.asarray(outs[1]))  # fresh parameters each call


@pytest.mark.parametrize("op", A.OPS)
def test_no_op_brings_in_pixels_from_outside_the_image(op):
    white = Image.new("RGB", (64, 48), (255, 255, 255))
    g = torch.Generator().manual_seed(2)
    for _ in range(20):
        assert np.asarray(A.apply_op(white, op, g)).min() == 255


@pytest.mark.parametrize("op", A.OPS)
def test_same_seed_same_output(op):
    im = _picture()
    a = A.apply_op(im, op, torch.Generator().manual_seed(7))
    b = A.apply_op(im, op, torch.Generator().manual_seed(7))
    assert a.tobytes() == b.tobytes()
    torch.manual_seed(3)
    c = A.build_augmentation("protopnet")(im)  # torch's global RNG
    torch.manual_seed(3)
    assert A.build_augmentation("protopnet")(im).tobytes() == c.tobytes()


def test_flip_happens_about_half_the_time():
    im = _picture()
    flipped = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT).tobytes()
    g = torch.Generator().manual_seed(4)
    aug = A.build_augmentation("flip")
    n = sum(aug(im, g).tobytes() == flipped for _ in range(400))
    assert 160 <= n <= 240  # 200 ± 4 sigma
    assert A.build_augmentation("none")(im, g) is im


def test_protopnet_draws_one_op_uniformly_then_flips(monkeypatch):
    calls = Counter()
    for op in A.OPS:
        monkeypatch.setitem(A._OP_FUNCTIONS, op, lambda img, g, op=op: calls.update([op]) or img)
    aug = A.build_augmentation("protopnet")
    g = torch.Generator().manual_seed(5)
    im = _picture(8, 8)
    for _ in range(800):
        aug(im, g)
    assert sum(calls.values()) == 800 and set(calls) == set(A.OPS)
    assert all(150 <= calls[op] <= 250 for op in A.OPS), calls  # 200 each, ± 4 sigma
    assert A.build_augmentation("protopnet", ops=("rotate",)).ops == ("rotate",)


def test_build_augmentation_refuses_unknown_names():
    with pytest.raises(ValueError, match="unknown augmentation 'protopnt'"):
        A.build_augmentation("protopnt")
    with pytest.raises(ValueError, match="unknown augmentation operation"):
        A.build_augmentation("protopnet", ops=("rotate", "zoom"))


# --------------------------------------------------------------------------- image_folder


def _folder(tmp_path):
    for split in ("train", "test"):
        _tree(tmp_path / "f" / split, size=(40, 32), ext=".png")
    return str(tmp_path / "f")


def test_image_folder_augmentation_key(tmp_path):
    root = _folder(tmp_path)
    ds = D.image_folder("train", True, root=root, image_size=16, augmentation="protopnet")
    plain = D.image_folder("train", False, root=root, image_size=16)
    torch.manual_seed(0)
    a = [ds[i][0] for i in range(len(ds))]
    torch.manual_seed(0)
    assert all(torch.equal(x, ds[i][0]) for i, x in enumerate(a))
    assert any(not torch.equal(x, plain[i][0]) for i, x in enumerate(a))
    assert a[0].shape == (3, 16, 16)
    assert pickle.loads(pickle.dumps(ds)).augmentation.ops == A.OPS  # for DataLoader workers
    none = D.image_folder("train", True, root=root, image_size=16, augmentation="none")
    assert torch.equal(none[1][0], plain[1][0])
    with pytest.raises(DataError, match=r"image_folder: augmentation: augmentation must be one of 'crop_flip'"):
        D.image_folder("train", True, root=root, augmentation="Augmentor")


RECIPE = """
seed = 3
checkpoint_every = 0
[data]
dataset = "image_folder"
root = "{root}"
image_size = 16
resize = 16
batch_size = 4
augmentation = "protopnet"
[stages.s]
model.backbone = {{ name = "timm", model = "resnet10t", out_index = 1 }}
model.head = {{ name = "linear" }}
losses = ["cross_entropy"]
[[stages.s.phases]]
epochs = 1
groups = [{{ params = ["backbone", "head"], lr = 0.01 }}]
"""


def test_protopnet_image_folder_run_is_repeatable(tmp_path):
    from safetensors.torch import load_file

    from kdtoolkit.testing import run_recipe

    text = RECIPE.format(root=_folder(tmp_path))
    weights = []
    for name in ("one", "two"):
        run_recipe(text, out=tmp_path / name)
        weights.append(load_file(str(tmp_path / name / "s" / "model.safetensors")))
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


# --------------------------------------------------------------------------- kdt prepare


def test_prepare_writes_every_copy_and_is_deterministic(tmp_path):
    src = _tree(tmp_path / "src")
    summary = run_prepare(src, tmp_path / "out", copies=2, quiet=True)
    assert summary["written"] == summary["outputs"] == 2 * 2 * 4 * 2 and summary["existing"] == 0
    names = sorted(p.name for p in (tmp_path / "out" / "a").iterdir())
    assert len(names) == 16 and names[0] == "img0_distort_00.jpg"
    out = Image.open(tmp_path / "out" / "a" / "img1_skew_01.jpg")
    assert out.size == (40, 32) and out.format == "JPEG"
    run_prepare(src, tmp_path / "again", copies=2, quiet=True)
    assert _files(tmp_path / "out") == _files(tmp_path / "again")
    other = run_prepare(src, tmp_path / "other", copies=2, seed=1, quiet=True)
    assert other["written"] == 32 and _files(tmp_path / "out") != _files(tmp_path / "other")
    assert output_name(Path("x/y.PNG"), "rotate", 3) == "y_rotate_03.png"
    assert output_name(Path("y.bmp"), "shear", 0) == "y_shear_00.png"


def test_prepare_resumes_to_the_same_bytes(tmp_path):
    src = _tree(tmp_path / "src", ext=".png")
    run_prepare(src, tmp_path / "full", copies=2, ops=("rotate", "distort"), quiet=True)
    full = _files(tmp_path / "full")
    shutil.copytree(tmp_path / "full", tmp_path / "part")
    part = tmp_path / "part" / "b"
    (part / "img0_rotate_01.png").unlink()
    (part / "img1_distort_00.png").unlink()
    (part / ".img1_distort_00.png.part").write_bytes(b"half an image")  # an interrupted write
    (part / "img0_distort_00.png").write_bytes(b"")  # an empty file counts as missing
    summary = run_prepare(src, tmp_path / "part", copies=2, ops=("rotate", "distort"), quiet=True)
    assert summary["written"] == 3 and summary["existing"] == 13
    assert _files(tmp_path / "part") == full
    with pytest.raises(KdtError, match="prepared with seed 0, not 1"):  # resuming with another seed would mix them
        run_prepare(src, tmp_path / "part", copies=2, ops=("rotate", "distort"), seed=1, quiet=True)
    assert _files(tmp_path / "part") == full


def test_prepare_with_worker_threads_writes_the_same_bytes(tmp_path):
    src = _tree(tmp_path / "src", classes=("a",), per_class=2)
    run_prepare(src, tmp_path / "w0", copies=1, ops=("skew", "shear"), quiet=True)
    run_prepare(src, tmp_path / "w1", copies=1, ops=("skew", "shear"), workers=2, quiet=True)
    assert _files(tmp_path / "w0") == _files(tmp_path / "w1")


def _cli_error(capsys, args):
    code = _main(["prepare", *map(str, args), "-q"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    return err


def test_prepare_command_and_its_errors(tmp_path, capsys):
    src = _tree(tmp_path / "src", classes=("a",), per_class=1)
    assert _main(["prepare", str(src), str(tmp_path / "out"), "--copies", "1", "--ops", "rotate", "-q"]) == 0
    assert capsys.readouterr().out.startswith("1 images written, 0 already there")
    assert "SRC_ROOT does not exist" in _cli_error(capsys, [tmp_path / "nope", tmp_path / "o"])
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    assert "class folder has no images" in _cli_error(capsys, [tmp_path / "empty", tmp_path / "o"])
    assert "no class sub-folders" in _cli_error(capsys, [tmp_path / "empty" / "cls", tmp_path / "o"])
    (tmp_path / "file").write_text("")
    assert "output folder is not writable" in _cli_error(capsys, [src, tmp_path / "file" / "out"])
    assert "must not be SRC_ROOT or inside it" in _cli_error(capsys, [src, src / "aug"])
    assert "--ops: unknown operation(s) zoom" in _cli_error(capsys, [src, tmp_path / "o", "--ops", "rotate,zoom"])
    assert "--copies: expected an integer of at least 1" in _cli_error(capsys, [src, tmp_path / "o", "--copies", "0"])
    (src / "a" / "bad.png").write_bytes(b"not a png")
    assert "bad.png: cannot read image" in _cli_error(capsys, [src, tmp_path / "o2"])
    with pytest.raises(KdtError, match="share output names"):
        (src / "a" / "img0.png").write_bytes((src / "a" / "img0.jpg").read_bytes())
        run_prepare(src, tmp_path / "o3", quiet=True)


def test_prepare_help_imports_neither_torch_nor_pillow():
    code = (
        "import sys, json\nfrom kdtoolkit.cli.commands import _main\nassert _main(['prepare', '--help']) == 0\n"
        "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'PIL', 'torchvision'})))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == []
