"""Dive into Deep Learning's VGG-11 recipe on Fashion-MNIST, the sister network of d2l's
AlexNet lecture (d2l trains a 4x narrower VGG-11 there and reaches about 0.90 test accuracy).

    python main.py --config configs/vgg11.py --config.data_dir=/path/to/tfds
    python main.py --config configs/vgg11.py --config.dataset=digits \
        --config.image_size=32 --config.input.normalization=none \
        --config.batch_size=32 --config.num_epochs=5    # offline, 2 cores: README's results

VGG-11's blocks ((1, 64), (1, 128), (2, 256), (2, 512), (2, 512)) of 3x3 convolutions with
widths divided by 4, 1-channel 28x28 images resized to 224, plain SGD with learning rate
0.05, batch 128, 10 epochs, pixels scaled to [0, 1].
"""

from configs.fashion_mnist import get_config as fashion_mnist_config


def get_config():
    config = fashion_mnist_config()
    config.model.name = "vgg11"
    config.model.width_divisor = 4
    config.model.dropout_rate = 0.5
    config.learning_rate = 0.05
    return config
