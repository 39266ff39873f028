"""Command line: ``onnxprune IN OUT [options]`` and ``onnxprune analyze IN``."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import sys
import tempfile
import warnings
from typing import Iterator

import click
from rich.console import Console

from . import _ort, _signals, _temps, api, checks
from .criteria import METHODS
from .compensate import COMPENSATIONS
from .config import PruneConfig
from .data import Preprocess
from .methods import MethodOptions
from .errors import InputError, OnnxPruneError
from .load import check_side_outputs, one_commit
from .report import plot, print_analysis, print_result, write_json


class _DefaultToPrune(click.Group):
    """``onnxprune IN OUT`` means ``onnxprune prune IN OUT``."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h", "--version"):
            args = ["prune", *args]
        return super().parse_args(ctx, args)


@click.group(cls=_DefaultToPrune, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="onnxprune")
def cli() -> None:
    """Structured pruning of ONNX models: channels, neurons, really removed."""


def _floats(text: str | None, name: str) -> tuple[float, ...] | None:
    if text is None:
        return None
    try:
        return tuple(float(x) for x in text.split(","))
    except ValueError:
        raise InputError(f"{name} takes comma-separated numbers, got '{text}'") from None


@contextlib.contextmanager
def _quiet_third_party() -> Iterator[None]:
    """Every failure is one line: third-party warnings, log records (onnx_ir's "Skipping
    serialization") and onnxruntime's log stay silent unless ``-v`` loosens them."""
    previous = logging.root.manager.disable
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logging.disable(logging.CRITICAL)
        _ort.set_log_severity(4)
        try:
            yield
        finally:
            logging.disable(previous)
            _ort.set_log_severity(4)


def _verbose(ctx: click.Context, param: click.Parameter, value: bool) -> bool:
    """``-v``: let third-party warnings, log records and onnxruntime's warnings through."""
    if value:
        warnings.simplefilter("default")
        logging.disable(logging.NOTSET)
        _ort.set_log_severity(2)
    return value


_verbose_option = click.option(
    "--verbose", "-v", is_flag=True, expose_value=False, callback=_verbose, is_eager=True,
    help="also show third-party warnings and log lines (onnxruntime, onnx_ir)",
)


@cli.command("prune")
@click.argument("input_model", type=click.Path(dir_okay=True, path_type=str))
@click.argument("output_model", type=click.Path(path_type=str))
@click.option("--method", default=None, metavar="NAME",
              help=f"importance criterion: {', '.join(METHODS)}, or one an installed plug-in registers "
                   "[default: wanda with --calib, else l1]")
@click.option("--ratio", type=float, default=0.5, show_default=True, help="share of each group's channels to remove")
@click.option("--global", "global_", is_flag=True,
              help="one threshold over per-group standardised scores (with a target: instead of the sensitivity allocation)")
@click.option("--target-macs", type=float,
              help="keep this fraction of MACs: with --calib, per-group shares from measured sensitivity; else a global threshold")
@click.option("--target-params", type=float, help="keep this fraction of params (as --target-macs)")
@click.option("--min-keep", type=int, default=1, show_default=True, help="channels every group keeps at least")
@click.option("--round-to", type=int, default=None,
              help="round kept channel counts up to a multiple [default: 16 for groups a Conv produces or reads, "
                   "so onnxruntime keeps its fast NCHWc kernels; 1 for the rest]")
@click.option("--exclude", multiple=True, metavar="PATTERN", help="leave groups whose producer matches (fnmatch)")
@click.option("--calib", type=click.Path(path_type=str), help="calibration data: folder of .npy/.npz files or images")
@click.option("--input-shape", "input_shape", multiple=True, metavar="NAME:D0,D1,...",
              help="fix an input's symbolic dims for the test run and the MAC count, e.g. images:1,3,320,320 "
                   "(repeatable; the written model keeps its symbolic dims)")
@click.option("--max-samples", type=int, help="use at most this many calibration samples")
@click.option("--batch-size", type=int, default=32, show_default=True, help="samples per onnxruntime run")
@click.option("--memory-budget", "memory_budget_mb", type=float, default=1024, show_default=True, help="MiB of exposed tensors per run")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--compensate", type=click.Choice(list(COMPENSATIONS)), default="lstsq", show_default=True, help="training-free compensation at each consumer (bias: much faster, less exact)")
@click.option("--alpha-conv", type=float, help="relief: share of each conv unit's importance its kept connections must reach")
@click.option("--alpha-fc", type=float, help="relief: the same for dense units")
@click.option("--granularity", type=click.Choice(["channel", "connection"]), default="channel", show_default=True, help="relief: also zero pruned connections")
@click.option("--z", "z_", type=float, default=1.0, show_default=True, help="relative: keep a connection if mean + z·std of its relative contribution >= tau")
@click.option("--tau", type=float, help="relative: the threshold (else chosen by the budget)")
@click.option("--confidence", type=float, help="mipp: confidence of the keep test (else chosen by the budget)")
@click.option("--steps", type=int, default=1, show_default=True, help="prune in N rounds, recalibrating in between")
@click.option("--ray", "ray", is_flag=False, flag_value="local", default=None, metavar="[ADDRESS]",
              help="calibrate and refit on Ray actors: a local runtime, or the cluster at ADDRESS (or $RAY_ADDRESS); pip install 'onnxprune[ray]'")
