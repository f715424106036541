"""Local response normalization (Krizhevsky et al. 2012, section 3.3), written by hand.

    b[c] = a[c] / (k + alpha * sum_{j=max(0, c-n//2)}^{min(N-1, c+n//2)} a[j]**2) ** beta

This is the paper's formula as printed: ``alpha`` is *not* divided by ``n``. The same formula
is ``tf.nn.local_response_normalization(depth_radius=n // 2, bias=k, alpha=alpha, beta=beta)``.
PyTorch's ``nn.LocalResponseNorm``, Caffe and Krizhevsky's cuda-convnet divide alpha by the
window size: to reproduce them here pass ``alpha=their_alpha / size``.

The window sum over channels is a sum of ``size`` shifted slices of the zero-padded squares,
which XLA fuses with the power and product into one elementwise loop: no convolution, no
``reduce_window``, no library LRN. The backward pass is written out (``custom_vjp``): it
recomputes the denominator from the input instead of storing it, and costs one more
window sum, where automatic differentiation of the power costs several times the forward.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp


def _channel_window_sum(x: jax.Array, size: int) -> jax.Array:
    """Sums ``x`` over a window of ``size`` channels centered on each channel (last axis)."""
    half = size // 2
    channels = x.shape[-1]
    pad = [(0, 0)] * (x.ndim - 1) + [(half, half)]
    padded = jnp.pad(x, pad)
    total = padded[..., 0:channels]
    for offset in range(1, size):
        total = total + padded[..., offset : offset + channels]
    return total


def _inverse_power(d: jax.Array, beta: float) -> jax.Array:
    """``d ** -beta``; the paper's beta=0.75 as rsqrt(d) * rsqrt(sqrt(d)), cheaper than pow."""
    if beta == 0.75:
        return jax.lax.rsqrt(d) * jax.lax.rsqrt(jnp.sqrt(d))
    if beta == 0.5:
        return jax.lax.rsqrt(d)
    return jnp.power(d, -beta)


def local_response_norm(
    x: jax.Array, size: int = 5, k: float = 2.0, alpha: float = 1e-4, beta: float = 0.75
) -> jax.Array:
    """Normalizes ``x`` across its last (channel) axis with the paper's LRN formula.

    Computes in at least float32 (bfloat16 squares and sums lose too much) and returns the
    input dtype. ``size`` must be odd, so that the window is centered on each channel.
    """
    if size < 1 or size % 2 == 0:
        # An even window has no center: the paper's c +- n/2 spans n+1 channels, PyTorch's n.
        raise ValueError(f"LRN size must be a positive odd number of channels, got {size}")
    return _lrn(x, size, float(k), float(alpha), float(beta))


def _forward(wide: jax.Array, size: int, k: float, alpha: float, beta: float):
    denominator = k + alpha * _channel_window_sum(jnp.square(wide), size)
    return denominator, _inverse_power(denominator, beta)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3, 4))
def _lrn(x: jax.Array, size: int, k: float, alpha: float, beta: float) -> jax.Array:
    wide = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    _, scale = _forward(wide, size, k, alpha, beta)
    return (wide * scale).astype(x.dtype)


def _lrn_fwd(x, size, k, alpha, beta):
    return _lrn(x, size, k, alpha, beta), x  # keep only x: the rest is cheap to recompute


def _lrn_bwd(size, k, alpha, beta, x, g):
    """d/dx_j = g_j d_j^-beta - 2 alpha beta x_j sum_{c near j} g_c x_c d_c^(-beta-1).

    The window is symmetric, so the transpose of the window sum is the window sum itself.
    """
    wide = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    g = g.astype(wide.dtype)
    denominator, scale = _forward(wide, size, k, alpha, beta)
    inner = _channel_window_sum(g * wide * scale / denominator, size)
    return ((g * scale - (2 * alpha * beta) * wide * inner).astype(x.dtype),)


_lrn.defvjp(_lrn_fwd, _lrn_bwd)


class LocalResponseNorm(nn.Module):
    """LRN across channels (last axis, NHWC), in the paper's convention (alpha not / size).

    Defaults are the paper's: n=5, k=2, alpha=1e-4, beta=0.75. It has no parameters.
    """

    size: int = 5
    k: float = 2.0
    alpha: float = 1e-4
    beta: float = 0.75

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return local_response_norm(x, self.size, self.k, self.alpha, self.beta)
