"""Attention at any sequence length on x86: per-call time of the legalized attention ops of the golden tiny-gpt at
sequence lengths that are / are not multiples of the schedules' tiles, current schedules vs the previous ones.

    python bench/attn_seq_x86.py [--threads 1] [--runs 20] [--seqs 96,100,127,128] [--batch 1] [--base-rev 35dafe3]

The dense golden tiny-gpt is compiled twice by the x86 backend in this process: with ``backends/cpu_schedule.py`` as
it is (``current``), and with that file as of git revision ``--base-rev`` (``base``: the tiled attention matmuls and
the row softmax ran only when the symbolic sequence length was a multiple of their tiles, the old schedules
otherwise). Each library runs batch x seq for every ``--seqs`` under a Relax VM instrument that times each
``call_tir`` (bench/profile_x86.py's ``profile_lib``; about 1 us of instrument overhead per call), and the
uninstrumented forward is timed too (median). Reported per scenario and library: ms per call of ``Q @ K^T`` (+ scale
+ mask), ``P @ V`` and the softmax (mean over the layers' calls), and the forward's total. Results:
``bench/results/attn_seq_x86.{json,md}``.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))


def base_rules(rev: str, path: str | None = None):
    """``cpu_rules`` of backends/cpu_schedule.py as of git revision ``rev`` (or of the file ``path``), loaded as a module
    of this package."""
    if path is not None:
        src = Path(path).read_text()
    else:
        src = subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:backends/cpu_schedule.py"], check=True, capture_output=True,
                             text=True).stdout  # fmt: skip
    mod = types.ModuleType("sparsec.backends._cpu_schedule_base")
    mod.__package__ = "sparsec.backends"
    exec(compile(src, f"{rev}:backends/cpu_schedule.py", "exec"), mod.__dict__)  # noqa: S102 - the project's own file
    return mod.cpu_rules


@contextlib.contextmanager
def rules(fn):
    import sparsec.backends.cpu_schedule as cs

    old = cs.cpu_rules
    cs.cpu_rules = fn
    try:
        yield
    finally:
        cs.cpu_rules = old


def attention_ops(funcs: dict) -> dict[str, str]:
    """Function name -> op for the attention's legalized functions: the softmax, the matmul fused with its scale and
    mask (``Q @ K^T``), and of the other matmuls the one called once per layer (``P @ V``; RoPE's positions x
    frequencies outer product is a matmul called once per forward)."""
    ops = {}
    plain = []
    for sym, v in funcs.items():
        if "softmax" in sym:
            ops[sym] = "softmax"
        elif "matmul" in sym and ("add" in sym or "multiply" in sym):
            ops[sym] = "QK^T+mask"
        elif "matmul" in sym:
            plain.append((v["calls"], sym))
    if plain:
        ops[max(plain)[1]] = "PV"
    return ops


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--seqs", default="96,100,127,128")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--base-rev", default="35dafe3", help="git revision of backends/cpu_schedule.py for the baseline")
    ap.add_argument("--base-file", default=None, help="a cpu_schedule.py to use as the baseline instead of --base-rev's")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = ap.parse_args()
    os.environ["TVM_NUM_THREADS"] = str(args.threads)
    from profile_x86 import profile_lib

    from sparsec.backends.bench import scenario_inputs
    from sparsec.backends.build import build_to_dir
    from sparsec.backends.runtime import LoadedLib
    from sparsec.compressor.compress import load_example

    import sparsec.backends.cpu_schedule as cs

    work = Path(tempfile.mkdtemp(prefix="sparsec-attn-seq-"))
    g = load_example("tiny-gpt").graph
    libs = {}
    for name, fn in (("base", base_rules(args.base_rev, args.base_file)), ("current", cs.cpu_rules)):
        with rules(fn):
            build_to_dir(g, "x86", work / name)
        libs[name] = LoadedLib(lib_dir=work / name, graph=g)
    seqs = [int(s) for s in args.seqs.split(",")]
    report = {"schema": "sparsec.attn_seq_x86/1", "threads": args.threads, "runs": args.runs, "batch": args.batch, "base_rev": args.base_rev, "base_file": args.base_file,
              "command": f"python bench/attn_seq_x86.py --threads {args.threads} --runs {args.runs} --seqs {args.seqs} --batch {args.batch}"
                         + (f" --base-file {args.base_file}" if args.base_file else f" --base-rev {args.base_rev}"), "scenarios": []}  # fmt: skip
    for s in seqs:
        feeds = scenario_inputs(g, args.batch, s)
        ent = {"seq": s, "libs": {}}
        outs = {}
        for name, lib in libs.items():
            prof = profile_lib(lib, feeds, args.runs)
            ops = attention_ops(prof["funcs"])
            per_op = {op: prof["funcs"][sym]["ms"] / prof["funcs"][sym]["calls"] for sym, op in ops.items() if prof["funcs"][sym]["calls"]}
            ent["libs"][name] = {"total_ms": prof["total_ms"], "per_call_ms": per_op, "funcs": {k: prof["funcs"][k] for k in ops}}
            outs[name] = lib.run(feeds)[g.outputs[0]]
        ref = outs["base"]
        ent["max_rel_diff_vs_base"] = float(abs(outs["current"] - ref).max() / abs(ref).max())
        print(s, json.dumps({n: {"total": round(r["total_ms"], 4), **{k: round(v, 4) for k, v in r["per_call_ms"].items()}}
                             for n, r in ent["libs"].items()}), f"diff {ent['max_rel_diff_vs_base']:.1e}", flush=True)  # fmt: skip
        report["scenarios"].append(ent)
    outd = Path(args.out)
    outd.mkdir(parents=True, exist_ok=True)
    (outd / "attn_seq_x86.json").write_text(json.dumps(report, indent=1, sort_keys=True) + "\n")
    ops = ("QK^T+mask", "softmax", "PV")
    lines = [f"# golden tiny-gpt attention ops at any sequence length, x86 ({args.threads} thread(s), batch {args.batch})", "",
             f"Command: `{report['command']}`", "",
             f"`base`: backends/cpu_schedule.py at {args.base_file or args.base_rev} (tiled matmuls / row softmax only when the sequence is a multiple "
             "of their tiles); `current`: the working tree. ms per call (VM-instrumented, mean over the 4 layers' calls; ~1 us "
             "instrument overhead each) and the uninstrumented forward (median), both libraries in the same process.", "",
             "| seq | " + " | ".join(f"{op} base | {op} current | ratio" for op in ops) + " | forward base | forward current | ratio |",
             "|---|" + "---|---|---|" * len(ops) + "---|---|---|"]  # fmt: skip
    for ent in report["scenarios"]:
        b, c = ent["libs"]["base"], ent["libs"]["current"]
        cells = []
        for op in ops:
            vb, vc = b["per_call_ms"].get(op, float("nan")), c["per_call_ms"].get(op, float("nan"))
            cells.append(f"{vb:.4f} | {vc:.4f} | {vb / vc:.2f}x")
        lines.append(f"| {ent['seq']} | " + " | ".join(cells) + f" | {b['total_ms']:.3f} | {c['total_ms']:.3f} | {b['total_ms'] / c['total_ms']:.2f}x |")
    lines += ["", "ratio = base / current (above 1: current is faster). Outputs of the two libraries agree to "
              f"{max(e['max_rel_diff_vs_base'] for e in report['scenarios']):.1e} (max relative difference).", ""]
    (outd / "attn_seq_x86.md").write_text("\n".join(lines))
    print(f"wrote {outd / 'attn_seq_x86.json'} and {outd / 'attn_seq_x86.md'}")


if __name__ == "__main__":
    main()
