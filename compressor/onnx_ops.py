"""Torch implementations of generic ONNX ops (the nodes the IR does not raise), for the executor and constant folding.

``run_op(op_type, domain, inputs, attrs, opset, node_name)`` follows the ONNX semantics of the given default-domain
opset (13..21): attribute defaults, axes given as attribute or input depending on the version, integer and
broadcasting rules. Outputs stay on the device of the inputs.
"""
from __future__ import annotations

import math
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from .errors import ShapeError, UnsupportedOpError

Tensor = torch.Tensor
_REG: dict[tuple[str, str], Callable] = {}
SUPPORTED: dict[str, set[str]] = {}

# ONNX TensorProto data type -> torch dtype
ONNX_DTYPES: dict[int, torch.dtype] = {
    1: torch.float32, 2: torch.uint8, 3: torch.int8, 4: torch.uint16, 5: torch.int16, 6: torch.int32, 7: torch.int64,
    9: torch.bool, 10: torch.float16, 11: torch.float64, 12: torch.uint32, 13: torch.uint64, 16: torch.bfloat16,
}  # fmt: skip


def op(*names: str, domain: str = ""):
    def deco(fn):
        for n in names:
            _REG[(domain, n)] = fn
            SUPPORTED.setdefault(domain, set()).add(n)
        return fn

    return deco


def supported(op_type: str, domain: str = "") -> bool:
    return (_norm_domain(domain), op_type) in _REG


def _norm_domain(d: str) -> str:
    return "" if d in ("", "ai.onnx") else d


class Ctx:
    __slots__ = ("attrs", "opset", "name", "op")

    def __init__(self, attrs, opset, name, op_type):
        self.attrs, self.opset, self.name, self.op = attrs, opset, name, op_type

    def a(self, key: str, default: Any = None) -> Any:
        return self.attrs.get(key, default)

    def unsupported(self, what: str):
        return UnsupportedOpError(f"{self.op}: {what} at node '{self.name}'")


def run_op(op_type: str, domain: str, inputs: list[Tensor | None], attrs: dict, opset: int, node_name: str,
           num_outputs: int | None = None) -> list[Tensor]:  # fmt: skip
    fn = _REG.get((_norm_domain(domain), op_type))
    if fn is None:
        dom = f"{domain}." if domain else ""
        raise UnsupportedOpError(f"op {dom}{op_type} is not supported by the executor at node '{node_name}'")
    c = Ctx(attrs or {}, int(opset), node_name, op_type)
    if num_outputs is not None:
        c.attrs = {**c.attrs, "_num_outputs": int(num_outputs)}
    try:
        out = fn(c, *inputs)
    except (UnsupportedOpError, ShapeError):
        raise
    except (RuntimeError, IndexError, ValueError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ShapeError(f"{op_type} failed: {msg}", node=node_name) from e
    return list(out) if isinstance(out, (list, tuple)) else [out]


# ------------------------------------------------------------------------------------------------------------
# helpers
def _ints(t: Tensor | None) -> list[int] | None:
    if t is None:
        return None
    return [int(v) for v in t.reshape(-1).tolist()]


def _axes(c: Ctx, t: Tensor | None, since: int) -> list[int] | None:
    """Axes from the attribute (opset < since) or the input (opset >= since)."""
    if c.opset >= since:
        return _ints(t) if t is not None and t.numel() > 0 else (None if t is None else [])
    return c.a("axes")


def _result_dtype(a: Tensor, b: Tensor) -> torch.dtype:
    return a.dtype


def _bin(fn):
    def impl(c, a, b):
        return fn(a, b.to(a.dtype) if b.dtype != a.dtype else b)

    return impl


def _idiv(a: Tensor, b: Tensor) -> Tensor:
    if a.dtype.is_floating_point:
        return a / b
    return torch.div(a, b, rounding_mode="trunc")


for _name, _fn in {"Add": torch.add, "Sub": torch.sub, "Mul": torch.mul, "Div": _idiv}.items():
    op(_name)(_bin(_fn))


@op("Pow")
def _pow(c, a, b):
    if a.dtype.is_floating_point:
        return torch.pow(a, b.to(a.dtype))
    return torch.pow(a.to(torch.float64), b.to(torch.float64)).to(a.dtype)


@op("Mod")
def _mod(c, a, b):
    if c.a("fmod", 0) or a.dtype.is_floating_point:
        return torch.fmod(a, b)
    return torch.remainder(a, b)


def _variadic(fn):
    def impl(c, *xs):
        out = xs[0]
        for x in xs[1:]:
            out = fn(out, x)
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
}.items():  # fmt: skip
    op(_name)(lambda c, a, b, _f=_fn: _f(a, b))

