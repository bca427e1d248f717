"""Where the prefill milliseconds go: per-function time of the golden tiny-gpt's compiled x86 libraries vs onnxruntime.

    python bench/profile_x86.py [--threads 1] [--runs 20] [--work DIR] [--out bench/results]

Builds the same three compressed artifacts as ``bench/bench_x86.py`` (nm24, nm24_int4, int4) plus the dense model
compiled by the same backend, and runs each at batch x sequence 1x128 and 4x128 under a Relax VM instrument that
times every VM call (each ``call_tir`` PrimFunc and VM builtin) with ``perf_counter``. Functions are grouped:

- ``linear``     sparsec's Linear kernels (``cpu_*``: the compressed-format kernels and the dense head);
- ``attn matmul`` the legalized attention batch-matmuls (``Q @ K^T`` with its scale / mask epilogue, ``P @ V``);
- ``softmax``, ``norm`` (RMSNorm), ``elementwise`` (RoPE, SiLU gate, residual adds, transposes, ...);
- ``vm``          VM builtins (shape construction, allocation, reshape views).

The instrument adds about 1 us per call, so the per-group sums exceed the uninstrumented total (also reported, with
onnxruntime's total and its own per-op-type profile in the same run). Linear FLOP share: the FLOPs of the Linear
layers over all matmul FLOPs (Linear + attention) of the scenario.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

GROUPS = ("linear", "attn matmul", "softmax", "norm", "elementwise", "vm")


def group_of(sym: str) -> str:
    if sym.startswith("cpu_"):
        return "linear"
    if sym.startswith("vm.builtin") or sym in ("shape_func",):
        return "vm"
    if "softmax" in sym:
        return "softmax"
    if "norm" in sym:
        return "norm"
    if "matmul" in sym:
        return "attn matmul"
    return "elementwise"


def profile_lib(lib, feeds, runs: int) -> dict:
    import tvm

    from sparsec.backends.bench import time_fn

    f = lib.timer(feeds)
    total_ms = time_fn(f, runs, 3)["median_ms"]
    acc: dict[str, float] = collections.defaultdict(float)
    cnt: collections.Counter = collections.Counter()
    start: dict[str, float] = {}

    def instr(func, sym, before, ret, *args):
        if before:
            start[sym] = time.perf_counter()
        else:
            acc[sym] += time.perf_counter() - start[sym]
            cnt[sym] += 1
        return 0

    lib.vm.set_instrument(tvm.runtime.convert(instr) if hasattr(tvm.runtime, "convert") else instr)
    for _ in range(runs):
        f()
    # cleared, not replaced by a no-op: a Python no-op instrument still runs on every VM call (the golden GPT's 96-token
    # forward took 3.1 instead of 1.65 ms afterwards, inflating every later total measured on this library)
    lib.vm.set_instrument(None)
    funcs = {k: {"ms": v / runs * 1e3, "calls": cnt[k] // runs, "group": group_of(k)} for k, v in acc.items()}
    groups = {gname: sum(v["ms"] for v in funcs.values() if v["group"] == gname) for gname in GROUPS}
    return {"total_ms": total_ms, "groups_ms": groups, "funcs": funcs}


def ort_profile(onnx_path, feeds, threads: int, runs: int) -> dict:
    import onnxruntime as ort

    from sparsec.backends.bench import time_fn

    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    sess = ort.InferenceSession(str(onnx_path), so, providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    fd = {k: feeds[k] for k in names}
    total_ms = time_fn(lambda: sess.run(None, fd), runs, 3)["median_ms"]
    so.enable_profiling = True
    so.profile_file_prefix = tempfile.mkdtemp(prefix="sparsec-ortprof-") + "/p"
    sess = ort.InferenceSession(str(onnx_path), so, providers=["CPUExecutionProvider"])
    for _ in range(runs):
        sess.run(None, fd)
    prof = json.loads(Path(sess.end_profiling()).read_text())
    by_op: dict[str, float] = collections.defaultdict(float)
    for ev in prof:
        if ev.get("cat") == "Node" and ev.get("name", "").endswith("_kernel_time"):
            by_op[ev["args"]["op_name"]] += ev["dur"] / 1e3 / runs
    return {"total_ms": total_ms, "op_types_ms": dict(sorted(by_op.items(), key=lambda kv: -kv[1]))}


def flops(graph, batch: int, seq: int) -> dict:
    lin = sum(2 * batch * seq * lin.weight.shape[0] * lin.weight.shape[1] for lin in graph.linears())
    d = graph.linears()[0].weight.shape[1]
    n_layers = sum(1 for n in graph.nodes if type(n).__name__ == "RMSNorm") - 1
    attn = n_layers * 2 * (2 * batch * seq * seq * d)  # Q K^T and P V, full (unmasked) square
    return {"linear_mflop": lin / 1e6, "attn_mflop": attn / 1e6, "linear_share": lin / (lin + attn)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    ap.add_argument("--work", default=None, help="directory for the artifacts (default: a temporary one)")
    args = ap.parse_args()
    os.environ["TVM_NUM_THREADS"] = str(args.threads)
    from bench_x86 import make_artifacts

    from sparsec.backends.bench import original_graph, scenario_inputs
    from sparsec.backends.build import build_to_dir
    from sparsec.backends.runtime import LoadedLib
    from sparsec.compressor.artifact import load_artifact

    work = Path(args.work or tempfile.mkdtemp(prefix="sparsec-prof-x86-"))
    arts = make_artifacts(work)
    a0 = load_artifact(arts["nm24"])
    dense_graph, dense_onnx, _ = original_graph(a0, None)
    build_to_dir(dense_graph, "x86", work / "dense_lib")
    dense_onnx_path = work / "dense.onnx"
    dense_onnx_path.write_bytes(dense_onnx if isinstance(dense_onnx, bytes) else Path(dense_onnx).read_bytes())
    libs = {"dense tvm": LoadedLib(lib_dir=work / "dense_lib", graph=dense_graph)}
    for name, path in arts.items():
        libs[name] = LoadedLib(path)
    scen = [(1, 128), (4, 128)]
    report = {"schema": "sparsec.profile_x86/1", "threads": args.threads, "runs": args.runs,
              "command": f"python bench/profile_x86.py --threads {args.threads} --runs {args.runs}", "scenarios": []}  # fmt: skip
    for b, s in scen:
        feeds = scenario_inputs(a0.graph, b, s)
        ent = {"batch": b, "seq": s, "flops": flops(dense_graph, b, s), "ort": ort_profile(dense_onnx_path, feeds, args.threads, args.runs),
               "libs": {}}  # fmt: skip
        for name, lib in libs.items():
            ent["libs"][name] = profile_lib(lib, feeds, args.runs)
            print(b, s, name, json.dumps(ent["libs"][name]["groups_ms"]), f"total {ent['libs'][name]['total_ms']:.3f}", flush=True)
        print(b, s, "ort", ent["ort"], flush=True)
        report["scenarios"].append(ent)
    outd = Path(args.out)
    outd.mkdir(parents=True, exist_ok=True)
    (outd / "profile_x86.json").write_text(json.dumps(report, indent=1, sort_keys=True) + "\n")
    lines = [f"# golden tiny-gpt on x86: where the prefill time goes ({args.threads} thread(s))", "", f"Command: `{report['command']}`", "",
             "Per-group sums of VM-instrumented calls (ms per forward; ~1 us instrument overhead per call, mostly in `vm`); "
             "`total` is the uninstrumented median. onnxruntime: dense model, same run.", ""]  # fmt: skip
    for ent in report["scenarios"]:
        fl = ent["flops"]
        lines += [f"## {ent['batch']} x {ent['seq']}  (Linear {fl['linear_mflop']:.0f} MFLOP, attention matmuls {fl['attn_mflop']:.0f} MFLOP: "
                  f"Linear share {fl['linear_share'] * 100:.0f}%)", "",
                  "| engine | total ms | " + " | ".join(GROUPS) + " |", "|---|---|" + "---|" * len(GROUPS)]  # fmt: skip
        for name, r in ent["libs"].items():
            lines.append(f"| {name} | {r['total_ms']:.3f} | " + " | ".join(f"{r['groups_ms'][g]:.3f}" for g in GROUPS) + " |")
        ops = ", ".join(f"{k} {v:.3f}" for k, v in list(ent["ort"]["op_types_ms"].items())[:8])
        lines += ["", f"onnxruntime dense: total {ent['ort']['total_ms']:.3f} ms; by op type (ms): {ops}", ""]
        top = sorted(ent["libs"]["int4"]["funcs"].items(), key=lambda kv: -kv[1]["ms"])[:12]
        lines += ["int4, top functions: " + ", ".join(f"`{k}` {v['ms']:.3f} ms ({v['calls']}x)" for k, v in top), ""]
    (outd / "profile_x86.md").write_text("\n".join(lines))
    print(f"wrote {outd / 'profile_x86.json'} and {outd / 'profile_x86.md'}")


if __name__ == "__main__":
    main()
