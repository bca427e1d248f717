"""2:4 fp16 prefill GEMM (M >= 2048): the Hopper warp-specialized TMA kernel (``ws``), the ``wgmma.mma_async.sp``
kernel without warp specialization (``wgmma``) and the ``mma.sp`` kernel, vs cuBLAS dense and torch
``to_sparse_semi_structured``, all measured in ONE device command, with correctness vs float64 in that command.

    python bench/bench_gemm_v2.py build --pack .devpack_v2          # here: every sp16 large-GEMM candidate, sm_90a
    # GPU machine (carry .devpack_v2 and .whl; tvm-ffi wheel installed to /tmp/site), one command < 10 minutes:
    python3 bench/bench_gemm_v2.py device --pack .devpack_v2 --out $OUT
    python bench/bench_gemm_v2.py report --raw <out>/cuda_gemm_v2.json  # -> bench/results/cuda_gemm_v2.{json,md}

``device`` is a driver: every candidate runs in its own subprocess with a timeout (``cand``), so a kernel that hangs
(e.g. an mbarrier wait that never completes) or faults is marked failed and the run goes on; a global budget
(``--budget-s``) keeps the whole command under the device tool's 10-minute limit (candidates that no longer fit are
marked skipped). Each candidate child first runs the smoke shapes (small, with token / weight-row / K tails and enough
k tiles to wrap every stage's mbarrier phase several times), then the correctness checks of ``CHECK`` (float64
reference, fresh random inputs, output poisoned with NaN), then the timings on the LLM shapes at M = 2048 and 8192
(L2 flushed before every call, bench_cuda.Ctx.time). cuBLAS (``F.linear`` on the dense fp16 weight with the same
values) and the semi-structured path are timed by a ``baseline`` child before and after the candidates (the spread
is reported). Each child writes its part file after every step, so a killed child still says where it stopped.
Weights are prepared once and cached on disk (``--cache``) for all children.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import bench_cuda as bc  # noqa: E402

PREFILL_M = [2048, 8192]
CHECK = [((4096, 4096), 300), ((4096, 4096), 2048), ((352, 128), 37 + 256), ((128, 352), 300), ((10, 64), 200),
         ((11008, 4096), 8192), ((4096, 11008), 2048), ((11008, 4096), 2048), ((272, 3808), 150)]  # fmt: skip
# tail split ("tail": N) on 132 SMs: 11008x4096 M = 2048 is 660 whole tiles + 28 tiles in 4 parts (256x128 tiles);
# (272, 3808) M = 150: 4 tiles, 30 k tiles of 128 in 7 (N = 8) / 4 / 2 parts of uneven, odd lengths, K tail
# first stage of every ws candidate (written without a GPU): tiny, tails everywhere. (264, 320): 5 / 3 k tiles
# (BK 64 / 128: an odd count, the tail path) with the last X box partly beyond K, a weight-row tail and a token tail;
# (128, 2048): 32 / 16 k tiles, so every stage's full/empty mbarriers go through several phases; (16, 64): a single
# k tile and one weight row tile for a 128/256-row block (a cluster's second CTA has no rows at all)
SMOKE = [((256, 256), 256), ((264, 320), 200), ((128, 2048), 300), ((16, 64), 130)]
if bc.DRY:
    PREFILL_M = [40]
    CHECK = [((352, 128), 37), ((10, 64), 20)]
    SMOKE = [((264, 320), 20)]
PATHS = ("mma.sp", "wgmma", "ws")
DEVICE_CMD = ("python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "
              ".whl/apache_tvm_ffi-*.whl && export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 && python3 "
              "bench/bench_gemm_v2.py device --pack .devpack_v2 --out $OUT 2>&1 | tee $OUT/log.txt | tail -70")  # fmt: skip
SETS = {"ws": ("ws",), "hopper": ("ws", "wgmma"), "all": PATHS}


def _path(c: dict) -> str:
    return "ws" if c.get("ws") else "wgmma" if c.get("wgmma") else "mma.sp"


def _family(c: dict) -> int:
    """ws kernels: 0 one tile per CTA, 1 persistent, 2 cluster of 2 (a systematic hang is counted per family)."""
    return 1 if c.get("persistent") else 2 if c.get("cluster", 1) > 1 else 0


# mma GEMM tiles of a quantized kind measured against each other with ``build --mma-tiles``: the default large and
# small tiles and ones with more token columns a warp (the dequantization of a weight fragment is shared by the MMAs of
# a warp's token tiles), all without spills under ptxas for dq8 (128x256 tiles spill there)
MMA_TILES = ((128, 128, 64, 2, 4, 4), (128, 128, 64, 4, 2, 4), (64, 128, 128, 2, 2, 3), (64, 64, 128, 2, 2, 3),
             (128, 64, 128, 4, 1, 3), (128, 128, 128, 4, 2, 3), (64, 128, 64, 2, 2, 4))


def variants_int4(kind: str, gs: int = 128, mma_tiles: bool = False):
    """A quantized kind (``sp4``: 2:4 + int4, ``dq4``: dense int4, ``dq8``: dense int8; symmetric, group ``gs``) on
    sm_90a: its mma.sp / mma large GEMM (``"dq16": 0``) and the dequantize + warp-specialized wgmma path (``"dq16": 1``,
    the default), its fp16 weight read by TMA tensor maps (the default) and by bulk copies (``"wmap": 0``), for
    ``ab``; ``mma_tiles``: also the mma GEMM with each of MMA_TILES. Every M <= 16 runs the kind's untuned decode GEMV
    (warps not fitted to the shape)."""
    from sparsec.backends.kernels.cuda_sparse import Variant, default_config, gemm_valid

    base = default_config(kind)
    rows = []
    gemms = [dict(base["gemm"], dq16=dq, **({"wmap": wm} if wm is not None else {})) for dq, wm in ((0, None), (1, 0), (1, None))]
    if mma_tiles:
        tiles = [{"bm": bm, "bn": bn, "bk": bk, "wm": wm_, "wn": wn, "stages": st, "group": 16, "dq16": 0}
                 for bm, bn, bk, wm_, wn, st in MMA_TILES]  # fmt: skip
        gemms += [c for c in tiles if gemm_valid(kind, c, False, "sm_90a") and c != gemms[0]]
    for g in gemms:
        dq, wm = g["dq16"], g.get("wmap")
        v = Variant.make(kind, False, gs, dict(base, gemm=g, small_max=16))
        kn = v.kernel_names()
        rows.append({"func": v.func_name, "kind": kind, "asym": False, "gs": gs, "config": v.config_dict(),
                     "path": "dq16" if dq else "mma.sp", "wgmma": bool(dq), "ws": False, "default": bool(dq and wm is None),
                     "reference": g is gemms[0], "kernel": kn["dq16_convert"] + "+" + kn["dq16_gemm"] if dq else kn["gemm"]})
    return [Variant.make(kind, False, gs, r["config"]) for r in rows], rows


def variants_mid(kinds):
    """M = 17..128 (between the decode GEMV and the large GEMM): per kind, its default (the small-tile mma GEMM up to
    small_max = 128) and the large path from M = 17 on (``small_max`` 16): for sp16 the default warp-specialized
    tail-split GEMM and two verified tail-split tiles, for the int kinds their dequantize + ws path. For ``ab``:
    ``--pick`` the "small" kernel against the large ones at ``--prefill-m 32 64 128``."""
    from sparsec.backends.kernels.cuda_sparse import Variant, default_config, search_space, ws_tag

    rows, seen = [], set()
    for kind in kinds:
        gs = 0 if kind == "sp16" else 128
        base = default_config(kind)
        cands = [("small", dict(base))]
        large = [base["gemm"]]
        if kind == "sp16":
            large += [c for c in search_space("sp16", "sm_90a")["gemm"]
                      if c.get("ws") and ws_tag(c) in ("wst8 256x128x128 s3", "wst4m 256x128x128 s3")]
        cands += [("large", dict(base, gemm=c, small_max=16)) for c in large]
        for path, cfg in cands:
            v = Variant.make(kind, False, gs, cfg)
            if v.func_name in seen:
                continue
            seen.add(v.func_name)
            kn = v.kernel_names()
            if path == "small":
                kernel = kn["gemm_small"]
            elif v.cfg("gemm").get("dq16"):
                kernel = kn["dq16_convert"] + "+" + kn.get("dq16_gemm_tail", kn["dq16_gemm"])
            else:
                kernel = kn.get("gemm_tail", kn["gemm"])
            rows.append({"func": v.func_name, "kind": kind, "asym": False, "gs": gs, "config": v.config_dict(),
                         "path": path, "wgmma": path != "small", "ws": path != "small", "default": path == "small",
                         "reference": path == "small", "kernel": kernel})  # fmt: skip
    return [Variant.make(r["kind"], False, r["gs"], r["config"]) for r in rows], rows


def variants():
    from sparsec.backends.kernels.cuda_sparse import DEFAULT_GEMM, Variant, default_config, search_space

    base = default_config("sp16")
    rows, seen = [], set()
    for c in [base["gemm"]] + search_space("sp16", "sm_90a")["gemm"]:
        v = Variant.make("sp16", False, 0, dict(base, gemm=c, small_max=16))  # every M > 16 on the large path
        if v.func_name in seen:
            continue
        seen.add(v.func_name)
        rows.append({"func": v.func_name, "kind": "sp16", "asym": False, "gs": 0, "config": v.config_dict(),
                     "path": _path(c), "wgmma": bool(c.get("wgmma") or c.get("ws")), "ws": bool(c.get("ws")),
                     "default": c == base["gemm"], "reference": c == DEFAULT_GEMM["sp16"],
                     "kernel": v.kernel_names().get("gemm_tail", v.kernel_names()["gemm"])})  # fmt: skip
    return [Variant.make("sp16", False, 0, r["config"]) for r in rows], rows


def cmd_build(args):
    from sparsec.backends.kernels.cuda_compile import build_shared, ptxas_report

    pack = Path(args.pack)
    pack.mkdir(parents=True, exist_ok=True)
    if args.mid:
        vs, rows = variants_mid(args.mid)
    else:
        vs, rows = variants_int4(args.kind, mma_tiles=args.mma_tiles) if args.kind != "sp16" else variants()
    t = time.time()
    build_shared(vs, ["sm_90a"], str(pack / "sparsec_cuda.so"), workdir=str(pack / "build"))
    rep = ptxas_report(vs, "sm_90a", str(pack / "ptxas"))  # registers / spills / wgmma serialization per kernel
    for r in rows:
        r["ptxas"] = {k: rep.get(k, {}) for k in r["kernel"].split("+")} if "+" in r["kernel"] else rep.get(r["kernel"], {})
    (pack / "manifest.json").write_text(json.dumps({"archs": ["sm_90a"], "variants": rows}, indent=1))
    shutil.rmtree(pack / "build", ignore_errors=True)
    shutil.rmtree(pack / "ptxas", ignore_errors=True)
    # the device machine needs the apache-tvm-ffi wheel (to load the library); keep pack and wheels out of git
    import tvm_ffi

    whl = ROOT / ".whl"
    if not list(whl.glob(f"apache_tvm_ffi-{tvm_ffi.__version__}-cp312-*.whl")):
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "--python-version",
                        "3.12", "--implementation", "cp", "--platform", "manylinux_2_28_x86_64", "--platform",
                        "manylinux_2_17_x86_64", "--platform", "manylinux2014_x86_64", "-d", str(whl),
                        f"apache-tvm-ffi=={tvm_ffi.__version__}"], check=True)  # fmt: skip
    exclude = ROOT / ".git" / "info" / "exclude"
    if (ROOT / ".git").is_dir():
        exclude.parent.mkdir(exist_ok=True)
        have = exclude.read_text().split() if exclude.exists() else []
        rel = "/" + os.path.relpath(pack.resolve(), ROOT) + "/"
        with open(exclude, "a") as f:
            for d in (rel, "/.whl/"):
                if d not in have and not d.startswith("/.."):
                    f.write(d + "\n")
    bad = [r["kernel"] for r in rows  # (a dq16 row names its two kernels, joined by "+")
           if any(rep.get(k, {}).get("spill_bytes") or rep.get(k, {}).get("wgmma_serialized") for k in r["kernel"].split("+"))]
    print(f"built {len(rows)} functions ({sum(r['ws'] for r in rows)} ws) in {time.time() - t:.0f}s; "
          f"spilling or wgmma-serialized: {bad or 'none'}")
    print("# on the GPU machine (device tool `run`, carry [\"" + os.path.relpath(pack.resolve(), ROOT) + "\", \".whl\"]):\n"
          + DEVICE_CMD.replace(".devpack_v2", os.path.relpath(pack.resolve(), ROOT)))


# ------------------------------------------------------------------------------------------------ children (GPU)
def _ctx(pack: Path, out: Path):
    import torch

    torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction = False
    man = json.loads((pack / "manifest.json").read_text())
    if bc.DRY:
        lib = bc.DryLib(man)
    else:
        import tvm_ffi

        lib = tvm_ffi.load_module(str(pack / "sparsec_cuda.so"))
    return torch, man, bc.Ctx(lib, man, torch, out)


class CachedWeight(bc.Weight):
    """bc.Weight of an sp16 (n, k) weight with the seed bc.Ctx.weight uses, prepared once and kept in ``cache``
    (every child process needs the same weights; preparing the LLM shapes takes seconds each)."""

    def __init__(self, ctx, n, k, cache: Path):  # noqa: super().__init__ is replaced by the cache
        import numpy as np

        from sparsec.backends.kernels.cuda_sparse import prepare

        torch = ctx.torch
        seed = 10 * (n + 3 * k)  # bc.Ctx.weight's seed for sp16, symmetric
        f = cache / f"sp16_{n}x{k}_{seed}.npz"
        if f.exists():
            z = np.load(f)
            arrays, dense = [z["a0"], z["a1"]], z["dense"]
        else:
            fmt = bc.make_weight("sp16", n, k, 0, False, np.random.default_rng(seed))
            arrays, dense = prepare("sp16", fmt), fmt.materialize().astype(np.float32)
            cache.mkdir(parents=True, exist_ok=True)
            tmp = cache / f".{f.name}.{os.getpid()}.npz"
            np.savez(tmp, a0=arrays[0], a1=arrays[1], dense=dense)
            os.replace(tmp, f)
        self.kind, self.n, self.k, self.gs, self.asym = "sp16", n, k, 0, False
        self.arrays = arrays
        self.ws = [torch.from_numpy(a.view(np.int32) if a.dtype == np.uint32 else a).to(bc.DEV) for a in arrays]
        self.w_dense32 = torch.from_numpy(dense).to(bc.DEV)
        self.w16 = self.w_dense32.half()
        self.nbytes = sum(a.nbytes for a in arrays)


def _weights(ctx, cache: Path):
    memo = {}

    def get(n, k):
        if (n, k) not in memo:
            memo[(n, k)] = CachedWeight(ctx, n, k, cache)
        return memo[(n, k)]

    return get


def _write(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def cmd_baseline(args):
    """cuBLAS dense and torch semi-structured on the LLM shapes (+ device info, cuBLAS 8192^3 TFLOP/s)."""
    torch, man, ctx = _ctx(Path(args.pack), Path(args.part).parent)
    part = {"info": bc.device_info(torch), "stage": "start", "shapes": []}
    path = Path(args.part)
    _write(path, part)
    if not bc.DRY:
        a = torch.randn(8192, 8192, device="cuda", dtype=torch.float16)
        t = ctx.time(lambda: a @ a)
        part["cublas_8192_tflops"] = 2 * 8192**3 / (t * 1e-3) / 1e12
        del a
    W = _weights(ctx, Path(args.cache))
    for n, k in bc.LLM_SHAPES:
        wt = W(n, k)
        semi = None
        if not bc.DRY:
            try:
                from torch.sparse import to_sparse_semi_structured

                semi = to_sparse_semi_structured(wt.w16)
            except Exception as e:  # the dense baseline still counts; the semi column says why it is missing
                part.setdefault("semi_error", f"{type(e).__name__}: {e}"[:300])
        for m in args.prefill_m:
            part["stage"] = f"baseline {n}x{k} M={m}"
            _write(path, part)
            x = torch.randn(m, k, device=bc.DEV, dtype=torch.float16)
            t_dense = ctx.time(lambda: torch.nn.functional.linear(x, wt.w16))
            t_semi = ctx.time(lambda: torch.nn.functional.linear(x, semi)) if semi is not None else float("nan")
            part["shapes"].append({"out": n, "in": k, "m": m, "ms_dense": t_dense, "ms_semi": t_semi})
        del semi
    if args.extra_checks:  # warm the weight cache of the check shapes too (the candidates then only load them)
        for (n, k), _ in CHECK:
            W(n, k)
    part["stage"] = "done"
    _write(path, part)


def cmd_cand(args):
    """One candidate: smoke shapes (ws), correctness checks, timings. Exit 0 when everything ran and was correct."""
    torch, man, ctx = _ctx(Path(args.pack), Path(args.part).parent)
    path = Path(args.part)
    row = next(r for r in man["variants"] if r["func"] == args.func)
    part = {"func": args.func, "path": row["path"], "config": row["config"]["gemm"], "stage": "start", "smoke": [],
            "checks": [], "bench": []}  # fmt: skip
    _write(path, part)
    W = _weights(ctx, Path(args.cache))
    # smoke shapes (ws) first, then the correctness checks; the stage names what a hang or failure interrupted
    phases = ([("smoke", "smoke", SMOKE, 500)] if args.smoke else []) + [("check", "checks", CHECK, 1000)]
    for label, key, shapes, seed0 in phases:
        for (n, k), m in shapes:
            part["stage"] = f"{label} {n}x{k} M={m}"
            _write(path, part)
            c = bc.check(ctx, args.func, W(n, k), m, seed=seed0 + m + n)
            part[key].append(c)
            if not c["ok"]:
                part["stage"] = f"{label} failed {n}x{k} M={m}"
                _write(path, part)
                print("WRONG", c, flush=True)
                return 1
    if not args.no_bench:
        for n, k in bc.LLM_SHAPES:
            wt = W(n, k)
            for m in args.prefill_m:
                part["stage"] = f"bench {n}x{k} M={m}"
                _write(path, part)
                x = torch.randn(m, k, device=bc.DEV, dtype=torch.float16)
                y = torch.empty(m, n, device=bc.DEV, dtype=torch.float16)
                t = ctx.time(lambda: bc.run_ours(ctx, args.func, wt, x, y))
                part["bench"].append({"out": n, "in": k, "m": m, "ms_ours": t,
                                      "tflops_ours_dense_equiv": 2 * m * n * k / (t * 1e-3) / 1e12})  # fmt: skip
    for m in args.extra_m:  # winners: acceptance-style checks at every large-path M on fresh inputs
        for n, k in bc.LLM_SHAPES:
            part["stage"] = f"final check {n}x{k} M={m}"
            _write(path, part)
            c = bc.check(ctx, args.func, W(n, k), m, seed=77 + m)
            part["checks"].append(c)
            if not c["ok"]:
                part["stage"] = f"final check failed {n}x{k} M={m}"
                _write(path, part)
                return 1
    part["stage"] = "done"
    _write(path, part)
    return 0


def _pick(man: dict, picks: list[str]) -> list[dict]:
    """Manifest rows named by ``KERNEL_SUBSTRING[:TAIL]`` (tail: the config's "tail", 0 = none)."""
    out = []
    for p in picks:
        sub, _, tail = p.partition(":")
        rows = [r for r in man["variants"] if sub in r["kernel"] and r["config"]["gemm"].get("tail", 0) == int(tail or 0)]
        if len(rows) != 1:
            raise SystemExit(f"--pick {p}: {len(rows)} manifest rows match (need exactly one)")
        out.append(rows[0])
    return out


def cmd_ab(args):
    """Interleaved A/B timing of already-verified candidates and cuBLAS: for every LLM shape and M, ``--rounds`` rounds,
    each timing every candidate and cuBLAS once (bench_cuda.Ctx.time: L2 flushed before each call) in an order that
    rotates from round to round, so clock and temperature drift during the run, and the heat the previous contender
    left (at M = 8192 the first contender after cuBLAS ran up to 20 % slower in a fixed order:
    bench/results/cuda_gemm_v2_tail_ab_fixed_order.md), hit all alike. -> <out>/cuda_gemm_v2_ab.json (medians in ab-report)."""
    pack, out = Path(args.pack), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch, man, ctx = _ctx(pack, out)
    rows = _pick(man, args.pick)
    kinds = {(r["kind"], r["gs"], r["asym"]) for r in rows}
    if len(kinds) != 1:
        raise SystemExit(f"--pick: candidates of one weight format only, got {sorted(kinds)}")
    kind, gs, asym = kinds.pop()
    W = _weights(ctx, Path(args.cache)) if kind == "sp16" else (lambda n, k: ctx.weight(kind, n, k, gs, asym))
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes] if args.shapes else bc.LLM_SHAPES
    res = {"started": time.strftime("%Y-%m-%d %H:%M:%S"), "argv": sys.argv, "info": bc.device_info(torch), "order": "rotating",
           "candidates": [{"func": r["func"], "kernel": r["kernel"], "config": r["config"]["gemm"], "kind": r["kind"],
                           "gs": r["gs"], "asym": r["asym"]} for r in rows],
           "checks": [], "times": []}  # fmt: skip
    for n, k in shapes:
        wt = W(n, k)
        for m in args.prefill_m:
            for r in rows:  # correctness of each candidate at this very shape first (float64, fresh inputs)
                c = bc.check(ctx, r["func"], wt, m, seed=5 + m + n)
                res["checks"].append(dict(c, func=r["func"]))
                if not c["ok"]:
                    print("WRONG", r["kernel"], c, flush=True)
                    _write(out / "cuda_gemm_v2_ab.json", res)
                    return 1
            x = torch.randn(m, k, device=bc.DEV, dtype=torch.float16)
            y = torch.empty(m, n, device=bc.DEV, dtype=torch.float16)
            t = {"cublas": []} | {r["func"]: [] for r in rows}
            calls = [("cublas", lambda: torch.nn.functional.linear(x, wt.w16))]
            calls += [(r["func"], lambda f=r["func"]: bc.run_ours(ctx, f, wt, x, y)) for r in rows]
            for i in range(args.rounds):  # the order rotates every round: each contender follows each other one alike
                for name, fn in calls[i % len(calls):] + calls[: i % len(calls)]:
                    t[name].append(ctx.time(fn))
            res["times"].append({"out": n, "in": k, "m": m, "ms": t})
            med = {f: sorted(v)[len(v) // 2] for f, v in t.items()}
            print(f"{n}x{k} M={m}: cuBLAS {med['cublas']:.4f} ms; "
                  + "; ".join(f"{r['kernel'][13:]} t{r['config']['gemm'].get('tail', 0)} {med[r['func']]:.4f} "
                              f"({med['cublas'] / med[r['func']]:.3f}x)" for r in rows), flush=True)  # fmt: skip
            _write(out / "cuda_gemm_v2_ab.json", res)
    return 0


def cmd_ab_report(args):
    raw = json.loads(Path(args.raw).read_text())
    dst = Path(args.dst)
    (dst / f"{args.name}.json").write_text(json.dumps(raw, indent=1))
    cands = raw["candidates"]
    # a --mid "small" row times the small-tile kernel, whatever large-GEMM config it carries
    label = {c["func"]: (f"small tile {c['kernel'].split('_', 3)[-1]} (the M <= 128 default)" if (c["config"].get("ws") or c["config"].get("dq16")) and "_ws" not in c["kernel"]
                         and "to_fp16" not in c["kernel"] else _cfg(c["config"])) for c in cands}  # fmt: skip
    ch = raw["checks"]
    kind = cands[0].get("kind") or ("sp4" if any("sp4" in c["kernel"] for c in cands) else "sp16")  # (older runs)
    what = {"sp16": "2:4 fp16", "sp4": "2:4 + int4", "dq4": "int4", "dq8": "int8"}[kind]
    what += f" (group {cands[0].get('gs', 128)}, symmetric)" if kind != "sp16" else ""
    path = "decode GEMV and prefill GEMM" if min(t["m"] for t in raw["times"]) <= 16 else "prefill GEMM"
    L = [f"# {what} {path}, interleaved A/B vs cuBLAS ({raw['info'].get('gpu', '')}, {raw['started']})", "",
         f"Median of {len(raw['times'][0]['ms']['cublas'])} rounds; every round times cuBLAS (`F.linear`, dense fp16 "
         "weight with the same values) and each candidate once, "
         + ("in an order rotating from round to round" if raw.get("order", "rotating") == "rotating"
            else "always in the same order (cuBLAS, then the candidates as listed)")
         + ", L2 flushed before each call. Correctness in the same "
         f"run: {sum(c['ok'] for c in ch)}/{len(ch)} checks within 1e-2 of float64 (max rel. error "
         f"{max(c['rel_err'] for c in ch):.2e}).", "",
         "Each cell: median ms (vs cuBLAS's median), then the fastest round's ms (vs cuBLAS's fastest).", "",
         "| out×in | M | cuBLAS ms median / min | " + " | ".join(label[c["func"]] for c in cands) + " |",
         "|---|---|---|" + "---|" * len(cands)]  # fmt: skip
    for t in raw["times"]:
        med = {f: sorted(v)[len(v) // 2] for f, v in t["ms"].items()}
        lo = {f: min(v) for f, v in t["ms"].items()}
        L.append(f"| {t['out']}×{t['in']} | {t['m']} | {med['cublas']:.4f} / {lo['cublas']:.4f} | "
                 + " | ".join(f"{med[c['func']]:.4f} ({med['cublas'] / med[c['func']]:.2f}x); {lo[c['func']]:.4f} "
                              f"({lo['cublas'] / lo[c['func']]:.2f}x)" for c in cands) + " |")  # fmt: skip
    L += ["", f"Command: `{' '.join(raw['argv'][1:])}` (on the GPU), then `python bench/bench_gemm_v2.py ab-report --raw "
          f"<out>/cuda_gemm_v2_ab.json --name {args.name}`."]  # fmt: skip
    (dst / f"{args.name}.md").write_text("\n".join(L) + "\n")
    print("\n".join(L))


def cmd_copy_cost(args):
    """Per-stage cost of the one-tile ws kernels of a committed ``device`` run (no GPU needed): stage time (the run's
    time / (waves x k tiles), 132 SMs), the cp.async.bulk copies a stage issues (2 x BM/16: weights + metadata per row
    tile) and the bytes it moves, per shape and M. The evidence behind ``"wmap"`` (docs/cuda.md)."""
    import math

    from sparsec.backends.kernels.cuda_sparse import ws_layout

    raw = json.loads(Path(args.raw).read_text())
    sms = args.sms
    L = [f"# Per-stage cost of the one-tile warp-specialized kernels ({raw['info'].get('gpu', '')}, run of {raw['started']})",
         "", f"From `{args.raw}` (`python bench/bench_gemm_v2.py copy-cost --raw {args.raw}`). Stage time = the run's "
         f"median time / (waves x k tiles), waves = ceil(tiles / {sms}); copies = the cp.async.bulk copies a stage issues "
         "(weights and metadata, one per row tile each); L2 -> SM rate = bytes of a stage x SMs / stage time.", "",
         "| out×in | M | tile | stages | vs cuBLAS | µs / stage | bulk copies / stage | ns / copy | bytes / stage | L2 -> SM TB/s |",
         "|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    rows = []
    for b in raw["bench"]:
        c = b["config"].get("gemm", b["config"])
        if not c.get("ws") or c.get("persistent") or c.get("cluster", 1) > 1 or c.get("tail"):
            continue
        bm, bn, bk = c["bm"], c["bn"], c["bk"]
        waves = math.ceil(math.ceil(b["out"] / bm) * math.ceil(b["m"] / bn) / sms)
        us = b["ms_ours"] * 1000 / (waves * math.ceil(b["in"] / bk))
        copies = 2 * bm // 16
        stage = ws_layout(c)["tx_bytes"]  # X + weights + metadata: what the stage's copies deliver
        rows.append((b["out"], b["in"], b["m"], bm, bn, bk, c["stages"], b["speedup_vs_dense"], us, copies, stage))
    for o, i, m, bm, bn, bk, st, sp, us, copies, stage in sorted(rows):
        L.append(f"| {o}×{i} | {m} | {bm}×{bn}×{bk} | {st} | {sp:.2f}x | {us:.2f} | {copies} | {us * 1000 / copies:.0f} | "
                 f"{stage} | {stage * sms / us / 1e6:.1f} |")  # fmt: skip
    if args.name:
        (Path(args.dst) / f"{args.name}.md").write_text("\n".join(L) + "\n")
    print("\n".join(L))


# ------------------------------------------------------------------------------------------------ driver (GPU)
def _stage(part: Path | None) -> str:
    try:
        return json.loads(part.read_text()).get("stage", "") if part is not None else ""
    except (OSError, ValueError):
        return ""


def _child(argv: list[str], timeout: float, log, part: Path | None = None, smoke_timeout: float = 0) -> dict:
    """Run a child of this script in its own process group; kill the group on timeout, or when it is still in its
    start-up / smoke stage (read from its part file) after ``smoke_timeout`` seconds. -> status dict."""
    t0 = time.time()
    if part is not None:
        part.unlink(missing_ok=True)  # a stale part file must not speak for this child
    cmd = [sys.executable, str(Path(__file__).resolve()), *argv]
    with open(log.name + ".child", "w+") as buf:  # a file, not a pipe: a chatty child cannot block on a full pipe
        p = subprocess.Popen(cmd, stdout=buf, stderr=subprocess.STDOUT, text=True, start_new_session=True)
        status = None
        while p.poll() is None:
            el = time.time() - t0
            st = _stage(part)
            if el > timeout or (smoke_timeout and el > smoke_timeout and (st in ("", "start") or st.startswith("smoke"))):
                os.killpg(p.pid, 9)  # the child's own group (start_new_session): only what this driver started
                p.wait()
                status = "timeout" if el > timeout else "timeout (smoke)"
                break
            time.sleep(0.25)
        buf.seek(0)
        out = buf.read()
    if status is None:
        status = "ok" if p.returncode == 0 else ("wrong" if "WRONG" in out else "crash")
    log.write(f"$ {' '.join(argv)}\n{out}\n[{status} rc={p.returncode} {time.time() - t0:.1f}s]\n")
    log.flush()
    return {"status": status, "rc": p.returncode, "seconds": time.time() - t0, "tail": (out or "")[-1500:]}


def cmd_device(args):
    pack, out = Path(args.pack), Path(args.out)
    parts = out / "parts"
    parts.mkdir(parents=True, exist_ok=True)
    man = json.loads((pack / "manifest.json").read_text())
    keep = SETS[args.set]
    always = lambda r: r["default"] or r.get("reference")  # noqa: E731 - the sm_90a default and the mma.sp tile
    rows = [r for r in man["variants"] if r["path"] in keep or always(r)]
    if args.only:
        rows = [r for r in rows if always(r) or any(s in r["kernel"] for s in args.only)]
    # ws first (the largest tiles and deepest pipelines first), then wgmma, then mma.sp
    rows.sort(key=lambda r: (PATHS[::-1].index(r["path"]), _family(r["config"]["gemm"]),
                             -r["config"]["gemm"]["bm"] * r["config"]["gemm"]["bn"], r["config"]["gemm"]["bk"],
                             -r["config"]["gemm"]["stages"], r["func"]))  # fmt: skip
    t0 = time.time()
    deadline = t0 + args.budget_s
    res = {"started": time.strftime("%Y-%m-%d %H:%M:%S"), "argv": sys.argv, "set": args.set, "candidates": [],
           "checks": [], "smoke": [], "bench": []}  # fmt: skip
    common = ["--pack", str(pack), "--cache", args.cache, "--prefill-m", *map(str, args.prefill_m)]
    log = open(out / "children.log", "a")

    def save():
        res["seconds"] = time.time() - t0
        _write(out / "cuda_gemm_v2.json", res)

    def baseline(tag, extra=()):
        p = parts / f"baseline_{tag}.json"
        st = _child(["baseline", *common, "--part", str(p), *extra], args.baseline_timeout, log, p)
        b = json.loads(p.read_text()) if p.exists() else {}
        res[f"baseline_{tag}"] = dict(b, run=st)
        print(f"baseline {tag}: {st['status']} {st['seconds']:.0f}s "
              + " ".join(f"{s['out']}x{s['in']}/{s['m']} {s['ms_dense']:.3f}" for s in b.get("shapes", [])), flush=True)
        return b

    b0 = baseline("start", ["--extra-checks"])
    res["info"] = b0.get("info", {})
    res["cublas_8192_tflops"] = b0.get("cublas_8192_tflops", float("nan"))
    dense = {(s["out"], s["in"], s["m"]): s for s in b0.get("shapes", [])}
    save()
    for r in rows:
        left = deadline - time.time() - args.reserve_s
        if left < 20:
            res["candidates"].append({"func": r["func"], "kernel": r["kernel"], "path": r["path"], "status": "skipped (budget)"})
            continue
        p = parts / f"{r['func']}.json"
        argv = ["cand", *common, "--func", r["func"], "--part", str(p)] + (["--smoke"] if r["ws"] else [])
        fam = [c for c in res["candidates"] if c["path"] == "ws" and c.get("family") == _family(r["config"]["gemm"])]
        if r["ws"] and sum(c["status"].startswith("timeout") for c in fam) >= 3 and not any(c["status"] == "ok" for c in fam):
            # three configs of this ws family hung and none passed: a systematic bug, keep the budget for the others
            res["candidates"].append({"func": r["func"], "kernel": r["kernel"], "path": r["path"],
                                      "family": _family(r["config"]["gemm"]), "status": "skipped (3 hangs in its family, none ok)"})  # fmt: skip
            continue
        st = _child(argv, min(args.cand_timeout, left), log, p, args.smoke_timeout if r["ws"] else 0)
        part = json.loads(p.read_text()) if p.exists() else {}
        res["candidates"].append({"func": r["func"], "kernel": r["kernel"], "path": r["path"], "config": r["config"]["gemm"],
                                  "family": _family(r["config"]["gemm"]), "status": st["status"], "stage": part.get("stage"), "seconds": st["seconds"],
                                  "ptxas": r.get("ptxas"), "tail": st["tail"] if st["status"] != "ok" else ""})  # fmt: skip
        for key in ("smoke", "checks"):
            for c in part.get(key, []):
                res[key].append(dict(c, path=r["path"], wgmma=r["wgmma"]))
        for b in part.get("bench", []):
            d = dense.get((b["out"], b["in"], b["m"]), {})
            res["bench"].append(dict(b, func=r["func"], path=r["path"], wgmma=r["wgmma"], default=r["default"],
                                     config=r["config"]["gemm"], ms_dense=d.get("ms_dense", float("nan")),
                                     ms_semi=d.get("ms_semi", float("nan")),
                                     speedup_vs_dense=d.get("ms_dense", float("nan")) / b["ms_ours"],
                                     speedup_vs_semi=d.get("ms_semi", float("nan")) / b["ms_ours"]))  # fmt: skip
        print(f"{r['kernel']}: {st['status']} ({part.get('stage')}, {st['seconds']:.0f}s) "
              + " ".join(f"{b['out']}x{b['in']}/{b['m']} {b['ms_ours']:.3f}ms "
                         f"x{dense.get((b['out'], b['in'], b['m']), {}).get('ms_dense', float('nan')) / b['ms_ours']:.2f}"
                         for b in part.get("bench", [])), flush=True)  # fmt: skip
        save()
    # the fastest correct ws (or else wgmma) candidate again at every large-path M on fresh inputs
    ok = {c["func"] for c in res["candidates"] if c["status"] == "ok"}
    tot = {}
    for b in res["bench"]:
        if b["func"] in ok and b["path"] in ("ws", "wgmma"):
            tot.setdefault((b["path"], b["func"]), []).append(b["ms_ours"] / b["ms_dense"])
    full = {k: sum(v) for k, v in tot.items() if len(v) == len(bc.LLM_SHAPES) * len(args.prefill_m)}
    if full and deadline - time.time() > 30:
        path, win = min(full, key=lambda k: (k[0] != "ws", full[k]))
        p = parts / f"winner_{win}.json"
        st = _child(["cand", *common, "--func", win, "--part", str(p), "--no-bench", "--extra-m", "129", "1000"],
                    min(args.cand_timeout, deadline - time.time() - 10), log, p)  # fmt: skip
        part = json.loads(p.read_text()) if p.exists() else {}
        res["winner"] = {"func": win, "path": path, "status": st["status"], "stage": part.get("stage")}
        res["winner_checks"] = part.get("checks", [])
    if deadline - time.time() > 15:
        baseline("end")
    save()
    n_ok = sum(c["status"] == "ok" for c in res["candidates"])
    print(f"done in {time.time() - t0:.0f}s: {n_ok}/{len(res['candidates'])} candidates ok; "
          + ", ".join(f"{c['kernel']}: {c['status']} ({c.get('stage')})" for c in res["candidates"] if c["status"] != "ok"))


# ------------------------------------------------------------------------------------------------ report (here)
def _cfg(c: dict) -> str:
    return (f"{c['bm']}×{c['bn']}×{c['bk']} w{c['wm']}x{c['wn']} s{c['stages']}"
            + (" persistent" if c.get("persistent") else "") + (f" cluster {c['cluster']}" if c.get("cluster", 1) > 1 else "")
            + (f" tail {c['tail']}" if c.get("tail") else "") + (" → dequantize + ws" if c.get("dq16") else "")
            + (" wmap" if c.get("wmap") else ""))  # fmt: skip


def cmd_report(args):
    raw = json.loads(Path(args.raw).read_text())
    dst = Path(args.dst)
    dst.mkdir(parents=True, exist_ok=True)
    (dst / f"{args.name}.json").write_text(json.dumps(raw, indent=1))
    info = raw.get("info", {})
    L = [f"# 2:4 fp16 prefill GEMM: Hopper warp-specialized TMA (ws) vs wgmma.sp vs mma.sp, cuBLAS, semi-structured "
         f"({info.get('gpu', '')}, {raw['started']})", ""]  # fmt: skip
    ch = raw.get("smoke", []) + raw.get("checks", []) + raw.get("winner_checks", [])
    cands = raw.get("candidates", [])
    L.append(f"Same run: cuBLAS fp16 8192³ {raw.get('cublas_8192_tflops', float('nan')):.0f} TFLOP/s. Candidates: "
             + ", ".join(f"{sum(c['status'] == s for c in cands)} {s}" for s in sorted({c['status'] for c in cands}))
             + f". Correctness: {sum(c['ok'] for c in ch)}/{len(ch)} checks within 1e-2 of float64 on fresh random "
             f"inputs (max rel. error {max((c['rel_err'] for c in ch), default=float('nan')):.2e}; output poisoned "
             "with NaN before each call).")  # fmt: skip
    bad = [c for c in cands if c["status"] != "ok"]
    if bad:
        L += ["", "Candidates that did not pass (status, where they stopped):", ""]
        L += [f"- {c['kernel']}: {c['status']} ({c.get('stage')})" for c in bad]
    sp = {}
    for tag in ("start", "end"):
        for s in raw.get(f"baseline_{tag}", {}).get("shapes", []):
            sp.setdefault((s["out"], s["in"], s["m"]), []).append(s["ms_dense"])
    L += ["", "Best config of each path per shape (median of per-call CUDA-event times, L2 flushed before each call; "
          "cuBLAS timed before and after all candidates, ratios against the first):", "",
          "| out×in | M | cuBLAS ms (start / end) | semi ms | mma.sp best | wgmma best | ws best ms | ws vs dense | ws vs semi | ws TFLOP/s dense-equiv. | ws config |",
          "|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    b = raw.get("bench", [])
    keys = sorted({(r["out"], r["in"], r["m"]) for r in b})
    for n, k, m in keys:
        rs = [r for r in b if (r["out"], r["in"], r["m"]) == (n, k, m)]
        best = {p: min((r for r in rs if r["path"] == p), key=lambda r: r["ms_ours"], default=None) for p in PATHS}
        w = best["ws"]
        c = w["config"] if w else {}
        f = lambda r: f"{r['ms_ours']:.3f} ({r['speedup_vs_dense']:.2f}x)" if r else "—"  # noqa: E731
        L.append(f"| {n}×{k} | {m} | {' / '.join(f'{v:.3f}' for v in sp.get((n, k, m), []))} | {rs[0]['ms_semi']:.3f} | "
                 f"{f(best['mma.sp'])} | {f(best['wgmma'])} | " + (
                     f"{w['ms_ours']:.3f} | {w['speedup_vs_dense']:.2f}x | {w['speedup_vs_semi']:.2f}x | "
                     f"{w['tflops_ours_dense_equiv']:.0f} | {_cfg(c)} |" if w else "— | — | — | — | — |"))  # fmt: skip
    L += ["", "All candidates:", "", "| out×in | M | kernel path | config | ms | vs dense | vs semi |", "|---|---|---|---|---|---|---|"]
    for r in b:
        c = r["config"]
        L.append(f"| {r['out']}×{r['in']} | {r['m']} | {r['path']} | {_cfg(c)} | {r['ms_ours']:.3f} | "
                 f"{r['speedup_vs_dense']:.2f}x | {r['speedup_vs_semi']:.2f}x |")  # fmt: skip
    L += ["", "Reproduce: `python bench/bench_gemm_v2.py build --pack .devpack_v2`, then on the GPU machine "
          "`python3 bench/bench_gemm_v2.py device --pack .devpack_v2 --out $OUT`, then "
          "`python bench/bench_gemm_v2.py report --raw $OUT/cuda_gemm_v2.json`."]  # fmt: skip
    (dst / f"{args.name}.md").write_text("\n".join(L) + "\n")
    print("\n".join(L[:24]))
    if args.tuning:
        print(update_tuning(raw, Path(args.tuning)))


def update_tuning(raw: dict, db_path: Path) -> str:
    """Record this run's fastest correct large-GEMM config per LLM shape (least total time over the M of the run)
    in the 2:4 fp16 entries of a tuning DB (golden/tuning/h100.json), with its times and the run it comes from; the
    other paths (decode GEMV, small GEMM) of an entry are left as bench_cuda.py measured them."""
    ok = {c["func"] for c in raw.get("candidates", []) if c["status"] == "ok"}
    tot: dict = {}
    for r in raw.get("bench", []):
        if r["func"] in ok:
            tot.setdefault((r["out"], r["in"], r["func"]), []).append(r)
    n_m = len({r["m"] for r in raw.get("bench", [])})
    db = json.loads(db_path.read_text())
    done = []
    for e in db["entries"]:
        k = e["key"]
        if e["kernel"] != bc.KERNEL_OF_KIND["sp16"]:
            continue
        rows = [v for (n, kk, _), v in tot.items() if (n, kk) == (k["out"], k["in"]) and len(v) == n_m]
        if not rows:
            continue
        best = min(rows, key=lambda v: sum(r["ms_ours"] for r in v))
        e["config"]["gemm"] = dict(best[0]["config"])
        e.setdefault("ms", {})["gemm"] = {str(r["m"]): r["ms_ours"] for r in best}
        e["gemm_measured"] = f"bench/bench_gemm_v2.py on {raw.get('info', {}).get('gpu', '?')}, {raw['started']}"
        done.append(f"{k['out']}x{k['in']}: {_cfg(best[0]['config'])}" + (" ws" if best[0]["config"].get("ws") else ""))
    db_path.write_text(json.dumps(db, indent=1, sort_keys=True) + "\n")
    return f"{db_path}: large-GEMM config of {len(done)} 2:4 fp16 entries from this run: " + "; ".join(done)


def main():
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build")
    b.add_argument("--pack", default=".devpack_v2")
    b.add_argument("--kind", choices=("sp16", "sp4", "dq4", "dq8"), default="sp16",
                   help="sp16: every 2:4 fp16 large-GEMM candidate; sp4 / dq4 / dq8: 2:4 + int4 / int4 / int8, g128: the "
                   "mma GEMM vs dequantize + ws, the weights by tensor map (the default) or by bulk copies")
    b.add_argument("--mma-tiles", action="store_true", help="sp4 / dq4 / dq8: also the mma GEMM with each of MMA_TILES")
    b.add_argument("--mid", nargs="+", choices=("sp16", "sp4", "dq4", "dq8", "sp8"), default=None,
                   help="instead: M = 17..128, each kind's small-tile default vs its large path (variants_mid)")
    d = sub.add_parser("device")
    d.add_argument("--pack", default=".devpack_v2")
    d.add_argument("--out", default=os.environ.get("OUT", "bench/results/tmp"))
    d.add_argument("--set", choices=sorted(SETS), default="hopper",
                   help="candidate paths: ws only, ws + wgmma (default; the mma.sp default config always runs too), all")
    d.add_argument("--only", nargs="*", default=[], help="substrings of kernel names to keep (e.g. _ws_ 128x256x64); the default (ws on sm_90a) and the mma.sp reference tile always run")
    d.add_argument("--budget-s", type=float, default=540, help="whole command (the device tool allows 600 s)")
    d.add_argument("--reserve-s", type=float, default=45, help="kept for the winner checks and the final baseline")
    d.add_argument("--cand-timeout", type=float, default=90)
    d.add_argument("--smoke-timeout", type=float, default=40, help="a ws child still in start-up/smoke after this")
    d.add_argument("--baseline-timeout", type=float, default=150)
    d.add_argument("--cache", default="/tmp/sparsec_gemm_v2_weights")
    d.add_argument("--prefill-m", type=int, nargs="+", default=PREFILL_M, help="token counts timed on the LLM shapes")
    for name in ("cand", "baseline"):
        c = sub.add_parser(name)
        c.add_argument("--prefill-m", type=int, nargs="+", default=PREFILL_M)
        c.add_argument("--pack", required=True)
        c.add_argument("--part", required=True)
        c.add_argument("--cache", required=True)
        if name == "cand":
            c.add_argument("--func", required=True)
            c.add_argument("--smoke", action="store_true")
            c.add_argument("--no-bench", action="store_true")
            c.add_argument("--extra-m", type=int, nargs="*", default=[])
        else:
            c.add_argument("--extra-checks", action="store_true")
    ab = sub.add_parser("ab")
    ab.add_argument("--pack", default=".devpack_v2")
    ab.add_argument("--out", default=os.environ.get("OUT", "bench/results/tmp"))
    ab.add_argument("--cache", default="/tmp/sparsec_gemm_v2_weights")
    ab.add_argument("--pick", nargs="+", required=True, help="KERNEL_SUBSTRING[:TAIL] of each candidate (already verified)")
    ab.add_argument("--prefill-m", type=int, nargs="+", default=PREFILL_M)
    ab.add_argument("--rounds", type=int, default=7)
    ab.add_argument("--shapes", nargs="*", default=[], help="OUTxIN weight shapes (default: the LLM shapes)")
    abr = sub.add_parser("ab-report")
    abr.add_argument("--raw", required=True)
    abr.add_argument("--dst", default=str(ROOT / "bench" / "results"))
    abr.add_argument("--name", default="cuda_gemm_v2_ab")
    r = sub.add_parser("report")
    r.add_argument("--raw", required=True)
    r.add_argument("--dst", default=str(ROOT / "bench" / "results"))
    r.add_argument("--name", default="cuda_gemm_v2", help="result files <dst>/<name>.{json,md}")
    r.add_argument("--tuning", default=None, help="tuning DB to record the winners in (golden/tuning/h100.json)")
    cc = sub.add_parser("copy-cost", help="per-stage cost of the one-tile ws kernels of a committed device run")
    cc.add_argument("--raw", default="bench/results/cuda_gemm_v2.json")
    cc.add_argument("--sms", type=int, default=132)
    cc.add_argument("--dst", default=str(ROOT / "bench" / "results"))
    cc.add_argument("--name", default="", help="also write <dst>/<name>.md")
    a = ap.parse_args()
    rc = {"build": cmd_build, "device": cmd_device, "report": cmd_report, "cand": cmd_cand, "baseline": cmd_baseline,
          "ab": cmd_ab, "ab-report": cmd_ab_report, "copy-cost": cmd_copy_cost}[a.cmd](a)  # fmt: skip
    sys.exit(rc or 0)


if __name__ == "__main__":
    main()
