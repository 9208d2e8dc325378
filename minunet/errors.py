"""Errors that mean "the input is wrong", not "the code is wrong".

The CLI turns each of these into one line on stderr and exit status 2; a
library user can catch ``MinunetError`` to handle them all.
"""

from __future__ import annotations


class MinunetError(Exception):
    """Bad input: the message says what is wrong, which file, and what to do."""


class DataError(MinunetError):
    """A data folder, image or mask that cannot be used."""


class CheckpointError(MinunetError):
    """A checkpoint that is missing, not a minunet checkpoint, or does not match."""


class ConfigError(MinunetError):
    """Settings that cannot work together (e.g. a size not divisible by 2**depth)."""


class OutputError(MinunetError):
    """A file or folder that cannot be written: an --out that is a file or read-only, a full disk."""


class MinunetWarning(UserWarning):
    """Something the user should know that does not stop the work (e.g. a cache that cannot be written).

    The CLI shows each one as one line, ``warning: <message>``, on stderr."""
