"""N:M pruning (magnitude, Wanda, SparseGPT) and the shared OBS solver.

References are independent: SparseGPT's published algorithm transcribed below (dense torch, no sparsec code), the
layer error computed from activations with numpy, onnxruntime for exported artifacts.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sparsec.calibration.data import load_calibration
from sparsec.compressor.errors import PassError, RecipeError
from sparsec.compressor.formats import Dense, NMSparse, nm_mask_valid
from sparsec.compressor.ir import Embedding, Graph, LayerNorm, Linear, Residual, RMSNorm
from sparsec.compressor.pipeline import PassContext, PassSpec, Recipe, build_passes, run_passes
from sparsec.passes.obs import inverse_hessian_factor, layer_error, nm_mask_from_scores, obs_solve

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ----------------------------------------------------------------------------------------------------------------
# helpers
def reference_sparsegpt(W, H, prunen, prunem, blocksize=128, percdamp=0.01):
    """SparseGPT's N:M algorithm as published (Frantar & Alistarh 2023, reference code), prunen = zeros per group."""
    W = W.clone().float()
    H = H.clone()
    cols = W.shape[1]
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    H[range(cols), range(cols)] += percdamp * torch.mean(torch.diag(H))
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True).float()
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        mask1 = torch.zeros_like(W1, dtype=torch.bool)
        for i in range(i2 - i1):
            w, d = W1[:, i], Hinv1[i, i]
            if i % prunem == 0:
                tmp = W1[:, i : i + prunem] ** 2 / (torch.diag(Hinv1)[i : i + prunem].reshape(1, -1)) ** 2
                mask1.scatter_(1, i + torch.topk(tmp, prunen, dim=1, largest=False)[1], True)
            q = w.clone()
            q[mask1[:, i]] = 0
            Q1[:, i] = q
            err = (w - q) / d
            W1[:, i:] -= err.unsqueeze(1).matmul(Hinv1[i, i:].unsqueeze(0))
            Err1[:, i] = err
        W[:, i1:i2] = Q1
        W[:, i2:] -= Err1.matmul(Hinv[i1:i2, i2:])
    return W.numpy()


def correlated_problem(rng, out, inn, tokens=512):
    """Activations with correlated channels of very different scales (as LLM activations have), and a weight."""
    scale = np.exp(rng.standard_normal(inn))
    mix = np.eye(inn) + 0.5 * rng.standard_normal((inn, inn)) / np.sqrt(inn)
    X = (rng.standard_normal((tokens, inn)) @ mix) * scale
    W = rng.standard_normal((out, inn)).astype(np.float32)
    return W, X


def output_error(W, W2, X) -> float:
    """||W X^T - W2 X^T||_F / ||W X^T||_F from the activations themselves (numpy, float64)."""
    ref = X @ W.astype(np.float64).T
    return float(np.linalg.norm(ref - X @ W2.astype(np.float64).T) / np.linalg.norm(ref))


def raised_graph(rng, d=32, h=64, layers=2, vocab=50, down_in=None):
    """A small LLaMA-like stack from raised ops: per block q/k (same input) -> o -> up -> down, residual."""
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


def run_prune(g, params, samples=24, seq_len=16, seed=0, heldout=0.25):
    r = Recipe(seed=seed, passes=[PassSpec("nm_prune", params)])
    fit, held = load_calibration(g, None, samples=samples, seq_len=seq_len, seed=seed, heldout=heldout)
    ctx = PassContext(r, calib=fit, heldout=held)
    (rep,) = run_passes(g, build_passes(r), ctx)
    return rep, fit, held


