"""Errors a user can fix, each with a message naming the field, file or value at fault.

``main.py`` prints these as one line (``error: <message>``) instead of a traceback, and
exits with ``exit_code`` (2 for usage and config errors, 1 otherwise). Anything else is a
bug and keeps its traceback.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any


class UserError(Exception):
    """A problem with what the user gave (config, data, files), not with the program."""

    exit_code = 1


class ConfigError(UserError, ValueError):
    """A config field has a value the run cannot use; the message names the field."""

    exit_code = 2


class DataError(UserError, ValueError):
    """Data that is missing, unreadable or does not fit; the message names the path."""


class MissingDataError(DataError, FileNotFoundError):
    """A data set, split, file or folder that is not there; the message names it."""


class CheckpointError(UserError, ValueError):
    """A checkpoint that is missing, unreadable, or does not fit the model."""


class MissingCheckpointError(CheckpointError, FileNotFoundError):
    """No checkpoint where one is needed (none at all, or not at the step asked for)."""


def one_line_errors(main: Callable[[], Any]) -> Any:
    """Runs a command's ``main``; a ``UserError`` prints as ``error: <message>`` and exits
    with its ``exit_code``, instead of a traceback."""
    try:
        return main()
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(error.exit_code)
