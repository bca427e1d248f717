"""Slicing (SliceGPT, Ashkboos et al., 2024): rotate the residual stream by PCA, delete its trailing dimensions.

Transformers are *computationally invariant* under an orthogonal change of basis ``Q`` of the residual stream:
every layer writing to the stream (embeddings, attention output, MLP down projection) is multiplied by ``Q`` on its
output side, every layer reading it (q/k/v, gate/up, the head) by ``Qᵀ`` on its input side, and RMSNorm commutes
with ``Q`` (``‖xQ‖ = ‖x‖``). With ``Q`` the eigenvectors of the stream's covariance (PCA, sorted by eigenvalue), the
trailing coordinates carry the least signal; deleting them deletes rows of the writers and columns of the readers.

What the pass does, on sparsec's IR:

1. **Structure discovery.** Starting from the residual additions it finds the *segments* of the stream: the value
   after each residual add (a tree of adds, e.g. token + position + token-type embeddings, counts as one), or a
   layer output that several nodes read (LLaMA's token embedding). For each segment: the *writers* (Linear, MoE,
   Embedding, constants added to the stream, and *sources*: values computed before the stream starts that no weight
   can be rotated in place, e.g. ViT's ``Concat(cls, Conv patches)``, Whisper's ``Conv1d -> GELU -> transpose``, a
   float graph input; step 2 projects them into the stream with an inserted Linear), the *norms* reading it
   (LayerNorm / RMSNorm), the *readers* (Linear / MoE reading the segment or a norm output of it), the residual
   *shortcuts* (a segment or a norm output added into a later segment), graph outputs, and the shape-only ops in
   between (Reshape with the hidden dim in its shape, Cast, Dropout, Identity, scalar Mul/Div, Gather/Slice/Transpose
   that keep the hidden axis last, ReduceMean/ReduceSum over other axes: mean-pooled heads). Anything else touching the stream stops the pass with ``cannot slice: ...``
   naming the node: never a silently wrong model.
2. **Norm fusion** (exact). LayerNorm models: every writer is centred (``W ← (I - 11ᵀ/d) W``), so the stream is
   mean-free and each ``LayerNorm(x) = RMSNorm(x) · γ + β``. The norms become weightless RMSNorm; ``γ``/``β`` (and
   RMSNorm weights) are folded into the Linear layers that read the norm (``W ← W diag(γ)``, ``b ← b + Wβ``).
   Every residual shortcut becomes an explicit Linear node (``<block>.attn_shortcut`` / ``<block>.mlp_shortcut``):
   identity for pre-norm models, ``diag(γ)`` (+ ``β``, centred) for post-norm models (BERT), whose norm sits on the
   stream itself, so the shortcut carries the norm's affine part, which cannot commute with a rotation. A graph
   output taken from the stream gets an ``output_restore`` Linear (rotation back to the original basis, with the
   final norm's ``γ``/``β``), so the model's interface does not change. Every source gets an explicit projection
   (``stream_in``: identity, centred for LayerNorm models, rotated to ``Q[:, :d']ᵀ`` in step 3, as SliceGPT does for
   what it cannot rotate in place): the stem keeps its weights, its cls token and the constants concatenated to it;
   constants *added* to the stream (positions) are rotated like any writer. A value computed from the stream itself
   (a layer scale, a gate) is not a source: ``cannot slice: ... is computed from the residual stream``.
3. **Rotation and slicing**, segment by segment in graph order, with sequential calibration
   (:mod:`sparsec.calibration.sequential`): the covariance ``Σ xxᵀ`` of a segment is collected on the calibration
   inputs as the *already sliced* earlier blocks produce them, ``Q`` = its eigenvectors by decreasing eigenvalue,
   the first ``d'`` columns kept. Writers: ``W ← Qᵀ W`` (rows ``d → d'``); readers: ``W ← W Q``; shortcuts become
   ``Q_sᵀ Q_t`` (``d'_s × d'_t``). RMSNorm over ``d'`` channels is made to compute the norm over the original ``d``
   (``eps ← eps·d/d'``, readers scaled by ``sqrt(d/d')``), as SliceGPT's RMSN does.

The result is a plain IR with smaller dense weights plus the shortcut Linear nodes: later passes (N:M pruning,
quantization) and every backend and the ONNX export work on it unchanged. A head tied to the embedding table is
untied (after rotation the two matrices differ); the report says so.

Recipe::

    - type: slicing
      fraction: 0.25          # share of the stream dimension to delete, in [0, 1); 0 = rotation only
      round_to: 8             # sliced dim rounded to the nearest multiple (kernel tiles, N:M groups); 1 = exact
      interleave: true        # order kept directions so each group of 4 channels mixes variance ranks (N:M after)
      overrides:              # per segment (labels: embeddings, <block>.attn, <block>.mlp, ...)
        - {match: 'layers\\.0\\.', fraction: 0.1}
        - {match: 'layers\\.3\\.mlp', skip: true}     # rotate, do not slice

Report: one row per matrix (shape before/after; added shortcuts marked ``added``); ``extra.blocks``: per segment
the dimension before/after, the retained variance (share of the covariance's trace kept, fit split) and the
output error (relative error of the sliced model's stream against the unsliced model's, held-out split);
totals of parameters and bytes of the sliced matrices, of the added shortcuts and of the whole model.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..compressor.errors import PassError, RecipeError
from ..compressor.executor import Executor, Observer
from ..compressor.formats import Dense
from ..compressor.ir import (
    Conv,
    Embedding,
    Generic,
    Graph,
    LayerNorm,
    Linear,
    MoE,
    Node,
    Residual,
    RMSNorm,
    block_resolver,
    walk_up,
)
from ..compressor.pipeline import Pass, PassContext, make_row, parse_overrides, parse_params, register_pass, skipped_by
from ..compressor.report import LayerRow, PassReport

_FLOAT_TYPES = {1, 10, 11, 16}  # ONNX elem types float, float16, double, bfloat16
_FLOAT_NAMES = ("float32", "float16", "float64", "bfloat16")
# (for naming what computes a value written to the stream) ops that move data, and element-wise maps
_MOVES = {"Transpose", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Slice", "Gather", "GatherND", "Concat", "Split", "Pad",
          "Expand", "Tile", "Identity", "Cast", "DepthToSpace", "SpaceToDepth"}  # fmt: skip
_ELEMENTWISE = {"Gelu", "Relu", "Sigmoid", "Tanh", "Erf", "Silu", "HardSwish", "HardSigmoid", "LeakyRelu", "Elu", "Softplus", "Mish",
                "Neg", "Abs", "Clip", "Dropout", "Mul", "Add", "Sub", "Div", "Pow"}  # fmt: skip (followed through the first input)


def _cannot(msg: str) -> PassError:
    return PassError(f"cannot slice: {msg}")


# ----------------------------------------------------------------------------------------------------------------
# parameters
def sliced_dim(d: int, fraction: float, round_to: int) -> int:
    """The kept dimension: ``(1 - fraction)·d`` rounded to the nearest multiple of ``round_to`` (at least one
    multiple, at most ``d``; exact when ``round_to >= d``); ``fraction == 0`` keeps ``d``."""
    if fraction <= 0:
        return d
    target = (1.0 - fraction) * d
    r = max(1, int(round_to))
    if r >= d:  # no multiple below d: exact
        r = 1
    k = int(math.floor(target / r + 0.5)) * r
    return int(min(d, max(r, k)))


@dataclass
class SegmentConfig:
    fraction: float = 0.25

    def validate(self):
        if not 0.0 <= self.fraction < 1.0:
            raise ValueError(f"fraction must be in [0, 1), got {self.fraction}")


@dataclass
class SlicingParams:
    fraction: float = 0.25
    round_to: int = 8
    # kept directions in variance-interleaved order (see _interleave); False: decreasing variance
    interleave: bool = True
    overrides: list[dict] = field(default_factory=list)

    def validate(self):
        SegmentConfig(self.fraction).validate()
        if self.round_to < 1:
            raise ValueError("round_to must be >= 1")


_OVERRIDE_KEYS = {"fraction"}


# ----------------------------------------------------------------------------------------------------------------
# structure
@dataclass(eq=False)
class Contribution:
    """A writer whose output reaches the segment's add tree and nothing else."""

    kind: str  # "linear" | "moe" | "embedding" | "const" | "source"
    node: Node | None  # Linear / MoE / Embedding (None for constants and sources)
    const: str | None = None  # constant name (kind "const")
    add: Node | None = None  # the add it feeds (None: root writer of the segment)
    index: int = 0
    user: Node | None = None  # kind "const": the node reading the constant (the add, or a Slice/Gather/... before it)
    # kind "source": a value computed before the stream starts (a conv stem, a graph input, cls token + patches, ...)
    # that no weight of sparsec can rotate: fusion projects it into the stream with an inserted Linear (identity,
    # rotated to Qᵀ like any writer); ``width`` is its last dim (the stream dim, or 1 when broadcast over it)
    value: str | None = None
    width: int = 0


@dataclass(eq=False)
class Shortcut:
    """The residual path: ``src`` (a segment value, or the output of ``norm`` on it) added into ``dst``."""

    src: "Segment"
    dst: "Segment"
    add: Node
    index: int  # input of ``add``
    norm: Node | None = None
    linear: Linear | None = None  # inserted by fusion


@dataclass(eq=False)
class Reader:
    node: Node  # Linear or MoE (or an inserted shortcut / restore Linear)
    norm: Node | None  # the norm whose output it reads (None: reads the segment directly)


@dataclass(eq=False)
class Restore:
    value: str  # graph output
    norm: Node | None
    linear: Linear | None = None


