"""Torch implementations of generic ONNX ops: the nodes the IR does not raise, for the executor and constant folding.

``run_op(op_type, domain, inputs, attrs, opset, node_name)`` follows the ONNX semantics of the model's default-domain
opset (13..21 are tested; older and newer forms are handled where they are cheap): attribute defaults per op and
version, axes given as attribute or input depending on the version, integer, dtype and broadcasting rules. Where the
specification leaves a choice open, the behaviour of onnxruntime's CPU provider is followed (it is the reference of
``tests/test_onnx_ops.py``).

Conventions:

* ``inputs`` are torch tensors in ONNX input order, ``None`` for an omitted optional input. Outputs stay on the device
  of the inputs; only small shape / axes / scalar arguments are read back to the host (``.tolist()``).
* ``attrs`` maps attribute names to python values (float, int, str, lists, ``np.ndarray`` for TENSOR attributes).
  A missing attribute takes the default that the op's registration declares for the given opset (see :func:`op`).
* The result is the list of the op's outputs, optional outputs included (e.g. LayerNormalization's Mean and
  InvStdDev, Dropout's mask, TopK's indices); callers use as many as the node names.
* An op, attribute value or dtype this module cannot execute raises :class:`UnsupportedOpError` naming the node; a
  shape problem inside torch (incompatible shapes, index out of range) raises :class:`ShapeError` naming the node.

Adding an op: write ``@op("Name", attr=default, ...)`` on a function ``fn(c, *inputs)`` where ``c`` is a
:class:`Ctx`; read attributes with ``c.a("attr")`` (defaults applied) or ``c.req("attr")`` (required), and axes with
``c.axes(input, since=...)``.
"""
from __future__ import annotations

import math
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from .errors import IRError, ShapeError, UnsupportedOpError

Tensor = torch.Tensor

__all__ = ["SUPPORTED", "supported", "run_op", "ONNX_DTYPES", "onnx_dtype", "by_opset"]

# ONNX TensorProto.DataType -> torch dtype (the ONNX types torch has).
ONNX_DTYPES: dict[int, torch.dtype] = {
    1: torch.float32, 2: torch.uint8, 3: torch.int8, 4: torch.uint16, 5: torch.int16, 6: torch.int32, 7: torch.int64,
    9: torch.bool, 10: torch.float16, 11: torch.float64, 12: torch.uint32, 13: torch.uint64, 16: torch.bfloat16,
    17: torch.float8_e4m3fn, 18: torch.float8_e4m3fnuz, 19: torch.float8_e5m2, 20: torch.float8_e5m2fnuz,
}  # fmt: skip
_TORCH_TO_ONNX = {v: k for k, v in ONNX_DTYPES.items()}

# float8 types: (largest finite value, the magnitude above which rounding overflows, whether the tie at that magnitude
# overflows (largest value has an odd mantissa), what an overflow becomes without saturation ('nan' or 'inf')).
_FLOAT8 = {
    torch.float8_e4m3fn: (448.0, 464.0, False, "nan"),
    torch.float8_e4m3fnuz: (240.0, 248.0, True, "nan"),
    torch.float8_e5m2: (57344.0, 61440.0, True, "inf"),
    torch.float8_e5m2fnuz: (57344.0, 61440.0, True, "nan"),
}


def onnx_dtype(to: int) -> torch.dtype | None:
    """The torch dtype of an ONNX TensorProto data type, or None when torch has none."""
    return ONNX_DTYPES.get(int(to))


# ------------------------------------------------------------------------------------------------------------------
# registry


class by_opset:  # noqa: N801 - reads as a declaration: alpha=by_opset({1: 1, 13: -1})
    """An attribute default that changes with the opset: ``by_opset({1: 1, 13: -1})`` is 1 before 13, -1 from 13."""

    __slots__ = ("table",)

    def __init__(self, table: dict[int, Any]):
        self.table = sorted(table.items())

    def at(self, opset: int) -> Any:
        value = self.table[0][1]
        for since, v in self.table:
            if opset >= since:
                value = v
        return value


class _OpDef:
    __slots__ = ("fn", "defaults")

    def __init__(self, fn: Callable, defaults: dict[str, Any]):
        self.fn, self.defaults = fn, defaults


_REG: dict[tuple[str, str], _OpDef] = {}
SUPPORTED: dict[str, set[str]] = {}


def op(*names: str, domain: str = "", **defaults: Any):
    """Register ``fn(c, *inputs)`` for the op types ``names`` of ``domain``; keyword arguments are attribute defaults
    (a plain value, or :class:`by_opset` for one that changed between versions)."""

    def deco(fn):
        for n in names:
            _REG[(domain, n)] = _OpDef(fn, defaults)
            SUPPORTED.setdefault(domain, set()).add(n)
        return fn

    return deco


def _norm_domain(d: str | None) -> str:
    return "" if d in (None, "", "ai.onnx") else d


def supported(op_type: str, domain: str = "") -> bool:
    """Whether :func:`run_op` implements ``op_type`` of ``domain`` (some attribute values may still be refused)."""
    return (_norm_domain(domain), op_type) in _REG


class Ctx:
    """What an op implementation sees besides its inputs: attributes with defaults, opset, node name."""

    __slots__ = ("attrs", "defaults", "opset", "name", "op", "n_out")

    def __init__(self, attrs: dict, defaults: dict, opset: int, name: str, op_type: str, n_out: int | None):
        self.attrs, self.defaults, self.opset, self.name, self.op, self.n_out = attrs, defaults, opset, name, op_type, n_out

    def a(self, key: str, default: Any = None) -> Any:
        """Attribute ``key``; when absent, the registered default for this opset, else ``default``."""
        if key in self.attrs and self.attrs[key] is not None:
            return _attr_value(self.attrs[key])
        d = self.defaults.get(key, default)
        return d.at(self.opset) if isinstance(d, by_opset) else d

    def req(self, key: str) -> Any:
        v = self.a(key)
        if v is None:
            raise IRError(f"{self.op} needs the attribute '{key}'", node=self.name)
        return v

    def axes(self, t: Tensor | None, since: int, key: str = "axes") -> list[int] | None:
        """Axes (or another int list) from the attribute before opset ``since``, from input ``t`` from then on.
        None when not given; [] when given empty."""
        if self.opset >= since:
            return None if t is None else _ints(t)
        v = self.a(key)
        return None if v is None else [int(i) for i in v]

    def unsupported(self, what: str) -> UnsupportedOpError:
        return UnsupportedOpError(f"{self.op}: {what} at node '{self.name}'")


def _attr_value(v: Any) -> Any:
    if hasattr(v, "dims") and hasattr(v, "data_type"):  # an onnx TensorProto that was not converted
        from onnx import numpy_helper

        return numpy_helper.to_array(v)
    if isinstance(v, bytes):
        return v.decode()
    return v


def run_op(op_type: str, domain: str, inputs: list[Tensor | None], attrs: dict, opset: int, node_name: str,
           num_outputs: int | None = None) -> list[Tensor]:  # fmt: skip
    """Execute one ONNX node. ``num_outputs`` (the node's output count) is needed only by Split without sizes before
    opset 18; everything else ignores it."""
    d = _REG.get((_norm_domain(domain), op_type))
    if d is None:
        dom = f"{domain}." if _norm_domain(domain) else ""
        raise UnsupportedOpError(f"op {dom}{op_type} is not supported by the executor at node '{node_name}'")
    c = Ctx(attrs or {}, d.defaults, int(opset), node_name, op_type, None if num_outputs is None else int(num_outputs))
    ins = list(inputs)
    while ins and ins[-1] is None:  # trailing omitted optional inputs take the function's defaults
        ins.pop()
    try:
        out = d.fn(c, *ins)
    except (UnsupportedOpError, IRError):
        raise
    except NotImplementedError as e:  # a torch kernel missing for this dtype / device
        raise c.unsupported(_first_line(e)) from e
    except TypeError as e:
        if "positional argument" in str(e) and getattr(e.__traceback__, "tb_next", None) is None:  # the call itself
            raise IRError(f"{op_type} got {len(ins)} inputs: {_first_line(e)}", node=node_name) from e
        raise
    except (RuntimeError, IndexError, ValueError) as e:
        msg = _first_line(e)
        if "not implemented for" in msg:
            raise c.unsupported(msg) from e
        raise ShapeError(f"{op_type} failed: {msg}", node=node_name) from e
    return list(out) if isinstance(out, (list, tuple)) else [out]


def _first_line(e: Exception) -> str:
    s = str(e).strip()
    return s.splitlines()[0] if s else type(e).__name__


# ------------------------------------------------------------------------------------------------------------------
# helpers


def _ints(t: Tensor | None) -> list[int] | None:
    if t is None:
        return None
    return [int(v) for v in t.reshape(-1).tolist()]


def _scalar(t: Tensor) -> Any:
    return t.reshape(-1)[0].item()


def _prod(xs) -> int:
    p = 1
    for v in xs:
        p *= int(v)
    return p


def _is_float(t: Tensor) -> bool:
    return t.dtype.is_floating_point


def _norm_axis(a: int, rank: int, c: Ctx | None = None) -> int:
    if not -rank <= a < max(rank, 1):
        raise ShapeError(f"axis {a} is out of range for rank {rank}", node=c.name if c else None)
    return a % rank if rank else 0


