"""Progress bars of the long commands, one definition for all of them (rich, on stderr).

The parts below marlgrc report progress through callbacks (``progress=lambda n: ...`` in
``producers.harness.run_episodes``, ``eventlog.audit.verify_*``, ``stream_processors.replay.reprocess``;
``on_batch``/``on_position`` in ``ledger.sync``) and never import rich; a command turns the callback
into a ``Bar`` from ``progress_bar``. Each bar says what the command is doing (its description, which
can change with the stage) and how far along it is: a count out of a total where one is known (events
out of the topics' end offsets, updates out of the iterations, seconds out of a time budget), else a
count and the elapsed time.

A bar draws only on an interactive terminal. Piped or redirected output (``marlgrc ... | cat``, a
log file, CI), a dumb terminal and ``--no-progress`` get nothing of it, not even a last frame, so logs
hold only the commands' result lines, without control codes. The check is on the stream itself
(``isatty``), not on rich's colour detection alone: ``FORCE_COLOR`` asks for colour, not for a
cursor-driven animation in a log.
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Iterable, Iterator

import typer
from rich.console import Console
from rich.progress import (BarColumn, Progress, ProgressColumn, Task, TaskID, TextColumn, TimeElapsedColumn,
                           TimeRemainingColumn)
from rich.text import Text

console = Console(stderr=True)
"""The CLI's stderr console: notes, statuses and progress bars (results go to stdout)."""

ProgressOpt = typer.Option(True, "--progress/--no-progress",
                           help="show a progress bar on stderr when it is a terminal (never in piped output)")


def interactive(con: Console = console) -> bool:
    """Whether a live bar may draw on ``con``: an interactive terminal, and its stream really a TTY."""
    isatty = getattr(con.file, "isatty", None)
    try:
        return bool(con.is_interactive and isatty is not None and isatty())
    except ValueError:  # a closed stream
        return False


class _Count(ProgressColumn):
    """``done/total unit`` (``done unit`` while the total is unknown), with thousands separators."""

    def render(self, task: Task) -> Text:
        unit = task.fields.get("unit", "")
        if task.total is None and not unit:
            return Text("")  # a stage without a count: its description and the time say it all
        done = f"{task.completed:,.0f}"
        text = done if task.total is None else f"{done}/{task.total:,.0f}"
        return Text(f"{text} {unit}".rstrip(), style="progress.download")


class Bar:
    """One line of progress: ``advance`` by a count, or ``update`` what is known (completed, total,
    what is being done). Counts are kept even when nothing is drawn, so ``completed`` always tells."""

    def __init__(self, progress: Progress, task: TaskID):
        self._progress, self._task = progress, task
        self.shown = not progress.disable
        """Whether the bar is drawn: a total that costs a broker round trip is worth asking for only then."""

    def advance(self, n: float = 1) -> None:
        self._progress.advance(self._task, n)

    def update(self, *, completed: float | None = None, total: float | None = None, what: str | None = None,
               unit: str | None = None) -> None:
        """Set the count, the total, the description or the unit (those given)."""
        fields = {} if unit is None else {"unit": unit}
        self._progress.update(self._task, completed=completed, total=total, description=what, **fields)

    @property
    def completed(self) -> float:
        return self._progress.tasks[self._task].completed

    @property
    def total(self) -> float | None:
        return self._progress.tasks[self._task].total

    def finish(self) -> None:
        """The work is done: the bar ends full at what was counted (a total from end offsets counts
        transaction markers too, so it can be a little above the events read)."""
        done = self.completed
        self._progress.update(self._task, total=done, completed=done)


@contextmanager
def progress_bar(what: str, total: float | None = None, *, unit: str = "", enabled: bool = True) -> Iterator[Bar]:
    """A bar on stderr for the duration of the block: ``what`` it is doing, ``total`` units of work
    (None: unknown yet; the bar then pulses, and ends full when the block ends). Nothing is drawn
    unless ``enabled`` and stderr is an interactive terminal."""
    progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), _Count(), TimeElapsedColumn(),
                        TimeRemainingColumn(), console=console, transient=False,
                        disable=not (enabled and interactive()))
    with progress:
        bar = Bar(progress, progress.add_task(what, total=total, unit=unit))
        yield bar
        if bar.total is None:  # a stage of unknown length ends full, not pulsing
            bar.finish()


def counted(items: Iterable, bar: Bar, every: int = 1000) -> Iterator:
    """``items`` as they are, advancing ``bar`` by ``every`` at a time (and by the rest at the end)."""
    n = 0
    for item in items:
        yield item
        n += 1
        if n == every:
            bar.advance(n)
            n = 0
    if n:
        bar.advance(n)


class Backlog:
    """How much of some topics is left to read: their end offsets (one ListOffsets request, at most
    once per ``every`` seconds) against a reader's positions. Serves progress totals and consumer-lag
    gauges; both count offsets, so transaction markers count on both sides."""

    def __init__(self, bootstrap: str, topics: Iterable[str], prefix: str = "", *, every: float = 1.0):
        from eventlog.kafka import OffsetReader

        self._reader = OffsetReader(bootstrap, topics, prefix)
        self._every = every
        self._ends: dict[tuple[str, int], int] = {}
        self._at = float("-inf")

    def ends(self) -> dict[tuple[str, int], int]:
        """{(logical topic, partition): end offset}, at most ``every`` seconds old."""
        now = time.monotonic()
        if now - self._at >= self._every:
            self._ends, self._at = self._reader.end_offsets(), now
        return self._ends

    def total(self, start: dict[tuple[str, int], int] | None = None) -> int:
        """Offsets from ``start`` (default: the beginning) to the ends, over every partition."""
        start = start or {}
        return sum(max(0, end - start.get(k, 0)) for k, end in self.ends().items())

    def lag(self, positions: dict[tuple[str, int], int]) -> dict[tuple[str, int], int]:
        """{(topic, partition): end offset - position} for every partition (a partition never read: its end)."""
        return {k: max(0, end - positions.get(k, 0)) for k, end in self.ends().items()}

    def close(self) -> None:
        self._reader.close()
