"""ONNX -> sparsec IR.

``load_onnx(path)`` reads a model (with its external ``.data`` file if it has one), checks it, infers shapes,
turns it into generic IR nodes, folds constants, and raises the ops the passes reason about (see ``raise_.py``).
Layer names are module paths (``encoder.layer.0.attention.self.query``), recovered from what the exporters leave:
sparsec's own ``sparsec.module`` node metadata, the dynamo exporter's ``pkg.torch.onnx.name_scopes``, the
TorchScript exporter's ``/encoder/layer.0/attention/self/query/MatMul`` node names, or ``*.weight`` initializer names.
"""
from __future__ import annotations

import ast
import hashlib
import os
import re
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..errors import ModelLoadError, UnsupportedOpError
from ..ir import Generic, Graph, Value, _np_dtype_name

# control flow with subgraphs cannot be executed or raised
_SUBGRAPH_OPS = {"If", "Loop", "Scan", "SequenceMap"}
_RANDOM_OPS = {"RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike", "Multinomial", "Bernoulli"}
_BIG = 1024  # initializers with more elements than this are hidden from shape inference (faster, no 2 GB limit)


TORCH_CHECKPOINT = ("is a torch.save checkpoint (weights without the model's graph; sparsec never unpickles): "
                    "export the model with torch.onnx.export (.onnx) or torch.export.export + torch.export.save (.pt2)")


def torch_checkpoint_names(names: list[str]) -> bool:
    """Whether a zip with these entries was written by ``torch.save`` (a ``data.pkl`` entry), e.g. a state_dict."""
    return any(n.rsplit("/", 1)[-1] == "data.pkl" for n in names)


