"""Group quantization, GQSA and EoRA benchmark on the golden byte-level GPT (``tiny-gpt``).

Every configuration runs through the real compress path, ``python -m sparsec compress --example tiny-gpt ... --json``
(calibration: 128 windows of 128 bytes of the training split, 16 of them held out for the per-layer errors; every
Linear but the output head; ``--no-build``: the perplexity is computed by sparsec's executor, and every run also checks
the artifact's ``model.onnx`` in onnxruntime against the executor). Reported per configuration: held-out perplexity
(364 windows, 46,592 bytes, never used for calibration) against the dense model measured in the same run, bytes of the
compressed Linear weights (and bits per weight), mean held-out layer error, end-to-end output error, and the ONNX
vs executor relative error. EoRA's recovery is the share of the (2:4 + int4) -> dense perplexity gap it closes; plain
SVD at the same ranks is the baseline. GQSA is compared with 2:4 + int4 at w4s50 and at the sparsity whose bytes
equal those of 2:4 + int4 (computed from the measured bytes).

Usage::

    python bench/bench_quant.py                  # writes bench/results/quant_gpt.{json,md}
    python bench/bench_quant.py --only gptq,rtn  # a subset (names below)
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

NM = ["--nm", "2:4", "--method", "sparsegpt"]
CONFIGS = [
    ("int8-g128 RTN", "int8_rtn", ["--quant", "int8", "--group-size", "128", "--quant-method", "rtn"]),
    ("int4-g128 RTN", "rtn", ["--quant", "int4", "--group-size", "128", "--quant-method", "rtn"]),
    ("int4-g128 GPTQ", "gptq", ["--quant", "int4", "--group-size", "128", "--quant-method", "gptq"]),
    ("int4-g128 GPTQ act-order", "gptq_ao", ["--quant", "int4", "--group-size", "128", "--quant-method", "gptq", "--act-order"]),
    ("int3-g128 RTN", "int3_rtn", ["--quant", "int3", "--group-size", "128", "--quant-method", "rtn"]),
    ("int3-g128 GPTQ", "int3_gptq", ["--quant", "int3", "--group-size", "128", "--quant-method", "gptq"]),
    ("mixed precision --auto-bits 4.5 (GPTQ)", "auto45", ["--auto-bits", "4.5", "--group-size", "128"]),
    ("2:4 (SparseGPT)", "nm", NM),
    ("2:4 + int4-g64 GPTQ", "nm_int4", NM + ["--quant", "int4", "--group-size", "64"]),
    ("2:4 + int4-g64 + SVD r=16", "nm_int4_svd16", NM + ["--quant", "int4", "--group-size", "64", "--compensate", "svd", "--rank", "16"]),
    ("2:4 + int4-g64 + EoRA r=16", "nm_int4_eora16", NM + ["--quant", "int4", "--group-size", "64", "--compensate", "eora", "--rank", "16"]),
    ("2:4 + int4-g64 + SVD r=32", "nm_int4_svd32", NM + ["--quant", "int4", "--group-size", "64", "--compensate", "svd", "--rank", "32"]),
    ("2:4 + int4-g64 + EoRA r=32", "nm_int4_eora32", NM + ["--quant", "int4", "--group-size", "64", "--compensate", "eora", "--rank", "32"]),
    ("GQSA w4s50 (g16)", "gqsa50", ["--gqsa", "w4s50"]),
]




def compress(args: list[str], threads: int) -> tuple[dict, float]:
    with tempfile.TemporaryDirectory(prefix="sparsec-bench-") as tmp:
        cmd = [sys.executable, "-m", "sparsec", "compress", "--example", "tiny-gpt", *args, "--no-build", "-o", str(Path(tmp) / "out"), "--json"]
        t0 = time.perf_counter()
        p = subprocess.run(cmd, cwd=ROOT, env=subprocess_env(threads), capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if p.returncode not in (0, 1):
            raise SystemExit(f"command failed ({p.returncode}): {' '.join(cmd)}\n{p.stderr[-3000:]}")
        return json.loads(p.stdout), wall


def summarize(label: str, key: str, args: list[str], rep: dict, wall: float) -> dict:
    q = rep["passes"]
    last = q[-1]
    rows = [r for r in last["rows"] if r["status"] == "compressed"]
    weights = sum(r["shape_before"][0] * r["shape_before"][1] for r in rows)
    first = q[0]
    bytes_dense = sum(r["bytes_before"] for r in first["rows"] if r["status"] == "compressed")
    bytes_after = sum(r["bytes_after"] for r in rows)
    gsizes = sorted({r["group_size"] for p in q for r in p["rows"] if r["status"] == "compressed" and r.get("group_size")})
    bits = sorted({r["bits"] for p in q for r in p["rows"] if r["status"] == "compressed" and r.get("bits")})
    out = {
        "config": label,
        "key": key,
        "flags": " ".join(args),
        "perplexity": rep["quality"]["perplexity"],
        "perplexity_dense": rep["quality"]["perplexity_original"],
        "bytes_linear": bytes_after,
        "bytes_linear_dense": bytes_dense,
        "bits_per_weight": 8 * bytes_after / max(1, weights),
        "group_sizes": gsizes,
        "bits": bits,
        # against the dense weight: a quantization pass after pruning reports its own error and the total (error_total)
        "mean_layer_error": (sum(r["extra"]["error_total"] for r in rows) / len(rows)
                             if rows and all("error_total" in r["extra"] for r in rows) else last["totals"].get("mean_error")),
        "output_rel_error": rep["quality"].get("output_rel_error"),
        "onnx_vs_executor_rel_error": rep["quality"].get("onnx_vs_executor_rel_error"),
        "pass_seconds": {p["name"]: p.get("seconds") for p in q},
        "wall_seconds": wall,
    }
    if last["name"] == "lowrank":
        out["mean_layer_error_before_compensation"] = last["extra"].get("mean_error_before")
    gq = next((p for p in q if p["name"] == "group_quant"), None)
    if gq is not None and "auto_bits" in gq["extra"]:
        ab = gq["extra"]["auto_bits"]
        out["auto_bits"] = {"budget": ab["budget_bits_per_weight"], "achieved": ab["achieved_bits_per_weight"],
                            "layers": {n: d["bits"] for n, d in ab["layers"].items()}}  # fmt: skip
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--only", default=None, help="comma-separated config keys")
    ap.add_argument("--suffix", default="")
    a = ap.parse_args()
    only = None if a.only is None else set(a.only.split(","))
    results = []
    dense = None
    for label, key, args in CONFIGS:
        if only is not None and key not in only:
            continue
        rep, wall = compress(args, a.threads)
        r = summarize(label, key, args, rep, wall)
        if dense is None:
            dense = r["perplexity_dense"]
        assert abs(r["perplexity_dense"] - dense) < 1e-9 * dense
        results.append(r)
        print(f"{label}: ppl {r['perplexity']:.4f} (dense {dense:.4f}), {r['bytes_linear']:,} B, onnx err {r['onnx_vs_executor_rel_error']:.2e}", flush=True)
    by = {r["key"]: r for r in results}
    # GQSA at the bytes of 2:4 + int4: kept share from the measured bytes per weight (codes + scales + zeros + mask)
    if "nm_int4" in by and (only is None or "gqsa_eq" in only):
        target = by["nm_int4"]["bits_per_weight"] / 8  # bytes per weight
        per_kept = 4 / 8 + 2 / 16 + 0.5 / 16  # int4 codes, fp16 scale and 4-bit zero point per group of 16
        kept = (target - 1 / (16 * 8)) / per_kept
        sp = max(0, min(99, int(round(100 * (1 - kept)))))
        args = ["--gqsa", f"w4s{sp}"]
        rep, wall = compress(args, a.threads)
        r = summarize(f"GQSA w4s{sp} (g16), bytes of 2:4 + int4", "gqsa_eq", args, rep, wall)
        results.append(r)
        by["gqsa_eq"] = r
        print(f"{r['config']}: ppl {r['perplexity']:.4f}, {r['bytes_linear']:,} B", flush=True)
    for k in ("nm_int4_eora16", "nm_int4_eora32", "nm_int4_svd16", "nm_int4_svd32"):
        if k in by and "nm_int4" in by:
            gap = by["nm_int4"]["perplexity"] - dense
            by[k]["gap_recovered"] = (by["nm_int4"]["perplexity"] - by[k]["perplexity"]) / gap if gap > 0 else None
    lines = [
        "| configuration | held-out perplexity | vs dense | Linear bytes | bits/weight | group sizes | mean layer error vs dense (held-out) | output rel. error | ONNX vs executor |",
        "|---|---:|---:|---:|---:|---|---:|---:|---:|",
        f"| dense (fp32) | {dense:.4f} | 1.000 | {results[0]['bytes_linear_dense']:,} | 32.00 | - | - | - | - |",
    ]
    for r in results:
        extra = f" (gap recovered {100 * r['gap_recovered']:.0f}%)" if r.get("gap_recovered") is not None else ""
        err_b = r.get("mean_layer_error_before_compensation")
        le = f"{r['mean_layer_error']:.4f}" + (f" (before: {err_b:.4f})" if err_b is not None else "")
        lines.append(f"| {r['config']}{extra} | {r['perplexity']:.4f} | {r['perplexity'] / dense:.3f} | {r['bytes_linear']:,} | "
                     f"{r['bits_per_weight']:.2f} | {','.join(map(str, r['group_sizes'])) or '-'} | {le} | {r['output_rel_error']:.4f} | "
                     f"{r['onnx_vs_executor_rel_error']:.1e} |")  # fmt: skip
    worst_onnx = max(r["onnx_vs_executor_rel_error"] for r in results)
    doc = {
        "benchmark": "group quantization / GQSA / EoRA quality, golden tiny-gpt (every Linear but lm_head)",
        "command": "python -m sparsec compress --example tiny-gpt <flags> --no-build -o OUT --json",
        "reproduce": "python bench/bench_quant.py",
        "perplexity_dense": dense,
        "worst_onnx_vs_executor_rel_error": worst_onnx,
        "rows": results,
        "threads": a.threads,
        "machine": platform.processor() or platform.machine(),
        "host": platform.node(),
        "markdown": "\n".join(lines),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"quant_gpt{a.suffix}.json").write_text(json.dumps(doc, indent=1) + "\n")
    (RESULTS / f"quant_gpt{a.suffix}.md").write_text(
        f"# {doc['benchmark']}\n\n`{doc['command']}` for each row's flags (`{doc['reproduce']}` runs them all).\n\n{doc['markdown']}\n\n"
        f"Worst relative error of the artifact's model.onnx (onnxruntime) against sparsec's executor: {worst_onnx:.1e}.\n"
    )
    print(doc["markdown"])


if __name__ == "__main__":
    main()
