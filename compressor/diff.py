"""`sparsec diff A B`: two artifacts' reports side by side (quality, totals, per-layer format / bytes / error).

Each layer's state in an artifact is the last pass row that touched it (the format it ended in, its bytes, the
latest measured relative output error and the pass that measured it); a layer no pass reported keeps the original
format. A pass's error is measured against the layer's weights before that pass, so two layers' errors are compared
(``error_delta``) only when the same passes compressed them: after 2:4 then int4, the error is int4's alone.
"""
from __future__ import annotations

from typing import Any

DIFF_SCHEMA = "sparsec.diff/1"


def _num(x):
    return x if isinstance(x, (int, float)) and not isinstance(x, bool) else None


def layer_states(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for p in report.get("passes", []):
        for r in p.get("rows", []):
            s = out.setdefault(r["name"], {"format_original": r.get("format_before"), "bytes_original": r.get("bytes_before"),
                                           "shape_original": r.get("shape_before"), "error": None, "error_pass": None,
                                           "passes": []})  # fmt: skip
            s.update(format=r.get("format_after"), bytes=r.get("bytes_after"), shape=r.get("shape_after"),
                     sparsity=r.get("sparsity"), bits=r.get("bits"), status=r.get("status"))  # fmt: skip
            if r.get("error") is not None:
                s["error"], s["error_pass"] = r["error"], p.get("name")
            if r.get("status") == "compressed":
                s["passes"].append(p.get("name"))
    return out


def _pair(a, b) -> dict[str, Any]:
    na, nb = _num(a), _num(b)
    d = {"a": a, "b": b}
    if na is not None and nb is not None:
        d["delta"] = nb - na
        if na:
            d["ratio"] = nb / na
    return d


def diff_reports(ra: dict[str, Any], rb: dict[str, Any], label_a: str = "a", label_b: str = "b") -> dict[str, Any]:
    qa, qb = ra.get("quality") or {}, rb.get("quality") or {}
    quality = {k: _pair(qa.get(k), qb.get(k)) for k in list(dict.fromkeys([*qa, *qb]))
               if not isinstance(qa.get(k, qb.get(k)), (dict, list)) and k != "seconds"}  # fmt: skip
    ma, mb = ra.get("model") or {}, rb.get("model") or {}
    totals = {k: _pair(ma.get(k), mb.get(k)) for k in ("params", "bytes", "params_after", "bytes_after", "linear_layers")}
    ra_ratio = (ma["bytes"] / ma["bytes_after"]) if _num(ma.get("bytes")) and _num(ma.get("bytes_after")) else None
    rb_ratio = (mb["bytes"] / mb["bytes_after"]) if _num(mb.get("bytes")) and _num(mb.get("bytes_after")) else None
    totals["size_reduction"] = _pair(ra_ratio, rb_ratio)
    pa = {p["name"]: p.get("totals", {}) for p in ra.get("passes", [])}
    pb = {p["name"]: p.get("totals", {}) for p in rb.get("passes", [])}
    passes = {}
    for name in dict.fromkeys([*pa, *pb]):
        ta, tb = pa.get(name, {}), pb.get(name, {})
        passes[name] = {k: _pair(ta.get(k), tb.get(k)) for k in ("compressed", "skipped", "bytes_before", "bytes_after", "ratio", "mean_error", "max_error")}
    la, lb = layer_states(ra), layer_states(rb)
    layers = []
    for name in dict.fromkeys([*la, *lb]):
        a, b = la.get(name), lb.get(name)
        keys = ("format", "bytes", "error", "sparsity", "bits", "status", "error_pass", "passes")
        changed = a is None or b is None or any(a.get(k) != b.get(k) for k in keys)
        same_passes = a is not None and b is not None and a.get("passes") == b.get("passes")
        layers.append({"name": name, "a": {k: a.get(k) for k in keys} if a else None, "b": {k: b.get(k) for k in keys} if b else None,
                       "changed": changed,
                       **({"bytes_delta": b["bytes"] - a["bytes"]} if a and b and _num(a.get("bytes")) is not None and _num(b.get("bytes")) is not None else {}),
                       **({"error_delta": b["error"] - a["error"]} if same_passes and _num(a.get("error")) is not None and _num(b.get("error")) is not None else {})})  # fmt: skip
    recipe = {
        "target": _pair(ra.get("target"), rb.get("target")),
        "seed": _pair(ra.get("seed"), rb.get("seed")),
        "passes": {"a": (ra.get("recipe") or {}).get("passes", []), "b": (rb.get("recipe") or {}).get("passes", [])},
    }
    same_source = ma.get("source_sha256") == mb.get("source_sha256")
    return {
        "schema": DIFF_SCHEMA,
        "a": label_a,
        "b": label_b,
        "model": {"a": ma.get("name"), "b": mb.get("name"), "same_source": same_source},
        "recipe": recipe,
        "quality": quality,
        "totals": totals,
        "passes": passes,
        "layers": layers,
        "changed_layers": sum(l["changed"] for l in layers),
    }


def _f(x, spec=".4g") -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return format(x, spec)
    return str(x)


def _delta(d: dict[str, Any], spec=".3g", pct=True) -> str:
    if "delta" not in d:
        return "" if d.get("a") == d.get("b") else "changed"
    if d["delta"] == 0:
        return "="
    s = f"{d['delta']:+{spec}}"
    if pct and d.get("ratio") is not None:
        s += f" ({(d['ratio'] - 1) * 100:+.1f}%)"
    return s


_QUALITY_HIDDEN = {"value", "value_original", "windows", "windows_original", "eval_tokens_original"}


def render_diff(doc: dict[str, Any], console, max_rows: int | None = None, changed_only: bool = False) -> None:
    from rich.table import Table

    from .report import _fmt_bytes

    def recipe_str(passes):
        return "; ".join(p.get("type", "?") + " " + " ".join(f"{k}={v}" for k, v in p.items() if k != "type") for p in passes) or "(no passes)"

    console.print(f"[bold]A[/bold] {doc['a']}: {doc['model']['a']}  target={doc['recipe']['target']['a']}  seed={doc['recipe']['seed']['a']}  "
                  f"{recipe_str(doc['recipe']['passes']['a'])}", highlight=False)  # fmt: skip
    console.print(f"[bold]B[/bold] {doc['b']}: {doc['model']['b']}  target={doc['recipe']['target']['b']}  seed={doc['recipe']['seed']['b']}  "
                  f"{recipe_str(doc['recipe']['passes']['b'])}", highlight=False)  # fmt: skip
    if not doc["model"]["same_source"]:
        console.print("[yellow]note[/yellow]: the two artifacts come from different source models")
    t = Table(title="quality and size", title_justify="left")
    for c, j in (("metric", "left"), ("A", "right"), ("B", "right"), ("B - A", "right")):
        t.add_column(c, justify=j)
    for k, d in doc["quality"].items():
        if k in _QUALITY_HIDDEN or not (_num(d["a"]) is not None or _num(d["b"]) is not None or d["a"] != d["b"]):
            continue  # labels (metric, split, eval_source) only when they differ
        t.add_row(k, _f(d["a"]), _f(d["b"]), _delta(d))
    for k in ("bytes_after", "params_after", "size_reduction"):
        d = doc["totals"][k]
        if k == "bytes_after":
            t.add_row("model bytes", _fmt_bytes(d["a"]), _fmt_bytes(d["b"]), _delta(d, ".0f"))
        elif k == "size_reduction":
            t.add_row("size reduction", f"x{d['a']:.3f}" if d["a"] else "-", f"x{d['b']:.3f}" if d["b"] else "-", _delta(d, ".3f", pct=False))
        else:
            t.add_row("params", _f(d["a"]), _f(d["b"]), _delta(d, ".0f"))
    console.print(t)
    if doc["passes"]:
        pt = Table(title="passes", title_justify="left")
        for c, j in (("pass", "left"), ("layers A", "right"), ("layers B", "right"), ("bytes A", "right"), ("bytes B", "right"),
                     ("mean error A", "right"), ("mean error B", "right")):  # fmt: skip
            pt.add_column(c, justify=j)
        for name, d in doc["passes"].items():
            pt.add_row(name, _f(d["compressed"]["a"]), _f(d["compressed"]["b"]), _fmt_bytes(d["bytes_after"]["a"]),
                       _fmt_bytes(d["bytes_after"]["b"]), _f(d["mean_error"]["a"]), _f(d["mean_error"]["b"]))  # fmt: skip
        console.print(pt)
    rows = [l for l in doc["layers"] if l["changed"] or not changed_only]
    if rows:
        lt = Table(title=f"layers ({doc['changed_layers']} of {len(doc['layers'])} differ)", title_justify="left")
        for c, j in (("layer", "left"), ("format A -> B", "left"), ("bytes A -> B", "right"), ("error A", "right"),
                     ("error B", "right"), ("B - A", "right")):  # fmt: skip
            lt.add_column(c, justify=j, overflow="fold")

        def both(x, y, fmt=str):
            x, y = (fmt(x) if x is not None else "-"), (fmt(y) if y is not None else "-")
            return x if x == y else f"{x} -> {y}"

        def err(l, s):  # with the pass that measured it where the two layers' passes differ (no error_delta)
            e = _f(s.get("error"))
            return e if "error_delta" in l or s.get("error") is None else f"{e} ({s.get('error_pass')})"

        shown = rows if max_rows is None else rows[:max_rows]
        for l in shown:
            a, b = l["a"] or {}, l["b"] or {}
            lt.add_row(l["name"] if l["changed"] else f"[dim]{l['name']}[/dim]", both(a.get("format"), b.get("format")),
                       both(a.get("bytes"), b.get("bytes"), _fmt_bytes), err(l, a), err(l, b),
                       f"{l['error_delta']:+.3g}" if "error_delta" in l else "")  # fmt: skip
        if len(shown) < len(rows):
            lt.add_row(f"... {len(rows) - len(shown)} more", *[""] * 5)
        console.print(lt)
