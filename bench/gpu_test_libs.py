"""Prebuild the CUDA libraries of `pytest tests/test_cuda_kernels.py -m gpu` here (nvcc + g++), so that the GPU
machine only loads and runs them: it may lack g++, and building there spends lent device time.

    python bench/gpu_test_libs.py --out .devpack_gt [--arch sm_90a]   # here
    # on the GPU machine (carry .devpack_gt and .whl, the apache-tvm-ffi wheel of bench/device_pack.sh):
    SPARSEC_CUDA_TEST_LIBS=.devpack_gt python3 -m pytest tests/test_cuda_kernels.py -m gpu

The variant lists are the tests' own (tests/test_cuda_kernels.py GPU_TEST_LIBS): one library per test fixture, named
as the tests look them up. A library built for another arch than the GPU's fails to load there, not silently.
"""
from __future__ import annotations

import argparse
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _tests():
    sys.path.insert(0, str(ROOT / "tests"))
    try:
        import test_cuda_kernels
    finally:
        sys.path.pop(0)
    return test_cuda_kernels


def _build(name: str, arch: str, out: str) -> tuple[str, int, float]:
    from sparsec.backends.kernels.cuda_compile import build_shared

    variants_of, archs_of = _tests().GPU_TEST_LIBS[name]
    variants = list({v.func_name: v for v in variants_of(arch)}.values())
    t = time.perf_counter()
    build_shared(variants, archs_of(arch), str(Path(out) / f"{name}.so"))
    return name, len(variants), time.perf_counter() - t


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="folder for <name>.so (SPARSEC_CUDA_TEST_LIBS on the GPU machine)")
    ap.add_argument("--arch", default="sm_90a", help="the GPU's arch: sm_90a (H100/H200) or sm_80 (A100)")
    ap.add_argument("--only", nargs="*", help="library names (default: all)")
    ap.add_argument("-j", type=int, default=4, help="libraries built at once")
    args = ap.parse_args()
    names = list(_tests().GPU_TEST_LIBS)
    if args.only:
        bad = sorted(set(args.only) - set(names))
        if bad:
            ap.error(f"unknown libraries {bad}; known: {names}")
        names = args.only
    if args.arch != "sm_90a":  # the ws / dq16 tests need an sm_90 GPU and skip elsewhere
        names = [n for n in names if _tests().GPU_TEST_LIBS[n][1](args.arch) == [args.arch]]
    Path(args.out).mkdir(parents=True, exist_ok=True)
    with ProcessPoolExecutor(max_workers=args.j) as ex:
        for name, n, s in ex.map(_build, names, [args.arch] * len(names), [args.out] * len(names)):
            print(f"{name}.so: {n} variants, {s:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
