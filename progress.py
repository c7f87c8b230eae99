"""The one progress display of every step that takes more than a few seconds: a bar with counts, elapsed
time, an ETA and a status line (the trainer's loss), on the terminal only; what a stage prints line
by line stays in its log.txt.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import TypeVar

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

T = TypeVar("T")


_live: list[Progress] = []  # the display on screen: a bar started inside another's loop becomes a row of it


@contextmanager
def progress_bar(description: str, total: int, completed: int = 0,
                 disable: bool = False) -> Iterator[Callable[..., None]]:
    """A bar of `total` units starting at `completed`; yields `advance(units=1, status=None)`."""
    if _live:
        bar, own = _live[-1], False
    else:
        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   TextColumn("eta"), TimeRemainingColumn(), TextColumn("{task.fields[status]}"))
        bar, own = Progress(*columns, disable=disable), True
        bar.start()
        _live.append(bar)
    task = bar.add_task(description, total=total, completed=completed, status="")

    def advance(units: int = 1, status: str | None = None) -> None:
        bar.update(task, advance=units, **({"status": status} if status is not None else {}))

    try:
        yield advance
    finally:
        if own:
            _live.pop()
            bar.stop()
        else:
            bar.remove_task(task)


def tracked(items: Iterable[T], description: str, total: int | None = None) -> Iterator[T]:
    """`items`, advancing a bar by one per item (`total` where `items` has no length)."""
    items = list(items) if total is None and not hasattr(items, "__len__") else items
    with progress_bar(description, total if total is not None else len(items)) as advance:
        for item in items:
            yield item
            advance()
