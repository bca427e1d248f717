"""x86 prefill GEMM for N:4 sparsity: the permute GEMM (default) vs the dense-panel GEMM before it, and vs dense fp32.

    python bench/cpu_prefill.py [--threads 1] [--repeat 5] [--rounds 2] [--isa native|avx2] [--out bench/results]

For each LLM layer shape (4096x4096, 11008x4096, 4096x11008) and format (2:4, 2:4 + int4 g32 with zero points,
2:4 + int8 g128), times the CPU kernel at M = 17 (the first row count above the GEMV tiers), 64, 128 and 512 under:

- ``panel``: the GEMM before (``gemm: panel``): each panel of weights decoded to DENSE fp32 (2:4 groups expanded by
  position selects), then a register micro-kernel doing the dense FLOPs;
- ``default``: what an untuned build uses now (``gemm: permute``): the panel keeps the kept values and their positions,
  and the micro-kernel picks each output row's input with an in-lane permute (vpermilps), 2 multiply-adds a group of
  4 inputs instead of 4;

and the dense fp32 kernel's default of the same run. Each config is measured ``--rounds`` times, interleaved (min kept:
this machine is shared). ``--isa avx2`` builds for a 256-bit AVX2 CPU (LLVM mcpu znver3, 8 float lanes) and runs that
code on this host: the AVX2 defaults measured on an AVX-512 machine, labelled as such. Writes
``cpu_prefill[_avx2|_avx512][_t<N>].json`` and ``.md`` (no ISA suffix: native on an AVX2 host).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SHAPES = ((4096, 4096), (11008, 4096), (4096, 11008))
FORMATS = ("2:4", "2:4+int4g32a", "2:4+int8g128")
MS = (17, 64, 128, 512)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--isa", choices=("native", "avx2"), default="native")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    a = ap.parse_args()
    os.environ["TVM_NUM_THREADS"] = str(a.threads)

    import sparsec.backends.kernels.registry as registry
    from sparsec.backends.kernels.registry import ShapeHints, select_kernel
    from sparsec.backends.targets import Target, get_target
    from sparsec.backends.tune import TuningDB, measure_kernel, parse_format_spec, synthetic_weight
    from sparsec.compressor.ir import Linear

    tgt = get_target("x86")
    if a.isa == "avx2":  # AVX2 code (8 float lanes) on this host
        registry._host_vector_bits = lambda: 256
        tgt = Target("x86", "llvm", "x86 AVX2 (znver3)", {"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "znver3"})
    rows = []
    for o, i in SHAPES:
        dense_lin = Linear("l", ["x"], ["y"], weight=synthetic_weight(parse_format_spec("dense"), o, i))
        dense = select_kernel(dense_lin, tgt, ShapeHints(), TuningDB.empty())
        dense_t = {m: float("inf") for m in MS}
        for f in FORMATS:
            lin = Linear("l", ["x"], ["y"], weight=synthetic_weight(parse_format_spec(f), o, i))
            default = select_kernel(lin, tgt, ShapeHints(), TuningDB.empty())
            lanes = registry.vector_lanes(tgt, "float32")
            old = {"gemm": "panel", "gemm_mr": 8 if lanes >= 16 else 4, "gemm_nb": 0}
            panel = select_kernel(lin, tgt, ShapeHints(config={**default.config, **old}), TuningDB.empty())
            impls = {"panel": (panel, lin), "default": (default, lin), "dense": (dense, dense_lin)}
            best = {k: {m: float("inf") for m in MS} for k in impls}
            for _ in range(a.rounds):
                for k, (impl, l) in impls.items():
                    if k == "dense" and f != FORMATS[0]:
                        continue
                    t = measure_kernel(impl, l, tgt, MS, repeat=a.repeat)
                    best[k] = {m: min(best[k][m], t[m]) for m in MS}
            if f == FORMATS[0]:
                dense_t = best["dense"]
            row = {"shape": f"{o}x{i}", "format": f, "default_config": {k: default.config.get(k) for k in ("gemm", "gemm_mr", "gemm_nb", "block_o")}}
            for m in MS:
                row[f"dense_ms_m{m}"] = dense_t[m] * 1e3
                row[f"panel_ms_m{m}"] = best["panel"][m] * 1e3
                row[f"default_ms_m{m}"] = best["default"][m] * 1e3
                row[f"default_vs_panel_m{m}"] = best["panel"][m] / best["default"][m]
                row[f"default_vs_dense_m{m}"] = dense_t[m] / best["default"][m]
                row[f"panel_vs_dense_m{m}"] = dense_t[m] / best["panel"][m]
            rows.append(row)
            print(json.dumps(row), flush=True)

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    from sparsec.backends.bench import _cpu_name, result_suffix

    stem = "cpu_prefill" + ("_avx2" if a.isa == "avx2" else result_suffix()) + (f"_t{a.threads}" if a.threads > 1 else "")

    meta = {"machine": platform.processor() or platform.machine(), "cpu": _cpu_name(), "threads": a.threads, "isa": a.isa,
            "llvm_target": tgt.tvm_dict(), "repeat": a.repeat, "rounds": a.rounds}  # fmt: skip
    (out / f"{stem}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    isa = "AVX2 code (mcpu znver3) on this host" if a.isa == "avx2" else "this host's ISA"
    lines = [f"# x86 N:4 prefill GEMM: permute (default) vs dense panel (before) ({isa}, {a.threads} thread(s))", "",
             f"CPU: {meta['cpu']}. Command: `python bench/cpu_prefill.py --threads {a.threads} --repeat {a.repeat} "
             f"--rounds {a.rounds} --isa {a.isa}`. ms per call (min over rounds x repeats); ratios against the `panel` "
             "GEMM and the dense fp32 kernel of the same run.", "",
             "| shape | format | M | dense ms | panel ms | default ms | **default vs panel** | default vs dense | panel vs dense |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        for m in MS:
            lines.append(f"| {r['shape']} | {r['format']} | {m} | {r[f'dense_ms_m{m}']:.2f} | {r[f'panel_ms_m{m}']:.2f} | "
                         f"{r[f'default_ms_m{m}']:.2f} | **{r[f'default_vs_panel_m{m}']:.2f}x** | "
                         f"{r[f'default_vs_dense_m{m}']:.2f}x | {r[f'panel_vs_dense_m{m}']:.2f}x |")
    lines += ["", f"Default configs: {sorted({json.dumps(r['default_config'], sort_keys=True) for r in rows})}"]
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out / stem}.json and .md")


if __name__ == "__main__":
    main()
