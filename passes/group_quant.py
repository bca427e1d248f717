"""Group quantization pass: RTN and GPTQ, GQSA group sparsity, N:M composition, mixed precision (``--auto-bits``).

Every selected Linear weight becomes a :class:`GroupQuant` weight: each group of ``group_size`` consecutive weights
of a row (along the input dimension) is stored as unsigned ``bits``-bit codes ``u`` with an fp16 scale ``s`` and an
integer zero point ``z``; the weight is ``(u - z) · s``. Codes are packed (two int4 per byte).

Quantization grid (one group ``w``):

- asymmetric (default): the range ``[min(w, 0), max(w, 0)]`` is split into ``2^bits - 1`` steps,
  ``s = (max - min) / (2^bits - 1)``, ``z = round(-min / s)`` (an integer, so 0 is represented exactly);
- symmetric (``symmetric: true``): ``z = 2^(bits-1)`` (no zero points stored: MatMulNBits' default),
  ``s = 2·max|w| / (2^bits - 1)`` (GPTQ's symmetric grid).

``s`` is rounded *up* to the next fp16 value, and ``z`` and the codes are computed with that stored scale, so every
weight of the group is within half a step (``s/2``) of its dequantized value -- the analytic bound the tests check.

Methods:

- ``rtn``: round to nearest on that grid (no calibration needed);
- ``gptq`` (Frantar et al., 2023; default): column-by-column OBS sweep with the inverse Hessian of ``H = XᵀX``
  (damped Cholesky, blocks of ``blocksize`` columns, lazy batch updates -- the shared solver
  :func:`sparsec.passes.obs.obs_solve`); a group's scale and zero point are fitted when the sweep reaches the group,
  from the *error-compensated* weights; ``act_order`` processes columns by decreasing ``diag(H)`` (groups stay
  contiguous in the original order: GPTQ's "static groups").

**N:M composition.** A weight already pruned to N:M (an :class:`NMSparse` weight, e.g. ``--nm 2:4 --quant int4``)
keeps its mask; only its kept values are quantized and the result is an ``NMSparse`` whose ``values`` child is a
``GroupQuant`` of shape ``(out, in·n/m)``. Groups run along the *compacted* kept values: a group of ``g`` kept values
covers ``g·m/n`` consecutive original columns (``g`` is a multiple of ``n``, so groups never split an N:M group), which
is also the block of the dense-equivalent layout the ONNX export uses. GPTQ sweeps the original columns with the
mask fixed (pruned entries stay exactly zero, their error being compensated as well).

**GQSA** (Zeng et al., 2024: group quantization + structured group sparsity, ``gqsa: w4s50`` = int4 with 50% of the
groups removed; group size 16 unless ``group_size`` is given). Two stages, as the paper: (1) prune -- the groups whose
removal costs least are removed, the cost of a group ``G`` of row ``i`` being its OBS removal cost
``w_Gᵀ [(H⁻¹)_GG]⁻¹ w_G`` (exact for a whole group), ranked over the whole layer, exactly
``round(sparsity · groups)`` removed, progressively in ``gqsa_rounds`` (8) equal steps: after each step the
remaining weights are compensated by an OBS sweep with the mask so far and the costs recomputed from the compensated
weights (on layer 1 of the golden GPT, 8 steps instead of one cut the layers' pruning errors by 1-40%);
(2) quantize the kept groups with error compensation (GPTQ with the mask fixed; RTN with ``method: rtn``). The
paper's second stage also fine-tunes quantization parameters by gradient descent end to end (E2E-OQP); sparsec
stays training-free and uses the closed-form OBS/GPTQ updates instead. The result is a ``GroupQuant`` with a
``group_mask``: only kept groups' codes, scales and zeros are stored.

**Group size.** Default 128 (GQSA: 16); ``-1`` means one group per row. When the group size does not divide the
length of the rows being grouped (the input dim, or the compacted length for N:M weights), the largest power of two
``>= 16`` that divides it and is not larger is used (kernel- and MatMulNBits-friendly), else the largest divisor; the
layer's report row and a warning say so.

**Mixed precision.** Per-layer ``bits`` / ``group_size`` / ``method`` / ... by name pattern with recipe
``overrides``; and ``auto_bits: B`` (``--auto-bits B``) chooses each layer's bits among ``bits_choices``
(default 2, 3, 4, 8) so that the average storage of the quantized layers -- all their bytes (codes, scales, zeros,
N:M indices) · 8 / their weight count -- stays within ``B`` bits per weight. Sensitivity is measured: one calibration
sweep of the model runs every candidate (RTN) on each layer and records its relative output error on the layer's
calibration inputs; the allocation then minimizes the sum of squared relative errors under the byte budget
(:func:`allocate_bits`, a multiple-choice knapsack solved by dynamic programming: error per byte decides; layers with
``bits`` set by an override are fixed and count against the budget). The choice and the sensitivity table are in the report.

Recipe::

    - type: group_quant
      bits: 4                  # or int4; 8, 4, 3, 2
      group_size: 128
      method: gptq             # rtn | gptq
      symmetric: false
      act_order: false
      damp: 0.01               # GPTQ damping, fraction of mean(diag H)
      exclude: ['lm_head']
      overrides:
        - {match: 'mlp\\.down_proj', bits: 8}
        - {match: 'layers\\.0\\.', skip: true}

    - type: group_quant
      gqsa: w4s50              # GQSA: int4 + 50% of the groups (of 16) removed
      gqsa_rounds: 8           # groups removed progressively in 8 steps, recompensated after each

    - type: group_quant
      auto_bits: 5             # mixed precision under 5 bits/weight on average
"""
from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..compressor.errors import NumericalError, PassError, RecipeError
from ..compressor.formats import Dense, GroupQuant, NMSparse, nm_mask_valid
from ..compressor.ir import Graph, Linear, MoE
from ..compressor.pipeline import Pass, PassContext, Selection, make_row, parse_overrides, parse_params, register_pass, skipped_by
from ..compressor.report import PassReport
from . import _reference
from .obs import inverse_hessian_factor, obs_solve

