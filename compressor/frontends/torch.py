"""PyTorch -> sparsec IR.

``load_torch(module, example_inputs)`` exports the module with ``torch.export`` (through torch.onnx's dynamo
exporter, which keeps every op's module path) and imports the result with the ONNX frontend, so layer names are the
module paths users know (``encoder.layer.0.attention.self.query``). ``load_pt2(path)`` does the same for a
``torch.export.save`` archive, refusing archives that would need unpickling.

Mixture-of-experts blocks are recognized by structure, then verified by numbers:

- structure: a module with a router (a Linear-like child mapping the hidden size D to E outputs) and E experts,
  either an ``nn.ModuleList`` of MLPs with 2 or 3 Linear-like layers (Mixtral ``w1/w3/w2``, Switch ``wi/wo``,
  Qwen ``gate_proj/up_proj/down_proj``) or fused 3-D expert tensors (``gate_up_proj [E, 2H, D]`` /
  ``down_proj [E, D, H]`` and their transposes, as in recent transformers releases);
- semantics: the block's own output on the example inputs is compared with sparsec's MoE semantics over the
  candidate routings (softmax/sigmoid scores, top-k 1..8, renormalized or not, activation, gate/up order);
  the first candidate that reproduces it within 1e-4 is taken. A block matching none is left to the exporter
  (with a warning), its Linear layers imported individually.

During export each recognized block is replaced by a placeholder custom op (``sparsec::moe_placeholder``) that the
exporter writes as a ``sparsec.MoEPlaceholder`` node; the importer then puts the MoE node, built from the block's
weights, in its place.
"""
from __future__ import annotations

import contextlib
import inspect
import io
import itertools
import json
import logging
import os
import warnings
import zipfile
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import ModelLoadError, UnsupportedOpError
from ..ir import Expert, Generic, Graph, Linear, MoE

log = logging.getLogger("sparsec")

# ----------------------------------------------------------------------------------------------------------------
# the placeholder op
_PLACEHOLDER_READY = False


def _ensure_placeholder() -> None:
    global _PLACEHOLDER_READY
    if _PLACEHOLDER_READY:
        return
    import onnx
    import onnxscript
    from onnx.defs import OpSchema

    if not onnx.defs.has("MoEPlaceholder", "sparsec"):
        schema = OpSchema(
            "MoEPlaceholder",
            "sparsec",
            1,
            inputs=[OpSchema.FormalParameter("x", "T")],
            outputs=[OpSchema.FormalParameter("y", "T")],
            type_constraints=[("T", ["tensor(float)", "tensor(float16)", "tensor(bfloat16)", "tensor(double)"], "")],
            attributes=[OpSchema.Attribute("index", OpSchema.AttrType.INT, "which recognized MoE block")],
        )
        onnx.defs.register_schema(schema)

    if not hasattr(torch.ops.sparsec, "moe_placeholder"):

        @torch.library.custom_op("sparsec::moe_placeholder", mutates_args=())
        def moe_placeholder(x: torch.Tensor, index: int) -> torch.Tensor:
            return x.clone()

        @moe_placeholder.register_fake
        def _(x, index):
            return torch.empty_like(x)

    _PLACEHOLDER_READY = True


def _translation_table():
    import onnxscript

    domain = onnxscript.values.Opset("sparsec", 1)

    def moe(x, index: int):
        return domain.MoEPlaceholder(x, index=index)

    return {torch.ops.sparsec.moe_placeholder.default: moe}


