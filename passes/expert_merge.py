"""Expert merging (MC-SMoE, Li et al. 2024, "Merge, Then Compress"): fewer experts per MoE layer, guided by routing.

Per MoE layer, from calibration run block by block (later layers see the already merged earlier ones):

1. **Routing statistics**: each route's activation frequency (share of tokens routed to it, top-k aware) and the
   router logits of a sample of tokens (:class:`~sparsec.calibration.stats.RoutingStats`).
2. **Grouping**: the ``k`` most frequently used experts become group centres ("dominant experts"); every other
   expert joins the centre it is most similar to, by the cosine similarity of their router-logit columns over the
   calibration tokens (MC-SMoE's router-logit similarity).
3. **Alignment** (``mcsmoe``): each member's hidden neurons are permuted to best match the centre's -- weight
   matching on the concatenated [gate row | up row | down column] of every neuron, solved as a linear assignment
   (``scipy.optimize.linear_sum_assignment``); the permutation is applied to gate/up rows and down columns
   together, so the expert computes exactly the same function.
4. **Merge**: frequency-weighted average of each aligned group into one expert.
5. **Router rewrite**: the router keeps all its outputs; ``expert_map`` sends every original route to its merged
   expert, so top-k over routes stays valid and the weights of routes that land on the same expert are summed.

Baselines: ``average`` (no alignment, uniform weights) and ``drop`` (keep the ``k`` most used experts unchanged;
the routes of dropped experts are sent to their most similar kept expert). The routing statistics are left in
``ctx.products["routing"]`` for later passes. The merged experts are ordinary Linear layers for later passes.

Recipe::

    - type: expert_merge
      experts: 0.5          # per MoE layer: a fraction (< 1) or a count (>= 1)
      method: mcsmoe        # mcsmoe | average | drop
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
from ..compressor.executor import Observer
from ..compressor.formats import Dense
from ..compressor.ir import Expert, Graph, Linear, MoE
from ..compressor.pipeline import Pass, PassContext, compile_patterns, parse_overrides, register_pass
from ..compressor.report import LayerRow, PassReport

METHODS = ("mcsmoe", "average", "drop")


@dataclass
class ExpertMergeParams:
    experts: float = 0.5
    method: str = "mcsmoe"
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


def target_count(spec: float, n: int) -> int:
    k = int(round(spec * n)) if spec < 1 else int(round(spec))
    return max(1, min(n, k))


# ----------------------------------------------------------------------------------------------------------------
# the steps, as plain functions on numpy arrays (tested on their own)
def expert_arrays(e: Expert) -> dict[str, np.ndarray]:
    out = {"up": e.up.weight.materialize(), "down": e.down.weight.materialize()}
    if e.gate is not None:
        out["gate"] = e.gate.weight.materialize()
    for role, lin in (("up", e.up), ("down", e.down), ("gate", e.gate)):
        if lin is not None and lin.bias is not None:
            out[f"{role}_bias"] = lin.bias.astype(np.float32)
    return out


def group_experts(freq: np.ndarray, sim: np.ndarray, k: int) -> tuple[list[int], list[int]]:
    """Centres = the ``k`` most frequent experts (stable: ties by index); ``assign[e]`` = index into centres."""
    order = np.argsort(-freq, kind="stable")
    centres = sorted(int(i) for i in order[:k])
    assign = []
    for e in range(len(freq)):
        if e in centres:
            assign.append(centres.index(e))
        else:
            s = [sim[e, c] for c in centres]
            assign.append(int(np.argmax(s)))
    return centres, assign


def logit_similarity(logits: np.ndarray, emap: list[int], n_experts: int) -> np.ndarray:
    """Cosine similarity of the experts' router-logit columns (routes of one expert summed)."""
    cols = np.zeros((logits.shape[0], n_experts), np.float64)
    for r, e in enumerate(emap):
        cols[:, e] += logits[:, r]
    cols = cols - cols.mean(0, keepdims=True)
    norm = np.linalg.norm(cols, axis=0)
    norm[norm == 0] = 1.0
    c = cols / norm
    return c.T @ c


def neuron_features(a: dict[str, np.ndarray]) -> np.ndarray:
    """One row per hidden neuron: [gate row | up row | down column]."""
    parts = [a["up"], a["down"].T]
    if "gate" in a:
        parts.insert(0, a["gate"])
    return np.concatenate(parts, axis=1).astype(np.float64)


