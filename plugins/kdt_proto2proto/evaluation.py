"""Interpretability metrics as registered components, computed from records.

``aap``, ``ajs`` and ``pms`` read the ``min_distances``/``argmin`` records of
a model (and of its teacher), so one forward pass per model serves every
threshold. Teacher and student records must cover the same test images on
the same latent grid: a mismatch is a clear error, never a silent number.
"""

from __future__ import annotations

import math

from typing import TYPE_CHECKING, Any

import numpy as np

from kdtoolkit.foundation import KdtError

from . import metrics as M

if TYPE_CHECKING:
    from kdtoolkit.results import Records


def _array(x: Any) -> np.ndarray:
    """A record as a numpy array (torch tensors are copied to the CPU; bfloat16 becomes float32)."""
    return M.as_array(x, "record")


def grid_locations(records: Records, who: str = "model") -> int:
    """``H·W`` of the records' latent grid."""
    if "H" not in records.meta or "W" not in records.meta:
        raise KdtError(f"{who} records carry no latent grid (metadata H, W): not a prototype model?")
    return int(records.meta["H"]) * int(records.meta["W"])


def check_records(records: Records, who: str = "model", source: str | None = None) -> int:
    """A prototype model's records hold what the metrics read, with sane values; returns ``H·W``.

    ``min_distances`` float ``[N, P]``, every value finite and ``>= 0``;
    ``argmin`` integer ``[N, P]`` in ``[0, H·W)``; ``logits`` float ``[N, K]``,
    finite; ``labels`` integer ``[N]`` in ``[0, K)``; ``H``, ``W`` positive
    integers. A records file is user input: anything else is one clear line.

    :raises KdtError: naming ``source`` (the file) and what is wrong.
    """

    def bad(message: str) -> KdtError:
        return KdtError(f"{who} records: {message}", source=source)

    for key in ("min_distances", "argmin"):
        if key not in records:
            raise bad(f"no '{key}': not a prototype model")
    h, w = records.meta.get("H"), records.meta.get("W")
    if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in (h, w)):
        raise bad(f"the latent grid (metadata H, W) must be positive integers, got H={h!r}, W={w!r}")
    d, a = _array(records["min_distances"]), _array(records["argmin"])
    logits, labels = _array(records["logits"]), _array(records["labels"])
    n = records.n
    if not np.issubdtype(d.dtype, np.floating) or d.ndim != 2:
        raise bad(f"'min_distances' must be a float [N, P] tensor, got {M.dtype_name(d)} {tuple(d.shape)}")
    if not np.issubdtype(a.dtype, np.integer) or tuple(a.shape) != tuple(d.shape):
        raise bad(
            f"'argmin' must be an integer tensor shaped like 'min_distances' {tuple(d.shape)}, "
            f"got {M.dtype_name(a)} {tuple(a.shape)}"
        )
    finite = np.isfinite(d)
    if not bool(finite.all()):
        count = int((~finite).sum())
        raise bad(f"'min_distances' holds {count} NaN or infinite values")
    if bool((d < 0).any()):
        raise bad(f"'min_distances' holds negative distances (smallest {float(d.min()):.4g})")
    if a.size and (int(a.min()) < 0 or int(a.max()) >= h * w):
        raise bad(
            f"'argmin' holds locations outside the {h}×{w} grid (range {int(a.min())}..{int(a.max())}, "
            f"expected 0..{h * w - 1})"
        )
    if not np.issubdtype(logits.dtype, np.floating) or logits.ndim != 2 or not bool(np.isfinite(logits).all()):
        raise bad(f"'logits' must be finite float [N, K] values, got {M.dtype_name(logits)} {tuple(logits.shape)}")
    if not np.issubdtype(labels.dtype, np.integer) or labels.ndim != 1 or labels.shape[0] != n:
        raise bad(f"'labels' must be integer [N], got {M.dtype_name(labels)} {tuple(labels.shape)}")
    if n and (int(labels.min()) < 0 or int(labels.max()) >= logits.shape[1]):
        raise bad(f"'labels' outside 0..{logits.shape[1] - 1}")
    return h * w


