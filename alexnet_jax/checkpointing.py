"""Orbax checkpoints under ``WORKDIR/checkpoints``, and a clean stop on preemption.

Kept: the latest ``config.max_to_keep`` checkpoints, and the ``config.keep_best`` best by
evaluation top-1 (saved with each evaluated checkpoint, so that a resumed run still knows
them). Saving is asynchronous; a checkpoint is complete only once Orbax has
renamed it into place, so a run killed while writing leaves the previous one intact. A
checkpoint that was completed but cannot be read back (a damaged disk, a torn copy) is set
aside (``checkpoints/<step>.damaged``) and the run resumes from the newest one that reads.

With several processes, the state's arrays (replicated over each process's devices by the
pmap-ed step) are saved as global arrays, without a copy to the host: each process writes
its part, and restoring gives global replicated arrays, which the pmap-ed step takes as
they are.
"""

from __future__ import annotations

import contextlib
import logging as std_logging
import os
import signal
import threading
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from jax.experimental import multihost_utils
from orbax.checkpoint.checkpoint_managers import preservation_policy as preservation

from alexnet_jax.errors import CheckpointError, reason

DAMAGED_SUFFIX = ".damaged"


def _top1(metrics: dict) -> float:
    return metrics["top1"]


def create_manager(workdir: str, config: ml_collections.ConfigDict) -> ocp.CheckpointManager:
    policies = [preservation.LatestN(config.max_to_keep)]
    if config.keep_best > 0:
        policies.append(
            preservation.BestN(
                get_metric_fn=_top1,
                reverse=False,
                n=config.keep_best,
                keep_checkpoints_without_metrics=False,
            )
        )
    options = ocp.CheckpointManagerOptions(
        preservation_policy=preservation.AnyPreservationPolicy(policies),
        # Orbax writes a checkpoint's metrics to disk (and reads them back when a resumed run
        # opens the folder) only when best_fn is set; without them, BestN would forget the
        # best checkpoint at every resume and delete it. (Retention is the policy's alone.)
        best_fn=_top1,
        best_mode="max",
        enable_async_checkpointing=config.async_checkpointing,
        create=True,
        cleanup_tmp_directories=True,
    )
    return ocp.CheckpointManager(
        os.path.join(os.path.abspath(workdir), "checkpoints"), options=options
    )


def save(
    manager: ocp.CheckpointManager,
    step: int,
    state: Any,
    metrics: dict | None = None,
    replace: bool = False,
) -> None:
    """Saves ``state`` at ``step`` (asynchronously); ``metrics`` (with ``top1``) ranks it. A
    checkpoint already at ``step`` stays, unless ``replace``: then it is deleted first (a
    run killed in between resumes from the checkpoint before)."""
    if step in manager.all_steps():
        if not replace:
            return
        manager.wait_until_finished()
        manager.delete(step)
    with _untracked_saves_quiet():
        manager.save(step, args=ocp.args.StandardSave(_savable(state)), metrics=metrics, force=True)


@contextlib.contextmanager
def _untracked_saves_quiet():
    """Orbax warns at every save without metrics once ``best_fn`` is set; here checkpoints
    between evaluations are saved without them by design."""

    def keep(record: std_logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Requested `tracked_metric`")

    logger = std_logging.getLogger("absl")
    logger.addFilter(keep)
    try:
        yield
    finally:
        logger.removeFilter(keep)


def _global_mesh() -> jax.sharding.Mesh:
    return jax.sharding.Mesh(np.asarray(jax.devices()), ("all",))


def _replicated_over_devices(x: Any) -> bool:
    """An array with a copy on each of several devices, as the pmap-ed step returns it."""
    return (
        isinstance(x, jax.Array)
        and x.sharding.is_fully_replicated
        and len(x.sharding.device_set) > 1
    )


def _savable(state: Any) -> Any:
    """The state as Orbax can write it. One process: each array replicated over the devices
    as the copy on one of them (given the replicated array, Orbax splits its writing
    between the devices, compiling a slicing program for each device and leaf shape at the
    first save: 40 for the paper network on 4 devices, about 2 s on a CPU). Several: each
    array as a global array replicated over every device, made from this process's device
    buffers (Orbax cannot write pmap's host-local arrays, and copying them to the host
    would block the asynchronous save on ~500 MB at ImageNet size)."""
    if jax.process_count() == 1:
        return jax.tree_util.tree_map(
            lambda x: x.addressable_data(0) if _replicated_over_devices(x) else x, state
        )
    local = jax.sharding.NamedSharding(
        jax.sharding.Mesh(np.asarray(jax.local_devices()), ("local",)),
        jax.sharding.PartitionSpec(),
    )

    def to_global(x):
        if not isinstance(x, jax.Array) or not x.is_fully_addressable:
            return x  # a host value, or already global (restored and not stepped since)
        if not _replicated_over_devices(x):
            x = jax.device_put(x, local)  # e.g. a freshly created state on one device
        return ocp.utils.fully_replicated_host_local_array_to_global_array(x)

    return jax.tree_util.tree_map(to_global, state)


def _abstract(state: Any) -> Any:
    """What to restore into: ``state``'s shapes and dtypes, replicated over every device
    when there are several processes."""
    if jax.process_count() == 1:
        return jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, state)
    replicated = jax.sharding.NamedSharding(_global_mesh(), jax.sharding.PartitionSpec())
    return jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=replicated), state
    )


