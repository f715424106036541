"""Training and evaluation: a jit-compiled train step pmap-ed over every local device.

The state is passed to ``jax.pmap`` unreplicated (``in_axes=None``) and comes back
replicated (``out_axes=None``), the pattern of Flax's ImageNet example since pmap became
``jit(shard_map)``: there is no replicate/unreplicate gather, and it works across hosts.
Gradients and metrics are averaged with ``lax.pmean`` over the ``"batch"`` axis; each
device draws its own dropout mask from ``fold_in(fold_in(seed_key, step), device)``.
"""

from __future__ import annotations

import functools
import math
import os
import time
from collections.abc import Callable, Iterator
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from flax import struct
from jax import lax

from alexnet_jax import checkpointing, input_pipeline, optim
from alexnet_jax.config_checks import validate_config
from alexnet_jax.metrics import MetricsWriter
from alexnet_jax.model import AlexNet

AXIS = "batch"

# XLA:CPU (jax 0.10) runs convolutions through YNNPACK fusions. For AlexNet's shapes on the
# 2-core AMD EPYC we develop on they are 1.6-3.6x slower than XLA's Eigen convolutions, and
# conv2's kernel gradient is 8x slower (3.4 s of a 6.2 s train step at batch 32); with them
# off a step takes 2.5 s (benchmarks/compare_pytorch.py; README "Speed"). The steps are
# compiled with this option on CPU unless config.xla_cpu_ynn_fusions is True.
CPU_COMPILER_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": ""}


class TrainState(struct.PyTreeNode):
    """Everything a run needs to continue exactly: checkpointed whole."""

    step: jax.Array
    params: Any
    opt_state: Any
    rng: jax.Array  # raw uint32 key: dropout keys are fold_in(rng, step), then the device
    plateau: dict[str, jax.Array]  # reduce-on-plateau memory (optim.plateau_update)
    nonfinite_step: jax.Array  # -1, or the first step whose loss or gradients were not finite
    apply_fn: Callable = struct.field(pytree_node=False)
    tx: optax.GradientTransformation = struct.field(pytree_node=False)


def create_model(config: ml_collections.ConfigDict, num_classes: int) -> nn.Module:
    dtype = jnp.bfloat16 if config.half_precision else jnp.float32
    return AlexNet(num_classes=num_classes, dtype=dtype, **config.model)


def create_train_state(
    rng: jax.Array, config: ml_collections.ConfigDict, model: nn.Module, image_shape: tuple
) -> TrainState:
    init_rng, state_rng = jax.random.split(rng)
    params = jax.jit(lambda key: model.init(key, jnp.zeros((1,) + tuple(image_shape)))["params"])(
        init_rng
    )
    tx = optim.create_optimizer(config)
    return TrainState(
        step=jnp.asarray(0, jnp.int32),
        params=params,
        opt_state=tx.init(params),
        rng=state_rng,
        plateau=optim.initial_plateau_state(),
        nonfinite_step=jnp.asarray(-1, jnp.int32),
        apply_fn=model.apply,
        tx=tx,
    )


def normalize_images(
    images: jax.Array, config: ml_collections.ConfigDict, mean_image: np.ndarray | None = None
) -> jax.Array:
    """uint8 pixels become floats on the device (cheaper to transfer); floats pass through.

    ``config.input.normalization="mean_image"`` subtracts ``mean_image`` (H, W, C), in the
    units of the batches' pixels, from uint8 and float images alike.
    """
    if config.input.normalization == "mean_image":
        if mean_image is None:
            raise ValueError('config.input.normalization="mean_image" needs the mean image')
        return images.astype(jnp.float32) - jnp.asarray(mean_image, jnp.float32)
    if images.dtype != jnp.uint8:
        return images
    images = images.astype(jnp.float32)
    channels = images.shape[-1]
    if config.input.normalization in ("mean_std", "mean"):
        images = images - jnp.asarray(config.input.mean_rgb[:channels], jnp.float32)
    if config.input.normalization == "mean_std":
        images = images / jnp.asarray(config.input.std_rgb[:channels], jnp.float32)
    if config.input.normalization == "unit":
        images = images / 255.0
    return images


