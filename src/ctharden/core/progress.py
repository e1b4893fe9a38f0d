"""Progress bars with an ETA for the long loops (evaluation units, training and hardening epochs,
tuning trials), on stderr so that stdout stays what the commands print.

>>> with progress(len(units), "nodule2d evaluation") as advance:
...     for u in units:
...         run(u)
...         advance(note=u.name)

Shown when stderr is a terminal (``dvc repro`` and ``make run`` in a shell) or when
``CTHARDEN_PROGRESS=1``; never with ``CTHARDEN_PROGRESS=0`` (CI logs, tests). Nested loops (a
training job's folds and their epochs) share one display: each level is a line of it.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

ENV = "CTHARDEN_PROGRESS"
_live: list[Progress] = []  # the one display while any bar is open


def enabled() -> bool:
    """Whether bars are drawn: ``CTHARDEN_PROGRESS`` (``1``/``0``), else whether stderr is a terminal."""
    flag = os.environ.get(ENV)
    if flag is not None:
        return flag.strip() not in ("", "0", "false", "no")
    return sys.stderr.isatty()


@contextmanager
def progress(total: int, description: str) -> Iterator[Callable[..., None]]:
    """A bar of ``total`` steps; yields ``advance(steps=1, note=None)`` (``note``: what just finished,
    shown after the description). A no-op where bars are off (:func:`enabled`)."""
    if not enabled() or total <= 0:
        yield lambda steps=1, note=None: None
        return
    owner = not _live
    if owner:
        _live.append(Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                              TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                              console=Console(stderr=True), transient=False))
        _live[0].start()
    bar = _live[0]
    task = bar.add_task(description, total=total)

    def advance(steps: int = 1, note: str | None = None) -> None:
        bar.update(task, advance=steps, description=f"{description}: {note}" if note else description)

    try:
        yield advance
    finally:
        if owner:
            bar.stop()
            _live.clear()
        else:
            bar.remove_task(task)