def torch_checkpoint(path: str) -> bool:
    """Whether ``path`` is a zip written by ``torch.save``, e.g. a state_dict ``.pth``."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as zf:
            return torch_checkpoint_names(zf.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


def elem_type_name(t: int) -> str:
    if t == onnx.TensorProto.BFLOAT16:
        return "bfloat16"
    if t == onnx.TensorProto.STRING:
        return "string"
    if t == onnx.TensorProto.BOOL:
        return "bool"
    try:
        return np.dtype(helper.tensor_dtype_to_np_dtype(t)).name
    except Exception:
        return f"onnx:{t}"


def dtype_to_elem_type(name: str) -> int:
    if name == "bfloat16":
        return onnx.TensorProto.BFLOAT16
    if name == "bool":
        return onnx.TensorProto.BOOL
    if name == "string":
        return onnx.TensorProto.STRING
    return helper.np_dtype_to_tensor_dtype(np.dtype(name))


def _type_shape(vi: onnx.ValueInfoProto) -> tuple[str, tuple | None]:
    tt = vi.type.tensor_type
    dtype = elem_type_name(tt.elem_type) if tt.elem_type else "float32"
    if not tt.HasField("shape"):
        return dtype, None
    dims: list[Any] = []
    for d in tt.shape.dim:
        if d.HasField("dim_value"):
            dims.append(int(d.dim_value))
        elif d.HasField("dim_param") and d.dim_param:
            dims.append(str(d.dim_param))
        else:
            dims.append(None)
    return dtype, tuple(dims)


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_model(path: str) -> onnx.ModelProto:
    """Load an ONNX file with its external data, turning every failure into a one-line ModelLoadError."""
    if not os.path.exists(path):
        raise ModelLoadError(f"{path}: no such file")
    if os.path.isdir(path):
        raise ModelLoadError(f"{path}: is a directory, not a model file")
    size = os.path.getsize(path)
    if size == 0:
        raise ModelLoadError(f"{path}: empty file")
    with open(path, "rb") as f:
        head = f.read(8)
    if head.startswith(b"PK"):
        if torch_checkpoint(path):
            raise ModelLoadError(f"{path}: {TORCH_CHECKPOINT}")
        raise ModelLoadError(f"{path}: is a zip archive, not an ONNX model (a .pt2 file? give it a .pt2 name)")
    try:
        model = onnx.load(path, load_external_data=False)
    except Exception as e:  # protobuf DecodeError and friends
        raise ModelLoadError(f"{path}: not a valid ONNX model ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'parse error'})")
    if not model.HasField("graph") or (len(model.graph.node) == 0 and len(model.graph.output) == 0):
        raise ModelLoadError(f"{path}: not an ONNX model (no graph)")
    base = os.path.dirname(os.path.abspath(path))
    locs = sorted({e.value for init in model.graph.initializer if init.data_location == onnx.TensorProto.EXTERNAL
                   for e in init.external_data if e.key == "location"})  # fmt: skip
    missing = [loc for loc in locs if not os.path.isfile(os.path.join(base, loc))]
    if missing:  # onnx's own error says "... but it is not regular file"
        raise ModelLoadError(f"{path}: its external weight data file {missing[0]} is missing (looked in {base}: keep the .onnx "
                             "file and its data file together)")  # fmt: skip
    try:
        from onnx.external_data_helper import load_external_data_for_model

        load_external_data_for_model(model, base)
    except FileNotFoundError as e:
        raise ModelLoadError(f"{path}: external weight data is missing ({os.path.basename(str(e.filename or e))})")
    except Exception as e:
        raise ModelLoadError(f"{path}: external weight data could not be read ({type(e).__name__}: {e})")
    return model


def check_model(model: onnx.ModelProto, label: str) -> None:
    """Structural check. Truncated raw data or malformed graphs fail here rather than deep inside a pass."""
    for init in model.graph.initializer:
        if init.data_location == onnx.TensorProto.EXTERNAL:
            continue
        try:
            expected = int(np.prod(init.dims)) if init.dims else 1
            if init.raw_data:
                itemsize = np.dtype(helper.tensor_dtype_to_np_dtype(init.data_type)).itemsize
                if init.data_type in (onnx.TensorProto.INT4, onnx.TensorProto.UINT4):
                    continue
                if len(init.raw_data) != expected * itemsize:
                    raise ModelLoadError(
                        f"{label}: initializer '{init.name}' holds {len(init.raw_data)} bytes for {expected} elements (truncated or corrupt file)"
                    )
        except ModelLoadError:
            raise
        except Exception:
            continue
    try:
        onnx.checker.check_model(model, full_check=False)
    except onnx.checker.ValidationError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else "validation failed"
        raise ModelLoadError(f"{label}: ONNX checker rejected the model: {first}")
    except ValueError as e:  # > 2 GB models: checker refuses protos, skip (the path check below covers them)
        if "2GB" not in str(e) and "2 GB" not in str(e):
            raise ModelLoadError(f"{label}: ONNX checker rejected the model: {e}")


def infer_shapes(model: onnx.ModelProto) -> onnx.ModelProto:
    """Shape inference on a light copy: large initializers become typed graph inputs (no data needed)."""
    light = _light_copy(model)
    try:
        inferred = onnx.shape_inference.infer_shapes(light, check_type=False, strict_mode=False, data_prop=True)
    except Exception:
        inferred = light
    return inferred


def _light_copy(model: onnx.ModelProto) -> onnx.ModelProto:
    g = model.graph
    small = [i for i in g.initializer if int(np.prod(i.dims) if i.dims else 1) <= _BIG]
    big = [i for i in g.initializer if int(np.prod(i.dims) if i.dims else 1) > _BIG]
    graph = helper.make_graph(
        list(g.node),
        g.name,
        list(g.input) + [helper.make_tensor_value_info(i.name, i.data_type, list(i.dims)) for i in big if i.name not in {x.name for x in g.input}],
        list(g.output),
        small,
        value_info=list(g.value_info),
    )
    m = helper.make_model(graph, opset_imports=list(model.opset_import), ir_version=model.ir_version)
    return m


# ----------------------------------------------------------------------------------------------------------------
# module paths
_SCOPE_OP = re.compile(r"^[A-Za-z_]+(_\d+)?$")
_DOTTED = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z0-9_]+)*$")


def module_path(node: onnx.NodeProto) -> str | None:
    """The PyTorch module path of ``node``, from the exporter's metadata or node name; None when it has none.

    - dynamo exporter: the last scope of ``pkg.torch.onnx.name_scopes`` above the op. A Conv into which onnxscript's
      rewriter folded a BatchNorm carries the BatchNorm's scope: its weight's name (``l.0.c1.weight``) names the
      conv instead.
    - TorchScript exporter: ``/l/l.0/c1/Conv``. A called container and its child appear as ``l`` then ``l.0``;
      keeping only the child gives ``l.0.c1``, the path ``named_modules()`` prints.
    """
    md = {p.key: p.value for p in node.metadata_props}
    if md.get("sparsec.module"):
        return md["sparsec.module"]
    if "FuseBatchNormInto" in md.get("pkg.onnxscript.rewriter.rule_name", "") and len(node.input) > 1:
        w = node.input[1]
        if w.endswith(".weight") and _DOTTED.match(w):
            return w[: -len(".weight")]
    ns = md.get("pkg.torch.onnx.name_scopes")
    if ns:
        try:
            scopes = [s for s in ast.literal_eval(ns) if isinstance(s, str)]
        except (ValueError, SyntaxError):
            scopes = []
        scopes = [s for s in scopes if s]
        if len(scopes) >= 2:
            return scopes[-2]
        return None
    name = node.name
    if name.startswith("/"):
        parts = [p for p in name.strip("/").split("/") if p][:-1]
        parts = [p for i, p in enumerate(parts) if not (i + 1 < len(parts) and parts[i + 1].startswith(p + "."))]
        if parts:
            return ".".join(parts)
    return None


def attr_value(a: onnx.AttributeProto, node_name: str, op_type: str) -> tuple[Any, str]:
    t = a.type
    A = onnx.AttributeProto
    if t == A.FLOAT:
        return float(a.f), "FLOAT"
    if t == A.INT:
        return int(a.i), "INT"
    if t == A.STRING:
        try:
            return a.s.decode("utf-8"), "STRING"
        except UnicodeDecodeError:
            return bytes(a.s), "STRING"
    if t == A.TENSOR:
        return numpy_helper.to_array(a.t), "TENSOR"
    if t == A.FLOATS:
        return [float(x) for x in a.floats], "FLOATS"
    if t == A.INTS:
        return [int(x) for x in a.ints], "INTS"
    if t == A.STRINGS:
        return [s.decode("utf-8", "replace") for s in a.strings], "STRINGS"
    if t == A.TENSORS:
        return [numpy_helper.to_array(x) for x in a.tensors], "TENSORS"
    if t in (A.GRAPH, A.GRAPHS):
        raise UnsupportedOpError(f"{op_type} with a subgraph attribute (control flow) at node '{node_name}' is not supported")
    raise UnsupportedOpError(f"attribute '{a.name}' of type {t} at node '{node_name}' ({op_type}) is not supported")


def _bf16(a: np.ndarray) -> bool:
    """A bfloat16 array as onnx reads one (ml_dtypes, or raw 2-byte void): sparsec computes those in float32."""
    return a.dtype.kind == "V" or "bfloat16" in str(a.dtype)


def to_array(init: onnx.TensorProto) -> np.ndarray:
    arr = numpy_helper.to_array(init)
    if _bf16(arr):
        arr = arr.astype(np.float32)
    return np.array(arr)  # own the memory (not a view of the proto)


def proto_to_graph(model: onnx.ModelProto, name: str | None = None) -> Graph:
    """Generic conversion: every ONNX node becomes a Generic IR node; initializers and Constant nodes constants."""
    g = Graph(name or (model.graph.name or "model"))
    g.opset = {("" if o.domain in ("", "ai.onnx") else o.domain): int(o.version) for o in model.opset_import}
    if "" not in g.opset:
        g.opset[""] = 13
    g.meta = {"producer": f"{model.producer_name} {model.producer_version}".strip(), "ir_version": int(model.ir_version)}
    for p in model.metadata_props:
        if p.key.startswith("sparsec."):
            g.meta[p.key] = p.value
    if model.functions:
        names = ", ".join(sorted({f.name for f in model.functions}))
        raise UnsupportedOpError(f"model-local ONNX functions ({names}) are not supported; inline them first (onnx.inliner.inline_local_functions)")

    inferred = infer_shapes(model)
    for vi in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output):
        dtype, shape = _type_shape(vi)
        g.values[vi.name] = Value(vi.name, dtype, shape)

    init_names = set()
    for init in model.graph.initializer:
        if init.name in init_names:
            raise ModelLoadError(f"initializer '{init.name}' is defined twice")
        init_names.add(init.name)
        try:
            g.add_constant(init.name, to_array(init))
        except Exception as e:
            raise ModelLoadError(f"initializer '{init.name}' cannot be read ({type(e).__name__}: {e})")
    for vi in model.graph.input:
        if vi.name in init_names:
            continue  # old-style models list initializers as inputs
        g.inputs.append(vi.name)
        dtype, shape = _type_shape(vi)
        g.values[vi.name] = Value(vi.name, dtype, shape)
    for vi in model.graph.output:
        g.outputs.append(vi.name)
        dtype, shape = _type_shape(vi)
        cur = g.values.get(vi.name)
        if cur is None or cur.shape is None:
            g.values[vi.name] = Value(vi.name, dtype, shape)

    used_names: set[str] = set()
    for idx, node in enumerate(model.graph.node):
        domain = "" if node.domain in ("", "ai.onnx") else node.domain
        if node.op_type in _SUBGRAPH_OPS and domain == "":
            raise UnsupportedOpError(f"{node.op_type} (control flow with subgraphs) at node '{node.name or idx}' is not supported")
        attrs, types = {}, {}
        for a in node.attribute:
            if a.ref_attr_name:
                raise UnsupportedOpError(f"attribute reference in node '{node.name}' is not supported")
            attrs[a.name], types[a.name] = attr_value(a, node.name, node.op_type)
        if node.op_type == "Constant" and domain == "":
            arr = _constant_value(attrs, node)
            g.add_constant(node.output[0], arr)
            continue
        nname = node.name or f"{node.op_type}_{idx}"
        if nname in used_names:
            nname = f"{nname}#{idx}"
        used_names.add(nname)
        meta = {"onnx_name": node.name} if node.name else {}
        mp = module_path(node)
        if mp:
            meta["module"] = mp
        md = {p.key: p.value for p in node.metadata_props if p.key.startswith("sparsec.")}
        if md:
            meta["sparsec"] = md
        g.add_node(Generic(nname, list(node.input), list(node.output), meta, op_type=node.op_type, domain=domain, attributes=attrs, attr_types=types))
        for o in node.output:
            if o and o not in g.values:
                g.values[o] = Value(o, "float32", None)
    return g


def _constant_value(attrs: dict, node: onnx.NodeProto) -> np.ndarray:
    if "value" in attrs:
        v = attrs["value"]
        return np.array(v.astype(np.float32) if _bf16(v) else v)
    if "value_float" in attrs:
        return np.array(attrs["value_float"], dtype=np.float32)
    if "value_floats" in attrs:
        return np.array(attrs["value_floats"], dtype=np.float32)
    if "value_int" in attrs:
        return np.array(attrs["value_int"], dtype=np.int64)
    if "value_ints" in attrs:
        return np.array(attrs["value_ints"], dtype=np.int64)
    raise UnsupportedOpError(f"Constant node '{node.name}' with attributes {sorted(attrs)} is not supported")


BF16_WARNING = ("the model computes in bfloat16: sparsec imports it as float32 (weights, inputs, outputs, casts), and "
                "the artifact's model.onnx and library compute in float32 (onnxruntime's CPU provider has no "
                "bfloat16 kernels); feed float32 inputs")


def bfloat16_as_float32(g: Graph) -> bool:
    """Rewrite a bfloat16 model to compute in float32: value dtypes (graph inputs and outputs included), Cast-to-
    bfloat16 targets and bfloat16 tensor attributes (initializers and Constant nodes are read as float32 already).
    True when anything was bfloat16 (the import then warns, BF16_WARNING)."""
    bf16 = onnx.TensorProto.BFLOAT16
    changed = False
    for v in g.values.values():
        if v.dtype == "bfloat16":
            v.dtype, changed = "float32", True
    for n in g.nodes:
        if not isinstance(n, Generic):
            continue
        if n.op_type == "Cast" and n.domain in ("", None) and n.attributes.get("to") == bf16:
            n.attributes["to"], changed = onnx.TensorProto.FLOAT, True
        for k, a in list(n.attributes.items()):
            if isinstance(a, np.ndarray) and _bf16(a):
                n.attributes[k], changed = a.astype(np.float32), True
    return changed


def load_onnx(source: "str | os.PathLike | onnx.ModelProto", *, name: str | None = None, raise_ops: bool = True,
              validate: bool = True) -> Graph:
    """Import an ONNX model (path or ModelProto) into sparsec's IR, raised and validated."""
    from .raise_ import raise_graph  # local import: raise_ needs the executor's op library

    if isinstance(source, onnx.ModelProto):
        model, label, digest = source, name or "model", hashlib.sha256(source.SerializeToString()).hexdigest()
    else:
        path = os.fspath(source)
        label = path
        model = read_model(path)
        digest = file_sha256(path)
        name = name or os.path.splitext(os.path.basename(path))[0]
    check_model(model, label)
    g = proto_to_graph(model, name)
    g.meta["source_sha256"] = digest
    if bfloat16_as_float32(g):
        g.meta["source_float"] = "bfloat16"
        g.meta.setdefault("import_warnings", []).append(BF16_WARNING)
    pq = prequantized(g)
    if pq:
        g.meta["prequantized"] = pq
        g.meta.setdefault("import_warnings", []).append(f"the model is already quantized ({pq}): sparsec compresses float "
                                                        "models")  # fmt: skip
    if raise_ops:
        g.meta["raised"] = raise_graph(g)
        narrow = [n for n in g.linears() if n.meta.get("source_dtype") == "float16"]
        if narrow:
            g.meta.setdefault("import_warnings", []).append(
                f"{len(narrow)} layer weight(s) are stored as float16 in the file and cast to float32 by the model (e.g. "
                f"'{narrow[0].name}'): sparsec computes them in float32 and stores uncompressed ones in float32 (twice "
                f"their bytes in the file); sizes are compared with the file's")  # fmt: skip
    if validate:
        g.validate()
    return g


