"""Recipes and the pass pipeline.

A recipe says which passes run, on which layers, with which parameters -- the same thing from CLI flags or YAML::

    target: x86
    seed: 0
    calibration: {data: calib.npz, samples: 128, seq_len: 128, heldout: 0.125, batch_size: 8}
    max_error: 0.05
    passes:
      - type: nm_prune
        nm: "2:4"
        method: sparsegpt
        exclude: ['lm_head']
        overrides:
          - {match: 'layers\\.0\\.', skip: true}
          - {match: 'mlp\\.down_proj', method: wanda}

Passes live one per module in ``passes/`` and register themselves with :func:`register_pass`. The pipeline puts them
in their canonical order (expert merging, slicing, pruning, quantization, low-rank compensation -- merge then
compress, slice before pruning, quantize last among weight rewrites, compensate after the compression it
compensates) and refuses invalid combinations.

A pass is a class with ``requires`` (preconditions: statistics and formats it needs), ``run`` (returns a
:class:`PassReport`) and ``ensures`` (its invariant, checked on every run, in production). Failures become
:class:`PassError`.
"""
from __future__ import annotations

import dataclasses
import importlib
import os
import pkgutil
import re
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

import numpy as np

from .errors import PassError, RecipeError
from .ir import Conv, Graph, Linear, walk_up
from .report import LayerRow, PassReport


