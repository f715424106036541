"""Keeping the host memory a CPU step frees, for the next step to reuse.

XLA:CPU allocates a step's temporary buffers with ``malloc`` and frees them when the step
ends: several hundred MB for AlexNet at batch 32. glibc serves blocks this large with fresh
``mmap`` calls (always, from the threads XLA runs on) and unmaps them on ``free``, so every
step faults its temporaries' pages in again: about 150,000 page faults per paper train step
at batch 32 on the project's CPU machine. Keeping the memory made that step 10-32 % faster
there (``main.py`` and ``benchmarks/compare_pytorch.py``; ``benchmarks/README.md``).

``configure("reuse")`` asks glibc (``mallopt``) to serve every thread from one arena, never
to ``mmap``, and never to give freed memory back: the next step finds its buffers in the
process, and the page faults stop. The process keeps its peak memory for its lifetime, which
a training run does anyway. It must run before JAX starts its threads (before the first
computation): a thread that has allocated already keeps its own arena.

``"auto"`` (the default) reuses on CPU-only installations: where a GPU or TPU plugin for JAX
is installed, the steps' buffers live on the accelerator, and one arena could slow the
input pipeline's many threads. ``"system"`` leaves glibc's defaults alone.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import importlib.metadata
import os
import platform

from alexnet_jax.errors import ConfigError

MODES = ("auto", "reuse", "system")  # config.host_memory
# glibc's mallopt parameters (malloc.h)
M_TRIM_THRESHOLD = -1
M_TOP_PAD = -2
M_MMAP_MAX = -4
M_ARENA_MAX = -8
TOP_PAD = 64 << 20  # grow the heap 64 MB at a time
# mallopt(3): -1 "disables trimming completely". The largest positive int, 2**31 - 1, still
# trims a free top of over 2 GiB: a step with more temporaries than that (the paper network's
# bfloat16 train step at batch 32, larger batches) gave it all back and faulted it in again.
NEVER_TRIM = -1
ACCELERATOR_PLUGINS = ("jax-cuda", "jax_cuda", "jax-rocm", "jax_rocm", "libtpu")


def accelerator_plugin() -> str | None:
    """The name of an installed JAX GPU or TPU plugin distribution, or None. A run forced
    onto the CPU (``JAX_PLATFORMS=cpu``) counts as having none."""
    if os.environ.get("JAX_PLATFORMS", "").strip().lower() == "cpu":
        return None
    for distribution in importlib.metadata.distributions():
        name = (distribution.metadata["Name"] or "").lower()
        if name.startswith(ACCELERATOR_PLUGINS):
            return name
    return None


def configure(mode: str = "auto") -> bool:
    """Applies ``mode`` (``MODES``) to this process; True if freed memory is now kept for
    reuse. ``"reuse"`` on a C library other than glibc raises ``ConfigError``."""
    if mode not in MODES:
        raise ConfigError(f"config.host_memory={mode!r}: choose one of {MODES}")
    if mode == "system" or (mode == "auto" and accelerator_plugin() is not None):
        return False
    library, _ = platform.libc_ver()
    if library != "glibc":
        if mode == "auto":
            return False
        raise ConfigError(
            f"config.host_memory='reuse' needs glibc (this is {library or platform.system()});"
            " use 'auto' or 'system'"
        )
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    settings = (
        (M_ARENA_MAX, 1),
        (M_MMAP_MAX, 0),
        (M_TRIM_THRESHOLD, NEVER_TRIM),
        (M_TOP_PAD, TOP_PAD),
    )
    return all(libc.mallopt(parameter, value) == 1 for parameter, value in settings)