# ----------------------------------------------------------------------------------------------------------------
# the solver
def test_obs_matches_published_sparsegpt():
    rng = np.random.default_rng()
    W, X = correlated_problem(rng, 40, 256)
    H = X.T @ X
    for n, m in ((2, 4), (1, 4), (4, 8)):
        got = obs_solve(W, H, nm=(n, m))
        ref = reference_sparsegpt(torch.from_numpy(W), torch.from_numpy(H), m - n, m)
        np.testing.assert_allclose(got.weight, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
        assert (got.mask == (ref != 0)).mean() > 0.999


def test_keep_everything_reproduces_dense():
    rng = np.random.default_rng()
    W, X = correlated_problem(rng, 24, 96)
    for bs in (128, 32, 7):
        res = obs_solve(W, X.T @ X, mask=np.ones_like(W, dtype=bool), blocksize=bs)
        np.testing.assert_array_equal(res.weight, W)
        assert res.loss == 0.0


def test_fixed_mask_is_kept_and_compensated():
    rng = np.random.default_rng()
    W, X = correlated_problem(rng, 16, 64)
    H = X.T @ X
    mask = rng.random(W.shape) > 0.4
    res = obs_solve(W, H, mask=mask)
    assert not res.weight[~mask].any()
    # compensation: the OBS result beats zeroing the same entries
    assert layer_error(W, res.weight, H) < layer_error(W, W * mask, H)


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 2**31 - 1), st.sampled_from([(1, 2), (2, 4), (1, 4), (3, 4), (4, 8), (2, 8), (1, 8), (5, 16)]),
       st.integers(1, 24), st.integers(1, 12), st.sampled_from(["magnitude", "wanda", "sparsegpt"]))  # fmt: skip
def test_every_group_has_at_most_n_nonzeros(seed, nm, out, groups, method):
    n, m = nm
    rng = np.random.default_rng(seed)
    W, X = correlated_problem(rng, out, groups * m, tokens=64)
    H = X.T @ X
    if method == "magnitude":
        mask = nm_mask_from_scores(np.abs(W), n, m)
        Wn = W * mask
    elif method == "wanda":
        mask = nm_mask_from_scores(np.abs(W) * np.sqrt(np.diag(H)), n, m)
        Wn = W * mask
    else:
        res = obs_solve(W, H, nm=(n, m), blocksize=int(rng.integers(1, 64)))
        Wn, mask = res.weight, res.mask
    assert nm_mask_valid(mask, n, m, exact=True)
    assert nm_mask_valid(Wn != 0, n, m)
    fmt = NMSparse.from_mask(Wn, mask, n, m)
    np.testing.assert_array_equal(fmt.materialize(), Wn)
    assert nm_mask_valid(fmt.materialize() != 0, n, m)


def test_reconstruction_error_sparsegpt_le_wanda_le_magnitude():
    rng = np.random.default_rng()
    for n, m in ((2, 4), (1, 4), (4, 8), (2, 8)):
        W, X = correlated_problem(rng, int(rng.integers(16, 48)), m * int(rng.integers(8, 24)))
        H = X.T @ X
        mag = W * nm_mask_from_scores(np.abs(W), n, m)
        wan = W * nm_mask_from_scores(np.abs(W) * np.linalg.norm(X, axis=0), n, m)
        sgpt = obs_solve(W, H, nm=(n, m)).weight
        e_s, e_w, e_m = (output_error(W, x, X) for x in (sgpt, wan, mag))
        assert e_s <= e_w <= e_m, (n, m, e_s, e_w, e_m)


