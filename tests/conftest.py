"""Test set-up: four CPU devices for the multi-device tests, before JAX starts its backend."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in flags:
    os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count=4".strip()
