"""Data at scale: the paper's 256x256 preparation into records, the random-access loader with
a true per-epoch shuffle, O(1) exact resume, process sharding, augmentation on the device."""

import contextlib
import json
import logging
import os
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from alexnet_jax import data, train
from alexnet_jax.data import augment as augment_lib
from alexnet_jax.data import prepare, records
from alexnet_jax.data.images import paper_square
from alexnet_jax.data.prepared import PreparedLoader
from alexnet_jax.errors import ConfigError, DataError, UserError
from alexnet_jax.metrics import read_metrics
from tests.test_train import error_text, small_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def photo_folder(root, classes=3, per_class=7, size=(40, 52), val_per_class=3):
    """train/ and val/ of real JPEGs and PNGs whose classes differ in color, plus a file in
    train/ that is not an image."""
    rng = np.random.default_rng(0)
    for split, count in (("train", per_class), ("val", val_per_class)):
        for c in range(classes):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = rng.integers(0, 120, size + (3,), dtype=np.uint8)
                pixels[..., c % 3] += 120
                Image.fromarray(pixels).save(folder / f"{i}.{'png' if i % 2 else 'jpg'}")
    (root / "train" / "class0" / "broken.jpg").write_bytes(b"\xff\xd8\xff" + b"0" * 50)
    return root


def prepared_config(output, **overrides):
    config = small_config(
        dataset="prepared",
        data_dir=str(output),
        channels=3,
        num_classes=3,
        batch_size=4,
        eval_batch_size=4,
        image_size=67,
    )
    for key, value in overrides.items():
        target = config.input if key in config.input else config
        target[key] = value
    return config


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """A small folder prepared with the paper's square at 76 (for 67 crops), as raw pixels."""
    root = photo_folder(tmp_path_factory.mktemp("photos"))
    output = tmp_path_factory.mktemp("prepared")
    options = prepare.Options(size=76, encoding="raw")
    prepare.prepare("image_folder", str(root), str(output), options, workers=0, shard_size=8)
    return root, output


# --- preparation -------------------------------------------------------------------------------


def test_preparation_writes_the_papers_squares_with_labels_names_and_checksums(prepared):
    root, output = prepared
    metadata = records.Metadata.load(str(output))
    assert metadata.class_names == ["class0", "class1", "class2"]
    assert (metadata.size, metadata.channels, metadata.encoding) == (76, 3, "raw")
    train_info = metadata.splits["train"]
    assert train_info["num_examples"] == 21 and metadata.splits["val"]["num_examples"] == 9
    assert [f["name"] for f in train_info["failed"]] == ["train/class0/broken.jpg"]
    assert "broken.jpg" in train_info["failed"][0]["error"]
    assert len(train_info["shards"]) == 3  # 22 files in shards of 8; the broken one left out
    seen = {}
    for shard in train_info["shards"]:
        path = str(output / shard["file"])
        assert records.sha256(path) == shard["sha256"]
        for record in records.read_all(path):
            seen[record["name"]] = record
    assert len(seen) == 21
    record = seen["train/class2/3.png"]
    assert record["label"] == 2
    pixels = np.frombuffer(record["image"], np.uint8).reshape(76, 76, 3)
    expected = paper_square(str(root / "train/class2/3.png"), 76)  # central square, resized
    np.testing.assert_array_equal(pixels, expected)


def test_jpeg_records_decode_close_to_the_squares(tmp_path):
    root = photo_folder(tmp_path / "photos", classes=2, per_class=2, val_per_class=1)
    output = tmp_path / "jpeg"
    prepare.prepare("image_folder", str(root), str(output), prepare.Options(size=48), workers=0)
    metadata = records.Metadata.load(str(output))
    reader = records.SplitReader(str(output), metadata, "train")
    record = reader.read(0)
    image = reader.image(record)
    chex.assert_shape(image, (48, 48, 3))
    expected = paper_square(str(root / record["name"]), 48)
    assert np.abs(image.astype(int) - expected.astype(int)).mean() < 4  # JPEG quality 95