@dataclass(eq=False)
class Segment:
    id: int
    value: str  # the segment value: output of the top add of its tree, or of its root writer
    producer: Node
    dim: int = 0
    adds: list[Node] = field(default_factory=list)
    contributions: list[Contribution] = field(default_factory=list)
    shortcuts_in: list[Shortcut] = field(default_factory=list)
    shortcuts_out: list[Shortcut] = field(default_factory=list)
    norms: list[Node] = field(default_factory=list)
    readers: list[Reader] = field(default_factory=list)
    restores: list[Restore] = field(default_factory=list)
    values: set[str] = field(default_factory=set)  # every value whose last axis is this segment's stream
    reshapes: list[Node] = field(default_factory=list)
    shapes: list[Node] = field(default_factory=list)  # Shape nodes reading the stream (frozen to the original dim)
    label: str = ""
    block: str | None = None
    kind: str = ""
    # filled while slicing
    new_dim: int = 0
    fraction: float = 0.0
    shape_consts: list[str] = field(default_factory=list)
    ref_value: str = ""  # the segment's value in the unsliced graph when fusion renamed it (a projected source)

    def writer_nodes(self) -> list[Node]:
        return [c.node for c in self.contributions if c.node is not None]


@dataclass
class Structure:
    segments: list[Segment]
    mode: str  # "layernorm" (writers centred) | "rmsnorm"
    dim: int


def _scalar_const(g: Graph, v: str) -> bool:
    c = g.constants.get(v)
    return c is not None and c.size == 1 and c.dtype.kind == "f"


