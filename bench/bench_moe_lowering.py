"""x86: a Mixtral-style MoE model compiled with routed MoE layers (each expert on the tokens routed to it) against the
same artifact compiled dense-equivalently (every expert on every token, weighted by the routing; the lowering before
routing), and onnxruntime on the exported ONNX file, same machine, same run.

    python bench/bench_moe_lowering.py [--threads 1] [--runs 20] [--d 512 --ffn 1536 --experts 8 --top-k 2 --layers 2]

The model is tests/models.py LlamaStyle with Mixtral MoE blocks (softmax router, top-k, renormalized, SwiGLU experts;
the HF loop with where / index_add_), exported by torch.onnx (TorchScript exporter), compressed by
``sparsec compress --target x86 --nm 2:4 --method magnitude`` through the Python API (magnitude: the timing does
not depend on the pruning method). Both libraries bind the same weights.safetensors; their outputs are checked
against the executor on the same inputs before timing. Scenarios: batch x sequence 1x1 (decode: top-k of the experts'
weights read), 1x16 and 1x128 (prefill). Writes bench/results/moe_lowering.json and .md.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT.parent))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--d", type=int, default=512)
    ap.add_argument("--ffn", type=int, default=1536)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = ap.parse_args()
    os.environ["TVM_NUM_THREADS"] = str(args.threads)

    import numpy as np
    import torch

    torch.set_num_threads(args.threads)
    from sparsec.backends.bench import _ort_session, scenario_inputs, time_fn
    from sparsec.backends.build import build_to_dir
    from sparsec.backends.runtime import LoadedLib
    from sparsec.compressor.artifact import load_artifact
    from sparsec.compressor.compress import compress, load_model
    from sparsec.compressor.executor import Executor
    from sparsec.compressor.pipeline import PassSpec, Recipe
    from sparsec.tests import models as tm

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        model = tm.LlamaStyle(vocab=512, d=args.d, layers=args.layers, heads=8, ffn=args.ffn,
                              moe={"num_experts": args.experts, "top_k": args.top_k}).eval()  # fmt: skip
        onnx_path = os.path.join(tmp, "moe.onnx")
        tm.export_onnx(model, onnx_path, "torchscript", 17)
        art = Path(tmp) / "art"
        compress(load_model(onnx_path), Recipe(target="x86", passes=[PassSpec("nm_prune", {"nm": "2:4", "method": "magnitude"})]), art, progress=False)
        a = load_artifact(art)
        info = a.report["build"]
        assert info["status"] == "built" and info.get("moe_lowering", "").startswith("routed"), info
        dense_eq = Path(tmp) / "dense_eq_lib"
        build_to_dir(a.graph, "x86", dense_eq, moe_routed=False)
        libs = {"routed": LoadedLib(art), "dense_equivalent": LoadedLib(lib_dir=dense_eq, graph=a.graph)}
        ort = _ort_session(onnx_path, args.threads)
        ex = Executor(a.graph)
        for batch, seq in ((1, 1), (1, 16), (1, 128)):
            feeds = scenario_inputs(a.graph, batch, seq, seed=batch * 1000 + seq)
            ref = next(iter(ex.run(feeds).values()))
            row = {"batch": batch, "seq": seq}
            for name, lib in libs.items():
                got = next(iter(lib.run(feeds).values()))
                row[f"{name}_rel_err"] = float(np.abs(got - ref).max() / np.abs(ref).max())
                assert row[f"{name}_rel_err"] < 1e-3, (name, row)
            calls = {name: lib.timer(feeds) for name, lib in libs.items()}
            calls["onnxruntime"] = lambda f=feeds: ort.run(None, f)
            for _ in range(2):  # interleaved rounds, the better median per engine
                for name, fn in calls.items():
                    t = time_fn(fn, args.runs, 3)
                    if name not in row or t["median_ms"] < row[name]["median_ms"]:
                        row[name] = t
            row["routed_vs_dense_equivalent"] = row["dense_equivalent"]["median_ms"] / row["routed"]["median_ms"]
            row["routed_vs_onnxruntime"] = row["onnxruntime"]["median_ms"] / row["routed"]["median_ms"]
            rows.append(row)
            print(f"{batch}x{seq}: routed {row['routed']['median_ms']:.3f} ms, dense-equivalent "
                  f"{row['dense_equivalent']['median_ms']:.3f} ms ({row['routed_vs_dense_equivalent']:.2f}x), "
                  f"onnxruntime {row['onnxruntime']['median_ms']:.3f} ms ({row['routed_vs_onnxruntime']:.2f}x)")  # fmt: skip
    cfg = {k: getattr(args, k) for k in ("d", "ffn", "experts", "top_k", "layers", "threads", "runs")}
    doc = {"schema": "sparsec.bench.moe_lowering/1", "command": "python bench/bench_moe_lowering.py " + " ".join(sys.argv[1:]),
           "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()}, "config": cfg, "rows": rows}  # fmt: skip
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "moe_lowering.json").write_text(json.dumps(doc, indent=1) + "\n")
    lines = [f"# MoE lowering on x86: routed vs dense-equivalent (`{doc['command']}`)", "",
             f"Mixtral-style, d={args.d}, ffn={args.ffn}, {args.experts} experts top-{args.top_k}, {args.layers} layers, "
             f"2:4 (magnitude), {args.threads} thread(s); medians of {args.runs} calls, better of 2 interleaved rounds.", "",
             "| batch x seq | routed ms | dense-equivalent ms | onnxruntime ms | routed vs dense-eq. | routed vs ORT | max rel. err routed / dense-eq. |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        lines.append(f"| {r['batch']}x{r['seq']} | {r['routed']['median_ms']:.3f} | {r['dense_equivalent']['median_ms']:.3f} | "
                     f"{r['onnxruntime']['median_ms']:.3f} | {r['routed_vs_dense_equivalent']:.2f}x | {r['routed_vs_onnxruntime']:.2f}x | "
                     f"{r['routed_rel_err']:.1e} / {r['dense_equivalent_rel_err']:.1e} |")  # fmt: skip
    (out / "moe_lowering.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
