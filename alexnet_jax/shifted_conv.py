"""CPU convolutions: on oneDNN where it can be built, else bfloat16 ones as matrix products.

``conv2d`` is what ``layers.Conv`` convolves with. On the CPU it hands float32 and bfloat16
convolutions to oneDNN (``onednn.py``: PyTorch's kernels, through an XLA FFI handler) unless
``cpu_convolutions="xla"`` or the handler cannot be built; those products, below, are the
bfloat16 path without it (and with ``xla``: exports, machines without a C++ compiler).

XLA:CPU (jax 0.10-0.11) converts a bfloat16 convolution to float32 and runs it at float32
speed, whatever its options; a bfloat16 *product* asked for a float32 result goes to a
library kernel that uses the CPU's bfloat16 matrix instructions (AMX, AVX512-BF16), several
times faster. ``conv2d`` writes a convolution as such products, forward and backward, without
building patches:

- The image is flattened to rows, one per pixel (``(N * Hp * Wp, C)``), with ``pad`` zero
  pixels before each image row and ``pad`` zero rows before each image (``Hp = H + pad``,
  ``Wp = W + pad``): a window that runs past a row's right edge (or an image's last row)
  reads the zeros that begin the next row (or image), so one gap pads both sides and the
  products cover about 12 % fewer rows than a fully padded image's (conv2-conv5). Kernel
  position ``(i, j)`` reads the row ``i * Wp + j`` further on, so the convolution is a sum of
  row-shifted products. Rows whose window runs on past the gap into the next row (or
  image) compute garbage that is cropped away.
- The kernel's ``kw`` columns go into the contraction: the rows ``t .. t + kw - 1`` side by
  side are one row of ``(N * Hp * Wp / kw, kw * C)`` when ``t`` steps by ``kw``, which is a
  reshape of a contiguous slice (no copy of overlapping windows). ``kw`` such products, one
  per phase ``t mod kw``, with every kernel row's weights side by side, give each kernel
  row's contribution at every row; per output phase, a fused sum of ``kh`` contiguous
  slices of them finishes it.
- The input gradient is the same convolution of the output gradient with the kernel turned
  by 180 degrees. The kernel gradient contracts over rows, with the output gradient
  transposed (``(C_out, rows)``) once per phase. XLA would fold a plain transpose into the
  product, and the library kernel takes no transposed operand, so the transpose is itself a
  product, with the identity (exact).
- Grouped convolutions (the paper's two towers) convolve each group alone and concatenate
  the results (XLA:CPU's grouped bfloat16 convolutions measured slowest of all). In float32
  too, ``conv2d`` convolves group by group on the CPU: XLA:CPU's gradient of a grouped
  convolution takes time in proportion to the number of groups.
- Strides become a stride-1 convolution of the space-to-depth image (conv1's 11x11 / 4 is a
  3x3 convolution of 4x4 blocks of 48 channels), forward only: the gradients of a strided
  convolution are XLA's own, which measured faster for conv1.
- Data movement runs on the raw 16 bits: XLA:CPU widens bfloat16 to float32 for every
  elementwise loop, which made the copies several times slower.

Every product accumulates in float32 and the result is rounded once to bfloat16, as
``lax.conv_general_dilated`` does on this backend (it computes in float32); the backward
rounds the cotangent to bfloat16 first, as mixed-precision training does. On other
platforms (GPU: cuDNN) ``conv2d`` is ``lax.conv_general_dilated``, chosen at lowering time
by ``lax.platform_dependent``. ``benchmarks/README.md`` has the measurements.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax import lax

from alexnet_jax import onednn


def _bits(x: jax.Array) -> jax.Array:
    return lax.bitcast_convert_type(x, jnp.uint16)


def _bf16(x: jax.Array) -> jax.Array:
    return lax.bitcast_convert_type(x, jnp.bfloat16)


def _product(a: jax.Array, b: jax.Array) -> jax.Array:
    """``a @ b`` of bfloat16 matrices (given as their bits), accumulated in float32."""
    return lax.dot_general(
        _bf16(a), _bf16(b), (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32
    )


def _transposed(bits: jax.Array) -> jax.Array:
    """The transpose of a bfloat16 matrix (given and returned as bits), as a product with the
    identity: exact, on the matrix units, and never folded into the product that consumes it.
    (A plain transpose is folded into that product as a transposed operand, which sends it
    off the fast kernel; a transpose fused with anything else runs far below memory speed.)
    A non-finite entry turns its whole row of the input into NaN in the result: the gradient
    is non-finite either way."""
    eye = jnp.eye(bits.shape[1], dtype=jnp.bfloat16)
    dims = (((1,), (1,)), ((), ()))
    t = lax.dot_general(eye, _bf16(bits), dims, preferred_element_type=jnp.float32)
    return _bits(t.astype(jnp.bfloat16))


def lax_conv2d(x, kernel, strides, padding, feature_group_count=1):
    """The reference: ``lax.conv_general_dilated`` on NHWC / HWIO."""
    return lax.conv_general_dilated(
        x,
        kernel,
        window_strides=tuple(strides),
        padding=[tuple(p) for p in padding],
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=feature_group_count,
    )


def conv2d(
    x: jax.Array,
    kernel: jax.Array,
    strides: Sequence[int] = (1, 1),
    padding: Sequence[Sequence[int]] = ((0, 0), (0, 0)),
    feature_group_count: int = 1,
    cpu_convolutions: str = "auto",
) -> jax.Array:
    """``lax.conv_general_dilated(x, kernel, strides, padding, ("NHWC", "HWIO", "NHWC"))``.

    On the CPU, float32 and bfloat16 convolutions run on oneDNN (``onednn.conv2d``) where
    ``cpu_convolutions`` (``config.cpu_convolutions``: auto | onednn | xla) allows it and the
    handler can be built. Otherwise bfloat16 convolutions with symmetric padding narrower
    than the kernel lower to matrix products on the CPU (see the module docstring; grouped
    ones group by group, the results side by side), and other grouped convolutions with more
    than one channel per group run on the CPU as one ``lax.conv_general_dilated`` per group
    (``_by_groups``). Everything else, and every other platform, takes
    ``lax.conv_general_dilated`` as it is.
    """
    strides = tuple(int(s) for s in strides)
    padding = tuple((int(lo), int(hi)) for lo, hi in padding)
    plain = functools.partial(
        lax_conv2d, strides=strides, padding=padding, feature_group_count=feature_group_count
    )
    if onednn.takes(cpu_convolutions, x, kernel, strides, padding, feature_group_count):
        on_cpu = functools.partial(
            onednn.conv2d,
            strides=strides,
            padding=padding,
            feature_group_count=feature_group_count,
        )
        return lax.platform_dependent(x, kernel, cpu=on_cpu, default=plain)
    if not _as_products(x, kernel, strides, padding, feature_group_count):
        if not _by_groups(x, kernel, feature_group_count):
            return plain(x, kernel)
        one_group = functools.partial(lax_conv2d, strides=strides, padding=padding)
        by_groups = functools.partial(_grouped, one_group=one_group, groups=feature_group_count)
        return lax.platform_dependent(x, kernel, cpu=by_groups, default=plain)
    if strides == (1, 1):
        one_group = functools.partial(_shifted, pad=(padding[0][0], padding[1][0]))
    else:
        one_group = functools.partial(_strided, strides=strides, padding=padding)
    products = functools.partial(_grouped, one_group=one_group, groups=feature_group_count)
    return lax.platform_dependent(x, kernel, cpu=products, default=plain)


def _grouped(x, kernel, one_group, groups):
    """Each group's channels convolved with its own filters, the results side by side."""
    if groups == 1:
        return one_group(x, kernel)
    channels, features = x.shape[-1] // groups, kernel.shape[-1] // groups
    outs = [
        one_group(
            x[..., g * channels : (g + 1) * channels],
            kernel[..., g * features : (g + 1) * features],
        )
        for g in range(groups)
    ]
    return jnp.concatenate(outs, axis=-1)


