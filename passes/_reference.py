"""The dense weight a layer had before lossy compression, for passes that compensate or report total error.

Low-rank compensation (``lowrank``) fits ``W - Ŵ``, where ``W`` is the layer's weight *before* pruning or
quantization. Passes that rewrite a weight lossily call :func:`remember` right before doing so; the first one wins, so
the recorded weight is the one before the first lossy rewrite. Weights are kept in ``ctx.products["reference_weights"]``
only when the untouched model (``ctx.original``, a copy taken before any pass) does not already hold the same layer
with the same shape -- that is, only after a shape-changing pass such as slicing.
"""
from __future__ import annotations

import numpy as np

from ..compressor.formats import Dense

KEY = "reference_weights"


def _original(ctx, name: str, shape) -> np.ndarray | None:
    orig = getattr(ctx, "original", None)
    if orig is None:
        return None
    for lin in orig.linears():
        if lin.name == name:
            if tuple(lin.weight.shape) == tuple(shape) and isinstance(lin.weight, Dense):
                return lin.weight.materialize()
            return None
    return None


def remember(ctx, lin) -> None:
    """Record ``lin``'s current weight as its dense reference, unless one is known already."""
    refs = ctx.products.setdefault(KEY, {})
    if lin.name in refs or not isinstance(lin.weight, Dense):
        return
    if _original(ctx, lin.name, lin.weight.shape) is not None:
        return  # the untouched model has it
    refs[lin.name] = lin.weight.materialize()


def reference(ctx, lin) -> np.ndarray | None:
    """The dense float32 weight ``lin`` had before lossy compression, or None when unknown."""
    refs = ctx.products.get(KEY, {})
    if lin.name in refs and tuple(refs[lin.name].shape) == tuple(lin.weight.shape):
        return refs[lin.name]
    w = _original(ctx, lin.name, lin.weight.shape)
    if w is not None:
        return w
    if isinstance(lin.weight, Dense):
        return lin.weight.materialize()
    return None
