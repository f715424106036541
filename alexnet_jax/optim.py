"""The paper's SGD with momentum and weight decay, and the learning-rate schedules.

The paper's update (section 5) puts the weight decay and the learning rate *inside* the
momentum:

    v <- 0.9 v - 0.0005 lr w - lr grad
    w <- w + v

``paper_sgd`` is exactly this: ``add_decayed_weights -> scale_by_learning_rate -> trace``.
(``chain(add_decayed_weights, sgd(momentum))`` scales by the learning rate *after* the
momentum, which differs from the paper as soon as the learning rate changes.) The learning
rate is an injected hyperparameter set by the train step each step, so a schedule, or a
reduction on a validation plateau decided between steps, never recompiles anything.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax

SCHEDULES = ("constant", "piecewise", "plateau", "warmup_cosine")


def paper_sgd(
    learning_rate: float, momentum: float = 0.9, weight_decay: float = 5e-4, mask: Any = None
) -> optax.GradientTransformation:
    """SGD as the paper writes it; ``mask`` selects the parameters that decay (None: all)."""
    return optax.chain(
        optax.add_decayed_weights(weight_decay, mask),
        optax.scale_by_learning_rate(learning_rate),
        optax.trace(decay=momentum),
    )


def kernels_only(params: Any) -> Any:
    """Weight-decay mask: kernels decay, biases do not (cuda-convnet's and Caffe's practice)."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: getattr(path[-1], "key", None) != "bias", params
    )


def create_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """``paper_sgd`` with its learning rate injected, so the train step can set it."""
    mask = None if config.weight_decay_on_biases else kernels_only
    return optax.inject_hyperparams(paper_sgd, static_args=("mask",))(
        learning_rate=config.learning_rate,
        momentum=config.momentum,
        weight_decay=config.weight_decay,
        mask=mask,
    )


def set_learning_rate(opt_state: Any, learning_rate: jax.Array) -> Any:
    """Returns ``opt_state`` (from ``create_optimizer``) with a new learning rate."""
    hyperparams = dict(opt_state.hyperparams, learning_rate=jnp.asarray(learning_rate))
    return opt_state._replace(hyperparams=hyperparams)


def create_learning_rate_fn(
    config: ml_collections.ConfigDict, steps_per_epoch: int
) -> Callable[[jax.Array], jax.Array]:
    """The scheduled learning rate as a function of the step (before any plateau reductions).

    - ``constant`` (also the base of ``plateau``: reductions are applied by ``plateau_update``)
    - ``piecewise``: multiplied by ``lr_decay_factor`` at each of ``lr_boundaries_epochs``
    - ``warmup_cosine``: linear from 0 over ``warmup_epochs``, then cosine to 0 at the end
    """
    base = config.learning_rate
    if config.lr_schedule in ("constant", "plateau"):
        return optax.constant_schedule(base)
    if config.lr_schedule == "piecewise":
        return optax.piecewise_constant_schedule(
            base,
            {int(e * steps_per_epoch): config.lr_decay_factor for e in config.lr_boundaries_epochs},
        )
    if config.lr_schedule == "warmup_cosine":
        warmup = int(config.warmup_epochs * steps_per_epoch)
        total = max(int(config.num_epochs * steps_per_epoch), warmup + 1)
        return optax.warmup_cosine_decay_schedule(0.0, base, warmup, total, end_value=0.0)
    raise ValueError(f"config.lr_schedule={config.lr_schedule!r}; choose one of {SCHEDULES}")


def initial_plateau_state() -> dict[str, jax.Array]:
    """What reduce-on-plateau remembers: best eval top-1, evals since, reductions, lr scale."""
    return {
        "best": jnp.asarray(-math.inf, jnp.float32),
        "bad_evals": jnp.asarray(0, jnp.int32),
        "reductions": jnp.asarray(0, jnp.int32),
        "scale": jnp.asarray(1.0, jnp.float32),
    }


def plateau_update(
    plateau: dict[str, Any],
    top1: float,
    *,
    patience: int,
    factor: float,
    max_reductions: int,
    min_delta: float = 0.0,
) -> dict[str, jax.Array]:
    """One evaluation's effect: divide the learning rate when top-1 has not improved.

    The paper: "divide the learning rate by 10 when the validation error rate stopped
    improving", three times in all. After ``patience`` evaluations without an improvement of
    more than ``min_delta``, the scale is multiplied by ``factor``, at most ``max_reductions``
    times, and the count starts again.
    """
    best, bad = float(plateau["best"]), int(plateau["bad_evals"])
    reductions, scale = int(plateau["reductions"]), float(plateau["scale"])
    if top1 > best + min_delta:
        best, bad = top1, 0
    else:
        bad += 1
        if bad >= patience and reductions < max_reductions:
            scale, reductions, bad = scale * factor, reductions + 1, 0
    return {
        "best": jnp.asarray(best, jnp.float32),
        "bad_evals": jnp.asarray(bad, jnp.int32),
        "reductions": jnp.asarray(reductions, jnp.int32),
        "scale": jnp.asarray(scale, jnp.float32),
    }
