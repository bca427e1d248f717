"""One weight applied by several Linear layers (ALBERT's shared layers): the calibrated passes compress it once.

Before: each use was pruned / quantized on its own calibration statistics, so the uses got different weights and the
artifact stored one per use (an ALBERT-style model with 2:4 SparseGPT came out 1.4x larger than the dense model).
Now the weight is compressed once, on the sum of the statistics of all its uses, and stored once."""
from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest
import torch

from sparsec.compressor.artifact import load_graph
from sparsec.compressor.formats import NMSparse
from sparsec.passes.obs import obs_solve

from .test_expert_merge import cli

D, F, LAYERS = 32, 64, 3


class SharedLayer(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.up, self.down = torch.nn.Linear(D, F), torch.nn.Linear(F, D)
        self.norm = torch.nn.LayerNorm(D)

    def forward(self, x):
        return self.norm(x + self.down(torch.nn.functional.gelu(self.up(x))))


class Albert(torch.nn.Module):
    """A factorized input projection, ONE layer applied LAYERS times (ALBERT), a head."""

    def __init__(self):
        super().__init__()
        self.proj, self.layer, self.head = torch.nn.Linear(16, D), SharedLayer(), torch.nn.Linear(D, 4)

    def forward(self, x):
        h = self.proj(x)
        for _ in range(LAYERS):
            h = self.layer(h)
        return self.head(h)


@pytest.fixture()
def albert(tmp_path):
    seed = int(np.random.default_rng().integers(1 << 30))
    torch.manual_seed(seed)
    m = Albert().eval()
    rng = np.random.default_rng(seed)
    calib = rng.standard_normal((24, 6, 16)).astype(np.float32)
    path = tmp_path / "albert.onnx"
    torch.onnx.export(m, (torch.from_numpy(calib[:2]),), str(path), dynamo=False, input_names=["x"], output_names=["y"],
                      dynamic_axes={"x": {0: "b", 1: "t"}, "y": {0: "b", 1: "t"}})  # fmt: skip
    np.savez(tmp_path / "calib.npz", x=calib)
    return m, path, calib


def _shared(g, name):
    return [lin for lin in g.linears() if lin.name.startswith(f"layer.{name}")]


def test_shared_weight_is_pruned_once_on_all_uses(albert, tmp_path, capsys):
    """2:4 SparseGPT: the 3 uses of each shared Linear hold one 2:4 weight, equal to SparseGPT run on the Hessian of
    all 3 uses' inputs (collected here with torch hooks on the dense model); the artifact is smaller than the model
    (it was larger), and its library and its ONNX model agree."""
    m, path, calib = albert
    out = tmp_path / "out"
    code, _, err = cli(capsys, "compress", path, "--nm", "2:4", "--calib", tmp_path / "calib.npz", "--heldout", "0",
                       "--target", "x86", "-o", out)  # fmt: skip
    assert code == 0, err
    g = load_graph(out)
    xs = {"up": [], "down": []}
    hooks = [getattr(m.layer, k).register_forward_hook(lambda mod, i, o, k=k: xs[k].append(i[0].reshape(-1, i[0].shape[-1])))
             for k in xs]  # fmt: skip
    with torch.no_grad():
        m(torch.from_numpy(calib))
    for h in hooks:
        h.remove()
    for name in ("up", "down"):
        uses = _shared(g, name)
        assert len(uses) == LAYERS, [lin.name for lin in g.linears()]
        w = uses[0].weight
        assert isinstance(w, NMSparse) and all(u.weight.materialize().tobytes() == w.materialize().tobytes() for u in uses)
        X = torch.cat(xs[name]).double()
        assert X.shape[0] == LAYERS * calib.shape[0] * calib.shape[1]  # every use's tokens
        H = (X.T @ X / X.shape[0]).numpy()
        ref = obs_solve(getattr(m.layer, name).weight.detach().numpy(), H, nm=(2, 4), zero_dead=False).weight
        np.testing.assert_allclose(w.materialize(), ref, rtol=0, atol=2e-4 * np.abs(ref).max())
    rep = json.loads((out / "report.json").read_text())
    assert rep["model"]["bytes_after"] < 0.75 * rep["model"]["bytes"], rep["model"]  # was > bytes: stored per use
    rows = {r["name"]: r for r in rep["passes"][0]["rows"]}
    later = [n for n in rows if n.startswith("layer.up") and n != _shared(g, "up")[0].name]
    assert all("the weight compressed for" in rows[n]["note"] for n in later)
    x = np.random.default_rng().standard_normal((3, 5, 16)).astype(np.float32)
    np.savez(tmp_path / "x.npz", x=x)
    code, _, err = cli(capsys, "run", out, "--inputs", tmp_path / "x.npz", "--output", tmp_path / "y.npz", "--engine", "lib")
    assert code == 0, err
    y = np.load(tmp_path / "y.npz")["y"]
    ref = ort.InferenceSession(str(out / "model.onnx")).run(None, {"x": x})[0]
    assert np.abs(y - ref).max() <= 1e-4 * np.abs(ref).max()


@pytest.mark.parametrize("flags", [["--quant", "int4", "--quant-method", "gptq", "--group-size", "16"],
                                   ["--nm", "2:4", "--method", "wanda", "--compensate", "eora", "--rank", "4"]])
def test_shared_weight_stays_one_weight_through_quantization_and_low_rank(albert, tmp_path, capsys, flags):
    """GPTQ, Wanda and EoRA: every use of a shared Linear holds the very same compressed weight (one quantized tensor,
    one low-rank path), so the artifact stores it once."""
    _, path, _ = albert
    out = tmp_path / "out"
    code, _, err = cli(capsys, "compress", path, *flags, "--calib", tmp_path / "calib.npz", "--target", "x86", "--no-build",
                       "-o", out)  # fmt: skip
    assert code == 0, err
    g = load_graph(out)
    for name in ("up", "down"):
        uses = _shared(g, name)
        assert len(uses) == LAYERS
        ts = [u.weight.to_tensors("w") for u in uses]
        assert all(t.keys() == ts[0].keys() and all(np.array_equal(t[k], ts[0][k]) for k in t) for t in ts)
        assert uses[0].weight.describe() != "dense"
    assert g.nbytes() < sum(lin.weight.nbytes for lin in g.linears())  # stored once, not per use
    rep = json.loads((out / "report.json").read_text())
    for pr in rep["passes"]:  # every use's row measures what the pass's rows measure (EoRA: error before and after)
        uses = [r for r in pr["rows"] if r["name"].startswith("layer.up") and r["status"] == "compressed"]
        assert len(uses) == LAYERS and len({r["error_before"] is None for r in uses}) == 1, uses
        if pr["name"] == "lowrank":
            assert all(r["error"] < r["error_before"] for r in uses), uses
    # 24 samples, 1/8 held out: the end-to-end error is measured on 3 samples, which the compress output now says
    held = json.loads((out / "report.json").read_text())["quality"]["eval_samples"]
    assert held == 3 and f"measured on {held} held-out sample(s): a noisy figure" in err, err
