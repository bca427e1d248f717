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

Inside a block, ``collect`` runs only as far as the requested layers (the last one's input is read without
computing it) and keeps the batch states just before the first of them: the next ``collect`` (typically for the
next stage, after these layers were rewritten) and the final advance resume there instead of at the block start,
as long as no node before that point was changed (checked by identity of nodes, parameters and constants).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch

from ..compressor.executor import Executor, Observer
from ..compressor.executor import input_key, layer_rows
from ..compressor.ir import Block, Graph, Linear, MoE
from .stats import GramStats, LinearStatsObserver


@dataclass
class BlockStep:
    ex: Executor
    block: Block
    fit_envs: list[dict[str, torch.Tensor]]
    held_envs: list[dict[str, torch.Tensor]]
    _snaps: dict = field(default_factory=dict)  # heldout -> (node index, batch states there, signature)

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

    def _signature(self, stop: int) -> tuple:
        """Identity of the nodes before ``stop`` and of their parameters (a rewrite of any of them changes it)."""
        sig = []
        consts = self.graph.constants
        for n in self.graph.nodes[self.block.start : stop]:
            ps = [id(p) for p in n.params().values()] + [id(consts[i]) for i in n.inputs if i in consts] + list(n.inputs)
            if isinstance(n, MoE):
                ps += [id(l.weight) for l in n.linears()] + [id(l.bias) for l in n.linears()]
            sig.append((id(n), tuple(ps)))
        return tuple(sig)

    def _resume(self, heldout: bool) -> tuple[int, list[dict[str, torch.Tensor]]]:
        """Where a run of the block can start: a snapshot of the batch states taken inside the block, while every
        node before it is unchanged since; else the block start."""
        snap = self._snaps.get(heldout)
        if snap is not None and snap[2] == self._signature(snap[0]):
            return snap[0], snap[1]
        return self.block.start, self.held_envs if heldout else self.fit_envs

    def observe(self, observer: Observer | None, heldout: bool = False, stop: int | None = None,
                snapshot_at: int | None = None, finish: Callable[[dict], None] | None = None) -> None:  # fmt: skip
        """Run the block (up to node ``stop``, default its end) on (copies of) the current batch states with
        ``observer`` attached. With ``snapshot_at``, the states before that node are kept, so that a later run
        (after the layers from there on were rewritten) resumes there instead of at the block start. ``finish`` is
        called with each batch's values at ``stop``."""
        stop = self.block.stop if stop is None else stop
        start, envs = self._resume(heldout)
        if snapshot_at is not None and not start <= snapshot_at <= stop:
            snapshot_at = None
        kept = []
        for env in envs:
            env = dict(env)
            if snapshot_at is not None:
                env = self.ex.run_range(env, start, snapshot_at, observer)
                kept.append(dict(env))
                env = self.ex.run_range(env, snapshot_at, stop, observer)
            else:
                env = self.ex.run_range(env, start, stop, observer)
            if finish is not None:
                finish(env)
        if snapshot_at is not None:
            self._snaps[heldout] = (snapshot_at, kept, self._signature(snapshot_at))

    def advance(self) -> None:
        """Move the batch states to the end of the block (through its current, rewritten layers)."""
        for heldout, envs in ((False, self.fit_envs), (True, self.held_envs)):
            start, src = self._resume(heldout)
            envs[:] = [self.ex.run_range(dict(env), start, self.block.stop) for env in src]
        self._snaps.clear()

    def collect(self, names, heldout: bool = False) -> dict[str, GramStats]:
        """Gram statistics of the named Linear layers of this block. Layers reading the same value (q/k/v) share
        one (read-only) :class:`GramStats`; the block is run only as far as the last of them."""
        names = list(names)
        if not names:
            return {}
        want = set(names)
        lins = {lin.name: lin for lin in self.linears() if lin.name in want}
        where: dict[str, int] = {}  # plain Linear -> node index
        moe_at: list[int] = []
        for i, n in enumerate(self.nodes(), self.block.start):
            if isinstance(n, Linear) and n.name in lins:
                where[n.name] = i
            elif isinstance(n, MoE) and any(l.name in lins for l in n.linears()):
                moe_at.append(i)
        first: dict[tuple, str] = {}
        alias = {name: first.setdefault(input_key(lins[name]), name) for name in sorted(where, key=where.get)}
        observed = [n for n in lins if alias.get(n, n) == n]
        obs = LinearStatsObserver(observed, {n: lins[n].in_features for n in observed}, self.ex.device)
        # run only as far as needed: MoE nodes must execute; the last plain Linear only needs its input, read at stop
        plain = [where[n] for n in observed if n in where]
        stop = max([i + 1 for i in moe_at] + plain)
        tail = [n for n in observed if where.get(n) == stop]
        finish = None
        if tail:
            inp = lins[tail[0]].inputs[0]
            finish = lambda env: obs.linear_input(tail[0], layer_rows(lins[tail[0]], env[inp]))  # noqa: E731
            obs.names.discard(tail[0])  # not executed, not observed twice
        # the collected layers are usually rewritten next: keep the states before the first of them
        first_node = min(list(where.values()) + moe_at)
        self.observe(obs, heldout, stop=stop, snapshot_at=first_node, finish=finish)
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
        step.advance()