class _Finder:
    """Discovers the residual stream of a graph (see the module docstring)."""

    def __init__(self, g: Graph):
        self.g = g
        self.prod = g.producers()
        self.cons = g.consumers()
        self.outputs = set(g.outputs)
        self.segs: list[Segment] = []
        self.seg_of_value: dict[str, Segment] = {}
        self.explored: set[int] = set()

    # ---- shapes ----------------------------------------------------------------------------------------------
    def rank(self, v: str) -> int | None:
        val = self.g.values.get(v)
        return None if val is None or val.shape is None else len(val.shape)

    def last_dim(self, v: str) -> int | None:
        val = self.g.values.get(v)
        if val is None or not val.shape:
            c = self.g.constants.get(v)
            return int(c.shape[-1]) if c is not None and c.ndim else None
        d = val.shape[-1]
        return d if isinstance(d, int) else None

    def is_float(self, v: str) -> bool:
        val = self.g.values.get(v)
        return val is None or val.dtype in _FLOAT_NAMES

    # ---- op classes ------------------------------------------------------------------------------------------
    def through(self, n: Node) -> int | None:
        """Index of the data input when ``n`` passes the stream through unchanged in its last axis, else None."""
        if not isinstance(n, Generic) or n.domain not in ("", "ai.onnx") or not n.inputs:
            return None
        op = n.op_type
        if op == "Identity":
            return 0
        if op == "Cast":
            return 0 if int(n.attributes.get("to", 0)) in _FLOAT_TYPES and self.is_float(n.inputs[0]) else None
        if op == "Dropout":
            return 0 if all(not o or o not in self.cons for o in n.outputs[1:]) else None
        if op == "Reshape":
            return 0
        if op in ("Mul", "Div") and len(n.inputs) == 2:
            if _scalar_const(self.g, n.inputs[1]) and n.inputs[0] not in self.g.constants:
                return 0
            if op == "Mul" and _scalar_const(self.g, n.inputs[0]) and n.inputs[1] not in self.g.constants:
                return 1
            if op == "Mul":  # a per-token scalar (last dim 1: a sigmoid gate of a shared expert) commutes with rotation
                for k in (0, 1):
                    other = n.inputs[1 - k]
                    if (other not in self.g.constants and self.last_dim(other) == 1 and (self.last_dim(n.inputs[k]) or 0) > 1
                            and self.is_float(other) and (self.rank(other) or 0) <= (self.rank(n.inputs[k]) or 0)):  # fmt: skip
                        return k
            return None
        if op == "Transpose":
            perm = n.attributes.get("perm")
            if perm is not None and len(perm) and int(list(perm)[-1]) == len(perm) - 1:
                return 0
            return None
        if op == "Gather":
            r = self.rank(n.inputs[0])
            ax = int(n.attributes.get("axis", 0))
            if r is not None and (ax % r) != r - 1:
                return 0
            return None
        if op == "Flatten":  # (B, T, D) -> (B*T, D): the token axes merged (TorchScript's x[arange(B), idx])
            r = self.rank(n.inputs[0])
            return 0 if r is not None and r >= 2 and int(n.attributes.get("axis", 1)) % r == r - 1 else None
        if op == "GatherND" and len(n.inputs) == 2:
            # rows picked by index tuples over the leading axes (CLIP's pooled token: x[arange(B), ids.argmax(-1)]):
            # the last axis is kept when the tuples and batch dims do not reach it
            r, k = self.rank(n.inputs[0]), self.last_dim(n.inputs[1])
            b = int(n.attributes.get("batch_dims", 0))
            return 0 if r is not None and k is not None and b + k < r else None
        if op == "Slice":
            r = self.rank(n.inputs[0])
            if r is None or len(n.inputs) < 4 or n.inputs[3] not in self.g.constants:
                return None
            axes = [int(a) % r for a in np.asarray(self.g.constants[n.inputs[3]]).reshape(-1)]
            return 0 if r - 1 not in axes else None
        if op in ("ReduceMean", "ReduceSum"):  # pooling over tokens (mean-pooled heads): linear, per channel
            r = self.rank(n.inputs[0])
            if len(n.inputs) > 1 and n.inputs[1]:  # axes as an input (ReduceSum >= 13, ReduceMean >= 18)
                if n.inputs[1] not in self.g.constants:
                    return None
                axes = np.asarray(self.g.constants[n.inputs[1]]).reshape(-1)
            else:
                axes = n.attributes.get("axes")
            if r is None or axes is None or not len(axes):  # no axes: every axis, or none (noop_with_empty_axes)
                return None
            return 0 if r - 1 not in [int(a) % r for a in axes] else None
        return None

    def scaling(self, n: Node) -> bool:
        return isinstance(n, Generic) and n.op_type in ("Mul", "Div")

    def is_add(self, n: Node | None) -> bool:
        if isinstance(n, Residual):
            return True
        return (isinstance(n, Generic) and n.domain in ("", "ai.onnx") and n.op_type in ("Add", "Sum") and len(n.inputs) >= 2
                and all(self.is_float(i) for i in n.inputs))  # fmt: skip

    @staticmethod
    def is_norm(n: Node | None) -> bool:
        return isinstance(n, (LayerNorm, RMSNorm))

    @staticmethod
    def is_writer(n: Node | None) -> bool:
        # a Conv's output channels are not the stream's last axis: a conv stem is a source (projected into the stream)
        return isinstance(n, (Linear, MoE, Embedding)) and not isinstance(n, Conv)

    # ---- walking ---------------------------------------------------------------------------------------------
    def back(self, v: str) -> tuple[str, list[Node]]:
        """Follow ``v`` back through pass-through ops: (base value, pass-through nodes from base to v)."""
        chain: list[Node] = []
        seen = set()
        while True:
            p = self.prod.get(v)
            if p is None or id(p) in seen:
                break
            k = self.through(p)
            if k is None:
                break
            seen.add(id(p))
            chain.append(p)
            v = p.inputs[k]
        chain.reverse()
        return v, chain

    def uses(self, v: str) -> list[tuple[Node | None, int, list[Node], str]]:
        """Terminal uses of ``v`` past pass-through ops: (consumer or None for a graph output, input index,
        pass-through nodes on the way, the value the consumer reads)."""
        out: list[tuple[Node | None, int, list[Node], str]] = []
        stack = [(v, [])]
        seen: set[str] = set()
        while stack:
            u, chain = stack.pop()
            if u in seen:
                continue
            seen.add(u)
            if u in self.outputs:
                out.append((None, 0, chain, u))
            for c in self.cons.get(u, []):
                k = self.through(c)
                for i, inp in enumerate(c.inputs):
                    if inp != u:
                        continue
                    if k is not None and i == k and c.outputs and c.outputs[0]:
                        stack.append((c.outputs[0], chain + [c]))
                    else:
                        out.append((c, i, chain, u))
        # stable order: by node position
        pos = {id(n): i for i, n in enumerate(self.g.nodes)}
        out.sort(key=lambda t: (pos.get(id(t[0]), -1) if t[0] is not None else len(pos), t[1], t[3]))
        return out

    def real_uses(self, v: str):
        return [u for u in self.uses(v) if not (isinstance(u[0], Generic) and u[0].op_type == "Shape")]

    def _why_no_seed(self) -> str:
        """A model with residual additions none of which adds a layer's output directly: the branch reaches the add
        through a norm (Gemma-2's post-attention / post-feed-forward norms) or a per-channel scale (LayerScale,
        ``x + gamma * f(x)``), which sparsec does not rotate. The named reason, or "" when that is not the case."""
        for n in self.g.nodes:
            if not self.is_add(n) or len(n.inputs) != 2:
                continue
            for i in n.inputs:
                p = self.prod.get(self.back(i)[0])
                if p is None:
                    continue
                if self.is_norm(p) and isinstance(self.prod.get(self.back(p.inputs[0])[0]), (Linear, MoE)):
                    src = self.prod.get(self.back(p.inputs[0])[0])
                    return (f"the residual additions add a layer's output through a norm ('{src.name}' -> '{p.name}' "
                            f"-> '{n.name}': a post-norm on the branch, as Gemma-2 writes it); sparsec rotates a stream "
                            f"that layers write directly, not through a norm")  # fmt: skip
                if isinstance(p, Generic) and p.op_type == "Mul" and len(p.inputs) == 2:
                    for k in (0, 1):
                        src = self.prod.get(self.back(p.inputs[k])[0])
                        c = self.g.constants.get(p.inputs[1 - k])
                        if isinstance(src, (Linear, MoE)) and c is not None and c.ndim >= 1 and c.shape[-1] > 1:
                            return (f"the residual additions add a layer's output scaled per channel ('{src.name}' -> "
                                    f"'{p.name}' -> '{n.name}': a layer scale, x + gamma * f(x)); sparsec does not fold "
                                    f"the scale into the layer, so it cannot rotate that stream")  # fmt: skip
        return ""

    # ---- discovery -------------------------------------------------------------------------------------------
    def run(self) -> Structure:
        seeds = []
        for n in self.g.nodes:
            if not self.is_add(n):
                continue
            if isinstance(n, Residual):
                seeds.append(n)
                continue
            kinds = [self.prod.get(self.back(i)[0]) for i in n.inputs]
            if any(isinstance(p, (Linear, MoE)) and not isinstance(p, Conv) for p in kinds) and any(
                isinstance(p, Embedding) or self.is_add(p) or self.is_norm(p) for p in kinds
            ):
                seeds.append(n)
        if not seeds:
            why = self._why_no_seed()
            if why:
                raise _cannot(why)
            first = next((l.name for l in self.g.linears()), None)
            where = f" (its first layer '{first}' starts no residual stream)" if first else ""
            raise _cannot(f"no residual connection found: the model has no addition of a layer's output to a "
                          f"residual stream{where}; slicing needs a transformer-style residual stream")  # fmt: skip
        for n in seeds:
            self.segment_at(self.tree_root(n).outputs[0])
        # forward exploration until nothing new is found
        while True:
            todo = [s for s in self.segs if s.id not in self.explored]
            if not todo:
                break
            for s in todo:
                self.explored.add(s.id)
                self.explore(s)
        segs = sorted(self.segs, key=lambda s: self._pos(s.producer))
        for i, s in enumerate(segs):
            s.id = i
        self.finish(segs)
        for s in segs:
            seen = set()
            for v in sorted(s.values):
                for c in self.cons.get(v, []):
                    if isinstance(c, Generic) and c.op_type == "Shape" and id(c) not in seen:
                        seen.add(id(c))
                        s.shapes.append(c)
        mode = self.check_norms(segs)
        dims = {s.dim for s in segs}
        return Structure(segs, mode, max(dims))

    def _pos(self, n: Node) -> int:
        for i, m in enumerate(self.g.nodes):
            if m is n:
                return i
        return -1

    def tree_root(self, add: Node) -> Node:
        """The top of the add tree containing ``add`` (an add whose only real use is another add goes up)."""
        seen = set()
        while id(add) not in seen:
            seen.add(id(add))
            uses = self.real_uses(add.outputs[0])
            if len(uses) == 1 and uses[0][0] is not None and self.is_add(uses[0][0]):
                add = uses[0][0]
            else:
                break
        return add

    def segment_at(self, v: str) -> Segment:
        """The segment whose value is the base value ``v`` (created on first sight)."""
        base, _ = self.back(v)
        if base in self.seg_of_value:
            return self.seg_of_value[base]
        p = self.prod.get(base)
        if p is None and base not in self.g.inputs:
            raise _cannot(f"the constant '{base}' feeds the residual stream directly; sparsec cannot rotate it")
        if p is None or not (self.is_add(p) or self.is_writer(p) or self.is_norm(p)):
            # the stream starts at a value no weight of sparsec can rotate (a conv stem, cls token + patches, a graph
            # input): projected into the stream by an inserted Linear (see _Fusion._source)
            self.check_source(base, p, None)
            s = Segment(len(self.segs), base, p if p is not None else self._first_reader(base))
            self.segs.append(s)
            self.seg_of_value[base] = s
            s.values.add(base)
            s.contributions.append(Contribution("source", None, value=base))
            return s
        if self.is_add(p):
            root = self.tree_root(p)
            if root is not p and root.outputs[0] not in self.seg_of_value:
                return self.segment_at(root.outputs[0])
            s = Segment(len(self.segs), base, p)
            self.segs.append(s)
            self.seg_of_value[base] = s
            s.values.add(base)
            self.tree(s, p)
        elif self.is_writer(p):
            s = Segment(len(self.segs), base, p)
            self.segs.append(s)
            self.seg_of_value[base] = s
            s.values.add(base)
            kind = "embedding" if isinstance(p, Embedding) else ("moe" if isinstance(p, MoE) else "linear")
            s.contributions.append(Contribution(kind, p))
        elif self.is_norm(p):
            src = self.prod.get(self.back(p.inputs[0])[0])
            raise _cannot(f"norm '{p.name}' is applied to the output of another norm"
                          f"{f' ({src.name})' if src is not None else ''}; sparsec cannot rotate a stream normalized twice")  # fmt: skip
        return s

    def check_source(self, v: str, p: Node | None, add: Node | None) -> None:
        """``v`` (produced by ``p``, None for a graph input) may start the stream (be projected into it) when it is
        a float value computed before the stream: no residual addition, norm or MoE upstream. A value computed from
        the stream itself (a layer scale, a gate) is an op sparsec does not understand: named refusal."""
        what = f"'{p.name}' ({p.op})" if p is not None else f"the graph input '{v}'"
        how = (f"adds to the residual stream through '{add.name}'" if add is not None
               else f"produces the residual stream value '{v}'")  # fmt: skip
        if not self.is_float(v):
            raise _cannot(f"{what} {how} with a non-float value")
        dep = self.stream_dependency(v)
        if dep is not None:
            # what computes the value: up through data moves and element-wise maps, the first other op. A layer's
            # output moved by ops slicing does not follow (Swin's torch.roll / window reverse between attn.proj and the
            # add) names the ops on the way; another op (a conv applied to the stream) is named itself
            way, q = [], p
            while isinstance(q, Generic) and q.inputs and (q.op_type in _MOVES or q.op_type in _ELEMENTWISE) and len(way) < 16:
                way.append(q)
                q = self.prod.get(q.inputs[0])
            ops = ", ".join(f"'{w.name}' ({w.op})" for w in reversed(way))
            if q is not None and self.is_writer(q) and way:
                via = (f"; it is the output of '{q.name}' ({q.op}) moved by {ops}, which slicing cannot follow there (it "
                       "follows ops that keep each token's hidden vector whole with the hidden axis last: Reshape, "
                       "Transpose, token Gather / Slice, scalar Mul)")  # fmt: skip
            elif q is not None and not self.is_writer(q):
                via = f"; it is computed by '{q.name}' ({q.op})" + (f", then {ops}" if way else "")
            else:
                via = ""
            raise _cannot(f"{what} {how} but is computed from the residual stream (through {dep}){via}; "
                          f"only residual additions, Linear/MoE layers, embeddings, constants and values computed before "
                          f"the stream starts may write to it")  # fmt: skip

    def stream_dependency(self, v: str) -> str | None:
        """The residual addition, norm, MoE or stream value that ``v`` is computed from, described (None: ``v`` is
        computed before the stream)."""
        for x, p in walk_up(self.prod, [v]):
            if x in self.seg_of_value or isinstance(p, (Residual, LayerNorm, RMSNorm, MoE)):
                return f"'{p.name}', {p.op}" if p is not None else f"the graph input '{x}'"
        return None

    def _first_reader(self, v: str) -> Node:
        """The first node reading graph input ``v`` (a source segment needs a node to place it in the graph)."""
        users = self.cons.get(v, [])
        if not users:
            raise _cannot(f"the graph input '{v}' feeds the residual stream but no node reads it")
        return users[0]

    def tree(self, s: Segment, add: Node) -> None:
        """Classify the inputs of the add tree rooted at ``add`` into contributions and shortcuts."""
        s.adds.append(add)
        for i, u in enumerate(add.inputs):
            base, chain = self.back(u)
            if base in self.g.constants:
                self._chain(s, chain)
                c = self.g.constants[base]
                if c.dtype.kind != "f" or not c.ndim:
                    raise _cannot(f"the constant '{base}' added to the residual stream by '{add.name}' is not a float vector")
                s.contributions.append(Contribution("const", None, const=base, add=add, index=i, user=chain[0] if chain else add))
                continue
            p = self.prod.get(base)
            uses = self.real_uses(base)
            exclusive = len(uses) == 1 and uses[0][0] is add and uses[0][1] == i
            if p is None and base not in self.g.inputs:
                raise _cannot(f"the value '{base}' is added to the residual stream by '{add.name}' and has no producer")
            if p is None or not (self.is_add(p) or self.is_writer(p) or self.is_norm(p)):
                if base in self.seg_of_value or (not exclusive and all(
                        c is not None and (self.is_add(c) or (self.is_norm(c) and k == 0)) for c, k, _, _ in uses)):
                    # also read by the stream's first norm (pre-norm blocks): the stream starts at this value
                    src = self.segment_at(base)
                    sc = Shortcut(src, s, add, i)
                    s.shortcuts_in.append(sc)
                    src.shortcuts_out.append(sc)
                    continue
                self.check_source(u, p, add)
                s.contributions.append(Contribution("source", None, add=add, index=i, value=u))
                continue
            if self.is_add(p) and exclusive and base not in self.seg_of_value:
                self._chain(s, chain, base)
                self.tree(s, p)
            elif self.is_writer(p) and exclusive and base not in self.seg_of_value:
                self._chain(s, chain, base)
                kind = "embedding" if isinstance(p, Embedding) else ("moe" if isinstance(p, MoE) else "linear")
                s.contributions.append(Contribution(kind, p, add=add, index=i))
            elif self.is_norm(p):
                src = self.segment_at(self.back(p.inputs[0])[0])
                sc = Shortcut(src, s, add, i, norm=p)
                s.shortcuts_in.append(sc)
                src.shortcuts_out.append(sc)
            elif self.is_add(p) or self.is_writer(p):
                src = self.segment_at(base)
                sc = Shortcut(src, s, add, i)
                s.shortcuts_in.append(sc)
                src.shortcuts_out.append(sc)

    def _chain(self, s: Segment, chain: list[Node], base: str | None = None) -> None:
        if base is not None:
            s.values.add(base)
        for n in chain:
            s.values.add(n.outputs[0])
            if isinstance(n, Generic) and n.op_type == "Reshape":
                s.reshapes.append(n)

    def explore(self, s: Segment) -> None:
        for c, i, chain, at in self.uses(s.value):
            self._chain(s, chain)
            self.consume(s, None, c, i, at)

    def consume(self, s: Segment, norm: Node | None, c: Node | None, i: int, at: str) -> None:
        if c is None:
            s.restores.append(Restore(at, norm))
            return
        if isinstance(c, Generic) and c.op_type == "Shape":
            return  # dynamic shapes follow the sliced dim
        if self.is_add(c):
            root = self.tree_root(c)
            dst = self.segment_at(root.outputs[0])
            if not any(sc.add is c and sc.index == i and sc.src is s for sc in dst.shortcuts_in):
                raise _cannot(f"'{c.name}' adds the residual stream '{at}' in a way sparsec cannot follow")
            return
        if self.is_norm(c) and i == 0:
            if norm is not None:
                raise _cannot(f"norm '{c.name}' is applied to the output of norm '{norm.name}'; sparsec cannot rotate "
                              f"a stream normalized twice")  # fmt: skip
            if c not in s.norms:
                s.norms.append(c)
                s.values.add(c.outputs[0])
                for c2, i2, chain2, at2 in self.uses(c.outputs[0]):
                    self._chain(s, chain2)
                    for n in chain2:
                        # a scalar commutes with the rotation and with γ folded into the readers, not with β folded
                        # into their biases (T5's tied head scales its final RMSNorm's output by d ** -0.5)
                        if self.scaling(n) and isinstance(c, LayerNorm) and c.bias is not None and np.any(np.asarray(c.bias) != 0):
                            raise _cannot(f"'{n.name}' scales the output of norm '{c.name}' (which has a bias) before "
                                          f"its readers; sparsec cannot fold it")  # fmt: skip
                    self.consume(s, c, c2, i2, at2)
            return
        if isinstance(c, (Linear, MoE)) and not isinstance(c, Conv) and i == 0:
            if not any(r.node is c and r.norm is norm for r in s.readers):
                s.readers.append(Reader(c, norm))
            return
        what = f"the output of norm '{norm.name}'" if norm is not None else "the residual stream"
        raise _cannot(f"'{c.name}' ({c.op}) reads {what} ('{at}'); only norms, Linear/MoE layers and residual "
                      f"additions may read it")  # fmt: skip

    # ---- checks, labels ----------------------------------------------------------------------------------------
    def finish(self, segs: list[Segment]) -> None:
        for s in segs:
            dims = set()
            for c in s.contributions:
                if c.kind == "linear":
                    dims.add(c.node.out_features)
                elif c.kind == "moe":
                    dims.add(c.node.router.in_features)
                elif c.kind == "embedding":
                    dims.add(int(c.node.table.shape[1]))
                elif c.kind == "source":
                    c.width = self.last_dim(c.value) or 0
                    if c.width > 1:
                        dims.add(c.width)
                else:
                    dims.add(int(self.g.constants[c.const].shape[-1]))
            for sc in s.shortcuts_in:
                if sc.src.dim:
                    dims.add(sc.src.dim)
            d = self.last_dim(s.value)
            if d is not None:
                dims.add(d)
            if not dims and any(c.kind == "source" for c in s.contributions):
                # a stream starting at a value of symbolic shape (a float graph input exported with every dim
                # dynamic): its size is the one its norms and readers are built for
                dims = {n.dim for n in s.norms if n.dim is not None}
                dims |= {(r.node.router if isinstance(r.node, MoE) else r.node).in_features for r in s.readers}
            if not dims:
                raise _cannot(f"the residual stream value '{s.value}' has no writer sparsec can rotate")
            if len(dims) > 1:
                raise _cannot(f"the writers of the residual stream value '{s.value}' disagree on its dim ({sorted(dims)})")
            s.dim = dims.pop()
            for c in s.contributions:
                if c.kind == "source" and c.width == 0 and c.add is None:
                    c.width = s.dim  # the stream itself, not broadcast
                if c.kind == "source" and c.width not in (1, s.dim):
                    where = f"added to the residual stream by '{c.add.name}'" if c.add is not None else "starting the stream"
                    raise _cannot(f"the value '{c.value}' {where} has no static hidden size (shape "
                                  f"{self.g.values[c.value].shape if c.value in self.g.values else 'unknown'}); sparsec "
                                  f"cannot size the projection that rotates it into the stream")  # fmt: skip
            for r in s.readers:
                lin = r.node.router if isinstance(r.node, MoE) else r.node
                if lin.in_features != s.dim:
                    raise _cannot(f"'{r.node.name}' reads the residual stream (dim {s.dim}) with {lin.in_features} inputs")
            for n in s.norms:
                if n.dim is not None and n.dim != s.dim:
                    raise _cannot(f"norm '{n.name}' has {n.dim} channels on a stream of dim {s.dim}")
        # labels: "<block>.attn" / "<block>.mlp" / "embeddings"
        taken: dict[str, int] = {}
        block_of = block_resolver(self.g)
        for s in segs:
            mods = [n.module for n in s.adds if n.module] + [n.module for n in s.writer_nodes() if n.module]
            blocks = [b for b in (block_of(m) for m in mods) if b]
            s.block = blocks[0] if blocks else None
            if any(c.kind in ("embedding", "source") for c in s.contributions) and s.block is None:
                s.kind = "embeddings"
            else:
                rel = []
                for n in s.writer_nodes():
                    m = n.module or n.name
                    if s.block and m.startswith(s.block + "."):
                        m = m[len(s.block) + 1 :]
                    rel.extend(m.lower().split("."))
                if any("attn" in p or "attention" in p for p in rel):
                    s.kind = "attn"
                elif s.block is not None:
                    s.kind = "mlp"
                else:
                    s.kind = "stream"
            label = f"{s.block}.{s.kind}" if s.block else s.kind
            k = taken.get(label, 0)
            taken[label] = k + 1
            s.label = label if k == 0 else f"{label}#{k}"

    def check_norms(self, segs: list[Segment]) -> str:
        kinds = {type(n).__name__: n for s in segs for n in s.norms}
        if len(kinds) > 1:
            raise _cannot(f"the residual stream is normalized by both LayerNorm ('{kinds['LayerNorm'].name}') and "
                          f"RMSNorm ('{kinds['RMSNorm'].name}')")  # fmt: skip
        mode = "layernorm" if "LayerNorm" in kinds else "rmsnorm"
        if mode == "layernorm":
            # the stream is made mean-free (LayerNorm removes the mean anyway): no one may see the raw stream
            for s in segs:
                for r in s.readers:
                    if r.norm is None:
                        raise _cannot(f"'{r.node.name}' reads the un-normalized residual stream of a LayerNorm model; "
                                      f"folding LayerNorm into RMSNorm would change what it reads")  # fmt: skip
                for o in s.restores:
                    if o.norm is None:
                        raise _cannot(f"the graph output '{o.value}' is the un-normalized residual stream of a LayerNorm "
                                      f"model; folding LayerNorm into RMSNorm would change it")  # fmt: skip
        return mode


