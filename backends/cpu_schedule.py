"""Default schedules for the operators TVM legalizes on CPU (attention matmuls, norms, softmax, elementwise).

TVM 0.27's CPU pipeline legalizes Relax ops to TIR and compiles them unscheduled: plain loop nests, one thread, and
whatever LLVM auto-vectorizes. DLight ships CPU rules only for GEMV and reductions, none for matmuls or elementwise
code, so a transformer's attention (``Q @ K^T``, ``P @ V``: batched matmuls of two activations) runs as a naive
triple loop. These two DLight rules fill that gap and run after TVM's own (:func:`cpu_rules`):

- :class:`CpuMatmul` for a block ``S...S R`` (spatial axes then one reduction, e.g. batched matmul): the last spatial
  axis is split by the SIMD width and vectorized, the second-to-last is register-blocked, the reduction loop sits
  between them, the outer spatial axes are fused and run in parallel; an injective epilogue (fused scale / add) is
  computed per tile.
- :class:`CpuInjective` for elementwise / broadcast / transpose blocks: all axes fused, split by the SIMD width
  (vectorized) and run in parallel when large.

They never touch sparsec's own kernels (those are already-scheduled loop nests without schedulable blocks).
"""
from __future__ import annotations

from tvm import s_tir, tirx
from tvm.s_tir.dlight.analysis import normalize_prim_func
from tvm.s_tir.dlight.base import get_extent, try_inline_contiguous_spatial
from tvm.s_tir.dlight.cpu.base import CPUScheduleRule
from tvm.target import Target


def _lanes(target: Target) -> int:
    attrs = [str(a) for a in (target.attrs.get("mattr") or [])]
    mcpu = str(target.attrs.get("mcpu", ""))
    triple = str(target.attrs.get("mtriple", ""))
    if triple.startswith("x86_64"):
        from .kernels.registry import _host_vector_bits

        bits = _host_vector_bits() if mcpu else 128
        return max(4, bits // 32)
    if any("simd128" in a for a in attrs) or triple.startswith("wasm"):
        return 4
    return 4


class CpuMatmul(CPUScheduleRule):
    """Batched matmul-like blocks (``S+R``): vectorize the output's last axis, block the one before, parallel outside."""

    def apply(self, func, target: Target, _: bool):
        if not isinstance(func, tirx.PrimFunc) or not self.is_target_available(target):
            return None
        sch = s_tir.Schedule(func)
        infos = normalize_prim_func(sch)
        if infos is None:
            return None
        infos = try_inline_contiguous_spatial(sch, infos)
        if infos is None or not 1 <= len(infos) <= 2:
            return None
        main, epi = infos[0], (infos[1] if len(infos) == 2 else None)
        if epi is not None and not epi.is_injective():
            return None
        kinds = main.dom_kind()
        if len(kinds) < 3 or not kinds.endswith("R") or set(kinds[:-1]) != {"S"}:
            return None
        lanes = _lanes(target)
        block = main.block_rv
        loops = sch.get_loops(block)
        *outer, i, j, k = loops
        jext = get_extent(sch, j)
        if not isinstance(jext, int) or jext < lanes or jext % lanes:
            return None  # symbolic or ragged last axis: predicated vector lanes are slower than LLVM's own loop
        jo, ji = sch.split(j, [None, lanes])
        io, ii = sch.split(i, [None, 4])
        sch.reorder(*outer, io, jo, k, ii, ji)
        sch.vectorize(ji)
        sch.unroll(ii)
        par = sch.fuse(*outer, io) if outer else io
        sch.parallel(par)
        sch.decompose_reduction(block, k)
        if epi is not None:
            try:
                sch.reverse_compute_at(epi.block_rv, jo)
            except Exception:  # noqa: BLE001 - keep the epilogue as its own loop nest
                pass
        return sch


class CpuInjective(CPUScheduleRule):
    """Elementwise / broadcast / layout blocks: fused, vectorized by the SIMD width, parallel outside."""

    def apply(self, func, target: Target, _: bool):
        if not isinstance(func, tirx.PrimFunc) or not self.is_target_available(target):
            return None
        sch = s_tir.Schedule(func)
        infos = normalize_prim_func(sch)
        if infos is None:
            return None
        if not all(b.is_injective() for b in infos):
            return None
        infos = try_inline_contiguous_spatial(sch, infos)
        if infos is None or len(infos) != 1 or not infos[0].is_injective():
            return None
        block = infos[0].block_rv
        loops = sch.get_loops(block)
        if not loops:
            return None
        fused = sch.fuse(*loops) if len(loops) > 1 else loops[0]
        lanes = _lanes(target)
        ext = get_extent(sch, fused)
        if isinstance(ext, int) and ext < 4 * lanes:
            return sch
        o, vi = sch.split(fused, [None, lanes])
        sch.vectorize(vi)
        if not isinstance(ext, int) or ext >= 1 << 14:
            oo, _oi = sch.split(o, [None, 64])
            sch.parallel(oo)
        return sch


def cpu_rules():
    """DLight rules applied on CPU targets. Measured on the golden GPT (perf, 1 thread, 128 tokens): CpuMatmul takes
    the attention's ``P @ V`` from 28% of the run time to 3%; TVM's cpu GEMV/Reduction rules and CpuInjective made
    softmax, transposes and adds with symbolic extents slower than LLVM's own loops, so they are not applied."""
    from tvm.s_tir import dlight as dl

    return [CpuMatmul()]


def fast_math():
    """TVM's FastMathTransform (softmax, exp, erf, tanh -> polynomial approximations, vectorizable) plus the same for
    ``sigmoid`` (``1 / (1 + fast_exp(-x))``): the exact versions call libm's scalar ``expf`` per element, which was
    9% of the golden GPT's run time. Relative error of ``fast_exp`` is below 1e-6 (tests hold the compiled model to
    1e-4 of the executor)."""
    import tvm
    from tvm import relax, topi
    from tvm.relax import expr_functor
    from tvm.relax.transform import FastMathTransform

    def te_sigmoid(x):
        one = tvm.tirx.const(1.0, x.dtype)
        return topi.divide(one, topi.add(one, topi.fast_exp(topi.negative(x))))

    @expr_functor.mutator
    class _Sigmoid(relax.PyExprMutator):
        def visit_call_(self, call):
            call = super().visit_call_(call)
            if isinstance(call.op, tvm.ir.Op) and call.op.name == "relax.sigmoid" and str(call.args[0].ty.dtype) == "float32":
                return self.builder_.call_te(te_sigmoid, call.args[0])
            return call

    @tvm.transform.module_pass(opt_level=0, name="SparsecFastSigmoid")
    def sigmoid_pass(mod, _ctx):
        m = _Sigmoid(mod)
        for gv, func in mod.functions_items():
            if isinstance(func, relax.Function):
                m.builder_.update_func(gv, m.visit_expr(func))
        return m.builder_.get()

    return [FastMathTransform(), sigmoid_pass]

