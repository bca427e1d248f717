"""Kernel registry: which generated kernel computes a Linear layer, by weight format and target.

Every compressed ``Linear`` (``y[M, out] = x[M, in] @ W.T (+ bias)``) is lowered by :mod:`sparsec.backends.lower`
to one call of a kernel chosen here. A *kernel generator* is a function registered with :func:`register_kernel`::

    from sparsec.backends.kernels.registry import (KernelImpl, WeightParam, register_kernel, ShapeHints)

    def prepare_nm24(linear, config):           # pure numpy; runs at build time AND at load time
        w = linear.weight                      # an NMSparse (see compressor/formats.py)
        return [vals_fp16(w), meta_in_mma_sp_order(w)]

    @register_kernel("cuda.nm24_mma_sp", formats=("nm_sparse[dense]",), targets=("cuda",), priority=20,
                     prepare=prepare_nm24)
    def nm24_mma_sp(linear, target, hints, tuning):
        w = linear.weight
        if (w.n, w.m) != (2, 4):
            return None                        # None = "not me": the registry tries the next generator
        cfg = hints.config or tuning.lookup("cuda.nm24_mma_sp", target, linear_key(linear, hints))
        tuned = cfg is not None
        cfg = cfg or {"block_m": 128, "block_n": 128, "stages": 3}
        out, in_ = w.shape
        return KernelImpl(
            name="cuda.nm24_mma_sp",
            func=make_prim_func(w.shape, cfg),                     # tvm.tir.PrimFunc, see "calling convention"
            params=[WeightParam("values", (out, in_ // 2), "float16"),
                    WeightParam("meta", (out, in_ // 16), "uint32")],
            act_dtype="float16", config=cfg, tuned=tuned)

Calling convention of ``KernelImpl.func`` (a TIR ``PrimFunc``, lowered through ``relax.call_tir``)
------------------------------------------------------------------------------------------------------
``func(x, p_0, ..., p_k, y)``: ``x`` is ``[M, in]`` of ``act_dtype`` (``M`` symbolic: one ``T.int64`` var, the
flattened tokens; ``in`` static), ``p_i`` are the weight parameters of ``params`` (static shapes, their dtypes), ``y``
is the ``[M, out]`` output of ``out_dtype`` (default: ``act_dtype``). When ``fuses_bias`` is true the bias is the last
parameter (the generator lists it in ``params`` with name ``"bias"`` and ``prepare`` returns it); otherwise the
lowering adds the bias after the call. The lowering casts the model's activations to ``act_dtype`` before the call and
the result back after it (a kernel that wants fp16 on a fp32 graph gets fp16). One function serves every ``M``: a
generator that wants a GEMV (M <= 16, decode) and a GEMM (prefill) schedule puts both loop nests in the function
behind an ``if M <= 16`` (see kernels/cpu.py), or returns ``emit`` instead of ``func``.

GPU ``PrimFunc`` s must come already scheduled (threads bound) and carry the function attribute
``"tirx.is_scheduled": True`` so that the build's DLight pass leaves them alone; CPU ones are plain loop nests
(TVMScript without schedulable blocks) with ``"op_pattern": 8`` (opaque: never fused with neighbours).

``emit`` (alternative to ``func``): ``emit(bb, x, params) -> relax.Expr`` with ``bb`` the ``relax.BlockBuilder``,
``x`` the ``[M, in]`` Relax expression and ``params`` the Relax parameter variables (in ``params`` order); it
returns ``[M, out]``. Use it for kernels that are several calls, externs (``R.call_dps_packed``) or Relax ops.

``extra_modules``: optional list of ``tvm.runtime.Module`` or source files the build must link in (e.g. a CUDA
kernel written as source, compiled by :mod:`sparsec.backends.cuda_build`).

Weight parameters are not baked into the library: they become Relax function parameters. The generator's registered
``prepare(linear, config) -> list[np.ndarray]`` produces them (in ``params`` order) from the ``Linear``'s format and
bias; the build records, for every parameter, the kernel name, the layer and the ``config``, and the runtime
(:mod:`sparsec.backends.runtime`) calls the same ``prepare`` again at load time on the format read from the artifact's
``weights.safetensors`` (cheap repacking: metadata reordering, nibble interleaving, fp16 casts). So ``prepare`` must be
deterministic, pure numpy, and depend only on the ``Linear`` and the JSON-able ``config``. The runtime may run with a
runtime-only TVM (no compiler library, e.g. on the GPU machine): kernel modules must import nothing from TVM's
compiler at module level (build PrimFuncs inside the generator function).

Format keys
-----------
:func:`format_key` names a weight's structure: ``dense``, ``group_quant``, ``nm_sparse[dense]``,
``nm_sparse[group_quant]``, ``low_rank[nm_sparse[dense]]`` ... ``formats`` patterns are matched with ``fnmatch``
(``nm_sparse[*]`` matches both N:M variants; note ``[`` must then be escaped as ``[[]`` -- use :func:`fmt_pattern`
or give keys literally: literal keys are compared for equality first). Generators decide on the details themselves
(N:M ratio, bits, group size, symmetric, group sparsity, shapes, dtypes) and return ``None`` when they do not
apply. ``LowRank`` weights are decomposed by the lowering (``base(x) + (x @ B.T) @ A.T``) unless a generator
claims a ``low_rank[...]`` key.

Targets
-------
``targets`` entries match ``Target.kind`` (``"cuda"``, ``"llvm"``, ``"wasm"``) or a target's base name (``"x86"``,
``"h100"``, ``"aarch64"`` ...). ``target`` passed to the generator is the :class:`sparsec.backends.targets.Target`
(``.name``, ``.kind``, ``.arch`` e.g. ``"sm_80"`` / ``"sm_90a"``, ``.features``, ``.tvm`` dict); :func:`vector_lanes`
gives the SIMD width for a dtype.

Selection
---------
:func:`select_kernel` tries matching generators by descending ``priority`` (then name); the first non-``None``
result wins. When none applies, dense weights take TVM's own dense path (Relax ``matmul``: DLight GPU schedules on
CUDA, default LLVM lowering on CPU; generator name ``"tvm.dense"``), and any other format is materialized to a dense
weight with a ``note`` saying which format lacked a kernel on that target (reported in the build report, never
silent).

Tuning
------
``tuning`` is a :class:`sparsec.backends.tune.TuningDB`. ``tuning.lookup(kernel_name, target, key)`` returns the
stored config dict or ``None`` (then use a sound default and set ``tuned=False``: the report says "untuned").
:func:`linear_key` builds the standard key (format key, N:M, bits, group size, out, in, act dtype). A generator that
can be tuned also registers its search space with ``search_space=`` (a function ``(linear, target, hints) ->
list[dict]`` of candidate configs, see :mod:`sparsec.backends.tune`); ``sparsec tune`` measures each candidate
(by rebuilding the kernel with ``hints.config`` set to the candidate) and stores the fastest. ``refine_space=``
(``(linear, target, config) -> (configs, m_min) | None``) adds a second stage around the first stage's winner: configs
that change only the code running at M >= m_min (the CPU prefill GEMM's blocking), scored at those token counts.
"""
from __future__ import annotations

