"""Static instruction counts of the aarch64 Linear kernels (no ARM hardware here: these are NOT timings).

One Linear layer (default 1024x1024, int8 weights, groups of 32) is compiled by sparsec for:

- ``aarch64`` with fp32 dense weights (``cpu.dense``: the baseline),
- ``aarch64`` with int8 group-quantized weights (``cpu.group_quant``: exact, weights dequantized in registers, fmla),
- ``aarch64:dotprod`` with the same int8 weights (``arm.int8_sdot``: int8 activations, sdot).

The kernel's compute function in ``lib/libsparsec_model.so`` is disassembled (``aarch64-linux-gnu-objdump``) and its
innermost loops (a backward branch with no other loop inside) are listed with their instruction count and the
multiply-adds they perform (``fmla v.4s``: 4, ``sdot v.4s, v.16b``: 16, scalar ``fmadd``/``fmla s``: 1). The figure
of merit is **instructions per multiply-add in the hottest loop of each loop nest** (decode GEMV with 1 row, 4 rows,
and the tiled GEMM). Static counts ignore memory stalls, latencies and issue width; on a real core the int8 kernel
also moves 4x fewer weight bytes than fp32.

    python bench/arm_sdot_static.py [--out 1024 --in 1024]   -> bench/results/arm_sdot_static.{json,md}
"""
from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "bench" / "results"

BRANCH = re.compile(r"^(b\.\w+|cbn?z|tbn?z|b)$")


def graph(O: int, K: int, fmt: str, seed: int = 0):
    from sparsec.compressor.formats import GroupQuant
    from sparsec.compressor.ir import Graph, Linear

    rng = np.random.default_rng(seed)
    w = rng.standard_normal((O, K)).astype(np.float32)
    if fmt == "int8":
        s = (np.abs(w).reshape(O, -1, 32).max(-1) / 127 + 1e-4).astype(np.float16)
        codes = np.clip(np.round(w.reshape(O, -1, 32) / s[..., None].astype(np.float32)) + 128, 0, 255).reshape(w.shape)
        w = GroupQuant.from_codes(codes, s, None, 8, 32)
    g = Graph("one")
    g.inputs = ["x"]
    g.add_value("x", "float32", ("B", K))
    g.add_node(Linear("lin", ["x"], ["y"], weight=w))
    g.add_value("y", "float32", ("B", O))
    g.outputs = ["y"]
    return g


def disassemble(so: Path, objdump: str) -> dict[str, list[tuple[int, str, str]]]:
    text = subprocess.run([objdump, "-d", "--no-show-raw-insn", str(so)], capture_output=True, text=True, check=True).stdout
    funcs: dict[str, list[tuple[int, str, str]]] = {}
    cur = None
    for line in text.splitlines():
        m = re.match(r"^([0-9a-f]+) <([^>]+)>:", line)
        if m:
            cur = funcs.setdefault(m.group(2), [])
            continue
        m = re.match(r"^\s+([0-9a-f]+):\s+(\S+)\s*(.*)$", line)
        if m and cur is not None:
            cur.append((int(m.group(1), 16), m.group(2), m.group(3)))
    return funcs


def macs(mn: str, ops: str) -> int:
    if mn == "sdot" and ".16b" in ops:
        return 16
    if mn in ("fmla", "fmls") and ".4s" in ops:
        return 4
    if mn in ("fmadd", "fmsub") or (mn == "fmla" and ".s[" not in ops and ".4s" not in ops):
        return 1
    return 0


def innermost_loops(insns: list[tuple[int, str, str]]) -> list[dict]:
    addrs = [a for a, _, _ in insns]
    loops = []
    for i, (a, mn, ops) in enumerate(insns):
        if BRANCH.match(mn):
            m = re.search(r"\b([0-9a-f]+) <", ops)
            if m and int(m.group(1), 16) <= a:
                loops.append((int(m.group(1), 16), a))
    inner = [lp for lp in loops if not any(o != lp and lp[0] <= o[0] and o[1] <= lp[1] for o in loops)]
    out = []
    for lo, hi in inner:
        body = [(a, mn, ops) for a, mn, ops in insns if lo <= a <= hi]
        mac = sum(macs(mn, ops) for _, mn, ops in body)
        if mac == 0:
            continue
        out.append({"start": hex(lo), "instructions": len(body), "macs": mac, "sdot": sum(mn == "sdot" for _, mn, _ in body),
                    "fmla_4s": sum(mn == "fmla" and ".4s" in ops for _, mn, ops in body),
                    "loads": sum(mn.startswith("ld") for _, mn, _ in body),
                    "instructions_per_mac": round(len(body) / mac, 4)})  # fmt: skip
    return sorted(out, key=lambda d: int(d["start"], 16))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=int, default=1024)
    ap.add_argument("--in", dest="inn", type=int, default=1024)
    a = ap.parse_args()
    objdump = shutil.which("aarch64-linux-gnu-objdump")
    if objdump is None or shutil.which("aarch64-linux-gnu-gcc") is None:
        sys.exit("aarch64-linux-gnu-gcc / objdump are not installed (scripts/install.sh)")
    from sparsec.backends.build import build_to_dir

    cases = [("fp32 dense (cpu.dense)", "dense", "aarch64"), ("int8 g32, exact (cpu.group_quant)", "int8", "aarch64"),
             ("int8 g32, int8 activations (arm.int8_sdot)", "int8", "aarch64:dotprod")]  # fmt: skip
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for label, fmt, target in cases:
            lib = Path(tmp) / f"{fmt}_{target.replace(':', '_')}"
            build_to_dir(graph(a.out, a.inn, fmt), target, lib)
            man = json.loads((lib / "manifest.json").read_text())
            kernel = man["kernels"][0]["kernel"]
            funcs = disassemble(lib / "libsparsec_model.so", objdump)
            tag = kernel.replace(".", "_")
            name = next(f for f in funcs if f.startswith(tag) and f.endswith("_compute_"))
            ins = funcs[name]
            loops = innermost_loops(ins)
            rows.append({"case": label, "target": target, "kernel": kernel, "function": name, "instructions": len(ins),
                         "sdot": sum(mn == "sdot" for _, mn, _ in ins), "fmla_4s": sum(mn == "fmla" and ".4s" in o for _, mn, o in ins),
                         "compute_loops": loops,
                         "best_instructions_per_mac": min((lp["instructions_per_mac"] for lp in loops), default=None)})  # fmt: skip
    doc = {"what": "static instruction counts of one Linear kernel's compute function (aarch64-linux-gnu-objdump); NOT timings",
           "shape": [a.out, a.inn], "cases": rows}  # fmt: skip
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "arm_sdot_static.json").write_text(json.dumps(doc, indent=1) + "\n")
    md = [f"Static instruction counts, Linear {a.out}x{a.inn} (not timings; `python bench/arm_sdot_static.py`)", "",
          "| case | kernel | instructions in compute fn | fmla .4s | sdot | innermost compute loops: instructions / multiply-adds (instr per MAC) |",
          "|---|---|---:|---:|---:|---|"]  # fmt: skip
    for r in rows:
        lp = "; ".join(f"{x['instructions']}/{x['macs']} ({x['instructions_per_mac']:.3f})" for x in r["compute_loops"])
        md.append(f"| {r['case']} | {r['kernel']} | {r['instructions']} | {r['fmla_4s']} | {r['sdot']} | {lp} |")
    (RESULTS / "arm_sdot_static.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
