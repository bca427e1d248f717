"""``sparsec tune --target h100|a100``: schedule search of the hand-written CUDA kernels on the local GPU.

For every distinct (kernel, Linear shape, format) of a graph that a CUDA build would lower to one of the kernels of
:mod:`sparsec.backends.kernels.cuda_sparse` (``cuda.nm24_mma_sp``, ``cuda.nm24_int4_mma_sp``,
``cuda.int4_dequant_mma``), each of the three paths is searched independently (they serve disjoint token counts):

==============  ===========================  ================================================================
path            serves                       timed at (unless ``--m`` names token counts of that path)
==============  ===========================  ================================================================
``gemv``        M <= 16 (decode)             M = 1, 16
``gemm_small``  16 < M <= 128                M = 128
``gemm``        M > 128 (prefill)            M = 2048 (512 for layers with fewer than 2^20 weights)
==============  ===========================  ================================================================

Candidates: the default config (:func:`cuda_sparse.default_config`, always first, so it always competes) and up to
``max_candidates - 1`` configs of :func:`cuda_sparse.search_space` per path (seeded shuffle). All candidates are
compiled into ONE shared library (:func:`cuda_compile.build_shared`, SASS for the target's arch), loaded with
``tvm_ffi.load_module``, and every candidate is first checked on each layer shape against a float64 numpy reference
(fresh random activations, output poisoned with NaN: relative error <= 1e-2 and every output written); a wrong
candidate is rejected and reported. Times are medians of per-call CUDA-event timings (``cuEventRecord`` /
``cuEventElapsedTime`` through ctypes on libcuda: no torch needed) with a 256 MiB buffer cleared before every call so
that the weights are not L2-resident (as in inference, and as in ``bench/bench_cuda.py``). The winner of a path is the
candidate with the least summed time over the path's M values; the entry recorded in the tuning database (the user's,
or ``golden/tuning/<target>.json`` with ``--ship``) is keyed exactly as the build looks it up
(:func:`registry.linear_key` with ``act_dtype`` float16) and holds the config, the measured times (``ms``, per path
and M), the default's times (``default_ms``), the candidates tried, the rejected ones, the device name and ``"tuned":
true``.

The warp-specialized TMA candidates (``"ws": 1``, H100 only) that were checked on an H100 (``VERIFIED_WS`` in
kernels/cuda_sparse.py; the sm_90a default is one of them) are searched like the others. A ws config not checked on a
GPU yet may hang it: such configs are left out unless ``--include-unverified`` (or ``SPARSEC_TUNE_UNVERIFIED=1``);
then each runs in its own subprocess, killed after ``SPARSEC_TUNE_ISOLATED_TIMEOUT`` seconds (default 120) and
rejected as "timeout".

The measurement primitives (:func:`time_call` with its timers, :func:`judge`, :func:`candidate_configs`) are shared
with ``bench/bench_cuda.py`` (whose device step uses torch tensors).
"""
from __future__ import annotations

import ctypes
import json
import math
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

PATHS = ("gemv", "gemm_small", "gemm")
REL_TOL = 1e-2  # relative error vs float64 accepted for fp16 activations / fp32 accumulation
PATH_CHECK_M = {"gemv": 13, "gemm_small": 37, "gemm": 300}  # odd token counts: the tails of each path
DEFAULT_PATH_M = {"gemv": (1, 16), "gemm_small": (128,), "gemm": (2048,)}
SMALL_LAYER = 1 << 20  # weights; below: the large GEMM is timed at M = 512 instead of 2048
KERNEL_KIND = {"cuda.nm24_mma_sp": "sp16", "cuda.nm24_int4_mma_sp": "sp4", "cuda.int4_dequant_mma": "dq4",
               "cuda.int8_dequant_mma": "dq8", "cuda.nm24_int8_mma_sp": "sp8"}
TARGET_ARCH_CC = {"sm_80": (8, 0), "sm_86": (8, 6), "sm_89": (8, 9), "sm_90": (9, 0), "sm_90a": (9, 0)}


# ------------------------------------------------------------------------------------------------ GPU and arch
@dataclass(frozen=True)
class GpuInfo:
    name: str
    cc: tuple[int, int]
    index: int = 0
    driver_version: int = 0

    @property
    def arch(self) -> str:
        return arch_of(self.cc)


def arch_of(cc: tuple[int, int]) -> str:
    """The SASS arch sparsec builds for a compute capability (9.0 -> sm_90a: the wgmma/TMA kernels need it)."""
    return "sm_90a" if tuple(cc) == (9, 0) else f"sm_{cc[0]}{cc[1]}"


def arch_mismatch(target_name: str, target_arch: str, cc: tuple[int, int], gpu_name: str = "") -> str | None:
    """Why a GPU of compute capability ``cc`` cannot tune ``target_name`` (built for ``target_arch``), or None.

    Exact match only: SASS for sm_80 would run on an sm_86 card, but timings there say nothing about an A100, and
    sm_90a code runs on compute capability 9.0 only."""
    want = TARGET_ARCH_CC.get(target_arch)
    if want is None:
        return f"target {target_name} has no known CUDA arch ({target_arch!r})"
    if tuple(cc) == want:
        return None
    who = f"local GPU{f' ({gpu_name})' if gpu_name else ''} is {arch_of(cc)}"
    return f"{who}, target {target_name} needs {target_arch}: tune on a {target_name} (or use the shipped database)"


_CUDA_ERRORS = {100: "CUDA_ERROR_NO_DEVICE", 34: "CUDA_ERROR_STUB_LIBRARY", 35: "CUDA_ERROR_INSUFFICIENT_DRIVER",
                3: "CUDA_ERROR_NOT_INITIALIZED", 999: "CUDA_ERROR_UNKNOWN"}  # fmt: skip


