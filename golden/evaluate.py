"""Honest quality metrics for the golden models, on their held-out splits.

``evaluate_graph_fn(name, fn)`` measures any implementation of a golden model (the torch module, a sparsec graph
run by the executor, a compiled artifact) given as ``fn(x: np.ndarray) -> np.ndarray`` mapping one batch of model
input to output logits:

- GPTs: perplexity on the held-out text, over non-overlapping windows of the context length (each window predicts
  its next ``context_length`` bytes), log-softmax accumulated in float64;
- digits: accuracy on the held-out images.
"""
from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch

from . import data
from .models import _check, config

GPT_BATCH = 16
DIGITS_BATCH = 150


def heldout_windows(name: str, limit: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``(inputs int64 [W, T], targets int64 [W, T])``: non-overlapping windows of the held-out text, T = context
    length, ``targets`` shifted by one byte. At most ``limit`` windows (all by default)."""
    cfg = config(_check(name))
    t = cfg["context_length"]
    _, held = data.text_splits()
    w = (len(held) - 1) // t
    if limit is not None:
        w = min(w, max(0, int(limit)))
    idx = np.arange(w)[:, None] * t + np.arange(t)[None, :]
    held = held.astype(np.int64)
    return held[idx], held[idx + 1]


def _log_softmax64(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def evaluate_graph_fn(name: str, fn: Callable[[np.ndarray], np.ndarray], limit: int | None = None) -> dict:
    """Held-out metric of ``fn`` (one batch of model input -> logits, numpy). ``limit`` caps the number of
    windows (GPTs) or samples (digits)."""
    cfg = config(_check(name))
    if cfg["kind"] in ("llama", "mixtral"):
        x, y = heldout_windows(name, limit)
        if len(x) == 0:
            raise ValueError("no held-out windows to evaluate (limit=0?)")
        nll, count = 0.0, 0
        for s in range(0, len(x), GPT_BATCH):
            xb, yb = x[s : s + GPT_BATCH], y[s : s + GPT_BATCH]
            logits = np.asarray(fn(np.ascontiguousarray(xb)))
            if logits.shape != (*xb.shape, cfg["vocab_size"]):
                raise ValueError(f"expected logits of shape {(*xb.shape, cfg['vocab_size'])}, got {logits.shape}")
            lp = _log_softmax64(logits)
            nll -= float(np.take_along_axis(lp, yb[..., None], axis=-1).sum())
            count += yb.size
        ppl = math.exp(nll / count)
        return {"metric": "perplexity", "value": ppl, "perplexity": ppl, "nll": nll / count, "eval_tokens": int(count),
                "windows": int(len(x)), "split": "heldout"}
    _, _, xte, yte = data.digits_splits()
    if limit is not None:
        xte, yte = xte[: max(0, int(limit))], yte[: max(0, int(limit))]
    if len(xte) == 0:
        raise ValueError("no held-out samples to evaluate (limit=0?)")
    correct = 0
    for s in range(0, len(xte), DIGITS_BATCH):
        logits = np.asarray(fn(np.ascontiguousarray(xte[s : s + DIGITS_BATCH])))
        if logits.shape != (len(xte[s : s + DIGITS_BATCH]), cfg["num_classes"]):
            raise ValueError(f"expected logits of shape ({len(xte[s:s + DIGITS_BATCH])}, {cfg['num_classes']}), "
                             f"got {logits.shape}")
        correct += int((logits.argmax(axis=-1) == yte[s : s + DIGITS_BATCH]).sum())
    acc = correct / len(xte)
    return {"metric": "accuracy", "value": acc, "accuracy": acc, "eval_samples": int(len(xte)), "split": "heldout"}


def module_fn(module: torch.nn.Module) -> Callable[[np.ndarray], np.ndarray]:
    """Wrap a torch module as ``fn(x: np.ndarray) -> np.ndarray`` (no grad, float32 output)."""
    try:
        p = next(module.parameters())
        device = p.device
    except StopIteration:
        device = torch.device("cpu")

    def fn(x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            out = module(torch.from_numpy(np.ascontiguousarray(x)).to(device))
        return out.detach().to(torch.float32).cpu().numpy()

    return fn


def evaluate_module(name: str, module: torch.nn.Module, limit: int | None = None) -> dict:
    """``evaluate_graph_fn`` of a torch module (put in eval mode; restored afterwards)."""
    was_training = module.training
    module.eval()
    try:
        return evaluate_graph_fn(name, module_fn(module), limit=limit)
    finally:
        module.train(was_training)
