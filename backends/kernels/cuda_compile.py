"""Ahead-of-time compilation of sparsec's hand-written CUDA kernels (``sparsec_mma.cuh``) into a linkable object.

The kernels of :mod:`sparsec.backends.kernels.cuda_sparse` are CUDA C++ templates, not TIR. For a build they become

1. ``kernels.cu``  -- the template instantiations the model needs (``extern "C" __global__`` entries), compiled by
   ``nvcc --fatbin -gencode arch=compute_XX,code=sm_XX`` for the target's arch (sm_80 for a100, sm_90a for h100): the
   fatbin holds SASS, ptxas ran at build time, nothing is compiled when the model loads;
2. ``host.cc``     -- driver-API launchers exported as TVM FFI functions (``__tvm_ffi_sparsec_cuda_<id>``), with the
   fatbin embedded by ``.incbin``; compiled by the host C++ compiler (g++) into ``sparsec_cuda.o``.

The object is linked into the model library through ``export_library(..., addons=[obj])``; the Relax VM then finds
the ``R.call_dps_packed("sparsec_cuda_<id>", ...)`` functions in the library itself. The launchers need only the
CUDA driver (``libcuda.so.1``, opened with dlopen) and libtvm_ffi (already loaded by whoever loads the library).

Builds use it through :class:`CudaKernelSource` (what a kernel generator puts in ``KernelImpl.extra_modules``)::

    objs = link_objects([m for impl in impls for m in impl.extra_modules if isinstance(m, CudaKernelSource)],
                        target, workdir)           # -> [".../sparsec_cuda.o"], once for all linears
    lib.export_library(path, addons=objs)

:func:`build_shared` makes a standalone ``.so`` of the same kind (bench and GPU tests load it with
``tvm_ffi.load_module`` and call it on torch tensors); :func:`ptxas_report` compiles for an arch and returns ptxas'
resource usage per kernel (CI: ptxas acceptance without a GPU).
"""
from __future__ import annotations

import hashlib
import os
import re
import shlex
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from ...compressor import interrupt
from ...compressor.errors import BuildError, ToolMissingError

__all__ = ["CudaKernelSource", "link_objects", "build_object", "build_shared", "ptxas_report", "nvcc_path", "gencode"]


def nvcc_path() -> str | None:
    return shutil.which("nvcc")


def cxx_path() -> str | None:
    return os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")


def gencode(arch: str) -> list[str]:
    if not re.fullmatch(r"sm_\d+a?", arch):
        raise BuildError(f"CUDA arch {arch!r} is not of the form sm_XX")
    return ["-gencode", f"arch=compute_{arch[3:]},code={arch}"]


@dataclass(frozen=True)
class CudaKernelSource:
    """Kernel variants (``cuda_sparse.Variant``) that a build must compile and link into the model library."""

    variants: tuple

    def link_objects(self, target, workdir: str) -> list[str]:
        return link_objects([self], target, workdir)


def _variants(sources) -> list:
    seen, out = set(), []
    for s in sources:
        for v in s.variants:
            if v.func_name not in seen:
                seen.add(v.func_name)
                out.append(v)
    return sorted(out, key=lambda v: v.func_name)


def _run(cmd: list[str], cwd: str, what: str) -> str:
    r = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if r.returncode != 0:
        msg = (r.stderr or r.stdout).strip().splitlines()
        err = [line for line in msg if "error" in line.lower()] or msg[-1:] or ["(no output)"]
        raise BuildError(f"{what} failed: {err[0][:400]}")
    return (r.stderr or "") + (r.stdout or "")


def check_archs(variants, archs: list[str]) -> None:
    """BuildError when a variant holds a config that cannot be compiled for one of ``archs`` (the warp-specialized
    TMA GEMM exists for sm_90a only)."""
    from .cuda_sparse import ws_config_error

    for v in variants:
        for path in ("gemm_small", "gemm"):
            c = v.cfg(path)
            if not c.get("ws"):
                continue
            for a in archs:
                err = ws_config_error(v.kind, c, a)
                if err is not None:
                    raise BuildError(f"{v.func_name} ({path}): {err}")


def compile_fatbin(variants, archs: list[str], workdir: str, extra_flags: list[str] | None = None) -> Path:
    from .cuda_sparse import HEADER_PATH, render_device_source

    check_archs(variants, archs)
    nvcc = nvcc_path()
    if nvcc is None:
        raise ToolMissingError("nvcc is not on PATH: CUDA targets need it at compile time (the artifact carries SASS)")
    d = Path(workdir)
    d.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(HEADER_PATH, d / HEADER_PATH.name)
    (d / "kernels.cu").write_text(render_device_source(variants))
    cmd = [nvcc, "--fatbin", "-O3", "-std=c++17", "-I", str(d)]
    for a in archs:
        cmd += gencode(a)
    cmd += list(extra_flags or []) + shlex.split(os.environ.get("SPARSEC_NVCC_FLAGS", ""))
    cmd += ["-o", "kernels.fatbin", "kernels.cu"]
    _run(cmd, str(d), f"nvcc ({', '.join(archs)})")
    return d / "kernels.fatbin"


