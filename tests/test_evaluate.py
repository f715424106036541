"""After training: checkpoint evaluation, prediction, torchvision weights, fine-tuning, figures."""

import csv
import json
import os
import subprocess
import sys

import chex
import jax
import numpy as np
import pytest
from PIL import Image

from alexnet_jax import convert, data, evaluate, model, plots, run_files, steps, train
from alexnet_jax.errors import ConfigError, DataError
from alexnet_jax.metrics import read_metrics
from tests.test_train import NARROW, small_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    """A short digits run with two evaluations (steps 3 and 6) and their checkpoints."""
    workdir = str(tmp_path_factory.mktemp("digits_run"))
    config = small_config(num_train_steps=6, eval_every_epochs=3 / 89)  # 89 steps an epoch
    train.train_and_evaluate(config, workdir)
    return workdir


# --- evaluation ------------------------------------------------------------------------------


@pytest.mark.slow
def test_eval_mode_reproduces_the_training_evaluation_and_writes_its_files(digits_run):
    config = run_files.load_run_config(digits_run)
    evals = {r["step"]: r for r in read_metrics(digits_run) if r["split"] == "eval"}
    best = max(evals, key=lambda s: (evals[s]["top1"], s))
    (record,) = evaluate.evaluate_checkpoint(config, digits_run, "best")
    assert record["step"] == best and record["count"] == 359
    for key in ("top1", "top5", "loss"):
        assert record[key] == pytest.approx(evals[best][key], rel=1e-5, abs=1e-6), key
    with open(os.path.join(digits_run, "per_class_accuracy_center.csv")) as f:
        rows = list(csv.DictReader(f))
    assert [r["name"] for r in rows] == [str(d) for d in range(10)]
    assert sum(int(r["count"]) for r in rows) == 359
    top1 = sum(int(r["count"]) * float(r["top1"]) for r in rows) / 359
    assert top1 == pytest.approx(record["top1"], abs=1e-5)
    with Image.open(os.path.join(digits_run, "confusion_matrix_center.png")) as png:
        assert png.size == (600, 600)  # 6 x 6 inches at 100 dpi: class names on the axes
    logged = [r for r in read_metrics(digits_run) if r["split"] == "eval_checkpoint"]
    assert logged[-1]["top1"] == pytest.approx(record["top1"])


@pytest.mark.slow
def test_checkpoint_choice_and_errors(digits_run, tmp_path):
    config = run_files.load_run_config(digits_run)
    state, step = run_files.restore_state(config, digits_run, 4)  # the latest two: 4 and 6
    assert step == 4 and int(state.step) == 4
    assert run_files.restore_state(config, digits_run, "latest")[1] == 6
    with pytest.raises(FileNotFoundError, match="No checkpoint at step 5 in .*checkpoints"):
        run_files.restore_state(config, digits_run, 5)
    with pytest.raises(ValueError, match="use best, latest or a step number"):
        run_files.restore_state(config, digits_run, "newest")
    other = run_files.load_run_config(digits_run)
    other.num_classes = 5
    fc7 = 4096 // NARROW
    with pytest.raises(
        ValueError, match=rf"fc8/kernel: checkpoint \({fc7}, 10\), model \({fc7}, 5\)"
    ):
        run_files.restore_state(other, digits_run, "latest")
    other = run_files.load_run_config(digits_run)
    other.model.groups = 2
    with pytest.raises(ValueError, match=r"does not fit AlexNet\(variant='paper', groups=2.*conv2"):
        run_files.restore_state(other, digits_run, "latest")
    with pytest.raises(FileNotFoundError, match="config.json.* does not exist"):
        run_files.load_run_config(str(tmp_path))


