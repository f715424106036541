"""Checkpoint retention, round trips and bfloat16 training state."""

import contextlib
import logging
import re

import chex
import jax
import jax.numpy as jnp
import numpy as np

from alexnet_jax import checkpointing, normalization, optim, steps
from configs import default


def test_keeps_the_latest_and_the_best_by_top1_across_a_resume(tmp_path, caplog):
    """The best checkpoint (step 2) outlives a resume: a new manager, as a resumed run opens,
    reads each checkpoint's top-1 back from disk (Orbax writes metrics only with best_fn)."""
    config = default.get_config()
    config.max_to_keep, config.keep_best, config.async_checkpointing = 2, 1, False
    manager = checkpointing.create_manager(str(tmp_path), config)
    state = {"w": jnp.arange(3.0)}
    saves = [(1, 0.5), (2, 0.9), (3, 0.6), (4, 0.7), (5, None), (6, 0.65)]
    for step, top1 in saves:
        if step == 4:  # the run stops here and resumes
            manager.close()
            manager = checkpointing.create_manager(str(tmp_path), config)
            assert manager.metrics(2) == {"top1": 0.9}
        metrics = None if top1 is None else {"top1": top1}
        with caplog.at_level(logging.WARNING):
            checkpointing.save(manager, step, {"w": state["w"] + step}, metrics)
    manager.wait_until_finished()
    assert manager.all_steps() == [2, 5, 6]  # best (0.9) and the latest two
    assert "tracked_metric" not in caplog.text  # saves between evaluations carry no metrics
    restored = checkpointing.restore(manager, state, 2)
    chex.assert_trees_all_equal(restored, {"w": jnp.arange(3.0) + 2})
    manager.close()


def test_train_state_round_trip_is_exact(tmp_path):
    """A state that has stepped (momentum, step, plateau memory, RNG all moved off their
    initial values) comes back bit for bit into a fresh template."""
    config = default.get_config()
    config.async_checkpointing = False
    config.model.width_divisor = 4  # any network will do: a narrow one is quicker
    model = steps.create_model(config, 10)
    state = steps.create_train_state(jax.random.PRNGKey(3), config, model, (67, 67, 1))
    normalize = normalization.make_normalizer(config.input)
    p_train = steps.make_train_step(config, optim.create_learning_rate_fn(config, 10), normalize)
    rng = np.random.default_rng(0)
    devices = jax.local_device_count()
    for _ in range(2):
        batch = {
            "image": rng.normal(size=(devices, 2, 67, 67, 1)).astype(np.float32),
            "label": rng.integers(0, 10, (devices, 2)).astype(np.int32),
        }
        state, _ = p_train(state, batch)
    state = state.replace(
        plateau=optim.plateau_update(state.plateau, 0.4, patience=1, factor=0.1, max_reductions=3),
        nonfinite_step=jnp.asarray(7, jnp.int32),
    )
    manager = checkpointing.create_manager(str(tmp_path), config)
    checkpointing.save(manager, 7, state)
    manager.wait_until_finished()
    template = steps.create_train_state(jax.random.PRNGKey(0), config, model, (67, 67, 1))
    fields = ("step", "params", "opt_state", "rng", "plateau", "nonfinite_step")
    saved = jax.device_get([getattr(state, f) for f in fields])
    fresh = jax.device_get([getattr(template, f) for f in fields])
    for field, a, b in zip(fields, saved, fresh, strict=True):  # the template differs in each
        leaves = zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True)
        assert any(not np.array_equal(x, y) for x, y in leaves), field
    restored, step = checkpointing.restore_latest(manager, template)
    assert step == 7 and int(restored.step) == 2
    chex.assert_trees_all_equal(jax.device_get([getattr(restored, f) for f in fields]), saved)
    assert float(restored.plateau["best"]) == np.float32(0.4)

    # What resumed runs and evaluation restore into: the same fields' shapes, dtypes and
    # placement, with nothing computed; the restored state is the same and trains the same.
    abstract = steps.abstract_train_state(config, model, (67, 67, 1))
    shapes = [getattr(abstract, f) for f in fields]
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree_util.tree_leaves(shapes))
    chex.assert_trees_all_equal_shapes_and_dtypes(shapes, [getattr(template, f) for f in fields])
    for x in jax.tree_util.tree_leaves(shapes):
        assert x.sharding == jax.sharding.SingleDeviceSharding(jax.local_devices()[0]), x
    from_abstract, step = checkpointing.restore_latest(manager, abstract)
    assert step == 7
    chex.assert_trees_all_equal(jax.device_get([getattr(from_abstract, f) for f in fields]), saved)
    chex.assert_trees_all_equal(
        jax.tree_util.tree_map(lambda x: x.sharding, from_abstract.params),
        jax.tree_util.tree_map(lambda x: x.sharding, restored.params),
    )
    (a, a_metrics), (b, b_metrics) = p_train(from_abstract, batch), p_train(restored, batch)
    chex.assert_trees_all_equal(
        jax.device_get([a_metrics, *(getattr(a, f) for f in fields)]),
        jax.device_get([b_metrics, *(getattr(b, f) for f in fields)]),
    )
    manager.close()


