"""The ``kdt`` command: the click commands and nothing else.

Owns the command group and its commands (:mod:`.commands`: ``run``, ``validate``, ``metrics``,
``report``, ``plugins``, ...), the commands over trained runs (:mod:`.use`: ``predict``, ``evaluate``,
``export``) and the generator of the reference pages in ``docs/`` (:mod:`.docgen`).

May import: every other package of kdtoolkit but :mod:`kdtoolkit.testing`, the one layer above it (the
testing kit checks parameter docs with :mod:`.docgen`).
"""

from __future__ import annotations

from kdtoolkit.cli.commands import cli, main

__all__ = ["cli", "main"]
