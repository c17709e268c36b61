"""Progress of the long loops (search, recovery, timing, benches), one helper for all of them.

On a terminal: a rich progress bar on stderr, transient, so the terminal keeps only the stage
summaries. When stderr is not a terminal (output piped to a file, CI): plain lines instead, one at
the start, then every tenth of the loop or every 30 seconds, whichever comes first (but never two
within 5 seconds, so a loop of quick steps does not flood the log), and one at the end: a log shows
a long stage moving and how long it has left. ``PRUNE_EXPORT_PROGRESS_SECONDS`` sets the 30.
"""
from __future__ import annotations

import contextlib
import os
import sys
import time
from typing import Callable, Iterator, TextIO

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

SECONDS_ENV = "PRUNE_EXPORT_PROGRESS_SECONDS"
DEFAULT_SECONDS = 30.0
LINES_PER_LOOP = 10
"""Plain mode prints at least every total/10 steps ..."""
MIN_GAP_SECONDS = 5.0
"""... but never two lines within this many seconds, the last one excepted."""


def _clock(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    return f"{minutes}:{secs:02d}"


class PlainProgress:
    """Progress as plain lines on a stream that is not a terminal.

    Args:
        title: the loop's name, at the start of every line.
        total: steps in the loop.
        completed: steps already done (a resumed loop); the first line says so.
        stream: where lines go (stderr by default).
        every_steps: a line at least every this many steps (default: a tenth of the loop).
        every_seconds: a line at least every this many seconds.
        min_gap: never two lines within this many seconds (the final line excepted).
        clock: the time source (tests pass a fake one).
    """

    def __init__(self, title: str, total: int, completed: int = 0, stream: TextIO | None = None,
                 every_steps: int | None = None, every_seconds: float | None = None, min_gap: float = MIN_GAP_SECONDS,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.title, self.total, self.done, self.start_step = title, total, completed, completed
        self.stream = stream if stream is not None else sys.stderr
        self.every_steps = every_steps or max(1, total // LINES_PER_LOOP)
        self.every_seconds = every_seconds if every_seconds is not None else float(os.environ.get(SECONDS_ENV, DEFAULT_SECONDS))
        self.min_gap = min_gap
        self.clock = clock
        self.started = self.last_time = clock()
        self.last_step = completed
        resumed = f", resumed at step {completed}" if completed else ""
        self._line(f"{title}: {completed}/{total} steps{resumed}")

    def _line(self, text: str) -> None:
        print(text, file=self.stream, flush=True)

    def advance(self, status: str = "") -> None:
        self.done += 1
        now = self.clock()
        since = now - self.last_time
        due = (self.done - self.last_step >= self.every_steps and since >= self.min_gap) or since >= self.every_seconds
        if not (due or self.done >= self.total):
            return
        elapsed = now - self.started
        rate = (self.done - self.start_step) / elapsed if elapsed > 0 else 0.0
        left = f", about {_clock((self.total - self.done) / rate)} left" if rate > 0 and self.done < self.total else ""
        pct = 100 * self.done / self.total if self.total else 100.0
        self._line(f"{self.title}: {self.done}/{self.total} steps ({pct:.0f}%), {_clock(elapsed)} elapsed{left}"
                   + (f"; {status}" if status else ""))
        self.last_step, self.last_time = self.done, now


@contextlib.contextmanager
def progress_bar(title: str, total: int, completed: int = 0, enabled: bool = True) -> Iterator[Callable[[str], None]]:
    """Yield ``advance(status)``, which moves the loop one step and shows ``status`` beside it.

    A rich bar on stderr when it is a terminal, else plain lines (:class:`PlainProgress`). Nothing
    when ``enabled`` is False (the other ranks under torchrun).
    """
    if not enabled:
        yield lambda status="": None
        return
    console = Console(stderr=True)
    if not console.is_terminal:
        yield PlainProgress(title, total, completed).advance
        return
    columns = (TextColumn(f"[bold]{title}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[status]}"))
    with Progress(*columns, console=console, transient=True) as bar:
        task = bar.add_task(title, total=total, completed=completed, status="")

        def advance(status: str = "") -> None:
            bar.update(task, advance=1, status=status)

        yield advance
