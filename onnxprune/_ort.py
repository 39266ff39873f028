"""onnxruntime access: one place that says what to do when it is missing."""

from __future__ import annotations

from types import ModuleType

from ._signals import deferred
from .errors import InputError

# onnxruntime's own log lines would break the one-line-per-failure contract: fatal only
# (4), unless the CLI's -v lowers it to warnings (2).
LOG_SEVERITY = 4


def ort() -> ModuleType:
    """The onnxruntime module, or an InputError telling how to install it."""
    try:
        with deferred():  # a signal inside its (pybind11) module init would abort the process
            import onnxruntime
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise InputError(
            "onnxruntime is not installed: pip install 'onnxprune[cpu]' (or 'onnxprune[gpu]' "
            "for CUDA; never both, they install the same module)"
        ) from exc
    return onnxruntime


def set_log_severity(level: int) -> None:
    """Severity of onnxruntime's log for every later session and its default logger."""
    global LOG_SEVERITY
    LOG_SEVERITY = level
    try:
        with deferred():  # as in ort()
            import onnxruntime
    except ImportError:  # pragma: no cover - reported by ort() when it is needed
        return
    onnxruntime.set_default_logger_severity(level)


_arena: dict[str, bool] = {}


def _shared_arena(rt: ModuleType) -> bool:
    """Register one CPU arena for the sessions of this process (once); whether there is one.

    A prune opens dozens of short sessions (segments, probe tails, verification); each with
    an arena of its own faulted its memory in afresh from the kernel, page by page, and
    returned it when closed (benchmarks/RESULTS.md, "Cost").  The shared arena keeps the
    largest working set of any session for the life of the process, as one session's did
    for its own life."""
    if "cpu" not in _arena:
        try:
            info = rt.OrtMemoryInfo("Cpu", rt.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, rt.OrtMemType.DEFAULT)
            rt.create_and_register_allocator(info, rt.OrtArenaCfg(0, 1, -1, -1))  # kSameAsRequested: no power-of-two slack
            _arena["cpu"] = True
        except Exception:  # noqa: BLE001 - an onnxruntime without it: each session its own
            _arena["cpu"] = False
    return _arena["cpu"]


def in_shared_arena(providers: list[str] | None) -> bool:
    """Whether the outputs of a session on ``providers`` live in the process's shared CPU
    arena (:func:`_shared_arena`): holding one pins its own chunk, which the arena reuses
    once it is released, not a closed session's whole arena."""
    return bool(_arena.get("cpu")) and list(providers or ["CPUExecutionProvider"]) == ["CPUExecutionProvider"]


def session(path: str | bytes, providers: list[str] | None = None, initializers: dict | None = None):
    """An InferenceSession on ``path`` (or a serialised model) with quiet logging, whose
    threads do not spin once a run is done.  ``initializers``: name -> numpy array for the
    model's external-data initializers of those names (onnxruntime copies them in)."""
    rt = ort()
    opts = rt.SessionOptions()
    opts.log_severity_level = LOG_SEVERITY
    # onnxruntime's pool threads spin-wait after each run by default, for the next one.  A
    # prune runs numpy (the Gram and refit sums, BLAS on the same cores) or another session
    # right after a run, and the spinning threads took those cores (RESULTS "Cost").
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    # The memory pattern, planned after a session's first run, asks the arena for one new
    # block for all of a run's tensors on top of what the first run left free in it: more
    # resident memory, in fresh pages, for runs no faster (RESULTS "Cost").
    opts.enable_mem_pattern = False
    if _shared_arena(rt):
        opts.add_session_config_entry("session.use_env_allocators", "1")
    if initializers:
        opts.add_external_initializers(list(initializers), [rt.OrtValue.ortvalue_from_numpy(a) for a in initializers.values()])
    return rt.InferenceSession(path, sess_options=opts, providers=providers or ["CPUExecutionProvider"])
