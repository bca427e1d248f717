"""The CLI as a user types it: inspect / compress / run / report, artifact determinism, bad input -> one-line errors
with distinct exit codes and no partial artifact."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from . import models as tm


def sparsec(*args, cwd=None):
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    p = subprocess.run([sys.executable, "-m", "sparsec", *map(str, args)], capture_output=True, text=True, cwd=cwd, env=env, timeout=600)
    return p


@pytest.fixture(scope="module")
def gpt2_onnx(tmp_path_factory):
    model = tm.build("gpt2")
    path = tmp_path_factory.mktemp("gpt2") / "gpt2.onnx"
    tm.export_onnx(model, str(path), "dynamo", 18)
    assert os.path.exists(str(path) + ".data"), "the dynamo exporter writes weights to an external .data file"
    return model, path


def test_compress_run_report_roundtrip(gpt2_onnx, tmp_path):
    model, path = gpt2_onnx
    out = tmp_path / "art"
    p = sparsec("compress", path, "--target", "x86", "-o", out, "--quiet", "--no-build")
    assert p.returncode == 0, p.stderr
    for f in ("manifest.json", "weights.safetensors", "graph.json", "model.onnx", "report.json"):
        assert (out / f).is_file(), f
    mask = os.umask(0)
    os.umask(mask)  # the directory's mode is a plain mkdir's (it is built as a temporary directory, then renamed)
    assert out.stat().st_mode & 0o777 == 0o777 & ~mask, oct(out.stat().st_mode)
    man = json.loads((out / "manifest.json").read_text())
    for k in ("sparsec_version", "source", "recipe", "target", "seed"):
        assert k in man, k
    onnx.checker.check_model(onnx.load(str(out / "model.onnx")), full_check=True)
    feeds = tm.feeds_for(model, b=2, t=7, seed=int(np.random.default_rng().integers(1 << 30)))
    np.savez(tmp_path / "in.npz", **feeds)
    p = sparsec("run", out, "--inputs", tmp_path / "in.npz", "--output", tmp_path / "o.npz")
    assert p.returncode == 0, p.stderr
    got = np.load(tmp_path / "o.npz")
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    ref = sess.run(None, feeds)
    names = [o.name for o in sess.get_outputs()]
    assert sorted(got.files) == sorted(names)
    for n, r in zip(names, ref):
        assert tm.rel(r, got[n]) < 1e-5
    p = sparsec("report", out)
    assert p.returncode == 0, p.stderr
    p = sparsec("report", out, "--json")
    assert p.returncode == 0 and "passes" in json.loads(p.stdout)


def test_report_tables_are_whole_in_a_log(gpt2_onnx, tmp_path):
    """stdout a pipe (a CI log), COLUMNS unset: rich assumed 80 columns and cut every cell ("layers.…", "compr…");
    the tables now take the width they need, every layer name and status whole."""
    _, path = gpt2_onnx
    out = tmp_path / "art"
    p = sparsec("compress", path, "--nm", "2:4", "--method", "magnitude", "-o", out, "--quiet", "--no-build")
    assert p.returncode == 0, p.stderr
    env = {k: v for k, v in os.environ.items() if k != "COLUMNS"}
    p = subprocess.run([sys.executable, "-m", "sparsec", "report", str(out)], capture_output=True, text=True, env=env, timeout=600)
    assert p.returncode == 0, p.stderr
    rows = json.loads((out / "report.json").read_text())["passes"][0]["rows"]
    assert len(rows) >= 4
    for r in rows:
        assert f" {r['name']} " in p.stdout, (r["name"], p.stdout[:3000])
    assert "…" not in p.stdout, p.stdout[:3000]


def test_same_inputs_and_seed_give_identical_artifact(gpt2_onnx, tmp_path):
    _, path = gpt2_onnx
    for d in ("a", "b"):
        p = sparsec("compress", path, "-o", tmp_path / d, "--seed", 7, "--quiet", "--no-build")
        assert p.returncode == 0, p.stderr
    files = sorted(f for f in os.listdir(tmp_path / "a") if f != "timings.json" and (tmp_path / "a" / f).is_file())
    assert "weights.safetensors" in files and "model.onnx" in files
    assert files == sorted(f for f in os.listdir(tmp_path / "b") if f != "timings.json" and (tmp_path / "b" / f).is_file())
    for f in files:
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f


def _one_line_error(p, code, *needles):
    assert p.returncode == code, (p.returncode, p.stderr)
    lines = [line for line in p.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("sparsec: "), p.stderr
    assert "Traceback" not in p.stderr
    for n in needles:
        assert n.lower() in lines[0].lower(), (n, lines[0])


def _if_model(path):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])
    c = helper.make_tensor_value_info("c", TensorProto.BOOL, [])
    then = helper.make_graph([helper.make_node("Identity", ["x"], ["t"])], "then", [], [helper.make_tensor_value_info("t", TensorProto.FLOAT, [2])])
    els = helper.make_graph([helper.make_node("Neg", ["x"], ["e"])], "else", [], [helper.make_tensor_value_info("e", TensorProto.FLOAT, [2])])
    node = helper.make_node("If", ["c"], ["y"], then_branch=then, else_branch=els, name="branch")
    g = helper.make_graph([node], "g", [x, c], [y])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(path))


def test_bad_input_errors(gpt2_onnx, tmp_path):
    _, path = gpt2_onnx
    out = tmp_path / "never"
    _one_line_error(sparsec("compress", tmp_path / "missing.onnx", "-o", out), 3, "missing.onnx")
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(os.urandom(3000))
    _one_line_error(sparsec("compress", junk, "-o", out), 3, "junk.onnx")
    iff = tmp_path / "if.onnx"
    _if_model(iff)
    _one_line_error(sparsec("compress", iff, "-o", out), 4, "If")
    _one_line_error(sparsec("compress", path, "-o", out, "--target", "z80"), 6, "z80", "x86")
    bad = tmp_path / "r.yaml"
    bad.write_text("target: x86\nsed: 3\n")
    _one_line_error(sparsec("compress", path, "-o", out, "--recipe", bad), 6, "sed")
    # executor devices this torch cannot use: a bad recipe naming the device, not an internal error (exit 70)
    import torch

    bad_devices = ["foo", "mps", "xpu"] + (["cuda", "cuda:1"] if not torch.cuda.is_available() else [f"cuda:{torch.cuda.device_count()}"])
    for dev in bad_devices:
        _one_line_error(sparsec("compress", path, "-o", out, "--no-build", "--device", dev), 6, dev)
    bad.write_text("device: foo\n")
    _one_line_error(sparsec("compress", path, "-o", out, "--recipe", bad), 6, "foo")
    bad.write_text("target: x86\nsed: 3\n")
    blocker = tmp_path / "file"
    blocker.write_text("x")
    _one_line_error(sparsec("compress", path, "-o", blocker / "sub"), 7)
    # a pseudo file system os.access calls writable for root: refused before any work
    if os.path.isdir("/proc"):
        _one_line_error(sparsec("compress", path, "-o", "/proc/sparsec_out"), 7, "/proc")
    # calibration data that does not fit the model is an error even when no pass needs calibration
    np.savez(tmp_path / "keys.npz", tokens=np.zeros((2, 8), np.int64))
    _one_line_error(sparsec("compress", path, "-o", out, "--no-build", "--calib", tmp_path / "keys.npz"), 8, "input_ids", "tokens")
    os.remove(tmp_path / "keys.npz")
    assert not out.exists(), "a failed run must not leave a partial artifact"
    assert sorted(os.listdir(tmp_path)) == sorted(["junk.onnx", "if.onnx", "file", "r.yaml"])


def test_inspect_an_artifact_directory(gpt2_onnx, tmp_path):
    """`sparsec inspect out/` shows the compressed graph: the 2:4 formats and the smaller byte count."""
    _, path = gpt2_onnx
    art = tmp_path / "art"
    assert sparsec("compress", path, "-o", art, "--quiet", "--no-build", "--nm", "2:4", "--method", "magnitude").returncode == 0
    before = json.loads(sparsec("inspect", path, "--json").stdout)
    p = sparsec("inspect", art, "--json")
    assert p.returncode == 0, p.stderr
    after = json.loads(p.stdout)
    assert after["sha256"] == before["sha256"] and after["bytes"] < before["bytes"]
    assert {l["name"] for l in after["linear"]} == {l["name"] for l in before["linear"]}
    assert any("2:4" in l["format"] for l in after["linear"]) and not any("2:4" in l["format"] for l in before["linear"])


def test_run_rejects_wrong_shapes_and_missing_inputs(gpt2_onnx, tmp_path):
    _, path = gpt2_onnx
    art = tmp_path / "art"
    assert sparsec("compress", path, "-o", art, "--quiet", "--no-build").returncode == 0
    np.savez(tmp_path / "bad.npz", input_ids=np.zeros((2, 3, 4), np.int64))
    _one_line_error(sparsec("run", art, "--inputs", tmp_path / "bad.npz"), 8, "input_ids", "rank 2")
    np.savez(tmp_path / "none.npz", other=np.zeros((2, 3), np.int64))
    p = sparsec("run", art, "--inputs", tmp_path / "none.npz")
    assert p.returncode == 8 and "input_ids" in p.stderr, p.stderr
    p = sparsec("run", tmp_path / "nothing", "--inputs", tmp_path / "none.npz")
    assert p.returncode == 13, p.stderr
    # more tokens than the model's learned positions (64): a shape error from every engine that can see it, one line
    # (onnxruntime's failure was reported as an internal error, exit 70)
    np.savez(tmp_path / "long.npz", input_ids=np.random.default_rng().integers(0, 96, (1, 65)).astype(np.int64))
    for engine in ("onnx", "ir"):
        _one_line_error(sparsec("run", art, "--inputs", tmp_path / "long.npz", "--engine", engine), 8, "input")


def test_run_refuses_files_changed_after_the_artifact_was_written(gpt2_onnx, tmp_path):
    """`sparsec run` checks the files it reads against manifest.json: a weights file or model.onnx edited afterwards
    is an artifact error (exit 13) naming the file, not outputs computed from it."""
    model, path = gpt2_onnx
    art = tmp_path / "art"
    assert sparsec("compress", path, "-o", art, "--quiet", "--no-build").returncode == 0
    np.savez(tmp_path / "in.npz", **tm.feeds_for(model, b=1, t=5, seed=0))
    assert sparsec("run", art, "--inputs", tmp_path / "in.npz").returncode == 0
    for rel, engine in (("model.onnx", "onnx"), ("weights.safetensors", "ir")):
        f = art / rel
        good = f.read_bytes()
        bad = bytearray(good)
        bad[len(bad) - 3] ^= 0x01  # one bit of the last tensor / initializer
        f.write_bytes(bytes(bad))
        _one_line_error(sparsec("run", art, "--inputs", tmp_path / "in.npz", "--engine", engine), 13, rel, "checksum")
        f.write_bytes(good)
    assert sparsec("run", art, "--inputs", tmp_path / "in.npz", "--engine", "onnx").returncode == 0


def test_existing_output_needs_force(gpt2_onnx, tmp_path):
    _, path = gpt2_onnx
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    p = sparsec("compress", path, "-o", out, "--quiet", "--no-build")
    assert p.returncode == 7 and "--force" in p.stderr
    assert (out / "keep.txt").read_text() == "user data"
    # --force replaces an artifact, never a folder of the user's
    p = sparsec("compress", path, "-o", out, "--quiet", "--no-build", "--force")
    assert p.returncode == 7 and "not a sparsec artifact" in p.stderr and len(p.stderr.strip().splitlines()) == 1
    assert (out / "keep.txt").read_text() == "user data"
    # a folder with another tool's manifest.json (a web extension) is not an artifact either: it was deleted
    ext = tmp_path / "webext"
    (ext / "src").mkdir(parents=True)
    (ext / "manifest.json").write_text('{"manifest_version": 3, "name": "x"}')
    (ext / "src" / "app.js").write_text("code")
    p = sparsec("compress", path, "-o", ext, "--quiet", "--no-build", "--force")
    assert p.returncode == 7 and "manifest.json is not sparsec's" in p.stderr, p.stderr
    assert (ext / "src" / "app.js").read_text() == "code"
    art = tmp_path / "art"
    assert sparsec("compress", path, "-o", art, "--quiet", "--no-build").returncode == 0
    p = sparsec("compress", path, "-o", art, "--quiet", "--no-build", "--force", "--nm", "2:4")
    assert p.returncode == 0, p.stderr
    # an artifact the user added files to keeps them: refused
    (art / "notes.txt").write_text("mine")
    p = sparsec("compress", path, "-o", art, "--quiet", "--no-build", "--force")
    assert p.returncode == 7 and "notes.txt" in p.stderr, p.stderr
    assert (art / "notes.txt").read_text() == "mine"


def test_usage_errors_exit_2():
    p = sparsec("compress", "--no-such-flag")
    assert p.returncode == 2 and "No such option" in p.stderr and "Traceback" not in p.stderr
    p = sparsec("inspect")
    assert p.returncode == 6 and p.stderr.startswith("sparsec: ")
    p = sparsec("--help")
    assert p.returncode == 0 and "compress" in p.stdout


@pytest.mark.parametrize("mask_rows", [pytest.param(None, marks=pytest.mark.slow), 32])
def test_compiled_library_refuses_more_tokens_than_the_model_has_positions(mask_rows, tmp_path):
    """GPT-2 style: learned positions (64 rows) and a causal-mask buffer sliced by the sequence length (64 rows, or 32
    when the blocks are built with a smaller buffer). The compiled library read past both (Gather wraps, TVM's Slice
    assumes its bound in range) and returned garbage for longer inputs; now it refuses them like onnxruntime does."""
    import torch

    torch.manual_seed(int(np.random.default_rng().integers(1 << 30)))
    model = tm.build("gpt2")
    if mask_rows is not None:
        model.h = torch.nn.ModuleList([tm.GPT2Block(64, 4, 256, mask_rows) for _ in range(len(model.h))]).eval()
    limit = mask_rows or model.wpe.num_embeddings
    path = tmp_path / "m.onnx"
    tm.export_onnx(model, str(path), "dynamo", 18)
    out = tmp_path / "art"
    p = sparsec("compress", path, "--target", "x86", "-o", out, "--quiet")
    assert p.returncode == 0, p.stderr
    assert (out / "lib").is_dir()
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng()
    for t in (limit, limit + 1):
        ids = rng.integers(0, model.wte.num_embeddings, (2, t)).astype(np.int64)
        np.savez(tmp_path / "in.npz", input_ids=ids)
        p = sparsec("run", out, "--inputs", tmp_path / "in.npz", "--output", tmp_path / "o.npz", "--engine", "lib")
        if t == limit:
            assert p.returncode == 0, p.stderr
            got = np.load(tmp_path / "o.npz")
            (ref,) = sess.run(None, {"input_ids": ids})
            assert tm.rel(ref, got[got.files[0]]) < 1e-4
        else:
            err = p.stderr.strip()
            assert p.returncode == 8 and len(err.splitlines()) == 1, p.stderr  # bad input data, as for calibration
            assert f"at most {limit}" in err and ("position rows" if mask_rows is None else "sliced by this size") in err, err


def test_bench_finds_the_original_model_by_its_recorded_name(gpt2_onnx, tmp_path, monkeypatch):
    """`sparsec bench out/` without --original: the model the artifact records (by the path compress was given, then
    by file name and sha256) is found there, in the working directory or next to the artifact; another file of that
    name is not taken."""
    import shutil

    from sparsec.backends.bench import original_graph
    from sparsec.compressor.artifact import load_artifact
    from sparsec.compressor.errors import ModelLoadError

    _, path0 = gpt2_onnx
    base = os.path.basename(path0)
    (tmp_path / "src").mkdir()
    path = tmp_path / "src" / base
    shutil.copy(path0, path)
    shutil.copy(str(path0) + ".data", str(path) + ".data")
    art = tmp_path / "art"
    assert sparsec("compress", path, "-o", art, "--quiet", "--no-build").returncode == 0
    a = load_artifact(art)
    monkeypatch.chdir(tmp_path)
    g, onnx_src, label = original_graph(a, None)  # by the recorded path
    assert label == f"original {base}" and g.inputs == a.graph.inputs
    (tmp_path / "moved").mkdir()
    for f in (path, path.with_name(base + ".data")):
        shutil.move(str(f), str(tmp_path / "moved" / f.name))
    with pytest.raises(ModelLoadError, match="--original"):  # gone from there, not here nor next to the artifact
        original_graph(a, None)
    monkeypatch.chdir(tmp_path / "moved")
    g, onnx_src, label = original_graph(a, None)  # by its name in the working directory
    assert label == f"original {base}" and g.inputs == a.graph.inputs
    other = tmp_path / base  # same name next to the artifact, another model
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])
    onnx.save(helper.make_model(helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [x], [y]),
                                opset_imports=[helper.make_opsetid("", 17)]), str(other))  # fmt: skip
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelLoadError, match="--original"):
        original_graph(a, None)


def test_tvm_log_lines_are_filtered_and_others_pass_as_they_come():
    """backends/build.py tvm_log_filtered: while TVM compiles, fd 2 is a pipe; TVM's C++ log lines are dropped, every
    other line reaches stderr (in order, before the block ends), an unfinished last line too."""
    code = (
        "import os, sys, time\n"
        "from sparsec.backends.build import tvm_log_filtered\n"
        "with tvm_log_filtered():\n"
        "    os.write(2, b'[08:49:29] /project/src/target/llvm/llvm_instance.cc:986: Warning: noise\\n')\n"
        "    print('build: compiling with TVM...', file=sys.stderr, flush=True)\n"
        "    time.sleep(0.3)\n"
        "    os.write(1, b'mid\\n')\n"
        "    os.write(2, b'last line without newline')\n"
        "print('after', file=sys.stderr, flush=True)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "SPARSEC_TVM_LOG"}
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert p.returncode == 0, p.stderr
    assert p.stderr.splitlines() == ["build: compiling with TVM...", "last line without newline", "after"], p.stderr
    assert p.stdout == "mid\n"


@pytest.mark.parametrize("exporter", ["torchscript", "pt2"])
def test_bfloat16_model_compresses_to_a_float32_artifact(exporter, tmp_path):
    """A bfloat16 model (weights and float inputs bf16): imported as float32 with a warning, compressed, and the
    artifact's model.onnx runs in onnxruntime (which has no CPU bfloat16 kernels: the original cannot run there) with
    float32 inputs and outputs, close to the bf16 module; `inspect` counts the source's 2 bytes a weight. .pt2 files
    failed to import (numpy has no bfloat16), ONNX ones wrote an ill-typed model.onnx (float32 weights, bf16 MatMuls)."""
    import torch
    import torch.nn.functional as F

    class MLP(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.f1, self.f2 = torch.nn.Linear(64, 128), torch.nn.Linear(128, 32)

        def forward(self, x):
            return self.f2(F.gelu(self.f1(x)) * 0.5)

    torch.manual_seed(int(np.random.default_rng().integers(1 << 30)))
    m = MLP().eval().to(torch.bfloat16)
    x = torch.randn(2, 8, 64, dtype=torch.bfloat16)
    path = tmp_path / ("m.pt2" if exporter == "pt2" else "m.onnx")
    if exporter == "pt2":
        torch.export.save(torch.export.export(m, (x,)), str(path))
    else:
        torch.onnx.export(m, (x,), str(path), dynamo=False, input_names=["x"], output_names=["y"], dynamic_axes={"x": {0: "b", 1: "t"}})
    p = sparsec("inspect", path, "--json")
    assert p.returncode == 0, p.stderr
    info = json.loads(p.stdout)
    assert info["bytes"] == 2 * info["params"] and info["inputs"][0]["dtype"] == "float32"
    assert any("bfloat16" in w for w in info["warnings"])
    out = tmp_path / "art"
    p = sparsec("compress", path, "-o", out, "--quiet", "--no-build", "--nm", "2:4", "--method", "magnitude", "--include", "f1")
    assert p.returncode == 0, p.stderr
    xf = x.float().numpy()
    sess = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    assert sess.get_inputs()[0].type == "tensor(float)" and sess.get_outputs()[0].type == "tensor(float)"
    (got,) = sess.run(None, {sess.get_inputs()[0].name: xf})
    w1 = m.f1.weight.detach().float().numpy()
    mask = np.zeros_like(w1, dtype=bool)  # the 2 largest of each group of 4 (magnitude 2:4), as the artifact holds
    idx = np.argsort(-np.abs(w1.reshape(128, 16, 4)), axis=-1)[..., :2]
    np.put_along_axis(mask.reshape(128, 16, 4), idx, True, axis=-1)
    h = xf @ (w1 * mask).T + m.f1.bias.detach().float().numpy()
    ref = torch.nn.functional.gelu(torch.from_numpy(h)).numpy() * 0.5 @ m.f2.weight.detach().float().numpy().T + m.f2.bias.detach().float().numpy()
    assert tm.rel(ref, got) < 1e-4  # the float32 computation of the bf16 weights, pruned
    np.savez(tmp_path / "in.npz", **{sess.get_inputs()[0].name: xf})
    p = sparsec("run", out, "--inputs", tmp_path / "in.npz", "--output", tmp_path / "o.npz", "--engine", "onnx")
    assert p.returncode == 0, p.stderr


def test_generated_inputs_the_export_cannot_take_suggest_seq_len(tmp_path):
    """A TorchScript export whose reshapes fixed the sequence length (dynamic_axes notwithstanding) fails on the
    generated calibration inputs (128 tokens): the one-line shape error says the inputs were generated, their shapes,
    and to give --calib or --seq-len / --batch-size; with the export's (16 tokens, batch 2) it compresses."""
    import torch

    class Fixed(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.e, self.f, self.g = torch.nn.Embedding(100, 64), torch.nn.Linear(64, 64), torch.nn.Linear(64, 100)

        def forward(self, ids):
            x = self.f(self.e(ids)).view(2, 16, 4, 16).transpose(1, 2).reshape(2, 16, 64)
            return self.g(x)

    path = tmp_path / "m.onnx"
    torch.onnx.export(Fixed().eval(), (torch.randint(0, 100, (2, 16)),), str(path), dynamo=False, input_names=["ids"],
                      dynamic_axes={"ids": {0: "b", 1: "t"}})  # fmt: skip
    out = tmp_path / "o"
    _one_line_error(sparsec("compress", path, "-o", out, "--no-build", "--nm", "2:4"), 5, "generated calibration inputs",
                    "--seq-len", "'ids' [")  # fmt: skip
    assert not out.exists()
    p = sparsec("compress", path, "-o", out, "--no-build", "--nm", "2:4", "--seq-len", "16", "--batch-size", "2", "--quiet")
    assert p.returncode == 0, p.stderr


def test_no_pass_compress_of_a_static_shape_export(tmp_path):
    """An export with fixed shapes (batch 1, as dynamo / torch.export give by default) compresses with no passes: the
    export check runs on generated inputs of the model's own batch size (it used batch 2 and failed with exit 8)."""
    import torch

    m = torch.nn.Sequential(torch.nn.Linear(128, 64), torch.nn.ReLU(), torch.nn.Linear(64, 32)).eval()
    path = tmp_path / "static.onnx"
    torch.onnx.export(m, (torch.randn(1, 128),), str(path), dynamo=False, input_names=["x"])
    out = tmp_path / "o"
    p = sparsec("compress", path, "-o", out, "--no-build", "--quiet")
    assert p.returncode == 0, p.stderr
    q = json.loads((out / "report.json").read_text())["quality"]
    assert q["onnx_vs_executor_rel_error"] < 1e-5


def test_integer_outputs_are_not_in_the_relative_error(tmp_path):
    """An argmax output (token ids) next to the logits does not change output_rel_error (float outputs only); the ids
    are compared exactly (output_mismatch, the fraction that differ); a model whose only output is integer reports that
    fraction as its error, saying so."""
    import torch

    class M(torch.nn.Module):
        def __init__(self, outs):
            super().__init__()
            torch.manual_seed(0)
            self.a, self.b, self.outs = torch.nn.Linear(128, 256), torch.nn.Linear(256, 64), outs

        def forward(self, x):
            y = self.b(torch.relu(self.a(x)))
            return {"logits": (y,), "both": (y, y.argmax(-1)), "ids": (y.argmax(-1),)}[self.outs]

    rng = np.random.default_rng()
    np.savez(tmp_path / "c.npz", x=rng.standard_normal((64, 128)).astype(np.float32))
    q = {}
    for outs, names in (("logits", ["logits"]), ("both", ["logits", "ids"]), ("ids", ["ids"])):
        path = tmp_path / f"{outs}.onnx"
        torch.onnx.export(M(outs).eval(), (torch.randn(4, 128),), str(path), dynamo=False, input_names=["x"],
                          output_names=names, dynamic_axes={"x": {0: "b"}})  # fmt: skip
        out = tmp_path / outs
        p = sparsec("compress", path, "--nm", "2:4", "--method", "magnitude", "--include", ".*", "--calib", tmp_path / "c.npz",
                    "-o", out, "--no-build", "--quiet")  # fmt: skip
        assert p.returncode == 0, p.stderr
        q[outs] = json.loads((out / "report.json").read_text())["quality"]
    assert q["both"]["output_rel_error"] == pytest.approx(q["logits"]["output_rel_error"], rel=1e-9)
    assert "output_mismatch" not in q["logits"] and 0 <= q["both"]["output_mismatch"] <= 1
    assert q["ids"]["output_rel_error"] == q["ids"]["output_mismatch"] == q["both"]["output_mismatch"]
    assert "integer" in q["ids"]["output_rel_error_note"] and "output_cosine" not in q["ids"]
    assert q["both"]["output_mismatch"] > 0  # 2:4 of every layer moves some argmax


@pytest.mark.parametrize("convention", ["padding", "attention"])
def test_generated_bool_masks_follow_the_models_convention(convention, tmp_path):
    """Generated calibration inputs make a bool mask all True. For a padding mask (nn.MultiheadAttention's
    key_padding_mask: True = ignore) that masks every key and the calibration failed with NaN (exit 9): such masks
    are now all False, with a warning naming the input. A mask where True means attend keeps all True, no warning."""
    import torch

    class Enc(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inp, self.out = torch.nn.Linear(32, 64), torch.nn.Linear(64, 8)
            self.attn = torch.nn.MultiheadAttention(64, 4, batch_first=True)

        def forward(self, x, mask):
            h = self.inp(x)
            pad = mask if convention == "padding" else ~mask
            return self.out(h + self.attn(h, h, h, key_padding_mask=pad, need_weights=False)[0])

    path = tmp_path / "m.onnx"
    x, mask = torch.randn(2, 16, 32), torch.zeros(2, 16, dtype=torch.bool)
    torch.onnx.export(Enc().eval(), (x, mask if convention == "padding" else ~mask), str(path), dynamo=False,
                      input_names=["x", "mask"], output_names=["y"])  # fmt: skip
    out = tmp_path / "o"
    p = sparsec("compress", path, "--quant", "int8", "--include", ".*", "-o", out, "--no-build", "--seq-len", "16", "--batch-size", "2")
    assert p.returncode == 0, p.stderr[-2000:]
    warns = json.loads((out / "report.json").read_text())["warnings"]
    flipped = [w for w in warns if "bool input" in w]
    assert (flipped and "'mask'" in flipped[0]) if convention == "padding" else not flipped, warns


def test_selection_flags_apply_to_the_recipes_passes_and_aliases_merge(gpt2_onnx, tmp_path):
    """`--exclude` / `--include` with a recipe select the layers of the recipe's passes too (they were attached only to
    passes built from flags: ignored, exit 0); a recipe pass named by an alias (`type: prune`) merges with the flag of
    that pass (it failed: "pass 'nm_prune' appears twice"); a selection with no pass to apply to is a recipe error."""
    from sparsec.cli.main import build_recipe

    (tmp_path / "r.yaml").write_text("passes:\n  - type: prune\n    nm: '4:8'\n  - type: quant\n    bits: 8\n")
    args = (None, None, None, None, None, None, None, None, None)
    r = build_recipe(str(tmp_path / "r.yaml"), *args, {"nm": "2:4", "exclude": ["mlp"], "quant": 4})
    assert [p.type for p in r.passes] == ["prune", "quant"], r.passes
    assert r.passes[0].params["nm"] == "2:4" and r.passes[1].params["bits"] == 4
    assert all(p.params["exclude"] == ["mlp"] for p in r.passes)
    r = build_recipe(str(tmp_path / "r.yaml"), *args, {"include": ["h\\.0\\."]})
    assert all(p.params["include"] == ["h\\.0\\."] for p in r.passes)
    _one_line_error(sparsec("compress", gpt2_onnx[1], "-o", tmp_path / "none", "--exclude", "mlp"), 6, "--exclude")
    # through the CLI: the recipe's pass leaves the excluded layers dense
    (tmp_path / "p.yaml").write_text("passes:\n  - type: nm_prune\n    nm: '2:4'\n    method: magnitude\n")
    out = tmp_path / "out"
    r = sparsec("compress", gpt2_onnx[1], "--recipe", tmp_path / "p.yaml", "--exclude", "mlp", "--no-build", "-o", out, "-q")
    assert r.returncode == 0, r.stderr
    rows = json.loads((out / "report.json").read_text())["passes"][0]["rows"]
    mlp = [row for row in rows if "mlp" in row["name"]]
    assert mlp and all(row["status"] == "excluded" for row in mlp), mlp
    assert any(row["status"] == "compressed" for row in rows)


def test_recipe_calibration_path_is_relative_to_the_recipe(gpt2_onnx, tmp_path):
    """A recipe's `calibration.data` is read relative to the recipe file (as a batch job file's paths are), not to the
    working directory: `sparsec batch ci/jobs.yaml` run from the repository root failed with 'no such file'."""
    model, path = gpt2_onnx
    (tmp_path / "rec").mkdir()
    np.savez(tmp_path / "rec" / "c.npz", **tm.feeds_for(model, b=8, t=10, seed=3))
    (tmp_path / "rec" / "r.yaml").write_text("calibration: {data: c.npz}\npasses:\n  - {type: nm_prune, nm: '2:4', method: wanda}\n")
    (tmp_path / "elsewhere").mkdir()
    r = sparsec("compress", path, "--recipe", tmp_path / "rec" / "r.yaml", "--no-build", "-o", tmp_path / "out", "-q",
                cwd=tmp_path / "elsewhere")  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "generated" not in r.stderr and "c.npz" in json.loads((tmp_path / "out" / "report.json").read_text())["quality"]["eval_source"]
    # what the passes ran on (the recipe keeps what was asked for): 8 samples, 1 held out (0.125), batches of 8
    used = json.loads((tmp_path / "out" / "report.json").read_text())["calibration"]
    feeds = tm.feeds_for(model, b=8, t=10, seed=3)
    assert used["samples"] == 7 and used["heldout_samples"] == 1 and used["batch_size"] == 8 and not used["generated"]
    assert used["shapes"] == {k: list(v.shape[1:]) for k, v in feeds.items()} and used["source"].endswith("c.npz")
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["calibration_used"] == used
    shown = sparsec("report", tmp_path / "out")
    assert shown.returncode == 0 and "calibration 7 samples + 1 held out from" in shown.stdout, shown.stdout


def test_already_quantized_models_are_refused_with_the_reason(tmp_path):
    """Models quantized by onnxruntime.quantization (dynamic: MatMulInteger; static QDQ: integer weights behind
    DequantizeLinear; QOperator: QGemm) were taken as they came: no Linear found (dynamic: '0 compressed', exit 0), or the
    int8 weights turned back into float32 (a 22 KB model became 140 KB) and model.onnx off the original by 1.6%. Now
    `compress` refuses them (exit 4, naming what is quantized) and `inspect` warns; the float model still compresses."""
    import torch
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, quantize_dynamic, quantize_static

    m = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 16)).eval()
    src = tmp_path / "f.onnx"
    torch.onnx.export(m, (torch.randn(4, 32),), str(src), dynamo=False, input_names=["x"], dynamic_axes={"x": {0: "b"}})
    rng = np.random.default_rng()

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter([{"x": rng.standard_normal((4, 32)).astype(np.float32)} for _ in range(4)])

        def get_next(self):
            return next(self.it, None)

    quantize_dynamic(str(src), str(tmp_path / "dyn.onnx"))
    quantize_static(str(src), str(tmp_path / "qdq.onnx"), Reader(), quant_format=QuantFormat.QDQ)
    for name, what in (("dyn", "MatMulInteger"), ("qdq", "DequantizeLinear")):
        _one_line_error(sparsec("compress", tmp_path / f"{name}.onnx", "--nm", "2:4", "-o", tmp_path / name), 4, "already quantized", what)
        assert not (tmp_path / name).exists()
        r = sparsec("inspect", tmp_path / f"{name}.onnx")
        assert r.returncode == 0 and "already quantized" in r.stdout + r.stderr, r.stderr
    r = sparsec("compress", src, "--nm", "2:4", "--no-build", "-o", tmp_path / "float", "-q")
    assert r.returncode == 0, r.stderr


