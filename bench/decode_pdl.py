"""Decode GEMV with and without programmatic dependent launch (PDL), against cuBLAS, in one GPU session.

Three steps::

    python bench/decode_pdl.py build --pack .devpack_pdl          # here: the untuned GEMV of every kind / LLM shape
    python3 bench/decode_pdl.py device --pack .devpack_pdl --out $OUT     # on the GPU machine (tvm_ffi + torch)
    python bench/decode_pdl.py report --raw DIR/decode_pdl_raw.json        # here: bench/results/decode_pdl.{json,md}

Modes: ``off`` = SPARSEC_CUDA_PDL=0 (plain launches: the kernels as they ran before PDL), ``default`` = the untuned
build's launch policy (cuda_sparse.gemv_pdl_bits: programmatic dependent launch for the kernels it helped); the
launcher reads the switch at every launch, so both modes are timed one after the other on the same weights and
inputs, in one process. Every mode measures: correctness of each (kind, shape, M) against
float64 after a CUDA-graph replay of back-to-back calls (every output of the batch checked), a chain of GEMVs each
reading the previous one's output (the read-after-write PDL must respect), and the steady-state time per call
(bench_cuda.Steady: back-to-back calls rotating over weight copies >= 2x L2, one CUDA graph) of ours and of cuBLAS
(torch.nn.functional.linear on the dense fp16 weight).
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
KINDS = ("sp16", "sp4", "dq4", "dq8")
MODES = {"off": {"SPARSEC_CUDA_PDL": "0"}, "default": {}}


def cmd_build(args) -> None:
    from sparsec.backends.kernels.cuda_compile import build_shared
    from sparsec.backends.kernels.cuda_sparse import Variant, default_config

    pack = Path(args.pack)
    pack.mkdir(parents=True, exist_ok=True)
    rows, variants = [], {}
    for kind in KINDS:
        gs = 0 if kind == "sp16" else 128
        for n, k in SHAPES:
            v = Variant.make(kind, False, gs, default_config(kind, "sm_90a", n, k))
            variants[v.func_name] = v
            rows.append({"func": v.func_name, "kind": kind, "gs": gs, "n": n, "k": k})
    t = time.time()
    build_shared(list(variants.values()), ["sm_90a"], str(pack / "sparsec_cuda.so"), workdir=str(pack / "build"))
    (pack / "manifest.json").write_text(json.dumps({"rows": rows}, indent=1))
    print(f"built {len(variants)} functions in {time.time() - t:.0f}s -> {pack}")


def _set_mode(mode: str) -> None:
    for k in ("SPARSEC_CUDA_PDL",):
        os.environ.pop(k, None)
    os.environ.update(MODES[mode])


def cmd_device(args) -> None:
    import numpy as np
    import torch
    import tvm_ffi

    from bench_cuda import Steady, _l2_bytes, make_weight
    from sparsec.backends.kernels.cuda_sparse import prepare

    torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction = False
    pack, out = Path(args.pack), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    man = json.loads((pack / "manifest.json").read_text())
    lib = tvm_ffi.load_module(str(pack / "sparsec_cuda.so"))
    st = Steady(torch, _l2_bytes(torch))
    ms_list = [int(v) for v in args.m.split(",")]
    res = {"modes": MODES, "gpu": torch.cuda.get_device_name(0), "rows": [], "chains": []}
    t0 = time.time()

    def save():
        res["seconds"] = time.time() - t0
        (out / "decode_pdl_raw.json").write_text(json.dumps(res, indent=1))

    for r in man["rows"]:
        kind, n, k, gs = r["kind"], r["n"], r["k"], r["gs"]
        rng = np.random.default_rng(n * 7 + k + KINDS.index(kind))
        fmt = make_weight(kind, n, k, gs, False, rng)
        ws = [torch.from_numpy(a.view(np.int32) if a.dtype == np.uint32 else a).cuda() for a in prepare(kind, fmt)]
        w64 = torch.from_numpy(fmt.materialize()).cuda().double()
        w16 = w64.half()
        nbytes = sum(a.numel() * a.element_size() for a in ws)
        f = lib[r["func"]]
        wcop = [ws] + [[a.clone() for a in ws] for _ in range(st.n_copies(nbytes) - 1)]
        dcop = [w16] + [w16.clone() for _ in range(st.n_copies(n * k * 2) - 1)]
        for m in ms_list:
            nx = max(len(wcop), len(dcop))
            xs = [torch.randn(m, k, device="cuda", dtype=torch.float16) for _ in range(nx)]
            ys = [torch.empty(m, n, device="cuda", dtype=torch.float16) for _ in range(nx)]
            refs = [xs[i].double() @ w64.T for i in range(len(wcop))]
            ncall = st.n_calls(len(wcop))
            ours = [(lambda i=i: f(xs[i % len(wcop)], *wcop[i % len(wcop)], ys[i % len(wcop)])) for i in range(ncall)]
            dense = [(lambda i=i: torch.nn.functional.linear(xs[i % len(dcop)], dcop[i % len(dcop)]))
                     for i in range(st.n_calls(len(dcop)))]  # fmt: skip
            row = {"kind": kind, "n": n, "k": k, "m": m, "cublas_ms": st.graph(dense)}
            for mode in MODES:
                _set_mode(mode)
                for y in ys:
                    y.fill_(float("nan"))
                row[f"{mode}_ms"] = st.graph(ours)
                # every output the graph replays wrote, against float64
                row[f"{mode}_max_rel_err"] = max(float((ys[i].double() - refs[i]).norm() / refs[i].norm()) for i in range(len(wcop)))
            res["rows"].append(row)
            print(kind, n, k, m, " ".join(f"{mo} {row[mo + '_ms'] * 1e3:.2f}" for mo in MODES),
                  f"cuBLAS {row['cublas_ms'] * 1e3:.2f} us, err {max(row[mo + '_max_rel_err'] for mo in MODES):.1e}", flush=True)  # fmt: skip
        # a chain y_{j+1} = y_j W^T (square layers) launched back to back, eagerly and as a CUDA graph, each step vs
        # float64 of its own fp16 input: the read-after-write that PDL must respect (griddepcontrol.wait)
        if n == k:
            for m in (1, 16):
                chain = 6
                bufs = [torch.randn(m, k, device="cuda", dtype=torch.float16) * 0.5]
                bufs += [torch.empty(m, n, device="cuda", dtype=torch.float16) for _ in range(chain)]
                calls = [(lambda j=j: f(bufs[j], *ws, bufs[j + 1])) for j in range(chain)]
                for mode in MODES:
                    _set_mode(mode)
                    for how in ("eager", "graph"):
                        for b_ in bufs[1:]:
                            b_.fill_(float("nan"))
                        if how == "eager":
                            for c in calls:
                                c()
                        else:
                            s_ = torch.cuda.Stream()
                            s_.wait_stream(torch.cuda.current_stream())
                            g = torch.cuda.CUDAGraph()
                            with torch.cuda.graph(g, stream=s_):
                                for c in calls:
                                    c()
                            for b_ in bufs[1:]:
                                b_.fill_(float("nan"))
                            g.replay()
                        torch.cuda.synchronize()
                        rels = []
                        for j in range(chain):
                            ref = bufs[j].double() @ w64.T
                            rels.append(float((bufs[j + 1].double() - ref).norm() / ref.norm()))
                        res["chains"].append({"kind": kind, "n": n, "m": m, "chain": chain, "mode": mode, "how": how,
                                              "max_rel_err": max(rels)})  # fmt: skip
        del wcop, dcop
        torch.cuda.empty_cache()
        save()
        if time.time() - t0 > args.budget_s:
            res["stopped"] = f"budget reached after {kind} {n}x{k}"
            break
    save()


def cmd_report(args) -> None:
    from sparsec.backends.kernels.cuda_sparse import default_config

    raw = json.loads(Path(args.raw).read_text())
    names = {"sp16": "2:4 fp16", "sp4": "2:4 + int4 g128", "dq4": "int4 g128", "dq8": "int8 g128"}
    lines = ["# Decode GEMV with and without programmatic dependent launch (steady state)", "",
             f"GPU: {raw['gpu']}. Written by `python bench/decode_pdl.py report` (docstring of bench/decode_pdl.py). "
             "Steady state: back-to-back calls rotating over weight copies >= 2x L2 in one CUDA graph, µs per call; "
             "cuBLAS (torch.nn.functional.linear, dense fp16) and both launch modes on the same weights and inputs in "
             "one process: `off` plain launches (the kernels before PDL), `default` the untuned build's policy "
             "(cuda_sparse.gemv_pdl_bits; `pdl` = whether this point's kernel is launched with PDL). Errors: every "
             "output of the graph's batch vs float64.", "",
             "| kernel | out×in | M | pdl | cuBLAS µs | off µs | default µs | off vs cuBLAS | **default vs cuBLAS** | default vs off | max rel err |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in raw["rows"]:
        cub, off, dflt = r["cublas_ms"], r["off_ms"], r["default_ms"]
        bits = default_config(r["kind"], "sm_90a", r["n"], r["k"])["gemv"].get("pdl", 0)
        on = "yes" if bits & (1 if r["m"] <= 8 else 2) else "no"
        err = max(r[f"{mo}_max_rel_err"] for mo in MODES)
        lines.append(f"| {names[r['kind']]} | {r['n']}×{r['k']} | {r['m']} | {on} | {cub * 1e3:.1f} | {off * 1e3:.1f} | "
                     f"{dflt * 1e3:.1f} | {cub / off:.2f}x | **{cub / dflt:.2f}x** | {off / dflt:.2f}x | {err:.1e} |")  # fmt: skip
    ch = raw["chains"]
    lines += ["", f"Chains of GEMVs each reading the previous one's output ({len(ch)}: square shapes, M = 1 and 16, "
              f"eager and CUDA graph, both modes): max relative error {max((c['max_rel_err'] for c in ch), default=float('nan')):.1e}."]  # fmt: skip
    Path(args.out_json).write_text(json.dumps(raw, indent=1))
    Path(args.out_md).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build")
    b.add_argument("--pack", default=".devpack_pdl")
    d = sub.add_parser("device")
    d.add_argument("--pack", default=".devpack_pdl")
    d.add_argument("--out", default=os.environ.get("OUT", "bench/results/tmp"))
    d.add_argument("--m", default="1,2,4,8,16")
    d.add_argument("--budget-s", type=float, default=300.0)
    r = sub.add_parser("report")
    r.add_argument("--raw", required=True)
    r.add_argument("--out-json", default=str(ROOT / "bench" / "results" / "decode_pdl.json"))
    r.add_argument("--out-md", default=str(ROOT / "bench" / "results" / "decode_pdl.md"))
    a = ap.parse_args(argv)
    {"build": cmd_build, "device": cmd_device, "report": cmd_report}[a.cmd](a)


if __name__ == "__main__":
    main()
