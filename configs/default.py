"""The default run: the paper's AlexNet on scikit-learn's handwritten digits, offline.

    python main.py                      # this config, workdir runs/default
    python main.py --config.num_epochs=5 --config.batch_size=128

Every field a user may turn lives here; the other configs start from this one.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.seed = 0

    # Data (alexnet_jax/input_pipeline.py).
    config.dataset = "digits"  # digits | synthetic | image_folder | a TFDS name
    config.data_dir = ""  # TFDS data_dir, or the image folder's root
    config.image_size = 67  # what the model sees; 67 is the paper network's smallest input
    config.channels = 1  # of the source images; grayscale_to_rgb makes the model see 3
    config.grayscale_to_rgb = False
    config.num_classes = 10
    config.synthetic_steps_per_epoch = 100  # 'epoch' length for the synthetic source
    config.input = ml_collections.ConfigDict(
        dict(
            resize_size=256,  # shorter side before cropping (TF sources)
            random_crop=True,
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
            eval_crops=1,  # 1: centre crop; 10: four corners, centre and their mirrors
            shuffle_buffer=16_384,
            prefetch=2,  # batches kept ready on the devices
            threads=0,  # tf.data threads; 0: as many as tf.data likes (all cores)
        )
    )

    # Model (alexnet_jax/model.py): passed to AlexNet(**config.model).
    config.model = ml_collections.ConfigDict(
        dict(
            variant="paper",
            groups=1,
            dropout_rate=0.5,
            initializer="he",  # the paper's N(0, 0.01^2) needs ~30 epochs to leave the plateau
            use_lrn=True,
            overlap_pool=True,
        )
    )
    # Fine-tuning: a workdir (a run's, or python -m alexnet_jax.convert's) to start from; its
    # layers are copied, fc8 re-initialised when num_classes differs. Ignored on resume.
    config.init_from = ""
    config.init_from_checkpoint = "best"  # best | latest | a step number
    config.half_precision = False  # bfloat16 computation, float32 parameters and optimiser
    # True keeps XLA:CPU's YNNPACK convolution fusions, 2.5x slower here (train.py explains)
    config.xla_cpu_ynn_fusions = False

    # Optimiser (alexnet_jax/optim.py): the paper's SGD.
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
    config.distributed = "auto"  # auto | yes | no: jax.distributed.initialize
    return config