_UNARY = {
    "Neg": torch.neg, "Abs": torch.abs, "Exp": torch.exp, "Log": torch.log, "Sqrt": torch.sqrt, "Reciprocal": torch.reciprocal,
    "Tanh": torch.tanh, "Sigmoid": torch.sigmoid, "Relu": torch.relu, "Erf": torch.erf, "Sin": torch.sin, "Cos": torch.cos,
    "Tan": torch.tan, "Floor": torch.floor, "Ceil": torch.ceil, "Round": torch.round, "Sign": torch.sign, "Not": torch.logical_not,
    "IsNaN": torch.isnan, "Softsign": F.softsign, "Asin": torch.asin, "Acos": torch.acos, "Atan": torch.atan, "Sinh": torch.sinh,
    "Cosh": torch.cosh, "Mish": F.mish, "Identity": lambda x: x,
}  # fmt: skip
for _name, _fn in _UNARY.items():
    op(_name)(lambda c, x, _f=_fn: _f(x))


@op("IsInf")
def _isinf(c, x):
    pos, neg = c.a("detect_positive", 1), c.a("detect_negative", 1)
    return (torch.isposinf(x) & bool(pos)) | (torch.isneginf(x) & bool(neg))


@op("Softplus")
def _softplus(c, x):
    return F.softplus(x)


@op("LeakyRelu")
def _leaky(c, x):
    return F.leaky_relu(x, c.a("alpha", 0.01))


@op("Elu")
def _elu(c, x):
    return F.elu(x, c.a("alpha", 1.0))


@op("Selu")
def _selu(c, x):
    a, g = c.a("alpha", 1.67326319217681884765625), c.a("gamma", 1.05070102214813232421875)
    return g * torch.where(x > 0, x, a * (torch.exp(x) - 1))


@op("HardSigmoid")
def _hsig(c, x):
    return torch.clamp(c.a("alpha", 0.2) * x + c.a("beta", 0.5), 0, 1)


@op("HardSwish")
def _hswish(c, x):
    return x * torch.clamp(x / 6 + 0.5, 0, 1)


@op("Gelu")
def _gelu(c, x):
    return F.gelu(x, approximate="tanh" if c.a("approximate", "none") == "tanh" else "none")


@op("Gelu", "FastGelu", "BiasGelu", domain="com.microsoft")
def _ms_gelu(c, x, bias=None):
    if bias is not None:
        x = x + bias
    return F.gelu(x, approximate="tanh" if c.op == "FastGelu" else "none")


@op("PRelu")
def _prelu(c, x, slope):
    return torch.where(x >= 0, x, x * slope)


@op("Clip")
def _clip(c, x, lo=None, hi=None):
    if c.opset < 11:
        lo_v, hi_v = c.a("min", -math.inf), c.a("max", math.inf)
        return torch.clamp(x, lo_v, hi_v)
    if lo is not None:
        x = torch.maximum(x, lo.to(x.dtype))
    if hi is not None:
        x = torch.minimum(x, hi.to(x.dtype))
    return x


