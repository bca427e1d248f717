"""Target registry: every target sparsec compiles for is one entry here.

A target names the TVM target it lowers to, the host it runs on, and which kernel schedules apply. Variants take
feature flags after a colon: ``aarch64:dotprod``, ``aarch64:dotprod+i8mm``.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from ..compressor.errors import RecipeError


@dataclass(frozen=True)
class Target:
    name: str
    kind: str  # "cuda" | "llvm" | "wasm"
    description: str
    tvm: dict = field(default_factory=dict)  # TVM target dict
    arch: str | None = None  # cuda: sm_80 / sm_90
    features: tuple[str, ...] = ()
    lib_ext: str = ".so"

    @property
    def is_gpu(self) -> bool:
        return self.kind == "cuda"

    def tvm_dict(self) -> dict:
        """The TVM target dict, with ``mcpu: native`` resolved to this machine's CPU name (LLVM rejects
        ``native`` together with an explicit triple and would silently fall back to a generic CPU)."""
        d = dict(self.tvm)
        if d.get("mcpu") == "native":
            from tvm.target import codegen

            d["mcpu"] = str(codegen.llvm_get_system_cpu())
        return d

    def tvm_target(self):
        import tvm

        return tvm.target.Target(self.tvm_dict())


def _x86_host() -> dict:
    return {"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "native"}


_AARCH64_FEATURES = {"neon": "+neon", "dotprod": "+dotprod", "i8mm": "+i8mm", "fp16": "+fullfp16", "sve": "+sve"}

_BASE: dict[str, Target] = {
    "x86": Target("x86", "llvm", "this machine's x86-64 CPU (LLVM, host features)", _x86_host()),
    "a100": Target("a100", "cuda", "NVIDIA A100 (CUDA sm_80, 2:4 sparse tensor cores via mma.sp)",
                   {"kind": "cuda", "arch": "sm_80"}, arch="sm_80"),  # fmt: skip
    "h100": Target("h100", "cuda", "NVIDIA H100 (CUDA sm_90, 2:4 sparse tensor cores via mma.sp / wgmma.sp)",
                   {"kind": "cuda", "arch": "sm_90a"}, arch="sm_90a"),  # fmt: skip
    "aarch64": Target("aarch64", "llvm", "64-bit ARM Linux/Android (LLVM aarch64, NEON), cross-compiled",
                      {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon"]}, features=("neon",)),  # fmt: skip
    "wasm": Target("wasm", "wasm", "WebAssembly (LLVM wasm32, SIMD128), for node and browsers",
                   {"kind": "llvm", "mtriple": "wasm32-unknown-unknown-wasm", "mattr": ["+simd128"]}, features=("simd128",), lib_ext=".wasm"),  # fmt: skip
}


def known_targets() -> list[str]:
    return sorted(_BASE)


def get_target(spec: str) -> Target:
    """``x86``, ``a100``, ``h100``, ``aarch64[:feat+feat]``, ``wasm[:nosimd]``."""
    name, _, feats = spec.partition(":")
    base = _BASE.get(name)
    if base is None:
        raise RecipeError(f"unknown target {spec!r}; known targets: {', '.join(known_targets())}")
    if not feats:
        return base
    flags = [f for f in feats.replace(",", "+").split("+") if f]
    if name == "aarch64":
        bad = [f for f in flags if f not in _AARCH64_FEATURES]
        if bad:
            raise RecipeError(f"unknown aarch64 feature(s) {bad}; known: {sorted(_AARCH64_FEATURES)}")
        mattr = sorted({"+neon", *(_AARCH64_FEATURES[f] for f in flags)})
        tvm = dict(base.tvm)
        tvm["mattr"] = mattr
        return Target(spec, base.kind, base.description, tvm, features=tuple(sorted(set(("neon", *flags)))))
    if name == "wasm":
        if flags != ["nosimd"]:
            raise RecipeError(f"unknown wasm option(s) {flags}; known: ['nosimd']")
        tvm = dict(base.tvm)
        tvm["mattr"] = []
        return Target(spec, base.kind, base.description + " without SIMD", tvm, features=(), lib_ext=".wasm")
    raise RecipeError(f"target {name!r} takes no options (got {feats!r})")
