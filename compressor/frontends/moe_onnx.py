"""Raising mixture-of-experts blocks that torch.onnx wrote (TorchScript and dynamo exporters) to :class:`MoE` nodes.

An MoE block in an exported ONNX file is a data-dependent loop unrolled over the experts (``one_hot``/``Equal``,
``NonZero``, ``Gather``/``GatherND``, ``index_add``/``ScatterND``/``ScatterElements``) or a dense form that runs every
expert on every token and multiplies by a routing-weight mask. The exact node lists differ between exporters,
opsets and model code, so this raiser finds the block by *dataflow* and determines its semantics by *numbers*:

1. **candidates**: a ``TopK`` (or ``ArgMax``, top-1) node whose input derives from a raised ``Linear`` (the
   router) through score ops (``Softmax``/``Sigmoid``/``Cast``/``Div``/``TopK`` ...); the router reads ``x``
   (possibly through ``Reshape``/``Flatten``);
2. **experts**: raised ``Linear`` layers whose input derives from ``x`` by row selection and layout ops only
   (``Gather``, ``GatherND``, ``Slice``, ``Where``, ``Mul`` by a mask, ``Reshape`` ...) are expert inputs (gate/up);
   the ``Linear`` each of them reaches through non-Linear float ops is its down projection;
3. **output**: the first value to which every expert's down projection contributes (the ``ScatterND``/
   ``index_add``/``Add`` chain), possibly followed by a reshape back to ``x``'s shape; the region between ``x`` and
   that value must not be used outside (except the router logits, which are then kept as a plain layer);
4. **semantics**: the region is run with the executor on random ``x`` and with random weights in its router and
   expert layers (the dataflow, not the weights, decides the routing, and random weights cannot make two experts
   look alike); each expert's MLP is run alone to find its activation and gate/up roles; per token,
   ``y_t = sum_j c_tj E_j(x_t)`` is solved by least squares, and the coefficients are matched against softmax/sigmoid
   scores, top-k for every k, with and without renormalization, by a linear assignment that finds which router
   output feeds which expert. Sizes the region reads from outside (``Shape`` of the model input, zero buffers) are
   recomputed from the symbolic shapes for each token count; static exports are sampled at their one size;
5. **verification**: the MoE node (real weights) is compared with the region on fresh random ``x`` of several token
   counts (including a single token, so that most experts get no token): relative error <= 1e-5, else the block keeps
   its plain layers and an import warning names it and the reason.

Shared experts (always-on MLPs added next to the routed ones, Qwen-MoE/DeepSeek style) stay outside as plain layers.
"""
from __future__ import annotations

import contextlib
import re
from typing import Any

import numpy as np
import torch

from ..ir import ACTIVATIONS, Expert, Generic, Graph, Linear, MoE, Node, walk_up

_FLOAT = ("float32", "float16", "float64", "bfloat16")
# ops that only move or re-type values: x -> router input, and the block output -> a reshape back to x's shape
_LAYOUT = {"Reshape", "Flatten", "Squeeze", "Unsqueeze", "Identity", "Cast", "Dropout"}
# row selection / layout: op -> the inputs through which data (not indices or shapes) flows
_SELECT = {
    "Gather": (0,), "GatherND": (0,), "GatherElements": (0,), "Compress": (0,), "Slice": (0,), "Expand": (0,),
    "Tile": (0,), "Reshape": (0,), "Flatten": (0,), "Squeeze": (0,), "Unsqueeze": (0,), "Transpose": (0,),
    "Identity": (0,), "Cast": (0,), "Dropout": (0,), "Where": (1, 2), "Mul": (0, 1), "Concat": None, "Split": (0,),
}  # fmt: skip
# ops between the router's logits and the TopK (scores; TopK itself for softmax-after-top-k)
_SCORE = {"Softmax", "Sigmoid", "Cast", "Identity", "Reshape", "Div", "Mul", "Add", "Sub", "TopK", "Exp", "LogSoftmax",
          "Flatten", "Squeeze", "Unsqueeze", "Dropout"}  # fmt: skip
_VERIFY_TOL = 1e-5
_EXPERT_TOL = 1e-5
_MAX_EXCLUDED = 2  # expert-like MLPs beyond the router's outputs (shared experts) that may be left outside


class _Fail(Exception):
    """The block cannot be raised; the message says why (it goes into the import warning)."""

    def __init__(self, msg: str, quiet: bool = False):
        super().__init__(msg)
        self.quiet = quiet  # not MoE-like at all (a TopK over some other Linear): no warning


class _Graph:
    def __init__(self, g: Graph):
        self.g = g
        self.pos = {id(n): i for i, n in enumerate(g.nodes)}
        self.prod: dict[str, Node] = {o: n for n in g.nodes for o in n.outputs if o}
        self.cons: dict[str, list[Node]] = g.consumers()
        self.outputs = set(g.outputs)

    def dtype(self, name: str) -> str | None:
        if name in self.g.constants:
            return str(self.g.constants[name].dtype)
        v = self.g.values.get(name)
        return None if v is None else v.dtype

    def is_float(self, name: str) -> bool:
        return (self.dtype(name) or "float32") in _FLOAT

    def shape(self, name: str):
        v = self.g.values.get(name)
        return None if v is None else v.shape

    def index(self, name: str) -> int:
        """Position of the value's producer (-1 for graph inputs and constants)."""
        p = self.prod.get(name)
        return -1 if p is None else self.pos[id(p)]


