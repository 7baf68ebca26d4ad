"""The one exception a user can cause and fix: :class:`ScanLakeError`."""

from __future__ import annotations


class ScanLakeError(Exception):
    """A problem the user can fix; the message is one sentence naming the cause and the fix.

    The CLI prints it without a traceback and exits non-zero. Tasks never retry on it.
    """
