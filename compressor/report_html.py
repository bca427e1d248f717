"""A self-contained HTML page for an artifact's report: per-pass per-layer bars (sparsity, bytes, output error),
timings, quality, warnings, and bench results when present. Inline SVG, no external assets; every name escaped."""
from __future__ import annotations

import html
import json
import os
from typing import Any

from .errors import OutputError

_CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:2em;color:#222;max-width:1200px}
h1{font-size:1.5em}h2{font-size:1.2em;margin-top:2em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:.5em 0}td,th{padding:2px 8px;border-bottom:1px solid #eee;text-align:right}
td:first-child,th:first-child{text-align:left}.warn{color:#a60}.muted{color:#777}
svg text{font:11px system-ui,sans-serif}
"""


def _e(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, int) and abs(v) >= 10000:
        return f"{v:,}"
    return _e(v)


def _bars(title: str, rows: list[tuple[str, float | None]], unit: str = "", vmax: float | None = None, color: str = "#4a7") -> str:
    vals = [v for _, v in rows if v is not None]
    if not vals:
        return ""
    top = vmax if vmax is not None else (max(vals) or 1.0)
    h, lw, bw = 16, 260, 360
    out = [f'<h3>{_e(title)}</h3><svg width="{lw + bw + 90}" height="{h * len(rows) + 6}" role="img">']
    for i, (name, v) in enumerate(rows):
        y = i * h + 2
        out.append(f'<text x="{lw - 4}" y="{y + 11}" text-anchor="end">{_e(name[-42:])}</text>')
        if v is None:
            out.append(f'<text x="{lw + 4}" y="{y + 11}" class="muted">n/a</text>')
            continue
        w = 0 if top <= 0 else max(0.0, min(1.0, v / top)) * bw
        out.append(f'<rect x="{lw}" y="{y}" width="{w:.1f}" height="{h - 4}" fill="{color}"><title>{_e(name)}: {v:.4g}{_e(unit)}</title></rect>')
        out.append(f'<text x="{lw + w + 4:.1f}" y="{y + 11}">{v:.4g}{_e(unit)}</text>')
    out.append("</svg>")
    return "".join(out)


def _kv_table(d: dict[str, Any]) -> str:
    rows = "".join(f"<tr><td>{_e(k)}</td><td>{_fmt(v)}</td></tr>" for k, v in d.items() if not isinstance(v, (dict, list)))
    return f"<table>{rows}</table>"


def _quality(q: dict[str, Any]) -> str:
    if not q:
        return "<p class=muted>no quality measurements</p>"
    pairs, single = [], {}
    for k, v in q.items():
        if k.endswith("_original"):
            continue
        if f"{k}_original" in q:
            pairs.append((k, q[f"{k}_original"], v))
        else:
            single[k] = v
    out = ""
    if pairs:
        out += "<table><tr><th>metric</th><th>original</th><th>compressed</th></tr>"
        out += "".join(f"<tr><td>{_e(k)}</td><td>{_fmt(a)}</td><td>{_fmt(b)}</td></tr>" for k, a, b in pairs)
        out += "</table>"
    return out + _kv_table(single)


def render_html(doc: dict[str, Any], bench: dict[str, Any] | None = None) -> str:
    model = doc.get("model", {})
    title = f"sparsec report: {model.get('name', '?')} ({doc.get('target', '?')})"
    parts = [f"<!doctype html><html><head><meta charset=utf-8><title>{_e(title)}</title><style>{_CSS}</style></head><body>",
             f"<h1>{_e(title)}</h1>"]  # fmt: skip
    parts.append("<h2>Model</h2>" + _kv_table(model))
    parts.append("<h2>Quality</h2>" + _quality(doc.get("quality", {})))
    for p in doc.get("passes", []):
        name = p.get("name", "?")
        parts.append(f"<h2>Pass: {_e(name)}</h2>")
        params = p.get("params") or {}
        if params:
            parts.append("<p>" + ", ".join(f"{_e(k)}={_e(json.dumps(v))}" for k, v in params.items()) + "</p>")
        totals = p.get("totals") or {}
        if totals:
            parts.append(_kv_table(totals))
        if p.get("seconds") is not None:
            parts.append(f"<p class=muted>{p['seconds']:.2f} s</p>")
        rows = p.get("rows") or p.get("layers") or []
        if rows:
            parts.append(_bars("sparsity", [(r.get("name", "?"), r.get("sparsity")) for r in rows], vmax=1.0))
            parts.append(_bars("bytes after / before", [(r.get("name", "?"), (r.get("bytes_after") or 0) / r["bytes_before"] if r.get("bytes_before") else None) for r in rows], vmax=1.0, color="#47a"))
            parts.append(_bars("relative output error (held-out)", [(r.get("name", "?"), r.get("error")) for r in rows], color="#c54"))
            parts.append("<table><tr><th>layer</th><th>format</th><th>status</th><th>note</th></tr>"
                         + "".join(f"<tr><td>{_e(r.get('name'))}</td><td>{_e(r.get('format_before'))} → {_e(r.get('format_after'))}</td>"
                                   f"<td>{_e(r.get('status', ''))}</td><td>{_e(r.get('note', ''))}</td></tr>" for r in rows)
                         + "</table>")  # fmt: skip
        for w in p.get("warnings") or []:
            parts.append(f"<p class=warn>warning: {_e(w)}</p>")
    timings = doc.get("timings") or {}
    if isinstance(timings, dict) and timings:
        flat = [(k, float(v)) for k, v in timings.items() if isinstance(v, (int, float))]
        if flat:
            parts.append("<h2>Timings</h2>" + _bars("seconds per stage", flat, unit=" s", color="#888"))
    if doc.get("build"):
        parts.append("<h2>Build</h2>" + _kv_table(doc["build"]))
    if bench:
        parts.append("<h2>Benchmark</h2><pre>" + _e(json.dumps(bench, indent=1)) + "</pre>")
    for w in doc.get("warnings") or []:
        parts.append(f"<p class=warn>warning: {_e(w)}</p>")
    parts.append("</body></html>")
    return "\n".join(parts)


def write_html(doc: dict[str, Any], path, artifact=None) -> None:
    bench = None
    root = getattr(artifact, "path", None) or getattr(artifact, "root", None)
    if root is not None:
        bp = os.path.join(str(root), "bench.json")
        if os.path.isfile(bp):
            with open(bp) as f:
                bench = json.load(f)
    text = render_html(doc, bench)
    tmp = f"{path}.tmp"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except OSError as e:
        raise OutputError(f"{path}: cannot write ({e.strerror or e})")