def classification_metrics(logits: jax.Array, labels: jax.Array) -> dict[str, jax.Array]:
    """Per-example loss, top-1 and top-5 (top-k capped at the number of classes)."""
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    k = min(5, logits.shape[-1])
    top_k = lax.top_k(logits, k)[1]
    hits = top_k == labels[:, None]
    return {
        "loss": loss,
        "top1": hits[:, 0].astype(jnp.float32),
        "top5": hits.any(-1).astype(jnp.float32),
    }


def dropout_key(rng: jax.Array, step: jax.Array) -> jax.Array:
    """This device's dropout key at ``step``: a function of (seed, step, device) only."""
    return jax.random.fold_in(jax.random.fold_in(rng, step), lax.axis_index(AXIS))


def train_step(
    state: TrainState,
    batch: dict[str, jax.Array],
    *,
    learning_rate_fn: Callable[[jax.Array], jax.Array],
    config: ml_collections.ConfigDict,
    mean_image: np.ndarray | None = None,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One SGD step on this device's part of the batch; run inside ``jax.pmap``."""
    step = state.step
    dropout_rng = dropout_key(state.rng, step)
    images = normalize_images(batch["image"], config, mean_image)

    def loss_fn(params):
        logits = state.apply_fn(
            {"params": params}, images, train=True, rngs={"dropout": dropout_rng}
        )
        per_example = classification_metrics(logits, batch["label"])
        return per_example["loss"].mean(), per_example

    (loss, per_example), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    grads = lax.pmean(grads, AXIS)
    learning_rate = learning_rate_fn(step) * state.plateau["scale"]
    metrics = lax.pmean({k: v.mean() for k, v in per_example.items()}, AXIS)
    # A non-finite loss or gradient leaves the state as it was and records the step; the
    # host stops the run at its next check, so no checkpoint ever holds NaNs. lax.cond runs
    # the update only when it is finite (5 % faster on CPU than selecting every parameter).
    finite = jnp.isfinite(metrics["loss"]) & jnp.all(
        jnp.asarray([jnp.all(jnp.isfinite(g)) for g in jax.tree_util.tree_leaves(grads)])
    )

    def apply_update(state: TrainState) -> TrainState:
        opt_state = optim.set_learning_rate(state.opt_state, learning_rate)
        updates, opt_state = state.tx.update(grads, opt_state, state.params)
        return state.replace(
            step=step + 1, params=optax.apply_updates(state.params, updates), opt_state=opt_state
        )

    new_state = lax.cond(finite, apply_update, lambda state: state, state)
    first_bad = jnp.where((state.nonfinite_step < 0) & ~finite, step, state.nonfinite_step)
    new_state = new_state.replace(nonfinite_step=first_bad)
    metrics["lr"] = learning_rate
    return new_state, metrics


def eval_logits(state: TrainState, images: jax.Array) -> jax.Array:
    """Evaluation-mode logits; for 10-crop images (N, 10, H, W, C) the log of the crops'
    averaged softmax (whose softmax is that average)."""
    if images.ndim == 5:
        n, crops = images.shape[:2]
        logits = state.apply_fn(
            {"params": state.params}, images.reshape((n * crops,) + images.shape[2:])
        )
        return jnp.log(jax.nn.softmax(logits).reshape((n, crops, -1)).mean(axis=1))
    return state.apply_fn({"params": state.params}, images)


def eval_step(
    state: TrainState,
    batch: dict[str, jax.Array],
    *,
    config: ml_collections.ConfigDict,
    mean_image: np.ndarray | None = None,
) -> dict[str, jax.Array]:
    """Summed loss, top-1 and top-5 over this batch (padding masked out), across devices.

    With 10-crop images (N, 10, H, W, C) the softmaxes of the crops are averaged.
    """
    logits = eval_logits(state, normalize_images(batch["image"], config, mean_image))
    per_example = classification_metrics(logits, batch["label"])
    mask = batch["mask"]
    sums = {k: (v * mask).sum() for k, v in per_example.items()}
    sums["count"] = mask.sum()
    return lax.psum(sums, AXIS)


def make_steps(
    config: ml_collections.ConfigDict,
    learning_rate_fn: Callable,
    devices: list | None = None,
    mean_image: np.ndarray | None = None,
):
    """The pmap-ed train and eval steps: state unreplicated in, replicated out; state donated.

    ``devices`` defaults to every local device; ``mean_image`` is needed with
    ``config.input.normalization="mean_image"`` (see
    ``input_pipeline.load_or_compute_mean_image``). The state is donated in single-process
    runs only: on jax 0.10, donating an ``in_axes=None`` argument to a multi-process pmap deletes
    it before use ("Array has been deleted"), so several processes keep the extra copy.
    """
    donate = (0,) if jax.process_count() == 1 else ()
    # Compiled ahead of time to pass the options: single-process only, where arguments can be
    # moved to the executable's shardings (several processes keep pmap's own placement).
    options = compiler_options(config, devices) if jax.process_count() == 1 else {}
    p_train_step = jax.pmap(
        functools.partial(
            train_step, learning_rate_fn=learning_rate_fn, config=config, mean_image=mean_image
        ),
        axis_name=AXIS,
        in_axes=(None, 0),
        out_axes=(None, None),
        donate_argnums=donate,
        devices=devices,
    )
    p_eval_step = jax.pmap(
        functools.partial(eval_step, config=config, mean_image=mean_image),
        axis_name=AXIS,
        in_axes=(None, 0),
        out_axes=None,
        devices=devices,
    )
    if options:
        return CompiledWithOptions(p_train_step, options), CompiledWithOptions(p_eval_step, options)
    return p_train_step, p_eval_step


def compiler_options(config: ml_collections.ConfigDict, devices: list | None = None) -> dict:
    """XLA options for the steps on ``devices`` (default: the local ones): on CPU, no YNNPACK
    convolutions unless ``config.xla_cpu_ynn_fusions``; none elsewhere."""
    platform = (devices or jax.local_devices())[0].platform
    if platform == "cpu" and not config.get("xla_cpu_ynn_fusions", False):
        return dict(CPU_COMPILER_OPTIONS)
    return {}


class CompiledWithOptions:
    """A pmap-ed function compiled ahead of time with XLA ``compiler_options`` (``jax.pmap``
    takes none), once per input signature: tree structure, shapes and dtypes."""

    def __init__(self, fn: Callable, compiler_options: dict[str, Any]):
        self.fn = fn
        self.compiler_options = dict(compiler_options)
        self._compiled: dict[Any, Callable] = {}

    def __call__(self, *args):
        leaves, tree = jax.tree_util.tree_flatten(args)
        key = (tree, tuple((np.shape(x), getattr(x, "dtype", None) or np.result_type(x))
                           for x in leaves))  # fmt: skip
        compiled = self._compiled.get(key)
        if compiled is None:
            lowered = self.fn.lower(*args)
            try:
                compiled = lowered.compile(compiler_options=self.compiler_options)
            except Exception as error:  # noqa: BLE001 - an XLA without these options
                logging.warning(
                    "Compiling without %s, which this XLA rejects: %s", self.compiler_options, error
                )
                compiled = lowered.compile()
            self._compiled[key] = compiled
        # pmap moves its arguments where they belong; a compiled executable wants them there.
        args = jax.device_put(args, compiled.input_shardings[0])
        return compiled(*args)


def evaluate(p_eval_step: Callable, state: TrainState, batches: Iterator) -> dict[str, float]:
    totals: dict[str, float] = {}
    for batch in batches:
        sums = jax.device_get(p_eval_step(state, batch))
        for k, v in sums.items():
            totals[k] = totals.get(k, 0.0) + float(v)
    count = max(totals.pop("count", 0.0), 1.0)
    return {k: v / count for k, v in totals.items()}


def prefetch_to_device(iterator: Iterator, size: int) -> Iterator:
    """Keeps ``size`` batches in flight to the local devices while the step runs."""
    devices = jax.local_devices()
    sharding = jax.sharding.NamedSharding(
        jax.sharding.Mesh(np.asarray(devices), (AXIS,)), jax.sharding.PartitionSpec(AXIS)
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


class NonFiniteLossError(FloatingPointError):
    """The loss or gradients became NaN or infinite; the message names the step."""


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


def write_run_files(workdir: str, config: ml_collections.ConfigDict, class_names: list[str]):
    """``config.json`` and ``class_names.txt``: what eval, predict and init_from read back."""
    with open(os.path.join(workdir, "config.json"), "w") as f:
        f.write(config.to_json_best_effort(indent=2))
    with open(os.path.join(workdir, "class_names.txt"), "w") as f:
        f.write("\n".join(class_names) + "\n")


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Trains (resuming from ``workdir`` if it holds checkpoints) and returns the last eval."""
    validate_config(config, workdir)
    dataset = input_pipeline.create_dataset(config)  # checks config.num_classes too
    steps_per_epoch = input_pipeline.steps_per_epoch(dataset.train_size, config)
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
    if is_main:
        write_run_files(workdir, config, dataset.class_names)

    model = create_model(config, dataset.num_classes)
    learning_rate_fn = optim.create_learning_rate_fn(config, steps_per_epoch)
    rng = jax.random.PRNGKey(config.seed)  # a raw uint32 key: checkpoints store it as is
    state = create_train_state(rng, config, model, dataset.image_shape)
    manager = checkpointing.create_manager(workdir, config)
    state, restored_step = checkpointing.restore_latest(manager, state)
    start_step = int(jax.device_get(state.step))
    if restored_step is not None:
        logging.info(
            "Resuming from the checkpoint at step %d in %s", restored_step, manager.directory
        )
    if restored_step is None and config.init_from:
        state = init_from(state, config)
    last_checkpoint = restored_step

    mean_image = None
    if config.input.normalization == "mean_image":
        mean_image = input_pipeline.load_or_compute_mean_image(config, dataset, workdir)
    p_train_step, p_eval_step = make_steps(config, learning_rate_fn, mean_image=mean_image)
    writer = MetricsWriter(workdir)
    stop = checkpointing.StopRequest()
    progress = _progress_bar(config, is_main, start_step, total_steps)
    batches = prefetch_to_device(dataset.train_batches(start_step), config.input.prefetch)
    window: list[dict[str, jax.Array]] = []
    window_start = time.perf_counter()
    last_eval: dict[str, Any] = {}
    step = start_step
    try:
        for step in range(start_step, total_steps):
            state, metrics = p_train_step(state, next(batches))
            window.append(metrics)
            done = step + 1
            epoch = done / steps_per_epoch
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
            is_eval = done % eval_every == 0 or done == total_steps
            if is_eval:
                _check_finite(state, last_checkpoint)
                eval_start = time.perf_counter()
                result = evaluate(p_eval_step, state, dataset.eval_batches())
                eval_seconds = time.perf_counter() - eval_start
                lr = float(learning_rate_fn(done) * state.plateau["scale"])
                last_eval = dict(
                    step=done,
                    epoch=epoch,
                    split="eval",
                    lr=lr,
                    img_per_s=dataset.eval_size / eval_seconds,
                    **result,
                )
                writer.write(last_eval)
                logging.info(
                    "eval at step %d (epoch %.2f): %s",
                    done,
                    epoch,
                    {k: round(v, 4) for k, v in result.items()},
                )
                if config.lr_schedule == "plateau":
                    state = state.replace(
                        plateau=_plateau_after_eval(state, result["top1"], config)
                    )
                checkpointing.save(manager, done, state, {"top1": result["top1"]})
                last_checkpoint = done
            elif done % config.checkpoint_every_steps == 0 or done % steps_per_epoch == 0:
                _check_finite(state, last_checkpoint)
                checkpointing.save(manager, done, state)
                last_checkpoint = done
            if stop.requested:
                _check_finite(state, last_checkpoint)
                checkpointing.save(manager, done, state)
                manager.wait_until_finished()
                logging.warning(
                    "Stopped by SIGTERM after step %d; checkpoint saved in %s",
                    done,
                    manager.directory,
                )
                return {"stopped_at_step": done, **last_eval}
    finally:
        manager.wait_until_finished()
        stop.close()
        writer.close()
        if progress is not None:
            progress.close()
    return last_eval


def init_from(state: TrainState, config: ml_collections.ConfigDict) -> TrainState:
    """Fine-tuning: every layer from ``config.init_from``'s checkpoint (another run's or a
    converted model's workdir); a new fc8 when the class count differs. Optimiser state
    starts afresh."""
    from alexnet_jax import evaluate

    source, step = evaluate.params_from_workdir(config.init_from, config.init_from_checkpoint)
    name = f"{config.init_from} (step {step})"
    params = evaluate.transfer_params(state.params, source, name)
    logging.info("Initialised from %s", name)
    return state.replace(params=params, opt_state=state.tx.init(params))


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
    from tqdm import tqdm

    return tqdm(total=total, initial=start, unit="step", dynamic_ncols=True)
