"""The compress job: load -> calibrate -> passes -> quality -> export -> build -> artifact.

Used by ``sparsec compress`` and by batch mode; also the Python API (``sparsec.compress``).
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .artifact import ArtifactContent, check_output_dir, write_artifact
from .errors import ModelLoadError, NumericalError, RecipeError, ShapeError, UnsupportedOpError
from .formats import Dense
from .ir import Graph
from .pipeline import PassContext, Recipe, build_passes, run_passes
from .report import Report

EXAMPLES = ("tiny-gpt", "tiny-moe", "digits")


@dataclass
class Source:
    graph: Graph
    label: str  # what the user named (path or example:<name>)
    sha256: str
    golden: str | None = None  # reference model name, when the model is one of golden/


def load_model(source: Any, example_inputs: Any = None, *, example: str | None = None) -> Source:
    """A path (.onnx / .pt2), an ``nn.Module`` (with ``example_inputs``), or ``example=<name>``."""
    if example is not None:
        return load_example(example)
    if isinstance(source, Graph):
        return Source(source, source.name, source.meta.get("source_sha256", ""))
    try:
        import torch.nn as nn

        if isinstance(source, nn.Module):
            from .frontends.torch import load_torch

            if example_inputs is None:
                raise ModelLoadError("a torch module needs example inputs")
            g = load_torch(source, example_inputs if isinstance(example_inputs, (tuple, list)) else (example_inputs,))
            return Source(g, type(source).__name__, g.meta.get("source_sha256", ""))
    except ImportError:  # pragma: no cover
        pass
    path = os.fspath(source)
    if not os.path.exists(path):
        raise ModelLoadError(f"{path}: no such file")
    if path.endswith(".pt2") or path.endswith(".pt"):
        from .frontends.torch import load_pt2

        g = load_pt2(path)
    else:
        from .frontends.onnx import load_onnx

        g = load_onnx(path)
    return Source(g, path, g.meta.get("source_sha256", ""))


def load_example(name: str) -> Source:
    if name not in EXAMPLES:
        raise ModelLoadError(f"unknown example {name!r}; examples: {', '.join(EXAMPLES)}")
    from sparsec.golden import models as gm

    from .frontends.torch import load_torch

    module, example_inputs = gm.load(name)
    g = load_torch(module, example_inputs, name=name)
    g.meta["golden"] = name
    import hashlib

    from sparsec.golden import models as _m

    digest = hashlib.sha256(open(_m.weights_path(name), "rb").read()).hexdigest()
    g.meta["source_sha256"] = digest
    return Source(g, f"example:{name}", digest, golden=name)


# ----------------------------------------------------------------------------------------------------------------
def calibration_used(calib, held) -> dict[str, Any]:
    """What the passes ran on, where the recipe says what was asked for: samples fitted and held out (after a file
    held fewer, or a static batch dropped some), the batch size, and each input's per-sample shape (after --seq-len)."""
    return {"source": calib.source, "generated": bool(calib.generated), "samples": calib.num_samples,
            "heldout_samples": held.num_samples if held is not None else 0, "batch_size": int(calib.batch_size),
            "shapes": calib.sample_shapes()}  # fmt: skip


def calibration_for(src: Source, recipe: Recipe):
    """(fit split, held-out split) for a model: the user's data, the reference model's own text/digits, or generated."""
    from sparsec.calibration.data import CalibrationSet, load_calibration

    c = recipe.calibration
    if c.data is None and src.golden is not None:
        from sparsec.golden import data as gd

        arrays = gd.calibration_arrays(src.golden, n=c.samples, seq_len=c.seq_len, seed=recipe.seed)
        arrays = {name: a for name, a in zip(src.graph.inputs, arrays)}
        n = next(iter(arrays.values())).shape[0]
        n_held = int(round(c.heldout)) if c.heldout >= 1 else max(1, int(math.ceil(c.heldout * n)))
        fit = CalibrationSet({k: v[: n - n_held] for k, v in arrays.items()}, f"golden:{src.golden} (train split)", False, c.batch_size)
        held = CalibrationSet({k: v[n - n_held :] for k, v in arrays.items()}, f"golden:{src.golden} (train split, held out)", False, c.batch_size)
        return fit, held
    return load_calibration(src.graph, c.data, samples=c.samples, seq_len=c.seq_len, seed=recipe.seed, heldout=c.heldout, batch_size=c.batch_size)


