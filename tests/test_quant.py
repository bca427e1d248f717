"""Group quantization: the grid's analytic bound, packing, GPTQ against the published algorithm, N:M composition,
GQSA, mixed precision, ONNX export in onnxruntime, and the CLI end to end.

References are independent of sparsec's code paths: numpy for errors and OBS costs (least squares), a transcription
of GPTQ's published reference loop, onnxruntime for exported models.
"""
from __future__ import annotations

import json
import os

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.numpy import load, save

from sparsec.calibration.data import load_calibration
from sparsec.compressor.errors import PassError, RecipeError
from sparsec.compressor.executor import Executor
from sparsec.compressor.formats import Dense, GroupQuant, LowRank, NMSparse, format_from_spec, nm_mask_valid
from sparsec.compressor.ir import Embedding, Generic, Graph, LayerNorm, Linear, Residual, RMSNorm
from sparsec.compressor.onnx_export import ExportOptions, to_onnx
from sparsec.compressor.onnx_lowerings import blocked
from sparsec.compressor.pipeline import PassContext, PassSpec, Recipe, build_passes, run_passes
from sparsec.passes.group_quant import (
    choose_group_size,
    gqsa_mask,
    gqsa_saliency,
    parse_bits,
    parse_gqsa,
    quantize_dense,
    quantize_gqsa,
    quantize_nm,
)
from sparsec.passes.obs import layer_error

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def correlated_problem(rng, out, inn, tokens=512):
    """Activations with correlated channels of very different scales (as LLM activations have), and a weight."""
    scale = np.exp(rng.standard_normal(inn))
    mix = np.eye(inn) + 0.5 * rng.standard_normal((inn, inn)) / np.sqrt(inn)
    X = (rng.standard_normal((tokens, inn)) @ mix) * scale
    W = rng.standard_normal((out, inn)).astype(np.float32)
    return W, X


def roundtrip(fmt):
    return format_from_spec(fmt.spec("w"), load(save(fmt.to_tensors("w"))))


# ----------------------------------------------------------------------------------------------------------------
# the grid
@settings(max_examples=40, deadline=None)
@given(bits=st.sampled_from([2, 3, 4, 8]), sym=st.booleans(), g=st.sampled_from([8, 16, 32, 64]), rows=st.integers(1, 7),
       groups=st.integers(1, 4), seed=st.integers(0, 2**31 - 1), scale=st.sampled_from([1e-4, 1.0, 300.0]))  # fmt: skip
def test_rtn_error_within_half_a_step(bits, sym, g, rows, groups, seed, scale):
    rng = np.random.default_rng(seed)
    W = (rng.standard_normal((rows, g * groups)) * scale).astype(np.float32)
    W[rng.random(W.shape) < 0.1] = 0.0
    if rng.random() < 0.3:
        W[:, :g] = np.abs(W[:, :g])  # one-signed groups
    gq, _ = quantize_dense(W, bits, g, symmetric=sym)
    deq = gq.materialize()
    step = np.repeat(gq.scales.astype(np.float32), g, axis=1)  # the stored fp16 scale of each element's group
    assert (np.abs(W - deq) <= step / 2 * (1 + 1e-5) + 1e-12).all()
    u = gq.codes()
    assert u.max() < (1 << bits) and gq.symmetric == sym
    # the dequantized value is exactly (u - z) * s with the stored fp16 scale
    z = np.repeat(gq.zero_grid(), g, axis=1)
    np.testing.assert_array_equal(deq, ((u.astype(np.float32) - z) * step).astype(np.float32))
    # zeros stay exactly zero (integer zero point)
    assert (deq[W == 0] == 0).all()


def test_packing_roundtrips_and_bytes():
    rng = np.random.default_rng()
    W = rng.standard_normal((12, 96)).astype(np.float32)
    for bits in (2, 3, 4, 8):
        for sym in (False, True):
            gq, _ = quantize_dense(W, bits, 32, symmetric=sym)
            back = roundtrip(gq)
            np.testing.assert_array_equal(back.codes(), gq.codes())
            np.testing.assert_array_equal(back.materialize(), gq.materialize())
            # codes packed at their width, fp16 scales, zero points counted at their width
            expect = 12 * 96 * bits // 8 + 12 * 3 * 2 + (0 if sym else (12 * 3 * bits + 7) // 8)
            assert gq.nbytes == expect
    nm, _ = quantize_nm(NMSparse.from_dense(W, 2, 4), 4, 16)
    back = roundtrip(nm)
    assert isinstance(back, NMSparse) and isinstance(back.values, GroupQuant)
    np.testing.assert_array_equal(back.materialize(), nm.materialize())
    gs, _ = quantize_gqsa(W, 4, 16, 0.5, method="rtn")
    back = roundtrip(gs)
    np.testing.assert_array_equal(back.group_mask(), gs.group_mask())
    np.testing.assert_array_equal(back.materialize(), gs.materialize())
    # the ONNX exporter's dense-equivalent blocked form dequantizes to the same weight
    for f in (nm, gs, quantize_dense(W, 3, 32)[0]):
        np.testing.assert_allclose(blocked(f).dequantize(), f.materialize(), rtol=0, atol=1e-6)