def check_pair(teacher: Records, student: Records) -> int:
    """Teacher and student records are comparable; returns ``H·W``.

    :raises KdtError: for different images, datasets, grids or labels.
    """
    for r, who in ((teacher, "teacher"), (student, "student")):
        for key in ("min_distances", "argmin"):
            if key not in r:
                raise KdtError(f"{who} records have no '{key}': not a prototype model")
    tg = (teacher.meta.get("H"), teacher.meta.get("W"))
    sg = (student.meta.get("H"), student.meta.get("W"))
    if tg != sg:
        raise KdtError(
            f"teacher and student latent grids differ ({tg[0]}×{tg[1]} vs {sg[0]}×{sg[1]}): AJS and PMS compare "
            "locations directly; cut the backbones so that the grids match"
        )
    if teacher.n != student.n:
        raise KdtError(
            f"teacher has records of {teacher.n} images, student of {student.n}: evaluate both on the same test set"
        )
    td, sd = teacher.meta.get("dataset"), student.meta.get("dataset")
    if td and sd and td != sd:
        raise KdtError(f"teacher records are of dataset '{td}', student records of '{sd}'")
    if not np.array_equal(_array(teacher["labels"]), _array(student["labels"])):
        raise KdtError("teacher and student records list different labels: not the same test images in the same order")
    return grid_locations(student, "student")


#: The threshold of AAP and AJS as ``kdt report`` shows it (the ``threshold_tables`` of the metrics below).
TAU = {"symbol": "τ", "label": "threshold τ"}


def _check_taus(params: dict) -> None:
    taus = params["taus"]
    if not taus:
        raise ValueError("taus", "give at least one threshold")
    if any(not (t >= 0) for t in taus):
        raise ValueError("taus", f"thresholds must be >= 0 (inf allowed), got {taus}")
    if len({float(t) for t in taus}) != len(taus):
        raise ValueError("taus", f"thresholds repeat: {taus}")


class AAP:
    """AAP, the Average number of Active Patches, for every threshold τ.

    A prototype is active in an image when its minimum distance is ≤ τ; the
    active patches are the distinct locations of the active prototypes'
    minima; AAP_τ is their number averaged over test images. Result key
    ``aap``: a table keyed by τ (``"inf"`` for ∞).

    :param taus: the thresholds (default {0.01, 0.1, 0.2, 0.45, 1, 3, 5, ∞},
        the original evaluation code's set).
    """

    requires_reference = False
    requires_records = ("min_distances", "argmin")
    #: ``kdt report`` draws the result ``aap`` (a table keyed by τ) against τ.
    threshold_tables = {"aap": {"title": "AAP (average number of active patches)", **TAU}}

    def __init__(self, *, taus: list[float] = list(M.DEFAULT_TAUS)):
        self.taus = list(taus)

    check_params = staticmethod(_check_taus)

    def __call__(self, records: Records, reference: Records | None = None) -> dict:
        return {"aap": M.aap_by_tau(records["min_distances"], records["argmin"], grid_locations(records), self.taus)}


class AJS:
    """AJS, the Average Jaccard Similarity of active patches with the teacher,
    for every threshold τ: |S^t ∩ S^s| / |S^t ∪ S^s| averaged over test
    images (0 when both sets are empty). Result key ``ajs``, keyed by τ. A
    stage without a teacher or ``compare_to`` is compared with itself: 1,
    except at thresholds where some images have no active patch at all (those
    images count 0).

    :param taus: the thresholds, as for ``aap``.
    """

    requires_reference = True
    requires_records = ("min_distances", "argmin")
    #: ``kdt report`` draws the result ``ajs`` (a table keyed by τ) against τ.
    threshold_tables = {"ajs": {"title": "AJS (against the teacher)", **TAU}}

    def __init__(self, *, taus: list[float] = list(M.DEFAULT_TAUS)):
        self.taus = list(taus)

    check_params = staticmethod(_check_taus)

    def __call__(self, records: Records, reference: Records | None = None) -> dict:
        reference = reference if reference is not None else records
        locations = check_pair(reference, records)
        return {
            "ajs": M.ajs_by_tau(
                reference["min_distances"],
                reference["argmin"],
                records["min_distances"],
                records["argmin"],
                locations,
                self.taus,
            )
        }


class PMS:
    """PMS, the Prototype Matching Score between the teacher's and the model's
    prototypes (at τ = ∞): co-location counts, capped similarities, Hungarian
    matching per cap, 1 − mean matched cost. Result keys ``pms`` (``None``
    with ``pms_note`` when the test set has fewer than 10 images) and
    ``pms_costs`` (per cap)."""

    requires_reference = True
    requires_records = ("argmin",)

    def __call__(self, records: Records, reference: Records | None = None) -> dict:
        reference = reference if reference is not None else records
        locations = check_pair(reference, records)
        res = M.prototype_matching_score(reference["argmin"], records["argmin"], locations)
        out: dict[str, Any] = {"pms": res.score, "pms_costs": res.costs}
        if res.reason:
            out["pms_note"] = res.reason
        return out


def at_tau(table: dict | None, tau: float = math.inf):
    """The value of a per-τ result table at ``tau`` (``None`` if absent)."""
    if not isinstance(table, dict):
        return None
    return table.get(M.tau_key(tau))
