"""Calibration: sources, generated inputs, the held-out split, block-by-block statistics (against numpy)."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from sparsec.calibration.data import load_calibration, static_batch
from sparsec.calibration.sequential import sequential
from sparsec.calibration.stats import GramStats, relative_output_error
from sparsec.compressor.errors import CalibrationError
from sparsec.compressor.executor import Executor, Observer

from .test_nm_prune import raised_graph


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _ids(rng, n, t, vocab=50):
    return rng.integers(0, vocab, size=(n, t)).astype(np.int64)


def test_sources_npz_npy_directory(tmp_path):
    rng = np.random.default_rng()
    g = raised_graph(rng, layers=1)
    a, b = _ids(rng, 5, 12), _ids(rng, 3, 12)
    np.savez(tmp_path / "a.npz", ids=a)
    np.save(tmp_path / "b.npy", b)
    fit, held = load_calibration(g, str(tmp_path / "a.npz"), samples=100, seq_len=None, seed=0, heldout=0.2)
    assert fit.num_samples == 4 and held.num_samples == 1 and not fit.generated
    # more samples asked for (--calib-samples 100) than the file holds: said once; the default (128) asks nothing
    assert fit.warnings == [f"{tmp_path / 'a.npz'} holds 5 calibration samples, fewer than the 100 asked for: using 5"]
    fit, _ = load_calibration(g, str(tmp_path / "a.npz"), samples=128, seq_len=None, seed=0, heldout=0.2)
    assert fit.num_samples == 4 and not fit.warnings
    np.testing.assert_array_equal(np.concatenate([fit.arrays["ids"], held.arrays["ids"]]), a)
    fit, _ = load_calibration(g, str(tmp_path / "b.npy"), samples=100, seq_len=None, seed=0, heldout=0)
    np.testing.assert_array_equal(fit.arrays["ids"], b)
    d = tmp_path / "dir"
    d.mkdir()
    np.savez(d / "0.npz", ids=a)
    np.savez(d / "1.npz", ids=b)
    fit, held = load_calibration(g, str(d), samples=100, seq_len=8, seed=0, heldout=2)
    both = np.concatenate([fit.arrays["ids"], held.arrays["ids"]])
    np.testing.assert_array_equal(both, np.concatenate([a, b])[:, :8])  # --seq-len crops token inputs
    assert held.num_samples == 2


def test_bad_sources_are_typed_errors(tmp_path):
    rng = np.random.default_rng()
    g = raised_graph(rng, layers=1)
    np.savez(tmp_path / "wrong.npz", tokens=_ids(rng, 2, 4))
    np.savez(tmp_path / "range.npz", ids=_ids(rng, 2, 4, vocab=500))
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    (tmp_path / "x.txt").write_text("hello")
    (tmp_path / "junk.npz").write_bytes(rng.bytes(200))  # np.load would read any non-zip bytes as a pickle
    for path, msg in (("wrong.npz", "input names"), ("range.npz", "token ids"), ("obj.npy", "object"), ("x.txt", ".npz"),
                      ("missing.npz", "no such file"), ("junk.npz", "not a zip archive")):  # fmt: skip
        with pytest.raises(CalibrationError, match=msg):
            load_calibration(g, str(tmp_path / path), samples=8, seq_len=None, seed=0, heldout=0.5)


def test_generated_inputs_warn_and_respect_spec():
    rng = np.random.default_rng()
    g = raised_graph(rng, layers=1, vocab=37)
    fit, held = load_calibration(g, None, samples=20, seq_len=9, seed=5, heldout=0.25)
    assert fit.generated and any("poor calibration set" in w for w in fit.warnings)
    assert fit.num_samples == 15 and held.num_samples == 5 and fit.arrays["ids"].shape == (15, 9)
    ids = np.concatenate([fit.arrays["ids"], held.arrays["ids"]])
    assert ids.min() >= 0 and ids.max() < 37 and len(np.unique(ids)) > 20
    fit2, _ = load_calibration(g, None, samples=20, seq_len=9, seed=5, heldout=0.25)
    np.testing.assert_array_equal(fit.arrays["ids"], fit2.arrays["ids"])  # same seed -> same data
    fit3, _ = load_calibration(g, None, samples=20, seq_len=9, seed=6, heldout=0.25)
    assert not np.array_equal(fit.arrays["ids"], fit3.arrays["ids"])


def test_samples_subset_is_seeded(tmp_path):
    rng = np.random.default_rng()
    g = raised_graph(rng, layers=1)
    a = _ids(rng, 40, 6)
    np.savez(tmp_path / "a.npz", ids=a)
    f1, h1 = load_calibration(g, str(tmp_path / "a.npz"), samples=10, seq_len=None, seed=1, heldout=0.2)
    f2, _ = load_calibration(g, str(tmp_path / "a.npz"), samples=10, seq_len=None, seed=1, heldout=0.2)
    assert f1.num_samples + h1.num_samples == 10
    np.testing.assert_array_equal(f1.arrays["ids"], f2.arrays["ids"])
    rows = {tuple(r) for r in a}
    assert all(tuple(r) in rows for r in f1.arrays["ids"])


def test_static_batch_models(tmp_path):
    rng = np.random.default_rng()
    g = raised_graph(rng, layers=1)
    g.values["ids"].shape = (4, 10)
    assert static_batch(g) == 4
    fit, held = load_calibration(g, None, samples=19, seq_len=None, seed=0, heldout=0.25)
    assert fit.batch_size == 4 and fit.num_samples % 4 == 0 and held.num_samples % 4 == 0 and held.num_samples >= 4
    left = 19 - fit.num_samples - held.num_samples
    assert left > 0 and any(f"{left} of 19 calibration samples left out" in w for w in fit.warnings), fit.warnings
    fit8, held8 = load_calibration(g, None, samples=16, seq_len=None, seed=0, heldout=0.25)
    assert fit8.num_samples + held8.num_samples == 16 and not any("left out" in w for w in fit8.warnings)
    # --seq-len on generated data for a model with no dynamic axis besides the batch: said nothing
    fit5, _ = load_calibration(g, None, samples=16, seq_len=5, seed=0, heldout=0.25)
    assert fit5.arrays["ids"].shape[1] == 10 and any("--seq-len 5 does nothing" in w for w in fit5.warnings), fit5.warnings
    g.values["ids"].shape = ("b", "t")
    fit5, _ = load_calibration(g, None, samples=16, seq_len=5, seed=0, heldout=0.25)
    assert fit5.arrays["ids"].shape[1] == 5 and not any("--seq-len" in w for w in fit5.warnings), fit5.warnings
    g.values["ids"].shape = (4, 10)
    assert all(b["ids"].shape == (4, 10) for b in fit.batches() + held.batches())
    ex = Executor(g)
    for b in fit.batches():
        ex.run(b)  # the executor's input check accepts every batch
    # too few samples, or an array missing an axis: the message names the array and the shape as given
    np.savez(tmp_path / "one.npz", ids=_ids(rng, 1, 10)[0])
    with pytest.raises(CalibrationError, match=r"static batch size of 4: give at least 4 calibration samples \(got 1: 'ids' \[1, 10\]\)"):
        load_calibration(g, str(tmp_path / "one.npz"), samples=8, seq_len=None, seed=0, heldout=0.25)
    np.savez(tmp_path / "flat.npz", ids=_ids(rng, 1, 40)[0])
    with pytest.raises(CalibrationError, match=r"'ids' has shape \[40\] \(read as one sample, \[1, 40\]\), the model expects \[4, 10\]"):
        load_calibration(g, str(tmp_path / "flat.npz"), samples=8, seq_len=None, seed=0, heldout=0.25)


class _Capture(Observer):
    def __init__(self, names):
        self.names, self.x = set(names), {n: [] for n in names}

    def wants_linear(self, name):
        return name in self.names

    def linear_input(self, name, x):
        self.x[name].append(x.double().numpy())


def test_sequential_statistics_use_fit_split_and_match_numpy():
    """Gram matrices from step.collect equal XᵀX of the fit split's activations (held-out split: its own), with
    q and k sharing one matrix, and block 1 seeing block 0's outputs."""
    rng = np.random.default_rng()
    g = raised_graph(rng, layers=2)
    fit, held = load_calibration(g, None, samples=12, seq_len=7, seed=0, heldout=0.25)
    names = [l.name for l in g.linears()]
    cap_fit, cap_held = _Capture(names), _Capture(names)
    ex = Executor(g)
    for b in fit.batches():
        ex.run(b, observer=cap_fit)
    for b in held.batches():
        ex.run(b, observer=cap_held)
    seen = 0
    for step in sequential(g, fit, held):
        lins = [l.name for l in step.linears()]
        if not lins:
            continue
        st = step.collect(lins)
        sh = step.collect(lins, heldout=True)
        for n in lins:
            X = np.concatenate(cap_fit.x[n])
            np.testing.assert_allclose(st[n].H.numpy(), X.T @ X, rtol=1e-6, atol=1e-6)
            assert st[n].n == X.shape[0] == fit.tokens()
            np.testing.assert_allclose(st[n].norms(), np.linalg.norm(X, axis=0), rtol=1e-6)
            Xh = np.concatenate(cap_held.x[n])
            np.testing.assert_allclose(sh[n].H.numpy(), Xh.T @ Xh, rtol=1e-6, atol=1e-6)
            seen += 1
        if step.block.kind == "block":
            q, k = lins[:2]
            assert st[q] is st[k]  # one Gram matrix for layers reading the same value
    assert seen == len(names)