@pytest.fixture(scope="module")
def trained_digits(tmp_path_factory):
    """Two epochs on the digits (about 0.9 held-out top-1): a checkpoint that knows digits.
    The network narrowed as the loop's tests narrow it (``NARROW``).
    Trained by main.py on one CPU device (2.5x faster here than on 4 forced devices), run
    from another folder as a user may: the default config is the project's, not the cwd's."""
    workdir = str(tmp_path_factory.mktemp("trained_digits"))
    elsewhere = tmp_path_factory.mktemp("elsewhere")
    command = [sys.executable, os.path.join(ROOT, "main.py"), f"--workdir={workdir}",
               "--config.batch_size=32", "--config.num_train_steps=90",
               "--config.eval_every_epochs=100", "--config.checkpoint_every_steps=1000",
               "--config.progress_bar=False", f"--config.model.width_divisor={NARROW}"]  # fmt: skip
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
    result = subprocess.run(command, cwd=elsewhere, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert not os.listdir(elsewhere)  # everything went to the workdir
    return workdir


@pytest.mark.slow
def test_predict_recognizes_digits_saved_as_image_files(trained_digits, tmp_path):
    """Held-out digits written as PNG files: predict reads them as the digits source does,
    and the trained checkpoint names nearly all of them."""
    from sklearn.datasets import load_digits

    from alexnet_jax.data.digits import split_digits

    digits = load_digits()
    _, held_out = split_digits(len(digits.target))
    chosen = [next(i for i in held_out if digits.target[i] == d) for d in range(10)]
    paths = []
    for i in chosen:
        path = tmp_path / f"digit{i}.png"
        Image.fromarray(np.round(digits.images[i] * 255 / 16).astype(np.uint8)).save(path)
        paths.append(str(path))
    config = run_files.load_run_config(trained_digits)
    results = evaluate.predict_files(config, trained_digits, paths, "latest")
    predicted = [int(r["top"][0][0]) for r in results]
    assert sum(p == d for p, d in zip(predicted, range(10), strict=True)) >= 8, predicted
    assert all(r["top"][0][1] > r["top"][1][1] for r in results)


@pytest.mark.slow
def test_predict_mode_prints_top5_with_class_names_and_names_bad_files(digits_run, tmp_path):
    digit = np.zeros((40, 40), np.uint8)
    digit[8:32, 18:23] = 255  # a light "1" on a dark ground, like the digits
    Image.fromarray(digit).save(tmp_path / "one.png")
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff not really")
    command = [sys.executable, os.path.join(ROOT, "main.py"), "--mode=predict",
               f"--workdir={digits_run}", "--checkpoint=latest", "--images",
               str(tmp_path / "one.png")]  # fmt: skip
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.strip().splitlines()
    assert lines[0].endswith("one.png") and len(lines) == 6
    probabilities = [float(line.split("%")[0]) / 100 for line in lines[1:]]
    assert probabilities == sorted(probabilities, reverse=True) and sum(probabilities) <= 1.0001
    assert {line.split()[-1] for line in lines[1:]} <= {str(d) for d in range(10)}

    config = run_files.load_run_config(digits_run)
    direct = evaluate.predict_files(config, digits_run, [str(tmp_path / "one.png")], "latest")
    assert [name for name, _ in direct[0]["top"]] == [line.split()[-1] for line in lines[1:]]
    with pytest.raises(ValueError, match="Cannot read image .*broken.jpg"):
        evaluate.predict_files(config, digits_run, [str(tmp_path / "broken.jpg")])


@pytest.mark.slow
def test_predict_takes_folders_and_classifies_in_batches_as_in_one(digits_run, tmp_path):
    """Seven files at eval_batch_size=3 (batches of 3, 3 and a padded 1) get the
    probabilities they get in one batch of seven; a folder stands for its JPEG and PNG files,
    sorted, and nothing else in it."""
    from sklearn.datasets import load_digits

    folder = tmp_path / "photos"
    (folder / "inner").mkdir(parents=True)
    digits = load_digits()
    for i in range(7):
        pixels = np.round(digits.images[i] * 255 / 16).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"{6 - i}.{'png' if i % 2 else 'JPG'}")
    (folder / "notes.txt").write_text("not an image")
    Image.fromarray(pixels).save(folder / "inner" / "deeper.png")  # subfolders are not read
    expected = sorted(str(folder / f"{i}.{'JPG' if i % 2 == 0 else 'png'}") for i in range(7))
    assert evaluate.image_paths([str(folder)]) == expected
    assert evaluate.image_paths(["a.jpg", str(folder)]) == ["a.jpg"] + expected

    config = run_files.load_run_config(digits_run)
    config.eval_batch_size = 7
    whole = evaluate.predict_files(config, digits_run, expected, "latest")
    config.eval_batch_size = 3
    batched = list(evaluate.iter_predictions(config, digits_run, [str(folder)], "latest"))
    assert [r["path"] for r in batched] == expected
    for one, other in zip(whole, batched, strict=True):
        assert [name for name, _ in one["top"]] == [name for name, _ in other["top"]]
        np.testing.assert_allclose(
            [p for _, p in one["top"]], [p for _, p in other["top"]], rtol=1e-5, atol=1e-6
        )
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="Folder .*empty' holds no image files"):
        evaluate.predict_files(config, digits_run, [str(tmp_path / "empty")])


