"""sparsec's CUDA kernels (backends/kernels/cuda_sparse.py, sparsec_mma.cuh).

CI (no GPU): weight layouts against an independent decoder written from the PTX ISA's fragment definitions and
against TVM's own mma.sp metadata test formula; CUDA code generation + ptxas for sm_80 and sm_90a of every kernel;
the C++ launchers compile; the registry picks the kernels for CUDA targets and their declared parameters match
``prepare``. GPU (``-m gpu``, run on the lent H100 by bench/device_pack.sh): every kernel against a float64
reference on fresh random inputs, for the golden models' shapes and the LLM shapes at M = 1, 16, 128, 2048, 8192.
"""
from __future__ import annotations

import os
import re
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


def _gq(rng, n, cols, gs, asym, bits=4):
    """Random ``bits``-bit group-quantized values (zero points when ``asym``)."""
    codes = rng.integers(0, 1 << bits, size=(n, cols), dtype=np.uint8)
    scales = rng.uniform(0.01, 0.1, size=(n, cols // gs)).astype(np.float16)
    zeros = rng.integers(0, 1 << bits, size=(n, cols // gs), dtype=np.uint8) if asym else None
    return GroupQuant.from_codes(codes, scales, zeros, bits, gs)


def _nm24(rng, n, k, values):
    """Random 2:4 positions (uniform over the 6 patterns), packed as NMSparse stores them (2 bits, little-endian)."""
    pairs = np.array([(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)], dtype=np.uint8)
    pos = pairs[rng.integers(0, 6, size=(n, k // 4))].reshape(n, k // 8, 4)
    packed = pos[..., 0] | (pos[..., 1] << 2) | (pos[..., 2] << 4) | (pos[..., 3] << 6)
    return NMSparse(values, packed.astype(np.uint8), 2, 4, k)


def _weight(kind, n, k, gs, asym, rng):
    if kind in cs.DENSE_KINDS:
        return _gq(rng, n, k, gs, asym, bits=8 if kind == "dq8" else 4)
    if kind == "sp16":
        if n * k <= 1 << 16:  # small: the real magnitude path
            return NMSparse.from_dense(rng.standard_normal((n, k)).astype(np.float32), 2, 4)
        return _nm24(rng, n, k, rng.standard_normal((n, k // 2)).astype(np.float32))
    return _nm24(rng, n, k, _gq(rng, n, k // 2, gs, asym, bits=8 if kind == "sp8" else 4))


# ------------------------------------------------------------------------------------------------ layouts (CI)
KIND_ASYM = [("sp16", False), ("sp4", False), ("sp4", True), ("dq4", False), ("dq4", True), ("dq8", False),
             ("dq8", True), ("sp8", False), ("sp8", True)]  # fmt: skip


@pytest.mark.parametrize("kind,asym", KIND_ASYM)
@pytest.mark.parametrize("n,k", [(16, 128), (40, 352), (10, 64), (64, 256)])
def test_prepared_layout_decodes_to_the_weight(kind, asym, n, k):
    rng = _rng(hash((kind, asym, n, k)) % 2**31)
    cols = k if kind in cs.DENSE_KINDS else k // 2
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
                                             ("dq4", "cuda.int4_dequant_mma", "h100"), ("dq8", "cuda.int8_dequant_mma", "a100"),
                                             ("sp8", "cuda.nm24_int8_mma_sp", "h100")])  # fmt: skip
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
    # not for CPUs; a 2:8 weight goes to cuda.nm_as_24_mma_sp (test_other_nm_patterns_and_int8_values_run_on_the_24_kernel)
    assert select_kernel(lin, get_target("x86"), ShapeHints()).name != gen
    if kind == "sp16":
        nm28 = NMSparse.from_dense(rng.standard_normal((16, 128)).astype(np.float32), 2, 8)
        assert select_kernel(_linear(nm28), get_target(target), ShapeHints()).name != gen


@pytest.mark.parametrize("n,m", [(1, 2), (1, 4), (2, 8), (1, 8), (2, 16), (2, 4), (3, 4), (4, 8), (3, 8)])
def test_nm_as_24_is_the_same_matrix_or_none(n, m):
    """nm_as_24: a pattern with at most 2 kept positions in every aligned group of 4 becomes a 2:4 weight of exactly the
    same matrix (its kept positions plus zero-valued padding); one with 3 or more in some group is refused. Random
    masks (fresh seed), dense and int8 group-quantized values."""
    rng = np.random.default_rng()
    out, inn = 24, 128
    dense = rng.standard_normal((out, inn)).astype(np.float32)
    mask = np.zeros((out, inn // m, m), dtype=bool)
    np.put_along_axis(mask, np.argsort(rng.random((out, inn // m, m)), axis=-1)[..., :n], True, axis=-1)
    w = NMSparse.from_mask(dense, mask.reshape(out, inn), n, m)
    fits = (mask.reshape(out, inn // 4, 4).sum(-1) <= 2).all()
    for ww in (w, w.with_values(_gq(rng, out, inn * n // m, 16, False, 8))):
        a = cs.nm_as_24(ww)
        if not fits:
            assert a is None
            continue
        assert (a.n, a.m) == (2, 4) and a.shape == ww.shape
        np.testing.assert_array_equal(a.materialize(), ww.materialize())
        assert (a.mask() | ~ww.mask()).all()  # every kept position of the original is kept
    if n <= 2 and m % 4 == 0 or (n, m) == (1, 2):  # always fits
        assert fits
    # 4:8 whose groups of 4 happen to hold 2 each: fits
    half = np.zeros((out, inn // 4, 4), dtype=bool)
    half[..., :2] = True
    assert cs.nm_as_24(NMSparse.from_mask(dense, half.reshape(out, inn), 4, 8)) is not None


@pytest.mark.parametrize("target", ["h100", "a100"])
def test_other_nm_patterns_and_int8_values_run_on_the_24_kernel(target):
    """N:M weights without a specialised CUDA kernel whose pattern fits 2:4 (1:4, 2:8, ...), and 2:4 weights of values
    without an int kernel (int8 / int4 with a group of 8), run on the 2:4 fp16 kernel: the prepared arrays decode to
    the weight (rounded to fp16), the note says what was converted; 2:4 dense, 2:4 + int4 and 2:4 + int8 (groups of
    a multiple of 16) keep their own kernels;
    4:8 falls back to the dense path; the 2:4 fp16 kernel's tuning entries serve the converted weight."""
    from sparsec.backends.kernels.registry import ShapeHints, get_prepare, select_kernel
    from sparsec.backends.targets import get_target
    from sparsec.backends.tune import TuningDB

    rng = np.random.default_rng()
    tgt = get_target(target)
    dense = rng.standard_normal((40, 256)).astype(np.float32)
    cases = [(NMSparse.from_dense(dense, 1, 4), "1:4 run as 2:4"), (NMSparse.from_dense(dense, 2, 8), "2:8 run as 2:4")]
    nm24 = NMSparse.from_dense(dense, 2, 4)
    cases += [(nm24.with_values(_gq(rng, 40, 128, 8, False, 8)), "int8 g8 values dequantized"),
              (nm24.with_values(_gq(rng, 40, 128, 8, False)), "int4 g8 values dequantized")]
    for w, note in cases:
        lin = _linear(w)
        impl = select_kernel(lin, tgt, ShapeHints())
        assert impl.name == "cuda.nm_as_24_mma_sp" and note in impl.note and impl.config["kind"] == "sp16", (note, impl.note)
        arrays = impl.check_prepared(get_prepare(impl.name)(lin, impl.config))
        np.testing.assert_array_equal(cs.decode_layout("sp16", arrays, 40, 256),
                                      w.materialize().astype(np.float16).astype(np.float32))
    assert select_kernel(_linear(nm24), tgt, ShapeHints()).name == "cuda.nm24_mma_sp"
    int4 = nm24.with_values(_gq(rng, 40, 128, 32, False))
    assert select_kernel(_linear(int4), tgt, ShapeHints()).name == "cuda.nm24_int4_mma_sp"
    int8 = nm24.with_values(_gq(rng, 40, 128, 32, False, 8))
    assert select_kernel(_linear(int8), tgt, ShapeHints()).name == "cuda.nm24_int8_mma_sp"
    impl = select_kernel(_linear(NMSparse.from_dense(dense, 4, 8)), tgt, ShapeHints())
    assert impl.name == "tvm.dense" and "materialized dense" in impl.note and "multiple of 32" not in impl.note
    # a layer whose shape the kernels do not take says so (it said "no kernel for nm_sparse[dense] on this target")
    odd = NMSparse.from_dense(rng.standard_normal((40, 72)).astype(np.float32), 2, 4)
    impl = select_kernel(_linear(odd), tgt, ShapeHints())
    assert impl.name == "tvm.dense" and "in_features a multiple of 32" in impl.note and "no kernel" not in impl.note
    # the shipped h100 entry of a 2:4 4096x4096 layer (the warp-specialized GEMM) serves a 1:4 one
    if target == "h100":
        big = NMSparse.from_dense(rng.standard_normal((4096, 4096)).astype(np.float32), 1, 4)
        impl = select_kernel(_linear(big), tgt, ShapeHints(), TuningDB.for_target("h100"))
        ref = select_kernel(_linear(cs.nm_as_24(big)), tgt, ShapeHints(), TuningDB.for_target("h100"))
        assert impl.tuned and ref.tuned and impl.config == ref.config and impl.config["gemm"].get("ws") == 1


def _run_emit_on_cpu(impl, x, arrays):
    """Compile a kernel's Relax emit (target-independent: TE stages TVM schedules per target) for the local CPU with
    a symbolic token count, run it with TVM's VM and return y."""
    import tvm
    from tvm import relax, tirx
    from tvm.runtime.vm import VirtualMachine

    bb = relax.BlockBuilder()
    m = tirx.Var("m", "int64")
    xv = relax.Var("x", relax.TensorType([m, x.shape[1]], str(x.dtype)))
    pv = [relax.Var(p.name, relax.TensorType(list(p.shape), p.dtype)) for p in impl.params]
    with bb.function("main", [xv, *pv]):
        with bb.dataflow():
            y = bb.emit_output(impl.emit(bb, xv, pv))
        bb.emit_func_output(y)
    ex = tvm.compile(bb.get(), target="llvm")
    vm = VirtualMachine(ex, tvm.cpu())
    out = vm["main"](tvm.runtime.tensor(x), *[tvm.runtime.tensor(a) for a in arrays])
    return out.numpy()


@pytest.mark.parametrize("bits,gs,asym,gqsa", [(8, 8, False, False), (8, 8, True, True), (4, 8, True, False),
                                               (3, 16, False, False), (2, 32, False, True)])  # fmt: skip
def test_dequant_matmul_for_weights_without_a_cuda_kernel(bits, gs, asym, gqsa):
    """Dense group-quantized weights no CUDA kernel takes (int2/3, int4 / int8 with a group of 8; GQSA group masks)
    get tvm.dequant_matmul on a100/h100: codes stay one byte each, and its computation (the same Relax/TE that the CUDA
    build schedules with DLight) matches float64 on fresh inputs, here compiled for the CPU at M = 1, 7 and 64. int4
    and int8 with a group multiple of 16 keep their tensor-core kernels; CPU targets keep their own kernels."""
    from sparsec.backends.kernels.registry import ShapeHints, get_prepare, select_kernel
    from sparsec.backends.targets import get_target

    rng = np.random.default_rng()
    n, k = 48, 256
    codes = rng.integers(0, 1 << bits, size=(n, k)).astype(np.uint8)
    scales = rng.uniform(0.01, 0.1, size=(n, k // gs)).astype(np.float16)
    zeros = rng.integers(0, 1 << bits, size=(n, k // gs)).astype(np.float32) if asym else None
    mask = rng.random((n, k // gs)) < 0.7 if gqsa else None
    gq = GroupQuant.from_codes(codes, scales, zeros, bits, gs, group_mask=mask)
    lin = _linear(gq)
    for target in ("h100", "a100"):
        impl = select_kernel(lin, get_target(target), ShapeHints(act_dtype="float32"))
        assert impl.name == "tvm.dequant_matmul" and f"int{bits} g{gs}" in impl.note, (impl.name, impl.note)
        assert [p.dtype for p in impl.params][0] == "uint8" and impl.params[0].shape == (n, k)
    arrays = impl.check_prepared(get_prepare(impl.name)(lin, impl.config))
    w = gq.materialize().astype(np.float64)
    for m in (1, 7, 64):
        x = rng.standard_normal((m, k)).astype(np.float32)
        got = _run_emit_on_cpu(impl, x, arrays)
        ref = x.astype(np.float64) @ w.T
        assert got.shape == (m, n) and np.abs(got - ref).max() <= 1e-5 * np.abs(ref).max(), m
    assert select_kernel(lin, get_target("x86"), ShapeHints()).name != "tvm.dequant_matmul"
    g16 = 32  # the same codes in groups of 32
    sc16 = rng.uniform(0.01, 0.1, size=(n, k // g16)).astype(np.float16)
    for b, gen in ((4, "cuda.int4_dequant_mma"), (8, "cuda.int8_dequant_mma")):
        gq16 = GroupQuant.from_codes(codes & ((1 << b) - 1), sc16, None, b, g16)
        assert select_kernel(_linear(gq16), get_target("h100"), ShapeHints()).name == gen


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
    # an entry without a split count ("ks", added later) gets the default one
    assert impl.tuned and impl.config["gemm"] == ok
    assert impl.config["gemv"] == dict(cs.default_config("sp16")["gemv"], warps=4, rt=1, u=2)
    forced = select_kernel(lin, get_target("a100"), ShapeHints(config={"gemm": big}), db)
    assert not forced.tuned and cs.gemm_valid("sp16", forced.config["gemm"], False, "sm_80")
    untuned = select_kernel(lin, get_target("a100"), ShapeHints(), TuningDB())
    assert not untuned.tuned


# ------------------------------------------------------------------------------------------------ codegen (CI)
NVCC = shutil.which("nvcc")


def _all_kinds():
    split = dict(cs.default_config("sp4"), gemv=dict(cs.default_config("sp4")["gemv"], ks=4))  # a fixed split count too
    return [cs.Variant.make(k, a, gs, cs.default_config(k, arch)) for arch in ("sm_90a",)
            for k, a, gs in (("sp16", False, 0), ("sp4", False, 64), ("sp4", True, 32), ("dq4", False, 128), ("dq4", True, 64),
                             ("dq8", False, 128), ("dq8", True, 16), ("sp8", False, 64), ("sp8", True, 16))] + [
        cs.Variant.make("sp4", True, 32, split)]  # fmt: skip


@pytest.mark.skipif(NVCC is None, reason="nvcc/ptxas not on PATH: CUDA code generation cannot be checked here")
@pytest.mark.parametrize("arch", ["sm_80", "sm_90a"])
def test_ptxas_accepts_every_kernel(arch, tmp_path):
    from sparsec.backends.kernels.cuda_compile import ptxas_report

    variants = [cs.Variant.make(k, a, gs, cs.default_config(k, arch))
                for k, a, gs in (("sp16", False, 0), ("sp4", False, 64), ("sp4", True, 32), ("dq4", False, 128), ("dq4", True, 64),
                                 ("dq8", False, 32), ("dq8", True, 16), ("sp8", False, 32), ("sp8", True, 16))]  # fmt: skip
    # the untuned configs of LLM-sized layers (warps per token-tile count from the rows; 16-warp blocks)
    variants += [cs.Variant.make(k, a, gs, cs.default_config(k, arch, n, 4096, a)) for n in (4096, 14336)
                 for k, a, gs in (("sp16", False, 0), ("sp4", False, 128), ("sp4", True, 128), ("dq4", True, 128),
                                  ("dq8", False, 128), ("dq8", True, 128), ("sp8", False, 128), ("sp8", True, 128))]  # fmt: skip
    rep = ptxas_report(variants, arch, str(tmp_path))
    names = {n for v in variants for n in v.kernel_names().values()}
    assert names <= set(rep), f"kernels missing from ptxas output: {names - set(rep)}"
    for name in names:
        assert 0 < rep[name]["registers"] <= 255
        if "gemv" in name:  # the decode kernels must not spill
            # except int8's M > 8 kernel with 4 row tiles a warp and staged activations (gemv_tile_plan): 8 bytes at
            # 128 registers (sm_90a), measured 1.30-1.34x faster than the unspilled 2-row-tile one
            # (bench/results/cuda_kernels_decode_rowgroups.json: 14336x4096 / 11008x4096, M = 16)
            small = "_dq8" in name and "_nt2_" in name and "_r4_" in name and "_x_" in name
            lim = 8 if small else 0
            assert rep[name]["spill_bytes"] <= lim and rep[name]["stack"] <= lim, (name, rep[name])
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


# ------------------------------------------------------------------------------------------------ split-K GEMV (CI)
# The decode GEMV splits each row tile's K range among "ks" blocks (gridDim.y), then among the block's warps, with
# sparsec_mma.cuh split_range; the launcher picks ks for "ks": 0 with gemv_auto_ks and sizes the workspace.
def _chunk_cols(kind: str, k: int, c: int) -> tuple[int, int]:
    """Input columns [lo, hi) of 16-byte weight chunk c (kind's k32 steps per chunk), clipped to K."""
    w = {"sp16": 1, "sp4": 4, "dq4": 2, "dq8": 1, "sp8": 2}[kind] * 32
    return min(c * w, k), min((c + 1) * w, k)


@pytest.mark.parametrize("kind", cs.KINDS)
@pytest.mark.parametrize("k", [64, 352, 1184, 4096, 11008])
def test_split_k_partition_covers_k_once(kind, k):
    """Every (split, warp) chunk range of the kernel's two-level split is disjoint and together they cover the K chunks
    exactly once, for split counts that do and do not divide the chunk count (more splits than chunks included);
    a numpy emulation of the partial sums reduced in split order equals x @ W^T."""
    rng = _rng(hash((kind, k)) % 2**31)
    nck = cs.gemv_chunks(kind, k)
    assert nck == -(-k // ({"sp16": 32, "sp4": 128, "dq4": 64, "dq8": 32, "sp8": 64}[kind]))
    w = rng.standard_normal((16, k))
    x = rng.standard_normal((3, k))
    ref = x @ w.T
    for ks in (1, 2, 3, 4, 5, 8, 16):
        for warps in (4, 8, 16):
            owner = np.full(nck, -1)
            total = np.zeros((3, 16))
            for s in range(ks):
                sb, se = cs.split_range(nck, ks, s)
                part = np.zeros((3, 16))
                for wp in range(warps):
                    cb, ce = cs.split_range(se - sb, warps, wp)
                    for c in range(sb + cb, sb + ce):
                        assert owner[c] == -1, (ks, warps, c)
                        owner[c] = s * warps + wp
                        lo, hi = _chunk_cols(kind, k, c)
                        part += x[:, lo:hi] @ w[:, lo:hi].T
                total += part  # the last block's reduction: split order 0..ks-1
            assert (owner >= 0).all(), f"chunks not covered at ks={ks} warps={warps}"
            sizes = [cs.split_range(nck, ks, s)[1] - cs.split_range(nck, ks, s)[0] for s in range(ks)]
            assert max(sizes) - min(sizes) <= 1  # balanced
            np.testing.assert_allclose(total, ref, rtol=1e-10, atol=1e-10)


@pytest.mark.skipif(NVCC is None, reason="nvcc not on PATH: sparsec_mma.cuh split_range cannot be compiled here")
def test_split_range_matches_the_device_code(tmp_path):
    """sparsec_mma.cuh split_range (compiled by nvcc as host code) gives the ranges cuda_sparse.split_range gives."""
    cases = [(n, p, i) for n in (0, 1, 3, 10, 86, 128, 344, 100003) for p in (1, 2, 3, 4, 7, 8, 16) for i in range(p)]
    (tmp_path / "t.cu").write_text(
        '#include "sparsec_mma.cuh"\n#include <cstdio>\nint main() {\n  int b, e;\n'
        + "".join(f"  sparsec::split_range({n}, {p}, {i}, b, e); printf(\"%d %d\\n\", b, e);\n" for n, p, i in cases)
        + "  return 0;\n}\n")  # fmt: skip
    shutil.copyfile(cs.HEADER_PATH, tmp_path / cs.HEADER_PATH.name)
    r = subprocess.run([NVCC, "-std=c++17", "-I", str(tmp_path), "-o", "t", "t.cu"], cwd=tmp_path, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    out = subprocess.run(["./t"], cwd=tmp_path, capture_output=True, text=True, check=True).stdout.split("\n")
    for (n, p, i), line in zip(cases, out):
        assert tuple(map(int, line.split())) == cs.split_range(n, p, i), (n, p, i)


@pytest.mark.skipif(NVCC is None, reason="nvcc not on PATH: the device header cannot be compiled here")
def test_gemv_ring_layout_matches_the_device_code(tmp_path):
    """The cp.async ring's stage size (sparsec_mma.cuh GemvRing, compiled by nvcc as host code) is the one the launcher
    reserves (cuda_sparse.gemv_ring_stage_bytes), and a ring config's dynamic shared memory = reduction buffer + ring."""
    enum = cs._KIND_ENUM
    cases = [(k, rt, a, og) for k in enum for rt in (1, 2, 4) for a in ((False,) if k == "sp16" else (False, True))
             for og in ((False,) if k == "sp16" else (False, True))]  # fmt: skip
    (tmp_path / "t.cu").write_text(
        '#include "sparsec_mma.cuh"\n#include <cstdio>\nint main() {\n'
        + "".join(f"  printf(\"%d\\n\", sparsec::GemvRing<sparsec::{enum[k]}, {rt}, {str(a).lower()}, {str(og).lower()}>"
                  "::kStageBytes);\n" for k, rt, a, og in cases)
        + "  return 0;\n}\n")  # fmt: skip
    shutil.copyfile(cs.HEADER_PATH, tmp_path / cs.HEADER_PATH.name)
    r = subprocess.run([NVCC, "-std=c++17", "-I", str(tmp_path), "-o", "t", "t.cu"], cwd=tmp_path, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    out = subprocess.run(["./t"], cwd=tmp_path, capture_output=True, text=True, check=True).stdout.split()
    for (k, rt, a, og), got in zip(cases, out, strict=False):
        assert int(got) == cs.gemv_ring_stage_bytes(k, rt, a, og), (k, rt, a, og)
    # the staged activations ("xs"): two XTile buffers a warp after the reduction buffer
    xcases = [(k, nt, u) for k in enum for nt in (1, 2) for u in (1, 2)]
    (tmp_path / "x.cu").write_text(
        '#include "sparsec_mma.cuh"\n#include <cstdio>\nint main() {\n'
        + "".join(f"  printf(\"%d\\n\", sparsec::XTile<sparsec::{enum[k]}, {nt}, {u}>::kBytes);\n" for k, nt, u in xcases)
        + "  return 0;\n}\n")  # fmt: skip
    r = subprocess.run([NVCC, "-std=c++17", "-I", str(tmp_path), "-o", "x", "x.cu"], cwd=tmp_path, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    xout = subprocess.run(["./x"], cwd=tmp_path, capture_output=True, text=True, check=True).stdout.split()
    for (k, nt, u), got in zip(xcases, xout, strict=True):
        c = dict(cs.default_config(k)["gemv"], warps=8, rt=2, u=u, xs=3, st=0)
        assert cs._gemv_smem(c, nt, k) == 8 * 2 * nt * 4 * 32 * 4 + 8 * 2 * int(got), (k, nt, u)
        # row groups: the wr warps of a k-group share one pair of buffers
        assert cs._gemv_smem(dict(c, wr=4), nt, k) == 8 * 2 * nt * 4 * 32 * 4 + 2 * 2 * int(got), (k, nt, u)
    c = dict(cs.default_config("sp4")["gemv"], warps=8, rt=2, st=3)
    v = cs.Variant.make("sp4", True, 128, dict(cs.default_config("sp4"), gemv=c))
    for nt in (1, 2):
        assert cs._gemv_smem(v.cfg("gemv"), nt, "sp4", True, 128) == 8 * 2 * nt * 4 * 32 * 4 + 8 * 3 * cs.gemv_ring_stage_bytes("sp4", 2, True, True)
    # the ring feeds the activations itself: "xs" (on by default for 2:4 + int4) does not apply under it
    assert "_s3_" in v.kernel_names()["gemv1"] and "_x" not in v.kernel_names()["gemv1"]
    assert ", true, 3, false, 1>(X" in cs.render_device_source([v])
    assert not cs.gemv_valid(dict(c, st=cs.GEMV_MAX_ST + 1))
    # a stored ring too deep for the arch's shared memory falls back to the untuned GEMV (a100: 163 KB a block)
    from sparsec.backends.kernels.registry import ShapeHints, linear_key
    from sparsec.backends.targets import get_target
    from sparsec.backends.tune import TuningDB

    lin = _linear(_weight("sp4", 64, 512, 64, False, _rng(3)))
    deep = dict(c, warps=16, rt=2, st=6)
    assert cs.SMEM_LIMIT["sm_90a"] >= cs._gemv_smem(deep, 2, "sp4", False, 64) > cs.SMEM_LIMIT["sm_80"]
    for target, arch, fits in (("a100", "sm_80", False), ("h100", "sm_90a", True)):
        db = TuningDB()
        db.record("cuda.nm24_int4_mma_sp", target, dict(linear_key(lin, ShapeHints()), act_dtype="float16"), {"gemv": deep})
        v, tuned = cs.variant_for(lin, get_target(target), ShapeHints(), db, "cuda.nm24_int4_mma_sp", "sp4", False, 64)
        want = deep if fits else cs.default_config("sp4", arch, 64, 512)["gemv"]
        assert v.cfg("gemv") == dict(cs.default_config("sp4")["gemv"], **want) and tuned == fits


@pytest.mark.skipif(shutil.which("g++") is None, reason="no g++: the launcher's gemv_auto_ks cannot be compiled here")
def test_gemv_auto_ks_matches_the_launcher(tmp_path):
    """The launcher's gemv_auto_ks (the C++ text rendered into every host source) agrees with the Python one, and the
    choice has the intended properties: a power of two in 1..8, no warp with fewer than GEMV_MIN_CHUNKS chunks of its
    split, no split once the grid alone has GEMV_WARPS_PER_SM warps per SM."""
    host = cs.render_host_source(_all_kinds(), "x.fatbin", "sym")
    assert cs._GEMV_KS_CXX in host
    rng = _rng(77)
    cases = [(int(g), int(w), int(c), int(s)) for g, w, c, s in zip(rng.integers(1, 2000, 300), rng.choice([1, 4, 8, 16], 300),
             rng.integers(0, 400, 300), rng.choice([1, 80, 108, 132, 144], 300))]  # fmt: skip
    cases += [(128, 8, 128, 132), (128, 8, 32, 132), (344, 8, 86, 132), (11, 8, 11, 132)]
    # row groups ("wr"): only the k-groups (warps / wr) split a block's K range, so the chunk floor counts those
    cases = [(g, w, c, s, 0) for g, w, c, s in cases] + [(int(g), 16, int(c), 132, int(kg)) for g, c, kg in zip(
        rng.integers(1, 300, 60), rng.integers(0, 400, 60), rng.choice([2, 4, 8], 60))]  # fmt: skip
    (tmp_path / "t.cc").write_text(
        "#include <algorithm>\n#include <cstdint>\n#include <cstdio>\n" + cs._GEMV_KS_CXX + "int main() {\n"
        + "".join(f'  printf("%d\\n", gemv_auto_ks({g}, {w}, {c}, {s}, {kg}));\n' for g, w, c, s, kg in cases) + "}\n")  # fmt: skip
    r = subprocess.run(["g++", "-std=c++17", "-o", "t", "t.cc"], cwd=tmp_path, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    got = [int(v) for v in subprocess.run(["./t"], cwd=tmp_path, capture_output=True, text=True, check=True).stdout.split()]
    for (g, w, c, s, kg), ks in zip(cases, got, strict=True):
        assert ks == cs.gemv_auto_ks(g, w, c, s, kg), (g, w, c, s, kg)
        assert ks in (1, 2, 4, 8)
        if ks > 1:
            assert c // (cs.GEMV_MIN_CHUNKS * (kg or w)) >= ks  # every warp of every split keeps its minimum of chunks
            assert g * (ks // 2) * w < s * cs.GEMV_WARPS_PER_SM  # half the split would not fill the SMs yet
        if g * w >= s * cs.GEMV_WARPS_PER_SM:
            assert ks == 1
    # 4096-row weights on an H100 (132 SMs), 128 blocks of 8 warps: 2:4 fp16 at K = 4096 (128 chunks) stays whole,
    # at K = 11008 (344 chunks) splits in 2 (3 rounded down to a power of two); with 16 warps neither splits
    assert cs.gemv_auto_ks(128, 8, cs.gemv_chunks("sp16", 4096), 132) == 1
    assert cs.gemv_auto_ks(128, 8, cs.gemv_chunks("sp16", 11008), 132) == 2
    assert cs.gemv_auto_ks(128, 16, cs.gemv_chunks("sp16", 11008), 132) == 1


@pytest.mark.skipif(shutil.which("g++") is None, reason="no g++: the launcher's ws_tail_plan cannot be compiled here")
def test_ws_tail_plan_matches_the_launcher(tmp_path):
    """The warp-specialized GEMM's tail split: the launcher's ws_tail_plan (C++ rendered into every host source) agrees
    with the Python one; whole tiles are whole waves; the split units of the last wave fit on the SMs at once, each
    keeps WS_TAIL_MIN_KT k tiles, and their k ranges (split_range, as the kernel cuts them) cover every k tile once."""
    rng = _rng(91)
    cases = [(int(t), int(s), int(k), int(x)) for t, s, k, x in zip(rng.integers(1, 3000, 300), rng.choice([108, 132, 114], 300),
             rng.integers(1, 100, 300), rng.choice([0, 1, 2, 4, 8], 300))]  # fmt: skip
    cases += [(688, 132, 32, 4), (256, 132, 32, 4), (4, 132, 30, 8), (2752, 132, 86, 8), (132, 132, 32, 4)]
    (tmp_path / "t.cc").write_text(
        "#include <algorithm>\n#include <cstdint>\n#include <cstdio>\n" + cs._WS_TAIL_CXX + "int main() {\n"
        + "".join(f'  {{ int64_t d; int s; ws_tail_plan({t}, {s}, {k}, {x}, &d, &s); printf("%lld %d\\n", (long long)d, s); }}\n'
                  for t, s, k, x in cases) + "}\n")  # fmt: skip
    r = subprocess.run(["g++", "-std=c++17", "-o", "t", "t.cc"], cwd=tmp_path, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    out = subprocess.run(["./t"], cwd=tmp_path, capture_output=True, text=True, check=True).stdout.split("\n")
    for (t, s, k, x), line in zip(cases, out):
        dp, n = cs.ws_tail_plan(t, s, k, x)
        assert [int(v) for v in line.split()] == [dp, n], (t, s, k, x)
        if n == 1:
            assert dp == t
            continue
        assert 2 <= n <= x and dp % s == 0 and 0 < (t - dp) * n <= s and k // n >= cs.WS_TAIL_MIN_KT
        ranges = [cs.split_range(k, n, i) for i in range(n)]
        assert ranges[0][0] == 0 and ranges[-1][1] == k and all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
    # the case it is for: 11008x4096 at M = 2048 (43 x 16 tiles of 256x128) on an H100, 32 k tiles of 128
    assert cs.ws_tail_plan(688, 132, 32, 4) == (660, 4) and cs.ws_tail_plan(688, 132, 32, 8) == (660, 4)
    assert cs.ws_tail_plan(256, 132, 32, 8) == (256, 1)  # a last wave of 124 tiles: nothing to gain
    assert cs.ws_tail_plan(4, 132, 30, 8) == (0, 7)  # 4 tiles of a short prompt: 28 units of 4-5 k tiles
    # the kernel's reduction holds the loads of at most kWsMaxSplit partials
    hdr = open(os.path.join(os.path.dirname(cs.__file__), "sparsec_mma.cuh")).read()
    assert f"constexpr int kWsMaxSplit = {max(cs.WS_TAIL_SPLITS)};" in hdr


def _int4_to_fp16_emulated(arrays, n, k, gs, asym, kind):
    """numpy model of sparsec_mma.cuh codes_to_fp16_body<4>: thread (rt, u, lane) reads the uint4 of codes of units
    4u..4u+3 (word w = unit 4u + w; a unit = 16 of the values' own columns: a k32 step of sp4, a k16 unit of dq4) and
    writes, per unit, the 8 fp16 of the lane's A fragment, dequantized with the (row g, row g+8) pair of the unit's
    group: register i takes nibbles i (low half) and i + 4 (high half), registers 0 and 2 row g, 1 and 3 row g+8.
    -> [Np/16, units, 32, 8] fp16."""
    np_, kp = -(-n // 16) * 16, -(-k // 128) * 128
    nrt, units = np_ // 16, (kp // 32 if kind == "sp4" else kp // 16)
    si = 2 if kind == "sp4" else 1  # scales after the metadata (sp4) or the codes (dq4)
    words = arrays[0].view(np.uint32).reshape(nrt, units // 4, 32, 4)
    sc = arrays[si].view(np.uint32).reshape(nrt, -1, 8)
    zb = arrays[si + 1].view(np.uint32).reshape(nrt, -1, 8) if asym else None
    out = np.zeros((nrt, units, 32, 8), dtype=np.float16)
    half2 = lambda w: np.array([w], dtype=np.uint32).view(np.float16)  # noqa: E731 - (low, high)
    for rt in range(nrt):
        for unit in range(units):
            grp = unit * 16 // gs
            for lane in range(32):
                g, q = lane >> 2, int(words[rt, unit // 4, lane, unit % 4])
                s2 = half2(sc[rt, grp, g])
                z2 = half2(zb[rt, grp, g]) if asym else np.array([1032.0, 1032.0], dtype=np.float16)
                for i in range(4):
                    for h in range(2):  # fp16 arithmetic, as __hsub2 / __hmul2
                        code = (q >> (4 * i + 16 * h)) & 0xF
                        out[rt, unit, lane, 2 * i + h] = (np.float16(code + 1024) - z2[i & 1]) * s2[i & 1]
    return out


def _int8_to_fp16_emulated(arrays, n, k, gs, asym, kind="dq8"):
    """numpy model of sparsec_mma.cuh codes_to_fp16_body<8>: thread (rt, u, lane) reads the uint4 of codes u (units
    2u, 2u + 1: k16 units of dq8, k32 steps of sp8) and writes units 2u + h (h = 0, 1) from words 2h, 2h + 1: register
    i = bytes 2 (i & 1), +1 of word 2h + i // 2 via byte_perm with 0x64 (1024 + code), minus 1024 + z (z = 128 without
    zero points), times the scale; registers 0 and 2 take row g's scale, 1 and 3 row g + 8's.
    -> [Np/16, units, 32, 8] fp16."""
    np_, kp = -(-n // 16) * 16, -(-k // 128) * 128
    nrt, units = np_ // 16, (kp // 32 if kind == "sp8" else kp // 16)
    si = 2 if kind == "sp8" else 1  # scales after the metadata (sp8) or the codes (dq8)
    q = arrays[0].view(np.uint32).reshape(nrt, units // 2, 32, 4)
    sc = arrays[si].view(np.uint32).reshape(nrt, -1, 8)
    zb = arrays[si + 1].view(np.uint32).reshape(nrt, -1, 8) if asym else None
    out = np.zeros((nrt, units, 32, 8), dtype=np.float16)
    half2 = lambda w: np.array([w], dtype=np.uint32).view(np.float16)  # noqa: E731 - (low, high)
    for rt in range(nrt):
        for u in range(units // 2):
            for lane in range(32):
                g = lane >> 2
                for h in range(2):
                    unit = 2 * u + h
                    s2 = half2(sc[rt, unit * 16 // gs, g])
                    z2 = half2(zb[rt, unit * 16 // gs, g]) if asym else np.array([1152.0, 1152.0], dtype=np.float16)
                    for i in range(4):
                        word = int(q[rt, u, lane, 2 * h + i // 2])
                        for b in range(2):
                            code = (word >> (8 * (2 * (i & 1) + b))) & 0xFF
                            out[rt, unit, lane, 2 * i + b] = (np.float16(code + 1024) - z2[i & 1]) * s2[i & 1]
    return out


def _d16_dense(frag, n, k):
    """Dense [n, k] from [Np/16, K/16, 32, 8] fp16 m16n8k16 A fragments (PTX ISA layout: element e of lane holds row
    g + 8 * ((e >> 1) & 1), column 2q + (e & 1) + 8 * (e >> 2) of the 16x16 tile)."""
    nrt, units = frag.shape[:2]
    w = np.zeros((nrt * 16, units * 16), dtype=np.float32)
    for lane in range(32):
        g, q = lane >> 2, lane & 3
        for e in range(8):
            r, c = g + 8 * ((e >> 1) & 1), 2 * q + (e & 1) + 8 * (e >> 2)
            w[r::16, c::16] = frag[:, :, lane, e].astype(np.float32)
    return w[:n, :k]


@pytest.mark.parametrize("kind", ["sp4", "dq4", "dq8", "sp8"])
@pytest.mark.parametrize("asym", [False, True])
def test_int4_to_fp16_conversion_layout(kind, asym):
    """The int4 / int8 prefill on sm_90a ("dq16") dequantizes the prepared codes into fp16 fragments and hands them to
    the warp-specialized GEMM: 2:4 + int4 / int8 -> the prepared sp16 layout (with their metadata unchanged), int4 /
    int8 -> dense m16n8k16 A fragments. The kernel's index math (numpy models above) must give the weight the independent
    layout decoder reads from the arrays, rounded to fp16, exactly (row, K and group tails; groups of 16 to 64)."""
    for n, k, gs in ((40, 320, 16), (16, 128, 64), (72, 384, 32)):
        w = _weight(kind, n, k, gs, asym, _rng(n + k + gs + asym + {"sp4": 0, "dq4": 7, "dq8": 11, "sp8": 13}[kind]))
        arrays = cs.prepare(kind, w)
        if kind in cs.INT8_KINDS:
            frag = _int8_to_fp16_emulated(arrays, n, k, gs, asym, kind)
        else:
            frag = _int4_to_fp16_emulated(arrays, n, k, gs, asym, kind)
        if kind not in cs.DENSE_KINDS:
            got = cs.decode_layout("sp16", [frag.reshape(frag.shape[0] * 16, -1), arrays[1]], n, k)
        else:
            got = _d16_dense(frag, n, k)
        want = cs.decode_layout(kind, arrays, n, k, gs).astype(np.float16).astype(np.float32)
        np.testing.assert_array_equal(got, want)
        np.testing.assert_allclose(got, w.materialize(), rtol=2e-3, atol=2e-3 * float(np.abs(w.materialize()).max()))


@pytest.mark.skipif(NVCC is None, reason="nvcc/ptxas not on PATH: the int4 prefill kernels cannot be compiled here")
def test_dq16_kernels_ptxas(tmp_path):
    """The converters and the warp-specialized kernels the int4 prefill runs on sm_90a: no spills, the wgmma pipeline
    kept (no C7514 serialization), the dense kernel issues dense wgmma m64n128k16."""
    from sparsec.backends.kernels.cuda_compile import ptxas_report

    vs = [cs.Variant.make(k, a, 64, cs.default_config(k, "sm_90a")) for k in ("sp4", "dq4", "dq8", "sp8") for a in (False, True)]
    vs += [cs.Variant.make(k, False, 64, _dq16_config(k, 0)) for k in ("sp4", "dq4")]  # weights by bulk copies
    rep = ptxas_report(vs, "sm_90a", str(tmp_path))
    names = {n for v in vs for p, n in v.kernel_names().items() if p.startswith("dq16_")}
    # 4 converters (int4 / int8, sym / asym: 2:4 + int8 shares dense int8's); sparse and dense kernels, whole-tile and
    # tail split, wmap or not
    assert len(names) == 12
    for name in names:
        r = rep[name]
        assert 0 < r["registers"] <= 168 and r["spill_bytes"] == 0 and r["stack"] == 0 and r["wgmma_serialized"] == 0, (name, r)
    ptx = subprocess.run([NVCC, "-ptx", "-O3", "-std=c++17", "-I", str(tmp_path), "-arch=sm_90a", "-o", "-", "kernels.cu"],
                         cwd=tmp_path, capture_output=True, text=True)  # fmt: skip
    assert ptx.returncode == 0, ptx.stderr[-2000:]
    assert "wgmma.mma_async.sync.aligned.m64n128k16.f32.f16.f16" in ptx.stdout
    assert "wgmma.mma_async.sp.sync.aligned.m64n128k32.f32.f16.f16" in ptx.stdout
    assert "cp.async.bulk.tensor.3d.shared::cluster.global.mbarrier::complete_tx::bytes" in ptx.stdout


@pytest.mark.skipif(NVCC is None, reason="nvcc not on PATH: the decode GEMV cannot be compiled here")
def test_gemv_programmatic_dependent_launch_code(tmp_path):
    """The decode GEMV's PDL: on sm_90a it waits (griddepcontrol.wait) before its first load and lets the next kernel
    launch (launch_dependents) only after its main loop, i.e. after the wait and every weight load; on sm_80 neither
    instruction exists. The host launches with cuLaunchKernelEx exactly for the kernels whose "pdl" bit is set."""
    v = cs.Variant.make("sp4", False, 128, cs.default_config("sp4", "sm_90a", 4096, 4096))
    (tmp_path / "kernels.cu").write_text(cs.render_device_source([v]))
    shutil.copyfile(cs.HEADER_PATH, tmp_path / cs.HEADER_PATH.name)
    for arch, want in (("sm_90a", True), ("sm_80", False)):
        ptx = subprocess.run([NVCC, "-ptx", "-O3", "-std=c++17", "-I", str(tmp_path), f"-arch={arch}", "-o", "-", "kernels.cu"],
                             cwd=tmp_path, capture_output=True, text=True)  # fmt: skip
        assert ptx.returncode == 0, ptx.stderr[-2000:]
        for name in (v.kernel_names()["gemv1"], v.kernel_names()["gemv2"]):
            body = ptx.stdout[ptx.stdout.index(f".entry {name}("):]
            body = body[: (body.find("\n.visible .entry", 1) + 1 or len(body) + 1) - 1]  # up to the next kernel
            if not want:
                assert "griddepcontrol" not in body, (arch, name)
                continue
            wait, trigger = body.index("griddepcontrol.wait"), body.index("griddepcontrol.launch_dependents")
            loads = [i for i in (body.find("ld.global"), body.find("cp.async")) if i >= 0]
            assert loads and wait < min(loads), (name, "a global load before griddepcontrol.wait")
            assert trigger > max(body.rfind("ld.global.nc.L1::no_allocate.v4"), body.rfind("mma.sp")), name
    host = cs.render_host_source([v], "/dev/null")
    assert "LaunchKernelEx(&cfg, f, args, nullptr)" in host and "(v.gemv_pdl & (M <= 8 ? 1 : 2))" in host


def test_gemv_pdl_policy():
    """PDL bits (cuda_sparse.gemv_pdl_bits): both kernels of 2:4 fp16 / 2:4 + int4 / int8 and the M > 8 kernel of int4,
    except the M > 8 kernel of layers with >= 4 x SMs row tiles; a tuned GEMV config stored without "pdl" (the DB
    predates it) takes its layer's bits."""
    for kind, bits in (("sp16", 3), ("sp4", 3), ("dq4", 2), ("dq8", 3), ("sp8", 3)):
        assert cs.default_config(kind, "sm_90a", 4096, 4096)["gemv"]["pdl"] == bits
        assert cs.default_config(kind, "sm_90a", 4096, 14336)["gemv"]["pdl"] == bits
        assert cs.default_config(kind, "sm_90a", 14336, 4096)["gemv"]["pdl"] == bits & 1  # 896 row tiles >= 4 x 132
    assert cs.gemv_pdl_bits("sp16", 16 * 4 * 132 - 16, 132) == 3 and cs.gemv_pdl_bits("sp16", 16 * 4 * 132, 132) == 1
    assert not cs.gemv_valid(dict(cs.default_config("sp16")["gemv"], pdl=4))

    class Target:
        name, arch, kind = "h100", "sm_90a", "cuda"

    w = NMSparse(np.zeros((14336, 2048), np.float32), np.zeros((14336, 512), np.uint8), 2, 4, 4096)
    lin = Linear(name="l", inputs=["x"], outputs=["y"], weight=w)
    stored = {k_: v_ for k_, v_ in cs.default_config("sp16")["gemv"].items() if k_ != "pdl"}

    class DB:
        def lookup(self, *a):
            return {"gemv": stored}

    v, tuned = cs.variant_for(lin, Target(), cs.ShapeHints(), DB(), "cuda.nm24_mma_sp", "sp16", False, 0)
    assert tuned and v.cfg("gemv")["pdl"] == 1, v.cfg("gemv")


def _dq16_config(kind: str, wmap: int) -> dict:
    """The sm_90a default of an int4 / int8 kind, its dequantize + ws GEMM reading the weights by tensor map (wmap 1,
    the default) or by bulk copies (0)."""
    c = cs.default_config(kind, "sm_90a")
    return dict(c, gemm=dict(c["gemm"], wmap=wmap))


def test_dq16_wmap_names_its_kernels():
    """The dequantize + ws GEMM of the int4 / int8 kinds reads the weights by tensor map by default; "wmap": 0 in the
    large config keeps the bulk copies (the int4 / int8 mma tile itself has no tensor-map form); without dq16 "wmap"
    is not a valid config."""
    for kind, fam in (("sp4", "_wstm_"), ("dq4", "_wsdtm_"), ("dq8", "_wsdtm_"), ("sp8", "_wstm_")):
        v = cs.Variant.make(kind, False, 128, cs.default_config(kind, "sm_90a"))
        kn = v.kernel_names()
        assert v.dq16_cfg() == cs.DQ16_GEMM[kind] and cs.DQ16_GEMM[kind]["wmap"] == 1 and fam in kn["dq16_gemm_tail"], kn
        assert kn["dq16_gemm"].split("_")[2].endswith("m") and "m" not in kn["gemm"].split("_")[2]
        bulk = cs.Variant.make(kind, False, 128, _dq16_config(kind, 0))
        assert bulk.dq16_cfg() == dict(cs.DQ16_GEMM[kind], wmap=0) and bulk.func_name != v.func_name
        assert not bulk.kernel_names()["dq16_gemm"].split("_")[2].endswith("m")
        assert f', {cs.ws_a_step(cs.DQ16_GEMM[kind])}}}' in cs.render_host_source([v], "x.fatbin", "sym")
        assert f', {cs.ws_a_step(cs.DQ16_GEMM[kind])}}}' not in cs.render_host_source([bulk], "x.fatbin", "sym")
        assert not cs.gemm_valid(kind, dict(v.cfg("gemm"), dq16=0, wmap=1), False, "sm_90a")


def test_dq16_path_on_sm90a_only():
    """sp4 on sm_90a: the large GEMM dequantizes to 2:4 fp16 and runs the warp-specialized kernel ("dq16"), also for a
    tuned tile from before dq16 existed; "dq16": 0 in a stored config keeps the int4 mma.sp GEMM; other archs, other
    kinds never get it; the library holds the converter and both 2:4 fp16 kernels."""
    from sparsec.backends.kernels.registry import ShapeHints, linear_key
    from sparsec.backends.targets import get_target
    from sparsec.backends.tune import TuningDB

    assert cs.default_config("sp4", "sm_90a")["gemm"].get("dq16") == 1
    assert cs.default_config("dq4", "sm_90a")["gemm"].get("dq16") == 1
    for kind, arch in (("sp4", "sm_80"), ("sp4", "sm_90"), ("sp16", "sm_90a"), ("dq4", "sm_80")):
        assert not cs.default_config(kind, arch)["gemm"].get("dq16")
        assert not cs.gemm_valid(kind, dict(cs.default_config(kind, arch)["gemm"], dq16=1), False, arch)
    lin = _linear(_weight("sp4", 512, 1024, 64, False, _rng(5)))  # 2^19 entries: at least DQ16_MIN_PARAMS["sp4"]
    key = dict(linear_key(lin, ShapeHints()), act_dtype="float16")
    tile = {"bm": 128, "bn": 128, "bk": 128, "wm": 2, "wn": 4, "stages": 3, "group": 16}
    for stored, target, want in ((tile, "h100", 1), (dict(tile, dq16=0), "h100", 0), (tile, "a100", 0)):
        db = TuningDB()
        db.record("cuda.nm24_int4_mma_sp", target, key, {"gemm": stored})
        v, tuned = cs.variant_for(lin, get_target(target), ShapeHints(), db, "cuda.nm24_int4_mma_sp", "sp4", False, 64)
        assert tuned and v.cfg("gemm").get("dq16", 0) == want and v.cfg("gemm")["bn"] == 128, (stored, target)
        kn = v.kernel_names()
        assert ("dq16_convert" in kn) == bool(want)
        if want:
            dev = cs.render_device_source([v])
            for name in (kn["dq16_convert"], kn["dq16_gemm"], kn["dq16_gemm_tail"]):
                assert f" {name}(" in dev
            assert f'"{kn["dq16_convert"]}"' in cs.render_host_source([v], "x.fatbin", "sym")
    # small layers keep the int4 GEMM (the conversion pass and the second launch cost more than they save there)
    for kind in ("sp4", "dq4", "dq8", "sp8"):
        lim = cs.DQ16_MIN_PARAMS[kind]
        assert cs.default_config(kind, "sm_90a", lim // 512, 512)["gemm"].get("dq16") == 1
        assert not cs.default_config(kind, "sm_90a", lim // 512 - 16, 512)["gemm"].get("dq16")
    small = _linear(_weight("sp4", 64, 512, 64, False, _rng(6)))
    v, _ = cs.variant_for(small, get_target("h100"), ShapeHints(), None, "cuda.nm24_int4_mma_sp", "sp4", False, 64)
    assert not v.cfg("gemm").get("dq16") and "dq16_convert" not in v.kernel_names()
    # the tuner compares the int4 mma.sp / mma tiles ("dq16": 0) with the dequantize + wgmma path
    for kind in ("sp4", "dq4"):
        sp = cs.search_space(kind, "sm_90a")["gemm"]
        assert sum(c.get("dq16") == 1 for c in sp) == 1 and all(c.get("dq16") in (0, 1) for c in sp)
    # the dense int4 kind feeds the dense-wgmma instantiation of the warp-specialized kernel (no metadata in its stages)
    v = cs.Variant.make("dq4", True, 32, cs.default_config("dq4", "sm_90a"))
    kn = v.kernel_names()
    assert kn["dq16_convert"] == "sparsec_int4a_to_fp16" and "_wsdm_" in kn["dq16_gemm"] and "_wsdtm_" in kn["dq16_gemm_tail"]
    dev = cs.render_device_source([v])
    assert "sparsec::codes_to_fp16_body<4, true>" in dev and ", true, true, true>(&tmap" in dev and ", false, true, true>(&tmap" in dev
    lay = cs.ws_layout(cs.DQ16_GEMM["dq4"])
    assert lay["meta_bytes"] == 0 and lay["a_bytes"] == 256 // 16 * 2 * 1024 and lay["smem"] <= cs.SMEM_LIMIT["sm_90a"]
    # dense int8 feeds the same dense kernel through its own converter
    v8 = cs.Variant.make("dq8", False, 64, cs.default_config("dq8", "sm_90a"))
    kn8 = v8.kernel_names()
    assert kn8["dq16_convert"] == "sparsec_int8s_to_fp16" and kn8["dq16_gemm"] == kn["dq16_gemm"]
    assert "sparsec::codes_to_fp16_body<8, false>" in cs.render_device_source([v8])
    # 2:4 + int8 feeds the 2:4 fp16 kernel (2:4 + int4's) through the int8 converter
    vs8 = cs.Variant.make("sp8", True, 64, cs.default_config("sp8", "sm_90a"))
    v4 = cs.Variant.make("sp4", True, 64, cs.default_config("sp4", "sm_90a"))
    assert vs8.kernel_names()["dq16_convert"] == "sparsec_int8a_to_fp16"
    assert vs8.kernel_names()["dq16_gemm"] == v4.kernel_names()["dq16_gemm"]
    assert not cs.default_config("dq8", "sm_80")["gemm"].get("dq16")
    # int8 leaves its small mma tile for dequantize + ws from M = 17 on where dq16 runs (cuda_gemm_v2_dq8_tiles_ab.md);
    # a100 and layers below DQ16_MIN_PARAMS keep the small tile up to M = 128
    assert cs.default_config("dq8", "sm_90a")["small_max"] == cs.GEMV_MAX_M
    assert cs.default_config("dq8", "sm_80")["small_max"] == cs.DEFAULT_SMALL_MAX
    assert cs.default_config("dq8", "sm_90a", 64, 128)["small_max"] == cs.DEFAULT_SMALL_MAX
    assert cs.default_config("dq4", "sm_90a")["small_max"] == cs.DEFAULT_SMALL_MAX
    # 2:4 + int4 (dequantize + ws) and 2:4 fp16 (its ws GEMM) too on sm_90a (bench/results/cuda_gemm_v2_mid_*.md);
    # a100, and 2:4 + int4 layers below DQ16_MIN_PARAMS, keep the small tile up to M = 128
    assert cs.default_config("sp4", "sm_90a", 4096, 4096)["small_max"] == cs.GEMV_MAX_M
    assert cs.default_config("sp4", "sm_90a", 64, 128)["small_max"] == cs.DEFAULT_SMALL_MAX
    assert cs.default_config("sp16", "sm_90a", 4096, 4096)["small_max"] == cs.GEMV_MAX_M
    assert cs.default_config("sp16", "sm_90a")["gemm"].get("ws") and cs.default_config("sp16", "sm_80")["small_max"] == cs.DEFAULT_SMALL_MAX
    assert cs.default_config("sp4", "sm_80", 4096, 4096)["small_max"] == cs.DEFAULT_SMALL_MAX
    # the shipped h100 tuning entries record the small_max of their day (128); it is not a tuned value and must not
    # undo the measured default (the LLM shapes those entries cover are the ones measured)
    from sparsec.backends.kernels.registry import ShapeHints
    from sparsec.backends.targets import get_target
    from sparsec.backends.tune import TuningDB

    lin = _linear(_weight("sp16", 4096, 4096, 0, False, _rng(5)))
    db = TuningDB.for_target("h100")
    v, tuned = cs.variant_for(lin, get_target("h100"), ShapeHints(), db, "cuda.nm24_mma_sp", "sp16", False, 0)
    assert tuned and v.small_max == cs.GEMV_MAX_M and v.cfg("gemm").get("ws")
    v8b = cs.Variant.make("dq8", False, 128, cs.default_config("dq8", "sm_90a", 4096, 4096))
    assert f", {cs.GEMV_MAX_M}, \"sparsec_int8s_to_fp16\"" in cs.render_host_source([v8b], "x.fatbin", "sym")


def test_gemv_launch_workspace_holds_every_partial():
    """The workspace the launcher sizes (cuda_sparse.gemv_launch) holds every partial the kernel writes
    (index (blockIdx.x * ks + blockIdx.y) * NV*32 + idx, NV = WR*RT*NT*4: row groups x row tiles), and a split-free
    launch needs none."""
    for kind, n, k, m, cfg in (("sp4", 4096, 4096, 1, {"warps": 8, "rt": 2, "u": 1, "ks": 4}),
                               ("sp16", 11008, 4096, 16, {"warps": 4, "rt": 1, "u": 1, "ks": 3}),
                               ("dq4", 40, 1184, 13, {"warps": 8, "rt": 4, "u": 2, "ks": 0}),
                               ("sp16", 4096, 4096, 8, {"warps": 8, "rt": 2, "u": 1, "ks": 0}),
                               ("dq4", 4096, 11008, 2, {"warps": 16, "rt": 2, "u": 1, "ks": 1}),
                               ("sp4", 4096, 4096, 16, {"warps": 16, "rt": 2, "u": 1, "ks": 2, "xs": 3, "wr": 1,
                                                        "wr2": 2}),
                               ("sp4", 11008, 4096, 5, {"warps": 8, "rt": 1, "u": 1, "ks": 3, "xs": 3, "wr": 4})):
        L = cs.gemv_launch(kind, n, k, m, cfg, 132)
        rows = cfg["rt"] * (cfg.get("wr2") or cfg.get("wr", 1) if m > 8 else cfg.get("wr", 1))
        assert L["grid_x"] * rows * 16 >= n > (L["grid_x"] - 1) * rows * 16
        assert L["nt"] == (1 if m <= 8 else 2)
        nv = rows * L["nt"] * 4
        if L["ks"] == 1:
            assert L["ws_floats"] == 0 and L["counters"] == 0
            continue
        bx, by, idx = np.meshgrid(np.arange(L["grid_x"]), np.arange(L["ks"]), np.arange(nv * 32), indexing="ij")
        flat = ((bx * L["ks"] + by) * nv * 32 + idx).ravel()
        assert flat.max() < L["ws_floats"] and len(np.unique(flat)) == flat.size  # in bounds, no two writers
        assert L["counters"] == L["grid_x"]


def test_untuned_gemv_warps_follow_the_layer_rows():
    """gemv_auto_warps: the fewest waves of row-tile blocks (an SM holds GEMV_WARP_BUDGET // warps blocks), the most
    warps among those; never more warps for more rows. The H100 decode runs' winners: 16 warps for 4096 rows (every
    kind), 11008 / 14336 rows 8 / 8 (2:4 fp16), 4 / 4 (2:4 + int4), 8 / 4 (int4). A build without a tuning entry uses
    it (a100 has fewer SMs: fewer warps sooner), with no more warps than K has chunks; a tuning entry still wins; the
    tuner measures each job's own default."""
    from types import SimpleNamespace

    from sparsec.backends import cuda_tune as ct
    from sparsec.backends.kernels.registry import ShapeHints, linear_key
    from sparsec.backends.targets import get_target
    from sparsec.backends.tune import TuningDB

    def waves(budget, n, rt, sms, w):
        blocks = -(-(-(-n // 16)) // rt)
        return -(-blocks // (sms * max(1, budget // w)))

    rng = np.random.default_rng()
    for budget in sorted(set(cs.GEMV_WARP_BUDGET.values())):
        for sms in (108, 132, int(rng.integers(20, 200))):
            ns = np.sort(rng.integers(16, 70000, 40))
            ws = [cs.gemv_auto_warps(budget, int(n), 2, sms) for n in ns]
            assert all(a >= b for a, b in zip(ws, ws[1:]))  # more rows never get more warps
            for n, w in zip(ns, ws):
                best = min(waves(budget, int(n), 2, sms, c) for c in cs.GEMV_WARP_CHOICES)
                assert waves(budget, int(n), 2, sms, w) == best
                assert w == max(c for c in cs.GEMV_WARP_CHOICES if waves(budget, int(n), 2, sms, c) == best)
    # (warps, warps2, row tiles a warp at M <= 8 / M > 8) for 4096 / 11008 / 14336 rows x 4096 inputs: the winners of
    # the H100 runs (cuda_kernels_decode_autowarps, _rowgroups): 4 row tiles a warp from 528 row tiles on (4 per SM x 132)
    # for the M > 8 kernels and for 2:4 + int4 at M <= 8 too, with the warps their registers allow in one wave
    measured = {"sp16": ((16, 16, 2, 2), (8, 8, 2, 4), (8, 8, 2, 4)), "sp4": ((16, 8, 2, 2), (8, 4, 4, 4), (8, 4, 4, 4)),
                "dq4": ((16, 16, 2, 2), (8, 4, 2, 4), (4, 4, 2, 4)), "dq8": ((16, 16, 2, 2), (8, 8, 2, 4), (8, 8, 2, 4))}
    for kind, want in measured.items():
        got = tuple((g["warps"], g["warps2"], cs.gemv_rt(g, 1), cs.gemv_rt(g, 2))
                    for g in (cs.default_config(kind, "sm_90a", n, 4096)["gemv"] for n in (4096, 11008, 14336)))
        assert got == want, (kind, got)
        for n in (11008, 14336):  # every kernel given 4 row tiles a warp stages its activations (as measured)
            g = cs.default_config(kind, "sm_90a", n, 4096)["gemv"]
            assert all(cs.gemv_xs(g, nt) for nt in (1, 2) if cs.gemv_rt(g, nt) == 4) and cs.gemv_valid(g)
    # 4096 rows, long K: the M > 8 kernel takes 64-row blocks split in 2 (2:4 + int4: two row groups of 2 row tiles
    # sharing the staged activations); not at K = 4096 (2-4 chunks a warp), not with zero points on 2:4 + int4
    for kind, rt, wr in (("sp16", 4, 1), ("sp4", 2, 2), ("dq4", 4, 1), ("dq8", 4, 1)):
        for k in (11008, 14336):
            g = cs.default_config(kind, "sm_90a", 4096, k)["gemv"]
            assert (g["warps2"], cs.gemv_rt(g, 2), cs.gemv_wr(g, 2), cs.gemv_ks(g, 2)) == (16, rt, wr, 2), (kind, k, g)
            assert (cs.gemv_rt(g, 1), cs.gemv_wr(g, 1)) == (2, 1)  # the M <= 8 kernel keeps 128 blocks
            L = cs.gemv_launch(kind, 4096, k, 16, g, 132)
            assert (L["grid_x"], L["ks"]) == (64, 2)
        assert cs.gemv_ks(cs.default_config(kind, "sm_90a", 4096, 4096)["gemv"], 2) in (0, 1)
    assert cs.gemv_wr(cs.default_config("sp4", "sm_90a", 4096, 11008, asym=True)["gemv"], 2) == 1

    # the build: a 5120-row 2:4 + int4 layer gets 8 warps on h100 (160 blocks: two 8-warp blocks an SM), 16 on 4096
    # rows; on a100 (108 SMs) 4096 rows already need two blocks an SM
    def pick(n, target, db=None, k=2048):
        lin = _linear(_weight("sp4", n, k, 64, False, _rng(n)))
        v, tuned = cs.variant_for(lin, get_target(target), ShapeHints(), db, "cuda.nm24_int4_mma_sp", "sp4", False, 64)
        return lin, v, tuned

    assert pick(5120, "h100")[1].cfg("gemv")["warps"] == 8 and pick(4096, "h100")[1].cfg("gemv")["warps"] == 16
    assert pick(4096, "a100")[1].cfg("gemv")["warps"] == 8
    # the M > 8 kernel of 2:4 + int4 stays at 8 warps (16 spill registers); int4 with zero points holds fewer warps
    lin = _linear(_weight("sp4", 4096, 2048, 64, True, _rng(9)))
    v, _ = cs.variant_for(lin, get_target("h100"), ShapeHints(), None, "cuda.nm24_int4_mma_sp", "sp4", True, 64)
    assert (v.cfg("gemv")["warps"], v.cfg("gemv")["warps2"]) == (16, 8)
    # 11008 rows = 344 blocks: three 8-warp blocks an SM (budget 24) run them in one wave; with zero points (budget 16)
    # two do not, four 4-warp blocks do
    assert cs.default_config("dq4", "sm_90a", 11008, 4096)["gemv"]["warps"] == 8
    assert cs.default_config("dq4", "sm_90a", 11008, 4096, asym=True)["gemv"]["warps"] == 4
    # K = 256: 2 chunks of 4 k32 steps a row tile -> the smallest choice, 4 warps (16 would leave 14 idle)
    assert cs.gemv_chunks("sp4", 256) == 2 and pick(4096, "h100", k=256)[1].cfg("gemv")["warps"] == 4
    assert all(cs.gemv_auto_warps(b, 4096, 2, 132, nck) == min(16, max(4, nck)) for b in (12, 16, 24, 32)
               for nck in (1, 4, 8, 16, 64))  # fmt: skip
    lin, v, tuned = pick(5120, "h100")
    assert not tuned and v.cfg("gemv") == cs.default_config("sp4", "sm_90a", 5120, 2048)["gemv"]
    # 2:4 + int4 stages its activations in both kernels with >= 8 warps at M <= 8 (and with 4 row tiles a warp, as
    # 11008 / 14336 rows get), else only at M > 8
    for n, xs in ((4096, 3), (11008, 3), (14336, 3), (5120, 3), (8192, 3)):
        g = cs.default_config("sp4", "sm_90a", n, 4096)["gemv"]
        assert g["xs"] == xs and cs.gemv_xs(g, 1) == (xs == 3) and cs.gemv_xs(g, 2), (n, g)
        v = cs.Variant.make("sp4", False, 128, dict(cs.default_config("sp4"), gemv=g))
        assert v.kernel_names()["gemv1"].endswith("_og") and ("_x_" in v.kernel_names()["gemv1"]) == (xs == 3)
        assert "_x_og" in v.kernel_names()["gemv2"]
        assert cs._gemv_smem(g, 1, "sp4", False, 128) == (g["warps"] * cs.gemv_rt(g, 1) * 4 * 128
                                                          + (g["warps"] * 2 * 8 * 272 if xs == 3 else 0))
    assert cs.default_config("sp16", "sm_90a", 4096, 4096)["gemv"]["xs"] == 0
    # the two token-tile kernels: their own warps in the kernel names, the launch and the host table (4096 rows:
    # 16 warps at M <= 8, 8 at M > 8)
    _, v4096, _ = pick(4096, "h100")
    c = v4096.cfg("gemv")
    assert c["warps2"] != c["warps"] and f"_nt2_w{c['warps2']}_" in v4096.kernel_names()["gemv2"]
    assert f"_nt1_w{c['warps']}_" in v4096.kernel_names()["gemv1"]
    assert cs.gemv_launch("sp4", 4096, 2048, 16, c, 132)["threads"] == 32 * c["warps2"]
    assert cs.gemv_launch("sp4", 4096, 2048, 8, c, 132)["threads"] == 32 * c["warps"]
    assert f"{32 * c['warps']}, {32 * c['warps2']}, {c['rt']}, {c['rt']}, " in cs.render_host_source([v4096], "x.fatbin", "sym")
    assert f"gemv_body<sparsec::KIND_SP4, 2, {c['warps2']}," in cs.render_device_source([v4096])
    db = TuningDB()
    db.record("cuda.nm24_int4_mma_sp", "h100", dict(linear_key(lin, ShapeHints()), act_dtype="float16"),
              {"gemv": {"warps": 16, "rt": 1, "u": 1, "ks": 1}})  # fmt: skip
    _, v, tuned = pick(5120, "h100", db)
    assert tuned and v.cfg("gemv")["warps"] == 16 and v.cfg("gemv")["rt"] == 1
    assert cs.gemv_warps(v.cfg("gemv"), 2) == 16  # an entry without warps2: the same warps for both kernels

    # the tuner: every job's own untuned GEMV config is a candidate of its group (and is what it is compared with)
    jobs = [ct.Job("cuda.nm24_int4_mma_sp", "sp4", False, 64, "2:4+int4", SimpleNamespace(weight=np.empty((n, 2048))), {})
            for n in (4096, 5120, 14336)]  # fmt: skip
    gemv = [v.cfg("gemv") for v in ct.variants_for(jobs, "sm_90a", 3, 0)[("sp4", False, 64)]["gemv"]]
    assert gemv[0] == cs.default_config("sp4", "sm_90a")["gemv"]
    for j in jobs:
        assert cs.default_config("sp4", "sm_90a", j.n, j.k)["gemv"] in gemv
    assert len(gemv) == len({tuple(sorted(c.items())) for c in gemv})


def test_one_group_gemv_kernel_is_chosen_by_group_size():
    """int4 kinds whose quantization groups hold whole 64-column chunks get the kernel that scales after the MMAs
    ("_og" instances, OG = true), unless the config says "og": 0; other group sizes and 2:4 fp16 keep the other one.
    Its numbers: the GPU checks of bench_cuda.py --decode (float64 reference) and bench/cuda_e2e.py (g64 / g128)."""
    for kind, gs, og in (("sp4", 64, True), ("sp4", 128, True), ("sp4", 32, False), ("sp4", 16, False),
                         ("dq4", 128, True), ("dq4", 64, True), ("dq4", 32, False), ("sp16", 0, False)):  # fmt: skip
        for asym in ((False,) if kind == "sp16" else (False, True)):
            for flag in (1, 0):
                c = dict(cs.default_config(kind), gemv=dict(cs.default_config(kind)["gemv"], og=flag))
                v = cs.Variant.make(kind, asym, gs, c)
                want = og and flag == 1
                assert cs.gemv_one_group(kind, gs, v.cfg("gemv")) == want
                names = v.kernel_names()
                assert all(names[p].endswith("_og") == want for p in ("gemv1", "gemv2"))
                src = cs.render_device_source([v])
                for nt in (1, 2):
                    line = next(ln for ln in src.splitlines() if re.search(rf"gemv_body<sparsec::KIND_\w+, {nt},", ln))
                    xs = "true" if kind == "sp4" else "false"  # 2:4 + int4 stages its activations by default
                    assert line.rstrip().endswith(f"{'true' if want else 'false'}, 0, {xs}, 1>(X, Wv, Wm, Sc, Zb, Y, Ws, Cnt, M, N, K, T, G, GS);")
    assert not cs.gemv_valid(dict(cs.default_config("sp4")["gemv"], og=2))


def test_shipped_h100_gemv_entries_are_valid_configs():
    """golden/tuning/h100.json: every entry's GEMV config is valid, its two token-tile kernels have at most 16 warps,
    and 2:4 + int4 entries with zero points keep the M > 8 kernel at <= 8 warps (16 spill registers)."""
    import json
    from pathlib import Path

    entries = json.loads((Path(cs.__file__).resolve().parents[2] / "golden" / "tuning" / "h100.json").read_text())["entries"]
    seen = 0
    for e in entries:
        kind = {"cuda.nm24_mma_sp": "sp16", "cuda.nm24_int4_mma_sp": "sp4", "cuda.int4_dequant_mma": "dq4"}.get(e["kernel"])
        if kind is None or "gemv" not in e["config"]:
            continue
        v = cs.Variant.make(kind, not e["key"].get("symmetric", True), e["key"].get("group_size", 0), e["config"])
        c = v.cfg("gemv")
        assert cs.gemv_valid(c) and cs.gemv_warps(c, 1) <= 16 and cs.gemv_warps(c, 2) <= 16, e
        if kind == "sp4" and not e["key"].get("symmetric", True):
            assert cs.gemv_warps(c, 2) <= cs.GEMV_MAX_WARPS[("sp4", 2)], e
        seen += 1
    assert seen >= 3


def test_gemv_split_config_search_and_fallback():
    """ks is part of the GEMV search space and of the default; a stored config with an impossible split count falls
    back to the default GEMV; different split counts are different exported functions sharing one kernel."""
    from sparsec.backends.kernels.registry import ShapeHints
    from sparsec.backends.targets import get_target
    from sparsec.backends.tune import TuningDB
    from sparsec.backends.kernels.registry import linear_key

    sp = cs.search_space("sp4")["gemv"]
    assert {c["ks"] for c in sp} == set(cs.GEMV_KS) and "ks" in cs.default_config("sp4")["gemv"]
    assert not cs.gemv_valid({"warps": 8, "rt": 2, "u": 1, "ks": cs.GEMV_MAX_KS + 1})
    lin = _linear(_weight("sp16", 64, 128, 0, False, _rng(5)))
    db = TuningDB()
    db.record("cuda.nm24_mma_sp", "h100", dict(linear_key(lin, ShapeHints()), act_dtype="float16"),
              {"gemv": {"warps": 4, "rt": 1, "u": 2, "ks": 99}})  # fmt: skip
    v, tuned = cs.variant_for(lin, get_target("h100"), ShapeHints(), db, "cuda.nm24_mma_sp", "sp16", False, 0)
    assert not tuned and v.cfg("gemv") == cs.default_config("sp16", "sm_90a", 64, 128)["gemv"]
    a = cs.Variant.make("sp4", False, 64, dict(cs.default_config("sp4"), gemv={"warps": 8, "rt": 2, "u": 1, "ks": 1}))
    b = cs.Variant.make("sp4", False, 64, dict(cs.default_config("sp4"), gemv={"warps": 8, "rt": 2, "u": 1, "ks": 4}))
    assert a.func_name != b.func_name and a.kernel_names()["gemv1"] == b.kernel_names()["gemv1"]
    host = cs.render_host_source([a, b], "x.fatbin", "sym")
    assert f"{8 * 32}, 2, 2, 1, " in host and f"{8 * 32}, 2, 2, 4, " in host  # gemv_threads2, gemv_rt, gemv_rt2, gemv_ks
    # row groups ("wr", "wr2"): the rows a block of each kernel owns, the kernels' names and template arguments
    g = cs.Variant.make("sp4", False, 64, dict(cs.default_config("sp4"),
                                               gemv={"warps": 16, "rt": 2, "u": 1, "ks": 1, "xs": 3, "wr2": 4}))
    assert f"{16 * 32}, 2, 8, 1, " in cs.render_host_source([g], "x.fatbin", "sym")
    assert "_r2_g4_" in g.kernel_names()["gemv2"] and "_r2_u1" in g.kernel_names()["gemv1"]
    assert "KIND_SP4, 2, 16, 2, 1, false, 0, true, 0, true, 4>" in cs.render_device_source([g])
    assert not cs.gemv_valid({"warps": 16, "rt": 2, "u": 1, "ks": 1, "xs": 1, "wr2": 2})  # row groups need xs
    assert cs.gemv_valid({"warps": 16, "rt": 2, "u": 1, "ks": 1, "xs": 3, "wr": 8, "wr2": 1})
    assert not cs.gemv_valid({"warps": 4, "rt": 2, "u": 1, "ks": 1, "xs": 3, "wr": 8})  # more row groups than warps


# ------------------------------------------------------------------------------------------------ GPU
LLM = [(4096, 4096), (11008, 4096), (4096, 11008)]
REF = [(128, 128), (352, 128), (128, 352), (256, 128), (128, 64), (64, 128), (10, 64)]


def _on_gpu(torch, kind, w):
    """The kernel's prepared weight arrays on the GPU (uint32 words as int32) and the weight as float64."""
    ws = [torch.from_numpy(a.view(np.int32) if a.dtype == np.uint32 else a).cuda() for a in cs.prepare(kind, w)]
    return ws, torch.from_numpy(w.materialize()).cuda().double()


def _call_checked(torch, f, x, ws, ref, what):
    """``f(x, *ws, y)`` into a NaN-poisoned ``y``: every output written and within 1e-2 of the float64 ``ref``."""
    y = torch.full((x.shape[0], ref.shape[1]), float("nan"), device="cuda", dtype=torch.float16)
    f(x, *ws, y)
    torch.cuda.synchronize()
    assert not torch.isnan(y).any(), f"{what}: unwritten outputs"
    rel = float((y.double() - ref).norm() / ref.norm())
    assert rel <= 1e-2, f"{what}: relative error {rel:.3e} (seed {SEED})"
    return y


def _gpu():
    """torch, tvm_ffi and the local GPU's arch (sm_90a on a Hopper); skips without a CUDA GPU."""
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")
    tvm_ffi = pytest.importorskip("tvm_ffi")
    cap = torch.cuda.get_device_capability()
    return torch, tvm_ffi, "sm_90a" if cap == (9, 0) else f"sm_{cap[0]}{cap[1]}"


def _gpu_lib(tmp_path_factory, name: str, variants, archs):
    """Build `variants` into one library for the GPU tests and load it, or load `$SPARSEC_CUDA_TEST_LIBS/<name>.so`
    when that folder is set: the GPU machine may lack g++, so bench/gpu_test_libs.py builds these libraries elsewhere
    from the same variant lists (GPU_TEST_LIBS). A prebuilt library missing a kernel fails the test."""
    import tvm_ffi

    pre = os.environ.get("SPARSEC_CUDA_TEST_LIBS")
    if pre:
        path = os.path.join(pre, f"{name}.so")
        assert os.path.exists(path), f"{path}: not built (python bench/gpu_test_libs.py --out {pre})"
    else:
        from sparsec.backends.kernels.cuda_compile import build_shared

        path = str(tmp_path_factory.mktemp(name) / "k.so")
        build_shared(list({v.func_name: v for v in variants}.values()), archs, path)
    return tvm_ffi.load_module(path)


def _ref_variants(arch):
    """Every kind's default config at every group size (the float64 reference and CUDA-graph tests)."""
    variants = {}
    for kind, asym in KIND_ASYM:
        for gs in ({0} if kind == "sp16" else {16, 32, 64, 128}):
            variants[(kind, asym, gs)] = cs.Variant.make(kind, asym, gs, cs.default_config(kind, arch))
    return variants


@pytest.fixture(scope="module")
def gpu_lib(tmp_path_factory):
    torch, tvm_ffi, arch = _gpu()
    variants = _ref_variants(arch)
    return torch, _gpu_lib(tmp_path_factory, "ref", variants.values(), [arch]), variants


def _ws_variants():
    """Every warp-specialized GEMM config of the search space (sm_90a 2:4 fp16)."""
    base = cs.default_config("sp16")
    return [cs.Variant.make("sp16", False, 0, dict(base, gemm=c, small_max=16)) for c in WS_CONFIGS]


def _dq16_variants():
    """int4 / int8 dequantize + ws prefill, by tensor map (wmap 1) and by bulk copies (0), zero points or not."""
    return {(k, a, wm): cs.Variant.make(k, a, 64, dict(_dq16_config(k, wm), small_max=16))
            for k in ("sp4", "dq4", "dq8", "sp8") for a in (False, True) for wm in (1, 0)}  # fmt: skip


SPLIT_SHAPES = [(40, 1184), (352, 352), (4096, 11008)]


def _split_variants(arch):
    """Fixed split-K 2, 3, 8 and auto (0) decode GEMVs of every kind on shapes the splits do not divide."""
    variants = {}
    for kind, asym in KIND_ASYM:
        for n, k in SPLIT_SHAPES:
            gs = _gs_for(kind, k)
            for ks in (0, 2, 3, 8):
                cfg = dict(cs.default_config(kind, arch), gemv=dict(cs.default_config(kind)["gemv"], ks=ks))
                variants[(kind, asym, n, k, ks)] = cs.Variant.make(kind, asym, gs, cfg)
    return variants


# name -> (variants for an arch, the archs it is built for given the GPU's arch): what bench/gpu_test_libs.py prebuilds
GPU_TEST_LIBS = {
    "ref": (lambda arch: list(_ref_variants(arch).values()), lambda arch: [arch]),
    "ws": (lambda arch: _ws_variants(), lambda arch: ["sm_90a"]),
    "dq16w": (lambda arch: list(_dq16_variants().values()), lambda arch: ["sm_90a"]),
    "split": (lambda arch: list(_split_variants(arch).values()), lambda arch: [arch]),
}


def _gs_for(kind, k):
    if kind == "sp16":
        return 0
    cols = k if kind in cs.DENSE_KINDS else k // 2
    return next(g for g in (128, 64, 32, 16) if cols % g == 0)


@pytest.mark.gpu
@pytest.mark.parametrize("kind,asym", KIND_ASYM)
@pytest.mark.parametrize("n,k", LLM + REF)
def test_kernel_matches_float64_reference(gpu_lib, kind, asym, n, k):
    torch, lib, variants = gpu_lib
    gs = _gs_for(kind, k)
    rng = _rng(hash((kind, asym, n, k)) % 2**31)
    w = _weight(kind, n, k, gs, asym, rng)
    ws, wref = _on_gpu(torch, kind, w)
    f = lib[variants[(kind, asym, gs)].func_name]
    for m in (1, 16, 128, 2048, 8192, 5, 37):
        x = torch.randn(m, k, device="cuda", dtype=torch.float16)
        _call_checked(torch, f, x, ws, x.double() @ wref.T, f"{kind} asym={asym} {n}x{k} M={m}")


@pytest.mark.gpu
def test_graph_captured_on_a_fresh_stream_runs_unsplit_and_correct(gpu_lib):
    """A CUDA graph captured on a stream before its first call cannot allocate the split-K workspace or the int4
    prefill scratch: the captured calls run the unsplit GEMV, the whole-tile GEMM and the int4 GEMM instead of failing,
    and the replayed graph matches float64. The same calls on a warmed-up stream take the split paths (H100/A100)."""
    torch, lib, variants = gpu_lib
    cases = [("sp16", 4096, 11008, 1, 0),  # decode GEMV, automatic split-K
             ("sp16", 4096, 4096, 256, 0),  # 32 tiles of 256x128: the tail split on sm_90a
             ("sp4", 4096, 4096, 512, 128), ("dq4", 4096, 4096, 512, 128),  # the int4 prefill ("dq16" on sm_90a)
             ("dq8", 4096, 4096, 512, 128), ("dq8", 4096, 11008, 1, 32),
             ("sp8", 4096, 4096, 512, 128), ("sp8", 4096, 11008, 1, 32)]
    for kind, n, k, m, gs in cases:
        f = lib[variants[(kind, False, gs)].func_name]
        w = _weight(kind, n, k, gs, False, _rng(n + k + m))
        ws, wref = _on_gpu(torch, kind, w)
        x = torch.randn(m, k, device="cuda", dtype=torch.float16)
        ref = x.double() @ wref.T
        _call_checked(torch, f, x[:1], ws, ref[:1], f"{kind} warm-up (module load)")  # default stream, M = 1
        y = torch.full((m, n), float("nan"), device="cuda", dtype=torch.float16)
        g, s = torch.cuda.CUDAGraph(), torch.cuda.Stream()
        with torch.cuda.graph(g, stream=s):
            f(x, *ws, y)
        y.fill_(float("nan"))
        g.replay()
        torch.cuda.synchronize()
        rel = float((y.double() - ref).norm() / ref.norm())
        assert not torch.isnan(y).any() and rel <= 1e-2, f"{kind} {n}x{k} M={m} captured: {rel:.3e}"
        s2 = torch.cuda.Stream()
        with torch.cuda.stream(s2):  # a fresh stream outside capture: allocates and takes the split paths
            _call_checked(torch, f, x, ws, ref, f"{kind} {n}x{k} M={m} eager")


def _unit_gain_weight(kind, n, k, gs, rng):
    """A random weight of the kind whose products keep the activations' scale (row norms ~1): a chain of six layers
    stays far from fp16 overflow (_weight's grow ~45x a layer at K = 4096)."""
    if kind == "sp16":
        return _nm24(rng, n, k, (rng.standard_normal((n, k // 2)) / np.sqrt(k / 2)).astype(np.float32))
    bits = 8 if kind in cs.INT8_KINDS else 4
    cols = k if kind in cs.DENSE_KINDS else k // 2
    code_std = np.sqrt(((1 << bits) ** 2 - 1) / 12)  # codes uniform over 0 .. 2^bits - 1, zero point 2^(bits-1)
    codes = rng.integers(0, 1 << bits, size=(n, cols), dtype=np.uint8)
    scales = np.full((n, cols // gs), 1.0 / (code_std * np.sqrt(cols)), np.float16)
    gq = GroupQuant.from_codes(codes, scales, None, bits, gs)
    return gq if kind in cs.DENSE_KINDS else _nm24(rng, n, k, gq)


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["sp16", "sp4", "dq4", "dq8", "sp8"])
def test_gemv_chain_with_programmatic_dependent_launch(gpu_lib, kind):
    """GEMVs launched back to back, each reading the previous one's output (the read-after-write PDL must respect:
    griddepcontrol.wait), eagerly and replayed from a CUDA graph: every step within 1e-2 of float64 of its own input,
    and bitwise the same as with plain launches (SPARSEC_CUDA_PDL=0)."""
    torch, lib, variants = gpu_lib
    gs = _gs_for(kind, 4096)
    f = lib[variants[(kind, False, gs)].func_name]
    ws, wref = _on_gpu(torch, kind, _unit_gain_weight(kind, 4096, 4096, gs, _rng(4096 + len(kind))))
    for m in (1, 16):
        outs = {}
        for mode in ("pdl", "plain"):
            old = os.environ.pop("SPARSEC_CUDA_PDL", None)
            if mode == "plain":
                os.environ["SPARSEC_CUDA_PDL"] = "0"
            try:
                for how in ("eager", "graph"):
                    bufs = [torch.randn(m, 4096, device="cuda", dtype=torch.float16, generator=torch.Generator("cuda").manual_seed(m))]
                    bufs += [torch.full((m, 4096), float("nan"), device="cuda", dtype=torch.float16) for _ in range(6)]
                    calls = [(lambda j=j: f(bufs[j], *ws, bufs[j + 1])) for j in range(6)]
                    if how == "eager":
                        for c in calls:
                            c()
                    else:
                        g, s_ = torch.cuda.CUDAGraph(), torch.cuda.Stream()
                        with torch.cuda.graph(g, stream=s_):
                            for c in calls:
                                c()
                        for b in bufs[1:]:
                            b.fill_(float("nan"))
                        g.replay()
                    torch.cuda.synchronize()
                    for j in range(6):
                        ref = bufs[j].double() @ wref.T
                        rel = float((bufs[j + 1].double() - ref).norm() / ref.norm())
                        assert not torch.isnan(bufs[j + 1]).any() and rel <= 1e-2, (kind, m, mode, how, j, rel)
                    outs[(mode, how)] = [b.clone() for b in bufs[1:]]
            finally:
                os.environ.pop("SPARSEC_CUDA_PDL", None)
                if old is not None:
                    os.environ["SPARSEC_CUDA_PDL"] = old
        for key, got in outs.items():
            for a, b in zip(got, outs[("plain", "eager")]):
                assert torch.equal(a.view(torch.int16), b.view(torch.int16)), (kind, m, key)


# ------------------------------------------------------------------------------------------------ warp-specialized (CI)
# The Hopper warp-specialized TMA GEMM (sparsec_mma.cuh gemm_ws_body, configs with "ws": 1), the sm_90a default of the
# 2:4 fp16 large GEMM since bench/bench_gemm_v2.py measured it on an H100 (bench/results/cuda_gemm_v2.md). Here (no
# GPU): its configs, shared-memory layout, TMA descriptor parameters, ptxas resources and instructions.
WS_CONFIGS = cs.ws_search_space("sp16", "sm_90a")


def test_ws_configs_only_for_sm90a_sp16():
    assert WS_CONFIGS and all(c.get("ws") == 1 for c in WS_CONFIGS)
    assert all(c in cs.search_space("sp16", "sm_90a")["gemm"] for c in WS_CONFIGS)
    for arch in ("sm_80", "sm_86", "sm_90"):
        assert not any(c.get("ws") for c in cs.search_space("sp16", arch)["gemm"])
        for c in WS_CONFIGS:
            assert not cs.gemm_valid("sp16", c, False, arch)
            assert "sm_90a" in cs.ws_config_error("sp16", c, arch)
    for kind in ("sp4", "dq4"):
        assert not any(c.get("ws") for c in cs.search_space(kind, "sm_90a")["gemm"])
        assert "sp16" in cs.ws_config_error(kind, WS_CONFIGS[0], "sm_90a")
    # the large-GEMM default is warp-specialized on sm_90a only (other archs, other kinds: mma.sp)
    assert cs.default_config("sp16", "sm_90a")["gemm"] in WS_CONFIGS
    for kind, arch in [("sp16", "sm_80"), ("sp16", "sm_90"), ("sp4", "sm_90a"), ("dq4", "sm_90a")]:
        cfg = cs.default_config(kind, arch)
        assert not any(c.get("ws") for c in cfg.values() if isinstance(c, dict))
        assert cs.gemm_valid(kind, cfg["gemm"], True, arch)


def test_a_tuned_tile_does_not_inherit_the_default_kernel_family():
    """Variant.make fills a partial config from the default; a config naming its own tile (a tuning-DB entry for
    mma.sp) must not pick up the sm_90a default's ``ws`` flag, and a ws entry keeps its own flags."""
    mma = {"bm": 256, "bn": 128, "bk": 128, "wm": 4, "wn": 2, "stages": 3}
    v = cs.Variant.make("sp16", False, 0, {"gemm": mma})
    assert v.cfg("gemm") == dict(mma, group=16) and "ws" not in v.kernel_names()["gemm"]
    w = next(c for c in WS_CONFIGS if c.get("persistent"))
    assert cs.Variant.make("sp16", False, 0, {"gemm": w}).cfg("gemm") == w
    assert cs.Variant.make("sp16", False, 0, {"gemm": {"stages": 4}}).cfg("gemm") == dict(
        cs.default_config("sp16")["gemm"], stages=4)  # a partial override keeps the default's family


def test_shipped_h100_db_picks_the_warp_specialized_gemm_for_llm_shapes():
    """golden/tuning/h100.json's 2:4 fp16 entries of the LLM shapes carry the GEMM bench_gemm_v2.py measured fastest
    (warp-specialized); a build for h100 uses it, one for a100 falls back to an mma.sp tile that fits sm_80."""
    from sparsec.backends.kernels.registry import ShapeHints, select_kernel
    from sparsec.backends.targets import get_target
    from sparsec.backends.tune import TuningDB

    lin = _linear(_weight("sp16", 4096, 4096, 0, False, _rng(7)))
    impl = select_kernel(lin, get_target("h100"), ShapeHints(), TuningDB.for_target("h100"))
    assert impl.tuned and impl.config["gemm"].get("ws") == 1 and cs.gemm_valid("sp16", impl.config["gemm"], False, "sm_90a")
    impl = select_kernel(lin, get_target("a100"), ShapeHints(), TuningDB.for_target("a100"))
    assert not impl.config["gemm"].get("ws") and cs.gemm_valid("sp16", impl.config["gemm"], False, "sm_80")
    # a tile whose accumulators do not fit, too many stages for the shared memory
    assert "accumulator" in cs.ws_config_error("sp16", dict(WS_CONFIGS[0], bm=256, bn=256, wm=4), "sm_90a")
    assert "shared memory" in cs.ws_config_error("sp16", dict(WS_CONFIGS[0], bm=128, bn=256, bk=64, stages=6), "sm_90a")
    assert "persistent" in cs.ws_config_error("sp16", dict(WS_CONFIGS[0], persistent=1, cluster=2), "sm_90a")
    assert {(c.get("persistent", 0), c.get("cluster", 1)) for c in WS_CONFIGS} == {(0, 1), (1, 0 + 1), (0, 2)}


def test_ws_variant_for_sm80_is_rejected_by_the_build():
    from sparsec.backends.kernels.cuda_compile import check_archs
    from sparsec.compressor.errors import BuildError

    v = cs.Variant.make("sp16", False, 0, dict(cs.default_config("sp16"), gemm=WS_CONFIGS[0]))
    check_archs([v], ["sm_90a"])
    with pytest.raises(BuildError, match="sm_90a"):
        check_archs([v], ["sm_80"])
    # a stored ws tuning entry falls back to the default on an A100 target
    from sparsec.backends.kernels.registry import ShapeHints, select_kernel
    from sparsec.backends.targets import get_target

    lin = _linear(_weight("sp16", 64, 128, 0, False, _rng(5)))
    impl = select_kernel(lin, get_target("a100"), ShapeHints(config={"gemm": WS_CONFIGS[0]}))
    assert not impl.config["gemm"].get("ws") and not impl.tuned
    impl = select_kernel(lin, get_target("h100"), ShapeHints(config={"gemm": WS_CONFIGS[0]}))
    assert impl.config["gemm"] == WS_CONFIGS[0]


def _tma_swizzle128(offset: np.ndarray) -> np.ndarray:
    """Shared-memory byte offset of a TMA SWIZZLE_128B write (CUDA programming guide, TMA swizzle: the 16-byte chunk
    index, bits 4-6 of the offset, is XORed with the 128-byte row index modulo 8, bits 7-9) for a 1024-aligned box."""
    return offset ^ (((offset >> 7) & 7) << 4)


@pytest.mark.parametrize("c", WS_CONFIGS, ids=lambda c: f"{c['bm']}x{c['bn']}x{c['bk']}s{c['stages']}")
def test_tma_params_match_the_ws_smem_layout(c):
    rng = _rng(6)
    lay = cs.ws_layout(c)
    m, k = int(rng.integers(129, 9000)), 32 * int(rng.integers(1, 400))
    t = cs.tma_x_params(c, m, k)
    assert t["global_dim"] == (k, m) and t["global_strides"] == (2 * k,) and t["global_strides"][0] % 16 == 0
    assert t["box_dim"][0] * 2 == 128 and t["swizzle"] == cs.TMA_SWIZZLE_128B  # inner box = the 128-byte swizzle span
    cl = c.get("cluster", 1)
    assert t["box_dim"][1] * cl == c["bn"] <= 256 and t["element_strides"] == (1, 1) and t["cluster"] == cl
    assert t["boxes_per_stage"] * 64 == c["bk"] and t["box_bytes"] * cl == lay["atom_bytes"]
    # every stage delivers exactly the bytes the full barrier expects (TMA counts the whole box, OOB zeros included;
    # with a cluster of 2 each CTA multicasts its half of every atom into both)
    assert t["box_bytes"] * t["boxes_per_stage"] * cl == lay["x_bytes"]
    assert (t["box_dim"][1] * 128) % 1024 == 0  # the peer's half starts on a swizzle-pattern boundary
    assert lay["tx_bytes"] == lay["x_bytes"] + (c["bm"] // 16) * (lay["a_copy_bytes"] + lay["meta_copy_bytes"]) < 2**20
    assert lay["a_copy_bytes"] % 16 == 0 and lay["meta_copy_bytes"] % 16 == 0  # cp.async.bulk sizes
    # 128B-swizzle atoms start 1024-aligned (stage and atom strides), the data fits the arch, C fits the stages
    assert lay["stage_bytes"] % 1024 == 0 and lay["atom_bytes"] % 1024 == 0
    assert lay["smem"] == cs.gemm_smem_bytes("sp16", c, False) <= cs.SMEM_LIMIT["sm_90a"]
    assert c["stages"] * lay["stage_bytes"] + lay["bar_bytes"] + 1024 <= lay["smem"] and 16 * c["stages"] <= lay["bar_bytes"]
    if c.get("persistent"):  # C after the stages: the producer fills stages during the epilogue
        assert lay["c_offset"] == c["stages"] * lay["stage_bytes"] and lay["smem"] >= 1280 + lay["c_offset"] + lay["c_bytes"]
    else:  # C reuses the stage memory
        assert lay["c_offset"] == 0 and lay["c_bytes"] <= lay["smem"] - 1280
    # TMA's swizzled placement of box row r, k chunk ch == the layout the wgmma descriptor (sw128_desc) reads, which is
    # the layout the measured cp.async path writes: chunk ch of row r at (r * 8 + (ch ^ (r & 7))) * 16
    r = np.arange(c["bn"])[:, None]
    ch = np.arange(8)[None, :]
    tma = _tma_swizzle128(r * 128 + ch * 16)
    np.testing.assert_array_equal(tma, (r * 8 + (ch ^ (r & 7))) * 16)
    with pytest.raises(ValueError):
        cs.tma_x_params(c, m, 36)  # row stride 72 B: not a multiple of 16


def _tma_tiled_box(buf: np.ndarray, t: dict, coords: tuple[int, ...]) -> np.ndarray:
    """What a TMA tiled-mode copy (no swizzle, no interleave) writes to shared memory: the box at ``coords`` of the
    tensor ``t`` (dims and byte strides as cuTensorMapEncodeTiled takes them, 8-byte elements) over the global bytes
    ``buf``, dimension 0 fastest; elements outside the tensor are zero (OOB fill NONE)."""
    esize = 8
    assert t["data_type"] == cs.TMA_UINT64 and t["swizzle"] == cs.TMA_SWIZZLE_NONE and t["oob_fill"] == cs.TMA_OOB_ZERO
    strides = (esize,) + tuple(t["global_strides"])
    out = np.zeros(tuple(reversed(t["box_dim"])) + (esize,), dtype=np.uint8)
    for idx in np.ndindex(*reversed(t["box_dim"])):
        g = [c + i for c, i in zip(coords, reversed(idx))]
        if all(0 <= v < d for v, d in zip(g, t["global_dim"])):
            off = sum(v * st for v, st in zip(g, strides))
            out[idx] = buf[off:off + esize]
    return out.reshape(-1)


WMAP_CONFIGS = [c for c in WS_CONFIGS if c.get("wmap")] + [dict(cs.DQ16_GEMM["dq4"], wmap=1)]


@pytest.mark.parametrize("c", WMAP_CONFIGS, ids=cs.ws_tag)
def test_weight_tensor_maps_deliver_the_bulk_copies_bytes(c):
    """A "wmap" stage's two TMA boxes (tma_w_params) write the bytes the 2 x BM/16 cp.async.bulk copies of the other
    configs write, where they write them (WsCfg's stage layout), for every row-tile block and k tile of a weight with
    a row tail; row tiles past the weight are zeros (the bulk path clamps them to the last one; never stored), and
    each box is exactly the stage's A / metadata bytes (the full barrier's expect_tx is unchanged)."""
    rng = _rng(17)
    lay = cs.ws_layout(c)
    dense = bool(c.get("dense"))
    n, k = 16 * int(rng.integers(2, 20)) + int(rng.integers(1, 16)) + c["bm"], 128 * int(rng.integers(1, 4))
    n_rt, t = -(-n // 16), k // 32
    step = cs.ws_a_step(c)
    if dense:  # the int4 prefill's converted A: T x 1024 bytes per row tile (any bytes do for the copy)
        wv, wm = rng.integers(0, 256, size=n_rt * t * step, dtype=np.uint8), None
    else:
        arrays = cs.prepare("sp16", _weight("sp16", n, k, 0, False, rng))
        wv, wm = arrays[0].view(np.uint8).reshape(-1), arrays[1].view(np.uint8).reshape(-1)
        assert wv.size == -(-n // 16) * t * step and wm.size == n_rt * (t // 2) * 128  # prepare's layout
    maps = cs.tma_w_params(c, n_rt, t)
    assert set(maps) == ({"a"} if dense else {"a", "meta"})
    for m in maps.values():  # cuTensorMapEncodeTiled's limits: strides multiples of 16, boxes <= 256, 16-byte rows
        assert all(s % 16 == 0 for s in m["global_strides"]) and all(0 < b <= 256 for b in m["box_dim"])
        assert m["box_dim"][0] * 8 % 16 == 0 and m["box_dim"][0] == m["global_dim"][0]
    steps, rts = c["bk"] // 32, c["bm"] // 16
    assert np.prod(maps["a"]["box_dim"]) * 8 == lay["a_bytes"]
    if not dense:
        assert np.prod(maps["meta"]["box_dim"]) * 8 == lay["meta_bytes"]
    for tm in range(-(-n_rt // rts)):
        for kt in range(t * 32 // c["bk"]):
            got = _tma_tiled_box(wv, maps["a"], (0, kt * maps["a"]["units_per_stage"], tm * rts)).reshape(rts, -1)
            for r in range(rts):  # the bulk copy of lane r: row tile r of the block, the stage's k32 steps
                rt = tm * rts + r
                want = (wv[rt * t * step + kt * steps * step:][: steps * step] if rt < n_rt
                        else np.zeros(steps * step, np.uint8))
                np.testing.assert_array_equal(got[r], want, err_msg=f"A block {tm} k tile {kt} row tile {r}")
            if dense:
                continue
            got = _tma_tiled_box(wm, maps["meta"], (0, kt * maps["meta"]["units_per_stage"], tm * rts)).reshape(rts, -1)
            for r in range(rts):
                rt = tm * rts + r
                mb = (steps // 2) * 128
                want = wm[rt * (t // 2) * 128 + kt * mb:][:mb] if rt < n_rt else np.zeros(mb, np.uint8)
                np.testing.assert_array_equal(got[r], want, err_msg=f"meta block {tm} k tile {kt} row tile {r}")


@pytest.mark.skipif(shutil.which("g++") is None, reason="no g++: the launcher's weight-map arithmetic cannot be compiled")
def test_weight_map_arithmetic_matches_the_launcher(tmp_path):
    """The launcher's ws_w_map (C++ rendered into every host source) gives tma_w_params' dims, strides and boxes."""
    rng = _rng(19)
    cases = [(c, int(nr), 4 * int(t)) for c in WMAP_CONFIGS for nr, t in zip(rng.integers(1, 900, 3), rng.integers(1, 120, 3))]
    calls = []
    for c, nr, t in cases:
        for meta in (0, 1) if not c.get("dense") else (0,):
            calls.append((c, nr, t, meta))
    (tmp_path / "t.cc").write_text(
        "#include <cstdint>\n#include <cstdio>\n" + cs._WS_WMAP_CXX + "int main() {\n"
        + "".join(f"  {{ uint64_t d[3], s[2]; unsigned b[3]; ws_w_map({nr}, {t}, {c['bm']}, {c['bk']}, {cs.ws_a_step(c)}, {meta}, d, s, b); "
                  'printf("%llu %llu %llu %llu %llu %u %u %u\\n", (unsigned long long)d[0], (unsigned long long)d[1], '
                  "(unsigned long long)d[2], (unsigned long long)s[0], (unsigned long long)s[1], b[0], b[1], b[2]); }\n"
                  for c, nr, t, meta in calls) + "}\n")  # fmt: skip
    r = subprocess.run(["g++", "-std=c++17", "-o", "t", "t.cc"], cwd=tmp_path, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    out = subprocess.run(["./t"], cwd=tmp_path, capture_output=True, text=True, check=True).stdout.split("\n")
    for (c, nr, t, meta), line in zip(calls, out):
        m = cs.tma_w_params(c, nr, t)["meta" if meta else "a"]
        assert [int(v) for v in line.split()] == [*m["global_dim"], *m["global_strides"], *m["box_dim"]], (c, nr, t, meta)


@pytest.mark.skipif(NVCC is None, reason="nvcc not on PATH: WsCfg cannot be compiled here")
def test_ws_layout_mirrors_the_device_config(tmp_path):
    """cuda_sparse.ws_layout (what the launcher and the smem attribute use) == WsCfg in sparsec_mma.cuh, compiled as
    host code by nvcc and printed; the search space and the dense configs the int4 prefill feeds ("dq16")."""
    configs = WS_CONFIGS + [cs.DQ16_GEMM["dq4"]]
    tf = lambda v: "true" if v else "false"  # noqa: E731
    lines = [f'  P({c["bm"]}, {c["bn"]}, {c["bk"]}, {c["stages"]}, {tf(c.get("persistent"))}, {c.get("cluster", 1)}, '
             f'{tf(c.get("tail"))}, {tf(c.get("dense"))});' for c in configs]  # fmt: skip
    (tmp_path / "t.cu").write_text(
        '#include "sparsec_mma.cuh"\n#include <cstdio>\n'
        "#define P(a, b, c, d, e, f, g, h) { using W = sparsec::WsCfg<a, b, c, d, e, f, g, h>; "
        "std::printf(\"%d %d %d %d %d %d %d %d %d\\n\", W::kSmem, W::kTxBytes, W::kStageBytes, W::kXBytes, W::kABytes, "
        "W::kMetaBytes, W::kThreads, W::kCOffset, W::kBoxRows); }\n"
        "int main() {\n" + "\n".join(lines) + "\n}\n")  # fmt: skip
    shutil.copyfile(cs.HEADER_PATH, tmp_path / cs.HEADER_PATH.name)
    r = subprocess.run([NVCC, "-std=c++17", "-I", str(tmp_path), "-o", "t", "t.cu"], cwd=tmp_path, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    out = subprocess.run([str(tmp_path / "t")], capture_output=True, text=True, check=True).stdout.split("\n")
    for c, line in zip(configs, out):
        lay = cs.ws_layout(c)
        want = [lay["smem"], lay["tx_bytes"], lay["stage_bytes"], lay["x_bytes"], lay["a_bytes"], lay["meta_bytes"], cs.WS_THREADS,
                lay["c_offset"], cs.tma_x_params(c, 1, 64)["box_dim"][1]]  # fmt: skip
        assert [int(v) for v in line.split()] == want, c


@pytest.fixture(scope="module")
def ws_compiled(tmp_path_factory):
    """The ws kernels compiled once for sm_90a: (variants, ptxas report, directory with kernels.cu and k.cubin)."""
    if NVCC is None:
        pytest.skip("nvcc/ptxas not on PATH: the warp-specialized kernels cannot be compiled here")
    from sparsec.backends.kernels.cuda_compile import ptxas_report

    d = tmp_path_factory.mktemp("ws")
    base = cs.default_config("sp16")
    variants = [cs.Variant.make("sp16", False, 0, dict(base, gemm=c)) for c in WS_CONFIGS]
    return variants, ptxas_report(variants, "sm_90a", str(d)), d


def test_ws_kernels_ptxas_and_instructions(ws_compiled):
    variants, rep, tmp_path = ws_compiled
    names = _ws_kernel_names(variants)
    assert any("_wst_" in n for n in names)  # the tail-split instantiations too
    for name in names:
        r = rep[name]
        # 384 threads, one block per SM: 168 registers at launch; setmaxnreg moves 128 of them per producer thread to
        # the consumers (40 / 232). No spills, and ptxas kept the wgmma pipeline (no C7514 serialization).
        assert 0 < r["registers"] <= 168 and r["spill_bytes"] == 0 and r["stack"] == 0, (name, r)
        assert r["wgmma_serialized"] == 0, name
    ptx = subprocess.run([NVCC, "-ptx", "-O3", "-std=c++17", "-I", str(tmp_path), "-arch=sm_90a", "-o", "-", "kernels.cu"],
                         cwd=tmp_path, capture_output=True, text=True)  # fmt: skip
    assert ptx.returncode == 0, ptx.stderr[-2000:]
    for ins in ("cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes",
                "cp.async.bulk.tensor.3d.shared::cluster.global.mbarrier::complete_tx::bytes",
                "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes", "mbarrier.arrive.expect_tx",
                "mbarrier.try_wait.parity", "fence.mbarrier_init", "setmaxnreg.dec.sync.aligned.u32 40",
                "setmaxnreg.inc.sync.aligned.u32 232", "wgmma.mma_async.sp.sync.aligned.m64n256k32",
                "wgmma.mma_async.sp.sync.aligned.m64n128k32", ".param .align 128 .b8", ".multicast::cluster",
                "mapa.shared::cluster.u32", "mbarrier.arrive.release.cluster.shared::cluster.b64", "barrier.cluster.wait",
                ".reqnctapercluster 2, 1, 1"):  # fmt: skip
        assert ins in ptx.stdout, ins


def _ws_kernel_names(variants) -> list[str]:
    """Every warp-specialized kernel of ``variants``: the large-GEMM kernel, and the tail-split one where there is."""
    names = {n for v in variants for p, n in v.kernel_names().items() if p in ("gemm", "gemm_tail")}
    return sorted(n for n in names if "_ws" in n)


def _cuda_tool(name: str) -> str | None:
    """``name`` on PATH, else from the pip wheels scripts/install.sh installs (nvidia-cuda-cuobjdump / -nvdisasm)."""
    found = shutil.which(name)
    if found:
        return found
    try:
        import nvidia
    except ImportError:
        return None
    for root in getattr(nvidia, "__path__", []):
        for sub in ("cu13/bin", "cuda_cuobjdump/bin", "cuda_nvdisasm/bin"):
            p = os.path.join(root, sub, name)
            if os.access(p, os.X_OK):
                return p
    return None


CUOBJDUMP, NVDISASM = _cuda_tool("cuobjdump"), _cuda_tool("nvdisasm")


@pytest.mark.skipif(CUOBJDUMP is None or NVDISASM is None,
                    reason="SASS check needs cuobjdump + nvdisasm (pip: nvidia-cuda-cuobjdump, nvidia-cuda-nvdisasm; "
                    "scripts/install.sh installs them on x86_64)")  # fmt: skip
def test_ws_kernels_sass_instructions(ws_compiled):
    variants, _, tmp_path = ws_compiled
    env = dict(os.environ, PATH=os.path.dirname(NVDISASM) + os.pathsep + os.environ.get("PATH", ""))
    sass = subprocess.run([CUOBJDUMP, "-sass", str(tmp_path / "k.cubin")], capture_output=True, text=True, check=True,
                          env=env).stdout  # fmt: skip
    for name in _ws_kernel_names(variants):
        body = sass.split(f"Function : {name}\n", 1)[1].split("Function : ", 1)[0]
        for op in ("UTMALDG.2D", "SYNCS.PHASECHK.TRANS64.TRYWAIT", "SYNCS.ARRIVE.TRANS64", "HGMMA.SP.64x",
                   "USETMAXREG.DEALLOC", "USETMAXREG.TRY_ALLOC", "WARPGROUP.DEPBAR.LE gsb0, 0x1"):  # fmt: skip
            assert op in body, (name, op)
        if name.split("_")[2].endswith("m"):  # "wmap": the weights by rank-3 TMA boxes, no bulk copies left
            assert "UTMALDG.3D" in body and "UBLKCP" not in body, name
        else:  # one cp.async.bulk per row tile and array
            assert "UBLKCP.S.G" in body and "UTMALDG.3D" not in body, name
        if "_wsc2_" in name:
            assert "UTMALDG.2D.MULTICAST" in body and "UCGABAR_WAIT" in body, name
        if "_wst_" in name:  # the tail split's partial tiles: count in, the last unit reads the others
            assert "ATOMG.E.ADD" in body and "MEMBAR" in body, name


@pytest.mark.skipif(shutil.which("g++") is None, reason="no g++: the C++ launchers cannot be compiled here")
def test_ws_launcher_compiles_with_tensor_map(tmp_path):
    from sparsec.backends.kernels.cuda_compile import _ffi_includes

    base = cs.default_config("sp16")
    fam = {}
    for c in WS_CONFIGS:  # the first config of each family: one tile per CTA, persistent, cluster of 2, tail split
        fam.setdefault((c.get("persistent", 0), c.get("cluster", 1), bool(c.get("tail")), c.get("wmap", 0)), c)
    variants = [cs.Variant.make("sp16", False, 0, dict(base, gemm=c)) for c in fam.values()]
    assert any(v.cfg("gemm").get("persistent") for v in variants) and any(v.cfg("gemm").get("cluster") for v in variants)
    assert any(v.cfg("gemm").get("tail") for v in variants)
    fat = tmp_path / "k.fatbin"
    fat.write_bytes(b"\0" * 64)
    src = cs.render_host_source(variants, str(fat), "sparsec_fatbin_test")
    for v in variants:
        c = v.cfg("gemm")
        t = cs.tma_x_params(c, 1, 64)
        assert (f'{{"{v.kernel_names()["gemm"]}", {cs.ws_layout(c)["smem"]}, 1, {t["box_dim"][0]}, {t["box_dim"][1]}, '
                f'{t["data_type"]}, {t["swizzle"]}, {t["l2_promotion"]}, {t["oob_fill"]}, {int(bool(c.get("persistent")))}, '
                f'{c.get("cluster", 1)}, {c.get("tail", 0)}, {c["bk"]}, '
                + (f'"{v.kernel_names()["gemm_tail"]}"' if c.get("tail") else "nullptr")
                + f', {cs.ws_a_step(c) if c.get("wmap") else 0}}}') in src  # fmt: skip
        assert f", {cs.WS_THREADS}, {c['bm']}, {c['bn']}, {c['group']}," in src
    assert any(v.cfg("gemm").get("wmap") for v in variants)
    assert '"cuTensorMapEncodeTiled"' in src and cs._WS_TAIL_CXX in src and cs._WS_WMAP_CXX in src
    (tmp_path / "host.cc").write_text(src)
    r = subprocess.run(["g++", "-std=c++17", "-O1", "-fPIC", "-fvisibility=hidden", *_ffi_includes(), "-c", "host.cc", "-o", "host.o"],
                       cwd=tmp_path, capture_output=True, text=True)  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]


@pytest.mark.gpu
def test_ws_kernel_matches_float64_reference(tmp_path_factory):
    """Every ws config against float64 on fresh random inputs with token, weight-row and K tails (H100 only)."""
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("needs an sm_90 GPU (H100/H200)")
    tvm_ffi = pytest.importorskip("tvm_ffi")
    variants = _ws_variants()
    lib = _gpu_lib(tmp_path_factory, "ws", variants, ["sm_90a"])
    # (272, 3808) M = 150: 4 tiles of 256x128, 30 k tiles: tail configs split each in 7 / 4 / 2 uneven, odd parts
    for (n, k), m in (((256, 256), 256), ((264, 320), 200), ((128, 2048), 300), ((16, 64), 130), ((4096, 4096), 2048),
                      ((272, 3808), 150), ((272, 3808), 150)):  # twice: the counters are left at 0 for the next call
        rng = _rng(n * 7 + k)
        w = _weight("sp16", n, k, 0, False, rng)
        ws, wref = _on_gpu(torch, "sp16", w)
        x = torch.randn(m, k, device="cuda", dtype=torch.float16)
        ref = x.double() @ wref.T
        for v in variants:
            _call_checked(torch, lib[v.func_name], x, ws, ref, f"{v.kernel_names()['gemm']} {n}x{k} M={m}")


@pytest.mark.gpu
def test_dq16_wmap_matches_float64_reference(tmp_path_factory):
    """The int4 / int8 prefill with the dequantized weight read by tensor maps ("wmap", the default) and by bulk copies,
    every kind, zero points or not, against float64, with row, token and K tails and a tail split run twice (H100
    only)."""
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("needs an sm_90 GPU (H100/H200)")
    tvm_ffi = pytest.importorskip("tvm_ffi")
    variants = _dq16_variants()
    lib = _gpu_lib(tmp_path_factory, "dq16w", variants.values(), ["sm_90a"])
    for (n, k), m in (((4096, 4096), 2048), ((1048, 1024), 300), ((272, 3840), 150), ((272, 3840), 150)):
        for (kind, asym, wm), v in variants.items():
            w = _weight(kind, n, k, 64, asym, _rng(n * 7 + k))
            ws, wref = _on_gpu(torch, kind, w)
            x = torch.randn(m, k, device="cuda", dtype=torch.float16)
            _call_checked(torch, lib[v.func_name], x, ws, x.double() @ wref.T, f"{kind} asym={asym} wmap={wm} {n}x{k} M={m}")


@pytest.mark.slow
def test_gemm_v2_driver_survives_a_hung_candidate(tmp_path):
    """bench/bench_gemm_v2.py device (CPU rehearsal, kernels emulated): a candidate whose smoke stage blocks forever
    is killed and marked, the run goes on and the other candidates are measured and checked."""
    pytest.importorskip("torch")
    import json
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    sys.path.insert(0, os.path.join(root, "bench"))
    try:
        import bench_gemm_v2 as bg
    finally:
        sys.path.pop(0)
    _, rows = bg.variants()
    pack, cache, out = tmp_path / "pack", tmp_path / "cache", tmp_path / "out"
    pack.mkdir()
    cache.mkdir()
    (pack / "manifest.json").write_text(json.dumps({"archs": ["sm_90a"], "variants": rows}))
    # the rehearsal's smoke shape is (264, 320): its weight file is a FIFO nobody writes -> the ws child blocks there
    os.mkfifo(cache / f"sp16_264x320_{10 * (264 + 3 * 320)}.npz")
    ws = list(dict.fromkeys(r["kernel"] for r in rows if r["ws"]))[:2]  # two kernels (a tail kernel: one row per "tail")
    env = dict(os.environ, SPARSEC_BENCH_DRYRUN="1")
    r = subprocess.run([sys.executable, os.path.join(root, "bench", "bench_gemm_v2.py"), "device", "--pack", str(pack), "--out",
                        str(out), "--cache", str(cache), "--set", "ws", "--only", *ws, "--smoke-timeout", "15",
                        "--budget-s", "150"], env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    res = json.loads((out / "cuda_gemm_v2.json").read_text())
    hung = [c for c in res["candidates"] if c["kernel"] in ws]
    assert {c["kernel"] for c in hung} == set(ws)
    fam = {}
    for c in hung:  # (on a very loaded machine the child may still be starting up when the smoke limit strikes)
        if fam.setdefault(c["family"], 0) < 3:  # the first three hangs of a family; after them the family is skipped
            assert c["status"] == "timeout (smoke)" and (c["stage"] or "start").startswith(("smoke 264x320", "start")), c
        else:
            assert c["status"] == "skipped (3 hangs in its family, none ok)", c
        fam[c["family"]] += 1
    default = [c for c in res["candidates"] if c["kernel"] not in ws]
    assert default and all(c["status"] == "ok" for c in default), default
    assert res["bench"] and all(b["path"] != "ws" for b in res["bench"]) and all(c["ok"] for c in res["checks"])
    assert res["baseline_start"]["run"]["status"] == "ok" and res["baseline_end"]["run"]["status"] == "ok"


@pytest.mark.gpu
def test_split_k_gemv_matches_float64_and_repeats_bitwise(tmp_path_factory):
    """Split-K decode GEMV (fixed ks 2, 3, 8 and auto) of every kind, symmetric and asymmetric, at M = 1, 2, 8, 16 on
    shapes whose chunk counts the splits do not divide: float64 reference on fresh inputs, every output written, and
    two calls on the same input bitwise identical (the fixed-order reduction)."""
    torch, tvm_ffi, arch = _gpu()
    variants = _split_variants(arch)
    lib = _gpu_lib(tmp_path_factory, "split", variants.values(), [arch])
    for (kind, asym, n, k, ks), v in variants.items():
        w = _weight(kind, n, k, _gs_for(kind, k), asym, _rng(hash((kind, asym, n, k)) % 2**31))
        ws, wref = _on_gpu(torch, kind, w)
        f = lib[v.func_name]
        for m in (1, 2, 8, 16):
            x = torch.randn(m, k, device="cuda", dtype=torch.float16)
            ref = x.double() @ wref.T
            what = f"{kind} asym={asym} ks={ks} {n}x{k} M={m}"
            y = _call_checked(torch, f, x, ws, ref, what)
            y2 = _call_checked(torch, f, x, ws, ref, what)
            assert torch.equal(y.view(torch.int16), y2.view(torch.int16)), f"{what}: not repeatable"


def test_gpu_test_libraries_are_the_ones_the_gpu_tests_load():
    """bench/gpu_test_libs.py prebuilds GPU_TEST_LIBS for the GPU machine: every library a GPU test loads has an entry
    (a missing one would fail there, after the device time is spent), and no entry is left unused."""
    import inspect
    import sys

    src = inspect.getsource(sys.modules[__name__])
    used = set(re.findall(r'_gpu_lib\(tmp_path_factory, "(\w+)"', src))
    assert used and used == set(GPU_TEST_LIBS), (used, set(GPU_TEST_LIBS))
    for name, (variants_of, archs_of) in GPU_TEST_LIBS.items():
        arch = archs_of("sm_80")[0]
        assert variants_of(arch) and all(isinstance(v, cs.Variant) for v in variants_of(arch)), name


def test_decode_report_labels_name_both_kernels_tiling():
    """bench_cuda's config label (the decode reports' "ours" and "best" columns) shows where the M > 8 kernel's warps,
    row tiles, row groups and split differ from the M <= 8 kernel's, and nothing extra where they agree."""
    import importlib
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    try:
        bc = importlib.import_module("bench_cuda")
    finally:
        sys.path.pop(0)
    g = cs.default_config("sp4", "sm_90a", 4096, 14336)["gemv"]
    assert bc._cfg_label(g) == "w16 rt2 wr1/2 u1 ks0/2 xs"
    assert bc._cfg_label(cs.default_config("sp16", "sm_90a", 11008, 4096)["gemv"]) == "w8 rt2/4 u1 ks0 xs2"
    assert bc._cfg_label({"warps": 8, "rt": 2, "u": 1, "ks": 1, "warps2": 0, "xs": 3}) == "w8 rt2 u1 ks1 xs"
