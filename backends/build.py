"""Build: compressed graph -> Relax (lower.py) -> ``tvm.compile`` -> ``lib/`` of the artifact.

``build(graph, target, recipe, console) -> (info, writer)`` is the hook :func:`sparsec.compressor.compress.compress`
calls: ``info`` goes into the report (``build`` section) and ``writer(dir)`` writes ``lib/``:

- ``model.so``: the whole model, one TVM library (Relax VM bytecode + host code + kernels; for CUDA targets the
  device code as a fatbin with SASS for the target's arch, see :mod:`sparsec.backends.cuda_build`). Weights are not
  in it: they are the ``main`` function's parameters, bound at load time from ``weights.safetensors``.
- ``manifest.json`` (``sparsec.lib/1``): target, inputs (with symbolic dims), outputs, every parameter with its source
  (see :class:`sparsec.backends.lower.ParamBinding`), the kernel chosen for every Linear with its schedule config and
  whether it is tuned, and the TVM version.
- ``kernels.tvmscript``: the TVMScript source of every generated kernel (what was compiled).
- CUDA targets: ``model.cu`` (generated CUDA source) and ``model.<arch>.fatbin`` (``cuobjdump -sass`` it).

Determinism: every file of ``lib/`` is byte-identical for the same input on the same machine (kernels, manifest,
LLVM object code of the kernels, nvcc output with fixed file names) **except ``model.so``**: TVM 0.27's
``VMShapeLower`` pass numbers the VM's shape-heap slots in an order that varies from run to run (the same shape
computations, stored in permuted slots), so the host shape function and the VM bytecode differ in a few bytes.
``model.so`` is therefore listed in :data:`sparsec.compressor.artifact.NONDETERMINISTIC` (kept out of the artifact
manifest's checksums, like ``timings.json``); tests check its *behaviour* is identical instead.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

from ..compressor import interrupt
from ..compressor.errors import BuildError, ToolMissingError, UnsupportedOpError
from ..compressor.ir import Graph, dumps_json
from .targets import Target, get_target

LIB_SCHEMA = "sparsec.lib/1"
LIB_NAME = "model.so"


def _tvm_target(target: Target):
    import tvm

    if target.kind == "cuda":
        host = {"kind": "llvm", "mtriple": "x86_64-linux-gnu"}  # any x86-64 GPU host
        return tvm.target.Target(target.tvm_dict(), host=host)
    return target.tvm_target()


def _toolchain(target: Target) -> tuple[Callable | None, str | None]:
    """(fcompile for export_library, reason when this target cannot be linked here)."""
    triple = str(target.tvm.get("mtriple", ""))
    if target.kind == "wasm" or triple.startswith("wasm"):  # model.wasm + model.js: backends/cross.py
        if shutil.which("clang") is None or (shutil.which("wasm-ld") or shutil.which("wasm-ld-14")) is None:
            return None, "clang and wasm-ld (lld) are needed to link model.wasm and are not installed"
        return None, None
    if triple.startswith("aarch64"):
        cc = shutil.which("aarch64-linux-gnu-g++") or shutil.which("aarch64-linux-gnu-gcc")
        if cc is None:
            return None, "the aarch64 cross toolchain (aarch64-linux-gnu-g++) is not installed"
        from tvm.support import cc as _cc  # tvm.contrib.cc moved to tvm.support.cc in 0.27

        return _cc.cross_compiler(cc), None
    return None, None


def cpu_pipeline(tt):
    """TVM's CPU pipeline plus default schedules for the legalized operators (see :mod:`.cpu_schedule`)."""
    import tvm
    from tvm.relax.backend.cpu_generic import pipeline as cpu
    from tvm.s_tir import dlight as dl

    from .cpu_schedule import cpu_rules, fast_math

    @tvm.transform.module_pass(opt_level=0)
    def _pipeline(mod, _ctx):
        with tt:
            seq = tvm.transform.Sequential(
                fast_math() + cpu.library_dispatch_passes(tt) + cpu.legalize_passes(tt) + [dl.ApplyDefaultSchedule(*cpu_rules())]
                + cpu.dataflow_lower_passes(tt) + cpu.finalize_passes(tt) + [single_pointer_noalias()]
            )  # fmt: skip
            return seq(mod)

    return _pipeline


