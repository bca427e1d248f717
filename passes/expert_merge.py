"""Expert merging (MC-SMoE, Li et al. 2024, "Merge, Then Compress"): fewer experts per MoE layer, guided by routing.

Per MoE layer, with calibration run block by block (a layer sees the inputs produced by the already merged earlier
layers):

1. **Routing statistics** (the executor's ``moe_routing`` hook into :class:`~sparsec.calibration.stats.RoutingStats`):
   each route's activation frequency (share of tokens routed to it, top-k aware: a token counts once for each of its
   ``k`` routes) and the router logits of up to ``logit_samples`` tokens.
2. **Grouping** (as MC-SMoE): the ``k`` most frequently used experts become group centres ("dominant experts");
   every other expert joins the centre it is most similar to by router-logit similarity -- the cosine of the two
   experts' router-logit columns over the calibration tokens.
3. **Alignment** (``mcsmoe``): the hidden neurons of each member are permuted to best match the centre's: weight
   matching on the concatenated [gate row | up row | down column] of every neuron, solved as a linear assignment
   (``scipy.optimize.linear_sum_assignment``). The permutation is applied to gate/up rows (and their biases) and
   down columns together, so the member computes exactly the same function.
4. **Merge**: each aligned group is averaged into one expert, weighted by the members' activation frequencies.
5. **Router rewrite**: the router keeps all its outputs (routes); ``expert_map`` sends every route to the merged
   expert of its group. Top-k is still taken over the original routes, so the router and its top-k stay valid; a
   token whose selected routes land in the same group gets that merged expert once, with the routes' weights
   summed. This is what MC-SMoE does (the experts of a group share one merged module behind the unchanged router)
   and what the executor and the ONNX export compute (``MoE`` in compressor/ir.py).
6. **Refit** (``refit``, on by default; a sparsec extension, not in the paper): the down projection (and its bias)
   of every expert that now serves several original experts is refit by ridge-regularized least squares, so that on
   the calibration tokens it reproduces what the group's original experts produced there:
   ``min_D sum_t ||s_t (D h_t + b) - sum_{r in sel_t, r -> g} w_{t,r} E_r(x_t)||^2 + lambda ||D - D_merged||^2``
   with ``s_t`` the summed routing weight of the token's routes into the group, ``h_t`` the merged expert's hidden
   activations and ``lambda = ridge * mean(diag(H^T S^2 H))``. Memory: one ``hidden x hidden`` float64 matrix per
   merged expert of the layer being processed.

Methods (``method``; ``refit`` applies to all but ``prune``):

- ``mcsmoe``: grouping + alignment + frequency-weighted merge (+ refit);
- ``average``: the same groups, merged by a plain average without alignment (+ refit);
- ``drop``: the ``k`` most used experts are kept unchanged and every dropped expert's routes go to its most similar
  kept expert (+ refit of the kept expert to serve them);
- ``prune``: classic expert pruning: the least used experts and their router outputs are removed; the router's top-k
  picks among the kept experts (``top_k`` is lowered when fewer routes than ``top_k`` remain).

The routing statistics go to ``ctx.products["routing"][moe_name]`` (route and expert frequencies, tokens, a sample
of router logits, groups, expert map) and ``ctx.products["expert_frequency"][linear_name]`` (the share of tokens each
expert Linear serves after merging, e.g. for a quantizer that gives frequent experts more bits). The merged experts
are ordinary ``Linear`` layers (centre's names) for the passes that follow (pruning, quantization, low-rank); their
merged weights are recorded as the dense reference for low-rank compensation.

A model without a recognized MoE layer is refused with a :class:`PassError` (exit code 10): the user asked for
something that cannot be done on that model.

Recipe::

    - type: expert_merge
      experts: 0.5          # per MoE layer: a fraction (< 1) or a count (>= 1)
      method: mcsmoe        # mcsmoe | average | drop | prune
      refit: true           # least-squares refit of merged experts (default: true, not for prune)
      overrides:
        - {match: 'layers\\.0\\.', experts: 6}
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from ..compressor.errors import PassError, RecipeError
from ..compressor.executor import _ACTS, Observer
from ..compressor.formats import Dense
from ..compressor.ir import Expert, Graph, Linear, MoE
from ..compressor.pipeline import Pass, PassContext, _coerce, compile_patterns, parse_overrides, register_pass, skipped_by
from ..compressor.report import LayerRow, PassReport
from . import _reference

METHODS = ("mcsmoe", "average", "drop", "prune")


def _check_experts(v: float, where: str) -> float:
    if not (v > 0) or not math.isfinite(v):
        raise RecipeError(f"{where}: experts must be a count >= 1 or a fraction in (0, 1), got {v}")
    if v >= 1 and not float(v).is_integer():
        raise RecipeError(f"{where}: experts >= 1 is a count of experts and must be whole, got {v}")
    return float(v)


@dataclass
class ExpertMergeParams:
    experts: float = 0.5
    method: str = "mcsmoe"
    refit: bool | None = None  # None: on, except for prune
    ridge: float = 0.01
    include: list[str] = field(default_factory=list)
    exclude: list[str] = field(default_factory=list)
    overrides: list[dict] = field(default_factory=list)
    logit_samples: int = 4096

    def validate(self):
        self.method = str(self.method).lower()
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if not (self.experts > 0):
            raise ValueError(f"experts must be a count >= 1 or a fraction in (0, 1), got {self.experts}")
        if self.experts >= 1 and not float(self.experts).is_integer():
            raise ValueError(f"experts >= 1 is a count of experts and must be whole, got {self.experts}")
        if self.experts >= 1:
            self.experts = int(self.experts)  # a count (reports show 4, not 4.0)
        if self.refit and self.method == "prune":
            raise ValueError("refit does not apply to method prune (the kept experts stay unchanged); use drop to refit")
        if self.ridge < 0:
            raise ValueError(f"ridge must be >= 0, got {self.ridge}")
        if self.logit_samples < 1:
            raise ValueError("logit_samples must be >= 1")


def target_count(spec: float, n: int) -> int:
    """Experts to keep of ``n``: a fraction (< 1) rounded, or a count; at least 1, at most ``n``."""
    k = int(round(spec * n)) if spec < 1 else int(round(spec))
    return max(1, min(n, k))


# ----------------------------------------------------------------------------------------------------------------
# the steps, as plain functions on numpy arrays (tested on their own)
def expert_arrays(e: Expert) -> dict[str, np.ndarray]:
    """An expert's weights: up/gate ``[hidden, d]``, down ``[d, hidden]``, and the biases present."""
    out = {"up": e.up.weight.materialize(), "down": e.down.weight.materialize()}
    if e.gate is not None:
        out["gate"] = e.gate.weight.materialize()
    for role, lin in (("up", e.up), ("down", e.down), ("gate", e.gate)):
        if lin is not None and lin.bias is not None:
            out[f"{role}_bias"] = np.asarray(lin.bias, np.float32)
    return out