class CudaDriverError(RuntimeError):
    pass


class Driver:
    """The few CUDA driver API calls the tuner needs (ctypes on libcuda.so.1; no torch, no CUDA runtime)."""

    def __init__(self, lib: ctypes.CDLL):
        self.lib = lib
        L = lib
        vp, u64, c_int = ctypes.c_void_p, ctypes.c_uint64, ctypes.c_int
        sigs = {
            "cuInit": [ctypes.c_uint], "cuDriverGetVersion": [ctypes.POINTER(c_int)],
            "cuDeviceGetCount": [ctypes.POINTER(c_int)], "cuDeviceGet": [ctypes.POINTER(c_int), c_int],
            "cuDeviceGetName": [ctypes.c_char_p, c_int, c_int],
            "cuDeviceGetAttribute": [ctypes.POINTER(c_int), c_int, c_int],
            "cuDevicePrimaryCtxRetain": [ctypes.POINTER(vp), c_int], "cuCtxSetCurrent": [vp], "cuCtxSynchronize": [],
            "cuMemAlloc_v2": [ctypes.POINTER(u64), ctypes.c_size_t], "cuMemFree_v2": [u64],
            "cuMemcpyHtoD_v2": [u64, vp, ctypes.c_size_t], "cuMemcpyDtoH_v2": [vp, u64, ctypes.c_size_t],
            "cuMemsetD32_v2": [u64, ctypes.c_uint, ctypes.c_size_t], "cuMemsetD16_v2": [u64, ctypes.c_ushort, ctypes.c_size_t],
            "cuEventCreate": [ctypes.POINTER(vp), ctypes.c_uint], "cuEventRecord": [vp, vp],
            "cuEventSynchronize": [vp], "cuEventElapsedTime": [ctypes.POINTER(ctypes.c_float), vp, vp],
            "cuEventDestroy_v2": [vp], "cuGetErrorName": [c_int, ctypes.POINTER(ctypes.c_char_p)],
        }  # fmt: skip
        self.fns = {}
        for name, args in sigs.items():
            # CUDA 12.8+ drivers export cuEventElapsedTime_v2 (same signature; the header maps the name to it)
            alts = [name + "_v2", name] if name == "cuEventElapsedTime" else [name]
            f = next((getattr(L, a) for a in alts if hasattr(L, a)), None)
            if f is None:
                raise AttributeError(name)
            f.argtypes, f.restype = args, c_int
            self.fns[name] = f
        self.ctx = None

    def name_of(self, rc: int) -> str:
        s = ctypes.c_char_p()
        if self.lib.cuGetErrorName(rc, ctypes.byref(s)) == 0 and s.value:
            return s.value.decode()
        return _CUDA_ERRORS.get(rc, f"CUDA error {rc}")

    def check(self, rc: int, what: str) -> None:
        if rc != 0:
            raise CudaDriverError(f"{what}: {self.name_of(rc)}")

    def __getattr__(self, name: str):  # cuX(...) -> checked call
        if name.startswith("_") or name in ("lib", "fns", "ctx"):
            raise AttributeError(name)
        f = self.fns["cu" + name]

        def call(*args):
            self.check(f(*args), "cu" + name)

        return call

    def activate(self, index: int = 0) -> None:
        """Make the device's primary context current (the one the kernel launchers use)."""
        dev = ctypes.c_int()
        self.DeviceGet(ctypes.byref(dev), index)
        ctx = ctypes.c_void_p()
        self.DevicePrimaryCtxRetain(ctypes.byref(ctx), dev)
        self.CtxSetCurrent(ctx)
        self.ctx = ctx


def load_driver() -> Driver:
    """libcuda through ctypes; ToolMissingError (one line) when there is none."""
    from ..compressor.errors import ToolMissingError

    last = None
    for name in ("libcuda.so.1", "libcuda.so"):
        try:
            return Driver(ctypes.CDLL(name))
        except OSError as e:
            last = e
        except AttributeError as e:  # an old driver without one of the entry points
            raise ToolMissingError(f"the CUDA driver here lacks {e}: tuning CUDA kernels needs an NVIDIA driver for CUDA 12+")
    raise ToolMissingError(f"no CUDA driver found here (libcuda.so.1: {str(last).split(':')[-1].strip() or 'not found'}): "
                           "`sparsec tune --target a100|h100` measures on a local NVIDIA GPU; run it on the GPU machine "
                           "(or build with the shipped tuning database)")  # fmt: skip


def detect_gpu(index: int = 0, driver: Driver | None = None) -> GpuInfo:
    """Name and compute capability of local GPU ``index`` (CUDA driver API); ToolMissingError when there is none."""
    from ..compressor.errors import ToolMissingError

    d = driver or load_driver()
    rc = d.lib.cuInit(0)
    if rc != 0:
        raise ToolMissingError(f"no usable CUDA GPU here (cuInit: {d.name_of(rc)}): `sparsec tune --target a100|h100` "
                               "measures on a local NVIDIA GPU; run it on the GPU machine")  # fmt: skip
    n = ctypes.c_int()
    d.DeviceGetCount(ctypes.byref(n))
    if n.value <= index:
        raise ToolMissingError(f"no CUDA GPU here (the driver reports {n.value} devices; CUDA_VISIBLE_DEVICES="
                               f"{os.environ.get('CUDA_VISIBLE_DEVICES', '(unset)')!r})")  # fmt: skip
    dev = ctypes.c_int()
    d.DeviceGet(ctypes.byref(dev), index)
    buf = ctypes.create_string_buffer(256)
    d.DeviceGetName(buf, 256, dev)
    major, minor, ver = ctypes.c_int(), ctypes.c_int(), ctypes.c_int()
    d.DeviceGetAttribute(ctypes.byref(major), 75, dev)  # CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR
    d.DeviceGetAttribute(ctypes.byref(minor), 76, dev)  # ..._MINOR
    d.DriverGetVersion(ctypes.byref(ver))
    return GpuInfo(buf.value.decode(errors="replace"), (major.value, minor.value), index, ver.value)


