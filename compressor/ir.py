"""sparsec's graph IR.

A :class:`Graph` is a list of nodes in topological order over named SSA values. Values carry a dtype and a shape
(ints for static dims, strings for symbolic ones, ``None`` where unknown). Generic nodes keep their ONNX op type,
domain and attributes and read constants (``graph.constants``) by name; *raised* nodes own their parameters:

=========  ==================================================================================================
Linear     ``y = x @ W.T + b``; ``weight`` is a :mod:`formats` value of shape (out, in), ``bias`` optional
Conv       a Linear over the im2col patches of an ONNX Conv (group 1): ``weight`` (out, kernel positions x channels)
LayerNorm  normalization over the last axis with optional scale and bias
RMSNorm    ``x / sqrt(mean(x^2) + eps) * weight``
Embedding  ``table[ids]``
Residual   ``a + b`` of two activations of equal shape (the residual stream)
MoE        router Linear, softmax (or sigmoid) scores, top-k, optional renormalization, expert MLPs
Generic    any other ONNX operator
=========  ==================================================================================================

Passes never modify arrays in place: they assign new arrays / formats, so :meth:`Graph.copy` can share arrays.
"""
from __future__ import annotations

import base64
import copy as _copy
import heapq
import json
import re
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator

import numpy as np

from .errors import IRError, ShapeError
from .formats import Dense, WeightFormat, format_from_spec

GRAPH_SCHEMA = "sparsec.graph/1"

Dim = int | str | None
DTYPES = (
    "float32", "float16", "bfloat16", "float64",
    "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64", "bool", "string",
)  # fmt: skip


def shape_str(shape: tuple[Dim, ...] | None) -> str:
    if shape is None:
        return "?"
    return "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"


@dataclass
class Value:
    name: str
    dtype: str = "float32"
    shape: tuple[Dim, ...] | None = None

    def __str__(self) -> str:
        return f"{self.name}: {self.dtype}{shape_str(self.shape)}"


# ----------------------------------------------------------------------------------------------------------------
# nodes
@dataclass(eq=False)
class Node:
    name: str
    inputs: list[str]
    outputs: list[str]
    meta: dict[str, Any] = field(default_factory=dict)

    op: str = field(default="?", init=False, repr=False)

    # parameters owned by the node (arrays or weight formats), by role; serialized into weights.safetensors
    def params(self) -> dict[str, Any]:
        return {}

    def attrs(self) -> dict[str, Any]:
        """JSON-able attributes of a raised node (generic nodes override)."""
        return {}

    def describe(self) -> str:
        return ""

    def param_count(self) -> int:
        n = 0
        for p in self.params().values():
            if isinstance(p, WeightFormat):
                n += p.shape[0] * p.shape[1]
            elif p is not None:
                n += int(np.asarray(p).size)
        return n

    def nbytes(self) -> int:
        n = 0
        for p in self.params().values():
            if isinstance(p, WeightFormat):
                n += p.nbytes
            elif p is not None:
                n += int(np.asarray(p).nbytes)
        return n

    @property
    def module(self) -> str | None:
        return self.meta.get("module")


@dataclass(eq=False)
class Linear(Node):
    weight: WeightFormat = None  # type: ignore[assignment]
    bias: np.ndarray | None = None

    def __post_init__(self):
        self.op = "Linear"
        if isinstance(self.weight, np.ndarray):
            self.weight = Dense(self.weight)
        if self.bias is not None:
            self.bias = np.asarray(self.bias)
            if self.bias.shape != (self.weight.shape[0],):
                raise IRError(f"bias of shape {self.bias.shape} does not match {self.weight.shape[0]} outputs", node=self.name)

    @property
    def in_features(self) -> int:
        return self.weight.shape[1]

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    def params(self):
        return {"weight": self.weight, "bias": self.bias}

    def describe(self) -> str:
        b = "+b" if self.bias is not None else ""
        return f"{self.in_features}->{self.out_features}{b} {self.weight.describe()}"


def conv_out_size(padded: int, kernel: int, stride: int, dilation: int) -> int:
    """Output positions of a convolution along one dim of ``padded`` (padding included) input positions."""
    return (padded - dilation * (kernel - 1) - 1) // stride + 1


