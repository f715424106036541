"""The input pipelines: TFDS (mocked), image folders with bad files, the paper's augmentation."""

import logging
import os
import subprocess
import sys

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
tfds = pytest.importorskip("tensorflow_datasets")

from PIL import Image  # noqa: E402

from alexnet_jax import data  # noqa: E402
from alexnet_jax.data import image_folder, preprocess, tf_pipeline  # noqa: E402
from alexnet_jax.data.dataset import steps_per_epoch  # noqa: E402
from alexnet_jax.errors import ConfigError, DataError  # noqa: E402
from configs import default, fashion_mnist, imagenet  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def small(config, **fields):
    config.image_size, config.input.resize_size = 67, 80
    config.batch_size, config.eval_batch_size = 8, 8
    config.input.shuffle_buffer = 64
    for key, value in fields.items():
        target = config.input if key in config.input else config
        target[key] = value
    return config


def take(iterator, n):
    return [next(iterator) for _ in range(n)]


def test_imagenet2012_mock_through_the_whole_pipeline():
    config = small(imagenet.get_config())  # crops, flips, PCA lighting, 10-crop evaluation
    with tfds.testing.mock_data(num_examples=20):
        dataset = data.create_dataset(config)
        assert dataset.train_size == 20 and dataset.eval_size == 20  # counted: no metadata
        assert dataset.num_classes == 1000 and dataset.class_names[0] == "n01440764"
        batch = next(dataset.train_batches(0))
        assert batch["image"].shape == (4, 2, 67, 67, 3) and batch["image"].dtype == np.uint8
        assert batch["label"].shape == (4, 2)
        eval_batches = list(dataset.eval_batches())
    assert eval_batches[0]["image"].shape == (4, 2, 10, 67, 67, 3)
    assert sum(b["mask"].sum() for b in eval_batches) == 20  # 3 batches of 8, 4 padded


@pytest.mark.parametrize("to_rgb,channels", [(False, 1), (True, 3)])
def test_fashion_mnist_mock_grayscale_or_replicated(to_rgb, channels):
    config = fashion_mnist.get_config()
    config.grayscale_to_rgb = to_rgb
    config.image_size = config.input.resize_size = 65
    config.batch_size, config.eval_batch_size = 8, 8
    with tfds.testing.mock_data(num_examples=16):
        dataset = data.create_dataset(config)
        batch = next(dataset.train_batches(0))
    assert batch["image"].shape == (4, 2, 65, 65, channels)
    if to_rgb:
        np.testing.assert_array_equal(batch["image"][..., 0], batch["image"][..., 2])


@pytest.mark.parametrize("source", ["fashion_mnist", "digits"])
def test_a_wrong_class_count_is_a_config_error_naming_the_field(source):
    config = fashion_mnist.get_config() if source == "fashion_mnist" else default.get_config()
    config.num_classes, config.batch_size, config.eval_batch_size = 7, 8, 8
    with tfds.testing.mock_data(num_examples=8):
        with pytest.raises(ConfigError, match=f"num_classes=7 but '{source}' has 10 classes"):
            data.create_dataset(config)


def test_missing_tfds_data_is_a_clear_error(tmp_path):
    config = small(imagenet.get_config(), data_dir=str(tmp_path))
    with pytest.raises(FileNotFoundError, match="'imagenet2012' is not prepared in data_dir"):
        data.create_dataset(config)


