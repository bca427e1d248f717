"""Model families through the CLI on the GPU: each exported as users export them, compressed here with
``sparsec compress --target h100`` (the recipes below), then run on the GPU machine with ``sparsec run --engine lib``
(the TVM runtime, runtime-only TVM) and compared with onnxruntime (CPU, here) on the artifact's own model.onnx.

    python bench/cuda_models.py build --out .devpack_models          # here: artifacts, inputs, references
    python3 bench/cuda_models.py run --dir .devpack_models --out $OUT  # on the GPU machine -> $OUT/cuda_models.json

The pack is about 41 MB (12 MB as ``tar -cJ``, which is how it travelled with the runtime-only TVM of
bench/device_pack.sh). A row passes when the library's outputs are within 2e-2 (relative L2) of onnxruntime's.

The families are the test suite's real-export models (tests/models_more.py: LLaMA GQA, Mistral SDPA + mask, Qwen2,
Gemma, Phi-2, GPT-NeoX, OPT, Falcon, T5 encoder, ViT, Whisper encoder, DistilBERT, CLIP text, LLaMA with a KV cache,
Mixtral, a float16 Mistral), a BERT whose inputs' axes are named apart (TorchScript's list-form dynamic_axes: the
library ties them) and a CNN with 4-group convs (the grouped im2col lowering) and a depthwise conv.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent

RECIPES = {  # family -> [(tag, flags)]
    "llama_gqa": [("nm24", ["--nm", "2:4"]), ("nm24_int4", ["--nm", "2:4", "--quant", "int4", "--group-size", "32"])],
    "mistral_sdpa": [("nm24", ["--nm", "2:4"])],
    "qwen2": [("int4", ["--quant", "int4", "--group-size", "32"])],
    "gemma": [("nm24", ["--nm", "2:4"]), ("nm24_int8", ["--nm", "2:4", "--quant", "int8", "--group-size", "32"])],
    "phi2": [("nm24", ["--nm", "2:4"]), ("int8", ["--quant", "int8", "--group-size", "32"])],
    "gptneox": [("nm24", ["--nm", "2:4"])],
    "opt": [("nm24", ["--nm", "2:4"])],
    "falcon": [("nm24_int4", ["--nm", "2:4", "--quant", "int4", "--group-size", "32"])],
    "t5enc": [("nm24", ["--nm", "2:4"])],
    "vit": [("nm24", ["--nm", "2:4"]), ("int4", ["--quant", "int4", "--group-size", "32"])],
    "whisper_enc": [("nm24", ["--nm", "2:4"])],
    "distilbert": [("nm24", ["--nm", "2:4"])],
    "clip_text": [("nm24", ["--nm", "2:4"])],
    "llama_kv": [("nm24", ["--nm", "2:4"])],
    "mixtral_gqa": [("nm24", ["--nm", "2:4"])],
    "mistral_fp16": [("nm24", ["--nm", "2:4"])],
    "bert_axes_apart": [("nm24", ["--nm", "2:4"])],
    "grouped_cnn": [("nm24", ["--nm", "2:4"])],
}


def _grouped_cnn():
    import torch
    from torch import nn

    class GroupedCNN(nn.Module):
        """4-group 3x3 convs with 16 outputs a group (lowered as grouped im2col + batched matmul), a depthwise conv,
        group-1 convs that 2:4 compresses, pooling and a Linear head."""

        def __init__(self, c=64):
            super().__init__()
            self.stem = nn.Conv2d(3, c, 3, 2, 1)
            self.g1 = nn.Conv2d(c, c, 3, 1, 1, groups=4)
            self.pw = nn.Conv2d(c, 2 * c, 1)
            self.dw = nn.Conv2d(2 * c, 2 * c, 3, 1, 1, groups=2 * c)
            self.g2 = nn.Conv2d(2 * c, 2 * c, 3, 2, 1, groups=4, bias=False)
            self.proj = nn.Conv2d(2 * c, c, 1)
            self.fc = nn.Linear(c, 10)

        def forward(self, x):
            h = torch.relu(self.stem(x))
            h = torch.relu(self.g1(h)) + h
            y = torch.relu(self.dw(torch.relu(self.pw(h))))
            y = torch.relu(self.proj(torch.relu(self.g2(y))))
            return self.fc(y.mean((2, 3)))

    torch.manual_seed(0)
    return GroupedCNN().eval()


def _export(family: str, d: Path, rng) -> tuple[str, dict, dict]:
    """The exported model's path, calibration feeds and run feeds."""
    import torch

    sys.path.insert(0, str(ROOT))
    from tests import models as tm
    from tests import models_more as mm

    if family == "bert_axes_apart":
        m = tm.build("bert", seed=1)
        path = tm.export_onnx(m, str(d / "model.onnx"), "torchscript", 17, axes_apart=True)
        return path, tm.feeds_for(m, b=16, t=20, seed=2), tm.feeds_for(m, b=2, t=11, seed=int(rng.integers(1 << 30)))
    if family == "grouped_cnn":
        m = _grouped_cnn()
        path = str(d / "model.onnx")
        torch.onnx.export(m, (torch.randn(1, 3, 32, 32),), path, dynamo=False, opset_version=17, input_names=["x"],
                          output_names=["y"], dynamic_axes={"x": {0: "b"}, "y": {0: "b"}})
        calib = {"x": rng.standard_normal((16, 3, 32, 32)).astype(np.float32)}
        return path, calib, {"x": rng.standard_normal((3, 3, 32, 32)).astype(np.float32)}
    m = mm.build(family)
    path = mm.export(m, str(d / "model.onnx"), "torchscript")
    return path, mm.feeds(m, b=16, seed=5), mm.feeds(m, b=2, t=12, seed=int(rng.integers(1 << 30)))