def test_outcome_warnings_name_a_pass_with_no_layer_and_shared_weights(tmp_path):
    """A pass given a model with no Linear layer it can compress said nothing (exit 0, '0 compressed'); a model that
    grew because a weight several layers apply is stored per use once compressed (ALBERT-style sharing) was blamed on
    'a low-rank path of a large rank'. Both warnings now name the actual cause; the shared weight is found from the
    graph (a Linear called twice, exported by torch)."""
    import torch

    from sparsec.compressor.compress import outcome_warnings, shared_weights
    from sparsec.compressor.formats import NMSparse
    from sparsec.compressor.frontends.onnx import load_onnx
    from sparsec.compressor.report import PassReport

    (w,) = outcome_warnings(10, 10, [PassReport("nm_prune")])
    assert w.startswith("nm_prune compressed no layer: the model has no Linear layer"), w

    class Twice(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.head = torch.nn.Linear(32, 32), torch.nn.Linear(32, 4)

        def forward(self, x):
            return self.head(self.fc(torch.relu(self.fc(x))))

    torch.onnx.export(Twice().eval(), (torch.randn(2, 32),), str(tmp_path / "t.onnx"), dynamo=False, input_names=["x"])
    g = load_onnx(str(tmp_path / "t.onnx"))
    assert shared_weights(g) == []  # still dense: stored once
    fcs = [lin for lin in g.linears() if lin.out_features == 32]
    assert len(fcs) == 2
    fcs[0].weight = NMSparse.from_dense(fcs[0].weight.materialize(), 2, 4)
    (shared,) = shared_weights(g)
    assert shared.endswith(": 2 uses"), shared
    (w,) = outcome_warnings(100, 120, [], [shared])
    assert "stored once per use" in w and shared in w and "low-rank" not in w, w
    (w,) = outcome_warnings(100, 120, [])
    assert "low-rank" in w
    sliced = PassReport("slicing", totals={"untied": ["lm_head (was tied to wte)"]})
    (w,) = [m for m in outcome_warnings(100, 120, [sliced]) if "stores more bytes" in m]
    assert "slicing untied the head" in w and "low-rank" not in w, w
    # a pass that compressed a tied head (--include lm_head): that is the reason, not a low-rank path
    from sparsec.compressor.report import LayerRow

    row = LayerRow("lm_head", [64, 32], [64, 32], "dense", "2:4", 8192, 5120, status="compressed", note="untied from wte")
    pruned = PassReport("nm_prune", rows=[row])
    (w,) = [m for m in outcome_warnings(100, 120, [pruned]) if "stores more bytes" in m]
    assert "compressing 'lm_head' untied it" in w and "low-rank" not in w, w


def test_pass_totals_count_a_shared_weight_once_until_its_uses_differ(tmp_path):
    """A Linear applied twice (ALBERT-style sharing) is one tensor in the model: a pass's byte totals counted it per
    use ("1.9 MB -> 1.0 MB" for a model that grew from 744 KB to 1.1 MB). Now the "before" side counts it once, and the
    "after" side once while the pass leaves the uses identical (magnitude pruning: the same mask; Wanda: since the
    weight is compressed once on the statistics of both uses) and per use once they differ (one use excluded)."""
    import torch

    class Twice(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.head = torch.nn.Linear(64, 64), torch.nn.Linear(64, 8)

        def forward(self, x):
            return self.head(self.fc(torch.relu(self.fc(x))))

    torch.manual_seed(int(np.random.default_rng().integers(1 << 30)))
    torch.onnx.export(Twice().eval(), (torch.randn(2, 64),), str(tmp_path / "t.onnx"), dynamo=False, input_names=["x"],
                      dynamic_axes={"x": {0: "b"}})  # fmt: skip
    np.savez(tmp_path / "c.npz", x=np.random.default_rng().standard_normal((64, 64)).astype(np.float32) * 3)
    for method, extra in (("magnitude", []), ("wanda", []), ("wanda", ["--exclude", "fc#1"])):
        out = tmp_path / (method + str(len(extra)))
        r = sparsec("compress", tmp_path / "t.onnx", "--nm", "2:4", "--method", method, "--calib", tmp_path / "c.npz",
                    "--no-build", "-o", out, "-q", *extra)  # fmt: skip
        assert r.returncode == 0, r.stderr
        (p,) = json.loads((out / "report.json").read_text())["passes"]
        fc = [row for row in p["rows"] if row["shape_before"] == [64, 64]]
        head = [row for row in p["rows"] if row["shape_before"] == [8, 64]]
        assert len(fc) == 2 and len(head) == 1 and [row["status"] for row in fc] == ["compressed", "excluded" if extra else "compressed"], p["rows"]
        assert fc[0]["bytes_before"] == 64 * 64 * 4
        assert p["totals"]["bytes_before"] == 64 * 64 * 4 + head[0]["bytes_before"], p["totals"]
        after = fc[0]["bytes_after"] + (fc[1]["bytes_after"] if extra else 0)  # apart once one use is left dense
        assert p["totals"]["bytes_after"] == after + head[0]["bytes_after"], (method, extra, p["totals"])


def test_a_pass_error_names_the_recipe_file_or_the_flag(tmp_path):
    """An invalid pass setting named "recipe.passes[0]" whatever the recipe came from. Now it names the YAML file
    (and the pass's index in it), or the flag that made the pass: one line, exit 6, no artifact."""
    rec = tmp_path / "jobs" / "prune.yaml"
    rec.parent.mkdir()
    rec.write_text("passes:\n  - type: quant\n    bits: 4\n  - type: prune\n    nm: '3:2'\n")
    for args, where in ((["--recipe", rec], f"{rec}.passes[1] (nm_prune)"), (["--nm", "3:2"], "--nm (nm_prune)")):
        out = tmp_path / "out"
        r = sparsec("compress", "--example", "tiny-gpt", *args, "--no-build", "-o", out, "-q")
        assert r.returncode == 6 and where in r.stderr and "3:2" in r.stderr, (r.returncode, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1 and not out.exists(), r.stderr


def test_quiet_keeps_warnings_and_an_unmatched_exclude_warns(tmp_path):
    """`--exclude` with a typo compressed the layer the user meant to keep, without a word; and `-q` ("no tables or
    progress bars") hid every warning, that one and "no calibration data" included. Now an include / exclude pattern
    that matches no layer is a pass warning, and -q prints each warning on one line (a matching pattern: none)."""
    out = tmp_path / "out"
    r = sparsec("compress", "--example", "tiny-gpt", "--nm", "2:4", "--method", "magnitude", "--exclude", "layers.0.mlpp", "--no-build",
                "-o", out, "-q")  # fmt: skip
    assert r.returncode == 0, r.stderr
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.startswith("sparsec: warning")]
    assert any("exclude pattern 'layers.0.mlpp' matches no layer" in ln for ln in lines), r.stderr
    rep = json.loads((out / "report.json").read_text())
    assert any("matches no layer" in w for w in rep["passes"][0]["warnings"])
    r = sparsec("compress", "--example", "tiny-gpt", "--nm", "2:4", "--method", "magnitude", "--exclude", "layers.0.mlp", "--no-build",
                "-o", tmp_path / "o2", "-q")  # fmt: skip
    assert r.returncode == 0 and "matches no layer" not in r.stderr, r.stderr


def test_inspect_of_an_artifact_whose_tied_head_was_compressed_says_it_is_not_tied(gpt2_onnx, tmp_path):
    """`sparsec inspect out/` kept the import's "(tied to wte)" label on a head `--include` had compressed (the report
    said "untied from wte"), and the grown-model warning blamed a low-rank path."""
    _, path = gpt2_onnx
    before = json.loads(sparsec("inspect", path, "--json").stdout)
    heads = [x for x in before["linear"] if x.get("tied_to")]
    assert len(heads) == 1, before["linear"]
    head = heads[0]["name"]
    out = tmp_path / "out"
    r = sparsec("compress", path, "--nm", "2:4", "--method", "magnitude", "--include", head, "--no-build", "-o", out, "-q")
    assert r.returncode == 0, r.stderr
    after = {x["name"]: x for x in json.loads(sparsec("inspect", out, "--json").stdout)["linear"]}
    assert "tied_to" not in after[head] and after[head]["format"].startswith("2:4"), after[head]
    assert f"compressing '{head}' untied it" in r.stderr, r.stderr


def test_inspect_marks_the_later_use_of_a_weight_applied_twice(tmp_path):
    """A head applied twice (start / end logits from one nn.Linear): `inspect` lists both uses, names the second
    as the first's weight (its row looked like a second copy the total counted twice), and the total counts it once:
    the module's parameters plus the float scalars of the graph."""
    import torch

    class TwoUses(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.head = torch.nn.Linear(16, 16), torch.nn.Linear(16, 2)

        def forward(self, x):
            h = torch.relu(self.fc(x))
            return self.head(h)[..., 0], self.head(h * 2.0)[..., 1]

    m = TwoUses().eval()
    path = tmp_path / "two.onnx"
    torch.onnx.export(m, (torch.randn(2, 3, 16),), str(path), dynamo=False, input_names=["x"], output_names=["s", "e"])
    doc = json.loads(sparsec("inspect", path, "--json").stdout)
    rows = {x["name"]: x for x in doc["linear"]}
    later = [x for x in rows.values() if x.get("weight_of")]
    assert len(later) == 1 and later[0]["weight_of"] == "head" and "weight_of" not in rows["head"], rows
    scalars = sum(1 for v in onnx.load(str(path)).graph.initializer if v.data_type == TensorProto.FLOAT and not v.dims)
    consts = sum(1 for n in onnx.load(str(path)).graph.node if n.op_type == "Constant")  # 2.0, slice indices
    true = sum(p.numel() for p in m.parameters())
    assert true <= doc["params"] <= true + scalars + consts, (doc["params"], true)
    assert sum(x["params"] for x in rows.values()) == true + rows["head"]["params"]
    wide = subprocess.run([sys.executable, "-m", "sparsec", "inspect", str(path)], capture_output=True, text=True,
                          env=dict(os.environ, COLUMNS="200"), timeout=300)  # the table's cells do not wrap
    assert "head#1 (weight of head: counted once)" in wide.stdout, wide.stdout


CRASHES = {
    "segfault": "m.app = lambda **kw: ctypes.string_at(0)",
    # a stack overflow in the build's worker thread after `import tvm` (whose own SIGSEGV handler cannot run there):
    # what TVM's compiler recursing without end did
    "worker_stack_overflow": ("import tvm; from sparsec.compressor import interrupt; sys.setrecursionlimit(10**8); "
                              "x = []\nfor _ in range(10**6): x = [x]\n"  # repr recurses in C: the C stack overflows
                              "m.app = lambda **kw: (interrupt.report_crashes(2), interrupt.call_interruptible(repr, x))"),
}


@pytest.mark.parametrize("kind", list(CRASHES))
def test_a_crash_in_native_code_says_where(kind):
    """A segfault inside TVM's compiler (a stack overflow by recursion, in the build's worker thread) ended `sparsec
    compress` with exit 139 and nothing on stderr, even with --debug: TVM's import replaces faulthandler's SIGSEGV
    handler with one that cannot run on an overflowed stack, and worker threads had no alternate signal stack. The
    crash now names itself with the Python stack of the thread."""
    code = ("import ctypes, sys; import sparsec.cli.main as m\n" + CRASHES[kind] +
            "\nsys.argv = ['sparsec', 'inspect', 'x.onnx']; m.main()")  # fmt: skip
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.returncode != 0 and "Fatal Python error: Segmentation fault" in p.stderr, (p.returncode, p.stderr[-2000:])
    assert ("interrupt.py" if kind != "segfault" else "cli/main.py") in p.stderr, p.stderr[-2000:]


def _tiny_mlp_onnx(path):
    """A 2-Linear model (fast to compile)."""
    import torch

    m = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 32)).eval()
    torch.onnx.export(m, (torch.randn(2, 32),), str(path), dynamo=False, input_names=["x"], output_names=["y"],
                      dynamic_axes={"x": {0: "b"}, "y": {0: "b"}})  # fmt: skip
    return m


BUILD_FAULTS = {  # what the build's child does instead of compiling -> (exit code, what stderr's last line says)
    "segfault": ("ctypes.string_at(0)", 11, "TVM's compiler crashed (SIGSEGV, segmentation fault) while compiling the model for x86"),
    # TVM's compiler recursing without end: the C stack overflows (what the MPT ALiBi slice did, exit 139 before)
    "stack_overflow": ("sys.setrecursionlimit(10**8); x = []\n    for _ in range(10**6): x = [x]\n    repr(x)", 11,
                       "TVM's compiler crashed (SIGSEGV"),
    "abort": ("os.abort()", 11, "TVM's compiler crashed (SIGABRT, aborted)"),
    "killed": ("os.kill(os.getpid(), signal.SIGKILL)", 11, "was killed (SIGKILL: out of memory?)"),
    "sparsec_error": ("raise InputShapeError('input x: 9 tokens, at most 8', hint='give --seq-len 8')", 8,
                      "bad input data: input x: 9 tokens, at most 8 (give --seq-len 8)"),
    "bug": ("raise ValueError('no such slot')", 70, "ValueError: no such slot"),
}


@pytest.mark.parametrize("fault", list(BUILD_FAULTS))
def test_a_crash_in_the_build_is_one_line_and_leaves_nothing(fault, tmp_path):
    """The CLI compiles in a child process (backends/build.py, _build_in_child): a crash in TVM's native code (a
    segfault, a stack overflow, an abort, the OOM killer) is one line naming the signal, exit 11, no artifact and no
    temp file left. It was exit 139 with a page of stack dump, or with nothing at all. Errors of the child come back
    as the same exception (exit code, message); a bug in it exits 70 and --debug shows the child's traceback."""
    body, code, says = BUILD_FAULTS[fault]
    _tiny_mlp_onnx(tmp_path / "m.onnx")
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    script = ("import ctypes, os, signal, sys\nimport sparsec.cli.main as m\nimport sparsec.backends.build as b\n"
              "from sparsec.compressor.errors import InputShapeError\n"
              f"def fault(*a, **k):\n    open(os.path.join({str(tmp_path)!r}, 'child.pid'), 'w').write(str(os.getpid()))\n    {body}\n"
              f"open(os.path.join({str(tmp_path)!r}, 'cli.pid'), 'w').write(str(os.getpid()))\n"
              "b._build = fault\nsys.argv = ['sparsec'] + sys.argv[1:]; m.main()")  # fmt: skip
    for debug in ([], ["--debug"]):
        out = tmp_path / f"out{len(debug)}"
        p = subprocess.run([sys.executable, "-c", script, *debug, "compress", str(tmp_path / "m.onnx"), "-o", str(out)],
                           capture_output=True, text=True, timeout=300, env=dict(os.environ, TMPDIR=str(tmp)), cwd=tmp_path)  # fmt: skip
        child = int((tmp_path / "child.pid").read_text())
        assert child != int((tmp_path / "cli.pid").read_text()), "the build ran in the CLI's own process"
        assert p.returncode == code, (p.returncode, p.stderr[-3000:])
        last = p.stderr.strip().splitlines()[-1]
        assert says in last, p.stderr[-3000:]
        if not debug:
            assert "Fatal Python error" not in p.stderr and "Traceback" not in p.stderr, p.stderr[-3000:]
            assert [ln for ln in p.stderr.splitlines() if ln.startswith("sparsec:")] == [last], p.stderr
        elif fault == "bug":  # the child's own traceback, where the bug is
            assert "in the build's child process" in p.stderr and "in fault" in p.stderr, p.stderr[-3000:]
        assert not out.exists(), sorted(out.rglob("*"))
        left = [f for f in tmp.iterdir() if f.name != ".ses"]  # .ses: a session file a dependency keeps in TMPDIR
        assert left == [], sorted(tmp.rglob("*"))  # nor the child's temp files
        with pytest.raises(ProcessLookupError):
            os.kill(child, 0)  # reaped


@pytest.mark.parametrize("target", ["x86", "h100"])
def test_the_build_in_a_child_writes_what_the_build_in_process_writes(target, tmp_path):
    """The same artifact from the child process as from the CLI's own (SPARSEC_BUILD_IN_PROCESS=1): lib/'s files
    (h100: the generated CUDA source and the fatbin nvcc made in the child; x86: model.so behaves the same, the
    outputs of `sparsec run`, which executes it), and the report's build section."""
    import shutil

    if target == "h100" and shutil.which("nvcc") is None:
        pytest.skip("nvcc is not installed: the CUDA build cannot be checked")
    _tiny_mlp_onnx(tmp_path / "m.onnx")
    x = np.random.default_rng().standard_normal((3, 32)).astype(np.float32)
    np.savez(tmp_path / "x.npz", x=x)
    outs = {}
    for mode, env in (("child", {}), ("in_process", {"SPARSEC_BUILD_IN_PROCESS": "1"})):
        out = tmp_path / mode
        p = subprocess.run([sys.executable, "-m", "sparsec", "compress", str(tmp_path / "m.onnx"), "--nm", "2:4", "--target", target,
                            "-o", str(out)], capture_output=True, text=True, timeout=900, env=dict(os.environ, **env))  # fmt: skip
        assert p.returncode == 0, p.stderr[-3000:]
        outs[mode] = out
    a, b = outs["child"] / "lib", outs["in_process"] / "lib"
    assert sorted(f.name for f in a.iterdir()) == sorted(f.name for f in b.iterdir())
    assert target != "h100" or any(f.name.endswith(".fatbin") for f in a.iterdir())
    for f in a.iterdir():
        if f.name != "model.so":
            assert f.read_bytes() == (b / f.name).read_bytes(), f.name
    if target == "x86":
        for mode, out in outs.items():
            r = subprocess.run([sys.executable, "-m", "sparsec", "run", str(out), "--inputs", str(tmp_path / "x.npz"), "--engine",
                                "lib", "-o", str(tmp_path / f"y_{mode}.npz")], capture_output=True, text=True, timeout=300)  # fmt: skip
            assert r.returncode == 0, r.stderr[-3000:]
        ya, yb = np.load(tmp_path / "y_child.npz")["y"], np.load(tmp_path / "y_in_process.npz")["y"]
        assert np.array_equal(ya, yb)
        ref = ort.InferenceSession(str(outs["child"] / "model.onnx")).run(None, {"x": x})[0]
        assert np.abs(ya - ref).max() <= 1e-5 * max(1.0, np.abs(ref).max())
    rep = {m: json.loads((o / "report.json").read_text())["build"] for m, o in outs.items()}
    for r in rep.values():
        r.pop("seconds", None)
    assert rep["child"] == rep["in_process"] and rep["child"]["status"] == "built"
    assert list(rep["child"]) == list(rep["in_process"])  # the same order of keys (the printed summary's)


@pytest.mark.parametrize("kernel", [10, 400])
def test_a_waveform_model_compresses_without_calibration_data(kernel, tmp_path):
    """An audio model (a waveform [batch, samples] into a strided conv stack) compressed with no pass and no --calib
    failed with exit 5 ("Conv failed: padded input size ... Kernel size ..."): the check of model.onnx against the
    executor ran on generated 16-sample waveforms, shorter than the conv stack takes. It now tries the length generated
    calibration uses too, and where no generated input fits (a 400-sample first kernel), the check is skipped with a
    warning: the compress succeeds either way."""
    import torch

    class Audio(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.c1, self.c2 = torch.nn.Conv1d(1, 16, kernel, stride=5), torch.nn.Conv1d(16, 16, 3, stride=2)
            self.fc = torch.nn.Linear(16, 8)

        def forward(self, wav):
            h = torch.nn.functional.gelu(self.c2(torch.nn.functional.gelu(self.c1(wav[:, None]))))
            return self.fc(h.transpose(1, 2))

    path = tmp_path / "a.onnx"
    torch.onnx.export(Audio().eval(), (torch.randn(2, 1000),), str(path), dynamo=False, input_names=["wav"],
                      output_names=["y"], dynamic_axes={"wav": {0: "b", 1: "n"}, "y": {0: "b", 1: "t"}})  # fmt: skip
    out = tmp_path / "out"
    p = sparsec("compress", path, "-o", out, "--no-build")
    assert p.returncode == 0, p.stderr[-2000:]
    rep = json.loads((out / "report.json").read_text())
    if kernel == 10:  # checked on the longer generated waveform
        assert rep["quality"]["onnx_vs_executor_rel_error"] < 1e-5, rep["quality"]
    else:
        assert "onnx_vs_executor_rel_error" not in rep["quality"]
        assert any("model.onnx was not checked against sparsec's executor" in w and "--calib" in w for w in rep["warnings"]), rep
    x = np.random.default_rng().standard_normal((2, 1200)).astype(np.float32)
    np.savez(tmp_path / "x.npz", wav=x)
    r = sparsec("run", out, "--inputs", tmp_path / "x.npz", "-o", tmp_path / "y.npz")
    assert r.returncode == 0, r.stderr[-2000:]
    ref = ort.InferenceSession(str(path)).run(None, {"wav": x})[0]
    assert np.abs(np.load(tmp_path / "y.npz")["y"] - ref).max() <= 1e-5 * max(1.0, np.abs(ref).max())


def test_inputs_cast_or_read_as_one_sample_are_reported(tmp_path):
    """float64 arrays (numpy's default) are cast to the model's float32, and an array without its batch axis is read
    as one sample: both happened without a word (round 13 D4; onnxruntime refuses both). Each is a warning now, in
    compress (calibration) and in run, and the results are those of the cast / batched input. run also says how long
    the run took apart from loading the library (its one figure was mostly the load: "engine: lib, 2676 ms")."""
    rng = np.random.default_rng()
    w = rng.standard_normal((16, 8)).astype(np.float32)
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 8])], [onnx.numpy_helper.from_array(w, "w")])  # fmt: skip
    path = tmp_path / "m.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    np.savez(tmp_path / "c64.npz", x=rng.standard_normal((16, 16)))  # float64
    art = tmp_path / "art"
    p = sparsec("compress", path, "--calib", tmp_path / "c64.npz", "-o", art, "--no-build")
    assert p.returncode == 0 and "'x' is float64; cast to float32 (the model's type)" in p.stderr, p.stderr
    x64 = rng.standard_normal((3, 16))
    np.savez(tmp_path / "x64.npz", x=x64)
    np.savez(tmp_path / "x1.npz", x=x64[0].astype(np.float32))
    p = sparsec("run", art, "--inputs", tmp_path / "x64.npz", "-o", tmp_path / "y.npz", "--engine", "onnx")
    assert p.returncode == 0 and p.stderr.count("warning:") == 1 and "'x' is float64; cast to float32" in p.stderr, p.stderr
    assert "ms to run (+" in p.stderr, p.stderr
    np.testing.assert_allclose(np.load(tmp_path / "y.npz")["y"], x64.astype(np.float32) @ w, rtol=1e-5, atol=1e-5)
    p = sparsec("run", art, "--inputs", tmp_path / "x1.npz", "-o", tmp_path / "y1.npz", "--json")
    assert p.returncode == 0 and "'x' has shape [16], one axis fewer than the model's ['n', 16]: read as one sample [1, 16]" in p.stderr
    summary = json.loads(p.stdout)
    assert summary["input_notes"] and summary["load_seconds"] >= 0 and summary["seconds"] >= 0
    np.testing.assert_allclose(np.load(tmp_path / "y1.npz")["y"], x64[:1].astype(np.float32) @ w, rtol=1e-5, atol=1e-5)
    np.savez(tmp_path / "x32.npz", x=x64.astype(np.float32))
    p = sparsec("run", art, "--inputs", tmp_path / "x32.npz")  # float32 with its batch axis: nothing to say
    assert p.returncode == 0 and "warning" not in p.stderr, p.stderr
