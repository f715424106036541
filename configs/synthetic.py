"""A benchmark run that needs no data and imports no TensorFlow: the paper's network on random
227x227 images made on the devices.

    python main.py --config configs/synthetic.py --config.batch_size=256 \
        --config.half_precision=True
"""

from alexnet_jax.defaults import default_config


def get_config():
    config = default_config()
    config.dataset = "synthetic"
    config.image_size = 227
    config.channels = 3
    config.num_classes = 1000
    config.model.initializer = "paper"
    config.batch_size = 128
    config.eval_batch_size = 128
    config.num_train_steps = 100
    config.synthetic_steps_per_epoch = 100
    config.eval_every_epochs = 1.0
    config.log_every_steps = 10
    config.checkpoint_every_steps = 100_000  # benchmarks time steps, not checkpoints
    config.max_to_keep = 1
    config.keep_best = 0
    return config
