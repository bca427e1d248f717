"""Output directory problems, SIGINT during a run, and byte-identical artifacts for the same inputs + seed."""
from __future__ import annotations

import os
import signal
import time

import pytest

from ._common import listing, one_line_error, popen, run_many


def test_unwritable_output(mlp, tmp_path):
    """An output path under a regular file cannot be created (as root, chmod'ing a directory read-only does not stop
    writes, and a read-only bind mount needs privileges a test does not have: this is the portable case)."""
    path, calib = mlp
    (tmp_path / "afile").write_text("x")
    cases = {"under a file": (("compress", path, "--nm", "2:4", "--calib", calib, "-o", "afile/out", "--no-build"), tmp_path),
             "is a file": (("compress", path, "--nm", "2:4", "--calib", calib, "-o", "afile", "--no-build"), tmp_path)}
    if os.geteuid() != 0:
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o555)
        cases["read-only dir"] = (("compress", path, "--nm", "2:4", "--calib", calib, "-o", "ro/out", "--no-build"), tmp_path)
    for case, p in run_many(cases).items():
        line = one_line_error(p, 7, "afile" if "file" in case else "ro")
        if case == "under a file":  # it said "directory afile is not writable"
            assert "not a directory" in line and "not writable" not in line, line
    assert (tmp_path / "afile").read_text() == "x"
    assert [p for p in listing(tmp_path) if p not in ("ro",)] == ["afile"]


def test_existing_output_without_force_is_untouched(mlp, tmp_path):
    path, calib = mlp
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    (out / "sub").mkdir()
    p = run_many({0: (("compress", path, "--nm", "2:4", "--calib", calib, "-o", "out", "--no-build"), tmp_path)})[0]
    one_line_error(p, 7, "out", "--force")
    assert listing(tmp_path) == ["out", "out/keep.txt", "out/sub"]
    assert (out / "keep.txt").read_text() == "user data"


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _signal_masks(pid: int) -> dict[str, str]:
    """The child's ignored / caught signal masks (/proc/PID/status SigIgn, SigCgt; SIGINT is bit 1): the test failed
    twice in fresh-clone suite runs with the interrupted compress finishing with exit 0, cause not found."""
    try:
        with open(f"/proc/{pid}/status") as f:
            return {k: v.strip() for k, _, v in (line.partition(":") for line in f) if k in ("SigIgn", "SigCgt", "SigBlk")}
    except OSError:
        return {}


@pytest.mark.skipif(not os.path.exists("/proc/self/stat"), reason="needs /proc to see that the run has started working")
def test_sigint_during_compress(gpt2_ts, tmp_path):
    """SIGINT while SparseGPT calibrates: exit 130, one line, no artifact and no temp directory left."""
    p = popen("compress", gpt2_ts, "--nm", "2:4", "--method", "sparsegpt", "--calib-samples", "8192", "--seq-len", "64",
              "-o", "out", "--no-build", cwd=tmp_path)  # fmt: skip
    try:
        t0 = time.time()
        # past interpreter start-up and imports (~2-3 s of CPU), into loading and calibrating
        while _cpu_seconds(p.pid) < 4.0 and p.poll() is None and time.time() - t0 < 120:
            time.sleep(0.1)
        assert p.poll() is None, ("the run ended before it could be interrupted", p.communicate())
        masks = _signal_masks(p.pid)  # for the failure message: whether the child ignored or caught SIGINT
        p.send_signal(signal.SIGINT)
        _, stderr = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 130, (p.returncode, masks, stderr[-2000:])
    lines = stderr.splitlines()
    assert lines == ["sparsec: interrupted"], stderr[-2000:]
    assert listing(tmp_path) == [], listing(tmp_path)