def single_pointer_noalias():
    """Mark PrimFuncs with at most one pointer parameter ``tirx.noalias`` (true of them by definition).

    The Relax VM's ``shape_func`` (VMShapeLower: one int64 heap) lacks the attribute, and TVM 0.27's LLVM codegen then
    drops the per-buffer alias info (TBAA) of other functions of the same module: the x86 panel GEMM of sparsec's
    CPU kernels kept its accumulators in memory, a store after every FMA, and ran 2.5x slower in a model's library
    than compiled alone (3136 x 576 -> 64, 2:4, 2 threads: 5.3 ms vs 1.8 ms; bench/conv_x86.py measures the nets)."""
    import tvm

    def scalar(v) -> bool:
        return isinstance(v.ty, tvm.ir.PrimType) and str(v.ty.dtype) != "handle"

    @tvm.transform.module_pass(opt_level=0, name="SinglePointerNoAlias")
    def _pass(mod, _ctx):
        out = tvm.IRModule(mod.functions, attrs=mod.attrs)
        for gv, f in mod.functions.items():
            if isinstance(f, tvm.tirx.PrimFunc) and not f.attrs.get("tirx.noalias", False):
                if sum(1 for v in f.params if not scalar(v)) <= 1:
                    out[gv] = f.with_attr("tirx.noalias", True)
        return out

    return _pass


def _guarded(rule):
    """A DLight rule that declines (None) where it would raise: TVM 0.27's ``gpu.Matmul`` raised "Could not parse
    mapping as sum of iterators" instead of declining (on the routed tiny-moe, while a reshape's -1 was left in its
    shapes: lower.py's ``export_live``), which ends the build; the next rule (``GEMV``, ``Fallback``) then schedules
    the function."""
    from tvm.s_tir.dlight.base import ScheduleRule

    class Guarded(ScheduleRule):
        def apply(self, func, target, tunable):
            try:
                return rule.apply(func, target, tunable)
            except Exception:  # noqa: BLE001 - a rule that cannot schedule the function declines it
                return None

    return Guarded()


def cuda_pipeline(tt):
    """TVM's CUDA pipeline (``relax.backend.cuda.pipeline``) with the rules of its DLight schedule guarded
    (:func:`_guarded`): its legalization passes as they are, its ``ApplyDefaultSchedule`` replaced."""
    import tvm
    from tvm.relax.backend.cuda import pipeline as cuda
    from tvm.s_tir import dlight as dl

    rules = [dl.gpu.Matmul(), dl.gpu.GEMV(), dl.gpu.Reduction(), dl.gpu.GeneralReduction()]  # TVM's, Fallback last
    legalize = [p for p in cuda.legalize_passes(tt) if not isinstance(p, dl.ApplyDefaultSchedule)]
    legalize.append(dl.ApplyDefaultSchedule(*[_guarded(r) for r in rules], dl.gpu.Fallback()))

    @tvm.transform.module_pass(opt_level=0)
    def _pipeline(mod, _ctx):
        with tt:
            seq = tvm.transform.Sequential(
                cuda.library_dispatch_passes(tt) + legalize + cuda.dataflow_lower_passes(tt) + cuda.finalize_passes(tt)
            )
            return seq(mod)

    return _pipeline


def _tvm_reason(e: Exception) -> str:
    """One line from a TVM error: the line saying what went wrong ("CodeGenVM cannot emit this Relax operator
    directly", "Check failed: ...") and the construct it names (often the last line, e.g. ``R.add(alloc9, alloc10)``)."""
    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip() and not ln.strip().startswith(("File ", "[bt]", "#"))]
    if not lines:
        return type(e).__name__
    why = next((ln for ln in lines if re.search(r"cannot|Check failed|[Ee]rror|not supported|mismatch|unsupported", ln)), None)
    if why is None or why == lines[-1]:
        return lines[-1][:300]
    return f"{why[:220]} (at {lines[-1][:100]})"