# integer-arithmetic and quantized-weight operators of quantization tools (onnxruntime.quantization: quantize_dynamic,
# QOperator format; com.microsoft contrib ops); QDQ models are recognised by a DequantizeLinear of an integer constant
_QUANT_OPS = {"MatMulInteger", "ConvInteger", "QLinearMatMul", "QLinearConv", "DynamicQuantizeLinear", "QGemm",
              "MatMulNBits", "MatMulIntegerToFloat", "DynamicQuantizeMatMul", "QAttention", "QLinearAdd", "QLinearMul",
              "DynamicQuantizeLSTM", "QOrderedMatMul", "GatherBlockQuantized"}  # fmt: skip


def prequantized(g: Graph) -> str:
    """What makes ``g`` an already-quantized model ("" when nothing does): integer operators, or weights stored as
    integers behind a ``DequantizeLinear`` (QDQ)."""
    from collections import Counter

    ops = Counter(n.op_type for n in g.nodes if isinstance(n, Generic) and n.op_type in _QUANT_OPS)
    qdq = [n for n in g.nodes if isinstance(n, Generic) and n.op_type == "DequantizeLinear" and n.inputs
           and n.inputs[0] in g.constants and np.asarray(g.constants[n.inputs[0]]).dtype.kind in "iu"]  # fmt: skip
    parts = [f"{k} x{v}" for k, v in sorted(ops.items())]
    if qdq:
        eg = next((n for n in qdq if np.ndim(g.constants[n.inputs[0]]) >= 2), qdq[0])  # a weight matrix, not a bias
        parts.append(f"{len(qdq)} integer weight(s) behind DequantizeLinear, e.g. '{eg.inputs[0]}'")
    return ", ".join(parts)
