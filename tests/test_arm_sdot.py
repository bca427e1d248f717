"""aarch64 int8 kernels on sdot (`--target aarch64:dotprod`): int8 weights x int8 activations quantized per row.

Independent references: the weight format's own ``materialize()`` (on inputs that are exactly on the int8 grid the
kernel's arithmetic is exact), a numpy emulation of the kernel (:func:`arm_sdot.reference`: the compiled kernels
under qemu-aarch64 must equal it to float rounding on the same input bits), and the fp32 executor (stated tolerance:
the cost of int8 activations, on whole models). Whole models are not compared with the emulation: a value within
float rounding of a rounding boundary quantizes differently after layers computed in a different order, and
attention spreads that to later positions (measured up to 7e-3 on 100 tokens). Disassembly: the kernel's compute function is made of ``sdot``; the plain ``aarch64`` build of the same
model (exact, fp32 activations) has no ``sdot`` at all. Tools missing -> skip with the reason.
"""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("tvm")
pytest.importorskip("torch")  # the executor

from sparsec.backends import cross  # noqa: E402
from sparsec.backends.kernels import arm_sdot  # noqa: E402
from sparsec.backends.kernels.registry import ShapeHints, select_kernel  # noqa: E402
from sparsec.backends.targets import get_target  # noqa: E402
from sparsec.compressor.executor import Executor  # noqa: E402
from sparsec.compressor.formats import GroupQuant, NMSparse  # noqa: E402
from sparsec.compressor.ir import Linear  # noqa: E402

ROOT = str(Path(__file__).resolve().parents[1])
HAS_QEMU = shutil.which("qemu-aarch64") is not None and Path("/usr/aarch64-linux-gnu/lib").is_dir()
HAS_XCC = shutil.which("aarch64-linux-gnu-gcc") is not None
OBJDUMP = shutil.which("aarch64-linux-gnu-objdump")
need_arm = pytest.mark.skipif(not (HAS_QEMU and HAS_XCC), reason="qemu-aarch64 or the aarch64 cross toolchain is not installed (scripts/install.sh)")
need_xcc = pytest.mark.skipif(not (HAS_XCC and OBJDUMP), reason="aarch64-linux-gnu-gcc / objdump is not installed (scripts/install.sh)")
SDOT_TOL = 5e-2  # stated bound, int8 activations vs the fp32 executor (relative to max |output|; measured ~0.5-3e-2)


pytestmark = pytest.mark.usefixtures("no_user_tuning_db")


def int8_format(w: np.ndarray, kind: str, rng) -> object:
    """int8 group-quantized ``w``: ``sym`` (g32), ``sym8`` (g8: the kernel's form for groups that are not a multiple
    of 16), ``asym`` (g32, zero points), ``gqsa`` (``asym`` with half of the groups removed) or ``nm`` (2:4 with int8
    g16 values)."""
    if kind == "nm":
        sp = NMSparse.from_dense(w, 2, 4)
        v = sp.values.materialize()
        s = (np.abs(v).reshape(v.shape[0], -1, 16).max(-1) / 127 + 1e-4).astype(np.float16)
        codes = np.clip(np.round(v.reshape(v.shape[0], -1, 16) / s[..., None].astype(np.float32)) + 128, 0, 255).reshape(v.shape)
        return sp.with_values(GroupQuant.from_codes(codes, s, None, 8, 16))
    G = 8 if kind == "sym8" else 32
    wg = w.reshape(w.shape[0], -1, G)
    if kind in ("sym", "sym8"):
        s = (np.abs(wg).max(-1) / 127 + 1e-4).astype(np.float16)
        codes = np.clip(np.round(wg / s[..., None].astype(np.float32)) + 128, 0, 255).reshape(w.shape)
        return GroupQuant.from_codes(codes, s, None, 8, G)
    lo, hi = wg.min(-1), wg.max(-1)
    s = ((hi - lo) / 255 + 1e-5).astype(np.float16)
    z = np.clip(np.round(-lo / s.astype(np.float32)), 0, 255).astype(np.uint8)
    codes = np.clip(np.round(wg / s[..., None].astype(np.float32)) + z[..., None], 0, 255).reshape(w.shape)
    mask = None
    if kind == "gqsa":  # GQSA: half of the groups removed (zero), zero points on the kept ones
        mask = rng.random(s.shape) < 0.5
    return GroupQuant.from_codes(codes, s, z, 8, G, group_mask=mask)