# --- torchvision weights -----------------------------------------------------------------------


def torchvision_alexnet(num_classes=1000):
    """torchvision.models.alexnet's layout, built from torch.nn (torchvision is not needed)."""
    torch = pytest.importorskip("torch")
    nn = torch.nn

    class AlexNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.features = nn.Sequential(
                nn.Conv2d(3, 64, 11, 4, 2), nn.ReLU(), nn.MaxPool2d(3, 2),
                nn.Conv2d(64, 192, 5, padding=2), nn.ReLU(), nn.MaxPool2d(3, 2),
                nn.Conv2d(192, 384, 3, padding=1), nn.ReLU(),
                nn.Conv2d(384, 256, 3, padding=1), nn.ReLU(),
                nn.Conv2d(256, 256, 3, padding=1), nn.ReLU(), nn.MaxPool2d(3, 2),
            )  # fmt: skip
            self.avgpool = nn.AdaptiveAvgPool2d((6, 6))
            self.classifier = nn.Sequential(
                nn.Dropout(0.5), nn.Linear(256 * 36, 4096), nn.ReLU(),
                nn.Dropout(0.5), nn.Linear(4096, 4096), nn.ReLU(),
                nn.Linear(4096, num_classes),
            )  # fmt: skip

        def forward(self, x):
            return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))

    torch.manual_seed(0)
    return AlexNet().eval()


@pytest.mark.parametrize("size", [224, 256])  # 256: the adaptive pool averages 7x7 to 6x6
def test_torchvision_weights_give_pytorchs_logits(size):
    torch = pytest.importorskip("torch")
    net = torchvision_alexnet()
    variables = convert.torchvision_to_flax(net.state_dict())
    images = np.random.default_rng(0).normal(size=(2, 3, size, size)).astype(np.float32)
    with torch.no_grad():
        expected = net(torch.from_numpy(images)).numpy()
    ours = model.AlexNet(variant="torchvision").apply(variables, images.transpose(0, 2, 3, 1))
    chex.assert_shape(ours, (2, 1000))
    np.testing.assert_allclose(
        np.asarray(ours), expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max()
    )


