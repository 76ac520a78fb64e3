"""Compare two run directories tensor by tensor: the check that a refactor changes no number.

    python benchmarks/compare_runs.py RUN_A RUN_B

For every stage present in both: the weights in ``model.safetensors`` (and
``losses.safetensors``), the evaluation records and every number of
``result.json`` (timings left out) must be identical. safetensors writes its
metadata in a per-process random order, so files are compared as tensors,
never as bytes. Exit code 0 when everything is identical, 1 otherwise (each
difference is printed).

To check a change of the engine: run a recipe with the code before and after
on the same machine, e.g.::

    git worktree add /tmp/before <old commit>
    (cd /tmp/before && PYTHONPATH=.:plugins python -m kdtoolkit run recipes/proto2proto.toml --out /tmp/p2p-before -q)
    kdt run recipes/proto2proto.toml --out /tmp/p2p-after -q
    python benchmarks/compare_runs.py /tmp/p2p-before /tmp/p2p-after
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

#: result.json keys that are not results: timings, and the stage state written under another name before.
IGNORED = {"train_seconds", "pms_seconds", "flags", "state", "stage_hash"}


def _numbers(obj, path=""):
    if isinstance(obj, dict):
        for k, v in obj.items():
            if k not in IGNORED:
                yield from _numbers(v, f"{path}.{k}" if path else k)
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _numbers(v, f"{path}[{i}]")
    elif isinstance(obj, (int, float)) and not isinstance(obj, bool):
        yield path, obj


def compare_tensors(a: Path, b: Path) -> list[str]:
    """Differences between two safetensors files, tensor by tensor."""
    ta, tb = load_file(str(a)), load_file(str(b))
    out = [f"{a.name}: tensor {k} only in one run" for k in sorted(set(ta) ^ set(tb))]
    for k in sorted(set(ta) & set(tb)):
        if ta[k].shape != tb[k].shape or not torch.equal(ta[k], tb[k]):
            diff = (ta[k].double() - tb[k].double()).abs().max().item() if ta[k].shape == tb[k].shape else "shape"
            out.append(f"{a.parent.name}/{a.name}: {k} differs (max abs difference {diff})")
    return out


def compare_results(a: Path, b: Path) -> list[str]:
    """Differences between two result.json files, number by number."""
    na, nb = dict(_numbers(json.loads(a.read_text()))), dict(_numbers(json.loads(b.read_text())))
    out = [f"{a.parent.name}/result.json: {k} only in one run" for k in sorted(set(na) ^ set(nb))]
    for k in sorted(set(na) & set(nb)):
        x, y = na[k], nb[k]
        if x != y and not (isinstance(x, float) and isinstance(y, float) and math.isnan(x) and math.isnan(y)):
            out.append(f"{a.parent.name}/result.json: {k}: {x} vs {y}")
    return out


def compare(run_a: Path, run_b: Path) -> list[str]:
    """Every difference between two run directories (empty: identical)."""
    problems = []
    stages = sorted(p.name for p in run_a.iterdir() if (p / "result.json").is_file())
    for name in stages:
        sa, sb = run_a / name, run_b / name
        if not (sb / "result.json").is_file():
            problems.append(f"stage {name} missing in {run_b}")
            print(f"{name}: missing in {run_b}")
            continue
        found = []
        for fname in ("model.safetensors", "records.safetensors", "losses.safetensors"):
            if (sa / fname).is_file() or (sb / fname).is_file():
                if not ((sa / fname).is_file() and (sb / fname).is_file()):
                    found.append(f"{name}/{fname} only in one run")
                    continue
                found += compare_tensors(sa / fname, sb / fname)
        found += compare_results(sa / "result.json", sb / "result.json")
        print(f"{name}: {'identical' if not found else f'{len(found)} differences'}")
        problems += found
    return problems


def main(argv: list[str] | None = None) -> int:
    args = argv if argv is not None else sys.argv[1:]
    if len(args) != 2:
        print(__doc__.split("\n\n")[1], file=sys.stderr)
        return 2
    problems = compare(Path(args[0]), Path(args[1]))
    for p in problems:
        print("DIFFERS:", p)
    print("identical" if not problems else f"{len(problems)} differences")
    return 0 if not problems else 1


if __name__ == "__main__":
    sys.exit(main())