def test_parsing_and_group_size_fallback():
    assert parse_bits("int4") == 4 and parse_bits(8) == 8 and parse_bits("w3") == 3
    assert parse_gqsa("w4s50") == (4, 0.5) and parse_gqsa("W8S37.5") == (8, 0.375)
    for bad in ("int5", "x"):
        with pytest.raises(ValueError):
            parse_bits(bad)
    for bad in ("w4", "s50", "w4s100", "w5s50"):
        with pytest.raises(ValueError):
            parse_gqsa(bad)
    assert choose_group_size(256, 128) == (128, "")
    g, note = choose_group_size(352, 128)  # 352 = 32 * 11: the largest power of two >= 16 dividing it
    assert g == 32 and "does not divide" in note
    assert choose_group_size(176, 128, align=2)[0] == 16
    assert choose_group_size(64, 128)[0] == 64
    assert choose_group_size(90, 128)[0] == 90  # no power of two >= 16 divides 90: its largest divisor <= 128
    assert choose_group_size(300, -1) == (300, "")


# ----------------------------------------------------------------------------------------------------------------
# GPTQ
def reference_gptq(W, H, bits, groupsize, blocksize=128, percdamp=0.01):
    """GPTQ's published reference loop (Frantar et al. 2023, ``fasterquant`` without act-order), asymmetric, with the
    grid of sparsec (scale rounded up to fp16, zero point computed with that scale)."""
    maxq = 2**bits - 1

    def find_params(x):
        xmin = torch.minimum(x.min(1).values, torch.zeros(1))
        xmax = torch.maximum(x.max(1).values, torch.zeros(1))
        scale = (xmax - xmin) / maxq
        scale[scale == 0] = 1
        h = scale.numpy().astype(np.float16)
        h = np.where(h.astype(np.float32) < scale.numpy(), np.nextafter(h, np.float16(np.inf)), h)
        s16 = torch.from_numpy(h.astype(np.float32))
        zero = torch.round(-xmin / s16)
        return s16, zero

    W = W.clone().float()
    H = H.clone()
    cols = W.shape[1]
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    H[range(cols), range(cols)] += percdamp * torch.mean(torch.diag(H))
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True).float()
    Q = torch.zeros_like(W)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            w, d = W1[:, i], Hinv1[i, i]
            if (i1 + i) % groupsize == 0:
                scale, zero = find_params(W[:, (i1 + i) : (i1 + i + groupsize)])
            q = torch.clamp(torch.round(w / scale) + zero, 0, maxq)
            q = scale * (q - zero)
            Q1[:, i] = q
            err = (w - q) / d
            W1[:, i:] -= err.unsqueeze(1).matmul(Hinv1[i, i:].unsqueeze(0))
            Err1[:, i] = err
        Q[:, i1:i2] = Q1
        W[:, i2:] -= Err1.matmul(Hinv[i1:i2, i2:])
    return Q.numpy()


def test_gptq_matches_published_algorithm():
    """Group size = block size (128): GPTQ's reference fits each group at the start of its block, as sparsec does."""
    rng = np.random.default_rng()
    W, X = correlated_problem(rng, 24, 256)
    H = X.T @ X
    ours, _ = quantize_dense(W, 4, 128, method="gptq", H=H)
    ref = reference_gptq(torch.from_numpy(W), torch.from_numpy(H), 4, 128)
    d = ours.materialize() - ref
    step = np.repeat(ours.scales.astype(np.float32), 128, axis=1)
    # equal up to float rounding; a rare tie can flip one code by one step
    assert (np.abs(d) <= 1e-4 * step + 1e-6).mean() > 0.995
    assert layer_error(W, ours.materialize(), H) == pytest.approx(layer_error(W, ref, H), rel=2e-2)


@pytest.mark.parametrize("bits", [3, 4, 8])
def test_gptq_layer_error_le_rtn(bits):
    """GPTQ's layer error ||(W - Q) X^T|| against round-to-nearest on the same groups. GPTQ is greedy, so a single
    random instance can come out slightly worse (1 of 1800 measured, by 1.6%, at 3 bits; this test failed on such
    draws now and then): each case within 5% of RTN, and all cases together clearly better (median ratio 0.63)."""
    rng = np.random.default_rng()
    ratios = []
    for trial in range(2):
        W, X = correlated_problem(rng, 32, 128)
        H = X.T @ X
        for sym in (False, True):
            rtn, _ = quantize_dense(W, bits, 32, symmetric=sym)
            e_rtn = layer_error(W, rtn.materialize(), H)
            for act_order in (False, True):
                gp, _ = quantize_dense(W, bits, 32, symmetric=sym, method="gptq", H=H, act_order=act_order)
                ratios.append(layer_error(W, gp.materialize(), H) / e_rtn)
                assert ratios[-1] <= 1.05, (bits, sym, act_order, ratios[-1])
                assert gp.bits == bits and gp.group_size == 32 and gp.symmetric == sym
    assert float(np.mean(ratios)) <= 0.9, (bits, ratios)


