"""The pure steps: the training state, one SGD step, one evaluation step; pmap-ed over devices.

The state is passed to ``jax.pmap`` unreplicated (``in_axes=None``) and comes back
replicated (``out_axes=None``), the pattern of Flax's ImageNet example since pmap became
``jit(shard_map)``: there is no replicate/unreplicate gather, and it works across hosts.
Gradients and metrics are averaged with ``lax.pmean`` over the ``"batch"`` axis; each
device draws its own dropout mask from ``fold_in(fold_in(seed_key, step), device)``.

The steps receive what they need as functions built before tracing (the learning-rate
schedule, the pixel normalization), never the config.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
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

from alexnet_jax import optim
from alexnet_jax.layers import column_sums, pack_dense_kernels
from alexnet_jax.model import create_model as create_network
from alexnet_jax.normalization import Normalizer

AXIS = "batch"

# XLA:CPU (jax 0.10) hands convolutions, dots and elementwise work to YNNPACK fusions by
# default. Its convolutions are much slower than XLA's own Eigen ones for AlexNet's shapes; its
# dots are faster in the backward pass of the fully connected layers, in their float32 forward
# pass from about a hundred rows on (evaluation with 10 crops, prediction in large batches)
# and for bfloat16 x bfloat16 -> float32 products (the CPU's bfloat16 units). For fewer rows
# `layers.Dense` writes its float32 forward product in a form YNNPACK does not take, so Eigen
# computes it. So on CPU, unless config.xla_cpu_ynn_fusions is True (XLA's defaults), every
# step keeps YNNPACK for individual dots only. Measurements: benchmarks/README.md.
CPU_COMPILER_OPTIONS = {
    "xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"
}


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
    """The network of ``config.model``, computing in bfloat16 if ``config.half_precision``,
    convolving and multiplying on the CPU as ``config.cpu_convolutions`` and
    ``config.cpu_matmuls`` say."""
    dtype = jnp.bfloat16 if config.half_precision else jnp.float32
    return create_network(
        config.model, num_classes, dtype, config.cpu_convolutions, config.cpu_matmuls
    )


def create_train_state(
    rng: jax.Array,
    config: ml_collections.ConfigDict,
    model: nn.Module,
    image_shape: tuple,
    params: Any = None,
) -> TrainState:
    """A new state at step 0: ``model``'s parameters initialized from ``rng`` for images of
    ``image_shape`` (or ``params`` as given: converted weights), a fresh optimizer state.

    Built by one compiled program: run op by op, the key split and the optimizer's zeros
    would compile a small program for each distinct leaf shape (about 20, 50 ms each on a
    CPU), and only programs that take a second or more to compile are kept by the
    persistent compilation cache."""
    tx = optim.create_optimizer(config)

    def build(rng, params):
        init_rng, state_rng = jax.random.split(rng)
        if params is None:
            params = model.init(init_rng, jnp.zeros((1,) + tuple(image_shape)))["params"]
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

    return jax.jit(build)(rng, params)


def abstract_train_state(
    config: ml_collections.ConfigDict, model: nn.Module, image_shape: tuple
) -> TrainState:
    """``create_train_state``'s structure, shapes, dtypes and placement (the first local
    device), computed without initializing anything: what a checkpoint is restored into.

    Initializing compiles and runs the initializers (about 5 s on a CPU for the paper
    network, mostly compiling its random number generation) only to have every value
    replaced by the checkpoint's."""
    abstract = jax.eval_shape(
        lambda rng: create_train_state(rng, config, model, image_shape), jax.random.PRNGKey(0)
    )
    sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    return jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), abstract
    )


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


def mean_over_devices(tree: Any) -> Any:
    """``lax.pmean`` over the batch axis; on a single device, ``tree`` itself (XLA:CPU copies
    every gradient through a one-device all-reduce)."""
    return tree if lax.axis_size(AXIS) == 1 else lax.pmean(tree, AXIS)


def all_finite(tree: Any) -> jax.Array:
    """Whether every entry of the tree's floating-point arrays is finite, in one read of each.

    Each array's column sums (``layers.column_sums``, a product with ones, at memory speed;
    ``jnp.isfinite`` and a reduction over the result took twice as long in the train
    step), summed over columns and arrays: a NaN or an infinity anywhere makes the total
    non-finite. So would finite entries so large that the float32 total overflows (beyond
    3e38), which a train step rightly treats the same way.
    """
    total, others = jnp.zeros((), jnp.float32), jnp.asarray(True)
    for leaf in jax.tree_util.tree_leaves(tree):
        if not jnp.issubdtype(leaf.dtype, jnp.floating) or leaf.size == 0:
            others = others & jnp.all(jnp.isfinite(leaf))  # integers, complex, empty
            continue
        total = total + jnp.sum(column_sums(jnp.atleast_1d(leaf)))
    return jnp.isfinite(total) & others