# ----------------------------------------------------------------------------------------------------------------
# parameter parsing
def parse_params(cls, params: dict[str, Any], where: str):
    """Build dataclass ``cls`` from ``params`` with type checks; unknown keys and bad values are RecipeErrors."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    params = {k.replace("-", "_"): v for k, v in (params or {}).items()}
    unknown = sorted(set(params) - set(fields))
    if unknown:
        raise RecipeError(f"{where}: unknown key(s) {unknown}; valid keys: {sorted(fields)}")
    kwargs = {}
    for name, value in params.items():
        f = fields[name]
        kwargs[name] = _coerce(value, f.type, f"{where}.{name}")
    try:
        obj = cls(**kwargs)
    except TypeError as e:
        raise RecipeError(f"{where}: {e}")
    check = getattr(obj, "validate", None)
    if check is not None:
        try:
            check()
        except (ValueError, AssertionError) as e:
            raise RecipeError(f"{where}: {e}")
    return obj


def _coerce(value, typ, where: str):
    t = typ if isinstance(typ, str) else getattr(typ, "__name__", str(typ))
    t = t.replace(" ", "")
    if value is None:
        if "None" in t or "Optional" in t:
            return None
        raise RecipeError(f"{where}: must not be empty")
    base = t.replace("|None", "").replace("None|", "")
    try:
        if base == "int":
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if base == "float":
            if isinstance(value, bool):
                raise ValueError
            v = float(value)
            if not np.isfinite(v):
                raise ValueError
            return v
        if base in ("int|float", "float|int"):
            if isinstance(value, bool):
                raise ValueError
            v = float(value)
            return int(v) if isinstance(value, int) or (isinstance(value, str) and v.is_integer() and "." not in value) else v
        if base == "bool":
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "yes", "1", "false", "no", "0"):
                return value.lower() in ("true", "yes", "1")
            raise ValueError
        if base == "str":
            if not isinstance(value, (str, int, float)) or isinstance(value, bool):
                raise ValueError
            return str(value)
        if base.startswith("list"):
            if isinstance(value, str):
                return [value]
            if not isinstance(value, (list, tuple)):
                raise ValueError
            return list(value)
        if base.startswith("dict"):
            if not isinstance(value, dict):
                raise ValueError
            return dict(value)
    except (ValueError, TypeError):
        raise RecipeError(f"{where}: {value!r} is not a valid {base}")
    return value


def compile_patterns(patterns: list[str] | None, where: str) -> list[re.Pattern]:
    out = []
    for p in patterns or []:
        try:
            out.append(re.compile(p))
        except re.error as e:
            raise RecipeError(f"{where}: invalid regular expression {p!r} ({e})")
    return out


# ----------------------------------------------------------------------------------------------------------------
@dataclass
class CalibrationSpec:
    data: str | None = None  # .npz / .npy file or a directory of them; None -> generated inputs (with a warning)
    samples: int = 128
    seq_len: int | None = None
    heldout: float = 0.125  # fraction (0..0.5) or, when >= 1, a number of samples held out for evaluation
    batch_size: int = 8

    def validate(self):
        if self.samples < 1:
            raise ValueError("samples must be >= 1")
        if self.seq_len is not None and self.seq_len < 1:
            raise ValueError("seq_len must be >= 1")
        if self.batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        if self.heldout < 0 or (0.5 < self.heldout < 1):
            raise ValueError("heldout must be a fraction in [0, 0.5] or a number of samples >= 1")
        if self.heldout >= 1 and self.heldout != int(self.heldout):
            raise ValueError(f"heldout {self.heldout:g}: 1 and more is a number of samples (a whole number), a share is at most 0.5")


@dataclass
class PassSpec:
    type: str
    params: dict[str, Any] = field(default_factory=dict)
    where: str = field(default="", compare=False)  # what errors name: "recipe.yaml.passes[1]", "--nm"


@dataclass
class Recipe:
    target: str = "x86"
    seed: int = 0
    calibration: CalibrationSpec = field(default_factory=CalibrationSpec)
    passes: list[PassSpec] = field(default_factory=list)
    max_error: float | None = None
    device: str | None = None
    eval: str | None = None  # reference evaluation: "auto" (golden models), "none"
    build: bool = True  # compile the library for the target (False: portable ONNX only)

    def to_dict(self) -> dict[str, Any]:
        return {
            "target": self.target,
            "seed": self.seed,
            "calibration": dataclasses.asdict(self.calibration),
            "passes": [{"type": p.type, **p.params} for p in self.passes],
            "max_error": self.max_error,
            "device": self.device,
            "eval": self.eval,
            "build": self.build,
        }


RECIPE_KEYS = {"target", "seed", "calibration", "passes", "max_error", "device", "eval", "build"}


def recipe_from_dict(doc: dict[str, Any], where: str = "recipe") -> Recipe:
    if not isinstance(doc, dict):
        raise RecipeError(f"{where}: must be a mapping, got {type(doc).__name__}")
    unknown = sorted(set(doc) - RECIPE_KEYS)
    if unknown:
        raise RecipeError(f"{where}: unknown key(s) {unknown}; valid keys: {sorted(RECIPE_KEYS)}")
    r = Recipe()
    if "target" in doc:
        r.target = _coerce(doc["target"], "str", f"{where}.target")
    if "seed" in doc:
        r.seed = _coerce(doc["seed"], "int", f"{where}.seed")
    if "max_error" in doc:
        r.max_error = _coerce(doc["max_error"], "float|None", f"{where}.max_error")
        if r.max_error is not None and r.max_error < 0:
            raise RecipeError(f"{where}.max_error: must be >= 0")
    if "device" in doc:
        r.device = _coerce(doc["device"], "str|None", f"{where}.device")
    if "eval" in doc:
        r.eval = _coerce(doc["eval"], "str|None", f"{where}.eval")
    if "build" in doc:
        r.build = _coerce(doc["build"], "bool", f"{where}.build")
    if "calibration" in doc:
        c = doc["calibration"]
        if not isinstance(c, dict):
            raise RecipeError(f"{where}.calibration: must be a mapping")
        r.calibration = parse_params(CalibrationSpec, c, f"{where}.calibration")
    passes = doc.get("passes") or []
    if not isinstance(passes, list):
        raise RecipeError(f"{where}.passes: must be a list")
    for i, p in enumerate(passes):
        if not isinstance(p, dict) or "type" not in p:
            raise RecipeError(f"{where}.passes[{i}]: each pass needs a 'type' (one of {sorted(pass_registry())})")
        params = {k: v for k, v in p.items() if k != "type"}
        r.passes.append(PassSpec(str(p["type"]), params, where=f"{where}.passes[{i}]"))
    return r


def load_recipe(path: str) -> Recipe:
    import yaml

    try:
        with open(path) as f:
            doc = yaml.safe_load(f)
    except FileNotFoundError:
        raise RecipeError(f"{path}: no such recipe file")
    except yaml.YAMLError as e:
        raise RecipeError(f"{path}: not valid YAML ({str(e).splitlines()[0]})")
    if doc is None:
        doc = {}
    r = recipe_from_dict(doc, where=path)
    data = r.calibration.data
    if data and not os.path.isabs(data):
        # relative to the recipe file, as a batch job file's paths are to it (a path that exists only from the working
        # directory, as earlier versions read it, still works)
        here = os.path.join(os.path.dirname(os.path.abspath(path)), data)
        if os.path.exists(here) or not os.path.exists(data):
            r.calibration.data = here
    return r


# ----------------------------------------------------------------------------------------------------------------
# passes
_REGISTRY: dict[str, type["Pass"]] = {}
_LOADED = False


def register_pass(cls: type["Pass"]) -> type["Pass"]:
    _REGISTRY[cls.name] = cls
    for alias in getattr(cls, "aliases", ()):
        _REGISTRY[alias] = cls
    return cls


def pass_registry() -> dict[str, type["Pass"]]:
    """All passes: every module in the ``passes`` package registers its own."""
    global _LOADED
    if not _LOADED:
        import sparsec.passes as pkg

        for mod in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda m: m.name):
            if not mod.name.startswith("_") and not mod.name.endswith("_test"):
                importlib.import_module(f"sparsec.passes.{mod.name}")
        _LOADED = True
    return _REGISTRY


@dataclass
class Selection:
    """Which Linear layers a pass touches: ``include``/``exclude`` regexes searched in the layer name.

    By default the output head (a Linear whose output reaches a graph output through no other Linear), MoE
    routers, single-output layers (gates, scores) and the residual shortcuts that slicing adds are left out; an
    ``include`` pattern that names them explicitly brings them in.
    """

    include: list[str] = field(default_factory=list)
    exclude: list[str] = field(default_factory=list)

    def decide(self, graph: Graph, where: str) -> dict[str, tuple[bool, str]]:
        inc = compile_patterns(self.include, f"{where}.include")
        exc = compile_patterns(self.exclude, f"{where}.exclude")
        heads = output_heads(graph)
        # (and the router of an MoE-like block that was not raised: pruning it would change which expert a token takes)
        routers = {n.router.name for n in graph.nodes if n.op == "MoE"} | {l.name for l in graph.linears() if l.meta.get("moe_router")}
        out: dict[str, tuple[bool, str]] = {}
        for lin in graph.linears():
            name = lin.name
            if exc and any(p.search(name) for p in exc):
                out[name] = (False, "excluded by pattern")
            elif inc and not any(p.search(name) for p in inc):
                out[name] = (False, "not included")
            elif name in heads and not (inc and any(p.search(name) for p in inc)):
                out[name] = (False, "output head (include it by name to compress it)")
            elif name in routers and not (inc and any(p.search(name) for p in inc)):
                out[name] = (False, "MoE router (include it by name to compress it)")
            elif lin.meta.get("sparsec.slicing") and not (inc and any(p.search(name) for p in inc)):
                out[name] = (False, "residual shortcut added by slicing (include it by name to compress it)")
            elif lin.out_features == 1 and not (inc and any(p.search(name) for p in inc)):
                # a gate or score (Qwen2-MoE's shared_expert_gate: sigmoid(x W) scales the shared expert): router-like,
                # and one row saves nothing worth its error
                out[name] = (False, "one output: a gate or score (include it by name to compress it)")
            else:
                out[name] = (True, "")
        return out


def output_heads(graph: Graph) -> set[str]:
    """Linear layers whose output reaches a graph output without passing through another Linear or a residual add
    (the output projections of an encoder's last block feed the residual stream: they are not a head)."""
    def through(_v, n):  # the walk stops at a Linear (a head candidate), an MoE block, a residual add, and a product
        # with a weight that sparsec leaves generic (an einsum 'bsh,oh->bso' head): the Linears behind it are hidden
        return not isinstance(n, Linear) and n.op not in ("MoE", "Residual") and not _weight_product(graph, n)

    heads = {n.name for _v, n in walk_up(graph.producers(), graph.outputs, through) if isinstance(n, Linear)}
    # a Linear whose output also feeds another Linear is not a head: a decoder exported with its KV cache returns
    # k_proj / v_proj outputs (through rotary, concat) as ``present.*`` graph outputs, but they feed o_proj too
    return {h for h in heads if not _feeds_linear(graph, graph.linear(h))}


def _weight_product(graph: Graph, n) -> bool:
    """A MatMul / Gemm / Einsum left generic (not raised to a Linear) that multiplies by a constant matrix."""
    return (n.op in ("MatMul", "Gemm", "Einsum") and not isinstance(n, Linear)
            and any(i in graph.constants and graph.constants[i].ndim >= 2 for i in n.inputs))  # fmt: skip


def _feeds_linear(graph: Graph, lin: Linear) -> bool:
    cons = graph.consumers()
    stack, seen = list(lin.outputs), set()
    while stack:
        v = stack.pop()
        if v in seen:
            continue
        seen.add(v)
        for n in cons.get(v, ()):
            if isinstance(n, Linear) or n.op == "MoE":
                return True
            stack.extend(o for o in n.outputs if o)
    return False


@dataclass
class Override:
    """One ``overrides`` entry. Overrides apply in order and merge: each sets only what it names, so a later match
    changes the parameters it gives and keeps an earlier ``skip: true`` (``skip`` is None when the entry omits it)."""

    match: re.Pattern
    skip: bool | None
    params: dict[str, Any]


def skipped_by(overrides: list[Override], name: str) -> bool:
    """Whether the overrides matching ``name`` skip it: the last one of them that says ``skip`` decides."""
    skip = False
    for o in overrides:
        if o.skip is not None and o.match.search(name):
            skip = o.skip
    return skip


def parse_overrides(raw: list[dict] | None, where: str) -> list[Override]:
    out = []
    for i, o in enumerate(raw or []):
        if not isinstance(o, dict) or "match" not in o:
            raise RecipeError(f"{where}.overrides[{i}]: needs a 'match' regular expression")
        (pat,) = compile_patterns([o["match"]], f"{where}.overrides[{i}]")
        skip = _coerce(o["skip"], "bool", f"{where}.overrides[{i}].skip") if "skip" in o else None
        params = {k: v for k, v in o.items() if k not in ("match", "skip")}
        out.append(Override(pat, skip, params))
    return out


class PassContext:
    """What a pass gets besides the graph: calibration data, device, seed, progress, the original model."""

    def __init__(self, recipe: Recipe, *, calib=None, heldout=None, device=None, original: Graph | None = None,
                 progress: Callable[..., Any] | None = None, console=None, golden: str | None = None):  # fmt: skip
        self.recipe = recipe
        self.calib = calib  # calibration.data.CalibrationSet (fit split) or None
        self.heldout = heldout  # held-out split (evaluation only)
        self.device = device
        self.original = original
        self.progress = progress
        self.console = console
        self.golden = golden
        self.warnings: list[str] = []
        self.products: dict[str, Any] = {}  # what one pass leaves for a later one (e.g. routing statistics)

    @property
    def seed(self) -> int:
        return self.recipe.seed

    def rng(self, *tags: Any) -> np.random.Generator:
        """A generator determined by the recipe seed and the given tags (stable across runs)."""
        import hashlib

        h = hashlib.sha256(repr((self.recipe.seed,) + tags).encode()).digest()
        return np.random.default_rng(int.from_bytes(h[:8], "little"))

    def warn(self, msg: str) -> None:
        self.warnings.append(msg)

    show_progress: bool = False

    def track(self, iterable, description: str = "", total: int | None = None):
        """Wrap ``iterable`` in a rich progress bar when showing progress on a console."""
        if not self.show_progress or self.console is None or not self.console.is_terminal:
            return iterable  # no bars in logs / pipes (rich would leave a blank line there)
        from rich.progress import track

        return track(iterable, description=description, total=total, console=self.console, transient=True)


class Pass:
    """Base class of compression passes."""

    name: ClassVar[str] = "?"
    aliases: ClassVar[tuple[str, ...]] = ()
    order: ClassVar[int] = 50  # canonical position in the pipeline
    needs_calibration: ClassVar[bool] = False
    Params: ClassVar[type] = object

    def __init__(self, params: dict[str, Any] | None = None, where: str | None = None):
        self.where = where or f"pass {self.name}"
        raw = dict(params or {})
        self.raw_params = raw
        self.params = parse_params(self.Params, raw, self.where) if self.Params is not object else None

    # subclasses override -------------------------------------------------------------------------------------
    def requires(self, graph: Graph, ctx: PassContext) -> None:
        if self.needs_calibration and ctx.calib is None:
            raise PassError(f"{self.name}: needs calibration data")

    def run(self, graph: Graph, ctx: PassContext) -> PassReport:  # pragma: no cover - abstract
        raise NotImplementedError

    def ensures(self, graph: Graph, ctx: PassContext, report: PassReport) -> None:
        pass

    def conflicts(self, others: list["Pass"]) -> str | None:
        """A reason this pass cannot run together with ``others``, or None."""
        return None

    # driver --------------------------------------------------------------------------------------------------
    def __call__(self, graph: Graph, ctx: PassContext) -> PassReport:
        import time

        try:
            self.requires(graph, ctx)
        except PassError as e:
            raise PassError(f"{self.name}: precondition failed: {e.message}") from e
        shared_before = graph.stored_with_another()
        t0 = time.perf_counter()
        report = self.run(graph, ctx)
        report.seconds = time.perf_counter() - t0
        try:
            self.ensures(graph, ctx, report)
        except PassError as e:
            raise PassError(f"{self.name}: postcondition failed: {e.message}") from e
        graph.validate()
        report.compute_totals(shared_before, graph.stored_with_another())
        return report

    def params_dict(self) -> dict[str, Any]:
        if self.params is None:
            return {}
        return {k: v for k, v in dataclasses.asdict(self.params).items()}


def make_row(lin: Linear, before_fmt, before_shape, *, status="compressed", note="", error=None, error_before=None,
             seconds=None, extra=None) -> LayerRow:  # fmt: skip
    """A report row for a Linear from its weight before (format object + shape) and after (current)."""
    after = lin.weight
    bits = None
    gs = None
    gq = after.find("group_quant")
    if gq is not None:
        bits, gs = gq.bits, gq.group_size
    sp = after.sparsity() if status == "compressed" else None
    if isinstance(lin, Conv):  # the weight is the conv's (out, kernel positions x channels) matrix
        extra = {**(extra or {}), "conv": {"kernel": list(lin.kernel_shape), "in_channels": lin.in_channels}}
    return LayerRow(
        name=lin.name,
        shape_before=[int(s) for s in before_shape],
        shape_after=[int(s) for s in after.shape],
        format_before=before_fmt.describe() if hasattr(before_fmt, "describe") else str(before_fmt),
        format_after=after.describe(),
        bytes_before=int(before_fmt.nbytes if hasattr(before_fmt, "nbytes") else 0),
        bytes_after=int(after.nbytes),
        sparsity=sp,
        bits=bits,
        group_size=gs,
        error=error,
        error_before=error_before,
        status=status,
        note=note,
        seconds=seconds,
        extra=extra or {},
    )


def build_passes(recipe: Recipe) -> list[Pass]:
    reg = pass_registry()
    passes: list[Pass] = []
    seen: dict[str, int] = {}
    for i, spec in enumerate(recipe.passes):
        where = spec.where or f"recipe.passes[{i}]"
        cls = reg.get(spec.type)
        if cls is None:
            raise RecipeError(f"{where}: unknown pass type {spec.type!r}; known: {sorted(set(c.name for c in reg.values()))}")
        if cls.name in seen:
            raise RecipeError(f"{where}: pass {cls.name!r} appears twice (use overrides for per-layer settings)")
        seen[cls.name] = i
        passes.append(cls(spec.params, where=f"{where} ({cls.name})"))
    passes.sort(key=lambda p: p.order)
    for p in passes:
        reason = p.conflicts([q for q in passes if q is not p])
        if reason:
            raise RecipeError(f"invalid combination: {reason}")
    return passes


def run_passes(graph: Graph, passes: list[Pass], ctx: PassContext) -> list[PassReport]:
    reports = []
    for p in passes:
        rep = p(graph, ctx)
        if not rep.params:
            rep.params = p.params_dict()
        rep.warnings.extend(unmatched_overrides(p, rep))
        reports.append(rep)
    return reports


def unmatched_overrides(p: "Pass", rep: PassReport) -> list[str]:
    """Overrides of a layer pass whose ``match`` names none of the layers it saw (a typo: 'mlpp'), and include /
    exclude patterns that match none: each changed nothing without a word."""
    overrides = getattr(p, "overrides", None) or []
    if p.name not in ("nm_prune", "group_quant", "lowrank") or not rep.rows:
        return []
    names = [r.name for r in rep.rows]
    out = [f"{p.where}.overrides[{i}]: match {o.match.pattern!r} names no layer (`sparsec inspect MODEL` lists them)"
           for i, o in enumerate(overrides) if not any(o.match.search(n) for n in names)]  # fmt: skip
    for key in ("include", "exclude"):  # an --exclude with a typo compressed the layer the user meant to keep
        for pat in getattr(p.params, key, None) or []:
            try:
                rx = re.compile(pat)
            except re.error:
                continue  # reported by the selection itself
            if not any(rx.search(n) for n in names):
                out.append(f"{key} pattern {pat!r} matches no layer (`sparsec inspect MODEL` lists them)")
    return out