def discover(graph: Graph) -> Structure:
    """The residual stream of ``graph`` (raises :class:`PassError` "cannot slice: ..." where it is not found)."""
    return _Finder(graph).run()


# ----------------------------------------------------------------------------------------------------------------
# weight helpers (float64 math, stored back in the weight's dtype)
def _w(lin: Linear) -> np.ndarray:
    return lin.weight.materialize().astype(np.float64)


def _dtype_of(lin: Linear):
    w = lin.weight
    return w.data.dtype if isinstance(w, Dense) else np.float32


def _set(lin: Linear, W: np.ndarray, b: np.ndarray | None, dtype=None) -> None:
    dt = dtype or _dtype_of(lin)
    lin.weight = Dense(np.ascontiguousarray(W.astype(dt)))
    lin.bias = None if b is None else np.ascontiguousarray(np.asarray(b).astype(dt))


def _moe_readers(m: MoE) -> list[Linear]:
    out = [m.router]
    for e in m.experts:
        out.extend(x for x in (e.gate, e.up) if x is not None)
    return out


def _moe_writers(m: MoE) -> list[Linear]:
    return [e.down for e in m.experts]


def _reader_linears(n: Node) -> list[Linear]:
    return _moe_readers(n) if isinstance(n, MoE) else [n]


def _writer_linears(n: Node) -> list[Linear]:
    return _moe_writers(n) if isinstance(n, MoE) else [n]


