"""Run an artifact's compiled library (``lib/model.so``) with the TVM runtime (Relax VM) on the local device.

``run_lib(artifact, inputs) -> {output name: array}`` (used by ``sparsec run --engine lib|auto``).
:class:`LoadedLib` loads once and runs many times (``sparsec bench``).

Weights: the library's ``main`` takes the model inputs then every weight parameter. The parameters are built at load
time from the artifact's ``weights.safetensors`` + ``graph.json`` (the compressed formats) following
``lib/manifest.json``: a kernel's parameters by re-running that kernel's registered ``prepare`` (pure numpy: repacking
into the kernel's layout), node arrays (norm weights, embedding tables, biases), low-rank factors and graph constants
by name. Nothing is read from anywhere else, and the library holds no weights.

Devices: CPU targets run on the local CPU when the library's triple matches the machine; CUDA targets need a GPU
(TVM's CUDA runtime is loaded on demand and the fatbin embedded at build time is loaded as is; nothing is compiled).
"""
from __future__ import annotations

import json
import os
import platform
import re
import time
from pathlib import Path
from typing import Any

import numpy as np

from ..compressor.errors import ArtifactError, InputShapeError, ShapeError, ToolMissingError, UnsupportedOpError

LIB_SCHEMA = "sparsec.lib/1"


def cgroup_cpu_limit() -> int | None:
    """CPUs a container's CPU quota allows (cgroup v2 ``cpu.max``, v1 ``cfs_quota_us``), rounded up; None: no quota."""
    import math

    for quota_file, period_file in (("/sys/fs/cgroup/cpu.max", None),
                                    ("/sys/fs/cgroup/cpu/cpu.cfs_quota_us", "/sys/fs/cgroup/cpu/cpu.cfs_period_us")):  # fmt: skip
        try:
            parts = Path(quota_file).read_text().split()
            if period_file is not None:
                parts.append(Path(period_file).read_text().strip())
            quota, period = parts[0], parts[1]
        except (OSError, IndexError):
            continue
        if quota in ("max", "-1"):
            return None
        try:
            return max(1, math.ceil(int(quota) / int(period)))
        except (ValueError, ZeroDivisionError):
            return None
    return None


