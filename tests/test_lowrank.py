"""Low-rank compensation: EoRA and plain SVD, the rank targets, the pass after pruning + quantization.

References are independent: the best rank-r approximation in the H-weighted norm computed with numpy through the
symmetric square root of H (not EoRA's eigenvector form), errors from activations.
"""
from __future__ import annotations

import numpy as np
import pytest

from sparsec.compressor.errors import RecipeError
from sparsec.compressor.formats import Dense, GroupQuant, LowRank, NMSparse
from sparsec.compressor.pipeline import PassSpec, Recipe, build_passes
from sparsec.passes.group_quant import quantize_dense
from sparsec.passes.lowrank import lowrank_factors

from .test_quant import ort_vs_executor, one_linear_graph, raised_graph, run_recipe


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def skewed_problem(rng, out, inn, tokens=400):
    """Inputs whose covariance has a strongly skewed spectrum (a few dominant directions), a weight, and a
    compression error (quantization to 3 bits)."""
    Q, _ = np.linalg.qr(rng.standard_normal((inn, inn)))
    spec = np.exp(-np.arange(inn) / (inn / 10))  # eigenvalues decaying over four orders of magnitude
    X = rng.standard_normal((tokens, inn)) * np.sqrt(spec) @ Q.T
    W = rng.standard_normal((out, inn)).astype(np.float32)
    W_hat = quantize_dense(W, 3, 16)[0].materialize()
    return W, W_hat, X


def weighted_err(D, X):
    return float(np.linalg.norm(X @ np.asarray(D, dtype=np.float64).T))


def best_weighted(D, H, r):
    """argmin_{rank L <= r} ||(D - L) H^½||: truncated SVD of D S with S the symmetric square root of H."""
    lam, V = np.linalg.eigh(H)
    S = (V * np.sqrt(np.clip(lam, 0, None))) @ V.T
    Si = (V / np.sqrt(np.clip(lam, 1e-300, None))) @ V.T
    U, s, Vt = np.linalg.svd(D @ S)
    return (U[:, :r] * s[:r]) @ Vt[:r] @ Si


def test_eora_full_rank_recovers_w_exactly():
    rng = np.random.default_rng()
    W, W_hat, X = skewed_problem(rng, 24, 48)
    H = X.T @ X / len(X)
    for method in ("eora", "svd"):
        f = lowrank_factors(W.astype(np.float64) - W_hat, H, method=method, rank=24)
        rec = W_hat + (f.a.astype(np.float32) @ f.b.astype(np.float32))
        assert np.abs(rec - W).max() <= 1e-5 * max(1.0, np.abs(W).max()), method
        assert f.rank == 24 and f.energy == pytest.approx(1.0)


def test_eora_weighted_error_le_svd_and_optimal():
    rng = np.random.default_rng()
    for trial in range(2):
        W, W_hat, X = skewed_problem(rng, 40, 64)
        H = X.T @ X / len(X)
        D = W.astype(np.float64) - W_hat
        for r in (1, 4, 8, 16):
            e = lowrank_factors(D, H, method="eora", rank=r)
            s = lowrank_factors(D, H, method="svd", rank=r)
            err_e = weighted_err(D - e.a @ e.b, X)
            err_s = weighted_err(D - s.a @ s.b, X)
            assert err_e <= err_s * (1 + 1e-9), (r, err_e, err_s)
            # EoRA reaches the optimum of the weighted problem (independent closed form)
            assert err_e == pytest.approx(weighted_err(D - best_weighted(D, H, r), X), rel=1e-6)
        assert err_e < 0.8 * err_s  # with a skewed spectrum the difference is large


def test_rank_targets():
    rng = np.random.default_rng()
    W, W_hat, X = skewed_problem(rng, 32, 64)
    H = X.T @ X / len(X)
    D = W.astype(np.float64) - W_hat
    ref = weighted_err(W, X)
    for target in (0.02, 0.05):
        f = lowrank_factors(D, H, method="eora", max_error=target, W_ref=W)
        assert weighted_err(D - f.a @ f.b, X) / ref <= target * (1 + 1e-6)
        g = lowrank_factors(D, H, method="eora", rank=f.rank - 1)
        assert weighted_err(D - g.a @ g.b, X) / ref > target  # the smallest such rank
        assert f.fit_error == pytest.approx(weighted_err(D - f.a @ f.b, X) / ref, rel=1e-4)
        s = lowrank_factors(D, H, method="svd", max_error=target, W_ref=W)
        assert weighted_err(D - s.a @ s.b, X) / ref <= target * (1 + 1e-6) and s.rank >= f.rank
    for energy in (0.5, 0.9):
        f = lowrank_factors(D, H, method="eora", energy=energy)
        left = weighted_err(D - f.a @ f.b, X) ** 2 / weighted_err(D, X) ** 2
        assert f.energy >= energy and left <= 1 - energy + 1e-6
        assert lowrank_factors(D, H, method="eora", rank=f.rank - 1).energy < energy
    capped = lowrank_factors(D, H, method="eora", max_error=0.0, max_rank=5, W_ref=W)
    assert capped.rank == 5