def test_relative_output_error_matches_activations():
    rng = np.random.default_rng()
    X = rng.standard_normal((300, 24))
    W = rng.standard_normal((10, 24)).astype(np.float32)
    W2 = W + 0.1 * rng.standard_normal(W.shape).astype(np.float32)
    s = GramStats(24)
    s.add(torch.from_numpy(X))
    ref = np.linalg.norm(X @ (W - W2).T.astype(np.float64)) / np.linalg.norm(X @ W.T.astype(np.float64))
    assert relative_output_error(W, W2, s.gram()) == pytest.approx(ref, rel=1e-7)


def test_collect_resumes_only_while_earlier_nodes_are_unchanged():
    """A later collect resumes from the states kept before the last collected layers; rewriting a layer *before*
    them invalidates that shortcut (the statistics must then reflect the rewrite)."""
    from sparsec.compressor.formats import Dense

    rng = np.random.default_rng()
    g = raised_graph(rng, layers=1)
    fit, _ = load_calibration(g, None, samples=8, seq_len=5, seed=0, heldout=0)

    def fresh(name):
        cap = _Capture([name])
        ex = Executor(g)
        for b in fit.batches():
            ex.run(b, observer=cap)
        X = np.concatenate(cap.x[name])
        return X.T @ X

    for step in sequential(g, fit):
        if step.block.kind != "block":
            continue
        np.testing.assert_allclose(step.collect(["layers.0.up"])["layers.0.up"].H.numpy(), fresh("layers.0.up"), rtol=1e-6)
        up = g.linear("layers.0.up")
        up.weight = Dense(up.weight.materialize() * 2)  # at the kept point: later collects resume there
        np.testing.assert_allclose(step.collect(["layers.0.down"])["layers.0.down"].H.numpy(), fresh("layers.0.down"), rtol=1e-6)
        q = g.linear("layers.0.q")
        q.weight = Dense(q.weight.materialize() * 3)  # before the kept point: must restart from the block start
        np.testing.assert_allclose(step.collect(["layers.0.down"])["layers.0.down"].H.numpy(), fresh("layers.0.down"), rtol=1e-6)


