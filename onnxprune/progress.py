"""Progress bars on stderr for the stages that can last (calibration has its own, with a
sample rate): one transient ``rich`` bar per stage, nothing at all when disabled (``-q``)."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

Tick = Callable[[int, int], None]  # (done, total)


@contextmanager
def bar(label: str, enabled: bool) -> Iterator[Tick]:
    """A ``tick(done, total)`` callback that moves a bar labelled ``label`` while the
    context lasts; a no-op when ``enabled`` is false."""
    if not enabled:
        yield lambda done, total: None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  transient=True, console=Console(stderr=True)) as progress:
        task = progress.add_task(label, total=None)
        yield lambda done, total: progress.update(task, completed=done, total=total)