def test_nm_composition_quantizes_kept_values_only():
    rng = np.random.default_rng()
    W, X = correlated_problem(rng, 16, 128)
    H = X.T @ X
    nm = NMSparse.from_dense(W, 2, 4)
    for method in ("rtn", "gptq"):
        q, _ = quantize_nm(nm, 4, 32, method=method, H=H)
        assert isinstance(q, NMSparse) and isinstance(q.values, GroupQuant)
        assert q.values.shape == (16, 64) and q.values.group_size == 32
        np.testing.assert_array_equal(q.mask(), nm.mask())
        assert nm_mask_valid(q.materialize() != 0, 2, 4)
        assert q.nbytes < nm.nbytes
    # RTN rounds the kept values themselves (half a step); GPTQ compensates and beats it in output error (summed over
    # a few problems: on a single small problem GPTQ loses now and then, about 1 in 150)
    e_rtn = e_gptq = 0.0
    for trial in range(3):
        if trial:
            W, X = correlated_problem(rng, 16, 128)
            H = X.T @ X
            nm = NMSparse.from_dense(W, 2, 4)
        rtn, _ = quantize_nm(nm, 4, 32)
        gp, _ = quantize_nm(nm, 4, 32, method="gptq", H=H)
        step = np.repeat(rtn.values.scales.astype(np.float32), 32, axis=1)
        assert (np.abs(rtn.values.materialize() - nm.values.materialize()) <= step / 2 * (1 + 1e-5)).all()
        e_rtn += layer_error(nm.materialize(), rtn.materialize(), H) / layer_error(nm.materialize(), 0 * W, H)
        e_gptq += layer_error(nm.materialize(), gp.materialize(), H) / layer_error(nm.materialize(), 0 * W, H)
    assert e_gptq < e_rtn
    with pytest.raises(ValueError):
        quantize_nm(nm, 4, 31)


# ----------------------------------------------------------------------------------------------------------------
# GQSA
def test_gqsa_saliency_is_the_obs_cost_of_removing_a_group():
    """Least squares: the output error left when a group is zeroed and the rest of the row re-fitted optimally."""
    rng = np.random.default_rng()
    W, X = correlated_problem(rng, 3, 32, tokens=200)
    H = X.T @ X
    g = 8
    sal = gqsa_saliency(W, H, g, damp=0.0)
    for i in range(3):
        for G in range(4):
            keep = np.ones(32, bool)
            keep[G * g : (G + 1) * g] = False
            coef, *_ = np.linalg.lstsq(X[:, keep], X @ W[i].astype(np.float64), rcond=None)
            resid = X @ W[i] - X[:, keep] @ coef
            assert sal[i, G] == pytest.approx(float(resid @ resid), rel=1e-5)


@pytest.mark.parametrize("sparsity", [0.25, 0.5, 0.3])
def test_gqsa_removes_exactly_the_requested_share(sparsity):
    rng = np.random.default_rng()
    W, X = correlated_problem(rng, 20, 96)
    H = X.T @ X
    for method in ("rtn", "gptq"):
        q, info = quantize_gqsa(W, 4, 16, sparsity, method=method, H=H)
        gm = q.group_mask()
        assert gm.shape == (20, 6)
        assert int((~gm).sum()) == round(sparsity * 120) == info["groups_removed"]
        w = q.materialize().reshape(20, 6, 16)
        assert not w[~gm].any() and q.kept_groups() == gm.sum()
        assert q.codes_packed.shape[0] == gm.sum()  # only kept groups stored


def test_gqsa_selection_and_compensation():
    rng = np.random.default_rng()
    W, X = correlated_problem(rng, 20, 96)
    H = X.T @ X
    # one-step selection removes the cheapest groups: every removed group costs at most every kept one
    sal = gqsa_saliency(W, H, 16)
    gm, W1 = gqsa_mask(W, H, 16, 0.5, rounds=1)
    assert sal[~gm].max() <= sal[gm].min()
    assert not W1[np.repeat(~gm, 16, axis=1)].any()
    # progressive selection (8 steps, recompensated) prunes with less output error than one step: on these random
    # problems by 1.4% on average (sd 0.9%; worse on 4% of them, over 200), so the sum is over twelve (its sd ~0.26%);
    # on real layers by 1-40%
    one = eight = 0.0
    for trial in range(12):
        Wt, Xt = correlated_problem(rng, 64, 96)
        Ht = Xt.T @ Xt
        gm1, W1t = gqsa_mask(Wt, Ht, 16, 0.5, rounds=1)
        gm8, W8t = gqsa_mask(Wt, Ht, 16, 0.5, rounds=8)
        assert int((~gm8).sum()) == int((~gm1).sum()) == 192
        one += layer_error(Wt, W1t, Ht) / layer_error(Wt, 0 * Wt, Ht)
        eight += layer_error(Wt, W8t, Ht) / layer_error(Wt, 0 * Wt, Ht)
    assert eight < one
    # stage 2 compensates: GQSA's output error is below zeroing the same groups and rounding the rest
    q, _ = quantize_gqsa(W, 4, 16, 0.5, H=H)
    naive, _ = quantize_dense(W * np.repeat(q.group_mask(), 16, axis=1), 4, 16)
    assert layer_error(W, q.materialize(), H) < layer_error(W, naive.materialize(), H)


