"""Plain progress lines when stderr is not a terminal: a log of a piped run shows the long stages moving."""
from __future__ import annotations

import io

from search.core.progress import PlainProgress, progress_bar


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _lines(stream: io.StringIO) -> list[str]:
    return stream.getvalue().splitlines()


def test_a_line_every_tenth_of_the_loop_when_steps_are_slow():
    stream, clock = io.StringIO(), FakeClock()
    bar = PlainProgress("acp search", 40, stream=stream, every_seconds=1e9, clock=clock)
    for step in range(40):
        clock.now += 6.0  # a step of 6 s: every 4th step is due, and 24 s have passed since the last line
        bar.advance(f"loss {step}")
    lines = _lines(stream)
    assert lines[0] == "acp search: 0/40 steps"
    assert len(lines) == 11 and lines[-1].startswith("acp search: 40/40 steps (100%), 4:00 elapsed")
    assert lines[1] == "acp search: 4/40 steps (10%), 0:24 elapsed, about 3:36 left; loss 3"


def test_a_line_every_n_seconds_when_steps_are_few_and_long():
    stream, clock = io.StringIO(), FakeClock()
    bar = PlainProgress("recovery", 1000, stream=stream, every_seconds=30, clock=clock)
    for _ in range(10):
        clock.now += 10.0
        bar.advance()
    lines = _lines(stream)
    assert [line.split(" steps")[0] for line in lines] == ["recovery: 0/1000", "recovery: 3/1000", "recovery: 6/1000", "recovery: 9/1000"]


def test_quick_steps_do_not_flood_the_log_and_the_end_is_always_printed():
    stream, clock = io.StringIO(), FakeClock()
    bar = PlainProgress("timing", 20, stream=stream, every_seconds=30, clock=clock)
    for _ in range(20):
        clock.now += 0.01
        bar.advance()
    assert _lines(stream) == ["timing: 0/20 steps", "timing: 20/20 steps (100%), 0:00 elapsed"]


def test_a_resumed_loop_says_where_it_resumed():
    stream, clock = io.StringIO(), FakeClock()
    bar = PlainProgress("acp search", 40, completed=30, stream=stream, clock=clock)
    clock.now += 100.0
    bar.advance()
    lines = _lines(stream)
    assert lines[0] == "acp search: 30/40 steps, resumed at step 30"
    assert "31/40 steps (78%), 1:40 elapsed, about 15:00 left" in lines[1]  # the rate counts this run's steps only


def test_progress_bar_prints_plain_lines_on_a_stderr_that_is_no_terminal(capsys):
    with progress_bar("search", total=3) as advance:
        for _ in range(3):
            advance("ok")
    err = capsys.readouterr().err
    assert err.splitlines()[0] == "search: 0/3 steps" and "search: 3/3 steps (100%)" in err and "\x1b[" not in err
    with progress_bar("quiet", total=3, enabled=False) as advance:
        advance()
    assert capsys.readouterr().err == ""
