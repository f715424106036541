"""The pure steps against independent references: top-k counting, 10-crop averaging, the
CPU steps' compile options, and the plateau schedule as a real run applies it (and remembers
it across a resume)."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from alexnet_jax import layers, normalization, steps, train
from alexnet_jax.metrics import read_metrics
from tests.test_train import small_config


@pytest.mark.parametrize("classes", [3, 10])
def test_top1_top5_and_loss_equal_numpys(classes):
    rng = np.random.default_rng(classes)
    logits = rng.normal(size=(64, classes)).astype(np.float32)
    labels = rng.integers(0, classes, 64)
    got = jax.device_get(steps.classification_metrics(jnp.asarray(logits), jnp.asarray(labels)))
    order = np.argsort(-logits, axis=1)
    k = min(5, classes)  # top-5 of 3 classes is every class: always a hit
    np.testing.assert_array_equal(got["top1"], order[:, 0] == labels)
    np.testing.assert_array_equal(got["top5"], (order[:, :k] == labels[:, None]).any(1))
    shifted = logits - logits.max(1, keepdims=True)
    log_softmax = shifted - np.log(np.exp(shifted).sum(1, keepdims=True))
    np.testing.assert_allclose(got["loss"], -log_softmax[np.arange(64), labels], rtol=1e-5)
    assert 0 < got["top1"].mean() < got["top5"].mean() <= 1


def test_ten_crop_evaluation_averages_the_crops_softmaxes():
    """eval_logits of (N, 10, H, W, C) images: the log of the mean of the 10 crops' softmaxes,
    so its softmax (and its top-k) is that mean's."""
    weights = jnp.asarray(np.random.default_rng(1).normal(size=(12, 6)), jnp.float32)
    state = steps.TrainState(
        step=jnp.asarray(0), params={"w": weights}, opt_state=None, rng=None, plateau={},
        nonfinite_step=jnp.asarray(-1),
        apply_fn=lambda v, x: x.reshape(x.shape[0], -1) @ v["params"]["w"], tx=None,
    )  # fmt: skip
    images = np.random.default_rng(2).normal(size=(3, 10, 2, 2, 3)).astype(np.float32)
    averaged = np.asarray(jax.nn.softmax(steps.eval_logits(state, jnp.asarray(images))))
    crop_logits = images.reshape(30, 12) @ np.asarray(weights)
    exp = np.exp(crop_logits - crop_logits.max(1, keepdims=True))
    expected = (exp / exp.sum(1, keepdims=True)).reshape(3, 10, 6).mean(axis=1)
    np.testing.assert_allclose(averaged, expected, rtol=1e-5, atol=1e-7)
    single = np.asarray(steps.eval_logits(state, jnp.asarray(images[:, 0])))
    np.testing.assert_allclose(single, crop_logits.reshape(3, 10, 6)[:, 0], rtol=1e-5)


def test_cpu_steps_hand_many_rowed_dense_products_to_ynnpack_and_few_rowed_ones_to_eigen():
    """Every CPU step compiles with YNNPACK for dots only (``steps.CPU_COMPILER_OPTIONS``),
    forward-only ones too: a forward pass over more than ``layers.FEW_ROWS`` images (10-crop
    evaluation, large prediction batches) hands its dense products to YNNPACK, faster there;
    fewer rows take ``layers.Dense``'s few-row form, which YNNPACK does not take. Either way
    the probabilities equal those compiled without YNNPACK. (XLA's products,
    ``config.cpu_matmuls="xla"``: on the CPU oneDNN's are the default, test_onednn.py.)"""
    config = small_config(cpu_matmuls="xla", **{"model.width_divisor": 4})
    assert steps.compiler_options(config, jax.devices("cpu")) == steps.CPU_COMPILER_OPTIONS
    xla_defaults = small_config(xla_cpu_ynn_fusions=True)
    assert steps.compiler_options(xla_defaults, jax.devices("cpu")) == {}

    model = steps.create_model(config, config.num_classes)
    state = steps.create_train_state(jax.random.PRNGKey(0), config, model, (67, 67, 1))
    normalize = normalization.make_normalizer(config.input)
    p_eval = steps.make_eval_step(config, normalize, devices=jax.devices("cpu")[:1])
    assert p_eval.compiler_options == steps.CPU_COMPILER_OPTIONS  # as the train step's
    predict = jax.jit(functools.partial(steps.predict_probabilities, normalize=normalize))
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (layers.FEW_ROWS + 4, 67, 67, 1), dtype=np.uint8)
    for rows, on_ynnpack in ((layers.FEW_ROWS, False), (layers.FEW_ROWS + 4, True)):
        lowered = predict.lower(state, images[:rows])
        compiled = lowered.compile(compiler_options=steps.CPU_COMPILER_OPTIONS)
        assert ('"__ynn_fusion"' in compiled.as_text()) == on_ynnpack, rows
        without = lowered.compile(compiler_options={"xla_cpu_experimental_ynn_fusion_type": ""})
        assert '"__ynn_fusion"' not in without.as_text()
        chex.assert_trees_all_close(
            compiled(state, images[:rows]), without(state, images[:rows]), rtol=1e-5, atol=1e-7
        )


