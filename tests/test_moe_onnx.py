"""MoE blocks in ONNX files as torch.onnx writes them (TorchScript and dynamo exporters, external .data weights):
raised to MoE nodes by dataflow + numbers (compressor/frontends/moe_onnx.py), checked against onnxruntime on the
original file and against the PyTorch module; expert merging through the CLI; identical experts merge losslessly;
a block sparsec cannot express keeps its plain layers with a warning."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch

ort = pytest.importorskip("onnxruntime", reason="onnxruntime is needed as the independent reference")

from sparsec.compressor.executor import Executor
from sparsec.compressor.frontends.onnx import load_onnx
from sparsec.compressor.ir import Linear, MoE
from sparsec.compressor.onnx_export import to_onnx

from . import models as tm
from .moe_variants import VARIANTS, build_variant

EXPORTERS = [("torchscript", 17), ("dynamo", 18)]
RAISED = ["mixtral", "qwen", "switch", "switch_sorted", "dense_sigmoid", "topk_softmax", "stacked", "fused_chunk",
          pytest.param("fused_interleaved", marks=pytest.mark.slow)]  # suite time: fused_chunk covers the default run


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    cache = {}

    def get(variant, exporter, opset, identical=False):
        key = (variant, exporter, opset, identical)
        if key not in cache:
            model = build_variant(variant, identical=identical)
            path = str(tmp_path_factory.mktemp(f"{variant}-{exporter}") / "model.onnx")
            tm.export_onnx(model, path, exporter, opset)
            cache[key] = (model, path)
        return cache[key]

    return get


def ort_run(src, ids):
    if isinstance(src, onnx.ModelProto):
        src = src.SerializeToString()
    return ort.InferenceSession(src, providers=["CPUExecutionProvider"]).run(None, {"input_ids": ids})[0]


def fresh_ids(rng, b=None, t=None):
    b = b or int(rng.integers(1, 4))
    t = t or int(rng.integers(2, 10))
    return rng.integers(0, 128, size=(b, t)).astype(np.int64)


def moes(g):
    return [n for n in g.nodes if isinstance(n, MoE)]


# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("exporter,opset", EXPORTERS, ids=[e for e, _ in EXPORTERS])
@pytest.mark.parametrize("variant", RAISED)
def test_torch_onnx_moe_is_raised(exported, variant, exporter, opset):
    model, path = exported(variant, exporter, opset)
    if exporter == "dynamo":
        assert any(f.endswith(".data") for f in __import__("os").listdir(__import__("os").path.dirname(path)))
    g = load_onnx(path)
    assert not g.meta.get("import_warnings"), g.meta.get("import_warnings")
    n_experts, top_k, renorm, score = VARIANTS[variant][1]
    ms = moes(g)
    assert [m.name for m in ms] == ["model.layers.0.block_sparse_moe", "model.layers.1.block_sparse_moe"]
    for m in ms:
        assert len(m.experts) == n_experts and m.top_k == top_k and m.expert_map is None
        if renorm is not None:
            assert m.renormalize == renorm and m.score == score
        # route i is served by the module's experts[i] (the route -> expert mapping was solved, not assumed)
        for i, e in enumerate(m.experts):
            if variant == "stacked":  # one Linear per slice of the stacked w1 / w3 / w2 (compressible on their own)
                assert sorted(lin.name.rsplit(".", 2)[-2:][0] for lin in e.linears()) == ["w1", "w2", "w3"]
                assert all(lin.name.endswith(f".{i}") for lin in e.linears()), [lin.name for lin in e.linears()]
            elif variant.startswith("fused"):  # gate_up_proj[i] cut into its gate and up rows, down_proj[i]
                names = sorted(lin.name.split("block_sparse_moe.")[1] for lin in e.linears())
                assert names == [f"down_proj.{i}", f"gate_up_proj.{i}.part0", f"gate_up_proj.{i}.part1"], names
                block = model.model.layers[int(m.name.split(".")[2])].block_sparse_moe
                gu = block.gate_up_proj.detach().numpy()[i].T  # [2F, D]
                half = gu.shape[0] // 2
                gate, up = (gu[0::2], gu[1::2]) if variant == "fused_interleaved" else (gu[:half], gu[half:])
                got = sorted((lin.weight.data for lin in e.linears() if "gate_up" in lin.name), key=lambda a: float(a[0, 0]))
                assert all(np.array_equal(a, b) for a, b in zip(got, sorted([gate, up], key=lambda a: float(a[0, 0]))))
                if variant == "fused_interleaved":  # the per-expert biases are the Linears' own
                    down = next(lin for lin in e.linears() if "down_proj" in lin.name)
                    assert np.allclose(down.bias, block.down_proj_bias.detach().numpy()[i])
            else:
                assert all(f".experts.{i}." in lin.name for lin in e.linears()), [lin.name for lin in e.linears()]
        assert m.meta["moe_verify_error"] <= 1e-5
    plain = [n.name for n in g.nodes if isinstance(n, Linear)]
    assert not any(".experts." in n or ".block_sparse_moe.w" in n or "_proj." in n for n in plain)  # every routed expert layer is inside an MoE
    if variant == "qwen":  # the shared expert (added next to the routed ones) stays outside as plain layers
        assert sum(".shared_expert" in n for n in plain) == 2 * 4
    rng = np.random.default_rng()
    for ids in (fresh_ids(rng), fresh_ids(rng, 1, 2), fresh_ids(rng, 3, 9)):
        ref = ort_run(path, ids)
        got = Executor(g).run({"input_ids": ids})[g.outputs[0]]
        assert tm.rel(got, ref) <= 1e-4
        with torch.no_grad():
            mod = model(torch.from_numpy(ids)).numpy()
        assert tm.rel(got, mod) <= 1e-4
    # sparsec's ONNX export of the raised graph (MoE written in sparsec's form) agrees with the executor
    out = to_onnx(g)
    ids = fresh_ids(rng)
    assert tm.rel(ort_run(out, ids), Executor(g).run({"input_ids": ids})[g.outputs[0]]) <= 1e-5


@pytest.mark.parametrize("exporter,opset", EXPORTERS, ids=[e for e, _ in EXPORTERS])
def test_unexpressible_routing_keeps_plain_layers_with_a_warning(exported, exporter, opset):
    """Squared routing weights are no softmax/sigmoid top-k mixture: the block must not be raised to a wrong MoE."""
    model, path = exported("squared", exporter, opset)
    g = load_onnx(path)
    assert not moes(g)
    warns = g.meta.get("import_warnings", [])
    for layer in (0, 1):
        w = [x for x in warns if f"'model.layers.{layer}.block_sparse_moe'" in x]
        assert len(w) == 1 and "not raised" in w[0] and "mixture" in w[0], warns
    experts = [n for n in g.nodes if isinstance(n, Linear) and ".experts." in n.name]
    assert len(experts) == 2 * 4 * 3  # imported individually: pruning and quantization still apply
    # ... but not the routers, by default: pruning one changes which expert a token takes
    from sparsec.compressor.pipeline import Selection

    routers = [n.name for n in g.nodes if isinstance(n, Linear) and n.meta.get("moe_router")]
    assert len(routers) == 2, routers
    picked = Selection().decide(g, "test")
    assert all(not picked[r][0] and "MoE router" in picked[r][1] for r in routers)
    assert all(picked[e.name][0] for e in experts)
    assert all(Selection(include=[r]).decide(g, "test")[r][0] for r in routers)  # named: compressed
    ids = fresh_ids(np.random.default_rng())
    assert tm.rel(Executor(g).run({"input_ids": ids})[g.outputs[0]], ort_run(path, ids)) <= 1e-4


@pytest.mark.parametrize("exporter,opset", EXPORTERS, ids=[e for e, _ in EXPORTERS])
@pytest.mark.parametrize("variant", ["mixtral", pytest.param("stacked", marks=pytest.mark.slow)])
def test_identical_experts_from_onnx_merge_losslessly(exported, variant, exporter, opset):
    from .test_expert_merge import run_merge

    _, path = exported(variant, exporter, opset, identical=True)
    g = load_onnx(path)
    assert [len(m.experts) for m in moes(g)] == [4, 4]
    (rep,), _ = run_merge(g, experts=2)
    assert [len(m.experts) for m in moes(g)] == [2, 2]
    assert all(r.error is not None and r.error < 1e-5 for r in rep.rows)
    ids = fresh_ids(np.random.default_rng())
    before = ort_run(path, ids)
    assert tm.rel(Executor(g).run({"input_ids": ids})[g.outputs[0]], before) <= 1e-5
    assert tm.rel(ort_run(to_onnx(g), ids), before) <= 1e-5


def cli(capsys, *args):
    from sparsec.cli.main import main

    with pytest.raises(SystemExit) as e:
        main([str(a) for a in args])
    out = capsys.readouterr()
    return e.value.code, out.out, out.err


@pytest.mark.parametrize("exporter,opset", EXPORTERS, ids=[e for e, _ in EXPORTERS])
def test_cli_merges_experts_of_a_torch_onnx_export(exported, exporter, opset, tmp_path, capsys):
    from sparsec.compressor.artifact import load_graph

    _, path = exported("mixtral", exporter, opset)
    code, out, err = cli(capsys, "compress", path, "--merge-experts", "2", "-o", tmp_path / "out", "--no-build", "-q", "--json")
    assert code == 0, err
    doc = json.loads(out)
    rows = doc["passes"][0]["rows"]
    assert doc["passes"][0]["name"] == "expert_merge" and [r["shape_after"] for r in rows] == [[2], [2]]
    assert all(r["status"] == "compressed" and r["bytes_after"] < r["bytes_before"] for r in rows)
    g = load_graph(tmp_path / "out")
    assert [len(m.experts) for m in moes(g)] == [2, 2]
    rng = np.random.default_rng()
    for ids in (fresh_ids(rng), fresh_ids(rng, 1, 2)):
        got = ort_run(str(tmp_path / "out" / "model.onnx"), ids)
        assert tm.rel(got, Executor(g).run({"input_ids": ids})[g.outputs[0]]) <= 1e-4


def test_module_import_falls_back_to_the_onnx_raiser():
    """An nn.Module whose block the torch frontend cannot identify (Qwen-style: the shared expert is part of the block's
    output) still imports as MoE: the exported graph's routed experts are raised by the ONNX raiser, the shared expert
    stays plain layers, and no warning is left for the block."""
    from sparsec.compressor.frontends.torch import load_torch

    model = build_variant("qwen")
    g = load_torch(model, model.example_inputs())
    assert [(len(m.experts), m.top_k, m.renormalize) for m in moes(g)] == [(6, 2, False)] * 2
    assert not g.meta.get("import_warnings"), g.meta.get("import_warnings")
    ids = fresh_ids(np.random.default_rng())
    with torch.no_grad():
        ref = model(torch.from_numpy(ids)).numpy()
    assert tm.rel(Executor(g).run({g.inputs[0]: ids})[g.outputs[0]], ref) <= 1e-4


class _ReturnsRouterLogits(torch.nn.Module):
    """One Mixtral decoder layer whose model also returns the MoE's router logits (HF ``output_router_logits``)."""

    def __init__(self):
        super().__init__()
        self.m = tm.build("mixtral")

    def forward(self, input_ids):
        x = self.m.model.embed_tokens(input_ids)
        layer = self.m.model.layers[0]
        x = x + layer.self_attn(layer.input_layernorm(x))
        h, logits = layer.block_sparse_moe(layer.post_attention_layernorm(x))
        return x + h, logits


