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


@pytest.mark.parametrize(
    "variant,groups,divisor,size,expected",
    [
        # conv 11*11*3*24+24, 5*5*24*64+64, 3*3*64*96+96, 3*3*96*96+96, 3*3*96*64+64;
        # fc6 6*6*64*1024+1024, fc7 1024*1024+1024, fc8 1024*10+10
        ("paper", 1, 4, 227, 3_661_162),
        # the towers halve conv2, conv4, conv5's kernels: 5*5*12*64, 3*3*48*96, 3*3*48*64
        ("paper", 2, 4, 227, 3_661_162 - 19_200 - 41_472 - 27_648),
        # conv 11*11*3*32+32, 5*5*32*96+96, 3*3*96*192+192, 3*3*192*128+128, 3*3*128*128+128;
        # fc6 6*6*128*2048+2048, fc7 2048*2048+2048, fc8 2048*10+10
        ("torchvision", 1, 2, 224, 14_279_594),
    ],
)
def test_width_divisor_narrows_every_layer_but_the_last(variant, groups, divisor, size, expected):
    model = AlexNet(num_classes=10, variant=variant, groups=groups, width_divisor=divisor)
    params = abstract_params(model, size, 3)
    assert count_params(params) == expected
    widths = [params[name]["kernel"].shape[-1] for name in LAYER_NAMES]
    full = abstract_params(model.clone(width_divisor=1), size, 3)
    full_widths = [full[name]["kernel"].shape[-1] for name in LAYER_NAMES]
    assert widths == [w // divisor for w in full_widths[:-1]] + [10]


def test_width_divisor_errors_name_the_layer():
    x = jnp.zeros((1, 227, 227, 3))
    with pytest.raises(ValueError, match="width_divisor=5 does not divide conv1's width 96"):
        jax.eval_shape(AlexNet(width_divisor=5).init, jax.random.key(0), x)
    with pytest.raises(ValueError, match="width_divisor=0: must be a positive integer"):
        jax.eval_shape(AlexNet(width_divisor=0).init, jax.random.key(0), x)
    # 96 / 32 = 3 conv1 filters cannot feed two towers.
    with pytest.raises(ValueError, match="groups=2 does not divide conv2's 3 input channels"):
        jax.eval_shape(AlexNet(groups=2, width_divisor=32).init, jax.random.key(0), x)


def torch_reference(variant):
    """The same layouts written in PyTorch, an independent count of their parameters."""
    return torch_build(variant, groups=2 if variant == "paper" else 1)[0]


@pytest.mark.parametrize("variant", ["d2l", "paper"])
def test_parameter_counts_match_pytorch_reference(variant):
    reference = torch_reference(variant)
    expected = sum(p.numel() for p in reference.parameters())
    if variant == "d2l":
        ours = abstract_params(AlexNetD2L(), 224, 1)
    else:
        ours = abstract_params(AlexNet(groups=2), 227, 3)
    assert count_params(ours) == expected
    # Layer by layer, too: the same shapes in the same order (PyTorch's kernels are OIHW and
    # (out, in), ours HWIO and (in, out); both flatten fc6's input as 6*6*256 values).
    torch_shapes = [tuple(p.shape) for p in reference.parameters()]
    flax_layers = [ours[name] for name in LAYER_NAMES]
    for layer, weight, bias in zip(flax_layers, torch_shapes[0::2], torch_shapes[1::2],
                                   strict=True):  # fmt: skip
        kernel = layer["kernel"].shape
        expected = (
            (kernel[3], kernel[2], kernel[0], kernel[1]) if len(kernel) == 4 else kernel[::-1]
        )
        assert weight == expected and bias == layer["bias"].shape


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


def test_the_papers_stated_224_gives_54_not_55_with_floor_rounding():
    """cuda-convnet rounds output sizes up; XLA (and PyTorch) floor: 227 is the input that
    gives the paper's 55x55 conv1 output."""
    model = AlexNet()
    for size, conv1 in ((224, 54), (227, 55)):
        x = jnp.zeros((1, size, size, 3))
        variables = jax.eval_shape(model.init, jax.random.key(0), x)
        _, state = jax.eval_shape(
            lambda v, x: model.apply(v, x, capture_intermediates=True, mutable=["intermediates"]),
            variables,
            x,
        )
        chex.assert_shape(state["intermediates"]["conv1"]["__call__"][0], (1, conv1, conv1, 96))


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
    with pytest.raises(ValueError, match="groups=3 does not divide conv2's 256 filters"):
        AlexNet(groups=3).init(jax.random.key(0), jnp.zeros((1, 227, 227, 3)))
    with pytest.raises(ValueError, match="NHWC"):
        AlexNet().init(jax.random.key(0), jnp.zeros((227, 227, 3)))


@pytest.mark.parametrize("init", ["he", "xavier"])
def test_he_and_xavier_initialization_statistics(init):
    """He: N(0, 2 / fan_in) (truncated, rescaled to that variance); Xavier: U(-a, a) with
    a = sqrt(6 / (fan_in + fan_out)); biases 0."""
    model = AlexNet(num_classes=1000, initializer=init)
    params = model.init(jax.random.key(3), jnp.zeros((1, 227, 227, 3)))["params"]
    for name in LAYER_NAMES:
        kernel = np.asarray(params[name]["kernel"], np.float64)
        fan_in, fan_out = int(np.prod(kernel.shape[:-1])), kernel.shape[-1]
        if kernel.ndim == 4:
            fan_out *= kernel.shape[0] * kernel.shape[1]
        if init == "he":
            expected_std = np.sqrt(2.0 / fan_in)
            assert np.abs(kernel).max() <= 2.0 * expected_std / 0.8796 + 1e-6  # truncated at 2
        else:
            bound = np.sqrt(6.0 / (fan_in + fan_out))
            assert bound * 0.99 < np.abs(kernel).max() <= bound * (1 + 1e-6)  # float32 rounding
            expected_std = bound / np.sqrt(3.0)
        assert kernel.std() == pytest.approx(expected_std, rel=0.05), name
        assert abs(kernel.mean()) < 0.05 * expected_std, name
        np.testing.assert_array_equal(params[name]["bias"], 0.0)


def torch_build(variant, groups):
    """The network written in torch.nn by hand (the paper's or d2l's), in evaluation mode,
    and the (h, w, c) of what fc6 flattens."""
    torch = pytest.importorskip("torch")
    nn = torch.nn
    lrn = lambda: nn.LocalResponseNorm(5, alpha=1e-4 * 5, beta=0.75, k=2.0)  # noqa: E731
    if variant == "paper":
        layers = [
            nn.Conv2d(3, 96, 11, 4), nn.ReLU(), lrn(), nn.MaxPool2d(3, 2),
            nn.Conv2d(96, 256, 5, padding=2, groups=groups), nn.ReLU(), lrn(), nn.MaxPool2d(3, 2),
            nn.Conv2d(256, 384, 3, padding=1), nn.ReLU(),
            nn.Conv2d(384, 384, 3, padding=1, groups=groups), nn.ReLU(),
            nn.Conv2d(384, 256, 3, padding=1, groups=groups), nn.ReLU(), nn.MaxPool2d(3, 2),
            nn.Flatten(), nn.Linear(9216, 4096), nn.ReLU(), nn.Dropout(0.5),
            nn.Linear(4096, 4096), nn.ReLU(), nn.Dropout(0.5), nn.Linear(4096, 1000),
        ]  # fmt: skip
        pooled = (6, 6, 256)
    else:
        layers = [
            nn.Conv2d(1, 96, 11, 4, 1), nn.ReLU(), nn.MaxPool2d(3, 2),
            nn.Conv2d(96, 256, 5, padding=2), nn.ReLU(), nn.MaxPool2d(3, 2),
            nn.Conv2d(256, 384, 3, padding=1), nn.ReLU(),
            nn.Conv2d(384, 384, 3, padding=1), nn.ReLU(),
            nn.Conv2d(384, 256, 3, padding=1), nn.ReLU(), nn.MaxPool2d(3, 2), nn.Flatten(),
            nn.Linear(6400, 4096), nn.ReLU(), nn.Dropout(0.5),
            nn.Linear(4096, 4096), nn.ReLU(), nn.Dropout(0.5), nn.Linear(4096, 10),
        ]  # fmt: skip
        pooled = (5, 5, 256)
    return nn.Sequential(*layers).eval(), pooled


def torch_forward_reference(variant, groups, weights):
    """``torch_build``'s network with ``weights`` (ours) copied in: an independent check of
    padding, grouping, LRN placement and constants, pooling, the flattening order and
    dropout placement."""
    torch = pytest.importorskip("torch")
    nn = torch.nn
    net, pooled = torch_build(variant, groups)
    learned = [m for m in net if isinstance(m, nn.Conv2d | nn.Linear)]
    with torch.no_grad():
        for module, name in zip(learned, LAYER_NAMES, strict=True):
            kernel = np.asarray(weights[name]["kernel"])
            if kernel.ndim == 4:
                kernel = kernel.transpose(3, 2, 0, 1)  # HWIO -> OIHW
            else:
                if name == "fc6":  # our rows are (h, w, c), PyTorch's flatten is (c, h, w)
                    kernel = kernel.reshape(pooled + (-1,)).transpose(2, 0, 1, 3)
                    kernel = kernel.reshape(-1, kernel.shape[-1])
                kernel = kernel.T
            module.weight.copy_(torch.from_numpy(np.ascontiguousarray(kernel)))
            module.bias.copy_(torch.from_numpy(np.array(weights[name]["bias"])))
    return net


@pytest.mark.parametrize(
    "variant,groups,size,channels",
    [("paper", 1, 227, 3), ("paper", 2, 227, 3), ("d2l", 1, 224, 1)],
)
def test_forward_pass_equals_a_pytorch_build_of_the_same_layers(variant, groups, size, channels):
    torch = pytest.importorskip("torch")
    classes = 1000 if variant == "paper" else 10
    model = AlexNet(num_classes=classes, variant=variant, groups=groups, initializer="he")
    images = np.random.default_rng(0).normal(size=(2, size, size, channels)).astype(np.float32)
    variables = model.init(jax.random.key(0), jnp.asarray(images))
    ours = np.asarray(model.apply(variables, images))
    net = torch_forward_reference(variant, groups, variables["params"])
    with torch.no_grad():
        expected = net(torch.from_numpy(images.transpose(0, 3, 1, 2))).numpy()
    assert np.abs(expected).max() > 0.1
    np.testing.assert_allclose(ours, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


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
    """bfloat16 follows float32 where the logits depend on the input: the differences between
    images' logits agree (the paper's bias-1 init alone would make any two outputs close)."""
    model32 = AlexNet(num_classes=10, initializer="he")
    model16 = AlexNet(num_classes=10, initializer="he", dtype=jnp.bfloat16)
    x = jax.random.uniform(jax.random.key(1), (8, 67, 67, 3)) * 2 - 1
    variables = jax.jit(model16.init)(jax.random.key(0), x)
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree_util.tree_leaves(variables))
    # jitted: op by op, the bfloat16 convolutions' many small products each compile alone
    apply16 = jax.jit(functools.partial(model16.apply, mutable=["intermediates"]))
    out16, state = apply16(variables, x)
    assert out16.dtype == jnp.float32  # logits come back in float32
    assert state["intermediates"]["conv1_out"][0].dtype == jnp.bfloat16
    out32 = model32.apply(variables, x)
    centered16 = np.asarray(out16 - out16.mean(axis=0))
    centered32 = np.asarray(out32 - out32.mean(axis=0))
    scale = np.abs(centered32).max()
    assert scale > 0.1  # the input matters
    np.testing.assert_allclose(centered16, centered32, atol=0.05 * scale)
    assert np.corrcoef(centered16.ravel(), centered32.ravel())[0, 1] > 0.99


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


def numpy_max_pool(x: np.ndarray, window: int, stride: int) -> np.ndarray:
    """Max-pooling (N, H, W, C) with VALID windows, one window at a time."""
    n, h, w, c = x.shape
    out_h, out_w = (h - window) // stride + 1, (w - window) // stride + 1
    out = np.empty((n, out_h, out_w, c), x.dtype)
    for i in range(out_h):
        for j in range(out_w):
            patch = x[:, i * stride : i * stride + window, j * stride : j * stride + window]
            out[:, i, j] = patch.max(axis=(1, 2))
    return out


@pytest.mark.parametrize("use_lrn", [True, False])
@pytest.mark.parametrize("overlap_pool,window", [(True, 3), (False, 2)])
def test_lrn_and_pooling_switches_for_ablations(use_lrn, overlap_pool, window):
    """conv1's output, rebuilt from its convolution with numpy: ReLU, the LRN if switched on
    (checked against a numpy loop in test_lrn), then max-pooling over 3x3 (overlapping, the
    paper's) or 2x2 windows, stride 2. At 99x99: 23x23 before pooling; 11 or 11x11 after."""
    from tests.test_lrn import naive_lrn

    model = AlexNet(num_classes=5, use_lrn=use_lrn, overlap_pool=overlap_pool)
    x = jax.random.uniform(jax.random.key(1), (1, 99, 99, 3)) * 255
    variables = model.init(jax.random.key(0), x)
    _, state = model.apply(variables, x, capture_intermediates=True, mutable=["intermediates"])
    conv = np.asarray(state["intermediates"]["conv1"]["__call__"][0], np.float64)
    activations = np.maximum(conv, 0)
    if use_lrn:
        activations = naive_lrn(activations, size=5, k=2.0, alpha=1e-4, beta=0.75)
    expected = numpy_max_pool(activations, window, 2)
    got = np.asarray(state["intermediates"]["conv1_out"][0])
    chex.assert_shape(got, expected.shape)
    np.testing.assert_allclose(got, expected, rtol=2e-5, atol=1e-4)
    assert spatial_sizes("paper", 99, overlap_pool)["conv1"] == expected.shape[1]
    # The switches change no parameter: the same 62,378,344 with either pooling.
    assert count_params(abstract_params(model.clone(num_classes=1000), 227, 3)) == 62_378_344
