"""Ahead-of-time CUDA: the artifact carries compiled device code (fatbin with SASS for the target's arch).

TVM 0.27's CUDA codegen stores the generated CUDA *source* in the built library (module format ``"cuda"``) and
compiles it when the library is loaded, through the global function ``tvm_callback_cuda_compile`` (NVRTC or nvcc on
the machine that runs the model). For an ahead-of-time compiler that is wrong: the artifact must carry compiled
code and load where no CUDA compiler exists. The mechanism here uses TVM's two public hooks:

1. **Build time** (:func:`fatbin_postproc`): while ``tvm.compile`` runs, ``tvm_callback_cuda_postproc`` receives the
   generated CUDA source of the whole module. We compile it with ``nvcc --fatbin -gencode arch=compute_XX,code=sm_XX``
   (sm_80, sm_90a; ptxas runs inside nvcc, so a kernel ptxas rejects fails the build here, not on the GPU) and
   return, instead of the source, a small text envelope holding the fatbin::

       //SPARSEC-FATBIN v1 arch=sm_90a sha256=<hex>
       <base64 of the fatbin>

   TVM stores that text as the CUDA module's code, so ``lib/model.so`` contains the fatbin. The same bytes are also
   written next to it (``lib/model.sm_90a.fatbin``) for ``cuobjdump -sass`` and the CUDA source as
   ``lib/model.cu`` for reference.
2. **Load time** (:func:`install_loader`, called by :mod:`sparsec.backends.runtime`): we register
   ``tvm_callback_cuda_compile`` so that, given an envelope, it returns the embedded fatbin after checking its hash
   -- nothing is compiled; the CUDA driver loads the fatbin (``cuModuleLoadData``). Code that is not an envelope
   (a library built by plain TVM) is handed to the previously registered compiler, if any.

Kernel authors (``backends/kernels/cuda*.py``) write TIR / ``T.ptx`` / ``T.call_extern`` code as usual; everything
TVM's CUDA codegen emits for the module goes through this path. Extra nvcc flags: ``SPARSEC_NVCC_FLAGS``.
"""
from __future__ import annotations

import base64
import hashlib
import os
import shlex
import shutil
import subprocess
from contextlib import contextmanager
from dataclasses import dataclass, field

from ..compressor import interrupt
from ..compressor.errors import BuildError, ToolMissingError

MARKER = "//SPARSEC-FATBIN v1"


def nvcc_path() -> str | None:
    return shutil.which("nvcc")


def gencode(arch: str) -> list[str]:
    """``sm_90a`` -> ``-gencode arch=compute_90a,code=sm_90a``."""
    if not arch.startswith("sm_"):
        raise BuildError(f"CUDA arch {arch!r} is not of the form sm_XX")
    return ["-gencode", f"arch=compute_{arch[3:]},code={arch}"]


def compile_fatbin(code: str, arch: str, workdir: str | None = None) -> bytes:
    """Compile CUDA source to a fatbin with SASS for ``arch`` (deterministic: fixed file names, no line info)."""
    nvcc = nvcc_path()
    if nvcc is None:
        raise ToolMissingError("nvcc is not on PATH: CUDA targets need it at compile time (the artifact carries SASS)")
    own = workdir is None
    d = workdir or interrupt.temp_dir("sparsec-nvcc-")
    try:
        src = os.path.join(d, "model.cu")
        out = os.path.join(d, "model.fatbin")
        with open(src, "w") as f:
            f.write(code)
        cmd = [nvcc, "--fatbin", "-O3", "-std=c++17", *gencode(arch), "-o", "model.fatbin", "model.cu"]
        cmd += shlex.split(os.environ.get("SPARSEC_NVCC_FLAGS", ""))
        r = subprocess.run(cmd, cwd=d, capture_output=True, text=True)
        if r.returncode != 0:
            err = [line for line in (r.stderr or r.stdout).splitlines() if "error" in line.lower()]
            raise BuildError(f"nvcc/ptxas rejected the generated CUDA for {arch}: {(err or [r.stderr.strip()[-300:]])[0][:300]}")
        with open(out, "rb") as f:
            return f.read()
    finally:
        if own:
            shutil.rmtree(d, ignore_errors=True)


