"""Standalone builds for aarch64 (NEON) and wasm32 (SIMD128): the model without the TVM runtime.

The model is lowered exactly as for x86 (:mod:`sparsec.backends.lower`, same kernel registry: the CPU kernels of
:mod:`sparsec.backends.kernels.cpu` are target-parametric, 4 float32 lanes on NEON and simd128) and compiled by
TVM's CPU pipeline up to memory planning. Instead of Relax VM bytecode (which needs ``libtvm_runtime`` on the
device: no aarch64 or wasm build of it exists here, and none can be fetched offline), the planned ``main`` function
is translated to a **call plan in C** (``model.c``): every ``alloc_storage`` becomes an allocation whose size is a C
expression of the input dims (dynamic batch / sequence length are kept), every ``alloc_tensor`` / ``reshape`` a
DLPack tensor view, every ``call_tir`` a call of the TVM-generated kernel through its tvm-ffi packed entry point
(``__tvm_ffi_<name>``). A ~200-line runtime (``capi/sparsec_rt.c``) supplies what the kernels expect from TVM's
runtime (workspace allocation, the parallel launcher: one task, error reporting) and the public API of
``capi/sparsec.h``. Weights are the kernels' prepared parameters (the same ``prepare`` functions the TVM runtime path
uses), written once into ``lib/params.bin`` (64-byte aligned blobs after a 64-byte header).

Files in ``lib/``:

- aarch64: ``libsparsec_model.so`` (kernels + plan + runtime, C API), ``sparsec_run`` (command-line driver, what
  ``sparsec run`` executes under ``qemu-aarch64``), ``sparsec.h``, ``params.bin``, ``model.c``, ``kernels.o``; and
  ``model.so``, the Relax VM library for the TVM runtime on ARM (built by :mod:`sparsec.backends.build`).
- wasm: ``model.wasm`` (kernels + plan + runtime, freestanding: no emscripten, no WASI; math functions imported from
  JavaScript), ``model.js`` (loader for node and browsers), ``params.bin``, ``model.c``.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from ..compressor import interrupt
from ..compressor.errors import BuildError, ToolMissingError, UnsupportedOpError

HERE = Path(__file__).resolve().parent
CAPI = HERE / "capi"
WEB = HERE / "web"
PARAMS_MAGIC = b"SPARSECP"
HEADER = 64
ALIGN = 64
_CODES = {"int": 0, "uint": 1, "float": 2, "bool": 6}


def _dtype_code(dt: str) -> tuple[int, int]:
    dt = str(dt)
    if dt == "bool":
        return 6, 8  # DLPack kDLBool: TVM's kernels check it (uint8 here made `mask == 0` fail at run time)
    for k in ("uint", "int", "float"):
        if dt.startswith(k):
            return _CODES[k], int(dt[len(k):])
    raise UnsupportedOpError(f"standalone build: dtype {dt} is not supported")


# ----------------------------------------------------------------------------------------------------------------
def planned_module(low, target):
    """TVM's CPU pipeline (the same passes as :func:`sparsec.backends.build.cpu_pipeline`) up to memory planning."""
    import tvm
    from tvm import relax
    from tvm.relax.backend.cpu_generic import pipeline as cpu
    from tvm.s_tir import dlight as dl

    from .build import _tvm_target
    from .cpu_schedule import cpu_rules, fast_math

    tt = _tvm_target(target)
    try:
        with tt, tvm.transform.PassContext(opt_level=3):
            seq = tvm.transform.Sequential(
                fast_math() + cpu.library_dispatch_passes(tt) + cpu.legalize_passes(tt) + [dl.ApplyDefaultSchedule(*cpu_rules())]
                + cpu.dataflow_lower_passes(tt)
                + [relax.transform.StaticPlanBlockMemory(), relax.transform.LowerAllocTensor(), relax.transform.LowerRuntimeBuiltin(),
                   relax.transform.ComputePrimValue(), relax.transform.AttachGlobalSymbol()]
            )  # fmt: skip
            mod = seq(low.mod)
            tir = tvm.IRModule({gv: f for gv, f in mod.functions.items() if isinstance(f, tvm.tirx.PrimFunc)})
            _check_no_runtime_calls(tir)
            ex = tvm.compile(tir, target=tt)
    except (BuildError, ToolMissingError, UnsupportedOpError):
        raise
    except Exception as e:  # noqa: BLE001
        msg = [line for line in str(e).strip().splitlines() if line.strip()]
        raise BuildError(f"TVM could not compile the model for {target.name}: {(msg[-1] if msg else type(e).__name__)[:300]}")
    return mod, ex


