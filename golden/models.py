"""sparsec's reference models: small, really trained, written the way HuggingFace writes their big relatives.

- ``tiny-gpt``: byte-level LLaMA-style decoder (RMSNorm, rotary positions, eager causal attention, SwiGLU MLP,
  untied head) trained on the text of Python's ``pydoc_data.topics``.
- ``tiny-moe``: the same with Mixtral-style sparse MoE feed-forward blocks (8 experts, top-2, renormalized).
- ``digits``: a 64-128-64-10 ReLU MLP on scikit-learn's bundled 8x8 digits.

Module names follow HF (``embed_tokens``, ``layers.0.self_attn.q_proj``, ``layers.0.mlp.gate_proj``,
``layers.0.block_sparse_moe.experts.3.w1``, ``norm``, ``lm_head``) so that recipes written with HF-style name
patterns apply unchanged. Every model's ``forward`` takes one tensor and returns one tensor (logits).

Weights are shipped as float16 safetensors next to this file (``<name>.safetensors``) and the recorded held-out
metrics as ``<name>.json``; ``python -m sparsec.golden.train all`` rebuilds both.
"""
from __future__ import annotations

import copy
import json
import math
import os

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

NAMES = ("tiny-gpt", "tiny-moe", "digits")

_HERE = os.path.dirname(os.path.abspath(__file__))

_CONFIGS: dict[str, dict] = {
    "tiny-gpt": {
        "kind": "llama",
        "vocab_size": 256,
        "hidden_size": 128,
        "num_layers": 4,
        "num_heads": 4,
        "intermediate_size": 352,
        "context_length": 128,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
    },
    "tiny-moe": {
        "kind": "mixtral",
        "vocab_size": 256,
        "hidden_size": 128,
        "num_layers": 4,
        "num_heads": 4,
        # per expert; deliberately != hidden_size (fine-grained experts as in Qwen-MoE / OLMoE): with square
        # experts the gate/up/down roles cannot be told apart by shape
        "intermediate_size": 96,
        "num_experts": 8,
        "num_experts_per_tok": 2,
        "context_length": 128,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
    },
    "digits": {
        "kind": "mlp",
        "in_features": 64,
        "hidden_sizes": [128, 64],
        "num_classes": 10,
        "activation": "relu",
    },
}


def _check(name: str) -> str:
    if name not in NAMES:
        raise ValueError(f"unknown golden model {name!r}; expected one of {', '.join(NAMES)}")
    return name


def config(name: str) -> dict:
    """The architecture hyper-parameters of a golden model (a copy)."""
    return copy.deepcopy(_CONFIGS[_check(name)])


# ----------------------------------------------------------------------------------------------------------------
# LLaMA / Mixtral pieces, as HF transformers writes them (eager attention path)
class LlamaRMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden_states.to(input_dtype)


class LlamaRotaryEmbedding(nn.Module):
    def __init__(self, head_dim: int, theta: float = 10000.0):
        super().__init__()
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor):
        inv_freq_expanded = self.inv_freq[None, :, None].float().expand(position_ids.shape[0], -1, 1)
        position_ids_expanded = position_ids[:, None, :].float()
        freqs = (inv_freq_expanded @ position_ids_expanded).transpose(1, 2)
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(x.dtype), emb.sin().to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1 = x[..., : x.shape[-1] // 2]
    x2 = x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim: int = 1):
    cos = cos.unsqueeze(unsqueeze_dim)
    sin = sin.unsqueeze(unsqueeze_dim)
    q_embed = (q * cos) + (rotate_half(q) * sin)
    k_embed = (k * cos) + (rotate_half(k) * sin)
    return q_embed, k_embed


