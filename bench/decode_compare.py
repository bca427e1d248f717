"""Figures docs/cuda.md quotes from the committed decode-GEMV runs (bench/results/cuda_kernels_decode_*.json), each
computed from the run's own search pass (every config timed the same way in one run):

    python bench/decode_compare.py defaults   # default / best config time, mean over M <= 8 (splitk vs autowarps)
    python bench/decode_compare.py ring       # best register-pipeline config / best cp.async-ring config, per point
    python bench/decode_compare.py xs         # same config without / with staged activations, median per point
"""
from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

RES = Path(__file__).resolve().parent / "results"
KINDS = ("sp16", "sp4", "dq4")


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


if __name__ == "__main__":
    what = sys.argv[1] if len(sys.argv) > 1 else ""
    if what not in ("defaults", "ring", "xs"):
        sys.exit("usage: python bench/decode_compare.py defaults|ring|xs")
    globals()[what]()
