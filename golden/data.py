"""Data of the golden models: fixed train / held-out splits and calibration samples.

- Text (``tiny-gpt``, ``tiny-moe``): the values of ``pydoc_data.topics.topics`` joined in sorted key order, UTF-8
  bytes (~465 KB, shipped with every CPython). The first 90% is the training split, the last 10% is held out.
- Digits: scikit-learn's bundled ``load_digits`` (1797 8x8 images), pixels / 16 -> [0, 1], a stratified split with
  25% held out (``random_state=0``).

Calibration samples are always drawn from the training split, so that held-out metrics stay honest.
"""
from __future__ import annotations

import functools

import numpy as np

from .models import _check, config

HELDOUT_FRACTION = 0.10
DIGITS_TEST_SIZE = 0.25
DIGITS_SPLIT_SEED = 0


@functools.lru_cache(maxsize=1)
def text_bytes() -> bytes:
    """The corpus: ``pydoc_data.topics.topics`` values in sorted key order, UTF-8 encoded."""
    from pydoc_data.topics import topics

    return "".join(topics[k] for k in sorted(topics)).encode("utf-8")


def text_split_index() -> int:
    """Position of the first held-out byte: ``text[:i]`` is train, ``text[i:]`` is held out."""
    n = len(text_bytes())
    return n - int(round(n * HELDOUT_FRACTION))


def text_splits() -> tuple[np.ndarray, np.ndarray]:
    """``(train, heldout)`` uint8 arrays: the first 90% and the last 10% of the corpus (contiguous, disjoint)."""
    arr = np.frombuffer(text_bytes(), dtype=np.uint8)
    i = text_split_index()
    return arr[:i].copy(), arr[i:].copy()


@functools.lru_cache(maxsize=1)
def _digits() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = (d.data / 16.0).astype(np.float32)
    y = d.target.astype(np.int64)
    xtr, xte, ytr, yte = train_test_split(
        x, y, test_size=DIGITS_TEST_SIZE, random_state=DIGITS_SPLIT_SEED, stratify=y
    )
    return (np.ascontiguousarray(xtr), np.ascontiguousarray(ytr), np.ascontiguousarray(xte), np.ascontiguousarray(yte))


def digits_splits() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(Xtr float32 [1347, 64], ytr int64, Xte float32 [450, 64], yte int64)``, pixels in [0, 1]."""
    return tuple(a.copy() for a in _digits())  # type: ignore[return-value]


def calibration_arrays(name: str, n: int | None = None, seq_len: int | None = None, seed: int = 0) -> list[np.ndarray]:
    """Calibration inputs from the TRAIN split, one array per model input in forward order.

    GPTs: ``[int64 [n, seq_len]]`` random windows of the training text (defaults n=128, seq_len=128; seq_len is
    clipped to the context length). Digits: ``[float32 [n, 64]]`` training images (default n=256, sampled without
    replacement while n fits; ``seq_len`` is ignored). Deterministic for a given seed."""
    cfg = config(_check(name))
    rng = np.random.default_rng(seed)
    if cfg["kind"] in ("llama", "mixtral"):
        n = 128 if n is None else int(n)
        ctx = cfg["context_length"]
        seq_len = ctx if seq_len is None else max(1, min(int(seq_len), ctx))
        train, _ = text_splits()
        starts = rng.integers(0, len(train) - seq_len + 1, size=n)
        windows = np.stack([train[s : s + seq_len] for s in starts]) if n else np.zeros((0, seq_len), np.uint8)
        return [windows.astype(np.int64)]
    n = 256 if n is None else int(n)
    xtr, _, _, _ = _digits()
    idx = rng.choice(len(xtr), size=n, replace=n > len(xtr))
    return [xtr[idx].astype(np.float32)]
