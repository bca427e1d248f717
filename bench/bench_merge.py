"""Expert merging on the golden tiny-moe (4 layers, 8 experts, top-2): held-out perplexity at 8 -> 6 -> 4 -> 2 experts
per layer, MC-SMoE vs plain averaging vs dropping the least used experts, through the real compress path:

    python -m sparsec compress --example tiny-moe --merge-experts K --merge-method M --no-build -o OUT --json

Each method runs twice: as sparsec runs it by default (merged experts refit by least squares on the calibration
tokens, ``refit: true``) and as the paper describes it (``refit: false``, given by a one-pass recipe file). ``prune``
(classic expert pruning: the dropped experts' router outputs removed) is the extra baseline. The perplexity is the
report's own figure: all 364 held-out windows of 128 bytes; the dense model's perplexity comes from the same runs.

    python bench/bench_merge.py [--counts 6 4 2] [--quick]

Writes bench/results/merge_moe.json and bench/results/merge_moe.md.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

VARIANTS = [  # (label, method, refit)
    ("mcsmoe", "mcsmoe", None),
    ("average", "average", None),
    ("drop", "drop", None),
    ("mcsmoe (paper, no refit)", "mcsmoe", False),
    ("average (no refit)", "average", False),
    ("drop (no refit)", "drop", False),
    ("prune", "prune", None),
]


def compress(k: int | None, method: str | None, refit, tmp: str, threads: int, extra: tuple = ()) -> dict:
    out = os.path.join(tmp, f"k{k}-{method}-{refit}-{len(extra)}")
    merge = ["--merge-experts", str(k), "--merge-method", method] if k is not None else []
    cmd = [sys.executable, "-m", "sparsec", "compress", "--example", "tiny-moe", *merge, *extra, "--no-build", "-q", "-o", out, "--json"]
    if refit is not None:
        rec = os.path.join(tmp, f"recipe-{refit}.yaml")
        with open(rec, "w") as f:
            f.write(f"passes:\n  - type: expert_merge\n    refit: {str(refit).lower()}\n")
        cmd += ["--recipe", rec]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONWARNINGS="ignore")
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
    secs = time.perf_counter() - t0
    if p.returncode != 0:
        raise SystemExit(f"compress failed ({p.returncode}): {' '.join(cmd)}\n{p.stderr}")
    doc = json.loads(p.stdout)
    q = doc["quality"]
    rep = next((r for r in doc["passes"] if r["name"] == "expert_merge"), {"rows": []})
    rows = rep["rows"]
    return {
        "experts": k,
        "method": method,
        "refit": refit is not False and method != "prune",
        "perplexity": q["perplexity"],
        "perplexity_dense": q["perplexity_original"],
        "output_rel_error": q["output_rel_error"],
        "params_moe_before": sum(r["extra"]["params_before"] for r in rows),
        "params_moe_after": sum(r["extra"]["params_after"] for r in rows),
        "layers": [{"name": r["name"], "groups": r["extra"]["groups"], "frequencies": r["extra"]["frequencies"], "error": r["error"],
                    "error_before_refit": r.get("error_before")} for r in rows],  # fmt: skip
        "pass_seconds": rep.get("seconds"),
        "passes": [r["name"] for r in doc["passes"]],
        "command_seconds": round(secs, 2),
        "command": " ".join(["python -m sparsec"] + cmd[3:]).replace(tmp, "OUT"),
    }


def render(doc: dict, labels: list[str], counts: list[int]) -> list[str]:
    rows, then, dense = doc["rows"], doc.get("then_compress", []), doc["dense_perplexity"]
    by = {(r["experts"], r["label"]): r for r in rows}
    lines = [
        "# Expert merging, golden tiny-moe (4 MoE layers, 8 experts, top-2)",
        "",
        f"`{doc['command'].strip()}`: held-out perplexity (all 364 windows of 128 bytes) after "
        f"`sparsec compress --example tiny-moe --merge-experts K --merge-method M`; dense model: **{dense:.3f}** (8 experts). "
        "Ratio to dense in parentheses. Default sparsec runs refit merged experts by least squares on the calibration "
        "tokens; \"no refit\" is the method as published.",
        "",
        "| method | " + " | ".join(f"{k} experts/layer" for k in ["8 (unmerged)"] + counts) + " |",
        "|---|" + "---:|" * (len(counts) + 1),
        "| MoE parameters | " + f"{by[(counts[0], labels[0])]['params_moe_before']:,} | "
        + " | ".join(f"{by[(k, labels[0])]['params_moe_after']:,}" for k in counts) + " |",
    ]
    for lab in labels:
        cells = [f"{by[(k, lab)]['perplexity']:.3f} ({by[(k, lab)]['perplexity'] / dense:.2f}x)" for k in counts]
        lines.append(f"| {lab} | {dense:.3f} | " + " | ".join(cells) + " |")
    if then:
        lines += ["", "Merge, then compress (the same command with `--nm 2:4 --quant int4` added; SparseGPT 2:4 and int4 on every "
                  "Linear but the head and routers):", "", "| model | perplexity | command |", "|---|---:|---|"]  # fmt: skip
        for r in then:
            lines.append(f"| {r['label']} | {r['perplexity']:.3f} ({r['perplexity'] / dense:.2f}x) | `{r['command']}` |")
    return lines


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--counts", type=int, nargs="+", default=[6, 4, 2], help="experts per layer (default 6 4 2)")
    ap.add_argument("--quick", action="store_true", help="only the default-refit methods at 4 experts")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-then", action="store_true", help="skip the merge-then-compress rows (--nm 2:4 --quant int4)")
    ap.add_argument("--render", action="store_true", help="only rewrite merge_moe.md from merge_moe.json")
    args = ap.parse_args()
    if args.render:
        with open(os.path.join(HERE, "results", "merge_moe.json")) as f:
            doc = json.load(f)
        labs = list(dict.fromkeys(r["label"] for r in doc["rows"]))
        cnts = list(dict.fromkeys(r["experts"] for r in doc["rows"]))
        with open(os.path.join(HERE, "results", "merge_moe.md"), "w") as f:
            f.write("\n".join(render(doc, labs, cnts)) + "\n")
        return 0
    variants = VARIANTS[:3] if args.quick else VARIANTS
    counts = [4] if args.quick else args.counts
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for k in counts:
            for label, method, refit in variants:
                r = compress(k, method, refit, tmp, args.threads)
                r["label"] = label
                rows.append(r)
                print(f"{k} experts  {label:26s} perplexity {r['perplexity']:.3f}  ({r['command_seconds']:.0f} s)", flush=True)
        then = []
        if not args.no_then and not args.quick:
            for k, label in ((None, "8 experts (dense MoE), --nm 2:4 --quant int4"), (4, "mcsmoe 4 experts, then --nm 2:4 --quant int4")):
                r = compress(k, "mcsmoe" if k else None, None, tmp, args.threads, ("--nm", "2:4", "--quant", "int4"))
                r["label"] = label
                then.append(r)
                print(f"{label:50s} perplexity {r['perplexity']:.3f}  ({r['command_seconds']:.0f} s)", flush=True)
    dense = rows[0]["perplexity_dense"]
    os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
    doc = {"model": "tiny-moe", "dense_perplexity": dense, "rows": rows, "then_compress": then,
           "command": "python bench/bench_merge.py " + " ".join(sys.argv[1:])}  # fmt: skip
    with open(os.path.join(HERE, "results", "merge_moe.json"), "w") as f:
        json.dump(doc, f, indent=1)
    lines = render(doc, [v[0] for v in variants], counts)
    with open(os.path.join(HERE, "results", "merge_moe.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