class LlamaAttention(nn.Module):
    def __init__(self, hidden_size: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = hidden_size // num_heads
        self.scaling = self.head_dim ** -0.5
        self.q_proj = nn.Linear(hidden_size, num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(hidden_size, num_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(hidden_size, num_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(num_heads * self.head_dim, hidden_size, bias=False)

    def forward(self, hidden_states, position_embeddings, attention_mask):
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        q = self.q_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        k = self.k_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        v = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        cos, sin = position_embeddings
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        # eager attention: matmul + additive causal mask + softmax (no SDPA, so every exporter handles it)
        attn_weights = torch.matmul(q, k.transpose(2, 3)) * self.scaling
        attn_weights = attn_weights + attention_mask
        attn_weights = F.softmax(attn_weights, dim=-1, dtype=torch.float32).to(q.dtype)
        attn_output = torch.matmul(attn_weights, v)
        attn_output = attn_output.transpose(1, 2).contiguous()
        attn_output = attn_output.reshape(*input_shape, -1).contiguous()
        return self.o_proj(attn_output)


class LlamaMLP(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class MixtralBlockSparseTop2MLP(nn.Module):
    def __init__(self, hidden_size: int, ffn_dim: int):
        super().__init__()
        self.w1 = nn.Linear(hidden_size, ffn_dim, bias=False)
        self.w2 = nn.Linear(ffn_dim, hidden_size, bias=False)
        self.w3 = nn.Linear(hidden_size, ffn_dim, bias=False)

    def forward(self, hidden_states):
        return self.w2(F.silu(self.w1(hidden_states)) * self.w3(hidden_states))


class MixtralSparseMoeBlock(nn.Module):
    """HF Mixtral's block: softmax over experts in float, top-k, renormalize, loop over experts with
    ``torch.where`` on the one-hot expert mask and ``index_add_``. Returns ``(hidden_states, router_logits)``."""

    def __init__(self, hidden_size: int, ffn_dim: int, num_experts: int = 8, top_k: int = 2):
        super().__init__()
        self.hidden_dim = hidden_size
        self.ffn_dim = ffn_dim
        self.num_experts = num_experts
        self.top_k = top_k
        self.gate = nn.Linear(hidden_size, num_experts, bias=False)
        self.experts = nn.ModuleList([MixtralBlockSparseTop2MLP(hidden_size, ffn_dim) for _ in range(num_experts)])

    def forward(self, hidden_states: torch.Tensor):
        batch_size, sequence_length, hidden_dim = hidden_states.shape
        hidden_states = hidden_states.view(-1, hidden_dim)
        router_logits = self.gate(hidden_states)
        routing_weights = F.softmax(router_logits, dim=1, dtype=torch.float)
        routing_weights, selected_experts = torch.topk(routing_weights, self.top_k, dim=-1)
        routing_weights /= routing_weights.sum(dim=-1, keepdim=True)
        routing_weights = routing_weights.to(hidden_states.dtype)
        final_hidden_states = torch.zeros(
            (batch_size * sequence_length, hidden_dim), dtype=hidden_states.dtype, device=hidden_states.device
        )
        expert_mask = F.one_hot(selected_experts, num_classes=self.num_experts).permute(2, 1, 0)
        for expert_idx in range(self.num_experts):
            expert_layer = self.experts[expert_idx]
            idx, top_x = torch.where(expert_mask[expert_idx])
            current_state = hidden_states[None, top_x].reshape(-1, hidden_dim)
            current_hidden_states = expert_layer(current_state) * routing_weights[top_x, idx, None]
            final_hidden_states.index_add_(0, top_x, current_hidden_states.to(hidden_states.dtype))
        final_hidden_states = final_hidden_states.reshape(batch_size, sequence_length, hidden_dim)
        return final_hidden_states, router_logits


class DecoderLayer(nn.Module):
    def __init__(self, cfg: dict):
        super().__init__()
        d = cfg["hidden_size"]
        self.self_attn = LlamaAttention(d, cfg["num_heads"])
        self.is_moe = cfg["kind"] == "mixtral"
        if self.is_moe:
            self.block_sparse_moe = MixtralSparseMoeBlock(
                d, cfg["intermediate_size"], cfg["num_experts"], cfg["num_experts_per_tok"]
            )
        else:
            self.mlp = LlamaMLP(d, cfg["intermediate_size"])
        self.input_layernorm = LlamaRMSNorm(d, cfg["rms_norm_eps"])
        self.post_attention_layernorm = LlamaRMSNorm(d, cfg["rms_norm_eps"])

    def forward(self, hidden_states, position_embeddings, attention_mask):
        residual = hidden_states
        hidden_states = self.input_layernorm(hidden_states)
        hidden_states = self.self_attn(hidden_states, position_embeddings, attention_mask)
        hidden_states = residual + hidden_states
        residual = hidden_states
        hidden_states = self.post_attention_layernorm(hidden_states)
        router_logits = None
        if self.is_moe:
            hidden_states, router_logits = self.block_sparse_moe(hidden_states)
        else:
            hidden_states = self.mlp(hidden_states)
        return residual + hidden_states, router_logits


class TinyLM(nn.Module):
    """Byte-level LLaMA/Mixtral-style causal LM. ``forward(input_ids int64 [B, T]) -> logits float [B, T, V]``
    with ``T <= context_length``."""

    def __init__(self, cfg: dict):
        super().__init__()
        self.config = dict(cfg)
        d, ctx = cfg["hidden_size"], cfg["context_length"]
        self.embed_tokens = nn.Embedding(cfg["vocab_size"], d)
        self.layers = nn.ModuleList([DecoderLayer(cfg) for _ in range(cfg["num_layers"])])
        self.norm = LlamaRMSNorm(d, cfg["rms_norm_eps"])
        self.rotary_emb = LlamaRotaryEmbedding(d // cfg["num_heads"], cfg["rope_theta"])
        self.lm_head = nn.Linear(d, cfg["vocab_size"], bias=False)
        # additive causal mask (0 on and below the diagonal, finfo.min above), sliced to the sequence length
        mask = torch.full((ctx, ctx), torch.finfo(torch.float32).min).triu(1)
        self.register_buffer("causal_mask", mask, persistent=False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self, std: float = 0.02) -> None:
        """HF-style init (normal(0, 0.02), norms at 1) with GPT-2's 1/sqrt(2L) scaling of residual projections."""
        n_layers = self.config["num_layers"]
        for name, p in self.named_parameters():
            if p.dim() == 1:
                p.fill_(1.0)
            elif name.endswith(("o_proj.weight", "down_proj.weight", ".w2.weight")):
                p.normal_(0.0, std / math.sqrt(2 * n_layers))
            else:
                p.normal_(0.0, std)

    def forward_with_router_logits(self, input_ids: torch.Tensor):
        seq_len = input_ids.shape[1]
        hidden_states = self.embed_tokens(input_ids)
        position_ids = torch.arange(seq_len, device=input_ids.device).unsqueeze(0)
        position_embeddings = self.rotary_emb(hidden_states, position_ids)
        attention_mask = self.causal_mask[:seq_len, :seq_len]
        all_router_logits = []
        for layer in self.layers:
            hidden_states, router_logits = layer(hidden_states, position_embeddings, attention_mask)
            if router_logits is not None:
                all_router_logits.append(router_logits)
        hidden_states = self.norm(hidden_states)
        return self.lm_head(hidden_states), all_router_logits

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.forward_with_router_logits(input_ids)[0]


# ----------------------------------------------------------------------------------------------------------------
class DigitsMLP(nn.Module):
    """``forward(x float32 [B, 64] in [0, 1]) -> logits [B, 10]``."""

    def __init__(self, cfg: dict):
        super().__init__()
        self.config = dict(cfg)
        h1, h2 = cfg["hidden_sizes"]
        self.fc1 = nn.Linear(cfg["in_features"], h1)
        self.fc2 = nn.Linear(h1, h2)
        self.fc3 = nn.Linear(h2, cfg["num_classes"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return self.fc3(x)


# ----------------------------------------------------------------------------------------------------------------
def build(name: str) -> nn.Module:
    """The untrained architecture (float32, default init of the current torch RNG state), in train mode."""
    cfg = config(name)
    if cfg["kind"] in ("llama", "mixtral"):
        return TinyLM(cfg)
    return DigitsMLP(cfg)


def weights_path(name: str) -> str:
    return os.path.join(_HERE, f"{_check(name)}.safetensors")


def metrics_path(name: str) -> str:
    return os.path.join(_HERE, f"{_check(name)}.json")


def metrics(name: str) -> dict:
    """The record written by training: config, parameter count, file size, training time and the held-out metric
    (``record["heldout"]``: ``{"metric", "value", ...}`` as ``evaluate_module`` returns it)."""
    path = metrics_path(name)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} is missing; run: python -m sparsec.golden.train {name}")
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def load_weights(module: nn.Module, path: str) -> nn.Module:
    from safetensors.torch import load_file

    state = {k: v.to(torch.float32) for k, v in load_file(path).items()}
    module.load_state_dict(state, strict=True)
    return module


def example_inputs(name: str) -> tuple[torch.Tensor, ...]:
    """Small deterministic inputs: GPTs int64 [2, 16] byte tokens from the training text, digits float32 [4, 64]
    held-out images."""
    from . import data

    if config(name)["kind"] in ("llama", "mixtral"):
        train, _ = data.text_splits()
        rows = [train[0:16], train[4096:4112]]
        return (torch.from_numpy(np.stack(rows).astype(np.int64)),)
    _, _, xte, _ = data.digits_splits()
    return (torch.from_numpy(xte[:4].copy()),)


def load(name: str) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """``(module, example_inputs)``: the trained model in eval mode, float32, fp16-shipped weights loaded."""
    path = weights_path(name)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} is missing; run: python -m sparsec.golden.train {name}")
    module = load_weights(build(name), path).to(torch.float32).eval()
    return module, example_inputs(name)
