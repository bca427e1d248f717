"""Bad model files through the real CLI: one-line error, its exit code, no partial artifact."""
from __future__ import annotations

import shutil

from ._common import listing, mlp_onnx, one_line_error, run_many, sparsec


def test_truncated_protobuf(mlp, tmp_path):
    path, _ = mlp
    w = tmp_path / "w"
    w.mkdir()
    data = path.read_bytes()
    (w / "cut.onnx").write_bytes(data[: len(data) - 7])
    one_line_error(sparsec("compress", "cut.onnx", "-o", "out", "--no-build", cwd=w), 3, "cut.onnx")
    assert listing(w) == ["cut.onnx"]


def test_truncated_external_data_of_dynamo_export(gpt2_dynamo, tmp_path):
    w = tmp_path / "w"
    w.mkdir()
    shutil.copy(gpt2_dynamo, w / gpt2_dynamo.name)
    data = gpt2_dynamo.with_name(gpt2_dynamo.name + ".data")
    raw = data.read_bytes()
    (w / data.name).write_bytes(raw[: len(raw) // 2])
    before = listing(w)
    line = one_line_error(sparsec("compress", "gpt2.onnx", "-o", "out", "--no-build", cwd=w), 3)
    assert "gpt2.onnx" in line or ".data" in line, line
    assert listing(w) == before
    (w / data.name).unlink()  # the .data file missing entirely: named, and said to be missing (onnx: "not regular file")
    one_line_error(sparsec("compress", "gpt2.onnx", "-o", "out", "--no-build", cwd=w), 3, data.name, "is missing")
    assert listing(w) == [p for p in before if p != data.name]


WRONG_TYPES = {
    "picture.onnx": b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x00\x10\x00\x00\x00\x10\x08\x06\x00\x00\x00\x1f\xf3\xffa" + bytes(200),
    "notes.txt": b"These are my notes, not a model.\n",
    "empty.onnx": b"",
}


def test_wrong_file_type(tmp_path):
    """PNG bytes named .onnx, a text file, an empty file: exit 3 naming the file, nothing written."""
    cases = {}
    for name, content in WRONG_TYPES.items():
        w = tmp_path / name.replace(".", "_")
        w.mkdir()
        (w / name).write_bytes(content)
        cases[name] = (("compress", name, "-o", "out", "--no-build"), w)
    for name, p in run_many(cases).items():
        one_line_error(p, 3, name)
        assert listing(cases[name][1]) == [name]


def test_torch_save_checkpoint_says_to_export(tmp_path):
    """A state_dict saved with torch.save (.pth, .pt, or misnamed .pt2): exit 3 saying it is a checkpoint without a
    graph and how to export one (it suggested renaming the file to .pt2), never unpickled, nothing written."""
    import torch

    cases = {}
    for name in ("w.pth", "w.pt", "w.pt2"):
        w = tmp_path / name.replace(".", "_")
        w.mkdir()
        torch.save(torch.nn.Linear(8, 4).state_dict(), str(w / name))
        cases[name] = (("compress", name, "-o", "out", "--no-build"), w)
    for name, p in run_many(cases).items():
        one_line_error(p, 3, name, "torch.save checkpoint", "torch.export.save")
        assert listing(cases[name][1]) == [name]


def test_unsupported_op_on_the_path_a_pass_needs(tmp_path):
    """A custom-domain op feeds fc1: N:M pruning needs fc1's inputs, which only executing that op can give."""
    mlp_onnx(tmp_path / "custom.onnx", custom=True)
    one_line_error(sparsec("compress", "custom.onnx", "--nm", "2:4", "-o", "out", "--no-build", cwd=tmp_path), 4,
                   "com.example", "custom_scale")  # fmt: skip
    assert listing(tmp_path) == ["custom.onnx"]


def test_nan_inf_weights(tmp_path):
    cases = {}
    for bad in ("nan", "inf"):
        w = tmp_path / bad
        w.mkdir()
        mlp_onnx(w / "m.onnx", bad=bad)
        cases[bad] = (("compress", "m.onnx", "--nm", "2:4", "-o", "out", "--no-build"), w)
    for bad, p in run_many(cases).items():
        one_line_error(p, 9, "fc1", "nan or inf")
        assert listing(cases[bad][1]) == ["m.onnx"]
