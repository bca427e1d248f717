"""Typed reports: every pass returns a :class:`PassReport`; a compress run collects them into a :class:`Report`.

``report.json`` (schema ``sparsec.report/1``) holds everything deterministic; wall-clock seconds go to
``timings.json`` (see artifact.py) and are merged back for display by :func:`merge_timings`.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

REPORT_SCHEMA = "sparsec.report/1"


@dataclass
class LayerRow:
    """One layer's line in a pass report."""

    name: str
    shape_before: list[int]
    shape_after: list[int]
    format_before: str
    format_after: str
    bytes_before: int
    bytes_after: int
    sparsity: float | None = None  # fraction of zeros in the stored weight (of a low-rank residual's base)
    bits: float | None = None
    group_size: int | None = None
    error: float | None = None  # relative output error ||WX - W'X|| / ||WX|| on held-out calibration inputs
    error_before: float | None = None  # e.g. before low-rank compensation
    status: str = "compressed"  # compressed | skipped | excluded
    note: str = ""
    seconds: float | None = None  # moved to timings.json on write
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class PassReport:
    name: str
    params: dict[str, Any] = field(default_factory=dict)
    rows: list[LayerRow] = field(default_factory=list)
    totals: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)  # pass-specific tables (slicing blocks, MoE groups, ...)
    seconds: float | None = None

    def compute_totals(self, shared_before: set[str] = frozenset(), shared_after: set[str] = frozenset()) -> dict[str, Any]:
        """Counts, bytes and errors over the rows. A layer whose weight the model stores with another's on that side
        (``shared_before`` / ``shared_after``, Graph.stored_with_another: ALBERT's shared blocks, a layer called twice,
        a head tied to its embedding table) adds no bytes there. Stored apart, each use counts, and the totals show
        the growth."""
        done = [r for r in self.rows if r.status == "compressed"]
        bb = sum(r.bytes_before for r in self.rows if r.name not in shared_before)
        ba = sum(r.bytes_after for r in self.rows if r.name not in shared_after)
        errs = [r.error for r in done if r.error is not None and math.isfinite(r.error)]
        self.totals.update(
            {
                "layers": len(self.rows),
                "compressed": len(done),
                "skipped": sum(r.status == "skipped" for r in self.rows),
                "excluded": sum(r.status == "excluded" for r in self.rows),
                "bytes_before": bb,
                "bytes_after": ba,
                "ratio": (bb / ba) if ba else None,
                "mean_error": (sum(errs) / len(errs)) if errs else None,
                "max_error": max(errs) if errs else None,
            }
        )
        return self.totals