@pytest.mark.parametrize(
    "model_overrides,size",
    [({"model.groups": 2}, 67), ({"model.name": "vgg11"}, 32)],  # LRN, towers; flax's layers
)  # fmt: skip
def test_half_precision_evaluation_casts_the_parameters_once_with_the_same_outputs(
    model_overrides, size
):
    """``steps.inference_state``: under ``half_precision`` the parameters come cast to
    bfloat16 (the optimizer state and the rest untouched), and the evaluation step gives the
    same outputs, bit for bit, as from the float32 parameters it would cast per batch. (XLA's
    dense products, ``config.cpu_matmuls="xla"``: the kernels packed for oneDNN, the CPU's
    default, are test_onednn.py's.)"""
    config = small_config(
        half_precision=True, image_size=size, cpu_matmuls="xla", **model_overrides
    )
    model = steps.create_model(config, config.num_classes)
    state = steps.create_train_state(jax.random.PRNGKey(0), config, model, (size, size, 1))
    cast = steps.inference_state(state, config)
    for leaf in jax.tree_util.tree_leaves(cast.params):
        assert leaf.dtype == jnp.bfloat16
    chex.assert_trees_all_equal_shapes(cast.params, state.params)
    assert cast.opt_state is state.opt_state and cast.step is state.step
    for leaf in jax.tree_util.tree_leaves(state.params):
        assert leaf.dtype == jnp.float32  # the train state's own are left as they were
    normalize = normalization.make_normalizer(config.input)
    p_eval = steps.make_eval_step(config, normalize, devices=jax.devices("cpu")[:1])
    rng = np.random.default_rng(0)
    batch = {
        "image": rng.integers(0, 256, (1, 8, size, size, 1), dtype=np.uint8),
        "label": rng.integers(0, config.num_classes, (1, 8)).astype(np.int32),
        "mask": np.ones((1, 8), np.float32),
    }
    chex.assert_trees_all_equal(
        jax.device_get(p_eval(cast, batch)), jax.device_get(p_eval(state, batch))
    )
    fp32 = small_config(image_size=size, cpu_matmuls="xla", **model_overrides)
    assert steps.inference_state(state, fp32) is state


@pytest.mark.slow
def test_plateau_schedule_in_a_real_run_reduces_the_rate_and_resumes_reduced(tmp_path):
    """A learning rate too small to change anything: top-1 stays put, so the second evaluation
    divides the rate by 10 (patience 1); a resumed run keeps the reduced rate."""
    fields = dict(learning_rate=1e-9, lr_schedule="plateau", plateau_patience=1)
    fields.update(eval_every_epochs=2 / 89, log_every_steps=1, checkpoint_every_steps=2)
    train.train_and_evaluate(small_config(num_train_steps=4, **fields), str(tmp_path))
    train.train_and_evaluate(small_config(num_train_steps=6, **fields), str(tmp_path))
    records = read_metrics(str(tmp_path))
    train_lr = {r["step"]: r["lr"] for r in records if r["split"] == "train"}
    eval_lr = {r["step"]: r["lr"] for r in records if r["split"] == "eval"}
    assert eval_lr == pytest.approx({2: 1e-9, 4: 1e-9, 6: 1e-10})
    assert train_lr == pytest.approx({1: 1e-9, 2: 1e-9, 3: 1e-9, 4: 1e-9, 5: 1e-10, 6: 1e-10})
    top1 = [r["top1"] for r in records if r["split"] == "eval"]
    assert top1[0] == top1[1] == top1[2]  # the plateau the schedule saw


def test_all_finite_finds_any_nan_or_infinity_in_any_leaf():
    rng = np.random.default_rng(0)
    tree = {
        "kernel": jnp.asarray(rng.standard_normal((3, 3, 4, 8)), jnp.float32),
        "bias": jnp.asarray(rng.standard_normal((8,)), jnp.float32),
        "scale": jnp.asarray(2.5, jnp.float32),
        "narrow": jnp.asarray(rng.standard_normal((5, 7)), jnp.bfloat16),
        "count": jnp.asarray([1, 2, 3], jnp.int32),
        "empty": jnp.zeros((0, 4), jnp.float32),
    }
    check = jax.jit(steps.all_finite)
    assert bool(check(tree))
    for name, index in [("kernel", (2, 1, 3, 7)), ("bias", (0,)), ("scale", ()),
                        ("narrow", (4, 0))]:  # fmt: skip
        for bad in (np.nan, np.inf, -np.inf):
            broken = dict(tree, **{name: tree[name].at[index].set(bad)})
            assert not bool(check(broken)), (name, bad)
    # +inf and -inf in one column, and in two leaves: still caught.
    both = dict(tree, kernel=tree["kernel"].at[0, 0, 0, 0].set(np.inf).at[1, 0, 0, 0].set(-np.inf))
    assert not bool(check(both))
    apart = dict(tree, bias=tree["bias"].at[0].set(np.inf), scale=jnp.asarray(-np.inf))
    assert not bool(check(apart))
    # Large but finite entries whose sum stays in range are finite.
    assert bool(check({"big": jnp.full((4, 4), 1e36, jnp.float32)}))
