"""Test models in the shapes real ones have, written the way HuggingFace writes them, and export helpers.

- ``BertStyle``: post-norm encoder (LayerNorm after the residual add), learned positions, token types, GELU,
  additive attention mask; modules named like HF BERT (``encoder.layer.0.attention.self.query`` ...).
- ``GPT2Style``: pre-norm decoder with learned positions, fused ``c_attn`` written as HF's ``Conv1D``
  (``addmm`` with a ``[in, out]`` weight), tanh-GELU, final ``ln_f``, LM head tied to ``wte``.
- ``LlamaStyle``: RMSNorm (HF style, float32 compute), rotary positions, SwiGLU MLP, untied head.
- ``MixtralStyle``: LlamaStyle with HF-Mixtral sparse MoE blocks (router + ModuleList of w1/w2/w3 experts).
"""
from __future__ import annotations

import math
import os
import tempfile

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


# ----------------------------------------------------------------------------------------------------------------
class BertSelfAttention(nn.Module):
    def __init__(self, d, h):
        super().__init__()
        self.h, self.dh = h, d // h
        self.query = nn.Linear(d, d)
        self.key = nn.Linear(d, d)
        self.value = nn.Linear(d, d)

    def split(self, x):
        b, t, _ = x.shape
        return x.view(b, t, self.h, self.dh).permute(0, 2, 1, 3)

    def forward(self, x, mask):
        q, k, v = self.split(self.query(x)), self.split(self.key(x)), self.split(self.value(x))
        s = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(self.dh) + mask
        p = torch.softmax(s, dim=-1)
        o = torch.matmul(p, v).permute(0, 2, 1, 3).contiguous()
        return o.view(o.shape[0], o.shape[1], -1)


class BertSelfOutput(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.dense = nn.Linear(d, d)
        self.LayerNorm = nn.LayerNorm(d, eps=1e-12)

    def forward(self, h, x):
        return self.LayerNorm(self.dense(h) + x)


class BertAttention(nn.Module):
    def __init__(self, d, h):
        super().__init__()
        self.self = BertSelfAttention(d, h)
        self.output = BertSelfOutput(d)

    def forward(self, x, mask):
        return self.output(self.self(x, mask), x)


class BertIntermediate(nn.Module):
    def __init__(self, d, f):
        super().__init__()
        self.dense = nn.Linear(d, f)

    def forward(self, x):
        return F.gelu(self.dense(x))


class BertOutput(nn.Module):
    def __init__(self, d, f):
        super().__init__()
        self.dense = nn.Linear(f, d)
        self.LayerNorm = nn.LayerNorm(d, eps=1e-12)

    def forward(self, h, x):
        return self.LayerNorm(self.dense(h) + x)


class BertLayer(nn.Module):
    def __init__(self, d, h, f):
        super().__init__()
        self.attention = BertAttention(d, h)
        self.intermediate = BertIntermediate(d, f)
        self.output = BertOutput(d, f)

    def forward(self, x, mask):
        a = self.attention(x, mask)
        return self.output(self.intermediate(a), a)


class BertEmbeddings(nn.Module):
    def __init__(self, vocab, d, maxpos, types=2):
        super().__init__()
        self.word_embeddings = nn.Embedding(vocab, d)
        self.position_embeddings = nn.Embedding(maxpos, d)
        self.token_type_embeddings = nn.Embedding(types, d)
        self.LayerNorm = nn.LayerNorm(d, eps=1e-12)

    def forward(self, ids, types):
        pos = torch.arange(ids.shape[1], device=ids.device).unsqueeze(0)
        e = self.word_embeddings(ids) + self.position_embeddings(pos) + self.token_type_embeddings(types)
        return self.LayerNorm(e)


class BertEncoder(nn.Module):
    def __init__(self, n, d, h, f):
        super().__init__()
        self.layer = nn.ModuleList([BertLayer(d, h, f) for _ in range(n)])

    def forward(self, x, mask):
        for layer in self.layer:
            x = layer(x, mask)
        return x


class BertStyle(nn.Module):
    def __init__(self, vocab=100, d=64, layers=6, heads=4, ffn=256, maxpos=64):
        super().__init__()
        self.embeddings = BertEmbeddings(vocab, d, maxpos)
        self.encoder = BertEncoder(layers, d, heads, ffn)
        self.vocab = vocab

    def forward(self, input_ids, attention_mask, token_type_ids):
        mask = (1.0 - attention_mask[:, None, None, :].to(torch.float32)) * -10000.0
        return self.encoder(self.embeddings(input_ids, token_type_ids), mask)

    def example_inputs(self, b=2, t=16, seed=0):
        g = torch.Generator().manual_seed(seed)
        ids = torch.randint(0, self.vocab, (b, t), generator=g)
        mask = torch.ones(b, t, dtype=torch.int64)
        mask[0, -3:] = 0
        types = torch.zeros(b, t, dtype=torch.int64)
        types[:, t // 2 :] = 1
        return ids, mask, types


# ----------------------------------------------------------------------------------------------------------------
class Conv1D(nn.Module):
    """HF GPT-2's Conv1D: a linear layer with the weight stored [in, out], computed with addmm."""

    def __init__(self, nf, nx):
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.02)
        self.bias = nn.Parameter(torch.randn(nf) * 0.02)

    def forward(self, x):
        size_out = x.size()[:-1] + (self.nf,)
        x = torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight)
        return x.view(size_out)