@click.option("--workers", type=int, default=2, show_default=True, help="with --ray: actors, each holding a shard of the calibration batches")
@click.option("--mi-estimator", type=click.Choice(["linear", "mlp"]), default="linear", show_default=True, help="mipp: MI predictor")
@click.option("--resize", type=int, help="images: resize the shorter side to this")
@click.option("--crop", type=int, help="images: centre-crop to this square size")
@click.option("--mean", "mean_", help="images: per-channel mean, e.g. 0.485,0.456,0.406")
@click.option("--std", "std_", help="images: per-channel std, e.g. 0.229,0.224,0.225")
@click.option("--scale", type=float, default=1 / 255, show_default=True, help="images: multiply pixels by this first")
@click.option("--layout", type=click.Choice(["NCHW", "NHWC"]), default="NCHW", show_default=True, help="images: tensor layout")
@click.option("--channels", type=click.Choice(["GRAY", "RGB", "BGR", "L"], case_sensitive=False), default=None,
              help="images: GRAY (alias L), or RGB/BGR channel order [default: GRAY for a model whose input has "
                   "1 channel, else RGB]")
@click.option("--eval", "eval_data", type=click.Path(path_type=str), help="held-out data to verify on (else a slice of --calib)")
@click.option("--labels", type=click.Path(dir_okay=False, path_type=str), help=".npy of integer labels for --eval, for accuracy")
@click.option("--max-error", type=float, help="fail (exit 3, nothing written) above this relative L2 output error")
@click.option("--min-agreement", type=float, help="fail (exit 3, nothing written) below this top-1 agreement")
@click.option("--force", is_flag=True, help="write even when a --max-error/--min-agreement gate fails")
@click.option("--report", "report_path", type=click.Path(dir_okay=False), help="write a JSON report here")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False), help="write a PNG: kept channels per group, error vs MACs removed")
@click.option("--seed", type=int, default=0, show_default=True, help="seed for random scores and test inputs")
@click.option("--quiet", "-q", is_flag=True, help="print nothing but errors")
@_verbose_option
def prune_cmd(**params) -> None:
    """Prune INPUT_MODEL and write the checked result to OUTPUT_MODEL."""
    options = cli_options(params)
    check_side_outputs(params["input_model"], params["output_model"],
                       [("--report", params["report_path"]), ("--plot", params["plot_path"])],
                       reads={"--calib": params["calib"], "--eval": params["eval_data"], "--labels": params["labels"]})
    config = PruneConfig(**options)  # every option checked here, with the API's messages
    # The model, the plot and the report are staged and renamed into place together: a
    # failure or a signal while drawing the plot leaves nothing written.
    with one_commit(params["output_model"], params["report_path"], params["plot_path"]):
        curve = api.SWEEP_POINTS if params["plot_path"] and (config.calib or config.eval_data) else ()
        _, result = api.prune_with(config, params["input_model"], params["output_model"], sweep=curve)
        if params["plot_path"]:
            _temps.phase("plot")
            plot(result, result.sweep, params["plot_path"])
        if params["report_path"]:
            write_json(result.to_dict(), params["report_path"])
    _temps.phase("written")
    if not params["quiet"]:
        print_result(result, Console())


# The prune command's params that are not options of ``prune`` (paths, output switches).
_NOT_OPTIONS = ("input_model", "output_model", "report_path", "plot_path", "quiet")
# Click param -> MethodOptions field: the seed methods' knobs.
_METHOD_KNOBS = {"alpha_conv": "alpha_conv", "alpha_fc": "alpha_fc", "granularity": "granularity", "z_": "z",
                 "tau": "tau", "confidence": "confidence", "mi_estimator": "mi_estimator"}
_IMAGE_OPTIONS = ("resize", "crop", "mean_", "std_", "scale", "layout", "channels")