BITS = (2, 3, 4, 8)
METHODS = ("rtn", "gptq")
DEFAULT_GROUP = 128
DEFAULT_GQSA_GROUP = 16


# ----------------------------------------------------------------------------------------------------------------
# parsing
def parse_bits(value) -> int:
    """``4``, ``"4"``, ``"int4"``, ``"w4"`` -> 4; one of 2, 3, 4, 8."""
    s = str(value).strip().lower()
    for p in ("int", "uint", "w"):
        if s.startswith(p):
            s = s[len(p) :]
            break
    try:
        b = int(s)
    except ValueError:
        raise ValueError(f"bits must be one of {', '.join(map(str, BITS))} (or int8, int4, ...), got {value!r}")
    if b not in BITS:
        raise ValueError(f"bits must be one of {', '.join(map(str, BITS))}, got {b}")
    return b


_GQSA = re.compile(r"^w(\d+)s(\d+(?:\.\d+)?)$")


def parse_gqsa(text) -> tuple[int, float]:
    """``"w4s50"`` -> ``(4, 0.5)``: bits and the share of groups removed."""
    m = _GQSA.match(str(text).strip().lower())
    if not m:
        raise ValueError(f"gqsa must look like w<bits>s<sparsity%> (e.g. w4s50), got {text!r}")
    bits = parse_bits(m.group(1))
    sp = float(m.group(2)) / 100.0
    if not 0 <= sp < 1:
        raise ValueError(f"GQSA sparsity must be in [0, 100), got {m.group(2)}")
    return bits, sp


def choose_group_size(length: int, requested: int, align: int = 1) -> tuple[int, str]:
    """A group size dividing ``length`` (a multiple of ``align``): ``requested`` when it does; otherwise the largest
    power of two >= 16 dividing ``length`` and not larger than ``requested``, else the largest such divisor.
    ``requested == -1``: one group per row. Returns ``(group size, note)``, the note empty when ``requested`` is used."""
    if requested == -1:
        return length, ""
    if length % requested == 0 and requested % align == 0:
        return requested, ""
    divs = [d for d in range(align, min(requested, length) + 1, align) if length % d == 0]
    if not divs:
        divs = [align] if length % align == 0 else [length]
    pow2 = [d for d in divs if d >= 16 and d & (d - 1) == 0]
    g = max(pow2) if pow2 else max(divs)
    return g, f"group size {requested} does not divide {length}: using {g}"


# ----------------------------------------------------------------------------------------------------------------
# the grid
def fp16_ceil(s: np.ndarray) -> np.ndarray:
    """The smallest fp16 values >= ``s`` (float32 result), so that a stored scale never shrinks the grid."""
    s = np.asarray(s, dtype=np.float32)
    h = s.astype(np.float16)
    low = h.astype(np.float32) < s
    if low.any():
        h[low] = np.nextafter(h[low], np.float16(np.inf))
    if not np.isfinite(h).all():
        raise NumericalError("a quantization scale exceeds the fp16 range (weights larger than ~1e6)")
    return h.astype(np.float32)


# fp16 grid underflow: the active grid_tally()s (the pass wraps each layer's quantization in one)
_GRID_TALLIES: list["grid_tally"] = []
COARSE_SCALE = 1.5


class grid_tally:
    """Counts, while active, the quantization groups :func:`grid_params` fits and those whose weights are too small
    for an fp16 scale (below ~1e-6: the smallest fp16 scale, 6e-8, rounds the grid up to >= 1.5x what they want; a
    group under ~3e-8 quantizes to zeros)."""

    def __enter__(self):
        self.groups = self.coarse = 0
        _GRID_TALLIES.append(self)
        return self

    def __exit__(self, *exc):
        _GRID_TALLIES.remove(self)
        return False


