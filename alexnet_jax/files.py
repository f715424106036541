"""Files written whole or not at all: a crash or a full disk mid-write leaves the previous
version (or nothing), never a torn file that fails far away."""

from __future__ import annotations

import os
import tempfile


def atomic_write(path: str, data: str | bytes) -> None:
    """Writes ``data`` to ``path`` through a temporary file in the same folder: written,
    flushed, fsync-ed, then renamed over ``path`` (an atomic step on POSIX file systems)."""
    folder = os.path.dirname(os.path.abspath(path))
    mode = "w" if isinstance(data, str) else "wb"
    handle, temporary = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.")
    try:
        with os.fdopen(handle, mode) as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.remove(temporary)
        raise
    _sync_folder(folder)


def _sync_folder(folder: str) -> None:
    """Makes the rename itself durable (where the platform lets a folder be fsync-ed)."""
    try:
        handle = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(handle)
    except OSError:
        pass
    finally:
        os.close(handle)
