"""HTML report: self-contained, escaped, one bar per layer and metric."""

import re

import numpy as np

from sparsec.compressor.report_html import render_html


def test_html_bars_scale_and_escape():
    rng = np.random.default_rng()
    rows = [{"name": f"layers.{i}.<q>", "sparsity": float(s), "bytes_before": 1000, "bytes_after": int(1000 * (1 - s)),
             "error": float(e), "format_before": "dense", "format_after": "2:4"}  # fmt: skip
            for i, (s, e) in enumerate(zip(rng.random(4), rng.random(4)))]
    doc = {"model": {"name": "m&m"}, "target": "x86", "quality": {"perplexity": 3.5, "perplexity_original": 3.3},
           "passes": [{"name": "nm_prune", "params": {"nm": "2:4"}, "rows": rows, "warnings": ["<script>"]}]}  # fmt: skip
    h = render_html(doc)
    assert "<script>" not in h and "&lt;script&gt;" in h and "m&amp;m" in h
    assert "http" not in h.split("<body>")[1], "no external assets"
    widths = [float(w) for w in re.findall(r'<rect x="\d+" y="\d+" width="([\d.]+)"', h)]
    assert len(widths) == 3 * len(rows)
    # sparsity bars are proportional to the values (full scale = 1.0)
    sp = widths[: len(rows)]
    for r, w in zip(rows, sp):
        assert abs(w / 360 - r["sparsity"]) < 1e-3
    assert "3.3" in h and "3.5" in h
