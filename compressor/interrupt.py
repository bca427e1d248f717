"""Ctrl-C (SIGINT) and SIGTERM during long native calls.

Python runs a signal handler in the main thread, between bytecodes. A TVM / LLVM compile spends long stretches in
C++ where no handler can run, and where it calls back into Python (TVM passes written in Python, TVMScript parsing)
the KeyboardInterrupt raised there is caught by TVM's C++ and comes back as an error: a Ctrl-C 35 s into `sparsec
compress --example tiny-gpt --target x86` ended as "build failed: TVM could not compile the model for x86:
RuntimeError" (exit 11). :func:`call_interruptible` therefore runs such a call in a worker thread while the main
thread only waits: the handler runs at once, the KeyboardInterrupt unwinds the main thread (removing the staging
directory and temp files on its way), and the worker, which cannot be stopped, is left behind; :func:`abandoned`
tells the CLI to end the process with ``os._exit`` rather than finalize the interpreter under a thread still inside
native code.

SIGTERM (a CI runner's timeout, ``kill``) is :class:`Terminated`, a KeyboardInterrupt, while :func:`handle_sigterm`
is in effect: the same unwinding, exit code 143, where the default action would leave the staging directory and
``/tmp/sparsec-*`` behind.
"""
from __future__ import annotations

import faulthandler
import os
import shutil
import signal
import sys
import tempfile
import threading
from typing import Any, Callable

EXIT_TERMINATED = 143  # 128 + SIGTERM

_abandoned: list[threading.Event] = []  # the "done" events of abandoned workers
_terminated = [False]
_temp_dirs: list[str] = []  # made by temp_dir(): removed by cleanup() when their maker's thread is abandoned
_enabled = [False]  # set by the CLI (and batch workers): a process that ends itself when a worker is abandoned


class Terminated(KeyboardInterrupt):
    """SIGTERM received (see :func:`handle_sigterm`)."""


def _on_sigterm(signum, frame):  # noqa: ARG001
    _terminated[0] = True
    raise Terminated()


def last_signal_terminated() -> bool:
    """Whether SIGTERM was received (for a caller that only sees the interruption, e.g. click's Abort / Exit(130))."""
    return _terminated[0]


def handle_sigterm() -> bool:
    """Make SIGTERM raise :class:`Terminated` in the main thread, where SIGTERM has its default action (not where a
    caller installed its own handler or ignores it). Returns whether the handler was installed."""
    if threading.current_thread() is not threading.main_thread():
        return False
    if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        return False
    signal.signal(signal.SIGTERM, _on_sigterm)
    return True


def enable() -> None:
    """Let :func:`call_interruptible` use worker threads: for a process that ends itself (``os._exit``) once a worker
    is abandoned, the CLI and batch's worker processes. Elsewhere (sparsec used as a library, a notebook) an
    interrupted worker would keep compiling in the background, so the call runs in the caller's thread as before."""
    _enabled[0] = True


def in_child() -> None:
    """In a forked child that does one job and ends with ``os._exit`` (backends/build.py): calls run in this thread,
    no crash reports (the parent reports the child's end), and no temp directories of the parent's to remove."""
    end_cli()
    _temp_dirs.clear()


def end_cli() -> None:
    """The CLI's ``main`` has finished (called in process, by a test or a script that goes on): builds and calls run
    in the caller's thread and process again, as for any library caller (:func:`enable`, :func:`report_crashes`)."""
    _enabled[0] = False
    _crash_fd[0] = None


def call_interruptible(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)``, run in a worker thread when called from the main thread of a process that
    :func:`enable` d it, so that Ctrl-C / SIGTERM interrupt the caller at once (the exception is raised here; the
    worker is abandoned, see :func:`abandoned`). The worker's return value or exception is passed through."""
    if not _enabled[0] or threading.current_thread() is not threading.main_thread():
        return fn(*args, **kwargs)
    box: dict[str, Any] = {}
    done = threading.Event()

    def work() -> None:
        try:
            if reporting_crashes():  # a stack overflow in this thread is reported too (see _alternate_stack)
                _alternate_stack()
            box["value"] = fn(*args, **kwargs)
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
            box["error"] = e
        finally:
            done.set()

    t = threading.Thread(target=work, name=f"sparsec-{getattr(fn, '__name__', 'call')}", daemon=True)
    t.start()
    # an Event, not Thread.join: in Python 3.11 a join interrupted by KeyboardInterrupt marks the thread stopped
    # while it still runs (threading._wait_for_tstate_lock releases the thread's own lock)
    try:
        while not done.wait(0.05):
            pass
    except BaseException:
        if not done.is_set():
            _abandoned.append(done)
        raise
    if "error" in box:
        raise box["error"]
    return box.get("value")