def compile_lowered(low, target: Target, opt_level: int = 3):
    """``tvm.compile`` of a lowered module; returns (executable, cuda build log or None)."""
    import tvm
    from tvm import relax

    tt = _tvm_target(target)
    pipeline = cpu_pipeline(tt) if tt.kind.name == "llvm" else cuda_pipeline(tt) if tt.kind.name == "cuda" else relax.get_default_pipeline(tt)
    try:
        with tvm.transform.PassContext(opt_level=opt_level):
            if target.kind == "cuda":
                from .cuda_build import fatbin_postproc

                with fatbin_postproc(target.arch or "sm_80") as log:
                    ex = tvm.compile(low.mod, target=tt, relax_pipeline=pipeline)
                return ex, log
            return tvm.compile(low.mod, target=tt, relax_pipeline=pipeline), None
    except (BuildError, ToolMissingError):
        raise
    except Exception as e:  # noqa: BLE001 - TVM compile failures become one-line build errors
        if isinstance(e, (KeyboardInterrupt, MemoryError)):
            raise
        raise BuildError(f"TVM could not compile the model for {target.name}: {_tvm_reason(e)}")


def link_extra_modules(mods: list[Any], target: Target, workdir: str) -> list[str]:
    """Object files for the kernels' ``extra_modules`` (linked into model.so with ``export_library(addons=...)``).

    Modules are grouped by type; a group is linked once by its module's ``link_objects(sources, target, workdir)``
    when the defining module has one (it may deduplicate across layers), else each by ``m.link_objects(target,
    workdir)``."""
    import sys

    groups: dict[type, list[Any]] = {}
    for m in mods:
        groups.setdefault(type(m), []).append(m)
    objs: list[str] = []
    for i, (typ, items) in enumerate(sorted(groups.items(), key=lambda kv: kv[0].__qualname__)):
        wd = os.path.join(workdir, str(i))
        os.makedirs(wd, exist_ok=True)
        group_fn = getattr(sys.modules.get(typ.__module__), "link_objects", None)
        if group_fn is not None:
            objs.extend(group_fn(items, target, wd))
        else:
            for j, m in enumerate(items):
                objs.extend(m.link_objects(target, os.path.join(wd, str(j))))
    return objs


def lib_manifest(low, target: Target, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    import tvm

    doc = {
        "schema": LIB_SCHEMA,
        "target": target.name,
        "kind": target.kind,
        "arch": target.arch,
        "tvm_target": target.tvm_dict(),
        "tvm_version": tvm.__version__,
        "library": LIB_NAME,
        "inputs": low.inputs,
        "outputs": low.outputs,
        "input_ranges": low.input_ranges,
        "dim_limits": low.dim_limits,
        "dim_ties": low.dim_ties,
        "params": [p.to_json() for p in low.params],
        "kernels": low.kernels,
    }
    doc.update(extra or {})
    return doc


def summarize(low) -> dict[str, Any]:
    counts: dict[str, int] = {}
    for k in low.kernels:
        counts[k["kernel"]] = counts.get(k["kernel"], 0) + 1
    gen = [k for k in low.kernels if k["kernel"] != "tvm.dense"]
    tuned = sum(1 for k in gen if k["tuned"])
    notes = sorted({k["note"] for k in low.kernels if k.get("note")} | set(low.notes))
    info = {
        "kernels": ", ".join(f"{n} x{c}" for n, c in sorted(counts.items())),
        "tuning": "untuned" if gen and tuned == 0 else (f"tuned {tuned}/{len(gen)} layers" if gen else "n/a"),
        "params": len(low.params),
        "layers": [{"layer": k["layer"] + (f":{k['part']}" if k.get("part") else ""), "format": k["format"], "kernel": k["kernel"],
                    "tuned": k["tuned"], "config": k["config"], **({"note": k["note"]} if k.get("note") else {})}
                   for k in low.kernels],  # fmt: skip
    }
    if notes:
        info["notes"] = notes
    if low.moe:
        info["moe_lowering"] = ("routed (each expert runs on the tokens routed to it)"
                                if low.moe_routed else "dense-equivalent (every expert on every token, weighted by the routing)")
    return info


# a line TVM's C++ logging writes ("[08:49:29] /project/src/target/llvm/llvm_instance.cc:986: Warning: ...")
_TVM_LOG_LINE = re.compile(r"^\[\d\d:\d\d:\d\d\] \S+\.(cc|cpp|h):\d+: ")


@contextlib.contextmanager
def tvm_log_filtered():
    """While TVM compiles: its C++ log lines (warnings such as "Fast mode segfaults when there are out-of-bounds
    indices" for every gather it legalizes, "Set native vector bits to be 128 for wasm32") are dropped from stderr;
    every other line written there (sparsec's own progress lines included) is passed on as it comes.
    ``SPARSEC_TVM_LOG=1`` (or ``--debug``) keeps them all. The native stderr (fd 2) is a pipe meanwhile, read by a
    thread that forwards the lines to the real stderr (batch jobs run in processes of their own)."""
    if os.environ.get("SPARSEC_TVM_LOG"):
        yield
        return
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):  # no usable fd 2
        yield
        return
    r, w = os.pipe()

    def forward() -> None:
        buf = b""
        while True:
            try:
                chunk = os.read(r, 65536)
            except OSError:
                chunk = b""
            if chunk:  # whole lines; the unfinished one waits for the next chunk
                *lines, buf = (buf + chunk).split(b"\n")
            else:  # the end: an unfinished last line goes out as a line
                lines, buf = ([buf] if buf else []), b""
            out = b"".join(ln + b"\n" for ln in lines if not _TVM_LOG_LINE.match(ln.decode(errors="replace")))
            if out:
                try:
                    os.write(saved, out)
                except OSError:
                    pass
            if not chunk:
                return

    reader = threading.Thread(target=forward, name="sparsec-stderr", daemon=True)
    reader.start()
    os.dup2(w, 2)
    os.close(w)
    crash_report = interrupt.reporting_crashes()  # (the CLI's): a crash in TVM is reported on the real stderr, not the pipe
    if crash_report:
        interrupt.report_crashes(saved)
    try:
        yield
    finally:
        try:
            sys.stderr.flush()
        except (OSError, ValueError):
            pass
        os.dup2(saved, 2)  # the pipe's last write end closes: the reader sees the end after the last line
        if crash_report:
            interrupt.report_crashes(2)
        # (unless a child process still holds it: do not wait long for one, nor at all when interrupted)
        reader.join(0.2 if sys.exc_info()[0] is not None else 5.0)
        if not reader.is_alive():
            os.close(r)
        os.close(saved)