def _fold_affine_in(lin: Linear, gamma: np.ndarray | None, beta: np.ndarray | None) -> None:
    """``lin(x·γ + β)`` as a Linear of ``x``."""
    W = _w(lin)
    b = None if lin.bias is None else lin.bias.astype(np.float64)
    if beta is not None and np.any(beta != 0):
        b = (np.zeros(W.shape[0]) if b is None else b) + W @ beta
    if gamma is not None:
        W = W * gamma[None, :]
    _set(lin, W, b)


def _centre_rows(lin: Linear) -> None:
    """Outputs made mean-free over the stream axis: ``W ← (I - 11ᵀ/d) W``, ``b ← b - mean(b)``."""
    W = _w(lin)
    b = None if lin.bias is None else lin.bias.astype(np.float64)
    _set(lin, W - W.mean(0, keepdims=True), None if b is None else b - b.mean())


# ----------------------------------------------------------------------------------------------------------------
class _Cov(Observer):
    def __init__(self, values: dict[str, int], device):
        from sparsec.calibration.stats import CovarianceStats

        self.stats = {v: CovarianceStats(d, device) for v, d in values.items()}

    def wants_values(self):
        return set(self.stats)

    def value(self, name, t):
        self.stats[name].add(t)


class _Keep(Observer):
    def __init__(self, values):
        self.want = set(values)
        self.kept: dict[str, list[torch.Tensor]] = {v: [] for v in self.want}

    def wants_values(self):
        return self.want

    def value(self, name, t):
        self.kept[name].append(t.detach().to(torch.float32).reshape(-1, t.shape[-1]))


@register_pass
class Slicing(Pass):
    name = "slicing"
    aliases = ("slice", "slicegpt")
    order = 20  # after expert merging (10), before pruning (30), quantization (40), compensation (60)
    needs_calibration = True
    Params = SlicingParams

    def __init__(self, params=None, where=None):
        super().__init__(params, where)
        self.overrides = parse_overrides(self.params.overrides, self.where)
        for i, o in enumerate(self.overrides):
            bad = sorted(set(o.params) - _OVERRIDE_KEYS)
            if bad:
                raise RecipeError(f"{self.where}.overrides[{i}]: unknown key(s) {bad}; valid keys: {sorted(_OVERRIDE_KEYS | {'match', 'skip'})}")
            parse_params(SegmentConfig, {"fraction": self.params.fraction, **o.params}, f"{self.where}.overrides[{i}]")
        self._struct: Structure | None = None
        self._struct_graph: int | None = None

    # ------------------------------------------------------------------------------------------------------------
    def requires(self, graph: Graph, ctx: PassContext) -> None:
        super().requires(graph, ctx)
        st = discover(graph)
        for s in st.segments:
            for n in s.writer_nodes() + [r.node for r in s.readers]:
                for lin in n.linears() if isinstance(n, MoE) else ([n] if isinstance(n, Linear) else []):
                    if not isinstance(lin.weight, Dense):
                        raise PassError(f"layer '{lin.name}' already has a {lin.weight.describe()} weight; slicing rotates "
                                        f"dense weights (slice before pruning, quantizing or compensating)")  # fmt: skip
        self._struct, self._struct_graph = st, id(graph)

    def plan(self, st: Structure) -> None:
        p = self.params
        for s in st.segments:
            f = p.fraction
            for o in self.overrides:
                if o.match.search(s.label):
                    f = float(o.params.get("fraction", f))
            s.fraction = 0.0 if skipped_by(self.overrides, s.label) else f
            s.new_dim = sliced_dim(s.dim, s.fraction, p.round_to)
        for s in st.segments:  # an MoE layer keeps its input and output dims equal
            for r in s.readers:
                if isinstance(r.node, MoE):
                    for t in st.segments:
                        if any(c.node is r.node for c in t.contributions) and t.new_dim != s.new_dim:
                            raise _cannot(f"MoE '{r.node.name}' would read a stream of dim {s.new_dim} ({s.label}) and "
                                          f"write one of dim {t.new_dim} ({t.label}); give both the same fraction")  # fmt: skip

    # ------------------------------------------------------------------------------------------------------------
    def run(self, graph: Graph, ctx: PassContext) -> PassReport:
        from sparsec.calibration.sequential import sequential

        from ._progress import PassProgress

        st = self._struct if self._struct is not None and self._struct_graph == id(graph) else discover(graph)
        self._struct = None
        self.plan(st)
        rep = PassReport(self.name, params=self.params_dict())
        ref = graph.copy()  # the unsliced model, for the held-out output error per block
        before = self._snapshot(graph, st)
        params_before = graph.param_count()
        bytes_before = graph.nbytes()
        fusion = _Fusion(graph, st)
        fusion.apply()
        rep.warnings.extend(fusion.notes)

        held_available = ctx.heldout is not None and ctx.heldout.num_samples > 0
        if not held_available:
            rep.warnings.append("no held-out calibration split: output errors are not measured")
        asked = [s for s in st.segments if s.fraction > 0]
        if asked and all(s.new_dim == s.dim for s in asked):  # rounded back to the full width: rotation only
            dims = sorted({s.dim for s in asked})
            rep.warnings.append(f"slicing removes nothing: {asked[0].fraction:g} of {'/'.join(map(str, dims))} channels rounds to "
                                f"0 at round_to {self.params.round_to}, so the streams are only rotated (give a larger fraction, "
                                "or round_to 1)")  # fmt: skip
        tracker = _RefTracker(ref, ctx.heldout, ctx.device) if held_available else None
        blocks_info: dict[int, dict[str, Any]] = {}
        done: set[int] = set()
        untied: list[str] = []
        with PassProgress(ctx, "slicing", len(st.segments)) as prog:
            for step in sequential(graph, ctx.calib, ctx.heldout if held_available else None, ctx.device,
                                   progress=prog.blocks, description="slicing"):  # fmt: skip
                pos = {id(n): i for i, n in enumerate(graph.nodes)}
                here = sorted((s for s in st.segments if step.block.start <= pos[id(s.producer)] < step.block.stop),
                              key=lambda s: pos[id(s.producer)])  # fmt: skip
                for s in here:
                    obs = _Cov({s.value: s.dim}, step.ex.device)
                    step.observe(obs, stop=pos[id(s.producer)] + 1)
                    cov = obs.stats[s.value]
                    if cov.n == 0:
                        raise PassError(f"slicing: no calibration tokens reached the residual stream at '{s.value}'")
                    Q, ev = _pca(cov.matrix() / cov.n)
                    if not np.isfinite(ev).all():
                        raise PassError(f"slicing: the covariance of the residual stream at '{s.value}' is not finite")
                    total = float(np.clip(ev, 0, None).sum())
                    kept = float(np.clip(ev[: s.new_dim], 0, None).sum())
                    Qs = Q[:, : s.new_dim]
                    if self.params.interleave:
                        Qs = Qs[:, _interleave(s.new_dim)]
                    untied.extend(_rotate(graph, s, Qs))
                    done.add(s.id)
                    blocks_info[s.id] = {
                        "segment": s.label,
                        "value": s.value,
                        "dim_before": s.dim,
                        "dim_after": s.new_dim,
                        "fraction": s.fraction,
                        "retained_variance": kept / total if total > 0 else 1.0,
                        "output_error": None,
                        "_Q": Qs,
                    }
                    prog.layer_done(s.label)
                if here and tracker is not None:
                    names = [s.value for s in here]
                    keep = _Keep(names)
                    step.observe(keep, heldout=True)
                    refv = tracker.run_until(step.block.name, [s.ref_value or s.value for s in here])
                    refv = {s.value: refv.get(s.ref_value or s.value) for s in here}
                    for s in here:
                        info = blocks_info[s.id]
                        info["output_error"] = _stream_error(refv.get(s.value), keep.kept.get(s.value), info["_Q"], st.mode)
        missing = [s.label for s in st.segments if s.id not in done]
        if missing:
            raise PassError(f"slicing: internal: segments {missing} were never calibrated")
        if untied:
            rep.warnings.append("untied " + ", ".join(sorted(set(untied))) + ": after rotation the head and the embedding "
                                "table differ, so they are stored separately")  # fmt: skip
        rep.rows = self._rows(graph, st, before, fusion)
        blocks = []
        for s in st.segments:
            info = dict(blocks_info[s.id])
            info.pop("_Q")
            blocks.append(info)
        rep.extra["blocks"] = blocks
        sliced_before = sum(int(np.prod(v[0])) for v in before.values())
        sliced_after = 0
        for name in before:
            if name.startswith("const:"):
                name = "const:" + fusion.const_names.get(name[6:], name[6:])
            sliced_after += int(np.prod(_param_shape(graph, name)))
        added = sum(lin.param_count() for lin in fusion.added)
        rep.totals.update({
            "mode": st.mode,
            "stream_dim": st.dim,
            "segments": len(st.segments),
            "sliced_params_before": sliced_before,
            "sliced_params_after": sliced_after,
            "sliced_params_reduction": 1.0 - sliced_after / sliced_before if sliced_before else 0.0,
            "added_params": added,  # shortcut and output-restore Linear nodes
            "model_params_before": int(params_before),
            "model_params_after": int(graph.param_count()),
            "model_bytes_before": int(bytes_before),
            "model_bytes_after": int(graph.nbytes()),
            "untied": sorted(set(untied)),
        })  # fmt: skip
        errs = [b["output_error"] for b in blocks if b["output_error"] is not None]
        if errs:
            rep.totals["final_output_error"] = errs[-1]
        self._done = st
        return rep

    # ------------------------------------------------------------------------------------------------------------
    @staticmethod
    def _snapshot(graph: Graph, st: Structure) -> dict[str, tuple[tuple[int, ...], Any, Node]]:
        """Shape and weight (format) of every matrix the pass rotates, before it runs."""
        out: dict[str, tuple[tuple[int, ...], Any, Node]] = {}
        seen = set()
        for s in st.segments:
            nodes = s.writer_nodes() + [r.node for r in s.readers]
            for n in nodes:
                if id(n) in seen:
                    continue
                seen.add(id(n))
                if isinstance(n, Embedding):
                    out[n.name] = (tuple(n.table.shape), n.table, n)
                else:
                    for lin in (_moe_readers(n) + _moe_writers(n)) if isinstance(n, MoE) else [n]:
                        out[lin.name] = (tuple(lin.weight.shape), lin.weight, lin)
            for c in s.contributions:
                if c.kind == "const":
                    out[f"const:{c.const}"] = (tuple(graph.constants[c.const].shape), graph.constants[c.const], None)
        return out

    def _rows(self, graph, st, before, fusion) -> list[LayerRow]:
        rows = []
        names = {}
        for s in st.segments:
            for c in s.contributions:
                if c.node is not None:
                    for lin in _writer_linears(c.node) if not isinstance(c.node, Embedding) else []:
                        names.setdefault(lin.name, []).append(f"writes {s.label} {s.dim}->{s.new_dim}")
            for r in s.readers:
                for lin in _reader_linears(r.node):
                    names.setdefault(lin.name, []).append(f"reads {s.label} {s.dim}->{s.new_dim}")
        for name, (shape, fmt, node) in before.items():
            if isinstance(node, Embedding):
                t = node.table
                rows.append(LayerRow(name=name, shape_before=list(shape), shape_after=list(t.shape), format_before="table",
                                     format_after="table", bytes_before=int(fmt.nbytes), bytes_after=int(t.nbytes),
                                     note="embedding table rotated"))  # fmt: skip
            elif node is None:
                c = graph.constants[fusion.const_names.get(name[6:], name[6:])]
                rows.append(LayerRow(name=name, shape_before=list(shape), shape_after=list(c.shape), format_before="constant",
                                     format_after="constant", bytes_before=int(fmt.nbytes), bytes_after=int(c.nbytes),
                                     note="constant added to the stream, rotated"))  # fmt: skip
            else:
                note = "; ".join(names.get(name, []))
                if name in fusion.untied_notes:
                    note += f"; {fusion.untied_notes[name]}"
                rows.append(make_row(node, fmt, shape, note=note))
        for lin in fusion.added:
            rows.append(LayerRow(name=lin.name, shape_before=[], shape_after=[int(x) for x in lin.weight.shape], format_before=lin.weight.describe(),
                                 format_after=lin.weight.describe(), bytes_before=0, bytes_after=int(lin.nbytes()), status="added",
                                 note=fusion.added_notes.get(lin.name, "")))  # fmt: skip
        order = {}
        for i, n in enumerate(graph.nodes):
            order[n.name] = i
            if isinstance(n, MoE):
                for lin in n.linears():
                    order[lin.name] = i
        rows.sort(key=lambda r: (order.get(r.name, order.get(r.name[6:], -1)), r.name))
        return rows

    # ------------------------------------------------------------------------------------------------------------
    def ensures(self, graph: Graph, ctx: PassContext, report: PassReport) -> None:
        st = getattr(self, "_done", None)
        if st is None:
            return
        for s in st.segments:
            d = s.new_dim
            for c in s.contributions:
                if c.kind == "embedding" and c.node.table.shape[1] != d:
                    raise PassError(f"embedding '{c.node.name}' has dim {c.node.table.shape[1]}, its stream {s.label} has {d}")
                if c.kind in ("linear", "moe"):
                    for lin in _writer_linears(c.node):
                        if lin.out_features != d:
                            raise PassError(f"'{lin.name}' writes {lin.out_features} features into {s.label} of dim {d}")
            for sc in s.shortcuts_in:
                if tuple(sc.linear.weight.shape) != (d, sc.src.new_dim):
                    raise PassError(f"shortcut '{sc.linear.name}' has shape {sc.linear.weight.shape}, expected {(d, sc.src.new_dim)}")
            for r in s.readers:
                for lin in _reader_linears(r.node):
                    if lin.in_features != d:
                        raise PassError(f"'{lin.name}' reads {lin.in_features} features from {s.label} of dim {d}")
            for name in s.shape_consts:
                if int(np.asarray(graph.constants[name]).reshape(-1)[-1]) != d:
                    raise PassError(f"reshape shape '{name}' does not end in the sliced dim {d}")
            for n in s.norms:
                if not isinstance(n, RMSNorm) or n.weight is not None:
                    raise PassError(f"norm '{n.name}' should be a weightless RMSNorm after fusion")
        self._done = None


