"""MoE blocks written the ways model code writes them, for the ONNX MoE raiser tests (tests/test_moe_onnx.py).

Each block takes ``[b, t, d]`` hidden states and returns ``(y, router_logits)`` like HF's, so it can stand in for
``MixtralSparseMoeBlock`` inside :func:`tests.models.MixtralStyle` (:func:`build_variant`).

- ``mixtral``: the test Mixtral itself (softmax, top-2, renormalized, loop with where/index_add_);
- ``qwen``: Qwen2-MoE style, top-2 of 6 *without* renormalization, plus a shared expert (different width) with a
  sigmoid gate, added next to the routed experts (it stays outside the MoE as plain layers);
- ``switch``: Switch-Transformer style, top-1 by argmax, non-gated ReLU experts (``wi``/``wo``) applied with a boolean
  token mask (``next_states[mask] = expert(h[mask])``), output scaled by the max router probability;
- ``dense_sigmoid``: every expert on every token, weighted by a routing mask built with ``scatter``: sigmoid scores,
  top-2, renormalized (DeepSeek-V3-like scoring without the bias), GELU experts;
- ``topk_softmax``: top-k of the *logits*, softmax over the selected ones (= softmax, top-k, renormalized),
  experts stacked and weighted by ``gather``;
- ``squared`` (not an MoE sparsec can express): routing weights squared -> must stay plain layers, with a warning.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import models as tm


class GatedMLP(nn.Module):
    def __init__(self, d, f, act=F.silu):
        super().__init__()
        self.gate_proj = nn.Linear(d, f, bias=False)
        self.up_proj = nn.Linear(d, f, bias=False)
        self.down_proj = nn.Linear(f, d, bias=False)
        self.act = act

    def forward(self, x):
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class SwitchDense(nn.Module):
    def __init__(self, d, f):
        super().__init__()
        self.wi = nn.Linear(d, f, bias=True)
        self.wo = nn.Linear(f, d, bias=True)

    def forward(self, x):
        return self.wo(F.relu(self.wi(x)))


class QwenStyleMoe(nn.Module):
    def __init__(self, d, f, num_experts=6, top_k=2, shared=True):
        super().__init__()
        self.num_experts, self.top_k = num_experts, top_k
        self.gate = nn.Linear(d, num_experts, bias=False)
        self.experts = nn.ModuleList([GatedMLP(d, f) for _ in range(num_experts)])
        self.shared = shared
        if shared:
            self.shared_expert = GatedMLP(d, 2 * f)
            self.shared_expert_gate = nn.Linear(d, 1, bias=False)

    def forward(self, hidden_states):
        b, t, d = hidden_states.shape
        x = hidden_states.view(-1, d)
        router_logits = self.gate(x)
        w = F.softmax(router_logits, dim=1, dtype=torch.float)
        w, sel = torch.topk(w, self.top_k, dim=-1)  # norm_topk_prob = False
        final = torch.zeros((b * t, d), dtype=x.dtype)
        mask = F.one_hot(sel, num_classes=self.num_experts).permute(2, 1, 0)
        for e in range(self.num_experts):
            idx, top_x = torch.where(mask[e])
            cur = self.experts[e](x[None, top_x].reshape(-1, d)) * w[top_x, idx, None]
            final.index_add_(0, top_x, cur.to(x.dtype))
        if self.shared:
            final = final + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return final.reshape(b, t, d), router_logits


class SwitchStyleMoe(nn.Module):
    def __init__(self, d, f, num_experts=4, top_k=1):
        super().__init__()
        self.num_experts = num_experts
        self.router = nn.Linear(d, num_experts, bias=False)
        self.experts = nn.ModuleList([SwitchDense(d, f) for _ in range(num_experts)])

    def forward(self, h):
        logits = self.router(h)
        probs = torch.softmax(logits, dim=-1)
        index = torch.argmax(probs, dim=-1)
        mask = F.one_hot(index, num_classes=self.num_experts)
        pmax = torch.max(probs, dim=-1).values.unsqueeze(-1)
        nxt = h.clone()
        for i, e in enumerate(self.experts):
            tok = mask[:, :, i].bool()
            nxt[tok] = e(h[tok]).to(nxt.dtype)
        return pmax * nxt, logits


class SortedSwitchMoe(nn.Module):
    """Switch-style top-1 with the tokens sorted by expert (``argsort``), every expert run on the sorted tokens and
    selected with ``where``, and the results scattered back with ``index_add_`` (TorchScript: a TopK with a run-time k
    and a ScatterElements into a zero buffer, 18 nodes after the last expert)."""

    def __init__(self, d, f, num_experts=4):
        super().__init__()
        self.num_experts = num_experts
        self.router = nn.Linear(d, num_experts, bias=False)
        self.experts = nn.ModuleList([SwitchDense(d, f) for _ in range(num_experts)])

    def forward(self, x):
        b, t, d = x.shape
        h = x.reshape(-1, d)
        logits = self.router(h)
        p, idx = F.softmax(logits, dim=-1).max(dim=-1)
        order = torch.argsort(idx)
        hs, es, ps = h[order], idx[order], p[order]
        ys = torch.zeros_like(hs)
        for e in range(self.num_experts):
            ys = torch.where((es == e).unsqueeze(-1), self.experts[e](hs), ys)
        return torch.zeros_like(h).index_add_(0, order, ys * ps.unsqueeze(-1)).view(b, t, d), logits


class DenseSigmoidMoe(nn.Module):
    def __init__(self, d, f, num_experts=4, top_k=2):
        super().__init__()
        self.top_k = top_k
        self.gate = nn.Linear(d, num_experts, bias=False)
        self.experts = nn.ModuleList([GatedMLP(d, f, act=F.gelu) for _ in range(num_experts)])

    def forward(self, h):
        b, t, d = h.shape
        x = h.reshape(-1, d)
        logits = self.gate(x)
        scores = torch.sigmoid(logits)
        topv, topi = torch.topk(scores, self.top_k, dim=-1)
        topv = topv / topv.sum(-1, keepdim=True)
        weights = torch.zeros_like(scores).scatter(1, topi, topv)
        y = torch.zeros_like(x)
        for j, e in enumerate(self.experts):
            y = y + weights[:, j : j + 1] * e(x)
        return y.reshape(b, t, d), logits


class TopkSoftmaxMoe(nn.Module):
    def __init__(self, d, f, num_experts=4, top_k=2, square=False):
        super().__init__()
        self.top_k, self.square = top_k, square
        self.gate = nn.Linear(d, num_experts, bias=False)
        self.experts = nn.ModuleList([GatedMLP(d, f) for _ in range(num_experts)])

    def forward(self, h):
        b, t, d = h.shape
        x = h.reshape(-1, d)
        logits = self.gate(x)
        topl, topi = torch.topk(logits, self.top_k, dim=-1)
        w = torch.softmax(topl, dim=-1)
        if self.square:
            w = w * w
        stacked = torch.stack([e(x) for e in self.experts], dim=1)  # [T, E, d]
        sel = torch.gather(stacked, 1, topi[:, :, None].expand(-1, -1, d))  # [T, k, d]
        y = (sel * w[:, :, None]).sum(1)
        return y.reshape(b, t, d), logits


class StackedMoe(nn.Module):
    """Experts as stacked 3-D parameters (fused-expert implementations): ``w1 / w3 [E, D, F]``, ``w2 [E, F, D]``
    applied to every token with ``torch.bmm`` and ``einsum``, combined by the dense routing weights."""

    def __init__(self, d, f, num_experts=4, top_k=2):
        super().__init__()
        self.num_experts, self.top_k = num_experts, top_k
        self.gate = nn.Linear(d, num_experts, bias=False)
        self.w1 = nn.Parameter(torch.randn(num_experts, d, f) * d**-0.5)
        self.w3 = nn.Parameter(torch.randn(num_experts, d, f) * d**-0.5)
        self.w2 = nn.Parameter(torch.randn(num_experts, f, d) * f**-0.5)

    def forward(self, h):
        b, t, d = h.shape
        x = h.reshape(-1, d)
        logits = self.gate(x)
        w, sel = torch.topk(torch.softmax(logits, dim=-1), self.top_k, dim=-1)
        dense = torch.zeros_like(logits).scatter(1, sel, w / w.sum(-1, keepdim=True))  # [T, E]
        xe = x.unsqueeze(0).expand(self.num_experts, -1, -1)  # [E, T, D]
        y = torch.bmm(F.silu(torch.bmm(xe, self.w1)) * torch.einsum("etd,edf->etf", xe, self.w3), self.w2)
        return torch.einsum("te,etd->td", dense, y).reshape(b, t, d), logits


class FusedGateUpMoe(nn.Module):
    """Fused gate / up expert weights, ``gate_up_proj [E, D, 2F]`` applied with ``bmm``, then split along the output
    features: ``chunk(2, -1)`` (Llama-4 style, ``order="chunk"``) or every other column (GPT-OSS style,
    ``order="interleaved"``: gate = ``[..., ::2]``, up = ``[..., 1::2]``, with per-expert biases)."""

    def __init__(self, d, f, num_experts=4, top_k=2, order="chunk"):
        super().__init__()
        self.num_experts, self.top_k, self.order = num_experts, top_k, order
        self.router = nn.Linear(d, num_experts, bias=order == "interleaved")
        self.gate_up_proj = nn.Parameter(torch.randn(num_experts, d, 2 * f) * d**-0.5)
        self.down_proj = nn.Parameter(torch.randn(num_experts, f, d) * f**-0.5)
        if order == "interleaved":
            self.gate_up_proj_bias = nn.Parameter(torch.randn(num_experts, 2 * f) * 0.1)
            self.down_proj_bias = nn.Parameter(torch.randn(num_experts, d) * 0.1)

    def forward(self, h):
        b, t, d = h.shape
        x = h.reshape(-1, d)
        logits = self.router(x)
        top, sel = torch.topk(logits, self.top_k, dim=-1)
        dense = torch.zeros_like(logits).scatter(1, sel, torch.softmax(top, dim=-1))  # [T, E]
        xe = x.unsqueeze(0).expand(self.num_experts, -1, -1)  # [E, T, D]
        gu = torch.bmm(xe, self.gate_up_proj)
        if self.order == "chunk":
            gate, up = gu.chunk(2, dim=-1)
            y = torch.bmm(up * F.silu(gate), self.down_proj)
        else:
            gu = gu + self.gate_up_proj_bias[:, None, :]
            gate, up = gu[..., ::2], gu[..., 1::2]
            y = torch.bmm(up * F.silu(gate), self.down_proj) + self.down_proj_bias[:, None, :]
        return torch.einsum("te,etd->td", dense, y).reshape(b, t, d), logits


class BatchedMmMoe(nn.Module):
    """transformers' (v5) experts as 3-D parameters with the ``batched_mm`` implementation: every routed (token, slot)
    pair gathers its expert's slices (``gate_up_proj[expert_ids]``) and applies them with ``torch.bmm``, biases
    gathered the same way; ``index_add_`` sums the slots of a token. ``transposed``: weights stored ``[E, in, out]``
    and applied as ``x[:, None] @ W`` (``experts_are_transposed``); else ``[E, out, in]`` as ``W @ x[..., None]``.
    ``act``: "silu" (SwiGLU), or "oss" (GPT-OSS's clamped ``(up + 1) * gate * sigmoid(1.702 gate)``, which sparsec's
    MoE node does not express); ``route="biased"``: DeepSeek-V3's selection by sigmoid score + a correction bias within
    the best group of experts (nor that)."""

    def __init__(self, d, f, num_experts=4, top_k=2, transposed=False, bias=False, act="silu", route="softmax"):
        super().__init__()
        self.top_k, self.transposed, self.act, self.route = top_k, transposed, act, route
        if route == "biased":  # DeepSeek-V3: sigmoid scores, experts chosen by score + a correction bias
            self.e_score_correction_bias = nn.Parameter(torch.randn(num_experts) * 0.5)
        self.gate = nn.Linear(d, num_experts, bias=False)
        shape_gu, shape_dn = ((num_experts, d, 2 * f), (num_experts, f, d)) if transposed else ((num_experts, 2 * f, d), (num_experts, d, f))
        self.gate_up_proj = nn.Parameter(torch.randn(*shape_gu) * d**-0.5)
        self.down_proj = nn.Parameter(torch.randn(*shape_dn) * f**-0.5)
        self.gate_up_proj_bias = nn.Parameter(torch.randn(num_experts, 2 * f) * 0.1) if bias else None
        self.down_proj_bias = nn.Parameter(torch.randn(num_experts, d) * 0.1) if bias else None

    def _per_slot(self, w, x):  # x [S, in] by each slot's own w -> [S, out]
        return torch.bmm(x.unsqueeze(1), w).squeeze(1) if self.transposed else torch.bmm(w, x.unsqueeze(-1)).squeeze(-1)

    def forward(self, h):
        b, t, d = h.shape
        x = h.reshape(-1, d)
        logits = self.gate(x)
        if self.route == "biased":  # (2 groups of experts, the best group only, as DeepSeek-V3's router)
            scores = logits.sigmoid()
            choice = scores + self.e_score_correction_bias
            e = choice.shape[-1]
            groups = choice.view(-1, 2, e // 2).topk(2, dim=-1)[0].sum(-1)
            mask = torch.zeros_like(groups).scatter_(1, torch.topk(groups, k=1, dim=-1, sorted=False)[1], 1)
            mask = mask.unsqueeze(-1).expand(-1, 2, e // 2).reshape(-1, e)
            sel = torch.topk(choice.masked_fill(~mask.bool(), 0.0), self.top_k, dim=-1, sorted=False)[1]
            w = scores.gather(1, sel)
        else:
            w, sel = torch.topk(F.softmax(logits, dim=-1, dtype=torch.float), self.top_k, dim=-1)
        w = w / w.sum(dim=-1, keepdim=True)
        ids = sel.reshape(-1)
        tok = torch.arange(x.shape[0]).unsqueeze(1).expand(-1, self.top_k).reshape(-1)
        gu = self._per_slot(self.gate_up_proj[ids], x[tok])
        if self.gate_up_proj_bias is not None:
            gu = gu + self.gate_up_proj_bias[ids]
        gate, up = gu.chunk(2, dim=-1)
        if self.act == "oss":
            gate, up = gate.clamp(max=7.0), up.clamp(min=-7.0, max=7.0)
            hid = (up + 1) * (gate * torch.sigmoid(gate * 1.702))
        else:
            hid = F.silu(gate) * up
        y = self._per_slot(self.down_proj[ids], hid)
        if self.down_proj_bias is not None:
            y = y + self.down_proj_bias[ids]
        out = torch.zeros_like(x).index_add_(0, tok, y * w.reshape(-1, 1))
        return out.reshape(b, t, d), logits


# name -> (block factory, expected (experts, top_k, renormalize, score) per MoE layer)
VARIANTS = {
    "mixtral": (None, (4, 2, True, "softmax")),
    "qwen": (lambda d, f: QwenStyleMoe(d, f), (6, 2, False, "softmax")),
    "switch": (lambda d, f: SwitchStyleMoe(d, f), (4, 1, None, None)),  # top-1: renormalize/score are equivalent
    "switch_sorted": (lambda d, f: SortedSwitchMoe(d, f), (4, 1, False, "softmax")),
    "dense_sigmoid": (lambda d, f: DenseSigmoidMoe(d, f), (4, 2, True, "sigmoid")),
    "topk_softmax": (lambda d, f: TopkSoftmaxMoe(d, f), (4, 2, True, "softmax")),
    "stacked": (lambda d, f: StackedMoe(d, f), (4, 2, True, "softmax")),
    "fused_chunk": (lambda d, f: FusedGateUpMoe(d, f), (4, 2, True, "softmax")),
    "fused_interleaved": (lambda d, f: FusedGateUpMoe(d, f, order="interleaved"), (4, 2, True, "softmax")),
    "squared": (lambda d, f: TopkSoftmaxMoe(d, f, square=True), None),
}


def build_variant(name: str, seed: int = 0, identical: bool = False) -> nn.Module:
    """MixtralStyle (2 decoder layers) with each MoE block replaced by the variant's; ``identical``: every expert of a
    layer is a copy of its first expert."""
    model = tm.build("mixtral", seed=seed)
    factory = VARIANTS[name][0]
    torch.manual_seed(seed + 1)
    for layer in model.model.layers:
        if factory is not None:
            layer.block_sparse_moe = factory(64, 128)
        if identical and isinstance(layer.block_sparse_moe, StackedMoe):
            with torch.no_grad():
                for p in (layer.block_sparse_moe.w1, layer.block_sparse_moe.w2, layer.block_sparse_moe.w3):
                    p[1:] = p[0]
        elif identical:
            experts = layer.block_sparse_moe.experts
            for e in experts[1:]:
                e.load_state_dict(experts[0].state_dict())
    return model.eval()
