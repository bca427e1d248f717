"""Stacked expert weights -> one Linear per expert.

MoE code that keeps its experts as 3-D parameters (``w1 [E, D, F]`` used with ``torch.bmm`` / ``einsum``, as fused
expert implementations do) exports as a batched ``MatMul(h [E, T, D], W [E, D, F])`` or
``Einsum("etd,edf->etf", h, W)`` with a constant ``W``. No 2-D weight exists for the passes to compress, and the MoE
raiser (moe_onnx.py) finds experts as Linear layers. This rewrite splits each such product into E Linear layers
``h[e] @ W[e]`` whose outputs are stacked back (``Unsqueeze`` + ``Concat`` on axis 0): the graph computes the same.

Then the element-wise ops between two stacked products (``silu(g) * u`` on ``[E, T, F]``) are split per expert too
(:func:`_take`): ``(a * b)[e] = a[e] * b[e]``, ``concat(y_0..y_E-1)[e] = y_e``. So expert e's gate / up Linear
reach only its own down Linear, and the raiser sees E separate expert MLPs. Where an op cannot be split (it mixes
experts, or broadcasts along the expert axis) the expert's slice is a plain ``Gather``: the graph stays exact, the
raiser then decides.
"""
from __future__ import annotations

import re

import numpy as np

from ..ir import Generic, Graph, Linear, Node

_UNARY = {"Sigmoid", "Relu", "Tanh", "Erf", "Neg", "Exp", "Softplus", "Gelu", "Identity", "Cast", "Sqrt", "Abs", "Silu",
          "HardSigmoid", "HardSwish", "LeakyRelu", "Elu", "Selu", "Softsign", "Mish"}  # fmt: skip
_BINARY = {"Mul", "Add", "Sub", "Div", "Pow", "Max", "Min"}


def _einsum_weight(eq: str, w: np.ndarray) -> np.ndarray | None:
    """For ``Einsum(eq, h, W)`` that is a per-leading-index matmul (``etd,edf->etf``, ``etd,efd->etf``, any letters,
    any number of token axes), ``W`` as ``[E, K, N]`` (input K, output N); None for any other equation."""
    m = re.fullmatch(r"\s*([a-z]+)\s*,\s*([a-z]+)\s*->\s*([a-z]+)\s*", eq.replace("...", ""))
    if not m or "..." in eq:
        return None
    a, b, o = m.groups()
    if len(b) != 3 or len(a) < 2 or len(set(a)) != len(a) or len(set(b)) != 3 or len(set(o)) != len(o):
        return None
    e, k = a[0], a[-1]
    if b[0] != e or o[0] != e or k not in b or k in o:
        return None
    n = next(c for c in b[1:] if c != k)
    if n in a or o != a[:-1] + n:
        return None
    return w if b[1] == k else np.swapaxes(w, 1, 2)


def _stacked_weight(g: Graph, prod: dict[str, Node], n: Node) -> np.ndarray | None:
    if not isinstance(n, Generic) or n.domain != "" or len(n.inputs) != 2:
        return None
    h, wname = n.inputs
    w = g.constants.get(wname)
    if w is None or h in g.constants or w.ndim != 3 or w.shape[0] < 2 or w.dtype.kind != "f":
        return None
    hv = g.values.get(h)
    if hv is None or hv.shape is None or len(hv.shape) < 2:
        return None
    if hv.shape[0] != w.shape[0] and not (n.op_type == "MatMul" and len(hv.shape) == 2) and _broadcast_source(g, prod, h) is None:
        return None  # the activations' leading axis must be the experts' (a static E, or x broadcast to E copies)
    if n.op_type == "MatMul":
        return w
    if n.op_type == "Einsum":
        return _einsum_weight(str(n.attributes.get("equation", "")), w)
    return None


def _broadcast_source(g: Graph, prod: dict[str, Node], value: str) -> str | None:
    """``x`` when ``value`` is ``Expand(Unsqueeze(x, axes=[0]), ...)`` (every expert's slice is ``x``), else None.
    ``prod``: value -> the node writing it."""
    ex = prod.get(value)
    if not (isinstance(ex, Generic) and ex.op_type == "Expand" and ex.domain == ""):
        return None
    un = prod.get(ex.inputs[0])
    if not (isinstance(un, Generic) and un.op_type == "Unsqueeze" and un.domain == ""):
        return None
    axes = un.attributes.get("axes")
    if axes is None and len(un.inputs) > 1:
        axes = g.constants.get(un.inputs[1])
    if axes is None or [int(a) for a in np.atleast_1d(axes)] != [0]:
        return None
    return un.inputs[0]


