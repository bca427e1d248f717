"""CUDA kernels for compressed Linear layers: 2:4 sparse tensor cores (``mma.sp``), int4 / int8 dequant-in-register.

Five kernel kinds, each with a decode GEMV path (M <= 16 tokens, weights streamed from global memory straight into
registers) and a prefill GEMM path (multi-stage ``cp.async`` pipeline, ``ldmatrix`` for the activations), chosen at
run time by the number of tokens:

=========  =========================================  ==========================================================
kind       weight format                              instruction
=========  =========================================  ==========================================================
``sp16``   ``NMSparse`` 2:4 of fp16/fp32 ``Dense``       ``mma.sp::ordered_metadata.m16n8k32`` f16 -> f32
``sp4``    ``NMSparse`` 2:4 of ``GroupQuant`` int4       int4 -> fp16 in registers, then ``mma.sp.m16n8k32``
``sp8``    ``NMSparse`` 2:4 of ``GroupQuant`` int8       int8 -> fp16 in registers, then ``mma.sp.m16n8k32``
``dq4``    ``GroupQuant`` int4 (dense)                  int4 -> fp16 in registers, then ``mma.m16n8k16``
``dq8``    ``GroupQuant`` int8 (dense)                  int8 -> fp16 in registers, then ``mma.m16n8k16``
=========  =========================================  ==========================================================

The device code is ``sparsec_mma.cuh`` (templates). This module

- converts sparsec's formats to the layouts the instructions want (``prepare_*``: values/codes already in tensor-core
  fragment order, 2:4 metadata in ``mma.sp`` order, scales/zero points as (row g, row g+8) pairs),
- renders the CUDA source of the template instantiations a model needs and the host wrappers that export them as
  TVM FFI functions (``sparsec_cuda_<id>(x, *weights, y)``; compiled ahead of time by
  :mod:`sparsec.backends.kernels.cuda_compile` into SASS for the target's arch and linked into the model library),
- registers the kernel generators with :mod:`sparsec.backends.kernels.registry` (``cuda.nm24_mma_sp``,
  ``cuda.nm24_int4_mma_sp``, ``cuda.nm24_int8_mma_sp``, ``cuda.int4_dequant_mma``, ``cuda.int8_dequant_mma``): the lowering calls them with ``R.call_dps_packed``.

``decode_layout`` is an independent decoder of the layouts (written from the PTX ISA's fragment and metadata
definitions, not from the encoder) used by the tests to check ``prepare_*`` without a GPU.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ...compressor.formats import Dense, GroupQuant, NMSparse
from .registry import KernelImpl, ShapeHints, WeightParam, fmt_pattern, linear_key, register_kernel

__all__ = [
    "KINDS",
    "Variant",
    "default_config",
    "search_space",
    "variant_for",
    "prepare",
    "prepare_sp16",
    "prepare_sp4",
    "prepare_sp8",
    "prepare_dq4",
    "prepare_dq8",
    "decode_layout",
    "render_device_source",
    "render_host_source",
    "HEADER_PATH",
    "GEMV_MAX_M",
]

HEADER_PATH = Path(__file__).with_name("sparsec_mma.cuh")
KINDS = ("sp16", "sp4", "dq4", "dq8", "sp8")  # the launcher's kind numbers are the indices
_KIND_ENUM = {"sp16": "KIND_SP16", "sp4": "KIND_SP4", "dq4": "KIND_DQ4", "dq8": "KIND_DQ8", "sp8": "KIND_SP8"}
INT8_KINDS = ("dq8", "sp8")  # byte codes (the int8 converter of the "dq16" path)
DENSE_KINDS = ("dq4", "dq8")  # group-quantized kinds without sparsity (no metadata; scales per k16 unit)
GEMV_MAX_M = 16
K_ALIGN = 128  # the weight's K is padded to this (zeros, valid metadata); activations' K must be a multiple of 32
SMEM_LIMIT = {"sm_80": 163 * 1024, "sm_86": 99 * 1024, "sm_89": 99 * 1024, "sm_90": 227 * 1024, "sm_90a": 227 * 1024}

# ----------------------------------------------------------------------------------------------------- configs
# decode GEMV: warps per block, 16-row tiles per block, chunks per pipeline stage, K splits per row tile ("ks": blocks
# sharing a row tile's K range, reduced deterministically through a workspace; 0 = chosen at launch from the grid, K
# and the GPU's SM count by gemv_auto_ks), L2 prefetch distance in chunks ("pf", 0 = none: no distance beat 0 on the
# H100, bench/results/cuda_kernels_decode_prefetch.md; kept for measuring, not in the search space). 2 row tiles per
# block; the warps below are what a config without a layer shape gets, a build's layer gets gemv_auto_warps. "warps2":
# the warps of the M = 9..16 kernel (two token tiles: more registers a thread), 0 = the same as "warps".
# "og": 1 = the int4 kinds' kernel that scales after the MMAs where a quantization group holds whole chunks
# (gemv_one_group), 0 = dequantize with the scale before each MMA (the earlier kernel; kept to measure against).
# "st": stages of the cp.async shared-memory ring that feeds the weights (0 = the two register buffers of "u" chunks).
# "xs": activations staged in shared memory by cp.async and read with ldmatrix (register pipeline only), a bit per
# token-tile kernel: 1 = the M <= 8 kernel, 2 = the M > 8 one, 3 = both.
# "wr" (absent = 1): row groups of warps a block of the M <= 8 kernel, "wr2" the M > 8 one's (absent / 0 = "wr"): the
# block's warps form wr groups of rt row tiles each x warps / wr parts of its K range, and the wr warps of a K part
# share its staged activations ("xs" needed for that kernel), so a block reads its activations once for wr x rt row
# tiles (gemv_rows). "rt2" / "ks2" (absent / 0 = "rt" / the M > 8 rule of "ks"): the M > 8 kernel's row tiles per
# row group and K splits, so one config holds each token-tile kernel's own tiling.
DEFAULT_GEMV = {"warps": 8, "rt": 2, "u": 1, "ks": 0, "pf": 0, "warps2": 0, "og": 1, "st": 0, "xs": 0}
# 2:4 + int4 with 4-warp blocks at M <= 8 (rows beyond ~1.5 waves of 16-warp blocks): the staged path was 0.86-0.99x
# of the unstaged one at M = 2-8 (bench/results/cuda_kernels_decode_xs_default.md), so those layers stage only at M > 8
GEMV_XS_MIN_WARPS = {"sp4": 8, "sp8": 16}
# 2:4 + int8 stages its activations at M <= 8 on Hopper only: measured there (bench/results/cuda_int8_24*.md); for
# sm_80 ptxas gives its 16-warp staged kernel 64 registers and a 16-byte spill, and no A100 run decided it
GEMV_XS_HOPPER_ONLY = ("sp8",)
GEMV_MAX_ST = 8
# 2:4 + int4 stages its activations (xs): 16 32-bit activation loads a chunk were its largest instruction count
# (bench/results/cuda_kernels_decode_xs.md, per-point medians over the configs: 0.94-1.08x at M <= 8, 1.17-1.30x at
# M = 16 over the same config without); 2:4 fp16 (4 loads a chunk) and int4 gain nothing or lose at M <= 8.
# Programmatic dependent launch of the decode GEMV ("pdl": bit 0 the M <= 8 kernel, bit 1 the M > 8 one; sm_90): the
# kernel may launch while the stream's previous kernel finishes (its start overlaps that one's tail). Steady state on
# the H100, 5 LLM shapes x M = 1..16 (bench/results/decode_pdl.md): 2:4 fp16 4096x4096 9.2 -> 8.5 us (M = 1), 2:4 +
# int4 5.5 -> 4.8; slower for the dense int4 M <= 8 kernel on most shapes (4096x14336: 19.7 -> 23.4 us) and for the
# M > 8 kernels of layers with >= 4 x SMs row tiles (2:4 fp16 11008x4096: 21.4 -> 24.2 us): those launch plainly
# (gemv_pdl_bits).
GEMV_PDL_KIND = {"sp16": 3, "sp4": 3, "dq4": 2, "dq8": 3, "sp8": 3}
DEFAULT_GEMV_KIND = {kind: dict(DEFAULT_GEMV, pdl=GEMV_PDL_KIND[kind], **extra)
                     for kind, extra in (("sp16", {"warps": 16}), ("sp4", {"xs": 3}), ("dq4", {"warps": 16}),
                                         ("dq8", {"warps": 16}), ("sp8", {"warps": 16, "xs": 3}))}  # fmt: skip
GEMV_MAX_PF = 64
# The warps of an untuned decode GEMV follow the layer's row count (gemv_auto_warps): the fewest waves of blocks, then
# the most warps a block. GEMV_WARP_BUDGET[(kind, token tiles)]: warps one SM holds with the default tiles, 65536
# registers / (32 x the registers a thread that ptxas -v reports for sm_90a; one token tile (M <= 8): 2:4 fp16 56-58,
# 2:4 + int4 (xs) 92-94 (122-124 with zero points), int4 79-92 (113-115 with zero points); two (M = 9..16): 80-82,
# 128 (152), 119-127).
# Fitted on the H100 decode run cuda_kernels_decode_splitk (30 configs per point, the same winners in the later
# cuda_kernels_decode_prefetch run), measured as the default in cuda_kernels_decode_autowarps: 16 warps for 4096 rows
# (128 blocks: one per SM), fewer for 11008 / 14336 rows (2:4 fp16 8, 2:4 + int4 4, int4 8 / 4). The M > 8 kernel of
# 2:4 + int4 stays at <= 8 warps: with 16 it spills (128 bytes; 2688 with zero points).
GEMV_WARP_BUDGET = {("sp16", 1): 32, ("sp4", 1): 20, ("dq4", 1): 24, ("sp16", 2): 24, ("sp4", 2): 16, ("dq4", 2): 16,
                    ("dq8", 1): 32, ("dq8", 2): 20, ("sp8", 1): 28, ("sp8", 2): 19}
# 2:4 + int8 (sp8): ptxas -v (sm_90a) 70-72 registers at one token tile with 4 / 8 warps (78-82 at 16; 72-88 with zero
# points), 95-104 at two (110-111), 4-row-tile warps 157-167; the one-token-tile budget from the 4 / 8-warp kernels:
# 11008 rows (344 blocks) then get 8 warps, 14336 rows (448) 4, which measured fastest on the H100 (11008x4096, M = 1:
# 8 warps 11.4 us, 4 warps 14.9; 14336x4096: 4 warps 16.3, 8 warps 18.1; bench/results/cuda_int8_24_run1.md).
# Staged activations (xs) at M <= 8 only with 16 warps: 4096x4096 M = 1 5.8 -> 5.4 us; with 8 warps (11008x4096) 0.91-0.95x
# at M = 4 / 8, with 4 (14336x4096) 0.86-0.87x (bench/results/cuda_int8_24_run2.md).
# int8 (dq8): from ptxas -v alone (sm_90a; not fitted on a GPU run): 58-62 registers at one token tile (64-73 with zero
# points), 72-91 at two (80-96)
GEMV_WARP_BUDGET_ASYM = {("dq4", 1): 16, ("sp4", 1): 16, ("sp4", 2): 12, ("dq8", 1): 28, ("sp8", 1): 25, ("sp8", 2): 18}
# The same for 4-row-tile warps (gemv_tile_plan; ptxas -v, sm_90a, staged activations): one token tile 2:4 + int4
# 126-128 registers (150 with zero points); two: 2:4 + int4 191-192 (203-204), 2:4 fp16 126-128, int4 152 (165),
# int8 128-132
GEMV_WARP_BUDGET_RT4 = {("sp4", 1): 16, ("sp4", 2): 10, ("sp16", 2): 16, ("dq4", 2): 13, ("dq8", 2): 16, ("sp8", 2): 12}
GEMV_WARP_BUDGET_RT4_ASYM = {("sp4", 1): 13, ("sp4", 2): 10, ("dq4", 2): 12, ("dq8", 2): 15, ("sp8", 2): 12}
GEMV_WARP_CHOICES = (16, 8, 4)
GEMV_MAX_WARPS = {("sp4", 2): 8}
ARCH_SMS = {"sm_80": 108, "sm_86": 84, "sm_89": 128, "sm_90": 132, "sm_90a": 132}  # A100, A40/3090-class, L40, H100 SXM
GEMV_KS = (1, 2, 4, 8)  # fixed split counts in the search space (+ the default's 0 = auto)
GEMV_MAX_KS = 16
# gemv_auto_ks: split only while the grid has fewer than GEMV_WARPS_PER_SM warps per SM and every warp keeps at least
# GEMV_MIN_CHUNKS chunks of its split (fitted on the H100 decode run: below ~8-12 chunks per warp the split's extra
# pipeline start-up and workspace round trip cost more than the added bytes in flight gain)
GEMV_WARPS_PER_SM = 16
GEMV_MIN_CHUNKS = 12
DEFAULT_GEMM = {
    "sp16": {"bm": 256, "bn": 128, "bk": 128, "wm": 4, "wn": 2, "stages": 3, "group": 16},
    "sp4": {"bm": 256, "bn": 128, "bk": 128, "wm": 4, "wn": 2, "stages": 3, "group": 16},
    "dq4": {"bm": 128, "bn": 256, "bk": 128, "wm": 4, "wn": 2, "stages": 3, "group": 16},
    # int8: twice the int4 tile's weight bytes a stage (3 stages of the int4 tile need 246 KB) and a uint4 of codes a
    # fragment: 128x256 tiles spill (ptxas, sm_90a: 112-136 bytes at 255 registers), 128x128x64 w2x4 does not
    "dq8": {"bm": 128, "bn": 128, "bk": 64, "wm": 2, "wn": 4, "stages": 4, "group": 16},
    # 2:4 + int8: the 2:4 + int4 tile spills with its two code words a step (ptxas, sm_90a: 96 bytes at 255 registers)
    "sp8": {"bm": 128, "bn": 128, "bk": 128, "wm": 2, "wn": 4, "stages": 3, "group": 16},
}
DEFAULT_GEMM_SMALL = {
    "sp16": {"bm": 64, "bn": 64, "bk": 128, "wm": 2, "wn": 2, "stages": 3, "group": 8},
    "sp4": {"bm": 128, "bn": 64, "bk": 128, "wm": 2, "wn": 2, "stages": 3, "group": 8},
    "dq4": {"bm": 64, "bn": 64, "bk": 128, "wm": 2, "wn": 2, "stages": 3, "group": 8},
    "dq8": {"bm": 64, "bn": 64, "bk": 128, "wm": 2, "wn": 2, "stages": 3, "group": 8},
    # 2:4 + int8: 64x64 tiles; 128x64 (2:4 + int4's) where those still give every SM a tile at M = 128
    # (SMALL_BM128_MIN_TILES; default_config)
    "sp8": {"bm": 64, "bn": 64, "bk": 128, "wm": 2, "wn": 2, "stages": 3, "group": 8},
}
DEFAULT_SMALL_MAX = 128  # 16 < M <= small_max -> the small-tile GEMM
# 2:4 + int8's small tile on the H100 at M = 128 (bench/results/cuda_int8_24_run1.md / _run2.md): 128x64 left half the SMs
# idle at 4096 rows (64 tiles; 4096x4096 55.7 us, 4096x14336 189) where 64x64 took 42.4 / 147; at 11008 / 14336 rows
# (172 / 224 tiles of 128x64) 128x64 took 69.3 / 71.0 us, 64x64 102.9 / 102.1. 128-row tiles from this many tiles on.
SMALL_BM128_MIN_TILES = {"sp8": 1.0}  # x the SMs, at M = DEFAULT_SMALL_MAX
# int8 on sm_90a takes the dequantize + warp-specialized path from M = 17 on: its small mma tile (64x64x128) ran
# 0.33-0.69x cuBLAS at M = 32 / 128 where dequantize + ws ran 0.46-0.50x (geometric means 0.41x / 0.47x;
# bench/results/cuda_gemm_v2_dq8_tiles_ab.md, H100, every int8 mma tile measured: none better)
# 2:4 + int4 on sm_90a takes it from M = 17 on as well, and 2:4 fp16 its warp-specialized tail-split GEMM (WS_SMALL_MAX):
# interleaved A/B on an H100, M = 32 / 64 / 128, 4096x4096 / 11008x4096 / 4096x11008, L2 flushed, medians of 5
# (bench/results/cuda_gemm_v2_mid_{sp16,sp4,dq4}.md): 2:4 fp16 0.90 / 1.17-1.19 / 1.13x cuBLAS where its small tile
# ran 0.59-0.61 / 0.84-0.94 / 0.50-0.53x; 2:4 + int4 0.63-0.68 / 0.77-0.82 / 0.73x where its small tile ran
# 0.36-0.38 / 0.62-0.78 / 0.31-0.32x. Dense int4 not: dequantize + ws 0.48-0.50x at 11008x4096 where the small tile
# ran 0.54-0.69x (better at the other two shapes).
DQ16_SMALL_MAX = {"dq8": GEMV_MAX_M, "sp4": GEMV_MAX_M}
WS_SMALL_MAX = {"sp16": GEMV_MAX_M}
_FAMILY_KEYS = ("ws", "wgmma", "persistent", "cluster", "tail", "dq16", "wmap")  # kernel family flags of a GEMM config
# sm_90a (H100): the warp-specialized TMA + wgmma.sp GEMM, tried first. bench/bench_gemm_v2.py on an H100
# (bench/results/cuda_gemm_v2.md): 0.93-1.04x cuBLAS at M = 2048 / 8192 on the LLM shapes where the mma.sp default
# above runs 0.50-0.57x; all 22 warp-specialized candidates correct (smoke shapes with tails, float64 checks).
# "tail": 4 splits the last wave's tiles along K (ws_tail_plan): bench/results/cuda_gemm_v2_tail_ab.md, the same run
# A/B: 1.20-2.25x faster than whole tiles where M = 256 / 512 splits, 1.05-1.11x at 11008x4096 M = 2048 (fastest
# round / median); launches with nothing to split run the whole-tile kernel itself.
# "wmap": 1 loads a stage's weights and metadata with one TMA box each instead of 2 x BM/16 bulk copies: interleaved
# A/B on an H100 (bench/results/cuda_gemm_v2_wmap_ab.md, 7 rounds, 45/45 float64 checks), 256x128x64 s5 tail 4 wmap
# vs the earlier default 256x128x128 s3 tail 4: 1.28-1.32x cuBLAS at M = 2048 (was 0.93-0.98x), 1.32-1.33x at
# M = 8192 (0.91-0.98x), 0.93-1.21x at M = 256 (0.84-1.08x), median ms
DEFAULT_GEMM_HOPPER = {
    "sp16": {"bm": 256, "bn": 128, "bk": 64, "wm": 4, "wn": 1, "stages": 5, "group": 16, "ws": 1, "tail": 4, "wmap": 1},
}


# the 2:4 fp16 GEMM that "dq16" runs on the dequantized 2:4 + int4 weight (the sm_90a 2:4 fp16 default, tail split
# included), and the dense fp16 one for the dense int4 kind (the same kernel with dense wgmma m64nNk16 and A = two k16
# fragments per k32 step; BK 64 keeps its double-buffered A registers within the consumers' budget)
# Both read the weights by tensor map ("wmap"): interleaved A/B on an H100 against the same kernels with bulk copies
# (bench/results/cuda_gemm_v2_{sp4,dq4}_wmap_ab.md, group 128): 2:4 + int4 1.06-1.31x cuBLAS at M = 2048 / 8192
# (was 0.87-0.97x), int4 0.79-0.91x (0.76-0.83x). A large-GEMM config with "wmap": 0 keeps the bulk copies.
DQ16_GEMM = {"sp4": {"bm": 256, "bn": 128, "bk": 128, "wm": 4, "wn": 1, "stages": 3, "group": 16, "ws": 1, "tail": 4,
                     "wmap": 1},
             "dq4": {"bm": 256, "bn": 128, "bk": 64, "wm": 4, "wn": 1, "stages": 4, "group": 16, "ws": 1, "dense": 1,
                     "tail": 4, "wmap": 1}}  # fmt: skip
DQ16_GEMM["dq8"] = DQ16_GEMM["dq4"]  # dense int8 dequantizes into the same dense fp16 fragments
DQ16_GEMM["sp8"] = DQ16_GEMM["sp4"]  # 2:4 + int8 into the same 2:4 fp16 layout


# smaller fallbacks for GPUs with less shared memory than the H100 (A100: 163 KB per block)
FALLBACK_GEMM = {
    "sp16": {"bm": 128, "bn": 256, "bk": 64, "wm": 2, "wn": 4, "stages": 3, "group": 16},
    "sp4": {"bm": 128, "bn": 128, "bk": 128, "wm": 2, "wn": 4, "stages": 3, "group": 16},
    "dq4": {"bm": 128, "bn": 128, "bk": 64, "wm": 2, "wn": 4, "stages": 4, "group": 16},
    "dq8": {"bm": 128, "bn": 128, "bk": 64, "wm": 2, "wn": 4, "stages": 4, "group": 16},
    "sp8": {"bm": 128, "bn": 128, "bk": 128, "wm": 2, "wn": 4, "stages": 3, "group": 16},
}


def default_config(kind: str, arch: str = "sm_90a", n: int | None = None, k: int | None = None,
                   asym: bool = False) -> dict[str, Any]:  # fmt: skip
    """The untuned config: the H100 search's usual winners, or smaller tiles where they do not fit ``arch``. With the
    layer's shape (``n`` output rows, ``k`` inputs) the decode GEMV's warps, per token-tile count, follow it
    (:func:`gemv_auto_warps`; ``asym``: zero points)."""
    gemm = next((dict(c) for c in (DEFAULT_GEMM_HOPPER.get(kind), DEFAULT_GEMM[kind])
                 if c is not None and gemm_valid(kind, c, True, arch)), dict(FALLBACK_GEMM[kind]))
    if dq16_ok(kind, arch, n, k):
        gemm["dq16"] = 1
    gemv = dict(DEFAULT_GEMV_KIND[kind])
    if n is not None:
        sms = ARCH_SMS.get(arch, ARCH_SMS["sm_80"])
        plans = {nt: gemv_tile_plan(kind, n, k, nt, sms, asym) for nt in (1, 2)}
        for key, nt in (("warps", 1), ("warps2", 2)):
            plan = plans[nt]
            if plan.get("warps"):
                gemv[key] = plan["warps"]
                continue
            table = (GEMV_WARP_BUDGET_RT4_ASYM if asym else GEMV_WARP_BUDGET_RT4) if plan else {}
            budget = table.get((kind, nt)) or (GEMV_WARP_BUDGET_ASYM if asym else {}).get(
                (kind, nt), GEMV_WARP_BUDGET[(kind, nt)])  # fmt: skip
            rows = plan["rt"] * plan["wr"] if plan else gemv_rows(gemv, nt)
            gemv[key] = gemv_auto_warps(budget, n, rows, sms,
                                        gemv_chunks(kind, k) if k is not None else None, GEMV_MAX_WARPS.get((kind, nt)))
        if gemv.get("xs") and gemv["warps"] < GEMV_XS_MIN_WARPS.get(kind, 0) and not plans[1]:
            gemv["xs"] &= ~1
        for nt, (rt_key, wr_key, ks_key) in ((1, ("rt", "wr", None)), (2, ("rt2", "wr2", "ks2"))):
            plan = plans[nt]
            if not plan:
                continue
            gemv["xs"] = gemv.get("xs", 0) | (1 << (nt - 1))  # measured with the activations staged
            gemv[rt_key] = plan["rt"]
            if plan["wr"] > 1:
                gemv[wr_key] = plan["wr"]
            if ks_key and plan.get("ks"):
                gemv[ks_key] = plan["ks"]
        if plans[1] and not plans[2]:  # "rt" is the M > 8 kernel's too unless "rt2" says otherwise
            gemv["rt2"] = DEFAULT_GEMV_KIND[kind]["rt"]
        gemv["pdl"] = gemv_pdl_bits(kind, n, sms)
    if kind in GEMV_XS_HOPPER_ONLY and arch not in ("sm_90", "sm_90a"):
        gemv["xs"] = gemv.get("xs", 0) & ~1
    small_max = (DQ16_SMALL_MAX.get(kind, DEFAULT_SMALL_MAX) if gemm.get("dq16")
                 else WS_SMALL_MAX.get(kind, DEFAULT_SMALL_MAX) if gemm.get("ws") else DEFAULT_SMALL_MAX)  # fmt: skip
    small = dict(DEFAULT_GEMM_SMALL[kind])
    if n is not None and kind in SMALL_BM128_MIN_TILES:
        sms = ARCH_SMS.get(arch, ARCH_SMS["sm_80"])
        tiles = -(-n // 128) * -(-DEFAULT_SMALL_MAX // small["bn"])
        if tiles >= SMALL_BM128_MIN_TILES[kind] * sms and gemm_valid(kind, dict(small, bm=128), asym, arch):
            small["bm"] = 128
    return {"gemv": gemv, "gemm_small": small, "gemm": gemm, "small_max": small_max}


def gemv_pdl_bits(kind: str, n: int | None, sms: int) -> int:
    """The decode GEMV's "pdl" bits for a layer of ``n`` output rows (GEMV_PDL_KIND): not for the M > 8 kernel of a
    layer with at least 4 x SMs 16-row tiles (its 4-row-tile blocks were slower launched early)."""
    bits = GEMV_PDL_KIND[kind]
    if n is not None and -(-n // 16) >= 4 * sms:
        bits &= ~2
    return bits


def gemv_tile_plan(kind: str, n: int, k: int | None, nt: int, sms: int, asym: bool = False) -> dict[str, int]:
    """The untuned decode GEMV's row tiling for the ``nt`` token-tile kernel of an ``n`` x ``k`` layer, where it is not
    the default 2 row tiles a warp: {} or {"rt", "wr", and "ks", "warps" where fixed}.

    Every block reads the activations of its K range once, for all the row tiles it owns, so the activation bytes a
    layer moves through L2 are (blocks x K x M x 2) and at M = 9..16 exceed the 2:4 + int4 weight's (~2.7x with 2 row
    tiles a block). Fitted on the H100 decode run bench/results/cuda_kernels_decode_rowgroups.md (steady state, every
    kind, 5 LLM shapes, M = 1..16):

    - at least 4 x SMs row tiles (blocks of 4 still cover every SM; 11008 / 14336 rows on an H100): 4 row tiles a
      warp, for the M > 8 kernel of every kind and for both kernels of 2:4 + int4 (14336 x 4096, M = 16: 2:4 + int4 25.1 -> 17.9 us, 2:4 fp16 31.2 -> 25.1,
      int4 27.5 -> 23.8, int8 34.5 -> 26.6; M = 8, 2:4 + int4: 16.4 -> 13.4). Warps from the registers of those
      kernels (GEMV_WARP_BUDGET_RT4). Not 2:4 fp16 / int4 / int8 at M <= 8: there it was 0.9-1.2x either way.
    - the M > 8 kernel of a layer whose blocks of 4 row tiles fill about half the SMs (4096 rows on an H100) and whose
      K leaves every warp >= 5 chunks of a 2-way split (K = 11008 / 14336, not 4096): 16 warps, 4 row tiles a warp (2:4
      + int4: 2 row groups of 2, its 4-row-tile kernel spills at 16 warps), split in 2 (4096 x 14336, M = 16: 2:4 + int4
      22.1 -> 18.4 us, 2:4 fp16 28.5 -> 25.9, int4 23.5 -> 20.9, int8 30.5 -> 26.9). Not with zero points on 2:4 + int4
      (its 16-warp kernel spills 176 bytes)."""
    n_rt = -(-n // 16)
    if n_rt >= 4 * sms and (nt == 2 or kind == "sp4"):
        return {"rt": 4, "wr": 1}
    if nt == 2 and k is not None and not (kind == "sp4" and asym):
        blocks = 2 * -(-n_rt // 4)
        rt, wr = (2, 2) if kind in ("sp4", "sp8") else (4, 1)  # their 4-row-tile kernels spill at 16 warps
        if 0.9 * sms <= blocks <= sms and gemv_chunks(kind, k) >= 5 * 2 * (16 // wr):
            return {"rt": rt, "wr": wr, "ks": 2, "warps": 16}
    return {}


def gemv_auto_warps(budget: int, n: int, rt: int, sms: int, nck: int | None = None, max_warps: int | None = None) -> int:
    """Warps a block of the untuned decode GEMV for ``n`` output rows: the choice (16, 8, 4) that runs the grid of
    row-tile blocks in the fewest waves (an SM holds ``budget`` // warps blocks, ``budget`` = the warps its registers
    hold: GEMV_WARP_BUDGET), the most warps among those. One block per SM (4096 rows: 128 blocks on 132 SMs) gets 16
    warps; 11008 rows (344 blocks) of 2:4 + int4 at M <= 8 (budget 20) get 4 warps, so five blocks of an SM run the grid
    in one wave where 16-warp blocks would need three. With ``nck``
    (16-byte chunks a row tile holds, :func:`gemv_chunks`) no more warps than chunks (the smallest choice at least):
    a warp without a chunk of K would only wait for the others. ``max_warps`` caps the choice (register spills)."""
    gx = -(-(-(-n // 16)) // rt)
    choices = [w for w in GEMV_WARP_CHOICES if (nck is None or w <= nck) and (max_warps is None or w <= max_warps)]
    choices = choices or [GEMV_WARP_CHOICES[-1]]
    best = None
    for w in choices:
        waves = -(-gx // (sms * max(1, budget // w)))
        if best is None or waves < best[0]:
            best = (waves, w)
    return best[1]


def gemm_smem_bytes(kind: str, c: dict[str, int], asym: bool) -> int:
    """Dynamic shared memory of a GEMM instantiation (mirrors GemmCfg / WgCfg in sparsec_mma.cuh)."""
    bm, bn, bk, st = c["bm"], c["bn"], c["bk"], c["stages"]
    if c.get("ws"):
        return ws_layout(c)["smem"]
    if c.get("wgmma"):
        steps = bk // 32
        stage = _pad_to(bn * bk * 2 + (bm // 16) * steps * 512 + (bm // 16) * (steps // 2) * 128, 1024)
        return 1024 + max(st * stage, bn * (bm + 8) * 2)
    steps = bk // 32
    bps = 512 // _STEPS_PER_CHUNK[kind]  # a 16-byte chunk a lane per row tile holds this many k32 steps
    a = (bm // 16) * steps * bps
    meta = (bm // 16) * (steps // 2) * 128 if kind not in DENSE_KINDS else 0
    slots = 0 if kind == "sp16" else (2 * steps if kind in DENSE_KINDS else steps)  # quantization groups a tile spans
    sc = (bm // 16) * slots * 32 * (2 if asym else 1)
    x = bn * bk * 2
    return max(st * (a + meta + sc + x), bn * (bm + 8) * 2)


def ws_config_error(kind: str, c: dict[str, int], arch: str = "sm_90a") -> str | None:
    """Why a warp-specialized (``"ws": 1``) GEMM config cannot be built for ``arch``, or None when it can."""
    if kind != "sp16":
        return f"the warp-specialized TMA GEMM exists for sp16 only, not {kind}"
    if arch != "sm_90a":
        return (f"the warp-specialized TMA GEMM needs sm_90a (wgmma.mma_async.sp, TMA, setmaxnreg); {arch} has none "
                "of them")  # fmt: skip
    bm, bn, bk = c["bm"], c["bn"], c["bk"]
    if bm not in (128, 256) or bn not in (128, 256) or bk not in (64, 128):
        return f"ws tile {bm}x{bn}x{bk}: BM and BN must be 128 or 256, BK 64 or 128"
    if bm * bn > 128 * 256:
        return f"ws tile {bm}x{bn}: more than 128 accumulator registers per consumer thread"
    if c.get("wm") != bm // 64 or c.get("wn") != 1 or c["stages"] < 2 or c["stages"] > 16:
        return "ws config: wm must be BM/64 (m64 slabs), wn 1, 2..16 stages"
    if c.get("persistent", 0) not in (0, 1) or c.get("cluster", 1) not in (1, 2):
        return "ws config: persistent must be 0 or 1, cluster 1 or 2"
    if c.get("wmap", 0) not in (0, 1):
        return "ws config: wmap (weights by TMA tensor map) must be 0 or 1"
    if c.get("persistent") and c.get("cluster", 1) != 1:
        return "ws config: a cluster of 2 is for one tile per CTA (not persistent)"
    tail = c.get("tail", 0)
    if tail not in (0,) + WS_TAIL_SPLITS:
        return f"ws config: tail (the most splits of a last-wave tile) must be 0 or one of {WS_TAIL_SPLITS}"
    if tail and (c.get("persistent") or c.get("cluster", 1) != 1 or c["stages"] > 15):
        return "ws config: the tail split is for one tile per CTA without a cluster, at most 15 stages"
    if K_ALIGN % bk:
        return f"BK {bk} does not divide the weight's K alignment {K_ALIGN}"
    smem = gemm_smem_bytes(kind, c, False)
    if smem > SMEM_LIMIT[arch]:
        return f"ws config needs {smem} bytes of shared memory, {arch} has {SMEM_LIMIT[arch]}"
    return None


# "dq16" pays for its conversion pass and second launch from this many weight entries (n x k) on: H100, interleaved
# A/B at M = 256 / 1024 / 2048 (bench/results/cuda_gemm_v2_{sp4,dq4}_dq16_sizes.md): 2:4 + int4 352x256 0.94x,
# 512x512 1.17x; int4 512x512 0.94x-0.97x, 1024x1024 1.2x-1.5x (the dequantize path vs the int4 mma GEMM)
DQ16_MIN_PARAMS = {"sp4": 1 << 18, "dq4": 1 << 20, "dq8": 1 << 20, "sp8": 1 << 18}  # dq8, sp8: int4's, not measured


def dq16_ok(kind: str, arch: str, n: int | None = None, k: int | None = None) -> bool:
    """int4 / int8 kinds at large M on sm_90a: dequantized per call into fp16 fragments (2:4 + int4 -> the 2:4 fp16
    layout, dense int4 / int8 -> dense fp16 A fragments), then the warp-specialized ``wgmma`` GEMM (DQ16_GEMM[kind]) instead of the
    int4 ``mma.sp`` / ``mma`` GEMM (``"dq16": 1`` in the large-GEMM config); for a layer shape (``n`` x ``k``) only
    from DQ16_MIN_PARAMS weight entries on."""
    if kind not in DQ16_MIN_PARAMS or arch != "sm_90a":
        return False
    return n is None or k is None or n * k >= DQ16_MIN_PARAMS[kind]


def gemm_valid(kind: str, c: dict[str, int], asym: bool = False, arch: str = "sm_90a") -> bool:
    bm, bn, bk, wm, wn = c["bm"], c["bn"], c["bk"], c["wm"], c["wn"]
    if c.get("dq16") and not dq16_ok(kind, arch):
        return False
    if c.get("wmap") and not (c.get("ws") or c.get("dq16")):  # weights by tensor map: the warp-specialized GEMMs only
        return False
    if c.get("ws"):  # Hopper warp-specialized TMA + wgmma.sp path
        return ws_config_error(kind, c, arch) is None
    if c.get("wgmma"):  # Hopper wgmma.sp path: sp16 only, sm_90a only, one warp per 16 weight rows, BK = 64
        if kind != "sp16" or arch != "sm_90a" or bk != 64 or bn not in (128, 256) or bm % 64 or bm > 128:
            return False
        if wm != bm // 16 or wn != 1 or c["stages"] < 3:
            return False
        return gemm_smem_bytes(kind, c, asym) <= SMEM_LIMIT[arch]
    if bk % 64 or (kind == "sp4" and bk % 128) or K_ALIGN % bk:
        return False
    if bm % (16 * wm) or bn % (8 * wn) or c["stages"] < 2:
        return False
    mt, nt = bm // wm // 16, bn // wn // 8
    # accumulator registers per thread: <= 128 of 255 with 8 warps, <= 64 of 128 with 16 warps (launch bounds)
    if mt * nt * 4 > (160 if wm * wn <= 8 else 64):
        return False
    return gemm_smem_bytes(kind, c, asym) <= SMEM_LIMIT.get(arch, 99 * 1024)


def search_space(kind: str, arch: str = "sm_90a") -> dict[str, list[dict[str, int]]]:
    """Candidate configs per path (searched independently: the paths serve disjoint token counts)."""
    gemv = [{"warps": w, "rt": r, "u": u, "ks": ks} for w in (4, 8, 16) for r in (1, 2, 4) for u in (1, 2)
            for ks in GEMV_KS]  # fmt: skip
    # row groups sharing staged activations (the M > 8 winners of 4096-row long-K 2:4 + int4 layers) and 4-row-tile
    # warps with staged activations (gemv_tile_plan's); the tuner picks each token-tile kernel separately
    gemv += [{"warps": w, "rt": r, "wr": wr, "u": 1, "ks": ks, "xs": 3} for w, r, wr, ks in
             ((16, 2, 2, 1), (16, 2, 2, 2), (8, 2, 2, 1), (16, 1, 4, 1), (8, 4, 1, 1), (4, 4, 1, 1), (16, 4, 1, 2))]
    large, small = [], []
    layouts = ((2, 2), (2, 4), (4, 2), (4, 4), (2, 8))
    for bm in (64, 128, 256):
        for bn in (64, 128, 256):
            for bk in (64, 128):
                for wm, wn in layouts:
                    for st in (3, 4):
                        c = {"bm": bm, "bn": bn, "bk": bk, "wm": wm, "wn": wn, "stages": st, "group": 16}
                        if not gemm_valid(kind, c, arch=arch):
                            continue
                        if bm >= 128 and bn >= 128 and bk == 128:
                            large.append(c)
                        if bm <= 128 and bn <= 64 and wm * wn <= 8:
                            small.append(dict(c, group=8))
    if dq16_ok(kind, arch):  # int4 kinds on sm_90a: the int4 mma.sp / mma tiles against the dequantize + wgmma path
        large = [dict(c, dq16=0) for c in large] + [dict(DEFAULT_GEMM[kind], dq16=1)]
    if kind == "sp16" and arch == "sm_90a":  # Hopper wgmma.sp GEMM (large M)
        for bm, bn, bk in ((128, 256, 64), (128, 128, 64), (64, 256, 64)):
            for st in (3, 4, 5, 6, 8):
                c = {"bm": bm, "bn": bn, "bk": bk, "wm": bm // 16, "wn": 1, "stages": st, "group": 16, "wgmma": 1}
                if gemm_valid(kind, c, arch=arch):
                    large.append(c)
        large += ws_search_space(kind, arch)
    return {"gemv": gemv, "gemm": large, "gemm_small": small}


def ws_search_space(kind: str, arch: str = "sm_90a") -> list[dict[str, int]]:
    """The warp-specialized TMA GEMM's candidates (``"ws": 1``; sp16 on sm_90a only)."""
    out = []
    if kind != "sp16" or arch != "sm_90a":
        return out
    one_tile = ((128, 256, 64, (4, 5)), (256, 128, 64, (4, 5, 6)), (128, 128, 64, (6, 8)), (128, 128, 128, (3, 4)),
                (256, 128, 128, (3,)), (128, 256, 128, (2,)))  # fmt: skip
    persistent = ((128, 256, 64, (3,)), (256, 128, 64, (4,)), (128, 128, 64, (6, 7)), (128, 128, 128, (3,)),
                  (256, 128, 128, (2,)))  # fmt: skip
    cluster = ((128, 256, 64, (4, 5)), (256, 128, 64, (5, 6)), (128, 128, 128, (4,)), (256, 128, 128, (3,)))
    tail = [({"tail": t}, ((256, 128, 128, (3,)),)) for t in WS_TAIL_SPLITS]  # the one-tile winner, split tails
    tail.append(({"tail": 4}, ((128, 256, 64, (4,)), (256, 128, 64, (5,)))))
    # weights and metadata by one TMA box each a stage ("wmap") instead of 2 x BM/16 cp.async.bulk copies
    wmap = [({"wmap": 1}, ((256, 128, 128, (3,)), (256, 128, 64, (4, 6)), (128, 256, 64, (4,)))),
            ({"wmap": 1, "tail": 4}, ((256, 128, 128, (3,)), (256, 128, 64, (5,)))),
            ({"wmap": 1, "cluster": 2, "group": 8}, ((256, 128, 128, (3,)), (128, 256, 64, (4,))))]
    for extra, tiles in (({}, one_tile), ({"persistent": 1}, persistent), ({"cluster": 2, "group": 8}, cluster), *tail,
                         *wmap):
        for bm, bn, bk, stages in tiles:
            for st in stages:
                c = {"bm": bm, "bn": bn, "bk": bk, "wm": bm // 64, "wn": 1, "stages": st, "group": 16, "ws": 1, **extra}
                if gemm_valid(kind, c, arch=arch):
                    out.append(c)
    return out


# Warp-specialized configs run on an H100 at the LLM shapes (M = 2048 / 8192) and the smoke / tail shapes, every one
# correct, none hung (bench/bench_gemm_v2.py, 2026-12-05: bench/results/cuda_gemm_v2*.json). `sparsec tune` searches
# these like any other config; a ws config added later stays "unverified" (searched only with --include-unverified,
# each in a killable subprocess) until a device run has checked it.
VERIFIED_WS = frozenset({
    "ws 128x256x64 s4", "ws 128x256x64 s5", "ws 256x128x64 s4", "ws 256x128x64 s5", "ws 256x128x64 s6",
    "ws 128x128x64 s6", "ws 128x128x64 s8", "ws 128x128x128 s3", "ws 128x128x128 s4", "ws 256x128x128 s3",
    "ws 128x256x128 s2", "wsp 128x256x64 s3", "wsp 256x128x64 s4", "wsp 128x128x64 s6", "wsp 128x128x64 s7",
    "wsp 128x128x128 s3", "wsp 256x128x128 s2", "wsc2 128x256x64 s4", "wsc2 128x256x64 s5", "wsc2 256x128x64 s5",
    "wsc2 256x128x64 s6", "wsc2 128x128x128 s4", "wsc2 256x128x128 s3",
    # tail split (2026-12-05, later: bench/results/cuda_gemm_v2_tail_verify.md, 89/89 checks incl. split shapes)
    "wst2 256x128x128 s3", "wst4 256x128x128 s3", "wst8 256x128x128 s3", "wst4 128x256x64 s4", "wst4 256x128x64 s5",
    # weights by tensor map (2026-12-05, later: bench/results/cuda_gemm_v2_wmap_verify.md, 141/141 checks incl. tails)
    "wsm 256x128x128 s3", "wsm 256x128x64 s4", "wsm 256x128x64 s6", "wsm 128x256x64 s4", "wst4m 256x128x128 s3",
    "wst4m 256x128x64 s5", "wsc2m 256x128x128 s3", "wsc2m 128x256x64 s4",
})  # fmt: skip


def ws_tag(c: dict[str, int]) -> str:
    """``ws`` / ``wsp`` (persistent) / ``wsc2`` (cluster of 2) / ``wst4`` (tail split in up to 4), ``m`` appended for
    weights by tensor map (``"wmap": 1``), tile and stages: the key of :data:`VERIFIED_WS`."""
    fam = ("wsp" if c.get("persistent") else f"wsc{c['cluster']}" if c.get("cluster", 1) > 1
           else f"wst{c['tail']}" if c.get("tail") else "ws")  # fmt: skip
    return f"{fam}{'m' if c.get('wmap') else ''} {c['bm']}x{c['bn']}x{c['bk']} s{c['stages']}"


# ----------------------------------------------------------------------------------------------------- ws tail split
# "tail": N (one tile per CTA): when the output tiles fill the GPU's SMs a whole number of times plus a small last
# wave, that wave's tiles are each split along K into up to N units that run on the otherwise idle SMs; the last unit
# of a tile to finish sums the fp32 partials in split order (sparsec_mma.cuh gemm_ws_body TAIL). E.g. 11008x4096 at
# M = 2048 with 256x128 tiles: 688 tiles on 132 SMs = 5 waves + 28 tiles, run as 6 waves without the split and as
# 5 waves + 112 quarter-tiles with it.
WS_TAIL_SPLITS = (2, 4, 8)
WS_TAIL_MIN_KT = 4  # k tiles a split unit keeps at least (pipeline start-up and the partial's round trip)


def ws_tail_plan(tiles: int, sms: int, kt: int, max_split: int) -> tuple[int, int]:
    """(whole tiles, splits per last-wave tile) of a tail-split launch (the launcher's ws_tail_plan, same formula):
    the ``tiles % sms`` tiles of the last wave are split in s = min(max_split, sms // tail, kt // WS_TAIL_MIN_KT)
    units, when s >= 2; otherwise no split (every tile whole)."""
    tail = tiles % sms if sms > 0 else 0
    if max_split < 2 or tail == 0:
        return tiles, 1
    s = min(max_split, sms // tail, kt // WS_TAIL_MIN_KT)
    return (tiles - tail, s) if s >= 2 else (tiles, 1)


_WS_TAIL_CXX = r"""
// cuda_sparse.ws_tail_plan (the warp-specialized GEMM's tail split), same formula
void ws_tail_plan(int64_t tiles, int sms, int kt, int max_split, int64_t* n_dp, int* n_split) {
  const int64_t tail = sms > 0 ? tiles % sms : 0;
  *n_dp = tiles;
  *n_split = 1;
  if (max_split < 2 || tail == 0) return;
  const int64_t s = std::min<int64_t>(std::min<int64_t>(max_split, sms / tail), kt / @MIN_KT@);
  if (s < 2) return;
  *n_dp = tiles - tail;
  *n_split = static_cast<int>(s);
}
""".replace("@MIN_KT@", str(WS_TAIL_MIN_KT))


# ----------------------------------------------------------------------------------------------------- ws layout
WS_CONSUMERS = 2  # consumer warpgroups of the warp-specialized GEMM (+ 1 producer warpgroup)
WS_THREADS = 128 * (WS_CONSUMERS + 1)
# CUtensorMap enums (cuda.h): CU_TENSOR_MAP_DATA_TYPE_FLOAT16, CU_TENSOR_MAP_SWIZZLE_128B,
# CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE (zeros)
TMA_FLOAT16, TMA_SWIZZLE_128B, TMA_L2_256B, TMA_INTERLEAVE_NONE, TMA_OOB_ZERO = 6, 3, 3, 0, 0
# CU_TENSOR_MAP_DATA_TYPE_UINT64, CU_TENSOR_MAP_SWIZZLE_NONE: the weight maps ("wmap") move opaque 8-byte words
TMA_UINT64, TMA_SWIZZLE_NONE = 4, 0


def ws_layout(c: dict[str, int]) -> dict[str, int]:
    """Shared-memory layout of the warp-specialized GEMM (mirrors WsCfg in sparsec_mma.cuh): per stage the X tile
    (BK/64 swizzle atoms of [BN][64] fp16, atom h at h*BN*128), then the A fragments of the BM/16 row tiles, then
    their metadata; stages 1024-byte aligned; mbarriers in the first 256 bytes, data aligned up to 1024; the epilogue's
    C[BN][BM+8] reuses the stages, or follows them for a persistent config (``"persistent": 1``)."""
    bm, bn, bk, st = c["bm"], c["bn"], c["bk"], c["stages"]
    steps = bk // 32
    x = bn * bk * 2
    dense = bool(c.get("dense"))  # dense fp16 A (two k16 fragments per k32 step), no metadata (WsCfg DENSE)
    a = (bm // 16) * steps * (1024 if dense else 512)
    meta = 0 if dense else (bm // 16) * (steps // 2) * 128
    stage = _pad_to(x + a + meta, 1024)
    cbytes = bn * (bm + 8) * 2
    pers = bool(c.get("persistent"))
    data = st * stage + cbytes if pers else max(st * stage, cbytes)
    return {"x_bytes": x, "a_bytes": a, "meta_bytes": meta, "tx_bytes": x + a + meta, "stage_bytes": stage,
            "atoms": bk // 64, "atom_bytes": bn * 128, "a_copy_bytes": steps * (1024 if dense else 512),
            "meta_copy_bytes": 0 if dense else (steps // 2) * 128,
            "c_bytes": cbytes, "c_offset": st * stage if pers else 0, "bar_bytes": 256, "smem": 256 + 1024 + data}  # fmt: skip


def tma_x_params(c: dict[str, int], m: int, k: int) -> dict[str, Any]:
    """cuTensorMapEncodeTiled arguments for the activations X[m, k] (fp16, row-major) of the warp-specialized GEMM:
    dimension 0 = k (contiguous), dimension 1 = tokens; one box = one 128-byte-swizzle atom [BN tokens][64 k]
    (inner box extent 64 x 2 B = the 128-byte swizzle span), or its BN/2-row half with a cluster of 2 (each CTA
    multicasts its half into both). The launcher renders the same constants."""
    if k <= 0 or m <= 0 or (k * 2) % 16:
        raise ValueError(f"X[{m}, {k}]: TMA needs K * 2 bytes to be a positive multiple of 16")
    cl = c.get("cluster", 1)
    return {"data_type": TMA_FLOAT16, "rank": 2, "global_dim": (k, m), "global_strides": (k * 2,),
            "box_dim": (64, c["bn"] // cl), "element_strides": (1, 1), "interleave": TMA_INTERLEAVE_NONE,
            "swizzle": TMA_SWIZZLE_128B, "l2_promotion": TMA_L2_256B, "oob_fill": TMA_OOB_ZERO,
            "boxes_per_stage": c["bk"] // 64, "box_bytes": 64 * 2 * c["bn"] // cl, "cluster": cl}  # fmt: skip


def ws_a_step(c: dict[str, int]) -> int:
    """Bytes of one row tile's A fragments per k32 step in the prepared weight: 512 (2:4 fp16: 16 rows x 16 kept
    values), 1024 (dense fp16 A of the int4 prefill, ``"dense": 1``: two k16 units)."""
    return 1024 if c.get("dense") else 512


# the launcher's arithmetic of tma_w_params (rendered into every host source; a test compiles it and compares)
_WS_WMAP_CXX = r"""
// rank-3 TMA map of a "wmap" GEMM's weight (meta 0: A fragments, astep bytes per row tile and k32 step) or its
// metadata (meta 1: 128 bytes per row tile and k64): dims {8-byte words, units, row tiles}, byte strides of dims 1, 2
void ws_w_map(int64_t n_rt, int64_t T, int bm, int bk, int astep, int meta, uint64_t dim[3], uint64_t stride[2],
              unsigned box[3]) {
  const int64_t unit = meta ? 128 : 512, per_rt = meta ? T / 2 * 128 : T * astep;
  dim[0] = static_cast<uint64_t>(unit / 8);
  dim[1] = static_cast<uint64_t>(per_rt / unit);
  dim[2] = static_cast<uint64_t>(n_rt);
  stride[0] = static_cast<uint64_t>(unit);
  stride[1] = static_cast<uint64_t>(per_rt);
  box[0] = static_cast<unsigned>(unit / 8);
  box[1] = static_cast<unsigned>(meta ? bk / 64 : bk / 32 * astep / 512);
  box[2] = static_cast<unsigned>(bm / 16);
}
"""


def tma_w_params(c: dict[str, int], n_rt: int, t: int) -> dict[str, dict[str, Any]]:
    """cuTensorMapEncodeTiled arguments of the weight maps of a ``"wmap": 1`` config (gemm_ws_body WMAP): the
    prepared weight of ``n_rt`` row tiles and ``t`` k32 steps (per row tile ``t`` x ws_a_step bytes, contiguous) as
    the rank-3 tensor {64 words of 8 bytes, 512-byte units, row tiles}, one box = a stage's A fragments of the BM/16
    row tiles; the metadata (per row tile t / 2 x 128 bytes) as {16 words, 128-byte units, row tiles}. Dimension 0
    first; strides in bytes of dimensions 1 and 2. The launcher renders the same arithmetic."""
    step = ws_a_step(c)
    units = (c["bk"] // 32) * step // 512
    common = {"data_type": TMA_UINT64, "rank": 3, "element_strides": (1, 1, 1), "interleave": TMA_INTERLEAVE_NONE,
              "swizzle": TMA_SWIZZLE_NONE, "l2_promotion": TMA_L2_256B, "oob_fill": TMA_OOB_ZERO}
    out = {"a": dict(common, global_dim=(64, t * step // 512, n_rt), global_strides=(512, t * step),
                     box_dim=(64, units, c["bm"] // 16), unit_bytes=512, units_per_stage=units)}
    if not c.get("dense"):
        out["meta"] = dict(common, global_dim=(16, t // 2, n_rt), global_strides=(128, (t // 2) * 128),
                           box_dim=(16, c["bk"] // 64, c["bm"] // 16), unit_bytes=128, units_per_stage=c["bk"] // 64)
    return out


def gemm_threads(c: dict[str, int]) -> int:
    return WS_THREADS if c.get("ws") else c["wm"] * c["wn"] * 32


# ----------------------------------------------------------------------------------------------------- variants
@dataclass(frozen=True)
class Variant:
    """One exported kernel function: kind, zero points, group size and the three paths' configs."""

    kind: str
    asym: bool = False
    gs: int = 0  # quantization group size (in the values' own columns: compressed for sp4); 0 for sp16
    gemv: tuple = tuple(sorted(DEFAULT_GEMV.items()))
    gemm_small: tuple = ()
    gemm: tuple = ()
    small_max: int = DEFAULT_SMALL_MAX

    @classmethod
    def make(cls, kind: str, asym: bool, gs: int, config: dict[str, Any]) -> "Variant":
        cfg = default_config(kind)
        for k in ("gemv", "gemm_small", "gemm"):
            if k in config:
                # a config naming its tile does not inherit the default's kernel family (a tuned mma.sp tile
                # must not become warp-specialized because the sm_90a default is); missing keys come from the default
                base = cfg[k]
                if "bm" in config[k]:
                    base = {kk: vv for kk, vv in base.items() if kk not in _FAMILY_KEYS}
                cfg[k] = dict(base, **config[k])
        return cls(kind, bool(asym), int(gs), tuple(sorted(cfg["gemv"].items())), tuple(sorted(cfg["gemm_small"].items())),
                   tuple(sorted(cfg["gemm"].items())), int(config.get("small_max", DEFAULT_SMALL_MAX)))  # fmt: skip

    def cfg(self, path: str) -> dict[str, int]:
        return dict(getattr(self, path))

    def config_dict(self) -> dict[str, Any]:
        return {"gemv": self.cfg("gemv"), "gemm_small": self.cfg("gemm_small"), "gemm": self.cfg("gemm"),
                "small_max": self.small_max}  # fmt: skip

    @property
    def ident(self) -> str:
        h = hashlib.sha1(json.dumps(self.config_dict(), sort_keys=True).encode()).hexdigest()[:10]
        return f"{self.kind}{'a' if self.asym else 's' if self.kind != 'sp16' else ''}_g{self.gs}_{h}"

    @property
    def func_name(self) -> str:
        return f"sparsec_cuda_{self.ident}"

    def dq16_cfg(self) -> dict[str, int]:
        """The warp-specialized GEMM of the "dq16" path: DQ16_GEMM[kind] (weights by tensor map), with bulk copies
        instead when the large-GEMM config says ``"wmap": 0``."""
        c = DQ16_GEMM[self.kind]
        w = self.cfg("gemm").get("wmap")
        return c if w is None else dict(c, wmap=int(w))

    def kernel_names(self) -> dict[str, str]:
        """The kernels of the four paths; a tail-split ws config (``"tail"``) has two large-GEMM kernels: "gemm" for
        launches whose tiles are all whole (the same instantiation as without "tail") and "gemm_tail" for the split."""
        og = gemv_one_group(self.kind, self.gs, self.cfg("gemv"))
        gl = self.cfg("gemm")
        names = {p: _inst_name(self.kind, self.asym, p, self.cfg(p if p != "gemv1" and p != "gemv2" else "gemv"), nt, og)
                 for p, nt in (("gemv1", 1), ("gemv2", 2), ("gemm_small", 0))}  # fmt: skip
        names["gemm"], tail = _gemm_names(self.kind, self.asym, "gemm", gl)
        if tail:
            names["gemm_tail"] = tail
        if gl.get("dq16"):  # the converter and the fp16 kernels it feeds (whole tiles, tail split)
            bits = 8 if self.kind in INT8_KINDS else 4  # one converter per code width serves its 2:4 and dense kinds
            names["dq16_convert"] = f"sparsec_int{bits}{'a' if self.asym else 's'}_to_fp16"
            names["dq16_gemm"], tail = _gemm_names("sp16", False, "gemm", self.dq16_cfg())
            if tail:
                names["dq16_gemm_tail"] = tail
        return names


def _gemm_names(kind: str, asym: bool, path: str, c: dict[str, int]) -> tuple[str, str | None]:
    """(whole-tile kernel, tail-split kernel or None) of a GEMM config: a tail-split ws config (``"tail"``) is two
    instantiations, the one without "tail" serving the launches where nothing is split."""
    whole = _inst_name(kind, asym, path, {k: v for k, v in c.items() if k != "tail"}, 0)
    return whole, (_inst_name(kind, asym, path, c, 0) if c.get("tail") else None)


def gemv_one_group(kind: str, gs: int, c: dict[str, int] | None = None) -> bool:
    """The quantized decode GEMV's "one group per chunk" kernel (scales applied after the MMAs): every chunk
    (:func:`gemv_chunk_cols` of its own columns) lies in one quantization group, and the config's "og" allows it."""
    return kind in ("sp4", "dq4", "dq8", "sp8") and gs > 0 and gs % gemv_chunk_cols(kind) == 0 and bool((c or {}).get("og", 1))


def gemv_chunk_cols(kind: str) -> int:
    """The value columns (its own: compressed for 2:4) one 16-byte GEMV chunk of a lane spans: 64 (32 for int8)."""
    return _STEPS_PER_CHUNK[kind] * (32 if kind in DENSE_KINDS else 16)  # k32 steps x the value columns of one


def _inst_name(kind: str, asym: bool, path: str, c: dict[str, int], nt: int, og: bool = False) -> str:
    a = "a" if asym else "s"
    if path.startswith("gemv"):
        pf = f"_p{c['pf']}" if c.get("pf") else ""
        st = f"_s{c['st']}" if c.get("st") else ""
        xs = "_x" if gemv_xs(c, nt) else ""
        wr = f"_g{gemv_wr(c, nt)}" if gemv_wr(c, nt) > 1 else ""
        return (f"sparsec_gemv_{kind}{a}_nt{nt}_w{gemv_warps(c, nt)}_r{gemv_rt(c, nt)}{wr}_u{c['u']}{pf}{st}{xs}"
                f"{'_og' if og else ''}")
    wg = "_wgmma" if c.get("wgmma") else ""
    if c.get("ws"):
        wg = ("_ws" + ("p" if c.get("persistent") else "") + (f"c{c['cluster']}" if c.get("cluster", 1) > 1 else "")
              + ("d" if c.get("dense") else "") + ("t" if c.get("tail") else "")
              + ("m" if c.get("wmap") else ""))  # fmt: skip
    return f"sparsec_gemm{wg}_{kind}{a}_{c['bm']}x{c['bn']}x{c['bk']}_w{c['wm']}x{c['wn']}_s{c['stages']}"


def gemv_wr(c: dict[str, int], nt: int) -> int:
    """Row groups of warps a block of the ``nt`` token-tile GEMV kernel ("wr"; "wr2" for two when set)."""
    return (c.get("wr2") or c.get("wr", 1)) if nt == 2 else c.get("wr", 1)


def gemv_rt(c: dict[str, int], nt: int) -> int:
    """16-row tiles a warp of the ``nt`` token-tile GEMV kernel owns ("rt"; "rt2" for two when set)."""
    return (c.get("rt2") or c["rt"]) if nt == 2 else c["rt"]


def gemv_ks(c: dict[str, int], nt: int) -> int:
    """The K split setting of the ``nt`` token-tile GEMV kernel: "ks" (0 = automatic, which is 1 for two token tiles);
    "ks2" replaces it for two when set."""
    return (c.get("ks2") or c.get("ks", 1)) if nt == 2 else c.get("ks", 1)


GEMV_SHARED_KEYS = ("u", "og", "pf", "st")  # pipeline options both token-tile kernels of a config share


def gemv_merge(c1: dict[str, int], c2: dict[str, int]) -> dict[str, int]:
    """One GEMV config running the M <= 8 kernel of ``c1`` and the M > 8 kernel of ``c2`` (each token-tile kernel is
    its own instantiation, grid and split; the shared pipeline options are ``c1``'s: pick ``c2`` among configs with
    the same GEMV_SHARED_KEYS)."""
    g = {key: v for key, v in c1.items() if key not in ("warps2", "rt2", "wr2", "ks2")}
    g.update(warps2=gemv_warps(c2, 2), rt2=gemv_rt(c2, 2), wr2=gemv_wr(c2, 2), ks2=max(1, gemv_ks(c2, 2)),
             xs=(c1.get("xs", 0) & 1) | (c2.get("xs", 0) & 2))
    return g


def gemv_rows(c: dict[str, int], nt: int) -> int:
    """16-row tiles a block of the ``nt`` token-tile GEMV kernel owns: rt per row group x row groups."""
    return gemv_rt(c, nt) * gemv_wr(c, nt)


def gemv_kgroups(c: dict[str, int], nt: int) -> int:
    """Warps that split a block's K range in the ``nt`` token-tile GEMV kernel (warps / row groups: WK of gemv_body)."""
    return gemv_warps(c, nt) // gemv_wr(c, nt)


def gemv_xs(c: dict[str, int], nt: int) -> bool:
    """Activations staged in shared memory ("xs", bit nt - 1) for the ``nt`` token-tile kernel: a register-pipeline
    option, off under the cp.async ring ("st")."""
    return bool(c.get("xs", 0) & (1 << (nt - 1))) and not c.get("st")


def gemv_warps(c: dict[str, int], nt: int) -> int:
    """Warps a block of the GEMV kernel for ``nt`` token tiles (``warps2`` for two when set)."""
    return c["warps2"] if nt == 2 and c.get("warps2") else c["warps"]


def gemv_ring_stage_bytes(kind: str, rt: int, asym: bool, og: bool) -> int:
    """Bytes of one warp's stage of the cp.async ring (sparsec_mma.cuh GemvRing::kStageBytes)."""
    ch = _STEPS_PER_CHUNK[kind]
    mp = (ch + 1) // 2 if kind not in DENSE_KINDS else 0
    ns = (1 if og else (2 * ch if kind in DENSE_KINDS else ch)) if kind != "sp16" else 0
    nz = ns if asym else 0
    return (4 * rt + rt * (mp + ns + nz)) * 128


def _gemv_smem(c: dict[str, int], nt: int, kind: str = "sp16", asym: bool = False, gs: int = 0) -> int:
    red = gemv_warps(c, nt) * gemv_rt(c, nt) * nt * 4 * 32 * 4
    st = c.get("st", 0)
    if not st:
        if gemv_xs(c, nt):  # per k-group two buffers of U chunks x NT*8 rows x (CH k32 steps + 16 bytes) (XTile)
            return red + gemv_kgroups(c, nt) * 2 * c["u"] * nt * 8 * (_STEPS_PER_CHUNK[kind] * 64 + 16)
        return red
    return red + gemv_warps(c, nt) * st * gemv_ring_stage_bytes(kind, gemv_rt(c, nt), asym, gemv_one_group(kind, gs, c))


# ----------------------------------------------------------------------------------------------------- split-K GEMV
# Host-side index math of the decode GEMV (mirrored by sparsec_mma.cuh split_range and the launcher's gemv_auto_ks;
# tests/test_cuda_kernels.py compiles both and compares them with these).
_STEPS_PER_CHUNK = {"sp16": 1, "sp4": 4, "dq4": 2, "dq8": 1, "sp8": 2}


def split_range(n: int, parts: int, i: int) -> tuple[int, int]:
    """Part ``i`` of ``n`` items in ``parts`` contiguous balanced ranges (sparsec_mma.cuh ``split_range``)."""
    return (n * i) // parts, (n * (i + 1)) // parts


def gemv_chunks(kind: str, k: int) -> int:
    """16-byte weight chunks per row tile holding real k32 steps (``NCK`` of gemv_body)."""
    ch = _STEPS_PER_CHUNK[kind]
    return (k // 32 + ch - 1) // ch


def gemv_auto_ks(grid_x: int, warps: int, nck: int, sms: int, kgroups: int = 0) -> int:
    """The split count of a ``"ks": 0`` config: enough blocks for GEMV_WARPS_PER_SM warps per SM (one block per row
    tile leaves e.g. 128 blocks x 8 warps for a 4096-row weight on 132 SMs), at most 8, no split leaving a warp fewer
    than GEMV_MIN_CHUNKS chunks, rounded down to a power of two (the split counts measured). Only for M <= 8 (one n8
    token tile): at M = 9..16 splitting was slower than the whole-K kernel at nearly every measured point (the
    launcher and :func:`gemv_launch` use 1 there). ``kgroups``: the warps that split a block's K range (warps / "wr";
    0 = every warp)."""
    want = -(-(sms * GEMV_WARPS_PER_SM) // max(1, grid_x * warps))
    ks = max(1, min(want, 8, nck // max(1, GEMV_MIN_CHUNKS * (kgroups or warps))))
    return 1 << (ks.bit_length() - 1)


_GEMV_KS_CXX = r"""
// cuda_sparse.gemv_auto_ks (the split count of a "ks": 0 GEMV config), same formula
int gemv_auto_ks(int64_t grid_x, int warps, int nck, int sms, int kgroups = 0) {
  const int64_t per = std::max<int64_t>(1, grid_x * warps);
  const int64_t want = (static_cast<int64_t>(sms) * @WARPS_PER_SM@ + per - 1) / per;
  const int64_t cap = nck / std::max<int64_t>(1, static_cast<int64_t>(@MIN_CHUNKS@) * (kgroups > 0 ? kgroups : warps));
  const int64_t ks = std::max<int64_t>(1, std::min<int64_t>(std::min<int64_t>(want, 8), cap));
  int p = 1;
  while (2 * p <= ks) p *= 2;
  return p;
}
""".replace("@WARPS_PER_SM@", str(GEMV_WARPS_PER_SM)).replace("@MIN_CHUNKS@", str(GEMV_MIN_CHUNKS))


def gemv_launch(kind: str, n: int, k: int, m: int, cfg: dict[str, int], sms: int) -> dict[str, int]:
    """Grid, split count and workspace of one decode GEMV launch (the launcher's arithmetic)."""
    n_rt = (n + 15) // 16
    nt = 1 if m <= 8 else 2
    rows = gemv_rows(cfg, nt)
    gx = (n_rt + rows - 1) // rows
    nck = gemv_chunks(kind, k)
    ks = gemv_ks(cfg, nt) or (gemv_auto_ks(gx, cfg["warps"], nck, sms, gemv_kgroups(cfg, 1)) if m <= 8 else 1)
    nv = rows * nt * 4
    return {"grid_x": gx, "ks": ks, "nt": nt, "threads": gemv_warps(cfg, nt) * 32, "nck": nck,
            "ws_floats": gx * ks * nv * 32 if ks > 1 else 0, "counters": gx if ks > 1 else 0}  # fmt: skip


def gemv_valid(c: dict[str, int]) -> bool:
    return (c.get("warps") in (1, 2, 4, 8, 16, 32) and c.get("rt", 0) >= 1 and c.get("u", 0) >= 1
            and 0 <= c.get("ks", 1) <= GEMV_MAX_KS and 0 <= c.get("pf", 0) <= GEMV_MAX_PF
            and 0 <= c.get("ks2", 0) <= GEMV_MAX_KS and c.get("rt2", 0) >= 0
            and c.get("warps2", 0) in (0, 1, 2, 4, 8, 16, 32) and c.get("og", 1) in (0, 1)
            and 0 <= c.get("st", 0) <= GEMV_MAX_ST and c.get("xs", 0) in (0, 1, 2, 3)
            and c.get("wr", 1) in (1, 2, 4, 8) and c.get("wr2", 0) in (0, 1, 2, 4, 8) and c.get("pdl", 0) in (0, 1, 2, 3)
            and all(gemv_wr(c, nt) == 1 or (gemv_xs(c, nt) and gemv_warps(c, nt) % gemv_wr(c, nt) == 0
                                            and gemv_kgroups(c, nt) <= 15) for nt in (1, 2)))  # fmt: skip


# ----------------------------------------------------------------------------------------------------- layouts
def _pad_to(x: int, m: int) -> int:
    return (x + m - 1) // m * m


def _afrag_index() -> tuple[np.ndarray, np.ndarray]:
    """(row, col) inside a 16x16 A tile of element e (0..7) of lane l: the m16n8k16 / m16n8k32-sparse A layout."""
    lane = np.arange(32)[:, None]
    e = np.arange(8)[None, :]
    g, q = lane // 4, lane % 4
    row = g + 8 * ((e >> 1) & 1)
    col = 2 * q + (e & 1) + 8 * (e >> 2)
    return row, col


# nibble position of fragment element e inside the 32-bit code word: (e0,e2,e4,e6) -> nibbles 0..3, odd -> 4..7
_NIB = np.array([0, 4, 1, 5, 2, 6, 3, 7])


def _frag_tiles(v: np.ndarray, cols_per_step: int) -> np.ndarray:
    """[Np, Kv] -> [Np/16, steps, 32, 8] (fragment order; ``cols_per_step`` = 16: one 16x16 tile per step)."""
    np_, kv = v.shape
    steps = kv // cols_per_step
    t = v.reshape(np_ // 16, 16, steps, cols_per_step).transpose(0, 2, 1, 3)
    row, col = _afrag_index()
    return t[:, :, row, col]


def _pack_nibbles(codes8: np.ndarray) -> np.ndarray:
    """[..., 8] uint8 codes (< 16) -> [...] uint32 words in _NIB order."""
    c = codes8.astype(np.uint32)
    return np.bitwise_or.reduce(c << (4 * _NIB.astype(np.uint32)), axis=-1).astype(np.uint32)


def _meta_words(idx: np.ndarray, np_: int, kp: int) -> np.ndarray:
    """Positions ``idx`` [Np, Kp/4, 2] (ascending, distinct) -> metadata [Np/16, Kp/64, 32] uint32.

    Lane (g, q) of pair p holds step 2p + q//2 (sparsity selector q//2), chunks 4*(q%2) .. +3 of that k32 step, rows
    g (bits 0-15) and g+8 (bits 16-31), 4 bits per chunk (first kept position in the low 2 bits)."""
    steps = kp // 32
    ix = idx.reshape(np_ // 16, 16, steps // 2, 2, 8, 2).astype(np.uint32)  # [rt, r, p, odd, chunk, i]
    lane = np.arange(32)
    g, q = lane // 4, lane % 4
    rr, cl, ii = np.arange(2), np.arange(4), np.arange(2)
    l_row = g[:, None, None, None] + 8 * rr[None, :, None, None]
    l_odd = (q >> 1)[:, None, None, None]
    l_chunk = 4 * (q & 1)[:, None, None, None] + cl[None, None, :, None]
    l_i = ii[None, None, None, :]
    v = ix[:, l_row, :, l_odd, l_chunk, l_i]  # advanced dims first: [32, 2, 4, 2, rt, p]
    shift = (16 * rr[:, None, None] + 4 * cl[None, :, None] + 2 * ii[None, None, :]).astype(np.uint32)
    words = np.bitwise_or.reduce((v << shift[None, :, :, :, None, None]).reshape(32, 16, np_ // 16, steps // 2), axis=1)
    return np.ascontiguousarray(words.transpose(1, 2, 0)).astype(np.uint32)


def _scale_pairs(grid: np.ndarray, np_: int, gp: int) -> np.ndarray:
    """[N, G] float -> [Np/16, Gp, 8] uint32 with half2 (row g, row g+8), padded with zeros."""
    s = np.zeros((np_, gp), dtype=np.float16)
    s[: grid.shape[0], : grid.shape[1]] = grid.astype(np.float16)
    s = s.reshape(np_ // 16, 2, 8, gp).transpose(0, 3, 2, 1)  # [rt, grp, g, hi]
    return np.ascontiguousarray(s).view(np.uint32).reshape(np_ // 16, gp, 8)


def _nm24_meta(w: NMSparse, np_: int, kp: int) -> np.ndarray:
    """The 2:4 metadata of ``w`` in mma.sp order, (Np, Kp/32) uint32 (padding: positions 0, 1 of zero values)."""
    n, k = w.shape
    idx = np.zeros((np_, kp // 4, 2), dtype=np.uint8)
    idx[..., 1] = 1
    idx[:n, : k // 4] = w.indices()
    return _meta_words(idx, np_, kp).reshape(np_, kp // 32)


def prepare_sp16(w: NMSparse) -> list[np.ndarray]:
    """2:4 NMSparse with dense values -> [values (Np, Kp/2) fp16 in A-fragment order, meta (Np, Kp/32) uint32]."""
    n, k = w.shape
    np_, kp = _pad_to(n, 16), _pad_to(k, K_ALIGN)
    vals = np.zeros((np_, kp // 2), dtype=np.float16)
    vals[:n, : k // 2] = w.values.materialize().astype(np.float16)
    frag = _frag_tiles(vals, 16)  # [rt, T, 32, 8]
    return [np.ascontiguousarray(frag).reshape(np_, kp // 2), _nm24_meta(w, np_, kp)]


def _gq_codes_scales(gq: GroupQuant) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Dense code grid [N, C] (removed groups: code = zero point, scale 0), scales [N, G], zero points [N, G]."""
    codes = gq.codes().astype(np.uint8)
    scales = gq.scale_grid()
    zeros = gq.zero_grid()
    gm = gq.group_mask()
    if gm is not None:  # removed groups: scale 0 makes them exact zeros whatever the code
        scales = np.where(gm, scales, 0.0)
    return codes, scales, zeros


def _quant_arrays(gq: GroupQuant, np_: int, cols: int) -> list[np.ndarray]:
    """[code words, scales (, zeros as 1024+z when asymmetric)] of group-quantized values padded to ``np_`` x ``cols``
    (the values' own columns: compressed for 2:4). Per lane, one uint4 holds the fragments of consecutive 16-column
    units: int4, 4 units, word w = unit 4u + w (8 nibbles in _NIB order); int8, 2 units, words 2h, 2h+1 = unit 2u + h
    (element e in byte e % 4 of word 2h + e // 4). A unit is a k32 step of a 2:4 kind, a k16 unit of a dense one."""
    n = gq.shape[0]
    codes, scales, zeros = _gq_codes_scales(gq)
    c = np.zeros((np_, cols), dtype=np.uint8)
    c[:n, : codes.shape[1]] = codes
    frag = _frag_tiles(c, 16)  # [rt, units, 32, 8]
    rt, units = frag.shape[:2]
    if gq.bits == 8:
        words = frag.reshape(rt, units // 2, 2, 32, 8).transpose(0, 1, 3, 2, 4)  # [rt, units/2, 32, unit h, 8 bytes]
        words = np.ascontiguousarray(words).view(np.uint32)
    else:
        words = _pack_nibbles(frag).reshape(rt, units // 4, 4, 32).transpose(0, 1, 3, 2)  # [rt, units/4, 32, 4]
    gp = -(-cols // gq.group_size)
    out = [np.ascontiguousarray(words).reshape(np_, -1), _scale_pairs(scales, np_, gp)]
    if not gq.symmetric:
        out.append(_scale_pairs(zeros + 1024.0, np_, gp))
    return out


def _prepare_nm24_quant(w: NMSparse) -> list[np.ndarray]:
    n, k = w.shape
    np_, kp = _pad_to(n, 16), _pad_to(k, K_ALIGN)
    codes, *tail = _quant_arrays(w.values, np_, kp // 2)
    return [codes, _nm24_meta(w, np_, kp), *tail]


def _prepare_dense_quant(gq: GroupQuant) -> list[np.ndarray]:
    n, k = gq.shape
    return _quant_arrays(gq, _pad_to(n, 16), _pad_to(k, K_ALIGN))


def prepare_sp4(w: NMSparse) -> list[np.ndarray]:
    """2:4 NMSparse of int4 GroupQuant -> [codes (Np, Kp/16) u32: word s of a lane's uint4 = step 4u+s, meta (Np, Kp/32)
    u32, scales (Np/16, Gp, 8) u32 (, zeros (Np/16, Gp, 8) u32 as 1024+z when asymmetric)]."""
    return _prepare_nm24_quant(w)


def prepare_sp8(w: NMSparse) -> list[np.ndarray]:
    """2:4 NMSparse of int8 GroupQuant -> [codes (Np, Kp/8) u32: per lane and pair of k32 steps 16 byte codes, words
    2s, 2s+1 = step 2u+s's fragment (element e in byte e % 4 of word 2s + e // 4), meta (Np, Kp/32) u32, scales
    (Np/16, Gp, 8) u32 (, zeros (Np/16, Gp, 8) u32 as 1024+z when asymmetric)]."""
    return _prepare_nm24_quant(w)


def prepare_dq4(gq: GroupQuant) -> list[np.ndarray]:
    """Dense int4 GroupQuant -> [codes (Np, Kp/8) u32, scales (Np/16, Gp, 8) u32 (, zeros as 1024+z)]."""
    return _prepare_dense_quant(gq)


def prepare_dq8(gq: GroupQuant) -> list[np.ndarray]:
    """Dense int8 GroupQuant -> [codes (Np, Kp/4) u32: per lane and k32 step 16 byte codes, words 2h, 2h+1 = k16 unit
    h's fragment, element e in byte e % 4 of word e // 4; scales (Np/16, Gp, 8) u32 (, zeros as 1024+z when
    asymmetric)]."""
    return _prepare_dense_quant(gq)


def prepare(kind: str, weight) -> list[np.ndarray]:
    return {"sp16": prepare_sp16, "sp4": prepare_sp4, "dq4": prepare_dq4, "dq8": prepare_dq8, "sp8": prepare_sp8}[kind](weight)


def param_specs(kind: str, n: int, k: int, gs: int, asym: bool) -> list[WeightParam]:
    np_, kp = _pad_to(n, 16), _pad_to(k, K_ALIGN)
    if kind == "sp16":
        return [WeightParam("values", (np_, kp // 2), "float16"), WeightParam("meta", (np_, kp // 32), "uint32")]
    cols = kp if kind in DENSE_KINDS else kp // 2
    gp = -(-cols // gs)
    p = []
    if kind in ("sp4", "sp8"):
        p = [WeightParam("codes", (np_, kp // (8 if kind == "sp8" else 16)), "uint32"),
             WeightParam("meta", (np_, kp // 32), "uint32")]  # fmt: skip
    else:
        p = [WeightParam("codes", (np_, kp // (4 if kind == "dq8" else 8)), "uint32")]
    p.append(WeightParam("scales", (np_ // 16, gp, 8), "uint32"))
    if asym:
        p.append(WeightParam("zeros", (np_ // 16, gp, 8), "uint32"))
    return p


# ----------------------------------------------------------------------------------------------------- decoder
def _h2(words: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    f = np.ascontiguousarray(words.astype(np.uint32)).view(np.float16).astype(np.float32)
    return f[..., 0::2], f[..., 1::2]


def decode_layout(kind: str, arrays: list[np.ndarray], n: int, k: int, gs: int = 0) -> np.ndarray:
    """Rebuild the dense float32 weight [n, k] from prepared arrays, reading them the way the tensor cores do
    (PTX ISA fragment layouts for mma.m16n8k16 / mma.sp.m16n8k32, metadata of sparsity selector 0/1). Independent
    of the encoder; used by the tests."""
    np_, kp = _pad_to(n, 16), _pad_to(k, K_ALIGN)
    nrt, steps = np_ // 16, kp // 32
    lane = np.arange(32)
    g, q = lane // 4, lane % 4

    def frag_elems_from_words(words):  # [..., 32 lanes] u32 -> [..., 32, 8] codes, e = 2i (+1) from nibble i (i+4)
        w = words.astype(np.uint32)[..., None]
        i = np.arange(8)
        nib = np.where(i % 2 == 0, i // 2, i // 2 + 4)
        return ((w >> (4 * nib).astype(np.uint32)) & 0xF).astype(np.float32)

    def dequant(codes, scales_w, zeros_w, grp):  # codes [rt, units, 32, 8]; grp [units]
        s_lo, s_hi = _h2(scales_w)  # [rt, G, 8] each
        if zeros_w is None:
            z_lo = z_hi = np.full_like(s_lo, 1152.0 if kind in INT8_KINDS else 1032.0)
        else:
            z_lo, z_hi = _h2(zeros_w)
        e = np.arange(8)
        hi = ((e >> 1) & 1).astype(bool)  # a2,a3,a6,a7: row g+8
        s = np.where(hi, s_hi[:, grp][:, :, g][..., None], s_lo[:, grp][:, :, g][..., None])
        z = np.where(hi, z_hi[:, grp][:, :, g][..., None], z_lo[:, grp][:, :, g][..., None])
        return ((codes + 1024.0) - z) * s

    def byte_elems(words):  # [..., 2] u32 -> [..., 8] codes, element e = byte e % 4 of word e // 4
        w = words.astype(np.uint32)[..., np.arange(8) // 4]
        return ((w >> (8 * (np.arange(8) % 4)).astype(np.uint32)) & 0xFF).astype(np.float32)

    if kind in ("sp16", "sp4", "sp8"):
        if kind == "sp16":
            vals = arrays[0].reshape(nrt, steps, 32, 8).astype(np.float32)
            meta = arrays[1].reshape(nrt, steps // 2, 32)
        else:
            if kind == "sp8":  # lane's uint4 of step pair u: words 2s, 2s+1 = step 2u+s
                words = arrays[0].reshape(nrt, steps // 2, 32, 2, 2).transpose(0, 1, 3, 2, 4).reshape(nrt, steps, 32, 2)
                codes = byte_elems(words)
            else:
                words = arrays[0].reshape(nrt, steps // 4, 32, 4).transpose(0, 1, 3, 2).reshape(nrt, steps, 32)
                codes = frag_elems_from_words(words)
            grp = (np.arange(steps) * 16) // gs
            vals = dequant(codes, arrays[2], arrays[3] if len(arrays) > 3 else None, grp)
            meta = arrays[1].reshape(nrt, steps // 2, 32)
        w = np.zeros((np_, kp), dtype=np.float32)
        for t in range(steps):
            sel = t & 1
            for ln in range(32):
                gg, qq = ln >> 2, ln & 3
                # compressed col c of the 16x16 tile belongs to chunk c//2 (dense cols 4*(c//2)..+3); its position
                # comes from the metadata word of lane (g, q') with q' = 2*sel + (chunk >= 4) (selector pairs)
                for e in range(8):
                    r = gg + 8 * ((e >> 1) & 1)
                    c = 2 * qq + (e & 1) + 8 * (e >> 2)
                    chunk = c // 2
                    src_lane = gg * 4 + 2 * sel + (chunk >= 4)
                    mw = meta[:, t // 2, src_lane]  # [rt]
                    shift = 16 * (r >= 8) + 4 * (chunk % 4) + 2 * (c % 2)
                    pos = (mw >> np.uint32(shift)) & 3
                    col = t * 32 + 4 * chunk + pos.astype(np.int64)
                    rows = np.arange(nrt) * 16 + r
                    w[rows, col] += vals[:, t, ln, e]
        return w[:n, :k]
    units = kp // 16
    if kind == "dq8":  # lane's uint4 of k32 step t: words 2h, 2h+1 = unit 2t+h, element e = byte e % 4 of word e // 4
        words = arrays[0].reshape(nrt, kp // 32, 32, 2, 2).transpose(0, 1, 3, 2, 4).reshape(nrt, units, 32, 2)
        codes = byte_elems(words)
    else:  # dq4
        words = arrays[0].reshape(nrt, kp // 64, 32, 4).transpose(0, 1, 3, 2).reshape(nrt, units, 32)
        codes = frag_elems_from_words(words)
    grp = (np.arange(units) * 16) // gs
    vals = dequant(codes, arrays[1], arrays[2] if len(arrays) > 2 else None, grp)  # [rt, units, 32, 8]
    row, col = _afrag_index()
    w = np.zeros((nrt, 16, units, 16), dtype=np.float32)
    w[:, row, :, col] = vals.transpose(2, 3, 0, 1)  # advanced indices first: [32, 8, rt, units]
    return w.reshape(np_, kp)[:n, :k]


# ----------------------------------------------------------------------------------------------------- sources
DQ16_CONVERT_THREADS = 256


def _ws_entries(kind: str, asym: bool, path: str, c: dict[str, int]) -> dict[str, str]:
    """The extern "C" entries of a warp-specialized config: its kernel, and for a tail-split config also the
    whole-tile instantiation (which the launcher uses when nothing is split)."""
    cl = c.get("cluster", 1)
    dims = f"__cluster_dims__({cl}, 1, 1) " if cl > 1 else ""
    out = {}
    whole, tail_name = _gemm_names(kind, asym, path, c)
    for name, tail in ((whole, False), (tail_name, True)):
        if name is None:
            continue
        out[name] = (
            f'extern "C" __global__ void {dims}__launch_bounds__({gemm_threads(c)}, 1) {name}'
            "(const __grid_constant__ CUtensorMap tmap, const __grid_constant__ CUtensorMap wmap, "
            "const __grid_constant__ CUtensorMap mmap, const uint4* __restrict__ Wv, const uint32_t* "
            "__restrict__ Wm, half* __restrict__ Y, int M, int N, int K, int T, int GROUP, int n_dp, int n_split, "
            "float* __restrict__ Ws, unsigned* __restrict__ Cnt) {\n"
            f"  sparsec::gemm_ws_body<{c['bm']}, {c['bn']}, {c['bk']}, {c['stages']}, "
            f"{'true' if c.get('persistent') else 'false'}, {cl}, {'true' if tail else 'false'}, "
            f"{'true' if c.get('dense') else 'false'}, {'true' if c.get('wmap') else 'false'}>"
            "(&tmap, &wmap, &mmap, Wv, Wm, Y, M, N, K, T, GROUP, n_dp, n_split, Ws, Cnt);\n}\n"
        )
    return out


def render_device_source(variants: list[Variant]) -> str:
    """The .cu file: the header plus one extern "C" __global__ entry per distinct instantiation."""
    seen: dict[str, str] = {}
    for v in variants:
        kenum = _KIND_ENUM[v.kind]
        a = "true" if v.asym else "false"
        for nt in (1, 2):
            c = v.cfg("gemv")
            og = gemv_one_group(v.kind, v.gs, c)
            name = _inst_name(v.kind, v.asym, "gemv", c, nt, og)
            threads = gemv_warps(c, nt) * 32
            seen[name] = (
                f'extern "C" __global__ void __launch_bounds__({threads}) {name}(const half* __restrict__ X, '
                "const uint4* __restrict__ Wv, const uint32_t* __restrict__ Wm, const uint32_t* __restrict__ Sc, "
                "const uint32_t* __restrict__ Zb, half* __restrict__ Y, float* __restrict__ Ws, "
                "unsigned* __restrict__ Cnt, int M, int N, int K, int T, int G, int GS) {\n"
                f"  sparsec::gemv_body<sparsec::{kenum}, {nt}, {gemv_warps(c, nt)}, {gemv_rt(c, nt)}, {c['u']}, {a}, {c.get('pf', 0)}, {'true' if og else 'false'}, {c.get('st', 0)}, "
                f"{'true' if gemv_xs(c, nt) else 'false'}, {gemv_wr(c, nt)}>"
                "(X, Wv, Wm, Sc, Zb, Y, Ws, Cnt, M, N, K, T, G, GS);\n}\n"
            )
        for path in ("gemm_small", "gemm"):
            c = v.cfg(path)
            name = _inst_name(v.kind, v.asym, path, c, 0)
            threads = gemm_threads(c)
            if c.get("ws"):
                seen.update(_ws_entries(v.kind, v.asym, path, c))
                continue
            if path == "gemm" and c.get("dq16"):  # int4/int8 -> fp16 converter + the warp-specialized GEMM it feeds
                conv = v.kernel_names()["dq16_convert"]
                bits = 8 if v.kind in INT8_KINDS else 4
                seen[conv] = (
                    f'extern "C" __global__ void __launch_bounds__({DQ16_CONVERT_THREADS}) {conv}'
                    "(const uint4* __restrict__ Wq, const uint32_t* __restrict__ Sc, const uint32_t* __restrict__ Zb, "
                    "uint4* __restrict__ Wv, int n_rt, int U, int G, int GS) {\n"
                    f"  sparsec::codes_to_fp16_body<{bits}, {'true' if v.asym else 'false'}>(Wq, Sc, Zb, Wv, n_rt, U, G, GS);\n}}\n"
                )
                seen.update(_ws_entries("sp16", False, "gemm", v.dq16_cfg()))
            if c.get("wgmma"):
                seen[name] = (
                    f'extern "C" __global__ void __launch_bounds__({threads}, 1) {name}(const half* __restrict__ X, '
                    "const uint4* __restrict__ Wv, const uint32_t* __restrict__ Wm, const uint32_t* __restrict__ Sc, "
                    "const uint32_t* __restrict__ Zb, half* __restrict__ Y, int M, int N, int K, int T, int G, int GS, "
                    "int GROUP) {\n"
                    f"  sparsec::gemm_wgmma_body<{c['bm']}, {c['bn']}, {c['bk']}, {c['stages']}>(X, Wv, Wm, Y, M, N, K, T, GROUP);\n}}\n"
                )
                continue
            seen[name] = (
                f'extern "C" __global__ void __launch_bounds__({threads}, 1) {name}(const half* __restrict__ X, '
                "const uint4* __restrict__ Wv, const uint32_t* __restrict__ Wm, const uint32_t* __restrict__ Sc, "
                "const uint32_t* __restrict__ Zb, half* __restrict__ Y, int M, int N, int K, int T, int G, int GS, "
                "int GROUP) {\n"
                f"  sparsec::gemm_body<sparsec::{kenum}, {c['bm']}, {c['bn']}, {c['bk']}, {c['wm']}, {c['wn']}, "
                f"{c['stages']}, {a}>(X, Wv, Wm, Sc, Zb, Y, M, N, K, T, G, GS, GROUP);\n}}\n"
            )
    body = "\n".join(seen[k] for k in sorted(seen))
    return f'// generated by sparsec.backends.kernels.cuda_sparse\n#include "sparsec_mma.cuh"\n\n{body}'


_HOST_PRELUDE = r"""// generated by sparsec.backends.kernels.cuda_sparse: TVM FFI wrappers launching the precompiled kernels
#include <dlfcn.h>
#include <tvm/ffi/container/tensor.h>
#include <tvm/ffi/error.h>
#include <tvm/ffi/extra/c_env_api.h>
#include <tvm/ffi/function.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <mutex>
#include <string>
#include <unordered_map>

extern "C" const unsigned char @FATSYM@[];
asm(".section .rodata\n.balign 64\n.globl @FATSYM@\n.hidden @FATSYM@\n@FATSYM@:\n.incbin \"@FATBIN@\"\n.byte 0\n.previous\n");

namespace {
using tvm::ffi::TensorView;
typedef int CUresult;
typedef int CUdevice;
typedef struct CUctx_st* CUcontext;
typedef struct CUmod_st* CUmodule;
typedef struct CUfunc_st* CUfunction;
typedef struct CUstream_st* CUstream;
typedef unsigned long long CUdeviceptr;
struct alignas(128) TmaMap {  // CUtensorMap (cuda.h): 128 opaque bytes
  uint64_t opaque[16];
};

struct Driver {
  CUresult (*Init)(unsigned) = nullptr;
  CUresult (*DeviceGet)(CUdevice*, int) = nullptr;
  CUresult (*DeviceGetAttribute)(int*, int, CUdevice) = nullptr;
  CUresult (*PrimaryCtxRetain)(CUcontext*, CUdevice) = nullptr;
  CUresult (*CtxGetCurrent)(CUcontext*) = nullptr;
  CUresult (*CtxSetCurrent)(CUcontext) = nullptr;
  CUresult (*ModuleLoadData)(CUmodule*, const void*) = nullptr;
  CUresult (*ModuleGetFunction)(CUfunction*, CUmodule, const char*) = nullptr;
  CUresult (*FuncSetAttribute)(CUfunction, int, int) = nullptr;
  CUresult (*LaunchKernel)(CUfunction, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned, CUstream,
                           void**, void**) = nullptr;
  CUresult (*GetErrorString)(CUresult, const char**) = nullptr;
  // optional (CUDA 12+ drivers): only the warp-specialized TMA kernels need it; they fail loudly without it
  CUresult (*TensorMapEncodeTiled)(TmaMap*, int, unsigned, void*, const uint64_t*, const uint64_t*, const unsigned*,
                                   const unsigned*, int, int, int, int) = nullptr;
  // split-K GEMV workspace (resolved by name; a missing one fails the split-K launch loudly)
  CUresult (*MemAlloc)(CUdeviceptr*, size_t) = nullptr;
  CUresult (*MemsetD32Async)(CUdeviceptr, unsigned, size_t, CUstream) = nullptr;
  CUresult (*StreamIsCapturing)(CUstream, int*) = nullptr;
  // optional (CUDA 12+ drivers): the decode GEMV's programmatic dependent launch (sm_90); without it, plain launches
  CUresult (*LaunchKernelEx)(const void*, CUfunction, void**, void**) = nullptr;
  std::string error;
};

// CUlaunchAttribute / CUlaunchConfig (cuda.h, CUDA 12+), for cuLaunchKernelEx
struct LaunchAttr {
  int id;
  char pad[4];
  union {
    char bytes[64];
    int value;
  } v;
};
struct LaunchConfig {
  unsigned grid_x, grid_y, grid_z, block_x, block_y, block_z, smem;
  CUstream stream;
  LaunchAttr* attrs;
  unsigned n_attrs;
};

Driver& driver() {
  static Driver d = [] {
    Driver r;
    void* h = dlopen("libcuda.so.1", RTLD_NOW | RTLD_GLOBAL);
    if (!h) h = dlopen("libcuda.so", RTLD_NOW | RTLD_GLOBAL);
    if (!h) {
      r.error = "sparsec CUDA kernels: cannot load the CUDA driver (libcuda.so.1)";
      return r;
    }
#define SPARSEC_SYM(field, name) r.field = reinterpret_cast<decltype(r.field)>(dlsym(h, name))
    SPARSEC_SYM(Init, "cuInit");
    SPARSEC_SYM(DeviceGet, "cuDeviceGet");
    SPARSEC_SYM(DeviceGetAttribute, "cuDeviceGetAttribute");
    SPARSEC_SYM(PrimaryCtxRetain, "cuDevicePrimaryCtxRetain");
    SPARSEC_SYM(CtxGetCurrent, "cuCtxGetCurrent");
    SPARSEC_SYM(CtxSetCurrent, "cuCtxSetCurrent");
    SPARSEC_SYM(ModuleLoadData, "cuModuleLoadData");
    SPARSEC_SYM(ModuleGetFunction, "cuModuleGetFunction");
    SPARSEC_SYM(FuncSetAttribute, "cuFuncSetAttribute");
    SPARSEC_SYM(LaunchKernel, "cuLaunchKernel");
    SPARSEC_SYM(GetErrorString, "cuGetErrorString");
    SPARSEC_SYM(TensorMapEncodeTiled, "cuTensorMapEncodeTiled");
    SPARSEC_SYM(MemAlloc, "cuMemAlloc_v2");
    SPARSEC_SYM(MemsetD32Async, "cuMemsetD32Async");
    SPARSEC_SYM(StreamIsCapturing, "cuStreamIsCapturing");
    SPARSEC_SYM(LaunchKernelEx, "cuLaunchKernelEx");
#undef SPARSEC_SYM
    if (!r.Init || !r.DeviceGet || !r.DeviceGetAttribute || !r.PrimaryCtxRetain || !r.CtxGetCurrent ||
        !r.CtxSetCurrent || !r.ModuleLoadData || !r.ModuleGetFunction || !r.FuncSetAttribute || !r.LaunchKernel) {
      r.error = "sparsec CUDA kernels: the CUDA driver lacks a needed entry point";
      return r;
    }
    if (r.Init(0) != 0) r.error = "sparsec CUDA kernels: cuInit failed";
    return r;
  }();
  return d;
}

void check(CUresult rc, const char* what) {
  if (rc == 0) return;
  const char* msg = "unknown error";
  if (driver().GetErrorString) driver().GetErrorString(rc, &msg);
  TVM_FFI_THROW(RuntimeError) << "sparsec CUDA kernels: " << what << " failed: " << msg << " (" << rc << ")";
}

struct Kernel {
  const char* name;
  int smem;
  // warp-specialized TMA GEMM (sparsec_mma.cuh gemm_ws_body): a per-call CUtensorMap of the activations X[M, K]
  // (cuda_sparse.tma_x_params: box {box_k, box_rows}, data type / swizzle / L2 promotion / OOB fill enums)
  int ws = 0;
  unsigned box_k = 0, box_rows = 0;
  int tma_dtype = 0, tma_swizzle = 0, tma_l2 = 0, tma_oob = 0;
  int persistent = 0;  // one CTA per SM looping over the output tiles
  int cluster = 1;     // CTAs per cluster along the weight rows (__cluster_dims__ of the kernel; they share X tiles)
  int tail = 0;        // most splits of a last-wave tile along K (ws_tail_plan); 0: no split
  int bk = 0;          // k per stage (the tail split counts k tiles)
  const char* tail_name = nullptr;  // the tail-split instantiation (name: the same kernel for whole tiles only)
  int wmap = 0;  // weights by rank-3 TMA maps (cuda_sparse.tma_w_params): A bytes per row tile and k32 step; 0: off
};

// A device attribute (cuDeviceGetAttribute), cached per device and attribute.
int device_attribute(int device_id, int attr) {
  static std::mutex mu;
  static std::unordered_map<long long, int> cache;
  std::lock_guard<std::mutex> lock(mu);
  const long long key = (static_cast<long long>(device_id) << 32) | static_cast<unsigned>(attr);
  auto it = cache.find(key);
  if (it != cache.end()) return it->second;
  CUdevice dev;
  int v = 0;
  check(driver().DeviceGet(&dev, device_id), "cuDeviceGet");
  check(driver().DeviceGetAttribute(&v, attr, dev), "cuDeviceGetAttribute");
  cache[key] = v;
  return v;
}

int sm_count(int device_id) {
  const int n = device_attribute(device_id, 16 /*CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT*/);
  if (n <= 0) TVM_FFI_THROW(RuntimeError) << "sparsec CUDA kernels: the GPU reports " << n << " multiprocessors";
  return n;
}

// Whether a decode GEMV whose config asks for it is launched with programmatic stream serialization (PDL): a device
// of compute capability 9+, a driver with cuLaunchKernelEx, and SPARSEC_CUDA_PDL not "0" (the A/B switch of
// bench/decode_pdl.py, read at every launch).
bool gemv_pdl(int device_id) {
  const char* env = std::getenv("SPARSEC_CUDA_PDL");
  if (driver().LaunchKernelEx == nullptr || (env && std::string(env) == "0")) return false;
  return device_attribute(device_id, 75 /*CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR*/) >= 9;
}

@GEMV_KS@
@KIND_TABLE@
@WS_TAIL@
// Split-K workspace per (device, stream), shared by the decode GEMV's split and the GEMM's tail split: counters
// (zeroed once here; every launch leaves them 0) then the fp32 partial tiles. Grown on demand; an outgrown buffer is
// kept (a captured CUDA graph may still point at it). Nothing can be allocated while the stream is being captured
// into a CUDA graph: a call that would need a (bigger) buffer then runs without the split (gemv_workspace), so warm
// a stream up before capturing on it to get the split paths into the graph.
struct SplitWs {
  CUdeviceptr base = 0;
  size_t counters = 0, floats = 0;
};

// Whether `stream` is being captured into a CUDA graph (cuStreamIsCapturing; false when the driver lacks it).
bool stream_capturing(CUstream stream) {
  int capturing = 0;
  Driver& d = driver();
  return d.StreamIsCapturing && d.StreamIsCapturing(stream, &capturing) == 0 && capturing;
}

// A stream's buffer (split-K workspace, int4 prefill scratch): cuMemAlloc. Its callers never call it while the stream
// is being captured into a CUDA graph (stream_capturing: they launch without the buffer). `what` names the buffer.
CUdeviceptr stream_alloc(size_t bytes, const char* what) {
  Driver& d = driver();
  if (!d.MemAlloc) TVM_FFI_THROW(RuntimeError) << "sparsec CUDA kernels: the " << what << " needs cuMemAlloc_v2";
  CUdeviceptr p = 0;
  check(d.MemAlloc(&p, bytes), ("cuMemAlloc (" + std::string(what) + ")").c_str());
  return p;
}

// false (and nothing allocated) when the stream's workspace is too small and the stream is being captured: the
// caller then launches without the split
bool gemv_workspace(int device_id, CUstream stream, size_t counters, size_t floats, void** cnt, void** part) {
  static std::mutex mu;
  static std::unordered_map<int, std::unordered_map<CUstream, SplitWs>> all;
  std::lock_guard<std::mutex> lock(mu);
  SplitWs& w = all[device_id][stream];
  if (w.counters < counters || w.floats < floats) {
    if (stream_capturing(stream)) return false;
    Driver& d = driver();
    if (!d.MemsetD32Async)
      TVM_FFI_THROW(RuntimeError) << "sparsec CUDA kernels: the split-K workspace needs cuMemsetD32Async";
    const size_t nc = std::max(counters, w.counters), nf = std::max(floats, w.floats);
    const size_t cbytes = (nc * 4 + 255) / 256 * 256;
    const CUdeviceptr p = stream_alloc(cbytes + nf * 4, "split-K workspace");
    check(d.MemsetD32Async(p, 0u, cbytes / 4, stream), "cuMemsetD32Async (split-K counters)");
    w.base = p;
    w.counters = cbytes / 4;
    w.floats = nf;
  }
  *cnt = reinterpret_cast<void*>(w.base);
  *part = reinterpret_cast<void*>(w.base + (w.counters * 4));
  return true;
}

// X[M, K] fp16 row-major -> CUtensorMap (dimension 0 = k, contiguous; dimension 1 = tokens). Throws on failure.
void encode_x_map(TmaMap* tm, const void* X, int64_t M, int64_t K, const Kernel& k) {
  Driver& d = driver();
  if (!d.TensorMapEncodeTiled)
    TVM_FFI_THROW(RuntimeError) << "sparsec CUDA kernels: " << k.name
                                << " needs cuTensorMapEncodeTiled, which this CUDA driver lacks (CUDA 12+ needed)";
  const uint64_t gdim[2] = {static_cast<uint64_t>(K), static_cast<uint64_t>(M)};
  const uint64_t gstride[1] = {static_cast<uint64_t>(K) * 2};
  const unsigned box[2] = {k.box_k, k.box_rows};
  const unsigned estride[2] = {1, 1};
  check(d.TensorMapEncodeTiled(tm, k.tma_dtype, 2, const_cast<void*>(X), gdim, gstride, box, estride,
                               0 /*INTERLEAVE_NONE*/, k.tma_swizzle, k.tma_l2, k.tma_oob),
        "cuTensorMapEncodeTiled (activations of the warp-specialized GEMM)");
}

// The prepared weight (n_rt row tiles of T k32 steps, k.wmap bytes each) and its metadata (T / 2 x 128 bytes per row
// tile; none for dense A) -> the rank-3 CUtensorMaps of a "wmap" kernel (ws_w_map: cuda_sparse.tma_w_params).
void encode_w_maps(TmaMap* wm, TmaMap* mm, const void* Wv, const void* Wm, int64_t n_rt, int64_t T, int bm,
                   const Kernel& k) {
  const unsigned estride[3] = {1, 1, 1};
  for (int meta = 0; meta < (k.wmap == 512 ? 2 : 1); ++meta) {  // dense A (1024 bytes a step): no metadata
    uint64_t dim[3], stride[2];
    unsigned box[3];
    ws_w_map(n_rt, T, bm, k.bk, k.wmap, meta, dim, stride, box);
    check(driver().TensorMapEncodeTiled(meta ? mm : wm, 4 /*UINT64*/, 3, const_cast<void*>(meta ? Wm : Wv), dim, stride,
                                        box, estride, 0 /*INTERLEAVE_NONE*/, 0 /*SWIZZLE_NONE*/, k.tma_l2, k.tma_oob),
          meta ? "cuTensorMapEncodeTiled (metadata of the warp-specialized GEMM)"
               : "cuTensorMapEncodeTiled (weights of the warp-specialized GEMM)");
  }
}

// Module + functions per device (primary context), loaded on first use.
CUfunction get_function(int device_id, const Kernel& k, const char* name = nullptr) {
  if (name == nullptr) name = k.name;
  struct Dev {
    CUcontext ctx = nullptr;
    CUmodule mod = nullptr;
    std::unordered_map<const char*, CUfunction> funcs;
  };
  static std::mutex mu;
  static std::unordered_map<int, Dev> devs;
  Driver& d = driver();
  if (!d.error.empty()) TVM_FFI_THROW(RuntimeError) << d.error;
  std::lock_guard<std::mutex> lock(mu);
  Dev& dv = devs[device_id];
  if (dv.ctx == nullptr) {
    CUdevice dev;
    check(d.DeviceGet(&dev, device_id), "cuDeviceGet");
    check(d.PrimaryCtxRetain(&dv.ctx, dev), "cuDevicePrimaryCtxRetain");
  }
  CUcontext cur = nullptr;
  d.CtxGetCurrent(&cur);
  if (cur != dv.ctx) check(d.CtxSetCurrent(dv.ctx), "cuCtxSetCurrent");
  if (dv.mod == nullptr)
    check(d.ModuleLoadData(&dv.mod, @FATSYM@), "cuModuleLoadData (no kernel image for this GPU's architecture?)");
  auto f = dv.funcs.find(name);
  if (f != dv.funcs.end()) return f->second;
  CUfunction fn;
  check(d.ModuleGetFunction(&fn, dv.mod, name), "cuModuleGetFunction");
  // any dynamic size: 48 KB dynamic + the kernel's static shared memory already needs the opt-in
  if (k.smem > 0) check(d.FuncSetAttribute(fn, 8 /*MAX_DYNAMIC_SHARED_SIZE_BYTES*/, k.smem), "cuFuncSetAttribute");
  dv.funcs.emplace(name, fn);
  return fn;
}

void expect(const TensorView& t, const char* name, DLDataTypeCode code, int bits, int ndim, int device_id) {
  if (t.dtype().code != code || t.dtype().bits != bits || t.dtype().lanes != 1)
    TVM_FFI_THROW(TypeError) << "sparsec CUDA kernels: " << name << " has the wrong dtype";
  if (t.ndim() != ndim) TVM_FFI_THROW(ValueError) << "sparsec CUDA kernels: " << name << " must be " << ndim << "-D";
  if (t.device().device_type != kDLCUDA || t.device().device_id != device_id)
    TVM_FFI_THROW(ValueError) << "sparsec CUDA kernels: " << name << " is not on the input's CUDA device";
  int64_t stride = 1;
  for (int i = t.ndim() - 1; i >= 0; --i) {
    if (t.shape()[i] != 1 && t.strides()[i] != stride)
      TVM_FFI_THROW(ValueError) << "sparsec CUDA kernels: " << name << " must be contiguous";
    stride *= t.shape()[i];
  }
  if (reinterpret_cast<uintptr_t>(t.data_ptr()) % 16)
    TVM_FFI_THROW(ValueError) << "sparsec CUDA kernels: " << name << " must be 16-byte aligned";
}

struct Variant {
  int kind;  // cuda_sparse.KINDS index: 0 sp16, 1 sp4, 2 dq4, 3 dq8, 4 sp8
  bool asym;
  int gs;
  Kernel gemv1, gemv2, gemm_small, gemm;
  // threads and 16-row tiles a block of the M <= 8 / M > 8 kernel (cuda_sparse.gemv_rows); K splits of each
  // (cuda_sparse.gemv_ks; gemv_ks 0: gemv_auto_ks, gemv_ks2 0: unsplit)
  // gemv_wk: the warps splitting K in a block of the M <= 8 kernel (warps / "wr"; the automatic split's chunk floor)
  int gemv_threads, gemv_threads2, gemv_rows, gemv_rows2, gemv_ks, gemv_ks2, gemv_wk;
  int gs_threads, gs_bm, gs_bn, gs_group;
  int gl_threads, gl_bm, gl_bn, gl_group;
  int small_max;
  // "dq16" (int4 kinds on sm_90a, M > small_max): convert kernel, then the warp-specialized GEMM on its output
  const char* dq16_convert;
  Kernel dq16;
  int dq16_threads, dq16_bm, dq16_bn, dq16_group;
  int gemv_pdl;  // programmatic dependent launch of the M <= 8 (bit 0) / M > 8 (bit 1) GEMV (cuda_sparse.gemv_pdl_bits)
};

// Per (device, stream) scratch for the fp16 copy of an int4 weight ("dq16"), grown on demand, never shrunk
// (an outgrown buffer is kept: a captured CUDA graph may still point at it). Allocated on a stream's first use;
// nullptr when it would have to grow while the stream is being captured (the caller runs the int4 GEMM instead).
void* dq16_scratch(int device_id, CUstream stream, size_t bytes) {
  static std::mutex mu;
  static std::unordered_map<int, std::unordered_map<CUstream, std::pair<CUdeviceptr, size_t>>> all;
  std::lock_guard<std::mutex> lock(mu);
  auto& b = all[device_id][stream];
  if (b.second < bytes) {
    if (stream_capturing(stream)) return nullptr;
    b = {stream_alloc(bytes, "int4 prefill scratch"), bytes};
  }
  return reinterpret_cast<void*>(b.first);
}

// One launch of a warp-specialized GEMM (gemm_ws_body): per-call TMA descriptor of X, tail split when configured.
void launch_ws(int dev, CUstream stream, const Kernel& k, int bm, int bn, int group, int threads, const void* X,
               const void* Wv, const void* Wm, void* Y, int iM, int iN, int iK, int T, int n_rt) {
  int64_t tiles = static_cast<int64_t>((n_rt * 16 + bm - 1) / bm) * ((iM + bn - 1) / bn);
  if (k.cluster > 1)  // whole clusters: the weight-row tiles rounded up to a multiple of the cluster size
    tiles = static_cast<int64_t>((n_rt * 16 + bm * k.cluster - 1) / (bm * k.cluster)) * k.cluster * ((iM + bn - 1) / bn);
  CUfunction f = get_function(dev, k);
  // TMA descriptor of this call's activations, passed by value (__grid_constant__)
  TmaMap tm;
  encode_x_map(&tm, X, iM, iK, k);
  TmaMap wm = tm, mm = tm;  // the weight maps of a "wmap" kernel (unread otherwise)
  if (k.wmap) encode_w_maps(&wm, &mm, Wv, Wm, n_rt, T, bm, k);
  // tail split (k.tail > 1): the last wave's tiles are split along K over the idle SMs (ws_tail_plan)
  int64_t n_dp = tiles;
  int n_split = 1;
  void* Ws = nullptr;
  void* Cnt = nullptr;
  if (k.tail > 1 && k.tail_name != nullptr) {
    ws_tail_plan(tiles, sm_count(dev), (iK + k.bk - 1) / k.bk, k.tail, &n_dp, &n_split);
    // the tail-split kernel; per split unit one fp32 partial tile (bm x bn), per split tile a counter (whole tiles
    // when the workspace cannot be allocated: a stream captured before its first split call)
    if (n_split > 1 && gemv_workspace(dev, stream, static_cast<size_t>(tiles - n_dp),
                                      static_cast<size_t>(tiles - n_dp) * n_split * bm * bn, &Cnt, &Ws)) {
      f = get_function(dev, k, k.tail_name);
    } else {
      n_dp = tiles;
      n_split = 1;
    }
  }
  int i_dp = static_cast<int>(n_dp);
  void* args[] = {&tm, &wm, &mm, &Wv, &Wm, &Y, &iM, &iN, &iK, &T, &group, &i_dp, &n_split, &Ws, &Cnt};
  const int64_t grid = k.persistent ? std::min<int64_t>(tiles, sm_count(dev)) : n_dp + (tiles - n_dp) * n_split;
  check(driver().LaunchKernel(f, static_cast<unsigned>(grid), 1, 1, threads, 1, 1, k.smem, stream, args, nullptr),
        "launch (gemm, warp-specialized)");
}

void run(const Variant& v, const TensorView& x, const TensorView* w, int nw, const TensorView& y) {
  const int dev = x.device().device_id;
  if (x.device().device_type != kDLCUDA) TVM_FFI_THROW(ValueError) << "sparsec CUDA kernels: input is not on CUDA";
  expect(x, "x", kDLFloat, 16, 2, dev);
  expect(y, "y", kDLFloat, 16, 2, dev);
  const int64_t M = x.shape()[0], K = x.shape()[1], N = y.shape()[1];
  if (y.shape()[0] != M) TVM_FFI_THROW(ValueError) << "sparsec CUDA kernels: x and y disagree on the token count";
  if (K % 32) TVM_FFI_THROW(ValueError) << "sparsec CUDA kernels: K=" << K << " is not a multiple of 32";
  for (int i = 0; i < nw; ++i) {
    if (i == 0 && v.kind == 0) {
      expect(w[i], "weight values", kDLFloat, 16, 2, dev);
    } else {  // 32-bit words: uint32 (Relax) or int32 (frameworks without uint32)
      expect(w[i], "weight words", w[i].dtype().code == kDLInt ? kDLInt : kDLUInt, 32, w[i].ndim(), dev);
    }
  }
  const int64_t Np = w[0].shape()[0];
  const int64_t Kp = w[0].shape()[1] * kKpPerCol[v.kind];
  if (Np < N || Np % 16 || Kp < K || Kp % 128)
    TVM_FFI_THROW(ValueError) << "sparsec CUDA kernels: weight arrays do not fit x[" << M << "," << K << "] -> y[" << M << "," << N << "]";
  if (M == 0) return;
  const void* X = x.data_ptr();
  const void* Wv = w[0].data_ptr();
  const bool dense = kDense[v.kind];  // no metadata
  const void* Wm = dense ? nullptr : w[1].data_ptr();
  const int si = dense ? 1 : 2;
  const void* Sc = v.kind == 0 ? nullptr : w[si].data_ptr();
  const void* Zb = (v.kind != 0 && v.asym) ? w[si + 1].data_ptr() : nullptr;
  void* Y = y.data_ptr();
  int iM = static_cast<int>(M), iN = static_cast<int>(N), iK = static_cast<int>(K);
  int T = static_cast<int>(Kp / 32), G = v.kind == 0 ? 0 : static_cast<int>(w[si].shape()[1]), GS = v.gs;
  CUstream stream = reinterpret_cast<CUstream>(TVMFFIEnvGetStream(kDLCUDA, dev));
  const int n_rt = static_cast<int>((N + 15) / 16);
  if (M <= 16) {
    const Kernel& k = M <= 8 ? v.gemv1 : v.gemv2;
    CUfunction f = get_function(dev, k);
    const int rows = M <= 8 ? v.gemv_rows : v.gemv_rows2;
    const int64_t grid = (n_rt + rows - 1) / rows;
    const int steps_per_chunk = kStepsPerChunk[v.kind];
    const int nck = (iK / 32 + steps_per_chunk - 1) / steps_per_chunk;
    const int threads = M <= 8 ? v.gemv_threads : v.gemv_threads2;
    const int warps = threads / 32;
    // "ks": 0 -> automatic split, for one token tile only (M <= 8; cuda_sparse.gemv_auto_ks)
    int ks = M > 8 ? std::max(1, v.gemv_ks2)
                   : (v.gemv_ks > 0 ? v.gemv_ks : gemv_auto_ks(grid, warps, nck, sm_count(dev), v.gemv_wk));
    void* Ws = nullptr;
    void* Cnt = nullptr;
    if (ks > 1) {  // unsplit when the workspace cannot be allocated (a stream captured before its first split call)
      const size_t nv = static_cast<size_t>(rows) * (M <= 8 ? 1 : 2) * 4 * 32;
      if (!gemv_workspace(dev, stream, static_cast<size_t>(grid), static_cast<size_t>(grid) * ks * nv, &Cnt, &Ws)) ks = 1;
    }
    // PDL (the config's "pdl" bit of this kernel): it may start while the stream's previous kernel finishes
    // (sparsec_mma.cuh gemv_body)
    const bool pdl = (v.gemv_pdl & (M <= 8 ? 1 : 2)) != 0 && gemv_pdl(dev);
    void* args[] = {&X, &Wv, &Wm, &Sc, &Zb, &Y, &Ws, &Cnt, &iM, &iN, &iK, &T, &G, &GS};
    if (pdl) {
      LaunchAttr attr{};
      attr.id = 6;  // CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION
      attr.v.value = 1;
      LaunchConfig cfg{static_cast<unsigned>(grid), static_cast<unsigned>(ks), 1, static_cast<unsigned>(threads), 1, 1,
                       static_cast<unsigned>(k.smem), stream, &attr, 1};
      check(driver().LaunchKernelEx(&cfg, f, args, nullptr), "launch (gemv, programmatic dependent launch)");
      return;
    }
    check(driver().LaunchKernel(f, static_cast<unsigned>(grid), static_cast<unsigned>(ks), 1, threads, 1, 1,
                                k.smem, stream, args, nullptr),
          "launch (gemv)");
    return;
  }
  const bool small = M <= v.small_max;
  const Kernel& k = small ? v.gemm_small : v.gemm;
  const int bm = small ? v.gs_bm : v.gl_bm, bn = small ? v.gs_bn : v.gl_bn;
  int group = small ? v.gs_group : v.gl_group;
  const int threads = small ? v.gs_threads : v.gl_threads;
  // int4 / int8 kinds (sm_90a): the weight dequantized into fp16 fragments in this stream's scratch, then the
  // warp-specialized GEMM on it: 2:4 + int4 / int8 -> the 2:4 fp16 layout, with the same metadata (same layout for
  // the 2:4 kinds); dense int4 / int8 -> dense fp16 A fragments (16 rows x 32 k x 2 bytes per row tile and k32 step), no
  // metadata. Without a scratch (a stream captured before its first such call) the int4 / int8 GEMM below runs.
  void* W16 = (!small && v.dq16.name != nullptr)
                  ? dq16_scratch(dev, stream, static_cast<size_t>(n_rt) * T * (dense ? 1024 : 512)) : nullptr;
  if (W16 != nullptr) {
    CUfunction fc = get_function(dev, Kernel{v.dq16_convert, 0});
    int i_rt = n_rt, U = dense ? 2 * T : T;  // 16-column units per row tile: k16 units (dq4, dq8), k32 steps (sp4, sp8)
    // one thread: a uint4 of codes (4 units of int4, 2 of int8)
    const int64_t threads_total = static_cast<int64_t>(n_rt) * (U / (kByteCodes[v.kind] ? 2 : 4)) * 32;
    const int64_t blocks = (threads_total + @DQ16_THREADS@ - 1) / @DQ16_THREADS@;
    void* cargs[] = {&Wv, &Sc, &Zb, &W16, &i_rt, &U, &G, &GS};
    check(driver().LaunchKernel(fc, static_cast<unsigned>(blocks), 1, 1, @DQ16_THREADS@, 1, 1, 0, stream, cargs, nullptr),
          "launch (int4 / int8 -> fp16 fragments)");
    launch_ws(dev, stream, v.dq16, v.dq16_bm, v.dq16_bn, v.dq16_group, v.dq16_threads, X, W16, Wm, Y, iM, iN, iK, T, n_rt);
    return;
  }
  if (k.ws) {
    launch_ws(dev, stream, k, bm, bn, group, threads, X, Wv, Wm, Y, iM, iN, iK, T, n_rt);
    return;
  }
  CUfunction f = get_function(dev, k);
  const int64_t tiles = static_cast<int64_t>((n_rt * 16 + bm - 1) / bm) * ((M + bn - 1) / bn);
  void* args[] = {&X, &Wv, &Wm, &Sc, &Zb, &Y, &iM, &iN, &iK, &T, &G, &GS, &group};
  check(driver().LaunchKernel(f, static_cast<unsigned>(tiles), 1, 1, threads, 1, 1, k.smem, stream, args, nullptr),
        "launch (gemm)");
}
}  // namespace
"""


def _kind_table_cxx() -> str:
    """The launcher's per-kind constants, indexed by the kind number (KINDS order), from this module's tables."""
    def arr(ctype, name, vals):
        return f"constexpr {ctype} {name}[] = {{{', '.join(vals)}}};"

    kp_per_col = [str(K_ALIGN // param_specs(k, 16, K_ALIGN, 16, False)[0].shape[1]) for k in KINDS]
    return "\n".join([
        f"// per kind ({', '.join(KINDS)}): Kp per column of the first weight array, k32 steps per 16-byte GEMV chunk,",
        "// no metadata (dense), int8 codes (2 units a uint4 in the dq16 converter)",
        arr("int", "kKpPerCol", kp_per_col),
        arr("int", "kStepsPerChunk", [str(_STEPS_PER_CHUNK[k]) for k in KINDS]),
        arr("bool", "kDense", ["true" if k in DENSE_KINDS else "false" for k in KINDS]),
        arr("bool", "kByteCodes", ["true" if k in INT8_KINDS else "false" for k in KINDS]),
    ]) + "\n"  # fmt: skip


def _ws_kernel_init(name: str, c: dict[str, int], tail_name: str | None) -> str:
    """C++ initializer of the launcher's Kernel for a warp-specialized config: + the activations' TMA box
    (tma_x_params) for the per-call CUtensorMap, the tail split and its kernel."""
    t = tma_x_params(c, 1, 64)
    return (f'{{"{name}", {gemm_smem_bytes("sp16", c, False)}, 1, {t["box_dim"][0]}, {t["box_dim"][1]}, {t["data_type"]}, '
            f'{t["swizzle"]}, {t["l2_promotion"]}, {t["oob_fill"]}, {int(bool(c.get("persistent")))}, {t["cluster"]}, '
            f'{c.get("tail", 0)}, {c["bk"]}, ' + (f'"{tail_name}"' if tail_name else "nullptr")
            + f', {ws_a_step(c) if c.get("wmap") else 0}}}')  # fmt: skip


def render_host_source(variants: list[Variant], fatbin_path: str, symbol: str = "sparsec_fatbin") -> str:
    """The .cc file: driver-API launcher + one exported TVM FFI function per variant."""
    out = [_HOST_PRELUDE.replace("@FATSYM@", symbol).replace("@FATBIN@", str(fatbin_path))
           .replace("@GEMV_KS@", _GEMV_KS_CXX).replace("@WS_TAIL@", _WS_TAIL_CXX + _WS_WMAP_CXX)
           .replace("@DQ16_THREADS@", str(DQ16_CONVERT_THREADS)).replace("@KIND_TABLE@", _kind_table_cxx())]
    seen = set()
    for v in variants:
        if v.func_name in seen:
            continue
        seen.add(v.func_name)
        kn = v.kernel_names()
        gv, gs, gl = v.cfg("gemv"), v.cfg("gemm_small"), v.cfg("gemm")
        kind = KINDS.index(v.kind)
        nw = len(param_specs(v.kind, 16, K_ALIGN, max(v.gs, 1), v.asym))  # the weight arrays the function takes
        smem = {
            "gemv1": _gemv_smem(gv, 1, v.kind, v.asym, v.gs),
            "gemv2": _gemv_smem(gv, 2, v.kind, v.asym, v.gs),
            "gemm_small": gemm_smem_bytes(v.kind, gs, v.asym),
            "gemm": gemm_smem_bytes(v.kind, gl, v.asym),
        }
        kern = {p: f'{{"{kn[p]}", {smem[p]}}}' for p in smem}
        for p, c in (("gemm_small", gs), ("gemm", gl)):
            if c.get("ws"):  # + the activations' TMA box (tma_x_params) for the per-call CUtensorMap
                kern[p] = _ws_kernel_init(kn[p], c, kn.get("gemm_tail") if p == "gemm" else None)
        dq = v.dq16_cfg() if "dq16_convert" in kn else {}
        dq16 = (f'"{kn["dq16_convert"]}", {_ws_kernel_init(kn["dq16_gemm"], dq, kn.get("dq16_gemm_tail"))}, '
                f'{gemm_threads(dq)}, {dq["bm"]}, {dq["bn"]}, {dq["group"]}' if "dq16_convert" in kn
                else 'nullptr, {nullptr, 0}, 0, 0, 0, 0')  # fmt: skip
        args = ", ".join(f"TensorView w{i}" for i in range(nw))
        ws = ", ".join(f"w{i}" for i in range(nw))
        out.append(
            f"namespace {{\nconst Variant kV_{v.ident} = {{{kind}, {str(v.asym).lower()}, {v.gs}, {kern['gemv1']}, "
            f"{kern['gemv2']}, {kern['gemm_small']}, {kern['gemm']}, {gemv_warps(gv, 1) * 32}, {gemv_warps(gv, 2) * 32}, "
            f"{gemv_rows(gv, 1)}, {gemv_rows(gv, 2)}, {gemv_ks(gv, 1)}, {gemv_ks(gv, 2)}, "
            f"{gemv_kgroups(gv, 1)}, "
            f"{gemm_threads(gs)}, {gs['bm']}, {gs['bn']}, {gs['group']}, {gemm_threads(gl)}, "
            f"{gl['bm']}, {gl['bn']}, {gl['group']}, {v.small_max}, {dq16}, {gv.get('pdl', 0)}}};\n"
            f"void {v.func_name}_impl(TensorView x, {args}, TensorView y) {{\n"
            f"  TensorView w[] = {{{ws}}};\n  run(kV_{v.ident}, x, w, {nw}, y);\n}}\n}}  // namespace\n"
            f"TVM_FFI_DLL_EXPORT_TYPED_FUNC({v.func_name}, {v.func_name}_impl);\n"
        )
    return "\n".join(out)


# ----------------------------------------------------------------------------------------------------- registry
def _weight_dtype_ok(w) -> bool:
    return isinstance(w, Dense)


def variant_for(linear, target, hints: ShapeHints, tuning, kernel_name: str, kind: str, asym: bool, gs: int):
    """(Variant, tuned?) from the forced config, the tuning database or the defaults."""
    cfg = hints.config if hints.config is not None else None
    tuned = cfg is not None
    if cfg is None and tuning is not None:
        key = linear_key(linear, hints)
        cfg = tuning.lookup(kernel_name, target, key)
        if cfg is None:  # the kernels always run in fp16: entries measured by bench/bench_cuda.py use that key
            cfg = tuning.lookup(kernel_name, target, dict(key, act_dtype="float16"))
        tuned = cfg is not None and not cfg.get("untuned", False)
        if cfg is not None:  # the tuner never searches the small-tile / large-GEMM boundary: an entry records the
            # default of its day (128), which must not undo a later measured default (WS_SMALL_MAX, DQ16_SMALL_MAX)
            cfg = {key_: val for key_, val in cfg.items() if key_ != "small_max"}
    arch = target.arch or "sm_80"
    n, k = (int(d) for d in linear.weight.shape)
    base = default_config(kind, arch, n, k, asym=asym)
    v = Variant.make(kind, asym, gs, dict(base, **(cfg or {})))
    if "pdl" not in ((hints.config or {}).get("gemv") or {}):
        # a launch policy from the layer's shape, not a tuned parameter (the tuner times single calls, where it does
        # not act): a stored GEMV config takes the layer's default bits
        v = Variant.make(kind, asym, gs, dict(v.config_dict(), gemv=dict(v.cfg("gemv"), pdl=base["gemv"]["pdl"])))
    if dq16_ok(kind, arch, n, k) and "dq16" not in (cfg or {}).get("gemm", {}):
        # a stored large-GEMM tile from before "dq16" existed (or none): the large path still dequantizes to fp16 on
        # sm_90a; an entry that measured the int4 mma.sp / mma GEMM against it says "dq16": 0
        v = Variant.make(kind, asym, gs, dict(v.config_dict(), gemm=dict(v.cfg("gemm"), dq16=1)))
    smem = max(_gemv_smem(v.cfg("gemv"), nt, kind, asym, gs) for nt in (1, 2))
    if not gemv_valid(v.cfg("gemv")) or smem > SMEM_LIMIT.get(arch, 99 * 1024):  # e.g. ks > GEMV_MAX_KS, a deep ring
        v = Variant.make(kind, asym, gs, dict(v.config_dict(), gemv=base["gemv"]))
        tuned = False
    for p in ("gemm_small", "gemm"):  # a stored config that does not fit this arch falls back to the default
        if not gemm_valid(kind, v.cfg(p), asym, arch):
            v = Variant.make(kind, asym, gs, dict(v.config_dict(), **{p: base[p]}))
            tuned = False
    return v, tuned


def _impl(linear, target, hints, tuning, kernel_name: str, kind: str, asym: bool, gs: int, note: str = "") -> KernelImpl:
    from .cuda_compile import CudaKernelSource

    n, k = linear.weight.shape
    v, tuned = variant_for(linear, target, hints, tuning, kernel_name, kind, asym, gs)
    params = param_specs(kind, n, k, max(gs, 1), asym)
    fname = v.func_name
    src = CudaKernelSource(variants=(v,))

    def emit(bb, x, ps):
        from tvm import relax

        m = x.ty.shape.values[0]  # the symbolic token count
        return bb.emit(relax.call_dps_packed(fname, [x, *ps], relax.TensorType([m, n], "float16")))

    return KernelImpl(name=kernel_name, params=params, emit=emit, act_dtype="float16",
                      config=dict(v.config_dict(), kind=kind, gs=gs, asym=asym, func=fname), tuned=tuned, note=note,
                      extra_modules=[src])  # fmt: skip


def _cuda_ok(target, k: int) -> bool:
    arch = (target.arch or "").removeprefix("sm_").rstrip("a")
    return target.kind == "cuda" and arch.isdigit() and int(arch) >= 80 and k % 32 == 0


def _cuda_shapes(linear) -> str | None:
    """The shape requirement of the CUDA kernels this layer misses (the note of a layer built dense instead)."""
    return "in_features a multiple of 32" if linear.in_features % 32 else None


def _cuda_shapes_gq(linear) -> str | None:
    w = linear.weight
    gq = w.values if isinstance(w, NMSparse) else w
    if linear.in_features % 32:
        return "in_features a multiple of 32"
    if isinstance(gq, GroupQuant) and gq.group_size % 16:
        return f"a quantization group size a multiple of 16 (this layer's: {gq.group_size})"
    return None


def _prepare_sp16(linear, config):
    return prepare_sp16(linear.weight)


def _prepare_sp4(linear, config):
    return prepare_sp4(linear.weight)


def _prepare_sp8(linear, config):
    return prepare_sp8(linear.weight)


def _prepare_dq4(linear, config):
    return prepare_dq4(linear.weight)


def _prepare_dq8(linear, config):
    return prepare_dq8(linear.weight)


def _space(kind):
    def fn(linear, target, hints):
        sp = search_space(kind, target.arch or "sm_80")
        base = default_config(kind, target.arch or "sm_80")
        cands = [base]
        cands += [dict(base, gemv=c) for c in sp["gemv"] if c != base["gemv"]]
        cands += [dict(base, gemm=c) for c in sp["gemm"] if c != base["gemm"]]
        cands += [dict(base, gemm_small=c) for c in sp["gemm_small"] if c != base["gemm_small"]]
        return cands

    return fn


@register_kernel("cuda.nm24_mma_sp", formats=("nm_sparse[dense]",), targets=("cuda",), shapes=_cuda_shapes, priority=20, prepare=_prepare_sp16,
                 search_space=_space("sp16"))  # fmt: skip
def nm24_mma_sp(linear, target, hints, tuning):
    """2:4 sparse fp16 GEMM/GEMV on sparse tensor cores (mma.sp m16n8k32), decode and prefill paths."""
    w = linear.weight
    if not isinstance(w, NMSparse) or (w.n, w.m) != (2, 4) or not _weight_dtype_ok(w.values):
        return None
    if not _cuda_ok(target, w.shape[1]):
        return None
    return _impl(linear, target, hints, tuning, "cuda.nm24_mma_sp", "sp16", False, 0)


def nm_as_24(w: NMSparse) -> NMSparse | None:
    """An N:M weight as a 2:4 weight of the same matrix (values dequantized, as float32), when every aligned group of
    4 inputs holds at most 2 of its kept positions: 1:2, 1:4, 1:8, 2:8, 2:16, ... always, 2:4 itself. The kept
    positions are padded with unkept ones (value 0) up to exactly 2 per group. None when a group of 4 holds 3 or more
    kept positions (3:4, 4:8, ...: the 2:4 tensor cores cannot express it)."""
    out, inn = w.shape
    if inn % 4:
        return None
    mask = w.mask().reshape(out, inn // 4, 4)
    cnt = mask.sum(-1)
    if (cnt > 2).any():
        return None
    free = ~mask
    pad = free & (np.cumsum(free, axis=-1) <= (2 - cnt)[..., None])  # the first unkept positions, as many as needed
    return NMSparse.from_mask(w.materialize(), (mask | pad).reshape(out, inn), 2, 4)


def as24_linear(linear):
    """``linear`` with its N:M weight as the 2:4 weight :func:`nm_as_24` makes of it (None when it does not fit): what
    cuda.nm_as_24_mma_sp runs, tunes (``sparsec tune``) and looks up in tuning databases, as the 2:4 fp16 kernel's
    (cuda.nm24_mma_sp) entry for a 2:4 weight of that shape."""
    import dataclasses

    w = linear.weight
    a24 = nm_as_24(w) if isinstance(w, NMSparse) else None
    return None if a24 is None else dataclasses.replace(linear, weight=a24)


def _prepare_as24(linear, config):
    return prepare_sp16(nm_as_24(linear.weight))


@register_kernel("cuda.nm_as_24_mma_sp", formats=(fmt_pattern("nm_sparse[*]"),), targets=("cuda",), shapes=_cuda_shapes, priority=10,
                 prepare=_prepare_as24, search_space=_space("sp16"))  # fmt: skip
def nm_as_24_mma_sp(linear, target, hints, tuning):
    """N:M weights no specialised kernel takes, on the 2:4 fp16 kernel (cuda.nm24_mma_sp's), when the pattern fits
    2:4: other patterns (1:4, 2:8, ...; zero-padded to 2:4) and 2:4 of values without an int kernel on CUDA (int2/3,
    int4 / int8 with a group size that is not a multiple of 16), dequantized to fp16 when the model is built."""
    w = linear.weight
    if not isinstance(w, NMSparse) or not _cuda_ok(target, w.shape[1]):
        return None
    proxy = as24_linear(linear)
    if proxy is None:
        return None
    notes = []
    if (w.n, w.m) != (2, 4):
        notes.append(f"{w.n}:{w.m} run as 2:4 (zero-padded)")
    if not isinstance(w.values, Dense):
        gq = w.values if isinstance(w.values, GroupQuant) else None
        what = f"int{gq.bits} g{gq.group_size}" if gq is not None else w.values.kind
        notes.append(f"{what} values dequantized to fp16 at build time (no CUDA kernel for them)")
    # configs: the 2:4 fp16 kernel's tuning entries for this shape (select_kernel names the impl after this generator)
    return _impl(proxy, target, hints, tuning, "cuda.nm24_mma_sp", "sp16", False, 0, "; ".join(notes))


def _nm24_int(linear, target, hints, tuning, bits: int, kernel_name: str, kind: str):
    """A 2:4 weight of ``bits``-bit GroupQuant values (group size a multiple of 16) on its kernel, else None."""
    w = linear.weight
    if not isinstance(w, NMSparse) or (w.n, w.m) != (2, 4) or not isinstance(w.values, GroupQuant):
        return None
    gq = w.values
    if gq.bits != bits or gq.group_size % 16 or not _cuda_ok(target, w.shape[1]):
        return None
    note = "group sparsity expanded to scale-0 groups" if gq.group_mask_packed is not None else ""
    return _impl(linear, target, hints, tuning, kernel_name, kind, not gq.symmetric, gq.group_size, note)


@register_kernel("cuda.nm24_int4_mma_sp", formats=("nm_sparse[group_quant]",), targets=("cuda",), shapes=_cuda_shapes_gq, priority=20,
                 prepare=_prepare_sp4, search_space=_space("sp4"))  # fmt: skip
def nm24_int4_mma_sp(linear, target, hints, tuning):
    """2:4 sparse + int4 group-quantized values: int4 -> fp16 in registers, mma.sp m16n8k32."""
    return _nm24_int(linear, target, hints, tuning, 4, "cuda.nm24_int4_mma_sp", "sp4")


@register_kernel("cuda.nm24_int8_mma_sp", formats=("nm_sparse[group_quant]",), targets=("cuda",), shapes=_cuda_shapes_gq, priority=20,
                 prepare=_prepare_sp8, search_space=_space("sp8"))  # fmt: skip
def nm24_int8_mma_sp(linear, target, hints, tuning):
    """2:4 sparse + int8 group-quantized values: int8 -> fp16 in registers, mma.sp m16n8k32 (the 2:4 + int4 kernel's
    structure with 8 byte codes a lane and k32 step)."""
    return _nm24_int(linear, target, hints, tuning, 8, "cuda.nm24_int8_mma_sp", "sp8")


@register_kernel("cuda.int4_dequant_mma", formats=("group_quant",), targets=("cuda",), shapes=_cuda_shapes_gq, priority=20, prepare=_prepare_dq4,
                 search_space=_space("dq4"))  # fmt: skip
def int4_dequant_mma(linear, target, hints, tuning):
    """int4 group-quantized dense weight: dequant in registers, mma m16n8k16."""
    gq = linear.weight
    if not isinstance(gq, GroupQuant) or gq.bits != 4 or gq.group_size % 16 or not _cuda_ok(target, gq.shape[1]):
        return None
    note = "group sparsity expanded to scale-0 groups" if gq.group_mask_packed is not None else ""
    return _impl(linear, target, hints, tuning, "cuda.int4_dequant_mma", "dq4", not gq.symmetric, gq.group_size, note)


@register_kernel("cuda.int8_dequant_mma", formats=("group_quant",), targets=("cuda",), shapes=_cuda_shapes_gq, priority=20, prepare=_prepare_dq8,
                 search_space=_space("dq8"))  # fmt: skip
def int8_dequant_mma(linear, target, hints, tuning):
    """int8 group-quantized dense weight: int8 -> fp16 in registers, mma m16n8k16 (the int4 kernel's structure with
    16 codes a lane and k32 step)."""
    gq = linear.weight
    if not isinstance(gq, GroupQuant) or gq.bits != 8 or gq.group_size % 16 or not _cuda_ok(target, gq.shape[1]):
        return None
    note = "group sparsity expanded to scale-0 groups" if gq.group_mask_packed is not None else ""
    return _impl(linear, target, hints, tuning, "cuda.int8_dequant_mma", "dq8", not gq.symmetric, gq.group_size, note)