class _Placeholder(nn.Module):
    def __init__(self, index: int, router_fn=None, returns_logits: bool = False, out_spec: list | None = None):
        super().__init__()
        self.index = index
        self.router_fn = router_fn
        self.returns_logits = returns_logits
        self.out_spec = out_spec

    def forward(self, *args, **kwargs):
        # the hidden states: the first float tensor (an unflattened dynamic program passes symbolic sizes first)
        x = _first_tensor(args, kwargs)
        y = torch.ops.sparsec.moe_placeholder(x, self.index)
        if self.out_spec is not None:
            outs = []
            for item in self.out_spec:
                if item == "y":
                    outs.append(y)
                elif item == "logits":
                    outs.append(self.router_fn(x.reshape(-1, x.shape[-1])))
                elif item == "tokens":
                    outs.append(x.numel() // x.shape[-1])
                else:
                    outs.append(x.shape[item[1]])
            return outs
        if self.returns_logits:
            return y, self.router_fn(x.reshape(-1, x.shape[-1]))
        return y


# ----------------------------------------------------------------------------------------------------------------
# MoE discovery
def _linear_like(m: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    if isinstance(m, nn.Linear):
        return m.weight, m.bias
    params = dict(m.named_parameters(recurse=False))
    if not params or set(params) - {"weight", "bias"}:
        return None
    if any(len(list(c.parameters())) for c in m.children()):
        return None
    w = params.get("weight")
    if w is None or w.ndim != 2:
        return None
    b = params.get("bias")
    if b is not None and b.shape != (w.shape[0],):
        return None
    return w, b


@dataclass
class _ExpertWeights:
    names: list[str]  # module paths of the layers (for naming)
    mats: list[tuple[np.ndarray, np.ndarray | None]]  # (weight [out, in], bias) per layer, in order of names


@dataclass
class _MoECandidate:
    path: str
    module: nn.Module
    router_name: str
    router: tuple[np.ndarray, np.ndarray | None]
    experts: list[dict[str, tuple[np.ndarray, np.ndarray | None]]]  # role -> (w, b); roles: gate?, up, down
    role_names: list[dict[str, str]]
    hint_k: int | None
    returns_logits: bool = False
    spec: dict[str, Any] | None = None
    # outputs of a block returning a list/tuple: "y" (hidden states), "logits", or "tokens"/("dim", i) for the
    # symbolic sizes an unflattened dynamic program passes on (e.g. [b*t, y]); None: y alone or (y, logits)
    out_spec: list | None = None


def _np(t: torch.Tensor | None) -> np.ndarray | None:
    return None if t is None else t.detach().float().cpu().numpy().copy()


def lins_shape_square(w) -> bool:
    return w.shape[0] == w.shape[1]


def _expert_layouts(mod: nn.Module, d: int, e: int) -> list[tuple[list[dict], list[dict[str, str]], str]]:
    """Candidate expert weight layouts inside ``mod``: (experts roles->(w,b), role names, label)."""
    out = []
    # ModuleList of expert MLPs
    for cname, child in mod.named_children():
        # an nn.ModuleList, or what torch.export.unflatten makes of one (children named 0..e-1)
        kids = dict(child.named_children())
        if sorted(kids) != sorted(str(i) for i in range(e)):
            continue
        members = [kids[str(i)] for i in range(e)]
        first = members[0]
        lins = [(n, _linear_like(m)) for n, m in first.named_children()]
        lins = [(n, wb) for n, wb in lins if wb is not None]
        if len(lins) not in (2, 3):
            continue
        # the down projection maps back to d; when the expert width equals d several layers qualify: try each
        # (numeric verification picks the right one), names that say "down" first
        hint = ("w2", "down", "wo", "fc2", "c_proj", "4h_to_h")
        downs = [n for n, (w, _) in lins if w.shape[0] == d]
        downs.sort(key=lambda n: (not any(h in n for h in hint), lins_shape_square(dict(lins)[n][0])))
        for down in downs:
            ins = [n for n, (w, _) in lins if n != down and w.shape[1] == d]
            if len(ins) != len(lins) - 1:
                continue
            experts_all = []
            names_all = []
            ok = True
            for i in range(e):
                sub = dict(members[i].named_children())
                roles = {}
                names = {}
                for n in [down] + ins:
                    wb = _linear_like(sub[n]) if n in sub else None
                    if wb is None:
                        ok = False
                        break
                    roles[n] = (_np(wb[0]), _np(wb[1]))
                    names[n] = f"{cname}.{i}.{n}"
                if not ok:
                    break
                experts_all.append(roles)
                names_all.append(names)
            if not ok:
                continue
            if len(ins) == 1:
                out.append(([{"up": r[ins[0]], "down": r[down]} for r in experts_all],
                            [{"up": nm[ins[0]], "down": nm[down]} for nm in names_all], "modulelist"))  # fmt: skip
            else:
                for g, u in ((ins[0], ins[1]), (ins[1], ins[0])):
                    out.append(([{"gate": r[g], "up": r[u], "down": r[down]} for r in experts_all],
                                [{"gate": nm[g], "up": nm[u], "down": nm[down]} for nm in names_all], "modulelist"))  # fmt: skip
    # fused 3-D expert tensors (possibly one level down, e.g. `experts`)
    holders = [("", mod)] + [(n + ".", c) for n, c in mod.named_children()]
    for prefix, holder in holders:
        params = {n: p for n, p in holder.named_parameters(recurse=False) if p.ndim == 3 and p.shape[0] == e}
        gu = next((n for n in params if "gate_up" in n or n in ("w13", "w1_w3")), None)
        dn = next((n for n in params if "down" in n or n in ("w2",)), None)
        if gu is None or dn is None:
            continue
        gup, dwp = _np(params[gu]), _np(params[dn])
        # normalize to [E, 2H, D] and [E, D, H]
        cands_gu = []
        if gup.shape[2] == d:
            cands_gu.append(gup)
        if gup.shape[1] == d:
            cands_gu.append(gup.transpose(0, 2, 1))
        cands_dn = []
        if dwp.shape[1] == d:
            cands_dn.append(dwp)
        if dwp.shape[2] == d:
            cands_dn.append(dwp.transpose(0, 2, 1))
        for a, b in itertools.product(cands_gu, cands_dn):
            two_h = a.shape[1]
            if two_h % 2 or b.shape[2] != two_h // 2:
                continue
            h = two_h // 2
            for order in ("gate_first", "up_first", "interleaved"):
                if order == "interleaved":
                    gates, ups = a[:, 0::2], a[:, 1::2]
                elif order == "gate_first":
                    gates, ups = a[:, :h], a[:, h:]
                else:
                    ups, gates = a[:, :h], a[:, h:]
                experts = [{"gate": (np.asarray(gates[i], order="C"), None), "up": (np.asarray(ups[i], order="C"), None),
                            "down": (np.asarray(b[i], order="C"), None)} for i in range(e)]  # fmt: skip
                names = [{"gate": f"{prefix}experts.{i}.gate_proj", "up": f"{prefix}experts.{i}.up_proj",
                          "down": f"{prefix}experts.{i}.down_proj"} for i in range(e)]  # fmt: skip
                out.append((experts, names, f"fused:{order}"))
    return out


def find_moe_blocks(model: nn.Module) -> list[tuple[str, nn.Module, list]]:
    """Modules that look like MoE blocks: (path, module, [(router_name, router, layouts)])."""
    found = []
    for path, mod in model.named_modules():
        if path == "":
            continue
        routers = []
        for cname, child in mod.named_children():
            wb = _linear_like(child)
            if wb is not None:
                routers.append((cname, wb))
            elif not list(child.children()):
                # a gate module holding a bare [E, D] weight (DeepSeek-style MoEGate) is also a router
                ps = dict(child.named_parameters(recurse=False))
                if "weight" in ps and ps["weight"].ndim == 2:
                    routers.append((cname, (ps["weight"], ps.get("bias"))))
        for rname, (w, b) in routers:
            e, d = w.shape
            if e < 2:
                continue
            layouts = _expert_layouts(mod, d, e)
            if layouts:
                found.append((path, mod, [(rname, (_np(w), _np(b)), layouts)]))
                break
    # keep outermost only (an expert's MLP inside a block is not a block)
    outer = []
    for path, mod, info in found:
        if not any(path.startswith(p + ".") for p, _, _ in outer):
            outer.append((path, mod, info))
    return outer


_ACTS_T = {
    "silu": F.silu,
    "gelu": lambda x: F.gelu(x),
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
}


def _moe_forward(x2: torch.Tensor, router, experts, k, score, renorm, act) -> torch.Tensor:
    w, b = router
    logits = F.linear(x2, torch.from_numpy(w), None if b is None else torch.from_numpy(b))
    lf = logits.float()
    probs = torch.softmax(lf, -1) if score == "softmax" else torch.sigmoid(lf)
    topv, topi = torch.topk(probs, k, dim=-1)
    if renorm:
        topv = topv / topv.sum(-1, keepdim=True)
    out = torch.zeros_like(x2)
    f = _ACTS_T[act]
    for i, ex in enumerate(experts):
        sel = (topi == i)
        tok = sel.any(-1).nonzero().flatten()
        if tok.numel() == 0:
            continue
        wt = (topv * sel).sum(-1)[tok]
        xe = x2[tok]

        def lin(role, inp):
            ww, bb = ex[role]
            return F.linear(inp, torch.from_numpy(ww), None if bb is None else torch.from_numpy(bb))

        h = f(lin("gate", xe)) * lin("up", xe) if "gate" in ex else f(lin("up", xe))
        out.index_add_(0, tok, lin("down", h) * wt[:, None].to(x2.dtype))
    return out


def _identify(mod: nn.Module, path: str, info, x: torch.Tensor, y: torch.Tensor, returns_logits: bool) -> _MoECandidate | None:
    rname, router, layouts = info[0]
    e = router[0].shape[0]
    d = x.shape[-1]
    x2 = x.detach().float().reshape(-1, d)
    y2 = y.detach().float().reshape(-1, d)
    if x2.shape[0] > 256:
        idx = torch.linspace(0, x2.shape[0] - 1, 256).long()
    else:
        idx = None
    hint = None
    for attr in ("top_k", "num_experts_per_tok", "topk", "k", "num_selected", "n_activated_experts"):
        v = getattr(mod, attr, None)
        if v is None:
            v = getattr(getattr(mod, rname, None), attr, None)
        if isinstance(v, int) and 1 <= v <= e:
            hint = v
            break
    ks = ([hint] if hint else []) + [k for k in (2, 1, 4, 8, 3, 6) if k <= e and k != hint] + [k for k in range(1, min(e, 8) + 1) if k not in (1, 2, 3, 4, 6, 8)]
    norm = float(y2.norm()) or 1.0
    for layout, names, label in layouts:
        gated = "gate" in layout[0]
        acts = ("silu", "gelu", "gelu_tanh", "relu") if gated else ("relu", "gelu", "gelu_tanh", "silu")
        for k in ks:
            for score, renorm in (("softmax", True), ("softmax", False), ("sigmoid", True), ("sigmoid", False)):
                for act in acts:
                    with torch.no_grad():
                        pred = _moe_forward(x2, router, layout, k, score, renorm, act)
                    err = float((pred - y2).norm()) / norm
                    if err <= 1e-4:
                        return _MoECandidate(
                            path, mod, rname, router, layout, names, hint, returns_logits,
                            {"top_k": k, "score": score, "renormalize": renorm, "act": act, "layout": label, "verify_error": err},
                        )  # fmt: skip
    return None


def _first_tensor(args, kwargs) -> torch.Tensor | None:
    for a in list(args) + list(kwargs.values()):
        if isinstance(a, torch.Tensor) and a.is_floating_point():
            return a
    return None


def _out_spec(out, x: torch.Tensor) -> list | None:
    """What each output of a block returning several values is: the hidden states (same shape as ``x``), router
    logits ([tokens, experts]), or a size of ``x`` (an unflattened dynamic program returns the symbolic sizes that
    later modules use, e.g. ``[b*t, y]``). None when an output is none of these."""
    spec, tokens = [], x.numel() // x.shape[-1]
    for o in out:
        if isinstance(o, torch.Tensor) and o.shape == x.shape and "y" not in spec:
            spec.append("y")
        elif isinstance(o, torch.Tensor) and o.ndim == 2 and o.shape[0] == tokens and "logits" not in spec:
            spec.append("logits")
        elif isinstance(o, int) and not isinstance(o, bool) and o == tokens:
            spec.append("tokens")
        elif isinstance(o, int) and not isinstance(o, bool) and o in tuple(x.shape):
            spec.append(("dim", tuple(x.shape).index(o)))
        else:
            return None
    return spec if "y" in spec else None


def discover_moe(model: nn.Module, example_inputs: tuple, example_kwargs: dict | None = None) -> tuple[list[_MoECandidate], list[str]]:
    blocks = find_moe_blocks(model)
    if not blocks:
        return [], []
    captured: dict[str, tuple[torch.Tensor, Any]] = {}
    hooks = []
    for path, mod, _ in blocks:
        def hook(m, args, kwargs, out, path=path):
            if path not in captured:
                captured[path] = (_first_tensor(args, kwargs), out)

        hooks.append(mod.register_forward_hook(hook, with_kwargs=True))
    try:
        with torch.no_grad():
            model(*example_inputs, **(example_kwargs or {}))
    finally:
        for h in hooks:
            h.remove()
    found, warns = [], []
    for path, mod, info in blocks:
        if path not in captured or captured[path][0] is None:
            warns.append(f"MoE-like block '{path}' was not called on the example inputs; its layers are imported individually")
            continue
        x, out = captured[path]
        returns_logits = isinstance(out, tuple)
        y = out[0] if isinstance(out, tuple) else out
        out_spec = _out_spec(out, x) if isinstance(out, (tuple, list)) else None
        if out_spec is not None and isinstance(out, tuple) and out_spec == ["y", "logits"]:
            out_spec = None  # the usual (y, router_logits)
        if out_spec is not None:
            y, returns_logits = out[out_spec.index("y")], False
        if not isinstance(y, torch.Tensor) or y.shape != x.shape:
            warns.append(f"MoE-like block '{path}' returns {type(out).__name__} of another shape; its layers are imported individually")
            continue
        if isinstance(out, tuple) and len(out) > 2 and out_spec is None:
            warns.append(f"MoE-like block '{path}' returns {len(out)} values; its layers are imported individually")
            continue
        cand = _identify(mod, path, info, x, y, returns_logits)
        if cand is not None and out_spec is not None:
            cand.out_spec = out_spec
        if cand is None:
            warns.append(
                f"MoE-like block '{path}' (router '{info[0][0]}', {info[0][1][0].shape[0]} experts) matched no known routing "
                "(softmax/sigmoid, top-k, renormalization); its layers are imported individually"
            )
            continue
        found.append(cand)
    return found, warns


def _make_moe(c: _MoECandidate, node: Generic) -> MoE:
    def lin(name, wb):
        w, b = wb
        full = f"{c.path}.{name}"
        return Linear(full, [f"{full}:in"], [f"{full}:out"], {"module": full}, weight=w.astype(np.float32), bias=None if b is None else b.astype(np.float32))

    experts = []
    for roles, names in zip(c.experts, c.role_names):
        experts.append(Expert(up=lin(names["up"], roles["up"]), down=lin(names["down"], roles["down"]),
                              gate=lin(names["gate"], roles["gate"]) if "gate" in roles else None, act=c.spec["act"]))  # fmt: skip
    meta = {"module": c.path, "moe_layout": c.spec["layout"], "moe_verify_error": c.spec["verify_error"]}
    return MoE(c.path, [node.inputs[0]], [node.outputs[0]], meta, router=lin(c.router_name, c.router), experts=experts,
               top_k=c.spec["top_k"], renormalize=c.spec["renormalize"], score=c.spec["score"])  # fmt: skip


# ----------------------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _quiet():
    """torch.onnx prints progress and warnings; keep the user's terminal clean."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "torch._export", "torch.fx", "onnxscript", "torch._dynamo")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    buf_out, buf_err = io.StringIO(), io.StringIO()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with contextlib.redirect_stdout(buf_out), contextlib.redirect_stderr(buf_err):
                yield
    finally:
        for lg, lv in zip(loggers, levels):
            lg.setLevel(lv)


@contextlib.contextmanager
def _swapped(model: nn.Module, cands: list[_MoECandidate]):
    """Temporarily replace recognized MoE blocks by placeholders."""
    saved = []
    for i, c in enumerate(cands):
        parent_path, _, attr = c.path.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        w, b = c.router
        wt = torch.from_numpy(w)
        bt = None if b is None else torch.from_numpy(b)
        ph = _Placeholder(i, (lambda x, wt=wt, bt=bt: F.linear(x, wt.to(x.dtype), None if bt is None else bt.to(x.dtype))), c.returns_logits,
                          c.out_spec)  # fmt: skip
        saved.append((parent, attr, getattr(parent, attr)))
        setattr(parent, attr, ph)
    try:
        yield
    finally:
        for parent, attr, orig in reversed(saved):
            setattr(parent, attr, orig)


def _input_names(model: nn.Module, n: int) -> list[str]:
    try:
        sig = inspect.signature(model.forward)
        names = [p.name for p in sig.parameters.values() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    except (TypeError, ValueError):
        names = []
    names = names[:n]
    while len(names) < n:
        names.append(f"input_{len(names)}")
    return names


def _dynamic_shapes(example_inputs: tuple, dynamic: bool):
    if not dynamic:
        return None
    out = []
    for a in example_inputs:
        if isinstance(a, torch.Tensor):
            out.append({i: torch.export.Dim.AUTO for i in range(a.ndim)})
        else:
            out.append(None)
    return tuple(out)


def _dynamic_shapes_for(model: nn.Module, example_inputs: tuple, dynamic):
    """Dynamic shapes matching ``forward``'s signature (``forward(*args)``, as torch.export.unflatten makes it,
    takes one tuple for all positional inputs). ``dynamic``: bool, or a tuple of per-input dim specs."""
    import inspect

    dyn = dynamic if isinstance(dynamic, tuple) else _dynamic_shapes(example_inputs, dynamic)
    if dyn is None:
        return None
    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        return dyn
    if params and params[0].kind == inspect.Parameter.VAR_POSITIONAL:
        return (dyn,)
    return dyn


def export_onnx_proto(model: nn.Module, example_inputs: tuple, *, input_names=None, output_names=None, dynamic=True,
                      opset: int = 18, moe: list[_MoECandidate] | None = None):  # fmt: skip
    """torch.export + the dynamo ONNX exporter, in memory. MoE blocks in ``moe`` become placeholders."""
    _ensure_placeholder()
    names = input_names or _input_names(model, len(example_inputs))
    try:
        with _quiet(), _swapped(model, moe or []):
            prog = torch.onnx.export(
                model,
                tuple(example_inputs),
                dynamo=True,
                opset_version=opset,
                input_names=names,
                output_names=output_names,
                dynamic_shapes=_dynamic_shapes_for(model, tuple(example_inputs), dynamic),
                custom_translation_table=_translation_table() if moe else None,
                optimize=True,
                verify=False,
                report=False,
            )
    except Exception as e:  # noqa: BLE001 - exporter failures are many kinds; one line for the user
        msg = str(e).strip().splitlines()
        summary = next((line for line in msg if "Error" in line or "error" in line), msg[0] if msg else type(e).__name__)
        raise UnsupportedOpError(f"torch.export could not export the model: {summary[:300]}")
    return prog.model_proto


def load_torch(model: nn.Module, example_inputs: Sequence[Any], *, input_names: list[str] | None = None,
               dynamic: bool = True, name: str | None = None, check: bool = True) -> Graph:  # fmt: skip
    """Import an ``nn.Module`` (called with ``example_inputs``) into sparsec's IR."""
    from .onnx import load_onnx

    if not isinstance(model, nn.Module):
        raise ModelLoadError(f"expected a torch.nn.Module, got {type(model).__name__}")
    model = model.eval()
    example_inputs = tuple(example_inputs)
    moe, warns = discover_moe(model, example_inputs)
    proto = export_onnx_proto(model, example_inputs, input_names=input_names, dynamic=dynamic, moe=moe)
    g = load_onnx(proto, name=name or type(model).__name__, raise_ops=True, validate=False)
    _place_moe(g, moe)
    g.meta["frontend"] = "torch"
    if warns:
        g.meta["import_warnings"] = _merge_warnings(g, warns)
    g.validate()
    if check:
        _check_against_module(g, model, example_inputs)
    return g


def _merge_warnings(g: Graph, warns: list[str]) -> list[str]:
    """The frontend's warnings next to the ONNX importer's; a block the frontend could not identify but the ONNX
    MoE raiser did (moe_onnx.py: by dataflow and numbers) is no longer warned about."""
    raised = {n.name for n in g.nodes if isinstance(n, MoE)} | {n.module for n in g.nodes if isinstance(n, MoE) and n.module}
    onnx_side = list(g.meta.get("import_warnings", []))
    # a block the ONNX raiser also tried is warned about once, with its (more specific) reason
    keep = [w for w in warns if not any(f"block '{r}'" in w for r in raised)
            and not any(f"block '{b}'" in o for o in onnx_side for b in _blocks_named(w))]  # fmt: skip
    return onnx_side + keep


def _blocks_named(warning: str) -> list[str]:
    import re

    return re.findall(r"block '([^']+)'", warning)


def _place_moe(g: Graph, moe: list[_MoECandidate]) -> None:
    for i, n in enumerate(list(g.nodes)):
        if isinstance(n, Generic) and n.domain == "sparsec" and n.op_type == "MoEPlaceholder":
            idx = int(n.attributes["index"])
            g.nodes[i] = _make_moe(moe[idx], n)
    left = [n.name for n in g.nodes if isinstance(n, Generic) and n.domain == "sparsec"]
    if left:
        raise UnsupportedOpError(f"internal placeholder nodes left after import: {left}")


def _check_against_module(g: Graph, model: nn.Module, example_inputs: tuple) -> None:
    """Run the imported graph and the module on the example inputs; record the relative error."""
    from ..executor import Executor

    with torch.no_grad():
        ref = model(*example_inputs)
    refs = _flatten_outputs(ref)
    # bfloat16 inputs (numpy has no bfloat16; the graph computes such models in float32, see onnx.bfloat16_as_float32)
    feeds = {name: (a.float() if a.dtype == torch.bfloat16 else a).detach().cpu().numpy()
             for name, a in zip(g.inputs, [a for a in example_inputs if isinstance(a, torch.Tensor)])}  # fmt: skip
    got = Executor(g).run(feeds)
    errs = []
    for o, r in zip(g.outputs, refs):
        r = r.detach().float().cpu().numpy()
        v = got[o].astype(np.float32)
        if v.shape != r.shape:
            errs.append(float("inf"))
            continue
        errs.append(float(np.linalg.norm(v - r) / max(np.linalg.norm(r), 1e-30)))
    g.meta["import_check_rel_error"] = max(errs) if errs else 0.0


def _flatten_outputs(out) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (list, tuple)):
        res = []
        for o in out:
            res.extend(_flatten_outputs(o))
        return res
    if isinstance(out, dict):
        res = []
        for k in out:
            res.extend(_flatten_outputs(out[k]))
        return res
    if hasattr(out, "to_tuple"):
        return _flatten_outputs(out.to_tuple())
    return []


