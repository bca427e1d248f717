"""wasm 2:4 GEMV: the C kernel (backends/capi/wasm_swizzle.c, ``gemv_impl="c"``, the default) vs the TIR swizzle
kernel it replaced (``gemv_impl="tir"``, what the build uses where the C one does not apply) vs dense, in node.

    python bench/bench_wasm_c_gemv.py      # ~1.5 min on 2 cores (builds included); needs clang, wasm-ld, node

Kernels alone (the ``linear_chain`` graphs of bench/bench_arm_wasm.py: one Linear 1024x1024, and 16 Linears of
tiny-gpt's shapes), 2:4 fp32 and 2:4 + int4 g16, M = 1, 4, 16; ONE node process, interleaved rounds
(bench/wasm_bench.js). The TIR builds are made by this script making the C GEMV inapplicable (``cpu._c_gemv`` ->
None for the build), i.e. the build's own fallback path. Results: bench/results/wasm_c_gemv.{json,md}.
Note: with gemv_impl "c", int4/int8 layers run the TIR 1-row GEMV at M = 1 (cpu.QUANT_C_GEMV_FROM_M = 2), so their
M = 1 "c" and "tir" rows time the same code; "c_all" (int4 only) is the C GEMV at every M <= 16
(QUANT_C_GEMV_FROM_M = 1), what that choice is measured against.
"""
from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import bench_arm_wasm as B  # noqa: E402

from sparsec.backends.build import build_to_dir  # noqa: E402
from sparsec.backends.kernels import cpu  # noqa: E402

SHAPES = {"1024x1024": [(1024, 1024)], "chain16": [(352, 128), (128, 352)] * 4 + [(128, 128)] * 8}
ROUNDS = 21


def graph(kind: str, shapes):
    g = B.linear_chain("dense" if kind == "dense" else "nm", shapes)
    if kind == "nm24_int4":
        for lin in g.linears():
            lin.weight = B.nm_int4(lin.weight.materialize())
    return g


def main():
    res = {"command": "python bench/bench_wasm_c_gemv.py", "cpu": B._cpu_name(), "rounds": ROUNDS}
    with tempfile.TemporaryDirectory() as tmp:
        libs, cases = {}, []
        orig = cpu._c_gemv
        try:
            for sh, shapes in SHAPES.items():
                for kind, impls in (("dense", ("-",)), ("nm24", ("c", "tir")), ("nm24_int4", ("c", "tir", "c_all"))):
                    for impl in impls:
                        cpu._c_gemv = orig if impl != "tir" else (lambda spec: None)
                        cpu.QUANT_C_GEMV_FROM_M = 1 if impl == "c_all" else 2
                        d = Path(tmp) / f"{sh}_{kind}_{impl}"
                        build_to_dir(graph(kind, shapes), "wasm", d)
                        man = json.dumps(json.loads((d / "manifest.json").read_text()))
                        assert impl in ("tir", "-") or '"gemv_impl": "c"' in man, (sh, kind)
                        libs[d.name] = (d, shapes[0][1])
        finally:
            cpu._c_gemv, cpu.QUANT_C_GEMV_FROM_M = orig, 2
        for name, (d, k) in libs.items():
            for M in (1, 4, 16):
                cases.append({"name": f"{name}/M{M}", "lib": str(d), "inputs": [{"dtype": "float32", "shape": [M, k], "seed": 7}]})
        spec = Path(tmp) / "spec.json"
        spec.write_text(json.dumps({"repeat": 10, "rounds": ROUNDS, "outputs": False, "cases": cases}))
        p = subprocess.run(["node", str(ROOT / "bench" / "wasm_bench.js"), str(spec)], capture_output=True, text=True)
        if p.returncode:
            raise SystemExit(p.stderr)
        out = json.loads(p.stdout)
    res["node"] = out["node"]
    t = {r["name"]: r for r in out["cases"]}
    res["wasm"] = t
    md = [f"wasm 2:4 GEMV, C (`gemv_impl=c`) vs TIR swizzle (`gemv_impl=tir`) vs dense; node {res['node']}, {res['cpu']} "
          f"(2 cores shared), one node process, {ROUNDS} interleaved rounds x 10 runs, ms = median (fastest round); "
          "speedups = dense / kernel (ratio of medians)", "",
          "| layers | format | M | dense ms | tir ms | c ms | tir vs dense | c vs dense | c vs tir | c_all ms (c_all vs dense) |",
          "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    rows = []
    for sh in SHAPES:
        for kind in ("nm24", "nm24_int4"):
            for M in (1, 4, 16):
                d, ti, c = (t[f"{sh}_{k}/M{M}"] for k in ("dense_-", f"{kind}_tir", f"{kind}_c"))
                f = lambda r: f"{r['ms_median']:.3f} ({r['ms_min']:.3f})"  # noqa: E731
                rows.append({"layers": sh, "format": kind, "M": M, "dense_ms": d["ms_median"], "tir_ms": ti["ms_median"], "c_ms": c["ms_median"]})
                ca = t.get(f"{sh}_{kind}_c_all/M{M}")
                if ca is not None:
                    rows[-1]["c_all_ms"] = ca["ms_median"]
                cas = f"{f(ca)} ({d['ms_median'] / ca['ms_median']:.2f}x)" if ca else "-"
                md.append(f"| {sh} | {kind} | {M} | {f(d)} | {f(ti)} | {f(c)} | {d['ms_median'] / ti['ms_median']:.2f}x | "
                          f"{d['ms_median'] / c['ms_median']:.2f}x | {ti['ms_median'] / c['ms_median']:.2f}x | {cas} |")
    res["table"] = rows
    dst = ROOT / "bench" / "results"
    (dst / "wasm_c_gemv.json").write_text(json.dumps(res, indent=1))
    (dst / "wasm_c_gemv.md").write_text("\n".join(md) + "\n\nReproduce: `python bench/bench_wasm_c_gemv.py`\n")
    print("\n".join(md))


if __name__ == "__main__":
    sys.exit(main())
