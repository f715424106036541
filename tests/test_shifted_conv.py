"""bfloat16 convolutions as products (``shifted_conv.conv2d``) against XLA's convolution.

These are the CPU path without oneDNN (``cpu_convolutions="xla"``: exports, machines without
a C++ compiler); ``test_onednn.py`` tests the oneDNN path.

The reference is ``lax.conv_general_dilated`` in float32 on the same bfloat16 values: ours
accumulates in float32 and rounds once, so forward and gradients agree to bfloat16's rounding.
float32 grouped convolutions, which ``conv2d`` runs group by group on the CPU, are checked
against XLA's grouped convolution at the end.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from alexnet_jax import shifted_conv
from alexnet_jax.layers import Conv

BF16 = jnp.bfloat16
EPS = 2.0**-8  # bfloat16's relative rounding step
XLA = "xla"  # config.cpu_convolutions: the products, not oneDNN


def _reference(strides, padding, groups=1):
    def conv(x, kernel):
        return shifted_conv.lax_conv2d(
            x.astype(jnp.float32), kernel.astype(jnp.float32), strides, padding, groups
        )

    return conv


def _relative_error(got, expected):
    got, expected = np.asarray(got, np.float32), np.asarray(expected, np.float32)
    return np.max(np.abs(got - expected)) / np.max(np.abs(expected))


GEOMETRIES = [
    # (image N, H, W, C), kernel (kh, kw, F), strides, symmetric padding, groups
    ((2, 13, 13, 16), (3, 3, 8), (1, 1), (1, 1), 1),  # conv3-5's shape, small
    ((2, 9, 11, 5), (3, 2, 7), (1, 1), (0, 0), 1),  # rectangular kernel and image, no padding
    ((2, 12, 12, 6), (5, 5, 4), (1, 1), (2, 2), 1),  # conv2's kernel
    ((1, 5, 5, 3), (5, 5, 2), (1, 1), (0, 0), 1),  # the kernel covers the image: one output
    ((2, 7, 8, 4), (3, 5, 3), (1, 1), (2, 1), 1),  # per-axis padding
    ((2, 27, 27, 3), (11, 11, 8), (4, 4), (0, 0), 1),  # conv1 (paper): 11x11 / 4
    ((2, 28, 28, 3), (11, 11, 8), (4, 4), (2, 2), 1),  # conv1 (torchvision): padded
    ((2, 10, 9, 4), (3, 3, 4), (2, 2), (1, 1), 1),  # stride 2
    ((2, 14, 13, 3), (5, 4, 4), (3, 2), (1, 1), 1),  # a block row of 6 values: 32-bit words
    ((2, 14, 13, 3), (5, 5, 4), (2, 3), (1, 1), 1),  # a block row of 9 values: 16-bit moves
    ((2, 12, 12, 8), (5, 5, 6), (1, 1), (2, 2), 2),  # the paper's two towers (conv2)
    ((2, 9, 9, 12), (3, 3, 6), (1, 1), (1, 1), 3),  # three groups
]


@pytest.mark.parametrize("image, kernel_shape, strides, pad, groups", GEOMETRIES)
def test_forward_and_gradients_match_xla_convolution(image, kernel_shape, strides, pad, groups):
    rng = np.random.default_rng(0)
    kh, kw, features = kernel_shape
    x = jnp.asarray(rng.standard_normal(image), BF16)
    kernel_shape = (kh, kw, image[-1] // groups, features)
    kernel = jnp.asarray(rng.standard_normal(kernel_shape) * 0.2, BF16)
    padding = ((pad[0], pad[0]), (pad[1], pad[1]))

    def ours(x, kernel):
        return shifted_conv.conv2d(x, kernel, strides, padding, groups, XLA)

    reference = _reference(strides, padding, groups)
    y = jax.jit(ours)(x, kernel)
    expected = reference(x, kernel)
    chex.assert_equal_shape([y, expected])
    assert y.dtype == BF16
    assert _relative_error(y, expected) <= EPS

    cotangent = jnp.asarray(rng.standard_normal(y.shape), BF16)
    d_x, d_kernel = jax.jit(lambda x, k, g: jax.vjp(ours, x, k)[1](g))(x, kernel, cotangent)
    ref_x, ref_kernel = jax.vjp(reference, x, kernel)[1](cotangent.astype(jnp.float32))
    assert d_x.dtype == BF16 and d_kernel.dtype == BF16
    chex.assert_equal_shape([d_x, x])
    chex.assert_equal_shape([d_kernel, kernel])
    assert _relative_error(d_x, ref_x) <= EPS
    assert _relative_error(d_kernel, ref_kernel) <= EPS


def _compiled_text(fn, *args):
    return jax.jit(fn).lower(*args).compile().as_text()


def test_on_the_cpu_bfloat16_lowers_to_products_and_float32_to_a_convolution():
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((2, 13, 13, 16)), jnp.float32)
    kernel = jnp.asarray(rng.standard_normal((3, 3, 16, 8)), jnp.float32)

    def loss(x, kernel):
        y = shifted_conv.conv2d(x, kernel, (1, 1), ((1, 1), (1, 1)), cpu_convolutions=XLA)
        return jnp.sum(y.astype(jnp.float32) ** 2)

    train = jax.value_and_grad(loss, argnums=(0, 1))
    if jax.default_backend() != "cpu":
        pytest.skip("the product lowering is the CPU's")
    assert "convolution(" not in _compiled_text(train, x.astype(BF16), kernel.astype(BF16))
    assert "convolution(" in _compiled_text(train, x, kernel)


def _product_rows(fn, *args):
    """Rows of every bfloat16 product (``dot_general`` on bfloat16 operands) in ``fn``."""
    rows = []

    def visit(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "dot_general" and eqn.invars[0].aval.dtype == BF16:
                (contract, _), _ = eqn.params["dimension_numbers"]
                if contract == (1,):  # (rows, contraction) @ (contraction, columns)
                    rows.append(eqn.invars[0].aval.shape[0])
            for value in eqn.params.values():  # the custom VJP's and any other inner jaxpr
                for item in value if isinstance(value, (tuple, list)) else (value,):
                    inner = getattr(item, "jaxpr", None)
                    if inner is not None:
                        visit(getattr(inner, "jaxpr", inner))

    visit(jax.make_jaxpr(fn)(*args).jaxpr)
    return rows


@pytest.mark.parametrize("size, k, pad", [(27, 5, 2), (13, 3, 1)])  # conv2; conv3-conv5
def test_products_skip_the_second_side_of_the_padding(size, k, pad):
    # Each gap of zeros pads the row (image) before it and the one after it, so the forward
    # products cover (H + pad)(W + pad) pixel rows per image, plus the furthest kernel
    # row's shift once: not (H + 2 pad)(W + 2 pad).
    n = 4
    x = jnp.zeros((n, size, size, 8), BF16)
    kernel = jnp.zeros((k, k, 8, 8), BF16)
    rows = _product_rows(lambda x, w: shifted_conv._shifted(x, w, (pad, pad)), x, kernel)
    assert len(rows) == k  # one product per phase
    covered = sum(rows)
    assert covered <= n * (size + pad) ** 2 + k * (size + pad) + 2 * k
    assert covered < n * (size + 2 * pad) ** 2


def test_other_platforms_keep_xla_convolution():
    """Lowered for a GPU (no GPU needed to lower), the same function is one convolution
    forward and backward, no products: cuDNN's path is untouched."""
    x = jnp.zeros((2, 13, 13, 16), BF16)
    kernel = jnp.zeros((3, 3, 16, 8), BF16)

    def loss(x, kernel):
        y = shifted_conv.conv2d(x, kernel, (1, 1), ((1, 1), (1, 1)), cpu_convolutions=XLA)
        return jnp.sum(y.astype(jnp.float32))

    fn = jax.jit(jax.grad(loss, argnums=(0, 1)))
    gpu = jax.export.export(fn, platforms=["cuda"])(x, kernel).mlir_module()
    assert "stablehlo.convolution" in gpu and "dot_general" not in gpu
    cpu = jax.export.export(fn, platforms=["cpu"])(x, kernel).mlir_module()
    assert "stablehlo.convolution" not in cpu and "dot_general" in cpu