def require_gpu_for(target, index: int = 0) -> tuple[GpuInfo, Driver]:
    """The local GPU when it can tune ``target``; ToolMissingError naming the reason otherwise."""
    from ..compressor.errors import ToolMissingError

    d = load_driver()
    info = detect_gpu(index, d)
    why = arch_mismatch(target.name, target.arch or "", info.cc, info.name)
    if why is not None:
        raise ToolMissingError(why)
    return info, d


# ------------------------------------------------------------------------------------------------ timing
class HostTimer:
    """Wall-clock timer (emulated kernels on the CPU; no cache flush)."""

    def pair(self):
        return [0.0], [0.0]

    def record(self, ev) -> None:
        ev[0] = time.perf_counter()

    def elapsed_ms(self, s, e) -> float:
        return (e[0] - s[0]) * 1e3

    def flush(self) -> None:
        pass

    def sync(self) -> None:
        pass


class TorchTimer:
    """torch.cuda events on the current stream; ``flush_buf`` (>= the L2 size) is zeroed before every call."""

    def __init__(self, torch, flush_buf):
        self.torch, self.buf = torch, flush_buf

    def pair(self):
        E = self.torch.cuda.Event
        return E(enable_timing=True), E(enable_timing=True)

    def record(self, ev) -> None:
        ev.record()

    def elapsed_ms(self, s, e) -> float:
        return s.elapsed_time(e)

    def flush(self) -> None:
        self.buf.zero_()

    def sync(self) -> None:
        self.torch.cuda.synchronize()


class DriverTimer:
    """CUDA driver events on the legacy default stream (where the kernel launchers run when no stream is set);
    a 256 MiB device buffer is cleared with cuMemsetD32 before every call (H100 L2: 50 MiB)."""

    FLUSH_BYTES = 256 << 20

    def __init__(self, driver: Driver):
        self.d = driver
        ptr = ctypes.c_uint64()
        driver.MemAlloc_v2(ctypes.byref(ptr), self.FLUSH_BYTES)
        self.flush_ptr = ptr.value
        self.pool: list[ctypes.c_void_p] = []

    def _event(self):
        if self.pool:
            return self.pool.pop()
        ev = ctypes.c_void_p()
        self.d.EventCreate(ctypes.byref(ev), 0)
        return ev

    def pair(self):
        return self._event(), self._event()

    def record(self, ev) -> None:
        self.d.EventRecord(ev, None)

    def elapsed_ms(self, s, e) -> float:
        ms = ctypes.c_float()
        self.d.EventSynchronize(e)
        self.d.EventElapsedTime(ctypes.byref(ms), s, e)
        self.pool += [s, e]
        return float(ms.value)

    def flush(self) -> None:
        self.d.MemsetD32_v2(self.flush_ptr, 0, self.FLUSH_BYTES // 4)

    def sync(self) -> None:
        self.d.CtxSynchronize()


def time_call(call: Callable[[], Any], timer, n: int | None = None, min_n: int = 8, max_n: int = 50,
              budget_s: float = 0.15) -> float:  # fmt: skip
    """Median milliseconds of ``n`` calls, each bracketed by device events, the L2 flushed before each; ``n`` from a
    first wall-clock estimate so that the timed calls take about ``budget_s`` (within [min_n, max_n])."""
    call()
    timer.sync()
    t0 = time.perf_counter()
    call()
    timer.sync()
    est = time.perf_counter() - t0
    if n is None:
        n = int(max(min_n, min(max_n, budget_s / max(est + 1e-4, 1e-6))))
    pairs = [timer.pair() for _ in range(n)]
    for s, e in pairs:
        timer.flush()
        timer.record(s)
        call()
        timer.record(e)
    timer.sync()
    return statistics.median(timer.elapsed_ms(s, e) for s, e in pairs)


def judge(rel_err: float, unwritten: int) -> bool:
    """A kernel output is correct when every element was written and its relative error vs float64 <= REL_TOL."""
    return unwritten == 0 and math.isfinite(rel_err) and rel_err <= REL_TOL


# ------------------------------------------------------------------------------------------------ device memory
_DL_CODE = {"i": 0, "u": 1, "f": 2}
_CAPSULE_NAME = b"dltensor"


class _DLDevice(ctypes.Structure):
    _fields_ = [("device_type", ctypes.c_int32), ("device_id", ctypes.c_int32)]


class _DLDataType(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint8), ("bits", ctypes.c_uint8), ("lanes", ctypes.c_uint16)]


class _DLTensor(ctypes.Structure):
    _fields_ = [("data", ctypes.c_void_p), ("device", _DLDevice), ("ndim", ctypes.c_int32), ("dtype", _DLDataType),
                ("shape", ctypes.POINTER(ctypes.c_int64)), ("strides", ctypes.POINTER(ctypes.c_int64)),
                ("byte_offset", ctypes.c_uint64)]  # fmt: skip


class _DLManagedTensor(ctypes.Structure):
    _fields_ = [("dl_tensor", _DLTensor), ("manager_ctx", ctypes.c_void_p), ("deleter", ctypes.c_void_p)]


_PyCapsule_New = ctypes.pythonapi.PyCapsule_New
_PyCapsule_New.restype = ctypes.py_object
_PyCapsule_New.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p]
_KEEP: dict[int, Any] = {}  # DLManagedTensor address -> (struct, shape, DeviceArray) until the consumer's deleter call


