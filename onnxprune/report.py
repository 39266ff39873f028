"""Report stage: the terminal tables (rich) and the JSON report."""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path
from typing import Callable

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from . import _temps
from ._signals import deferred
from .load import claimed
from .result import AnalysisReport, PruneResult


def _short(items: list[str], n: int = 3) -> str:
    return ", ".join(items[:n]) + (f" (+{len(items) - n})" if len(items) > n else "")


def print_analysis(report: AnalysisReport, console: Console | None = None) -> None:
    console = console or Console()
    table = Table(title="channel groups", show_lines=False)
    for col in ("id", "producers", "consumers", "channels", "status"):
        table.add_column(col)
    for g in report.groups:
        status = "excluded" if g.excluded else ("blocked" if g.blocked else "prunable")
        if not g.blocked and not g.excluded and len(g.classes) <= 1:
            status = "too small"
        table.add_row(
            str(g.id),
            _short([p.name or p.op_type for p in g.producers]),
            _short([c.name or c.op_type for c in g.consumers]),
            str(g.n_channels),
            status,
        )
    console.print(table)
    d = report.to_dict()
    console.print(
        f"params {report.params:,} (prunable {d['prunable_params_share']:.1%}) · "
        f"MACs {report.macs:,} (prunable {d['prunable_macs_share']:.1%}) · "
        f"groups {len(report.groups)}, prunable {sum(g.prunable for g in report.groups)}"
    )
    console.print(escape(macs_basis_text(report, "--input-shape")))
    for g in report.groups:
        for reason in g.blocked:
            console.print(f"[yellow]blocked[/] group {g.id} ({g.name}): {reason}")


def print_result(result: PruneResult, console: Console | None = None) -> None:
    console = console or Console()
    steps = f", {result.steps} rounds" if result.steps > 1 else ""
    table = Table(title=f"onnxprune: {result.method}, {result.selection or f'ratio {result.ratio:.3g}'}{steps}")
    for col in ("group", "producers", "kept / total"):
        table.add_column(col)
    for g in result.groups:
        if g["blocked"] or g["excluded"]:
            continue
        table.add_row(str(g["id"]), _short(g["producers"], 2), f"{g['kept']} / {g['channels']}")
    console.print(table)

    def pct(a: int, b: int) -> str:
        return f"{a:,} → {b:,} ({(1 - b / a) if a else 0:.1%} removed)"

    console.print(f"params {pct(result.params_before, result.params_after)}")
    console.print(f"MACs   {pct(result.macs_before, result.macs_after)}")
    console.print(f"       {escape(macs_basis_text(result))}")
    if result.target is not None:
        console.print(escape(target_text(result.target)))
    if result.file_size_after is not None:
        console.print(f"file   {pct(result.file_size_before, result.file_size_after)} bytes")
    if result.calibration:
        c = result.calibration
        console.print(
            f"calibration {c['samples']:,} samples in {c['seconds']:.2f} s ({c['tensors']} tensors, "
            f"{c['runs_per_batch']} run(s) per batch"
            + (f"; padding cut by '{c['padding_cut_by']}'" if c.get("padding_cut_by") else "")
            + f"); compensation: {result.compensation}"
            + (f" ({result.compensation_note})" if result.compensation_note else "")
        )
    if result.fidelity:
        f = result.fidelity
        line = f"fidelity on {f['samples']} {f['source']}: rel. L2 error {f['rel_l2']:.4f}, cosine {f['cosine']:.4f}"
        if f["agreement"] is not None:
            line += f", top-1 agreement {f['agreement']:.1%}"
        if f["accuracy_before"] is not None:
            line += f", accuracy {f['accuracy_before']:.1%} → {f['accuracy_after']:.1%}"
        console.print(line)
    if result.latency:
        lat = result.latency
        console.print(
            f"latency {lat['before_s'] * 1e3:.3f} ms → {lat['after_s'] * 1e3:.3f} ms (×{lat['speedup']:.2f}, onnxruntime CPU, median)"
        )
    dead = sum(g.get("dead", 0) for g in result.groups)
    if dead:
        console.print(f"{dead} channel(s) were never active on the calibration data and were removed")
    for g in result.blocked:
        console.print(f"[yellow]blocked[/] group {g['id']} ({_short(g['producers'], 2)}): {g['blocked'][0]}")
    if result.output:
        console.print(f"wrote {result.output} (checked: onnx full check, onnxruntime run, output shapes)")


def target_text(target: dict) -> str:
    """One line: the target requested vs achieved (by the pruned model's own count), and
    the note when it was missed or alignment was relaxed to meet it."""
    t = target
    if not t["within_tolerance"]:
        return t["note"]
    line = f"target {t['kind']} {t['requested']:.3g}: achieved {t['achieved']:.3f} (within ±{t['tolerance'] * 100:.0f} points)"
    return line + (f"; {t['note']}" if t["note"] else "")


