"""End to end on the GPU: the golden GPT compiled for h100 with each of sparsec's CUDA kernel kinds, run by the TVM
runtime (Relax VM, runtime-only TVM) and compared with sparsec's executor on the same compressed graph.

    python bench/cuda_e2e.py build --src <artifact of `sparsec compress --example tiny-gpt --nm 2:4`> --out .devpack/e2e
    python bench/cuda_e2e.py run --dir .devpack/e2e --out DIR      # on the GPU machine -> DIR/cuda_e2e.json

Variants: ``nm24`` (2:4 fp16: cuda.nm24_mma_sp), ``nm24_int4`` (2:4 with int4 g32 RTN kept values:
cuda.nm24_int4_mma_sp), ``int4`` (dense int4 g32 asymmetric RTN: cuda.int4_dequant_mma), and with groups that hold
whole 64-column chunks (the decode GEMV then scales after the MMAs): ``nm24_int4_g64`` (asymmetric) and ``int4_g128``
(symmetric); ``int8`` (dense int8 g32 asymmetric: cuda.int8_dequant_mma); ``nm24_int8`` (2:4 with int8 g32
symmetric kept values: cuda.nm24_int8_mma_sp; it ran on cuda.nm_as_24_mma_sp, dequantized to fp16 at build time,
before that kernel existed) and ``nm24_int8_g64a`` (int8 g64 asymmetric). A format without a kernel of its own:
``nm14`` (1:4, zero-padded to 2:4, on cuda.nm_as_24_mma_sp). Token counts 1 (decode GEMV), 64 (small GEMM) and 8 x 128 (large GEMM).

With ``--moe-src`` (an artifact of ``sparsec compress --example tiny-moe --nm 2:4``): the MoE variants of
:func:`moe_variants`, routed and dense-equivalent.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def rtn(w, gs, sym, bits=4):
    import numpy as np

    from sparsec.compressor.formats import GroupQuant

    n, k = w.shape
    g = w.reshape(n, k // gs, gs).astype(np.float64)
    top, half = (1 << bits) - 1, 1 << (bits - 1)
    if sym:
        s = np.maximum(np.abs(g).max(-1), 1e-8) / (half - 1)
        u = np.clip(np.round(g / s[..., None]) + half, 0, top)
        z = None
    else:
        lo, hi = g.min(-1), g.max(-1)
        s = np.maximum(hi - lo, 1e-8) / top
        z = np.clip(np.round(-lo / s), 0, top)
        u = np.clip(np.round(g / s[..., None]) + z[..., None], 0, top)
    return GroupQuant.from_codes(u.reshape(n, k).astype(np.uint8), s.astype(np.float16),
                                 None if z is None else z.astype(np.uint8), bits, gs)  # fmt: skip


def variants(src: str):
    from sparsec.compressor.artifact import load_graph
    from sparsec.compressor.formats import NMSparse

    base = load_graph(src)

    def each_sparse(fn):
        """A copy of the 2:4 graph with every 2:4 weight ``w`` replaced by ``fn(w)``."""
        g = base.copy()
        for lin in g.linears():
            if isinstance(lin.weight, NMSparse):
                lin.weight = fn(lin.weight)
        return g

    def kept(w, gs_if, gs_else, sym, bits=4):  # the 2:4 weight with its kept values quantized
        cols = w.shape[1] // 2
        return w.with_values(rtn(w.values.materialize(), gs_if if cols % gs_if == 0 else gs_else, sym, bits))

    return {
        "nm24": base.copy(),
        "nm24_int4": each_sparse(lambda w: kept(w, 32, 16, True)),
        "int4": each_sparse(lambda w: rtn(w.materialize(), 32, False)),
        # group sizes whose groups hold whole 64-column chunks: the decode GEMV's scale-after-MMA kernel ("og")
        "nm24_int4_g64": each_sparse(lambda w: kept(w, 64, 16, False)),
        "int4_g128": each_sparse(lambda w: rtn(w.materialize(), 128 if w.shape[1] % 128 == 0 else 32, True)),
        "int8": each_sparse(lambda w: rtn(w.materialize(), 32, False, 8)),
        # a format without a CUDA kernel of its own: 1:4 on the 2:4 fp16 kernel
        "nm14": each_sparse(lambda w: NMSparse.from_dense(w.materialize(), 1, 4)),
        "nm24_int8": each_sparse(lambda w: kept(w, 32, 16, True, 8)),
        "nm24_int8_g64a": each_sparse(lambda w: kept(w, 64, 16, False, 8)),
    }


def moe_variants(src: str):
    """The golden tiny-moe (8 experts, top-2) as compressed in ``src`` (2:4), lowered routed (the CUDA default: each
    expert on its own tokens) and dense-equivalent (every expert on every token); and uncompressed, routed (dense
    experts through TVM's DLight matmul on a data-dependent row count)."""
    from sparsec.compressor.artifact import load_graph
    from sparsec.compressor.compress import load_example

    g = load_graph(src)
    return {"moe_nm24": (g, True), "moe_nm24_denseeq": (g.copy(), False), "moe_dense": (load_example("tiny-moe").graph, True)}


def cmd_build(a):
    from sparsec.backends.build import build
    from sparsec.compressor.artifact import ArtifactContent, write_artifact

    todo = {} if a.moe_only else {k: (g, None) for k, g in variants(a.src).items()}
    if a.moe_src:
        todo.update(moe_variants(a.moe_src))
    for name, (g, routed) in todo.items():
        if a.only and name not in a.only:
            continue
        t = time.time()
        info, writer = build(g, "h100", moe_routed=routed)
        write_artifact(Path(a.out) / name, ArtifactContent(g, {"e2e": name}, {"build": info}, writers=[("lib", writer)]), force=True)
        print(name, info["kernels"], f"{time.time() - t:.0f}s")


def cmd_run(a):
    import numpy as np

    from sparsec.backends.runtime import LoadedLib
    from sparsec.compressor.artifact import load_graph
    from sparsec.compressor.executor import Executor

    res = {"runs": []}
    rng = np.random.default_rng(0)
    for d in sorted(p for p in Path(a.dir).iterdir() if p.is_dir()):
        g = load_graph(d)
        lib = LoadedLib(d)
        ex = Executor(g, "cuda")
        for b, s in ((1, 1), (1, 64), (8, 128)):
            ids = rng.integers(0, 256, size=(b, s), dtype=np.int64)
            out = lib.run({"input_ids": ids})
            ref = ex.run({"input_ids": ids})
            y = np.asarray(list(out.values())[0], dtype=np.float64)
            r = np.asarray(list(ref.values())[0], dtype=np.float64)
            rel = float(np.linalg.norm(y - r) / max(np.linalg.norm(r), 1e-30))
            call = lib.timer({"input_ids": ids})
            for _ in range(3):
                call()
            t0 = time.perf_counter()
            for _ in range(20):
                call()
            ms = (time.perf_counter() - t0) / 20 * 1e3
            row = {"variant": d.name, "batch": b, "seq": s, "tokens": b * s, "rel_err_vs_executor": rel,
                   "finite": bool(np.isfinite(y).all()), "ms": ms}  # fmt: skip
            res["runs"].append(row)
            print(row, flush=True)
    Path(a.out).mkdir(parents=True, exist_ok=True)
    (Path(a.out) / "cuda_e2e.json").write_text(json.dumps(res, indent=1))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build")
    b.add_argument("--src", required=True)
    b.add_argument("--out", default=".devpack/e2e")
    b.add_argument("--moe-src", help="artifact of `sparsec compress --example tiny-moe --nm 2:4`: adds the MoE variants")
    b.add_argument("--moe-only", action="store_true", help="only the MoE variants")
    b.add_argument("--only", nargs="*", help="variant names to build (default: all)")
    r = sub.add_parser("run")
    r.add_argument("--dir", default=".devpack/e2e")
    r.add_argument("--out", required=True)
    a = ap.parse_args()
    {"build": cmd_build, "run": cmd_run}[a.cmd](a)


if __name__ == "__main__":
    main()
