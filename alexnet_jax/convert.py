"""Pretrained AlexNets in Flax, and a workdir that eval, predict, export and fine-tuning use.

    python -m alexnet_jax.convert alexnet-owt-7be5be79.pth --workdir runs/torchvision
    python -m alexnet_jax.convert bvlc_alexnet.caffemodel --workdir runs/caffe \
        [--mean_file imagenet_mean.binaryproto]
    python main.py --mode=eval --workdir runs/torchvision \
        --config.data_dir=/path/to/tensorflow_datasets

torchvision's (``torchvision_to_flax``): its ``features.{0,3,6,8,10}`` are conv1..conv5 and
``classifier.{1,4,6}`` fc6, fc7, fc8, in the "one weird trick" layout
(``variant="torchvision"``). Conv kernels go from (out, in, h, w) to (h, w, in, out), dense
kernels from (out, in) to (in, out). fc6 needs more: torchvision flattens its 256x6x6
features in NCHW order (c, h, w), this model in NHWC order (h, w, c), so fc6's input rows
are permuted. torchvision expects images normalized with ImageNet's mean and std in [0, 1]
units (``config.input.normalization="mean_std"``).

BVLC's Caffe AlexNet (``alexnet_jax.caffe``) is the paper's own layout, two towers and LRN
(``variant="paper"``, ``groups=2``), with Caffe's conventions made explicit there.
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import json
import os
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from absl import logging

from alexnet_jax import caffe, checkpointing, normalization
from alexnet_jax.defaults import default_config
from alexnet_jax.errors import (
    CheckpointError,
    ConfigError,
    MissingCheckpointError,
    one_line_errors,
)
from alexnet_jax.files import atomic_write
from alexnet_jax.run_files import template_state, write_run_files

CONVS = {"conv1": "features.0", "conv2": "features.3", "conv3": "features.6",
         "conv4": "features.8", "conv5": "features.10"}  # fmt: skip
DENSES = {"fc6": "classifier.1", "fc7": "classifier.4", "fc8": "classifier.6"}
# torchvision's AlexNet, (out, in, ...) as PyTorch stores them; fc8's rows are the classes.
TORCH_SHAPES = {
    "features.0.weight": (64, 3, 11, 11),
    "features.3.weight": (192, 64, 5, 5),
    "features.6.weight": (384, 192, 3, 3),
    "features.8.weight": (256, 384, 3, 3),
    "features.10.weight": (256, 256, 3, 3),
    "classifier.1.weight": (4096, 256 * 6 * 6),
    "classifier.4.weight": (4096, 4096),
    "classifier.6.weight": (None, 4096),  # any number of classes
}
POOLED = (256, 6, 6)  # what torchvision's avgpool hands to fc6: (channels, height, width)


def _array(value: Any, key: str) -> np.ndarray:
    """A tensor or array of any float type (bfloat16 and float16 included) as float32."""
    if hasattr(value, "detach"):  # a torch.Tensor
        value = value.detach().cpu().float().numpy()
    array = np.asarray(value, dtype=np.float32)
    if not np.all(np.isfinite(array)):
        raise CheckpointError(f"torchvision state_dict entry {key!r} holds NaN or inf values")
    return array


FIRST_KEY = "features.0.weight"  # in every torchvision AlexNet state_dict


def find_state_dict(loaded: Any, path: tuple = ()) -> tuple[tuple, Mapping] | None:
    """(the keys leading to it, the mapping) of the first mapping inside ``loaded`` that holds
    torchvision's AlexNet weights: training scripts save ``{"model": state_dict, "epoch":
    ...}``, ``{"state_dict": ...}`` and the like."""
    if not isinstance(loaded, Mapping):
        return None
    if any(str(k).removeprefix("module.") == FIRST_KEY for k in loaded):
        return path, loaded
    for key, value in loaded.items():
        found = find_state_dict(value, path + (key,))
        if found is not None:
            return found
    return None


def torchvision_to_flax(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """Maps torchvision's ``alexnet`` ``state_dict`` to ``AlexNet(variant="torchvision")``
    variables ``{"params": ...}``: the logits are PyTorch's, for NHWC instead of NCHW images.

    ``state_dict`` maps names to tensors or arrays (a ``"module."`` prefix, as saved from
    ``DataParallel``, is dropped). The number of classes is fc8's. A missing entry or a
    tensor of the wrong shape raises ``ValueError`` naming it, its shape and the expected one.
    """
    found = find_state_dict(state_dict)
    if found is not None and found[0]:
        where = "".join(f"[{key!r}]" for key in found[0])
        raise CheckpointError(
            f"The weights are not at the top of this checkpoint but under {where}: pass "
            f"checkpoint{where} (load_pth and python -m alexnet_jax.convert find them)"
        )
    entries = {key.removeprefix("module."): value for key, value in state_dict.items()}
    expected = {f"{name}.{kind}" for name in (*CONVS.values(), *DENSES.values())
                for kind in ("weight", "bias")}  # fmt: skip
    missing = sorted(expected - set(entries))
    if missing:
        raise CheckpointError(
            f"The state_dict is not torchvision's AlexNet: missing {missing}"
            f" (it has {sorted(entries)[:12]}{'...' if len(entries) > 12 else ''})"
        )
    arrays = {key: _array(entries[key], key) for key in sorted(expected)}
    for key, shape in TORCH_SHAPES.items():
        got = arrays[key].shape
        if len(got) != len(shape) or any(
            e is not None and e != g for e, g in zip(shape, got, strict=True)
        ):
            want = "(classes, 4096)" if shape[0] is None else str(shape)
            raise CheckpointError(f"state_dict[{key!r}] has shape {got}, expected {want}")
        bias = key.replace("weight", "bias")
        if arrays[bias].shape != (got[0],):
            raise CheckpointError(f"state_dict[{bias!r}] has shape {arrays[bias].shape}, "
                             f"expected ({got[0]},)")  # fmt: skip

    params: dict[str, Any] = {}
    for name, prefix in CONVS.items():
        params[name] = {
            "kernel": arrays[f"{prefix}.weight"].transpose(2, 3, 1, 0),  # OIHW -> HWIO
            "bias": arrays[f"{prefix}.bias"],
        }
    for name, prefix in DENSES.items():
        weight = arrays[f"{prefix}.weight"]  # (out, in)
        if name == "fc6":  # rows indexed (c, h, w) by torchvision, (h, w, c) here
            weight = weight.reshape((weight.shape[0],) + POOLED).transpose(0, 2, 3, 1)
            weight = weight.reshape(weight.shape[0], -1)
        params[name] = {"kernel": np.ascontiguousarray(weight.T), "bias": arrays[f"{prefix}.bias"]}
    return {"params": params}


def load_pth(path: str) -> dict[str, Any]:
    """A ``.pth`` file's state_dict (tensors only: ``weights_only=True``), as float32 numpy
    arrays, found where training scripts put it (``{"model": ...}``, ``{"state_dict": ...}``)."""
    try:
        import torch
    except ImportError as error:
        raise ImportError(
            "Reading a .pth file needs PyTorch: pip install torch (the CPU build is enough)"
        ) from error
    if not os.path.isfile(path):
        raise MissingCheckpointError(f"No such .pth file: {path!r}")
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - torch raises several types for bad files
        raise CheckpointError(f"{path!r} is not a readable PyTorch state_dict: {error}") from error
    found = find_state_dict(loaded)
    if found is None:
        summary = (
            {k: type(v).__name__ for k, v in list(loaded.items())[:12]}
            if isinstance(loaded, Mapping)
            else type(loaded).__name__
        )
        raise CheckpointError(
            f"{path!r} holds no torchvision AlexNet state_dict (no {FIRST_KEY!r} in it, at "
            f"any depth); it holds {summary}"
        )
    where, state_dict = found
    if where:
        logging.info("Reading the weights under %s of %s",
                     "".join(f"[{k!r}]" for k in where), path)  # fmt: skip
    return {key: _array(value, key) for key, value in state_dict.items() if hasattr(value, "shape")}


def _imagenet_eval_config(num_classes: int, variant: str, image_size: int):
    """What converted weights share: ImageNet (``imagenet2012``), one center crop of the image
    resized to 256, no lighting noise, a constant learning rate for fine-tuning."""
    config = default_config()
    config.dataset = "imagenet2012"
    config.channels = 3
    config.num_classes = num_classes
    config.image_size = image_size
    config.input.resize_size = 256
    config.batch_size = 128
    config.eval_batch_size = 256
    config.model.name = "alexnet"
    config.model.variant = variant
    config.input.pca_lighting_std = 0.0
    config.input.eval_crops = 1
    config.lr_schedule = "constant"
    return config


def torchvision_config(num_classes: int):
    """The config that evaluates torchvision's weights as torchvision does: ImageNet
    (``imagenet2012``), 224 center crop of the image resized to 256, ImageNet mean/std,
    ``variant="torchvision"``."""
    config = _imagenet_eval_config(num_classes, "torchvision", 224)
    config.model.initializer = "torch"
    config.input.normalization = "mean_std"
    return config


def caffe_config(num_classes: int, lrn: dict[str, float], mean_image: bool):
    """The config that evaluates BVLC's Caffe AlexNet: the paper's network with two towers,
    Caffe's LRN constants, 227 center crops of 256, and Caffe's mean pixel (as RGB) or its
    mean image subtracted from 0-255 pixels."""
    config = _imagenet_eval_config(num_classes, "paper", 227)
    config.model.groups = 2
    config.model.initializer = "paper"
    config.model.update(lrn)
    config.input.normalization = "mean_image" if mean_image else "mean"
    config.input.mean_rgb = list(caffe.MEAN_BGR[::-1])
    return config


def write_workdir(
    variables: dict[str, Any],
    workdir: str,
    config=None,
    class_names: list[str] | None = None,
    mean_image: np.ndarray | None = None,
):
    """A workdir holding ``variables`` as a step-0 checkpoint, ``config.json`` (default:
    torchvision's), class names and the mean image if any: ``main.py --mode=eval|predict
    --workdir``, ``config.init_from`` and the exporter read it."""
    num_classes = variables["params"]["fc8"]["kernel"].shape[1]
    config = config or torchvision_config(num_classes)
    os.makedirs(workdir, exist_ok=True)
    manager = checkpointing.create_manager(workdir, config)
    if manager.latest_step() is not None:
        raise ConfigError(f"{workdir!r} already holds checkpoints; choose an empty workdir")
    state = template_state(config, params=jax.tree_util.tree_map(np.asarray, variables["params"]))
    checkpointing.save(manager, 0, state)
    manager.wait_until_finished()
    manager.close()
    write_run_files(workdir, config, class_names or imagenet_class_names(num_classes))
    if mean_image is not None:
        buffer = io.BytesIO()
        np.save(buffer, np.asarray(mean_image, np.float32))
        atomic_write(os.path.join(workdir, normalization.MEAN_IMAGE_FILE), buffer.getvalue())
    return config


def imagenet_class_names(num_classes: int = 1000) -> list[str]:
    """ImageNet's 1000 synset ids in TFDS's (sorted) order, read from the installed
    tensorflow-datasets without importing it; else (or for other counts) "0".."n-1"."""
    spec = importlib.util.find_spec("tensorflow_datasets")
    if num_classes == 1000 and spec and spec.submodule_search_locations:
        for root in spec.submodule_search_locations:
            path = os.path.join(root, "datasets", "imagenet2012", "labels.txt")
            if os.path.isfile(path):
                with open(path) as f:
                    names = f.read().split()
                if len(names) == 1000:
                    return names
    return [str(i) for i in range(num_classes)]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description="Converts pretrained AlexNet weights (torchvision's .pth, BVLC's "
        ".caffemodel) into a workdir with a checkpoint."
    )
    parser.add_argument("weights", help="alexnet-owt-*.pth, or bvlc_alexnet.caffemodel")
    parser.add_argument(
        "--from",
        dest="source",
        choices=["torchvision", "caffe"],
        default=None,
        help="the weights' framework (default: by extension)",
    )
    parser.add_argument("--workdir", required=True, help="new workdir for the checkpoint")
    parser.add_argument(
        "--mean_file",
        default=None,
        help="caffe: imagenet_mean.binaryproto (default: the mean pixel)",
    )
    args = parser.parse_args(argv)
    source = args.source or ("caffe" if args.weights.endswith(".caffemodel") else "torchvision")
    if source == "caffe":
        variables, lrn = caffe.caffe_to_flax(caffe.read_caffemodel(args.weights))
        mean = caffe.read_mean_file(args.mean_file) if args.mean_file else None
        num_classes = variables["params"]["fc8"]["kernel"].shape[1]
        config = caffe_config(num_classes, lrn, mean is not None)
        config = write_workdir(variables, args.workdir, config, mean_image=mean)
    else:
        if args.mean_file:
            raise ConfigError("--mean_file is for --from caffe; torchvision's weights use "
                              "ImageNet's mean and std")  # fmt: skip
        config = write_workdir(torchvision_to_flax(load_pth(args.weights)), args.workdir)
    print(json.dumps({"workdir": args.workdir, "num_classes": config.num_classes,
                      "from": source}))  # fmt: skip


if __name__ == "__main__":
    one_line_errors(main)
