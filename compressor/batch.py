"""Batch mode: many models x recipes x targets from one YAML job file, in parallel processes, with a
content-addressed cache and quality thresholds (``sparsec batch jobs.yaml``; reference in docs/ci.md).

Job file::

    defaults:            # optional: keys every job inherits (a job's own keys win)
      target: x86
      seed: 0
    jobs:
      - model: models/bert.onnx      # or  example: tiny-gpt
        nm: "2:4"                    # keys are the long `sparsec compress` flags with underscores
        method: sparsegpt
        calib: data/calib.npz        # relative paths are resolved against the job file's directory
        max_error: 0.05              # thresholds: max_error, max_ppl_increase, max_accuracy_drop, min_size_reduction
      - model: models/gpt.onnx
        recipe: recipes/int4.yaml    # a recipe file; flags given too override it (as on the command line)
        target: wasm

Exit status of the run (see :func:`exit_code`): 0 every job passed its thresholds, 1 a threshold failed,
2 a job errored (an error outranks a threshold failure). An invalid job file is a RecipeError (exit 6) before any
job runs.

Cache key (:func:`job_key`): sha256 of the model's bytes (with every external-data file an ONNX model references,
or the embedded example's weights), the calibration data's bytes, the normalized recipe (thresholds excluded:
they are checked against the cached report, so changing one does not recompute), the target, the seed and the
sparsec version. A cache entry is a complete artifact directory, verified against its manifest before reuse.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import OutputError, RecipeError, SparsecError
from .artifact import temp_sibling

BATCH_SCHEMA = "sparsec.batch/1"

# job key -> expected type. Keys are `sparsec compress`'s long flags with underscores (see cli/main.py).
FLAG_KEYS: dict[str, str] = {
    "nm": "str", "method": "str", "include": "strlist", "exclude": "strlist", "quant": "str", "group_size": "int",
    "quant_method": "str", "symmetric": "bool", "act_order": "bool", "gqsa": "str", "auto_bits": "float",
    "compensate": "str", "rank": "int", "slice": "float", "merge_experts": "float", "merge_method": "str",
}  # fmt: skip
RECIPE_OPTION_KEYS: dict[str, str] = {
    "target": "str", "seed": "int", "calib": "path", "calib_samples": "int", "seq_len": "int", "heldout": "float",
    "batch_size": "int", "device": "str", "no_build": "bool", "recipe": "path",
}  # fmt: skip
THRESHOLD_KEYS: dict[str, str] = {
    "max_error": "float",  # relative output error on held-out calibration data
    "max_ppl_increase": "float",  # reference models: (perplexity / original perplexity) - 1
    "max_accuracy_drop": "float",  # reference models: original accuracy - accuracy (absolute)
    "min_size_reduction": "float",  # model bytes before / after
}
JOB_KEYS: dict[str, str] = {"name": "str", "model": "path", "example": "str", **RECIPE_OPTION_KEYS, **FLAG_KEYS, **THRESHOLD_KEYS}
TOP_KEYS = {"jobs", "defaults"}


@dataclass
class Job:
    index: int
    name: str
    options: dict[str, Any]  # validated job keys (paths absolute)
    recipe: Any = None  # compressor.pipeline.Recipe (thresholds not in it)
    thresholds: dict[str, float] = field(default_factory=dict)
    key: str = ""

    @property
    def model_label(self) -> str:
        o = self.options
        return f"example:{o['example']}" if o.get("example") else os.path.basename(o.get("model", "?"))


# ----------------------------------------------------------------------------------------------------------------
# job file
def _coerce(value: Any, typ: str, where: str, base: Path) -> Any:
    if typ == "str":
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise RecipeError(f"{where}: expected a string, got {value!r}")
        return str(value)
    if typ == "path":
        if not isinstance(value, str) or not value:
            raise RecipeError(f"{where}: expected a path (string), got {value!r}")
        p = Path(os.path.expanduser(value))
        return str(p if p.is_absolute() else (base / p))
    if typ == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise RecipeError(f"{where}: expected an integer, got {value!r}")
        return value
    if typ == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise RecipeError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if typ == "bool":
        if not isinstance(value, bool):
            raise RecipeError(f"{where}: expected true or false, got {value!r}")
        return value
    if typ == "strlist":
        if isinstance(value, str):
            return [value]
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return list(value)
        raise RecipeError(f"{where}: expected a string or a list of strings, got {value!r}")
    raise AssertionError(typ)  # pragma: no cover


def _check_keys(d: dict, where: str, base: Path) -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if k not in JOB_KEYS:
            import difflib

            close = difflib.get_close_matches(str(k), list(JOB_KEYS), n=1)
            hint = f"; did you mean '{close[0]}'?" if close else f"; valid keys: {', '.join(sorted(JOB_KEYS))}"
            raise RecipeError(f"{where}: unknown key '{k}'{hint}")
        if k == "nm" and isinstance(v, int) and not isinstance(v, bool):
            # YAML 1.1 reads an unquoted 2:4 as the sexagesimal integer 124
            raise RecipeError(f"{where}.nm: write N:M in quotes, e.g. nm: \"2:4\" (YAML reads an unquoted 2:4 as the number {v})")
        if v is None:
            continue
        out[k] = _coerce(v, JOB_KEYS[k], f"{where}.{k}", base)
    return out


def load_jobs(path: str | os.PathLike, *, no_build: bool = False) -> list[Job]:
    """Parse and validate a job file: every job's recipe is built and its passes instantiated (so bad keys and
    values are reported, naming the job, before anything runs)."""
    import yaml

    path = Path(path)
    where = str(path)
    try:
        with open(path) as f:
            doc = yaml.safe_load(f)
    except FileNotFoundError:
        raise RecipeError(f"{where}: no such job file")
    except IsADirectoryError:
        raise RecipeError(f"{where}: is a directory, not a job file")
    except UnicodeDecodeError:
        raise RecipeError(f"{where}: not a text file")
    except yaml.YAMLError as e:
        raise RecipeError(f"{where}: not valid YAML ({' '.join(str(e).split())[:200]})")
    if not isinstance(doc, dict) or "jobs" not in doc:
        raise RecipeError(f"{where}: expected a mapping with a 'jobs' list (and optional 'defaults')")
    unknown = sorted(set(map(str, doc)) - TOP_KEYS)
    if unknown:
        raise RecipeError(f"{where}: unknown top-level key(s) {unknown}; valid: jobs, defaults")
    base = path.resolve().parent
    defaults = doc.get("defaults") or {}
    if not isinstance(defaults, dict):
        raise RecipeError(f"{where}: defaults: must be a mapping of job keys")
    defaults = _check_keys(defaults, f"{where}: defaults", base)
    raw = doc["jobs"]
    if not isinstance(raw, list) or not raw:
        raise RecipeError(f"{where}: jobs: must be a non-empty list")
    jobs: list[Job] = []
    names: set[str] = set()
    for i, j in enumerate(raw):
        jw = f"{where}: jobs[{i}]"
        if not isinstance(j, dict):
            raise RecipeError(f"{jw}: must be a mapping of job keys, got {type(j).__name__}")
        opts = {**defaults, **_check_keys(j, jw, base)}
        if ("model" in opts) == ("example" in opts):
            raise RecipeError(f"{jw}: give exactly one of 'model' (a file) or 'example' (tiny-gpt, tiny-moe, digits)")
        if no_build:
            opts["no_build"] = True
        name = opts.get("name") or f"{i:02d}-" + Path(opts.get("model") or opts.get("example")).name.split(".")[0]
        if not name or "/" in name or name.startswith(".") or name in names:
            raise RecipeError(f"{jw}.name: {name!r} must be a unique, non-empty file name")
        names.add(name)
        job = Job(i, name, opts)
        try:
            job.thresholds = {k: opts[k] for k in THRESHOLD_KEYS if k in opts}
            for k, v in job.thresholds.items():
                if v < 0:
                    raise RecipeError(f"{k}: must be >= 0, got {v}")
            if job.thresholds.get("min_size_reduction", 1.0) < 1.0:
                raise RecipeError(f"min_size_reduction: a ratio of model bytes before/after (e.g. 1.5 = 1.5x smaller), "
                                  f"must be >= 1, got {job.thresholds['min_size_reduction']}")  # fmt: skip
        except RecipeError as e:
            raise RecipeError(f"{jw} ({name}): {e.message}", hint=e.hint)
        jobs.append(job)
    # second phase (imports the passes): recipes and pass parameters, once every job's keys are known to be valid
    for job in jobs:
        try:
            job.recipe = recipe_for(job.options)
        except RecipeError as e:
            raise RecipeError(f"{where}: jobs[{job.index}] ({job.name}): {e.message}", hint=e.hint)
    return jobs


def recipe_for(opts: dict[str, Any]):
    """A job's options -> Recipe, through the same code as `sparsec compress` (cli/main.py build_recipe)."""
    from sparsec.backends.targets import get_target
    from sparsec.cli.main import build_recipe, parse_quant
    from sparsec.compressor.pipeline import build_passes

    flags = {k: opts.get(k) for k in FLAG_KEYS}
    if flags.get("quant") is not None:
        flags["quant"] = parse_quant(flags["quant"])
    r = build_recipe(opts.get("recipe"), opts.get("target"), opts.get("seed"), opts.get("calib"), opts.get("calib_samples"),
                     opts.get("seq_len"), opts.get("heldout"), opts.get("batch_size"), None, opts.get("device"), flags)  # fmt: skip
    if opts.get("no_build"):
        r.build = False
    r.max_error = None  # thresholds are checked by batch against the report (cached or not)
    get_target(r.target)  # unknown target -> RecipeError now
    from sparsec.compressor.executor import resolve_device

    resolve_device(r.device)  # a device this torch cannot use -> RecipeError now
    build_passes(r)  # unknown pass params / invalid combinations -> RecipeError now
    return r


