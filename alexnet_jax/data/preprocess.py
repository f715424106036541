"""The paper's preprocessing and augmentation as small TensorFlow ops (for tf.data).

Training (section 4.1): take the central square of the image and rescale it to 256x256
(the paper's "shorter side to 256, then the central 256x256 patch"), then a random
227x227 crop, a random horizontal flip and fancy-PCA lighting. Evaluation: the center crop,
or ten crops (four corners and the center, and their mirrors). A single crop is resampled
straight from the square (``resized_crop``): the same pixels as resizing to 256 and
cropping, without computing the 256x256 image. Random ops are stateless, seeded per
example, so the order and the augmentation depend only on the seeds given.

Import this module only inside the input pipeline: it imports TensorFlow.
"""

from __future__ import annotations

import tensorflow as tf

from alexnet_jax.data.augment import PCA_EIGVAL, PCA_EIGVEC
from alexnet_jax.data.images import MAX_PIXELS


def central_square_window(height: tf.Tensor, width: tf.Tensor) -> tf.Tensor:
    """[y, x, side, side] of the largest centered square in an image of that size."""
    side = tf.minimum(height, width)
    return tf.stack([(height - side) // 2, (width - side) // 2, side, side])


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _unsigned(contents: tf.Tensor, offset: int, length: int, big_endian: bool = False):
    """The unsigned integer in ``length`` bytes of ``contents`` at ``offset`` (int64). A file
    too short for it is an error, which the pipeline reports as a failed decode."""
    raw = tf.io.decode_raw(tf.strings.substr(contents, offset, length), tf.uint8)
    digits = tf.cast(tf.ensure_shape(raw, [length]), tf.int64)
    weights = [256**i for i in range(length)]
    return tf.reduce_sum(digits * tf.constant(weights[::-1] if big_endian else weights, tf.int64))


def _starts_with(contents: tf.Tensor, offset: int, magic: bytes) -> tf.Tensor:
    """Whether ``contents`` holds ``magic`` at ``offset`` (False when it is too short)."""
    head = tf.strings.join([tf.strings.substr(contents, 0, offset + len(magic)), b"\0" * 16])
    return tf.equal(tf.strings.substr(head, offset, len(magic)), magic)


def is_webp(contents: tf.Tensor) -> tf.Tensor:
    """Whether ``contents`` starts as a WebP file does (``RIFF``, 4 bytes, ``WEBP``)."""
    return tf.logical_and(_starts_with(contents, 0, b"RIFF"), _starts_with(contents, 8, b"WEBP"))


def encoded_size(contents: tf.Tensor) -> tf.Tensor:
    """[height, width] of an encoded JPEG, PNG, GIF, BMP or WebP read from its header,
    without decoding it; [0, 0] for other formats."""

    def png() -> tf.Tensor:  # IHDR: width, then height, 4 big-endian bytes each
        width = _unsigned(contents, 16, 4, big_endian=True)
        return tf.stack([_unsigned(contents, 20, 4, big_endian=True), width])

    def jpeg() -> tf.Tensor:
        return tf.cast(tf.image.extract_jpeg_shape(contents)[:2], tf.int64)

    def gif() -> tf.Tensor:  # the logical screen: width, height, 2 little-endian bytes each
        return tf.stack([_unsigned(contents, 8, 2), _unsigned(contents, 6, 2)])

    def bmp() -> tf.Tensor:
        def core() -> tf.Tensor:  # BITMAPCOREHEADER (12 bytes): 16-bit width and height
            return tf.stack([_unsigned(contents, 20, 2), _unsigned(contents, 18, 2)])

        def info() -> tf.Tensor:  # signed 32-bit; a negative height is a top-down image
            signed = tf.stack([_unsigned(contents, 22, 4), _unsigned(contents, 18, 4)])
            return tf.abs(tf.where(signed >= 2**31, signed - 2**32, signed))

        return tf.cond(tf.equal(_unsigned(contents, 14, 4), 12), core, info)

    def webp() -> tf.Tensor:  # RIFF....WEBP, then the first chunk's header
        def lossy() -> tf.Tensor:  # "VP8 ": 14-bit width and height after the start code
            return tf.bitwise.bitwise_and(
                tf.stack([_unsigned(contents, 28, 2), _unsigned(contents, 26, 2)]), 0x3FFF
            )

        def lossless() -> tf.Tensor:  # "VP8L": 14 bits of width - 1, then of height - 1
            bits = _unsigned(contents, 21, 4)
            width = tf.bitwise.bitwise_and(bits, 0x3FFF) + 1
            height = tf.bitwise.bitwise_and(tf.bitwise.right_shift(bits, 14), 0x3FFF) + 1
            return tf.stack([height, width])

        def extended() -> tf.Tensor:  # "VP8X": the canvas, 24 bits of width - 1, height - 1
            return tf.stack([_unsigned(contents, 27, 3) + 1, _unsigned(contents, 24, 3) + 1])

        chunk = tf.strings.substr(contents, 12, 4)
        return tf.case(
            [(tf.equal(chunk, b"VP8 "), lossy), (tf.equal(chunk, b"VP8L"), lossless)],
            default=extended,
        )

    is_gif = tf.logical_or(
        _starts_with(contents, 0, b"GIF87a"), _starts_with(contents, 0, b"GIF89a")
    )
    return tf.case(
        [
            (_starts_with(contents, 0, PNG_SIGNATURE), png),
            (tf.io.is_jpeg(contents), jpeg),
            (is_gif, gif),
            (_starts_with(contents, 0, b"BM"), bmp),
            (is_webp(contents), webp),
        ],
        default=lambda: tf.zeros([2], tf.int64),
    )


def decode_central_square(contents: tf.Tensor, channels: int) -> tf.Tensor:
    """Decodes an encoded image (JPEG, PNG, GIF, BMP, WebP) and keeps its central square, uint8
    (side, side, channels).

    An image of more than ``MAX_PIXELS`` pixels (by its header) is an error before it is
    decoded: the pipeline drops it and names it, instead of decoding gigabytes.

    The whole image is decoded, then sliced: TensorFlow's fused ``decode_and_crop_jpeg``
    decodes fewer pixels but measured slower on photographs (``benchmarks/README.md``).
    """
    height, width = tf.unstack(encoded_size(contents))
    too_large = tf.debugging.assert_less_equal(
        height * width,
        tf.constant(MAX_PIXELS, tf.int64),
        message=f"image larger than {MAX_PIXELS:,} pixels",
    )

    def jpeg_or_png() -> tf.Tensor:  # their decoders convert to any channel count
        return tf.io.decode_image(contents, channels=channels, expand_animations=False)

    def other() -> tf.Tensor:  # GIF, BMP, WebP: decoded as stored, then converted
        return to_channels(tf.io.decode_image(contents, channels=0, expand_animations=False))

    def to_channels(image: tf.Tensor) -> tf.Tensor:  # 1, 3 or 4 channels -> ``channels``
        image = image[..., :3]  # alpha dropped, as TensorFlow's PNG decoder drops it
        stored = tf.shape(image)[-1]
        if channels == 3:
            return tf.cond(tf.equal(stored, 1), lambda: tf.tile(image, [1, 1, 3]), lambda: image)

        def gray() -> tf.Tensor:
            return tf.image.rgb_to_grayscale(tf.ensure_shape(image, [None, None, 3]))

        return tf.cond(tf.equal(stored, 3), gray, lambda: image)

    is_jpeg_or_png = tf.logical_or(
        tf.io.is_jpeg(contents), _starts_with(contents, 0, PNG_SIGNATURE)
    )
    with tf.control_dependencies([too_large]):
        image = tf.cond(is_jpeg_or_png, jpeg_or_png, other)
    shape = tf.shape(image)
    y, x, side, _ = tf.unstack(central_square_window(shape[0], shape[1]))
    image = image[y : y + side, x : x + side]
    image.set_shape([None, None, channels])
    return image


def resize(image: tf.Tensor, size: int) -> tf.Tensor:
    """Bilinear (antialiased) resize to size x size, float32 in the input's 0-255 range."""
    return tf.image.resize(tf.cast(image, tf.float32), [size, size], antialias=True)


def resized_crop(image: tf.Tensor, resize_size: int, size: int, offset: tf.Tensor) -> tf.Tensor:
    """The size x size window at ``offset`` ([y, x]) of ``resize(image, resize_size)``, float32.

    One antialiased bilinear resampling of a square image, straight into the window: what
    ``tf.image.resize(..., antialias=True)`` computes for those pixels (the same triangle
    kernel, sampling positions and edge weights, equal up to float rounding, ~1e-6 relative),
    without the rest of the resized image or the copy of the crop. Takes uint8 or float.
    """
    scale = resize_size / tf.cast(tf.shape(image)[0], tf.float32)
    return tf.raw_ops.ScaleAndTranslate(
        images=image[None],
        size=[size, size],
        scale=tf.stack([scale, scale]),
        translation=-tf.cast(offset, tf.float32),
        kernel_type="triangle",
        antialias=True,
    )[0]


def random_crop_offset(height, width, size: int, seed: tf.Tensor) -> tf.Tensor:
    """[y, x] of a size x size window, uniform over the positions inside height x width:
    the offset ``tf.image.stateless_random_crop`` draws for that seed."""
    limit = tf.stack([height - size + 1, width - size + 1, 1])
    offset = tf.random.stateless_uniform([3], seed, maxval=tf.int32.max, dtype=tf.int32) % limit
    return offset[:2]


def center_offset(resize_size: int, size: int) -> tf.Tensor:
    """[y, x] of the centered size x size window of a resize_size x resize_size image."""
    return tf.fill([2], (resize_size - size) // 2)


def random_flip(image: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
    """Mirrors the image left-right with probability 1/2."""
    return tf.image.stateless_random_flip_left_right(image, seed=seed)


def pca_lighting(image: tf.Tensor, std: float, seed: tf.Tensor) -> tf.Tensor:
    """Fancy-PCA lighting: adds eigvec @ (alpha * eigval) to every pixel, alpha ~ N(0, std).

    The image is RGB in 0-255, so the shift is scaled by 255 (the statistics are for [0, 1]).
    One alpha per image per use, as in the paper.
    """
    alpha = tf.random.stateless_normal([3], seed=seed, stddev=std)
    shift = tf.linalg.matvec(tf.constant(PCA_EIGVEC), alpha * tf.constant(PCA_EIGVAL))
    return image + 255.0 * shift


def ten_crops(image: tf.Tensor, size: int) -> tf.Tensor:
    """(10, size, size, C): four corners and the center, then the same five mirrored."""
    height, width = tf.shape(image)[0], tf.shape(image)[1]
    offsets = [
        (0, 0),
        (0, width - size),
        (height - size, 0),
        (height - size, width - size),
        ((height - size) // 2, (width - size) // 2),
    ]
    crops = [tf.image.crop_to_bounding_box(image, y, x, size, size) for y, x in offsets]
    crops += [tf.image.flip_left_right(crop) for crop in crops]
    return tf.stack(crops)


def to_uint8(image: tf.Tensor) -> tf.Tensor:
    """Rounds and clips to uint8: 4x fewer bytes to the device, normalized there."""
    return tf.cast(tf.clip_by_value(tf.round(image), 0.0, 255.0), tf.uint8)


def preprocess_for_train(
    contents: tf.Tensor,
    seed: tf.Tensor,
    *,
    image_size: int,
    resize_size: int,
    channels: int,
    crop: bool,
    flip: bool,
    lighting_std: float,
) -> tf.Tensor:
    """Encoded image -> augmented uint8 (image_size, image_size, channels)."""
    crop_seed, flip_seed, light_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 3))
    if crop:
        offset = random_crop_offset(resize_size, resize_size, image_size, crop_seed)
    else:
        offset = center_offset(resize_size, image_size)
    image = resized_crop(decode_central_square(contents, channels), resize_size, image_size, offset)
    if lighting_std > 0 and channels == 3:
        image = pca_lighting(image, lighting_std, light_seed)
    image = to_uint8(image)
    # A mirror commutes with the per-pixel ops above; on uint8 it moves 4x fewer bytes.
    return random_flip(image, flip_seed) if flip else image


def preprocess_for_eval(
    contents: tf.Tensor, *, image_size: int, resize_size: int, channels: int, crops: int
) -> tf.Tensor:
    """Encoded image -> uint8 center crop (S, S, C), or ten crops (10, S, S, C)."""
    square = decode_central_square(contents, channels)
    if crops == 10:  # rounded once, before the crops and mirrors (they commute)
        return ten_crops(to_uint8(resize(square, resize_size)), image_size)
    offset = center_offset(resize_size, image_size)
    return to_uint8(resized_crop(square, resize_size, image_size, offset))
