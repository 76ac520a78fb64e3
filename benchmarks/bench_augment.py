"""Benchmark: throughput of ProtoPNet's online augmentation (``image_folder`` ``augmentation = "protopnet"``).

Synthetic 500 x 400 JPEGs (quality 90) in a class-per-folder tree; training
items of 224 px (shorter side resized to 256, then cropped) from
``image_folder``'s train split, one row per augmentation:

- ``none``: decode, resize, centre crop, normalise (augmentation off: the floor);
- ``crop_flip``: the default (random crop, 50% flip);
- ``rotate``, ``skew``, ``shear``, ``distort``: that operation alone on the
  whole image (then a 50% flip, the centre crop);
- ``protopnet``: one of the four, each equally likely (the pooled set).

Each is timed in this process (one item after the other, one torch thread
as in a DataLoader worker: with torch's default threads on a busy machine
the small tensor operations of each item wait on each other's cores, 10x
slower in a check on the 2-core machine) and through a
torch DataLoader with ``--workers`` worker processes (batch 32, persistent
workers, the second pass timed). Images/s, and ratios: workers against one
process, and one process against ``none``. Then the estimate: how many
loader processes (CPU cores, at the one-process rate) keep a GPU fed that
trains at ``--gpu-rates`` images/s (figures you state; nothing is measured
on a GPU).

Usage::

    python benchmarks/bench_augment.py [--images 96] [--workers 2] [--gpu-rates 1000,2500]
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "plugins"), str(ROOT)]

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from kdt_data.augment import OPS, Augmentation  # noqa: E402
from kdt_data.datasets import image_folder  # noqa: E402

MODES = ("none", "crop_flip", *OPS, "protopnet")


def make_images(root: Path, n: int) -> None:
    """``n`` smooth random 500 x 400 JPEGs in two classes, under root/train and root/test."""
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for k in range(n if split == "train" else 2):
            folder = root / split / f"c{k % 2}"
            folder.mkdir(parents=True, exist_ok=True)
            small = (rng.random((40, 50, 3)) * 255).astype(np.uint8)
            im = Image.fromarray(small).resize((500, 400), Image.Resampling.BICUBIC)
            im.save(folder / f"{k:04d}.jpg", quality=90)


def dataset(root: Path, mode: str):
    if mode == "none":
        return image_folder("train", False, root=str(root), image_size=224, resize=256)
    name = mode if mode in ("crop_flip", "protopnet") else "protopnet"
    ds = image_folder("train", True, root=str(root), image_size=224, resize=256, augmentation=name)
    if mode in OPS:
        ds.augmentation = Augmentation((mode,), 0.5)
    return ds


def one_process(ds) -> float:
    """Items one after the other in this process, with one torch thread (as in a DataLoader worker)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        for i in range(4):
            ds[i]
        t0 = time.perf_counter()
        for i in range(len(ds)):
            ds[i]
        return len(ds) / (time.perf_counter() - t0)
    finally:
        torch.set_num_threads(threads)


def loader(ds, workers: int) -> float:
    dl = torch.utils.data.DataLoader(
        ds, batch_size=32, num_workers=workers, persistent_workers=True, generator=torch.Generator().manual_seed(0)
    )
    for _ in dl:  # start the workers, warm them up
        pass
    t0 = time.perf_counter()
    n = sum(len(batch[1]) for batch in dl)
    rate = n / (time.perf_counter() - t0)
    del dl
    return rate


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=96)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--gpu-rates", default="1000,2500", help="GPU training throughputs (images/s) to compare with")
    args = ap.parse_args()
    gpu_rates = [float(r) for r in args.gpu_rates.split(",")]
    root = Path(tempfile.mkdtemp(prefix="kdt-bench-augment-"))
    make_images(root, args.images)
    rows = {}
    for mode in MODES:
        ds = dataset(root, mode)
        rows[mode] = (one_process(ds), loader(ds, args.workers))
    w = args.workers
    print(
        f"# image_folder train items, 224 px from 500x400 JPEGs, {args.images} images; {os.cpu_count()} CPUs, "
        f"load average {os.getloadavg()[0]:.1f}, torch {torch.__version__}"
    )
    head = (
        f"{'augmentation':12s} {'1 proc img/s':>12s} {'ms/img':>7s} {f'{w} workers img/s':>17s} "
        f"{f'{w}w / 1p':>8s} {'time vs none':>12s}"
    )
    head += "".join(f" {f'cores @ {r:.0f}/s':>14s}" for r in gpu_rates)
    print(head)
    floor = rows["none"][0]
    for mode, (single, multi) in rows.items():
        line = (
            f"{mode:12s} {single:12.1f} {1000 / single:7.1f} {multi:17.1f} {multi / single:7.2f}x "
            f"{floor / single:11.2f}x"
        )
        line += "".join(f" {math.ceil(r / single):14d}" for r in gpu_rates)
        print(line)
    print(
        "# cores @ R/s: loader processes needed to deliver R images/s at the one-process rate "
        "(an estimate; R is a stated GPU training throughput, not a measurement)"
    )


if __name__ == "__main__":
    main()
