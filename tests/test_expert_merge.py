"""Expert merging (MC-SMoE): lossless on identical experts, alignment undoes permutations, router rewrite, CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from sparsec.calibration.data import CalibrationSet
from sparsec.compressor.executor import Executor
from sparsec.compressor.formats import Dense
from sparsec.compressor.frontends.torch import load_torch
from sparsec.compressor.ir import MoE
from sparsec.compressor.pipeline import PassContext, Recipe, build_passes, run_passes, PassSpec
from sparsec.passes.expert_merge import align_to, expert_arrays, group_experts, permute

from . import models as tm


def mixtral_graph(seed=0):
    model = tm.build("mixtral", seed=seed)
    return model, load_torch(model, model.example_inputs())


def calib(g, n=8, t=16, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, 128, size=(n, t)).astype(np.int64)
    return CalibrationSet({g.inputs[0]: ids[: n - 2]}, "test", False, 3), CalibrationSet({g.inputs[0]: ids[n - 2 :]}, "test", False, 2)


def run_merge(g, **params):
    r = Recipe(passes=[PassSpec("expert_merge", params)])
    fit, held = calib(g)
    ctx = PassContext(r, calib=fit, heldout=held)
    return run_passes(g, build_passes(r), ctx)[0]


def test_identical_experts_merge_losslessly():
    _, g = mixtral_graph()
    rng = np.random.default_rng()
    for m in [n for n in g.nodes if isinstance(n, MoE)]:
        src = m.experts[0]
        for e in m.experts[1:]:
            for a, b in zip(e.linears(), src.linears()):
                a.weight = Dense(b.weight.materialize().copy())
    ids = rng.integers(0, 128, size=(2, 9)).astype(np.int64)
    before = Executor(g).run({g.inputs[0]: ids})[g.outputs[0]]
    for method in ("mcsmoe", "average"):
        g2 = g.copy()
        rep = run_merge(g2, experts=2, method=method)
        assert all(len(m.experts) == 2 for m in g2.nodes if isinstance(m, MoE))
        after = Executor(g2).run({g.inputs[0]: ids})[g.outputs[0]]
        assert tm.rel(before, after) < 1e-5, method
        assert all(r.error is not None and r.error < 1e-5 for r in rep.rows)


def test_alignment_undoes_a_random_permutation():
    _, g = mixtral_graph()
    m = next(n for n in g.nodes if isinstance(n, MoE))
    a = expert_arrays(m.experts[0])
    rng = np.random.default_rng()
    p = rng.permutation(a["up"].shape[0])
    shuffled = permute(a, p)
    q = align_to(a, shuffled)
    back = permute(shuffled, q)
    for k in a:
        np.testing.assert_array_equal(back[k], a[k])
    # a permuted expert computes the same function
    x = rng.standard_normal((5, a["up"].shape[1]))

    def f(w):
        h = (x @ w["gate"].T) / (1 + np.exp(-(x @ w["gate"].T))) * (x @ w["up"].T)
        return h @ w["down"].T

    np.testing.assert_allclose(f(shuffled), f(a), rtol=1e-5, atol=1e-6)


def test_grouping_centres_are_the_most_frequent():
    rng = np.random.default_rng()
    freq = rng.random(8)
    sim = rng.random((8, 8))
    centres, assign = group_experts(freq, sim, 3)
    assert sorted(centres) == sorted(np.argsort(-freq)[:3].tolist())
    for e in range(8):
        if e in centres:
            assert centres[assign[e]] == e
        else:
            assert assign[e] == int(np.argmax([sim[e, c] for c in centres]))


def test_merge_rewrites_router_and_keeps_topk_valid():
    _, g = mixtral_graph()
    rep = run_merge(g, experts=0.5, method="mcsmoe")
    for m in [n for n in g.nodes if isinstance(n, MoE)]:
        assert len(m.experts) == 2 and m.router.out_features == 4
        assert sorted(set(m.expert_map)) == [0, 1]
    # groups in the report cover every original expert exactly once
    for name, info in rep.extra["groups"].items():
        assert sorted(sum(info["groups"], [])) == [0, 1, 2, 3]
    # ONNX export of the merged MoE runs in onnxruntime with the executor's outputs
    import onnxruntime as ort

    from sparsec.compressor.onnx_export import to_onnx

    ids = np.random.default_rng().integers(0, 128, size=(2, 7)).astype(np.int64)
    sess = ort.InferenceSession(to_onnx(g).SerializeToString(), providers=["CPUExecutionProvider"])
    o = sess.run(None, {g.inputs[0]: ids})[0]
    assert tm.rel(Executor(g).run({g.inputs[0]: ids})[g.outputs[0]], o) < 1e-5


def sparsec(*args):
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    return subprocess.run([sys.executable, "-m", "sparsec", *map(str, args)], capture_output=True, text=True, env=env, timeout=600)


def test_cli_merge_on_pt2_and_error_without_moe(tmp_path):
    model = tm.build("mixtral")
    ep = torch.export.export(model, model.example_inputs())
    torch.export.save(ep, str(tmp_path / "moe.pt2"))
    p = sparsec("compress", tmp_path / "moe.pt2", "--merge-experts", "0.5", "--no-build", "-o", tmp_path / "out", "--json")
    assert p.returncode == 0, p.stderr
    doc = json.loads(p.stdout)
    rows = doc["passes"][0]["rows"]
    assert len(rows) >= 1 and all(r["status"] == "compressed" for r in rows)
    assert all(r["bytes_after"] < r["bytes_before"] for r in rows)
    assert doc["quality"]["onnx_vs_executor_rel_error"] < 1e-4
    dense = tm.build("llama")
    torch.export.save(torch.export.export(dense, dense.example_inputs()), str(tmp_path / "dense.pt2"))
    p = sparsec("compress", tmp_path / "dense.pt2", "--merge-experts", "0.5", "--no-build", "-o", tmp_path / "o2")
    assert p.returncode == 10 and "no MoE layer" in p.stderr
    assert not (tmp_path / "o2").exists()