@dataclass
class Report:
    model: dict[str, Any]
    recipe: dict[str, Any]
    target: str
    seed: int
    passes: list[PassReport] = field(default_factory=list)
    quality: dict[str, Any] = field(default_factory=dict)
    build: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    sparsec_version: str = ""
    calibration: dict[str, Any] = field(default_factory=dict)  # the data the passes ran on (calibration_used)

    def to_json(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """(report.json document, timings.json document)."""
        timings: dict[str, Any] = {"passes": []}
        passes = []
        for p in self.passes:
            d = asdict(p)
            t = {"name": p.name, "seconds": d.pop("seconds"), "layers": {}}
            for row in d["rows"]:
                s = row.pop("seconds")
                if s is not None:
                    t["layers"][row["name"]] = s
            passes.append(_clean(d))
            timings["passes"].append(t)
        q = dict(self.quality)
        if "seconds" in q:
            timings["quality_seconds"] = q.pop("seconds")
        b = dict(self.build)
        if "seconds" in b:
            timings["build_seconds"] = b.pop("seconds")
        doc = {
            "schema": REPORT_SCHEMA,
            "sparsec_version": self.sparsec_version,
            "model": _clean(self.model),
            "recipe": _clean(self.recipe),
            "target": self.target,
            "seed": self.seed,
            "passes": passes,
            "quality": _clean(q),
            "build": _clean(b),
            "warnings": list(self.warnings),
        }
        if self.calibration:
            doc["calibration"] = _clean(self.calibration)
        return doc, timings


def _clean(x):
    """JSON-safe: round floats to 7 significant digits (stable text), NaN/inf as strings."""
    if isinstance(x, dict):
        return {str(k): _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    if isinstance(x, float):
        if math.isnan(x):
            return "nan"
        if math.isinf(x):
            return "inf" if x > 0 else "-inf"
        return float(f"{x:.7g}")
    if hasattr(x, "item") and callable(x.item):
        try:
            return _clean(x.item())
        except (ValueError, TypeError):
            pass
    return x


def merge_timings(report: dict[str, Any], timings: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``report`` with seconds from ``timings`` put back into passes and rows (for display / --json)."""
    import copy

    r = copy.deepcopy(report)
    by_name = {t.get("name"): t for t in timings.get("passes", [])}
    for i, p in enumerate(r.get("passes", [])):
        t = timings.get("passes", [])[i] if i < len(timings.get("passes", [])) else by_name.get(p.get("name"), {})
        if not t:
            continue
        p["seconds"] = t.get("seconds")
        for row in p.get("rows", []):
            row["seconds"] = t.get("layers", {}).get(row["name"])
    if "quality_seconds" in timings:
        r.setdefault("quality", {})["seconds"] = timings["quality_seconds"]
    if "build_seconds" in timings:
        r.setdefault("build", {})["seconds"] = timings["build_seconds"]
    return r


# ----------------------------------------------------------------------------------------------------------------
# rendering
def _fmt_bytes(n) -> str:
    if n is None:
        return "-"
    n = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1024 or unit == "GB":
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1024
    return f"{n:.1f}GB"


def _fmt(x, spec: str = ".4f") -> str:
    if x is None:
        return "-"
    if isinstance(x, str):
        return x
    try:
        return format(x, spec)
    except (TypeError, ValueError):
        return str(x)


def warning_lines(report: dict[str, Any]) -> list[str]:
    """Every warning of a report document, as the one-line form ``sparsec compress -q`` prints: the passes' (named by
    pass), then the run's."""
    out = [f"warning ({p['name']}): {w}" for p in report.get("passes", []) for w in p.get("warnings", [])]
    return out + [f"warning: {w}" for w in report.get("warnings", [])]


def render(report: dict[str, Any], console=None, max_rows: int | None = None) -> None:
    """Print a report document (report.json, optionally merged with timings) as rich tables."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    m = report.get("model", {})
    console.print(
        f"[bold]{m.get('name', 'model')}[/bold]  target={report.get('target')}  seed={report.get('seed')}  "
        f"params={m.get('params', '-')}  bytes={_fmt_bytes(m.get('bytes'))}"
    )
    for p in report.get("passes", []):
        t = Table(title=f"pass {p['name']} {_params_str(p.get('params', {}))}", title_justify="left")
        for col, j in (("layer", "left"), ("shape", "right"), ("format", "left"), ("sparsity", "right"), ("bits", "right"),
                       ("bytes", "right"), ("error", "right"), ("s", "right"), ("status", "left")):  # fmt: skip
            t.add_column(col, justify=j)
        rows = p.get("rows", [])
        shown = rows if max_rows is None else rows[:max_rows]
        for r in shown:
            shape = "x".join(map(str, r.get("shape_after") or []))
            if r.get("shape_before") != r.get("shape_after"):
                shape = "x".join(map(str, r.get("shape_before") or [])) + "->" + shape
            conv = (r.get("extra") or {}).get("conv")
            if conv:
                shape += f" (conv {'x'.join(map(str, conv['kernel']))})"
            fmt = r.get("format_after", "")
            if r.get("format_before") != fmt:
                fmt = f"{r.get('format_before')}->{fmt}"
            err = _fmt(r.get("error"))
            if r.get("error_before") is not None:
                err = f"{_fmt(r.get('error_before'))}->{err}"
            status = r.get("status", "")
            if r.get("note"):
                status += f" ({r['note']})"
            t.add_row(
                r["name"], shape, fmt, _fmt(r.get("sparsity"), ".2f"), _fmt(r.get("bits"), "g"),
                f"{_fmt_bytes(r.get('bytes_before'))}->{_fmt_bytes(r.get('bytes_after'))}", err,
                _fmt(r.get("seconds"), ".2f"), status,
            )  # fmt: skip
        if max_rows is not None and len(rows) > max_rows:
            t.add_row(f"... {len(rows) - max_rows} more", *[""] * 8)
        tot = p.get("totals", {})
        if tot:
            t.caption = (
                f"{tot.get('compressed', 0)} compressed, {tot.get('skipped', 0)} skipped, {tot.get('excluded', 0)} excluded; "
                f"bytes {_fmt_bytes(tot.get('bytes_before'))} -> {_fmt_bytes(tot.get('bytes_after'))}"
                f" (x{_fmt(tot.get('ratio'), '.2f')}); mean error {_fmt(tot.get('mean_error'))}"
                + (f"; {_fmt(p.get('seconds'), '.1f')}s" if p.get("seconds") is not None else "")
            )
        console.print(t)
        for key, table in (p.get("extra") or {}).items():
            if isinstance(table, list) and table and isinstance(table[0], dict):
                et = Table(title=f"{p['name']}: {key}", title_justify="left")
                cols = list(table[0].keys())
                for c in cols:
                    et.add_column(c)
                for row in table:
                    et.add_row(*[_fmt(row.get(c), ".4g") if isinstance(row.get(c), float) else str(row.get(c, "")) for c in cols])
                console.print(et)
        for w in p.get("warnings", []):
            console.print(f"[yellow]warning[/yellow] ({p['name']}): {w}")
    c = report.get("calibration")
    if c:
        console.print("[bold]calibration[/bold] " + calibration_line(c), highlight=False)
    q = report.get("quality") or {}
    if q:
        render_quality(q, console, m)
    b = report.get("build") or {}
    if b:
        parts = [f"{k}={_fmt(v, '.3g') if isinstance(v, float) else v}" for k, v in b.items() if not isinstance(v, (dict, list))]
        console.print("[bold]build[/bold] " + "  ".join(parts), highlight=False)
        for n in b.get("notes") or []:  # e.g. "int8 activations (sdot)": kernels whose numerics differ from the executor
            console.print(f"[yellow]note[/yellow] (build): {n}", highlight=False)
    for w in report.get("warnings", []):
        console.print(f"[yellow]warning[/yellow]: {w}")


def calibration_line(c: dict[str, Any]) -> str:
    """One line for report.json's ``calibration`` block: the samples the passes fitted and held out, batch, shapes."""
    held = c.get("heldout_samples") or 0
    def dims(v):  # one shape, or the shapes of samples of several lengths
        return " | ".join(dims(s) for s in v) if v and isinstance(v[0], list) else "x".join(map(str, v))

    shapes = ", ".join(f"{k} {dims(v)}" for k, v in (c.get("shapes") or {}).items())
    return (f"{c.get('samples')} samples" + (f" + {held} held out" if held else " (no held-out split)")
            + f" from {c.get('source')}, batch {c.get('batch_size')}" + (f"; per sample: {shapes}" if shapes else ""))


# quality keys that are labels of the reference evaluation, shown once in the caption instead of as rows
_QUALITY_LABELS = ("metric", "split", "eval_source", "value", "windows", "eval_tokens", "output_rel_error_note")
_QUALITY_ORDER = ("perplexity", "nll", "accuracy", "output_rel_error", "output_cosine", "onnx_vs_executor_rel_error")


def quality_rows(q: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """(metric, original, compressed) rows from report.json's ``quality`` block: ``<k>_original`` pairs with ``<k>``;
    a figure measured only against the original (output error, cosine) has no original value."""
    keys = [k for k in q if not k.endswith("_original") and k not in _QUALITY_LABELS and k not in ("seconds", "eval_samples")
            and not isinstance(q[k], (dict, list))]  # fmt: skip
    keys += [k[: -len("_original")] for k in q if k.endswith("_original") and k[: -len("_original")] not in q
             and k[: -len("_original")] not in _QUALITY_LABELS]  # fmt: skip
    keys.sort(key=lambda k: (_QUALITY_ORDER.index(k) if k in _QUALITY_ORDER else len(_QUALITY_ORDER), k))
    return [(k, q.get(f"{k}_original"), q.get(k)) for k in keys]


def render_quality(q: dict[str, Any], console, model: dict[str, Any] | None = None) -> None:
    from rich.table import Table

    t = Table(title="quality", title_justify="left")
    for c, j in (("metric", "left"), ("original", "right"), ("compressed", "right"), ("change", "right")):
        t.add_column(c, justify=j)
    for k, a, b in quality_rows(q):
        change = ""
        if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
            change = f"{b - a:+.4g}" + (f" ({(b / a - 1) * 100:+.1f}%)" if a else "")
        t.add_row(k, _fmt(a, ".5g") if a is not None else "", _fmt(b, ".5g"), change)
    m = model or {}
    if m.get("bytes") and m.get("bytes_after"):
        b0, b1 = m["bytes"], m["bytes_after"]
        t.add_row("model bytes", _fmt_bytes(b0), _fmt_bytes(b1), f"x{b0 / b1:.2f} smaller" if b1 <= b0 else f"x{b1 / b0:.2f} larger")
    cap = []
    if q.get("eval_source") is not None:
        cap.append(f"evaluated on: {q['eval_source']}" + (f", {q['eval_samples']} samples" if q.get("eval_samples") is not None else ""))
    if q.get("metric") is not None:
        cap.append(f"reference metric: {q['metric']}" + (f" on {q['split']}" if q.get("split") else "")
                   + (f", {q['eval_tokens']} tokens" if q.get("eval_tokens") else ""))  # fmt: skip
    if q.get("output_rel_error_note"):
        cap.append(f"output_rel_error: {q['output_rel_error_note']}")
    if q.get("seconds") is not None:
        cap.append(f"{_fmt(q['seconds'], '.1f')}s")
    t.caption = "; ".join(cap) or None
    console.print(t)


def _params_str(params: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in params.items() if v is not None and v != [] and v != {})
