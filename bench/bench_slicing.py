"""Slicing (SliceGPT) benchmark: quality and size of the golden byte-level GPT at several slicing fractions.

Every run goes through the real command, ``python -m sparsec compress --example tiny-gpt --slice F -o OUT --json``
(``--no-build``: the library build does not change the model), which measures the held-out perplexity of the
unsliced model and of the sliced one in the same run. Per fraction: the kept stream dim (the default rounds it to
a multiple of 8), parameters of the sliced matrices and of the whole model (the residual shortcuts slicing adds
included), perplexity and its ratio to the unsliced model, the end-to-end output error on held-out calibration
sequences and the per-block retained variance. ``--exact`` adds the same fractions without rounding (``round_to:
1`` in a recipe), ``--with-nm`` one run of slicing 25% followed by 2:4 SparseGPT pruning.

Usage::

    python bench/bench_slicing.py                      # 0, 10, 20, 25, 30% (rounded to multiples of 8)
    python bench/bench_slicing.py --exact --with-nm    # plus exact dims and slicing + 2:4

Writes ``bench/results/slicing_gpt{suffix}.{json,md}``.
"""
from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import subprocess_env  # noqa: E402  (bench/ is on sys.path)

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
FRACTIONS = (0.0, 0.10, 0.20, 0.25, 0.30)