def _softmax_like(fn):
    def impl(c, x):
        axis = c.a("axis", -1 if c.opset >= 13 else 1)
        if c.opset >= 13:
            return fn(x, dim=axis)
        ax = axis % x.dim()
        shp = x.shape
        flat = x.reshape(int(np.prod(shp[:ax], dtype=np.int64)), -1)
        return fn(flat, dim=1).reshape(shp)

    return impl


op("Softmax")(_softmax_like(torch.softmax))
op("LogSoftmax")(_softmax_like(torch.log_softmax))


@op("Cast")
def _cast(c, x, *_):
    to = int(c.a("to"))
    dt = ONNX_DTYPES.get(to)
    if dt is None:
        raise c.unsupported(f"cast to ONNX type {to}")
    if dt == torch.bool:
        return x != 0
    if not dt.is_floating_point and x.dtype.is_floating_point:
        return torch.trunc(x).to(dt)
    return x.to(dt)


@op("CastLike")
def _castlike(c, x, like):
    return x.to(like.dtype)


@op("MatMul")
def _matmul(c, a, b):
    return torch.matmul(a, b)


@op("Gemm")
def _gemm(c, a, b, cc=None):
    if c.a("transA", 0):
        a = a.t()
    if c.a("transB", 0):
        b = b.t()
    y = c.a("alpha", 1.0) * (a @ b)
    if cc is not None:
        y = y + c.a("beta", 1.0) * cc
    return y


@op("Einsum")
def _einsum(c, *xs):
    return torch.einsum(c.a("equation").replace(" ", ""), *xs)


@op("Transpose")
def _transpose(c, x):
    perm = c.a("perm") or list(range(x.dim() - 1, -1, -1))
    return x.permute(*perm)


@op("Reshape")
def _reshape(c, x, shape):
    s = _ints(shape)
    allowzero = c.a("allowzero", 0)
    out = []
    for i, d in enumerate(s):
        out.append(x.shape[i] if d == 0 and not allowzero else d)
    return x.reshape(out)


@op("Flatten")
def _flatten(c, x):
    ax = c.a("axis", 1) % (x.dim() + 1) if x.dim() else 0
    lead = int(np.prod(x.shape[:ax], dtype=np.int64))
    return x.reshape(lead, -1) if x.numel() else x.reshape(lead, int(np.prod(x.shape[ax:], dtype=np.int64)))


@op("Squeeze")
def _squeeze(c, x, axes=None):
    ax = _axes(c, axes, 13)
    if ax is None:
        return x.squeeze()
    ax = sorted((a % x.dim() for a in ax), reverse=True)
    for a in ax:
        x = x.squeeze(a)
    return x


@op("Unsqueeze")
def _unsqueeze(c, x, axes=None):
    ax = _axes(c, axes, 13)
    r = x.dim() + len(ax)
    for a in sorted(a % r for a in ax):
        x = x.unsqueeze(a)
    return x


@op("Shape")
def _shape(c, x):
    s = list(x.shape)
    start, end = c.a("start", 0), c.a("end", None)
    return torch.tensor(s[start:end] if end is not None else s[start:], dtype=torch.int64, device=x.device)


@op("Size")
def _size(c, x):
    return torch.tensor(x.numel(), dtype=torch.int64, device=x.device)


@op("Concat")
def _concat(c, *xs):
    xs = [x for x in xs if x is not None]
    dt = xs[0].dtype
    return torch.cat([x.to(dt) for x in xs], dim=c.a("axis"))


