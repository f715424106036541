"""Exported models (StableHLO, SavedModel) reloaded without this project give its outputs."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from alexnet_jax import export, normalization, run_files, steps, train
from alexnet_jax.errors import ConfigError
from tests.test_prepared import photo_folder
from tests.test_train import error_text, small_config

pytest.importorskip("tensorflow")


@pytest.fixture(scope="module")
def folder_run(tmp_path_factory):
    """Two steps on a photo folder, subtracting the mean image (the paper's normalization)."""
    root = photo_folder(tmp_path_factory.mktemp("photos"))
    workdir = str(tmp_path_factory.mktemp("run"))
    config = small_config(dataset="image_folder", data_dir=str(root), channels=3, num_classes=3)
    config.update(dict(batch_size=4, eval_batch_size=4, num_train_steps=2))
    config.input.normalization, config.input.mean_image_batches = "mean_image", 1
    train.train_and_evaluate(config, workdir)
    return workdir


def reference_probabilities(workdir, squares):
    """The project's own probabilities for (N, 76, 76, 3) squares: center 67 crop."""
    config = run_files.load_run_config(workdir)
    state, _ = run_files.restore_state(config, workdir, "best")
    mean = normalization.load_mean_image(os.path.join(workdir, "mean_image.npy"), (67, 67, 3))
    normalize = normalization.make_normalizer(config.input, mean)
    crops = squares[:, 4:71, 4:71]
    return np.asarray(steps.predict_probabilities(state, crops, normalize=normalize))


def run_python(code):
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=300, cwd="/")  # fmt: skip
    assert result.returncode == 0, error_text(result.stderr)
    return result.stdout


ONNX = pytest.param("onnx", marks=pytest.mark.extra("onnx"))


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["stablehlo", "savedmodel", ONNX])
def test_exported_model_reloads_without_the_project_and_gives_its_probabilities(
    folder_run, tmp_path, fmt
):
    if fmt == "onnx":
        pytest.importorskip("jax2onnx")
        pytest.importorskip("onnxruntime")
    path = export.export(folder_run, fmt, str(tmp_path / fmt))
    signature = json.loads((tmp_path / fmt / "signature.json").read_text())
    assert signature["input"]["shape"] == ["batch", 76, 76, 3]
    assert signature["class_names"] == ["class0", "class1", "class2"]
    squares = np.random.default_rng(0).integers(0, 256, (3, 76, 76, 3), dtype=np.uint8)
    np.save(tmp_path / "squares.npy", squares)
    if fmt == "stablehlo":
        load = (f"import jax; f = jax.export.deserialize(open({path!r}, 'rb').read()); "
                "serve = f.call")  # fmt: skip
    elif fmt == "savedmodel":
        load = (f"import tensorflow as tf; m = tf.saved_model.load({path!r}); "
                "serve = lambda x: m.serve(x)['probabilities'].numpy()")  # fmt: skip
    else:
        load = (f"import onnxruntime as ort; s = ort.InferenceSession({path!r}); "
                "serve = lambda x: s.run(None, {'images': x})[0]")  # fmt: skip
    code = (
        "import sys, numpy as np\n"
        f"{load}\n"
        f"x = np.load({str(tmp_path / 'squares.npy')!r})\n"
        "for n in (1, 3):\n"  # the batch dimension is symbolic
        f"    np.save({str(tmp_path / 'out')!r} + str(n) + '.npy', np.asarray(serve(x[:n])))\n"
        "assert 'alexnet_jax' not in sys.modules and 'flax' not in sys.modules\n"
        + ("assert 'jax' not in sys.modules\n" if fmt == "onnx" else "")
    )
    run_python(code)
    expected = reference_probabilities(folder_run, squares)
    for n in (1, 3):
        got = np.load(tmp_path / f"out{n}.npy")
        np.testing.assert_allclose(got, expected[:n], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(expected.sum(axis=1), 1.0, rtol=1e-5)


def test_a_digits_model_is_not_exported_as_a_photo_model(tmp_path):
    with pytest.raises(ConfigError, match="trained on digits takes no photographs"):
        export.serving_function(small_config(), str(tmp_path))