@ctypes.CFUNCTYPE(None, ctypes.c_void_p)
def _dl_deleter(addr):
    _KEEP.pop(addr, None)


_DL_DELETER = ctypes.cast(_dl_deleter, ctypes.c_void_p).value


class DeviceArray:
    """A contiguous array at a raw pointer (CUDA device memory or host memory), exported through DLPack (legacy
    unversioned capsule) so that ``tvm_ffi.from_dlpack`` can wrap it. Each export holds a reference to this object
    (and so to ``owner``) until the consumer releases the tensor (the DLPack deleter); device memory itself is freed
    by :meth:`DriverDevice.free`."""

    def __init__(self, ptr: int, shape, dtype, device_type: int, device_id: int = 0, owner: Any = None):
        self.ptr, self.shape, self.dtype = int(ptr), tuple(int(s) for s in shape), np.dtype(dtype)
        self.device_type, self.device_id, self.owner = device_type, device_id, owner

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize

    def __dlpack__(self, stream=None, max_version=None, dl_device=None, copy=None):
        shape = (ctypes.c_int64 * max(1, len(self.shape)))(*self.shape)
        mt = _DLManagedTensor()
        t = mt.dl_tensor
        t.data, t.device = self.ptr, _DLDevice(self.device_type, self.device_id)
        t.ndim, t.dtype = len(self.shape), _DLDataType(_DL_CODE[self.dtype.kind], self.dtype.itemsize * 8, 1)
        t.shape, t.strides, t.byte_offset = shape, None, 0
        mt.deleter = _DL_DELETER
        _KEEP[ctypes.addressof(mt)] = (mt, shape, self)
        return _PyCapsule_New(ctypes.addressof(mt), _CAPSULE_NAME, None)

    def __dlpack_device__(self):
        return (self.device_type, self.device_id)

    def ffi(self):
        """A tvm_ffi.Tensor over this memory."""
        import tvm_ffi

        return tvm_ffi.from_dlpack(self)


class DriverDevice:
    """Device memory through the CUDA driver; kernel arguments are tvm_ffi tensors over it."""

    def __init__(self, driver: Driver, index: int = 0):
        self.d, self.index = driver, index
        driver.activate(index)
        self.timer = DriverTimer(driver)
        self._live: list[int] = []

    def _alloc(self, nbytes: int) -> int:
        p = ctypes.c_uint64()
        self.d.MemAlloc_v2(ctypes.byref(p), max(nbytes, 16))
        self._live.append(p.value)
        return p.value

    def put(self, a: np.ndarray) -> DeviceArray:
        a = np.ascontiguousarray(a)
        ptr = self._alloc(a.nbytes)
        self.d.MemcpyHtoD_v2(ptr, a.ctypes.data, a.nbytes)
        return DeviceArray(ptr, a.shape, a.dtype, 2, self.index)

    def nan_fp16(self, shape) -> DeviceArray:
        out = DeviceArray(self._alloc(int(np.prod(shape)) * 2), shape, np.float16, 2, self.index)
        self.d.MemsetD16_v2(out.ptr, 0x7E00, int(np.prod(shape)))  # fp16 quiet NaN
        return out

    def get(self, a: DeviceArray) -> np.ndarray:
        out = np.empty(a.shape, a.dtype)
        self.d.CtxSynchronize()
        self.d.MemcpyDtoH_v2(out.ctypes.data, a.ptr, a.nbytes)
        return out

    def arg(self, a: DeviceArray):
        return a.ffi()

    def free(self, a: DeviceArray) -> None:
        if a.ptr in self._live:
            self._live.remove(a.ptr)
            self.d.MemFree_v2(a.ptr)

    def sync(self) -> None:
        self.d.CtxSynchronize()


