"""Execute sparsec IR with torch (CPU, or a CUDA GPU when asked for and present).

The executor is the reference semantics of the IR and the engine of calibration: it can run a range of nodes
(``run_range``), keeps only the values still needed later (liveness), and reports to an :class:`Observer` the input
of every Linear (flattened to ``[tokens, in_features]``; for MoE experts only the tokens routed to them) and the
routing decisions of every MoE layer.
"""
from __future__ import annotations

import itertools
import os
from typing import Any, Iterable, Mapping

import numpy as np
import torch
import torch.nn.functional as F

from .errors import InputShapeError, IRError, NumericalError, ShapeError
from .ir import Conv, Embedding, Expert, Generic, Graph, LayerNorm, Linear, MoE, Node, Residual, RMSNorm, conv_out_size

_TORCH_DTYPES = {
    "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64,
    "int8": torch.int8, "int16": torch.int16, "int32": torch.int32, "int64": torch.int64, "uint8": torch.uint8,
    "bool": torch.bool,
}  # fmt: skip


def _initialise_mkl() -> None:
    """Make torch's first MKL vector-math call from one thread.

    With torch's MKL build, the first call of a vectorised math function (exp, tanh, erf, ...) that runs on several
    threads at once races in MKL's one-time initialisation: one thread's chunk is computed by a different, less
    accurate path (measured: 4096 of 8192 tanh values off by 4e-5 relative, in 1 to 8 of 20 fresh processes). The same
    ``compress`` command then wrote different reports. A one-element call, which never runs in parallel, initialises
    MKL before any parallel one (tests/test_ir.py::test_first_vector_math_call_is_deterministic)."""
    torch.exp(torch.zeros(1))


