from __future__ import annotations

import os

import numpy as np
import pytest

from .. import models as tm
from ._common import mlp_onnx


@pytest.fixture(scope="session")
def mlp(tmp_path_factory):
    """A small two-Linear ONNX model and matching calibration data (.npz keyed by input name)."""
    d = tmp_path_factory.mktemp("mlp")
    path = mlp_onnx(d / "mlp.onnx")
    np.savez(d / "calib.npz", x=np.random.default_rng(1).standard_normal((48, 16)).astype(np.float32))
    return path, d / "calib.npz"


@pytest.fixture(scope="session")
def gpt2_ts(tmp_path_factory):
    """GPT-2-style decoder exported by torch.onnx.export (TorchScript exporter, weights inside the file)."""
    model = tm.build("gpt2", layers=2)
    path = tmp_path_factory.mktemp("gpt2ts") / "gpt2.onnx"
    tm.export_onnx(model, str(path), "torchscript", 17)
    return path


@pytest.fixture(scope="session")
def gpt2_dynamo(tmp_path_factory):
    """GPT-2-style decoder exported by the dynamo exporter: weights in an external .data file next to the model."""
    model = tm.build("gpt2", layers=1)
    path = tmp_path_factory.mktemp("gpt2dyn") / "gpt2.onnx"
    tm.export_onnx(model, str(path), "dynamo", 18)
    assert os.path.exists(str(path) + ".data")
    return path
