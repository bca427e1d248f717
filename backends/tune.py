"""Tuning: schedule search per kernel, measured on the local machine, stored in a JSON tuning database.

Database (``sparsec.tuning/1``)::

    {"schema": "sparsec.tuning/1", "target": "x86",
     "entries": [{"kernel": "cpu.nm_sparse", "target": "x86",
                  "key": {"format": "nm_sparse[dense]", "nm": "2:4", "out": 256, "in": 256, "act_dtype": "float32"},
                  "config": {"tile_n": 32, "lanes": 8, "unroll": 4}, "seconds": 1.2e-05,
                  "default_seconds": 2.0e-05, "candidates": 12, "m": [1, 64], "device": "x86 host (...)"}]}

Lookup order: the user's database (``--tuning-db``; ``SPARSEC_TUNING_DB``) then the one shipped for the target
(``golden/tuning/<target>.json``). A kernel with no entry uses its default schedule and the build report says
"untuned". Keys are the :func:`sparsec.backends.kernels.registry.linear_key` dicts; an entry tuned for a given M
(``key["m"]``) is preferred when the call site has that hint, else the entry without an M is used.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

TUNING_SCHEMA = "sparsec.tuning/1"


def shipped_db_path(target_name: str) -> Path:
    import sparsec.golden as g

    return Path(g.__file__).parent / "tuning" / f"{target_name.partition(':')[0]}.json"


def _canon(key: dict[str, Any]) -> str:
    return json.dumps(key, sort_keys=True, separators=(",", ":"))


@dataclass
class TuningDB:
    """A list of entries (user DB first, shipped DB after); ``lookup`` returns the first match."""

    entries: list[dict[str, Any]] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)
    path: Path | None = None  # where ``save`` writes (the user's DB, or the shipped one when tuning for shipping)

    @classmethod
    def empty(cls) -> "TuningDB":
        return cls()

    @classmethod
    def read(cls, path: str | os.PathLike) -> list[dict[str, Any]]:
        from ..compressor.errors import RecipeError

        p = Path(path)
        if not p.exists():
            return []
        try:
            doc = json.loads(p.read_text())
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
            raise RecipeError(f"tuning database {p}: cannot be read ({e})")
        if not isinstance(doc, dict) or doc.get("schema") != TUNING_SCHEMA or not isinstance(doc.get("entries"), list):
            raise RecipeError(f"tuning database {p}: not a {TUNING_SCHEMA} file")
        return [e for e in doc["entries"] if isinstance(e, dict) and {"kernel", "key", "config"} <= set(e)]

    @classmethod
    def for_target(cls, target_name: str, user_path: str | os.PathLike | None = None, shipped: bool = True) -> "TuningDB":
        user_path = user_path or default_user_db(target_name)
        db = cls()
        if user_path:
            db.entries.extend(cls.read(user_path))
            db.sources.append(str(user_path))
            db.path = Path(user_path)
        if shipped:
            sp = shipped_db_path(target_name)
            if sp.exists():
                db.entries.extend(cls.read(sp))
                db.sources.append(str(sp))
        return db

    def lookup(self, kernel: str, target, key: dict[str, Any], lanes: int | None = None) -> dict[str, Any] | None:
        """The config of the first entry for ``kernel`` / ``target`` / ``key``. ``lanes`` (CPU kernels: float32 SIMD
        lanes of this machine): entries tuned on another vector width are skipped; a schedule tuned with 512-bit
        vectors (16 lanes) spills registers on a 256-bit machine (the shipped x86 entries, tuned on AVX-512, ran the
        golden GPT's prefill GEMMs 2.5x slower on an AVX2 machine than its default schedules)."""
        tname = target if isinstance(target, str) else target.name
        tbase = tname.partition(":")[0]
        want = [key]
        if "m" in key:
            want.append({k: v for k, v in key.items() if k != "m"})
        for k in want:
            ck = _canon(k)
            for e in self.entries:
                if e["kernel"] == kernel and e.get("target", tbase) in (tname, tbase) and _canon(e["key"]) == ck:
                    if lanes is not None and e.get("lanes") is not None and int(e["lanes"]) != lanes:
                        continue
                    return dict(e["config"])
        return None

    def record(self, kernel: str, target_name: str, key: dict[str, Any], config: dict[str, Any], **info) -> None:
        ck = _canon(key)
        self.entries = [e for e in self.entries if not (e["kernel"] == kernel and e.get("target") == target_name and _canon(e["key"]) == ck)]
        self.entries.insert(0, {"kernel": kernel, "target": target_name, "key": dict(key), "config": dict(config), **info})

    def save(self, path: str | os.PathLike | None = None, target_name: str = "") -> Path:
        p = Path(path or self.path)
        p.parent.mkdir(parents=True, exist_ok=True)
        entries = sorted(self.entries, key=lambda e: (e["kernel"], e.get("target", ""), _canon(e["key"])))
        doc = {"schema": TUNING_SCHEMA, "target": target_name, "entries": entries}
        tmp = p.with_suffix(p.suffix + ".tmp")
        tmp.write_text(json.dumps(doc, sort_keys=True, indent=1) + "\n")
        os.replace(tmp, p)
        return p


# ----------------------------------------------------------------------------------------------------------------
# search
def default_user_db(target_name: str) -> Path:
    """Where ``sparsec tune`` stores results and builds look first (``SPARSEC_TUNING_DB`` overrides)."""
    env = os.environ.get("SPARSEC_TUNING_DB")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "sparsec" / "tuning" / f"{target_name.partition(':')[0]}.json"


def parse_format_spec(spec: str) -> dict[str, Any]:
    """``dense``, ``2:4``, ``int4``/``int8`` with optional ``g<group>`` and ``a`` (asymmetric), ``2:4+int4g32``."""
    from ..compressor.errors import RecipeError

    out: dict[str, Any] = {"nm": None, "bits": None, "group_size": 32, "symmetric": True}
    s = spec.strip().lower()
    if s == "dense":
        return out
    for part in s.split("+"):
        if ":" in part:
            n, _, m = part.partition(":")
            if not (n.isdigit() and m.isdigit()) or not 0 < int(n) < int(m):
                raise RecipeError(f"format {spec!r}: bad N:M part {part!r}")
            out["nm"] = (int(n), int(m))
        elif part.startswith("int"):
            rest = part[3:]
            asym = rest.endswith("a")
            rest = rest.rstrip("a")
            bits, _, g = rest.partition("g")
            if bits not in ("4", "8") or (g and not g.isdigit()):
                raise RecipeError(f"format {spec!r}: bad quantization part {part!r} (int4, int8, int4g64, int8g32a)")
            out["bits"], out["symmetric"] = int(bits), not asym
            if g:
                out["group_size"] = int(g)
        else:
            raise RecipeError(f"format {spec!r}: expected dense, N:M, intB[gG][a] or N:M+intB[gG][a]")
    return out


def synthetic_weight(spec: dict[str, Any], out_f: int, in_f: int, seed: int = 0):
    """A random weight of the given format structure (values do not matter for timing)."""
    import numpy as np

    from ..compressor.formats import Dense, GroupQuant, NMSparse

    rng = np.random.default_rng(seed)
    w = rng.standard_normal((out_f, in_f)).astype(np.float32)
    if spec["nm"] is None and spec["bits"] is None:
        return Dense(w)

    def quant(rows, cols):
        g = spec["group_size"]
        if cols % g:
            return None
        codes = rng.integers(0, 1 << spec["bits"], (rows, cols))
        scales = (rng.random((rows, cols // g)) * 0.1 + 0.01).astype(np.float16)
        zeros = None if spec["symmetric"] else rng.integers(0, 1 << spec["bits"], (rows, cols // g))
        return GroupQuant.from_codes(codes, scales, zeros, spec["bits"], g)

    if spec["nm"] is None:
        return quant(out_f, in_f)
    n, m = spec["nm"]
    if in_f % m:
        return None
    sp = NMSparse.from_dense(w, n, m)
    if spec["bits"] is None:
        return sp
    vals = quant(out_f, in_f // m * n)
    return None if vals is None else sp.with_values(vals)


@dataclass
class TuneResult:
    kernel: str
    key: dict[str, Any]
    config: dict[str, Any]
    seconds: dict[int, float]
    default_seconds: dict[int, float]
    candidates: int

    @property
    def speedup(self) -> float:
        import math

        ratios = [self.default_seconds[m] / self.seconds[m] for m in self.seconds if self.seconds[m] > 0]
        return math.exp(sum(math.log(r) for r in ratios) / len(ratios)) if ratios else 1.0


def measure_kernel(impl, linear, target, m_values, number: int = 0, repeat: int = 5, seed: int = 0) -> dict[int, float]:
    """Seconds per call (min over repeats) of ``impl``'s PrimFunc at each M, on this machine."""
    import numpy as np
    import tvm

    from .kernels.registry import prepare_params

    if impl.func is None:
        raise ValueError(f"kernel {impl.name} is not a TIR PrimFunc: it cannot be measured standalone")
    mod = tvm.IRModule({"kernel": impl.func.with_attr("global_symbol", "kernel")})
    ex = tvm.compile(mod, target=target.tvm_target())
    rt = ex.jit()
    dev = tvm.cpu(0)
    rng = np.random.default_rng(seed)
    params = [tvm.runtime.tensor(a, dev) for a in prepare_params(impl, linear)]
    out_f, in_f = linear.weight.shape
    res = {}
    for m in m_values:
        x = tvm.runtime.tensor(rng.standard_normal((m, in_f)).astype(impl.act_dtype), dev)
        y = tvm.runtime.tensor(np.zeros((m, out_f), impl.out_dtype), dev)
        n = number or max(1, min(200, int(2e8 / max(1, 2 * m * out_f * in_f))))
        ev = rt.time_evaluator("kernel", dev, number=n, repeat=repeat)
        res[int(m)] = float(min(ev(x, *params, y).results))
    return res


def tune_linear(linear, target, kernel_name: str, m_values=(1, 16, 128), max_candidates: int = 24, seed: int = 0,
                progress=None) -> TuneResult | None:  # fmt: skip
    """Search ``kernel_name``'s schedule space for ``linear`` (the default config always competes)."""
    import random

    from .kernels.registry import ShapeHints, kernel_registry, linear_key, select_kernel

    gen = kernel_registry()[kernel_name]
    if gen.search_space is None:
        return None
    hints = ShapeHints()
    base = select_kernel(linear, target, hints, TuningDB.empty(), only=kernel_name)
    space = [c for c in gen.search_space(linear, target, hints) if c != base.config]
    random.Random(seed).shuffle(space)
    cands = [dict(base.config)] + space[: max(0, max_candidates - 1)]
    best = None
    default_t = None
    for i, cfg in enumerate(cands):
        impl = select_kernel(linear, target, ShapeHints(config=cfg), TuningDB.empty(), only=kernel_name)
        t = measure_kernel(impl, linear, target, m_values, seed=seed)
        if default_t is None:
            default_t = t
        score = _geo(default_t, t)
        if best is None or score > best[0]:
            best = (score, cfg, t)
        if progress is not None:
            progress(i + 1, len(cands))
    assert best is not None and default_t is not None
    n = len(cands)
    stage2 = gen.refine_space(linear, target, best[1]) if gen.refine_space is not None else None
    more, m_min = stage2 if stage2 is not None else ([], 0)
    big = [m for m in m_values if m >= m_min]
    if more and big:
        # second stage: the code at M >= m_min around the winner (the CPU prefill GEMM's blocking), scored there;
        # the winner competes with the times it had (the code below m_min is the same in every candidate)
        more = list(more)
        random.Random(seed + 1).shuffle(more)
        ref = {m: best[2][m] for m in big}
        top = (1.0, best[1], ref)
        for cfg in more[: max(0, max_candidates - 1)]:
            impl = select_kernel(linear, target, ShapeHints(config=cfg), TuningDB.empty(), only=kernel_name)
            t = measure_kernel(impl, linear, target, big, seed=seed)
            n += 1
            score = _geo(ref, t)
            if score > top[0]:
                top = (score, cfg, t)
        best = (best[0], top[1], {**best[2], **top[2]})
    return TuneResult(kernel_name, linear_key(linear, hints), best[1], best[2], default_t, n)


def _geo(ref: dict[int, float], t: dict[int, float]) -> float:
    import math

    return math.exp(sum(math.log(ref[m] / t[m]) for m in t) / len(t))


def tunable_kernel(linear, target) -> str | None:
    """The registered generator the build would pick for ``linear`` on ``target``, when it can be tuned here."""
    from .kernels.registry import ShapeHints, select_kernel

    impl = select_kernel(linear, target, ShapeHints(), TuningDB.empty())
    from .kernels.registry import kernel_registry

    gen = kernel_registry().get(impl.name)
    if gen is None or gen.search_space is None or impl.func is None:
        return None
    return impl.name


def probes(graph, formats: list[str] | None = None, seed: int = 0):
    """(label, Linear) per Linear layer of ``graph`` and weight format: the layer's own weight when ``formats`` is None,
    else a synthetic weight of each format spec (:func:`parse_format_spec`) that fits the layer's shape."""
    from ..compressor.ir import Linear

    for lin in graph.linears():
        if formats is None:
            yield lin.weight.describe(), Linear(lin.name, ["x"], ["y"], weight=lin.weight, bias=lin.bias)
            continue
        for f in formats:
            w = synthetic_weight(parse_format_spec(f), lin.out_features, lin.in_features, seed)
            if w is not None:
                yield f, Linear(lin.name, ["x"], ["y"], weight=w, bias=lin.bias)


def tune_graph(graph, target, db: TuningDB, formats: list[str] | None = None, m_values=(1, 16, 128), max_candidates: int = 24,
               seed: int = 0, console=None, only_formats_of_graph: bool = False,
               include_unverified: bool | None = None) -> list[dict[str, Any]]:  # fmt: skip
    """Tune the kernels of every distinct Linear shape of ``graph`` for each format in ``formats`` (format specs, see
    :func:`parse_format_spec`; None: the formats the graph's layers already have). Results are recorded in ``db``."""
    import platform

    if target.kind == "cuda":  # the hand-written CUDA kernels, measured on the local GPU (backends/cuda_tune.py)
        from .cuda_tune import tune_cuda_graph

        return tune_cuda_graph(graph, target, db, formats, m_values, max_candidates, seed, console,
                               include_unverified=include_unverified)  # fmt: skip
    jobs: list[tuple[str, Any, str]] = []
    seen = set()
    for label, probe in probes(graph, formats, seed):
        kname = tunable_kernel(probe, target)
        if kname is None:
            continue
        from .kernels.registry import linear_key

        k = (kname, _canon(linear_key(probe)))
        if k in seen:
            continue
        seen.add(k)
        jobs.append((label, probe, kname))
    rows = []
    device = f"{platform.machine()} {target.tvm_dict().get('mcpu', '')}".strip()
    from .kernels.registry import vector_lanes

    lanes = {"lanes": vector_lanes(target, "float32")} if target.kind != "cuda" else {}  # the width CPU entries were tuned for
    for i, (label, probe, kname) in enumerate(jobs):
        if console is not None:
            console.print(f"[dim]tune {i + 1}/{len(jobs)}: {kname} {label} {probe.out_features}x{probe.in_features}[/dim]")
        r = tune_linear(probe, target, kname, m_values, max_candidates, seed)
        if r is None:
            continue
        db.record(kname, target.name.partition(":")[0], r.key, r.config, seconds={str(k): v for k, v in r.seconds.items()},
                  default_seconds={str(k): v for k, v in r.default_seconds.items()}, candidates=r.candidates, device=device,
                  **lanes)  # fmt: skip
        rows.append({"kernel": kname, "format": label, "shape": f"{probe.out_features}x{probe.in_features}",
                     "speedup_vs_default": r.speedup, "config": r.config,
                     **{f"us_m{m}": r.seconds[m] * 1e6 for m in r.seconds}})  # fmt: skip
    return rows
