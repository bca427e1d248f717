"""sparsec's CUDA kernels (backends/kernels/cuda_sparse.py, sparsec_mma.cuh).

CI (no GPU): weight layouts against an independent decoder written from the PTX ISA's fragment definitions and
against TVM's own mma.sp metadata test formula; CUDA code generation + ptxas for sm_80 and sm_90a of every kernel;
the C++ launchers compile; the registry picks the kernels for CUDA targets and their declared parameters match
``prepare``. GPU (``-m gpu``, run on the lent H100 by bench/device_pack.sh): every kernel against a float64
reference on fresh random inputs, for the golden models' shapes and the LLM shapes at M = 1, 16, 128, 2048, 8192.
"""
from __future__ import annotations

import os
import shutil
import subprocess

import numpy as np
import pytest

from sparsec.backends.kernels import cuda_sparse as cs
from sparsec.compressor.formats import GroupQuant, NMSparse
from sparsec.compressor.ir import Linear

SEED = int.from_bytes(os.urandom(4), "little")  # fresh inputs every run; printed on failure


def _rng(tag: int) -> np.random.Generator:
    return np.random.default_rng([SEED, tag])


def _gq(rng, n, cols, gs, asym):
    codes = rng.integers(0, 16, size=(n, cols), dtype=np.uint8)
    scales = rng.uniform(0.01, 0.1, size=(n, cols // gs)).astype(np.float16)
    zeros = rng.integers(0, 16, size=(n, cols // gs), dtype=np.uint8) if asym else None
    return GroupQuant.from_codes(codes, scales, zeros, 4, gs)


def _nm24(rng, n, k, values):
    """Random 2:4 positions (uniform over the 6 patterns), packed as NMSparse stores them (2 bits, little-endian)."""
    pairs = np.array([(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)], dtype=np.uint8)
    pos = pairs[rng.integers(0, 6, size=(n, k // 4))].reshape(n, k // 8, 4)
    packed = pos[..., 0] | (pos[..., 1] << 2) | (pos[..., 2] << 4) | (pos[..., 3] << 6)
    return NMSparse(values, packed.astype(np.uint8), 2, 4, k)


def _weight(kind, n, k, gs, asym, rng):
    if kind == "dq4":
        return _gq(rng, n, k, gs, asym)
    if kind == "sp16":
        if n * k <= 1 << 16:  # small: the real magnitude path
            return NMSparse.from_dense(rng.standard_normal((n, k)).astype(np.float32), 2, 4)
        return _nm24(rng, n, k, rng.standard_normal((n, k // 2)).astype(np.float32))
    return _nm24(rng, n, k, _gq(rng, n, k // 2, gs, asym))


# ------------------------------------------------------------------------------------------------ layouts (CI)
@pytest.mark.parametrize("kind,asym", [("sp16", False), ("sp4", False), ("sp4", True), ("dq4", False), ("dq4", True)])
@pytest.mark.parametrize("n,k", [(16, 128), (40, 352), (10, 64), (64, 256)])
def test_prepared_layout_decodes_to_the_weight(kind, asym, n, k):
    rng = _rng(hash((kind, asym, n, k)) % 2**31)
    cols = k // 2 if kind == "sp4" else k
    gs = 16 if cols % 32 else 32
    w = _weight(kind, n, k, gs, asym, rng)
    arrays = cs.prepare(kind, w)
    specs = cs.param_specs(kind, n, k, max(gs, 1), asym)
    assert [(tuple(a.shape), str(a.dtype)) for a in arrays] == [(p.shape, p.dtype) for p in specs]
    got = cs.decode_layout(kind, arrays, n, k, gs)
    want = w.materialize()
    if kind == "sp16":
        want = want.astype(np.float16).astype(np.float32)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6, err_msg=f"seed {SEED}")


def test_metadata_matches_tvm_mma_sp_reference_formula():
    """TVM's own mma.sp m16n8k32 test builds lane (g, q<2)'s metadata from a 16x32 tile as: bits 0-15 row g,
    16-31 row g+8, 2 bits per kept position of the chunks of column half q. Our lanes q<2 hold step 2p, q>=2 step
    2p+1 (sparsity selector 1) with the same content."""
    rng = _rng(1)
    n, k = 16, 128
    nm = NMSparse.from_dense(rng.standard_normal((n, k)).astype(np.float32), 2, 4)
    meta = cs.prepare_sp16(nm)[1].reshape(1, k // 64, 32)
    pos = nm.indices()  # [16, k/4, 2]
    for t in range(k // 32):
        mask = pos[:, t * 8:(t + 1) * 8, :].reshape(16, 2, 8)  # TVM test: mask.reshape(16, 2, 8)
        ref = np.zeros((8, 2), dtype=np.uint32)
        for i in range(8):
            for half in range(2):
                base = 1
                for blk in range(2):
                    for j in range(8):
                        ref[i, half] |= int(mask[blk * 8 + i, half, j]) * base
                        base <<= 2
        for g in range(8):
            for half in range(2):
                lane = g * 4 + 2 * (t % 2) + half
                assert meta[0, t // 2, lane] == ref[g, half], f"step {t} lane {lane} seed {SEED}"


def test_int4_nibble_order_gives_half2_pairs():
    """Element e of a lane's A fragment is at nibble (e//2) + 4*(e%2): one shift + mask 0x000F000F yields the
    half2 register (e=2i, e=2i+1) -- the dequantization the kernels do."""
    rng = _rng(2)
    codes = rng.integers(0, 16, size=(5, 8), dtype=np.uint8)
    words = cs._pack_nibbles(codes)
    for i in range(4):
        pair = (words >> np.uint32(4 * i)) & np.uint32(0x000F000F)
        np.testing.assert_array_equal(pair & 0xF, codes[:, 2 * i])
        np.testing.assert_array_equal(pair >> 16, codes[:, 2 * i + 1])


# ------------------------------------------------------------------------------------------------ registry (CI)
def _linear(w, name="fc"):
    return Linear(name=name, inputs=["x"], outputs=["y"], weight=w)


@pytest.mark.parametrize("kind,gen,target", [("sp16", "cuda.nm24_mma_sp", "h100"), ("sp4", "cuda.nm24_int4_mma_sp", "a100"),
                                             ("dq4", "cuda.int4_dequant_mma", "h100")])  # fmt: skip
def test_registry_selects_cuda_kernels(kind, gen, target):
    from sparsec.backends.kernels.registry import ShapeHints, get_prepare, select_kernel
    from sparsec.backends.targets import get_target

    rng = _rng(3)
    w = _weight(kind, 352, 128, 32, True, rng)
    lin = _linear(w)
    impl = select_kernel(lin, get_target(target), ShapeHints(act_dtype="float32"))
    assert impl.name == gen and impl.act_dtype == "float16" and impl.emit is not None
    assert impl.config["func"].startswith("sparsec_cuda_") and impl.extra_modules
    arrays = impl.check_prepared(get_prepare(gen)(lin, impl.config))
    np.testing.assert_allclose(cs.decode_layout(kind, arrays, 352, 128, impl.config["gs"]),
                               w.materialize().astype(np.float16 if kind == "sp16" else np.float32).astype(np.float32), atol=1e-6)  # fmt: skip
    # not for CPUs, not for 2:8 or int8
    assert select_kernel(lin, get_target("x86"), ShapeHints()).name != gen
    if kind == "sp16":
        nm28 = NMSparse.from_dense(rng.standard_normal((16, 128)).astype(np.float32), 2, 8)
        assert select_kernel(_linear(nm28), get_target(target), ShapeHints()).name != gen


def test_tuning_entry_is_used_and_arch_limits_respected():
    from sparsec.backends.kernels.registry import ShapeHints, linear_key, select_kernel
    from sparsec.backends.targets import get_target
    from sparsec.backends.tune import TuningDB

    lin = _linear(_weight("sp16", 64, 128, 0, False, _rng(4)))
    big = {"bm": 256, "bn": 128, "bk": 128, "wm": 4, "wn": 2, "stages": 4, "group": 16}  # 272 KB: fits no GPU
    ok = {"bm": 128, "bn": 128, "bk": 64, "wm": 2, "wn": 4, "stages": 3, "group": 8}
    db = TuningDB()
    db.record("cuda.nm24_mma_sp", "h100", dict(linear_key(lin, ShapeHints()), act_dtype="float16"),
              {"gemm": ok, "gemv": {"warps": 4, "rt": 1, "u": 2}})  # fmt: skip
    impl = select_kernel(lin, get_target("h100"), ShapeHints(), db)
    assert impl.tuned and impl.config["gemm"] == ok and impl.config["gemv"] == {"warps": 4, "rt": 1, "u": 2}
    forced = select_kernel(lin, get_target("a100"), ShapeHints(config={"gemm": big}), db)
    assert not forced.tuned and cs.gemm_valid("sp16", forced.config["gemm"], False, "sm_80")
    untuned = select_kernel(lin, get_target("a100"), ShapeHints(), TuningDB())
    assert not untuned.tuned


# ------------------------------------------------------------------------------------------------ codegen (CI)
NVCC = shutil.which("nvcc")


def _all_kinds():
    return [cs.Variant.make(k, a, gs, cs.default_config(k, arch)) for arch in ("sm_90a",)
            for k, a, gs in (("sp16", False, 0), ("sp4", False, 64), ("sp4", True, 32), ("dq4", False, 128), ("dq4", True, 64))]  # fmt: skip


@pytest.mark.skipif(NVCC is None, reason="nvcc/ptxas not on PATH: CUDA code generation cannot be checked here")
@pytest.mark.parametrize("arch", ["sm_80", "sm_90a"])
def test_ptxas_accepts_every_kernel(arch, tmp_path):
    from sparsec.backends.kernels.cuda_compile import ptxas_report

    variants = [cs.Variant.make(k, a, gs, cs.default_config(k, arch))
                for k, a, gs in (("sp16", False, 0), ("sp4", False, 64), ("sp4", True, 32), ("dq4", False, 128), ("dq4", True, 64))]  # fmt: skip
    rep = ptxas_report(variants, arch, str(tmp_path))
    names = {n for v in variants for n in v.kernel_names().values()}
    assert names <= set(rep), f"kernels missing from ptxas output: {names - set(rep)}"
    for name in names:
        assert 0 < rep[name]["registers"] <= 255
        if "gemv" in name:  # the decode kernels must not spill
            assert rep[name]["spill_bytes"] == 0 and rep[name]["stack"] == 0, (name, rep[name])
    src = (tmp_path / "kernels.cu").read_text()
    cuh = (tmp_path / "sparsec_mma.cuh").read_text()
    assert "mma.sp::ordered_metadata.sync.aligned.m16n8k32.row.col.f32.f16.f16.f32" in cuh
    assert src.count("__global__") == len(names)


@pytest.mark.skipif(shutil.which("g++") is None, reason="no g++: the C++ launchers cannot be compiled here")
def test_host_launchers_compile(tmp_path):
    from sparsec.backends.kernels.cuda_compile import _ffi_includes

    fat = tmp_path / "k.fatbin"
    fat.write_bytes(b"\0" * 64)
    (tmp_path / "host.cc").write_text(cs.render_host_source(_all_kinds(), str(fat), "sparsec_fatbin_test"))
    r = subprocess.run(["g++", "-std=c++17", "-O1", "-fPIC", "-fvisibility=hidden", *_ffi_includes(), "-c", "host.cc", "-o", "host.o"],
                       cwd=tmp_path, capture_output=True, text=True)  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    syms = subprocess.run(["nm", "host.o"], cwd=tmp_path, capture_output=True, text=True).stdout
    for v in _all_kinds():
        assert f"__tvm_ffi_{v.func_name}" in syms


# ------------------------------------------------------------------------------------------------ GPU
LLM = [(4096, 4096), (11008, 4096), (4096, 11008)]
REF = [(128, 128), (352, 128), (128, 352), (256, 128), (128, 64), (64, 128), (10, 64)]


@pytest.fixture(scope="module")
def gpu_lib(tmp_path_factory):
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")
    tvm_ffi = pytest.importorskip("tvm_ffi")
    from sparsec.backends.kernels.cuda_compile import build_shared

    cap = torch.cuda.get_device_capability()
    arch = "sm_90a" if cap == (9, 0) else f"sm_{cap[0]}{cap[1]}"
    variants = {}
    for kind, asym in (("sp16", False), ("sp4", False), ("sp4", True), ("dq4", False), ("dq4", True)):
        for gs in ({0} if kind == "sp16" else {16, 32, 64, 128}):
            variants[(kind, asym, gs)] = cs.Variant.make(kind, asym, gs, cs.default_config(kind, arch))
    pre = os.environ.get("SPARSEC_CUDA_TEST_LIB")  # a library built elsewhere (the device machine may lack g++)
    path = pre or str(tmp_path_factory.mktemp("cuda") / "k.so")
    if not pre:
        build_shared(list(variants.values()), [arch], path)
    lib = tvm_ffi.load_module(path)
    return torch, lib, variants


def _gs_for(kind, k):
    if kind == "sp16":
        return 0
    cols = k // 2 if kind == "sp4" else k
    return next(g for g in (128, 64, 32, 16) if cols % g == 0)


@pytest.mark.gpu
@pytest.mark.parametrize("kind,asym", [("sp16", False), ("sp4", False), ("sp4", True), ("dq4", False), ("dq4", True)])
@pytest.mark.parametrize("n,k", LLM + REF)
def test_kernel_matches_float64_reference(gpu_lib, kind, asym, n, k):
    torch, lib, variants = gpu_lib
    gs = _gs_for(kind, k)
    rng = _rng(hash((kind, asym, n, k)) % 2**31)
    w = _weight(kind, n, k, gs, asym, rng)
    arrays = cs.prepare(kind, w)
    ws = [torch.from_numpy(a.view(np.int32) if a.dtype == np.uint32 else a).cuda() for a in arrays]
    wref = torch.from_numpy(w.materialize()).cuda().double()
    f = lib[variants[(kind, asym, gs)].func_name]
    for m in (1, 16, 128, 2048, 8192, 5, 37):
        x = torch.randn(m, k, device="cuda", dtype=torch.float16)
        y = torch.full((m, n), float("nan"), device="cuda", dtype=torch.float16)
        f(x, *ws, y)
        torch.cuda.synchronize()
        ref = x.double() @ wref.T
        assert not torch.isnan(y).any(), f"unwritten outputs at M={m}"
        rel = float((y.double() - ref).norm() / ref.norm())
        assert rel <= 1e-2, f"{kind} asym={asym} {n}x{k} M={m}: relative error {rel:.3e} (seed {SEED})"
