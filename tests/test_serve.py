"""`sparsec serve out/`: the local web server of a wasm artifact's lib/, exercised over 127.0.0.1 only.

The server runs as a real `python -m sparsec serve` subprocess on an ephemeral port (--port 0; the URL is read from
its first line of output): files come back byte-identical with the MIME types browsers need, nothing outside lib/
is reachable, bad artifacts / busy ports give one-line errors with their exit codes, SIGINT (Ctrl-C) stops it with
exit 0. The slow test loads the demo page in headless Chromium from that server, types text (byte-level tokens) and
compares the next-token logits the page computes with the executor's. Tools missing -> skip with the reason.
"""
from __future__ import annotations

import http.server
import json
import queue
import shutil
import signal
import socket
import subprocess
import sys
import threading
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("tvm")

from sparsec.compressor.errors import ArtifactError, OutputError  # noqa: E402

ROOT = str(Path(__file__).resolve().parents[1])
HAS_WASM_LD = shutil.which("clang") is not None and (shutil.which("wasm-ld") or shutil.which("wasm-ld-14")) is not None
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
need_wasm_build = pytest.mark.skipif(not HAS_WASM_LD, reason="clang / wasm-ld is not installed (scripts/install.sh)")


def sparsec(*args, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sparsec", *map(str, args)], capture_output=True, text=True, cwd=ROOT, timeout=600, **kw)


def compress(out: Path, *args) -> Path:
    p = sparsec("compress", *args, "-o", out, "-q")
    assert p.returncode == 0, p.stderr[-2000:]
    return out


@pytest.fixture(scope="module")
def digits_wasm(tmp_path_factory):
    if not HAS_WASM_LD:
        pytest.skip("clang / wasm-ld is not installed (scripts/install.sh)")
    return compress(tmp_path_factory.mktemp("serve") / "digits", "--example", "digits", "--target", "wasm", "--nm", "2:4")


class Server:
    """`sparsec serve ART --port 0` in a subprocess; .url once it listens; .stop() sends SIGINT."""

    def __init__(self, artifact: Path, *extra):
        self.proc = subprocess.Popen([sys.executable, "-m", "sparsec", "serve", str(artifact), "--port", "0", *extra],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)  # fmt: skip
        lines: queue.Queue = queue.Queue()
        threading.Thread(target=lambda: [lines.put(x) for x in self.proc.stdout], daemon=True).start()
        self.lines = lines
        try:
            first = lines.get(timeout=60)
        except queue.Empty:
            self.proc.kill()
            raise AssertionError("sparsec serve printed nothing in 60 s: " + self.proc.stderr.read()[-2000:])
        url = first.split(" at ", 1)[1].split()[0]
        assert url.startswith("http://127.0.0.1:"), first
        self.url = url

    def get(self, path: str, method: str = "GET"):
        req = urllib.request.Request(self.url + path.lstrip("/"), method=method)
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                return r.status, r.headers, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.headers, e.read()

    def stop(self) -> tuple[int, str, str]:
        self.proc.send_signal(signal.SIGINT)
        try:
            rc = self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise AssertionError("sparsec serve did not stop within 15 s of SIGINT")
        rest = []
        while not self.lines.empty():
            rest.append(self.lines.get())
        return rc, "".join(rest), self.proc.stderr.read()


def test_serve_files_over_loopback_then_ctrl_c(digits_wasm):
    lib = digits_wasm / "lib"
    srv = Server(digits_wasm)
    try:
        want = {"model.wasm": "application/wasm", "model.js": "text/javascript", "index.html": "text/html",
                "params.bin": "application/octet-stream", "manifest.json": "application/json"}  # fmt: skip
        for name, ctype in want.items():
            status, headers, body = srv.get(name)
            assert status == 200, name
            assert headers["Content-Type"].split(";")[0] == ctype, (name, headers["Content-Type"])
            assert body == (lib / name).read_bytes(), name
            assert headers["Cache-Control"] == "no-store"
        assert (lib / "model.wasm").read_bytes()[:4] == b"\0asm"
        status, headers, body = srv.get("")  # the demo page at /
        assert status == 200 and body == (lib / "index.html").read_bytes()
        status, headers, _ = srv.get("model.wasm", method="HEAD")
        assert status == 200 and int(headers["Content-Length"]) == (lib / "model.wasm").stat().st_size
        # nothing outside lib/: the artifact's own files are not reachable, even with '..'
        for path in ("report.json", "weights.safetensors", "../report.json", "%2e%2e/report.json", "nothing.bin"):
            status, _, _ = srv.get(path)
            assert status == 404, path
        status, _, _ = srv.get("", method="POST")
        assert status == 501  # read-only
    finally:
        rc, out, err = srv.stop()
    assert rc == 0, (rc, err[-1000:])
    assert "stopped" in out and "Traceback" not in err


@need_wasm_build
def test_serve_errors_are_one_line_with_exit_codes(digits_wasm, tmp_path):
    # not an artifact
    p = sparsec("serve", tmp_path, "--port", "0")
    assert p.returncode == ArtifactError.exit_code == 13, p.stderr
    assert len(p.stderr.strip().splitlines()) == 1 and "not a sparsec artifact" in p.stderr
    # an artifact built for another target (x86, --no-build: fast)
    x86 = compress(tmp_path / "x86", "--example", "digits", "--nm", "2:4", "--no-build")
    p = sparsec("serve", x86, "--port", "0")
    assert p.returncode == 13 and "not wasm" in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr
    # a wasm artifact whose lib/ lacks the wasm module
    broken = tmp_path / "broken"
    shutil.copytree(digits_wasm, broken)
    (broken / "lib" / "model.wasm").unlink()
    p = sparsec("serve", broken, "--port", "0")
    assert p.returncode == 13 and "lib/model.wasm" in p.stderr and "Traceback" not in p.stderr, p.stderr
    # port in use
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        port = s.getsockname()[1]
        p = sparsec("serve", digits_wasm, "--port", port)
    assert p.returncode == OutputError.exit_code == 7, p.stderr
    assert "port is in use" in p.stderr and str(port) in p.stderr and len(p.stderr.strip().splitlines()) == 1
    # a port out of range is a usage error
    assert sparsec("serve", digits_wasm, "--port", "70000").returncode == 2


class _Collector:
    """A second loopback server that receives the page's report (cross-origin POST)."""

    def __init__(self):
        self.result: dict = {}
        self.done = threading.Event()
        col = self

        class H(http.server.BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802
                n = int(self.headers.get("Content-Length", 0))
                col.result.update(json.loads(self.rfile.read(n)))
                self.send_response(204)
                self.send_header("Access-Control-Allow-Origin", "*")
                self.end_headers()
                col.done.set()

            def log_message(self, *a):
                pass

        self.srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
        threading.Thread(target=self.srv.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.srv.server_address[1]}/result"


def headless(url: str, profile: Path, done: threading.Event, seconds: float = 90) -> None:
    proc = subprocess.Popen([CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run", f"--user-data-dir={profile}",
                             "--remote-debugging-port=0", url], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        assert done.wait(seconds), "the page did not report a result"
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None or not HAS_WASM_LD, reason="chromium (or clang / wasm-ld) is not installed (scripts/install.sh)")
def test_served_demo_page_computes_the_executors_logits_in_chromium(tmp_path):
    from sparsec.compressor.artifact import load_artifact
    from sparsec.compressor.executor import Executor

    art = compress(tmp_path / "gpt", "--example", "tiny-gpt", "--target", "wasm", "--nm", "2:4", "--quant", "int4", "--group-size", "16")
    rng = np.random.default_rng()
    # text the page turns into byte-level token ids (UTF-8: the non-ASCII letters are 2 bytes each)
    text = "".join(rng.choice(list("abcdefghijklmnopqrstuvwxyz ,.éü"), 20))
    ids = np.frombuffer(text.encode(), np.uint8).astype(np.int64)[None]
    col = _Collector()
    srv = Server(art, "-q")
    try:
        url = srv.url + "index.html?" + urllib.parse.urlencode({"text": text, "report": col.url, "k": 5})
        headless(url, tmp_path / "profile", col.done)
    finally:
        rc, _, err = srv.stop()
        col.srv.shutdown()
    assert rc == 0, err[-1000:]
    res = col.result
    assert "error" not in res, res
    g = load_artifact(art).graph
    ref = Executor(g).run({g.inputs[0]: ids})[g.outputs[0]][0, -1]
    got = np.array(res["logits"], np.float64)
    assert res["shape"] == [1, ids.shape[1], ref.shape[0]], (res["shape"], ids.shape)
    assert got.shape == ref.shape
    assert np.abs(got - ref).max() / np.abs(ref).max() < 1e-3
    assert res["next_token"] == int(ref.argmax()) and res["ms"] > 0


@pytest.mark.skipif(CHROMIUM is None or not HAS_WASM_LD, reason="chromium (or clang / wasm-ld) is not installed (scripts/install.sh)")
def test_served_demo_page_runs_a_numeric_model_in_chromium(digits_wasm, tmp_path):
    """The generic path of the page (a float input typed as numbers): digits' output row equals the executor's."""
    from sparsec.compressor.artifact import load_artifact
    from sparsec.compressor.executor import Executor

    x = np.random.default_rng().standard_normal((1, 64)).astype(np.float32)
    col = _Collector()
    srv = Server(digits_wasm, "-q")
    try:
        url = srv.url + "index.html?" + urllib.parse.urlencode({"x": ",".join(repr(float(v)) for v in x[0]), "report": col.url})
        headless(url, tmp_path / "profile", col.done, seconds=60)
    finally:
        rc, _, err = srv.stop()
        col.srv.shutdown()
    assert rc == 0, err[-1000:]
    assert "error" not in col.result, col.result
    g = load_artifact(digits_wasm).graph
    ref = Executor(g).run({g.inputs[0]: x})[g.outputs[0]][0]
    got = np.array(col.result["logits"], np.float64)
    assert col.result["shape"] == [1, ref.shape[0]] and got.shape == ref.shape
    assert np.abs(got - ref).max() / np.abs(ref).max() < 1e-3 and col.result["next_token"] == int(ref.argmax())
