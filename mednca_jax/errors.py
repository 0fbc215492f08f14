"""The project's error types share one base, so the command-line tools can tell a user's
mistake (a bad config, a bad input file, a run folder in use: one ``error: ...`` line and
exit code 2) from a bug (a traceback).

Each module keeps its own error class (``ConfigError`` in ``config``, ``DataError`` in
``data``, ``CheckpointError`` in ``checkpoint``, ...); they all inherit from
:class:`MedNCAError`, and from ``ValueError`` or ``RuntimeError`` as before.
"""

from __future__ import annotations


class MedNCAError(Exception):
    """A problem with the user's input, config, data or run folder; the message says which
    file or key is wrong and what to do."""


class UsageError(MedNCAError, ValueError):
    """Command-line options that contradict each other or are out of range."""