def _check_no_runtime_calls(tir) -> None:
    """Kernels that call back into TVM's runtime (e.g. ``tvm.contrib.sort.topk`` for a MoE router's TopK) cannot run
    on the standalone runtime: refuse them by name (the build reports it; the artifact keeps model.onnx)."""
    import re

    from ..compressor.errors import UnsupportedOpError

    for gv, f in tir.functions.items():
        names = sorted(set(re.findall(r'call_packed(?:_lowered)?\("([^"]+)"', f.script())))
        if names:
            raise UnsupportedOpError(f"kernel {gv.name_hint} calls the TVM runtime function(s) {', '.join(names)}, which the standalone "
                                     "aarch64/wasm runtime does not provide (e.g. TopK of a MoE router)")  # fmt: skip


class _C:
    """Translate the planned Relax ``main`` to C (see the module docstring)."""

    def __init__(self, mod, low):
        self.mod, self.low = mod, low
        self.lines: list[str] = []
        self.names: dict[Any, str] = {}  # relax var -> C tensor / storage name
        self.tinfo: dict[str, tuple[int, str]] = {}  # C tensor name -> (ndim, dtype)
        self.sym: dict[Any, str] = {}  # tirx var -> C name
        self.kernels: set[str] = set()
        self.consts: list[str] = []
        self.tuples: dict[Any, list] = {}
        self.n = 0

    def fresh(self, p: str) -> str:
        self.n += 1
        return f"{p}{self.n}"

    def expr(self, e) -> str:
        from tvm import tirx

        if isinstance(e, int):
            return f"INT64_C({e})"
        if isinstance(e, tirx.IntImm):
            return f"INT64_C({int(e.value)})"
        if isinstance(e, tirx.Var):
            if e not in self.sym:
                raise BuildError(f"standalone build: shape variable {e.name} is not defined by the model's input shapes")
            return self.sym[e]
        if isinstance(e, tirx.Cast):
            return f"((int64_t){self.expr(e.value)})"
        bins = {tirx.Add: "+", tirx.Sub: "-", tirx.Mul: "*"}
        for cls, op in bins.items():
            if isinstance(e, cls):
                return f"({self.expr(e.a)} {op} {self.expr(e.b)})"
        fns = {tirx.FloorDiv: "rt_fdiv", tirx.FloorMod: "rt_fmod", tirx.Min: "rt_min", tirx.Max: "rt_max", tirx.Div: "rt_tdiv", tirx.Mod: "rt_tmod"}
        for cls, fn in fns.items():
            if isinstance(e, cls):
                return f"{fn}({self.expr(e.a)}, {self.expr(e.b)})"
        raise UnsupportedOpError(f"standalone build: shape expression {e} ({type(e).__name__}) is not supported")

    def tensor(self, name: str, data: str, shape, dtype: str):
        code, bits = _dtype_code(dtype)
        dims = ", ".join(self.expr(d) for d in shape) or "0"
        self.lines.append(f"  int64_t {name}_shape[{max(1, len(shape))}] = {{{dims}}};")
        self.lines.append(f"  rt_tensor {name} = {{{data}, {{1, 0}}, {len(shape)}, {{{code}, {bits}, 1}}, {name}_shape, 0, 0}};")
        self.tinfo[name] = (len(shape), dtype)

    def translate(self) -> str:
        import tvm
        from tvm import relax

        fn = self.mod["main"]
        n_in = len(self.low.inputs)
        L = self.lines
        L.append("int sparsec__plan(rt_tensor *params, const sparsec_tensor *inputs, sparsec_tensor *outputs) {")
        # inputs: bind symbolic dims, check static dims and dtypes
        for i, p in enumerate(fn.params[:n_in]):
            ty = p.ty
            shape = list(ty.shape.values)
            code, bits = _dtype_code(ty.dtype)
            nm = f"in{i}"
            L.append(f"  if (inputs[{i}].ndim != {len(shape)} || inputs[{i}].dtype_code != {code} || inputs[{i}].dtype_bits != {bits})")
            L.append(f"    return rt_fail(\"input {self.low.inputs[i]['name']}: wrong rank or dtype (expected {ty.dtype}, rank {len(shape)})\", 0);")
            for k, d in enumerate(shape):
                if isinstance(d, tvm.tirx.Var) and d not in self.sym:
                    self.sym[d] = f"v_{d.name}"
                    L.append(f"  const int64_t v_{d.name} = inputs[{i}].shape[{k}];")
                    L.append(f"  if (v_{d.name} < 1) return rt_fail(\"input {self.low.inputs[i]['name']}: empty dimension\", 0);")
                    lim = self.low.dim_limits.get(d.name)  # the most the model holds (a buffer sliced by it, positions)
                    if lim is not None:
                        why = str(lim[1]).replace("\\", "/").replace('"', "'")
                        L.append(f"  if (v_{d.name} > {int(lim[0])}) return rt_fail(\"input {self.low.inputs[i]['name']}: dim {k} "
                                 f"is larger than the model supports (at most {int(lim[0])}: {why})\", 0);")  # fmt: skip
                else:
                    L.append(f"  if (inputs[{i}].shape[{k}] != {self.expr(d)}) return rt_fail(\"input {self.low.inputs[i]['name']}: "
                             f"dimension {k} does not match the model\", 0);")  # fmt: skip
            L.append(f"  int64_t {nm}_shape[{max(1, len(shape))}];")
            L.append(f"  for (int k = 0; k < {len(shape)}; ++k) {nm}_shape[k] = inputs[{i}].shape[k];")
            L.append(f"  rt_tensor {nm} = {{inputs[{i}].data, {{1, 0}}, {len(shape)}, {{{code}, {bits}, 1}}, {nm}_shape, 0, 0}};")
            self.tinfo[nm] = (len(shape), str(ty.dtype))
            self.names[p] = nm
            rng = self.low.input_ranges.get(self.low.inputs[i]["name"])
            if rng is not None:
                ct = {"int64": "int64_t", "int32": "int32_t", "uint8": "uint8_t", "int8": "int8_t"}.get(str(ty.dtype))
                if ct is not None:
                    size = " * ".join(f"{nm}_shape[{k}]" for k in range(len(shape))) or "1"
                    L.append(f"  for (int64_t k = 0; k < {size}; ++k) {{ {ct} v = (({ct} *){nm}.data)[k];")
                    L.append(f"    if (v < {rng[0]} || v >= {rng[1]}) return rt_fail(\"input {self.low.inputs[i]['name']}: "
                             f"token ids must be in [{rng[0]}, {rng[1]})\", 0); }}")  # fmt: skip
        for j, p in enumerate(fn.params[n_in:]):
            self.names[p] = f"params[{j}]"
            self.tinfo[f"params[{j}]"] = (len(p.ty.shape.values), str(p.ty.dtype))
        body = fn.body
        for block in body.blocks:
            for b in block.bindings:
                self.binding(b)
        ret = body.body
        if isinstance(ret, relax.Tuple):
            refs = [self.ref(o) for o in ret.fields]
        elif isinstance(ret, relax.Var) and ret in self.tuples:
            refs = list(self.tuples[ret])  # several outputs: the planned main returns a var bound to the tuple
        else:
            refs = [self.ref(ret)]
        if len(refs) != len(self.low.outputs) or any(r is None for r in refs):
            raise BuildError(f"standalone build: main returns {len(refs)} values for {len(self.low.outputs)} outputs")
        for i, t in enumerate(refs):
            nd, dt = self.tinfo[t.lstrip("&")]
            code, bits = _dtype_code(dt)
            tn = t.lstrip("&")
            size = " * ".join(f"{tn}.shape[{k}]" for k in range(nd)) or "1"
            L.append(f"  {{ uint64_t nb = (uint64_t)({size}) * {bits // 8}; void *d = rt_alloc(nb); if (!d) return rt_fail(\"out of memory\", 0);")
            L.append(f"    rt_copy(d, {tn}.data, nb); outputs[{i}].data = d; outputs[{i}].ndim = {nd}; outputs[{i}].dtype_code = {code};")
            L.append(f"    outputs[{i}].dtype_bits = {bits}; for (int k = 0; k < {nd}; ++k) outputs[{i}].shape[k] = {tn}.shape[k]; }}")
        L.append("  return 0;")
        L.append("}")
        return "\n".join(L)

    def constant(self, arr: np.ndarray) -> str:
        name = self.fresh("c")
        raw = np.ascontiguousarray(arr).astype(arr.dtype.newbyteorder("<"), copy=False).tobytes() or b"\0"
        body = ",".join(str(b) for b in raw)
        self.consts.append(f"static const unsigned char {name}_data[{len(raw)}] __attribute__((aligned(64))) = {{{body}}};")
        self.tensor(name, f"(void *){name}_data", list(arr.shape), str(arr.dtype))
        return name

    def ref(self, v) -> str:
        from tvm import relax

        if isinstance(v, relax.Var):
            if v not in self.names:
                raise BuildError(f"standalone build: value {getattr(v, 'name', v)} used before it is defined")
            return self.names[v]
        raise BuildError(f"standalone build: unsupported value {type(v).__name__}")

    def binding(self, b):
        import tvm
        from tvm import relax

        L = self.lines
        if isinstance(b, relax.MatchCast) and isinstance(b.value, relax.Var) and isinstance(b.ty, relax.TensorType):
            # a tensor's dims given other names (unify_broadcast ties two inputs' dims the model needs equal): the
            # same tensor, its sizes checked against the names already bound (or binding new ones)
            src = self.ref(b.value)
            for k, d in enumerate(b.ty.shape.values):
                if isinstance(d, tvm.tirx.Var) and d not in self.sym:
                    self.sym[d] = f"v_{d.name}"
                    L.append(f"  const int64_t v_{d.name} = {src}.shape[{k}];")
                else:
                    L.append(f"  if ({src}.shape[{k}] != {self.expr(d)}) return rt_fail(\"inputs disagree on a size the "
                             f"model needs equal (dim {k} of a tensor derived from them)\", 0);")  # fmt: skip
            self.names[b.var] = src
            return
        if not isinstance(b, relax.VarBinding):
            raise BuildError(f"standalone build: {type(b).__name__} bindings are not supported (data-dependent shapes)")
        v, val = b.var, b.value
        if isinstance(val, relax.Var):
            self.names[v] = self.ref(val)
            return
        if isinstance(val, relax.Tuple):
            self.tuples[v] = [self.ref(f) if not isinstance(f, relax.Tuple) else None for f in val.fields]
            return
        if isinstance(val, relax.TupleGetItem):
            items = self.tuples.get(val.tuple_value)
            if items is None or items[val.index] is None:
                raise BuildError("standalone build: nested tuples are not supported")
            self.names[v] = items[val.index]
            return
        if not isinstance(val, relax.Call):
            raise BuildError(f"standalone build: {type(val).__name__} values are not supported")
        op = val.op
        if isinstance(op, tvm.ir.Op):
            if op.name == "relax.vm.alloc_storage":
                name = self.fresh("s")
                size = self.expr(val.args[0].values[0])
                L.append(f"  void *{name} = rt_alloc((uint64_t)({size})); if (!{name}) return rt_fail(\"out of memory\", 0);")
                self.names[v] = name
                return
            if op.name == "relax.vm.alloc_tensor":
                st, off, shp, dt = val.args[0], val.args[1], val.args[2], val.args[3]
                name = self.fresh("t")
                self.tensor(name, f"(char *){self.ref(st)} + {self.expr(off)}", list(shp.values), str(dt.value))
                self.names[v] = name
                return
            if op.name == "relax.vm.kill_object":
                return
            raise UnsupportedOpError(f"standalone build: Relax operator {op.name} is not supported")
        if isinstance(op, relax.ExternFunc):
            if op.global_symbol == "vm.builtin.reshape":
                src = self.ref(val.args[0])
                name = self.fresh("t")
                self.tensor(name, f"{src}.data", list(val.args[1].values), str(v.ty.dtype))
                self.names[v] = name
                return
            why = _RUNTIME_FUNCTION_WORDS.get(str(op.global_symbol))
            raise UnsupportedOpError(f"standalone build: runtime function {op.global_symbol} is not supported"
                                     + (f" ({why})" if why else ""))  # fmt: skip
        if isinstance(op, tvm.ir.GlobalVar):
            fn = self.mod[op]
            sym = str(fn.attrs["global_symbol"]) if fn.attrs and "global_symbol" in fn.attrs else op.name_hint
            self.kernels.add(sym)
            args = []
            for a in val.args:
                if a in self.sym:  # a shape variable passed as a scalar (relax and tirx share the Var class)
                    args.append(("i", self.sym[a]))
                elif isinstance(a, relax.Var):
                    args.append(("t", f"&{self.ref(a)}" if not self.ref(a).startswith("params[") else f"&{self.ref(a)}"))
                elif type(a).__name__ == "GenericConst" and hasattr(a.value, "numpy"):  # a constant tensor inlined in the module
                    args.append(("t", f"&{self.constant(a.value.numpy())}"))
                elif type(a).__module__ == "tvm.ir.prim.expr":  # a scalar (PrimValue and PrimExpr are one class here)
                    args.append(("i", self.expr(a)))
                elif isinstance(a, relax.ShapeExpr):
                    for d in a.values:
                        args.append(("i", self.expr(d)))
                else:
                    raise UnsupportedOpError(f"standalone build: argument {type(a).__name__} of {sym} is not supported")
            L.append(f"  {{ rt_any a[{max(1, len(args))}];")
            for k, (kind, x) in enumerate(args):
                if kind == "t":
                    L.append(f"    a[{k}].type_index = RT_FFI_DLTENSOR_PTR; a[{k}].zero_padding = 0; a[{k}].v.v_int64 = 0; a[{k}].v.v_ptr = {x};")
                else:
                    L.append(f"    a[{k}].type_index = RT_FFI_INT; a[{k}].zero_padding = 0; a[{k}].v.v_int64 = {x};")
            L.append(f"    if (rt_call(__tvm_ffi_{sym}, \"{sym}\", a, {len(args)})) return -1; }}")
            if v.ty is not None and hasattr(v.ty, "dtype") and not isinstance(v.ty, relax.TupleType):
                pass
            return
        raise UnsupportedOpError(f"standalone build: call of {type(op).__name__} is not supported")