def build(graph: Graph, target: Target | str, recipe=None, console=None, **kw) -> tuple[dict[str, Any], Callable[[Path], None] | None]:
    """Compile ``graph`` for ``target`` (:func:`_build`), TVM's own log lines filtered from stderr
    (:func:`tvm_log_filtered`). Returns (info for the report, writer of ``lib/`` or None). For the CLI the compile runs
    in a child process (:func:`_build_in_child`): a crash in TVM's native code is a one-line build error there."""
    if interrupt.reporting_crashes():  # the CLI reports crashes: TVM's import replaces that SIGSEGV handler by its own
        import tvm  # noqa: F401

        interrupt.report_crashes(2)
    with tvm_log_filtered():  # in a worker thread: Ctrl-C / SIGTERM stop the caller at once (compressor/interrupt.py)
        got = _build_in_child(graph, target, recipe, console, **kw) if _isolated_builds() else None
        if got is None:  # (or no child could be forked: e.g. a process too large for the system's overcommit rule)
            got = interrupt.call_interruptible(_build, graph, target, recipe, console, **kw)
        info, files = got
    if files is None:
        return info, None

    return info, lambda d: _write_files(files, d)


def _write_files(files: dict[str, bytes], d: str | os.PathLike) -> None:
    for name, data in sorted(files.items()):
        with open(Path(d) / name, "wb") as f:
            f.write(data)


def _flush_std() -> None:
    for f in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):
            f.flush()


def _isolated_builds() -> bool:
    """Whether :func:`build` compiles in a child process: for the CLI (which reports crashes), where ``os.fork``
    exists, unless ``SPARSEC_BUILD_IN_PROCESS=1``."""
    return interrupt.reporting_crashes() and hasattr(os, "fork") and not os.environ.get("SPARSEC_BUILD_IN_PROCESS")


_SIGNAL_WORDS = {"SIGSEGV": "segmentation fault", "SIGBUS": "bus error", "SIGABRT": "aborted", "SIGILL": "illegal instruction",
                 "SIGFPE": "arithmetic exception"}  # fmt: skip