def test_bad_state_dicts_are_named():
    state = {k: v.numpy() for k, v in torchvision_alexnet(num_classes=7).state_dict().items()}
    assert convert.torchvision_to_flax(state)["params"]["fc8"]["kernel"].shape == (4096, 7)
    prefixed = {f"module.{k}": v for k, v in state.items()}  # saved from DataParallel
    chex.assert_trees_all_equal(
        convert.torchvision_to_flax(prefixed), convert.torchvision_to_flax(state)
    )
    missing = dict(state)
    del missing["features.6.bias"]
    with pytest.raises(ValueError, match=r"missing \['features.6.bias'\]"):
        convert.torchvision_to_flax(missing)
    wrong = dict(state, **{"classifier.1.weight": np.zeros((4096, 6400), np.float32)})
    with pytest.raises(ValueError, match=r"'classifier.1.weight'\] has shape \(4096, 6400\), "
                       r"expected \(4096, 9216\)"):  # fmt: skip
        convert.torchvision_to_flax(wrong)
    bad_bias = dict(state, **{"features.0.bias": np.zeros(3, np.float32)})
    with pytest.raises(ValueError, match=r"'features.0.bias'\] has shape \(3,\), expected \(64,\)"):
        convert.torchvision_to_flax(bad_bias)
    nan = dict(state, **{"features.3.weight": np.full((192, 64, 5, 5), np.nan, np.float32)})
    with pytest.raises(ValueError, match="'features.3.weight' holds NaN"):
        convert.torchvision_to_flax(nan)


@pytest.mark.slow
def test_pth_becomes_a_workdir_that_predicts_like_pytorch(tmp_path):
    torch = pytest.importorskip("torch")
    net = torchvision_alexnet(num_classes=1000)
    pth = tmp_path / "alexnet.pth"
    torch.save(net.state_dict(), pth)
    workdir = tmp_path / "converted"
    convert.main([str(pth), "--workdir", str(workdir)])
    config = run_files.load_run_config(str(workdir))
    assert config.model.variant == "torchvision" and config.image_size == 224
    names = run_files.class_names(str(workdir), 1000)
    assert names[0] == "n01440764"  # TFDS's ImageNet order (tench)

    photo = np.random.default_rng(1).integers(0, 256, (300, 400, 3), dtype=np.uint8)
    Image.fromarray(photo).save(tmp_path / "photo.png")
    (result,) = evaluate.predict_files(config, str(workdir), [str(tmp_path / "photo.png")])
    pixels = data.load_image(str(tmp_path / "photo.png"), config)  # 224x224 uint8
    mean = np.asarray(config.input.mean_rgb, np.float32)
    std = np.asarray(config.input.std_rgb, np.float32)
    x = torch.from_numpy(((pixels - mean) / std).transpose(2, 0, 1)[None].astype(np.float32))
    with torch.no_grad():
        probs = torch.softmax(net(x), -1)[0].numpy()
    top = np.argsort(-probs)[:5]
    assert [name for name, _ in result["top"]] == [names[c] for c in top]
    np.testing.assert_allclose([p for _, p in result["top"]], probs[top], rtol=1e-3)
    with pytest.raises(ConfigError, match="already holds checkpoints"):
        convert.main([str(pth), "--workdir", str(workdir)])
    (tmp_path / "notes.pth").write_text("not a checkpoint")
    with pytest.raises(ValueError, match="notes.pth.* is not a readable PyTorch state_dict"):
        convert.load_pth(str(tmp_path / "notes.pth"))


# --- fine-tuning -------------------------------------------------------------------------------


