"""Test set-up, before JAX starts its backend: four CPU devices for the multi-device tests,
one persistent XLA compilation cache for the session, and host memory as ``main.py`` keeps it
by default (``config.host_memory="auto"``: on a CPU-only installation the memory the steps
free is kept for the next ones; in this process that took the in-process tests' page faults
from 4.8 M to 0.65 M and ``tests/test_model.py`` from 170-176 s to 158-160 s). With
``CI=true`` a skipped test fails the session: in CI every independent reference (PyTorch,
TensorFlow, TFDS) must run.

The cache is an environment variable, so the ``main.py`` processes the tests start share it:
the same small train and eval steps compile once instead of once per run (the suite's
slowest tests train, stop and resume the same config several times). So do pytest-xdist's
workers (``-n`` in ``pyproject.toml``): pytest imports this file in the controlling process
before it starts them, and they inherit its environment (only the controller, which made
the folder, removes it). A cache the caller already set (``JAX_COMPILATION_CACHE_DIR``) is
used as it is.
"""

import os
import shutil
import tempfile

import pytest

from alexnet_jax import host_memory

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in flags:
    os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count=4".strip()

host_memory.configure("auto")  # before JAX starts its threads, as main.py does

_OWN_CACHE = None
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _OWN_CACHE = tempfile.mkdtemp(prefix="alexnet-jax-tests-xla-cache-")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _OWN_CACHE


_SKIPPED: list[str] = []


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "extra(name): needs the optional extra NAME; CI runs it in its own environment"
    )


def pytest_runtest_logreport(report):
    # A test of an optional extra may skip where that extra is not installed; CI runs those
    # tests again in an environment with it (ALEXNET_EXTRAS set), where they must not skip.
    optional = "extra" in report.keywords and not os.environ.get("ALEXNET_EXTRAS")
    if report.skipped and not optional:
        _SKIPPED.append(f"{report.nodeid}: {report.longrepr[-1] if report.longrepr else ''}")


def pytest_sessionfinish(session, exitstatus):
    if _OWN_CACHE:
        shutil.rmtree(_OWN_CACHE, ignore_errors=True)
    # In CI every reference (TensorFlow, PyTorch, TFDS) is installed: a skipped test means a
    # reference check did not run, and that fails the build instead of hiding in a count.
    if os.environ.get("CI") == "true" and _SKIPPED and session.exitstatus == 0:
        print("\nCI=true and these tests were skipped (a missing reference?):")
        for line in _SKIPPED:
            print(f"  {line}")
        session.exitstatus = 1


@pytest.fixture(scope="session")
def uninterrupted_run(tmp_path_factory):
    """The final evaluation of ``tests.test_train.small_config`` trained 8 steps without a
    stop: where the SIGKILL and SIGTERM tests' resumed runs must end (trained once)."""
    from alexnet_jax import train
    from tests.test_train import small_config

    workdir = tmp_path_factory.mktemp("uninterrupted")
    return train.train_and_evaluate(small_config(num_train_steps=8), str(workdir))
