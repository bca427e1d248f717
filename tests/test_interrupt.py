"""compressor/interrupt.py: a Ctrl-C reaches the caller of a long call even where the callee would swallow it (TVM
catches a KeyboardInterrupt raised in its Python callbacks), values and errors pass through, temp dirs are cleaned."""
from __future__ import annotations

import os
import signal
import threading
import time

import pytest

from sparsec.compressor import interrupt

main_only = pytest.mark.skipif(threading.current_thread() is not threading.main_thread(),
                               reason="signal handlers run in the main thread only; pytest runs this test elsewhere")  # fmt: skip


@pytest.fixture(autouse=True)
def _enabled(monkeypatch):
    monkeypatch.setattr(interrupt, "_enabled", [True])  # as the CLI sets it


def test_library_use_runs_in_the_callers_thread(monkeypatch):
    """Not enabled (sparsec used as a library): no worker thread, an interrupted call would not keep running."""
    monkeypatch.setattr(interrupt, "_enabled", [False])
    assert interrupt.call_interruptible(threading.current_thread) is threading.current_thread()
    monkeypatch.setattr(interrupt, "_enabled", [True])
    if threading.current_thread() is threading.main_thread():
        assert interrupt.call_interruptible(threading.current_thread) is not threading.current_thread()


def test_values_and_errors_pass_through():
    assert interrupt.call_interruptible(lambda a, b=0: a + b, 2, b=3) == 5
    with pytest.raises(ValueError, match="bad shape"):
        interrupt.call_interruptible(lambda: (_ for _ in ()).throw(ValueError("bad shape")))
    assert not interrupt.abandoned()


@main_only
@pytest.mark.parametrize("via_thread", [False, True])
def test_sigint_reaches_the_caller(via_thread):
    started, steps = threading.Event(), 40

    def swallowing():  # what TVM does with a KeyboardInterrupt raised inside one of its Python callbacks
        started.set()
        try:
            for _ in range(steps):
                time.sleep(0.05)
        except KeyboardInterrupt:
            return "swallowed"
        return "finished"

    def fire():
        started.wait(10)
        time.sleep(0.1)
        os.kill(os.getpid(), signal.SIGINT)

    old = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        threading.Thread(target=fire, daemon=True).start()
        t0 = time.time()
        if not via_thread:  # the failure the worker thread prevents: the interruption is lost
            assert swallowing() == "swallowed"
            return
        with pytest.raises(KeyboardInterrupt):
            interrupt.call_interruptible(swallowing)
        assert time.time() - t0 < 0.05 * steps, "the caller was not interrupted before the callee finished"
        assert interrupt.abandoned()  # the worker is still running; the CLI then ends with os._exit
        done = interrupt._abandoned.pop()
        assert done.wait(10)  # ... and finished without seeing the interruption
    finally:
        signal.signal(signal.SIGINT, old)
    assert not interrupt.abandoned()


def test_cleanup_removes_temp_dirs_still_there(tmp_path, monkeypatch):
    monkeypatch.setattr(interrupt, "_temp_dirs", [])
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", None)
    kept, gone = interrupt.temp_dir("sparsec-a-"), interrupt.temp_dir("sparsec-b-")
    open(os.path.join(kept, "x.o"), "w").close()
    os.rmdir(gone)  # its maker already removed it
    interrupt.cleanup()
    assert os.listdir(tmp_path) == []


def test_cleanup_removes_tvm_temp_dirs(tmp_path, monkeypatch):
    """TVM's export_library compiles and links in a ``tvm.support.utils.TempDirectory`` that TVM removes at interpreter
    exit; the CLI ends an interrupted build with ``os._exit``, which skips it: a SIGTERM during the link left
    ``/tmp/tmp*/lib0.o``. cleanup() removes TVM's live temp directories too."""
    import tempfile

    from tvm.support.utils import TempDirectory, tempdir

    monkeypatch.setattr(interrupt, "_temp_dirs", [])
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setattr(TempDirectory, "TEMPDIRS", set())
    d = tempdir()  # alive, as in the abandoned worker
    open(d.relpath("lib0.o"), "w").close()
    assert os.listdir(tmp_path)
    interrupt.cleanup()
    assert os.listdir(tmp_path) == []
    d.remove()  # its own bookkeeping, before the patched set is restored


def test_the_cli_called_in_process_leaves_builds_in_process(tmp_path):
    """`main()` called in process (tests, scripts) turned on crash reports and worker threads and left them on: every
    later build in that process was forked into a child (backends/build.py), where a caller's spies on the lowering saw
    nothing (16 test_conv failures in a run where a CLI test had gone first in the same worker)."""
    from sparsec.backends.build import _isolated_builds
    from sparsec.cli.main import main

    with pytest.raises(SystemExit):
        main(["inspect", str(tmp_path / "missing.onnx")])
    assert not interrupt.reporting_crashes() and not _isolated_builds()
    assert interrupt.call_interruptible(threading.current_thread) is threading.current_thread()
