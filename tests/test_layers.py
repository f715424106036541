"""The hand-written pooling and mixed-precision product against the library layers they replace."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from alexnet_jax import layers
from alexnet_jax.layers import Conv, Dense, bias_add, max_pool, mixed_dot_general


def flax_pool(x, window, strides):
    return nn.max_pool(x, window, strides, padding="VALID")


@pytest.mark.parametrize(
    "shape, window, strides",
    [((2, 13, 13, 5), (3, 3), (2, 2)), ((2, 12, 9, 3), (3, 3), (2, 2)),
     ((1, 8, 8, 4), (2, 2), (2, 2)), ((2, 7, 10, 3), (3, 2), (1, 3))],
)  # fmt: skip
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_max_pool_and_its_gradient_equal_flax(shape, window, strides, dtype):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal(shape), dtype)
    expected = flax_pool(x, window, strides)
    got = max_pool(x, window, strides)
    chex.assert_equal_shape([got, expected])
    assert got.dtype == dtype
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(expected, np.float32))

    weights = jnp.asarray(rng.standard_normal(expected.shape), jnp.float32)

    def loss(pool):
        return lambda x: jnp.sum(pool(x, window, strides).astype(jnp.float32) * weights)

    ours = np.asarray(jax.grad(loss(max_pool))(x), np.float32)
    theirs = np.asarray(jax.grad(loss(flax_pool))(x), np.float32)
    # The same positions receive gradient; where windows overlap, sums in another order.
    np.testing.assert_array_equal(ours != 0, theirs != 0)
    tolerance = 1e-6 if dtype == jnp.float32 else 2**-7  # bfloat16: one rounding apart
    np.testing.assert_allclose(ours, theirs, rtol=tolerance, atol=tolerance)


def test_ties_send_the_gradient_to_the_first_maximum_as_xla_does():
    # After a ReLU most windows tie at zero; constant blocks tie everywhere.
    rng = np.random.default_rng(1)
    x = jnp.maximum(jnp.asarray(rng.standard_normal((2, 11, 11, 3)), jnp.float32), 0)
    x = x.at[:, :4, :4, :].set(1.0)
    g = jnp.asarray(rng.standard_normal((2, 5, 5, 3)), jnp.float32)
    ours = jax.vjp(lambda x: max_pool(x, (3, 3), (2, 2)), x)[1](g)[0]
    theirs = jax.vjp(lambda x: flax_pool(x, (3, 3), (2, 2)), x)[1](g)[0]
    np.testing.assert_array_equal(np.asarray(ours) != 0, np.asarray(theirs) != 0)
    np.testing.assert_allclose(np.asarray(ours), np.asarray(theirs), rtol=1e-6, atol=1e-6)
    # Each output's gradient lands exactly once.
    assert float(jnp.sum(ours)) == pytest.approx(float(jnp.sum(g)), rel=1e-5)


def test_max_pool_against_a_numpy_loop():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((1, 9, 9, 2)).astype(np.float32)
    expected = np.empty((1, 4, 4, 2), np.float32)
    for i in range(4):
        for j in range(4):
            expected[0, i, j] = x[0, 2 * i : 2 * i + 3, 2 * j : 2 * j + 3].max(axis=(0, 1))
    np.testing.assert_array_equal(np.asarray(max_pool(jnp.asarray(x))), expected)


def test_max_pool_errors_name_the_problem():
    with pytest.raises(ValueError, match="NHWC"):
        max_pool(jnp.zeros((4, 4, 3)))
    with pytest.raises(ValueError, match="larger than the input"):
        max_pool(jnp.zeros((1, 2, 2, 1)), (3, 3), (2, 2))


def test_mixed_product_accumulates_in_float32_forward_and_backward():
    rng = np.random.default_rng(3)
    a32 = rng.standard_normal((8, 300)).astype(np.float32)
    b32 = rng.standard_normal((300, 16)).astype(np.float32)
    a, b = jnp.asarray(a32, jnp.bfloat16), jnp.asarray(b32, jnp.bfloat16)
    exact = np.asarray(a, np.float64) @ np.asarray(b, np.float64)  # of the rounded operands
    dims = (((1,), (0,)), ((), ()))
    out = mixed_dot_general(a, b, dims)
    assert out.dtype == jnp.bfloat16
    # One bfloat16 rounding of a float32 sum: within half a bfloat16 ulp of the exact result.
    np.testing.assert_allclose(np.asarray(out, np.float64), exact, rtol=2**-8, atol=1e-6)

    g = jnp.asarray(rng.standard_normal((8, 16)), jnp.bfloat16)
    da, db = jax.vjp(lambda a, b: mixed_dot_general(a, b, dims), a, b)[1](g)
    g64 = np.asarray(g, np.float64)
    np.testing.assert_allclose(np.asarray(da, np.float64), g64 @ np.asarray(b, np.float64).T,
                               rtol=2**-8, atol=1e-6)  # fmt: skip
    np.testing.assert_allclose(np.asarray(db, np.float64), np.asarray(a, np.float64).T @ g64,
                               rtol=2**-8, atol=1e-6)  # fmt: skip
    assert da.dtype == db.dtype == jnp.bfloat16


def test_mixed_product_is_the_plain_one_in_float32_and_inside_dense():
    rng = np.random.default_rng(4)
    x = jnp.asarray(rng.standard_normal((4, 6)), jnp.float32)
    dense = nn.Dense(5)
    ours = nn.Dense(5, dot_general=mixed_dot_general)
    variables = dense.init(jax.random.PRNGKey(0), x)
    chex.assert_trees_all_equal(ours.apply(variables, x), dense.apply(variables, x))
    # bfloat16 Dense: the same up to bfloat16 rounding, and differentiable in its parameters.
    narrow = nn.Dense(5, dtype=jnp.bfloat16, dot_general=mixed_dot_general)
    chex.assert_trees_all_close(
        narrow.apply(variables, x).astype(jnp.float32), dense.apply(variables, x), atol=0.05
    )
    grads = jax.grad(lambda v: jnp.sum(narrow.apply(v, x).astype(jnp.float32)))(variables)
    expected = jax.grad(lambda v: jnp.sum(dense.apply(v, x)))(variables)
    chex.assert_trees_all_close(grads, expected, atol=0.05)


def test_dense_is_flax_dense_in_float32_and_keeps_a_float32_kernel_gradient_in_bfloat16():
    rng = np.random.default_rng(7)
    x = jnp.asarray(rng.standard_normal((8, 300)), jnp.float32)
    init = nn.initializers.normal(0.1)
    theirs = nn.Dense(16, kernel_init=init, bias_init=init)
    variables = theirs.init(jax.random.PRNGKey(0), x)
    # XLA's products (oneDNN's, the CPU's default, are tested against them in test_onednn.py)
    ours = Dense(16, kernel_init=init, bias_init=init, cpu_matmuls="xla")
    chex.assert_trees_all_equal(ours.init(jax.random.PRNGKey(0), x), variables)

    def loss(module):
        return lambda v, x: jnp.sum(jnp.sin(module.apply(v, x).astype(jnp.float32)))

    # Eight rows take the few-rows product (another summation order, below); more rows than
    # FEW_ROWS take flax's own.
    chex.assert_trees_all_close(
        ours.apply(variables, x), theirs.apply(variables, x), rtol=1e-5, atol=1e-5
    )
    chex.assert_trees_all_close(
        jax.grad(loss(ours))(variables, x),
        jax.grad(loss(theirs))(variables, x),
        rtol=1e-5,
        atol=1e-5,
    )
    many = jnp.tile(x, (layers.FEW_ROWS // 8 + 1, 1))
    chex.assert_trees_all_equal(ours.apply(variables, many), theirs.apply(variables, many))
    chex.assert_trees_all_equal(
        jax.grad(loss(ours))(variables, many), jax.grad(loss(theirs))(variables, many)
    )

    narrow = Dense(16, dtype=jnp.bfloat16, kernel_init=init, bias_init=init, cpu_matmuls="xla")
    x16 = x.astype(jnp.bfloat16)
    out = narrow.apply(variables, x16)
    assert out.dtype == jnp.bfloat16
    grads = jax.grad(loss(narrow))(variables, x16)
    chex.assert_trees_all_equal_shapes_and_dtypes(grads, variables)  # float32 gradients
    # The kernel gradient is lhs.T @ g of the bfloat16 operands, summed in float32 and not
    # rounded to bfloat16: far closer to the exact product than bfloat16's 2**-8.
    g = jax.vjp(lambda v: narrow.apply(v, x16), variables)[1]
    cotangent = jnp.asarray(rng.standard_normal((8, 16)), jnp.bfloat16)
    d_kernel = g(cotangent)[0]["params"]["kernel"]
    exact = np.asarray(x16, np.float64).T @ np.asarray(cotangent, np.float64)
    np.testing.assert_allclose(np.asarray(d_kernel, np.float64), exact, rtol=1e-5, atol=1e-5)
    # (batch, ...) inputs are their rows flattened (test_onednn.py); one axis is no batch
    with pytest.raises(ValueError, match="batch, features"):
        Dense(4).init(jax.random.PRNGKey(0), jnp.zeros((5,)))


@pytest.mark.parametrize("rows", [1, 32, layers.FEW_ROWS])
def test_few_rows_float32_product_is_the_plain_product(rows):
    rng = np.random.default_rng(8)
    x = jnp.asarray(rng.standard_normal((rows, 200)), jnp.float32)
    kernel = jnp.asarray(rng.standard_normal((200, 24)), jnp.float32)
    cotangent = jnp.asarray(rng.standard_normal((rows, 24)), jnp.float32)
    plain = jax.jit(jax.vjp, static_argnums=0)(layers._plain_matmul, x, kernel)
    ours = jax.jit(jax.vjp, static_argnums=0)(layers._few_rows_matmul, x, kernel)
    exact = np.asarray(x, np.float64) @ np.asarray(kernel, np.float64)
    np.testing.assert_allclose(np.asarray(ours[0]), exact, rtol=1e-5, atol=1e-5)
    chex.assert_trees_all_close(ours[0], plain[0], rtol=1e-5, atol=1e-5)
    # The backward is the plain product's, to the bit, op by op and compiled as in a step.
    chex.assert_trees_all_equal(ours[1](cotangent), plain[1](cotangent))

    def grads(product):
        return jax.jit(jax.grad(lambda x, k: jnp.vdot(product(x, k), cotangent), (0, 1)))

    chex.assert_trees_all_equal(
        grads(layers._few_rows_matmul)(x, kernel), grads(layers._plain_matmul)(x, kernel)
    )


def test_few_rows_product_is_transposed_on_the_cpu_and_plain_elsewhere():
    x, kernel = jnp.zeros((32, 64)), jnp.zeros((64, 8))
    cpu = jax.export.export(jax.jit(layers._few_rows_matmul), platforms=["cpu"])(x, kernel)
    gpu = jax.export.export(jax.jit(layers._few_rows_matmul), platforms=["cuda"])(x, kernel)
    assert cpu.mlir_module().count("stablehlo.dot_general") == 2  # the transpose, the product
    assert gpu.mlir_module().count("stablehlo.dot_general") == 1


def test_dense_exports_with_a_symbolic_batch():
    # A batch of unknown size cannot be compared with FEW_ROWS: it takes the plain product.
    dense = Dense(6)
    variables = dense.init(jax.random.PRNGKey(0), jnp.zeros((2, 5)))
    (batch,) = jax.export.symbolic_shape("batch")
    spec = jax.ShapeDtypeStruct((batch, 5), jnp.float32)
    exported = jax.export.export(jax.jit(lambda x: dense.apply(variables, x)))(spec)
    x = jnp.asarray(np.random.default_rng(9).standard_normal((200, 5)), jnp.float32)
    # XLA's product against oneDNN's on the CPU (another summation order)
    chex.assert_trees_all_close(exported.call(x), dense.apply(variables, x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("groups", [1, 2])
def test_conv_has_flax_convs_parameters_and_results(groups):
    rng = np.random.default_rng(5)
    x = jnp.asarray(rng.standard_normal((2, 15, 15, 4)), jnp.float32)
    kwargs = dict(strides=(2, 2), padding=((1, 1), (1, 1)), feature_group_count=groups,
                  bias_init=nn.initializers.normal(1.0))  # fmt: skip
    theirs = nn.Conv(6, (3, 3), **kwargs)
    ours = Conv(6, (3, 3), **kwargs)
    variables = theirs.init(jax.random.PRNGKey(0), x)
    chex.assert_trees_all_equal_shapes_and_dtypes(ours.init(jax.random.PRNGKey(0), x), variables)
    chex.assert_trees_all_close(ours.apply(variables, x), theirs.apply(variables, x), atol=1e-5)

    def loss(module):
        return lambda v: jnp.sum(jnp.sin(module.apply(v, x)))

    chex.assert_trees_all_close(
        jax.grad(loss(ours))(variables), jax.grad(loss(theirs))(variables), atol=1e-4
    )
    with pytest.raises(ValueError, match="feature_group_count=3"):
        Conv(6, (3, 3), feature_group_count=3).init(jax.random.PRNGKey(0), x)


def test_bias_add_gradient_is_the_sum_over_everything_but_channels():
    rng = np.random.default_rng(6)
    g = rng.standard_normal((3, 5, 7, 4)).astype(np.float32)
    x = jnp.zeros(g.shape, jnp.float32)
    for dtype in (jnp.float32, jnp.bfloat16):
        bias = jnp.zeros((4,), dtype)
        _, vjp = jax.vjp(bias_add, x.astype(dtype), bias)
        dx, dbias = vjp(jnp.asarray(g, dtype))
        assert dbias.dtype == dtype
        tolerance = 1e-5 if dtype == jnp.float32 else 0.05
        np.testing.assert_allclose(
            np.asarray(dbias, np.float32),
            np.asarray(jnp.asarray(g, dtype), np.float32).sum((0, 1, 2)),
            rtol=tolerance, atol=tolerance,
        )  # fmt: skip
        np.testing.assert_array_equal(
            np.asarray(dx, np.float32), np.asarray(jnp.asarray(g, dtype), np.float32)
        )


@pytest.mark.parametrize(
    "shape, window, strides",
    [((2, 13, 13, 5), (3, 3), (2, 2)), ((2, 12, 9, 3), (3, 3), (2, 2)),
     ((1, 8, 8, 4), (2, 2), (2, 2)), ((2, 7, 10, 3), (3, 2), (1, 3))],
)  # fmt: skip
def test_both_backward_routes_give_the_same_float32_gradient(shape, window, strides):
    # float32 gradients sum per stride phase, narrower ones by dilation; the same terms in
    # the same order, so bit-identical (ties after a ReLU included).
    rng = np.random.default_rng(3)
    x = jnp.maximum(jnp.asarray(rng.standard_normal(shape), jnp.float32), 0)
    _, index = layers._max_pool_fwd(x, window, strides, shape)
    g = jnp.asarray(rng.standard_normal(index.shape), jnp.float32)
    by_phases = layers._routed_by_phases(window, strides, shape, index, g)
    dilated = layers._routed_dilated(window, strides, shape, index, g)
    chex.assert_shape([by_phases, dilated], shape)
    np.testing.assert_array_equal(np.asarray(by_phases), np.asarray(dilated))
    assert float(jnp.sum(dilated)) == pytest.approx(float(jnp.sum(g)), rel=1e-5)
