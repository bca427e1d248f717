"""One grouped 3x3 conv (+ bias, ReLU) compiled for x86 two ways in the same run: sparsec's grouped im2col + batched
matmul (backends/lower.py ``grouped_conv``, forced at every group width here) and TVM's own grouped ``conv2d`` (what
the library used before, and still uses below ``GROUPED_CONV_MIN_OUT`` output channels a group: the "default"
column). Median of 20 calls of the library's main, batch 1.

    python bench/grouped_conv_x86.py    # -> bench/results/grouped_conv_x86.{json,md}
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# (channels, groups, spatial): 4 / 2 / 8 groups of >= 16 outputs (RegNet / ResNet-with-groups), ResNeXt's 32 groups
CASES = [(64, 4, 16), (64, 4, 56), (256, 8, 14), (64, 2, 32), (512, 32, 14), (64, 32, 56), (128, 32, 28), (256, 32, 28),
         (128, 16, 28), (96, 12, 28)]  # fmt: skip


def _model(c, g, hw, path, rng):
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = rng.standard_normal((c, c // g, 3, 3)).astype(np.float32)
    b = rng.standard_normal(c).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["y0"], group=g, kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["y0"], ["y"])]  # fmt: skip
    gr = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", c, hw, hw])],
                           [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", c, hw, hw])],
                           [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")])  # fmt: skip
    onnx.save(helper.make_model(gr, opset_imports=[helper.make_opsetid("", 17)]), path)


def main():
    from sparsec.backends import lower as lw
    from sparsec.backends.build import build_to_dir
    from sparsec.backends.runtime import LoadedLib
    from sparsec.compressor.frontends.onnx import load_onnx

    rng = np.random.default_rng(0)
    orig, min_out, rows = lw._Lowerer.grouped_conv, lw.GROUPED_CONV_MIN_OUT, []
    for c, g, hw in CASES:
        d = tempfile.mkdtemp(prefix="sparsec-gconv-")
        path = os.path.join(d, "m.onnx")
        _model(c, g, hw, path, rng)
        x = rng.standard_normal((1, c, hw, hw)).astype(np.float32)
        ms, outs = {}, {}
        for mode in ("im2col_bmm", "tvm_conv2d"):  # im2col + bmm at every group width, to show where it loses
            lw._Lowerer.grouped_conv = orig if mode == "im2col_bmm" else (lambda self, n: None)
            lw.GROUPED_CONV_MIN_OUT = 1
            try:
                graph = load_onnx(path)
                build_to_dir(graph, "x86", os.path.join(d, mode))
            finally:
                lw._Lowerer.grouped_conv, lw.GROUPED_CONV_MIN_OUT = orig, min_out
            lib = LoadedLib(lib_dir=os.path.join(d, mode), graph=graph)
            outs[mode] = lib.run({"x": x})["y"]
            f = lib.timer({"x": x})
            for _ in range(3):
                f()
            ts = []
            for _ in range(20):
                t0 = time.perf_counter()
                f()
                ts.append(time.perf_counter() - t0)
            ms[mode] = float(np.median(ts) * 1e3)
        err = float(np.abs(outs["im2col_bmm"] - outs["tvm_conv2d"]).max() / np.abs(outs["tvm_conv2d"]).max())
        rows.append({"channels": c, "groups": g, "out_per_group": c // g, "spatial": hw, **{f"{k}_ms": v for k, v in ms.items()},
                     "speedup": ms["tvm_conv2d"] / ms["im2col_bmm"], "max_rel_diff": err,
                     "default": "im2col_bmm" if c // g >= min_out else "tvm_conv2d"})  # fmt: skip
        print(rows[-1], flush=True)
    from sparsec.backends.bench import _cpu_name

    doc = {"cpu": _cpu_name(), "threads": os.environ.get("TVM_NUM_THREADS", "default"), "cases": rows}
    out = ROOT / "bench" / "results"
    (out / "grouped_conv_x86.json").write_text(json.dumps(doc, indent=1))
    md = [f"# Grouped 3x3 conv + ReLU on x86 ({doc['cpu']}), batch 1: `python bench/grouped_conv_x86.py`", "",
          "| C | groups | out / group | HxW | im2col + bmm ms | TVM grouped conv2d ms | speedup | default | max rel diff |",
          "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        md.append(f"| {r['channels']} | {r['groups']} | {r['out_per_group']} | {r['spatial']} | {r['im2col_bmm_ms']:.3f} | "
                  f"{r['tvm_conv2d_ms']:.3f} | {r['speedup']:.2f}x | {r['default']} | {r['max_rel_diff']:.1e} |")  # fmt: skip
    (out / "grouped_conv_x86.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
