"""Execute an artifact: its compiled library when there is one, else the portable ONNX (onnxruntime), or the IR."""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .artifact import Artifact, load_artifact, verify_files
from .errors import ArtifactError, CalibrationError, InputShapeError, RecipeError, ShapeError
from .executor import Executor, check_feeds

ENGINES = ("auto", "lib", "onnx", "ir")


@dataclass
class RunResult:
    outputs: dict[str, np.ndarray]
    engine: str
    seconds: float  # the run itself
    note: str = ""
    load_seconds: float = 0.0  # loading the library / creating the session before it
    input_notes: list[str] | None = None  # what was done to the inputs (a narrowing cast, an added batch axis)


def read_inputs(path: str | Path, graph, notes: list[str] | None = None) -> dict[str, np.ndarray]:
    """Inputs for a run, validated against the graph (names, ranks, static dims, dtypes, NaN/inf)."""
    from sparsec.calibration.data import read_arrays, validate_arrays

    arrays = read_arrays(path, graph)
    return validate_arrays(arrays, graph, str(path), notes)


def has_lib(a: Artifact) -> bool:
    return (a.lib_dir / "manifest.json").exists()


def run_artifact(artifact: str | Path, inputs, engine: str = "auto") -> RunResult:
    if engine not in ENGINES:
        raise RecipeError(f"--engine {engine!r}: expected one of {', '.join(ENGINES)}")
    a = load_artifact(artifact)
    verify_files(a, ["graph.json", "weights.safetensors"])
    g = a.graph
    input_notes: list[str] = []
    feeds = inputs if isinstance(inputs, dict) else read_inputs(inputs, g, input_notes)
    check_feeds(g, feeds)
    note = ""
    if engine == "auto":
        engine = "lib" if has_lib(a) else "onnx"
        if engine == "lib":
            from sparsec.backends.runtime import lib_runnable_here, read_lib_manifest

            why = lib_runnable_here(read_lib_manifest(a.lib_dir))
            if why is not None:
                engine, note = "onnx", f"compiled library not used: {why}; ran model.onnx"
    t0, load = time.perf_counter(), 0.0
    if engine == "lib":
        if not has_lib(a):
            raise ArtifactError(f"{a.path}: has no compiled library (lib/); use --engine onnx")
        verify_files(a, ["lib/manifest.json"])
        from sparsec.backends.runtime import run_lib

        times: dict[str, float] = {}
        outs = run_lib(a, feeds, times)
        load = times.get("load", 0.0)
        t0 += load
    elif engine == "onnx":
        import onnxruntime as ort

        if not a.onnx_path.exists():
            raise ArtifactError(f"{a.path}: model.onnx is missing")
        verify_files(a, ["model.onnx"])
        so = ort.SessionOptions()
        so.log_severity_level = 4  # fatal only: a failing run is reported once, as a sparsec error
        try:
            sess = ort.InferenceSession(str(a.onnx_path), so, providers=["CPUExecutionProvider"])
        except Exception as e:  # noqa: BLE001 - onnxruntime refuses the artifact's model: one line, not an internal error
            msg = " ".join(str(e).split())
            msg = msg.split("Status Message:")[-1].strip() if "Status Message:" in msg else msg
            raise ArtifactError(f"{a.path}: onnxruntime cannot load model.onnx: {msg[:300]}") from None
        t0, load = time.perf_counter(), time.perf_counter() - t0
        names = [o.name for o in sess.get_outputs()]
        try:
            outs = dict(zip(names, sess.run(None, feeds)))
        except Exception as e:  # noqa: BLE001 - onnxruntime rejects these inputs (the shapes the model allows), not a bug
            msg = " ".join(str(e).split())
            msg = msg.split("Status Message:")[-1].strip() if "Status Message:" in msg else msg
            raise InputShapeError(f"model.onnx cannot run on these inputs (onnxruntime): {msg[:300]}") from None
    else:
        ex = Executor(g)
        t0, load = time.perf_counter(), time.perf_counter() - t0
        outs = ex.run(feeds)
    return RunResult({k: np.asarray(v) for k, v in outs.items()}, engine, time.perf_counter() - t0, note, load, input_notes)
