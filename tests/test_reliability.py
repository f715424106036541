"""Reliability: preemption across processes, damaged files, overrides, one-line errors, and
the inputs users really have (16-bit PNGs, CMYK, huge images, trailing bytes, odd names)."""

import dataclasses
import io
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import chex
import numpy as np
import pytest
from PIL import Image

from alexnet_jax import checkpointing, data, evaluate, metrics, normalization, run_files, train
from alexnet_jax.data import image_folder, images
from alexnet_jax.errors import CheckpointError, ConfigError, DataError, reason
from alexnet_jax.files import atomic_write
from tests.test_train import (
    NARROW,
    ROOT,
    SMALL_FLAGS,
    error_text,
    free_port,
    new_state,
    small_config,
)

# --- preemption -------------------------------------------------------------------------------


def start_process(workdir, log, *flags, env):
    command = [sys.executable, os.path.join(ROOT, "main.py"), f"--workdir={workdir}", *flags]
    return subprocess.Popen(
        command, cwd=ROOT, env=dict(os.environ, **env), stdout=log, stderr=subprocess.STDOUT
    )


def two_processes(workdir, tmp_path, name, *flags):
    port = free_port()
    runs = []
    for i in range(2):
        log = open(tmp_path / f"{name}{i}.log", "w")  # noqa: SIM115 - closed by the caller
        env = {
            "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
            "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}",
            "JAX_NUM_PROCESSES": "2",
            "JAX_PROCESS_ID": str(i),
        }
        runs.append(
            (
                start_process(workdir, log, *flags, "--config.distributed=yes", env=env),
                log,
                tmp_path / f"{name}{i}.log",
            )
        )
    return runs


def finish(runs, timeout=180):
    outputs = []
    for process, log, path in runs:
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            for other, _, _ in runs:
                other.kill()
            pytest.fail(f"a process hung; its log ends: {path.read_text()[-2000:]}")
        log.close()
        outputs.append(path.read_text())
    return outputs


@pytest.mark.slow
def test_a_preempted_two_process_run_stops_at_one_step_saves_once_and_resumes(tmp_path):
    """SIGTERM to both processes a second apart (as a cluster does): both stop after the same
    step, save that checkpoint once, exit 0; rerun, they resume from it."""
    workdir = tmp_path / "run"
    flags = (
        *SMALL_FLAGS[:2],
        f"--config.model.width_divisor={NARROW}",
        "--config.num_train_steps=100000",
        "--config.log_every_steps=1",
        "--config.checkpoint_every_steps=1000",
        "--config.progress_bar=False",
    )
    runs = two_processes(workdir, tmp_path, "first", *flags)
    deadline = time.time() + 240
    while not (workdir / "metrics.jsonl").exists():
        assert all(p.poll() is None for p, _, _ in runs), error_text(runs[0][2].read_text())
        assert time.time() < deadline, "the run never started stepping"
        time.sleep(0.1)
    runs[0][0].send_signal(signal.SIGTERM)
    time.sleep(1.0)
    runs[1][0].send_signal(signal.SIGTERM)
    outputs = finish(runs)
    for (process, _, _), output in zip(runs, outputs, strict=True):
        assert process.returncode == 0, error_text(output)
    stopped = [int(out.split("Stopped by SIGTERM after step ")[1].split(";")[0]) for out in outputs]
    assert stopped[0] == stopped[1], stopped
    saved = sorted(int(s) for s in os.listdir(workdir / "checkpoints") if s.isdigit())
    assert saved == [stopped[0]]  # saved once, at the agreed step

    more = (
        *SMALL_FLAGS[:2],
        f"--config.model.width_divisor={NARROW}",
        f"--config.num_train_steps={stopped[0] + 2}",
        "--config.progress_bar=False",
    )
    outputs = finish(two_processes(workdir, tmp_path, "again", *more))
    for output in outputs:
        assert f"Resuming from the checkpoint at step {stopped[0]}" in output, error_text(output)
    assert read_steps(workdir)[-1] == stopped[0] + 2


def read_steps(workdir):
    return [r["step"] for r in metrics.read_metrics(str(workdir)) if r["split"] == "eval"]


