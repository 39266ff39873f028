"""The console script: signal handlers first, then the (heavy) imports and the run.

On POSIX the command runs in a child process of a small guarding parent, so that a crash in
native code (a segfault inside onnxruntime on a hostile model, an abort, the OOM killer's
SIGKILL) is one line on stderr and a non-zero exit instead of silence: the parent is a bare
interpreter (no numpy, onnx or onnxruntime, so it starts fast), forwards SIGINT/SIGTERM to the
child (which cleans up and exits 130/143 itself), and on a crash removes the temporary
files and folders the child told it about.  ``ONNXPRUNE_NO_GUARD=1`` runs the command in
one process.
"""

from __future__ import annotations

import os
import sys

from . import _signals, _spin

_CHILD = "ONNXPRUNE_STATUS_FD"  # set for the child: the pipe to the parent (see _temps)
_PARENT = "ONNXPRUNE_PARENT_PID"
# What the run was doing, by the phase the child last reported, for the parent's line.
_PHASES = {
    "load": ("onnx or onnxruntime crashed while loading the input model", "nothing was written"),
    "input": ("onnxruntime crashed on the input model (its first run, the check of the input)", "nothing was written"),
    "pruning": ("the run crashed in native code (onnxruntime, onnx or numpy)", "nothing was written"),
    "verify": ("the run crashed while checking the pruned model (onnxruntime)", "nothing was written"),
    "plot": ("the run crashed while drawing the --plot", "nothing was written"),
    "written": ("the run crashed after writing the output model", "it is in place"),
}


def entry() -> None:
    """``onnxprune ...``: exit with the CLI's code; a signal at any moment is one line, 130/143."""
    _spin.settle()  # before numpy is imported, here or in the guarded child, which inherits it
    fd = os.environ.pop(_CHILD, None)
    parent = os.environ.pop(_PARENT, None)
    if fd is None and os.name == "posix" and not os.environ.get("ONNXPRUNE_NO_GUARD"):
        sys.exit(_guard())
    try:
        # A signal held during the start-up (the parent starts this process with both
        # blocked) is raised in here, by install's unblocking.
        _signals.install(exit_now=True)
        if fd is not None and fd.isdigit():
            from . import _temps

            _temps.attach(int(fd))
            _signals.die_with_parent(int(parent) if parent and parent.isdigit() else None)
        from .cli import main  # numpy, onnx, onnx_ir: seconds, during which a signal may come

        _signals.started()

        code = main()
        _signals.ignore()  # done: a late signal must not turn a success into a traceback
        # The interpreter's last collection walks every object a prune made (the graph's
        # nodes and values): moved out of its reach, the exit takes a fraction of the time
        # (RESULTS "Cost").  Nothing relies on it: temporaries are removed by their own
        # finally clauses and finalizers, which run all the same.
        import gc

        gc.freeze()
    except (_signals.Interrupted, KeyboardInterrupt) as exc:
        _signals.ignore()
        line, code = _signals.message(exc)
        print(line, file=sys.stderr)
    sys.exit(code)


# The child runs this very package, whatever its working directory or PYTHONPATH hold: with
# ``-m onnxprune`` the working directory came first on its path, so a folder named onnxprune
# there (a checkout of another version) ran instead of the code the user started.  ``-P``
# keeps the working directory off the path, as a console script has it; the package's own
# root is on the path only while the package itself is imported.
_CHILD_BOOT = (
    "import sys; sys.path.insert(0, sys.argv.pop(1)); import onnxprune; del sys.path[0]; "
    "sys.argv[0] = 'onnxprune'; from onnxprune._entry import entry; entry()"
)


def _package_root() -> str:
    """The folder that holds this ``onnxprune`` package."""
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _guard() -> int:
    """Run the command in a child interpreter and translate its death by a signal."""
    import signal
    import subprocess

    forwarded: list[int] = []
    child: list[subprocess.Popen] = []

    def forward(signum: int, _frame) -> None:
        forwarded.append(signum)
        if child:
            try:
                child[0].send_signal(signum)
            except OSError:
                pass

    stops = (signal.SIGINT, signal.SIGTERM)
    # Held while the child starts: it inherits the mask, so a signal in its own start-up
    # waits until its handlers are in place (it unblocks them in _signals.install).
    signal.pthread_sigmask(signal.SIG_BLOCK, stops)
    for sig in stops:
        if signal.getsignal(sig) is not signal.SIG_IGN:  # nohup's choice is kept
            signal.signal(sig, forward)
    read_end, write_end = os.pipe()
    try:
        env = dict(os.environ, **{_CHILD: str(write_end), _PARENT: str(os.getpid())})
        safe = ["-P"] if sys.version_info >= (3, 11) else []  # -P is new in 3.11; the boot puts the root first anyway
        cmd = [sys.executable, *subprocess._args_from_interpreter_flags(), *safe, "-c", _CHILD_BOOT, _package_root(),
               *sys.argv[1:]]
        try:
            child.append(subprocess.Popen(cmd, env=env, pass_fds=(write_end,)))
        except OSError as exc:
            print(f"error: could not start the onnxprune process: {exc}", file=sys.stderr)
            return 1
    finally:
        os.close(write_end)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, stops)  # a held signal is forwarded now
    code = child[0].wait()
    # The child is done and its code decides: a signal from here on must not kill this
    # process while it exits (the interpreter puts the default action back as it finalises).
    for sig in stops:
        signal.signal(sig, signal.SIG_IGN)
    status = _read_all(read_end)
    if code >= 0:
        return code
    signum = -code
    for line in reversed(status):  # what it left behind: it died before its own cleanup
        if line.startswith("temp "):
            _remove(line[5:])
    if signum in stops and signum in forwarded:
        # Died of the forwarded stop request: before its handlers were in place, or while a
        # library had put the default action back (ray.shutdown does, for about a second).
        line, code = _signals.message(_signals.Interrupted(signum))
        print(line, file=sys.stderr)
        return code
    phases = [line[6:] for line in status if line.startswith("phase ")]
    what, written = _PHASES.get(phases[-1] if phases else "", ("the run crashed", "nothing was written"))
    try:
        name = signal.Signals(signum).name
    except ValueError:
        name = f"signal {signum}"
    if signum == signal.SIGKILL:
        what = what.replace("crashed", "was killed") + " (SIGKILL: out of memory? the kernel's OOM killer sends it)"
    else:
        what += f" ({name})"
    print(f"error: {what}; {written}", file=sys.stderr)
    return 1


def _read_all(fd: int) -> list[str]:
    """What the child wrote on the status pipe, without waiting for a process that may
    still hold it open."""
    os.set_blocking(fd, False)
    chunks = []
    try:
        while True:
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            chunks.append(chunk)
    except BlockingIOError:
        pass
    finally:
        os.close(fd)
    return b"".join(chunks).decode("utf-8", "surrogateescape").splitlines()


def _remove(path: str) -> None:
    """Remove a temporary file or folder the dead child created, if it is still there
    (only names onnxprune gives its temporaries)."""
    import shutil
    import time

    name = os.path.basename(path.rstrip("/"))
    if not name.startswith((".onnxprune-", "opr-")):
        return
    try:
        if os.path.isdir(path) and not os.path.islink(path):
            # A local Ray runtime's processes (their session folder is inside the run's)
            # exit after the child and may write a last log line: try again for a while.
            for _ in range(50):
                shutil.rmtree(path, ignore_errors=True)
                if not os.path.lexists(path):
                    break
                time.sleep(0.1)
        elif os.path.lexists(path):
            os.unlink(path)
    except OSError:
        pass