# ----------------------------------------------------------------------------------------------------------------
# the pass on a raised graph
def raised_graph(rng, d=32, h=64, layers=2, vocab=50, down_in=None):
    """A small LLaMA-like stack of raised ops: per block q/k (same input) -> o -> up -> down, residual."""
    g = Graph("raised")
    g.inputs = ["ids"]
    g.add_value("ids", "int64", ("B", "T"))

    def W(o, i):
        return (rng.standard_normal((o, i)) / np.sqrt(i)).astype(np.float32)

    g.add_node(Embedding("embed", ["ids"], ["x0"], table=rng.standard_normal((vocab, d)).astype(np.float32), meta={"module": "embed"}))
    g.add_value("x0", "float32", ("B", "T", d))
    x = "x0"
    for layer in range(layers):
        p = f"layers.{layer}."

        def V(name, dim):
            g.add_value(p + name, "float32", ("B", "T", dim))
            return p + name

        def add(n):
            n.meta["module"] = p + n.name.split(".")[-1]
            g.add_node(n)

        hh = down_in or h
        add(RMSNorm(p + "norm", [x], [V("xn", d)], weight=(rng.random(d) + 0.5).astype(np.float32)))
        add(Linear(p + "q", [p + "xn"], [V("q", d)], weight=Dense(W(d, d))))
        add(Linear(p + "k", [p + "xn"], [V("k", d)], weight=Dense(W(d, d)), bias=rng.standard_normal(d).astype(np.float32)))
        add(Residual(p + "qk", [p + "q", p + "k"], [V("s", d)]))
        add(Linear(p + "o", [p + "s"], [V("o", d)], weight=Dense(W(d, d))))
        add(Linear(p + "up", [p + "o"], [V("u", hh)], weight=Dense(W(hh, d))))
        add(Linear(p + "down", [p + "u"], [V("dn", d)], weight=Dense(W(d, hh))))
        add(Residual(p + "res", [x, p + "dn"], [V("r", d)]))
        x = p + "r"
    g.add_node(LayerNorm("norm", [x], ["xf"], weight=np.ones(d, np.float32), bias=np.zeros(d, np.float32), meta={"module": "norm"}))
    g.add_value("xf", "float32", ("B", "T", d))
    g.add_node(Linear("lm_head", ["xf"], ["logits"], weight=Dense(W(vocab, d)), meta={"module": "lm_head"}))
    g.add_value("logits", "float32", ("B", "T", vocab))
    g.outputs = ["logits"]
    g.validate()
    return g


def run_recipe(g, passes, samples=24, seq_len=16, seed=0, heldout=0.25):
    r = Recipe(seed=seed, passes=[PassSpec(t, p) for t, p in passes])
    fit, held = load_calibration(g, None, samples=samples, seq_len=seq_len, seed=seed, heldout=heldout)
    ctx = PassContext(r, calib=fit, heldout=held, original=g.copy())
    reps = run_passes(g, build_passes(r), ctx)
    return reps, ctx


def test_pass_quantizes_all_but_head_with_fallback_and_overrides():
    rng = np.random.default_rng()
    g = raised_graph(rng, d=64, h=96)  # 96 = 32 * 3: group 64 does not divide down's input dim
    params = {"bits": "int4", "group_size": 64, "method": "gptq",
              "overrides": [{"match": r"layers\.1\.up", "bits": 8, "method": "rtn"}, {"match": r"layers\.0\.o", "skip": True}]}  # fmt: skip
    (rep,), _ = run_recipe(g, [("group_quant", params)])
    rows = {r.name: r for r in rep.rows}
    assert rows["lm_head"].status == "excluded" and rows["layers.0.o"].status == "excluded"
    assert isinstance(g.linear("lm_head").weight, Dense)
    assert rows["layers.0.q"].format_after == "int4g64a" and rows["layers.0.q"].bits == 4 and rows["layers.0.q"].group_size == 64
    assert rows["layers.0.down"].group_size == 32 and "does not divide" in rows["layers.0.down"].note
    assert any("does not divide the input width" in w for w in rep.warnings)
    # after 2:4 the groups divide the kept values' width (d / 2 = 32 for d = 64): the warning says which width
    g2 = raised_graph(rng, d=64, h=128)
    (_, rep2), _ = run_recipe(g2, [("nm_prune", {"nm": "2:4", "method": "magnitude"}), ("group_quant", {"bits": "int4", "group_size": 64})])
    assert any("kept values" in w and "layers.0.q" in w for w in rep2.warnings), rep2.warnings
    # the default group size (128, not asked for) adapts without a warning: the rows' notes say so
    g3 = raised_graph(rng, d=64, h=96)
    (rep3,), _ = run_recipe(g3, [("group_quant", {"bits": "int4"})])
    assert not any("does not divide" in w for w in rep3.warnings), rep3.warnings
    assert all("does not divide" in r.note for r in rep3.rows if r.status == "compressed")
    up1 = rows["layers.1.up"]
    assert up1.bits == 8 and up1.extra["method"] == "rtn" and up1.error < rows["layers.0.up"].error
    for r in rep.rows:
        if r.status == "compressed":
            assert 0 < r.error < 0.2 and r.bytes_after < r.bytes_before / 3.5
    assert rep.totals["compressed"] == 9
    assert 4 < rep.extra["bits_per_weight"] < 5.5


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_weights_too_small_for_an_fp16_scale_are_reported(method):
    """A layer whose weights are below what an fp16 scale resolves (scales under the smallest fp16 subnormal round up
    to it: a coarser grid, all zeros for |w| < ~3e-8) gets a warning and a note on its row with the share of groups;
    layers of normal size do not."""
    rng = np.random.default_rng()
    g = raised_graph(rng, d=64, h=96)
    tiny = g.linear("layers.1.up")
    tiny.weight = Dense((tiny.weight.materialize() * float(rng.uniform(1e-8, 1e-7))).astype(np.float32))
    (rep,), _ = run_recipe(g, [("group_quant", {"bits": "int4", "group_size": 32, "method": method})])
    rows = {r.name: r for r in rep.rows}
    assert rows["layers.1.up"].extra["fp16_scale_underflow"] > 0.9 and "fp16 scale" in rows["layers.1.up"].note
    warned = [w for w in rep.warnings if "fp16 scale" in w]
    assert len(warned) == 1 and warned[0].startswith("layers.1.up:")
    assert rows["layers.1.up"].error > 0.3  # what the warning is about: the grid is too coarse for these weights
    for name, r in rows.items():
        if name != "layers.1.up" and r.status == "compressed":
            assert "fp16_scale_underflow" not in r.extra and r.error < 0.2


