"""SIGINT/SIGTERM for the command line: one line, exit 130/143, nothing left behind.

The handlers raise :class:`Interrupted`, a BaseException (not an Exception: the
``except Exception`` of a stage that only means "this did not work" must not swallow a
stop request), so ``with`` blocks and ``finally`` clauses on the way out remove every
temporary folder.  After the first signal both are ignored, so a second Ctrl-C cannot
cut that cleanup short; code that must not be cut at all (a commit of renames, the
removal of a temp folder) runs inside :func:`deferred`, which holds a signal until it
ends.  Only the CLI installs the handlers: this module imports nothing heavy, so they are
in place before numpy, onnx and onnxruntime load.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from typing import Iterator

_NAMES = {signal.SIGINT: "interrupted", signal.SIGTERM: "terminated"}
_state = {"depth": 0, "pending": None, "exit_now": False}


class Interrupted(BaseException):
    """A SIGINT or SIGTERM reached the CLI; ``exit_code`` is 128 + the signal number."""

    def __init__(self, signum: int) -> None:
        super().__init__(_NAMES.get(signum, f"signal {signum}"))
        self.signum = signum
        self.exit_code = 128 + signum


def _in_import_lock(frame) -> bool:
    """Whether the interrupted code is importlib's own (a module lock's weakref callback):
    an exception raised there is "ignored" with a message on stderr, and the run goes on."""
    return frame is not None and frame.f_code.co_filename.startswith("<frozen importlib")


def _handler(signum: int, frame) -> None:
    for sig in _NAMES:  # the first signal wins; later ones must not interrupt the cleanup
        signal.signal(sig, signal.SIG_IGN)
    if _state["exit_now"]:
        # The start-up imports: nothing to clean up yet, and an exception raised inside a
        # native module's init (onnx's pybind11) would abort the process instead.
        line, code = message(Interrupted(signum))
        os.write(2, f"{line}\n".encode())
        os._exit(code)
    if _state["depth"]:
        _state["pending"] = _state["pending"] or signum
        return
    if _in_import_lock(frame):  # raise it a moment later, outside importlib
        _state["pending"] = signum
        signal.signal(signal.SIGALRM, _retry)
        signal.setitimer(signal.ITIMER_REAL, 0.01)
        return
    raise Interrupted(signum)


def _retry(_signum: int, frame) -> None:
    if _state["depth"]:  # a deferred block raises the pending signal when it ends
        return
    if _in_import_lock(frame):
        signal.setitimer(signal.ITIMER_REAL, 0.01)
        return
    signal.signal(signal.SIGALRM, signal.SIG_DFL)
    pending, _state["pending"] = _state["pending"], None
    if pending:
        raise Interrupted(pending)


def install(exit_now: bool = False) -> None:
    """Route SIGINT and SIGTERM to :class:`Interrupted` (main thread only), then unblock
    them: the CLI's guarding parent starts this process with both blocked, so one sent
    during the interpreter's start-up waits for these handlers.  With ``exit_now``, until
    :func:`started`, a signal prints its line and exits at once (the imports: nothing
    exists yet that needs removing)."""
    _state["exit_now"] = exit_now
    for sig in _NAMES:
        # An inherited SIG_IGN is a choice of the caller (nohup, a shell's background job): kept.
        if signal.getsignal(sig) is not signal.SIG_IGN:
            signal.signal(sig, _handler)
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, list(_NAMES))


def die_with_parent(parent: int | None) -> None:
    """In the CLI's child process (Linux): receive SIGTERM when the guarding parent dies
    (SIGKILLed), so the run still stops and cleans up instead of running on orphaned."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if parent is not None and os.getppid() != parent:  # it died before the call above
        os.kill(os.getpid(), signal.SIGTERM)


def started() -> None:
    """The start-up imports are done: signals raise :class:`Interrupted` from now on."""
    _state["exit_now"] = False


def ignore() -> None:
    """Ignore both signals from now on (the work is done; only the exit is left)."""
    for sig in _NAMES:
        signal.signal(sig, signal.SIG_IGN)


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """Hold SIGINT/SIGTERM until the block ends, then raise :class:`Interrupted`.

    Without the CLI's handlers (the Python API) this changes nothing.
    """
    _state["depth"] += 1
    try:
        yield
    finally:
        _state["depth"] -= 1
        pending = _state["pending"]
        if pending and not _state["depth"]:
            _state["pending"] = None
            raise Interrupted(pending)


def message(exc: BaseException) -> tuple[str, int]:
    """The CLI's line and exit code for an Interrupted or a KeyboardInterrupt."""
    if isinstance(exc, Interrupted):
        return f"error: {exc}", exc.exit_code
    return "error: interrupted", 128 + signal.SIGINT
