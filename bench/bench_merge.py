"""Expert merging on the golden tiny-moe (8 experts, top-2): held-out perplexity at 8 -> 6 -> 4 -> 2 experts per layer,
MC-SMoE vs plain averaging vs dropping the least used experts. The same pass code `sparsec compress --example tiny-moe
--merge-experts K --merge-method M` runs; here the model is loaded and calibrated once for all rows.

    python bench/bench_merge.py [--windows 96] [--samples 64]

Writes bench/results/merge_moe.json and .md.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--windows", type=int, default=96, help="held-out windows of 128 bytes for perplexity (default 96)")
    ap.add_argument("--samples", type=int, default=64, help="calibration sequences (fit + held out)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    from sparsec.compressor.compress import calibration_for, golden_metrics, load_example
    from sparsec.compressor.pipeline import PassContext, PassSpec, Recipe, build_passes, run_passes

    src = load_example("tiny-moe")
    base_recipe = Recipe()
    base_recipe.calibration.samples = args.samples
    fit, held = calibration_for(src, base_recipe)
    dense = golden_metrics("tiny-moe", src.graph, limit=args.windows)["perplexity"]
    rows = [{"experts": 8, "method": "dense", "perplexity": dense, "params": src.graph.param_count()}]
    for k in (6, 4, 2):
        for method in ("mcsmoe", "average", "drop"):
            g = src.graph.copy()
            r = Recipe(passes=[PassSpec("expert_merge", {"experts": k, "method": method})])
            t0 = time.perf_counter()
            run_passes(g, build_passes(r), PassContext(r, calib=fit, heldout=held))
            secs = time.perf_counter() - t0
            ppl = golden_metrics("tiny-moe", g, limit=args.windows)["perplexity"]
            rows.append({"experts": k, "method": method, "perplexity": ppl, "params": g.param_count(), "pass_seconds": secs})
            print(rows[-1], flush=True)
    out = os.path.join(HERE, "results")
    os.makedirs(out, exist_ok=True)
    doc = {"model": "tiny-moe", "windows": args.windows, "calibration_samples": args.samples, "rows": rows,
           "command": "python bench/bench_merge.py " + " ".join(sys.argv[1:])}  # fmt: skip
    with open(os.path.join(out, "merge_moe.json"), "w") as f:
        json.dump(doc, f, indent=1)
    lines = ["# Expert merging, golden tiny-moe (8 experts, top-2 per layer, 4 layers)", "",
             f"`{doc['command']}` (held-out perplexity on the first {args.windows} windows of 128 bytes; dense = {dense:.3f})", "",
             "| experts/layer | MC-SMoE | average | drop | params (merged) |", "|---:|---:|---:|---:|---:|"]  # fmt: skip
    for k in (6, 4, 2):
        by = {r["method"]: r for r in rows if r["experts"] == k}
        lines.append(f"| {k} | {by['mcsmoe']['perplexity']:.3f} | {by['average']['perplexity']:.3f} | {by['drop']['perplexity']:.3f} | {by['mcsmoe']['params']:,} |")
    with open(os.path.join(out, "merge_moe.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