# ----------------------------------------------------------------------------------------------------------------
# structure
def _router_of(G: _Graph, gate_node: Generic) -> Linear | None:
    """The Linear whose logits the TopK/ArgMax ranks (through score ops)."""
    value = gate_node.inputs[0]
    for _ in range(12):
        p = G.prod.get(value)
        if isinstance(p, Linear):
            return p
        if not isinstance(p, Generic) or p.domain != "" or p.op_type not in _SCORE:
            return None
        if p.op_type == "TopK" and value != p.outputs[0]:
            return None
        ins = [i for i in p.inputs if i and i not in G.g.constants and G.is_float(i)]
        if not ins:
            return None
        value = ins[0]  # Div(a, ReduceSum(a)): follow the numerator
    return None


def _x_chain(G: _Graph, router: Linear) -> list[str]:
    """The router's input and the values it is a reshape of, earliest first."""
    chain = [router.inputs[0]]
    d = router.in_features
    for _ in range(6):
        p = G.prod.get(chain[-1])
        if not isinstance(p, Generic) or p.domain != "" or p.op_type not in _LAYOUT or not p.inputs:
            break
        src = p.inputs[0]
        s = G.shape(src)
        if src in G.g.constants or not G.is_float(src) or (s and isinstance(s[-1], int) and s[-1] != d):
            break
        chain.append(src)
    return chain[::-1]


def _derives_from(G: _Graph, value: str, xs: set[str], memo: dict[str, bool], depth: int = 0) -> bool:
    """``value`` is ``x`` moved / selected / masked by row-selection and layout ops only."""
    if value in xs:
        return True
    if value in memo:
        return memo[value]
    memo[value] = False
    p = G.prod.get(value)
    ok = False
    if isinstance(p, Generic) and p.domain == "" and p.op_type in _SELECT and depth < 40:
        idx = _SELECT[p.op_type]
        data = [p.inputs[i] for i in (range(len(p.inputs)) if idx is None else idx) if i < len(p.inputs)]
        data = [d for d in data if d and d not in G.g.constants and G.is_float(d)]
        if p.op_type == "Mul":  # x * mask: exactly one operand carries x
            ok = sum(_derives_from(G, d, xs, memo, depth + 1) for d in data) == 1
        else:
            ok = bool(data) and any(_derives_from(G, d, xs, memo, depth + 1) for d in data)
    memo[value] = ok
    return ok


def _linear_inputs(G: _Graph, value: str, limit: int = 64) -> set[Linear] | None:
    """The Linear layers that ``value`` is computed from through non-Linear float ops (None when the path reaches a
    graph input or another raised op first)."""
    seen: set[str] = set()
    found: set[Linear] = set()
    stack = [value]
    while stack:
        v = stack.pop()
        if v in seen or v in G.g.constants:
            continue
        seen.add(v)
        if len(seen) > limit:
            return None
        p = G.prod.get(v)
        if isinstance(p, Linear):
            found.add(p)
            continue
        if not isinstance(p, Generic):
            return None
        stack.extend(i for i in p.inputs if i and G.is_float(i))
    return found


def _down_candidates(G: _Graph, first: Linear, limit: int = 32) -> set[Linear]:
    """Linear layers reached forward from ``first``'s output through non-Linear nodes."""
    out: set[Linear] = set()
    seen: set[str] = set()
    stack = [first.outputs[0]]
    while stack and len(seen) < limit:
        v = stack.pop()
        if v in seen:
            continue
        seen.add(v)
        for c in G.cons.get(v, []):
            if isinstance(c, Linear):
                out.add(c)
            elif isinstance(c, Generic):
                stack.extend(o for o in c.outputs if o and G.is_float(o))
    return out


class _ExpertSite:
    def __init__(self, down: Linear, ins: list[Linear], u: str):
        self.down, self.ins, self.u = down, ins, u

    def signature(self):
        return (len(self.ins), tuple(self.ins[0].weight.shape), tuple(self.down.weight.shape))


def _find_experts(G: _Graph, router: Linear, xs: list[str]) -> list[_ExpertSite]:
    memo: dict[str, bool] = {}
    xset = set(xs)
    start = min(G.index(x) for x in xs)
    firsts = [n for n in G.g.nodes[start + 1 :] if isinstance(n, Linear) and n is not router
              and n.in_features == router.in_features and _derives_from(G, n.inputs[0], xset, memo)]  # fmt: skip
    first_ids = {id(n) for n in firsts}
    sites: dict[int, _ExpertSite] = {}
    for a in firsts:
        for down in _down_candidates(G, a):
            if id(down) in sites or id(down) in first_ids or down is router:
                continue
            ins = _linear_inputs(G, down.inputs[0])
            if not ins or len(ins) > 2 or any(id(i) not in first_ids for i in ins):
                continue
            us = {i.inputs[0] for i in ins}
            if len(us) != 1:
                continue
            ins_sorted = sorted(ins, key=lambda n: G.pos[id(n)])
            sites[id(down)] = _ExpertSite(down, ins_sorted, us.pop())
    return sorted(sites.values(), key=lambda s: G.pos[id(s.down)])