_initialise_mkl()


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """``None`` -> $SPARSEC_DEVICE, else CPU. ``"auto"`` -> CUDA when available. A device this torch cannot use (not
    ``cpu`` / ``cuda[:N]``, CUDA missing, no such GPU) is a RecipeError naming it."""
    from .errors import RecipeError

    src = "SPARSEC_DEVICE" if device is None else "device"
    if device is None:
        device = os.environ.get("SPARSEC_DEVICE", "cpu")
    if str(device) == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if isinstance(device, torch.device):
        dev = device
    else:
        try:
            dev = torch.device(str(device).strip())
        except (RuntimeError, ValueError):
            raise RecipeError(f"{src} {device!r}: not a device (cpu, cuda, cuda:N or auto)") from None
    if dev.type not in ("cpu", "cuda"):
        raise RecipeError(f"{src} {device!r}: the executor runs on cpu or cuda (cuda:N), or auto")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise RecipeError(f"{src} {device!r}: CUDA is not available to this torch (use cpu or auto)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise RecipeError(f"{src} {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    return dev


class Observer:
    """Receives what the executor sees. Override the methods you need."""

    def wants_linear(self, name: str) -> bool:
        return False

    def linear_input(self, name: str, x: torch.Tensor) -> None:
        """``x``: the layer's input as ``[tokens, in_features]``."""

    def moe_routing(self, name: str, logits: torch.Tensor, selected: torch.Tensor) -> None:
        """``logits``: router outputs ``[tokens, routes]``; ``selected``: chosen routes ``[tokens, k]``."""

    def value(self, name: str, tensor: torch.Tensor) -> None:
        """Called for every value in ``wants_values()``."""

    def wants_values(self) -> set[str]:
        return set()


_ACTS = {
    "silu": F.silu,
    "gelu": lambda x: F.gelu(x, approximate="none"),
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
    "identity": lambda x: x,
}


def check_feeds(g: Graph, feeds: Mapping[str, Any], *, partial: bool = False) -> None:
    """User inputs against the graph's inputs: names, rank, static dims, integer vs float."""
    unknown = [k for k in feeds if k not in g.inputs]
    if unknown:
        raise InputShapeError(f"unknown input name(s) {unknown}; the model's inputs are {g.inputs}")
    if not partial:
        missing = [i for i in g.inputs if i not in feeds]
        if missing:
            raise InputShapeError(f"missing input(s) {missing}; the model's inputs are {g.inputs}")
    for name, arr in feeds.items():
        v = g.values.get(name)
        shape = tuple(arr.shape)
        if v is None or v.shape is None:
            continue
        if len(shape) != len(v.shape):
            raise InputShapeError(f"input '{name}' has shape {list(shape)}, the model expects rank {len(v.shape)} {_fmt(v.shape)}")
        for got, want in zip(shape, v.shape):
            if isinstance(want, int) and got != want:
                raise InputShapeError(f"input '{name}' has shape {list(shape)}, the model expects {_fmt(v.shape)}")
        kind = _dtype_kind(arr)
        want_kind = "f" if v.dtype.startswith(("float", "bfloat")) else ("b" if v.dtype == "bool" else "i")
        if kind != want_kind:
            raise InputShapeError(f"input '{name}' has dtype {_dtype_name(arr)}, the model expects {v.dtype}")


def _fmt(shape) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"


def _dtype_kind(a) -> str:
    if isinstance(a, torch.Tensor):
        if a.dtype.is_floating_point:
            return "f"
        return "b" if a.dtype == torch.bool else "i"
    k = np.asarray(a).dtype.kind
    return {"f": "f", "b": "b", "i": "i", "u": "i"}.get(k, k)


def _dtype_name(a) -> str:
    return str(a.dtype).replace("torch.", "")


class Executor:
    def __init__(self, graph: Graph, device: str | torch.device | None = None):
        self.g = graph
        self.device = resolve_device(device)
        self.opset = int(graph.opset.get("", 17))
        # entries keep the weight/bias objects they were made from and hits compare by identity: ids of freed
        # objects are reused by new ones (e.g. experts replaced while merging), so an id alone is not a key
        self._wcache: dict[int, tuple[Any, Any, torch.Tensor, torch.Tensor | None]] = {}
        self._pcache: dict[tuple[int, str], tuple[Any, torch.Tensor]] = {}
        self._ccache: dict[str, tuple[int, torch.Tensor]] = {}
        self.refresh()

    def refresh(self) -> None:
        """Recompute liveness (call after the graph's node list changes)."""
        self.last_use: dict[str, int] = {}
        for i, n in enumerate(self.g.nodes):
            for inp in n.inputs:
                if inp:
                    self.last_use[inp] = i
        self.keep_always = set(self.g.outputs)

    # ---- tensors ---------------------------------------------------------------------------------------------
    def to_tensor(self, name: str, arr: Any) -> torch.Tensor:
        v = self.g.values.get(name)
        t = arr if isinstance(arr, torch.Tensor) else torch.from_numpy(np.asarray(arr, order="C"))
        if v is not None and v.dtype in _TORCH_DTYPES and t.dtype != _TORCH_DTYPES[v.dtype]:
            t = t.to(_TORCH_DTYPES[v.dtype])
        return t.to(self.device)

    def const(self, name: str) -> torch.Tensor:
        arr = self.g.constants[name]
        hit = self._ccache.get(name)
        if hit is not None and hit[0] == id(arr):
            return hit[1]
        t = torch.from_numpy(np.asarray(arr, order="C")).to(self.device)
        self._ccache[name] = (id(arr), t)
        return t

    def _param(self, node: Node, role: str, arr: np.ndarray | None) -> torch.Tensor | None:
        if arr is None:
            return None
        key = (id(node), role)
        hit = self._pcache.get(key)
        if hit is not None and hit[0] is arr:
            return hit[1]
        t = torch.from_numpy(np.asarray(arr, order="C")).to(self.device)
        self._pcache[key] = (arr, t)
        return t

    def linear_params(self, lin: Linear) -> tuple[torch.Tensor, torch.Tensor | None]:
        hit = self._wcache.get(id(lin))
        if hit is not None and hit[0] is lin.weight and hit[1] is lin.bias:
            return hit[2], hit[3]
        w = torch.from_numpy(np.asarray(lin.weight.materialize(), order="C")).to(self.device)
        b = None if lin.bias is None else torch.from_numpy(np.asarray(lin.bias, order="C")).to(self.device)
        self._wcache[id(lin)] = (lin.weight, lin.bias, w, b)
        return w, b

    # ---- running ---------------------------------------------------------------------------------------------
    def run(self, feeds: Mapping[str, Any], outputs: Iterable[str] | None = None, observer: Observer | None = None,
            check: bool = True) -> dict[str, np.ndarray]:  # fmt: skip
        res = self.run_torch(feeds, outputs, observer, check)
        return {k: _to_numpy(v) for k, v in res.items()}

    @torch.no_grad()
    def run_torch(self, feeds: Mapping[str, Any], outputs: Iterable[str] | None = None, observer: Observer | None = None,
                  check: bool = True) -> dict[str, torch.Tensor]:  # fmt: skip
        if check:
            check_feeds(self.g, feeds)
        env = {k: self.to_tensor(k, v) for k, v in feeds.items()}
        outs = list(outputs) if outputs is not None else list(self.g.outputs)
        env = self.run_range(env, 0, len(self.g.nodes), observer, keep=outs)
        missing = [o for o in outs if o not in env and o not in self.g.constants]
        if missing:
            raise IRError(f"outputs {missing} were not computed")
        return {o: env[o] if o in env else self.const(o) for o in outs}

    @torch.no_grad()
    def run_range(self, env: dict[str, torch.Tensor], start: int, stop: int, observer: Observer | None = None,
                  keep: Iterable[str] = ()) -> dict[str, torch.Tensor]:  # fmt: skip
        """Run ``nodes[start:stop]`` on ``env`` (modified and returned). Values not used after ``stop`` are dropped
        unless listed in ``keep`` or graph outputs."""
        keep_set = set(keep) | self.keep_always
        watch = observer.wants_values() if observer is not None else set()
        for i in range(start, stop):
            n = self.g.nodes[i]
            ins = []
            for name in n.inputs:
                if not name:
                    ins.append(None)
                elif name in env:
                    ins.append(env[name])
                elif name in self.g.constants:
                    ins.append(self.const(name))
                else:
                    raise IRError(f"input '{name}' is not available (run the nodes that produce it first)", node=n.name)
            try:
                outs = self.run_node(n, ins, observer)
            except (IRError, NumericalError):
                raise
            except Exception as e:  # noqa: BLE001 - an op failing on the given data is a shape problem for the user
                from .errors import SparsecError

                if isinstance(e, SparsecError):
                    raise
                raise ShapeError(f"{n.op} failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}", node=n.name) from e
            for name, t in zip(n.outputs, outs):
                if name:
                    env[name] = t
                    if name in watch:
                        observer.value(name, t)  # type: ignore[union-attr]
            for name in n.inputs:
                if name and name in env and name not in keep_set and self.last_use.get(name, -1) <= i:
                    del env[name]
            for name in n.outputs:
                if name and name in env and name not in self.last_use and name not in keep_set:
                    del env[name]
        return env

    def run_node(self, n: Node, ins: list[torch.Tensor | None], observer: Observer | None = None) -> list[torch.Tensor]:
        if isinstance(n, Generic):
            from .onnx_ops import run_op

            return run_op(n.op_type, n.domain, ins, n.attributes, self.opset, n.name, num_outputs=len(n.outputs))
        if isinstance(n, Conv):
            return [self.conv(n, ins[0], observer)]
        if isinstance(n, Linear):
            return [self.linear(n, ins[0], observer)]
        if isinstance(n, LayerNorm):
            x = ins[0]
            d = x.shape[-1]
            w = self._param(n, "weight", n.weight)
            b = self._param(n, "bias", n.bias)
            return [F.layer_norm(x, (d,), None if w is None else w.to(x.dtype), None if b is None else b.to(x.dtype), n.eps)]
        if isinstance(n, RMSNorm):
            x = ins[0]
            xf = x.float()
            y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + n.eps)
            y = y.to(x.dtype)
            w = self._param(n, "weight", n.weight)
            return [y if w is None else y * w.to(x.dtype)]
        if isinstance(n, Embedding):
            t = self._param(n, "table", n.table)
            ids = ins[0].long()
            if ids.numel() and (int(ids.min()) < -t.shape[0] or int(ids.max()) >= t.shape[0]):
                err = InputShapeError(f"token ids must be in [0, {t.shape[0]}), got values in [{int(ids.min())}, {int(ids.max())}]", node=n.name)
                err.values = (int(ids.min()), int(ids.max()))
                raise err
            ids = torch.where(ids < 0, ids + t.shape[0], ids)
            return [F.embedding(ids, t)]
        if isinstance(n, Residual):
            return [ins[0] + ins[1]]
        if isinstance(n, MoE):
            return [self.moe(n, ins[0], observer)]
        raise IRError(f"executor has no implementation of {n.op}", node=n.name)

    def linear(self, lin: Linear, x: torch.Tensor, observer: Observer | None = None) -> torch.Tensor:
        w, b = self.linear_params(lin)
        if observer is not None and observer.wants_linear(lin.name):
            observer.linear_input(lin.name, x.reshape(-1, x.shape[-1]))
        if x.dtype != w.dtype:
            return F.linear(x, w.to(x.dtype), None if b is None else b.to(x.dtype))
        return F.linear(x, w, b)

    def conv(self, n: Conv, x: torch.Tensor, observer: Observer | None = None) -> torch.Tensor:
        w, b = self.linear_params(n)
        nd = len(n.kernel_shape)
        if x.dim() != nd + 2 or x.shape[1] != n.in_channels:
            raise ShapeError(f"conv input of shape {list(x.shape)}: expected [batch, {n.in_channels}, {nd} spatial dims]", node=n.name)
        xp = pad_spatial(x, n.pads)
        if observer is not None and observer.wants_linear(n.name):
            observer.linear_input(n.name, conv_patches(xp, n.kernel_shape, n.strides, n.dilations))
        fn = (F.conv1d, F.conv2d, F.conv3d)[nd - 1]
        w4 = n.kernel_of(w).to(x.dtype)
        return fn(xp, w4, None if b is None else b.to(x.dtype), stride=n.strides, padding=0, dilation=n.dilations)

    def expert(self, e: Expert, x: torch.Tensor, observer: Observer | None) -> torch.Tensor:
        act = _ACTS[e.act]
        h = act(self.linear(e.gate, x, observer)) * self.linear(e.up, x, observer) if e.gate is not None else act(self.linear(e.up, x, observer))
        return self.linear(e.down, h, observer)

    def moe_gates(self, n: MoE, x2: torch.Tensor, observer: Observer | None = None):
        """Router forward: returns (logits [T, R], selected routes [T, k], weights [T, k] float32)."""
        logits = self.linear(n.router, x2, observer)
        lf = logits.float()
        probs = torch.softmax(lf, dim=-1) if n.score == "softmax" else torch.sigmoid(lf)
        topv, topi = torch.topk(probs, n.top_k, dim=-1)
        if n.renormalize:
            topv = topv / topv.sum(dim=-1, keepdim=True)
        if observer is not None:
            observer.moe_routing(n.name, logits, topi)
        return logits, topi, topv

    def moe(self, n: MoE, x: torch.Tensor, observer: Observer | None = None) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        _, topi, topv = self.moe_gates(n, x2, observer)
        if n.expert_map is not None:
            emap = torch.tensor(n.expert_map, device=x2.device, dtype=torch.long)
            topi = emap[topi]
        # experts may write a different width than they read (e.g. mid-way through slicing the residual stream)
        dout = n.experts[0].down.out_features if n.experts else shape[-1]
        out = x2.new_zeros(x2.shape[0], dout)
        ne = len(n.experts)
        # weight of each expert per token: sum of the weights of the selected routes it serves
        dense = torch.zeros(x2.shape[0], ne, dtype=torch.float32, device=x2.device)
        dense.scatter_add_(1, topi, topv)
        used = (torch.zeros(x2.shape[0], ne, dtype=torch.bool, device=x2.device)).scatter_(1, topi, True)
        for e_idx, e in enumerate(n.experts):
            tok = torch.nonzero(used[:, e_idx], as_tuple=False).flatten()
            if tok.numel() == 0:
                continue
            ye = self.expert(e, x2[tok], observer)
            out.index_add_(0, tok, ye * dense[tok, e_idx : e_idx + 1].to(ye.dtype))
        return out.reshape(*shape[:-1], dout)


def layer_rows(lin: Linear, x: torch.Tensor) -> torch.Tensor:
    """What a Linear multiplies by its weight, as ``[rows, in_features]``: its input flattened, or for a
    :class:`Conv` the im2col patches of its (padded) input."""
    if isinstance(lin, Conv):
        return conv_patches(pad_spatial(x, lin.pads), lin.kernel_shape, lin.strides, lin.dilations)
    return x.reshape(-1, x.shape[-1])


def input_key(lin: Linear) -> tuple:
    """Layers with equal keys multiply the same rows (q/k/v reading one value; convs also need one geometry)."""
    if isinstance(lin, Conv):
        return (lin.inputs[0], lin.kernel_shape, lin.strides, lin.pads, lin.dilations)
    return (lin.inputs[0],)


def pad_spatial(x: torch.Tensor, pads) -> torch.Tensor:
    """Zero-pad the spatial dims of ``[N, C, *spatial]`` by ONNX ``[begin..., end...]`` pads."""
    nd = len(pads) // 2
    if not any(pads):
        return x
    spec: list[int] = []
    for i in reversed(range(nd)):  # F.pad takes the last dim first
        spec += [int(pads[i]), int(pads[i + nd])]
    return F.pad(x, spec)


def conv_patches(xp: torch.Tensor, kernel, strides, dilations) -> torch.Tensor:
    """im2col of a padded ``[N, C, *spatial]`` input: ``[N * prod(out), prod(kernel) * C]``, each row one output
    position's inputs ordered (kernel positions row-major, then channel): the input axis of :class:`Conv` weights."""
    nd = len(kernel)
    n, c = xp.shape[:2]
    outs = [conv_out_size(xp.shape[2 + i], kernel[i], strides[i], dilations[i]) for i in range(nd)]
    cols = []
    for off in itertools.product(*[range(k) for k in kernel]):
        idx = tuple(slice(off[i] * dilations[i], off[i] * dilations[i] + strides[i] * (outs[i] - 1) + 1, strides[i]) for i in range(nd))
        cols.append(xp[(slice(None), slice(None)) + idx])
    p = torch.stack(cols, dim=2)  # [N, C, K, *out]
    p = p.permute(0, *range(3, 3 + nd), 2, 1)  # [N, *out, K, C]
    return p.reshape(-1, len(cols) * c)


def _to_numpy(t: torch.Tensor) -> np.ndarray:
    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:
        t = t.float()
    return t.numpy()


def run_graph(graph: Graph, feeds: Mapping[str, Any], device=None) -> dict[str, np.ndarray]:
    return Executor(graph, device).run(feeds)
