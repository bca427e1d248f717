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
          "HardSigmoid", "HardSwish", "LeakyRelu", "Elu", "Selu", "Softsign", "Mish", "Clip"}  # fmt: skip
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


def _stacked_weight(g: Graph, prod: dict[str, Node], n: Node, sp: "_Splitter | None" = None) -> np.ndarray | None:
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
        # the activations' leading axis must be the experts' (a static E, x broadcast to E copies, or element-wise ops
        # and feature slices of an earlier stacked product of as many experts)
        if sp is None or not sp.stacked_input(h, w.shape[0]):
            return None
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


def fresh_name(g: Graph, names: set[str], base: str) -> str:
    """A node name taken neither by ``names`` (the nodes made so far, not in ``g.nodes`` yet) nor by a value of ``g``;
    added to ``names``."""
    name, i = base, 1
    while name in names or name in g.values:
        name, i = f"{base}_{i}", i + 1
    names.add(name)
    return name


class _Splitter:
    def __init__(self, g: Graph):
        self.g = g
        self.prod = {o: n for n in g.nodes for o in n.outputs if o}
        self.users: dict[str, list[Node]] = {}  # value -> the nodes reading it (g.nodes stays as it is until the end)
        for n in g.nodes:
            for i in dict.fromkeys(n.inputs):
                self.users.setdefault(i, []).append(n)
        self.parts: dict[str, list[str]] = {}  # stacked value -> its per-expert values
        self.memo: dict[tuple[str, int], str] = {}
        self.new: dict[int, list[Node]] = {}  # index of the node replaced -> the nodes that replace it
        self.names = {n.name for n in g.nodes}  # node names taken, including the new nodes not in g.nodes yet
        self.E = 0  # experts of the product being split
        self.skip: set[int] = set()  # ids of nodes folded into the new ones (bias Adds)
        self.linears: list[Linear] = []

    def node_name(self, base: str) -> str:
        return fresh_name(self.g, self.names, base)

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
        c = self.g.constants.get(value)
        if value in self.parts:
            res = self.parts[value][e]
        elif c is not None and c.ndim >= 1 and c.shape[0] in (1, self.E):
            res = self.const(f"{value}.expert{e}", np.ascontiguousarray(c[0 if c.shape[0] == 1 else e]))  # a bias [E, 1, N]
        elif (src := _broadcast_source(self.g, self.prod, value)) is not None:
            res = src
        else:
            n = self.prod.get(value)
            if isinstance(n, Generic) and n.domain == "" and n.op_type in ("Slice", "Split") and shape is not None:
                res = self._slice(n, value, e, out)
            elif isinstance(n, Generic) and n.domain == "" and len(n.outputs) == 1 and shape is not None:
                if n.op_type in _UNARY and n.inputs and self._stacked_like(n.inputs[0], shape):
                    ins = [self.take(n.inputs[0], e, out), *n.inputs[1:]]
                    res = self._op(n, ins, shape, e, out)
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
                        res = self._op(n, ins, shape, e, out)
        if res is None:  # the expert's slice, taken as it is
            idx = self.const(f"{value}.expert{e}", np.array(e, dtype=np.int64))
            res = self.value(f"{value}.expert{e}", value, None if shape is None else shape[1:])
            out.append(Generic(self.node_name(f"{value}.gather{e}"), [value, idx], [res], {}, op_type="Gather",
                               attributes={"axis": 0}, attr_types={"axis": "INT"}))  # fmt: skip
        self.memo[key] = res
        return res

    def stacked_input(self, name: str, experts: int) -> bool:
        v = self.g.values.get(name)
        if v is None or v.shape is None:
            return False
        e, self.E = self.E, experts
        try:
            return self._stacked_like(name, v.shape) and self._reaches_parts(name, experts)
        finally:
            self.E = e

    def _reaches_parts(self, name: str, experts: int, depth: int = 0) -> bool:
        """Some input upstream through element-wise ops / slices is a split product of ``experts`` experts."""
        if name in self.parts:
            return len(self.parts[name]) == experts
        n = self.prod.get(name)
        if depth > 16 or not isinstance(n, Generic) or n.op_type not in _UNARY | _BINARY | {"Slice", "Split"}:
            return False
        return any(self._reaches_parts(i, experts, depth + 1) for i in n.inputs[: 1 if n.op_type not in _BINARY else 2] if i)

    def _stacked_like(self, name: str, shape) -> bool:
        """``name`` has ``shape``'s rank and the experts on axis 0: a stacked product, a static leading E, or an
        element-wise op of such values (leading dims the exporter left unknown)."""
        s = self.g.values[name].shape if name in self.g.values else None
        if s is None or len(s) != len(shape):
            return False
        if name in self.parts or (isinstance(s[0], int) and s[0] == shape[0] and isinstance(shape[0], int)):
            return True
        c = self.g.constants.get(name)
        if c is not None:
            return c.ndim == len(shape) and c.shape[0] in (1, self.E) and self.E > 1  # a per-expert (or shared) constant
        n = self.prod.get(name)
        if isinstance(n, Generic) and n.domain == "" and n.op_type in ("Slice", "Split") and n.inputs:
            d = self.g.values[n.inputs[0]].shape if n.inputs[0] in self.g.values else None
            return d is not None and len(d) == len(s) and self._slice_axes(n, len(d)) is not None and self._stacked_like(n.inputs[0], d)
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

    def _slice_axes(self, n: Generic, rank: int) -> list[int] | None:
        """The axes a ``Slice`` / ``Split`` cuts, normalized; None when they are not constant or include the experts'
        axis 0 (then the op mixes experts)."""
        if n.op_type == "Split":
            axes = [int(n.attributes.get("axis", 0))]
        else:
            sp = _slice_params(self.g.constants, n)
            if sp is None:
                return None
            axes = [int(a) for a in sp[2]]
        axes = [a + rank if a < 0 else a for a in axes]
        return None if any(a <= 0 or a >= rank for a in axes) else axes

    def _slice(self, n: Generic, value: str, e: int, out: list[Node]) -> str | None:
        """``Slice`` / ``Split`` along non-expert axes of a stacked value: the same op on expert e's slice (axes - 1).
        A ``Split`` is split once per expert for all its outputs."""
        d = self.g.values[n.inputs[0]].shape if n.inputs[0] in self.g.values else None
        axes = None if d is None else self._slice_axes(n, len(d))
        if axes is None or not self._stacked_like(n.inputs[0], d):
            return None
        src = self.take(n.inputs[0], e, out)
        attrs, types, ins = dict(n.attributes), dict(n.attr_types), [src, *n.inputs[1:]]
        if n.op_type == "Split":
            attrs["axis"] = axes[0] - 1
            types.setdefault("axis", "INT")
        else:
            ins = [src, n.inputs[1], n.inputs[2], self.const(f"{n.name}.axes", np.array([a - 1 for a in axes], dtype=np.int64)),
                   *n.inputs[4:]]  # fmt: skip
        outs = []
        for o in n.outputs:
            ov = self.g.values.get(o)
            outs.append(self.value(f"{o}.e", o, None if ov is None or ov.shape is None else ov.shape[1:]) if o else "")
        out.append(Generic(self.node_name(f"{n.name}.e{e}"), ins, outs, dict(n.meta), op_type=n.op_type, attributes=attrs,
                           attr_types=types))  # fmt: skip
        for o, r in zip(n.outputs, outs):
            if o:
                self.memo[(o, e)] = r
        return self.memo[(value, e)]

    def _op(self, n: Generic, ins: list[str], shape, e: int, out: list[Node]) -> str:
        res = self.value(f"{n.outputs[0]}.e", n.outputs[0], shape[1:])
        out.append(Generic(self.node_name(f"{n.name}.e{e}"), ins, [res], dict(n.meta), op_type=n.op_type,
                           attributes=dict(n.attributes), attr_types=dict(n.attr_types)))  # fmt: skip
        return res

    def _bias(self, y: str, experts: int, n_out: int) -> tuple[Node, np.ndarray] | None:
        """(the Add, bias [E, N]) when the product ``y`` is only read by an ``Add`` of a constant bias: per expert
        (``[E, 1, N]``, ``b[:, None, :]``) or shared (``[N]``, ``[1, 1, N]``)."""
        yv = self.g.values.get(y)
        users = self.users.get(y, [])
        if len(users) != 1 or y in self.g.outputs or yv is None or yv.shape is None:
            return None
        add = users[0]
        if not (isinstance(add, Generic) and add.op_type == "Add" and add.domain == "" and len(add.inputs) == 2):
            return None
        c = self.g.constants.get(add.inputs[1] if add.inputs[0] == y else add.inputs[0])
        rank = len(yv.shape)
        if c is None or c.dtype.kind != "f" or c.ndim > rank or c.ndim < 1 or c.shape[-1] != n_out:
            return None
        if c.ndim == rank and c.shape[0] == experts and all(d == 1 for d in c.shape[1:-1]):
            return add, c.reshape(experts, n_out)
        if all(d == 1 for d in c.shape[:-1]):
            return add, np.broadcast_to(c.reshape(1, n_out), (experts, n_out))
        return None

    def split(self, idx: int, n: Generic, w: np.ndarray) -> None:
        self.E = w.shape[0]
        h, y = n.inputs[0], n.outputs[0]
        hv, yv = self.g.values[h], self.g.values.get(y)
        out: list[Node] = []
        ys, stacked = [], []
        opset = int(self.g.opset.get("", 17))
        bcast = n.op_type == "MatMul" and hv.shape is not None and len(hv.shape) == 2  # x [T, K] @ W [E, K, N]
        bias = self._bias(y, w.shape[0], w.shape[2])
        if bias is not None:  # the Add of a per-expert bias [E, 1, N] is the Linears' bias; the Concat writes its output
            add, bias = bias
            self.skip.add(id(add))
            y = add.outputs[0]
            yv = self.g.values.get(y, yv)
        for e in range(w.shape[0]):
            he = h if bcast else self.take(h, e, out)
            ye = self.value(f"{y}.expert{e}", y, None if yv is None or yv.shape is None else yv.shape[1:])
            lin = Linear(self.node_name(f"{n.name}.expert{e}"), [he], [ye], dict(n.meta), weight=np.ascontiguousarray(w[e].T),
                         bias=None if bias is None else bias[e].astype(w.dtype))  # fmt: skip
            lin.meta["weight_name"] = f"{n.inputs[1]}[{e}]"
            lin.meta["module"] = f"{n.inputs[1]}.{e}"  # named after the stacked parameter: w1.0, w1.1, ...
            out.append(lin)
            self.linears.append(lin)
            ys.append(ye)
            u = self.value(f"{y}.expert{e}.stacked", y, None if yv is None or yv.shape is None else (1, *yv.shape[1:]))
            if opset >= 13:
                axes = self.const(f"{y}.axes", np.array([0], dtype=np.int64))
                out.append(Generic(self.node_name(f"{n.name}.unsqueeze{e}"), [ye, axes], [u], {}, op_type="Unsqueeze"))
            else:
                out.append(Generic(self.node_name(f"{n.name}.unsqueeze{e}"), [ye], [u], {}, op_type="Unsqueeze",
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
        w = _stacked_weight(g, sp.prod, n, sp)
        if w is not None:
            sp.split(i, n, w)
    if not sp.new:
        return 0
    nodes: list[Node] = []
    for i, n in enumerate(g.nodes):
        nodes.extend(sp.new.get(i, [] if id(n) in sp.skip else [n]))
    g.nodes = nodes
    g.toposort()
    from .raise_ import remove_dead

    remove_dead(g)  # the stacked outputs nobody reads any more (their per-expert parts are read instead)
    split_sliced_outputs(g, sp.linears)
    return len(sp.new)


def _slice_params(cst: dict[str, np.ndarray], n: Node):
    """A ``Slice``'s (starts, ends, axes, steps) as 1-D arrays (the ONNX defaults where absent); None when one of them
    is not a constant."""
    if len(n.inputs) < 3 or any(i and i not in cst for i in n.inputs[1:]):
        return None
    starts, ends = np.atleast_1d(cst[n.inputs[1]]), np.atleast_1d(cst[n.inputs[2]])
    axes = np.atleast_1d(cst[n.inputs[3]]) if len(n.inputs) > 3 and n.inputs[3] else np.arange(starts.size)
    steps = np.atleast_1d(cst[n.inputs[4]]) if len(n.inputs) > 4 and n.inputs[4] else np.ones(starts.size, np.int64)
    return starts, ends, axes, steps


def _slice_rows(g: Graph, n: Node, rank: int, n_out: int) -> list[np.ndarray] | None:
    """The output features each output of ``n`` keeps when ``n`` is a ``Slice`` / ``Split`` of a ``[..., n_out]``
    value along its last axis only (constant parameters); None otherwise."""
    if not (isinstance(n, Generic) and n.domain == "" and n.op_type in ("Slice", "Split") and n.inputs):
        return None
    cst = g.constants
    if n.op_type == "Slice":
        sp = _slice_params(cst, n)
        if sp is None:
            return None
        starts, ends, axes, steps = sp
        if starts.size != 1 or int(axes[0]) not in (-1, rank - 1) or int(steps[0]) == 0:
            return None
        return [np.arange(n_out)[slice(int(starts[0]), int(ends[0]), int(steps[0]))]]
    if int(n.attributes.get("axis", 0)) not in (-1, rank - 1):
        return None
    k = len(n.outputs)
    if len(n.inputs) > 1 and n.inputs[1]:
        if n.inputs[1] not in cst:
            return None
        sizes = [int(v) for v in np.atleast_1d(cst[n.inputs[1]])]
    elif "split" in n.attributes:
        sizes = [int(v) for v in n.attributes["split"]]
    else:  # equal parts; opset 18's num_outputs: ceil(n / k) each, the last one smaller
        size = -(-n_out // k) if "num_outputs" in n.attributes else n_out // k
        sizes = [size] * (k - 1) + [n_out - size * (k - 1)]
    if len(sizes) != k or sum(sizes) != n_out or min(sizes) < 0:
        return None
    b = np.cumsum([0, *sizes])
    return [np.arange(b[i], b[i + 1]) for i in range(k)]


def split_sliced_outputs(g: Graph, linears: list[Linear]) -> int:
    """An expert Linear whose output is only cut into parts along the features (fused ``gate_up_proj [E, D, 2F]``
    followed by ``chunk(2, -1)`` or by ``[..., ::2]`` / ``[..., 1::2]``) becomes one Linear per part, with those rows of
    the weight (and bias): the gate and up projections the MoE raiser and the passes work with. A bias added right
    after the product (a per-expert constant) is folded into the Linear first. Returns how many Linears were split."""
    prod = {o: n for n in g.nodes for o in n.outputs if o}
    users: dict[str, list[Node]] = {}
    for n in g.nodes:
        for i in n.inputs:
            users.setdefault(i, []).append(n)
    drop: set[int] = set()
    done = 0
    for lin in linears:
        if prod.get(lin.outputs[0]) is not lin or lin.weight.kind != "dense":
            continue
        y, bias, add = lin.outputs[0], lin.bias, None
        us = users.get(y, [])
        if len(us) == 1 and isinstance(us[0], Generic) and us[0].op_type == "Add" and us[0].domain == "" and y not in g.outputs:
            other = us[0].inputs[1] if us[0].inputs[0] == y else us[0].inputs[0]
            c = g.constants.get(other)
            yv = g.values.get(y)
            if c is not None and c.dtype.kind == "f" and c.size == lin.out_features and yv is not None and yv.shape is not None \
                    and c.ndim <= len(yv.shape) and all(d == 1 for d in c.shape[:-1]):  # fmt: skip
                add = us[0]
                bias = c.reshape(-1).astype(lin.weight.data.dtype) + (0 if bias is None else bias)
                y = add.outputs[0]
                us = users.get(y, [])
        yv = g.values.get(y)
        if not us or y in g.outputs or yv is None or yv.shape is None:
            continue
        parts = [_slice_rows(g, u, len(yv.shape), lin.out_features) for u in us]
        if any(p is None for p in parts):
            continue
        w = lin.weight.data
        new: list[Node] = []
        for u, rows_per_out in zip(us, parts):
            for o, rows in zip(u.outputs, rows_per_out):
                if not o:
                    continue
                j = len(new)
                part = Linear(g.unique_name(f"{lin.name}.part{j}"), [lin.inputs[0]], [o], dict(lin.meta),
                              weight=np.ascontiguousarray(w[rows]), bias=None if bias is None else bias[rows].copy())  # fmt: skip
                part.meta["module"] = f"{lin.meta.get('module', lin.name)}.part{j}"
                part.meta["weight_name"] = f"{lin.meta.get('weight_name', lin.name)} rows {_describe(rows)}"
                new.append(part)
                g.nodes.append(part)  # (toposorted below)
        drop.update(id(u) for u in us)
        drop.update([id(lin)] + ([id(add)] if add is not None else []))
        done += 1
    if done:
        g.nodes = [n for n in g.nodes if id(n) not in drop]
        g.toposort()
    return done


def _describe(rows: np.ndarray) -> str:
    if rows.size > 1 and np.all(np.diff(rows) == rows[1] - rows[0]):
        return f"{rows[0]}:{rows[-1] + 1}:{rows[1] - rows[0]}"
    return ",".join(str(int(r)) for r in rows[:4]) + (",..." if rows.size > 4 else "")
