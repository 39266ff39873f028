"""Names of the run's temporary files and folders, the sweep of stale ones, and the
status channel to the CLI's guarding parent process.

Every temporary entry onnxprune creates beside an output (the staging folder of a save, the
temp file of a report or plot, the writability probe) carries a tag of this machine and the
creating process id in its name: ``.onnxprune-<tag>-<pid>-<random>``; the run's private
folder under ``TMPDIR`` is ``opr-<pid>-<random>`` with the tag in a marker file inside.  A SIGKILLed run (or a power cut) cannot remove them,
so the next run into the same folder does: an entry is stale when its process is gone (same
tag: same host, boot and pid namespace, so the pid means this process) or when it is older
than :data:`STALE_AFTER` (any tag: another machine on a shared folder, or a reused pid).
Only names of exactly this form are ever removed.

This module imports nothing heavy: the console script's parent process uses it.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import socket
import time
from pathlib import Path

# A run's staging folder lives while it saves and validates; a day is far beyond that.
STALE_AFTER = 24 * 3600.0
_STALE = re.compile(r"^\.onnxprune-([0-9a-f]{8})-(\d+)-[A-Za-z0-9_]{8}(?:\.[A-Za-z0-9]{1,8})?$")
# The run's private folder under TMPDIR: a short name, because Ray puts its AF_UNIX sockets
# (107 bytes at most) under it; the machine tag is in a marker file inside, and a folder
# without the marker is never removed.
_RUN = re.compile(r"^opr-(\d+)-[A-Za-z0-9_]{8}$")
RUN_MARKER = ".onnxprune-run"
# Names of onnxprune before the tag (no pid to ask): removed by age only.
_LEGACY = re.compile(r"^\.onnxprune-(?:probe-)?[a-z0-9_]{8}(?:\.[A-Za-z0-9]{1,8})?$")
_tag: list[str] = []
_status: list[int] = []  # the pipe to the guarding parent, in the CLI's child process


def _machine_tag() -> str:
    """8 hex digits naming this host, this boot and this pid namespace: a pid in a name
    with the same tag is a process ``os.kill(pid, 0)`` can see."""
    if not _tag:
        parts = [socket.gethostname()]
        for probe in ("/proc/sys/kernel/random/boot_id", "/proc/self/ns/pid"):
            try:
                parts.append(Path(probe).read_text().strip() if "boot" in probe else str(os.stat(probe).st_ino))
            except OSError:
                parts.append("-")
        _tag.append(hashlib.sha256("\0".join(parts).encode()).hexdigest()[:8])
    return _tag[0]


def prefix() -> str:
    """The prefix for ``tempfile.mkdtemp``/``mkstemp`` beside an output: ``.onnxprune-<tag>-<pid>-``."""
    return f".onnxprune-{_machine_tag()}-{os.getpid()}-"


def run_prefix() -> str:
    """The prefix of the run's private folder under TMPDIR: ``opr-<pid>-`` (see :func:`mark`)."""
    return f"opr-{os.getpid()}-"


def mark(folder: str | os.PathLike) -> None:
    """Write the machine tag into a run folder, so a later run can judge its pid."""
    Path(folder, RUN_MARKER).write_text(_machine_tag())


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return True  # another user's process (or a pid we cannot ask about): not ours to judge
    return True


def is_stale(entry: Path, now: float | None = None) -> bool:
    """Whether ``entry`` is a temporary file or folder of an onnxprune run that is gone."""
    tag = pid = None
    m = _STALE.match(entry.name)
    if m is not None:
        tag, pid = m.group(1), int(m.group(2))
    elif (r := _RUN.match(entry.name)) is not None and not entry.is_symlink():
        try:
            tag, pid = (entry / RUN_MARKER).read_text()[:8], int(r.group(1))
        except OSError:
            return False  # not (or not yet) marked as a run folder: never ours to remove
    elif not _LEGACY.match(entry.name):
        return False
    try:
        age = (time.time() if now is None else now) - entry.lstat().st_mtime
    except OSError:
        return False
    ours = tag == _machine_tag()
    if ours and pid == os.getpid():
        return False  # this run's own, however old
    return age > STALE_AFTER or (ours and not _alive(pid))


def remove_stale(folder: str | os.PathLike) -> list[Path]:
    """Remove the stale onnxprune temp entries directly inside ``folder``; returns them.
    Never follows a symlink (one is removed as a link); errors leave the entry."""
    removed = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for e in entries:
        p = Path(e.path)
        if not is_stale(p):
            continue
        try:
            if e.is_dir(follow_symlinks=False):
                shutil.rmtree(p)
            else:
                p.unlink()
            removed.append(p)
        except OSError:
            pass
    return removed


def attach(fd: int) -> None:
    """Report to the guarding parent on ``fd`` from now on (the CLI's child process only:
    the descriptor is not inherited by processes this one starts)."""
    os.set_inheritable(fd, False)
    _status[:] = [fd]


def tell_parent(kind: str, text: str) -> None:
    """Send one ``kind text`` line to the guarding parent (no-op without one): ``phase`` names
    what the run does now, ``temp`` a temporary path to remove if this process crashes."""
    if not _status or os.getpid() != _status_pid[0]:
        return
    try:
        os.write(_status[0], f"{kind} {text}\n".encode("utf-8", "surrogateescape"))
    except OSError:  # the parent is gone: nothing to tell
        pass


_status_pid = [os.getpid()]  # a forked process (multiprocessing) must not write on the pipe
# Tests only: crash this process with a real SIGSEGV when the run reaches this phase (no
# model is known that crashes this onnxruntime; the parent's handling is what is tested).
# ``PHASE:SIGTERM``: put SIGTERM's default action back, as ``ray.shutdown()`` does, and ask
# the parent to stop the run, so the forwarded SIGTERM kills this process outright.
_CRASH_AT = os.environ.get("ONNXPRUNE_TEST_CRASH_AT")


def phase(text: str) -> None:
    """Tell the guarding parent what the run does now (named in its line if this crashes)."""
    tell_parent("phase", text)
    if _CRASH_AT and _CRASH_AT.split(":")[0] == text and _status:
        import signal

        if _CRASH_AT.endswith(":SIGTERM"):
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.kill(os.getppid(), signal.SIGTERM)
            time.sleep(60)  # the forwarded signal ends this process
        os.kill(os.getpid(), signal.SIGSEGV)


def created(path: str | os.PathLike) -> None:
    """Tell the guarding parent about a temporary path this process just created."""
    tell_parent("temp", os.fspath(path))