def _param_shape(graph: Graph, name: str) -> tuple[int, ...]:
    if name.startswith("const:"):
        return tuple(graph.constants[name[6:]].shape)
    for n in graph.nodes:
        if n.name == name:
            if isinstance(n, Embedding):
                return tuple(n.table.shape)
            if isinstance(n, Linear):
                return tuple(n.weight.shape)
        if isinstance(n, MoE):
            for lin in n.linears():
                if lin.name == name:
                    return tuple(lin.weight.shape)
    raise KeyError(name)


# ----------------------------------------------------------------------------------------------------------------
class _Fusion:
    """Step 2: LayerNorm -> RMSNorm, norm affines folded, explicit shortcut / restore Linear nodes, private reshape
    shapes. Exact: the graph computes the same function afterwards."""

    def __init__(self, g: Graph, st: Structure):
        self.g = g
        self.st = st
        self.added: list[Linear] = []
        self.added_notes: dict[str, str] = {}
        self.notes: list[str] = []
        self.untied_notes: dict[str, str] = {}
        self.const_names: dict[str, str] = {}
        self.affine: dict[int, tuple[np.ndarray | None, np.ndarray | None]] = {}  # id(norm) -> (γ, β)

    def apply(self) -> None:
        g, st = self.g, self.st
        centre = st.mode == "layernorm"
        # 0. values computed before the stream (conv stems, cls token + patches, graph inputs): projected into it
        for s in st.segments:
            for c in s.contributions:
                if c.kind == "source":
                    self._source(s, c)
        # 1. norms -> weightless RMSNorm; remember γ, β
        replace: dict[int, RMSNorm] = {}
        for s in st.segments:
            new_norms = []
            for n in s.norms:
                if id(n) not in replace:
                    gamma = None if n.weight is None else np.asarray(n.weight, dtype=np.float64).reshape(-1)
                    beta = np.asarray(n.bias, dtype=np.float64).reshape(-1) if isinstance(n, LayerNorm) and n.bias is not None else None
                    r = RMSNorm(n.name, list(n.inputs), list(n.outputs), dict(n.meta), weight=None, eps=float(n.eps))
                    replace[id(n)] = r
                    self.affine[id(r)] = (gamma, beta)
                new_norms.append(replace[id(n)])
            s.norms = new_norms
        g.nodes = [replace.get(id(n), n) for n in g.nodes]
        for s in st.segments:
            for r in s.readers:
                if r.norm is not None:
                    r.norm = replace[id(r.norm)]
            for sc in s.shortcuts_in:
                if sc.norm is not None:
                    sc.norm = replace[id(sc.norm)]
            for o in s.restores:
                if o.norm is not None:
                    o.norm = replace[id(o.norm)]
        # 2. fold γ, β into the Linear layers reading the norms
        for s in st.segments:
            for r in s.readers:
                if r.norm is None:
                    continue
                gamma, beta = self.affine[id(r.norm)]
                for lin in _reader_linears(r.node):
                    _fold_affine_in(lin, gamma, beta)
        # 3. centre the writers (LayerNorm models)
        if centre:
            for s in st.segments:
                for c in s.contributions:
                    if c.kind == "embedding":
                        t = c.node.table.astype(np.float64)
                        c.node.table = np.ascontiguousarray((t - t.mean(1, keepdims=True)).astype(c.node.table.dtype))
                    elif c.kind in ("linear", "moe"):
                        for lin in _writer_linears(c.node):
                            _centre_rows(lin)
        # constants added to the stream: private copies (rotated later), centred
        for s in st.segments:
            for c in s.contributions:
                if c.kind != "const":
                    continue
                arr = g.constants[c.const]
                new = self.g.unique_name(f"{c.const}.sliced")
                a = arr.astype(np.float64)
                if centre:
                    a = a - a.mean(-1, keepdims=True)
                g.add_constant(new, a.astype(arr.dtype))
                c.user.inputs = [new if x == c.const else x for x in c.user.inputs]
                if not any(c.const in n.inputs for n in g.nodes) and c.const not in g.outputs:
                    del g.constants[c.const]  # no other reader: the rotated copy replaces it
                    g.values.pop(c.const, None)
                self.const_names[c.const] = new
                c.const = new
        # 4. shortcuts and restores as Linear nodes
        for s in st.segments:
            for sc in s.shortcuts_in:
                self._shortcut(sc, centre)
        for s in st.segments:
            for o in s.restores:
                self._restore(s, o)
        # 5. reshapes: private shape constants ending in the stream dim
        for s in st.segments:
            for rs in s.reshapes:
                self._private_shape(s, rs)
        for s in st.segments:
            for sh in s.shapes:
                self._freeze_shape(s, sh)
        # 6. ties
        embs = {c.node.name for s in st.segments for c in s.contributions if c.kind == "embedding"}
        for s in st.segments:
            for r in s.readers:
                for lin in _reader_linears(r.node):
                    t = lin.meta.get("tied_to")
                    if t in embs:
                        self.untied_notes[lin.name] = f"untied from {t}"
        if centre:
            self.notes.append("LayerNorm folded into RMSNorm: the residual stream is made mean-free (writers centred), "
                              "norm scales and biases moved into the layers that read them")  # fmt: skip

    def _value_like(self, name: str, like: str, dim: int | None = None) -> None:
        v = self.g.values.get(like)
        shape = None if v is None or v.shape is None else tuple(v.shape[:-1]) + ((dim if dim is not None else v.shape[-1]),)
        self.g.add_value(name, v.dtype if v is not None else "float32", shape)

    def _insert_before(self, node: Node, new: Node) -> None:
        for i, n in enumerate(self.g.nodes):
            if n is node:
                self.g.nodes.insert(i, new)
                return
        self.g.nodes.append(new)

    def _dtype(self, s: "Segment"):
        v = self.g.values.get(s.value)
        return {"float16": np.float16, "float64": np.float64}.get(v.dtype if v is not None else "float32", np.float32)

    def _source(self, s: Segment, c: Contribution) -> None:
        """An explicit projection of the value ``c.value`` into the stream (SliceGPT's treatment of what it cannot
        rotate in place): a Linear, identity for now (``ones(d, 1)`` for a value broadcast over the hidden axis), that
        the rotation turns into ``Qᵀ`` (``d' x d``) like any writer. The source itself keeps its weights and its
        other readers. Root of a segment: every reader of the value reads the projection instead."""
        g = self.g
        v = c.value
        prod = g.producers().get(v)
        name = g.unique_name(f"{s.block}.stream_in" if s.block else "stream_in")
        out = g.unique_name(f"{v}.stream_in")
        self._value_like(out, s.value if s.value in g.values else v, s.dim)
        W = np.eye(s.dim) if c.width == s.dim else np.ones((s.dim, 1))
        at = c.add if c.add is not None else (prod if prod is not None else s.producer)
        module = at.module or (prod.module if prod is not None else None) or "stream_in"
        lin = Linear(name, [v], [out], {"module": module}, weight=Dense(W.astype(self._dtype(s))), bias=None)
        lin.meta["sparsec.slicing"] = "source"
        what = f"'{prod.name}' ({prod.op})" if prod is not None else f"graph input '{v}'"
        if c.add is not None:
            self._insert_before(c.add, lin)
            c.add.inputs[c.index] = out
        else:
            for n in g.nodes:
                n.inputs = [out if i == v else i for i in n.inputs]
            if prod is not None:
                g.nodes.insert(g.nodes.index(prod) + 1, lin)
            else:
                self._insert_before(s.producer, lin)
            s.restores = [o for o in s.restores if o.value != v]  # a graph output that is the source itself stays
            s.values.discard(v)
            s.ref_value = v
            s.value = out
            s.producer = lin
        s.values.add(out)
        c.kind, c.node = "linear", lin
        self.added.append(lin)
        self.added_notes[name] = f"projection of {what} into the residual stream (its output cannot be rotated in place)"

    def _shortcut(self, sc: Shortcut, centre: bool) -> None:
        g = self.g
        d = sc.src.dim
        dst = sc.dst
        u = sc.add.inputs[sc.index]
        base = f"{dst.block}.{dst.kind}_shortcut" if dst.block else f"{dst.label}_shortcut"
        name = g.unique_name(base)
        W = np.eye(d)
        b = None
        note = "residual shortcut"
        if sc.norm is not None:
            gamma, beta = self.affine[id(sc.norm)]
            if gamma is not None:
                W = np.diag(gamma)
            if beta is not None:
                b = beta.copy()
            note = f"residual shortcut carrying norm {sc.norm.name}'s scale/bias (post-norm)"
            if centre:
                W = W - W.mean(0, keepdims=True)
                b = None if b is None else b - b.mean()
        out = g.unique_name(f"{name}:out")
        self._value_like(out, u)
        lin = Linear(name, [u], [out], {"module": name} if dst.block else {}, weight=Dense(W.astype(self._dtype(dst))),
                     bias=None if b is None else b.astype(self._dtype(dst)))  # fmt: skip
        lin.meta["sparsec.slicing"] = "shortcut"
        self._insert_before(sc.add, lin)
        sc.add.inputs[sc.index] = out
        sc.linear = lin
        dst.values.add(out)
        sc.src.readers.append(Reader(lin, sc.norm))
        dst.contributions.append(Contribution("linear", lin, add=sc.add, index=sc.index))
        self.added.append(lin)
        self.added_notes[name] = note

    def _restore(self, s: Segment, o: Restore) -> None:
        """The graph output ``o.value`` computed back in the original basis from a renamed stream value."""
        g = self.g
        v = o.value
        inner = g.unique_name(f"{v}.sliced")
        p = None
        for n in g.nodes:
            n.inputs = [inner if i == v else i for i in n.inputs]
            if v in n.outputs:
                p = n
                n.outputs = [inner if x == v else x for x in n.outputs]
        self._value_like(inner, v)
        s.values.discard(v)
        s.values.add(inner)
        if s.value == v:  # the stream's value itself is the output (a model with no final norm): calibrate on the inner
            s.ref_value = s.ref_value or v
            s.value = inner
        name = g.unique_name("output_restore")
        W = np.eye(s.dim)
        b = None
        if o.norm is not None:
            gamma, beta = self.affine[id(o.norm)]
            if gamma is not None:
                W = np.diag(gamma)
            b = beta
        lin = Linear(name, [inner], [v], {"module": "output_restore"}, weight=Dense(W.astype(self._dtype(s))),
                     bias=None if b is None else b.astype(self._dtype(s)))  # fmt: skip
        lin.meta["sparsec.slicing"] = "restore"
        idx = g.nodes.index(p) + 1 if p is not None else len(g.nodes)
        g.nodes.insert(idx, lin)
        o.linear = lin
        s.readers.append(Reader(lin, o.norm))
        self.added.append(lin)
        self.added_notes[name] = "graph output rotated back to the original basis" + (
            f" with norm {o.norm.name}'s scale/bias" if o.norm is not None else "")

    def _private_shape(self, s: Segment, rs: Node) -> None:
        g = self.g
        d = s.dim
        shp = rs.inputs[1] if len(rs.inputs) > 1 else None
        if shp is None:
            raise _cannot(f"reshape '{rs.name}' of the residual stream has no shape input")
        if shp in g.constants:
            arr = np.asarray(g.constants[shp]).reshape(-1)
            if not arr.size or int(arr[-1]) != d:
                raise _cannot(f"reshape '{rs.name}' moves the hidden axis of the residual stream (shape {arr.tolist()}, dim {d})")
            new = g.unique_name(f"{rs.name}.shape")
            g.add_constant(new, np.asarray(g.constants[shp]).copy())
            rs.inputs[1] = new
            s.shape_consts.append(new)
            return
        p = g.producers().get(shp)
        if isinstance(p, Generic) and p.op_type == "Concat" and int(p.attributes.get("axis", 0)) in (0, -1) and p.inputs:
            last = p.inputs[-1]
            dynamic = last not in g.constants and self._dynamic_last(last, s)
            if last in g.constants or dynamic:
                # the stream's last dim, dynamic (x.size(-1)) or constant, becomes a private constant set to the sliced dim
                tail = np.array([d], dtype=np.int64) if dynamic else np.asarray(g.constants[last])
                arr = tail.reshape(-1)
                if not arr.size or int(arr[-1]) != d:
                    raise _cannot(f"reshape '{rs.name}' moves the hidden axis of the residual stream (its shape ends in {arr.tolist()}, dim {d})")
                newc = g.unique_name(f"{rs.name}.shape_tail")
                g.add_constant(newc, tail.copy())
                out = g.unique_name(f"{rs.name}.shape")
                v = g.values.get(shp)
                g.add_value(out, v.dtype if v is not None else "int64", None if v is None else v.shape)
                # the shape is computed in the Reshape's block: it changes when that block's stream is sliced
                meta = dict(p.meta)
                meta["module"] = self._module_near(rs)
                cat = Generic(g.unique_name(f"{rs.name}/shape_concat"), list(p.inputs[:-1]) + [newc], [out], meta,
                              op_type="Concat", domain=p.domain, attributes=dict(p.attributes), attr_types=dict(p.attr_types))  # fmt: skip
                self._insert_before(rs, cat)
                rs.inputs[1] = out
                s.shape_consts.append(newc)
                return
        if self._dynamic_last(shp, s, whole=True):
            newc = g.unique_name(f"{rs.name}.shape_tail")
            g.add_constant(newc, np.array([d], dtype=np.int64))
            rs.inputs[1] = self._shape_with_tail(shp, newc, rs, self._module_near(rs))
            s.shape_consts.append(newc)
            return
        raise _cannot(f"reshape '{rs.name}' of the residual stream takes its shape from '{shp}', which sparsec cannot "
                      f"follow (a constant, a Concat ending in a constant, or the stream's own dynamic shape)")  # fmt: skip

    def _shape_with_tail(self, shp: str, tail: str, before: Node, module: str | None) -> str:
        """A new value: the shape vector ``shp`` with its last entry replaced by the constant ``tail``."""
        g = self.g
        consts = {}
        for k, val in (("starts", 0), ("ends", -1), ("axes", 0)):
            consts[k] = g.unique_name(f"{shp}.head_{k}")
            g.add_constant(consts[k], np.array([val], dtype=np.int64))
        head = g.unique_name(f"{shp}.head")
        out = g.unique_name(f"{shp}.frozen")
        g.add_value(head, "int64", None)
        g.add_value(out, "int64", None)
        meta = {"module": module} if module else {}
        sl = Generic(g.unique_name(f"{shp}/head"), [shp, consts["starts"], consts["ends"], consts["axes"]], [head], dict(meta), op_type="Slice")
        cat = Generic(g.unique_name(f"{shp}/with_tail"), [head, tail], [out], dict(meta), op_type="Concat", attributes={"axis": 0})
        self._insert_before(before, sl)
        self._insert_before(before, cat)
        return out

    def _freeze_shape(self, s: Segment, sh: Generic) -> None:
        """``Shape(x)`` of a stream value, for anyone but the stream's own reshapes (already given private shapes):
        the original dim, not the sliced one (e.g. ``b, t, d = x.shape`` then ``attn.reshape(b, t, d)``: the
        attention width is not sliced)."""
        g = self.g
        x = sh.inputs[0]
        val = g.values.get(x)
        r = len(val.shape) if val is not None and val.shape is not None else None
        if r is None:
            if "start" in sh.attributes or "end" in sh.attributes:
                raise _cannot(f"'{sh.name}' reads part of the shape of the residual stream value '{x}' of unknown rank")
        else:
            start = int(sh.attributes.get("start", 0))
            end = int(sh.attributes.get("end", r))
            start, end = (start + r if start < 0 else start), (end + r if end < 0 else end)
            if end < r or start >= r:
                return  # the hidden dim is not part of it
        if sh.outputs[0] in g.outputs:
            raise _cannot(f"the graph output '{sh.outputs[0]}' is the shape of the residual stream")
        users = g.consumers().get(sh.outputs[0], [])
        if not users:
            return
        pos = {id(n): i for i, n in enumerate(g.nodes)}
        first = min(users, key=lambda n: pos[id(n)])
        tail = g.unique_name(f"{sh.name}.dim")
        g.add_constant(tail, np.array([s.dim], dtype=np.int64))
        out = self._shape_with_tail(sh.outputs[0], tail, first, sh.module or self._module_near(first))
        for c in users:
            c.inputs = [out if i == sh.outputs[0] else i for i in c.inputs]

    def _module_near(self, n: Node) -> str | None:
        """The module path of ``n``, else of the node producing its data input, else of a node reading its output."""
        if n.module:
            return n.module
        p = self.g.producers().get(n.inputs[0])
        if p is not None and p.module:
            return p.module
        for c in self.g.consumers().get(n.outputs[0], []):
            if c.module:
                return c.module
        return None

    def _dynamic_last(self, v: str, s: Segment, whole: bool = False) -> bool:
        """Is ``v`` the runtime last dim (or, ``whole``, the whole shape) of a value of this stream segment?"""
        prod = self.g.producers()
        for _ in range(8):
            p = prod.get(v)
            if not isinstance(p, Generic):
                return False
            if p.op_type in ("Squeeze", "Unsqueeze", "Cast", "Identity", "Reshape") and not whole:
                v = p.inputs[0]
                continue
            if p.op_type == "Shape":
                src = p.inputs[0]
                if src not in s.values:
                    return False
                if whole:
                    return "start" not in p.attributes and "end" not in p.attributes
                start = p.attributes.get("start")
                return start is not None and int(start) == -1 and "end" not in p.attributes
            if p.op_type == "Slice" and not whole:
                sp = prod.get(p.inputs[0])
                if not (isinstance(sp, Generic) and sp.op_type == "Shape" and sp.inputs[0] in s.values and not sp.attributes):
                    return False
                st = self.g.constants.get(p.inputs[1]) if len(p.inputs) > 1 else None
                en = self.g.constants.get(p.inputs[2]) if len(p.inputs) > 2 else None
                if st is None or en is None:
                    return False
                r = len(self.g.values[sp.inputs[0]].shape) if self.g.values.get(sp.inputs[0]) and self.g.values[sp.inputs[0]].shape else None
                s0 = int(np.asarray(st).reshape(-1)[0])
                e0 = int(np.asarray(en).reshape(-1)[0])
                return (s0 == -1 or (r is not None and s0 == r - 1)) and (e0 >= (r or 0) or e0 > 2**31)
            if p.op_type == "Gather" and not whole:
                sp = prod.get(p.inputs[0])
                idx = self.g.constants.get(p.inputs[1])
                if not (isinstance(sp, Generic) and sp.op_type == "Shape" and sp.inputs[0] in s.values and not sp.attributes) or idx is None:
                    return False
                val = self.g.values.get(sp.inputs[0])
                r = len(val.shape) if val is not None and val.shape else None
                i = int(np.asarray(idx).reshape(-1)[0])
                return i == -1 or (r is not None and i == r - 1)
            return False
        return False