def compress_layers(graph: Graph, ctx, todo, shared, compress_fn: Callable, rows: dict, done: dict, prog,
                    warnings: list[str], *, description: str, true_sequential: bool = True, fit_names: Callable | None = None,
                    row_fn: Callable | None = None) -> None:  # fmt: skip
    """The layer loop of a calibrated weight pass (N:M pruning, group quantization, low-rank compensation): every
    layer of ``todo`` in graph order gets its report row ``rows[name]``, block by block on the current (already
    compressed) inputs, in stages inside a block when ``true_sequential``. ``compress_fn(lin, fit, held, seconds)``
    compresses one layer from its Gram statistics (``None`` without calibration data) and returns its row;
    ``seconds`` is the layer's share of the time spent collecting them. ``shared``
    (:class:`~sparsec.calibration.shared.SharedUses`) makes a weight applied by several layers one compressed weight
    fitted on all its uses (``done`` and ``row_fn`` as in its ``compress``). ``fit_names(names)``: the layers that
    need fitting statistics (default all; the held-out split gives every layer its error). ``prog``: the pass's
    :class:`~sparsec.passes._progress.PassProgress`; ``warnings``: the pass report's, told when errors are measured
    on the fitting data."""
    if not todo:
        return
    if ctx.calib is None:  # data-free methods: no statistics, no error measured
        for lin in graph.linears():
            if lin.name in todo:
                rows[lin.name] = shared.compress(graph, lin, None, None, lambda l, f, h: compress_fn(l, f, h, 0.0),
                                                 ctx, rows, done, row_fn=row_fn)  # fmt: skip
                prog.layer_done(lin.name)
        return
    held_available = ctx.heldout is not None and ctx.heldout.num_samples > 0
    if not held_available and todo:
        warnings.append("no held-out calibration split: layer errors are measured on the fitting data")
    shared.collect(graph, ctx)
    pre = shared.precollected()
    for step in sequential(graph, ctx.calib, ctx.heldout, ctx.device, progress=prog.blocks, description=description):
        for stage in step.stages() if true_sequential else [step.linears()]:
            todo_here = [lin.name for lin in stage if lin.name in todo]
            if not todo_here:
                continue
            names = [n for n in todo_here if n not in pre]
            t0 = time.perf_counter()
            fit = step.collect(names if fit_names is None or not held_available else fit_names(names))
            held = step.collect(names, heldout=True) if held_available else fit
            share = (time.perf_counter() - t0) / len(todo_here)
            for lin in stage:
                if lin.name in todo:
                    rows[lin.name] = shared.compress(
                        graph, lin, fit.get(lin.name), held.get(lin.name),
                        lambda l, f, h: compress_fn(l, f, h, share), ctx, rows, done, row_fn=row_fn)  # fmt: skip
                    prog.layer_done(lin.name)
