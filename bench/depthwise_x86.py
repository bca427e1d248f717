"""Depthwise convs on x86, three ways in the same run: sparsec's channels-last depthwise kernel (backends/lower.py
``depthwise_conv``), the lowering before it (TVM's grouped ``conv2d`` on an NCHW copy of the input: ``tvm conv2d``)
and onnxruntime on the same ONNX model. Each model is a depthwise conv (+ bias, ReLU), after a 1x1 conv where ``after
1x1`` says so (MobileNet's inverted residual: the depthwise input is then channels-last in the library). Median of
``--runs`` calls, batch 1, ``--threads`` threads for TVM and onnxruntime alike.

    python bench/depthwise_x86.py [--threads 1] [--runs 30]   # -> bench/results/depthwise_x86_t{threads}.{json,md}
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from _common import write_results  # noqa: E402

# (channels, spatial, kernel, stride, after a 1x1 conv): MobileNetV2 / EfficientNet 3x3 and 5x5, ConvNeXt 7x7, a conv1d
CASES = [(96, 56, 3, 1, False), (96, 56, 3, 1, True), (144, 28, 3, 2, True), (240, 28, 5, 1, True), (384, 14, 3, 1, True),
         (128, 28, 7, 1, True), (768, 7, 7, 1, True), (256, 64, 4, 1, "1d")]  # fmt: skip


def _model(c, hw, k, s, pre, path, rng):
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    nd = 1 if pre == "1d" else 2
    sp = [hw] * nd
    w = (rng.standard_normal((c, 1, *[k] * nd)) * 0.3).astype(np.float32)
    b = rng.standard_normal(c).astype(np.float32)
    inits = [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")]
    nodes, xin = [], "x"
    if pre:
        inits.append(numpy_helper.from_array((rng.standard_normal((c, c, *[1] * nd)) * 0.1).astype(np.float32), "w0"))
        nodes.append(helper.make_node("Conv", ["x", "w0"], ["x1"], kernel_shape=[1] * nd))
        xin = "x1"
    pads = [k // 2] * nd + [(k - 1) // 2] * nd  # "same" for odd and even kernels (causal-free)
    nodes += [helper.make_node("Conv", [xin, "w", "b"], ["y0"], group=c, kernel_shape=[k] * nd, pads=pads, strides=[s] * nd),
              helper.make_node("Relu", ["y0"], ["y"])]  # fmt: skip
    out = [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", c, *[f"o{i}" for i in range(nd)]])]
    gr = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", c, *sp])], out, inits)
    onnx.save(helper.make_model(gr, opset_imports=[helper.make_opsetid("", 17)]), path)
    return [1, c, *sp]


def _median_ms(f, runs):
    from sparsec.backends.bench import time_fn

    return time_fn(f, runs, 3)["median_ms"]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--runs", type=int, default=30)
    a = ap.parse_args()
    os.environ["TVM_NUM_THREADS"] = str(a.threads)
    import onnxruntime as ort

    from sparsec.backends import lower as lw
    from sparsec.backends.bench import _cpu_name
    from sparsec.backends.build import build_to_dir
    from sparsec.backends.runtime import LoadedLib
    from sparsec.compressor.frontends.onnx import load_onnx

    rng = np.random.default_rng(0)
    orig, rows = lw._Lowerer.depthwise_conv, []
    for c, hw, k, s, pre in CASES:
        d = tempfile.mkdtemp(prefix="sparsec-dw-")
        path = os.path.join(d, "m.onnx")
        shape = _model(c, hw, k, s, pre, path, rng)
        x = rng.standard_normal(shape).astype(np.float32)
        so = ort.SessionOptions()
        so.intra_op_num_threads = a.threads
        sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
        ref = sess.run(None, {"x": x})[0]
        ms, err = {"onnxruntime": _median_ms(lambda: sess.run(None, {"x": x}), a.runs)}, {}
        for mode in ("sparsec depthwise", "tvm conv2d"):
            lw._Lowerer.depthwise_conv = orig if mode == "sparsec depthwise" else (lambda self, n: None)
            try:
                graph = load_onnx(path)
                build_to_dir(graph, "x86", os.path.join(d, mode.replace(" ", "_")))
            finally:
                lw._Lowerer.depthwise_conv = orig
            lib = LoadedLib(lib_dir=os.path.join(d, mode.replace(" ", "_")), graph=graph)
            got = lib.run({"x": x})["y"]
            err[mode] = float(np.abs(got - ref).max() / np.abs(ref).max())
            ms[mode] = _median_ms(lib.timer({"x": x}), a.runs)
        rows.append({"channels": c, "spatial": hw, "kernel": k, "stride": s, "after": "1x1 conv" if pre else "input",
                     "conv": "1d" if pre == "1d" else "2d", "ms": ms, "max_rel_err_vs_ort": err,
                     "vs_ort": ms["onnxruntime"] / ms["sparsec depthwise"], "vs_tvm_conv2d": ms["tvm conv2d"] / ms["sparsec depthwise"]})  # fmt: skip
        print(rows[-1], flush=True)
    doc = {"cpu": _cpu_name(), "threads": a.threads, "runs": a.runs, "cases": rows}
    md = [f"# Depthwise conv + ReLU on x86 ({doc['cpu']}), batch 1, {a.threads} thread(s): `python bench/depthwise_x86.py --threads {a.threads}`", "",
          "| conv | C | size | kernel | stride | input | sparsec ms | tvm conv2d ms (before) | onnxruntime ms | vs onnxruntime | vs before | max rel err |",
          "|---|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        m = r["ms"]
        md.append(f"| {r['conv']} | {r['channels']} | {r['spatial']} | {r['kernel']} | {r['stride']} | {r['after']} | "
                  f"{m['sparsec depthwise']:.3f} | {m['tvm conv2d']:.3f} | {m['onnxruntime']:.3f} | {r['vs_ort']:.2f}x | "
                  f"{r['vs_tvm_conv2d']:.1f}x | {r['max_rel_err_vs_ort']['sparsec depthwise']:.1e} |")  # fmt: skip
    md += ["", f"Median of {a.runs} calls after 3 warm-up, same run; `vs` columns: the other's time over sparsec's."]
    write_results(f"depthwise_x86_t{a.threads}", doc, md)


if __name__ == "__main__":
    main()
