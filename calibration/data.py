"""Calibration data: sources, validation against the model's inputs, the held-out split, batching.

Sources:

- a ``.npz`` file of arrays keyed by graph input name, samples along axis 0;
- a ``.npy`` file (only for single-input models);
- a directory of such files (all ``*.npz`` / ``*.npy``, sorted by name, concatenated along axis 0);
- generated inputs from the model's input spec (token ids in range for integer inputs feeding an embedding,
  ones for ``*mask*`` inputs, zeros for ``*type*`` inputs, ``arange`` for ``*position*`` inputs, standard normal
  floats otherwise) -- with a warning: generated data is a poor calibration set.

Files are read with ``allow_pickle=False``: object arrays are refused, never unpickled.

The last ``heldout`` share of the samples is held out: passes never fit on it; reports measure errors on it.
"""
from __future__ import annotations

import os
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..compressor.errors import CalibrationError
from ..compressor.ir import Conv, Embedding, Generic, Graph, Linear

_MAX_GENERATED_VOCAB = 1 << 20


@dataclass
class CalibrationSet:
    """Samples of every graph input, and the batches they are run in. ``arrays``: one group of samples (every input the
    same number along axis 0), or a list of groups whose per-sample shapes differ (sequences of several lengths:
    every batch is taken from one group). ``groups`` is always the list; ``arrays`` then its first group."""

    arrays: dict[str, np.ndarray] | list[dict[str, np.ndarray]]
    source: str
    generated: bool = False
    batch_size: int = 8
    warnings: list[str] = field(default_factory=list)

    def __post_init__(self):
        groups = [self.arrays] if isinstance(self.arrays, dict) else list(self.arrays)
        self.groups: list[dict[str, np.ndarray]] = [g for g in groups if _count(g)] or groups[:1]
        self.arrays = self.groups[0] if self.groups else {}

    @property
    def num_samples(self) -> int:
        return sum(_count(g) for g in self.groups)

    def batches(self) -> list[dict[str, np.ndarray]]:
        return [{k: v[i : i + self.batch_size] for k, v in g.items()}
                for g in self.groups for i in range(0, _count(g), self.batch_size)]  # fmt: skip

    def subset(self, idx: np.ndarray, source: str | None = None) -> "CalibrationSet":
        """The samples at ``idx`` (indices over the groups in order)."""
        return CalibrationSet(_pick(self.groups, np.asarray(idx)), source or self.source, self.generated, self.batch_size)

    def tokens(self) -> int:
        """Number of sample positions (samples x sequence length for token inputs)."""
        n = 0
        for g in self.groups:
            a = next(iter(g.values()))
            n += int(np.prod(a.shape[:2])) if a.ndim >= 2 else int(a.shape[0])
        return n

    def sample_shapes(self) -> dict[str, list]:
        """Each input's per-sample shape; with several groups, the list of their shapes."""
        per = {k: [[int(d) for d in g[k].shape[1:]] for g in self.groups] for k in self.arrays}
        return {k: v[0] if len(self.groups) == 1 else v for k, v in per.items()}


def _count(group: dict[str, np.ndarray]) -> int:
    return int(next(iter(group.values())).shape[0]) if group else 0


def _pick(groups: list[dict[str, np.ndarray]], idx: np.ndarray) -> list[dict[str, np.ndarray]]:
    """The samples at global indices ``idx`` (sorted; over the groups in order), group by group."""
    out, start = [], 0
    for g in groups:
        n = _count(g)
        local = idx[(idx >= start) & (idx < start + n)] - start
        if local.size:
            out.append({k: v[local] for k, v in g.items()})
        start += n
    return out


def _slice(groups: list[dict[str, np.ndarray]], start: int, stop: int) -> list[dict[str, np.ndarray]]:
    return _pick(groups, np.arange(start, stop))


