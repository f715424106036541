"""The training loop: ``train_and_evaluate(config, workdir)``.

Validates the config, builds the data, the model and the pmap-ed steps
(``alexnet_jax.steps``), resumes from the workdir's latest checkpoint (or starts from
another run's weights with ``config.init_from``), then trains, logs, evaluates
(``alexnet_jax.evaluate``) and checkpoints until the last step or a SIGTERM.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Iterator
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging
from tqdm import tqdm

from alexnet_jax import checkpointing, data, normalization, onednn, optim, steps
from alexnet_jax.config_checks import validate_config
from alexnet_jax.data.dataset import steps_per_epoch as count_steps_per_epoch
from alexnet_jax.errors import ConfigError, UserError
from alexnet_jax.evaluate import evaluate_batches
from alexnet_jax.figures import confusion_image, grid_columns, kernel_grid
from alexnet_jax.files import atomic_write
from alexnet_jax.metrics import MetricsWriter
from alexnet_jax.model import first_layer, head_layer
from alexnet_jax.run_files import params_from_workdir, transfer_params, write_run_files
from alexnet_jax.steps import TrainState

# The step whose evaluation a SIGTERM cut short, in the workdir until a rerun has evaluated it.
PENDING_EVALUATION = "eval_pending.json"


class NonFiniteLossError(UserError, FloatingPointError):
    """The loss or gradients became NaN or infinite; the message names the step."""


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Trains (resuming from ``workdir`` if it holds checkpoints) and returns the last eval."""
    # --- the data, the schedule and the run files -----------------------------------------------
    validate_config(config, workdir)
    if data.source_name(config.dataset) in data.EVAL_ONLY_SOURCES:
        raise ConfigError(
            f"config.dataset={config.dataset!r} is an evaluation set (no training split): "
            "evaluate an ImageNet-trained workdir on it with --mode=eval"
        )
    dataset = data.create_dataset(config)  # checks config.num_classes too
    config = resolved(config, dataset)
    steps_per_epoch = count_steps_per_epoch(dataset.train_size, config)
    total_steps = max(1, int(math.ceil(config.num_epochs * steps_per_epoch)))
    if config.num_train_steps > 0:
        total_steps = config.num_train_steps
    eval_every = max(1, int(round(config.eval_every_epochs * steps_per_epoch)))
    is_main = jax.process_index() == 0
    logging.info(
        "%d processes, %d devices (%d local, %s); dataset %s: %d train / %d eval examples, "
        "%d classes, %d steps per epoch, %d steps",
        jax.process_count(), jax.device_count(), jax.local_device_count(),
        jax.devices()[0].device_kind, dataset.name, dataset.train_size, dataset.eval_size,
        dataset.num_classes, steps_per_epoch, total_steps,
    )  # fmt: skip
    logging.info("Config:\n%s", config)
    if jax.default_backend() == "cpu":
        kernels = (("cpu_convolutions", "convolutions"), ("cpu_matmuls", "dense products"))
        for field, what in kernels:
            try:  # built here (once per machine), before the steps compile around it
                on_onednn = onednn.available(config[field], field)
            except onednn.OnednnUnavailable as e:
                raise ConfigError(f"config.{field}='onednn': {e}") from e
            widened = on_onednn and config.half_precision and not onednn.native_bf16()
            logging.info(
                "CPU %s: %s%s", what, "oneDNN's" if on_onednn else "XLA's",
                " (bfloat16 widened to float32: this CPU has no bfloat16 arithmetic)"
                if widened else "",
            )  # fmt: skip
    if is_main:
        write_run_files(workdir, config, dataset.class_names)

    # --- the state: restored, fine-tuned from another run, or new --------------------------------
    model = steps.create_model(config, dataset.num_classes)
    learning_rate_fn = optim.create_learning_rate_fn(config, steps_per_epoch)
    # The rate an evaluation records, as one program (op by op, a schedule's few scalar
    # operations compile one program each).
    rate_at = jax.jit(lambda step, plateau: learning_rate_fn(step) * plateau["scale"])
    rng = jax.random.PRNGKey(config.seed)  # a raw uint32 key: checkpoints store it as is
    manager = checkpointing.create_manager(workdir, config)
    # A resumed run restores into the state's shapes; only a new one initializes.
    template = steps.abstract_train_state(config, model, dataset.image_shape)
    state, restored_step = checkpointing.restore_latest(manager, template)
    if restored_step is not None:
        logging.info(
            "Resuming from the checkpoint at step %d in %s", restored_step, manager.directory
        )
    else:
        state = steps.create_train_state(rng, config, model, dataset.image_shape)
        if config.init_from:
            state = init_from(state, config)
    start_step = int(jax.device_get(state.step))
    last_checkpoint = restored_step

    # --- the steps ------------------------------------------------------------------------------
    mean_image = None
    if config.input.normalization == "mean_image":
        mean_image = normalization.load_or_compute_mean_image(
            config, workdir, dataset.train_batches, dataset.image_shape, dataset.device_augment
        )
    normalize = normalization.make_normalizer(config.input, mean_image)
    p_train_step = steps.make_train_step(
        config, learning_rate_fn, normalize, dataset.device_augment
    )
    p_eval_step = steps.make_eval_step(config, normalize)

    # --- the loop -------------------------------------------------------------------------------
    writer = MetricsWriter(workdir)
    stop = checkpointing.StopRequest()
    pending_path = os.path.join(workdir, PENDING_EVALUATION)

    def evaluate_and_save(state: TrainState, done: int, replace: bool = False):
        """The evaluation at step ``done`` (and the plateau schedule), then a checkpoint ranked
        by its top-1: ``(state, record)``, or None when a SIGTERM came during the pass."""
        eval_start = time.perf_counter()
        tally = evaluate_batches(
            p_eval_step,
            steps.inference_state(state, config),
            dataset.eval_batches(),
            dataset.num_classes,
            interrupted=stop.requested,
        )
        if tally is None:
            return None
        result = tally.summary()
        eval_seconds = time.perf_counter() - eval_start
        lr = float(rate_at(done, state.plateau))
        epoch = done / steps_per_epoch
        record = dict(step=done, epoch=epoch, split="eval", lr=lr,
                      img_per_s=dataset.eval_size / eval_seconds, **result)  # fmt: skip
        writer.write(record)
        writer.write_images(done, _eval_images(state, tally, config))
        logging.info("eval at step %d (epoch %.2f): %s", done, epoch,
                     {k: round(v, 4) for k, v in result.items()})  # fmt: skip
        if config.lr_schedule == "plateau":
            state = state.replace(plateau=_plateau_after_eval(state, result["top1"], config))
        checkpointing.save(manager, done, state, {"top1": result["top1"]}, replace=replace)
        return state, record

    def stopped_during_evaluation(state: TrainState, done: int) -> dict[str, Any]:
        """A SIGTERM cut the evaluation at ``done`` short: the step's checkpoint is saved
        without it, and the rerun evaluates it first (``PENDING_EVALUATION``, written before
        the checkpoint: a rerun from an older checkpoint ignores it)."""
        if is_main:
            atomic_write(pending_path, json.dumps({"step": done}))
        checkpointing.save(manager, done, state)
        manager.wait_until_finished()
        logging.warning(
            "Stopped by SIGTERM during the evaluation at step %d; checkpoint saved in %s (rerun "
            "the same command to evaluate it and resume)",
            done,
            manager.directory,
        )
        return {"stopped_at_step": done}

    last_eval: dict[str, Any] = {}
    progress = None
    profile = Profile(config.profile_steps, start_step, workdir)
    try:
        # (A checkpoint with metrics was evaluated after all: the rerun's own replacement.)
        pending = _pending_evaluation(pending_path)
        if pending is not None and pending == restored_step and manager.metrics(pending) is None:
            logging.info("Evaluating step %d first: a SIGTERM cut it short", restored_step)
            evaluated = evaluate_and_save(state, restored_step, replace=True)
            if evaluated is None:
                return stopped_during_evaluation(state, restored_step)
            state, last_eval = evaluated
        if is_main and os.path.exists(pending_path):
            os.remove(pending_path)  # done, or for a newer step
        progress = _progress_bar(config, is_main, start_step, total_steps)
        batches = prefetch_to_device(dataset.train_batches(start_step), config.input.prefetch)
        window: list[dict[str, jax.Array]] = []
        window_start = time.perf_counter()
        for step in range(start_step, total_steps):
            profile.before(step)
            state, metrics = p_train_step(state, next(batches))
            profile.after(step, state)
            window.append(metrics)
            done = step + 1
            epoch = done / steps_per_epoch
            # Training metrics, averaged over the window since the last record.
            if done % config.log_every_steps == 0 or done == total_steps:
                _check_finite(state, last_checkpoint)
                fetched = jax.device_get(window)
                summary = {k: float(np.mean([m[k] for m in fetched])) for k in fetched[0]}
                summary["lr"] = float(fetched[-1]["lr"])  # the rate now, not the window's mean
                elapsed = time.perf_counter() - window_start
                img_per_s = len(window) * config.batch_size / elapsed
                writer.write(
                    dict(step=done, epoch=epoch, split="train", img_per_s=img_per_s, **summary)
                )
                if progress is not None:
                    progress.set_postfix(loss=f"{summary['loss']:.4f}", img_s=f"{img_per_s:.0f}")
                window, window_start = [], time.perf_counter()
            if progress is not None:
                progress.update(1)
            # Evaluation (and the plateau schedule), then a checkpoint ranked by its top-1.
            if done % eval_every == 0 or done == total_steps:
                _check_finite(state, last_checkpoint)
                evaluated = evaluate_and_save(state, done)
                if evaluated is None:
                    return {**stopped_during_evaluation(state, done), **last_eval}
                state, last_eval = evaluated
                last_checkpoint = done
            elif done % config.checkpoint_every_steps == 0 or done % steps_per_epoch == 0:
                _check_finite(state, last_checkpoint)
                checkpointing.save(manager, done, state)
                last_checkpoint = done
            # A preemption: every process saves this step and stops cleanly.
            if stop.should_stop(done):
                _check_finite(state, last_checkpoint)
                checkpointing.save(manager, done, state)
                manager.wait_until_finished()
                logging.warning(
                    "Stopped by SIGTERM after step %d; checkpoint saved in %s (rerun the same "
                    "command to resume)",
                    done,
                    manager.directory,
                )
                return {"stopped_at_step": done, **last_eval}
    finally:
        profile.close()
        manager.wait_until_finished()
        stop.close()
        writer.close()
        if progress is not None:
            progress.close()
    return last_eval


