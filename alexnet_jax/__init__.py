"""alexnet-jax: a faithful, fast JAX/Flax reimplementation of AlexNet (Krizhevsky et al. 2012)."""

__version__ = "0.1.0"