def _pad_last(x: Tensor, pads_begin: list[int], pads_end: list[int], value: float = 0.0) -> Tensor:
    """Constant-pad the trailing ``len(pads_begin)`` dims of x (negative pads crop)."""
    tp: list[int] = []
    for b, e in zip(reversed(pads_begin), reversed(pads_end)):
        tp += [int(b), int(e)]
    return F.pad(x, tp, value=value) if any(tp) else x


# ------------------------------------------------------------------------------------------------------------------
# elementwise binary ops


def _same(a: Tensor, b: Tensor) -> Tensor:
    return b if b.dtype == a.dtype else b.to(a.dtype)


def _div(a: Tensor, b: Tensor) -> Tensor:
    if _is_float(a):
        return a / b
    return torch.div(a, b, rounding_mode="trunc")  # C++ integer division, as onnxruntime


for _name, _fn in {"Add": torch.add, "Sub": torch.sub, "Mul": torch.mul, "Div": _div}.items():
    op(_name)(lambda c, a, b, *, _f=_fn: _f(a, _same(a, b)))


@op("Pow")
def _pow(c, a, b):
    """The result has the base's dtype; an integer result is the truncated power (onnxruntime: cast of std::pow)."""
    if _is_float(a):
        return torch.pow(a, b).to(a.dtype)  # a wider float exponent computes wide, then rounds to the base type
    if not _is_float(b) and bool((b >= 0).all()):
        return torch.pow(a, b.to(a.dtype))
    return torch.pow(a.double(), b.double()).trunc().to(a.dtype)


@op("Mod", fmod=0)
def _mod(c, a, b):
    b = _same(a, b)
    if c.a("fmod"):
        return torch.fmod(a, b)  # sign of the dividend (C fmod)
    return torch.remainder(a, b)  # sign of the divisor (floor mod; for floats this is opset 28's fmod=0)


def _variadic(fn):
    def impl(c, *xs):
        out = xs[0]
        for x in xs[1:]:
            out = fn(out, _same(out, x))
        return out

    return impl


op("Max")(_variadic(torch.maximum))
op("Min")(_variadic(torch.minimum))
op("Sum")(_variadic(torch.add))


@op("Mean")
def _mean(c, *xs):
    return _variadic(torch.add)(c, *xs) / len(xs)


for _name, _fn in {
    "Equal": torch.eq, "Less": torch.lt, "LessOrEqual": torch.le, "Greater": torch.gt, "GreaterOrEqual": torch.ge,
    "And": torch.logical_and, "Or": torch.logical_or, "Xor": torch.logical_xor,
    "BitwiseAnd": torch.bitwise_and, "BitwiseOr": torch.bitwise_or, "BitwiseXor": torch.bitwise_xor,
}.items():  # fmt: skip
    op(_name)(lambda c, a, b, *, _f=_fn: _f(a, b))


@op("BitShift")
def _bitshift(c, x, y):
    d = c.req("direction")
    if d == "LEFT":
        return torch.bitwise_left_shift(x, _same(x, y))
    if d == "RIGHT":
        return torch.bitwise_right_shift(x, _same(x, y))
    raise c.unsupported(f"direction {d!r}")


# ------------------------------------------------------------------------------------------------------------------
# elementwise unary ops and activations

_UNARY: dict[str, Callable[[Tensor], Tensor]] = {
    "Neg": torch.neg, "Abs": torch.abs, "Sign": torch.sign, "Exp": torch.exp, "Log": torch.log, "Sqrt": torch.sqrt,
    "Reciprocal": torch.reciprocal, "Floor": torch.floor, "Ceil": torch.ceil, "Round": torch.round,  # half to even
    "Sin": torch.sin, "Cos": torch.cos, "Tan": torch.tan, "Asin": torch.asin, "Acos": torch.acos, "Atan": torch.atan,
    "Sinh": torch.sinh, "Cosh": torch.cosh, "Asinh": torch.asinh, "Acosh": torch.acosh, "Atanh": torch.atanh,
    "Tanh": torch.tanh, "Sigmoid": torch.sigmoid, "Relu": torch.relu, "Erf": torch.erf, "Softsign": F.softsign,
    "Mish": F.mish, "Not": torch.logical_not, "BitwiseNot": torch.bitwise_not, "IsNaN": torch.isnan,
    "Identity": lambda x: x,
}  # fmt: skip
for _name, _fn in _UNARY.items():
    op(_name)(lambda c, x, *, _f=_fn: _f(x))


@op("IsInf", detect_positive=1, detect_negative=1)
def _isinf(c, x):
    out = torch.zeros_like(x, dtype=torch.bool)
    if c.a("detect_positive"):
        out |= torch.isposinf(x)
    if c.a("detect_negative"):
        out |= torch.isneginf(x)
    return out


@op("Softplus")
def _softplus(c, x):
    return torch.where(x > 0, x + torch.log1p(torch.exp(-x)), torch.log1p(torch.exp(x)))


@op("LeakyRelu", alpha=0.01)
def _leaky(c, x):
    return torch.where(x >= 0, x, x * c.a("alpha"))


@op("PRelu")
def _prelu(c, x, slope):
    return torch.where(x >= 0, x, x * _same(x, slope))


@op("Elu", alpha=1.0)
def _elu(c, x):
    return torch.where(x >= 0, x, c.a("alpha") * torch.expm1(x))


@op("Celu", alpha=1.0)
def _celu(c, x):
    a = c.a("alpha")
    return torch.clamp(x, min=0) + torch.clamp(a * torch.expm1(x / a), max=0)


@op("Selu", alpha=1.67326319217681884765625, gamma=1.05070102214813232421875)
def _selu(c, x):
    return c.a("gamma") * torch.where(x > 0, x, c.a("alpha") * torch.expm1(x))


@op("ThresholdedRelu", alpha=1.0)
def _thresholded_relu(c, x):
    return torch.where(x > c.a("alpha"), x, torch.zeros_like(x))


@op("Shrink", bias=0.0, lambd=0.5)
def _shrink(c, x):
    lam, bias = c.a("lambd"), c.a("bias")
    zero = torch.zeros_like(x)
    return torch.where(x < -lam, x + bias, torch.where(x > lam, x - bias, zero)).to(x.dtype)


@op("HardSigmoid", alpha=0.2, beta=0.5)
def _hard_sigmoid(c, x):
    return torch.clamp(c.a("alpha") * x + c.a("beta"), 0, 1)


@op("HardSwish")
def _hard_swish(c, x):
    return x * torch.clamp(x * (1.0 / 6.0) + 0.5, 0, 1)


@op("Gelu", approximate="none")
def _gelu(c, x):
    appr = c.a("approximate")
    if appr not in ("none", "tanh"):
        raise c.unsupported(f"approximate={appr!r}")
    return F.gelu(x, approximate=appr)


@op("Swish", alpha=1.0)
def _swish(c, x):
    return x * torch.sigmoid(c.a("alpha") * x)


@op("Clip", min=-math.inf, max=math.inf)
def _clip(c, x, lo=None, hi=None):
    if c.opset < 11:
        return torch.clamp(x, c.a("min"), c.a("max"))
    if lo is not None:
        x = torch.maximum(x, _same(x, lo))
    if hi is not None:
        x = torch.minimum(x, _same(x, hi))
    return x


def _softmax_like(fn):
    """Softmax-like ops: along ``axis`` from opset 13; before 13 the input is coerced to 2-D at ``axis``."""

    def impl(c, x):
        if x.dim() == 0:
            return fn(x.reshape(1), 0).reshape(())
        axis = _norm_axis(c.a("axis"), x.dim(), c)
        if c.opset >= 13:
            return fn(x, axis)
        shp = x.shape
        return fn(x.reshape(_prod(shp[:axis]), _prod(shp[axis:])), 1).reshape(shp)

    return impl


def _hardmax(x: Tensor, dim: int) -> Tensor:
    if x.shape[dim] == 0:
        return x
    i = torch.argmax(x, dim=dim, keepdim=True)
    return torch.zeros_like(x).scatter(dim, i, 1)


_SOFTMAX_AXIS = by_opset({1: 1, 13: -1})
op("Softmax", axis=_SOFTMAX_AXIS)(_softmax_like(lambda x, d: torch.softmax(x, d)))
op("LogSoftmax", axis=_SOFTMAX_AXIS)(_softmax_like(lambda x, d: torch.log_softmax(x, d)))
op("Hardmax", axis=_SOFTMAX_AXIS)(_softmax_like(_hardmax))


# com.microsoft activations (onnxruntime contrib ops)
@op("Gelu", "BiasGelu", "FastGelu", domain="com.microsoft")
def _ms_gelu(c, x, bias=None):
    if bias is not None:
        x = x + bias
    return F.gelu(x, approximate="tanh" if c.op == "FastGelu" else "none")


@op("QuickGelu", domain="com.microsoft", alpha=1.702)
def _ms_quick_gelu(c, x):
    return x * torch.sigmoid(c.a("alpha") * x)


# ------------------------------------------------------------------------------------------------------------------
# dtypes