# ----------------------------------------------------------------------------------------------------------------
# .pt2 archives
def _check_pt2_archive(path: str) -> None:
    """Refuse archives whose loading would unpickle: pickled weights/constants, custom or opaque objects, legacy files."""
    try:
        zf = zipfile.ZipFile(path)
    except zipfile.BadZipFile:
        raise ModelLoadError(f"{path}: not a .pt2 archive (not a zip file)")
    with zf:
        names = zf.namelist()
        if not any(n.endswith(".json") and "models/" in n for n in names):
            from .onnx import TORCH_CHECKPOINT, torch_checkpoint_names

            if torch_checkpoint_names(names):
                raise ModelLoadError(f"{path}: {TORCH_CHECKPOINT}")
            raise ModelLoadError(f"{path}: not a torch.export archive (no serialized program)")
        for n in names:
            base = n.rsplit("/", 1)[-1]
            if "/data/weights/" in n and base.endswith(".pt") and "weights_config" not in base:
                raise ModelLoadError(f"{path}: uses the legacy pickled weight format; refusing to unpickle (re-save with torch.export.save)")
            if "/data/constants/" in n and (base.startswith("custom_obj") or base.startswith("opaque")):
                raise ModelLoadError(f"{path}: contains pickled custom objects; refusing to unpickle")
        for n in names:
            if n.endswith("_config.json") and ("weights" in n or "constants" in n):
                try:
                    cfg = json.loads(zf.read(n))
                except (json.JSONDecodeError, UnicodeDecodeError):
                    raise ModelLoadError(f"{path}: corrupt archive ({n} is not JSON)")
                entries = cfg.get("config", {})
                for fqn, meta in entries.items():
                    if isinstance(meta, dict) and meta.get("use_pickle"):
                        raise ModelLoadError(f"{path}: tensor '{fqn}' is stored pickled; refusing to unpickle")


