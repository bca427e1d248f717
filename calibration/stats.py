"""Statistics collectors, fed by the executor's :class:`Observer` hooks.

- :class:`GramStats`: per Linear, ``H = X^T X`` accumulated in float64 over all tokens, the token count, and the
  per-input-channel L2 norms ``||X_j|| = sqrt(H_jj)`` (Wanda's activation norms);
- :class:`RoutingStats`: per MoE layer, how often each route is selected (top-k aware) and a bounded sample of
  router logits per token (for router-logit similarity);
- :class:`CovarianceStats`: ``sum x x^T`` of chosen values (e.g. the residual stream, for PCA).
"""
from __future__ import annotations

import numpy as np
import torch

from ..compressor.errors import NumericalError
from ..compressor.executor import Observer


class GramStats:
    def __init__(self, dim: int, device=None):
        self.dim = dim
        self.H = torch.zeros(dim, dim, dtype=torch.float64, device=device)
        self.n = 0
        self.sum = torch.zeros(dim, dtype=torch.float64, device=device)

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, self.dim).to(torch.float64)
        s = x.sum(0)
        if x.numel() and not torch.isfinite(s).all():  # a NaN/inf anywhere in x makes its column sum non-finite
            raise NumericalError("calibration activations contain NaN or inf")
        self.H.addmm_(x.T, x)
        self.sum += s
        self.n += x.shape[0]

    def hessian(self) -> np.ndarray:
        """``H / n`` as float64 numpy (the scale SparseGPT/GPTQ use is irrelevant to their solutions)."""
        return (self.H / max(self.n, 1)).cpu().numpy()

    def gram(self) -> np.ndarray:
        return self.H.cpu().numpy()

    def norms(self) -> np.ndarray:
        """Per-input-channel L2 norms of the activations over all tokens."""
        return torch.sqrt(torch.clamp(torch.diagonal(self.H), min=0)).cpu().numpy()


def relative_output_error(w_ref: np.ndarray, w_new: np.ndarray, gram: np.ndarray) -> float:
    """``||(W - W') X^T|| / ||W X^T||`` from the Gram matrix ``X^T X`` (no activations stored)."""
    g = torch.from_numpy(np.asarray(gram, dtype=np.float64, order="C"))
    d = torch.from_numpy(np.asarray(w_ref, dtype=np.float64) - np.asarray(w_new, dtype=np.float64))
    w = torch.from_numpy(np.asarray(w_ref, dtype=np.float64, order="C"))
    num = float(((d @ g) * d).sum())  # trace(D G Dᵀ) with one matmul (einsum over three operands is cubic in C loops)
    den = float(((w @ g) * w).sum())
    if den <= 0:
        return 0.0 if num <= 0 else float("inf")
    return float(np.sqrt(max(num, 0.0) / den))


class LinearStatsObserver(Observer):
    """Collects :class:`GramStats` for a set of Linear layers."""

    def __init__(self, names, dims: dict[str, int], device=None):
        self.names = set(names)
        self.stats = {n: GramStats(dims[n], device) for n in self.names}

    def wants_linear(self, name: str) -> bool:
        return name in self.names

    def linear_input(self, name: str, x: torch.Tensor) -> None:
        self.stats[name].add(x)


class RoutingStats:
    def __init__(self, routes: int, top_k: int, max_logits: int = 4096):
        self.routes = routes
        self.top_k = top_k
        self.counts = np.zeros(routes, dtype=np.int64)
        self.tokens = 0
        self.max_logits = max_logits
        self._logits: list[np.ndarray] = []
        self._kept = 0

    def add(self, logits: torch.Tensor, selected: torch.Tensor) -> None:
        sel = selected.reshape(-1, selected.shape[-1]).cpu()
        self.counts += np.bincount(sel.flatten().numpy(), minlength=self.routes)
        self.tokens += sel.shape[0]
        if self._kept < self.max_logits:
            take = min(self.max_logits - self._kept, logits.shape[0])
            self._logits.append(logits[:take].detach().float().cpu().numpy())
            self._kept += take

    def frequencies(self) -> np.ndarray:
        """Share of tokens routed to each route (top-k aware: each token counts once per selected route)."""
        return self.counts / max(self.tokens, 1)

    def logits(self) -> np.ndarray:
        return np.concatenate(self._logits, 0) if self._logits else np.zeros((0, self.routes), np.float32)


class CovarianceStats:
    def __init__(self, dim: int, device=None):
        self.dim = dim
        self.C = torch.zeros(dim, dim, dtype=torch.float64, device=device)
        self.n = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, self.dim).to(torch.float64)
        self.C.addmm_(x.T, x)
        self.n += x.shape[0]

    def matrix(self) -> np.ndarray:
        return self.C.cpu().numpy()


class CompositeObserver(Observer):
    """Fans out to several observers."""

    def __init__(self, *observers: Observer):
        self.observers = [o for o in observers if o is not None]

    def wants_linear(self, name):
        return any(o.wants_linear(name) for o in self.observers)

    def linear_input(self, name, x):
        for o in self.observers:
            if o.wants_linear(name):
                o.linear_input(name, x)

    def moe_routing(self, name, logits, selected):
        for o in self.observers:
            o.moe_routing(name, logits, selected)

    def wants_values(self):
        s = set()
        for o in self.observers:
            s |= o.wants_values()
        return s

    def value(self, name, t):
        for o in self.observers:
            if name in o.wants_values():
                o.value(name, t)
