"""Write a trained stage as a self-contained model: ``kdt export``.

Two formats, both loadable without kdtoolkit or the plugins:

- ``exported-program`` (``.pt2``): :func:`torch.export.export` with a
  dynamic batch dimension, saved with :func:`torch.export.save`; load it
  with ``torch.export.load(path).module()``.
- ``torchscript`` (``.pt``): :func:`torch.jit.trace`; load it with
  ``torch.jit.load(path)``. PyTorch has deprecated TorchScript; it is kept
  for runtimes that still read it (C++ ``torch::jit::load``, older servers).

The exported module maps images ``[B, 3, S, S]`` (preprocessed as the
stage's test split) to a dict of tensors: ``logits`` and the head's
``record_keys`` (for prototype heads ``min_distances`` and ``argmin``).
A ``kdtoolkit.json`` extra file records the stage, the input size, the
output names, the class names and the data table (its ``mean``/``std``).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kdtoolkit.foundation.errors import KdtError
from kdtoolkit.plugin.declared import record_keys
from kdtoolkit.use.rundir import StageDir

#: ``--format`` values and the file suffix each writes by default.
FORMATS = {"exported-program": ".pt2", "torchscript": ".pt"}


class ExportedOutputs(nn.Module):
    """A model restricted to the outputs worth exporting (a dict of tensors)."""

    def __init__(self, model: nn.Module, keys: tuple[str, ...]):
        super().__init__()
        self.model = model
        self.keys = keys

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        out = self.model(x)
        return {k: out[k] for k in self.keys}


def _example(stage: StageDir, test: Any) -> torch.Tensor:
    if len(test):
        x, _ = test[0]
        return torch.stack([x, x]).float()
    size = int(getattr(test, "image_size", 224))
    return torch.zeros(2, 3, size, size)


def export_stage(
    stage: StageDir, fmt: str, out: Path | None = None, data: tuple[str, ...] | list[str] = ()
) -> dict[str, Any]:
    """Export ``stage``'s trained model (CPU, eval mode, float32).

    :param stage: a finished stage.
    :param fmt: ``exported-program`` or ``torchscript``.
    :param out: the file to write (default ``<stage>/model<suffix>``); a
        ``.safetensors`` name or an existing run file is refused.
    :param data: ``KEY=VALUE`` changes to the stage's data table, e.g. its
        ``root`` on this machine (the test split gives the example input and
        the class names).
    :return: ``{"path", "format", "outputs", "input_shape"}``.
    :raises KdtError: for an unknown format or a model the exporter refuses.
    """
    from kdtoolkit.foundation.io import atomic_write_bytes, is_resource_error
    from kdtoolkit.use.predict import stage_test_split

    if fmt not in FORMATS:
        raise KdtError(f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}", source="--format")
    out = Path(out) if out is not None else stage.path / f"model{FORMATS[fmt]}"
    if out.suffix == ".safetensors" or out.name in ("result.json", "recipe.resolved.json", "evaluation.json"):
        raise KdtError(
            f"refusing to write an exported model over {out.name}; use a {FORMATS[fmt]} file name", source=str(out)
        )
    model = stage.model("cpu")
    test = stage_test_split(stage, data)
    head = stage.run.plugins.registry("head").get(stage.spec["model"]["head"]["name"])
    keys = ("logits", *[k for k in record_keys(head) if k != "logits"])
    wrapped = ExportedOutputs(model, keys).eval()
    example = _example(stage, test)
    info = {
        "stage": stage.name,
        "run": str(stage.run.path),
        "format": fmt,
        "outputs": list(keys),
        "input_shape": [None, *example.shape[1:]],
        "classes": stage.classes() or [str(c) for c in getattr(test, "classes", []) or []],
        "data": stage.spec["data"],
    }
    extra = {"kdtoolkit.json": json.dumps(info, default=str)}
    try:
        blob = _export_bytes(wrapped, example, fmt, extra)
    except Exception as exc:  # the exporters raise many types; the message is what the user needs
        raise KdtError(
            f"{fmt} export failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}",
            source=str(stage.path),
        ) from None
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(out, blob)
    except OSError as exc:
        if is_resource_error(exc):  # a full disk: the command line's one line for resource errors
            raise
        raise KdtError(f"cannot write the exported model: {exc.strerror or exc}", source=str(out)) from None
    return {"path": str(out), "format": fmt, "outputs": list(keys), "input_shape": info["input_shape"]}


def _export_bytes(model: nn.Module, example: torch.Tensor, fmt: str, extra: dict[str, str]) -> bytes:
    import io

    buf = io.BytesIO()
    with torch.no_grad():
        if fmt == "exported-program":
            from torch.export import Dim, export, save

            program = export(model, (example,), dynamic_shapes=({0: Dim("batch", min=1)},))
            save(program, buf, extra_files=extra)
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # TorchScript's deprecation and tracer warnings
                traced = torch.jit.trace(model, example, strict=False, check_trace=False)
                torch.jit.save(traced, buf, _extra_files=extra)
    return buf.getvalue()