@dataclass(eq=False)
class Conv(Linear):
    """An ONNX ``Conv`` (group 1, 1-3 spatial dims) raised to a Linear over patches: ``weight`` is the 2-D
    ``(out, prod(kernel) * in_channels)`` matrix of the ONNX ``(out, in, *kernel)`` weight with its input axis ordered
    (kernel positions row-major, then channel), so that N:M groups and quantization groups of ``M`` consecutive inputs
    run along the channels of one kernel position, as sparse tensor core convolutions (implicit GEMM, NHWC) read them.
    Passes see a Linear whose inputs are the im2col patches of the (padded) input in that order; the executor, the
    ONNX export and the compiled library run a convolution with the weight reshaped back. ``pads`` are explicit
    ``[begin..., end...]`` (``auto_pad`` is resolved when raising)."""

    kernel_shape: tuple[int, ...] = ()
    strides: tuple[int, ...] = ()
    pads: tuple[int, ...] = ()
    dilations: tuple[int, ...] = ()

    def __post_init__(self):
        super().__post_init__()
        self.op = "Conv"
        nd = len(self.kernel_shape)
        self.kernel_shape = tuple(int(k) for k in self.kernel_shape)
        self.strides = tuple(int(k) for k in (self.strides or (1,) * nd))
        self.pads = tuple(int(k) for k in (self.pads or (0,) * (2 * nd)))
        self.dilations = tuple(int(k) for k in (self.dilations or (1,) * nd))
        if not 1 <= nd <= 3 or len(self.strides) != nd or len(self.dilations) != nd or len(self.pads) != 2 * nd:
            raise IRError(f"conv attributes do not agree: kernel {self.kernel_shape}, strides {self.strides}, pads {self.pads}, "
                          f"dilations {self.dilations}", node=self.name)  # fmt: skip
        if self.weight.shape[1] % self.kernel_size:
            raise IRError(f"conv weight of {self.weight.shape[1]} inputs is not a multiple of the kernel size {self.kernel_size}", node=self.name)

    @property
    def kernel_size(self) -> int:
        return int(np.prod(self.kernel_shape))

    @property
    def in_channels(self) -> int:
        return self.weight.shape[1] // self.kernel_size

    def attrs(self):
        return {"kernel_shape": list(self.kernel_shape), "strides": list(self.strides), "pads": list(self.pads),
                "dilations": list(self.dilations)}  # fmt: skip

    def onnx_attributes(self) -> dict[str, Any]:
        return {**self.attrs(), "group": 1}

    @staticmethod
    def matrix_of(w: np.ndarray) -> np.ndarray:
        """ONNX ``(out, in, *kernel)`` -> ``(out, prod(kernel) * in)`` (kernel positions, then channel)."""
        nd = w.ndim - 2
        return np.ascontiguousarray(np.transpose(w, (0, *range(2, 2 + nd), 1)).reshape(w.shape[0], -1))

    def kernel_of(self, w2):
        """The inverse of :meth:`matrix_of` for this node's kernel, for numpy arrays and torch tensors."""
        nd = len(self.kernel_shape)
        w = w2.reshape(w2.shape[0], *self.kernel_shape, self.in_channels)
        perm = (0, nd + 1, *range(1, nd + 1))
        return np.ascontiguousarray(np.transpose(w, perm)) if isinstance(w, np.ndarray) else w.permute(*perm).contiguous()

    def kernel_weight(self) -> np.ndarray:
        """The ONNX ``(out, in, *kernel)`` weight that this node's (compressed) weight computes."""
        return self.kernel_of(np.asarray(self.weight.materialize()))

    def out_spatial(self, spatial) -> list:
        """Output sizes for the input's spatial sizes (ints; ``None`` stays ``None``)."""
        out = []
        for i, n in enumerate(spatial):
            if not isinstance(n, int):
                out.append(None)
                continue
            padded = n + self.pads[i] + self.pads[i + len(self.kernel_shape)]
            out.append(conv_out_size(padded, self.kernel_shape[i], self.strides[i], self.dilations[i]))
        return out

    def describe(self) -> str:
        b = "+b" if self.bias is not None else ""
        k = "x".join(str(k) for k in self.kernel_shape)
        return f"conv {k} {self.in_channels}->{self.out_features}{b} {self.weight.describe()}"


@dataclass(eq=False)
class LayerNorm(Node):
    weight: np.ndarray | None = None
    bias: np.ndarray | None = None
    eps: float = 1e-5

    def __post_init__(self):
        self.op = "LayerNorm"

    def params(self):
        return {"weight": self.weight, "bias": self.bias}

    def attrs(self):
        return {"eps": float(self.eps)}

    @property
    def dim(self) -> int | None:
        p = self.weight if self.weight is not None else self.bias
        return None if p is None else int(p.shape[-1])

    def describe(self) -> str:
        return f"eps={self.eps:g}" + ("" if self.weight is not None else " no-affine")


@dataclass(eq=False)
class RMSNorm(Node):
    weight: np.ndarray | None = None
    eps: float = 1e-6

    def __post_init__(self):
        self.op = "RMSNorm"

    def params(self):
        return {"weight": self.weight}

    def attrs(self):
        return {"eps": float(self.eps)}

    @property
    def dim(self) -> int | None:
        return None if self.weight is None else int(self.weight.shape[-1])

    def describe(self) -> str:
        return f"eps={self.eps:g}"


@dataclass(eq=False)
class Embedding(Node):
    table: np.ndarray = None  # type: ignore[assignment]

    def __post_init__(self):
        self.op = "Embedding"

    def params(self):
        return {"table": self.table}

    def describe(self) -> str:
        return f"{self.table.shape[0]}x{self.table.shape[1]}"


@dataclass(eq=False)
class Residual(Node):
    def __post_init__(self):
        self.op = "Residual"


ACTIVATIONS = ("silu", "gelu", "gelu_tanh", "relu", "identity")


@dataclass(eq=False)
class Expert:
    """One expert MLP: ``down(act(gate(x)) * up(x))`` (gated) or ``down(act(up(x)))``."""

    up: Linear
    down: Linear
    gate: Linear | None = None
    act: str = "silu"

    def linears(self) -> list[Linear]:
        return [lin for lin in (self.gate, self.up, self.down) if lin is not None]


