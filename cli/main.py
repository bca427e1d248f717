"""The ``sparsec`` command line.

Exit codes (also in the README): 0 success; 1 a quality threshold was exceeded; 2 usage error; 3 cannot load
model; 4 unsupported op; 5 invalid graph / shape mismatch; 6 bad recipe; 7 cannot write output; 8 bad input or
calibration data; 9 NaN/inf; 10 a pass's invariant failed; 11 build failed; 12 missing tool; 13 bad artifact;
70 internal error (a bug: rerun with --debug and report it); 130 interrupted; 143 terminated (SIGTERM).
"""
from __future__ import annotations

import json
import os
import sys
import traceback
from pathlib import Path
from typing import List, Optional

def _exception_types():
    """(Exit, Abort, ClickException) classes of the click typer runs on: its vendored copy (typer >= 0.26) and/or
    the click package."""
    exits, aborts, clicks = [typer.Exit], [typer.Abort], []
    mods = []
    try:
        from typer._click import exceptions as vendored

        mods.append(vendored)
    except ImportError:  # pragma: no cover - older typer
        pass
    try:
        import click.exceptions as real

        mods.append(real)
    except ImportError:
        pass
    for m in mods:
        exits += [getattr(m, "Exit")] if hasattr(m, "Exit") else []
        aborts += [getattr(m, "Abort")] if hasattr(m, "Abort") else []
        clicks += [getattr(m, "ClickException")] if hasattr(m, "ClickException") else []
    return tuple(set(exits)), tuple(set(aborts)), tuple(set(clicks))
import typer
from rich.console import Console

from sparsec import __version__
from sparsec.compressor import errors as E
from sparsec.compressor import interrupt

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    rich_markup_mode="rich",
    context_settings={"help_option_names": ["-h", "--help"]},
    help="sparsec: ahead-of-time model compression compiler (N:M pruning, slicing, low-rank compensation, "
    "group quantization, expert merging; compiled with TVM).",
)
_state = {"debug": False}


def _console(stderr: bool = False) -> Console:
    """rich assumes 80 columns where the output is not a terminal (CI logs, a pipe, a file) and truncates every table
    cell to fit: layer names, shapes and statuses became "layer…", "128x1…", "compr…". There (COLUMNS unset) the
    width is 200: a table takes only the width it needs, and logs do not wrap."""
    c = Console(stderr=stderr)
    if not c.is_terminal and not os.environ.get("COLUMNS"):
        c = Console(stderr=stderr, width=200)
    return c


out = _console()
err = _console(stderr=True)


def _version_cb(value: bool):
    if value:
        out.print(f"sparsec {__version__}")
        raise typer.Exit(0)


@app.callback()
def _root(
    debug: bool = typer.Option(False, "--debug", help="Show Python tracebacks for errors."),
    version: bool = typer.Option(False, "--version", callback=_version_cb, is_eager=True, help="Print the version."),
):
    _state["debug"] = debug


# ----------------------------------------------------------------------------------------------------------------
def _load(model: Optional[str], example: Optional[str]):
    from sparsec.compressor.compress import load_model

    if example and model:
        raise E.RecipeError("give a model file or --example, not both")
    if not example and not model:
        raise E.RecipeError("no model given: pass a model file (.onnx, .pt2) or --example tiny-gpt")
    return load_model(model, example=example)