def macs_basis_text(result: PruneResult | AnalysisReport, remedy: str = "--input-shape or --calib") -> str:
    """One line: which input shapes the MACs were counted on, or that they are per unit
    (and what gives real shapes: ``remedy``), and what control flow keeps out of the count."""
    text = _macs_basis(result, remedy)
    excluded = getattr(result, "macs_excluded", None)
    return text + (f"; not counted: {excluded} (onnxprune counts the main graph only)" if excluded else "")


def _macs_basis(result: PruneResult | AnalysisReport, remedy: str) -> str:
    if result.macs_basis == "per unit":
        dims = "; ".join(f"{k} [{', '.join(v)}]" for k, v in (result.macs_symbolic or {}).items())
        return f"MACs per unit of the symbolic dims ({dims}), not a total: give {remedy} to count them on real input shapes"
    if result.macs_input_shapes:
        shapes = "; ".join(f"{k} {v}" for k, v in result.macs_input_shapes.items())
        return f"MACs per sample, counted on input shapes {shapes} (from {result.macs_basis})"
    return "MACs per sample, counted on the model's declared input shapes"


def _plain(value):
    """numpy scalars and arrays as JSON numbers and lists (a count summed over booleans is one)."""
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


def write_json(data: dict, path: str | os.PathLike) -> None:
    """Write ``data`` as JSON to ``path``, atomically."""

    def write(tmp: Path) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2, sort_keys=True, default=_plain)
            f.write("\n")

    atomic_write(path, write)


def _suffix(target: Path) -> str:
    """The target's suffix for the temp file (matplotlib reads the format from it), when it
    is one a stale-file sweep recognises."""
    return target.suffix if re.fullmatch(r"\.[A-Za-z0-9]{1,8}", target.suffix) else ""


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> None:
    """Let ``write`` fill a hidden temp file beside ``path``, then rename it into place:
    a failure or a signal leaves the old file (or none), never a truncated one."""
    folder = Path(path).parent.resolve()
    target = folder / Path(path).name  # a link there is replaced by the file, never written through
    _temps.remove_stale(folder)
    tmp = None
    try:
        with deferred():  # the file exists only once the finally below will remove it
            fd, name = tempfile.mkstemp(prefix=_temps.prefix(), suffix=_suffix(target), dir=folder)
            os.close(fd)
            tmp = Path(name)
            _temps.created(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # what open() would have given, not mkstemp's 0600
        write(tmp)
        txn = claimed(target)
        if txn is not None:  # renamed with the output model when the run ends (load.one_commit)
            with deferred():
                txn.files.append((tmp, target))
                tmp = None
        else:
            os.replace(tmp, target)
    finally:
        with deferred():
            if tmp is not None:
                tmp.unlink(missing_ok=True)


def plot(result: PruneResult, sweep: list[tuple[float, float, float | None]], path: str | os.PathLike) -> None:
    """Write a PNG: kept/total channels per group, and output error (and top-1 agreement)
    vs MACs removed from ``sweep`` = [(macs removed, rel. L2 error, agreement or None)]."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        from .errors import InputError

        raise InputError("--plot needs matplotlib: pip install 'onnxprune[plot]'") from exc
    groups = [g for g in result.groups if not g["blocked"] and not g["excluded"]]
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5))
    names = [g["producers"][0].split("'")[1] if "'" in g["producers"][0] else g["producers"][0] for g in groups]
    x = range(len(groups))
    a.bar(x, [g["channels"] for g in groups], color="#dddddd", label="total")
    a.bar(x, [g["kept"] for g in groups], color="#3b75af", label="kept")
    a.set_xticks(list(x), names, rotation=60, ha="right", fontsize=7)
    a.set_ylabel("channels")
    a.set_title(f"kept channels per group ({result.method})")
    a.legend()
    if sweep:
        pts = sorted(sweep)
        b.plot([100 * p[0] for p in pts], [p[1] for p in pts], "o-", label="relative L2 error")
        if all(p[2] is not None for p in pts):
            b2 = b.twinx()
            b2.plot([100 * p[0] for p in pts], [100 * p[2] for p in pts], "s--", color="#c44e52", label="top-1 agreement")
            b2.set_ylabel("top-1 agreement (%)")
            b2.set_ylim(max(0.0, 100 * min(p[2] for p in pts) - 5), 100.5)
        b.set_xlabel("MACs removed (%)")
        b.set_ylabel("relative L2 output error")
        b.set_title("error vs MACs removed")
    else:
        b.text(0.5, 0.5, "no held-out data: give --calib or --eval", ha="center", va="center")
        b.set_axis_off()
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120))
    plt.close(fig)