def resolved(config: ml_collections.ConfigDict, dataset: data.Dataset) -> ml_collections.ConfigDict:
    """The config with the values it left to the data (``num_classes=0``,
    ``input.resize_size=0``) set to what the data decided, as ``config.json`` saves them for
    evaluation, prediction and fine-tuning."""
    if config.num_classes and (config.input.resize_size or not dataset.resize_size):
        return config
    config = config.copy_and_resolve_references()
    config.num_classes = config.num_classes or dataset.num_classes
    config.input.resize_size = config.input.resize_size or dataset.resize_size
    return config


def init_from(state: TrainState, config: ml_collections.ConfigDict) -> TrainState:
    """Fine-tuning: every layer from ``config.init_from``'s checkpoint (another run's or a
    converted model's workdir); a new head when the class count differs. Optimizer state
    starts afresh."""
    source, step = params_from_workdir(config.init_from, config.init_from_checkpoint)
    name = f"{config.init_from} (step {step})"
    params = transfer_params(state.params, source, name, head_layer(config.model))
    logging.info("Initialized from %s", name)
    return state.replace(params=params, opt_state=state.tx.init(params))


def prefetch_to_device(iterator: Iterator, size: int) -> Iterator:
    """Keeps ``size`` batches in flight to the local devices while the step runs."""
    devices = jax.local_devices()
    sharding = jax.sharding.NamedSharding(
        jax.sharding.Mesh(np.asarray(devices), (steps.AXIS,)),
        jax.sharding.PartitionSpec(steps.AXIS),
    )
    queue: list = []

    def put(batch):
        return {
            k: v if isinstance(v, jax.Array) else jax.device_put(v, sharding)
            for k, v in batch.items()
        }

    for batch in iterator:
        queue.append(put(batch))
        if len(queue) > size:
            yield queue.pop(0)
    yield from queue


