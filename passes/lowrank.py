"""Low-rank compensation of compression error: EoRA (eigenspace projection) and plain SVD.

For every selected Linear whose weight was compressed by an earlier pass (pruned, quantized, or both), the
compression error ``ΔW = W - Ŵ`` (``W`` the dense weight before compression, ``Ŵ`` the compressed one) is
approximated by a rank-``r`` product ``A·B`` (``A: (out, r)``, ``B: (r, in)``); the weight becomes
``LowRank(Ŵ, A, B)``, i.e. ``Ŵ + A·B``, computed at run time as ``Ŵx + A(Bx)``.

- ``eora`` (Liu et al., "EoRA: Training-free Compensation for Compressed LLM with Eigenspace Low-Rank
  Approximation", 2024; default): the error that matters is the output error ``‖ΔW Xᵀ‖`` on the layer's inputs,
  ``‖ΔW Xᵀ‖² = ‖ΔW Q Λ^½‖²`` with ``H = XᵀX/n = Q Λ Qᵀ``. EoRA projects ``ΔW`` into that eigenspace
  (``ΔW' = ΔW Q Λ^½``), truncates its SVD at rank ``r`` (``U_r S_r V_rᵀ``, the best rank-``r`` approximation in the
  output-error norm), and projects back: ``A = U_r S_r^½``, ``B = S_r^½ V_rᵀ Λ^-½ Qᵀ``. Eigenvalues below
  ``1e-6 · mean(Λ)`` are raised to that floor (directions no calibration input excites cost nothing in the
  objective; the floor keeps the back-projection finite). ``H`` comes from block-by-block calibration: every layer sees
  the outputs of the already compressed and compensated layers before it.
- ``svd``: plain truncated SVD of ``ΔW`` (minimizes ``‖ΔW - AB‖_F``, blind to the inputs), the baseline.

Rank: ``rank: r`` (default 32), or a target -- ``energy: 0.9`` (smallest rank capturing that share of the squared
singular values of the projected error -- for EoRA exactly that share of the layer's squared output error on the
calibration inputs), or ``max_error: 0.02`` (smallest rank whose relative output error ``‖(W - Ŵ - AB)Xᵀ‖ / ‖WXᵀ‖``
on the calibration inputs is at most that); ``max_rank`` caps targets. Factors are stored as float16 (``dtype``),
float32 when float16 would overflow.

Every row of the report has the relative output error on the *held-out* calibration inputs before compensation
(``error_before``) and after (``error``), the rank and the bytes added.

Recipe::

    - type: lowrank
      method: eora             # eora | svd
      rank: 32                 # or energy: 0.9, or max_error: 0.02 (with max_rank)
      exclude: ['lm_head']
      overrides:
        - {match: 'mlp\\.down_proj', rank: 64}

The dense reference ``W`` is the weight before the first lossy pass (see :mod:`sparsec.passes._reference`).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..compressor.errors import PassError, RecipeError
from ..compressor.formats import Dense, LowRank
from ..compressor.ir import Graph, Linear
from ..compressor.pipeline import Pass, PassContext, Selection, make_row, parse_overrides, parse_params, register_pass, skipped_by
from ..compressor.report import PassReport
from . import _reference

METHODS = ("eora", "svd")
EIG_FLOOR = 1e-6
DEFAULT_RANK = 32


# ----------------------------------------------------------------------------------------------------------------
# the math
@dataclass
class Factors:
    a: np.ndarray  # (out, r) float64
    b: np.ndarray  # (r, in) float64
    rank: int
    energy: float  # share of the (projected) error energy captured
    fit_error: float | None = None  # relative output error on the fitting inputs after compensation (needs W_ref)


def _select_rank(tail_err: np.ndarray, sq: np.ndarray, full: int, rank, energy, max_error, max_rank, ref_norm2) -> int:
    """``tail_err[r]``: squared weighted error left at rank r (r = 0..full)."""
    cap = full if max_rank is None else max(0, min(full, int(max_rank)))
    if rank is not None:
        return max(0, min(int(rank), full))
    if energy is not None:
        tot = float(sq.sum())
        if tot <= 0:
            return 0
        cum = np.concatenate([[0.0], np.cumsum(sq)]) / tot
        r = int(np.searchsorted(cum, energy - 1e-12))
        return min(r, cap)
    if max_error is not None:
        target = (max_error**2) * ref_norm2
        ok = np.nonzero(tail_err <= target)[0]
        r = int(ok[0]) if ok.size else full
        return min(r, cap)
    return min(DEFAULT_RANK, full)


def lowrank_factors(dW, H=None, *, method: str = "eora", rank: int | None = None, energy: float | None = None,
                    max_error: float | None = None, max_rank: int | None = None, W_ref=None) -> Factors:  # fmt: skip
    """Rank-``r`` factors ``A, B`` with ``A @ B ≈ dW`` (``(out, in)``): EoRA in the eigenspace of ``H`` (``(in, in)``,
    e.g. ``XᵀX/n``), or plain SVD. ``max_error`` needs ``W_ref`` (the reference weight, for the relative error)."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    D = torch.as_tensor(np.asarray(dW), dtype=torch.float64)
    out, inn = D.shape
    full = min(out, inn)
    Ht = None if H is None else torch.as_tensor(np.asarray(H), dtype=torch.float64)
    if method == "eora" and Ht is None:
        raise ValueError("EoRA needs the input Gram matrix H")
    ref_norm2 = None
    if W_ref is not None and Ht is not None:
        Wr = torch.as_tensor(np.asarray(W_ref), dtype=torch.float64)
        ref_norm2 = float(((Wr @ Ht) * Wr).sum())
    if max_error is not None and ref_norm2 is None:
        raise ValueError("max_error needs the reference weight and H")
    if method == "eora":
        Ht = (Ht + Ht.T) / 2
        lam, Q = torch.linalg.eigh(Ht)
        mean = float(lam.clamp(min=0).mean()) if lam.numel() else 0.0
        floor = EIG_FLOOR * mean if mean > 0 else 1.0
        lam = lam.clamp(min=floor)
        sq = lam.sqrt()
        M = (D @ Q) * sq  # ΔW Q Λ^½
        U, S, Vh = torch.linalg.svd(M, full_matrices=False)
        s2 = (S**2).numpy()
        total = float(((D @ Ht) * D).sum())
        # weighted error left at rank r: tail of the projected spectrum (exact up to the eigenvalue floor)
        tail = np.concatenate([np.cumsum(s2[::-1])[::-1], [0.0]])
        tail = np.minimum(tail, max(total, 0.0)) if total > 0 else tail
        r = _select_rank(tail, s2, full, rank, energy, max_error, max_rank, ref_norm2)
        Sr = S[:r].sqrt()
        A = U[:, :r] * Sr
        B = (Sr[:, None] * Vh[:r]) / sq @ Q.T  # S^½ Vᵀ Λ^-½ Qᵀ
        fit = None if ref_norm2 is None or ref_norm2 <= 0 else float(np.sqrt(max(tail[r], 0.0) / ref_norm2))
    else:
        U, S, Vh = torch.linalg.svd(D, full_matrices=False)
        s2 = (S**2).numpy()
        tail = None
        fit = None
        if Ht is not None:
            # ‖(ΔW - U_r S_r V_rᵀ)Xᵀ‖² = ‖ΔW Xᵀ‖² - Σ_{i<=r} s_i² v_iᵀ H v_i
            vhv = ((Vh @ Ht) * Vh).sum(1).numpy()
            total = float(((D @ Ht) * D).sum())
            tail = total - np.concatenate([[0.0], np.cumsum(s2 * vhv)])
            tail = np.maximum(tail, 0.0)
        if max_error is not None:
            r = _select_rank(tail, s2, full, None, None, max_error, max_rank, ref_norm2)
        else:
            r = _select_rank(np.zeros(full + 1), s2, full, rank, energy, None, max_rank, ref_norm2)
        Sr = S[:r].sqrt()
        A = U[:, :r] * Sr
        B = Sr[:, None] * Vh[:r]
        if tail is not None and ref_norm2:
            fit = float(np.sqrt(tail[r] / ref_norm2))
    tot = float(s2.sum())
    en = float(s2[:r].sum() / tot) if tot > 0 else 1.0
    return Factors(A.numpy(), B.numpy(), int(r), en, fit)