# ----------------------------------------------------------------------------------------------------------------
def test_pass_compensates_pruned_and_quantized_layers():
    rng = np.random.default_rng()
    g = raised_graph(rng, d=64, h=128)
    reps, ctx = run_recipe(g, [("nm_prune", {"nm": "2:4"}), ("group_quant", {"bits": 4, "group_size": 16}),
                               ("lowrank", {"method": "eora", "rank": 8, "dtype": "float32",
                                            "overrides": [{"match": r"\.down$", "rank": 16}, {"match": r"layers\.1\.o", "skip": True}]})])  # fmt: skip
    pr, qr, lr = reps
    rows = {r.name: r for r in lr.rows}
    assert rows["lm_head"].status == "excluded" and rows["layers.1.o"].status == "excluded"
    for lin in g.linears():
        r = rows[lin.name]
        if r.status != "compressed":
            continue
        w = lin.weight
        assert isinstance(w, LowRank) and isinstance(w.base, NMSparse) and isinstance(w.base.values, GroupQuant)
        assert w.rank == (16 if lin.name.endswith(".down") else 8) and r.extra["rank"] == w.rank
        assert r.error < r.error_before and r.format_after.endswith(f"+lr{w.rank}")
        assert r.sparsity == pytest.approx(float((w.base.materialize() == 0).mean())) and r.sparsity >= 0.5
        # the error before compensation is the total of pruning + quantization (vs the dense weight); the first
        # layers see the same held-out inputs in both passes (later ones see compensated predecessors' outputs)
        if lin.name in ("layers.0.q", "layers.0.k"):
            q = next(x for x in qr.rows if x.name == lin.name)
            assert r.error_before == pytest.approx(q.extra["error_total"], rel=1e-6)
        assert r.bytes_after == r.bytes_before + w.rank * (lin.in_features + lin.out_features) * 4
    assert lr.extra["mean_error_after"] < 0.8 * lr.extra["mean_error_before"]


def test_pass_full_rank_through_the_pipeline_and_svd_baseline():
    rng = np.random.default_rng()
    g = raised_graph(rng, d=32, h=32, layers=1)
    dense = {l.name: l.weight.materialize() for l in g.linears()}
    run_recipe(g, [("group_quant", {"bits": 3, "group_size": 16, "method": "rtn"}), ("lowrank", {"rank": 32, "dtype": "float32"})])
    for lin in g.linears():
        if lin.name != "lm_head":
            np.testing.assert_allclose(lin.weight.materialize(), dense[lin.name], atol=1e-5)
    errs = {}
    for method in ("svd", "eora"):
        gg = raised_graph(np.random.default_rng(7), d=32, h=64, layers=1)
        (_, lr), _ = run_recipe(gg, [("group_quant", {"bits": 2, "group_size": 16, "method": "rtn"}), ("lowrank", {"method": method, "rank": 4})])
        errs[method] = lr.extra["mean_error_after"]
    assert errs["eora"] < errs["svd"]


def test_refusals_and_skips():
    with pytest.raises(RecipeError, match="needs a compression pass"):
        build_passes(Recipe(passes=[PassSpec("lowrank", {"rank": 4})]))
    for bad in ({"method": "lora"}, {"rank": 0}, {"rank": 4, "energy": 0.9}, {"energy": 1.5}, {"dtype": "int8"}):
        with pytest.raises(RecipeError):
            build_passes(Recipe(passes=[PassSpec("group_quant", {}), PassSpec("lowrank", bad)]))
    rng = np.random.default_rng()
    g = raised_graph(rng, layers=1)
    (qr, lr), _ = run_recipe(g, [("group_quant", {"bits": 4, "exclude": [r"\.up$"]}), ("lowrank", {"rank": 2})])
    rows = {r.name: r for r in lr.rows}
    assert rows["layers.0.up"].status == "skipped" and "not compressed" in rows["layers.0.up"].note
    assert isinstance(g.linear("layers.0.up").weight, Dense)


def test_onnx_of_compensated_weight():
    rng = np.random.default_rng()
    W, W_hat, X = skewed_problem(rng, 32, 64)
    gq, _ = quantize_dense(W, 4, 32)
    f = lowrank_factors(W.astype(np.float64) - gq.materialize(), X.T @ X / len(X), rank=8)
    fmt = LowRank(gq, f.a.astype(np.float16), f.b.astype(np.float16))
    err, ops, _, _ = ort_vs_executor(one_linear_graph(fmt))
    assert err < 1e-5 and "MatMulNBits" in ops and "Cast" in ops


@pytest.fixture(scope="module")
def llama_graph(tmp_path_factory):
    from sparsec.compressor.frontends.onnx import load_onnx

    from . import models as tm

    path = tm.export_onnx(tm.build("llama"), str(tmp_path_factory.mktemp("llama") / "m.onnx"), "torchscript", 17)
    return load_onnx(path)


@pytest.mark.parametrize("second", [("nm_prune", {"nm": "2:4"}), ("group_quant", {"bits": 4, "group_size": 16})])
def test_compensation_after_slicing_fits_the_sliced_dense_weight(llama_graph, second):
    """After slicing, a layer's dense reference is its sliced (rotated) weight, which the untouched model does not have:
    N:M pruning did not record it, so `--slice --nm --compensate` compensated no layer ("the dense weight before
    compression is not known", exit 0); quantization did. Both now fit W_sliced - Ŵ: a low rank lowers every layer's
    error, and full rank gives back the sliced dense weight."""
    for method, rank in (("eora", 8), ("svd", 4096)):
        g = llama_graph.copy()
        (_, _, lr), ctx = run_recipe(g, [("slicing", {"fraction": 0.25}), second, ("lowrank", {"method": method, "rank": rank, "dtype": "float32"})])
        rows = [r for r in lr.rows if r.status == "compressed"]
        assert rows and not [r for r in lr.rows if r.status == "skipped"], [(r.name, r.status, r.reason) for r in lr.rows]
        refs = ctx.products["reference_weights"]
        assert {r.name for r in rows} <= set(refs)  # every compensated layer was sliced: its reference was recorded
        if method == "eora":
            assert all(r.error < r.error_before for r in rows)
        else:
            for lin in g.linears():
                if lin.name in {r.name for r in rows}:
                    np.testing.assert_allclose(lin.weight.materialize(), refs[lin.name], atol=1e-4)