def compare_graphs(ref: Graph, new: Graph, data, device=None) -> dict[str, Any]:
    """Relative output error and cosine similarity of ``new`` against ``ref`` on ``data`` over the float outputs;
    integer / bool outputs (token ids of an argmax, masks) are compared exactly: ``output_mismatch`` is the fraction of
    their elements that differ. A model without float outputs gets that fraction as its ``output_rel_error``."""
    from .executor import Executor

    er, en = Executor(ref, device), Executor(new, device)
    d2 = r2 = n2 = dot = 0.0
    floats, mism, total = 0, 0, 0
    for batch in data.batches():
        a = er.run(batch)
        b = en.run(batch)
        for o_ref, o_new in zip(ref.outputs, new.outputs):
            x, y = np.asarray(a[o_ref]), np.asarray(b[o_new])
            if x.shape != y.shape:
                continue
            if x.dtype.kind not in "fc":
                mism += int(np.count_nonzero(x != y))
                total += x.size
                continue
            floats += 1
            x, y = x.astype(np.float64), y.astype(np.float64)
            if not np.isfinite(y).all():
                raise NumericalError("the compressed model produces NaN or inf on the held-out data")
            d2 += float(((x - y) ** 2).sum())
            r2 += float((x**2).sum())
            n2 += float((y**2).sum())
            dot += float((x * y).sum())
    out: dict[str, Any] = {}
    if floats or not total:
        out["output_rel_error"] = math.sqrt(d2 / r2) if r2 > 0 else 0.0
        out["output_cosine"] = dot / math.sqrt(r2 * n2) if r2 > 0 and n2 > 0 else 1.0
    if total:
        out["output_mismatch"] = mism / total
        if not floats:
            out["output_rel_error"] = mism / total
            out["output_rel_error_note"] = "no float outputs: the fraction of integer / bool output elements that differ"
    out.update(eval_samples=data.num_samples, eval_source=data.source)
    return out


def golden_metrics(name: str, graph: Graph, device=None, limit: int | None = None) -> dict[str, Any]:
    """Perplexity (GPTs) or accuracy (digits) of ``graph`` on the reference model's held-out data."""
    from sparsec.golden import evaluate as ge

    from .executor import Executor

    ex = Executor(graph, device)
    inp = graph.inputs[0]

    def fn(x):
        return ex.run({inp: x})[graph.outputs[0]]

    return ge.evaluate_graph_fn(name, fn, limit=limit)


