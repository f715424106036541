"""The train step and the training loop: learning, devices, resume, preemption, bad input."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from alexnet_jax import checkpointing, data, normalization, optim, steps, train
from alexnet_jax.config_checks import validate_config
from alexnet_jax.data.dataset import shard
from alexnet_jax.data.digits import load_digits
from alexnet_jax.errors import ConfigError
from alexnet_jax.metrics import read_metrics
from configs import default

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# The loop's tests train AlexNet with every width divided by 4 (1.4 M parameters, not 21.6 M
# at 67x67): a checkpoint is 1/16 the size and a run about half as long, and what they test
# (resume, preemption, devices, processes) does not depend on the width. The full network
# is tested as a network in tests/test_model.py and trained end to end by
# tests/test_compilation_cache.py, tests/test_input_pipeline.py and the fixed-batch test
# below.
NARROW = 4


def small_config(**overrides):
    """The default digits run, made small: 67x67, batch 16, a handful of steps, the network
    narrowed (``NARROW``)."""
    config = default.get_config()
    config.model.width_divisor = NARROW
    config.batch_size = 16
    config.eval_batch_size = 40
    config.num_train_steps = 6
    config.eval_every_epochs = 100.0  # evaluate at the end only
    config.log_every_steps = 2
    config.checkpoint_every_steps = 2
    config.progress_bar = False
    config.async_checkpointing = False
    for key, value in overrides.items():
        target = config
        *parents, leaf = key.split(".")
        for parent in parents:
            target = target[parent]
        target[leaf] = value
    return config


def fixed_batch(num_devices, per_device=4, size=67, seed=0):
    images, labels = load_digits(size)
    chosen = np.random.default_rng(seed).choice(len(labels), num_devices * per_device, False)
    return shard({"image": images[chosen], "label": labels[chosen]}, num_devices)


def new_state(config, seed=0):
    model = steps.create_model(config, 10)
    return steps.create_train_state(jax.random.PRNGKey(seed), config, model, (67, 67, 1))


def make_train_step(config, lr_fn, devices=None):
    """The pmap-ed train step main.py runs, for a config that needs no mean image."""
    normalize = normalization.make_normalizer(config.input)
    return steps.make_train_step(config, lr_fn, normalize, devices=devices)


@pytest.mark.slow
def test_train_step_lowers_the_loss_on_a_fixed_batch():
    # The full network (width_divisor 1): the narrow one learns too, more slowly.
    config = small_config(**{"model.dropout_rate": 0.0, "model.width_divisor": 1})
    p_train = make_train_step(config, optim.create_learning_rate_fn(config, 10))
    batch = fixed_batch(jax.local_device_count())
    state = new_state(config)
    losses = []
    for _ in range(8):
        state, metrics = p_train(state, batch)
        losses.append(float(metrics["loss"]))
    assert losses[-1] < 0.5 * losses[0], losses
    assert int(state.step) == 8


@pytest.mark.slow
def test_one_and_four_devices_give_the_same_update():
    """The same global batch of 16 on 1 device or 4 devices x 4: the same parameters."""
    assert jax.local_device_count() >= 4, "conftest forces 4 CPU devices"
    config = small_config(**{"model.dropout_rate": 0.0})
    lr_fn = optim.create_learning_rate_fn(config, 10)
    global_batch = fixed_batch(1, per_device=16)
    results = []
    for devices in (jax.local_devices()[:1], jax.local_devices()[:4]):
        p_train = make_train_step(config, lr_fn, devices=devices)
        batch = {k: v.reshape((len(devices), -1) + v.shape[2:]) for k, v in global_batch.items()}
        state = new_state(config)
        for _ in range(3):
            state, metrics = p_train(state, batch)
        results.append((jax.device_get(state.params), float(metrics["loss"])))
    chex.assert_trees_all_close(results[0][0], results[1][0], rtol=2e-4, atol=2e-6)
    assert results[0][1] == pytest.approx(results[1][1], rel=1e-5)


@pytest.mark.slow
def test_each_device_draws_its_own_dropout_mask():
    """The real train step on 4 devices with the same examples on each: its update is the
    average of 4 gradients taken with 4 different dropout keys (fold_in(rng, step), then the
    device), not 4 times the same one."""
    config = small_config(learning_rate=0.1)
    state = new_state(config)
    batch = fixed_batch(1, per_device=4)
    same_everywhere = {k: np.repeat(v, 4, axis=0) for k, v in batch.items()}
    before = jax.device_get(state)
    images, labels = jnp.asarray(batch["image"][0]), jnp.asarray(batch["label"][0])

    @jax.jit
    @jax.grad
    def grad(params, key):
        logits = before.apply_fn({"params": params}, images, train=True, rngs={"dropout": key})
        return steps.classification_metrics(logits, labels)["loss"].mean()

    def update_with(keys):
        grads = [grad(before.params, key) for key in keys]
        mean = jax.tree_util.tree_map(lambda *g: sum(g) / len(g), *grads)
        opt_state = optim.set_learning_rate(before.opt_state, 0.1)
        updates, _ = before.tx.update(mean, opt_state, before.params)
        return optax.apply_updates(before.params, updates)

    step_key = jax.random.fold_in(before.rng, 0)
    per_device = update_with([jax.random.fold_in(step_key, d) for d in range(4)])
    one_mask = update_with([jax.random.fold_in(step_key, 0)] * 4)
    p_train = make_train_step(config, optim.create_learning_rate_fn(config, 10))
    state, _ = p_train(state, same_everywhere)
    got = jax.device_get(state.params)
    chex.assert_trees_all_close(got, per_device, rtol=1e-4, atol=1e-6)
    differences = jax.tree_util.tree_map(lambda a, b: float(np.abs(a - b).max()), got, one_mask)
    assert max(jax.tree_util.tree_leaves(differences)) > 1e-4  # the test can tell them apart


def test_a_non_finite_step_leaves_the_parameters_as_they_were():
    """A NaN in one device's batch: the step's update is not applied (lax.cond), the step
    counter stays, and the state records the bad step for the host to stop on."""
    config = small_config()
    state = new_state(config)
    batch = fixed_batch(4, per_device=2)
    batch["image"] = batch["image"].copy()
    batch["image"][2, 1, 10, 10, 0] = np.nan
    before = jax.device_get(state)
    p_train = make_train_step(config, optim.create_learning_rate_fn(config, 10))
    state, metrics = p_train(state, batch)
    assert not np.isfinite(float(metrics["loss"]))
    chex.assert_trees_all_equal(jax.device_get(state.params), before.params)
    chex.assert_trees_all_equal(jax.device_get(state.opt_state), before.opt_state)
    assert int(state.step) == 0 and int(state.nonfinite_step) == 0
    state, _ = p_train(state, fixed_batch(4, per_device=2))  # a good step still applies
    assert int(state.step) == 1 and int(state.nonfinite_step) == 0  # the first bad one stays


def test_batch_that_does_not_divide_over_devices_is_rejected(tmp_path):
    with pytest.raises(ConfigError, match="batch_size=18 does not divide evenly over 4 devices"):
        validate_config(small_config(batch_size=18), str(tmp_path))


@pytest.mark.parametrize(
    "overrides,message",
    [
        ({"dataset": "imagenet"}, "config.dataset='imagenet'"),
        ({"image_size": 60}, "config.image_size=60: variant 'paper' needs at least 67"),
        ({"model.variant": "resnet"}, "config.model.variant='resnet'"),
        ({"lr_schedule": "cyclic"}, "config.lr_schedule='cyclic'"),
        ({"momentum": 1.5}, "config.momentum=1.5"),
        ({"cpu_convolutions": "mkl"}, "config.cpu_convolutions='mkl': choose one of"),
        ({"cpu_matmuls": "mkl"}, "config.cpu_matmuls='mkl': choose one of"),
        (
            {"model.width_divisor": 5},
            "config.model.width_divisor=5 with config.model.groups=1: width_divisor=5 does "
            "not divide conv1's width 96",
        ),
        (
            {"model.width_divisor": 32, "model.groups": 2},
            "config.model.width_divisor=32 with config.model.groups=2: groups=2 does not "
            "divide conv2's 3 input channels",
        ),
        (
            {"model.name": "vgg11", "model.width_divisor": 3},
            "config.model.width_divisor=3: must divide every VGG block's width",
        ),
        ({"dataset": "image_folder", "data_dir": ""}, "config.data_dir is empty"),
        ({"dataset": "image_folder", "data_dir": "/nonexistent/x"}, "is not a directory"),
    ],
)
def test_config_errors_name_the_field(tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        validate_config(small_config(**overrides), str(tmp_path))


def test_unwritable_workdir_is_rejected_before_compute(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    with pytest.raises(ConfigError, match="workdir .* is not writable"):
        train.train_and_evaluate(small_config(), str(blocker / "run"))


def error_text(output: str) -> str:
    """What a failed process printed that explains it: a fatal error's report (where the
    interpreter crashed), else the end of its output."""
    fatal = output.find("Fatal Python error")
    return output[fatal : fatal + 4000] if fatal >= 0 else output[-3000:]


def run_main(workdir, *flags, env=None, wait=True):
    command = [sys.executable, os.path.join(ROOT, "main.py"), f"--workdir={workdir}", *flags]
    full_env = dict(os.environ, **(env or {}))
    if wait:
        return subprocess.run(
            command, cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=300
        )
    return subprocess.Popen(
        command, cwd=ROOT, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def test_unknown_field_and_wrong_type_are_rejected_by_main(tmp_path):
    result = run_main(tmp_path / "w", "--config.no_such_field=3")
    assert result.returncode != 0 and "no_such_field" in result.stderr
    result = run_main(tmp_path / "w", "--config.batch_size=big")
    assert result.returncode != 0 and "batch_size" in result.stderr
    assert not (tmp_path / "w" / "checkpoints").exists()


SMALL_FLAGS = (
    "--config.batch_size=16",
    "--config.eval_batch_size=40",
    "--config.num_train_steps=8",
    "--config.eval_every_epochs=100",
    "--config.log_every_steps=2",
    "--config.checkpoint_every_steps=2",
    "--config.progress_bar=False",
    f"--config.model.width_divisor={NARROW}",
)


@pytest.mark.slow
def test_resume_after_sigkill_ends_with_the_same_metrics(tmp_path, uninterrupted_run):
    """Killed (SIGKILL) after its first checkpoint and rerun, a run ends as if never stopped."""
    reference = uninterrupted_run

    workdir = tmp_path / "killed"
    process = run_main(workdir, *SMALL_FLAGS, "--config.async_checkpointing=False", wait=False)
    deadline = time.time() + 240
    while not (workdir / "checkpoints" / "4").exists():
        assert process.poll() is None, process.stdout.read()
        assert time.time() < deadline, "no checkpoint appeared"
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    steps = sorted(int(s) for s in os.listdir(workdir / "checkpoints") if s.isdigit())
    assert steps and steps[-1] < 8, steps

    result = run_main(workdir, *SMALL_FLAGS)
    assert result.returncode == 0, error_text(result.stderr)
    assert f"Resuming from the checkpoint at step {steps[-1]}" in result.stderr
    final = [r for r in read_metrics(str(workdir)) if r["split"] == "eval"][-1]
    assert final["step"] == 8
    for key in ("loss", "top1", "top5"):
        assert final[key] == pytest.approx(reference[key], rel=1e-6, abs=1e-7), key


@pytest.mark.slow
def test_in_process_resume_gives_identical_parameters(tmp_path):
    """Stopping at step 3 and continuing to 6 reproduces the parameters of a straight run."""
    straight, stopped = str(tmp_path / "straight"), str(tmp_path / "stopped")
    train.train_and_evaluate(small_config(num_train_steps=6), straight)
    train.train_and_evaluate(small_config(num_train_steps=3), stopped)
    train.train_and_evaluate(small_config(num_train_steps=6), stopped)
    config = small_config()
    template = new_state(config)
    params = []
    for workdir in (straight, stopped):
        manager = checkpointing.create_manager(workdir, config)
        params.append(checkpointing.restore(manager, template, 6).params)
        manager.close()
    chex.assert_trees_all_equal(params[0], params[1])


@pytest.mark.slow
def test_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path):
    config = small_config(
        learning_rate=1e8, num_train_steps=40, checkpoint_every_steps=1, log_every_steps=5
    )
    with pytest.raises(train.NonFiniteLossError, match=r"became NaN/inf at step \d+") as error:
        train.train_and_evaluate(config, str(tmp_path))
    bad_step = int(str(error.value).split("at step ")[1].split(" ")[0])
    manager = checkpointing.create_manager(str(tmp_path), config)
    latest = manager.latest_step()
    assert latest is not None and latest < bad_step
    state = checkpointing.restore(manager, new_state(config), latest)
    leaves = jax.tree_util.tree_leaves(state.params)
    assert all(bool(jnp.all(jnp.isfinite(leaf))) for leaf in leaves)


@pytest.mark.slow
def test_metrics_file_records_train_and_eval(tmp_path):
    result = train.train_and_evaluate(small_config(), str(tmp_path))
    records = read_metrics(str(tmp_path))
    assert [r["split"] for r in records] == ["train"] * 3 + ["eval"]
    for record in records:
        assert {"step", "epoch", "split", "loss", "top1", "top5", "lr", "img_per_s"} <= set(record)
        assert 0.0 <= record["top1"] <= record["top5"] <= 1.0
    assert records[-1]["top1"] == pytest.approx(result["top1"])
    assert records[-1]["lr"] == pytest.approx(0.01)
    assert any(name.startswith("events") for name in os.listdir(tmp_path / "tensorboard"))
    assert json.loads((tmp_path / "config.json").read_text())["batch_size"] == 16


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_train_like_one_with_all_devices(tmp_path):
    """2 processes x 2 CPU devices on 127.0.0.1 end where 1 process x 4 devices ends."""
    flags = (*SMALL_FLAGS, "--config.distributed=yes")
    single = run_main(tmp_path / "single", *SMALL_FLAGS)
    assert single.returncode == 0, error_text(single.stderr)

    port = free_port()
    workdir = tmp_path / "multi"
    processes = [
        run_main(
            workdir,
            *flags,
            env={
                "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
                "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}",
                "JAX_NUM_PROCESSES": "2",
                "JAX_PROCESS_ID": str(i),
            },
            wait=False,
        )
        for i in range(2)
    ]
    outputs = [p.communicate(timeout=300)[0] for p in processes]
    for p, out in zip(processes, outputs, strict=True):
        assert p.returncode == 0, error_text(out)
    assert "2 processes, 4 devices (2 local" in outputs[0]
    multi = read_metrics(str(workdir))  # written by process 0 alone: one record per event
    single_records = read_metrics(str(tmp_path / "single"))
    assert [r["step"] for r in multi] == [r["step"] for r in single_records]
    for key in ("loss", "top1", "top5"):
        assert multi[-1][key] == pytest.approx(single_records[-1][key], rel=1e-4, abs=1e-6)


@pytest.mark.slow
def test_mean_image_is_averaged_saved_and_subtracted(tmp_path):
    config = small_config(
        num_train_steps=2, **{"input.normalization": "mean_image", "input.mean_image_batches": 3}
    )
    train.train_and_evaluate(config, str(tmp_path))
    saved = np.load(tmp_path / normalization.MEAN_IMAGE_FILE)
    batches = data.create_dataset(config).train_batches(0)
    first = np.concatenate([next(batches)["image"].reshape(-1, 67, 67, 1) for _ in range(3)])
    chex.assert_shape(saved, (67, 67, 1))
    np.testing.assert_allclose(saved, first.mean(0), rtol=1e-5, atol=1e-6)
    assert saved.std() > 0.1  # an image, not a constant

    # Subtracted on the device from uint8 and float images alike.
    batch = fixed_batch(1)["image"][0]
    normalize = normalization.make_normalizer(config.input, saved)
    np.testing.assert_allclose(normalize(batch), batch - saved)
    pixels = (batch * 255).astype(np.uint8)
    np.testing.assert_allclose(normalize(pixels), pixels.astype(np.float32) - saved)
    with pytest.raises(ValueError, match="needs the mean image"):
        normalization.make_normalizer(config.input)

    np.save(tmp_path / normalization.MEAN_IMAGE_FILE, np.zeros((32, 32, 1), np.float32))
    dataset = data.create_dataset(config)
    with pytest.raises(ValueError, match=r"mean_image.npy has shape \(32, 32, 1\).*\(67, 67"):
        normalization.load_or_compute_mean_image(
            config, str(tmp_path), dataset.train_batches, dataset.image_shape
        )
