"""More model families as HuggingFace's modeling code writes them (small, random init, fixed seed), with exporters.

Each family follows the attention / norm / MLP / position code of its ``modeling_<family>.py`` (module names too, so
layer names are the ones users know), cut down to 2 layers and d_model 64-128:

- ``llama_gqa``   LLaMA-3 / Mistral: GQA (num_key_value_heads < num_heads, ``repeat_kv`` via expand+reshape), rotary
                  with position_ids, eager softmax attention, untied head.
- ``mistral_sdpa`` Mistral with ``F.scaled_dot_product_attention`` and an ``attention_mask`` (int64) input turned into
                  a 4-D additive causal+padding mask, as HF's sdpa path does.
- ``qwen2``       Qwen2: q/k/v with bias, o without, GQA, SwiGLU, RMSNorm, untied head.
- ``gemma``       Gemma: embeddings * sqrt(d), RMSNorm with (1 + w), GeGLU (tanh gelu), MQA (1 kv head), tied head.
- ``phi2``        Phi-2: parallel attention + MLP off one LayerNorm, partial rotary (rotary dim 1/2 of head dim),
                  dense with bias, gelu_new, final LayerNorm, lm_head with bias.
- ``gptneox``     GPT-NeoX / Pythia: fused ``query_key_value`` ([h, 3, dh] layout), rotary on 1/4 of the head,
                  parallel residual, final LayerNorm, untied ``embed_out``.
- ``opt``         OPT: learned positions with offset 2 computed from attention_mask (cumsum), q scaling, ReLU FFN,
                  final LayerNorm, tied head; inputs input_ids + attention_mask.
- ``falcon``      Falcon-7B style: fused QKV with multi-query (1 kv head), rotary, parallel attention, no biases.
- ``t5enc``       T5 encoder: relative position bias (bucketed, layer 0 only, shared), T5LayerNorm (RMS without mean),
                  DenseReluDense, no 1/sqrt(d) scaling, attention_mask input.
- ``vit``         ViT: Conv2d patch embedding, cls token, learned positions, pre-LN, classifier on the cls token.
- ``whisper_enc`` Whisper encoder: two Conv1d stems (stride 1 and 2) with GELU, sinusoidal positions, pre-LN.
- ``distilbert``  DistilBERT: q_lin/k_lin/v_lin/out_lin, masked_fill with attention_mask, post-LN, GELU.
- ``clip_text``   CLIP text encoder: causal mask, quick_gelu, pre-LN, final LayerNorm.
- ``llama_kv``    LLaMA-GQA decoder step with a KV cache: ``past_key_values.{i}.key/value`` graph inputs, logits and
                  ``present.{i}.key/value`` outputs.
- ``mixtral_gqa`` Mixtral (HF sparse MoE block) with GQA attention (MoE: for --merge-experts).
"""
from __future__ import annotations

import contextlib
import io
import math
import warnings

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .models import BertIntermediate, LlamaMLP, LlamaRMSNorm, MixtralSparseMoeBlock, rotate_half


# ---------------------------------------------------------------------------------------------------------------- common
def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """HF: (batch, num_key_value_heads, seqlen, head_dim) -> (batch, num_attention_heads, seqlen, head_dim)."""
    b, kvh, t, dh = x.shape
    if n_rep == 1:
        return x
    x = x[:, :, None, :, :].expand(b, kvh, n_rep, t, dh)
    return x.reshape(b, kvh * n_rep, t, dh)


class RotaryEmbedding(nn.Module):
    def __init__(self, dim, base=10000.0):
        super().__init__()
        inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, x, position_ids):
        inv = self.inv_freq[None, :, None].float().expand(position_ids.shape[0], -1, 1)
        pos = position_ids[:, None, :].float()
        freqs = (inv @ pos).transpose(1, 2)
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(x.dtype), emb.sin().to(x.dtype)


def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1):
    cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
    return (q * cos) + (rotate_half(q) * sin), (k * cos) + (rotate_half(k) * sin)


def causal_mask(t: int, device, dtype=torch.float32) -> torch.Tensor:
    return torch.full((t, t), torch.finfo(dtype).min, device=device, dtype=dtype).triu(1)


def gelu_new(x):
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


def _randomize_norms(m: nn.Module):
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, (nn.LayerNorm, LlamaRMSNorm, GemmaRMSNorm, T5LayerNorm)):
                if getattr(mod, "weight", None) is not None:
                    if isinstance(mod, GemmaRMSNorm):
                        mod.weight.uniform_(-0.5, 0.5)
                    else:
                        mod.weight.uniform_(0.5, 1.5)
                if getattr(mod, "bias", None) is not None:
                    mod.bias.uniform_(-0.1, 0.1)


