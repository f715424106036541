"""Your own labeled photos: ``DATA/{train,val}/<class name>/**/*.jpg|png|webp|gif|bmp``.

    python main.py --config configs/folder.py --config.data_dir=/data/photos
    # or from torchvision's ImageNet weights (python -m alexnet_jax.convert ... first):
    python main.py --config configs/folder.py:finetune --config.data_dir=/data/photos \
        --config.init_from=runs/torchvision

A class's images are the files in its folder and in the folders below it; hidden folders
and files (``.ipynb_checkpoints``, ``._*``) are left out. The class count comes from the
folder (``num_classes=0``). Images of any size: the central square is resized to 256/227
of the crop (``resize_size=0``), so the network sees most of each image however small it
is; random crops and flips, PCA lighting. ``scratch`` (the default) trains the paper's
network with He initialization (the paper's N(0, 0.01^2) needs tens of epochs to start
learning); ``finetune`` starts from torchvision's weights in
``init_from`` with their layout, 224 crops of 256, ImageNet's mean and std, and a 10x
smaller learning rate. For folders of many thousands of images, prepare them once
(``python -m alexnet_jax.data.prepare``) and train with ``--config.dataset=prepared``.
"""

from alexnet_jax.defaults import default_config


def get_config(mode: str = "scratch"):
    if mode not in ("scratch", "finetune"):
        raise ValueError(f"configs/folder.py:{mode}: use configs/folder.py:scratch or :finetune")
    config = default_config()
    config.dataset = "image_folder"
    config.data_dir = ""  # required: --config.data_dir=/path/to/photos
    config.channels = 3
    config.num_classes = 0  # as many as the folder has
    config.image_size = 227
    config.input.resize_size = 0  # 256 for 227 crops
    config.input.pca_lighting_std = 0.1
    config.input.normalization = "mean_std"

    config.model.variant = "paper"
    config.model.initializer = "he"
    config.batch_size = 64
    config.eval_batch_size = 128
    config.num_epochs = 30.0
    config.learning_rate = 0.01
    config.lr_schedule = "piecewise"
    config.lr_boundaries_epochs = [20.0, 27.0]
    config.eval_every_epochs = 1.0
    config.log_every_steps = 20
    config.checkpoint_every_steps = 500

    if mode == "finetune":
        config.init_from = "runs/torchvision"  # python -m alexnet_jax.convert's workdir
        config.model.variant = "torchvision"
        config.model.initializer = "torch"
        config.image_size = 224
        config.input.resize_size = 256
        config.learning_rate = 0.001
        config.num_epochs = 10.0
        config.lr_boundaries_epochs = [7.0]
    return config
