"""The golden reference models: shipped weights reproduce their recorded held-out metrics, are really trained, and
the data splits / calibration samples are what they claim to be."""
from __future__ import annotations

import hashlib
import json
import os

import numpy as np
import pytest
import torch

from sparsec.golden import data, evaluate, models
from sparsec.golden.models import NAMES

GPTS = ("tiny-gpt", "tiny-moe")


@pytest.fixture(autouse=True, scope="module")
def _threads():
    old = torch.get_num_threads()
    torch.set_num_threads(min(2, old))
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def loaded():
    return {n: models.load(n) for n in NAMES}


# ----------------------------------------------------------------------------------------------------------------
def test_unknown_name_raises():
    for fn in (models.build, models.config, models.load, models.weights_path, models.metrics,
               data.calibration_arrays, lambda n: evaluate.evaluate_graph_fn(n, lambda x: x)):
        with pytest.raises(ValueError):
            fn("no-such-model")


def test_files_and_records_agree():
    for name in NAMES:
        path = models.weights_path(name)
        assert os.path.isabs(path) and os.path.isfile(path)
        rec = models.metrics(name)
        assert rec["name"] == name
        assert rec["config"]["model"] == models.config(name)
        assert rec["file_bytes"] == os.path.getsize(path)
        with open(path, "rb") as f:
            assert hashlib.sha256(f.read()).hexdigest() == rec["sha256"]
        assert rec["parameters"] == sum(p.numel() for p in models.build(name).parameters())
        assert rec["heldout"]["split"] == "heldout"
        # weights are float16, keys sorted, metadata names the model
        from safetensors import safe_open

        with safe_open(path, framework="pt") as f:
            keys = list(f.keys())
            assert keys == sorted(keys)
            assert all(f.get_slice(k).get_dtype() == "F16" for k in keys)
            meta = f.metadata()
        assert meta["name"] == name and json.loads(meta["config"]) == models.config(name)
    assert models.metrics("tiny-gpt")["heldout"]["value"] < 8
    assert models.metrics("tiny-moe")["heldout"]["value"] < 8
    assert models.metrics("digits")["heldout"]["value"] > 0.95


def test_load_shapes(loaded):
    for name in NAMES:
        module, inputs = loaded[name]
        assert not module.training
        assert all(p.dtype == torch.float32 for p in module.parameters())
        assert isinstance(inputs, tuple) and len(inputs) == 1
        with torch.no_grad():
            out = module(*inputs)
        assert isinstance(out, torch.Tensor)
        if name in GPTS:
            assert inputs[0].dtype == torch.int64 and tuple(inputs[0].shape) == (2, 16)
            assert tuple(out.shape) == (2, 16, 256)
        else:
            assert inputs[0].dtype == torch.float32 and tuple(inputs[0].shape) == (4, 64)
            assert tuple(out.shape) == (4, 10)
        # deterministic example inputs
        assert all(torch.equal(a, b) for a, b in zip(inputs, models.example_inputs(name)))


def test_hf_module_names():
    gpt = dict(models.build("tiny-gpt").named_modules())
    for n in ("embed_tokens", "layers.0.self_attn.q_proj", "layers.3.self_attn.o_proj", "layers.0.mlp.gate_proj",
              "layers.0.mlp.up_proj", "layers.0.mlp.down_proj", "layers.0.input_layernorm",
              "layers.0.post_attention_layernorm", "norm", "lm_head"):
        assert n in gpt, n
    moe = dict(models.build("tiny-moe").named_modules())
    for n in ("layers.0.block_sparse_moe.gate", "layers.0.block_sparse_moe.experts.7.w1",
              "layers.0.block_sparse_moe.experts.7.w2", "layers.0.block_sparse_moe.experts.7.w3"):
        assert n in moe, n
    assert set(dict(models.build("digits").named_children())) == {"fc1", "fc2", "fc3"}


@pytest.mark.parametrize("name", NAMES)
def test_recorded_metric_reproduced(name, loaded):
    """The shipped weights reproduce the recorded metric (GPTs: the first windows of the held-out text, recorded as
    ``heldout_limited``; the full split is checked by the slow test below; digits: all 450 held-out images)."""
    module, _ = loaded[name]
    rec = models.metrics(name)
    lim = rec["heldout_limited"]
    got = evaluate.evaluate_module(name, module, limit=lim["limit"])
    assert got["metric"] == lim["metric"] == rec["heldout"]["metric"]
    if name in GPTS:
        assert got["eval_tokens"] == lim["eval_tokens"] == lim["limit"] * models.config(name)["context_length"]
        assert got["value"] == pytest.approx(lim["value"], rel=1e-4)
        assert lim["value"] < 8
    else:
        assert got["eval_samples"] == lim["eval_samples"] == lim["limit"]
        assert abs(got["value"] - lim["value"]) <= 1.0 / lim["limit"] + 1e-12
        full = evaluate.evaluate_module(name, module)
        assert full["eval_samples"] == rec["heldout"]["eval_samples"] == 450
        assert abs(full["value"] - rec["heldout"]["value"]) <= 1.0 / 450 + 1e-12


@pytest.mark.slow
@pytest.mark.parametrize("name", GPTS)
def test_recorded_metric_reproduced_full(name, loaded, request):
    if "slow" not in (request.config.getoption("markexpr") or ""):
        pytest.skip("full held-out evaluation: run with -m slow")
    module, _ = loaded[name]
    want = models.metrics(name)["heldout"]
    got = evaluate.evaluate_module(name, module)
    assert got["eval_tokens"] == want["eval_tokens"]
    assert got["value"] == pytest.approx(want["value"], rel=1e-4)


