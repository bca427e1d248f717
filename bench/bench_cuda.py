"""sparsec's CUDA kernels on a GPU: correctness, schedule search and speed against cuBLAS / cuSPARSELt, in one run.

Three steps (``bench/device_pack.sh`` runs the first and prints the command for the second)::

    python bench/bench_cuda.py build  --pack .devpack            # here: nvcc -> .devpack/sparsec_cuda.so + manifest
    python bench/bench_cuda.py device --pack .devpack --out DIR  # on the GPU: check + tune + bench -> DIR/cuda_device.json
    python bench/bench_cuda.py report --raw DIR/cuda_device.json # here: bench/results/cuda_kernels.{json,md},
                                                                 #       golden/tuning/h100.json (+ a100.json)

Decode-only mode (split-K GEMV configs, two timing methods; docs/cuda.md "Decode GEMV: split-K and steady-state
timing")::

    python bench/bench_cuda.py build  --decode --pack .devpack_decode
    python bench/bench_cuda.py device --decode --pack .devpack_decode --out DIR [--m 1,16] [--extra-shapes 4096x14336]
    python bench/bench_cuda.py report --raw DIR/cuda_device_decode.json --decode-name NAME
                                      # bench/results/cuda_kernels_decode_NAME.{json,md}

``device`` needs torch (and CuPy for the tensor-core peak measurement); it loads the kernel library with ``tvm_ffi``
(no TVM needed) and calls the exported ``sparsec_cuda_<id>`` functions on torch tensors, exactly the functions a model
library links. ``SPARSEC_BENCH_DRYRUN=1`` rehearses the device step on the CPU (tiny shapes, kernels emulated).

What is measured (all in the same process, same GPU, same inputs):

- device copy bandwidth (bytes read + written of a 1 GiB device-to-device copy) and cuBLAS fp16 8192^3 TFLOP/s;
- correctness of every kernel variant and of the acceptance matrix (kinds x shapes x M) against a float64 reference
  on fresh random inputs: ``||y - ref|| / ||ref||``, output poisoned with NaN before each call;
- the schedule search: every candidate of every path (decode GEMV, small GEMM, large GEMM) per LLM shape;
- speed: median of per-call CUDA-event timings with the L2 cache flushed before every call (weights are not
  L2-resident in real inference; the same for every contender), ours vs ``torch.nn.functional.linear`` (cuBLAS,
  dense fp16 weight holding the same values) and, for 2:4 fp16, vs ``torch.sparse.to_sparse_semi_structured``.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

LLM_SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008)]  # (out, in)
REF_SHAPES = [(128, 128), (352, 128), (128, 352), (256, 128), (128, 64), (64, 128), (10, 64)]  # golden models' Linears
CHECK_M = [1, 16, 128, 2048, 8192]
EXTRA_M = [3, 13, 37]  # odd token counts: tails of every path
DECODE_M = [1, 2, 4, 8, 16]
# decode split-K checks: K not a multiple of the split counts (sp4: 86 chunks at K = 11008; 3 at K = 352)
DECODE_CHECK_SHAPES = [(4096, 11008), (352, 352), (40, 1184)]
DECODE_CHECK_M = [1, 2, 8, 16, 13]
PREFILL_M = [128, 2048, 8192]
LLM_GS = 128
DRY = os.environ.get("SPARSEC_BENCH_DRYRUN") == "1"  # CPU rehearsal of the device script (no GPU, tiny shapes)
DEV = "cpu" if DRY else "cuda"
if DRY:
    LLM_SHAPES = [(64, 128), (32, 256), (48, 128)]
    REF_SHAPES = [(40, 352), (10, 64)]
    CHECK_M = [1, 16, 40]
    EXTRA_M = [3]
    DECODE_M = [1, 16]
    DECODE_CHECK_SHAPES = [(48, 256), (40, 352), (24, 1184)]
    PREFILL_M = [40]
    LLM_GS = 32
KINDS_ORDER = ("sp16", "sp4", "dq4", "dq8", "sp8")
KERNEL_OF_KIND = {"sp16": "cuda.nm24_mma_sp", "sp4": "cuda.nm24_int4_mma_sp", "dq4": "cuda.int4_dequant_mma",
                  "dq8": "cuda.int8_dequant_mma", "sp8": "cuda.nm24_int8_mma_sp"}


def ref_gs(kind: str, k: int) -> int:
    cols = k // 2 if kind in ("sp4", "sp8") else k
    for gs in (128, 64, 32, 16):
        if cols % gs == 0:
            return gs
    raise ValueError(f"no group size for {kind} K={k}")


# ---------------------------------------------------------------------------------------------------- build (here)
# The warp-specialized TMA candidates ("ws": 1) are left out of this in-process search until bench_gemm_v2.py, which runs
# each candidate in its own subprocess with a timeout, has shown them correct on the GPU (a hung mbarrier wait here
# would take the whole device call). SPARSEC_BENCH_WITH_WS=1 puts them in.
WITH_WS = os.environ.get("SPARSEC_BENCH_WITH_WS") == "1"


# decode-only pack (build/device --decode): the GEMV configs timed there, each with every split count (0 = auto)
# SPARSEC_DECODE_BASES="16.2.1,8.2.1" / SPARSEC_DECODE_KS="1" replace them (a smaller search)
DECODE_BASES = [tuple(int(v) for v in b.split(".")) for b in os.environ.get("SPARSEC_DECODE_BASES", "").split(",") if b] or [
    (8, 2, 1), (4, 2, 1), (4, 1, 1), (8, 1, 1), (16, 2, 1), (8, 2, 2)]  # (warps, rt, u)  # fmt: skip
DECODE_KS = tuple(int(x) for x in os.environ.get("SPARSEC_DECODE_KS", "0,1,2,4,8").split(",") if x)
DECODE_DEFAULT_SHAPES = LLM_SHAPES + [(4096, 14336), (14336, 4096)]  # + the --extra-shapes of the documented runs
# L2 prefetch distances (chunks ahead, "pf") timed on every base with the automatic split; SPARSEC_DECODE_PF="4,8"
# overrides (empty: none)
# (the prefetch run, bench/results/cuda_kernels_decode_prefetch.md, used "2,4,8,16"; no distance won)
DECODE_PF = tuple(int(x) for x in os.environ.get("SPARSEC_DECODE_PF", "").split(",") if x)
# cp.async ring stages ("st") timed on every base (u 1) with the automatic split: SPARSEC_DECODE_ST="2,3,4,6" (the ring
# run, bench/results/cuda_kernels_decode_ring.md; no depth beat the register pipeline in general; empty: none)
DECODE_ST = tuple(int(x) for x in os.environ.get("SPARSEC_DECODE_ST", "").split(",") if x)
# SPARSEC_DECODE_XS=1: every base also with the activations staged in shared memory and read by ldmatrix ("xs")
DECODE_XS = os.environ.get("SPARSEC_DECODE_XS", "") == "1"
# SPARSEC_DECODE_WR=1: row groups sharing staged activations ("wr", staged "xs" 3) and 4-row-tile blocks, as
# (warps, rt, wr, ks) candidates of every kind, and their correctness checks (tails, zero points, a split)
DECODE_WR = os.environ.get("SPARSEC_DECODE_WR", "") == "1"
DECODE_WR_CANDIDATES = [(16, 2, 2, 1), (16, 2, 2, 2), (16, 1, 2, 1), (16, 1, 4, 1), (16, 1, 4, 2), (16, 2, 4, 2),
                        (8, 2, 2, 1), (8, 2, 2, 2), (8, 1, 2, 1), (8, 1, 4, 1), (8, 1, 4, 2), (8, 2, 4, 1),
                        (4, 2, 2, 1), (4, 2, 2, 2), (4, 1, 2, 1), (4, 1, 4, 1),
                        (8, 4, 1, 1), (8, 4, 1, 2), (4, 4, 1, 1), (16, 4, 1, 2)]  # fmt: skip
DECODE_SPLIT_KS = (0, 1, 2, 3, 4, 8)  # every kind and zero-point mode at the check shapes' group sizes, odd split too


def decode_variant_rows():
    """Manifest rows of the decode-only pack: the defaults (every kind / zero points / group size the checks use); per
    kind, zero-point mode and check group size the default GEMV with each of DECODE_SPLIT_KS (correctness); per
    symmetric kind at the LLM group size DECODE_BASES x DECODE_KS (correctness + timing)."""
    from sparsec.backends.kernels.cuda_sparse import Variant, default_config

    rows, seen = [], set()

    from sparsec.backends.kernels.cuda_sparse import gemv_valid

    def add(kind, asym, gs, gemv, role):
        if gemv is not None and not gemv_valid(gemv):  # e.g. row groups with "xs" taken away
            return
        cfg = dict(default_config(kind), gemv=gemv) if gemv is not None else {}
        v = Variant.make(kind, asym, gs, cfg)
        if (v.func_name, role) in seen:
            return
        seen.add((v.func_name, role))
        rows.append({"func": v.func_name, "kind": kind, "asym": asym, "gs": gs, "role": role, "path": "gemv",
                     "config": v.config_dict()})  # fmt: skip

    for kind in KINDS_ORDER:
        check_gss = {decode_check_gs(kind, i) for i in range(len(DECODE_CHECK_SHAPES))}
        for asym in ((False,) if kind == "sp16" else (False, True)):
            for gs in sorted(check_gss | {0 if kind == "sp16" else LLM_GS}):
                add(kind, asym, gs, None, "default")
            for gs in sorted(check_gss):
                for ks in DECODE_SPLIT_KS:
                    add(kind, asym, gs, dict(default_config(kind)["gemv"], ks=ks), "split_check")
                for st, ks in ((3, 0), (2, 3)):  # the cp.async ring, with and without a split, every group size / zeros
                    add(kind, asym, gs, dict(default_config(kind)["gemv"], warps=4, st=st, ks=ks), "ring_check")
                # the untuned row tilings of LLM layers (gemv_tile_plan: 4 row tiles a warp; 64-row blocks split in 2
                # at M > 8, row groups for 2:4 + int4) on the check shapes: tails, zero points, every group size
                for n_, k_ in ((14336, 4096), (4096, 14336)):
                    add(kind, asym, gs, default_config(kind, "sm_90a", n_, k_, asym)["gemv"], "plan_check")
                if DECODE_WR:  # row groups: tails of the 64-row blocks, zero points, an odd split, two chunks a stage
                    for w, rt, wr, u, ks in ((8, 2, 2, 1, 0), (16, 1, 4, 1, 3), (4, 2, 2, 2, 1), (8, 1, 4, 1, 2)):
                        add(kind, asym, gs, dict(default_config(kind)["gemv"], warps=w, warps2=0, rt=rt, wr=wr, u=u,
                                                 xs=3, ks=ks), "wr_check")  # fmt: skip
                if DECODE_XS:  # staged activations, with and without a split, two chunks a stage
                    for u, ks in ((1, 0), (2, 3)):
                        add(kind, asym, gs, dict(default_config(kind)["gemv"], warps=4, u=u, xs=3, ks=ks), "xs_check")
        gs = 0 if kind == "sp16" else LLM_GS
        for w, rt, u in DECODE_BASES:
            for ks in DECODE_KS:
                add(kind, False, gs, {"warps": w, "rt": rt, "u": u, "ks": ks, "pf": 0}, "candidate")
            for pf in DECODE_PF:
                add(kind, False, gs, {"warps": w, "rt": rt, "u": u, "ks": 0, "pf": pf}, "candidate")
            for st_ in DECODE_ST:
                if u == 1:
                    add(kind, False, gs, {"warps": w, "rt": rt, "u": 1, "ks": 0, "st": st_}, "candidate")
            if DECODE_XS:
                add(kind, False, gs, {"warps": w, "rt": rt, "u": u, "ks": 0, "xs": 3}, "candidate")
                add(kind, False, gs, {"warps": w, "rt": rt, "u": u, "ks": 1, "xs": 3}, "candidate")
        if DECODE_WR:
            for w, rt, wr, ks in DECODE_WR_CANDIDATES:
                add(kind, False, gs, {"warps": w, "rt": rt, "u": 1, "ks": ks, "pf": 0, "xs": 3, "wr": wr}, "candidate")
        # the untuned build's GEMV config of each timed shape (warps per token-tile count from the layer's rows), and
        # its whole-K twin: both compete in the search too
        for n, k in DECODE_DEFAULT_SHAPES:
            c = default_config(kind, "sm_90a", n, k)["gemv"]
            add(kind, False, gs, c, "candidate")
            add(kind, False, gs, dict(c, ks=1), "candidate")
            if kind != "sp16":  # the same with the scale applied before each MMA (the earlier int4 kernel)
                add(kind, False, gs, dict(c, og=0), "candidate")
            for xs in (0, 3):  # activations never / always staged (the default may stage for M > 8 only)
                add(kind, False, gs, dict(c, xs=xs), "candidate")
    return rows


def _steady_ms(d):
    """A decode timing's steady-state ms: the CUDA-graph time, the launch loop's where no graph was captured."""
    return d["graph_ms"] if d.get("graph_ms") is not None else d["loop_ms"]


def _cfg_label(c):
    """w16 rt2 u1 ks0 (pf8): a GEMV config as the decode report writes it; "a/b": the M <= 8 / M > 8 kernels differ."""
    from sparsec.backends.kernels.cuda_sparse import gemv_ks, gemv_rt, gemv_warps, gemv_wr

    def two(name, f):
        a, b = f(c, 1), f(c, 2)
        return f"{name}{a}" + (f"/{b}" if b != a else "")

    wr = f" {two('wr', gemv_wr)}" if gemv_wr(c, 1) > 1 or gemv_wr(c, 2) > 1 else ""
    ks2 = f"/{gemv_ks(c, 2)}" if c.get("ks2") and gemv_ks(c, 2) != c["ks"] else ""
    return (f"{two('w', gemv_warps)} {two('rt', gemv_rt)}{wr} u{c['u']} ks{c['ks']}{ks2}"
            + (f" pf{c['pf']}" if c.get("pf") else "")
            + (f" st{c['st']}" if c.get("st") else "")
            + ({1: " xs1", 2: " xs2", 3: " xs"}.get(c.get("xs", 0), "") if not c.get("st") else "")
            + (" og0" if c.get("og", 1) == 0 else ""))


def decode_check_gs(kind, i):
    """Group size of decode check shape i: the LLM group size on the first (an LLM shape), else the reference one."""
    if kind == "sp16":
        return 0
    return LLM_GS if i == 0 else ref_gs(kind, DECODE_CHECK_SHAPES[i][1])


def pack_variants():
    """(variants, manifest rows): defaults for every kind/asym/group size in use, plus the search candidates of the
    symmetric kinds at the LLM group size."""
    from sparsec.backends.cuda_tune import candidate_configs
    from sparsec.backends.kernels.cuda_sparse import Variant, default_config

    rows, seen = [], set()

    def add(kind, asym, gs, cfg, role, path=None):
        v = Variant.make(kind, asym, gs, cfg)
        if v.func_name in seen and not (role == "candidate" and (v.func_name, path) not in seen):
            return
        # the default config competes in every path's search (same function as the default row)
        seen.add(v.func_name)
        seen.add((v.func_name, path))
        rows.append({"func": v.func_name, "kind": kind, "asym": asym, "gs": gs, "role": role, "path": path,
                     "config": v.config_dict()})  # fmt: skip
        return v

    for kind in KINDS_ORDER:
        asyms = (False,) if kind == "sp16" else (False, True)
        gss = {0} if kind == "sp16" else {LLM_GS} | {ref_gs(kind, k) for _, k in REF_SHAPES}
        for asym in asyms:
            for gs in sorted(gss):
                add(kind, asym, gs, {}, "default")
        # the same candidates as `sparsec tune` (sparsec.backends.cuda_tune.candidate_configs), unbounded; "ws" ones
        # only with WITH_WS (unmeasured: bench_gemm_v2.py, one subprocess per candidate with hang timeouts, runs them)
        sp = candidate_configs(kind, "sm_90a", None, include_unverified=WITH_WS)
        base = default_config(kind)
        gs = 0 if kind == "sp16" else LLM_GS
        for path in ("gemv", "gemm_small", "gemm"):
            for c in sp[path]:
                add(kind, False, gs, dict(base, **{path: c}), "candidate", path)
    variants = [Variant.make(r["kind"], r["asym"], r["gs"], r["config"]) for r in rows]
    return variants, rows


def cmd_build(args):
    from sparsec.backends.kernels.cuda_compile import build_shared

    pack = Path(args.pack)
    pack.mkdir(parents=True, exist_ok=True)
    if args.decode:
        from sparsec.backends.kernels.cuda_sparse import Variant

        rows = decode_variant_rows()
        variants = [Variant.make(r["kind"], r["asym"], r["gs"], r["config"]) for r in rows]
    else:
        variants, rows = pack_variants()
    t = time.time()
    if args.manifest_only or (args.decode and DRY):
        (pack / "manifest.json").write_text(json.dumps({"archs": args.arch, "variants": rows}, indent=1))
        return
    build_shared(variants, args.arch, str(pack / "sparsec_cuda.so"), workdir=str(pack / "build"))
    if args.decode:
        (pack / "manifest.json").write_text(json.dumps({"archs": args.arch, "variants": rows, "decode": True}, indent=1))
        print(f"built {len(rows)} decode kernel functions for {args.arch} in {time.time() - t:.0f}s -> {pack}/sparsec_cuda.so")
        return
    import subprocess

    from sparsec.backends.kernels.cuda_compile import gencode

    subprocess.run(["nvcc", "-cubin", "-O3", "-std=c++17", "-I", str(pack / "build"), *gencode(args.arch[0]), "-o",
                    str(pack / "cuda_peak.cubin"), str(ROOT / "bench" / "cuda_peak.cu")], check=True)  # fmt: skip
    (pack / "manifest.json").write_text(json.dumps({"archs": args.arch, "variants": rows}, indent=1))
    print(f"built {len(rows)} kernel functions for {args.arch} in {time.time() - t:.0f}s -> {pack}/sparsec_cuda.so")


# ---------------------------------------------------------------------------------------------------- device
class Ctx:
    def __init__(self, lib, manifest, torch, out):
        self.lib, self.manifest, self.torch, self.out = lib, manifest, torch, out
        self.pack = None
        self.funcs = {}
        self.weights = {}
        self.flush = torch.empty(64 * 1024 * 1024 if not DRY else 16, dtype=torch.int32, device=DEV)  # 256 MB > L2
        self.log = []

    def weight(self, kind, n, k, gs, asym):
        """Weights are drawn once per (kind, shape, group size, zero points) and reused by every phase."""
        key = (kind, n, k, gs, asym)
        if key not in self.weights:
            seed = 10 * (n + 3 * k) + 2 * KINDS_ORDER.index(kind) + int(asym)  # fixed per weight, distinct per key
            self.weights[key] = Weight(self, kind, n, k, gs, asym, seed=seed)
        return self.weights[key]

    def fn(self, name):
        if DRY:
            return self.lib[name]
        if name not in self.funcs:
            self.funcs[name] = self.lib[name]
        return self.funcs[name]

    def time(self, f, n=None, min_n=8, budget_s=0.15):
        """Median ms of n calls, L2 flushed before each call; n from a first estimate (within ``budget_s``): the
        procedure of `sparsec tune` (sparsec.backends.cuda_tune.time_call), here with torch CUDA events."""
        from sparsec.backends.cuda_tune import TorchTimer, time_call

        if DRY:
            t0 = time.perf_counter()
            f()
            return (time.perf_counter() - t0) * 1e3
        return time_call(f, TorchTimer(self.torch, self.flush), n=n, min_n=min_n, budget_s=budget_s)


def _random_nm24(n, k, values, rng):
    """A random 2:4 NMSparse (positions uniform over the 6 patterns) with the given values child format."""
    import numpy as np

    from sparsec.compressor.formats import NMSparse

    pairs = np.array([(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)], dtype=np.uint8)
    pos = pairs[rng.integers(0, 6, size=(n, k // 4))].reshape(n, k // 2)  # 2-bit positions, element j at bits 2j
    p4 = pos.reshape(n, k // 8, 4).astype(np.uint8)
    packed = p4[..., 0] | (p4[..., 1] << 2) | (p4[..., 2] << 4) | (p4[..., 3] << 6)
    return NMSparse(values, packed.astype(np.uint8), 2, 4, k)


def make_weight(kind, n, k, gs, asym, rng):
    """A random weight of the kind's format."""
    import numpy as np

    from sparsec.compressor.formats import GroupQuant

    if kind == "sp16":
        return _random_nm24(n, k, (rng.standard_normal((n, k // 2)) / math.sqrt(k)).astype(np.float32), rng)
    cols = k // 2 if kind in ("sp4", "sp8") else k
    bits = 8 if kind in ("dq8", "sp8") else 4
    top = 1 << bits
    codes = rng.integers(0, top, size=(n, cols), dtype=np.uint8)
    scales = (rng.uniform(0.5, 1.5, size=(n, cols // gs)) / (top // 4 * math.sqrt(k))).astype(np.float16)
    zeros = rng.integers(top // 4, 3 * top // 4, size=(n, cols // gs), dtype=np.uint8) if asym else None
    gq = GroupQuant.from_codes(codes, scales, zeros, bits, gs)
    if kind in ("dq4", "dq8"):
        return gq
    return _random_nm24(n, k, gq, rng)


class Weight:
    """A weight on the GPU: prepared arrays (for our kernels) and the dense fp16 matrix (for the baselines)."""

    def __init__(self, ctx, kind, n, k, gs, asym, seed):
        import numpy as np

        from sparsec.backends.kernels.cuda_sparse import prepare

        torch = ctx.torch
        rng = np.random.default_rng(seed)
        self.kind, self.n, self.k, self.gs, self.asym = kind, n, k, gs, asym
        fmt = make_weight(kind, n, k, gs, asym, rng)
        self.fmt = fmt
        arrays = prepare(kind, fmt)
        self.arrays = arrays
        self.ws = [torch.from_numpy(a.view(np.int32) if a.dtype == np.uint32 else a).to(DEV) for a in arrays]
        self.w_dense32 = torch.from_numpy(fmt.materialize()).to(DEV)
        self.w16 = self.w_dense32.half()
        self.nbytes = sum(a.nbytes for a in arrays)  # bytes our kernel reads for the weight (padded layout)
        self.format_nbytes = fmt.nbytes


class DryLib:
    """CPU stand-in for the kernel library: y = x @ W^T with W decoded from the prepared arrays (tensor-core
    semantics, sparsec.backends.kernels.cuda_sparse.decode_layout)."""

    def __init__(self, manifest):
        self.rows = {r["func"]: r for r in manifest["variants"]}

    def __getitem__(self, name):
        import torch

        from sparsec.backends.kernels.cuda_sparse import decode_layout

        r = self.rows[name]

        def f(x, *args):
            *ws, y = args
            arrays = [w.numpy().view("uint32") if w.dtype == torch.int32 else w.numpy() for w in ws]
            w = decode_layout(r["kind"], arrays, y.shape[1], x.shape[1], r["gs"])
            y.copy_((x.float() @ torch.from_numpy(w).T).half())

        return f


def run_ours(ctx, func, wt, x, y):
    ctx.fn(func)(x, *wt.ws, y)


def check(ctx, func, wt, m, seed):
    from sparsec.backends.cuda_tune import judge

    torch = ctx.torch
    g = torch.Generator(device=DEV).manual_seed(seed)
    x = torch.randn(m, wt.k, device=DEV, dtype=torch.float16, generator=g)
    y = torch.full((m, wt.n), float("nan"), device=DEV, dtype=torch.float16)
    run_ours(ctx, func, wt, x, y)
    if not DRY:
        torch.cuda.synchronize()
    ref = x.double() @ wt.w_dense32.double().T
    unwritten = int(torch.isnan(y).sum().item())
    rel = float((y.double() - ref).norm() / ref.norm().clamp_min(1e-30))
    ok = judge(rel, unwritten)  # the acceptance rule of `sparsec tune` (rel <= 1e-2, every output written)
    return {"func": func, "kind": wt.kind, "asym": wt.asym, "gs": wt.gs, "out": wt.n, "in": wt.k, "m": m,
            "rel_err": rel, "unwritten": unwritten, "ok": ok}  # fmt: skip


def device_info(torch):
    if DRY:
        return {"gpu": "dry-run (CPU)", "torch": torch.__version__}
    p = torch.cuda.get_device_properties(0)
    return {"gpu": p.name, "sm": f"{p.major}.{p.minor}", "sms": p.multi_processor_count,
            "mem_gib": round(p.total_memory / 2**30, 1), "torch": torch.__version__, "cuda": torch.version.cuda,
            "python": platform.python_version()}  # fmt: skip


def ceilings(ctx):
    torch = ctx.torch
    if DRY:
        return {"copy_gbs": 1.0, "cublas_fp16_8192_tflops": 1.0}
    a = torch.empty(512 * 1024 * 1024, dtype=torch.float16, device=DEV).normal_()
    b = torch.empty_like(a)
    ms = ctx.time(lambda: b.copy_(a), n=20)
    copy_gbs = 2 * a.numel() * 2 / (ms * 1e-3) / 1e9
    del a, b
    x = torch.randn(8192, 8192, device=DEV, dtype=torch.float16)
    w = torch.randn(8192, 8192, device=DEV, dtype=torch.float16)
    ms = ctx.time(lambda: torch.nn.functional.linear(x, w), n=20)
    tflops = 2 * 8192**3 / (ms * 1e-3) / 1e12
    res = {"copy_gbs": copy_gbs, "cublas_fp16_8192_tflops": tflops}
    cubin = Path(ctx.pack) / "cuda_peak.cubin"
    if cubin.exists():
        try:
            import cupy

            mod = cupy.RawModule(path=str(cubin))
            sms = torch.cuda.get_device_properties(0).multi_processor_count
            outb = cupy.empty(sms * 8 * 256, dtype=cupy.float32)
            iters = 4096
            for name, flops in (("peak_mma_sp", 2 * 16 * 8 * 32), ("peak_mma_sp_plain", 2 * 16 * 8 * 32), ("peak_mma", 2 * 16 * 8 * 16)):
                k = mod.get_function(name)
                k((sms * 8,), (256,), (outb, cupy.int32(iters)))
                cupy.cuda.runtime.deviceSynchronize()
                ms = ctx.time(lambda: k((sms * 8,), (256,), (outb, cupy.int32(iters))), n=10)
                total = sms * 8 * 8 * iters * 8 * flops  # blocks x warps x iters x 8 mma x flops (dense-equivalent)
                res[f"{name}_tflops_dense_equiv"] = total / (ms * 1e-3) / 1e12
        except Exception as e:  # noqa: BLE001
            res["peak_error"] = repr(e)[:300]
    return res


def cmd_device(args):
    import torch

    if not DRY:
        import tvm_ffi
    torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction = False
    pack = Path(args.pack)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    manifest = json.loads((pack / "manifest.json").read_text())
    lib = tvm_ffi.load_module(str(pack / "sparsec_cuda.so")) if not DRY else DryLib(manifest)
    ctx = Ctx(lib, manifest, torch, out)
    ctx.pack = pack
    res = {"info": device_info(torch), "started": time.strftime("%Y-%m-%d %H:%M:%S"), "argv": sys.argv}
    t_start = time.time()

    def save():
        res["seconds"] = time.time() - t_start
        (out / "cuda_device.json").write_text(json.dumps(res, indent=1))

    res["ceilings"] = ceilings(ctx)
    print("ceilings", res["ceilings"], flush=True)
    save()
    rows = manifest["variants"]
    default = {(r["kind"], r["asym"], r["gs"]): r["func"] for r in rows if r["role"] == "default"}
    cands = {}
    for r in rows:
        if r["role"] == "candidate":
            cands.setdefault((r["kind"], r["path"]), []).append(r)
    kinds = args.kinds.split(",")

    # ---- 1. schedule search (symmetric kinds, LLM shapes) + correctness of every candidate
    tuning, cand_checks, winners = [], [], {}
    for kind in kinds:
        gs = 0 if kind == "sp16" else LLM_GS
        for si, (n, k) in enumerate(LLM_SHAPES):
            wt = ctx.weight(kind, n, k, gs, False)
            for path, ms_list in (("gemv", (1, 16)), ("gemm_small", (128,)), ("gemm", (2048, 8192))):
                best = None
                for r in cands.get((kind, path), []):
                    func = r["func"]
                    if si == 0:  # every candidate checked once, at odd token counts of its path
                        mchk = {"gemv": 13, "gemm_small": 37, "gemm": 300}[path]
                        c = check(ctx, func, wt, mchk, seed=7)
                        c["path"] = path
                        cand_checks.append(c)
                        if not c["ok"]:
                            print("CANDIDATE WRONG", c, flush=True)
                    if any(not c["ok"] for c in cand_checks if c["func"] == func):
                        continue
                    times = {}
                    for m in ms_list:
                        x = torch.randn(m, k, device=DEV, dtype=torch.float16)
                        y = torch.empty(m, n, device=DEV, dtype=torch.float16)
                        times[m] = ctx.time(lambda: run_ours(ctx, func, wt, x, y))
                    score = sum(times.values())
                    tuning.append({"kind": kind, "path": path, "out": n, "in": k, "func": func,
                                   "config": r["config"][path], "ms": times})  # fmt: skip
                    if best is None or score < best[0]:
                        best = (score, r)
                if best is not None:
                    winners[(kind, n, k, path)] = best[1]
                    print(f"tuned {kind} {n}x{k} {path}: {best[1]['config'][path]} {best[0]:.4f} ms", flush=True)
    res["tuning"] = tuning
    res["candidate_checks"] = cand_checks
    res["winners"] = [{"kind": kd, "out": n, "in": k, "path": p, "func": r["func"], "config": r["config"][p]}
                      for (kd, n, k, p), r in winners.items()]  # fmt: skip
    save()

    def func_for(kind, asym, gs, n, k, m):
        """The winner of the path serving m (tuned) or the default variant."""
        path = "gemv" if m <= 16 else ("gemm_small" if m <= 128 else "gemm")
        r = winners.get((kind, n, k, path)) if not asym else None
        if r is not None and r["gs"] == gs:
            return r["func"], True
        return default[(kind, asym, gs)], False

    # ---- 2. acceptance matrix: every kind (sym + asym) x shape x M vs float64
    checks = []
    for kind in kinds:
        for asym in ((False,) if kind == "sp16" else (False, True)):
            for si, (n, k) in enumerate(LLM_SHAPES + REF_SHAPES):
                gs = 0 if kind == "sp16" else (LLM_GS if (n, k) in LLM_SHAPES else ref_gs(kind, k))
                wt = ctx.weight(kind, n, k, gs, asym)
                for m in CHECK_M + EXTRA_M:
                    func, tuned = func_for(kind, asym, gs, n, k, m)
                    c = check(ctx, func, wt, m, seed=11 + m)
                    c["tuned"] = tuned
                    checks.append(c)
                    if not c["ok"]:
                        print("WRONG", c, flush=True)
                    if (n, k) in LLM_SHAPES and not tuned:  # the default too, when a winner served the check
                        pass
                # defaults also checked on the LLM shapes (a build without tuning entries uses them)
                if (n, k) in LLM_SHAPES and not asym:
                    for m in (1, 16, 128, 2048):
                        c = check(ctx, default[(kind, asym, gs)], wt, m, seed=31 + m)
                        c["tuned"] = False
                        c["default"] = True
                        checks.append(c)
        print(f"checked {kind}: {sum(c['ok'] for c in checks)}/{len(checks)} ok so far", flush=True)
    res["checks"] = checks
    save()

    # ---- 3. speed vs baselines
    bench = []
    copy_gbs = res["ceilings"]["copy_gbs"]
    for kind in kinds:
        gs = 0 if kind == "sp16" else LLM_GS
        for si, (n, k) in enumerate(LLM_SHAPES):
            wt = ctx.weight(kind, n, k, gs, False)
            semi = None
            if kind == "sp16" and not args.no_semi:
                try:
                    from torch.sparse import to_sparse_semi_structured

                    semi = to_sparse_semi_structured(wt.w16)
                except Exception as e:  # noqa: BLE001
                    res.setdefault("notes", []).append(f"to_sparse_semi_structured failed: {e!r}"[:300])
            for m in DECODE_M + PREFILL_M:
                func, tuned = func_for(kind, False, gs, n, k, m)
                x = torch.randn(m, k, device=DEV, dtype=torch.float16)
                y = torch.empty(m, n, device=DEV, dtype=torch.float16)
                t_ours = ctx.time(lambda: run_ours(ctx, func, wt, x, y))
                t_dense = ctx.time(lambda: torch.nn.functional.linear(x, wt.w16))
                row = {"kind": kind, "out": n, "in": k, "m": m, "func": func, "tuned": tuned, "ms_ours": t_ours,
                       "ms_dense": t_dense, "speedup_vs_dense": t_dense / t_ours}  # fmt: skip
                if semi is not None and m >= 16:
                    try:
                        t_semi = ctx.time(lambda: torch.nn.functional.linear(x, semi))
                        row["ms_semi"] = t_semi
                        row["speedup_vs_semi"] = t_semi / t_ours
                    except Exception as e:  # noqa: BLE001
                        row["semi_error"] = repr(e)[:200]
                # bytes each moves at least: weight (as stored) + activations in + out
                io = (m * k + m * n) * 2
                row["gbs_ours"] = (wt.nbytes + io) / (t_ours * 1e-3) / 1e9
                row["gbs_dense"] = (n * k * 2 + io) / (t_dense * 1e-3) / 1e9
                row["roofline_frac_ours"] = row["gbs_ours"] / copy_gbs
                if m <= 16:  # a plain read of the same number of bytes (torch sum), for small-size context
                    buf = wt.__dict__.setdefault("_readbuf", torch.empty(wt.nbytes // 2, dtype=torch.float16, device=DEV).normal_())
                    row["ms_read_same_bytes"] = ctx.time(lambda: buf.sum())
                row["tflops_ours_dense_equiv"] = 2 * m * n * k / (t_ours * 1e-3) / 1e12
                row["tflops_dense"] = 2 * m * n * k / (t_dense * 1e-3) / 1e12
                bench.append(row)
                print(f"bench {kind} {n}x{k} m={m}: ours {t_ours:.4f} ms dense {t_dense:.4f} ms "
                      f"x{row['speedup_vs_dense']:.2f}" + (f" semi x{row['speedup_vs_semi']:.2f}" if "speedup_vs_semi" in row else ""),
                      flush=True)  # fmt: skip
            del semi
            res["bench"] = bench
            save()
    res["bench"] = bench
    save()
    bad = [c for c in checks + cand_checks if not c["ok"]]
    print(f"done in {time.time() - t_start:.0f}s; {len(checks)} acceptance checks, {len(bad)} failed", flush=True)


# ---------------------------------------------------------------------------------------------------- decode (device)
def _l2_bytes(torch):
    if DRY:
        return 1 << 20
    return int(getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 0) or (50 << 20))


class Steady:
    """Steady-state decode timing: back-to-back calls that rotate over separate copies of their operands, the copies'
    total >= 2x the L2 size (so no call finds its weight in L2 from an earlier call), device events around the whole
    batch, time per call = total / calls. Two ways to issue the batch: a Python loop (``loop``: also returns the host
    time per call, to tell whether the loop is launch-bound) and one CUDA graph holding the whole batch (``graph``: no
    host overhead between calls; torch captures our launches because the tvm-ffi call passes torch's current stream
    to the launcher, TVMFFIEnvGetStream)."""

    MIN_CALLS = 96

    def __init__(self, torch, l2_bytes):
        self.torch, self.l2 = torch, l2_bytes

    def n_copies(self, bytes_per_call):
        return max(2, math.ceil(2 * self.l2 / max(1, bytes_per_call)))

    def n_calls(self, copies):
        return copies * math.ceil(self.MIN_CALLS / copies)

    def loop(self, calls, reps=5):
        """(device ms per call, host ms per call) of issuing ``calls`` in a Python loop, medians of ``reps``."""
        import statistics

        torch = self.torch
        for c in calls:
            c()
        if DRY:
            t0 = time.perf_counter()
            for c in calls:
                c()
            ms = (time.perf_counter() - t0) * 1e3 / len(calls)
            return ms, ms
        torch.cuda.synchronize()
        dev, host = [], []
        for _ in range(reps):
            e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            e0.record()
            t0 = time.perf_counter()
            for c in calls:
                c()
            t1 = time.perf_counter()
            e1.record()
            e1.synchronize()
            dev.append(e0.elapsed_time(e1) / len(calls))
            host.append((t1 - t0) * 1e3 / len(calls))
        return statistics.median(dev), statistics.median(host)

    def graph(self, calls, reps=7):
        """Device ms per call of the batch captured as one CUDA graph (median of ``reps`` replays); None in dry runs."""
        import statistics

        if DRY:
            return None
        torch = self.torch
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):  # warm up on the capture stream (allocates per-stream workspaces: cuBLAS, split-K)
            for c in calls[: min(len(calls), 4)]:
                c()
        torch.cuda.current_stream().wait_stream(s)
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g, stream=s):
            for c in calls:
                c()
        g.replay()
        torch.cuda.synchronize()
        out = []
        for _ in range(reps):
            e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            e0.record()
            g.replay()
            e1.record()
            e1.synchronize()
            out.append(e0.elapsed_time(e1) / len(calls))
        del g
        return statistics.median(out)


def _check_decode(ctx, func, wt, m, seed, twice):
    """``check`` plus, for split-K configs, a second call on the same input that must give bitwise the same output."""
    c = check(ctx, func, wt, m, seed)
    if twice:
        torch = ctx.torch
        g = torch.Generator(device=DEV).manual_seed(seed + 1000)
        x = torch.randn(m, wt.k, device=DEV, dtype=torch.float16, generator=g)
        y1 = torch.full((m, wt.n), float("nan"), device=DEV, dtype=torch.float16)
        y2 = torch.full((m, wt.n), float("nan"), device=DEV, dtype=torch.float16)
        run_ours(ctx, func, wt, x, y1)
        run_ours(ctx, func, wt, x, y2)
        c["bitwise_repeatable"] = bool(torch.equal(y1.view(torch.int16), y2.view(torch.int16)))
        c["ok"] = c["ok"] and c["bitwise_repeatable"]
    return c


def cmd_device_decode(args):
    """Decode-only device run: split-K correctness, then per (kind, LLM shape, M) the old per-call timing (L2 flushed
    before each call) and the steady-state timing (Steady) of ours (default = auto split, ks = 1, best of the pack's
    GEMV candidates by steady-state time) and cuBLAS, a plain read and a copy of the same bytes."""
    import torch

    from sparsec.backends.kernels.cuda_sparse import default_config, gemv_launch

    if not DRY:
        import tvm_ffi
    torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction = False
    pack, out = Path(args.pack), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    manifest = json.loads((pack / "manifest.json").read_text())
    lib = tvm_ffi.load_module(str(pack / "sparsec_cuda.so")) if not DRY else DryLib(manifest)
    ctx = Ctx(lib, manifest, torch, out)
    ctx.pack = pack
    info = device_info(torch)
    sms = info.get("sms", 132)
    l2 = _l2_bytes(torch)
    st = Steady(torch, l2)
    res = {"mode": "decode", "info": dict(info, l2_bytes=l2), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
           "argv": sys.argv}  # fmt: skip
    t_start = time.time()

    def save():
        res["seconds"] = time.time() - t_start
        (out / "cuda_device_decode.json").write_text(json.dumps(res, indent=1))

    # ---- 0. copy bandwidth: 1 GiB device copy (per-call method) and steady state (rotating 64 MiB copies)
    if DRY:
        res["ceilings"] = {"copy_gbs": 1.0, "copy_gbs_steady": 1.0}
    else:
        a = torch.empty(512 * 1024 * 1024, dtype=torch.float16, device=DEV).normal_()
        b = torch.empty_like(a)
        ms = ctx.time(lambda: b.copy_(a), n=20)
        del a, b
        nb = 64 << 20
        cp = [(torch.empty(nb // 2, dtype=torch.float16, device=DEV).normal_(), torch.empty(nb // 2, dtype=torch.float16, device=DEV))
              for _ in range(st.n_copies(2 * nb))]  # fmt: skip
        calls = [(lambda s_=s_, d_=d_: d_.copy_(s_)) for s_, d_ in cp] * 4
        ms_st = st.graph(calls)
        res["ceilings"] = {"copy_gbs": 2 * 2**30 / (ms * 1e-3) / 1e9, "copy_gbs_steady": 2 * nb / (ms_st * 1e-3) / 1e9,
                           "copy_note": "bytes read + written; 1 GiB copy timed per call, 64 MiB copies in a CUDA graph"}  # fmt: skip
        del cp, calls
    print("ceilings", res["ceilings"], flush=True)
    save()

    rows = manifest["variants"]
    ms_list = [int(v) for v in args.m.split(",")]

    # ---- 1. correctness: every function of the pack vs float64 at M = 1, 2, 8, 16, 13, split-K bitwise repeatable
    checks = []
    llm_check = DECODE_CHECK_SHAPES[0]
    for r in rows:
        kind, asym, gs = r["kind"], r["asym"], r["gs"]
        cfg = r["config"]["gemv"]
        shapes = [(0, llm_check)] if r["role"] == "candidate" else list(enumerate(DECODE_CHECK_SHAPES))
        if r["role"] == "default":
            shapes += [(0, nk) for nk in LLM_SHAPES]
        for i, (n, k) in shapes:
            if decode_check_gs(kind, i) != gs:
                continue
            wt = ctx.weight(kind, n, k, gs, asym)
            for m in DECODE_CHECK_M:
                c = _check_decode(ctx, r["func"], wt, m, seed=101 + m, twice=cfg.get("ks", 1) != 1)
                c.update(role=r["role"], gemv=cfg, ks_used=gemv_launch(kind, n, k, m, cfg, sms)["ks"])
                checks.append(c)
                if not c["ok"]:
                    print("WRONG", c, flush=True)
    res["checks"] = checks
    print(f"checks: {sum(c['ok'] for c in checks)}/{len(checks)} ok, max rel err "
          f"{max(c['rel_err'] for c in checks):.2e}", flush=True)  # fmt: skip
    save()
    bad_funcs = {c["func"] for c in checks if not c["ok"]}

    # ---- 2. timing
    bench = []
    default = {(r["kind"], r["asym"], r["gs"]): r["func"] for r in rows if r["role"] == "default"}
    cands = {}
    for r in rows:
        if r["role"] == "candidate" and r["func"] not in bad_funcs:
            cands.setdefault(r["kind"], []).append(r)
    stopped = None
    for kind in KINDS_ORDER:
        gs = 0 if kind == "sp16" else LLM_GS
        kind_dflt = default[(kind, False, gs)]
        kind_dcfg = next(r["config"]["gemv"] for r in rows if r["func"] == kind_dflt)
        extra = [tuple(int(v) for v in sh.split("x")) for sh in args.extra_shapes.split(",") if sh]
        for n, k in LLM_SHAPES + extra:
            # the untuned build's config for this layer: warps from its row count (cuda_sparse.gemv_auto_warps,
            # with the build's SM count for the arch); built for DECODE_DEFAULT_SHAPES (else the kind's default)
            dcfg = default_config(kind, "sm_90a", n, k)["gemv"]
            drow = next((r for r in rows if r["kind"] == kind and not r["asym"] and r["gs"] == gs
                         and r["config"]["gemv"] == dcfg), None)  # fmt: skip
            dflt, dcfg = (drow["func"], dcfg) if drow is not None else (kind_dflt, kind_dcfg)
            ks1 = next((r for r in cands.get(kind, []) if r["config"]["gemv"] == dict(dcfg, ks=1)), None)
            if time.time() - t_start > args.budget_s:
                stopped = stopped or f"budget reached before {kind} {n}x{k}"
                break
            wt = ctx.weight(kind, n, k, gs, False)
            wcop = [wt.ws] + [[a.clone() for a in wt.ws] for _ in range(st.n_copies(wt.nbytes) - 1)]
            dcop = [wt.w16] + [wt.w16.clone() for _ in range(st.n_copies(n * k * 2) - 1)]
            nbuf = wt.nbytes // 2
            rcop = [torch.empty(nbuf, dtype=torch.float16, device=DEV).normal_() for _ in range(st.n_copies(wt.nbytes))]
            ccop = [(b_, torch.empty_like(b_)) for b_ in rcop[: st.n_copies(2 * wt.nbytes)]]
            for m in ms_list:
                xs = [torch.randn(m, k, device=DEV, dtype=torch.float16) for _ in range(max(len(wcop), len(dcop)))]
                ys = [torch.empty(m, n, device=DEV, dtype=torch.float16) for _ in range(len(xs))]

                def ours_calls(func):
                    f = ctx.fn(func)
                    nc = st.n_calls(len(wcop))
                    return [(lambda i=i: f(xs[i % len(wcop)], *wcop[i % len(wcop)], ys[i % len(wcop)])) for i in range(nc)]

                dense_calls = [(lambda i=i: torch.nn.functional.linear(xs[i % len(dcop)], dcop[i % len(dcop)]))
                               for i in range(st.n_calls(len(dcop)))]  # fmt: skip
                read_calls = [(lambda i=i: rcop[i % len(rcop)].sum()) for i in range(st.n_calls(len(rcop)))]
                copy_calls = [(lambda i=i: ccop[i % len(ccop)][1].copy_(ccop[i % len(ccop)][0]))
                              for i in range(st.n_calls(len(ccop)))]  # fmt: skip

                def steady(calls):
                    dev, host = st.loop(calls)
                    try:
                        g = st.graph(calls)
                        gerr = None
                    except Exception as e:  # noqa: BLE001
                        g, gerr = None, repr(e)[:300]
                    # launch-bound: the host needs longer to issue a call than the GPU to run it (graph time)
                    d = {"loop_ms": dev, "host_ms": host, "graph_ms": g, "launch_bound": host >= (g if g is not None else dev)}
                    if gerr:
                        d["graph_error"] = gerr
                    return d

                # search: every correct candidate by steady-state (graph) time
                search = []
                for r in cands.get(kind, []):
                    calls = ours_calls(r["func"])
                    try:
                        t = st.graph(calls)
                    except Exception as e:  # noqa: BLE001
                        t = None
                        search.append({"func": r["func"], "gemv": r["config"]["gemv"], "error": repr(e)[:200]})
                    if t is None:
                        t = st.loop(calls)[0]
                    search.append({"func": r["func"], "gemv": r["config"]["gemv"], "ms": t,
                                   "ks_used": gemv_launch(kind, n, k, m, r["config"]["gemv"], sms)["ks"]})  # fmt: skip
                ok_s = [x for x in search if "ms" in x]
                best = min(ok_s, key=lambda x: x["ms"]) if ok_s else None
                row = {"kind": kind, "out": n, "in": k, "m": m, "weight_bytes": wt.nbytes, "io_bytes": (m * k + m * n) * 2,
                       "copies": {"ours": len(wcop), "dense": len(dcop), "read": len(rcop), "copy": len(ccop)},
                       "calls_per_batch": {"ours": st.n_calls(len(wcop)), "dense": st.n_calls(len(dcop))},
                       "search": search}  # fmt: skip
                contenders = {"default": (dflt, dcfg)}
                if ks1 is not None:
                    contenders["ks1"] = (ks1["func"], ks1["config"]["gemv"])
                if best is not None:
                    contenders["best"] = (best["func"], best["gemv"])
                for name, (func, cfg) in contenders.items():
                    calls = ours_calls(func)
                    d = steady(calls)
                    d["flush_ms"] = ctx.time(lambda: run_ours(ctx, func, wt, xs[0], ys[0]))
                    d.update(func=func, gemv=cfg, ks_used=gemv_launch(kind, n, k, m, cfg, sms)["ks"])
                    row[name] = d
                d = steady(dense_calls)
                d["flush_ms"] = ctx.time(lambda: torch.nn.functional.linear(xs[0], wt.w16))
                row["dense"] = d
                row["read_same_bytes"] = {"flush_ms": ctx.time(lambda: rcop[0].sum()), "graph_ms": st.graph(read_calls),
                                          "loop_ms": st.loop(read_calls)[0]}  # fmt: skip
                row["copy_same_bytes"] = {"graph_ms": st.graph(copy_calls), "loop_ms": st.loop(copy_calls)[0]}
                # the timed functions are also checked on this shape and M (fresh input, float64 reference)
                row["checks"] = []
                for name in ("default", "best"):
                    if name in row:
                        c = _check_decode(ctx, row[name]["func"], wt, m, seed=211 + m, twice=row[name]["gemv"].get("ks", 1) != 1)
                        c.update(role=f"timed_{name}", gemv=row[name]["gemv"], ks_used=row[name]["ks_used"])
                        row["checks"].append(c)
                        checks.append(c)
                        if not c["ok"]:
                            print("WRONG (timed)", c, flush=True)
                bench.append(row)
                res["checks"] = checks

                msg = " ".join(f"{nm} {_steady_ms(row[nm]) * 1e3:.1f}/{row[nm]['flush_ms'] * 1e3:.1f}us"
                               for nm in ("default", "ks1", "best", "dense") if nm in row)  # fmt: skip
                print(f"decode {kind} {n}x{k} m={m}: steady/flush {msg}; best {best and best['gemv']} "
                      f"host/call ours {row['default']['host_ms'] * 1e3:.1f}us dense {row['dense']['host_ms'] * 1e3:.1f}us",
                      flush=True)  # fmt: skip
                res["bench"] = bench
                save()
            del wcop, dcop, rcop, ccop
        if stopped:
            break
    res["bench"] = bench
    res["stopped"] = stopped
    save()
    print(f"done in {time.time() - t_start:.0f}s; {len(checks)} checks, {len(bad_funcs)} wrong functions"
          + (f"; {stopped}" if stopped else ""), flush=True)  # fmt: skip


def cmd_report_decode(args):
    """bench/results/cuda_kernels_decode_<name>.{json,md} from a ``device --decode`` run."""
    from sparsec.backends.kernels.cuda_sparse import gemv_warps

    raw = json.loads(Path(args.raw).read_text())
    outdir = ROOT / "bench" / "results"
    name = args.decode_name
    checks, bench, ceil = raw.get("checks", []), raw.get("bench", []), raw.get("ceilings", {})
    copy = ceil.get("copy_gbs", 0)
    summary = {"device": raw.get("info"), "ceilings": ceil, "checks_total": len(checks),
               "checks_failed": sum(not c["ok"] for c in checks),
               "max_rel_err": max((c["rel_err"] for c in checks), default=None),
               "split_checks": sum(1 for c in checks if c.get("ks_used", 1) > 1),
               "bitwise_repeatable": sum(1 for c in checks if c.get("bitwise_repeatable")),
               "stopped": raw.get("stopped"), "seconds": raw.get("seconds")}  # fmt: skip
    cmd = ("python bench/bench_cuda.py build --decode --pack .devpack_decode; on the GPU: python3 bench/bench_cuda.py "
           f"device --decode --pack .devpack_decode --out $OUT; python bench/bench_cuda.py report --raw "
           f"<out>/cuda_device_decode.json --decode-name {name}")  # fmt: skip
    doc = {"schema": "sparsec.bench.cuda_decode/1", "command": cmd, "summary": summary, "bench": bench,
           "checks": checks, "raw_started": raw.get("started")}  # fmt: skip
    (outdir / f"cuda_kernels_decode_{name}.json").write_text(json.dumps(doc, indent=1))

    st = _steady_ms
    names = {"sp16": "2:4 fp16", "sp4": "2:4 + int4 g128", "dq4": "int4 g128", "dq8": "int8 g128", "sp8": "2:4 + int8 g128"}
    L = [f"# sparsec decode GEMV (split-K) on {raw['info']['gpu']} ({raw.get('started', '')})", ""]
    L.append(f"L2 {raw['info'].get('l2_bytes', 0) / 2**20:.0f} MiB. Copy bandwidth (read + written): {copy:.0f} GB/s "
             f"(1 GiB copy), {ceil.get('copy_gbs_steady', 0):.0f} GB/s (64 MiB copies, steady state).")  # fmt: skip
    L.append("")
    L.append(f"Correctness: {summary['checks_total'] - summary['checks_failed']}/{summary['checks_total']} checks ≤ 1e-2 "
             f"relative error vs float64 (max {summary['max_rel_err'] or 0:.2e}); {summary['split_checks']} of them "
             f"split-K (ks > 1), {summary['bitwise_repeatable']} repeated bitwise identical.")  # fmt: skip
    L.append("")
    L.append("Two timing methods, same run, same inputs. **flush**: L2 flushed before each call, events around that one "
             "call (the method of cuda_kernels.md). **steady**: back-to-back calls rotating over separate copies of "
             "weight/x/y totalling ≥ 2x L2, captured as one CUDA graph, events around the batch, time / calls. "
             "GB/s = (weight bytes as stored + x + y) / steady time; % = of the 1 GiB copy bandwidth.")  # fmt: skip
    L.append("")
    dflt = {}
    for r in bench:
        shapes = dflt.setdefault(r["kind"], {}).setdefault(_cfg_label(r["default"]["gemv"]), [])
        if f"{r['out']}×{r['in']}" not in shapes:
            shapes.append(f"{r['out']}×{r['in']}")
    ncfg = max((len({_cfg_label(x["gemv"]) for x in r["search"]}) for r in bench), default=0)
    L.append("\"ours\" = the GEMV config an untuned build uses for the layer (ks 0 = automatic split, the split used in "
             "brackets): " + "; ".join(f"{names[k]} " + ", ".join(f"{c} ({', '.join(shapes)})" for c, shapes in cs.items())
                                       for k, cs in dflt.items()) + f". \"best\" = the fastest of the run's {ncfg} GEMV "
             "configs per point by steady time (warp/tile/unroll bases x ks 0, 1, 2, 4, 8"
             + (", plus L2 prefetch distances pf with ks 0" if any(x["gemv"].get("pf") for r in bench for x in r["search"]) else "")
             + "), what `sparsec tune` would pick (chosen on the same measurement).")  # fmt: skip
    L.append("")
    L.append("| kernel | out×in | M | ours steady µs (warps, ks) | ks=1 steady µs | cuBLAS steady µs | **vs dense steady** | "
             "ours flush µs | cuBLAS flush µs | vs dense flush | ours GB/s (% copy) | read same bytes steady µs | "
             "best config steady µs (config) | host µs/call ours / cuBLAS |")  # fmt: skip
    L.append("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in bench:
        d, dn = r["default"], r["dense"]
        k1 = r.get("ks1")
        b = r.get("best")
        nb = r["weight_bytes"] + r["io_bytes"]
        gbs = nb / (st(d) * 1e-3) / 1e9
        r["derived"] = {"speedup_steady": st(dn) / st(d), "speedup_flush": dn["flush_ms"] / d["flush_ms"],
                        "gbs_steady": gbs, "roofline_frac_steady": gbs / copy if copy else None,
                        "speedup_steady_best": st(dn) / st(b) if b else None,
                        "gbs_steady_best": nb / (st(b) * 1e-3) / 1e9 if b else None}  # fmt: skip
        bc = (f"{st(b) * 1e3:.1f} ({_cfg_label(b['gemv'])}"
              f"{'→' + str(b['ks_used']) if b['gemv']['ks'] == 0 else ''}, {st(dn) / st(b):.2f}x)") if b else "—"  # fmt: skip
        k1s = f"{st(k1) * 1e3:.1f}" if k1 else "—"
        L.append(f"| {names[r['kind']]} | {r['out']}×{r['in']} | {r['m']} | {st(d) * 1e3:.1f} (w{gemv_warps(d['gemv'], 1 if r['m'] <= 8 else 2)}, {d['ks_used']}) | "
                 f"{k1s} | {st(dn) * 1e3:.1f} | **{st(dn) / st(d):.2f}x** | {d['flush_ms'] * 1e3:.1f} | "
                 f"{dn['flush_ms'] * 1e3:.1f} | {dn['flush_ms'] / d['flush_ms']:.2f}x | {gbs:.0f} "
                 f"({100 * gbs / copy:.0f}%) | {st(r['read_same_bytes']) * 1e3:.1f} | {bc} | "
                 f"{d['host_ms'] * 1e3:.1f} / {dn['host_ms'] * 1e3:.1f} |")  # fmt: skip
    L.append("")
    # int4 kinds: the untuned config with the scale applied before each MMA ("og": 0, the earlier kernel), timed in
    # the same search (graph time of the search pass, against the default's own search time: same method)
    og = []
    for r in bench:
        dg = r["default"]["gemv"]
        t_og = next((x["ms"] for x in r["search"] if "ms" in x and x["gemv"] == dg), None)
        t_old = next((x["ms"] for x in r["search"] if "ms" in x and x["gemv"] == dict(dg, og=0)), None)
        if r["kind"] != "sp16" and t_og and t_old:
            og.append((r, t_old / t_og))
            r["derived"]["og0_over_og_search"] = t_old / t_og
        for xs in (0, 3):
            t_xs = next((x["ms"] for x in r["search"] if "ms" in x and x["gemv"] == dict(dg, xs=xs)), None)
            if t_og and t_xs and dg.get("xs", 0) != xs:
                r["derived"][f"xs{xs}_over_default_search"] = t_xs / t_og
    if og:
        L.append("Scale after the MMAs (one quantization group per chunk, `og` 1, the default) vs before each MMA (`og` 0): "
                 "time with og 0 / time with og 1, same config otherwise, search pass of this run: "
                 + "; ".join(f"{names[kd]} {min(x for r, x in og if r['kind'] == kd):.2f}–"
                             f"{max(x for r, x in og if r['kind'] == kd):.2f}"
                             for kd in ("sp4", "dq4", "dq8", "sp8") if any(r["kind"] == kd for r, _ in og)) + ".")  # fmt: skip
        L.append("")

    parts = []
    for kd in KINDS_ORDER:
        for xs, what in ((0, "never staged"), (3, "always staged")):
            v = [r["derived"][f"xs{xs}_over_default_search"] for r in bench
                 if r["kind"] == kd and f"xs{xs}_over_default_search" in r.get("derived", {})]  # fmt: skip
            if v:
                parts.append(f"{names[kd]} {what} {min(v):.2f}–{max(v):.2f}")
    if parts:
        L.append("Activations staged in shared memory + ldmatrix (`xs`: 1 = M ≤ 8 kernel, 2 = M > 8, 3 = both) vs the "
                 "default's choice: time of the default config with `xs` set otherwise / the default's, same search "
                 "pass: " + "; ".join(parts) + ".")  # fmt: skip
        L.append("")

    def lbound(d):  # host time to issue one call >= the call's device time in the graph (no gaps)
        return d["host_ms"] >= st(d)

    lb = [r for r in bench if lbound(r["default"])]
    lbd = [r for r in bench if lbound(r["dense"])]
    loop_gap = [r["default"]["loop_ms"] / st(r["default"]) for r in bench]
    L.append(f"Launch loop without a graph: issuing one call of ours costs {min(r['default']['host_ms'] for r in bench) * 1e3:.1f}–"
             f"{max(r['default']['host_ms'] for r in bench) * 1e3:.1f} µs of host time (tvm-ffi call + cuLaunchKernel), "
             f"cuBLAS {min(r['dense']['host_ms'] for r in bench) * 1e3:.1f}–{max(r['dense']['host_ms'] for r in bench) * 1e3:.1f} µs "
             f"(F.linear); ours is launch-bound (host time ≥ its device time) at {len(lb)} of {len(bench)} points, cuBLAS at "
             f"{len(lbd)}; ours' loop time / graph time {min(loop_gap):.2f}–{max(loop_gap):.2f}. The steady columns use "
             "the CUDA graph (no host time between calls); the loop times are in the JSON (`loop_ms`, `host_ms`).")  # fmt: skip
    if raw.get("stopped"):
        L.append(f"Run stopped early: {raw['stopped']}.")
    L.append("")
    L.append(f"Reproduce: `{cmd}`.")
    (outdir / f"cuda_kernels_decode_{name}.json").write_text(json.dumps(doc, indent=1))
    (outdir / f"cuda_kernels_decode_{name}.md").write_text("\n".join(L) + "\n")
    print("\n".join(L))
    if args.tuning:
        write_decode_tuning(raw, name)


# ---------------------------------------------------------------------------------------------------- report (here)
def _fmt_x(v):
    return f"{v:.2f}x" if v is not None else "—"


def cmd_report(args):
    raw = json.loads(Path(args.raw).read_text())
    outdir = ROOT / "bench" / "results"
    outdir.mkdir(parents=True, exist_ok=True)
    checks = raw.get("checks", [])
    cand = raw.get("candidate_checks", [])
    bench = raw.get("bench", [])
    ceil = raw.get("ceilings", {})
    summary = {
        "device": raw.get("info"),
        "ceilings": ceil,
        "checks_total": len(checks),
        "checks_failed": sum(not c["ok"] for c in checks),
        "max_rel_err": max((c["rel_err"] for c in checks), default=None),
        "candidates_checked": len(cand),
        "candidates_failed": sum(not c["ok"] for c in cand),
    }
    doc = {"schema": "sparsec.bench.cuda/1", "command": "bash bench/device_pack.sh (see docs/cuda.md)", "summary": summary,
           "bench": bench, "checks": checks, "candidate_checks": cand, "winners": raw.get("winners", []),
           "tuning": raw.get("tuning", []), "raw_started": raw.get("started")}  # fmt: skip
    (outdir / "cuda_kernels.json").write_text(json.dumps(doc, indent=1))

    lines = [f"# sparsec CUDA kernels on {raw['info']['gpu']} ({raw.get('started', '')})", ""]
    lines.append(f"Ceilings measured in the same run: device copy {ceil.get('copy_gbs', 0):.0f} GB/s (read+write), "
                 f"cuBLAS fp16 8192³ {ceil.get('cublas_fp16_8192_tflops', 0):.0f} TFLOP/s; tensor-core issue rate from "
                 f"registers (bench/cuda_peak.cu): mma.sp m16n8k32 {ceil.get('peak_mma_sp_tflops_dense_equiv', 0):.0f} "
                 f"TFLOP/s dense-equivalent, dense mma m16n8k16 {ceil.get('peak_mma_tflops_dense_equiv', 0):.0f} TFLOP/s.")  # fmt: skip
    lines.append("")
    lines.append(f"Correctness: {summary['checks_total'] - summary['checks_failed']}/{summary['checks_total']} "
                 f"acceptance checks ≤ 1e-2 relative error vs float64 (max {summary['max_rel_err']:.2e}); "
                 f"{summary['candidates_checked'] - summary['candidates_failed']}/{summary['candidates_checked']} "
                 "search candidates correct.")  # fmt: skip
    lines.append("")
    names = {"sp16": "2:4 fp16", "sp4": "2:4 + int4 (g128)", "dq4": "int4 (g128), dense", "dq8": "int8 (g128), dense",
             "sp8": "2:4 + int8 (g128)"}  # fmt: skip
    lines.append("## Decode (M ≤ 16): time per call, speedup vs cuBLAS dense fp16, achieved bandwidth")
    lines.append("")
    lines.append("| kernel | out×in | M | ours µs | cuBLAS µs | vs dense | ours GB/s | % of copy BW | plain read of the same bytes µs |")
    lines.append("|---|---|---|---|---|---|---|---|---|")
    for r in bench:
        if r["m"] <= 16:
            rd = f"{r['ms_read_same_bytes'] * 1e3:.1f}" if "ms_read_same_bytes" in r else "—"
            lines.append(f"| {names[r['kind']]} | {r['out']}×{r['in']} | {r['m']} | {r['ms_ours'] * 1e3:.1f} | "
                         f"{r['ms_dense'] * 1e3:.1f} | {_fmt_x(r['speedup_vs_dense'])} | {r['gbs_ours']:.0f} | "
                         f"{100 * r['roofline_frac_ours']:.0f}% | {rd} |")  # fmt: skip
    lines.append("")
    lines.append("## Prefill (M ≥ 128): speedup vs cuBLAS dense fp16 and vs torch `to_sparse_semi_structured`")
    lines.append("")
    lines.append("| kernel | out×in | M | ours ms | cuBLAS ms | semi-structured ms | vs dense | vs semi | ours TFLOP/s (dense-equiv.) |")
    lines.append("|---|---|---|---|---|---|---|---|---|")
    for r in bench:
        if r["m"] > 16:
            semi = f"{r['ms_semi']:.3f}" if "ms_semi" in r else "—"
            lines.append(f"| {names[r['kind']]} | {r['out']}×{r['in']} | {r['m']} | {r['ms_ours']:.3f} | {r['ms_dense']:.3f} | "
                         f"{semi} | {_fmt_x(r['speedup_vs_dense'])} | {_fmt_x(r.get('speedup_vs_semi'))} | "
                         f"{r['tflops_ours_dense_equiv']:.0f} |")  # fmt: skip
    lines.append("")
    e2e_p = Path(args.raw).with_name("cuda_e2e.json")
    if e2e_p.exists():
        e2e = json.loads(e2e_p.read_text())
        doc["e2e"] = e2e["runs"]
        lines.append("## End to end: golden GPT compiled for h100, TVM runtime (runtime-only) vs sparsec's executor")
        lines.append("")
        lines.append("| variant | kernel | batch×seq | rel. error vs executor | ms per forward |")
        lines.append("|---|---|---|---|---|")
        kn = {"nm24": "cuda.nm24_mma_sp", "nm24_int4": "cuda.nm24_int4_mma_sp", "int4": "cuda.int4_dequant_mma"}
        for r in e2e["runs"]:
            lines.append(f"| {r['variant']} | {kn.get(r['variant'], '')} | {r['batch']}×{r['seq']} | {r['rel_err_vs_executor']:.1e} | {r['ms']:.2f} |")
        lines.append("")
    xml = Path(args.raw).with_name("pytest_gpu.xml")
    if xml.exists():
        import xml.etree.ElementTree as ET

        ts = ET.parse(xml).getroot()
        ts = ts if ts.tag == "testsuite" else ts.find("testsuite")
        cases = [{"name": c.get("name"), "seconds": float(c.get("time", 0)),
                  "outcome": "failed" if c.find("failure") is not None or c.find("error") is not None
                  else "skipped" if c.find("skipped") is not None else "passed"} for c in ts.iter("testcase")]  # fmt: skip
        doc["pytest_gpu"] = {"command": "pytest tests/test_cuda_kernels.py -m gpu", "tests": len(cases),
                             "passed": sum(c["outcome"] == "passed" for c in cases), "cases": cases}  # fmt: skip
        lines.append(f"GPU tests (`pytest tests/test_cuda_kernels.py -m gpu`, same machine): {doc['pytest_gpu']['passed']}/"
                     f"{len(cases)} passed.")  # fmt: skip
        lines.append("")
    (outdir / "cuda_kernels.json").write_text(json.dumps(doc, indent=1))
    lines.append("Reproduce: `bash bench/device_pack.sh` (builds the kernel library here and prints the device command), "
                 "then `python bench/bench_cuda.py report --raw <out>/cuda_device.json`.")  # fmt: skip
    (outdir / "cuda_kernels.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    if args.tuning:
        write_tuning(raw)


def write_decode_tuning(raw, name):
    """A steady-state decode run -> the GEMV config of golden/tuning/h100.json's entries of the run's shapes (the
    other paths and the entries' other data untouched): per (kind, shape) the searched config with the least geometric
    mean over the run's token counts of time / that count's best (chosen on the same measurement, as `sparsec tune`
    does), per token-tile kernel. Zero-point entries (not searched) get the untuned rule's config for zero points."""
    import math

    from sparsec.backends.kernels.cuda_sparse import GEMV_SHARED_KEYS, default_config, gemv_merge
    from sparsec.backends.tune import TuningDB, shipped_db_path

    def winner(rows):  # the config with the least summed log(time / best) over rows, its times, geometric mean
        score, ms = {}, {}
        for r in rows:
            ok = [x for x in r["search"] if "ms" in x]
            best = min(x["ms"] for x in ok)
            for x in ok:
                c = json.dumps(x["gemv"], sort_keys=True)
                score.setdefault(c, []).append(math.log(x["ms"] / best))
                ms.setdefault(c, {})[str(r["m"])] = x["ms"]
        full = [c for c, v in score.items() if len(v) == len(rows)]
        if not full:
            return None
        c = min(full, key=lambda c: (sum(score[c]), c))
        return json.loads(c), ms[c], math.exp(sum(score[c]) / len(rows))

    # each token-tile kernel is its own instantiation, grid and split: the M <= 8 kernel's fields from the winner over
    # the run's M <= 8 points, the M > 8 kernel's ("warps2", "rt2", "wr2", "ks2", "xs" bit 2) from the winner over its
    # M > 8 points, among the configs that share the first's pipeline options (u, og, pf, st)
    pick = {}
    by_shape = {}
    for r in raw.get("bench", []):
        by_shape.setdefault((r["kind"], r["out"], r["in"]), []).append(r)
    for key, rows in sorted(by_shape.items()):
        one = winner([r for r in rows if r["m"] <= 8])
        if one is None:
            continue
        same = [dict(r, search=[x for x in r["search"]
                                if all(x["gemv"].get(f) == one[0].get(f) for f in GEMV_SHARED_KEYS)])
                for r in rows if r["m"] > 8]  # fmt: skip
        two = winner(same) if same else None
        gemv, ms = dict(one[0]), dict(one[1])
        if two is not None:
            gemv = gemv_merge(one[0], two[0])
            ms.update(two[1])
        n_pts = len(rows)
        gm = math.exp((math.log(one[2]) * (n_pts - len(same)) + (math.log(two[2]) * len(same) if two else 0)) / n_pts)
        pick[key] = (gemv, ms, gm)
    path = shipped_db_path("h100")
    db = TuningDB(entries=TuningDB.read(path), path=path)
    changed = 0
    kind_of = {v: k for k, v in KERNEL_OF_KIND.items()}
    for e in db.entries:
        kind = kind_of.get(e["kernel"])
        got = pick.get((kind, e["key"].get("out"), e["key"].get("in")))
        if got is None or (kind != "sp16" and e["key"].get("group_size") != LLM_GS):
            continue
        gemv, ms, gm = dict(got[0]), got[1], got[2]
        if not e["key"].get("symmetric", True):  # zero points were not searched: the untuned rule with their registers
            e["config"]["gemv"] = default_config(kind, "sm_90a", e["key"]["out"], e["key"]["in"], asym=True)["gemv"]
            e.setdefault("ms", {}).pop("gemv", None)
            e["gemv_from"] = {"rule": "cuda_sparse.default_config (zero points: not searched)",
                              "run": f"bench/results/cuda_kernels_decode_{name}.json"}
            changed += 1
            continue
        e["config"]["gemv"] = gemv
        e.setdefault("ms", {})["gemv"] = ms
        e["gemv_from"] = {"run": f"bench/results/cuda_kernels_decode_{name}.json", "measured": raw.get("started"),
                          "method": "steady state (CUDA graph, rotating weights)", "mean_time_over_best": round(gm, 4)}
        changed += 1
    db.save(path, "h100")
    print(f"updated the GEMV config of {changed} entries in {path}")


def write_tuning(raw):
    """Winners -> golden/tuning/h100.json (measured) and a100.json (same configs where they fit sm_80, marked
    untuned: estimated, not measured on an A100)."""
    from sparsec.backends.kernels.cuda_sparse import default_config, gemm_valid
    from sparsec.backends.tune import TuningDB, shipped_db_path

    win = {}
    for w in raw.get("winners", []):
        win.setdefault((w["kind"], w["out"], w["in"]), {})[w["path"]] = w["config"]
    tun = raw.get("tuning", [])
    dev = raw["info"]["gpu"]
    for target in ("h100", "a100"):
        path = shipped_db_path(target)
        db = TuningDB(entries=TuningDB.read(path) if path.exists() else [], path=path)
        for (kind, n, k), paths in sorted(win.items()):
            cfg = default_config(kind)
            cfg.update(paths)
            if target == "a100":
                for p in ("gemm", "gemm_small"):
                    if not gemm_valid(kind, cfg[p], True, "sm_80"):
                        cfg[p] = default_config(kind)[p]
                cfg["untuned"] = True
                cfg["estimated_from"] = dev
            for asym in ((False,) if kind == "sp16" else (False, True)):
                key = {"format": {"sp16": "nm_sparse[dense]", "sp4": "nm_sparse[group_quant]", "dq4": "group_quant",
                                  "dq8": "group_quant", "sp8": "nm_sparse[group_quant]"}[kind], "out": n, "in": k, "act_dtype": "float16"}  # fmt: skip
                if kind not in ("dq4", "dq8"):
                    key["nm"] = "2:4"
                if kind != "sp16":
                    key.update({"bits": 8 if kind in ("dq8", "sp8") else 4, "group_size": LLM_GS, "symmetric": not asym,
                                "group_sparse": False})  # fmt: skip
                info = {"device": dev if target == "h100" else f"not measured (configs from {dev})",
                        "measured": raw.get("started")}  # fmt: skip
                c = dict(cfg)
                if asym and target == "h100":
                    c["untuned"] = True  # searched with symmetric zero points; asymmetric reuses the configs
                    c["estimated_from"] = "symmetric search"
                ms = {p: min((t["ms"] for t in tun if t["kind"] == kind and t["out"] == n and t["in"] == k and t["path"] == p
                              and t["config"] == cfg.get(p)), default=None, key=lambda d: sum(d.values()) if d else 0)
                      for p in ("gemv", "gemm_small", "gemm")}  # fmt: skip
                db.record(KERNEL_OF_KIND[kind], target, key, c, ms=ms, candidates=sum(1 for t in tun if t["kind"] == kind
                          and t["out"] == n and t["in"] == k), **info)  # fmt: skip
        db.save(path, target)
        print(f"wrote {path}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build")
    b.add_argument("--pack", default=".devpack")
    b.add_argument("--arch", nargs="+", default=["sm_90a"])
    b.add_argument("--manifest-only", action="store_true", help="write the manifest without compiling (dry runs)")
    b.add_argument("--decode", action="store_true", help="decode-only pack: GEMV configs x split counts (device --decode)")
    d = sub.add_parser("device")
    d.add_argument("--pack", default=".devpack")
    d.add_argument("--out", default=os.environ.get("OUT", "bench/results/tmp"))
    d.add_argument("--kinds", default=",".join(KINDS_ORDER))
    d.add_argument("--no-semi", action="store_true")
    d.add_argument("--decode", action="store_true",
                   help="decode only (M <= 16, LLM shapes): split-K checks, per-call (L2 flushed) and steady-state "
                        "(rotating weight copies > 2x L2, CUDA graph and launch loop) timings -> cuda_device_decode.json")
    d.add_argument("--m", default=",".join(map(str, DECODE_M)), help="decode token counts (with --decode)")
    d.add_argument("--budget-s", type=float, default=330.0, help="with --decode: stop timing new points after this")
    d.add_argument("--extra-shapes", default="", help="with --decode: more OUTxIN shapes to time, e.g. 4096x14336")
    r = sub.add_parser("report")
    r.add_argument("--raw", required=True)
    r.add_argument("--tuning", action="store_true", help="also write golden/tuning/{h100,a100}.json")
    r.add_argument("--decode-name", default=None,
                   help="the raw file is a --decode run: write bench/results/cuda_kernels_decode_<NAME>.{json,md}")
    a = ap.parse_args(argv)
    if a.cmd == "device" and a.decode:
        return cmd_device_decode(a)
    if a.cmd == "report" and a.decode_name:
        return cmd_report_decode(a)
    {"build": cmd_build, "device": cmd_device, "report": cmd_report}[a.cmd](a)


if __name__ == "__main__":
    main()
