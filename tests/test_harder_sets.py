"""Harder ImageNet test sets for --mode=eval: ImageNet-V2 (its variants) and ReaL's labels."""

import jax
import numpy as np
import pytest

from alexnet_jax import convert, data, evaluate, steps, train
from alexnet_jax.data import image_folder
from alexnet_jax.defaults import default_config
from alexnet_jax.errors import ConfigError
from alexnet_jax.normalization import make_normalizer
from alexnet_jax.run_files import template_state

tfds = pytest.importorskip("tensorflow_datasets")


def imagenet_config(dataset):
    config = default_config()
    config.update(dict(dataset=dataset, num_classes=1000, image_size=67, channels=3,
                       batch_size=4, eval_batch_size=4, progress_bar=False))  # fmt: skip
    config.input.resize_size = 76
    config.model.initializer = "he"
    config.model.width_divisor = 4  # the class indices matter here, not the width
    return config


@pytest.fixture(scope="module")
def imagenet_workdir(tmp_path_factory):
    """An ImageNet-shaped (1,000 classes) checkpoint, small (67x67 inputs, a narrow
    network), untrained."""
    workdir = str(tmp_path_factory.mktemp("imagenet_run"))
    config = imagenet_config("imagenet2012")
    params = jax.device_get(template_state(config).params)
    convert.write_workdir({"params": params}, workdir, config)
    return workdir


def our_top1(config, workdir, batches):
    """Top-1 predictions of the checkpoint on ``batches``, computed apart from the Tally."""
    state, _ = evaluate.restore_state(config, workdir, "latest")
    normalize = make_normalizer(config.input)
    predictions, kept = [], []
    for batch in batches:
        images = np.asarray(batch["image"]).reshape((-1,) + batch["image"].shape[2:])
        logits = np.asarray(steps.eval_logits(state, normalize(images)))
        predictions.append(logits.argmax(-1))
        kept.append({k: np.asarray(v).reshape((-1,) + v.shape[2:]) for k, v in batch.items()})
    return np.concatenate(predictions), {k: np.concatenate([b[k] for b in kept]) for k in kept[0]}


@pytest.mark.parametrize("variant", ["matched-frequency", "threshold-0.7", "topimages"])
def test_imagenet_v2_evaluates_an_imagenet_checkpoint_with_imagenets_class_indices(
    imagenet_workdir, variant
):
    config = imagenet_config(f"imagenet_v2/{variant}")
    with tfds.testing.mock_data(num_examples=10):
        v2 = tfds.builder(config.dataset).info.features["label"].names
        imagenet = tfds.builder("imagenet2012").info.features["label"].names
        # The class-index pitfall: V2's files come in folders "0".."999" that sort as
        # strings ("0", "1", "10", "100", ...); its labels must be ImageNet's indices.
        assert v2 == imagenet and v2[0] == "n01440764" and v2[10] == "n01530575"
        records = evaluate.evaluate_checkpoint(config, imagenet_workdir, "latest")
        predicted, batch = our_top1(config, imagenet_workdir, data.create_dataset(config)
                                    .eval_batches())  # fmt: skip
    assert [(r["crops"], r["count"]) for r in records] == [(1, 10), (10, 10)]
    keep = batch["mask"] > 0
    expected = np.mean(predicted[keep] == batch["label"][keep])
    assert records[0]["top1"] == pytest.approx(expected)


def test_real_labels_count_a_top1_in_any_of_an_images_labels(imagenet_workdir):
    config = imagenet_config("imagenet2012_real")
    with tfds.testing.mock_data(num_examples=16):
        (record, _) = evaluate.evaluate_checkpoint(config, imagenet_workdir, "latest")
        predicted, batch = our_top1(config, imagenet_workdir, data.create_dataset(config)
                                    .eval_batches())  # fmt: skip
    keep = batch["mask"] > 0
    real = batch["real"][keep].astype(bool)
    valid = real.any(axis=1)
    hits = real[np.arange(len(real)), predicted[keep]]
    assert record["real_count"] == int(valid.sum())
    assert record["real_top1"] == pytest.approx(hits[valid].mean() if valid.any() else 0.0)
    assert record["count"] == 16  # the original labels still give top-1 and top-5


def test_an_evaluation_set_cannot_be_trained_on(tmp_path):
    with pytest.raises(ConfigError, match="is an evaluation set"):
        train.train_and_evaluate(imagenet_config("imagenet_v2/topimages"), str(tmp_path))


def test_numbered_class_folders_are_labeled_by_their_number(tmp_path):
    """ImageNet-V2 as released (and many datasets) name class folders "0", "1", ..., "11":
    sorted as strings, "10" would get label 2."""
    from PIL import Image

    for name in [str(i) for i in range(12)]:
        (tmp_path / "train" / name).mkdir(parents=True)
        Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "train" / name / "a.png")
    files, labels, classes = image_folder.list_image_folder(str(tmp_path), "train")
    assert classes == [str(i) for i in range(12)]
    assert {f.split("/")[-2]: int(y) for f, y in zip(files, labels, strict=True)}["10"] == 10
