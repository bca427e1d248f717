"""Figures docs/cuda.md quotes from the committed decode-GEMV runs (bench/results/cuda_kernels_decode_*.json), each
computed from the run's own search pass (every config timed the same way in one run):

    python bench/decode_compare.py defaults   # default / best config time, mean over M <= 8 (splitk vs autowarps)
    python bench/decode_compare.py ring       # best register-pipeline config / best cp.async-ring config, per point
    python bench/decode_compare.py xs         # same config without / with staged activations, median per point
    python bench/decode_compare.py rowgroups  # the row tiling of cuda_sparse.gemv_tile_plan vs the run's default
    python bench/decode_compare.py ranges NAME  # a run's default vs cuBLAS per kind, M <= 8 and M = 16, points >= 3x
"""
from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

RES = Path(__file__).resolve().parent / "results"
sys.path.insert(0, str(RES.parents[1]))  # the repository, for sparsec (rowgroups)
KINDS = ("sp16", "sp4", "dq4")
KIND_NAMES = {"sp16": "2:4 fp16", "sp4": "2:4 + int4 g128", "dq4": "int4 g128", "dq8": "int8 g128"}


def _bench(name: str) -> list[dict]:
    return json.loads((RES / f"cuda_kernels_decode_{name}.json").read_text())["bench"]


def _key(c: dict) -> str:
    return json.dumps(c, sort_keys=True)


def defaults() -> None:
    for name in ("splitk", "autowarps"):
        for k in KINDS:
            r = [b["derived"]["speedup_steady_best"] / b["derived"]["speedup_steady"]
                 for b in _bench(name) if b["kind"] == k and b["m"] <= 8]  # fmt: skip
            print(f"{name:10} {k:5} default time / best time, mean over M <= 8: {statistics.mean(r):.3f}")


def ring() -> None:
    for k in KINDS:
        r, depth = [], []
        for b in _bench("ring"):
            if b["kind"] != k:
                continue
            t = [x for x in b["search"] if "ms" in x]
            best_ring = min((x for x in t if x["gemv"].get("st")), key=lambda x: x["ms"])
            r.append(min(x["ms"] for x in t if not x["gemv"].get("st")) / best_ring["ms"])
            depth.append(best_ring["gemv"]["st"])
        print(f"{k:5} best register config / best ring config, per point: {min(r):.2f}-{max(r):.2f}; "
              f"stages of the best ring config: {sorted(set(depth))}")


def xs() -> None:
    for k in KINDS:
        for lo, hi in ((1, 8), (16, 16)):
            med = []
            for b in _bench("xs"):
                if b["kind"] != k or not lo <= b["m"] <= hi:
                    continue
                t = {_key(x["gemv"]): x["ms"] for x in b["search"] if "ms" in x}
                pairs = [t[_key(dict(json.loads(c), xs=0))] / v for c, v in t.items()
                         if json.loads(c).get("xs") and _key(dict(json.loads(c), xs=0)) in t]  # fmt: skip
                med.append(statistics.median(pairs))
            print(f"{k:5} M {lo}-{hi}: time without / with xs, median per point: {min(med):.2f}-{max(med):.2f}")


def _kernel_fields(c: dict, b: dict) -> tuple:
    """What the token-tile kernel of a GEMV config runs at point ``b`` (instantiation, grid rows, the split launched)."""
    from sparsec.backends.kernels import cuda_sparse as cs

    nt = 1 if b["m"] <= 8 else 2
    ks = cs.gemv_launch(b["kind"], b["out"], b["in"], b["m"], c, 132)["ks"]  # the run's H100: 132 SMs
    return (cs.gemv_warps(c, nt), cs.gemv_rt(c, nt), cs.gemv_wr(c, nt), ks, cs.gemv_xs(c, nt), c.get("u", 1),
            c.get("og", 1), c.get("pf", 0), c.get("st", 0))


def rowgroups() -> None:
    """Per point of the rowgroups run: the untuned config the build now makes for the layer (default_config with
    gemv_tile_plan) runs, for that M, the same kernel, grid and split as one of the run's candidates: its time vs the
    run's default (the rule before) and cuBLAS, all from the same run. Points where the kernel is unchanged print '='."""
    from sparsec.backends.kernels.cuda_sparse import default_config

    rows = {}
    for b in _bench("rowgroups"):
        new = _kernel_fields(default_config(b["kind"], "sm_90a", b["out"], b["in"])["gemv"], b)
        if new == _kernel_fields(b["default"]["gemv"], b):
            t_new = b["default"]["graph_ms"]
            same = True
        else:
            hits = [x["ms"] for x in b["search"] if "ms" in x and _kernel_fields(x["gemv"], b) == new]
            if not hits:
                print(f"{b['kind']} {b['out']}x{b['in']} M={b['m']}: the new kernel was not timed in this run")
                continue
            t_new, same = min(hits), False
        rows.setdefault(b["kind"], []).append((b["out"], b["in"], b["m"], b["default"]["graph_ms"], t_new,
                                               b["dense"]["graph_ms"], same))
    for kind, rs in rows.items():
        print(f"## {KIND_NAMES.get(kind, kind)}")
        print("| shape | M | before us (x cuBLAS) | now us (x cuBLAS) | before / now |")
        print("|---|---|---|---|---|")
        for n, k, m, old, new, dense, same in rs:
            print(f"| {n}x{k} | {m} | {old * 1e3:.1f} ({dense / old:.2f}x) | "
                  f"{'=' if same else f'{new * 1e3:.1f} ({dense / new:.2f}x)'} | {old / new:.2f} |")
        for lo, hi in ((1, 8), (16, 16)):
            sel = [r for r in rs if lo <= r[2] <= hi]
            now = [r[5] / r[4] for r in sel]
            print(f"{kind} M {lo}-{hi}: now {min(now):.2f}-{max(now):.2f}x cuBLAS (before "
                  f"{min(r[5] / r[3] for r in sel):.2f}-{max(r[5] / r[3] for r in sel):.2f}x); before / now "
                  f"{min(r[3] / r[4] for r in sel):.2f}-{max(r[3] / r[4] for r in sel):.2f}")


def ranges(name: str) -> None:
    """The run's untuned default ("ours") vs cuBLAS, steady state: range per kind at M <= 8 and M > 8, and how many
    points reach 3x."""
    for kind in dict.fromkeys(b["kind"] for b in _bench(name)):
        for lo, hi in ((1, 8), (9, 16)):
            r = [b["dense"]["graph_ms"] / b["default"]["graph_ms"] for b in _bench(name)
                 if b["kind"] == kind and lo <= b["m"] <= hi]  # fmt: skip
            if r:
                print(f"{KIND_NAMES.get(kind, kind):16} M {lo}-{hi}: {min(r):.2f}-{max(r):.2f}x cuBLAS, >= 3x at "
                      f"{sum(x >= 3 for x in r)} of {len(r)}")


if __name__ == "__main__":
    what = sys.argv[1] if len(sys.argv) > 1 else ""
    if what not in ("defaults", "ring", "xs", "rowgroups", "ranges") or (what == "ranges") != (len(sys.argv) == 3):
        sys.exit("usage: python bench/decode_compare.py defaults|ring|xs|rowgroups | ranges NAME")
    globals()[what](*sys.argv[2:])