class TokenModel(nn.Module):
    """Mixin: token inputs (and optionally an int64 attention_mask with left padding on one row)."""

    input_names = ["input_ids"]
    output_names = ["logits"]
    vocab = 256

    def example_inputs(self, b=2, t=16, seed=0):
        g = torch.Generator().manual_seed(seed)
        ids = torch.randint(0, self.vocab, (b, t), generator=g)
        if "attention_mask" not in self.input_names:
            return (ids,)
        mask = torch.ones(b, t, dtype=torch.int64)
        if b > 1:
            mask[-1, : t // 4] = 0  # left padding on the last row
        return (ids, mask)


# ---------------------------------------------------------------------------------------------------------------- LLaMA/Mistral GQA
class LlamaGQAAttention(nn.Module):
    def __init__(self, d, h, kvh, bias=False, sdpa=False):
        super().__init__()
        self.num_heads, self.num_key_value_heads, self.head_dim = h, kvh, d // h
        self.num_key_value_groups = h // kvh
        self.q_proj = nn.Linear(d, h * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(d, kvh * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(d, kvh * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(h * self.head_dim, d, bias=False)
        self.sdpa = sdpa

    def forward(self, x, cos, sin, mask, past=None):
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, -1, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, -1, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, -1, self.head_dim).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        if past is not None:
            k = torch.cat([past[0], k], dim=2)
            v = torch.cat([past[1], v], dim=2)
        present = (k, v)
        k, v = repeat_kv(k, self.num_key_value_groups), repeat_kv(v, self.num_key_value_groups)
        if self.sdpa:
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        else:
            s = torch.matmul(q, k.transpose(2, 3)) / math.sqrt(self.head_dim) + mask
            p = F.softmax(s, dim=-1, dtype=torch.float32).to(q.dtype)
            o = torch.matmul(p, v)
        o = o.transpose(1, 2).contiguous().reshape(b, t, -1)
        return self.o_proj(o), present


class GQADecoderLayer(nn.Module):
    def __init__(self, d, h, kvh, f, bias=False, sdpa=False, moe=None):
        super().__init__()
        self.self_attn = LlamaGQAAttention(d, h, kvh, bias=bias, sdpa=sdpa)
        self.moe = moe is not None
        if self.moe:
            self.block_sparse_moe = MixtralSparseMoeBlock(d, f, **moe)
        else:
            self.mlp = LlamaMLP(d, f)
        self.input_layernorm = LlamaRMSNorm(d)
        self.post_attention_layernorm = LlamaRMSNorm(d)

    def forward(self, x, cos, sin, mask, past=None):
        a, present = self.self_attn(self.input_layernorm(x), cos, sin, mask, past)
        x = x + a
        h = self.post_attention_layernorm(x)
        h = self.block_sparse_moe(h)[0] if self.moe else self.mlp(h)
        return x + h, present


class GQAModel(nn.Module):
    def __init__(self, vocab, d, layers, h, kvh, f, bias=False, sdpa=False, moe=None):
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab, d)
        self.layers = nn.ModuleList([GQADecoderLayer(d, h, kvh, f, bias, sdpa, moe) for _ in range(layers)])
        self.norm = LlamaRMSNorm(d)
        self.rotary_emb = RotaryEmbedding(d // h)


class LlamaGQA(TokenModel):
    """LLaMA-3 / Mistral / Qwen2 (bias=True) causal LM; ``sdpa`` + ``attention_mask`` like HF's sdpa path."""

    def __init__(self, vocab=256, d=128, layers=2, heads=8, kv_heads=2, ffn=256, bias=False, sdpa=False,
                 with_mask=False, moe=None):
        super().__init__()
        self.vocab = vocab
        self.model = GQAModel(vocab, d, layers, heads, kv_heads, ffn, bias, sdpa, moe)
        self.lm_head = nn.Linear(d, vocab, bias=False)
        self.input_names = ["input_ids", "attention_mask"] if with_mask else ["input_ids"]
        _randomize_norms(self)

    def _mask(self, b, t, attention_mask, dtype, device):
        m = causal_mask(t, device, dtype)[None, None].expand(b, 1, t, t)
        if attention_mask is not None:
            pad = (1.0 - attention_mask[:, None, None, :].to(dtype)) * torch.finfo(dtype).min
            m = torch.clamp(m + pad, min=torch.finfo(dtype).min)
        return m

    def forward(self, input_ids, attention_mask=None):
        b, t = input_ids.shape
        x = self.model.embed_tokens(input_ids)
        position_ids = torch.arange(t, device=x.device).unsqueeze(0).expand(b, -1)
        cos, sin = self.model.rotary_emb(x, position_ids)
        mask = self._mask(b, t, attention_mask, x.dtype, x.device)
        for layer in self.model.layers:
            x, _ = layer(x, cos, sin, mask)
        return self.lm_head(self.model.norm(x))


class LlamaKV(LlamaGQA):
    """One decoder step with a KV cache as graph inputs/outputs (what optimum's ``decoder_with_past`` exports)."""

    past_len = 6
    dynamic_seq = False  # one decode step of fixed length (torch.export specializes the mask's cat on it)

    def __init__(self, **kw):
        super().__init__(**kw)
        n = len(self.model.layers)
        self.input_names = ["input_ids"] + [f"past_key_values.{i}.{kv}" for i in range(n) for kv in ("key", "value")]
        self.output_names = ["logits"] + [f"present.{i}.{kv}" for i in range(n) for kv in ("key", "value")]

    def example_inputs(self, b=2, t=4, seed=0):
        g = torch.Generator().manual_seed(seed)
        ids = torch.randint(0, self.vocab, (b, t), generator=g)
        a = self.model.layers[0].self_attn
        past = []
        for _ in self.model.layers:
            for _kv in range(2):
                past.append(torch.randn(b, a.num_key_value_heads, self.past_len, a.head_dim, generator=g))
        return (ids, *past)

    def forward(self, input_ids, past_key_0, past_value_0, past_key_1, past_value_1):
        past = (past_key_0, past_value_0, past_key_1, past_value_1)
        b, t = input_ids.shape
        p = past[0].shape[2]
        x = self.model.embed_tokens(input_ids)
        position_ids = torch.arange(p, p + t, device=x.device).unsqueeze(0).expand(b, -1)
        cos, sin = self.model.rotary_emb(x, position_ids)
        mask = torch.cat([torch.zeros(t, p), causal_mask(t, x.device)], dim=1)[None, None]
        presents = []
        for i, layer in enumerate(self.model.layers):
            x, pr = layer(x, cos, sin, mask, (past[2 * i], past[2 * i + 1]))
            presents += list(pr)
        return (self.lm_head(self.model.norm(x)), *presents)


# ---------------------------------------------------------------------------------------------------------------- Gemma
class GemmaRMSNorm(nn.Module):
    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))

    def _norm(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)

    def forward(self, x):
        output = self._norm(x.float())
        output = output * (1.0 + self.weight.float())
        return output.type_as(x)


class GemmaMLP(nn.Module):
    def __init__(self, d, f):
        super().__init__()
        self.gate_proj = nn.Linear(d, f, bias=False)
        self.up_proj = nn.Linear(d, f, bias=False)
        self.down_proj = nn.Linear(f, d, bias=False)

    def forward(self, x):
        return self.down_proj(F.gelu(self.gate_proj(x), approximate="tanh") * self.up_proj(x))


class GemmaDecoderLayer(nn.Module):
    def __init__(self, d, h, kvh, f):
        super().__init__()
        self.self_attn = LlamaGQAAttention(d, h, kvh)
        self.mlp = GemmaMLP(d, f)
        self.input_layernorm = GemmaRMSNorm(d)
        self.post_attention_layernorm = GemmaRMSNorm(d)

    def forward(self, x, cos, sin, mask):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask)[0]
        return x + self.mlp(self.post_attention_layernorm(x))