def compress(args: list[str], threads: int, recipe: dict | None = None) -> tuple[dict, float, list[str]]:
    with tempfile.TemporaryDirectory(prefix="sparsec-bench-slice-") as tmp:
        out = Path(tmp) / "out"
        extra = []
        if recipe is not None:
            import yaml

            rp = Path(tmp) / "recipe.yaml"
            rp.write_text(yaml.safe_dump(recipe))
            extra = ["--recipe", str(rp)]
        cmd = [sys.executable, "-m", "sparsec", "compress", "--example", "tiny-gpt", *args, *extra, "--no-build", "-o", str(out), "--json"]
        t0 = time.perf_counter()
        p = subprocess.run(cmd, cwd=ROOT, env=subprocess_env(threads), capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if p.returncode not in (0, 1):
            raise SystemExit(f"command failed ({p.returncode}): {' '.join(cmd)}\n{p.stderr[-3000:]}")
        return json.loads(p.stdout), wall, cmd


def row_of(rep: dict, wall: float, label: str, fraction: float, round_to: int) -> dict:
    q = rep["quality"]
    sl = next(p for p in rep["passes"] if p["name"] == "slicing")
    t = sl["totals"]
    blocks = sl["extra"]["blocks"]
    dims = sorted({b["dim_after"] for b in blocks})
    rv = [b["retained_variance"] for b in blocks]
    return {
        "label": label,
        "fraction": fraction,
        "round_to": round_to,
        "dim_before": t["stream_dim"],
        "dim_after": dims[0] if len(dims) == 1 else dims,
        "actual_fraction": 1.0 - dims[0] / t["stream_dim"] if len(dims) == 1 else None,
        "perplexity": q["perplexity"],
        "perplexity_original": q["perplexity_original"],
        "ratio_to_original": q["perplexity"] / q["perplexity_original"],
        "output_rel_error": q.get("output_rel_error"),
        "onnx_vs_executor_rel_error": q.get("onnx_vs_executor_rel_error"),
        "sliced_params_before": t["sliced_params_before"],
        "sliced_params_after": t["sliced_params_after"],
        "sliced_params_reduction": t["sliced_params_reduction"],
        "added_params": t["added_params"],
        "model_params_before": t["model_params_before"],
        "model_params_after": t["model_params_after"],
        "model_params_reduction": 1.0 - t["model_params_after"] / t["model_params_before"],
        "model_params_after_all_passes": rep["model"]["params_after"],
        "retained_variance_min": min(rv),
        "retained_variance_mean": sum(rv) / len(rv),
        "final_stream_error": t.get("final_output_error"),
        "blocks": blocks,
        "pass_seconds": sl.get("seconds"),
        "wall_seconds": wall,
        "eval_tokens": q.get("eval_tokens"),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: tiny matmuls stall on busy shared cores)")
    ap.add_argument("--exact", action="store_true", help="also run every fraction with round_to 1 (recipe)")
    ap.add_argument("--with-nm", action="store_true", help="also run slicing 25%% followed by 2:4 SparseGPT")
    ap.add_argument("--suffix", default="")
    a = ap.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    rows = []
    commands = []
    for f in FRACTIONS:
        rep, wall, cmd = compress(["--slice", str(f)], a.threads)
        rows.append(row_of(rep, wall, f"--slice {f:g}", f, 8))
        commands.append(" ".join(["python"] + cmd[1:]).replace(str(ROOT) + "/", ""))
        print(f"slice {f:g}: dim {rows[-1]['dim_after']} ppl {rows[-1]['perplexity']:.4f}", flush=True)
    exact = []
    if a.exact:
        for f in FRACTIONS[1:]:
            recipe = {"passes": [{"type": "slicing", "fraction": f, "round_to": 1}]}
            rep, wall, _ = compress([], a.threads, recipe)
            exact.append(row_of(rep, wall, f"fraction {f:g}, round_to 1", f, 1))
            print(f"slice {f:g} exact: dim {exact[-1]['dim_after']} ppl {exact[-1]['perplexity']:.4f}", flush=True)
    with_nm = None
    if a.with_nm:
        rep, wall, _ = compress(["--slice", "0.25", "--nm", "2:4", "--method", "sparsegpt"], a.threads)
        with_nm = row_of(rep, wall, "--slice 0.25 --nm 2:4", 0.25, 8)
        nm = next(p for p in rep["passes"] if p["name"] == "nm_prune")
        with_nm["nm_layers_pruned"] = nm["totals"]["compressed"]
        rep2, wall2, _ = compress(["--nm", "2:4", "--method", "sparsegpt"], a.threads)
        with_nm["nm_only_perplexity"] = rep2["quality"]["perplexity"]
        # the residual shortcuts pruned too (named explicitly: they are left dense by default)
        rep3, wall3, _ = compress(["--slice", "0.25", "--nm", "2:4", "--method", "sparsegpt", "--include", r"layers\."], a.threads)
        nm3 = next(p for p in rep3["passes"] if p["name"] == "nm_prune")
        with_nm["shortcuts_pruned_perplexity"] = rep3["quality"]["perplexity"]
        with_nm["shortcuts_pruned_layers"] = nm3["totals"]["compressed"]
        print(f"slice 0.25 + 2:4: ppl {with_nm['perplexity']:.4f} (2:4 alone {with_nm['nm_only_perplexity']:.4f})", flush=True)
        # order of the kept directions: interleaved (default) vs decreasing variance (the paper's), then 2:4
        with_nm["order"] = []
        for f in ("0", "0.25"):
            for inter in (True, False):
                rec = None if inter else {"passes": [{"type": "slicing", "interleave": False}]}
                r4, _, _ = compress(["--slice", f, "--nm", "2:4", "--method", "sparsegpt"], a.threads, rec)
                with_nm["order"].append({"slice": float(f), "interleave": inter, "perplexity": r4["quality"]["perplexity"]})
                print(f"slice {f} interleave={inter} + 2:4: ppl {r4['quality']['perplexity']:.4f}", flush=True)
    base = rows[0]["perplexity_original"]
    res = {
        "benchmark": "slicing (SliceGPT) on the golden tiny-gpt (d_model 128, 4 layers): held-out perplexity and parameters",
        "command": "python -m sparsec compress --example tiny-gpt --slice F --no-build -o OUT --json   (F in 0, 0.1, 0.2, 0.25, 0.3)",
        "reproduce": "python bench/bench_slicing.py --exact --with-nm",
        "commands": commands,
        "perplexity_original": base,
        "rotation_only_output_rel_error": rows[0]["output_rel_error"],
        "calibration": "128 random 128-byte windows of the training split (112 fit, 16 held out); perplexity on the 364 "
                       "held-out windows (46,592 bytes) of the text split",
        "rows": rows,
        "exact_rows": exact,
        "with_nm": with_nm,
        "threads": a.threads,
        "machine": platform.processor() or platform.machine(),
        "host": platform.node(),
    }
    lines = [
        "| slicing | stream dim | sliced-matrix params | model params (with shortcuts) | held-out perplexity | vs unsliced | output rel. error | min retained variance |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
        f"| none (unsliced) | {rows[0]['dim_before']} | {rows[0]['sliced_params_before']:,} | {rows[0]['model_params_before']:,} | {base:.4f} | 1.000 | - | - |",
    ]

    def line(r):
        dim = r["dim_after"]
        lab = r["label"]
        if r["round_to"] == 8 and r["actual_fraction"] is not None and abs(r["actual_fraction"] - r["fraction"]) > 1e-9:
            lab += f" ({r['actual_fraction'] * 100:.2f}% after rounding)"
        return (f"| {lab} | {dim} | {r['sliced_params_after']:,} (-{r['sliced_params_reduction'] * 100:.2f}%) | "
                f"{r['model_params_after']:,} ({-r['model_params_reduction'] * 100:+.1f}%) | {r['perplexity']:.4f} | "
                f"{r['ratio_to_original']:.3f} | {r['output_rel_error']:.4f} | {r['retained_variance_min']:.4f} |")  # fmt: skip

    for r in rows + exact:
        lines.append(line(r))
    md = "\n".join(lines)
    if with_nm is not None:
        md += ("\n\n| recipe | held-out perplexity | vs unsliced | model params after |\n|---|---:|---:|---:|\n"
               f"| `--nm 2:4 --method sparsegpt` | {with_nm['nm_only_perplexity']:.4f} | {with_nm['nm_only_perplexity'] / base:.3f} | - |\n"
               f"| `--slice 0.25 --nm 2:4 --method sparsegpt` (shortcuts dense, {with_nm['nm_layers_pruned']} layers 2:4) | "
               f"{with_nm['perplexity']:.4f} | {with_nm['ratio_to_original']:.3f} | "
               f"{with_nm['model_params_after_all_passes']:,} (2:4 layers counted dense) |\n"
               f"| `--slice 0.25 --nm 2:4 --method sparsegpt --include 'layers\\.'` (shortcuts 2:4 too, "
               f"{with_nm['shortcuts_pruned_layers']} layers) | {with_nm['shortcuts_pruned_perplexity']:.4f} | "
               f"{with_nm['shortcuts_pruned_perplexity'] / base:.3f} | - |")  # fmt: skip
        md += "\n\n| then 2:4 SparseGPT | kept directions interleaved (default) | decreasing variance (`interleave: false`) |\n|---|---:|---:|\n"
        for f in (0.0, 0.25):
            pp = {o["interleave"]: o["perplexity"] for o in with_nm["order"] if o["slice"] == f}
            md += f"| `--slice {f:g} --nm 2:4 --method sparsegpt` | {pp[True]:.4f} | {pp[False]:.4f} |\n"
    res["markdown"] = md
    (RESULTS / f"slicing_gpt{a.suffix}.json").write_text(json.dumps(res, indent=1) + "\n")
    (RESULTS / f"slicing_gpt{a.suffix}.md").write_text(f"# {res['benchmark']}\n\n`{res['command']}`\n\nReproduce: "
                                                      f"`{res['reproduce']}`\n\n{md}\n")  # fmt: skip
    print(md)


if __name__ == "__main__":
    main()
