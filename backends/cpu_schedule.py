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

On x86, three more rules come first (measured in bench/results/profile_x86.md): :class:`CpuMatmulTiled` (attention
matmuls as register micro-kernels), :class:`CpuRowReduce` (softmax per row, rfactor-ed reductions) and
:class:`CpuInjectiveInner` (elementwise blocks vectorized along a static innermost axis). The first two cover any
symbolic sequence length; they dispatch at run time (:func:`_dispatch`) between whole column tiles and padded
columns (matmuls) and between the row body and the plain loops for short rows (softmax); bench/results/
attn_seq_x86.md measures lengths that are and are not multiples of the tiles.

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
        if isinstance(jext, int) and jext % lanes:  # e.g. a rank-8 low-rank factor (x @ B^T) with 16 lanes: narrower vectors
            lanes = next((v for v in (lanes // 2, lanes // 4) if v >= 4 and jext % v == 0), lanes)
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


def _x86(target: Target) -> bool:
    """The rules below were measured on x86 only (aarch64 / wasm builds keep the schedules they had)."""
    return str(target.attrs.get("mtriple", "")).startswith("x86_64")


def _dispatch(fast, plain, cond):
    """One PrimFunc running ``fast`` when ``cond`` (on the symbolic extents) holds and ``plain`` otherwise: the root
    blocks' bodies under an ``if``, their allocations merged (both come from the same function: same parameters)."""
    from tvm.s_tir import SBlock, SBlockRealize

    ra, rb = fast.body.block, plain.body.block
    alloc = list(ra.alloc_buffers)
    alloc += [b for b in rb.alloc_buffers if not any(b.same_as(a) for a in alloc)]
    root = SBlock([], [], [], "root", tirx.IfThenElse(cond, ra.body, rb.body), alloc_buffers=alloc)
    return fast.with_body(SBlockRealize([], True, root))


class CpuMatmulTiled(CPUScheduleRule):
    """Batched matmuls of activations (``S...S i j R``: attention's ``Q @ K^T`` with its scale / mask epilogue,
    ``P @ V``) as a register-blocked micro-kernel: ``MI`` rows x ``NJ`` SIMD vectors of ``j`` accumulated in local
    registers (cache_write) over the reduction, the epilogue applied per tile, the batch x head axes in parallel.

    The sequence axes are symbolic and any length runs a tiled body. Rows: the row-tile loop carries
    ``pragma_loop_partition_hint``, so TVM's LoopPartition splits the whole row tiles (predicate-free) off the partial
    last one (its per-row ``if`` does not depend on the SIMD lane, so it stays vector code). Columns: a predicate on
    the vectorized lane would make the vectorizer scalarize the tile (branchy scalar code, 10x slower; TVM's
    buffer-level predication does not apply to these accesses), so a symbolic column axis dispatches at run time:
    a multiple of the column tile runs the tile loop directly, any other length the same micro-kernel on columns
    padded to whole tiles (``pad_einsum``: the operand indexed by the column copied into a zero-padded buffer per
    batch x head, the product computed into a padded buffer) with the epilogue (or the copy into the output) as its
    own row-parallel loop over the real columns, vectorized, its last partial vector split off by LoopPartition;
    fewer than ``MIN_PAD`` columns run the previous schedule (:class:`CpuMatmul` or the plain loop nest: the padded
    body's fixed cost, about 4 us per call, is more than a 1-16 token product costs).
    Golden GPT, 128 tokens, 1 thread: ``P @ V`` 0.097 -> 0.025 ms, ``Q @ K^T`` (+ scale + mask) 0.083 -> 0.028 ms per
    call; at lengths that are not multiples of the tiles see bench/results/attn_seq_x86.md."""

    MI, NJ = 8, 2
    MIN_PAD = 20  # fewer columns than this (and not a multiple of the tile): the previous schedule (measured faster)

    def apply(self, func, target: Target, tunable: bool):
        if not isinstance(func, tirx.PrimFunc) or not self.is_target_available(target) or not _x86(target):
            return None
        try:
            got = self._tiled(func, target, pad=False)
            if got is None:
                return None
            fast, cond, _ = got
            if cond is not None:  # a symbolic column axis: whole column tiles, else padded ones, short rows as before
                prev = CpuMatmul().apply(func, target, tunable)
                prev = prev.mod["main"] if prev is not None else func
                padded = self._tiled(func, target, pad=True)
                if padded is not None:
                    cols = padded[2]
                    prev = _dispatch(padded[0], prev, tirx.GE(cols, tirx.const(self.MIN_PAD, str(cols.ty.dtype))))
                fast = _dispatch(fast, prev, cond)
        except Exception:  # noqa: BLE001 - a block shape this rule does not cover: leave it to the next rule
            return None
        return s_tir.Schedule(fast)

    def _tiled(self, func, target, pad: bool):
        """The tiled schedule, the run-time condition under which it needs no column padding (None: never pads) and
        the column extent. ``pad``: pad the symbolic column axis to whole tiles (the body for any length)."""
        sch = s_tir.Schedule(func)
        infos = normalize_prim_func(sch)
        if infos is None:
            return None
        infos = try_inline_contiguous_spatial(sch, infos)
        if infos is None or not infos:
            return None
        main, rest = infos[0], infos[1:]
        if any(not b.is_injective() for b in rest):
            return None
        kinds = main.dom_kind()
        if len(kinds) < 3 or not kinds.endswith("R") or set(kinds[:-1]) != {"S"}:
            return None
        if len({r.source.name for r in sch.get(main.block_rv).reads}) < 2:
            return None  # a reduction of one tensor (a norm's sum of squares), not a product of two
        for b in rest[:-1]:
            sch.compute_inline(b.block_rv)
        epi = rest[-1].block_rv if rest else None
        lanes = _lanes(target)
        block = main.block_rv
        *outer, i, j, k = sch.get_loops(block)
        iext, jext, kext = get_extent(sch, i), get_extent(sch, j), get_extent(sch, k)
        if isinstance(kext, int) and kext < lanes:
            return None  # an outer product (RoPE's positions x frequencies): nothing to tile
        mi = self.MI
        if isinstance(iext, int) and iext % mi:
            return None
        if isinstance(jext, int):
            if jext % lanes:
                return None
            nj = self.NJ if jext % (self.NJ * lanes) == 0 else 1
        else:
            nj = self.NJ
        cond = None
        if not isinstance(jext, int):
            rem = tirx.floormod(jext, nj * lanes)
            cond = tirx.EQ(rem, tirx.const(0, str(rem.ty.dtype)))
        pads, epi_at_row = [], False
        if pad and cond is not None:
            pads = self._pad_columns(sch, block, nj * lanes)
            out = sch.get_consumers(block)
            if len(out) != 1:
                return None
            if epi is not None:
                sch.compute_inline(out[0])  # the epilogue reads the padded product directly
            else:
                epi = out[0]  # the copy from the padded product into the output is the epilogue
            epi_at_row = True
            *outer, i, j, k = sch.get_loops(block)
        jo, jv, ji = sch.split(j, [None, nj, lanes])
        io, ii = sch.split(i, [None, mi])
        sch.reorder(*outer, io, jo, k, ii, jv, ji)
        sch.vectorize(ji)
        sch.unroll(jv)
        sch.unroll(ii)
        par = None
        if outer:
            par = sch.fuse(*outer) if len(outer) > 1 else outer[0]
            sch.parallel(par)
        wb = sch.cache_write(block, 0, "local")
        sch.reverse_compute_at(wb, jo)
        for blk in [wb] + ([epi] if epi is not None else []):
            if blk is wb or not epi_at_row:
                if blk is not wb:
                    sch.reverse_compute_at(blk, jo)
                inner = sch.get_loops(blk)[-2:]
                _, v = sch.split(sch.fuse(*inner), [None, lanes])
                sch.vectorize(v)
            else:  # its own loop nest over the real (unpadded) rows: one predicated vector at each row's end
                *rows, col = sch.get_loops(blk)
                sch.parallel(sch.fuse(*rows) if len(rows) > 1 else rows[0])
                co, ci = sch.split(col, [None, lanes])
                sch.vectorize(ci)
                sch.annotate(co, "pragma_loop_partition_hint", 1)
        sch.decompose_reduction(block, k)
        for p in pads:  # each batch x head pads its own operand slice (in parallel, while it is in cache)
            if par is not None:
                sch.compute_at(p, par)
            co, ci = sch.split(sch.get_loops(p)[-1], [None, lanes])
            sch.vectorize(ci)
            sch.annotate(co, "pragma_loop_partition_hint", 1)
        # rows stay predicated: TVM's LoopPartition splits the last (partial) row tile off the predicate-free ones
        sch.annotate(io, "pragma_loop_partition_hint", 1)
        sch.annotate(jo, "pragma_loop_partition_hint", 1)
        return sch.mod["main"], cond, jext

    @staticmethod
    def _pad_columns(sch, block, tile):
        """pad_einsum of ``block``'s second-to-last (column) axis to a multiple of ``tile``: the operand indexed by
        the column copied into a zero-padded buffer and the product computed into a padded one. Returns the operand
        pad blocks it added."""
        before = {sch.get(b).name_hint for b in sch.get_producers(block)}
        pads = [1] * len(sch.get_loops(block))
        pads[-2] = tile
        sch.pad_einsum(block, pads)
        return [b for b in sch.get_producers(block) if sch.get(b).name_hint not in before]


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


class CpuRowReduce(CPUScheduleRule):
    """Row-wise reductions followed by an elementwise pass over the same rows (softmax: max, exp, sum, divide) on a
    symbolic last axis: each reduction split by the SIMD width and rfactor-ed into SIMD-width partial results (LLVM
    does not vectorize float reductions without reassociation: the plain loops are latency-bound scalar chains), the
    elementwise passes vectorized, all in parallel loops over the rows. Rows of any length: the partial last chunk of
    a row keeps the split's predicate and LoopPartition (``pragma_loop_partition_hint`` on every chunk loop) splits
    it off the predicate-free ones. The blocks are gathered per row from the front: each partial reduction keeps its
    own row loop and the blocks after it are computed per row under it (reverse_compute_at), then the row loops are
    merged into one parallel loop (softmax: max + exp, sum, divide; each row's passes back to back while it is in
    cache). Gathering from the back (compute_at of every block at the last one's row, the previous schedule) is not
    used: TVM's compute_at of an rfactor-ed block drops the split's predicate, so the partial last chunk read past
    the row at lengths that are not a multiple of the SIMD width. Dispatched at run time: rows of at least
    ``MIN_ROW`` take this body (shorter rows pay more for the per-row partial reductions than they save: measured at
    16-47), others the plain loops."""

    MIN_ROW = 64

    def apply(self, func, target: Target, _: bool):
        if not isinstance(func, tirx.PrimFunc) or not self.is_target_available(target) or not _x86(target):
            return None
        try:
            got = self._rows(func, target)
        except Exception:  # noqa: BLE001 - a block structure this rule does not cover
            return None
        if got is None:
            return None
        fast, ext = got
        cond = tirx.GE(ext, tirx.const(self.MIN_ROW, str(ext.ty.dtype)))
        return s_tir.Schedule(_dispatch(fast, func, cond))

    def _rows(self, func, target):
        sch = s_tir.Schedule(func)
        infos = normalize_prim_func(sch)
        if infos is None or len(infos) < 3 or not infos[-1].is_injective():
            return None
        last = infos[-1]
        *outer, inner = sch.get_loops(last.block_rv)
        ext = get_extent(sch, inner)
        if isinstance(ext, int) or not outer:
            return None  # static rows are left to LLVM / other rules
        keep, nred = [], 0
        for b in infos[:-1]:
            if b.is_injective() and len(sch.get_consumers(b.block_rv)) == 1:
                sch.compute_inline(b.block_rv)
                continue
            kinds = b.dom_kind()
            if not b.is_injective():
                if kinds != "S" * len(outer) + "R":
                    return None
                nred += 1
            elif kinds != "S" * (len(outer) + 1):
                return None
            keep.append(b)
        if nred == 0:
            return None
        lanes = _lanes(target)
        naxes = len(outer)
        order, rf_row = [], {}
        for b in keep:
            if b.is_injective():
                order.append((b.block_rv, "S"))
                continue
            _, ki = sch.split(sch.get_loops(b.block_rv)[-1], [None, lanes])
            rf = sch.rfactor(ki, naxes)
            rows = sch.get_loops(rf)[:naxes]
            rf_row[len(order)] = sch.fuse(*rows) if len(rows) > 1 else rows[0]
            lane, chunk = sch.get_loops(rf)[-2:]  # row loops, then chunk and lane in either order -> chunk, lane
            if get_extent(sch, chunk) == lanes:
                lane, chunk = chunk, lane
            sch.reorder(chunk, lane)
            init = sch.decompose_reduction(rf, chunk)
            sch.vectorize(sch.get_loops(init)[-1])
            sch.unroll(lane)
            sch.annotate(chunk, "pragma_loop_partition_hint", 1)
            order += [(rf, "RF"), (b.block_rv, "R")]
        # each partial reduction keeps its own row loop (compute_at of an rfactor-ed block drops the split's
        # predicate: the partial last chunk of a row would then read past it), every other block is computed per row
        # after its producers (reverse_compute_at) or, when those are in two row loops (softmax's normalization reads
        # the exps and their sum), in a row loop of its own; the row loops are merged into one at the end
        row, segs = None, []
        for n, (blk, kind) in enumerate(order + [(last.block_rv, "S")]):
            if kind == "RF":
                row = rf_row[n]
                segs.append(row)
            elif row is not None:
                try:
                    sch.reverse_compute_at(blk, row)
                except s_tir.ScheduleError:  # producers in two segments (the exps and their sum): a segment of its own
                    row = None
            if row is None:
                rows = sch.get_loops(blk)[:naxes]
                row = sch.fuse(*rows) if len(rows) > 1 else rows[0]
                segs.append(row)
            if kind == "S":
                ko, ki = sch.split(sch.get_loops(blk)[-1], [None, lanes])
                sch.vectorize(ki)
                sch.annotate(ko, "pragma_loop_partition_hint", 1)
        if len(segs) == 1:
            return sch.mod["main"], ext
        # one row loop for all: each row's blocks run back to back while the row is in cache (1.3x faster than three
        # passes over the rows). merge() leaves a serial loop and parallel() refuses it (the rfactor-ed blocks are
        # not "complete" blocks under it); the rows are independent (every buffer written is indexed by the row), so
        # the merged loop is marked parallel directly
        merged = sch.get(sch.merge(*segs))
        return _parallel_root_loop(sch.mod["main"], merged), ext


def _parallel_root_loop(func, loop):
    """``func`` with ``loop`` (a statement of its root block's body) made a parallel loop."""
    from tvm.s_tir import SBlock, SBlockRealize

    par = tirx.For(loop.loop_var, loop.min, loop.extent, tirx.ForKind.PARALLEL, loop.body, annotations=loop.annotations)
    root = func.body.block
    body = root.body
    if body.same_as(loop):
        body = par
    elif isinstance(body, tirx.SeqStmt) and any(st.same_as(loop) for st in body.seq):
        body = tirx.SeqStmt([par if st.same_as(loop) else st for st in body.seq])
    else:
        raise ValueError("the loop is not a statement of the root block")
    blk = SBlock(root.iter_vars, root.reads, root.writes, root.name_hint, body, root.init, list(root.alloc_buffers),
                 list(root.match_buffers), root.annotations)  # fmt: skip
    return func.with_body(SBlockRealize([], True, blk))


_LIBM = ("exp", "exp2", "exp10", "log", "log2", "log10", "log1p", "pow", "sin", "cos", "tan", "asin", "acos", "atan",
         "atan2", "sinh", "cosh", "tanh", "erf", "sqrt", "rsqrt")  # fmt: skip


def _calls_libm(stmt) -> bool:
    """Whether ``stmt`` calls a math intrinsic LLVM lowers to a scalar libm call (vectorizing those only adds
    shuffles: the RoPE cos/sin tables were 1.4x slower vectorized). TVM 0.27 has no Python TIR visitor: the
    statement's TVMScript is scanned for ``T.<intrinsic>(``."""
    import re

    return re.search(r"\bT\.(" + "|".join(_LIBM) + r")\(", stmt.script()) is not None


class CpuInjectiveInner(CPUScheduleRule):
    """Elementwise / broadcast / layout blocks whose innermost axis is static and a multiple of the SIMD width (RoPE
    over the head dimension, the SiLU gate over the hidden size): that axis alone is split by the SIMD width and
    vectorized, the outer (symbolic) axes stay loops. Fusing every axis first (:class:`CpuInjective`) turns each
    lane's index into divisions by symbolic extents (gathers, 3-10x slower than LLVM's own loops); vectorizing only
    the static innermost axis keeps contiguous vector loads. When the innermost axis is symbolic (RoPE of K written
    transposed to ``[.., head_dim, seq]``), the innermost static axis is moved inside and vectorized instead (strided
    stores, contiguous loads). Golden GPT, 128 tokens, 1 thread: RoPE 0.027 -> 0.002 ms (Q) and 0.031 -> 0.008 ms
    (K, transposed), SiLU-gate 0.034 -> 0.014 ms per call."""

    def apply(self, func, target: Target, _: bool):
        if not isinstance(func, tirx.PrimFunc) or not self.is_target_available(target) or not _x86(target):
            return None
        sch = s_tir.Schedule(func)
        infos = normalize_prim_func(sch)
        if infos is None or not all(b.is_injective() for b in infos):
            return None
        infos = try_inline_contiguous_spatial(sch, infos)
        if infos is None or len(infos) != 1 or not infos[0].is_injective():
            return None
        loops = sch.get_loops(infos[0].block_rv)
        blk = sch.get(infos[0].block_rv)
        if len(loops) < 2 or blk.init is not None or _calls_libm(blk.body):
            return None  # (a block with an init is a reduction whose reduced axis has extent 1)
        lanes = _lanes(target)
        exts = [get_extent(sch, lp) for lp in loops]
        if isinstance(exts[-1], int):
            if exts[-1] % lanes or exts[-1] < lanes:
                return None
            vec = loops[-1]
        else:  # symbolic innermost axis (a transpose to [.., head_dim, seq]): vectorize the innermost static one
            cand = [i for i, e in enumerate(exts) if isinstance(e, int) and e >= lanes and e % lanes == 0]
            if not cand:
                return None
            vec = loops[cand[-1]]
            sch.reorder(*[lp for i, lp in enumerate(loops) if i != cand[-1]], vec)
        _, vi = sch.split(vec, [None, lanes])
        sch.vectorize(vi)
        return sch


def cpu_rules():
    """DLight rules applied on CPU targets, first match wins. Measured on the golden GPT (1 thread, 128 tokens):
    CpuMatmul takes the attention's ``P @ V`` from 28% of the run time to 3%; TVM's cpu GEMV/Reduction rules and
    CpuInjective made softmax, transposes and adds with symbolic extents slower than LLVM's own loops, so they are not
    applied. On x86, CpuMatmulTiled / CpuRowReduce / CpuInjectiveInner (tiled attention matmuls, row-wise softmax,
    innermost-axis vectorized elementwise) take the legalized ops from 1.8 to 0.9 ms per 128-token forward
    (bench/results/profile_x86.md); aarch64 / wasm keep CpuMatmul alone (not measured there)."""
    from tvm.s_tir import dlight as dl

    return [CpuMatmulTiled(), CpuMatmul(), CpuRowReduce(), CpuInjectiveInner()]


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