class GPT2Attention(nn.Module):
    def __init__(self, d, h, maxpos):
        super().__init__()
        self.h, self.dh, self.d = h, d // h, d
        self.c_attn = Conv1D(3 * d, d)
        self.c_proj = Conv1D(d, d)
        self.register_buffer("bias", torch.tril(torch.ones(maxpos, maxpos, dtype=torch.bool)).view(1, 1, maxpos, maxpos), persistent=False)

    def forward(self, x):
        b, t, _ = x.shape
        q, k, v = self.c_attn(x).split(self.d, dim=2)
        q, k, v = (y.view(b, t, self.h, self.dh).transpose(1, 2) for y in (q, k, v))
        w = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(self.dh)
        causal = self.bias[:, :, :t, :t]
        w = torch.where(causal, w, torch.tensor(torch.finfo(w.dtype).min, dtype=w.dtype))
        o = torch.matmul(torch.softmax(w, dim=-1), v).transpose(1, 2).contiguous().view(b, t, self.d)
        return self.c_proj(o)


class GPT2MLP(nn.Module):
    def __init__(self, d, f):
        super().__init__()
        self.c_fc = Conv1D(f, d)
        self.c_proj = Conv1D(d, f)

    def forward(self, x):
        return self.c_proj(F.gelu(self.c_fc(x), approximate="tanh"))


class GPT2Block(nn.Module):
    def __init__(self, d, h, f, maxpos):
        super().__init__()
        self.ln_1 = nn.LayerNorm(d)
        self.attn = GPT2Attention(d, h, maxpos)
        self.ln_2 = nn.LayerNorm(d)
        self.mlp = GPT2MLP(d, f)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT2Style(nn.Module):
    def __init__(self, vocab=96, d=64, layers=3, heads=4, ffn=256, maxpos=64):
        super().__init__()
        self.wte = nn.Embedding(vocab, d)
        self.wpe = nn.Embedding(maxpos, d)
        self.h = nn.ModuleList([GPT2Block(d, heads, ffn, maxpos) for _ in range(layers)])
        self.ln_f = nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, vocab, bias=False)
        self.lm_head.weight = self.wte.weight
        self.vocab = vocab
        with torch.no_grad():  # non-trivial norms so that folding tests mean something
            for m in self.modules():
                if isinstance(m, nn.LayerNorm):
                    m.weight.uniform_(0.5, 1.5)
                    m.bias.normal_(0, 0.1)

    def forward(self, input_ids):
        pos = torch.arange(input_ids.shape[1], device=input_ids.device).unsqueeze(0)
        x = self.wte(input_ids) + self.wpe(pos)
        for blk in self.h:
            x = blk(x)
        return self.lm_head(self.ln_f(x))

    def example_inputs(self, b=2, t=16, seed=0):
        g = torch.Generator().manual_seed(seed)
        return (torch.randint(0, self.vocab, (b, t), generator=g),)


