"""`kdt metrics`: from run directories, stage directories and records files."""

from __future__ import annotations

import json
import shutil

import torch

from kdtoolkit.cli.commands import main
from kdtoolkit.results.records import Records
from kdt_proto2proto import metrics as M


def test_run_dir_with_pms_and_json(proto_run, tmp_path, capsys):
    _, out, results = proto_run
    js = tmp_path / "m.json"
    assert main(["metrics", str(out), "--pms", "--json", str(js)]) == 0
    printed = capsys.readouterr().out
    assert "Prototype Matching Score" in printed and "baseline" in printed and "kd" in printed
    data = json.loads(js.read_text())
    assert set(data) == {"teacher", "baseline", "kd"}
    for name in ("baseline", "kd"):
        e = data[name]
        assert e["role"] == "student" and e["teacher"] == "teacher"
        assert set(e["aap"]) == set(e["ajs"]) == {M.tau_key(t) for t in M.DEFAULT_TAUS}
        # the same numbers as during `kdt run` (one forward pass, records reused)
        assert e["aap"] == results["stages"][name]["aap"]
        assert e["ajs"] == results["stages"][name]["ajs"]
        assert e["pms"] == results["stages"][name]["pms"]
        assert e["accuracy"] == results["stages"][name]["accuracy"]
        matching = json.loads((out / name / "pms_matching_vs_teacher.json").read_text())
        assert len(matching["matching"]) == 20 and matching["score"] == e["pms"]
        # best-matched pairs as a figure (both are stage directories of one pushed run)
        assert e["pms_figure"].endswith("pms_matching_vs_teacher.png")
        assert (out / name / "pms_matching_vs_teacher.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "ajs" not in data["teacher"] and data["teacher"]["role"] == "teacher"


def test_stage_dirs_without_records_are_evaluated_once(proto_run, tmp_path, capsys):
    _, out, results = proto_run
    run = tmp_path / "run"
    shutil.copytree(out, run)
    (run / "teacher" / "records.safetensors").unlink()
    (run / "kd" / "records.safetensors").unlink()
    js = tmp_path / "m.json"
    assert (
        main(
            [
                "metrics",
                "--teacher",
                str(run / "teacher"),
                "--student",
                str(run / "kd"),
                "--tau",
                "0.1,1,inf",
                "--json",
                str(js),
            ]
        )
        == 0
    )
    assert (run / "kd" / "records.safetensors").is_file()  # saved for next time
    data = json.loads(js.read_text())
    assert set(data["kd"]["ajs"]) == {"0.1", "1", "inf"}
    for k in ("0.1", "1", "inf"):
        assert abs(data["kd"]["ajs"][k] - results["stages"]["kd"]["ajs"][k]) < 1e-6
    assert abs(data["kd"]["accuracy"] - results["stages"]["kd"]["accuracy"]) < 1e-6


def test_records_files_and_mismatched_grids(proto_run, tmp_path, capsys):
    _, out, _ = proto_run
    s = Records.load(out / "kd" / "records.safetensors")
    # the same records on a different grid: AJS/PMS cannot compare locations
    other = Records(dict(s.tensors), {**s.meta, "H": 1, "W": 4})
    bad = tmp_path / "bad.safetensors"
    other.save(bad)
    code = main(["metrics", "--teacher", str(out / "teacher" / "records.safetensors"), "--student", str(bad)])
    err = capsys.readouterr().err
    assert code == 2 and "latent grids differ" in err and len(err.strip().splitlines()) == 1
    # fewer images than the teacher
    few = Records({k: v[:5] for k, v in s.tensors.items()}, dict(s.meta))
    few_path = tmp_path / "few.safetensors"
    few.save(few_path)
    assert main(["metrics", "--teacher", str(out / "teacher" / "records.safetensors"), "--student", str(few_path)]) == 2
    assert "records of" in capsys.readouterr().err
    # bad --tau
    assert main(["metrics", str(out), "--tau", "0.1,abc"]) == 2
    assert "--tau" in capsys.readouterr().err


def test_pms_with_fewer_than_ten_images_is_reported_not_crashed(proto_run, tmp_path, capsys):
    _, out, _ = proto_run
    t = Records.load(out / "teacher" / "records.safetensors")
    s = Records.load(out / "kd" / "records.safetensors")
    tp, sp = tmp_path / "t.safetensors", tmp_path / "s.safetensors"
    Records({k: v[:7] for k, v in t.tensors.items()}, dict(t.meta)).save(tp)
    Records({k: v[:7] for k, v in s.tensors.items()}, dict(s.meta)).save(sp)
    js = tmp_path / "m.json"
    assert main(["metrics", "--teacher", str(tp), "--student", str(sp), "--pms", "--json", str(js)]) == 0
    e = json.loads(js.read_text())["kd"]
    assert e["pms"] is None and "at least 10 test images" in e["pms_note"]


def _bad_records(recs: Records, **changes) -> Records:
    tensors = dict(recs.tensors)
    for key, fn in changes.items():
        tensors[key] = fn(tensors[key].clone())
    return Records(tensors, dict(recs.meta))


def test_malformed_records_are_one_line_errors_naming_the_file(proto_run, tmp_path, capsys):
    _, out, _ = proto_run
    teacher = str(out / "teacher" / "records.safetensors")
    s = Records.load(out / "kd" / "records.safetensors")
    cells = int(s.meta["H"]) * int(s.meta["W"])

    def out_of_range(a):
        a[3, 1] = cells
        return a

    def nan(d):
        d[0, 0] = float("nan")
        return d

    def negative(d):
        d[2, 2] = -1.0
        return d

    cases = {
        "argmin_out_of_range": (_bad_records(s, argmin=out_of_range), "'argmin' holds locations outside"),
        "nan_distance": (_bad_records(s, min_distances=nan), "'min_distances' holds 1 NaN or infinite values"),
        "inf_distance": (_bad_records(s, min_distances=lambda d: d.fill_(float("inf"))), "NaN or infinite"),
        "negative_distance": (_bad_records(s, min_distances=negative), "negative distances"),
        "float_argmin": (_bad_records(s, argmin=lambda a: a.float()), "'argmin' must be an integer tensor"),
        "argmin_shape": (_bad_records(s, argmin=lambda a: a[:, :3]), "'argmin' must be an integer tensor shaped"),
        "int_distances": (_bad_records(s, min_distances=lambda d: d.long()), "'min_distances' must be a float"),
        "nan_logits": (_bad_records(s, logits=lambda x: x.fill_(float("nan"))), "'logits' must be finite"),
    }
    for name, (recs, expected) in cases.items():
        path = tmp_path / f"{name}.safetensors"
        recs.save(path)
        code = main(["metrics", "--teacher", teacher, "--student", str(path), "--pms"])
        err = capsys.readouterr().err
        assert code == 2, (name, err)
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, (name, err)
        assert str(path) in err and "student records" in err and expected in err, (name, err)
    # the teacher is checked too
    bad_teacher = tmp_path / "teacher_nan.safetensors"
    _bad_records(Records.load(teacher), min_distances=nan).save(bad_teacher)
    assert main(["metrics", "--teacher", str(bad_teacher), "--student", str(out / "kd")]) == 2
    err = capsys.readouterr().err
    assert str(bad_teacher) in err and "teacher records" in err


def test_json_on_stdout_for_metrics_and_run(proto_run, tmp_path, capsys):
    recipe, out, results = proto_run
    js = tmp_path / "m.json"
    assert main(["metrics", str(out), "--json", str(js)]) == 0
    capsys.readouterr()
    assert main(["metrics", str(out), "--json", "-"]) == 0
    printed = capsys.readouterr().out
    assert json.loads(printed) == json.loads(js.read_text())  # the JSON instead of the tables
    # kdt run --json on a finished run: every stage reused, the results as JSON
    assert main(["run", str(recipe), "--out", str(out), "-q", "--json"]) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["stages"].keys() == results["stages"].keys()
    assert again["stages"]["kd"]["accuracy"] == results["stages"]["kd"]["accuracy"]


def _flip_bit(path, offset_in_data: int) -> None:
    """Flip one bit of a tensor byte of a safetensors file (after its header)."""
    data = bytearray(path.read_bytes())
    header = int.from_bytes(data[:8], "little")
    data[8 + header + offset_in_data] ^= 0x10
    path.write_bytes(bytes(data))


def test_a_flipped_bit_is_reported_with_the_files_path(proto_run, tmp_path, capsys):
    from safetensors.torch import save_file

    from kdtoolkit.engine.models import load_model_file
    from kdtoolkit.foundation.errors import CheckpointError
    from kdtoolkit.foundation.io import read_safetensors

    _, out, _ = proto_run
    # records: through kdt metrics, one line, exit 2 (before: NaN logits and silent numbers)
    recs = tmp_path / "kd.safetensors"
    shutil.copy(out / "kd" / "records.safetensors", recs)
    _flip_bit(recs, 1234)
    code = main(["metrics", "--teacher", str(out / "teacher" / "records.safetensors"), "--student", str(recs)])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert str(recs) in err and "content checksum mismatch" in err
    # a model file
    model = tmp_path / "model.safetensors"
    shutil.copy(out / "kd" / "model.safetensors", model)
    tensors, meta = load_model_file(model)  # intact: loads, the checksum is not part of the metadata
    assert not any("checksum" in k for k in meta) and tensors
    _flip_bit(model, 7)
    try:
        load_model_file(model)
        raise AssertionError("a flipped bit was not detected")
    except CheckpointError as exc:
        assert str(model) in str(exc) and "checksum" in str(exc)
    # files written by other tools (no checksum) load as they are
    plain = tmp_path / "plain.safetensors"
    save_file({"w": torch.ones(3)}, str(plain), metadata={"x": "1", "checksum": "sha256:their own"})
    assert read_safetensors(plain)[1] == {"x": "1", "checksum": "sha256:their own"}
