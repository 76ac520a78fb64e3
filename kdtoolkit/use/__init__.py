"""Using trained runs: the back-ends of ``kdt predict``, ``evaluate``, ``export``, ``inspect`` and ``check``.

Owns the run-directory API (:mod:`.rundir`: :class:`RunDir`, :class:`StageDir`), records evaluated
again on another split (:mod:`.evaluate`), predictions on image files (:mod:`.predict`), exported
models (:mod:`.export`), module paths and output shapes (:mod:`.inspect`) and the check that every
image of every dataset decodes (:mod:`.datacheck`).

May import: :mod:`kdtoolkit.engine`, :mod:`kdtoolkit.results`, :mod:`kdtoolkit.recipe`,
:mod:`kdtoolkit.plugin`, :mod:`kdtoolkit.foundation`.

The public API is what this module exports (``__all__``); names are imported lazily, so importing
the package costs nothing until one is used.
"""

from __future__ import annotations

from kdtoolkit.foundation.lazy import lazy_exports

_EXPORTS = {
    "SplitCheck": "datacheck",
    "distinct_data": "datacheck",
    "build_split": "datacheck",
    "check_item": "datacheck",
    "check_split": "datacheck",
    "check_data": "datacheck",
    "summary_table": "datacheck",
    "data_spec": "evaluate",
    "default_out": "evaluate",
    "run_precision": "evaluate",
    "RUN_FILES": "evaluate",
    "check_out": "evaluate",
    "evaluate_stage": "evaluate",
    "FORMATS": "export",
    "ExportedOutputs": "export",
    "export_stage": "export",
    "tables": "inspect",
    "inspect_stage": "inspect",
    "IMAGE_SUFFIXES": "predict",
    "image_paths": "predict",
    "load_image": "predict",
    "stage_test_split": "predict",
    "predict": "predict",
    "stage_order": "rundir",
    "trained_spec": "rundir",
    "RunDir": "rundir",
    "StageDir": "rundir",
}

__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