def test_an_interrupted_preparation_keeps_its_finished_shards(tmp_path):
    root = photo_folder(tmp_path / "photos")
    output = tmp_path / "out"
    written = []

    def failing_after_two(task):
        if len(written) == 2:
            raise KeyboardInterrupt  # the user's Ctrl-C, or a killed worker
        written.append(task.file)
        return prepare.prepare_shard(task)

    with pytest.raises(KeyboardInterrupt):
        prepare.prepare(
            "image_folder",
            str(root),
            str(output),
            workers=0,
            shard_size=8,
            shard_fn=failing_after_two,
        )
    assert not (output / records.METADATA_FILE).exists()
    kept = {name: os.stat(output / name).st_mtime_ns for name in written}

    rerun = []

    def counting(task):
        rerun.append(task.file)
        return prepare.prepare_shard(task)

    metadata = prepare.prepare(
        "image_folder", str(root), str(output), workers=0, shard_size=8, shard_fn=counting
    )
    assert not set(rerun) & set(written) and len(rerun) == 5 - 2  # 3 train + 2 val shards
    assert {name: os.stat(output / name).st_mtime_ns for name in written} == kept
    straight = prepare.prepare(
        "image_folder", str(root), str(tmp_path / "straight"), workers=0, shard_size=8
    )
    assert metadata.splits == straight.splits  # the same shards, byte for byte (SHA-256)

    with pytest.raises(UserError, match="holds shards of another preparation"):
        prepare.prepare(
            "image_folder",
            str(root),
            str(output),
            prepare.Options(size=64),
            workers=0,
            shard_size=8,
        )


def test_preparation_in_worker_processes_from_the_command_line(tmp_path):
    root = photo_folder(tmp_path / "photos", classes=2, per_class=4, val_per_class=2)
    command = [
        sys.executable,
        "-m",
        "alexnet_jax.data.prepare",
        "--source",
        "image_folder",
        "--data_dir",
        str(root),
        "--output",
        str(tmp_path / "out"),
        "--size",
        "32",
        "--workers",
        "2",
        "--shard_size",
        "3",
    ]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, error_text(result.stderr)
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary == {
        "output": str(tmp_path / "out"),
        "classes": 2,
        "train": 8,
        "val": 4,
        "failed": 1,
    }
    assert "train/class0/broken.jpg" in result.stderr
    bad = subprocess.run(command[:-4] + ["--encoding", "png"], capture_output=True, text=True)
    assert bad.returncode == 2 and "invalid choice: 'png'" in bad.stderr


def tiny_tfds(data_dir):
    """A real (not mocked) TFDS data set of 10 train and 4 test images, prepared in
    ``data_dir``: sliced reads and shuffled files behave as they do on ImageNet."""
    tfds = pytest.importorskip("tensorflow_datasets")
    if "tiny_images" in tfds.list_builders(with_community_datasets=False):  # defined already
        builder = tfds.builder("tiny_images", data_dir=str(data_dir))
        builder.download_and_prepare()
        return builder.name

    class TinyImages(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(
                builder=self,
                features=tfds.features.FeaturesDict(
                    {
                        "image": tfds.features.Image(shape=(32, 40, 3)),
                        "label": tfds.features.ClassLabel(names=["even", "odd"]),
                    }
                ),
            )

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples(10), "test": self._generate_examples(4)}

        def _generate_examples(self, count):
            rng = np.random.default_rng(count)
            for i in range(count):
                image = rng.integers(0, 256, (32, 40, 3), dtype=np.uint8)
                yield f"image{i:02d}", {"image": image, "label": i % 2}

    builder = TinyImages(data_dir=str(data_dir))
    builder.download_and_prepare()
    return builder.name


def read_in_a_thread(read, timeout=180):
    """``read()``'s result, or a test failure if it does not return in ``timeout`` seconds
    (a tf.data loop that never ends would otherwise hang the suite)."""
    import threading

    result = []
    worker = threading.Thread(target=lambda: result.append(read()), daemon=True)
    worker.start()
    worker.join(timeout)
    assert result, f"reading did not finish in {timeout} s"
    return result[0]


