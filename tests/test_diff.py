"""`sparsec diff` (two artifacts side by side) and the report's quality table."""
from __future__ import annotations

import json

import numpy as np
import pytest

from .robustness._common import mlp_onnx, one_line_error, run_many, sparsec


@pytest.fixture(scope="module")
def two_artifacts(tmp_path_factory):
    d = tmp_path_factory.mktemp("diff")
    mlp_onnx(d / "m.onnx", din=32, hid=64, dout=16, seed=4)
    np.savez(d / "c.npz", x=np.random.default_rng(2).standard_normal((64, 32)).astype(np.float32))
    common = ("compress", "m.onnx", "--calib", "c.npz", "--include", "fc.*", "--no-build", "--quiet")
    res = run_many({"a": ((*common, "--nm", "2:4", "--method", "magnitude", "-o", "a"), d),
                    "b": ((*common, "--nm", "2:4", "--method", "sparsegpt", "--exclude", "fc2", "-o", "b"), d)})  # fmt: skip
    for p in res.values():
        assert p.returncode == 0, p.stderr[-2000:]
    return d


def test_diff_json_against_the_reports(two_artifacts):
    d = two_artifacts
    p = sparsec("diff", "a", "b", "--json", cwd=d)
    assert p.returncode == 0, p.stderr
    doc = json.loads(p.stdout)
    ra, rb = (json.loads((d / x / "report.json").read_text()) for x in ("a", "b"))
    rows_a = {r["name"]: r for r in ra["passes"][0]["rows"]}
    rows_b = {r["name"]: r for r in rb["passes"][0]["rows"]}
    layers = {l["name"]: l for l in doc["layers"]}
    assert set(layers) == {"fc1", "fc2"}
    for name, l in layers.items():
        assert l["a"]["format"] == rows_a[name]["format_after"] and l["b"]["format"] == rows_b[name]["format_after"]
        assert l["bytes_delta"] == rows_b[name]["bytes_after"] - rows_a[name]["bytes_after"]
    # fc2: pruned in A, excluded (dense) in B -> B is bigger there and has no error
    assert layers["fc2"]["changed"] and layers["fc2"]["b"]["status"] == "excluded" and layers["fc2"]["bytes_delta"] > 0
    # fc1: pruned in both, by different methods: both errors measured, the delta is theirs
    assert layers["fc1"]["error_delta"] == pytest.approx(rows_b["fc1"]["error"] - rows_a["fc1"]["error"])
    assert 0 < rows_a["fc1"]["error"] < 1 and 0 < rows_b["fc1"]["error"] < 1 and layers["fc1"]["error_delta"] != 0
    q = doc["quality"]["output_rel_error"]
    assert q["a"] == ra["quality"]["output_rel_error"] and q["delta"] == pytest.approx(q["b"] - q["a"])
    t = doc["totals"]["bytes_after"]
    assert t["delta"] == rb["model"]["bytes_after"] - ra["model"]["bytes_after"] > 0
    assert doc["model"]["same_source"] and doc["recipe"]["passes"]["a"][0]["method"] == "magnitude"


def test_diff_table_and_self_diff(two_artifacts):
    d = two_artifacts
    res = run_many({"ab": (("diff", "a", "b"), d), "aa": (("diff", "a", "a", "--json"), d), "bad": (("diff", "a", "nope"), d)})
    p = res["ab"]
    assert p.returncode == 0, p.stderr
    for needle in ("quality and size", "output_rel_error", "fc1", "fc2", "2 of 2 differ", "magnitude", "sparsegpt"):
        assert needle in p.stdout, needle
    same = json.loads(res["aa"].stdout)
    assert same["changed_layers"] == 0
    assert all(v.get("delta", 0) == 0 for v in same["quality"].values())
    one_line_error(res["bad"], 13, "nope")


def test_report_quality_table_pairs_original_and_compressed():
    from rich.console import Console

    from sparsec.compressor.report import quality_rows, render_quality

    q = {"output_rel_error": 0.12, "output_cosine": 0.99, "eval_samples": 4, "eval_source": "held out", "metric": "perplexity",
         "value": 3.5, "value_original": 3.3, "perplexity": 3.5, "perplexity_original": 3.3, "nll": 1.25, "nll_original": 1.19,
         "split": "heldout", "seconds": 2.0}  # fmt: skip
    rows = quality_rows(q)
    assert [r[0] for r in rows] == ["perplexity", "nll", "output_rel_error", "output_cosine"]
    assert rows[0] == ("perplexity", 3.3, 3.5) and rows[2] == ("output_rel_error", None, 0.12)
    con = Console(record=True, width=120)
    render_quality(q, con, {"bytes": 2000, "bytes_after": 1000})
    text = con.export_text()
    assert "+6.1%" in text and "x2.00 smaller" in text and "value" not in text.split("held-out")[0]


def test_diff_compares_layer_errors_of_the_same_passes_only(two_artifacts):
    """A (2:4) against C (2:4 then int4): C's layer error is the int4 pass's, measured against the pruned weights, so
    it is no total; the diff gives no error delta for such a layer and names the pass each error comes from."""
    d = two_artifacts
    p = sparsec("compress", "m.onnx", "--calib", "c.npz", "--include", "fc.*", "--no-build", "--quiet", "--nm", "2:4",
                "--method", "magnitude", "--quant", "int4", "--group-size", "16", "-o", "c", cwd=d)  # fmt: skip
    assert p.returncode == 0, p.stderr[-2000:]
    doc = json.loads(sparsec("diff", "a", "c", "--json", cwd=d).stdout)
    fc1 = {l["name"]: l for l in doc["layers"]}["fc1"]
    assert fc1["a"]["passes"] == ["nm_prune"] and fc1["b"]["passes"] == ["nm_prune", "group_quant"]
    assert fc1["b"]["error_pass"] == "group_quant" and "error_delta" not in fc1
    import io

    from rich.console import Console

    from sparsec.compressor.diff import render_diff

    buf = io.StringIO()
    render_diff(doc, Console(file=buf, width=250))  # wide: the table folds long cells at a narrow terminal
    assert "(group_quant)" in buf.getvalue() and "(nm_prune)" in buf.getvalue()
