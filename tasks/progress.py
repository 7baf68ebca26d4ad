"""Progress of long stages (epochs, embedding batches) for whoever displays it.

Tasks call :func:`report`; the CLI installs a reporter that drives rich progress bars. Without a
reporter (a worker, a test) reports go nowhere: the same numbers reach MLflow and the log anyway.
"""

from __future__ import annotations

from collections.abc import Callable

#: ``(stage, done, total, note)``; ``done == total`` ends the bar.
Reporter = Callable[[str, int, int, str], None]

_reporters: list[Reporter] = []


def add_reporter(reporter: Reporter) -> None:
    """Send progress reports to ``reporter`` too."""
    _reporters.append(reporter)


def remove_reporter(reporter: Reporter) -> None:
    """Stop sending reports to ``reporter``."""
    if reporter in _reporters:
        _reporters.remove(reporter)


def report(stage: str, done: int, total: int, note: str = "") -> None:
    """Report ``done`` of ``total`` units of ``stage``'s work."""
    for reporter in list(_reporters):
        reporter(stage, done, total, note)