def test_pass_after_nm_prune_reports_total_error():
    rng = np.random.default_rng()
    g = raised_graph(rng)
    (pr, qr), ctx = run_recipe(g, [("nm_prune", {"nm": "2:4"}), ("group_quant", {"bits": 4, "group_size": 16})])
    for lin in g.linears():
        if lin.name == "lm_head":
            continue
        assert isinstance(lin.weight, NMSparse) and isinstance(lin.weight.values, GroupQuant)
        row = next(r for r in qr.rows if r.name == lin.name)
        assert row.format_before == "2:4" and row.format_after == "2:4·int4g16a"
        prune_err = next(r for r in pr.rows if r.name == lin.name).error
        assert row.extra["error_total"] > row.error and row.extra["error_total"] >= 0.5 * prune_err


def test_gqsa_pass_and_refusals():
    rng = np.random.default_rng()
    g = raised_graph(rng, layers=1)
    (rep,), _ = run_recipe(g, [("group_quant", {"gqsa": "w4s50"})])
    for r in rep.rows:
        if r.status == "compressed":
            assert r.group_size == 16 and r.extra["group_sparsity"] == 0.5 and r.format_after == "int4g16as50"
    with pytest.raises(RecipeError, match="N:M"):
        build_passes(Recipe(passes=[PassSpec("nm_prune", {"nm": "2:4"}), PassSpec("group_quant", {"gqsa": "w4s50"})]))
    for bad in ({"bits": 5}, {"gqsa": "w4"}, {"bits": 4, "auto_bits": 4}, {"method": "awq"}, {"group_size": 0},
                {"overrides": [{"match": "q", "rank": 3}]}, {"bits": 8, "gqsa": "w4s50"}, {"method": "rtn", "act_order": True},
                {"bits_choices": [4, 8]}):  # fmt: skip
        with pytest.raises(RecipeError):
            build_passes(Recipe(passes=[PassSpec("group_quant", bad)]))
    # a quantized weight cannot be quantized again
    with pytest.raises(PassError, match="already has"):
        run_recipe(g, [("group_quant", {"bits": 4})])


def test_auto_bits_respects_the_budget_and_follows_sensitivity():
    rng = np.random.default_rng()
    g = raised_graph(rng, d=64, h=128)
    for lin in g.linears():  # heavy-tailed weights in some layers: more sensitive to low bit widths
        if lin.name.endswith(".up"):
            lin.weight = Dense((rng.standard_t(1.5, lin.weight.shape) / 8).astype(np.float32))
    (rep,), _ = run_recipe(g, [("group_quant", {"auto_bits": 5.5, "method": "rtn", "group_size": 32,
                                               "overrides": [{"match": r"layers\.0\.q$", "bits": 8}]})])  # fmt: skip
    ab = rep.extra["auto_bits"]
    done = [r for r in rep.rows if r.status == "compressed"]
    nweights = sum(r.shape_before[0] * r.shape_before[1] for r in done)
    achieved = 8 * sum(r.bytes_after for r in done) / nweights
    assert achieved <= 5.5 + 1e-9 and ab["achieved_bits_per_weight"] == pytest.approx(achieved)
    assert achieved > 5.0  # the budget is used
    bits = {r.name: r.bits for r in done}
    assert bits["layers.0.q"] == 8 and ab["fixed"] == {"layers.0.q": 8}
    assert len({b for n, b in bits.items() if n != "layers.0.q"}) > 1  # mixed
    # the allocation beats every uniform choice that fits the budget, in the objective it minimizes
    layers = ab["layers"]

    def objective(choice):
        return sum(layers[n]["error_by_bits"][str(choice(n))] ** 2 for n in layers)

    fixed_bytes = next(r.bytes_after for r in done if r.name == "layers.0.q")
    for b in (2, 3, 4, 8):
        total = fixed_bytes + sum(d["bytes_by_bits"][str(b)] for d in layers.values())
        if 8 * total / nweights <= 5.5:
            assert objective(lambda n: bits[n]) <= objective(lambda n: b) + 1e-12, b
    assert objective(lambda n: bits[n]) < objective(lambda n: 4)  # int4 g32 (4.625 bits/weight) fits: spending the rest helps
    for name, d in ab["layers"].items():
        errs = [d["error_by_bits"][str(b)] for b in (2, 3, 4, 8)]
        assert errs == sorted(errs, reverse=True)
    with pytest.raises(RecipeError, match="below the smallest"):
        run_recipe(raised_graph(rng, layers=1), [("group_quant", {"auto_bits": 1.5})])


