"""N:M structured pruning: magnitude, Wanda, SparseGPT.

Every selected Linear weight becomes an :class:`NMSparse` weight: every group of ``m`` consecutive weights of a row
(along the input dimension) keeps ``n`` (any ``0 < n < m``: 2:4, 1:4, 4:8, 2:8 ...). Methods:

- ``magnitude``: keep the ``n`` largest ``|W_ij|`` of each group;
- ``wanda`` (Sun et al., 2023): keep the ``n`` largest ``|W_ij| · ||X_j||`` of each group (scored per output row,
  ``||X_j||`` the L2 norm of input channel ``j`` over all calibration tokens); weights are not updated;
- ``sparsegpt`` (Frantar & Alistarh, 2023): OBS sweep over the columns with the inverse Hessian of
  ``H = XᵀX`` (damped Cholesky, blocks of ``blocksize`` columns, lazy batch updates), the N:M mask chosen per
  group from the error-compensated weights; see :mod:`sparsec.passes.obs`.

Calibration runs block by block (:mod:`sparsec.calibration.sequential`); inside a block the layers are solved
stage by stage (q/k/v, then the attention output, then gate/up, then down) so that every layer sees the outputs of
the already pruned layers before it (``true_sequential``). Each row of the report carries the relative output
error ``||W X - Ŵ X|| / ||W X||`` on the *held-out* calibration inputs of the layer.

Recipe::

    - type: nm_prune
      nm: "2:4"
      method: sparsegpt          # magnitude | wanda | sparsegpt
      exclude: ['lm_head']
      damp: 0.01                 # SparseGPT damping, fraction of mean(diag H); escalated x10 when Cholesky fails
      blocksize: 128
      overrides:
        - {match: 'layers\\.0\\.', skip: true}
        - {match: 'mlp\\.down_proj', method: wanda, nm: "4:8"}

Layers whose input dim is not divisible by ``m`` stay dense and are reported as skipped.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from ..compressor.errors import PassError, RecipeError
from ..compressor.formats import Dense, NMSparse, nm_mask_valid
from ..compressor.ir import Graph, Linear
from ..compressor.pipeline import Pass, PassContext, Selection, make_row, parse_overrides, parse_params, register_pass, skipped_by
from ..compressor.report import PassReport
from . import _reference
from .obs import nm_mask_from_scores, obs_solve

METHODS = ("magnitude", "wanda", "sparsegpt")


def parse_nm(text) -> tuple[int, int]:
    """``"2:4"`` -> ``(2, 4)``; any ``0 < n < m``."""
    s = str(text).strip()
    parts = s.replace("/", ":").split(":")
    try:
        n, m = (int(p) for p in parts)
    except ValueError:
        hint = ""
        if s.isdigit() and int(s) >= 60:  # YAML 1.1 reads an unquoted 2:4 in base 60: 124
            v = int(s)
            hint = f" (YAML reads an unquoted {v // 60}:{v % 60} as the number {v}: quote it, nm: \"{v // 60}:{v % 60}\")"
        raise ValueError(f"nm must look like N:M (e.g. 2:4), got {text!r}{hint}")
    if not 0 < n < m:
        raise ValueError(f"N:M needs 0 < N < M, got {n}:{m}")
    if m > 256:
        raise ValueError(f"M must be at most 256, got {m}")
    return n, m


@dataclass
class LayerConfig:
    """Settings of one layer (pass parameters, then matching overrides in order)."""

    nm: str = "2:4"
    method: str = "sparsegpt"
    damp: float = 0.01
    blocksize: int = 128

    def validate(self):
        self.n, self.m = parse_nm(self.nm)
        self.method = self.method.lower()
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.damp < 0:
            raise ValueError("damp must be >= 0")
        if self.blocksize < 1:
            raise ValueError("blocksize must be >= 1")


@dataclass
class NMPruneParams:
    nm: str = "2:4"
    method: str = "sparsegpt"
    include: list[str] = field(default_factory=list)
    exclude: list[str] = field(default_factory=list)
    overrides: list[dict] = field(default_factory=list)
    damp: float = 0.01
    blocksize: int = 128
    true_sequential: bool = True

    def validate(self):
        LayerConfig(self.nm, self.method, self.damp, self.blocksize).validate()
        self.method = self.method.lower()


_OVERRIDE_KEYS = {"nm", "method", "damp", "blocksize"}


@register_pass
class NMPrune(Pass):
    name = "nm_prune"
    aliases = ("prune", "nm")
    order = 30  # after expert merging and slicing, before quantization and low-rank compensation
    Params = NMPruneParams

    def __init__(self, params=None, where=None):
        super().__init__(params, where)
        p = self.params
        self.overrides = parse_overrides(p.overrides, self.where)
        self._base = {"nm": p.nm, "method": p.method, "damp": p.damp, "blocksize": p.blocksize}
        for i, o in enumerate(self.overrides):
            bad = sorted(set(o.params) - _OVERRIDE_KEYS)
            if bad:
                raise RecipeError(f"{self.where}.overrides[{i}]: unknown key(s) {bad}; valid keys: {sorted(_OVERRIDE_KEYS | {'match', 'skip'})}")
            parse_params(LayerConfig, {**self._base, **o.params}, f"{self.where}.overrides[{i}]")
        methods = {p.method} | {str(o.params.get("method", p.method)).lower() for o in self.overrides}
        self.needs_calibration = methods != {"magnitude"}
        self._done: dict[str, tuple[int, int]] = {}

    # ------------------------------------------------------------------------------------------------------------
    def plan(self, graph: Graph) -> dict[str, tuple[str, str, LayerConfig | None]]:
        """Per layer: (status, note, config): status is ``compress``, ``excluded`` or ``skipped``."""
        p = self.params
        decided = Selection(p.include, p.exclude).decide(graph, self.where)
        out = {}
        for lin in graph.linears():
            ok, reason = decided[lin.name]
            if not ok:
                out[lin.name] = ("excluded", reason, None)
                continue
            params = dict(self._base)
            for o in self.overrides:
                if o.match.search(lin.name):
                    params.update(o.params)
            if skipped_by(self.overrides, lin.name):
                out[lin.name] = ("excluded", "skipped by a recipe override", None)
                continue
            cfg = parse_params(LayerConfig, params, f"{self.where} ({lin.name})")
            if lin.in_features % cfg.m:
                out[lin.name] = ("skipped", f"input dim {lin.in_features} is not divisible by M={cfg.m}", None)
                continue
            out[lin.name] = ("compress", "", cfg)
        return out

    def requires(self, graph: Graph, ctx: PassContext) -> None:
        super().requires(graph, ctx)
        lins = {l.name: l for l in graph.linears()}
        for name, (status, _, _) in self.plan(graph).items():
            if status != "compress":
                continue
            w = lins[name].weight
            if not isinstance(w, Dense):
                raise PassError(f"layer '{name}' already has a {w.describe()} weight; N:M pruning rewrites dense "
                                f"weights (prune before quantizing or compensating, or exclude the layer)")  # fmt: skip

    # ------------------------------------------------------------------------------------------------------------
    def run(self, graph: Graph, ctx: PassContext) -> PassReport:
        from sparsec.calibration.sequential import compress_layers
        from sparsec.calibration.shared import SharedUses

        from ._progress import PassProgress

        plan = self.plan(graph)
        self._few_tokens: list[tuple[str, int, int]] = []  # SparseGPT layers fitted on fewer tokens than inputs
        todo = {name: cfg for name, (status, _, cfg) in plan.items() if status == "compress"}
        rows = {}
        for lin in graph.linears():
            status, note, _ = plan[lin.name]
            if status != "compress":
                rows[lin.name] = make_row(lin, lin.weight, lin.weight.shape, status=status, note=note)
        rep = PassReport(self.name, params=self.params_dict())
        self._done = {}
        shared = SharedUses(graph, todo)  # one weight applied by several layers: pruned once
        note = "no calibration data: error not measured" if ctx.calib is None else ""  # magnitude only then
        with PassProgress(ctx, "nm_prune", len(todo)) as prog:
            compress_layers(graph, ctx, todo, shared, lambda l, f, h, s: self._prune(l, todo[l.name], f, h, ctx, rep, s, note),
                            rows, self._done, prog, rep.warnings, description="nm_prune", true_sequential=self.params.true_sequential,
                            fit_names=lambda names: [n for n in names if todo[n].method != "magnitude"])  # fmt: skip
        rep.rows = [rows[l.name] for l in graph.linears() if l.name in rows]
        if self._few_tokens:
            name, t, k = min(self._few_tokens, key=lambda x: x[1] / x[2])
            rep.warnings.append(
                f"SparseGPT fitted {len(self._few_tokens)} layer(s) on fewer calibration tokens than inputs (e.g. '{name}': "
                f"{t} tokens, {k} inputs): its Hessian is rank-deficient and the error compensation overfits them (it can "
                f"do worse than magnitude pruning); give more calibration data (--calib-samples, --seq-len)")  # fmt: skip
        return rep

    def _prune(self, lin: Linear, cfg: LayerConfig, fit, held, ctx: PassContext, rep: PassReport, extra_seconds: float,
               note: str = ""):  # fmt: skip
        from sparsec.calibration.stats import relative_output_error

        t0 = time.perf_counter()
        before = lin.weight
        W = before.materialize()
        n, m = cfg.n, cfg.m
        method = cfg.method
        extra = {"method": method, "nm": f"{n}:{m}"}
        notes = [note] if note else []
        if method != "magnitude" and fit is not None:
            extra["tokens"] = int(fit.n)
        if method != "magnitude" and (fit is None or fit.n == 0):
            notes.append("no calibration tokens reached this layer: magnitude selection")
            method = "magnitude"
        if method == "magnitude":
            mask = nm_mask_from_scores(np.abs(W), n, m)
            Wn = W * mask
        elif method == "wanda":
            scores = np.abs(W).astype(np.float64) * fit.norms()[None, :]
            mask = nm_mask_from_scores(scores, n, m)
            Wn = W * mask
        else:
            if fit.n < W.shape[1]:
                self._few_tokens.append((lin.name, int(fit.n), int(W.shape[1])))
            res = obs_solve(W, fit.H, nm=(n, m), blocksize=cfg.blocksize, damp=cfg.damp, zero_dead=False, device=ctx.device)
            Wn, mask = res.weight, res.mask
            extra["damp"] = res.damp_used
            if res.escalations:
                extra["escalations"] = res.escalations
                rep.warnings.append(f"{lin.name}: Cholesky of the damped Hessian failed at damping {cfg.damp:g}; escalated "
                                    f"{res.escalations}x to {res.damp_used:g} x mean(diag H)")  # fmt: skip
            if res.dead:
                extra["dead_inputs"] = res.dead
        fmt = NMSparse.from_mask(Wn, mask, n, m)
        if isinstance(before, Dense) and before.data.dtype != np.float32:
            fmt = fmt.with_values(Dense(fmt.values.materialize().astype(before.data.dtype)))
        if not np.isfinite(fmt.values.materialize()).all():
            raise PassError(f"layer '{lin.name}': pruning produced NaN or inf")
        _reference.remember(ctx, lin)  # the dense weight low-rank compensation fits against (after slicing: not the original's)
        lin.weight = fmt
        if "tied_to" in lin.meta:
            notes.append(f"untied from {lin.meta['tied_to']}")
        err = None
        if held is not None and held.n > 0:
            err = relative_output_error(W, fmt.materialize(), held.gram())
        elif ctx.calib is not None:
            notes.append("no held-out tokens reached this layer: error not measured")
        self._done[lin.name] = (n, m)
        secs = time.perf_counter() - t0 + extra_seconds
        return make_row(lin, before, before.shape, error=err, seconds=secs, note="; ".join(notes), extra=extra)

    def ensures(self, graph: Graph, ctx: PassContext, report: PassReport) -> None:
        lins = {l.name: l for l in graph.linears()}
        for name, (n, m) in self._done.items():
            w = lins[name].weight
            if not isinstance(w, NMSparse) or (w.n, w.m) != (n, m):
                raise PassError(f"layer '{name}' should hold a {n}:{m} weight, has {w.describe()}")
            if not nm_mask_valid(w.materialize() != 0, n, m):
                raise PassError(f"layer '{name}' has a group of {m} with more than {n} nonzeros")
