"""The conv net of bench/cuda_conv.py (ResNet-style bottlenecks, 112x112 input) on x86 through the CLI: compressed with
2:4 and 2:4 + int4, then `sparsec bench` (the library vs the same net built dense by sparsec, and vs onnxruntime on
the original ONNX, same machine, same run), batch 1 and 8.

    python bench/conv_x86.py [--threads 2] [--runs 10]    # -> bench/results/conv_x86.{json,md}
    python bench/conv_x86.py --groups 32                  # ResNeXt-style grouped 3x3 convs -> conv_x86_g32.{json,md}

Grouped convs stay dense (only group-1 convs are compressed); they are lowered as a grouped im2col + one batched matmul.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

VARIANTS = {"nm24": ["--nm", "2:4", "--method", "magnitude"],
            "nm24_int4": ["--nm", "2:4", "--method", "magnitude", "--quant", "int4", "--group-size", "32"]}  # fmt: skip


def main():
    import numpy as np
    import torch

    from bench.cuda_conv import SIZE, net

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    ap.add_argument("--groups", type=int, default=1, help="groups of the bottlenecks' 3x3 convs (ResNeXt-style: 32)")
    a = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="sparsec-conv-x86-"))
    torch.manual_seed(0)
    m = net(a.groups)().eval()
    onnx_path = work / "model.onnx"
    torch.onnx.export(m, (torch.randn(1, 3, SIZE, SIZE),), str(onnx_path), input_names=["pixels"], output_names=["logits"],
                      dynamo=False, dynamic_axes={"pixels": {0: "b"}, "logits": {0: "b"}})  # fmt: skip
    np.savez(work / "calib.npz", pixels=np.random.default_rng(0).standard_normal((8, 3, SIZE, SIZE)).astype(np.float32))
    res, md = {"size": SIZE, "threads": a.threads, "groups": a.groups, "variants": {}}, []
    for name, flags in VARIANTS.items():
        out = work / name
        subprocess.run([sys.executable, "-m", "sparsec", "compress", str(onnx_path), *flags, "--calib", str(work / "calib.npz"),
                        "--target", "x86", "-o", str(out), "-q"], check=True)  # fmt: skip
        subprocess.run([sys.executable, "-m", "sparsec", "bench", str(out), "--original", str(onnx_path), "--shapes", "1x1,8x1",
                        "--threads", str(a.threads), "--runs", str(a.runs), "-o", str(out / "bench")], check=True,
                       stdout=subprocess.DEVNULL)  # fmt: skip
        res["variants"][name] = json.loads((out / "bench" / "bench.json").read_text())
        md += [f"## {name}", "", (out / "bench" / "bench.md").read_text().strip(), ""]
    dst = Path(a.out)
    stem = "conv_x86" if a.groups == 1 else f"conv_x86_g{a.groups}"
    (dst / f"{stem}.json").write_text(json.dumps(res, indent=1))
    cmd = "python bench/conv_x86.py" + (f" --groups {a.groups}" if a.groups != 1 else "")
    what = "" if a.groups == 1 else f", 3x3 convs in {a.groups} groups"
    head = f"# Conv net on x86 ({SIZE}x{SIZE} input{what}, {a.threads} threads): `{cmd}`\n\n"
    (dst / f"{stem}.md").write_text(head + "\n".join(md) + "\n")
    print(head + "\n".join(md))


if __name__ == "__main__":
    main()