# ----------------------------------------------------------------------------------------------------------------
# the pass
@dataclass
class LayerConfig:
    method: str = "eora"
    rank: int | None = None
    energy: float | None = None
    max_error: float | None = None
    max_rank: int | None = None
    dtype: str = "float16"

    def validate(self):
        self.method = str(self.method).lower()
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}, got {self.method!r}")
        given = [k for k in ("rank", "energy", "max_error") if getattr(self, k) is not None]
        if len(given) > 1:
            raise ValueError(f"give one of rank, energy, max_error (got {', '.join(given)})")
        if self.rank is not None and self.rank < 1:
            raise ValueError(f"rank must be >= 1, got {self.rank}")
        if self.energy is not None and not 0 < self.energy <= 1:
            raise ValueError(f"energy must be in (0, 1], got {self.energy}")
        if self.max_error is not None and not self.max_error >= 0:
            raise ValueError(f"max_error must be >= 0, got {self.max_error}")
        if self.max_rank is not None and self.max_rank < 1:
            raise ValueError(f"max_rank must be >= 1, got {self.max_rank}")
        if self.dtype not in ("float16", "float32"):
            raise ValueError(f"dtype must be float16 or float32, got {self.dtype!r}")
        if not given:
            self.rank = DEFAULT_RANK