class GemmaModel(nn.Module):
    def __init__(self, vocab, d, layers, h, kvh, f):
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab, d)
        self.layers = nn.ModuleList([GemmaDecoderLayer(d, h, kvh, f) for _ in range(layers)])
        self.norm = GemmaRMSNorm(d)
        self.rotary_emb = RotaryEmbedding(d // h)


class Gemma(TokenModel):
    def __init__(self, vocab=256, d=128, layers=2, heads=4, kv_heads=1, ffn=256):
        super().__init__()
        self.vocab, self.d = vocab, d
        self.model = GemmaModel(vocab, d, layers, heads, kv_heads, ffn)
        self.lm_head = nn.Linear(d, vocab, bias=False)
        self.lm_head.weight = self.model.embed_tokens.weight  # tied
        _randomize_norms(self)

    def forward(self, input_ids):
        b, t = input_ids.shape
        x = self.model.embed_tokens(input_ids)
        x = x * torch.tensor(self.d**0.5, dtype=x.dtype)  # normalizer
        position_ids = torch.arange(t, device=x.device).unsqueeze(0)
        cos, sin = self.model.rotary_emb(x, position_ids)
        mask = causal_mask(t, x.device)[None, None]
        for layer in self.model.layers:
            x = layer(x, cos, sin, mask)
        return self.lm_head(self.model.norm(x))


# ---------------------------------------------------------------------------------------------------------------- Phi-2
class PhiAttention(nn.Module):
    def __init__(self, d, h, partial=0.5):
        super().__init__()
        self.num_heads, self.head_dim = h, d // h
        self.rotary_ndims = int(self.head_dim * partial)
        self.q_proj = nn.Linear(d, d)
        self.k_proj = nn.Linear(d, d)
        self.v_proj = nn.Linear(d, d)
        self.dense = nn.Linear(d, d)

    def forward(self, x, cos, sin, mask):
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.num_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.num_heads, self.head_dim).transpose(1, 2)
        r = self.rotary_ndims
        q_rot, q_pass = q[..., :r], q[..., r:]
        k_rot, k_pass = k[..., :r], k[..., r:]
        q_rot, k_rot = apply_rotary_pos_emb(q_rot, k_rot, cos, sin)
        q = torch.cat((q_rot, q_pass), dim=-1)
        k = torch.cat((k_rot, k_pass), dim=-1)
        s = torch.matmul(q.to(torch.float32), k.to(torch.float32).transpose(2, 3)) / math.sqrt(self.head_dim)
        p = F.softmax(s + mask, dim=-1, dtype=torch.float32).to(v.dtype)
        o = torch.matmul(p, v).transpose(1, 2).contiguous().reshape(b, t, -1)
        return self.dense(o)


class PhiMLP(nn.Module):
    def __init__(self, d, f):
        super().__init__()
        self.fc1 = nn.Linear(d, f)
        self.fc2 = nn.Linear(f, d)

    def forward(self, x):
        return self.fc2(gelu_new(self.fc1(x)))


class PhiDecoderLayer(nn.Module):
    def __init__(self, d, h, f):
        super().__init__()
        self.self_attn = PhiAttention(d, h)
        self.mlp = PhiMLP(d, f)
        self.input_layernorm = nn.LayerNorm(d, eps=1e-5)

    def forward(self, x, cos, sin, mask):
        h = self.input_layernorm(x)
        return self.self_attn(h, cos, sin, mask) + self.mlp(h) + x