@pytest.mark.slow
def test_sigterm_then_resume_ends_where_an_uninterrupted_run_ends(tmp_path, uninterrupted_run):
    reference = uninterrupted_run
    workdir = tmp_path / "preempted"
    log = open(tmp_path / "log", "w")  # noqa: SIM115
    process = start_process(
        workdir,
        log,
        *SMALL_FLAGS,
        "--config.log_every_steps=1",
        "--config.async_checkpointing=False",
        env={},
    )
    deadline = time.time() + 240
    while not (workdir / "metrics.jsonl").exists():
        assert process.poll() is None and time.time() < deadline
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    (output,) = finish([(process, log, tmp_path / "log")])
    assert process.returncode == 0, error_text(output)
    stopped = stopped_step(output)
    # (On a fast machine the run may have finished first.)
    if stopped < 8 or "during the evaluation" in output:
        result = subprocess.run(
            [sys.executable, os.path.join(ROOT, "main.py"), f"--workdir={workdir}", *SMALL_FLAGS],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert f"Resuming from the checkpoint at step {stopped}" in result.stderr
    final = [r for r in metrics.read_metrics(str(workdir)) if r["split"] == "eval"][-1]
    assert final["step"] == 8
    for key in ("loss", "top1", "top5"):
        assert final[key] == pytest.approx(reference[key], rel=1e-6, abs=1e-7), key


def stopped_step(output):
    """The step a SIGTERM stopped a run at, from its log: after a step, or during an
    evaluation (then saved unevaluated)."""
    found = re.search(r"Stopped by SIGTERM (?:after|during the evaluation at) step (\d+);", output)
    assert found, error_text(output)
    return int(found.group(1))


@pytest.mark.slow
def test_a_sigterm_during_an_evaluation_saves_at_once_and_the_rerun_evaluates_first(
    tmp_path, monkeypatch, caplog
):
    """The signal comes after the first of the evaluation's batches at step 2: the run stops
    without finishing the pass (a cluster's grace period may be shorter than an ImageNet
    evaluation), with step 2 saved. The rerun evaluates step 2 first, ranks and updates its
    checkpoint, and ends where a run never stopped ends: the same records, the same state."""
    config = small_config(num_train_steps=4, eval_every_epochs=2 / 89, lr_schedule="plateau")
    reference = tmp_path / "reference"
    expected = train.train_and_evaluate(config, str(reference))

    real_create_dataset = data.create_dataset
    evaluations = []

    def signalled_dataset(config):
        dataset = real_create_dataset(config)

        def eval_batches():
            evaluations.append(1)
            for i, batch in enumerate(dataset.eval_batches()):
                if len(evaluations) == 1 and i == 1:
                    os.kill(os.getpid(), signal.SIGTERM)
                yield batch

        return dataclasses.replace(dataset, eval_batches=eval_batches)

    workdir = tmp_path / "run"
    monkeypatch.setattr(data, "create_dataset", signalled_dataset)
    with caplog.at_level(logging.INFO):
        stopped = train.train_and_evaluate(config, str(workdir))
    assert stopped == {"stopped_at_step": 2}
    assert "Stopped by SIGTERM during the evaluation at step 2" in caplog.text
    assert read_steps(workdir) == []  # the pass was abandoned: no record of it
    assert json.loads((workdir / train.PENDING_EVALUATION).read_text()) == {"step": 2}
    assert sorted(int(s) for s in os.listdir(workdir / "checkpoints") if s.isdigit()) == [2]

    monkeypatch.setattr(data, "create_dataset", real_create_dataset)
    caplog.clear()
    with caplog.at_level(logging.INFO):
        result = train.train_and_evaluate(config, str(workdir))
    assert "Evaluating step 2 first" in caplog.text
    assert not (workdir / train.PENDING_EVALUATION).exists()
    assert read_steps(workdir) == read_steps(reference) == [2, 4]
    for key in ("loss", "top1", "top5", "lr"):
        assert result[key] == pytest.approx(expected[key], rel=1e-6, abs=1e-7), key
    managers = [checkpointing.create_manager(str(w), config) for w in (workdir, reference)]
    assert managers[0].all_steps() == managers[1].all_steps()
    assert managers[0].metrics(2) == managers[1].metrics(2)  # step 2 ranked after all
    template = new_state(config)
    for step in managers[0].all_steps():
        states = [checkpointing.restore(m, template, step) for m in managers]
        chex.assert_trees_all_close(states[0].params, states[1].params, rtol=1e-6, atol=1e-7)
        chex.assert_trees_all_equal(states[0].plateau, states[1].plateau)
    for manager in managers:
        manager.close()


# --- damaged files ----------------------------------------------------------------------------


def test_run_files_are_written_whole_or_not_at_all(tmp_path, monkeypatch):
    path = tmp_path / "config.json"
    atomic_write(str(path), '{"seed": 1}\n')

    def disk_full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(OSError, match="No space left"):
        atomic_write(str(path), '{"seed": 2, "and much more": ' + "0" * 1000 + "}")
    monkeypatch.undo()
    assert path.read_text() == '{"seed": 1}\n'  # the previous version, whole
    assert os.listdir(tmp_path) == ["config.json"]  # no temporary left behind


def test_torn_files_are_named_or_skipped(tmp_path, caplog):
    (tmp_path / "config.json").write_text('{"seed": 0, "dataset": "dig')
    with pytest.raises(DataError, match="config.json is not readable JSON"):
        run_files.load_run_config(str(tmp_path))
    good = json.dumps({"step": 2, "split": "eval", "top1": 0.5})
    (tmp_path / "metrics.jsonl").write_text(good + "\n" + '{"step": 4, "spl')
    with caplog.at_level(logging.WARNING):
        records = metrics.read_metrics(str(tmp_path))
    assert records == [json.loads(good)]
    assert "metrics.jsonl, line 2: not a whole record" in caplog.text
    writer = metrics.MetricsWriter(str(tmp_path), enabled=True)
    writer.write({"step": 6, "split": "eval", "top1": 0.75})  # appends after the torn line
    writer.close()
    assert [r["step"] for r in metrics.read_metrics(str(tmp_path))] == [2, 6]

    path = tmp_path / "mean_image.npy"
    np.save(path, np.ones((4, 4, 3), np.float32))
    path.write_bytes(path.read_bytes()[:90])
    with pytest.raises(DataError, match="mean_image.npy is not a readable .npy"):
        normalization.load_mean_image(str(path), (4, 4, 3))
    nan = np.ones((4, 4, 3), np.float32)
    nan[1, 2, 0] = np.nan
    np.save(path, nan)
    with pytest.raises(DataError, match="mean_image.npy holds 1 NaN or infinite values"):
        normalization.load_mean_image(str(path), (4, 4, 3))


def damage(checkpoint_dir):
    """Truncates every data file of a committed checkpoint, as a failing disk would."""
    for folder, _, files in os.walk(checkpoint_dir):
        for name in files:
            path = os.path.join(folder, name)
            if os.path.getsize(path) > 64:
                with open(path, "r+b") as f:
                    f.truncate(16)


@pytest.mark.slow
def test_training_resumes_from_the_newest_readable_checkpoint(tmp_path, caplog):
    workdir = str(tmp_path)
    train.train_and_evaluate(small_config(num_train_steps=4), workdir)  # checkpoints 2 and 4
    damage(tmp_path / "checkpoints" / "4")
    with caplog.at_level(logging.WARNING):
        result = train.train_and_evaluate(small_config(num_train_steps=6), workdir)
    assert "The checkpoint at step 4" in caplog.text and "cannot be read" in caplog.text
    assert "Resuming" not in caplog.text or "step 2" in caplog.text
    assert result["step"] == 6
    assert (tmp_path / "checkpoints" / "4.damaged").is_dir()  # kept aside, for inspection
    manager = checkpointing.create_manager(workdir, small_config())
    assert 4 in manager.all_steps()  # written again, whole
    state = checkpointing.restore(manager, new_state(small_config()), 4)
    assert int(state.step) == 4
    manager.close()
    for step in (2, 4, 6):
        damage(tmp_path / "checkpoints" / str(step))
    with pytest.raises(CheckpointError, match="None of the checkpoints .* can be read"):
        train.train_and_evaluate(small_config(num_train_steps=8), workdir)


def test_a_torn_array_file_is_named_in_one_line(short_run, tmp_path):
    """A data file cut short (the checkpoint's metadata whole): the error names the array and
    the file TensorStore could not read, in one line, not Orbax's dump of the store's spec."""
    workdir = tmp_path / "run"
    shutil.copytree(short_run, workdir)
    data_files = [
        os.path.join(folder, name)
        for folder, _, names in os.walk(workdir / "checkpoints" / "2")
        for name in names
        if os.sep + "d" + os.sep in os.path.join(folder, name)
    ]
    largest = max(data_files, key=os.path.getsize)
    with open(largest, "r+b") as f:
        f.truncate(1000)
    with pytest.raises(CheckpointError) as caught:
        run_files.params_from_workdir(str(workdir), "latest")
    message = str(caught.value)
    assert message.startswith("The checkpoint at step 2 in ") and "cannot be read" in message
    # the array (the largest data file may hold parameters or the optimizer's momentum,
    # as Orbax packs them) and the folder
    assert re.search(r"\b(params|opt_state)\.\w", message) and str(workdir) in message, message
    assert "\n" not in message and "TensorStore(" not in message and len(message) < 600


def test_reason_is_the_innermost_error_in_one_line():
    try:
        try:
            raise ValueError("OUT_OF_RANGE: error reading\n  'params.fc6.kernel'")
        except ValueError as inner:
            raise RuntimeError("cannot read array. See full TensorStore details: {...}") from inner
    except RuntimeError as outer:
        assert reason(outer) == "ValueError: OUT_OF_RANGE: error reading 'params.fc6.kernel'"
    assert reason(KeyError()) == "KeyError"
    wrapped = "{{function_node __wrapped__IteratorGetNext}} corrupted record at 5 [Op:Next] name: "
    assert reason(ValueError(wrapped)) == "ValueError: corrupted record at 5"  # TensorFlow's
    assert reason(OSError("x" * 500), limit=20) == "OSError: " + "x" * 17 + "..."


# --- flags and messages -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def short_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("short_run")
    train.train_and_evaluate(small_config(num_train_steps=2), str(workdir))
    return str(workdir)


def test_eval_overrides_apply_on_the_runs_config_and_fixed_fields_are_refused(short_run):
    config = run_files.eval_config(short_run, {"eval_batch_size": 8})
    assert config.eval_batch_size == 8 and config.batch_size == 16  # the run's own, and ours
    with pytest.raises(
        ConfigError,
        match="model.variant='nonsense': the checkpoints .* were "
        "trained with 'paper', and it cannot change",
    ):
        run_files.eval_config(short_run, {"model.variant": "nonsense"})
    with pytest.raises(ConfigError, match="num_classes=5: .* trained with 10"):
        run_files.eval_config(short_run, {"num_classes": 5})
    with pytest.raises(ConfigError, match="eval_batch_size=6 does not divide evenly over 4"):
        run_files.eval_config(short_run, {"eval_batch_size": 6})
    assert run_files.eval_config(short_run, {"model.variant": "paper"}).model.variant == "paper"


def test_a_given_config_leaving_the_class_count_to_the_data_takes_the_runs(short_run, tmp_path):
    config = small_config()
    assert run_files.given_config(config, short_run) is config  # a count given is kept
    config.num_classes = 0  # as configs/folder.py leaves it
    assert run_files.given_config(config, short_run).num_classes == 10  # config.json's
    assert config.num_classes == 0  # the given config is not changed
    names_only = tmp_path / "names_only"
    names_only.mkdir()
    (names_only / "class_names.txt").write_text("cat\ndog\nbird\n")
    (names_only / "config.json").write_text("{torn")
    assert run_files.given_config(config, str(names_only)).num_classes == 3
    with pytest.raises(ConfigError, match="num_classes=0 .* keeps no readable config.json or "
                       "class_names.txt .* pass --config.num_classes"):  # fmt: skip
        run_files.given_config(config, str(tmp_path))


def run_main(*flags, cwd=ROOT):
    command = [sys.executable, os.path.join(ROOT, "main.py"), *flags]
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_errors_a_user_can_fix_are_one_line_with_a_status(short_run, tmp_path):
    cases = [
        (["--config.model.variant=vgg"], 2, "error: config.model.variant='vgg': choose one of"),
        (["--config.no_such_field=3"], 2, "error: no such config field 'no_such_field'"),
        (["--config.batch_size=big"], 2, "error: flag --config.batch_size=big"),
        (["--config", "configs/none.py"], 2, "error: cannot load the --config file"),
        (
            [f"--workdir={short_run}", "--mode=eval", "--config.model.variant=nonsense"],
            2,
            "error: config.model.variant='nonsense': the checkpoints",
        ),
        (
            ["--mode=predict", f"--workdir={short_run}", "--images", str(tmp_path / "no.jpg")],
            1,
            "error: Cannot read image",
        ),
        (["--mode=eval", f"--workdir={tmp_path / 'empty'}"], 1, "error: "),
        (
            ["--config.dataset=image_folder", f"--config.data_dir={tmp_path / 'none'}"],
            2,
            "is not a directory",
        ),
    ]
    for flags, status, message in cases:
        result = run_main(*flags)
        assert result.returncode == status, (flags, error_text(result.stderr))
        assert message in result.stderr and "Traceback" not in result.stderr, result.stderr[-2000:]


def test_a_config_path_missing_here_names_the_projects_file(tmp_path):
    result = run_main("--config", "configs/imagenet.py", cwd=tmp_path)
    assert result.returncode == 2, error_text(result.stderr)
    assert "No such file or directory: 'configs/imagenet.py' (relative to the current folder" in (
        result.stderr
    )
    assert os.path.join(ROOT, "configs", "imagenet.py") in result.stderr
    assert "Traceback" not in result.stderr


# --- inputs users really have -----------------------------------------------------------------


def odd_images(folder):
    """The files photo folders really hold, each of a kind a decoder may treat differently."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (60, 80, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(folder / "photo.jpg", quality=90)
    Image.fromarray(rgb).save(folder / "drawing.png")
    Image.fromarray(rgb[..., 0]).save(folder / "grey.png")
    rgba = np.concatenate([rgb, rng.integers(0, 256, (60, 80, 1), dtype=np.uint8)], -1)
    Image.fromarray(rgba).save(folder / "alpha.png")
    Image.fromarray(rgb).convert("CMYK").save(folder / "print.jpg", quality=95)
    deep = (rng.integers(0, 65536, (60, 80))).astype(np.uint16)
    Image.fromarray(deep).save(folder / "sixteen_bit.png")
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, "JPEG", quality=90)
    (folder / "phone.jpg").write_bytes(buffer.getvalue() + b"\x00MotionPhoto" + bytes(5000))
    Image.fromarray(rgb).save(folder / "palette.gif")
    Image.fromarray(rgb[..., 1]).save(folder / "scan.bmp")
    Image.fromarray(rgba).save(folder / "web.webp", quality=90)  # lossy with alpha: "VP8X"
    Image.fromarray(rgb).save(folder / "LOSSLESS.WEBP", lossless=True)  # "VP8L"
    return sorted(os.listdir(folder))


def odd_folder(root):
    names = odd_images(root / "train" / "a")
    odd_images(root / "train" / "b")
    odd_images(root / "val" / "a")
    odd_images(root / "val" / "b")
    return names


def test_predict_gives_the_evaluation_pipelines_pixels_for_every_kind_of_file(tmp_path):
    pytest.importorskip("tensorflow")
    names = odd_folder(tmp_path)
    config = small_config(
        dataset="image_folder",
        data_dir=str(tmp_path),
        channels=3,
        num_classes=2,
        batch_size=4,
        eval_batch_size=4,
    )
    config.input.resize_size = 72
    config.seed = 0
    batches = list(data.create_dataset(config).eval_batches())  # classes a, then b, in order
    pipeline = np.concatenate([b["image"].reshape((-1, 67, 67, 3)) for b in batches])
    for i, name in enumerate(names):  # class a's files come first, sorted
        np.testing.assert_array_equal(
            data.load_image(str(tmp_path / "val" / "a" / name), config), pipeline[i], err_msg=name
        )
    sixteen = pipeline[names.index("sixteen_bit.png")]
    deep = np.asarray(Image.open(tmp_path / "val" / "a" / "sixteen_bit.png"))
    assert sixteen.std() > 20  # the high byte of each pixel, not 16-bit values clipped to 255
    assert abs(float(sixteen.mean()) - float((deep >> 8).mean())) < 6


def test_prepared_predict_gives_the_prepared_evaluations_pixels(tmp_path):
    from alexnet_jax.data import prepare

    names = odd_folder(tmp_path / "photos")
    prepare.prepare(
        "image_folder",
        str(tmp_path / "photos"),
        str(tmp_path / "prepared"),
        prepare.Options(size=72, encoding="raw"),
        workers=0,
    )
    config = small_config(
        dataset="prepared",
        data_dir=str(tmp_path / "prepared"),
        channels=3,
        num_classes=2,
        batch_size=4,
        eval_batch_size=4,
    )
    config.input.resize_size = 72
    batches = list(data.create_dataset(config).eval_batches())
    pipeline = np.concatenate([b["image"].reshape((-1, 67, 67, 3)) for b in batches])
    for i, name in enumerate(names):
        np.testing.assert_array_equal(
            data.load_image(str(tmp_path / "photos" / "val" / "a" / name), config), pipeline[i]
        )


def huge_png_header(path, width=20_000, height=20_000):
    """A PNG whose header says 400 megapixels (its data is a stub: it would fail later)."""
    import struct
    import zlib

    def chunk(kind, payload):
        crc = zlib.crc32(kind + payload)
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", b"x") + chunk(b"IEND", b"")
    )


def test_a_huge_image_is_refused_before_it_is_decoded_and_named(tmp_path):
    huge_png_header(tmp_path / "huge.png")
    with pytest.raises(DataError, match="huge.png.* over the 89,478,485-pixel limit"):
        images.decode(str(tmp_path / "huge.png"))
    tf = pytest.importorskip("tensorflow")
    from alexnet_jax.data import preprocess

    with pytest.raises(tf.errors.InvalidArgumentError, match="image larger than"):
        preprocess.decode_central_square(tf.io.read_file(str(tmp_path / "huge.png")), 3)
    size = preprocess.encoded_size(tf.io.read_file(str(tmp_path / "huge.png"))).numpy()
    assert size.tolist() == [20_000, 20_000]
    Image.fromarray(np.zeros((30, 50, 3), np.uint8)).save(tmp_path / "small.jpg")
    assert preprocess.encoded_size(
        tf.io.read_file(str(tmp_path / "small.jpg"))
    ).numpy().tolist() == [30, 50]


def huge_headers(folder):
    """GIF, BMP and WebP files (each kind of WebP header) whose headers claim more pixels than
    ``images.MAX_PIXELS``: real small images with their size fields rewritten."""
    import struct

    folder.mkdir(parents=True, exist_ok=True)
    rgb = np.zeros((30, 50, 3), np.uint8)
    sizes = {}

    def rewrite(name, offset, field, size, **save):
        Image.fromarray(rgb if "alpha" not in name else np.dstack([rgb, rgb[..., :1]])).save(
            folder / name, **save
        )
        data = bytearray((folder / name).read_bytes())
        data[offset : offset + len(field)] = field
        (folder / name).write_bytes(bytes(data))
        sizes[name] = size

    rewrite("huge.gif", 6, struct.pack("<HH", 20_000, 15_000), (15_000, 20_000))
    rewrite("huge.bmp", 18, struct.pack("<ii", 12_000, -9_000), (9_000, 12_000))  # top-down
    rewrite("huge.webp", 26, struct.pack("<HH", 16_000, 9_000), (9_000, 16_000))  # "VP8 "
    bits = (16_000 - 1) | (9_000 - 1) << 14  # "VP8L": 14 bits each, alpha and version 0
    rewrite("huge_lossless.webp", 21, struct.pack("<I", bits), (9_000, 16_000), lossless=True)
    canvas = (20_000 - 1).to_bytes(3, "little") + (9_000 - 1).to_bytes(3, "little")
    rewrite("huge_alpha.webp", 24, canvas, (9_000, 20_000), exif=b"Exif\0\0")  # "VP8X"
    return sizes


def test_every_image_format_is_sized_from_its_header_and_decoded_as_pillow_does(tmp_path):
    tf = pytest.importorskip("tensorflow")
    from alexnet_jax.data import preprocess

    for name in odd_images(tmp_path / "odd"):
        path = str(tmp_path / "odd" / name)
        contents = tf.io.read_file(path)
        with Image.open(path) as image:
            assert preprocess.encoded_size(contents).numpy().tolist() == [60, 80], name
            kind = image.format
        assert image_folder.has_image_extension(name) and image_folder.looks_like_image(path)
        for channels in (3, 1) if name != "print.jpg" else (3,):  # TF: no CMYK to grayscale
            pixels = preprocess.decode_central_square(contents, channels).numpy()
            reference = images.central_square(images.decode(path, channels))
            chex.assert_shape(pixels, (60, 60, channels))
            if kind != "JPEG":  # libjpeg's IDCT and upsampling differ between the decoders
                error = np.abs(pixels.astype(int) - reference).max()
                assert error <= (0 if channels == 3 else 1), (
                    name,
                    channels,
                    error,
                )  # luma rounding
    webp = (tmp_path / "odd" / "web.webp").read_bytes()
    assert (
        webp[12:16] == b"VP8X"
        and (tmp_path / "odd" / "LOSSLESS.WEBP").read_bytes()[12:16] == b"VP8L"
    )

    for name, size in huge_headers(tmp_path / "huge").items():
        path = str(tmp_path / "huge" / name)
        assert preprocess.encoded_size(tf.io.read_file(path)).numpy().tolist() == list(size), name
        with pytest.raises(tf.errors.InvalidArgumentError, match="image larger than"):
            preprocess.decode_central_square(tf.io.read_file(path), 3)
        with pytest.raises(DataError, match=f"{name}.* over the 89,478,485-pixel limit"):
            images.decode(path)
    assert image_folder.looks_like_image(str(tmp_path / "huge" / "huge.webp"))
    for short in (b"BM12", b"GIF89a", b"RIFF\0\0\0\0WEBPVP8 "):  # headers cut short
        with pytest.raises(tf.errors.InvalidArgumentError):
            preprocess.decode_central_square(tf.constant(short), 3)


def test_class_folders_are_read_as_torchvision_reads_them_with_hidden_entries_left_out(
    tmp_path, caplog
):
    root = tmp_path / "photos"
    pixels = np.zeros((8, 8, 3), np.uint8)
    formats = {"jpg": "JPEG", "jpeg": "JPEG", "webp": "WEBP", "png": "PNG", "gif": "GIF"}
    for name in ("cat/a.JPG", "cat/2019/summer/b.jpeg", "cat/c.webp", "dog/d.png", "dog/e.gif"):
        (root / "train" / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(root / "train" / name, formats[name.split(".")[-1].lower()])
    (root / "train" / ".ipynb_checkpoints").mkdir()  # what Jupyter leaves beside a notebook
    (root / "train" / "cat" / ".thumbnails").mkdir()
    Image.fromarray(pixels).save(root / "train" / "cat" / ".thumbnails" / "a.jpg")
    (root / "train" / "cat" / "._a.JPG").write_bytes(b"\0\5\26\7")  # macOS's AppleDouble file
    (root / "train" / "dog" / "IMG_0001.HEIC").write_bytes(b"heic")
    (root / "train" / "dog" / "notes.txt").write_text("the dog")
    os.symlink(root / "train" / "cat", root / "train" / "cat" / "2019" / "again")  # a loop
    with caplog.at_level(logging.WARNING):
        files, labels, classes = image_folder.list_image_folder(str(root), "train")
    assert classes == ["cat", "dog"]
    assert [os.path.relpath(f, root / "train") for f in files] == [
        "cat/2019/summer/b.jpeg", "cat/a.JPG", "cat/c.webp", "dog/d.png", "dog/e.gif"
    ]  # fmt: skip
    assert labels.tolist() == [0, 0, 0, 1, 1]
    assert "left out 2 files without an image extension" in caplog.text
    assert "1 .heic, 1 .txt" in caplog.text
    assert evaluate.image_paths([str(root / "train" / "cat")]) == [
        str(root / "train" / "cat" / "a.JPG"), str(root / "train" / "cat" / "c.webp")
    ]  # fmt: skip
    (root / "train" / "bird" / "2020").mkdir(parents=True)
    (root / "train" / "bird" / "2020" / "list.csv").write_text("")
    with pytest.raises(DataError, match="bird' holds no images .* in it or below it"):
        image_folder.list_image_folder(str(root), "train")


def test_files_with_bytes_after_their_end_are_accepted(tmp_path):
    names = odd_images(tmp_path)
    assert "phone.jpg" in names
    assert image_folder.looks_like_image(str(tmp_path / "phone.jpg"))
    appended = (tmp_path / "drawing.png").read_bytes() + b"trailing"
    (tmp_path / "appended.png").write_bytes(appended)
    assert image_folder.looks_like_image(str(tmp_path / "appended.png"))
    chex.assert_shape(images.decode(str(tmp_path / "phone.jpg")), (60, 80, 3))
    chex.assert_shape(images.decode(str(tmp_path / "appended.png")), (60, 80, 3))


def test_odd_file_names_and_bad_class_folders(tmp_path, monkeypatch):
    pytest.importorskip("tensorflow")
    root = tmp_path
    for split in ("train", "val"):
        for c in ("a", "b"):
            (root / split / c).mkdir(parents=True)
            for i in range(2):
                Image.fromarray(np.full((20, 20, 3), 40 * i, np.uint8)).save(
                    root / split / c / f"{i}.png"
                )
    odd = os.path.join(os.fsencode(root / "train" / "a"), b"caf\xe9-\xff.png")  # not UTF-8
    with open(odd, "wb") as f:
        f.write((root / "train" / "a" / "0.png").read_bytes())
    config = small_config(
        dataset="image_folder",
        data_dir=str(root),
        channels=3,
        num_classes=2,
        batch_size=4,
        eval_batch_size=4,
    )
    config.input.resize_size = 24
    config.image_size = 20
    dataset = data.create_dataset(config)
    assert dataset.train_size == 5
    batches = dataset.train_batches(0)
    assert all(next(batches)["image"].shape == (4, 1, 20, 20, 3) for _ in range(3))

    for name in os.listdir(root / "val" / "b"):
        (root / "val" / "b" / name).write_text("not an image")
    with pytest.raises(
        DataError,
        match="Class folder .*val/b' of split 'val' holds no readable image: all its 2 files",
    ):
        data.create_dataset(config)

    real_scandir = os.scandir

    def denied(path):
        if str(path).endswith(os.path.join("train", "b")):
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", denied)
    with pytest.raises(DataError, match="Cannot read class folder .*train/b.*Permission denied"):
        image_folder.list_image_folder(str(root), "train")


# --- the converter ----------------------------------------------------------------------------


def test_converter_finds_weights_under_a_key_and_reads_half_precision(tmp_path):
    torch = pytest.importorskip("torch")
    from alexnet_jax import convert
    from tests.test_evaluate import torchvision_alexnet

    net = torchvision_alexnet(num_classes=7)
    reference = convert.torchvision_to_flax(net.state_dict())
    for wrapped in (
        {"model": net.state_dict(), "epoch": 3},
        {"checkpoint": {"state_dict": net.state_dict()}},
    ):
        torch.save(wrapped, tmp_path / "wrapped.pth")
        chex.assert_trees_all_equal(
            convert.torchvision_to_flax(convert.load_pth(str(tmp_path / "wrapped.pth"))), reference
        )
    with pytest.raises(CheckpointError, match=r"under \['model'\]: pass checkpoint\['model'\]"):
        convert.torchvision_to_flax({"model": net.state_dict(), "epoch": 3})
    torch.save({"optimizer": {"lr": 0.1}}, tmp_path / "other.pth")
    with pytest.raises(CheckpointError, match="holds no torchvision AlexNet state_dict.*optimizer"):
        convert.load_pth(str(tmp_path / "other.pth"))
    for dtype in (torch.bfloat16, torch.float16):
        torch.save(net.to(dtype).state_dict(), tmp_path / "half.pth")
        half = convert.torchvision_to_flax(convert.load_pth(str(tmp_path / "half.pth")))
        chex.assert_trees_all_close(half, reference, atol=0.02 * 0.2, rtol=1e-2)
        net = net.float()


def test_a_nan_in_a_users_mean_image_names_the_file(tmp_path):
    nan = np.zeros((67, 67, 1), np.float32)
    nan[0, 0, 0] = np.nan
    np.save(tmp_path / "my_mean.npy", nan)
    config = small_config(
        **{
            "input.normalization": "mean_image",
            "input.mean_image_path": str(tmp_path / "my_mean.npy"),
        }
    )
    dataset = data.create_dataset(config)
    with pytest.raises(DataError, match="my_mean.npy holds 1 NaN"):
        normalization.load_or_compute_mean_image(
            config, str(tmp_path), dataset.train_batches, dataset.image_shape
        )


def test_evaluation_counts_each_example_once_over_processes_and_crops():
    """The one way of counting: top-1/top-5/loss of known outputs, as numpy counts them."""
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 6, (2, 4))
    top5 = np.stack([rng.permutation(6)[:5] for _ in range(8)]).reshape(2, 4, 5)
    top5[0, 0, 0] = labels[0, 0]  # at least one top-1 hit
    loss = rng.random((2, 4))
    mask = np.array([[1, 1, 1, 1], [1, 1, 0, 0]], np.float32)
    tally = evaluate.Tally(6)
    tally.add({"top5": top5, "loss": loss, "label": labels, "mask": mask})
    keep = mask.ravel() > 0
    flat_labels, flat_top5 = labels.ravel()[keep], top5.reshape(-1, 5)[keep]
    assert tally.count == 6
    summary = tally.summary()
    assert summary["top1"] == pytest.approx(np.mean(flat_top5[:, 0] == flat_labels))
    assert summary["top5"] == pytest.approx(np.mean((flat_top5 == flat_labels[:, None]).any(1)))
    assert summary["loss"] == pytest.approx(loss.ravel()[keep].mean())
    assert tally.confusion.sum(axis=1).tolist() == np.bincount(flat_labels, minlength=6).tolist()
