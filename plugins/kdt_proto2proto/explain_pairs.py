"""``kdt explain RUN_DIR --pairs STUDENT``: the teacher↔student prototype pairs of the PMS matching.

The matching is the one ``kdt metrics --pms`` saves beside the student
(``pms_matching_vs_<teacher>.json``; computed here, the same way, when it is
missing). Each pair's score is the similarity stored with it: the mean over
the caps M of ``min(1, I_ij / M)``, with ``I_ij`` the number of test images on
which teacher prototype i and student prototype j have their nearest latent
patch at the same location.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from kdt_prototypes.sheet import CYAN, YELLOW, boxed_tile, crop_tile, fit, tile_scale
from kdtoolkit.use import RunDir
from kdtoolkit.foundation import KdtError
from kdtoolkit.foundation import atomic_write_json
from kdtoolkit.foundation import inside

from . import explain_figures as F
from .explain_stage import LoadedStage, class_name, load_stage, prototype_sources, prototype_views


def load_matching(run: RunDir, student: str, device: str = "auto") -> tuple[dict[str, Any], np.ndarray, Path]:
    """The saved PMS matching of ``student`` against its teacher (computed and saved as ``kdt metrics --pms``
    does when it is missing) and the co-location counts ``I`` ``[P_t, P_s]``.

    :raises KdtError: for a stage without teacher (or ``compare_to`` stage), or when PMS is undefined.
    """
    from .compare import compare, matched_hashes, records_for
    from .evaluation import check_pair, check_records, grid_locations
    from .metrics import colocation_matrix

    sdir = run.stage(student)
    teacher = sdir.reference
    if not teacher:
        raise KdtError(
            f"stage '{student}' has no teacher or compare_to stage: no matching to show", source=str(run.path)
        )
    tdir = run.stage(teacher)
    trec, srec = records_for(tdir.path, device), records_for(sdir.path, device)
    check_records(trec, "teacher", str(tdir.path))
    check_records(srec, "student", str(sdir.path))
    locations = check_pair(trec, srec)
    path = sdir.file(f"pms_matching_vs_{trec.meta.get('stage') or teacher}.json")
    if path.is_file() and not _matches(path, matched_hashes(trec, srec)):
        path.unlink()  # computed from other records (a stage trained again since): computed anew below
    if not path.is_file():
        compare(
            trec,
            [(student, srec, sdir.path)],
            (math.inf,),
            True,
            str(trec.meta.get("stage") or teacher),
            tdir.path,
            figures=False,
        )
    if not path.is_file():  # PMS undefined (fewer than 10 test images): compare saved no matching
        from .metrics import prototype_matching_score

        reason = prototype_matching_score(trec["argmin"], srec["argmin"], grid_locations(trec)).reason
        raise KdtError(f"no PMS matching: {reason}", source=str(sdir.path))
    matching = json.loads(path.read_text(encoding="utf-8"))
    return matching, np.asarray(colocation_matrix(trec["argmin"], srec["argmin"], locations)), path


def _matches(path, hashes: dict) -> bool:
    """Whether the stored matching at ``path`` was computed from records with these stage hashes."""
    try:
        stored = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        return False
    return isinstance(stored, dict) and all(stored.get(k) == v for k, v in hashes.items())


def _pair_entry(tld: LoadedStage, sld: LoadedStage, pair: list, counts: np.ndarray, n: int, tv: dict, sv: dict):
    """``(label lines, tiles, JSON entry)`` of one matched pair.

    ``tiles`` is ``None`` when a prototype has no source.
    """
    i, j, sim = int(pair[0]), int(pair[1]), float(pair[2])
    t, s = tv.get(i), sv.get(j)

    def name(ld: LoadedStage, view) -> str:
        what = "node " if ld.is_tree else "p"
        k = i if ld is tld else j
        classes = ", ".join(f"'{class_name(ld.classes, c)}'" for c in view.source.classes) if view else ""
        return f"{what}{k} ({classes or '?'})"

    lines = [
        f"t {name(tld, t)} ↔ s {name(sld, s)}",
        f"sim {sim:.3f} · co-located on {int(counts[i, j])} of {n} test images",
    ]
    entry = {
        "teacher_prototype": i,
        "student_prototype": j,
        "sim": sim,
        "colocated": int(counts[i, j]),
        "teacher_classes": t.source.classes if t else [],
        "student_classes": s.source.classes if s else [],
    }
    if t is None or s is None:
        return lines, None, entry
    scale = tile_scale(t.image.shape[0])
    side = t.image.shape[0] * scale
    box = lambda v: ([(v.rf_box, CYAN)] if v.rf_box else []) + [(v.box, YELLOW)]
    tiles = [
        boxed_tile(t.image, scale, box(t)),
        crop_tile(t.image, t.box, side),
        crop_tile(s.image, s.box, side),
        fit(boxed_tile(s.image, tile_scale(s.image.shape[0]), box(s)), side),
    ]
    return lines, tiles, entry


def _caption(matching: dict, tname: str, sname: str, path: Path) -> list[str]:
    caps = matching["caps"]
    shown = ", ".join(map(str, caps)) if len(caps) <= 12 else f"{caps[0]}, {caps[1]}, …, {caps[-1]}"
    return [
        f"sim: the pair's similarity in the saved PMS matching ({path.name}): the mean over the caps M ∈ {{{shown}}} "
        f"of min(1, I_ij / M), where I_ij is the number of the {matching['num_images']} test images on which "
        f"{tname}'s prototype i and {sname}'s prototype j have their nearest latent patch at the same location; "
        f"1: co-located on at least {max(caps)} images, 0: never. The matching pairs each teacher prototype with "
        f"one student prototype, maximising the mean sim. PMS = {matching['score']:.3f} "
        "(1 − the mean matched cost 1 − min(1, I_ij / M) over the caps, each cap solved on its own)."
    ]


def explain_pairs(run: RunDir, student: str, top: int, out_dir: Path, device: str = "auto") -> dict[str, Any]:
    """The ``top`` best and ``top`` worst pairs of the PMS matching of ``student`` with its teacher as
    ``pairs-<student>.png`` and ``.json`` in ``out_dir``; returns the JSON's content.

    Each pair: the teacher prototype's source image (receptive field cyan,
    high-activation box yellow) and training patch, the student prototype's
    patch and source image, both prototypes' classes, the pair's sim and
    its co-location count.
    """
    matching, counts, mpath = load_matching(run, student, device)
    pairs = sorted(matching["matching"], key=lambda p: (-p[2], p[0]))
    best, worst = pairs[:top], sorted(pairs[top:], key=lambda p: (p[2], p[0]))[:top]
    sld = load_stage(run.stage(student), device)
    tld = load_stage(run.stage(sld.stage.reference), device)
    tsrc = {s.prototype: s for s in prototype_sources(tld)[0]}
    ssrc = {s.prototype: s for s in prototype_sources(sld)[0]}
    wanted = best + worst
    tv = {v.source.prototype: v for v in prototype_views(tld, [tsrc[int(p[0])] for p in wanted])}
    sv = {v.source.prototype: v for v in prototype_views(sld, [ssrc[int(p[1])] for p in wanted])}
    n = int(matching["num_images"])
    groups: dict[str, list] = {"best": [], "worst": []}
    shown: dict[str, list] = {"best": [], "worst": []}
    for key, chosen in (("best", best), ("worst", worst)):
        for pair in chosen:
            got = _pair_entry(tld, sld, pair, counts, n, tv, sv)
            if got[1] is not None:
                groups[key].append((got[0], got[1]))
                shown[key].append(got[2])
    if not groups["best"] and not groups["worst"]:
        raise KdtError("no matched pair has source patches to show", source=str(sld.stage.path))
    tname, sname = tld.stage.name, sld.stage.name
    legend = [
        f"PMS matching of {sname} (s) with {tname} (t), {len(pairs)} pairs. Each pair: the teacher prototype's "
        "source image (cyan: receptive field, yellow: 95th-percentile activation box) and training patch, then "
        "the student prototype's training patch and source image."
    ]
    fig = inside(out_dir, f"pairs-{sname}.png", what="output folder")
    size = F.pairs_figure(
        f"{tname} ↔ {sname}: matched prototypes",
        legend,
        groups["best"],
        groups["worst"],
        _caption(matching, tname, sname, mpath),
        fig,
    )
    info = {
        "teacher": tname,
        "student": sname,
        "matching_file": str(mpath),
        "score": matching["score"],
        "caps": matching["caps"],
        **shown,
        "figure": str(fig),
        "size": list(size),
    }
    atomic_write_json(fig.with_suffix(".json"), info)
    return info