def params_image(low, graph) -> tuple[bytes, list[dict[str, Any]]]:
    """``params.bin`` (header + 64-byte aligned blobs) and the descriptors of every parameter."""
    from .runtime import build_params

    manifest = {"params": [p.to_json() for p in low.params]}
    arrays = build_params(graph, manifest)
    descs, chunks, off = [], [], 0
    for p, a in zip(low.params, arrays):
        raw = np.ascontiguousarray(a).astype(a.dtype.newbyteorder("<"), copy=False).tobytes()
        pad = (-off) % ALIGN
        chunks.append(b"\0" * pad)
        off += pad
        descs.append({"offset": off, "nbytes": len(raw), "shape": [int(s) for s in a.shape], "dtype": str(a.dtype)})
        chunks.append(raw)
        off += len(raw)
    body = b"".join(chunks)
    header = PARAMS_MAGIC + len(body).to_bytes(8, "little") + hashlib.sha256(body).digest()[:16]
    header += b"\0" * (HEADER - len(header))
    return header + body, descs


def model_c(mod, low, descs: list[dict[str, Any]], total: int) -> str:
    c = _C(mod, low)
    plan = c.translate()
    out = ["/* generated by sparsec (backends/cross.py): the call plan of the compiled model */", '#include "sparsec_rt.h"', ""]
    out += [f"extern int __tvm_ffi_{k}(void *, const rt_any *, int32_t, rt_any *);" for k in sorted(c.kernels)]
    out.append("static inline int64_t rt_fdiv(int64_t a, int64_t b) { int64_t q = a / b; return (a % b != 0 && ((a < 0) != (b < 0))) ? q - 1 : q; }")
    out.append("static inline int64_t rt_fmod(int64_t a, int64_t b) { return a - rt_fdiv(a, b) * b; }")
    out.append("static inline int64_t rt_tdiv(int64_t a, int64_t b) { return a / b; }")
    out.append("static inline int64_t rt_tmod(int64_t a, int64_t b) { return a % b; }")
    out.append("static inline int64_t rt_min(int64_t a, int64_t b) { return a < b ? a : b; }")
    out.append("static inline int64_t rt_max(int64_t a, int64_t b) { return a > b ? a : b; }")
    out.append(f"const int sparsec__n_params = {len(descs)};")
    out.append(f"const uint64_t sparsec__params_bytes = UINT64_C({total});")
    rows = []
    for d in descs or [{"offset": 0, "nbytes": 0, "shape": [], "dtype": "float32"}]:
        code, bits = _dtype_code(d["dtype"])
        rows.append(f"  {{UINT64_C({d['offset']}), UINT64_C({d['nbytes']}), {len(d['shape'])}, {code}, {bits}, {{{', '.join(str(s) for s in d['shape']) or '0'}}}}}")
    out.append("const rt_param_desc sparsec__params[] = {\n" + ",\n".join(rows) + "\n};")

    def io_rows(items):
        rs = []
        for it in items:
            code, bits = _dtype_code(it.get("dtype", "float32"))
            shape = [s if isinstance(s, int) else -1 for s in it.get("shape", [])]
            lo, hi = low.input_ranges.get(it["name"], [0, 0])
            rs.append(f"  {{\"{it['name']}\", {len(shape)}, {code}, {bits}, {{{', '.join(map(str, shape)) or '0'}}}, {lo}, {hi}}}")
        return ",\n".join(rs)

    out.append(f"const int sparsec__n_inputs = {len(low.inputs)};")
    out.append("const rt_io_desc sparsec__inputs[] = {\n" + io_rows(low.inputs) + "\n};")
    out.append(f"const int sparsec__n_outputs = {len(low.outputs)};")
    out.append("const rt_io_desc sparsec__outputs[] = {\n" + io_rows([{"name": o, "dtype": "float32", "shape": []} for o in low.outputs]) + "\n};")
    out.append("")
    out += c.consts
    out.append(plan)
    return "\n".join(out) + "\n"


