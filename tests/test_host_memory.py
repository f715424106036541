"""config.host_memory: freed host memory kept for the next step, and the choice of when."""

import os
import platform
import subprocess
import sys
import types

import pytest

from alexnet_jax import host_memory
from alexnet_jax.errors import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A jitted computation whose temporary and result (64 MB each) glibc would mmap afresh on
# every call; the fewest minor page faults of one call after the first four. With memory
# kept, the heap grows over the first calls and later ones fault now and then (while XLA's
# threads interleave their blocks differently, more so on a loaded machine): in 16 calls
# some fault none. With glibc's defaults every call faults both blocks in.
FAULTS = """
import resource, sys
from alexnet_jax import host_memory
reused = host_memory.configure(sys.argv[1])
import jax, jax.numpy as jnp
f = jax.jit(lambda x: jnp.cumsum(x * 3.0, axis=1) + 1.0)
x = jnp.ones((4096, 4096), jnp.float32)
faults = []
for _ in range(16):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    f(x).block_until_ready()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(reused, min(faults[4:]))
"""


def faults_per_call(mode: str, script: str = FAULTS) -> tuple[bool, int]:
    """Runs ``script`` with ``mode`` in a fresh process: whether memory was kept, and the
    count it printed (FAULTS: page faults of a call; LARGE: calls that faulted)."""
    result = subprocess.run(
        [sys.executable, "-c", script, mode],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )
    assert result.returncode == 0, result.stderr[-2000:]
    reused, faults = result.stdout.split()
    return reused == "True", int(faults)


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_reuse_stops_the_page_faults_of_every_call():
    pages = 64 * 2**20 // os.sysconf("SC_PAGE_SIZE")
    reused, faults = faults_per_call("system")
    assert not reused and faults >= pages  # glibc maps the 64 MB blocks afresh each call
    reused, faults = faults_per_call("reuse")
    assert reused and faults < pages // 10


# A result larger than 2 GiB, dropped after each call: freed at the top of the heap, where
# glibc gives memory back once the free top exceeds M_TRIM_THRESHOLD. Its largest positive
# value (2**31 - 1, an int) is smaller than the free top of a step with over 2 GiB of
# temporaries (the paper network's bfloat16 train step at batch 32, any step at larger
# batches): every call then faulted the whole block in again. -1 disables trimming.
# The runtime frees a dropped result on its own threads, so now and then the next call's
# block is placed before the last one is freed and the heap grows once more: that call
# faults every page with either setting. The pause after each call lets the free land
# first, and the test counts the calls that fault: in 14 runs of 10 calls, at most 2 of the
# last 7 with trimming off, against 4-7 of them with the old threshold (4 runs).
LARGE = """
import resource, sys, time
from alexnet_jax import host_memory
reused = host_memory.configure(sys.argv[1])
import jax, jax.numpy as jnp
f = jax.jit(lambda s: jnp.broadcast_to(s, (576, 2**20)) * 2.0)  # 2.25 GiB of float32
pages = 576 * 2**22 // resource.getpagesize()
faulting = 0
for call in range(10):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    y = f(jnp.float32(1.5)).block_until_ready()
    del y
    time.sleep(0.3)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    if call >= 3 and faults > pages // 100:
        faulting += 1
print(reused, faulting)
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_reuse_keeps_blocks_larger_than_two_gib():
    reused, faulting_calls = faults_per_call("reuse", LARGE)
    assert reused and faulting_calls <= 2, f"{faulting_calls} of the last 7 calls faulted"


def test_modes_are_checked():
    with pytest.raises(ConfigError, match=r"config.host_memory='always': choose one of"):
        host_memory.configure("always")


def test_system_leaves_the_c_library_alone(monkeypatch):
    monkeypatch.setattr(host_memory.ctypes, "CDLL", None)  # any call would fail
    assert host_memory.configure("system") is False


def test_auto_reuses_only_without_an_accelerator_plugin(monkeypatch):
    monkeypatch.setattr(host_memory.ctypes, "CDLL", None)
    monkeypatch.setattr(host_memory, "accelerator_plugin", lambda: "jax-cuda12-plugin")
    assert host_memory.configure("auto") is False


@pytest.mark.parametrize(
    "installed, platforms, found",
    [
        (["numpy", "jax-cuda12-plugin"], "", "jax-cuda12-plugin"),
        (["jax_cuda13_pjrt"], "", "jax_cuda13_pjrt"),
        (["libtpu"], "tpu", "libtpu"),
        (["jax-cuda12-plugin"], "cpu", None),  # the run is forced onto the CPU
        (["numpy", "jax", "jaxlib"], "", None),
    ],
)
def test_accelerator_plugins_are_found(monkeypatch, installed, platforms, found):
    fake = [types.SimpleNamespace(metadata={"Name": name}) for name in installed]
    monkeypatch.setattr(host_memory.importlib.metadata, "distributions", lambda: fake)
    monkeypatch.setenv("JAX_PLATFORMS", platforms)
    assert host_memory.accelerator_plugin() == found


def test_another_c_library_reuses_nothing(monkeypatch):
    monkeypatch.setattr(host_memory.platform, "libc_ver", lambda: ("", ""))
    monkeypatch.setattr(host_memory, "accelerator_plugin", lambda: None)
    monkeypatch.setattr(host_memory.ctypes, "CDLL", None)
    assert host_memory.configure("auto") is False
    with pytest.raises(ConfigError, match="'reuse' needs glibc"):
        host_memory.configure("reuse")