_crash_fd: list[int | None] = [None]  # where report_crashes sends a crash report (the real stderr while fd 2 is a
# pipe: backends/build.py); None: not asked for (sparsec used as a library keeps its caller's faulthandler set-up)


def reporting_crashes() -> bool:
    """Whether :func:`report_crashes` was asked for (the CLI)."""
    return _crash_fd[0] is not None


def report_crashes(fd: int = 2) -> None:
    """Report a crash in native code (a segfault, a stack overflow in TVM's compiler) on ``fd``, with the Python stack
    of every thread, from this thread and from the workers of :func:`call_interruptible` (each has its own alternate
    signal stack, which a stack overflow needs). Called again after ``import tvm``, whose own SIGSEGV handler
    replaces faulthandler's (backends/build.py)."""
    _crash_fd[0] = fd
    faulthandler.disable()  # enable() alone keeps handlers another library replaced (TVM's import installs its own,
    faulthandler.enable(file=fd, all_threads=True)  # which cannot run on an overflowed stack)


_alt_stacks: list = []  # the alternate signal stacks of worker threads (kept: a thread may outlive its caller)


def _alternate_stack() -> None:
    """Give this thread an alternate signal stack. faulthandler's handler runs on one (SA_ONSTACK), but Python sets
    it up only for the thread that first enabled faulthandler: a stack overflow in a worker (TVM's compiler
    recursing) had no stack left to report on, and the process died without a word. Linux / glibc; elsewhere a
    no-op."""
    import ctypes
    import ctypes.util

    class _StackT(ctypes.Structure):
        _fields_ = [("ss_sp", ctypes.c_void_p), ("ss_flags", ctypes.c_int), ("ss_size", ctypes.c_size_t)]

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        buf = ctypes.create_string_buffer(1 << 16)
        st = _StackT(ctypes.cast(buf, ctypes.c_void_p), 0, len(buf))
        if libc.sigaltstack(ctypes.byref(st), None) == 0:
            _alt_stacks.append(buf)
    except (OSError, AttributeError):
        pass


def abandoned() -> bool:
    """Whether a worker of :func:`call_interruptible` is still running after its caller was interrupted."""
    return any(not d.is_set() for d in _abandoned)


def temp_dir(prefix: str) -> str:
    """``tempfile.mkdtemp(prefix=prefix)``, remembered so that :func:`cleanup` removes it when the thread that made it
    is abandoned (its own ``finally`` never runs: the process ends with ``os._exit``)."""
    d = tempfile.mkdtemp(prefix=prefix)
    _temp_dirs.append(d)
    return d


def cleanup() -> None:
    """Remove the :func:`temp_dir` directories that still exist (before ``os._exit`` under an abandoned worker), and
    TVM's own (``export_library`` compiles into a ``tvm.support.utils.TempDirectory``, which TVM removes at
    interpreter exit: ``os._exit`` skips that, and a SIGTERM during the link left ``/tmp/tmp*/lib0.o`` behind)."""
    for d in _temp_dirs:
        if os.path.isdir(d):
            shutil.rmtree(d, ignore_errors=True)
    tvm_utils = sys.modules.get("tvm.support.utils")
    tvm_dirs = getattr(getattr(tvm_utils, "TempDirectory", None), "TEMPDIRS", None)
    for d in list(tvm_dirs or ()):
        shutil.rmtree(d, ignore_errors=True)


def exit_code(e: KeyboardInterrupt) -> int:
    """The exit code of an interruption: 143 for SIGTERM (:class:`Terminated`), 130 for Ctrl-C."""
    return EXIT_TERMINATED if isinstance(e, Terminated) else 130


def exit_if_abandoned(code: int) -> None:
    """Where a worker of :func:`call_interruptible` was abandoned: remove its temp directories (its own ``finally``
    will not run) and end the process with ``os._exit(code)``, not interpreter finalization under a thread still
    inside native code (which aborts). Otherwise return."""
    if not abandoned():
        return
    cleanup()
    for f in (sys.stdout, sys.stderr):
        try:
            f.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)
