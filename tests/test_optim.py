"""The paper's update rule and the learning-rate schedules, to the number."""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from alexnet_jax import optim
from configs import default


def test_optimizer_equals_the_papers_update_rule():
    """v <- 0.9 v - 0.0005 lr w - lr grad; w <- w + v, including across learning-rate changes."""
    config = default.get_config()
    config.weight_decay_on_biases = True  # the rule as printed applies to every w
    tx = optim.create_optimizer(config)
    params = {"w": jnp.asarray([1.0, -2.0, 0.5])}
    opt_state = tx.init(params)
    w, v = np.asarray(params["w"], np.float64), np.zeros(3)
    rng = np.random.default_rng(0)
    for lr in [0.01, 0.01, 0.001, 0.001, 0.0001]:  # two reductions, as on a plateau
        grad = rng.normal(size=3)
        opt_state = optim.set_learning_rate(opt_state, lr)
        updates, opt_state = tx.update({"w": jnp.asarray(grad, jnp.float32)}, opt_state, params)
        params = optax.apply_updates(params, updates)
        v = 0.9 * v - 0.0005 * lr * w - lr * grad
        w = w + v
    np.testing.assert_allclose(np.asarray(params["w"]), w, rtol=1e-5)


def test_plain_optax_sgd_would_differ_after_a_learning_rate_change():
    """Guards the test above: chain(add_decayed_weights, sgd) is not the paper's rule."""
    params, grad = jnp.asarray([1.0]), jnp.asarray([1.0])
    paper = optax.inject_hyperparams(optim.paper_sgd)(learning_rate=0.1)
    plain = optax.inject_hyperparams(
        lambda learning_rate: optax.chain(
            optax.add_decayed_weights(5e-4), optax.sgd(learning_rate, momentum=0.9)
        )
    )(learning_rate=0.1)
    results = []
    for tx in (paper, plain):
        state, p = tx.init(params), params
        for lr in (0.1, 0.01):
            state = optim.set_learning_rate(state, lr)
            updates, state = tx.update(grad, state, p)
            p = optax.apply_updates(p, updates)
        results.append(float(p[0]))
    assert abs(results[0] - results[1]) > 1e-3


def test_weight_decay_skips_biases_by_default():
    config = default.get_config()
    config.momentum = 0.0
    tx = optim.create_optimizer(config)
    params = {"conv1": {"kernel": jnp.ones(2), "bias": jnp.ones(2)}}
    opt_state = optim.set_learning_rate(tx.init(params), 1.0)
    zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
    updates, _ = tx.update(zeros, opt_state, params)
    chex.assert_trees_all_close(updates["conv1"]["kernel"], -5e-4 * jnp.ones(2))
    chex.assert_trees_all_close(updates["conv1"]["bias"], jnp.zeros(2))


def test_piecewise_schedule_boundaries():
    config = default.get_config()
    config.lr_schedule, config.learning_rate = "piecewise", 0.01
    config.lr_boundaries_epochs, config.lr_decay_factor = [30.0, 60.0], 0.1
    fn = optim.create_learning_rate_fn(config, steps_per_epoch=10)
    assert [float(fn(s)) for s in (0, 299, 300, 599, 600)] == pytest.approx(
        [0.01, 0.01, 0.001, 0.001, 0.0001]
    )


def test_warmup_cosine_schedule_boundaries():
    config = default.get_config()
    config.lr_schedule, config.learning_rate = "warmup_cosine", 0.1
    config.warmup_epochs, config.num_epochs = 2.0, 10.0
    fn = optim.create_learning_rate_fn(config, steps_per_epoch=10)
    assert float(fn(0)) == 0.0
    assert float(fn(10)) == pytest.approx(0.05)
    assert float(fn(20)) == pytest.approx(0.1)
    assert float(fn(60)) == pytest.approx(0.05)  # half way through the cosine
    assert float(fn(100)) == pytest.approx(0.0, abs=1e-9)


def test_plateau_divides_by_ten_three_times_at_most():
    plateau = optim.initial_plateau_state()
    kwargs = dict(patience=2, factor=0.1, max_reductions=3)
    scales = []
    for top1 in [0.1, 0.2, 0.2, 0.19, 0.3, 0.3, 0.3, 0.3, 0.3, 0.3, 0.3, 0.3, 0.3]:
        plateau = optim.plateau_update(plateau, top1, **kwargs)
        scales.append(float(plateau["scale"]))
    # improvements at evals 1, 2, 5; two stale evals trigger each reduction; never more than 3
    expected = [1, 1, 1, 0.1, 0.1, 0.1, 0.01, 0.01, 0.001, 0.001, 0.001, 0.001, 0.001]
    assert scales == pytest.approx(expected)
    assert int(plateau["reductions"]) == 3
    assert float(plateau["best"]) == pytest.approx(0.3)
    assert math.isinf(float(optim.initial_plateau_state()["best"]))