def _build_in_child(graph: Graph, target: Target | str, recipe, console, **kw) -> tuple[dict[str, Any], dict[str, bytes] | None] | None:
    """:func:`_build` in a forked child process. TVM's compiler runs native code where a bug crashes the process (a
    stack overflow in a recursive pass, a segfault in LLVM): in the CLI's own process that ended ``sparsec compress``
    with exit 139 and a page of stack dump, and left its temp files. Here the child dies, and the parent raises
    one :class:`BuildError` naming the signal (exit 11), nothing of the artifact written. The child writes ``lib/``'s
    files and the report's info (JSON) into a private directory; its errors come back as the same exception classes
    (:func:`_error_doc`). Every temp file the child or the compilers it runs make is under that directory, removed
    here whatever happens. Ctrl-C / SIGTERM: the parent kills the child and unwinds as before. None when no child
    could be forked (the caller builds in its own process)."""
    import signal
    import warnings

    name = target if isinstance(target, str) else target.name
    work = interrupt.temp_dir("sparsec-build-")
    try:
        os.makedirs(os.path.join(work, "tmp"))
        os.makedirs(os.path.join(work, "lib"))
        _flush_std()  # (not written twice by the child's copy of the buffers)
        with warnings.catch_warnings():  # Python 3.12: "This process is multi-threaded, use of fork() may lead to
            warnings.simplefilter("ignore", DeprecationWarning)  # deadlocks": the child touches no lock of another thread
            try:
                pid = os.fork()
            except OSError:  # ENOMEM, EAGAIN: build in this process
                return None
        if pid == 0:  # the child: never returns
            _child_build(work, graph, target, recipe, console, kw)
        try:
            _, status = os.waitpid(pid, 0)  # a signal handler's exception (Ctrl-C, SIGTERM) ends the wait
        except BaseException:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
            raise
        result_path = os.path.join(work, "result.json")
        if os.WIFSIGNALED(status) or not os.path.exists(result_path):
            if os.WIFSIGNALED(status):
                sig = signal.Signals(os.WTERMSIG(status)).name
                how = f"crashed ({sig}, {_SIGNAL_WORDS.get(sig, 'signal')})" if sig != "SIGKILL" else f"was killed ({sig}: out of memory?)"
            else:
                how = f"ended with exit code {os.WEXITSTATUS(status)} and no result"
            raise BuildError(f"TVM's compiler {how} while compiling the model for {name}; no artifact was written",
                             hint="a bug in TVM or in sparsec's lowering: please report it with the model; "
                                  "`--no-build` writes the artifact without lib/ (`sparsec run` uses model.onnx)")  # fmt: skip
        with open(result_path) as f:
            result = json.load(f)
        if "error" in result:
            raise _error_from_doc(result["error"])
        files = None
        if result.get("files") is not None:
            files = {n: Path(work, "lib", n).read_bytes() for n in result["files"]}
        return result["info"], files
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _child_build(work: str, graph: Graph, target, recipe, console, kw: dict[str, Any]) -> None:
    """The forked child of :func:`_build_in_child`: build, write the result, ``os._exit``."""
    import faulthandler
    import signal
    import tempfile

    code = 0
    try:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a terminal's Ctrl-C reaches the whole group: the parent decides
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        faulthandler.disable()  # a crash ends the child at once, without a dump (the parent reports it in one line)
        for s in (signal.SIGSEGV, signal.SIGBUS, signal.SIGILL, signal.SIGFPE, signal.SIGABRT):
            signal.signal(s, signal.SIG_DFL)
        with contextlib.suppress(ImportError, ValueError, OSError):
            import resource

            resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # no core file in the user's directory
        _die_with_parent()
        tmp = os.path.join(work, "tmp")
        tempfile.tempdir = tmp  # TVM's TempDirectory, sparsec's temp_dir ...
        os.environ["TMPDIR"] = tmp  # ... and the compilers and linkers it runs
        interrupt.in_child()
        torch = sys.modules.get("torch")
        if torch is not None:  # the parent's OpenMP threads are not in this process: no parallel region here
            torch.set_num_threads(1)
        info, files = _build(graph, target, recipe, console, **kw)
        _write_files(files or {}, os.path.join(work, "lib"))
        result: dict[str, Any] = {"info": info, "files": sorted(files) if files is not None else None}
    except BaseException as e:  # noqa: BLE001 - sent to the parent, which raises it
        result = {"error": _error_doc(e)}
    try:
        text = json.dumps(result, default=_json_default)  # (the info's key order is the report's)
        with open(os.path.join(work, "result.json.part"), "w") as f:
            f.write(text)
        os.replace(os.path.join(work, "result.json.part"), os.path.join(work, "result.json"))
    except BaseException:  # noqa: BLE001
        code = 71
    _flush_std()
    os._exit(code)


