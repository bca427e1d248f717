"""Sweep: tests/models_more.py families x exporters x pipelines through the CLI a user types.

    PYTHONPATH=. python -m tests.real_exports_sweep --families llama_gqa,opt --exporters torchscript,dynamo,pt2 \
        --pipelines mag,wanda --work /tmp/rx --json /tmp/rx/sweep.json

Per cell: export (cached), ``sparsec compress`` (exit code, last stderr line), then ``sparsec run out --inputs x.npz``
against onnxruntime on out/model.onnx (must match) and against the torch module (relative error, must be moderate),
and the report's compressed-layer count against the family's Linear count.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

PIPELINES = {
    "mag": ["--nm", "2:4", "--method", "magnitude"],
    "wanda": ["--nm", "2:4", "--method", "wanda"],
    "sparsegpt": ["--nm", "2:4", "--method", "sparsegpt"],
    "gptq4": ["--quant", "int4", "--quant-method", "gptq", "--group-size", "32"],
    "eora": ["--nm", "2:4", "--quant", "int4", "--group-size", "32", "--compensate", "eora", "--rank", "8"],
    "slice": ["--slice", "0.2"],
    "merge": ["--merge-experts", "0.5"],
    "int8": ["--quant", "int8"],
    "nm28": ["--nm", "2:8", "--method", "magnitude"],
    "nm24int8": ["--nm", "2:4", "--method", "magnitude", "--quant", "int8"],
}


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def prepare(family, exporter, work):
    from tests import models_more as mm

    d = os.path.join(work, "m", family, exporter)
    os.makedirs(d, exist_ok=True)
    path = os.path.join(d, "model." + ("pt2" if exporter == "pt2" else "onnx"))
    if not os.path.exists(path):
        m = mm.build(family)
        mm.export(m, path, exporter)
        fd = mm.feeds(m)
        refs = mm.reference(m, fd)
        calib = mm.feeds(m, b=32, seed=5)
        if exporter == "pt2":  # a .pt2 program's inputs are named after forward's parameters
            import inspect

            sig = list(inspect.signature(m.forward).parameters)
            fd = {sig[i]: v for i, v in enumerate(fd.values())}
            calib = {sig[i]: v for i, v in enumerate(calib.values())}
        np.savez(os.path.join(d, "x.npz"), **fd)
        np.savez(os.path.join(d, "calib.npz"), **calib)
        np.savez(os.path.join(d, "ref.npz"), **{n: r for n, r in zip(m.output_names, refs)})
    return d, path


def cli(args, timeout=900):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the checkout (python -m sparsec from it)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]))
    t0 = time.time()
    p = subprocess.run([sys.executable, "-m", "sparsec", *args], capture_output=True, text=True, timeout=timeout, env=env)
    return p.returncode, p.stdout, p.stderr, time.time() - t0


def cell(family, exporter, pipe, work, target="x86", build=False):
    from tests import models_more as mm
    import onnxruntime as ort

    res = {"family": family, "exporter": exporter, "pipeline": pipe, "target": target, "build": build}
    try:
        d, path = prepare(family, exporter, work)
    except Exception as e:
        res.update(status="export-failed", error=f"{type(e).__name__}: {str(e).splitlines()[0][:160]}")
        return res
    out = os.path.join(d, f"out-{pipe}-{target}{'-b' if build else ''}")
    args = ["compress", path, "--target", target, *PIPELINES[pipe], "--calib", os.path.join(d, "calib.npz"),
            "-o", out, "--force", "-q"]
    if not build:
        args.append("--no-build")
    rc, so, se, secs = cli(args)
    res.update(rc=rc, seconds=round(secs, 1))
    if rc != 0:
        lines = [l for l in se.strip().splitlines() if l.strip()]
        res.update(status="traceback" if "Traceback" in se else "error", error=(lines[-1] if lines else "")[:300])
        return res
    rep = json.load(open(os.path.join(out, "report.json")))
    rows = [r for p in rep["passes"] for r in p.get("rows", [])]
    res["compressed"] = len({r["name"] for r in rows if r.get("status") == "compressed"})
    res["linear_layers"] = rep["model"].get("linear_layers")
    res["expected_linears"] = mm.LINEARS[family]
    res["quality_rel"] = rep.get("quality", {}).get("output_rel_error")
    # sparsec run vs onnxruntime on the artifact's model.onnx vs the torch module
    rc2, so2, se2, _ = cli(["run", out, "--inputs", os.path.join(d, "x.npz"), "-o", os.path.join(out, "y.npz")])
    if rc2 != 0:
        res.update(status="run-failed", error=(se2.strip().splitlines() or [""])[-1][:300])
        return res
    y = dict(np.load(os.path.join(out, "y.npz")))
    x = dict(np.load(os.path.join(d, "x.npz")))
    ref = dict(np.load(os.path.join(d, "ref.npz")))
    try:
        s = ort.InferenceSession(os.path.join(out, "model.onnx"), providers=["CPUExecutionProvider"])
        names = [o.name for o in s.get_outputs()]
        o = dict(zip(names, s.run(None, {i.name: x[i.name] for i in s.get_inputs()})))
        res["run_vs_ort"] = max(rel(y[k], o[k]) for k in o)
    except Exception as e:
        res.update(status="ort-failed", error=f"{type(e).__name__}: {str(e).splitlines()[0][:200]}")
        return res
    res["outputs"] = list(y)
    if len(y) != len(ref) or (exporter != "pt2" and list(y) != list(ref)):
        res.update(status="wrong-outputs", error=f"outputs {list(y)} != {list(ref)}")
        return res
    res["vs_torch"] = max(rel(a, b) for a, b in zip(y.values(), ref.values()))
    bad = []
    if res["run_vs_ort"] > 1e-3:
        bad.append("run!=ort")
    if not np.isfinite(res["vs_torch"]) or res["vs_torch"] > 1.0:
        bad.append("explosive")
    if res["compressed"] == 0:
        bad.append("0-compressed")
    res["status"] = "ok" if not bad else ",".join(bad)
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--families", default="")
    ap.add_argument("--exporters", default="torchscript,dynamo,pt2")
    ap.add_argument("--pipelines", default="mag")
    ap.add_argument("--target", default="x86")
    ap.add_argument("--build", action="store_true")
    ap.add_argument("--work", default="/tmp/rx")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    from tests import models_more as mm

    fams = a.families.split(",") if a.families else list(mm.FAMILIES)
    results = []
    for f in fams:
        for e in a.exporters.split(","):
            for p in a.pipelines.split(","):
                if p == "merge" and f not in mm.MOE_FAMILIES:
                    continue
                r = cell(f, e, p, a.work, a.target, a.build)
                results.append(r)
                print(json.dumps(r), flush=True)
                if a.json:
                    json.dump(results, open(a.json, "w"), indent=1)


if __name__ == "__main__":
    main()