def align_to(centre: dict[str, np.ndarray], member: dict[str, np.ndarray]) -> np.ndarray:
    """Permutation ``p`` of the member's hidden neurons maximizing ``sum_i <f_c[i], f_m[p[i]]>``."""
    from scipy.optimize import linear_sum_assignment

    fc, fm = neuron_features(centre), neuron_features(member)
    _, col = linear_sum_assignment(-(fc @ fm.T))
    return col


def permute(a: dict[str, np.ndarray], p: np.ndarray) -> dict[str, np.ndarray]:
    out = dict(a)
    out["up"] = a["up"][p]
    out["down"] = a["down"][:, p]
    if "gate" in a:
        out["gate"] = a["gate"][p]
    for key in ("up_bias", "gate_bias"):
        if key in a:
            out[key] = a[key][p]
    return out


def merge_group(arrays: list[dict[str, np.ndarray]], weights: np.ndarray) -> dict[str, np.ndarray]:
    w = np.asarray(weights, np.float64)
    w = w / w.sum() if w.sum() > 0 else np.full(len(arrays), 1.0 / len(arrays))
    return {key: sum(wi * a[key].astype(np.float64) for wi, a in zip(w, arrays)).astype(np.float32) for key in arrays[0]}


def _expert_from(arrays: dict[str, np.ndarray], like: Expert, name: str) -> Expert:
    def lin(role):
        full = f"{name}.{like_role_name(like, role)}"
        return Linear(full, [f"{full}:in"], [f"{full}:out"], {"module": full}, weight=Dense(arrays[role]),
                      bias=arrays.get(f"{role}_bias"))  # fmt: skip

    return Expert(up=lin("up"), down=lin("down"), gate=lin("gate") if "gate" in arrays else None, act=like.act)


def like_role_name(e: Expert, role: str) -> str:
    lin = {"up": e.up, "down": e.down, "gate": e.gate}[role]
    return lin.name.rsplit(".", 1)[-1]


