"""Exceptions with the exit codes the CLI maps them to."""

from __future__ import annotations


class OnnxPruneError(Exception):
    """Base class: a failure onnxprune explains in one line."""

    exit_code = 1


class InputError(OnnxPruneError):
    """The user's input (model, data, options, paths) cannot be used. Exit code 2."""

    exit_code = 2


class VerificationError(OnnxPruneError):
    """The pruned graph failed a validity check; nothing was written. Exit code 1.

    This is onnxprune's own fault, never the user's: the message names the group
    whose rewrite broke the graph so it can be excluded (``--exclude``) meanwhile.
    """

    exit_code = 1


class GateError(OnnxPruneError):
    """The pruned model violates ``--max-error`` / ``--min-agreement``. Exit code 3.

    The model is not written unless ``--force`` was given.
    """

    exit_code = 3