def _by_groups(x, kernel, feature_group_count) -> bool:
    """Whether XLA:CPU should convolve group by group: a grouped convolution with more than
    one channel per group. XLA:CPU's gradient of a grouped convolution takes time in proportion
    to the number of groups, several times one group's at a time; depthwise convolutions (one
    channel per group) it runs faster itself (``benchmarks/README.md``)."""
    return (
        x.ndim == 4
        and kernel.ndim == 4
        and feature_group_count > 1
        and kernel.shape[2] > 1
        and kernel.shape[2] * feature_group_count == x.shape[-1]
        and kernel.shape[-1] % feature_group_count == 0
    )


def _as_products(x, kernel, strides, padding, feature_group_count) -> bool:
    return (
        x.ndim == 4
        and kernel.ndim == 4
        and len(strides) == 2
        and x.dtype == jnp.bfloat16
        and kernel.dtype == jnp.bfloat16
        and feature_group_count >= 1
        and kernel.shape[-1] % feature_group_count == 0
        and kernel.shape[2] * feature_group_count == x.shape[-1]
        and len(padding) == 2
        and all(lo == hi for lo, hi in padding)
        and all(0 <= lo < k for (lo, _), k in zip(padding, kernel.shape[:2], strict=True))
        and all(s >= 1 for s in strides)
        and x.shape[1] + 2 * padding[0][0] >= kernel.shape[0]
        and x.shape[2] + 2 * padding[1][0] >= kernel.shape[1]
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _strided(x, kernel, strides, padding):
    return _space_to_depth(x, kernel, strides, padding)


def _strided_fwd(x, kernel, strides, padding):
    return _space_to_depth(x, kernel, strides, padding), (x, kernel)


def _strided_bwd(strides, padding, residuals, g):
    # XLA:CPU's own (float32) kernel gradient: for conv1 (3 input channels, 11x11 / 4) it
    # measured faster than products over the space-to-depth image, whose contraction runs
    # over every pixel with few columns.
    x, kernel = residuals
    _, pullback = jax.vjp(
        functools.partial(lax_conv2d, strides=strides, padding=padding), x, kernel
    )
    return pullback(g.astype(x.dtype))


_strided.defvjp(_strided_fwd, _strided_bwd)


def _space_to_depth(x, kernel, strides, padding):
    """A strided convolution as a stride-1 one of the space-to-depth image and kernel."""
    n, height, width, channels = x.shape
    kh, kw, _, features = kernel.shape
    sh, sw = strides
    out_h = (height + 2 * padding[0][0] - kh) // sh + 1
    out_w = (width + 2 * padding[1][0] - kw) // sw + 1
    bh, bw = -(-kh // sh), -(-kw // sw)  # the kernel in blocks
    rows, cols = (out_h - 1 + bh) * sh, (out_w - 1 + bw) * sw  # the image the blocks cover
    bits = jnp.pad(_bits(x), ((0, 0), padding[0], padding[1], (0, 0)))
    bits = bits[:, :rows, :cols]
    bits = jnp.pad(bits, ((0, 0), (0, rows - bits.shape[1]), (0, cols - bits.shape[2]), (0, 0)))
    k = jnp.pad(kernel, ((0, bh * sh - kh), (0, bw * sw - kw), (0, 0), (0, 0)))
    k = k.reshape(bh, sh, bw, sw, -1, features)
    k = jnp.transpose(k, (0, 2, 1, 3, 4, 5)).reshape(bh, bw, -1, features)
    return _shifted(_bf16(_blocks(bits, sh, sw)), k, (0, 0))


def _blocks(bits, sh, sw):
    """``(N, H, W, C)`` pixels (bits) as ``(N, H / sh, W / sw, sh * sw * C)``: each ``sh x sw``
    block's pixels side by side, row by row (the order of the kernel's blocks).

    A block's row (``sw * C`` values) is contiguous in the image and in the result, so when it
    has an even length the rearrangement moves 32-bit words: XLA:CPU copies a transpose
    element by element, and for conv1 (3 channels, batch 32) 16-bit elements took 4.4-5.5 ms
    against 2.6-3.6 for the words (11-12 ms when the image was padded as bfloat16, widened to
    float32; ``benchmarks/README.md``)."""
    n, height, width, channels = bits.shape
    unit = sw * channels
    words = unit % 2 == 0
    if words:
        bits = lax.bitcast_convert_type(bits.reshape(n, height, -1, 2), jnp.uint32)
    blocks = bits.reshape(n, height // sh, sh, width // sw, unit // 2 if words else unit)
    blocks = jnp.transpose(blocks, (0, 1, 3, 2, 4))
    if words:
        blocks = lax.bitcast_convert_type(blocks, jnp.uint16)  # each word's two halves, in order
    return blocks.reshape(n, height // sh, width // sw, sh * unit)


def _geometry(shape, kernel_shape, pad):
    """Height and width of one image's block of pixel rows, the number of pixel rows, the
    output rows per phase and the product rows per phase (enough for the furthest kernel
    row's shift).

    Each image row starts with ``pad[1]`` zero pixels and each image with ``pad[0]`` zero rows
    (``_rows``): a window that runs past a row's right edge reads the next row's leading zeros,
    one past the image's last row the next image's (or the final zeros), so one gap serves as
    both neighbours' padding and the products skip the other side's."""
    n, height, width, _ = shape
    kh, kw = kernel_shape[:2]
    hp, wp = height + pad[0], width + pad[1]
    rows = n * hp * wp
    out_per_phase = -(-rows // kw)
    per_phase = out_per_phase + (kw - 1 + (kh - 1) * wp) // kw + 1
    return hp, wp, rows, out_per_phase, per_phase


def _rows(x_bits, pad, total):
    """The image as (total, C) pixel rows, zeros before each row and each image (see
    ``_geometry``), then zeros."""
    x_bits = jnp.pad(x_bits, ((0, 0), (pad[0], 0), (pad[1], 0), (0, 0)))
    flat = x_bits.reshape(-1, x_bits.shape[-1])
    return jnp.pad(flat, ((0, total - flat.shape[0]), (0, 0)))


def _forward(x, kernel, pad):
    kh, kw, channels, features = kernel.shape
    n = x.shape[0]
    hp, wp, rows, out_per_phase, per_phase = _geometry(x.shape, kernel.shape, pad)
    flat = _rows(_bits(x), pad, kw * per_phase + kw)
    # weights[j * C + c, i * F + f] = kernel[i, j, c, f]
    weights = jnp.transpose(_bits(kernel), (1, 2, 0, 3)).reshape(kw * channels, kh * features)
    # phases[s][q, i * F + f] = sum over j of flat[kw * q + s + j] @ kernel[i, j]: what
    # kernel row i adds to the output pixel row kw * q + s - i * wp.
    phases = [
        _product(lax.slice_in_dim(flat, s, s + kw * per_phase).reshape(per_phase, -1), weights)
        for s in range(kw)
    ]
    # Output pixel row kw * q + s sums, per kernel row i, phase (s + i * wp) % kw at row
    # q + (s + i * wp) // kw: contiguous slices, so no interleaved copy of the products.
    outs = []
    for s in range(kw):
        total = 0
        for i in range(kh):
            offset, phase = divmod(s + i * wp, kw)
            block = (offset, i * features), (offset + out_per_phase, (i + 1) * features)
            total = total + lax.slice(phases[phase], *block)
        outs.append(_bits(total.astype(x.dtype)))
    out = jnp.stack(outs, axis=1).reshape(kw * out_per_phase, features)[:rows]
    out_h, out_w = x.shape[1] + 2 * pad[0] - kh + 1, x.shape[2] + 2 * pad[1] - kw + 1
    out = out.reshape(n, hp, wp, features)[:, :out_h, :out_w]
    return _bf16(out)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _shifted(x: jax.Array, kernel: jax.Array, pad: tuple[int, int]) -> jax.Array:
    return _forward(x, kernel, pad)


def _shifted_fwd(x, kernel, pad):
    return _forward(x, kernel, pad), (x, kernel)


def _shifted_bwd(pad, residuals, g):
    x, kernel = residuals
    kh, kw, channels, features = kernel.shape
    g = g.astype(x.dtype)
    # Input gradient: the "full" convolution of g with the kernel turned by 180 degrees.
    turned = _bf16(jnp.transpose(_bits(kernel)[::-1, ::-1], (0, 1, 3, 2)))
    d_x = _forward(g, turned, (kh - 1 - pad[0], kw - 1 - pad[1]))
    # Kernel gradient: d_kernel[i, j] = sum over pixel rows r of flat[r + i * wp + j] (x) g[r].
    hp, wp, rows, per_phase, _ = _geometry(x.shape, kernel.shape, pad)
    out_h, out_w = g.shape[1:3]
    g_rows = jnp.pad(_bits(g), ((0, 0), (0, hp - out_h), (0, wp - out_w), (0, 0)))
    g_rows = jnp.pad(g_rows.reshape(rows, features), ((0, kw * per_phase - rows), (0, 0)))
    g_rows = g_rows.reshape(per_phase, kw, features)
    flat = _rows(_bits(x), pad, (kh - 1) * wp + kw * per_phase + kw)
    g_t = [_transposed(g_rows[:, s, :]) for s in range(kw)]  # phase s: rows s, s + kw, ...
    per_kernel_row = []
    for i in range(kh):
        total = 0
        for s in range(kw):
            start = i * wp + s
            windows = lax.slice_in_dim(flat, start, start + kw * per_phase)
            total = total + _product(g_t[s], windows.reshape(per_phase, -1))  # [f, j * C + c]
        per_kernel_row.append(total)
    d_kernel = jnp.stack(per_kernel_row).reshape(kh, features, kw, channels)
    d_kernel = jnp.transpose(d_kernel, (0, 2, 3, 1))
    return d_x, d_kernel.astype(kernel.dtype)


_shifted.defvjp(_shifted_fwd, _shifted_bwd)