def test_allocate_bits_against_exhaustive_search():
    import itertools

    from sparsec.passes.group_quant import allocate_bits

    rng = np.random.default_rng()
    worst = 1.0
    for trial in range(60):
        L = int(rng.integers(1, 6))
        names = [f"l{i}" for i in range(L)]
        size = {n: int(rng.integers(50, 400)) for n in names}
        nbytes = {n: {b: size[n] * b + int(rng.integers(0, 30)) for b in (2, 3, 4, 8)} for n in names}
        base = {n: rng.random() * 2 for n in names}
        err = {n: {b: base[n] * 2.0 ** (-b * rng.uniform(0.6, 1.4)) for b in (2, 3, 4, 8)} for n in names}
        lo = sum(nbytes[n][2] for n in names)
        hi = sum(nbytes[n][8] for n in names)
        budget = lo + rng.random() * (hi - lo)
        a = allocate_bits(err, nbytes, budget)
        assert sum(nbytes[n][a[n]] for n in names) <= budget + 1e-9
        best = min(sum(err[n][b] ** 2 for n, b in zip(names, combo))
                   for combo in itertools.product((2, 3, 4, 8), repeat=L)
                   if sum(nbytes[n][b] for n, b in zip(names, combo)) <= budget)  # fmt: skip
        got = sum(err[n][a[n]] ** 2 for n in names)
        worst = max(worst, got / best)
    assert worst < 1 + 1e-9, worst  # small budgets: exact


def test_deterministic():
    rng = np.random.default_rng()
    g = raised_graph(rng, layers=1)
    outs = []
    for _ in range(2):
        gg = g.copy()
        run_recipe(gg, [("group_quant", {"bits": 4, "group_size": 16, "act_order": True}), ("lowrank", {"rank": 4})], seed=5)
        outs.append([l.weight.to_tensors("w") for l in gg.linears()])
    for a, b in zip(*outs):
        assert a.keys() == b.keys()
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])


# ----------------------------------------------------------------------------------------------------------------
# ONNX export
def one_linear_graph(fmt, opset=18, bias=True, extra_reduce=False, seed=0):
    rng = np.random.default_rng(seed)
    out, inn = fmt.shape
    g = Graph("t")
    g.inputs = ["x"]
    g.add_value("x", "float32", ("B", "T", inn))
    src = "x"
    if extra_reduce:  # a ReduceMean with an axes attribute: its meaning changes at opset 18
        g.add_node(Generic("rm", ["x"], ["m"], op_type="ReduceMean", attributes={"axes": [-1], "keepdims": 1}, attr_types={"axes": "INTS", "keepdims": "INT"}))
        g.add_value("m", "float32", ("B", "T", 1))
        g.add_node(Generic("sub", ["x", "m"], ["xc"], op_type="Sub"))
        g.add_value("xc", "float32", ("B", "T", inn))
        src = "xc"
    g.add_node(Linear("lin", [src], ["y"], weight=fmt, bias=rng.standard_normal(out).astype(np.float32) if bias else None))
    g.add_value("y", "float32", ("B", "T", out))
    g.outputs = ["y"]
    g.opset = {"": opset}
    g.validate()
    return g