@dataclass(eq=False)
class MoE(Node):
    """Mixture of experts over the last axis of ``x`` (leading axes are tokens).

    scores = softmax(router(x)) (or sigmoid); the top-k experts per token are selected by score; their weights are
    the selected scores, renormalized to sum to 1 when ``renormalize``; ``y = sum_k w_k * expert_k(x)``.
    ``expert_map`` (after merging) maps each original router output to the index of the expert that serves it;
    router scores of outputs that map to the same expert are summed.
    """

    router: Linear = None  # type: ignore[assignment]
    experts: list[Expert] = field(default_factory=list)
    top_k: int = 2
    renormalize: bool = True
    score: str = "softmax"
    expert_map: list[int] | None = None

    def __post_init__(self):
        self.op = "MoE"

    @property
    def num_routes(self) -> int:
        return self.router.out_features

    def linears(self) -> list[Linear]:
        out = [self.router]
        for e in self.experts:
            out.extend(e.linears())
        return out

    def params(self):
        return {}

    def param_count(self) -> int:
        return sum(lin.param_count() for lin in self.linears())

    def nbytes(self) -> int:
        return sum(lin.nbytes() for lin in self.linears())

    def attrs(self):
        return {
            "top_k": self.top_k,
            "renormalize": self.renormalize,
            "score": self.score,
            "expert_map": self.expert_map,
            "acts": [e.act for e in self.experts],
        }

    def describe(self) -> str:
        m = "" if self.expert_map is None else f" routes={self.num_routes}"
        return f"experts={len(self.experts)} top{self.top_k}{m} {self.score}{' renorm' if self.renormalize else ''}"


@dataclass(eq=False)
class Generic(Node):
    op_type: str = ""
    domain: str = ""
    attributes: dict[str, Any] = field(default_factory=dict)
    attr_types: dict[str, str] = field(default_factory=dict)

    def __post_init__(self):
        self.op = self.op_type

    def attrs(self):
        return self.attributes

    def describe(self) -> str:
        if not self.attributes:
            return ""
        parts = []
        for k, v in sorted(self.attributes.items()):
            if isinstance(v, np.ndarray):
                v = f"tensor{list(v.shape)}" if v.size > 4 else v.tolist()
            parts.append(f"{k}={v}")
        s = " ".join(parts)
        return s if len(s) < 80 else s[:77] + "..."


RAISED_OPS = {"Linear": Linear, "Conv": Conv, "LayerNorm": LayerNorm, "RMSNorm": RMSNorm, "Embedding": Embedding, "Residual": Residual, "MoE": MoE}

_NUMERIC = re.compile(r"^\d+$")


def block_of_module(path: str | None) -> str | None:
    """``model.layers.3.self_attn.q_proj`` -> ``model.layers.3`` (the prefix through the first numeric part)."""
    if not path:
        return None
    parts = path.split(".")
    for i, p in enumerate(parts):
        if _NUMERIC.match(p):
            return ".".join(parts[: i + 1])
    return None


def repeated_sibling_blocks(linear_modules) -> set[str]:
    """Blocks of a model whose module paths have no numeric part (``nn.ModuleDict({"enc": ..., "dec": ...})``,
    ``self.block1`` / ``self.block2``): sibling modules (children of one parent) that hold the same Linear layers
    under the same relative paths, at least two siblings of at least two Linear layers each, at the shallowest parent
    that has them. ``linear_modules``: the Linear layers' module paths. Attention's ``q`` / ``k`` / ``v`` sub-modules
    of one Linear each are not blocks."""
    kids: dict[tuple[str, ...], dict[str, set[tuple[str, ...]]]] = {}
    for m in linear_modules:
        parts = tuple(m.split(".")) if m else ()
        for d in range(len(parts) - 1):
            kids.setdefault(parts[:d], {}).setdefault(parts[d], set()).add(parts[d + 1 :])
    for parent in sorted(kids, key=len):
        by_set: dict[frozenset, list[str]] = {}
        for child, rel in kids[parent].items():
            if len(rel) >= 2:
                by_set.setdefault(frozenset(rel), []).append(child)
        found = {".".join((*parent, c)) for cs in by_set.values() if len(cs) >= 2 for c in cs}
        if found:
            return found
    return set()


def block_resolver(graph: "Graph"):
    """``module path -> block`` for ``graph``: :func:`block_of_module` (numeric parts: ``layers.3``), or, when no
    module path has a numeric part, the enclosing :func:`repeated_sibling_blocks` module."""
    if any(block_of_module(n.module) for n in graph.nodes):
        return block_of_module
    sib = repeated_sibling_blocks(n.module or n.name for n in graph.linears())
    if not sib:
        return block_of_module

    def of(path: str | None) -> str | None:
        if not path:
            return None
        parts = path.split(".")
        for i in range(1, len(parts) + 1):
            if ".".join(parts[:i]) in sib:
                return ".".join(parts[:i])
        return None

    return of


@dataclass
class Block:
    """A contiguous range ``nodes[start:stop]`` of the topologically ordered node list."""

    name: str
    start: int
    stop: int
    kind: str = "block"  # "prologue" | "block" | "epilogue"


# ----------------------------------------------------------------------------------------------------------------
def _same_array(a: np.ndarray, b: np.ndarray) -> bool:
    """The same array, or equal ones (shape, dtype and values): what the artifact stores once."""
    return a is b or (a.shape == b.shape and a.dtype == b.dtype and np.array_equal(a, b))


def _same_weight(a, b) -> bool:
    """Two weight formats hold the same tensors (what the artifact would store once)."""
    if a is b:
        return True
    if a.kind != b.kind or a.shape != b.shape:
        return False
    ta, tb = a.to_tensors("w"), b.to_tensors("w")
    return ta.keys() == tb.keys() and all(_same_array(ta[k], tb[k]) for k in ta)


