"""Raising: rewrite low-level ONNX patterns in an IR graph into the ops the passes reason about.

Patterns recognized (each as the TorchScript and the dynamo exporters of torch.onnx emit them, opsets 13-21):

- constants: ``Constant`` nodes, ``Identity``/``Transpose``/``Cast``/... of constants are folded;
- ``Linear``: ``MatMul(x, W)`` with a constant 2-D weight (or ``[1, K, N]``), with an optional following
  ``Add(bias)``; ``Gemm(x, B, C)`` with constant ``B`` (transB 0/1, alpha, beta); ``Einsum`` of an activation with a
  constant 2-D weight over the activation's last axis (``bsh,oh->bso``, ``...h,ho->...o``, either operand order);
  a product with a constant weight that fits none of these stays dense, with an import warning naming it;
- ``LayerNorm``: ``LayerNormalization`` over the last axis; the decomposed form
  ``ReduceMean -> Sub -> Pow|Mul -> ReduceMean -> Add(eps) -> Sqrt -> Div|Reciprocal+Mul [-> Mul(gamma)] [-> Add(beta)]``;
- ``RMSNorm``: ``Pow(x,2)|Mul(x,x) -> ReduceMean -> Add(eps) -> Sqrt -> Reciprocal|Div(1,.)  -> Mul(x, .)``,
  ``Div(x, Sqrt(.))`` and ``Pow(., -0.5)`` variants, an optional no-op ``Cast``, ``[-> Mul(weight)]``;
  ``RMSNormalization`` (opset 23) and ``com.microsoft.SimplifiedLayerNormalization``;
- ``Embedding``: ``Gather(table, ids)`` with a constant 2-D float table, axis 0;
- ``Residual``: ``Add`` of two non-constant float activations of the same shape;
- stacked 3-D weights (fused experts: batched ``MatMul`` / per-slice ``Einsum`` with a constant ``[E, K, N]``) are
  first split into a ``Linear`` per slice (``unstack.py``), so MoE blocks written that way raise like the others;
- ``MoE``: the form sparsec itself exports (nodes tagged with ``sparsec.moe`` metadata), and MoE blocks as torch.onnx
  writes them (both exporters: expert loops unrolled with one_hot/Equal, NonZero, Gather/GatherND, index_add/
  ScatterND/ScatterElements, boolean-mask index_put, or dense forms weighting every expert by a routing mask), found
  by dataflow from a ``TopK``/``ArgMax`` over a router ``Linear`` and identified and verified numerically
  (``moe_onnx.py``). A block that does not verify keeps its plain layers (pruning and quantization still apply) and
  gets an import warning saying why.
"""
from __future__ import annotations

import json
import re
from collections import Counter
from typing import Callable

import numpy as np

from ..errors import UnsupportedOpError
from ..formats import Dense
from ..ir import (
    Conv,
    Embedding,
    Expert,
    Generic,
    Graph,
    LayerNorm,
    Linear,
    MoE,
    Node,
    Residual,
    RMSNorm,
    Value,
    _np_dtype_name,
    _same_array,
)

_FLOAT = ("float32", "float16", "float64", "bfloat16")
_RANDOM_OPS = {"RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike", "Multinomial", "Bernoulli"}
_FOLD_LIMIT = 1 << 26  # do not materialize folded constants larger than this many elements


