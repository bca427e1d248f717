"""Optimal Brain Surgeon machinery shared by SparseGPT (N:M / unstructured pruning) and GPTQ (quantization).

Both solve the layer-wise problem ``min ||W X^T - Ŵ X^T||²`` column by column: each column ``j`` of ``W`` is
replaced by its compressed value (pruned to zero and/or quantized), and the error is spread over the not yet
processed columns with the inverse Hessian ``H^-1`` of ``H = X^T X`` (Frantar & Alistarh, "SparseGPT", 2023;
Frantar et al., "GPTQ", 2023). The implementation follows the reference algorithm:

- ``H`` (float64) gets dead inputs (``H_jj == 0``) replaced by a unit diagonal, then damping
  ``λ = damp · mean(diag H)`` is added; ``H^-1`` comes from a Cholesky factorization, and its upper Cholesky
  factor ``U`` (``H^-1 = Uᵀ U``) drives the sweep. When a factorization fails, ``λ`` is escalated ×10 (at most
  ``max_escalations`` times) and the escalations are reported in the result (passes turn them into warnings);
- columns are processed in blocks of ``blocksize`` (128): inside a block the update is applied eagerly (row
  ``i`` of ``U`` times the column error); the rest of the matrix gets one lazy batch update per block
  (``W[:, i2:] -= Err @ U[i1:i2, i2:]``), a single matmul;
- N:M masks are chosen per group of ``m`` columns when the sweep reaches the group, from the *current*
  (error-compensated) weights with SparseGPT's saliency ``w² / [U]_jj²``: the ``m - n`` least salient of each
  group of ``m`` are pruned in every row.

API
---
``obs_solve(W, H, *, nm=None, mask=None, sparsity=None, quantize=None, blocksize=128, damp=0.01,
act_order=False, zero_dead=True, max_escalations=6, device=None) -> OBSResult``

- ``W``: ``(out, in)`` weight (numpy or torch); ``H``: ``(in, in)`` Gram matrix ``X^T X`` (any positive scale,
  float64 recommended; e.g. ``GramStats.H``).
- ``nm=(n, m)``: prune to N:M along the input dim (keep ``n`` of every ``m``; any ``0 < n < m``; ``in % m == 0``).
- ``mask``: a fixed keep-mask ``(out, in)`` (True = keep): pruned entries are zeroed and compensated, nothing else
  is pruned. A mask of all True reproduces ``W`` exactly (without ``quantize``). This is how GPTQ quantizes an
  already N:M-pruned weight while keeping its zeros.
- ``sparsity``: unstructured SparseGPT, the given fraction pruned per column block (adaptive mask selection).
  ``nm``, ``mask`` and ``sparsity`` are mutually exclusive.
- ``quantize``: GPTQ. Either a callable ``q(j, col) -> dequantized col`` or an object with

  * ``quantize(j, col) -> col``: ``col`` is the current value of column ``j`` (original column index, ``(out,)``
    float32 torch tensor, pruned entries already zero); returns the dequantized value (same shape). The solver
    re-applies the keep-mask afterwards, so the quantizer should represent 0 exactly (integer zero point).
  * optional ``group_size: int | None`` and ``fit_group(g, cols, w, keep)``: called once per quantization group
    ``g`` (columns ``g*group_size .. (g+1)*group_size-1`` in *original* order, i.e. contiguous groups even with
    ``act_order``), right before the first of its columns is quantized, with ``cols`` (LongTensor of original
    column indices), ``w`` the *current, error-compensated, not yet quantized* weights of these columns
    ``(out, len(cols))`` (float32 torch; entries already known to be pruned are zero) and ``keep`` the keep-mask
    of these columns as far as it is known (N:M decisions not yet taken read as True), or None when nothing is
    pruned. Fit the group's scales / zero points there (GPTQ's
    ``find_params``). ``group_size=None`` means one group for all columns (per-channel), fitted at the start.

  With ``nm`` or ``mask`` as well, pruning and quantization happen in the same sweep (SparseGPT's joint mode).
- ``act_order``: process columns in order of decreasing ``diag(H)`` (GPTQ's activation order); not with ``nm`` /
  ``sparsity`` (N:M groups and quantization groups stay contiguous in the original column order).
- ``zero_dead``: inputs that are zero on all calibration tokens get their weights set to zero (as the papers do);
  with False they are kept (and pruned by magnitude in effect).
- ``device``: where the sweep runs (default: ``H``'s device); float32 sweep, float64 factorization.

``OBSResult``: ``weight`` (float32 numpy ``(out, in)``, compressed and compensated, pruned entries exactly 0), ``mask`` (bool keep-mask or
None when nothing was pruned), ``damp_used`` (the final relative damping), ``escalations`` (how often the damping
had to be raised), ``loss`` (the OBS estimate ``Σ (w - q)² / U_jj²``, on ``H``'s scale), ``dead`` (dead
inputs), ``perm`` (column order used, None without ``act_order``).

Lower-level helpers used by passes: :func:`inverse_hessian_factor` (damped, escalating Cholesky),
:func:`nm_mask_from_scores` (keep the ``n`` highest-scoring of every ``m``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

from ..compressor.errors import NumericalError

__all__ = ["OBSResult", "obs_solve", "inverse_hessian_factor", "nm_mask_from_scores", "layer_error"]


@dataclass
class OBSResult:
    weight: np.ndarray
    mask: np.ndarray | None
    damp_used: float
    escalations: int
    loss: float
    dead: int
    perm: np.ndarray | None = None


def _as_tensor(a, dtype, device) -> torch.Tensor:
    if isinstance(a, torch.Tensor):
        return a.detach().to(device=device, dtype=dtype)
    return torch.from_numpy(np.ascontiguousarray(a)).to(device=device, dtype=dtype)


def inverse_hessian_factor(H: torch.Tensor, damp: float = 0.01, max_escalations: int = 6) -> tuple[torch.Tensor, float, int]:
    """Upper Cholesky factor ``U`` of ``(H + λI)^-1`` (float64), ``λ = damp · mean(diag H)``.

    When a factorization fails (``H`` singular or badly conditioned), ``damp`` is multiplied by 10 and tried again,
    at most ``max_escalations`` times. Returns ``(U, damp_used, escalations)``; raises :class:`NumericalError` when
    every try fails or ``H`` is not finite.
    """
    H = H.to(torch.float64)
    if not torch.isfinite(H).all():
        raise NumericalError("the Hessian (X^T X) contains NaN or inf")
    n = H.shape[0]
    mean_diag = float(torch.diagonal(H).mean()) if n else 1.0
    if not mean_diag > 0:
        mean_diag = float(torch.diagonal(H).abs().mean()) if n else 1.0
        mean_diag = mean_diag if mean_diag > 0 else 1.0
    eye = torch.eye(n, dtype=H.dtype, device=H.device)
    d = float(damp)
    if d <= 0:
        d = 0.0
    for attempt in range(max_escalations + 1):
        # With J the reversal permutation and J H J = L Lᵀ: H^-1 = (J L^-1 J)ᵀ (J L^-1 J), and J L^-1 J is upper
        # triangular -- the upper Cholesky factor of H^-1 from one factorization and one triangular inverse.
        Hd = (H + (d * mean_diag) * eye).flip(0, 1)
        L, info = torch.linalg.cholesky_ex(Hd)
        if int(info) == 0:
            U = torch.linalg.solve_triangular(L, eye, upper=False).flip(0, 1)
            if torch.isfinite(U).all() and bool((torch.diagonal(U) > 0).all()):
                return U, d, attempt
        d = d * 10 if d > 0 else 1e-6
    raise NumericalError(f"Cholesky factorization of the damped Hessian failed even with damping {d / 10:g} × mean diag")


def nm_mask_from_scores(scores, n: int, m: int) -> np.ndarray | torch.Tensor:
    """Keep-mask selecting the ``n`` highest scores of every group of ``m`` consecutive entries of each row.

    Ties are broken by position (lower index kept first), so the result is deterministic. Works on numpy arrays
    and torch tensors (returns the same kind)."""
    is_np = not isinstance(scores, torch.Tensor)
    s = torch.from_numpy(np.ascontiguousarray(scores)) if is_np else scores
    rows, cols = s.shape
    if cols % m:
        raise ValueError(f"input dim {cols} is not divisible by M={m}")
    g = s.reshape(rows, cols // m, m)
    # stable descending sort: equal scores keep the lower position first
    idx = torch.sort(-g.to(torch.float64), dim=-1, stable=True).indices[..., :n]
    mk = torch.zeros_like(g, dtype=torch.bool).scatter_(-1, idx, True).reshape(rows, cols)
    return mk.numpy() if is_np else mk


def layer_error(W_ref, W_new, H) -> float:
    """``||(W - W') X^T||_F² `` from the Gram matrix ``H = X^T X`` (float64)."""
    d = _as_tensor(W_ref, torch.float64, "cpu") - _as_tensor(W_new, torch.float64, "cpu")
    Hh = _as_tensor(H, torch.float64, "cpu")
    return float(((d @ Hh) * d).sum())


def obs_solve(W, H, *, nm: tuple[int, int] | None = None, mask=None, sparsity: float | None = None,
              quantize: Any = None, blocksize: int = 128, damp: float = 0.01, act_order: bool = False,
              zero_dead: bool = True, max_escalations: int = 6, device=None) -> OBSResult:  # fmt: skip
    """Compress ``W`` column by column with OBS updates (see the module docstring for the full contract)."""
    if sum(x is not None for x in (nm, mask, sparsity)) > 1:
        raise ValueError("obs_solve: give at most one of nm, mask, sparsity")
    if act_order and (nm is not None or sparsity is not None):
        raise ValueError("obs_solve: act_order cannot be combined with N:M or unstructured mask selection")
    dev = torch.device(device) if device is not None else (H.device if isinstance(H, torch.Tensor) else torch.device("cpu"))
    W = _as_tensor(W, torch.float32, dev).clone()
    rows, cols = W.shape
    H = _as_tensor(H, torch.float64, dev).clone()
    if H.shape != (cols, cols):
        raise ValueError(f"obs_solve: H has shape {tuple(H.shape)}, expected ({cols}, {cols})")
    if not torch.isfinite(W).all():
        raise NumericalError("weight contains NaN or inf")
    if nm is not None:
        n, m = int(nm[0]), int(nm[1])
        if not 0 < n < m:
            raise ValueError(f"N:M needs 0 < N < M, got {n}:{m}")
        if cols % m:
            raise ValueError(f"input dim {cols} is not divisible by M={m}")
        blocksize = max(m, (blocksize // m) * m)
    if sparsity is not None and not 0 <= sparsity < 1:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    keep_fixed = None
    if mask is not None:
        keep_fixed = _as_tensor(mask, torch.bool, dev)
        if keep_fixed.shape != W.shape:
            raise ValueError(f"obs_solve: mask has shape {tuple(keep_fixed.shape)}, expected {tuple(W.shape)}")

    diag = torch.diagonal(H)
    dead = diag <= 0
    ndead = int(dead.sum())
    if ndead:
        H[dead, dead] = 1.0
        if zero_dead:
            W[:, dead] = 0.0

    perm = None
    if act_order:
        perm = torch.sort(-torch.diagonal(H), stable=True).indices
        W = W[:, perm]
        H = H[perm][:, perm]
        if keep_fixed is not None:
            keep_fixed = keep_fixed[:, perm]
    orig_col = perm if perm is not None else torch.arange(cols, device=dev)

    U64, damp_used, escalations = inverse_hessian_factor(H, damp, max_escalations)
    Hinv = U64.to(torch.float32)
    del H, U64

    pruning = nm is not None or sparsity is not None or keep_fixed is not None
    # the sweep works on transposed copies: column j of W is the contiguous row j of Wt
    Wt = W.T.contiguous()
    del W
    keep = None
    if pruning:
        keep = keep_fixed.T.contiguous() if keep_fixed is not None else torch.ones(cols, rows, dtype=torch.bool, device=dev)
    keepf = None if keep is None else keep.to(torch.float32)

    # quantizer protocol
    qfn: Callable | None = None
    group_size = None
    fit_group = None
    if quantize is not None:
        qfn = quantize.quantize if hasattr(quantize, "quantize") else quantize
        fit_group = getattr(quantize, "fit_group", None)
        group_size = getattr(quantize, "group_size", None)
        if fit_group is not None and not group_size:
            group_size = cols
        if group_size is not None and cols % group_size:
            raise ValueError(f"quantization group size {group_size} does not divide the input dim {cols}")
    fitted: set[int] = set()
    pos_of = torch.empty(cols, dtype=torch.long, device=dev)
    pos_of[orig_col] = torch.arange(cols, device=dev)
    orig_list = orig_col.tolist()

    loss = 0.0
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        count = i2 - i1
        W1 = Wt[i1:i2].clone()  # (count, rows), updated eagerly inside the block
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        d1 = torch.diagonal(Hinv1).clone()
        dlist = d1.tolist()
        if sparsity is not None:
            score = W1**2 / d1.reshape(-1, 1) ** 2
            k = int(score.numel() * sparsity)
            if k:
                thresh = torch.sort(score.flatten()).values[k - 1]
                keep[i1:i2] = score > thresh
                keepf[i1:i2] = keep[i1:i2].to(torch.float32)
        for i in range(count):
            j = i1 + i
            if nm is not None and i % m == 0:
                score = W1[i : i + m] ** 2 / d1[i : i + m].reshape(-1, 1) ** 2
                idx = torch.sort(-score, dim=0, stable=True).indices[:n]
                kk = torch.zeros_like(score, dtype=torch.bool).scatter_(0, idx, True)
                keep[j : j + m] = kk
                keepf[j : j + m] = kk.to(torch.float32)
            w = W1[i]
            q = w * keepf[j] if keepf is not None else w
            if qfn is not None:
                oj = orig_list[j]
                if fit_group is not None:
                    g = oj // group_size
                    if g not in fitted:
                        fitted.add(g)
                        gcols = torch.arange(g * group_size, (g + 1) * group_size, device=dev)
                        gpos = pos_of[gcols]
                        cur = _current_columns(gpos, Wt, W1, Err1, Hinv, i1, i2)
                        gk = None if keep is None else keep[gpos].T
                        if gk is not None:
                            cur = cur * gk
                        fit_group(g, gcols, cur, gk)
                q = qfn(oj, q.clone())
                if not isinstance(q, torch.Tensor):
                    q = torch.as_tensor(np.asarray(q), dtype=torch.float32, device=dev)
                q = q.to(torch.float32).reshape(rows)
                if keepf is not None:
                    q = q * keepf[j]
            elif keepf is None:
                continue  # nothing to do for this column (no pruning, no quantization)
            err = (w - q) / dlist[i]
            W1[i:].addmm_(Hinv1[i, i:].unsqueeze(1), err.unsqueeze(0), alpha=-1.0)  # (an outer product; W1[i] -> q)
            W1[i] = q
            Err1[i] = err
        Wt[i1:i2] = W1
        loss += float((Err1.to(torch.float64) ** 2).sum())
        if i2 < cols:
            Wt[i2:] -= Hinv[i1:i2, i2:].T @ Err1

    W = Wt.T
    if keep is not None:
        keep = keep.T
    if perm is not None:
        inv = torch.argsort(perm)
        W = W[:, inv]
        if keep is not None:
            keep = keep[:, inv]
    if not torch.isfinite(W).all():
        raise NumericalError("OBS update produced NaN or inf (the Hessian is too badly conditioned)")
    return OBSResult(
        weight=np.ascontiguousarray(W.cpu().numpy(), dtype=np.float32),
        mask=None if keep is None else np.ascontiguousarray(keep.cpu().numpy()),
        damp_used=float(damp_used),
        escalations=int(escalations),
        loss=loss,
        dead=ndead,
        perm=None if perm is None else perm.cpu().numpy(),
    )


def _current_columns(pos: torch.Tensor, W: torch.Tensor, W1: torch.Tensor, Err1: torch.Tensor, Hinv: torch.Tensor,
                     i1: int, i2: int) -> torch.Tensor:  # fmt: skip
    """Current (error-compensated) values of the columns at sweep positions ``pos`` (none already processed):
    inside the block ``W1`` is up to date; after it, the pending lazy update ``Err1 @ Hinv[i1:i2, p]`` is applied."""
    Wt = W  # transposed layouts: (cols, rows)
    out = torch.empty(pos.numel(), Wt.shape[1], dtype=Wt.dtype, device=Wt.device)
    inside = pos < i2
    if inside.any():
        out[inside] = W1[pos[inside] - i1]
    after = ~inside
    if after.any():
        p = pos[after]
        out[after] = Wt[p] - Hinv[i1:i2][:, p].T @ Err1
    return out.T