def ort_vs_executor(g, seed=None):
    import onnxruntime as ort

    m = to_onnx(g, ExportOptions(weights="native"))
    sess = ort.InferenceSession(m.SerializeToString(deterministic=True), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((2, 5, g.values["x"].shape[-1])).astype(np.float32)
    got = sess.run(None, {"x": x})[0]
    ref = Executor(g).run({"x": x})["y"]
    ops = [n.op_type for n in m.graph.node]
    return float(np.linalg.norm(got - ref) / np.linalg.norm(ref)), ops, m.opset_import[0].version, m


def test_onnx_int4_matmulnbits():
    rng = np.random.default_rng()
    W, X = correlated_problem(rng, 40, 128)
    for sym in (False, True):
        for bias in (False, True):
            gq, _ = quantize_dense(W, 4, 32, symmetric=sym, method="gptq", H=X.T @ X)
            err, ops, opset, m = ort_vs_executor(one_linear_graph(gq, bias=bias))
            assert err < 1e-5 and "MatMulNBits" in ops and "DequantizeLinear" not in ops and opset == 18
            q = next(i for i in m.graph.initializer if i.name.endswith("qweight"))
            assert bytes(q.raw_data) == gq.codes_packed.tobytes()  # the same bytes as the artifact's codes
            assert any(i.name.endswith("zero_points") for i in m.graph.initializer) != sym


def test_onnx_int8_dequantizelinear_blocked_and_per_axis():
    rng = np.random.default_rng()
    W = rng.standard_normal((24, 96)).astype(np.float32)
    for bits, sym in ((8, False), (8, True), (3, False), (4, True)):
        gq, _ = quantize_dense(W, bits, 32 if bits != 4 else 8, symmetric=sym)  # int4 g8: not a MatMulNBits block
        err, ops, opset, m = ort_vs_executor(one_linear_graph(gq, opset=17))
        assert err < 1e-5 and "DequantizeLinear" in ops and opset == 21, (bits, sym, ops)
        dq = next(n for n in m.graph.node if n.op_type == "DequantizeLinear")
        assert {a.name: a.i for a in dq.attribute}["block_size"] == gq.group_size
        # a graph whose generic ops changed at opset 18 (ReduceMean's axes attribute -> input) is converted to 21 (it
        # kept opset 17 and a per-axis DequantizeLinear of the expanded scales)
        err, ops, opset, m = ort_vs_executor(one_linear_graph(gq, opset=17, extra_reduce=True))
        assert err < 1e-5 and "DequantizeLinear" in ops and opset == 21, (bits, sym, ops)
        rm = next(n for n in m.graph.node if n.op_type == "ReduceMean")
        assert len(rm.input) == 2 and not [a for a in rm.attribute if a.name == "axes"]


def test_onnx_nm_int4_gqsa_and_lowrank():
    rng = np.random.default_rng()
    W, X = correlated_problem(rng, 32, 128)
    H = X.T @ X
    nmq, _ = quantize_nm(NMSparse.from_dense(W, 2, 4), 4, 32, method="gptq", H=H)
    err, ops, opset, _ = ort_vs_executor(one_linear_graph(nmq))
    assert err < 1e-5 and "MatMulNBits" in ops and opset == 18
    gs, _ = quantize_gqsa(W, 4, 16, 0.5, H=H)
    err, ops, _, _ = ort_vs_executor(one_linear_graph(gs))
    assert err < 1e-5 and "MatMulNBits" in ops
    nm8, _ = quantize_nm(NMSparse.from_dense(W, 2, 4), 8, 32)
    err, ops, opset, _ = ort_vs_executor(one_linear_graph(nm8))
    assert err < 1e-5 and "DequantizeLinear" in ops and opset == 21
    for dt in (np.float16, np.float32):
        lr = LowRank(nmq, (rng.standard_normal((32, 6)) * 0.1).astype(dt), (rng.standard_normal((6, 128)) * 0.1).astype(dt))
        err, ops, _, _ = ort_vs_executor(one_linear_graph(lr))
        assert err < 1e-5 and "MatMulNBits" in ops and ops.count("MatMul") == 2


# ----------------------------------------------------------------------------------------------------------------
# the CLI end to end on an exported model
def sparsec_inproc(monkeypatch, capsys, *args):
    """The CLI in this process, with the backend build stubbed out (tested elsewhere; it costs seconds)."""
    import sparsec.backends.build as bb
    from sparsec.cli.main import main

    monkeypatch.setattr(bb, "build", lambda graph, target, recipe=None, console=None: ({"status": "not built (test)"}, None))
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in args])
    out = capsys.readouterr()
    return e.value.code, out.out, out.err


@pytest.fixture(scope="module")
def llama_onnx(tmp_path_factory):
    from . import models as tm

    model = tm.build("llama")
    path = tmp_path_factory.mktemp("llama") / "llama.onnx"
    tm.export_onnx(model, str(path), "torchscript", 17)
    return model, path


def _artifact_matches_ort(out, feeds):
    import onnxruntime as ort

    from sparsec.compressor.artifact import load_artifact

    a = load_artifact(out)
    sess = ort.InferenceSession(str(a.onnx_path), providers=["CPUExecutionProvider"])
    got = sess.run(None, feeds)
    ref = Executor(a.graph).run(feeds)
    for o, r in zip(sess.get_outputs(), got):
        assert np.linalg.norm(r - ref[o.name]) / np.linalg.norm(ref[o.name]) < 1e-3
    return a


CLI_CASES = {
    "gptq": ["--quant", "int4", "--group-size", "32", "--quant-method", "gptq"],
    "nm_eora": ["--nm", "2:4", "--quant", "int4", "--compensate", "eora", "--rank", "8"],
    "gqsa": ["--gqsa", "w4s50"],
    "auto_bits": ["--auto-bits", "5"],
}


