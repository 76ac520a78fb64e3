"""Progress bars (rich) with ETA and running loss, and run logging.

Only rank 0 of a distributed run shows anything. ``quiet`` hides bars and
log lines (tests, scripts).
"""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress as RichProgress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


class Progress:
    """A thin wrapper around :class:`rich.progress.Progress`.

    :param console: where to draw (default: stderr).
    :param enabled: draw bars and log lines at all.
    """

    def __init__(self, console: Console | None = None, enabled: bool = True):
        self.console = console or Console(stderr=True, log_path=False)
        self.enabled = enabled
        self._p: RichProgress | None = None
        if enabled:
            self._p = RichProgress(
                TextColumn("[bold blue]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("epoch {task.fields[epoch]}"),
                TextColumn("loss {task.fields[loss]}"),
                TextColumn("{task.fields[speed]}"),
                TimeElapsedColumn(),
                TextColumn("ETA"),
                TimeRemainingColumn(),
                console=self.console,
                transient=False,
            )

    def __enter__(self) -> Progress:
        if self._p is not None:
            self._p.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._p is not None:
            self._p.stop()

    def add(self, description: str, total: int, completed: int = 0) -> TaskID | None:
        if self._p is None:
            return None
        return self._p.add_task(description, total=total, completed=completed, epoch="-", loss="-", speed="")

    def advance(
        self,
        task: TaskID | None,
        loss: float | None = None,
        epoch: str | None = None,
        images_per_s: float | None = None,
    ) -> None:
        """One step done: the bar moves by one, with the running loss, the epoch and the throughput."""
        if self._p is None or task is None:
            return
        fields: dict[str, Any] = {}
        if loss is not None:
            fields["loss"] = f"{loss:.4f}"
        if epoch is not None:
            fields["epoch"] = epoch
        if images_per_s is not None:
            fields["speed"] = f"{images_per_s:,.0f} img/s"
        self._p.update(task, advance=1, **fields)

    def finish(self, task: TaskID | None) -> None:
        if self._p is None or task is None:
            return
        t = self._p.tasks[[x.id for x in self._p.tasks].index(task)]
        self._p.update(task, completed=t.total)

    def log(self, message: str) -> None:
        if self.enabled:
            self.console.log(message)