@op("Split")
def _split(c, x, split=None, *_):
    axis = c.a("axis", 0)
    sizes = _ints(split) if c.opset >= 13 else c.a("split")
    if not sizes:
        n = c.a("num_outputs") or c.a("_num_outputs")
        if n is None:
            raise c.unsupported("Split without sizes or num_outputs")
        d = x.shape[axis]
        k = -(-d // n)
        sizes = [k] * (d // k) + ([d - k * (d // k)] if d % k else [])
    return list(torch.split(x, sizes, dim=axis))


@op("Slice")
def _slice(c, x, starts=None, ends=None, axes=None, steps=None):
    if c.opset < 10:
        st, en, ax, sp = c.a("starts"), c.a("ends"), c.a("axes"), None
    else:
        st, en, ax, sp = _ints(starts), _ints(ends), _ints(axes), _ints(steps)
    ax = ax or list(range(len(st)))
    sp = sp or [1] * len(st)
    for s, e, a, k in zip(st, en, ax, sp):
        a %= x.dim()
        d = x.shape[a]
        if k > 0:
            s = max(0, min(d, s + d if s < 0 else s))
            e = max(0, min(d, e + d if e < 0 else e))
            x = x.narrow(a, s, max(0, e - s)) if k == 1 else x.index_select(a, torch.arange(s, max(s, e), k, device=x.device))
        else:
            s = max(-1, min(d - 1, s + d if s < 0 else s))
            e = max(-1, min(d - 1, e + d if e < 0 else e))
            x = x.index_select(a, torch.arange(s, e, k, device=x.device) if s > e else torch.zeros(0, dtype=torch.long, device=x.device))
    return x


@op("Gather")
def _gather(c, x, idx):
    axis = c.a("axis", 0) % x.dim()
    i = idx.long()
    i = torch.where(i < 0, i + x.shape[axis], i)
    out = x.index_select(axis, i.reshape(-1))
    return out.reshape(tuple(x.shape[:axis]) + tuple(idx.shape) + tuple(x.shape[axis + 1 :]))


@op("GatherElements")
def _gather_el(c, x, idx):
    axis = c.a("axis", 0) % x.dim()
    i = idx.long()
    return torch.gather(x, axis, torch.where(i < 0, i + x.shape[axis], i))


@op("GatherND")
def _gather_nd(c, x, idx):
    b = c.a("batch_dims", 0)
    if b:
        raise c.unsupported("batch_dims != 0")
    i = idx.long()
    k = i.shape[-1]
    i = torch.where(i < 0, i + torch.tensor(x.shape[:k], device=i.device), i)
    flat = i.reshape(-1, k)
    out = x[tuple(flat[:, j] for j in range(k))]
    return out.reshape(tuple(i.shape[:-1]) + tuple(x.shape[k:]))


@op("ScatterND")
def _scatter_nd(c, x, idx, upd):
    out = x.clone()
    i = idx.long()
    k = i.shape[-1]
    flat = i.reshape(-1, k)
    u = upd.reshape((-1,) + tuple(x.shape[k:]))
    key = tuple(flat[:, j] for j in range(k))
    red = c.a("reduction", "none")
    if red == "none":
        out[key] = u
    elif red == "add":
        out.index_put_(key, u, accumulate=True)
    elif red == "mul":
        for r in range(flat.shape[0]):
            out[tuple(flat[r].tolist())] *= u[r]
    else:
        raise c.unsupported(f"reduction {red}")
    return out


@op("ScatterElements")
def _scatter_el(c, x, idx, upd):
    axis = c.a("axis", 0) % x.dim()
    i = idx.long()
    i = torch.where(i < 0, i + x.shape[axis], i)
    red = c.a("reduction", "none")
    if red == "none":
        return x.scatter(axis, i, upd)
    m = {"add": "sum", "mul": "prod", "max": "amax", "min": "amin"}[red]
    return x.scatter_reduce(axis, i, upd, reduce=m, include_self=True)


@op("Expand")
def _expand(c, x, shape):
    s = _ints(shape)
    nd = max(len(s), x.dim())
    xs = [1] * (nd - x.dim()) + list(x.shape)
    s = [1] * (nd - len(s)) + s
    target = [a if b == 1 else b for a, b in zip(xs, s)]
    return x.reshape(xs).expand(target)


@op("Tile")
def _tile(c, x, reps):
    return x.repeat(*_ints(reps))


@op("ConstantOfShape")
def _const_of_shape(c, shape):
    v = c.a("value")
    arr = np.zeros(1, np.float32) if v is None else np.asarray(v).reshape(-1)
    t = torch.from_numpy(arr.copy())
    return torch.full(_ints(shape), t[0].item(), dtype=t.dtype, device=shape.device)


@op("Constant")
def _constant(c):
    for k in ("value", "value_float", "value_int", "value_floats", "value_ints"):
        if k in c.attrs:
            v = c.attrs[k]
            arr = np.asarray(v, dtype=np.float32 if "float" in k else (np.int64 if "int" in k else None))
            return torch.from_numpy(np.array(arr))
    raise c.unsupported("Constant without a supported value attribute")


@op("Range")
def _range(c, start, limit, delta):
    s, l, d = start.item(), limit.item(), delta.item()
    n = max(int(math.ceil((l - s) / d)), 0)
    return (torch.arange(n, device=start.device, dtype=torch.float64 if start.dtype.is_floating_point else torch.int64) * d + s).to(start.dtype)


@op("Where")
def _where(c, cond, a, b):
    return torch.where(cond.bool(), a, b.to(a.dtype))


@op("Trilu")
def _trilu(c, x, k=None):
    kk = int(k.item()) if k is not None else 0
    return torch.triu(x, kk) if c.a("upper", 1) else torch.tril(x, kk)


@op("CumSum")
def _cumsum(c, x, axis):
    ax = int(axis.item())
    if c.a("reverse", 0):
        x = x.flip(ax)
    y = torch.cumsum(x, ax).to(x.dtype)
    if c.a("exclusive", 0):
        y = y - x
    if c.a("reverse", 0):
        y = y.flip(ax)
    return y


def _reduce(fn, since=18):
    def impl(c, x, axes=None):
        ax = _axes(c, axes, 13 if c.op == "ReduceSum" else since)
        keep = bool(c.a("keepdims", 1))
        if not ax:
            if c.a("noop_with_empty_axes", 0) and ax is not None or (ax == [] and c.a("noop_with_empty_axes", 0)):
                return x
            ax = list(range(x.dim()))
        ax = sorted(a % x.dim() for a in ax) if x.dim() else []
        if not ax:
            return fn(x, None, keep)
        return fn(x, ax, keep)

    return impl


def _rsum(x, ax, k):
    return x.sum() if ax is None else torch.sum(x, dim=ax, keepdim=k)


def _rmean(x, ax, k):
    return x.mean() if ax is None else torch.mean(x, dim=ax, keepdim=k)


def _rmax(x, ax, k):
    return x if ax is None else torch.amax(x, dim=ax, keepdim=k)


def _rmin(x, ax, k):
    return x if ax is None else torch.amin(x, dim=ax, keepdim=k)


def _rprod(x, ax, k):
    for a in sorted(ax or [], reverse=True):
        x = torch.prod(x, dim=a, keepdim=k)
    return x


op("ReduceSum")(_reduce(_rsum))
op("ReduceMean")(_reduce(_rmean))
op("ReduceMax")(_reduce(_rmax))
op("ReduceMin")(_reduce(_rmin))
op("ReduceProd")(_reduce(_rprod))
op("ReduceL2")(_reduce(lambda x, ax, k: torch.sqrt(_rsum(x * x, ax, k))))
op("ReduceL1")(_reduce(lambda x, ax, k: _rsum(x.abs(), ax, k)))
op("ReduceSumSquare")(_reduce(lambda x, ax, k: _rsum(x * x, ax, k)))
op("ReduceLogSumExp")(_reduce(lambda x, ax, k: torch.logsumexp(x, dim=ax, keepdim=k)))


def _arg(fn):
    def impl(c, x):
        ax = c.a("axis", 0)
        keep = bool(c.a("keepdims", 1))
        if c.a("select_last_index", 0):
            flipped = x.flip(ax)
            i = fn(flipped, dim=ax, keepdim=keep)
            return (x.shape[ax] - 1 - i).long()
        return fn(x, dim=ax, keepdim=keep).long()

    return impl


op("ArgMax")(_arg(torch.argmax))
op("ArgMin")(_arg(torch.argmin))


@op("TopK")
def _topk(c, x, k=None):
    kk = int(k.reshape(-1)[0].item()) if k is not None else c.a("k")
    v, i = torch.topk(x, kk, dim=c.a("axis", -1), largest=bool(c.a("largest", 1)), sorted=bool(c.a("sorted", 1)))
    return [v, i.long()]


@op("NonZero")
def _nonzero(c, x):
    return torch.nonzero(x).t().contiguous().long()


@op("OneHot")
def _onehot(c, idx, depth, values):
    d = int(depth.reshape(-1)[0].item())
    i = idx.long()
    i = torch.where(i < 0, i + d, i)
    oh = F.one_hot(i.clamp(0, d - 1), d).bool() & ((i >= 0) & (i < d)).unsqueeze(-1)
    out = torch.where(oh, values[1], values[0])
    ax = c.a("axis", -1)
    if ax != -1:
        out = out.movedim(-1, ax)
    return out


@op("Dropout")
def _dropout(c, x, *_):
    return [x, torch.ones_like(x, dtype=torch.bool)]


@op("LayerNormalization")
def _layernorm(c, x, w, b=None):
    ax = c.a("axis", -1) % x.dim()
    eps = c.a("epsilon", 1e-5)
    dims = list(range(ax, x.dim()))
    xf = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
    mu = xf.mean(dim=dims, keepdim=True)
    var = ((xf - mu) ** 2).mean(dim=dims, keepdim=True)
    inv = torch.rsqrt(var + eps)
    y = ((xf - mu) * inv).to(x.dtype) * w
    if b is not None:
        y = y + b
    return [y, mu, inv]


@op("RMSNormalization")
def _rmsnorm(c, x, w):
    ax = c.a("axis", -1) % x.dim()
    dims = list(range(ax, x.dim()))
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(dim=dims, keepdim=True) + c.a("epsilon", 1e-5))
    return y.to(x.dtype) * w


@op("SimplifiedLayerNormalization", domain="")
@op("SimplifiedLayerNormalization", domain="com.microsoft")
def _simplified_ln(c, x, w):
    return _rmsnorm(c, x, w)


@op("SkipLayerNormalization", domain="com.microsoft")
def _skip_ln(c, x, skip, gamma, beta=None, bias=None):
    s = x + skip + (bias if bias is not None else 0)
    c.attrs = {**c.attrs, "axis": -1}
    y = _layernorm(c, s, gamma, beta)[0]
    return [y, torch.zeros(0), torch.zeros(0), s]


@op("BatchNormalization")
def _batchnorm(c, x, scale, bias, mean, var):
    return F.batch_norm(x, mean, var, scale, bias, False, 0.0, c.a("epsilon", 1e-5))


@op("InstanceNormalization")
def _instnorm(c, x, scale, bias):
    return F.instance_norm(x, weight=scale, bias=bias, eps=c.a("epsilon", 1e-5))


@op("GroupNormalization")
def _groupnorm(c, x, scale, bias):
    g = c.a("num_groups")
    n = x.shape[0]
    xr = x.reshape(n, g, -1)
    mu = xr.mean(-1, keepdim=True)
    var = ((xr - mu) ** 2).mean(-1, keepdim=True)
    y = ((xr - mu) / torch.sqrt(var + c.a("epsilon", 1e-5))).reshape(x.shape)
    shp = (1, -1) + (1,) * (x.dim() - 2)
    if scale.numel() == x.shape[1]:
        return y * scale.reshape(shp) + bias.reshape(shp)
    rep = x.shape[1] // g
    return y * scale.repeat_interleave(rep).reshape(shp) + bias.repeat_interleave(rep).reshape(shp)


def _pads_for(c, x, kernel, strides, dil):
    nd = len(kernel)
    auto = c.a("auto_pad", "NOTSET")
    pads = c.a("pads") or [0] * (2 * nd)
    if auto in ("SAME_UPPER", "SAME_LOWER"):
        pads = [0] * (2 * nd)
        for i in range(nd):
            d = x.shape[2 + i]
            out = -(-d // strides[i])
            total = max(0, (out - 1) * strides[i] + (kernel[i] - 1) * dil[i] + 1 - d)
            lo = total // 2 if auto == "SAME_UPPER" else total - total // 2
            pads[i], pads[i + nd] = lo, total - lo
    elif auto == "VALID":
        pads = [0] * (2 * nd)
    return pads


def _pad_input(x, pads, nd, value=0.0):
    tp = []
    for i in reversed(range(nd)):
        tp += [pads[i], pads[i + nd]]
    if any(tp):
        x = F.pad(x, tp, value=value)
    return x


@op("Conv")
def _conv(c, x, w, b=None):
    nd = w.dim() - 2
    kernel = c.a("kernel_shape") or list(w.shape[2:])
    strides = c.a("strides") or [1] * nd
    dil = c.a("dilations") or [1] * nd
    pads = _pads_for(c, x, kernel, strides, dil)
    x = _pad_input(x, pads, nd)
    fn = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[nd]
    return fn(x, w, b, stride=strides, dilation=dil, groups=c.a("group", 1))


@op("ConvTranspose")
def _convt(c, x, w, b=None):
    nd = w.dim() - 2
    strides = c.a("strides") or [1] * nd
    dil = c.a("dilations") or [1] * nd
    pads = c.a("pads") or [0] * (2 * nd)
    if any(pads[i] != pads[i + nd] for i in range(nd)) or c.a("auto_pad", "NOTSET") not in ("NOTSET",):
        raise c.unsupported("asymmetric or automatic padding")
    outpad = c.a("output_padding") or [0] * nd
    fn = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}[nd]
    return fn(x, w, b, stride=strides, padding=pads[:nd], output_padding=outpad, groups=c.a("group", 1), dilation=dil)


def _pool(kind):
    def impl(c, x):
        nd = x.dim() - 2
        kernel = c.a("kernel_shape")
        strides = c.a("strides") or [1] * nd
        dil = c.a("dilations") or [1] * nd
        pads = _pads_for(c, x, kernel, strides, dil)
        ceil = bool(c.a("ceil_mode", 0))
        sym = all(pads[i] == pads[i + nd] for i in range(nd))
        if kind == "max":
            if not sym:
                x = _pad_input(x, pads, nd, value=-math.inf)
                pads = [0] * (2 * nd)
            fn = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}[nd]
            return fn(x, kernel, strides, pads[:nd], dil, ceil_mode=ceil)
        cip = bool(c.a("count_include_pad", 0))
        if not sym:
            if cip:
                x = _pad_input(x, pads, nd)
                pads = [0] * (2 * nd)
            else:
                raise c.unsupported("asymmetric padding without count_include_pad")
        fn = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}[nd]
        return fn(x, kernel, strides, pads[:nd], ceil_mode=ceil, count_include_pad=cip)

    return impl