def _json_default(o: Any) -> Any:
    import numpy as np

    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, (tuple, set, frozenset)):
        return list(o)
    if isinstance(o, os.PathLike):
        return os.fspath(o)
    raise TypeError(f"{type(o).__name__} is not JSON serializable")


def _die_with_parent() -> None:
    """Linux: this process gets SIGKILL when its parent dies (a parent killed with SIGKILL cannot kill its child)."""
    import ctypes
    import signal

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL), 0, 0, 0)  # PR_SET_PDEATHSIG


def _error_doc(e: BaseException) -> dict[str, Any]:
    """An exception of the child as JSON: a :class:`SparsecError` by class and attributes, anything else as text."""
    import traceback

    from ..compressor.errors import SparsecError

    if isinstance(e, SparsecError):
        attrs = {}
        for k, v in vars(e).items():
            try:
                json.dumps(v)
            except (TypeError, ValueError):
                continue
            attrs[k] = v
        return {"kind": "sparsec", "module": type(e).__module__, "class": type(e).__qualname__, "message": str(e.message),
                "attrs": attrs}  # fmt: skip
    return {"kind": "internal", "class": type(e).__qualname__, "text": str(e),
            "traceback": "".join(traceback.format_exception(type(e), e, e.__traceback__))}  # fmt: skip


class BuildChildError(RuntimeError):
    """An unexpected exception (a bug) in the build's child process; its traceback is in the notes."""


def _error_from_doc(doc: dict[str, Any]) -> BaseException:
    """The exception :func:`_error_doc` described."""
    import importlib

    from ..compressor.errors import SparsecError

    if doc.get("kind") == "sparsec":
        with contextlib.suppress(ImportError, AttributeError):
            cls = importlib.import_module(doc["module"])
            for part in doc["class"].split("."):
                cls = getattr(cls, part)
            if isinstance(cls, type) and issubclass(cls, SparsecError):
                e = cls.__new__(cls)
                Exception.__init__(e, doc["message"])
                e.__dict__.update(doc.get("attrs") or {})
                e.message = doc["message"]
                return e
        return BuildError(doc["message"])
    e = BuildChildError(f"{doc.get('class')}: {doc.get('text')}")
    e.add_note("in the build's child process:\n" + str(doc.get("traceback", "")).rstrip())
    return e


