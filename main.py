"""Trains AlexNet: ``python main.py --config configs/imagenet.py --workdir runs/imagenet``.

With no flags it trains the paper's network on scikit-learn's handwritten digits (offline)
in ``runs/default``. Override any config field with ``--config.field=value``. Rerunning the
same command resumes from the workdir's latest checkpoint.
"""

import logging as std_logging
import os

from absl import app, flags, logging
from ml_collections import config_flags

FLAGS = flags.DEFINE_string(
    "workdir", None, "Where checkpoints and metrics go (default runs/<config name>)."
)
config_flags.DEFINE_config_file("config", "configs/default.py", "A config file.", lock_config=True)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    config = flags.FLAGS.config
    from alexnet_jax import distributed

    distributed.initialize(config.distributed)  # before anything touches the devices
    import jax

    from alexnet_jax import train

    workdir = FLAGS.value or os.path.join(
        "runs",
        os.path.splitext(os.path.basename(config_flags.get_config_filename(flags.FLAGS["config"])))[
            0
        ],
    )
    logging.info(
        "JAX %s, process %d of %d, workdir %s",
        jax.__version__,
        jax.process_index(),
        jax.process_count(),
        workdir,
    )
    train.train_and_evaluate(config, workdir)


class _QuietLibraries(std_logging.Filter):
    """Keeps Orbax's and TensorFlow's per-save INFO chatter out of the run's log."""

    def filter(self, record: std_logging.LogRecord) -> bool:
        noisy = ("orbax", "tensorflow", "tensorstore")
        return record.levelno >= std_logging.WARNING or not any(n in record.pathname for n in noisy)


if __name__ == "__main__":
    logging.set_verbosity(logging.INFO)
    logging.get_absl_handler().addFilter(_QuietLibraries())
    app.run(main)