# ----------------------------------------------------------------------------------------------------------------
class LlamaRMSNorm(nn.Module):
    def __init__(self, d, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))
        self.variance_epsilon = eps

    def forward(self, x):
        dtype = x.dtype
        x = x.to(torch.float32)
        variance = x.pow(2).mean(-1, keepdim=True)
        x = x * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * x.to(dtype)


def rotate_half(x):
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


class LlamaAttention(nn.Module):
    def __init__(self, d, h, theta=10000.0):
        super().__init__()
        self.h, self.dh = h, d // h
        self.q_proj = nn.Linear(d, d, bias=False)
        self.k_proj = nn.Linear(d, d, bias=False)
        self.v_proj = nn.Linear(d, d, bias=False)
        self.o_proj = nn.Linear(d, d, bias=False)
        inv = 1.0 / (theta ** (torch.arange(0, self.dh, 2, dtype=torch.float32) / self.dh))
        self.register_buffer("inv_freq", inv, persistent=False)

    def forward(self, x):
        b, t, d = x.shape
        q = self.q_proj(x).view(b, t, self.h, self.dh).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.h, self.dh).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.h, self.dh).transpose(1, 2)
        pos = torch.arange(t, device=x.device, dtype=torch.float32)
        freqs = torch.outer(pos, self.inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos()[None, None], emb.sin()[None, None]
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        s = torch.matmul(q, k.transpose(2, 3)) / math.sqrt(self.dh)
        mask = torch.full((t, t), float("-inf"), device=x.device).triu(1)
        p = torch.softmax(s + mask, dim=-1)
        o = torch.matmul(p, v).transpose(1, 2).reshape(b, t, d)
        return self.o_proj(o)


class LlamaMLP(nn.Module):
    def __init__(self, d, f):
        super().__init__()
        self.gate_proj = nn.Linear(d, f, bias=False)
        self.up_proj = nn.Linear(d, f, bias=False)
        self.down_proj = nn.Linear(f, d, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class MixtralBlockSparseTop2MLP(nn.Module):
    def __init__(self, d, f):
        super().__init__()
        self.w1 = nn.Linear(d, f, bias=False)
        self.w2 = nn.Linear(f, d, bias=False)
        self.w3 = nn.Linear(d, f, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class MixtralSparseMoeBlock(nn.Module):
    """As HF Mixtral writes it: softmax in float, top-k, renormalize, loop over experts with where/index_add_."""

    def __init__(self, d, f, num_experts=4, top_k=2):
        super().__init__()
        self.num_experts, self.top_k = num_experts, top_k
        self.gate = nn.Linear(d, num_experts, bias=False)
        self.experts = nn.ModuleList([MixtralBlockSparseTop2MLP(d, f) for _ in range(num_experts)])

    def forward(self, hidden_states):
        b, t, d = hidden_states.shape
        hidden_states = hidden_states.view(-1, d)
        router_logits = self.gate(hidden_states)
        routing_weights = F.softmax(router_logits, dim=1, dtype=torch.float)
        routing_weights, selected_experts = torch.topk(routing_weights, self.top_k, dim=-1)
        routing_weights /= routing_weights.sum(dim=-1, keepdim=True)
        routing_weights = routing_weights.to(hidden_states.dtype)
        final = torch.zeros((b * t, d), dtype=hidden_states.dtype, device=hidden_states.device)
        expert_mask = F.one_hot(selected_experts, num_classes=self.num_experts).permute(2, 1, 0)
        for e in range(self.num_experts):
            idx, top_x = torch.where(expert_mask[e])
            cur = hidden_states[None, top_x].reshape(-1, d)
            cur = self.experts[e](cur) * routing_weights[top_x, idx, None]
            final.index_add_(0, top_x, cur.to(hidden_states.dtype))
        return final.reshape(b, t, d), router_logits


class LlamaDecoderLayer(nn.Module):
    def __init__(self, d, h, f, moe: dict | None = None):
        super().__init__()
        self.input_layernorm = LlamaRMSNorm(d)
        self.self_attn = LlamaAttention(d, h)
        self.post_attention_layernorm = LlamaRMSNorm(d)
        self.moe = moe is not None
        if self.moe:
            self.block_sparse_moe = MixtralSparseMoeBlock(d, f, **moe)
        else:
            self.mlp = LlamaMLP(d, f)

    def forward(self, x):
        x = x + self.self_attn(self.input_layernorm(x))
        h = self.post_attention_layernorm(x)
        if self.moe:
            h, _ = self.block_sparse_moe(h)
        else:
            h = self.mlp(h)
        return x + h


class LlamaModel(nn.Module):
    def __init__(self, vocab, d, layers, heads, ffn, moe):
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab, d)
        self.layers = nn.ModuleList([LlamaDecoderLayer(d, heads, ffn, moe) for _ in range(layers)])
        self.norm = LlamaRMSNorm(d)

    def forward(self, ids):
        x = self.embed_tokens(ids)
        for layer in self.layers:
            x = layer(x)
        return self.norm(x)


class LlamaStyle(nn.Module):
    def __init__(self, vocab=128, d=64, layers=2, heads=4, ffn=128, moe: dict | None = None):
        super().__init__()
        self.model = LlamaModel(vocab, d, layers, heads, ffn, moe)
        self.lm_head = nn.Linear(d, vocab, bias=False)
        self.vocab = vocab
        with torch.no_grad():
            for m in self.modules():
                if isinstance(m, LlamaRMSNorm):
                    m.weight.uniform_(0.5, 1.5)

    def forward(self, input_ids):
        return self.lm_head(self.model(input_ids))

    def example_inputs(self, b=2, t=16, seed=0):
        g = torch.Generator().manual_seed(seed)
        return (torch.randint(0, self.vocab, (b, t), generator=g),)


def MixtralStyle(**kw):
    return LlamaStyle(moe={"num_experts": 4, "top_k": 2}, **kw)


# ----------------------------------------------------------------------------------------------------------------
INPUT_NAMES = {
    "BertStyle": ["input_ids", "attention_mask", "token_type_ids"],
    "GPT2Style": ["input_ids"],
    "LlamaStyle": ["input_ids"],
}


def build(kind: str, seed: int = 0, **kw) -> nn.Module:
    torch.manual_seed(seed)
    cls = {"bert": BertStyle, "gpt2": GPT2Style, "llama": LlamaStyle, "mixtral": MixtralStyle}[kind]
    return cls(**kw).eval()


def export_onnx(model: nn.Module, path: str, exporter: str, opset: int, axes_apart: bool = False) -> str:
    """Export like users do: ``torch.onnx.export`` with the TorchScript exporter (``dynamo=False``) or the dynamo
    exporter (weights in an external ``.data`` file), batch and sequence dims dynamic. ``axes_apart`` (TorchScript):
    list-form ``dynamic_axes`` (``{"input_ids": [0, 1], ...}``), for which the exporter names every input's axes
    apart (``input_ids_dynamic_axes_1``, ``attention_mask_dynamic_axes_1``, ...)."""
    import contextlib
    import io
    import warnings

    args = model.example_inputs()
    names = INPUT_NAMES.get(type(model).__name__, ["input_ids"])[: len(args)]
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        if exporter == "torchscript":
            dyn = {n: ([0, 1] if axes_apart else {0: "batch", 1: "seq"}) for n in names}
            dyn["output"] = [0, 1] if axes_apart else {0: "batch", 1: "seq"}
            torch.onnx.export(model, args, path, dynamo=False, opset_version=opset, input_names=names,
                              output_names=["output"], dynamic_axes=dyn)  # fmt: skip
        else:
            b, s = torch.export.Dim("batch", min=1, max=64), torch.export.Dim("seq", min=2, max=64)
            sig = list(__import__("inspect").signature(model.forward).parameters)
            dyn = {sig[i]: {0: b, 1: s} for i in range(len(args))}
            torch.onnx.export(model, args, path, dynamo=True, opset_version=opset, input_names=names,
                              output_names=["output"], dynamic_shapes=dyn, external_data=True)  # fmt: skip
    return path


def feeds_for(model: nn.Module, b=3, t=12, seed=1) -> dict[str, np.ndarray]:
    args = model.example_inputs(b=b, t=t, seed=seed)
    names = INPUT_NAMES.get(type(model).__name__, ["input_ids"])
    return {n: a.numpy() for n, a in zip(names, args)}


def rel(a, b) -> float:
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))
