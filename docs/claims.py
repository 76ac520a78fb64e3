"""The numbers of docs/claims.md, from a multi-seed run of recipes/proto2proto.toml.

    kdt run recipes/proto2proto.toml --seeds 0,1,2,3,4 --out runs/p2p-seeds
    python docs/claims.py runs/p2p-seeds > claims-numbers.md

Reads every ``seed-<n>/results.json`` and, for the two representation
measures, each stage's ``model.safetensors`` (one forward pass over the test
split per model, on the CPU). Prints Markdown: the per-model means ± sample
standard deviations, and one paired comparison per line (mean ± sd of the
per-seed differences, the paired t statistic and its two-sided p-value from
``scipy.stats.ttest_rel``, and in how many seeds the difference has the
expected sign).

Representation measures (not in results.json):

- prototype distance: mean over j of ‖p^s_j − p^t_j‖₂, the global explanation
  loss of the final student against the teacher (prototypes paired by index);
- latent distance: mean over test images and latent locations of
  ‖z^t − z^s‖², the squared distance of the add-on outputs (what the
  patch-prototype correspondence loss pulls together, here everywhere).
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

STUDENTS = ("baseline", "kd", "kd_no_global", "kd_no_ppc")
METRICS = ("accuracy", "aap", "ajs", "pms", "prototype_distance", "latent_distance", "aap_gap")


def representation_measures(seed_dir: Path) -> dict[str, dict[str, float]]:
    """Prototype and latent distance of every student to the teacher of one seed's run."""
    import torch

    from kdtoolkit.use.rundir import RunDir

    run = RunDir(seed_dir)
    teacher = run.stage("teacher")
    test = teacher.data().test
    x = torch.stack([test[i][0] for i in range(len(test))])
    out = {}
    with torch.inference_mode():
        tm = teacher.model("cpu")
        zt = tm(x)["features"]
        for name in STUDENTS:
            sm = run.stage(name).model("cpu")
            zs = sm(x)["features"]
            out[name] = {
                "prototype_distance": float((sm.head.prototypes - tm.head.prototypes).norm(dim=1).mean()),
                "latent_distance": float(((zt - zs) ** 2).sum(1).mean()),
            }
    return out


def per_seed(run: Path) -> list[dict[str, dict[str, float]]]:
    """For every seed: stage → metric → value (τ = ∞ for AAP and AJS)."""
    seeds = []
    for d in sorted(run.glob("seed-*"), key=lambda p: int(p.name.split("-")[1])):
        stages = json.loads((d / "results.json").read_text(encoding="utf-8"))["stages"]
        reps = representation_measures(d)
        row = {}
        for name in ("teacher", *STUDENTS):
            r = stages[name]
            row[name] = {
                "accuracy": r["accuracy"],
                "aap": r["aap"]["inf"],
                "ajs": r["ajs"]["inf"],
                "pms": r["pms"],
                "aap_gap": abs(r["aap"]["inf"] - stages["teacher"]["aap"]["inf"]),
                **reps.get(name, {}),
            }
        seeds.append(row)
    return seeds


def summary(seeds: list[dict]) -> str:
    """Mean ± sd per model and metric, as a Markdown table."""
    lines = ["| model | " + " | ".join(METRICS) + " |", "|---" * (len(METRICS) + 1) + "|"]
    for name in ("teacher", *STUDENTS):
        cells = []
        for m in METRICS:
            xs = [s[name][m] for s in seeds if m in s[name]]
            cells.append(f"{statistics.mean(xs):.4f} ± {statistics.stdev(xs):.4f}" if len(xs) > 1 else "—")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def compare(seeds: list[dict], a: str, b: str, metric: str, expect: str) -> str:
    """One paired comparison a − b on ``metric``; ``expect`` is ``>`` or ``<`` (the claim's direction)."""
    from scipy.stats import ttest_rel

    xs, ys = [s[a][metric] for s in seeds], [s[b][metric] for s in seeds]
    d = [x - y for x, y in zip(xs, ys)]
    t = ttest_rel(xs, ys)
    right = sum((v > 0) if expect == ">" else (v < 0) for v in d)
    return (
        f"| {a} − {b} | {metric} | {expect} 0 | {statistics.mean(d):+.4f} ± {statistics.stdev(d):.4f} | "
        f"{t.statistic:.2f} | {t.pvalue:.2g} | {right}/{len(d)} |"
    )


COMPARISONS = (
    ("claim 1", "kd", "baseline", "ajs", ">"),
    ("claim 1", "kd", "baseline", "pms", ">"),
    ("claim 1", "kd", "baseline", "aap_gap", "<"),
    ("claim 1", "kd", "baseline", "accuracy", ">"),
    ("claim 2", "kd_no_ppc", "baseline", "prototype_distance", "<"),
    ("claim 2", "kd_no_ppc", "baseline", "pms", ">"),
    ("claim 2", "kd", "kd_no_ppc", "pms", ">"),
    ("claim 3", "kd_no_global", "baseline", "latent_distance", "<"),
    ("claim 3", "kd_no_global", "baseline", "ajs", ">"),
    ("claim 3", "kd_no_global", "baseline", "aap_gap", "<"),
    ("claim 3", "kd", "kd_no_global", "ajs", ">"),
    ("why", "kd_no_ppc", "baseline", "latent_distance", "<"),
    ("why", "kd_no_global", "kd_no_ppc", "pms", ">"),
)


def main(run: Path) -> None:
    seeds = per_seed(run)
    print(f"{len(seeds)} seeds of {run}\n\n" + summary(seeds) + "\n")
    print("| claim | difference | metric | expected | mean ± sd | t | p | seeds in the expected direction |")
    print("|---|---|---|---|---|---|---|---|")
    for claim, a, b, metric, expect in COMPARISONS:
        print(compare(seeds, a, b, metric, expect).replace("| ", f"| {claim} | ", 1))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
