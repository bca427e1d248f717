"""aarch64 int8 kernels on the dot-product instruction (``--target aarch64:dotprod``): int8 activations (sdot).

For group-quantized int8 Linear layers (``group_quant``, 8 bits, symmetric or with zero points, optional GQSA group
mask) and N:M sparse layers whose kept values are int8 group-quantized (``nm_sparse[group_quant]``), on aarch64 targets
with the ``dotprod`` feature. The activations are **quantized to int8 on the fly**, per row and per weight group of
``G`` input columns (symmetric, scale ``sx[m, g] = max_{k in g} |x[m, k]| / 127``, round to nearest even), and the
integer dot products run on ``sdot v.4s, v.16b, v.16b`` (``llvm.aarch64.neon.sdot``: four int8x4 dot products
accumulated into four int32 lanes per instruction); the weight scales, zero points and activation scales are applied
per group after the integer dot, in float32::

    y[m, o] = sum_g sx[m, g] * ( S[o, g] * sum_{k in g} (c[o, k] - 128) * xq[m, k]
                                + S[o, g] * (128 - z[o, g]) * sum_{k in g} xq[m, k] )  + b[o]

(``c`` the stored uint8 codes, ``z`` the zero point: 128 when symmetric, then the second term vanishes and is not
computed). The integer part is exact; the only approximation is the activation quantization, so this **changes the
numerics** against the executor (which runs fp32 activations): see tests/test_arm_sdot.py and docs/arm-wasm.md for
the measured error and the stated bound. That is why these kernels exist only for ``aarch64:dotprod`` (the plain
``aarch64`` build stays exact: weights dequantized in registers, fp32 ``fmla``), and the build report marks every such
layer with the note ``int8 activations (sdot)``. A scale per (row, group) instead of per row costs one multiply per
group and 4 output rows and keeps an outlier from flattening the rest of its row.

N:M layers (``nm_sparse[group_quant]``, 8-bit values): the kept int8 values are scattered back to a dense int8 row
(zeros in the pruned positions) at **prepare** time, so the kernel is the dense int8 sdot kernel with the scales of the
kept groups mapped to dense groups: an N:M layer costs the same as a dense int8 one here (sdot has no sparse form;
the int8 weight bytes are ``m/n`` times those of the packed N:M values). Applies when the kept-value group size is a
multiple of ``n``: a kept-value group of ``Gv`` then covers exactly ``Gv*m/n`` input columns (2:4 with kept-value
groups of 16 -> dense groups of 32).

Weight layout (prepare): ``Wq[O/4, K/4, 16]`` int8 -- for each block of 4 output rows and 4 consecutive input columns,
the 16 bytes one ``sdot`` consumes (row-major: output row, then column); ``S[O/4, K/G, 4]`` float32 scales;
``ZC[O/4, K/G, 4]`` = ``S * (128 - z)`` (only with zero points); bias ``[O]``.

Loop nests, by rows ``M`` (symbolic): ``M <= 1`` and ``M <= 4`` quantize the rows once, then every block of 4 output
rows runs ``R = M-tier`` rows against each loaded weight vector (``parallel`` over output blocks for big layers);
above 4 rows, tiles of ``tile_m`` rows run in parallel, each quantized into a per-tile buffer, ``rows`` (4) rows at a
time per weight vector. With groups of a multiple of 16 columns the activations are loaded 16 bytes at a time and each
load serves four ``sdot v.4s, v.16b, v.4b[lane]`` (the indexed form; ``T.Shuffle`` of one 32-bit lane, which LLVM
folds into the instruction), otherwise 4 bytes are loaded and broadcast per ``sdot``.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from .cpu import _Src
from .registry import KernelImpl, WeightParam, format_key, register_kernel

NOTE = "int8 activations (sdot): activations quantized to int8 on the fly, per row and weight group (changes numerics vs the executor)"
SDOT = "llvm.aarch64.neon.sdot.v4i32.v16i8"


class _Spec:
    def __init__(self, O: int, K: int, G: int, sym: bool, bias: bool, nm: tuple[int, int] | None):
        self.O, self.K, self.G, self.sym, self.bias, self.nm = O, K, G, sym, bias, nm

    @property
    def NG(self) -> int:
        return self.K // self.G


def applies_to(target) -> bool:
    """aarch64 targets with the dotprod feature (``--target aarch64:dotprod``): never the plain, exact aarch64 build."""
    return target.name.partition(":")[0] == "aarch64" and "dotprod" in target.features


def _spec(linear, target) -> _Spec | None:
    return _format_spec(linear) if applies_to(target) else None


def _format_spec(linear) -> _Spec | None:
    w = linear.weight
    fk = format_key(w)
    O, K = (int(s) for s in w.shape)
    bias = linear.bias is not None
    if fk == "group_quant":
        if w.bits != 8:
            return None
        G, sym, nm = int(w.group_size), bool(w.symmetric), None
    elif fk == "nm_sparse[group_quant]":
        v = w.values
        if v.bits != 8 or v.group_size % w.n or K % w.m:
            return None
        G, sym, nm = v.group_size * w.m // w.n, bool(v.symmetric), (int(w.n), int(w.m))
    else:
        return None
    if O % 4 or K % G or G % 4:
        return None
    return _Spec(O, K, G, sym, bias, nm)


def _dense_codes(linear, spec: _Spec) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(codes [O, K] int16 = code - 128 (0 where pruned), scales [O, K/G], zeros [O, K/G]) of the layer."""
    w = linear.weight
    if spec.nm is None:
        codes = w.codes().astype(np.int16) - 128
        return codes, w.scale_grid().astype(np.float32), w.zero_grid().astype(np.float32)
    n, m = spec.nm
    v = w.values
    O, K = spec.O, spec.K
    J = K // m * n
    kept = v.codes().astype(np.int16).reshape(O, J) - 128
    pos = w.indices().reshape(O, J).astype(np.int64)  # position inside the group of m
    cols = (np.arange(J) // n * m)[None, :] + pos
    codes = np.zeros((O, K), np.int16)
    np.put_along_axis(codes, cols, kept, axis=1)
    # kept-value group gk covers kept columns [gk*Gv, (gk+1)*Gv) = input columns [gk*G, (gk+1)*G) with G = Gv*m/n
    return codes, v.scale_grid().astype(np.float32), v.zero_grid().astype(np.float32)


def prepare_sdot(linear, config: dict[str, Any]) -> list[np.ndarray]:
    spec = _format_spec(linear)
    if spec is None:
        raise ValueError(f"{linear.name}: the sdot kernel does not apply to {format_key(linear.weight)}")
    codes, S, Z = _dense_codes(linear, spec)
    O, K = spec.O, spec.K
    wq = codes.astype(np.int8).reshape(O // 4, 4, K // 4, 4).transpose(0, 2, 1, 3).reshape(O // 4, K // 4, 16)
    out = [np.ascontiguousarray(wq), np.ascontiguousarray(S.reshape(O // 4, 4, -1).transpose(0, 2, 1))]
    if not spec.sym:
        zc = (S * (np.float32(128) - Z)).astype(np.float32)
        out.append(np.ascontiguousarray(zc.reshape(O // 4, 4, -1).transpose(0, 2, 1)))
    if spec.bias:
        out.append(np.ascontiguousarray(linear.bias.astype(np.float32)))
    return out


def param_specs(spec: _Spec) -> list[WeightParam]:
    OB = spec.O // 4
    ps = [WeightParam("codes", (OB, spec.K // 4, 16), "int8"), WeightParam("scales", (OB, spec.NG, 4), "float32")]
    if not spec.sym:
        ps.append(WeightParam("zeros", (OB, spec.NG, 4), "float32"))
    if spec.bias:
        ps.append(WeightParam("bias", (spec.O,), "float32"))
    return ps


# ----------------------------------------------------------------------------------------------------------------
def kernel_source(spec: _Spec, cfg: dict[str, Any], name: str = "kernel") -> str:
    O, K, G, NG = spec.O, spec.K, spec.G, spec.NG
    OB, G4 = O // 4, G // 4
    MT, R = int(cfg["tile_m"]), int(cfg["rows"])
    sig = "Wq: T.Buffer(({}, {}, 16), \"int8\"), S: T.Buffer(({}, {}, 4), \"float32\")".format(OB, K // 4, OB, NG)
    if not spec.sym:
        sig += f", ZC: T.Buffer(({OB}, {NG}, 4), \"float32\")"
    if spec.bias:
        sig += f", B: T.Buffer(({O},), \"float32\")"
    s = _Src()
    s("@T.prim_func(private=True)")
    s(f"def {name}(var_x: T.handle, {sig}, var_y: T.handle):")
    s.ind = 1  # the body (every block below opens one level deeper)
    v4 = "T.ramp(0, 1, 4)"
    s('T.func_attr({"tirx.noalias": True, "op_pattern": 8})')
    s("M = T.int64()")
    s(f'x = T.match_buffer(var_x, (M, {K}), "float32")')
    s(f'y = T.match_buffer(var_y, (M, {O}), "float32")')

    def quantize(base: str, rows: int) -> None:
        """Rows base .. base+rows-1 of x (clamped to M-1) -> xq (int8), sx (scale per row and group), xs (group sums)."""
        with s.scope(f"for r in range({rows}):"):
            s(f"row = T.min({base} + T.Cast(\"int64\", r), M - T.int64(1))")
            with s.scope(f"for g in range({NG}):"):
                s('amax = T.alloc_buffer((4,), "float32", scope="local")')
                with s.scope("for l in T.vectorized(4):"):
                    s("amax[l] = T.float32(0)")
                with s.scope(f"for k4 in range({G // 4}):"):
                    with s.scope("for l in T.vectorized(4):"):
                        s(f"amax[l] = T.max(amax[l], T.fabs(x[row, g * {G} + k4 * 4 + l]))")
                s("am = T.max(T.max(amax[0], amax[1]), T.max(amax[2], amax[3]))")
                s("inv = T.if_then_else(am > T.float32(0), T.float32(127) / am, T.float32(0))")
                s("sx[r, g] = am * T.float32(1.0 / 127.0)")
                if not spec.sym:
                    s('gs = T.alloc_buffer((4,), "int32", scope="local")')
                    with s.scope("for l in T.vectorized(4):"):
                        s("gs[l] = 0")
                with s.scope(f"for k4 in range({G // 4}):"):
                    with s.scope("for l in T.vectorized(4):"):
                        k = f"g * {G} + k4 * 4 + l"
                        s(f"xq[r * {K} + {k}] = T.Cast(\"int8\", T.max(T.min(T.round(x[row, {k}] * inv), T.float32(127)), T.float32(-127)))")
                        if not spec.sym:
                            s(f"gs[l] = gs[l] + T.Cast(\"int32\", xq[r * {K} + {k}])")
                if not spec.sym:
                    s("xs[r, g] = T.Cast(\"float32\", (gs[0] + gs[1]) + (gs[2] + gs[3]))")

    def compute(base: str, r0: str, RR: int) -> None:
        """Output block ob for the RR rows r0 .. r0+RR-1 of the quantized tile (global rows base + r)."""
        s(f'facc = T.alloc_buffer(({RR}, 4), "float32", scope="local")')
        s(f'iacc = T.alloc_buffer(({RR}, 4), "int32", scope="local")')
        with s.scope(f"for r in T.unroll({RR}):"):
            s(f"facc[r, {v4}] = T.broadcast(T.float32(0), 4)")
        with s.scope(f"for g in range({NG}):"):
            with s.scope(f"for r in T.unroll({RR}):"):
                s(f"iacc[r, {v4}] = T.broadcast(T.int32(0), 4)")
            if G % 16 == 0 and cfg.get("lane", G % 16 == 0):
                # indexed form: one 16-byte load of x per row serves 4 sdot (sdot v.4s, v.16b, v.4b[lane])
                for kk in range(G4):
                    s(f"w{kk} = Wq[ob, g * {G4} + {kk}, T.ramp(0, 1, 16)]")
                    with s.scope(f"for r in T.unroll({RR}):"):
                        x16 = f"T.reinterpret(\"int32x4\", xq[T.ramp(({r0} + r) * {K} + g * {G} + {kk // 4 * 16}, 1, 16)])"
                        xv = f"T.reinterpret(\"int8x16\", T.Shuffle([{x16}], [{', '.join([str(kk % 4)] * 4)}]))"
                        s(f"iacc[r, {v4}] = T.call_llvm_pure_intrin(\"int32x4\", \"{SDOT}\", iacc[r, {v4}], w{kk}, {xv})")
            else:
                with s.scope(f"for kk in T.unroll({G4}):"):
                    s(f"w = Wq[ob, g * {G4} + kk, T.ramp(0, 1, 16)]")
                    with s.scope(f"for r in T.unroll({RR}):"):
                        xv = f"T.reinterpret(\"int8x16\", T.broadcast(T.reinterpret(\"int32\", xq[T.ramp(({r0} + r) * {K} + g * {G} + kk * 4, 1, 4)]), 4))"
                        s(f"iacc[r, {v4}] = T.call_llvm_pure_intrin(\"int32x4\", \"{SDOT}\", iacc[r, {v4}], w, {xv})")
            with s.scope(f"for r in T.unroll({RR}):"):
                term = f"T.Cast(\"float32x4\", iacc[r, {v4}]) * S[ob, g, {v4}]"
                if not spec.sym:
                    term = f"({term} + ZC[ob, g, {v4}] * T.broadcast(xs[{r0} + r, g], 4))"
                s(f"facc[r, {v4}] = facc[r, {v4}] + {term} * T.broadcast(sx[{r0} + r, g], 4)")
        with s.scope(f"for r in T.unroll({RR}):"):
            with s.scope(f"if {base} + T.Cast(\"int64\", {r0} + r) < M:"):
                b = f" + B[T.ramp(ob * 4, 1, 4)]" if spec.bias else ""
                s(f"y[{base} + T.Cast(\"int64\", {r0} + r), T.ramp(ob * 4, 1, 4)] = facc[r, {v4}]{b}")

    def buffers(rows: int) -> None:
        s(f'xq = T.alloc_buffer(({rows * K},), "int8")')
        s(f'sx = T.alloc_buffer(({rows}, {NG}), "float32")')
        if not spec.sym:
            s(f'xs = T.alloc_buffer(({rows}, {NG}), "float32")')

    def gemv(MB: int) -> None:
        buffers(MB)
        quantize("T.int64(0)", MB)
        loop = "T.parallel" if cfg.get("parallel_gemv") else "range"
        with s.scope(f"for ob in {loop}({OB}):"):
            compute("T.int64(0)", "0", MB)

    def gemm() -> None:
        with s.scope(f"for mt in T.parallel((M + T.int64({MT - 1})) // T.int64({MT})):"):
            buffers(MT)
            quantize(f"mt * T.int64({MT})", MT)
            with s.scope(f"for ob in range({OB}):"):
                with s.scope(f"for rb in range({MT // R}):"):
                    compute(f"mt * T.int64({MT})", f"rb * {R}", R)

    with s.scope("if M <= T.int64(1):"):
        gemv(1)
    with s.scope("elif M <= T.int64(4):"):
        gemv(4)
    with s.scope("else:"):
        gemm()
    return "\n".join(s.lines) + "\n"


def default_config(spec: _Spec, target) -> dict[str, Any]:
    return {"tile_m": 16, "rows": 4, "parallel_gemv": spec.O * spec.K >= 1 << 18, "lane": spec.G % 16 == 0,
            "activations": "int8 per row and group (sdot)"}  # fmt: skip


@register_kernel("arm.int8_sdot", formats=("group_quant", "nm_sparse[group_quant]"), targets=("aarch64",), priority=20,
                 prepare=prepare_sdot)  # fmt: skip
def arm_int8_sdot(linear, target, hints, tuning):
    """int8 weights x int8 activations (quantized per row on the fly) on aarch64 sdot; scales applied after the dot."""
    spec = _spec(linear, target)
    if spec is None or hints.act_dtype != "float32":
        return None
    from tvm.script.parser.core.entry import parse

    cfg = dict(default_config(spec, target), **(hints.config or {}))
    src = kernel_source(spec, cfg)
    impl = KernelImpl("arm.int8_sdot", param_specs(spec), func=parse(src), act_dtype="float32", fuses_bias=spec.bias,
                      config=cfg, tuned=False, note=NOTE)  # fmt: skip
    impl.source = src  # type: ignore[attr-defined]
    return impl


def reference(x: np.ndarray, linear) -> np.ndarray:
    """What the sdot kernel computes, in numpy (float64): per-row int8 activations, exact integer dots, scales after.
    Used by the tests to separate the kernel's arithmetic (checked tightly) from the quantization error."""
    spec = _format_spec(linear)
    assert spec is not None
    codes, S, Z = _dense_codes(linear, spec)
    x = np.asarray(x, np.float32).reshape(-1, spec.K)
    G, NG = spec.G, spec.NG
    xg = x.reshape(-1, NG, G)
    am = np.abs(xg).max(-1)  # [m, g]
    inv = np.where(am > 0, np.float32(127) / np.where(am > 0, am, 1), 0).astype(np.float32)
    xq = np.clip(np.rint(xg * inv[..., None]), -127, 127).astype(np.int64)  # T.round is llvm.nearbyint (frinti): half to even
    sx = (am * np.float32(1.0 / 127.0)).astype(np.float64)  # [m, g]
    dots = np.einsum("ogk,mgk->mog", codes.astype(np.int64).reshape(spec.O, NG, G), xq)
    sums = xq.sum(-1)  # [m, g]
    y = dots * S[None].astype(np.float64) + sums[:, None, :] * (S * (np.float32(128) - Z))[None].astype(np.float64)
    y = (y * sx[:, None, :]).sum(-1)
    if linear.bias is not None:
        y = y + linear.bias.astype(np.float64)
    return y