class HostDevice:
    """Host arrays (emulated kernel libraries: CPU rehearsal and tests)."""

    def __init__(self):
        self.timer = HostTimer()

    def put(self, a: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(a).copy()

    def nan_fp16(self, shape) -> np.ndarray:
        return np.full(shape, np.nan, np.float16)

    def get(self, a: np.ndarray) -> np.ndarray:
        return a

    def arg(self, a: np.ndarray) -> np.ndarray:
        return a

    def free(self, a) -> None:
        pass

    def sync(self) -> None:
        pass


class EmulatedLib:
    """Stand-in for the compiled kernel library on the CPU: ``lib[func](x, *weights, y)`` computes
    ``y = x @ W.T`` in float32 with W rebuilt from the prepared arrays by the independent tensor-core layout decoder
    (:func:`cuda_sparse.decode_layout`), i.e. what a correct kernel computes. ``funcs``: func name -> (kind, gs)."""

    def __init__(self, funcs: dict[str, tuple[str, int]]):
        self.funcs = dict(funcs)
        self._decoded: dict[tuple, np.ndarray] = {}

    def weight(self, kind: str, gs: int, arrays, n: int, k: int) -> np.ndarray:
        from .kernels.cuda_sparse import decode_layout

        key = (kind, gs, n, k, *(a.ctypes.data for a in arrays))
        if key not in self._decoded:
            self._decoded[key] = decode_layout(kind, [np.asarray(a) for a in arrays], n, k, gs)
        return self._decoded[key]

    def __getitem__(self, func: str):
        kind, gs = self.funcs[func]

        def f(x, *args):
            *ws, y = args
            w = self.weight(kind, gs, ws, y.shape[1], x.shape[1])
            y[...] = (x.astype(np.float32) @ w.T).astype(np.float16)

        return f


# ------------------------------------------------------------------------------------------------ candidates
def candidate_configs(kind: str, arch: str, max_per_path: int | None = None, seed: int = 0,
                      include_unverified: bool = False) -> dict[str, list[dict[str, Any]]]:  # fmt: skip
    """Per path: the default config first, then the search space's other configs (seeded shuffle when bounded by
    ``max_per_path``); warp-specialized (``"ws"``) configs not yet checked on a GPU only with ``include_unverified``."""
    from .kernels.cuda_sparse import default_config, search_space

    base = default_config(kind, arch)
    sp = search_space(kind, arch)
    out = {}
    for p in PATHS:
        rest = [c for c in sp[p] if c != base[p] and (include_unverified or not unverified(c))]
        if max_per_path is not None:
            random.Random(f"{seed}:{kind}:{p}").shuffle(rest)
            rest = rest[: max(0, max_per_path - 1)]
        out[p] = [dict(base[p])] + rest
    return out


def unverified(cfg: dict[str, Any]) -> bool:
    """A warp-specialized config no device run has checked yet (cuda_sparse.VERIFIED_WS)."""
    from .kernels.cuda_sparse import VERIFIED_WS, ws_tag

    return bool(cfg.get("ws")) and ws_tag(cfg) not in VERIFIED_WS


@dataclass
class Job:
    """One (kernel, shape, format) to tune."""

    kernel: str
    kind: str
    asym: bool
    gs: int
    label: str
    linear: Any
    key: dict[str, Any]

    @property
    def n(self) -> int:
        return int(self.linear.weight.shape[0])

    @property
    def k(self) -> int:
        return int(self.linear.weight.shape[1])

    @property
    def group(self) -> tuple[str, bool, int]:
        return (self.kind, self.asym, self.gs)


def plan(graph, target, formats: list[str] | None, seed: int = 0) -> list[Job]:
    """The CUDA kernel jobs of ``graph`` (see :func:`sparsec.backends.tune.probes`), one per distinct key."""
    from .kernels.registry import ShapeHints, linear_key, select_kernel
    from .kernels.cuda_sparse import as24_linear
    from .tune import TuningDB, _canon, probes

    jobs, seen = [], set()
    for label, probe in probes(graph, formats, seed):
        impl = select_kernel(probe, target, ShapeHints(), TuningDB.empty())
        if impl.name == "cuda.nm_as_24_mma_sp":  # runs the 2:4 fp16 kernel on its 2:4 form: tuned (and looked up) as that
            probe = as24_linear(probe)
            impl = select_kernel(probe, target, ShapeHints(), TuningDB.empty())
        if impl.name not in KERNEL_KIND:
            continue
        key = dict(linear_key(probe), act_dtype="float16")  # the kernels run in fp16; the build looks this key up
        k = (impl.name, _canon(key))
        if k in seen:
            continue
        seen.add(k)
        jobs.append(Job(impl.name, KERNEL_KIND[impl.name], bool(impl.config["asym"]), int(impl.config["gs"]), label,
                        probe, key))  # fmt: skip
    return jobs


def variants_for(jobs: list[Job], arch: str, max_candidates: int | None, seed: int = 0,
                 include_unverified: bool = False) -> dict[tuple, dict[str, list]]:  # fmt: skip
    """(kind, asym, gs) -> path -> [Variant] (default first): each variant differs from the default in one path. The
    decode GEMV's untuned config depends on the layer's rows (cuda_sparse.gemv_auto_warps): the one of every job's
    shape follows the default, so that each job's own default is measured (:func:`measure_jobs` compares with it)."""
    from .kernels.cuda_sparse import Variant, default_config

    out: dict[tuple, dict[str, list]] = {}
    for j in jobs:
        if j.group in out:
            continue
        base = default_config(j.kind, arch)
        cands = candidate_configs(j.kind, arch, max_candidates, seed, include_unverified)
        gemv = list(cands["gemv"])
        for jj in jobs:
            c = default_config(jj.kind, arch, jj.n, jj.k, jj.asym)["gemv"]
            if jj.group == j.group and c not in gemv:
                gemv.insert(1, c)
        cands = dict(cands, gemv=gemv)
        out[j.group] = {p: [Variant.make(j.kind, j.asym, j.gs, dict(base, **{p: c})) for c in cands[p]] for p in PATHS}
    return out


def path_m_values(n: int, k: int, m_values=None, small_max: int = 128) -> dict[str, tuple[int, ...]]:
    """Token counts to time each path at: the given ones that the path serves, else DEFAULT_PATH_M (the large GEMM
    at 512 for small layers)."""
    got: dict[str, list[int]] = {p: [] for p in PATHS}
    for m in m_values or ():
        got["gemv" if m <= 16 else "gemm_small" if m <= small_max else "gemm"].append(int(m))
    out = {}
    for p in PATHS:
        d = DEFAULT_PATH_M[p]
        if p == "gemm" and n * k < SMALL_LAYER:
            d = (512,)
        out[p] = tuple(sorted(set(got[p]))) or d
    return out


# ------------------------------------------------------------------------------------------------ measurement
@dataclass
class Measured:
    func: str
    path: str
    config: dict[str, Any]
    ok: bool
    rel_err: float
    unwritten: int
    ms: dict[int, float] = field(default_factory=dict)
    status: str = "ok"

    @property
    def score(self) -> float:
        return sum(self.ms.values()) if self.ms else math.inf


class Bench:
    """A loaded kernel library on a device, with one job's weight uploaded."""

    def __init__(self, lib, dev):
        self.lib, self.dev = lib, dev

    def upload(self, job: Job) -> tuple[list, np.ndarray, int, int]:
        from .kernels.cuda_sparse import prepare

        arrays = prepare(job.kind, job.linear.weight)
        return [self.dev.put(a) for a in arrays], job.linear.weight.materialize().astype(np.float64), job.n, job.k

    def check(self, func: str, ws: list, w64: np.ndarray, n: int, k: int, m: int, rng) -> tuple[float, int]:
        x = rng.standard_normal((m, k)).astype(np.float16)
        xd = self.dev.put(x)
        y = self.dev.nan_fp16((m, n))
        self.lib[func](self.dev.arg(xd), *(self.dev.arg(w) for w in ws), self.dev.arg(y))
        out = self.dev.get(y).astype(np.float64)
        self.dev.free(xd)
        self.dev.free(y)
        ref = x.astype(np.float64) @ w64.T
        unwritten = int(np.isnan(out).sum())
        rel = float(np.linalg.norm(np.nan_to_num(out, nan=0.0) - ref) / max(np.linalg.norm(ref), 1e-30))
        return (rel if unwritten == 0 else math.inf), unwritten

    def time(self, func: str, ws: list, n: int, k: int, m: int, rng) -> float:
        x = self.dev.put(rng.standard_normal((m, k)).astype(np.float16))
        y = self.dev.nan_fp16((m, n))
        f = self.lib[func]
        args = (self.dev.arg(x), *(self.dev.arg(w) for w in ws), self.dev.arg(y))
        ms = time_call(lambda: f(*args), self.dev.timer)
        self.dev.free(x)
        self.dev.free(y)
        return ms

    def measure(self, func: str, path: str, cfg, ws, w64, n, k, ms_list, rng) -> Measured:
        rel, unwritten = self.check(func, ws, w64, n, k, PATH_CHECK_M[path], rng)
        r = Measured(func, path, dict(cfg), judge(rel, unwritten), rel, unwritten)
        if not r.ok:
            r.status = f"wrong (relative error {rel:.2e}, {unwritten} outputs unwritten at M={PATH_CHECK_M[path]})"
            return r
        r.ms = {m: self.time(func, ws, n, k, m, rng) for m in ms_list}
        return r


def measure_jobs(jobs: list[Job], groups: dict[tuple, dict[str, list]], lib, dev, m_values=None, seed: int | None = None,
                 log: Callable[[str], None] | None = None, isolated: "IsolatedRunner | None" = None,
                 arch: str | None = None) -> list[dict[str, Any]]:  # fmt: skip
    """Check and time every candidate of every job; returns one result per job: per path the candidates' Measured
    and the winner. Unverified candidates run through ``isolated`` (skipped when it is None). ``default`` of a path
    is the untuned build's config for the job's shape (given ``arch``; else the group's first candidate)."""
    from .kernels.cuda_sparse import default_config

    bench = Bench(lib, dev)
    rng = np.random.default_rng(seed if seed is not None else int.from_bytes(os.urandom(8), "little"))
    rejected: dict[str, str] = {}  # func -> why (a candidate wrong on one shape is wrong)
    iso: dict[tuple[str, int], Measured] = {}
    if isolated is not None:
        iso = isolated.run_all(jobs, groups, m_values, log)
    out = []
    for ji, j in enumerate(jobs):
        ws, w64, n, k = bench.upload(j)
        pm = path_m_values(n, k, m_values)
        res = {"job": j, "paths": {}, "m": pm}
        for p in PATHS:
            cands = groups[j.group][p]
            meas: list[Measured] = []
            for v in cands:
                cfg = v.cfg(p)
                if unverified(cfg):
                    r = iso.get((v.func_name, ji))
                    if r is None:
                        continue
                elif v.func_name in rejected:
                    r = Measured(v.func_name, p, cfg, False, math.nan, 0, status=rejected[v.func_name])
                else:
                    try:
                        r = bench.measure(v.func_name, p, cfg, ws, w64, n, k, pm[p], rng)
                    except Exception as e:  # noqa: BLE001  (launch failure: rejected; a broken context fails the rest)
                        msg = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
                        r = Measured(v.func_name, p, cfg, False, math.nan, 0, status=f"failed ({msg})")
                if not r.ok:
                    rejected.setdefault(v.func_name, r.status)
                    if log is not None:
                        log(f"rejected {j.kernel} {p} {_cfg_str(cfg)} on {n}x{k}: {r.status}")
                meas.append(r)
            good = [r for r in meas if r.ok]
            win = min(good, key=lambda r: r.score) if good else None
            if p == "gemv" and good:
                win = _gemv_per_kernel(good) or win
            own = default_config(j.kind, arch, n, k, j.asym)[p] if arch is not None else None
            dm = next((r for r in meas if r.config == own), None) if own is not None else (meas[0] if meas else None)
            res["paths"][p] = {"measured": meas, "winner": win, "default": dm if dm is not None and dm.ok else None}
            if log is not None and win is not None:
                log(f"{j.kernel} {j.label} {n}x{k} {p}: {_cfg_str(win.config)} {win.score:.4f} ms "
                    f"({len(good)}/{len(meas)} candidates correct)")  # fmt: skip
        for w in ws:
            dev.free(w)
        out.append(res)
    return out


def _gemv_per_kernel(good: list[Measured]) -> Measured | None:
    """The decode GEMV's two token-tile kernels chosen separately (cuda_sparse.gemv_merge): the M <= 8 kernel of the
    candidate fastest over the measured M <= 8, the M > 8 kernel of the one fastest over M > 8 among those with the
    same shared pipeline options; None unless both ranges were measured."""
    from .kernels.cuda_sparse import GEMV_SHARED_KEYS, gemv_merge

    lo = [m for m in good[0].ms if m <= 8]
    hi = [m for m in good[0].ms if m > 8]
    if not lo or not hi or any(set(r.ms) != set(good[0].ms) for r in good):
        return None
    w1 = min(good, key=lambda r: sum(r.ms[m] for m in lo))
    same = [r for r in good if all(r.config.get(f) == w1.config.get(f) for f in GEMV_SHARED_KEYS)]
    w2 = min(same, key=lambda r: sum(r.ms[m] for m in hi))
    if w2 is w1:
        return w1
    return Measured(f"{w1.func}+{w2.func}", "gemv", gemv_merge(w1.config, w2.config), True,
                    max(w1.rel_err, w2.rel_err), 0, ms={**{m: w1.ms[m] for m in lo}, **{m: w2.ms[m] for m in hi}})


def _cfg_str(c: dict[str, Any]) -> str:
    return " ".join(f"{k}={v}" for k, v in sorted(c.items()))


def record_results(db, target, results: list[dict[str, Any]], device: str, arch: str) -> list[dict[str, Any]]:
    """Winners -> tuning database entries (the build's key, ``"tuned": true``, measured ms per path and M)."""
    from .kernels.cuda_sparse import default_config

    tname = target.name.partition(":")[0]
    rows = []
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    for r in results:
        j: Job = r["job"]
        paths = r["paths"]
        missing = [p for p in PATHS if paths[p]["winner"] is None]
        rejected = sorted({m.func for p in PATHS for m in paths[p]["measured"] if not m.ok})
        row = {"kernel": j.kernel, "format": j.label, "shape": f"{j.n}x{j.k}", "rejected": len(rejected)}
        if missing:  # no correct candidate for a path: nothing is recorded (the build keeps its default)
            row.update(error=f"no correct candidate for {', '.join(missing)}", speedup_vs_default=float("nan"), config={})
            rows.append(row)
            continue
        cfg = default_config(j.kind, arch)
        for p in PATHS:
            cfg[p] = dict(paths[p]["winner"].config)
        ms = {p: {str(m): t for m, t in paths[p]["winner"].ms.items()} for p in PATHS}
        dms = {p: ({str(m): t for m, t in paths[p]["default"].ms.items()} if paths[p]["default"] else None) for p in PATHS}
        ratios = [paths[p]["default"].ms[m] / paths[p]["winner"].ms[m] for p in PATHS if paths[p]["default"]
                  for m in paths[p]["winner"].ms if paths[p]["winner"].ms[m] > 0]  # fmt: skip
        speed = math.exp(sum(math.log(x) for x in ratios) / len(ratios)) if ratios else 1.0
        ncand = sum(len(paths[p]["measured"]) for p in PATHS)
        db.record(j.kernel, tname, j.key, cfg, tuned=True, ms=ms, default_ms=dms, candidates=ncand,
                  rejected=rejected, device=device, measured=stamp)  # fmt: skip
        row.update(speedup_vs_default=speed, config=cfg, **{f"us_{p}_m{m}": t * 1e3 for p in PATHS
                                                              for m, t in paths[p]["winner"].ms.items()})  # fmt: skip
        rows.append(row)
    return rows


# ------------------------------------------------------------------------------------------------ isolation
class IsolatedRunner:
    """Runs unverified candidates one per subprocess (``python -m sparsec.backends.cuda_tune measure ...``), killed
    after ``timeout_s``: a hung kernel costs one candidate, not the whole search. ``lib_path`` ``"emulated"`` runs
    :class:`EmulatedLib` on the host (CPU rehearsal/tests)."""

    def __init__(self, lib_path: str, workdir: str, timeout_s: float | None = None):
        self.lib_path, self.workdir = lib_path, Path(workdir)
        self.timeout_s = timeout_s or float(os.environ.get("SPARSEC_TUNE_ISOLATED_TIMEOUT", "120"))

    def run_all(self, jobs, groups, m_values, log=None) -> dict[tuple[str, int], Measured]:
        from .kernels.cuda_sparse import prepare

        files: dict[int, str] = {}
        out: dict[tuple[str, int], Measured] = {}
        for ji, j in enumerate(jobs):
            todo = [(p, v) for p in PATHS for v in groups[j.group][p] if unverified(v.cfg(p))]
            if not todo:
                continue
            if ji not in files:
                f = self.workdir / f"job{ji}.npz"
                arrays = prepare(j.kind, j.linear.weight)
                np.savez(f, w=j.linear.weight.materialize().astype(np.float32), **{f"a{i}": a for i, a in enumerate(arrays)})
                files[ji] = str(f)
        by_func: dict[str, list] = {}
        for ji, j in enumerate(jobs):
            for p in PATHS:
                for v in groups[j.group][p]:
                    if unverified(v.cfg(p)):
                        pm = path_m_values(j.n, j.k, m_values)[p]
                        by_func.setdefault(v.func_name, []).append((ji, p, v, {"file": files[ji], "n": j.n, "k": j.k,
                                                                             "kind": j.kind, "gs": j.gs, "ms": list(pm)}))  # fmt: skip
        for func, items in by_func.items():
            p, v = items[0][1], items[0][2]
            spec = {"lib": self.lib_path, "func": func, "path": p, "jobs": [it[3] for it in items]}
            if log is not None:
                log(f"isolated run of unverified {func} ({p}: {_cfg_str(v.cfg(p))}), limit {self.timeout_s:g} s")
            got = self._run(spec)
            for (ji, p, v, _), g in zip(items, got + [None] * (len(items) - len(got))):
                cfg = v.cfg(p)
                if g is None:
                    r = Measured(func, p, cfg, False, math.nan, 0, status=self.last_status)
                else:
                    ok = judge(g["rel_err"], g["unwritten"])
                    r = Measured(func, p, cfg, ok, g["rel_err"], g["unwritten"], {int(m): t for m, t in g["ms"].items()} if ok else {},
                                 "ok" if ok else f"wrong (relative error {g['rel_err']:.2e}, {g['unwritten']} outputs unwritten)")  # fmt: skip
                out[(func, ji)] = r
        return out

    last_status = ""

    def _run(self, spec) -> list[dict[str, Any]]:
        sf = self.workdir / "spec.json"
        sf.write_text(json.dumps(spec))
        import sparsec

        cmd = [sys.executable, "-m", "sparsec.backends.cuda_tune", "measure", str(sf)]
        root = str(Path(sparsec.__file__).resolve().parent.parent)  # a source checkout works from any directory
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(x for x in (root, os.environ.get("PYTHONPATH")) if x))
        p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True, env=env)
        try:
            so, se = p.communicate(timeout=self.timeout_s)
            tail = ((se or "").strip().splitlines() or ["no output"])[-1][:200]
            self.last_status = f"failed (exit {p.returncode}: {tail})" if p.returncode else "no answer"
        except subprocess.TimeoutExpired:
            try:
                os.killpg(p.pid, 9)  # the child and anything it started (its own session)
            except ProcessLookupError:
                pass
            so, se = p.communicate()
            self.last_status = f"timeout (no answer within {self.timeout_s:g} s: hung?)"
        return [json.loads(line) for line in (so or "").splitlines() if line.startswith("{")]


