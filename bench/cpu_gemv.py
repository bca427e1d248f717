"""CPU GEMV tiers: the default schedule vs the one before the x transpose, the group loop and int32 code words.

    python bench/cpu_gemv.py [--threads 1] [--repeat 7] [--rounds 2] [--out bench/results]

For each LLM layer shape (4096x4096, 11008x4096, 4096x11008) and format (dense fp32, 2:4, int4 g128 symmetric, int4
g32 with zero points, int8 g128, 2:4 + int4 g32), times the CPU kernel at M = 1, 4, 16 (GEMV tiers) and 128 (panel
GEMM) under:

- ``before``: ``gemv_xt`` off, ``codes`` byte, ``unroll`` 4, ``gemv_hoist`` 0, 2:4 ``gemv_mode`` select: the M = 4 /
  16 tiers read ``x`` rows K floats apart, every weight is dequantized ``(code - z) * s``, 2:4 groups are expanded to
  4 dense weights by position selects (the schedules before the commits this benchmark came with);
- ``default``: what an untuned build uses now (``x`` transposed once a call for the M > 1 tiers; x86 int4: int32 code
  words, 8 columns an iteration; int4 / int8 group loop: sums of code * x per group at M = 1, scale and -zero*scale
  held per group at M <= 4; 2:4 (N:4): the permute GEMV, vpermilps picks each row's kept inputs);

Each config is measured ``--rounds`` times, interleaved (the minimum per point is kept: this machine is shared);
ratios against ``before`` and against the dense fp32 kernel's default of the same run. GB/s at M = 1 = the weight
bytes as stored / time. Writes ``cpu_gemv.json`` and ``.md`` (``_avx512`` on an AVX-512 host, ``_t<N>`` for ``--threads N``
> 1).
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
FORMATS = ("dense", "2:4", "int4g128", "int4g32a", "int8g128", "2:4+int4g32")
MS = (1, 4, 16, 128)
BEFORE = {"gemv_xt": 0, "unroll": 4, "gemv_hoist": 0}
BEFORE_QUANT = {"codes": "byte"}
BEFORE_NM = {"gemv_mode": "select"}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    a = ap.parse_args()
    os.environ["TVM_NUM_THREADS"] = str(a.threads)

    from sparsec.backends.kernels.registry import ShapeHints, prepare_params, select_kernel
    from sparsec.backends.targets import get_target
    from sparsec.backends.tune import TuningDB, measure_kernel, parse_format_spec, synthetic_weight
    from sparsec.compressor.ir import Linear

    tgt = get_target("x86")
    rows = []
    for o, i in SHAPES:
        dense_t = None
        for f in FORMATS:
            lin = Linear("l", ["x"], ["y"], weight=synthetic_weight(parse_format_spec(f), o, i))
            default = select_kernel(lin, tgt, ShapeHints(), TuningDB.empty())
            old = {**BEFORE, **(BEFORE_QUANT if "int" in f else {}), **(BEFORE_NM if "2:4" in f else {})}
            before = select_kernel(lin, tgt, ShapeHints(config={**default.config, **old}), TuningDB.empty())
            impls = {"before": (before, lin), "default": (default, lin)}
            best = {k: {m: float("inf") for m in MS} for k in impls}
            for _ in range(a.rounds):
                for k, (impl, l) in impls.items():
                    t = measure_kernel(impl, l, tgt, MS, repeat=a.repeat)
                    best[k] = {m: min(best[k][m], t[m]) for m in MS}
            if f == "dense":
                dense_t = best["default"]
            best["dense"] = dense_t
            nbytes = {k: sum(x.nbytes for x in prepare_params(impl, l)) for k, (impl, l) in impls.items()}
            row = {"shape": f"{o}x{i}", "format": f, "default_config": {k: default.config.get(k) for k in ("codes", "unroll")},
                   "weight_bytes": nbytes["default"]}  # fmt: skip
            for m in MS:
                for k in best:
                    row[f"{k}_ms_m{m}"] = best[k][m] * 1e3
                row[f"default_vs_before_m{m}"] = best["before"][m] / best["default"][m]
                row[f"default_vs_dense_m{m}"] = best["dense"][m] / best["default"][m]
            row["default_gbps_m1"] = nbytes["default"] / best["default"][1] / 1e9
            row["before_gbps_m1"] = nbytes["before"] / best["before"][1] / 1e9
            rows.append(row)
            print(json.dumps(row), flush=True)

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    from sparsec.backends.bench import _cpu_name, result_suffix

    stem = "cpu_gemv" + result_suffix() + (f"_t{a.threads}" if a.threads > 1 else "")

    meta = {"machine": platform.processor() or platform.machine(), "cpu": _cpu_name(), "threads": a.threads,
            "repeat": a.repeat, "rounds": a.rounds, "before": BEFORE}  # fmt: skip
    (out / f"{stem}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    lines = [f"# CPU GEMV tiers: default schedule vs before (x86, {a.threads} thread(s))", "",
             f"CPU: {meta['cpu']}. Command: `python bench/cpu_gemv.py --threads {a.threads} --repeat {a.repeat} "
             f"--rounds {a.rounds}`. ms per call (min over rounds x repeats); `before` = {BEFORE} (+ {BEFORE_QUANT} for "
             f"int4 / int8, + {BEFORE_NM} for 2:4); ratios against `before` and the dense fp32 kernel's default of the "
             "same run.", "",
             "| shape | format | M | dense (default) ms | before ms | default ms | **default vs before** | default vs dense |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        for m in MS:
            lines.append(f"| {r['shape']} | {r['format']} | {m} | {r[f'dense_ms_m{m}']:.3f} | {r[f'before_ms_m{m}']:.3f} | "
                         f"{r[f'default_ms_m{m}']:.3f} | **{r[f'default_vs_before_m{m}']:.2f}x** | {r[f'default_vs_dense_m{m}']:.2f}x |")
    lines += ["", "GB/s at M = 1 (weight bytes as stored / time):", "", "| shape | format | before | default |", "|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['shape']} | {r['format']} | {r['before_gbps_m1']:.1f} | {r['default_gbps_m1']:.1f} |")
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out / stem}.json and .md")


if __name__ == "__main__":
    main()