def test_gptq_callback_groups_and_act_order():
    """The quantizer hook: one fit per contiguous group, with the current (compensated) weights; GPTQ < RTN."""
    rng = np.random.default_rng()
    W, X = correlated_problem(rng, 32, 128)
    H = X.T @ X
    gs = 32

    class RTN4:
        group_size = gs

        def __init__(self):
            self.scale, self.calls = {}, []

        def fit_group(self, g, cols, w, keep):
            assert cols.tolist() == list(range(g * gs, (g + 1) * gs))
            self.calls.append((g, w.clone()))
            self.scale[g] = w.abs().amax(1).clamp(min=1e-8) / 7

        def quantize(self, j, col):
            s = self.scale[j // gs]
            return torch.clamp(torch.round(col / s), -8, 7) * s

    rtn = RTN4()
    for g in range(W.shape[1] // gs):
        rtn.fit_group(g, torch.arange(g * gs, (g + 1) * gs), torch.from_numpy(W[:, g * gs : (g + 1) * gs]), None)
    w_rtn = np.stack([rtn.quantize(j, torch.from_numpy(W[:, j])).numpy() for j in range(W.shape[1])], 1)
    for act_order in (False, True):
        q = RTN4()
        res = obs_solve(W, H, quantize=q, act_order=act_order)
        assert sorted(g for g, _ in q.calls) == list(range(W.shape[1] // gs))
        assert layer_error(W, res.weight, H) < layer_error(W, w_rtn, H)
        if not act_order:
            np.testing.assert_array_equal(q.calls[0][1].numpy(), W[:, :gs])  # first group: nothing compensated yet
            assert not np.allclose(q.calls[1][1].numpy(), W[:, gs : 2 * gs])  # later groups: compensated weights
        # every column lies on its group's grid
        for g, _ in q.calls:
            codes = res.weight[:, g * gs : (g + 1) * gs] / q.scale[g].numpy()[:, None]
            np.testing.assert_allclose(codes, np.round(codes), atol=1e-3)


def test_joint_prune_and_quantize():
    rng = np.random.default_rng()
    W, X = correlated_problem(rng, 24, 64)
    H = X.T @ X

    def q(j, col):
        return torch.round(col * 8) / 8

    res = obs_solve(W, H, nm=(2, 4), quantize=q)
    assert nm_mask_valid(res.mask, 2, 4, exact=True) and not res.weight[~res.mask].any()
    np.testing.assert_allclose(res.weight * 8, np.round(res.weight * 8), atol=1e-4)


def test_damping_escalates_and_is_reported():
    rng = np.random.default_rng()
    X = rng.standard_normal((200, 16))
    G = X.T @ X
    H = G - 0.8 * np.diag(G).mean() * np.eye(16)  # indefinite (positive diagonal): needs damping far above 1%
    U, d, esc = inverse_hessian_factor(torch.from_numpy(H), 0.01)
    assert esc >= 2 and d >= 1.0
    Hd = H + d * np.diag(H).mean() * np.eye(16)
    np.testing.assert_allclose(U.numpy().T @ U.numpy(), np.linalg.inv(Hd), rtol=1e-6, atol=1e-9)
    assert np.allclose(U.numpy(), np.triu(U.numpy()))
    # through the pass: damp 0 on a rank-deficient Hessian (fewer tokens than inputs) escalates, with a warning
    g = raised_graph(rng, d=32, h=64, layers=1)
    rep, _, _ = run_prune(g, {"nm": "2:4", "method": "sparsegpt", "damp": 0.0}, samples=3, seq_len=4, heldout=1)
    assert any("escalated" in w for w in rep.warnings)
    assert any(r.extra.get("escalations") for r in rep.rows)


# ----------------------------------------------------------------------------------------------------------------
# the pass
@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_pass_prunes_all_but_head_and_reports(method):
    rng = np.random.default_rng()
    g = raised_graph(rng)
    dense = {l.name: l.weight.materialize() for l in g.linears()}
    rep, fit, held = run_prune(g, {"nm": "2:4", "method": method})
    rows = {r.name: r for r in rep.rows}
    assert rows["lm_head"].status == "excluded" and isinstance(g.linear("lm_head").weight, Dense)
    for lin in g.linears():
        if lin.name == "lm_head":
            continue
        r = rows[lin.name]
        assert r.status == "compressed" and r.format_before == "dense" and r.format_after == "2:4"
        assert isinstance(lin.weight, NMSparse) and nm_mask_valid(lin.weight.materialize() != 0, 2, 4)
        assert r.sparsity == pytest.approx(0.5, abs=0.02) and r.bytes_after < r.bytes_before
        assert 0 < r.error < 1 and r.seconds is not None and r.extra["method"] == method
    assert rep.totals["compressed"] == 10 and rep.totals["excluded"] == 1


def test_layer_error_is_measured_on_heldout_inputs():
    """The first layer's input is the normed embedding: recompute its held-out activations with numpy."""
    rng = np.random.default_rng()
    g = raised_graph(rng, layers=1)
    emb = g.node("embed").table.astype(np.float64)
    norm = g.node("layers.0.norm")
    q_dense = g.linear("layers.0.q").weight.materialize()
    rep, fit, held = run_prune(g, {"nm": "2:4", "method": "wanda"})

    def acts(cs):
        x = emb[cs.arrays["ids"]].reshape(-1, emb.shape[1])
        return x / np.sqrt((x**2).mean(-1, keepdims=True) + norm.eps) * norm.weight

    row = next(r for r in rep.rows if r.name == "layers.0.q")
    q_new = g.linear("layers.0.q").weight.materialize()
    err_held, err_fit = output_error(q_dense, q_new, acts(held)), output_error(q_dense, q_new, acts(fit))
    assert row.error == pytest.approx(err_held, rel=1e-5)
    # and not on the fit split (the two estimates can be close on random data: compare distances, not a margin)
    assert abs(row.error - err_held) < abs(row.error - err_fit), (row.error, err_held, err_fit)
    # Wanda's selection uses the fit split only
    expect = nm_mask_from_scores(np.abs(q_dense) * np.linalg.norm(acts(fit), axis=0), 2, 4)
    np.testing.assert_array_equal(g.linear("layers.0.q").weight.mask(), expect)


def test_true_sequential_sees_pruned_earlier_layers():
    """o's Hessian must come from the outputs of the already pruned q and k (and block 1 from pruned block 0)."""
    rng = np.random.default_rng()
    g = raised_graph(rng, layers=1)
    ref = g.copy()
    rep, fit, held = run_prune(g, {"nm": "2:4", "method": "sparsegpt"})
    emb = g.node("embed").table.astype(np.float64)
    norm = g.node("layers.0.norm")
    x = emb[fit.arrays["ids"]].reshape(-1, emb.shape[1])
    xn = x / np.sqrt((x**2).mean(-1, keepdims=True) + norm.eps) * norm.weight
    q, k = g.linear("layers.0.q"), g.linear("layers.0.k")
    s = (xn.astype(np.float32) @ q.weight.materialize().T) + (xn.astype(np.float32) @ k.weight.materialize().T + k.bias)
    s = s.astype(np.float64)
    o_dense = ref.linear("layers.0.o").weight.materialize()
    expect = obs_solve(o_dense, s.T @ s, nm=(2, 4), zero_dead=False).weight
    np.testing.assert_allclose(g.linear("layers.0.o").weight.materialize(), expect, rtol=1e-3, atol=1e-4)


def test_overrides_skips_and_nondivisible_layers():
    rng = np.random.default_rng()
    g = raised_graph(rng, d=32, h=36, layers=2)  # down has 36 inputs: divisible by 4, not by 8
    params = {
        "nm": "4:8",
        "method": "sparsegpt",
        "overrides": [
            {"match": r"layers\.0\.q$", "skip": True},
            {"match": r"\.k$", "method": "magnitude", "nm": "1:4"},
            {"match": r"layers\.1\.down", "nm": "2:4", "method": "wanda"},
        ],
    }
    rep, _, _ = run_prune(g, params)
    rows = {r.name: r for r in rep.rows}
    assert rows["layers.0.q"].status == "excluded" and "override" in rows["layers.0.q"].note
    assert rows["layers.0.k"].format_after == "1:4" and rows["layers.0.k"].extra["method"] == "magnitude"
    assert rows["layers.1.q"].format_after == "4:8" and rows["layers.1.q"].extra["method"] == "sparsegpt"
    assert rows["layers.0.down"].status == "skipped" and "not divisible by M=8" in rows["layers.0.down"].note
    assert isinstance(g.linear("layers.0.down").weight, Dense)
    assert rows["layers.1.down"].format_after == "2:4" and rows["layers.1.down"].extra["method"] == "wanda"
    assert rep.totals["skipped"] == 1


def test_overrides_merge_in_order_and_keep_an_earlier_skip():
    """The documented recipe: skip block 0, then another pattern for every down projection. Block 0's down projection
    matches both and stays dense (the later override changes only what it names); ``skip: false`` undoes a skip."""
    rng = np.random.default_rng()
    g = raised_graph(rng, d=32, h=64, layers=3)
    params = {
        "nm": "2:4",
        "method": "magnitude",
        "overrides": [
            {"match": r"layers\.[01]\.", "skip": True},
            {"match": r"\.down$", "nm": "4:8"},
            {"match": r"layers\.1\.down$", "skip": False},
        ],
    }
    rep, _, _ = run_prune(g, params)
    rows = {r.name: r for r in rep.rows}
    assert rows["layers.0.down"].status == "excluded" and isinstance(g.linear("layers.0.down").weight, Dense)
    assert rows["layers.0.q"].status == "excluded"
    assert rows["layers.1.down"].format_after == "4:8"  # skip undone, the down pattern kept
    assert rows["layers.1.q"].status == "excluded"
    assert rows["layers.2.down"].format_after == "4:8" and rows["layers.2.q"].format_after == "2:4"


def test_bad_params_and_refusals():
    for bad in ({"nm": "4:4"}, {"nm": "x"}, {"method": "obs"}, {"damp": -1}, {"overrides": [{"match": "q", "rank": 3}]},
                {"overrides": [{"match": "q", "nm": "5:3"}]}, {"unknown": 1}):  # fmt: skip
        with pytest.raises(RecipeError):
            build_passes(Recipe(passes=[PassSpec("nm_prune", {"nm": "2:4", **bad})]))
    rng = np.random.default_rng()
    g = raised_graph(rng, layers=1)
    lin = g.linear("layers.0.up")
    lin.weight = NMSparse.from_dense(lin.weight.materialize(), 2, 4)
    with pytest.raises(PassError, match="layers.0.up"):
        run_prune(g, {"nm": "2:4"})
    # magnitude needs no calibration; the other methods do
    g = raised_graph(rng, layers=1)
    r = Recipe(passes=[PassSpec("nm_prune", {"nm": "2:4", "method": "magnitude"})])
    (rep,) = run_passes(g, build_passes(r), PassContext(r))
    assert rep.totals["compressed"] == 5
    r = Recipe(passes=[PassSpec("nm_prune", {"nm": "2:4", "method": "wanda"})])
    with pytest.raises(PassError, match="calibration"):
        run_passes(g, build_passes(r), PassContext(r))


def test_deterministic():
    rng = np.random.default_rng()
    g = raised_graph(rng, layers=1)
    outs = []
    for _ in range(2):
        gg = g.copy()
        run_prune(gg, {"nm": "2:4", "method": "sparsegpt"}, seed=3)
        outs.append([l.weight.materialize() for l in gg.linears()])
    for a, b in zip(*outs):
        np.testing.assert_array_equal(a, b)


# ----------------------------------------------------------------------------------------------------------------
# end to end: the CLI on an exported model
def sparsec_cli(*args):
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1", COLUMNS="250")
    env["PYTHONPATH"] = REPO + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return subprocess.run([sys.executable, "-m", "sparsec", *map(str, args)], capture_output=True, text=True, cwd=REPO,
                          env=env, timeout=600)  # fmt: skip


def sparsec_inproc(monkeypatch, capsys, *args) -> tuple[int, str, str]:
    """The CLI in this process, with the backend build stubbed out (it is tested elsewhere; it costs seconds)."""
    from sparsec.cli.main import main

    try:
        import sparsec.backends.build as bb
    except ImportError:  # a checkout without the backend: nothing is built anyway
        bb = None
    if bb is not None:
        monkeypatch.setattr(bb, "build", lambda graph, target, recipe=None, console=None: ({"status": "not built (test)"}, None))
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in args])
    out = capsys.readouterr()
    return e.value.code, out.out, out.err


@pytest.fixture(scope="module")
def bert_onnx(tmp_path_factory):
    from . import models as tm

    model = tm.build("bert")
    path = tmp_path_factory.mktemp("bert") / "bert.onnx"
    tm.export_onnx(model, str(path), "torchscript", 17)
    return model, path


def _check_artifact_runs(out, feeds):
    """model.onnx of the artifact in onnxruntime == the executor on the artifact's graph; weights are 2:4."""
    import onnxruntime as ort

    from sparsec.compressor.artifact import load_artifact
    from sparsec.compressor.executor import Executor

    a = load_artifact(out)
    g = a.graph
    pruned = [l for l in g.linears() if isinstance(l.weight, NMSparse)]
    assert len(pruned) == len(g.linears()) == 36  # 6 BERT layers x (q, k, v, o, up, down): no head in an encoder
    assert all(nm_mask_valid(l.weight.materialize() != 0, 2, 4) for l in pruned)
    sess = ort.InferenceSession(str(a.onnx_path), providers=["CPUExecutionProvider"])
    got = sess.run(None, feeds)
    ref = Executor(g).run(feeds)
    for o, r in zip(sess.get_outputs(), got):
        assert np.linalg.norm(r - ref[o.name]) / np.linalg.norm(ref[o.name]) < 1e-5
    return a


def test_cli_compress_generated_data_report_and_onnxruntime(bert_onnx, tmp_path, monkeypatch, capsys):
    from . import models as tm

    model, path = bert_onnx
    out = tmp_path / "out"
    code, stdout, err = sparsec_inproc(monkeypatch, capsys, "compress", path, "--nm", "2:4", "--method", "sparsegpt",
                                       "--seq-len", "16", "--calib-samples", "24", "-o", out, "--json")  # fmt: skip
    assert code == 0, err
    doc = json.loads(stdout)
    assert any("poor calibration set" in w for w in doc["warnings"])
    (pr,) = doc["passes"]
    assert pr["name"] == "nm_prune" and pr["totals"]["compressed"] == 36
    assert all(0 < r["error"] < 1 and r["format_after"] == "2:4" for r in pr["rows"])
    q = doc["quality"]
    assert 0 < q["output_rel_error"] < 0.5 and q["output_cosine"] > 0.85 and q["onnx_vs_executor_rel_error"] < 1e-5
    feeds = tm.feeds_for(model, b=2, t=9, seed=int(np.random.default_rng().integers(1 << 30)))
    _check_artifact_runs(out, feeds)
    p = sparsec_cli("report", out)
    assert p.returncode == 0 and "encoder.layer.5.output.dense" in p.stdout and "2:4" in p.stdout, p.stderr
    p = sparsec_cli("report", out, "--json")
    assert p.returncode == 0 and json.loads(p.stdout)["passes"][0]["rows"] == pr["rows"]


def test_cli_npz_max_error_and_recipe_equivalence(bert_onnx, tmp_path, monkeypatch, capsys):
    from . import models as tm

    model, path = bert_onnx
    rng = np.random.default_rng()
    feeds = tm.feeds_for(model, b=20, t=12, seed=int(rng.integers(1 << 30)))
    np.savez(tmp_path / "calib.npz", **feeds)
    flags = ["--nm", "2:4", "--method", "wanda", "--exclude", r"layer\.0\.", "--calib", tmp_path / "calib.npz", "--seed", "4"]
    code, _, err = sparsec_inproc(monkeypatch, capsys, "compress", path, *flags, "-o", tmp_path / "a", "--quiet")
    assert code == 0, err
    rep = json.loads((tmp_path / "a" / "report.json").read_text())
    assert not any("poor calibration" in w for w in rep["warnings"])
    rows = {r["name"]: r for r in rep["passes"][0]["rows"]}
    assert rows["encoder.layer.0.attention.self.query"]["status"] == "excluded"
    assert rows["encoder.layer.1.attention.self.query"]["status"] == "compressed"
    assert rep["quality"]["eval_samples"] == 3  # ceil(12.5% of 20) held out
    # the same run as a YAML recipe: byte-identical artifact
    (tmp_path / "r.yaml").write_text(
        f"seed: 4\ncalibration: {{data: '{tmp_path / 'calib.npz'}'}}\n"
        "passes:\n  - type: nm_prune\n    nm: '2:4'\n    exclude: ['layer\\.0\\.']\n    method: wanda\n"
    )
    code, _, err = sparsec_inproc(monkeypatch, capsys, "compress", path, "--recipe", tmp_path / "r.yaml", "-o", tmp_path / "b", "--quiet")
    assert code == 0, err
    for f in ("weights.safetensors", "graph.json", "model.onnx", "report.json", "manifest.json"):
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f
    # --max-error: exit 1 when exceeded (artifact still written, for inspection), 0 when not
    err_value = rep["quality"]["output_rel_error"]
    code, _, err = sparsec_inproc(monkeypatch, capsys, "compress", path, *flags, "-o", tmp_path / "c", "--quiet", "--max-error", err_value / 2)
    assert code == 1 and "exceeds --max-error" in err
    line = [ln for ln in err.splitlines() if "exceeds --max-error" in ln]
    assert len(line) == 1 and line[0].startswith("sparsec: threshold failed: output relative error"), err  # one error line
    assert err.count("no compiled library for --target") == 1, err  # printed by compress, not again by -q's list
    assert (tmp_path / "c" / "report.json").exists()
    code, _, err = sparsec_inproc(monkeypatch, capsys, "compress", path, *flags, "-o", tmp_path / "d", "--quiet", "--max-error", err_value * 2)
    assert code == 0, err


def test_an_override_that_names_no_layer_is_flagged():
    """An override whose `match` selects no layer (a typo: 'mlpp') changed nothing and said nothing; the pass report
    now warns, naming it. Overrides that match stay quiet."""
    from .test_quant import raised_graph, run_recipe

    g = raised_graph(np.random.default_rng(), d=32, h=64)
    (rep,), _ = run_recipe(g, [("nm_prune", {"nm": "2:4", "overrides": [{"match": r"\.upp$", "skip": True},
                                                                        {"match": r"layers\.0\.", "nm": "4:8"}]})])  # fmt: skip
    flagged = [w for w in rep.warnings if "names no layer" in w]
    assert len(flagged) == 1 and "overrides[0]" in flagged[0] and ".upp$" in flagged[0], rep.warnings
    assert any(r.status == "compressed" and r.name.endswith(".up") for r in rep.rows)