# ----------------------------------------------------------------------------------------------------------------
# cache key
def _hash_file(h, path: str) -> None:
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)


def _model_files(path: str) -> list[str]:
    """The model file and, for ONNX, every external-data file it references (sorted, unique)."""
    files = [path]
    if path.endswith(".onnx"):
        try:
            import onnx

            m = onnx.load(path, load_external_data=False)
        except Exception:  # noqa: BLE001 - not loadable: compress reports it; hash the bytes we have
            return files
        locs = set()

        def visit(g):
            for t in list(g.initializer) + [a.t for n in g.node for a in n.attribute if a.HasField("t")]:
                if t.data_location == onnx.TensorProto.EXTERNAL:
                    for e in t.external_data:
                        if e.key == "location":
                            locs.add(e.value)
            for n in g.node:
                for a in n.attribute:
                    if a.HasField("g"):
                        visit(a.g)
                    for sg in a.graphs:
                        visit(sg)

        visit(m.graph)
        base = os.path.dirname(os.path.abspath(path))
        files += [os.path.join(base, loc) for loc in sorted(locs)]
    return files


def _hash_data(h, path: str) -> None:
    if os.path.isdir(path):
        for root, dirs, names in os.walk(path):
            dirs.sort()
            for n in sorted(names):
                p = os.path.join(root, n)
                h.update(os.path.relpath(p, path).encode() + b"\0")
                _hash_file(h, p)
    else:
        _hash_file(h, path)


