"""Times the LRN's forward+backward against the conv1 that feeds it, at conv1's output size.

    python benchmarks/lrn.py [--batch 32] [--repeats 20] [--dtype float32|bfloat16]
        [--host_memory auto|reuse|system]

Both as the train step runs them: conv1 through ``shifted_conv.conv2d`` (what
``layers.Conv`` runs), everything compiled with the train step's XLA options
(``steps.CPU_COMPILER_OPTIONS`` on the CPU: YNNPACK for dots only) in a process whose host
memory is set up as ``main.py`` sets it up (``config.host_memory``). Prints the median of
several timed runs of each (after compiling and warming up).
"""

from __future__ import annotations

import argparse
import statistics
import time

from alexnet_jax import host_memory


def median_seconds(fn, *args, repeats: int) -> float:
    import jax

    jax.block_until_ready(fn(*args))  # warm up
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
    parser.add_argument("--host_memory", choices=host_memory.MODES, default="auto")
    args = parser.parse_args()
    reused = host_memory.configure(args.host_memory)  # before JAX starts its threads

    import jax
    import jax.numpy as jnp

    from alexnet_jax import steps
    from alexnet_jax.lrn import local_response_norm
    from alexnet_jax.shifted_conv import conv2d

    # The train step's XLA options on this platform, as benchmarks/conv_layers.py takes them.
    options = dict(steps.CPU_COMPILER_OPTIONS) if jax.default_backend() == "cpu" else {}

    def compiled(fn, *args):
        return jax.jit(fn).lower(*args).compile(options)

    dtype = jnp.dtype(args.dtype)
    keys = jax.random.split(jax.random.key(0), 4)
    images = jax.random.uniform(keys[0], (args.batch, 227, 227, 3), dtype)
    kernel = (jax.random.normal(keys[1], (11, 11, 3, 96)) * 0.01).astype(dtype)
    acts = jax.nn.relu(jax.random.normal(keys[2], (args.batch, 55, 55, 96)) * 30).astype(dtype)
    cotangent = jax.random.normal(keys[3], (args.batch, 55, 55, 96)).astype(dtype)

    def conv(x, w):
        return conv2d(x, w, (4, 4), ((0, 0), (0, 0)))

    def conv_and_kernel_gradient(x, w, g):
        # conv1 is the first layer: a train step needs its kernel gradient, not the image's.
        y, pullback = jax.vjp(lambda w: conv(x, w), w)
        return y, pullback(g)[0]

    def lrn_and_gradient(a, g):
        y, pullback = jax.vjp(local_response_norm, a)
        return y, pullback(g)[0]

    # Each forward+backward returns the output too: the next layer needs it in training.
    conv_fwd_bwd = compiled(conv_and_kernel_gradient, images, kernel, cotangent)
    lrn_fwd_bwd = compiled(lrn_and_gradient, acts, cotangent)
    conv_fwd = compiled(conv, images, kernel)
    lrn_fwd = compiled(local_response_norm, acts)

    rows = [
        ("conv1 forward", median_seconds(conv_fwd, images, kernel, repeats=args.repeats)),
        ("LRN forward", median_seconds(lrn_fwd, acts, repeats=args.repeats)),
        (
            "conv1 fwd+bwd",
            median_seconds(conv_fwd_bwd, images, kernel, cotangent, repeats=args.repeats),
        ),
        ("LRN fwd+bwd", median_seconds(lrn_fwd_bwd, acts, cotangent, repeats=args.repeats)),
    ]
    print(f"{jax.devices()[0].device_kind}, batch {args.batch}, {args.dtype}, 55x55x96; host "
          f"memory {'kept' if reused else 'system'}; the train step's compile options")  # fmt: skip
    for name, seconds in rows:
        print(f"{name:15s} {seconds * 1e3:9.2f} ms")
    print(f"LRN / conv1 forward+backward: {rows[3][1] / rows[2][1]:.3f}")


if __name__ == "__main__":
    main()
