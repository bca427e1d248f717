"""N:M pruning benchmark: quality on the golden byte-level GPT, and SparseGPT speed on a 22M-parameter BERT.

(a) ``tiny-gpt`` at 2:4 on every Linear but the output head, through the real ``sparsec compress`` path, once per
    method: held-out perplexity of the dense model (measured in the same run) and after magnitude / Wanda /
    SparseGPT pruning, plus the mean held-out layer error and the end-to-end output error.
(b) a BERT-style encoder of 22M parameters (6 layers, hidden 384, FFN 1536, 6 heads, vocab 30522) exported with
    ``torch.onnx.export``, compressed at 2:4 with SparseGPT on 128 calibration sequences of 128 tokens (plus 16 held
    out for the report's errors), restricted to 2 CPU cores (``taskset`` when available, 2 torch threads): wall time
    of the whole command, and the pass / quality / build breakdown from the artifact's timings.json.

Usage::

    python bench/bench_prune.py                 # both parts
    python bench/bench_prune.py --part gpt      # (a) only
    python bench/bench_prune.py --part bert     # (b) only

Writes ``bench/results/prune_gpt{suffix}.{json,md}`` and ``bench/results/prune_bert{suffix}.{json,md}``. Timings
depend on what else runs on the machine: the JSON records the load average before and after each run.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import subprocess_env  # noqa: E402  (bench/ is on sys.path)

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
METHODS = ("magnitude", "wanda", "sparsegpt")
LOADS: list = []  # 1-minute load average before / after each run: other work on the machine skews timings




def _cores(threads: int) -> list[str]:
    """``taskset -c 0..threads-1`` when the machine has more cores than asked for (fair N-core figure)."""
    if shutil.which("taskset") and (os.cpu_count() or 1) > threads:
        return ["taskset", "-c", ",".join(str(i) for i in range(threads))]
    return []


def compress(args: list[str], threads: int) -> tuple[dict, dict, float]:
    """Run ``sparsec compress ... --json``; returns (report with timings merged, timings.json, wall seconds)."""
    with tempfile.TemporaryDirectory(prefix="sparsec-bench-") as tmp:
        out = Path(tmp) / "out"
        cmd = _cores(threads) + [sys.executable, "-m", "sparsec", "compress", *args, "-o", str(out), "--json"]
        load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
        t0 = time.perf_counter()
        p = subprocess.run(cmd, cwd=ROOT, env=subprocess_env(threads), capture_output=True, text=True)
        wall = time.perf_counter() - t0
        LOADS.append((load_before, os.getloadavg()[0] if hasattr(os, "getloadavg") else None))
        if p.returncode not in (0, 1):
            raise SystemExit(f"command failed ({p.returncode}): {' '.join(cmd)}\n{p.stderr[-3000:]}")
        timings = json.loads((out / "timings.json").read_text())
        return json.loads(p.stdout), timings, wall


def bench_gpt(threads: int) -> dict:
    rows = []
    dense = None
    for method in METHODS:
        rep, timings, wall = compress(["--example", "tiny-gpt", "--nm", "2:4", "--method", method], threads)
        q = rep["quality"]
        p = rep["passes"][0]
        if dense is None:
            dense = q["perplexity_original"]
        assert abs(q["perplexity_original"] - dense) < 1e-9 * dense, "dense perplexity must not depend on the method"
        rows.append({
            "method": method,
            "perplexity": q["perplexity"],
            "perplexity_dense": q["perplexity_original"],
            "ratio_to_dense": q["perplexity"] / q["perplexity_original"],
            "output_rel_error": q.get("output_rel_error"),
            "output_cosine": q.get("output_cosine"),
            "mean_layer_error": p["totals"].get("mean_error"),
            "layers_pruned": p["totals"].get("compressed"),
            "pass_seconds": p.get("seconds"),
            "wall_seconds": wall,
            "eval_tokens": q.get("eval_tokens"),
        })  # fmt: skip
    res = {
        "benchmark": "nm_prune quality, golden tiny-gpt, 2:4 on all Linear layers but the output head",
        "command": "python -m sparsec compress --example tiny-gpt --nm 2:4 --method {magnitude,wanda,sparsegpt} -o OUT --json",
        "perplexity_dense": dense,
        "rows": rows,
        "threads": threads,
        "load_average_before_after": LOADS[-len(METHODS):],
        "machine": platform.processor() or platform.machine(),
    }
    lines = [
        "| method | held-out perplexity | vs dense | mean layer error (held-out) | output rel. error | pass s |",
        "|---|---:|---:|---:|---:|---:|",
        f"| dense | {dense:.3f} | 1.000 | - | - | - |",
    ]
    for r in rows:
        lines.append(f"| {r['method']} | {r['perplexity']:.3f} | {r['ratio_to_dense']:.3f} | {r['mean_layer_error']:.4f} | "
                     f"{r['output_rel_error']:.4f} | {r['pass_seconds']:.1f} |")  # fmt: skip
    res["markdown"] = "\n".join(lines)
    return res


def bench_bert(threads: int, samples: int = 128, seq: int = 128, heldout: int = 16, target: str = "x86") -> dict:
    import torch

    sys.path.insert(0, str(ROOT))
    from tests.models import BertStyle, export_onnx

    torch.manual_seed(0)
    model = BertStyle(vocab=30522, d=384, layers=6, heads=6, ffn=1536, maxpos=seq).eval()
    params = sum(p.numel() for p in model.parameters())
    with tempfile.TemporaryDirectory(prefix="sparsec-bert-") as tmp:
        path = os.path.join(tmp, "bert22m.onnx")
        export_onnx(model, path, "torchscript", 17)
        args = [path, "--nm", "2:4", "--method", "sparsegpt", "--calib-samples", str(samples + heldout), "--heldout", str(heldout),
                "--seq-len", str(seq), "--target", target]  # fmt: skip
        rep, timings, wall = compress(args, threads)
    p = rep["passes"][0]
    res = {
        "benchmark": "nm_prune speed: SparseGPT 2:4 on a 22M-parameter BERT-style encoder",
        "command": f"python -m sparsec compress bert22m.onnx --nm 2:4 --method sparsegpt --calib-samples {samples + heldout} "
                   f"--heldout {heldout} --seq-len {seq} --target {target} -o OUT --json",
        "model": {"params": params, "layers": 6, "hidden": 384, "ffn": 1536, "heads": 6, "vocab": 30522},
        "calibration": {"fit_sequences": samples, "heldout_sequences": heldout, "seq_len": seq, "data": "generated token ids"},
        "threads": threads,
        "cores": "taskset " + ",".join(str(i) for i in range(threads)) if _cores(threads) else "all",
        "wall_seconds": wall,
        "pass_seconds": p.get("seconds"),
        "quality_seconds": timings.get("quality_seconds"),
        "build_seconds": timings.get("build_seconds"),
        "total_seconds_inside": timings.get("total_seconds"),
        "layers_pruned": p["totals"].get("compressed"),
        "mean_layer_error": p["totals"].get("mean_error"),
        "output_rel_error": rep["quality"].get("output_rel_error"),
        "budget_seconds": 60,
        "load_average_before_after": LOADS[-1],
        "cpu_count": os.cpu_count(),
        "machine": platform.processor() or platform.machine(),
    }
    res["markdown"] = "\n".join([
        "| model | calibration | threads | nm_prune pass s | end-to-end quality check s | build s | whole command s |",
        "|---|---|---:|---:|---:|---:|---:|",
        f"| BERT-style {params / 1e6:.1f}M (6x384, FFN 1536) | {samples}x{seq} tokens (+{heldout} held out) | {threads} | "
        f"{res['pass_seconds']:.1f} | {res['quality_seconds']:.1f} | {res['build_seconds']:.1f} | {wall:.1f} |",
    ])  # fmt: skip
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", choices=("gpt", "bert", "all"), default="all")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--suffix", default="", help="appended to the result file names (e.g. the machine)")
    ap.add_argument("--target", default="wasm", help="target of the BERT run (default wasm: no TVM build, whose time is not\n"
                    "part of compression; with x86 the build time is reported apart)")
    a = ap.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    parts = ("gpt", "bert") if a.part == "all" else (a.part,)
    for part in parts:
        res = bench_gpt(a.threads) if part == "gpt" else bench_bert(a.threads, target=a.target)
        res["host"] = platform.node()
        (RESULTS / f"prune_{part}{a.suffix}.json").write_text(json.dumps(res, indent=1) + "\n")
        (RESULTS / f"prune_{part}{a.suffix}.md").write_text(f"# {res['benchmark']}\n\n`{res['command']}`\n\n{res['markdown']}\n")
        print(res["markdown"])


if __name__ == "__main__":
    main()