def test_half_precision_trains_in_bfloat16_with_float32_state():
    config = default.get_config()
    config.half_precision = True
    model = steps.create_model(config, 10)
    assert model.dtype == jnp.bfloat16
    state = steps.create_train_state(jax.random.PRNGKey(0), config, model, (67, 67, 1))
    p_train = steps.make_train_step(
        config,
        optim.create_learning_rate_fn(config, 10),
        normalization.make_normalizer(config.input),
    )
    devices = jax.local_device_count()
    rng = np.random.default_rng(0)
    batch = {
        "image": rng.normal(size=(devices, 2, 67, 67, 1)).astype(np.float32),
        "label": rng.integers(0, 10, (devices, 2)).astype(np.int32),
    }
    state, metrics = p_train(state, batch)
    leaves = jax.tree_util.tree_leaves((state.params, state.opt_state))
    assert all(leaf.dtype in (jnp.float32, jnp.int32) for leaf in leaves)
    assert np.isfinite(float(metrics["loss"]))
    assert int(state.step) == 1


@contextlib.contextmanager
def compiled_programs():
    """The names of the programs JAX compiles (or loads from a cache) inside the block."""
    names = []

    class Names(logging.Handler):
        def emit(self, record):
            found = re.match(r"Compiling (\S+)", record.getMessage())
            if found:
                names.append(found.group(1))

    handler = Names()
    logger = logging.getLogger("jax._src.interpreters.pxla")
    logger.addHandler(handler)
    try:
        with jax.log_compiles(True):
            yield names
    finally:
        logger.removeHandler(handler)


def test_a_new_state_is_one_program_and_saving_it_compiles_none(tmp_path):
    """A new state is built by one compiled program (run op by op, the key split and the
    optimizer's zeros compiled ~20 small programs, 50 ms each on a CPU), and saving a state
    replicated over the devices compiles nothing (given the replicated arrays, Orbax split
    their writing between the devices: a slicing program for each device and leaf shape, 40
    for this network on 4 devices, at a run's first checkpoint)."""
    config = default.get_config()
    config.async_checkpointing = False
    config.model.width_divisor = 4
    model = steps.create_model(config, 10)
    key = jax.random.PRNGKey(5)
    with compiled_programs() as names:
        state = steps.create_train_state(key, config, model, (67, 67, 1))
    assert names == ["jit(build)"]

    mesh = jax.sharding.Mesh(np.asarray(jax.local_devices()), ("devices",))
    replicated = jax.device_put(
        state, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    )
    assert len(replicated.params["fc7"]["kernel"].sharding.device_set) == 4
    manager = checkpointing.create_manager(str(tmp_path), config)
    with compiled_programs() as names:
        checkpointing.save(manager, 1, replicated)
        manager.wait_until_finished()
    assert names == []
    template = steps.abstract_train_state(config, model, (67, 67, 1))
    restored, step = checkpointing.restore_latest(manager, template)
    assert step == 1
    chex.assert_trees_all_equal(jax.device_get(restored.params), jax.device_get(state.params))
    chex.assert_trees_all_equal(jax.device_get(restored.opt_state), jax.device_get(state.opt_state))
    manager.close()
