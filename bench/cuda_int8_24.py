"""2:4 + int8 (``cuda.nm24_int8_mma_sp``, kind sp8) against what such a layer ran on before it existed (its values
dequantized to fp16 at build time, on the 2:4 fp16 kernel: sp16) and against cuBLAS, in one GPU session.

Three steps::

    python bench/cuda_int8_24.py build --pack .devpack_i8          # here: both kinds' untuned kernels + sp8 GEMV variants
    python3 bench/cuda_int8_24.py device --pack .devpack_i8 --out $OUT      # on the GPU machine (tvm_ffi + torch)
    python bench/cuda_int8_24.py report --raw DIR/cuda_int8_24_raw.json     # here: bench/results/cuda_int8_24.{json,md}

Per LLM shape and token count, on the same 2:4 + int8 g128 weight (symmetric, random codes): the sp8 kernel with the
untuned config a build gives the layer ("default"), the same with other decode GEMV settings (activations staged or
not: "xs" 0 / 2 / 3; 4 / 8 / 16 warps), the 2:4 fp16 kernel on the dequantized weight, and cuBLAS
(torch.nn.functional.linear on the dense fp16 weight). Decode (M <= 16): steady state (bench_cuda.Steady: calls
rotating over weight copies >= 2x L2, one CUDA graph). Prefill (M = 128, 2048): the same. Every output of every timed
batch is checked against float64 (relative error <= 1e-2).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008), (4096, 14336), (14336, 4096)]
GS = 128
DECODE_M = (1, 2, 4, 8, 16)
PREFILL_M = (128, 2048)


def _alternatives(n: int, k: int) -> dict[str, dict]:
    """label -> sp8 config: the untuned default of an n x k layer and GEMV variants of it."""
    from sparsec.backends.kernels.cuda_sparse import default_config, gemv_valid

    base = default_config("sp8", "sm_90a", n, k)
    g = base["gemv"]
    out = {"default": base}
    for xs in (0, 2, 3):
        if xs != g.get("xs", 0):
            out[f"xs{xs}"] = dict(base, gemv=dict(g, xs=xs))
    for w in (4, 8, 16):
        if w not in (g["warps"], g.get("warps2") or g["warps"]):
            out[f"w{w}"] = dict(base, gemv=dict(g, warps=w, warps2=w))
    return {label: c for label, c in out.items() if gemv_valid(c["gemv"])}  # row groups need staged activations


def cmd_build(args) -> None:
    from sparsec.backends.kernels.cuda_compile import build_shared
    from sparsec.backends.kernels.cuda_sparse import Variant, default_config

    pack = Path(args.pack)
    pack.mkdir(parents=True, exist_ok=True)
    rows, variants = [], {}
    for n, k in SHAPES:
        v16 = Variant.make("sp16", False, 0, default_config("sp16", "sm_90a", n, k))
        variants[v16.func_name] = v16
        alts = {}
        for label, cfg in _alternatives(n, k).items():
            v = Variant.make("sp8", False, GS, cfg)
            variants[v.func_name] = v
            alts[label] = {"func": v.func_name, "gemv": v.cfg("gemv")}
        rows.append({"n": n, "k": k, "sp16": v16.func_name, "sp8": alts})
    t = time.time()
    build_shared(list(variants.values()), ["sm_90a"], str(pack / "sparsec_cuda.so"), workdir=str(pack / "build"))
    (pack / "manifest.json").write_text(json.dumps({"rows": rows}, indent=1))
    print(f"built {len(variants)} functions in {time.time() - t:.0f}s -> {pack}")


def cmd_device(args) -> None:
    import numpy as np
    import torch
    import tvm_ffi

    from bench_cuda import Steady, _l2_bytes, make_weight
    from sparsec.backends.kernels.cuda_sparse import prepare
    from sparsec.compressor.formats import NMSparse

    torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction = False
    pack, out = Path(args.pack), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    man = json.loads((pack / "manifest.json").read_text())
    lib = tvm_ffi.load_module(str(pack / "sparsec_cuda.so"))
    st = Steady(torch, _l2_bytes(torch))
    res = {"gpu": torch.cuda.get_device_name(0), "gs": GS, "rows": []}
    t0 = time.time()

    def gpu(arrays):
        return [torch.from_numpy(a.view(np.int32) if a.dtype == np.uint32 else a).cuda() for a in arrays]

    for r in man["rows"]:
        n, k = r["n"], r["k"]
        w8 = make_weight("sp8", n, k, GS, False, np.random.default_rng(n * 7 + k))
        w16 = NMSparse(w8.values.materialize().astype(np.float16).astype(np.float32), w8.indices_packed, 2, 4, k)
        w64 = torch.from_numpy(w8.materialize()).cuda().double()
        ops = {"sp8": gpu(prepare("sp8", w8)), "sp16": gpu(prepare("sp16", w16))}
        dense = w64.half()
        nbytes = {key: sum(a.numel() * a.element_size() for a in v) for key, v in ops.items()}
        copies = {key: [v] + [[a.clone() for a in v] for _ in range(st.n_copies(nbytes[key]) - 1)] for key, v in ops.items()}
        dcop = [dense] + [dense.clone() for _ in range(st.n_copies(n * k * 2) - 1)]
        funcs = {f"sp8 {label}": (lib[a["func"]], "sp8") for label, a in r["sp8"].items()}
        funcs["sp16"] = (lib[r["sp16"]], "sp16")
        for m in DECODE_M + PREFILL_M:
            if m > 16 and time.time() - t0 > args.budget_s:
                continue
            nx = max(len(dcop), *(len(c) for c in copies.values()))
            xs = [torch.randn(m, k, device="cuda", dtype=torch.float16) for _ in range(nx)]
            ys = [torch.empty(m, n, device="cuda", dtype=torch.float16) for _ in range(nx)]
            calls = [(lambda i=i: torch.nn.functional.linear(xs[i % len(dcop)], dcop[i % len(dcop)]))
                     for i in range(st.n_calls(len(dcop)))]  # fmt: skip
            row = {"n": n, "k": k, "m": m, "cublas_ms": st.graph(calls), "bytes": nbytes, "ms": {}, "max_rel_err": {}}
            for label, (f, key) in funcs.items():
                if m > 16 and label not in ("sp8 default", "sp16"):
                    continue
                cop = copies[key]
                ours = [(lambda i=i, f=f, cop=cop: f(xs[i % len(cop)], *cop[i % len(cop)], ys[i % len(cop)]))
                        for i in range(st.n_calls(len(cop)))]  # fmt: skip
                for y in ys:
                    y.fill_(float("nan"))
                row["ms"][label] = st.graph(ours)
                errs = []
                for i in range(len(cop)):
                    ref = xs[i].double() @ w64.T
                    errs.append(float((ys[i].double() - ref).norm() / ref.norm()))
                row["max_rel_err"][label] = max(errs)
            res["rows"].append(row)
            print(n, k, m, f"cuBLAS {row['cublas_ms'] * 1e3:.1f}", " ".join(f"{lb} {v * 1e3:.1f}" for lb, v in row["ms"].items()),
                  f"err {max(row['max_rel_err'].values()):.1e}", flush=True)  # fmt: skip
            res["seconds"] = time.time() - t0
            (out / "cuda_int8_24_raw.json").write_text(json.dumps(res, indent=1))
        del copies, dcop, ops
        torch.cuda.empty_cache()


def cmd_report(args) -> None:
    raw = json.loads(Path(args.raw).read_text())
    lines = ["# 2:4 + int8 on its own kernel vs the 2:4 fp16 kernel it ran on before, and cuBLAS", "",
             f"GPU: {raw['gpu']}. Written by `python bench/cuda_int8_24.py report` (docstring of bench/cuda_int8_24.py). "
             f"One 2:4 + int8 g{raw['gs']} weight per shape; µs per call in steady state (calls rotating over weight "
             "copies >= 2x L2, one CUDA graph), all measured in one process. `sp8` = cuda.nm24_int8_mma_sp with the "
             "untuned config a build gives the layer; `2:4 fp16` = the same weight dequantized to fp16 on "
             "cuda.nm24_mma_sp (what a 2:4 + int8 layer ran on before); best = the fastest sp8 GEMV variant of the run "
             "(M <= 16). Errors: every output of every timed batch vs float64.", "",
             "| out×in | M | cuBLAS µs | 2:4 fp16 µs | sp8 µs | **sp8 vs cuBLAS** | sp8 vs 2:4 fp16 | best sp8 variant | sp8 GB/s | max rel err |",
             "|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in raw["rows"]:
        cub, d, s16 = r["cublas_ms"], r["ms"]["sp8 default"], r["ms"]["sp16"]
        alts = {lb: v for lb, v in r["ms"].items() if lb.startswith("sp8")}
        best = min(alts, key=alts.get)
        gbs = (r["bytes"]["sp8"] + 2 * r["m"] * (r["n"] + r["k"])) / (d * 1e-3) / 1e9
        lines.append(f"| {r['n']}×{r['k']} | {r['m']} | {cub * 1e3:.1f} | {s16 * 1e3:.1f} | {d * 1e3:.1f} | "
                     f"**{cub / d:.2f}x** | {s16 / d:.2f}x | {best.removeprefix('sp8 ')} ({alts[best] * 1e3:.1f}) | "
                     f"{gbs:.0f} | {max(r['max_rel_err'].values()):.1e} |")  # fmt: skip
    Path(args.out_json).write_text(json.dumps(raw, indent=1))
    Path(args.out_md).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build")
    b.add_argument("--pack", default=".devpack_i8")
    d = sub.add_parser("device")
    d.add_argument("--pack", default=".devpack_i8")
    d.add_argument("--out", default=os.environ.get("OUT", "bench/results/tmp"))
    d.add_argument("--budget-s", type=float, default=240.0, help="no prefill points started after this")
    r = sub.add_parser("report")
    r.add_argument("--raw", required=True)
    r.add_argument("--out-json", default=str(ROOT / "bench" / "results" / "cuda_int8_24.json"))
    r.add_argument("--out-md", default=str(ROOT / "bench" / "results" / "cuda_int8_24.md"))
    a = ap.parse_args(argv)
    {"build": cmd_build, "device": cmd_device, "report": cmd_report}[a.cmd](a)


if __name__ == "__main__":
    main()
