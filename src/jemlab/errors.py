"""One exception type for problems the user can fix.

Every message is a single line that names the offending file, flag or value and says what to do. The CLI prints
``error: <message>`` and exits with status 2 instead of a traceback; library callers can catch ``JemlabError``.
"""

from __future__ import annotations


class JemlabError(Exception):
    """A user-facing error: bad input, bad config, corrupt file. The message is one line with the fix."""

    def __str__(self) -> str:
        # Messages quote user input (keys, values, file names), which may hold line breaks: keep them one line.
        return super().__str__().replace("\r", "\\r").replace("\n", "\\n")


class DataError(JemlabError):
    """A dataset file is missing, truncated, corrupt or fails its checksum."""


class ConfigError(JemlabError):
    """An unknown config key, a value of the wrong type, or a value out of range."""


class CheckpointError(JemlabError):
    """A checkpoint is missing, incomplete, from an unknown format version, or not trusted."""


class DivergenceError(JemlabError):
    """Training produced non-finite or exploding values and could not continue."""
