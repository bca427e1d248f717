"""CPU kernels (LLVM: x86, aarch64, wasm): dense, N:M sparse, group-quantized int4/int8, and N:M of group-quantized.

One kernel computes ``y[M, out] = x[M, in] @ W.T (+ bias)`` for one weight format. It is generated as TVMScript
source (kept in the build report's kernel dump) and holds several loop nests behind a runtime test on the
(symbolic) number of rows ``M``:

- **GEMV tiers** (decode, ``M <= 16``): one nest per tier ``MB`` in ``gemv_tiers`` (default 1, 4, 16). Output rows are
  processed ``V`` at a time (``block_o``): the weights are stored *interleaved* by blocks of ``V`` output rows
  (``[out/V, cols, V]``), so one SIMD load fetches the ``V`` weights of column ``k`` for ``V`` output rows; the
  weights are decoded in registers (int4 nibbles, int8, zero point, scale; N:M positions) once and used for the
  ``MB`` input rows held in ``MB x V`` accumulators. Dense and group-quantized layers multiply by a broadcast
  ``x[m, k]``; N:M layers either expand each group to dense weights in registers (``gemv_mode=select``) or gather
  ``x[m, col]`` by the decoded position (``col = group*m + index``, ``gemv_mode=gather``).
- **wasm swizzle GEMV** (``gemv_mode=swizzle``, the default on wasm simd128 for N:4 formats with 4 | out): no gather
  and no select. The 4 output rows of a block are the 4 f32 lanes; for each group of 4 inputs ``x[4g..4g+3]`` is ONE
  v128 load, and each kept column picks, per lane, the input its row kept with ``i8x16.swizzle`` (byte-level table
  lookup inside the 16 bytes of x). The swizzle masks are built in registers from the stored positions: one 16-byte
  load holds 4 kept columns x 4 rows (one byte = 4 * position), a lane-spread swizzle (masks in the 64-byte ``spread``
  parameter) and an ``or`` with the byte offsets 0,1,2,3 make the mask. int4/int8 kept values are int32 words of 8/4
  codes per lane, dequantized in registers with their group's scale and zero point. ``n`` multiply-adds per group
  instead of ``m``; the masks and weights are decoded once per block and reused by the tier's ``MB`` rows. The GEMM
  path reads the same layout with scalar decoding. For 2:4 (``gemv_impl=c``) the GEMV is C instead:
  ``backends/capi/wasm_swizzle.c``, the same loop with CONSTANT spread masks (clang keeps ``i8x16.swizzle``; TVM's
  LLVM turns a constant one into a slow ``i8x16.shuffle``), called through ``T.call_extern`` and linked into
  model.wasm by cross.link_wasm (int4/int8: from ``QUANT_C_GEMV_FROM_M`` rows on).
- **panel GEMM** (prefill, ``M`` above the last tier, ``gemm=panel``: the x86 default): for each pair of output-row
  blocks (``gemm_nb``) and each K block (at most ``gemm_kb`` input columns), the weights are decoded ONCE into a
  dense fp32 panel ``P[nb, KB, V]`` (int4/int8 dequantized, N:M groups expanded by position selects, groups wider
  than 8 scattered into a zeroed panel); a register-blocked micro-kernel then runs every ``gemm_mr``-row tile of
  ``x`` over the panel: ``gemm_mr x nb x V`` accumulators, one panel vector load per block and one broadcast
  ``x[m, k]`` per row and input column. The dequantization is amortized over all M rows (int4 at M=128 on the LLM
  shapes: 2.2-2.4x faster than the tile GEMM below, 0.99-1.14x of the dense panel GEMM, which is itself 1.6-2x
  faster than the dense tile GEMM: bench/results/bench_x86.md; 2:4 does the dense FLOPs). K blocks run outermost
  (the ``x`` block stays in cache across output blocks) and accumulate into ``y``; output blocks run in parallel.
- **tile GEMM** (``gemm=tile``, aarch64/wasm): rows of ``x`` are taken ``tile_m`` at a time and transposed into a
  per-thread ``[in, tile_m]`` buffer; for ``rows`` output rows at a time, each stored weight is decoded once as a
  scalar and multiplies a contiguous ``tile_m`` vector of ``x`` (the N:M position selects the row of the transposed
  tile: a sparse row times a dense tile, the multiply-adds of pruned weights are skipped). Tiles run in parallel.

Formats and parameters (``V`` = ``block_o``; all interleaved by output-row block):

=====================  ================================================================================
``dense``              ``W[out/V, in, V]`` float32
``group_quant``        ``C[out/V, in/2, V]`` uint8 (int4: column ``2i`` in the low nibble, ``2i+1`` high) or
                       ``C[out/V, in, V]`` (int8); ``S``, ``Z[out/V, in/g, V]`` float32 scale and zero point
                       (symmetric: ``2**(bits-1)``); removed groups (GQSA group mask) have scale 0
``nm_sparse[dense]``   ``Wv[out/V, in*n/m, V]`` kept values; ``I[out/V, in*n/m / per, V]`` uint8 positions,
                       ``per`` per byte (2-bit for M <= 4, 4-bit for M <= 16, 8-bit above)
``nm_sparse[gq]``      codes/scales/zeros of the kept values (groups along the kept columns) + ``I`` as above
swizzle layout         (``gemv_mode=swizzle``, V = 4) ``I[out/4, J*4]`` uint8, byte ``4j + lane`` = 4 * position;
                       ``spread[64]`` uint8; int4/int8 codes ``C[out/4, J/8 | J/4, 4]`` int32 words (code of kept
                       column ``8q+k`` in bits ``4k..4k+3``; int8: ``4q+k`` in bits ``8k..8k+7``)
bias                   ``B[out]`` float32 (fused into the store)
=====================  ================================================================================

Decoding is exactly the reference semantics of :mod:`sparsec.compressor.formats`: ``(float(code) - z) * s``.

Schedule configuration (``config``; the tuner searches it, see :func:`search_space`): ``block_o`` (V), ``tile_m``,
``rows``, ``unroll``, ``gemv_tiers``, ``parallel`` (GEMM tiles in parallel), ``parallel_gemv``, ``gemm``
(``panel`` | ``tile``) with ``gemm_mr`` / ``gemm_nb`` (0: automatic) / ``gemm_kb`` for the panel GEMM, and for N:M formats
``gemv_mode``: ``select`` (default for M <= 8: each group of ``m`` input columns is decoded to ``m`` dense weights in
registers by comparing the stored positions, then multiplied by broadcast ``x`` values: no gathers, ``m`` multiply-adds
per group, ``n/m`` of the weight bytes) or ``gather`` (``n`` multiply-adds per group on gathered ``x`` values; fewer
FLOPs but the gathers cost more than they save on x86 at these sizes: 3x slower in our measurements). Everything is
target-parametric: vector widths come from :func:`sparsec.backends.kernels.registry.vector_lanes`, so aarch64
(NEON) and wasm (simd128) use the same generators with 4-lane defaults.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from .registry import KernelImpl, ShapeHints, WeightParam, format_key, linear_key, register_kernel, vector_lanes

CPU_TARGETS = ("llvm", "wasm")
GEMV_MAX = 16


# ----------------------------------------------------------------------------------------------------------------
# what a kernel computes
@dataclass(frozen=True)
class Spec:
    kind: str  # "dense" | "gq" | "nm" | "nm_gq"
    O: int
    K: int
    J: int  # stored columns: K for dense/gq, K*n/m for nm
    n: int = 0
    m: int = 0
    bits: int = 0
    G: int = 0  # quantization group size along the stored columns
    bias: bool = False

    @property
    def ib(self) -> int:  # bits per stored N:M position
        return 2 if self.m <= 4 else 4 if self.m <= 16 else 8

    @property
    def per(self) -> int:  # positions per byte
        return 8 // self.ib

    @property
    def swizzle_unit(self) -> int:
        """Unroll granularity of the wasm swizzle layout (16-byte position loads, 8 int4 / 4 int8 codes per word)."""
        return _lcm(_lcm(4, self.n or 1), 8 if self.bits == 4 else 4)

    def swizzle_ok(self) -> bool:
        """Whether the wasm ``swizzle`` GEMV applies: N:4 sparsity (a group of 4 inputs is one v128 of x)."""
        return self.kind in ("nm", "nm_gq") and self.m == 4 and self.O % 4 == 0 and self.J % self.swizzle_unit == 0

    @property
    def unit(self) -> int:
        """The unroll granularity: column indices decode with constant shifts inside one unit."""
        u = 1
        if self.kind in ("nm", "nm_gq"):
            u = _lcm(self.n, self.per)
        if self.bits == 4:
            u = _lcm(u, 2)
        return u


def _lcm(a: int, b: int) -> int:
    return a * b // math.gcd(a, b)


def spec_of(linear) -> Spec | None:
    """The kernel spec of a Linear, or None when no CPU kernel applies (the registry then falls back)."""
    w = linear.weight
    fk = format_key(w)
    O, K = w.shape
    bias = linear.bias is not None
    if fk == "dense":
        return Spec("dense", O, K, K, bias=bias)
    if fk == "group_quant":
        if w.bits not in (4, 8) or (w.bits == 4 and K % 2):
            return None
        return Spec("gq", O, K, K, bits=w.bits, G=w.group_size, bias=bias)
    if fk in ("nm_sparse[dense]", "nm_sparse[group_quant]"):
        J = K // w.m * w.n
        if fk == "nm_sparse[dense]":
            s = Spec("nm", O, K, J, n=w.n, m=w.m, bias=bias)
        else:
            v = w.values
            if v.bits not in (4, 8) or (v.bits == 4 and J % 2):
                return None
            s = Spec("nm_gq", O, K, J, n=w.n, m=w.m, bits=v.bits, G=v.group_size, bias=bias)
        if J % s.unit:
            return None
        return s
    return None


def _cpu_shapes(linear) -> str | None:
    """The shape requirement of the CPU kernels this layer misses (the build note of a layer materialized dense; it
    said "no kernel for nm_sparse on this target" for a 2:4 layer of 172 inputs)."""
    import math

    w = linear.weight
    fk = format_key(w)
    K = w.shape[1]
    if fk == "group_quant":
        return "an even in_features for int4" if w.bits == 4 and K % 2 else None
    if fk in ("nm_sparse[dense]", "nm_sparse[group_quant]"):
        bits = w.values.bits if fk == "nm_sparse[group_quant]" else 0
        probe = Spec("nm", 1, w.m, w.n, n=w.n, m=w.m)  # the unit depends on N, M and the code width only
        unit = _lcm(probe.unit, 2) if bits == 4 else probe.unit
        step = w.m * unit // math.gcd(unit, w.n)  # in_features / M * N kept values a row, a multiple of the unit
        return f"in_features a multiple of {step} for {w.n}:{w.m}" if K % step else None
    return None


# ----------------------------------------------------------------------------------------------------------------
# weight preparation (pure numpy: runs at build time and at load time)
def _interleave(a: np.ndarray, V: int) -> np.ndarray:
    """``[O, C] -> [O/V, C, V]``."""
    O, C = a.shape
    return np.ascontiguousarray(a.reshape(O // V, V, C).transpose(0, 2, 1))


def _pack_int4_pairs(codes: np.ndarray) -> np.ndarray:
    """``[O, C]`` uint8 codes (< 16) -> ``[O, C/2]``: column 2i in the low nibble, 2i+1 in the high nibble."""
    c = codes.astype(np.uint8)
    return (c[:, 0::2] | (c[:, 1::2] << 4)).astype(np.uint8)


def _quant_arrays(gq, V: int) -> list[np.ndarray]:
    codes = gq.codes()
    if gq.bits == 4:
        C = _pack_int4_pairs(codes)
    else:
        C = codes.astype(np.uint8)
    S = gq.scale_grid().astype(np.float32)
    Z = gq.zero_grid().astype(np.float32)
    return [_interleave(C, V), _interleave(S, V), _interleave(Z, V)]


def _index_array(nm, spec: Spec, V: int) -> np.ndarray:
    O = spec.O
    idx = nm.indices().reshape(O, spec.J).astype(np.uint8)  # position inside the group, 0..m-1
    per, ib = spec.per, spec.ib
    if per == 1:
        packed = idx
    else:
        packed = np.zeros((O, spec.J // per), dtype=np.uint8)
        for t in range(per):
            packed |= (idx[:, t::per] << (ib * t)).astype(np.uint8)
    return _interleave(packed, V)


# The 4 lane-spread masks of the swizzle GEMV: mask jj (bytes 16*jj..16*jj+15) copies byte 4*jj + r of a 16-byte
# position chunk into the 4 bytes of lane r. A kernel parameter, not a constant: LLVM folds an i8x16.swizzle with
# constant indices into an i8x16.shuffle, which V8 lowers to a slow generic sequence (measured in
# bench/results/wasm_gemv_variants.md: spread_shuf vs spread_mem).
SPREAD_MASKS = np.repeat(np.arange(16, dtype=np.uint8), 4)


def _swizzle_positions(nm, spec: Spec) -> np.ndarray:
    """wasm swizzle layout of N:4 positions: ``[O/4, J*4]`` uint8, byte ``4*j + lane`` = 4 * position (the byte offset
    of the kept column's input inside its group of 4 floats): 16 bytes hold 4 kept columns of 4 output rows."""
    idx = nm.indices().reshape(spec.O, spec.J).astype(np.uint8) * 4
    return np.ascontiguousarray(_interleave(idx, 4).reshape(spec.O // 4, spec.J * 4))


def _word_codes(gq, O: int, cols: int, V: int) -> list[np.ndarray]:
    """Quantized values as int32 words: ``[O/V, cols/per, V]``, lane = output row, code of column ``per*q + k`` in
    bits ``[b*k, b*k+b)`` (per = 8 int4 / 4 int8 codes a word); scales/zeros as interleaved. The wasm swizzle GEMV's
    layout (V = 4), and the x86 one of int4 ("codes": "word"): a lane's codes are taken out of a 32-bit lane by a shift
    and a mask, where the byte layout needs byte masks and a widening per column."""
    codes = gq.codes().astype(np.uint32).reshape(O, cols)
    per, b = (8, 4) if gq.bits == 4 else (4, 8)
    words = np.zeros((O, cols // per), dtype=np.uint32)
    for k in range(per):
        words |= codes[:, k::per] << np.uint32(b * k)
    S = gq.scale_grid().astype(np.float32)
    Z = gq.zero_grid().astype(np.float32)
    return [_interleave(words.view(np.int32), V), _interleave(S, V), _interleave(Z, V)]


def _code_words(spec: Spec, cfg: dict[str, Any]) -> bool:
    """Whether a config stores its codes as int32 words (_word_codes): the wasm swizzle GEMV, and "codes": "word"."""
    return spec.kind in ("gq", "nm_gq") and (cfg.get("gemv_mode") == "swizzle" or cfg.get("codes") == "word")


def prepare_cpu(linear, config: dict[str, Any]) -> list[np.ndarray]:
    spec = spec_of(linear)
    if spec is None:
        raise ValueError(f"{linear.name}: no CPU kernel for {format_key(linear.weight)}")
    V = int(config["block_o"])
    w = linear.weight
    swz = config.get("gemv_mode") == "swizzle"
    words = _code_words(spec, config)
    if spec.kind == "dense":
        arrays = [_interleave(w.materialize().astype(np.float32), V)]
    elif spec.kind == "gq":
        arrays = _word_codes(w, spec.O, spec.K, V) if words else _quant_arrays(w, V)
    elif spec.kind == "nm":
        arrays = [_interleave(w.values.materialize().astype(np.float32), V)]
        arrays.append(_swizzle_positions(w, spec) if swz else _index_array(w, spec, V))
    else:
        arrays = _word_codes(w.values, spec.O, spec.J, V) if words else _quant_arrays(w.values, V)
        arrays.append(_swizzle_positions(w, spec) if swz else _index_array(w, spec, V))
    if swz:
        arrays.append(SPREAD_MASKS.copy())
    if spec.bias:
        arrays.append(np.ascontiguousarray(linear.bias.astype(np.float32)))
    return arrays


def param_specs(spec: Spec, V: int, swizzle: bool = False, words: bool = False) -> list[WeightParam]:
    OB = spec.O // V
    out: list[WeightParam] = []

    def quant(cols):
        if swizzle or words:
            per = 8 if spec.bits == 4 else 4
            c = WeightParam("codes", (OB, cols // per, V), "int32")
        else:
            c = WeightParam("codes", (OB, cols // 2 if spec.bits == 4 else cols, V), "uint8")
        return [c, WeightParam("scales", (OB, cols // spec.G, V), "float32"),
                WeightParam("zeros", (OB, cols // spec.G, V), "float32")]  # fmt: skip

    if spec.kind == "dense":
        out.append(WeightParam("weight", (OB, spec.K, V), "float32"))
    elif spec.kind == "gq":
        out += quant(spec.K)
    elif spec.kind == "nm":
        out.append(WeightParam("values", (OB, spec.J, V), "float32"))
    else:
        out += quant(spec.J)
    if spec.kind in ("nm", "nm_gq"):
        if swizzle:
            out.append(WeightParam("index", (OB, spec.J * V), "uint8"))
            out.append(WeightParam("spread", (64,), "uint8"))
        else:
            out.append(WeightParam("index", (OB, spec.J // spec.per, V), "uint8"))
    if spec.bias:
        out.append(WeightParam("bias", (spec.O,), "float32"))
    return out


# ----------------------------------------------------------------------------------------------------------------
# configuration
def refine_space(linear, target, config: dict[str, Any]) -> tuple[list[dict[str, Any]], int] | None:
    """The tuner's second stage on x86: the prefill GEMM's blocking around the first stage's winner ``config`` (whose
    weight layout and GEMV tiers stay): for N:4 the permute GEMM and the dense panel, each with rows of x
    (gemm_mr), output-row blocks (gemm_nb) and input columns a K block (gemm_kb); scored at M above the last GEMV tier.
    None where the GEMM is not the panel family (aarch64 / wasm: the tile GEMM)."""
    spec = spec_of(linear)
    if spec is None or not _x86(target) or config.get("gemm") not in ("panel", "permute"):
        return None
    V = int(config["block_o"])
    gemms = ["permute", "panel"] if _permute_ok(spec, V, target) else ["panel"]
    out = []
    for gemm in gemms:
        for mr in (2, 4, 6, 8, 12):
            for nb in (1, 2, 4):
                for kb in (256, 512, 1024):
                    c = dict(config, gemm=gemm, gemm_mr=mr, gemm_nb=nb, gemm_kb=kb)
                    if c != config and _panel_nb(spec, c) == nb and c not in out and check_config(spec, c, target) is None:
                        out.append(c)
    return out, int(config["gemv_tiers"][-1]) + 1


def _divisor_at_most(n: int, cap: int) -> int:
    for v in range(min(cap, n), 0, -1):
        if n % v == 0 and (v & (v - 1)) == 0:
            return v
    return 1


def default_config(spec: Spec, target) -> dict[str, Any]:
    lanes = vector_lanes(target, "float32")
    V = _divisor_at_most(spec.O, lanes)
    unit = spec.unit
    unroll = unit * max(1, 4 // unit) if spec.J % (unit * max(1, 4 // unit)) == 0 else unit
    # int4 on x86: codes as int32 words, 8 columns (one word a lane) an iteration: a code is a shift and a mask of its
    # 32-bit lane (the byte layout took byte masks, shifts and a widening per column). With the GEMV's group loop,
    # int4 g128 at M = 1, one thread, AVX2: 2.0 -> 1.0 ms (4096 x 4096), 5.7 -> 3.1 (11008 x 4096); the panel GEMM
    # (M = 128) unchanged (python bench/cpu_gemv.py: bench/results/cpu_gemv.md)
    permute = _x86(target) and _permute_ok(spec, V, target)
    words = _x86(target) and spec.bits == 4 and spec.J % 8 == 0 and 8 % unit == 0 and (spec.kind == "gq" or permute)
    if words:
        unroll = 8
    return {
        **({"codes": "word"} if words else {}),
        "block_o": V,
        "tile_m": 2 * lanes,
        "rows": min(V, 8 if lanes >= 16 else 4),
        "unroll": unroll,
        "gemv_tiers": [1, 4, GEMV_MAX],
        "parallel": True,
        "parallel_gemv": spec.O * spec.J >= 1 << 18,
        # N:4 on x86 (AVX2 / AVX-512): the permute GEMV (gemv_permute in kernel_source). 4096 x 4096 2:4, one thread,
        # AVX2: 3.0 -> 2.1 ms at M = 1, 11.5 -> 6.3 at M = 16 (select); 2:4 + int4 3.5 -> 1.6 at M = 1
        # (python bench/cpu_gemv.py: bench/results/cpu_gemv.md)
        "gemv_mode": "permute" if permute
        else "select" if spec.kind in ("nm", "nm_gq") and spec.m <= 8 else "gather",
        # prefill GEMM (M above the last tier): decoded panels + register micro-kernel on x86 (gemm_panel in
        # kernel_source), for N:4 the compressed panel + permute micro-kernel (gemm_permute); the transposed-tile GEMM
        # elsewhere (not re-measured on aarch64 / wasm)
        "gemm": "permute" if permute else "panel" if _x86(target) else "tile",
        **_panel_blocking(permute, lanes),
        "gemm_kb": 512,
    } if not (_wasm_simd(target) and spec.swizzle_ok()) else {
        # wasm simd128, N:4: the swizzle GEMV (gemv_swizzle in kernel_source), output rows in the 4 f32 lanes
        "block_o": 4,
        "tile_m": 2 * lanes,
        # the GEMM's (the swizzle GEMV unrolls by its own unit, see _gemv_unroll): whole code words per iteration
        # (static shifts), 2 rows at a time for int4 (tiny-gpt 2:4+int4 prefill: 7.6 ms vs 8.7 ms at unroll 4 x
        # 4 rows, 11.2 ms at 8 x 4; the generic layout's GEMM: 7.7 ms; one node process, this machine)
        "rows": 2 if spec.bits == 4 else 4,
        "unroll": _lcm(unroll, 8) if spec.bits == 4 else _lcm(unroll, 4) if spec.bits == 8 else unroll,
        "gemv_tiers": [1, 4, GEMV_MAX],
        "parallel": True,
        "parallel_gemv": False,
        "gemv_mode": "swizzle",
        # 2:4: the GEMV is the C kernel of backends/capi/wasm_swizzle.c (constant swizzle masks, see _c_gemv)
        "gemv_impl": "c" if _c_gemv(spec) else "tir",
    }


def _panel_blocking(permute: bool, lanes: int) -> dict[str, int]:
    """The x86 prefill micro-kernel's default rows of x (gemm_mr) and output-row blocks (gemm_nb, 0: automatic). The
    permute GEMM (2 in-lane permutes + 2 multiply-adds a group and row) is fastest with fewer rows: 4 x 2 blocks of
    zmm, 6 x 1 of ymm (bench/cpu_prefill.py)."""
    if permute:
        return {"gemm_mr": 4, "gemm_nb": 0} if lanes >= 16 else {"gemm_mr": 6, "gemm_nb": 1}
    return {"gemm_mr": 8 if lanes >= 16 else 4, "gemm_nb": 0}  # gemm_nb 0: 2 blocks when 2 * block_o <= 32, else 1


def _gemv_unroll(spec: Spec) -> int:
    """Kept columns per iteration of the swizzle GEMV: 8 (or 12 for 3:4) when they divide the kept columns."""
    u = spec.swizzle_unit * max(1, 8 // spec.swizzle_unit)
    return u if spec.J % u == 0 else spec.swizzle_unit


# int4/int8 2:4 on wasm simd128: 2 = the TIR 1-row GEMV at M = 1 and the C GEMV for M = 2..16; 1 = the C GEMV at
# every M <= 16 (bench/bench_wasm_c_gemv.py times both; only 1 and 2 are meaningful)
QUANT_C_GEMV_FROM_M = 2


def _c_gemv(spec: Spec) -> str | None:
    """The C GEMV (backends/capi/wasm_swizzle.c, linked into simd128 model.wasm) for ``spec``'s swizzle layout: 2:4
    with fp32 kept values, or int4/int8 ones whose quantization groups hold whole chunks of 4 kept columns."""
    if not spec.swizzle_ok() or spec.n != 2:
        return None
    if spec.kind == "nm":
        return "sparsec_swz24_f32"
    return f"sparsec_swz24_int{spec.bits}" if spec.bits in (4, 8) and spec.G % 4 == 0 else None


def _panel_cols(spec: Spec, cfg: dict[str, Any]) -> int:
    """Stored columns per K block of the panel GEMM: the largest multiple of ``unroll`` dividing the stored columns
    whose input columns fit ``gemm_kb`` (the whole row when no block of at least 64 input columns divides it)."""
    U, J = int(cfg["unroll"]), spec.J
    cap = int(cfg.get("gemm_kb", 512))
    if spec.kind in ("nm", "nm_gq"):
        cap = cap * spec.n // spec.m
    best = max((jb for jb in range(U, min(cap, J) + 1, U) if J % jb == 0), default=J)
    lo = 64 * spec.n // spec.m if spec.kind in ("nm", "nm_gq") else 64
    return best if best >= lo else J


def _panel_nb(spec: Spec, cfg: dict[str, Any]) -> int:
    """Output-row blocks per panel of the panel GEMM: ``gemm_nb`` (0: 2 when ``2 * block_o <= 32`` floats, else 1)
    if it divides the number of blocks, else 1."""
    V = int(cfg["block_o"])
    nb = int(cfg.get("gemm_nb", 0)) or (2 if 2 * V <= 32 else 1)
    return nb if (spec.O // V) % nb == 0 else 1


def _panel_if_no_permute(spec: Spec, cfg: dict[str, Any], target) -> dict[str, Any]:
    """``cfg`` with the permute GEMM replaced by the dense panel (and its blocking) where its block width cannot run it
    (a search-space width, an old tuning entry's)."""
    if cfg.get("gemm") == "permute" and not _permute_ok(spec, int(cfg["block_o"]), target):
        return dict(cfg, gemm="panel", **_panel_blocking(False, vector_lanes(target, "float32")))
    return cfg


def _permute_ok(spec: Spec, V: int, target=None) -> bool:
    """Whether the x86 ``permute`` GEMV applies: N:4 sparsity (a group of 4 inputs is one 128-bit lane of x), 4, 8 or
    16 float lanes (vpermilps xmm / ymm / zmm), an x86 target (when given) with at least V float lanes (the zmm
    intrinsic on an AVX2 target aborts LLVM's instruction selection)."""
    return (spec.kind in ("nm", "nm_gq") and spec.m == 4 and V in (4, 8, 16) and spec.K % 4 == 0
            and (target is None or (_x86(target) and V <= vector_lanes(target, "float32"))))


def _x86(target) -> bool:
    return target is not None and target.name.partition(":")[0] == "x86"


def _wasm_simd(target) -> bool:
    return target is not None and target.name.partition(":")[0] == "wasm" and "simd128" in tuple(target.features)


def check_config(spec: Spec, cfg: dict[str, Any], target=None) -> str | None:
    """Why ``cfg`` is invalid for ``spec`` (on ``target`` when given; None when valid)."""
    V, U, R, MT = int(cfg["block_o"]), int(cfg["unroll"]), int(cfg["rows"]), int(cfg["tile_m"])
    if cfg.get("gemv_mode") == "swizzle":
        if not spec.swizzle_ok():
            return "gemv_mode 'swizzle' needs N:4 sparsity with 4 | out and the kept columns a multiple of " \
                   f"{spec.swizzle_unit if spec.m == 4 else 4}"
        if target is not None and not _wasm_simd(target):
            return "gemv_mode 'swizzle' needs a wasm simd128 target (i8x16.swizzle)"
        if V != 4:
            return "gemv_mode 'swizzle' needs block_o 4"
    if cfg.get("gemv_xt", True) not in (True, False, 0, 1):
        return "gemv_xt must be a boolean"
    if cfg.get("gemv_hoist", 0) not in (0, 1, 2):
        return "gemv_hoist must be 0 (off), 1 (scale and zero point per group) or 2 (code sums per group)"
    if cfg.get("codes", "byte") not in ("byte", "word"):
        return f"codes {cfg.get('codes')!r} is not one of byte, word"
    if cfg.get("codes") == "word" and (spec.kind not in ("gq", "nm_gq") or spec.J % (8 if spec.bits == 4 else 4)):
        return "codes 'word' needs a quantized format with whole words of codes (8 int4 / 4 int8) a row"
    if cfg.get("gemv_impl", "tir") not in ("tir", "c"):
        return f"gemv_impl {cfg.get('gemv_impl')!r} is not one of tir, c"
    if cfg.get("gemv_impl") == "c" and (cfg.get("gemv_mode") != "swizzle" or _c_gemv(spec) is None):
        return "gemv_impl 'c' needs gemv_mode 'swizzle' and 2:4 sparsity (int4/int8: group size a multiple of 4)"
    if V < 1 or spec.O % V:
        return f"block_o {V} does not divide out={spec.O}"
    if U < 1 or U % spec.unit or spec.J % U:
        return f"unroll {U} must be a multiple of {spec.unit} dividing {spec.J}"
    if R < 1 or V % R:
        return f"rows {R} must divide block_o {V}"
    if MT < 1:
        return "tile_m must be positive"
    if cfg.get("gemm", "tile") not in ("tile", "panel", "permute"):
        return f"gemm {cfg.get('gemm')!r} is not one of tile, panel, permute"
    if cfg.get("gemm") == "permute" and not _permute_ok(spec, V, target):
        return "gemm 'permute' needs N:4 sparsity, block_o 4, 8 or 16 (at most the target's float lanes) and an x86 target"
    if not 1 <= int(cfg.get("gemm_mr", 8)) <= 32 or int(cfg.get("gemm_nb", 0)) < 0 or int(cfg.get("gemm_kb", 512)) < 1:
        return "gemm_mr must be in 1..32, gemm_nb >= 0 (0: automatic), gemm_kb >= 1"
    tiers = list(cfg["gemv_tiers"])
    if not tiers or tiers != sorted(set(tiers)) or tiers[0] < 1 or tiers[-1] > 64:
        return "gemv_tiers must be increasing in 1..64"
    if spec.kind in ("gq", "nm_gq") and spec.J % spec.G:
        return "group size does not divide the columns"
    mode = cfg.get("gemv_mode", "gather")
    if mode not in ("gather", "select", "swizzle", "permute") or (mode == "select" and spec.m > 16):
        return f"gemv_mode {mode!r} is not one of gather, select, swizzle, permute (select needs M <= 16)"
    if mode == "permute" and not _permute_ok(spec, V, target):
        return "gemv_mode 'permute' needs N:4 sparsity, block_o 4, 8 or 16 (at most the target's float lanes) and an x86 target"
    return None


def search_space(linear, target, hints) -> list[dict[str, Any]]:
    """Candidate schedules for the tuner: block widths, tiles, rows, unroll, parallel GEMV."""
    spec = spec_of(linear)
    if spec is None:
        return []
    base = default_config(spec, target)
    lanes = vector_lanes(target, "float32")
    out = []
    for V in sorted({lanes, lanes // 2, 2 * lanes} - {0}):
        for MT in (lanes, 2 * lanes, 4 * lanes):
            for R in (4, 8):
                for U in sorted({spec.unit, 2 * spec.unit, 4 * spec.unit, 8 * spec.unit}):
                    for pg in (False, True):
                        modes = ("select", "gather") if spec.kind in ("nm", "nm_gq") else (base["gemv_mode"],)
                        if _x86(target) and _permute_ok(spec, V, target):
                            modes = ("permute",) + modes
                        if _wasm_simd(target) and spec.swizzle_ok():
                            modes = ("swizzle",) + modes
                        for mode in modes:
                            c = _panel_if_no_permute(spec, dict(base, block_o=V, tile_m=MT, rows=min(R, V), unroll=U,
                                                                parallel_gemv=pg, gemv_mode=mode), target)  # fmt: skip
                            if mode != "swizzle":
                                c.pop("gemv_impl", None)  # the C GEMV reads the swizzle layout only
                            if check_config(spec, c, target) is None and c not in out:
                                out.append(c)
    return out


# ----------------------------------------------------------------------------------------------------------------
# TVMScript generation
class _Src:
    def __init__(self):
        self.lines: list[str] = []
        self.ind = 0

    def __call__(self, line: str):
        self.lines.append("    " * self.ind + line)

    def block(self):
        src = self

        class _B:
            def __enter__(self):
                src.ind += 1

            def __exit__(self, *a):
                src.ind -= 1

        return _B()

    def scope(self, line: str):
        """``line`` (a ``for``/``if`` header) and the indented block under it: ``with s.scope("for i in ...:"):``."""
        self(line)
        return self.block()


def _weight_expr(spec: Spec, U: int, ob: str, ko: str, ku: int, lane: str, swz: bool = False,
                 hoisted: str = "") -> str:
    """The decoded float32 weight at stored column ``ko*U+ku`` of interleaved lane ``lane``. ``hoisted`` (the GEMV's
    group loop, quantized formats): ``"fma"`` the group's scale and ``-zero * scale`` are in the local vectors ``sv`` /
    ``zv`` (one multiply-add a weight instead of a subtract, a multiply and two loads); ``"code"`` the code alone (the
    GEMV applies the scale and zero point once a group)."""
    j = f"{ko} * {U} + {ku}"
    if spec.kind in ("dense", "nm"):
        buf = "W" if spec.kind == "dense" else "Wv"
        return f"{buf}[{ob}, {j}, {lane}]"
    g = f"({j}) // {spec.G}"
    if swz:  # int32 words of 8 int4 / 4 int8 codes (see _word_codes)
        per, b = (8, 4) if spec.bits == 4 else (4, 8)
        if U % per == 0:
            code = f"T.Cast(\"float32\", T.shift_right(C[{ob}, {ko} * {U // per} + {ku // per}, {lane}], {b * (ku % per)}) & {(1 << b) - 1})"
        else:
            code = f"T.Cast(\"float32\", T.shift_right(C[{ob}, ({j}) // {per}, {lane}], ({j}) % {per} * {b}) & {(1 << b) - 1})"
    elif spec.bits == 4:
        code = f"T.Cast(\"float32\", T.shift_right(C[{ob}, {ko} * {U // 2} + {ku // 2}, {lane}], T.uint8({4 * (ku % 2)})) & T.uint8(15))"
    else:
        code = f"T.Cast(\"float32\", C[{ob}, {j}, {lane}])"
    if hoisted == "code":
        return code
    if hoisted == "fma":
        return f"{code} * sv[{lane}] + zv[{lane}]"
    return f"({code} - Z[{ob}, {g}, {lane}]) * S[{ob}, {g}, {lane}]"


def _col_expr(spec: Spec, U: int, ob: str, ko: str, ku: int, lane: str, swz: bool = False) -> str:
    """The input column of stored column ``ko*U+ku`` (dense formats: the column itself)."""
    if spec.kind in ("dense", "gq"):
        return f"{ko} * {U} + {ku}"
    grp = f"({ko} * {U // spec.n} + {ku // spec.n}) * {spec.m}"
    return f"{grp} + {_pos_expr(spec, U, ob, ko, ku, lane, swz)}"


def _pos_expr(spec: Spec, U: int, ob: str, ko: str, ku: int, lane: str, swz: bool = False) -> str:
    """The position (0..m-1) inside its group of stored column ``ko*U+ku`` (N:M formats)."""
    if swz:  # one byte per (kept column, lane) holding 4 * position (see _swizzle_positions)
        return f"T.shift_right(T.Cast(\"int32\", I[{ob}, ({ko} * {U} + {ku}) * 4 + {lane}]), 2)"
    per, ib = spec.per, spec.ib
    byte = f"I[{ob}, {ko} * {U // per} + {ku // per}, {lane}]"
    if per == 1:
        return f"T.Cast(\"int32\", {byte})"
    return f"T.Cast(\"int32\", T.shift_right({byte}, T.uint8({ib * (ku % per)})) & T.uint8({(1 << ib) - 1}))"


def kernel_source(spec: Spec, cfg: dict[str, Any], name: str = "kernel") -> str:
    V, U, R, MT = int(cfg["block_o"]), int(cfg["unroll"]), int(cfg["rows"]), int(cfg["tile_m"])
    tiers = [int(t) for t in cfg["gemv_tiers"]]
    OB, J, K, O = spec.O // V, spec.J, spec.K, spec.O
    sparse = spec.kind in ("nm", "nm_gq")
    swz = cfg.get("gemv_mode") == "swizzle"
    words = _code_words(spec, cfg)
    params = param_specs(spec, V, swz, words)
    short = {"weight": "W", "values": "Wv", "codes": "C", "scales": "S", "zeros": "Z", "index": "I", "spread": "SP", "bias": "B"}
    sig = ", ".join(f"{short[p.name]}: T.Buffer({tuple(p.shape)}, \"{p.dtype}\")" for p in params)
    s = _Src()
    s("@T.prim_func(private=True)")
    with s.scope(f"def {name}(var_x: T.handle, {sig}, var_y: T.handle):"):
        s('T.func_attr({"tirx.noalias": True, "op_pattern": 8})')
        s("M = T.int64()")
        s(f'x = T.match_buffer(var_x, (M, {K}), "float32")')
        s(f'y = T.match_buffer(var_y, (M, {O}), "float32")')
        bias = (lambda o: f" + B[{o}]") if spec.bias else (lambda o: "")

        select = cfg.get("gemv_mode", "gather") == "select"

        def nm_select_decode(ob: str, ko: str, dst, hoisted: str = ""):
            """The U stored values of block ``ob``, unroll step ``ko`` (into wv) and their positions (into cv), then
            each group of n kept values expanded to its m dense weights by position selects, written to dst(gi, c)."""
            n_, m_ = spec.n, spec.m
            for ku in range(U):
                with s.scope(f"for l in T.vectorized({V}):"):
                    s(f"wv[{ku}, l] = {_weight_expr(spec, U, ob, ko, ku, 'l', words, hoisted=hoisted)}")
                    s(f"cv[{ku}, l] = {_pos_expr(spec, U, ob, ko, ku, 'l')}")
            for gi in range(U // n_):
                for c in range(m_):
                    terms = " + ".join(f"T.Select(cv[{gi * n_ + t}, l] == {c}, wv[{gi * n_ + t}, l], T.float32(0))" for t in range(n_))
                    with s.scope(f"for l in T.vectorized({V}):"):
                        s(f"{dst(gi, c)} = {terms}")

        def gemv_swizzle(MB: int):
            U = _gemv_unroll(spec)
            # wasm simd128 N:4 GEMV, no gather: the 4 output rows of a block are the 4 f32 lanes; per group of 4
            # inputs, x[4g..4g+3] is ONE v128 load, and each kept column picks its input per lane with
            # i8x16.swizzle; the swizzle masks come from 16-byte position loads (4 kept columns x 4 rows, one byte
            # = 4 * position each) spread per lane by a swizzle with the `spread` masks (a parameter, see
            # SPREAD_MASKS) and or-ed with the byte offsets 0,1,2,3.
            # n multiply-adds per group (not m), weights decoded once per block and reused by the MB rows.
            n_ = spec.n
            NA = 4 if MB == 1 else 2 if MB <= 4 else 1  # independent accumulators (add latency)
            R4 = "T.Ramp(0, 1, 4)"
            loop = "T.parallel" if cfg.get("parallel_gemv") else "range"
            swzl = lambda a, b: f'T.call_llvm_pure_intrin("int8x16", "llvm.wasm.swizzle", {a}, {b})'  # noqa: E731
            for jj in range(4):
                s(f'sp{jj}: T.let = T.reinterpret("int8x16", SP[T.Ramp({16 * jj}, 1, 16)])')
            with s.scope(f"for ob in {loop}({OB}):"):
                s(f'acc = T.alloc_buffer(({MB}, {NA}, 4), "float32", scope="local")')
                with s.scope(f"for mi in T.unroll({MB}):"):
                    with s.scope(f"for a in T.unroll({NA}):"):
                        s(f"acc[mi, a, {R4}] = T.Broadcast(T.float32(0), 4)")
                with s.scope(f"for ko in range({J // U}):"):
                    for c4 in range(U // 4):
                        s(f'pk{c4}: T.let = T.reinterpret("int8x16", I[ob, T.Ramp((ko * {U} + {4 * c4}) * 4, 1, 16)])')
                    for ku in range(U):
                        jj = ku % 4
                        s(f'mk{ku}: T.let = T.reinterpret("int8x16", T.reinterpret("int32x4", {swzl(f"pk{ku // 4}", f"sp{jj}")}) | T.Broadcast(T.int32({0x03020100}), 4))')
                        j = f"ko * {U} + {ku}"
                        if spec.kind == "nm":
                            s(f"w{ku}: T.let = Wv[ob, {j}, {R4}]")
                        else:
                            per, b = (8, 4) if spec.bits == 4 else (4, 8)
                            word = f"C[ob, ko * {U // per} + {ku // per}, {R4}]"
                            if ku % per:
                                word = f"T.shift_right({word}, T.Broadcast(T.int32({b * (ku % per)}), 4))"
                            word = f"({word} & T.Broadcast(T.int32({(1 << b) - 1}), 4))"  # shifts are arithmetic
                            g = f"({j}) // {spec.G}"
                            s(f'w{ku}: T.let = (T.Cast("float32x4", {word}) - Z[ob, {g}, {R4}]) * S[ob, {g}, {R4}]')
                    with s.scope(f"for mi in T.unroll({MB}):"):
                        row = "T.min(T.Cast(\"int64\", mi), M - T.int64(1))"
                        for gi in range(U // n_):
                            s(f'xg{gi}: T.let = T.reinterpret("int8x16", x[{row}, T.Ramp((ko * {U // n_} + {gi}) * 4, 1, 4)])')
                        for ku in range(U):
                            a = ku % NA
                            s(f'acc[mi, {a}, {R4}] = acc[mi, {a}, {R4}] + w{ku} * T.reinterpret("float32x4", {swzl(f"xg{ku // n_}", f"mk{ku}")})')
                with s.scope(f"for mi in T.unroll({MB}):"):
                    with s.scope("if T.Cast(\"int64\", mi) < M:"):
                        tot = " + ".join(f"acc[mi, {a}, {R4}]" for a in range(NA))
                        b_ = f" + B[T.Ramp(ob * 4, 1, 4)]" if spec.bias else ""
                        s(f"y[mi, T.Ramp(ob * 4, 1, 4)] = {tot}{b_}")

        def acc_zero(MB: int, NA: int):
            """The GEMV block's accumulators acc[MB, NA, V] set to 0 (inside the loop over output blocks ob)."""
            with s.scope(f"for mi in T.unroll({MB}):"):
                with s.scope(f"for l in T.vectorized({V}):"):
                    for a in range(NA):
                        s(f"acc[mi, {a}, l] = T.float32(0)")

        def acc_store(MB: int, NA: int):
            """The rows of y the block owns: its NA partial sums added (+ bias), padding rows beyond M not written."""
            with s.scope(f"for mi in T.unroll({MB}):"):
                with s.scope("if T.Cast(\"int64\", mi) < M:"):
                    with s.scope(f"for l in T.vectorized({V}):"):
                        tot = " + ".join(f"acc[mi, {a}, l]" for a in range(NA))
                        s(f"y[mi, ob * {V} + l] = {tot}{bias(f'ob * {V} + l')}")

        def group_scales():
            """Inside the GEMV's loop over quantization groups ``gq``: the group's scale and -zero * scale into the
            local vectors sv / zv (allocated by the caller before the loop)."""
            with s.scope(f"for l in T.vectorized({V}):"):
                s("sv[l] = S[ob, gq, l]")
                s("zv[l] = T.float32(0) - Z[ob, gq, l] * S[ob, gq, l]")

        def gemv_permute(MB: int):
            # x86 N:4 GEMV (gemv_mode "permute"): no selects and no gathers. The V output rows of a block are the V
            # float lanes; per group of 4 inputs, x[4g..4g+3] is broadcast to every 128-bit lane, and each kept column
            # takes, per lane, the input its row kept with vpermilps (an in-lane permute by the low 2 bits of each
            # 32-bit index: the stored position byte shifted, no mask). n multiply-adds per group instead of m, and
            # the positions cost one shift per kept column; weights decoded as in the other modes.
            n_ = spec.n
            U = int(cfg["unroll"])
            if MB > 4 and U > 4 and 4 % spec.unit == 0:
                # 4 kept columns a step at M > 4: the tier's MB accumulators leave no registers for 8 columns' weights
                # and positions (2:4 + int4, 4096 x 11008, M = 16: 25.8 ms at 8, 17.4 at 4)
                U = 4
            RV = f"T.Ramp(0, 1, {V})"
            NA = 4 if MB == 1 else 2 if MB <= 4 else 1
            loop = "T.parallel" if cfg.get("parallel_gemv") else "range"
            if MB > 1:  # the 4 inputs of a group for every row: one 16-byte load a row, rows 16 bytes apart
                s(f'xq = T.alloc_buffer(({K // 4}, {MB}, 4), "float32")')
                with s.scope(f"for g in range({K // 4}):"):
                    with s.scope(f"for mi in T.unroll({MB}):"):
                        with s.scope("for c in T.vectorized(4):"):
                            s("xq[g, mi, c] = x[T.min(T.Cast(\"int64\", mi), M - T.int64(1)), g * 4 + c]")
            with s.scope(f"for ob in {loop}({OB}):"):
                s(f'acc = T.alloc_buffer(({MB}, {NA}, {V}), "float32", scope="local")')
                s(f'wv = T.alloc_buffer(({U}, {V}), "float32", scope="local")')
                s(f'cv = T.alloc_buffer(({U}, {V}), "int32", scope="local")')
                acc_zero(MB, NA)

                def step(ko: str, hoisted: str):
                    for ku in range(U):
                        with s.scope(f"for l in T.vectorized({V}):"):
                            s(f"wv[{ku}, l] = {_weight_expr(spec, U, 'ob', ko, ku, 'l', words, hoisted=hoisted)}")
                            s(f"cv[{ku}, l] = {permute_index('ob', ko, ku, U)}")
                    with s.scope(f"for mi in T.unroll({MB}):"):
                        for gi in range(U // n_):
                            grp = f"{ko} * {U // n_} + {gi}"
                            src = f"x[T.min(T.Cast(\"int64\", mi), M - T.int64(1)), T.Ramp(({grp}) * 4, 1, 4)]" if MB == 1 \
                                else f"xq[{grp}, mi, T.Ramp(0, 1, 4)]"
                            broadcast4(f"xg{gi}", src)
                        for ku in range(U):
                            a = ku % NA
                            s(f"acc[mi, {a}, {RV}] = acc[mi, {a}, {RV}] + wv[{ku}, {RV}] * {permute(f'xg{ku // n_}', f'cv[{ku}, {RV}]')}")

                # int4 / int8 kept values: the group loop holds each group's scale and -zero * scale (gemv_hoist 1;
                # the default: one multiply-add a weight instead of a subtract, a multiply and two loads)
                if spec.kind == "nm_gq" and int(cfg.get("gemv_hoist", 1)) and spec.G % U == 0 and J % spec.G == 0:
                    s(f'sv = T.alloc_buffer(({V},), "float32", scope="local")')
                    s(f'zv = T.alloc_buffer(({V},), "float32", scope="local")')
                    with s.scope(f"for gq in range({J // spec.G}):"):
                        group_scales()
                        with s.scope(f"for kq in range({spec.G // U}):"):
                            step(f"(gq * {spec.G // U} + kq)", "fma")
                else:
                    with s.scope(f"for ko in range({J // U}):"):
                        step("ko", "")
                acc_store(MB, NA)

        def gemv_xt(MB: int) -> bool:
            """Whether the GEMV of tier MB reads x from a transposed copy xt[K, MB] (made once a call): the MB values of
            a column are one cache line apart from the next column's instead of MB rows of K floats apart, which for
            a power-of-two K put every row in the same L1 sets (dense 11008 x 4096 at M = 16 was 2.6x slower than
            4096 x 11008)."""
            return MB > 1 and bool(cfg.get("gemv_xt", True))

        def gemv_step(MB: int, ko: str, NA: int, hoisted: str, acc: str = "acc"):
            """One unroll step (stored columns ko*U .. ko*U+U-1) of the GEMV of tier MB: decode, multiply-add."""
            xv = (lambda row, col: f"xt[{col}, mi]") if gemv_xt(MB) else (lambda row, col: f"x[{row}, {col}]")  # noqa: E731
            if sparse and select:
                # decode each group of m input columns to m dense weights in registers (select by the
                # stored positions): no gather of x, m multiply-adds per group on broadcast x values
                n_, m_ = spec.n, spec.m
                s(f'wd = T.alloc_buffer(({U // n_ * m_}, {V}), "float32", scope="local")')
                nm_select_decode("ob", ko, lambda gi, c: f"wd[{gi * m_ + c}, l]", hoisted)
                with s.scope(f"for mi in T.unroll({MB}):"):
                    row = "T.min(T.Cast(\"int64\", mi), M - T.int64(1))"
                    for gi in range(U // n_):
                        for c in range(m_):
                            col = f"({ko} * {U // n_} + {gi}) * {m_} + {c}"
                            with s.scope(f"for l in T.vectorized({V}):"):
                                a = (gi * m_ + c) % NA
                                s(f"{acc}[mi, {a}, l] = {acc}[mi, {a}, l] + wd[{gi * m_ + c}, l] * {xv(row, col)}")
            else:
                for ku in range(U):
                    with s.scope(f"for l in T.vectorized({V}):"):
                        s(f"wv[{ku}, l] = {_weight_expr(spec, U, 'ob', ko, ku, 'l', words, hoisted=hoisted)}")
                        if sparse:
                            s(f"cv[{ku}, l] = {_col_expr(spec, U, 'ob', ko, ku, 'l')}")
                with s.scope(f"for mi in T.unroll({MB}):"):
                    row = "T.min(T.Cast(\"int64\", mi), M - T.int64(1))"
                    for ku in range(U):
                        col = f"cv[{ku}, l]" if sparse else f"{ko} * {U} + {ku}"
                        with s.scope(f"for l in T.vectorized({V}):"):
                            s(f"{acc}[mi, {ku % NA}, l] = {acc}[mi, {ku % NA}, l] + wv[{ku}, l] * {xv(row, col)}")
                        if hoisted == "code":  # the group's sum of x (times -zero * scale at its end)
                            s(f"xs[mi, {ku % NA}] = xs[mi, {ku % NA}] + {xv(row, col)}")

        def gemv(MB: int):
            loop = "T.parallel" if cfg.get("parallel_gemv") else "range"
            if gemv_xt(MB):
                s(f'xt = T.alloc_buffer(({K}, {MB}), "float32")')
                with s.scope(f"for k in range({K}):"):
                    with s.scope(f"for mi in T.unroll({MB}):"):
                        s("xt[k, mi] = x[T.min(T.Cast(\"int64\", mi), M - T.int64(1)), k]")
            with s.scope(f"for ob in {loop}({OB}):"):
                NA = 4 if MB == 1 else 2 if MB <= 4 else 1  # independent accumulators per row (add latency)
                s(f'acc = T.alloc_buffer(({MB}, {NA}, {V}), "float32", scope="local")')
                s(f'wv = T.alloc_buffer(({U}, {V}), "float32", scope="local")')
                if sparse:
                    s(f'cv = T.alloc_buffer(({U}, {V}), "int32", scope="local")')
                acc_zero(MB, NA)
                # quantized formats: a loop over the quantization groups holds each group's scale and -zero * scale
                # in registers (loaded once a group, not once a weight). "code" (int4/int8 without sparsity, few
                # rows): the codes times x are summed over the group, scale and zero point applied once at its end:
                # y += s * sum(c x) - z s * sum(x)
                hoist = {0: "", 1: "fma", 2: "code"}[int(cfg.get("gemv_hoist", 2 if MB == 1 else 1 if MB <= 4 else 0))]
                if not (spec.kind in ("gq", "nm_gq") and spec.G % U == 0 and J % spec.G == 0):
                    hoist = ""
                if spec.kind == "nm_gq" and "gemv_hoist" not in cfg:
                    hoist = ""
                if hoist == "code" and spec.kind != "gq":  # N:M: the zero point's sum runs over each row's kept x
                    hoist = "fma"
                if hoist:
                    s(f'sv = T.alloc_buffer(({V},), "float32", scope="local")')
                    s(f'zv = T.alloc_buffer(({V},), "float32", scope="local")')
                    if hoist == "code":
                        s(f'gacc = T.alloc_buffer(({MB}, {NA}, {V}), "float32", scope="local")')
                        s(f'xs = T.alloc_buffer(({MB}, {NA}), "float32", scope="local")')
                    with s.scope(f"for gq in range({J // spec.G}):"):
                        group_scales()
                        if hoist == "code":
                            with s.scope(f"for mi in T.unroll({MB}):"):
                                for a in range(NA):
                                    s(f"xs[mi, {a}] = T.float32(0)")
                                    with s.scope(f"for l in T.vectorized({V}):"):
                                        s(f"gacc[mi, {a}, l] = T.float32(0)")
                        with s.scope(f"for kq in range({spec.G // U}):"):
                            gemv_step(MB, f"(gq * {spec.G // U} + kq)", NA, hoist, "gacc" if hoist == "code" else "acc")
                        if hoist == "code":
                            with s.scope(f"for mi in T.unroll({MB}):"):
                                for a in range(NA):
                                    with s.scope(f"for l in T.vectorized({V}):"):
                                        s(f"acc[mi, {a}, l] = acc[mi, {a}, l] + sv[l] * gacc[mi, {a}, l] + zv[l] * xs[mi, {a}]")
                else:
                    with s.scope(f"for ko in range({J // U}):"):
                        gemv_step(MB, "ko", NA, "")
                acc_store(MB, NA)

        def gemm():
            loop = "T.parallel" if cfg.get("parallel", True) else "range"
            with s.scope(f"for mt in {loop}((M + T.int64({MT - 1})) // T.int64({MT})):"):
                s(f'xT = T.alloc_buffer(({K}, {MT}), "float32")')
                with s.scope(f"for k in range({K}):"):
                    with s.scope(f"for mm in range({MT}):"):
                        s(f"xT[k, mm] = x[T.min(mt * T.int64({MT}) + T.Cast(\"int64\", mm), M - T.int64(1)), k]")
                with s.scope(f"for ob in range({OB}):"):
                    with s.scope(f"for rb in range({V // R}):"):
                        s(f'acc = T.alloc_buffer(({R}, {MT}), "float32", scope="local")')
                        with s.scope(f"for r in T.unroll({R}):"):
                            with s.scope(f"for mm in T.vectorized({MT}):"):
                                s("acc[r, mm] = T.float32(0)")
                        with s.scope(f"for ko in range({J // U}):"):
                            for ku in range(U):
                                with s.scope(f"for r in T.unroll({R}):"):
                                    lane = f"rb * {R} + r"
                                    w = _weight_expr(spec, U, "ob", "ko", ku, lane, words)
                                    c = _col_expr(spec, U, "ob", "ko", ku, lane, swz)
                                    with s.scope(f"for mm in T.vectorized({MT}):"):
                                        s(f"acc[r, mm] = acc[r, mm] + {w} * xT[{c}, mm]")
                        with s.scope(f"for r in T.unroll({R}):"):
                            with s.scope(f"for mm in range({MT}):"):
                                with s.scope(f"if mt * T.int64({MT}) + T.Cast(\"int64\", mm) < M:"):
                                    o = f"ob * {V} + rb * {R} + r"
                                    s(f"y[mt * T.int64({MT}) + T.Cast(\"int64\", mm), {o}] = acc[r, mm]{bias(o)}")

        def panel_acc_init(MR: int, NB: int, NKB: int) -> tuple[str, str]:
            """Inside the panel GEMMs' loop over row tiles mt: the MR x NB x V accumulators, 0 in the first K block
            and y (the earlier blocks' sums) in later ones; returns the x row and the y column expressions."""
            row = f"T.min(mt * T.int64({MR}) + T.Cast(\"int64\", mi), M - T.int64(1))"
            o = f"(obp * {NB} + b) * {V} + l"
            s(f'acc = T.alloc_buffer(({MR}, {NB}, {V}), "float32", scope="local")')
            with s.scope(f"for mi in T.unroll({MR}):"):
                with s.scope(f"for b in T.unroll({NB}):"):
                    with s.scope(f"for l in T.vectorized({V}):"):
                        if NKB == 1:
                            s("acc[mi, b, l] = T.float32(0)")
                        else:
                            s(f"acc[mi, b, l] = T.Select(kb == 0, T.float32(0), y[{row}, {o}])")
            return row, o

        def panel_acc_store(MR: int, NB: int, NKB: int, o: str):
            """The row tile's accumulators to y (rows beyond M not written), the bias added in the last K block."""
            with s.scope(f"for mi in T.unroll({MR}):"):
                with s.scope(f"if mt * T.int64({MR}) + T.Cast(\"int64\", mi) < M:"):
                    with s.scope(f"for b in T.unroll({NB}):"):
                        with s.scope(f"for l in T.vectorized({V}):"):
                            b_ = "" if not spec.bias else (f" + B[{o}]" if NKB == 1 else f" + T.Select(kb == {NKB - 1}, B[{o}], T.float32(0))")
                            s(f"y[mt * T.int64({MR}) + T.Cast(\"int64\", mi), {o}] = acc[mi, b, l]{b_}")

        def permute(xg: str, idx: str) -> str:
            """vpermilps of the broadcast group ``xg`` by the index vector ``idx`` (xmm / ymm / zmm by V)."""
            intrin = {4: "llvm.x86.avx.vpermilvar.ps", 8: "llvm.x86.avx.vpermilvar.ps.256", 16: "llvm.x86.avx512.vpermilvar.ps.512"}[V]
            return f'T.call_llvm_pure_intrin("float32x{V}", "{intrin}", {xg}, {idx})'

        def broadcast4(name: str, src: str):
            """``name``: the 4 floats ``src`` in every 128-bit lane of a V-float vector."""
            s(f"{name}: T.let = {src}" if V == 4 else
              f"{name}: T.let = T.Shuffle([{', '.join([src] * (V // 4))}], [{', '.join(str(i) for i in range(V))}])")

        def permute_index(ob: str, ko: str, ku: int, U: int = U) -> str:
            """The vpermilps index of stored column ko*U+ku, lane l: its position byte shifted into the low 2 bits
            (the instruction reads only those: no mask)."""
            byte = f"T.Cast(\"int32\", I[{ob}, {ko} * {U // spec.per} + {ku // spec.per}, l])"
            sh = spec.ib * (ku % spec.per)
            return f"T.shift_right({byte}, {sh})" if sh else byte

        def gemm_panel():
            # prefill at M above the last tier, x86: the weights of NB blocks of V output rows x JB stored columns are
            # decoded ONCE into a dense fp32 panel P[NB, KB, V] (int4/int8 dequantized, N:M groups expanded by
            # position selects); a register-blocked micro-kernel then runs every MR-row tile of x over it: MR x NB x V
            # accumulators, NB panel vector loads and MR broadcast x values per input column (the decode cost is
            # amortized over all M rows; 2:4 does the dense FLOPs: its saving at large M is the bytes). K is blocked
            # (kb outer, serial) so the x block [M, KB] stays in cache across the output blocks; blocks after the
            # first accumulate into y.
            MR = int(cfg.get("gemm_mr", 8))
            NB = _panel_nb(spec, cfg)
            JB = _panel_cols(spec, cfg)
            KB = JB // spec.n * spec.m if sparse else JB
            NKB = J // JB
            loop = "T.parallel" if cfg.get("parallel", True) else "range"
            kk = f"(kb * {JB // U} + ko)"  # the stored-column unroll block inside the whole row
            ob = f"(obp * {NB} + b)"
            with s.scope(f"for kb in range({NKB}):"):
                with s.scope(f"for obp in {loop}({OB // NB}):"):
                    if spec.kind == "dense":
                        panel = lambda k: f"W[obp * {NB} + b, kb * {KB} + {k}, l]"  # noqa: E731 - the stored layout is the panel
                    else:
                        s(f'P = T.alloc_buffer(({NB}, {KB}, {V}), "float32")')
                        panel = lambda k: f"P[b, {k}, l]"  # noqa: E731
                        with s.scope(f"for b in range({NB}):"):
                            if not sparse:
                                with s.scope(f"for ko in range({JB // U}):"):
                                    for ku in range(U):
                                        with s.scope(f"for l in T.vectorized({V}):"):
                                            s(f"P[b, ko * {U} + {ku}, l] = {_weight_expr(spec, U, ob, kk, ku, 'l', words)}")
                            elif spec.m <= 8:
                                n_, m_ = spec.n, spec.m
                                s(f'wv = T.alloc_buffer(({U}, {V}), "float32", scope="local")')
                                s(f'cv = T.alloc_buffer(({U}, {V}), "int32", scope="local")')
                                with s.scope(f"for ko in range({JB // U}):"):
                                    nm_select_decode(ob, kk, lambda gi, c: f"P[b, (ko * {U // n_} + {gi}) * {m_} + {c}, l]")
                            else:  # wide groups: zero the panel, scatter the kept values
                                with s.scope(f"for k in range({KB}):"):
                                    with s.scope(f"for l in T.vectorized({V}):"):
                                        s("P[b, k, l] = T.float32(0)")
                                with s.scope(f"for ko in range({JB // U}):"):
                                    for ku in range(U):
                                        with s.scope(f"for l in range({V}):"):
                                            col = f"(ko * {U // spec.n} + {ku // spec.n}) * {spec.m} + {_pos_expr(spec, U, ob, kk, ku, 'l')}"
                                            s(f"P[b, {col}, l] = {_weight_expr(spec, U, ob, kk, ku, 'l', words)}")
                    with s.scope(f"for mt in range((M + T.int64({MR - 1})) // T.int64({MR})):"):
                        row, o = panel_acc_init(MR, NB, NKB)
                        with s.scope(f"for k in range({KB}):"):
                            with s.scope(f"for mi in T.unroll({MR}):"):
                                with s.scope(f"for b in T.unroll({NB}):"):
                                    with s.scope(f"for l in T.vectorized({V}):"):
                                        s(f"acc[mi, b, l] = acc[mi, b, l] + x[{row}, kb * {KB} + k] * {panel('k')}")
                        panel_acc_store(MR, NB, NKB, o)

        def gemm_permute():
            # x86 prefill for N:4 (gemm "permute"): the panel GEMM's blocking, but the panel keeps the weights
            # compressed: the n kept values of each group of 4 inputs (int4 / int8 dequantized) and their positions,
            # decoded once per panel. The micro-kernel loads each row's 4 inputs of a group once, broadcast to every
            # 128-bit lane, and per kept column picks each output row's input with vpermilps (as gemv_permute does):
            # n multiply-adds + n in-lane permutes per group and row instead of the dense panel's 4 multiply-adds.
            MR = int(cfg.get("gemm_mr", 8))
            NB = _panel_nb(spec, cfg)
            JB = _panel_cols(spec, cfg)
            KB = JB // spec.n * spec.m
            NKB = J // JB
            n_ = spec.n
            RV = f"T.Ramp(0, 1, {V})"
            loop = "T.parallel" if cfg.get("parallel", True) else "range"
            kk = f"(kb * {JB // U} + ko)"
            ob = f"(obp * {NB} + b)"
            with s.scope(f"for kb in range({NKB}):"):
                with s.scope(f"for obp in {loop}({OB // NB}):"):
                    s(f'PV = T.alloc_buffer(({NB}, {JB}, {V}), "float32")')
                    s(f'PC = T.alloc_buffer(({NB}, {JB}, {V}), "int32")')
                    with s.scope(f"for b in range({NB}):"):
                        with s.scope(f"for ko in range({JB // U}):"):
                            for ku in range(U):
                                with s.scope(f"for l in T.vectorized({V}):"):
                                    s(f"PV[b, ko * {U} + {ku}, l] = {_weight_expr(spec, U, ob, kk, ku, 'l', words)}")
                                    s(f"PC[b, ko * {U} + {ku}, l] = {permute_index(ob, kk, ku)}")
                    with s.scope(f"for mt in range((M + T.int64({MR - 1})) // T.int64({MR})):"):
                        row, o = panel_acc_init(MR, NB, NKB)
                        with s.scope(f"for g in range({JB // n_}):"):
                            with s.scope(f"for mi in T.unroll({MR}):"):
                                broadcast4("xg", f"x[{row}, T.Ramp(kb * {KB} + g * 4, 1, 4)]")
                                with s.scope(f"for b in T.unroll({NB}):"):
                                    for j in range(n_):
                                        perm = permute("xg", f"PC[b, g * {n_} + {j}, {RV}]")
                                        s(f"acc[mi, b, {RV}] = acc[mi, b, {RV}] + PV[b, g * {n_} + {j}, {RV}] * {perm}")
                        panel_acc_store(MR, NB, NKB, o)

        def gemv_c():
            # the C GEMV of backends/capi/wasm_swizzle.c (all rows up to the last tier), linked by cross.link_wasm
            h = lambda b: f"{b}.data"  # noqa: E731
            ptrs = [h("x")] + ([h("Wv")] if spec.kind == "nm" else [h("C"), h("S"), h("Z")]) + [h("I")]
            ptrs += [h("B") if spec.bias else h("y"), h("y")]
            ints = ["T.Cast(\"int32\", M)", f"T.int32({O})", f"T.int32({J})"]
            ints += [] if spec.kind == "nm" else [f"T.int32({spec.G})"]
            ints.append(f"T.int32({int(spec.bias)})")
            s(f'T.evaluate(T.call_extern("int32", "{_c_gemv(spec)}", {", ".join(ptrs + ints)}))')

        def chain(i: int):
            if i == len(tiers):
                {"panel": gemm_panel, "permute": gemm_permute}.get(cfg.get("gemm", "tile"), gemm)()
                return
            if swz and cfg.get("gemv_impl") == "c":
                if spec.kind == "nm_gq" and i == 0 and tiers[0] == 1 and QUANT_C_GEMV_FROM_M > 1:
                    # int4/int8 at M = 1: the TIR swizzle GEMV (8 kept columns per iteration), faster than the C one
                    # there (bench/results/wasm_c_gemv.md, "c_all"); C from M = 2 on, where it decodes each weight
                    # once for 4 rows
                    with s.scope("if M <= T.int64(1):"):
                        gemv_swizzle(1)
                    with s.scope("else:"):
                        chain(1)
                    return
                with s.scope(f"if M <= T.int64({tiers[-1]}):"):
                    gemv_c()
                with s.scope("else:"):
                    gemm()
                return
            with s.scope(f"if M <= T.int64({tiers[i]}):"):
                (gemv_swizzle if swz else gemv_permute if cfg.get("gemv_mode") == "permute" else gemv)(tiers[i])
            with s.scope("else:"):
                chain(i + 1)

        # no rows, no work: an MoE expert no token was routed to runs on 0 rows and must not read its weights
        with s.scope("if M > T.int64(0):"):
            chain(0)
    return "\n".join(s.lines) + "\n"


def build_prim_func(spec: Spec, cfg: dict[str, Any], name: str = "kernel"):
    from tvm.script.parser.core.entry import parse

    src = kernel_source(spec, cfg, name)
    func = parse(src)
    return func, src


# ----------------------------------------------------------------------------------------------------------------
# generators
def _generate(kernel_name: str, linear, target, hints: ShapeHints, tuning) -> KernelImpl | None:
    spec = spec_of(linear)
    if spec is None or hints.act_dtype != "float32":
        return None
    cfg = None
    tuned = False
    if hints.config is not None:
        cfg = dict(hints.config)
    else:
        found = tuning.lookup(kernel_name, target, linear_key(linear, hints), lanes=vector_lanes(target, "float32"))
        if found is not None and spec.kind in ("gq", "nm_gq"):
            # an entry without "codes" was tuned on the byte layout (before int4 codes became words on x86)
            found = {"codes": "byte", **found}
        if found is not None:
            merged = {**default_config(spec, target), **found}
            if "gemm" not in found:  # an entry from before the permute GEMM: the dense panel it had where it cannot run
                merged = _panel_if_no_permute(spec, merged, target)
            if check_config(spec, merged, target) is None:
                cfg, tuned = merged, True
    if cfg is None:
        cfg = default_config(spec, target)
    bad = check_config(spec, cfg, target)
    if bad is not None:
        if hints.config is not None:
            raise ValueError(f"config {cfg} is invalid for {linear.name}: {bad}")
        return None
    func, src = build_prim_func(spec, cfg)
    impl = KernelImpl(kernel_name, param_specs(spec, int(cfg["block_o"]), cfg.get("gemv_mode") == "swizzle", _code_words(spec, cfg)), func=func, act_dtype="float32",
                      fuses_bias=spec.bias, config=cfg, tuned=tuned)  # fmt: skip
    impl.source = src  # type: ignore[attr-defined]
    return impl


@register_kernel("cpu.dense", formats=("dense",), targets=CPU_TARGETS, priority=10, prepare=prepare_cpu,
                 search_space=search_space, refine_space=refine_space)  # fmt: skip
def cpu_dense(linear, target, hints, tuning):
    """Dense fp32 GEMV/GEMM with interleaved weights (the baseline every compressed kernel is compared with)."""
    return _generate("cpu.dense", linear, target, hints, tuning)


@register_kernel("cpu.nm_sparse", shapes=_cpu_shapes, formats=("nm_sparse[dense]",), targets=CPU_TARGETS, priority=10, prepare=prepare_cpu,
                 search_space=search_space, refine_space=refine_space)  # fmt: skip
def cpu_nm_sparse(linear, target, hints, tuning):
    """N:M sparse: kept values + packed positions; gathers x by position (GEMV), sparse row x dense tile (GEMM)."""
    return _generate("cpu.nm_sparse", linear, target, hints, tuning)


@register_kernel("cpu.group_quant", shapes=_cpu_shapes, formats=("group_quant",), targets=CPU_TARGETS, priority=10, prepare=prepare_cpu,
                 search_space=search_space, refine_space=refine_space)  # fmt: skip
def cpu_group_quant(linear, target, hints, tuning):
    """Group-quantized int4/int8 (symmetric or with zero points, optional group mask): dequantized in registers."""
    return _generate("cpu.group_quant", linear, target, hints, tuning)


@register_kernel("cpu.nm_group_quant", shapes=_cpu_shapes, formats=("nm_sparse[group_quant]",), targets=CPU_TARGETS, priority=10,
                 prepare=prepare_cpu, search_space=search_space, refine_space=refine_space)  # fmt: skip
def cpu_nm_group_quant(linear, target, hints, tuning):
    """N:M sparse with group-quantized kept values (int4/int8): decode positions and codes in registers."""
    return _generate("cpu.nm_group_quant", linear, target, hints, tuning)
