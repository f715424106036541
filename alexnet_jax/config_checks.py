"""Up-front validation of a run's config: a ``ConfigError`` naming the field, before any
compute."""

from __future__ import annotations

import os

import jax
import ml_collections

from alexnet_jax import data, model, optim
from alexnet_jax.data.dataset import AUGMENT_ON
from alexnet_jax.distributed import MODES as DISTRIBUTED
from alexnet_jax.errors import ConfigError
from alexnet_jax.host_memory import MODES as HOST_MEMORY
from alexnet_jax.normalization import NORMALIZATIONS
from alexnet_jax.onednn import MODES as CPU_KERNELS
from alexnet_jax.vgg import VGG11_ARCH


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def validate_config(config: ml_collections.ConfigDict, workdir: str | None = None) -> None:
    """Raises ``ConfigError`` naming the first field whose value cannot work."""
    c = config
    _require(
        data.source_name(c.dataset) in data.SOURCES,
        f"config.dataset={c.dataset!r}: choose one of {data.SOURCES}",
    )
    _require(
        c.model.name in model.MODEL_NAMES,
        f"config.model.name={c.model.name!r}: choose one of {model.MODEL_NAMES}",
    )
    _require(
        c.model.variant in model.VARIANTS,
        f"config.model.variant={c.model.variant!r}: choose one of {model.VARIANTS}",
    )
    init = c.model.get("initializer")
    _require(
        init is None or init in model.INITS,
        f"config.model.initializer={init!r}: choose one of {model.INITS}",
    )
    _require(
        c.model.groups in (1, 2),
        f"config.model.groups={c.model.groups}: 1 or 2 (the paper's towers)",
    )
    _require(
        0.0 <= c.model.dropout_rate < 1.0,
        f"config.model.dropout_rate={c.model.dropout_rate}: must be in [0, 1)",
    )
    _require(
        c.num_classes >= 0,
        f"config.num_classes={c.num_classes}: must be positive, or 0 for the data's own count",
    )
    _require(
        c.num_classes > 0 or c.dataset not in ("synthetic", "digits"),
        f"config.num_classes=0: the {c.dataset} source needs an explicit class count",
    )
    _require(c.channels in (1, 3), f"config.channels={c.channels}: 1 or 3")
    if c.model.name == "vgg11":
        _require(
            c.model.width_divisor >= 1
            and all(w % c.model.width_divisor == 0 for _, w in VGG11_ARCH),
            f"config.model.width_divisor={c.model.width_divisor}: must divide every VGG "
            f"block's width {[w for _, w in VGG11_ARCH]}",
        )
    else:
        try:
            model.layer_widths(c.model.variant, c.model.groups, c.model.width_divisor)
        except ValueError as error:
            raise ConfigError(
                f"config.model.width_divisor={c.model.width_divisor} with "
                f"config.model.groups={c.model.groups}: {error}"
            ) from None
    _require(
        c.model.lrn_size >= 1 and c.model.lrn_size % 2 == 1,
        f"config.model.lrn_size={c.model.lrn_size}: a positive odd number of channels",
    )
    smallest = model.smallest_input(c.model)
    network = c.model.name if c.model.name != "alexnet" else f"variant {c.model.variant!r}"
    _require(
        c.image_size >= smallest,
        f"config.image_size={c.image_size}: {network} needs at least {smallest}",
    )

    devices = jax.device_count()
    for field in ("batch_size", "eval_batch_size"):
        value = c[field]
        _require(value >= 1, f"config.{field}={value}: must be positive")
        _require(
            value % devices == 0,
            f"config.{field}={value} does not divide evenly over {devices} devices "
            f"({jax.process_count()} processes x {jax.local_device_count()} local); "
            f"use a multiple of {devices}",
        )
    _require(c.num_epochs > 0, f"config.num_epochs={c.num_epochs}: must be positive")
    _require(c.learning_rate > 0, f"config.learning_rate={c.learning_rate}: must be positive")
    _require(0.0 <= c.momentum < 1.0, f"config.momentum={c.momentum}: must be in [0, 1)")
    _require(c.weight_decay >= 0, f"config.weight_decay={c.weight_decay}: must be >= 0")
    _require(
        c.lr_schedule in optim.SCHEDULES,
        f"config.lr_schedule={c.lr_schedule!r}: choose one of {optim.SCHEDULES}",
    )
    _require(
        0 < c.lr_decay_factor <= 1, f"config.lr_decay_factor={c.lr_decay_factor}: must be in (0, 1]"
    )
    _require(
        0 < c.plateau_factor <= 1, f"config.plateau_factor={c.plateau_factor}: must be in (0, 1]"
    )
    _require(c.plateau_patience >= 1, f"config.plateau_patience={c.plateau_patience}: must be >= 1")
    _require(
        list(c.lr_boundaries_epochs) == sorted(c.lr_boundaries_epochs),
        f"config.lr_boundaries_epochs={list(c.lr_boundaries_epochs)}: must be increasing",
    )
    _require(
        0 <= c.warmup_epochs < c.num_epochs or c.lr_schedule != "warmup_cosine",
        f"config.warmup_epochs={c.warmup_epochs}: must be below num_epochs={c.num_epochs}",
    )
    _require(c.profile_steps >= 0, f"config.profile_steps={c.profile_steps}: must be >= 0")
    for field in ("log_every_steps", "checkpoint_every_steps", "max_to_keep"):
        _require(c[field] >= 1, f"config.{field}={c[field]}: must be at least 1")
    _require(
        c.eval_every_epochs > 0, f"config.eval_every_epochs={c.eval_every_epochs}: must be positive"
    )
    _require(
        c.distributed in DISTRIBUTED,
        f"config.distributed={c.distributed!r}: choose one of {DISTRIBUTED}",
    )
    for field in ("cpu_convolutions", "cpu_matmuls"):
        _require(
            c[field] in CPU_KERNELS,
            f"config.{field}={c[field]!r}: choose one of {CPU_KERNELS}",
        )
    _require(
        c.host_memory in HOST_MEMORY,
        f"config.host_memory={c.host_memory!r}: choose one of {HOST_MEMORY}",
    )
    _require(
        c.input.eval_crops in (1, 10),
        f"config.input.eval_crops={c.input.eval_crops}: 1 (center) or 10",
    )
    _require(
        c.input.normalization in NORMALIZATIONS,
        f"config.input.normalization={c.input.normalization!r}: choose one of {NORMALIZATIONS}",
    )
    _require(
        c.input.mean_image_batches >= 1,
        f"config.input.mean_image_batches={c.input.mean_image_batches}: must be at least 1",
    )
    _require(
        c.input.pca_lighting_std >= 0,
        f"config.input.pca_lighting_std={c.input.pca_lighting_std}: must be >= 0",
    )
    _require(
        c.input.resize_size == 0 or c.input.resize_size >= c.image_size,
        f"config.input.resize_size={c.input.resize_size} is smaller than "
        f"config.image_size={c.image_size} (0 follows image_size at the paper's ratio)",
    )
    _require(
        c.input.augment_on in AUGMENT_ON,
        f"config.input.augment_on={c.input.augment_on!r}: choose one of {AUGMENT_ON}",
    )
    if c.dataset == "image_folder":
        _require(
            bool(c.data_dir),
            "config.data_dir is empty: image_folder needs the folder holding train/ and val/",
        )
    if c.dataset == "prepared":
        _require(
            bool(c.data_dir),
            "config.data_dir is empty: prepared needs the folder python -m "
            "alexnet_jax.data.prepare wrote",
        )
    if c.dataset in ("image_folder", "imagenet2012", "prepared") and c.data_dir:
        _require(os.path.isdir(c.data_dir), f"config.data_dir={c.data_dir!r} is not a directory")
    if c.init_from:
        _require(
            os.path.isfile(os.path.join(c.init_from, "config.json")),
            f"config.init_from={c.init_from!r} is not a run's workdir (it has no config.json)",
        )
    if workdir is not None:
        check_workdir(workdir)


def check_workdir(workdir: str) -> None:
    """The workdir must be creatable and writable: fail now, not at the first checkpoint."""
    try:
        os.makedirs(workdir, exist_ok=True)
        probe = os.path.join(workdir, f".write_test_{jax.process_index()}")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as error:
        raise ConfigError(f"workdir {workdir!r} is not writable: {error}") from error
