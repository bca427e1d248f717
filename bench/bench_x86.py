"""x86: the golden GPT compiled by sparsec vs onnxruntime on the uncompressed model, same machine, same run.

    python bench/bench_x86.py [--threads 1] [--runs 30] [--out bench/results]

Builds, for the golden tiny-gpt (byte-level LLaMA-style, 4 layers, d=128):

- ``nm24``       ``sparsec compress --example tiny-gpt --target x86 --nm 2:4`` (SparseGPT 2:4, every Linear but the head);
- ``nm24_int4``  the same with the kept values quantized int4 (group 16 along the kept columns, symmetric, RTN);
- ``int4``       every Linear but the head int4 group 32 (asymmetric, RTN) instead of 2:4;

and times each compiled library (``sparsec bench``: Relax VM, parameters bound once) against onnxruntime running the
dense model and against the dense model compiled by the same backend, at batch x sequence 1x1 (one token), 1x16,
1x128 and 4x128; then each CPU kernel alone on LLM layer shapes (4096x4096, 11008x4096, 4096x11008) at M = 1, 16,
128 against the dense kernel (and GB/s at M=1 against a numpy copy). Every ratio is against baselines measured in the
same process. Results:
``bench/results/bench_x86.json`` and ``.md`` (``bench_x86_avx512*`` on an AVX-512 host, ``_t<N>`` for ``--threads N`` > 1). The quantized variants use plain round-to-nearest: they measure speed,
not quality (see the quantization pass for GPTQ).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def rtn(w, gs: int, sym: bool):
    import numpy as np

    from sparsec.compressor.formats import GroupQuant

    n, k = w.shape
    g = w.reshape(n, k // gs, gs).astype(np.float64)
    if sym:
        s = np.maximum(np.abs(g).max(-1), 1e-8) / 7.0
        u = np.clip(np.round(g / s[..., None]) + 8, 0, 15)
        z = None
    else:
        lo, hi = g.min(-1), g.max(-1)
        s = np.maximum(hi - lo, 1e-8) / 15.0
        z = np.clip(np.round(-lo / s), 0, 15)
        u = np.clip(np.round(g / s[..., None]) + z[..., None], 0, 15)
    return GroupQuant.from_codes(u.reshape(n, k).astype(np.uint8), s.astype(np.float16), None if z is None else z.astype(np.uint8), 4, gs)


def make_artifacts(work: Path) -> dict[str, Path]:
    from sparsec.compressor.compress import Source, compress, load_example
    from sparsec.compressor.formats import NMSparse
    from sparsec.compressor.pipeline import PassSpec, Recipe

    src = load_example("tiny-gpt")
    out: dict[str, Path] = {}
    r = Recipe(target="x86", passes=[PassSpec("nm_prune", {"nm": "2:4"})])
    out["nm24"] = work / "nm24"
    compress(src, r, out["nm24"], force=True, progress=False)
    from sparsec.compressor.artifact import load_artifact

    base = load_artifact(out["nm24"]).graph
    g = base.copy()
    for lin in g.linears():
        if isinstance(lin.weight, NMSparse):
            lin.weight = lin.weight.with_values(rtn(lin.weight.values.materialize(), 16, True))
    out["nm24_int4"] = work / "nm24_int4"
    compress(Source(g, "example:tiny-gpt", src.sha256), Recipe(target="x86"), out["nm24_int4"], force=True, progress=False)
    g = load_example("tiny-gpt").graph
    for lin in g.linears()[:-1]:
        lin.weight = rtn(lin.weight.materialize(), 32, False)
    out["int4"] = work / "int4"
    compress(Source(g, "example:tiny-gpt", src.sha256), Recipe(target="x86"), out["int4"], force=True, progress=False)
    return out


def kernel_table(threads: int, shapes, ms, formats) -> list[dict]:
    """Each CPU kernel alone on LLM layer shapes (default schedules): time per call, speedup vs the dense kernel
    measured in the same run, and at M=1 the bytes each format moves per call over the time (GB/s)."""
    import numpy as np

    from sparsec.backends.kernels.registry import ShapeHints, prepare_params, select_kernel
    from sparsec.backends.targets import get_target
    from sparsec.backends.tune import TuningDB, measure_kernel, parse_format_spec, synthetic_weight
    from sparsec.compressor.ir import Linear

    tgt = get_target("x86")
    rows = []
    for out_f, in_f in shapes:
        dense_t = None
        for f in formats:
            lin = Linear("l", ["x"], ["y"], weight=synthetic_weight(parse_format_spec(f), out_f, in_f))
            impl = select_kernel(lin, tgt, ShapeHints(), TuningDB.empty())
            nbytes = sum(a.nbytes for a in prepare_params(impl, lin))
            t = measure_kernel(impl, lin, tgt, ms, repeat=5)
            if f == "dense":
                dense_t = t
            row = {"shape": f"{out_f}x{in_f}", "format": f, "kernel": impl.name, "weight_bytes": nbytes}
            for m in ms:
                row[f"ms_m{m}"] = t[m] * 1e3
                row[f"speedup_m{m}"] = dense_t[m] / t[m] if dense_t else None
            row["gbps_m1"] = nbytes / t[ms[0]] / 1e9 if ms[0] == 1 else None
            rows.append(row)
            print(row, flush=True)
    return rows


def copy_bandwidth() -> float:
    """GB/s of a 256 MiB numpy copy (read + write counted), the reference for the GEMV GB/s figures."""
    import time

    import numpy as np

    a = np.ones(64 << 20, dtype=np.float32)
    b = np.empty_like(a)
    best = 1e9
    for _ in range(5):
        t0 = time.perf_counter()
        np.copyto(b, a)
        best = min(best, time.perf_counter() - t0)
    return 2 * a.nbytes / best / 1e9


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    ap.add_argument("--work", default=None, help="directory for the artifacts (default: a temporary one)")
    ap.add_argument("--no-kernels", dest="kernels", action="store_false", help="skip the per-kernel LLM-shape table")
    args = ap.parse_args()
    os.environ["TVM_NUM_THREADS"] = str(args.threads)
    import torch

    torch.set_num_threads(args.threads)
    from sparsec.backends.bench import bench_artifact, table_markdown

    kernels = []
    bw = None
    if args.kernels:
        bw = copy_bandwidth()
        kernels = kernel_table(args.threads, [(4096, 4096), (11008, 4096), (4096, 11008)], (1, 16, 128),
                               ["dense", "2:4", "int4g32", "2:4+int4g32"])  # fmt: skip
    work = Path(args.work or tempfile.mkdtemp(prefix="sparsec-bench-x86-"))
    arts = make_artifacts(work)
    scenarios = [(1, 1), (1, 16), (1, 128), (4, 128)]
    docs = {}
    for name, path in arts.items():
        print(f"== {name}", flush=True)
        docs[name] = bench_artifact(path, scenarios=scenarios, runs=args.runs, warmup=5, threads=args.threads)
        print(table_markdown(docs[name]), flush=True)
    report = {"schema": "sparsec.bench_x86/1", "command": f"python bench/bench_x86.py --threads {args.threads} --runs {args.runs}",
              "variants": docs, "kernels": kernels, "copy_bandwidth_gbps": bw}  # fmt: skip
    if not args.kernels:
        report["command"] += " --no-kernels"
    outd = Path(args.out)
    outd.mkdir(parents=True, exist_ok=True)
    from sparsec.backends.bench import result_suffix

    stem = "bench_x86" + result_suffix() + ("" if args.threads == 1 else f"_t{args.threads}")  # one file per ISA and thread count
    (outd / f"{stem}.json").write_text(json.dumps(report, indent=1, sort_keys=True) + "\n")
    lines = [f"# golden tiny-gpt on x86: sparsec vs onnxruntime ({args.threads} thread(s))", "", f"Command: `{report['command']}`", ""]
    for name, doc in docs.items():
        lines += [f"## {name}", "", table_markdown(doc), ""]
    if kernels:
        lines += ["## kernels alone, LLM layer shapes (default schedules; M > 16: the panel GEMM)", "",
                  f"numpy copy bandwidth on this machine: {bw:.1f} GB/s (read + write).", "",
                  "| shape | format | kernel | weight MB | M=1 ms | vs dense | GB/s | M=16 ms | vs dense | M=128 ms | vs dense |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for r in kernels:
            lines.append(f"| {r['shape']} | {r['format']} | {r['kernel']} | {r['weight_bytes'] / 1e6:.1f} | {r['ms_m1']:.3f} | {r['speedup_m1']:.2f}x | "
                         f"{r['gbps_m1']:.1f} | {r['ms_m16']:.3f} | {r['speedup_m16']:.2f}x | {r['ms_m128']:.2f} | {r['speedup_m128']:.2f}x |")  # fmt: skip
        lines.append("")
    (outd / f"{stem}.md").write_text("\n".join(lines))
    print(f"wrote {outd / f'{stem}.json'} and {outd / f'{stem}.md'}")


if __name__ == "__main__":
    main()
