"""`sparsec tune --target a100|h100` (backends/cuda_tune.py).

CI (no GPU): the one-line refusal through the real CLI when there is no usable GPU; the arch check as a pure function;
the search with an emulated kernel library (kernels computed on the host from the prepared layouts by the independent
tensor-core decoder) in which one candidate is deliberately wrong (must be rejected) and one deliberately slow (must
lose), recorded in a tuning database that a real `sparsec compress --target h100` then reads (report: tuned); the
DLPack bridge the tuner uses for device memory; the subprocess isolation of unverified candidates (answer and timeout).
GPU (``-m gpu``): the whole command on the local GPU.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest

from sparsec.backends import cuda_tune as ct
from sparsec.backends.kernels import cuda_sparse as cs
from sparsec.backends.targets import get_target
from sparsec.backends.tune import TuningDB

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cli(*args, env=None, timeout=600):
    e = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p), **(env or {}))
    return subprocess.run([sys.executable, "-m", "sparsec", *args], cwd=ROOT, env=e, capture_output=True, text=True,
                          timeout=timeout)  # fmt: skip


def _local_gpu():
    try:
        return ct.detect_gpu()
    except Exception:  # noqa: BLE001
        return None


# ------------------------------------------------------------------------------------------------ refusal (CI)
def test_tune_cuda_without_gpu_is_one_line_error(tmp_path):
    """No GPU visible (CUDA_VISIBLE_DEVICES empty hides any real one): exit 12, one line naming the reason, no DB."""
    db = tmp_path / "db.json"
    r = _cli("tune", "--example", "tiny-gpt", "--target", "h100", "--db", str(db), env={"CUDA_VISIBLE_DEVICES": ""})
    assert r.returncode == 12, r.stdout + r.stderr
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert len(lines) == 1, r.stderr
    assert any(s in lines[0] for s in ("no CUDA driver found here", "no usable CUDA GPU here", "no CUDA GPU here")), lines[0]
    assert not db.exists()


def test_arch_mismatch_rules():
    h100, a100 = get_target("h100"), get_target("a100")
    assert ct.arch_mismatch("h100", h100.arch, (9, 0)) is None
    assert ct.arch_mismatch("a100", a100.arch, (8, 0)) is None
    msg = ct.arch_mismatch("h100", h100.arch, (8, 0), "NVIDIA A100-SXM4-80GB")
    assert msg.startswith("local GPU (NVIDIA A100-SXM4-80GB) is sm_80, target h100 needs sm_90a"), msg
    assert "is sm_90a, target a100 needs sm_80" in ct.arch_mismatch("a100", a100.arch, (9, 0))
    # same major, other minor: SASS would run, but the timings would not be an A100's
    assert "is sm_86, target a100 needs sm_80" in ct.arch_mismatch("a100", a100.arch, (8, 6))
    assert "is sm_120" in ct.arch_mismatch("h100", h100.arch, (12, 0))
    assert ct.arch_of((9, 0)) == "sm_90a" and ct.arch_of((8, 9)) == "sm_89"


class _FakeCuda:
    """Stands in for libcuda: cuInit result, device count, name and compute capability (byref out-parameters)."""

    def __init__(self, init_rc=0, count=1, name=b"NVIDIA A100-SXM4-80GB", cc=(8, 0)):
        def ret(rc=0, **outs):
            def f(*args):
                for i, v in outs.items():
                    a = args[int(i[1:])]
                    if hasattr(a, "_obj"):
                        a._obj.value = v(args) if callable(v) else v
                    else:
                        a.value = v
                return rc

            return f

        names = ["cuDriverGetVersion", "cuDeviceGet", "cuDevicePrimaryCtxRetain", "cuCtxSetCurrent", "cuCtxSynchronize",
                 "cuMemAlloc_v2", "cuMemFree_v2", "cuMemcpyHtoD_v2", "cuMemcpyDtoH_v2", "cuMemsetD32_v2", "cuMemsetD16_v2",
                 "cuEventCreate", "cuEventRecord", "cuEventSynchronize", "cuEventElapsedTime", "cuEventDestroy_v2"]  # fmt: skip
        for n in names:
            setattr(self, n, ret())
        self.cuInit = ret(init_rc)
        self.cuDeviceGetCount = ret(a0=count)
        self.cuDeviceGetName = ret(a0=name)
        self.cuDeviceGetAttribute = ret(a0=lambda args: cc[0] if args[1] == 75 else cc[1])
        self.cuGetErrorName = ret(1)


def test_local_gpu_checks_with_a_fake_driver(monkeypatch):
    """require_gpu_for (what `sparsec tune --target a100|h100` calls before compiling anything) on a stand-in driver:
    an A100 tunes a100, is refused for h100 with the reason; no device / a failing cuInit is a one-line refusal."""
    from sparsec.compressor.errors import ToolMissingError

    monkeypatch.setattr(ct, "load_driver", lambda: ct.Driver(_FakeCuda()))
    info, _ = ct.require_gpu_for(get_target("a100"))
    assert info.name == "NVIDIA A100-SXM4-80GB" and info.cc == (8, 0) and info.arch == "sm_80"
    with pytest.raises(ToolMissingError, match="local GPU .NVIDIA A100-SXM4-80GB. is sm_80, target h100 needs sm_90a") as e:
        ct.require_gpu_for(get_target("h100"))
    assert e.value.exit_code == 12 and "\n" not in str(e.value)
    # the tune entry point refuses before planning or compiling
    from sparsec.backends.tune import tune_graph
    from sparsec.compressor.compress import load_example

    with pytest.raises(ToolMissingError, match="target h100 needs sm_90a"):
        tune_graph(load_example("digits").graph, get_target("h100"), TuningDB(), ["2:4"])
    monkeypatch.setattr(ct, "load_driver", lambda: ct.Driver(_FakeCuda(cc=(9, 0), name=b"NVIDIA H100 80GB HBM3")))
    assert ct.require_gpu_for(get_target("h100"))[0].arch == "sm_90a"
    monkeypatch.setattr(ct, "load_driver", lambda: ct.Driver(_FakeCuda(count=0)))
    with pytest.raises(ToolMissingError, match="no CUDA GPU here .the driver reports 0 devices"):
        ct.require_gpu_for(get_target("h100"))
    monkeypatch.setattr(ct, "load_driver", lambda: ct.Driver(_FakeCuda(init_rc=100)))
    with pytest.raises(ToolMissingError, match="no usable CUDA GPU here .cuInit: CUDA_ERROR_NO_DEVICE"):
        ct.require_gpu_for(get_target("a100"))


# ------------------------------------------------------------------------------------------------ search (CI, emulated)
class RiggedLib(ct.EmulatedLib):
    """Correct kernels except ``wrong`` (output off by 5 %) and ``slow`` (correct, 0.1 s more per call)."""

    def __init__(self, funcs, wrong, slow):
        super().__init__(funcs)
        self.wrong, self.slow = set(wrong), set(slow)

    def __getitem__(self, func):
        f = super().__getitem__(func)

        def g(x, *args):
            f(x, *args)
            if func in self.wrong:
                args[-1][...] = (args[-1].astype(np.float32) * 1.05).astype(np.float16)
            if func in self.slow:
                time.sleep(0.1)

        return g


def test_plan_tunes_other_patterns_as_the_24_kernel():
    """Layers that run on the 2:4 fp16 kernel in their 2:4 form (1:4, 2:8: cuda.nm_as_24_mma_sp) are tuned as that
    kernel with the 2:4 key, which is what their build looks up; 2:4 + int8 has its own kernel and key."""
    from sparsec.compressor.compress import load_example

    graph = load_example("tiny-gpt").graph
    for spec in ("1:4", "2:8"):
        jobs = ct.plan(graph, get_target("h100"), [spec])
        assert jobs and {j.kernel for j in jobs} == {"cuda.nm24_mma_sp"}, spec
        assert all(j.key["nm"] == "2:4" and j.key["format"] == "nm_sparse[dense]" for j in jobs), spec
        assert all((j.linear.weight.n, j.linear.weight.m) == (2, 4) for j in jobs)
    jobs = ct.plan(graph, get_target("h100"), ["2:4+int8"])
    assert jobs and {j.kernel for j in jobs} == {"cuda.nm24_int8_mma_sp"}
    assert all(j.key["nm"] == "2:4" and j.key["format"] == "nm_sparse[group_quant]" and j.key["bits"] == 8 for j in jobs)


@pytest.mark.slow
def test_emulated_search_rejects_wrong_slow_loses_and_build_reads_db(tmp_path):
    from sparsec.compressor.compress import load_example

    graph = load_example("tiny-gpt").graph
    target = get_target("h100")
    seed = int.from_bytes(os.urandom(2), "little")  # candidate sample and weights differ run to run
    jobs = ct.plan(graph, target, ["2:4"], seed)
    shapes = sorted({(j.n, j.k) for j in jobs})
    assert shapes == sorted({(lin.out_features, lin.in_features) for lin in graph.linears()})
    assert {j.kernel for j in jobs} == {"cuda.nm24_mma_sp"} and all(j.key["act_dtype"] == "float16" for j in jobs)
    groups = ct.variants_for(jobs, "sm_90a", 3, seed)
    g = groups[("sp16", False, 0)]
    base = ct.candidate_configs("sp16", "sm_90a", 3, seed)
    assert all(g[p][0].cfg(p) == base[p][0] for p in ct.PATHS)  # the default first in every path
    # each job's own untuned GEMV config (warps from its shape) is measured too
    own = [cs.default_config("sp16", "sm_90a", j.n, j.k)["gemv"] for j in jobs]
    extra = {tuple(sorted(c.items())) for c in own} - {tuple(sorted(c.items())) for c in base["gemv"]}
    assert len(g["gemv"]) == 3 + len(extra) and all(c in [v.cfg("gemv") for v in g["gemv"]] for c in own)
    assert all(len(g[p]) == 3 for p in ("gemm_small", "gemm")) and not any(ct.unverified(v.cfg("gemm")) for v in g["gemm"])
    wrong = g["gemv"][-1]  # a decode candidate that is no job's default computes wrong results
    assert wrong.cfg("gemv") not in own
    slow = g["gemm_small"][2]  # a correct but slow small-GEMM candidate
    funcs = {v.func_name: (v.kind, v.gs) for p in ct.PATHS for v in g[p]}
    seen_variants = []

    def backend(variants, workdir):
        seen_variants.extend(variants)
        return RiggedLib(funcs, [wrong.func_name], [slow.func_name]), ct.HostDevice(), "emulated"

    db = TuningDB(path=tmp_path / "h100.json")
    rows = ct.tune_cuda_graph(graph, target, db, ["2:4"], [1, 16, 128], 3, seed, backend=backend, device_name="emulated",
                              include_unverified=False)  # fmt: skip
    assert {v.func_name for v in seen_variants} == set(funcs)  # one library with every candidate
    assert len(rows) == len(jobs) == len(db.entries) and not any("error" in r for r in rows)
    for e in db.entries:
        assert e["kernel"] == "cuda.nm24_mma_sp" and e["target"] == "h100" and e["tuned"] is True
        assert e["device"] == "emulated" and e["rejected"] == [wrong.func_name]
        cfg = e["config"]
        assert cfg["gemv"] != wrong.cfg("gemv") and cfg["gemm_small"] != slow.cfg("gemm_small")
        assert set(e["ms"]) == set(ct.PATHS) and set(e["ms"]["gemv"]) == {"1", "16"} and set(e["ms"]["gemm_small"]) == {"128"}
        assert set(e["ms"]["gemm"]) == {"512"}  # small layers: the large GEMM at M = 512
        # the winner's time is the least of the correct candidates' (it is one of them)
        assert sum(e["ms"]["gemm_small"].values()) <= sum(e["default_ms"]["gemm_small"].values())
        assert sum(e["ms"]["gemm_small"].values()) < 100.0  # ms: the 0.1 s candidate did not win
    db.save(target_name="h100")

    # a real AOT build for h100 reads the database: the report says tuned, with the recorded configs
    import importlib.util

    if importlib.util.find_spec("tvm") is None:
        pytest.skip("TVM (compiler) not installed: the --target h100 build cannot run here")
    out = tmp_path / "out"
    r = _cli("compress", "--example", "tiny-gpt", "--nm", "2:4", "--target", "h100", "-o", str(out),
             env={"SPARSEC_TUNING_DB": str(db.path)})  # fmt: skip
    if r.returncode == 12:
        pytest.skip(f"CUDA toolchain missing: {r.stderr.strip()}")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    rep = json.loads((out / "report.json").read_text())
    build = rep["build"]
    cuda_layers = [la for la in build["layers"] if la["kernel"] == "cuda.nm24_mma_sp"]
    assert cuda_layers and build["tuning"] == f"tuned {len(cuda_layers)}/{len(cuda_layers)} layers", build["tuning"]
    by_shape = {(e["key"]["out"], e["key"]["in"]): e["config"] for e in db.entries}
    lin = {n.name: n for n in graph.linears()}
    for la in cuda_layers:
        node = lin[la["layer"].split(":")[0]]
        want = by_shape[(node.out_features, node.in_features)]
        assert la["tuned"] and all(la["config"][p] == want[p] for p in ct.PATHS), (la, want)


def test_device_array_dlpack_round_trip():
    """The tuner hands device memory to the kernel library as tvm_ffi tensors through this DLPack producer; on host
    memory the same code must give a tensor over the same bytes with the right shape and dtype."""
    import gc

    tvm_ffi = pytest.importorskip("tvm_ffi")
    rng = np.random.default_rng()
    for dt in (np.float16, np.uint32, np.int32):
        a = (rng.standard_normal((5, 7)) * 100).astype(dt)
        t = ct.DeviceArray(a.ctypes.data, a.shape, a.dtype, 1, 0, owner=a).ffi()
        assert tuple(t.shape) == a.shape and str(t.dtype) == np.dtype(dt).name
        b = np.from_dlpack(t)
        assert np.shares_memory(a, b) and np.array_equal(a, b)
        # the tensor keeps the exporter (and its owner) alive: drop every other reference
        ref = a.copy()
        t = ct.DeviceArray(a.ctypes.data, a.shape, a.dtype, 1, 0, owner=a).ffi()
        del a, b
        gc.collect()
        assert tuple(t.shape) == ref.shape and np.array_equal(np.from_dlpack(t), ref)
    assert isinstance(t, tvm_ffi.Tensor)


def test_kernel_library_reads_the_dlpack_tensors(tmp_path):
    """The real launcher (nvcc + g++ built) receives the tuner's DLPack tensors: given host memory it must see that
    the input is not on a CUDA device and refuse (nothing is launched), rather than crash or run."""
    import shutil

    if shutil.which("nvcc") is None or shutil.which("g++") is None:
        pytest.skip("nvcc/g++ not on PATH")
    tvm_ffi = pytest.importorskip("tvm_ffi")
    from sparsec.backends.kernels.cuda_compile import build_shared

    v = cs.Variant.make("sp16", False, 0, cs.default_config("sp16", "sm_90a"))
    build_shared([v], ["sm_90a"], str(tmp_path / "k.so"))
    lib = tvm_ffi.load_module(str(tmp_path / "k.so"))
    arrays = [np.zeros((4, 128), np.float16), np.zeros((64, 64), np.float16), np.zeros((64, 4), np.uint32),
              np.zeros((4, 64), np.float16)]  # fmt: skip
    host = [ct.DeviceArray(a.ctypes.data, a.shape, a.dtype, 1, owner=a) for a in arrays]
    with pytest.raises(ValueError, match="input is not on CUDA"):
        lib[v.func_name](*[h.ffi() for h in host])


def test_isolated_candidates_answer_or_time_out(tmp_path):
    """Unverified (warp-specialized) candidates run one per subprocess: a correct one comes back measured and checked;
    one that does not answer within the limit is killed and rejected as a timeout."""
    graph_target = get_target("h100")
    from sparsec.compressor.ir import Graph, Linear
    from sparsec.compressor.formats import Dense

    g = Graph("one")
    g.inputs, g.outputs = ["x"], ["y"]
    g.add_value("x", "float32", ("n", 128))
    g.add_value("y", "float32", ("n", 256))
    g.add_node(Linear("l", ["x"], ["y"], weight=Dense(np.random.default_rng().standard_normal((256, 128)).astype(np.float32))))
    jobs = ct.plan(g, graph_target, ["2:4"])
    # every ws config of the search space has been checked on an H100 (the "wmap" ones since 2026-12-05, later): the
    # same candidates with or without unverified ones; a config outside the checked set is searched only when asked for
    groups = ct.variants_for(jobs, "sm_90a", None, include_unverified=True)
    gemm = [v.cfg("gemm") for v in groups[("sp16", False, 0)]["gemm"]]
    assert any(c.get("ws") for c in gemm) and any(c.get("wmap") for c in gemm)
    assert not any(ct.unverified(c) for c in gemm)
    safe = ct.variants_for(jobs, "sm_90a", None, include_unverified=False)[("sp16", False, 0)]["gemm"]
    assert {v.func_name for v in safe} == {v.func_name for v in groups[("sp16", False, 0)]["gemm"]}
    new = {"bm": 128, "bn": 128, "bk": 64, "wm": 2, "wn": 1, "stages": 5, "group": 16, "ws": 1}
    assert cs.ws_config_error("sp16", new, "sm_90a") is None and ct.unverified(new)
    assert not ct.unverified(cs.default_config("sp16", "sm_90a")["gemm"])
    ws = [cs.Variant.make("sp16", False, 0, dict(cs.default_config("sp16", "sm_90a"), gemm=new))]
    one = {("sp16", False, 0): {"gemv": [], "gemm_small": [], "gemm": ws[:1]}}
    got = ct.IsolatedRunner("emulated", str(tmp_path), timeout_s=240).run_all(jobs, one, None)
    r = got[(ws[0].func_name, 0)]
    assert r.ok and r.rel_err < 1e-2 and set(r.ms) == {512} and r.ms[512] > 0, r
    got = ct.IsolatedRunner("emulated", str(tmp_path), timeout_s=0.05).run_all(jobs, one, None)
    r = got[(ws[0].func_name, 0)]
    assert not r.ok and r.status.startswith("timeout"), r


# ------------------------------------------------------------------------------------------------ GPU
@pytest.mark.gpu
def test_tune_on_local_gpu_records_measured_winners(tmp_path):
    gpu = _local_gpu()
    if gpu is None:
        pytest.skip("no CUDA GPU")
    target = {"sm_90a": "h100", "sm_80": "a100"}.get(gpu.arch)
    if target is None:
        pytest.skip(f"local GPU {gpu.name} ({gpu.arch}) is neither an A100 nor an H100")
    db = tmp_path / "db.json"
    r = _cli("tune", "--example", "tiny-gpt", "--target", target, "--formats", "2:4,int4g32", "--candidates", "3", "--db",
             str(db), "--json")  # fmt: skip
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    doc = json.loads(db.read_text())
    kernels = {e["kernel"] for e in doc["entries"]}
    assert {"cuda.nm24_mma_sp", "cuda.int4_dequant_mma"} <= kernels
    for e in doc["entries"]:
        assert e["tuned"] and e["device"].startswith(gpu.name) and e["rejected"] == []
        assert all(t > 0 for p in ct.PATHS for t in e["ms"][p].values())
    # a wrong-target request on this GPU is refused with the reason
    other = "a100" if target == "h100" else "h100"
    r = _cli("tune", "--example", "tiny-gpt", "--target", other, "--db", str(tmp_path / "x.json"))
    assert r.returncode == 12 and f"target {other} needs" in r.stderr


def test_gemv_winner_is_chosen_per_token_tile_kernel():
    """The decode GEMV's two token-tile kernels are separate instantiations, grids and splits: the tuner takes the M <= 8
    kernel from the candidate fastest at M <= 8 and the M > 8 kernel from the one fastest at M > 8 (same pipeline
    options), and the merged config runs exactly those two kernels with those launches (cuda_sparse.gemv_merge)."""
    from sparsec.backends import cuda_tune as ct
    from sparsec.backends.kernels import cuda_sparse as cs

    rng = np.random.default_rng()
    base = cs.default_config("sp4", "sm_90a")
    a = {"warps": 16, "rt": 2, "u": 1, "ks": 0, "xs": 3, "og": 1, "pf": 0, "st": 0}  # fast at M <= 8
    b = {"warps": 8, "rt": 4, "u": 1, "ks": 1, "xs": 3, "og": 1, "pf": 0, "st": 0}  # fast at M = 16
    c = {"warps": 16, "rt": 2, "wr": 2, "u": 1, "ks": 2, "xs": 3, "og": 1, "pf": 0, "st": 0}
    d = dict(b, og=0)  # fastest at M = 16 but another pipeline: not combinable with a
    t = rng.uniform(5, 10)
    meas = [ct.Measured("fa", "gemv", a, True, 1e-4, 0, ms={1: t, 16: 3 * t}),
            ct.Measured("fb", "gemv", b, True, 2e-4, 0, ms={1: 1.5 * t, 16: 2 * t}),
            ct.Measured("fc", "gemv", c, True, 1e-4, 0, ms={1: 2 * t, 16: 2.5 * t}),
            ct.Measured("fd", "gemv", d, True, 1e-4, 0, ms={1: 3 * t, 16: 1.5 * t})]
    w = ct._gemv_per_kernel(meas)
    assert w.ms == {1: t, 16: 2 * t} and w.rel_err == 2e-4 and w.func == "fa+fb"
    assert w.ms[1] + w.ms[16] < min(m.score for m in meas)  # better than any single candidate's sum
    g = w.config
    assert cs.gemv_valid(g)
    va = cs.Variant.make("sp4", False, 64, dict(base, gemv=a))
    vb = cs.Variant.make("sp4", False, 64, dict(base, gemv=b))
    vg = cs.Variant.make("sp4", False, 64, dict(base, gemv=g))
    assert vg.kernel_names()["gemv1"] == va.kernel_names()["gemv1"]
    assert vg.kernel_names()["gemv2"] == vb.kernel_names()["gemv2"]
    for n, k in ((14336, 4096), (4096, 11008), (40, 352)):
        assert cs.gemv_launch("sp4", n, k, 8, g, 132) == cs.gemv_launch("sp4", n, k, 8, a, 132)
        assert cs.gemv_launch("sp4", n, k, 16, g, 132) == cs.gemv_launch("sp4", n, k, 16, b, 132)
    # the row groups of a candidate at M > 8 carry over with their staged activations
    g2 = cs.gemv_merge(b, c)
    assert cs.gemv_valid(g2) and cs.gemv_launch("sp4", 4096, 11008, 16, g2, 132) == cs.gemv_launch("sp4", 4096, 11008, 16, c, 132)
    assert cs.gemv_launch("sp4", 4096, 11008, 3, g2, 132) == cs.gemv_launch("sp4", 4096, 11008, 3, b, 132)
    # one range measured only: no merge
    assert ct._gemv_per_kernel([ct.Measured("fa", "gemv", a, True, 0.0, 0, ms={1: t})]) is None