def grid_params(w, bits: int, symmetric: bool, keep=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale (fp16-representable, float32) and zero point (float32 integer) per row of ``w`` ``(rows, k)``, from the
    entries where ``keep`` is true (all when None)."""
    w = torch.as_tensor(w).to(torch.float32)
    if keep is not None:
        w = torch.where(torch.as_tensor(keep, device=w.device), w, torch.zeros((), device=w.device))
    maxq = (1 << bits) - 1
    wmin = w.amin(1).clamp(max=0) if w.shape[1] else torch.zeros(w.shape[0], device=w.device)
    wmax = w.amax(1).clamp(min=0) if w.shape[1] else torch.zeros(w.shape[0], device=w.device)
    if symmetric:
        s = 2 * torch.maximum(-wmin, wmax) / maxq
    else:
        s = (wmax - wmin) / maxq
    wanted = s.cpu().numpy()
    nz = wanted > 0
    stored = fp16_ceil(np.where(nz, wanted, np.float32(1)))  # an all-zero group gets scale 1
    if _GRID_TALLIES:
        for t in _GRID_TALLIES:
            t.groups += int(nz.sum())
            t.coarse += int((nz & (stored >= COARSE_SCALE * wanted)).sum())
    s = torch.from_numpy(stored).to(w.device)
    if symmetric:
        z = torch.full_like(s, float(1 << (bits - 1)))
    else:
        z = torch.clamp(torch.round(-wmin / s), 0, maxq)
    return s, z


def quantize_codes(w: torch.Tensor, s: torch.Tensor, z: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes (float tensor of integers) of ``w`` on the grid ``(u - z)·s``; ``s``, ``z`` broadcast against ``w``."""
    return torch.clamp(torch.round(w / s) + z, 0, (1 << bits) - 1)


def rtn_grouped(V: np.ndarray, bits: int, g: int, symmetric: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Round to nearest of ``V`` ``(rows, L)`` in groups of ``g``: codes ``(rows, L)`` uint8, scales and zeros
    ``(rows, L/g)`` (zeros None when symmetric)."""
    rows, L = V.shape
    ng = L // g
    w = torch.from_numpy(np.ascontiguousarray(V, dtype=np.float32)).reshape(rows * ng, g)
    s, z = grid_params(w, bits, symmetric)
    u = quantize_codes(w, s[:, None], z[:, None], bits)
    codes = u.reshape(rows, L).numpy().astype(np.uint8)
    return codes, s.reshape(rows, ng).numpy(), None if symmetric else z.reshape(rows, ng).numpy().astype(np.uint8)


class GroupQuantizer:
    """The quantizer protocol of :func:`obs_solve` (GPTQ): one grid per row and group, fitted when the sweep reaches
    the group; codes are recorded as columns are quantized.

    ``span``: original columns per group (``g·m/n`` for N:M weights, where only the kept entries are fitted)."""

    def __init__(self, rows: int, cols: int, bits: int, span: int, symmetric: bool, device=None):
        self.bits, self.symmetric, self.group_size = bits, symmetric, span
        ng = cols // span
        dev = device or "cpu"
        self.scale = torch.ones(rows, ng, dtype=torch.float32, device=dev)
        self.zero = torch.zeros(rows, ng, dtype=torch.float32, device=dev)
        self.codes = torch.zeros(rows, cols, dtype=torch.uint8, device=dev)

    def fit_group(self, g, cols, w, keep):
        s, z = grid_params(w, self.bits, self.symmetric, keep)
        self.scale[:, g] = s.to(self.scale.device)
        self.zero[:, g] = z.to(self.zero.device)

    def quantize(self, j, col):
        g = j // self.group_size
        s, z = self.scale[:, g].to(col.device), self.zero[:, g].to(col.device)
        u = quantize_codes(col, s, z, self.bits)
        self.codes[:, j] = u.to(torch.uint8).to(self.codes.device)
        return (u - z) * s


# ----------------------------------------------------------------------------------------------------------------
# weight-level API (used by the pass; public for tests and scripts)
def quantize_dense(W: np.ndarray, bits: int, g: int, *, symmetric: bool = False, method: str = "rtn", H=None,
                   act_order: bool = False, damp: float = 0.01, blocksize: int = 128, device=None):  # fmt: skip
    """Quantize a dense ``(out, in)`` weight. Returns ``(GroupQuant, info)``; GPTQ needs ``H = XᵀX``."""
    W = np.asarray(W, dtype=np.float32)
    out, inn = W.shape
    if inn % g:
        raise ValueError(f"group size {g} does not divide the input dim {inn}")
    if method == "rtn":
        codes, s, z = rtn_grouped(W, bits, g, symmetric)
        return GroupQuant.from_codes(codes, s, z, bits, g), {}
    q = GroupQuantizer(out, inn, bits, g, symmetric, device)
    res = obs_solve(W, H, quantize=q, act_order=act_order, damp=damp, blocksize=blocksize, zero_dead=False, device=device)
    gq = GroupQuant.from_codes(q.codes.cpu().numpy(), q.scale.cpu().numpy(), None if symmetric else q.zero.cpu().numpy().astype(np.uint8), bits, g)
    return gq, _obs_info(res)


def quantize_nm(nm: NMSparse, bits: int, g: int, *, symmetric: bool = False, method: str = "rtn", H=None,
                act_order: bool = False, damp: float = 0.01, blocksize: int = 128, device=None):  # fmt: skip
    """Quantize the kept values of an N:M weight (groups of ``g`` along the compacted values, ``g % n == 0``).
    Returns ``(NMSparse with GroupQuant values, info)``; the mask is unchanged."""
    out, inn = nm.shape
    L = inn // nm.m * nm.n
    if L % g or g % nm.n:
        raise ValueError(f"group size {g} must divide the {L} kept values per row and be a multiple of N={nm.n}")
    if method == "rtn":
        codes, s, z = rtn_grouped(nm.values.materialize(), bits, g, symmetric)
        return nm.with_values(GroupQuant.from_codes(codes, s, z, bits, g)), {}
    mask = nm.mask()
    span = g * nm.m // nm.n
    q = GroupQuantizer(out, inn, bits, span, symmetric, device)
    res = obs_solve(nm.materialize(), H, mask=mask, quantize=q, act_order=act_order, damp=damp, blocksize=blocksize,
                    zero_dead=False, device=device)  # fmt: skip
    codes = q.codes.cpu().numpy()[mask].reshape(out, L)
    gq = GroupQuant.from_codes(codes, q.scale.cpu().numpy(), None if symmetric else q.zero.cpu().numpy().astype(np.uint8), bits, g)
    return nm.with_values(gq), _obs_info(res)


def _group_inverse_blocks(H, g: int, damp: float) -> torch.Tensor:
    """``[(H⁻¹)_GG]⁻¹`` for every group ``G`` of ``g`` consecutive inputs, ``(in/g, g, g)``, from the damped ``H``."""
    Ht = torch.as_tensor(np.asarray(H), dtype=torch.float64).clone()
    dead = torch.diagonal(Ht) <= 0
    Ht[dead, dead] = 1.0
    U, _, _ = inverse_hessian_factor(Ht, damp)
    Hinv = U.T @ U  # (H + λI)^-1
    ng = Ht.shape[0] // g
    blocks = torch.stack([Hinv[i * g : (i + 1) * g, i * g : (i + 1) * g] for i in range(ng)])
    return torch.linalg.inv(blocks)


def gqsa_saliency(W: np.ndarray, H, g: int, damp: float = 0.01, blocks: torch.Tensor | None = None) -> np.ndarray:
    """OBS cost of removing each group ``(out, in/g)``: ``w_Gᵀ [(H⁻¹)_GG]⁻¹ w_G`` with the damped inverse Hessian
    (``H`` None: squared group norms)."""
    W64 = torch.from_numpy(np.asarray(W, dtype=np.float64))
    out, inn = W64.shape
    Wg = W64.reshape(out, inn // g, g)
    if H is None:
        return (Wg**2).sum(-1).numpy()
    M = _group_inverse_blocks(H, g, damp) if blocks is None else blocks
    return torch.einsum("oga,gab,ogb->og", Wg, M, Wg).numpy()


def gqsa_mask(W: np.ndarray, H, g: int, sparsity: float, damp: float = 0.01, rounds: int = 1, blocksize: int = 128,
              device=None) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """Keep-mask of groups ``(out, in/g)`` with exactly ``round(sparsity · groups)`` groups removed, and the weight
    compensated for their removal (OBS sweep with that mask; ``W`` itself when ``H`` is None).

    Groups are removed in ``rounds`` equal steps: each step removes the groups with the lowest OBS removal cost,
    computed from the weights as compensated after the previous steps (ties broken by position)."""
    W = np.asarray(W, dtype=np.float32)
    out, inn = W.shape
    ng = inn // g
    total = out * ng
    k = int(round(sparsity * total))
    keep = np.ones(total, dtype=bool)
    if H is None:
        if k:
            keep[np.argsort(gqsa_saliency(W, None, g).reshape(-1), kind="stable")[:k]] = False
        gm = keep.reshape(out, ng)
        return gm, W * np.repeat(gm, g, axis=1)
    blocks = _group_inverse_blocks(H, g, damp)
    cur = W
    rounds = max(1, min(int(rounds), max(k, 1)))
    for r in range(1, rounds + 1):
        need = int(round(k * r / rounds)) - int((~keep).sum())
        if need > 0:
            sal = gqsa_saliency(cur, H, g, blocks=blocks).reshape(-1)
            sal[~keep] = np.inf
            keep[np.argsort(sal, kind="stable")[:need]] = False
        gm = keep.reshape(out, ng)
        cur = obs_solve(W, H, mask=np.repeat(gm, g, axis=1), damp=damp, blocksize=blocksize, zero_dead=False, device=device).weight
    return keep.reshape(out, ng), cur


def quantize_gqsa(W: np.ndarray, bits: int, g: int, sparsity: float, *, symmetric: bool = False, method: str = "gptq",
                  H=None, act_order: bool = False, damp: float = 0.01, blocksize: int = 128, rounds: int = 8,
                  device=None):  # fmt: skip
    """GQSA: remove ``sparsity`` of the groups (stage 1: OBS-ranked in ``rounds`` steps, compensated), quantize the
    kept groups (stage 2: GPTQ or RTN). Returns ``(GroupQuant with group_mask, info)``."""
    W = np.asarray(W, dtype=np.float32)
    out, inn = W.shape
    if inn % g:
        raise ValueError(f"group size {g} does not divide the input dim {inn}")
    gm, W1 = gqsa_mask(W, H, g, sparsity, damp, rounds if H is not None else 1, blocksize, device)
    mask = np.repeat(gm, g, axis=1)
    info: dict[str, Any] = {"groups_removed": int((~gm).sum()), "groups": int(gm.size)}
    if H is not None:
        info["prune_rounds"] = max(1, min(int(rounds), max(info["groups_removed"], 1)))
    if method == "rtn" or H is None:
        codes, s, z = rtn_grouped(W1, bits, g, symmetric)
    else:
        q = GroupQuantizer(out, inn, bits, g, symmetric, device)
        res2 = obs_solve(W1, H, mask=mask, quantize=q, act_order=act_order, damp=damp, blocksize=blocksize,
                         zero_dead=False, device=device)  # fmt: skip
        codes, s = q.codes.cpu().numpy(), q.scale.cpu().numpy()
        z = None if symmetric else q.zero.cpu().numpy().astype(np.uint8)
        info.update(_obs_info(res2))
    return GroupQuant.from_codes(codes, s, z, bits, g, group_mask=gm), info


def _obs_info(res) -> dict[str, Any]:
    d: dict[str, Any] = {"damp": res.damp_used}
    if res.escalations:
        d["escalations"] = res.escalations
    if res.dead:
        d["dead_inputs"] = res.dead
    return d


def _token_shares(names: list[str], stats: dict, expert_of: dict) -> dict[str, float]:
    """Share of a block's tokens that each MoE expert Linear among ``names`` saw in calibration: its token count over
    the tokens entering its MoE layer, taken as the most tokens any non-expert Linear of the block saw, else (a block
    of experts alone) as the experts' counts summed over ``top_k``."""
    dense_n = [stats[n].n for n in names if n not in expert_of and stats[n].n]
    out: dict[str, float] = {}
    for n in names:
        if n not in expert_of:
            continue
        m, _ = expert_of[n]
        if dense_n:
            total = max(dense_n)
        else:
            firsts = [e.linears()[0].name for e in m.experts]
            if not all(f in stats for f in firsts):
                continue
            total = sum(stats[f].n for f in firsts) / max(1, m.top_k)
        if total > 0:
            out[n] = min(1.0, stats[n].n / total)
    return out


def allocate_bits(err: dict[str, dict[int, float]], nbytes: dict[str, dict[int, int]], budget: float) -> dict[str, int]:
    """Bits per layer minimizing ``Σ err[layer][bits]²`` with ``Σ nbytes[layer][bits] <= budget``: a multiple-choice
    knapsack, solved exactly by dynamic programming over whole bytes when the budget is small enough (at most
    ``2e8 / (layers · choices)`` bytes, at least 2000), else over that many equal units of the budget with each layer's
    bytes rounded *up* (so the result always fits); a uniform choice that fits and does better (possible only through
    that rounding) replaces it."""
    names = sorted(err)
    if not names:
        return {}
    # whole bytes when that is cheap enough (exact), else about 2e8 / (layers · choices) units of the budget
    nchoice = max(len(nbytes[n]) for n in names)
    units = int(max(2000, min(1_000_000, 2e8 / (len(names) * nchoice))))
    if budget <= units:
        units, unit = max(int(math.floor(budget + 1e-9)), 0), 1.0
    else:
        unit = budget / units
    INF = float("inf")
    dp = np.full(units + 1, INF)
    dp[0] = 0.0
    picks = []
    for n in names:
        opts = sorted(nbytes[n])
        new = np.full(units + 1, INF)
        arg = np.full(units + 1, -1, dtype=np.int16)
        for k, b in enumerate(opts):
            c = int(math.ceil(nbytes[n][b] / unit - 1e-9))
            if c > units:
                continue
            cand = np.full(units + 1, INF)
            cand[c:] = dp[: units + 1 - c] + err[n][b] ** 2
            better = cand < new
            new[better] = cand[better]
            arg[better] = k
        dp = new
        picks.append((n, opts, arg))
    if not np.isfinite(dp).any():
        cur = {n: min(nbytes[n], key=lambda b: nbytes[n][b]) for n in names}  # nothing fits: the caller refuses
    else:
        cap = int(np.argmin(dp))
        cur = {}
        for n, opts, arg in reversed(picks):
            k = int(arg[cap])
            cur[n] = opts[k]
            cap -= int(math.ceil(nbytes[n][opts[k]] / unit - 1e-9))

    def obj(a):
        return sum(err[n][a[n]] ** 2 for n in names)

    for b in sorted(set.intersection(*(set(nbytes[n]) for n in names))):
        uni = {n: b for n in names}
        if sum(nbytes[n][b] for n in names) <= budget + 1e-9 and obj(uni) < obj(cur):
            cur = uni
    return cur


# ----------------------------------------------------------------------------------------------------------------
# the pass
@dataclass
class LayerConfig:
    """Settings of one layer (pass parameters, then matching overrides in order)."""

    bits: str | None = None
    gqsa: str | None = None
    group_size: int | None = None
    method: str = "gptq"
    symmetric: bool = False
    act_order: bool = False
    damp: float = 0.01
    blocksize: int = 128
    gqsa_rounds: int = 8

    def validate(self):
        self.method = str(self.method).lower()
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}, got {self.method!r}")
        self.sparsity = 0.0
        self.nbits: int | None = None
        if self.gqsa is not None:
            b, self.sparsity = parse_gqsa(self.gqsa)
            if self.bits is not None and parse_bits(self.bits) != b:
                raise ValueError(f"bits {self.bits} contradicts gqsa {self.gqsa}")
            self.nbits = b
        elif self.bits is not None:
            self.nbits = parse_bits(self.bits)
        if self.group_size is None:
            self.group_size = DEFAULT_GQSA_GROUP if self.gqsa is not None else DEFAULT_GROUP
        if self.group_size < 1 and self.group_size != -1:
            raise ValueError(f"group_size must be >= 1 (or -1: one group per row), got {self.group_size}")
        if self.act_order and self.method != "gptq":
            raise ValueError("act_order orders GPTQ's column sweep; it needs method gptq")
        if self.damp < 0:
            raise ValueError("damp must be >= 0")
        if self.blocksize < 1:
            raise ValueError("blocksize must be >= 1")
        if self.gqsa_rounds < 1:
            raise ValueError("gqsa_rounds must be >= 1")


@dataclass
class GroupQuantParams:
    bits: str | None = None
    gqsa: str | None = None
    group_size: int | None = None
    method: str = "gptq"
    symmetric: bool = False
    act_order: bool = False
    auto_bits: float | None = None
    bits_choices: list[Any] = field(default_factory=lambda: list(BITS))
    include: list[str] = field(default_factory=list)
    exclude: list[str] = field(default_factory=list)
    overrides: list[dict] = field(default_factory=list)
    damp: float = 0.01
    blocksize: int = 128
    gqsa_rounds: int = 8
    true_sequential: bool = True

    def validate(self):
        if self.auto_bits is not None:
            if self.bits is not None:
                raise ValueError("give bits or auto_bits, not both (auto_bits chooses the bits per layer)")
            if self.gqsa is not None:
                raise ValueError("auto_bits cannot be combined with gqsa")
            if not self.auto_bits > 0:
                raise ValueError(f"auto_bits must be a positive number of bits per weight, got {self.auto_bits}")
            try:
                self.bits_choices = sorted({parse_bits(b) for b in self.bits_choices})
            except ValueError as e:
                raise ValueError(f"bits_choices: {e}")
            if not self.bits_choices:
                raise ValueError("bits_choices must not be empty")
        elif sorted(map(str, self.bits_choices)) != sorted(map(str, BITS)):
            raise ValueError("bits_choices is the candidate set of auto_bits; give auto_bits too")
        cfg = LayerConfig(self.bits, self.gqsa, self.group_size, self.method, self.symmetric, self.act_order, self.damp, self.blocksize,
                          self.gqsa_rounds)  # fmt: skip
        cfg.validate()
        self.method = cfg.method


_OVERRIDE_KEYS = {"bits", "gqsa", "group_size", "method", "symmetric", "act_order", "damp", "blocksize", "gqsa_rounds"}


@dataclass
class _Plan:
    status: str  # compress | excluded | skipped
    note: str
    cfg: LayerConfig | None = None
    group: int = 0  # group size actually used
    group_note: str = ""
    fixed_bits: bool = True  # False: auto_bits chooses
    sens: dict[int, float] | None = None  # auto_bits: measured error per candidate bits


@register_pass
class GroupQuantize(Pass):
    name = "group_quant"
    aliases = ("quant", "quantize", "gqsa")
    order = 40  # after pruning (30), before low-rank compensation
    Params = GroupQuantParams

    def __init__(self, params=None, where=None):
        super().__init__(params, where)
        p = self.params
        self.overrides = parse_overrides(p.overrides, self.where)
        self._base = {"bits": p.bits, "gqsa": p.gqsa, "group_size": p.group_size, "method": p.method, "symmetric": p.symmetric,
                      "act_order": p.act_order, "damp": p.damp, "blocksize": p.blocksize, "gqsa_rounds": p.gqsa_rounds}  # fmt: skip
        for i, o in enumerate(self.overrides):
            bad = sorted(set(o.params) - _OVERRIDE_KEYS)
            if bad:
                raise RecipeError(f"{self.where}.overrides[{i}]: unknown key(s) {bad}; valid keys: {sorted(_OVERRIDE_KEYS | {'match', 'skip'})}")
            if p.auto_bits is not None and "gqsa" in o.params:
                raise RecipeError(f"{self.where}.overrides[{i}]: gqsa cannot be combined with auto_bits")
            parse_params(LayerConfig, {**self._base, **o.params}, f"{self.where}.overrides[{i}]")
        methods = {p.method} | {str(o.params.get("method", p.method)).lower() for o in self.overrides}
        gqsa = p.gqsa is not None or any(o.params.get("gqsa") is not None for o in self.overrides)
        self.uses_gqsa = gqsa
        self.needs_calibration = methods != {"rtn"} or gqsa or p.auto_bits is not None
        self._done: dict[str, dict[str, Any]] = {}

    def conflicts(self, others):
        if self.uses_gqsa and any(o.name == "nm_prune" for o in others):
            return ("GQSA removes whole groups of weights; combining it with N:M pruning on the same model is not "
                    "supported (use --gqsa or --nm with --quant)")  # fmt: skip
        return None

    # ------------------------------------------------------------------------------------------------------------
    def plan(self, graph: Graph) -> dict[str, _Plan]:
        p = self.params
        decided = Selection(p.include, p.exclude).decide(graph, self.where)
        out: dict[str, _Plan] = {}
        for lin in graph.linears():
            ok, reason = decided[lin.name]
            if not ok:
                out[lin.name] = _Plan("excluded", reason)
                continue
            params = dict(self._base)
            fixed = p.auto_bits is None
            for o in self.overrides:
                if o.match.search(lin.name):
                    params.update(o.params)
                    if "bits" in o.params:
                        fixed = True
            if skipped_by(self.overrides, lin.name):
                out[lin.name] = _Plan("excluded", "skipped by a recipe override")
                continue
            cfg = parse_params(LayerConfig, params, f"{self.where} ({lin.name})")
            if cfg.nbits is None and fixed:
                cfg.nbits = 4
            w = lin.weight
            if isinstance(w, NMSparse) and isinstance(w.values, Dense):
                if cfg.sparsity > 0:
                    out[lin.name] = _Plan("skipped", "GQSA needs a dense weight; this one is N:M sparse", cfg)
                    continue
                length, align = w.values.shape[1], w.n
            else:
                length, align = lin.in_features, 1
            g, note = choose_group_size(length, cfg.group_size, align)
            out[lin.name] = _Plan("compress", "", cfg, g, note, fixed)
        return out

    def requires(self, graph: Graph, ctx: PassContext) -> None:
        super().requires(graph, ctx)
        lins = {l.name: l for l in graph.linears()}
        for name, pl in self.plan(graph).items():
            if pl.status != "compress":
                continue
            w = lins[name].weight
            if isinstance(w, Dense) or (isinstance(w, NMSparse) and isinstance(w.values, Dense)):
                continue
            raise PassError(f"layer '{name}' already has a {w.describe()} weight; group quantization takes dense or N:M "
                            f"weights (quantize before low-rank compensation, or exclude the layer)")  # fmt: skip

    # ------------------------------------------------------------------------------------------------------------
    def run(self, graph: Graph, ctx: PassContext) -> PassReport:
        from sparsec.calibration.sequential import compress_layers
        from sparsec.calibration.shared import SharedUses

        from ._progress import PassProgress

        plan = self.plan(graph)
        rep = PassReport(self.name, params=self.params_dict())
        rows = {}
        for lin in graph.linears():
            pl = plan[lin.name]
            if pl.status != "compress":
                rows[lin.name] = make_row(lin, lin.weight, lin.weight.shape, status=pl.status, note=pl.note)
        todo = {name: pl for name, pl in plan.items() if pl.status == "compress"}
        fallbacks = sorted(name for name, pl in todo.items() if pl.group_note)
        asked = "group_size" in self.raw_params or any("group_size" in o.params for o in self.overrides)
        if fallbacks and asked:  # the default group size adapts quietly (each row's note says so)
            gs = sorted({todo[n].cfg.group_size for n in fallbacks})
            nm = [n for n in fallbacks if isinstance(graph.linear(n).weight, NMSparse)]
            what = ("the width of the kept values (N:M layers: in_features x N / M) " if nm else "the input width ")
            rep.warnings.append(f"group size {', '.join(map(str, gs))} does not divide {what}of {len(fallbacks)} layer(s) "
                                f"({', '.join(fallbacks[:4])}{', ...' if len(fallbacks) > 4 else ''}): smaller groups used there (see their report rows)")  # fmt: skip
        if self.params.auto_bits is not None and todo:
            self._auto_bits(graph, ctx, todo, rep)
        self._done = {}
        # one weight applied by several layers: quantized once (with the same settings: auto-bits may differ)
        shared = SharedUses(graph, todo, key=lambda pl: (pl.cfg, pl.group))
        note = "no calibration data: error not measured" if ctx.calib is None else ""  # RTN only then
        with PassProgress(ctx, "group_quant", len(todo)) as prog:
            compress_layers(graph, ctx, todo, shared, lambda l, f, h, s: self._quantize(l, todo[l.name], f, h, ctx, rep, s, note),
                            rows, self._done, prog, rep.warnings, description="group_quant",
                            true_sequential=self.params.true_sequential)  # fmt: skip
        rep.rows = [rows[l.name] for l in graph.linears() if l.name in rows]
        done = [r for r in rep.rows if r.status == "compressed"]
        if done:
            nweights = sum(r.shape_before[0] * r.shape_before[1] for r in done)
            rep.extra["bits_per_weight"] = 8.0 * sum(r.bytes_after for r in done) / max(1, nweights)
        return rep

    # ------------------------------------------------------------------------------------------------------------
    def _quantize(self, lin: Linear, pl: _Plan, fit, held, ctx: PassContext, rep: PassReport, extra_seconds: float,
                  note: str = ""):  # fmt: skip
        from sparsec.calibration.stats import relative_output_error

        t0 = time.perf_counter()
        cfg = pl.cfg
        bits, g = cfg.nbits, pl.group
        before = lin.weight
        W = before.materialize()
        _reference.remember(ctx, lin)
        method = cfg.method
        notes = [n for n in (note, pl.group_note) if n]
        H = None
        if fit is not None and fit.n > 0:
            H = fit.hessian()
        elif method == "gptq" or cfg.sparsity > 0:
            what = ["RTN"] if method == "gptq" else []
            if cfg.sparsity > 0:
                what.append("groups removed by magnitude")
            notes.append(f"no calibration tokens reached this layer: {' and '.join(what)}")
            method = "rtn"
        extra: dict[str, Any] = {"method": method, "symmetric": cfg.symmetric}
        if cfg.act_order and method == "gptq":
            extra["act_order"] = True
        if fit is not None:
            extra["tokens"] = int(fit.n)
        kw = dict(symmetric=cfg.symmetric, method=method, H=H, act_order=cfg.act_order, damp=cfg.damp, blocksize=cfg.blocksize, device=ctx.device)
        with grid_tally() as tally:
            if cfg.sparsity > 0:
                fmt, info = quantize_gqsa(W, bits, g, cfg.sparsity, rounds=cfg.gqsa_rounds, **kw)
                extra["gqsa"] = cfg.gqsa
                extra["group_sparsity"] = info["groups_removed"] / max(1, info["groups"])
            elif isinstance(before, NMSparse):
                fmt, info = quantize_nm(before, bits, g, **kw)
                extra["nm"] = f"{before.n}:{before.m}"
            else:
                fmt, info = quantize_dense(W, bits, g, **kw)
        extra.update(info)
        if tally.coarse:
            share = tally.coarse / max(1, tally.groups)
            extra["fp16_scale_underflow"] = share
            notes.append(f"{share:.0%} of groups below the fp16 scale range (coarser grid)")
            rep.warnings.append(f"{lin.name}: {share:.0%} of its quantization groups hold weights too small for an fp16 scale "
                                f"(max |w| {np.abs(W).max():.2g}; below ~1e-6 the stored scale is >= {COARSE_SCALE}x what they "
                                f"need, under ~3e-8 they quantize to zeros): its grid is coarser than planned; exclude it "
                                f"(--exclude) or keep it in higher precision")  # fmt: skip
        if info.get("escalations"):
            rep.warnings.append(f"{lin.name}: Cholesky of the damped Hessian failed at damping {cfg.damp:g}; escalated "
                                f"{info['escalations']}x to {info['damp']:g} x mean(diag H)")  # fmt: skip
        W_new = fmt.materialize()
        if not np.isfinite(W_new).all():
            raise PassError(f"layer '{lin.name}': quantization produced NaN or inf")
        lin.weight = fmt
        if "tied_to" in lin.meta:
            notes.append(f"untied from {lin.meta['tied_to']}")
        err = None
        if held is not None and held.n > 0:
            gram = held.gram()
            err = relative_output_error(W, W_new, gram)
            if not isinstance(before, Dense):
                ref = _reference.reference(ctx, lin)
                if ref is not None:
                    extra["error_total"] = relative_output_error(ref, W_new, gram)
        elif ctx.calib is not None and not note:
            notes.append("no held-out tokens reached this layer: error not measured")
        self._done[lin.name] = {"bits": bits, "group": g, "nm": (before.n, before.m, before.mask()) if isinstance(before, NMSparse) else None,
                                "removed": info.get("groups_removed")}  # fmt: skip
        if pl.fixed_bits is False:
            extra["auto_bits"] = True
            if pl.sens:
                errs = "/".join(f"{pl.sens[b]:.3g}" for b in sorted(pl.sens))
                notes.append(f"auto-bits chose {bits} (layer error at {'/'.join(map(str, sorted(pl.sens)))} bits: {errs})")
        secs = time.perf_counter() - t0 + extra_seconds
        return make_row(lin, before, before.shape, error=err, seconds=secs, note="; ".join(notes), extra=extra)

    # ------------------------------------------------------------------------------------------------------------
    def _auto_bits(self, graph: Graph, ctx: PassContext, todo: dict[str, _Plan], rep: PassReport) -> None:
        """Measure each free layer's sensitivity (RTN relative output error per candidate bits on its calibration
        inputs) and choose bits under the average bits/weight budget (greedy: most error reduction per byte)."""
        from sparsec.calibration.sequential import sequential
        from sparsec.calibration.stats import relative_output_error

        budget = float(self.params.auto_bits)
        choices = list(self.params.bits_choices)
        lins = {l.name: l for l in graph.linears()}

        def fmt_for(lin: Linear, pl: _Plan, bits: int):
            w = lin.weight
            if isinstance(w, NMSparse):
                return quantize_nm(w, bits, pl.group, symmetric=pl.cfg.symmetric, method="rtn")[0]
            return quantize_dense(w.materialize(), bits, pl.group, symmetric=pl.cfg.symmetric, method="rtn")[0]

        free = [n for n, pl in todo.items() if not pl.fixed_bits]
        sens: dict[str, dict[int, float]] = {}
        nbytes: dict[str, dict[int, int]] = {}
        for name in free:
            nbytes[name] = {b: fmt_for(lins[name], todo[name], b).nbytes for b in choices}
        fixed_bytes = sum(fmt_for(lins[n], pl, pl.cfg.nbits).nbytes for n, pl in todo.items() if pl.fixed_bits)
        nweights = sum(lins[n].out_features * lins[n].in_features for n in todo)
        cap = budget * nweights / 8.0
        low = fixed_bytes + sum(min(nbytes[n].values()) for n in free)
        if low > cap + 1e-9:
            raise RecipeError(f"--auto-bits {budget:g}: the budget is below the smallest choice ({8 * low / nweights:.3f} bits per weight "
                            f"with every free layer at {min(choices)} bits, scales and zero points included)")  # fmt: skip
        want = set(free)
        # MoE experts serve a share of the tokens: their error is weighted by it (frequently used experts get the bits,
        # as QuantMoE-Bench observes); expert Linear name -> (MoE, expert index)
        expert_of = {lin.name: (m, i) for m in graph.nodes if isinstance(m, MoE) for i, e in enumerate(m.experts) for lin in e.linears()}
        share: dict[str, float] = {}
        if ctx.calib is not None and want:
            for step in sequential(graph, ctx.calib, None, ctx.device, progress=ctx.track, description="group_quant: sensitivity"):
                names = [l.name for l in step.linears() if l.name in want]
                if not names:
                    continue
                stats = step.collect(names)
                share.update(_token_shares(names, stats, expert_of))
                for name in names:
                    W = lins[name].weight.materialize()
                    st = stats[name]
                    sens[name] = {}
                    for b in choices:
                        Wq = fmt_for(lins[name], todo[name], b).materialize()
                        sens[name][b] = relative_output_error(W, Wq, st.gram()) if st.n else float(np.linalg.norm(W - Wq) / max(np.linalg.norm(W), 1e-30))
        for name in free:  # layers no calibration reached: weight-space error
            if name not in sens:
                W = lins[name].weight.materialize()
                sens[name] = {b: float(np.linalg.norm(W - fmt_for(lins[name], todo[name], b).materialize()) / max(np.linalg.norm(W), 1e-30)) for b in choices}
        weighted = {n: {b: e * math.sqrt(share[n]) for b, e in sens[n].items()} if n in share else sens[n] for n in free}
        cur = allocate_bits(weighted, nbytes, cap - fixed_bytes)
        total = fixed_bytes + sum(nbytes[n][cur[n]] for n in free)
        for n in free:
            todo[n].cfg.nbits = cur[n]
            todo[n].sens = sens[n]
        rep.extra["auto_bits"] = {
            "budget_bits_per_weight": budget,
            "achieved_bits_per_weight": 8.0 * total / max(1, nweights),
            "choices": choices,
            "sensitivity_measured_with": "rtn",
            "layers": {n: {"bits": cur[n], "bytes": nbytes[n][cur[n]], "error_by_bits": {str(b): sens[n][b] for b in choices},
                           "bytes_by_bits": {str(b): nbytes[n][b] for b in choices},
                           **({"token_share": share[n]} if n in share else {})} for n in free},  # fmt: skip
            "objective": "sum over layers of (token share x relative output error^2); token share = 1 except MoE experts",
            "fixed": {n: pl.cfg.nbits for n, pl in todo.items() if pl.fixed_bits},
        }

    # ------------------------------------------------------------------------------------------------------------
    def ensures(self, graph: Graph, ctx: PassContext, report: PassReport) -> None:
        lins = {l.name: l for l in graph.linears()}
        for name, d in self._done.items():
            w = lins[name].weight
            gq = w.values if isinstance(w, NMSparse) else w
            if not isinstance(gq, GroupQuant) or gq.bits != d["bits"] or gq.group_size != d["group"]:
                raise PassError(f"layer '{name}' should hold int{d['bits']} groups of {d['group']}, has {w.describe()}")
            if d["nm"] is not None:
                n, m, mask = d["nm"]
                if not isinstance(w, NMSparse) or (w.n, w.m) != (n, m) or not np.array_equal(w.mask(), mask):
                    raise PassError(f"layer '{name}': quantization changed the {n}:{m} sparsity pattern")
                if not nm_mask_valid(w.materialize() != 0, n, m):
                    raise PassError(f"layer '{name}' has a group of {m} with more than {n} nonzeros")
            if d["removed"] is not None:
                gm = gq.group_mask()
                if gm is None or int((~gm).sum()) != d["removed"]:
                    raise PassError(f"layer '{name}': GQSA should have removed {d['removed']} groups")
                if np.abs(w.materialize().reshape(gm.shape[0], gm.shape[1], -1)[~gm]).max(initial=0.0) != 0.0:
                    raise PassError(f"layer '{name}': a removed GQSA group is not zero")
