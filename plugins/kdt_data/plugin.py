"""Registers the built-in datasets: ``digits`` (embedded default), ``image_folder``, and the papers'
``cub200`` and ``stanford_cars``; and the ``kdt prepare`` command (ProtoPNet's offline augmentation)."""

from __future__ import annotations

from kdtoolkit.plugin import hookimpl


@hookimpl
def kdt_register_datasets(registry):
    registry.add("digits", "kdt_data.datasets:digits")
    registry.add("image_folder", "kdt_data.datasets:image_folder")
    registry.add("cub200", "kdt_data.paper:cub200")
    registry.add("stanford_cars", "kdt_data.paper:stanford_cars")


@hookimpl
def kdt_add_commands(cli):
    from .command import prepare

    cli.add_command(prepare)
