"""`sparsec batch`: thresholds, exit codes, summary JSON, the content-addressed cache, invalid job files."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from ._common import listing, mlp_onnx, one_line_error, run_many, sparsec

JOBS = """\
defaults:
  calib: data/calib.npz       # relative to this file
  nm: "2:4"
  method: wanda
  include: "fc.*"
jobs:
  - model: models/mlp.onnx
    name: passing
    max_error: 0.9
    min_size_reduction: 1.05
  - model: models/mlp.onnx
    name: strict
    method: sparsegpt
    max_error: 0.000001
  - model: models/nan.onnx
    name: broken
"""


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    d = tmp_path_factory.mktemp("proj")
    (d / "models").mkdir()
    (d / "data").mkdir()
    mlp_onnx(d / "models" / "mlp.onnx", seed=3)
    mlp_onnx(d / "models" / "nan.onnx", bad="nan")
    np.savez(d / "data" / "calib.npz", x=np.random.default_rng(5).standard_normal((64, 16)).astype(np.float32))
    (d / "jobs.yaml").write_text(JOBS)
    return d


def _summary(path):
    doc = json.loads(path.read_text())
    return doc, {j["name"]: j for j in doc["jobs"]}


def test_batch_exit_codes_summary_and_cache(project, tmp_path):
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    # run from another directory: relative paths in the job file resolve against the job file's directory
    p = sparsec("batch", project / "jobs.yaml", "--jobs", "2", "--json", "summary.json", "--no-build", cwd=elsewhere)
    assert p.returncode == 2, p.stderr[-3000:]  # a job errored (outranks the threshold failure)
    doc, jobs = _summary(elsewhere / "summary.json")
    assert doc["schema"] == "sparsec.batch/1" and doc["exit_code"] == 2
    assert doc["counts"] == {"passed": 1, "failed": 1, "error": 1, "cached": 0}
    assert [j["name"] for j in doc["jobs"]] == ["passing", "strict", "broken"]  # job order, not completion order
    assert jobs["broken"]["status"] == "error" and jobs["broken"]["error_exit_code"] == 9 and "fc1" in jobs["broken"]["error"]
    assert not (project / "sparsec-out" / "broken").exists(), "an errored job leaves no artifact"
    # thresholds checked against the artifact's own report
    for name in ("passing", "strict"):
        rep = json.loads((project / "sparsec-out" / name / "report.json").read_text())
        assert jobs[name]["quality"]["output_rel_error"] == rep["quality"]["output_rel_error"]
        assert rep["passes"][0]["params"]["method"] == ("wanda" if name == "passing" else "sparsegpt")
    passing = {c["name"]: c for c in jobs["passing"]["thresholds"]}
    rep = json.loads((project / "sparsec-out" / "passing" / "report.json").read_text())
    assert passing["min_size_reduction"]["value"] == pytest.approx(rep["model"]["bytes"] / rep["model"]["bytes_after"])
    assert passing["min_size_reduction"]["value"] > 1.05 and all(c["ok"] for c in passing.values())
    strict = jobs["strict"]["thresholds"][0]
    assert jobs["strict"]["status"] == "failed" and not strict["ok"] and strict["value"] > 1e-6
    # the failed job's stderr line says why (with -q the summary footer that held the reason is not printed)
    assert "strict: failed - output relative error" in p.stderr and "not <= max_error" in p.stderr, p.stderr
    assert 0 < rep["quality"]["output_rel_error"] < 0.9
    before = {n: (project / "sparsec-out" / n / "weights.safetensors").read_bytes() for n in ("passing", "strict")}

    # unchanged jobs come from the cache; a threshold change alone does not recompute
    (project / "jobs2.yaml").write_text(JOBS.replace("0.000001", "0.95").replace("  - model: models/nan.onnx\n    name: broken\n", ""))
    p = sparsec("batch", project / "jobs2.yaml", "--json", "-", "--no-build", "--out", project / "sparsec-out")
    assert p.returncode == 0, p.stderr[-3000:]
    doc = json.loads(p.stdout)
    assert doc["counts"] == {"passed": 2, "failed": 0, "error": 0, "cached": 2}, doc["counts"]
    # stdout is the JSON alone; a line per job on stderr (it was empty with `--json -`: a CI log showed no reason)
    assert "passing: passed (cached)" in p.stderr and "strict: passed (cached)" in p.stderr, p.stderr
    for n in ("passing", "strict"):
        assert (project / "sparsec-out" / n / "weights.safetensors").read_bytes() == before[n]

    # new calibration data: a different key, recomputed
    np.savez(project / "data" / "calib.npz", x=np.random.default_rng(6).standard_normal((64, 16)).astype(np.float32))
    p = sparsec("batch", project / "jobs2.yaml", "--json", "-", "--no-build", "--quiet")
    assert p.returncode == 0, p.stderr[-3000:]
    doc = json.loads(p.stdout)
    assert doc["counts"]["cached"] == 0
    assert "passing:" not in p.stderr and "strict:" not in p.stderr, p.stderr  # -q: no line for a job that passed
    assert [p.name for p in (project / ".sparsec-cache").iterdir()].__len__() == 4  # two old entries + two new


BAD_JOBS = {
    "unknown key": ("jobs:\n  - model: m.onnx\n    nm: '2:4'\n  - model: m.onnx\n    nmm: '2:4'\n", ("jobs[1]", "nmm", "nm")),
    "bad value": ("jobs:\n  - model: m.onnx\n    nm: '2:4'\n    method: best\n", ("jobs[0]", "best")),
    "unquoted N:M": ("jobs:\n  - model: m.onnx\n    nm: 2:4\n", ("jobs[0]", "nm", "quotes")),
    "bad type": ("jobs:\n  - model: m.onnx\n    max_error: lots\n", ("jobs[0]", "max_error")),
    "no model": ("jobs:\n  - nm: '2:4'\n", ("jobs[0]", "model")),
    "no jobs": ("defaults:\n  nm: '2:4'\n", ("jobs",)),
    "bad top-level": ("jobs:\n  - model: m.onnx\njbos: []\n", ("jbos",)),
    "bad size ratio": ("jobs:\n  - model: m.onnx\n    min_size_reduction: 0.5\n", ("jobs[0]", "min_size_reduction")),
    "bad device": ("jobs:\n  - model: m.onnx\n    device: foo\n", ("jobs[0]", "foo")),
}


def test_invalid_job_files(tmp_path):
    cases = {}
    for case, (text, _) in BAD_JOBS.items():
        w = tmp_path / case.replace(" ", "_").replace(":", "")
        w.mkdir()
        (w / "jobs.yaml").write_text(text)
        cases[case] = (("batch", "jobs.yaml", "--no-build"), w)
    for case, p in run_many(cases).items():
        one_line_error(p, 6, "jobs.yaml", *BAD_JOBS[case][1])
        assert listing(cases[case][1]) == ["jobs.yaml"], case  # nothing ran: no out/ or cache dirs
    p = sparsec("batch", "--jobs", "0", "x.yaml")
    assert p.returncode == 2 and "Traceback" not in p.stderr  # click usage errors exit 2 as well


def test_cache_key_covers_external_data_calibration_and_seed_not_thresholds(tmp_path):
    import onnx

    from sparsec.compressor.batch import job_key, load_jobs

    m = onnx.load(str(mlp_onnx(tmp_path / "tmp.onnx")))
    onnx.save(m, str(tmp_path / "ext.onnx"), save_as_external_data=True, all_tensors_to_one_file=True, location="ext.onnx.data",
              size_threshold=0)  # fmt: skip
    np.savez(tmp_path / "c.npz", x=np.ones((8, 16), np.float32))

    def key(text):
        (tmp_path / "j.yaml").write_text(text)
        (job,) = load_jobs(tmp_path / "j.yaml")
        return job_key(job)

    base = "jobs:\n  - model: ext.onnx\n    nm: '2:4'\n    calib: c.npz\n"
    k0 = key(base)
    assert key(base + "    max_error: 0.1\n    min_size_reduction: 1.2\n") == k0  # thresholds: checked on the cached report
    assert key(base + "    seed: 1\n") != k0
    assert key(base + "    target: aarch64\n") != k0
    assert key(base + "    method: sparsegpt\n") != k0
    data = bytearray((tmp_path / "ext.onnx.data").read_bytes())
    data[5] ^= 1
    (tmp_path / "ext.onnx.data").write_bytes(bytes(data))
    k1 = key(base)
    assert k1 != k0  # the weights live in the external file
    np.savez(tmp_path / "c.npz", x=np.zeros((8, 16), np.float32))
    assert key(base) != k1


def test_interrupted_batch_starts_no_job_a_worker_was_handed(monkeypatch):
    """After a Ctrl-C the pool's workers still hold the jobs it had queued to them; with the batch's stop event set
    a worker refuses them (one such job ran to its end and left an artifact 8-12 s after the Ctrl-C), and a worker
    that a Ctrl-C interrupts mid-job sets the event for the others."""
    import signal
    import threading

    from sparsec.compressor import batch

    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}  # a job sets them (a worker's)
    try:
        ran = []
        monkeypatch.setattr(batch, "run_job", lambda *a, **k: ran.append(a) or {"status": "passed"})
        stop = threading.Event()
        monkeypatch.setattr(batch, "_STOP", stop)
        assert batch._run_job_in_worker("job", "out", None) == {"status": "passed"} and len(ran) == 1
        stop.set()
        with pytest.raises(KeyboardInterrupt):
            batch._run_job_in_worker("job", "out", None)
        assert len(ran) == 1
        stop.clear()

        def interrupted(*a, **k):
            raise KeyboardInterrupt

        monkeypatch.setattr(batch, "run_job", interrupted)
        with pytest.raises(KeyboardInterrupt):
            batch._run_job_in_worker("job", "out", None)
        assert stop.is_set()
    finally:
        for sig, h in saved.items():
            signal.signal(sig, h)
