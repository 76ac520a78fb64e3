"""kdtoolkit: plugin-based knowledge distillation for PyTorch.

The core (this package) knows nothing about prototypes. It is built in layers, each a package that
imports only the layers below it (``docs/architecture.md``), from the bottom:
:mod:`kdtoolkit.foundation`, :mod:`kdtoolkit.plugin`, :mod:`kdtoolkit.recipe`,
:mod:`kdtoolkit.results`, :mod:`kdtoolkit.engine` (training), :mod:`kdtoolkit.use` (trained runs),
:mod:`kdtoolkit.cli` (the ``kdt`` command) and on top :mod:`kdtoolkit.testing` (the kit for plugin authors).
The module paths of kdtoolkit 0.2 (``kdtoolkit.io``, ``kdtoolkit.engine.rundir``, ...) still import,
with a deprecation warning, until the next version (:mod:`kdtoolkit._compat`).
Components (backbones, heads, losses, metrics, datasets, phases) come from
plugins registered through the ``kdt`` entry-point group.
"""

__version__ = "0.3.0"

from kdtoolkit import _compat

_compat.install()
