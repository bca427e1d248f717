"""Weight formats: how a Linear weight is stored.

A weight is a value of one of a few formats. Every format has the same logical shape ``(out_features,
in_features)`` (the ``nn.Linear`` convention: ``y = x @ W.T + b``) and can

- ``materialize()`` the dense float32 tensor it stands for (the reference semantics every backend must match),
- report its storage size (``nbytes``: what it costs on disk and in memory, packed),
- serialize to flat tensors + a JSON spec (``to_tensors`` / ``spec``) and back (``format_from_spec``).

Formats compose: ``NMSparse`` holds its kept values as a child format (``Dense`` or ``GroupQuant``), ``LowRank``
wraps any base format. Passes change formats; backends pick kernels by format.

Bit packing is little-endian throughout: element ``i`` of a packed row occupies bits ``[i*b, (i+1)*b)`` of the
row's byte stream, bit 0 being the least significant bit of byte 0. For 4-bit codes this is "element 0 in the low
nibble", the layout of onnxruntime's MatMulNBits.
"""
from __future__ import annotations

import math
from typing import Any, ClassVar

import numpy as np

__all__ = [
    "WeightFormat",
    "Dense",
    "NMSparse",
    "GroupQuant",
    "LowRank",
    "pack_bits",
    "unpack_bits",
    "format_from_spec",
    "nm_mask_valid",
]

_FLOAT_DTYPES = (np.float32, np.float16, np.float64)


