"""Lowering: sparsec graph IR -> one TVM Relax function (``main``), built with ``relax.BlockBuilder``.

- **Linear** (also MoE routers and experts): the kernel chosen by the registry
  (:func:`sparsec.backends.kernels.registry.select_kernel`) for the weight's format and the target, called with
  ``relax.call_tir`` on the activations flattened to ``[M, in]`` (``M`` symbolic). Dense weights without a registered
  kernel take TVM's dense path (``relax.op.matmul``, legalized then scheduled by DLight on GPU / LLVM on CPU).
  ``LowRank`` weights are decomposed: ``base(x) + (x @ B.T) @ A.T`` (two small Relax matmuls).
- **LayerNorm / RMSNorm / Embedding / Residual**: Relax ops (``nn.layer_norm``, ``nn.rms_norm``, ``take``, ``add``).
- **MoE**: router through the registry, ``softmax``/``sigmoid``, ``topk``, optional renormalization; then
  - **routed** (x86, :func:`moe_routed_default`): each expert runs on the tokens routed to it, gathered in token
    order; their count is data-dependent (``tensor_to_shape`` + ``match_cast``), so an expert no token chose runs its
    kernels on 0 rows and reads no weights (one decode token reads top-k experts, not all). Every token gathers its
    top-k rows of the concatenated expert outputs back (:meth:`_Lowerer.moe_routed_combine`). These layers sit outside
    the dataflow blocks (FuseOps would reorder the uses of a count above its binding);
  - **dense-equivalent** (CUDA, aarch64, wasm): the route weights scattered to a dense ``[tokens, experts]`` matrix
    (``one_hot``; merged experts through the ``expert_map`` as a one-hot ``[routes, experts]`` matmul) and
    ``y = sum_e w[:, e] * expert_e(x)``: every expert on every token (``experts/top_k`` times the FLOPs), tokens not
    routed to an expert weighted 0, so the result equals the executor's routed computation. aarch64 / wasm: their
    standalone call plans (backends/cross.py) size every buffer from the input dims; CUDA: the routed form is slower
    there (:func:`moe_routed_default`).
- **Generic ONNX nodes**: TVM's own ONNX converters (``tvm.relax.frontend.onnx``), called node by node on the same
  BlockBuilder, with the node's attributes rebuilt as ONNX ``AttributeProto`` s.

Dynamic dims: every named symbolic dim of the graph inputs (``batch``, ``seq``...) is one ``tirx.Var`` (int64);
unnamed unknown dims get fresh ones. The library therefore serves any batch size and sequence length.

Weights are **parameters**, not constants: ``main(inputs..., params...)`` (``num_input`` attribute). :class:`Lowered`
lists every parameter with where it comes from (``ParamBinding.source``): a kernel's prepared weights
(``{"kind": "kernel", "linear", "path", "kernel", "config", "index"}``: the runtime re-runs that kernel's registered
``prepare`` on the format read from ``weights.safetensors``), a node's array (``{"kind": "node", "node", "role"}``),
a low-rank factor or a graph constant. Only small constants (integers, and float tensors of at most
``CONST_INLINE_MAX`` elements: shapes, axes, scalars, masks) are inlined in the library; so are constants a TVM
converter needs at compile time (e.g. a Reshape's shape).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..compressor.errors import BuildError, UnsupportedOpError
from ..compressor.formats import LowRank
from ..compressor.ir import Conv, Embedding, Generic, Graph, LayerNorm, Linear, MoE, Residual, RMSNorm
from .kernels.registry import KernelImpl, ShapeHints, format_key, select_kernel

CONST_INLINE_MAX = 64
# ops whose output holds the same index values as their first input (positions through unsqueeze/expand/casts)
_INDEX_PRESERVING = {"Unsqueeze", "Squeeze", "Reshape", "Expand", "Cast", "Identity", "Flatten", "Tile"}
BROADCAST_OPS = {"Add", "Sub", "Mul", "Div", "Pow", "Where", "Equal", "Less", "LessOrEqual", "Greater", "GreaterOrEqual",
                 "And", "Or", "Xor", "Max", "Min", "Mod", "BitwiseAnd", "BitwiseOr", "PRelu", "MatMul", "Sum", "Mean"}  # fmt: skip


@dataclass
class ParamBinding:
    name: str
    shape: tuple[int, ...]
    dtype: str
    source: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "shape": [int(s) for s in self.shape], "dtype": self.dtype, "source": self.source}


@dataclass
class Lowered:
    mod: Any  # tvm.IRModule
    inputs: list[dict[str, Any]]
    outputs: list[str]
    params: list[ParamBinding]
    kernels: list[dict[str, Any]]  # per Linear: layer, format, kernel, config, tuned, note
    sources: dict[str, str] = field(default_factory=dict)  # PrimFunc name -> TVMScript source (generated kernels)
    input_ranges: dict[str, list[int]] = field(default_factory=dict)  # int inputs feeding an Embedding: [0, vocab)
    moe: list[str] = field(default_factory=list)
    moe_routed: bool = True  # MoE layers: routed (gather / experts / scatter-add) or dense-equivalent
    extra_modules: list[Any] = field(default_factory=list)  # KernelImpl.extra_modules of every kernel used
    # symbolic input dim -> [largest size the model supports, why]: a buffer sliced by it (causal mask), positions
    # gathered by it (learned position embeddings). Checked by the runtimes before a call (TVM does not check it).
    dim_limits: dict[str, list] = field(default_factory=dict)
    # symbolic input dim -> the input dim the model requires it to equal (unify_broadcast): attention_mask's
    # ``attention_mask_dynamic_axes_2`` -> ``input_ids_dynamic_axes_2``. Checked by the runtimes before a call.
    dim_ties: dict[str, str] = field(default_factory=dict)
    # lines for the build report: input dims the model fixes though the inputs declare them symbolic (the library takes
    # them at that size only: _Lowerer.fix_input_dim), and Reshapes checked at run time (_Lowerer.reshape_guard)
    notes: list[str] = field(default_factory=list)


def _sanitize(name: str) -> str:
    s = re.sub(r"[^0-9A-Za-z_]", "_", name)
    return s if s and (s[0].isalpha() or s[0] == "_") else f"_{s}"


class _Lowerer:
    def __init__(self, graph: Graph, target, tuning, act_dtype: str = "float32", dense_kernel: str | None = None,
                 moe_routed: bool | None = None, io_dtypes: dict[str, str] | None = None,
                 fixed_dims: dict[str, int] | None = None):  # fmt: skip
        from tvm import relax

        self.relax = relax
        self.g = graph
        self.target = target
        self.tuning = tuning
        self.act_dtype = act_dtype
        self.io_dtypes = dict(io_dtypes or {})  # graph inputs / outputs cast at the library's boundary
        self.dense_kernel = dense_kernel  # force a generator name for dense layers (bench: "tvm.dense")
        self.bb = relax.BlockBuilder()
        self.env: dict[str, Any] = {}
        # conv outputs (and elementwise ops on them) kept channels-last: name -> NHWC expr; their NCHW form is emitted
        # only when some other op reads them (value()), so conv -> relu / add -> conv chains need no transposes
        self.nhwc: dict[str, Any] = {}
        self.params: list[ParamBinding] = []
        self.param_vars: list[Any] = []
        self.kernels: list[dict[str, Any]] = []
        self.sources: dict[str, str] = {}
        self._funcs: dict[tuple, Any] = {}  # (kernel name, source) -> GlobalVar
        self._func_names: set[str] = set()
        self.sym: dict[str, Any] = {}
        self.input_syms: list[Any] = []
        self.fixed_dims = dict(fixed_dims or {})  # symbolic input dim -> the size it is lowered at (a static dim)
        self.found_fixed: dict[str, tuple[int, str]] = {}  # symbolic input dim -> (the size the model needs, node)
        self.reshape_fixed: list[tuple[str, int, Any]] = []  # (Reshape node, input dim, the size it needs): reshape_guard
        self.const_params: dict[str, tuple[Any, Any]] = {}  # var name -> (var, tvm tensor) for TVM's get_constant
        self.input_ranges: dict[str, list[int]] = {}
        self.dim_limits: dict[str, list] = {}
        self.dim_ties: dict[str, str] = {}
        self.index_limits: dict[str, Any] = {}  # value -> exclusive bound of its values (Range(0, seq) -> seq)
        self.moe_notes: list[str] = []
        # MoE: routed (each expert on the tokens routed to it) or dense-equivalent (every expert on every token)
        self.moe_routed = moe_routed if moe_routed is not None else moe_routed_default(target)
        self.extra_modules: list[Any] = []
        self._importer = None
        self.shape_values: dict[str, Any] = {}  # small int tensors known at compile time (see fold)
        self._ana = None

    # ---- parameters ----------------------------------------------------------------------------------------
    def add_param(self, shape, dtype: str, source: dict[str, Any], hint: str):
        relax = self.relax
        name = f"p{len(self.params)}_{_sanitize(hint)[:48]}"
        v = relax.Var(name, relax.TensorType([int(s) for s in shape], dtype))
        self.params.append(ParamBinding(name, tuple(int(s) for s in shape), dtype, source))
        self.param_vars.append(v)
        return v

    def node_param(self, node, role: str, array: np.ndarray, dtype: str | None = None):
        dt = dtype or _dtype_name(array.dtype)
        return self.add_param(array.shape, dt, {"kind": "node", "node": node.name, "role": role, "dtype": dt}, f"{node.name}.{role}")

    # ---- inputs --------------------------------------------------------------------------------------------
    def dim(self, d, fresh: str):
        from tvm import tirx

        if isinstance(d, int):
            return d
        key = d if isinstance(d, str) else fresh
        if key in self.fixed_dims:
            return int(self.fixed_dims[key])
        if key not in self.sym:
            self.sym[key] = tirx.Var(_sanitize(key), "int64")
        return self.sym[key]

    def input_vars(self):
        relax = self.relax
        vars_, info = [], []
        for i, name in enumerate(self.g.inputs):
            v = self.g.values.get(name)
            if v is None or v.shape is None:
                raise UnsupportedOpError(f"graph input '{name}' has an unknown rank: the library needs at least the rank")
            shape = [self.dim(d, f"{name}_d{j}") for j, d in enumerate(v.shape)]
            dt = self.io_dtypes.get(name, v.dtype)
            var = relax.Var(_sanitize(name), relax.TensorType(shape, dt))
            self.input_syms.extend(d for d in shape if not isinstance(d, int) and all(not d.same_as(s) for s in self.input_syms))
            vars_.append(var)
            self.env[name] = var
            info.append({"name": name, "dtype": dt, "shape": [d if isinstance(d, int) else str(d) for d in shape]})
        return vars_, info

    # ---- values --------------------------------------------------------------------------------------------
    def value(self, name: str):
        if not name:
            return None
        if name in self.env:
            return self.env[name]
        if name in self.nhwc:
            e = self.nhwc[name]
            nd = len(_shape_of(e)) - 2
            y = self.bb.emit(self.relax.op.permute_dims(e, [0, nd + 1, *range(1, nd + 1)]))
            self.env[name] = y
            return y
        if name in self.g.constants:
            return self.constant(name)
        raise BuildError(f"value '{name}' is used before it is computed")

    def constant(self, name: str):
        import tvm

        relax = self.relax
        a = np.asarray(self.g.constants[name])
        if a.dtype.kind in "USO":
            raise UnsupportedOpError(f"constant '{name}' holds strings: not supported by the compiled backend")
        if a.dtype.kind in "biu" or a.size <= CONST_INLINE_MAX:
            e = relax.const(np.array(a, order="C"), _dtype_name(a.dtype))
        else:
            dt = _dtype_name(a.dtype)
            e = self.add_param(a.shape, dt, {"kind": "constant", "name": name, "dtype": dt}, f"const_{name}")
            self.const_params[e.name] = (e, tvm.runtime.tensor(np.array(a, order="C")))
        self.env[name] = e
        return e

    # ---- Linear --------------------------------------------------------------------------------------------
    def flatten(self, x, in_features: int, where: str):
        relax = self.relax
        shape = _shape_of(x)
        if shape is None:
            raise UnsupportedOpError(f"the input of '{where}' has an unknown shape", hint="give the model static ranks")
        lead = list(shape[:-1])
        m = 1
        for d in lead:
            m = m * d
        if len(lead) == 1:
            return x, lead, lead[0]
        x2 = self.bb.emit(relax.op.reshape(x, (m, in_features)))
        return x2, lead, m

    def unflatten(self, y, lead, out_features: int):
        if len(lead) == 1:
            return y
        return self.bb.emit(self.relax.op.reshape(y, (*lead, out_features)))

    def linear2d(self, lin: Linear, x2, m, path: tuple[str, ...] = (), weight=None, bias_handled=False):
        """``[m, in] -> [m, out]`` for a Linear (or a view of it: ``path`` names the nested format, e.g. LowRank base)."""
        relax = self.relax
        w = weight if weight is not None else lin.weight
        if isinstance(w, LowRank):
            view = Linear(lin.name, lin.inputs, lin.outputs, weight=w.base, bias=lin.bias)
            y = self.linear2d(view, x2, m, path + ("base",), weight=w.base)
            dt = self.act_dtype
            bt = self.add_param((w.in_features, w.rank), dt, {"kind": "lowrank", "linear": lin.name, "path": list(path),
                                                             "factor": "b_t", "dtype": dt}, f"{lin.name}.lr_b")  # fmt: skip
            at = self.add_param((w.rank, w.out_features), dt, {"kind": "lowrank", "linear": lin.name, "path": list(path),
                                                              "factor": "a_t", "dtype": dt}, f"{lin.name}.lr_a")  # fmt: skip
            xin = x2 if _dtype_of(x2) == dt else self.bb.emit(relax.op.astype(x2, dt))
            t = self.bb.emit(relax.op.matmul(xin, bt))
            r = self.bb.emit(relax.op.matmul(t, at))
            if _dtype_of(r) != _dtype_of(y):
                r = self.bb.emit(relax.op.astype(r, _dtype_of(y)))
            self.kernels.append({"layer": lin.name, "part": ".".join(path + ("lowrank",)), "format": f"rank {w.rank}",
                                 "kernel": "tvm.dense", "config": {}, "tuned": False, "note": "low-rank residual: Relax matmuls"})  # fmt: skip
            return self.bb.emit(relax.op.add(y, r))
        hints = ShapeHints(m="m", act_dtype=self.act_dtype)
        only = self.dense_kernel if (self.dense_kernel and format_key(w) == "dense") else None
        try:
            impl = select_kernel(lin, self.target, hints, self.tuning, only=only)
        except (ValueError, LookupError) as e:
            raise BuildError(f"layer '{lin.name}': {e}")
        pvars = []
        for i, p in enumerate(impl.params):
            src = {"kind": "kernel", "linear": lin.name, "path": list(path), "kernel": impl.name, "config": impl.config, "index": i}
            pvars.append(self.add_param(p.shape, p.dtype, src, f"{lin.name}.{p.name}"))
        xin = x2 if _dtype_of(x2) == impl.act_dtype else self.bb.emit(relax.op.astype(x2, impl.act_dtype))
        out_f = w.shape[0]
        self.extra_modules.extend(impl.extra_modules)
        if impl.func is not None:
            gv = self.kernel_func(impl, lin)
            y = self.bb.emit(relax.call_tir(gv, [xin, *pvars], relax.TensorType((m, out_f), impl.out_dtype)))
        else:
            y = impl.emit(self.bb, xin, pvars)
        model_dt = _dtype_of(x2)
        if impl.out_dtype != model_dt:
            y = self.bb.emit(relax.op.astype(y, model_dt))
        if lin.bias is not None and not impl.fuses_bias:
            b = self.add_param(lin.bias.shape, model_dt, {"kind": "node", "node": lin.name, "role": "bias", "dtype": model_dt},
                               f"{lin.name}.bias")  # fmt: skip
            y = self.bb.emit(relax.op.add(y, b))
        self.kernels.append({"layer": lin.name, "part": ".".join(path), "format": w.describe(), "format_key": format_key(w),
                             "kernel": impl.name, "config": impl.config, "tuned": bool(impl.tuned), "note": impl.note})  # fmt: skip
        return y

    def kernel_func(self, impl: KernelImpl, lin: Linear):
        src = getattr(impl, "source", None)
        key = (impl.name, src) if src is not None else (impl.name, id(impl.func))
        gv = self._funcs.get(key)
        if gv is None:
            gv = self.bb.add_func(impl.func, self.unique_func_name(f"{impl.name}_{lin.weight.shape[0]}x{lin.weight.shape[1]}"))
            self._funcs[key] = gv
            if src is not None:
                self.sources[gv.name_hint] = src
        return gv

    def conv(self, n: Conv):
        """A :class:`Conv` through the layer's GEMM kernel (the same kernels as a Linear of its format, dense ones too):
        im2col of the NHWC input (one TE op, :func:`_im2col_te`, columns in the order of the weight's input axis) ->
        ``linear2d``; an unpadded 1x1 stride-1 conv needs no im2col. Returns ``(y, True)`` with ``y`` channels-last
        (NHWC: see ``self.nhwc``); the input is read channels-last from ``self.nhwc`` when it is there. On x86 this made
        a dense ResNet-style net 31x faster than Relax's convolution with TVM's default schedule (1554 -> 49 ms, batch
        1). Spatial sizes unknown at compile time: Relax's convolution of the dense kernel, ``(y, False)``, NCHW."""
        relax = self.relax
        nd = len(n.kernel_shape)
        xl = self.nhwc.get(n.inputs[0])  # the input already channels-last (another conv's output)
        x = self.value(n.inputs[0]) if xl is None else None
        shape = _shape_of(x) if x is not None else _nchw_shape(_shape_of(xl))
        if shape is None or len(shape) != nd + 2:
            raise UnsupportedOpError(f"the input of conv '{n.name}' has an unknown rank", hint="give the model static ranks")
        spatial = [_static_int(d) for d in shape[2:]]
        outs = n.out_spatial(spatial)
        dt = _dtype_of(x if x is not None else xl)
        if any(o is None for o in outs):
            if x is None:
                x = self.value(n.inputs[0])
            w = self.add_param((n.out_features, n.in_channels, *n.kernel_shape), dt, {"kind": "conv_weight", "node": n.name, "dtype": dt},
                               f"{n.name}.weight")  # fmt: skip
            op = (relax.op.nn.conv1d, relax.op.nn.conv2d, relax.op.nn.conv3d)[nd - 1]
            y = self.bb.emit(op(x, w, strides=tuple(n.strides), padding=tuple(n.pads), dilation=tuple(n.dilations)))
            if n.bias is not None:
                b = self.node_param(n, "bias", n.bias, dt)
                y = self.bb.emit(relax.op.add(y, relax.op.reshape(b, (n.out_features,) + (1,) * nd)))
            self.kernels.append({"layer": n.name, "part": "", "format": n.weight.describe(), "format_key": "dense",
                                 "kernel": f"tvm.conv{nd}d", "config": {}, "tuned": False,
                                 "note": "spatial sizes unknown at compile time: Relax convolution of the dense kernel"})  # fmt: skip
            return y, False
        xh = x if xl is None else xl
        if self.target.is_gpu and dt == "float32":  # the CUDA kernels read float16: im2col moves half the bytes in it
            xh = self.bb.emit(relax.op.astype(xh, "float16"))
        if xl is None:
            xh = self.bb.emit(relax.op.permute_dims(xh, [0, *range(2, nd + 2), 1]))  # NHWC: channels last
        if n.kernel_size == 1 and all(s == 1 for s in n.strides) and not any(n.pads):
            cols = xh
        else:
            cols = self.bb.emit_te(_im2col_te(n, outs), xh, primfunc_name_hint="im2col")
        m = shape[0]
        for o in outs:
            m = m * o
        x2 = self.bb.emit(relax.op.reshape(cols, (m, n.in_features)))
        y2 = self.linear2d(n, x2, m)
        y = self.bb.emit(relax.op.reshape(y2, (shape[0], *outs, n.out_features)))
        return (y if _dtype_of(y) == dt else self.bb.emit(relax.op.astype(y, dt))), True  # NHWC

    def grouped_conv(self, n: Generic):
        """A grouped ONNX ``Conv`` (1 < group, at least 2 input and GROUPED_CONV_MIN_OUT output channels a group),
        constant weight, static spatial sizes: channels-last im2col of every group (one TE op, ``[G, rows, kernel *
        C/G]``) and one batched matmul with the weight as ``[G, kernel * C/G, O/G]``, which the CPU matmul schedule
        covers (None when it does not apply). TVM's grouped ``conv2d`` has three reduction axes and no default schedule
        takes it: with 16 and more output channels a group it ran as a plain loop nest, 18-42x slower on x86 (a
        64-channel 3x3 group-4 conv at 16x16: 1.33 ms vs 0.062 ms); with fewer (ResNeXt's 32 groups of 4) TVM's own is
        2-5x faster than this batched matmul of 4-8 columns, so those stay TVM's."""
        relax = self.relax
        if n.op_type != "Conv" or n.domain or len(n.inputs) < 2 or len(n.outputs) != 1:
            return None
        groups = int(n.attributes.get("group", 1))
        w = self.g.constants.get(n.inputs[1])
        if groups <= 1 or w is None or np.asarray(w).dtype.kind != "f" or not 3 <= w.ndim <= 5:
            return None
        out_c, cg, nd = int(w.shape[0]), int(w.shape[1]), w.ndim - 2
        if out_c % groups or cg < 2 or out_c // groups < GROUPED_CONV_MIN_OUT:
            return None
        geo = self._grouped_geometry(n, w)
        bias = self._conv_bias(n, out_c)
        if geo is None or bias is False:
            return None
        kernel = geo.kernel_shape
        operand = self._grouped_operand(n, geo, groups * cg)
        if operand is None:
            return None
        xh, shape, _spatial, outs, dt = operand
        cols = self.bb.emit_te(_im2col_te(geo, outs, groups), xh, primfunc_name_hint="im2col_grouped")  # [G, rows, K]
        og, ksz = out_c // groups, geo.kernel_size * cg
        wv = self.value(n.inputs[1])  # [O, C/G, *kernel] -> [G, kernel positions x C/G, O/G] (im2col's column order)
        wv = self.bb.emit(relax.op.reshape(wv, (groups, og, cg, *kernel)))
        wv = self.bb.emit(relax.op.permute_dims(wv, [0, *range(3, nd + 3), 2, 1]))
        wv = self.as_dtype(self.bb.emit(relax.op.reshape(wv, (groups, ksz, og))), dt)
        y = self.bb.emit(relax.op.matmul(cols, wv))  # [G, rows, O/G]
        y = self.bb.emit(relax.op.permute_dims(y, [1, 0, 2]))
        y = self.bb.emit(relax.op.reshape(y, (shape[0], *outs, out_c)))  # NHWC, channel g * O/G + o
        if bias is not None:
            b = self.value(bias)
            y = self.bb.emit(relax.op.add(y, self.as_dtype(b, dt)))
        return y

    def depthwise_conv(self, n: Generic):
        """A depthwise ONNX ``Conv`` (one input channel a group: ``group`` = input channels, any channel multiplier),
        constant weight, static spatial sizes, on a CPU target: computed channels-last by one kernel (None when it does
        not apply), every output the explicit sum over the kernel positions (zero outside the input, as the padding),
        the channel axis vectorized and the first output axis run in parallel (:func:`_depthwise_func`). Before, such a
        conv took TVM's grouped ``conv2d``, which no default schedule takes, on an NCHW copy of its channels-last input
        (``python bench/depthwise_x86.py`` times both and onnxruntime)."""
        relax = self.relax
        if self.target.is_gpu or n.op_type != "Conv" or n.domain or len(n.inputs) < 2 or len(n.outputs) != 1:
            return None
        groups = int(n.attributes.get("group", 1))
        w = self.g.constants.get(n.inputs[1])
        if groups <= 1 or w is None or np.asarray(w).dtype.kind != "f" or not 3 <= w.ndim <= 5 or w.shape[1] != 1:
            return None
        out_c = int(w.shape[0])
        geo = self._grouped_geometry(n, w)
        if geo is None or out_c % groups:
            return None
        bias = self._conv_bias(n, out_c)
        if bias is False or geo.kernel_size > DEPTHWISE_MAX_TAPS:
            return None
        operand = self._grouped_operand(n, geo, groups)
        if operand is None:
            return None
        xh, shape, spatial, outs, dt = operand
        wv = self.value(n.inputs[1])  # [O, 1, *kernel] -> [kernel positions, O]
        wv = self.bb.emit(relax.op.permute_dims(relax.op.reshape(wv, (out_c, geo.kernel_size)), [1, 0]))
        args = [xh, self.as_dtype(wv, dt)] + ([self.as_dtype(self.value(bias), dt)] if bias is not None else [])
        from .cpu_schedule import _lanes

        func = _depthwise_func(geo, shape[0], spatial, groups, out_c, dt, bias is not None, _lanes(self.target.tvm_target()))
        gv = self.add_own_func(func, f"depthwise_{n.name}")
        out_shape = (shape[0], *outs, out_c)
        return self.bb.emit(relax.call_tir(gv, args, relax.TensorType(out_shape, dt)))

    def conv_transpose(self, n: Generic):
        """An ONNX ``ConvTranspose`` (group 1, constant weight, static spatial sizes, no ``output_shape``): one matmul
        of the channels-last input ``[N x spatial, C_in]`` by the weight as ``[C_in, kernel positions x C_out]``
        (every input pixel's contribution to each kernel position), then a col2im that sums, for each output pixel,
        the contributions of the taps that land on it (:func:`_col2im_te`; with stride = kernel, U-Net's 2x2 up-conv,
        exactly one). Output channels-last (None when it does not apply). TVM's ``conv2d_transpose`` is not scheduled:
        a lone 2x2 stride-2 up-conv of 64 -> 32 channels at 8x8 took 2.9 ms on x86, onnxruntime 0.018 ms."""
        relax = self.relax
        if n.op_type != "ConvTranspose" or n.domain or len(n.inputs) < 2 or len(n.outputs) != 1:
            return None
        w = self.g.constants.get(n.inputs[1])
        a = n.attributes
        if w is None or np.asarray(w).dtype.kind != "f" or not 3 <= w.ndim <= 5 or int(a.get("group", 1)) != 1 or "output_shape" in a:
            return None
        in_c, out_c, nd = int(w.shape[0]), int(w.shape[1]), w.ndim - 2
        geo = self._grouped_geometry(n, w)  # (the weight's trailing axes are the kernel here too)
        bias = self._conv_bias(n, out_c)
        if geo is None or bias is False:
            return None
        extra = tuple(int(v) for v in a.get("output_padding", [0] * nd))

        def out_spatial(spatial):  # the transposed conv's output sizes
            return [geo.strides[d] * (spatial[d] - 1) + extra[d] + (geo.kernel_shape[d] - 1) * geo.dilations[d] + 1
                    - geo.pads[d] - geo.pads[nd + d] for d in range(nd)]  # fmt: skip

        operand = self._grouped_operand(n, geo, in_c, out_spatial)
        if operand is None:
            return None
        xh, shape, spatial, outs, dt = operand
        rows = shape[0]
        for d in spatial:
            rows = rows * d
        wv = self.value(n.inputs[1])  # [C_in, C_out, *kernel] -> [C_in, kernel positions x C_out]
        wv = self.bb.emit(relax.op.permute_dims(relax.op.reshape(wv, (in_c, out_c, geo.kernel_size)), [0, 2, 1]))
        wv = self.as_dtype(self.bb.emit(relax.op.reshape(wv, (in_c, geo.kernel_size * out_c))), dt)
        cols = self.bb.emit(relax.op.matmul(relax.op.reshape(xh, (rows, in_c)), wv))
        cols = self.bb.emit(relax.op.reshape(cols, (shape[0], *spatial, geo.kernel_size, out_c)))
        args = [cols] + ([self.as_dtype(self.value(bias), dt)] if bias is not None else [])
        return self.bb.emit_te(_col2im_te(geo, spatial, outs, bias is not None), *args, primfunc_name_hint="col2im")

    def as_dtype(self, e, dt: str):
        """``e`` cast to ``dt`` (``e`` itself when it already is)."""
        return e if _dtype_of(e) == dt else self.bb.emit(self.relax.op.astype(e, dt))

    def unique_func_name(self, base: str) -> str:
        """``base`` sanitized, with ``_1``, ``_2`` ... where another function of the module has that name."""
        base = _sanitize(base)
        name, i = base, 1
        while name in self._func_names:
            name, i = f"{base}_{i}", i + 1
        self._func_names.add(name)
        return name

    def add_own_func(self, func, base: str):
        """Add a PrimFunc sparsec made (a depthwise conv, a Trilu) under a unique name: its global symbol is its name."""
        name = self.unique_func_name(base)
        return self.bb.add_func(func.with_attr("global_symbol", name), name)

    def _grouped_operand(self, n: Generic, geo: "_ConvGeometry", in_c: int, out_spatial=None):
        """The channels-last input of a grouped Conv (or ConvTranspose: ``out_spatial`` maps input to output sizes)
        with ``in_c`` channels and static spatial sizes (permuted from NCHW unless another conv left it channels-last),
        its NCHW shape, spatial and output sizes and dtype; None when the input does not fit."""
        nd = len(geo.kernel_shape)
        xl = self.nhwc.get(n.inputs[0])
        x = self.value(n.inputs[0]) if xl is None else None
        shape = _shape_of(x) if x is not None else _nchw_shape(_shape_of(xl))
        if shape is None or len(shape) != nd + 2 or _static_int(shape[1]) != in_c:
            return None
        spatial = [_static_int(d) for d in shape[2:]]
        if any(d is None for d in spatial):
            return None
        outs = (out_spatial or geo.out_spatial)(spatial)
        if any(o < 1 for o in outs):
            return None
        xh = xl if xl is not None else self.bb.emit(self.relax.op.permute_dims(x, [0, *range(2, nd + 2), 1]))
        return xh, shape, spatial, outs, _dtype_of(xh)

    def _grouped_geometry(self, n: Generic, w) -> "_ConvGeometry | None":
        """The geometry of a grouped ONNX Conv from its attributes (None where sparsec's grouped lowerings do not take
        it: SAME padding, a kernel_shape other than the weight's)."""
        nd = w.ndim - 2
        kernel = tuple(int(k) for k in n.attributes.get("kernel_shape", w.shape[2:]))
        auto = n.attributes.get("auto_pad", "NOTSET")
        auto = auto.decode() if isinstance(auto, bytes) else str(auto)
        if kernel != tuple(w.shape[2:]) or auto not in ("NOTSET", "", "VALID"):
            return None
        return _ConvGeometry(kernel, tuple(int(k) for k in n.attributes.get("strides", [1] * nd)),
                             tuple(int(k) for k in n.attributes.get("pads", [0] * (2 * nd))) if auto != "VALID" else (0,) * (2 * nd),
                             tuple(int(k) for k in n.attributes.get("dilations", [1] * nd)))  # fmt: skip

    def _conv_bias(self, n: Generic, out_c: int):
        """A grouped Conv's bias input: None without one, False when it is not a constant of ``out_c`` values."""
        bias = n.inputs[2] if len(n.inputs) > 2 and n.inputs[2] else None
        if bias is not None and (bias not in self.g.constants or np.asarray(self.g.constants[bias]).size != out_c):
            return False
        return bias

    def _nhwc_operand(self, n: Generic):
        """The channels-last first input of a one-output ONNX-domain op (None when that input is not channels-last)."""
        if n.domain or not n.inputs or n.inputs[0] not in self.nhwc or len(n.outputs) != 1:
            return None
        return self.nhwc[n.inputs[0]]

    def spatial_pool(self, n: Generic):
        """A global average / max pool of a channels-last conv output (GlobalAveragePool, GlobalMaxPool, ReduceMean /
        ReduceMax over exactly the spatial axes), reduced channels-last: its NCHW result (None when it does not apply).
        Without it a CNN's head permuted the whole last feature map back to NCHW only to average it."""
        relax = self.relax
        x = self._nhwc_operand(n)
        if x is None:
            return None
        shape = _shape_of(x)
        if shape is None:
            return None
        nd = len(shape) - 2
        op, a = n.op_type, n.attributes
        if op in ("GlobalAveragePool", "GlobalMaxPool"):
            mean, keep = op == "GlobalAveragePool", True
        elif op in ("ReduceMean", "ReduceMax"):
            axes = a.get("axes")  # an attribute up to opset 17, an input from 18 on
            if self.g.opset.get("", 17) >= 18 and len(n.inputs) > 1 and n.inputs[1]:
                if n.inputs[1] not in self.g.constants:
                    return None
                axes = np.asarray(self.g.constants[n.inputs[1]]).reshape(-1).tolist()
            if axes is None or sorted(int(i) % (nd + 2) for i in axes) != list(range(2, nd + 2)):
                return None
            mean, keep = op == "ReduceMean", bool(a.get("keepdims", 1))
        else:
            return None
        out = (shape[0], shape[-1], *([1] * nd)) if keep else (shape[0], shape[-1])  # NCHW
        spatial = [_static_int(d) for d in shape[1:-1]]
        if mean and all(d is not None for d in spatial):
            # the mean as a row of 1/HW times the [HW, C] map of each image: a matmul the CPU schedules tile and
            # vectorize along C (a reduction over the outer axes stayed a scalar loop nest: 0.68 vs 0.86 ms for the
            # permute it replaced, on a 14x14x1024 map)
            hw = int(np.prod(spatial))
            x3 = self.bb.emit(relax.op.reshape(x, (shape[0], hw, shape[-1])))
            w = relax.const(np.full((1, hw), 1.0 / hw, dtype=_dtype_of(x)))
            y = self.bb.emit(relax.op.matmul(w, x3))  # [N, 1, C]
        else:
            y = self.bb.emit((relax.op.mean if mean else relax.op.max)(x, axis=list(range(1, nd + 1)), keepdims=False))
        return self.bb.emit(relax.op.reshape(y, out))

    def channels_last_op(self, n: Generic):
        """An elementwise op on channels-last conv outputs, computed channels-last (None when it does not apply):
        unary activations, Add / Sub / Mul / Div of two such values of one shape or of one and a scalar constant, and a
        Concat along the channels (the other inputs permuted channels-last where they are not)."""
        relax = self.relax
        x = self._nhwc_operand(n)
        if x is None:
            return None
        op = n.op_type
        unary = {"Relu": relax.op.nn.relu, "Sigmoid": relax.op.sigmoid, "Tanh": relax.op.tanh}
        if op in unary and len(n.inputs) == 1:
            return self.bb.emit(unary[op](x))
        if op == "Clip" and all(not i or (i in self.g.constants and np.asarray(self.g.constants[i]).size == 1) for i in n.inputs[1:]):
            lo = float(np.asarray(self.g.constants[n.inputs[1]])) if len(n.inputs) > 1 and n.inputs[1] else -np.inf
            hi = float(np.asarray(self.g.constants[n.inputs[2]])) if len(n.inputs) > 2 and n.inputs[2] else np.inf
            return self.bb.emit(relax.op.clip(x, relax.prim_value(lo), relax.prim_value(hi)))
        binary = {"Add": relax.op.add, "Sub": relax.op.subtract, "Mul": relax.op.multiply, "Div": relax.op.divide}
        if op in binary and len(n.inputs) == 2:
            other = n.inputs[1]
            if other in self.nhwc:
                a, b = _shape_of(x), _shape_of(self.nhwc[other])
                if a is None or b is None or len(a) != len(b) or not all(_same_dim_expr(p, q) for p, q in zip(a, b)):
                    return None
                o = self.nhwc[other]
            elif other in self.g.constants and np.asarray(self.g.constants[other]).size == 1:
                c = np.asarray(self.g.constants[other]).reshape(())
                if c.dtype != np.dtype(_dtype_of(x)):
                    return None
                o = relax.const(c, _dtype_of(x))
            else:
                return None
            return self.bb.emit(binary[op](x, o))
        if op == "Resize":
            return self._resize_channels_last(n, x)
        if op == "Concat" and len(n.inputs) >= 2:  # along the channels (U-Net's skip connections): concat the last axis
            rank = len(_shape_of(x) or ())
            if rank < 3 or int(n.attributes.get("axis", 0)) % rank != 1:
                return None
            parts = []
            for i in n.inputs:
                if i in self.nhwc:
                    parts.append(self.nhwc[i])
                    continue
                v = self.value(i)
                if v is None or len(_shape_of(v) or ()) != rank or _dtype_of(v) != _dtype_of(x):
                    return None
                parts.append(self.bb.emit(relax.op.permute_dims(v, [0, *range(2, rank), 1])))
            return self.bb.emit(relax.op.concat(self.unify_concat(parts, rank - 1), axis=rank - 1))
        return None

    def _resize_channels_last(self, n: Generic, x):
        """An ONNX ``Resize`` (opset >= 11) of a channels-last 2-D map with constant scales or sizes and a constant (or
        no) region of interest: ``image.resize2d`` with ``layout="NHWC"``, the attributes mapped as TVM's ONNX importer
        maps them (None when it does not apply). Upsampling in a U-Net decoder ran NCHW between two permutes."""
        return self._resize2d(n, x, "NHWC")

    def _resize_sizes(self, n: Generic, nc: list) -> np.ndarray | None:
        """A Resize's ``sizes`` computed at run time from the input's shape with constant spatial sizes
        (``F.interpolate(size=(16, 16))`` of a dynamic batch: TorchScript concatenates ``Shape(x)[:2]`` and the
        constant): ``[N, C, h, w]`` with the input's own N and C, as an int array; None otherwise."""
        if len(n.inputs) < 4 or not n.inputs[3] or n.inputs[3] in self.g.constants:
            return None
        sv = self.shape_value(n.inputs[3], self.value(n.inputs[3]))
        if sv is None or sv.shape != (4,) or any(_static_int(v) is None for v in sv[2:]):
            return None
        for got, want in zip(sv[:2], nc):
            if not (_static_int(got) == _static_int(want) is not None or str(got) == str(want)):
                return None
        return np.array([1, 1, *(int(_static_int(v)) for v in sv[2:])], np.int64)

    def _resize2d(self, n: Generic, x, layout: str):
        """``image.resize2d`` for an ONNX ``Resize`` of the spatial axes of a 4-D map in ``layout`` (NHWC or NCHW)
        with constant scales or sizes (or sizes from the input's shape, :meth:`_resize_sizes`) and a constant (or no)
        region of interest; None where that does not apply."""
        relax = self.relax
        shape = _shape_of(x)
        if shape is None or len(shape) != 4 or self.g.opset.get("", 17) < 11:
            return None
        sp, nc = ([1, 2], [shape[0], shape[3]]) if layout == "NHWC" else ([2, 3], [shape[0], shape[1]])
        hw = [_static_int(shape[i]) for i in sp]
        const = lambda i: np.asarray(self.g.constants[n.inputs[i]]) if len(n.inputs) > i and n.inputs[i] in self.g.constants else None  # noqa: E731
        given = [i for i in (1, 2, 3) if len(n.inputs) > i and n.inputs[i]]
        run_sizes = self._resize_sizes(n, nc)
        if any(const(i) is None and not (i == 3 and run_sizes is not None) for i in given) or any(d is None for d in hw):
            return None
        roi, scales, sizes = const(1), const(2), const(3) if run_sizes is None else run_sizes
        if sizes is not None and sizes.size == 4:
            size = [int(v) for v in sizes.reshape(-1)[2:]]
        elif scales is not None and scales.size == 4 and float(scales[0]) == 1 and float(scales[1]) == 1:
            size = [int(np.float32(scales[2 + i]) * np.float32(hw[i])) for i in range(2)]
            if any(size[i] != float(np.float32(scales[2 + i]) * np.float32(hw[i])) for i in range(2)):
                # resize2d maps coordinates by size / size; ONNX by the given scale: equal only when whole
                return self._resize_by_matrices(n, x, sp)
        else:
            return None
        if roi is None or roi.size == 0:
            roi_s = [0.0] * 4
        elif roi.size == 8:
            r = roi.reshape(-1).tolist()
            roi_s = r[2:4] + r[6:8]
        else:
            return None
        a = n.attributes
        mode = _attr_str(a.get("mode"), "nearest")
        return self.bb.emit(relax.op.image.resize2d(
            x, size=relax.ShapeExpr(size), roi=roi_s, layout=layout, method="nearest_neighbor" if mode == "nearest" else mode,
            coordinate_transformation_mode=_attr_str(a.get("coordinate_transformation_mode"), "half_pixel"),
            rounding_method=_attr_str(a.get("nearest_mode"), "round_prefer_floor"), cubic_alpha=float(a.get("cubic_coeff_a", -0.75)),
            cubic_exclude=int(a.get("exclude_outside", 0)), extrapolation_value=float(a.get("extrapolation_value", 0.0))))  # fmt: skip

    def _resize_by_matrices(self, n: Generic, x, axes: list[int]):
        """An ONNX ``Resize`` of the two spatial ``axes`` of ``x`` (NCHW: 2, 3; channels-last: 1, 2) with constant
        scales that are not whole numbers, as two matmuls with constant interpolation matrices. TVM's resize (its
        ONNX converter's too) maps output to input coordinates by the ratio of the sizes, ONNX by the given scale:
        F.interpolate(scale_factor=1.5) of a 7x7 map came out 2.5e-2 off. Every mode ONNX defines for it (linear,
        nearest, cubic, antialias) is separable along the axes, so each axis is one (out x in) matrix, read off the
        executor's Resize applied to the identity. None (another lowering) where that does not hold:
        non-constant or non-spatial scales, sizes, a region of interest, tf_crop_and_resize (extrapolation is not
        linear), opset-18 axes / aspect-ratio policy, dynamic spatial dims."""
        relax = self.relax
        shape = _shape_of(x)
        if shape is None or len(shape) != 4 or self.g.opset.get("", 17) < 11 or len(n.inputs) < 3:
            return None
        if (len(n.inputs) > 3 and n.inputs[3]) or (n.inputs[1] and np.asarray(self.g.constants.get(n.inputs[1], np.zeros(1))).size):
            return None
        scales = self.g.constants.get(n.inputs[2])
        if scales is None or np.asarray(scales).size != 4:
            return None
        scales = np.asarray(scales, np.float32).reshape(-1)
        spatial = [2, 3]  # ONNX's scales are NCHW's, whatever layout x has here
        if any(float(scales[i]) != 1.0 for i in range(4) if i not in spatial):
            return None
        a = n.attributes
        if _attr_str(a.get("coordinate_transformation_mode"), "half_pixel") == "tf_crop_and_resize" or "axes" in a \
                or _attr_str(a.get("keep_aspect_ratio_policy"), "stretch") != "stretch":  # fmt: skip
            return None
        dims = [_static_int(shape[ax]) for ax in axes]
        if any(d is None or d < 1 for d in dims) or not _dtype_of(x).startswith("float"):
            return None  # (integer maps round after interpolating: TVM's resize)
        mats = [_resize_matrix(n, int(d), float(scales[sp]), int(self.g.opset.get('', 17))) for d, sp in zip(dims, spatial)]
        if any(m is None for m in mats):
            return None
        dt = _dtype_of(x)
        y = x
        for ax, (m, d) in reversed(list(zip(axes, zip(mats, dims)))):  # the later axis first
            if m.shape[0] == d and np.array_equal(m, np.eye(d, dtype=m.dtype)):
                continue
            cur = _shape_of(y)
            if ax == 3:  # the last axis: x @ R^T
                y = self.bb.emit(relax.op.matmul(y, relax.const(np.ascontiguousarray(m.T).astype(dt), dt)))
            elif ax == 2:  # the second last: R @ x (broadcast over the leading axes)
                y = self.bb.emit(relax.op.matmul(relax.const(m.astype(dt), dt), y))
            else:  # axis 1 of (N, H, W, C): R @ (N, H, W*C)
                flat = self.bb.emit(relax.op.reshape(y, relax.ShapeExpr([cur[0], cur[1], cur[2] * cur[3]])))
                y = self.bb.emit(relax.op.matmul(relax.const(m.astype(dt), dt), flat))
                y = self.bb.emit(relax.op.reshape(y, relax.ShapeExpr([cur[0], m.shape[0], cur[2], cur[3]])))
        return y

    def linear(self, lin: Linear, x):
        x2, lead, m = self.flatten(x, lin.in_features, lin.name)
        y = self.linear2d(lin, x2, m)
        return self.unflatten(y, lead, lin.out_features)

    # ---- other raised ops ----------------------------------------------------------------------------------
    def layernorm(self, n: LayerNorm, x):
        relax = self.relax
        d = n.dim or _last_dim(x)
        dt = _dtype_of(x)
        gamma = self.node_param(n, "weight", n.weight, dt) if n.weight is not None else relax.const(np.ones(d, dt))
        beta = self.node_param(n, "bias", n.bias, dt) if n.bias is not None else relax.const(np.zeros(d, dt))
        return self.bb.emit(relax.op.nn.layer_norm(x, gamma, beta, axes=[-1], epsilon=float(n.eps)))

    def rmsnorm(self, n: RMSNorm, x):
        relax = self.relax
        d = n.dim or _last_dim(x)
        dt = _dtype_of(x)
        iv = self.g.values.get(n.inputs[0])
        if dt == "float16" and iv is not None and iv.dtype == "float16":
            # a float16 model's RMSNorm is computed in float32 and cast back (as HF and sparsec's executor do)
            xf = self.bb.emit(relax.op.astype(x, "float32"))
            y = self.bb.emit(relax.op.nn.rms_norm(xf, relax.const(np.ones(d, "float32")), axes=[-1], epsilon=float(n.eps)))
            y = self.bb.emit(relax.op.astype(y, dt))
            if n.weight is None:
                return y
            return self.bb.emit(relax.op.multiply(y, self.node_param(n, "weight", n.weight, dt)))
        w = self.node_param(n, "weight", n.weight, dt) if n.weight is not None else relax.const(np.ones(d, dt))
        return self.bb.emit(relax.op.nn.rms_norm(x, w, axes=[-1], epsilon=float(n.eps)))

    def embedding(self, n: Embedding, ids):
        relax = self.relax
        # a float16 model's table stays float16 (its stream is float16: the residual adds need one dtype)
        dt = None if n.table.dtype.kind != "f" else ("float16" if n.table.dtype == np.float16 else self.act_dtype)
        table = self.node_param(n, "table", n.table, dt)
        if n.inputs[0] in self.g.inputs:
            self.input_ranges[n.inputs[0]] = [-int(n.table.shape[0]), int(n.table.shape[0])]
        elif n.inputs[0] in self.index_limits:  # positions 0..seq-1 into a table of learned positions
            self.limit(self.index_limits[n.inputs[0]], int(n.table.shape[0]), f"'{n.name}' has {int(n.table.shape[0])} position rows")
        return self.bb.emit(relax.op.take(table, ids, axis=0, mode="wrap"))

    def limit(self, size, bound: int, why: str) -> None:
        """Record that ``size`` (an expression of the inputs' symbolic dims) must be at most ``bound`` at run time.
        Sizes of the form ``dim + c`` become a limit on that input dim; others cannot be checked and are left."""
        from tvm import tirx

        size = self.simp(_as_prim(size))
        if isinstance(size, int) or self.simp(_as_prim(size) <= _as_prim(bound)) is True:
            return
        off = 0
        if isinstance(size, tirx.Add) and isinstance(size.b, tirx.IntImm):
            size, off = size.a, int(size.b.value)
        if not (isinstance(size, tirx.Var) and any(size.same_as(v) for v in self.input_syms)):
            return
        cur = self.dim_limits.get(size.name)
        if cur is None or bound - off < cur[0]:
            self.dim_limits[size.name] = [bound - off, why]

    def slice_limits(self, n: Generic, ins) -> None:
        """ONNX Slice with a bound known only at run time (``causal_mask[:seq, :seq]``): TVM's converter assumes the
        bound in range (``assume_inbound``), so more tokens than the buffer has rows read past its end and returned
        garbage. ONNX would clamp (and the model then fails to broadcast): the bound becomes a limit on the input dim."""
        dims = _shape_of(ins[0])
        if dims is None or len(ins) < 3 or ins[2] is None:
            return
        vals = self.slice_args(n, ins, (2, 3, 4))  # ends, axes, steps (the starts do not bound the read)
        if vals is None:
            return
        ends, axes, steps = vals
        rank = len(dims)
        axes = list(range(len(ends))) if axes is None else axes
        steps = [1] * len(ends) if steps is None else steps
        if len(axes) != len(ends) or len(steps) != len(ends) or not all(isinstance(a, int) and -rank <= a < rank for a in axes):
            return
        for a, e, st in zip(axes, ends, steps):
            d = _sv_elem(dims[a + rank if a < 0 else a])
            if isinstance(e, int) or not isinstance(d, int) or not (isinstance(st, int) and st > 0):
                continue
            self.limit(e, d, f"'{n.inputs[0]}' has {d} entries on axis {a}, sliced by this size in node '{n.name}'")

    def slice_args(self, n: Generic, ins, which) -> list | None:
        """A Slice's inputs ``which`` (1 starts, 2 ends, 3 axes, 4 steps) as lists of ints / TIR expressions (None for
        an omitted one), or None when one of them is not known at compile time."""
        vals = []
        for i in which:
            if i >= len(ins) or ins[i] is None or not n.inputs[i]:
                vals.append(None)
                continue
            v = self.shape_value(n.inputs[i], ins[i])
            if v is None:
                return None
            vals.append([_sv_elem(e) for e in np.atleast_1d(v)])
        return vals

    def slice_from_the_end(self, n: Generic, ins):
        """ONNX Slice whose start (or end) is a negative size known only at run time: MPT's ALiBi buffer
        ``alibi[:, :, -t:, -t:]``. TVM's converter gives it fresh shape variables the VM never computes (exit 11,
        "has not been computed"), or recursed until the stack overflowed (SIGSEGV, the TorchScript export). Here the
        bounds are normalized as ONNX does (a negative bound counts from the end, then clamped to [0, dim]) on TIR
        expressions of the input dims, taken as at least 1, and the slice is a strided_slice with those bounds.
        None (TVM's converter) for any other Slice: static bounds, non-unit steps, bounds not known."""
        from tvm import tirx

        relax = self.relax
        x = ins[0]
        dims = _shape_of(x)
        if dims is None or len(ins) < 3 or ins[1] is None or ins[2] is None:
            return None
        vals = self.slice_args(n, ins, (1, 2, 3, 4))
        if vals is None:
            return None
        starts, ends, axes, steps = vals
        rank = len(dims)
        axes = list(range(len(starts))) if axes is None else axes
        if steps is not None and any(st != 1 for st in steps):
            return None
        if not (len(axes) == len(starts) == len(ends)) or not all(isinstance(a, int) and -rank <= a < rank for a in axes):
            return None
        ana = self.positive_analyzer()

        def sign(e):  # -1, 1 (known: negative / non-negative), 0 (unknown)
            if isinstance(e, int):
                return -1 if e < 0 else 1
            if _is_true(ana.simplify(e < 0)):
                return -1
            return 1 if _is_true(ana.simplify(e >= 0)) else 0

        def bound(e, d):  # ONNX: e < 0 counts from the end; then clamped to [0, d]
            sg = sign(e)
            if sg == 0:
                return None
            if sg < 0:
                if isinstance(e, int):
                    return max(e + d, 0)
                if _is_true(ana.simplify(e + d <= 0)):  # at least the whole axis (a size-1 axis of the buffer)
                    return 0
                # -e <= d at run time (checked: more would clamp, and the model's shapes would not agree), so that the
                # extent is -e itself, not a clamp TVM cannot unify with the other operand's dim
                self.limit(ana.simplify(-e), d, f"'{n.inputs[0]}' has {d} entries on an axis sliced from its end in node '{n.name}'")
                return e + d
            return min(e, d) if isinstance(e, int) and isinstance(d, int) else tirx.min(e, d)

        symbolic_neg = any(not isinstance(e, int) and sign(e) < 0 for e in (*starts, *ends))
        if not symbolic_neg:
            return None
        begin, end = [], []
        for a, st, en in zip(axes, starts, ends):
            d = _sv_elem(dims[a % rank])
            if d is None:
                return None
            en = d if isinstance(en, int) and en >= 2**62 else en
            b, e = bound(st, d), bound(en, d)
            if b is None or e is None:
                return None
            begin.append(ana.simplify(b) if not isinstance(b, int) else b)
            end.append(ana.simplify(e) if not isinstance(e, int) else e)
        return self.bb.emit(relax.op.strided_slice(x, [a % rank for a in axes], begin, end, assume_inbound=True))

    def moe(self, n: MoE, x):
        relax = self.relax
        op = relax.op
        d = n.router.in_features
        x2, lead, m = self.flatten(x, d, n.name)
        logits = self.linear2d(n.router, x2, m)
        lf = logits if _dtype_of(logits) == "float32" else self.bb.emit(op.astype(logits, "float32"))
        probs = self.bb.emit(op.nn.softmax(lf, axis=-1) if n.score == "softmax" else op.sigmoid(lf))
        tk = self.bb.emit(op.topk(probs, k=int(n.top_k), axis=-1, ret_type="both", largest=True, dtype="int64"))
        topv = self.bb.emit(relax.TupleGetItem(tk, 0))
        topi = self.bb.emit(relax.TupleGetItem(tk, 1))
        if n.renormalize:
            topv = self.bb.emit(op.divide(topv, op.sum(topv, axis=-1, keepdims=True)))
        routes = n.num_routes
        oh = self.bb.emit(op.astype(op.one_hot(topi, 1.0, 0.0, depth=routes, axis=-1), "float32"))  # [T, k, routes]
        dout = n.experts[0].down.out_features if n.experts else d
        if self.moe_routed:
            return self.unflatten(self.moe_routed_combine(n, x2, m, topi, topv, oh, dout), lead, dout)
        wr = self.bb.emit(op.sum(op.multiply(oh, op.expand_dims(topv, -1)), axis=1))  # [T, routes]
        if n.expert_map is not None:
            wr = self.bb.emit(op.matmul(wr, relax.const(_expert_map_onehot(n))))
        if _dtype_of(x2) != "float32":
            wr = self.bb.emit(op.astype(wr, _dtype_of(x2)))
        acc = None
        for ei, e in enumerate(n.experts):
            we = self.bb.emit(op.strided_slice(wr, axes=[1], begin=[ei], end=[ei + 1]))  # [T, 1]
            ye = self.bb.emit(op.multiply(self.expert(e, x2, m), we))
            acc = ye if acc is None else self.bb.emit(op.add(acc, ye))
        self.moe_notes.append(n.name)
        return self.unflatten(acc, lead, dout)

    def moe_routed_combine(self, n: MoE, x2, m, topi, topv, oh, dout):
        """Routed MoE: each expert runs on the tokens routed to it, gathered in token order (a data-dependent count,
        bound by ``tensor_to_shape``; an expert no token chose runs its kernels on 0 rows and reads no weights). The
        experts' outputs are concatenated and every token gathers its top-k rows back (no scatter): the row of token
        t in expert e's block is ``offset[e] + rank[t, e]``, rank = the running count of e's tokens. Only TVM VM
        builtins and generated kernels: no Python callback in the library (``nonzero`` would need one). The gathers
        clip their (always in-range) indices: TVM warns at every unchecked gather it compiles."""
        from tvm import tirx

        relax = self.relax
        op = relax.op
        ne = len(n.experts)
        sel = self.bb.emit(op.sum(oh, axis=1))  # [T, routes]: how often each route was selected (0 / 1)
        slot_e = topi  # [T, k]: the expert each selected route is served by
        if n.expert_map is not None:
            sel = self.bb.emit(op.matmul(sel, relax.const(_expert_map_onehot(n))))
            slot_e = self.bb.emit(op.take(relax.const(np.asarray(n.expert_map, dtype=np.int64), "int64"), topi, axis=0, mode="clip"))
        used = self.bb.emit(op.astype(op.greater(sel, relax.const(0.0, "float32")), "int64"))  # [T, E]
        rank = self.bb.emit(op.subtract(op.cumsum(used, axis=0), relax.const(1, "int64")))  # [T, E]
        # tokens per expert: the last row of the running count with a zero row in front (a reduction over an empty
        # token axis returns garbage in TVM 0.27, so no sum over tokens: 0 tokens give the zero row)
        csum = self.bb.emit(op.cumsum(op.concat([relax.const(np.zeros((1, ne), np.int64), "int64"), used], axis=0), axis=0))
        cnt = self.bb.emit(op.reshape(op.take(csum, op.arange(_as_prim(m), _as_prim(m) + 1, 1, dtype="int64"), axis=0, mode="clip"), (ne,)))
        offs = self.bb.emit(op.subtract(op.cumsum(cnt, axis=0), cnt))  # [E] exclusive prefix sums
        ar = self.bb.emit(op.arange(0, _as_prim(m), 1, dtype="int64"))
        # sort key: a token routed to e sorts before every token that is not, in token order among them
        key = self.bb.emit(op.add(op.multiply(op.subtract(relax.const(1, "int64"), used), relax.const(1 << 40, "int64")),
                                  op.expand_dims(ar, -1)))  # fmt: skip
        order = self.bb.emit(op.permute_dims(op.argsort(key, axis=0, dtype="int64"), [1, 0]))  # [E, T]
        outs = []
        # every expert's token count in one shape: one device -> host copy per layer (a sync on CUDA), not one per expert
        ks = [tirx.Var(f"{_sanitize(n.name)}_e{ei}_tokens", "int64") for ei in range(ne)]
        self.bb.match_cast(self.bb.emit(op.tensor_to_shape(cnt)), relax.ShapeType(ks))
        for ei, e in enumerate(n.experts):
            k_e = ks[ei]
            row = self.bb.emit(op.reshape(op.strided_slice(order, axes=[0], begin=[ei], end=[ei + 1]), (m,)))
            # the first k_e entries (a take, not a strided_slice: TVM's CPU pipeline mis-handles a slice bound by a
            # data-dependent size)
            idx = self.bb.emit(op.take(row, op.arange(0, k_e, 1, dtype="int64"), axis=0, mode="clip"))
            outs.append(self.expert(e, self.bb.emit(op.take(x2, idx, axis=0, mode="clip")), k_e))
        ycat = self.bb.emit(op.concat(outs, axis=0)) if len(outs) > 1 else outs[0]  # [sum of counts, dout]
        pos = self.bb.emit(op.add(op.gather_elements(rank, slot_e, axis=1), op.take(offs, slot_e, axis=0, mode="clip")))  # [T, k]
        kk = int(n.top_k)
        rows = self.bb.emit(op.reshape(op.take(ycat, op.reshape(pos, (_as_prim(m) * kk,)), axis=0, mode="clip"), (m, kk, dout)))
        w = topv if _dtype_of(x2) == "float32" else self.bb.emit(op.astype(topv, _dtype_of(x2)))
        self.moe_notes.append(n.name)
        return self.bb.emit(op.sum(op.multiply(rows, op.expand_dims(w, -1)), axis=1))

    def expert(self, e, x2, m):
        """One expert's MLP on ``[m, d]`` tokens: ``down(act(gate(x)) * up(x))`` (or ``down(act(up(x)))``)."""
        op = self.relax.op
        h_up = self.linear2d(e.up, x2, m)
        if e.gate is not None:
            h = self.bb.emit(op.multiply(self.act(e.act, self.linear2d(e.gate, x2, m)), h_up))
        else:
            h = self.act(e.act, h_up)
        return self.linear2d(e.down, h, m)

    def act(self, name: str, x):
        op = self.relax.op
        if name == "identity":
            return x
        f = {"silu": op.nn.silu, "gelu": op.nn.gelu, "gelu_tanh": op.nn.gelu_tanh, "relu": op.nn.relu}[name]
        return self.bb.emit(f(x))

    # ---- generic ONNX nodes --------------------------------------------------------------------------------
    def importer(self):
        if self._importer is None:
            from tvm.relax.frontend.onnx.onnx_frontend import ONNXGraphImporter

            imp = ONNXGraphImporter({}, {})
            imp.bb = self.bb
            imp.opset = int(self.g.opset.get("", 17))
            self._importer = imp
        return self._importer

    def trilu(self, n: Generic, ins):
        """ONNX ``Trilu`` with a constant (or no) ``k``, as its own kernel that is never fused with its readers (None
        when it does not apply). A causal mask built in the graph (``triu(full(-inf), 1)``) was fused into the epilogue
        of ``Q @ K^T``, where its per-element select scalarized the tiled matmul: 0.1x onnxruntime at 128 tokens."""
        from tvm import te, tirx

        x = ins[0]
        if not isinstance(getattr(x, "ty", None), self.relax.TensorType) or _shape_of(x) is None or len(_shape_of(x)) < 2:
            return None
        k = 0
        if len(n.inputs) > 1 and n.inputs[1]:
            if n.inputs[1] not in self.g.constants or np.asarray(self.g.constants[n.inputs[1]]).size != 1:
                return None
            k = int(np.asarray(self.g.constants[n.inputs[1]]).reshape(-1)[0])
        upper = bool(int(n.attributes.get("upper", 1)))
        shape = [_static_int(d) if _static_int(d) is not None else tirx.Var(f"d{i}", "int64") for i, d in enumerate(_shape_of(x))]
        xp = te.placeholder(shape, _dtype_of(x), name="x")

        def body(*idx):
            i, j = idx[-2], idx[-1]
            keep = (j - i >= k) if upper else (j - i <= k)
            return tirx.Select(keep, xp[idx], tirx.const(0, xp.dtype))

        y = te.compute(shape, body, name="trilu")
        func = te.create_prim_func([xp, y]).with_attrs({"op_pattern": 8, "tirx.noalias": True})
        gv = self.add_own_func(func, f"trilu_{n.name}")
        return self.bb.emit(self.relax.call_tir(gv, [x], x.ty))

    def generic(self, n: Generic, ins):
        import tvm
        from tvm.relax.frontend.onnx.onnx_frontend import _get_convert_map, onnx_input

        from ..compressor.onnx_export import _attribute

        relax = self.relax
        if n.op_type in _INDEX_PRESERVING and not n.domain and n.inputs and n.inputs[0] in self.index_limits:
            self.index_limits[n.outputs[0]] = self.index_limits[n.inputs[0]]
        folded = self.fold(n, ins) if not n.domain else None
        if folded is not None:
            return folded
        if n.op_type == "Expand" and not n.domain:
            out = self.expand(n, ins)
            if out is not None:
                return [(n.outputs[0], self.refine(n.outputs[0], out))]
        if n.op_type == "Range" and not n.domain:
            start, lim, delta = (self.shape_value(i, e) for i, e in zip(n.inputs, ins))
            if all(v is not None and v.ndim == 0 for v in (start, lim, delta)) and _sv_elem(start.item()) == 0 \
                    and _sv_elem(delta.item()) == 1:  # positions 0..lim-1
                self.index_limits[n.outputs[0]] = _sv_elem(lim.item())
            return [(n.outputs[0], self.refine(n.outputs[0], self.range_(ins)))]
        if n.op_type == "Slice" and not n.domain:
            self.slice_limits(n, ins)
            out = self.slice_from_the_end(n, ins)
            if out is not None:
                return [(n.outputs[0], self.refine(n.outputs[0], out))]
        if n.op_type in ("Unsqueeze", "Squeeze") and not n.domain and len(ins) > 1 and n.inputs[1] in self.g.constants \
                and np.asarray(self.g.constants[n.inputs[1]]).ndim == 0:
            # axes as a 0-d tensor (the dynamo exporter's SDPA with enable_gqa; onnxruntime accepts it): one axis
            ins = [ins[0], relax.const(np.asarray(self.g.constants[n.inputs[1]]).reshape(1).astype(np.int64), "int64"), *ins[2:]]
        if n.op_type == "Resize" and not n.domain and ins and ins[0] is not None:
            out = self._resize_by_matrices(n, ins[0], [2, 3])
            if out is None and len(n.inputs) > 3 and n.inputs[3] and n.inputs[3] not in self.g.constants:
                out = self._resize2d(n, ins[0], "NCHW")  # sizes from Shape(x): TVM's converter wants constants
            if out is not None:
                return [(n.outputs[0], self.refine(n.outputs[0], out))]
        if n.op_type == "Trilu" and not n.domain:
            out = self.trilu(n, ins)
            if out is not None:
                return [(n.outputs[0], self.refine(n.outputs[0], out))]
        if n.op_type == "Concat" and not n.domain and len(ins) > 1:
            # drop the inputs empty along the axis (the rest of a full rotary, x[..., head_dim:]): TVM's CUDA schedules
            # divide by their zero extent ("Divide by zero": every TorchScript export of a full-rotary model for h100)
            axis, keep = int(n.attributes.get("axis", 0)), []
            for e in ins:
                sh = _shape_of(e) if isinstance(getattr(e, "ty", None), relax.TensorType) else None
                if sh is None or not sh or _static_int(sh[axis % len(sh)]) != 0:
                    keep.append(e)
            if keep and len(keep) < len(ins):
                if len(keep) == 1:
                    return [(n.outputs[0], keep[0])]
                ins = keep
        if n.op_type == "Pow" and not n.domain and n.inputs[1] in self.g.constants:
            e = np.asarray(self.g.constants[n.inputs[1]])
            x = ins[0]
            if e.size == 1 and e.ndim <= x.ty.ndim and float(e.item()) in (2.0, 3.0) and _dtype_of(x).startswith("float"):
                # x**3 of a decomposed tanh-GELU: multiplies (TVM lowers pow to powf and warns about y >= 3 on stderr)
                y = self.bb.emit(relax.op.multiply(x, x))
                if float(e.item()) == 3.0:
                    y = self.bb.emit(relax.op.multiply(y, x))
                return [(n.outputs[0], self.refine(n.outputs[0], y))]
        if n.op_type in _CMP_OPS and not n.domain and len(ins) == 2 and any(
                isinstance(e, relax.ShapeExpr) or isinstance(getattr(e, "ty", None), tvm.ir.type.PrimType) for e in ins):
            # sizes not compared at compile time (fold): compare at run time. TVM's converters fold shape expressions
            # structurally (Equal([batch], [seq]) -> False even when they are equal) or fail on them (Less)
            a, b = (self.as_tensor(e) for e in ins)
            return [(n.outputs[0], self.refine(n.outputs[0], self.bb.emit(getattr(relax.op, _CMP_OPS[n.op_type])(a, b))))]
        if n.op_type == "Reshape" and not n.domain and len(ins) > 1 and ins[0] is not None:
            ins = [self.reshape_guard(n, ins[0], ins[1]), *ins[1:]]
        if n.op_type == "ScatterND" and not n.domain and len(ins) == 3 and all(e is not None for e in ins):
            ins = [ins[0], ins[1], self.scatter_nd_updates(*ins)]
        conv = _get_convert_map().get(n.op_type)
        if conv is None:
            raise UnsupportedOpError(f"{n.op_type} (node '{n.name}') has no TVM lowering", hint="use --engine onnx to run it")
        imp = self.importer()
        attrs = imp._parse_attr([_attribute(k, v, n.attr_types.get(k)) for k, v in sorted(n.attributes.items())])
        attrs["tvm_custom"] = {"name": n.name, "num_outputs": len(n.outputs)}
        if n.op_type == "TopK" and not n.domain and attrs.get("sorted", 1) != 1:
            attrs["sorted"] = 1  # ONNX leaves the order of sorted=0 unspecified: sorted is one (torch.topk(sorted=False))
        if n.op_type in BROADCAST_OPS:
            ins = self.unify_broadcast(n.op_type, list(ins))
        if n.op_type == "Concat" and not n.domain:
            ins = self.unify_concat(list(ins), int(n.attributes.get("axis", 0)))
        inputs = onnx_input()
        for e in ins:
            inputs.append(e)
        nodes = {v.name: v for v in inputs if isinstance(v, relax.Var)}
        opset = int(self.g.opset.get(n.domain or "", self.g.opset.get("", 17)))
        def call(args):
            out = conv.get_converter(opset)(self.bb, args, attrs, [nodes, self.const_params])
            return self.bb.normalize(out) if isinstance(out, relax.Expr) else out

        try:
            out = call(inputs)
        except Exception as e:  # noqa: BLE001 - any converter failure: one line naming the node
            # TVM's converters keep sizes read from shapes as PrimValues (Squeeze/Gather of Shape, their products);
            # most converters want tensors: retry with PrimValue inputs as 0-d int64 tensors
            prims = [i for i, v in enumerate(inputs) if v is not None and isinstance(getattr(v, "ty", None), tvm.ir.type.PrimType)]
            out = None
            if prims:
                args = onnx_input()
                for i, v in enumerate(inputs):
                    args.append(self.prim_to_tensor(v) if i in prims else v)
                try:
                    out = call(args)
                except Exception:  # noqa: BLE001
                    out = None
            if out is None:
                msg = str(e).strip().splitlines()
                raise UnsupportedOpError(f"{n.op_type} (node '{n.name}') cannot be lowered by TVM: {msg[-1][:200] if msg else type(e).__name__}")
        outs = [o for o in n.outputs]
        if isinstance(out, relax.Tuple):
            items = list(out.fields)
        elif isinstance(out.ty, relax.TupleType):
            items = [self.bb.emit(relax.TupleGetItem(out, i)) for i in range(len(out.ty.fields))]
        else:
            items = [out]
        if len(items) < len([o for o in outs if o]):
            raise UnsupportedOpError(f"{n.op_type} (node '{n.name}'): TVM produced {len(items)} outputs for {len(outs)}")
        res = []
        for o, e in zip(outs, items):
            if o:
                # like TVM's own importer, keep shape expressions, constants and vars as they are (converters such
                # as Squeeze/Reshape/Concat look for ShapeExpr inputs); bind calls once so consumers share them
                if isinstance(e, relax.Call):
                    e = self.bb.emit(e)
                res.append((o, self.refine(o, e)))
        return res

    # ---- shape arithmetic -----------------------------------------------------------------------------------
    def shape_value(self, name: str, e):
        """The value of a small integer tensor (a shape, a size, an index, a bound computed from them) as a numpy
        object array of ints and TIR expressions of the symbolic dims, or None when it is not known at compile time."""
        import tvm

        relax = self.relax
        if name in self.shape_values:
            return self.shape_values[name]
        if name in self.g.constants or isinstance(e, tvm.ir.GenericConst):
            a = np.asarray(self.g.constants[name]) if name in self.g.constants else e.value.numpy()
            if a.dtype.kind in "biu" and a.size <= CONST_INLINE_MAX:
                return np.array(a.tolist() if a.ndim else a.item(), dtype=object)
            return None
        if isinstance(e, relax.ShapeExpr):
            return np.array([_sv_elem(d) for d in e.values] + [None], dtype=object)[:-1]
        # an int size (TVM 0.27: a PrimValue is the TIR expression itself, e.g. ``batch * 4``); a Var of PrimType
        # is only usable when it is one of the graph inputs' symbolic dims (a bound Relax var has no TIR value)
        if tvm.ir.is_prim_expr(e) and str(e.ty).startswith("int") and (
                not tvm.ir.is_prim_var(e) or any(e.same_as(s) for s in self.input_syms)):
            return _box(_sv_elem(e))
        return None

    def fold(self, n: Generic, ins):
        """Shape arithmetic evaluated at compile time. Exporters compute sizes, slice bounds and target shapes with
        ``Shape -> Gather -> Add/Div/Mul -> Concat/ScatterElements ...`` (TorchScript's ``chunk``, ``view``,
        ``expand``). TVM's converters turn most of these into runtime tensors, so a ``Slice`` bounded by them gets
        an unknown output shape, and ops downstream (a MatMul between two such values) cannot be legalized. Here the
        values are computed on ints and TIR expressions of the symbolic dims (``batch``, ``seq``...); a result
        known to be constant is emitted as a constant (so ``Slice``/``Reshape``/``Expand`` get static bounds), a
        symbolic one is remembered for the ops that consume it and lowered by TVM as before."""
        try:
            val = self._fold(n, ins)
        except (ImportError, NameError, AttributeError):
            raise  # a bug in the folding itself (an API that moved), not a value it cannot fold
        except Exception:  # noqa: BLE001 - anything not foldable is lowered by TVM as usual
            val = None
        if val is not None and not isinstance(val, np.ndarray):  # numpy returns 0-d picks as the element
            val = _box(val)
        if val is None or len(n.outputs) != 1 or val.size > CONST_INLINE_MAX:
            return None
        out = n.outputs[0]
        self.shape_values[out] = val
        flat = list(val.reshape(-1))
        if not all(isinstance(x, (bool, int)) for x in flat):
            import tvm

            if n.op_type == "Concat" and val.ndim == 1 and all(isinstance(x, int) or tvm.ir.is_prim_expr(x) for x in flat):
                # a target shape with symbolic sizes ([batch * heads, seq, 32]: dynamo's reshape to b * h): as the
                # ShapeExpr TVM makes of a Concat of shapes; TVM's converter refused a size computed from a shape
                # (a tensor) next to a shape ("relax.concat" cannot be lowered: no library for such exports)
                return [(out, self.relax.ShapeExpr([x if not isinstance(x, int) else tvm.tirx.IntImm("int64", x) for x in flat]))]
            return None
        v = self.g.values.get(out)
        if all(isinstance(x, bool) for x in flat) and flat:
            dt = "bool"
        else:
            dt = v.dtype if v is not None and v.dtype and v.dtype.startswith(("int", "uint", "bool")) else "int64"
        arr = np.array(val.tolist(), dtype=dt).reshape(val.shape)
        return [(out, self.relax.const(arr, dt))]

    def _fold(self, n: Generic, ins):
        from tvm import tirx

        op = n.op_type
        a = n.attributes
        if op == "Shape":
            sh = _shape_of(ins[0]) if ins and hasattr(getattr(ins[0], "ty", None), "shape") else None
            if sh is None:
                return None
            vals = [_sv_elem(d) for d in sh]
            start, end = a.get("start", 0), a.get("end")
            return _obj(vals[start:end])
        if op == "Size":
            sh = _shape_of(ins[0]) if ins else None
            if sh is None:
                return None
            r = 1
            for d in sh:
                r = r * _sv_elem(d)
            return np.array(self.simp(r), dtype=object)
        if op not in _FOLD_OPS:
            return None
        vals = [self.shape_value(name, e) if name else None for name, e in zip(n.inputs, ins)]
        need = {"Reshape": 2, "Unsqueeze": 1, "Squeeze": 1, "Slice": 3, "Gather": 2, "Where": 3, "ScatterElements": 3,
                "ConstantOfShape": 1, "Expand": 2, "Range": 3}.get(op, len(vals))  # fmt: skip
        if len(vals) < need or any(v is None for v in vals[:need]) or any(
                v is None for nm, v in zip(n.inputs, vals) if nm):
            return None
        if op == "Identity":
            return vals[0]
        if op == "Cast":
            to = int(a.get("to", 7))
            if to in (6, 7, 12, 13):  # int32/int64/uint32/uint64: sizes stay exact
                return vals[0]
            if to == 9:
                return _ints_only(vals[0], bool)
            return None
        if op in ("Unsqueeze", "Squeeze"):
            x = vals[0]
            axes = [int(i) for i in (vals[1].reshape(-1) if len(vals) > 1 and vals[1] is not None else a.get("axes", []))]
            if op == "Unsqueeze":
                r = x.ndim + len(axes)
                axes = sorted(i % r for i in axes)
                for ax in axes:
                    x = np.expand_dims(x, ax)
                return x
            axes = [i % x.ndim for i in axes] if axes else [i for i, d in enumerate(x.shape) if d == 1]
            return x.reshape([d for i, d in enumerate(x.shape) if i not in axes])
        if op == "Reshape":
            shp = [int(d) for d in vals[1].reshape(-1)]
            shp = [vals[0].shape[i] if d == 0 and not a.get("allowzero") else d for i, d in enumerate(shp)]
            return vals[0].reshape(shp)
        if op == "Concat":
            return np.concatenate([v for v in vals if v is not None], axis=int(a.get("axis", 0)))
        if op == "Gather":
            idx = np.array(vals[1].tolist(), dtype=np.int64)
            axis = int(a.get("axis", 0))
            idx = np.where(idx < 0, idx + vals[0].shape[axis], idx)
            return np.take(vals[0], idx, axis=axis)
        if op == "Slice":
            x = vals[0]
            st, en = [int(i) for i in vals[1].reshape(-1)], [int(i) for i in vals[2].reshape(-1)]
            axes = [int(i) for i in vals[3].reshape(-1)] if len(vals) > 3 and vals[3] is not None else list(range(len(st)))
            steps = [int(i) for i in vals[4].reshape(-1)] if len(vals) > 4 and vals[4] is not None else [1] * len(st)
            sl = [slice(None)] * x.ndim
            for s0, e0, ax, sp in zip(st, en, axes, steps):
                sl[ax % x.ndim] = slice(s0, max(min(e0, 2**62), -(2**62)), sp)
            return x[tuple(sl)]
        if op == "ScatterElements":
            x, idx, upd = vals[0].copy(), np.array(vals[1].tolist(), dtype=np.int64), vals[2]
            if x.ndim != 1 or a.get("reduction", "none") != "none":
                return None
            for i, u in zip(idx.reshape(-1), upd.reshape(-1)):
                x[int(i) % x.shape[0]] = u
            return x
        if op == "ConstantOfShape":
            shp = [int(d) for d in vals[0].reshape(-1)]
            fill = np.asarray(a.get("value", np.zeros(1, np.float32))).reshape(-1)[0]
            if np.asarray(fill).dtype.kind not in "biu" or math.prod(shp) > CONST_INLINE_MAX:
                return None
            return np.full(shp, fill.item(), dtype=object)
        if op == "Expand":
            shp = np.broadcast_shapes(vals[0].shape, tuple(int(d) for d in vals[1].reshape(-1)))
            if math.prod(shp) > CONST_INLINE_MAX:
                return None
            return np.broadcast_to(vals[0], shp).copy()
        if op == "Range":
            s0, l0, d0 = (_int_scalar(v) for v in vals)
            if None in (s0, l0, d0) or d0 == 0 or len(range(s0, l0, d0)) > CONST_INLINE_MAX:
                return None
            return _obj(list(range(s0, l0, d0)))
        if op == "Where":
            c = _ints_only(vals[0], bool)
            if c is None:
                return None
            c, x, y = np.broadcast_arrays(c, vals[1], vals[2])
            return np.where(c.astype(bool), x, y).astype(object)
        f = _FOLD_OPS[op]
        bs = np.broadcast_arrays(*vals)
        out = np.empty(bs[0].shape, dtype=object)
        for ix in np.ndindex(out.shape):
            r = self.simp(f(*[b[ix] for b in bs]))
            if op in _FOLD_BOOL and not isinstance(r, bool):
                return None  # a comparison not decided at compile time
            out[ix] = r
        return out

    def scatter_nd_updates(self, data, indices, updates):
        """ScatterND's updates ``match_cast`` to ``indices.shape[:-1] + data.shape[K:]`` (checked at run time) where
        their shape spells those sizes another way (the dynamo exporter's ``index_add_`` over ``tokens * k`` rows:
        TVM's converter compares the shapes structurally and refused the build)."""
        relax = self.relax
        ds, ish, us = _shape_of(data), _shape_of(indices), _shape_of(updates)
        k = _static_int(ish[-1]) if ish else None
        if ds is None or ish is None or us is None or k is None or k > len(ds):
            return updates
        want = list(ish[:-1]) + list(ds[k:])
        if len(want) != len(us) or all(_same_dim_expr(a, b) for a, b in zip(want, us)):
            return updates
        if any(_static_int(a) is not None and _static_int(b) is not None and _static_int(a) != _static_int(b) for a, b in zip(want, us)):
            return updates  # (a real mismatch: TVM's converter says so)
        return self.bb.match_cast(updates, relax.TensorType(want, str(updates.ty.dtype)))

    def positive_analyzer(self):
        """TVM's arithmetic analyzer with every graph input dim at least 1 (a size 0 input has nothing to compute)."""
        if getattr(self, "_pos_ana", None) is None:
            from tvm import sym

            self._pos_ana = sym.Analyzer()
            for v in self.input_syms:
                self._pos_ana.update(v, sym.ConstIntBound(1, 2**62))
        return self._pos_ana

    def simp(self, x):
        from tvm import tirx

        if isinstance(x, (bool, np.bool_)):
            return bool(x)
        if isinstance(x, (int, np.integer)):
            return int(x)
        if self._ana is None:
            from tvm import sym  # TVM 0.27: the arithmetic analyzer lives in tvm.sym (was tvm.arith)

            self._ana = sym.Analyzer()
            for v in self.input_syms:
                self._ana.update(v, sym.ConstIntBound(0, 2**62))
        r = self._ana.simplify(x)
        if isinstance(r, tirx.IntImm):
            return bool(r.value) if str(r.ty) == "bool" else int(r.value)
        return r

    def expand(self, n: Generic, ins):
        """ONNX Expand (bidirectional broadcast) with a compile-time target shape (constant or from shape
        arithmetic) on data with symbolic dims: TVM's converter reads ``.value`` of every data dim, so any symbolic
        dim (``batch``) fails (multi-query attention's ``expand(-1, heads, -1, -1)``). Returns None to let TVM try."""
        from tvm import tirx

        relax = self.relax
        data, shape = ins[0], ins[1]
        dsh = _shape_of(data)
        sv = self.shape_value(n.inputs[1], shape)
        if dsh is None or sv is None or sv.ndim != 1:
            return None
        tgt = [_sv_elem(d) for d in sv]
        r = max(len(dsh), len(tgt))
        d = [1] * (r - len(dsh)) + [_sv_elem(x) for x in dsh]
        t = [1] * (r - len(tgt)) + tgt
        out = []
        for dd, tt in zip(d, t):
            if isinstance(tt, int) and tt in (1, -1):  # -1 (TorchScript's expand(-1, ...)): keep, as TVM's converter
                out.append(dd)
            elif isinstance(dd, int) and dd == 1:
                out.append(tt)
            elif isinstance(dd, int) and isinstance(tt, int):
                if dd != tt:
                    raise UnsupportedOpError(f"Expand: cannot broadcast a dim of {dd} to {tt}")
                out.append(dd)
            elif isinstance(tt, int):
                out.append(tt)  # ONNX: the data dim must be 1 or tt
            elif self.known(dd) and self.known(tt):
                # a target size that is an expression (TorchScript's index_add_: Shape(zeros[0:1]) =
                # min(1, b*s) - min(0, b*s), i.e. 1): ONNX broadcasts, so the size is dd where tt is 1 and tt where dd
                # is 1: max(dd, tt). broadcast_to(x[b*s, 64], [that 1, 64]) kept row 0 only (round 14 D1)
                t1 = self.positive_analyzer().simplify(_as_prim(tt))
                if isinstance(t1, tirx.IntImm) and t1.value == 1 or _same_dim_expr(_as_prim(dd), t1):
                    out.append(dd)
                else:
                    out.append(self.positive_analyzer().simplify(tirx.max(_as_prim(dd), t1)))
            else:
                out.append(tt if not self.known(dd) else dd)
        if len(out) == len(dsh) and all(_same_dim_expr(_as_prim(o), x) for o, x in zip(out, dsh)):
            return data
        x = data
        if r > len(dsh):
            x = self.bb.emit(relax.op.reshape(x, [_as_prim(v) for v in d]))
        return self.bb.emit(relax.op.broadcast_to(x, relax.ShapeExpr([_as_prim(v) for v in out])))

    def range_(self, ins):
        """ONNX Range. TVM's converter defines the length as a symbolic var with a ``match_cast`` of a runtime shape
        that no later binding uses; TVM's passes then drop that binding and compilation fails with "PrimExpr ...
        range_len has not been computed". Here the matched shape itself feeds the result
        so the definition stays."""
        from tvm import tirx

        relax = self.relax
        op = relax.op
        sym = self.range_symbolic(ins)
        if sym is not None:
            return sym
        start, limit, delta = [self.prim_to_tensor(v) for v in ins]
        dt = _dtype_of(start)
        f = [self.bb.emit(op.astype(v, "float64")) for v in (start, limit, delta)]
        cnt = self.bb.emit(op.astype(op.maximum(op.ceil(op.divide(op.subtract(f[1], f[0]), f[2])), relax.const(0.0, "float64")), "int64"))
        shp = self.bb.emit(op.tensor_to_shape(op.reshape(cnt, (1,))))
        n_var = tirx.Var(f"range_len_{len(self.sym)}", "int64")
        self.sym[n_var.name] = n_var
        shp = self.bb.match_cast(shp, relax.ShapeType([n_var]))
        idx = self.bb.emit(op.arange(relax.prim_value(tirx.IntImm("int64", 0)), relax.prim_value(n_var), relax.prim_value(tirx.IntImm("int64", 1)), dt))
        # a no-op reshape by the matched shape var (what RewriteDataflowReshape emits), so that var stays used
        idx = self.bb.emit(relax.call_pure_packed("vm.builtin.reshape", idx, shp, ty_args=relax.TensorType([n_var], dt)))
        return self.bb.emit(op.add(op.multiply(idx, delta), start))

    def range_symbolic(self, ins):
        """Range with constant start/delta and a limit that is a size (a PrimValue from Shape/Gather/Squeeze,
        possibly through casts): the length is a symbolic expression of the input dims, no runtime match needed."""
        import tvm
        from tvm import tirx

        relax = self.relax
        start, limit, delta = ins

        def const_val(v):
            if isinstance(v, tvm.ir.GenericConst):
                a = v.value.numpy()
                return a.item() if a.size == 1 else None
            if isinstance(v, (tirx.IntImm, tirx.FloatImm)):
                return v.value
            return None

        s0, d0 = const_val(start), const_val(delta)
        if s0 is None or d0 is None or d0 == 0 or not isinstance(getattr(limit, "ty", None), tvm.ir.type.PrimType):
            return None
        lim = limit
        while isinstance(lim, tirx.Cast):  # Cast(float32, seq) and back: exact for sizes below 2**24
            lim = lim.value
        if not str(lim.ty).startswith("int") or float(s0) != int(s0) or float(d0) != int(d0):
            return None
        dt = _dtype_of(start) if isinstance(start, tvm.ir.GenericConst) else str(start.ty)
        lim = lim if str(lim.ty) == "int64" else tirx.Cast("int64", lim)
        return self.bb.emit(relax.op.arange(relax.prim_value(tirx.IntImm("int64", int(s0))), relax.prim_value(lim),
                                            relax.prim_value(tirx.IntImm("int64", int(d0))), dt))  # fmt: skip

    def as_tensor(self, e):
        """A shape expression or an int size (PrimValue) as an int64 tensor; tensors unchanged."""
        import tvm

        relax = self.relax
        if isinstance(e, relax.ShapeExpr):
            return self.bb.emit(relax.op.shape_to_tensor(e))
        if isinstance(getattr(e, "ty", None), tvm.ir.type.PrimType):
            return self.prim_to_tensor(e)
        return e

    def prim_to_tensor(self, v):
        """A PrimValue (an int64 size) as a 0-d int64 tensor."""
        import tvm
        from tvm import tirx

        relax = self.relax
        if not isinstance(getattr(v, "ty", None), tvm.ir.type.PrimType):
            return v
        try:
            val = v if str(v.ty) == "int64" else tirx.Cast("int64", v)
            t = relax.op.shape_to_tensor(relax.ShapeExpr([val]))
        except Exception:  # noqa: BLE001 - not a TIR expression (a Relax var of PrimType): leave it
            return v
        return self.bb.emit(relax.op.reshape(t, ()))

    def refine(self, name: str, e):
        """Give ``e`` the shape the graph IR knows for value ``name`` when TVM's converter lost it (data-dependent
        sizes such as ``Range(0, Squeeze(Shape(x)))`` become fresh vars; broadcasting with them loses the shape): a
        ``match_cast`` to the IR's symbolic shape, checked at run time."""
        relax = self.relax
        v = self.g.values.get(name)
        ty = e.ty
        if v is None or v.shape is None or any(d is None for d in v.shape) or not isinstance(ty, relax.TensorType):
            return e
        if ty.ndim not in (-1, len(v.shape)):
            return e
        have = _shape_of(e)
        want = [d if isinstance(d, int) else self.sym_expr(d) for d in v.shape]
        if have is None or len(have) != len(want):
            return self.bb.match_cast(e, relax.TensorType(want, ty.dtype))
        best = []
        for h, w in zip(have, want):
            if self.known(h) or not self.known(w):
                best.append(h)  # TVM's dim is in terms of the inputs (or the IR knows no better): keep it
            else:
                best.append(w)
        if all(b is h for b, h in zip(best, have)):
            return e
        return self.bb.match_cast(e, relax.TensorType(best, ty.dtype))

    def unify_broadcast(self, op_type: str, ins: list):
        """Broadcasting ops (and MatMul's batch and inner dims) whose inputs disagree only because one side has a
        size TVM cannot relate to the graph inputs (``range_len_0`` from a ``Range`` over ``Shape``, ``unk__0``
        from ONNX shape inference) while the other side's size is known: ONNX requires them to be equal (or 1), so the
        unknown side is ``match_cast`` to the known size (checked at run time). Without it the result's shape is
        lost and TVM cannot legalize the ops downstream."""
        from tvm import tirx

        relax = self.relax
        tensors = [(i, v) for i, v in enumerate(ins) if v is not None and isinstance(getattr(v, "ty", None), relax.TensorType)]
        shapes = {i: _shape_of(v) for i, v in tensors}
        if len(tensors) < 2 or any(sh is None for sh in shapes.values()):
            return ins
        if op_type == "MatMul":
            a, b = shapes.get(0), shapes.get(1)
            if a is None or b is None or len(a) < 2 or len(b) < 2:
                return ins
            # batch dims right-aligned, and a's last == b's second to last
            pairs = [(0, len(a) - 1, 1, len(b) - 2)]
            for k in range(1, min(len(a), len(b)) - 1):
                pairs.append((0, len(a) - 2 - k, 1, len(b) - 2 - k))
        else:
            rank = max(len(sh) for sh in shapes.values())
            pairs = []
            idx = [i for i, _ in tensors]
            for k in range(1, rank + 1):
                for x in range(len(idx)):
                    for y in range(x + 1, len(idx)):
                        sa, sb = shapes[idx[x]], shapes[idx[y]]
                        if k <= len(sa) and k <= len(sb):
                            pairs.append((idx[x], len(sa) - k, idx[y], len(sb) - k))
        new = {i: list(sh) for i, sh in shapes.items()}
        changed = set()
        for ia, da, ib, db in pairs:
            ha, hb = new[ia][da], new[ib][db]
            if _is_one(ha) or _is_one(hb) or _same_dim_expr(ha, hb):
                continue
            self.note_fixed(ha, hb, op_type)
            ka, kb = self.known(ha), self.known(hb)
            if ka and not kb:
                new[ib][db] = ha
                changed.add(ib)
            elif kb and not ka:
                new[ia][da] = hb
                changed.add(ia)
            elif ka and kb and _static_int(ha) is None and _static_int(hb) is None:
                # two graph inputs' own dims that the model combines (input_ids [b1, s1] and attention_mask [b2, s2]
                # from the TorchScript exporter's list-form dynamic_axes, which names every input's axes apart): ONNX
                # requires them equal here, so b's is cast to a's (checked at run time, and by the runtimes before a
                # call through dim_ties); TVM cannot otherwise give the sum a shape and the build failed
                new[ib][db] = ha
                changed.add(ib)
                if isinstance(ha, tirx.Var) and isinstance(hb, tirx.Var):
                    self.dim_ties.setdefault(hb.name, self.dim_ties.get(ha.name, ha.name))
        if not changed:
            return ins
        out = list(ins)
        for i in sorted(changed):
            out[i] = self.bb.match_cast(ins[i], relax.TensorType(new[i], str(ins[i].ty.dtype)))
        return out

    def reshape_guard(self, n: Generic, x, shp):
        """A Reshape to a target with a size the export baked in (TorchScript's ``view(79, bsz * heads, 16)`` of an
        attention whose length follows the input): TVM's reshape does not check the element count at run time, so
        at another input length the library read past its input and returned garbage (exit 0). Where the counts are
        not provably equal, the input is ``match_cast`` to the one shape with the target's count (one input dim
        solved for it), checked when the library runs; the build report names the node. Targets with -1 (the count
        inferred) are left to TVM."""
        from tvm import tirx

        relax = self.relax
        dims = _shape_of(x) if isinstance(getattr(x, "ty", None), relax.TensorType) else None
        tv = self.shape_value(n.inputs[1], shp)
        if dims is None or tv is None or tv.ndim != 1:
            return x
        target = [_sv_elem(d) for d in tv.tolist()]
        if any(isinstance(d, bool) for d in target) or any(isinstance(d, int) and d < 0 for d in target):
            return x
        if not n.attributes.get("allowzero"):
            target = [dims[i] if isinstance(d, int) and d == 0 and i < len(dims) else d for i, d in enumerate(target)]
        def count(ds):
            return _as_prim(product(_as_prim(_sv_elem(d)) for d in ds))

        prod_out = count(target)
        if self.simp(count(dims) - prod_out) == 0:
            return x
        for i in range(len(dims)):  # the input dim that makes the counts equal, where it is a whole expression
            if _static_int(dims[i]) is not None:
                continue
            rest = count(dims[:i] + dims[i + 1 :])
            want = self.simp(tirx.floordiv(prod_out, rest))
            if self.simp(_as_prim(want) * rest - prod_out) != 0:
                continue
            if isinstance(want, int) and want < 1:
                continue
            if not (isinstance(want, int) and self.fix_input_dim(dims[i], want, "Reshape")):  # (a graph input's own dim)
                self.reshape_fixed.append((n.name, i, want))
            new = list(dims)
            new[i] = _as_prim(want)
            return self.bb.match_cast(x, relax.TensorType(new, str(x.ty.dtype)))
        return x

    def note_fixed(self, a, b, op: str) -> None:
        """A graph input's symbolic dim that must equal a constant size here (ONNX broadcasting, no 1 on either side):
        a TorchScript export with the sequence length baked in (a 16 x 16 mask added to the scores). TVM cannot build
        the op (the shapes disagree for every other size: "CodeGenVM cannot emit ... R.add"), and onnxruntime fails
        at every other size too: :func:`lower` lowers the input at that size."""
        for var, size in ((a, b), (b, a)):
            n = _static_int(size)
            if n is not None and n > 1:
                self.fix_input_dim(var, n, op)

    def fix_input_dim(self, var, size: int, op: str) -> bool:
        """Record that the model needs the graph input dim ``var`` to be ``size`` (:func:`lower` lowers it at that
        size). False when ``var`` is not a graph input's own symbolic dim."""
        from tvm import tirx

        if not (isinstance(var, tirx.Var) and any(var.same_as(v) for v in self.input_syms)):
            return False
        key = next((k for k, v in self.sym.items() if v.same_as(var)), None)
        if key is None:
            return False
        self.found_fixed.setdefault(key, (size, op))
        return True

    def unify_concat(self, ins: list, axis: int) -> list:
        """A Concat's inputs agree on every dim but ``axis`` (ONNX requires it), though Relax may not see it: a U-Net
        with dynamic height concatenates its input (``h``) with an up-conv of a pooled map (``(h // 2) * 2``). Each
        such dim is reshaped to one size (a constant, else a graph input's dim, else the first; the element count is
        checked at run time); without it the concat had no shape and the build failed ("CodeGenVM cannot emit ...
        R.concat")."""
        from tvm import tirx

        relax = self.relax
        shapes = [_shape_of(v) if isinstance(getattr(v, "ty", None), relax.TensorType) else None for v in ins]
        if len(ins) < 2 or any(sh is None for sh in shapes) or len({len(sh) for sh in shapes}) != 1:
            return ins
        rank = len(shapes[0])
        ax = axis % rank
        new, changed = [list(sh) for sh in shapes], set()
        for d in range(rank):
            dims = [sh[d] for sh in shapes]
            if d == ax or all(_same_dim_expr(dims[0], x) for x in dims[1:]):
                continue
            target = next((x for x in dims if _static_int(x) is not None), None)
            target = target if target is not None else next((x for x in dims if isinstance(x, tirx.Var) and self.known(x)), dims[0])
            for i, x in enumerate(dims):
                if not _same_dim_expr(x, target):
                    new[i][d] = target
                    changed.add(i)
        out = list(ins)
        for i in sorted(changed):  # a reshape (a view; its element count is checked at run time): a match_cast of
            # (h // 2) * 2 to h crashed TVM's FuseTIR (a segfault) once fused with the ops around it
            out[i] = self.bb.emit(relax.op.reshape(ins[i], new[i]))
        return out

    def known(self, d) -> bool:
        """``d`` is a constant or an expression of the graph inputs' symbolic dims only. A negative constant is not a
        size: TVM leaves the -1 of a reshape whose target shape is a bound shape var (not a literal) unresolved."""
        from tvm import tirx

        if isinstance(d, int):
            return d >= 0
        if isinstance(d, tirx.IntImm):
            return d.value >= 0
        for var in tirx.analysis.undefined_vars(d):
            if not any(var.same_as(s) for s in self.input_syms):
                return False
        return True

    def sym_expr(self, text: str):
        """A symbolic dim of the IR (``s70``, ``Min(128, s70)``, ``2*s1 + 1`` ...) as a TIR expression over the same
        vars; anything unparsable becomes its own var (bound by the match_cast)."""
        import ast

        from tvm import tirx

        def conv(node):
            if isinstance(node, ast.Expression):
                return conv(node.body)
            if isinstance(node, ast.Constant) and isinstance(node.value, int):
                return tirx.IntImm("int64", node.value)
            if isinstance(node, ast.Name):
                return self.dim(node.id, node.id)
            if isinstance(node, ast.BinOp):
                a, b = conv(node.left), conv(node.right)
                ops = {ast.Add: lambda: a + b, ast.Sub: lambda: a - b, ast.Mult: lambda: a * b,
                       ast.FloorDiv: lambda: tirx.floordiv(a, b), ast.Mod: lambda: tirx.floormod(a, b)}  # fmt: skip
                if type(node.op) in ops:
                    return ops[type(node.op)]()
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and len(node.args) == 2 and not node.keywords:
                a, b = conv(node.args[0]), conv(node.args[1])
                if node.func.id in ("Min", "min"):
                    return tirx.min(a, b)
                if node.func.id in ("Max", "max"):
                    return tirx.max(a, b)
            raise ValueError(text)

        try:
            return conv(ast.parse(text, mode="eval"))
        except (SyntaxError, ValueError, RecursionError):
            return self.dim(text, text)

    # ---- driver --------------------------------------------------------------------------------------------
    def lower_node(self, n) -> None:
        try:
            self._lower_node(n)
        except (UnsupportedOpError, BuildError):
            raise
        except Exception as e:  # noqa: BLE001 - a TVM failure on a node is reported naming the node
            if isinstance(e, (KeyboardInterrupt, MemoryError)):
                raise
            msg = str(e).strip().splitlines()
            raise BuildError(f"node '{n.name}' ({n.op}): {msg[-1][:300] if msg else type(e).__name__}")

    def _lower_node(self, n) -> None:
        relax = self.relax
        if isinstance(n, Generic):
            y = self.depthwise_conv(n)
            if y is None:
                y = self.grouped_conv(n)
            if y is None:
                y = self.conv_transpose(n)
            if y is not None:
                self.nhwc[n.outputs[0]] = y
                return
        if isinstance(n, (Conv, Generic)):
            y, last = self.conv(n) if isinstance(n, Conv) else (self.channels_last_op(n), True)
            if y is None and isinstance(n, Generic):
                y, last = self.spatial_pool(n), False
            if y is not None:  # channels-last, or NCHW from the conv's fallback (spatial sizes unknown) / a pool
                (self.nhwc if last else self.env)[n.outputs[0]] = y
                return
        ins = [self.value(i) for i in n.inputs]
        if isinstance(n, Linear):
            outs = [(n.outputs[0], self.linear(n, ins[0]))]
        elif isinstance(n, LayerNorm):
            outs = [(n.outputs[0], self.layernorm(n, ins[0]))]
        elif isinstance(n, RMSNorm):
            outs = [(n.outputs[0], self.rmsnorm(n, ins[0]))]
        elif isinstance(n, Embedding):
            outs = [(n.outputs[0], self.embedding(n, ins[0]))]
        elif isinstance(n, Residual):  # (two spellings of one length, e.g. a conv stem's and an export's formula)
            outs = [(n.outputs[0], self.bb.emit(relax.op.add(*self.unify_broadcast("Add", [ins[0], ins[1]]))))]
        elif isinstance(n, MoE):
            outs = [(n.outputs[0], self.moe(n, ins[0]))]
        elif isinstance(n, Generic):
            outs = self.generic(n, ins)
        else:
            raise UnsupportedOpError(f"{n.op} (node '{n.name}') cannot be lowered")
        for name, e in outs:
            self.env[name] = e

    def export_live(self, later, outputs) -> None:
        """Before a dataflow block ends: the values the ``later`` nodes or the outputs use become block outputs (a
        dataflow variable is not visible after its block)."""
        import tvm

        relax = self.relax
        live = {i for n in later for i in n.inputs if i} | set(outputs)
        for name in sorted(live & set(self.nhwc)):
            self.value(name)  # a channels-last value read after the block: its NCHW form, emitted inside the block
        for name in sorted(live & set(self.env)):
            v = self.env[name]
            if isinstance(v, (tvm.ir.expr.Constant, relax.ShapeExpr)) or (isinstance(v, relax.Var) and not isinstance(v, relax.DataflowVar)):
                continue  # a literal stays one (a reshape's target shape bound to a var would lose its -1 inference)
            if isinstance(v, relax.Expr):
                self.env[name] = self.bb.emit_output(v)

    def run(self) -> Lowered:
        relax = self.relax
        in_vars, in_info = self.input_vars()
        g = self.g
        # parameters become known while lowering; the function signature is fixed at the end (see below)
        with self.bb.function("main", params=None):
            # one dataflow block, except around routed MoE layers: their data-dependent token counts are bound by
            # match_cast, and FuseOps reorders a dataflow block by data dependencies only, which moved the uses of
            # those counts above their binding. Outside a dataflow block nothing is reordered (or fused).
            block = None
            cast_in = [n for n in g.inputs if n in self.io_dtypes and self.io_dtypes[n] != g.values[n].dtype]
            if cast_in:  # inputs taken in their io dtype, computed in the graph's
                block = self.bb.dataflow()
                block.__enter__()
                for name in cast_in:
                    self.env[name] = self.bb.emit(relax.op.astype(self.env[name], g.values[name].dtype))
            for i, n in enumerate(g.nodes):
                if isinstance(n, MoE) and self.moe_routed:
                    if block is not None:
                        self.export_live(g.nodes[i:], g.outputs)
                        block.__exit__(None, None, None)
                        block = None
                elif block is None:
                    block = self.bb.dataflow()
                    block.__enter__()
                self.lower_node(n)
            if block is None:
                block = self.bb.dataflow()
                block.__enter__()
            results = [self.value(o) for o in g.outputs]
            results = [r if o not in self.io_dtypes or _dtype_of(r) == self.io_dtypes[o] else
                       self.bb.emit(relax.op.astype(r, self.io_dtypes[o])) for o, r in zip(g.outputs, results)]  # fmt: skip
            res = results[0] if len(results) == 1 else relax.Tuple(results)
            out = self.bb.emit_output(res)
            block.__exit__(None, None, None)
            self.bb.emit_func_output(out, params=in_vars + self.param_vars)
        mod = self.bb.get()
        mod["main"] = mod["main"].with_attr("num_input", len(in_vars))
        notes = [f"Reshape '{node}' needs dim {i} of its input to be {want} (a size the export fixed): the library runs "
                 "only on inputs that give it that size" for node, i, want in self.reshape_fixed]  # fmt: skip
        return Lowered(mod, in_info, list(g.outputs), self.params, self.kernels, self.sources, self.input_ranges, self.moe_notes,
                       self.moe_routed, self.extra_modules, self.dim_limits, self.dim_ties, notes)  # fmt: skip


def moe_routed_default(target) -> bool:
    """Whether MoE layers are lowered routed for ``target``: on the x86 host (Relax VM). Not on aarch64 / wasm, whose
    standalone call plans (backends/cross.py) allocate every buffer from the input dims and have no data-dependent
    sizes. On CUDA the routed form builds and is correct (``lower(..., moe_routed=True)``; the golden tiny-moe on an
    H100 within 4e-4 of the executor) but was 2.3-2.9x slower than the dense-equivalent one on that model
    (bench/results/cuda_e2e_moe_routed_onesync.json: one host sync per layer for the token counts, and the routed
    layers sit outside the dataflow blocks, unfused), so CUDA stays dense-equivalent."""
    return target.kind == "llvm" and not target.name.startswith("aarch64")


def lower(graph: Graph, target, tuning=None, act_dtype: str = "float32", dense_kernel: str | None = None,
          moe_routed: bool | None = None, io_dtypes: dict[str, str] | None = None) -> Lowered:
    """Lower ``graph`` for ``target`` (a :class:`sparsec.backends.targets.Target`) into a Relax module. ``moe_routed``:
    MoE layers routed or dense-equivalent (None: :func:`moe_routed_default`). ``io_dtypes``: graph inputs and outputs
    the library takes / returns in another float dtype than ``graph`` computes them in (cast at its boundary; see
    :func:`float32_compute`)."""
    from .tune import TuningDB

    tuning = tuning if tuning is not None else TuningDB.empty()
    first = _Lowerer(graph, target, tuning, act_dtype, dense_kernel, moe_routed, io_dtypes)
    try:
        low = first.run()
        failed = None
    except UnsupportedOpError as e:
        low, failed = None, e
    if not first.found_fixed:
        if failed is not None:
            raise failed
        return low
    # an input dim the model fixes (note_fixed): lowered at that size, the library takes no other (as onnxruntime)
    fixed = {k: n for k, (n, _) in first.found_fixed.items()}
    low = _Lowerer(graph, target, tuning, act_dtype, dense_kernel, moe_routed, io_dtypes, fixed).run()
    for k, (n, op) in sorted(first.found_fixed.items()):
        where = ", ".join(f"input {i['name']!r} dim {j}" for i in low.inputs for j, d in enumerate(graph.values[i["name"]].shape or [])
                          if d == k)  # fmt: skip
        low.notes.append(f"{where or k}: the model needs size {n} there ({'an' if op[0] in 'AEIOU' else 'a'} {op} with a "
                         f"constant of that size: the export fixed it); the library takes only that size")  # fmt: skip
    return low


_F16 = 10  # onnx.TensorProto.FLOAT16
_F32 = 1  # onnx.TensorProto.FLOAT
_DTYPE_ATTR_OPS = ("EyeLike", "RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Bernoulli")


def float32_compute(graph: Graph) -> tuple[Graph, dict[str, str]] | None:
    """A float16 model for a CPU target: a copy of ``graph`` that computes in float32, and the float16 graph inputs and
    outputs (name -> "float16") the library keeps at its boundary. None when nothing in ``graph`` is float16.

    CPU targets have no float16 arithmetic: LLVM converts every float16 element to float32 and back around each
    scalar operation (a float16 Mistral ran at 0.22-0.36x onnxruntime on x86). Value dtypes, constants, node arrays
    (norm weights, embedding tables, biases, dense weights), Cast-to-float16 targets and float16 tensor attributes
    become float32; compressed formats keep their storage (their kernels compute in float32 already). The artifact's
    weights stay as stored: the library's parameters are cast when they are bound (runtime.build_params)."""
    import copy as _copy

    from ..compressor.formats import Dense
    from ..compressor.ir import Value

    g = graph.copy()
    changed = False
    memo: dict[int, Any] = {}  # one float32 array per float16 array (a head tied to its embedding stays one array)

    def f32(a):
        nonlocal changed
        if isinstance(a, np.ndarray) and a.dtype == np.float16:
            if id(a) not in memo:
                memo[id(a)] = a.astype(np.float32)
            changed = True
            return memo[id(a)]
        if isinstance(a, Dense) and a.data.dtype == np.float16:
            if id(a) not in memo:
                memo[id(a)] = Dense(f32(a.data))
            return memo[id(a)]
        if isinstance(a, LowRank):
            base = f32(a.base)
            if base is not a.base:
                c = _copy.copy(a)
                c.base = base
                return c
        return a

    io = {n: "float16" for n in list(g.inputs) + list(g.outputs) if g.values.get(n) is not None and g.values[n].dtype == "float16"}
    for k, v in list(g.values.items()):
        if v.dtype == "float16":
            g.values[k], changed = Value(v.name, "float32", v.shape), True
    g.constants = {k: f32(np.asarray(a)) if np.asarray(a).dtype == np.float16 else a for k, a in g.constants.items()}

    def convert(n) -> None:
        for f in ("weight", "bias", "table"):
            if hasattr(n, f):
                setattr(n, f, f32(getattr(n, f)))

    attrs_changed = False
    for n in g.nodes:
        if isinstance(n, MoE):
            for lin in n.linears():
                convert(lin)
        elif isinstance(n, Generic):
            if n.domain in ("", None) and n.op_type == "Cast" and n.attributes.get("to") == _F16:
                n.attributes["to"], attrs_changed = _F32, True
            if n.domain in ("", None) and n.op_type in _DTYPE_ATTR_OPS and n.attributes.get("dtype") == _F16:
                n.attributes["dtype"], attrs_changed = _F32, True
            for k, a in list(n.attributes.items()):
                if isinstance(a, np.ndarray) and a.dtype == np.float16:
                    n.attributes[k] = f32(a)
        else:
            convert(n)
    if not (changed or attrs_changed):
        return None
    return g, io


# ----------------------------------------------------------------------------------------------------------------
def _expert_map_onehot(n: MoE) -> np.ndarray:
    """``[routes, experts]`` float32: 1 where a router output is served by an expert (merged experts' expert_map)."""
    m = np.zeros((n.num_routes, len(n.experts)), dtype=np.float32)
    m[np.arange(n.num_routes), np.asarray(n.expert_map)] = 1.0
    return m


def _sv_elem(d):
    """A shape-value element: a Python int/bool when constant, else the TIR expression."""
    from tvm import tirx

    if isinstance(d, (bool, np.bool_)):
        return bool(d)
    if isinstance(d, (int, np.integer)):
        return int(d)
    if isinstance(d, tirx.IntImm):
        return bool(d.value) if str(d.ty) == "bool" else int(d.value)
    return d


GROUPED_CONV_MIN_OUT = 16  # output channels a group from which grouped_conv beats TVM's grouped conv2d (x86)
DEPTHWISE_MAX_TAPS = 81  # kernel positions up to which depthwise_conv writes its explicit sum (9x9)


def _depthwise_func(geo: "_ConvGeometry", batch, spatial: list[int], groups: int, out_c: int, dt: str, with_bias: bool,
                    lanes: int):
    """The scheduled PrimFunc of a channels-last depthwise conv: ``x [N, *spatial, groups]``, ``w [kernel positions,
    out_c]`` (+ ``b [out_c]``) -> ``y [N, *outs, out_c]``, output channel ``c`` reading input channel ``c // (out_c /
    groups)``. Each output is the sum over the kernel positions written out (no reduction axis): zero where a tap
    falls in the padding. The channel axis is split by the SIMD width and vectorized (taps are contiguous vector
    loads of x and w); batch x the first output axis run in parallel; the other output axes are loops."""
    import itertools

    from tvm import s_tir, te, tirx

    nd, mult = len(geo.kernel_shape), out_c // groups
    outs = geo.out_spatial(spatial)
    batch = batch if isinstance(batch, int) else tirx.Var("n", "int64")
    x = te.placeholder((batch, *spatial, groups), dt, name="x")
    w = te.placeholder((geo.kernel_size, out_c), dt, name="w")
    b = te.placeholder((out_c,), dt, name="b") if with_bias else None
    taps = list(itertools.product(*[range(k) for k in geo.kernel_shape]))

    def body(*idx):
        nb, o, c = idx[0], idx[1:-1], idx[-1]
        ci = c // mult if mult > 1 else c
        acc = b[c] if b is not None else tirx.const(0, dt)
        for j, kk in enumerate(taps):
            pos = [o[d] * geo.strides[d] + kk[d] * geo.dilations[d] - geo.pads[d] for d in range(nd)]
            lo = [kk[d] * geo.dilations[d] - geo.pads[d] for d in range(nd)]  # the tap's first and last input position
            hi = [lo[d] + (outs[d] - 1) * geo.strides[d] for d in range(nd)]
            conds = [p >= 0 for d, p in enumerate(pos) if lo[d] < 0] + [p < spatial[d] for d, p in enumerate(pos) if hi[d] >= spatial[d]]
            safe = [tirx.max(p, 0) if lo[d] < 0 else p for d, p in enumerate(pos)]
            safe = [tirx.min(p, spatial[d] - 1) if hi[d] >= spatial[d] else p for d, p in enumerate(safe)]
            term = x[(nb, *safe, ci)] * w[j, c]
            acc = acc + (tirx.if_then_else(tirx.all(*conds), term, tirx.const(0, dt)) if conds else term)
        return acc

    y = te.compute((batch, *outs, out_c), body, name="depthwise")
    sch = s_tir.Schedule(te.create_prim_func([x, w, *([b] if b is not None else []), y]))
    loops = sch.get_loops(sch.get_sblock("depthwise"))
    lanes = next((v for v in (lanes, 8, 4) if v <= lanes and out_c % v == 0), 0)
    if lanes:
        co, ci = sch.split(loops[-1], [None, lanes])
        sch.vectorize(ci)
    sch.parallel(loops[1])  # (batch outside: fusing a symbolic batch into it made every index an int64 division)
    return sch.mod["main"].with_attrs({"tirx.is_scheduled": True, "tirx.noalias": True, "op_pattern": 8})


def _col2im_te(geo: "_ConvGeometry", spatial: list[int], outs: list[int], with_bias: bool):
    """A TE function: a transposed conv's per-pixel contributions ``cols [N, *spatial, kernel positions, C]`` (+ bias
    ``[C]``) -> ``y [N, *outs, C]``, each output the sum over the taps ``kk`` whose input pixel ``h = (o + pad - kk *
    dilation) / stride`` is whole and inside the input (written out: no reduction axis)."""
    import itertools

    from tvm import te, tirx

    nd = len(geo.kernel_shape)
    taps = list(itertools.product(*[range(k) for k in geo.kernel_shape]))

    def f(cols, *b):
        def body(*idx):
            nb, o, c = idx[0], idx[1:-1], idx[-1]
            acc = b[0][c] if b else tirx.const(0, cols.dtype)
            for j, kk in enumerate(taps):
                conds, pos = [], []
                for d in range(nd):
                    t = o[d] + geo.pads[d] - kk[d] * geo.dilations[d]
                    s = geo.strides[d]
                    h = t if s == 1 else tirx.floordiv(t, s)
                    if s > 1:
                        conds.append(tirx.floormod(t, s) == 0)
                    conds += [t >= 0, h < spatial[d]]
                    pos.append(tirx.max(tirx.min(h, spatial[d] - 1), 0))
                acc = acc + tirx.if_then_else(tirx.all(*conds), cols[(nb, *pos, j, c)], tirx.const(0, cols.dtype))
            return acc

        return te.compute((cols.shape[0], *outs, cols.shape[-1]), body, name="col2im")

    return f


@dataclass
class _ConvGeometry:
    """Kernel, strides, pads (``[begin..., end...]``) and dilations of a convolution (what :func:`_im2col_te` reads)."""

    kernel_shape: tuple[int, ...]
    strides: tuple[int, ...]
    pads: tuple[int, ...]
    dilations: tuple[int, ...]

    kernel_size = Conv.kernel_size  # the raised Conv's, on the same four fields
    out_spatial = Conv.out_spatial


def _im2col_te(n: "Conv | _ConvGeometry", outs: list[int], groups: int = 1):
    """A TE function: channels-last ``[N, *spatial, C]`` -> the ``[N * prod(outs), prod(kernel) * C]`` patches of conv
    ``n`` (rows: batch and output positions, row-major; columns: kernel positions row-major, then channel), zero outside
    the input (the conv's padding). One injective op: TVM fuses it with the ops before it, and consecutive columns read
    and write consecutive channels. ``groups`` > 1: ``[groups, rows, prod(kernel) * C / groups]``, group g's columns
    over its channels ``g * C / groups ...``."""
    from tvm import te, tirx

    nd = len(n.kernel_shape)
    p_out = int(np.prod(outs))

    def f(x):
        c = x.shape[-1] // groups
        rows = x.shape[0] * p_out

        def unravel(i, dims):  # row-major
            out = []
            for d in reversed(dims):
                out.append(i % d)
                i = i // d
            return out[::-1]

        def patch(m, k, ch0):
            b, o = m // p_out, unravel(m % p_out, outs)
            ch, kk = ch0 + k % c, unravel(k // c, n.kernel_shape)
            idx = [o[j] * n.strides[j] + kk[j] * n.dilations[j] - n.pads[j] for j in range(nd)]
            inside = tirx.all(*[tirx.all(i >= 0, i < x.shape[1 + j]) for j, i in enumerate(idx)])
            safe = [tirx.max(tirx.min(i, x.shape[1 + j] - 1), 0) for j, i in enumerate(idx)]
            return tirx.if_then_else(inside, x[(b, *safe, ch)], tirx.const(0, x.dtype))

        if groups > 1:
            return te.compute((groups, rows, n.kernel_size * c), lambda g, m, k: patch(m, k, g * c), name="im2col")
        return te.compute((rows, n.kernel_size * c), lambda m, k: patch(m, k, 0), name="im2col")

    return f


def _nchw_shape(shape):
    """The NCHW shape of a channels-last ``[N, *spatial, C]`` shape."""
    return None if shape is None else [shape[0], shape[-1], *shape[1:-1]]


def _resize_matrix(n: Generic, size: int, scale: float, opset: int) -> np.ndarray | None:
    """The (out x in) matrix of an ONNX Resize along one axis of ``size`` elements at ``scale``, with the node's
    attributes: the executor's Resize (which matches onnxruntime; the ONNX reference implementation does not, for
    align_corners and nearest at some scales) applied to the identity, in float64: column j is the resize of e_j.
    None where the executor does not run it (e.g. antialias when downscaling)."""
    import torch

    from ..compressor.errors import SparsecError
    from ..compressor.onnx_ops import run_op

    keep = ("mode", "coordinate_transformation_mode", "cubic_coeff_a", "exclude_outside", "nearest_mode", "antialias")
    eye = torch.eye(size, dtype=torch.float64)[None, None]
    scales = torch.tensor([1.0, 1.0, scale, 1.0], dtype=torch.float32)
    try:
        (y,) = run_op("Resize", "", [eye, None, scales], {k: v for k, v in n.attributes.items() if k in keep}, opset, n.name)
    except SparsecError:
        return None
    m = y.detach().cpu().numpy()[0, 0].astype(np.float64)
    return m if m.ndim == 2 and m.shape[1] == size and np.isfinite(m).all() else None


def _attr_str(v, default: str) -> str:
    """A string attribute of an ONNX node as imported (bytes or str), or ``default`` when absent."""
    return (v.decode() if isinstance(v, bytes) else str(v)) if v is not None else default


def _is_true(e) -> bool:
    from tvm import tirx

    return isinstance(e, tirx.IntImm) and bool(e.value)


def _static_int(d) -> int | None:
    """A shape dim as an int when it is known at compile time, else None."""
    v = _sv_elem(d)
    return v if isinstance(v, int) else None


def _as_prim(v):
    from tvm import tirx

    return tirx.IntImm("int64", v) if isinstance(v, int) else v


def _box(x) -> np.ndarray:
    """``x`` (an int, bool or TIR expression) as a 0-d object array."""
    box = np.empty((), dtype=object)
    box[()] = x
    return box


def _obj(items) -> np.ndarray:
    out = np.empty(len(items), dtype=object)
    for i, x in enumerate(items):
        out[i] = x
    return out


def _ints_only(v, kind=int):
    if not all(isinstance(x, (bool, int)) for x in v.reshape(-1)):
        return None
    return np.array([kind(x) for x in v.reshape(-1)] + [0], dtype=object)[:-1].reshape(v.shape)


def _int_scalar(v):
    flat = list(np.asarray(v, dtype=object).reshape(-1))
    return int(flat[0]) if len(flat) == 1 and isinstance(flat[0], int) else None


def _tdiv(a, b):
    from tvm import tirx

    if isinstance(a, int) and isinstance(b, int):
        q = abs(a) // abs(b)
        return q if (a >= 0) == (b >= 0) else -q
    return tirx.truncdiv(_as_prim(a), _as_prim(b))


def _tmod(a, b):
    from tvm import tirx

    if isinstance(a, int) and isinstance(b, int):
        return a % b  # ONNX Mod (fmod=0): the sign of the divisor, like Python
    return tirx.floormod(_as_prim(a), _as_prim(b))


def _cmp(f, g):
    def c(a, b):
        if isinstance(a, int) and isinstance(b, int):
            return f(a, b)
        return g(_as_prim(a), _as_prim(b))
    return c


def _fold_ops():
    from tvm import tirx
    import operator as o

    return {
        "Add": lambda a, b: a + b, "Sub": lambda a, b: a - b, "Mul": lambda a, b: a * b, "Div": _tdiv, "Mod": _tmod,
        "Neg": lambda a: -a, "Abs": lambda a: abs(a) if isinstance(a, int) else tirx.abs(a),
        "Min": lambda *xs: min(xs) if all(isinstance(x, int) for x in xs) else _reduce(tirx.min, xs),
        "Max": lambda *xs: max(xs) if all(isinstance(x, int) for x in xs) else _reduce(tirx.max, xs),
        "Equal": _cmp(o.eq, tirx.EQ), "Less": _cmp(o.lt, tirx.LT), "LessOrEqual": _cmp(o.le, tirx.LE),
        "Greater": _cmp(o.gt, tirx.GT), "GreaterOrEqual": _cmp(o.ge, tirx.GE),
        "Not": lambda a: (not a) if isinstance(a, bool) else None,
        "And": lambda a, b: (a and b) if isinstance(a, bool) and isinstance(b, bool) else None,
        "Or": lambda a, b: (a or b) if isinstance(a, bool) and isinstance(b, bool) else None,
        "Identity": None, "Cast": None, "Unsqueeze": None, "Squeeze": None, "Reshape": None, "Concat": None,
        "Gather": None, "Slice": None, "ScatterElements": None, "ConstantOfShape": None, "Expand": None, "Range": None,
        "Where": None,
    }  # fmt: skip


def _reduce(f, xs):
    r = _as_prim(xs[0])
    for x in xs[1:]:
        r = f(r, _as_prim(x))
    return r


class _LazyOps(dict):
    def _load(self):
        if not dict.__len__(self):
            self.update(_fold_ops())

    def __contains__(self, k):
        self._load()
        return dict.__contains__(self, k)

    def __getitem__(self, k):
        self._load()
        return dict.__getitem__(self, k)


_FOLD_OPS = _LazyOps()
_CMP_OPS = {"Equal": "equal", "Less": "less", "LessOrEqual": "less_equal", "Greater": "greater",
            "GreaterOrEqual": "greater_equal"}  # fmt: skip
_FOLD_BOOL = {"Equal", "Less", "LessOrEqual", "Greater", "GreaterOrEqual", "Not", "And", "Or"}


def _dtype_name(dt) -> str:
    dt = np.dtype(dt)
    return "bool" if dt == np.bool_ else dt.name


def _shape_of(e):
    ty = e.ty
    shape = getattr(ty, "shape", None)
    if shape is None:
        return None
    vals = getattr(shape, "values", None)
    return None if vals is None else list(vals)


def _is_one(d) -> bool:
    from tvm import tirx

    return isinstance(d, (int, tirx.IntImm)) and int(d) == 1


def _same_dim_expr(a, b) -> bool:
    from tvm import tirx

    if isinstance(a, (int, tirx.IntImm)) and isinstance(b, (int, tirx.IntImm)):
        return int(a) == int(b)
    try:
        return bool(tvm_structural_equal(a, b))
    except Exception:  # noqa: BLE001
        return False


def tvm_structural_equal(a, b) -> bool:
    import tvm_ffi  # TVM 0.27: structural_equal lives in tvm_ffi (was tvm.ir)

    return tvm_ffi.structural_equal(a, b, map_free_vars=False)


def _same_dim(h, w) -> bool:
    from tvm import tirx

    if isinstance(w, int):
        return isinstance(h, (int, tirx.IntImm)) and int(h) == w
    return isinstance(h, tirx.Var) and h.same_as(w)


def _dtype_of(e) -> str:
    return str(e.ty.dtype)


def _last_dim(e) -> int:
    s = _shape_of(e)
    if not s:
        raise UnsupportedOpError("normalization over an unknown dimension")
    return int(s[-1])


def product(xs) -> Any:
    return math.prod(xs)