def cli_options(params: dict) -> dict:
    """The keyword options of ``api.prune`` from the prune command's click params: the image
    options grouped into a :class:`Preprocess`, the method knobs into :class:`MethodOptions`."""
    p = {k: v for k, v in params.items() if k not in _NOT_OPTIONS + _IMAGE_OPTIONS and k not in _METHOD_KNOBS}
    pre = Preprocess(
        resize=params["resize"], crop=params["crop"], mean=_floats(params["mean_"], "--mean") or (0.0, 0.0, 0.0),
        std=_floats(params["std_"], "--std") or (1.0, 1.0, 1.0), scale=params["scale"], layout=params["layout"],
        channels=params["channels"],
    )
    knobs = MethodOptions(**{f: params[k] for k, f in _METHOD_KNOBS.items()})
    method = params["method"] or ("wanda" if params["calib"] else "l1")
    return dict(p, method=method, preprocess=pre, method_options=knobs, progress=not params["quiet"],
                input_shape=checks.parse_input_shapes(params["input_shape"]))


@cli.command("analyze")
@click.argument("input_model", type=click.Path(dir_okay=True, path_type=str))
@click.option("--exclude", multiple=True, metavar="PATTERN", help="mark groups whose producer matches as excluded")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="also write the analysis as JSON")
@click.option("--input-shape", "input_shape", multiple=True, metavar="NAME:D0,D1,...",
              help="count MACs with this input's symbolic dims fixed, e.g. images:1,3,320,320 (repeatable)")
@_verbose_option
def analyze_cmd(input_model, exclude, json_path, input_shape):
    """List every channel group, the prunable share of params and MACs, and what blocks the rest."""
    check_side_outputs(input_model, None, [("--json", json_path)])
    report = api.analyze(input_model, exclude, input_shape=checks.parse_input_shapes(input_shape))
    if json_path:
        write_json(report.to_dict(), json_path)
    print_analysis(report, Console())


def main(argv: list[str] | None = None) -> int:
    """Entry point: every failure is one line on stderr with a meaningful exit code."""
    try:
        with _run_tempdir(), _quiet_third_party():
            cli.main(args=argv, prog_name="onnxprune", standalone_mode=False)
        return 0
    except _signals.Interrupted as exc:  # the console script's handlers: SIGINT/SIGTERM
        return _stopped(exc)
    except click.exceptions.NoArgsIsHelpError as exc:  # pragma: no cover - click >= 8.2
        click.echo(exc.ctx.get_help() if exc.ctx else str(exc))
        return 0
    except click.ClickException as exc:
        click.echo(f"error: {' '.join(exc.format_message().split())}", err=True)
        return InputError.exit_code
    except click.exceptions.Abort as exc:
        if isinstance(exc.__context__, KeyboardInterrupt):  # click turns Ctrl-C into Abort
            return _stopped(exc.__context__)
        click.echo("error: aborted", err=True)
        return 1
    except KeyboardInterrupt as exc:
        return _stopped(exc)
    except OnnxPruneError as exc:
        click.echo(f"error: {' '.join(str(exc).split())}", err=True)
        return exc.exit_code
    except Exception as exc:  # a bug: still one line, with the traceback on request
        stop = _stop_inside(exc)
        if stop is not None:
            return _stopped(stop)
        if os.environ.get("ONNXPRUNE_DEBUG"):
            raise
        click.echo(f"internal error: {type(exc).__name__}: {' '.join(str(exc).split())} (set ONNXPRUNE_DEBUG=1 for a traceback)", err=True)
        return 1


def _stop_inside(exc: BaseException) -> BaseException | None:
    """A stop request raised while native code called back into Python (Ray's Cython
    calls, for one) arrives wrapped: a SystemError caused by the Interrupted."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, (_signals.Interrupted, KeyboardInterrupt)):
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


def _stopped(exc: BaseException) -> int:
    line, code = _signals.message(exc)
    click.echo(line, err=True)
    return code


@contextlib.contextmanager
def _run_tempdir() -> Iterator[None]:
    """Every temporary file of the run goes into one private folder, removed at the end
    whatever happens: a signal that cuts an inner cleanup short still leaves nothing.

    ``TMPDIR`` points there too, before onnxruntime is imported: its telemetry writes a
    ``.ses`` file into the temp folder on import (onnxruntime 1.32, Linux).
    """
    previous, previous_env, folder = tempfile.tempdir, os.environ.get("TMPDIR"), None
    try:
        _temps.remove_stale(tempfile.gettempdir())  # private folders of killed runs
        with _signals.deferred():
            folder = tempfile.mkdtemp(prefix=_temps.run_prefix())
            _temps.created(folder)
            _temps.mark(folder)
            tempfile.tempdir = os.environ["TMPDIR"] = folder
        yield
    finally:
        with _signals.deferred():
            tempfile.tempdir = previous
            if previous_env is None:
                os.environ.pop("TMPDIR", None)
            else:
                os.environ["TMPDIR"] = previous_env
            if folder is not None:
                shutil.rmtree(folder, ignore_errors=True)


def entry() -> None:
    """The console script (kept for ``onnxprune.cli:entry`` callers)."""
    from ._entry import entry as run

    run()