def _child_measure(spec_path: str) -> None:
    """Subprocess side of :class:`IsolatedRunner`: one candidate on each job, one JSON line per job."""
    spec = json.loads(Path(spec_path).read_text())
    if spec["lib"] == "emulated":
        lib = EmulatedLib({spec["func"]: (spec["jobs"][0]["kind"], spec["jobs"][0]["gs"])})
        dev: Any = HostDevice()
    else:
        import tvm_ffi

        d = load_driver()
        d.check(d.lib.cuInit(0), "cuInit")
        dev = DriverDevice(d)
        lib = tvm_ffi.load_module(spec["lib"])
    bench = Bench(lib, dev)
    rng = np.random.default_rng()
    for jb in spec["jobs"]:
        z = np.load(jb["file"])
        ws = [dev.put(z[f"a{i}"]) for i in range(sum(1 for f in z.files if f.startswith("a")))]
        w64 = z["w"].astype(np.float64)
        rel, unwritten = bench.check(spec["func"], ws, w64, jb["n"], jb["k"], PATH_CHECK_M[spec["path"]], rng)
        ms = {}
        if judge(rel, unwritten):
            ms = {str(m): bench.time(spec["func"], ws, jb["n"], jb["k"], m, rng) for m in jb["ms"]}
        print(json.dumps({"rel_err": rel if math.isfinite(rel) else 1e30, "unwritten": unwritten, "ms": ms}), flush=True)
        for w in ws:
            dev.free(w)