def _merge_same_shapes(groups: list[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
    """Groups whose per-sample shapes agree become one; the groups ordered by their per-sample shapes (shortest
    sequences first: the report lists the lengths in that order, whatever the files' order)."""
    by: dict[tuple, list[dict[str, np.ndarray]]] = {}
    for g in groups:
        by.setdefault(tuple((k, v.shape[1:]) for k, v in sorted(g.items())), []).append(g)
    return [{k: np.concatenate([g[k] for g in gs], axis=0) if len(gs) > 1 else gs[0][k] for k in gs[0]}
            for _, gs in sorted(by.items(), key=lambda kv: kv[0])]  # fmt: skip


_NPY_MAGIC = b"\x93NUMPY"


def _head(path: Path) -> bytes:
    """The first bytes of a calibration file: np.load reads anything that is neither a zip archive nor an .npy as a
    pickle, so the format is checked before it is called ("contains object arrays" would be the wrong diagnosis)."""
    try:
        with open(path, "rb") as f:
            return f.read(len(_NPY_MAGIC))
    except OSError as e:
        raise CalibrationError(f"{path}: cannot be read ({e.strerror or e})")


def _load_npz(path: Path) -> dict[str, np.ndarray]:
    head = _head(path)
    if not head.startswith(b"PK"):
        kind = "a .npy array, not an .npz archive" if head.startswith(_NPY_MAGIC) else "not a zip archive"
        raise CalibrationError(f"{path}: not a valid .npz file ({kind})")
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except ValueError as e:
        if "pickle" in str(e).lower() or "object" in str(e).lower():
            raise CalibrationError(f"{path}: contains object arrays; refusing to unpickle (save plain numeric arrays)")
        raise CalibrationError(f"{path}: cannot be read as .npz ({e})")
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        raise CalibrationError(f"{path}: not a valid .npz file ({type(e).__name__}: {e})")


def _load_npy(path: Path) -> np.ndarray:
    if not _head(path).startswith(_NPY_MAGIC):
        raise CalibrationError(f"{path}: not a valid .npy file (no NumPy header)")
    try:
        return np.load(path, allow_pickle=False)
    except ValueError as e:
        if "pickle" in str(e).lower() or "object" in str(e).lower():
            raise CalibrationError(f"{path}: contains an object array; refusing to unpickle")
        raise CalibrationError(f"{path}: cannot be read as .npy ({e})")
    except (OSError, EOFError) as e:
        raise CalibrationError(f"{path}: not a valid .npy file ({type(e).__name__}: {e})")


def read_arrays(path: str | os.PathLike, graph: Graph) -> dict[str, np.ndarray]:
    """Arrays from a file or directory, keyed by input name (not yet validated); a directory's files must stack."""
    groups = read_groups(path, graph)
    if len(groups) > 1:
        shapes = "; ".join(", ".join(f"'{k}' {list(v.shape[1:])}" for k, v in g.items()) for g in groups[:3])
        raise CalibrationError(f"{path}: the files hold samples of different shapes ({shapes})")
    return groups[0]


def read_groups(path: str | os.PathLike, graph: Graph) -> list[dict[str, np.ndarray]]:
    """Arrays from a file or directory, keyed by input name (not yet validated). A directory's files are stacked
    where their per-sample shapes agree: one group per shape (sequences of several lengths), in file order."""
    p = Path(path)
    if not p.exists():
        raise CalibrationError(f"{p}: no such file or directory")
    if p.is_dir():
        files = sorted(f for f in p.iterdir() if f.suffix in (".npz", ".npy") and f.is_file())
        if not files:
            raise CalibrationError(f"{p}: directory has no .npz or .npy files")
        parts = [read_groups(f, graph)[0] for f in files]
        keys = set(parts[0])
        for f, part in zip(files, parts):
            if set(part) != keys:
                raise CalibrationError(f"{f}: has arrays {sorted(part)}, other files have {sorted(keys)}")
        groups = []
        for f, part in zip(files, parts):
            g = {}
            for k in sorted(keys):
                a = part[k]
                # a file holding one sample (no batch axis) is promoted to a batch of one
                rank = _expected_rank(graph, k)
                g[k] = a[None] if rank is not None and a.ndim == rank - 1 else a
                if g[k].ndim == 0:
                    raise CalibrationError(f"{f}: '{k}' is a scalar; samples must be along axis 0")
            counts = {k: v.shape[0] for k, v in g.items()}
            if len(set(counts.values())) > 1:
                raise CalibrationError(f"{f}: inputs have different numbers of samples ({counts})")
            groups.append(g)
        return _merge_same_shapes(groups)
    if p.suffix == ".npy":
        if len(graph.inputs) != 1:
            raise CalibrationError(f"{p}: a .npy file holds one array, but the model has inputs {graph.inputs}; use an .npz keyed by input name")
        return [{graph.inputs[0]: _load_npy(p)}]
    if p.suffix == ".npz" or zipfile.is_zipfile(p):
        return [_load_npz(p)]
    raise CalibrationError(f"{p}: calibration data must be .npz, .npy or a directory of them")


def _expected_rank(graph: Graph, name: str) -> int | None:
    v = graph.values.get(name)
    return None if v is None or v.shape is None else len(v.shape)


def validate_arrays(arrays: dict[str, np.ndarray], graph: Graph, source: str, notes: list[str] | None = None) -> dict[str, np.ndarray]:
    """The arrays checked against the graph's inputs (names, ranks, static dims, dtypes, NaN/inf) and cast to the input
    types. ``notes`` collects what was done to them that a user should know: a float input given with more precision
    than the model takes (float64 -> float32), an input without its batch axis read as one sample."""
    missing = [i for i in graph.inputs if i not in arrays]
    extra = [k for k in arrays if k not in graph.inputs]
    if missing or extra:
        msg = []
        if missing:
            msg.append(f"missing {missing}")
        if extra:
            msg.append(f"unknown {extra}")
        raise CalibrationError(f"{source}: arrays must be keyed by the model's input names {graph.inputs}: {'; '.join(msg)}")
    out = {}
    n = None
    for name in graph.inputs:
        a = np.asarray(arrays[name])
        v = graph.values.get(name)
        if a.dtype == object or a.dtype.kind not in "biuf":
            raise CalibrationError(f"{source}: '{name}' has dtype {a.dtype}, expected numbers")
        if v is not None and v.shape is not None:
            given = list(a.shape)
            one = ""
            if a.ndim == len(v.shape) - 1:
                a = a[None]  # one sample without its batch axis
                one = f" (read as one sample, {list(a.shape)})"
                if notes is not None:
                    notes.append(f"{source}: '{name}' has shape {given}, one axis fewer than the model's {list(v.shape)}: "
                                 f"read as one sample {list(a.shape)}")  # fmt: skip
            if a.ndim != len(v.shape):
                raise CalibrationError(f"{source}: '{name}' has shape {given}, the model expects rank {len(v.shape)} {list(v.shape)}")
            for i, (got, want) in enumerate(zip(a.shape, v.shape)):
                if i > 0 and isinstance(want, int) and got != want:
                    raise CalibrationError(f"{source}: '{name}' has shape {given}{one}, the model expects {list(v.shape)}")
            want_float = v.dtype.startswith(("float", "bfloat"))
            if want_float and a.dtype.kind not in "f":
                raise CalibrationError(f"{source}: '{name}' has dtype {a.dtype}, the model expects {v.dtype}")
            if not want_float and a.dtype.kind == "f":
                raise CalibrationError(f"{source}: '{name}' has dtype {a.dtype}, the model expects {v.dtype}")
            want = np.dtype(_np_dtype(v.dtype))
            if notes is not None and a.dtype.kind == "f" and want.kind == "f" and a.dtype.itemsize > want.itemsize:
                notes.append(f"{source}: '{name}' is {a.dtype}; cast to {want} (the model's type)")
            a = a.astype(want, copy=False)
        if a.dtype.kind == "f" and not np.isfinite(a).all():
            raise CalibrationError(f"{source}: '{name}' contains NaN or inf")
        if a.ndim == 0:
            raise CalibrationError(f"{source}: '{name}' is a scalar; samples must be along axis 0")
        if n is None:
            n = a.shape[0]
        elif a.shape[0] != n:
            raise CalibrationError(f"{source}: inputs have different numbers of samples ({n} and {a.shape[0]} for '{name}')")
        out[name] = np.asarray(a, order="C")
    if not n:
        raise CalibrationError(f"{source}: no samples")
    _check_named_dims(out, graph, source)
    _check_token_range(out, graph, source)
    return out


def _check_named_dims(arrays: dict[str, np.ndarray], graph: Graph, source: str) -> None:
    """Inputs that share a named dim (``seq`` of input_ids and attention_mask) must agree on its size."""
    seen: dict[str, tuple[str, int]] = {}
    for name, a in arrays.items():
        v = graph.values.get(name)
        if v is None or v.shape is None or len(v.shape) != a.ndim:
            continue
        for i, d in enumerate(v.shape):
            if i == 0 or not isinstance(d, str) or not d:
                continue
            if d in seen and seen[d][1] != a.shape[i]:
                other, size = seen[d]
                raise CalibrationError(f"{source}: '{name}' has {d}={a.shape[i]} (dim {i}) but '{other}' has {d}={size}; "
                                       f"inputs sharing the dim '{d}' must have the same size")  # fmt: skip
            seen.setdefault(d, (name, a.shape[i]))


def _check_positions(arrays: dict[str, np.ndarray], graph: Graph, source: str) -> None:
    """Token sequences longer than the model's learned position table (GPT-2's 1024 positions), less the offset the
    model adds to its position ids (RoBERTa's start at padding_idx + 1 = 2: 514 rows take 512 tokens)."""
    limit = max_positions(graph)
    if limit is None:
        return
    usable = None
    for name in token_inputs(graph):
        a = arrays.get(name)
        if a is None or a.ndim < 2 or a.shape[1] < limit - _MAX_POSITION_OFFSET:
            continue
        if usable is None:  # one probe run for all the token inputs
            usable, offset = _usable_positions(graph, arrays, limit)
        if a.shape[1] > usable:
            why = f"{limit} positions" if not offset else f"a {limit}-row position table and its position ids start at {offset}"
            raise CalibrationError(f"{source}: '{name}' holds sequences of {a.shape[1]} tokens, the model takes {usable} "
                                   f"({why}); cut them (e.g. --seq-len {usable})")  # fmt: skip


_MAX_POSITION_OFFSET = 8  # sequences this close to the table's rows are checked by running one sample


def _usable_positions(graph: Graph, arrays: dict[str, np.ndarray], limit: int) -> tuple[int, int]:
    """(longest sequence, position id offset): one batch of the data cut to ``limit`` tokens is run; when a position
    table (an embedding not indexed by a graph input) is indexed past its rows, the offset is its largest id minus the
    last position (RoBERTa: ids 2 .. L + 1). Other failures are left to the calibration run to report."""
    from ..compressor.errors import InputShapeError
    from ..compressor.executor import Executor

    rows = static_batch(graph) or 1
    probe = crop_sequences({k: v[:rows] for k, v in arrays.items()}, graph, limit)
    length = max((v.shape[1] for k, v in probe.items() if k in token_inputs(graph) and v.ndim >= 2), default=limit)
    try:
        Executor(graph).run(probe)
    except InputShapeError as e:
        node = next((n for n in graph.nodes if n.name == e.node), None)
        top = getattr(e, "values", None)
        if isinstance(node, Embedding) and node.inputs[0] not in graph.inputs and top is not None:
            offset = int(top[1]) - (length - 1)
            if 0 < offset < limit:
                return limit - offset, offset
    except Exception:  # noqa: BLE001 - the calibration run reports these with context
        pass
    return limit, 0


def _check_token_range(arrays: dict[str, np.ndarray], graph: Graph, source: str) -> None:
    for name, vocab in token_inputs(graph).items():
        a = arrays.get(name)
        if a is not None and a.size and (a.min() < 0 or a.max() >= vocab):
            raise CalibrationError(f"{source}: '{name}' has token ids in [{a.min()}, {a.max()}], the embedding has {vocab} rows")


def _np_dtype(name: str):
    return np.float32 if name == "bfloat16" else np.dtype(name)


def token_inputs(graph: Graph) -> dict[str, int]:
    """Integer graph inputs that index an embedding table directly, with the table size."""
    out = {}
    for n in graph.nodes:
        if isinstance(n, Embedding) and n.inputs[0] in graph.inputs:
            out[n.inputs[0]] = int(n.table.shape[0])
        elif getattr(n, "op_type", None) == "Gather" and n.inputs[1] in graph.inputs and n.inputs[0] in graph.constants:
            out[n.inputs[1]] = int(graph.constants[n.inputs[0]].shape[0])
    return out


def max_positions(graph: Graph) -> int | None:
    """The longest sequence the model accepts, so that generated data stays within it: the rows of the smallest
    learned position table (an embedding not indexed by a graph input), and the length of a constant buffer sliced by
    a bound known only at run time (a causal mask ``bias[:, :, :t, :t]``, MPT's ALiBi ``alibi[:, :, -t:, -t:]``)."""
    rows = []
    prod = graph.producers()
    for n in graph.nodes:
        # (tiny tables, e.g. token types indexed by an internal zeros tensor, are not position tables)
        if isinstance(n, Embedding) and n.inputs[0] not in graph.inputs and n.table.shape[0] >= 16:
            rows.append(int(n.table.shape[0]))
        elif _is_slice(n):
            rows.extend(_run_time_sliced_lengths(graph, n, prod))
    return min(rows) if rows else None


def _is_slice(n) -> bool:
    return isinstance(n, Generic) and n.op_type == "Slice" and not n.domain


def _run_time_sliced_lengths(graph: Graph, n: Generic, prod: dict) -> list[int]:
    """The lengths (>= 16) along the sliced axes of a constant sliced by starts or ends computed at run time (or of
    a slice of one: TorchScript slices one axis at a time)."""
    ins = list(n.inputs) + [""] * (5 - len(n.inputs))
    starts, ends, axes = ins[1], ins[2], ins[3]
    if starts in graph.constants and ends in graph.constants:
        return []
    root, data = ins[0], None
    while root not in graph.constants and _is_slice(prod.get(root)):
        root = prod[root].inputs[0]
    if root in graph.constants:  # (a slice keeps the rank: the constant's dims bound the sliced value's)
        data = graph.constants[root]
    if data is None or data.ndim == 0:
        return []
    ax = graph.constants.get(axes) if axes else None
    if axes and ax is None:  # axes computed at run time: any axis
        picked = range(data.ndim)
    else:
        bounds = graph.constants.get(ends) if ends in graph.constants else graph.constants.get(starts)
        count = int(np.asarray(bounds).size) if bounds is not None else data.ndim
        picked = [int(a) % data.ndim for a in np.asarray(ax).reshape(-1)] if ax is not None else range(min(count, data.ndim))
    return [int(data.shape[a]) for a in picked if int(data.shape[a]) >= 16]


def static_batch(graph: Graph) -> int | None:
    """The fixed batch size of a model whose inputs all have a static leading dimension (None when dynamic)."""
    dims = set()
    for name in graph.inputs:
        v = graph.values.get(name)
        if v is None or v.shape is None or not v.shape or not isinstance(v.shape[0], int):
            return None
        dims.add(v.shape[0])
    return dims.pop() if len(dims) == 1 else None


def generate(graph: Graph, samples: int, seq_len: int | None, seed: int, used: dict[str, bool] | None = None) -> dict[str, np.ndarray]:
    """Inputs from the model's input spec (see module docstring). ``used["seq"]``: whether some input took the sequence
    length (a dynamic axis besides the batch and a Linear's feature width)."""
    rng = np.random.default_rng(seed)
    vocab = token_inputs(graph)
    seq = seq_len or min(128, max_positions(graph) or 128)
    sym: dict[str, int] = {}
    # a symbolic feature (last) dim of an input that a Linear layer reads takes the layer's input width
    consumers = graph.consumers()
    for name in graph.inputs:
        v = graph.values.get(name)
        if v is not None and v.shape and isinstance(v.shape[-1], str) and len(v.shape) >= 2:
            widths = {c.in_features for c in consumers.get(name, []) if isinstance(c, Linear) and not isinstance(c, Conv) and c.inputs[0] == name}
            if len(widths) == 1:
                sym.setdefault(v.shape[-1], widths.pop())
    out = {}
    for name in graph.inputs:
        v = graph.values.get(name)
        if v is None or v.shape is None:
            raise CalibrationError(f"cannot generate data for input '{name}': its shape is unknown; give --calib data")
        shape = []
        for i, d in enumerate(v.shape):
            if isinstance(d, int):
                shape.append(d)
            elif i == 0:
                shape.append(samples)
            else:
                key = d if isinstance(d, str) else f"{name}:{i}"
                if key not in sym:
                    # the default length within the bound a .pt2 program declares (Dim("seq", max=64))
                    cap = (graph.meta.get("input_dim_max") or {}).get(name, {}).get(str(i))
                    sym[key] = min(seq, cap) if cap and not seq_len else seq
                    if used is not None:
                        used["seq"] = True
                shape.append(sym[key])
        if isinstance(v.shape[0], int) and v.shape[0] != samples:
            shape[0] = samples  # static batch dim: samples still go along axis 0, batches are cut to its size
        low = name.lower()
        if v.dtype.startswith(("float", "bfloat")):
            a = rng.standard_normal(shape).astype(_np_dtype(v.dtype))
        elif v.dtype == "bool":
            a = np.ones(shape, dtype=bool)
        elif "mask" in low:
            a = np.ones(shape, dtype=_np_dtype(v.dtype))
        elif "type" in low or "segment" in low:
            a = np.zeros(shape, dtype=_np_dtype(v.dtype))
        elif "position" in low or "pos_id" in low:
            a = np.broadcast_to(np.arange(shape[-1]), shape).astype(_np_dtype(v.dtype)).copy()
        else:
            hi = vocab.get(name, 2)
            a = rng.integers(0, min(hi, _MAX_GENERATED_VOCAB), size=shape).astype(_np_dtype(v.dtype))
        out[name] = a
    return out


def crop_sequences(arrays: dict[str, np.ndarray], graph: Graph, seq_len: int | None,
                   warnings: list[str] | None = None) -> dict[str, np.ndarray]:  # fmt: skip
    """With ``seq_len``, cut integer token inputs (and inputs sharing their sequence dim) to that length. ``warnings``
    gets a line when that cuts nothing (no such input; sequences no longer than ``seq_len``)."""
    if not seq_len:
        return arrays
    seq_dims = set()
    for name in token_inputs(graph):
        v = graph.values.get(name)
        if v is not None and v.shape is not None and len(v.shape) >= 2 and isinstance(v.shape[1], str):
            seq_dims.add(v.shape[1])
    # lengths of the token inputs in this data: an input whose symbolic axis 1 has one of them is cut with them (the
    # TorchScript exporter's list-form dynamic_axes names attention_mask's axes apart from input_ids')
    seq_lens = {arrays[n].shape[1] for n in token_inputs(graph) if n in arrays and arrays[n].ndim >= 2}
    out = {}
    for name, a in arrays.items():
        v = graph.values.get(name)
        seq_axis = v is not None and v.shape is not None and len(v.shape) >= 2 and isinstance(v.shape[1], str)
        if seq_axis and (v.shape[1] in seq_dims or a.shape[1] in seq_lens) and a.shape[1] > seq_len:
            out[name] = np.asarray(a[:, :seq_len], order="C")
        else:
            out[name] = a
    if warnings is not None and all(out[k] is arrays[k] for k in arrays):
        warnings.append(f"--seq-len {seq_len} cuts nothing: " + (
            f"the calibration sequences are {max(seq_lens)} tokens long" if seq_lens
            else "the model has no token-sequence input (it cuts the sequence axis of integer token inputs)"))
    return out


def _flip_masking_bool_inputs(graph: Graph, arrays: dict[str, np.ndarray], warnings: list[str]) -> dict[str, np.ndarray]:
    """Generated bool inputs are all True (an attention mask: attend everywhere). Under the other convention (a padding
    mask, nn.MultiheadAttention's key_padding_mask: True = ignore) that masks every position and the model outputs NaN:
    one sample is run, and where all True gives non-finite outputs and all False does not, the bool inputs are False."""
    names = [k for k, v in arrays.items() if v.dtype == np.bool_]
    if not names:
        return arrays
    from ..compressor.executor import Executor

    rows = static_batch(graph) or 1
    ex = Executor(graph)

    def finite(arr):
        try:
            out = ex.run({k: v[:rows] for k, v in arr.items()})
        except Exception:  # noqa: BLE001 - the calibration run reports errors with context
            return True
        return all(np.isfinite(o).all() for o in out.values() if np.asarray(o).dtype.kind == "f")

    if finite(arrays):
        return arrays
    flipped = dict(arrays, **{k: np.zeros_like(arrays[k]) for k in names})
    if not finite(flipped):
        return arrays
    warnings.append(f"generated bool input(s) {', '.join(repr(k) for k in names)} set to all False: all True gave NaN / "
                    "inf outputs (a padding mask that masked every position)")  # fmt: skip
    return flipped


_DEFAULT_SAMPLES = 128  # CalibrationSpec.samples' default
_DEFAULT_BATCH = 8  # CalibrationSpec.batch_size's default


def load_calibration(graph: Graph, data: str | None, *, samples: int, seq_len: int | None, seed: int, heldout: float,
                     batch_size: int = 8) -> tuple[CalibrationSet, CalibrationSet | None]:  # fmt: skip
    """(fit split, held-out split). ``samples`` counts both splits together."""
    warnings = []
    if data is None:
        used = {"seq": False}
        arrays = generate(graph, samples, seq_len, seed, used)
        source = "generated"
        if seq_len and not used["seq"]:
            warnings.append(f"--seq-len {seq_len} does nothing: the model's inputs have no dynamic axis besides the batch "
                            "(generated inputs take their exported shapes)")  # fmt: skip
        warnings.append("no calibration data given: using generated inputs, a poor calibration set (give --calib data.npz)")
        generated = True
        groups = [_flip_masking_bool_inputs(graph, arrays, warnings)]
    else:
        groups = read_groups(data, graph)  # one group per per-sample shape (sequences of several lengths)
        source = str(data)
        generated = False
    notes: list[str] = []
    groups = [validate_arrays(g, graph, source, notes) for g in groups]
    warnings.extend(dict.fromkeys(notes))  # (once per input, not per group of lengths)
    cut_nothing: list[str] = []
    groups = [crop_sequences(g, graph, seq_len, cut_nothing if not generated else None) for g in groups]
    if len(cut_nothing) == len(groups) and cut_nothing:  # no group was cut: the line of the longest sequences
        warnings.append(max(cut_nothing, key=lambda w: (len(w), w)))
    groups = _merge_same_shapes(groups)
    for g in groups:
        _check_positions(g, graph, source)
    n = sum(_count(g) for g in groups)
    if n < samples and not generated and samples != _DEFAULT_SAMPLES:  # asked for (--calib-samples), not the default
        warnings.append(f"{source} holds {n} calibration samples, fewer than the {samples} asked for: using {n}")
    if n > samples:
        idx = np.sort(np.random.default_rng(seed).choice(n, size=samples, replace=False))
        groups = _pick(groups, idx)
        n = samples
    n_held = int(round(heldout)) if heldout >= 1 else int(np.ceil(heldout * n))
    if heldout > 0 and n_held == 0:
        n_held = 1
    if n < 2:
        if heldout > 0:
            warnings.append("only one calibration sample: no held-out split, errors are measured on the fitting data")
        n_held = 0
    elif n_held > n // 2:  # a count (a fraction is at most 0.5): never more held out than fitted on
        if heldout >= 1:
            warnings.append(f"--heldout {int(round(heldout))} of {n} calibration samples would leave {max(n - n_held, 0)} to fit "
                            f"on: holding out {n // 2}")  # fmt: skip
        n_held = n // 2
    sb = static_batch(graph)
    if sb is not None and batch_size != _DEFAULT_BATCH and batch_size != sb:
        warnings.append(f"--batch-size {batch_size}: the model's batch size is fixed at {sb} by its export: batches of {sb}")
    if sb is not None and sb > 1:  # a model exported with a fixed batch size runs on batches of exactly that size
        batch_size = sb
        if len(groups) > 1:  # every batch comes from one group: each holds whole batches
            groups = [{k: v[: (_count(g) // sb) * sb] for k, v in g.items()} for g in groups]
            groups = [g for g in groups if _count(g)] or groups[:1]
            n2 = sum(_count(g) for g in groups)
            if n2 < n:
                warnings.append(f"the model's batch size is fixed at {sb} by its export: {n - n2} of {n} calibration samples "
                                f"of several shapes left out (each shape's samples in whole batches of {sb})")  # fmt: skip
            n = n2
        if n_held and n < 2 * sb:
            n_held = 0
            warnings.append(f"fewer than {2 * sb} samples for a model with a static batch size of {sb}: no held-out split")
        elif n_held:
            n_held = max(sb, (n_held // sb) * sb)
        n_fit = ((n - n_held) // sb) * sb
        if n_fit == 0:
            shapes = ", ".join(f"'{k}' {list(v.shape)}" for k, v in groups[0].items())
            raise CalibrationError(f"the model has a static batch size of {sb}: give at least {sb} calibration samples "
                                   f"(got {n}: {shapes})")  # fmt: skip
        if n_fit + n_held < n:
            warnings.append(f"the model's batch size is fixed at {sb} by its export: {n - n_fit - n_held} of {n} calibration "
                            f"samples left out ({n_fit} fitted in batches of {sb}" + (f", {n_held} held out)" if n_held else ")"))
        groups = _slice(groups, 0, n_fit + n_held)
        n = n_fit + n_held
    elif sb is not None:
        batch_size = 1
    fit_set = CalibrationSet(_slice(groups, 0, n - n_held), source, generated, batch_size, warnings)
    held_set = CalibrationSet(_slice(groups, n - n_held, n), source + " (held out)", generated, batch_size) if n_held else None
    return fit_set, held_set