def train_step(
    state: TrainState,
    batch: dict[str, jax.Array],
    *,
    learning_rate_fn: Callable[[jax.Array], jax.Array],
    normalize: Normalizer,
    augment: Callable | None = None,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One SGD step on this device's part of the batch; run inside ``jax.pmap``.

    ``augment`` (``Dataset.device_augment``), if given, crops, flips and lights the batch's
    uint8 images first, each example by its position in the global batch.
    """
    step = state.step
    dropout_rng = dropout_key(state.rng, step)
    images = batch["image"]
    if augment is not None:
        images = augment(images, step, lax.axis_index(AXIS) * images.shape[0])
    images = normalize(images)

    def loss_fn(params):
        logits = state.apply_fn(
            {"params": params}, images, train=True, rngs={"dropout": dropout_rng}
        )
        per_example = classification_metrics(logits, batch["label"])
        return per_example["loss"].mean(), per_example

    (loss, per_example), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    grads = mean_over_devices(grads)
    learning_rate = learning_rate_fn(step) * state.plateau["scale"]
    metrics = mean_over_devices({k: v.mean() for k, v in per_example.items()})
    # A non-finite loss or gradient leaves the state as it was and records the step; the
    # host stops the run at its next check, so no checkpoint ever holds NaNs. lax.cond runs
    # the update only when it is finite (cheaper than selecting every parameter).
    finite = jnp.isfinite(metrics["loss"]) & all_finite(grads)

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
    state: TrainState, batch: dict[str, jax.Array], *, normalize: Normalizer
) -> dict[str, jax.Array]:
    """Per-example top-5 classes (best first) and loss, with the batch's labels and mask, for
    ``alexnet_jax.evaluate.Tally`` to count. 10-crop images average their crops' softmaxes.
    With multi-labels (``batch["real"]``, multi-hot), also whether the top-1 class is one of
    them and whether the image has any."""
    logits = eval_logits(state, normalize(batch["image"]))
    out = {
        "top5": lax.top_k(logits, min(5, logits.shape[-1]))[1],
        "loss": optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]),
        "label": batch["label"],
        "mask": batch["mask"],
    }
    if "real" in batch:  # ReaL: the top-1 class is right if it is any of the image's labels
        top1 = out["top5"][:, :1]
        out["real_hit"] = jnp.take_along_axis(batch["real"], top1, axis=1)[:, 0]
        out["real_valid"] = batch["real"].max(axis=-1)
    return out


def inference_state(state: TrainState, config: ml_collections.ConfigDict) -> TrainState:
    """``state`` for evaluation steps: its floating-point parameters cast once to bfloat16
    under ``config.half_precision``, and on the CPU AlexNet's dense kernels packed once for
    oneDNN (``layers.pack_dense_kernels``, where ``config.cpu_matmuls`` allows it).

    The train step keeps float32 parameters for the update, so each layer casts its own to
    bfloat16 at every call: an evaluation pass then converts every weight (fc6's 38 M among
    them) at every batch. Every layer of the networks here casts all of its parameters to
    the computation dtype, so parameters cast once give the same outputs bit for bit, and the
    products read half the bytes. oneDNN's products likewise rearrange a kernel at every call
    into the layout they read fastest; packed once, they read it as it is: PyTorch's frozen
    inference prepacks its weights likewise. The packed state has no gradient. Make it once
    per evaluation pass, not per batch."""
    params = state.params
    if config.half_precision:

        def narrow(leaf):
            if jnp.issubdtype(leaf.dtype, jnp.floating):
                return leaf.astype(jnp.bfloat16)
            return leaf

        params = jax.tree_util.tree_map(narrow, params)
    if config.model.name == "alexnet":
        params = pack_dense_kernels(params, config.cpu_matmuls)
    return state if params is state.params else state.replace(params=params)


def predict_probabilities(state: TrainState, images: jax.Array, *, normalize: Normalizer):
    """Class probabilities of images (10-crop images: their crops' averaged softmax)."""
    return jax.nn.softmax(eval_logits(state, normalize(images)))


def make_train_step(
    config: ml_collections.ConfigDict,
    learning_rate_fn: Callable,
    normalize: Normalizer,
    augment: Callable | None = None,
    devices: list | None = None,
) -> Callable:
    """The pmap-ed train step: state unreplicated in, replicated out, donated.

    ``devices`` defaults to every local device; ``normalize`` comes from
    ``alexnet_jax.normalization.make_normalizer``, ``augment`` from the data set
    (``Dataset.device_augment``). The state is donated in single-process
    runs only: on jax 0.10, donating an ``in_axes=None`` argument to a multi-process pmap
    deletes it before use ("Array has been deleted"), so several processes keep the extra copy.
    """
    donate = (0,) if jax.process_count() == 1 else ()
    p_train_step = jax.pmap(
        functools.partial(
            train_step, learning_rate_fn=learning_rate_fn, normalize=normalize, augment=augment
        ),
        axis_name=AXIS,
        in_axes=(None, 0),
        out_axes=(None, None),
        donate_argnums=donate,
        devices=devices,
    )
    return with_compiler_options(p_train_step, config, devices)


def make_eval_step(
    config: ml_collections.ConfigDict, normalize: Normalizer, devices: list | None = None
) -> Callable:
    """The pmap-ed eval step: state unreplicated in, per-example outputs sharded out."""
    p_eval_step = jax.pmap(
        functools.partial(eval_step, normalize=normalize),
        axis_name=AXIS,
        in_axes=(None, 0),
        devices=devices,
    )
    return with_compiler_options(p_eval_step, config, devices)


def with_compiler_options(pmapped: Callable, config: ml_collections.ConfigDict, devices=None):
    """``pmapped`` compiled with ``compiler_options`` where there are any; as it is otherwise.

    Single-process only, where arguments can be moved to the executable's shardings (several
    processes keep pmap's own placement)."""
    single = jax.process_count() == 1
    options = compiler_options(config, devices) if single else {}
    return CompiledWithOptions(pmapped, options) if options else pmapped


def compiler_options(config: ml_collections.ConfigDict, devices: list | None = None) -> dict:
    """XLA options for a step on ``devices`` (default: the local ones): on CPU, unless
    ``config.xla_cpu_ynn_fusions``, YNNPACK for dots only (``CPU_COMPILER_OPTIONS``); none
    elsewhere."""
    platform = (devices or jax.local_devices())[0].platform
    if platform != "cpu" or config.get("xla_cpu_ynn_fusions", False):
        return {}
    return dict(CPU_COMPILER_OPTIONS)


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
