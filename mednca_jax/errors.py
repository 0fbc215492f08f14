"""The project's error types share one base, so the command-line tools can tell a user's
mistake (a bad config, a bad input file, a run folder in use: one ``error: ...`` line and
exit code 2) from a bug (a traceback).

Most modules keep their own error class (``DataError`` in ``data``, ``CheckpointError`` in
``train.checkpoint``, ...); :class:`ConfigError` is here because both ``config`` and
``plugins`` raise it, :class:`PredictError` because both prediction modules (NIfTI scans and
image folders) raise it. They all inherit from :class:`MedNCAError`, and from ``ValueError`` or
``RuntimeError``.
"""

from __future__ import annotations


class MedNCAError(Exception):
    """A problem with the user's input, config, data or run folder; the message says which
    file or key is wrong and what to do."""


class UsageError(MedNCAError, ValueError):
    """Command-line options that contradict each other or are out of range."""


class ConfigError(MedNCAError, ValueError):
    """A config file or override is malformed; the message names the key."""


class PredictError(MedNCAError, ValueError):
    """A user's input to ``mednca predict`` is unusable; the message names it and the fix."""
