"""A trained model for serving, runnable without this project.

    python -m alexnet_jax.export --workdir W --format stablehlo [--output W/export]
    python -m alexnet_jax.export --workdir W --format savedmodel

The exported function takes a batch of uint8 images of ``resize_size`` x ``resize_size``
(an image's central square resized, as ``--mode=predict`` and the preparation make it;
any batch size) and returns the class probabilities: the center ``image_size`` crop, the
run's normalization (mean/std, mean pixel or mean image) and the softmax are inside.

- ``stablehlo``: ``model.stablehlo``, ``jax.export``'s serialized StableHLO with a symbolic
  batch dimension; reload with ``jax.export.deserialize(open(path, "rb").read())`` and
  ``.call(images)`` (JAX only, no Flax, no this project).
- ``savedmodel``: a TensorFlow SavedModel (``jax2tf``; the parameters are variables),
  served by ``tf.saved_model.load(path).serve(images)`` or TF Serving.
- ``onnx``: an ONNX model (``jax2onnx``, opset 23, a symbolic batch dimension), for
  ``onnxruntime`` and the other ONNX runtimes; needs ``pip install -e ".[onnx]"``.

Beside the model, ``signature.json`` records the input shape and dtype, the crop, the
normalization and the class names.
"""

from __future__ import annotations

import argparse
import json
import os
import types
from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections

from alexnet_jax import normalization
from alexnet_jax.data.dataset import resize_size
from alexnet_jax.errors import ConfigError, one_line_errors
from alexnet_jax.files import atomic_write
from alexnet_jax.run_files import class_names, load_run_config, restore_state

FORMATS = ("stablehlo", "savedmodel", "onnx")


def serving_function(
    config: ml_collections.ConfigDict, workdir: str, which: str | int = "best"
) -> tuple[Callable, dict, tuple[int, int, int], int]:
    """``(serve(params, images) -> probabilities, params, input (R, R, C), step)`` for a run's
    checkpoint. ``serve`` uses XLA's own convolutions and products
    (``config.cpu_convolutions`` and ``config.cpu_matmuls`` ``"xla"``): a oneDNN custom call
    would not serialize."""
    config = config.copy_and_resolve_references()
    config.cpu_convolutions = config.cpu_matmuls = "xla"
    if config.dataset in ("digits", "synthetic"):
        raise ConfigError(
            f"config.dataset={config.dataset!r}: a model trained on {config.dataset} takes no "
            "photographs; export models trained on images (TFDS, image folders, records)"
        )
    state, step = restore_state(config, workdir, which)
    channels = 3 if config.grayscale_to_rgb else config.channels
    crop, side = config.image_size, resize_size(config)
    mean_image = None
    if config.input.normalization == "mean_image":
        mean_image = normalization.load_mean_image(
            normalization.mean_image_path(config, workdir), (crop, crop, channels)
        )
    normalize = normalization.make_normalizer(config.input, mean_image)
    apply_fn = state.apply_fn
    offset = (side - crop) // 2

    def serve(params: dict, images: jax.Array) -> jax.Array:
        window = images[:, offset : offset + crop, offset : offset + crop]
        logits = apply_fn({"params": params}, normalize(window.astype(jnp.uint8)))
        return jax.nn.softmax(logits)

    return serve, jax.device_get(state.params), (side, side, channels), step


def export_stablehlo(serve: Callable, params: dict, shape: tuple, path: str) -> None:
    """``serve`` with ``params`` baked in, serialized with a symbolic batch dimension."""
    (batch,) = jax.export.symbolic_shape("batch")
    spec = jax.ShapeDtypeStruct((batch,) + tuple(shape), jnp.uint8)
    exported = jax.export.export(jax.jit(lambda images: serve(params, images)))(spec)
    atomic_write(path, exported.serialize())


def export_savedmodel(serve: Callable, params: dict, shape: tuple, path: str) -> None:
    """A SavedModel whose ``serve`` signature maps uint8 (None, R, R, C) to probabilities."""
    import tensorflow as tf
    from jax.experimental import jax2tf

    tf.config.set_visible_devices([], "GPU")
    converted = jax2tf.convert(serve, polymorphic_shapes=[None, "(b, ...)"], with_gradient=False)
    module = tf.Module()
    module.params = tf.nest.map_structure(tf.Variable, params)

    @tf.function(input_signature=[tf.TensorSpec((None,) + tuple(shape), tf.uint8, "images")])
    def serve_images(images):
        return {"probabilities": converted(module.params, images)}

    module.serve = serve_images
    tf.saved_model.save(module, path, signatures={"serving_default": serve_images})


def export_onnx(serve: Callable, params: dict, shape: tuple, path: str) -> None:
    """An ONNX model taking uint8 (batch, R, R, C) ``images`` to ``probabilities``."""
    try:
        import jax2onnx
    except ImportError as error:
        raise ConfigError(
            '--format=onnx needs jax2onnx: pip install -e ".[onnx]" (jax2onnx, onnxruntime)'
        ) from error

    # A symbolic batch dimension, which jax2onnx takes as a name.
    spec = types.SimpleNamespace(shape=("batch",) + tuple(shape), dtype=jnp.uint8)
    jax2onnx.to_onnx(
        lambda images: serve(params, images),
        [spec],
        model_name="alexnet",
        input_names=["images"],
        output_names=["probabilities"],
        return_mode="file",
        output_path=path,
    )


def export(
    workdir: str,
    fmt: str,
    output: str | None = None,
    which: str | int = "best",
    config: ml_collections.ConfigDict | None = None,
) -> str:
    """Exports a run's checkpoint as ``fmt``; returns the model's path."""
    if fmt not in FORMATS:
        raise ConfigError(f"--format={fmt!r}: choose one of {FORMATS}")
    config = config or load_run_config(workdir)
    serve, params, shape, step = serving_function(config, workdir, which)
    output = output or os.path.join(workdir, "export")
    os.makedirs(output, exist_ok=True)
    if fmt == "stablehlo":
        path = os.path.join(output, "model.stablehlo")
        export_stablehlo(serve, params, shape, path)
    elif fmt == "onnx":
        path = os.path.join(output, "model.onnx")
        export_onnx(serve, params, shape, path)
    else:
        path = os.path.join(output, "saved_model")
        export_savedmodel(serve, params, shape, path)
    signature = {
        "format": fmt,
        "checkpoint_step": step,
        "input": {"shape": ["batch", *shape], "dtype": "uint8",
                  "what": f"the central square resized to {shape[0]}x{shape[1]}"},
        "crop": config.image_size,
        "normalization": config.input.normalization,
        "output": "softmax probabilities",
        "class_names": class_names(workdir, config.num_classes),
    }  # fmt: skip
    atomic_write(os.path.join(output, "signature.json"), json.dumps(signature, indent=1) + "\n")
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Exports a run's checkpoint for serving.")
    parser.add_argument("--workdir", required=True, help="a training or converted run")
    parser.add_argument("--format", required=True, choices=FORMATS)
    parser.add_argument("--output", default=None, help="folder (default WORKDIR/export)")
    parser.add_argument("--checkpoint", default="best", help="best, latest or a step")
    args = parser.parse_args(argv)
    path = export(args.workdir, args.format, args.output, args.checkpoint)
    print(json.dumps({"model": path, "format": args.format}))


if __name__ == "__main__":
    one_line_errors(main)