def envelope(fatbin: bytes, arch: str) -> str:
    digest = hashlib.sha256(fatbin).hexdigest()
    return f"{MARKER} arch={arch} sha256={digest}\n{base64.b64encode(fatbin).decode()}\n"


def open_envelope(code: str) -> bytes | None:
    """The fatbin inside an envelope (None when ``code`` is not one); raises on a corrupt envelope."""
    if not code.startswith(MARKER):
        return None
    head, _, body = code.partition("\n")
    fields = dict(p.split("=", 1) for p in head[len(MARKER):].split() if "=" in p)
    data = base64.b64decode(body.strip())
    if hashlib.sha256(data).hexdigest() != fields.get("sha256"):
        raise RuntimeError("the CUDA fatbin embedded in the library does not match its checksum")
    return data


@dataclass
class CudaBuildLog:
    arch: str
    sources: list[str] = field(default_factory=list)
    fatbins: list[bytes] = field(default_factory=list)


@contextmanager
def fatbin_postproc(arch: str):
    """While active, every CUDA module TVM generates is compiled to a fatbin for ``arch`` and stored as an envelope.
    Yields a :class:`CudaBuildLog` with the sources and fatbins (for lib/model.cu and lib/model.<arch>.fatbin)."""
    import tvm_ffi

    log = CudaBuildLog(arch)
    prev = tvm_ffi.get_global_func("tvm_callback_cuda_postproc", allow_missing=True)

    def post(code, target):  # noqa: ARG001 - TVM passes the target
        code = str(code)
        if prev is not None:
            code = str(prev(code, target))
        fb = compile_fatbin(code, arch)
        log.sources.append(code)
        log.fatbins.append(fb)
        return envelope(fb, arch)

    tvm_ffi.register_global_func("tvm_callback_cuda_postproc", post, override=True)
    try:
        yield log
    finally:
        if prev is not None:
            tvm_ffi.register_global_func("tvm_callback_cuda_postproc", prev, override=True)
        else:
            tvm_ffi.registry.remove_global_func("tvm_callback_cuda_postproc")


_INSTALLED = False


def install_loader() -> None:
    """Make the TVM runtime load envelopes (see module docstring). Idempotent; works with a runtime-only TVM."""
    global _INSTALLED
    if _INSTALLED:
        return
    import tvm_ffi

    prev = tvm_ffi.get_global_func("tvm_callback_cuda_compile", allow_missing=True)

    def compile_or_unwrap(code, *rest):
        text = str(code)
        fb = open_envelope(text)
        if fb is not None:
            return bytes(fb)
        if prev is None:
            raise RuntimeError("this CUDA library holds CUDA source, not a sparsec fatbin, and no CUDA compiler is registered")
        return prev(code, *rest)

    tvm_ffi.register_global_func("tvm_callback_cuda_compile", compile_or_unwrap, override=True)
    _INSTALLED = True


def load_cuda_runtime() -> None:
    """``import tvm`` does not load TVM's CUDA runtime in runtime-only mode: load it (needs the CUDA driver)."""
    import ctypes

    import tvm_ffi

    if tvm_ffi.get_global_func("ffi.Module.load_from_bytes.cuda", allow_missing=True) is not None:
        return
    import tvm

    lib = os.path.join(os.path.dirname(tvm.__file__), "lib", "libtvm_runtime_cuda.so")
    try:
        ctypes.CDLL(lib, mode=ctypes.RTLD_GLOBAL)
    except OSError as e:
        raise ToolMissingError(f"TVM's CUDA runtime cannot be loaded ({str(e).splitlines()[0][:200]}): this machine has no usable CUDA driver")
    if tvm_ffi.get_global_func("ffi.Module.load_from_bytes.cuda", allow_missing=True) is None:
        raise ToolMissingError("TVM's CUDA runtime did not register its module loader")
