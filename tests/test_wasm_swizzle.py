"""The wasm simd128 N:4 GEMV (``gemv_mode="swizzle"`` of the cpu.nm_sparse / cpu.nm_group_quant generators).

Each Linear is built for ``wasm`` (TVM -> wasm32+simd128, linked by cross.py) and run in node; outputs against numpy
(float64, the format's own ``materialize``) on fresh random inputs, for M = 1 (decode), the GEMV tiers and the GEMM
path (which reads the same swizzle layout), fp32 / int4 / int8 kept values, 1:4, 2:4 and 3:4, bias, asymmetric and
group-sparse quantization, odd sizes. The disassembly must show the kernel's i8x16.swizzle / v128 ops; the
``wasm:nosimd`` build must keep the portable layout (no swizzle) and still match.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

tvm = pytest.importorskip("tvm")

from sparsec.backends import cross  # noqa: E402
from sparsec.backends.kernels import cpu  # noqa: E402
from sparsec.backends.targets import get_target  # noqa: E402
from sparsec.compressor.formats import GroupQuant, NMSparse  # noqa: E402
from sparsec.compressor.ir import Graph, Linear  # noqa: E402

from .wasm_disasm import wasm_ops  # noqa: E402

HAS_NODE = shutil.which("node") is not None
HAS_WASM_LD = shutil.which("clang") is not None and (shutil.which("wasm-ld") or shutil.which("wasm-ld-14")) is not None
need_node = pytest.mark.skipif(not (HAS_NODE and HAS_WASM_LD), reason="node, clang or wasm-ld is not installed (scripts/install.sh)")


pytestmark = pytest.mark.usefixtures("no_user_tuning_db")


def weight(kind: str, o: int, k: int, n: int, rng, bits: int = 4, G: int = 16, asym: bool = False, gmask: bool = False):
    w = rng.standard_normal((o, k)).astype(np.float32)
    sp = NMSparse.from_dense(w, n, 4)
    if kind == "nm":
        return sp
    v = sp.values.materialize()
    J = v.shape[1]
    q = 2 ** (bits - 1)
    vg = v.reshape(o, J // G, G)
    if asym:
        lo, hi = vg.min(-1), vg.max(-1)
        s = ((hi - lo) / (2 * q - 1) + 1e-4).astype(np.float16)
        z = np.round(-lo / s.astype(np.float32)).clip(0, 2 * q - 1)
        codes = np.clip(np.round(vg / s[..., None].astype(np.float32)) + z[..., None], 0, 2 * q - 1).reshape(o, J)
    else:
        s = (np.abs(vg).max(-1) / (q - 1) + 1e-4).astype(np.float16)
        z = None
        codes = np.clip(np.round(vg / s[..., None].astype(np.float32)) + q, 0, 2 * q - 1).reshape(o, J)
    mask = (rng.random((o, J // G)) > 0.3) if gmask else None
    return sp.with_values(GroupQuant.from_codes(codes, s, z, bits, G, mask))


def one_linear(w, bias):
    o, k = w.shape
    g = Graph("lin")
    g.inputs = ["x"]
    g.add_value("x", "float32", ("m", k))
    g.add_node(Linear("fc", ["x"], ["y"], weight=w, bias=bias))
    g.add_value("y", "float32", ("m", o))
    g.outputs = ["y"]
    return g


def build(g, target: str, out: Path) -> dict:
    from sparsec.backends.build import build_to_dir

    build_to_dir(g, target, out)
    return json.loads((out / "manifest.json").read_text())


def gemv_modes(manifest: dict) -> list:
    """The GEMV modes of the manifest's kernels (recorded with every weight parameter of a kernel)."""
    return sorted(set(re.findall(r'"gemv_mode": "(\w+)"', json.dumps(manifest))))


def check(lib: Path, manifest: dict, w, bias, rows, seed):
    rng = np.random.default_rng(seed)
    W = w.materialize().astype(np.float64)
    for M in rows:
        x = rng.standard_normal((M, W.shape[1])).astype(np.float32)
        got, _ = cross.run_standalone(lib, manifest, {"x": x})
        ref = x.astype(np.float64) @ W.T + (0 if bias is None else bias)
        err = float(np.abs(got["y"] - ref).max() / np.abs(ref).max())
        assert got["y"].shape == ref.shape and err < 1e-5, (M, err, seed)