@app.command(epilog="Examples:\n\n  sparsec inspect model.onnx\n\n  sparsec inspect --example tiny-moe --json")
def inspect(
    model: Optional[str] = typer.Argument(None, help="Model file: .onnx (external .data next to it) or .pt2; or an artifact directory."),
    example: Optional[str] = typer.Option(None, "--example", help="An embedded reference model: tiny-gpt, tiny-moe, digits."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
    ir: bool = typer.Option(False, "--ir", help="Print the whole IR, node by node."),
):
    """Summarize a model as sparsec sees it: ops, Linear layers with shapes, parameters, bytes. An artifact directory
    shows its compressed graph (formats, bytes after compression)."""
    from sparsec.compressor.ir import MoE

    if model and os.path.isdir(model) and os.path.isfile(os.path.join(model, "manifest.json")) and not example:
        from sparsec.compressor.artifact import load_artifact
        from sparsec.compressor.compress import Source

        a = load_artifact(model)
        src = Source(a.graph, f"artifact {model}", str(a.manifest.get("source", {}).get("sha256", "")))
    else:
        src = _load(model, example)
    g = src.graph
    lins = g.linears()
    bf16 = g.stored_as_bfloat16()  # a bfloat16 file: its float tensors take 2 bytes (sparsec computes in float32)
    moes = [n for n in g.nodes if isinstance(n, MoE)]
    blocks = [b for b in g.assign_blocks() if b.kind == "block"]
    tied = g.tied_linears()  # still tied: a head a pass compressed or changed is stored apart (`untied`)
    later = g._later_uses()  # a weight applied twice: its later uses (the total counts it once)
    summary = {
        "name": g.name,
        "source": src.label,
        "sha256": src.sha256,
        "opset": g.opset,
        "inputs": [{"name": i, "dtype": g.values[i].dtype, "shape": list(g.values[i].shape or [])} for i in g.inputs],
        "outputs": [{"name": o, "dtype": g.values[o].dtype if o in g.values else "?", "shape": list((g.values[o].shape if o in g.values else None) or [])} for o in g.outputs],
        "ops": g.op_counts(),
        "params": g.param_count(),
        "bytes": g.source_nbytes(),
        "blocks": [b.name for b in blocks],
        "linear": [
            {"name": l.name, "shape": [l.out_features, l.in_features], "in": l.in_features, "out": l.out_features, "bias": l.bias is not None, "format": l.weight.describe(),
             "params": l.param_count(), "bytes": 2 * l.param_count() if bf16 else l.nbytes(), **({"tied_to": l.meta["tied_to"]} if l.name in tied else {}),
             **({"weight_of": later[l.name][1].name} if l.name in later else {}),
             **({"conv": {"kernel": list(l.kernel_shape), "in_channels": l.in_channels, "strides": list(l.strides), "pads": list(l.pads),
                          "dilations": list(l.dilations)}} if hasattr(l, "kernel_shape") else {})}
            for l in lins
        ],  # fmt: skip
        "moe": [{"name": m.name, "experts": len(m.experts), "top_k": m.top_k, "score": m.score, "renormalize": m.renormalize} for m in moes],
        "warnings": g.meta.get("import_warnings", []),
    }
    if "import_check_rel_error" in g.meta:
        summary["import_check_rel_error"] = g.meta["import_check_rel_error"]
    if as_json:
        print(json.dumps(summary, indent=1, default=str))
        return
    if ir:
        out.print(str(g), markup=False, highlight=False)
        return
    from rich.table import Table

    out.print(f"[bold]{g.name}[/bold]  ({src.label})  opset {g.opset.get('', '?')}  sha256 {src.sha256[:12]}")
    for i in summary["inputs"]:
        out.print(f"  input  {i['name']}: {i['dtype']}{i['shape']}")
    for o in summary["outputs"]:
        out.print(f"  output {o['name']}: {o['dtype']}{o['shape']}")
    out.print("  ops: " + ", ".join(f"{k}×{v}" for k, v in summary["ops"].items()))
    out.print(f"  blocks: {len(blocks)}" + (f" ({blocks[0].name} … {blocks[-1].name})" if blocks else ""))
    t = Table(title=f"{len(lins)} Linear layers", title_justify="left")
    for c, j in (("name", "left"), ("in", "right"), ("out", "right"), ("bias", "center"), ("format", "left"), ("params", "right"), ("bytes", "right")):
        t.add_column(c, justify=j)
    for l in summary["linear"]:
        name = l["name"] + (f" (tied to {l['tied_to']})" if "tied_to" in l else "") + (
            f" (weight of {l['weight_of']}: counted once)" if "weight_of" in l else "")
        t.add_row(name, str(l["in"]), str(l["out"]), "✓" if l["bias"] else "", l["format"], f"{l['params']:,}", f"{l['bytes']:,}")
    out.print(t)
    for m in summary["moe"]:
        out.print(f"  MoE {m['name']}: {m['experts']} experts, top-{m['top_k']}, {m['score']}{', renormalized' if m['renormalize'] else ''}")
    out.print(f"  total: {summary['params']:,} parameters, {summary['bytes']:,} bytes")
    for w in summary["warnings"]:
        err.print(f"[yellow]warning[/yellow]: {w}")


# ----------------------------------------------------------------------------------------------------------------
def build_recipe(recipe_path, target, seed, calib, calib_samples, seq_len, heldout, batch_size, max_error, device, flags: dict):
    from sparsec.compressor.pipeline import PassSpec, Recipe, load_recipe, pass_registry, recipe_from_dict

    r = load_recipe(recipe_path) if recipe_path else Recipe()
    if target is not None:
        r.target = target
    if seed is not None:
        r.seed = seed
    if calib is not None:
        r.calibration.data = calib
    if calib_samples is not None:
        r.calibration.samples = calib_samples
    if seq_len is not None:
        r.calibration.seq_len = seq_len
    if heldout is not None:
        r.calibration.heldout = heldout
    if batch_size is not None:
        r.calibration.batch_size = batch_size
    try:
        r.calibration.validate()
    except ValueError as e:
        raise E.RecipeError(f"calibration: {e}")
    if max_error is not None:
        r.max_error = max_error
    if device is not None:
        r.device = device
    reg = pass_registry()
    canonical = lambda t: reg[t].name if t in reg else t  # noqa: E731 - a recipe may name a pass by an alias (prune, quant)
    for spec in passes_from_flags(flags):
        existing = next((p for p in r.passes if canonical(p.type) == spec.type), None)
        if existing is None:
            r.passes.append(spec)
        else:
            existing.params.update(spec.params)
    # --include / --exclude select the Linear layers of every pass that compresses them, the recipe's passes too
    sel = {k: list(flags[k]) for k in ("include", "exclude") if flags.get(k)}
    if sel:
        takers = [p for p in r.passes if canonical(p.type) in _SELECTING_PASSES]
        if not takers:
            flag = " / ".join(f"--{k}" for k in sel)
            raise E.RecipeError(f"{flag} selects the layers a pass compresses; give --nm, --quant or --compensate (or a recipe "
                                "with such a pass) too")  # fmt: skip
        for p in takers:
            p.params.update(sel)
    return r


_SELECTING_PASSES = ("nm_prune", "group_quant", "lowrank")  # passes whose include / exclude name Linear layers


def parse_quant(quant) -> int:
    """--quant int8/int4/int3/int2 (or 8/4/3/2) -> bits (shared by `compress` and `batch`)."""
    qmap = {"int8": 8, "int4": 4, "int3": 3, "int2": 2, "8": 8, "4": 4, "3": 3, "2": 2}
    if str(quant).lower() not in qmap:
        raise E.RecipeError(f"--quant {quant!r}: expected one of int8, int4, int3, int2")
    return qmap[str(quant).lower()]


def passes_from_flags(f: dict):
    """CLI flags -> pass specs (the same keys a YAML recipe uses)."""
    from sparsec.compressor.pipeline import PassSpec

    sel = {}
    if f.get("include"):
        sel["include"] = list(f["include"])
    if f.get("exclude"):
        sel["exclude"] = list(f["exclude"])
    specs = []
    if f.get("merge_experts") is not None:
        specs.append(PassSpec("expert_merge", {"experts": f["merge_experts"], **({"method": f["merge_method"]} if f.get("merge_method") else {})},
                             where="--merge-experts"))
    elif f.get("merge_method"):
        raise E.RecipeError("--merge-method selects the expert merging method; give --merge-experts too (e.g. --merge-experts 4)")
    if f.get("slice") is not None:
        specs.append(PassSpec("slicing", {"fraction": f["slice"]}, where="--slice"))
    if f.get("nm") is not None:
        p = {"nm": f["nm"], **sel}
        if f.get("method"):
            p["method"] = f["method"]
        specs.append(PassSpec("nm_prune", p, where="--nm"))
    elif f.get("method"):
        raise E.RecipeError("--method selects the N:M pruning method; give --nm too (e.g. --nm 2:4 --method sparsegpt)")
    if f.get("quant") is not None or f.get("gqsa") is not None or f.get("auto_bits") is not None:
        p = dict(sel)
        if f.get("quant") is not None:
            p["bits"] = f["quant"]
        if f.get("gqsa") is not None:
            p["gqsa"] = f["gqsa"]
        if f.get("group_size") is not None:
            p["group_size"] = f["group_size"]
        if f.get("quant_method"):
            p["method"] = f["quant_method"]
        if f.get("symmetric") is not None:
            p["symmetric"] = f["symmetric"]
        if f.get("act_order"):
            p["act_order"] = True
        if f.get("auto_bits") is not None:
            p["auto_bits"] = f["auto_bits"]
        specs.append(PassSpec("group_quant", p, where="--quant" if f.get("quant") is not None else "--gqsa" if f.get("gqsa") is not None else "--auto-bits"))
    else:
        for k, flag in (("group_size", "--group-size"), ("quant_method", "--quant-method"), ("act_order", "--act-order"),
                        ("symmetric", "--symmetric" if f.get("symmetric") else "--asymmetric")):  # fmt: skip
            if (f.get(k) is not None) if k == "symmetric" else f.get(k):  # --asymmetric is False, not absent
                raise E.RecipeError(f"{flag} configures quantization; give --quant too (e.g. --quant int4 {flag} ...)")
    if f.get("compensate") is not None:
        p = {"method": f["compensate"], **sel}
        if f.get("rank") is not None:
            p["rank"] = f["rank"]
        specs.append(PassSpec("lowrank", p, where="--compensate"))
    elif f.get("rank") is not None:
        raise E.RecipeError("--rank sets the rank of low-rank compensation; give --compensate eora (or svd) too")
    return specs


@app.command(
    epilog="Examples:\n\n"
    "  sparsec compress --example tiny-gpt -o out/\n\n"
    "  sparsec compress model.onnx --target x86 --nm 2:4 --method sparsegpt --calib data.npz -o out/\n\n"
    "  sparsec compress model.onnx --nm 2:4 --quant int4 --group-size 64 --compensate eora --rank 32 -o out/\n\n"
    "  sparsec compress --recipe recipe.yaml model.onnx -o out/ --max-error 0.05"
)
def compress(
    model: Optional[str] = typer.Argument(None, help="Model file (.onnx or .pt2)."),
    output: Path = typer.Option(..., "-o", "--output", help="Artifact directory to create."),
    example: Optional[str] = typer.Option(None, "--example", help="An embedded reference model: tiny-gpt, tiny-moe, digits."),
    target: Optional[str] = typer.Option(None, "--target", "-t", help="x86, a100, h100, aarch64[:dotprod+i8mm], wasm (default x86)."),
    recipe: Optional[Path] = typer.Option(None, "--recipe", help="YAML recipe (flags given too override it)."),
    nm: Optional[str] = typer.Option(None, "--nm", help="N:M pruning, e.g. 2:4."),
    method: Optional[str] = typer.Option(None, "--method", help="Pruning method: magnitude, wanda, sparsegpt."),
    include: Optional[List[str]] = typer.Option(None, "--include", help="Regex of layer names to compress (repeatable)."),
    exclude: Optional[List[str]] = typer.Option(None, "--exclude", help="Regex of layer names to leave dense (repeatable)."),
    quant: Optional[str] = typer.Option(None, "--quant", help="Group quantization: int8, int4, int3, int2."),
    group_size: Optional[int] = typer.Option(None, "--group-size", help="Quantization group size along the input dim."),
    quant_method: Optional[str] = typer.Option(None, "--quant-method", help="rtn or gptq."),
    symmetric: Optional[bool] = typer.Option(None, "--symmetric/--asymmetric", help="Symmetric (no zero points) or asymmetric quantization."),
    act_order: bool = typer.Option(False, "--act-order", help="GPTQ: quantize columns in order of decreasing activation energy."),
    gqsa: Optional[str] = typer.Option(None, "--gqsa", help="GQSA group sparsity + quantization, e.g. w4s50."),
    auto_bits: Optional[float] = typer.Option(None, "--auto-bits", help="Choose bits per layer under this average bits/weight budget."),
    compensate: Optional[str] = typer.Option(None, "--compensate", help="Low-rank compensation: eora or svd."),
    rank: Optional[int] = typer.Option(None, "--rank", help="Rank of the low-rank compensation."),
    slice_: Optional[float] = typer.Option(None, "--slice", help="SliceGPT: fraction of the embedding dimension to remove."),
    merge_experts: Optional[float] = typer.Option(None, "--merge-experts", help="MC-SMoE: experts to keep per MoE layer (count, or fraction < 1)."),
    merge_method: Optional[str] = typer.Option(None, "--merge-method", help="Expert merging method: mcsmoe (default), average, drop, prune (docs/expert-merging.md)."),
    calib: Optional[str] = typer.Option(None, "--calib", help="Calibration data: .npz keyed by input name, .npy, or a directory."),
    calib_samples: Optional[int] = typer.Option(None, "--calib-samples", help="Samples used (fit + held out); default 128."),
    seq_len: Optional[int] = typer.Option(None, "--seq-len", help="Sequence length of token inputs (crop / generate)."),
    heldout: Optional[float] = typer.Option(None, "--heldout", help="Held-out share (fraction) or count of samples for evaluation."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Calibration batch size."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed (same inputs + seed -> same artifact)."),
    max_error: Optional[float] = typer.Option(None, "--max-error", help="Exit 1 when the output relative error exceeds this."),
    device: Optional[str] = typer.Option(None, "--device", help="Executor device for calibration: cpu, cuda, auto."),
    force: bool = typer.Option(False, "--force", help="Replace the output directory if it exists."),
    no_build: bool = typer.Option(False, "--no-build", help="Skip compiling the library: the artifact runs through its ONNX model."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No tables or progress bars (warnings are still printed, one line each)."),
):
    """Compress a model and write an artifact: weights.safetensors, graph.json, model.onnx, report.json, lib/."""
    from sparsec.compressor.artifact import check_output_dir
    from sparsec.compressor.compress import compress as run_compress
    from sparsec.compressor.report import merge_timings, render, warning_lines

    check_output_dir(output, force)
    if quant is not None:
        quant = parse_quant(quant)
    flags = dict(nm=nm, method=method, include=include, exclude=exclude, quant=quant, group_size=group_size, quant_method=quant_method,
                 symmetric=symmetric, act_order=act_order, gqsa=gqsa, auto_bits=auto_bits, compensate=compensate, rank=rank,
                 slice=slice_, merge_experts=merge_experts, merge_method=merge_method)  # fmt: skip
    r = build_recipe(str(recipe) if recipe else None, target, seed, calib, calib_samples, seq_len, heldout, batch_size, max_error, device, flags)
    if no_build:
        r.build = False
    from sparsec.backends.targets import get_target
    from sparsec.compressor.pipeline import build_passes

    get_target(r.target)  # recipe, target and device errors before a (possibly long) model load
    from sparsec.compressor.executor import resolve_device

    resolve_device(r.device)
    build_passes(r)
    src = _load(model, example)
    result = run_compress(src, r, output, force=force, console=None if quiet or as_json else err, progress=not (quiet or as_json))
    doc = merge_timings(result.report, result.timings)
    if as_json:
        print(json.dumps(doc, indent=1))
    elif not quiet:
        render(doc, console=err, max_rows=60)
        err.print(f"[green]wrote[/green] {result.out}")
    else:  # -q drops the tables and progress, not the warnings (those compress printed itself once)
        done = {f"warning: {w}" for w in result.printed}
        for line in warning_lines(doc):
            if line not in done:
                print(f"sparsec: {line}", file=sys.stderr)
    for f in result.threshold_failed:  # one line, like every error (the artifact stays: it is what failed the check)
        print(f"sparsec: threshold failed: {f} (the artifact is kept in {result.out})", file=sys.stderr)
    return E.EXIT_THRESHOLD if result.threshold_failed else 0


# ----------------------------------------------------------------------------------------------------------------
@app.command(epilog="Examples:\n\n  sparsec run out/ --inputs inputs.npz --output outputs.npz\n\n  sparsec run out/ --inputs x.npz --engine onnx")
def run(
    artifact: Path = typer.Argument(..., help="Artifact directory written by `sparsec compress`."),
    inputs: Path = typer.Option(..., "--inputs", "-i", help=".npz keyed by input name (or .npy for one input)."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Write outputs to this .npz, keyed by output name."),
    engine: str = typer.Option("auto", "--engine", help="auto (compiled library, else ONNX), lib, onnx, ir."),
    as_json: bool = typer.Option(False, "--json", help="Print a JSON summary."),
):
    """Execute an artifact on inputs and write its outputs by name."""
    from sparsec.compressor.runner import run_artifact

    res = run_artifact(artifact, inputs, engine=engine)
    if output is not None:
        import numpy as np

        try:
            tmp = str(output) + ".tmp.npz"
            np.savez(tmp, **res.outputs)
            os.replace(tmp, output)
        except OSError as e:
            raise E.OutputError(f"{output}: cannot write ({e.strerror or e})")
    summary = {
        "engine": res.engine,
        "outputs": {k: {"shape": list(v.shape), "dtype": str(v.dtype), "mean": float(v.mean()) if v.size and v.dtype.kind == "f" else None}
                    for k, v in res.outputs.items()},  # fmt: skip
        "seconds": res.seconds,
        "load_seconds": res.load_seconds,
        "note": res.note or None,
        "input_notes": res.input_notes or [],
    }
    from rich.markup import escape

    for w in res.input_notes or []:
        err.print(f"[yellow]warning[/yellow]: {escape(w)}", soft_wrap=True)
    if as_json:
        print(json.dumps(summary, indent=1))
    else:
        for k, v in summary["outputs"].items():
            out.print(f"{k}: {v['dtype']}{v['shape']}" + (f"  mean {v['mean']:.6g}" if v["mean"] is not None else ""))
        load = f" (+{res.load_seconds * 1e3:.0f} ms to load)" if res.load_seconds >= 5e-4 else ""
        err.print(f"engine: {res.engine}, {res.seconds * 1e3:.1f} ms to run{load}" + (f"; wrote {output}" if output else ""))
    if res.note:
        err.print(f"note: {res.note}")


@app.command(epilog="Examples:\n\n  sparsec report out/\n\n  sparsec report out/ --json > report.json")
def report(
    artifact: Path = typer.Argument(..., help="Artifact directory."),
    as_json: bool = typer.Option(False, "--json", help="Print report.json (with timings merged) for machines."),
    html: Optional[Path] = typer.Option(None, "--html", help="Also write an HTML page with per-layer plots."),
    rows: Optional[int] = typer.Option(None, "--rows", help="Show at most this many layers per pass."),
):
    """Show an artifact's pass reports again (from report.json)."""
    from sparsec.compressor.artifact import load_artifact
    from sparsec.compressor.report import merge_timings, render

    a = load_artifact(artifact)
    doc = merge_timings(a.report, a.timings)
    if html is not None:
        from sparsec.compressor.report_html import write_html

        write_html(doc, html, artifact=a)
    if as_json:
        print(json.dumps(doc, indent=1))
    else:
        render(doc, console=out, max_rows=rows)
        if html is not None:
            err.print(f"wrote {html}")


@app.command(epilog="Examples:\n\n  sparsec diff out_wanda/ out_sparsegpt/\n\n  sparsec diff a/ b/ --changed --rows 20\n\n  sparsec diff a/ b/ --json > diff.json")
def diff(
    artifact_a: Path = typer.Argument(..., help="First artifact directory (A)."),
    artifact_b: Path = typer.Argument(..., help="Second artifact directory (B)."),
    as_json: bool = typer.Option(False, "--json", help="Print the comparison as JSON."),
    changed: bool = typer.Option(False, "--changed", help="List only layers that differ."),
    rows: Optional[int] = typer.Option(None, "--rows", help="Show at most this many layers."),
):
    """Two artifacts' reports side by side: quality, totals, and per-layer format / bytes / error (B against A)."""
    from sparsec.compressor.artifact import load_artifact
    from sparsec.compressor.diff import diff_reports, render_diff

    a, b = load_artifact(artifact_a), load_artifact(artifact_b)
    doc = diff_reports(a.report, b.report, str(artifact_a), str(artifact_b))
    if as_json:
        print(json.dumps(doc, indent=1))
    else:
        render_diff(doc, out, max_rows=rows, changed_only=changed)


# ----------------------------------------------------------------------------------------------------------------
@app.command(epilog="Examples:\n\n  sparsec batch jobs.yaml --jobs 2 --json summary.json\n\n"
             "  sparsec batch jobs.yaml --out artifacts/ --cache ~/.cache/sparsec-ci --no-build\n\n"
             "Exit codes: 0 every job passed its thresholds; 1 a threshold failed; 2 a job errored (also: a usage "
             "error); 6 invalid job file. Job file reference: docs/ci.md.")  # fmt: skip
def batch(
    job_file: Path = typer.Argument(..., help="YAML job file: `jobs:` (and optional `defaults:`), keys = compress's long flags."),
    jobs: int = typer.Option(1, "--jobs", "-j", min=1, help="Jobs run in parallel (separate processes)."),
    out_dir: Optional[Path] = typer.Option(None, "--out", help="Directory for the artifacts, one per job (default: sparsec-out/ next to the job file)."),
    cache: Optional[Path] = typer.Option(None, "--cache", help="Content-addressed cache (default: .sparsec-cache/ next to the job file)."),
    no_cache: bool = typer.Option(False, "--no-cache", help="Recompute every job (and do not store results)."),
    no_build: bool = typer.Option(False, "--no-build", help="Skip compiling libraries for every job."),
    json_path: Optional[str] = typer.Option(None, "--json", help="Write the summary JSON to this file ('-': stdout)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No table, and no line per job that passed (failed and errored jobs still get theirs)."),
):
    """Compress many models x recipes x targets from a job file, in parallel, cached, with quality thresholds."""
    from sparsec.compressor import batch as B

    jl = B.load_jobs(job_file, no_build=no_build)
    base = job_file.resolve().parent
    out_dir = out_dir if out_dir is not None else base / "sparsec-out"
    cache_dir = None if no_cache else (cache if cache is not None else base / ".sparsec-cache")
    show = not quiet and json_path != "-"  # the table (stdout is the JSON with `--json -`)

    def done(r):  # a line per job on stderr, also with `--json -`; -q keeps those of jobs that did not pass
        if not quiet or r["status"] != "passed":
            why = r.get("error") or "; ".join(c["message"] for c in r.get("thresholds", []) if not c.get("ok") and c.get("message"))
            err.print(f"{r['name']}: {r['status']}" + (" (cached)" if r.get("cached") else "") + (f" - {why}" if why else ""))

    results = B.run_batch(jl, out_dir, cache_dir, workers=jobs, on_done=done)
    doc = B.summary(results, str(job_file), str(out_dir), str(cache_dir) if cache_dir else None)
    if json_path == "-":
        print(json.dumps(doc, indent=1, sort_keys=True))
    elif json_path:
        B.write_summary(doc, json_path)
    if show:
        B.render_summary(doc, out)
    return doc["exit_code"]


# ----------------------------------------------------------------------------------------------------------------
def _int_list(text: str, what: str) -> list[int]:
    try:
        vals = [int(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError:
        raise E.RecipeError(f"{what}: expected comma-separated integers, got {text!r}")
    if not vals or any(v <= 0 for v in vals):
        raise E.RecipeError(f"{what}: expected positive integers, got {text!r}")
    return vals


@app.command(epilog="Examples:\n\n  sparsec bench out/\n\n  sparsec bench out/ --original model.onnx --shapes 1x1,1x128,8x128 --runs 50\n\n"
             "  sparsec bench out/ --output bench/results/mine.json --json")  # fmt: skip
def bench(
    artifact: Path = typer.Argument(..., help="Artifact directory with a compiled library (lib/)."),
    original: Optional[str] = typer.Option(None, "--original", help="The uncompressed model file (default: the reference model the artifact came from)."),
    shapes: Optional[str] = typer.Option(None, "--shapes", help="Scenarios as BATCHxSEQ (batch x sequence length; default 1x1,1x128; "
                                                                 "models without a sequence dim: batch 1 and 8, SEQ ignored)."),
    runs: int = typer.Option(20, "--runs", min=1, help="Timed runs per engine and scenario (min and median reported)."),
    warmup: int = typer.Option(3, "--warmup", min=0, help="Untimed warm-up runs."),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, help="Threads for every engine (default: one per physical core, or TVM_NUM_THREADS)."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Write JSON + Markdown table here (a directory or a .json path; default: the artifact)."),
    as_json: bool = typer.Option(False, "--json", help="Print the JSON document."),
):
    """Time the artifact's compiled library against the uncompressed model (onnxruntime, and compiled by TVM)."""
    if threads is not None:
        os.environ["TVM_NUM_THREADS"] = str(threads)
    from sparsec.backends.bench import bench_artifact, print_table, write_results

    scen = []
    for part in shapes.split(",") if shapes is not None else []:
        b, _, q = part.strip().lower().partition("x")
        if not (b.isdigit() and q.isdigit() and int(b) > 0 and int(q) > 0):
            raise E.RecipeError(f"--shapes: expected BATCHxSEQ items like 1x128, got {part!r}")
        scen.append((int(b), int(q)))
    doc = bench_artifact(artifact, original=original, scenarios=scen or None, runs=runs, warmup=warmup, threads=threads,
                         console=None if as_json else err)  # fmt: skip
    try:
        j, md = write_results(doc, output if output is not None else artifact)
    except OSError as e:
        raise E.OutputError(f"{output or artifact}: cannot write the results ({e.strerror or e})")
    if as_json:
        print(json.dumps(doc, indent=1, sort_keys=True))
    else:
        print_table(doc, out)
        err.print(f"wrote {j} and {md}")


@app.command(epilog="Examples:\n\n  sparsec tune model.onnx --target x86\n\n  sparsec tune --example tiny-gpt --formats dense,2:4,int4g32,2:4+int4g32\n\n"
             "  sparsec tune out/ --db my-tuning.json   (an artifact: tunes exactly its layers' formats)\n\n"
             "  sparsec tune model.onnx --target h100 --formats 2:4,int4g128   (on the H100 machine: CUDA kernels)\n\n"
             "Exit codes: 12 no CUDA GPU/driver here, or the local GPU is not the target's arch.")  # fmt: skip
def tune(
    model: Optional[str] = typer.Argument(None, help="Model file (.onnx, .pt2) or an artifact directory."),
    example: Optional[str] = typer.Option(None, "--example", help="An embedded reference model: tiny-gpt, tiny-moe, digits."),
    target: str = typer.Option("x86", "--target", "-t", help="Target to tune for, measured on this machine: x86, or a100/h100 "
                                                           "on a machine with that GPU (sm_80 / sm_90)."),
    formats: Optional[str] = typer.Option(None, "--formats", help="Weight formats to tune, e.g. dense,2:4,int4g32,int8g32a,2:4+int4g32 "
                                                                  "(default: those of an artifact; for a model file: dense,2:4,int4g32,int8g32,2:4+int4g32)."),
    m_values: str = typer.Option("1,16,128", "--m", help="Token counts M the kernels are timed at (decode and prefill)."),
    candidates: int = typer.Option(16, "--candidates", min=1, help="Schedules tried per kernel (CUDA: per path gemv / small GEMM / GEMM; the default one always competes)."),
    db: Optional[Path] = typer.Option(None, "--db", help="Tuning database to update (default: ~/.cache/sparsec/tuning/<target>.json or $SPARSEC_TUNING_DB)."),
    ship: bool = typer.Option(False, "--ship", help="Update the database shipped with sparsec (golden/tuning/<target>.json) instead."),
    seed: int = typer.Option(0, "--seed", help="Seed for the candidate order and the synthetic weights."),
    as_json: bool = typer.Option(False, "--json", help="Print the results as JSON."),
    include_unverified: bool = typer.Option(False, "--include-unverified", help="CUDA (h100): also search warp-specialized "
                                            "TMA GEMM candidates not yet checked on a GPU, each in its own subprocess "
                                            "with a timeout (also SPARSEC_TUNE_UNVERIFIED=1)."),
):
    """Search kernel schedules for a model's layer shapes on this machine and store the best in a tuning database."""
    from sparsec.backends.targets import get_target
    from sparsec.backends.tune import TuningDB, default_user_db, shipped_db_path, tune_graph

    t = get_target(target)
    if model is not None and os.path.isdir(model) and example is None:
        from sparsec.compressor.artifact import load_artifact

        graph = load_artifact(model).graph
        fmts = None if formats is None else [f for f in formats.split(",") if f]
    else:
        graph = _load(model, example).graph
        fmts = [f for f in (formats or "dense,2:4,int4g32,int8g32,2:4+int4g32").split(",") if f]
    if db is not None and ship:
        raise E.RecipeError("give --db or --ship, not both")
    path = shipped_db_path(t.name) if ship else (db or default_user_db(t.name))
    store = TuningDB(entries=TuningDB.read(path), sources=[str(path)], path=Path(path))
    if include_unverified and t.kind != "cuda":
        raise E.RecipeError(f"--include-unverified is for CUDA targets (a100, h100), not {t.name}")
    # in a worker thread: Ctrl-C / SIGTERM stop the search at once, nothing saved (compressor/interrupt.py)
    rows = interrupt.call_interruptible(tune_graph, graph, t, store, fmts, m_values=_int_list(m_values, "--m"),
                                        max_candidates=candidates, seed=seed, console=None if as_json else err,
                                        include_unverified=include_unverified or None)  # fmt: skip
    try:
        store.save(path, t.name.partition(":")[0])
    except OSError as e:
        raise E.OutputError(f"{path}: cannot write the tuning database ({e.strerror or e})")
    if as_json:
        print(json.dumps({"database": str(path), "results": rows}, indent=1, sort_keys=True))
        return
    from rich.table import Table

    tab = Table(title=f"tuned for {t.name} -> {path}", title_justify="left")
    for c in ("kernel", "format", "shape", "vs default", "config"):
        tab.add_column(c)
    for r in rows:
        cfg = r["config"]
        if "error" in r:  # CUDA: no correct candidate for a path (nothing recorded)
            tab.add_row(r["kernel"], r["format"], r["shape"], "—", f"[red]{r['error']}[/red]")
            continue
        if "gemv" in cfg:  # CUDA kernels: one config per path
            desc = "; ".join(f"{p} " + " ".join(f"{k}={v}" for k, v in sorted(cfg[p].items())) for p in ("gemv", "gemm_small", "gemm"))
            desc += f" ({r['rejected']} wrong candidates rejected)" if r.get("rejected") else ""
        else:
            desc = " ".join(f"{k}={v}" for k, v in cfg.items() if k in ("block_o", "tile_m", "rows", "unroll", "parallel_gemv"))
        tab.add_row(r["kernel"], r["format"], r["shape"], f"{r['speedup_vs_default']:.2f}x", desc)
    out.print(tab)


@app.command(epilog="Examples:\n\n  sparsec compress --example tiny-gpt --target wasm -o out/ && sparsec serve out/\n\n"
             "  sparsec serve out/ --port 0 --no-open   (any free port; the URL is printed)\n\n"
             "Exit codes: 0 stopped with Ctrl-C; 13 not an artifact / no wasm build; 7 the port cannot be used.")  # fmt: skip
def serve(
    artifact: Path = typer.Argument(..., help="Artifact directory compressed with --target wasm."),
    port: int = typer.Option(8000, "--port", "-p", min=0, max=65535, help="TCP port (0: any free port)."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on (default: this machine only)."),
    open_browser: bool = typer.Option(False, "--open/--no-open", help="Open the demo page in the default browser."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Do not log requests."),
):
    """Serve a wasm artifact's lib/ on a local web server: a demo page runs the model in the browser."""
    from sparsec.backends.serve import serve as run_server

    def say(msg: str) -> None:
        print(msg, flush=True)

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    return run_server(artifact, host=host, port=port, open_browser=open_browser, say=say, log=None if quiet else log)


# ----------------------------------------------------------------------------------------------------------------
_EXIT, _ABORT, _CLICK = _exception_types()


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    if debug:  # accepted anywhere on the line
        argv = ["--debug"] + [a for a in argv if a != "--debug"]
        os.environ.setdefault("SPARSEC_TVM_LOG", "1")  # TVM's own log lines on stderr too (backends/build.py)
    interrupt.handle_sigterm()  # SIGTERM unwinds like Ctrl-C (no staging directory or temp files left), exit 143
    # a crash in native code (TVM's compiler recursing until the stack overflows) killed the process with no word on
    # stderr, even with --debug: the Python stack of every thread says where it happened
    interrupt.report_crashes(2)
    interrupt.enable()  # builds and tune searches in a worker thread: a signal stops the CLI at once
    try:
        rv = app(args=argv, prog_name="sparsec", standalone_mode=False)
        code = rv if isinstance(rv, int) else 0
        if code == E.EXIT_INTERRUPTED:  # typer turns Ctrl-C into a silent Exit(130) (returned without standalone mode)
            code = _interrupted(interrupt.last_signal_terminated())
    except _EXIT as e:
        code = getattr(e, "exit_code", 0)
    except _ABORT as e:
        code = _interrupted(isinstance(e.__context__, interrupt.Terminated) or interrupt.last_signal_terminated())
    except _CLICK as e:
        e.show(file=sys.stderr)
        code = e.exit_code if e.exit_code else E.EXIT_USAGE
    except E.SparsecError as e:
        if debug:
            traceback.print_exc()
        print(f"sparsec: {e.one_line()}", file=sys.stderr)
        code = e.exit_code
    except KeyboardInterrupt as e:
        code = _interrupted(isinstance(e, interrupt.Terminated))
    except BrokenPipeError:
        code = 0
    except Exception as e:  # noqa: BLE001 - a bug
        if debug:
            traceback.print_exc()
        first = str(e).splitlines()[0] if str(e) else ""
        print(f"sparsec: internal error: {type(e).__name__}: {first} (rerun with --debug for the traceback)", file=sys.stderr)
        code = E.EXIT_INTERNAL
    sys.stdout.flush()
    interrupt.exit_if_abandoned(code)  # a compile left running in a worker thread: no interpreter finalization
    interrupt.end_cli()  # (main called in process: later builds there run as a library's again, not in a child)
    sys.exit(code)


def _interrupted(terminated: bool) -> int:
    print("sparsec: terminated" if terminated else "sparsec: interrupted", file=sys.stderr)
    return interrupt.EXIT_TERMINATED if terminated else E.EXIT_INTERRUPTED


if __name__ == "__main__":
    main()
