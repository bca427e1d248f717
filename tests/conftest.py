"""Fixtures shared by several test modules (opted into per module with ``pytest.mark.usefixtures``)."""
from __future__ import annotations

import os

import pytest
import torch


@pytest.fixture(scope="module")
def no_user_tuning_db(tmp_path_factory):
    """Builds read the user's tuning database by default: point it at an empty file for reproducible tests."""
    old = os.environ.get("SPARSEC_TUNING_DB")
    os.environ["SPARSEC_TUNING_DB"] = str(tmp_path_factory.mktemp("tune") / "none.json")
    yield
    if old is None:
        os.environ.pop("SPARSEC_TUNING_DB", None)
    else:
        os.environ["SPARSEC_TUNING_DB"] = old


@pytest.fixture
def one_torch_thread():
    """Tiny matmuls: one thread avoids thread-pool stalls when the cores are shared."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