op("MaxPool")(_pool("max"))
op("AveragePool")(_pool("avg"))


@op("GlobalAveragePool")
def _gap(c, x):
    return x.mean(dim=list(range(2, x.dim())), keepdim=True)


@op("GlobalMaxPool")
def _gmp(c, x):
    return torch.amax(x, dim=list(range(2, x.dim())), keepdim=True)


@op("Pad")
def _pad(c, x, pads=None, value=None, axes=None):
    mode = c.a("mode", "constant")
    p = _ints(pads) if c.opset >= 11 else c.a("pads")
    v = float(value.item()) if value is not None and value.numel() else (c.a("value", 0.0) if c.opset < 11 else 0.0)
    nd = x.dim()
    ax = [a % nd for a in (_ints(axes) or list(range(nd)))]
    full = [0] * (2 * nd)
    k = len(ax)
    for j, a in enumerate(ax):
        full[a], full[a + nd] = p[j], p[j + k]
    tp = []
    for i in reversed(range(nd)):
        tp += [full[i], full[i + nd]]
    if mode == "constant":
        return F.pad(x, tp, value=v)
    m = {"reflect": "reflect", "edge": "replicate", "wrap": "circular"}.get(mode)
    if m is None:
        raise c.unsupported(f"mode {mode}")
    lead = sum(1 for i in range(nd) if full[i] or full[i + nd])
    # torch pads the trailing dims only, and needs a batch dim for non-constant modes
    first = min((i for i in range(nd) if full[i] or full[i + nd]), default=nd)
    keep = x.shape[:first]
    xr = x.reshape((1, -1) + tuple(x.shape[first:]))
    y = F.pad(xr, tp[: 2 * (nd - first)], mode=m)
    del lead
    return y.reshape(tuple(keep) + tuple(y.shape[2:]))