@pytest.mark.parametrize(
    "padding",
    [((0, 1), (1, 0)), ((3, 3), (1, 1))],  # asymmetric; as wide as the kernel
)
def test_what_products_do_not_cover_falls_back_to_xla(padding):
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.standard_normal((2, 9, 9, 8)), BF16)
    kernel = jnp.asarray(rng.standard_normal((3, 3, 8, 6)), BF16)

    def ours(x, kernel):
        return shifted_conv.conv2d(x, kernel, (1, 1), padding, cpu_convolutions=XLA)

    expected = shifted_conv.lax_conv2d(x, kernel, (1, 1), padding)
    np.testing.assert_array_equal(np.asarray(jax.jit(ours)(x, kernel), np.float32),
                                  np.asarray(expected, np.float32))  # fmt: skip
    if jax.default_backend() == "cpu":
        assert "convolution(" in _compiled_text(ours, x, kernel)


def test_conv_layer_in_bfloat16_follows_float32():
    """``layers.Conv`` with ``dtype=bfloat16`` (the product route on the CPU) against the
    same layer in float32: the same parameters, results within bfloat16 rounding."""
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.standard_normal((2, 15, 15, 8)), jnp.float32)
    layer32 = Conv(16, (5, 5), padding=((2, 2), (2, 2)), dtype=jnp.float32, cpu_convolutions=XLA)
    layer16 = Conv(16, (5, 5), padding=((2, 2), (2, 2)), dtype=BF16, cpu_convolutions=XLA)
    params = layer32.init(jax.random.PRNGKey(0), x)
    chex.assert_trees_all_equal_shapes(params, layer16.init(jax.random.PRNGKey(0), x))
    expected = layer32.apply(params, x.astype(BF16).astype(jnp.float32))
    got = jax.jit(layer16.apply)(params, x)
    assert got.dtype == BF16
    # the bf16 rounding of the kernel adds its own error: a few steps
    assert _relative_error(got, expected) <= 4 * EPS


