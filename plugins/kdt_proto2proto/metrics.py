"""Interpretability metrics of Proto2Proto: AAP, AJS and PMS (spec §4).

Proto2Proto (Keswani et al., "Proto2Proto: Can you recognize the car, the way
I do?", CVPR 2022) judges how faithfully a prototype student reproduces the
interpretability of its prototype teacher with three numbers:

* **AAP** -- *Average number of Active Patches* of one model;
* **AJS** -- *Average Jaccard Similarity of active patches with the teacher*;
* **PMS** -- *Prototype Matching Score* between teacher and student prototypes.

Every function here is a pure function of *records*: for one model evaluated
on the same ``N`` test images,

* ``min_distances`` -- float ``[N, P]``, ``d_j(x)``, the minimum distance of
  prototype ``j`` over the latent grid of image ``x``;
* ``argmin`` -- int ``[N, P]``, ``a_j(x)``, where that minimum lies, as the
  flat location index ``h * W + w`` in ``[0, L)`` with ``L = H * W``
  (``num_locations``).

Records are numpy arrays or torch tensors; everything is computed on the CPU
with numpy and scipy, so this module never imports torch (``kdt metrics`` on
records files starts without it).  Functions returning per-image arrays
(:func:`location_minima`, :func:`active_locations`) return torch tensors for
torch records and numpy arrays otherwise.  Invalid input (shapes, ranges,
thresholds) raises :class:`ValueError` with a message that names the
problem.

Notes on the definitions (spec §4):

* Prototype ``j`` is *active* at threshold ``tau`` in image ``x`` when
  ``d_j(x) <= tau`` (non-strict); ``tau = inf`` makes every prototype active.
  A NaN distance is never ``<= tau``, so it is inactive for finite ``tau``.
* Locations are compared directly, so teacher and student must share the
  latent grid (one ``num_locations`` for both).  An ``argmin`` outside
  ``[0, num_locations)`` is reported as a grid mismatch.
* PMS is defined at ``tau = inf`` (no threshold): it only uses ``argmin``.
"""

from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from collections.abc import Iterable

import numpy as np

# scipy (sparse products, the Hungarian solver) is imported where PMS needs
# it, so that checking a recipe that names these metrics does not import it.
if TYPE_CHECKING:
    import scipy.sparse

__all__ = [
    "DEFAULT_TAUS",
    "PAPER_TAUS",
    "tau_key",
    "parse_taus",
    "location_minima",
    "active_locations",
    "average_active_patches",
    "average_jaccard_similarity",
    "aap_by_tau",
    "ajs_by_tau",
    "aap_from_minima",
    "ajs_from_minima",
    "COLOCATION_BLOCK_IMAGES",
    "PACKED_BLOCK_IMAGES",
    "PACKED_MAX_LOCATIONS",
    "colocation_matrix",
    "pms_caps",
    "PMSResult",
    "pms_from_colocation",
    "prototype_matching_score",
    "as_array",
    "dtype_name",
]

#: The thresholds of the original evaluation code (``None`` there means ``inf``).
DEFAULT_TAUS: tuple[float, ...] = (0.01, 0.1, 0.2, 0.45, 1.0, 3.0, 5.0, math.inf)

#: The thresholds listed in the Proto2Proto supplement (a subset of the above).
PAPER_TAUS: tuple[float, ...] = (0.1, 0.45, 1.0, 5.0, math.inf)


# --------------------------------------------------------------------------
# thresholds
# --------------------------------------------------------------------------


def _check_tau(tau: Any) -> float:
    try:
        value = float(tau)
    except (TypeError, ValueError):
        raise ValueError(f"tau must be a number or inf, got {tau!r}") from None
    if math.isnan(value):
        raise ValueError("tau must not be NaN")
    if value < 0:
        raise ValueError(f"tau must be >= 0 (distances are non-negative), got {value!r}")
    return value + 0.0  # turns -0.0 into 0.0


def tau_key(tau: float) -> str:
    """The canonical text of a threshold, used as a dictionary / JSON key.

    ``inf`` for infinity, otherwise the shortest text that reads back as the
    same float: integral values lose their ``.0`` (``1.0 -> "1"``,
    ``5.0 -> "5"``), others keep Python's shortest ``repr`` (``0.01 ->
    "0.01"``, ``0.45 -> "0.45"``).  ``float(tau_key(t)) == t`` always holds.

    Raises:
        ValueError: ``tau`` is NaN, negative or not a number.
    """
    value = _check_tau(tau)
    if math.isinf(value):
        return "inf"
    text = repr(value)
    if text.endswith(".0"):
        text = text[:-2]
    return text