def int8_golden(name: str, seed: int = 0):
    """A golden model with its Linear layers int8 by turns: symmetric, zero points, 2:4 + int8 (the head of tiny-gpt
    stays dense)."""
    from sparsec.compressor.compress import load_example

    g = load_example(name).graph
    rng = np.random.default_rng(seed)
    lins = g.linears()
    for i, lin in enumerate(lins if name == "digits" else lins[:-1]):
        if lin.in_features % 32 == 0:
            lin.weight = int8_format(lin.weight.materialize(), ("sym", "asym", "nm")[i % 3], rng)
    return g


def rel(a, b) -> float:
    return float(np.abs(np.asarray(a, np.float64) - b).max() / max(np.abs(b).max(), 1e-12))


def build(g, target: str, out: Path) -> dict:
    from sparsec.backends.build import build_to_dir

    build_to_dir(g, target, out)
    return json.loads((out / "manifest.json").read_text())


# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["sym", "sym8", "asym", "gqsa", "nm"])
def test_emulation_is_exact_on_int8_grid_inputs(kind):
    """On rows whose values are integers in [-127, 127] with max |x| = 127 in every group the activation quantization is
    the identity,
    so the kernel's formula must equal x @ materialize(W).T exactly (up to float rounding): checks the reference, the
    zero-point correction and the N:M scatter against the format's own decoding."""
    rng = np.random.default_rng()
    O, K = 24, 96
    lin = Linear("l", ["x"], ["y"], weight=int8_format(rng.standard_normal((O, K)).astype(np.float32), kind, rng), bias=rng.standard_normal(O).astype(np.float32))
    x = rng.integers(-127, 128, (5, K)).astype(np.float32)
    x[:, ::8] = 127  # every group (8, 16 or 32 columns) holds a 127
    want = x.astype(np.float64) @ lin.weight.materialize().astype(np.float64).T + lin.bias
    got = arm_sdot.reference(x, lin)
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max(), np.abs(got - want).max()