# ------------------------------------------------------------------------------------------------ entry point
def gpu_backend(target, variants, workdir: str, gpu: GpuInfo, driver: Driver):
    """Compile ``variants`` for the target's arch into one library, load it; (lib, device, lib_path)."""
    import tvm_ffi

    from .kernels.cuda_compile import build_shared

    path = os.path.join(workdir, "sparsec_tune.so")
    build_shared(variants, [target.arch], path, workdir=os.path.join(workdir, "build"))
    return tvm_ffi.load_module(path), DriverDevice(driver, gpu.index), path


def include_unverified_default() -> bool:
    return os.environ.get("SPARSEC_TUNE_UNVERIFIED") == "1"


def tune_cuda_graph(graph, target, db, formats: list[str] | None = None, m_values=None, max_candidates: int = 16,
                    seed: int = 0, console=None, include_unverified: bool | None = None, backend=None,
                    device_name: str | None = None) -> list[dict[str, Any]]:  # fmt: skip
    """Tune the CUDA kernels of ``graph``'s Linear shapes on the local GPU and record the winners in ``db``.

    ``backend``: None (the local GPU: arch checked, library compiled with nvcc, CUDA driver) or a callable
    ``(variants, workdir) -> (lib, device, lib_path)`` (an emulated library on the host: CPU rehearsal and tests)."""
    from ..compressor.errors import ToolMissingError

    if include_unverified is None:
        include_unverified = include_unverified_default()
    log = None
    if console is not None:
        from rich.markup import escape

        def log(s: str) -> None:
            console.print(f"[dim]{escape(s)}[/dim]", highlight=False)

    gpu = driver = None
    if backend is None:
        gpu, driver = require_gpu_for(target)  # before any compile: refuse early with the real reason
        device_name = f"{gpu.name} ({gpu.arch}, driver {gpu.driver_version // 1000}.{gpu.driver_version % 1000 // 10})"
    arch = target.arch or "sm_80"
    jobs = plan(graph, target, formats, seed)
    if not jobs:
        return []
    groups = variants_for(jobs, arch, max_candidates, seed, include_unverified)
    variants = [v for g in groups.values() for p in PATHS for v in g[p]]
    with tempfile.TemporaryDirectory(prefix="sparsec-tune-") as wd:
        if log is not None:
            log(f"compiling {len({v.func_name for v in variants})} kernel variants for {arch} ({len(jobs)} shapes)")
        if backend is None:
            try:
                lib, dev, lib_path = gpu_backend(target, variants, wd, gpu, driver)
            except CudaDriverError as e:
                raise ToolMissingError(f"the local GPU cannot be used: {e}")
        else:
            lib, dev, lib_path = backend(variants, wd)
        iso = IsolatedRunner(lib_path, wd) if include_unverified else None
        results = measure_jobs(jobs, groups, lib, dev, m_values, seed=None, log=log, isolated=iso, arch=arch)
    return record_results(db, target, results, device_name or "unknown device", arch)


def main(argv=None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) == 2 and args[0] == "measure":
        _child_measure(args[1])
        return
    raise SystemExit("usage: python -m sparsec.backends.cuda_tune measure SPEC.json (internal: isolated candidates)")


if __name__ == "__main__":
    main()
