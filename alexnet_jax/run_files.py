"""A run's workdir and the files in it that other runs and modes read back.

``config.json`` and ``class_names.txt`` (written when a run starts), choosing a checkpoint
(best by eval top-1, latest, or a step) and restoring it into a model, and moving a
checkpoint's layers into another model (fine-tuning). Checkpoints themselves are
``alexnet_jax.checkpointing``'s; metrics are ``alexnet_jax.metrics``'s.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from flax import traverse_util

from alexnet_jax import checkpointing
from alexnet_jax.config_checks import validate_config
from alexnet_jax.defaults import config_from_dict, config_to_json
from alexnet_jax.errors import (
    CheckpointError,
    ConfigError,
    DataError,
    MissingCheckpointError,
    reason,
)
from alexnet_jax.files import atomic_write
from alexnet_jax.metrics import read_metrics
from alexnet_jax.model import describe
from alexnet_jax.steps import (
    TrainState,
    abstract_train_state,
    create_model,
    create_train_state,
)

CONFIG_FILE = "config.json"
CLASS_NAMES_FILE = "class_names.txt"


def write_run_files(workdir: str, config: ml_collections.ConfigDict, class_names: list[str]):
    """``config.json`` and ``class_names.txt``: what eval, predict and init_from read back.
    Each is written whole or not at all (a crash leaves the previous version)."""
    atomic_write(os.path.join(workdir, CONFIG_FILE), config_to_json(config))
    atomic_write(os.path.join(workdir, CLASS_NAMES_FILE), "\n".join(class_names) + "\n")


def load_run_config(workdir: str) -> ml_collections.ConfigDict:
    """The config a run saved as ``WORKDIR/config.json``, on top of today's defaults."""
    path = os.path.join(workdir, CONFIG_FILE)
    if not os.path.isfile(path):
        raise MissingCheckpointError(
            f"{path!r} does not exist: {workdir!r} is not a training or converted run's workdir "
            "(pass --config to say how the checkpoint was trained)"
        )
    try:
        with open(path) as f:
            saved = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise DataError(
            f"{path} is not readable JSON ({error}): the run's config is damaged; pass "
            "--config with the config it was trained with"
        ) from error
    if not isinstance(saved, dict):
        raise DataError(f"{path} holds a {type(saved).__name__}, not a config")
    return config_from_dict(saved, path)


# Fields that describe the trained network: a checkpoint fits one value of each.
FIXED_AFTER_TRAINING = ("model", "num_classes", "channels", "grayscale_to_rgb")


def eval_config(workdir: str, overrides: dict[str, Any]) -> ml_collections.ConfigDict:
    """The config ``--mode=eval|predict`` uses: the run's ``config.json`` with the command
    line's ``--config.field=value`` ``overrides`` (a flat dict) applied on top, validated as
    training validates. Changing a field the checkpoint depends on (the network, the class
    count, the channels) is a ``ConfigError`` naming it."""
    config = load_run_config(workdir)
    for field, value in sorted(overrides.items()):
        fixed = field.split(".")[0] in FIXED_AFTER_TRAINING
        try:
            saved = _get(config, field)
        except (KeyError, AttributeError):
            saved = None
        if fixed and value != saved:
            raise ConfigError(
                f"config.{field}={value!r}: the checkpoints in {workdir} were trained with "
                f"{saved!r}, and it cannot change after training (drop the override, or pass "
                "--config with the config of another run)"
            )
    config.update_from_flattened_dict(dict(overrides))
    validate_config(config, workdir)
    return config


def given_config(config: ml_collections.ConfigDict, workdir: str) -> ml_collections.ConfigDict:
    """The config ``--mode=eval|predict|neighbors`` uses when ``--config`` is given: as given,
    with a class count left to the data (``num_classes=0``, as ``configs/folder.py`` leaves it)
    taken from the run: the count its ``config.json`` saved, or else the lines of its
    ``class_names.txt``. A run with neither is a ``ConfigError``."""
    if config.num_classes:
        return config
    try:
        count = load_run_config(workdir).num_classes
    except (MissingCheckpointError, DataError, ConfigError):
        count = len(_saved_class_names(workdir) or [])
    if not count:
        raise ConfigError(
            f"config.num_classes=0 leaves the class count to the data, and {workdir} keeps "
            f"no readable {CONFIG_FILE} or {CLASS_NAMES_FILE} to take it from: pass "
            "--config.num_classes with the count the checkpoint was trained for"
        )
    config = config.copy_and_resolve_references()
    config.num_classes = count
    return config


def _get(config: ml_collections.ConfigDict, dotted: str) -> Any:
    for part in dotted.split("."):
        config = config[part]
    return config


def _names_path(workdir: str) -> str:
    return os.path.join(workdir, CLASS_NAMES_FILE)


def _saved_class_names(workdir: str) -> list[str] | None:
    """The lines of the run's ``class_names.txt``, or None without one."""
    if not os.path.isfile(_names_path(workdir)):
        return None
    with open(_names_path(workdir), errors="replace") as f:
        return [line.strip() for line in f if line.strip()]


def class_names(workdir: str, num_classes: int) -> list[str]:
    """The run's ``class_names.txt``, or "0".."n-1" when it is missing or does not fit."""
    names = _saved_class_names(workdir)
    if names is not None:
        if len(names) == num_classes:
            return names
        logging.warning("%s lists %d names for %d classes; numbering them",
                        _names_path(workdir), len(names), num_classes)  # fmt: skip
    return [str(i) for i in range(num_classes)]


