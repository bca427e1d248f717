"""Experts gathered from stacked 3-D weights by the routed expert ids -> one Linear per expert.

transformers' ``batched_mm`` experts (and DBRX-style code) keep the experts as 3-D parameters and apply, to every
routed (token, slot) pair ``s`` with expert id ``i_s``, the slices of the expert: ``sel = W[ids]`` (a ``Gather`` /
``GatherND`` of the constant by indices derived from the router's ``TopK`` / ``ArgMax``), then
``torch.bmm(sel, x[..., None])`` or ``torch.bmm(x[:, None], sel)``, and a per-expert bias ``b[ids]``. No 2-D weight
exists for the passes to compress, and the MoE raiser (moe_onnx.py) finds experts as Linear layers.

This rewrite runs the block's per-slot ops once per expert with that expert's slices (``W[e]`` becomes a Linear
applied to every slot) and selects, slot by slot, the result of the slot's expert:
``y[s] = y_e[s]`` for ``e = i_s`` (a chain of ``Where``). That is exact when every op between the gathered weights
and ``y`` works slot by slot, which is checked op by op: element-wise ops whose gathered-side operands have the
output's rank, products batched over the slot axes, and layout ops (``Transpose``, ``Squeeze`` / ``Unsqueeze``,
``Slice`` / ``Split``) that keep the slot axes in front. Any other op leaves the block as it is. The rewritten block
computes every expert for every slot, so it is only kept where the MoE raiser then raises it to an MoE node
(:func:`raise_.raise_graph` takes the rewrite back otherwise).
"""
from __future__ import annotations

import numpy as np

from ..ir import Generic, Graph, Linear, Node
from .unstack import _BINARY, _UNARY, fresh_name, split_sliced_outputs

_IDX_LAYOUT = {"Reshape", "Flatten", "Squeeze", "Unsqueeze", "Cast", "Identity"}
_FLOAT_TO = {1: np.float32, 10: np.float16, 11: np.float64}  # Cast targets a weight path may take


class _Skip(Exception):
    pass


def _rank(g: Graph, v: str) -> int | None:
    if v in g.constants:
        return g.constants[v].ndim
    val = g.values.get(v)
    return None if val is None or val.shape is None else len(val.shape)


def _ints(g: Graph, n: Node, pos: int, attr: str) -> list[int] | None:
    """An int list given as attribute ``attr`` (older opsets) or as constant input ``pos``."""
    if attr in getattr(n, "attributes", {}):
        return [int(a) for a in np.atleast_1d(n.attributes[attr])]
    if len(n.inputs) > pos and n.inputs[pos]:
        c = g.constants.get(n.inputs[pos])
        return None if c is None else [int(a) for a in np.atleast_1d(c)]
    return None


def _norm(axes: list[int] | None, rank: int) -> list[int] | None:
    if axes is None:
        return None
    out = [a + rank if a < 0 else a for a in axes]
    return out if all(0 <= a < rank for a in out) else None


def _id_values(g: Graph) -> set[str]:
    """The expert-id outputs of every TopK / ArgMax."""
    out = set()
    for n in g.nodes:
        if isinstance(n, Generic) and n.domain == "":
            if n.op_type == "TopK" and len(n.outputs) > 1 and n.outputs[1]:
                out.add(n.outputs[1])
            elif n.op_type == "ArgMax":
                out.add(n.outputs[0])
    return out


def _from_ids(prod: dict[str, Node], ids: set[str], v: str) -> bool:
    for _ in range(8):
        if v in ids:
            return True
        p = prod.get(v)
        if not isinstance(p, Generic) or p.domain != "" or p.op_type not in _IDX_LAYOUT or not p.inputs:
            return False
        v = p.inputs[0]
    return False


