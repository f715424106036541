"""The AlexNet family as a specification: shapes, parameter counts, init, dropout, dtypes."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from alexnet_jax.model import (
    LAYER_NAMES,
    AlexNet,
    AlexNetD2L,
    count_params,
    features,
    min_input_size,
    spatial_sizes,
)


@functools.cache
def init_variables(variant="paper", groups=1, size=227, channels=3, num_classes=1000):
    model = AlexNet(num_classes=num_classes, variant=variant, groups=groups)
    return model.init(jax.random.key(0), jnp.zeros((1, size, size, channels)))


def abstract_params(model, size, channels):
    return jax.eval_shape(
        lambda: model.init(jax.random.key(0), jnp.zeros((1, size, size, channels)))
    )["params"]


@pytest.mark.parametrize(
    "variant,groups,size,channels,num_classes,expected",
    [
        ("paper", 1, 227, 3, 1000, 62_378_344),  # the paper's network as one tower
        ("paper", 2, 227, 3, 1000, 60_965_224),  # the two-GPU towers on conv2/4/5
        ("torchvision", 1, 224, 3, 1000, 61_100_840),
        ("d2l", 1, 224, 1, 10, 46_764_746),
    ],
)
def test_exact_parameter_counts(variant, groups, size, channels, num_classes, expected):
    model = AlexNet(num_classes=num_classes, variant=variant, groups=groups)
    assert count_params(abstract_params(model, size, channels)) == expected


def torch_reference(variant):
    """The same layouts written in PyTorch, an independent count of their parameters."""
    torch = pytest.importorskip("torch")
    nn = torch.nn
    if variant == "d2l":
        return nn.Sequential(
            nn.Conv2d(1, 96, 11, 4, 1), nn.ReLU(), nn.MaxPool2d(3, 2),
            nn.Conv2d(96, 256, 5, padding=2), nn.ReLU(), nn.MaxPool2d(3, 2),
            nn.Conv2d(256, 384, 3, padding=1), nn.ReLU(),
            nn.Conv2d(384, 384, 3, padding=1), nn.ReLU(),
            nn.Conv2d(384, 256, 3, padding=1), nn.ReLU(), nn.MaxPool2d(3, 2), nn.Flatten(),
            nn.Linear(6400, 4096), nn.ReLU(), nn.Dropout(0.5),
            nn.Linear(4096, 4096), nn.ReLU(), nn.Dropout(0.5), nn.Linear(4096, 10),
        )  # fmt: skip
    return nn.Sequential(  # the paper's, two towers
        nn.Conv2d(3, 96, 11, 4), nn.ReLU(), nn.LocalResponseNorm(5), nn.MaxPool2d(3, 2),
        nn.Conv2d(96, 256, 5, padding=2, groups=2), nn.ReLU(), nn.MaxPool2d(3, 2),
        nn.Conv2d(256, 384, 3, padding=1), nn.ReLU(),
        nn.Conv2d(384, 384, 3, padding=1, groups=2), nn.ReLU(),
        nn.Conv2d(384, 256, 3, padding=1, groups=2), nn.ReLU(), nn.MaxPool2d(3, 2), nn.Flatten(),
        nn.Linear(9216, 4096), nn.ReLU(), nn.Linear(4096, 4096), nn.ReLU(), nn.Linear(4096, 1000),
    )  # fmt: skip


@pytest.mark.parametrize("variant", ["d2l", "paper"])
def test_parameter_counts_match_pytorch_reference(variant):
    reference = torch_reference(variant)
    expected = sum(p.numel() for p in reference.parameters())
    if variant == "d2l":
        ours = abstract_params(AlexNetD2L(), 224, 1)
    else:
        ours = abstract_params(AlexNet(groups=2), 227, 3)
    assert count_params(ours) == expected
    # Layer by layer, too: the same shapes in the same order (PyTorch kernels are OIHW).
    torch_shapes = [tuple(p.shape) for p in reference.parameters()]
    flax_layers = [ours[name] for name in LAYER_NAMES]
    assert [int(np.prod(layer["kernel"].shape)) for layer in flax_layers] == [
        int(np.prod(shape)) for shape in torch_shapes[0::2]
    ]


def test_paper_layer_output_sizes_at_227():
    """conv1 55x55x96 -> pool 27 -> conv2 27 -> pool 13 -> conv3-5 13 -> pool 6x6x256."""
    model = AlexNet()
    variables = init_variables()
    x = jnp.zeros((2, 227, 227, 3))
    _, state = model.apply(variables, x, capture_intermediates=True, mutable=["intermediates"])
    inter = state["intermediates"]
    chex.assert_shape(inter["conv1"]["__call__"][0], (2, 55, 55, 96))  # before its pool
    chex.assert_shape(inter["conv2"]["__call__"][0], (2, 27, 27, 256))
    for name, shape in {
        "conv1": (2, 27, 27, 96),  # sown after ReLU, LRN and pooling
        "conv2": (2, 13, 13, 256),
        "conv3": (2, 13, 13, 384),
        "conv4": (2, 13, 13, 384),
        "conv5": (2, 6, 6, 256),
        "fc6": (2, 4096),
        "fc7": (2, 4096),
        "fc8": (2, 1000),
    }.items():
        chex.assert_shape(inter[f"{name}_out"][0], shape)
    assert spatial_sizes("paper", 227) == dict(conv1=27, conv2=13, conv3=13, conv4=13, conv5=6)
    # cuda-convnet rounds up; with floor rounding the paper's stated 224 gives 54, not 55.
    assert (224 - 11) // 4 + 1 == 54 and (227 - 11) // 4 + 1 == 55


def test_larger_inputs_work_without_a_hard_coded_flatten():
    model = AlexNet(num_classes=7)
    variables = model.init(jax.random.key(0), jnp.zeros((1, 259, 300, 3)))
    chex.assert_shape(model.apply(variables, jnp.zeros((2, 259, 300, 3))), (2, 7))
    # fc6 sees 7x8x256 features at 259x300
    chex.assert_shape(variables["params"]["fc6"]["kernel"], (7 * 8 * 256, 4096))


@pytest.mark.parametrize("variant,smallest", [("paper", 67), ("torchvision", 63), ("d2l", 65)])
def test_too_small_input_names_the_smallest_size(variant, smallest):
    assert min_input_size(variant) == smallest
    model = AlexNet(variant=variant, num_classes=3)
    chex.assert_shape(
        jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, smallest, smallest, 3)))[
            "params"
        ]["fc8"]["kernel"],
        (4096, 3),
    )
    with pytest.raises(ValueError, match=f"smallest input is {smallest}x{smallest}"):
        model.init(jax.random.key(0), jnp.zeros((1, smallest - 1, smallest - 1, 3)))


def test_bad_arguments_get_clear_errors():
    with pytest.raises(ValueError, match="Unknown AlexNet variant 'vgg'"):
        AlexNet(variant="vgg").init(jax.random.key(0), jnp.zeros((1, 227, 227, 3)))
    with pytest.raises(ValueError, match="groups=3 does not divide 256"):
        AlexNet(groups=3).init(jax.random.key(0), jnp.zeros((1, 227, 227, 3)))
    with pytest.raises(ValueError, match="NHWC"):
        AlexNet().init(jax.random.key(0), jnp.zeros((227, 227, 3)))


def test_paper_initialization():
    """Weights N(0, 0.01^2); biases 1 in conv2, conv4, conv5, fc6, fc7 and 0 elsewhere."""
    params = init_variables()["params"]
    for name in LAYER_NAMES:
        kernel = np.asarray(params[name]["kernel"])
        assert abs(kernel.mean()) < 1e-3, name
        assert abs(kernel.std() - 0.01) < (5e-4 if kernel.size > 1e5 else 2e-3), name
        expected_bias = 1.0 if name in ("conv2", "conv4", "conv5", "fc6", "fc7") else 0.0
        np.testing.assert_array_equal(params[name]["bias"], expected_bias, err_msg=name)


def test_torch_initialisation_bounds():
    variables = AlexNet(variant="torchvision").init(jax.random.key(1), jnp.zeros((1, 63, 63, 3)))
    conv2 = variables["params"]["conv2"]
    bound = 1 / np.sqrt(5 * 5 * 64)
    assert np.abs(conv2["kernel"]).max() <= bound and np.abs(conv2["kernel"]).max() > 0.9 * bound
    assert np.abs(conv2["bias"]).max() <= bound and np.abs(conv2["bias"]).max() > 0.5 * bound


def test_two_towers_are_independent_convolutions():
    """groups=2: each half of conv2's filters sees only its half of conv1's 96 channels."""
    model = AlexNet(groups=2)
    variables = init_variables(groups=2)
    x = jax.random.normal(jax.random.key(1), (1, 227, 227, 3))
    _, state = model.apply(variables, x, capture_intermediates=True, mutable=["intermediates"])
    conv1_out = state["intermediates"]["conv1_out"][0]  # (1, 27, 27, 96) pooled
    kernel = variables["params"]["conv2"]["kernel"]  # (5, 5, 48, 256)
    bias = variables["params"]["conv2"]["bias"]
    chex.assert_shape(kernel, (5, 5, 48, 256))
    towers = [
        jax.lax.conv_general_dilated(
            conv1_out[..., 48 * t : 48 * (t + 1)],
            kernel[..., 128 * t : 128 * (t + 1)],
            (1, 1),
            [(2, 2), (2, 2)],
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
        )
        for t in range(2)
    ]
    expected = jnp.concatenate(towers, axis=-1) + bias
    got = state["intermediates"]["conv2"]["__call__"][0]
    chex.assert_trees_all_close(got, expected, rtol=1e-5, atol=1e-5)


class TestDropout(chex.TestCase):
    def setUp(self):
        super().setUp()
        self.model = AlexNet(num_classes=10)
        self.variables = self.model.init(jax.random.key(0), jnp.zeros((1, 67, 67, 3)))
        self.x = jax.random.normal(jax.random.key(1), (4, 67, 67, 3))

    @chex.variants(with_jit=True, without_jit=True)
    def test_dropout_only_in_training_and_driven_by_its_rng(self):
        apply = self.variant(
            lambda x, key, train: self.model.apply(
                self.variables, x, train=train, rngs={"dropout": key}
            ),
            static_argnums=(2,),
        )
        eval_a = apply(self.x, jax.random.key(2), False)
        eval_b = apply(self.x, jax.random.key(3), False)
        chex.assert_trees_all_equal(eval_a, eval_b)  # evaluation is deterministic
        train_a = apply(self.x, jax.random.key(2), True)
        train_a2 = apply(self.x, jax.random.key(2), True)
        train_b = apply(self.x, jax.random.key(3), True)
        chex.assert_trees_all_equal(train_a, train_a2)
        assert np.max(np.abs(train_a - train_b)) > 1e-6
        assert np.max(np.abs(train_a - eval_a)) > 1e-6

    def test_dropout_rate_zero_equals_evaluation(self):
        model = AlexNet(num_classes=10, dropout_rate=0.0)
        out = model.apply(self.variables, self.x, train=True, rngs={"dropout": jax.random.key(0)})
        chex.assert_trees_all_close(out, self.model.apply(self.variables, self.x), rtol=1e-6)

    def test_dropout_drops_half_of_fc7_and_scales_the_rest(self):
        """Inverted dropout: p=0.5 zeroes about half of fc7's outputs and doubles the others."""
        _, state = self.model.apply(
            self.variables,
            self.x,
            train=True,
            rngs={"dropout": jax.random.key(4)},
            capture_intermediates=True,
            mutable=["intermediates"],
        )
        fc7 = np.asarray(jax.nn.relu(state["intermediates"]["fc7"]["__call__"][0]))
        dropped = np.asarray(state["intermediates"]["fc7_out"][0])  # after dropout
        alive = fc7 > 0
        assert 0.45 < (dropped[alive] == 0).mean() < 0.55
        kept = dropped != 0
        np.testing.assert_allclose(dropped[kept], 2 * fc7[kept], rtol=1e-6)

    def test_vmap_over_examples_equals_batch(self):
        single = jax.vmap(lambda image: self.model.apply(self.variables, image[None])[0])
        chex.assert_trees_all_close(
            single(self.x), self.model.apply(self.variables, self.x), rtol=1e-5, atol=1e-5
        )


