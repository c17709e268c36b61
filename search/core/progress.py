"""Rich progress bars for the long loops (search, recovery, benches), one helper for all of them."""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


@contextlib.contextmanager
def progress_bar(title: str, total: int, completed: int = 0, enabled: bool = True) -> Iterator[Callable[[str], None]]:
    """Yield ``advance(status)``, which moves the bar one step and shows ``status`` beside it.

    Drawn on stderr; transient, so the terminal keeps only the stage summaries afterwards.
    """
    if not enabled:
        yield lambda status="": None
        return
    columns = (TextColumn(f"[bold]{title}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[status]}"))
    with Progress(*columns, console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task(title, total=total, completed=completed, status="")

        def advance(status: str = "") -> None:
            bar.update(task, advance=1, status=status)

        yield advance