def check_export(graph: Graph, onnx_bytes: bytes, data, device=None, max_batches: int = 2) -> dict[str, Any]:
    """onnxruntime on the exported model against the executor (catches export bugs in production)."""
    import onnxruntime as ort

    from .executor import Executor

    so = ort.SessionOptions()
    so.log_severity_level = 3
    try:
        sess = ort.InferenceSession(onnx_bytes, so, providers=["CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001
        return {"onnxruntime": f"failed to load: {str(e).splitlines()[0][:200]}"}
    ex = Executor(graph, device)
    worst = 0.0
    for batch in data.batches()[:max_batches]:
        got = ex.run(batch)
        ort_out = sess.run(None, {k: v for k, v in batch.items()})
        for name, o in zip([o.name for o in sess.get_outputs()], ort_out):
            if np.asarray(got[name]).dtype.kind != "f":  # integer / bool outputs: not a relative error
                continue
            r = got[name].astype(np.float64)
            worst = max(worst, float(np.linalg.norm(o.astype(np.float64) - r) / max(np.linalg.norm(r), 1e-30)))
    return {"onnx_vs_executor_rel_error": worst}


def check_weights_finite(g: Graph) -> None:
    for lin in g.linears():
        w = lin.weight.materialize()
        if not np.isfinite(w).all():
            raise NumericalError(f"weight of '{lin.name}' contains NaN or inf")
        if lin.bias is not None and not np.isfinite(lin.bias).all():
            raise NumericalError(f"bias of '{lin.name}' contains NaN or inf")
    for n in g.nodes:
        for role, p in n.params().items():
            if isinstance(p, np.ndarray) and p.dtype.kind == "f" and not np.isfinite(p).all():
                raise NumericalError(f"{role} of '{n.name}' contains NaN or inf")
    for name, c in g.constants.items():
        # infinities are legitimate in constants (causal masks hold -inf); NaN never is
        if c.dtype.kind == "f" and c.size and np.isnan(c).any():
            raise NumericalError(f"constant '{name}' contains NaN")


@dataclass
class CompressResult:
    out: Path
    report: dict[str, Any]
    timings: dict[str, Any]
    threshold_failed: list[str] = field(default_factory=list)
    printed: list[str] = field(default_factory=list)  # warnings compress printed itself (stderr, no console)


def shared_weights(graph) -> list[str]:
    """Weights that several Linear layers apply and that are no longer stored once (a compressed use is stored per
    layer), as "first layer: N uses"."""
    from .frontends.raise_ import linears_by_weight

    return [f"{ls[0].name}: {len(ls)} uses" for ls in linears_by_weight(graph).values()
            if len(ls) > 1 and any(not isinstance(lin.weight, Dense) for lin in ls)]  # fmt: skip


MIN_EVAL_SAMPLES = 8  # held-out samples below which the end-to-end output error is flagged as noisy


def outcome_warnings(bytes_before: int, bytes_after: int, reports, shared: list[str] | None = None,
                     float16_source: int = 0) -> list[str]:  # fmt: skip
    """What a user would want flagged about the result: a pass that compressed no layer (patterns that match nothing,
    every layer excluded or skipped, a model with no Linear layer), a model that got larger than the original (a
    low-rank path of a large rank; ``shared``: weights applied by several layers, stored once per use once
    compressed)."""
    out = []
    for rep in reports:
        if rep.name == "expert_merge" or any(r.status == "compressed" for r in rep.rows):
            continue
        if not rep.rows:
            out.append(f"{rep.name} compressed no layer: the model has no Linear layer it can compress (`sparsec inspect "
                       "MODEL` lists the layers sparsec recognises)")  # fmt: skip
            continue
        notes: dict[str, int] = {}
        for r in rep.rows:
            why = r.note or r.status
            notes[why] = notes.get(why, 0) + 1
        why, k = max(notes.items(), key=lambda kv: kv[1])
        out.append(f"{rep.name} compressed no layer: {k} of {len(rep.rows)} {why!r}" + (
            " (check the --include / --exclude patterns against the layer names: `sparsec inspect MODEL`)" if "included" in why or "pattern" in why else ""))
    if bytes_after > bytes_before:
        sliced_apart = any(rep.totals.get("untied") for rep in reports if rep.name == "slicing")
        untied = [r.name for rep in reports for r in rep.rows if "untied from" in (r.note or "")]
        added = [r for rep in reports if rep.name == "slicing" for r in rep.rows if r.status == "added"]
        why = (f"a weight applied by several layers is stored once per use once compressed ({', '.join(shared[:3])}"
               f"{', ...' if len(shared) > 3 else ''}; exclude those layers to keep it shared)" if shared
               else "slicing untied the head from the embedding table (both are stored) and removed less than that adds"
               if sliced_apart else f"compressing '{untied[0]}' untied it from the embedding table it shared (both are "
               "stored; exclude it to keep it tied)" if untied
               else (f"slicing added {len(added)} Linear layer(s) ({', '.join(r.name for r in added[:3])}: "
                     f"{sum(r.bytes_after for r in added):,} bytes; projections of an input or a shortcut into the sliced "
                     "stream, graph outputs rotated back) and removed less than that: the model is too narrow or too "
                     "shallow for this fraction to pay off") if added
               else f"the file stores {float16_source} layer weight(s) as float16 (cast to float32 by the model), which "
               "sparsec stores in float32: compressed, they still take more bytes than their float16 originals"
               if float16_source
               else "e.g. a low-rank path of a rank near the layers' width costs more than it saves")  # fmt: skip
        out.append(f"the compressed model stores more bytes than the original ({bytes_after:,} > {bytes_before:,}); {why}")
    return out


def compress(source: Source, recipe: Recipe, out: str | os.PathLike, *, force: bool = False, console=None,
             progress: bool = True) -> CompressResult:  # fmt: skip
    import torch

    from sparsec import __version__
    from sparsec.backends.targets import get_target

    from .executor import resolve_device
    from .onnx_export import ExportOptions, to_onnx

    t_start = time.perf_counter()
    check_output_dir(out, force)
    target = get_target(recipe.target)
    passes = build_passes(recipe)
    torch.manual_seed(recipe.seed)
    device = resolve_device(recipe.device)
    graph = source.graph
    if graph.meta.get("prequantized"):
        # its integer weights would come back as float (the artifact larger than the input) and re-exporting its
        # activation quantizers moves their rounding: refused instead
        raise UnsupportedOpError(f"the model is already quantized ({graph.meta['prequantized']}): sparsec compresses "
                                 "float models; give it the model before quantization")  # fmt: skip
    check_weights_finite(graph)
    original = graph.copy()

    calib = held = None
    calib_used: dict[str, Any] = {}
    warnings: list[str] = list(graph.meta.get("import_warnings", []))
    # given calibration data is always read and checked (a file that does not fit the model is an error even when no
    # pass needs it; with no passes it serves the export check)
    need_calib = any(p.needs_calibration for p in passes) or bool(passes) or recipe.calibration.data is not None
    if need_calib:
        calib, held = calibration_for(source, recipe)
        warnings.extend(calib.warnings)
        calib_used = calibration_used(calib, held)
    ctx = PassContext(recipe, calib=calib, heldout=held, device=device, original=original, console=console, golden=source.golden)
    ctx.show_progress = progress
    try:
        reports = run_passes(graph, passes, ctx)
    except ShapeError as e:
        if recipe.calibration.data is not None or calib is None:
            raise
        # generated inputs of a shape the export does not take (a sequence length its reshapes fixed)
        shapes = ", ".join(f"'{k}' {list(v.shape)}" for k, v in calib.arrays.items())
        raise type(e)(f"{e} (on generated calibration inputs, {shapes}: give --calib data, or --seq-len / "
                      "--batch-size the model was exported for)") from None  # fmt: skip
    warnings.extend(ctx.warnings)
    # the graph is final here (the build reads it): its bytes are computed once, for the warnings and the report
    bytes_before, bytes_after = int(original.source_nbytes()), int(graph.nbytes())
    narrow = sum(n.meta.get("source_dtype") == "float16" for n in original.linears())
    warnings.extend(outcome_warnings(bytes_before, bytes_after, reports, shared_weights(graph), narrow))

    quality: dict[str, Any] = {}
    tq = time.perf_counter()
    eval_data = held if held is not None else calib
    if passes and eval_data is not None:
        quality.update(compare_graphs(original, graph, eval_data, device))
        if held is None:  # too few samples to hold some out: the errors are on the data the passes fitted
            quality["eval_source"] = f"{eval_data.source} (the fitting data: no held-out split)"
        elif eval_data.num_samples < MIN_EVAL_SAMPLES and not eval_data.generated:
            warnings.append(f"the output error is measured on {eval_data.num_samples} held-out sample(s): a noisy figure "
                            f"(it can rank two recipes the wrong way round); hold out at least {MIN_EVAL_SAMPLES} "
                            "(--heldout, or more --calib samples)")  # fmt: skip
    if source.golden and (recipe.eval or "auto") != "none":
        try:
            base = golden_metrics(source.golden, original, device)
            comp = golden_metrics(source.golden, graph, device) if passes else base
            for k, v in base.items():
                quality[f"{k}_original"] = v
            for k, v in comp.items():
                quality[k] = v
        except ImportError:  # pragma: no cover - golden package missing
            warnings.append("reference evaluation unavailable")
    quality["seconds"] = time.perf_counter() - tq

    onnx_model = to_onnx(graph, ExportOptions(weights="native"))
    onnx_bytes = onnx_model.SerializeToString(deterministic=True)
    checks = [eval_data] if eval_data is not None else []
    if not checks:  # no calibration data (a model compressed without passes): inputs generated for the check
        from sparsec.calibration.data import CalibrationSet, generate, static_batch

        # the model's own batch size where its export fixed one (dynamo / torch.export default to static shapes)
        n = static_batch(graph) or 2
        # short sequences first (cheap), then the length generated calibration uses: a 16-sample waveform is shorter
        # than an audio model's conv stack takes (Wav2Vec2: "padded input size ... (2). Kernel size: (3)", exit 5)
        for length in dict.fromkeys([recipe.calibration.seq_len or 16, recipe.calibration.seq_len]):
            try:
                arrays = generate(graph, n, length, recipe.seed)
                checks.append(CalibrationSet(arrays, "generated (export check)", True, n))
            except Exception:  # noqa: BLE001 - unknown input shapes: no export check
                pass
    check_data = None
    for i, data in enumerate(checks):
        try:
            quality.update(check_export(graph, onnx_bytes, data, device))
            check_data = data
            break
        except Exception as e:  # noqa: BLE001 - (the executor's shape error, or onnxruntime's own)
            if not data.generated:
                raise
            if i == len(checks) - 1:  # generated inputs the model does not take: the check is skipped, not the compress
                why = " ".join(str(getattr(e, "message", None) or e).split())[:300]
                warnings.append(f"model.onnx was not checked against sparsec's executor: the generated check inputs do "
                                f"not fit the model ({why}); give --calib data to check it")  # fmt: skip
    if check_data is not None:
        gap = quality.get("onnx_vs_executor_rel_error")
        if str(quality.get("onnxruntime", "")).startswith("failed to load"):
            warnings.append(f"model.onnx does not load in onnxruntime ({quality['onnxruntime'][len('failed to load: '):]}): "
                            "the artifact's portable model is broken (please report it); the compiled library is not "
                            "affected")  # fmt: skip
        if isinstance(gap, float) and gap > 1e-2:
            # e.g. integer ops (MatMulInteger, QDQ) onnxruntime computes with saturation the executor does not have
            warnings.append(f"model.onnx run by onnxruntime and sparsec's executor disagree by {gap:.3g} (relative) "
                            f"on the check inputs: the portable model and the compiled library may give different outputs")  # fmt: skip

    build_info: dict[str, Any] = {"target": target.name}
    writers = []
    tb = time.perf_counter()
    printed: list[str] = []
    backend_build = None
    if recipe.build:
        try:
            from sparsec.backends import build as backend_build  # noqa: F401
        except ImportError:
            backend_build = None
    if not recipe.build:
        build_info["status"] = "not built (--no-build): `sparsec run` uses model.onnx"
    elif backend_build is not None:
        info, writer = backend_build.build(graph, target, recipe=recipe, console=console)
        build_info.update(info)
        if writer is not None:
            writers.append(("lib", writer))
    else:
        build_info["status"] = "not built: this sparsec has no compiled backend yet; `sparsec run` uses model.onnx"
    build_info["seconds"] = time.perf_counter() - tb
    if recipe.build and str(build_info.get("status", "")).startswith("not built"):
        # the user asked for a target build and gets none (an op TVM cannot lower, a missing toolchain): the artifact
        # is complete and runs through model.onnx (exit 0, documented), but say so where it cannot be missed
        why = str(build_info["status"])[len("not built"):].lstrip(":; ")
        w = f"no compiled library for --target {target.name}: {why}"
        warnings.append(w)
        if console is None:
            import sys

            print(f"sparsec: warning: {w}", file=sys.stderr)
            printed.append(w)

    model_info = {
        "name": graph.name,
        "source": source.label if source.label.startswith("example:") else os.path.basename(source.label),
        "source_sha256": source.sha256,
        "params": int(original.param_count()),
        "bytes": bytes_before,
        "params_after": int(graph.param_count()),
        "bytes_after": bytes_after,
        "linear_layers": len(graph.linears()),
    }
    if source.golden:
        model_info["golden"] = source.golden
    rep = Report(model=model_info, recipe=recipe.to_dict(), target=target.name, seed=recipe.seed, passes=reports,
                 quality=quality, build=build_info, warnings=warnings, sparsec_version=__version__,
                 calibration=calib_used)  # fmt: skip
    doc, timings = rep.to_json()
    timings["total_seconds"] = time.perf_counter() - t_start
    manifest = {
        "sparsec_version": __version__,
        "source": {"name": model_info["source"], "sha256": source.sha256,
                   **({"path": source.label,  # as given (from the working directory then), and from the artifact: bench
                       "from_artifact": os.path.relpath(os.path.abspath(source.label), os.path.abspath(out))}  # finds it
                      if not source.label.startswith("example:") and os.path.exists(source.label) else {})},  # fmt: skip
        "recipe": recipe.to_dict(),
        "target": target.name,
        "seed": recipe.seed,
        **({"calibration_used": doc["calibration"]} if "calibration" in doc else {}),
    }
    content = ArtifactContent(graph=graph, manifest=manifest, report=doc, onnx_bytes=onnx_bytes, timings=timings, writers=writers)
    path = write_artifact(out, content, force=force)
    failed = []
    if recipe.max_error is not None:
        err = quality.get("output_rel_error")
        if err is not None and err > recipe.max_error:
            failed.append(f"output relative error {err:.4g} exceeds --max-error {recipe.max_error:g}")
    return CompressResult(path, doc, timings, failed, printed)