def _cast(x: Tensor, dt: torch.dtype, saturate: bool = True) -> Tensor:
    if x.dtype == dt:
        return x
    if x.dtype in _FLOAT8:
        x = x.float()
    if dt == torch.bool:
        return x != 0
    if dt in _FLOAT8:
        if not _is_float(x):
            x = x.float()
        mx, bound, tie_over, over = _FLOAT8[dt]
        y = torch.clamp(x, -mx, mx).to(dt)
        if not saturate:
            ax = x.abs()
            bad = (ax > bound) | ((ax == bound) & tie_over)
            if bad.any():
                if over == "inf":
                    fill = torch.where(x > 0, math.inf, -math.inf).to(torch.float32)
                else:
                    fill = torch.full_like(x, math.nan, dtype=torch.float32)
                y = torch.where(bad, fill.to(dt).float(), y.float()).to(dt)
        return y
    if _is_float(x) and not dt.is_floating_point:
        x = torch.trunc(x)
    return x.to(dt)


@op("Cast", saturate=1)
def _cast_op(c, x):
    to = int(c.req("to"))
    dt = ONNX_DTYPES.get(to)
    if dt is None:
        raise c.unsupported(f"cast to ONNX data type {to}")
    return _cast(x, dt, bool(c.a("saturate")))


@op("CastLike", saturate=1)
def _cast_like(c, x, like):
    return _cast(x, like.dtype, bool(c.a("saturate")))


# ------------------------------------------------------------------------------------------------------------------
# linear algebra


def _mm(a: Tensor, b: Tensor) -> Tensor:
    if not _is_float(a) and a.device.type != "cpu":  # no integer GEMM on CUDA: exact in float64 below 2**53
        return torch.matmul(a.double(), b.double()).to(a.dtype)
    return torch.matmul(a, b)


@op("MatMul")
def _matmul(c, a, b):
    return _mm(a, _same(a, b))


@op("Gemm", alpha=1.0, beta=1.0, transA=0, transB=0)
def _gemm(c, a, b, cc=None):
    if c.a("transA"):
        a = a.transpose(-1, -2)
    if c.a("transB"):
        b = b.transpose(-1, -2)
    y = _mm(a, b)
    alpha, beta = c.a("alpha"), c.a("beta")
    if alpha != 1.0:
        y = (y * alpha).to(y.dtype)
    if cc is not None and beta != 0.0:
        y = y + (cc if beta == 1.0 else (cc * beta).to(cc.dtype))
    return y


@op("FusedMatMul", domain="com.microsoft", alpha=1.0, transA=0, transB=0, transBatchA=0, transBatchB=0)
def _fused_matmul(c, a, b):
    if c.a("transBatchA") or c.a("transBatchB"):
        raise c.unsupported("transBatchA/transBatchB")
    if c.a("transA") and a.dim() >= 2:
        a = a.transpose(-1, -2)
    if c.a("transB") and b.dim() >= 2:
        b = b.transpose(-1, -2)
    y = _mm(a, b)
    return y * c.a("alpha") if c.a("alpha") != 1.0 else y


@op("Einsum")
def _einsum(c, *xs):
    return torch.einsum(c.req("equation").replace(" ", ""), *xs)


@op("MatMulInteger")
def _matmul_integer(c, a, b, a_zp=None, b_zp=None):
    a = a.to(torch.int32)
    b = b.to(torch.int32)
    if a_zp is not None:
        zp = a_zp.to(torch.int32)
        a = a - (zp.reshape(-1, 1) if zp.numel() > 1 else zp.reshape(()))
    if b_zp is not None:
        b = b - b_zp.to(torch.int32)
    return _mm(a.long(), b.long()).to(torch.int32)


# ------------------------------------------------------------------------------------------------------------------
# shapes and data movement


@op("Transpose")
def _transpose(c, x):
    perm = c.a("perm")
    if perm is None:
        perm = list(range(x.dim() - 1, -1, -1))
    return x.permute(*[int(p) for p in perm])


@op("Reshape", allowzero=0)
def _reshape(c, x, shape):
    s = _ints(shape)
    if not c.a("allowzero"):
        s = [x.shape[i] if d == 0 else d for i, d in enumerate(s)]
    return x.reshape(s)


@op("Flatten", axis=1)
def _flatten(c, x):
    r = x.dim()
    ax = c.a("axis")
    if not -r <= ax <= r:
        raise ShapeError(f"Flatten axis {ax} is out of range for rank {r}", node=c.name)
    ax = ax + r if ax < 0 else ax
    return x.reshape(_prod(x.shape[:ax]), _prod(x.shape[ax:]))


@op("Squeeze")
def _squeeze(c, x, axes=None):
    ax = c.axes(axes, 13)
    if not ax:
        return x.reshape([d for d in x.shape if d != 1])
    ax = {_norm_axis(a, x.dim(), c) for a in ax}
    for a in ax:
        if x.shape[a] != 1:
            raise ShapeError(f"cannot squeeze axis {a} of size {x.shape[a]}", node=c.name)
    return x.reshape([d for i, d in enumerate(x.shape) if i not in ax])


@op("Unsqueeze")
def _unsqueeze(c, x, axes=None):
    ax = c.axes(axes, 13)
    if ax is None:
        raise IRError("Unsqueeze needs axes", node=c.name)
    r = x.dim() + len(ax)
    ax = {_norm_axis(a, r, c) for a in ax}
    it = iter(x.shape)
    return x.reshape([1 if i in ax else next(it) for i in range(r)])


@op("Shape", start=0)
def _shape(c, x):
    s = list(x.shape)
    end = c.a("end")
    s = s[c.a("start") :] if end is None else s[c.a("start") : end]
    return torch.tensor(s, dtype=torch.int64, device=x.device)


@op("Size")
def _size(c, x):
    return torch.tensor(x.numel(), dtype=torch.int64, device=x.device)


@op("Concat")
def _concat(c, *xs):
    xs = [x for x in xs if x is not None]
    ax = int(c.req("axis"))
    r = max(x.dim() for x in xs)
    ax = _norm_axis(ax, r, c)
    return torch.cat([_same(xs[0], x) for x in xs], dim=ax)