@pytest.mark.parametrize(
    "image, kernel_shape, strides, padding, groups",
    [
        ((2, 12, 12, 8), (5, 5, 6), (1, 1), ((2, 2), (2, 2)), 2),  # the paper's conv2 towers
        ((2, 9, 9, 12), (3, 3, 6), (1, 1), ((1, 1), (1, 1)), 3),
        ((2, 10, 9, 8), (3, 3, 4), (2, 2), ((0, 1), (1, 0)), 2),  # strided, asymmetric
        ((2, 9, 9, 6), (3, 3, 6), (1, 1), ((1, 1), (1, 1)), 6),  # depthwise: XLA's own
    ],
)
def test_float32_groups_match_xla_grouped_conv(image, kernel_shape, strides, padding, groups):
    """float32 grouped convolutions, which run group by group on the CPU (``_by_groups``),
    against XLA's grouped convolution: forward and both gradients."""
    rng = np.random.default_rng(4)
    kh, kw, features = kernel_shape
    x = jnp.asarray(rng.standard_normal(image), jnp.float32)
    kernel = jnp.asarray(rng.standard_normal((kh, kw, image[-1] // groups, features)), jnp.float32)

    def ours(x, kernel):
        return shifted_conv.conv2d(x, kernel, strides, padding, groups, XLA)

    def reference(x, kernel):
        return shifted_conv.lax_conv2d(x, kernel, strides, padding, groups)

    y = jax.jit(ours)(x, kernel)
    chex.assert_trees_all_close(y, reference(x, kernel), rtol=1e-5, atol=1e-5)
    cotangent = jnp.asarray(rng.standard_normal(y.shape), jnp.float32)
    grads = jax.jit(lambda x, k, g: jax.vjp(ours, x, k)[1](g))(x, kernel, cotangent)
    expected = jax.vjp(reference, x, kernel)[1](cotangent)
    chex.assert_trees_all_close(grads, expected, rtol=1e-5, atol=1e-4)

    if jax.default_backend() == "cpu":
        text = _compiled_text(lambda x, k, g: jax.vjp(ours, x, k)[1](g), x, kernel, cotangent)
        if kernel.shape[2] > 1:  # one plain convolution per group, forward and backward
            assert "feature_group_count" not in text and "batch_group_count" not in text
        else:
            assert "feature_group_count" in text


def test_grouped_float32_keeps_one_convolution_on_other_platforms():
    x = jnp.zeros((2, 13, 13, 16), jnp.float32)
    kernel = jnp.zeros((3, 3, 8, 8), jnp.float32)

    def loss(x, kernel):
        return jnp.sum(shifted_conv.conv2d(x, kernel, (1, 1), ((1, 1), (1, 1)), 2, XLA))

    fn = jax.jit(jax.grad(loss, argnums=(0, 1)))
    gpu = jax.export.export(fn, platforms=["cuda"])(x, kernel).mlir_module()
    # the gradients alone (the loss's forward convolution is dead code): the input gradient
    # grouped by features, the kernel gradient by batch
    assert gpu.count("stablehlo.convolution") == 2
    assert "feature_group_count = 2" in gpu and "batch_group_count = 2" in gpu
    cpu = jax.export.export(fn, platforms=["cpu"])(x, kernel).mlir_module()
    assert cpu.count("stablehlo.convolution") == 4  # the same, once per group
    assert "feature_group_count = 2" not in cpu and "batch_group_count = 2" not in cpu