CASES = [  # kind, out, in, n, bits, G, asym, group mask, bias
    ("nm", 36, 40, 2, 0, 0, False, False, True),  # odd sizes: 9 row blocks, 10 groups of 4 inputs
    ("nm", 128, 128, 2, 0, 0, False, False, False),
    ("nm", 20, 48, 3, 0, 0, False, False, True),  # 3:4
    ("nm", 12, 64, 1, 0, 0, False, False, False),  # 1:4
    ("nm_gq", 20, 64, 2, 4, 16, False, False, True),
    ("nm_gq", 352, 128, 2, 4, 16, True, False, False),  # asymmetric int4 (zero points)
    ("nm_gq", 44, 96, 2, 4, 8, False, True, True),  # group-sparse (GQSA) int4, g8
    ("nm_gq", 28, 112, 2, 8, 8, True, False, False),  # int8, asymmetric
]


@need_node
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}{c[3]}:4-{c[1]}x{c[2]}-b{c[4]}{'-asym' if c[6] else ''}{'-gm' if c[7] else ''}")
def test_swizzle_kernel_matches_numpy(case, tmp_path):
    kind, o, k, n, bits, G, asym, gm, has_bias = case
    seed = int.from_bytes(os.urandom(4), "little")
    rng = np.random.default_rng(seed)
    w = weight(kind, o, k, n, rng, bits or 4, G or 16, asym, gm)
    bias = rng.standard_normal(o).astype(np.float32) if has_bias else None
    manifest = build(one_linear(w, bias), "wasm", tmp_path / "lib")
    assert gemv_modes(manifest) == ["swizzle"], gemv_modes(manifest)
    check(tmp_path / "lib", manifest, w, bias, (1, 3, 4, 7, 16, 19), seed)  # GEMV tiers 1/4/16 and the GEMM path


@need_node
def test_shapes_outside_the_swizzle_kernel_fall_back_and_match(tmp_path):
    """out not a multiple of 4 and 2:8 sparsity: the generic (select) kernel, same results."""
    seed = int.from_bytes(os.urandom(4), "little")
    rng = np.random.default_rng(seed)
    w = NMSparse.from_dense(rng.standard_normal((18, 32)).astype(np.float32), 2, 4)
    manifest = build(one_linear(w, None), "wasm", tmp_path / "a")
    assert gemv_modes(manifest) == ["select"]
    check(tmp_path / "a", manifest, w, None, (1, 5, 17), seed)
    w8 = NMSparse.from_dense(rng.standard_normal((16, 32)).astype(np.float32), 2, 8)
    manifest = build(one_linear(w8, None), "wasm", tmp_path / "b")
    assert gemv_modes(manifest) == ["select"]
    check(tmp_path / "b", manifest, w8, None, (1, 5, 17), seed)


def test_swizzle_config_is_wasm_simd_only():
    w = NMSparse.from_dense(np.random.default_rng(0).standard_normal((16, 32)).astype(np.float32), 2, 4)
    lin = Linear("fc", ["x"], ["y"], weight=w)
    spec = cpu.spec_of(lin)
    wasm, nosimd, x86 = get_target("wasm"), get_target("wasm:nosimd"), get_target("x86")
    cfg = cpu.default_config(spec, wasm)
    assert cfg["gemv_mode"] == "swizzle" and cpu.check_config(spec, cfg, wasm) is None
    assert cpu.default_config(spec, nosimd)["gemv_mode"] == "select"
    assert cpu.default_config(spec, x86)["gemv_mode"] == "permute"  # x86's own N:4 GEMV (vpermilps)
    assert "wasm simd128" in cpu.check_config(spec, cfg, x86)
    assert "x86" in cpu.check_config(spec, dict(cfg, gemv_mode="permute", gemv_impl="tir"), wasm)
    assert "block_o 4" in cpu.check_config(spec, dict(cfg, block_o=2, rows=2), wasm)
    assert any(c["gemv_mode"] == "swizzle" for c in cpu.search_space(lin, wasm, None))
    assert not any(c["gemv_mode"] == "swizzle" for c in cpu.search_space(lin, nosimd, None))
    # the prepared layout: byte 4*j + lane of the index holds 4 * position of kept column j of row 4*ob + lane
    arrays = cpu.prepare_cpu(lin, cfg)
    idx = w.indices().reshape(16, 16)
    assert arrays[1].shape == (4, 64) and arrays[1].dtype == np.uint8
    assert np.array_equal(arrays[1].reshape(4, 16, 4).transpose(0, 2, 1).reshape(16, 16), 4 * idx)


