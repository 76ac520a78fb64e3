"""``kdt prepare``: ProtoPNet's offline augmentation of a class-per-folder training split.

The original protocol (ProtoPNet's ``img_aug.py``, Proto2Proto's
``cub_augment.py``/``cars_augment.py``): for every image and every operation
(rotate, skew, shear, distort), ``copies`` outputs, each the operation with
fresh random parameters followed by a left-right flip of probability 0.5 —
40 copies per image with the defaults.  The operations are those of
:mod:`kdt_data.augment` (its docstring lists where they differ from
Augmentor's).  Outputs keep the source image's size and mode (``L`` and
``RGB``; other modes are converted to RGB) and go to
``OUT_ROOT/<class>/<stem>_<op>_<k>.<ext>``: JPEG (quality 95) for JPEG
sources, PNG otherwise.  The originals are not copied (ProtoPNet trains on
the augmented folder alone and pushes prototypes onto the un-augmented one).

Every output is determined by ``seed``, its class, source file name,
operation and copy index alone (its own :class:`torch.Generator`), so a run
gives the same bytes whatever the order, the number of worker threads or
how often it was interrupted.  Each file is written to a hidden temporary
file and renamed into place (:func:`kdtoolkit.foundation.io.atomic_save_image`), so an
interrupted run leaves no half-written image, and the next run removes the
temporary files of killed ones; a new run skips the outputs that exist and
writes the rest.
"""

from __future__ import annotations

import hashlib
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from kdtoolkit.foundation import DataError, KdtError
from kdt_data.augment import OPS, apply_op, hflip
from kdt_data.datasets import IMAGE_EXTENSIONS

__all__ = ["parse_ops", "run_prepare", "output_name"]

_JPEG_SUFFIXES = (".jpg", ".jpeg")
_LAYOUT_HINT = "SRC_ROOT must be one split, one sub-folder of images per class (e.g. root/train)"


@dataclass
class _Job:
    """One source image and its outputs still to write: ``[(op, k, destination)]``."""

    source: str
    class_name: str
    outputs: list = field(default_factory=list)


def parse_ops(text: str) -> tuple[str, ...]:
    """The operations of ``--ops``: comma-separated names from rotate, skew, shear, distort.

    Parameters:
        text: e.g. ``"rotate,skew,shear"``.
    """
    names = [t.strip() for t in str(text).split(",")]
    if not names or any(not n for n in names):
        raise KdtError(f"expected comma-separated operations from {','.join(OPS)}, got {text!r}", source="--ops")
    unknown = [n for n in names if n not in OPS]
    if unknown:
        raise KdtError(f"unknown operation(s) {', '.join(unknown)} (expected some of {', '.join(OPS)})", source="--ops")
    if len(set(names)) != len(names):
        raise KdtError(f"an operation is listed twice in {text!r}", source="--ops")
    return tuple(names)


def output_name(source: Path, op: str, k: int) -> str:
    """File name of copy ``k`` of operation ``op`` of ``source``: ``<stem>_<op>_<k:02d>.<jpg|png>``.

    Parameters:
        source: the source image path.
        op: the operation name.
        k: the copy index, from 0.
    """
    suffix = source.suffix.lower()
    ext = suffix if suffix in _JPEG_SUFFIXES else ".png"
    return f"{source.stem}_{op}_{k:02d}{ext}"


def _output_seed(seed: int, class_name: str, file_name: str, op: str, k: int) -> int:
    text = f"{seed}\0{class_name}\0{file_name}\0{op}\0{k}".encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little") & (2**63 - 1)


