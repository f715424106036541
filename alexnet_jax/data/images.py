"""Image files without TensorFlow: decode any image Pillow reads to uint8, take the central
square and resize it, encode and decode JPEG records. Used to prepare records
(``alexnet_jax.data.prepare``) and to read them back (``alexnet_jax.data.records``).

Decoding follows TensorFlow's ``decode_image`` (the tf.data path's): 16-bit images keep
their high byte, alpha is dropped, palettes and CMYK become RGB, grayscale is replicated
for 3 channels, EXIF orientation is ignored. Images over ``MAX_PIXELS`` are refused with a
``DataError`` naming the file rather than decoded into gigabytes.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
import simplejpeg
from PIL import Image, UnidentifiedImageError

from alexnet_jax.errors import DataError

MAX_PIXELS = Image.MAX_IMAGE_PIXELS or 89_478_485  # Pillow's own limit (about 9,500 x 9,500)
SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")


def decode(source: str | bytes, channels: int = 3, name: str | None = None) -> np.ndarray:
    """A file's path or encoded bytes -> uint8 (H, W, channels). ``name`` names the image in
    errors (default: the path)."""
    name = name or (source if isinstance(source, str) else "<bytes>")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            opened = Image.open(source if isinstance(source, str) else io.BytesIO(source))
            with opened as image:
                width, height = image.size
                if width * height > MAX_PIXELS:
                    raise DataError(
                        f"Image {name!r} is {width}x{height} pixels, over the "
                        f"{MAX_PIXELS:,}-pixel limit: resize it or leave it out"
                    )
                image.load()
                return to_uint8(image, channels)
    except DataError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise DataError(
            f"Image {name!r} is over the {MAX_PIXELS:,}-pixel limit: resize it or leave it out "
            f"({error})"
        ) from error
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as error:
        raise DataError(f"Cannot read image {name!r}: {error}") from error


def to_uint8(image: Image.Image, channels: int) -> np.ndarray:
    """A loaded PIL image as uint8 (H, W, channels), converted as TensorFlow does."""
    if image.mode in SIXTEEN_BIT_MODES:
        pixels = (np.asarray(image).astype(np.uint32) >> 8).clip(0, 255).astype(np.uint8)
        gray = pixels[..., None]
        return np.repeat(gray, 3, axis=-1) if channels == 3 else gray
    if channels == 1:
        return np.asarray(image.convert("L"))[..., None]
    return np.asarray(image.convert("RGB"))


def central_square(pixels: np.ndarray) -> np.ndarray:
    """The largest centered square of an (H, W, C) image."""
    height, width = pixels.shape[:2]
    side = min(height, width)
    top, left = (height - side) // 2, (width - side) // 2
    return pixels[top : top + side, left : left + side]


def resize_square(pixels: np.ndarray, size: int) -> np.ndarray:
    """A square (S, S, C) uint8 image resized to (size, size, C), antialiased bilinear."""
    if pixels.shape[0] == size:
        return pixels
    mode = "L" if pixels.shape[-1] == 1 else "RGB"
    image = Image.fromarray(pixels[..., 0] if mode == "L" else pixels, mode)
    out = np.asarray(image.resize((size, size), Image.Resampling.BILINEAR))
    return out[..., None] if mode == "L" else out


def paper_square(source: str | bytes, size: int, channels: int = 3, name: str | None = None):
    """The paper's preparation of one image (section 2): decoded, its central square resized
    to ``size`` x ``size`` (the shorter side to ``size``, then the central patch)."""
    return resize_square(central_square(decode(source, channels, name)), size)


def encode_jpeg(pixels: np.ndarray, quality: int) -> bytes:
    """uint8 (H, W, C) -> baseline JPEG bytes (4:2:0 chroma for RGB)."""
    colorspace = "GRAY" if pixels.shape[-1] == 1 else "RGB"
    return simplejpeg.encode_jpeg(
        np.ascontiguousarray(pixels), quality=quality, colorspace=colorspace
    )


def decode_jpeg(data: bytes, channels: int) -> np.ndarray:
    """A record's JPEG bytes -> uint8 (H, W, channels), with libjpeg-turbo (releases the GIL)."""
    if channels == 1:
        return simplejpeg.decode_jpeg(data, colorspace="GRAY")
    return simplejpeg.decode_jpeg(data, colorspace="RGB")
