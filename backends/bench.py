"""``sparsec bench``: time an artifact's compiled library against the uncompressed model, on this machine, same run.

Engines (each timed ``runs`` times after ``warmup`` calls; min and median reported):

- ``sparsec lib``        the artifact's ``lib/model.so`` (compressed weights, generated kernels), Relax VM;
- ``dense tvm``          the *uncompressed* model lowered and compiled by the same backend (same TVM, same dense
                         kernels): isolates what compression buys in the compiled setting;
- ``dense onnxruntime``  the uncompressed model in onnxruntime (the original ONNX file when given with
                         ``--original``; for reference models the dense model exported by sparsec);
- ``compressed onnxruntime``  the artifact's portable ``model.onnx`` in onnxruntime (for reference).

Inputs are generated from the model's input spec for each scenario (batch, sequence length); the compiled library's
outputs are checked against onnxruntime on the artifact's own model.onnx on the same inputs before timing.
"""
from __future__ import annotations

import json
import os
import platform
import shutil
import statistics
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..compressor import interrupt
from ..compressor.errors import ArtifactError, ModelLoadError

BENCH_SCHEMA = "sparsec.bench/1"


def time_fn(fn: Callable[[], Any], runs: int, warmup: int) -> dict[str, float]:
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return {"min_ms": min(ts) * 1e3, "median_ms": statistics.median(ts) * 1e3, "runs": runs}


