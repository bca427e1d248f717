"""wasm and aarch64 figures for docs/arm-wasm.md (JSON + Markdown table in bench/results/arm_wasm.{json,md}).

    python bench/bench_arm_wasm.py            # ~5 min on 2 cores (builds included)

wasm (measured, node, ONE node process, interleaved rounds; bench/wasm_bench.js), batch 1:

- the golden tiny-gpt: onnxruntime-web (npm, pinned in bench/web/package.json, wasm execution provider, SIMD binary,
  1 thread) running the ORIGINAL dense ONNX (``sparsec compress --example tiny-gpt --no-build`` writes it), vs the
  models compiled by sparsec for wasm32+simd128: 2:4 + int4 g16 (every Linear but the head), 2:4, dense; decode
  (1 token: this model has no KV cache, so decoding one token is a forward pass over 1 id) and prefill (64 tokens);
  the 2:4+int4 build with and without SIMD (wasm:nosimd). The ORT and sparsec dense logits are compared (same model).
- kernels alone: one Linear 1024x1024 and a chain of 16 Linears of the model's shapes, 2:4 vs the same generator
  family dense (cpu.nm_sparse vs cpu.dense), M = 1 (GEMV), M = 16 (both) and M = 4 (the chain).

aarch64 (a model, not a measurement: no ARM hardware here; qemu-user timings are emulation and say nothing): static
counts of vector FMAs per kernel from the disassembly, and a memory roofline for decode (M = 1) on a
Cortex-A76-class core: time >= bytes of weights read / bandwidth, with the bytes taken from params.bin.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sparsec.backends.build import build_to_dir  # noqa: E402
from sparsec.compressor.formats import Dense, GroupQuant, NMSparse  # noqa: E402
from sparsec.compressor.ir import Graph, Linear  # noqa: E402


def nm_int4(w):
    sp = NMSparse.from_dense(w, 2, 4)
    v = sp.values.materialize()
    s = (np.abs(v).reshape(v.shape[0], -1, 16).max(-1) / 7 + 1e-4).astype(np.float16)
    codes = np.clip(np.round(v.reshape(v.shape[0], -1, 16) / s[..., None].astype(np.float32)) + 8, 0, 15).reshape(v.shape)
    return sp.with_values(GroupQuant.from_codes(codes, s, None, 4, 16))


def gpt(kind: str):
    from sparsec.compressor.compress import load_example

    g = load_example("tiny-gpt").graph
    for lin in g.linears()[:-1]:
        w = lin.weight.materialize()
        lin.weight = {"dense": lambda w: Dense(w), "nm24": lambda w: NMSparse.from_dense(w, 2, 4), "nm24_int4": nm_int4}[kind](w)
    return g


def one_linear(kind: str, o: int = 1024, k: int = 1024):
    return linear_chain(kind, [(o, k)])


def linear_chain(kind: str, shapes, seed: int = 0):
    """Linears applied one after the other (``shapes`` = [(out, in)]): a kernel benchmark with the model's shapes
    whose per-call overhead (JS marshaling, the runtime's call plan) is shared by many kernel calls."""
    rng = np.random.default_rng(seed)
    g = Graph("linear")
    g.inputs = ["x"]
    g.add_value("x", "float32", ("m", shapes[0][1]))
    prev = "x"
    for i, (o, k) in enumerate(shapes):
        w = rng.standard_normal((o, k)).astype(np.float32) / np.sqrt(k)
        name = f"y{i}" if i < len(shapes) - 1 else "y"
        g.add_node(Linear(f"fc{i}", [prev], [name], weight=Dense(w) if kind == "dense" else NMSparse.from_dense(w, 2, 4)))
        g.add_value(name, "float32", ("m", o))
        prev = name
    g.outputs = ["y"]
    return g


def neon_counts(lib: Path) -> dict:
    objdump = shutil.which("aarch64-linux-gnu-objdump")
    dis = subprocess.run([objdump, "-d", str(lib / "libsparsec_model.so")], capture_output=True, text=True).stdout
    out = {}
    for f in re.split(r"\n(?=[0-9a-f]+ <)", dis):
        m = re.match(r"[0-9a-f]+ <(cpu_\w+?_compute_)>", f)
        if m:
            out[m.group(1)] = {"fmla.4s": len(re.findall(r"\tfmla\tv\d+\.4s", f)), "instructions": len(re.findall(r"^\s+[0-9a-f]+:\t", f, re.M))}
    return out


ROUNDS = 21


def dense_onnx(tmp: Path) -> Path:
    """The ORIGINAL dense ONNX of the golden tiny-gpt, as sparsec writes it without compression."""
    out = tmp / "gpt_onnx"
    p = subprocess.run([sys.executable, "-m", "sparsec", "compress", "--example", "tiny-gpt", "--no-build", "-o", str(out)],
                       capture_output=True, text=True, cwd=str(ROOT))  # fmt: skip
    if p.returncode:
        raise SystemExit(f"sparsec compress --example tiny-gpt --no-build failed: {p.stderr[-500:]}")
    return out / "model.onnx"


def main():
    res: dict = {"machine": os.uname().machine, "cpu": _cpu_name(), "command": "python bench/bench_arm_wasm.py"}
    tmp = Path(tempfile.mkdtemp(prefix="sparsec-bench-"))
    libs = {}
    t0 = time.time()
    for kind in ("dense", "nm24", "nm24_int4"):
        libs[f"gpt_{kind}"] = tmp / f"gpt_{kind}"
        build_to_dir(gpt(kind), "wasm", libs[f"gpt_{kind}"])
    libs["gpt_nm24_int4_nosimd"] = tmp / "gpt_nosimd"
    build_to_dir(gpt("nm24_int4"), "wasm:nosimd", libs["gpt_nm24_int4_nosimd"])
    chain = [(352, 128), (128, 352)] * 4 + [(128, 128)] * 8  # the tiny-gpt MLP and attention shapes
    for kind in ("dense", "nm24"):
        libs[f"linear_{kind}"] = tmp / f"linear_{kind}"
        build_to_dir(one_linear(kind), "wasm", libs[f"linear_{kind}"])
        libs[f"chain_{kind}"] = tmp / f"chain_{kind}"
        build_to_dir(linear_chain(kind, chain), "wasm", libs[f"chain_{kind}"])
    onnx = dense_onnx(tmp)
    ort_ok = (ROOT / "bench" / "web" / "node_modules" / "onnxruntime-web").is_dir()
    res["build_s"] = round(time.time() - t0, 1)
    cases = []
    for T in (1, 64):
        ids = [{"dtype": "int64", "shape": [1, T], "seed": 7}]
        if ort_ok:
            cases.append({"name": f"ort_dense/T{T}", "onnx": str(onnx), "inputs": ids})
        for name in ("gpt_dense", "gpt_nm24", "gpt_nm24_int4", "gpt_nm24_int4_nosimd"):
            cases.append({"name": f"{name}/T{T}", "lib": str(libs[name]), "inputs": ids})
    for name in ("linear_dense", "linear_nm24"):
        for M in (1, 16):
            cases.append({"name": f"{name}/M{M}", "lib": str(libs[name]), "inputs": [{"dtype": "float32", "shape": [M, 1024], "seed": 7}]})
    for name in ("chain_dense", "chain_nm24"):
        for M in (1, 4, 16):
            cases.append({"name": f"{name}/M{M}", "lib": str(libs[name]), "inputs": [{"dtype": "float32", "shape": [M, 128], "seed": 7}]})
    spec = tmp / "spec.json"
    spec.write_text(json.dumps({"repeat": 10, "rounds": ROUNDS, "outputs": True, "ort": {"threads": 1, "opt": "all"}, "cases": cases}))
    p = subprocess.run(["node", str(ROOT / "bench" / "wasm_bench.js"), str(spec)], capture_output=True, text=True)
    if p.returncode:
        raise SystemExit(p.stderr)
    out_js = json.loads(p.stdout)
    wasm = {r["name"]: r for r in out_js["cases"]}
    res["node"] = out_js["node"]
    res["onnxruntime_web"] = out_js["ort"] or "not installed (bench/web: npm ci); the onnxruntime-web rows are missing"
    # the ORT baseline and the sparsec dense build compute the same logits (same model, same ids)
    if ort_ok:
        for T in (1, 64):
            a, b = np.array(wasm[f"ort_dense/T{T}"]["output"]), np.array(wasm[f"gpt_dense/T{T}"]["output"])
            res.setdefault("ort_vs_sparsec_dense_rel_err", {})[f"T{T}"] = float(np.abs(a - b).max() / np.abs(a).max())
    for r in wasm.values():
        r.pop("output", None)
    res["wasm"] = wasm
    rows = []

    def row(label, base, new):
        if base in wasm and new in wasm:
            b, n = wasm[base]["ms_median"], wasm[new]["ms_median"]
            rows.append((label, b, n, b / n, wasm[base]["ms_min"] / wasm[new]["ms_min"]))

    for T in (1, 64):
        what = "decode 1 token" if T == 1 else f"prefill {T} tokens"
        row(f"tiny-gpt sparsec 2:4+int4 vs onnxruntime-web dense, batch 1, {what}", f"ort_dense/T{T}", f"gpt_nm24_int4/T{T}")
        row(f"tiny-gpt sparsec 2:4 vs onnxruntime-web dense, {what}", f"ort_dense/T{T}", f"gpt_nm24/T{T}")
        row(f"tiny-gpt sparsec dense vs onnxruntime-web dense, {what}", f"ort_dense/T{T}", f"gpt_dense/T{T}")
        row(f"tiny-gpt sparsec 2:4+int4 vs sparsec dense, {what}", f"gpt_dense/T{T}", f"gpt_nm24_int4/T{T}")
        row(f"tiny-gpt sparsec 2:4 vs sparsec dense, {what}", f"gpt_dense/T{T}", f"gpt_nm24/T{T}")
        row(f"tiny-gpt 2:4+int4 simd128 vs nosimd, {what}", f"gpt_nm24_int4_nosimd/T{T}", f"gpt_nm24_int4/T{T}")
    for M in (1, 16):
        row(f"kernel: Linear 1024x1024, 2:4 vs dense (cpu.* generators), M={M}", f"linear_dense/M{M}", f"linear_nm24/M{M}")
    for M in (1, 4, 16):
        row(f"kernel: 16 Linears of the model's shapes (4x[352x128,128x352] + 8x128x128), 2:4 vs dense, M={M}",
            f"chain_dense/M{M}", f"chain_nm24/M{M}")  # fmt: skip
    res["wasm_table"] = [{"case": r[0], "baseline_ms": r[1], "sparsec_ms": r[2], "speedup": r[3], "speedup_of_min": r[4]} for r in rows]
    res["kernels"] = {k: json.loads((libs[k] / "manifest.json").read_text()).get("kernels") for k in ("gpt_nm24_int4", "linear_nm24")}

    # aarch64 model
    arm = {}
    if shutil.which("aarch64-linux-gnu-gcc"):
        for kind in ("dense", "nm24_int4"):
            d = tmp / f"arm_{kind}"
            build_to_dir(gpt(kind), "aarch64", d)
            arm[kind] = {"params_bytes": (d / "params.bin").stat().st_size, "kernels": neon_counts(d)}
        bw = 20e9  # bytes/s, a Cortex-A76-class phone/SBC core streaming from LPDDR4X (assumption, stated)
        for kind in arm:
            arm[kind]["decode_roofline_ms"] = arm[kind]["params_bytes"] / bw * 1e3
        arm["roofline_speedup_decode"] = arm["dense"]["params_bytes"] / arm["nm24_int4"]["params_bytes"]
        arm["assumed_bandwidth_GBps"] = bw / 1e9
    res["aarch64_model"] = arm
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "arm_wasm.json").write_text(json.dumps(res, indent=1))
    o = res["onnxruntime_web"]
    ort_line = (f"onnxruntime-web {o['version'].get('web')} (npm, pinned in bench/web/package.json): wasm execution provider, "
                f"SIMD128 binary, numThreads={o['numThreads']}, graphOptimizationLevel={o['graphOptimizationLevel']}, "
                "session.run awaited per call, on the ONNX written by `sparsec compress --example tiny-gpt --no-build`"
                if isinstance(o, dict) else o)  # fmt: skip
    md = [f"wasm, node {res['node']}, {res['cpu']} (2 cores shared with other jobs), one node process, {ROUNDS} interleaved "
          "rounds x 10 runs per case; ms = median over rounds; speedup = ratio of medians (ratio of the fastest rounds in "
          "brackets); batch 1.", "", ort_line, "", "| case | baseline ms | sparsec ms | speedup |", "|---|---:|---:|---:|"]  # fmt: skip
    md += [f"| {r[0]} | {r[1]:.3f} | {r[2]:.3f} | {r[3]:.2f}x ({r[4]:.2f}x) |" for r in rows]
    if "ort_vs_sparsec_dense_rel_err" in res:
        md += ["", "onnxruntime-web vs sparsec dense logits, max rel. error: " +
               ", ".join(f"{k} {v:.1e}" for k, v in res["ort_vs_sparsec_dense_rel_err"].items())]
    if arm:
        md += ["", "| aarch64 (roofline model, not measured) | weights bytes | decode bound @ %.0f GB/s |" % arm["assumed_bandwidth_GBps"], "|---|---:|---:|"]
        for kind in ("dense", "nm24_int4"):
            md.append(f"| tiny-gpt {kind} | {arm[kind]['params_bytes']} | {arm[kind]['decode_roofline_ms']:.4f} ms |")
        md.append(f"| ratio | | {arm['roofline_speedup_decode']:.2f}x |")
        md += ["", "| aarch64 kernel (static disassembly) | fmla .4s | instructions |", "|---|---:|---:|"]
        for kind in ("dense", "nm24_int4"):
            for k, v in sorted(arm[kind]["kernels"].items()):
                md.append(f"| {kind}: {k} | {v['fmla.4s']} | {v['instructions']} |")
    (out / "arm_wasm.md").write_text("\n".join(md) + "\n\nReproduce: `python bench/bench_arm_wasm.py`\n")
    print("\n".join(md))
    shutil.rmtree(tmp, ignore_errors=True)


def _cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:  # pragma: no cover
        pass
    return "unknown CPU"


if __name__ == "__main__":
    main()