# ----------------------------------------------------------------------------------------------------------------
def _pca(cov: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Eigenvectors of a symmetric matrix by decreasing eigenvalue, each with its largest entry positive."""
    c = torch.from_numpy(np.asarray(cov, dtype=np.float64))
    c = (c + c.T) / 2
    ev, vec = torch.linalg.eigh(c)
    order = torch.argsort(ev, descending=True, stable=True)
    ev, vec = ev[order].numpy(), vec[:, order].numpy()
    idx = np.argmax(np.abs(vec), axis=0)
    signs = np.sign(vec[idx, np.arange(vec.shape[1])])
    signs[signs == 0] = 1
    return vec * signs[None, :], ev


def _interleave(d: int, m: int = 4) -> np.ndarray:
    """Column order of the kept principal directions that puts, in every group of ``m`` consecutive stream
    channels, directions from ``m`` different variance ranks (rank g, g + d/m, g + 2d/m, ...). The model is the same
    under any order of the basis; N:M pruning of the readers afterwards (groups of consecutive input channels) then
    never has to drop two of the strongest directions from one group, which the plain decreasing order forces."""
    if d % m:
        return np.arange(d)
    return np.arange(d).reshape(m, d // m).T.reshape(-1)


def _rotate(graph: Graph, s: Segment, Q: np.ndarray) -> list[str]:
    """Rotate and slice segment ``s`` by ``Q`` (d x d'). Returns the heads it untied."""
    d, dn = Q.shape
    scale = math.sqrt(d / dn)
    for c in s.contributions:
        if c.kind == "embedding":
            t = c.node.table
            c.node.table = np.ascontiguousarray((t.astype(np.float64) @ Q).astype(t.dtype))
        elif c.kind == "const":
            a = graph.constants[c.const]
            graph.constants[c.const] = np.ascontiguousarray((a.astype(np.float64) @ Q).astype(a.dtype))
            v = graph.values[c.const]
            v.shape = tuple(graph.constants[c.const].shape)
        else:
            for lin in _writer_linears(c.node):
                W = _w(lin)
                b = None if lin.bias is None else lin.bias.astype(np.float64)
                _set(lin, Q.T @ W, None if b is None else Q.T @ b)
    untied = []
    for r in s.readers:
        for lin in _reader_linears(r.node):
            W = _w(lin) @ Q
            if r.norm is not None:
                W = W * scale
            _set(lin, W, None if lin.bias is None else lin.bias.astype(np.float64))
            t = lin.meta.pop("tied_to", None)
            if t is not None:
                untied.append(f"{lin.name} (was tied to {t})")
    for n in s.norms:
        n.eps = float(n.eps) * d / dn
    for name in s.shape_consts:
        a = np.asarray(graph.constants[name]).copy()
        flat = a.reshape(-1)
        flat[-1] = dn
        graph.constants[name] = flat.reshape(a.shape)
    for v in s.values:
        val = graph.values.get(v)
        if val is not None and val.shape:
            val.shape = tuple(val.shape[:-1]) + (dn,)
    return untied


def _stream_error(ref: list[torch.Tensor] | None, new: list[torch.Tensor] | None, Q: np.ndarray, mode: str) -> float | None:
    """‖x_ref - x_new Qᵀ‖ / ‖x_ref‖ over all held-out tokens (LayerNorm models: the mean-free part of x_ref)."""
    if not ref or not new or len(ref) != len(new):
        return None
    q = torch.from_numpy(Q)
    num = den = 0.0
    for a, b in zip(ref, new):
        a = a.to(torch.float64).cpu()
        if mode == "layernorm":
            a = a - a.mean(-1, keepdim=True)
        rec = b.to(torch.float64).cpu() @ q.T
        num += float(((a - rec) ** 2).sum())
        den += float((a**2).sum())
    return math.sqrt(num / den) if den > 0 else 0.0


class _RefTracker:
    """Runs the unsliced model on the held-out batches block by block, in step with the sliced one."""

    def __init__(self, ref: Graph, held, device):
        self.g = ref
        self.blocks = ref.assign_blocks()
        self.ex = Executor(ref, device)
        self.envs = [{k: self.ex.to_tensor(k, v) for k, v in b.items()} for b in held.batches()]
        self.next = 0

    def run_until(self, block_name: str, values: list[str]) -> dict[str, list[torch.Tensor]]:
        names = [b.name for b in self.blocks[self.next :]]
        if block_name not in names:
            return {}
        keep = _Keep(values)
        for env in self.envs:  # a stream starting at a graph input (projected): no node computes it
            for v in values:
                if v in self.g.inputs and v in env:
                    keep.value(v, env[v])
        stop = self.next + names.index(block_name) + 1
        for blk in self.blocks[self.next : stop]:
            self.envs = [self.ex.run_range(env, blk.start, blk.stop, keep) for env in self.envs]
        self.next = stop
        return keep.kept