@pytest.mark.parametrize("kind", ["sym", "asym", "gqsa", "nm"])
def test_prepared_layout_is_what_sdot_consumes(kind):
    """Emulate sdot on the prepared arrays (16 bytes = 4 output rows x 4 columns per instruction; scales / zero-point
    terms per group of 4 rows) and compare with the reference."""
    rng = np.random.default_rng()
    O, K = 16, 64
    lin = Linear("l", ["x"], ["y"], weight=int8_format(rng.standard_normal((O, K)).astype(np.float32), kind, rng))
    arrays = arm_sdot.prepare_sdot(lin, {})
    wq, S = arrays[0], arrays[1]
    ZC = arrays[2] if len(arrays) > 2 else np.zeros_like(S)
    G = K // S.shape[1]
    x = rng.standard_normal((3, K)).astype(np.float32)
    am = np.abs(x.reshape(3, -1, G)).max(-1)  # activation scale per row and group
    xq = np.clip(np.rint(x.reshape(3, -1, G) * (np.float32(127) / am)[..., None]), -127, 127).astype(np.int64).reshape(3, K)
    sx = am.astype(np.float64) * np.float64(np.float32(1 / 127))
    y = np.zeros((3, O))
    for ob in range(O // 4):
        for g in range(K // G):
            acc = np.zeros((3, 4), np.int64)
            for k4 in range(g * G // 4, (g + 1) * G // 4):
                w16 = wq[ob, k4].astype(np.int64).reshape(4, 4)  # [row, column]
                acc += xq[:, k4 * 4:k4 * 4 + 4] @ w16.T
            xs = xq[:, g * G:(g + 1) * G].sum(1)
            y[:, ob * 4:ob * 4 + 4] += (acc * S[ob, g] + xs[:, None] * ZC[ob, g]) * sx[:, g:g + 1]
    ref = arm_sdot.reference(x, lin)
    assert np.abs(y - ref).max() <= 1e-6 * np.abs(ref).max()  # a layout error is O(1)


def test_sdot_kernel_only_on_aarch64_dotprod():
    rng = np.random.default_rng(3)
    w = rng.standard_normal((64, 128)).astype(np.float32)
    lin = Linear("l", ["x"], ["y"], weight=int8_format(w, "sym", rng))
    impl = select_kernel(lin, get_target("aarch64:dotprod"), ShapeHints())
    assert impl.name == "arm.int8_sdot" and "int8 activations (sdot)" in impl.note
    for t in ("aarch64", "aarch64:i8mm", "x86", "wasm"):
        assert select_kernel(lin, get_target(t), ShapeHints()).name == "cpu.group_quant", t  # exact fp32 kernels
    # int4 weights keep the exact kernel on dotprod too (the sdot kernel takes int8 weights)
    s = (np.abs(w).reshape(64, -1, 32).max(-1) / 7 + 1e-4).astype(np.float16)
    codes = np.clip(np.round(w.reshape(64, -1, 32) / s[..., None].astype(np.float32)) + 8, 0, 15).reshape(w.shape)
    lin4 = Linear("l4", ["x"], ["y"], weight=GroupQuant.from_codes(codes, s, None, 4, 32))
    assert select_kernel(lin4, get_target("aarch64:dotprod"), ShapeHints()).name == "cpu.group_quant"


def _functions(lib: Path) -> dict[str, str]:
    dis = subprocess.run([OBJDUMP, "-d", str(lib)], capture_output=True, text=True).stdout
    out = {}
    for f in re.split(r"\n(?=[0-9a-f]+ <)", dis):
        m = re.match(r"[0-9a-f]+ <([^>]+)>:", f)
        if m:
            out[m.group(1)] = f
    return out


@pytest.fixture(scope="module")
def digits_dotprod(tmp_path_factory):
    if not HAS_XCC:
        pytest.skip("aarch64-linux-gnu-gcc is not installed (scripts/install.sh)")
    g = int8_golden("digits")
    out = tmp_path_factory.mktemp("sdot") / "lib"
    return g, out, build(g, "aarch64:dotprod", out)


@need_xcc
def test_dotprod_hot_loops_are_sdot_and_plain_aarch64_has_none(digits_dotprod, tmp_path):
    g, lib, manifest = digits_dotprod
    by_kernel = {k["layer"]: k for k in manifest["kernels"]}
    sdot_layers = [k for k in by_kernel.values() if k["kernel"] == "arm.int8_sdot"]
    assert {k["format"].split("·")[0] for k in sdot_layers} >= {"int8g32", "int8g32a"}, by_kernel
    shapes = {lin.name: lin.weight.shape for lin in g.linears()}
    for name in ("libsparsec_model.so", "model.so"):  # C API library; Relax VM library (compute inlined in __tvm_ffi_*)
        funcs = _functions(lib / name)
        for k in sdot_layers:
            tag = "arm_int8_sdot_{}x{}".format(*shapes[k["layer"]])
            bodies = [body for f, body in funcs.items() if tag in f]
            n_sdot = sum(len(re.findall(r"\tsdot\tv\d+\.4s, v\d+\.16b, v\d+\.(?:16b|4b\[\d\])", b)) for b in bodies)
            assert n_sdot >= 16, (name, tag, n_sdot, sorted(funcs)[:30])
    plain = tmp_path / "plain"
    build(g, "aarch64", plain)
    for name in ("libsparsec_model.so", "model.so"):
        dis = subprocess.run([OBJDUMP, "-d", str(plain / name)], capture_output=True, text=True).stdout
        assert "\tsdot\t" not in dis and "\tudot\t" not in dis, name


def one_linear(kind: str, bias: bool, seed: int):
    """x[B, 96] -> one int8 Linear (40 outputs): the kernel sees the input's exact bits, so the compiled kernel must
    equal its emulation to float rounding."""
    from sparsec.compressor.ir import Graph

    rng = np.random.default_rng(seed)
    g = Graph("sdot1")
    g.inputs = ["x"]
    g.add_value("x", "float32", ("B", 96))
    w = rng.standard_normal((40, 96)).astype(np.float32)
    g.add_node(Linear("lin", ["x"], ["y"], weight=int8_format(w, kind, rng), bias=rng.standard_normal(40).astype(np.float32) if bias else None))
    g.add_value("y", "float32", ("B", 40))
    g.outputs = ["y"]
    g.validate()
    return g


@need_arm
@pytest.mark.parametrize("kind,bias", [("sym", True), ("asym", False), ("gqsa", True), ("nm", True), ("sym8", False)])
def test_dotprod_kernel_under_qemu_equals_its_emulation(kind, bias, tmp_path):
    rng = np.random.default_rng()
    g = one_linear(kind, bias, seed=int(rng.integers(1 << 30)))
    manifest = build(g, "aarch64:dotprod", tmp_path / "lib")
    assert [k["kernel"] for k in manifest["kernels"]] == ["arm.int8_sdot"], manifest["kernels"]
    lin = g.nodes[0]
    for rows in (1, 3, 4, 5, 37):  # the loop nests: M <= 1, M <= 4, tiles of 16 rows (a partial last tile)
        x = (rng.standard_normal((rows, 96)) * rng.uniform(0.1, 10, (rows, 1))).astype(np.float32)
        x[0, :32] = 0  # an all-zero group
        got = cross.run_standalone(tmp_path / "lib", manifest, {"x": x})[0]["y"]
        emu = arm_sdot.reference(x, lin)
        ref = Executor(g).run({"x": x})["y"]
        assert got.shape == emu.shape
        assert rel(got, emu) < 1e-5, (rows, rel(got, emu))
        assert rel(got, ref) < SDOT_TOL, (rows, rel(got, ref))


@need_arm
def test_dotprod_digits_under_qemu(digits_dotprod):
    g, lib, manifest = digits_dotprod
    rng = np.random.default_rng()
    for rows in (1, 3, 37):
        x = rng.standard_normal((rows, 64)).astype(np.float32)
        got = cross.run_standalone(lib, manifest, {g.inputs[0]: x})[0][g.outputs[0]]
        ref = Executor(g).run({g.inputs[0]: x})[g.outputs[0]]
        assert rel(got, ref) < SDOT_TOL, (rows, rel(got, ref))


@pytest.mark.slow
@need_arm
def test_dotprod_tiny_gpt_under_qemu(tmp_path):
    g = int8_golden("tiny-gpt")
    manifest = build(g, "aarch64:dotprod", tmp_path / "lib")
    layers = [k["layer"] for k in manifest["kernels"] if k["kernel"] == "arm.int8_sdot"]
    fmts = {k["format"] for k in manifest["kernels"] if k["kernel"] == "arm.int8_sdot"}
    assert len(layers) == len(g.linears()) - 1 and any(f.startswith("2:4") for f in fmts), fmts
    rng = np.random.default_rng()
    for shape in ((1, 1), (2, 16), (1, 100)):
        ids = rng.integers(0, 256, shape)
        got = cross.run_standalone(tmp_path / "lib", manifest, {g.inputs[0]: ids})[0][g.outputs[0]]
        ref = Executor(g).run({g.inputs[0]: ids})[g.outputs[0]]
        assert rel(got, ref) < SDOT_TOL, (shape, rel(got, ref))


@pytest.mark.slow
@need_arm
def test_cli_compress_dotprod_int8_and_run(tmp_path):
    out = tmp_path / "out"
    p = subprocess.run([sys.executable, "-m", "sparsec", "compress", "--example", "tiny-gpt", "--target", "aarch64:dotprod", "--quant", "int8",
                        "-o", str(out), "-q"], capture_output=True, text=True, cwd=ROOT)  # fmt: skip
    assert p.returncode == 0, p.stderr[-2000:]
    build_info = json.loads((out / "report.json").read_text())["build"]
    assert any("int8 activations (sdot)" in n for n in build_info.get("notes", [])), build_info.get("notes")
    assert sum(1 for layer in build_info["layers"] if layer["kernel"] == "arm.int8_sdot") >= len(build_info["layers"]) - 1
    ids = np.random.default_rng().integers(0, 256, (1, 12))
    np.savez(tmp_path / "x.npz", input_ids=ids)
    outs = {}
    for engine in ("lib", "onnx"):
        p = subprocess.run([sys.executable, "-m", "sparsec", "run", str(out), "--inputs", str(tmp_path / "x.npz"), "--engine", engine,
                            "--output", str(tmp_path / f"{engine}.npz")], capture_output=True, text=True, cwd=ROOT)  # fmt: skip
        assert p.returncode == 0, p.stderr[-2000:]
        outs[engine] = dict(np.load(tmp_path / f"{engine}.npz"))
    (k,) = outs["onnx"]
    assert rel(outs["lib"][k], outs["onnx"][k]) < SDOT_TOL