import fnmatch
import importlib
import pkgutil
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    from ...compressor.ir import Linear
    from ..targets import Target
    from ..tune import TuningDB

__all__ = [
    "WeightParam",
    "KernelImpl",
    "ShapeHints",
    "KernelGenerator",
    "register_kernel",
    "kernel_registry",
    "select_kernel",
    "format_key",
    "fmt_pattern",
    "linear_key",
    "vector_lanes",
    "DENSE_KERNEL",
    "get_prepare",
    "prepare_params",
    "dense_prepare",
]

DENSE_KERNEL = "tvm.dense"


@dataclass(frozen=True)
class WeightParam:
    """One weight parameter of a kernel: a Relax function parameter bound from the artifact's weights at load time."""

    name: str  # role: "values", "meta", "codes", "scales", "zeros", "bias", ...
    shape: tuple[int, ...]
    dtype: str


@dataclass
class KernelImpl:
    """What a generator returns: the kernel for one Linear on one target."""

    name: str  # generator name (the registry key); shown in the build report
    params: list[WeightParam]
    func: Any = None  # tvm.tir.PrimFunc  func(x[M,in], *params, y[M,out])
    emit: Callable | None = None  # emit(bb, x, params) -> relax.Expr  (alternative to func)
    act_dtype: str = "float32"
    out_dtype: str | None = None  # default act_dtype
    fuses_bias: bool = False
    config: dict[str, Any] = field(default_factory=dict)  # the schedule/config used (stored in the build report)
    tuned: bool = False
    note: str = ""  # e.g. why a fallback was used
    extra_modules: list[Any] = field(default_factory=list)

    def __post_init__(self):
        if (self.func is None) == (self.emit is None):
            raise ValueError(f"kernel {self.name}: give exactly one of func (a PrimFunc) or emit")
        if self.out_dtype is None:
            self.out_dtype = self.act_dtype

    def check_prepared(self, arrays: list[np.ndarray]) -> list[np.ndarray]:
        """Validate ``prepare``'s output against ``params`` (shape, dtype); returns contiguous arrays."""
        if len(arrays) != len(self.params):
            raise ValueError(f"kernel {self.name}: prepare returned {len(arrays)} arrays for {len(self.params)} params")
        out = []
        for a, p in zip(arrays, self.params):
            a = np.require(a, requirements="C")
            if tuple(a.shape) != tuple(p.shape) or str(a.dtype) != p.dtype:
                raise ValueError(f"kernel {self.name}: param {p.name} is {a.dtype}{list(a.shape)}, declared {p.dtype}{list(p.shape)}")
            out.append(a)
        return out