def _seed_groups(g: Graph, prod: dict[str, Node]) -> dict[str, list[Generic]]:
    """Gathers of a float constant ``[E, ...]`` (2 or 3 axes, E >= 2) by expert ids, keyed by their indices value."""
    ids = _id_values(g)
    groups: dict[str, list[Generic]] = {}
    if not ids:
        return groups
    for n in g.nodes:
        if not (isinstance(n, Generic) and n.domain == "" and n.op_type in ("Gather", "GatherND") and len(n.inputs) == 2):
            continue
        w = g.constants.get(n.inputs[0])
        if w is None or w.dtype.kind != "f" or w.ndim not in (2, 3) or w.shape[0] < 2 or n.inputs[1] in g.constants:
            continue
        if n.op_type == "Gather" and int(n.attributes.get("axis", 0)) != 0:
            continue
        if n.op_type == "GatherND" and int(n.attributes.get("batch_dims", 0)) != 0:
            continue
        if _from_ids(prod, ids, n.inputs[1]):
            groups.setdefault(n.inputs[1], []).append(n)
    return {k: v for k, v in groups.items() if any(g.constants[s.inputs[0]].ndim == 3 for s in v)}


class _Block:
    """One group of gathers sharing their expert ids: its region, checks and rewrite."""

    def __init__(self, g: Graph, prod: dict[str, Node], cons: dict[str, list[Node]], idx: str, seeds: list[Generic]):
        self.g, self.prod, self.cons, self.idx, self.seeds = g, prod, cons, idx, seeds
        ri = _rank(g, idx)
        if ri is None:
            raise _Skip
        if seeds[0].op_type == "GatherND":
            shape = g.values[idx].shape if idx in g.values else None
            if not shape or shape[-1] != 1 or any(s.op_type != "GatherND" for s in seeds):
                raise _Skip
            ri -= 1
        elif any(s.op_type != "Gather" for s in seeds):
            raise _Skip
        self.r = ri  # slot axes: the leading r axes of every gathered-side value
        if self.r < 1:
            raise _Skip
        self.E = {g.constants[s.inputs[0]].shape[0] for s in seeds}
        if len(self.E) != 1:
            raise _Skip
        self.E = self.E.pop()
        self.uses: dict[int, tuple] = {}  # id(node) -> ("mm", pos, seed, ops) | ("bias", seed)
        self.path: set[int] = {id(s) for s in seeds}  # gathers and the layout ops on a weight's way to its product
        for s in seeds:
            self._follow(s)
        self._region()

    # ---- structure -----------------------------------------------------------------------------------------------
    def _single(self, v: str) -> Node:
        cs = self.cons.get(v, [])
        if len(cs) != 1 or v in self.g.outputs:
            raise _Skip
        return cs[0]

    def _follow(self, seed: Generic) -> None:
        g, r = self.g, self.r
        w = g.constants[seed.inputs[0]]
        v, ops = seed.outputs[0], []
        if w.ndim == 2:  # a per-expert bias b[ids]: added to a product's result
            c = self._single(v)
            if not (isinstance(c, Generic) and c.domain == "" and c.op_type == "Add" and c.inputs.count(v) == 1):
                raise _Skip
            self.uses[id(c)] = ("bias", seed)
            return
        for _ in range(6):
            c = self._single(v)
            if not isinstance(c, Generic) or c.domain != "":
                raise _Skip
            if c.op_type == "Transpose":
                perm = [int(p) for p in c.attributes.get("perm", [])]
                if len(perm) != r + 2 or perm[:r] != list(range(r)):
                    raise _Skip
                ops.append(("T", [p - r for p in perm[r:]]))
            elif c.op_type in ("Cast", "Identity"):
                to = int(c.attributes.get("to", 1)) if c.op_type == "Cast" else None
                if to is not None and to not in _FLOAT_TO:
                    raise _Skip
                ops.append(("C", to))
            elif c.op_type == "MatMul" and len(c.inputs) == 2 and c.inputs.count(v) == 1:
                if id(c) in self.uses:  # both operands gathered
                    raise _Skip
                self.uses[id(c)] = ("mm", c.inputs.index(v), seed, ops)
                return
            else:
                raise _Skip
            self.path.add(id(c))
            v = c.outputs[0]
        raise _Skip

    def _region(self) -> None:
        """R: the uses and every node both downstream of a use and upstream of one; its one exit value."""
        g = self.g
        nodes = {id(n): n for n in g.nodes}
        use_nodes = [nodes[i] for i in self.uses]
        desc: set[int] = set()
        stack = [o for n in use_nodes for o in n.outputs if o]
        while stack:
            v = stack.pop()
            for c in self.cons.get(v, []):
                if id(c) not in desc:
                    desc.add(id(c))
                    stack.extend(o for o in c.outputs if o)
        region = set(self.uses)
        stack = [i for n in use_nodes for i in n.inputs if i]
        while stack:
            v = stack.pop()
            p = self.prod.get(v)
            if p is not None and id(p) in desc and id(p) not in region and id(p) not in self.path:
                region.add(id(p))
                stack.extend(i for i in p.inputs if i)
        self.region = [n for n in g.nodes if id(n) in region]  # graph order: topological
        self.slotted = {o for n in self.region for o in n.outputs if o}  # values with the slot axes in front
        exits, self.shape_reads = [], []
        for n in self.region:
            for o in n.outputs:
                if not o:
                    continue
                outside = [c for c in self.cons.get(o, []) if id(c) not in region]
                shape_only = [c for c in outside if isinstance(c, Generic) and c.op_type == "Shape"]
                self.shape_reads.extend((c, o) for c in shape_only)
                if len(outside) > len(shape_only) or o in g.outputs:
                    exits.append(o)
        if len(exits) != 1:
            raise _Skip
        self.exit = exits[0]
        for n in self.region:
            self._check(n)

    def _check(self, n: Node) -> None:
        """Raise _Skip unless ``n`` computes slot by slot (module docstring)."""
        g, r = self.g, self.r
        if not isinstance(n, Generic) or n.domain != "" or not n.outputs or not n.outputs[0]:
            raise _Skip
        q = _rank(g, n.outputs[0])
        if q is None or q < r:
            raise _Skip
        use = self.uses.get(id(n))
        if use is not None:
            other = [i for i in n.inputs if self.prod.get(i) is None or id(self.prod[i]) not in self.path]
            if use[0] == "mm" and (q != r + 2 or len(other) != 1 or _rank(g, other[0]) != q):
                raise _Skip
            if use[0] == "bias" and (q != r + 1 or len(other) != 1 or _rank(g, other[0]) != q):
                raise _Skip
            return
        op = n.op_type
        slotted_in = [i for i in n.inputs if i in self.slotted]
        if not slotted_in:
            raise _Skip
        if op in _UNARY or op in _BINARY or op in ("Softmax", "LogSoftmax"):
            if op in _UNARY and n.inputs[0] not in self.slotted:
                raise _Skip
            if op == "Clip" and any(i and i not in g.constants for i in n.inputs[1:]):
                raise _Skip
            if any(_rank(g, i) != q for i in slotted_in):
                raise _Skip
            if op in ("Softmax", "LogSoftmax") and _norm([int(n.attributes.get("axis", -1))], q)[0] < r:
                raise _Skip
            return
        if op == "MatMul":
            if q < r + 2 or any(_rank(g, i) != q for i in n.inputs):
                raise _Skip
            return
        if n.inputs[0] not in self.slotted or len(slotted_in) != 1:
            raise _Skip
        qi = _rank(g, n.inputs[0])
        if op in ("Squeeze", "Unsqueeze", "Slice", "Split", "Transpose") and qi is None:
            raise _Skip
        if op == "Squeeze":
            axes = _norm(_ints(g, n, 1, "axes"), qi)
        elif op == "Unsqueeze":
            axes = _norm(_ints(g, n, 1, "axes"), q)
        elif op == "Slice":
            axes = _norm(_ints(g, n, 3, "axes"), qi)
        elif op == "Split":
            axes = _norm([int(n.attributes.get("axis", 0))], qi)
        elif op == "Transpose":
            perm = [int(p) for p in n.attributes.get("perm", [])]
            axes = None if perm[:r] != list(range(r)) else [r]
        else:
            raise _Skip
        if not axes or min(axes) < r:
            raise _Skip

    # ---- rewrite -------------------------------------------------------------------------------------------------
    def rewrite(self, key: str) -> list[Node]:
        """The nodes that replace the region (every expert's copy and the select); the region's nodes, the gathers and
        their weight paths are dropped by the caller (:attr:`dropped`)."""
        g, r = self.g, self.r
        self.names = {n.name for n in g.nodes}
        out: list[Node] = []
        exits: list[str] = []
        self.linears: list[Linear] = []
        first_map: dict[str, str] = {}
        unsq_all: set[str] = set()
        for e in range(self.E):
            m: dict[str, str] = {}
            unsq: dict[str, tuple[str, int]] = {}  # value an emitted Unsqueeze wrote -> (its input, the axis)
            for n in self.region:
                self._emit(n, e, m, unsq, out, key)
            unsq_all |= set(unsq)
            if e == 0:
                first_map = m
            exits.append(m[self.exit])
        for c, o in self.shape_reads:  # a shape is the same for every expert's copy
            c.inputs = [first_map[o] if i == o else i for i in c.inputs]
        q = _rank(g, self.exit)
        ids = self.idx
        if self.seeds[0].op_type == "GatherND":  # indices [S, 1]
            ids = self._new_value(f"{self.idx}.ids", self.idx, g.values[self.idx].shape[:-1])
            out.append(self._node("Squeeze", [self.idx, self._const(f"{self.idx}.axis", np.array([r], np.int64))], [ids]))
        dt = g.constants[ids].dtype if ids in g.constants else np.dtype(_np(g.values[ids].dtype))
        acc = exits[0]
        for e in range(1, self.E):
            hit = self._new_value(f"{self.exit}.is{e}", None, g.values[ids].shape if ids in g.values else None, "bool")
            out.append(self._node("Equal", [ids, self._const(f"{self.exit}.id{e}", np.array(e, dt))], [hit]))
            if q > r:
                wide = self._new_value(f"{self.exit}.is{e}.b", None, None, "bool")
                axes = self._const(f"{self.exit}.axes", np.arange(r, q, dtype=np.int64))
                out.append(self._node("Unsqueeze", [hit, axes], [wide]))
                hit = wide
            y = self.exit if e == self.E - 1 else self._new_value(f"{self.exit}.sel{e}", self.exit, None)
            out.append(self._node("Where", [hit, exits[e], acc], [y]))
            acc = y
        # an Unsqueeze whose Squeeze was cancelled and that nothing else reads (a Linear's output must have only the
        # readers that the bias fold and split_sliced_outputs look for)
        read = {i for n in out for i in n.inputs} | {i for n in g.nodes for i in n.inputs}
        out[:] = [n for n in out if not (n.op == "Unsqueeze" and n.outputs[0] in unsq_all and n.outputs[0] not in read)]
        self._fold_biases(out)
        return out

    @property
    def dropped(self) -> set[int]:
        return {id(n) for n in self.region} | self.path

    def _const(self, base: str, a: np.ndarray) -> str:
        return self.g.add_constant(self.g.unique_name(base), a)

    def _new_value(self, base: str, like: str | None, shape, dtype: str | None = None) -> str:
        name = self.g.unique_name(base)
        v = self.g.values.get(like) if like else None
        self.g.add_value(name, dtype or (v.dtype if v is not None else "float32"), shape if like is None or shape is not None else
                         (v.shape if v is not None else None))  # fmt: skip
        return name

    def _name(self, base: str) -> str:
        return fresh_name(self.g, self.names, base)

    def _node(self, op: str, ins: list[str], outs: list[str], attrs: dict | None = None) -> Generic:
        return Generic(self._name(f"{outs[0]}.{op.lower()}"), ins, outs, {}, op_type=op, attributes=dict(attrs or {}),
                       attr_types={k: ("INTS" if isinstance(v, list) else "INT") for k, v in (attrs or {}).items()})  # fmt: skip

    def _unsqueeze(self, src: str, axis: int, like: str, out: list[Node], unsq: dict) -> str:
        y = self._new_value(f"{like}.u", like, None)
        out.append(self._node("Unsqueeze", [src, self._const(f"{like}.axis", np.array([axis], np.int64))], [y]))
        unsq[y] = (src, axis)
        return y

    def _emit(self, n: Generic, e: int, m: dict[str, str], unsq: dict, out: list[Node], key: str) -> None:
        g, r = self.g, self.r
        mp = lambda v: m.get(v, v)  # noqa: E731
        use = self.uses.get(id(n))
        q = _rank(g, n.outputs[0])
        if use is not None and use[0] == "mm":
            _, pos, seed, ops = use
            mat = self._matrix(seed, e, ops)  # the [rows, cols] operand each slot multiplies by
            u = n.inputs[1 - pos]
            pu = self.prod.get(u)
            lift = None  # u = Unsqueeze(v) making the one-row / one-column matrix of a slot
            if isinstance(pu, Generic) and pu.op_type == "Unsqueeze" and _rank(g, pu.inputs[0]) == q - 1:
                ax = _norm(_ints(g, pu, 1, "axes"), q)
                if ax == [q - 2 if pos == 1 else q - 1]:
                    lift = pu.inputs[0]
            weight = mat.T if pos == 1 else mat  # Linear weights are [out, in]
            if lift is not None:  # Linear(v), then the product's unit axis back
                lin = self._linear(seed, e, [mp(lift)], weight, key)
                ls = g.values[lift].shape if lift in g.values else None
                lin.outputs = [self._new_value(f"{n.outputs[0]}.expert{e}.rows", None, None if ls is None else
                                               (*ls[:-1], weight.shape[0]), g.values[n.outputs[0]].dtype)]  # fmt: skip
                out.append(lin)
                m[n.outputs[0]] = self._unsqueeze(lin.outputs[0], q - 2 if pos == 1 else q - 1, n.outputs[0], out, unsq)
                return
            lin_out = self._new_value(f"{n.outputs[0]}.expert{e}", n.outputs[0], None)
            if pos == 1:  # u [S.., a, K] @ mat [K, N]: a Linear over the last axis
                lin = self._linear(seed, e, [mp(u)], weight, key)
                lin.outputs = [lin_out]
                out.append(lin)
            else:  # mat [N, K] @ u [S.., K, c] = (u^T @ mat^T)^T
                perm = list(range(q - 2)) + [q - 1, q - 2]
                ut = self._new_value(f"{u}.t", u, None)
                out.append(self._node("Transpose", [mp(u)], [ut], {"perm": perm}))
                lin = self._linear(seed, e, [ut], weight, key)
                lin.outputs = [self._new_value(f"{n.outputs[0]}.expert{e}.t", n.outputs[0], None)]
                out.append(lin)
                out.append(self._node("Transpose", [lin.outputs[0]], [lin_out], {"perm": perm}))
            m[n.outputs[0]] = lin_out
            return
        if use is not None:  # y + b[ids]
            seed = use[1]
            b = np.ascontiguousarray(g.constants[seed.inputs[0]][e])
            other = next(i for i in n.inputs if i != seed.outputs[0])
            y = self._new_value(f"{n.outputs[0]}.expert{e}", n.outputs[0], None)
            out.append(self._node("Add", [mp(other), self._const(f"{seed.inputs[0]}.{e}", b)], [y]))
            m[n.outputs[0]] = y
            return
        if n.op_type == "Squeeze" and mp(n.inputs[0]) in unsq:  # Squeeze(Unsqueeze(v)) on the same axis: v
            src, axis = unsq[mp(n.inputs[0])]
            if _norm(_ints(g, n, 1, "axes"), q + 1) == [axis]:
                m[n.outputs[0]] = src
                return
        outs = []
        for o in n.outputs:
            outs.append(self._new_value(f"{o}.expert{e}", o, None) if o else "")
            if o:
                m[o] = outs[-1]
        c = Generic(self._name(f"{n.name}.expert{e}"), [mp(i) if i else i for i in n.inputs], outs, dict(n.meta),
                    op_type=n.op_type, domain=n.domain, attributes=dict(n.attributes), attr_types=dict(n.attr_types))  # fmt: skip
        out.append(c)

    def _matrix(self, seed: Generic, e: int, ops: list) -> np.ndarray:
        a = self.g.constants[seed.inputs[0]][e]
        for kind, arg in ops:
            if kind == "T":
                a = np.transpose(a, arg)
            elif arg is not None:
                a = a.astype(_FLOAT_TO[arg])
        return np.ascontiguousarray(a)

    def _linear(self, seed: Generic, e: int, ins: list[str], weight: np.ndarray, key: str) -> Linear:
        wname = seed.inputs[0]
        module = seed.meta.get("module", "")
        base = wname if "." in wname and "/" not in wname and "::" not in wname else (f"{module}.{wname}" if module else wname)
        lin = Linear(self._name(f"{base}.{e}"), ins, [], dict(seed.meta), weight=np.ascontiguousarray(weight))
        lin.meta.pop("onnx_name", None)
        lin.meta["weight_name"] = f"{wname}[{e}]"
        lin.meta["module"] = f"{base}.{e}"  # named after the stacked parameter: gate_up_proj.0, gate_up_proj.1, ...
        lin.meta["ungathered"] = key
        lin.meta["ungathered_expert"] = (wname.rpartition(".")[0] if "." in base and base == wname else module or base, e)
        self.linears.append(lin)
        return lin

    def _fold_biases(self, out: list[Node]) -> None:
        """``Add(linear(x), b_e)`` where nothing else reads the Linear's output: the Linear's bias."""
        readers: dict[str, int] = {}
        for n in out:
            for i in n.inputs:
                readers[i] = readers.get(i, 0) + 1
        made = {lin.outputs[0]: lin for lin in self.linears}
        drop = set()
        for n in out:
            if not (isinstance(n, Generic) and n.op_type == "Add" and len(n.inputs) == 2):
                continue
            a, c = n.inputs
            lin, b = made.get(a), self.g.constants.get(c)
            if lin is None or b is None or readers.get(a) != 1 or b.shape != (lin.out_features,) or lin.bias is not None:
                continue
            lin.bias = b.astype(lin.weight.data.dtype)
            lin.outputs = list(n.outputs)
            drop.add(id(n))
        out[:] = [n for n in out if id(n) not in drop]