def _scan(src: Path) -> list[tuple[str, list[Path]]]:
    """``[(class, sorted image paths)]`` of the class folders of ``src``; DataError for an unusable layout."""
    try:
        entries = sorted(
            (e for e in os.scandir(src) if not e.name.startswith(".") and e.is_dir()), key=lambda e: e.name
        )
    except OSError as exc:
        raise DataError(f"cannot list folder: {exc.strerror or exc}", source=str(src)) from None
    if not entries:
        raise DataError(f"no class sub-folders found ({_LAYOUT_HINT})", source=str(src))
    classes = []
    for entry in entries:
        try:
            files = sorted(
                Path(e.path)
                for e in os.scandir(entry.path)
                if not e.name.startswith(".") and e.name.lower().endswith(IMAGE_EXTENSIONS) and e.is_file()
            )
        except OSError as exc:
            raise DataError(f"cannot list folder: {exc.strerror or exc}", source=entry.path) from None
        if not files:
            raise DataError(f"class folder has no images ({_LAYOUT_HINT})", source=entry.path)
        stems: dict[str, Path] = {}
        for f in files:
            if f.stem in stems:
                raise DataError(
                    f"{stems[f.stem].name} and {f.name} would share output names: rename one", source=entry.path
                )
            stems[f.stem] = f
        classes.append((entry.name, files))
    return classes


def _check_out(src: Path, out: Path) -> None:
    """Create ``out`` and check that a file can be written there; DataError otherwise."""
    if out == src or src in out.parents:
        raise DataError("OUT_ROOT must not be SRC_ROOT or inside it (it would become a class folder)", source=str(out))
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".kdt-prepare-probe-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise DataError(f"output folder is not writable: {exc.strerror or exc}", source=str(out)) from None


#: The file in OUT_ROOT that records what its outputs were made from (a resumed run must match it).
MANIFEST = ".kdt-prepare.json"


def _check_manifest(out: Path, src: Path, seed: int) -> None:
    """Record ``src`` and ``seed`` in ``out``, or refuse when ``out`` was prepared from others: outputs
    already there would be kept as they are, so a resumed folder would mix two augmentations."""
    import json

    from kdtoolkit.foundation import atomic_write_json

    path = out / MANIFEST
    want = {"src": str(src), "seed": seed}
    if path.is_file():
        try:
            have = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(have, dict):
                raise ValueError("not a JSON object")
        except (OSError, ValueError, RecursionError):
            raise DataError(
                "unreadable record of an earlier kdt prepare; delete it to start over", source=str(path)
            ) from None
        for key in ("src", "seed"):
            if have.get(key) != want[key]:
                raise DataError(
                    f"OUT_ROOT was prepared with {key} {have.get(key)!r}, not {want[key]!r}; its outputs "
                    "would be mixed with these: use the same one or another OUT_ROOT",
                    source=str(out),
                )
        return
    atomic_write_json(path, want)


def _plan(classes, out: Path, copies: int, ops) -> tuple[list[_Job], int]:
    """The jobs with outputs still to write, and the number of outputs already there."""
    jobs, existing = [], 0
    for class_name, files in classes:
        folder = out / class_name
        try:
            folder.mkdir(exist_ok=True)
        except OSError as exc:
            raise DataError(f"cannot create folder: {exc.strerror or exc}", source=str(folder)) from None
        for f in files:
            job = _Job(str(f), class_name)
            for op in ops:
                for k in range(copies):
                    dest = folder / output_name(f, op, k)
                    try:
                        done = dest.stat().st_size > 0
                    except OSError:
                        done = False
                    if done:
                        existing += 1
                    else:
                        job.outputs.append((op, k, str(dest)))
                        _remove_legacy_part(dest)
            if job.outputs:
                jobs.append(job)
    return jobs, existing


def _remove_legacy_part(dest: Path) -> None:
    """Delete ``.<name>.part``, the temporary file of an output that an earlier version of kdt prepare
    was killed writing (today's temporary files are removed by :mod:`kdtoolkit.foundation.io`)."""
    try:
        dest.with_name(f".{dest.name}.part").unlink(missing_ok=True)
    except OSError:
        pass


def _load(path: str):
    from kdtoolkit.foundation import open_image

    im = open_image(path)  # DataError naming the file: unreadable, special, over the pixel limit
    return im if im.mode in ("RGB", "L") else im.convert("RGB")