def expert_columns(values: np.ndarray, emap: list[int], n_experts: int) -> np.ndarray:
    """Per-route columns (``[..., routes]``) summed into per-expert columns."""
    out = np.zeros(values.shape[:-1] + (n_experts,), np.float64)
    for r, e in enumerate(emap):
        out[..., e] += values[..., r]
    return out


def logit_similarity(logits: np.ndarray, emap: list[int], n_experts: int) -> np.ndarray:
    """MC-SMoE's router-logit similarity: cosine of the experts' router-logit columns over the calibration tokens
    (an expert served by several routes: their logits summed). ``[n_experts, n_experts]``."""
    cols = expert_columns(logits.astype(np.float64), emap, n_experts)
    norm = np.linalg.norm(cols, axis=0)
    norm[norm == 0] = 1.0
    c = cols / norm
    return c.T @ c


def group_experts(freq: np.ndarray, sim: np.ndarray, k: int) -> tuple[list[int], list[int]]:
    """Centres = the ``k`` most frequent experts (ties: lower index first), in index order; every other expert joins
    its most similar centre (ties: the first). Returns ``(centres, assign)``, ``assign[e]`` an index into centres."""
    order = np.argsort(-np.asarray(freq, np.float64), kind="stable")
    centres = sorted(int(i) for i in order[:k])
    assign = []
    for e in range(len(freq)):
        if e in centres:
            assign.append(centres.index(e))
        else:
            assign.append(int(np.argmax([sim[e, c] for c in centres])))
    return centres, assign