# --- choosing and restoring a checkpoint ------------------------------------------------------


def choose_step(workdir: str, manager, which: str | int = "best") -> int:
    """The checkpoint step for ``which``: "best" (highest eval top-1 in ``metrics.jsonl`` among
    the kept checkpoints; the latest when none was evaluated), "latest", or a step number."""
    steps = sorted(manager.all_steps())
    if not steps:
        raise MissingCheckpointError(f"No checkpoints in {manager.directory}")
    if which == "latest":
        return steps[-1]
    if which == "best":
        evals = {}
        for record in read_metrics(workdir):
            if record.get("split") == "eval" and record["step"] in steps:
                evals[record["step"]] = record["top1"]
        return max(evals, key=lambda s: (evals[s], s)) if evals else steps[-1]
    try:
        step = int(which)
    except ValueError as error:
        raise CheckpointError(f"checkpoint {which!r}: use best, latest or a step number") from error
    if step not in steps:
        raise MissingCheckpointError(
            f"No checkpoint at step {step} in {manager.directory}: {steps}"
        )
    return step


def check_fits(manager, step: int, template: TrainState, config) -> None:
    """Raises ``CheckpointError`` naming each parameter whose saved shape differs from the
    model's."""
    saved_params = _saved_params_metadata(manager, step)
    expected = jax.tree_util.tree_map(lambda x: tuple(x.shape), template.params)
    got = jax.tree_util.tree_map(lambda m: tuple(m.shape), saved_params)
    flat_expected = traverse_util.flatten_dict(expected, sep="/")
    flat_got = traverse_util.flatten_dict(got, sep="/")
    problems = [
        f"{name}: checkpoint {flat_got.get(name)}, model {shape}"
        for name, shape in flat_expected.items()
        if flat_got.get(name) != shape
    ]
    problems += [f"{name}: in the checkpoint, not in the model" for name in flat_got
                 if name not in flat_expected]  # fmt: skip
    if problems:
        raise CheckpointError(
            f"The checkpoint at step {step} in {manager.directory} does not fit "
            f"{describe(config.model, config.num_classes)}: " + "; ".join(problems)
        )


def _saved_params_metadata(manager, step: int) -> Any:
    """The saved parameters' metadata tree (shapes), read without restoring any array."""
    path = os.path.join(str(manager.directory), str(step), "default")
    try:
        metadata = ocp.PyTreeCheckpointHandler().metadata(epath.Path(path))
    except (FileNotFoundError, OSError, ValueError) as error:
        raise CheckpointError(
            f"{path!r} is not a readable Orbax checkpoint: {reason(error)}"
        ) from error
    tree = getattr(metadata, "tree", metadata)
    if not isinstance(tree, dict) or "params" not in tree:
        raise CheckpointError(f"{path!r} is not an alexnet_jax checkpoint: it saves no 'params'")
    return tree["params"]


def template_state(
    config: ml_collections.ConfigDict, abstract: bool = False, params: Any = None
) -> TrainState:
    """A new state of the model ``config`` describes: freshly initialized, or holding
    ``params`` (converted weights); with ``abstract``, its shapes and dtypes alone
    (``steps.abstract_train_state``: what a checkpoint is restored into, nothing
    initialized)."""
    channels = 3 if config.grayscale_to_rgb else config.channels
    model = create_model(config, config.num_classes)
    shape = (config.image_size, config.image_size, channels)
    if abstract:
        return abstract_train_state(config, model, shape)
    return create_train_state(jax.random.PRNGKey(0), config, model, shape, params)


def restore_state(
    config: ml_collections.ConfigDict, workdir: str, which: str | int = "best"
) -> tuple[TrainState, int]:
    """The TrainState of a run's checkpoint (``which``: best, latest or a step) and its step."""
    manager = checkpointing.create_manager(workdir, config)
    try:
        step = choose_step(workdir, manager, which)
        template = template_state(config, abstract=True)
        check_fits(manager, step, template, config)
        return checkpointing.restore(manager, template, step), step
    finally:
        manager.close()


def params_from_workdir(workdir: str, which: str | int = "best") -> tuple[dict, int]:
    """The parameters of another run's (or a converted model's) checkpoint, and its step."""
    state, step = restore_state(load_run_config(workdir), workdir, which)
    return jax.device_get(state.params), step


def transfer_params(target: dict, source: dict, source_name: str, head: str) -> dict:
    """``target`` with every layer taken from ``source``; the ``head`` layer (the classifier,
    ``model.head_layer``) stays newly initialized when its class count differs. Any other
    mismatch raises ``CheckpointError`` naming it."""
    params = dict(target)
    for layer, values in target.items():
        if layer not in source:
            raise CheckpointError(f"{source_name} has no layer {layer!r}: another architecture?")
        shapes = {k: (tuple(v.shape), tuple(source[layer][k].shape)) for k, v in values.items()}
        if all(ours == theirs for ours, theirs in shapes.values()):
            params[layer] = jax.tree_util.tree_map(jnp.asarray, source[layer])
        elif layer == head:
            logging.info("New head: %s %s from %s is replaced by a fresh %s", layer,
                         shapes["kernel"][1], source_name, shapes["kernel"][0])  # fmt: skip
        else:
            raise CheckpointError(
                f"Layer {layer!r} of {source_name} does not fit this model: "
                + ", ".join(
                    f"{k} {theirs} there, {ours} here" for k, (ours, theirs) in shapes.items()
                )
                + " (same config.model.variant, groups and input channels needed)"
            )
    return params
