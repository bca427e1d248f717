"""Expert merging (MC-SMoE): lossless on identical experts, alignment undoes permutations, router rewrite against a
numpy reference of top-k routing, refit, ONNX export against onnxruntime, CLI on .pt2 / sparsec ONNX, errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from sparsec.calibration.data import CalibrationSet
from sparsec.compressor.errors import RecipeError
from sparsec.compressor.executor import Executor
from sparsec.compressor.formats import Dense
from sparsec.compressor.frontends.torch import load_torch
from sparsec.compressor.ir import MoE
from sparsec.compressor.pipeline import PassContext, PassSpec, Recipe, build_passes, run_passes
from sparsec.passes.expert_merge import align_to, expert_arrays, group_experts, logit_similarity, permute

from . import models as tm


_GRAPH = {}


def mixtral_graph():
    """The test Mixtral (2 MoE layers, 4 experts, top-2) as a graph; imported once, a fresh copy per call."""
    if "g" not in _GRAPH:
        model = tm.build("mixtral")
        _GRAPH["g"] = load_torch(model, model.example_inputs())
    return _GRAPH["g"].copy()


def calib(g, n=8, t=16, seed=0):
    ids = np.random.default_rng(seed).integers(0, 128, size=(n, t)).astype(np.int64)
    held = max(2, n // 4)
    return (CalibrationSet({g.inputs[0]: ids[: n - held]}, "test", False, 4),
            CalibrationSet({g.inputs[0]: ids[n - held :]}, "test", False, 4))  # fmt: skip


def run_merge(g, n=8, t=16, passes=None, **params):
    r = Recipe(passes=passes or [PassSpec("expert_merge", params)])
    fit, held = calib(g, n, t)
    ctx = PassContext(r, calib=fit, heldout=held)
    return run_passes(g, build_passes(r), ctx), ctx


def moes(g):
    return [n for n in g.nodes if isinstance(n, MoE)]


# ---- numpy reference of the MoE semantics (independent of the executor) ----------------------------------------
def np_expert(a, x):
    g = x @ a["gate"].T
    return (g / (1 + np.exp(-g)) * (x @ a["up"].T)) @ a["down"].T


def np_moe(m: MoE, x):
    """softmax(router) -> top-k over routes -> renormalize -> each route's weight to expert_map[route]."""
    logits = x @ m.router.weight.materialize().T
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    emap = m.expert_map if m.expert_map is not None else list(range(len(m.experts)))
    outs = [np_expert(expert_arrays(e), x) for e in m.experts]
    y = np.zeros_like(x)
    for t in range(x.shape[0]):
        top = np.argsort(-p[t], kind="stable")[: m.top_k]
        w = p[t, top] / (p[t, top].sum() if m.renormalize else 1.0)
        per_expert = np.zeros(len(m.experts))
        for r, wr in zip(top, w):
            per_expert[emap[r]] += wr  # routes that land on the same merged expert: weights summed
        for e, we in enumerate(per_expert):
            y[t] += we * outs[e][t]
    return y


# ----------------------------------------------------------------------------------------------------------------
def test_identical_experts_merge_losslessly():
    g = mixtral_graph()
    rng = np.random.default_rng()
    for m in moes(g):
        src = m.experts[0]
        for e in m.experts[1:]:
            for a, b in zip(e.linears(), src.linears()):
                a.weight = Dense(b.weight.materialize().copy())
    ids = rng.integers(0, 128, size=(2, 9)).astype(np.int64)
    before = Executor(g).run({g.inputs[0]: ids})[g.outputs[0]]
    for params in ({"method": "mcsmoe"}, {"method": "average"}, {"method": "mcsmoe", "refit": False}):
        g2 = g.copy()
        (rep,), _ = run_merge(g2, experts=2, **params)
        assert all(len(m.experts) == 2 for m in moes(g2))
        after = Executor(g2).run({g.inputs[0]: ids})[g.outputs[0]]
        assert tm.rel(before, after) < 1e-5, params
        assert all(r.error is not None and r.error < 1e-5 for r in rep.rows), params