def ort_providers(target: str) -> list[str]:
    """onnxruntime's execution providers for the baselines of a ``target`` library: its CUDA provider first for a GPU
    library where this onnxruntime has one (onnxruntime-gpu), so the GPU library is not compared with a CPU run only;
    else the CPU provider."""
    import onnxruntime as ort

    from .targets import get_target

    if get_target(target).kind == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def _ort_session(model: bytes | str, threads: int, providers: list[str] | None = None, what: str = "the model"):
    import onnxruntime as ort

    from ..compressor.errors import ModelLoadError

    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    try:
        return ort.InferenceSession(model, so, providers=providers or ["CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001 - onnxruntime refuses the file (a bfloat16 TorchScript export): one line
        if type(e).__module__.startswith("onnxruntime"):
            msg = " ".join(str(e).split())
            raise ModelLoadError(f"onnxruntime cannot run {what}, the baseline bench times: {msg[:240]}")
        raise


def original_graph(artifact, original: str | None):
    """(uncompressed graph, ONNX bytes or path of the uncompressed model, label)."""
    from ..compressor.compress import load_example, load_model
    from ..compressor.onnx_export import ExportOptions, to_onnx

    src = artifact.manifest.get("source", {})
    if original is not None:
        s = load_model(original)
        if src.get("sha256") and s.sha256 and s.sha256 != src["sha256"]:
            raise ModelLoadError(f"{original} is not the model this artifact was compressed from (sha256 differs)")
        onnx_model = original if str(original).endswith(".onnx") else to_onnx(s.graph, ExportOptions(weights="native")).SerializeToString()
        return s.graph, onnx_model, f"original {os.path.basename(str(original))}"
    name = str(src.get("name", ""))
    if name and not name.startswith("example:"):
        # the model file by the name the artifact records, in the working directory or next to the artifact, when it
        # is the same file (sha256)
        given = [Path(src["path"])] if src.get("path") else []  # the path as given to compress (models/x.onnx)
        if src.get("from_artifact"):  # the same file from the artifact's directory (bench run from elsewhere)
            given.append(Path(artifact.path) / src["from_artifact"])
        for cand in dict.fromkeys([*given, Path(name), Path(artifact.path).resolve().parent / name]):
            if cand.is_file():
                try:
                    return original_graph(artifact, str(cand))
                except ModelLoadError:  # another model of that name (or unreadable): keep looking
                    continue
    if name.startswith("example:"):
        s = load_example(name.split(":", 1)[1])
        return s.graph, to_onnx(s.graph, ExportOptions(weights="native")).SerializeToString(), f"dense {name} (exported by sparsec)"
    raise ModelLoadError(f"the artifact was compressed from {name or 'an unknown model'}, not found here (working directory, "
                         "next to the artifact) with the same sha256: pass the original with --original")


def scenario_inputs(graph, batch: int, seq: int | None, seed: int = 0) -> dict[str, np.ndarray]:
    from sparsec.calibration.data import generate

    return generate(graph, batch, seq or 1, seed)


def has_sequence_dim(graph) -> bool:
    """Whether the generated inputs' shapes follow the sequence length (token / sequence inputs), i.e. a scenario's
    SEQ means anything (an image model's does not)."""
    a, b = scenario_inputs(graph, 1, 2), scenario_inputs(graph, 1, 3)
    return any(a[k].shape != b[k].shape for k in a)


def bench_scenarios(graph, given: list[tuple[int, int]] | None, manifest: dict | None = None) -> list[tuple[int, int | None]]:
    """The ``(batch, seq)`` scenarios to time: ``given`` (``--shapes``) or 1x1 and 1x128. A model without a sequence
    dim: batch 1 (latency) and 8 (throughput) by default, and given SEQs collapse to one run a batch (seq None). A
    model whose export fixed its batch size runs at that size by default (1 and 8 could not run it), and one whose
    library takes one sequence length (``manifest``: an input dim the export fixed, lower.py) at that length."""
    from ..calibration.data import static_batch

    sb = None if given else static_batch(graph)
    if has_sequence_dim(graph):
        fixed = None if given else _fixed_seq(graph, manifest)
        if fixed is not None:
            return [(sb or 1, fixed)]
        return list(given or ([(sb, 1), (sb, 128)] if sb else [(1, 1), (1, 128)]))
    return list(dict.fromkeys((b, None) for b, _ in given)) if given else ([(sb, None)] if sb else [(1, None), (8, None)])


def _fixed_seq(graph, manifest: dict | None) -> int | None:
    """The one length the library takes in dim 1 of the inputs the graph declares dynamic there, if there is one."""
    sizes = set()
    for spec in (manifest or {}).get("inputs", []):
        v = graph.values.get(spec["name"])
        shp = spec.get("shape") or []
        if v is not None and v.shape is not None and len(v.shape) > 1 and len(shp) > 1 and not isinstance(v.shape[1], int) \
                and isinstance(shp[1], int):
            sizes.add(int(shp[1]))
    return sizes.pop() if len(sizes) == 1 else None


def _seq_label(seq) -> str:
    return "-" if seq is None else str(seq)


def bench_artifact(path: str | Path, *, original: str | None = None, scenarios: list[tuple[int, int]] | None = None,
                   runs: int = 20, warmup: int = 3, threads: int | None = None, console=None) -> dict[str, Any]:  # fmt: skip
    from ..compressor.artifact import load_artifact
    from .build import build_to_dir
    from .runtime import LoadedLib, check_runnable_here, default_cpu_threads, read_lib_manifest

    a = load_artifact(path)
    if not (a.lib_dir / "manifest.json").exists():
        raise ArtifactError(f"{a.path}: has no compiled library (lib/); compress with a buildable --target first")
    man = read_lib_manifest(a.lib_dir)
    if man.get("standalone"):  # aarch64 / wasm: run here only by their standalone runner, not the TVM runtime
        from ..compressor.errors import ToolMissingError

        how = "under node, or in a browser with `sparsec serve`" if man.get("kind") == "wasm" else "under qemu-aarch64"
        raise ToolMissingError(f"cannot bench here: the {a.manifest.get('target')} artifact's library is a standalone C library "
                               f"that `sparsec run` runs {how} (outputs, not timings); bench times libraries this machine's "
                               "TVM runtime loads (x86, a100, h100)")  # fmt: skip
    check_runnable_here(man, "cannot bench here: ")
    threads = threads or default_cpu_threads()  # onnxruntime gets the TVM runtime's threads
    say = (lambda m: console.print(f"[dim]{m}[/dim]")) if console is not None else (lambda m: None)

    say("loading the compiled library")
    lib = LoadedLib(a)
    g = a.graph
    scenarios = bench_scenarios(g, scenarios, man)
    dense_graph, dense_onnx, dense_label = original_graph(a, original)
    say("compiling the uncompressed model with the same backend (dense tvm)")
    tmp = interrupt.temp_dir("sparsec-bench-")
    target = a.manifest.get("target", "x86")
    try:
        build_to_dir(dense_graph, target, Path(tmp) / "lib")
        dense_lib = LoadedLib(lib_dir=Path(tmp) / "lib", graph=dense_graph)  # loaded: its files are no longer needed
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # every run left its dense library in /tmp
    providers = ort_providers(target)
    ort_dense = _ort_session(dense_onnx, threads, providers, f"the original model ({dense_label})")
    ort_comp = _ort_session(str(a.onnx_path), threads, providers, "the artifact's model.onnx") if a.onnx_path.exists() else None

    load_before = _load()
    results, skipped = [], []
    for batch, seq in scenarios:
        say(f"scenario batch={batch} seq={_seq_label(seq)}")
        try:
            results.append(_scenario(g, lib, dense_lib, ort_dense, ort_comp, batch, seq, runs, warmup))
        except Exception as e:  # noqa: BLE001 - a scenario the model cannot run (positions, a size baked into the export)
            from ..compressor.errors import SparsecError

            if not (isinstance(e, SparsecError) or type(e).__module__.startswith(("onnxruntime", "tvm"))):
                raise  # a bug, not the model's limits
            msg = getattr(e, "message", None) or (str(e).strip().splitlines() or [type(e).__name__])[-1]
            skipped.append({"batch": batch, "seq": seq, "reason": msg[:300]})
            if console is not None:
                console.print(f"[yellow]sparsec: warning: scenario {batch}x{_seq_label(seq)} skipped: {msg[:300]}[/yellow]")
    if not results:
        from ..compressor.errors import CalibrationError

        why = "; ".join(f"{s['batch']}x{_seq_label(s['seq'])}: {s['reason']}" for s in skipped)
        raise CalibrationError(f"no --shapes scenario runs on this model ({why}); give --shapes it accepts")
    import onnxruntime
    import tvm

    warnings = busy_warning(load_before, os.cpu_count() or 1, threads, results)
    for w in warnings:
        if console is not None:
            console.print(f"[yellow]sparsec: warning: {w}[/yellow]")
    return {
        "schema": BENCH_SCHEMA,
        **({"warnings": warnings} if warnings else {}),
        "artifact": str(a.path),
        "target": target,
        "baseline": dense_label,
        "machine": {"cpu": _cpu_name(), "arch": platform.machine(), "threads": threads, "cpus": os.cpu_count()},
        "versions": {"tvm": tvm.__version__, "onnxruntime": onnxruntime.__version__},
        "onnxruntime_provider": ort_dense.get_providers()[0],
        "runs": runs,
        "warmup": warmup,
        "scenarios": results,
        "skipped": skipped,
    }


def _load() -> float | None:
    try:
        return float(os.getloadavg()[0])
    except (OSError, AttributeError):
        return None


def busy_warning(before: float | None, cpus: int, threads: int, results: list[dict]) -> list[str]:
    """A warning when other processes competed for the cores while timing: the 1-minute load average above the CPU
    count before the timing started (afterwards it counts this process's own threads), or a compiled library whose
    median is over 3x its minimum. TVM's thread pool waits at every parallel region for threads the OS has descheduled: on a
    2-core machine at load 8 the library's median was 20-100x its minimum (and onnxruntime's was not), which made
    the ratios nonsense."""
    spread = max((e["median_ms"] / max(e["min_ms"], 1e-9) for r in results for k, e in r["engines"].items()
                  if k in ("sparsec lib", "dense tvm")), default=1.0)  # fmt: skip
    busy = before is not None and before > cpus
    if not busy and spread <= 3.0:
        return []
    why = (f"the 1-minute load average was {before:.1f} on {cpus} CPUs" if busy else
           f"a compiled library's median time was {spread:.0f}x its minimum")  # fmt: skip
    return [f"this machine was busy while timing ({why}): the times are unreliable, the compiled libraries' most "
            f"(TVM's thread pool waits for threads the OS has descheduled); rerun on an idle machine"
            + (", or with --threads 1" if threads > 1 else "")]


def _scenario(g, lib, dense_lib, ort_dense, ort_comp, batch: int, seq: int | None, runs: int, warmup: int) -> dict[str, Any]:
    """One ``batch x seq`` scenario: every engine on the same generated inputs."""
    feeds = scenario_inputs(g, batch, seq)
    got = lib.run(feeds)
    check = None
    if ort_comp is not None:
        names = [o.name for o in ort_comp.get_outputs()]
        ref = dict(zip(names, ort_comp.run(None, feeds)))
        errs = [float(np.linalg.norm(got[k].astype(np.float64) - ref[k]) / max(np.linalg.norm(ref[k]), 1e-30))
                for k in got if k in ref and ref[k].dtype.kind == "f"]  # fmt: skip
        check = max(errs) if errs else None
    eng: dict[str, dict[str, float]] = {}
    eng["sparsec lib"] = time_fn(lib.timer(feeds), runs, warmup)
    eng["dense tvm"] = time_fn(dense_lib.timer(feeds), runs, warmup)
    dn = [i.name for i in ort_dense.get_inputs()]
    eng["dense onnxruntime"] = time_fn(lambda: ort_dense.run(None, {k: feeds[k] for k in dn}), runs, warmup)
    if ort_comp is not None:
        cn = [i.name for i in ort_comp.get_inputs()]
        eng["compressed onnxruntime"] = time_fn(lambda: ort_comp.run(None, {k: feeds[k] for k in cn}), runs, warmup)
    lib_t = eng["sparsec lib"]["median_ms"]
    return {
        "batch": batch, "seq": seq, "engines": eng,
        "speedup_vs_dense_onnxruntime": eng["dense onnxruntime"]["median_ms"] / lib_t,
        "speedup_vs_dense_tvm": eng["dense tvm"]["median_ms"] / lib_t,
        "lib_vs_compressed_onnx_rel_error": check,
    }  # fmt: skip


def _cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def result_suffix() -> str:
    """File-name suffix of the x86 benchmark results of this host: "_avx512" on an AVX-512 CPU, "" on AVX2 (the
    machine the unsuffixed results come from), so the two machines' tables sit side by side."""
    from .kernels.registry import _host_vector_bits

    return "_avx512" if _host_vector_bits() >= 512 else ""


def table_markdown(doc: dict[str, Any]) -> str:
    engines = list(doc["scenarios"][0]["engines"]) if doc["scenarios"] else []
    head = "| batch x seq | " + " | ".join(f"{e} ms (min / median)" for e in engines) + " | lib vs dense ORT | lib vs dense TVM |"
    sep = "|" + "---|" * (len(engines) + 3)
    rows = []
    for s in doc["scenarios"]:
        cells = [f"{s['engines'][e]['min_ms']:.3f} / {s['engines'][e]['median_ms']:.3f}" for e in engines]
        rows.append(f"| {s['batch']} x {_seq_label(s['seq'])} | " + " | ".join(cells)
                    + f" | {s['speedup_vs_dense_onnxruntime']:.2f}x | {s['speedup_vs_dense_tvm']:.2f}x |")  # fmt: skip
    m = doc["machine"]
    prov = doc.get("onnxruntime_provider", "CPUExecutionProvider")
    foot = (f"\n{m['cpu']} ({m['arch']}), {m['threads']} threads; {doc['runs']} runs after {doc['warmup']} warm-up; "
            f"baseline: {doc['baseline']}; onnxruntime: {prov}.\n")
    for sk in doc.get("skipped", []):
        foot += f"Skipped {sk['batch']} x {_seq_label(sk['seq'])}: {sk['reason']}\n"
    return "\n".join([head, sep, *rows]) + "\n" + foot


def print_table(doc: dict[str, Any], console) -> None:
    from rich.table import Table

    prov = doc.get("onnxruntime_provider", "CPUExecutionProvider")
    t = Table(title=f"sparsec bench ({doc['target']}, {doc['machine']['threads']} threads, onnxruntime {prov})", title_justify="left")
    t.add_column("batch x seq")
    engines = list(doc["scenarios"][0]["engines"]) if doc["scenarios"] else []
    for e in engines:
        t.add_column(f"{e}\nms min/med", justify="right")
    t.add_column("vs dense ORT", justify="right")
    t.add_column("vs dense TVM", justify="right")
    for s in doc["scenarios"]:
        t.add_row(f"{s['batch']} x {_seq_label(s['seq'])}", *[f"{s['engines'][e]['min_ms']:.3f} / {s['engines'][e]['median_ms']:.3f}" for e in engines],
                  f"{s['speedup_vs_dense_onnxruntime']:.2f}x", f"{s['speedup_vs_dense_tvm']:.2f}x")  # fmt: skip
    console.print(t)


def write_results(doc: dict[str, Any], out: str | Path) -> tuple[Path, Path]:
    """``out`` is a directory (bench.json + bench.md inside) or a .json path (the .md next to it)."""
    out = Path(out)
    if out.suffix == ".json":
        j, md = out, out.with_suffix(".md")
    else:
        out.mkdir(parents=True, exist_ok=True)
        j, md = out / "bench.json", out / "bench.md"
    j.parent.mkdir(parents=True, exist_ok=True)
    j.write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n")
    md.write_text(table_markdown(doc))
    return j, md