@pytest.mark.parametrize("name", NAMES)
def test_fresh_init_is_far_worse(name, loaded):
    torch.manual_seed(1234)
    fresh = models.build(name).eval()
    trained = models.metrics(name)["heldout"]["value"]
    if name in GPTS:
        got = evaluate.evaluate_module(name, fresh, limit=8)["value"]
        assert got > 100 and got > 10 * trained  # uniform over 256 bytes is 256
    else:
        got = evaluate.evaluate_module(name, fresh)["value"]
        assert got < 0.5 and trained > got + 0.4


def test_graph_fn_matches_module(loaded):
    module, _ = loaded["tiny-gpt"]
    fn = evaluate.module_fn(module)
    a = evaluate.evaluate_graph_fn("tiny-gpt", fn, limit=4)
    b = evaluate.evaluate_module("tiny-gpt", module, limit=4)
    assert a == b and a["eval_tokens"] == 4 * 128 and a["split"] == "heldout"
    # a model that knows nothing is uniform: perplexity 256 exactly
    u = evaluate.evaluate_graph_fn("tiny-gpt", lambda x: np.zeros((*x.shape, 256), np.float32), limit=2)
    assert u["value"] == pytest.approx(256.0, rel=1e-12)


def test_moe_uses_experts():
    from sparsec.golden.train import expert_usage

    module, _ = models.load("tiny-moe")
    usage = np.asarray(expert_usage("tiny-moe", module, limit=24))
    cfg = models.config("tiny-moe")
    assert usage.shape == (cfg["num_layers"], cfg["num_experts"])
    np.testing.assert_allclose(usage.sum(axis=1), cfg["num_experts_per_tok"], atol=1e-3)
    used = (usage >= 0.01).sum(axis=1)  # experts receiving >= 1% of the tokens
    assert (used >= 6).all(), usage


# ----------------------------------------------------------------------------------------------------------------
def test_text_splits_disjoint():
    text = data.text_bytes()
    assert 400_000 < len(text) < 600_000
    train, held = data.text_splits()
    assert train.dtype == np.uint8 and held.dtype == np.uint8
    i = data.text_split_index()
    assert len(train) == i and len(train) + len(held) == len(text)
    assert train.tobytes() == text[:i] and held.tobytes() == text[i:]  # contiguous, non-overlapping positions
    assert 0.09 < len(held) / len(text) < 0.11
    # held-out windows read only held-out bytes (inputs and targets)
    x, y = evaluate.heldout_windows("tiny-gpt")
    assert x.shape[1] == 128 and (x[:, 1:] == y[:, :-1]).all()
    assert len(x) * 128 + 1 <= len(held)
    assert x.reshape(-1).tobytes() == held[: x.size].astype(np.int64).tobytes()
    # deterministic
    t2, h2 = data.text_splits()
    assert np.array_equal(train, t2) and np.array_equal(held, h2)


def test_digits_splits():
    xtr, ytr, xte, yte = data.digits_splits()
    assert xtr.dtype == np.float32 and xte.dtype == np.float32 and ytr.dtype == np.int64 and yte.dtype == np.int64
    assert xtr.shape == (1347, 64) and xte.shape == (450, 64)
    assert xtr.min() >= 0 and xtr.max() <= 1 and xte.max() <= 1
    assert np.bincount(yte).min() >= 43 and np.bincount(yte).max() <= 46  # stratified
    x2 = data.digits_splits()
    assert np.array_equal(x2[0], xtr) and np.array_equal(x2[3], yte)


@pytest.mark.parametrize("name", NAMES)
def test_calibration_arrays(name):
    arrs = data.calibration_arrays(name)
    assert isinstance(arrs, list) and len(arrs) == 1
    a = arrs[0]
    again = data.calibration_arrays(name)[0]
    other = data.calibration_arrays(name, seed=1)[0]
    assert np.array_equal(a, again) and not np.array_equal(a, other)
    if name in GPTS:
        assert a.dtype == np.int64 and a.shape == (128, 128)
        assert a.min() >= 0 and a.max() < 256
        assert data.calibration_arrays(name, n=3, seq_len=1000)[0].shape == (3, 128)  # clipped to the context
        assert data.calibration_arrays(name, n=5, seq_len=32)[0].shape == (5, 32)
        train, held = data.text_splits()
        tb = train.tobytes()
        for w in data.calibration_arrays(name, n=16, seq_len=64, seed=3)[0]:
            assert tb.find(w.astype(np.uint8).tobytes()) >= 0  # a window of the training text
    else:
        assert a.dtype == np.float32 and a.shape == (256, 64)
        assert data.calibration_arrays(name, n=10, seq_len=7)[0].shape == (10, 64)
        xtr, _, xte, _ = data.digits_splits()
        rows = {r.tobytes() for r in xtr}
        assert all(r.tobytes() in rows for r in a)


# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_torch_frontend_matches_module(name, loaded, request):
    """sparsec's torch frontend + executor reproduce each golden model (and raise tiny-moe's blocks to MoE nodes)."""
    if "slow" not in (request.config.getoption("markexpr") or ""):
        pytest.skip("torch.export of the golden models: run with -m slow")
    pytest.importorskip("sparsec.compressor.onnx_ops")
    from sparsec.compressor.executor import Executor
    from sparsec.compressor.frontends.torch import load_torch

    module, inputs = loaded[name]
    g = load_torch(module, inputs, name=name)
    other = torch.from_numpy(data.calibration_arrays(name, n=3)[0])
    for x in (inputs[0], other):
        got = Executor(g).run({g.inputs[0]: x.numpy()})[g.outputs[0]]
        with torch.no_grad():
            want = module(x).numpy()
        assert got.shape == want.shape
        assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()
    if name == "tiny-moe":
        assert sum(type(n).__name__ == "MoE" for n in g.nodes) == models.config(name)["num_layers"]