def job_key(job: Job) -> str:
    from sparsec import __version__

    h = hashlib.sha256()
    h.update(f"sparsec {__version__}\0".encode())
    o = job.options
    if o.get("example"):
        from sparsec.golden import models as gm

        h.update(f"example:{o['example']}\0".encode())
        _hash_file(h, gm.weights_path(o["example"]))
    else:
        for f in _model_files(o["model"]):
            h.update(b"model\0")
            if os.path.exists(f):
                _hash_file(h, f)
            else:
                h.update(b"<missing>")
    rec = job.recipe.to_dict()
    data = rec["calibration"].get("data")
    if data is not None:
        h.update(b"calib\0")
        if os.path.exists(data):
            _hash_data(h, data)
        rec["calibration"]["data"] = "<hashed>"
    rec.pop("max_error", None)
    h.update(json.dumps(rec, sort_keys=True, default=str).encode())
    h.update(f"\0target {job.recipe.target}\0seed {job.recipe.seed}".encode())
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------------------------
# thresholds
def check_thresholds(report: dict[str, Any], thresholds: dict[str, float]) -> list[dict[str, Any]]:
    """One entry per threshold: {name, limit, value, ok, message}. A threshold whose figure the report does not
    have (e.g. max_ppl_increase on a model that is not a reference model) fails, saying why."""
    q = report.get("quality") or {}
    m = report.get("model") or {}
    out = []

    def num(x):
        return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) else (math.inf if x in ("inf", "nan") else None)

    for name, limit in thresholds.items():
        value, what = None, ""
        if name == "max_error":
            value, what = num(q.get("output_rel_error")), "output relative error"
            if value is None and not (report.get("passes") or []):
                value = 0.0  # nothing was compressed
        elif name == "max_ppl_increase":
            p, p0 = num(q.get("perplexity")), num(q.get("perplexity_original"))
            value, what = ((p / p0 - 1.0) if p is not None and p0 else None), "perplexity increase"
        elif name == "max_accuracy_drop":
            a, a0 = num(q.get("accuracy")), num(q.get("accuracy_original"))
            value, what = ((a0 - a) if a is not None and a0 is not None else None), "accuracy drop"
        elif name == "min_size_reduction":
            b0, b1 = num(m.get("bytes")), num(m.get("bytes_after"))
            value, what = ((b0 / b1) if b0 and b1 else None), "size reduction (bytes before/after)"
        if value is None:
            out.append({"name": name, "limit": limit, "value": None, "ok": False,
                        "message": f"{name}: the report has no {what} to check"})  # fmt: skip
            continue
        ok = value >= limit if name.startswith("min_") else value <= limit
        rel = ">=" if name.startswith("min_") else "<="
        out.append({"name": name, "limit": limit, "value": value, "ok": bool(ok),
                    "message": f"{what} {value:.4g} {'' if ok else 'not '}{rel} {name} {limit:g}"})  # fmt: skip
    return out