def _joins(G: _Graph, sites: list[_ExpertSite], excluded: list[_ExpertSite]) -> str | None:
    """The first value that every expert in ``sites`` contributes to and no excluded one does."""
    bit = {s.down.outputs[0]: 1 << i for i, s in enumerate(sites)}
    ex_bit = 1 << len(sites)
    for s in excluded:
        bit[s.down.outputs[0]] = ex_bit
    full = (1 << len(sites)) - 1
    mask: dict[str, int] = dict(bit)
    start = min(G.pos[id(s.down)] for s in sites + excluded)
    for n in G.g.nodes[start:]:
        if isinstance(n, Generic) and n.op_type in ("Shape", "Size"):
            continue  # sizes of a value carry none of its data
        m = 0
        for i in n.inputs:
            m |= mask.get(i, 0)
        if not m:
            continue
        if m & ex_bit:
            if m & full:
                return None  # a shared expert joins the routed ones before they are all summed
            for o in n.outputs:
                if o and G.is_float(o):
                    mask[o] = m
            continue
        for o in n.outputs:
            if o and G.is_float(o):
                mask[o] = m | mask.get(o, 0)
        if m == full and n.outputs and n.outputs[0]:
            return n.outputs[0]
    return None


def _forward_values(G: _Graph, x: str, stop: int) -> set[str]:
    vals = {x}
    for n in G.g.nodes[G.index(x) + 1 : stop + 1]:
        if any(i in vals for i in n.inputs if i):
            vals.update(o for o in n.outputs if o)
    return vals


_Y_WINDOW = 48  # nodes after the experts' join within which the block's output is looked for


def _y_chain(G: _Graph, y0: str, x: str) -> list[str]:
    """``y0`` and the values it flows into one consumer at a time (a reshape back to x's shape, the routing-weight
    multiply of a stacked form ...), in order; every other float operand on the way must be computed from ``x``
    (a residual add of the block's input stream ends the chain)."""
    chain = [y0]
    # (TorchScript's index_add_ is 18 nodes after the last expert: the index and shape nodes of the scatter between)
    fwd = _forward_values(G, x, min(len(G.g.nodes) - 1, G.index(y0) + _Y_WINDOW))
    for _ in range(8):
        v = chain[-1]
        if v in G.outputs:
            break
        # (a Shape of it reads no data: the index_add_ export takes the size of the updates it scatters)
        us = [u for u in G.cons.get(v, []) if not (isinstance(u, Generic) and u.op_type in ("Shape", "Size") and u.domain == "")]
        if len(us) != 1 or not isinstance(us[0], Generic) or not us[0].outputs or not us[0].outputs[0]:
            break
        u = us[0]
        o = u.outputs[0]
        if not G.is_float(o) or G.index(o) > G.index(y0) + _Y_WINDOW:
            break
        if any(i != v and i not in G.g.constants and G.is_float(i) and i not in fwd and not _from_sizes(G, i)
               for i in u.inputs if i):  # (a zero buffer the experts' outputs are scattered into: index_add_)
            break
        chain.append(o)
    return chain


def _from_sizes(G: _Graph, v: str, budget: int = 64) -> bool:
    """Whether ``v`` is computed from constants and the shapes of values only (``zeros_like(h)``: ConstantOfShape of a
    Shape), reading no data: the region recomputes such values for each sample (:func:`_outside_values`)."""
    stack, seen = [v], set()
    while stack:
        u = stack.pop()
        if u in seen or u in G.g.constants:
            continue
        seen.add(u)
        p = G.prod.get(u)
        if not isinstance(p, Generic) or p.domain != "" or len(seen) > budget:
            return False
        if p.op_type in ("Shape", "Size"):
            continue
        stack.extend(i for i in p.inputs if i)
    return True


# ----------------------------------------------------------------------------------------------------------------
# the region between x and y
class _Region:
    def __init__(self, G: _Graph, x: str, y: str):
        self.G, self.x, self.y = G, x, y
        xi, yi = G.index(x), G.index(y)
        if yi <= xi:
            raise _Fail("its output is computed before its input")
        nodes = G.g.nodes
        fwd_vals = {x}
        fwd: set[int] = set()
        for n in nodes[xi + 1 : yi + 1]:
            if any(i in fwd_vals for i in n.inputs if i):
                fwd.add(id(n))
                fwd_vals.update(o for o in n.outputs if o)
        need = {y}
        region: list[Node] = []
        for n in reversed(nodes[xi + 1 : yi + 1]):
            if any(o in need for o in n.outputs if o):
                need.update(i for i in n.inputs if i)
                if id(n) in fwd:
                    region.append(n)
        region.reverse()
        self.nodes = region
        ids = {id(n) for n in region}
        produced = {o for n in region for o in n.outputs if o}
        self.external = sorted({i for n in region for i in n.inputs if i and i not in produced and i != x and i not in G.g.constants})
        # values used outside the region (router logits returned next to the output ...): keep what computes them
        leaks = [o for o in produced if o != y and (o in G.outputs or any(id(c) not in ids for c in G.cons.get(o, [])))]
        walked = walk_up(G.prod, leaks, into=lambda _v, p: id(p) in ids)  # up through region nodes only
        self.keep = {id(p) for _, p in walked if p is not None and id(p) in ids}
        self.linears = [n for n in region if isinstance(n, Linear)]

    def removable(self) -> list[Node]:
        return [n for n in self.nodes if id(n) not in self.keep]