@contextlib.contextmanager
def _no_unpickling():
    """While torch.export.load runs, every torch.load is weights_only and plain pickle is refused."""
    import pickle

    real_load = torch.load
    real_loads = pickle.loads

    def safe_load(*args, **kwargs):
        kwargs["weights_only"] = True
        return real_load(*args, **kwargs)

    def refuse(*args, **kwargs):
        raise ModelLoadError("the archive needs unpickling; refused")

    torch.load = safe_load
    pickle.loads = refuse
    try:
        yield
    finally:
        torch.load = real_load
        pickle.loads = real_loads


def _torch_error_line(e: BaseException) -> str:
    """One line for a torch failure: the first sentence of its message without terminal colour codes, and its root
    cause (torch's ONNX exporter wraps the real error in a multi-line ConversionError)."""
    import re

    def clean(x: BaseException) -> str:
        text = re.sub(r"\x1b\[[0-9;]*m|\[[0-9;]*m", "", str(x)).strip()
        first = text.splitlines()[0] if text else ""
        return first.split(". ")[0].rstrip(".") if first else type(x).__name__

    root = e
    while root.__cause__ is not None:
        root = root.__cause__
    line = f"{type(e).__name__}: {clean(e)}"
    if root is not e:
        line += f"; caused by {type(root).__name__}: {clean(root)}"
    return line[:300]