@pytest.mark.parametrize("damage", ["cut short", "a flipped byte"])
def test_damaged_tfds_files_lose_their_records_and_are_named_without_stopping(
    tmp_path, monkeypatch, caplog, damage
):
    """A torn or corrupt TFRecord file of a TFDS data set: training and evaluation go on
    without its unreadable records and name the file (TFDS's own count check, retried by
    ``ignore_errors``, used to make the first batch wait forever)."""
    pytest.importorskip("tensorflow_datasets")
    from alexnet_jax.data import tf_sources

    name = tiny_tfds(tmp_path)
    real_builder = tf_sources.tfds.builder
    monkeypatch.setattr(
        tf_sources.tfds, "builder", lambda _, data_dir: real_builder(name, data_dir=data_dir)
    )
    files = {}
    for split in ("train", "test"):
        (path,) = (tmp_path / name / "1.0.0").glob(f"{name}-{split}.tfrecord-*")
        content = bytearray(path.read_bytes())
        if damage == "cut short":
            content = content[: len(content) // 2]
        else:  # a record's length field: its header no longer leads to the next record
            content[len(content) // 2] ^= 0xFF
        path.write_bytes(bytes(content))
        files[split] = path
    config = small_config(dataset="mnist", data_dir=str(tmp_path), channels=3, num_classes=2,
                          batch_size=4, eval_batch_size=4)  # fmt: skip
    config.image_size, config.input.resize_size = 24, 28
    dataset = data.create_dataset(config)
    assert dataset.train_size == 10  # as the metadata says
    steps = 2  # an epoch: 10 // 4
    with caplog.at_level(logging.WARNING):
        stream = dataset.train_batches(0)
        batches = read_in_a_thread(lambda: [next(stream) for _ in range(2 * steps + 1)])
        evaluation = read_in_a_thread(lambda: list(dataset.eval_batches()))
    assert all(b["image"].shape == (4, 1, 24, 24, 3) for b in batches)
    read = sum(int(b["mask"].sum()) for b in evaluation)
    assert 0 < read < 4
    assert f"mnist eval: {4 - read} records could not be read" in caplog.text
    assert "mnist train, epoch 0:" in caplog.text and "records could not be read" in caplog.text
    assert f"{files['train']}: " in caplog.text and f"{files['test']}: " in caplog.text
    assert "of 10 records" in caplog.text and "of 4 records" in caplog.text
    assert "failed to decode" not in caplog.text  # nothing is blamed on the images
    with pytest.raises(
        DataError,
        match=f"Cannot read {name} train\\[0:10\\] from .*1.0.0 \\(.*\\): its files are damaged",
    ) as failure:
        prepare.prepare(name, str(tmp_path), str(tmp_path / "out"), prepare.Options(size=28),
                        workers=0)  # fmt: skip
    assert "{{" not in str(failure.value) and "[Op:" not in str(failure.value)


def test_tfds_data_prepares_into_records(tmp_path):
    name = tiny_tfds(tmp_path / "tfds")
    metadata = prepare.prepare(
        name,
        str(tmp_path / "tfds"),
        str(tmp_path / "out"),
        prepare.Options(size=36),
        workers=0,
        shard_size=4,
    )
    assert metadata.splits["train"]["num_examples"] == 10
    assert len(metadata.splits["train"]["shards"]) == 3  # 4 + 4 + 2
    assert metadata.splits["val"]["num_examples"] == 4  # the "test" split
    assert metadata.class_names == ["even", "odd"]
    reader = records.SplitReader(str(tmp_path / "out"), metadata, "train")
    found = [reader.read(i) for i in range(10)]
    assert len({r["name"] for r in found}) == 10  # every record once, named by its TFDS id
    assert all(r["name"].startswith(f"{name}-train.") for r in found)
    assert sorted(r["label"] for r in found) == [0] * 5 + [1] * 5
    chex.assert_shape(reader.image(found[3]), (36, 36, 3))


# --- the loader --------------------------------------------------------------------------------


def labels_of(batches):
    return np.concatenate([np.asarray(b["label"]).ravel() for b in batches])


def test_resume_at_any_step_reads_the_same_batches_as_a_straight_run(prepared):
    _, output = prepared
    dataset = data.create_dataset(prepared_config(output))
    straight = [next(b) for b in [dataset.train_batches(0)] for _ in range(12)]  # 2+ epochs
    for start in (3, 5, 11):
        resumed = dataset.train_batches(start)
        for expected in straight[start:]:
            got = next(resumed)
            np.testing.assert_array_equal(got["image"], expected["image"])
            np.testing.assert_array_equal(got["label"], expected["label"])
    chex.assert_shape(straight[0]["image"], (4, 1, 76, 76, 3))  # uint8, augmented on the device
    assert straight[0]["image"].dtype == np.uint8
    assert not np.array_equal(labels_of(straight[:5]), labels_of(straight[5:10]))  # reshuffled


def test_every_epoch_is_a_permutation_cut_into_batches(prepared):
    _, output = prepared
    config = prepared_config(output)
    loader = PreparedLoader(config, records.Metadata.load(str(output)))
    assert loader.steps_per_epoch == 5  # 21 examples, batches of 4: one left out each epoch
    for epoch in range(3):
        chosen = np.concatenate([loader.batch_indices(epoch * 5 + s) for s in range(5)])
        assert len(set(chosen.tolist())) == 20 and chosen.max() < 21


def test_two_processes_read_disjoint_parts_covering_each_global_batch(prepared, monkeypatch):
    _, output = prepared
    config = prepared_config(output)
    metadata = records.Metadata.load(str(output))
    single = PreparedLoader(config, metadata)
    parts = []
    for process in range(2):
        monkeypatch.setattr(jax, "process_count", lambda: 2)
        monkeypatch.setattr(jax, "process_index", lambda p=process: p)
        loader = PreparedLoader(config, metadata)
        parts.append([loader.batch_indices(step) for step in range(10)])
    monkeypatch.undo()
    for step in range(10):
        first, second = parts[0][step], parts[1][step]
        assert len(first) == len(second) == 2 and not set(first) & set(second)
        np.testing.assert_array_equal(np.concatenate([first, second]), single.batch_indices(step))


def test_evaluation_has_center_and_ten_crops_and_masks_the_padding(prepared):
    _, output = prepared
    config = prepared_config(output)
    batches = list(data.create_dataset(config).eval_batches())
    assert sum(b["mask"].sum() for b in batches) == 9  # 3 batches of 4, 3 padded
    assert sorted(
        labels_of(batches)[np.concatenate([b["mask"].ravel() for b in batches]) > 0].tolist()
    ) == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    chex.assert_shape(batches[0]["image"], (4, 1, 67, 67, 3))
    config.input.eval_crops = 10
    ten = next(data.create_dataset(config).eval_batches())["image"]
    chex.assert_shape(ten, (4, 1, 10, 67, 67, 3))
    np.testing.assert_array_equal(ten[:, :, 4], batches[0]["image"])  # the center crop
    np.testing.assert_array_equal(ten[:, :, 5:], ten[:, :, :5, :, ::-1])  # the mirrors


def test_config_must_fit_the_records(prepared):
    _, output = prepared
    with pytest.raises(ConfigError, match="resize_size=256 but the records .* are 76x76"):
        data.create_dataset(prepared_config(output, resize_size=256))
    with pytest.raises(ConfigError, match="image_size=80 is larger than the records"):
        data.create_dataset(prepared_config(output, image_size=80))
    with pytest.raises(ConfigError, match="channels=1 but the records .* have 3 channels"):
        data.create_dataset(prepared_config(output, channels=1))
    with pytest.raises(DataError, match="holds no prepared records"):
        data.create_dataset(prepared_config(output.parent))


def test_a_damaged_shard_is_named(prepared, tmp_path):
    _, output = prepared
    copy = tmp_path / "copy"
    copy.mkdir()
    for name in os.listdir(output):
        (copy / name).write_bytes((output / name).read_bytes())
    shard = records.Metadata.load(str(copy)).splits["train"]["shards"][1]["file"]
    (copy / shard).write_bytes((copy / shard).read_bytes()[:100])
    with pytest.raises(DataError, match=f"{shard}.* has 100 bytes.*cut short"):
        data.create_dataset(prepared_config(copy))


def test_the_prepared_path_imports_no_tensorflow(prepared):
    _, output = prepared
    code = (
        "import sys; from tests.test_prepared import prepared_config; from alexnet_jax import data;"
        f"d = data.create_dataset(prepared_config({str(output)!r}));"
        "b = next(d.train_batches(0)); e = next(d.eval_batches());"
        "assert 'tensorflow' not in sys.modules, 'TensorFlow was imported'; print(b['image'].shape)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, error_text(result.stderr)
    assert "(4, 1, 76, 76, 3)" in result.stdout


@pytest.mark.slow
def test_trains_from_prepared_records_with_the_augmentation_on_the_device(prepared, tmp_path):
    _, output = prepared
    config = prepared_config(
        output,
        num_train_steps=6,
        pca_lighting_std=0.1,
        learning_rate=1e-4,
        normalization="mean_image",
        mean_image_batches=2,
    )
    result = train.train_and_evaluate(config, str(tmp_path / "device"))
    assert result["step"] == 6 and np.isfinite(result["loss"])
    mean = np.load(tmp_path / "device" / "mean_image.npy")
    chex.assert_shape(mean, (67, 67, 3))  # of the augmented crops, not of the stored squares
    config.input.augment_on = "host"
    host = train.train_and_evaluate(config, str(tmp_path / "host"))
    for key in ("loss", "top1"):  # the same crops, flips and lighting either way
        assert host[key] == pytest.approx(result[key], rel=1e-5, abs=1e-6)
    np.testing.assert_allclose(np.load(tmp_path / "host" / "mean_image.npy"), mean, rtol=1e-6)
    assert (
        len([r for r in read_metrics(str(tmp_path / "host")) if r["split"] == "train"]) == 3
    )  # log_every_steps=2


# --- augmentation on the device ----------------------------------------------------------------


def coded_batch(n=6, size=12):
    """Pixel (y, x) of image k holds y * 16 + x + k in every channel (crops say where they are
    from; small enough for uint8)."""
    y, x = np.meshgrid(np.arange(size), np.arange(size), indexing="ij")
    base = (y * 16 + x)[None, ..., None] + np.arange(n)[:, None, None, None]
    return np.repeat(base, 3, axis=-1).astype(np.uint8)


def augment_config(**fields):
    config = small_config()
    config.input.update(dict(random_crop=True, random_flip=True, pca_lighting_std=0.0))
    config.input.update(fields)
    return config.input


def test_device_crops_are_windows_and_flips_are_mirrors_half_the_time():
    images = coded_batch(n=64)
    augment = jax.jit(augment_lib.make_augment(augment_config(), 7, seed=0))
    out = np.asarray(augment(images, 3, 0))
    chex.assert_shape(out, (64, 7, 7, 3))
    offsets, flips = set(), 0
    for k in range(64):
        crop = out[k, ..., 0].astype(int) - k
        flipped = crop[0, 0] > crop[0, -1]
        flips += flipped
        if flipped:
            crop = crop[:, ::-1]
        y0, x0 = divmod(int(crop[0, 0]), 16)
        assert 0 <= y0 <= 5 and 0 <= x0 <= 5
        np.testing.assert_array_equal(crop, images[k, y0 : y0 + 7, x0 : x0 + 7, 0] - k)
        offsets.add((y0, x0))
    assert len(offsets) > 15 and 16 < flips < 48
    center = augment_lib.make_augment(augment_config(random_crop=False, random_flip=False), 7, 0)
    np.testing.assert_array_equal(np.asarray(center(images, 0, 0)), images[:, 2:9, 2:9])


def test_device_augmentation_depends_on_seed_step_and_global_position_only():
    images = coded_batch(n=8)
    augment = augment_lib.make_augment(augment_config(pca_lighting_std=0.1), 7, seed=4)
    whole = np.asarray(augment(images, 5, 0))
    halves = [np.asarray(augment(images[:4], 5, 0)), np.asarray(augment(images[4:], 5, 4))]
    np.testing.assert_array_equal(whole, np.concatenate(halves))  # 1 device or 2: the same
    assert not np.array_equal(whole, np.asarray(augment(images, 6, 0)))
    other_seed = augment_lib.make_augment(augment_config(pca_lighting_std=0.1), 7, seed=5)
    assert not np.array_equal(whole, np.asarray(other_seed(images, 5, 0)))


def test_device_lighting_adds_the_eigenvector_combination_drawn_for_each_example():
    """Each image is shifted by 255 V (alpha * lambda), alpha ~ N(0, s^2) drawn from the
    example's key (seed, step, position), the same shift on every pixel, then rounded."""
    images = np.full((50, 2, 2, 3), 128, np.uint8)
    config = augment_config(random_crop=False, random_flip=False, pca_lighting_std=0.1)
    out = np.asarray(augment_lib.make_augment(config, 2, seed=3)(jnp.asarray(images), 7, 100))
    vec, val = np.asarray(augment_lib.PCA_EIGVEC), np.asarray(augment_lib.PCA_EIGVAL)
    step_key = jax.random.fold_in(jax.random.PRNGKey(3), 7)
    for k in range(50):
        light_key = jax.random.split(jax.random.fold_in(step_key, 100 + k), 3)[2]
        alpha = 0.1 * np.asarray(jax.random.normal(light_key, (3,)))
        expected = np.clip(np.round(128 + 255.0 * vec @ (alpha * val)), 0, 255)
        np.testing.assert_array_equal(out[k], np.broadcast_to(expected, (2, 2, 3)), err_msg=k)
    assert len({tuple(out[k, 0, 0]) for k in range(50)}) > 20  # a draw per example


# --- image folders and TFDS on the tf.data path --------------------------------------------------


def test_image_folder_batches_mix_every_class_far_beyond_the_shuffle_buffer(tmp_path):
    """1,200 files in 20 class folders (listed class by class), a shuffle buffer of 16: the
    first 160 examples still come from every class, about 8 each."""
    pytest.importorskip("tensorflow")
    for split, count in (("train", 60), ("val", 1)):
        for c in range(20):
            folder = tmp_path / split / f"c{c:02d}"
            folder.mkdir(parents=True)
            pixels = np.full((8, 8, 3), c * 12, np.uint8)
            for i in range(count):
                Image.fromarray(pixels).save(folder / f"{i}.png")
    config = small_config(
        dataset="image_folder",
        data_dir=str(tmp_path),
        channels=3,
        num_classes=20,
        batch_size=32,
        image_size=8,
    )
    config.input.shuffle_buffer, config.input.resize_size = 16, 8
    batches = data.create_dataset(config).train_batches(0)
    counts = np.bincount(labels_of([next(batches) for _ in range(5)]), minlength=20)
    assert counts.min() >= 2 and counts.max() <= 16, counts  # class-ordered: 1-3 classes


def test_image_folder_resize_follows_the_crop_at_the_papers_ratio(tmp_path):
    """A user's folder of 48x48 pictures with the default config (67 crops): the image is
    resized to 76, not blown up to 256, so the crop sees 88 % of it."""
    pytest.importorskip("tensorflow")
    y, x = np.meshgrid(np.arange(48), np.arange(48), indexing="ij")
    gradient = np.repeat((x * 5)[..., None], 3, axis=-1).astype(np.uint8)  # 0 .. 235 across
    for split in ("train", "val"):
        for c in ("a", "b"):
            (tmp_path / split / c).mkdir(parents=True)
            for i in range(2):
                Image.fromarray(gradient).save(tmp_path / split / c / f"{i}.png")
    config = small_config(
        dataset="image_folder",
        data_dir=str(tmp_path),
        channels=3,
        num_classes=2,
        batch_size=4,
        eval_batch_size=4,
    )
    assert config.input.resize_size == 0 and data.dataset.resize_size(config) == 76
    image = next(data.create_dataset(config).eval_batches())["image"][0, 0, ..., 0]
    span = (int(image[33, -1]) - int(image[33, 0])) / 235
    assert 0.8 < span < 0.95, span  # at 256 it would be a quarter


class FakeBuilder:
    """A TFDS builder whose data is not prepared; download_and_prepare does what it's told."""

    def __init__(self, name, data_dir, calls, error=None):
        self.name, self.data_dir, self.calls, self.error = name, data_dir, calls, error

    def as_dataset(self, **kwargs):
        raise FileNotFoundError("not prepared")

    def download_and_prepare(self, **kwargs):
        self.calls.append((self.name, self.data_dir))
        if self.error:
            raise self.error


def test_tfds_data_is_downloaded_on_first_use_and_a_network_failure_is_one_line(monkeypatch):
    pytest.importorskip("tensorflow_datasets")
    from alexnet_jax.data import tf_sources

    calls = []
    error = ConnectionError("[Errno -3] Temporary failure in name resolution\nmore detail")
    fake = lambda name, data_dir: FakeBuilder(name, data_dir, calls, error)  # noqa: E731
    monkeypatch.setattr(tf_sources.tfds, "builder", fake)
    config = small_config(dataset="fashion_mnist", data_dir="/data/tfds", num_classes=10)
    with pytest.raises(DataError) as failure:
        data.create_dataset(config)
    assert calls == [("fashion_mnist", "/data/tfds")]  # asked for, where the config says
    message = str(failure.value)
    assert "Could not download 'fashion_mnist' into data_dir '/data/tfds'" in message
    assert "name resolution" in message and "\n" not in message

    calls.clear()
    config.download = False
    with pytest.raises(
        DataError, match="not prepared in data_dir '/data/tfds' and config.download=False"
    ):
        data.create_dataset(config)
    config = small_config(dataset="imagenet2012", data_dir="/data/tfds", num_classes=1000)
    with pytest.raises(DataError, match="needs a manual download"):
        data.create_dataset(config)
    assert calls == []


def test_a_real_tfds_builder_downloads_on_first_use_up_to_the_network(tmp_path, monkeypatch):
    """TFDS's own MNIST builder and download manager, run until they open their URLs (the
    network is the one part replaced): everything before it must work offline."""
    pytest.importorskip("tensorflow_datasets")
    from tensorflow_datasets.core.download import downloader

    urls = []

    @contextlib.contextmanager
    def no_network(url, **kwargs):
        urls.append(url)
        raise ConnectionError(f"no network in this test ({url})")
        yield  # a context manager, as TFDS uses it

    monkeypatch.setattr(downloader, "_open_url", no_network)
    config = small_config(dataset="mnist", data_dir=str(tmp_path), num_classes=10)
    with pytest.raises(DataError) as failure:
        data.create_dataset(config)
    files = ("t10k-images-idx3", "t10k-labels-idx1", "train-images-idx3", "train-labels-idx1")
    mnist = "https://storage.googleapis.com/cvdf-datasets/mnist"
    # TFDS opens the URLs from a thread pool and stops at the first failure, so how many of
    # the four were opened before it is up to the threads (3 in one CI run).
    assert urls and set(urls) <= {f"{mnist}/{name}-ubyte.gz" for name in files}, urls
    message = str(failure.value)
    assert f"Could not download 'mnist' into data_dir '{tmp_path}' (ConnectionError: no " \
        "network in this test" in message and "\n" not in message  # fmt: skip


def test_an_evaluation_where_nothing_decodes_is_an_error():
    from alexnet_jax.evaluate import evaluate_batches

    def step(state, batch):
        return {
            "top5": np.zeros((1, 2, 5), np.int32),
            "loss": np.zeros((1, 2)),
            "label": batch["label"],
            "mask": batch["mask"],
        }

    empty = [{"label": np.zeros((1, 2), np.int32), "mask": np.zeros((1, 2), np.float32)}]
    with pytest.raises(DataError, match="no example of the evaluation could be read"):
        evaluate_batches(step, None, iter(empty), 10)


@pytest.mark.slow
def test_the_folder_recipe_takes_its_class_count_from_the_folder(tmp_path):
    from configs import folder

    root = photo_folder(tmp_path / "photos")
    config = folder.get_config()
    config.update(
        dict(
            data_dir=str(root),
            image_size=67,
            batch_size=4,
            eval_batch_size=4,
            num_train_steps=2,
            progress_bar=False,
        )
    )
    assert config.num_classes == 0 and config.input.resize_size == 0
    result = train.train_and_evaluate(config, str(tmp_path / "run"))
    assert result["step"] == 2
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["num_classes"] == 3  # resolved from the folder for eval, predict, init_from
    finetune = folder.get_config("finetune")
    assert (finetune.model.variant, finetune.image_size, finetune.input.resize_size) == (
        "torchvision",
        224,
        256,
    )
    assert finetune.init_from == "runs/torchvision"
    with pytest.raises(ValueError, match="configs/folder.py:nonsense"):
        folder.get_config("nonsense")