def neuron_features(a: dict[str, np.ndarray]) -> np.ndarray:
    """One row per hidden neuron: [gate row | up row | down column] (float64)."""
    parts = [a["up"], a["down"].T]
    if "gate" in a:
        parts.insert(0, a["gate"])
    return np.concatenate(parts, axis=1).astype(np.float64)


def align_to(centre: dict[str, np.ndarray], member: dict[str, np.ndarray]) -> np.ndarray:
    """Permutation ``p`` of the member's hidden neurons maximizing ``sum_i <f_centre[i], f_member[p[i]]>`` (weight
    matching, a linear assignment): ``permute(member, p)`` puts the matched neuron at the centre's position."""
    from scipy.optimize import linear_sum_assignment

    fc, fm = neuron_features(centre), neuron_features(member)
    _, col = linear_sum_assignment(-(fc @ fm.T))
    return col


def permute(a: dict[str, np.ndarray], p: np.ndarray) -> dict[str, np.ndarray]:
    """The same expert with its hidden neurons reordered by ``p`` (gate/up rows and biases, down columns)."""
    out = dict(a)
    out["up"] = a["up"][p]
    out["down"] = a["down"][:, p]
    if "gate" in a:
        out["gate"] = a["gate"][p]
    for key in ("up_bias", "gate_bias"):
        if key in a:
            out[key] = a[key][p]
    return out


def merge_group(arrays: list[dict[str, np.ndarray]], weights) -> dict[str, np.ndarray]:
    """Weighted average of experts' arrays (weights normalized; all zero -> uniform)."""
    w = np.asarray(weights, np.float64)
    w = w / w.sum() if w.sum() > 0 else np.full(len(arrays), 1.0 / len(arrays))
    return {key: sum(wi * a[key].astype(np.float64) for wi, a in zip(w, arrays)).astype(np.float32) for key in arrays[0]}


def _expert_from(arrays: dict[str, np.ndarray], like: Expert) -> Expert:
    """A new Expert with ``like``'s layer names and activation and the given weights."""

    def lin(role):
        old = {"up": like.up, "down": like.down, "gate": like.gate}[role]
        return Linear(old.name, list(old.inputs), list(old.outputs), dict(old.meta), weight=Dense(np.ascontiguousarray(arrays[role])),
                      bias=arrays.get(f"{role}_bias"))  # fmt: skip

    return Expert(up=lin("up"), down=lin("down"), gate=lin("gate") if "gate" in arrays else None, act=like.act)


def _shallow(e: Expert) -> Expert:
    return Expert(up=e.up, down=e.down, gate=e.gate, act=e.act)


def _clone(m: MoE, experts=None, router=None, expert_map="same", top_k=None) -> MoE:
    emap = (None if m.expert_map is None else list(m.expert_map)) if expert_map == "same" else expert_map
    experts = [_shallow(e) for e in (m.experts if experts is None else experts)]  # own Expert objects, shared Linears
    return MoE(m.name, list(m.inputs), list(m.outputs), dict(m.meta), router=router or m.router,
               experts=experts, top_k=m.top_k if top_k is None else top_k,
               renormalize=m.renormalize, score=m.score, expert_map=emap)  # fmt: skip


# ----------------------------------------------------------------------------------------------------------------
class _Routing(Observer):
    def __init__(self, name: str, stats):
        self.name = name
        self.stats = stats

    def moe_routing(self, name, logits, selected):
        if name == self.name:
            self.stats.add(logits, selected)