def _np(dtype: str):
    return {"int64": np.int64, "int32": np.int32, "int16": np.int16, "int8": np.int8, "uint8": np.uint8}.get(dtype, np.int64)


def gathered_expert_blocks(g: Graph) -> bool:
    """Whether the graph gathers slices of a stacked weight by routed expert ids (before any check)."""
    return bool(_seed_groups(g, g.producers()))


def ungather_experts(g: Graph, skip: set[str] | None = None) -> dict[str, str]:
    """Rewrite every block of experts gathered from stacked weights (module docstring), except the blocks keyed in
    ``skip``. Returns {block key: its description} of the blocks rewritten; their Linears carry
    ``meta["ungathered"] = key``."""
    prod = g.producers()
    groups = _seed_groups(g, prod)
    if not groups:
        return {}
    cons = g.consumers()
    done: dict[str, str] = {}
    drop: set[int] = set()
    new: list[Node] = []
    for idx, seeds in groups.items():
        if skip and idx in skip:
            continue
        try:
            block = _Block(g, prod, cons, idx, seeds)
        except _Skip:
            continue
        new.extend(block.rewrite(idx))
        drop |= block.dropped
        mods = sorted({s.meta.get("module", "") for s in seeds} - {""})
        done[idx] = (mods[0] if mods else seeds[0].name) + f" ({block.E} experts, {', '.join(s.inputs[0] for s in seeds)})"
        lins = block.linears
        g.nodes = [n for n in g.nodes if id(n) not in drop] + new
        new, drop = [], set()
        g.toposort()
        split_sliced_outputs(g, lins)  # fused gate_up_proj -> gate and up
        prod, cons = g.producers(), g.consumers()
    if done:
        from .raise_ import remove_dead

        remove_dead(g)
    return done


def name_raised_experts(g: Graph) -> None:
    """The Linears this rewrite made, once inside a raised MoE node: named by role, ``<experts>.<e>.gate_proj`` /
    ``up_proj`` / ``down_proj`` (``<experts>``: the stacked parameters' module), whatever the exporter called the
    stacked weight (the dynamo exporter's ``val_41``); ``weight_name`` keeps the slice of the stacked weight."""
    from ..ir import MoE

    for n in g.nodes:
        if not isinstance(n, MoE):
            continue
        for ex in n.experts:
            for role, lin in (("gate_proj", ex.gate), ("up_proj", ex.up), ("down_proj", ex.down)):
                if lin is not None and "ungathered_expert" in lin.meta:
                    base, e = lin.meta.pop("ungathered_expert")
                    lin.name = lin.meta["module"] = f"{base}.{e}.{role}"