def restore(manager: ocp.CheckpointManager, state: Any, step: int) -> Any:
    """The checkpoint at ``step``, shaped like ``state``; ``CheckpointError`` naming the step
    and folder if it cannot be read."""
    try:
        return manager.restore(step, args=ocp.args.StandardRestore(_abstract(state)))
    except Exception as error:  # noqa: BLE001 - Orbax and TensorStore raise many types
        raise CheckpointError(
            f"The checkpoint at step {step} in {manager.directory} cannot be read ({reason(error)})"
        ) from error


def restore_latest(manager: ocp.CheckpointManager, state: Any) -> tuple[Any, int | None]:
    """Returns (the newest readable checkpoint's state, its step), or (state, None) if there
    is none. ``state`` gives the structure, shapes and dtypes to restore into: arrays, or
    ``jax.ShapeDtypeStruct`` leaves (``steps.abstract_train_state``).

    A checkpoint that cannot be read is named in a warning and moved aside to
    ``<step>.damaged`` (kept for inspection, out of Orbax's way), and the one before it is
    tried; if none reads, ``CheckpointError``.
    """
    steps = sorted(manager.all_steps(), reverse=True)
    damaged = []
    for step in steps:
        try:
            restored = restore(manager, state, step)
        except CheckpointError as error:
            logging.warning("%s; trying the checkpoint before it", error)
            damaged.append(step)
            continue
        _set_aside(manager, damaged)
        return restored, step
    if damaged:
        raise CheckpointError(
            f"None of the checkpoints in {manager.directory} can be read (steps {damaged}); "
            "move the folder away to start afresh"
        )
    return state, None


def _set_aside(manager: ocp.CheckpointManager, steps: list[int]) -> None:
    """Renames damaged checkpoints to ``<step>.damaged`` so that training writes those steps
    again; Orbax lists numbered folders only."""
    if not steps:
        return
    if jax.process_index() == 0:
        for step in steps:
            path = os.path.join(str(manager.directory), str(step))
            aside = path + DAMAGED_SUFFIX
            if os.path.exists(aside):
                aside += f".{os.getpid()}"
            os.replace(path, aside)
            logging.warning("Moved the unreadable checkpoint %s aside to %s", path, aside)
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("checkpoints set aside")
    manager.reload()


class StopRequest:
    """A preemption (SIGTERM) as a decision every process takes at the same step.

    One process: a SIGTERM handler sets a flag the loop reads between steps. Several: JAX's
    preemption sync point (``jax.distributed``'s coordination service catches SIGTERM in
    any process and every process learns, at the same step, that it is time to stop), so
    that all of them save the same checkpoint and return; without it one process would save
    or return while another waits in the next step's collective.
    """

    def __init__(self) -> None:
        self._event = threading.Event()
        self._previous = None
        self._synced = jax.process_count() > 1
        if self._synced:
            try:
                multihost_utils.reached_preemption_sync_point(-1)
            except RuntimeError as error:  # no coordination service (not jax.distributed)
                logging.warning(
                    "Preemption across processes is not coordinated (%s): each process "
                    "stops on its own SIGTERM",
                    error,
                )
                self._synced = False
        if not self._synced and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)

    def requested(self) -> bool:
        """Whether a SIGTERM has come, asked at any moment (in an evaluation pass, say). One
        process only: with several, only ``should_stop`` knows, at a step all of them reach."""
        return not self._synced and self._event.is_set()

    def _handle(self, signum, frame) -> None:
        logging.warning("SIGTERM received: saving a checkpoint and stopping.")
        self._event.set()

    def should_stop(self, step: int) -> bool:
        """Whether to stop after ``step``; with several processes, call it at every step
        (the same steps in every process): they all answer True at the same one."""
        if self._synced:
            return multihost_utils.reached_preemption_sync_point(step)
        return self._event.is_set()

    def close(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
