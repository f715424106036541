"""Every config field a user may turn, with its default: ``default_config()``.

The files in ``configs/`` are recipes that start from this and change what they need;
``--config.field=value`` overrides any field on the command line. The defaults are the
embedded run: the paper's AlexNet on scikit-learn's handwritten digits, offline.
``alexnet_jax.config_checks.validate_config`` says which values each field accepts.
"""

from __future__ import annotations

import json
from typing import Any

import ml_collections
from absl import logging


def default_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.seed = 0

    # Data (alexnet_jax/data/).
    config.dataset = "digits"  # digits | synthetic | image_folder | a TFDS name
    config.data_dir = ""  # TFDS data_dir, the image folder's root, or the prepared records
    config.download = True  # TFDS data sets TFDS can download are downloaded on first use
    config.image_size = 67  # what the model sees; 67 is the paper network's smallest input
    config.channels = 1  # of the source images; grayscale_to_rgb makes the model see 3
    config.grayscale_to_rgb = False
    config.num_classes = 10  # 0: as many as the data has (image folders, TFDS, prepared)
    config.synthetic_steps_per_epoch = 100  # 'epoch' length for the synthetic source
    config.input = ml_collections.ConfigDict(
        dict(
            # the central square is resized to this before cropping; 0: image_size at the
            # paper's ratio 256/227 (227 -> 256), so a crop always sees most of the image
            resize_size=0,
            random_crop=True,
            augment_on="device",  # prepared records: crop/flip/light on the device | host
            random_flip=True,
            pca_lighting_std=0.0,  # the paper's fancy-PCA lighting: 0.1; 0 disables it
            # mean_std | mean (per channel) | mean_image (the paper's) | unit (x / 255) | none
            normalization="mean_std",
            mean_rgb=[0.485 * 255, 0.456 * 255, 0.406 * 255],
            std_rgb=[0.229 * 255, 0.224 * 255, 0.225 * 255],
            # mean_image: a .npy (image_size, image_size, channels), or "": averaged over the
            # first mean_image_batches training batches and saved as WORKDIR/mean_image.npy
            mean_image_path="",
            mean_image_batches=100,
            eval_crops=1,  # 1: center crop; 10: four corners, center and their mirrors
            shuffle_buffer=16_384,
            prefetch=2,  # batches kept ready on the devices
            threads=0,  # tf.data threads; 0: as many as tf.data likes (all cores)
        )
    )

    # Model (alexnet_jax/model.py, alexnet_jax/vgg.py).
    config.model = ml_collections.ConfigDict(
        dict(
            name="alexnet",  # alexnet | vgg11
            variant="paper",  # alexnet: paper | torchvision | d2l
            groups=1,  # alexnet: 2 for the paper's two towers on conv2, conv4, conv5
            dropout_rate=0.5,
            # alexnet: paper | torch | xavier | he, or None for the variant's own. The paper's
            # N(0, 0.01^2) needs ~30 epochs to leave the plateau: the digits run uses he.
            initializer="he",
            use_lrn=True,  # alexnet ablation: False drops the LRN
            overlap_pool=True,  # alexnet ablation: False pools 2x2/2 instead of 3x3/2
            # alexnet LRN constants, in the paper's convention (alpha not divided by size)
            lrn_size=5,
            lrn_k=2.0,
            lrn_alpha=1e-4,
            lrn_beta=0.75,
            # divides every layer's width but the last (alexnet: the conv filters and fc6, fc7
            # units; vgg11: every block's, 4 giving d2l's narrow VGG-11); 1: the network's own
            width_divisor=1,
        )
    )
    # Fine-tuning: a workdir (a run's, or python -m alexnet_jax.convert's) to start from; its
    # layers are copied, the last layer re-initialized when num_classes differs. Ignored on
    # resume.
    config.init_from = ""
    config.init_from_checkpoint = "best"  # best | latest | a step number
    config.half_precision = False  # bfloat16 computation, float32 parameters and optimizer
    # True keeps all of XLA:CPU's YNNPACK fusions (its convolutions are slower for AlexNet);
    # False, YNNPACK for dots only. See benchmarks/README.md.
    config.xla_cpu_ynn_fusions = False
    # auto | onednn | xla: CPU convolutions on oneDNN (PyTorch's kernels), built on first use
    # (auto: where a C++ compiler and oneDNN are found, else XLA's; onednn: required; xla:
    # XLA's own). GPUs run cuDNN's either way. See alexnet_jax/onednn.py.
    config.cpu_convolutions = "auto"
    # auto | onednn | xla: the same for the dense layers' products (oneDNN's matmul, as
    # PyTorch's linear layers run on the CPU). GPUs run cuBLAS's either way.
    config.cpu_matmuls = "auto"
    # auto | reuse | system: keep the host memory a CPU step frees for the next step (glibc;
    # auto: on CPU-only installations). See alexnet_jax/host_memory.py.
    config.host_memory = "auto"
    # auto | none | a directory: compiled steps kept on disk for the next start (resume, eval,
    # predict). auto: JAX_COMPILATION_CACHE_DIR if set, else ~/.cache/alexnet_jax/xla (2 GiB,
    # least recently used evicted). See alexnet_jax/compilation_cache.py.
    config.compilation_cache = "auto"

    # Optimizer (alexnet_jax/optim.py): the paper's SGD.
    config.batch_size = 64  # global, over all devices and processes
    config.eval_batch_size = 120
    config.num_epochs = 8.0
    config.num_train_steps = -1  # > 0 overrides num_epochs (short runs, tests)
    config.learning_rate = 0.01
    config.momentum = 0.9
    config.weight_decay = 5e-4
    config.weight_decay_on_biases = False
    config.lr_schedule = "piecewise"  # constant | piecewise | plateau | warmup_cosine
    config.lr_boundaries_epochs = [6.0]
    config.lr_decay_factor = 0.1
    config.warmup_epochs = 0.0
    config.plateau_patience = 1  # evaluations without improvement before a reduction
    config.plateau_factor = 0.1
    config.plateau_max_reductions = 3
    config.plateau_min_delta = 0.0

    # Loop, logging and checkpoints (alexnet_jax/train.py, checkpointing.py).
    config.log_every_steps = 20
    config.eval_every_epochs = 1.0
    config.checkpoint_every_steps = 100
    config.max_to_keep = 2  # latest checkpoints kept (besides the best by eval top-1)
    config.keep_best = 1  # best checkpoints by eval top-1 kept
    config.async_checkpointing = True
    config.progress_bar = True
    # > 0: a jax.profiler trace of this many steps, after 5 warm-up steps, in WORKDIR/profile
    # (TensorBoard's profile plugin or Perfetto: README "Looking inside a run")
    config.profile_steps = 0
    config.distributed = "auto"  # auto | yes | no: jax.distributed.initialize
    return config


def config_from_dict(saved: dict[str, Any], where: str) -> ml_collections.ConfigDict:
    """``default_config()`` updated with a saved config's values (a run's ``config.json``).

    Fields the saved config lacks (added since it was written) keep their defaults; fields
    this version no longer has are dropped with a warning naming ``where``.
    """
    config = default_config()
    dropped: list[str] = []
    _merge(config, saved, "", dropped)
    if dropped:
        logging.warning("%s: ignoring fields this version does not have: %s", where, dropped)
    return config


def _merge(config: ml_collections.ConfigDict, saved: dict, prefix: str, dropped: list) -> None:
    for key, value in saved.items():
        if key not in config:
            dropped.append(prefix + key)
        elif isinstance(config[key], ml_collections.ConfigDict) and isinstance(value, dict):
            _merge(config[key], value, f"{prefix}{key}.", dropped)
        else:
            with config.ignore_type():
                config[key] = value


def config_to_json(config: ml_collections.ConfigDict) -> str:
    """The config as the JSON a run saves (``config.json``), read back by ``config_from_dict``."""
    return json.dumps(json.loads(config.to_json_best_effort()), indent=2) + "\n"