def parse_taus(text: str) -> tuple[float, ...]:
    """Parse a comma-separated list of thresholds, e.g. ``"0.01,0.1,inf"``.

    Items are floats or ``inf`` / ``infinity`` / ``∞`` (any case); spaces
    around items are ignored; order is kept.  ``tau_key`` of each parsed value
    reads back to the same value (round trip).

    Raises:
        ValueError: empty text, an empty item (``"0.1,,1"``), an item that is
            not a number, NaN, a negative value or a duplicate; the message
            names the offending item.
    """
    if not isinstance(text, str):
        raise ValueError(f"thresholds must be given as text like '0.1,1,inf', got {text!r}")
    if not text.strip():
        raise ValueError("no thresholds given; expected a comma-separated list like '0.1,1,inf'")
    out: list[float] = []
    seen: dict[float, str] = {}
    for position, raw in enumerate(text.split(","), start=1):
        item = raw.strip()
        if not item:
            raise ValueError(
                f"empty threshold at position {position} in {text!r}; expected a comma-separated list like '0.1,1,inf'"
            )
        if item.lower() in ("inf", "+inf", "infinity", "+infinity", "∞"):
            value = math.inf
        else:
            try:
                value = float(item)
            except ValueError:
                raise ValueError(
                    f"threshold {item!r} in {text!r} is not a number (use 'inf' for no threshold)"
                ) from None
            if math.isnan(value):
                raise ValueError(f"threshold {item!r} in {text!r} is NaN")
            if value < 0:
                raise ValueError(f"threshold {item!r} in {text!r} is negative; thresholds must be >= 0")
            value += 0.0
        if value in seen:
            raise ValueError(f"threshold {item!r} in {text!r} repeats {seen[value]!r}")
        seen[value] = item
        out.append(value)
    return tuple(out)


# --------------------------------------------------------------------------
# input checks
# --------------------------------------------------------------------------


def _torch_tensor_type() -> Any:
    """``torch.Tensor`` if torch is already imported, else ``None`` (this module never imports it)."""
    torch = sys.modules.get("torch")
    return getattr(torch, "Tensor", None)


def _is_tensor(x: Any) -> bool:
    tensor = _torch_tensor_type()
    return tensor is not None and isinstance(x, tensor)


def as_array(x: Any, name: str) -> np.ndarray:
    """``x`` as a numpy array: a torch tensor is copied to the CPU (bfloat16, which numpy
    lacks, becomes float32: every bfloat16 value is a float32 value); anything else
    goes through ``np.asarray``."""
    if _is_tensor(x):
        x = x.detach().cpu()
        if str(x.dtype) == "torch.bfloat16":
            x = x.float()
        return x.numpy()
    try:
        out = np.asarray(x)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name} must be a tensor or array, got {type(x).__name__}") from exc
    if out.dtype == object:
        raise ValueError(f"{name} must be a tensor or array of numbers, got {type(x).__name__}")
    return out


def _is_float(a: np.ndarray) -> bool:
    return np.issubdtype(a.dtype, np.floating)


def dtype_name(x: Any) -> str:
    """The dtype of a tensor or array as error messages name it (``float32``, not ``torch.float32``)."""
    return str(x.dtype).removeprefix("torch.")


def _check_num_locations(num_locations: Any) -> int:
    if isinstance(num_locations, bool) or not isinstance(num_locations, (int, np.integer)):
        raise ValueError(f"num_locations must be a positive integer (H*W), got {num_locations!r}")
    if num_locations <= 0:
        raise ValueError(f"num_locations must be a positive integer (H*W), got {num_locations!r}")
    return int(num_locations)


def _check_argmin(argmin: Any, num_locations: int, name: str = "argmin") -> np.ndarray:
    a = as_array(argmin, name)
    if a.ndim != 2:
        raise ValueError(f"{name} must have shape [N, P], got {tuple(a.shape)}")
    if not np.issubdtype(a.dtype, np.integer):
        raise ValueError(f"{name} must hold integer location indices, got dtype {dtype_name(a)}")
    if a.size:
        lo, hi = int(a.min()), int(a.max())
        if lo < 0 or hi >= num_locations:
            raise ValueError(
                f"{name} holds locations in [{lo}, {hi}] but the grid has num_locations="
                f"{num_locations} (valid: 0..{num_locations - 1}); teacher and student "
                "must share the same latent grid H x W"
            )
    return a.astype(np.int64) if a.dtype == np.uint64 else a  # uint64 + int64 codes would be floats


def _check_record(min_distances: Any, argmin: Any, num_locations: int, who: str = "") -> tuple[np.ndarray, np.ndarray]:
    prefix = f"{who} " if who else ""
    d = as_array(min_distances, f"{prefix}min_distances")
    if d.ndim != 2:
        raise ValueError(f"{prefix}min_distances must have shape [N, P], got {tuple(d.shape)}")
    if not (_is_float(d) or np.issubdtype(d.dtype, np.integer) or d.dtype == np.bool_):
        raise ValueError(f"{prefix}min_distances must hold numbers, got dtype {dtype_name(d)}")
    a = _check_argmin(argmin, num_locations, f"{prefix}argmin")
    if d.shape != a.shape:
        raise ValueError(
            f"{prefix}min_distances {tuple(d.shape)} and {prefix}argmin {tuple(a.shape)} "
            "must have the same shape [N, P]"
        )
    if d.shape[0] == 0:
        raise ValueError(f"{prefix}records hold no images (N = 0); the averages are undefined")
    return d, a


# --------------------------------------------------------------------------
# AAP and AJS
# --------------------------------------------------------------------------

#: Threads of :func:`location_minima` and :func:`colocation_matrix` (each
#: works on its own block of images; the numbers do not depend on it).
#: ``None``: the CPUs this process may run on.
THREADS: int | None = None


def _threads() -> int:
    if THREADS is not None:
        return max(1, int(THREADS))
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - platforms without sched_getaffinity
        return max(1, os.cpu_count() or 1)


