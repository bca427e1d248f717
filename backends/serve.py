"""``sparsec serve out/``: a local HTTP server for a wasm artifact's ``lib/`` (the in-browser demo).

The browser runs the model itself (``model.wasm`` through ``model.js``); the server only hands out the files of
``lib/`` read-only, with the MIME types browsers need (``application/wasm`` for ``WebAssembly.instantiateStreaming``
and strict-MIME checks, ``text/javascript``), no caching (a rebuilt artifact is picked up on reload), GET/HEAD only,
no directory listings, nothing outside ``lib/``. ``index.html`` is the demo page (type text -> byte-level token ids for
a 256-token vocabulary such as the golden GPT, or ids / numbers for other models; shows the next-token top-k or the
output tensor, and the time of the run in the browser).

Errors: not an artifact, or an artifact without a wasm build -> :class:`ArtifactError` (exit 13); the address cannot
be bound (port in use, no permission) -> :class:`OutputError` (exit 7). Ctrl-C (SIGINT) or SIGTERM stops the server
cleanly (exit 0).
"""
from __future__ import annotations

import errno
import http.server
import signal
import socket
import sys
import threading
from pathlib import Path
from typing import Callable

from ..compressor.errors import ArtifactError, OutputError

SERVED = ("index.html", "model.js", "model.wasm", "params.bin", "manifest.json")
MIME = {
    ".wasm": "application/wasm",
    ".js": "text/javascript; charset=utf-8",
    ".html": "text/html; charset=utf-8",
    ".json": "application/json",
    ".bin": "application/octet-stream",
    ".c": "text/plain; charset=utf-8",
    ".tvmscript": "text/plain; charset=utf-8",
}


def wasm_lib_dir(artifact) -> Path:
    """The ``lib/`` directory of a wasm artifact, checked: raises :class:`ArtifactError` when ``artifact`` is not an
    artifact, was built for another target, or has no complete wasm build."""
    from ..compressor.artifact import load_artifact

    a = load_artifact(artifact)
    target = str(a.manifest.get("target") or a.report.get("target") or "")
    if target.partition(":")[0] != "wasm":
        raise ArtifactError(f"{a.path}: built for {target or 'an unknown target'}, not wasm; `sparsec serve` runs wasm builds in the "
                            "browser (compress with --target wasm)")  # fmt: skip
    status = str((a.report.get("build") or {}).get("status", ""))
    missing = [f for f in SERVED if not (a.lib_dir / f).is_file()]
    if missing:
        why = f" (build status: {status})" if status and status != "built" else ""
        raise ArtifactError(f"{a.path}: has no complete wasm build: lib/{', lib/'.join(missing)} missing{why}")
    return a.lib_dir


class _Handler(http.server.SimpleHTTPRequestHandler):
    extensions_map = {**http.server.SimpleHTTPRequestHandler.extensions_map, **MIME, "": "application/octet-stream"}
    server_version = "sparsec-serve"
    sys_version = ""

    def __init__(self, request, client_address, server):
        super().__init__(request, client_address, server, directory=str(server.lib_dir))

    def end_headers(self):
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        super().end_headers()

    def list_directory(self, path):  # no listings: the page is index.html
        self.send_error(404, "no directory listing")
        return None

    def log_message(self, fmt, *args):
        log = self.server.log  # type: ignore[attr-defined]
        if log is not None:
            log(f"{self.address_string()} {fmt % args}")


class WasmServer(http.server.ThreadingHTTPServer):
    """Threaded HTTP server for one ``lib/`` directory."""

    daemon_threads = True

    def __init__(self, lib_dir: Path, host: str, port: int, log: Callable[[str], None] | None = None):
        self.lib_dir = Path(lib_dir).resolve()
        self.log = log
        if ":" in host:  # an IPv6 address
            self.address_family = socket.AF_INET6
        try:
            super().__init__((host, port), _Handler)
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise OutputError(f"cannot serve on {host}:{port}: the port is in use (choose another with --port, or --port 0 for a free one)")
            if e.errno in (errno.EACCES, errno.EPERM):
                raise OutputError(f"cannot serve on {host}:{port}: permission denied (ports below 1024 need privileges; use --port 8000)")
            if e.errno == errno.EADDRNOTAVAIL or isinstance(e, socket.gaierror):
                raise OutputError(f"cannot serve on {host}:{port}: {host} is not an address of this machine")
            raise OutputError(f"cannot serve on {host}:{port}: {e.strerror or e}")

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        if ":" in str(host):
            host = f"[{host}]"
        return f"http://{host}:{port}/"


def serve(artifact, host: str = "127.0.0.1", port: int = 8000, open_browser: bool = False,
          say: Callable[[str], None] = print, log: Callable[[str], None] | None = None) -> int:  # fmt: skip
    """Serve ``artifact``'s wasm ``lib/`` until Ctrl-C / SIGTERM; returns the exit code (0)."""
    lib = wasm_lib_dir(artifact)
    if not 0 <= int(port) <= 65535:
        from ..compressor.errors import RecipeError

        raise RecipeError(f"--port {port}: expected 0..65535 (0: any free port)")
    srv = WasmServer(lib, host, int(port), log=log)

    def on_signal(signum, frame):  # SIGTERM stops like Ctrl-C; SIGINT also when inherited as ignored (background jobs)
        raise KeyboardInterrupt

    old = {}
    if threading.current_thread() is threading.main_thread():
        old = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        say(f"serving {lib} at {srv.url}  (demo page: {srv.url}index.html; Ctrl-C to stop)")
        if host not in ("127.0.0.1", "localhost", "::1"):
            say(f"note: listening on {host}: other machines on the network can load this model")
        if open_browser:
            import webbrowser

            def _open():
                if not webbrowser.open(srv.url + "index.html"):
                    say("note: no browser could be started here; open the URL above yourself")

            threading.Timer(0.2, _open).start()
        try:
            srv.serve_forever(poll_interval=0.2)
        except KeyboardInterrupt:
            pass
    finally:
        srv.server_close()
        for sig, handler in old.items():
            signal.signal(sig, handler)
    say("stopped")
    try:
        sys.stdout.flush()
    except (OSError, ValueError):  # pragma: no cover
        pass
    return 0


__all__ = ["serve", "wasm_lib_dir", "WasmServer", "MIME", "SERVED"]