def _run(cmd: list[str], what: str, cwd: str | None = None) -> None:
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd)
    if p.returncode != 0:
        err = (p.stderr or p.stdout).strip().splitlines()
        raise BuildError(f"{what} failed: {(err[-1] if err else 'exit ' + str(p.returncode))[:300]}")


def _tool(name: str, why: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise ToolMissingError(f"{name} is not installed ({why}); scripts/install.sh installs it")
    return path


def link_aarch64(work: str, kernels_o: str, model_c_path: str) -> dict[str, bytes]:
    cc = _tool("aarch64-linux-gnu-gcc", "cross-compiling for aarch64")
    inc = ["-I", str(CAPI)]
    so = os.path.join(work, "libsparsec_model.so")
    _run([cc, "-shared", "-fPIC", "-O2", "-fvisibility=hidden", *inc, "-o", so, kernels_o, model_c_path, str(CAPI / "sparsec_rt.c"), "-lm"],
         "linking libsparsec_model.so")  # fmt: skip
    exe = os.path.join(work, "sparsec_run")
    _run([cc, "-O2", *inc, "-o", exe, str(CAPI / "run_main.c"), "-L", work, "-lsparsec_model", "-Wl,-rpath,$ORIGIN"], "linking sparsec_run")
    return {"libsparsec_model.so": Path(so).read_bytes(), "sparsec_run": Path(exe).read_bytes(), "sparsec.h": (CAPI / "sparsec.h").read_bytes()}


def link_wasm(work: str, kernels_o: str, model_c_path: str, simd: bool) -> dict[str, bytes]:
    clang = _tool("clang", "compiling the wasm runtime")
    ld = shutil.which("wasm-ld") or shutil.which("wasm-ld-14")
    if ld is None:
        raise ToolMissingError("wasm-ld is not installed (linking model.wasm); scripts/install.sh installs lld")
    flags = ["--target=wasm32-unknown-unknown", "-O2", "-ffreestanding", "-fno-builtin", "-nostdlib", "-fvisibility=hidden", "-I", str(CAPI)]
    flags += ["-msimd128"] if simd else ["-mno-simd128"]
    objs = []
    # simd128: + the C 2:4 GEMV that the swizzle kernels call (kernels/cpu.py, gemv_impl "c"; constant swizzle masks)
    for src in (str(CAPI / "sparsec_rt.c"), model_c_path) + ((str(CAPI / "wasm_swizzle.c"),) if simd else ()):
        o = os.path.join(work, Path(src).stem + ".wo")
        _run([clang, *flags, "-c", src, "-o", o], f"compiling {Path(src).name} for wasm32")
        objs.append(o)
    wasm = os.path.join(work, "model.wasm")
    _run([ld, "--no-entry", "--export-dynamic", "--allow-undefined", "-z", "stack-size=1048576", "--initial-memory=4194304",
          "-o", wasm, kernels_o, *objs], "linking model.wasm")  # fmt: skip
    return {"model.wasm": Path(wasm).read_bytes(), "model.js": (WEB / "model.js").read_bytes(), "index.html": (WEB / "index.html").read_bytes()}


def build_standalone(graph, low, target) -> tuple[dict[str, Any], dict[str, bytes]]:
    """Compile the lowered model ``low`` for an aarch64 / wasm target: (info, files of lib/)."""
    mod, ex = planned_module(low, target)
    image, descs = params_image(low, graph)
    csrc = model_c(mod, low, descs, len(image) - HEADER)
    work = interrupt.temp_dir("sparsec-cross-")
    try:
        kobj = os.path.join(work, "kernels.o")
        ex.mod.write_to_file(kobj)
        cpath = os.path.join(work, "model.c")
        Path(cpath).write_text(csrc)
        base = target.name.partition(":")[0]
        if base == "wasm":
            files = link_wasm(work, kobj, cpath, simd="simd128" in target.features)
        else:
            files = link_aarch64(work, kobj, cpath)
            files["kernels.o"] = Path(kobj).read_bytes()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    files["model.c"] = csrc.encode()
    files["params.bin"] = image
    info = {"standalone": {"runtime": "sparsec C API (capi/sparsec.h)", "files": sorted(files), "params_bytes": len(image),
                           "parallel": "one thread (the kernels' parallel loops run as one task)"}}  # fmt: skip
    return info, files


# ----------------------------------------------------------------------------------------------------------------
# running a standalone lib/ on this machine: qemu-aarch64 (user-mode emulation) or node
def write_spt(path, a: np.ndarray) -> None:
    a = np.ascontiguousarray(a)
    code, bits = _dtype_code(str(a.dtype))
    with open(path, "wb") as f:
        f.write(b"SPT1" + np.array([code, bits, a.ndim], "<i4").tobytes() + np.array(a.shape, "<i8").tobytes())
        f.write(a.astype(a.dtype.newbyteorder("<"), copy=False).tobytes())


def read_spt(path) -> np.ndarray:
    b = Path(path).read_bytes()
    if b[:4] != b"SPT1":
        raise BuildError(f"{path}: not a .spt tensor")
    code, bits, nd = np.frombuffer(b[4:16], "<i4")
    shape = tuple(int(s) for s in np.frombuffer(b[16:16 + 8 * nd], "<i8"))
    dt = "?" if int(code) == 6 else {0: "i", 1: "u", 2: "f"}[int(code)] + str(int(bits) // 8)
    return np.frombuffer(b[16 + 8 * nd:], "<" + dt if dt != "?" else dt).reshape(shape).copy()


def _feeds_in_order(manifest, feeds):
    from ..compressor.errors import InputShapeError

    arrays = []
    for spec in manifest["inputs"]:
        if spec["name"] not in feeds:
            raise InputShapeError(f"missing input {spec['name']!r}; the model's inputs are {[s['name'] for s in manifest['inputs']]}")
        x = np.asarray(feeds[spec["name"]])
        want = np.dtype(spec["dtype"])
        if x.dtype != want:
            if x.dtype.kind != want.kind and not (x.dtype.kind in "iu" and want.kind in "iu"):
                raise InputShapeError(f"input {spec['name']!r} is {x.dtype}, the model expects {spec['dtype']}")
            x = x.astype(want)
        arrays.append(x)
    return arrays


def run_standalone(lib_dir, manifest, feeds, repeat: int = 1) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Run an aarch64 (qemu-aarch64) or wasm (node) lib/ on ``feeds``: (outputs, info with the per-run time)."""
    import re

    from ..compressor.errors import InputShapeError

    from .runtime import check_dim_ties

    lib_dir = Path(lib_dir)
    check_dim_ties(manifest, manifest["inputs"], feeds)
    arrays = _feeds_in_order(manifest, feeds)
    base = str(manifest.get("target", "")).partition(":")[0]
    with tempfile.TemporaryDirectory(prefix="sparsec-run-") as tmp:
        ins = []
        for i, a in enumerate(arrays):
            p = os.path.join(tmp, f"in_{i}.spt")
            write_spt(p, a)
            ins.append(p)
        env = dict(os.environ, SPARSEC_REPEAT=str(repeat))
        if base == "aarch64":
            qemu = _tool("qemu-aarch64", "running aarch64 libraries on this machine")
            sysroot = "/usr/aarch64-linux-gnu"
            exe = lib_dir / "sparsec_run"
            if not os.access(exe, os.X_OK):  # artifact files are written without the executable bit
                exe = Path(tmp) / "sparsec_run"
                shutil.copyfile(lib_dir / "sparsec_run", exe)
                exe.chmod(0o755)
            cmd = [qemu, "-L", sysroot, "-E", f"LD_LIBRARY_PATH={lib_dir}", str(exe), str(lib_dir / "params.bin"), tmp, *ins]
        elif base == "wasm":
            node = _tool("node", "running wasm libraries on this machine")
            cmd = [node, str(WEB / "run_node.js"), str(lib_dir), tmp, *ins]
        else:
            raise BuildError(f"target {manifest.get('target')} has no standalone runner")
        p = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if p.returncode != 0:
            msg = " ".join(line.strip() for line in (p.stderr or p.stdout).strip().splitlines()) or f"exit {p.returncode}"
            if "token ids" in msg or "input " in msg or "inputs disagree" in msg or re.search(r"Invalid \S*shape", msg):
                raise InputShapeError(msg)  # the feeds do not fit the model: bad input data (exit 8), as on x86
            raise BuildError(f"{Path(cmd[0]).name} run failed: {msg[:300]}")
        outs = {name: read_spt(os.path.join(tmp, f"out_{i}.spt")) for i, name in enumerate(manifest["outputs"])}
        m = re.search(r"([0-9.]+) ms each", p.stderr)
        info = {"runner": Path(cmd[0]).name, "ms_per_run": float(m.group(1)) if m else None}
        return outs, info


STANDALONE = ("aarch64", "wasm")


def is_standalone(manifest_or_target) -> bool:
    name = manifest_or_target.get("target", "") if isinstance(manifest_or_target, dict) else manifest_or_target.name
    return str(name).partition(":")[0] in STANDALONE


# what a model does that makes the Relax VM call these (the standalone call plan sizes every buffer from the inputs)
_RUNTIME_FUNCTION_WORDS = {
    "vm.builtin.tensor_to_shape": "the model computes a shape from tensor values at run time: a Reshape, Range or "
                                  "Expand whose size is read from a tensor, as position ids after a dynamic-length "
                                  "KV cache",
    "vm.builtin.shape_of": "the shape of a value computed at run time",
}


def build_wasm_lib(graph, low, target, console=None):
    """``build()`` for wasm targets: lib/ = model.wasm + model.js + params.bin + manifest (no Relax VM library).
    Returns (info, the files of lib/ by name, or None)."""
    import json as _json
    import time

    from ..compressor.ir import dumps_json
    from .build import lib_manifest, summarize

    from ..compressor.errors import UnsupportedOpError

    t0 = time.perf_counter()
    half = sorted({v.dtype for v in graph.values.values() if v.dtype in ("float16", "bfloat16")})
    if half:  # LLVM's wasm32 code generation of the half-precision ops did not finish (a 2-Linear fp16 model, > 13 min)
        return {"status": f"not built: {'/'.join(half)} activations are not supported for wasm (no half-precision "
                          f"arithmetic there; export the model in float32); `sparsec run` uses model.onnx"}, None  # fmt: skip
    try:
        sa_info, files = build_standalone(graph, low, target)
    except UnsupportedOpError as e:
        return {"status": f"not built: {e.message}; `sparsec run` uses model.onnx"}, None
    files["kernels.tvmscript"] = "".join(f"# ---- {n}\n{s}\n" for n, s in sorted(low.sources.items())).encode()
    manifest = lib_manifest(low, target, {"library": "model.wasm", **sa_info})
    files["manifest.json"] = dumps_json(manifest).encode()
    info = {"status": "built", "library": "lib/model.wasm", "loader": "lib/model.js",
            "tvm_target": _json.dumps(target.tvm_dict(), sort_keys=True), **sa_info}  # fmt: skip
    info.update(summarize(low))
    if console is not None:
        console.print(f"[dim]build: {info['kernels']} -> model.wasm ({time.perf_counter() - t0:.1f}s)[/dim]")
    return info, files


def runner_missing(manifest) -> str | None:
    """Why ``sparsec run`` cannot run this standalone library here (None when it can)."""
    st = (manifest.get("standalone") or {}).get("status", "")
    if st.startswith("not built"):
        return f"the library targets {manifest.get('target')} and its standalone runtime was {st}"
    base = str(manifest.get("target", "")).partition(":")[0]
    tool = {"aarch64": "qemu-aarch64", "wasm": "node"}.get(base)
    if tool and shutil.which(tool) is None:
        return f"the library targets {manifest.get('target')} and running it here needs {tool}, which is not installed"
    return None


def build_standalone_or_note(graph, low, target) -> tuple[dict[str, Any], dict[str, bytes]]:
    """:func:`build_standalone` for aarch64, where model.so (TVM runtime) is built anyway: an operator the standalone
    runtime lacks leaves a note instead of failing the build."""
    from ..compressor.errors import UnsupportedOpError

    try:
        return build_standalone(graph, low, target)
    except UnsupportedOpError as e:
        return {"standalone": {"status": f"not built: {e.message}"}}, {}
