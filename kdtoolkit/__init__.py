"""kdtoolkit: plugin-based knowledge distillation for PyTorch.

The core (this package) knows nothing about prototypes: it loads and validates
recipes, keeps the component registries, runs the engine (:mod:`kdtoolkit.engine`) and the CLI.
Components (backbones, heads, losses, metrics, datasets, phases) come from
plugins registered through the ``kdt`` entry-point group.
"""

__version__ = "0.2.0"
