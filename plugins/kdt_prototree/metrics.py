"""The ``tree_modes`` metric: ProtoTree's three inference modes from one forward pass."""

from __future__ import annotations


from kdtoolkit.results import Records

MODES = ("soft", "sample_max", "greedy")


class TreeModes:
    """Accuracy of a ProtoTree in its three inference modes (soft, sample_max,
    greedy), the fidelity of the two deterministic modes to the soft one (the
    fraction of test images where they predict the same class) and the mean
    path length of each mode (soft: the longest kept path). Result key
    ``tree_modes`` (``accuracy``, ``fidelity``, ``mean_path_length``), shown
    in the "ProtoTree inference modes" table of ``results.md``."""

    requires_reference = False
    requires_records = ("greedy_prediction", "sample_max_prediction", "greedy_path_length", "sample_max_path_length")

    def __call__(self, records: Records, reference: Records | None = None) -> dict:
        labels = records["labels"]
        soft = records["logits"].argmax(1)
        pred = {"soft": soft, "sample_max": records["sample_max_prediction"], "greedy": records["greedy_prediction"]}
        mean = lambda t: float(t.double().mean()) if t.numel() else None
        return {
            "tree_modes": {
                "accuracy": {m: mean(pred[m] == labels) for m in MODES},
                "fidelity": {m: mean(pred[m] == soft) for m in MODES[1:]},
                "mean_path_length": {
                    "soft": records.meta.get("soft_path_length"),
                    "sample_max": mean(records["sample_max_path_length"]),
                    "greedy": mean(records["greedy_path_length"]),
                },
            }
        }