class _Splitter:
    def __init__(self, g: Graph):
        self.g = g
        self.prod = {o: n for n in g.nodes for o in n.outputs if o}
        self.parts: dict[str, list[str]] = {}  # stacked value -> its per-expert values
        self.memo: dict[tuple[str, int], str] = {}
        self.new: dict[int, list[Node]] = {}  # index of the node replaced -> the nodes that replace it

    def value(self, base: str, like: str | None, shape) -> str:
        name = self.g.unique_name(base)
        dt = self.g.values[like].dtype if like and like in self.g.values else "float32"
        self.g.add_value(name, dt, shape)
        return name

    def const(self, base: str, a: np.ndarray) -> str:
        return self.g.add_constant(self.g.unique_name(base), a)

    def take(self, value: str, e: int, out: list[Node]) -> str:
        """A value equal to ``value[e]`` (axis 0), split through element-wise ops where possible."""
        key = (value, e)
        if key in self.memo:
            return self.memo[key]
        v = self.g.values.get(value)
        shape = v.shape if v is not None else None
        res = None
        if value in self.parts:
            res = self.parts[value][e]
        elif (src := _broadcast_source(self.g, self.prod, value)) is not None:
            res = src
        else:
            n = self.prod.get(value)
            if isinstance(n, Generic) and n.domain == "" and len(n.outputs) == 1 and shape is not None:
                if n.op_type in _UNARY and n.inputs and self._stacked_like(n.inputs[0], shape):
                    ins = [self.take(n.inputs[0], e, out), *n.inputs[1:]]
                    res = self._op(n, ins, shape, out)
                elif n.op_type in _BINARY and len(n.inputs) == 2:
                    ins = []
                    for i in n.inputs:
                        if self._stacked_like(i, shape):
                            ins.append(self.take(i, e, out))
                        elif self._trailing(i, shape):
                            ins.append(i)  # broadcast over the expert axis from the trailing dims: same for every e
                        else:
                            ins = None
                            break
                    if ins is not None:
                        res = self._op(n, ins, shape, out)
        if res is None:  # the expert's slice, taken as it is
            idx = self.const(f"{value}.expert{e}", np.array(e, dtype=np.int64))
            res = self.value(f"{value}.expert{e}", value, None if shape is None else shape[1:])
            out.append(Generic(self.g.unique_name(f"{value}.gather{e}"), [value, idx], [res], {}, op_type="Gather",
                               attributes={"axis": 0}, attr_types={"axis": "INT"}))  # fmt: skip
        self.memo[key] = res
        return res

    def _stacked_like(self, name: str, shape) -> bool:
        """``name`` has ``shape``'s rank and the experts on axis 0: a stacked product, a static leading E, or an
        element-wise op of such values (leading dims the exporter left unknown)."""
        s = self.g.values[name].shape if name in self.g.values else None
        if s is None or len(s) != len(shape):
            return False
        if name in self.parts or (isinstance(s[0], int) and s[0] == shape[0] and isinstance(shape[0], int)):
            return True
        n = self.prod.get(name)
        if not (isinstance(n, Generic) and n.domain == "" and len(n.outputs) == 1):
            return False
        if n.op_type in _UNARY and n.inputs:
            return self._stacked_like(n.inputs[0], s)
        if n.op_type in _BINARY and len(n.inputs) == 2:
            flags = [self._stacked_like(i, s) for i in n.inputs]
            return any(flags) and all(f or self._trailing(i, s) for f, i in zip(flags, n.inputs))
        return False

    def _trailing(self, name: str, shape) -> bool:
        s = self.g.values[name].shape if name in self.g.values else None
        return s is not None and len(s) < len(shape)  # numpy broadcasting: a lower rank never spans the expert axis

    def _op(self, n: Generic, ins: list[str], shape, out: list[Node]) -> str:
        res = self.value(f"{n.outputs[0]}.e", n.outputs[0], shape[1:])
        out.append(Generic(self.g.unique_name(f"{n.name}.e"), ins, [res], dict(n.meta), op_type=n.op_type,
                           attributes=dict(n.attributes), attr_types=dict(n.attr_types)))  # fmt: skip
        return res

    def split(self, idx: int, n: Generic, w: np.ndarray) -> None:
        h, y = n.inputs[0], n.outputs[0]
        hv, yv = self.g.values[h], self.g.values.get(y)
        out: list[Node] = []
        ys, stacked = [], []
        opset = int(self.g.opset.get("", 17))
        bcast = n.op_type == "MatMul" and hv.shape is not None and len(hv.shape) == 2  # x [T, K] @ W [E, K, N]
        for e in range(w.shape[0]):
            he = h if bcast else self.take(h, e, out)
            ye = self.value(f"{y}.expert{e}", y, None if yv is None or yv.shape is None else yv.shape[1:])
            lin = Linear(self.g.unique_name(f"{n.name}.expert{e}"), [he], [ye], dict(n.meta),
                         weight=np.ascontiguousarray(w[e].T))  # fmt: skip
            lin.meta["weight_name"] = f"{n.inputs[1]}[{e}]"
            lin.meta["module"] = f"{n.inputs[1]}.{e}"  # named after the stacked parameter: w1.0, w1.1, ...
            out.append(lin)
            ys.append(ye)
            u = self.value(f"{y}.expert{e}.stacked", y, None if yv is None or yv.shape is None else (1, *yv.shape[1:]))
            if opset >= 13:
                axes = self.const(f"{y}.axes", np.array([0], dtype=np.int64))
                out.append(Generic(self.g.unique_name(f"{n.name}.unsqueeze{e}"), [ye, axes], [u], {}, op_type="Unsqueeze"))
            else:
                out.append(Generic(self.g.unique_name(f"{n.name}.unsqueeze{e}"), [ye], [u], {}, op_type="Unsqueeze",
                                   attributes={"axes": [0]}, attr_types={"axes": "INTS"}))  # fmt: skip
            stacked.append(u)
        out.append(Generic(n.name, stacked, [y], dict(n.meta), op_type="Concat", attributes={"axis": 0}, attr_types={"axis": "INT"}))
        self.parts[y] = ys
        self.new[idx] = out


def unstack_expert_matmuls(g: Graph) -> int:
    """Split every batched product with a constant stacked weight into one Linear per expert (module docstring).
    Returns how many products were split."""
    sp = _Splitter(g)
    for i, n in enumerate(list(g.nodes)):
        w = _stacked_weight(g, sp.prod, n)
        if w is not None:
            sp.split(i, n, w)
    if not sp.new:
        return 0
    nodes: list[Node] = []
    for i, n in enumerate(g.nodes):
        nodes.extend(sp.new.get(i, [n]))
    g.nodes = nodes
    g.toposort()
    return len(sp.new)
