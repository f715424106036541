"""Orbax checkpoints under ``WORKDIR/checkpoints``, and a clean stop on SIGTERM.

Kept: the latest ``config.max_to_keep`` checkpoints, and the ``config.keep_best`` best by
evaluation top-1. Saving is asynchronous; a checkpoint is complete only once Orbax has
renamed it into place, so a run killed while writing leaves the previous one intact.
"""

from __future__ import annotations

import os
import signal
import threading
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp
from absl import logging
from orbax.checkpoint.checkpoint_managers import preservation_policy as preservation


def create_manager(workdir: str, config: ml_collections.ConfigDict) -> ocp.CheckpointManager:
    policies = [preservation.LatestN(config.max_to_keep)]
    if config.keep_best > 0:
        policies.append(
            preservation.BestN(
                get_metric_fn=lambda metrics: metrics["top1"],
                reverse=False,
                n=config.keep_best,
                keep_checkpoints_without_metrics=False,
            )
        )
    options = ocp.CheckpointManagerOptions(
        preservation_policy=preservation.AnyPreservationPolicy(policies),
        enable_async_checkpointing=config.async_checkpointing,
        create=True,
        cleanup_tmp_directories=True,
    )
    return ocp.CheckpointManager(
        os.path.join(os.path.abspath(workdir), "checkpoints"), options=options
    )


def save(
    manager: ocp.CheckpointManager, step: int, state: Any, metrics: dict | None = None
) -> None:
    """Saves ``state`` at ``step`` (asynchronously); ``metrics`` (with ``top1``) ranks it."""
    if step in manager.all_steps():
        return
    manager.save(step, args=ocp.args.StandardSave(_savable(state)), metrics=metrics, force=True)


def _savable(state: Any) -> Any:
    """With several processes, pmap's replicated outputs are host-local arrays, which Orbax
    cannot serialize; they are identical everywhere, so their host copy is saved instead."""
    return jax.device_get(state) if jax.process_count() > 1 else state


def restore_latest(manager: ocp.CheckpointManager, state: Any) -> tuple[Any, int | None]:
    """Returns (the latest checkpoint's state, its step), or (state, None) if there is none.

    ``state`` gives the structure, shapes and dtypes to restore into.
    """
    step = manager.latest_step()
    if step is None:
        return state, None
    return restore(manager, state, step), step


def restore(manager: ocp.CheckpointManager, state: Any, step: int) -> Any:
    abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, _savable(state))
    return manager.restore(step, args=ocp.args.StandardRestore(abstract))


class StopRequest:
    """Turns SIGTERM (a preemption) into a flag the training loop polls between steps."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self._previous = None
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame) -> None:
        logging.warning("SIGTERM received: saving a checkpoint and stopping.")
        self._event.set()

    @property
    def requested(self) -> bool:
        return self._event.is_set()

    def close(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
