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


def encoded_size(contents: tf.Tensor) -> tf.Tensor:
    """[height, width] of an encoded JPEG or PNG read from its header, without decoding it;
    [0, 0] for other formats."""

    def png() -> tf.Tensor:  # IHDR: width, then height, 4 big-endian bytes each
        header = tf.cast(tf.io.decode_raw(tf.strings.substr(contents, 16, 8), tf.uint8), tf.int64)
        values = tf.reshape(header, [2, 4]) * tf.constant([2**24, 2**16, 2**8, 1], tf.int64)
        width, height = tf.unstack(tf.reduce_sum(values, axis=1))
        return tf.stack([height, width])

    def jpeg() -> tf.Tensor:
        return tf.cast(tf.image.extract_jpeg_shape(contents)[:2], tf.int64)

    is_png = tf.equal(tf.strings.substr(contents, 0, 8), PNG_SIGNATURE)
    return tf.case(
        [(is_png, png), (tf.io.is_jpeg(contents), jpeg)],
        default=lambda: tf.zeros([2], tf.int64),
    )


def decode_central_square(contents: tf.Tensor, channels: int) -> tf.Tensor:
    """Decodes an encoded image (JPEG, PNG, GIF, BMP) and keeps its central square, uint8
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
    with tf.control_dependencies([too_large]):
        image = tf.io.decode_image(contents, channels=channels, expand_animations=False)
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