@pytest.mark.parametrize("case", sorted(CLI_CASES))
def test_cli_end_to_end(case, llama_onnx, tmp_path, monkeypatch, capsys):
    from . import models as tm

    model, path = llama_onnx
    out = tmp_path / "out"
    code, stdout, err = sparsec_inproc(monkeypatch, capsys, "compress", path, *CLI_CASES[case], "--seq-len", "16",
                                       "--calib-samples", "24", "-o", out, "--json")  # fmt: skip
    assert code == 0, err
    doc = json.loads(stdout)
    q = doc["quality"]
    assert q["onnx_vs_executor_rel_error"] < 1e-3 and 0 < q["output_rel_error"] < 0.6
    passes = {p["name"]: p for p in doc["passes"]}
    gq = passes["group_quant"]
    assert gq["totals"]["compressed"] == 14  # 2 blocks x 7 Linear layers; lm_head left dense
    rows = [r for r in gq["rows"] if r["status"] == "compressed"]
    if case == "gptq":
        assert all(r["format_after"] == "int4g32a" and r["extra"]["method"] == "gptq" for r in rows)
    elif case == "nm_eora":
        # default group 128 falls back to what divides the 32 / 64 kept values per row
        assert {r["format_after"] for r in rows} == {"2:4·int4g32a", "2:4·int4g64a"}
        lr = [r for r in passes["lowrank"]["rows"] if r["status"] == "compressed"]
        assert len(lr) == 14 and all(r["format_after"].endswith("+lr8") for r in lr)
        assert all(r["error"] < r["error_before"] for r in lr)
    elif case == "gqsa":
        assert all(r["format_after"] == "int4g16as50" and r["extra"]["group_sparsity"] == 0.5 for r in rows)
    else:
        ab = gq["extra"]["auto_bits"]
        assert ab["achieved_bits_per_weight"] <= 5 and ab["budget_bits_per_weight"] == 5
        assert {r["bits"] for r in rows} <= {2, 3, 4, 8}
    feeds = tm.feeds_for(model, b=2, t=9, seed=int(np.random.default_rng().integers(1 << 30)))
    _artifact_matches_ort(out, feeds)


@pytest.mark.parametrize("src_opset", [11, 13])
def test_quantized_export_upgrades_the_source_ops_it_raises_the_opset_over(src_opset, tmp_path):
    """Blocked DequantizeLinear raises model.onnx to opset 21; the model's own ops were copied as they were, so a
    ``Split`` without sizes (TorchScript's ``chunk`` / ``F.glu``: opset 18 needs ``num_outputs``), ``ReduceMean`` with an
    ``axes`` attribute (an input from 18) or an opset-11 ``Unsqueeze`` gave a model.onnx onnxruntime refused to load,
    with exit 0 (and `run --engine onnx` exit 70). Now they are converted: the artifact's model.onnx loads and matches
    onnxruntime on the original model, and `run` through it works."""
    from onnx import TensorProto, helper, numpy_helper

    from sparsec.compressor.compress import compress, load_model
    from sparsec.compressor.pipeline import PassSpec, Recipe

    rng = np.random.default_rng()
    w = rng.standard_normal((32, 64)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"]),
             helper.make_node("Split", ["h"], ["a", "b"], axis=-1),
             helper.make_node("Sigmoid", ["b"], ["sb"]), helper.make_node("Mul", ["a", "sb"], ["glu"]),
             helper.make_node("ReduceMean", ["glu"], ["mu"], axes=[-1], keepdims=1),
             helper.make_node("Sub", ["glu", "mu"], ["c0"]), helper.make_node("MatMul", ["c0", "w2"], ["c"]),
             helper.make_node("Unsqueeze", ["c"] + (["ax"] if src_opset >= 13 else []), ["y"], **({} if src_opset >= 13 else {"axes": [1]}))]  # fmt: skip
    inits = [numpy_helper.from_array(w, "w"), numpy_helper.from_array(rng.standard_normal((32, 32)).astype(np.float32), "w2")] + ([numpy_helper.from_array(np.array([1], np.int64), "ax")] if src_opset >= 13 else [])
    g = helper.make_graph(nodes, "glu", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 32])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 1, 32])], inits)  # fmt: skip
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", src_opset)])
    m.ir_version = 7
    path = tmp_path / "glu.onnx"
    onnx.save(m, str(path))
    x = rng.standard_normal((4, 32)).astype(np.float32)
    ref = ort.InferenceSession(str(path)).run(None, {"x": x})[0]
    out = tmp_path / "out"
    res = compress(load_model(str(path)), Recipe(passes=[PassSpec("group_quant", {"bits": 8, "group_size": 32})], build=False), out)
    assert not [w_ for w_ in res.report["warnings"] if "does not load" in w_], res.report["warnings"]
    assert "onnx_vs_executor_rel_error" in res.report["quality"], res.report["quality"]
    exported = onnx.load(str(out / "model.onnx"))
    assert {o.version for o in exported.opset_import if o.domain in ("", "ai.onnx")} == {21}
    assert "DequantizeLinear" in {n.op_type for n in exported.graph.node}
    split = next(n for n in exported.graph.node if n.op_type == "Split")
    assert any(a.name == "num_outputs" for a in split.attribute) or len(split.input) == 2
    got = ort.InferenceSession(str(out / "model.onnx")).run(None, {"x": x})[0]
    assert got.shape == ref.shape and np.abs(got - ref).max() <= 2e-2 * np.abs(ref).max()
    from sparsec.compressor.runner import run_artifact

    r = run_artifact(out, {"x": x}, engine="onnx")
    np.testing.assert_allclose(r.outputs["y"], got, rtol=1e-5, atol=1e-6)