@op("DepthToSpace")
def _d2s(c, x):
    b = c.a("blocksize")
    n, ch, h, w = x.shape
    if c.a("mode", "DCR") == "DCR":
        y = x.reshape(n, b, b, ch // (b * b), h, w).permute(0, 3, 4, 1, 5, 2)
    else:
        y = x.reshape(n, ch // (b * b), b, b, h, w).permute(0, 1, 4, 2, 5, 3)
    return y.reshape(n, ch // (b * b), h * b, w * b)


@op("SpaceToDepth")
def _s2d(c, x):
    b = c.a("blocksize")
    n, ch, h, w = x.shape
    y = x.reshape(n, ch, h // b, b, w // b, b).permute(0, 3, 5, 1, 2, 4)
    return y.reshape(n, ch * b * b, h // b, w // b)


@op("Resize")
def _resize(c, x, roi=None, scales=None, sizes=None):
    mode = c.a("mode", "nearest")
    ctm = c.a("coordinate_transformation_mode", "half_pixel")
    nd = x.dim() - 2
    if sizes is not None and sizes.numel():
        size = _ints(sizes)[2:]
        sc = None
    else:
        s = [float(v) for v in scales.reshape(-1).tolist()]
        if s[:2] != [1.0, 1.0]:
            raise c.unsupported("scaling of batch or channel dims")
        size, sc = None, s[2:]
    if mode == "nearest":
        if ctm != "asymmetric" or c.a("nearest_mode", "round_prefer_floor") != "floor":
            # torch 'nearest-exact' is half_pixel + round; 'nearest' is asymmetric + floor
            if ctm in ("half_pixel", "pytorch_half_pixel"):
                return F.interpolate(x, size=size, scale_factor=sc, mode="nearest-exact")
            raise c.unsupported(f"nearest with {ctm}/{c.a('nearest_mode', 'round_prefer_floor')}")
        return F.interpolate(x, size=size, scale_factor=sc, mode="nearest")
    if mode == "linear":
        m = {1: "linear", 2: "bilinear", 3: "trilinear"}[nd]
        if ctm == "align_corners":
            return F.interpolate(x, size=size, scale_factor=sc, mode=m, align_corners=True)
        if ctm in ("half_pixel", "pytorch_half_pixel"):
            return F.interpolate(x, size=size, scale_factor=sc, mode=m, align_corners=False)
        raise c.unsupported(f"linear with {ctm}")
    raise c.unsupported(f"mode {mode}")


@op("Upsample")
def _upsample(c, x, scales):
    c.attrs = {**c.attrs, "coordinate_transformation_mode": "asymmetric", "nearest_mode": "floor"}
    return _resize(c, x, None, scales, None)
