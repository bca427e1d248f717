"""wasm and aarch64 figures for docs/arm-wasm.md (JSON + Markdown table in bench/results/).

    python bench/bench_arm_wasm.py            # ~3 min on 2 cores

wasm (measured, node, one process, interleaved rounds, median): the golden tiny-gpt compressed (2:4 + int4 g16 on
every Linear but the head) vs the same model dense, both compiled by sparsec for wasm32+simd128, batch 1, decode
(1 token) and prefill (64 tokens); SIMD vs the portable build (wasm:nosimd); one Linear 1024x1024 (a kernel alone):
2:4 vs the same kernel generator dense, M = 1. onnxruntime-web is not installed here (npm is offline and its package
is not in the local npm cache), so the issue's comparison against it is not made; the dense baseline is the same
compiler's dense build (TVM's dense kernel schedule for the same target).

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
    rng = np.random.default_rng(0)
    w = rng.standard_normal((o, k)).astype(np.float32)
    g = Graph("linear")
    g.inputs = ["x"]
    g.add_value("x", "float32", ("m", k))
    g.add_node(Linear("fc", ["x"], ["y"], weight=Dense(w) if kind == "dense" else NMSparse.from_dense(w, 2, 4)))
    g.add_value("y", "float32", ("m", o))
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


def main():
    res: dict = {"machine": os.uname().machine, "node": subprocess.run(["node", "--version"], capture_output=True, text=True).stdout.strip(),
                 "command": "python bench/bench_arm_wasm.py"}  # fmt: skip
    tmp = Path(tempfile.mkdtemp(prefix="sparsec-bench-"))
    libs = {}
    t0 = time.time()
    for kind in ("dense", "nm24", "nm24_int4"):
        libs[f"gpt_{kind}"] = tmp / f"gpt_{kind}"
        build_to_dir(gpt(kind), "wasm", libs[f"gpt_{kind}"])
    libs["gpt_nm24_int4_nosimd"] = tmp / "gpt_nosimd"
    build_to_dir(gpt("nm24_int4"), "wasm:nosimd", libs["gpt_nm24_int4_nosimd"])
    for kind in ("dense", "nm24"):
        libs[f"linear_{kind}"] = tmp / f"linear_{kind}"
        build_to_dir(one_linear(kind), "wasm", libs[f"linear_{kind}"])
    res["build_s"] = round(time.time() - t0, 1)
    cases = []
    for name in ("gpt_dense", "gpt_nm24", "gpt_nm24_int4", "gpt_nm24_int4_nosimd"):
        for T in (1, 64):
            cases.append({"name": f"{name}/T{T}", "lib": str(libs[name]), "inputs": [{"dtype": "int64", "shape": [1, T], "seed": 7}]})
    for name in ("linear_dense", "linear_nm24"):
        for M in (1, 16):
            cases.append({"name": f"{name}/M{M}", "lib": str(libs[name]), "inputs": [{"dtype": "float32", "shape": [M, 1024], "seed": 7}]})
    spec = tmp / "spec.json"
    spec.write_text(json.dumps({"repeat": 20, "rounds": 7, "cases": cases}))
    p = subprocess.run(["node", str(ROOT / "bench" / "wasm_bench.js"), str(spec)], capture_output=True, text=True)
    if p.returncode:
        raise SystemExit(p.stderr)
    wasm = {r["name"]: r for r in json.loads(p.stdout)}
    res["wasm"] = wasm
    rows = []

    def ratio(base, new):
        return wasm[base]["ms_median"] / wasm[new]["ms_median"]

    for T in (1, 64):
        rows.append((f"tiny-gpt 2:4+int4 vs dense, batch 1, T={T}", wasm[f"gpt_dense/T{T}"]["ms_median"], wasm[f"gpt_nm24_int4/T{T}"]["ms_median"], ratio(f"gpt_dense/T{T}", f"gpt_nm24_int4/T{T}")))
        rows.append((f"tiny-gpt 2:4 vs dense, batch 1, T={T}", wasm[f"gpt_dense/T{T}"]["ms_median"], wasm[f"gpt_nm24/T{T}"]["ms_median"], ratio(f"gpt_dense/T{T}", f"gpt_nm24/T{T}")))
        rows.append((f"tiny-gpt 2:4+int4 simd128 vs nosimd, T={T}", wasm[f"gpt_nm24_int4_nosimd/T{T}"]["ms_median"], wasm[f"gpt_nm24_int4/T{T}"]["ms_median"], ratio(f"gpt_nm24_int4_nosimd/T{T}", f"gpt_nm24_int4/T{T}")))
    for M in (1, 16):
        rows.append((f"Linear 1024x1024 2:4 kernel vs dense kernel, M={M}", wasm[f"linear_dense/M{M}"]["ms_median"], wasm[f"linear_nm24/M{M}"]["ms_median"], ratio(f"linear_dense/M{M}", f"linear_nm24/M{M}")))
    res["wasm_table"] = [{"case": r[0], "baseline_ms": r[1], "sparsec_ms": r[2], "speedup": r[3]} for r in rows]

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
    md = ["| case (wasm, node " + res["node"] + ") | baseline ms | sparsec ms | speedup |", "|---|---:|---:|---:|"]
    md += [f"| {r[0]} | {r[1]:.3f} | {r[2]:.3f} | {r[3]:.2f}x |" for r in rows]
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


if __name__ == "__main__":
    main()