def make_image_folder(root, per_class=6, size=(50, 40)):
    """train/ and val/ with two classes of real JPEG and PNG files, and two bad files."""
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for name in ("cat", "dog"):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(per_class):
                pixels = rng.integers(0, 256, size + (3,), dtype=np.uint8)
                ext = "jpg" if i % 2 else "png"
                Image.fromarray(pixels).save(folder / f"{i}.{ext}")
    whole = (root / "train" / "cat" / "1.jpg").read_bytes()
    (root / "train" / "cat" / "truncated.jpg").write_bytes(whole[: len(whole) // 2])
    (root / "val" / "dog" / "notes.png").write_text("not an image")
    return root


def test_image_folder_skips_and_names_corrupt_files(tmp_path, caplog):
    """A non-image is dropped and named when the folder is listed; a truncated JPEG (which
    starts as a JPEG does) is dropped and named when it fails to decode."""
    root = make_image_folder(tmp_path / "data")
    config = small(default.get_config(), dataset="image_folder", data_dir=str(root), channels=3)
    config.num_classes = 2
    with caplog.at_level(logging.WARNING):
        dataset = data.create_dataset(config)
    assert "notes.png" in caplog.text and "truncated.jpg" not in caplog.text
    assert "Skipped 1 corrupt or non-image files of 13 in split 'val'" in caplog.text
    assert dataset.class_names == ["cat", "dog"]
    assert dataset.train_size == 13 and dataset.eval_size == 12
    with caplog.at_level(logging.WARNING):
        batches = take(dataset.train_batches(0), 6)  # 1 step per epoch: 5 epoch reports
    assert "truncated.jpg: it failed to decode" in caplog.text
    assert batches[0]["image"].shape == (4, 2, 67, 67, 3)
    evaluation = list(dataset.eval_batches())
    assert sum(b["mask"].sum() for b in evaluation) == 12
    labels = np.concatenate([b["label"].ravel()[b["mask"].ravel() > 0] for b in evaluation])
    assert sorted(labels.tolist()) == [0] * 6 + [1] * 6


def test_files_that_fail_to_decode_are_named_each_epoch_and_the_epoch_stays_full(tmp_path, caplog):
    """Files with a JPEG's first and last bytes but garbage between pass the listing check
    and fail in the decoder: they are dropped, named at the end of each epoch and of each
    evaluation, and the epoch is filled up from its beginning."""
    root = make_image_folder(tmp_path / "data", per_class=5)  # 10 good + truncated.jpg
    (root / "train" / "cat" / "truncated.jpg").unlink()
    garbage = b"\xff\xd8\xff\xe0" + bytes(range(256)) * 4 + b"\xff\xd9"
    for path in ("train/cat/garbage1.jpg", "train/dog/garbage2.jpg", "val/cat/garbage3.jpg"):
        (root / path).write_bytes(garbage)
    config = small(default.get_config(), dataset="image_folder", data_dir=str(root), channels=3)
    config.num_classes, config.batch_size = 2, 4
    dataset = data.create_dataset(config)
    assert dataset.train_size == 12  # listed: 10 good + 2 undecodable
    steps = steps_per_epoch(dataset.train_size, config)
    assert steps == 3  # 12 examples needed, 10 decode: 2 come again from the epoch's start
    with caplog.at_level(logging.WARNING):
        batches = take(dataset.train_batches(0), steps + 1)  # the report comes at epoch end
    assert all(b["image"].shape == (4, 1, 67, 67, 3) for b in batches)
    epoch0 = np.concatenate([b["image"].reshape(4, -1) for b in batches[:steps]])
    assert len({row.tobytes() for row in epoch0}) == 10  # every decodable image once, 2 twice
    failed = [r.getMessage() for r in caplog.records if "failed to decode" in r.getMessage()]
    assert any("garbage1.jpg: it failed to decode" in m for m in failed)
    assert any("garbage2.jpg: it failed to decode" in m for m in failed)
    assert not any(name in caplog.text for name in ("/0.png", "/1.jpg", "/4.png"))
    assert "image_folder train, epoch 0: skipped 2 bad files (0 found when the folder was " \
        "listed and named then, 2 failed to decode)" in caplog.text  # fmt: skip
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        evaluation = list(dataset.eval_batches())
    assert sum(b["mask"].sum() for b in evaluation) == 10
    assert "garbage3.jpg: it failed to decode" in caplog.text
    assert "image_folder eval: skipped 2 bad files" in caplog.text  # with notes.png


def test_image_folder_structural_problems_name_the_path(tmp_path):
    root = make_image_folder(tmp_path / "data")
    (root / "train" / "empty_class").mkdir()
    with pytest.raises(ValueError, match="empty_class.* holds no images"):
        image_folder.list_image_folder(str(root), "train")
    with pytest.raises(FileNotFoundError, match="test.* does not exist"):
        image_folder.list_image_folder(str(root), "test")


def test_order_and_augmentation_depend_only_on_seed_and_step(tmp_path):
    root = make_image_folder(tmp_path / "data", per_class=12)
    config = small(default.get_config(), dataset="image_folder", data_dir=str(root), channels=3)
    config.num_classes, config.input.pca_lighting_std = 2, 0.1
    first = take(data.create_dataset(config).train_batches(0), 5)
    again = take(data.create_dataset(config).train_batches(0), 5)
    resumed = take(data.create_dataset(config).train_batches(3), 2)
    for a, b in zip(first, again, strict=True):
        np.testing.assert_array_equal(a["image"], b["image"])
    for a, b in zip(first[3:], resumed, strict=True):
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["label"], b["label"])
    assert not np.array_equal(first[0]["image"], first[3]["image"])  # epochs 0 and 1 differ
    config.seed = 1
    other = next(data.create_dataset(config).train_batches(0))
    assert not np.array_equal(first[0]["image"], other["image"])


def coded_image(height=20, width=30):
    """Pixel (y, x) holds y * 100 + x in every channel: a crop tells where it came from."""
    y, x = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
    return tf.constant(np.repeat((y * 100 + x)[..., None], 3, -1).astype(np.float32))


def test_random_crop_offsets_cover_the_positions_inside_the_image():
    corners = set()
    for i in range(200):
        y0, x0 = preprocess.random_crop_offset(20, 30, 7, tf.constant([0, i])).numpy()
        assert 0 <= y0 <= 20 - 7 and 0 <= x0 <= 30 - 7
        corners.add((y0, x0))
    assert len(corners) > 100  # positions spread over the 14 x 24 possible


@pytest.mark.parametrize("side", [61, 20])  # down- and upsampling to 32
def test_resized_crop_is_the_window_of_the_resized_image(side):
    image = np.random.default_rng(side).integers(0, 256, (side, side, 3), dtype=np.uint8)
    resized = tf.image.resize(image.astype(np.float32), [32, 32], antialias=True).numpy()
    for y, x in [(0, 0), (0, 5), (5, 0), (5, 5), (2, 3)]:
        crop = preprocess.resized_crop(tf.constant(image), 32, 27, tf.constant([y, x])).numpy()
        # the same kernel weights, rounded in another order
        np.testing.assert_allclose(crop, resized[y : y + 27, x : x + 27], rtol=2e-6, atol=1e-4)


def test_preprocessing_equals_the_steps_written_with_tensorflow_ops(tmp_path):
    """The fused path against the paper's steps written with TensorFlow's own image ops."""
    pixels = np.random.default_rng(0).integers(0, 256, (24, 16), dtype=np.uint8)
    Image.fromarray(pixels).resize((120, 90), Image.BICUBIC).convert("RGB").save(
        tmp_path / "a.jpg", quality=90
    )
    contents = tf.io.read_file(str(tmp_path / "a.jpg"))
    square = tf.cast(tf.io.decode_jpeg(contents, channels=3)[:, 15:105], tf.float32)
    resized = tf.image.resize(square, [40, 40], antialias=True)

    def assert_same_but_rounding(out, expected):
        # resized_crop's float rounding may move a value across a .5 in to_uint8
        diff = np.abs(out.numpy().astype(int) - expected.numpy().astype(int))
        assert diff.max() <= 1 and diff.mean() < 1e-3

    for i in range(8):
        seed = tf.constant([3, i], tf.int64)
        split = tf.random.experimental.stateless_split(seed, 3)
        crop_seed, flip_seed, light_seed = tf.unstack(split)
        expected = tf.image.stateless_random_crop(resized, [32, 32, 3], seed=crop_seed)
        expected = tf.image.stateless_random_flip_left_right(expected, seed=flip_seed)
        expected = preprocess.to_uint8(preprocess.pca_lighting(expected, 0.1, light_seed))
        out = preprocess.preprocess_for_train(
            contents, seed, image_size=32, resize_size=40, channels=3,
            crop=True, flip=True, lighting_std=0.1,
        )  # fmt: skip
        assert_same_but_rounding(out, expected)
    center = preprocess.preprocess_for_eval(
        contents, image_size=32, resize_size=40, channels=3, crops=1
    )
    assert_same_but_rounding(center, preprocess.to_uint8(resized[4:36, 4:36]))
    ten = preprocess.preprocess_for_eval(
        contents, image_size=32, resize_size=40, channels=3, crops=10
    )
    expected = preprocess.to_uint8(preprocess.ten_crops(resized, 32))  # rounded after cropping
    np.testing.assert_array_equal(ten.numpy(), expected.numpy())


def test_flip_is_a_mirror_half_the_time():
    image = coded_image()
    flips = 0
    for i in range(200):
        out = preprocess.random_flip(image, tf.constant([1, i])).numpy()
        if np.array_equal(out, image.numpy()[:, ::-1]):
            flips += 1
        else:
            np.testing.assert_array_equal(out, image.numpy())
    assert 70 < flips < 130


def test_pca_lighting_adds_the_eigenvector_combination_to_every_pixel():
    """shift = 255 * V (alpha * lambda) with alpha ~ N(0, s^2) drawn from the seed: checked
    exactly for given seeds, then in distribution along each eigenvector (the third, 20x
    smaller than the second, must be there too)."""
    vec, val = np.asarray(preprocess.PCA_EIGVEC), np.asarray(preprocess.PCA_EIGVAL)
    image = preprocess.pca_lighting(tf.zeros((4, 5, 3)), 0.1, tf.constant([2, 0])).numpy()
    alpha = tf.random.stateless_normal([3], seed=tf.constant([2, 0]), stddev=0.1).numpy()
    expected = 255.0 * vec @ (alpha * val)
    np.testing.assert_allclose(image, np.broadcast_to(expected, image.shape), rtol=1e-5)

    zero = tf.zeros((1, 1, 3))
    shifts = np.stack(
        [preprocess.pca_lighting(zero, 0.1, tf.constant([2, i])).numpy()[0, 0] for i in range(4000)]
    )
    along = shifts @ vec / 255.0  # the components: alpha_i * lambda_i
    np.testing.assert_allclose(along.std(axis=0), 0.1 * val, rtol=0.05)
    assert np.all(np.abs(along.mean(axis=0)) < 4 * 0.1 * val / np.sqrt(4000))
    assert abs(np.corrcoef(along[:, 1], along[:, 2])[0, 1]) < 0.05  # drawn independently


def test_ten_crops_are_the_corners_center_and_mirrors():
    crops = preprocess.ten_crops(coded_image(), 7).numpy()[..., 0]
    assert crops.shape == (10, 7, 7)
    origins = [divmod(int(c[0, 0]), 100) for c in crops[:5]]
    assert origins == [(0, 0), (0, 23), (13, 0), (13, 23), (6, 11)]
    np.testing.assert_array_equal(crops[5:], crops[:5, :, ::-1])


def test_decode_central_square_png_and_jpeg(tmp_path):
    pixels = np.random.default_rng(0).integers(0, 256, (30, 50, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "a.png")
    out = preprocess.decode_central_square(tf.io.read_file(str(tmp_path / "a.png")), 3).numpy()
    np.testing.assert_array_equal(out, pixels[:, 10:40])
    Image.fromarray(pixels).save(tmp_path / "a.jpg", quality=95)
    jpeg = preprocess.decode_central_square(tf.io.read_file(str(tmp_path / "a.jpg")), 3).numpy()
    whole = np.asarray(Image.open(tmp_path / "a.jpg"))
    assert jpeg.shape == (30, 30, 3)
    assert np.abs(jpeg.astype(int) - whole[:, 10:40].astype(int)).mean() < 3  # same decode


@pytest.mark.slow
def test_synthetic_source_trains_without_importing_tensorflow_or_torch(tmp_path):
    code = (
        "import sys; from configs import synthetic; from alexnet_jax import train;"
        "c = synthetic.get_config(); c.image_size = 67; c.batch_size = 8; c.eval_batch_size = 8;"
        "c.num_train_steps = 2; c.progress_bar = False;"
        f"r = train.train_and_evaluate(c, {str(tmp_path)!r});"
        "assert 'tensorflow' not in sys.modules, 'TensorFlow was imported';"
        "assert 'torch' not in sys.modules, 'PyTorch was imported';"
        "print('top1', r['top1'])"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "top1" in result.stdout


# --- the pipeline's parts, alone -------------------------------------------------------------


def numbered(start, stop):
    """A batch whose examples are their positions: image and label both hold them."""
    positions = np.arange(start, stop)
    return {"image": positions[:, None], "label": positions, "index": positions}


def test_full_batches_pass_full_ones_and_top_up_the_short_end_from_the_filler():
    # 10 examples in batches of 4, two failed to decode: 4, 4, then a partial batch of 0.
    stream = iter([numbered(0, 4), numbered(4, 8)])
    filler_calls = []

    def filler():
        filler_calls.append(1)
        return iter({k: v[0] for k, v in numbered(i, i + 1).items()} for i in range(10))

    out = list(tf_pipeline.full_batches(stream, filler, 4, needed=3, what="epoch 0"))
    assert [b["label"].tolist() for b in out] == [[0, 1, 2, 3], [4, 5, 6, 7], [0, 1, 2, 3]]
    assert filler_calls == [1]

    partial = iter([numbered(0, 4), numbered(4, 6)])  # the last batch came out short
    out = list(tf_pipeline.full_batches(partial, filler, 4, needed=2, what="epoch 0"))
    assert [b["label"].tolist() for b in out] == [[0, 1, 2, 3], [4, 5, 0, 1]]

    full = iter([numbered(0, 4), numbered(4, 8)])
    out = list(tf_pipeline.full_batches(full, lambda: pytest.fail("no filler"), 4, 2, "e"))
    assert len(out) == 2  # nothing failed: the filler is never built

    with pytest.raises(DataError, match="epoch 3 cannot fill its batches"):
        list(tf_pipeline.full_batches(iter([]), lambda: iter([]), 4, 1, "epoch 3"))


def test_gaps_name_the_missing_positions_and_stop_at_the_filler():
    gaps = tf_pipeline.Gaps(start=8, end=16)  # a resumed stream: positions 8.. of 16
    gaps.update(np.array([8, 9, 11]))
    gaps.update(np.array([12, 15]))
    assert gaps.missing == [10, 13, 14]
    gaps.update(np.array([0, 1]))  # back to the start: the filler, already counted
    assert gaps.missing == [10, 13, 14]
    tail = tf_pipeline.Gaps(start=0, end=6)
    tail.update(np.array([0, 1, 2]))
    tail.close()  # read to its end: 3, 4, 5 never came
    assert tail.missing == [3, 4, 5]


def test_pad_batch_masks_the_padding():
    batch = {"image": np.ones((3, 2, 2, 1), np.uint8), "label": np.array([4, 5, 6], np.int32)}
    padded = tf_pipeline.pad_batch(batch, 5, (2, 2, 1))
    assert padded["mask"].tolist() == [1, 1, 1, 0, 0]
    assert padded["label"].tolist() == [4, 5, 6, 0, 0]
    assert padded["image"][3:].sum() == 0 and padded["image"].shape == (5, 2, 2, 1)
    empty = tf_pipeline.pad_batch(None, 2, (2, 2, 1))
    assert empty["mask"].tolist() == [0, 0] and empty["image"].shape == (2, 2, 2, 1)