def test_alignment_undoes_a_random_permutation():
    g = mixtral_graph()
    a = expert_arrays(moes(g)[0].experts[0])
    rng = np.random.default_rng()
    p = rng.permutation(a["up"].shape[0])
    shuffled = permute(a, p)
    back = permute(shuffled, align_to(a, shuffled))
    for k in a:
        np.testing.assert_array_equal(back[k], a[k])
    x = rng.standard_normal((5, a["up"].shape[1])).astype(np.float32)
    np.testing.assert_allclose(np_expert(shuffled, x), np_expert(a, x), rtol=1e-4, atol=1e-5)  # same function


def test_grouping_centres_are_the_most_frequent_and_members_join_the_most_similar():
    rng = np.random.default_rng()
    freq = rng.random(8)
    logits = rng.standard_normal((200, 8))
    sim = logit_similarity(logits, list(range(8)), 8)
    c = logits / np.linalg.norm(logits, axis=0)
    np.testing.assert_allclose(sim, c.T @ c, atol=1e-12)  # cosine of router-logit columns
    centres, assign = group_experts(freq, sim, 3)
    assert sorted(centres) == sorted(np.argsort(-freq)[:3].tolist())
    for e in range(8):
        if e in centres:
            assert centres[assign[e]] == e
        else:
            assert assign[e] == int(np.argmax([sim[e, c] for c in centres]))


@pytest.mark.parametrize("method", ["mcsmoe", "drop", "prune"])
def test_router_rewrite_matches_topk_reference_and_onnxruntime(method):
    g = mixtral_graph()
    (rep,), ctx = run_merge(g, experts=0.5, method=method)
    for m in moes(g):
        assert len(m.experts) == 2
        if method == "prune":  # the dropped experts' router outputs are gone
            assert m.router.out_features == 2 and m.expert_map is None
        else:  # every route kept, pointing at its group's expert
            assert m.router.out_features == 4 and sorted(set(m.expert_map)) == [0, 1]
            info = rep.extra["groups"][m.name]
            assert sorted(sum(info["groups"], [])) == [0, 1, 2, 3]
            for gi, members in enumerate(info["groups"]):
                assert all(m.expert_map[r] == gi for r in members)
        x = np.random.default_rng().standard_normal((40, m.router.in_features)).astype(np.float32)
        y = Executor(g).moe(m, torch.from_numpy(x)).numpy()
        assert tm.rel(np_moe(m, x), y) < 1e-5
        # routing statistics for later passes: top-k aware frequencies sum to k per token
        st = ctx.products["routing"][m.name]
        assert abs(sum(st["route_frequencies"]) - m.top_k) < 1e-9 and st["logits"].shape[1] == 4
        assert all(ctx.products["expert_frequency"][lin.name] > 0 for e in m.experts for lin in e.linears())
    import onnxruntime as ort

    from sparsec.compressor.onnx_export import to_onnx

    ids = np.random.default_rng().integers(0, 128, size=(2, 7)).astype(np.int64)
    sess = ort.InferenceSession(to_onnx(g).SerializeToString(), providers=["CPUExecutionProvider"])
    assert tm.rel(Executor(g).run({g.inputs[0]: ids})[g.outputs[0]], sess.run(None, {g.inputs[0]: ids})[0]) < 1e-5


def test_refit_lowers_heldout_error_overrides_and_determinism():
    g = mixtral_graph()
    over = [{"match": r"layers\.0\.", "experts": 3}]
    (rep,), _ = run_merge(g, n=40, t=32, experts=0.5, overrides=over)
    assert [len(m.experts) for m in moes(g)] == [3, 2]
    for r in rep.rows:
        assert r.error is not None and r.error_before is not None and r.error < r.error_before, (r.name, r.error, r.error_before)
        assert r.extra["params_after"] < r.extra["params_before"]
    g2 = mixtral_graph()
    run_merge(g2, n=40, t=32, experts=0.5, overrides=over)
    for a, b in zip(g.linears(), g2.linears()):
        np.testing.assert_array_equal(a.weight.materialize(), b.weight.materialize())


