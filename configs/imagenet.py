"""The paper's recipe on ImageNet (TFDS ``imagenet2012``, prepared by hand as TFDS documents).

    python main.py --config configs/imagenet.py --workdir runs/imagenet \
        --config.data_dir=/path/to/tensorflow_datasets

Batch 128; SGD with momentum 0.9 and weight decay 0.0005 inside the update; learning rate
0.01, divided by 10 when validation top-1 stops improving, three times; ~90 epochs; 227
crops of the 256x256 center with flips and fancy-PCA lighting; the paper's initialization;
10-crop evaluation.
"""

from alexnet_jax.defaults import default_config


def get_config():
    config = default_config()
    config.dataset = "imagenet2012"
    config.image_size = 227  # the layer arithmetic's 227 (the paper states 224)
    config.channels = 3
    config.num_classes = 1000

    config.input.resize_size = 256
    config.input.random_crop = True
    config.input.random_flip = True
    config.input.pca_lighting_std = 0.1
    # "Subtracting the mean activity over the training set from each pixel": the mean image,
    # averaged over 200 batches (25,600 crops) and saved in the workdir.
    config.input.normalization = "mean_image"
    config.input.mean_image_batches = 200
    config.input.eval_crops = 10

    config.model.variant = "paper"
    config.model.groups = 1  # one tower, as on one modern GPU; 2 for the paper's towers
    config.model.initializer = "paper"
    config.model.dropout_rate = 0.5

    config.batch_size = 128
    config.eval_batch_size = 256
    config.num_epochs = 90.0
    config.learning_rate = 0.01
    config.momentum = 0.9
    config.weight_decay = 5e-4
    config.lr_schedule = "plateau"
    # "Divided by 10 when the validation error rate stopped improving": the paper gives no
    # patience; 3 epochs without a 0.1-point gain is ours. Three reductions at most.
    config.plateau_patience = 3
    config.plateau_min_delta = 1e-3
    config.plateau_factor = 0.1
    config.plateau_max_reductions = 3

    config.eval_every_epochs = 1.0
    config.log_every_steps = 100
    config.checkpoint_every_steps = 2000
    config.max_to_keep = 3
    config.keep_best = 1
    return config