def load_exported_program(path: str):
    if not os.path.exists(path):
        raise ModelLoadError(f"{path}: no such file")
    _check_pt2_archive(path)
    try:
        with _quiet(), _no_unpickling():
            ep = torch.export.load(path)
    except ModelLoadError:
        raise
    except Exception as e:  # noqa: BLE001
        import pickle

        if isinstance(e, pickle.UnpicklingError) or "weights only load failed" in str(e).lower():
            # (torch's own text goes on to suggest weights_only=False, i.e. running the archive's code)
            raise ModelLoadError(f"{path}: an entry of the archive (e.g. pickled example inputs) needs unpickling; "
                                 "refusing to unpickle (re-save the program with tensor inputs only)")  # fmt: skip
        why = _torch_error_line(e)
        if "deserializ" in why:  # torch's text points at warnings it printed (hidden here): say what it usually is
            why += " (an entry of the archive is missing or damaged, e.g. a weight file)"
        raise ModelLoadError(f"{path}: cannot load the exported program ({why})")
    return ep


def _example_inputs_of(ep) -> tuple[tuple, dict]:
    """The program's example ``(args, kwargs)`` (HF-style models are often exported with keyword inputs only)."""
    ex = getattr(ep, "example_inputs", None)
    if ex:
        args, kwargs = ex if isinstance(ex, tuple) and len(ex) == 2 and isinstance(ex[1], dict) else (ex, {})
        if args or kwargs:
            return tuple(args), dict(kwargs)
    raise ModelLoadError("the .pt2 archive holds no example inputs (save it with torch.export.save from a program exported with example inputs)")