def test_a_count_at_or_above_every_layers_experts_warns_that_nothing_merged():
    g = mixtral_graph()
    (rep,), ctx = run_merge(g, experts=9)
    assert [len(m.experts) for m in moes(g)] == [4, 4] and all(r.status == "excluded" for r in rep.rows)
    assert any("merged nothing" in w and "9" in w for w in ctx.warnings), ctx.warnings
    (rep,), ctx = run_merge(mixtral_graph(), experts=2)
    assert not any("merged nothing" in w for w in ctx.warnings)


def test_merge_then_prune_the_merged_experts():
    g = mixtral_graph()
    rs, _ = run_merge(g, passes=[PassSpec("nm_prune", {"nm": "2:4"}), PassSpec("expert_merge", {"experts": 2})])
    assert [r.name for r in rs] == ["expert_merge", "nm_prune"]
    for m in moes(g):
        assert len(m.experts) == 2
        for e in m.experts:
            for lin in e.linears():
                w = lin.weight.materialize().reshape(lin.weight.shape[0], -1, 4)
                assert ((w != 0).sum(-1) <= 2).all(), lin.name


def test_bad_recipes():
    with pytest.raises(RecipeError, match="refit"):
        build_passes(Recipe(passes=[PassSpec("expert_merge", {"method": "prune", "refit": True})]))
    with pytest.raises(RecipeError, match="whole"):
        build_passes(Recipe(passes=[PassSpec("expert_merge", {"experts": 2.5})]))
    with pytest.raises(RecipeError, match="method"):
        build_passes(Recipe(passes=[PassSpec("expert_merge", {"experts": 2, "overrides": [{"match": "x", "method": "zip"}]})]))


# ---- the CLI, in-process (same code path as the `sparsec` command) --------------------------------------------
def cli(capsys, *args):
    from sparsec.cli.main import main

    with pytest.raises(SystemExit) as e:
        main([str(a) for a in args])
    out = capsys.readouterr()
    return e.value.code, out.out, out.err


@pytest.mark.slow
def test_cli_pt2_merge_then_nm_then_onnx_roundtrip(tmp_path, capsys):
    model = tm.build("mixtral")
    ep = torch.export.export(model, model.example_inputs(), dynamic_shapes=({0: torch.export.Dim.AUTO, 1: torch.export.Dim.AUTO},))
    torch.export.save(ep, str(tmp_path / "moe.pt2"))
    code, out, err = cli(capsys, "compress", tmp_path / "moe.pt2", "--merge-experts", "0.5", "--nm", "2:4", "--no-build", "-q",
                         "-o", tmp_path / "out", "--json")  # fmt: skip
    assert code == 0, err
    doc = json.loads(out)
    merge, prune = doc["passes"][0], doc["passes"][1]
    assert merge["name"] == "expert_merge" and len(merge["rows"]) == 2
    assert all(r["status"] == "compressed" and r["bytes_after"] < r["bytes_before"] for r in merge["rows"])
    assert any(".experts." in r["name"] and r["status"] == "compressed" for r in prune["rows"])
    assert doc["quality"]["onnx_vs_executor_rel_error"] < 1e-4
    # the artifact's ONNX holds the merged MoE in sparsec's form (routes -> experts): it imports back as such
    from sparsec.compressor.frontends.onnx import load_onnx

    back = moes(load_onnx(str(tmp_path / "out" / "model.onnx")))
    assert [len(m.experts) for m in back] == [2, 2] and all(m.expert_map is not None and m.router.out_features == 4 for m in back)


def test_cli_sparsec_onnx_merge(tmp_path, capsys):
    from sparsec.compressor.onnx_export import save_onnx, to_onnx

    save_onnx(to_onnx(mixtral_graph()), str(tmp_path / "moe.onnx"))
    code, out, err = cli(capsys, "compress", tmp_path / "moe.onnx", "--merge-experts", "2", "--merge-method", "drop", "--no-build",
                         "-q", "-o", tmp_path / "out", "--json")  # fmt: skip
    assert code == 0, err
    doc = json.loads(out)
    assert [r["shape_after"] for r in doc["passes"][0]["rows"]] == [[2], [2]]
    assert doc["quality"]["onnx_vs_executor_rel_error"] < 1e-4


