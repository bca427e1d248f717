"""Float16 models on x86, three ways in the same run: the library computing in float32 (backends/lower.py
``float32_compute``, what a build does now), the library computing in float16 as before it (``float32_compute``
patched to find nothing), and onnxruntime on the same float16 ONNX model. Models: the repository's HF-style families
(tests/models_more.py) after ``.half()``, exported with the TorchScript exporter; uncompressed (no passes), so each
output is also compared with the torch module in float32 on the same float16-rounded weights. Median of ``--runs``
calls, batch 1, ``--threads`` threads for TVM and onnxruntime alike.

    python bench/float16_cpu.py [--threads 1] [--runs 20]   # -> bench/results/float16_cpu_t{threads}.{json,md}
"""
from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from _common import write_results  # noqa: E402

CASES = [("mistral_sdpa", 128), ("mistral_sdpa", 512), ("qwen2", 128), ("gemma", 128), ("distilbert", 64)]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--runs", type=int, default=20)
    a = ap.parse_args()
    os.environ["TVM_NUM_THREADS"] = str(a.threads)
    import onnxruntime as ort
    import torch

    from sparsec.backends import build as bld
    from sparsec.backends import lower as lw
    from sparsec.backends.bench import _cpu_name, time_fn
    from sparsec.backends.runtime import LoadedLib
    from sparsec.compressor.frontends.onnx import load_onnx
    from tests import models_more as mm

    rows = []
    for family, t in CASES:
        d = tempfile.mkdtemp(prefix="sparsec-f16-")
        m = mm.build(family).half().eval()
        path = mm.export(m, os.path.join(d, "m.onnx"), "torchscript")
        feeds = mm.feeds(m, b=1, t=t, seed=3)
        with torch.no_grad():  # float32 on the same float16-rounded weights
            ref = [r.astype(np.float64) for r in mm.reference(m.float(), feeds)]
        so = ort.SessionOptions()
        so.intra_op_num_threads = a.threads
        sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
        names = [o.name for o in sess.get_outputs()]

        def rel(outs):
            return max(float(np.linalg.norm(np.asarray(o, np.float64) - r) / np.linalg.norm(r)) for o, r in zip(outs, ref))

        ms = {"onnxruntime": time_fn(lambda: sess.run(None, feeds), a.runs, 3)["median_ms"]}
        err = {"onnxruntime": rel(sess.run(None, feeds))}
        for mode in ("float32 compute", "float16 compute"):
            lib_dir = os.path.join(d, mode.replace(" ", "_"))
            with contextlib.ExitStack() as st:
                if mode == "float16 compute":
                    orig = lw.float32_compute
                    lw.float32_compute = lambda g: None
                    st.callback(setattr, lw, "float32_compute", orig)
                graph = load_onnx(path)
                bld.build_to_dir(graph, "x86", lib_dir)
            lib = LoadedLib(lib_dir=lib_dir, graph=graph)
            got = lib.run(feeds)
            err[mode] = rel([got[n] for n in names])
            ms[mode] = time_fn(lib.timer(feeds), a.runs, 3)["median_ms"]
        rows.append({"model": family, "tokens": t, "ms": ms, "rel_err_vs_torch_fp32": err,
                     "vs_ort": ms["onnxruntime"] / ms["float32 compute"], "vs_before": ms["float16 compute"] / ms["float32 compute"],
                     "before_vs_ort": ms["onnxruntime"] / ms["float16 compute"]})  # fmt: skip
        print(rows[-1], flush=True)
        del lib, sess
        shutil.rmtree(d, ignore_errors=True)
    doc = {"cpu": _cpu_name(), "threads": a.threads, "runs": a.runs, "cases": rows}
    md = [f"# Float16 models on x86 ({doc['cpu']}), batch 1, {a.threads} thread(s): `python bench/float16_cpu.py --threads {a.threads}`", "",
          "| model | tokens | float32 compute ms | float16 compute ms (before) | onnxruntime ms | vs onnxruntime | before vs onnxruntime | vs before | rel err: float32 / float16 / onnxruntime |",
          "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        m, e = r["ms"], r["rel_err_vs_torch_fp32"]
        md.append(f"| {r['model']} | {r['tokens']} | {m['float32 compute']:.3f} | {m['float16 compute']:.3f} | {m['onnxruntime']:.3f} | "
                  f"{r['vs_ort']:.2f}x | {r['before_vs_ort']:.2f}x | {r['vs_before']:.2f}x | "
                  f"{e['float32 compute']:.1e} / {e['float16 compute']:.1e} / {e['onnxruntime']:.1e} |")  # fmt: skip
    md += ["", f"Median of {a.runs} calls after 3 warm-up, same run; `vs` columns: the other's time over the float32 library's. "
           "Errors: relative to the torch module in float32 on the same float16-rounded weights (no passes)."]  # fmt: skip
    write_results(f"float16_cpu_t{a.threads}", doc, md)


if __name__ == "__main__":
    main()