class PhiModel(nn.Module):
    def __init__(self, vocab, d, layers, h, f):
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab, d)
        self.layers = nn.ModuleList([PhiDecoderLayer(d, h, f) for _ in range(layers)])
        self.final_layernorm = nn.LayerNorm(d, eps=1e-5)
        self.rotary_emb = RotaryEmbedding(int((d // h) * 0.5))


class Phi2(TokenModel):
    def __init__(self, vocab=256, d=128, layers=2, heads=4, ffn=256):
        super().__init__()
        self.vocab = vocab
        self.model = PhiModel(vocab, d, layers, heads, ffn)
        self.lm_head = nn.Linear(d, vocab, bias=True)
        _randomize_norms(self)

    def forward(self, input_ids):
        b, t = input_ids.shape
        x = self.model.embed_tokens(input_ids)
        position_ids = torch.arange(t, device=x.device).unsqueeze(0)
        cos, sin = self.model.rotary_emb(x, position_ids)
        mask = causal_mask(t, x.device)[None, None]
        for layer in self.model.layers:
            x = layer(x, cos, sin, mask)
        return self.lm_head(self.model.final_layernorm(x))


# ---------------------------------------------------------------------------------------------------------------- GPT-NeoX
class GPTNeoXAttention(nn.Module):
    def __init__(self, d, h, rotary_pct=0.25):
        super().__init__()
        self.num_attention_heads, self.head_size = h, d // h
        self.rotary_ndims = int(self.head_size * rotary_pct)
        self.query_key_value = nn.Linear(d, 3 * d)
        self.dense = nn.Linear(d, d)

    def forward(self, x, cos, sin, mask):
        b, t, _ = x.shape
        qkv = self.query_key_value(x)
        qkv = qkv.view(b, t, self.num_attention_heads, 3 * self.head_size).transpose(1, 2)
        q, k, v = qkv.chunk(3, dim=-1)
        r = self.rotary_ndims
        q_rot, k_rot = apply_rotary_pos_emb(q[..., :r], k[..., :r], cos, sin)
        q = torch.cat((q_rot, q[..., r:]), dim=-1)
        k = torch.cat((k_rot, k[..., r:]), dim=-1)
        s = torch.matmul(q, k.transpose(2, 3)) * (self.head_size**-0.5) + mask
        p = F.softmax(s, dim=-1)
        o = torch.matmul(p, v).transpose(1, 2).contiguous().reshape(b, t, -1)
        return self.dense(o)


class GPTNeoXMLP(nn.Module):
    def __init__(self, d, f):
        super().__init__()
        self.dense_h_to_4h = nn.Linear(d, f)
        self.dense_4h_to_h = nn.Linear(f, d)

    def forward(self, x):
        return self.dense_4h_to_h(F.gelu(self.dense_h_to_4h(x)))


class GPTNeoXLayer(nn.Module):
    def __init__(self, d, h, f):
        super().__init__()
        self.input_layernorm = nn.LayerNorm(d)
        self.post_attention_layernorm = nn.LayerNorm(d)
        self.attention = GPTNeoXAttention(d, h)
        self.mlp = GPTNeoXMLP(d, f)

    def forward(self, x, cos, sin, mask):
        a = self.attention(self.input_layernorm(x), cos, sin, mask)
        m = self.mlp(self.post_attention_layernorm(x))
        return m + a + x  # use_parallel_residual


class GPTNeoXModel(nn.Module):
    def __init__(self, vocab, d, layers, h, f):
        super().__init__()
        self.embed_in = nn.Embedding(vocab, d)
        self.layers = nn.ModuleList([GPTNeoXLayer(d, h, f) for _ in range(layers)])
        self.final_layer_norm = nn.LayerNorm(d)
        self.rotary_emb = RotaryEmbedding(int((d // h) * 0.25))


class GPTNeoX(TokenModel):
    def __init__(self, vocab=256, d=128, layers=2, heads=4, ffn=512):
        super().__init__()
        self.vocab = vocab
        self.gpt_neox = GPTNeoXModel(vocab, d, layers, heads, ffn)
        self.embed_out = nn.Linear(d, vocab, bias=False)
        _randomize_norms(self)

    def forward(self, input_ids):
        b, t = input_ids.shape
        x = self.gpt_neox.embed_in(input_ids)
        position_ids = torch.arange(t, device=x.device).unsqueeze(0)
        cos, sin = self.gpt_neox.rotary_emb(x, position_ids)
        mask = causal_mask(t, x.device)[None, None]
        for layer in self.gpt_neox.layers:
            x = layer(x, cos, sin, mask)
        return self.embed_out(self.gpt_neox.final_layer_norm(x))


# ---------------------------------------------------------------------------------------------------------------- OPT
class OPTLearnedPositionalEmbedding(nn.Embedding):
    def __init__(self, num_embeddings, embedding_dim):
        self.offset = 2
        super().__init__(num_embeddings + self.offset, embedding_dim)

    def forward(self, attention_mask):
        attention_mask = attention_mask.long()
        positions = (torch.cumsum(attention_mask, dim=1).type_as(attention_mask) * attention_mask).long() - 1
        return super().forward(positions + self.offset)


class OPTAttention(nn.Module):
    def __init__(self, d, h):
        super().__init__()
        self.num_heads, self.head_dim = h, d // h
        self.scaling = self.head_dim**-0.5
        self.k_proj = nn.Linear(d, d)
        self.v_proj = nn.Linear(d, d)
        self.q_proj = nn.Linear(d, d)
        self.out_proj = nn.Linear(d, d)

    def _shape(self, x, t, b):
        return x.view(b, t, self.num_heads, self.head_dim).transpose(1, 2).contiguous()

    def forward(self, x, mask):
        b, t, d = x.shape
        q = self._shape(self.q_proj(x) * self.scaling, t, b)
        k = self._shape(self.k_proj(x), t, b)
        v = self._shape(self.v_proj(x), t, b)
        s = torch.matmul(q, k.transpose(2, 3)) + mask
        p = F.softmax(s, dim=-1)
        o = torch.matmul(p, v).transpose(1, 2).reshape(b, t, d)
        return self.out_proj(o)


class OPTDecoderLayer(nn.Module):
    def __init__(self, d, h, f):
        super().__init__()
        self.self_attn = OPTAttention(d, h)
        self.self_attn_layer_norm = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, f)
        self.fc2 = nn.Linear(f, d)
        self.final_layer_norm = nn.LayerNorm(d)

    def forward(self, x, mask):
        x = x + self.self_attn(self.self_attn_layer_norm(x), mask)
        return x + self.fc2(F.relu(self.fc1(self.final_layer_norm(x))))


class OPTDecoder(nn.Module):
    def __init__(self, vocab, d, layers, h, f, max_pos=64):
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab, d)
        self.embed_positions = OPTLearnedPositionalEmbedding(max_pos, d)
        self.final_layer_norm = nn.LayerNorm(d)
        self.layers = nn.ModuleList([OPTDecoderLayer(d, h, f) for _ in range(layers)])


class OPTModelWrap(nn.Module):
    def __init__(self, *a):
        super().__init__()
        self.decoder = OPTDecoder(*a)


class OPT(TokenModel):
    input_names = ["input_ids", "attention_mask"]

    def __init__(self, vocab=256, d=128, layers=2, heads=4, ffn=512):
        super().__init__()
        self.vocab = vocab
        self.model = OPTModelWrap(vocab, d, layers, heads, ffn)
        self.lm_head = nn.Linear(d, vocab, bias=False)
        self.lm_head.weight = self.model.decoder.embed_tokens.weight
        _randomize_norms(self)

    def forward(self, input_ids, attention_mask):
        dec = self.model.decoder
        b, t = input_ids.shape
        x = dec.embed_tokens(input_ids) + dec.embed_positions(attention_mask)
        m = causal_mask(t, x.device)[None, None] + (1.0 - attention_mask[:, None, None, :].float()) * -1e9
        for layer in dec.layers:
            x = layer(x, m)
        return self.lm_head(dec.final_layer_norm(x))


# ---------------------------------------------------------------------------------------------------------------- Falcon
class FalconAttention(nn.Module):
    def __init__(self, d, h):
        super().__init__()
        self.num_heads, self.head_dim = h, d // h
        self.query_key_value = nn.Linear(d, d + 2 * self.head_dim, bias=False)  # multi_query
        self.dense = nn.Linear(d, d, bias=False)

    def forward(self, x, cos, sin, mask):
        b, t, _ = x.shape
        fused = self.query_key_value(x).view(b, t, self.num_heads + 2, self.head_dim)
        q, k, v = fused[..., :-2, :], fused[..., [-2], :], fused[..., [-1], :]
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        o = F.scaled_dot_product_attention(q, k.expand(-1, self.num_heads, -1, -1),
                                           v.expand(-1, self.num_heads, -1, -1), attn_mask=mask)
        return self.dense(o.transpose(1, 2).reshape(b, t, -1))


class FalconMLP(nn.Module):
    def __init__(self, d, f):
        super().__init__()
        self.dense_h_to_4h = nn.Linear(d, f, bias=False)
        self.dense_4h_to_h = nn.Linear(f, d, bias=False)

    def forward(self, x):
        return self.dense_4h_to_h(F.gelu(self.dense_h_to_4h(x)))


class FalconDecoderLayer(nn.Module):
    def __init__(self, d, h, f):
        super().__init__()
        self.input_layernorm = nn.LayerNorm(d)
        self.self_attention = FalconAttention(d, h)
        self.mlp = FalconMLP(d, f)

    def forward(self, x, cos, sin, mask):
        h = self.input_layernorm(x)
        return self.mlp(h) + self.self_attention(h, cos, sin, mask) + x


class FalconModel(nn.Module):
    def __init__(self, vocab, d, layers, h, f):
        super().__init__()
        self.word_embeddings = nn.Embedding(vocab, d)
        self.h = nn.ModuleList([FalconDecoderLayer(d, h, f) for _ in range(layers)])
        self.ln_f = nn.LayerNorm(d)
        self.rotary_emb = RotaryEmbedding(d // h)


class Falcon(TokenModel):
    def __init__(self, vocab=256, d=128, layers=2, heads=4, ffn=512):
        super().__init__()
        self.vocab = vocab
        self.transformer = FalconModel(vocab, d, layers, heads, ffn)
        self.lm_head = nn.Linear(d, vocab, bias=False)
        _randomize_norms(self)

    def forward(self, input_ids):
        b, t = input_ids.shape
        x = self.transformer.word_embeddings(input_ids)
        cos, sin = self.transformer.rotary_emb(x, torch.arange(t, device=x.device).unsqueeze(0))
        mask = causal_mask(t, x.device)[None, None]
        for layer in self.transformer.h:
            x = layer(x, cos, sin, mask)
        return self.lm_head(self.transformer.ln_f(x))


# ---------------------------------------------------------------------------------------------------------------- T5 encoder
class T5LayerNorm(nn.Module):
    def __init__(self, d, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))
        self.variance_epsilon = eps

    def forward(self, x):
        variance = x.to(torch.float32).pow(2).mean(-1, keepdim=True)
        x = x * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * x


class T5Attention(nn.Module):
    def __init__(self, d, h, has_relative_attention_bias, num_buckets=32, max_distance=128):
        super().__init__()
        self.n_heads, self.key_value_proj_dim = h, d // h
        self.q = nn.Linear(d, d, bias=False)
        self.k = nn.Linear(d, d, bias=False)
        self.v = nn.Linear(d, d, bias=False)
        self.o = nn.Linear(d, d, bias=False)
        self.has_relative_attention_bias = has_relative_attention_bias
        self.relative_attention_num_buckets, self.relative_attention_max_distance = num_buckets, max_distance
        if has_relative_attention_bias:
            self.relative_attention_bias = nn.Embedding(num_buckets, h)

    @staticmethod
    def _relative_position_bucket(relative_position, bidirectional=True, num_buckets=32, max_distance=128):
        relative_buckets = 0
        if bidirectional:
            num_buckets //= 2
            relative_buckets += (relative_position > 0).to(torch.long) * num_buckets
            relative_position = torch.abs(relative_position)
        else:
            relative_position = -torch.min(relative_position, torch.zeros_like(relative_position))
        max_exact = num_buckets // 2
        is_small = relative_position < max_exact
        relative_position_if_large = max_exact + (
            torch.log(relative_position.float() / max_exact) / math.log(max_distance / max_exact)
            * (num_buckets - max_exact)
        ).to(torch.long)
        relative_position_if_large = torch.min(
            relative_position_if_large, torch.full_like(relative_position_if_large, num_buckets - 1))
        relative_buckets += torch.where(is_small, relative_position, relative_position_if_large)
        return relative_buckets

    def compute_bias(self, q_len, k_len, device):
        context_position = torch.arange(q_len, dtype=torch.long, device=device)[:, None]
        memory_position = torch.arange(k_len, dtype=torch.long, device=device)[None, :]
        relative_position = memory_position - context_position
        bucket = self._relative_position_bucket(relative_position, True, self.relative_attention_num_buckets,
                                                self.relative_attention_max_distance)
        values = self.relative_attention_bias(bucket)
        return values.permute([2, 0, 1]).unsqueeze(0)

    def forward(self, x, mask, position_bias=None):
        b, t, _ = x.shape

        def shape(s):
            return s.view(b, -1, self.n_heads, self.key_value_proj_dim).transpose(1, 2)

        q, k, v = shape(self.q(x)), shape(self.k(x)), shape(self.v(x))
        scores = torch.matmul(q, k.transpose(3, 2))
        if position_bias is None:
            position_bias = self.compute_bias(t, t, x.device) + mask
        scores = scores + position_bias
        attn = F.softmax(scores.float(), dim=-1).type_as(scores)
        o = torch.matmul(attn, v).transpose(1, 2).contiguous().view(b, -1, self.n_heads * self.key_value_proj_dim)
        return self.o(o), position_bias


class T5LayerSelfAttention(nn.Module):
    def __init__(self, d, h, has_bias):
        super().__init__()
        self.SelfAttention = T5Attention(d, h, has_bias)
        self.layer_norm = T5LayerNorm(d)

    def forward(self, x, mask, position_bias=None):
        a, pb = self.SelfAttention(self.layer_norm(x), mask, position_bias)
        return x + a, pb


class T5DenseActDense(nn.Module):
    def __init__(self, d, f):
        super().__init__()
        self.wi = nn.Linear(d, f, bias=False)
        self.wo = nn.Linear(f, d, bias=False)

    def forward(self, x):
        return self.wo(F.relu(self.wi(x)))


class T5LayerFF(nn.Module):
    def __init__(self, d, f):
        super().__init__()
        self.DenseReluDense = T5DenseActDense(d, f)
        self.layer_norm = T5LayerNorm(d)

    def forward(self, x):
        return x + self.DenseReluDense(self.layer_norm(x))


class T5Block(nn.Module):
    def __init__(self, d, h, f, has_bias):
        super().__init__()
        self.layer = nn.ModuleList([T5LayerSelfAttention(d, h, has_bias), T5LayerFF(d, f)])

    def forward(self, x, mask, position_bias=None):
        x, pb = self.layer[0](x, mask, position_bias)
        return self.layer[1](x), pb


class T5Stack(nn.Module):
    def __init__(self, vocab, d, layers, h, f):
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab, d)
        self.block = nn.ModuleList([T5Block(d, h, f, i == 0) for i in range(layers)])
        self.final_layer_norm = T5LayerNorm(d)


class T5Encoder(TokenModel):
    input_names = ["input_ids", "attention_mask"]
    output_names = ["last_hidden_state"]

    def __init__(self, vocab=256, d=128, layers=2, heads=4, ffn=256):
        super().__init__()
        self.vocab = vocab
        self.encoder = T5Stack(vocab, d, layers, heads, ffn)
        _randomize_norms(self)

    def forward(self, input_ids, attention_mask):
        x = self.encoder.embed_tokens(input_ids)
        mask = (1.0 - attention_mask[:, None, None, :].to(x.dtype)) * torch.finfo(x.dtype).min
        pb = None
        for blk in self.encoder.block:
            x, pb = blk(x, mask, pb)
        return self.encoder.final_layer_norm(x)


# ---------------------------------------------------------------------------------------------------------------- ViT
class ViTSelfAttention(nn.Module):
    def __init__(self, d, h):
        super().__init__()
        self.num_attention_heads, self.attention_head_size = h, d // h
        self.query = nn.Linear(d, d)
        self.key = nn.Linear(d, d)
        self.value = nn.Linear(d, d)

    def forward(self, x):
        b, t, _ = x.shape

        def tr(s):
            return s.view(b, t, self.num_attention_heads, self.attention_head_size).permute(0, 2, 1, 3)

        q, k, v = tr(self.query(x)), tr(self.key(x)), tr(self.value(x))
        o = F.scaled_dot_product_attention(q, k, v)
        return o.permute(0, 2, 1, 3).contiguous().view(b, t, -1)


class ViTSelfOutput(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.dense = nn.Linear(d, d)

    def forward(self, x):
        return self.dense(x)


class ViTAttention(nn.Module):
    def __init__(self, d, h):
        super().__init__()
        self.attention = ViTSelfAttention(d, h)
        self.output = ViTSelfOutput(d)

    def forward(self, x):
        return self.output(self.attention(x))


ViTIntermediate = BertIntermediate  # HF's ViTIntermediate is a copy of BertIntermediate (Linear + exact GELU)


class ViTOutput(nn.Module):
    def __init__(self, d, f):
        super().__init__()
        self.dense = nn.Linear(f, d)

    def forward(self, h, x):
        return self.dense(h) + x


class ViTLayer(nn.Module):
    def __init__(self, d, h, f):
        super().__init__()
        self.attention = ViTAttention(d, h)
        self.intermediate = ViTIntermediate(d, f)
        self.output = ViTOutput(d, f)
        self.layernorm_before = nn.LayerNorm(d, eps=1e-12)
        self.layernorm_after = nn.LayerNorm(d, eps=1e-12)

    def forward(self, x):
        x = self.attention(self.layernorm_before(x)) + x
        return self.output(self.intermediate(self.layernorm_after(x)), x)


class ViTPatchEmbeddings(nn.Module):
    def __init__(self, c, d, patch):
        super().__init__()
        self.projection = nn.Conv2d(c, d, kernel_size=patch, stride=patch)

    def forward(self, pixel_values):
        return self.projection(pixel_values).flatten(2).transpose(1, 2)


class ViTEmbeddings(nn.Module):
    def __init__(self, c, d, image, patch):
        super().__init__()
        self.cls_token = nn.Parameter(torch.randn(1, 1, d) * 0.02)
        self.patch_embeddings = ViTPatchEmbeddings(c, d, patch)
        self.position_embeddings = nn.Parameter(torch.randn(1, (image // patch) ** 2 + 1, d) * 0.02)

    def forward(self, pixel_values):
        e = self.patch_embeddings(pixel_values)
        cls = self.cls_token.expand(e.shape[0], -1, -1)
        return torch.cat((cls, e), dim=1) + self.position_embeddings


class ViTEncoder(nn.Module):
    def __init__(self, d, layers, h, f):
        super().__init__()
        self.layer = nn.ModuleList([ViTLayer(d, h, f) for _ in range(layers)])


class ViTModel(nn.Module):
    def __init__(self, c, d, image, patch, layers, h, f):
        super().__init__()
        self.embeddings = ViTEmbeddings(c, d, image, patch)
        self.encoder = ViTEncoder(d, layers, h, f)
        self.layernorm = nn.LayerNorm(d, eps=1e-12)


class ViT(nn.Module):
    input_names = ["pixel_values"]
    output_names = ["logits"]
    dynamic_seq = False

    def __init__(self, channels=3, d=96, image=32, patch=8, layers=2, heads=4, ffn=256, labels=10):
        super().__init__()
        self.channels, self.image = channels, image
        self.vit = ViTModel(channels, d, image, patch, layers, heads, ffn)
        self.classifier = nn.Linear(d, labels)
        _randomize_norms(self)

    def forward(self, pixel_values):
        x = self.vit.embeddings(pixel_values)
        for layer in self.vit.encoder.layer:
            x = layer(x)
        x = self.vit.layernorm(x)
        return self.classifier(x[:, 0, :])

    def example_inputs(self, b=2, t=None, seed=0):
        g = torch.Generator().manual_seed(seed)
        return (torch.randn(b, self.channels, self.image, self.image, generator=g),)


# ---------------------------------------------------------------------------------------------------------------- Whisper encoder
def sinusoids(length, channels, max_timescale=10000):
    log_timescale_increment = np.log(max_timescale) / (channels // 2 - 1)
    inv_timescales = torch.exp(-log_timescale_increment * torch.arange(channels // 2))
    scaled_time = torch.arange(length)[:, np.newaxis] * inv_timescales[np.newaxis, :]
    return torch.cat([scaled_time.sin(), scaled_time.cos()], dim=1)


class WhisperAttention(nn.Module):
    def __init__(self, d, h):
        super().__init__()
        self.num_heads, self.head_dim = h, d // h
        self.scaling = self.head_dim**-0.5
        self.k_proj = nn.Linear(d, d, bias=False)
        self.v_proj = nn.Linear(d, d)
        self.q_proj = nn.Linear(d, d)
        self.out_proj = nn.Linear(d, d)

    def forward(self, x):
        b, t, d = x.shape

        def sh(s):
            return s.view(b, t, self.num_heads, self.head_dim).transpose(1, 2)

        q, k, v = sh(self.q_proj(x) * self.scaling), sh(self.k_proj(x)), sh(self.v_proj(x))
        p = F.softmax(torch.matmul(q, k.transpose(2, 3)), dim=-1)
        return self.out_proj(torch.matmul(p, v).transpose(1, 2).reshape(b, t, d))


class WhisperEncoderLayer(nn.Module):
    def __init__(self, d, h, f):
        super().__init__()
        self.self_attn = WhisperAttention(d, h)
        self.self_attn_layer_norm = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, f)
        self.fc2 = nn.Linear(f, d)
        self.final_layer_norm = nn.LayerNorm(d)

    def forward(self, x):
        x = x + self.self_attn(self.self_attn_layer_norm(x))
        return x + self.fc2(F.gelu(self.fc1(self.final_layer_norm(x))))


class WhisperEncoderStack(nn.Module):
    def __init__(self, mels, d, layers, h, f, max_pos):
        super().__init__()
        self.conv1 = nn.Conv1d(mels, d, kernel_size=3, padding=1)
        self.conv2 = nn.Conv1d(d, d, kernel_size=3, stride=2, padding=1)
        self.embed_positions = nn.Embedding(max_pos, d)
        self.embed_positions.weight.data.copy_(sinusoids(max_pos, d))
        self.embed_positions.requires_grad_(False)
        self.layers = nn.ModuleList([WhisperEncoderLayer(d, h, f) for _ in range(layers)])
        self.layer_norm = nn.LayerNorm(d)


class WhisperEncoder(nn.Module):
    input_names = ["input_features"]
    output_names = ["last_hidden_state"]
    dynamic_seq = False  # Whisper pads features to a fixed length

    def __init__(self, mels=16, d=64, layers=2, heads=4, ffn=256, frames=32):
        super().__init__()
        self.mels, self.frames = mels, frames
        self.encoder = WhisperEncoderStack(mels, d, layers, heads, ffn, frames // 2)
        _randomize_norms(self)

    def forward(self, input_features):
        enc = self.encoder
        x = F.gelu(enc.conv1(input_features))
        x = F.gelu(enc.conv2(x)).permute(0, 2, 1)
        x = x + enc.embed_positions.weight
        for layer in enc.layers:
            x = layer(x)
        return enc.layer_norm(x)

    def example_inputs(self, b=2, t=None, seed=0):
        g = torch.Generator().manual_seed(seed)
        return (torch.randn(b, self.mels, self.frames, generator=g),)


# ---------------------------------------------------------------------------------------------------------------- DistilBERT
class DistilMultiHeadSelfAttention(nn.Module):
    def __init__(self, d, h):
        super().__init__()
        self.n_heads, self.dim = h, d
        self.q_lin = nn.Linear(d, d)
        self.k_lin = nn.Linear(d, d)
        self.v_lin = nn.Linear(d, d)
        self.out_lin = nn.Linear(d, d)

    def forward(self, x, mask):
        bs, q_length, dim = x.shape
        dph = self.dim // self.n_heads
        mask_reshp = (bs, 1, 1, q_length)

        def shape(s):
            return s.view(bs, -1, self.n_heads, dph).transpose(1, 2)

        q, k, v = shape(self.q_lin(x)), shape(self.k_lin(x)), shape(self.v_lin(x))
        q = q / math.sqrt(dph)
        scores = torch.matmul(q, k.transpose(2, 3))
        mask = (mask == 0).view(mask_reshp).expand_as(scores)
        scores = scores.masked_fill(mask, torch.tensor(torch.finfo(scores.dtype).min))
        weights = F.softmax(scores, dim=-1)
        ctx = torch.matmul(weights, v).transpose(1, 2).contiguous().view(bs, -1, self.n_heads * dph)
        return self.out_lin(ctx)


class DistilFFN(nn.Module):
    def __init__(self, d, f):
        super().__init__()
        self.lin1 = nn.Linear(d, f)
        self.lin2 = nn.Linear(f, d)

    def forward(self, x):
        return self.lin2(F.gelu(self.lin1(x)))


class DistilTransformerBlock(nn.Module):
    def __init__(self, d, h, f):
        super().__init__()
        self.attention = DistilMultiHeadSelfAttention(d, h)
        self.sa_layer_norm = nn.LayerNorm(d, eps=1e-12)
        self.ffn = DistilFFN(d, f)
        self.output_layer_norm = nn.LayerNorm(d, eps=1e-12)

    def forward(self, x, mask):
        x = self.sa_layer_norm(self.attention(x, mask) + x)
        return self.output_layer_norm(self.ffn(x) + x)


class DistilEmbeddings(nn.Module):
    def __init__(self, vocab, d, max_pos):
        super().__init__()
        self.word_embeddings = nn.Embedding(vocab, d)
        self.position_embeddings = nn.Embedding(max_pos, d)
        self.LayerNorm = nn.LayerNorm(d, eps=1e-12)

    def forward(self, ids):
        t = ids.shape[1]
        pos = torch.arange(t, dtype=torch.long, device=ids.device).unsqueeze(0).expand_as(ids)
        return self.LayerNorm(self.word_embeddings(ids) + self.position_embeddings(pos))


class DistilTransformer(nn.Module):
    def __init__(self, d, layers, h, f):
        super().__init__()
        self.layer = nn.ModuleList([DistilTransformerBlock(d, h, f) for _ in range(layers)])


class DistilBertModel(nn.Module):
    def __init__(self, vocab, d, layers, h, f, max_pos=64):
        super().__init__()
        self.embeddings = DistilEmbeddings(vocab, d, max_pos)
        self.transformer = DistilTransformer(d, layers, h, f)


class DistilBert(TokenModel):
    """DistilBertForSequenceClassification: pre_classifier(ReLU) + classifier on the first token."""

    input_names = ["input_ids", "attention_mask"]

    def __init__(self, vocab=256, d=128, layers=2, heads=4, ffn=512, labels=3):
        super().__init__()
        self.vocab = vocab
        self.distilbert = DistilBertModel(vocab, d, layers, heads, ffn)
        self.pre_classifier = nn.Linear(d, d)
        self.classifier = nn.Linear(d, labels)
        _randomize_norms(self)

    def forward(self, input_ids, attention_mask):
        x = self.distilbert.embeddings(input_ids)
        for blk in self.distilbert.transformer.layer:
            x = blk(x, attention_mask)
        return self.classifier(F.relu(self.pre_classifier(x[:, 0])))


# ---------------------------------------------------------------------------------------------------------------- CLIP text
class CLIPAttention(nn.Module):
    def __init__(self, d, h):
        super().__init__()
        self.num_heads, self.head_dim = h, d // h
        self.scale = self.head_dim**-0.5
        self.k_proj = nn.Linear(d, d)
        self.v_proj = nn.Linear(d, d)
        self.q_proj = nn.Linear(d, d)
        self.out_proj = nn.Linear(d, d)

    def forward(self, x, mask):
        b, t, d = x.shape

        def sh(s):
            return s.view(b, t, self.num_heads, self.head_dim).transpose(1, 2)

        q, k, v = sh(self.q_proj(x)), sh(self.k_proj(x)), sh(self.v_proj(x))
        w = torch.matmul(q, k.transpose(2, 3)) * self.scale + mask
        o = torch.matmul(F.softmax(w, dim=-1), v).transpose(1, 2).reshape(b, t, d)
        return self.out_proj(o)


class CLIPMLP(nn.Module):
    def __init__(self, d, f):
        super().__init__()
        self.fc1 = nn.Linear(d, f)
        self.fc2 = nn.Linear(f, d)

    def forward(self, x):
        h = self.fc1(x)
        return self.fc2(h * torch.sigmoid(1.702 * h))  # quick_gelu


class CLIPEncoderLayer(nn.Module):
    def __init__(self, d, h, f):
        super().__init__()
        self.self_attn = CLIPAttention(d, h)
        self.layer_norm1 = nn.LayerNorm(d)
        self.mlp = CLIPMLP(d, f)
        self.layer_norm2 = nn.LayerNorm(d)

    def forward(self, x, mask):
        x = x + self.self_attn(self.layer_norm1(x), mask)
        return x + self.mlp(self.layer_norm2(x))


class CLIPTextEmbeddings(nn.Module):
    def __init__(self, vocab, d, max_pos):
        super().__init__()
        self.token_embedding = nn.Embedding(vocab, d)
        self.position_embedding = nn.Embedding(max_pos, d)
        self.register_buffer("position_ids", torch.arange(max_pos).expand((1, -1)), persistent=False)

    def forward(self, ids):
        t = ids.shape[-1]
        return self.token_embedding(ids) + self.position_embedding(self.position_ids[:, :t])


class CLIPEncoder(nn.Module):
    def __init__(self, d, layers, h, f):
        super().__init__()
        self.layers = nn.ModuleList([CLIPEncoderLayer(d, h, f) for _ in range(layers)])


class CLIPTextTransformer(nn.Module):
    def __init__(self, vocab, d, layers, h, f, max_pos=64):
        super().__init__()
        self.embeddings = CLIPTextEmbeddings(vocab, d, max_pos)
        self.encoder = CLIPEncoder(d, layers, h, f)
        self.final_layer_norm = nn.LayerNorm(d)


class CLIPText(TokenModel):
    output_names = ["last_hidden_state"]

    def __init__(self, vocab=256, d=128, layers=2, heads=4, ffn=512):
        super().__init__()
        self.vocab = vocab
        self.text_model = CLIPTextTransformer(vocab, d, layers, heads, ffn)
        _randomize_norms(self)

    def forward(self, input_ids):
        tm = self.text_model
        x = tm.embeddings(input_ids)
        t = input_ids.shape[1]
        mask = causal_mask(t, x.device)[None, None]
        for layer in tm.encoder.layers:
            x = layer(x, mask)
        return tm.final_layer_norm(x)


# ---------------------------------------------------------------------------------------------------------------- registry + export
FAMILIES = {
    "llama_gqa": lambda: LlamaGQA(),
    "mistral_sdpa": lambda: LlamaGQA(sdpa=True, with_mask=True),
    "qwen2": lambda: LlamaGQA(bias=True, heads=4, kv_heads=2),
    "gemma": lambda: Gemma(),
    "phi2": lambda: Phi2(),
    "gptneox": lambda: GPTNeoX(),
    "opt": lambda: OPT(),
    "falcon": lambda: Falcon(),
    "t5enc": lambda: T5Encoder(),
    "vit": lambda: ViT(),
    "whisper_enc": lambda: WhisperEncoder(),
    "distilbert": lambda: DistilBert(),
    "clip_text": lambda: CLIPText(),
    "llama_kv": lambda: LlamaKV(),
    "mixtral_gqa": lambda: LlamaGQA(d=64, heads=4, kv_heads=2, ffn=128, moe={"num_experts": 4, "top_k": 2}),
    # a float16 export (model.half() before export, as optimum --dtype fp16 does): HF RMSNorm upcasts to float32
    "mistral_fp16": lambda: LlamaGQA(sdpa=True, with_mask=True).half(),
}
# Linear layers per family (the number the report must show as compressible): per-layer count x layers + heads
LINEARS = {
    "llama_gqa": 7 * 2 + 1, "mistral_sdpa": 7 * 2 + 1, "qwen2": 7 * 2 + 1, "gemma": 7 * 2 + 1, "phi2": 6 * 2 + 1,
    "gptneox": 4 * 2 + 1, "opt": 6 * 2 + 1, "falcon": 4 * 2 + 1, "t5enc": 6 * 2, "vit": 6 * 2 + 1,
    "whisper_enc": 6 * 2, "distilbert": 6 * 2 + 2, "clip_text": 6 * 2, "llama_kv": 7 * 2 + 1,
    "mixtral_gqa": 4 * 2 + 1 + 2 * (1 + 4 * 3), "mistral_fp16": 7 * 2 + 1,
}
MOE_FAMILIES = {"mixtral_gqa"}


def build(family: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return FAMILIES[family]().eval()


def _dyn_axes(model):
    names = list(model.input_names)
    seq = getattr(model, "dynamic_seq", True)
    axes = {}
    for n in names:
        if n.startswith("past_key_values"):
            axes[n] = {0: "batch", 2: "past"}
        else:
            axes[n] = {0: "batch", 1: "seq"} if seq else {0: "batch"}
    for n in model.output_names:
        if n.startswith("present"):
            axes[n] = {0: "batch", 2: "total"}
        else:
            axes[n] = {0: "batch"}
    return axes


def export(model: nn.Module, path: str, exporter: str, opset: int = 17, dynamic: bool = True) -> str:
    """``torchscript`` (torch.onnx.export dynamo=False), ``dynamo`` (dynamo=True, external .data) or ``pt2``
    (torch.export.save). Batch (and sequence, where the model allows) dynamic."""
    args = model.example_inputs()
    names, outs = list(model.input_names)[: len(args)], list(model.output_names)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        if exporter == "torchscript":
            torch.onnx.export(model, args, path, dynamo=False, opset_version=opset, input_names=names,
                              output_names=outs, dynamic_axes=_dyn_axes(model) if dynamic else None)
            return path
        dyn = None
        if dynamic:
            bdim = torch.export.Dim("batch", min=1, max=64)
            sdim = torch.export.Dim("seq", min=2, max=48)
            seq = getattr(model, "dynamic_seq", True)
            spec = []
            for n in names:
                if n.startswith("past_key_values"):
                    spec.append({0: bdim})
                else:
                    spec.append({0: bdim, 1: sdim} if seq else {0: bdim})
            dyn = tuple(spec)
        if exporter == "dynamo":
            torch.onnx.export(model, args, path, dynamo=True, opset_version=max(opset, 18), input_names=names,
                              output_names=outs, dynamic_shapes=dyn, external_data=True)
        elif exporter == "pt2":
            ep = torch.export.export(model, args, dynamic_shapes=dyn)
            torch.export.save(ep, path)
        else:
            raise ValueError(exporter)
    return path


def feeds(model: nn.Module, b=3, t=12, seed=1) -> dict[str, np.ndarray]:
    args = model.example_inputs(b=b, t=t, seed=seed) if getattr(model, "dynamic_seq", True) else model.example_inputs(b=b, seed=seed)
    return {n: a.numpy() for n, a in zip(model.input_names, args)}


def reference(model: nn.Module, fd: dict[str, np.ndarray]) -> list[np.ndarray]:
    with torch.no_grad():
        out = model(*[torch.from_numpy(fd[n]) for n in model.input_names])
    out = out if isinstance(out, tuple) else (out,)
    return [o.numpy() for o in out]