def test_cli_refuses_models_without_moe(tmp_path, capsys):
    code, _, err = cli(capsys, "compress", "--example", "digits", "--merge-experts", "0.5", "--no-build", "-q", "-o", tmp_path / "o2")
    assert code == 10 and "no MoE layer" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o2").exists()
    # an expert loop exported by torch.onnx whose routing sparsec cannot express (squared routing weights) is not
    # raised to an MoE layer (it keeps plain layers, tests/test_moe_onnx.py): refused the same way
    from .moe_variants import build_variant

    tm.export_onnx(build_variant("squared"), str(tmp_path / "hf.onnx"), "torchscript", 17)
    code, _, err = cli(capsys, "compress", tmp_path / "hf.onnx", "--merge-experts", "0.5", "--no-build", "-q", "-o", tmp_path / "o3")
    assert code == 10 and "torch.onnx" in err and "no MoE layer" in err and not (tmp_path / "o3").exists()


def test_auto_bits_weights_expert_error_by_token_share():
    """Mixed precision on an MoE (QuantMoE-Bench: frequently used experts need more bits): each expert's error is
    weighted by the share of tokens routed to it (numpy top-k on the MoE inputs): the allocation is optimal for the
    token-weighted error, so no swap of bit widths between two experts lowers it."""
    g = mixtral_graph()
    fit, held = calib(g, 16, 16, seed=int(np.random.default_rng().integers(1 << 30)))
    for m in moes(g):
        for e in m.experts[1:]:  # identical experts: equal sensitivity, only the token share differs
            for dst, src in zip(e.linears(), m.experts[0].linears()):
                dst.weight = Dense(src.weight.materialize().copy())
        # skewed routing: along the mean MoE input, expert 0 gains +2 logits on average, expert 3 loses 2
        ex = Executor(g)
        x = np.concatenate([ex.run(b, outputs=[m.inputs[0]])[m.inputs[0]].reshape(-1, m.router.in_features) for b in fit.batches()])
        mu = x.mean(0)
        w = m.router.weight.materialize().copy()
        for e, c in zip(range(len(w)), np.linspace(2, -2, len(w))):
            w[e] += (c * mu / (mu @ mu)).astype(np.float32)
        m.router.weight = Dense(w)
    r = Recipe(passes=[PassSpec("group_quant", {"auto_bits": 5, "method": "rtn", "group_size": 16, "include": [r"experts"]})])
    ctx = PassContext(r, calib=fit, heldout=held)
    (rep,) = run_passes(g.copy(), build_passes(r), ctx)
    layers = rep.extra["auto_bits"]["layers"]
    ex = Executor(g)
    for m in moes(g):
        x = np.concatenate([ex.run(b, outputs=[m.inputs[0]])[m.inputs[0]].reshape(-1, m.router.in_features) for b in fit.batches()])
        logits = x @ m.router.weight.materialize().T
        top = np.argsort(-logits, axis=1, kind="stable")[:, : m.top_k]
        ref = np.array([(top == e).any(1).mean() for e in range(len(m.experts))])
        assert ref.max() > ref.min() + 0.05  # the routing is skewed
        for i, e in enumerate(m.experts):
            for lin in e.linears():
                assert layers[lin.name]["token_share"] == pytest.approx(ref[i], abs=1e-9), lin.name
        # exchange optimality of the token-weighted objective: for two experts' layers of the same shape, swapping
        # their bit widths (same bytes) never lowers sum(share * error^2) -- with identical weights the frequent
        # expert keeps the larger width unless its own measured error says otherwise
        for kind in range(len(m.experts[0].linears())):
            names = [e.linears()[kind].name for e in m.experts]
            for a in names:
                for b in names:
                    la, lb = layers[a], layers[b]
                    ba, bb = str(la["bits"]), str(lb["bits"])
                    if ba == bb:
                        continue
                    now = la["token_share"] * la["error_by_bits"][ba] ** 2 + lb["token_share"] * lb["error_by_bits"][bb] ** 2
                    swapped = la["token_share"] * la["error_by_bits"][bb] ** 2 + lb["token_share"] * lb["error_by_bits"][ba] ** 2
                    assert now <= swapped + 1e-12, (a, b, la, lb)
