"""What ``kdt metrics`` does: AAP, AJS and PMS of students against their teacher.

Each model is a stage directory of a run (evaluated once on its recipe's
test set if it has no records yet; the records are then saved) or a records
file. ``kdt metrics RUN_DIR`` compares every student stage of a run with its
teacher. The PMS matching (teacher prototype → student prototype,
similarity) is saved beside the student's records for explanations.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from kdtoolkit.foundation import check_device_spec
from kdtoolkit.foundation import KdtError
from kdtoolkit.foundation import atomic_write_json
from kdtoolkit.foundation import inside
from kdtoolkit.results import Records

from . import metrics as M
from .evaluation import check_pair, check_records, grid_locations

# Records are read as numpy arrays and every metric is computed with numpy and
# scipy: comparing records files never imports torch. Stage directories
# without records (a forward pass) and the matching figures import it.


def records_for(source: Path, device: str = "auto", progress=None) -> Records:
    """Records of a model, as numpy arrays, given as a records file or a stage directory
    of a run (evaluated once on its recipe's test set, and saved, when it has none). A records
    file without the tensors the metrics read is refused from its header, before it is read."""
    if source.is_file() or (source.exists() and not source.is_dir()):  # a FIFO or device: refused by name
        return Records.load(source, arrays="numpy", require=("min_distances", "argmin"))
    if not source.is_dir():
        raise KdtError("no such file or directory", source=str(source))
    saved = source / "records.safetensors"
    if saved.is_file():
        return Records.load(saved, arrays="numpy", require=("min_distances", "argmin"))
    if not (source / "model.safetensors").is_file():
        raise KdtError("not a stage directory (no model.safetensors or records.safetensors)", source=str(source))
    from kdtoolkit.use import StageDir

    return StageDir.open(source).records(device, progress).numpy()


def accuracy(records: Records) -> float:
    """Top-1 accuracy of records (float32 mean, as torch computes it: the same number)."""
    logits, labels = M.as_array(records["logits"], "logits"), M.as_array(records["labels"], "labels")
    return float(np.mean(np.argmax(logits, axis=1) == labels, dtype=np.float32))


def _name(source: Path, recs: Records) -> str:
    return str(recs.meta.get("stage") or source.stem)


def _matching_path(student_source: Path, teacher_name: str) -> Path:
    """``pms_matching_vs_<teacher>.json`` beside the student's records; the teacher's name comes from its
    records file, so the path is checked to stay in that folder (:func:`kdtoolkit.foundation.paths.inside`)."""
    base = student_source if student_source.is_dir() else student_source.parent
    return inside(base, f"pms_matching_vs_{teacher_name}.json", what="student's folder")


def _last_push(stage_dir: Path) -> dict | None:
    """The record of the stage's last projection of prototypes onto training
    patches (``push-<phase>.json`` of a ProtoPNet push, ``project-<phase>.json``
    of a ProtoTree projection), if any."""
    try:
        res = json.loads((stage_dir / "result.json").read_text())
        pushes = [(h["kind"], h["name"]) for h in res.get("history", []) if h.get("kind") in ("push", "project")]
        return json.loads(inside(stage_dir, f"{pushes[-1][0]}-{pushes[-1][1]}.json").read_text()) if pushes else None
    except (OSError, ValueError, KeyError, IndexError, TypeError, AttributeError, RecursionError, KdtError):
        return None


def matching_figure(
    teacher_dir: Path | None, student_dir: Path, matching: list, path: Path, top: int = 20
) -> Path | None:
    """PNG of the best-matched teacher/student prototype pairs, side by side.

    Each pair shows the training patch each prototype was pushed onto (its
    activation box on the source image). Needs both models as stage
    directories of one run whose last phase with prototypes was a push;
    returns ``None`` (no figure) otherwise.
    """
    if teacher_dir is None or not (
        teacher_dir.is_dir() and student_dir.is_dir() and teacher_dir.parent == student_dir.parent
    ):
        return None
    tpush, spush = _last_push(teacher_dir), _last_push(student_dir)
    if tpush is None or spush is None:
        return None
    from kdt_prototypes.figures import prototype_figure
    from kdtoolkit.use import StageDir

    tdata = StageDir.open(teacher_dir).data().train_eval
    sdata = StageDir.open(student_dir).data().train_eval
    images, boxes, labels = [], [], []
    for i, j, sim in sorted(matching, key=lambda m: -m[2])[:top]:
        tp, sp = tpush["prototypes"][i], spush["prototypes"][j]
        if "box" not in tp or "box" not in sp:
            return None
        for p, ds, who, k in ((tp, tdata, "t", i), (sp, sdata, "s", j)):
            images.append(ds[p["image"]][0])
            boxes.append(tuple(p["box"]))
            labels.append(f"{who} p{k}" + (f" · sim {sim:.2f}" if who == "s" else ""))
    if not images:
        return None
    prototype_figure(
        path,
        images,
        boxes,
        labels,
        f"PMS matching: {teacher_dir.name} (t) ↔ {student_dir.name} (s), best {len(images) // 2} pairs",
        cols=10,
    )
    return path


def matched_hashes(teacher: Records, student: Records) -> dict:
    """The stage hashes of the records a PMS matching was computed from (``None`` where unrecorded)."""
    return {"teacher_stage_hash": teacher.meta.get("stage_hash"), "student_stage_hash": student.meta.get("stage_hash")}


def compare(
    teacher: Records,
    students: list[tuple[str, Records, Path]],
    taus: tuple[float, ...],
    with_pms: bool,
    teacher_name: str,
    teacher_source: Path | None = None,
    figures: bool = True,
) -> dict:
    """Metrics of a teacher and its students, keyed by model name (``figures``: draw the PMS matchings)."""
    out: dict = {}
    for _, recs, _ in students:
        check_pair(teacher, recs)  # prototype records, same images, same grid: before anything is read
    locations = grid_locations(teacher, "teacher")
    # the teacher's per-location minima are computed once and shared by every student's AJS
    t_minima = M.location_minima(teacher["min_distances"], teacher["argmin"], locations)
    out[teacher_name] = {"role": "teacher", "accuracy": accuracy(teacher), "aap": M.aap_from_minima(t_minima, taus)}
    for name, recs, source in students:
        s_minima = M.location_minima(recs["min_distances"], recs["argmin"], locations)
        entry = {
            "role": "student",
            "teacher": teacher_name,
            "accuracy": accuracy(recs),
            "aap": M.aap_from_minima(s_minima, taus),
            "ajs": M.ajs_from_minima(t_minima, s_minima, taus),
        }
        if with_pms:
            t0 = time.perf_counter()
            res = M.prototype_matching_score(teacher["argmin"], recs["argmin"], locations)
            entry["pms"] = res.score
            entry["pms_seconds"] = round(time.perf_counter() - t0, 3)
            if res.reason:
                entry["pms_note"] = res.reason
            else:
                path = _matching_path(source, teacher_name)
                atomic_write_json(
                    path, {"teacher": teacher_name, "student": name, **matched_hashes(teacher, recs), **res.to_json()}
                )
                entry["pms_matching"] = str(path)
                fig = (
                    matching_figure(teacher_source, source, res.matching, path.with_suffix(".png")) if figures else None
                )
                if fig is not None:
                    entry["pms_figure"] = str(fig)
        out[name] = entry
    return out


def _print(results: dict, taus: tuple[float, ...], with_pms: bool) -> None:
    from kdtoolkit.foundation import Table, print_tables

    keys = [M.tau_key(t) for t in taus]
    rows = []
    for name, e in results.items():
        rows.append([name, e["role"], e["accuracy"], "AAP", *[e["aap"][k] for k in keys]])
        if "ajs" in e:
            rows.append(["", "", "", f"AJS vs {e['teacher']}", *[e["ajs"][k] for k in keys]])
    tables = [
        Table(
            "Interpretability metrics (AAP, AJS per τ)",
            ["model", "role", "accuracy", "metric", *[f"τ={k}" for k in keys]],
            rows,
        )
    ]
    if with_pms:
        tables.append(
            Table(
                "Prototype Matching Score (τ = ∞)",
                ["student", "teacher", "PMS", "seconds", "matching / note"],
                [
                    [
                        name,
                        e["teacher"],
                        e.get("pms"),
                        e.get("pms_seconds"),
                        e.get("pms_note") or e.get("pms_matching", ""),
                    ]
                    for name, e in results.items()
                    if e["role"] == "student"
                ],
            )
        )
    print_tables(tables)


def run_metrics(
    run_dir: Path | None,
    teacher: Path | None,
    students: tuple[Path, ...],
    tau_text: str | None,
    with_pms: bool,
    json_out: Path | None,
    device: str,
    figures: bool = True,
) -> dict:
    """``kdt metrics`` with its options (see :mod:`kdt_proto2proto.command`): prints the tables,
    writes ``json_out`` if given, and returns the metrics keyed by model name."""
    try:
        taus = M.parse_taus(tau_text) if tau_text else tuple(M.DEFAULT_TAUS)
    except ValueError as exc:
        raise KdtError(str(exc), source="--tau") from None
    check_device_spec(device, "--device")
    groups: list[tuple[Path, list[Path]]] = []
    if run_dir is not None:
        if teacher or students:
            raise KdtError("give either RUN_DIR or --teacher/--student, not both", source="kdt metrics")
        from kdtoolkit.use import RunDir

        run = RunDir(run_dir)
        refs = run.students_by_reference()
        if not refs:
            raise KdtError("the run has no stage with a teacher or compare_to stage", source=str(run_dir))
        for ref, names in refs.items():  # StageDir paths: checked to lie inside the run directory
            groups.append((run.stage(ref).path, [run.stage(n).path for n in names]))
    else:
        if teacher is None or not students:
            raise KdtError("give RUN_DIR, or --teacher and at least one --student", source="kdt metrics")
        groups.append((teacher, list(students)))
    results: dict = {}
    for tsrc, ssrcs in groups:
        trec = records_for(tsrc, device)
        check_records(trec, "teacher", str(tsrc))
        tname = _name(tsrc, trec)
        srecs = []
        for s in ssrcs:
            r = records_for(s, device)
            check_pair(trec, r)  # same images, same grid: the clearest message first
            check_records(r, "student", str(s))
            srecs.append((_name(s, r), r, s))
        for name, entry in compare(trec, srecs, taus, with_pms, tname, tsrc, figures).items():
            if name in results and results[name]["role"] == "teacher" and entry["role"] == "teacher":
                continue
            results[name] = entry
    if json_out is not None and str(json_out) == "-":  # --json -: the JSON on stdout instead of the tables
        print(json.dumps(results, indent=2))
        return results
    _print(results, taus, with_pms)
    if json_out is not None:
        atomic_write_json(json_out, results)
        print(f"metrics: {json_out}")
    return results
