"""Errors a user can fix, each with a message naming the field, file or value at fault.

``main.py`` prints these as one line (``error: <message>``) instead of a traceback, and
exits with ``exit_code`` (2 for usage and config errors, 1 otherwise). Anything else is a
bug and keeps its traceback.
"""

from __future__ import annotations

import re
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


def reason(error: BaseException, limit: int = 300) -> str:
    """``error`` in one line for a message: the innermost exception it was raised from (the
    most specific: Orbax's "cannot read array" wraps TensorStore's "error reading
    params.fc7.kernel ... at local file ..."), whitespace collapsed, a TensorStore spec
    dump and TensorFlow's op wrapping (``{{function_node ...}}``, ``[Op:...]``) cut off, at
    most ``limit`` characters."""
    chain, seen = [], set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        chain.append(error)
        error = error.__cause__ or (None if error.__suppress_context__ else error.__context__)
    for inner in reversed(chain):
        text = str(inner).split("See full TensorStore details")[0]
        text = " ".join(re.sub(r"\{\{.*?\}\}|\[Op:.*$", "", text, flags=re.S).split())
        if text:
            text = text if len(text) <= limit else text[: limit - 3] + "..."
            return f"{type(inner).__name__}: {text}"
    return type(chain[0]).__name__


def one_line_errors(main: Callable[[], Any]) -> Any:
    """Runs a command's ``main``; a ``UserError`` prints as ``error: <message>`` and exits
    with its ``exit_code``, instead of a traceback."""
    try:
        return main()
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(error.exit_code)