@need_node
def test_swizzle_kernel_disassembly_and_nosimd_fallback(tmp_path):
    if shutil.which("wasm-objdump") is None:
        pytest.skip("wasm-objdump (wabt) is not installed")
    seed = int.from_bytes(os.urandom(4), "little")
    rng = np.random.default_rng(seed)
    # 1:4 int4 (no C GEMV for it): the TIR swizzle kernel
    w = weight("nm_gq", 64, 128, 1, rng)
    manifest = build(one_linear(w, None), "wasm", tmp_path / "simd")
    assert "sparsec_swz24" not in json.dumps(manifest)
    c: dict[str, int] = {}
    for f, d in wasm_ops(tmp_path / "simd" / "model.wasm").items():
        assert not f.startswith("sparsec_swz24"), f
        if f.startswith("cpu_nm_group_quant"):
            for op, v in d.items():
                c[op] = c.get(op, 0) + v
    # 3 GEMV tiers (1, 4, 16 rows) x 8 kept columns per iteration: one swizzle per kept column and row selects x,
    # one per kept column spreads the positions (a swizzle, not an i8x16.shuffle: V8 lowers those slowly)
    assert c.get("i8x16.swizzle", 0) >= 8 * (1 + 4 + 16) + 3 * 8, c
    assert c.get("i8x16.shuffle", 0) == 0, c
    assert c.get("v128.load", 0) >= 3 * 8 and c.get("f32x4.mul", 0) >= 8 * 21 and c.get("f32x4.convert_i32x4_s", 0) >= 3 * 8, c
    check(tmp_path / "simd", manifest, w, None, (1, 6), seed)
    w = weight("nm_gq", 64, 128, 2, rng)
    manifest = build(one_linear(w, None), "wasm:nosimd", tmp_path / "plain")
    assert gemv_modes(manifest) == ["select"]
    ops = wasm_ops(tmp_path / "plain" / "model.wasm")
    assert not any(op.startswith(("i8x16", "f32x4", "v128")) for d in ops.values() for op in d)
    check(tmp_path / "plain", manifest, w, None, (1, 6), seed)


C_CASES = [("nm", 0, "sparsec_swz24_f32", "cpu_nm_sparse"), ("nm_gq", 4, "sparsec_swz24_int4", "cpu_nm_group_quant"),
           ("nm_gq", 8, "sparsec_swz24_int8", "cpu_nm_group_quant")]  # fmt: skip


@need_node
@pytest.mark.parametrize("case", C_CASES, ids=lambda c: c[2])
def test_c_gemv_is_linked_called_and_uses_swizzle_with_constant_masks(case, tmp_path):
    """2:4 on wasm simd128: the GEMV (M <= 16; int4/int8: 2 <= M <= 16) is the C kernel of
    backends/capi/wasm_swizzle.c. The TVM kernel calls it and has no multi-row GEMV of its own (so those results,
    checked against numpy, come from the C kernel); the C kernel selects x with i8x16.swizzle and spreads the
    positions with v128.const masks, never an i8x16.shuffle."""
    if shutil.which("wasm-objdump") is None:
        pytest.skip("wasm-objdump (wabt) is not installed")
    kind, bits, sym, gen = case
    seed = int.from_bytes(os.urandom(4), "little")
    rng = np.random.default_rng(seed)
    w = weight(kind, 44, 72 if bits != 4 else 80, 2, rng, bits or 4, 4 if bits == 8 else 8, asym=bits == 8)
    bias = rng.standard_normal(44).astype(np.float32)
    lib = tmp_path / "lib"
    manifest = build(one_linear(w, bias), "wasm", lib)
    assert '"gemv_impl": "c"' in json.dumps(manifest)
    check(lib, manifest, w, bias, (1, 2, 4, 5, 16, 17), seed)
    dis = subprocess.run([shutil.which("wasm-objdump"), "-d", str(lib / "model.wasm")], capture_output=True, text=True).stdout
    imports = subprocess.run([shutil.which("wasm-objdump"), "-x", "-j", "Import", str(lib / "model.wasm")], capture_output=True, text=True).stdout
    assert "swz24" not in imports  # defined in model.wasm, not an import that --allow-undefined would leave dangling
    assert re.search(rf"call \d+ <{sym}>", dis), "the TVM kernel does not call the C GEMV"
    ops = wasm_ops(lib / "model.wasm")
    c = ops[sym]
    # 1 row: 4 kept columns per 16 position bytes, one mask swizzle + one select swizzle each; 4 rows: 4 + 16
    assert c.get("i8x16.swizzle", 0) >= 8 + 20 and c.get("i8x16.shuffle", 0) == 0 and c.get("v128.const", 0) >= 5, c
    # the TVM kernel: fp32 has no GEMV of its own; int4/int8 keep the TIR GEMV for M = 1 only (8 kept columns per
    # iteration when they divide the kept columns, else 4: one select + one spread each), the C kernel M = 2..16
    own = sum(d.get("i8x16.swizzle", 0) for f, d in ops.items() if f.startswith(gen))
    want = 0 if kind == "nm" else 2 * cpu._gemv_unroll(cpu.spec_of(Linear("fc", ["x"], ["y"], weight=w)))
    assert own == want and not any(d.get("i8x16.shuffle", 0) for d in ops.values()), (own, ops)


