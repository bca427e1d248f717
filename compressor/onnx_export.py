"""sparsec IR -> ONNX (the artifact's portable model).

Raised ops lower back to standard ONNX: Linear -> MatMul [+ Add], LayerNorm -> LayerNormalization (opset >= 17,
decomposed below), RMSNorm -> its decomposition, Embedding -> Gather, Residual -> Add, MoE -> a dense-combination
form (every expert computed, combined with top-k gates scattered into a [tokens, routes] matrix). Generic nodes are
written back as they came.

Each Linear is lowered by the first entry of ``LINEAR_LOWERINGS`` that accepts its weight format; with
``weights="dense"`` every weight is materialized to a dense MatMul (the reference semantics). Compressed formats
register native lowerings (e.g. MatMulNBits for 4-bit group quantization) in their own modules.

Nodes carry ``sparsec.*`` metadata (module path, Linear name, MoE roles) so that importing the exported model
gives back the same layer names and MoE structure.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .errors import IRError
from .frontends.onnx import dtype_to_elem_type
from .ir import Conv, Embedding, Generic, Graph, LayerNorm, Linear, MoE, Node, Residual, RMSNorm

IR_VERSION = 10  # node metadata_props need IR version 10


@dataclass
class ExportOptions:
    weights: str = "native"  # "native": compressed formats use native ONNX ops where a lowering exists; "dense"
    opset: int | None = None
    float_dtype: str = "float32"


@dataclass
class Builder:
    opset: int
    options: ExportOptions
    nodes: list[onnx.NodeProto] = field(default_factory=list)
    initializers: list[onnx.TensorProto] = field(default_factory=list)
    taken: set[str] = field(default_factory=set)
    domains: dict[str, int] = field(default_factory=dict)

    def fresh(self, base: str) -> str:
        base = base.replace(" ", "_") or "v"
        name, k = base, 1
        while name in self.taken:
            name = f"{base}_{k}"
            k += 1
        self.taken.add(name)
        return name

    def init(self, hint: str, array: np.ndarray) -> str:
        name = self.fresh(hint)
        self.initializers.append(numpy_helper.from_array(np.asarray(array, order="C"), name))
        return name

    def node(self, op: str, inputs: list[str], outputs: list[str] | int = 1, *, name: str, domain: str = "",
             meta: dict[str, str] | None = None, **attrs) -> list[str]:  # fmt: skip
        if isinstance(outputs, int):
            outputs = [self.fresh(f"{name}/{op}_out{i}") for i in range(outputs)]
        else:
            self.taken.update(outputs)
        nd = helper.make_node(op, inputs, outputs, name=self.fresh(name), domain=domain or None, **attrs)
        if domain:
            self.domains.setdefault(domain, 1)
        for k, v in sorted((meta or {}).items()):
            p = nd.metadata_props.add()
            p.key, p.value = k, str(v)
        self.nodes.append(nd)
        return outputs

    def axes_input_or_attr(self, op: str, x: str, axes: list[int], name: str, meta, keepdims: int = 1, out=1):
        """Reduce ops take axes as an input from opset 18 (ReduceSum from 13)."""
        as_input = self.opset >= (13 if op == "ReduceSum" else 18)
        if as_input:
            a = self.init(f"{name}/axes", np.array(axes, dtype=np.int64))
            return self.node(op, [x, a], out, name=name, meta=meta, keepdims=keepdims)
        return self.node(op, [x], out, name=name, meta=meta, axes=axes, keepdims=keepdims)


LinearLowering = Callable[[Builder, Linear, str, str, dict], bool]
LINEAR_LOWERINGS: list[LinearLowering] = []
# hooks that may raise the export opset of a graph (default opset only): fn(graph, opset) -> opset
OPSET_HOOKS: list[Callable[[Graph, int], int]] = []


def register_linear_lowering(fn: LinearLowering, first: bool = True) -> LinearLowering:
    if fn not in LINEAR_LOWERINGS:
        LINEAR_LOWERINGS.insert(0, fn) if first else LINEAR_LOWERINGS.append(fn)
    return fn


def lower_linear_dense(b: Builder, lin: Linear, x: str, y: str, meta: dict) -> bool:
    w = lin.weight.materialize() if lin.weight.kind != "dense" else lin.weight.data
    # weights in the activation dtype: a pass leaves float32 arrays, a float16 model's MatMul needs float16 ones
    wt = np.asarray(w.T, order="C").astype(_np_float(b.options.float_dtype))
    wname = b.init(f"{lin.name}.weight_t", wt)
    if lin.bias is None:
        b.node("MatMul", [x, wname], [y], name=f"{lin.name}/MatMul", meta=meta)
    else:
        (mm,) = b.node("MatMul", [x, wname], 1, name=f"{lin.name}/MatMul", meta=meta)
        bname = b.init(f"{lin.name}.bias", lin.bias.astype(wt.dtype))
        b.node("Add", [mm, bname], [y], name=f"{lin.name}/Add", meta=meta)
    return True


def _np_float(name: str):
    return {"float16": np.float16, "float64": np.float64}.get(name, np.float32)


def lower_linear(b: Builder, lin: Linear, x: str, y: str, meta: dict) -> None:
    if b.options.weights == "native":
        for fn in LINEAR_LOWERINGS:
            if fn(b, lin, x, y, meta):
                return
    lower_linear_dense(b, lin, x, y, meta)


def _linear_meta(lin: Linear, extra: dict | None = None) -> dict:
    meta = {"sparsec.linear": lin.name, "sparsec.module": lin.module or lin.name}
    if extra:
        meta.update(extra)
    return meta


def _lower_rmsnorm(b: Builder, n: RMSNorm, x: str, y: str, meta: dict) -> None:
    fdt = _np_float(b.options.float_dtype)
    half = fdt == np.float16  # computed in float32 and cast back (HF's RMSNorm, sparsec's executor)
    cdt = np.float32 if half else fdt
    if half:
        (x,) = b.node("Cast", [x], 1, name=f"{n.name}/Cast", meta=meta, to=onnx.TensorProto.FLOAT)
    two = b.init(f"{n.name}/two", np.array(2.0, dtype=cdt))
    (sq,) = b.node("Pow", [x, two], 1, name=f"{n.name}/Pow", meta=meta)
    (ms,) = b.axes_input_or_attr("ReduceMean", sq, [-1], f"{n.name}/ReduceMean", meta)
    eps = b.init(f"{n.name}/eps", np.array(n.eps, dtype=cdt))
    (a,) = b.node("Add", [ms, eps], 1, name=f"{n.name}/Add", meta=meta)
    (s,) = b.node("Sqrt", [a], 1, name=f"{n.name}/Sqrt", meta=meta)
    (r,) = b.node("Reciprocal", [s], 1, name=f"{n.name}/Reciprocal", meta=meta)
    last = n.weight is None and not half
    (nx,) = b.node("Mul", [x, r], [y] if last else 1, name=f"{n.name}/Mul", meta=meta)
    if half:
        (nx,) = b.node("Cast", [nx], [y] if n.weight is None else 1, name=f"{n.name}/Cast_1", meta=meta, to=onnx.TensorProto.FLOAT16)
    if n.weight is not None:
        w = b.init(f"{n.name}.weight", np.asarray(n.weight).astype(fdt))
        b.node("Mul", [nx, w], [y], name=f"{n.name}/Mul_1", meta=meta)


def _lower_layernorm(b: Builder, n: LayerNorm, x: str, y: str, meta: dict, dim: int | None) -> None:
    if b.opset >= 17:
        size = n.dim or dim
        if size is None:
            raise IRError("LayerNorm without affine parameters needs a known channel dim to export", node=n.name)
        fdt = _np_float(b.options.float_dtype)
        scale = n.weight if n.weight is not None else np.ones(size, dtype=np.float32)
        ins = [x, b.init(f"{n.name}.weight", np.asarray(scale).astype(fdt))]
        if n.bias is not None:
            ins.append(b.init(f"{n.name}.bias", np.asarray(n.bias).astype(fdt)))
        b.node("LayerNormalization", ins, [y], name=f"{n.name}/LayerNormalization", meta=meta, axis=-1, epsilon=float(n.eps))
        return
    (mean,) = b.axes_input_or_attr("ReduceMean", x, [-1], f"{n.name}/ReduceMean", meta)
    (d,) = b.node("Sub", [x, mean], 1, name=f"{n.name}/Sub", meta=meta)
    (sq,) = b.node("Mul", [d, d], 1, name=f"{n.name}/Mul", meta=meta)
    (var,) = b.axes_input_or_attr("ReduceMean", sq, [-1], f"{n.name}/ReduceMean_1", meta)
    eps = b.init(f"{n.name}/eps", np.array(n.eps, dtype=np.float32))
    (a,) = b.node("Add", [var, eps], 1, name=f"{n.name}/Add", meta=meta)
    (s,) = b.node("Sqrt", [a], 1, name=f"{n.name}/Sqrt", meta=meta)
    last = n.weight is None and n.bias is None
    (nx,) = b.node("Div", [d, s], [y] if last else 1, name=f"{n.name}/Div", meta=meta)
    if n.weight is not None:
        w = b.init(f"{n.name}.weight", n.weight)
        (nx,) = b.node("Mul", [nx, w], [y] if n.bias is None else 1, name=f"{n.name}/Mul_1", meta=meta)
    if n.bias is not None:
        bb = b.init(f"{n.name}.bias", n.bias)
        b.node("Add", [nx, bb], [y], name=f"{n.name}/Add_1", meta=meta)


_ACT_LOWER = {
    "relu": lambda b, x, name, meta: b.node("Relu", [x], 1, name=name, meta=meta)[0],
    "identity": lambda b, x, name, meta: x,
}


def _lower_act(b: Builder, act: str, x: str, name: str, meta: dict) -> str:
    if act in _ACT_LOWER:
        return _ACT_LOWER[act](b, x, name, meta)
    if act == "silu":
        (s,) = b.node("Sigmoid", [x], 1, name=f"{name}/Sigmoid", meta=meta)
        return b.node("Mul", [x, s], 1, name=f"{name}/Mul", meta=meta)[0]
    if act in ("gelu", "gelu_tanh"):
        if b.opset >= 20:
            return b.node("Gelu", [x], 1, name=f"{name}/Gelu", meta=meta, approximate="tanh" if act == "gelu_tanh" else "none")[0]
        half = b.init(f"{name}/half", np.array(0.5, dtype=np.float32))
        one = b.init(f"{name}/one", np.array(1.0, dtype=np.float32))
        if act == "gelu":
            k = b.init(f"{name}/rsqrt2", np.array(1 / np.sqrt(2.0), dtype=np.float32))
            (t,) = b.node("Mul", [x, k], 1, name=f"{name}/Mul", meta=meta)
            (e,) = b.node("Erf", [t], 1, name=f"{name}/Erf", meta=meta)
        else:
            c = b.init(f"{name}/c", np.array(0.044715, dtype=np.float32))
            k = b.init(f"{name}/k", np.array(np.sqrt(2.0 / np.pi), dtype=np.float32))
            (x2,) = b.node("Mul", [x, x], 1, name=f"{name}/Mul2", meta=meta)
            (x3,) = b.node("Mul", [x2, x], 1, name=f"{name}/Mul3", meta=meta)
            (cx3,) = b.node("Mul", [x3, c], 1, name=f"{name}/MulC", meta=meta)
            (s,) = b.node("Add", [x, cx3], 1, name=f"{name}/AddC", meta=meta)
            (ks,) = b.node("Mul", [s, k], 1, name=f"{name}/MulK", meta=meta)
            (e,) = b.node("Tanh", [ks], 1, name=f"{name}/Tanh", meta=meta)
        (p1,) = b.node("Add", [e, one], 1, name=f"{name}/Add1", meta=meta)
        (h,) = b.node("Mul", [x, half], 1, name=f"{name}/MulHalf", meta=meta)
        return b.node("Mul", [h, p1], 1, name=f"{name}/Mul_out", meta=meta)[0]
    raise IRError(f"cannot export activation {act!r}")


def _lower_moe(b: Builder, n: MoE, x: str, y: str) -> None:
    base = {"sparsec.moe": n.name, "sparsec.module": n.module or n.name}

    def meta(role=None, **extra):
        m = dict(base)
        if role:
            m["sparsec.moe.role"] = role
        m.update(extra)
        return m

    attrs = dict(n.attrs())
    attrs["module"] = n.module or n.name
    (logits,) = [b.fresh(f"{n.name}/router_logits")]
    lower_linear(b, n.router, x, logits, _linear_meta(n.router, meta("router", **{"sparsec.moe.attrs": json.dumps(attrs, sort_keys=True)})))
    if n.score == "softmax":
        (probs,) = b.node("Softmax", [logits], 1, name=f"{n.name}/Softmax", meta=meta(), axis=-1)
    else:
        (probs,) = b.node("Sigmoid", [logits], 1, name=f"{n.name}/Sigmoid", meta=meta())
    k = b.init(f"{n.name}/k", np.array([n.top_k], dtype=np.int64))
    topv, topi = b.node("TopK", [probs, k], 2, name=f"{n.name}/TopK", meta=meta(), axis=-1, largest=1, sorted=1)
    if n.renormalize:
        (ssum,) = b.axes_input_or_attr("ReduceSum", topv, [-1], f"{n.name}/ReduceSum", meta())
        (topv,) = b.node("Div", [topv, ssum], 1, name=f"{n.name}/Div", meta=meta())
    zero = b.init(f"{n.name}/zero", np.array(0.0, dtype=np.float32))
    (zeros,) = b.node("Mul", [probs, zero], 1, name=f"{n.name}/Zeros", meta=meta())
    (gates,) = b.node("ScatterElements", [zeros, topi, topv], 1, name=f"{n.name}/Scatter", meta=meta(), axis=-1)
    routes_of: dict[int, list[int]] = {}
    emap = n.expert_map if n.expert_map is not None else list(range(len(n.experts)))
    for r, e in enumerate(emap):
        routes_of.setdefault(e, []).append(r)
    partials = []
    for i, e in enumerate(n.experts):
        routes = routes_of.get(i, [])
        if not routes:
            continue
        idx = b.init(f"{n.name}/experts.{i}/routes", np.array(routes, dtype=np.int64))
        (ge,) = b.node("Gather", [gates, idx], 1, name=f"{n.name}/experts.{i}/Gather", meta=meta(), axis=-1)
        (ge,) = b.axes_input_or_attr("ReduceSum", ge, [-1], f"{n.name}/experts.{i}/GateSum", meta())
        pre = f"experts.{i}"
        (hu,) = [b.fresh(f"{e.up.name}/out")]
        lower_linear(b, e.up, x, hu, _linear_meta(e.up, meta(f"{pre}.up")))
        if e.gate is not None:
            (hg,) = [b.fresh(f"{e.gate.name}/out")]
            lower_linear(b, e.gate, x, hg, _linear_meta(e.gate, meta(f"{pre}.gate")))
            a = _lower_act(b, e.act, hg, f"{n.name}/{pre}/act", meta())
            (h,) = b.node("Mul", [a, hu], 1, name=f"{n.name}/{pre}/GLU", meta=meta())
        else:
            h = _lower_act(b, e.act, hu, f"{n.name}/{pre}/act", meta())
        (ho,) = [b.fresh(f"{e.down.name}/out")]
        lower_linear(b, e.down, h, ho, _linear_meta(e.down, meta(f"{pre}.down")))
        (ye,) = b.node("Mul", [ho, ge], 1, name=f"{n.name}/{pre}/Weighted", meta=meta())
        partials.append(ye)
    b.node("Sum", partials, [y], name=f"{n.name}/Sum", meta=meta("output"))


def _attribute(name: str, value: Any, attr_type: str | None) -> onnx.AttributeProto:
    if isinstance(value, np.ndarray):
        return helper.make_attribute(name, numpy_helper.from_array(value))
    if isinstance(value, list) and value and isinstance(value[0], np.ndarray):
        return helper.make_attribute(name, [numpy_helper.from_array(v) for v in value])
    if attr_type:
        t = getattr(onnx.AttributeProto, attr_type)
        if t == onnx.AttributeProto.FLOAT:
            value = float(value)
        elif t == onnx.AttributeProto.FLOATS:
            value = [float(v) for v in value]
        return helper.make_attribute(name, value, attr_type=t)
    return helper.make_attribute(name, value)


def _value_info(g: Graph, name: str) -> onnx.ValueInfoProto:
    v = g.values.get(name)
    if v is None:
        return helper.make_empty_tensor_value_info(name)
    shape = None if v.shape is None else [d if d is not None else None for d in v.shape]
    return helper.make_tensor_value_info(name, dtype_to_elem_type(v.dtype), shape)


def convert_node(nd: onnx.NodeProto, src: int, dst: int) -> list[onnx.NodeProto] | None:
    """Default-domain node ``nd`` of opset ``src`` as nodes of opset ``dst`` (the same node where its op did not change
    in between; onnx's version converter where it did: ``Split`` without sizes needs ``num_outputs`` from 18, Reduce*
    and opset-11 Squeeze / Unsqueeze / Split take ``axes`` / ``split`` as inputs, ...). Values it adds are named
    ``_v_*`` (see :func:`upgrade_node`). None when the converter has no adapter for it."""
    if dst <= src:
        return [nd]
    try:
        if onnx.defs.get_schema(nd.op_type, src).since_version == onnx.defs.get_schema(nd.op_type, dst).since_version:
            return [nd]
    except onnx.defs.SchemaError:
        return None
    from onnx import version_converter

    ins = [i for i in nd.input if i]
    g1 = helper.make_graph([nd], "node", [helper.make_tensor_value_info(i, onnx.TensorProto.UNDEFINED, None) for i in ins],
                           [helper.make_tensor_value_info(o, onnx.TensorProto.UNDEFINED, None) for o in nd.output if o])  # fmt: skip
    try:
        m = version_converter.convert_version(helper.make_model(g1, opset_imports=[helper.make_opsetid("", src)]), dst)
    except Exception:  # noqa: BLE001 - no adapter for this op / these attributes
        return None
    return [onnx.NodeProto.FromString(x.SerializeToString()) for x in m.graph.node]


def upgrade_node(nd: onnx.NodeProto, src: int, dst: int, b: Builder) -> list[onnx.NodeProto]:
    """A node of the source model's default-domain opset ``src`` written into a model of opset ``dst`` (raised for a
    compressed layer's lowering, e.g. blocked DequantizeLinear at 21; :func:`onnx_lowerings.upgrade_safe` raises it
    only where every node converts): :func:`convert_node`, the constants it adds renamed to fresh names."""
    conv = convert_node(nd, src, dst)
    if conv is None or conv == [nd]:
        return [nd]
    keep = {i for i in nd.input if i} | {o for o in nd.output if o}
    ren: dict[str, str] = {}
    for x in conv:
        for i, name in enumerate(x.input):
            if name in ren:
                x.input[i] = ren[name]
        for i, name in enumerate(x.output):
            if name and name not in keep:
                ren[name] = x.output[i] = b.fresh(f"{nd.name}/{name.strip('_')}")
        if x.op_type == nd.op_type:
            x.name = nd.name
            del x.metadata_props[:]
            x.metadata_props.extend(nd.metadata_props)
        else:
            x.name = b.fresh(f"{nd.name}/{x.op_type}")
    return conv


def generic_proto(n: Generic, name: str | None = None) -> onnx.NodeProto:
    """The ONNX node of a generic IR node (its op, inputs, outputs and attributes)."""
    nd = helper.make_node(n.op_type, list(n.inputs), list(n.outputs), name=name or n.name, domain=n.domain or None)
    for k in sorted(n.attributes):
        nd.attribute.append(_attribute(k, n.attributes[k], n.attr_types.get(k)))
    return nd


def to_onnx(g: Graph, options: ExportOptions | None = None) -> onnx.ModelProto:
    options = options or ExportOptions()
    opset = options.opset or int(g.opset.get("", 17))
    if options.opset is None and options.weights == "native":
        for hook in OPSET_HOOKS:
            opset = hook(g, opset)
    source_opset = int(g.opset.get("", 17))
    b = Builder(opset=opset, options=options)
    b.taken.update(g.inputs)
    b.taken.update(g.constants)
    for n in g.nodes:
        b.taken.update(o for o in n.outputs if o)
    for cname, arr in g.constants.items():
        b.initializers.append(numpy_helper.from_array(np.asarray(arr, order="C"), cname))
    default_float = options.float_dtype
    for n in g.nodes:
        meta = {"sparsec.module": n.module} if n.module else {}
        # compressed layers and norms are written in their input's float dtype (float16 exports)
        xv = g.values.get(n.inputs[0]) if n.inputs and n.inputs[0] else None
        act = xv.dtype if xv is not None else None
        options.float_dtype = act if act in ("float16", "float32", "float64") else default_float
        if isinstance(n, Generic):
            nd = generic_proto(n, b.fresh(n.name))
            for k, v in sorted(meta.items()):
                p = nd.metadata_props.add()
                p.key, p.value = k, v
            if n.domain:
                b.domains.setdefault(n.domain, g.opset.get(n.domain, 1))
            b.nodes.extend(upgrade_node(nd, source_opset, opset, b) if not n.domain else [nd])
        elif isinstance(n, Conv):
            _lowerings.lower_conv(b, n, n.inputs[0], n.outputs[0], _linear_meta(n))
        elif isinstance(n, Linear):
            lower_linear(b, n, n.inputs[0], n.outputs[0], _linear_meta(n))
        elif isinstance(n, LayerNorm):
            s = g.values.get(n.inputs[0])
            dim = s.shape[-1] if s is not None and s.shape and isinstance(s.shape[-1], int) else None
            _lower_layernorm(b, n, n.inputs[0], n.outputs[0], meta, dim)
        elif isinstance(n, RMSNorm):
            _lower_rmsnorm(b, n, n.inputs[0], n.outputs[0], meta)
        elif isinstance(n, Embedding):
            t = b.init(f"{n.name}.weight", n.table)
            b.node("Gather", [t, n.inputs[0]], [n.outputs[0]], name=f"{n.name}/Gather", meta=meta, axis=0)
        elif isinstance(n, Residual):
            b.node("Add", list(n.inputs), [n.outputs[0]], name=f"{n.name}/Add", meta=meta)
        elif isinstance(n, MoE):
            _lower_moe(b, n, n.inputs[0], n.outputs[0])
        else:
            raise IRError(f"cannot export op {n.op}", node=n.name)
    options.float_dtype = default_float
    graph = helper.make_graph(
        b.nodes,
        g.name,
        [_value_info(g, i) for i in g.inputs],
        [_value_info(g, o) for o in g.outputs],
        b.initializers,
    )
    opsets = [helper.make_opsetid("", opset)]
    for dom, ver in sorted(b.domains.items()):
        if dom:
            opsets.append(helper.make_opsetid(dom, int(g.opset.get(dom, ver))))
    model = helper.make_model(graph, opset_imports=opsets, producer_name="sparsec", producer_version=_version())
    model.ir_version = IR_VERSION
    for k, v in sorted(g.meta.items()):
        if isinstance(k, str) and k.startswith("sparsec.") and isinstance(v, str):
            p = model.metadata_props.add()
            p.key, p.value = k, v
    return model


def _version() -> str:
    from sparsec import __version__

    return __version__


def save_onnx(model: onnx.ModelProto, path: str) -> list[str]:
    """Write ``model`` to ``path``; models over ~1.5 GB get an external ``<name>.data`` file. Returns the files."""
    import os

    size = sum(len(i.raw_data) for i in model.graph.initializer)
    if size > 1_500_000_000:
        data = os.path.basename(path) + ".data"
        onnx.save_model(model, path, save_as_external_data=True, all_tensors_to_one_file=True, location=data, size_threshold=1024)
        return [path, os.path.join(os.path.dirname(path), data)]
    with open(path, "wb") as f:
        f.write(model.SerializeToString(deterministic=True))
    return [path]


from . import onnx_lowerings as _lowerings  # noqa: E402  (compressed-format lowerings register themselves)

_lowerings.register()
