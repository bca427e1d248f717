"""Nsight Compute profile of the untuned decode GEMV (and cuBLAS beside it) at chosen kinds, shapes and token counts.

Two steps::

    python bench/ncu_decode.py build --pack .devpack_ncu [--kinds sp4,sp16] [--shapes 4096x4096] # here: nvcc
    # on the GPU machine (runtime-only: tvm_ffi + torch), ncu around the device step:
    ncu --clock-control none --profile-from-start off --set full -o $OUT/decode \
        python3 bench/ncu_decode.py device --pack .devpack_ncu [--m 1,8,16] > $OUT/order.txt
    ncu --import $OUT/decode.ncu-rep --page raw --csv > $OUT/raw.csv
    python bench/ncu_decode.py report --raw DIR/raw.csv --order DIR/order.txt  # here: bench/results/ncu_decode.{json,md}

The device step calls each (kind, shape, M) function once to warm it, then once inside cudaProfilerStart/Stop (so
ncu profiles only those launches), and cuBLAS (``torch.nn.functional.linear``, dense fp16) the same way. It prints
which launch is which in profile order, so the report's kernels can be matched to the points.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))


def _shapes(s: str) -> list[tuple[int, int]]:
    return [tuple(int(v) for v in sh.split("x")) for sh in s.split(",") if sh]


def cmd_build(args) -> None:
    from sparsec.backends.kernels.cuda_compile import build_shared
    from sparsec.backends.kernels.cuda_sparse import Variant, default_config

    pack = Path(args.pack)
    pack.mkdir(parents=True, exist_ok=True)
    rows, variants = [], []
    for kind in args.kinds.split(","):
        gs = 0 if kind == "sp16" else 128
        for n, k in _shapes(args.shapes):
            v = Variant.make(kind, False, gs, default_config(kind, args.arch, n, k))
            rows.append({"func": v.func_name, "kind": kind, "gs": gs, "n": n, "k": k, "gemv": v.cfg("gemv")})
            if all(v.func_name != u.func_name for u in variants):
                variants.append(v)
    build_shared(variants, [args.arch], str(pack / "sparsec_cuda.so"), workdir=str(pack / "build"))
    (pack / "manifest.json").write_text(json.dumps({"arch": args.arch, "rows": rows}, indent=1))
    print(f"built {len(variants)} functions -> {pack}")


def cmd_device(args) -> None:
    import numpy as np
    import torch
    import tvm_ffi

    from bench_cuda import make_weight
    from sparsec.backends.kernels.cuda_sparse import gemv_launch, prepare

    pack = Path(args.pack)
    man = json.loads((pack / "manifest.json").read_text())
    lib = tvm_ffi.load_module(str(pack / "sparsec_cuda.so"))
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    order = []
    cublas_done = set()
    for r in man["rows"]:
        kind, n, k, gs = r["kind"], r["n"], r["k"], r["gs"]
        fmt = make_weight(kind, n, k, gs, False, np.random.default_rng(n + k))
        ws = [torch.from_numpy(a.view(np.int32) if a.dtype == np.uint32 else a).cuda() for a in prepare(kind, fmt)]
        w16 = torch.from_numpy(fmt.materialize()).cuda().half()
        f = lib[r["func"]]
        for m in [int(v) for v in args.m.split(",")]:
            x = torch.randn(m, k, device="cuda", dtype=torch.float16)
            y = torch.empty(m, n, device="cuda", dtype=torch.float16)
            f(x, *ws, y)
            ref = x.float() @ w16.float().T
            err = float((y.float() - ref).norm() / ref.norm())
            torch.cuda.synchronize()
            torch.cuda.profiler.start()
            f(x, *ws, y)
            torch.cuda.synchronize()
            torch.cuda.profiler.stop()
            launch = gemv_launch(kind, n, k, m, r["gemv"], sms)
            order.append({"what": f"{kind} {n}x{k} M={m}", "launch": launch, "rel_err": err,
                          "weight_bytes": sum(int(a.numel() * a.element_size()) for a in ws)})
            if (n, k, m) not in cublas_done:
                cublas_done.add((n, k, m))
                torch.nn.functional.linear(x, w16)
                torch.cuda.synchronize()
                torch.cuda.profiler.start()
                torch.nn.functional.linear(x, w16)
                torch.cuda.synchronize()
                torch.cuda.profiler.stop()
                order.append({"what": f"cuBLAS {n}x{k} M={m}", "weight_bytes": n * k * 2})
    for i, o in enumerate(order):
        print(i, json.dumps(o), flush=True)


METRICS = {  # report column -> ncu raw metric
    "us": "gpu__time_duration.sum",
    "elapsed_cycles": "gpc__cycles_elapsed.max",
    "sm_active_cycles": "sm__cycles_active.avg",
    "dram_read_mb": "dram__bytes_read.sum",
    "l2_read_sectors": "lts__t_sectors_srcunit_tex_op_read.sum",
    "warps_per_scheduler": "smsp__warps_active.avg.per_cycle_active",
    "eligible_per_scheduler": "smsp__warps_eligible.avg.per_cycle_active",
    "issue_active_pct": "smsp__issue_active.avg.pct_of_peak_sustained_active",
    "cycles_per_issue": "smsp__average_warp_latency_per_inst_issued.ratio",
    "instructions": "smsp__inst_executed.sum",
    "registers": "launch__registers_per_thread",
    "dyn_smem": "launch__shared_mem_per_block_dynamic",
    "grid": "launch__grid_size",
    "block": "launch__block_size",
}


def _num(v: str) -> float | None:
    try:
        return float(v.replace(",", ""))
    except ValueError:
        return None


def cmd_report(args) -> None:
    """raw.csv (ncu --page raw --csv) + the device step's launch order -> bench/results/ncu_decode.{json,md}: per
    launch the time, the cycles the SMs were active against the elapsed ones, DRAM bytes, L2 -> SM bytes, warps
    resident and eligible per scheduler, and the three largest stall reasons (cycles per issued instruction)."""
    import csv

    rows = list(csv.reader(open(args.raw)))
    hdr, units, data = rows[0], rows[1], rows[2:]
    col = {h: i for i, h in enumerate(hdr)}
    order = [json.loads(line.split(" ", 1)[1]) for line in open(args.order) if line[:1].isdigit()]
    mb = {"byte": 1e-6, "Kbyte": 1e-3, "Mbyte": 1.0, "Gbyte": 1e3}
    us = {"nsecond": 1e-3, "usecond": 1.0, "us": 1.0, "ns": 1e-3, "msecond": 1e3}
    stall_cols = [h for h in hdr if h.startswith("smsp__average_warps_issue_stalled_") and h.endswith("_per_issue_active.ratio")]
    out, i = [], 0
    for r in data:  # cuBLAS runs split-K reduce kernels too: those are folded into the launch before them
        name = r[col["Kernel Name"]]
        if "splitKreduce" in name and out:
            out[-1]["us"] += _num(r[col["gpu__time_duration.sum"]]) * us.get(units[col["gpu__time_duration.sum"]], 1.0)
            out[-1]["kernels"] += 1
            continue
        o = dict(order[i]) if i < len(order) else {"what": name}
        i += 1
        row = {"what": o["what"], "kernel": name, "kernels": 1, "weight_bytes": o.get("weight_bytes")}
        for k, m in METRICS.items():
            v = _num(r[col[m]]) if m in col else None
            if v is not None and k == "us":
                v *= us.get(units[col[m]], 1.0)
            if v is not None and k == "dram_read_mb":
                v *= mb.get(units[col[m]], 1.0)
            if v is not None and k == "dyn_smem":  # -> bytes
                v *= 1e6 * mb.get(units[col[m]].split("/")[0], 1e-6)
            row[k] = v
        row["l2_read_mb"] = row["l2_read_sectors"] * 32e-6 if row["l2_read_sectors"] is not None else None
        stalls = sorted(((_num(r[col[h]]) or 0.0, h[len("smsp__average_warps_issue_stalled_"):-len("_per_issue_active.ratio")])
                         for h in stall_cols), reverse=True)[:3]  # fmt: skip
        row["top_stalls"] = {n: round(v, 2) for v, n in stalls}
        out.append(row)
    Path(args.out_json).write_text(json.dumps({"source": [args.raw, args.order], "rows": out}, indent=1))
    lines = ["# Nsight Compute profile of the untuned decode GEMV and cuBLAS (one launch each, L2 flushed by ncu)", "",
             "Written by `python bench/ncu_decode.py report` from an ncu run of `bench/ncu_decode.py device` (docstring"
             " of bench/ncu_decode.py). SM active % = mean SM active cycles / elapsed cycles; L2->SM MB = sectors read by"
             " the SMs from L2 x 32 B (weights + activations, re-reads included); warps = resident / eligible per"
             " scheduler; stalls = cycles per issued instruction by reason (largest three).", "",
             "| launch | kernel | µs | SM active % | DRAM read MB | L2->SM MB | regs | smem KB | grid x block | warps res / elig | issue % | instr (M) | stalls |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for w in out:
        act = 100 * w["sm_active_cycles"] / w["elapsed_cycles"] if w["sm_active_cycles"] and w["elapsed_cycles"] else None
        lines.append(f"| {w['what']} | `{w['kernel'][:44]}`{' +reduce' if w['kernels'] > 1 else ''} | {w['us']:.2f} | "
                     f"{act:.0f} | {w['dram_read_mb']:.1f} | {w['l2_read_mb']:.1f} | {w['registers']:.0f} | "
                     f"{(w['dyn_smem'] or 0) / 1024:.0f} | {w['grid']:.0f} x {w['block']:.0f} | "
                     f"{w['warps_per_scheduler']:.2f} / {w['eligible_per_scheduler']:.2f} | {w['issue_active_pct']:.0f} | "
                     f"{w['instructions'] / 1e6:.2f} | " + ", ".join(f"{k} {v}" for k, v in w["top_stalls"].items()) + " |")  # fmt: skip
    Path(args.out_md).write_text("\n".join(lines) + "\n")
    print(f"{len(out)} launches -> {args.out_json}, {args.out_md}")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build")
    b.add_argument("--pack", default=".devpack_ncu")
    b.add_argument("--kinds", default="sp4,sp16,dq4")
    b.add_argument("--shapes", default="4096x4096,14336x4096")
    b.add_argument("--arch", default="sm_90a")
    d = sub.add_parser("device")
    d.add_argument("--pack", default=".devpack_ncu")
    d.add_argument("--m", default="1,8,16")
    r = sub.add_parser("report")
    r.add_argument("--raw", required=True)
    r.add_argument("--order", required=True)
    r.add_argument("--out-json", default=str(ROOT / "bench" / "results" / "ncu_decode.json"))
    r.add_argument("--out-md", default=str(ROOT / "bench" / "results" / "ncu_decode.md"))
    a = ap.parse_args(argv)
    {"build": cmd_build, "device": cmd_device, "report": cmd_report}[a.cmd](a)


if __name__ == "__main__":
    main()