def _build(graph: Graph, target: Target | str, recipe=None, console=None, *, tuning=None, dense_kernel: str | None = None,
           tuning_db: str | os.PathLike | None = None, strict: bool = False,
           moe_routed: bool | None = None) -> tuple[dict[str, Any], dict[str, bytes] | None]:  # fmt: skip
    """Compile ``graph`` for ``target``. Returns (info for the report, the files of ``lib/`` by name, or None). ``moe_routed``: see
    :func:`sparsec.backends.lower.lower` (None: the target's default)."""
    from .lower import float32_compute, lower
    from .tune import TuningDB

    target = get_target(target) if isinstance(target, str) else target
    fcompile, reason = _toolchain(target)
    if reason is not None:
        return {"status": f"not built: {reason}; `sparsec run` uses model.onnx"}, None
    if tuning is None:
        tuning = TuningDB.for_target(target.name, tuning_db)
    t0 = time.perf_counter()
    io_dtypes: dict[str, str] = {}
    f32_note = None
    if target.kind != "cuda":  # no float16 arithmetic on CPU targets: a float16 model computes in float32 there
        f32 = float32_compute(graph)
        if f32 is not None:
            graph, io_dtypes = f32
            if target.kind == "wasm":  # the standalone wasm module takes and returns float32 (JS has no float16 array)
                io_dtypes = {}
            f32_note = ("float16 model: computed in float32 on this CPU target (no float16 arithmetic there); "
                        + ("inputs and outputs stay float16" if io_dtypes else "the library takes and returns float32"))
    try:
        low = lower(graph, target, tuning, dense_kernel=dense_kernel, moe_routed=moe_routed, io_dtypes=io_dtypes)
    except UnsupportedOpError as e:
        # an operator TVM cannot lower (e.g. a data-dependent Reshape): the artifact is still complete without lib/
        # (model.onnx runs everywhere); the report says why, and `sparsec run --engine lib` refuses clearly
        if strict:
            raise
        return {"status": f"not built: {e.message}; `sparsec run` uses model.onnx"}, None
    if console is not None:
        console.print(f"[dim]build: lowered {len(low.kernels)} linear layers for {target.name}; compiling with TVM...[/dim]")
    if target.kind == "wasm":  # standalone model.wasm + model.js, no Relax VM library (backends/cross.py)
        from .cross import build_wasm_lib

        info, files = build_wasm_lib(graph, low, target, console)
        if f32_note and files is not None:
            info.setdefault("notes", []).append(f32_note)
        return info, files
    ex, cuda_log = compile_lowered(low, target)
    tmp = interrupt.temp_dir("sparsec-build-")
    try:
        lib_path = os.path.join(tmp, LIB_NAME)
        addons = link_extra_modules(low.extra_modules, target, os.path.join(tmp, "extra"))
        kw: dict[str, Any] = {}
        if fcompile is not None:
            kw["fcompile"] = fcompile
        if addons:
            kw["addons"] = addons
        try:
            ex.export_library(lib_path, **kw)
        except Exception as e:  # noqa: BLE001
            raise BuildError(f"linking the library failed: {str(e).strip().splitlines()[-1][:300] if str(e).strip() else type(e).__name__}")
        files: dict[str, bytes] = {LIB_NAME: Path(lib_path).read_bytes()}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    extra: dict[str, Any] = {}
    if cuda_log is not None and cuda_log.fatbins:
        import hashlib

        if len(cuda_log.fatbins) != 1:
            raise BuildError(f"the CUDA build produced {len(cuda_log.fatbins)} device modules, expected one")
        fb = cuda_log.fatbins[0]
        fname = f"model.{cuda_log.arch}.fatbin"
        files[fname] = fb
        files["model.cu"] = cuda_log.sources[0].encode()
        extra["fatbin"] = {"file": fname, "arch": cuda_log.arch, "sha256": hashlib.sha256(fb).hexdigest(), "bytes": len(fb)}
    if low.sources:
        files["kernels.tvmscript"] = "".join(f"# ---- {name}\n{src}\n" for name, src in sorted(low.sources.items())).encode()
    if target.name.partition(":")[0] == "aarch64":  # + the standalone C API library run under qemu (backends/cross.py)
        from .cross import build_standalone_or_note

        sa_info, sa_files = build_standalone_or_note(graph, low, target)
        files.update(sa_files)
        extra.update(sa_info)
    manifest = lib_manifest(low, target, extra)
    files["manifest.json"] = dumps_json(manifest).encode()

    info = {"status": "built", "library": f"lib/{LIB_NAME}", "tvm_target": json.dumps(target.tvm_dict(), sort_keys=True)}
    if extra.get("fatbin"):
        info["device_code"] = f"lib/{extra['fatbin']['file']} ({extra['fatbin']['arch']}, {extra['fatbin']['bytes']} bytes)"
    info.update(summarize(low))
    if f32_note:
        info.setdefault("notes", []).append(f32_note)
    sa_status = (extra.get("standalone") or {}).get("status", "")
    if sa_status.startswith("not built"):  # model.so still runs where the TVM runtime does; `sparsec run` here cannot
        info.setdefault("notes", []).append(
            f"the standalone aarch64 runtime (sparsec_run, libsparsec_model.so) is {sa_status}; lib/model.so needs the TVM "
            "runtime on the device, and `sparsec run --engine lib` cannot run it here")  # fmt: skip
    if console is not None:
        console.print(f"[dim]build: {info['kernels']} ({time.perf_counter() - t0:.1f}s)[/dim]")
    return info, files


def build_to_dir(graph: Graph, target: Target | str, out: str | os.PathLike, **kw) -> dict[str, Any]:
    """Build and write ``lib/`` files into ``out`` directly (tests, bench)."""
    info, writer = build(graph, target, strict=True, **kw)
    if writer is None:
        raise UnsupportedOpError(info.get("status", "not built"))
    Path(out).mkdir(parents=True, exist_ok=True)
    writer(Path(out))
    return info
