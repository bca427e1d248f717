"""Group-quantized dense weights on CUDA without a hand-written kernel: TVM's own dequantize + matmul.

``cuda.int4_dequant_mma`` (cuda_sparse.py) covers int4 with group sizes that are multiples of 16. Every other
group-quantized dense weight on a CUDA target (int8 above all, also int2/int3 and int4 with other group sizes) used to
be materialized as a dense float weight for TVM's dense path, which keeps neither the memory saving nor the bytes a
decode step reads. ``tvm.dequant_matmul`` keeps the codes in device memory, one byte each, with float32 scales (and
zero points) per group, and computes

    y[m, n] = sum_k x[m, k] * ((c[n, k] - z[n, k / g]) * s[n, k / g])       (float32 accumulation)

as one TE function of two stages (dequantize, matmul), emitted with ``BlockBuilder.emit_te``. TVM's CUDA pipeline
schedules it like any legalized matmul (DLight ``gpu.Matmul``: the dequantize stage is inlined into the
shared-memory load of the weight tile, so no dequantized copy of the weight is written). Nothing here is hand
scheduled: the kernel is whatever TVM's default GPU schedules make of it. Removed groups (GQSA group sparsity) have
scale 0, as in the other kernels.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from ...compressor.formats import GroupQuant
from .cuda_sparse import _gq_codes_scales
from .registry import KernelImpl, WeightParam, register_kernel

NAME = "tvm.dequant_matmul"


def prepare_dequant(linear, config: dict[str, Any]) -> list[np.ndarray]:
    """[codes (N, K) uint8, scales (N, G) float32 (, zeros (N, G) float32 when asymmetric)]."""
    gq: GroupQuant = linear.weight
    codes, scales, zeros = _gq_codes_scales(gq)  # the CUDA kernels' grids: removed groups have scale 0
    out = [np.ascontiguousarray(codes), np.ascontiguousarray(scales, dtype=np.float32)]
    if not gq.symmetric:
        out.append(np.ascontiguousarray(zeros, dtype=np.float32))
    return out


def dequant_matmul_te(x, codes, scales, zeros, group: int, zero_const: float, out_dtype: str):
    """The TE computation (``zeros`` None: symmetric, zero point ``zero_const``)."""
    from tvm import te

    n, k = (int(d) for d in codes.shape)

    def weight(i, j):
        z = zeros[i, j // group] if zeros is not None else te.const(zero_const, "float32")
        return (codes[i, j].astype("float32") - z) * scales[i, j // group]

    w = te.compute((n, k), weight, name="dequant")
    r = te.reduce_axis((0, k), name="k")
    acc = te.compute((x.shape[0], n), lambda i, j: te.sum(x[i, r].astype("float32") * w[j, r], axis=r), name="matmul")
    if out_dtype == "float32":
        return acc
    return te.compute(acc.shape, lambda i, j: acc[i, j].astype(out_dtype), name="cast")


@register_kernel(NAME, formats=("group_quant",), targets=("cuda",), priority=10, prepare=prepare_dequant)
def dequant_matmul(linear, target, hints, tuning):
    """Group-quantized dense weights that no CUDA kernel takes: codes kept as bytes, dequantized inside TVM's matmul."""
    gq = linear.weight
    if not isinstance(gq, GroupQuant) or gq.bits > 8:
        return None
    n, k = gq.shape
    g = gq.ngroups
    dt = hints.act_dtype
    params = [WeightParam("codes", (n, k), "uint8"), WeightParam("scales", (n, g), "float32")]
    if not gq.symmetric:
        params.append(WeightParam("zeros", (n, g), "float32"))
    group, zc = gq.group_size, float(1 << (gq.bits - 1))

    def emit(bb, x, ps):
        return bb.emit_te(lambda xx, c, s, *z: dequant_matmul_te(xx, c, s, z[0] if z else None, group, zc, dt),
                          x, *ps, primfunc_name_hint="dequant_matmul")  # fmt: skip

    note = (f"int{gq.bits} g{gq.group_size}: TVM dequantize + matmul (codes one byte each"
            + ("; group sparsity as scale-0 groups)" if gq.group_mask_packed is not None else ")"))
    return KernelImpl(NAME, params, emit=emit, act_dtype=dt, config={"schedule": "tvm-default", "bits": gq.bits,
                      "group_size": gq.group_size, "symmetric": gq.symmetric}, tuned=False, note=note)  # fmt: skip