def pack_bits(values: np.ndarray, bits: int) -> np.ndarray:
    """Pack unsigned integers < 2**bits along the last axis into uint8, little-endian bit order."""
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in 1..8, got {bits}")
    v = np.asarray(values)
    if v.size and (v.min() < 0 or v.max() >= (1 << bits)):
        raise ValueError(f"values out of range for {bits}-bit packing")
    v = v.astype(np.uint8, copy=False)
    lead, length = v.shape[:-1], v.shape[-1]
    if bits == 8:
        return np.ascontiguousarray(v)
    if bits == 4 and length % 2 == 0:
        pairs = v.reshape(*lead, length // 2, 2)
        return np.ascontiguousarray(pairs[..., 0] | (pairs[..., 1] << 4)).astype(np.uint8)
    shifts = np.arange(bits, dtype=np.uint8)
    bitarr = ((v[..., None] >> shifts) & 1).astype(np.uint8).reshape(*lead, length * bits)
    return np.packbits(bitarr, axis=-1, bitorder="little")


def unpack_bits(packed: np.ndarray, bits: int, length: int) -> np.ndarray:
    """Inverse of :func:`pack_bits`: ``length`` unsigned values per row, as uint8."""
    p = np.asarray(packed, dtype=np.uint8)
    lead = p.shape[:-1]
    if bits == 8:
        return p[..., :length].copy()
    if bits == 4 and length % 2 == 0:
        out = np.empty((*lead, length // 2, 2), dtype=np.uint8)
        out[..., 0] = p[..., : length // 2] & 0x0F
        out[..., 1] = p[..., : length // 2] >> 4
        return out.reshape(*lead, length)
    bitarr = np.unpackbits(p, axis=-1, count=length * bits, bitorder="little")
    bitarr = bitarr.reshape(*lead, length, bits).astype(np.uint8)
    shifts = np.arange(bits, dtype=np.uint8)
    return (bitarr << shifts).sum(axis=-1).astype(np.uint8)


def packed_len(length: int, bits: int) -> int:
    return (length * bits + 7) // 8


def nm_mask_valid(mask: np.ndarray, n: int, m: int, exact: bool = False) -> bool:
    """True when every group of ``m`` consecutive entries along the last axis keeps at most (exactly) ``n``."""
    mk = np.asarray(mask, dtype=bool)
    if mk.shape[-1] % m:
        return False
    counts = mk.reshape(*mk.shape[:-1], mk.shape[-1] // m, m).sum(axis=-1)
    return bool((counts == n).all() if exact else (counts <= n).all())


class WeightFormat:
    """Base class. Subclasses define ``kind``, ``shape``, ``materialize``, ``_tensors``, ``_attrs``, ``_children``."""

    kind: ClassVar[str] = "?"
    registry: ClassVar[dict[str, type["WeightFormat"]]] = {}

    def __init_subclass__(cls, **kw):
        super().__init_subclass__(**kw)
        if cls.kind != "?":
            WeightFormat.registry[cls.kind] = cls

    # --- to be provided by subclasses -------------------------------------------------------------------------
    shape: tuple[int, int]

    def materialize(self) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError

    def _tensors(self) -> dict[str, np.ndarray]:
        return {}

    def _attrs(self) -> dict[str, Any]:
        return {}

    def _children(self) -> dict[str, "WeightFormat"]:
        return {}

    @classmethod
    def _from_parts(cls, attrs: dict, tensors: dict[str, np.ndarray], children: dict[str, "WeightFormat"]):
        raise NotImplementedError  # pragma: no cover

    def describe(self) -> str:  # pragma: no cover - abstract
        raise NotImplementedError

    # --- shared behaviour ---------------------------------------------------------------------------------------
    @property
    def out_features(self) -> int:
        return int(self.shape[0])

    @property
    def in_features(self) -> int:
        return int(self.shape[1])

    @property
    def nbytes(self) -> int:
        """Storage bytes of this format: its own tensors plus its children's."""
        return int(sum(t.nbytes for t in self._tensors().values()) + sum(c.nbytes for c in self._children().values()))

    @property
    def dense_nbytes(self) -> int:
        """Bytes of the same weight stored dense in float32."""
        return int(self.shape[0] * self.shape[1] * 4)

    def sparsity(self) -> float:
        w = self.materialize()
        return float((w == 0).sum() / max(1, w.size))

    def to_tensors(self, prefix: str) -> dict[str, np.ndarray]:
        out = {f"{prefix}.{k}": np.ascontiguousarray(v) for k, v in self._tensors().items()}
        for role, child in self._children().items():
            out.update(child.to_tensors(f"{prefix}.{role}"))
        return out

    def spec(self, prefix: str) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "shape": [int(s) for s in self.shape],
            "attrs": self._attrs(),
            "tensors": {k: f"{prefix}.{k}" for k in sorted(self._tensors())},
            "children": {role: c.spec(f"{prefix}.{role}") for role, c in sorted(self._children().items())},
        }

    def walk(self):
        """This format and all nested formats, outermost first."""
        yield self
        for c in self._children().values():
            yield from c.walk()

    def find(self, kind: str):
        for f in self.walk():
            if f.kind == kind:
                return f
        return None

    def __repr__(self) -> str:
        return f"<{self.describe()} {self.shape[0]}x{self.shape[1]} {self.nbytes}B>"


def format_from_spec(spec: dict[str, Any], tensors: dict[str, np.ndarray]) -> WeightFormat:
    kind = spec.get("kind")
    cls = WeightFormat.registry.get(kind)
    if cls is None:
        raise ValueError(f"unknown weight format kind {kind!r}")
    own = {}
    for role, name in spec.get("tensors", {}).items():
        if name not in tensors:
            raise KeyError(f"tensor {name!r} of a {kind} weight is missing from the weights file")
        own[role] = tensors[name]
    children = {role: format_from_spec(s, tensors) for role, s in spec.get("children", {}).items()}
    fmt = cls._from_parts(dict(spec.get("attrs", {})), own, children)
    if tuple(fmt.shape) != tuple(spec.get("shape", fmt.shape)):
        raise ValueError(f"{kind} weight: stored shape {spec.get('shape')} does not match its tensors {fmt.shape}")
    return fmt


# ----------------------------------------------------------------------------------------------------------------
class Dense(WeightFormat):
    """A plain 2-D float tensor (float32 or float16 storage)."""

    kind = "dense"

    def __init__(self, data: np.ndarray):
        a = np.asarray(data)
        if a.ndim != 2:
            raise ValueError(f"Dense weight must be 2-D, got shape {a.shape}")
        if a.dtype not in _FLOAT_DTYPES:
            a = a.astype(np.float32)
        if a.dtype == np.float64:
            a = a.astype(np.float32)
        self.data = np.ascontiguousarray(a)
        self.shape = (int(a.shape[0]), int(a.shape[1]))

    def materialize(self) -> np.ndarray:
        return self.data.astype(np.float32, copy=False)

    def _tensors(self):
        return {"data": self.data}

    def _attrs(self):
        return {}

    @classmethod
    def _from_parts(cls, attrs, tensors, children):
        return cls(tensors["data"])

    def describe(self) -> str:
        return "dense" if self.data.dtype == np.float32 else f"dense-{self.data.dtype.name}"


# ----------------------------------------------------------------------------------------------------------------
class NMSparse(WeightFormat):
    """N:M structured sparsity along the input dimension: every group of ``m`` consecutive weights of a row keeps
    exactly ``n`` (some kept values may themselves be zero).

    ``values``: child format of shape ``(out, in*n/m)`` holding the kept values group by group, in ascending
    position order. ``indices``: the position (0..m-1) of each kept value inside its group, packed with
    ``ceil(log2 m)`` bits each (2 bits for 2:4, the metadata width of sparse tensor cores).
    """

    kind = "nm_sparse"

    def __init__(self, values: WeightFormat | np.ndarray, indices_packed: np.ndarray, n: int, m: int, in_features: int):
        if not (0 < n < m):
            raise ValueError(f"N:M needs 0 < N < M, got {n}:{m}")
        if in_features % m:
            raise ValueError(f"input dim {in_features} is not divisible by M={m}")
        self.values = values if isinstance(values, WeightFormat) else Dense(values)
        self.n, self.m = int(n), int(m)
        out = self.values.shape[0]
        if self.values.shape[1] != in_features // m * n:
            raise ValueError(f"N:M values have {self.values.shape[1]} columns, expected {in_features // m * n}")
        self.index_bits = max(1, math.ceil(math.log2(m)))
        self.indices_packed = np.ascontiguousarray(indices_packed, dtype=np.uint8)
        expect = (out, packed_len(in_features // m * n, self.index_bits))
        if self.indices_packed.shape != expect:
            raise ValueError(f"N:M index metadata has shape {self.indices_packed.shape}, expected {expect}")
        self.shape = (int(out), int(in_features))

    # construction ------------------------------------------------------------------------------------------
    @classmethod
    def from_mask(cls, weight: np.ndarray, mask: np.ndarray, n: int, m: int) -> "NMSparse":
        """Keep ``weight`` where ``mask`` is true; ``mask`` must select exactly ``n`` of every ``m``."""
        w = np.asarray(weight, dtype=np.float32)
        mk = np.asarray(mask, dtype=bool)
        if w.shape != mk.shape or w.ndim != 2:
            raise ValueError(f"weight {w.shape} and mask {mk.shape} must be equal 2-D shapes")
        out, inn = w.shape
        if inn % m:
            raise ValueError(f"input dim {inn} is not divisible by M={m}")
        g = inn // m
        mk3 = mk.reshape(out, g, m)
        if not (mk3.sum(-1) == n).all():
            raise ValueError(f"mask does not keep exactly {n} of every {m} weights")
        # positions of kept entries, ascending inside each group
        pos = np.argsort(~mk3, axis=-1, kind="stable")[..., :n]  # kept first, stable keeps ascending order
        pos = np.sort(pos, axis=-1)
        vals = np.take_along_axis(w.reshape(out, g, m), pos, axis=-1).reshape(out, g * n)
        bits = max(1, math.ceil(math.log2(m)))
        packed = pack_bits(pos.reshape(out, g * n).astype(np.uint8), bits)
        return cls(Dense(vals), packed, n, m, inn)

    @classmethod
    def from_dense(cls, weight: np.ndarray, n: int, m: int) -> "NMSparse":
        """Magnitude selection (largest ``n`` of each ``m``): the simplest N:M weight."""
        w = np.asarray(weight, dtype=np.float32)
        if w.ndim != 2:
            raise ValueError(f"N:M needs a 2-D weight, got shape {w.shape}")
        if not (0 < n < m):
            raise ValueError(f"N:M needs 0 < N < M, got {n}:{m}")
        out, inn = w.shape
        if inn % m:
            raise ValueError(f"input dim {inn} is not divisible by M={m}")
        g = w.reshape(out, inn // m, m)
        order = np.argsort(-np.abs(g), axis=-1, kind="stable")[..., :n]
        mask = np.zeros_like(g, dtype=bool)
        np.put_along_axis(mask, order, True, axis=-1)
        return cls.from_mask(w, mask.reshape(out, inn), n, m)

    # accessors ----------------------------------------------------------------------------------------------
    def indices(self) -> np.ndarray:
        """Unpacked positions, shape ``(out, in/m, n)``."""
        out, inn = self.shape
        g = inn // self.m
        flat = unpack_bits(self.indices_packed, self.index_bits, g * self.n)
        return flat.reshape(out, g, self.n)

    def mask(self) -> np.ndarray:
        out, inn = self.shape
        g = inn // self.m
        mk = np.zeros((out, g, self.m), dtype=bool)
        np.put_along_axis(mk, self.indices().astype(np.int64), True, axis=-1)
        return mk.reshape(out, inn)

    def with_values(self, values: WeightFormat) -> "NMSparse":
        return NMSparse(values, self.indices_packed, self.n, self.m, self.shape[1])

    def materialize(self) -> np.ndarray:
        out, inn = self.shape
        g = inn // self.m
        vals = self.values.materialize().reshape(out, g, self.n)
        w = np.zeros((out, g, self.m), dtype=np.float32)
        np.put_along_axis(w, self.indices().astype(np.int64), vals, axis=-1)
        return w.reshape(out, inn)

    def _tensors(self):
        return {"indices": self.indices_packed}

    def _attrs(self):
        return {"n": self.n, "m": self.m, "in_features": self.shape[1]}

    def _children(self):
        return {"values": self.values}

    @classmethod
    def _from_parts(cls, attrs, tensors, children):
        return cls(children["values"], tensors["indices"], attrs["n"], attrs["m"], attrs["in_features"])

    def describe(self) -> str:
        inner = "" if isinstance(self.values, Dense) and self.values.data.dtype == np.float32 else f"·{self.values.describe()}"
        return f"{self.n}:{self.m}{inner}"


# ----------------------------------------------------------------------------------------------------------------
class GroupQuant(WeightFormat):
    """Group-wise integer quantization along the input dimension.

    Each group of ``group_size`` consecutive weights of a row has an fp16 ``scale`` and an integer zero point
    ``z``; the weight is ``(u - z) * scale`` with ``u`` the unsigned ``bits``-bit code. Symmetric quantization
    stores no zeros: ``z = 2**(bits-1)`` (the MatMulNBits default). ``codes`` are packed (two int4 per byte).

    Group sparsity (GQSA): with a ``group_mask`` of shape ``(out, in/group_size)``, only the kept groups are
    stored -- codes ``(K, group_size*bits/8)``, scales/zeros ``(K,)`` for the ``K`` kept groups in row-major
    order -- and removed groups are zero.
    """

    kind = "group_quant"

    def __init__(
        self,
        codes_packed: np.ndarray,
        scales: np.ndarray,
        zeros: np.ndarray | None,
        bits: int,
        group_size: int,
        shape: tuple[int, int],
        group_mask_packed: np.ndarray | None = None,
    ):
        if bits not in (2, 3, 4, 8):
            raise ValueError(f"bits must be one of 2, 3, 4, 8, got {bits}")
        out, inn = int(shape[0]), int(shape[1])
        if group_size <= 0 or inn % group_size:
            raise ValueError(f"group size {group_size} does not divide the input dim {inn}")
        self.bits, self.group_size, self.shape = int(bits), int(group_size), (out, inn)
        self.ngroups = inn // group_size
        self.group_mask_packed = None if group_mask_packed is None else np.ascontiguousarray(group_mask_packed, dtype=np.uint8)
        kept = self.kept_groups()
        self.codes_packed = np.ascontiguousarray(codes_packed, dtype=np.uint8)
        self.scales = np.ascontiguousarray(scales, dtype=np.float16)
        self.zeros = None if zeros is None else np.ascontiguousarray(zeros, dtype=np.uint8)
        if self.group_mask_packed is None:
            exp_codes = (out, packed_len(inn, bits))
            exp_sc = (out, self.ngroups)
        else:
            exp_codes = (kept, packed_len(group_size, bits))
            exp_sc = (kept,)
        if self.codes_packed.shape != exp_codes:
            raise ValueError(f"codes have shape {self.codes_packed.shape}, expected {exp_codes}")
        if self.scales.shape != exp_sc:
            raise ValueError(f"scales have shape {self.scales.shape}, expected {exp_sc}")
        if self.zeros is not None and self.zeros.shape != exp_sc:
            raise ValueError(f"zeros have shape {self.zeros.shape}, expected {exp_sc}")

    @property
    def symmetric(self) -> bool:
        return self.zeros is None

    def group_mask(self) -> np.ndarray | None:
        if self.group_mask_packed is None:
            return None
        return unpack_bits(self.group_mask_packed, 1, self.ngroups).astype(bool)

    def kept_groups(self) -> int:
        m = self.group_mask()
        return self.shape[0] * self.ngroups if m is None else int(m.sum())

    @classmethod
    def from_codes(
        cls,
        codes: np.ndarray,
        scales: np.ndarray,
        zeros: np.ndarray | None,
        bits: int,
        group_size: int,
        group_mask: np.ndarray | None = None,
    ) -> "GroupQuant":
        """Build from unpacked codes ``(out, in)`` (uint), scales/zeros ``(out, in/g)``; with ``group_mask``
        only the kept groups' codes, scales and zeros are stored."""
        u = np.asarray(codes)
        out, inn = u.shape
        g = group_size
        sc = np.asarray(scales).reshape(out, inn // g)
        zr = None if zeros is None else np.asarray(zeros).reshape(out, inn // g)
        if group_mask is None:
            return cls(pack_bits(u, bits), sc, zr, bits, g, (out, inn))
        gm = np.asarray(group_mask, dtype=bool).reshape(out, inn // g)
        ug = u.reshape(out, inn // g, g)[gm]  # (K, g), row-major order of kept groups
        return cls(
            pack_bits(ug, bits),
            sc[gm],
            None if zr is None else zr[gm],
            bits,
            g,
            (out, inn),
            pack_bits(gm.astype(np.uint8), 1),
        )

    def codes(self) -> np.ndarray:
        """Unpacked codes ``(out, in)``; removed groups (group sparsity) read as the zero point."""
        out, inn = self.shape
        gm = self.group_mask()
        if gm is None:
            return unpack_bits(self.codes_packed, self.bits, inn)
        full = np.empty((out, self.ngroups, self.group_size), dtype=np.uint8)
        full[...] = 0
        full[gm] = unpack_bits(self.codes_packed, self.bits, self.group_size)
        return full.reshape(out, inn)

    def scale_grid(self) -> np.ndarray:
        """Scales as float32 ``(out, in/g)`` (0 for removed groups)."""
        gm = self.group_mask()
        if gm is None:
            return self.scales.astype(np.float32)
        s = np.zeros((self.shape[0], self.ngroups), dtype=np.float32)
        s[gm] = self.scales.astype(np.float32)
        return s

    def zero_grid(self) -> np.ndarray:
        """Zero points as float32 ``(out, in/g)``."""
        gm = self.group_mask()
        if self.zeros is None:
            z = np.full((self.shape[0], self.ngroups), float(1 << (self.bits - 1)), dtype=np.float32)
            return z
        if gm is None:
            return self.zeros.astype(np.float32)
        z = np.zeros((self.shape[0], self.ngroups), dtype=np.float32)
        z[gm] = self.zeros.astype(np.float32)
        return z

    def materialize(self) -> np.ndarray:
        out, inn = self.shape
        g = self.group_size
        u = self.codes().astype(np.float32).reshape(out, self.ngroups, g)
        s = self.scale_grid()[..., None]
        z = self.zero_grid()[..., None]
        w = (u - z) * s
        gm = self.group_mask()
        if gm is not None:
            w[~gm] = 0.0
        return w.reshape(out, inn).astype(np.float32)

    def _tensors(self):
        t = {"codes": self.codes_packed, "scales": self.scales}
        if self.zeros is not None:  # stored packed at the code width, like the codes (the bytes nbytes counts)
            t["zeros_packed"] = pack_bits(self.zeros.reshape(1, -1), self.bits).reshape(-1)
        if self.group_mask_packed is not None:
            t["group_mask"] = self.group_mask_packed
        return t

    @property
    def nbytes(self) -> int:
        # zero points are stored packed at their bit width (as MatMulNBits packs them), not one byte each
        n = self.codes_packed.nbytes + self.scales.nbytes
        if self.zeros is not None:
            n += packed_len(self.zeros.size, self.bits)
        if self.group_mask_packed is not None:
            n += self.group_mask_packed.nbytes
        return int(n)

    def _attrs(self):
        return {"bits": self.bits, "group_size": self.group_size, "in_features": self.shape[1], "symmetric": self.symmetric}

    @classmethod
    def _from_parts(cls, attrs, tensors, children):
        gm = tensors.get("group_mask")
        sc = tensors["scales"]
        rows = gm.shape[0] if gm is not None else sc.shape[0]
        shape = (rows, attrs["in_features"])
        zeros = tensors.get("zeros")  # artifacts written before the zero points were packed
        if "zeros_packed" in tensors:
            zeros = unpack_bits(np.asarray(tensors["zeros_packed"]).reshape(1, -1), attrs["bits"], sc.size).reshape(sc.shape)
        return cls(tensors["codes"], sc, zeros, attrs["bits"], attrs["group_size"], shape, gm)

    def describe(self) -> str:
        d = f"int{self.bits}g{self.group_size}"
        if not self.symmetric:
            d += "a"
        if self.group_mask_packed is not None:
            kept = self.kept_groups() / max(1, self.shape[0] * self.ngroups)
            d += f"s{round(100 * (1 - kept))}"
        return d


# ----------------------------------------------------------------------------------------------------------------
class LowRank(WeightFormat):
    """A base format plus a low-rank residual: ``W = base + A @ B`` with ``A: (out, r)``, ``B: (r, in)``."""

    kind = "low_rank"

    def __init__(self, base: WeightFormat, a: np.ndarray, b: np.ndarray):
        a = np.asarray(a)
        b = np.asarray(b)
        if a.dtype not in _FLOAT_DTYPES or a.dtype == np.float64:
            a = a.astype(np.float32)
        if b.dtype not in _FLOAT_DTYPES or b.dtype == np.float64:
            b = b.astype(np.float32)
        if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[0]:
            raise ValueError(f"low-rank factors must be (out, r) and (r, in), got {a.shape} and {b.shape}")
        if (a.shape[0], b.shape[1]) != tuple(base.shape):
            raise ValueError(f"low-rank factors {a.shape}x{b.shape} do not match the base weight {base.shape}")
        self.base, self.a, self.b = base, np.ascontiguousarray(a), np.ascontiguousarray(b)
        self.shape = tuple(base.shape)

    @property
    def rank(self) -> int:
        return int(self.a.shape[1])

    def materialize(self) -> np.ndarray:
        return self.base.materialize() + self.a.astype(np.float32) @ self.b.astype(np.float32)

    def sparsity(self) -> float:
        """The base's: the residual ``A @ B`` is dense, but the sparse kernels run on the base (2:4 + lr8 is 2:4)."""
        return self.base.sparsity()

    def _tensors(self):
        return {"a": self.a, "b": self.b}

    def _children(self):
        return {"base": self.base}

    @classmethod
    def _from_parts(cls, attrs, tensors, children):
        return cls(children["base"], tensors["a"], tensors["b"])

    def describe(self) -> str:
        return f"{self.base.describe()}+lr{self.rank}"
