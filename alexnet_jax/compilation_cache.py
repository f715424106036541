"""A persistent XLA compilation cache for ``main.py``: a run started again (resumed after a
preemption or a crash, or ``--mode=eval``, ``predict``, ``neighbors`` on its workdir) loads
its compiled steps from disk instead of compiling them again.

``config.compilation_cache``:

- ``"auto"`` (the default): JAX's own setting where one is given (the
  ``JAX_COMPILATION_CACHE_DIR`` environment variable, or ``jax_compilation_cache_dir`` set in
  the process), else ``$XDG_CACHE_HOME/alexnet_jax/xla`` (``~/.cache/alexnet_jax/xla``),
  kept under ``MAX_BYTES`` by evicting the least recently used programs. A directory that
  cannot be created or written leaves the run uncached, with a warning.
- ``"none"``: no cache (JAX's default), whatever the environment says.
- any other value: that directory (created if missing; ``gs://...`` and other remote paths
  as JAX supports them), unbounded unless ``jax_compilation_cache_max_size`` is set. One it
  cannot create or write is a ``ConfigError`` naming it.

JAX keeps programs whose compilation took at least a second
(``jax_persistent_cache_min_compile_time_secs``), keyed by the program, the compiler options,
the devices and the versions of JAX and XLA, so a changed config or an upgrade compiles
afresh. The cache holds executable code: like JAX's documentation, keep it where only you
can write.
"""

from __future__ import annotations

import os

import jax
from absl import logging

from alexnet_jax.errors import ConfigError

MAX_BYTES = 2 << 30  # the default directory's bound


def default_dir() -> str:
    """``$XDG_CACHE_HOME/alexnet_jax/xla``, ``~/.cache/alexnet_jax/xla`` without it."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "alexnet_jax", "xla")


def configure(setting: str = "auto") -> str | None:
    """Applies ``setting`` (see the module docstring) to this process before its first
    compilation; returns the cache directory in use, or None."""
    if not isinstance(setting, str) or not setting.strip():
        raise ConfigError(f"config.compilation_cache={setting!r}: 'auto', 'none' or a directory")
    setting = setting.strip()
    if setting == "none":
        jax.config.update("jax_compilation_cache_dir", None)
        return None
    if setting == "auto":
        if jax.config.jax_compilation_cache_dir:
            return jax.config.jax_compilation_cache_dir  # the caller's (or the environment's)
        path = default_dir()
    else:
        path = setting if "://" in setting else os.path.abspath(os.path.expanduser(setting))
    problem = None if "://" in path else _unwritable(path)
    if problem:
        if setting == "auto":
            logging.warning("No compilation cache: %s", problem)
            return None
        raise ConfigError(f"config.compilation_cache={setting!r}: {problem}")
    jax.config.update("jax_compilation_cache_dir", path)
    if setting == "auto" and jax.config.jax_compilation_cache_max_size == -1:
        jax.config.update("jax_compilation_cache_max_size", MAX_BYTES)
    return path


def _unwritable(path: str) -> str | None:
    """Why ``path`` cannot hold the cache, or None."""
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as error:
        return f"cannot create {path!r} ({error.strerror or error})"
    if not os.access(path, os.W_OK | os.X_OK):
        return f"{path!r} is not writable"
    return None
