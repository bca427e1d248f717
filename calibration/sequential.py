"""Block-by-block calibration (as SparseGPT and SliceGPT do it).

The calibration batches are run to the start of the first block; then for every block the pass collects the
statistics it needs on the *current* inputs of that block (outputs of the already-compressed earlier blocks),
rewrites the block's weights, and the batches are advanced through the rewritten block. Memory is bounded by one
block: only the values live at the block boundary are kept per batch.

Usage (a pass's ``run``)::

    for step in sequential(graph, ctx.calib, ctx.heldout, ctx.device, progress=ctx.track):
        stats = step.collect([l.name for l in step.linears()])            # fit split
        held = step.collect(names, heldout=True)                           # held-out split (errors only)
        ... replace weights of step.linears() ...
    # leaving the loop body advances the batches through the compressed block
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

import torch

from ..compressor.executor import Executor, Observer
from ..compressor.ir import Block, Graph, Linear, MoE
from .stats import GramStats, LinearStatsObserver


@dataclass
class BlockStep:
    ex: Executor
    block: Block
    fit_envs: list[dict[str, torch.Tensor]]
    held_envs: list[dict[str, torch.Tensor]]

    @property
    def graph(self) -> Graph:
        return self.ex.g

    def nodes(self):
        return self.graph.nodes[self.block.start : self.block.stop]

    def linears(self) -> list[Linear]:
        out: list[Linear] = []
        for n in self.nodes():
            if isinstance(n, Linear):
                out.append(n)
            elif isinstance(n, MoE):
                out.extend(n.linears())
        return out

    def moes(self) -> list[MoE]:
        return [n for n in self.nodes() if isinstance(n, MoE)]

    def observe(self, observer: Observer, heldout: bool = False, stop: int | None = None) -> None:
        """Run the block (up to node ``stop``, default its end) on (copies of) the current batch states with
        ``observer`` attached."""
        envs = self.held_envs if heldout else self.fit_envs
        for env in envs:
            self.ex.run_range(dict(env), self.block.start, self.block.stop if stop is None else stop, observer)

    def collect(self, names, heldout: bool = False) -> dict[str, GramStats]:
        """Gram statistics of the named Linear layers of this block. Layers reading the same value (q/k/v) share
        one (read-only) :class:`GramStats`; the block is run only as far as the last of them."""
        names = list(names)
        if not names:
            return {}
        want = set(names)
        lins = {lin.name: lin for lin in self.linears() if lin.name in want}
        top: dict[str, Linear] = {}
        stop = self.block.start
        for i, n in enumerate(self.nodes(), self.block.start):
            if isinstance(n, Linear) and n.name in lins:
                top[n.name] = n
                stop = i + 1
            elif isinstance(n, MoE) and any(l.name in lins for l in n.linears()):
                stop = i + 1
        first: dict[str, str] = {}
        alias = {name: first.setdefault(top[name].inputs[0], name) for name in lins if name in top}
        observed = [n for n in lins if alias.get(n, n) == n]
        obs = LinearStatsObserver(observed, {n: lins[n].in_features for n in observed}, self.ex.device)
        self.observe(obs, heldout, stop=stop)
        return {n: obs.stats[alias.get(n, n)] for n in lins}

    def stages(self) -> list[list[Linear]]:
        """Linear layers grouped by dependency inside the block: a layer whose input depends on another layer's
        output comes in a later stage (q/k/v, then o, then gate/up, then down)."""
        prod = {}
        for n in self.nodes():
            for o in n.outputs:
                prod[o] = n
        depth: dict[int, int] = {}

        def stage_of(value: str, seen: set) -> int:
            n = prod.get(value)
            if n is None or id(n) in seen:
                return 0
            if id(n) in depth:
                return depth[id(n)]
            seen = seen | {id(n)}
            d = max((stage_of(i, seen) for i in n.inputs if i), default=0)
            if isinstance(n, (Linear, MoE)):
                d += 1
            depth[id(n)] = d
            return d

        groups: dict[int, list[Linear]] = {}
        for n in self.nodes():
            if isinstance(n, Linear):
                s = max((stage_of(i, set()) for i in n.inputs if i), default=0)
                groups.setdefault(s, []).append(n)
            elif isinstance(n, MoE):
                s = max((stage_of(i, set()) for i in n.inputs if i), default=0)
                groups.setdefault(s, []).append(n.router)
                for e in n.experts:
                    first = [x for x in (e.gate, e.up) if x is not None]
                    groups.setdefault(s, []).extend(first)
                    groups.setdefault(s + 1, []).append(e.down)
        return [groups[k] for k in sorted(groups)]


def _envs(ex: Executor, data) -> list[dict[str, torch.Tensor]]:
    if data is None:
        return []
    return [{k: ex.to_tensor(k, v) for k, v in b.items()} for b in data.batches()]


def sequential(graph: Graph, fit, heldout=None, device=None, *, progress: Callable | None = None,
               description: str = "calibrating") -> Iterator[BlockStep]:  # fmt: skip
    """Yield one :class:`BlockStep` per block (prologue and epilogue included, they may hold Linear layers)."""
    blocks = graph.assign_blocks()
    ex = Executor(graph, device)
    fit_envs = _envs(ex, fit)
    held_envs = _envs(ex, heldout)
    it = blocks if progress is None else progress(blocks, description=description, total=len(blocks))
    for blk in it:
        step = BlockStep(ex, blk, fit_envs, held_envs)
        yield step
        fit_envs[:] = [ex.run_range(env, blk.start, blk.stop) for env in fit_envs]
        held_envs[:] = [ex.run_range(env, blk.start, blk.stop) for env in held_envs]