@pytest.mark.slow
def test_fine_tuning_copies_every_layer_but_a_new_head(digits_run, tmp_path):
    pytest.importorskip("tensorflow")
    from tests.test_input_pipeline import make_image_folder

    root = make_image_folder(tmp_path / "data")
    config = small_config(dataset="image_folder", data_dir=str(root), num_classes=2,
                          num_train_steps=1, init_from=digits_run, batch_size=8,
                          eval_batch_size=8, **{"input.resize_size": 80})  # fmt: skip
    source, step = run_files.params_from_workdir(digits_run)
    state = steps.create_train_state(
        jax.random.PRNGKey(1), config, steps.create_model(config, 2), (67, 67, 1)
    )
    tuned = train.init_from(state, config)
    for layer in ("conv1", "conv2", "conv3", "conv4", "conv5", "fc6", "fc7"):
        chex.assert_trees_all_equal(tuned.params[layer], source[layer])
    chex.assert_shape(tuned.params["fc8"]["kernel"], (4096 // NARROW, 2))
    chex.assert_trees_all_equal(tuned.params["fc8"], state.params["fc8"])  # fresh head
    wrong = small_config(dataset="image_folder", data_dir=str(root), num_classes=3, batch_size=8)
    with pytest.raises(ValueError, match=r"num_classes=3 but 'image_folder' has 2 classes"):
        train.train_and_evaluate(wrong, str(tmp_path / "wrong"))
    tuned_dir = str(tmp_path / "tuned")
    result = train.train_and_evaluate(config, tuned_dir)  # runs end to end
    assert result["step"] == 1

    # --mode=eval on an image folder: the center crop as in training, and the 10 crops.
    center, ten = evaluate.evaluate_checkpoint(config, tuned_dir, "latest")
    assert (center["crops"], ten["crops"]) == (1, 10) and center["count"] == ten["count"] == 12
    assert center["top1"] == pytest.approx(result["top1"], abs=1e-6)
    assert center["loss"] == pytest.approx(result["loss"], rel=1e-4)
    for tag in ("center", "10crop"):
        with open(os.path.join(tuned_dir, f"per_class_accuracy_{tag}.csv")) as f:
            assert [row["name"] for row in csv.DictReader(f)] == ["cat", "dog"]

    config.model.variant = "torchvision"  # another architecture: 64 conv1 filters, not 96
    state = steps.create_train_state(
        jax.random.PRNGKey(1), config, steps.create_model(config, 2), (67, 67, 1)
    )
    with pytest.raises(
        ValueError,
        match=rf"'conv1' of .* does not fit .*kernel \(11, 11, 1, {96 // NARROW}\) there, "
        rf"\(11, 11, 1, {64 // NARROW}\)",
    ):
        train.init_from(state, config)


# --- figures -----------------------------------------------------------------------------------


@pytest.mark.slow
def test_plots_write_the_curves_and_the_conv1_kernel_grid(digits_run):
    plots.main(["--workdir", digits_run])
    with Image.open(os.path.join(digits_run, "training_curves.png")) as png:
        assert png.size == (1500, 400)  # three panels: loss, top-1, top-5
    with Image.open(os.path.join(digits_run, "conv1_kernels.png")) as png:
        assert png.size[0] == 1200 and np.asarray(png.convert("L")).std() > 10
    kernels = np.random.default_rng(0).normal(size=(11, 11, 3, 96))
    grid = plots.kernel_grid(kernels, columns=12, border=1)
    chex.assert_shape(grid, (8 * 12 + 1, 12 * 12 + 1, 3))
    cell = grid[1:12, 1 + 12 * 5 : 12 + 12 * 5]  # kernel 5, scaled to its own range
    assert cell.min() == 0.0 and cell.max() == 1.0
    k = kernels[..., 5]
    np.testing.assert_allclose(cell, (k - k.min()) / (k.max() - k.min()))
    assert np.all(grid[0] == 1.0) and np.all(grid[:, 12] == 1.0)  # white borders


def test_features_example_from_the_readme():
    net = model.AlexNet(num_classes=10)
    variables = net.init(jax.random.PRNGKey(0), np.zeros((1, 227, 227, 3), np.float32))
    images = np.random.default_rng(0).random((2, 227, 227, 3)).astype(np.float32)
    feats = model.features(net, variables, images, layers=("conv1", "conv5", "fc7"))
    chex.assert_shape(feats["conv1"], (2, 27, 27, 96))
    chex.assert_shape(feats["conv5"], (2, 6, 6, 256))
    chex.assert_shape(feats["fc7"], (2, 4096))
    assert json.dumps(sorted(feats)) == '["conv1", "conv5", "fc7"]'
