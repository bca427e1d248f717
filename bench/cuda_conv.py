"""Convolutions on the GPU: a ResNet-style conv net (bottleneck blocks at ImageNet-like sizes) compressed by sparsec
for h100, its 2:4 (and 2:4 + int4) convs running as im2col + sparsec's sparse tensor core GEMMs, against the same net
built dense by sparsec (TVM's convolution) and against PyTorch (cuDNN, float16, channels-last) in the same run.

    python bench/cuda_conv.py build --pack .devpack_conv      # here: export, compress, build (nvcc), ~2 min
    # on the GPU machine (carry .devpack_conv, .devpack_e2/tvm_rt and .whl; see docs/cuda.md):
    python3 bench/cuda_conv.py run --pack .devpack_conv --out DIR   # -> DIR/cuda_conv.json
    python bench/cuda_conv.py table --json DIR/cuda_conv.json      # -> bench/results/cuda_conv.{json,md}

Correctness: each artifact's output against sparsec's executor (float32, on the GPU) running the same compressed
graph. Weights are random (He init), so accuracy after pruning is not measured here, only speed and agreement.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SIZE = 112  # input resolution: 56x56 after the stem, as ResNet-50's first stage
VARIANTS = {"dense": ["--exclude", ".*"], "nm24": ["--nm", "2:4", "--method", "magnitude"],
            "nm24_int4": ["--nm", "2:4", "--method", "magnitude", "--quant", "int4", "--group-size", "32"]}  # fmt: skip
BATCHES = (1, 8, 32)


def net(groups: int = 1):
    """The ResNet-style net; ``groups`` > 1: its 3x3 convs grouped (ResNeXt-style: 32 groups of 2 / 4 / 8 channels)."""
    import torch.nn as nn

    class Bottleneck(nn.Module):
        def __init__(self, cin, mid, cout, stride):
            super().__init__()
            self.a = nn.Conv2d(cin, mid, 1)
            self.b = nn.Conv2d(mid, mid, 3, stride=stride, padding=1, groups=groups)
            self.c = nn.Conv2d(mid, cout, 1)
            self.proj = nn.Conv2d(cin, cout, 1, stride=stride)
            self.act = nn.ReLU()

        def forward(self, x):
            return self.act(self.c(self.act(self.b(self.act(self.a(x))))) + self.proj(x))

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(3, 64, 7, stride=2, padding=3)
            self.layers = nn.Sequential(Bottleneck(64, 64, 256, 1), Bottleneck(256, 128, 512, 2), Bottleneck(512, 256, 1024, 2))
            self.fc = nn.Linear(1024, 128)
            self.act = nn.ReLU()

        def forward(self, x):
            return self.fc(self.layers(self.act(self.stem(x))).mean((2, 3)))

    return Net


def cmd_build(a):
    import numpy as np
    import torch

    pack = Path(a.pack)
    if pack.exists():
        shutil.rmtree(pack)
    pack.mkdir(parents=True)
    torch.manual_seed(0)
    m = net()().eval()
    x = torch.randn(1, 3, SIZE, SIZE)
    onnx_path = pack / "model.onnx"
    torch.onnx.export(m, (x,), str(onnx_path), input_names=["pixels"], output_names=["logits"], dynamo=False,
                      dynamic_axes={"pixels": {0: "b"}, "logits": {0: "b"}})  # fmt: skip
    calib = pack / "calib.npz"
    np.savez(calib, pixels=np.random.default_rng(0).standard_normal((4, 3, SIZE, SIZE)).astype(np.float32))
    for name, flags in VARIANTS.items():
        if a.only and name not in a.only:
            continue
        t = time.time()
        r = subprocess.run([sys.executable, "-m", "sparsec", "compress", str(onnx_path), *flags, "--target", "h100", "--calib", str(calib),
                            "-o", str(pack / name), "-q"], capture_output=True, text=True)  # fmt: skip
        if r.returncode:
            raise SystemExit(f"{name}: {r.stderr.strip()}")
        for f in (pack / name).rglob("*.cu"):
            f.unlink()
        (pack / name / "model.onnx").unlink()
        kern = json.loads((pack / name / "report.json").read_text())["build"]["kernels"]
        print(f"{name}: {kern} ({time.time() - t:.0f} s)")
    onnx_path.unlink()
    calib.unlink()


def _time(call, reps=20) -> float:
    for _ in range(3):
        call()
    t0 = time.perf_counter()
    for _ in range(reps):
        call()
    return (time.perf_counter() - t0) / reps * 1e3


def cmd_run(a):
    import numpy as np
    import torch

    from sparsec.backends.runtime import LoadedLib
    from sparsec.compressor.artifact import load_graph
    from sparsec.compressor.executor import Executor

    pack = Path(a.pack)
    torch.backends.cudnn.benchmark = True
    torch.manual_seed(0)
    m = net()()  # the same net; its weights need not be the artifact's: PyTorch's time is only timed, not compared
    m16 = m.eval().half().cuda().to(memory_format=torch.channels_last)
    rng = np.random.default_rng(1)
    res = {"device": torch.cuda.get_device_name(), "size": SIZE, "runs": []}
    for b in BATCHES:
        x = rng.standard_normal((b, 3, SIZE, SIZE)).astype(np.float32)
        xt = torch.from_numpy(x).cuda().half().to(memory_format=torch.channels_last)

        def torch_call():
            with torch.no_grad():
                m16(xt)
            torch.cuda.synchronize()

        row = {"batch": b, "torch_fp16_ms": _time(torch_call)}
        for name in VARIANTS:
            d = pack / name
            if not d.exists():
                continue
            lib = LoadedLib(d)
            y = np.asarray(list(lib.run({"pixels": x}).values())[0], np.float64)
            ref = np.asarray(list(Executor(load_graph(d), "cuda").run({"pixels": x}).values())[0], np.float64)
            row[f"{name}_rel_err"] = float(np.linalg.norm(y - ref) / max(np.linalg.norm(ref), 1e-30))
            row[f"{name}_ms"] = _time(lib.timer({"pixels": x}))
        res["runs"].append(row)
        print(row, flush=True)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "cuda_conv.json").write_text(json.dumps(res, indent=1))


def cmd_profile(a):
    """CUDA kernel time per kernel name for one call of each artifact at batch ``--batch`` (CUPTI through
    torch.profiler: it sees the TVM runtime's launches too)."""
    import numpy as np
    import torch
    from torch.profiler import ProfilerActivity, profile

    from sparsec.backends.runtime import LoadedLib

    x = np.random.default_rng(1).standard_normal((a.batch, 3, SIZE, SIZE)).astype(np.float32)
    rows = {}
    for name in VARIANTS:
        d = Path(a.pack) / name
        if not d.exists():
            continue
        call = LoadedLib(d).timer({"pixels": x})
        for _ in range(3):
            call()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                call()
        ev = [(e.key, e.device_time_total / 5 / 1e3, e.count // 5) for e in prof.key_averages() if e.device_time_total > 0]
        ev.sort(key=lambda t: -t[1])
        rows[name] = [{"kernel": k[:120], "ms": round(ms, 4), "launches": c} for k, ms, c in ev[:25]]
        print(f"== {name}: {sum(t[1] for t in ev):.3f} ms of kernels per call")
        for r in rows[name][:25]:
            print(f"  {r['ms']:8.4f} ms  x{r['launches']:<3} {r['kernel']}")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "cuda_conv_profile.json").write_text(json.dumps(rows, indent=1))


def cmd_table(a):
    res = json.loads(Path(a.json).read_text())
    names = [n for n in VARIANTS if f"{n}_ms" in res["runs"][0]]
    lines = [f"# Conv net on the GPU ({res['device']}, {res['size']}x{res['size']} input)", "",
             "ms per call (steady state); ratios: PyTorch float16 channels-last (cuDNN) time / sparsec time, and sparsec "
             "dense time / sparsec compressed time; rel. error: the library against sparsec's executor on the same graph.", "",
             "| batch | torch fp16 | " + " | ".join(f"{n} ms" for n in names) + " | " +
             " | ".join(f"torch / {n}" for n in names) + " | " + " | ".join(f"dense / {n}" for n in names if n != "dense") +
             " | max rel. error |", "|" + "---|" * (2 + 2 * len(names) + len(names) - 1 + 1)]  # fmt: skip
    for r in res["runs"]:
        cells = [str(r["batch"]), f"{r['torch_fp16_ms']:.3f}"] + [f"{r[f'{n}_ms']:.3f}" for n in names]
        cells += [f"{r['torch_fp16_ms'] / r[f'{n}_ms']:.2f}x" for n in names]
        cells += [f"{r['dense_ms'] / r[f'{n}_ms']:.2f}x" for n in names if n != "dense"]
        cells.append(f"{max(r[f'{n}_rel_err'] for n in names):.1e}")
        lines.append("| " + " | ".join(cells) + " |")
    dst = ROOT / "bench" / "results"
    (dst / "cuda_conv.json").write_text(json.dumps(res, indent=1))
    (dst / "cuda_conv.md").write_text("\n".join(lines) + "\n\nReproduce: see the docstring of bench/cuda_conv.py.\n")
    print("\n".join(lines))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build")
    b.add_argument("--pack", default=".devpack_conv")
    b.add_argument("--only", nargs="*", choices=list(VARIANTS))
    r = sub.add_parser("run")
    r.add_argument("--pack", default=".devpack_conv")
    r.add_argument("--out", required=True)
    p = sub.add_parser("profile")
    p.add_argument("--pack", default=".devpack_conv")
    p.add_argument("--out", required=True)
    p.add_argument("--batch", type=int, default=32)
    t = sub.add_parser("table")
    t.add_argument("--json", required=True)
    args = ap.parse_args()
    {"build": cmd_build, "run": cmd_run, "profile": cmd_profile, "table": cmd_table}[args.cmd](args)


if __name__ == "__main__":
    main()