def _write_atomic(img, dest: Path) -> None:
    """Save ``img`` atomically (:func:`kdtoolkit.foundation.io.atomic_save_image`: a hidden temporary file beside
    ``dest``, fsync, rename). A resource error (a full disk) is left to the command line's one line."""
    from kdtoolkit.foundation import atomic_save_image, is_resource_error

    jpeg = dest.suffix in _JPEG_SUFFIXES
    try:
        atomic_save_image(img, dest, format="JPEG" if jpeg else "PNG", **({"quality": 95} if jpeg else {}))
    except OSError as exc:
        if is_resource_error(exc):
            raise
        raise DataError(f"cannot write image: {exc.strerror or exc}", source=str(dest)) from None


def _run_job(job: _Job, seed: int) -> int:
    """Write every pending output of ``job``; return how many."""
    import torch

    img = _load(job.source)
    name = Path(job.source).name
    for op, k, dest in job.outputs:
        g = torch.Generator().manual_seed(_output_seed(seed, job.class_name, name, op, k))
        _write_atomic(hflip(apply_op(img, op, g), g), Path(dest))
    return len(job.outputs)


def _execute(jobs: list[_Job], seed: int, workers: int, progress, task) -> int:
    """Run the jobs in this thread (``workers`` 0) or in a pool of threads (Pillow's decoding,
    transforms and encoding release the GIL); advance the bar once per image."""
    start, written = time.perf_counter(), 0

    def done(n: int) -> None:
        nonlocal written
        written += n
        progress.advance(task, images_per_s=written / max(time.perf_counter() - start, 1e-9))

    if workers == 0:
        for job in jobs:
            done(_run_job(job, seed))
        return written
    from concurrent.futures import ThreadPoolExecutor, as_completed

    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = [pool.submit(_run_job, job, seed) for job in jobs]
        try:
            for fut in as_completed(futures):
                done(fut.result())
        except BaseException:
            for fut in futures:
                fut.cancel()
            raise
    return written


def run_prepare(
    src: Path,
    out: Path,
    *,
    copies: int = 10,
    ops: tuple[str, ...] = OPS,
    seed: int = 0,
    workers: int = 0,
    quiet: bool = False,
) -> dict:
    """Write the augmented copies of every image of ``src`` under ``out``; return a summary.

    Parameters:
        src: the split folder, one sub-folder of images per class.
        out: the output folder (created); one sub-folder per class is written.
        copies: outputs per image and operation (at least 1).
        ops: the operations, from rotate, skew, shear, distort.
        seed: seed of every output (with its class, file name, operation and copy index).
        workers: worker threads (0: none, everything in the calling thread).
        quiet: no progress bar.
    """
    from kdtoolkit.foundation import Progress

    for name, value, low in (("--copies", copies, 1), ("--seed", seed, 0), ("--workers", workers, 0)):
        if not isinstance(value, int) or value < low:
            raise KdtError(f"expected an integer of at least {low}, got {value!r}", source=name)
    src, out = Path(src).expanduser().resolve(), Path(out).expanduser().resolve()
    if not src.is_dir():
        raise DataError("SRC_ROOT " + ("is not a folder" if src.exists() else "does not exist"), source=str(src))
    classes = _scan(src)
    _check_out(src, out)
    _check_manifest(out, src, seed)
    jobs, existing = _plan(classes, out, copies, ops)
    n_images = sum(len(files) for _, files in classes)
    started = time.perf_counter()
    with Progress(enabled=not quiet) as progress:
        task = progress.add("prepare", total=n_images, completed=n_images - len(jobs))
        written = _execute(jobs, seed, workers, progress, task) if jobs else 0
        progress.finish(task)
    return {
        "classes": len(classes),
        "images": n_images,
        "outputs": n_images * copies * len(ops),
        "written": written,
        "existing": existing,
        "seconds": time.perf_counter() - started,
        "out": str(out),
    }