# ----------------------------------------------------------------------------------------------------------------
# running pieces of the graph
def _dim_value(expr: str, dims: dict[str, int]) -> int | None:
    """A symbolic dim such as ``batch``, ``seq*batch`` or ``2*s0 + 1`` under ``dims`` (None if it names others)."""
    import ast
    import operator

    ops = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.FloorDiv: operator.floordiv,
           ast.Div: operator.floordiv}  # fmt: skip

    def ev(n):
        if isinstance(n, ast.Expression):
            return ev(n.body)
        if isinstance(n, ast.Name):
            return dims[n.id] if n.id in dims else None
        if isinstance(n, ast.Constant) and isinstance(n.value, int):
            return n.value
        if isinstance(n, ast.BinOp) and type(n.op) in ops:
            a, b = ev(n.left), ev(n.right)
            return None if a is None or b is None else ops[type(n.op)](a, b)
        return None

    try:
        return ev(ast.parse(expr, mode="eval"))
    except (SyntaxError, ZeroDivisionError, ValueError):
        return None


def _concrete_shape(shape, dims: dict[str, int]) -> list[int]:
    if shape is None:
        raise _Fail("a shape it depends on is unknown")
    out = []
    for d in shape:
        v = d if isinstance(d, int) else (_dim_value(d, dims) if isinstance(d, str) else None)
        if v is None:
            raise _Fail(f"it depends on a size ({d!r}) that its input's shape does not determine")
        out.append(int(v))
    return out


def _outside_values(G: _Graph, names: list[str], dims: dict[str, int], budget: int = 256) -> dict[str, torch.Tensor]:
    """Values the region reads besides x (sizes, zero buffers), computed from shapes: every path must end in
    constants or in Shape/Size of values whose symbolic shape ``dims`` determines."""
    from ..onnx_ops import run_op

    g = G.g
    opset = int(g.opset.get("", 17))
    memo: dict[str, torch.Tensor] = {}
    count = [0]

    def val(name: str) -> torch.Tensor:
        if name in memo:
            return memo[name]
        if name in g.constants:
            return torch.from_numpy(np.asarray(g.constants[name], order="C"))
        p = G.prod.get(name)
        if not isinstance(p, Generic):
            raise _Fail(f"it reads '{name}', which is not a size or constant")
        count[0] += 1
        if count[0] > budget:
            raise _Fail("the sizes it reads take too many nodes to compute")
        if p.op_type in ("Shape", "Size") and p.domain == "":
            try:
                s = _concrete_shape(G.shape(p.inputs[0]), dims)
            except _Fail:
                s = list(val(p.inputs[0]).shape)  # a value computed from sizes (a zero buffer ...): compute it
            if p.op_type == "Size":
                t = torch.tensor(int(np.prod(s)), dtype=torch.int64)
            else:
                r = len(s)
                a = int(p.attributes.get("start", 0))
                b = p.attributes.get("end")
                a = max(0, a + r if a < 0 else a)
                b = r if b is None else int(b)
                b = min(r, b + r if b < 0 else b)
                t = torch.tensor(s[a:b], dtype=torch.int64)
            memo[name] = t
            return t
        if p.op_type in ("RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial", "Bernoulli"):
            raise _Fail("it reads random values")
        ins = [None if not i else val(i) for i in p.inputs]
        outs = run_op(p.op_type, p.domain, ins, p.attributes, opset, p.name, num_outputs=len(p.outputs))
        for o, t in zip(p.outputs, outs):
            if o:
                memo[o] = t
        if name not in memo:
            raise _Fail(f"'{name}' could not be computed")
        return memo[name]

    out = {}
    for n in names:
        try:
            out[n] = val(n)
        except _Fail:
            raise
        except Exception as e:  # noqa: BLE001 - an op failing on made-up sizes: not raisable
            raise _Fail(f"the sizes it reads could not be computed ({type(e).__name__})")
    return out


def _subgraph(g: Graph, nodes: list[Node], outputs: list[str]) -> Graph:
    sub = Graph("moe-region")
    sub.nodes = list(nodes)
    sub.constants = g.constants
    sub.values = g.values
    sub.opset = dict(g.opset)
    sub.outputs = list(outputs)
    return sub


def _run(g: Graph, nodes: list[Node], env: dict[str, torch.Tensor], out: str) -> torch.Tensor:
    from ..executor import Executor

    ex = Executor(_subgraph(g, nodes, [out]), "cpu")
    try:
        res = ex.run_range(dict(env), 0, len(nodes), keep=[out])
    except Exception as e:  # noqa: BLE001
        raise _Fail(f"running it failed ({type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''})")
    if out not in res:
        raise _Fail("its output was not computed")
    return res[out]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    if a.shape != b.shape:
        return float("inf")
    return float((a - b).norm() / max(float(b.norm()), 1e-30))


