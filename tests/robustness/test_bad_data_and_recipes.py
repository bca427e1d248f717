"""Bad calibration data and bad recipes through the real CLI; N:M that does not divide a layer's input dim."""
from __future__ import annotations

import json

import numpy as np

from ._common import listing, mlp_onnx, one_line_error, run_many, sparsec


CALIB = {
    "wrong name": ({"z": ((48, 16), np.float32)}, ("calib.npz", "'x'", "z")),
    "wrong shape": ({"x": ((48, 15), np.float32)}, ("calib.npz", "'x'", "15")),
    "wrong dtype": ({"x": ((48, 16), np.int64)}, ("calib.npz", "'x'", "int64")),
}


def test_calibration_wrong_names_shapes_dtypes(mlp, tmp_path):
    path, _ = mlp
    rng = np.random.default_rng()
    cases = {}
    for case, (arrays, _) in CALIB.items():
        w = tmp_path / case.replace(" ", "_")
        w.mkdir()
        np.savez(w / "calib.npz", **{k: (rng.standard_normal(s) * 3).astype(t) for k, (s, t) in arrays.items()})
        cases[case] = (("compress", path, "--nm", "2:4", "--calib", "calib.npz", "-o", "out", "--no-build"), w)
    for case, p in run_many(cases).items():
        one_line_error(p, 8, *CALIB[case][1])
        assert listing(cases[case][1]) == ["calib.npz"], case


def test_empty_calibration_directory(mlp, tmp_path):
    path, _ = mlp
    (tmp_path / "calib").mkdir()
    one_line_error(sparsec("compress", path, "--nm", "2:4", "--calib", "calib", "-o", "out", "--no-build", cwd=tmp_path), 8, "calib")
    assert listing(tmp_path) == ["calib"]


RECIPES = {
    "unknown top-level key": ("target: x86\nsed: 3\n", ("sed",)),
    "unknown pass": ("passes:\n  - type: nm_prnue\n    nm: '2:4'\n", ("nm_prnue",)),
    "unknown pass key": ("passes:\n  - type: nm_prune\n    nm: '2:4'\n    methd: wanda\n", ("methd",)),
    "bad N:M": ("passes:\n  - type: nm_prune\n    nm: '5:4'\n", ("5:4",)),
    "bad type": ("seed: many\n", ("seed",)),
    "bad regex": ("passes:\n  - type: nm_prune\n    nm: '2:4'\n    include: ['fc(']\n", ("fc(",)),
    "not yaml": ("passes: [\n", ("yaml",)),
}


def test_invalid_recipe_keys_and_values(mlp, tmp_path):
    path, calib = mlp
    cases = {}
    for case, (text, _) in RECIPES.items():
        w = tmp_path / case.replace(" ", "_").replace(":", "")
        w.mkdir()
        (w / "r.yaml").write_text(text)
        cases[case] = (("compress", path, "--recipe", "r.yaml", "--calib", calib, "-o", "out", "--no-build"), w)
    for case, p in run_many(cases).items():
        one_line_error(p, 6, *RECIPES[case][1])
        assert listing(cases[case][1]) == ["r.yaml"], case


FLAGS = {
    "bad nm": (["--nm", "abc"], ("abc",)),
    "bad method": (["--nm", "2:4", "--method", "foo"], ("foo",)),
    "method without nm": (["--method", "wanda"], ("--nm",)),
    "bad quant": (["--quant", "int5"], ("int5",)),
}


def test_invalid_flag_values(mlp, tmp_path):
    path, _ = mlp
    res = run_many({k: (("compress", path, *flags, "-o", "out", "--no-build"), tmp_path) for k, (flags, _) in FLAGS.items()})
    for case, p in res.items():
        one_line_error(p, 6, *FLAGS[case][1])
    assert listing(tmp_path) == []


def test_nm_that_does_not_divide_the_input_dim(tmp_path):
    """fc1 has 18 inputs (not a multiple of 4): it stays dense and its report row says why; fc2 (32 inputs) is
    pruned 2:4."""
    mlp_onnx(tmp_path / "odd.onnx", din=18)
    np.savez(tmp_path / "c.npz", x=np.random.default_rng().standard_normal((40, 18)).astype(np.float32))
    p = sparsec("compress", "odd.onnx", "--nm", "2:4", "--include", "fc.*", "--calib", "c.npz", "-o", "out", "--no-build",
                "--json", cwd=tmp_path)  # fmt: skip
    assert p.returncode == 0, p.stderr
    rows = {r["name"]: r for r in json.loads(p.stdout)["passes"][0]["rows"]}
    assert rows["fc1"]["status"] == "skipped" and "18" in rows["fc1"]["note"] and "4" in rows["fc1"]["note"], rows["fc1"]
    assert rows["fc1"]["format_after"] == rows["fc1"]["format_before"] and rows["fc1"]["bytes_after"] == rows["fc1"]["bytes_before"]
    assert rows["fc2"]["status"] == "compressed" and abs(rows["fc2"]["sparsity"] - 0.5) < 1e-6, rows["fc2"]
    # the artifact agrees: fc1 dense, fc2 holds at most 2 nonzeros in every group of 4 along the input dim
    from safetensors.numpy import load_file

    g = json.loads((tmp_path / "out" / "graph.json").read_text())
    assert (tmp_path / "out" / "weights.safetensors").is_file() and g
    import onnxruntime as ort

    x = np.random.default_rng().standard_normal((5, 18)).astype(np.float32)
    y = ort.InferenceSession(str(tmp_path / "out" / "model.onnx"), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    assert y.shape == (5, 8) and np.isfinite(y).all()
    assert load_file(str(tmp_path / "out" / "weights.safetensors"))


def test_recipe_and_target_errors_come_before_the_model_load(tmp_path):
    """A typo in --nm or --target is reported as such (exit 6) even when the model file is unreadable: the recipe is
    checked before a possibly long import; the corrupt model alone gives its own exit code."""
    (tmp_path / "m.onnx").write_bytes(b"\x08\x07 not a model")
    one_line_error(sparsec("compress", "m.onnx", "--nm", "5:4", "-o", "out", cwd=tmp_path), 6, "5:4")
    one_line_error(sparsec("compress", "m.onnx", "--nm", "2:4", "--target", "x68", "-o", "out", cwd=tmp_path), 6, "x68", "x86")
    bad_model = sparsec("compress", "m.onnx", "--nm", "2:4", "-o", "out", cwd=tmp_path)
    assert bad_model.returncode not in (0, 6), bad_model.stderr
    assert listing(tmp_path) == ["m.onnx"]
