"""Moved to :mod:`kdt_prototypes.figures`, the shared prototype layer.

Its public names stay importable from here for one more version; code of the project imports the new module.
"""

from kdt_prototypes.figures import *  # noqa: F403
from kdt_prototypes.figures import __all__  # noqa: F401