@dataclass
class ShapeHints:
    """What the lowering knows about the call site.

    ``m``: the name of the symbolic token dimension (always symbolic in the library); ``m_hint``: a typical value
    when known (``None``: both decode and prefill happen); ``act_dtype``: the model's activation dtype there;
    ``config``: a schedule config forced by the tuner (generators must use it instead of the database when set).
    """

    m: str = "m"
    m_hint: int | None = None
    act_dtype: str = "float32"
    config: dict[str, Any] | None = None


@dataclass
class KernelGenerator:
    name: str
    fn: Callable[..., KernelImpl | None]
    formats: tuple[str, ...]
    targets: tuple[str, ...]
    priority: int = 0
    prepare: Callable[..., list[np.ndarray]] | None = None  # prepare(linear, config) -> arrays for KernelImpl.params
    search_space: Callable[..., list[dict]] | None = None
    description: str = ""
    # refine_space(linear, target, config) -> (configs, m_min): a second stage of the search around the first stage's
    # winner (configs differing only in what runs at M >= m_min, scored there alone), or None
    refine_space: Callable[..., tuple[list[dict], int] | None] | None = None
    # shapes(linear) -> the shape requirement this layer misses ("in_features a multiple of 32") or None: the note of
    # a layer the format's kernels decline
    shapes: Callable[..., str | None] | None = None

    def matches(self, fkey: str, target: "Target") -> bool:
        tnames = {target.kind, target.name, target.name.partition(":")[0]}
        if not any(t in tnames for t in self.targets):
            return False
        return any(p == fkey or fnmatch.fnmatchcase(fkey, p) for p in self.formats)


_REGISTRY: dict[str, KernelGenerator] = {}
_LOADED = False


def register_kernel(name: str, *, formats: tuple[str, ...], targets: tuple[str, ...], prepare: Callable[..., list[np.ndarray]],
                    priority: int = 0, search_space: Callable[..., list[dict]] | None = None,
                    refine_space: Callable[..., tuple[list[dict], int] | None] | None = None,
                    shapes: Callable[..., str | None] | None = None):  # fmt: skip
    """Decorator registering a kernel generator ``fn(linear, target, hints, tuning) -> KernelImpl | None``.

    ``prepare(linear, config) -> list[np.ndarray]``: the kernel's weight parameters (see the module docstring)."""

    def deco(fn):
        if name in _REGISTRY and _REGISTRY[name].fn is not fn:
            raise ValueError(f"kernel generator {name!r} is registered twice")
        doc = (fn.__doc__ or "").strip().splitlines()
        _REGISTRY[name] = KernelGenerator(name, fn, tuple(formats), tuple(targets), priority, prepare, search_space,
                                          doc[0] if doc else "", refine_space, shapes)  # fmt: skip
        return fn

    return deco


def kernel_registry() -> dict[str, KernelGenerator]:
    """Every generator: each module of the ``sparsec.backends.kernels`` package registers its own on import."""
    global _LOADED
    if not _LOADED:
        _LOADED = True
        import sparsec.backends.kernels as pkg

        for mod in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda m: m.name):
            if mod.name != "registry" and not mod.name.startswith("_") and not mod.name.endswith("_test"):
                importlib.import_module(f"sparsec.backends.kernels.{mod.name}")
    return _REGISTRY


def format_key(weight) -> str:
    """Structure of a weight format: ``dense``, ``nm_sparse[group_quant]``, ``low_rank[nm_sparse[dense]]`` ..."""
    kids = weight._children()
    if not kids:
        return weight.kind
    inner = ",".join(format_key(c) for _, c in sorted(kids.items()))
    return f"{weight.kind}[{inner}]"


def fmt_pattern(pattern: str) -> str:
    """A format-key pattern with ``*`` wildcards, escaped for fnmatch (``[`` ``]`` literal)."""
    return "".join({"[": "[[]", "]": "[]]"}.get(c, c) for c in pattern)


