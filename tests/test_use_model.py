"""kdt predict, kdt evaluate and kdt export on a finished tiny Proto2Proto run."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from kdtoolkit.cli.commands import main
from kdtoolkit.use.rundir import StageDir
from kdtoolkit.results.records import Records


def _digit_pngs(folder, stage: StageDir, indices):
    """Test-split digits written as 8x8 grey PNGs (the dataset's own resolution)."""
    from sklearn.datasets import load_digits

    test = stage.data().test
    images = load_digits().images
    paths = []
    for i in indices:
        j = int(test.indices[i])
        path = folder / f"sub{i % 2}" / f"test{i:03d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.round(images[j] * 255 / 16).astype(np.uint8)).save(path)
        paths.append(path)
    return test, paths


def test_predict_prepares_images_as_the_test_split_and_lists_prototypes(proto_run, tmp_path, capsys):
    _, out, _ = proto_run
    stage = StageDir.open(out / "kd")
    test, paths = _digit_pngs(tmp_path / "imgs", stage, range(6))
    assert (
        main(
            ["predict", str(out / "kd"), str(tmp_path / "imgs"), "--top", "3", "--json", str(tmp_path / "p.json"), "-q"]
        )
        == 0
    )
    rows = json.loads((tmp_path / "p.json").read_text())
    assert [r["image"] for r in rows] == [str(p) for p in sorted(paths)]  # folders are searched recursively, sorted
    model = stage.model("cpu")
    head = model.head
    for row in rows:
        i = int(row["image"][-7:-4])
        x = test.preprocess(Image.open(row["image"]))
        # the file's preprocessing equals the dataset's own test image up to the PNG's 8-bit rounding
        assert torch.allclose(x, test[i][0], atol=0.5 / 255 / 0.33 + 1e-6)
        with torch.no_grad():
            o = model(x[None])
        probs = torch.softmax(o["logits"], 1)[0]
        assert row["prediction"] == int(probs.argmax()) and row["class"] == str(row["prediction"])
        assert row["probability"] == pytest.approx(float(probs.max()), abs=1e-4)  # batched vs single forward
        protos = row["top_prototypes"]
        assert len(protos) == 3
        sims = [p["similarity"] for p in protos]
        assert sims == sorted(sims, reverse=True) and sims[0] == pytest.approx(float(o["similarities"].max()), abs=1e-3)
        for p in protos:
            j = p["prototype"]
            w = float(head.last_layer.weight.detach()[row["prediction"], j])
            assert p["contribution"] == pytest.approx(p["similarity"] * w, rel=1e-4, abs=1e-5)
            assert p["class"] == str(j // 2)  # 2 prototypes per class
            loc = int(o["argmin"][0, j])
            assert p["location"] == [loc // o["features"].shape[-1], loc % o["features"].shape[-1]]
    capsys.readouterr()
    assert main(["predict", str(out / "kd"), str(paths[0]), "--top", "0"]) == 0
    printed = capsys.readouterr().out
    assert str(paths[0]) in printed and "| image | class | probability | top prototypes |" in printed


def test_predict_refuses_missing_and_unreadable_images_with_one_line(proto_run, tmp_path, capsys):
    _, out, _ = proto_run
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    empty = tmp_path / "empty"
    empty.mkdir()
    for arg, expect in (
        (tmp_path / "nope.png", "no such file or folder"),
        (bad, "cannot read image"),
        (empty, "folder has no images"),
    ):
        assert main(["predict", str(out / "kd"), str(arg), "-q"]) == 2
        err = capsys.readouterr().err
        assert expect in err and str(arg) in err and err.count("\n") == 1
    assert main(["predict", str(out), str(bad), "-q"]) == 2  # the run directory is not a stage
    assert "not a run directory" in capsys.readouterr().err


def test_evaluate_on_the_same_data_reproduces_the_stage_and_writes_elsewhere(proto_run, tmp_path, capsys):
    _, out, results = proto_run
    own = out / "kd" / "records.safetensors"
    before = own.read_bytes()
    assert main(["evaluate", str(out / "kd"), "--out", str(tmp_path / "ev"), "--json", "-q"]) == 0
    result = json.loads(capsys.readouterr().out)
    kd = results["stages"]["kd"]
    assert result["accuracy"] == kd["accuracy"] and result["pms"] == pytest.approx(kd["pms"], abs=1e-12)
    assert result["ajs"] == kd["ajs"] and result["reference"] == "teacher"
    a, b = Records.load(tmp_path / "ev" / "records.safetensors"), Records.load(own)
    assert all(torch.equal(a[k], b[k]) for k in ("logits", "labels", "min_distances", "argmin"))
    assert (tmp_path / "ev" / "reference-records.safetensors").is_file()
    assert json.loads((tmp_path / "ev" / "evaluation.json").read_text())["accuracy"] == kd["accuracy"]
    assert own.read_bytes() == before


def test_evaluate_another_split_and_changed_data(proto_run, capsys):
    _, out, _ = proto_run
    assert main(["evaluate", str(out / "baseline"), "--split", "train", "--data", "eval_batch_size=100", "-q"]) == 0
    printed = capsys.readouterr().out
    folder = next((out / "baseline" / "evaluations").iterdir())
    ev = json.loads((folder / "evaluation.json").read_text())
    assert ev["split"] == "train" and ev["test_images"] == 1438 and ev["data"]["eval_batch_size"] == 100
    assert f"written: {folder}" in printed and "| accuracy |" in printed
    assert "| ajs τ=inf |" in printed  # per-τ metrics are one row each


@pytest.mark.parametrize(
    "args, expect",
    [
        (["--data", "nosuch=1"], "--data: data.nosuch: unknown key"),
        (["--data", "image_size"], "expected KEY=VALUE"),
        (["--data", "dataset=image_folder"], "data.root: missing required key"),
    ],
)
def test_evaluate_refuses_bad_data_with_one_line(proto_run, capsys, args, expect):
    _, out, _ = proto_run
    assert main(["evaluate", str(out / "kd"), *args, "-q"]) == 2
    err = capsys.readouterr().err
    assert expect in err and err.count("\n") == 1


def test_evaluate_refuses_data_with_another_class_count(proto_run, tmp_path, capsys):
    _, out, _ = proto_run
    for split in ("train", "test"):
        for cls in ("a", "b", "c"):
            (tmp_path / "f" / split / cls).mkdir(parents=True)
            Image.new("RGB", (20, 20), (10, 20, 30)).save(tmp_path / "f" / split / cls / "x.png")
    assert (
        main(
            [
                "evaluate",
                str(out / "kd"),
                "--data",
                "dataset=image_folder",
                "--data",
                f"root={tmp_path / 'f'}",
                "--data",
                "image_size=16",
                "-q",
            ]
        )
        == 2
    )
    assert "the data has 3 classes, stage 'kd' was trained on 10" in capsys.readouterr().err


def test_evaluate_refuses_classes_in_another_order(proto_run, tmp_path, capsys):
    _, out, _ = proto_run
    names = [f"digit_{c}" for c in range(10)]  # 10 classes, but not the names (and order) the model was trained on
    for split in ("train", "test"):
        for cls in names:
            (tmp_path / "f" / split / cls).mkdir(parents=True)
            Image.new("RGB", (20, 20), (10, 20, 30)).save(tmp_path / "f" / split / cls / "x.png")
    assert (
        main(
            [
                "evaluate",
                str(out / "kd"),
                "--data",
                "dataset=image_folder",
                "--data",
                f"root={tmp_path / 'f'}",
                "--data",
                "image_size=16",
                "-q",
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert "classes differ from those stage 'kd' was trained on (label 0: 'digit_0' here, '0' in training)" in err


@pytest.mark.parametrize("fmt", ["exported-program", "torchscript"])
def test_export_gives_the_stages_logits(proto_run, tmp_path, capsys, fmt):
    _, out, _ = proto_run
    stage = StageDir.open(out / "kd")
    path = tmp_path / ("m.pt2" if fmt == "exported-program" else "m.pt")
    assert main(["export", str(out / "kd"), "--format", fmt, "--out", str(path)]) == 0
    assert f"written: {path}" in capsys.readouterr().out
    test = stage.data().test
    x = torch.stack([test[i][0] for i in range(5)])  # another batch size than the export's example
    with torch.no_grad():
        ref = stage.model("cpu")(x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if fmt == "exported-program":
            extra = {"kdtoolkit.json": ""}
            loaded = torch.export.load(str(path), extra_files=extra).module()
        else:
            extra = {"kdtoolkit.json": ""}
            loaded = torch.jit.load(str(path), _extra_files=extra)
        got = loaded(x)
    assert set(got) == {"logits", "min_distances", "argmin"}
    assert torch.allclose(got["logits"], ref["logits"], atol=1e-5, rtol=0)
    assert torch.equal(got["argmin"], ref["argmin"])
    info = json.loads(extra["kdtoolkit.json"])
    assert info["classes"] == [str(c) for c in range(10)] and info["input_shape"] == [None, 3, 16, 16]
    assert info["data"]["dataset"] == "digits" and info["outputs"] == ["logits", "min_distances", "argmin"]


def test_export_and_evaluate_refuse_what_would_overwrite_or_cannot_work(proto_run, tmp_path, capsys):
    import shutil

    _, out, _ = proto_run
    assert main(["export", str(out / "kd"), "--format", "onnx"]) == 2
    assert "Invalid value for '--format'" in capsys.readouterr().err
    run = tmp_path / "run"
    shutil.copytree(out, run)
    (run / "nostage").mkdir()
    assert main(["export", str(run / "nostage"), "--format", "torchscript"]) == 2
    assert "stage 'nostage' is not in the run's recipe" in capsys.readouterr().err
    weights = run / "kd" / "model.safetensors"
    before = weights.read_bytes()
    assert main(["export", str(run / "kd"), "--format", "torchscript", "--out", str(weights)]) == 2
    assert "refusing to write an exported model over model.safetensors" in capsys.readouterr().err
    assert weights.read_bytes() == before
    records = (run / "kd" / "records.safetensors").read_bytes()
    assert main(["evaluate", str(run / "kd"), "--out", str(run / "kd"), "-q"]) == 2
    assert "it is a run or stage directory" in capsys.readouterr().err
    assert (run / "kd" / "records.safetensors").read_bytes() == records
    weights.unlink()
    assert main(["export", str(run / "kd"), "--format", "torchscript"]) == 2
    assert "not a trained stage (no model.safetensors)" in capsys.readouterr().err
