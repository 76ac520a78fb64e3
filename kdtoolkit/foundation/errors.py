"""Errors that the command line turns into one clear line and exit code 2.

Every problem caused by user input (a recipe, a path, a dataset, a
checkpoint, a plugin) is raised as :class:`KdtError` or a subclass.  The CLI
prints ``str(error)`` on one line and exits with code 2, without a traceback.
"""

from __future__ import annotations


class KdtError(Exception):
    """A user-facing error: printed as one line, exit code 2.

    ``source`` names the file (or other origin) and ``key`` the key path inside
    it, e.g. ``KdtError("expected a number, got 'ten'", source="recipes/x.toml",
    key="stages.kd.losses[1].weight")`` prints as
    ``recipes/x.toml: stages.kd.losses[1].weight: expected a number, got 'ten'``.
    """

    exit_code = 2

    def __init__(self, message: str, *, source: str | None = None, key: str | None = None):
        self.message = " ".join(str(message).split())
        self.source = source
        self.key = key
        super().__init__(self.__str__())

    def __str__(self) -> str:
        parts = [p for p in (self.source, self.key) if p]
        parts.append(self.message)
        return ": ".join(parts)


class RecipeError(KdtError):
    """A recipe is malformed: unknown key, wrong type, bad value, unknown component."""


class DataError(KdtError):
    """A dataset cannot be read: missing folder, unreadable image, no classes."""


class CheckpointError(KdtError):
    """A weights, checkpoint or records file is missing, truncated or inconsistent."""


class PluginError(KdtError):
    """A plugin failed to load, registered a duplicate name or raised in a hook."""


class TrainingError(KdtError):
    """Training cannot go on (e.g. a non-finite loss); the last checkpoint is kept."""


class Interrupted(Exception):
    """Raised after SIGINT once a checkpoint has been written (the message says where); exit code 130."""