def physical_cores() -> int:
    """Physical cores among the CPUs this process may run on (hyper-threads of one core count once), at most what a
    container's CPU quota allows."""
    try:
        cpus = sorted(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1
    cores = set()
    for c in cpus:
        try:
            cores.add(Path(f"/sys/devices/system/cpu/cpu{c}/topology/thread_siblings_list").read_text().strip())
        except OSError:
            cores = set(cpus)
            break
    limit = cgroup_cpu_limit()
    return max(1, min(len(cores), limit) if limit else len(cores))


def default_cpu_threads() -> int:
    """The TVM runtime's CPU threads: ``TVM_NUM_THREADS`` when set, else one per physical core, written to the
    environment before TVM's thread pool starts. TVM's own default on x86 is half the logical CPUs (it assumes
    hyper-threading), which on machines without it (many VMs and CI runners: 2 vCPUs, 1 thread per core) ran every
    library on half the cores while onnxruntime used all of them."""
    if not os.environ.get("TVM_NUM_THREADS", "").strip():
        os.environ["TVM_NUM_THREADS"] = str(physical_cores())
    try:
        return max(1, int(os.environ["TVM_NUM_THREADS"]))
    except ValueError:
        return physical_cores()


def _artifact(a):
    from ..compressor.artifact import Artifact, load_artifact

    return a if isinstance(a, Artifact) else load_artifact(a)


def read_lib_manifest(lib_dir: Path) -> dict[str, Any]:
    p = Path(lib_dir) / "manifest.json"
    try:
        doc = json.loads(p.read_text())
    except FileNotFoundError:
        raise ArtifactError(f"{lib_dir.parent}: has no compiled library (lib/manifest.json is missing)")
    except (OSError, json.JSONDecodeError) as e:
        raise ArtifactError(f"{p}: cannot be read ({e})")
    if doc.get("schema") != LIB_SCHEMA:
        raise ArtifactError(f"{p}: library schema {doc.get('schema')!r}, this sparsec reads {LIB_SCHEMA!r}")
    return doc


def lib_runnable_here(manifest: dict[str, Any]) -> str | None:
    """Why this machine cannot run the library (None when it can, as far as we can tell without loading it)."""
    kind = manifest.get("kind")
    if kind == "cuda":
        try:
            import tvm  # noqa: F401

            from .cuda_build import load_cuda_runtime

            load_cuda_runtime()
            import tvm as _tvm

            if not _tvm.cuda(0).exist:
                return f"the library targets {manifest.get('target')} (CUDA) and this machine has no GPU"
        except ToolMissingError as e:
            return f"the library targets {manifest.get('target')} (CUDA): {e.message}"
        return None
    if manifest.get("standalone"):  # aarch64 / wasm: the C API library under qemu-aarch64 / node (backends/cross.py)
        from .cross import runner_missing

        return runner_missing(manifest)
    triple = str((manifest.get("tvm_target") or {}).get("mtriple", ""))
    machine = platform.machine()
    if triple and not triple.startswith(machine) and not (machine == "AMD64" and triple.startswith("x86_64")):
        return f"the library targets {triple} and this machine is {machine}"
    return None


def check_dim_ties(manifest: dict[str, Any], inputs: list[dict], feeds: dict[str, np.ndarray]) -> None:
    """Input dims the model requires equal though the inputs name them apart (the manifest's ``dim_ties``: an
    attention mask as long as the token ids): a bad-input error naming both, before the library runs."""
    ties = manifest.get("dim_ties") or {}
    if not ties:
        return
    seen: dict[str, tuple[str, int, int]] = {}
    for spec in inputs:
        x = feeds.get(spec["name"])
        if x is None:
            continue
        for i, d in enumerate(spec["shape"]):
            if isinstance(d, str) and i < np.ndim(x):
                seen.setdefault(d, (spec["name"], i, int(np.shape(x)[i])))
    for d, root in ties.items():
        if d in seen and root in seen and seen[d][2] != seen[root][2]:
            (na, ia, sa), (nb, ib, sb) = seen[root], seen[d]
            raise InputShapeError(f"input {nb!r} has size {sb} in dim {ib} and input {na!r} {sa} in dim {ia}: the model "
                                  "needs them equal")  # fmt: skip


def check_runnable_here(manifest: dict[str, Any], prefix: str = "") -> None:
    """Raise when this machine cannot run the library: a standalone runtime that was not built (an operator it lacks,
    the same on every machine: :class:`UnsupportedOpError`), else a missing GPU / runner (:class:`ToolMissingError`)."""
    why = lib_runnable_here(manifest)
    if why is None:
        return
    if str((manifest.get("standalone") or {}).get("status", "")).startswith("not built"):
        raise UnsupportedOpError(prefix + why + "; run it with --engine onnx")
    raise ToolMissingError(prefix + why)


class LoadedLib:
    """A loaded library with its parameters bound: ``run(feeds) -> outputs``."""

    def __init__(self, artifact=None, *, lib_dir=None, graph=None):
        """From an artifact directory, or from a ``lib/`` directory plus the graph whose weights it binds."""
        import tvm
        from tvm.runtime.vm import VirtualMachine  # not tvm.relax: that package needs the compiler library

        if artifact is not None:
            a = _artifact(artifact)
            lib_dir, graph, root = a.lib_dir, a.graph, a.path
        else:
            lib_dir, root = Path(lib_dir), Path(lib_dir).parent
        self.lib_dir = Path(lib_dir)
        self.manifest = read_lib_manifest(self.lib_dir)
        check_runnable_here(self.manifest)
        kind = self.manifest["kind"]
        if kind == "cuda":
            from .cuda_build import install_loader

            install_loader()
            self.dev = tvm.cuda(0)
        else:
            default_cpu_threads()
            self.dev = tvm.cpu(0)
        path = self.lib_dir / self.manifest.get("library", "model.so")
        if not path.exists():
            raise ArtifactError(f"{root}: {path.relative_to(root)} is missing")
        try:
            self.lib = tvm.runtime.load_module(str(path))
        except Exception as e:  # noqa: BLE001
            raise ArtifactError(f"{path}: cannot be loaded by the TVM runtime ({str(e).strip().splitlines()[-1][:200]})")
        self.vm = VirtualMachine(self.lib, self.dev)
        self.params = [tvm.runtime.tensor(arr, self.dev) for arr in build_params(graph, self.manifest)]
        self.inputs = self.manifest["inputs"]
        self.outputs = self.manifest["outputs"]

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import tvm

        args = []
        limits = self.manifest.get("dim_limits", {})
        check_dim_ties(self.manifest, self.inputs, feeds)
        for spec in self.inputs:
            name = spec["name"]
            if name not in feeds:
                raise InputShapeError(f"missing input {name!r}; the model's inputs are {[s['name'] for s in self.inputs]}")
            x = np.asarray(feeds[name])
            if x.ndim != len(spec["shape"]):
                raise InputShapeError(f"input {name!r} has rank {x.ndim}, the model expects {len(spec['shape'])}")
            for i, (got, want) in enumerate(zip(x.shape, spec["shape"])):
                if isinstance(want, int) and got != want:
                    raise InputShapeError(f"input {name!r} has size {got} in dim {i}, the model expects {want}")
                if isinstance(want, str) and want in limits and got > limits[want][0]:
                    raise InputShapeError(f"input {name!r} has size {got} in dim {i}; the model supports at most "
                                     f"{limits[want][0]} there ({limits[want][1]})")  # fmt: skip
            if x.dtype != np.dtype(spec["dtype"]):
                if x.dtype.kind != np.dtype(spec["dtype"]).kind:
                    raise InputShapeError(f"input {name!r} is {x.dtype}, the model expects {spec['dtype']}")
                x = x.astype(spec["dtype"])
            rng = self.manifest.get("input_ranges", {}).get(name)
            if rng is not None and x.size and (int(x.min()) < rng[0] or int(x.max()) >= rng[1]):
                raise InputShapeError(f"input {name!r}: token ids must be in [0, {rng[1]}), got values in [{int(x.min())}, {int(x.max())}]")
            args.append(tvm.runtime.tensor(np.require(x, requirements="C"), self.dev))
        try:
            out = self.vm["main"](*args, *self.params)
        except Exception as e:  # noqa: BLE001 - a size check inside the library (lower.py: reshape_guard, unify_broadcast)
            msg = " ".join(str(e).split())
            if "match_cast" not in msg:
                raise
            why = re.search(r"Check failed: [^:]*\(([^)]*)\)", msg)
            raise InputShapeError("these inputs give a size inside the model that it does not take (a size the export "
                                  f"fixed{': ' + why.group(1) if why else ''}; see the build notes in report.json)") from None
        outs = _flatten_outputs(out)
        if len(outs) != len(self.outputs):
            raise ArtifactError(f"the library returned {len(outs)} outputs for {len(self.outputs)} names")
        return dict(zip(self.outputs, outs))

    def timer(self, feeds: dict[str, np.ndarray]):
        """A zero-argument callable running the model once on ``feeds`` already on the device (for timing)."""
        import tvm

        args = [tvm.runtime.tensor(np.require(np.asarray(feeds[s["name"]]).astype(s["dtype"]), requirements="C"), self.dev) for s in self.inputs]
        # a closure with the arguments bound once (no per-call argument conversion), as a deployment would call it
        self.vm.save_function("main", "__sparsec_timed", *args, *self.params)
        f = self.vm["__sparsec_timed"]
        dev = self.dev

        def call():
            f()
            dev.sync()

        return call


def _flatten_outputs(out) -> list[np.ndarray]:
    if hasattr(out, "numpy"):
        return [out.numpy()]
    res = []
    for o in out:
        res.extend(_flatten_outputs(o))
    return res


# ----------------------------------------------------------------------------------------------------------------
def _find_node(graph, name: str):
    from ..compressor.ir import iter_all_nodes

    for n in iter_all_nodes(graph):
        if n.name == name:
            return n
    raise ArtifactError(f"the library needs node {name!r}, which is not in graph.json")


def _descend(weight, path):
    for p in path:
        weight = getattr(weight, p)
    return weight


def build_params(graph, manifest: dict[str, Any]) -> list[np.ndarray]:
    """The library's weight parameters, in order, from the artifact's graph (see the module docstring)."""
    from ..compressor.ir import Linear
    from .kernels.registry import get_prepare

    cache: dict[tuple, list[np.ndarray]] = {}
    out: list[np.ndarray] = []
    for p in manifest["params"]:
        src = p["source"]
        kind = src["kind"]
        if kind == "kernel":
            key = (src["linear"], tuple(src["path"]), src["kernel"], json.dumps(src["config"], sort_keys=True))
            arrays = cache.get(key)
            if arrays is None:
                lin = _find_node(graph, src["linear"])
                w = _descend(lin.weight, src["path"])
                view = lin if not src["path"] else Linear(lin.name, lin.inputs, lin.outputs, weight=w, bias=lin.bias)
                try:
                    prep = get_prepare(src["kernel"])
                except KeyError as e:
                    raise ArtifactError(f"the library uses kernel {src['kernel']!r}, unknown to this sparsec ({e})")
                arrays = [np.require(a, requirements="C") for a in prep(view, src["config"])]
                cache[key] = arrays
            a = arrays[src["index"]]
        elif kind == "node":
            n = _find_node(graph, src["node"])
            v = n.params().get(src["role"])
            if v is None:
                raise ArtifactError(f"node {src['node']!r} has no {src['role']}")
            a = np.asarray(v)
        elif kind == "conv_weight":
            n = _find_node(graph, src["node"])
            if not hasattr(n, "kernel_weight"):
                raise ArtifactError(f"node {src['node']!r} is not a convolution")
            a = n.kernel_weight()
        elif kind == "lowrank":
            lin = _find_node(graph, src["linear"])
            lr = _descend(lin.weight, src["path"])
            a = lr.b.T if src["factor"] == "b_t" else lr.a.T
        elif kind == "constant":
            if src["name"] not in graph.constants:
                raise ArtifactError(f"constant {src['name']!r} is missing from graph.json")
            a = graph.constants[src["name"]]
        else:
            raise ArtifactError(f"unknown parameter source {kind!r} in lib/manifest.json")
        a = np.require(np.asarray(a).astype(p["dtype"], copy=False), requirements="C")
        if list(a.shape) != list(p["shape"]):
            raise ArtifactError(f"parameter {p['name']}: built {list(a.shape)}, the library expects {p['shape']}")
        out.append(a)
    return out


_CACHE: dict[str, LoadedLib] = {}


def load_lib(artifact) -> LoadedLib:
    a = _artifact(artifact)
    key = os.path.realpath(a.path)
    st = (a.lib_dir / "model.so").stat().st_mtime_ns if (a.lib_dir / "model.so").exists() else 0
    cached = _CACHE.get(key)
    if cached is not None and getattr(cached, "_stamp", None) == st:
        return cached
    lib = LoadedLib(a)
    lib._stamp = st  # type: ignore[attr-defined]
    _CACHE[key] = lib
    return lib


def run_lib(artifact, inputs: dict[str, np.ndarray], times: dict[str, float] | None = None) -> dict[str, np.ndarray]:
    """Run the artifact's compiled library on ``inputs`` (name -> array); returns name -> array. ``times`` gets
    ``"load"``: the seconds loading the library took (not for a standalone library: one subprocess loads and runs it)."""
    a = _artifact(artifact)
    manifest = read_lib_manifest(a.lib_dir)
    if manifest.get("standalone"):  # aarch64 (qemu-aarch64) / wasm (node): backends/cross.py
        from .cross import run_standalone

        check_runnable_here(manifest)
        return run_standalone(a.lib_dir, manifest, inputs)[0]
    t0 = time.perf_counter()
    lib = load_lib(a)
    if times is not None:
        times["load"] = time.perf_counter() - t0
    return lib.run(inputs)
