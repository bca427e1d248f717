"""sparsec's CUDA kernels on a GPU: correctness, schedule search and speed against cuBLAS / cuSPARSELt, in one run.

Three steps (``bench/device_pack.sh`` runs the first and prints the command for the second)::

    python bench/bench_cuda.py build  --pack .devpack            # here: nvcc -> .devpack/sparsec_cuda.so + manifest
    python bench/bench_cuda.py device --pack .devpack --out DIR  # on the GPU: check + tune + bench -> DIR/cuda_device.json
    python bench/bench_cuda.py report --raw DIR/cuda_device.json # here: bench/results/cuda_kernels.{json,md},
                                                                 #       golden/tuning/h100.json (+ a100.json)

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
    PREFILL_M = [40]
    LLM_GS = 32
KINDS_ORDER = ("sp16", "sp4", "dq4")
KERNEL_OF_KIND = {"sp16": "cuda.nm24_mma_sp", "sp4": "cuda.nm24_int4_mma_sp", "dq4": "cuda.int4_dequant_mma"}


def ref_gs(kind: str, k: int) -> int:
    cols = k // 2 if kind == "sp4" else k
    for gs in (128, 64, 32, 16):
        if cols % gs == 0:
            return gs
    raise ValueError(f"no group size for {kind} K={k}")


# ---------------------------------------------------------------------------------------------------- build (here)
# The warp-specialized TMA candidates ("ws": 1) are left out of this in-process search until bench_gemm_v2.py, which runs
# each candidate in its own subprocess with a timeout, has shown them correct on the GPU (a hung mbarrier wait here
# would take the whole device call). SPARSEC_BENCH_WITH_WS=1 puts them in.
WITH_WS = os.environ.get("SPARSEC_BENCH_WITH_WS") == "1"


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

    for kind in ("sp16", "sp4", "dq4"):
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
    variants, rows = pack_variants()
    t = time.time()
    if args.manifest_only:
        (pack / "manifest.json").write_text(json.dumps({"archs": args.arch, "variants": rows}, indent=1))
        return
    build_shared(variants, args.arch, str(pack / "sparsec_cuda.so"), workdir=str(pack / "build"))
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
    cols = k // 2 if kind == "sp4" else k
    codes = rng.integers(0, 16, size=(n, cols), dtype=np.uint8)
    scales = (rng.uniform(0.5, 1.5, size=(n, cols // gs)) / (4 * math.sqrt(k))).astype(np.float16)
    zeros = rng.integers(4, 12, size=(n, cols // gs), dtype=np.uint8) if asym else None
    gq = GroupQuant.from_codes(codes, scales, zeros, 4, gs)
    if kind == "dq4":
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
    names = {"sp16": "2:4 fp16", "sp4": "2:4 + int4 (g128)", "dq4": "int4 (g128), dense"}
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
                key = {"format": {"sp16": "nm_sparse[dense]", "sp4": "nm_sparse[group_quant]", "dq4": "group_quant"}[kind],
                       "out": n, "in": k, "act_dtype": "float16"}  # fmt: skip
                if kind != "dq4":
                    key["nm"] = "2:4"
                if kind != "sp16":
                    key.update({"bits": 4, "group_size": LLM_GS, "symmetric": not asym, "group_sparse": False})
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
    d = sub.add_parser("device")
    d.add_argument("--pack", default=".devpack")
    d.add_argument("--out", default=os.environ.get("OUT", "bench/results/tmp"))
    d.add_argument("--kinds", default="sp16,sp4,dq4")
    d.add_argument("--no-semi", action="store_true")
    r = sub.add_parser("report")
    r.add_argument("--raw", required=True)
    r.add_argument("--tuning", action="store_true", help="also write golden/tuning/{h100,a100}.json")
    a = ap.parse_args(argv)
    {"build": cmd_build, "device": cmd_device, "report": cmd_report}[a.cmd](a)


if __name__ == "__main__":
    main()
