"""Command line: ``onnxprune IN OUT [options]`` and ``onnxprune analyze IN``."""

from __future__ import annotations

import os
import sys

import click
from rich.console import Console

from . import api
from .criteria import METHODS
from .errors import InputError, OnnxPruneError
from .report import print_analysis, print_result, write_json


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


@cli.command("prune")
@click.argument("input_model", type=click.Path(dir_okay=True, path_type=str))
@click.argument("output_model", type=click.Path(path_type=str))
@click.option("--method", type=click.Choice(METHODS), default="l1", show_default=True, help="importance criterion")
@click.option("--ratio", type=float, default=0.5, show_default=True, help="share of each group's channels to remove")
@click.option("--global", "global_", is_flag=True, help="one threshold over per-group standardised scores")
@click.option("--min-keep", type=int, default=1, show_default=True, help="channels every group keeps at least")
@click.option("--round-to", type=int, default=1, show_default=True, help="round kept channel counts up to a multiple")
@click.option("--exclude", multiple=True, metavar="PATTERN", help="leave groups whose producer matches (fnmatch)")
@click.option("--report", "report_path", type=click.Path(dir_okay=False), help="write a JSON report here")
@click.option("--seed", type=int, default=0, show_default=True, help="seed for random scores and test inputs")
@click.option("--quiet", "-q", is_flag=True, help="print nothing but errors")
def prune_cmd(input_model, output_model, method, ratio, global_, min_keep, round_to, exclude, report_path, seed, quiet):
    """Prune INPUT_MODEL and write the checked result to OUTPUT_MODEL."""
    _, result = api.prune(
        input_model,
        output_model,
        method=method,
        ratio=ratio,
        global_=global_,
        min_keep=min_keep,
        round_to=round_to,
        exclude=exclude,
        seed=seed,
    )
    if report_path:
        write_json(result.to_dict(), report_path)
    if not quiet:
        print_result(result, Console())


@cli.command("analyze")
@click.argument("input_model", type=click.Path(dir_okay=True, path_type=str))
@click.option("--exclude", multiple=True, metavar="PATTERN", help="mark groups whose producer matches as excluded")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="also write the analysis as JSON")
def analyze_cmd(input_model, exclude, json_path):
    """List every channel group, the prunable share of params and MACs, and what blocks the rest."""
    report = api.analyze(input_model, exclude)
    if json_path:
        write_json(report.to_dict(), json_path)
    print_analysis(report, Console())


def main(argv: list[str] | None = None) -> int:
    """Entry point: every failure is one line on stderr with a meaningful exit code."""
    try:
        cli.main(args=argv, prog_name="onnxprune", standalone_mode=False)
        return 0
    except click.exceptions.NoArgsIsHelpError as exc:  # pragma: no cover - click >= 8.2
        click.echo(exc.ctx.get_help() if exc.ctx else str(exc))
        return 0
    except click.ClickException as exc:
        click.echo(f"error: {' '.join(exc.format_message().split())}", err=True)
        return InputError.exit_code
    except click.exceptions.Abort:
        click.echo("error: aborted", err=True)
        return 1
    except OnnxPruneError as exc:
        click.echo(f"error: {' '.join(str(exc).split())}", err=True)
        return exc.exit_code
    except Exception as exc:  # a bug: still one line, with the traceback on request
        if os.environ.get("ONNXPRUNE_DEBUG"):
            raise
        click.echo(f"internal error: {type(exc).__name__}: {' '.join(str(exc).split())} (set ONNXPRUNE_DEBUG=1 for a traceback)", err=True)
        return 1


def entry() -> None:
    sys.exit(main())