class Profile:
    """A ``jax.profiler`` trace of ``steps`` train steps, after ``WARMUP`` steps (compiling
    and the input pipeline's start are not what one wants to see), in ``WORKDIR/profile``:
    an XPlane for TensorBoard's profile plugin and a Perfetto trace (``*.trace.json.gz``)."""

    WARMUP = 5

    def __init__(self, steps: int, start_step: int, workdir: str):
        self.first = start_step + self.WARMUP if steps > 0 else -1
        self.last = self.first + steps - 1
        self.directory = os.path.join(workdir, "profile")
        if jax.process_count() > 1:
            self.directory = os.path.join(self.directory, f"process_{jax.process_index()}")
        self.running = False

    def before(self, step: int) -> None:
        if step == self.first:
            jax.profiler.start_trace(self.directory, create_perfetto_trace=True)
            self.running = True

    def after(self, step: int, state: TrainState) -> None:
        if self.running and step == self.last:
            jax.block_until_ready(state)  # the traced steps run to their end
            self.close()
            logging.info("Profiled steps %d-%d into %s", self.first + 1, step + 1, self.directory)

    def close(self) -> None:
        if self.running:
            jax.profiler.stop_trace()
            self.running = False


def _eval_images(state: TrainState, tally, config: ml_collections.ConfigDict) -> dict:
    """What TensorBoard shows beside the scalars at an evaluation: the first layer's kernels
    (the paper's Figure 3) and the confusion matrix."""
    kernel = np.asarray(jax.device_get(state.params[first_layer(config.model)]["kernel"]))
    grid = kernel_grid(kernel, columns=grid_columns(kernel.shape[-1]))
    return {
        "eval/first_layer_kernels": grid,
        "eval/confusion_matrix": confusion_image(tally.confusion),
    }


