"""Times the LRN's forward+backward against the conv1 that feeds it, at conv1's output size.

    python benchmarks/lrn.py [--batch 32] [--repeats 20] [--dtype float32|bfloat16]

Prints the median of several timed runs of each (after compiling and warming up).
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp

from alexnet_jax.lrn import local_response_norm


def median_seconds(fn, *args, repeats: int) -> float:
    jax.block_until_ready(fn(*args))  # compile and warm up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = parser.parse_args()
    dtype = jnp.dtype(args.dtype)
    keys = jax.random.split(jax.random.key(0), 3)
    images = jax.random.uniform(keys[0], (args.batch, 227, 227, 3), dtype)
    kernel = (jax.random.normal(keys[1], (11, 11, 3, 96)) * 0.01).astype(dtype)
    acts = jax.nn.relu(jax.random.normal(keys[2], (args.batch, 55, 55, 96)) * 30).astype(dtype)

    def conv(x, w):
        return jax.lax.conv_general_dilated(
            x, w, (4, 4), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC")
        )

    # conv1 is the first layer: a train step needs its kernel gradient, not an image gradient.
    conv_fwd_bwd = jax.jit(jax.grad(lambda w, x: conv(x, w).astype(jnp.float32).sum()))
    lrn_fwd_bwd = jax.jit(jax.grad(lambda a: local_response_norm(a).astype(jnp.float32).sum()))
    conv_fwd = jax.jit(conv)
    lrn_fwd = jax.jit(local_response_norm)

    rows = [
        ("conv1 forward", median_seconds(conv_fwd, images, kernel, repeats=args.repeats)),
        ("LRN forward", median_seconds(lrn_fwd, acts, repeats=args.repeats)),
        ("conv1 fwd+bwd", median_seconds(conv_fwd_bwd, kernel, images, repeats=args.repeats)),
        ("LRN fwd+bwd", median_seconds(lrn_fwd_bwd, acts, repeats=args.repeats)),
    ]
    print(f"{jax.devices()[0].device_kind}, batch {args.batch}, {args.dtype}, 55x55x96")
    for name, seconds in rows:
        print(f"{name:15s} {seconds * 1e3:9.2f} ms")
    print(f"LRN / conv1 forward+backward: {rows[3][1] / rows[2][1]:.3f}")


if __name__ == "__main__":
    main()
