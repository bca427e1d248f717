"""A 125M-parameter LLaMA-style model through the CLI a user types, on x86: compress, then `sparsec bench`.

    python bench/cli_llama_x86.py [--work DIR] [--out bench/results] [--recipes nm24,int4,nm24_int4]

Builds ``tests.models_more.LlamaGQA`` at GPT-2-small scale (vocab 32000, d_model 768, 12 layers, 12 heads, 4 KV heads,
SwiGLU 2048, RMSNorm, rotary, untied head: 124.7M parameters, random init, seed 0), exports it with the TorchScript
ONNX exporter (dynamic batch and sequence), writes 16 x 128 calibration token ids, then per recipe runs

    sparsec compress model.onnx --target x86 <recipe> --calib calib.npz -o out_<recipe>
    sparsec bench out_<recipe>

(wall time and peak RSS of the compress from ``/usr/bin/time -v`` when present) and collects ``bench.json``: the
library vs onnxruntime on the dense ONNX and vs the dense model compiled by the same backend, one token and 1 x 128,
same process, the thread count ``sparsec bench`` picks. Random weights: the output errors say nothing about quality,
only the speed and the resources are the point. Writes ``cli_llama_x86.json`` and ``.md`` (``cli_llama_x86_avx512.*`` on an
AVX-512 host).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

RECIPES = {
    "nm24": ["--nm", "2:4", "--method", "sparsegpt"],
    "int4": ["--quant", "int4", "--group-size", "128"],
    "nm24_int4": ["--nm", "2:4", "--method", "magnitude", "--quant", "int4", "--group-size", "32"],
}


def make_model(work: Path) -> Path:
    import numpy as np
    import torch

    from tests import models_more as mm

    path = work / "model.onnx"
    if not path.exists():
        torch.manual_seed(0)
        m = mm.LlamaGQA(vocab=32000, d=768, layers=12, heads=12, kv_heads=4, ffn=2048).eval()
        mm.export(m, str(path), "torchscript")
        g = np.random.default_rng(0)
        np.savez(work / "calib.npz", input_ids=g.integers(0, 32000, (16, 128)).astype(np.int64))
    return path


def compress(model: Path, recipe: list[str], out: Path, calib: Path) -> dict:
    cmd = [sys.executable, "-m", "sparsec", "compress", str(model), "--target", "x86", *recipe, "--calib", str(calib),
           "-o", str(out), "--force"]  # fmt: skip
    timer = shutil.which("time") or ("/usr/bin/time" if os.path.exists("/usr/bin/time") else None)
    if timer:
        cmd = [timer, "-v", *cmd]
    t0 = time.time()
    p = subprocess.run(cmd, capture_output=True, text=True)
    res = {"rc": p.returncode, "seconds": time.time() - t0}
    m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", p.stderr)
    if m:
        res["peak_rss_gb"] = int(m.group(1)) / 1e6
    if p.returncode:
        res["error"] = (p.stderr.strip().splitlines() or [""])[-1]
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", default=None)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    ap.add_argument("--recipes", default=",".join(RECIPES))
    a = ap.parse_args()
    work = Path(a.work or tempfile.mkdtemp(prefix="sparsec-llama-"))
    work.mkdir(parents=True, exist_ok=True)
    model = make_model(work)
    rows = []
    for name in a.recipes.split(","):
        out = work / f"out_{name}"
        row = {"recipe": name, "args": " ".join(RECIPES[name]), "compress": compress(model, RECIPES[name], out, work / "calib.npz")}
        if row["compress"]["rc"] == 0:
            p = subprocess.run([sys.executable, "-m", "sparsec", "bench", str(out)], capture_output=True, text=True)
            row["bench_rc"] = p.returncode
            if p.returncode == 0:
                row["bench"] = json.loads((out / "bench.json").read_text())
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "bench"}), flush=True)

    outd = Path(a.out)
    outd.mkdir(parents=True, exist_ok=True)
    from sparsec.backends.bench import _cpu_name, result_suffix

    stem = "cli_llama_x86" + result_suffix()
    (outd / f"{stem}.json").write_text(json.dumps({"rows": rows}, indent=1) + "\n")
    lines = ["# 125M LLaMA-style model through the CLI on x86 (compress + `sparsec bench`)", "",
             f"CPU: {_cpu_name()}. Command: `python bench/cli_llama_x86.py` (docstring). Random weights; speed and resources only. "
             "ms = median of `sparsec bench` (same process: the compiled library, the dense model compiled by the same "
             "backend, onnxruntime on the dense ONNX).", "",
             "| recipe | compress s | peak RSS GB | threads | batch x seq | library ms | dense TVM ms | dense onnxruntime ms | vs dense ORT | vs dense TVM |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        c = r["compress"]
        for sc in (r.get("bench") or {}).get("scenarios", []):
            e = sc["engines"]
            lines.append(f"| {r['args']} | {c['seconds']:.0f} | {c.get('peak_rss_gb', float('nan')):.1f} | "
                         f"{r['bench']['machine'].get('threads', '')} | {sc['batch']} x {sc['seq']} | {e['sparsec lib']['median_ms']:.2f} | "
                         f"{e['dense tvm']['median_ms']:.2f} | {e['dense onnxruntime']['median_ms']:.2f} | "
                         f"{sc['speedup_vs_dense_onnxruntime']:.2f}x | {sc['speedup_vs_dense_tvm']:.2f}x |")
        if not r.get("bench"):
            lines.append(f"| {r['args']} | failed: {c.get('error', r.get('bench_rc'))} | | | | | | | | |")
    (outd / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {outd / stem}.json and .md (work dir {work})")


if __name__ == "__main__":
    main()
