"""`kdt metrics`: from run directories, stage directories and records files."""

from __future__ import annotations

import json
import shutil

import torch

from kdtoolkit.cli import main
from kdtoolkit.records import Records
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
    assert main(["metrics", "--teacher", str(run / "teacher"), "--student", str(run / "kd"),
                 "--tau", "0.1,1,inf", "--json", str(js)]) == 0
    assert (run / "kd" / "records.safetensors").is_file()  # saved for next time
    data = json.loads(js.read_text())
    assert set(data["kd"]["ajs"]) == {"0.1", "1", "inf"}
    for k in ("0.1", "1", "inf"):
        assert abs(data["kd"]["ajs"][k] - results["stages"]["kd"]["ajs"][k]) < 1e-6
    assert abs(data["kd"]["accuracy"] - results["stages"]["kd"]["accuracy"]) < 1e-6


def test_records_files_and_mismatched_grids(proto_run, tmp_path, capsys):
    _, out, _ = proto_run
    t = Records.load(out / "teacher" / "records.safetensors")
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