def test_generated_sequences_fit_learned_positions():
    """A GPT-2-style model with 64 learned positions: generated calibration stays within them, so a plain
    `--nm 2:4` without --seq-len works."""
    from sparsec.calibration.data import generate
    from sparsec.compressor.executor import Executor
    from sparsec.compressor.frontends.torch import load_torch

    from . import models as tm

    m = tm.build("gpt2", maxpos=48)
    g = load_torch(m, m.example_inputs())
    arrays = generate(g, 3, None, 0)
    assert arrays["input_ids"].shape == (3, 48)
    Executor(g).run(arrays)


def test_generated_inputs_take_a_symbolic_feature_dim_from_the_linear_reading_it(tmp_path):
    """An MLP exported with every axis dynamic (input ['N', 'F']): generated data takes F from the first Linear's
    input width, so the export check and calibration run (the model then matches onnxruntime)."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from sparsec.calibration.data import generate
    from sparsec.compressor.frontends.onnx import load_onnx

    rng = np.random.default_rng()
    f, h = int(rng.integers(5, 40)), int(rng.integers(3, 20))
    w = rng.standard_normal((f, h)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])], "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", "F"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", h])],
        [numpy_helper.from_array(w, "w")],
    )
    path = tmp_path / "mlp.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    g = load_onnx(str(path))
    arrays = generate(g, 3, None, 0)
    assert arrays["x"].shape == (3, f)
    got = Executor(g).run(arrays)[g.outputs[0]]
    (ref,) = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, arrays)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)


def test_calibration_longer_than_the_positions_or_disagreeing_on_a_dim_is_a_calibration_error(tmp_path):
    """Sequences longer than the learned position table fail as bad calibration data naming --seq-len (and pass with
    it, cropped); inputs sharing a named dim (seq of input_ids and attention_mask) must agree on it."""
    from sparsec.compressor.frontends.torch import load_torch

    from . import models as tm

    rng = np.random.default_rng()
    m = tm.build("gpt2", maxpos=48)
    g = load_torch(m, m.example_inputs())
    np.savez(tmp_path / "long.npz", input_ids=rng.integers(0, 50, (3, 60)))
    with pytest.raises(CalibrationError, match=r"60 tokens.*48 positions.*--seq-len 48"):
        load_calibration(g, str(tmp_path / "long.npz"), samples=8, seq_len=None, seed=0, heldout=0)
    fit, _ = load_calibration(g, str(tmp_path / "long.npz"), samples=8, seq_len=48, seed=0, heldout=0)
    assert fit.arrays["input_ids"].shape == (3, 48)
    Executor(g).run(fit.arrays)
    shared = [n for n in g.inputs if g.values[n].shape and len(g.values[n].shape) > 1 and isinstance(g.values[n].shape[1], str)]
    if len(shared) >= 2 and len({g.values[n].shape[1] for n in shared}) == 1:  # e.g. input_ids + attention_mask
        arr = {n: rng.integers(0, 2, (2, 8 if i == 0 else 9)) for i, n in enumerate(g.inputs)}
        np.savez(tmp_path / "dims.npz", **arr)
        with pytest.raises(CalibrationError, match="must have the same size"):
            load_calibration(g, str(tmp_path / "dims.npz"), samples=8, seq_len=None, seed=0, heldout=0)


def test_inputs_sharing_a_named_dim_must_agree():
    from sparsec.calibration.data import validate_arrays
    from sparsec.compressor.ir import Graph

    g = Graph("two")
    g.inputs = ["ids", "mask"]
    g.add_value("ids", "int64", ("batch", "seq"))
    g.add_value("mask", "int64", ("batch", "seq"))
    rng = np.random.default_rng()
    ok = {"ids": rng.integers(0, 9, (2, 7)), "mask": np.ones((2, 7), np.int64)}
    assert set(validate_arrays(ok, g, "x")) == {"ids", "mask"}
    with pytest.raises(CalibrationError, match=r"'mask' has seq=5 \(dim 1\) but 'ids' has seq=7"):
        validate_arrays({"ids": ok["ids"], "mask": np.ones((2, 5), np.int64)}, g, "x")


def test_heldout_count_never_leaves_fewer_samples_to_fit_than_it_holds_out(tmp_path):
    """--heldout N (a count) near the sample count: 31 of 32 left SparseGPT one sample to fit on, 32 silently held out
    16. A count is capped at half the samples, as a fraction is (at most 0.5), and says so; smaller counts are exact."""
    rng = np.random.default_rng()
    g = raised_graph(rng, layers=1)
    np.savez(tmp_path / "a.npz", ids=_ids(rng, 32, 6))
    for asked, held, warned in ((31, 16, True), (32, 16, True), (40, 16, True), (16, 16, False), (5, 5, False)):
        fit, ho = load_calibration(g, str(tmp_path / "a.npz"), samples=128, seq_len=None, seed=0, heldout=asked)
        assert (fit.num_samples, ho.num_samples) == (32 - held, held), asked
        assert any(f"--heldout {asked} of 32" in w for w in fit.warnings) == warned, (asked, fit.warnings)
    fit, ho = load_calibration(g, str(tmp_path / "a.npz"), samples=128, seq_len=None, seed=0, heldout=0.5)
    assert (fit.num_samples, ho.num_samples) == (16, 16) and not fit.warnings


def test_calibration_flags_that_change_nothing_say_so(tmp_path):
    """--seq-len longer than the data's sequences, --seq-len on a model with no token input and --batch-size on a model
    whose export fixed its batch size changed nothing, silently; --heldout 1.5 became 2 samples. Now the first three
    are warnings naming what was used and the last a recipe error."""
    from onnx import TensorProto, helper, numpy_helper

    from sparsec.compressor.frontends.onnx import load_onnx
    from sparsec.compressor.pipeline import CalibrationSpec

    rng = np.random.default_rng()
    w = rng.standard_normal((16, 8)).astype(np.float32)
    gr = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                           [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 16])],
                           [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 8])], [numpy_helper.from_array(w, "w")])  # fmt: skip
    onnx.save(helper.make_model(gr, opset_imports=[helper.make_opsetid("", 17)]), str(tmp_path / "m.onnx"))
    g = load_onnx(str(tmp_path / "m.onnx"))
    np.savez(tmp_path / "c.npz", x=rng.standard_normal((12, 16)).astype(np.float32))
    fit, held = load_calibration(g, str(tmp_path / "c.npz"), samples=12, seq_len=8, seed=0, heldout=0.25, batch_size=3)
    assert fit.batch_size == 2 and held is not None
    assert any("--seq-len 8 cuts nothing: the model has no token-sequence input" in m for m in fit.warnings), fit.warnings
    assert any("--batch-size 3: the model's batch size is fixed at 2" in m for m in fit.warnings), fit.warnings
    fit, _ = load_calibration(g, str(tmp_path / "c.npz"), samples=12, seq_len=None, seed=0, heldout=0.25, batch_size=8)
    assert not fit.warnings, fit.warnings  # the defaults: nothing to say
    with pytest.raises(ValueError, match="whole number"):
        CalibrationSpec(heldout=1.5).validate()
    CalibrationSpec(heldout=2).validate()
    emb = rng.standard_normal((50, 16)).astype(np.float32)
    gr = helper.make_graph([helper.make_node("Gather", ["emb", "ids"], ["h"]), helper.make_node("MatMul", ["h", "w"], ["y"])], "t",
                           [helper.make_tensor_value_info("ids", TensorProto.INT64, ["b", "s"])],
                           [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", "s", 8])],
                           [numpy_helper.from_array(emb, "emb"), numpy_helper.from_array(w, "w")])  # fmt: skip
    onnx.save(helper.make_model(gr, opset_imports=[helper.make_opsetid("", 17)]), str(tmp_path / "t.onnx"))
    gt = load_onnx(str(tmp_path / "t.onnx"))
    np.savez(tmp_path / "ids.npz", ids=rng.integers(0, 50, (8, 10)))
    fit, _ = load_calibration(gt, str(tmp_path / "ids.npz"), samples=8, seq_len=32, seed=0, heldout=0.25)
    assert any("--seq-len 32 cuts nothing: the calibration sequences are 10 tokens long" in m for m in fit.warnings), fit.warnings
    fit, _ = load_calibration(gt, str(tmp_path / "ids.npz"), samples=8, seq_len=6, seed=0, heldout=0.25)
    assert fit.arrays["ids"].shape[1] == 6 and not fit.warnings, fit.warnings


def test_generated_data_stays_within_a_pt2_programs_sequence_bound(tmp_path):
    """A `.pt2` exported with `Dim("seq", max=64)` (a model with 64 learned positions, kept as a parameter, not an
    Embedding) got 128-token generated inputs and failed (exit 5: 'Add failed ... 128 ... 64'); its program's range
    constraints bound the default length now. An explicit --seq-len is kept as given."""
    import torch

    from sparsec.compressor.compress import load_model

    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.pos = torch.nn.Embedding(100, 32), torch.nn.Parameter(torch.randn(64, 32))
            self.fc = torch.nn.Linear(32, 32)

        def forward(self, ids):
            return self.fc(self.emb(ids) + self.pos[: ids.shape[1]])

    ids = torch.randint(0, 100, (2, 9))
    dyn = ({0: torch.export.Dim("b", max=32), 1: torch.export.Dim("seq", min=2, max=64)},)
    path = tmp_path / "m.pt2"
    torch.export.save(torch.export.export(M().eval(), (ids,), dynamic_shapes=dyn), str(path))
    g = load_model(str(path)).graph
    fit, held = load_calibration(g, None, samples=12, seq_len=None, seed=0, heldout=0.25)
    assert fit.arrays[g.inputs[0]].shape[1:] == (64,), fit.arrays[g.inputs[0]].shape
    ex = Executor(g)
    for b in fit.batches():
        ex.run(b)
    fit, _ = load_calibration(g, None, samples=12, seq_len=16, seed=0, heldout=0.25)
    assert fit.arrays[g.inputs[0]].shape[1:] == (16,)


def test_a_directory_of_sequences_of_several_lengths_is_one_calibration_set(tmp_path):
    """Text calibration comes as files of different sequence lengths (one sample per file, or batches per length).
    Each length is a group of its own: every batch is taken from one group, every sample is fitted or held out
    exactly once, --seq-len cuts the longer ones (merging the groups it makes equal), and the statistics a pass
    collects count every token. They were refused ("do not stack across files")."""
    from sparsec.compressor.report import calibration_line

    rng = np.random.default_rng()
    g = raised_graph(rng, layers=1)
    lens = rng.permutation([6, 9, 13])
    parts = [_ids(rng, 4, int(lens[0])), _ids(rng, 3, int(lens[1])), _ids(rng, 1, int(lens[2]))[0]]
    single = _ids(rng, 1, int(lens[0]))[0]  # 1-D: one sample, the same length as the first file
    d = tmp_path / "dir"
    d.mkdir()
    for i, a in enumerate([*parts, single]):
        np.savez(d / f"{i}.npz", ids=a)
    every = sorted(tuple(r) for a in [*parts, single] for r in np.atleast_2d(a))
    fit, held = load_calibration(g, str(d), samples=100, seq_len=None, seed=0, heldout=2)
    assert fit.num_samples + held.num_samples == 9 and held.num_samples == 2
    batches = fit.batches() + held.batches()
    assert sorted(tuple(r) for b in batches for r in b["ids"]) == every
    assert all(b["ids"].ndim == 2 and b["ids"].shape[0] <= fit.batch_size for b in batches)
    assert {b["ids"].shape[1] for b in batches} == set(int(x) for x in lens)
    assert fit.tokens() + held.tokens() == sum(len(r) for r in every)
    for part in (fit, held):  # the groups (and the report's list of lengths) shortest first, whatever the files' order
        assert [gg["ids"].shape[1] for gg in part.groups] == sorted(gg["ids"].shape[1] for gg in part.groups)
    shapes = [s for part in (fit, held) for s in (part.sample_shapes()["ids"] if len(part.groups) > 1 else [part.sample_shapes()["ids"]])]
    assert {s[0] for s in shapes} == set(int(x) for x in lens)  # (one group: its shape, not a list of them)
    line = calibration_line({"samples": 7, "heldout_samples": 2, "source": "d", "batch_size": 8,
                             "shapes": {"ids": [[6], [9]]}})  # fmt: skip
    assert "ids 6 | 9" in line
    # the statistics of a layer: every fitted token, each batch run at its own length
    lin = g.linears()[0]
    tokens = sum(step.collect([lin.name])[lin.name].n for step in sequential(g, fit) if lin in step.linears())
    assert tokens == fit.tokens()
    # --seq-len cuts the sequences longer than it; equal lengths then share a group
    cut = int(sorted(lens)[1])
    fit2, held2 = load_calibration(g, str(d), samples=100, seq_len=cut, seed=0, heldout=2)
    both = fit2.batches() + held2.batches()
    assert {b["ids"].shape[1] for b in both} == {int(min(lens)), cut}
    assert sorted(tuple(r) for b in both for r in b["ids"]) == sorted(tuple(r[:cut]) for r in every)
    assert len(fit2.groups) + len(held2.groups) <= 3
    # the same seed picks the same samples from several groups
    f3, _ = load_calibration(g, str(d), samples=5, seq_len=None, seed=3, heldout=0)
    f4, _ = load_calibration(g, str(d), samples=5, seq_len=None, seed=3, heldout=0)
    assert f3.num_samples == 5 and [b["ids"].tolist() for b in f3.batches()] == [b["ids"].tolist() for b in f4.batches()]


@pytest.mark.parametrize("slice_from", ["end", "start"])
def test_generated_data_stays_within_a_buffer_sliced_by_the_sequence_length(slice_from, tmp_path):
    """A constant buffer sliced by the sequence length at run time bounds the generated length too: an ONNX MPT with
    a 32-long ALiBi buffer (``alibi[:, -t:, -t:]``) or a causal mask (``mask[:t, :t]``) failed on generated 128-token
    inputs (exit 5, 'Add failed ... 128 ... 32'). The length is the buffer's (the shortest), and the model runs."""
    from sparsec.compressor.compress import load_model

    rows = int(np.random.default_rng().integers(16, 40))

    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.q, self.k = torch.nn.Embedding(100, 32), torch.nn.Linear(32, 32), torch.nn.Linear(32, 32)
            self.register_buffer("buf", torch.randn(1, rows + 8, rows))  # its 2nd axis longer: the sliced axes bound
            self.register_buffer("long", torch.randn(1, 300, 300))  # a longer buffer does not

        def forward(self, ids):
            t, x = ids.shape[1], self.emb(ids)
            b = self.buf[:, -t:, -t:] if slice_from == "end" else self.buf[:, :t, :t]
            return torch.softmax(self.q(x) @ self.k(x).transpose(1, 2) + b + self.long[:, :t, :t], -1) @ x

    path = tmp_path / "m.onnx"
    torch.onnx.export(M().eval(), (torch.randint(0, 100, (2, 8)),), str(path), dynamo=False, input_names=["ids"],
                      dynamic_axes={"ids": {0: "b", 1: "t"}})  # fmt: skip
    g = load_model(str(path)).graph
    fit, _ = load_calibration(g, None, samples=8, seq_len=None, seed=0, heldout=0.25)
    assert fit.arrays["ids"].shape[1:] == (rows,), fit.arrays["ids"].shape
    ex = Executor(g)
    for b in fit.batches():
        ex.run(b)


