"""Cost of raising MoE blocks in ONNX files (compressor/frontends/moe_onnx.py) at import.

For Mixtral-style test models exported by torch.onnx (TorchScript and dynamo exporters), ``load_onnx`` is timed with
the MoE raiser (finds the blocks, runs them on random inputs, verifies) and, in the same run, with the raiser
switched off (the baseline: the blocks import as plain layers). Median of ``--repeats`` imports each.

    python bench/bench_moe_onnx_import.py [--repeats 3]

Writes bench/results/moe_onnx_import.json and bench/results/moe_onnx_import.md.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, os.path.dirname(ROOT))

CONFIGS = [  # label, LlamaStyle kwargs
    ("test mixtral: d64 ffn128, 2 layers, 4 experts top-2", dict(d=64, ffn=128, layers=2, moe={"num_experts": 4, "top_k": 2})),
    ("d256 ffn1024, 4 layers, 8 experts top-2", dict(d=256, ffn=1024, layers=4, heads=4, moe={"num_experts": 8, "top_k": 2})),
]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    import torch

    from sparsec.compressor.frontends import moe_onnx
    from sparsec.compressor.frontends.onnx import load_onnx
    from sparsec.compressor.ir import MoE
    from sparsec.tests import models as tm

    real = moe_onnx.raise_onnx_moe
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for label, kw in CONFIGS:
            torch.manual_seed(0)
            model = tm.LlamaStyle(**kw).eval()
            for exporter, opset in (("torchscript", 17), ("dynamo", 18)):
                path = os.path.join(tmp, f"{len(rows)}.onnx")
                tm.export_onnx(model, path, exporter, opset)
                times = {}
                moes = {}
                for mode in ("baseline", "raiser"):
                    moe_onnx.raise_onnx_moe = real if mode == "raiser" else (lambda g, seed=0: (0, []))
                    ts = []
                    for _ in range(args.repeats):
                        t0 = time.perf_counter()
                        g = load_onnx(path)
                        ts.append(time.perf_counter() - t0)
                    times[mode] = statistics.median(ts)
                    moes[mode] = sum(isinstance(n, MoE) for n in g.nodes)
                moe_onnx.raise_onnx_moe = real
                rows.append({"model": label, "exporter": exporter, "opset": opset, "moe_layers": moes["raiser"],
                             "moe_layers_baseline": moes["baseline"], "import_s_baseline": round(times["baseline"], 3),
                             "import_s_raiser": round(times["raiser"], 3),
                             "overhead_s": round(times["raiser"] - times["baseline"], 3),
                             "ratio": round(times["raiser"] / times["baseline"], 2)})  # fmt: skip
                print(rows[-1], flush=True)
    doc = {"bench": "moe_onnx_import", "repeats": args.repeats, "machine": f"{platform.machine()} {os.cpu_count()} cpus (shared)",
           "torch_threads": torch.get_num_threads(), "rows": rows}  # fmt: skip
    out = os.path.join(HERE, "results")
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "moe_onnx_import.json"), "w") as f:
        json.dump(doc, f, indent=1)
    lines = ["# MoE raising at ONNX import: cost", "",
             f"`python bench/bench_moe_onnx_import.py --repeats {args.repeats}` ({doc['machine']}); median import seconds, "
             "baseline = the same import with the MoE raiser off (blocks stay plain layers).", "",
             "| model | exporter | MoE layers (raiser / baseline) | import s, baseline | import s, with raiser | overhead s | ratio |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        lines.append(f"| {r['model']} | {r['exporter']} {r['opset']} | {r['moe_layers']} / {r['moe_layers_baseline']} | "
                     f"{r['import_s_baseline']} | {r['import_s_raiser']} | {r['overhead_s']} | {r['ratio']}x |")  # fmt: skip
    with open(os.path.join(out, "moe_onnx_import.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