def test_router_logits_used_outside_keep_a_plain_router(tmp_path):
    import warnings

    model = _ReturnsRouterLogits().eval()
    path = str(tmp_path / "logits.onnx")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.zeros(2, 8, dtype=torch.int64),), path, dynamo=False, opset_version=17,
                          input_names=["input_ids"], output_names=["output", "router_logits"],
                          dynamic_axes={"input_ids": {0: "batch", 1: "seq"}})  # fmt: skip
    g = load_onnx(path)
    (m,) = moes(g)
    assert len(m.experts) == 4 and m.top_k == 2 and not g.meta.get("import_warnings")
    routers = [n for n in g.nodes if isinstance(n, Linear) and n.out_features == 4]
    assert len(routers) == 1  # the router stays as a plain layer for the logits output, next to the MoE's own copy
    ids = fresh_ids(np.random.default_rng())
    ref = ort.InferenceSession(path, providers=["CPUExecutionProvider"]).run(None, {"input_ids": ids})
    got = Executor(g).run({"input_ids": ids})
    for name, r in zip(g.outputs, ref):
        assert tm.rel(got[name], r) <= 1e-5


@pytest.mark.parametrize("variant", ["dense_sigmoid", "mixtral"])
def test_static_shape_export_is_raised(variant, tmp_path):
    """Exported without dynamic axes: the block is identified and verified at its one size (several samples)."""
    import warnings

    model = build_variant(variant)
    path = str(tmp_path / "static.onnx")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, model.example_inputs(b=2, t=8), path, dynamo=False, opset_version=17, input_names=["input_ids"])
    g = load_onnx(path)
    n_experts, top_k, renorm, score = VARIANTS[variant][1]
    assert [(len(m.experts), m.top_k, m.renormalize, m.score) for m in moes(g)] == [(n_experts, top_k, renorm, score)] * 2
    ids = np.random.default_rng().integers(0, 128, size=(2, 8)).astype(np.int64)
    ref = ort.InferenceSession(path, providers=["CPUExecutionProvider"]).run(None, {"input_ids": ids})[0]
    assert tm.rel(Executor(g).run({"input_ids": ids})[g.outputs[0]], ref) <= 1e-4