@pytest.mark.parametrize("offset", [0, 2])
def test_sequences_past_an_offset_position_table_name_the_usable_length(offset, tmp_path):
    """RoBERTa's position ids start at padding_idx + 1 = 2: a table of P rows takes P - 2 tokens. The hint for too long
    calibration data names that length (it said --seq-len P, which failed again); data of P - 1 tokens, within the
    table's rows but past its usable length, get the same one-line error instead of an executor error; the usable
    length itself passes."""
    from sparsec.compressor.frontends.onnx import load_onnx

    rows = int(np.random.default_rng().integers(20, 40))

    class Enc(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.tok, self.pos = torch.nn.Embedding(50, 16), torch.nn.Embedding(rows, 16)
            self.fc = torch.nn.Linear(16, 16)

        def forward(self, ids):
            pos = torch.arange(ids.shape[1]).unsqueeze(0) + offset
            return self.fc(self.tok(ids) + self.pos(pos))

    path = tmp_path / "enc.onnx"
    torch.onnx.export(Enc().eval(), (torch.randint(0, 50, (2, 8)),), str(path), dynamo=False, input_names=["ids"],
                      dynamic_axes={"ids": {0: "b", 1: "t"}})  # fmt: skip
    g = load_onnx(str(path))
    usable = rows - offset
    rng = np.random.default_rng()
    for length in (rows + 7, rows - 1 if offset else rows + 1):
        np.savez(tmp_path / "d.npz", ids=rng.integers(0, 50, (3, length)))
        with pytest.raises(CalibrationError, match=rf"{length} tokens, the model takes {usable} .*--seq-len {usable}\)"):
            load_calibration(g, str(tmp_path / "d.npz"), samples=8, seq_len=None, seed=0, heldout=0)
    fit, _ = load_calibration(g, str(tmp_path / "d.npz"), samples=8, seq_len=usable, seed=0, heldout=0)
    assert fit.arrays["ids"].shape == (3, usable)
    Executor(g).run(fit.arrays)
