"""Looking inside a run: a profiler trace, images in TensorBoard, nearest neighbors in fc7."""

import glob
import os

import numpy as np
import pytest
from PIL import Image

from alexnet_jax import figures, neighbors, run_files, train
from alexnet_jax.data.digits import load_digits, split_digits
from tests.test_train import NARROW, small_config


@pytest.fixture(scope="module")
def profiled_run(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("profiled"))
    config = small_config(num_train_steps=8, eval_every_epochs=4 / 89, profile_steps=2)
    train.train_and_evaluate(config, workdir)  # evaluations at 4 and 8
    return workdir


@pytest.mark.slow
def test_profile_steps_writes_a_trace_for_tensorboard_and_perfetto(profiled_run):
    traces = glob.glob(os.path.join(profiled_run, "profile", "plugins", "profile", "*", "*"))
    names = [os.path.basename(t) for t in traces]
    assert any(n.endswith(".xplane.pb") for n in names), names  # TensorBoard's profile plugin
    assert any(n.endswith(".trace.json.gz") for n in names), names  # Perfetto
    assert all(os.path.getsize(t) > 1000 for t in traces)


@pytest.mark.slow
def test_tensorboard_gets_the_kernels_and_the_confusion_matrix_at_each_evaluation(profiled_run):
    tf = pytest.importorskip("tensorflow")  # an independent reader of the event files
    images, scalars = {}, set()
    for path in glob.glob(os.path.join(profiled_run, "tensorboard", "events.*")):
        for event in tf.compat.v1.train.summary_iterator(path):
            for value in event.summary.value:
                if value.HasField("image"):
                    images.setdefault(value.tag, []).append((event.step, value.image))
                else:
                    scalars.add(value.tag)
    assert {"eval/first_layer_kernels", "eval/confusion_matrix"} <= set(images)
    kernels = images["eval/first_layer_kernels"]
    assert [step for step, _ in kernels] == [4, 8]
    filters = 96 // NARROW  # the run's conv1
    grid = figures.kernel_grid(np.zeros((11, 11, 1, filters)) + np.arange(filters))
    assert (kernels[0][1].height, kernels[0][1].width) == grid.shape[:2]  # 2 rows of 12
    step, confusion = images["eval/confusion_matrix"][-1]
    assert (confusion.height, confusion.width) == (260, 260)  # 10 classes, 26-pixel cells
    decoded = tf.io.decode_png(confusion.encoded_image_string).numpy()
    assert decoded.shape == (260, 260, 3) and decoded.std() > 10
    assert "eval/top1" in scalars


def test_confusion_image_rows_are_the_true_classes_normalized():
    image = figures.confusion_image(np.array([[3, 1], [0, 4]]), min_side=4)
    assert image.shape == (4, 4, 3)
    np.testing.assert_allclose(image[:2, :2, 0], 0.75)
    np.testing.assert_allclose(image[:2, 2:, 0], 0.25)
    np.testing.assert_allclose(image[2:, 2:, 1], 1.0)


@pytest.mark.slow
def test_a_training_image_is_its_own_nearest_neighbor_in_fc7(profiled_run, tmp_path):
    """A training digit saved as a file finds itself first (at distance ~0: the same pixels up
    to the 8-bit file), then other training images."""
    images, labels = load_digits(8)
    train_idx, _ = split_digits(len(labels))
    from sklearn.datasets import load_digits as sklearn_digits

    raw = sklearn_digits().images
    paths = []
    for position in (0, 17, 300):
        path = tmp_path / f"train{position}.png"
        digit = raw[train_idx[position]]
        Image.fromarray(np.round(digit * 255 / 16).astype(np.uint8)).save(path)
        paths.append(str(path))
    config = run_files.load_run_config(profiled_run)
    results = neighbors.nearest_training_images(config, profiled_run, paths, k=4, pool=0)
    for position, result in zip((0, 17, 300), results, strict=True):
        found = result["neighbors"]
        assert found[0]["index"] == position, found
        assert found[0]["distance"] < 0.05 * found[1]["distance"]
        assert [f["distance"] for f in found] == sorted(f["distance"] for f in found)
        assert found[0]["name"] == f"digits training example {position}"
    with Image.open(os.path.join(profiled_run, "neighbors.png")) as png:
        assert png.size == (800, 510)  # 3 rows of the query and 4 neighbors