def _positional_view(module: nn.Module, spec) -> nn.Module:
    """``module`` (same submodules, so the exported layer names are its module paths) whose forward takes the
    flattened user inputs positionally (the order of the graph's inputs) and calls the module's own forward with the
    ``(args, kwargs)`` they were exported as: the MoE path re-exports the unflattened program, the import check runs
    the program, and both accept only that structure."""
    import copy
    import torch.utils._pytree as pytree

    view = copy.copy(module)  # shallow: shares _modules / _parameters with ``module``
    inner = module.forward

    def forward(*flat):
        args, kwargs = pytree.tree_unflatten(list(flat), spec)
        return inner(*args, **kwargs)

    view.forward = forward
    return view


def _output_names(ep) -> list[str] | None:
    """Output names from the program's output tree: dict / ModelOutput keys (``logits``, ``past_key_values.0.1``),
    ``output`` for a lone tensor, ``output_<i>`` for a tuple. ``None`` when the tree cannot be read. (Without this
    the outputs carry FX node names such as ``linear_14``.)"""
    try:
        import torch.utils._pytree as pytree

        spec = ep.call_spec.out_spec
        tree = pytree.tree_unflatten(list(range(spec.num_leaves)), spec)
        paths = [p for p, _ in pytree.tree_flatten_with_path(tree)[0]]
    except Exception:  # noqa: BLE001
        return None

    def part(k, top):
        if hasattr(k, "key"):
            return str(k.key)
        if hasattr(k, "name"):
            return str(k.name)
        if hasattr(k, "idx"):
            return f"output_{k.idx}" if top else str(k.idx)
        return None

    names = []
    for p in paths:
        parts = [part(k, i == 0) for i, k in enumerate(p)]
        if any(x is None for x in parts):
            return None
        names.append(".".join(parts) if parts else "output")
    user_outputs = [s for s in ep.graph_signature.output_specs if s.kind.name == "USER_OUTPUT"]
    if len(names) != len(user_outputs) or len(set(names)) != len(names):
        return None
    return names