def _image_ranges(n: int, parts: int, multiple: int = 1) -> list[tuple[int, int]]:
    """At most ``parts`` consecutive ranges covering ``range(n)``; every range but the last
    has a multiple of ``multiple`` images."""
    size = -(-n // max(1, parts))
    size = max(1, -(-size // multiple) * multiple)
    return [(start, min(n, start + size)) for start in range(0, n, size)] or [(0, 0)]


def _in_threads(fn: Any, ranges: list[tuple[int, int]]) -> list[Any]:
    """``[fn(start, stop) for each range]``, the ranges on threads (numpy and scipy's
    kernels release the GIL)."""
    if len(ranges) == 1:
        return [fn(*ranges[0])]
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(len(ranges)) as pool:
        return list(pool.map(lambda r: fn(*r), ranges))


#: Images per chunk of :func:`location_minima` (keeps each chunk's codes in cache;
#: measured 2-3x faster than one pass at Stanford-Cars scale).  Any value gives
#: the same minima.
MINIMA_CHUNK_IMAGES = 256


def _minima_block(d: np.ndarray, a: np.ndarray, num_locations: int, out: np.ndarray) -> None:
    """The minima of images ``[0, n)`` of ``d``/``a`` into ``out`` (``[n, L]``, filled with NaN)."""
    n = a.shape[0]
    flat = out.reshape(-1)
    # A NaN distance is never <= tau; +inf is <= tau only for tau = inf, where
    # every prototype is active anyway: NaN becomes +inf before the minimum.
    has_nan = _is_float(d) and bool(np.isnan(d).any())
    for start in range(0, n, MINIMA_CHUNK_IMAGES):
        stop = min(n, start + MINIMA_CHUNK_IMAGES)
        dc = np.nan_to_num(d[start:stop], nan=np.inf, posinf=np.inf, neginf=-np.inf) if has_nan else d[start:stop]
        codes = a[start:stop] + (np.arange(start, stop, dtype=np.int64) * num_locations)[:, None]
        np.fmin.at(flat, codes.reshape(-1), dc.reshape(-1))  # fmin skips the NaN of locations not reached yet


def _location_minima(d: np.ndarray, a: np.ndarray, num_locations: int) -> np.ndarray:
    """:func:`location_minima` on checked records (numpy ``d`` of any number type, ``a`` integer)."""
    if not _is_float(d):
        # ``d <= tau`` with a Python float compares in the default float dtype.
        d = d.astype(np.float32)
    n = a.shape[0]
    out = np.full((n, num_locations), np.nan, dtype=d.dtype)

    def block(start: int, stop: int) -> None:
        _minima_block(d[start:stop], a[start:stop], num_locations, out[start:stop])

    _in_threads(block, _image_ranges(n, _threads() if n >= 2048 else 1))
    return out


def _like_input(minima: np.ndarray, min_distances: Any, argmin: Any) -> Any:
    """The minima as the caller's kind of array: a torch tensor (of the distances' dtype,
    bfloat16 included, on ``argmin``'s device) when a record was one, else numpy."""
    if not (_is_tensor(min_distances) or _is_tensor(argmin)):
        return minima
    import torch

    out = torch.from_numpy(minima)
    if _is_tensor(min_distances) and min_distances.dtype.is_floating_point:
        out = out.to(min_distances.dtype)
    return out.to(argmin.device) if _is_tensor(argmin) else out


def location_minima(min_distances: Any, argmin: Any, num_locations: int) -> Any:
    """Per-(image, location) minimum distance of the prototypes whose argmin lies there.

    ``m(x, l) = min { d_j(x) : a_j(x) = l }`` over the prototypes ``j`` of
    image ``x`` (NaN distances count as ``+inf``), and **NaN** where no
    prototype has its argmin at ``l``.  One unbuffered ``fmin`` reduction
    over ``[N, P]`` (blocks of images on :data:`THREADS` threads);
    afterwards the active patch set of every threshold is one comparison on
    ``[N, L]``::

        active_locations(d, a, L, tau) == (location_minima(d, a, L) <= tau)

    for every ``tau`` including ``inf``: location ``l`` holds an active
    prototype iff its smallest distance is ``<= tau``; a location without
    prototypes is NaN, which is never ``<= tau`` (not even ``inf``), while a
    location whose prototypes all have infinite or NaN distances is ``+inf``,
    active at ``tau = inf`` only -- the same sets as the definition.

    The minima keep the dtype of ``min_distances`` (a non-float record is
    converted to float32, as ``d <= tau`` would), so the comparison with
    ``tau`` rounds ``tau`` the same way as comparing the distances
    themselves.  Computed with numpy: torch is never imported here.

    Args:
        min_distances: float ``[N, P]``, ``d_j(x)`` (torch tensor or numpy array).
        argmin: int ``[N, P]``, flat location ``h * W + w`` in ``[0, L)``.
        num_locations: ``L = H * W``.

    Returns:
        float ``[N, L]``: a torch tensor on the device of ``argmin`` when the
        records are torch tensors, a numpy array when they are arrays.
    """
    num_locations = _check_num_locations(num_locations)
    d, a = _check_record(min_distances, argmin, num_locations)
    return _like_input(_location_minima(d, a, num_locations), min_distances, argmin)


def _at_most(minima: Any, tau: float) -> np.ndarray:
    """``minima <= tau`` as a numpy mask; a tensor compares in its own dtype (bfloat16 too)."""
    if _is_tensor(minima):
        return (minima <= tau).cpu().numpy()
    return minima <= tau


def active_locations(min_distances: Any, argmin: Any, num_locations: int, tau: float) -> Any:
    """Active patch sets ``S_tau(x)`` of every image as a boolean mask (spec §4).

    ``S_tau(x) = { a_j(x) : d_j(x) <= tau }``: location ``l`` is active in
    image ``x`` if at least one prototype ``j`` with ``d_j(x) <= tau``
    (non-strict; ``tau = inf`` means every prototype) has its argmin at ``l``.
    Several prototypes at the same location count once (it is a set).

    Computed as ``location_minima(...) <= tau`` (see :func:`location_minima`):
    one reduction, no loop over images or prototypes.

    Args:
        min_distances: float ``[N, P]``, ``d_j(x)``.
        argmin: int ``[N, P]``, flat location ``h * W + w`` in ``[0, L)``.
        num_locations: ``L = H * W``.
        tau: threshold ``>= 0`` or ``math.inf``.

    Returns:
        bool ``[N, L]``: a torch tensor on the device of ``argmin`` for torch
        records, a numpy array for arrays.
    """
    num_locations = _check_num_locations(num_locations)
    tau = _check_tau(tau)
    return location_minima(min_distances, argmin, num_locations) <= tau


def _aap_of_mask(mask: np.ndarray) -> float:
    return float(mask.sum(axis=1, dtype=np.float64).mean())


def _ajs_of_masks(st: np.ndarray, ss: np.ndarray) -> float:
    inter = (st & ss).sum(axis=1, dtype=np.float64)
    union = (st | ss).sum(axis=1, dtype=np.float64)
    jaccard = np.where(union > 0, inter / np.maximum(union, 1.0), 0.0)
    # a correctly rounded sum: the same number whatever the summation order
    return math.fsum(jaccard.tolist()) / len(jaccard)


def average_active_patches(min_distances: Any, argmin: Any, num_locations: int, tau: float) -> float:
    """AAP_tau, *Average number of Active Patches* (Proto2Proto; spec §4).

    ``AAP_tau(m) = (1/N) * sum_x |S^m_tau(x)|`` with ``S^m_tau(x)`` the set of
    distinct argmin locations of the prototypes active at ``tau`` (see
    :func:`active_locations`).  Lies in ``[0, min(P, L)]``.
    """
    return aap_by_tau(min_distances, argmin, num_locations, (tau,))[tau_key(tau)]


def _check_pair_records(
    teacher_min_distances: Any,
    teacher_argmin: Any,
    student_min_distances: Any,
    student_argmin: Any,
    num_locations: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    td, ta = _check_record(teacher_min_distances, teacher_argmin, num_locations, "teacher")
    sd, sa = _check_record(student_min_distances, student_argmin, num_locations, "student")
    if ta.shape[0] != sa.shape[0]:
        raise ValueError(
            f"teacher records cover {ta.shape[0]} images but student records cover "
            f"{sa.shape[0]}; AJS compares the same test images"
        )
    return td, ta, sd, sa


def average_jaccard_similarity(
    teacher_min_distances: Any,
    teacher_argmin: Any,
    student_min_distances: Any,
    student_argmin: Any,
    num_locations: int,
    tau: float,
) -> float:
    """AJS_tau, *Average Jaccard Similarity of active patches with the teacher*.

    ``AJS_tau = (1/N) * sum_x |S^t ∩ S^s| / |S^t ∪ S^s|`` over the active patch
    sets of teacher and student at the same ``tau`` (spec §4).  When both sets
    of an image are empty its term is 0 and the image still counts in ``N``.
    The prototype counts may differ; the grid (``num_locations``) and the
    images (``N``) must be the same.

    Raises:
        ValueError: different ``N`` for teacher and student, or a location
            outside the shared grid.
    """
    return ajs_by_tau(
        teacher_min_distances, teacher_argmin, student_min_distances, student_argmin, num_locations, (tau,)
    )[tau_key(tau)]


def _check_minima(minima: Any, name: str) -> Any:
    """The minima as given (a tensor stays one, to compare in its own dtype) after checking them."""
    if _is_tensor(minima):
        ok = minima.dim() == 2 and minima.dtype.is_floating_point
    else:
        minima = as_array(minima, name)
        ok = minima.ndim == 2 and _is_float(minima)
    if not ok:
        raise ValueError(
            f"{name} must be the float [N, L] output of location_minima, got {dtype_name(minima)} {tuple(minima.shape)}"
        )
    if minima.shape[0] == 0:
        raise ValueError(f"{name} hold no images (N = 0); the averages are undefined")
    return minima


def aap_from_minima(minima: Any, taus: Iterable[float] = DEFAULT_TAUS) -> dict[str, float]:
    """AAP for every threshold from :func:`location_minima` (computed once per model).

    Equals :func:`aap_by_tau` of the records the minima come from, keyed by
    :func:`tau_key`.
    """
    m = _check_minima(minima, "minima")
    return {tau_key(t): _aap_of_mask(_at_most(m, t)) for t in _unique_taus(taus)}


def ajs_from_minima(teacher_minima: Any, student_minima: Any, taus: Iterable[float] = DEFAULT_TAUS) -> dict[str, float]:
    """AJS for every threshold from the :func:`location_minima` of teacher and student.

    Equals :func:`ajs_by_tau` of the records the minima come from, keyed by
    :func:`tau_key`.  The teacher's minima can be computed once and reused for
    every student.
    """
    mt = _check_minima(teacher_minima, "teacher minima")
    ms = _check_minima(student_minima, "student minima")
    if mt.shape[0] != ms.shape[0]:
        raise ValueError(
            f"teacher minima cover {mt.shape[0]} images but student minima cover "
            f"{ms.shape[0]}; AJS compares the same test images"
        )
    if mt.shape[1] != ms.shape[1]:
        raise ValueError(
            f"teacher minima have {mt.shape[1]} locations but student minima {ms.shape[1]}; "
            "teacher and student must share the same latent grid H x W"
        )
    return {tau_key(t): _ajs_of_masks(_at_most(mt, t), _at_most(ms, t)) for t in _unique_taus(taus)}


def aap_by_tau(
    min_distances: Any, argmin: Any, num_locations: int, taus: Iterable[float] = DEFAULT_TAUS
) -> dict[str, float]:
    """:func:`average_active_patches` for every threshold, keyed by :func:`tau_key`.

    The per-location minima (:func:`location_minima`) are computed once; each
    threshold is then one comparison on ``[N, L]``.
    """
    taus = _unique_taus(taus)
    num_locations = _check_num_locations(num_locations)
    d, a = _check_record(min_distances, argmin, num_locations)
    return aap_from_minima(_like_input(_location_minima(d, a, num_locations), min_distances, None), taus)


def ajs_by_tau(
    teacher_min_distances: Any,
    teacher_argmin: Any,
    student_min_distances: Any,
    student_argmin: Any,
    num_locations: int,
    taus: Iterable[float] = DEFAULT_TAUS,
) -> dict[str, float]:
    """:func:`average_jaccard_similarity` for every threshold, keyed by :func:`tau_key`.

    The per-location minima of teacher and student are computed once each;
    each threshold is then two comparisons on ``[N, L]``.
    """
    taus = _unique_taus(taus)
    num_locations = _check_num_locations(num_locations)
    td, ta, sd, sa = _check_pair_records(
        teacher_min_distances, teacher_argmin, student_min_distances, student_argmin, num_locations
    )
    mt = _like_input(_location_minima(td, ta, num_locations), teacher_min_distances, None)
    ms = _like_input(_location_minima(sd, sa, num_locations), student_min_distances, None)
    return ajs_from_minima(mt, ms, taus)


def _unique_taus(taus: Iterable[float]) -> list[float]:
    if isinstance(taus, str):
        return list(parse_taus(taus))
    values = [_check_tau(t) for t in taus]
    if not values:
        raise ValueError("no thresholds given")
    keys = [tau_key(v) for v in values]
    if len(set(keys)) != len(keys):
        raise ValueError(f"thresholds repeat: {keys}")
    return values


# --------------------------------------------------------------------------
# PMS
# --------------------------------------------------------------------------


def _onehot_codes(a: np.ndarray, num_locations: int) -> scipy.sparse.csr_matrix:
    """CSR ``[P, N*L]``: row ``j`` has a 1 at code ``x*L + a_j(x)`` for each image ``x``."""
    import scipy.sparse as sp

    n, p = a.shape
    width = n * num_locations
    itype = np.int32 if width < np.iinfo(np.int32).max and n * p < np.iinfo(np.int32).max else np.int64
    # Row j lists the codes of prototype j image by image: already sorted.
    codes = (a.T.astype(itype, copy=False) + (np.arange(n, dtype=itype) * num_locations)[None, :]).ravel()
    indptr = np.arange(0, n * p + 1, n, dtype=itype)
    data = np.ones(n * p, dtype=np.int32)
    return sp.csr_matrix((data, codes, indptr), shape=(p, width))


#: Images per block of the sparse co-location product (keeps the student's
#: one-hot block cache-resident; measured ~1.5x faster than one unblocked
#: product at Stanford-Cars scale).  Any value gives the same counts.
COLOCATION_BLOCK_IMAGES = 1024

#: Images per block of the packed co-location count (a divisor of 255, the
#: capacity of its 8-bit counters, so that blocks fill them exactly).  Any
#: value in ``[1, 255]`` gives the same counts.
PACKED_BLOCK_IMAGES = 15

#: ``method="auto"`` of :func:`colocation_matrix` uses the packed count up to
#: this many grid locations and the sparse product above.  The packed count
#: costs ``N * P_t * P_s`` byte additions whatever the grid; the sparse
#: product costs one increment per co-located pair, about ``N * P_t * P_s /
#: L`` for spread-out argmins (more when they concentrate), each ~100x dearer
#: than a byte addition: at ``L = 49`` the packed count was 2.5-3x faster on
#: uniform records and more on concentrated ones (``benchmarks/bench_metrics.py``).
PACKED_MAX_LOCATIONS = 100

_COUNTER_CAPACITY = 255  # 8-bit counters

_UNSET = object()
#: The kernel behind ``csr_matrix @ ndarray``, called to accumulate in place
#: (``None``: a scipy without it, where the public product is used); looked
#: up on first use.
_csr_matvecs: Any = _UNSET


def _kernel() -> Any:
    global _csr_matvecs
    if _csr_matvecs is _UNSET:
        try:
            from scipy.sparse._sparsetools import csr_matvecs as kernel
        except ImportError:  # pragma: no cover - a scipy without it: the public product
            kernel = None
        _csr_matvecs = kernel
    return _csr_matvecs


def _add_rows(indptr: np.ndarray, indices: np.ndarray, data: np.ndarray, rows: np.ndarray, acc: np.ndarray) -> None:
    """``acc += A @ rows`` for the CSR ``A = (data, indices, indptr)``, in place."""
    n_row, n_vecs = acc.shape
    n_col = rows.shape[0]
    kernel = _kernel()
    if kernel is not None:
        kernel(n_row, n_col, n_vecs, indptr, indices, data, rows.ravel(), acc.ravel())
    else:  # pragma: no cover - exercised by a test that removes the kernel
        import scipy.sparse as sp

        acc += sp.csr_matrix((data, indices, indptr), shape=(n_row, n_col)) @ rows


def _colocation_packed(ta: np.ndarray, sa: np.ndarray, num_locations: int, block_images: int) -> np.ndarray:
    """Co-location counts with 8-bit counters packed two per 16-bit word.

    For a block of ``b`` images, ``D`` has one row per (image, location) code
    and one byte per student prototype: ``D[x*L + l, j] = 1`` iff
    ``a^s_j(x) = l``.  Teacher prototype ``i`` adds the rows of its codes,
    ``acc[i] += sum_x D[x*L + a^t_i(x)]`` -- one sparse-times-dense product
    whose dense side is read as 16-bit words, i.e. two byte counters per
    addition.  A counter cannot carry into its neighbour as long as it stays
    <= 255, so the counters are emptied into the int64 result every 255
    images.  Exact for any input; the work is ``N * P_t * P_s`` byte
    additions, independent of how the argmins are distributed.
    """
    n, pt = ta.shape
    ps = sa.shape[1]
    words = (ps + 1) // 2
    width = 2 * words  # bytes per row of D (one spare byte when P_s is odd)
    block = min(int(block_images), _COUNTER_CAPACITY)
    out = np.zeros((pt, ps), dtype=np.int64)
    acc = np.zeros((pt, words), dtype=np.uint16)
    itype = np.int32 if block * num_locations * width < np.iinfo(np.int32).max else np.int64
    ones = np.ones(pt * block, dtype=np.uint16)
    student_columns = np.arange(ps, dtype=np.int64)
    filled = 0
    for start in range(0, n, block):
        stop = min(n, start + block)
        b = stop - start
        if filled + b > _COUNTER_CAPACITY:
            out += acc.view(np.uint8)[:, :ps]
            acc.fill(0)
            filled = 0
        base = (np.arange(b, dtype=np.int64) * num_locations)[:, None]
        rows = np.zeros((b * num_locations, width), dtype=np.uint8)
        rows.reshape(-1)[((sa[start:stop] + base) * width + student_columns).reshape(-1)] = 1
        codes = np.ascontiguousarray((ta[start:stop] + base).T, dtype=itype)  # [P_t, b], row i = codes of i
        indptr = np.arange(0, pt * b + 1, b, dtype=itype)
        _add_rows(indptr, codes.reshape(-1), ones[: pt * b], rows.view(np.uint16), acc)
        filled += b
    out += acc.view(np.uint8)[:, :ps]
    return out


def _colocation_sparse(ta: np.ndarray, sa: np.ndarray, num_locations: int, block_images: int) -> np.ndarray:
    """Co-location counts as a sparse product of one-hot codes, blocked over images."""
    n = ta.shape[0]
    counts = np.zeros((ta.shape[1], sa.shape[1]), dtype=np.int64)
    for start in range(0, n, int(block_images)):
        stop = min(n, start + int(block_images))
        a_t = _onehot_codes(ta[start:stop], num_locations)
        a_s = _onehot_codes(sa[start:stop], num_locations)
        counts += (a_t @ a_s.T).toarray()
    return counts


def colocation_matrix(
    teacher_argmin: Any,
    student_argmin: Any,
    num_locations: int,
    *,
    block_images: int | None = None,
    method: str = "auto",
) -> np.ndarray:
    """Co-location counts ``I_ij = #{x : a^t_i(x) = a^s_j(x)}`` (PMS, spec §4).

    Computed once for all prototype pairs and all caps (the original code
    intersected Python sets of string ids per pair and per cap), by one of two
    exact methods that give the same counts:

    * ``"packed"``: per block of images, a byte matrix ``D`` with one row per
      (image, location) code and one byte per student prototype (1 where
      that student has its argmin); teacher prototype ``i`` sums the rows of
      its ``N`` codes.  The rows are added as 16-bit words, two 8-bit
      counters at a time, emptied into the int64 result every 255 images.
      Cost: ``N * P_t * P_s`` byte additions, whatever the distribution of
      the argmins.
    * ``"sparse"``: each prototype's argmins as a one-hot row over the
      ``N * L`` codes ``x * L + a(x)``; with ``A_t`` (``[P_t, N*L]``) and
      ``A_s`` in CSR form, ``I = A_t @ A_s.T`` is a sparse product, blocked
      over images (``I = sum_b A_t[:, b] @ A_s[:, b].T``).  Cost: one
      increment per co-located pair, ``sum_x sum_l n^t_l(x) * n^s_l(x)``
      (``N * P_t * P_s / L`` for uniform locations).
    * ``"auto"`` (default): ``"packed"`` for grids of up to
      :data:`PACKED_MAX_LOCATIONS` locations (7x7 included), else ``"sparse"``.

    Args:
        teacher_argmin: int ``[N, P_t]``.
        student_argmin: int ``[N, P_s]`` (``P_s`` may differ from ``P_t``).
        num_locations: ``L = H * W`` of the shared grid.
        block_images: images per block (positive; ``None``: the method's
            default, :data:`PACKED_BLOCK_IMAGES` or
            :data:`COLOCATION_BLOCK_IMAGES`; the packed method uses at most
            255).  The counts do not depend on it.
        method: ``"auto"``, ``"packed"`` or ``"sparse"``.

    Returns:
        numpy int64 ``[P_t, P_s]``, entries in ``[0, N]``.

    Raises:
        ValueError: different ``N``, a location outside ``[0, L)``, a bad
            ``block_images`` or ``method``.
    """
    num_locations = _check_num_locations(num_locations)
    if block_images is not None and (
        isinstance(block_images, bool) or not isinstance(block_images, (int, np.integer)) or block_images <= 0
    ):
        raise ValueError(f"block_images must be a positive integer, got {block_images!r}")
    if method not in ("auto", "packed", "sparse"):
        raise ValueError(f"method must be 'auto', 'packed' or 'sparse', got {method!r}")
    ta = _check_argmin(teacher_argmin, num_locations, "teacher argmin")
    sa = _check_argmin(student_argmin, num_locations, "student argmin")
    if ta.shape[0] != sa.shape[0]:
        raise ValueError(
            f"teacher argmin covers {ta.shape[0]} images but student argmin covers "
            f"{sa.shape[0]}; the co-location count compares the same test images"
        )
    if method == "auto":
        method = "packed" if num_locations <= PACKED_MAX_LOCATIONS else "sparse"
    if method == "packed":
        block = min(PACKED_BLOCK_IMAGES if block_images is None else int(block_images), _COUNTER_CAPACITY)
        kernel = _colocation_packed
    else:
        block = COLOCATION_BLOCK_IMAGES if block_images is None else int(block_images)
        kernel = _colocation_sparse
    # Blocks of images on threads, each with its own counts; the sum is exact.
    n = ta.shape[0]
    parts = _threads() if n >= 8 * block else 1
    ranges = _image_ranges(n, parts, multiple=block)
    counts = _in_threads(lambda start, stop: kernel(ta[start:stop], sa[start:stop], num_locations, block), ranges)
    return counts[0] if len(counts) == 1 else np.sum(counts, axis=0)


def pms_caps(n: int) -> list[int]:
    """The caps ``M`` of PMS for ``n`` test images: ``range(c, n, c)``, ``c = int(0.1*n)``.

    Ten values for ``n = 8041`` (804, 1608, ..., 8040); nine when ``n`` is a
    multiple of 10 (``n = 20`` gives 2, 4, ..., 18); eleven for ``n = 23``;
    an empty list when ``c = 0`` (``n < 10``).  Every cap is ``< n``.
    """
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
        raise ValueError(f"the number of images must be a non-negative integer, got {n!r}")
    c = int(0.1 * int(n))
    if c == 0:
        return []
    return list(range(c, int(n), c))


@dataclass
class PMSResult:
    """Outcome of :func:`prototype_matching_score`.

    Attributes:
        score: PMS in ``[0, 1]``, or ``None`` when it is undefined (``reason``).
        caps: the caps ``M`` used (see :func:`pms_caps`).
        costs: mean matched cost ``cost(M)`` of the optimal assignment, one per cap.
        matching: ``(teacher i, student j, similarity)`` for the saved
            assignment, sorted by ``i`` (or by ``j`` when ``P_t > P_s``); see
            :func:`pms_from_colocation` for how it is chosen.  It has
            ``min(P_t, P_s)`` pairs.
        reason: why ``score`` is ``None``; ``None`` otherwise.
        num_images: ``N``.
        num_teacher_prototypes: ``P_t``.
        num_student_prototypes: ``P_s``.
    """

    score: float | None
    caps: list[int] = field(default_factory=list)
    costs: list[float] = field(default_factory=list)
    matching: list[tuple[int, int, float]] = field(default_factory=list)
    reason: str | None = None
    num_images: int = 0
    num_teacher_prototypes: int = 0
    num_student_prototypes: int = 0

    def to_json(self) -> dict[str, Any]:
        """A dict of plain Python values (``json.dumps`` works; ``score`` may be ``None``)."""
        return {
            "score": None if self.score is None else float(self.score),
            "caps": [int(m) for m in self.caps],
            "costs": [float(c) for c in self.costs],
            "matching": [[int(i), int(j), float(s)] for i, j, s in self.matching],
            "reason": self.reason,
            "num_images": int(self.num_images),
            "num_teacher_prototypes": int(self.num_teacher_prototypes),
            "num_student_prototypes": int(self.num_student_prototypes),
        }


def pms_from_colocation(colocation: Any, num_images: int) -> PMSResult:
    """PMS from a precomputed co-location matrix ``I`` (``[P_t, P_s]``) over ``N`` images.

    For each cap ``M`` in :func:`pms_caps` (``N``):
    ``sim_ij(M) = min(1, I_ij / M)``, the assignment minimising the total of
    ``1 - sim`` is solved by ``scipy.optimize.linear_sum_assignment`` (a
    rectangular matrix pairs ``min(P_t, P_s)`` prototypes), and ``cost(M)`` is
    the mean cost over the matched pairs.  ``PMS = 1 - mean_M cost(M)``.
    Caps ``M >= max(I)`` clip nothing and share one solve (they all maximise
    the matched sum of ``I``); each smaller cap is solved on its own.

    The saved ``matching`` (one extra assignment solve): the per-cap
    assignments may differ, so the toolkit keeps the single assignment that
    minimises the mean over caps of ``1 - sim_ij(M)`` -- i.e. maximises the
    cap-averaged similarity ``mean_M sim_ij(M)`` -- and reports that average
    as each pair's similarity.  It is a choice of the toolkit (the definition
    only needs the per-cap costs), meant for pairing prototypes in
    explanations; ties are broken by the solver.

    Co-location of a teacher and a student prototype in every image gives
    similarity 1, but so does co-location in at least ``max(caps)`` images
    (caps stay below ``N``); unmatched extra prototypes (``P_t != P_s``) do
    not lower the score.

    With ``c = int(0.1 * N) = 0`` (``N < 10``) there is no cap: the result
    has ``score = None`` and a ``reason``, nothing is raised.
    """
    from scipy.optimize import linear_sum_assignment

    counts = np.asarray(colocation)
    if counts.ndim != 2:
        raise ValueError(f"colocation must be a [P_t, P_s] matrix, got shape {counts.shape}")
    pt, ps = counts.shape
    if pt == 0 or ps == 0:
        raise ValueError(f"PMS needs at least one teacher and one student prototype, got {pt} x {ps}")
    caps = pms_caps(num_images)
    base = dict(num_images=int(num_images), num_teacher_prototypes=pt, num_student_prototypes=ps)
    if not caps:
        return PMSResult(
            score=None,
            reason=(
                f"PMS needs at least 10 test images (cap c = int(0.1·N) = 0 for N = {num_images}); no cap, no score"
            ),
            **base,
        )
    largest = counts.max()
    counts = counts.astype(np.float64, copy=False)

    def capped(cap: int) -> np.ndarray:
        sim = np.divide(counts, cap)
        np.minimum(sim, 1.0, out=sim)  # same values as np.minimum(counts / cap, 1.0)
        return sim

    sim_sum = np.zeros((pt, ps), dtype=np.float64)
    for cap in caps:
        sim_sum += capped(cap)
    sim_mean = sim_sum / len(caps)
    # Caps >= max(I) clip nothing: sim = I / M and cost = 1 - I / M, so every
    # such cap minimises the same objective (maximise the matched sum of I,
    # whose optimum differs from any other total by >= 1/M, far above float
    # rounding) and the assignment of the first of them serves them all;
    # cost(M) then differs from a separate solve's by rounding at most
    # (~1e-16).  Smaller caps are solved one by one, and the saved matching
    # is one more solve: all independent, so they run on threads.
    solved = [cap for cap in caps if cap < largest] + [cap for cap in caps if cap >= largest][:1]

    def solve(cap: int | None) -> tuple[np.ndarray, np.ndarray]:
        return linear_sum_assignment(1.0 - (sim_mean if cap is None else capped(cap)))

    tasks: list[int | None] = [*solved, None]
    workers = min(_threads(), len(tasks))
    if workers > 1:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(workers) as pool:
            answers = dict(zip(tasks, pool.map(solve, tasks)))
    else:
        answers = {task: solve(task) for task in tasks}
    costs: list[float] = []
    for cap in caps:
        rows, cols = answers[cap if cap < largest else solved[-1]]
        matched = np.minimum(counts[rows, cols] / cap, 1.0)  # the matched entries of capped(cap)
        costs.append(float((1.0 - matched).mean()))
    rows, cols = answers[None]
    matching = [(int(i), int(j), float(sim_mean[i, j])) for i, j in zip(rows, cols)]
    score = 1.0 - float(np.mean(costs))
    return PMSResult(score=score, caps=caps, costs=costs, matching=matching, reason=None, **base)


def prototype_matching_score(teacher_argmin: Any, student_argmin: Any, num_locations: int) -> PMSResult:
    """PMS, *Prototype Matching Score* of Proto2Proto (spec §4), at ``tau = inf``.

    ``I = colocation_matrix(teacher_argmin, student_argmin, L)`` (computed
    once), then for every cap ``M`` in ``range(c, N, c)`` with
    ``c = int(0.1 * N)``: ``sim(M) = min(1, I / M)``, Hungarian assignment on
    ``1 - sim(M)``, ``cost(M)`` = mean matched cost;
    ``PMS = 1 - mean_M cost(M)``.  See :func:`pms_from_colocation` for the
    saved matching and the ``N < 10`` case (``score = None`` with a reason).

    Args:
        teacher_argmin: int ``[N, P_t]``, flat argmin locations of the teacher.
        student_argmin: int ``[N, P_s]``, same images, same grid.
        num_locations: ``L = H * W``.
    """
    counts = colocation_matrix(teacher_argmin, student_argmin, num_locations)
    return pms_from_colocation(counts, len(teacher_argmin))
