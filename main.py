"""Trains AlexNet: ``python main.py --config configs/imagenet.py --workdir runs/imagenet``.

With no flags it trains the paper's network on scikit-learn's handwritten digits (offline)
in ``runs/default``. Override any config field with ``--config.field=value``. Rerunning the
same command resumes from the workdir's latest checkpoint.

    python main.py --mode=eval --workdir W [--checkpoint=best|latest|STEP]
    python main.py --mode=predict --workdir W --images a.jpg b.png

evaluate and predict with a run's checkpoint, reading ``W/config.json`` unless ``--config``
is given (alexnet_jax/evaluate.py).
"""

import logging as std_logging
import os

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from alexnet_jax import distributed, evaluate, train
from alexnet_jax.run_files import load_run_config

WORKDIR = flags.DEFINE_string(
    "workdir", None, "Where checkpoints and metrics go (default runs/<config name>)."
)
config_flags.DEFINE_config_file("config", "configs/default.py", "A config file.", lock_config=True)
MODE = flags.DEFINE_enum("mode", "train", ["train", "eval", "predict"], "What to do.")
CHECKPOINT = flags.DEFINE_string(
    "checkpoint", "best", "eval/predict: best (by eval top-1), latest, or a step number."
)
IMAGES = flags.DEFINE_list("images", [], "predict: image files (comma- or space-separated).")


def main(argv):
    images = list(IMAGES.value)
    if len(argv) > 1:
        if MODE.value != "predict":
            raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
        images += argv[1:]  # --images a.jpg b.png: the files after the first
    config = flags.FLAGS.config
    distributed.initialize(config.distributed)  # before anything touches the devices
    config_name = config_flags.get_config_filename(flags.FLAGS["config"])
    workdir = WORKDIR.value or os.path.join(
        "runs", os.path.splitext(os.path.basename(config_name))[0]
    )
    logging.info(
        "JAX %s, process %d of %d, workdir %s",
        jax.__version__,
        jax.process_index(),
        jax.process_count(),
        workdir,
    )
    if MODE.value == "train":
        train.train_and_evaluate(config, workdir)
        return
    if not flags.FLAGS["config"].present:
        config = load_run_config(workdir)
    if MODE.value == "eval":
        for record in evaluate.evaluate_checkpoint(config, workdir, CHECKPOINT.value):
            print(
                f"step {record['step']}, {record['crops']:>2} crop(s): top-1 "
                f"{record['top1']:.4f}  top-5 {record['top5']:.4f}  loss {record['loss']:.4f}  "
                f"({record['count']} images)"
            )
        return
    for result in evaluate.predict_files(config, workdir, images, CHECKPOINT.value):
        print(result["path"])
        for name, probability in result["top"]:
            print(f"  {probability:7.2%}  {name}")


class _QuietLibraries(std_logging.Filter):
    """Keeps Orbax's and TensorFlow's per-save INFO chatter out of the run's log."""

    def filter(self, record: std_logging.LogRecord) -> bool:
        noisy = ("orbax", "tensorflow", "tensorstore")
        return record.levelno >= std_logging.WARNING or not any(n in record.pathname for n in noisy)


if __name__ == "__main__":
    logging.set_verbosity(logging.INFO)
    logging.get_absl_handler().addFilter(_QuietLibraries())
    app.run(main)
