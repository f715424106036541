"""Times each AlexNet convolution and dense layer alone, forward and backward, three ways.

    python benchmarks/conv_layers.py [--variant paper|torchvision] [--batch 32]
        [--precision auto|bf16|fp32] [--repeats 5] [--layers conv1,...,conv5,fc6,fc7,fc8]
        [--host_memory auto|reuse|system] [--json]

- ``ours``: ``alexnet_jax.shifted_conv.conv2d``, what ``layers.Conv`` runs (on the CPU:
  oneDNN's convolutions where they build, ``alexnet_jax/onednn.py``; without them, in bf16
  matrix products and otherwise XLA's convolution).
- ``xla``: ``lax.conv_general_dilated``, XLA's own convolution (in bf16 XLA:CPU computes it
  in fp32).
- ``torch``: ``torch.nn.functional.conv2d`` on ``channels_last`` tensors (with bf16 under
  ``torch.autocast``), PyTorch's fastest eager convolution on the CPU (oneDNN); skipped when
  PyTorch is not installed.

The dense layers (fc6-fc8, ``layers.Dense`` with its bias, float32 parameters as in
training) likewise: ``ours`` (on the CPU oneDNN's matmul, ``config.cpu_matmuls="auto"``),
``xla`` (``cpu_matmuls="xla"``: XLA's products), ``torch`` (``torch.nn.functional.linear``,
bf16 under ``torch.autocast``); and each one's evaluation forward, ``eval``, from
parameters prepared once as evaluation prepares them: ours and XLA's cast once to bf16
(``steps.inference_state``), ours also packed for oneDNN (``layers.pack_dense_kernels``),
PyTorch's weights cast once to bf16 in ``torch.inference_mode`` (its frozen inference goes
further and prepacks them, as ours are). fc6's backward includes its input gradient.

``--precision auto`` (the default) is bf16 where the device computes it natively (a GPU; a
CPU with bfloat16 arithmetic, by ``compare_pytorch.cpu_has_native_bf16``) and fp32
elsewhere, where PyTorch's bf16 is emulated or runs on reference kernels, ours is widened to
fp32 on oneDNN, and XLA:CPU's bf16 products run on emulated arithmetic.

Each layer at its place in the network (the input shape the previous layers give a 227² or
224² image), the compile options of the train step. conv1's backward is its kernel gradient
alone, as in training (the image needs no gradient); the others' are both gradients. A
backward is timed without its forward: XLA drops the primal output the gradients do not
read, and PyTorch's runner backpropagates one kept graph again (``retain_graph``). The
runners alternate within each repeat; each figure is the median, in milliseconds. With
``--json`` the last line is the table as JSON.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time

from alexnet_jax import host_memory


def layer_shapes(variant: str):
    """(name, input NHWC without N, kernel HWIO, stride, padding) of each conv layer."""
    from alexnet_jax.model import SPECS, spatial_sizes

    spec = SPECS[variant]
    size = 227 if variant == "paper" else 224
    sizes = spatial_sizes(variant, size)
    height, channels, layers = size, 3, []
    for index, conv in enumerate(spec.convs):
        name = f"conv{index + 1}"
        layers.append(
            (name, (height, height, channels), (conv.kernel, conv.kernel, channels, conv.features),
             conv.stride, conv.padding)
        )  # fmt: skip
        height, channels = sizes[name], conv.features
    return layers


def dense_shapes(variant: str):
    """(name, input features, output features) of each dense layer, 1,000 classes."""
    from alexnet_jax.model import SPECS, layer_widths

    conv_widths, fc_widths = layer_widths(variant)
    inputs = conv_widths[-1] * 6 * 6  # the last pool's (or the adaptive pool's) 6x6
    assert SPECS[variant].fc_features == fc_widths
    widths = [inputs, *fc_widths, 1000]
    return [(f"fc{index + 6}", widths[index], widths[index + 1]) for index in range(3)]


def resolve_precision(precision: str, native_bf16: bool) -> str:
    """``--precision``: ``auto`` is bf16 where bf16 is native, fp32 elsewhere."""
    if precision != "auto":
        return precision
    return "bf16" if native_bf16 else "fp32"


def timed(fns, repeats):
    """Median seconds of each callable, the callables alternating within each repeat."""
    for fn in fns.values():
        fn()  # compile and warm up
        fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}


def jax_runners(layer, batch, precision):
    import jax
    import jax.numpy as jnp
    import numpy as np

    from alexnet_jax import shifted_conv, steps

    name, image, kernel_shape, stride, pad = layer
    dtype = jnp.bfloat16 if precision == "bf16" else jnp.float32
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((batch, *image)), dtype)
    kernel = jnp.asarray(rng.standard_normal(kernel_shape) * 0.05, dtype)
    strides, padding = (stride, stride), ((pad, pad), (pad, pad))
    options = dict(steps.CPU_COMPILER_OPTIONS) if jax.default_backend() == "cpu" else {}
    runners = {}
    for label, conv in (("ours", shifted_conv.conv2d), ("xla", shifted_conv.lax_conv2d)):

        def forward(x, kernel, conv=conv):
            return conv(x, kernel, strides, padding)

        y = jax.jit(forward)(x, kernel)
        g = jnp.asarray(rng.standard_normal(y.shape), dtype)
        if name == "conv1":  # the kernel gradient alone, as in training

            def backward(x, kernel, g, forward=forward):
                return jax.vjp(lambda k: forward(x, k), kernel)[1](g)
        else:

            def backward(x, kernel, g, forward=forward):
                return jax.vjp(forward, x, kernel)[1](g)

        fwd = jax.jit(forward).lower(x, kernel).compile(options)
        bwd = jax.jit(backward).lower(x, kernel, g).compile(options)
        runners[f"{label} forward"] = lambda fwd=fwd: jax.block_until_ready(fwd(x, kernel))
        runners[f"{label} backward"] = lambda bwd=bwd, g=g: jax.block_until_ready(bwd(x, kernel, g))
    return runners


def jax_dense_runners(layer, batch, precision):
    import jax
    import jax.numpy as jnp
    import numpy as np

    from alexnet_jax import layers, steps

    _, inputs, features = layer
    dtype = jnp.bfloat16 if precision == "bf16" else jnp.float32
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((batch, inputs)), dtype)
    g = jnp.asarray(rng.standard_normal((batch, features)), dtype)
    options = dict(steps.CPU_COMPILER_OPTIONS) if jax.default_backend() == "cpu" else {}
    runners = {}
    for label, mode in (("ours", "auto"), ("xla", "xla")):
        dense = layers.Dense(features, dtype=dtype, cpu_matmuls=mode)
        params = dense.init(jax.random.PRNGKey(0), x)["params"]
        cast = jax.tree_util.tree_map(lambda p: p.astype(dtype), params)  # inference_state's
        prepared = layers.pack_dense_kernels(cast, mode)

        def forward(params, x, dense=dense):
            return dense.apply({"params": params}, x)

        def backward(params, x, g, forward=forward):
            return jax.vjp(forward, params, x)[1](g)

        fwd = jax.jit(forward).lower(params, x).compile(options)
        ev = jax.jit(forward).lower(prepared, x).compile(options)
        bwd = jax.jit(backward).lower(params, x, g).compile(options)
        runners[f"{label} forward"] = lambda fwd=fwd, p=params: jax.block_until_ready(fwd(p, x))
        runners[f"{label} eval"] = lambda ev=ev, p=prepared: jax.block_until_ready(ev(p, x))
        runners[f"{label} backward"] = lambda bwd=bwd, p=params: jax.block_until_ready(bwd(p, x, g))
    return runners


def torch_dense_runners(layer, batch, precision):
    try:
        import torch
    except ImportError:
        return {}
    _, inputs, features = layer
    bf16 = precision == "bf16"
    x = torch.randn(batch, inputs, requires_grad=True)
    weight = (torch.randn(features, inputs) * 0.01).requires_grad_(True)
    bias = torch.zeros(features, requires_grad=True)
    dtype = torch.bfloat16 if bf16 else torch.float32
    eval_x, eval_weight, eval_bias = (t.detach().to(dtype) for t in (x, weight, bias))

    def forward():
        with torch.no_grad(), torch.autocast("cpu", torch.bfloat16, enabled=bf16):
            return torch.nn.functional.linear(x, weight, bias)

    def evaluate():
        with torch.inference_mode():
            return torch.nn.functional.linear(eval_x, eval_weight, eval_bias)

    with torch.autocast("cpu", torch.bfloat16, enabled=bf16):
        y = torch.nn.functional.linear(x, weight, bias)
    g = torch.randn(y.shape, dtype=y.dtype)

    def backward():
        return torch.autograd.grad(y, (x, weight, bias), g, retain_graph=True)

    return {"torch forward": forward, "torch eval": evaluate, "torch backward": backward}


def torch_runners(layer, batch, precision):
    try:
        import torch
    except ImportError:
        return {}
    name, image, kernel_shape, stride, pad = layer
    height, width, channels = image
    kh, kw, _, features = kernel_shape
    x = torch.randn(batch, channels, height, width).to(memory_format=torch.channels_last)
    weight = (torch.randn(features, channels, kh, kw) * 0.05).to(memory_format=torch.channels_last)
    weight.requires_grad_(True)
    x.requires_grad_(name != "conv1")
    bf16 = precision == "bf16"

    def forward():
        with torch.no_grad(), torch.autocast("cpu", torch.bfloat16, enabled=bf16):
            return torch.nn.functional.conv2d(x, weight, stride=stride, padding=pad)

    # The forward's graph is kept and backpropagated again on each call, so the backward is
    # timed alone, as ours is (XLA drops the primal output nobody reads).
    with torch.autocast("cpu", torch.bfloat16, enabled=bf16):
        y = torch.nn.functional.conv2d(x, weight, stride=stride, padding=pad)
    g = torch.randn(y.shape, dtype=y.dtype).to(memory_format=torch.channels_last)
    inputs = (x, weight) if x.requires_grad else (weight,)

    def backward():
        return torch.autograd.grad(y, inputs, g, retain_graph=True)

    return {"torch forward": forward, "torch backward": backward}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--variant", choices=["paper", "torchvision"], default="paper")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--layers", default="conv1,conv2,conv3,conv4,conv5,fc6,fc7,fc8",
                        help="comma-separated layers to time")  # fmt: skip
    parser.add_argument("--host_memory", choices=host_memory.MODES, default="auto")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.batch < 1 or args.repeats < 1:
        parser.error("--batch and --repeats must be at least 1")
    reused = host_memory.configure(args.host_memory)  # before JAX and PyTorch start threads
    names = [name for name in args.layers.split(",") if name]
    known = [layer[0] for layer in layer_shapes(args.variant) + dense_shapes(args.variant)]
    if sorted(set(names) - set(known)) or not names:
        parser.error(f"--layers {args.layers!r}: choose from {','.join(known)}")

    import jax
    from compare_pytorch import cpu_has_native_bf16

    native = jax.default_backend() != "cpu" or cpu_has_native_bf16()
    asked = args.precision
    args.precision = resolve_precision(asked, native)
    if asked == "auto" and not native:
        print("--precision auto: fp32; this CPU has no native bf16 (--precision bf16 times it "
              "anyway)")  # fmt: skip
    try:
        import torch

        torch_version = torch.__version__
    except ImportError:
        torch_version = None
    print(f"{platform.processor() or platform.machine()}; jax {jax.__version__} on "
          f"{jax.devices()[0].device_kind}; torch {torch_version or 'not installed'}; "
          f"{args.variant}, {args.precision}, batch {args.batch}; host memory "
          f"{'kept' if reused else 'system'}; milliseconds, median of {args.repeats}")  # fmt: skip
    rows = []
    for layer in layer_shapes(args.variant) + dense_shapes(args.variant):
        if layer[0] not in names:
            continue
        dense = layer[0].startswith("fc")
        runners = (jax_dense_runners if dense else jax_runners)(layer, args.batch, args.precision)
        torch_runners_ = torch_dense_runners if dense else torch_runners
        runners.update(torch_runners_(layer, args.batch, args.precision))
        seconds = timed(runners, args.repeats)
        row = {"layer": layer[0], **{k: round(v * 1e3, 2) for k, v in seconds.items()}}
        rows.append(row)
        print(f"{layer[0]}: " + ", ".join(f"{k} {v:.1f}" for k, v in row.items() if k != "layer"))
        sys.stdout.flush()
    if args.json:
        summary = {"variant": args.variant, "precision": args.precision, "batch": args.batch}
        print(json.dumps({**summary, "torch": torch_version, "layers": rows}))


if __name__ == "__main__":
    main()
