"""One weight applied by several Linear layers (ALBERT's shared layers, a layer called twice): compressed once.

A model that applies one weight at several places stores it once; compressing each use on its own calibration data
gives each use a different weight, so the artifact would store one copy per use (ALBERT with 2:4 SparseGPT came out
1.4x *larger* than the dense model). The calibrated passes (N:M pruning, group quantization, low-rank compensation)
instead compress such a weight once: its fitting statistics are the sum of every use's (``X^T X`` over the inputs of
all uses: the weight that minimises the output error of all of them together), collected in one run of the whole model
as it stands before the pass; the first use is compressed with them, and every later use then applies that same
compressed weight. Its report row measures the error on its own held-out inputs.

Uses are grouped by the source weight they were imported from (``Graph._later_uses``), only while their weights are
still the same and the pass compresses them with the same settings; otherwise each use is compressed on its own (and
stored on its own), as before.
"""
from __future__ import annotations

from typing import Any, Callable

from ..compressor.executor import Executor
from ..compressor.ir import Graph, Linear, _same_weight
from .stats import GramStats, LinearStatsObserver


class SharedUses:
    def __init__(self, graph: Graph, todo: dict[str, Any], key: Callable[[Any], Any] = lambda cfg: cfg):
        self.first_of: dict[str, str] = {}  # later use -> first use
        self.uses: dict[str, list[str]] = {}  # first use -> every use (first included), in graph order
        for name, (lin, first) in graph._later_uses().items():
            if (name in todo and first.name in todo and key(todo[name]) == key(todo[first.name])
                    and _same_weight(first.weight, lin.weight)):  # fmt: skip
                self.first_of[name] = first.name
                self.uses.setdefault(first.name, [first.name]).append(name)
        self.fit: dict[str, GramStats] = {}
        self.held: dict[str, GramStats] = {}

    def all_uses(self) -> set[str]:
        return {n for us in self.uses.values() for n in us}

    def precollected(self) -> set[str]:
        """The layers whose statistics :meth:`collect` gathered (a pass need not collect them block by block)."""
        return self.all_uses() if self.fit else set()

    def collect(self, graph: Graph, ctx) -> None:
        """Gram statistics of every use, fit and held-out split, in one run of the whole model per batch."""
        if not self.uses or ctx.calib is None:
            return
        names = sorted(self.all_uses())
        dims = {lin.name: lin.in_features for lin in graph.linears() if lin.name in self.first_of or lin.name in self.uses}
        ex = Executor(graph, ctx.device)

        def run(data) -> dict[str, GramStats]:
            obs = LinearStatsObserver(names, dims, ctx.device)
            for batch in data.batches():
                ex.run_torch(batch, outputs=[], observer=obs, check=False)
            return obs.stats

        self.fit = run(ctx.calib)
        held = ctx.heldout is not None and ctx.heldout.num_samples > 0
        self.held = run(ctx.heldout) if held else self.fit

    def is_later(self, name: str) -> bool:
        return name in self.first_of

    def stats(self, name: str, fit, held):
        """(fit, held) statistics a pass compresses layer ``name`` with: for the first use of a group, the sums over
        all its uses; otherwise the ones given (the block's own)."""
        if name not in self.uses or not self.fit:
            return fit, held
        us = self.uses[name]
        return merged([self.fit[n] for n in us]), merged([self.held[n] for n in us])

    def note(self, name: str) -> str:
        """The report note of a layer in a group."""
        first = self.first_of.get(name, name)
        k = len(self.uses[first])
        if name == first:
            return f"one weight, {k} layers: compressed once" + (f" on the inputs of all {k}" if self.fit else "")
        return f"the weight compressed for '{first}' (one weight, {k} layers)"

    def compress(self, graph: Graph, lin: Linear, fit, held, compress_fn, ctx, rows: dict, done: dict, row_fn=None):
        """The report row of layer ``lin`` of a pass: a later use of a compressed group applies its first use's
        weight (``done``: the pass's record of what it did per layer, copied); the first use of a group is compressed
        by ``compress_fn(lin, fit, held)`` with the sums of all uses' statistics; any other layer with ``fit`` /
        ``held`` as given. ``row_fn(lin, before, held)``: the pass's own report row for a later use (the errors it
        measures, e.g. low-rank compensation's against the dense reference); default: the output error against the
        weight before the pass."""
        if self.is_later(lin.name):
            first = graph.linear(self.first_of[lin.name])
            row = self._reuse(lin, first, ctx, rows.get(first.name), row_fn)
            if row is not None:
                if first.name in done:
                    done[lin.name] = done[first.name]
                return row
            if self.fit:  # the first use kept its weight: this use on its own statistics
                fit, held = self.fit[lin.name], self.held[lin.name]
        else:
            fit, held = self.stats(lin.name, fit, held)
        row = compress_fn(lin, fit, held)
        if lin.name in self.uses and row.status == "compressed":
            row.note = "; ".join(x for x in (row.note, self.note(lin.name)) if x)
        return row

    def _reuse(self, lin: Linear, first: Linear, ctx, first_row, row_fn=None):
        """Give the later use ``lin`` the weight its first use was compressed to, and its report row (error on its
        own held-out inputs). None when the first use was not compressed."""
        from ..compressor.pipeline import make_row
        from ..passes import _reference
        from .stats import relative_output_error

        if first_row is None or first_row.status != "compressed" or _same_weight(first.weight, lin.weight):
            return None
        before = lin.weight
        _reference.remember(ctx, lin)
        lin.weight = first.weight
        held = self.held.get(lin.name)
        if row_fn is not None:
            row = row_fn(lin, before, held)
            row.note = "; ".join(x for x in (row.note, self.note(lin.name)) if x)
            row.extra = {**dict(first_row.extra or {}), **(row.extra or {})}
            return row
        err = None
        if held is not None and held.n > 0:
            err = relative_output_error(before.materialize(), lin.weight.materialize(), held.gram())
        return make_row(lin, before, before.shape, error=err, seconds=0.0, note=self.note(lin.name),
                        extra=dict(first_row.extra or {}))


def merged(stats: list[GramStats]) -> GramStats:
    """One :class:`GramStats` holding the sums of several (same width)."""
    out = GramStats(stats[0].dim, stats[0].H.device)
    for s in stats:
        out.H += s.H
        out.sum += s.sum
        out.n += s.n
    return out