@dataclass
class LowRankParams:
    method: str = "eora"
    rank: int | None = None
    energy: float | None = None
    max_error: float | None = None
    max_rank: int | None = None
    dtype: str = "float16"
    include: list[str] = field(default_factory=list)
    exclude: list[str] = field(default_factory=list)
    overrides: list[dict] = field(default_factory=list)
    true_sequential: bool = True

    def validate(self):
        c = LayerConfig(self.method, self.rank, self.energy, self.max_error, self.max_rank, self.dtype)
        c.validate()
        self.method = c.method


_OVERRIDE_KEYS = {"method", "rank", "energy", "max_error", "max_rank", "dtype"}
_TARGETS = ("rank", "energy", "max_error")
COMPRESSING = ("nm_prune", "group_quant")


@register_pass
class LowRankCompensate(Pass):
    name = "lowrank"
    aliases = ("eora", "compensate", "low_rank")
    order = 60  # after pruning (30) and quantization (40): compensates what they did
    needs_calibration = True
    Params = LowRankParams

    def __init__(self, params=None, where=None):
        super().__init__(params, where)
        p = self.params
        self.overrides = parse_overrides(p.overrides, self.where)
        self._base = {"method": p.method, "rank": p.rank, "energy": p.energy, "max_error": p.max_error, "max_rank": p.max_rank, "dtype": p.dtype}
        for i, o in enumerate(self.overrides):
            bad = sorted(set(o.params) - _OVERRIDE_KEYS)
            if bad:
                raise RecipeError(f"{self.where}.overrides[{i}]: unknown key(s) {bad}; valid keys: {sorted(_OVERRIDE_KEYS | {'match', 'skip'})}")
            self._config(o.params, f"{self.where}.overrides[{i}]")
        self._done: dict[str, tuple[int, int]] = {}

    def _config(self, params: dict, where: str) -> LayerConfig:
        merged = dict(self._base)
        if any(k in params for k in _TARGETS):  # a per-layer target replaces the pass's
            for k in _TARGETS:
                merged[k] = None
        merged.update(params)
        return parse_params(LayerConfig, merged, where)

    def conflicts(self, others):
        if not any(o.name in COMPRESSING for o in others):
            return "low-rank compensation needs a compression pass before it to compensate (--nm, --quant or --gqsa)"
        return None

    def plan(self, graph: Graph, ctx: PassContext | None = None) -> dict[str, tuple[str, str, LayerConfig | None]]:
        p = self.params
        decided = Selection(p.include, p.exclude).decide(graph, self.where)
        out = {}
        for lin in graph.linears():
            ok, reason = decided[lin.name]
            if not ok:
                out[lin.name] = ("excluded", reason, None)
                continue
            params: dict[str, Any] = {}
            for o in self.overrides:
                if o.match.search(lin.name):
                    if any(k in o.params for k in _TARGETS):
                        for k in _TARGETS:
                            params.pop(k, None)
                    params.update(o.params)
            if skipped_by(self.overrides, lin.name):
                out[lin.name] = ("excluded", "skipped by a recipe override", None)
                continue
            if isinstance(lin.weight, Dense):
                out[lin.name] = ("skipped", "not compressed: nothing to compensate", None)
                continue
            if isinstance(lin.weight, LowRank):
                out[lin.name] = ("skipped", "already has a low-rank residual", None)
                continue
            if ctx is not None and _reference.reference(ctx, lin) is None:
                out[lin.name] = ("skipped", "the dense weight before compression is not known (a shape-changing pass ran)", None)
                continue
            out[lin.name] = ("compress", "", self._config(params, f"{self.where} ({lin.name})"))
        return out

    def run(self, graph: Graph, ctx: PassContext) -> PassReport:
        from sparsec.calibration.sequential import compress_layers
        from sparsec.calibration.shared import SharedUses

        from ._progress import PassProgress

        plan = self.plan(graph, ctx)
        todo = {n: cfg for n, (st, _, cfg) in plan.items() if st == "compress"}
        rep = PassReport(self.name, params=self.params_dict())
        rows = {}
        for lin in graph.linears():
            st, note, _ = plan[lin.name]
            if st != "compress":
                rows[lin.name] = make_row(lin, lin.weight, lin.weight.shape, status=st, note=note)
        if not todo:
            rep.warnings.append("no compressed layer to compensate")
        self._done = {}
        shared = SharedUses(graph, todo)  # one compressed weight applied by several layers: one low-rank path
        with PassProgress(ctx, "lowrank", len(todo)) as prog:
            compress_layers(graph, ctx, todo, shared, lambda l, f, h, s: self._compensate(l, todo[l.name], f, h, ctx, rep, s),
                            rows, self._done, prog, rep.warnings, description="lowrank",
                            true_sequential=self.params.true_sequential, row_fn=lambda l, b, h: self._shared_row(l, b, h, ctx))  # fmt: skip
        rep.rows = [rows[l.name] for l in graph.linears() if l.name in rows]
        done = [r for r in rep.rows if r.status == "compressed" and r.error is not None and r.error_before is not None]
        if done:
            rep.extra["mean_error_before"] = sum(r.error_before for r in done) / len(done)
            rep.extra["mean_error_after"] = sum(r.error for r in done) / len(done)
        return rep

    def _compensate(self, lin: Linear, cfg: LayerConfig, fit, held, ctx: PassContext, rep: PassReport, extra_seconds: float):
        from sparsec.calibration.stats import relative_output_error

        t0 = time.perf_counter()
        before = lin.weight
        W_hat = before.materialize()
        W_ref = _reference.reference(ctx, lin)
        notes = []
        method = cfg.method
        H = fit.hessian() if fit is not None and fit.n > 0 else None
        if H is None and method == "eora":
            notes.append("no calibration tokens reached this layer: plain SVD")
            method = "svd"
        mx = cfg.max_error
        if mx is not None and H is None:
            notes.append("no calibration tokens: max_error target not measurable, default rank")
            mx = None
        kw = {"rank": cfg.rank, "energy": cfg.energy, "max_error": mx, "max_rank": cfg.max_rank}
        if mx is None and cfg.max_error is not None:
            kw["rank"] = DEFAULT_RANK
        f = lowrank_factors(W_ref.astype(np.float64) - W_hat, H, method=method, W_ref=W_ref, **kw)
        if kw["rank"] is not None and kw["rank"] > min(W_hat.shape):
            notes.append(f"rank {kw['rank']} > min(out, in) = {min(W_hat.shape)}: clamped")
            if not any(w.startswith("rank ") and "clamped" in w for w in rep.warnings):
                rep.warnings.append(f"rank {kw['rank']} is larger than the width of some layers (e.g. '{lin.name}', "
                                    f"{W_hat.shape[0]}x{W_hat.shape[1]}): clamped to min(out, in) there, where the "
                                    f"factors store more bytes than the layer itself")  # fmt: skip
        dtype = np.float16 if cfg.dtype == "float16" else np.float32
        a, b = f.a.astype(dtype), f.b.astype(dtype)
        if dtype == np.float16 and not (np.isfinite(a).all() and np.isfinite(b).all()):
            a, b = f.a.astype(np.float32), f.b.astype(np.float32)
            notes.append("factors overflow float16: stored as float32")
        if f.rank == 0:
            notes.append("rank 0: nothing added")
            row = make_row(lin, before, before.shape, status="skipped", note="; ".join(notes), extra={"method": method, "rank": 0})
            return row
        fmt = LowRank(before, a, b)
        W_new = fmt.materialize()
        if not np.isfinite(W_new).all():
            raise PassError(f"layer '{lin.name}': low-rank compensation produced NaN or inf")
        lin.weight = fmt
        err = err_before = None
        if held is not None and held.n > 0:
            gram = held.gram()
            err_before = relative_output_error(W_ref, W_hat, gram)
            err = relative_output_error(W_ref, W_new, gram)
        else:
            notes.append("no held-out tokens reached this layer: error not measured")
        extra: dict[str, Any] = {"method": method, "rank": f.rank, "energy": f.energy, "bytes_added": int(a.nbytes + b.nbytes)}
        if f.fit_error is not None:
            extra["fit_error"] = f.fit_error
        self._done[lin.name] = (f.rank, id(before))
        secs = time.perf_counter() - t0 + extra_seconds
        return make_row(lin, before, before.shape, error=err, error_before=err_before, seconds=secs, note="; ".join(notes), extra=extra)

    def _shared_row(self, lin: Linear, before, held, ctx: PassContext):
        """The row of a later use of a shared weight that received its first use's low-rank path: the errors of
        the compressed weight before / after compensation against the dense reference, on its own held-out inputs
        (the measure of :meth:`_compensate`'s rows)."""
        from sparsec.calibration.stats import relative_output_error

        err = err_before = None
        W_ref = _reference.reference(ctx, lin)
        if held is not None and held.n > 0 and W_ref is not None:
            gram = held.gram()
            err_before = relative_output_error(W_ref, before.materialize(), gram)
            err = relative_output_error(W_ref, lin.weight.materialize(), gram)
        return make_row(lin, before, before.shape, error=err, error_before=err_before, seconds=0.0)

    def ensures(self, graph: Graph, ctx: PassContext, report: PassReport) -> None:
        lins = {l.name: l for l in graph.linears()}
        for name, (rank, base_id) in self._done.items():
            w = lins[name].weight
            if not isinstance(w, LowRank) or w.rank != rank or id(w.base) != base_id:
                raise PassError(f"layer '{name}' should hold its compressed weight plus a rank-{rank} residual, has {w.describe()}")
