"""The paper's local response normalization, against three independent references."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from alexnet_jax.lrn import LocalResponseNorm, local_response_norm

PAPER = dict(size=5, k=2.0, alpha=1e-4, beta=0.75)


def naive_lrn(a: np.ndarray, size: int, k: float, alpha: float, beta: float) -> np.ndarray:
    """The paper's formula, one channel at a time, in float64."""
    a = a.astype(np.float64)
    channels = a.shape[-1]
    out = np.empty_like(a)
    for c in range(channels):
        lo, hi = max(0, c - size // 2), min(channels - 1, c + size // 2)
        total = np.sum(a[..., lo : hi + 1] ** 2, axis=-1)
        out[..., c] = a[..., c] / (k + alpha * total) ** beta
    return out


def activations(shape=(2, 7, 7, 96), scale=30.0, seed=0):
    """ReLU-like activations large enough that the normalization matters (alpha*sum ~ k)."""
    rng = np.random.default_rng(seed)
    return (np.abs(rng.normal(size=shape)) * scale).astype(np.float32)


@pytest.mark.parametrize(
    "params",
    [PAPER, dict(size=3, k=1.0, alpha=1e-3, beta=0.5), dict(size=7, k=1.5, alpha=2e-3, beta=0.6)],
)
def test_lrn_matches_naive_loop(params):
    x = activations()
    expected = naive_lrn(x, **params)
    chex.assert_trees_all_close(np.asarray(local_response_norm(x, **params)), expected, rtol=1e-5)


def test_lrn_normalisation_is_active_in_these_tests():
    """Guards the references: the inputs make the denominator differ from k alone."""
    x = activations()
    plain = x / PAPER["k"] ** PAPER["beta"]
    assert np.max(np.abs(np.asarray(local_response_norm(x, **PAPER)) - plain)) > 0.1


def test_lrn_module_has_paper_defaults_and_no_parameters():
    x = jnp.asarray(activations())
    module = LocalResponseNorm()
    variables = module.init(jax.random.key(0), x)
    assert variables == {}
    assert (module.size, module.k, module.alpha, module.beta) == (5, 2.0, 1e-4, 0.75)
    chex.assert_trees_all_close(module.apply(variables, x), local_response_norm(x, **PAPER))


def test_lrn_matches_tensorflow_values_and_gradients():
    tf = pytest.importorskip("tensorflow")
    x = activations()
    cotangent = np.random.default_rng(1).normal(size=x.shape).astype(np.float32)
    xt = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(xt)
        yt = tf.nn.local_response_normalization(xt, depth_radius=2, bias=2.0, alpha=1e-4, beta=0.75)
        loss = tf.reduce_sum(yt * cotangent)
    grad_tf = tape.gradient(loss, xt).numpy()

    y, vjp = jax.vjp(lambda v: local_response_norm(v, **PAPER), jnp.asarray(x))
    (grad,) = vjp(jnp.asarray(cotangent))
    chex.assert_trees_all_close(np.asarray(y), yt.numpy(), rtol=1e-5, atol=1e-5)
    chex.assert_trees_all_close(np.asarray(grad), grad_tf, rtol=1e-4, atol=1e-6)


def test_lrn_matches_pytorch_with_alpha_times_size():
    """PyTorch divides alpha by size: nn.LocalResponseNorm(size, alpha=alpha * size) is ours."""
    torch = pytest.importorskip("torch")
    x = activations()
    cotangent = np.random.default_rng(2).normal(size=x.shape).astype(np.float32)
    layer = torch.nn.LocalResponseNorm(size=5, alpha=1e-4 * 5, beta=0.75, k=2.0)
    xt = torch.tensor(x).permute(0, 3, 1, 2).requires_grad_()  # NCHW
    yt = layer(xt)
    (yt * torch.tensor(cotangent).permute(0, 3, 1, 2)).sum().backward()

    y, vjp = jax.vjp(lambda v: local_response_norm(v, **PAPER), jnp.asarray(x))
    (grad,) = vjp(jnp.asarray(cotangent))
    chex.assert_trees_all_close(
        np.asarray(y), yt.detach().permute(0, 2, 3, 1).numpy(), rtol=1e-5, atol=1e-5
    )
    chex.assert_trees_all_close(
        np.asarray(grad), xt.grad.permute(0, 2, 3, 1).numpy(), rtol=1e-4, atol=1e-6
    )


def test_lrn_gradient_matches_finite_differences():
    with jax.enable_x64():
        x = jnp.asarray(activations(shape=(1, 2, 2, 8), seed=3), dtype=jnp.float64)
        jax.test_util.check_grads(
            lambda v: local_response_norm(v, size=5, k=2.0, alpha=1e-3, beta=0.75),
            (x,),
            order=1,
            modes=("rev",),
        )


def test_lrn_bfloat16_is_stable_and_close_to_float32():
    x = activations(scale=300.0)  # sums of squares ~1e7 would overflow nothing, but lose bits
    y32 = np.asarray(local_response_norm(jnp.asarray(x), **PAPER))
    y16 = local_response_norm(jnp.asarray(x, jnp.bfloat16), **PAPER)
    assert y16.dtype == jnp.bfloat16
    assert np.all(np.isfinite(np.asarray(y16, np.float32)))
    chex.assert_trees_all_close(np.asarray(y16, np.float32), y32, rtol=2e-2, atol=1e-2)
    grad16 = jax.grad(lambda v: local_response_norm(v, **PAPER).astype(jnp.float32).sum())(
        jnp.asarray(x, jnp.bfloat16)
    )
    grad32 = jax.grad(lambda v: local_response_norm(v, **PAPER).sum())(jnp.asarray(x))
    assert grad16.dtype == jnp.bfloat16
    chex.assert_trees_all_close(
        np.asarray(grad16, np.float32), np.asarray(grad32), rtol=3e-2, atol=1e-3
    )


@pytest.mark.parametrize("size", [0, -1, 4])
def test_lrn_rejects_sizes_without_a_center(size):
    with pytest.raises(ValueError, match=f"odd number of channels, got {size}"):
        local_response_norm(jnp.ones((1, 1, 1, 8)), size=size)