# ----------------------------------------------------------------------------------------------------------------
class _Routing(Observer):
    def __init__(self, stats, inputs: set[str]):
        self.stats = stats
        self.inputs = inputs
        self.xs: dict[str, list[torch.Tensor]] = {}

    def moe_routing(self, name, logits, selected):
        if name in self.stats:
            self.stats[name].add(logits, selected)

    def wants_values(self):
        return self.inputs

    def value(self, name, tensor):
        self.xs.setdefault(name, []).append(tensor.detach())


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
            bad = sorted(set(o.params) - {"experts", "method"})
            if bad:
                raise RecipeError(f"{self.where}.overrides[{i}]: unknown key(s) {bad}; valid keys: ['experts', 'match', 'method', 'skip']")
        self.include = compile_patterns(self.params.include, f"{self.where}.include")
        self.exclude = compile_patterns(self.params.exclude, f"{self.where}.exclude")

    def plan_for(self, m: MoE) -> tuple[int, str] | None:
        if self.include and not any(p.search(m.name) for p in self.include):
            return None
        if any(p.search(m.name) for p in self.exclude):
            return None
        spec, method = float(self.params.experts), self.params.method
        for o in self.overrides:
            if o.match.search(m.name):
                if o.skip:
                    return None
                spec = float(o.params.get("experts", spec))
                method = str(o.params.get("method", method)).lower()
        if method not in METHODS:
            raise RecipeError(f"{self.where}: method {method!r} for '{m.name}' is not one of {', '.join(METHODS)}")
        return target_count(spec, len(m.experts)), method

    def requires(self, graph: Graph, ctx: PassContext) -> None:
        super().requires(graph, ctx)
        moes = [n for n in graph.nodes if isinstance(n, MoE)]
        if not moes:
            raise PassError("the model has no MoE layer sparsec recognizes (import MoE models from PyTorch or .pt2; "
                            "MoE loops exported by torch.onnx are imported as plain layers)")  # fmt: skip
        for m in moes:
            for e in m.experts:
                for lin in e.linears():
                    if not isinstance(lin.weight, Dense):
                        raise PassError(f"expert layer '{lin.name}' is already compressed ({lin.weight.describe()}); merge experts first")

    def run(self, graph: Graph, ctx: PassContext) -> PassReport:
        from sparsec.calibration.sequential import sequential
        from sparsec.calibration.stats import RoutingStats

        rep = PassReport(self.name)
        groups_doc = {}
        routing = ctx.products.setdefault("routing", {})
        for step in sequential(graph, ctx.calib, ctx.heldout, ctx.device, progress=ctx.track, description="merging experts"):
            moes = [m for m in step.moes()]
            if not moes:
                continue
            stats = {m.name: RoutingStats(m.num_routes, m.top_k, self.params.logit_samples) for m in moes}
            step.observe(_Routing(stats, set()))
            held = _Routing({}, {m.inputs[0] for m in moes})
            step.observe(held, heldout=True)
            for m in moes:
                t0 = time.perf_counter()
                st = stats[m.name]
                routing[m.name] = {"frequencies": st.frequencies().tolist(), "tokens": int(st.tokens)}
                plan = self.plan_for(m)
                n_before = len(m.experts)
                params_before, bytes_before = m.param_count(), m.nbytes()
                if plan is None or plan[0] >= n_before:
                    rep.rows.append(LayerRow(m.name, [n_before], [n_before], f"{n_before} experts", f"{n_before} experts",
                                             bytes_before, bytes_before, status="excluded",
                                             note="excluded" if plan is None else "already at the requested count"))  # fmt: skip
                    continue
                k, method = plan
                old = MoE(m.name, list(m.inputs), list(m.outputs), dict(m.meta), router=m.router, experts=list(m.experts),
                          top_k=m.top_k, renormalize=m.renormalize, score=m.score, expert_map=None if m.expert_map is None else list(m.expert_map))  # fmt: skip
                info = self.merge_layer(m, st, k, method)
                err = self._error(step, old, m, held.xs.get(m.inputs[0], []))
                groups_doc[m.name] = info
                rep.rows.append(LayerRow(
                    m.name, [n_before], [len(m.experts)], f"{n_before} experts", f"{len(m.experts)} experts ({method})",
                    bytes_before, m.nbytes(), error=err, seconds=time.perf_counter() - t0,
                    note=f"groups {info['groups']}",
                    extra={"frequencies": info["frequencies"], "params_before": params_before, "params_after": m.param_count()},
                ))  # fmt: skip
        if not rep.rows:
            raise PassError("no MoE layer was reached by the calibration data")
        rep.extra["groups"] = groups_doc
        return rep

    # ------------------------------------------------------------------------------------------------------------
    def merge_layer(self, m: MoE, st, k: int, method: str) -> dict:
        n = len(m.experts)
        emap = list(m.expert_map) if m.expert_map is not None else list(range(n))
        route_freq = st.frequencies()
        freq = np.zeros(n)
        for r, e in enumerate(emap):
            freq[e] += route_freq[r]
        logits = st.logits()
        sim = logit_similarity(logits, emap, n) if logits.shape[0] > 1 else np.eye(n)
        centres, assign = group_experts(freq, sim, k)
        arrays = [expert_arrays(e) for e in m.experts]
        new_experts = []
        members_doc = []
        for gi, c in enumerate(centres):
            members = [e for e in range(n) if assign[e] == gi]
            members_doc.append(members)
            base = m.experts[c]
            name = base.up.name.rsplit(".", 1)[0]
            if method == "drop":
                merged = arrays[c]
            else:
                group = []
                for e in members:
                    a = arrays[e]
                    if method == "mcsmoe" and e != c and a["up"].shape == arrays[c]["up"].shape:
                        a = permute(a, align_to(arrays[c], a))
                    group.append(a)
                w = np.array([freq[e] for e in members]) if method == "mcsmoe" else np.ones(len(members))
                if method == "mcsmoe" and w.sum() <= 0:
                    w = np.ones(len(members))
                merged = merge_group(group, w)
            new_experts.append(_expert_from(merged, base, name))
        m.experts = new_experts
        m.expert_map = [assign[e] for e in emap]
        return {"method": method, "centres": centres, "groups": members_doc, "frequencies": [round(float(f), 6) for f in freq],
                "expert_map": m.expert_map}  # fmt: skip

    def _error(self, step, old: MoE, new: MoE, xs) -> float | None:
        if not xs:
            return None
        ex = step.ex
        num = den = 0.0
        with torch.no_grad():
            for x in xs:
                a = ex.moe(old, x).double()
                b = ex.moe(new, x).double()
                num += float(((a - b) ** 2).sum())
                den += float((a**2).sum())
        return math.sqrt(num / den) if den > 0 else 0.0