class _Sizes:
    """Concrete shapes for x: free (symbolic or unknown) leading dims get chosen token counts."""

    def __init__(self, G: _Graph, x: str, d: int):
        s = G.shape(x)
        if s is None:
            s = (None, d)
        if len(s) < 1:
            raise _Fail("its input is a scalar")
        self.shape = s
        self.d = d
        self.names: list[str] = []
        for dim in s[:-1]:
            if isinstance(dim, str) and re.fullmatch(r"[A-Za-z_]\w*", dim) and dim not in self.names:
                self.names.append(dim)
        self.anon = [i for i, dim in enumerate(s[:-1]) if not isinstance(dim, int) and not (isinstance(dim, str) and dim in self.names)]

    def free(self) -> int:
        return len(self.names) + len(self.anon)

    def make(self, counts: list[int]) -> tuple[list[int], dict[str, int]]:
        """counts: a value per free dim (names first, then anonymous dims)."""
        dims = dict(zip(self.names, counts[: len(self.names)]))
        anon = dict(zip(self.anon, counts[len(self.names) :]))
        shape = []
        for i, dim in enumerate(self.shape[:-1]):
            if isinstance(dim, int):
                shape.append(dim)
            elif i in anon:
                shape.append(anon[i])
            elif isinstance(dim, str) and dim in dims:
                shape.append(dims[dim])
            else:
                shape.append(1)
        last = self.shape[-1]
        shape.append(last if isinstance(last, int) else self.d)
        if isinstance(last, str):
            dims.setdefault(last, self.d)
        return shape, dims

    def plans(self, tokens: int) -> list[list[int]]:
        """Free-dim values: one identification plan with about ``tokens`` tokens, then verification plans of other
        sizes (a single token among them, so that most experts get none)."""
        f = self.free()
        if f == 0:
            return [[]]
        ident = [1] * (f - 1) + [tokens] if f == 1 else [2] + [1] * (f - 2) + [max(1, tokens // 2)]
        if f == 1:
            checks = [[1], [3], [21], [40]]
        else:
            checks = [[1] * f, [1] * (f - 1) + [3], [3] + [1] * (f - 2) + [7], [2] + [1] * (f - 2) + [13]]
        return [ident] + checks


class _Runner:
    """Samples the region on random inputs. Sizes come from the earliest value of the input chain (``x0``, whose
    symbolic shape names the model's dims); when the region starts at a reshape of it, the reshape is run first."""

    def __init__(self, G: _Graph, region: _Region, x0: str, sizes: _Sizes, dtype: torch.dtype, seed: int):
        self.G, self.region, self.x0, self.sizes, self.dtype = G, region, x0, sizes, dtype
        self.pre = None if x0 == region.x else _Region(G, x0, region.x)
        self.rng = torch.Generator().manual_seed(seed)

    def sample(self, counts: list[int], subst: dict[int, Node] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        shape, dims = self.sizes.make(counts)
        x = torch.randn(*shape, generator=self.rng, dtype=torch.float32).to(self.dtype)
        if self.pre is not None:
            env = {self.x0: x}
            env.update(_outside_values(self.G, self.pre.external, dims))
            x = _run(self.G.g, self.pre.nodes, env, self.region.x)
        env = {self.region.x: x}
        env.update(_outside_values(self.G, self.region.external, dims))
        nodes = self.region.nodes if not subst else [subst.get(id(n), n) for n in self.region.nodes]
        y = _run(self.G.g, nodes, env, self.region.y)
        return x, y


# ----------------------------------------------------------------------------------------------------------------
# semantics
def _detach(lin: Linear, name: str | None = None) -> Linear:
    name = name or lin.name
    meta = {"module": lin.module or name, **{k: v for k, v in lin.meta.items() if k.startswith("ungathered")}}
    return Linear(name, [f"{name}:in"], [f"{name}:out"], meta, weight=lin.weight, bias=lin.bias)


def _random_like(lin: Linear, rng: torch.Generator) -> Linear:
    """A copy of ``lin`` (same inputs and outputs) with random weights: identification on random weights cannot be
    fooled by experts that happen to be equal (copies, merged models) or degenerate."""
    import copy

    from ..formats import Dense

    out, inp = lin.weight.shape
    c = copy.copy(lin)
    c.weight = Dense((torch.randn(out, inp, generator=rng) / np.sqrt(inp)).numpy())
    c.bias = None if lin.bias is None else (torch.randn(out, generator=rng) * 0.1).numpy()
    return c


def _identify_expert(G: _Graph, region: _Region, site: _ExpertSite, rng: torch.Generator, subst: dict[int, Node]) -> tuple[Expert, Expert]:
    """Run the expert's own nodes (with random weights) on random rows; find the activation and which input Linear is
    the gate. Returns the expert with its real weights and with the random ones."""
    from ..executor import Executor

    u, out = site.u, site.down.outputs[0]
    ids = {id(n) for n in region.nodes}
    fwd_vals = {u}
    fwd: list[Node] = []
    ui, di = G.index(u), G.pos[id(site.down)]
    for n in G.g.nodes[ui + 1 : di + 1]:
        if id(n) in ids and any(i in fwd_vals for i in n.inputs if i):
            fwd.append(n)
            fwd_vals.update(o for o in n.outputs if o)
    need = {out}
    nodes: list[Node] = []
    for n in reversed(fwd):
        if any(o in need for o in n.outputs if o):
            nodes.append(n)
            need.update(i for i in n.inputs if i)
    nodes.reverse()
    produced = {o for n in nodes for o in n.outputs if o}
    ext = {i for n in nodes for i in n.inputs if i and i not in produced and i != u and i not in G.g.constants}
    if ext:
        raise _Fail(f"expert '{site.down.name}' reads values besides its tokens ({sorted(ext)[0]})")
    d = site.ins[0].in_features
    s = G.shape(u) or (None, d)
    shape = [dim if isinstance(dim, int) else 1 for dim in s[:-1]] + [d]
    free = [i for i, dim in enumerate(s[:-1]) if not isinstance(dim, int)]
    if free:
        shape[free[-1]] = 24  # rows of tokens; static dims (a static export) stay as they are
    ut = torch.randn(*shape, generator=rng)
    ref = _run(G.g, [subst.get(id(n), n) for n in nodes], {u: ut}, out)
    ex = Executor(_subgraph(G.g, [], []), "cpu")
    u2 = ut.reshape(-1, d)
    best: tuple[float, Expert, Expert] | None = None
    orders = [(None, site.ins[0])] if len(site.ins) == 1 else [(site.ins[0], site.ins[1]), (site.ins[1], site.ins[0])]

    def make(gate, up, act, w):
        return Expert(up=_detach(w(up)), down=_detach(w(site.down)), gate=None if gate is None else _detach(w(gate)), act=act)

    from ..executor import _ACTS

    rnd = lambda n: subst.get(id(n), n)  # noqa: E731
    with torch.no_grad():
        pre = {id(n): ex.linear(_detach(rnd(n)), u2, None) for n in site.ins}  # each input layer once
        down = _detach(rnd(site.down))
        for gate, up in orders:
            for act in ACTIVATIONS:
                h = _ACTS[act](pre[id(up)]) if gate is None else _ACTS[act](pre[id(gate)]) * pre[id(up)]
                got = ex.linear(down, h, None)
                err = _rel(got.reshape(ref.shape) if got.numel() == ref.numel() else got, ref)
                if best is None or err < best[0]:
                    best = (err, make(gate, up, act, lambda n: n), make(gate, up, act, rnd))
    if best is None or best[0] > _EXPERT_TOL:
        raise _Fail(f"expert '{site.down.name}' is not a (gated) MLP sparsec knows (best match off by {best[0] if best else 'inf':.2g})")
    return best[1], best[2]


def _route_weights(logits: torch.Tensor, k: int, score: str, renorm: bool) -> torch.Tensor:
    probs = torch.softmax(logits, -1) if score == "softmax" else torch.sigmoid(logits)
    topv, topi = torch.topk(probs, k, dim=-1)
    if renorm:
        topv = topv / topv.sum(-1, keepdim=True)
    return torch.zeros_like(probs).scatter_(1, topi, topv)


def _identify_routing(ex, router: Linear, experts: list[Expert], x2: torch.Tensor, y2: torch.Tensor):
    """Least squares per token for the expert coefficients, matched against routing hypotheses. Returns
    (top_k, score, renormalize, route -> expert list, error)."""
    from scipy.optimize import linear_sum_assignment

    with torch.no_grad():
        outs = torch.stack([ex.expert(e, x2, None).double() for e in experts], -1)  # [T, D, n]
        logits = ex.linear(router, x2, None).double()
    n = len(experts)
    yd = y2.double()
    if n <= outs.shape[1]:
        a = outs.numpy()
        ata = np.einsum("tdn,tdm->tnm", a, a)
        aty = np.einsum("tdn,td->tn", a, yd.numpy())
        ridge = 1e-12 * np.trace(ata, axis1=1, axis2=2)[:, None, None] * np.eye(n)
        c = torch.from_numpy(np.linalg.solve(ata + ridge, aty[..., None])[..., 0])  # [T, n]
    else:
        c = None
    cn = float(c.norm()) if c is not None else 1.0
    best = None
    for k in range(1, n + 1):
        for score, renorm in (("softmax", True), ("softmax", False), ("sigmoid", True), ("sigmoid", False)):
            w = _route_weights(logits, k, score, renorm)  # [T, routes]
            if c is not None:
                cn_, wn_ = c.T.numpy(), w.T.numpy()
                cost = ((cn_[:, None, :] - wn_[None, :, :]) ** 2).sum(-1)  # [experts, routes]
                rows, cols = linear_sum_assignment(cost)
                err = float(np.sqrt(cost[rows, cols].sum())) / max(cn, 1e-30)
                route_to_expert = [0] * n
                for j, r in zip(rows, cols):
                    route_to_expert[int(r)] = int(j)
            else:
                route_to_expert = list(range(n))
                pred = (outs * w.unsqueeze(1)).sum(-1)
                err = float((pred - yd).norm() / max(float(yd.norm()), 1e-30))
            if best is None or err < best[-1] - 1e-9:
                best = (k, score, renorm, route_to_expert, err)
    return best


# ----------------------------------------------------------------------------------------------------------------
def _module_prefix(names: list[str]) -> str:
    parts = [n.split(".") for n in names if n]
    if not parts:
        return ""
    common = []
    for seg in zip(*parts):
        if all(s == seg[0] for s in seg):
            common.append(seg[0])
        else:
            break
    return ".".join(common)


def _try_block(G: _Graph, router: Linear, seed: int) -> tuple[MoE, list[Node]]:
    from ..executor import Executor

    xs = _x_chain(G, router)
    sites = _find_experts(G, router, xs)
    routes = router.out_features
    if len(sites) < 2:
        raise _Fail("no expert MLPs", quiet=True)  # e.g. top-k sampling over an LM head
    if len(sites) < routes:
        raise _Fail(f"{len(sites)} expert MLPs found for {routes} router outputs")
    # which expert-like MLPs are the routed ones: all, the ones of one shape, or all but a shared expert or two
    subsets: list[tuple[list[_ExpertSite], list[_ExpertSite]]] = []
    if len(sites) == routes:
        subsets.append((sites, []))
    else:
        by_sig: dict[Any, list[_ExpertSite]] = {}
        for s in sites:
            by_sig.setdefault(s.signature(), []).append(s)
        for grp in by_sig.values():
            if len(grp) == routes:
                subsets.append((grp, [s for s in sites if s not in grp]))
        if len(sites) - routes <= _MAX_EXCLUDED:
            import itertools

            for ex_ in itertools.combinations(range(len(sites)), len(sites) - routes):
                keep = [s for i, s in enumerate(sites) if i not in ex_]
                if all(keep != k for k, _ in subsets):
                    subsets.append((keep, [sites[i] for i in ex_]))
    if not subsets:
        raise _Fail(f"{len(sites)} expert MLPs found for {routes} router outputs")
    reasons: list[str] = []
    for routed, excluded in subsets:
        y0 = _joins(G, routed, excluded)
        if y0 is None:
            reasons.append("the experts' outputs do not meet in one value")
            continue
        ys = _y_chain(G, y0, xs[0])
        for y in reversed(ys):
            ys_shape = G.shape(y)
            for x in xs:
                xsh = G.shape(x)
                if xsh is not None and ys_shape is not None and len(xsh) != len(ys_shape):
                    continue
                try:
                    return _build(G, router, x, y, routed, seed, Executor, xs[0])
                except _Fail as e:
                    reasons.append(str(e))
    # the most informative reason: the one from the widest region tried
    raise _Fail(reasons[0] if reasons else "no region between its input and output could be delimited")


def _build(G: _Graph, router: Linear, x: str, y: str, sites: list[_ExpertSite], seed: int, Executor, x0: str) -> tuple[MoE, list[Node]]:
    region = _Region(G, x, y)
    rids = {id(n) for n in region.nodes}
    if id(router) not in rids:
        raise _Fail("the router is not inside the block")
    for s in sites:
        for lin in [s.down, *s.ins]:
            if id(lin) not in rids:
                raise _Fail(f"expert layer '{lin.name}' is not between the block's input and output")
            if id(lin) in region.keep:
                raise _Fail(f"values computed from expert layer '{lin.name}' are used outside the block")
    expert_ids = {id(l) for s in sites for l in [s.down, *s.ins]}
    others = [l for l in region.linears if l is not router and id(l) not in expert_ids]
    if others:
        raise _Fail(f"the block holds other layers ('{others[0].name}')")
    d = router.in_features
    sizes = _Sizes(G, x0, d)
    xdt = G.dtype(x) or "float32"
    dtype = {"float16": torch.float16, "float64": torch.float64, "bfloat16": torch.bfloat16}.get(xdt, torch.float32)
    runner = _Runner(G, region, x0, sizes, dtype, seed)
    rng = torch.Generator().manual_seed(seed + 1)
    # identification runs the region with random weights in every router and expert layer (the dataflow, not the
    # weights, decides which route feeds which expert); verification below uses the real ones
    subst = {id(lin): _random_like(lin, rng) for lin in [router] + [l for s in sites for l in [*s.ins, s.down]]}
    pairs = [_identify_expert(G, region, s, rng, subst) for s in sites]
    experts = [p[0] for p in pairs]
    plans = sizes.plans(tokens=min(1024, max(96, 12 * router.out_features)))  # identification, then checks
    ex = Executor(_subgraph(G.g, [], []), "cpu")
    dout = experts[0].down.out_features
    target = min(1024, max(96, 12 * router.out_features))
    xs2, ys2 = [], []
    while sum(len(a) for a in xs2) < target and len(xs2) < 16:  # static shapes: several samples of the one size
        xt, yt = runner.sample(plans[0], subst)
        if yt.numel() != (xt.numel() // d) * dout:
            raise _Fail(f"its output has {tuple(yt.shape)} elements for input {tuple(xt.shape)}")
        xs2.append(xt.reshape(-1, d).float())
        ys2.append(yt.reshape(-1, dout).float())
    x2, y2 = torch.cat(xs2), torch.cat(ys2)
    k, score, renorm, route_to_expert, err = _identify_routing(ex, subst[id(router)], [p[1] for p in pairs], x2, y2)
    if err > 1e-3:
        raise _Fail(f"its output is no top-k softmax/sigmoid mixture of its experts (best fit off by {err:.2g})")
    name = G.g.unique_name(_module_prefix([router.name] + [l.name for e in experts for l in e.linears()]) or "moe")
    ordered = [experts[j] for j in route_to_expert]
    moe = MoE(name, [x], [y], {"module": name, "moe_source": "onnx"}, router=_detach(router), experts=ordered, top_k=k,
              renormalize=renorm, score=score)  # fmt: skip
    worst = 0.0
    for plan in plans:
        xt, yt = runner.sample(plan)
        with torch.no_grad():
            got = ex.moe(moe, xt, None)
        e = _rel(got.reshape(yt.shape) if got.numel() == yt.numel() else got, yt)
        worst = max(worst, e)
        if not e <= _VERIFY_TOL:
            raise _Fail(f"the raised MoE (top-{k} {score}{' renormalized' if renorm else ''}) differs from the block by "
                        f"{e:.2g} on {xt.numel() // d} tokens")  # fmt: skip
    moe.meta["moe_verify_error"] = worst
    moe.meta["source_nodes"] = [n.meta.get("onnx_name") or n.name for n in region.removable()]
    return moe, region.removable()


@contextlib.contextmanager
def _few_threads(G: _Graph, router: Linear):
    """Small layers run faster on one thread (tiny matmuls on ~100 tokens; no oversubscription on busy machines)."""
    largest = max((n.param_count() for n in G.g.nodes if isinstance(n, Linear)), default=0)
    before = torch.get_num_threads()
    small = largest < (1 << 22)
    if small:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if small:
            torch.set_num_threads(before)


def _gathers_expert_weights(G: _Graph, gate: Generic) -> bool:
    """Whether the expert ids ``gate`` (TopK / ArgMax) picks select slices of a constant of 3 or more axes (experts
    stacked in one weight and gathered per token, as DBRX applies them), through index re-layouts."""
    ids = gate.outputs[1] if gate.op_type == "TopK" and len(gate.outputs) > 1 else gate.outputs[0]
    stack, seen = [ids], set()
    while stack:
        v = stack.pop()
        if v in seen or len(seen) > 32:
            continue
        seen.add(v)
        for u in G.cons.get(v, []):
            if not isinstance(u, Generic) or u.domain != "":
                continue
            if u.op_type in ("Gather", "GatherND", "GatherElements") and len(u.inputs) > 1 and u.inputs[1] == v:
                w = G.g.constants.get(u.inputs[0])
                if w is not None and w.ndim >= 3 and w.dtype.kind == "f":
                    return True
            elif u.op_type in ("Reshape", "Flatten", "Squeeze", "Unsqueeze", "Cast", "Identity", "Expand", "Concat"):
                stack.extend(o for o in u.outputs if o)
    return False


def raise_onnx_moe(g: Graph, seed: int = 0) -> tuple[int, list[str]]:
    """Find and raise MoE blocks in an ONNX-imported graph (in place). Returns (count, warnings)."""
    from .raise_ import _apply, _Match

    warnings: list[str] = []
    count = 0
    tried: set[str] = set()
    while True:
        G = _Graph(g)
        gates = [n for n in g.nodes if isinstance(n, Generic) and n.domain == "" and n.op_type in ("TopK", "ArgMax")]
        done = False
        for t in gates:
            router = _router_of(G, t)
            if router is None or router.name in tried:
                continue
            tried.add(router.name)
            try:
                with _few_threads(G, router):
                    try:
                        moe, remove = _try_block(G, router, seed)
                    except (RuntimeError, ValueError, IndexError, KeyError, np.linalg.LinAlgError) as e:
                        # the region's numbers could not be computed as the block was read (shapes that do not
                        # match): not an MoE this raiser understands; the model still imports, layer by layer
                        raise _Fail(f"its region could not be evaluated ({type(e).__name__}: {str(e).splitlines()[0][:120]})") from e
            except _Fail as e:
                block = _module_prefix([router.name]).rsplit(".", 1)[0] if "." in router.name else router.name
                if e.quiet:
                    if _gathers_expert_weights(G, t):  # DBRX: the routed ids pick slices of 3-D expert weights
                        router.meta["moe_router"] = block
                    continue
                warnings.append(f"MoE-like block '{block}' (router '{router.name}', {router.out_features} outputs) is not raised "
                                f"to an MoE layer: {e}; its layers are imported individually")  # fmt: skip
                router.meta["moe_router"] = block  # still a router: passes leave it out by default (pipeline.Selection)
                continue
            _apply(g, [_Match(remove, moe)])
            count += 1
            done = True
            break  # the graph changed: rebuild the maps
        if not done:
            return count, warnings