@op("Split", axis=0)
def _split(c, x, split=None):
    ax = _norm_axis(c.a("axis"), x.dim(), c)
    sizes = c.axes(split, 13, key="split")
    d = x.shape[ax]
    if not sizes:
        n = c.a("num_outputs") if c.opset >= 18 else None
        n = n if n is not None else c.n_out
        if n is None:
            raise c.unsupported("Split without sizes needs the number of outputs")
        if c.opset >= 18 and c.a("num_outputs") is not None:
            k = -(-d // n)  # ceil: the last chunk is smaller
            sizes = [min(k, max(0, d - i * k)) for i in range(n)]
        else:
            if d % n:
                raise ShapeError(f"cannot split {d} into {n} equal parts", node=c.name)
            sizes = [d // n] * n
    if sum(sizes) != d:
        raise ShapeError(f"split sizes {sizes} do not add up to {d}", node=c.name)
    return list(torch.split(x, sizes, dim=ax))


def _slice_axis(x: Tensor, a: int, s: int, e: int, k: int) -> Tensor:
    d = x.shape[a]
    if k == 0:
        raise ValueError("Slice step cannot be 0")
    if s < 0:
        s += d
    if e < 0:
        e += d
    if k > 0:
        s, e = min(max(s, 0), d), min(max(e, 0), d)
        if k == 1:
            return x.narrow(a, s, max(0, e - s))
        idx = torch.arange(s, max(s, e), k, device=x.device)
    else:
        s, e = min(max(s, -1), d - 1), min(max(e, -1), d - 1)
        idx = torch.arange(s, e, k, device=x.device) if s > e else torch.zeros(0, dtype=torch.long, device=x.device)
    return x.index_select(a, idx)


@op("Slice")
def _slice(c, x, starts=None, ends=None, axes=None, steps=None):
    if c.opset < 10:
        st, en, ax, sp = c.a("starts"), c.a("ends"), c.a("axes"), None
    else:
        st, en, ax, sp = _ints(starts), _ints(ends), _ints(axes), _ints(steps)
    ax = list(range(len(st))) if ax is None else ax
    sp = [1] * len(st) if sp is None else sp
    for s, e, a, k in zip(st, en, ax, sp):
        x = _slice_axis(x, _norm_axis(a, x.dim(), c), s, e, k)
    return x


def _fix_neg(i: Tensor, size: int | Tensor) -> Tensor:
    i = i.long()
    if isinstance(size, Tensor):
        i = i.to(size.device)
    return torch.where(i < 0, i + size, i)


@op("Gather", axis=0)
def _gather(c, x, idx):
    ax = _norm_axis(c.a("axis"), x.dim(), c)
    i = _fix_neg(idx.to(x.device), x.shape[ax])
    out = x.index_select(ax, i.reshape(-1))
    return out.reshape(tuple(x.shape[:ax]) + tuple(idx.shape) + tuple(x.shape[ax + 1 :]))


@op("GatherElements", axis=0)
def _gather_elements(c, x, idx):
    ax = _norm_axis(c.a("axis"), x.dim(), c)
    return torch.gather(x, ax, _fix_neg(idx.to(x.device), x.shape[ax]))


def _nd_linear_index(x: Tensor, idx: Tensor, b: int) -> tuple[Tensor, tuple[int, ...]]:
    """For GatherND / ScatterND: a flat index into x viewed as (prod(x.shape[:b+k]), *x.shape[b+k:]), one per index
    tuple, and that tail shape. ``b`` leading dims of x and idx are batch dims."""
    k = idx.shape[-1]
    dims = list(x.shape[b : b + k])
    i = _fix_neg(idx, torch.tensor(dims, dtype=torch.long, device=x.device))
    strides = [1] * k
    for j in range(k - 2, -1, -1):
        strides[j] = strides[j + 1] * dims[j + 1]
    lin = (i * torch.tensor(strides, dtype=torch.long, device=x.device)).sum(-1)  # (*batch, *rest)
    nb = _prod(x.shape[:b])
    lin = lin.reshape(nb, -1) + (torch.arange(nb, device=x.device) * _prod(dims)).reshape(nb, 1)
    return lin.reshape(-1), tuple(x.shape[b + k :])


@op("GatherND", batch_dims=0)
def _gather_nd(c, x, idx):
    b = int(c.a("batch_dims"))
    lin, tail = _nd_linear_index(x, idx, b)
    out = x.reshape((-1,) + tail).index_select(0, lin)
    return out.reshape(tuple(idx.shape[:-1]) + tail)


_REDUCE = {"add": "sum", "mul": "prod", "max": "amax", "min": "amin"}


@op("ScatterND", reduction="none")
def _scatter_nd(c, x, idx, upd):
    lin, tail = _nd_linear_index(x, idx, 0)
    out = x.clone().reshape((-1,) + tail)
    u = _same(x, upd).reshape((-1,) + tail)
    red = c.a("reduction")
    if red == "none":
        out[lin] = u
    elif red in _REDUCE:
        out.scatter_reduce_(0, lin.reshape((-1,) + (1,) * len(tail)).expand_as(u), u, _REDUCE[red], include_self=True)
    else:
        raise c.unsupported(f"reduction={red!r}")
    return out.reshape(x.shape)


@op("ScatterElements", axis=0, reduction="none")
def _scatter_elements(c, x, idx, upd):
    ax = _norm_axis(c.a("axis"), x.dim(), c)
    i = _fix_neg(idx.to(x.device), x.shape[ax])
    red = c.a("reduction")
    if red == "none":
        return x.scatter(ax, i, _same(x, upd))
    if red not in _REDUCE:
        raise c.unsupported(f"reduction={red!r}")
    return x.scatter_reduce(ax, i, _same(x, upd), _REDUCE[red], include_self=True)


@op("Expand")
def _expand(c, x, shape):
    target = torch.broadcast_shapes(tuple(x.shape), tuple(_ints(shape)))
    return x.expand(target)


@op("Tile")
def _tile(c, x, reps):
    r = _ints(reps)
    if len(r) != x.dim():
        raise ShapeError(f"Tile repeats {r} do not match rank {x.dim()}", node=c.name)
    return x.repeat(*r) if r else x


@op("Where")
def _where(c, cond, a, b):
    return torch.where(cond.to(a.device).bool(), a, _same(a, b))


@op("Trilu", upper=1)
def _trilu(c, x, k=None):
    kk = int(_scalar(k)) if k is not None else 0
    return torch.triu(x, kk) if c.a("upper") else torch.tril(x, kk)


@op("CumSum", exclusive=0, reverse=0)
def _cumsum(c, x, axis):
    ax = _norm_axis(int(_scalar(axis)), x.dim(), c)
    rev, excl = c.a("reverse"), c.a("exclusive")
    if rev:
        x = x.flip(ax)
    if excl:  # shift by one: y[i] = x[0] + ... + x[i-1]
        n = x.shape[ax]
        x = torch.cat([torch.zeros_like(x.narrow(ax, 0, min(1, n))), x.narrow(ax, 0, max(n - 1, 0))], dim=ax)
    y = torch.cumsum(x, ax, dtype=x.dtype)
    return y.flip(ax) if rev else y


@op("DepthToSpace", mode="DCR")
def _depth_to_space(c, x):
    b = int(c.req("blocksize"))
    n, ch, h, w = x.shape
    if c.a("mode") == "DCR":
        y = x.reshape(n, b, b, ch // (b * b), h, w).permute(0, 3, 4, 1, 5, 2)
    else:
        y = x.reshape(n, ch // (b * b), b, b, h, w).permute(0, 1, 4, 2, 5, 3)
    return y.reshape(n, ch // (b * b), h * b, w * b)


@op("SpaceToDepth")
def _space_to_depth(c, x):
    b = int(c.req("blocksize"))
    n, ch, h, w = x.shape
    y = x.reshape(n, ch, h // b, b, w // b, b).permute(0, 3, 5, 1, 2, 4)
    return y.reshape(n, ch * b * b, h // b, w // b)


@op("Compress")
def _compress(c, x, cond):
    ax = c.a("axis")
    if ax is None:
        x, ax = x.reshape(-1), 0
    ax = _norm_axis(ax, x.dim(), c)
    keep = torch.nonzero(cond.reshape(-1).bool()).reshape(-1).to(x.device)
    return x.index_select(ax, keep)


# ------------------------------------------------------------------------------------------------------------------
# generators


@op("Constant")
def _constant(c):
    for k, dt in (("value", None), ("value_float", np.float32), ("value_floats", np.float32),
                  ("value_int", np.int64), ("value_ints", np.int64)):  # fmt: skip
        if k in c.attrs:
            return torch.from_numpy(np.array(_attr_value(c.attrs[k]), dtype=dt))
    raise c.unsupported(f"a Constant given by {sorted(c.attrs) or 'no attribute'}")


@op("ConstantOfShape")
def _constant_of_shape(c, shape):
    v = c.a("value")
    arr = np.zeros(1, np.float32) if v is None else np.asarray(v).reshape(-1)
    t = torch.from_numpy(arr[:1].copy())
    return t.to(shape.device).reshape(()).expand(_ints(shape)).clone()


@op("Range")
def _range(c, start, limit, delta):
    """ONNX defines Range by repeated addition (``v += delta``); floating types accumulate in their own precision."""
    s, l, d = start.item(), limit.item(), delta.item()
    if d == 0:
        raise ShapeError("Range delta is 0", node=c.name)
    np_dt = {torch.float32: np.float32, torch.float64: np.float64, torch.float16: np.float16}.get(start.dtype)
    diff = float(np_dt(l) - np_dt(s)) if np_dt is not None else l - s  # limit - start in the type, as onnxruntime
    n = max(int(math.ceil(diff / d)), 0)
    if not _is_float(start):
        return torch.arange(n, dtype=torch.int64, device=start.device).mul_(int(d)).add_(int(s)).to(start.dtype)
    if np_dt is None:
        return (torch.arange(n, dtype=torch.float64) * d + s).to(device=start.device, dtype=start.dtype)
    steps = np.full(n, d, dtype=np_dt)
    if n:
        steps[0] = s
    return torch.from_numpy(np.cumsum(steps, dtype=np_dt)).to(start.device)  # sequential, in the type


@op("EyeLike", k=0)
def _eye_like(c, x):
    dt = c.a("dtype")
    dtype = x.dtype if dt is None else ONNX_DTYPES.get(int(dt))
    if dtype is None:
        raise c.unsupported(f"dtype {dt}")
    n, m = x.shape
    rows = torch.arange(n, device=x.device).reshape(-1, 1)
    cols = torch.arange(m, device=x.device).reshape(1, -1)
    return (cols - rows == int(c.a("k"))).to(dtype)


@op("OneHot", axis=-1)
def _one_hot(c, idx, depth, values):
    d = int(_scalar(depth))
    i = idx.long()
    i = torch.where(i < 0, i + d, i)
    hot = torch.arange(d, device=i.device) == i.unsqueeze(-1)  # out-of-range indices give all-off rows
    out = torch.where(hot, values.reshape(-1)[1], values.reshape(-1)[0])
    ax = _norm_axis(c.a("axis"), out.dim(), c)
    return out.movedim(-1, ax)


# ------------------------------------------------------------------------------------------------------------------
# reductions


def _reduce(kind: str, since: int = 18):
    def impl(c, x, axes=None):
        ax = c.axes(axes, since)
        keep = bool(c.a("keepdims"))
        if not ax:  # not given, or empty
            if c.opset >= since and c.a("noop_with_empty_axes"):
                return _reduce_none(kind, x)
            ax = list(range(x.dim()))
        if x.dim() == 0:
            x, ax, keep = x.reshape(1), [0], False
        dims = sorted({_norm_axis(a, x.dim(), c) for a in ax})
        return _reduce_dims(kind, x, dims, keep)

    return impl


def _reduce_none(kind: str, x: Tensor) -> Tensor:
    """noop_with_empty_axes: no reduction, but the elementwise part of the op's definition stays (ReduceL1 is
    ReduceSum(Abs(x)), so its no-op is Abs(x)); as onnxruntime."""
    if kind in ("l1", "l2"):
        return x.abs()
    if kind == "sumsquare":
        return x * x
    if kind == "logsum":
        return torch.log(x)
    return x


def _reduce_dims(kind: str, x: Tensor, dims: list[int], keep: bool) -> Tensor:
    dt = x.dtype
    if kind == "sum":
        return torch.sum(x, dim=dims, keepdim=keep, dtype=dt)
    if kind == "mean":
        n = _prod(x.shape[d] for d in dims)
        s = torch.sum(x, dim=dims, keepdim=keep, dtype=dt)
        return s / n if _is_float(x) else torch.div(s, n, rounding_mode="trunc")
    if kind in ("max", "min"):
        if any(x.shape[d] == 0 for d in dims):  # an empty reduction: -inf / +inf (or the type's bounds)
            shape = [1 if d in dims else s for d, s in enumerate(x.shape)] if keep else [s for d, s in enumerate(x.shape) if d not in dims]
            info = torch.finfo(dt) if _is_float(x) else torch.iinfo(dt)
            v = (-math.inf if kind == "max" else math.inf) if _is_float(x) else (info.min if kind == "max" else info.max)
            return torch.full(shape, v, dtype=dt, device=x.device)
        return (torch.amax if kind == "max" else torch.amin)(x, dim=dims, keepdim=keep)
    if kind == "prod":
        for d in sorted(dims, reverse=True):
            x = torch.prod(x, dim=d, keepdim=keep, dtype=dt)
        return x
    if kind == "l1":
        return torch.sum(x.abs(), dim=dims, keepdim=keep, dtype=dt)
    if kind == "l2":
        s = torch.sum(x * x, dim=dims, keepdim=keep, dtype=dt)
        return torch.sqrt(s) if _is_float(x) else torch.sqrt(s.double()).to(dt)
    if kind == "sumsquare":
        return torch.sum(x * x, dim=dims, keepdim=keep, dtype=dt)
    if kind == "logsum":
        return torch.log(torch.sum(x, dim=dims, keepdim=keep, dtype=dt))
    if kind == "logsumexp":
        return torch.logsumexp(x, dim=dims, keepdim=keep)
    raise AssertionError(kind)


op("ReduceSum", keepdims=1, noop_with_empty_axes=0)(_reduce("sum", since=13))
for _name, _kind in {
    "ReduceMean": "mean", "ReduceMax": "max", "ReduceMin": "min", "ReduceProd": "prod", "ReduceL1": "l1",
    "ReduceL2": "l2", "ReduceSumSquare": "sumsquare", "ReduceLogSum": "logsum", "ReduceLogSumExp": "logsumexp",
}.items():  # fmt: skip
    op(_name, keepdims=1, noop_with_empty_axes=0)(_reduce(_kind))


def _arg(fn):
    def impl(c, x):
        ax = _norm_axis(c.a("axis"), x.dim(), c)
        keep = bool(c.a("keepdims"))
        if c.a("select_last_index"):
            i = fn(x.flip(ax), dim=ax, keepdim=keep)
            return (x.shape[ax] - 1 - i).long()
        return fn(x, dim=ax, keepdim=keep).long()

    return impl


op("ArgMax", axis=0, keepdims=1, select_last_index=0)(_arg(torch.argmax))
op("ArgMin", axis=0, keepdims=1, select_last_index=0)(_arg(torch.argmin))


@op("TopK", axis=-1, largest=1, sorted=1)
def _topk(c, x, k=None):
    kk = int(_scalar(k)) if c.opset >= 10 else int(c.req("k"))
    ax = _norm_axis(c.a("axis"), x.dim(), c)
    v, i = torch.topk(x, kk, dim=ax, largest=bool(c.a("largest")), sorted=bool(c.a("sorted")))
    return [v, i.long()]


@op("NonZero")
def _nonzero(c, x):
    if x.dim() == 0:
        return torch.zeros((0, int(bool(x.item() != 0))), dtype=torch.long, device=x.device)
    return torch.nonzero(x).t().contiguous()


@op("Unique", sorted=1)
def _unique(c, x):
    """Outputs Y, indices (first occurrences), inverse_indices, counts; ``sorted=0`` keeps first-occurrence order."""
    ax = c.a("axis")
    if ax is None:
        src, dim = x.reshape(-1), 0
    else:
        dim = _norm_axis(ax, x.dim(), c)
        src = x
    y, inv, counts = torch.unique(src, sorted=True, return_inverse=True, return_counts=True, dim=dim)
    n = src.shape[dim]
    pos = torch.arange(n, device=x.device)
    first = torch.full((y.shape[dim],), n, dtype=torch.long, device=x.device).scatter_reduce(0, inv, pos, "amin")
    if not c.a("sorted"):
        order = torch.argsort(first)
        rank = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=x.device))
        y, first, counts, inv = y.index_select(dim, order), first[order], counts[order], rank[inv]
    return [y, first, inv.long(), counts.long()]


# ------------------------------------------------------------------------------------------------------------------
# normalization


def _stat_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


@op("LayerNormalization", axis=-1, epsilon=1e-5, stash_type=1)
def _layer_norm(c, x, scale, bias=None):
    ax = _norm_axis(c.a("axis"), x.dim(), c)
    dims = list(range(ax, x.dim()))
    xf = x.to(_stat_dtype(x))
    mean = xf.mean(dim=dims, keepdim=True)
    inv = torch.rsqrt(((xf - mean) ** 2).mean(dim=dims, keepdim=True) + c.a("epsilon"))
    y = (xf - mean) * inv * scale.to(xf.dtype)
    if bias is not None:
        y = y + bias.to(xf.dtype)
    return [y.to(x.dtype), mean, inv]


@op("RMSNormalization", axis=-1, epsilon=1e-5, stash_type=1)
def _rms_norm(c, x, scale):
    ax = _norm_axis(c.a("axis"), x.dim(), c)
    xf = x.to(_stat_dtype(x))
    inv = torch.rsqrt(xf.pow(2).mean(dim=list(range(ax, x.dim())), keepdim=True) + c.a("epsilon"))
    return (xf * inv * scale.to(xf.dtype)).to(x.dtype)


@op("SimplifiedLayerNormalization", axis=-1, epsilon=1e-5, stash_type=1)  # onnxruntime's, in the default domain
def _simplified_layer_norm(c, x, scale):
    ax = _norm_axis(c.a("axis"), x.dim(), c)
    xf = x.to(_stat_dtype(x))
    inv = torch.rsqrt(xf.pow(2).mean(dim=list(range(ax, x.dim())), keepdim=True) + c.a("epsilon"))
    return [(xf * inv * scale.to(xf.dtype)).to(x.dtype), inv]


@op("SkipLayerNormalization", domain="com.microsoft", epsilon=1e-12)
def _skip_layer_norm(c, x, skip, gamma, beta=None, bias=None):
    """Outputs: output, mean, inv_std_var, input_skip_bias_sum."""
    s = x + skip
    if bias is not None:
        s = s + bias
    sf = s.to(_stat_dtype(s))
    mean = sf.mean(dim=-1, keepdim=True)
    inv = torch.rsqrt(((sf - mean) ** 2).mean(dim=-1, keepdim=True) + c.a("epsilon"))
    y = (sf - mean) * inv * gamma.to(sf.dtype)
    if beta is not None:
        y = y + beta.to(sf.dtype)
    return [y.to(x.dtype), mean, inv, s]


@op("SkipSimplifiedLayerNormalization", domain="com.microsoft", epsilon=1e-12)
def _skip_simplified_layer_norm(c, x, skip, gamma, bias=None):
    """Outputs: output, mean (unused, empty), inv_std_var, input_skip_bias_sum."""
    s = x + skip
    if bias is not None:
        s = s + bias
    sf = s.to(_stat_dtype(s))
    inv = torch.rsqrt(sf.pow(2).mean(dim=-1, keepdim=True) + c.a("epsilon"))
    return [(sf * inv * gamma.to(sf.dtype)).to(x.dtype), torch.zeros(0, device=x.device), inv, s]


@op("BatchNormalization", epsilon=1e-5, momentum=0.9, training_mode=0)
def _batch_norm(c, x, scale, bias, mean, var):
    if c.a("training_mode"):
        raise c.unsupported("training_mode=1")
    return F.batch_norm(x, mean, var, scale, bias, False, 0.0, c.a("epsilon"))


@op("InstanceNormalization", epsilon=1e-5)
def _instance_norm(c, x, scale, bias):
    return F.instance_norm(x, weight=scale, bias=bias, eps=c.a("epsilon"))


@op("GroupNormalization", epsilon=1e-5, stash_type=1)
def _group_norm(c, x, scale, bias):
    """Opset 18 has one scale / bias per group, opset 21 one per channel."""
    g = int(c.req("num_groups"))
    n, ch = x.shape[0], x.shape[1]
    xr = x.to(_stat_dtype(x)).reshape(n, g, -1)
    mean = xr.mean(-1, keepdim=True)
    var = ((xr - mean) ** 2).mean(-1, keepdim=True)
    y = ((xr - mean) * torch.rsqrt(var + c.a("epsilon"))).reshape(x.shape)
    if c.opset < 21:
        scale, bias = scale.repeat_interleave(ch // g), bias.repeat_interleave(ch // g)
    shp = (1, ch) + (1,) * (x.dim() - 2)
    return (y * scale.to(y.dtype).reshape(shp) + bias.to(y.dtype).reshape(shp)).to(x.dtype)


@op("LpNormalization", axis=-1, p=2)
def _lp_norm(c, x):
    ax = _norm_axis(c.a("axis"), x.dim(), c)
    p = int(c.a("p"))
    if p == 1:
        return x / x.abs().sum(dim=ax, keepdim=True)
    if p == 2:
        return x / torch.sqrt((x * x).sum(dim=ax, keepdim=True))
    raise c.unsupported(f"p={p}")


@op("MeanVarianceNormalization", axes=[0, 2, 3])
def _mvn(c, x):
    dims = sorted({_norm_axis(a, x.dim(), c) for a in c.a("axes")})
    mean = x.mean(dim=dims, keepdim=True)
    d = x - mean
    return d / torch.sqrt((d * d).mean(dim=dims, keepdim=True))


@op("LRN", alpha=1e-4, beta=0.75, bias=1.0)
def _lrn(c, x):
    size = int(c.req("size"))
    sq = (x * x).unsqueeze(1)  # (N, 1, C, ...)
    lo, hi = (size - 1) // 2, size - 1 - (size - 1) // 2
    sq = F.pad(sq.reshape(sq.shape[0], 1, sq.shape[2], -1), (0, 0, lo, hi))
    ssum = sq.unfold(2, size, 1).sum(-1).reshape(x.shape)
    return x / (c.a("bias") + c.a("alpha") / size * ssum) ** c.a("beta")


# ------------------------------------------------------------------------------------------------------------------
# convolution and pooling


def _conv_pads(c: Ctx, spatial: list[int], kernel: list[int], strides: list[int], dil: list[int],
               dilate_same: bool = True) -> list[int]:  # fmt: skip
    """Explicit [begin..., end...] pads after auto_pad. Conv's SAME uses the dilated kernel, pooling's (as
    onnxruntime) the plain one."""
    nd = len(kernel)
    auto = c.a("auto_pad", "NOTSET")
    if auto in ("NOTSET", ""):
        p = c.a("pads")
        return [int(v) for v in p] if p else [0] * (2 * nd)
    if auto == "VALID":
        return [0] * (2 * nd)
    if auto not in ("SAME_UPPER", "SAME_LOWER"):
        raise c.unsupported(f"auto_pad={auto!r}")
    pads = [0] * (2 * nd)
    for i in range(nd):
        out = -(-spatial[i] // strides[i])
        k = (kernel[i] - 1) * dil[i] + 1 if dilate_same else kernel[i]
        total = max(0, (out - 1) * strides[i] + k - spatial[i])
        lo = total // 2 if auto == "SAME_UPPER" else total - total // 2
        pads[i], pads[i + nd] = lo, total - lo
    return pads


def _conv_fn(nd: int, transpose: bool = False):
    table = {1: (F.conv1d, F.conv_transpose1d), 2: (F.conv2d, F.conv_transpose2d), 3: (F.conv3d, F.conv_transpose3d)}
    if nd not in table:
        raise UnsupportedOpError(f"{nd}-D convolution")
    return table[nd][int(transpose)]


@op("Conv", group=1)
def _conv(c, x, w, b=None):
    nd = w.dim() - 2
    kernel = list(c.a("kernel_shape") or w.shape[2:])
    strides = list(c.a("strides") or [1] * nd)
    dil = list(c.a("dilations") or [1] * nd)
    pads = _conv_pads(c, list(x.shape[2:]), kernel, strides, dil)
    if pads[:nd] == pads[nd:]:
        padding = pads[:nd]
    else:
        x, padding = _pad_last(x, pads[:nd], pads[nd:]), [0] * nd
    return _conv_fn(nd)(x, w, b, stride=strides, padding=padding, dilation=dil, groups=int(c.a("group")))


@op("ConvTranspose", group=1)
def _conv_transpose(c, x, w, b=None):
    nd = w.dim() - 2
    kernel = list(c.a("kernel_shape") or w.shape[2:])
    strides = list(c.a("strides") or [1] * nd)
    dil = list(c.a("dilations") or [1] * nd)
    outpad = list(c.a("output_padding") or [0] * nd)
    spatial = list(x.shape[2:])
    full = [(spatial[i] - 1) * strides[i] + outpad[i] + (kernel[i] - 1) * dil[i] + 1 for i in range(nd)]
    auto = c.a("auto_pad", "NOTSET")
    out_shape = c.a("output_shape")
    if out_shape is not None or auto in ("SAME_UPPER", "SAME_LOWER"):
        # the total padding follows from the output shape; as onnxruntime, SAME_UPPER puts an odd one at the end,
        # SAME_LOWER and an explicit output_shape at the beginning
        target = list(out_shape)[-nd:] if out_shape is not None else [spatial[i] * strides[i] for i in range(nd)]
        pads = [0] * (2 * nd)
        for i in range(nd):
            total = max(0, full[i] - target[i])
            head = total // 2 if auto == "SAME_UPPER" else total - total // 2
            pads[i], pads[i + nd] = head, total - head
    elif auto == "VALID":
        pads = [0] * (2 * nd)
    elif auto in ("NOTSET", ""):
        pads = [int(p) for p in (c.a("pads") or [0] * (2 * nd))]
    else:
        raise c.unsupported(f"auto_pad={auto!r}")
    y = _conv_fn(nd, True)(x, w, None, stride=strides, padding=0, groups=int(c.a("group")), dilation=dil)
    # the full result, extended by output_padding (zeros), then cropped by the pads
    y = _pad_last(y, [0] * nd, outpad)
    y = _pad_last(y, [-p for p in pads[:nd]], [-p for p in pads[nd:]])
    if b is not None:
        y = y + b.reshape((1, -1) + (1,) * nd)
    return y


def _pool_geometry(c: Ctx, x: Tensor):
    nd = x.dim() - 2
    kernel = [int(k) for k in c.req("kernel_shape")]
    strides = list(c.a("strides") or [1] * nd)
    dil = list(c.a("dilations") or [1] * nd)
    spatial = list(x.shape[2:])
    pads = _conv_pads(c, spatial, kernel, strides, dil, dilate_same=False)
    ceil = bool(c.a("ceil_mode", 0))
    out = []
    for i in range(nd):
        num = spatial[i] + pads[i] + pads[i + nd] - dil[i] * (kernel[i] - 1) - 1
        o = num // strides[i] + 1
        if ceil:
            o = -(-num // strides[i]) + 1
            if (o - 1) * strides[i] >= spatial[i] + pads[i]:  # the last window must start inside the input
                o -= 1
        out.append(o)
    # right padding that makes the last window fit exactly (may be negative: a crop)
    extra = [(out[i] - 1) * strides[i] + dil[i] * (kernel[i] - 1) + 1 - (spatial[i] + pads[i] + pads[i + nd]) for i in range(nd)]
    return nd, kernel, strides, dil, pads, out, extra


def _windows(x: Tensor, nd: int, kernel, strides, dil) -> Tensor:
    """View (N, C, *out, *kernel) of the windows of an already padded x."""
    for i in range(nd):
        span = (kernel[i] - 1) * dil[i] + 1
        x = x.unfold(2 + i, span, strides[i])
        if dil[i] > 1:
            x = x[..., :: dil[i]]
    return x


@op("MaxPool", ceil_mode=0, storage_order=0)
def _max_pool(c, x):
    """Outputs Y and Indices; with a known single output (``num_outputs=1``) the indices are not computed."""
    nd, kernel, strides, dil, pads, out, extra = _pool_geometry(c, x)
    low = -math.inf if _is_float(x) else torch.iinfo(x.dtype).min
    xp = _pad_last(x, pads[:nd], [pads[nd + i] + extra[i] for i in range(nd)], value=low)
    if c.n_out == 1 and nd in (1, 2, 3) and _is_float(x):
        return {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}[nd](xp, kernel, strides, 0, dil)
    win = _windows(xp, nd, kernel, strides, dil)
    y, arg = win.reshape(tuple(win.shape[: 2 + nd]) + (-1,)).max(dim=-1)
    if c.n_out == 1:
        return y
    return [y, _indices_from_arg(x, arg, nd, kernel, strides, dil, pads, int(c.a("storage_order")))]


def _indices_from_arg(x: Tensor, arg: Tensor, nd: int, kernel, strides, dil, pads, storage_order: int) -> Tensor:
    """MaxPool's Indices: flat positions in x (row-major, or column-major over the spatial dims with storage_order=1)."""
    spatial = list(x.shape[2:])
    rem = arg
    coords = []
    for i in reversed(range(nd)):
        j = rem % kernel[i]
        rem = rem // kernel[i]
        o = torch.arange(arg.shape[2 + i], device=x.device).reshape((-1,) + (1,) * (nd - 1 - i))
        coords.append(o * strides[i] + j * dil[i] - pads[i])
    coords.reverse()
    flat = torch.zeros_like(arg)
    if storage_order:
        mul = 1
        for i in range(nd):
            flat = flat + coords[i] * mul
            mul *= spatial[i]
    else:
        for i in range(nd):
            flat = flat * spatial[i] + coords[i]
    nc = torch.arange(x.shape[0] * x.shape[1], device=x.device).reshape((x.shape[0], x.shape[1]) + (1,) * nd)
    return flat + nc * _prod(spatial)


@op("AveragePool", ceil_mode=0, count_include_pad=0)
def _avg_pool(c, x):
    nd, kernel, strides, dil, pads, out, extra = _pool_geometry(c, x)
    ends = [pads[nd + i] + extra[i] for i in range(nd)]
    total = _windows(_pad_last(x, pads[:nd], ends), nd, kernel, strides, dil).sum(dim=list(range(-nd, 0)))
    # divisor: the input cells of each window, plus the explicit pads with count_include_pad (not the ceil overhang)
    ones = torch.ones([1, 1] + list(x.shape[2:]), dtype=x.dtype, device=x.device)
    if c.a("count_include_pad"):
        ones = _pad_last(ones, pads[:nd], pads[nd:], value=1.0)
        ones = _pad_last(ones, [0] * nd, extra)
    else:
        ones = _pad_last(ones, pads[:nd], ends)
    count = _windows(ones, nd, kernel, strides, dil).sum(dim=list(range(-nd, 0)))
    return total / count


@op("GlobalAveragePool")
def _global_avg_pool(c, x):
    return x.mean(dim=list(range(2, x.dim())), keepdim=True)


@op("GlobalMaxPool")
def _global_max_pool(c, x):
    return torch.amax(x, dim=list(range(2, x.dim())), keepdim=True)


# ------------------------------------------------------------------------------------------------------------------
# padding and resizing


def _pad_index(n: int, b: int, e: int, mode: str, device) -> Tensor:
    i = torch.arange(-b, n + e, device=device)
    if mode == "edge":
        return i.clamp(0, n - 1)
    if mode == "wrap":
        return i % n
    if n == 1:
        return torch.zeros_like(i)
    p = 2 * (n - 1)  # reflect: period 2(n-1), mirrored without repeating the edge
    i = i % p
    return torch.where(i > n - 1, p - i, i)


@op("Pad", mode="constant")
def _pad(c, x, pads=None, value=None, axes=None):
    mode = c.a("mode")
    nd = x.dim()
    p = _ints(pads) if c.opset >= 11 else [int(v) for v in c.req("pads")]
    if c.opset >= 11:
        v = _scalar(value) if value is not None and value.numel() else 0
    else:
        v = c.a("value", 0.0)
    ax = [_norm_axis(a, nd, c) for a in (_ints(axes) if axes is not None else range(nd))]
    if len(p) != 2 * len(ax):
        raise ShapeError(f"{len(p)} pads for {len(ax)} axes", node=c.name)
    begin, end = [0] * nd, [0] * nd
    for j, a in enumerate(ax):
        begin[a], end[a] = p[j], p[j + len(ax)]
    if mode == "constant":
        return _pad_last(x, begin, end, value=v)
    if mode not in ("reflect", "edge", "wrap"):
        raise c.unsupported(f"mode={mode!r}")
    # crop first (negative pads), then gather along each padded axis
    x = _pad_last(x, [min(b, 0) for b in begin], [min(e, 0) for e in end])
    for a in range(nd):
        b, e = max(begin[a], 0), max(end[a], 0)
        if b or e:
            if x.shape[a] == 0:
                raise ShapeError(f"cannot {mode}-pad the empty axis {a}", node=c.name)
            x = x.index_select(a, _pad_index(x.shape[a], b, e, mode, x.device))
    return x


def _resize_coords(ctm: str, d_in: int, d_out: int, scale: np.float32, roi: tuple[float, float]) -> np.ndarray:
    """Source coordinate of every output position along one axis, in float32 as onnxruntime computes it."""
    xr = np.arange(d_out, dtype=np.float32)
    f = np.float32
    if ctm == "half_pixel":
        return (xr + f(0.5)) / scale - f(0.5)
    if ctm == "half_pixel_symmetric":
        adj = f(d_out) / (scale * f(d_in))
        center = f(d_in) / f(2)
        offset = center * (f(1) - adj)
        return offset + ((xr + f(0.5)) / scale - f(0.5))
    if ctm == "pytorch_half_pixel":
        return (xr + f(0.5)) / scale - f(0.5) if d_out > 1 else np.zeros(d_out, np.float32)
    if ctm == "align_corners":
        return xr * f(d_in - 1) / f(d_out - 1) if d_out > 1 else np.zeros(d_out, np.float32)
    if ctm == "asymmetric":
        return xr / scale
    if ctm == "tf_crop_and_resize":
        s, e = roi
        if d_out > 1:
            return (s * (d_in - 1) + xr.astype(np.float64) * (e - s) * (d_in - 1) / (d_out - 1)).astype(np.float32)
        return np.full(d_out, 0.5 * (s + e) * (d_in - 1), np.float32)
    raise ValueError(ctm)


def _cubic_coeffs(t: np.ndarray, a: float) -> np.ndarray:
    t = np.abs(t).astype(np.float32)
    a = np.float32(a)
    one, two = np.float32(1), np.float32(2)
    c0 = ((a * (t + one) - np.float32(5) * a) * (t + one) + np.float32(8) * a) * (t + one) - np.float32(4) * a
    c1 = ((a + two) * t - (a + np.float32(3))) * t * t + one
    c2 = ((a + two) * (one - t) - (a + np.float32(3))) * (one - t) * (one - t) + one
    c3 = ((a * (two - t) - np.float32(5) * a) * (two - t) + np.float32(8) * a) * (two - t) - np.float32(4) * a
    return np.stack([c0, c1, c2, c3], axis=-1)


def _outside(ctm: str, coords: np.ndarray, d_in: int, dev) -> Tensor | None:
    """Positions outside the input (tf_crop_and_resize fills them with extrapolation_value), or None."""
    if ctm != "tf_crop_and_resize":
        return None
    out = (coords < 0) | (coords > d_in - 1)
    return torch.from_numpy(out).to(dev) if out.any() else None


def _linear_taps(coords: np.ndarray, d_in: int):
    """onnxruntime's linear taps along one axis: indices i0, i1 and weights w0 (of i0), w1 (of i1), float32."""
    xc = np.clip(coords, np.float32(0), np.float32(d_in - 1))
    i0 = np.minimum(xc.astype(np.int64), d_in - 1)
    i1 = np.minimum(i0 + 1, d_in - 1)
    w1 = np.abs(xc - i0.astype(np.float32))
    w0 = np.abs(xc - i1.astype(np.float32))
    same = i0 == i1
    w0[same], w1[same] = 0.5, 0.5
    return i0, i1, w0, w1


def _bilinear(x: Tensor, ty, tx) -> Tensor:
    """Bilinear resize of the last two axes, term by term as onnxruntime evaluates it (so that integer results,
    truncated, agree): (wx0*wy0)*X[y0,x0] + (wx1*wy0)*X[y0,x1] + (wx0*wy1)*X[y1,x0] + (wx1*wy1)*X[y1,x1]."""
    dev = x.device
    iy0, iy1, wy0, wy1 = (torch.from_numpy(a).to(dev) for a in ty)
    ix0, ix1, wx0, wx1 = (torch.from_numpy(a).to(dev) for a in tx)
    wy0, wy1 = wy0.reshape(-1, 1).to(x.dtype), wy1.reshape(-1, 1).to(x.dtype)
    wx0, wx1 = wx0.reshape(1, -1).to(x.dtype), wx1.reshape(1, -1).to(x.dtype)
    r0, r1 = x.index_select(-2, iy0), x.index_select(-2, iy1)
    return ((wx0 * wy0) * r0.index_select(-1, ix0) + (wx1 * wy0) * r0.index_select(-1, ix1)
            + (wx0 * wy1) * r1.index_select(-1, ix0) + (wx1 * wy1) * r1.index_select(-1, ix1))  # fmt: skip


def _resize_axis(c: Ctx, x: Tensor, ax: int, d_out: int, scale: np.float32, roi, mode: str, ctm: str):
    """Resize x along one axis; returns the result and a mask (or None) of positions outside the input (for
    tf_crop_and_resize's extrapolation value)."""
    d_in = x.shape[ax]
    coords = _resize_coords(ctm, d_in, d_out, scale, roi)
    outside = _outside(ctm, coords, d_in, x.device)
    dev = x.device
    if mode == "nearest":
        nm = c.a("nearest_mode")
        if nm == "round_prefer_floor":
            idx = np.ceil(coords - np.float32(0.5))
        elif nm == "round_prefer_ceil":
            idx = np.floor(coords + np.float32(0.5))
        elif nm == "floor":
            idx = np.floor(coords)
        elif nm == "ceil":
            idx = np.ceil(coords)
        else:
            raise c.unsupported(f"nearest_mode={nm!r}")
        idx = np.clip(idx, 0, d_in - 1).astype(np.int64)
        return x.index_select(ax, torch.from_numpy(idx).to(dev)), outside
    shape = [1] * x.dim()
    shape[ax] = d_out
    if mode == "linear":
        i0, i1, w0, w1 = _linear_taps(coords, d_in)
        v0 = x.index_select(ax, torch.from_numpy(i0).to(dev))
        v1 = x.index_select(ax, torch.from_numpy(i1).to(dev))
        tw0 = torch.from_numpy(w0).to(device=dev, dtype=x.dtype).reshape(shape)
        tw1 = torch.from_numpy(w1).to(device=dev, dtype=x.dtype).reshape(shape)
        return v0 * tw0 + v1 * tw1, outside
    if mode == "cubic":
        base = np.floor(coords)
        coeffs = _cubic_coeffs(coords - base, c.a("cubic_coeff_a"))  # (d_out, 4)
        taps = base.astype(np.int64)[:, None] + np.arange(-1, 3)[None, :]
        if c.a("exclude_outside"):
            inside = (taps >= 0) & (taps < d_in)
            coeffs = np.where(inside, coeffs, np.float32(0))
            coeffs = coeffs / coeffs.sum(axis=1, keepdims=True)
        taps = np.clip(taps, 0, d_in - 1)
        y = None
        for t in range(4):
            v = x.index_select(ax, torch.from_numpy(taps[:, t].copy()).to(dev))
            w = torch.from_numpy(coeffs[:, t].astype(np.float32).copy()).to(device=dev, dtype=x.dtype).reshape(shape)
            y = v * w if y is None else y + v * w
        return y, outside
    raise c.unsupported(f"mode={mode!r}")


_RESIZE_CTM = ("half_pixel", "half_pixel_symmetric", "pytorch_half_pixel", "align_corners", "asymmetric", "tf_crop_and_resize")


@op("Resize", mode="nearest", coordinate_transformation_mode="half_pixel", nearest_mode="round_prefer_floor",
    cubic_coeff_a=-0.75, exclude_outside=0, extrapolation_value=0.0, antialias=0, keep_aspect_ratio_policy="stretch")  # fmt: skip
def _resize(c, x, roi=None, scales=None, sizes=None):
    if c.opset < 11:  # Resize-10: (X, scales), asymmetric coordinates
        scales, roi, sizes = roi, None, None
        ctm = "asymmetric"
    else:
        ctm = c.a("coordinate_transformation_mode")
    mode = c.a("mode")
    if mode not in ("nearest", "linear", "cubic"):
        raise c.unsupported(f"mode={mode!r}")
    if ctm not in _RESIZE_CTM:
        raise c.unsupported(f"coordinate_transformation_mode={ctm!r}")
    r = x.dim()
    axes = [_norm_axis(a, r, c) for a in c.a("axes")] if c.a("axes") is not None else list(range(r))
    in_dims = list(x.shape)
    use_sizes = sizes is not None and sizes.numel() > 0
    sc = [np.float32(1)] * r
    out_dims = list(in_dims)
    if use_sizes:
        sz = _ints(sizes)
        policy = c.a("keep_aspect_ratio_policy")
        if policy == "stretch":
            for a, s in zip(axes, sz):
                out_dims[a] = s
                sc[a] = np.float32(s) / np.float32(in_dims[a])
        elif policy in ("not_larger", "not_smaller"):
            ratios = [np.float32(s) / np.float32(in_dims[a]) for a, s in zip(axes, sz)]
            s_all = min(ratios) if policy == "not_larger" else max(ratios)
            for a in axes:
                out_dims[a] = int(np.floor(s_all * np.float32(in_dims[a]) + np.float32(0.5)))
                sc[a] = s_all
        else:
            raise c.unsupported(f"keep_aspect_ratio_policy={policy!r}")
    else:
        if scales is None or scales.numel() == 0:
            raise IRError("Resize needs scales or sizes", node=c.name)
        for a, s in zip(axes, scales.reshape(-1).tolist()):
            sc[a] = np.float32(s)
            out_dims[a] = int(np.float32(s) * np.float32(in_dims[a]))
    rois = [(0.0, 1.0)] * r
    if ctm == "tf_crop_and_resize":
        rv = [float(v) for v in roi.reshape(-1).tolist()] if roi is not None and roi.numel() else None
        if rv is None:
            raise IRError("tf_crop_and_resize needs roi", node=c.name)
        k = len(rv) // 2
        for j, a in enumerate(axes[:k]):
            rois[a] = (rv[j], rv[j + k])
        if use_sizes:
            for a in axes:
                lo, hi = rois[a]
                sc[a] = np.float32(out_dims[a]) / np.float32(in_dims[a] * (hi - lo)) if hi != lo else np.float32(1)
    if c.a("antialias") and mode in ("linear", "cubic") and any(sc[a] < 1 for a in range(r)):
        raise c.unsupported("antialias when downscaling")
    out_dtype = x.dtype
    if mode != "nearest" and not _is_float(x):  # as onnxruntime: interpolate in float, truncate to the integer type
        x = x.float()
    outside = None
    changed = [a for a in range(r) if out_dims[a] != in_dims[a] or sc[a] != 1 or ctm == "tf_crop_and_resize"]
    if mode == "linear" and r >= 2 and changed and min(changed) >= r - 2:
        # the common 2-D case, evaluated as onnxruntime does (an unchanged axis too has 0.5/0.5 taps at its end)
        taps, masks = [], []
        for a in (r - 2, r - 1):
            coords = _resize_coords(ctm, in_dims[a], out_dims[a], sc[a], rois[a])
            taps.append(_linear_taps(coords, in_dims[a]))
            masks.append(_outside(ctm, coords, in_dims[a], x.device))
        x = _bilinear(x, taps[0], taps[1])
        if masks[0] is not None:
            outside = masks[0].reshape(-1, 1)
        if masks[1] is not None:
            outside = masks[1].reshape(1, -1) if outside is None else outside | masks[1].reshape(1, -1)
        changed = []
    for a in changed:
        x, o = _resize_axis(c, x, a, out_dims[a], sc[a], rois[a], mode, ctm)
        if o is not None:
            shape = [1] * r
            shape[a] = -1
            o = o.reshape(shape)
            outside = o if outside is None else outside | o
    if outside is not None:
        x = torch.where(outside, torch.tensor(c.a("extrapolation_value"), dtype=x.dtype, device=x.device), x)
    if x.dtype != out_dtype:
        x = torch.trunc(x).to(out_dtype)
    return x


# ------------------------------------------------------------------------------------------------------------------
# misc


@op("Dropout", ratio=0.5)
def _dropout(c, x, ratio=None, training_mode=None):
    """Inference: the identity, and an all-true mask."""
    training = bool(_scalar(training_mode)) if training_mode is not None else False
    r = float(_scalar(ratio)) if ratio is not None else c.a("ratio")
    if training and r > 0:
        raise c.unsupported("training_mode=True (random dropout)")
    return [x, torch.ones_like(x, dtype=torch.bool)]


# ------------------------------------------------------------------------------------------------------------------
# quantization


def _qrange(dt: torch.dtype) -> tuple[int, int]:
    info = torch.iinfo(dt)
    return info.min, info.max


def _q_broadcast(p: Tensor, x: Tensor, axis: int, block: int) -> Tensor:
    """A scale / zero point, scalar, per-axis (1-D) or blocked (same rank as x), in a shape that broadcasts to x."""
    if p.dim() == 0 or p.numel() == 1 and block == 0:
        return p.reshape(())
    if block:
        return p.repeat_interleave(block, dim=axis).narrow(axis, 0, x.shape[axis])
    shape = [1] * x.dim()
    shape[axis] = -1
    return p.reshape(shape)


@op("DequantizeLinear", axis=1, block_size=0)
def _dequantize_linear(c, x, scale, zp=None):
    ax = _norm_axis(c.a("axis"), x.dim(), c) if scale.numel() > 1 else 0
    block = int(c.a("block_size"))
    s = _q_broadcast(scale, x, ax, block)
    xv = x.float() if x.dtype in _FLOAT8 else x
    if zp is not None and not (x.dtype in _FLOAT8):
        xv = xv.long() - _q_broadcast(zp, x, ax, block).long()
    elif zp is not None:
        xv = xv - _q_broadcast(zp, x, ax, block).float()
    return xv.to(scale.dtype) * s


@op("QuantizeLinear", axis=1, block_size=0, saturate=1)
def _quantize_linear(c, x, scale, zp=None):
    ax = _norm_axis(c.a("axis"), x.dim(), c) if scale.numel() > 1 else 0
    block = int(c.a("block_size"))
    if zp is not None:
        dt = zp.dtype
    elif c.a("output_dtype"):
        dt = ONNX_DTYPES.get(int(c.a("output_dtype")))
        if dt is None:
            raise c.unsupported(f"output_dtype {c.a('output_dtype')}")
    else:
        dt = torch.uint8
    s = _q_broadcast(scale, x, ax, block).to(x.dtype)
    y = x / s
    if dt in _FLOAT8:
        if zp is not None:
            y = y + _q_broadcast(zp, x, ax, block).float()
        return _cast(y, dt, bool(c.a("saturate")))
    y = torch.round(y)  # half to even
    if zp is not None:
        y = y + _q_broadcast(zp, x, ax, block).to(y.dtype)
    lo, hi = _qrange(dt)
    return torch.clamp(y, lo, hi).to(dt)


@op("DynamicQuantizeLinear")
def _dynamic_quantize_linear(c, x):
    xf = x.float()
    lo = torch.clamp(xf.min(), max=0) if xf.numel() else torch.zeros((), device=x.device)
    hi = torch.clamp(xf.max(), min=0) if xf.numel() else torch.zeros((), device=x.device)
    scale = (hi - lo) / 255.0
    safe = torch.where(scale == 0, torch.ones_like(scale), scale)
    zp = torch.clamp(torch.round(0 - lo / safe), 0, 255)
    y = torch.clamp(torch.round(xf / safe) + zp, 0, 255).to(torch.uint8)
    return [y, scale.to(torch.float32), zp.to(torch.uint8)]
