"""Reading a run directory's files: the one reader of ``run.json``, ``recipe.resolved.json``,
``results.json`` and every stage's ``result.json``.

Everything that reads a run directory back goes through here: the run-directory API
(:class:`kdtoolkit.use.rundir.RunDir`, which adds models, records and evaluation on top), the
reports over several runs (:func:`kdtoolkit.results.aggregate.load_run`), the training curves of
``results.md`` and a run that resumes (a stage's stored hash). An unpacked run directory is not
trusted: a file is read only when it is a regular file of at most 64 MiB
(:func:`kdtoolkit.foundation.limits.read_text_file`: no hang on a FIFO, no read of ``/dev/zero``),
JSON nested more than :data:`JSON_DEPTH` levels is refused, and a stage folder named by a recipe is
checked to lie inside the run directory (:func:`kdtoolkit.foundation.paths.inside`).

Torch-free: importing this module imports neither torch nor any component.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from kdtoolkit.foundation.errors import KdtError
from kdtoolkit.foundation.limits import read_text_file
from kdtoolkit.foundation.paths import inside

#: The run's resolved recipe, as JSON (what the run trained).
RESOLVED_RECIPE = "recipe.resolved.json"
#: The run's resolved recipe as TOML (the only copy in run directories written before the JSON one).
RESOLVED_TOML = "recipe.resolved.toml"
#: Versions, seed, device and command of the run.
RUN_INFO = "run.json"
#: The results of a finished run.
RESULTS = "results.json"
#: The result (metrics, history, stage hash) of a finished stage, in its folder.
STAGE_RESULT = "result.json"
#: The deepest nesting of tables and lists read from a run file.
JSON_DEPTH = 128


def load_json(path: str | Path) -> Any:
    """The JSON of the run file ``path`` as it is, for a reader that handles every failure itself
    (e.g. a resume that trains a stage again when its ``result.json`` is unreadable).

    :raises KdtError: when ``path`` is not a regular file or is over 64 MiB.
    :raises OSError: when it cannot be opened or read; ``ValueError`` (``UnicodeDecodeError``,
        ``json.JSONDecodeError``) when it is not UTF-8 JSON; ``RecursionError`` when it nests too deeply
        for the JSON parser.
    """
    return json.loads(read_text_file(path))


def read_json(path: str | Path, what: str) -> Any:
    """The JSON of the run file ``path`` (``what`` names it in errors), nested at most :data:`JSON_DEPTH`
    levels deep.

    :raises KdtError: one line naming the file when it is missing (``no <what>``), not a regular file,
        too large, unreadable, not JSON or nested too deeply.
    """
    from kdtoolkit.recipe.loader import check_depth

    try:
        data = load_json(path)
        check_depth(data, str(path), limit=JSON_DEPTH, error=KdtError)
        return data
    except FileNotFoundError:
        raise KdtError(f"no {what}", source=str(path)) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise KdtError(f"unreadable {what} ({type(exc).__name__})", source=str(path)) from None
    except RecursionError:
        raise KdtError(f"unreadable {what} (JSON nested too deeply)", source=str(path)) from None


def resolved_recipe(run: str | Path) -> Any:
    """The content of the run's ``recipe.resolved.json``, or ``None`` when the run directory has none
    (no regular file by that name).

    :raises KdtError: when the file is there but cannot be read (see :func:`read_json`).
    """
    path = Path(run) / RESOLVED_RECIPE
    return read_json(path, "resolved recipe") if path.is_file() else None


def run_info(run: str | Path) -> Any:
    """The content of the run's ``run.json`` (versions, seed, device, command); ``{}`` when absent.

    :raises KdtError: when the file is there but cannot be read (see :func:`read_json`).
    """
    path = Path(run) / RUN_INFO
    return read_json(path, "run.json") if path.is_file() else {}


def run_results(run: str | Path, what: str = "results.json (has the run finished?)") -> Any:
    """The content of the run's ``results.json`` (``what`` names it in errors).

    :raises KdtError: when it is missing or cannot be read (see :func:`read_json`).
    """
    return read_json(Path(run) / RESULTS, what)


def stage_path(run: str | Path, name: str) -> Path:
    """The folder of stage ``name`` in the run directory ``run`` (whether or not it exists), checked to lie
    inside it: a stage name read from a hostile ``recipe.resolved.json`` cannot lead outside the run.

    :raises KdtError: one line, when ``name`` is no plain folder name or leads outside the run directory.
    """
    return inside(Path(run), name, what="run directory")


def stage_result(stage: str | Path) -> Any:
    """The content of ``result.json`` in the stage folder ``stage``.

    :raises KdtError: when it is missing (the stage has not finished) or cannot be read (see :func:`read_json`).
    """
    return read_json(Path(stage) / STAGE_RESULT, "result.json (is the stage finished?)")


def trained_spec(stage: dict[str, Any]) -> dict[str, Any]:
    """A stage's spec (of the resolved recipe) for rebuilding its trained model: the initial weights it
    was trained from (``model.weights``, a backbone's ``pretrained`` download or ``weights`` file) are not
    loaded again, since the stage's ``model.safetensors`` replaces them; so a trained stage needs neither
    network nor those files (the preflight's dry build uses it too)."""
    spec = {**stage, "model": {**stage["model"], "weights": None}}
    backbone = dict(spec["model"]["backbone"])
    if backbone.get("pretrained"):
        backbone["pretrained"] = False
    if backbone.get("weights"):
        backbone["weights"] = None
    spec["model"]["backbone"] = backbone
    return spec