class _Refit:
    """Normal equations of the least-squares refit of merged experts' down projections (see module docstring)."""

    def __init__(self, ex, old: MoE, new: MoE, groups: list[int]):
        self.ex, self.old, self.new = ex, old, new
        dev = ex.device
        old_map = list(old.expert_map) if old.expert_map is not None else list(range(len(old.experts)))
        self.routes = {g: [r for r, e in enumerate(new.expert_map) if e == g] for g in groups}
        # the original experts of each group, and the routes that selected each of them
        self.members = {g: sorted({old_map[r] for r in rs}) for g, rs in self.routes.items()}
        self.routes_of_old = {e: torch.tensor([r for r, o in enumerate(old_map) if o == e], device=dev) for e in range(len(old.experts))}
        self.A, self.B, self.tokens = {}, {}, {g: 0 for g in groups}
        for g in groups:
            e = new.experts[g]
            h = e.down.in_features + (1 if e.down.bias is not None else 0)
            self.A[g] = torch.zeros(h, h, dtype=torch.float64, device=dev)
            self.B[g] = torch.zeros(e.down.out_features, h, dtype=torch.float64, device=dev)

    def _hidden(self, e: Expert, x: torch.Tensor) -> torch.Tensor:
        lin = self.ex.linear
        act = _ACTS[e.act]
        h = act(lin(e.gate, x)) * lin(e.up, x) if e.gate is not None else act(lin(e.up, x))
        h = h.double()
        if e.down.bias is not None:
            h = torch.cat([h, torch.ones(h.shape[0], 1, dtype=h.dtype, device=h.device)], 1)
        return h

    def add(self, x: torch.Tensor) -> None:
        x2 = x.reshape(-1, x.shape[-1])
        _, topi, topv = self.ex.moe_gates(self.old, x2)
        for g, routes in self.routes.items():
            rt = torch.tensor(routes, device=topi.device)
            s = (topv * torch.isin(topi, rt)).sum(1)
            tok = torch.nonzero(s > 0, as_tuple=False).flatten()
            if tok.numel() == 0:
                continue
            xt, st = x2[tok], s[tok].double()
            z = torch.zeros(tok.numel(), x2.shape[1], dtype=torch.float64, device=x2.device)
            for e in self.members[g]:
                we = (topv[tok] * torch.isin(topi[tok], self.routes_of_old[e])).sum(1)
                te = torch.nonzero(we > 0, as_tuple=False).flatten()
                if te.numel():
                    z[te] += we[te, None].double() * self.ex.expert(self.old.experts[e], xt[te], None).double()
            h = self._hidden(self.new.experts[g], xt)
            hs = h * st[:, None]
            self.A[g].addmm_(hs.T, hs)
            self.B[g].addmm_((z * st[:, None]).T, h)
            self.tokens[g] += int(tok.numel())

    def solve(self, ridge: float) -> dict[int, int]:
        """Replace each group's down weight (and bias) by the refit; returns tokens seen per group."""
        for g in self.A:
            if self.tokens[g] == 0:
                continue
            e = self.new.experts[g]
            A, B = self.A[g], self.B[g]
            D0 = torch.from_numpy(e.down.weight.materialize()).to(A.device, torch.float64)
            if e.down.bias is not None:
                D0 = torch.cat([D0, torch.from_numpy(np.asarray(e.down.bias, np.float32)).to(A.device, torch.float64)[:, None]], 1)
            lam = ridge * float(torch.diagonal(A).mean()) + 1e-12
            eye = torch.eye(A.shape[0], dtype=A.dtype, device=A.device)
            D = torch.linalg.solve(A + lam * eye, (B + lam * D0).T).T
            if not bool(torch.isfinite(D).all()):
                continue
            D = D.float().cpu().numpy()
            w = np.ascontiguousarray(D[:, : e.down.in_features])
            b = np.ascontiguousarray(D[:, -1]) if e.down.bias is not None else None
            e.down = Linear(e.down.name, list(e.down.inputs), list(e.down.outputs), dict(e.down.meta), weight=Dense(w), bias=b)
        return self.tokens