def linear_key(linear: "Linear", hints: ShapeHints | None = None) -> dict[str, Any]:
    """The standard tuning-database key of a Linear: format structure and parameters, shape, activation dtype."""
    w = linear.weight
    key: dict[str, Any] = {"format": format_key(w), "out": int(w.shape[0]), "in": int(w.shape[1])}
    nm = w.find("nm_sparse")
    if nm is not None:
        key["nm"] = f"{nm.n}:{nm.m}"
    gq = w.find("group_quant")
    if gq is not None:
        key["bits"] = gq.bits
        key["group_size"] = gq.group_size
        key["symmetric"] = gq.symmetric
        key["group_sparse"] = gq.group_mask_packed is not None
    key["act_dtype"] = (hints.act_dtype if hints else "float32")
    if hints is not None and hints.m_hint is not None:
        key["m"] = int(hints.m_hint)
    return key


def vector_lanes(target: "Target", dtype: str = "float32") -> int:
    """SIMD lanes of ``dtype`` on an LLVM target (x86: from the host's features; NEON/simd128: 128-bit)."""
    bits = {"float32": 32, "float16": 16, "int8": 8, "uint8": 8, "int32": 32, "float64": 64}.get(dtype, 32)
    if target.kind == "cuda":
        return 1
    width = 128
    if target.name.partition(":")[0] == "x86":
        width = _host_vector_bits()
    return max(1, width // bits)


def _host_vector_bits() -> int:
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:  # pragma: no cover
        return 128
    if " avx512f" in flags:
        return 512
    if " avx2" in flags or " avx " in flags:
        return 256
    return 128


def select_kernel(linear: "Linear", target: "Target", hints: ShapeHints | None = None, tuning: "TuningDB | None" = None,
                  only: str | None = None) -> KernelImpl:  # fmt: skip
    """The kernel for ``linear`` on ``target``: the best registered generator that accepts it, else TVM's dense path
    (dense weights) or a materialized dense weight with a note (formats without a kernel on this target).
    ``only`` restricts the choice to one generator (the tuner uses it)."""
    from ..tune import TuningDB

    hints = hints or ShapeHints()
    tuning = tuning if tuning is not None else TuningDB.empty()
    fkey = format_key(linear.weight)
    gens = [g for g in kernel_registry().values() if g.matches(fkey, target) and (only is None or g.name == only)]
    gens.sort(key=lambda g: (-g.priority, g.name))
    for g in gens:
        impl = g.fn(linear, target, hints, tuning)
        if impl is not None:
            if impl.name != g.name:
                impl.name = g.name
            return impl
    if only is not None and only != DENSE_KERNEL:
        raise LookupError(f"kernel generator {only!r} does not apply to {linear.name} ({fkey}) on {target.name}")
    impl = dense_kernel(linear, hints, fkey)
    needs = sorted({r for r in (g.shapes(linear) for g in gens if g.shapes is not None) if r})
    if fkey != "dense" and needs:  # this format has kernels here, not for this layer's shape: say why
        impl.note = f"the {fkey} kernels on this target need {' or '.join(needs)}: weight materialized dense"
    return impl


def dense_prepare(linear: "Linear", config: dict[str, Any]) -> list[np.ndarray]:
    """Parameters of TVM's dense path: the weight materialized, transposed to ``[in, out]``, in ``config['dtype']``."""
    return [np.ascontiguousarray(linear.weight.materialize().T.astype(config.get("dtype", "float32")))]


def get_prepare(name: str) -> Callable[..., list[np.ndarray]]:
    """The ``prepare(linear, config)`` of a kernel generator by name (the runtime uses it at load time)."""
    if name == DENSE_KERNEL:
        return dense_prepare
    gen = kernel_registry().get(name)
    if gen is None or gen.prepare is None:
        raise KeyError(f"no kernel generator {name!r} with a prepare function in this sparsec")
    return gen.prepare


def prepare_params(impl: KernelImpl, linear: "Linear") -> list[np.ndarray]:
    """``impl``'s weight parameters for ``linear``, checked against the declared shapes and dtypes."""
    return impl.check_prepared(get_prepare(impl.name)(linear, impl.config))


def dense_kernel(linear: "Linear", hints: ShapeHints, fkey: str | None = None) -> KernelImpl:
    """TVM's own dense path: ``matmul(x, W.T)`` as a Relax op (legalized, then DLight on GPU / LLVM on CPU).

    The weight is stored transposed (``[in, out]``) in the activation dtype so that the Relax graph needs no
    transpose at run time."""
    from tvm import relax

    fkey = fkey or format_key(linear.weight)
    out_f, in_f = linear.weight.shape
    dt = hints.act_dtype

    def emit(bb, x, params):
        return bb.emit(relax.op.matmul(x, params[0]))

    note = "" if fkey == "dense" else f"no kernel for {fkey} on this target: weight materialized dense"
    return KernelImpl(DENSE_KERNEL, [WeightParam("weight_t", (in_f, out_f), dt)], emit=emit, act_dtype=dt,
                      config={"dtype": dt, "schedule": "tvm-default"}, tuned=False, note=note)  # fmt: skip