def _pending_evaluation(path: str) -> int | None:
    """The step whose evaluation a SIGTERM cut short (the ``PENDING_EVALUATION`` file at
    ``path``), or None."""
    try:
        with open(path) as f:
            return int(json.load(f)["step"])
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as error:
        logging.warning("Ignoring %s, which cannot be read: %s", path, error)
        return None


def _check_finite(state: TrainState, last_checkpoint: int | None) -> None:
    bad = int(jax.device_get(state.nonfinite_step))
    if bad >= 0:
        kept = (
            f"the last good checkpoint (step {last_checkpoint}) is kept"
            if last_checkpoint is not None
            else "no checkpoint was written before it"
        )
        raise NonFiniteLossError(
            f"Loss or gradients became NaN/inf at step {bad + 1} (0-based step {bad}); stopping. "
            f"The parameters were not updated by that step and {kept}. Lower "
            "config.learning_rate or check the input data."
        )


def _plateau_after_eval(
    state: TrainState, top1: float, config: ml_collections.ConfigDict
) -> dict[str, jax.Array]:
    return optim.plateau_update(
        jax.device_get(state.plateau),
        top1,
        patience=config.plateau_patience,
        factor=config.plateau_factor,
        max_reductions=config.plateau_max_reductions,
        min_delta=config.plateau_min_delta,
    )


def _progress_bar(config, is_main: bool, start: int, total: int):
    if not (config.progress_bar and is_main):
        return None
    return tqdm(total=total, initial=start, unit="step", dynamic_ncols=True)