def test_stacked_weights_split_into_linears_without_an_moe(tmp_path):
    """A batched product with a constant stacked weight outside any MoE (per-head projections: ``einsum`` with the
    weight transposed, a ``matmul`` broadcasting a 2-D x over the stack) is split into one Linear per slice and the
    graph still computes the same (against onnxruntime and the module); equations that are not per-slice matmuls
    are left alone."""
    from sparsec.compressor.frontends.unstack import _einsum_weight

    w = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    assert _einsum_weight("etd,edf->etf", w) is w
    np.testing.assert_array_equal(_einsum_weight("etd,efd->etf", w), np.swapaxes(w, 1, 2))
    np.testing.assert_array_equal(_einsum_weight("hbtd , hdf -> hbtf", w), w)
    for eq in ("etd,edf->tf", "etd,edf->etd", "td,edf->etf", "etd,fde->etf", "etd,edf->ef"):
        assert _einsum_weight(eq, w) is None, eq

    class Heads(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(50, 16)
            self.wq = torch.nn.Parameter(torch.randn(3, 8, 16) * 0.25)  # [H, out, in]: einsum with the transpose
            self.wv = torch.nn.Parameter(torch.randn(3, 16, 8) * 0.25)  # [H, in, out]: matmul broadcasting x

        def forward(self, ids):
            x = self.emb(ids)[0]  # [T, 16]
            q = torch.einsum("htd,hfd->htf", x.unsqueeze(0).expand(3, -1, -1), self.wq)
            v = torch.matmul(x, self.wv)  # [3, T, 8]
            return torch.tanh(q * v).sum(0)

        def example_inputs(self):
            return (torch.randint(0, 50, (1, 7)),)

    model = Heads().eval()
    rng = np.random.default_rng()
    for exporter, opset in EXPORTERS:
        path = str(tmp_path / f"heads_{exporter}.onnx")
        tm.export_onnx(model, path, exporter, opset)
        g = load_onnx(path)
        lins = [n for n in g.nodes if isinstance(n, Linear)]
        assert len(lins) == 6 and not moes(g), [n.name for n in lins]
        for t in (1, 5):
            ids = rng.integers(0, 50, (1, t)).astype(np.int64)
            got = Executor(g).run({g.inputs[0]: ids})[g.outputs[0]]
            with torch.no_grad():
                ref = model(torch.from_numpy(ids)).numpy()
            assert tm.rel(got, ref) <= 1e-5


@pytest.mark.parametrize("exporter,opset", EXPORTERS, ids=[e for e, _ in EXPORTERS])
def test_experts_gathered_from_a_3d_weight_are_raised(exporter, opset, tmp_path):
    """DBRX-style code applies its experts as slices of one 3-D weight gathered by the routed expert ids (``w1[ids]``
    then ``bmm``). That stayed dense (63% of a model's weights, named in an import warning). The block is now rewritten
    per expert and raised to an MoE node whose experts are the slices, computing what torch computes."""
    import torch.nn.functional as F

    class Dbrx(torch.nn.Module):
        def __init__(self, d=32, f=48, n=4):
            super().__init__()
            self.router = torch.nn.Linear(d, n, bias=False)
            self.w1, self.w2 = torch.nn.Parameter(torch.randn(n, f, d)), torch.nn.Parameter(torch.randn(n, f, d))

        def forward(self, x):
            h = x.reshape(-1, x.shape[-1])
            p, idx = F.softmax(self.router(h), -1).max(-1)
            g = torch.bmm(h[:, None], self.w1[idx].transpose(1, 2))
            return (torch.bmm(F.silu(g), self.w2[idx])[:, 0] * p[:, None]).reshape(x.shape)

    torch.manual_seed(int(np.random.default_rng().integers(1 << 30)))
    model, path, x = Dbrx().eval(), tmp_path / "m.onnx", torch.randn(2, 5, 32)
    if exporter == "torchscript":
        torch.onnx.export(model, (x,), str(path), dynamo=False, opset_version=opset, input_names=["x"],
                          dynamic_axes={"x": {0: "b", 1: "s"}})  # fmt: skip
    else:
        torch.onnx.export(model, (x,), str(path), dynamo=True, opset_version=opset, input_names=["x"],
                          dynamic_shapes=({0: torch.export.Dim("b"), 1: torch.export.Dim("s")},), external_data=True)  # fmt: skip
    g = load_onnx(str(path))
    assert not g.meta.get("import_warnings"), g.meta.get("import_warnings")
    (m,) = moes(g)
    assert (len(m.experts), m.top_k, m.meta["moe_verify_error"] <= 1e-5) == (4, 1, True)
    w1, w2 = model.w1.detach().numpy(), model.w2.detach().numpy()
    for e, ex in enumerate(m.experts):  # expert e holds the slices e, as Linear weights [out, in]
        assert ex.gate is None and ex.act == "silu"
        assert np.array_equal(ex.up.weight.data, w1[e]) and np.array_equal(ex.down.weight.data, w2[e].T)
    assert not [n.name for n in g.nodes if isinstance(n, Linear) and "router" not in n.name]
    rng = np.random.default_rng()
    for shape in ((1, 1), (2, 7), (3, 4)):
        xs = rng.standard_normal((*shape, 32)).astype(np.float32)
        with torch.no_grad():
            ref = model(torch.from_numpy(xs)).numpy()
        assert tm.rel(Executor(g).run({"x": xs})[g.outputs[0]], ref) <= 1e-5


# (exporter, opset, transposed weights, biases, top-k). The TorchScript exporter writes index_add_ as a ScatterElements
# without a reduction, which keeps one of a token's k slots: its top-2 export computes something else than torch
# (onnxruntime agrees with sparsec on it), so TorchScript is tested at top-1.
BATCHED_MM = [("dynamo", 18, False, False, 2), ("dynamo", 18, True, True, 2), ("torchscript", 17, False, False, 1),
              ("torchscript", 17, True, True, 1)]  # fmt: skip


def batched_mm_model(transposed, bias, top_k, act="silu", route="softmax"):
    from .moe_variants import BatchedMmMoe

    model = tm.build("mixtral", seed=int(np.random.default_rng().integers(1 << 30)))
    for layer in model.model.layers:
        layer.block_sparse_moe = BatchedMmMoe(64, 96, top_k=top_k, transposed=transposed, bias=bias, act=act, route=route)
    return model.eval()


@pytest.mark.parametrize("exporter,opset,transposed,bias,top_k", BATCHED_MM,
                         ids=[f"{e}-{'t' if t else 'n'}{'-bias' if b else ''}-top{k}" for e, _, t, b, k in BATCHED_MM])  # fmt: skip
def test_transformers_batched_mm_experts_are_raised(exporter, opset, transposed, bias, top_k, tmp_path):
    """transformers v5 keeps experts as 3-D parameters and, with its export-friendly ``batched_mm`` implementation,
    gathers each routed slot's slices (``gate_up_proj[expert_ids]``, ``down_proj[expert_ids]``, biases too) for
    ``torch.bmm``. Each block is raised to an MoE node whose experts are Linear layers holding the slices (fused
    gate_up cut into gate and up, per-expert biases their own), named by role whatever the exporter called the weight
    (the dynamo exporter's ``val_41``), and the graph computes what torch and onnxruntime compute."""
    model = batched_mm_model(transposed, bias, top_k)
    path = tm.export_onnx(model, str(tmp_path / "model.onnx"), exporter, opset)
    g = load_onnx(path)
    assert not g.meta.get("import_warnings"), g.meta.get("import_warnings")
    ms = moes(g)
    assert len(ms) == 2 and all(m.meta["moe_verify_error"] <= 1e-5 for m in ms)
    for layer, m in enumerate(ms):
        assert len(m.experts) == 4 and m.top_k == top_k and (top_k == 1 or (m.renormalize, m.score) == (True, "softmax"))
        block = model.model.layers[layer].block_sparse_moe
        gu, dn = block.gate_up_proj.detach().numpy(), block.down_proj.detach().numpy()
        for e, ex in enumerate(m.experts):
            assert [lin.name.rsplit(".", 2)[-2:] for lin in ex.linears()] == [[str(e), r] for r in ("gate_proj", "up_proj", "down_proj")]
            w = gu[e].T if transposed else gu[e]  # [2F, D]
            assert np.array_equal(ex.gate.weight.data, w[:96]) and np.array_equal(ex.up.weight.data, w[96:])
            assert np.array_equal(ex.down.weight.data, dn[e].T if transposed else dn[e])
            if bias:
                b = block.gate_up_proj_bias.detach().numpy()[e]
                assert np.array_equal(ex.gate.bias, b[:96]) and np.array_equal(ex.up.bias, b[96:])
                assert np.array_equal(ex.down.bias, block.down_proj_bias.detach().numpy()[e])
    plain = [n.name for n in g.nodes if isinstance(n, Linear)]
    assert not [n for n in plain if "block_sparse_moe" in n and not n.endswith(".gate")], plain  # nothing per expert left outside
    rng = np.random.default_rng()
    for ids in (fresh_ids(rng), fresh_ids(rng, 1, 2), fresh_ids(rng, 3, 9)):
        got = Executor(g).run({"input_ids": ids})[g.outputs[0]]
        assert tm.rel(got, ort_run(path, ids)) <= 1e-4
        with torch.no_grad():
            assert tm.rel(got, model(torch.from_numpy(ids)).numpy()) <= 1e-4


@pytest.mark.parametrize("act,route", [("oss", "softmax"), ("silu", "biased")], ids=["gpt-oss", "deepseek-v3"])
def test_gathered_experts_not_raised_are_left_as_they_were(act, route, tmp_path):
    """GPT-OSS's clamped gate ``(up + 1) * gate * sigmoid(1.702 gate)`` is no activation sparsec's MoE node expresses,
    and DeepSeek-V3's selection by score + correction bias no routing it expresses: the per-expert rewrite of such a
    block is taken back (it would run every expert on every token), the graph is the exported one (same result as
    torch), the import warnings say why the experts stay dense, and the routers are left out of the passes by default
    (the DeepSeek-V3 ones were 2:4-pruned: the raiser names them only on the rewritten graph; round 14 D2)."""
    from sparsec.compressor.pipeline import Selection

    model = batched_mm_model(False, act == "oss", 2, act=act, route=route)
    path = tm.export_onnx(model, str(tmp_path / "model.onnx"), "dynamo", 18)
    g = load_onnx(path)
    assert not moes(g)
    warns = g.meta.get("import_warnings", [])
    assert sum("gathered from stacked weights in model.layers." in w and "not raised to an MoE block" in w for w in warns) == 2, warns
    assert any("product(s) with a constant weight" in w and "through GatherND" in w for w in warns), warns
    assert not [n for n in g.nodes if n.meta.get("ungathered")]
    routers = [n.name for n in g.nodes if isinstance(n, Linear) and n.name.endswith("block_sparse_moe.gate")]
    decided = Selection().decide(g, "test")
    assert len(routers) == 2 and not any(decided[r][0] for r in routers), routers
    gathers = [n for n in g.nodes if getattr(n, "op_type", "") == "GatherND" and getattr(g.constants.get(n.inputs[0]), "ndim", 0) == 3]
    assert len(gathers) == 4  # the export's gathers of the stacked weights are back (no product per expert)
    ids = fresh_ids(np.random.default_rng())
    with torch.no_grad():
        ref = model(torch.from_numpy(ids)).numpy()
    assert tm.rel(Executor(g).run({"input_ids": ids})[g.outputs[0]], ref) <= 1e-5
    if route == "biased":  # the x86 library of the exported form: torch.topk(sorted=False) (TVM's converter refused
        # sorted=0) and index_add_'s ScatterND over tokens * k rows (its shape check refused two spellings of that count)
        from sparsec.backends.build import build_to_dir
        from sparsec.backends.runtime import LoadedLib

        build_to_dir(g, "x86", tmp_path / "lib")
        lib = LoadedLib(lib_dir=tmp_path / "lib", graph=g)
        for ids in (fresh_ids(np.random.default_rng(), 3, 11), fresh_ids(np.random.default_rng(), 1, 1)):
            assert tm.rel(lib.run({"input_ids": ids})[g.outputs[0]], ort_run(path, ids)) <= 1e-5


def test_batched_mm_experts_compress_merge_and_build_through_the_cli(tmp_path):
    """The user's command on a transformers-v5-style MoE (dynamo export, weights in ``.data``): 2:4 prunes every
    expert slice (not the routers), ``--merge-experts`` merges them, the x86 library is built with the routed MoE
    lowering, and ``sparsec run`` on it matches onnxruntime on the artifact's model.onnx."""
    import json
    import subprocess
    import sys

    model = batched_mm_model(False, False, 2)
    path = tm.export_onnx(model, str(tmp_path / "model.onnx"), "dynamo", 18)
    rng = np.random.default_rng()
    np.savez(tmp_path / "calib.npz", input_ids=rng.integers(0, 128, (8, 16)).astype(np.int64))
    ids = fresh_ids(rng, 2, 7)
    np.savez(tmp_path / "x.npz", input_ids=ids)
    out = tmp_path / "out"
    p = subprocess.run([sys.executable, "-m", "sparsec", "compress", path, "--target", "x86", "--nm", "2:4", "--merge-experts", "0.5",
                        "--calib", str(tmp_path / "calib.npz"), "-o", str(out)], capture_output=True, text=True, timeout=900)  # fmt: skip
    assert p.returncode == 0, p.stderr[-2000:]
    assert "moe_lowering=routed" in p.stdout + p.stderr and "not a Linear form" not in p.stdout + p.stderr
    passes = {p["name"]: p["rows"] for p in json.loads((out / "report.json").read_text())["passes"]}
    assert [(r["shape_before"], r["shape_after"], r["status"]) for r in passes["expert_merge"]] == [([4], [2], "compressed")] * 2
    pruned = [r["name"] for r in passes["nm_prune"] if r["format_after"] == "2:4" and ".block_sparse_moe." in r["name"]]
    assert len(pruned) == 2 * 2 * 3, pruned  # 2 layers x 2 merged experts x gate / up / down
    routers = [r for r in passes["nm_prune"] if r["name"].endswith("block_sparse_moe.gate")]
    assert len(routers) == 2 and all(r["status"] == "excluded" for r in routers)
    p = subprocess.run([sys.executable, "-m", "sparsec", "run", str(out), "--inputs", str(tmp_path / "x.npz"), "-o", str(tmp_path / "y.npz")],
                       capture_output=True, text=True, timeout=600)  # fmt: skip
    assert p.returncode == 0 and "engine: lib" in p.stdout + p.stderr, p.stderr[-2000:]
    got = np.load(tmp_path / "y.npz")["output"]
    assert tm.rel(got, ort_run(str(out / "model.onnx"), ids)) <= 1e-4