# ----------------------------------------------------------------------------------------------------------------
# running
def _copy_artifact(src: Path, dst: Path) -> None:
    """Copy an artifact directory atomically (temp sibling, then rename; an existing artifact at dst is replaced)."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(dst.parent, dst.name)
    try:
        shutil.copytree(src, tmp, dirs_exist_ok=True)
        if dst.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{dst.name}.old-", dir=dst.parent))
            old.rmdir()
            os.rename(dst, old)
            os.rename(tmp, dst)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _check_job_output(out: Path) -> None:
    """Batch replaces its own job directories, but never a directory that is not a sparsec artifact."""
    from .artifact import not_an_artifact

    if not out.exists():
        return
    why = "not a directory" if not out.is_dir() else not_an_artifact(out) if any(out.iterdir()) else ""
    if why:
        raise OutputError(f"{out}: exists and is not a sparsec artifact ({why}; batch replaces only its own job outputs)")


def run_job(job: Job, out_dir: str, cache_dir: str | None, threads: int | None = None) -> dict[str, Any]:
    """Run (or reuse from the cache) one job. Never raises for user errors: they become status 'error'."""
    t0 = time.perf_counter()
    res: dict[str, Any] = {"index": job.index, "name": job.name, "model": job.model_label, "target": job.recipe.target,
                           "key": job.key, "cached": False, "out": str(Path(out_dir) / job.name)}  # fmt: skip
    try:
        if threads:
            import torch

            torch.set_num_threads(threads)
        from .artifact import load_artifact

        out = Path(out_dir) / job.name
        _check_job_output(out)
        entry = Path(cache_dir) / job.key if cache_dir else None
        report = None
        if entry is not None and entry.is_dir():
            try:
                a = load_artifact(entry, verify=True)
                report = a.report
            except SparsecError:
                shutil.rmtree(entry, ignore_errors=True)  # a damaged entry: recompute
                report = None
            if report is not None:
                _copy_artifact(entry, out)
                res["cached"] = True
        if report is None:
            from .compress import compress, load_model

            src = load_model(job.options.get("model"), example=job.options.get("example"))
            result = compress(src, job.recipe, out, force=out.exists(), console=None, progress=False)
            report = result.report
            if entry is not None:
                try:
                    if not entry.exists():
                        _copy_artifact(out, entry)
                except OSError:
                    pass  # cache is best effort (read-only cache dir, races between identical jobs)
        checks = check_thresholds(report, job.thresholds)
        res["thresholds"] = checks
        res["status"] = "passed" if all(c["ok"] for c in checks) else "failed"
        q = report.get("quality") or {}
        m = report.get("model") or {}
        res["quality"] = {k: q[k] for k in ("output_rel_error", "output_cosine", "perplexity", "perplexity_original",
                                             "accuracy", "accuracy_original") if k in q}  # fmt: skip
        res["bytes"] = m.get("bytes")
        res["bytes_after"] = m.get("bytes_after")
        res["size_reduction"] = (m["bytes"] / m["bytes_after"]) if m.get("bytes") and m.get("bytes_after") else None
    except SparsecError as e:
        res.update(status="error", error=e.one_line(), error_exit_code=e.exit_code)
    except Exception as e:  # noqa: BLE001 - a bug in sparsec: report it for this job, keep the batch going
        first = str(e).splitlines()[0] if str(e) else ""
        res.update(status="error", error=f"internal error: {type(e).__name__}: {first}", error_exit_code=70)
    res["seconds"] = round(time.perf_counter() - t0, 3)
    return res


_STOP = None  # in a worker: the batch's stop event (multiprocessing.Event), set once the batch is interrupted


def _init_worker(stop=None):  # pragma: no cover - runs in the worker processes
    import signal

    from .interrupt import enable

    global _STOP
    _STOP = stop
    # between jobs a Ctrl-C is ignored and SIGTERM (run_batch interrupted) ends the process quietly; a job installs
    # the handlers that unwind it (_run_job_in_worker)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    enable()  # _run_job_in_worker ends the process when a build thread is abandoned


def _run_job_in_worker(job: Job, out_dir: str, cache_dir: str | None, threads: int | None = None) -> dict[str, Any]:  # pragma: no cover
    """:func:`run_job` in a worker process. Interrupted while a build thread was left running (compressor/interrupt.py),
    the process ends at once: finalizing the interpreter under that thread aborts noisily. Once the batch is
    interrupted (the stop event: set by the parent, or by a worker a Ctrl-C reached) no job starts: a job the pool had
    already queued to this worker would otherwise run to its end after the Ctrl-C."""
    import signal

    from . import interrupt

    if _STOP is not None and _STOP.is_set():
        raise KeyboardInterrupt("batch interrupted: job not started")
    signal.signal(signal.SIGINT, signal.default_int_handler)
    interrupt.handle_sigterm()  # terminated by the parent (run_batch interrupted): unwind, removing the staging directory
    try:
        return run_job(job, out_dir, cache_dir, threads)
    except KeyboardInterrupt as e:
        if _STOP is not None:
            _STOP.set()
        interrupt.exit_if_abandoned(interrupt.exit_code(e))
        raise
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def run_batch(jobs: list[Job], out_dir: str | os.PathLike, cache_dir: str | os.PathLike | None, workers: int = 1,
              on_done=None) -> list[dict[str, Any]]:  # fmt: skip
    """Run jobs in ``workers`` processes (inline when 1). Results in job order."""
    out_dir = str(Path(out_dir).resolve())
    cache = str(Path(cache_dir).resolve()) if cache_dir is not None else None
    for j in jobs:
        j.key = job_key(j)
    try:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        if cache:
            Path(cache).mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"{e.filename or out_dir}: cannot create ({e.strerror or e})")
    results: dict[int, dict[str, Any]] = {}
    if workers <= 1 or len(jobs) == 1:
        for j in jobs:
            results[j.index] = r = run_job(j, out_dir, cache)
            if on_done:
                on_done(r)
    else:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor, as_completed

        threads = max(1, (os.cpu_count() or 1) // workers)
        ctx = mp.get_context("spawn")
        stop = ctx.Event()
        ex = ProcessPoolExecutor(max_workers=min(workers, len(jobs)), mp_context=ctx, initializer=_init_worker, initargs=(stop,))
        try:
            futs = {ex.submit(_run_job_in_worker, j, out_dir, cache, threads): j for j in jobs}
            for f in as_completed(futs):
                j = futs[f]
                try:
                    r = f.result()
                except Exception as e:  # noqa: BLE001 - a worker died (killed, out of memory)
                    r = {"index": j.index, "name": j.name, "model": j.model_label, "target": j.recipe.target, "key": j.key,
                         "cached": False, "status": "error", "error": f"worker process failed: {type(e).__name__}: {e}",
                         "error_exit_code": 70}  # fmt: skip
                results[j.index] = r
                if on_done:
                    on_done(r)
        except BaseException:
            # a SIGTERM reached this process only (a Ctrl-C reaches the workers too): stop the jobs still running, or
            # the interpreter's exit would wait for them (shutdown forgets the processes: take them first); no worker
            # starts a job it had already been handed
            stop.set()
            procs = list((getattr(ex, "_processes", None) or {}).values())
            ex.shutdown(wait=False, cancel_futures=True)
            for proc in procs:
                if proc.is_alive():
                    proc.terminate()
            raise
        ex.shutdown(wait=True)
    return [results[j.index] for j in jobs]


def exit_code(results: list[dict[str, Any]]) -> int:
    if any(r["status"] == "error" for r in results):
        return 2
    if any(r["status"] == "failed" for r in results):
        return 1
    return 0


def summary(results: list[dict[str, Any]], job_file: str, out_dir: str, cache_dir: str | None) -> dict[str, Any]:
    from sparsec import __version__

    return {
        "schema": BATCH_SCHEMA,
        "sparsec_version": __version__,
        "job_file": str(job_file),
        "out": str(out_dir),
        "cache": str(cache_dir) if cache_dir else None,
        "jobs": results,
        "counts": {s: sum(r["status"] == s for r in results) for s in ("passed", "failed", "error")}
        | {"cached": sum(bool(r.get("cached")) for r in results)},
        "exit_code": exit_code(results),
    }


def write_summary(doc: dict[str, Any], path: str | os.PathLike) -> None:
    p = Path(path)
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_name(f".{p.name}.tmp")
        tmp.write_text(json.dumps(doc, indent=1, sort_keys=True))
        os.replace(tmp, p)
    except OSError as e:
        raise OutputError(f"{p}: cannot write the summary ({e.strerror or e})")


def _quality_cell(q: dict[str, Any]) -> str:
    if "perplexity" in q and "perplexity_original" in q:
        return f"ppl {q['perplexity_original']:.4g}->{q['perplexity']:.4g}"
    if "accuracy" in q and "accuracy_original" in q:
        return f"acc {q['accuracy_original']:.3f}->{q['accuracy']:.3f}"
    return "-"


def render_summary(doc: dict[str, Any], console) -> None:
    from rich.table import Table

    t = Table(title=f"sparsec batch: {doc['job_file']}", title_justify="left")
    for c, j in (("#", "right"), ("job", "left"), ("model", "left"), ("target", "left"), ("status", "left"),
                 ("out err", "right"), ("quality", "left"), ("size", "right"), ("s", "right")):  # fmt: skip
        t.add_column(c, justify=j, overflow="fold")
    style = {"passed": "green", "failed": "red", "error": "bold red"}
    notes = []
    for r in doc["jobs"]:
        q = r.get("quality") or {}
        err = q.get("output_rel_error")
        st = f"[{style[r['status']]}]{r['status']}[/]" + (" (cached)" if r.get("cached") else "")
        if r["status"] == "error":
            notes.append(f"[{r['index']}] {r['name']}: {r.get('error', '')}")
        for c in r.get("thresholds", []):
            if not c["ok"]:
                notes.append(f"[{r['index']}] {r['name']}: {c['message']}")
        t.add_row(str(r["index"]), r["name"], r["model"], r["target"], st,
                  f"{err:.4g}" if isinstance(err, (int, float)) else "-", _quality_cell(q),
                  f"x{r['size_reduction']:.2f}" if r.get("size_reduction") else "-", f"{r.get('seconds', 0):.1f}")  # fmt: skip
    c = doc["counts"]
    t.caption = f"{c['passed']} passed, {c['failed']} failed, {c['error']} errored; {c['cached']} from cache; exit {doc['exit_code']}"
    # CI logs are not terminals (rich assumes 80 columns there) and do not wrap: use a readable width
    if not console.is_terminal and console.width < 132:
        from rich.console import Console

        console = Console(file=console.file, width=132, no_color=console.no_color, force_terminal=False)
    console.print(t)
    for n in notes:
        console.print(n, markup=False, highlight=False)
