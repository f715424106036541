"""Joining several processes (hosts) into one JAX run.

``initialize("auto")`` calls ``jax.distributed.initialize`` when the environment names a
coordinator (``JAX_COORDINATOR_ADDRESS`` with ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID``)
or a cluster JAX detects by itself (SLURM, Open MPI...); ``"yes"`` always calls it; ``"no"``
never does. Each process then trains on its own part of every global batch, and only
process 0 writes logs and metrics.
"""

from __future__ import annotations

import os

import jax

from alexnet_jax.errors import ConfigError

MODES = ("auto", "yes", "no")  # config.distributed
CLUSTER_VARIABLES = ("JAX_COORDINATOR_ADDRESS", "SLURM_JOB_ID", "OMPI_COMM_WORLD_SIZE")


def initialize(mode: str = "auto") -> bool:
    """Initializes multi-process JAX if ``mode`` and the environment ask for it."""
    if mode not in MODES:
        raise ConfigError(f"config.distributed={mode!r}: choose one of {MODES}")
    if mode == "no" or (mode == "auto" and not any(v in os.environ for v in CLUSTER_VARIABLES)):
        return False
    kwargs = {}
    if "JAX_COORDINATOR_ADDRESS" in os.environ:
        kwargs = dict(
            coordinator_address=os.environ["JAX_COORDINATOR_ADDRESS"],
            num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
            process_id=int(os.environ["JAX_PROCESS_ID"]),
        )
    jax.distributed.initialize(**kwargs)
    return True