def build(out: Path, families: list[str], arch_target: str, extra: list[str] = ()) -> None:
    """``extra``: ``NAME=MODEL,CALIB.npz,INPUTS.npz`` models of one's own (compressed with 2:4)."""
    import onnxruntime as ort

    rng = np.random.default_rng(0)
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    index = []
    own = {}
    for e in extra:
        name, rest = e.split("=", 1)
        model, calib_path, x_path = rest.split(",")
        own[name] = (os.path.abspath(model), dict(np.load(calib_path)), dict(np.load(x_path)))
    for fam in [*families, *own]:
        src = out / "_src" / fam
        src.mkdir(parents=True, exist_ok=True)
        path, calib, feeds = own[fam] if fam in own else _export(fam, src, rng)
        np.savez(src / "calib.npz", **calib)
        for tag, flags in RECIPES.get(fam, [("nm24", ["--nm", "2:4"])]):
            name = f"{fam}-{tag}"
            art = out / name
            shutil.rmtree(art, ignore_errors=True)
            t = time.perf_counter()
            p = subprocess.run([sys.executable, "-m", "sparsec", "compress", path, "--calib", str(src / "calib.npz"),
                                "--target", arch_target, *flags, "-o", str(art), "-q"], capture_output=True, text=True,
                               env=env, cwd=ROOT)
            row = {"name": name, "family": fam, "flags": flags, "compress_rc": p.returncode,
                   "compress_s": round(time.perf_counter() - t, 1)}
            if p.returncode != 0:
                row["compress_err"] = p.stderr.strip().splitlines()[-1:] if p.stderr.strip() else []
                print(name, "compress failed", row["compress_err"], flush=True)
                index.append(row)
                continue
            np.savez(art / "x.npz", **feeds)
            sess = ort.InferenceSession(str(art / "model.onnx"), providers=["CPUExecutionProvider"])
            names = [i.name for i in sess.get_inputs()]
            ref = sess.run(None, {k: feeds[k] for k in names})
            np.savez(art / "ref.npz", **{o.name: r for o, r in zip(sess.get_outputs(), ref)})
            (art / "lib" / "model.cu").unlink(missing_ok=True)  # the source; the fatbin is what loads
            (art / "model.onnx").unlink()  # the reference is computed; keeps the pack small
            for f in art.glob("model.onnx.data"):
                f.unlink()
            manifest = json.loads((art / "lib" / "manifest.json").read_text())
            row["kernels"] = sorted({v for v in _kernel_names(manifest)})
            print(name, "ok", f"{row['compress_s']} s", row["kernels"], flush=True)
            index.append(row)
    shutil.rmtree(out / "_src")
    (out / "index.json").write_text(json.dumps(index, indent=1))


def _kernel_names(manifest: dict) -> list[str]:
    ks = manifest.get("kernels") or {}
    if isinstance(ks, dict):
        return [str(v if isinstance(v, str) else v.get("kernel", k)) for k, v in ks.items()]
    return [str(k.get("kernel", k)) if isinstance(k, dict) else str(k) for k in ks]


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def run(d: Path, out: Path) -> int:
    index = json.loads((d / "index.json").read_text())
    rows, bad = [], 0
    for row in index:
        if row["compress_rc"] != 0:
            rows.append(row)
            bad += 1
            continue
        art = d / row["name"]
        y = Path(tempfile.mkdtemp(prefix="sparsec-y-")) / f"{row['name']}.npz"
        t = time.perf_counter()
        p = subprocess.run([sys.executable, "-m", "sparsec", "run", str(art), "--inputs", str(art / "x.npz"),
                            "--output", str(y), "--engine", "lib"], capture_output=True, text=True, cwd=ROOT)
        row = dict(row, run_rc=p.returncode, run_s=round(time.perf_counter() - t, 1),
                   run_err=p.stderr.strip().splitlines()[-3:])
        if p.returncode == 0:
            got, ref = np.load(y), np.load(art / "ref.npz")
            row["rel_err"] = {k: rel(got[k], ref[k]) for k in ref.files}
            row["ok"] = all(np.isfinite(v) and v < 2e-2 for v in row["rel_err"].values())
        else:
            row["ok"] = False
        bad += not row["ok"]
        print(row["name"], "ok" if row["ok"] else "FAIL", row.get("rel_err", row["run_err"]), flush=True)
        rows.append(row)
    (out / "cuda_models.json").write_text(json.dumps({"rows": rows, "failed": bad}, indent=1))
    print(f"{len(rows) - bad}/{len(rows)} ok")
    return 1 if bad else 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build")
    b.add_argument("--out", required=True)
    b.add_argument("--target", default="h100")
    b.add_argument("--only", nargs="*")
    b.add_argument("--extra", nargs="*", default=[], help="NAME=MODEL,CALIB.npz,INPUTS.npz: models of one's own (2:4)")
    r = sub.add_parser("run")
    r.add_argument("--dir", required=True)
    r.add_argument("--out", required=True)
    args = ap.parse_args()
    if args.cmd == "build":
        build(Path(args.out), list(RECIPES) if args.only is None else args.only, args.target, args.extra)
        return 0
    Path(args.out).mkdir(parents=True, exist_ok=True)
    return run(Path(args.dir), Path(args.out))


if __name__ == "__main__":
    sys.exit(main())