@pytest.mark.parametrize("sig,code,word", [(signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143, "terminated")])
def test_signal_during_tvm_build(mlp, tmp_path, sig, code, word):
    """Ctrl-C / SIGTERM while TVM compiles (x86): the run stops at once with its exit code and one line, and leaves no
    artifact, staging directory or temp directory. TVM catches a KeyboardInterrupt raised in its Python callbacks (a
    Ctrl-C there became "build failed", exit 11) and a handler cannot run inside its C++; SIGTERM's default action
    left the staging directory and /tmp/sparsec-* behind. The build now runs in a worker thread
    (compressor/interrupt.py). This small model's compile is short, so the SIGINT case passes without that too; the
    SIGTERM case does not (exit -15)."""
    path, calib = mlp
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    work = tmp_path / "work"
    work.mkdir()
    p = popen("compress", path, "--nm", "2:4", "--calib", calib, "--target", "x86", "-o", "out", cwd=work,
              extra_env={"TMPDIR": str(tmp)})  # fmt: skip
    seen, t_sig = [], None
    try:
        for line in p.stderr:  # progress lines come as they are written, also while TVM compiles
            seen.append(line)
            if "compiling with TVM" in line:
                p.send_signal(sig)
                t_sig = time.time()
                break
        _, rest = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            p.kill()
    stderr = "".join(seen) + rest
    assert t_sig is not None, ("no 'compiling with TVM' progress line", p.returncode, stderr[-2000:])
    assert p.returncode == code, (p.returncode, stderr[-2000:])
    assert time.time() - t_sig < 15, "the run did not stop soon after the signal"
    assert stderr.splitlines()[-1] == f"sparsec: {word}", stderr[-2000:]
    assert listing(work) == [], listing(work)
    left = [f for f in listing(tmp) if f.split("/")[0] != ".ses"]  # .ses: a session file a dependency keeps in TMPDIR
    assert left == [], left


def _children(pid: int) -> list[int]:
    out = []
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as f:
            out += [int(c) for c in f.read().split()]
    return out


@pytest.mark.skipif(not os.path.exists("/proc/self/task"), reason="needs /proc to find the batch's worker processes")
def test_sigterm_stops_a_batch_and_its_workers(gpt2_ts, tmp_path):
    """SIGTERM to `sparsec batch --jobs 2` (a CI timeout) stops the batch and its workers at once: exit 143, one
    line, no staging directory. Before, the batch's exit waited for the workers to finish their jobs."""
    job = ("    model: {m}\n    nm: \"2:4\"\n    method: sparsegpt\n    calib_samples: 8192\n    seq_len: 64\n")
    (tmp_path / "jobs.yaml").write_text("jobs:\n" + "".join(f"  - name: j{i}\n" + job.format(m=gpt2_ts) for i in range(2)))
    p = popen("batch", "jobs.yaml", "--jobs", "2", "--out", "out", "--no-cache", "--no-build", cwd=tmp_path)
    workers = []
    try:
        t0 = time.time()
        while time.time() - t0 < 120 and p.poll() is None:
            # both workers are in their jobs (the resource tracker, a child too, stays idle)
            workers = [c for c in _children(p.pid) if os.path.exists(f"/proc/{c}/stat") and _cpu_seconds(c) > 3.0]
            if len(workers) >= 2:
                break
            time.sleep(0.1)
        assert p.poll() is None and len(workers) >= 2, ("no two busy workers to stop", p.communicate())
        p.send_signal(signal.SIGTERM)
        t_sig = time.time()
        _, stderr = p.communicate(timeout=120)
        stopped = time.time() - t_sig
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 143, (p.returncode, stderr[-2000:])
    assert stderr.splitlines() == ["sparsec: terminated"], stderr[-2000:]
    assert stopped < 20, f"the batch took {stopped:.1f}s to stop"
    t1 = time.time()
    while any(os.path.exists(f"/proc/{w}") and open(f"/proc/{w}/stat").read().split()[2] != "Z" for w in workers):
        assert time.time() - t1 < 10, "a worker process is still running"
        time.sleep(0.1)
    assert [f for f in listing(tmp_path / "out") if ".tmp-" in f] == []


def test_same_inputs_and_seed_give_byte_identical_artifact(gpt2_ts, tmp_path):
    args = ("compress", gpt2_ts, "--nm", "2:4", "--method", "sparsegpt", "--seed", "11", "--calib-samples", "24",
            "--seq-len", "32", "--no-build", "--quiet")  # fmt: skip
    res = run_many({d: ((*args, "-o", d), tmp_path) for d in ("a", "b")})
    for p in res.values():
        assert p.returncode == 0, p.stderr[-2000:]
    files = [f for f in listing(tmp_path / "a") if f != "timings.json"]
    assert {"weights.safetensors", "model.onnx", "graph.json", "report.json", "manifest.json"} <= set(files)
    assert files == [f for f in listing(tmp_path / "b") if f != "timings.json"]
    for f in files:
        if (tmp_path / "a" / f).is_file():
            assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f
    import json

    rep = json.loads((tmp_path / "a" / "report.json").read_text())
    rows = rep["passes"][0]["rows"]
    assert any(r["status"] == "compressed" and abs(r["sparsity"] - 0.5) < 0.01 for r in rows), "the pass really pruned"