def test_c_gemv_config():
    rng = np.random.default_rng(0)
    wasm = get_target("wasm")
    for w, want in ((NMSparse.from_dense(rng.standard_normal((16, 32)).astype(np.float32), 2, 4), "c"),
                    (weight("nm_gq", 16, 64, 2, rng, 4, 16), "c"), (weight("nm_gq", 16, 64, 2, rng, 8, 8), "c"),
                    (NMSparse.from_dense(rng.standard_normal((16, 48)).astype(np.float32), 3, 4), "tir"),
                    (NMSparse.from_dense(rng.standard_normal((16, 64)).astype(np.float32), 1, 4), "tir")):  # fmt: skip
        spec = cpu.spec_of(Linear("fc", ["x"], ["y"], weight=w))
        cfg = cpu.default_config(spec, wasm)
        assert cfg["gemv_mode"] == "swizzle" and cfg["gemv_impl"] == want and cpu.check_config(spec, cfg, wasm) is None
        if want == "tir":
            assert "2:4" in cpu.check_config(spec, dict(cfg, gemv_impl="c"), wasm)
        else:
            assert "gemv_impl" in cpu.check_config(spec, dict(cfg, gemv_impl="asm"), wasm)
            assert "swizzle" in cpu.check_config(spec, dict(cfg, gemv_mode="select", block_o=4), wasm)
    assert "gemv_impl" not in cpu.default_config(spec, get_target("wasm:nosimd"))


@pytest.mark.slow
@need_node
def test_golden_gpt_24_on_wasm_matches_executor(tmp_path):
    """The golden tiny-gpt with every Linear but the head 2:4 (fp32, and int4 g16), built for wasm (the C GEMV for the
    2:4 layers), decode and a short prefill in node vs sparsec's executor on the same graph: rel. error <= 1e-3."""
    from sparsec.compressor.compress import load_example
    from sparsec.compressor.executor import run_graph

    seed = int.from_bytes(os.urandom(4), "little")
    rng = np.random.default_rng(seed)
    for kind in ("nm", "nm_gq"):
        g = load_example("tiny-gpt").graph
        for lin in g.linears()[:-1]:
            w = lin.weight.materialize()
            sp = NMSparse.from_dense(w, 2, 4)
            if kind == "nm_gq":
                v = sp.values.materialize()
                s = (np.abs(v).reshape(v.shape[0], -1, 16).max(-1) / 7 + 1e-4).astype(np.float16)
                codes = np.clip(np.round(v.reshape(v.shape[0], -1, 16) / s[..., None].astype(np.float32)) + 8, 0, 15).reshape(v.shape)
                sp = sp.with_values(GroupQuant.from_codes(codes, s, None, 4, 16))
            lin.weight = sp
        lib = tmp_path / kind
        manifest = build(g, "wasm", lib)
        assert '"gemv_impl": "c"' in json.dumps(manifest)
        vocab = int(g.linears()[-1].weight.shape[0])
        for T in (1, 5):
            ids = rng.integers(0, vocab, size=(1, T)).astype(np.int64)
            got, _ = cross.run_standalone(lib, manifest, {g.inputs[0]: ids})
            ref = run_graph(g, {g.inputs[0]: ids})
            name = g.outputs[0]
            a, b = np.asarray(got[name], np.float64), np.asarray(ref[name], np.float64)
            err = float(np.abs(a - b).max() / np.abs(b).max())
            assert a.shape == b.shape and err <= 1e-3, (kind, T, err, seed)
