"""ONNX lowerings of compressed weight formats (registered into :mod:`sparsec.compressor.onnx_export`).

Each lowering writes one Linear ``y = x Wᵀ (+ b)`` with ops onnxruntime runs natively, computing exactly what the
format's ``materialize()`` says (up to float rounding):

- ``GroupQuant`` and ``NMSparse`` of ``GroupQuant`` are first brought to a *dense-equivalent blocked* form: codes
  ``(out, in)``, one scale (and zero point) per row and block of ``block`` input columns. A plain ``GroupQuant`` is
  that form already (``block = group_size``); group-sparse (GQSA) weights write their removed groups as codes = zero
  point with scale 0; an N:M weight whose kept values are quantized in groups of ``g`` spans ``g·m/n`` original
  columns per group, so it is written with ``block = g·m/n`` and its pruned positions set to the zero point (the
  stored ONNX weight is then dense int4, twice the compact codes, but exact and run by onnxruntime's native kernels).
- 4-bit with ``block`` a power of two >= 16 -> ``MatMulNBits`` (``com.microsoft``; codes ``[N, blocks, block/2]``
  low nibble first -- the same bytes as ``GroupQuant``'s packing --, float scales, packed zero points; symmetric
  weights omit them, MatMulNBits' default zero point being ``2^(bits-1)`` like sparsec's). ``accuracy_level`` is
  left at 0 (float arithmetic).
- otherwise, at export opset >= 21: ``DequantizeLinear`` with ``block_size`` (``axis=1`` on the ``(out, in)`` codes:
  INT4 / UINT4 tensors for 4-bit, INT8 / UINT8 for 8-bit, UINT8 / INT8 holding 2- and 3-bit codes), then
  ``Transpose`` and ``MatMul``. (The codes are kept in ``(out, in)`` order with a ``Transpose`` after the
  dequantization on purpose: onnxruntime fuses ``DequantizeLinear(axis=0) -> MatMul`` into a ``MatMulNBits`` with
  ``accuracy_level=4`` by default, which quantizes the activations to int8 and costs ~0.5% relative error.)
- at export opsets 13-20: per-axis ``DequantizeLinear`` over the codes viewed as ``(out·blocks, block)``, then
  ``Reshape``, ``Transpose``, ``MatMul``; below 13, a dense ``MatMul`` (materialized weight).
- ``LowRank(base, A, B)``: the base format's lowering, plus ``MatMul(MatMul(x, Bᵀ), Aᵀ)``, added (float16 factors
  are stored as float16 with a ``Cast``).

The export opset: blocked ``DequantizeLinear`` needs opset 21. :func:`wanted_opset` (an ``OPSET_HOOKS`` entry) raises
the export opset of a graph holding such weights from its own opset (>= 13) to 21 when every generic node of the graph
keeps its meaning there (no ``Reduce*`` with an ``axes`` attribute below 18, no ``GroupNormalization``, ``GridSample``
or ``DFT`` whose definitions changed); otherwise the per-axis form is used.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto

from .formats import GroupQuant, LowRank, NMSparse, pack_bits
from .ir import Conv, Generic, Graph, Linear

MATMULNBITS_BITS = (4,)
BLOCKED_DQ_OPSET = 21


# ----------------------------------------------------------------------------------------------------------------
class Blocked:
    """Dense-equivalent blocked quantization: ``W[o, i] = (codes[o, i] - zero[o, i // block]) * scale[o, i // block]``."""

    def __init__(self, codes: np.ndarray, scales: np.ndarray, zeros: np.ndarray | None, bits: int, block: int):
        self.codes, self.scales, self.zeros, self.bits, self.block = codes, scales, zeros, bits, block

    @property
    def symmetric(self) -> bool:
        return self.zeros is None

    def zero_grid(self) -> np.ndarray:
        if self.zeros is None:
            return np.full(self.scales.shape, 1 << (self.bits - 1), dtype=np.uint8)
        return self.zeros

    def dequantize(self) -> np.ndarray:
        out, inn = self.codes.shape
        nb = inn // self.block
        u = self.codes.astype(np.float32).reshape(out, nb, self.block)
        return ((u - self.zero_grid().astype(np.float32)[..., None]) * self.scales[..., None]).reshape(out, inn)


def blocked(w) -> Blocked | None:
    """The dense-equivalent blocked form of a ``GroupQuant`` or ``NMSparse(GroupQuant)`` weight (None otherwise)."""
    if isinstance(w, GroupQuant):
        zeros = None if w.symmetric else w.zero_grid().astype(np.uint8)
        return Blocked(w.codes(), w.scale_grid(), zeros, w.bits, w.group_size)
    if isinstance(w, NMSparse) and isinstance(w.values, GroupQuant) and w.values.group_mask_packed is None:
        gq = w.values
        g = gq.group_size
        if (g * w.m) % w.n or g % w.n:
            return None
        block = g * w.m // w.n
        out, inn = w.shape
        zgrid = gq.zero_grid().astype(np.uint8)  # (out, in/block): one block per compact group
        codes = np.repeat(zgrid, block, axis=1).reshape(out, inn // w.m, w.m)
        kept = gq.codes().reshape(out, inn // w.m, w.n)
        np.put_along_axis(codes, w.indices().astype(np.int64), kept, axis=-1)
        return Blocked(codes.reshape(out, inn), gq.scale_grid(), None if gq.symmetric else zgrid, gq.bits, block)
    return None


# ----------------------------------------------------------------------------------------------------------------
def _int4_tensor(name: str, values: np.ndarray, signed: bool) -> TensorProto:
    """An INT4 / UINT4 initializer (two elements per byte, first in the low nibble)."""
    v = np.asarray(values).astype(np.int16).reshape(-1)
    nib = (v & 0xF).astype(np.uint8)
    if nib.size % 2:
        nib = np.concatenate([nib, np.zeros(1, np.uint8)])
    t = TensorProto()
    t.name = name
    t.data_type = TensorProto.INT4 if signed else TensorProto.UINT4
    t.dims.extend(int(d) for d in np.asarray(values).shape)
    t.raw_data = pack_bits(nib[None, :], 4).tobytes()
    return t


def _float_dtype(b):
    return np.float16 if b.options.float_dtype == "float16" else np.float32


def _add_bias(b, lin: Linear, mm: str, y: str, meta: dict, dtype) -> None:
    bname = b.init(f"{lin.name}.bias", lin.bias.astype(dtype))
    b.node("Add", [mm, bname], [y], name=f"{lin.name}/Add", meta=meta)


def _matmul_nbits(b, lin: Linear, q: Blocked, x: str, y: str, meta: dict) -> None:
    out, inn = q.codes.shape
    nb = inn // q.block
    fdt = _float_dtype(b)
    B = pack_bits(q.codes.reshape(out, nb, q.block), q.bits)  # (N, blocks, blob)
    ins = [x, b.init(f"{lin.name}.qweight", B), b.init(f"{lin.name}.scales", q.scales.astype(fdt).reshape(-1))]
    if not q.symmetric:
        ins.append(b.init(f"{lin.name}.zero_points", pack_bits(q.zeros, q.bits).reshape(-1)))
    target = y if lin.bias is None else b.fresh(f"{lin.name}/MatMulNBits_out")
    b.node("MatMulNBits", ins, [target], name=f"{lin.name}/MatMulNBits", domain="com.microsoft", meta=meta,
           K=int(inn), N=int(out), bits=int(q.bits), block_size=int(q.block))  # fmt: skip
    if lin.bias is not None:
        _add_bias(b, lin, target, y, meta, fdt)


def _dequant_matmul(b, lin: Linear, q: Blocked, x: str, y: str, meta: dict) -> None:
    wd = _dequant_weight(b, lin, q, meta)
    fdt = _float_dtype(b)
    (wt_,) = b.node("Transpose", [wd], 1, name=f"{lin.name}/Transpose", meta=meta, perm=[1, 0])
    target = y if lin.bias is None else b.fresh(f"{lin.name}/MatMul_out")
    b.node("MatMul", [x, wt_], [target], name=f"{lin.name}/MatMul", meta=meta)
    if lin.bias is not None:
        _add_bias(b, lin, target, y, meta, fdt)


def _dequant_weight(b, lin: Linear, q: Blocked, meta: dict) -> str:
    """DequantizeLinear of the codes: the name of the ``(out, in)`` float weight."""
    out, inn = q.codes.shape
    nb = inn // q.block
    fdt = _float_dtype(b)
    z = q.zero_grid().astype(np.int16)
    blocked_op = b.opset >= BLOCKED_DQ_OPSET
    if q.bits == 4 and blocked_op:
        if q.symmetric:
            wt = _int4_tensor(b.fresh(f"{lin.name}.qweight"), q.codes.astype(np.int16) - 8, signed=True)
            zt = None
        else:
            wt = _int4_tensor(b.fresh(f"{lin.name}.qweight"), q.codes, signed=False)
            zt = _int4_tensor(b.fresh(f"{lin.name}.zero_points"), q.zeros, signed=False)
        b.initializers.append(wt)
        wname = wt.name
        zname = None
        if zt is not None:
            b.initializers.append(zt)
            zname = zt.name
    else:
        if q.symmetric and q.bits == 8:
            codes, zeros = (q.codes.astype(np.int16) - 128).astype(np.int8), None
        elif q.symmetric:
            codes, zeros = (q.codes.astype(np.int16) - np.repeat(z, q.block, axis=1)).astype(np.int8), None
        else:
            codes, zeros = q.codes.astype(np.uint8), q.zeros.astype(np.uint8)
        if not blocked_op:  # per-axis over (out·blocks, block)
            codes = codes.reshape(out * nb, q.block)
            zeros = None if zeros is None else zeros.reshape(-1)
        wname = b.init(f"{lin.name}.qweight", codes)
        zname = None if zeros is None else b.init(f"{lin.name}.zero_points", zeros)
    scales = q.scales.astype(fdt)
    sname = b.init(f"{lin.name}.scales", scales if blocked_op else scales.reshape(-1))
    ins = [wname, sname] + ([zname] if zname else [])
    if blocked_op:
        (wd,) = b.node("DequantizeLinear", ins, 1, name=f"{lin.name}/DequantizeLinear", meta=meta, axis=1, block_size=int(q.block))
    else:
        (wf,) = b.node("DequantizeLinear", ins, 1, name=f"{lin.name}/DequantizeLinear", meta=meta, axis=0)
        shape = b.init(f"{lin.name}/shape", np.array([out, inn], dtype=np.int64))
        (wd,) = b.node("Reshape", [wf, shape], 1, name=f"{lin.name}/Reshape", meta=meta)
    return wd


def lower_conv(b, n: Conv, x: str, y: str, meta: dict) -> None:
    """A :class:`Conv` -> ONNX ``Conv``. A quantized weight (``GroupQuant``, ``NMSparse(GroupQuant)``) is stored as
    its codes and scales: DequantizeLinear -> Reshape -> Transpose to the ``(out, in, *kernel)`` layout; other formats
    (dense, N:M, low-rank) as the dense kernel they compute (ONNX has no sparse or factored convolution)."""
    fdt = _float_dtype(b)
    nd = len(n.kernel_shape)
    q = blocked(n.weight) if b.options.weights == "native" and b.opset >= 13 else None
    if q is not None:
        wd = _dequant_weight(b, n, q, meta)
        shape = b.init(f"{n.name}/kernel_shape", np.array([n.out_features, *n.kernel_shape, n.in_channels], dtype=np.int64))
        (w4,) = b.node("Reshape", [wd, shape], 1, name=f"{n.name}/Reshape_kernel", meta=meta)
        (wk,) = b.node("Transpose", [w4], 1, name=f"{n.name}/Transpose_kernel", meta=meta, perm=[0, nd + 1, *range(1, nd + 1)])
    else:
        wk = b.init(f"{n.name}.weight", n.kernel_weight().astype(fdt))
    ins = [x, wk] + ([b.init(f"{n.name}.bias", n.bias.astype(fdt))] if n.bias is not None else [])
    b.node("Conv", ins, [y], name=f"{n.name}/Conv", meta=meta, **n.onnx_attributes())


def lower_group_quant(b, lin: Linear, x: str, y: str, meta: dict) -> bool:
    """``GroupQuant`` / ``NMSparse(GroupQuant)`` -> MatMulNBits, or DequantizeLinear + MatMul."""
    w = lin.weight
    if not (isinstance(w, GroupQuant) or (isinstance(w, NMSparse) and isinstance(w.values, GroupQuant))):
        return False
    q = blocked(w)
    if q is None or b.opset < 13:
        return False
    pow2 = q.block >= 16 and q.block & (q.block - 1) == 0
    if q.bits in MATMULNBITS_BITS and pow2:
        _matmul_nbits(b, lin, q, x, y, meta)
    else:
        _dequant_matmul(b, lin, q, x, y, meta)
    return True


def lower_low_rank(b, lin: Linear, x: str, y: str, meta: dict) -> bool:
    """``LowRank(base, A, B)`` -> base lowering + ``(x Bᵀ) Aᵀ``, added."""
    from .onnx_export import lower_linear

    w = lin.weight
    if not isinstance(w, LowRank):
        return False
    fdt = _float_dtype(b)
    base = Linear(f"{lin.name}.base", list(lin.inputs), [], meta=dict(lin.meta), weight=w.base, bias=lin.bias)
    yb = b.fresh(f"{lin.name}/base_out")
    lower_linear(b, base, x, yb, meta)

    def factor(hint: str, arr: np.ndarray) -> str:
        t = np.ascontiguousarray(arr.T)
        if t.dtype == fdt:
            return b.init(hint, t)
        name = b.init(hint, t)
        return b.node("Cast", [name], 1, name=f"{hint}/Cast", meta=meta, to=int(onnx.helper.np_dtype_to_tensor_dtype(np.dtype(fdt))))[0]

    bt = factor(f"{lin.name}.lowrank_b_t", w.b)
    at = factor(f"{lin.name}.lowrank_a_t", w.a)
    (h,) = b.node("MatMul", [x, bt], 1, name=f"{lin.name}/LowRank/MatMul_B", meta=meta)
    (d,) = b.node("MatMul", [h, at], 1, name=f"{lin.name}/LowRank/MatMul_A", meta=meta)
    b.node("Add", [yb, d], [y], name=f"{lin.name}/LowRank/Add", meta=meta)
    return True


# ----------------------------------------------------------------------------------------------------------------
def _quantized(w):
    """The quantized core of a weight (``GroupQuant`` or ``NMSparse(GroupQuant)``, also under a ``LowRank``)."""
    if isinstance(w, LowRank):
        w = w.base
    if isinstance(w, GroupQuant) or (isinstance(w, NMSparse) and isinstance(w.values, GroupQuant)):
        return w
    return None


def _needs_blocked_dq(g: Graph) -> bool:
    for lin in g.linears():
        w = _quantized(lin.weight)
        q = None if w is None else blocked(w)
        if q is None:
            continue
        pow2 = q.block >= 16 and q.block & (q.block - 1) == 0
        if isinstance(lin, Conv) or not (q.bits in MATMULNBITS_BITS and pow2):  # a Conv has no MatMulNBits
            return True
    return False


def upgrade_safe(g: Graph, opset: int, target: int = BLOCKED_DQ_OPSET) -> bool:
    """True when every generic default-domain node of ``g`` can be written at ``target``: its op did not change after
    ``opset``, or onnx's version converter converts it (onnx_export.convert_node: Split without sizes, Reduce* axes,
    opset-11 Squeeze / Unsqueeze, ...); the export then converts them."""
    from .onnx_export import convert_node, generic_proto

    seen: set[str] = set()
    for n in g.nodes:
        if isinstance(n, Generic) and not n.domain:
            try:
                if onnx.defs.get_schema(n.op_type, opset).since_version == onnx.defs.get_schema(n.op_type, target).since_version:
                    continue
            except onnx.defs.SchemaError:
                return False
            key = f"{n.op_type}/{len(n.inputs)}/{len(n.outputs)}" + repr(sorted(n.attributes.items()))
            if key in seen:
                continue
            if convert_node(generic_proto(n), opset, target) is None:
                return False
            seen.add(key)
    return True


def wanted_opset(g: Graph, opset: int) -> int:
    """The export opset for ``g``: raised to 21 when a weight needs blocked DequantizeLinear and that is safe."""
    if opset >= BLOCKED_DQ_OPSET or not _needs_blocked_dq(g):
        return opset
    return BLOCKED_DQ_OPSET if upgrade_safe(g, opset) else opset


def register() -> None:
    from .onnx_export import OPSET_HOOKS, register_linear_lowering

    register_linear_lowering(lower_group_quant)
    register_linear_lowering(lower_low_rank)
    if wanted_opset not in OPSET_HOOKS:
        OPSET_HOOKS.append(wanted_opset)
