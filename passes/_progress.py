"""Progress bars for passes that calibrate block by block and then solve layer by layer.

``rich`` allows one live display at a time, so nested ``track()`` calls cannot be used for "blocks" and
"layers"; :class:`PassProgress` shows both bars in one display (and does nothing without a console)::

    with PassProgress(ctx, "nm_prune", layers=len(todo)) as prog:
        for step in sequential(graph, ctx.calib, ctx.heldout, ctx.device, progress=prog.blocks):
            ...
            prog.layer_done(lin.name)
"""
from __future__ import annotations

from typing import Any, Iterable


class PassProgress:
    def __init__(self, ctx: Any, title: str, layers: int):
        self.enabled = bool(getattr(ctx, "show_progress", False)) and getattr(ctx, "console", None) is not None
        # no bars in logs / pipes: rich would leave a blank line on stderr there
        self.enabled = self.enabled and bool(getattr(ctx.console, "is_terminal", False))
        self.ctx = ctx
        self.title = title
        self.layers = layers
        self._p = None
        self._blocks = None
        self._layers = None

    def __enter__(self) -> "PassProgress":
        if self.enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self._p = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                               console=self.ctx.console, transient=True)  # fmt: skip
            self._p.__enter__()
            self._layers = self._p.add_task(f"{self.title}: solving layers", total=max(self.layers, 0))
        return self

    def __exit__(self, *exc) -> None:
        if self._p is not None:
            self._p.__exit__(*exc)
            self._p = None

    def blocks(self, iterable: Iterable, description: str = "", total: int | None = None):
        """Drop-in for ``sequential(progress=...)``: advances a "calibrating blocks" bar."""
        if self._p is None:
            yield from iterable
            return
        self._blocks = self._p.add_task(f"{self.title}: calibrating blocks", total=total)
        for item in iterable:
            self._p.update(self._blocks, description=f"{self.title}: calibrating {getattr(item, 'name', '')}")
            yield item
            self._p.advance(self._blocks)

    def layer_done(self, name: str = "") -> None:
        if self._p is not None:
            self._p.update(self._layers, advance=1, description=f"{self.title}: solved {name}")
