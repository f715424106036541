"""Trains AlexNet: ``python main.py --config configs/imagenet.py --workdir runs/imagenet``.

With no flags it trains the paper's network on scikit-learn's handwritten digits (offline)
in ``runs/default``. Override any config field with ``--config.field=value``. Rerunning the
same command resumes from the workdir's latest checkpoint.

    python main.py --mode=eval --workdir W [--checkpoint=best|latest|STEP]
    python main.py --mode=predict --workdir W --images a.jpg b.png
    python main.py --mode=neighbors --workdir W --images a.jpg   # nearest in fc7 (Figure 4)

evaluate and predict with a run's checkpoint (alexnet_jax/evaluate.py): the run's
``W/config.json``, with any ``--config.field=value`` applied on top (or the ``--config``
file given instead). A problem the user can fix (a config field, missing data, a
checkpoint that does not fit, an unreadable image) prints one line, ``error: ...``, and
exits with status 2 (usage and config) or 1.
"""

import logging as std_logging
import os
import sys

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from alexnet_jax import compilation_cache, distributed, evaluate, host_memory, neighbors, train
from alexnet_jax.errors import one_line_errors
from alexnet_jax.run_files import eval_config, given_config

WORKDIR = flags.DEFINE_string(
    "workdir", None, "Where checkpoints and metrics go (default runs/<config name>)."
)
USAGE_EXIT = 2
# The project's folder: its configs/ holds the default config, wherever main.py is run from.
PROJECT = os.path.dirname(os.path.abspath(__file__))


def usage_error(message: str) -> None:
    print(f"error: {message}\nPass --helpfull to see the flags.", file=sys.stderr)
    sys.exit(USAGE_EXIT)


try:  # ml_collections applies --config.* overrides to the default file here, at definition
    config_flags.DEFINE_config_file(
        "config", os.path.join(PROJECT, "configs", "default.py"), "A config file.", lock_config=True
    )
except (AttributeError, KeyError) as error:
    fields = [a.split("=")[0] for a in sys.argv[1:] if a.startswith("--config.")]
    usage_error(f"no such config field {str(error).strip(chr(34))} (among {fields})")
MODE = flags.DEFINE_enum("mode", "train", ["train", "eval", "predict", "neighbors"], "What to do.")
CHECKPOINT = flags.DEFINE_string(
    "checkpoint", "best", "eval/predict: best (by eval top-1), latest, or a step number."
)
IMAGES = flags.DEFINE_list(
    "images",
    [],
    "predict, neighbors: image files (comma- or space-separated); for predict also folders.",
)
NEIGHBORS = flags.DEFINE_integer("neighbors", 6, "neighbors: training images per query.")
NEIGHBORS_POOL = flags.DEFINE_integer(
    "neighbors_pool", 20_000, "neighbors: training images searched (0: all)."
)


def _project_hint() -> str:
    """Where a relative --config path that is missing here exists in the project's folder."""
    path = config_flags.get_config_filename(flags.FLAGS["config"])
    if os.path.isabs(path) or os.path.exists(path):
        return ""
    there = os.path.join(PROJECT, path)
    if not os.path.exists(there):
        return ""
    return f" (relative to the current folder, {os.getcwd()}; the project's is {there})"


def main(argv):
    images = list(IMAGES.value)
    if len(argv) > 1:
        if MODE.value not in ("predict", "neighbors"):
            raise app.UsageError(f"Unexpected arguments: {argv[1:]}", exitcode=USAGE_EXIT)
        images += argv[1:]  # --images a.jpg b.png: the files after the first
    try:
        config = flags.FLAGS.config
        config.get("distributed")  # a file that failed to load raises here, not when parsed
    except OSError as error:
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        usage_error(f"cannot load the --config file: {lines[-1]}{_project_hint()}")
    reused = host_memory.configure(config.host_memory)  # before JAX starts its threads
    cache = compilation_cache.configure(config.compilation_cache)  # before any compilation
    distributed.initialize(config.distributed)  # before anything touches the devices
    config_name = os.path.basename(config_flags.get_config_filename(flags.FLAGS["config"]))
    workdir = WORKDIR.value or os.path.join("runs", os.path.splitext(config_name)[0])
    logging.info(
        "JAX %s, process %d of %d, workdir %s, host memory %s, compilation cache %s",
        jax.__version__,
        jax.process_index(),
        jax.process_count(),
        workdir,
        "kept for reuse" if reused else "glibc's defaults",
        cache or "off",
    )
    if MODE.value == "train":
        train.train_and_evaluate(config, workdir)
        return
    if not flags.FLAGS["config"].present:  # the run's own config, with the overrides given
        overrides = config_flags.get_override_values(flags.FLAGS["config"])
        config = eval_config(workdir, overrides)
    else:  # the config given, its class count taken from the run if it left that to the data
        config = given_config(config, workdir)
    if MODE.value == "eval":
        for record in evaluate.evaluate_checkpoint(config, workdir, CHECKPOINT.value):
            print(
                f"step {record['step']}, {record['crops']:>2} crop(s): top-1 "
                f"{record['top1']:.4f}  top-5 {record['top5']:.4f}  loss {record['loss']:.4f}  "
                f"({record['count']} images)"
                + (
                    f"  ReaL top-1 {record['real_top1']:.4f} ({record['real_count']} with labels)"
                    if "real_top1" in record
                    else ""
                )
            )
        return
    if MODE.value == "neighbors":
        results = neighbors.nearest_training_images(
            config, workdir, images, NEIGHBORS.value, NEIGHBORS_POOL.value, CHECKPOINT.value
        )
        for result in results:
            print(result["path"])
            for found in result["neighbors"]:
                print(f"  {found['distance']:10.3f}  {found['name']}")
        print(os.path.join(workdir, "neighbors.png"))
        return
    for result in evaluate.iter_predictions(config, workdir, images, CHECKPOINT.value):
        print(result["path"])
        for name, probability in result["top"]:
            print(f"  {probability:7.2%}  {name}")
        sys.stdout.flush()  # each batch's results as they come


def run(argv):
    """``main``, with the errors a user can fix printed as one line instead of a traceback."""
    one_line_errors(lambda: main(argv))


def parse_flags(argv):
    """absl's flag parsing, with a bad flag or config override as one line and status 2."""
    try:
        return flags.FLAGS(argv)
    except flags.Error as error:
        message = str(error)
        if "Traceback" in message:  # a config file that raised: its own last line says why
            lines = [line.strip() for line in message.splitlines() if line.strip()]
            message = f"{lines[0]} {lines[-1]}"
        usage_error(message)


class _QuietLibraries(std_logging.Filter):
    """Keeps Orbax's and TensorFlow's per-save INFO chatter out of the run's log."""

    def filter(self, record: std_logging.LogRecord) -> bool:
        noisy = ("orbax", "tensorflow", "tensorstore")
        return record.levelno >= std_logging.WARNING or not any(n in record.pathname for n in noisy)


if __name__ == "__main__":
    logging.set_verbosity(logging.INFO)
    logging.get_absl_handler().addFilter(_QuietLibraries())
    app.run(run, flags_parser=parse_flags)