@register_pass
class ExpertMerge(Pass):
    name = "expert_merge"
    aliases = ("merge_experts", "mcsmoe")
    order = 10  # before slicing, pruning, quantization: merge, then compress
    needs_calibration = True
    Params = ExpertMergeParams

    def __init__(self, params=None, where=None):
        super().__init__(params, where)
        self.overrides = parse_overrides(self.params.overrides, self.where)
        for i, o in enumerate(self.overrides):
            w = f"{self.where}.overrides[{i}]"
            bad = sorted(set(o.params) - {"experts", "method", "refit"})
            if bad:
                raise RecipeError(f"{w}: unknown key(s) {bad}; valid keys: ['experts', 'match', 'method', 'refit', 'skip']")
            if "experts" in o.params:
                o.params["experts"] = _check_experts(_coerce(o.params["experts"], "float", f"{w}.experts"), w)
            if "method" in o.params:
                o.params["method"] = str(o.params["method"]).lower()
                if o.params["method"] not in METHODS:
                    raise RecipeError(f"{w}.method: must be one of {', '.join(METHODS)}, got {o.params['method']!r}")
            if "refit" in o.params:
                o.params["refit"] = _coerce(o.params["refit"], "bool", f"{w}.refit")
        self.include = compile_patterns(self.params.include, f"{self.where}.include")
        self.exclude = compile_patterns(self.params.exclude, f"{self.where}.exclude")
        self.planned: dict[str, int] = {}

    def plan_for(self, m: MoE) -> tuple[int, str, bool] | None:
        """(experts to keep, method, refit) for one MoE layer, or None when it is left alone."""
        if self.include and not any(p.search(m.name) for p in self.include):
            return None
        if any(p.search(m.name) for p in self.exclude):
            return None
        spec, method, refit = float(self.params.experts), self.params.method, self.params.refit
        if skipped_by(self.overrides, m.name):
            return None
        for o in self.overrides:
            if o.match.search(m.name):
                spec = o.params.get("experts", spec)
                method = o.params.get("method", method)
                refit = o.params.get("refit", refit)
        if method == "prune":
            if refit:
                raise RecipeError(f"{self.where}: refit does not apply to method prune ('{m.name}'); use drop to refit")
            refit = False
        return target_count(spec, len(m.experts)), method, (True if refit is None else bool(refit))

    def requires(self, graph: Graph, ctx: PassContext) -> None:
        super().requires(graph, ctx)
        moes = [n for n in graph.nodes if isinstance(n, MoE)]
        if not moes:
            raise PassError("the model has no MoE layer sparsec recognizes: MoE blocks (router Linear, softmax/sigmoid, "
                            "top-k, expert MLPs) are found in PyTorch modules, .pt2 programs and ONNX files (torch.onnx "
                            "exports and sparsec's own), and raised only when verified numerically; import warnings "
                            "(sparsec inspect) say why a block was not")  # fmt: skip
        for m in moes:
            for lin in m.linears():
                if not isinstance(lin.weight, Dense):
                    raise PassError(f"'{lin.name}' is already compressed ({lin.weight.describe()}); merge experts before compressing them")
            shapes = {(e.gate is not None, tuple(e.up.weight.shape), tuple(e.down.weight.shape), e.act) for e in m.experts}
            if len(shapes) > 1:
                raise PassError(f"MoE '{m.name}': its experts differ in shape or activation; they cannot be merged")

    def ensures(self, graph: Graph, ctx: PassContext, report: PassReport) -> None:
        for m in graph.nodes:
            if not isinstance(m, MoE):
                continue
            emap = m.expert_map if m.expert_map is not None else list(range(len(m.experts)))
            if len(emap) != m.router.out_features or any(not 0 <= e < len(m.experts) for e in emap):
                raise PassError(f"MoE '{m.name}': a route points to no expert")
            if sorted(set(emap)) != list(range(len(m.experts))):
                raise PassError(f"MoE '{m.name}': an expert is reached by no route")
            if not 1 <= m.top_k <= m.router.out_features:
                raise PassError(f"MoE '{m.name}': top_k={m.top_k} with {m.router.out_features} routes")
            if m.name in self.planned and len(m.experts) != self.planned[m.name]:
                raise PassError(f"MoE '{m.name}': {len(m.experts)} experts after merging, {self.planned[m.name]} requested")

    # ------------------------------------------------------------------------------------------------------------
    def run(self, graph: Graph, ctx: PassContext) -> PassReport:
        from sparsec.calibration.sequential import sequential
        from sparsec.calibration.stats import RoutingStats

        rep = PassReport(self.name)
        groups_doc = {}
        routing = ctx.products.setdefault("routing", {})
        expert_freq = ctx.products.setdefault("expert_frequency", {})
        for step in sequential(graph, ctx.calib, ctx.heldout, ctx.device, progress=ctx.track, description="merging experts"):
            for m in step.moes():
                t0 = time.perf_counter()
                idx = graph.nodes.index(m)
                st = RoutingStats(m.num_routes, m.top_k, self.params.logit_samples)
                # routing statistics through the executor's hook; keep the states before the MoE for what follows
                step.observe(_Routing(m.name, st), stop=idx + 1, snapshot_at=idx)
                if st.tokens == 0:
                    raise PassError(f"MoE '{m.name}': no calibration tokens reached it")
                n_before = len(m.experts)
                params_before, bytes_before = m.param_count(), m.nbytes()
                plan = self.plan_for(m)
                doc = {"route_frequencies": st.frequencies().tolist(), "tokens": int(st.tokens), "logits": st.logits()}
                routing[m.name] = doc
                if plan is None or plan[0] >= n_before:
                    self._record_frequencies(m, st, doc, expert_freq)
                    rep.rows.append(LayerRow(m.name, [n_before], [n_before], f"{n_before} experts", f"{n_before} experts",
                                             bytes_before, bytes_before, status="excluded",
                                             note="excluded" if plan is None else "already at the requested count"))  # fmt: skip
                    continue
                k, method, refit = plan
                self.planned[m.name] = k
                old = _clone(m)
                info = self.merge_layer(m, st, k, method)
                merged = _clone(m)  # before the refit (for error_before)
                if refit:
                    multi = [g for g, mem in enumerate(info["groups"]) if len(mem) > 1]
                    acc = _Refit(step.ex, old, m, multi)
                    step.observe(None, stop=idx, finish=lambda env: acc.add(env[m.inputs[0]]))
                    seen = acc.solve(self.params.ridge)
                    info["refit_tokens"] = {int(g): int(t) for g, t in seen.items()}
                    for g, t in seen.items():
                        hid = m.experts[g].down.in_features
                        if t < hid:
                            ctx.warn(f"{m.name}: merged expert {g} refit from {t} calibration tokens (< its {hid} hidden "
                                     "neurons); the ridge term keeps it near the merge -- give more calibration data")  # fmt: skip
                info["refit"] = bool(refit)
                err = self._errors(step, idx, old, merged if refit else None, m)
                self._record_frequencies(m, st, doc, expert_freq, info)
                refs = ctx.products.setdefault(_reference.KEY, {})
                for e in m.experts:  # the merged model is the dense reference of later compensation
                    for lin in e.linears():
                        refs[lin.name] = lin.weight.materialize()
                groups_doc[m.name] = {kk: v for kk, v in info.items()}
                label = method + (" + refit" if refit else "")
                rep.rows.append(LayerRow(
                    m.name, [n_before], [len(m.experts)], f"{n_before} experts", f"{len(m.experts)} experts ({label})",
                    bytes_before, m.nbytes(), error=err[0], error_before=err[1], seconds=time.perf_counter() - t0,
                    note="groups " + " ".join("{" + ",".join(map(str, g)) + "}" for g in info["groups"]),
                    extra={"groups": info["groups"], "centres": info["centres"], "frequencies": info["frequencies"],
                           "expert_map": m.expert_map, "params_before": params_before, "params_after": m.param_count(),
                           "method": method, "refit": bool(refit)},
                ))  # fmt: skip
        if not rep.rows:
            raise PassError("no MoE layer was reached by the calibration data")
        asked = [r for r in rep.rows if r.note == "already at the requested count"]
        if asked and not groups_doc:
            ctx.warn(f"expert merging merged nothing: every MoE layer already has at most the requested {self.params.experts} "
                     f"experts ({', '.join(f'{r.name}: {r.shape_before[0]}' for r in asked[:4])}{', ...' if len(asked) > 4 else ''})")  # fmt: skip
        rep.extra["groups"] = groups_doc
        return rep

    @staticmethod
    def _record_frequencies(m: MoE, st, doc: dict, expert_freq: dict, info: dict | None = None) -> None:
        emap = m.expert_map if m.expert_map is not None else list(range(len(m.experts)))
        if info is not None and info["method"] == "prune":
            ef = np.asarray(info["frequencies"], np.float64)[info["centres"]]  # kept experts, before re-routing
        else:
            ef = expert_columns(st.frequencies(), emap, len(m.experts))
        doc["expert_frequencies"] = [float(f) for f in ef]
        if info is not None:
            doc.update({k: info[k] for k in ("groups", "centres", "method")})
        doc["expert_map"] = None if m.expert_map is None else list(m.expert_map)
        for e, f in zip(m.experts, ef):
            for lin in e.linears():
                expert_freq[lin.name] = float(f)

    # ------------------------------------------------------------------------------------------------------------
    def merge_layer(self, m: MoE, st, k: int, method: str) -> dict:
        """Group, align, merge (in place on ``m``); returns the layer's grouping document."""
        n = len(m.experts)
        emap = list(m.expert_map) if m.expert_map is not None else list(range(n))
        freq = expert_columns(st.frequencies(), emap, n)
        logits = st.logits()
        sim = logit_similarity(logits, emap, n) if logits.shape[0] > 1 else np.eye(n)
        centres, assign = group_experts(freq, sim, k)
        groups = [[e for e in range(n) if assign[e] == gi] for gi in range(len(centres))]
        doc = {"method": method, "centres": centres, "groups": groups, "frequencies": [round(float(f), 6) for f in freq]}
        if method == "prune":
            keep_routes = [r for r, e in enumerate(emap) if e in centres]
            W = m.router.weight.materialize()[keep_routes]
            b = None if m.router.bias is None else np.asarray(m.router.bias)[keep_routes]
            r = m.router
            m.router = Linear(r.name, list(r.inputs), list(r.outputs), dict(r.meta), weight=Dense(np.ascontiguousarray(W)), bias=b)
            m.experts = [m.experts[c] for c in centres]
            new_map = [centres.index(emap[r]) for r in keep_routes]
            m.expert_map = None if new_map == list(range(len(centres))) else new_map
            if m.top_k > len(keep_routes):
                doc["top_k_before"] = m.top_k
                m.top_k = len(keep_routes)
            doc["groups"] = [[c] for c in centres]
            doc["expert_map"] = m.expert_map
            return doc
        arrays = [expert_arrays(e) for e in m.experts]
        new_experts = []
        for gi, c in enumerate(centres):
            members = groups[gi]
            if method == "drop" or len(members) == 1:
                new_experts.append(_shallow(m.experts[c]))  # unchanged weights (a refit replaces its down Linear)
                continue
            group = []
            for e in members:
                a = arrays[e]
                if method == "mcsmoe" and e != c:
                    a = permute(a, align_to(arrays[c], a))
                group.append(a)
            w = np.array([freq[e] for e in members]) if method == "mcsmoe" else np.ones(len(members))
            new_experts.append(_expert_from(merge_group(group, w), m.experts[c]))
        m.experts = new_experts
        m.expert_map = [assign[e] for e in emap]
        doc["expert_map"] = m.expert_map
        return doc

    def _errors(self, step, idx: int, old: MoE, merged: MoE | None, new: MoE) -> tuple[float | None, float | None]:
        """Relative output error of the layer on the held-out batches: (after, before the refit)."""
        if not step.held_envs:
            return None, None
        ex = step.ex
        acc = {"num": 0.0, "num0": 0.0, "den": 0.0}

        def fn(env):
            x = env[new.inputs[0]]
            a = ex.moe(old, x).double()
            acc["num"] += float(((ex.moe(new, x).double() - a) ** 2).sum())
            if merged is not None:
                acc["num0"] += float(((ex.moe(merged, x).double() - a) ** 2).sum())
            acc["den"] += float((a**2).sum())

        with torch.no_grad():
            step.observe(None, heldout=True, stop=idx, finish=fn)
        den = acc["den"]
        if den <= 0:
            return 0.0, (0.0 if merged is not None else None)
        return math.sqrt(acc["num"] / den), (math.sqrt(acc["num0"] / den) if merged is not None else None)