def test_bfloat16_computation_with_float32_parameters():
    model32 = AlexNet(num_classes=10)
    model16 = AlexNet(num_classes=10, dtype=jnp.bfloat16)
    x = jax.random.uniform(jax.random.key(1), (2, 67, 67, 3))
    variables = model16.init(jax.random.key(0), x)
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree_util.tree_leaves(variables))
    out16, state = model16.apply(variables, x, mutable=["intermediates"])
    assert out16.dtype == jnp.float32  # logits come back in float32
    assert state["intermediates"]["conv1_out"][0].dtype == jnp.bfloat16
    out32 = model32.apply(variables, x)
    chex.assert_trees_all_close(out16, out32, rtol=5e-2, atol=5e-3)


def test_features_returns_named_layers():
    model = AlexNet()
    variables = init_variables()
    x = jnp.ones((3, 227, 227, 3))
    feats = features(model, variables, x, layers=("conv1", "conv5", "fc7"))
    assert set(feats) == {"conv1", "conv5", "fc7"}
    chex.assert_shape(feats["conv5"], (3, 6, 6, 256))
    chex.assert_shape(feats["fc7"], (3, 4096))
    all_feats = features(model, variables, x)
    chex.assert_trees_all_close(all_feats["fc8"], model.apply(variables, x))
    with pytest.raises(ValueError, match="Unknown layer names"):
        features(model, variables, x, layers=("pool5",))


def test_lrn_and_pooling_switches_for_ablations():
    x = jax.random.uniform(jax.random.key(1), (1, 99, 99, 3)) * 255
    variables = AlexNet(num_classes=5).init(jax.random.key(0), x)
    with_lrn = AlexNet(num_classes=5).apply(variables, x)
    without = AlexNet(num_classes=5, use_lrn=False).apply(variables, x)
    assert np.max(np.abs(with_lrn - without)) > 1e-4
    assert spatial_sizes("paper", 227, overlap_pool=False)["conv5"] == 6
    params_nonoverlap = abstract_params(AlexNet(overlap_pool=False), 227, 3)
    assert count_params(params_nonoverlap) == 62_378_344
