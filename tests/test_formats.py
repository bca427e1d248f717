"""Weight formats: dense reference semantics, packing, safetensors round trips (property tests)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.numpy import load, save

from sparsec.compressor.formats import (
    Dense,
    GroupQuant,
    LowRank,
    NMSparse,
    format_from_spec,
    pack_bits,
    packed_len,
    unpack_bits,
)

SETTINGS = settings(max_examples=40, deadline=None)


def roundtrip(fmt):
    """Serialize through real safetensors bytes and rebuild from the spec."""
    blob = save(fmt.to_tensors("w"))
    back = format_from_spec(fmt.spec("w"), load(blob))
    return back


@st.composite
def nm_case(draw):
    m = draw(st.sampled_from([2, 4, 8, 16]))
    n = draw(st.integers(1, m - 1))
    out = draw(st.integers(1, 9))
    groups = draw(st.integers(1, 6))
    seed = draw(st.integers(0, 2**31 - 1))
    return n, m, out, groups * m, seed


@SETTINGS
@given(bits=st.sampled_from([1, 2, 3, 4, 8]), length=st.integers(0, 70), seed=st.integers(0, 2**31 - 1))
def test_pack_unpack_roundtrip(bits, length, seed):
    rng = np.random.default_rng(seed)
    rows = rng.integers(1, 4)
    v = rng.integers(0, 1 << bits, size=(rows, length)).astype(np.uint8)
    p = pack_bits(v, bits)
    assert p.shape == (rows, packed_len(length, bits))
    assert p.dtype == np.uint8
    np.testing.assert_array_equal(unpack_bits(p, bits, length), v)


def test_pack_bits_little_endian_layout():
    # two int4 codes per byte, first code in the low nibble (MatMulNBits layout)
    p = pack_bits(np.array([[1, 2, 3, 4]], dtype=np.uint8), 4)
    assert p.tolist() == [[0x21, 0x43]]
    p2 = pack_bits(np.array([[1, 2, 3, 0]], dtype=np.uint8), 2)
    assert p2.tolist() == [[0b00111001]]


@SETTINGS
@given(nm_case())
def test_nm_keeps_exactly_n_of_every_m(case):
    n, m, out, inn, seed = case
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((out, inn)).astype(np.float32)
    f = NMSparse.from_dense(w, n, m)
    dense = f.materialize()
    mask = f.mask()
    # exactly n kept positions in every group of m along the input dim
    assert (mask.reshape(out, inn // m, m).sum(-1) == n).all()
    # random normal weights have no exact zeros: the nonzero pattern is the mask
    assert ((dense != 0) == mask).all()
    # kept values are the original weights; the kept ones are the n largest magnitudes of their group
    np.testing.assert_array_equal(dense[mask], w[mask])
    g = np.abs(w).reshape(out, inn // m, m)
    kept_min = np.where(mask.reshape(g.shape), g, np.inf).min(-1)
    drop_max = np.where(mask.reshape(g.shape), -np.inf, g).max(-1)
    assert (kept_min >= drop_max).all()
    # metadata width: ceil(log2 m) bits per kept value
    bits = max(1, int(np.ceil(np.log2(m))))
    assert f.indices_packed.shape == (out, packed_len(inn // m * n, bits))
    back = roundtrip(f)
    assert isinstance(back, NMSparse) and (back.n, back.m) == (n, m)
    np.testing.assert_array_equal(back.materialize(), dense)
    assert back.nbytes == f.nbytes == out * (inn // m * n) * 4 + f.indices_packed.nbytes
    if n / m <= 0.5 and m >= 4:
        assert f.nbytes < f.dense_nbytes


@SETTINGS
@given(nm_case())
def test_nm_from_mask_respects_given_mask(case):
    n, m, out, inn, seed = case
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((out, inn)).astype(np.float32)
    scores = rng.random((out, inn // m, m))
    order = np.argsort(scores, axis=-1)[..., :n]
    mask = np.zeros_like(scores, dtype=bool)
    np.put_along_axis(mask, order, True, axis=-1)
    mask = mask.reshape(out, inn)
    f = NMSparse.from_mask(w, mask, n, m)
    np.testing.assert_array_equal(f.mask(), mask)
    np.testing.assert_array_equal(f.materialize(), np.where(mask, w, 0))


def test_nm_rejects_bad_mask_and_shapes():
    w = np.ones((2, 8), np.float32)
    bad = np.zeros((2, 8), bool)
    bad[:, :3] = True
    with pytest.raises(ValueError, match="exactly 2 of every 4"):
        NMSparse.from_mask(w, bad, 2, 4)
    with pytest.raises(ValueError, match="not divisible"):
        NMSparse.from_dense(np.ones((2, 6), np.float32), 2, 4)
    with pytest.raises(ValueError, match="0 < N < M"):
        NMSparse.from_dense(w, 4, 4)


@st.composite
def gq_case(draw):
    bits = draw(st.sampled_from([2, 3, 4, 8]))
    g = draw(st.sampled_from([4, 8, 16, 32]))
    out = draw(st.integers(1, 7))
    groups = draw(st.integers(1, 5))
    sym = draw(st.booleans())
    sparse = draw(st.booleans())
    seed = draw(st.integers(0, 2**31 - 1))
    return bits, g, out, groups * g, sym, sparse, seed


@SETTINGS
@given(gq_case())
def test_group_quant_semantics_and_roundtrip(case):
    bits, g, out, inn, sym, sparse, seed = case
    rng = np.random.default_rng(seed)
    codes = rng.integers(0, 1 << bits, size=(out, inn)).astype(np.uint8)
    scales = (rng.random((out, inn // g)) + 0.1).astype(np.float16)
    zeros = None if sym else rng.integers(0, 1 << bits, size=(out, inn // g)).astype(np.uint8)
    gmask = rng.random((out, inn // g)) < 0.6 if sparse else None
    f = GroupQuant.from_codes(codes, scales, zeros, bits, g, gmask)
    # independent reference: (u - z) * s per group, removed groups zero
    z = np.full((out, inn // g), 2 ** (bits - 1), np.float32) if sym else zeros.astype(np.float32)
    ref = (codes.reshape(out, inn // g, g) - z[..., None]) * scales.astype(np.float32)[..., None]
    if gmask is not None:
        ref[~gmask] = 0
    ref = ref.reshape(out, inn)
    np.testing.assert_array_equal(f.materialize(), ref)
    # storage: only kept groups, packed codes
    kept = out * (inn // g) if gmask is None else int(gmask.sum())
    code_bytes = kept * packed_len(g, bits) if gmask is not None else out * packed_len(inn, bits)
    assert f.codes_packed.nbytes == code_bytes
    assert f.scales.size == kept
    back = roundtrip(f)
    np.testing.assert_array_equal(back.materialize(), ref)
    assert back.nbytes == f.nbytes and back.bits == bits and back.group_size == g
    # the bytes written are the bytes reported (zero points packed at the code width, like the codes)
    assert sum(t.nbytes for t in f.to_tensors("w").values()) == f.nbytes
    if gmask is not None:
        np.testing.assert_array_equal(back.group_mask(), gmask)


@SETTINGS
@given(nm_case(), st.integers(1, 4))
def test_composed_formats_roundtrip(case, rank):
    n, m, out, inn, seed = case
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((out, inn)).astype(np.float32)
    nm = NMSparse.from_dense(w, n, m)
    # quantized kept values (the GQSA / SparseGPT+GPTQ composition): values are themselves a GroupQuant
    vals = nm.values.materialize()
    vin = vals.shape[1]
    gsz = next(s for s in (8, 4, 2, 1) if vin % s == 0)
    lo, hi = vals.reshape(out, vin // gsz, gsz).min(-1), vals.reshape(out, vin // gsz, gsz).max(-1)
    scale = np.maximum(hi - lo, 1e-3) / 15
    zero = np.clip(np.round(-lo / scale), 0, 15).astype(np.uint8)
    scale16 = scale.astype(np.float16)
    codes = np.clip(np.round(vals.reshape(out, vin // gsz, gsz) / scale16.astype(np.float32)[..., None]) + zero[..., None], 0, 15)
    q = GroupQuant.from_codes(codes.reshape(out, vin).astype(np.uint8), scale16, zero, 4, gsz) if gsz > 1 else None
    base = nm.with_values(q) if q is not None else nm
    a = rng.standard_normal((out, rank)).astype(np.float32)
    b = rng.standard_normal((rank, inn)).astype(np.float32)
    f = LowRank(base, a, b)
    expect = base.materialize() + a @ b
    np.testing.assert_allclose(f.materialize(), expect, rtol=1e-6, atol=1e-6)
    if q is not None:
        # the sparse pattern survives quantizing the kept values
        assert ((base.materialize() != 0) <= nm.mask()).all()
    back = roundtrip(f)
    assert [x.kind for x in back.walk()] == [x.kind for x in f.walk()]
    np.testing.assert_array_equal(back.materialize(), f.materialize())
    assert back.nbytes == f.nbytes


def test_dense_keeps_dtype_and_bytes():
    rng = np.random.default_rng()
    w = rng.standard_normal((5, 7)).astype(np.float16)
    f = Dense(w)
    assert f.nbytes == w.nbytes
    back = roundtrip(f)
    assert back.materialize().dtype == np.float32
    np.testing.assert_array_equal(back.materialize(), w.astype(np.float32))


def test_spec_with_missing_tensor_is_reported():
    f = NMSparse.from_dense(np.random.default_rng().standard_normal((2, 8)).astype(np.float32), 2, 4)
    t = f.to_tensors("w")
    t.pop("w.indices")
    with pytest.raises(KeyError, match="missing"):
        format_from_spec(f.spec("w"), t)