# ----------------------------------------------------------------------------------------------------------------
class _View:
    """Producer/consumer maps of a graph under rewrite."""

    def __init__(self, g: Graph):
        self.g = g
        self.rebuild()

    def rebuild(self):
        self.prod: dict[str, Node] = {o: n for n in self.g.nodes for o in n.outputs if o}
        self.cons = self.g.consumers()
        self.outputs = set(self.g.outputs)

    def gen(self, value: str | None, *op_types: str, domain: str = "") -> Generic | None:
        if not value:
            return None
        n = self.prod.get(value)
        if isinstance(n, Generic) and n.op_type in op_types and n.domain == domain:
            return n
        return None

    def const(self, value: str | None) -> np.ndarray | None:
        if not value:
            return None
        return self.g.constants.get(value)

    def const_root(self, value: str) -> str:
        """The name of the weight ``value`` holds, for a layer called at several places: the first constant holding
        the same array (an initializer TorchScript's exporter re-exposes through an Identity keeps its own name), else
        the first weight asked for with the same values (the dynamo exporter folds ``W.T`` into a new initializer
        once per use). Values are compared only on a sampled fingerprint's match."""
        arr = self.g.constants.get(value)
        if arr is None:
            return value
        first = getattr(self, "_first_const", None)
        if first is None:
            first = self._first_const = {}
            self._by_print: dict[tuple, list[str]] = {}
            for k, a in self.g.constants.items():
                first.setdefault(id(a), k)
        root = first.get(id(arr), value)
        if root != value:
            return root
        a = np.asarray(arr)
        flat = a.reshape(-1)
        fp = (a.shape, a.dtype.str, flat[:: max(1, flat.size // 64)][:64].tobytes())
        same = self._by_print.setdefault(fp, [])
        for k in same:
            if k != value and np.array_equal(np.asarray(self.g.constants[k]), a):
                return k
        if value not in same:
            same.append(value)
        return value

    def users(self, value: str) -> list[Node]:
        return self.cons.get(value, [])

    def sole_user(self, value: str, *op_types: str) -> Generic | None:
        """The only consumer of ``value`` if it is a Generic of one of ``op_types`` (and value is no graph output)."""
        if value in self.outputs:
            return None
        us = self.users(value)
        if len(us) != 1:
            return None
        u = us[0]
        if isinstance(u, Generic) and u.domain == "" and u.op_type in op_types:
            return u
        return None

    def private(self, value: str, *allowed: Node) -> bool:
        """``value`` is used only by ``allowed`` nodes and is not a graph output."""
        if value in self.outputs:
            return False
        ids = {id(a) for a in allowed}
        return all(id(u) in ids for u in self.users(value))

    def shape(self, value: str):
        v = self.g.values.get(value)
        return None if v is None else v.shape

    def dtype(self, value: str) -> str | None:
        if value in self.g.constants:
            return _np_dtype_name(self.g.constants[value].dtype)
        v = self.g.values.get(value)
        return None if v is None else v.dtype


def _other(node: Generic, value: str) -> str | None:
    """For a binary node with ``value`` as one input, the other input."""
    a, b = node.inputs[0], node.inputs[1]
    if a == value:
        return b
    if b == value:
        return a
    return None


def _scalar(a: np.ndarray | None) -> float | None:
    if a is None or a.size != 1 or a.dtype.kind not in "fiu":
        return None
    return float(a.reshape(()))


def _reduce_axes(v: _View, n: Generic) -> list[int] | None:
    if "axes" in n.attributes:
        return [int(x) for x in n.attributes["axes"]]
    if len(n.inputs) > 1 and n.inputs[1]:
        a = v.const(n.inputs[1])
        return None if a is None else [int(x) for x in a.reshape(-1)]
    return None


def _reduces_last_axis(v: _View, n: Generic, x: str) -> bool:
    if int(n.attributes.get("keepdims", 1)) != 1:
        return False
    axes = _reduce_axes(v, n)
    if axes is None or len(axes) != 1:
        return False
    if axes[0] == -1:
        return True
    s = v.shape(x)
    return s is not None and axes[0] == len(s) - 1


def _last_dim(v: _View, x: str) -> int | None:
    s = v.shape(x)
    if not s or not isinstance(s[-1], int):
        return None
    return s[-1]


def _vector(a: np.ndarray | None, dim: int | None) -> np.ndarray | None:
    """A per-channel parameter from a constant broadcast over the last axis (``[D]``, ``[1, 1, D]``, scalar)."""
    if a is None or a.dtype.kind != "f":
        return None
    if a.ndim >= 1 and all(s == 1 for s in a.shape[:-1]):
        flat = a.reshape(-1)
        if dim is None or flat.size == dim:
            return flat.astype(np.float32) if a.dtype == np.float64 else flat.copy()
        if flat.size == 1 and dim is not None:
            return np.full(dim, flat[0], dtype=a.dtype)
    if a.ndim == 0 and dim is not None:
        return np.full(dim, float(a), dtype=np.float32)
    return None


class _Match:
    def __init__(self, remove: list[Node], new: Node):
        self.remove = remove
        self.new = new


def _apply(g: Graph, matches: list[_Match]) -> int:
    """Replace each match's nodes by its new node (placed at the last removed node). Overlapping matches are
    dropped (the next round finds them again)."""
    taken: set[int] = set()
    accepted = []
    for m in matches:
        ids = {id(n) for n in m.remove}
        if ids & taken:
            continue
        taken |= ids
        accepted.append(m)
    if not accepted:
        return 0
    last_of: dict[int, _Match] = {}
    pos = {id(n): i for i, n in enumerate(g.nodes)}
    for m in accepted:
        last = max(m.remove, key=lambda n: pos[id(n)])
        last_of[id(last)] = m
    out = []
    for n in g.nodes:
        if id(n) in last_of:
            out.append(last_of[id(n)].new)
        elif id(n) not in taken:
            out.append(n)
    g.nodes = out
    return len(accepted)


def _meta(*nodes: Node) -> dict:
    meta: dict = {}
    for n in nodes:
        if n.module and "module" not in meta:
            meta["module"] = n.module
        s = n.meta.get("sparsec")
        if s:
            meta.setdefault("sparsec", {}).update(s)
    meta["source_nodes"] = [n.meta.get("onnx_name") or n.name for n in nodes]
    return meta


# ----------------------------------------------------------------------------------------------------------------
# constant folding
def fold_constants(g: Graph) -> int:
    import torch

    from ..onnx_ops import run_op, supported

    opset = g.opset.get("", 17)
    folded = 0
    keep: list[Node] = []
    shape_of: dict[str, list] = {}  # output of a Shape node that stays -> the dims it holds (int where static)
    for n in g.nodes:
        if isinstance(n, Generic) and n.domain == "" and n.op_type in ("Shape", "Gather") and n.inputs:
            dims = _static_dims(g, n, shape_of)
            flat = dims if isinstance(dims, list) else [dims]
            if dims is not None and all(isinstance(d, int) and d >= 0 for d in flat):
                arr = np.asarray(dims, dtype=np.int64)  # static dims of a dynamic tensor: a constant
                g.constants[n.outputs[0]] = arr
                g.values[n.outputs[0]] = Value(n.outputs[0], *_dv(arr))
                folded += 1
                continue
            if dims is not None and n.op_type == "Shape":
                shape_of[n.outputs[0]] = list(dims)
        if (
            isinstance(n, Generic)
            and n.op_type not in _RANDOM_OPS
            and n.inputs
            and all((not i) or i in g.constants for i in n.inputs)
            and supported(n.op_type, n.domain)
        ):
            if n.op_type == "Identity":
                g.constants[n.outputs[0]] = g.constants[n.inputs[0]]
                g.values[n.outputs[0]] = Value(n.outputs[0], *_dv(g.constants[n.inputs[0]]))
                folded += 1
                continue
            ins = [None if not i else torch.from_numpy(np.asarray(g.constants[i], order="C")) for i in n.inputs]
            try:
                outs = run_op(n.op_type, n.domain, ins, n.attributes, opset, n.name, num_outputs=len(n.outputs))
            except UnsupportedOpError:
                keep.append(n)
                continue
            if any(o.numel() > _FOLD_LIMIT for o in outs[: len(n.outputs)]):
                keep.append(n)
                continue
            narrow = _float16_source(g, n)
            for name, t in zip(n.outputs, outs):
                if name:
                    arr = _to_numpy(t)
                    g.constants[name] = arr
                    g.values[name] = Value(name, *_dv(arr))
                    if narrow and arr.dtype == np.float32:
                        g.float16_consts.add(name)
            folded += 1
            continue
        keep.append(n)
    g.nodes = keep
    return folded


_LAYOUT_OPS = {"Transpose", "Reshape", "Squeeze", "Unsqueeze", "Flatten", "Identity"}


def _float16_source(g: Graph, n: Generic) -> bool:
    """Node ``n`` (folded) turns a float16 initializer into float32 values: a ``Cast`` of one (a mixed-precision
    export stores its weights as float16 and casts them), or a layout op of such values. Its outputs are then recorded
    in ``g.float16_consts`` (the Linear raised on them counts its weight at 2 bytes: ``Graph.source_nbytes``)."""
    if not hasattr(g, "float16_consts"):
        g.float16_consts = set()
    first = g.constants.get(n.inputs[0]) if n.inputs and n.inputs[0] else None
    if first is None:
        return False
    if n.op_type == "Cast":
        return np.asarray(first).dtype == np.float16
    return n.op_type in _LAYOUT_OPS and n.inputs[0] in g.float16_consts


def _static_dims(g: Graph, n: Generic, shape_of: dict[str, list]):
    """The dims a ``Shape`` node outputs (ints where the input's shape has them, strings elsewhere), or those a
    ``Gather`` with a constant index picks from such a ``Shape`` (an array of the same structure); None otherwise."""
    if n.op_type == "Shape":
        if n.inputs[0] in g.constants:
            return None  # folded the usual way
        v = g.values.get(n.inputs[0])
        if v is None or v.shape is None:
            return None
        end = n.attributes.get("end")
        return list(v.shape)[int(n.attributes.get("start", 0)) : (None if end is None else int(end))]
    src = shape_of.get(n.inputs[0])
    idx = g.constants.get(n.inputs[1]) if len(n.inputs) > 1 else None
    if src is None or idx is None or int(n.attributes.get("axis", 0)) != 0 or idx.dtype.kind not in "iu":
        return None
    idx = np.asarray(idx)
    if np.any(idx >= len(src)) or np.any(idx < -len(src)):
        return None
    if idx.ndim > 1:
        return None
    return [src[int(i)] for i in idx] if idx.ndim else src[int(idx)]


def _to_numpy(t) -> np.ndarray:
    import torch

    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:
        t = t.float()
    return np.array(t.numpy())


def _dv(a: np.ndarray):
    return _np_dtype_name(a.dtype), tuple(int(s) for s in a.shape)


# ----------------------------------------------------------------------------------------------------------------
# patterns
def match_layernorm_fused(v: _View, n: Generic) -> _Match | None:
    if n.op_type != "LayerNormalization" or n.domain != "":
        return None
    x = n.inputs[0]
    s = v.shape(x)
    axis = int(n.attributes.get("axis", -1))
    if not (axis == -1 or (s is not None and axis == len(s) - 1)):
        return None
    if any(o for o in n.outputs[1:] if v.users(o) or o in v.outputs):
        return None
    d = _last_dim(v, x)
    scale = _vector(v.const(n.inputs[1]) if len(n.inputs) > 1 else None, d)
    if scale is None:
        return None
    bias = None
    if len(n.inputs) > 2 and n.inputs[2]:
        bias = _vector(v.const(n.inputs[2]), scale.size)
        if bias is None:
            return None
    eps = float(n.attributes.get("epsilon", 1e-5))
    ln = LayerNorm(n.name, [x], [n.outputs[0]], _meta(n), weight=scale, bias=bias, eps=eps)
    return _Match([n], ln)


def _affine_tail(v: _View, value: str, nodes: list[Node], dim: int | None, allow_bias: bool):
    """Optional ``Mul(value, gamma)`` then optional ``Add(., beta)`` with constant vectors."""
    weight = bias = None
    out = value
    mul = v.sole_user(out, "Mul")
    if mul is not None:
        w = _vector(v.const(_other(mul, out)), dim)
        if w is not None:
            weight, out = w, mul.outputs[0]
            nodes.append(mul)
    if allow_bias:
        add = v.sole_user(out, "Add")
        if add is not None:
            b = _vector(v.const(_other(add, out)), dim if weight is None else weight.size)
            if b is not None:
                bias, out = b, add.outputs[0]
                nodes.append(add)
    return weight, bias, out


def _normalize_tail(v: _View, num, denom_sqrt: Generic, nodes: list[Node]):
    """From ``s = Sqrt(var + eps)``, find ``num / s`` as Div(num, s), Mul(num, Reciprocal(s)) or Mul(num, Div(1, s)).
    ``num``: the numerator's name, or a set of the names it may have. Returns the normalized value name or None."""
    nums = {num} if isinstance(num, str) else num
    s = denom_sqrt.outputs[0]
    us = v.users(s)
    if len(us) != 1 or s in v.outputs:
        return None
    u = us[0]
    if not isinstance(u, Generic) or u.domain != "":
        return None
    if u.op_type == "Div" and u.inputs[1] == s and u.inputs[0] in nums:
        nodes.append(u)
        return u.outputs[0]
    if u.op_type == "Reciprocal" or (u.op_type == "Div" and u.inputs[1] == s and _scalar(v.const(u.inputs[0])) == 1.0):
        r = u.outputs[0]
        mul = v.sole_user(r, "Mul")
        if mul is not None and _other(mul, r) in nums:
            nodes += [u, mul]
            return mul.outputs[0]
    return None


def _scaled_inputs(v: _View, x: str, dim: int | None) -> dict[str, tuple[Generic, np.ndarray]]:
    """``Mul(x, w)`` values with a constant per-channel ``w`` and one user: an RMSNorm written ``w * x * rsqrt(..)``
    (left to right: the weight scales x before the normalization does; the product is the same)."""
    out = {}
    for u in v.users(x):
        if isinstance(u, Generic) and u.op_type == "Mul" and u.domain == "" and len(v.users(u.outputs[0])) == 1:
            w = _vector(v.const(_other(u, x)), dim)
            if w is not None and w.size == dim and u.outputs[0] not in v.outputs:
                out[u.outputs[0]] = (u, w)
    return out


def match_layernorm_decomposed(v: _View, m1: Generic) -> _Match | None:
    if m1.op_type != "ReduceMean":
        return None
    x = m1.inputs[0]
    if not _reduces_last_axis(v, m1, x) or v.dtype(x) not in _FLOAT:
        return None
    sub = v.sole_user(m1.outputs[0], "Sub")
    if sub is None or sub.inputs != [x, m1.outputs[0]]:
        return None
    d = sub.outputs[0]
    users = v.users(d)
    if d in v.outputs or len(users) != 2:
        return None
    sq = next((u for u in users if isinstance(u, Generic) and (
        (u.op_type == "Pow" and u.inputs[0] == d and _scalar(v.const(u.inputs[1])) == 2.0)
        or (u.op_type == "Mul" and u.inputs == [d, d]))), None)  # fmt: skip
    if sq is None:
        return None
    m2 = v.sole_user(sq.outputs[0], "ReduceMean")
    if m2 is None or not _reduces_last_axis(v, m2, sq.outputs[0]):
        return None
    add = v.sole_user(m2.outputs[0], "Add")
    eps = None if add is None else _scalar(v.const(_other(add, m2.outputs[0])))
    if eps is None:
        return None
    sqrt = v.sole_user(add.outputs[0], "Sqrt")
    if sqrt is None:
        return None
    nodes: list[Node] = [m1, sub, sq, m2, add, sqrt]
    normed = _normalize_tail(v, d, sqrt, nodes)
    if normed is None:
        return None
    reads_d = nodes[-1]  # Div(d, s), or the Mul of d and Reciprocal(s) (rsqrt: Cohere's LayerNorm)
    weight, bias, out = _affine_tail(v, normed, nodes, _last_dim(v, x), allow_bias=True)
    if not v.private(m1.outputs[0], sub) or not v.private(d, sq, reads_d):
        return None
    ln = LayerNorm(m1.name, [x], [out], _meta(*nodes), weight=weight, bias=bias, eps=eps)
    return _Match(nodes, ln)


def match_rmsnorm(v: _View, m: Generic) -> _Match | None:
    if m.op_type != "ReduceMean":
        return None
    sq = v.gen(m.inputs[0], "Pow", "Mul")
    if sq is None or not v.private(sq.outputs[0], m):
        return None
    if sq.op_type == "Pow":
        if _scalar(v.const(sq.inputs[1])) != 2.0:
            return None
        x = sq.inputs[0]
    else:
        if sq.inputs[0] != sq.inputs[1]:
            return None
        x = sq.inputs[0]
    if v.dtype(x) not in _FLOAT or not _reduces_last_axis(v, m, sq.outputs[0]) or x in v.g.constants:
        return None
    add = v.sole_user(m.outputs[0], "Add")
    eps = None if add is None else _scalar(v.const(_other(add, m.outputs[0])))
    if eps is None:
        return None
    nodes: list[Node] = [sq, m, add]
    a = add.outputs[0]
    normed = None
    scaled = _scaled_inputs(v, x, _last_dim(v, x))  # w * x, normalized after
    nums = {x, *scaled}
    powr = v.sole_user(a, "Pow")
    if powr is not None and powr.inputs[0] == a and _scalar(v.const(powr.inputs[1])) == -0.5:
        mul = v.sole_user(powr.outputs[0], "Mul")
        if mul is not None and _other(mul, powr.outputs[0]) in nums:
            nodes += [powr, mul]
            normed = mul.outputs[0]
    else:
        sqrt = v.sole_user(a, "Sqrt")
        if sqrt is not None:
            nodes.append(sqrt)
            normed = _normalize_tail(v, nums, sqrt, nodes)
    if normed is None:
        return None
    pre_weight = None
    num = next((i for i in nodes[-1].inputs if i in scaled), None)
    if num is not None:
        wmul, pre_weight = scaled[num]
        nodes.insert(0, wmul)
        weight, _, out = _affine_tail(v, normed, nodes, _last_dim(v, x), allow_bias=False)
        weight = pre_weight if weight is None else (pre_weight * weight).astype(pre_weight.dtype)
        return _Match(nodes, RMSNorm(m.name, [x], [out], _meta(*nodes), weight=weight, eps=eps))
    # an optional no-op Cast between the normalization and the weight (HF: weight * x.to(input_dtype))
    cast = v.sole_user(normed, "Cast")
    if cast is not None and v.dtype(cast.outputs[0]) == v.dtype(normed) and v.dtype(normed) is not None:
        nodes.append(cast)
        normed = cast.outputs[0]
    elif cast is not None:
        # a float16 model as HF writes it: x.to(float32) -> normalize -> .to(input dtype) [-> weight *]; RMSNorm's
        # semantics (computed in float32, cast back to the input's dtype) are exactly that
        up = v.gen(x, "Cast")
        low = v.dtype(cast.outputs[0])
        if (up is not None and low in _FLOAT and v.dtype(up.inputs[0]) == low and low != v.dtype(x)
                and up.inputs[0] not in v.g.constants and v.private(x, *nodes)):  # fmt: skip
            nodes = [up, *nodes, cast]
            normed = cast.outputs[0]
            x = up.inputs[0]
    weight, _, out = _affine_tail(v, normed, nodes, _last_dim(v, x), allow_bias=False)
    rms = RMSNorm(m.name, [x], [out], _meta(*nodes), weight=weight, eps=eps)
    return _Match(nodes, rms)


def match_rmsnorm_fused(v: _View, n: Generic) -> _Match | None:
    is_std = n.op_type == "RMSNormalization" and n.domain == ""
    is_ms = n.op_type == "SimplifiedLayerNormalization" and n.domain in ("", "com.microsoft")
    if not (is_std or is_ms):
        return None
    x = n.inputs[0]
    s = v.shape(x)
    axis = int(n.attributes.get("axis", -1))
    if not (axis == -1 or (s is not None and axis == len(s) - 1)):
        return None
    if any(o for o in n.outputs[1:] if v.users(o) or o in v.outputs):
        return None
    w = _vector(v.const(n.inputs[1]) if len(n.inputs) > 1 else None, _last_dim(v, x))
    if w is None:
        return None
    eps = float(n.attributes.get("epsilon", 1e-5))
    return _Match([n], RMSNorm(n.name, [x], [n.outputs[0]], _meta(n), weight=w, eps=eps))


def einsum_linear_weight(eq: str, w_first: bool, w: np.ndarray) -> np.ndarray | None:
    """For ``Einsum(eq, x, W)`` (``w_first``: ``Einsum(eq, W, x)``) with a constant 2-D ``W`` that is a Linear over
    x's last axis (``bsh,oh->bso``, ``...h,ho->...o``, ``oh,bsh->bso``: x's other axes kept in order, the weight's
    other axis last in the output), ``W`` as ``[out, in]``; None for any other equation."""
    m = re.fullmatch(r"([a-zA-Z.]+),([a-zA-Z.]+)->([a-zA-Z.]+)", eq.replace(" ", ""))
    if not m or w.ndim != 2:
        return None
    terms = [t.replace("...", "*") for t in m.groups()]
    if any("." in t for t in terms):
        return None
    a, b = (terms[1], terms[0]) if w_first else (terms[0], terms[1])
    o = terms[2]
    if len(b) != 2 or "*" in b or b[0] == b[1] or len(set(a)) != len(a) or len(a) < 1:
        return None
    k = a[-1]
    if k == "*" or k not in b or k in o:
        return None
    n_ = b[0] if b[1] == k else b[1]
    if n_ in a or o != a[:-1] + n_:
        return None
    return np.asarray(w if b[1] == k else w.T, order="C")


def match_linear(v: _View, n: Generic) -> _Match | None:
    if n.domain != "":
        return None
    if n.op_type in ("MatMul", "Einsum"):
        if len(n.inputs) != 2:
            return None
        x, wname = n.inputs
        w_first = n.op_type == "Einsum" and v.const(x) is not None
        if w_first:
            x, wname = wname, x
        w = v.const(wname)
        if w is None or x in v.g.constants or w.dtype.kind != "f":
            return None
        if n.op_type == "MatMul" and w.ndim == 3 and w.shape[0] == 1:
            w = w[0]
        if w.ndim != 2:
            return None
        xs = v.shape(x)
        if xs is not None and len(xs) < 1:
            return None
        if n.op_type == "Einsum":
            weight = einsum_linear_weight(str(n.attributes.get("equation", "")), w_first, w)
            if weight is None:
                return None
        else:
            weight = np.asarray(w.T, order="C")
        nodes: list[Node] = [n]
        out = n.outputs[0]
        bias = None
        add = v.sole_user(out, "Add")
        if add is not None:
            b = v.const(_other(add, out))
            if b is not None and b.dtype.kind == "f" and b.size == weight.shape[0] and all(s == 1 for s in b.shape[:-1]) and b.ndim >= 1:
                os_ = v.shape(out)
                # the bias must not broadcast the output to a higher rank
                if os_ is None or b.ndim <= len(os_):
                    bias = b.reshape(-1).astype(weight.dtype)
                    nodes.append(add)
                    out = add.outputs[0]
        lin = Linear(n.name, [x], [out], _meta(*nodes), weight=weight, bias=bias)
        lin.meta["weight_name"] = v.const_root(wname)
        _note_float16(v.g, lin, wname, _other(add, n.outputs[0]) if bias is not None else None)
        if bias is not None:
            lin.meta["bias_name"] = v.const_root(_other(add, n.outputs[0]))
        return _Match(nodes, lin)
    if n.op_type == "Gemm":
        a, b = n.inputs[0], n.inputs[1]
        c = n.inputs[2] if len(n.inputs) > 2 else ""
        bw = v.const(b)
        if bw is None or bw.ndim != 2 or bw.dtype.kind != "f" or int(n.attributes.get("transA", 0)) != 0 or a in v.g.constants:
            return None
        alpha = float(n.attributes.get("alpha", 1.0))
        beta = float(n.attributes.get("beta", 1.0))
        weight = bw if int(n.attributes.get("transB", 0)) else bw.T
        weight = np.asarray(weight * alpha if alpha != 1.0 else weight, order="C").astype(bw.dtype)
        bias = None
        if c:
            cv = v.const(c)
            if cv is None or cv.size != weight.shape[0] or any(s != 1 for s in cv.shape[:-1]):
                return None
            bias = (cv.reshape(-1) * beta).astype(weight.dtype)
        lin = Linear(n.name, [a], [n.outputs[0]], _meta(n), weight=weight, bias=bias)
        lin.meta["weight_name"] = v.const_root(b)
        _note_float16(v.g, lin, b, c or None)
        if c:
            lin.meta["bias_name"] = v.const_root(c)
        return _Match([n], lin)
    return None


def match_conv(v: _View, n: Generic) -> _Match | None:
    """``Conv`` with a constant float weight, group 1 and 1-3 spatial dims -> :class:`Conv` (grouped and depthwise
    convolutions stay generic: they are not one matrix product)."""
    if n.op_type != "Conv" or n.domain != "" or len(n.inputs) < 2:
        return None
    x, wname = n.inputs[0], n.inputs[1]
    w = v.const(wname)
    if w is None or x in v.g.constants or w.dtype.kind != "f" or not 3 <= w.ndim <= 5:
        return None
    if int(n.attributes.get("group", 1)) != 1:
        return None
    nd = w.ndim - 2
    kernel = [int(k) for k in n.attributes.get("kernel_shape", w.shape[2:])]
    if kernel != list(w.shape[2:]):
        return None
    strides = [int(k) for k in n.attributes.get("strides", [1] * nd)]
    dil = [int(k) for k in n.attributes.get("dilations", [1] * nd)]
    xs = v.shape(x)
    if xs is not None and (len(xs) != nd + 2 or (isinstance(xs[1], int) and xs[1] != w.shape[1])):
        return None
    auto = n.attributes.get("auto_pad", "NOTSET")
    auto = auto.decode() if isinstance(auto, bytes) else str(auto)
    if auto in ("NOTSET", ""):
        pads = [int(k) for k in n.attributes.get("pads", [0] * (2 * nd))]
    elif auto == "VALID":
        pads = [0] * (2 * nd)
    elif auto in ("SAME_UPPER", "SAME_LOWER"):
        if xs is None or not all(isinstance(d, int) for d in xs[2:]):
            return None  # SAME padding of unknown spatial sizes: left to the generic op
        begin, end = [], []
        for i in range(nd):
            size = xs[2 + i]
            total = max((-(-size // strides[i]) - 1) * strides[i] + (kernel[i] - 1) * dil[i] + 1 - size, 0)
            lo = total // 2 if auto == "SAME_UPPER" else total - total // 2
            begin.append(lo)
            end.append(total - lo)
        pads = begin + end
    else:
        return None
    bias = None
    if len(n.inputs) > 2 and n.inputs[2]:
        bias = v.const(n.inputs[2])
        if bias is None or bias.dtype.kind != "f" or bias.size != w.shape[0]:
            return None
        bias = bias.reshape(-1).astype(w.dtype)
    conv = Conv(n.name, [x], [n.outputs[0]], _meta(n), weight=Conv.matrix_of(w), bias=bias, kernel_shape=tuple(kernel),
                strides=tuple(strides), pads=tuple(pads), dilations=tuple(dil))  # fmt: skip
    conv.meta["weight_name"] = v.const_root(wname)
    _note_float16(v.g, conv, wname)
    return _Match([n], conv)


def _note_float16(g: Graph, lin: Linear, wname: str, bname: str | None = None) -> None:
    """A layer whose float32 weight (bias) the model casts from a float16 initializer: ``meta["source_dtype"]``
    (``meta["source_bias_dtype"]``)."""
    narrow = getattr(g, "float16_consts", ())
    if wname in narrow and getattr(lin.weight, "data", np.zeros(0, np.float16)).dtype == np.float32:
        lin.meta["source_dtype"] = "float16"
    if bname and bname in narrow and lin.bias is not None and lin.bias.dtype == np.float32:
        lin.meta["source_bias_dtype"] = "float16"


def match_embedding(v: _View, n: Generic) -> _Match | None:
    if n.op_type != "Gather" or n.domain != "" or int(n.attributes.get("axis", 0)) != 0:
        return None
    table = v.const(n.inputs[0])
    if table is None or table.ndim != 2 or table.dtype.kind != "f" or n.inputs[1] in v.g.constants:
        return None
    if (v.dtype(n.inputs[1]) or "int64") not in ("int64", "int32"):
        return None
    emb = Embedding(n.name, [n.inputs[1]], [n.outputs[0]], _meta(n), table=table)
    emb.meta["table_name"] = n.inputs[0]
    return _Match([n], emb)


def _unknown_dim(d) -> bool:
    """A dim ONNX shape inference could not relate to any other (it names those ``unk__N``)."""
    return isinstance(d, str) and d.startswith("unk__")


def _same_shape(a, b) -> bool:
    """Equal shapes of rank >= 2 (a residual add's operands). An ``unk__`` dim matches any dim: the TorchScript export
    of HF GPT-NeoX's attention output (``view(b, t, h * d)`` with ``b, t`` read from ``query.shape`` after a partial
    rotary) came out ``[unk__21, unk__22, 128]`` next to the stream's ``[batch, seq, 128]``, and from there the stream
    itself had such dims: its parallel residuals were not raised. The last (feature) dim must be known and equal, and
    some other dim known on one side."""
    if a is None or b is None or len(a) != len(b) or len(a) < 2:
        return False
    if a[-1] is None or a[-1] != b[-1] or _unknown_dim(a[-1]):
        return False
    if all(_unknown_dim(x) for x in a[:-1]) and all(_unknown_dim(y) for y in b[:-1]):
        return False  # nothing known on either side but the width
    return all(x is not None and y is not None and (x == y or _unknown_dim(x) or _unknown_dim(y)) for x, y in zip(a, b))


def match_residual(v: _View, n: Generic) -> _Match | None:
    if n.op_type != "Add" or n.domain != "":
        return None
    a, b = n.inputs
    if a in v.g.constants or b in v.g.constants or a == b:
        return None
    if v.dtype(a) not in _FLOAT or v.dtype(b) not in _FLOAT:
        return None
    if not _same_shape(v.shape(a), v.shape(b)):
        return None
    # a residual connection adds a layer's output (a Linear or an MoE, possibly through dropout / cast) to the
    # stream; sums of other activations (rotary q*cos + rotate_half(q)*sin, token + position embeddings) are not
    wa, wb = _writes_stream(v, a), _writes_stream(v, b)
    if wa == wb:
        return None
    # the stream side must not be computed from the layer's output: ``x + 0.044715 * x**3`` inside a decomposed
    # tanh-GELU (gelu_new, Gemma's GeGLU at opset < 20) adds a Linear's output to a function of itself
    if _depends_on(v, b if wa else a, a if wa else b):
        return None
    return _Match([n], Residual(n.name, [a, b], [n.outputs[0]], _meta(n)))


def _depends_on(v: _View, value: str, ancestor: str, limit: int = 64) -> bool:
    """Whether ``value`` is computed from ``ancestor`` (looking back at most ``limit`` nodes; a real residual's
    stream is upstream of the layer output, so the bound only shortens the search)."""
    stack, seen = [value], set()
    while stack and len(seen) < limit:
        u = stack.pop()
        if u == ancestor:
            return True
        if u in seen:
            continue
        seen.add(u)
        p = v.prod.get(u)
        if p is not None:
            stack.extend(i for i in p.inputs if i and i not in v.g.constants)
    return False


_PASS_THROUGH = {"Dropout", "Identity", "Cast"}


def _writes_stream(v: _View, value: str, depth: int = 0) -> bool:
    n = v.prod.get(value)
    if n is None or depth > 4:
        return False
    if isinstance(n, (Linear, MoE)) and not isinstance(n, Conv):  # a conv net's adds stay generic: not a stream
        return True
    if isinstance(n, Generic):
        s = n.meta.get("sparsec") or {}
        if n.domain == "sparsec" or "sparsec.moe" in s:
            return True
        if n.op_type in _PASS_THROUGH and n.inputs:
            return _writes_stream(v, n.inputs[0], depth + 1)
        if n.op_type in ("Mul", "Div") and len(n.inputs) == 2 and n.inputs[1] in v.g.constants and v.g.constants[n.inputs[1]].size == 1:
            return _writes_stream(v, n.inputs[0], depth + 1)  # a scaled branch (e.g. residual scaling)
        if n.op_type == "Add" and n.domain == "" and len(n.inputs) == 2 and all(n.inputs):
            # parallel attention + MLP (GPT-J, GPT-NeoX, Phi-2, Falcon): ``attn(h) + mlp(h) + x``
            return _writes_stream(v, n.inputs[0], depth + 1) and _writes_stream(v, n.inputs[1], depth + 1)
    return False


def match_layer_scale(v: _View, n: Generic) -> _Match | None:
    """LayerScale (DINOv2, CaiT, DeiT-III: ``x + gamma * f(x)``): a Linear's output multiplied by a constant vector
    of one factor per output channel is the Linear with its rows (and bias) scaled, exactly. Folded, the residual add
    sees the Linear itself (slicing rotates it; the passes compress the scaled weight, which magnitude / Wanda /
    SparseGPT / GPTQ treat row by row alike). Not where the Linear's output has another use, its weight is applied
    by another layer or tied, or the scale would broadcast the output to a higher rank."""
    if n.op_type != "Mul" or n.domain != "" or len(n.inputs) != 2:
        return None
    for k in (0, 1):
        c = v.g.constants.get(n.inputs[1 - k])
        lin = v.prod.get(n.inputs[k])
        if c is None or not isinstance(lin, Linear) or isinstance(lin, Conv) or not isinstance(lin.weight, Dense):
            continue
        d = lin.out_features
        if c.dtype.kind != "f" or c.ndim < 1 or c.shape[-1] != d or c.size != d or d < 2:
            continue
        out_shape = v.shape(lin.outputs[0])
        if out_shape is None or c.ndim > len(out_shape):
            continue
        if lin.outputs[0] in v.outputs or len(v.users(lin.outputs[0])) != 1 or lin.meta.get("tied_to"):
            continue
        wn = lin.meta.get("weight_name")
        if wn and any(o is not lin and o.meta.get("weight_name") == wn for o in v.g.linears()):
            continue
        scale = c.reshape(-1).astype(np.float32)
        W = lin.weight.data
        new = Linear(lin.name, list(lin.inputs), [n.outputs[0]], dict(lin.meta),
                     weight=(W.astype(np.float32) * scale[:, None]).astype(W.dtype),
                     bias=None if lin.bias is None else (lin.bias.astype(np.float32) * scale).astype(lin.bias.dtype))  # fmt: skip
        new.meta["layer_scale_folded"] = n.name
        return _Match([lin, n], new)
    return None


PATTERNS: list[tuple[str, Callable[[_View, Generic], _Match | None]]] = [
    ("LayerNorm", match_layernorm_fused),
    ("LayerNorm", match_layernorm_decomposed),
    ("RMSNorm", match_rmsnorm_fused),
    ("RMSNorm", match_rmsnorm),
    ("Linear", match_linear),
    ("Conv", match_conv),
    ("Embedding", match_embedding),
    ("LayerScale", match_layer_scale),
    ("Residual", match_residual),
]


def _run_pattern(g: Graph, fn) -> int:
    total = 0
    while True:
        v = _View(g)
        matches = []
        for n in list(g.nodes):
            if isinstance(n, Generic):
                m = fn(v, n)
                if m is not None:
                    matches.append(m)
        k = _apply(g, matches)
        total += k
        if k == 0 or k == len(matches):
            return total


# ----------------------------------------------------------------------------------------------------------------
# MoE in sparsec's own exported form
def raise_sparsec_moe(g: Graph) -> int:
    groups: dict[str, list[Node]] = {}
    for n in g.nodes:
        s = n.meta.get("sparsec") or {}
        name = s.get("sparsec.moe")
        if name:
            groups.setdefault(name, []).append(n)
    count = 0
    for name, nodes in groups.items():
        attrs = None
        roles: dict[str, Linear] = {}
        out_node = None
        for n in nodes:
            s = n.meta["sparsec"]
            if "sparsec.moe.attrs" in s:
                attrs = json.loads(s["sparsec.moe.attrs"])
            role = s.get("sparsec.moe.role")
            if role == "output":
                out_node = n
            elif role and isinstance(n, Linear):
                roles[role] = n
        if attrs is None or out_node is None or "router" not in roles:
            continue
        router = roles["router"]
        experts = []
        ok = True
        for i, act in enumerate(attrs["acts"]):
            up, down, gate = roles.get(f"experts.{i}.up"), roles.get(f"experts.{i}.down"), roles.get(f"experts.{i}.gate")
            if up is None or down is None:
                ok = False
                break
            experts.append(Expert(up=_detach(up), down=_detach(down), gate=None if gate is None else _detach(gate), act=act))
        if not ok:
            continue
        moe = MoE(
            name,
            [router.inputs[0]],
            [out_node.outputs[0]],
            {"module": attrs.get("module", name)},
            router=_detach(router),
            experts=experts,
            top_k=int(attrs["top_k"]),
            renormalize=bool(attrs["renormalize"]),
            score=attrs["score"],
            expert_map=attrs.get("expert_map"),
        )
        _apply(g, [_Match(nodes, moe)])
        count += 1
    return count


def _detach(lin: Linear) -> Linear:
    role_name = lin.meta.get("sparsec", {}).get("sparsec.linear") or lin.name
    return Linear(role_name, [f"{role_name}:in"], [f"{role_name}:out"], {"module": role_name}, weight=lin.weight, bias=lin.bias)


_PARAM_SUFFIX = re.compile(r"[._](weight|bias)$")
_DUP_SCOPE = re.compile(r"_\d+$")
# initializer names exporters make up for constants that are not parameters (dynamo ``val_3``, torch.export lifted
# constants); TorchScript's ``onnx::MatMul_30`` fails the identifier test already
_GENERATED = re.compile(r"(val|_?tensor_constant|c_lifted_tensor|lifted_tensor|const|constant|initializer)_?\d+$")


def _param_path(lin: Linear, module: str | None) -> str | None:
    """A Linear's name from its parameters' initializer names (``blocks.0.fc1.bias`` -> ``blocks.0.fc1``) where the
    node's module path has none (an anonymous weight) or lost its parents: the TorchScript exporter scopes a module
    called through a container's ``__getitem__`` (``nn.ModuleDict``: ``b["fc1"](x)``) as ``/fc1``, ``/fc1_1``, ...,
    while the parameters keep their full paths. Taken only when the module path's last part (without the ``_1``
    of a repeated scope) is a part of the parameter path, so that a shared or tied weight never renames a layer."""
    w = lin.meta.get("weight_name", "")
    if not _PARAM_SUFFIX.search(w) and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z0-9_]+)*", w) and not _GENERATED.match(w):
        # a bare parameter used as the weight (``einsum('bsd,fd->bsf', x, self.w1)``, ``x @ self.proj``): its own path
        # names the layer (``blocks.0.w1``), where it belongs to the node's module, or the node has no module and an
        # exporter-made name (``/Einsum``, ``node_einsum_4``; a hand-written graph's node names are kept)
        if (w.rpartition(".")[0] == module) if module else _exporter_made(lin):
            return w
    for key in ("weight_name", "bias_name"):
        p = lin.meta.get(key, "")
        if not _PARAM_SUFFIX.search(p) or not re.fullmatch(r"[A-Za-z0-9_.]+", p):
            continue
        path = _PARAM_SUFFIX.sub("", p)
        if not module:
            return path if key == "weight_name" else module
        last = _DUP_SCOPE.sub("", module.split(".")[-1])
        if path != module and last in path.split(".") and path.count(".") > module.count("."):
            return path
    return module


def _exporter_made(lin: Linear) -> bool:
    """The raised node's ONNX name is one an exporter made from its op type (``/MatMul_1``, ``node_einsum_4``)."""
    m = re.fullmatch(r"/?(?:node_)?([A-Za-z]+)(?:_\d+)?", lin.name)
    return m is not None and m.group(1).lower() in ("matmul", "einsum", "gemm")


# ----------------------------------------------------------------------------------------------------------------
def _name_raised(g: Graph) -> None:
    """Give raised nodes their module paths as names (unique); other nodes keep their ONNX names."""
    taken = {n.name for n in g.nodes if isinstance(n, Generic)}
    counters: dict[str, int] = {}
    # parameter paths that name one Linear only: exporters merge identical initializers (zero biases of every block
    # become one), and a weight called twice is one initializer
    params = {id(n): _param_path(n, n.module) for n in g.nodes if isinstance(n, Linear)}
    uses = Counter(params[id(n)] for n in g.nodes if id(n) in params and n.module and params[id(n)] != n.module)
    for n in g.nodes:
        if isinstance(n, Generic) or isinstance(n, MoE):
            continue
        s = (n.meta.get("sparsec") or {}).get("sparsec.linear") if isinstance(n, Linear) else None
        base = s or n.module
        if isinstance(n, Linear) and not s and (not base or uses[params[id(n)]] == 1):
            base = params[id(n)]
        if isinstance(n, Embedding) and not base:
            tn = n.meta.get("table_name", "")
            if tn.endswith(".weight"):
                base = tn[: -len(".weight")]
        if isinstance(n, Residual):
            base = f"{n.module}.residual" if n.module else "residual"
        elif base and not s and isinstance(n, (LayerNorm, RMSNorm)) and not n.module:
            base = None
        if not base:
            base = n.name
        name = base
        if name in taken:
            k = counters.get(base, 1)
            while f"{base}#{k}" in taken:
                k += 1
            counters[base] = k + 1
            name = f"{base}#{k}"
        taken.add(name)
        n.name = name
        if isinstance(n, Linear) and not n.module:
            n.meta["module"] = base


_REPEAT = re.compile(r"(.+?)_(\d+)")


def restore_container_prefixes(g: Graph) -> None:
    """Linear layers named by a TorchScript scope that lost its container: a model whose forward calls a layer's
    children itself (``for l in self.layers: x = l.self_attn(l.norm(x))``, the layer never called) is scoped
    ``self_attn.q_proj``, ``self_attn.q_proj_1``, ... (``_k``: the k-th call). A layer with a named parameter gets its
    full path from it (``layers.1.self_attn.q_proj``, :func:`_param_path`); a bias-less sibling kept
    ``self_attn.o_proj_1``, so ``--exclude 'layers\\.1\\.'`` silently missed it. A layer whose scope starts with
    the same called module (``self_attn``) and call index as a named one takes its container (``layers.1``). Scopes
    with no named layer keep their names (nothing says which container they are in)."""

    def split(module: str) -> tuple[str, int]:
        m = _REPEAT.fullmatch(module)
        return (m.group(1), int(m.group(2))) if m else (module, 0)

    lins = g.linears()
    container: dict[tuple[str, int], str | None] = {}  # (called module, call index) -> container path
    for lin in lins:
        if lin.module and lin.name != lin.module:
            base, k = split(lin.module)
            if "." in base and lin.name.endswith("." + base):
                key, prefix = (base.split(".")[0], k), lin.name[: -len(base) - 1]
                if container.setdefault(key, prefix) != prefix:
                    container[key] = None  # two containers for one scope and call: nothing to learn
    bare = [lin for lin in lins if lin.module and lin.name == lin.module]
    calls: dict[str, set[int]] = {}
    for lin in bare:
        base, k = split(lin.module)
        calls.setdefault(base, set()).add(k)
    taken = {n.name for n in g.nodes} | {lin.name for lin in lins}
    for lin in bare:
        base, k = split(lin.module)
        prefix = container.get((base.split(".")[0], k))
        name = f"{prefix}.{base}" if prefix and "." in base else None
        # a repeated scope: its first call has no suffix (a model's own `fc_1`, `fc_2` modules are not one scope)
        if name and 0 in calls[base] and len(calls[base]) > 1 and name not in taken:
            taken.add(name)
            lin.name, lin.meta["module"] = name, name


def mark_ties(g: Graph) -> None:
    """Record Linear weights that equal an embedding table (tied input/output embeddings)."""
    embs = [n for n in g.nodes if isinstance(n, Embedding)]
    if not embs:
        return
    for lin in g.linears():
        if lin.weight.kind != "dense":
            continue
        w = lin.weight.data
        for e in embs:
            if _same_array(e.table, w):
                lin.meta["tied_to"] = e.name
                break


def remove_dead(g: Graph) -> None:
    """Drop nodes whose outputs nobody uses and constants nobody reads."""
    while True:
        used = set(g.outputs)
        for n in g.nodes:
            used.update(i for i in n.inputs if i)
        keep = [n for n in g.nodes if any(o in used for o in n.outputs if o)]
        if len(keep) == len(g.nodes):
            break
        g.nodes = keep
    used = set(g.outputs)
    for n in g.nodes:
        used.update(i for i in n.inputs if i)
    for c in list(g.constants):
        if c not in used:
            del g.constants[c]
    live = used | {o for n in g.nodes for o in n.outputs} | set(g.inputs)
    for name in list(g.values):
        if name not in live:
            del g.values[name]


def raise_graph(g: Graph) -> dict[str, int]:
    """Fold constants and raise patterns in place. Returns how many of each op were raised.

    Blocks of experts gathered from stacked weights by the routed ids are rewritten per expert (``ungather.py``) only
    to be raised to MoE nodes: where the MoE raiser then leaves such a block, the raise runs again from the folded
    graph without that block's rewrite, and the raiser's reason joins the import warnings."""
    folded: dict[str, int] = {"folded": fold_constants(g)}
    remove_dead(g)
    from .ungather import gathered_expert_blocks, ungather_experts

    before = g.copy() if gathered_expert_blocks(g) else None
    skip: set[str] = set()
    notes: list[str] = []
    routers: dict[str, str] = {}
    while True:
        blocks = ungather_experts(g, skip) if before is not None else {}
        counts = _raise_rest(g, dict(folded))
        left = {n.meta["ungathered"] for n in g.nodes if isinstance(n, Linear) and "ungathered" in n.meta}
        if not left:
            break
        why = [w for w in g.meta.get("import_warnings", []) if w.startswith("MoE-like block")]
        # routers the raiser found there: still routers after the retry, where the raiser may not find them again
        routers.update({n.name: n.meta["moe_router"] for n in g.nodes if isinstance(n, Linear) and n.meta.get("moe_router")})
        notes.extend(f"experts gathered from stacked weights in {blocks[k]} are left as they are: applied per expert, "
                     f"they were not raised to an MoE block" for k in sorted(left))  # fmt: skip
        notes.extend(why)
        skip |= left
        g.__dict__.update(before.copy().__dict__)
    for n in g.nodes:
        if isinstance(n, MoE):
            for lin in n.linears():
                lin.meta.pop("ungathered", None)
        elif isinstance(n, Linear) and n.name in routers:
            n.meta.setdefault("moe_router", routers[n.name])  # (passes leave it out by default: pipeline.Selection)
    if notes:
        have = g.meta.setdefault("import_warnings", [])
        have.extend(w for w in dict.fromkeys(notes) if w not in have)
    return counts


def _raise_rest(g: Graph, counts: dict[str, int]) -> dict[str, int]:
    from .unstack import unstack_expert_matmuls  # stacked 3-D expert weights -> a Linear per expert

    if unstack_expert_matmuls(g):
        remove_dead(g)
    for label, fn in PATTERNS:
        counts[label] = counts.get(label, 0) + _run_pattern(g, fn)
    counts["MoE"] = raise_sparsec_moe(g)
    _name_raised(g)
    # MoE blocks as torch.onnx writes them: found by dataflow, semantics and verification by numbers (moe_onnx.py)
    from .moe_onnx import raise_onnx_moe

    g.toposort()
    n_moe, moe_warnings = raise_onnx_moe(g)
    if n_moe:
        from .ungather import name_raised_experts

        name_raised_experts(g)
        counts["MoE"] += n_moe
        counts["Residual"] = counts.get("Residual", 0) + _run_pattern(g, match_residual)  # adds after the MoE output
        _name_raised(g)
    if moe_warnings:
        g.meta.setdefault("import_warnings", []).extend(moe_warnings)
    remove_dead(g)
    restore_container_prefixes(g)
    mark_ties(g)
    name_repeated_uses(g)
    note_repeated_weights(g)
    note_dense_weight_products(g)
    g.toposort()
    return counts


_DENSE_PRODUCT_MIN = 4096  # weights smaller than this (rotary frequency rows, tiny mixing matrices) are not reported


# ops that select or re-lay a weight before a product (DBRX's experts: w1[expert_ids] -> Transpose -> MatMul)
_WEIGHT_MOVES = ("Gather", "GatherElements", "GatherND", "Transpose", "Reshape", "Squeeze", "Unsqueeze", "Cast", "Identity",
                 "Expand", "Slice", "Flatten")  # fmt: skip


def _weight_source(g: Graph, prod: dict, v: str) -> tuple[str | None, list[str]]:
    """The constant ``v`` is, or is selected from / re-laid from through :data:`_WEIGHT_MOVES` (its data input), and the
    ops on the way; (None, []) for a value computed from activations."""
    via: list[str] = []
    for _ in range(8):
        if v in g.constants:
            return v, list(reversed(via))
        p = prod.get(v)
        if not isinstance(p, Generic) or p.domain != "" or p.op_type not in _WEIGHT_MOVES or not p.inputs:
            return None, []
        via.append(p.op_type)
        v = p.inputs[0]
    return None, []


def note_dense_weight_products(g: Graph) -> None:
    """A MatMul / Gemm / Einsum with a constant float weight of at least 2 axes that no pattern raised (an einsum over
    a non-last axis, a weight on the left of a MatMul, a Gemm with transA, stacked weights that did not split per
    expert, experts gathered from a 3-D weight as DBRX applies them): the passes cannot compress it. One import warning
    lists them, so a user sees why a layer kept its size."""
    found, convs, nbytes = [], [], {"found": 0, "convs": 0}
    conv_sizes: list[tuple[int, int, str]] = []
    prod = g.producers()
    reported: set[str] = set()
    for n in g.nodes:
        if not isinstance(n, Generic) or n.domain != "":
            continue
        if n.op_type in ("Conv", "ConvTranspose"):  # grouped / depthwise convs and transposed convs (docs/conv.md)
            w = g.constants.get(n.inputs[1]) if len(n.inputs) > 1 else None
            if w is not None and w.ndim >= 3 and w.dtype.kind == "f":  # every one, however small (a depthwise 3x3)
                groups = int(n.attributes.get("group", 1))
                what = n.op_type + (" depthwise" if groups > 1 and w.shape[1] == 1 and n.op_type == "Conv" else
                                    f" groups={groups}" if groups > 1 else "")  # fmt: skip
                conv_sizes.append((-int(w.nbytes), len(conv_sizes), f"'{n.name}' ({what} {list(w.shape)})"))
                nbytes["convs"] += int(w.nbytes)
            continue
        if n.op_type not in ("MatMul", "Gemm", "Einsum"):
            continue
        for i in n.inputs:
            src, via = _weight_source(g, prod, i) if i else (None, [])
            w = g.constants.get(src) if src else None
            gathered = any(op.startswith("Gather") for op in via)  # rows of a 2-D table gathered are activations
            if w is not None and w.ndim >= (3 if gathered else 2) and w.dtype.kind == "f" and w.size >= _DENSE_PRODUCT_MIN:
                if src in reported:  # (experts gathered from one 3-D weight, applied by several products)
                    break
                reported.add(src)
                eq = n.attributes.get("equation")
                what = f"{n.op_type} '{eq}'" if eq else n.op_type
                through = f" through {' / '.join(dict.fromkeys(via))}" if via else ""
                found.append(f"'{n.name}' ({what} by '{src}' {list(w.shape)}{through})")
                nbytes["found"] += int(w.nbytes)
                break

    convs.extend(t for _, _, t in sorted(conv_sizes))  # the largest named first
    if not (found or convs):
        return
    total = max(g.nbytes(), 1)

    def listed(kind: str) -> str:
        items = found if kind == "found" else convs
        return (", ".join(items[:4]) + (f", and {len(items) - 4} more" if len(items) > 4 else "")
                + f" ({nbytes[kind] / total:.0%} of the model's weight bytes)")  # fmt: skip

    if found:
        g.meta.setdefault("import_warnings", []).append(
            f"{len(found)} product(s) with a constant weight are not a Linear form sparsec compresses and stay dense: "
            f"{listed('found')}")  # fmt: skip
    if convs:
        g.meta.setdefault("import_warnings", []).append(
            f"{len(convs)} grouped / depthwise / transposed conv(s) are not compressed (docs/conv.md) and stay dense: "
            f"{listed('convs')}")  # fmt: skip


def linears_by_weight(g: Graph) -> dict[str, list[Linear]]:
    """The Linear layers applying each weight initializer (by its import name): several when a layer is called twice
    or layers share a weight (ALBERT)."""
    groups: dict[str, list[Linear]] = {}
    for n in g.linears():
        if n.meta.get("weight_name"):
            groups.setdefault(n.meta["weight_name"], []).append(n)
    return groups


def name_repeated_uses(g: Graph) -> None:
    """The later uses of a weight applied by several Linear layers are named ``<first>#k`` whichever exporter wrote
    them: TorchScript scopes the k-th call of a module ``<module>_k`` where the dynamo exporter and ``.pt2`` give
    ``<module>#k``, so ``--include`` / ``--exclude`` patterns and `sparsec diff` did not carry over between exports."""
    taken = {n.name for n in g.nodes}
    for lins in linears_by_weight(g).values():
        first = lins[0].name
        for lin in lins[1:]:
            m = re.fullmatch(re.escape(first) + r"_(\d+)", lin.name)
            if m and f"{first}#{m.group(1)}" not in taken:
                taken.discard(lin.name)
                lin.name = f"{first}#{m.group(1)}"
                taken.add(lin.name)


def note_repeated_weights(g: Graph) -> None:
    """One weight applied by several Linear layers (a layer called twice, ALBERT's shared layers): an import warning.
    Each use is a Linear of its own; the calibrated passes compress the weight once for all of them
    (calibration/shared.py), and while their weights stay identical they are stored and counted once
    (``Graph.nbytes``); uses compressed with different settings are each stored."""
    for w, lins in linears_by_weight(g).items():
        names = [n.name for n in lins]
        if len(names) > 1:
            shown = ", ".join(f"'{x}'" for x in names[:4]) + (", ..." if len(names) > 4 else "")
            g.meta.setdefault("import_warnings", []).append(
                f"weight '{w}' is applied by {len(names)} Linear layers ({shown}): the passes compress it once (on the "
                f"calibration statistics of all its uses) and the artifact stores it once, unless its uses are compressed "
                f"with different settings")  # fmt: skip