def _ffi_includes() -> list[str]:
    import tvm_ffi.libinfo as li

    return ["-I" + li.find_include_path(), "-I" + li.find_dlpack_include_path()]


def build_object(variants, archs: list[str], workdir: str) -> Path:
    """fatbin + host launchers -> ``sparsec_cuda.o`` (position independent, for linking into a shared library)."""
    from .cuda_sparse import render_host_source

    d = Path(workdir)
    fat = compile_fatbin(variants, archs, workdir)
    sym = "sparsec_fatbin_" + hashlib.sha1(fat.read_bytes()).hexdigest()[:12]
    (d / "host.cc").write_text(render_host_source(variants, str(fat.resolve()), sym))
    cxx = cxx_path()
    if cxx is None:
        raise ToolMissingError("no C++ compiler (g++/clang++) on PATH: needed to build the CUDA kernel launchers")
    _run([cxx, "-std=c++17", "-O2", "-fPIC", "-fvisibility=hidden", *_ffi_includes(), "-c", "host.cc", "-o", "sparsec_cuda.o"],
         str(d), "C++ compile of the CUDA launchers")  # fmt: skip
    return d / "sparsec_cuda.o"


def link_objects(sources, target, workdir: str) -> list[str]:
    """One object with every variant of ``sources`` (deduplicated), compiled for ``target.arch``."""
    vs = _variants(sources)
    if not vs:
        return []
    arch = target.arch or "sm_80"
    sub = os.path.join(workdir, "sparsec_cuda")
    return [str(build_object(vs, [arch], sub))]


def build_shared(variants, archs: list[str], out_path: str, workdir: str | None = None) -> Path:
    """A standalone shared library exporting the variants' FFI functions (``tvm_ffi.load_module(out_path)``)."""
    own = workdir is None
    d = workdir or interrupt.temp_dir("sparsec-cuda-")
    try:
        obj = build_object(_variants([CudaKernelSource(tuple(variants))]), archs, d)
        cxx = cxx_path()
        _run([cxx, "-shared", "-o", os.path.abspath(out_path), str(Path(obj).resolve()), "-ldl"], d, "link")
        return Path(out_path)
    finally:
        if own:
            shutil.rmtree(d, ignore_errors=True)


_PTXAS_FN = re.compile(r"Compiling entry function '(\w+)' for '(sm_\w+)'")
_PTXAS_USE = re.compile(r"Used (\d+) registers")
_PTXAS_SPILL = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
_PTXAS_STACK = re.compile(r"(\d+) bytes stack frame")
_PTXAS_SERIAL = re.compile(r"wgmma\.mma_async instructions are serialized.*in the function '(\w+)'")


def ptxas_report(variants, arch: str, workdir: str | None = None) -> dict[str, dict[str, int]]:
    """Compile the variants for ``arch`` (nvcc -> ptxas -v) and return {kernel: {registers, spill_bytes, stack}}.
    Raises BuildError when ptxas rejects any kernel."""
    from .cuda_sparse import HEADER_PATH, render_device_source

    nvcc = nvcc_path()
    if nvcc is None:
        raise ToolMissingError("nvcc is not on PATH")
    variants = _variants([CudaKernelSource(tuple(variants))])
    check_archs(variants, [arch])
    own = workdir is None
    d = Path(workdir or interrupt.temp_dir("sparsec-ptxas-"))
    try:
        d.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(HEADER_PATH, d / HEADER_PATH.name)
        (d / "kernels.cu").write_text(render_device_source(variants))
        log = _run([nvcc, "-cubin", "-O3", "-std=c++17", "-I", str(d), *gencode(arch), "-Xptxas", "-v", "-o", "k.cubin",
                    "kernels.cu"], str(d), f"nvcc/ptxas ({arch})")  # fmt: skip
        out: dict[str, dict[str, int]] = {}
        serialized = set(_PTXAS_SERIAL.findall(log))  # ptxas C7514: wgmma pipelining lost (a performance bug)
        cur = None
        for line in log.splitlines():
            m = _PTXAS_FN.search(line)
            if m:
                cur = m.group(1)
                out[cur] = {"registers": 0, "spill_bytes": 0, "stack": 0, "wgmma_serialized": int(cur in serialized)}
                continue
            if cur is None:
                continue
            if (m := _PTXAS_USE.search(line)) is not None:
                out[cur]["registers"] = int(m.group(1))
            if (m := _PTXAS_SPILL.search(line)) is not None:
                out[cur]["spill_bytes"] = int(m.group(1)) + int(m.group(2))
            if (m := _PTXAS_STACK.search(line)) is not None:
                out[cur]["stack"] = int(m.group(1))
        out["_cubin_bytes"] = {"bytes": (d / "k.cubin").stat().st_size}
        return out
    finally:
        if own:
            shutil.rmtree(d, ignore_errors=True)

