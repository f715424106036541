"""Dive into Deep Learning's AlexNet recipe on Fashion-MNIST (d2l reports 0.883 test accuracy).

    python main.py --config configs/fashion_mnist.py --config.data_dir=/path/to/tfds

1-channel 28x28 images resized to 224, the d2l variant (conv1 padding 1, no LRN), plain SGD
with learning rate 0.01, batch 128, 10 epochs, pixels scaled to [0, 1].
"""

from alexnet_jax.defaults import default_config


def get_config():
    config = default_config()
    config.dataset = "fashion_mnist"
    config.image_size = 224
    config.channels = 1
    config.num_classes = 10

    config.input.resize_size = 224  # d2l resizes straight to 224: no crop, no flip
    config.input.random_crop = False
    config.input.random_flip = False
    config.input.pca_lighting_std = 0.0
    config.input.normalization = "unit"  # ToTensor(): [0, 1]
    config.input.eval_crops = 1

    config.model.variant = "d2l"
    config.model.initializer = "xavier"  # d2l's init_cnn
    config.model.use_lrn = False
    config.model.dropout_rate = 0.5

    config.batch_size = 128
    config.eval_batch_size = 256
    config.num_epochs = 10.0
    config.learning_rate = 0.01
    config.momentum = 0.0  # plain SGD
    config.weight_decay = 0.0
    config.lr_schedule = "constant"
    config.eval_every_epochs = 1.0
    config.log_every_steps = 50
    config.checkpoint_every_steps = 500
    return config