def _input_dim_limits(ep) -> dict[str, dict[str, int]]:
    """Upper bounds the program's range constraints put on its inputs' dynamic dims (``Dim("seq", max=64)``):
    input name -> {axis: max}. Generated calibration data stays within them (a model with 64 learned positions)."""
    vals = {nd.name: nd.meta.get("val") for nd in ep.graph.nodes if nd.op == "placeholder"}
    out: dict[str, dict[str, int]] = {}
    for spec in ep.graph_signature.input_specs:
        if spec.kind.name != "USER_INPUT":
            continue
        for i, d in enumerate(getattr(vals.get(spec.arg.name), "shape", None) or ()):
            if isinstance(d, int):
                continue
            try:
                upper = ep.range_constraints[d.node.expr].upper
                if upper.is_finite and int(upper) > 0:
                    out.setdefault(spec.arg.name, {})[str(i)] = int(upper)
            except (AttributeError, KeyError, TypeError, ValueError):
                continue
    return out


def load_pt2(path: str, *, name: str | None = None, check: bool = True) -> Graph:
    """Import a ``torch.export.save`` archive. MoE blocks are recognized on the unflattened module tree."""
    import torch.utils._pytree as pytree

    from .onnx import load_onnx

    ep = load_exported_program(path)
    args, kwargs = _example_inputs_of(ep)
    flat, tree_spec = pytree.tree_flatten((args, kwargs))
    example_inputs = tuple(flat)  # the graph's user inputs, in order
    try:
        with _quiet():
            module = torch.export.unflatten(ep)
    except Exception:  # noqa: BLE001 - fall back to the flat program
        module = None
    moe, warns = ([], [])
    if module is not None:
        try:
            moe, warns = discover_moe(module, args, kwargs)
        except Exception as e:  # noqa: BLE001
            warns = [f"MoE discovery failed on the unflattened program ({type(e).__name__}); layers imported individually"]
            moe = []
    names = [s.arg.name for s in ep.graph_signature.input_specs if s.kind.name == "USER_INPUT"]
    out_names = _output_names(ep)
    if moe and module is not None:
        # keep the program's own dynamism: dims it specialized stay static
        user = [s.arg.name for s in ep.graph_signature.input_specs if s.kind.name == "USER_INPUT"]
        vals = {nd.name: nd.meta.get("val") for nd in ep.graph.nodes if nd.op == "placeholder"}
        spec = []
        for nm in user:
            v = vals.get(nm)
            shape = getattr(v, "shape", None)
            spec.append(None if shape is None else {i: torch.export.Dim.AUTO for i, d in enumerate(shape) if not isinstance(d, int)} or None)
        proto = export_onnx_proto(module if not kwargs else _positional_view(module, tree_spec), example_inputs, input_names=names,
                                  output_names=out_names, moe=moe, dynamic=tuple(spec))  # fmt: skip
    else:
        try:
            with _quiet():
                prog = torch.onnx.export(ep, example_inputs, dynamo=True, opset_version=18, input_names=names, output_names=out_names, optimize=True, verify=False)
            proto = prog.model_proto
        except Exception as e:  # noqa: BLE001
            raise ModelLoadError(f"{path}: torch could not convert the exported program to ONNX ({_torch_error_line(e)}); "
                                 "exporting the model to ONNX with torch.onnx.export may work")  # fmt: skip
    base = os.path.splitext(os.path.basename(path))[0]
    g = load_onnx(proto, name=name or base, raise_ops=True, validate=False)
    _place_moe(g, moe)
    g.meta["frontend"] = "pt2"
    limits = _input_dim_limits(ep)
    if limits:
        g.meta["input_dim_max"] = limits
    from .onnx import file_sha256

    g.meta["source_sha256"] = file_sha256(path)
    if warns:
        g.meta["import_warnings"] = _merge_warnings(g, warns)
    g.validate()
    if check:
        _check_against_module(g, _positional_view(ep.module(), tree_spec), example_inputs)
    return g
