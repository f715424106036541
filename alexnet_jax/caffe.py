"""BVLC's Caffe AlexNet (``bvlc_alexnet.caffemodel``), the paper's own layout with trained
weights, read from its protobuf without Caffe or protoc.

    python -m alexnet_jax.convert --from caffe bvlc_alexnet.caffemodel --workdir runs/caffe \
        [--mean_file imagenet_mean.binaryproto]

A ``.caffemodel`` is a ``NetParameter`` message (caffe.proto): its layers in ``layer``
(field 100, ``LayerParameter``) or, in older files, ``layers`` (field 2,
``V1LayerParameter``); each layer's weights are ``BlobProto``s. The message is decoded here
from the protobuf wire format; float arrays are read as whole numpy buffers.

Caffe's conventions, made explicit in the conversion:

- input: BGR, 0-255, minus a mean pixel (104, 117, 123) or a mean image. conv1's input
  channels are reversed, so the converted model takes RGB like every model here, and the
  mean becomes ``normalization="mean"`` (RGB) or ``"mean_image"`` (``--mean_file``).
- LRN: ``b = a / (k + alpha / n * sum a^2) ** beta`` with k=1: ours is alpha / n, k as read
  from the file's ``lrn_param``.
- towers: conv2, conv4, conv5 with ``group: 2`` are ``groups=2``; the file's ``group`` is
  checked.
- fc6: Caffe flattens pool5 as (channels, height, width); our rows are (height, width,
  channels), so they are permuted.
- pooling: Caffe rounds pooled sizes up, XLA down; at 227 both give 55 -> 27 -> 13 -> 6, so
  the converted model runs at 227 exactly as Caffe does (tested).
- Caffe's own preprocessing resized the whole image to 256x256 (not its central square) and
  cropped 227; the converted workdir uses ours (central square to 256, center 227).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import numpy as np

from alexnet_jax.errors import CheckpointError, MissingCheckpointError

LAYERS = ("conv1", "conv2", "conv3", "conv4", "conv5", "fc6", "fc7", "fc8")
# (out, in / group, h, w) for convolutions, (out, in) for inner products
CAFFE_SHAPES = {
    "conv1": (96, 3, 11, 11),
    "conv2": (256, 48, 5, 5),
    "conv3": (384, 256, 3, 3),
    "conv4": (384, 192, 3, 3),
    "conv5": (256, 192, 3, 3),
    "fc6": (4096, 9216),
    "fc7": (4096, 4096),
    "fc8": (None, 4096),
}
GROUPS = {"conv2": 2, "conv4": 2, "conv5": 2}
POOL5 = (256, 6, 6)  # (channels, height, width) of pool5 at 227
MEAN_BGR = (104.0, 117.0, 123.0)  # Caffe's ImageNet mean pixel

# --- the protobuf wire format ---------------------------------------------------------------------

VARINT, FIXED64, BYTES, FIXED32 = 0, 1, 2, 5


def _varint(data: memoryview, i: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        byte = data[i]
        i += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, i
        shift += 7


def fields(data: bytes | memoryview) -> Iterator[tuple[int, int, Any, int]]:
    """``(field number, wire type, value, position)`` of a message's fields, in order; a
    length-delimited value is a memoryview of its bytes, a fixed one its raw bytes."""
    data = memoryview(data)
    i, end = 0, len(data)
    while i < end:
        key, i = _varint(data, i)
        number, wire = key >> 3, key & 7
        start = i
        if wire == VARINT:
            value, i = _varint(data, i)
        elif wire == FIXED64:
            value, i = data[i : i + 8], i + 8
        elif wire == BYTES:
            length, i = _varint(data, i)
            value, i = data[i : i + length], i + length
        elif wire == FIXED32:
            value, i = data[i : i + 4], i + 4
        else:
            raise CheckpointError(f"not a protobuf message (wire type {wire} at byte {start})")
        if i > end:
            raise CheckpointError("the protobuf message is cut short (a torn download?)")
        yield number, wire, value, start


def _packed_varints(value: memoryview) -> list[int]:
    out, i = [], 0
    while i < len(value):
        number, i = _varint(value, i)
        out.append(number)
    return out


def read_blob(message: memoryview) -> np.ndarray:
    """A ``BlobProto`` as a float32 array of its shape (``shape`` or legacy num/channels/
    height/width, leading 1s of the legacy form dropped)."""
    shape: list[int] = []
    legacy = {1: 0, 2: 0, 3: 0, 4: 0}
    chunks: list[np.ndarray] = []
    singles: list[float] = []
    for number, wire, value, _ in fields(message):
        if number == 7:  # shape: BlobShape { repeated int64 dim = 1 [packed] }
            for dim_number, dim_wire, dim, _ in fields(value):
                if dim_number == 1:
                    shape += _packed_varints(dim) if dim_wire == BYTES else [dim]
        elif number in legacy and wire == VARINT:
            legacy[number] = value
        elif number == 5 and wire == BYTES:  # data, packed floats
            chunks.append(np.frombuffer(value, "<f4"))
        elif number == 5 and wire == FIXED32:  # data, unpacked (old writers)
            singles.append(float(np.frombuffer(value, "<f4")[0]))
        elif number == 8 and wire == BYTES:  # double_data
            chunks.append(np.frombuffer(value, "<f8").astype(np.float32))
    if singles:
        chunks.append(np.asarray(singles, np.float32))
    values = np.concatenate(chunks) if chunks else np.zeros(0, np.float32)
    if not shape:
        shape = [legacy[1], legacy[2], legacy[3], legacy[4]]
        while len(shape) > 1 and shape[0] == 1:
            shape = shape[1:]
    if int(np.prod(shape)) != values.size:
        raise CheckpointError(f"a blob of shape {shape} holds {values.size} values")
    return values.reshape(shape).astype(np.float32)


def read_caffemodel(path: str) -> dict[str, dict[str, Any]]:
    """Each named layer of a ``.caffemodel``: ``{"blobs": [arrays], "group": int, "lrn":
    {...}, "pool": {...}}`` (the parameters AlexNet's conversion checks)."""
    if not os.path.isfile(path):
        raise MissingCheckpointError(f"No such .caffemodel file: {path!r}")
    with open(path, "rb") as f:
        data = f.read()
    layers: dict[str, dict[str, Any]] = {}
    try:
        for number, wire, value, _ in fields(data):
            if wire != BYTES or number not in (100, 2):
                continue
            # LayerParameter: name 1, blobs 7, convolution 106, lrn 118, pooling 121;
            # V1LayerParameter: name 4, blobs 6, convolution 10, lrn 18, pooling 19.
            ids = (1, 7, 106, 118, 121) if number == 100 else (4, 6, 10, 18, 19)
            layer = _read_layer(value, *ids)
            if layer["name"]:
                layers[layer["name"]] = layer
    except (IndexError, ValueError) as error:
        raise CheckpointError(f"{path!r} is not a readable .caffemodel: {error}") from error
    except CheckpointError as error:
        raise CheckpointError(f"{path!r} is not a readable .caffemodel: {error}") from error
    if not layers:
        raise CheckpointError(f"{path!r} holds no Caffe layers: not a .caffemodel?")
    return layers


def _read_layer(message, name_id, blobs_id, conv_id, lrn_id, pool_id) -> dict[str, Any]:
    layer: dict[str, Any] = {"name": "", "blobs": [], "group": 1, "lrn": None, "pool": None}
    for number, wire, value, _ in fields(message):
        if number == name_id and wire == BYTES:
            layer["name"] = bytes(value).decode("utf-8", errors="replace")
        elif number == blobs_id and wire == BYTES:
            layer["blobs"].append(read_blob(value))
        elif number == conv_id and wire == BYTES:
            layer["group"] = next((v for n, w, v, _ in fields(value) if n == 5), 1)
        elif number == lrn_id and wire == BYTES:
            lrn = {"local_size": 5, "alpha": 1.0, "beta": 0.75, "k": 1.0, "region": 0}
            for n, w, v, _ in fields(value):
                if n == 1:
                    lrn["local_size"] = v
                elif n in (2, 3, 5) and w == FIXED32:
                    lrn[{2: "alpha", 3: "beta", 5: "k"}[n]] = float(np.frombuffer(v, "<f4")[0])
                elif n == 4:
                    lrn["region"] = v
            layer["lrn"] = lrn
        elif number == pool_id and wire == BYTES:
            pool = {"pool": 0, "kernel_size": 0, "stride": 1, "pad": 0}
            names = {1: "pool", 2: "kernel_size", 3: "stride", 4: "pad"}
            for n, w, v, _ in fields(value):
                if n in names and w == VARINT:
                    pool[names[n]] = v
            layer["pool"] = pool
    return layer


def read_mean_file(path: str, crop: int = 227) -> np.ndarray:
    """Caffe's ``imagenet_mean.binaryproto`` (a BlobProto, (1, 3, 256, 256), BGR) as the
    RGB mean image of the center ``crop`` (H, W, 3)."""
    if not os.path.isfile(path):
        raise MissingCheckpointError(f"No such mean file: {path!r}")
    with open(path, "rb") as f:
        blob = read_blob(memoryview(f.read()))
    if blob.ndim == 4:
        blob = blob[0]
    if blob.ndim != 3 or blob.shape[0] != 3 or min(blob.shape[1:]) < crop:
        raise CheckpointError(f"{path!r} holds a blob of shape {blob.shape}, not a BGR mean image")
    image = blob[::-1].transpose(1, 2, 0)  # BGR (C, H, W) -> RGB (H, W, C)
    top, left = (image.shape[0] - crop) // 2, (image.shape[1] - crop) // 2
    return np.ascontiguousarray(image[top : top + crop, left : left + crop], np.float32)


# --- into our model -----------------------------------------------------------------------------


def caffe_to_flax(layers: dict[str, dict[str, Any]]) -> tuple[dict[str, Any], dict[str, float]]:
    """``({"params": ...}, lrn constants in our convention)`` for ``AlexNet(variant="paper",
    groups=2)`` taking RGB input. Every layer, shape, group and LRN or pooling setting that
    does not match the paper's network is a ``CheckpointError`` naming it."""
    missing = [name for name in LAYERS if name not in layers]
    if missing:
        raise CheckpointError(
            f"The .caffemodel has no layer {missing} (it has {sorted(layers)[:12]}): not "
            "BVLC's AlexNet"
        )
    params: dict[str, Any] = {}
    for name in LAYERS:
        layer = layers[name]
        if len(layer["blobs"]) != 2:
            raise CheckpointError(f"Caffe layer {name!r} has {len(layer['blobs'])} blobs, not 2")
        weight, bias = layer["blobs"]
        expected = CAFFE_SHAPES[name]
        if weight.ndim != len(expected) or any(
            e is not None and e != g for e, g in zip(expected, weight.shape, strict=True)
        ):
            raise CheckpointError(f"Caffe layer {name!r} weight has shape {weight.shape}, "
                                  f"expected {expected}")  # fmt: skip
        if bias.shape != (weight.shape[0],):
            raise CheckpointError(f"Caffe layer {name!r} bias has shape {bias.shape}")
        if layer["group"] != GROUPS.get(name, 1) and weight.ndim == 4:
            raise CheckpointError(f"Caffe layer {name!r} has group {layer['group']}, "
                                  f"expected {GROUPS.get(name, 1)}")  # fmt: skip
        if not (np.all(np.isfinite(weight)) and np.all(np.isfinite(bias))):
            raise CheckpointError(f"Caffe layer {name!r} holds NaN or infinite values")
        if weight.ndim == 4:
            if name == "conv1":
                weight = weight[:, ::-1]  # BGR input channels -> RGB
            kernel = weight.transpose(2, 3, 1, 0)  # OIHW -> HWIO
        else:
            if name == "fc6":  # rows (c, h, w) in Caffe, (h, w, c) here
                weight = weight.reshape((weight.shape[0],) + POOL5).transpose(0, 2, 3, 1)
                weight = weight.reshape(weight.shape[0], -1)
            kernel = weight.T
        params[name] = {"kernel": np.ascontiguousarray(kernel), "bias": bias}
    return {"params": params}, _lrn_constants(layers)


def _lrn_constants(layers: dict[str, dict[str, Any]]) -> dict[str, float]:
    """The LRN of norm1 (and norm2, which must agree), in our convention (alpha / size)."""
    found = [layers[n]["lrn"] for n in ("norm1", "norm2") if n in layers and layers[n]["lrn"]]
    lrn = found[0] if found else {"local_size": 5, "alpha": 1e-4, "beta": 0.75, "k": 1.0,
                                  "region": 0}  # fmt: skip
    if any(f != lrn for f in found):
        raise CheckpointError(f"norm1 and norm2 differ: {found}")
    if lrn["region"] != 0:
        raise CheckpointError("the .caffemodel's LRN is WITHIN_CHANNEL; AlexNet's is across")
    for name in ("pool1", "pool2", "pool5"):
        pool = layers.get(name, {}).get("pool")
        if pool and (pool["pool"], pool["kernel_size"], pool["stride"], pool["pad"]) != (
            0, 3, 2, 0):  # fmt: skip
            raise CheckpointError(f"Caffe layer {name!r} pools {pool}; AlexNet's is MAX 3/2")
    size = int(lrn["local_size"])
    return {"lrn_size": size, "lrn_k": float(lrn["k"]), "lrn_alpha": float(lrn["alpha"]) / size,
            "lrn_beta": float(lrn["beta"])}  # fmt: skip