class Graph:
    def __init__(self, name: str = "model"):
        self.name = name
        self.inputs: list[str] = []
        self.outputs: list[str] = []
        self.values: dict[str, Value] = {}
        self.nodes: list[Node] = []
        self.constants: dict[str, np.ndarray] = {}
        self.opset: dict[str, int] = {"": 17}
        self.meta: dict[str, Any] = {}

    # ---- construction ----------------------------------------------------------------------------------------
    def add_value(self, name: str, dtype: str = "float32", shape: Iterable[Dim] | None = None) -> Value:
        v = Value(name, dtype, None if shape is None else tuple(shape))
        self.values[name] = v
        return v

    def add_constant(self, name: str, array: np.ndarray) -> str:
        a = np.asarray(array)
        self.constants[name] = a
        self.values[name] = Value(name, _np_dtype_name(a.dtype), tuple(int(s) for s in a.shape))
        return name

    def add_node(self, node: Node, index: int | None = None) -> Node:
        if index is None:
            self.nodes.append(node)
        else:
            self.nodes.insert(index, node)
        return node

    def unique_name(self, base: str) -> str:
        taken = {n.name for n in self.nodes} | set(self.values)
        if base not in taken:
            return base
        i = 1
        while f"{base}_{i}" in taken:
            i += 1
        return f"{base}_{i}"

    # ---- queries ---------------------------------------------------------------------------------------------
    def producers(self) -> dict[str, Node]:
        return {o: n for n in self.nodes for o in n.outputs if o}

    def consumers(self) -> dict[str, list[Node]]:
        out: dict[str, list[Node]] = {}
        for n in self.nodes:
            for i in n.inputs:
                if i:
                    out.setdefault(i, []).append(n)
        return out

    def node(self, name: str) -> Node:
        for n in self.nodes:
            if n.name == name:
                return n
        raise KeyError(name)

    def linears(self) -> list[Linear]:
        """Every Linear, in graph order, including MoE routers and expert layers."""
        out: list[Linear] = []
        for n in self.nodes:
            if isinstance(n, Linear):
                out.append(n)
            elif isinstance(n, MoE):
                out.extend(n.linears())
        return out

    def linear(self, name: str) -> Linear:
        for lin in self.linears():
            if lin.name == name:
                return lin
        raise KeyError(f"no Linear layer named {name!r}")

    def moe_of(self, linear_name: str) -> MoE | None:
        for n in self.nodes:
            if isinstance(n, MoE) and any(lin.name == linear_name for lin in n.linears()):
                return n
        return None

    def tied_linears(self) -> set[str]:
        """Linear layers whose dense weight is still their embedding table (``meta["tied_to"]``: tied input / output
        embeddings): stored once, counted once. A compressed or changed head is no longer tied."""
        embs = {n.name: n for n in self.nodes if isinstance(n, Embedding)}
        out = set()
        for n in self.nodes:
            e = embs.get(n.meta.get("tied_to", "")) if isinstance(n, Linear) else None
            if e is not None and n.weight.kind == "dense" and n.bias is None:
                w = n.weight.data
                if _same_array(w, e.table):
                    out.add(n.name)
        return out

    def _later_uses(self) -> dict[str, tuple[Linear, Linear]]:
        """Linear name -> (it, the first Linear of the same source weight), for every use after the first: one
        initializer / parameter applied twice (``meta["weight_name"]``). The artifact stores identical tensors once,
        so the bytes and params count a later use's weight (and bias) only where it differs from the first use's:
        once a pass has compressed the uses differently (:meth:`_counted`)."""
        first: dict[str, Linear] = {}
        out: dict[str, tuple[Linear, Linear]] = {}
        for n in self.nodes:
            key = n.meta.get("weight_name") if isinstance(n, Linear) else None
            if key:
                f = first.setdefault(key, n)
                if f is not n:
                    out[n.name] = (n, f)
        return out

    def stored_with_another(self) -> set[str]:
        """Names of the Linear layers whose weight the artifact, right now, stores with another's: the same tensors
        as the first use of their source weight (counted with it), or a head still tied to its embedding table
        (counted with the table)."""
        return {name for name, (n, f) in self._later_uses().items() if _same_weight(f.weight, n.weight)} | self.tied_linears()

    def _counted(self, nbytes: bool) -> int:
        """Bytes (``nbytes``) or parameters of the nodes' weights, a tied head and the tensors a later use of a weight
        shares with its first use left out."""
        tied, later = self.tied_linears(), self._later_uses()
        total = 0
        tables: list[np.ndarray] = []  # an embedding table read by two nodes (T5 / BART's `shared`): stored once
        for n in self.nodes:
            if n.name in tied:
                continue
            if isinstance(n, Embedding) and n.table is not None:
                t = n.table
                if any(_same_array(t, u) for u in tables):
                    continue
                tables.append(t)
            if n.name not in later:
                total += n.nbytes() if nbytes else n.param_count()
                continue
            _, f = later[n.name]
            if not _same_weight(f.weight, n.weight):
                total += n.weight.nbytes if nbytes else n.weight.shape[0] * n.weight.shape[1]
            if n.bias is not None and not (f.bias is not None and f.bias.shape == n.bias.shape and np.array_equal(f.bias, n.bias)):
                total += int(n.bias.nbytes if nbytes else n.bias.size)
        return total

    def param_count(self) -> int:
        """Weights: every node's (a tied head once, with its embedding; a weight applied twice once) and the float
        constants (not masks, shapes or indices)."""
        return self._counted(nbytes=False) + sum(int(c.size) for c in self.constants.values() if np.asarray(c).dtype.kind == "f")

    def nbytes(self) -> int:
        """Bytes of every weight and constant as stored (a tied head once, a weight applied twice once)."""
        return self._counted(nbytes=True) + sum(int(c.nbytes) for c in self.constants.values())

    def stored_as_bfloat16(self) -> bool:
        """An imported bfloat16 model (computed in float32, frontends.onnx.bfloat16_as_float32) that no pass has
        changed: its source file stores the float tensors in 2 bytes."""
        from .formats import Dense

        return self.meta.get("source_float") == "bfloat16" and all(
            isinstance(n.weight, Dense) for n in self.nodes if isinstance(n, Linear))

    def source_nbytes(self) -> int:
        """:meth:`nbytes` as the source file stores them: a bfloat16 model's float tensors at 2 bytes (what a
        compressed artifact's size is compared with)."""
        if not self.stored_as_bfloat16():
            # weights the file stores as float16 and the model casts to float32 (a mixed-precision export): 2 bytes
            cands = [n for n in self.nodes if isinstance(n, Linear) and n.meta.get("source_dtype") == "float16"
                     and isinstance(n.weight, Dense) and n.weight.data.dtype == np.float32]  # fmt: skip
            biases = [n for n in self.nodes if isinstance(n, Linear) and n.meta.get("source_bias_dtype") == "float16"
                      and n.bias is not None and n.bias.dtype == np.float32]  # fmt: skip
            if not cands and not biases:
                return self.nbytes()
            shared = self.stored_with_another()
            narrow = {id(n.weight): n.weight.nbytes // 2 for n in cands if n.name not in shared}
            narrow.update({id(n.bias): int(n.bias.nbytes) // 2 for n in biases if n.name not in shared})
            return self.nbytes() - sum(narrow.values())
        return 2 * self.param_count() + sum(int(c.nbytes) for c in self.constants.values() if np.asarray(c).dtype.kind != "f")

    def op_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for n in self.nodes:
            counts[n.op] = counts.get(n.op, 0) + 1
        return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))

    # ---- ordering, validation --------------------------------------------------------------------------------
    def toposort(self, key=None) -> None:
        """Reorder nodes topologically; ties are broken by ``key(node)`` then by current position (stable)."""
        prod = {}
        for n in self.nodes:
            for o in n.outputs:
                if o:
                    if o in prod:
                        raise IRError(f"value '{o}' is produced twice (also by '{prod[o].name}')", node=n.name)
                    prod[o] = n
        index = {id(n): i for i, n in enumerate(self.nodes)}
        deps: dict[int, set[int]] = {}
        users: dict[int, list[int]] = {i: [] for i in range(len(self.nodes))}
        for i, n in enumerate(self.nodes):
            d = set()
            for inp in n.inputs:
                p = prod.get(inp)
                if p is not None:
                    d.add(index[id(p)])
            deps[i] = d
            for j in d:
                users[j].append(i)
        prio = [(key(n) if key else 0, i) for i, n in enumerate(self.nodes)]
        ready = [prio[i] for i in range(len(self.nodes)) if not deps[i]]
        heapq.heapify(ready)
        order = []
        remaining = {i: len(deps[i]) for i in deps}
        while ready:
            _, i = heapq.heappop(ready)
            order.append(i)
            for u in users[i]:
                remaining[u] -= 1
                if remaining[u] == 0:
                    heapq.heappush(ready, prio[u])
        if len(order) != len(self.nodes):
            stuck = [self.nodes[i].name for i in range(len(self.nodes)) if remaining[i] > 0]
            raise IRError(f"graph has a cycle through {len(stuck)} nodes", node=stuck[0])
        self.nodes = [self.nodes[i] for i in order]

    def validate(self) -> None:
        """Raise :class:`IRError` naming the node on dangling values, cycles, duplicate names or shape mismatches."""
        names = set()
        for n in self.nodes:
            if not n.name:
                raise IRError("node without a name", node=f"<{n.op}>")
            if n.name in names:
                raise IRError("duplicate node name", node=n.name)
            names.add(n.name)
        defined = set(self.inputs) | set(self.constants)
        produced: dict[str, str] = {}
        for n in self.nodes:
            for o in n.outputs:
                if not o:
                    continue
                if o in produced or o in self.inputs or o in self.constants:
                    raise IRError(f"value '{o}' is defined twice", node=n.name)
                produced[o] = n.name
        all_defined = defined | set(produced)
        for n in self.nodes:
            for i in n.inputs:
                if i and i not in all_defined:
                    raise IRError(f"input '{i}' is not produced by any node, graph input or constant", node=n.name)
        for o in self.outputs:
            if o not in all_defined:
                raise IRError(f"graph output '{o}' is never produced", node=o)
        # order / cycles: every input must be defined before use
        seen = set(defined)
        for idx, n in enumerate(self.nodes):
            for i in n.inputs:
                if i and i not in seen:
                    # either a cycle or out of order: toposort tells which
                    g = Graph.__new__(Graph)
                    g.nodes = list(self.nodes)
                    g.toposort()  # raises on a cycle
                    raise IRError(f"input '{i}' is used before it is produced (nodes out of order)", node=n.name)
            seen.update(o for o in n.outputs if o)
        for n in self.nodes:
            self._check_node_shapes(n)

    def _shape(self, name: str) -> tuple[Dim, ...] | None:
        v = self.values.get(name)
        return None if v is None else v.shape

    def _check_node_shapes(self, n: Node) -> None:
        def last(name):
            s = self._shape(name)
            return None if not s else s[-1]

        if isinstance(n, Conv):
            for v, want, what in ((n.inputs[0], n.in_channels, "input channels"), (n.outputs[0], n.out_features, "output channels")):
                s = self._shape(v)
                if s is not None and (len(s) != len(n.kernel_shape) + 2 or (isinstance(s[1], int) and s[1] != want)):
                    raise ShapeError(f"conv of {want} {what} and a {len(n.kernel_shape)}-d kernel: '{v}' has shape {shape_str(s)}", node=n.name)
        elif isinstance(n, Linear):
            d = last(n.inputs[0])
            if isinstance(d, int) and d != n.in_features:
                raise ShapeError(f"Linear expects input dim {n.in_features}, its input '{n.inputs[0]}' has {d}", node=n.name)
            d = last(n.outputs[0])
            if isinstance(d, int) and d != n.out_features:
                raise ShapeError(f"Linear produces {n.out_features} features, its output value says {d}", node=n.name)
            w = n.weight
            for f in w.walk():
                if tuple(f.shape) != tuple(w.shape) and f is not w and f.kind != "group_quant" and f.kind != "dense":
                    raise ShapeError(f"nested weight format {f.describe()} has shape {f.shape}, expected {w.shape}", node=n.name)
        elif isinstance(n, (LayerNorm, RMSNorm)):
            d = last(n.inputs[0])
            if isinstance(d, int) and n.dim is not None and d != n.dim:
                raise ShapeError(f"{n.op} has {n.dim} channels, its input '{n.inputs[0]}' has {d}", node=n.name)
        elif isinstance(n, Embedding):
            d = last(n.outputs[0])
            if isinstance(d, int) and d != n.table.shape[1]:
                raise ShapeError(f"Embedding table has dim {n.table.shape[1]}, its output says {d}", node=n.name)
        elif isinstance(n, Residual):
            a, b = self._shape(n.inputs[0]), self._shape(n.inputs[1])
            if a is not None and b is not None:
                if len(a) != len(b):
                    raise ShapeError(f"residual inputs have ranks {len(a)} and {len(b)}", node=n.name)
                for x, y in zip(a, b):
                    if isinstance(x, int) and isinstance(y, int) and x != y:
                        raise ShapeError(f"residual inputs have shapes {shape_str(a)} and {shape_str(b)}", node=n.name)
        elif isinstance(n, MoE):
            d = last(n.inputs[0])
            if isinstance(d, int) and d != n.router.in_features:
                raise ShapeError(f"MoE router expects dim {n.router.in_features}, input has {d}", node=n.name)
            nroutes = n.router.out_features
            if n.expert_map is None:
                if nroutes != len(n.experts):
                    raise ShapeError(f"router has {nroutes} outputs for {len(n.experts)} experts", node=n.name)
            else:
                if len(n.expert_map) != nroutes or any(not 0 <= e < len(n.experts) for e in n.expert_map):
                    raise ShapeError("expert_map must map every router output to an existing expert", node=n.name)
            if not 1 <= n.top_k <= nroutes:
                raise ShapeError(f"top_k={n.top_k} is not in 1..{nroutes}", node=n.name)
            for i, e in enumerate(n.experts):
                hid = e.up.out_features
                if e.up.in_features != n.router.in_features or e.down.out_features != n.router.in_features:
                    raise ShapeError(f"expert {i} maps {e.up.in_features}->{e.down.out_features}, expected {n.router.in_features}", node=n.name)
                if e.down.in_features != hid or (e.gate is not None and (e.gate.out_features != hid or e.gate.in_features != e.up.in_features)):
                    raise ShapeError(f"expert {i} hidden dims do not agree", node=n.name)
                if e.act not in ACTIVATIONS:
                    raise ShapeError(f"expert {i} has unknown activation {e.act!r}", node=n.name)

    # ---- blocks ----------------------------------------------------------------------------------------------
    def assign_blocks(self) -> list[Block]:
        """Partition the nodes into a prologue, numbered blocks (``layers.0``, ``layers.1`` ...; named repeated
        siblings where no path is numbered: :func:`block_resolver`), and an epilogue, from the module paths in
        ``node.meta['module']``; reorder nodes so that each block is contiguous."""
        order: dict[str, int] = {}
        keys: dict[int, float] = {}
        prod = self.producers()
        block_of = block_resolver(self)
        for n in self.nodes:
            b = block_of(n.module)
            if b is not None and b not in order:
                order[b] = len(order)
        nblocks = len(order)
        for n in self.nodes:  # nodes are in topological order
            b = block_of(n.module)
            pk = [keys[id(prod[i])] for i in n.inputs if i in prod and id(prod[i]) in keys]
            if b is not None:
                keys[id(n)] = order[b]
            elif n.module:
                keys[id(n)] = -1 if all(k < 0 for k in pk) else nblocks
            else:
                keys[id(n)] = max(pk) if pk else -1
        # a node no block owns never sorts after its readers: an encoder's final norm (module 'enc_final', no block) is
        # read by every decoder block's cross-attention; keyed "epilogue", the toposort put it between the nodes of the
        # first decoder block and split that block in two (its first part run, and its values kept, as a block of its
        # own: slicing rotated a shortcut after its output had been computed)
        cons = self.consumers()
        for n in reversed(self.nodes):
            if block_of(n.module) is None:
                later = [keys[id(c)] for o in n.outputs if o for c in cons.get(o, ())]
                if later and min(later) < keys[id(n)]:
                    keys[id(n)] = min(later)
        self.toposort(key=lambda n: keys[id(n)])
        names = {v: k for k, v in order.items()}
        blocks: list[Block] = []
        i = 0
        while i < len(self.nodes):
            k = keys[id(self.nodes[i])]
            j = i
            while j < len(self.nodes) and keys[id(self.nodes[j])] == k:
                j += 1
            if k < 0:
                blocks.append(Block("prologue", i, j, "prologue"))
            elif k >= nblocks:
                blocks.append(Block("epilogue", i, j, "epilogue"))
            else:
                blocks.append(Block(names[int(k)], i, j, "block"))
            i = j
        if nblocks == 0:
            return [Block(self.name, 0, len(self.nodes), "block")]
        return blocks

    # ---- copying ---------------------------------------------------------------------------------------------
    def copy(self) -> "Graph":
        """A structural copy: new nodes, values and lists; arrays and weight formats are shared (never mutated)."""
        g = Graph(self.name)
        g.inputs = list(self.inputs)
        g.outputs = list(self.outputs)
        g.values = {k: Value(v.name, v.dtype, v.shape) for k, v in self.values.items()}
        g.constants = dict(self.constants)
        g.opset = dict(self.opset)
        g.meta = _copy.deepcopy(self.meta)
        memo: dict[int, Any] = {}
        for n in self.nodes:
            g.nodes.append(_copy_node(n, memo))
        return g

    # ---- printing --------------------------------------------------------------------------------------------
    def __str__(self) -> str:
        lines = [f"graph {self.name} (opset {self.opset.get('', '?')})"]
        for i in self.inputs:
            lines.append(f"  input  %{self.values[i]}" if i in self.values else f"  input  %{i}")
        for n in self.nodes:
            outs = ", ".join(f"%{o}" for o in n.outputs)
            ins = ", ".join(f"%{i}" if i else "_" for i in n.inputs)
            d = n.describe()
            label = n.op if not isinstance(n, Generic) or not n.domain else f"{n.domain}.{n.op}"
            lines.append(f"  {outs} = {label}({ins}){'  ' + d if d else ''}  # {n.name}")
            if isinstance(n, MoE):
                for lin in n.linears():
                    lines.append(f"      {lin.name}: Linear {lin.describe()}")
        for o in self.outputs:
            lines.append(f"  output %{self.values[o]}" if o in self.values else f"  output %{o}")
        return "\n".join(lines)

    # ---- serialization ---------------------------------------------------------------------------------------
    def to_json(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """The graph as a JSON-able dict plus a flat dict of tensors (for weights.safetensors)."""
        tensors: dict[str, np.ndarray] = {}
        for k, c in self.constants.items():
            tensors[f"const:{k}"] = np.asarray(c, order="C")

        def enc_param(prefix: str, p):
            if p is None:
                return None
            if isinstance(p, WeightFormat):
                tensors.update(p.to_tensors(prefix))
                return {"format": p.spec(prefix)}
            tensors[prefix] = np.asarray(p, order="C")
            return {"tensor": prefix}

        def enc_node(n: Node) -> dict[str, Any]:
            d: dict[str, Any] = {"op": n.op, "name": n.name, "inputs": list(n.inputs), "outputs": list(n.outputs)}
            if n.meta:
                d["meta"] = _json_safe(n.meta)
            if isinstance(n, Generic):
                d["op"] = "Generic"
                d["op_type"] = n.op_type
                d["domain"] = n.domain
                d["attributes"] = {k: _enc_attr(v, f"attr:{n.name}:{k}", tensors) for k, v in sorted(n.attributes.items())}
                d["attr_types"] = dict(sorted(n.attr_types.items()))
                return d
            if isinstance(n, MoE):
                d["attrs"] = n.attrs()
                d["router"] = enc_node(n.router)
                d["experts"] = [
                    {"act": e.act, "up": enc_node(e.up), "down": enc_node(e.down), "gate": None if e.gate is None else enc_node(e.gate)}
                    for e in n.experts
                ]
                return d
            d["attrs"] = n.attrs()
            d["params"] = {role: enc_param(f"{n.name}.{role}", p) for role, p in n.params().items()}
            return d

        doc = {
            "schema": GRAPH_SCHEMA,
            "name": self.name,
            "opset": dict(sorted(self.opset.items())),
            "meta": _json_safe(self.meta),
            "inputs": list(self.inputs),
            "outputs": list(self.outputs),
            "values": [{"name": v.name, "dtype": v.dtype, "shape": None if v.shape is None else list(v.shape)} for v in self.values.values()],
            "constants": sorted(self.constants),
            "nodes": [enc_node(n) for n in self.nodes],
        }
        return doc, tensors

    @classmethod
    def from_json(cls, doc: dict[str, Any], tensors: dict[str, np.ndarray]) -> "Graph":
        if doc.get("schema") != GRAPH_SCHEMA:
            raise IRError(f"graph schema {doc.get('schema')!r} is not {GRAPH_SCHEMA!r}")
        g = cls(doc["name"])
        g.opset = dict(doc["opset"])
        g.meta = doc.get("meta", {})
        g.inputs = list(doc["inputs"])
        g.outputs = list(doc["outputs"])
        for v in doc["values"]:
            g.values[v["name"]] = Value(v["name"], v["dtype"], None if v["shape"] is None else tuple(v["shape"]))
        for c in doc["constants"]:
            g.constants[c] = tensors[f"const:{c}"]

        def dec_param(p):
            if p is None:
                return None
            if "format" in p:
                return format_from_spec(p["format"], tensors)
            return tensors[p["tensor"]]

        def dec_node(d) -> Node:
            base = dict(name=d["name"], inputs=list(d["inputs"]), outputs=list(d["outputs"]), meta=d.get("meta", {}))
            op = d["op"]
            if op == "Generic":
                attrs = {k: _dec_attr(v, tensors) for k, v in d["attributes"].items()}
                return Generic(**base, op_type=d["op_type"], domain=d["domain"], attributes=attrs, attr_types=dict(d["attr_types"]))
            if op == "MoE":
                a = d["attrs"]
                experts = [
                    Expert(up=dec_node(e["up"]), down=dec_node(e["down"]), gate=None if e["gate"] is None else dec_node(e["gate"]), act=e["act"])
                    for e in d["experts"]
                ]
                return MoE(**base, router=dec_node(d["router"]), experts=experts, top_k=a["top_k"], renormalize=a["renormalize"],
                           score=a["score"], expert_map=a["expert_map"])
            params = {k: dec_param(v) for k, v in d.get("params", {}).items()}
            attrs = d.get("attrs", {})
            if op == "Linear":
                return Linear(**base, weight=params["weight"], bias=params.get("bias"))
            if op == "Conv":
                return Conv(**base, weight=params["weight"], bias=params.get("bias"), **attrs)
            if op == "LayerNorm":
                return LayerNorm(**base, weight=params.get("weight"), bias=params.get("bias"), eps=attrs["eps"])
            if op == "RMSNorm":
                return RMSNorm(**base, weight=params.get("weight"), eps=attrs["eps"])
            if op == "Embedding":
                return Embedding(**base, table=params["table"])
            if op == "Residual":
                return Residual(**base)
            raise IRError(f"unknown raised op {op!r}", node=d["name"])

        g.nodes = [dec_node(d) for d in doc["nodes"]]
        return g


# ----------------------------------------------------------------------------------------------------------------
def _np_dtype_name(dt) -> str:
    dt = np.dtype(dt)
    if dt == np.bool_:
        return "bool"
    if dt.kind in "US" or dt == object:
        return "string"
    name = dt.name
    if name == "bfloat16" or "bfloat16" in str(dt):
        return "bfloat16"
    return name


def _copy_node(n: Node, memo) -> Node:
    if isinstance(n, MoE):
        m = _copy.copy(n)
        m.inputs, m.outputs, m.meta = list(n.inputs), list(n.outputs), dict(n.meta)
        m.router = _copy_node(n.router, memo)
        m.experts = [
            Expert(up=_copy_node(e.up, memo), down=_copy_node(e.down, memo), gate=None if e.gate is None else _copy_node(e.gate, memo), act=e.act)
            for e in n.experts
        ]
        m.expert_map = None if n.expert_map is None else list(n.expert_map)
        return m
    c = _copy.copy(n)
    c.inputs, c.outputs, c.meta = list(n.inputs), list(n.outputs), dict(n.meta)
    if isinstance(n, Generic):
        c.attributes = dict(n.attributes)
        c.attr_types = dict(n.attr_types)
    return c


def _json_safe(x):
    if isinstance(x, dict):
        return {str(k): _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (np.floating,)):
        return float(x)
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, bytes):
        return {"__bytes__": base64.b64encode(x).decode()}
    return x


def _enc_attr(v, key: str, tensors: dict[str, np.ndarray]):
    if isinstance(v, np.ndarray):
        tensors[key] = np.asarray(v, order="C")
        return {"__tensor__": key}
    if isinstance(v, bytes):
        return {"__bytes__": base64.b64encode(v).decode()}
    if isinstance(v, (list, tuple)):
        return [_enc_attr(x, f"{key}:{i}", tensors) for i, x in enumerate(v)]
    if isinstance(v, (np.integer,)):
        return int(v)
    if isinstance(v, (np.floating,)):
        return float(v)
    return v


def _dec_attr(v, tensors):
    if isinstance(v, dict):
        if "__tensor__" in v:
            return tensors[v["__tensor__"]]
        if "__bytes__" in v:
            return base64.b64decode(v["__bytes__"])
    if isinstance(v, list):
        return [_dec_attr(x, tensors) for x in v]
    return v


def dumps_json(doc: dict[str, Any]) -> str:
    """Deterministic JSON text (sorted keys, fixed separators, trailing newline)."""
    return json.dumps(doc, sort_keys=True, indent=1, separators=(",", ": "), allow_nan=False) + "\n"


def walk_up(prod: dict[str, Node], starts: Iterable[str], into=None) -> Iterator[tuple[str, Node | None]]:
    """Depth-first over the values ``starts`` are computed from, each value once: yields (value, its producer or None
    for a graph input / constant); a producer's inputs are visited when ``into(value, producer)`` is true (always
    without ``into``). ``prod``: output value -> node (:meth:`Graph.producers`)."""
    stack, seen = list(starts), set()
    while stack:
        v = stack.pop()
        if v in seen:
            continue
        seen.add(v)
        p = prod.get(v)
        yield v, p
        if p is not None and (into is None or into(v, p)):
            stack.extend(i for i in p.inputs if i)


def iter_all_nodes(graph: Graph) -> Iterator[Node]:
    for n in graph.nodes:
        yield n
        if isinstance(n, MoE):
            yield from n.linears()
