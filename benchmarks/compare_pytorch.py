"""Our steps against PyTorch at its best, side by side, in one run on one machine.

    python benchmarks/compare_pytorch.py [--device cpu|gpu] [--variant paper,torchvision]
        [--precision auto|fp32,bf16] [--groups 1|2] [--batch 32] [--eval_crops 1|10]
        [--steps 5] [--repeats 5] [--host_memory auto|reuse|system] [--json] [--same_process]

JAX: the real pmap-ed steps of ``alexnet_jax.steps`` (what ``main.py`` runs), on one device
(PyTorch runs on one; on a CPU one XLA device uses every core, as PyTorch's threads do), on
uint8 images normalized inside the step; bf16 is ``config.half_precision`` (bfloat16
compute, float32 parameters and optimizer state). ``--groups 2`` splits conv2, conv4 and conv5
into the paper's two towers (``config.model.groups``; ``groups=2`` in PyTorch's ``Conv2d``).

PyTorch: the same network (LRN as ``nn.LocalResponseNorm(5, alpha=5e-4, beta=0.75, k=2)``,
the paper's alpha x size) behind the same normalization of uint8 images, fused SGD with
momentum 0.9 and weight decay 5e-4 (``torch_sgd``), cross-entropy, in every mode a PyTorch
user would turn on: ``eager``, ``channels_last``, ``compile`` (``torch.compile`` of the
normalization and the network, inductor, on the CPU too), ``compile+cl`` (both),
``compile+autotune`` (``mode="max-autotune"``: inductor times its own product templates,
and on a GPU its convolution templates, against the library kernels and keeps the fastest;
on a GPU it also replays each step as a CUDA graph); for evaluation also ``compile+freeze``
and ``compile+cl+freeze``: inductor's freezing (``torch._inductor.config.freezing`` while
the graph compiles), which PyTorch recommends for inference on a CPU, inlines the weights
as constants (oneDNN's convolutions fused with their ReLUs on prepacked weights, MKL's
packed products, constants folded).
Frozen weights can no longer be trained, so those two modes are timed for evaluation only,
as a trained network is served. bf16 is ``torch.autocast`` (bfloat16 compute, float32
parameters) in each of them. On a GPU every mode runs with cuDNN's autotuner and
TensorFloat-32 products (``torch_gpu_settings``: what JAX does there by default), and JAX
allocates GPU memory as it needs instead of taking most of it up front (``share_gpu_memory``).
The ratio is ours against the fastest PyTorch mode, for training and for evaluation (forward only,
center crop; with ``--eval_crops 10`` each image is 10 crops, as ``--mode=eval`` evaluates
them: ours the eval step's 10-crop path, PyTorch the network over the ``10 x batch`` crops
and each image's 10 softmaxes averaged, both counted in images, not crops, per second).

All runners are warmed up in ``--warmup`` untimed rounds that alternate them as the timed
repeats do (the first compiles), then each repeat times ``--steps`` steps of each in turn,
so that a slower phase of the machine hits all of them; the median repeat counts, and each
runner's minor page faults per step are reported beside it (near 0 in a steady state). The
machine's own ceiling is measured in the same run: a large matmul in float32 and bfloat16,
in JAX and in PyTorch (the faster counts), and each runner's achieved GFLOP/s (3x the
forward FLOPs for a train step, counted from the layer shapes) is given as a share of it.
``--host_memory`` is ``config.host_memory`` (``alexnet_jax/host_memory.py``), ``auto`` as in
``main.py``: on a CPU-only installation freed host memory is kept for reuse. It is a setting
of the process's C library, so PyTorch, in the same process, runs with it too.
Each variant and precision is compared in a process of its own (a fresh heap and fresh
threads for both frameworks; ``--same_process`` runs them all in this one): in one process, a
comparison that came after others measured our bf16 train steps with page faults at every
step and slower than the same comparison alone (``benchmarks/README.md``).

``--precision auto`` (the default) is fp32, and bf16 where the device computes it natively:
a GPU, or a CPU with bfloat16 arithmetic (AVX512-BF16, AMX, AVX-NE-CONVERT, AArch64's BF16:
``cpu_has_native_bf16``). Elsewhere PyTorch's bf16 is emulated (2.5-4x slower than its fp32
on an AVX-512 CPU without AVX512-BF16) or falls back to reference kernels (two orders of
magnitude slower), so a comparison there takes hours and compares with nothing a PyTorch
user would run (ours computes bf16 in fp32 there: ``alexnet_jax/onednn.py``);
``--precision fp32,bf16`` asks for it anyway.

``--json`` ends with one JSON line holding, per variant and precision, every figure and
``ratio`` (ours / PyTorch's best).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from alexnet_jax import host_memory, normalization, onednn, optim, steps
from alexnet_jax import model as model_lib
from alexnet_jax.defaults import default_config

IMAGE_SIZE = {"paper": 227, "torchvision": 224}
TORCH_MODES = ("eager", "channels_last", "compile", "compile+cl", "compile+autotune",
               "compile+freeze", "compile+cl+freeze")  # fmt: skip
EVAL_ONLY_MODES = ("compile+freeze", "compile+cl+freeze")  # frozen weights: inference only
PAUSE_S = 0.5  # before each timed repeat


def jax_config(variant: str, precision: str, batch: int, groups: int = 1):
    config = default_config()
    config.dataset = "synthetic"
    config.num_classes = 1000
    config.channels = 3
    config.image_size = IMAGE_SIZE[variant]
    config.batch_size = config.eval_batch_size = batch
    config.half_precision = precision == "bf16"
    config.model.variant = variant
    config.model.groups = groups
    config.model.initializer = None  # the variant's own
    config.input.normalization = "mean_std"
    config.lr_schedule = "constant"
    return config


def forward_flops(variant: str, size: int, num_classes: int = 1000, groups: int = 1) -> float:
    """Multiply-adds x 2 of one image's forward pass through the convs and dense layers (a
    grouped conv's filters each see ``1 / groups`` of the channels)."""
    spec = model_lib.SPECS[variant]
    flops, channels = 0.0, 3
    for conv in spec.convs:
        out = (size + 2 * conv.padding - conv.kernel) // conv.stride + 1
        seen = channels // groups if conv.grouped else channels
        flops += 2.0 * out * out * conv.features * conv.kernel**2 * seen
        size = (out - 3) // 2 + 1 if conv.pool else out
        channels = conv.features
    features = (spec.adaptive_pool or size) ** 2 * channels
    for width in spec.fc_features + (num_classes,):
        flops += 2.0 * features * width
        features = width
    return flops


def time_repeats(run: Callable[[int], None], steps_: int) -> float:
    """Seconds for ``steps_`` calls of ``run`` (which blocks at its end)."""
    start = time.perf_counter()
    run(steps_)
    return time.perf_counter() - start


# --- the machine's ceiling -------------------------------------------------------------------


def best_seconds(run: Callable[[int], None], repeats: int, budget_s: float = 10.0) -> float:
    """The fastest of up to ``repeats`` timed calls of ``run``, fewer once they have taken
    ``budget_s`` (a matmul on a reference kernel can take a minute)."""
    times: list[float] = []
    while len(times) < repeats and sum(times) < budget_s:
        times.append(time_repeats(run, 1))
    return min(times)


# CPU flags of bfloat16 arithmetic that oneDNN (PyTorch's and ours) computes with: x86's
# AVX512-BF16 (AMX CPUs have it too) and AVX-NE-CONVERT (oneDNN's AVX2-VNNI-2), AArch64's BF16.
BF16_FLAGS = ("avx512_bf16", "amx_bf16", "avx_ne_convert", "bf16")


def cpu_has_native_bf16(cpuinfo: str | None = None) -> bool:
    """Whether this CPU has bfloat16 arithmetic (``BF16_FLAGS``); True where ``/proc/cpuinfo``
    cannot tell. PyTorch's own test (``torch.ops.mkldnn._is_mkldnn_bf16_supported``) accepts
    any AVX-512 BW/VL/DQ CPU, but there oneDNN emulates bfloat16: on an Ice Lake Xeon
    PyTorch's bf16 matmul and conv2 ran at 46 GFLOP/s against 173-175 in fp32, so a bf16
    comparison there measures nothing a PyTorch user would run. Read from the flags, so
    that nothing starts threads before ``host_memory.configure``."""
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo") as f:
                cpuinfo = f.read()
        except OSError:
            return True
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return bool(set(value.split()) & set(BF16_FLAGS))
    return True


def matmul_peak(
    platform_name: str, size: int, precisions=("fp32", "bf16"), repeats: int = 5
) -> dict[str, float]:
    """GFLOP/s of a size^3 matmul in each of ``precisions``, in JAX (with XLA's defaults, and
    with the options the steps compile with) and in PyTorch; "fp32" and "bf16" the best.
    JAX's bf16 product accumulates into float32, as the steps' products do
    (``layers.mixed_dot_general``, ``shifted_conv``): XLA:CPU computes a bf16 x bf16 -> bf16
    product in float32, at float32 speed."""
    import torch

    peaks: dict[str, float] = {}
    device = jax.devices(platform_name)[0]
    flops = 2 * size**3
    variants = {"jax": {}}
    if platform_name == "cpu":
        variants["jax_steps_options"] = dict(steps.CPU_COMPILER_OPTIONS)
    product = functools.partial(jnp.dot, preferred_element_type=jnp.float32)
    for name in precisions:
        x = jax.device_put(jnp.ones((size, size), jnp.float32 if name == "fp32" else jnp.bfloat16),
                           device)  # fmt: skip
        for label, options in variants.items():
            f = jax.jit(product, compiler_options=options or None)
            jax.block_until_ready(f(x, x))
            seconds = best_seconds(lambda n, f=f, x=x: jax.block_until_ready(f(x, x)), repeats)
            peaks[f"{label}_{name}"] = flops / seconds / 1e9
        torch_device = "cuda" if platform_name == "gpu" else "cpu"
        t = torch.ones((size, size), device=torch_device,
                       dtype=torch.float32 if name == "fp32" else torch.bfloat16)  # fmt: skip

        def torch_matmul(n: int, t=t) -> None:
            (t @ t).sum().item()

        torch_matmul(1)
        peaks[f"torch_{name}"] = flops / best_seconds(torch_matmul, repeats) / 1e9
        peaks[name] = max(v for k, v in peaks.items() if k.endswith(f"_{name}"))
    return peaks


# --- JAX -------------------------------------------------------------------------------------


def jax_runner(
    variant: str, precision: str, batch: int, platform_name: str, groups: int = 1,
    eval_crops: int = 1,
):  # fmt: skip
    """Our pmap-ed train and eval steps, each a function of a step count that returns the
    last step's output; evaluation on ``(batch, eval_crops, H, W, 3)`` images with crops."""
    devices = jax.devices(platform_name)[:1]
    config = jax_config(variant, precision, batch, groups)
    size = config.image_size
    model = steps.create_model(config, config.num_classes)
    with jax.default_device(devices[0]):
        state = steps.create_train_state(jax.random.PRNGKey(0), config, model, (size, size, 3))
    normalize = normalization.make_normalizer(config.input)
    lr_fn = optim.create_learning_rate_fn(config, 100)
    p_train = steps.make_train_step(config, lr_fn, normalize, devices=devices)
    p_eval = steps.make_eval_step(config, normalize, devices=devices)
    mesh = jax.sharding.Mesh(np.asarray(devices), ("batch",))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("batch"))
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (1, batch, size, size, 3), dtype=np.uint8)
    labels = rng.integers(0, 1000, (1, batch), dtype=np.int32)
    train_batch = jax.device_put({"image": images, "label": labels}, sharding)
    if eval_crops > 1:  # the 10-crop layout the input pipeline hands the eval step
        images = rng.integers(0, 256, (1, batch, eval_crops, size, size, 3), dtype=np.uint8)
    eval_batch = jax.device_put(
        {"image": images, "label": labels, "mask": np.ones((1, batch), np.float32)}, sharding
    )
    # The evaluation reads the state as main.py's does: its parameters cast once per trained
    # state (``steps.inference_state``; main.py casts once per evaluation pass).
    holder = {"state": state, "inference": None}

    def train_steps(n: int):
        metrics = None
        for _ in range(n):
            holder["state"], metrics = p_train(holder["state"], train_batch)
        holder["inference"] = None
        return jax.block_until_ready((holder["state"].params, metrics))[1]

    def eval_steps(n: int):
        if holder["inference"] is None:
            holder["inference"] = steps.inference_state(holder["state"], config)
        out = None
        for _ in range(n):
            out = p_eval(holder["inference"], eval_batch)
        return jax.block_until_ready(out)

    return train_steps, eval_steps


# --- PyTorch ---------------------------------------------------------------------------------


def torch_alexnet(variant: str, num_classes: int = 1000, groups: int = 1):
    """The variant built from torch.nn, layer for layer as ``alexnet_jax.model.SPECS``."""
    from torch import nn

    spec = model_lib.SPECS[variant]
    layers, channels = [], 3
    for conv in spec.convs:
        conv_groups = groups if conv.grouped else 1
        layers += [
            nn.Conv2d(
                channels, conv.features, conv.kernel, conv.stride, conv.padding, groups=conv_groups
            ),
            nn.ReLU(inplace=True),
        ]
        if conv.lrn and spec.use_lrn:
            layers.append(nn.LocalResponseNorm(5, alpha=5e-4, beta=0.75, k=2.0))
        if conv.pool:
            layers.append(nn.MaxPool2d(3, 2))
        channels = conv.features
    if spec.adaptive_pool:
        layers.append(nn.AdaptiveAvgPool2d(spec.adaptive_pool))
    layers.append(nn.Flatten())
    features = (spec.adaptive_pool or 6) ** 2 * channels
    for width in spec.fc_features:
        if spec.dropout_before_fc:
            layers += [nn.Dropout(0.5), nn.Linear(features, width), nn.ReLU(inplace=True)]
        else:
            layers += [nn.Linear(features, width), nn.ReLU(inplace=True), nn.Dropout(0.5)]
        features = width
    layers.append(nn.Linear(features, num_classes))
    return nn.Sequential(*layers)


def torch_sgd(params):
    """SGD with momentum 0.9 and weight decay 5e-4, as a PyTorch user at their best runs it:
    the fused implementation (``fused=True``: the whole update of each parameter in one
    kernel, on the CPU and on CUDA since PyTorch 2.4), far faster than the default's
    separate passes for AlexNet's 61 M parameters (``benchmarks/README.md``)."""
    import torch

    return torch.optim.SGD(params, lr=0.01, momentum=0.9, weight_decay=5e-4, fused=True)


def normalized(net, memory_format):
    """``net`` behind our steps' input normalization (uint8 images, ImageNet's mean and
    standard deviation) in ``memory_format``, as one module: ``torch.compile`` compiles the
    normalization with the network, as XLA compiles ours into the step."""
    import torch

    class Normalized(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = net
            pixels = default_config().input  # mean_std, in 0-255 units, as jax_config's
            self.register_buffer("mean", torch.tensor(pixels.mean_rgb).view(1, 3, 1, 1))
            self.register_buffer("std", torch.tensor(pixels.std_rgb).view(1, 3, 1, 1))

        def forward(self, x):
            x = (x.float() - self.mean) / self.std
            return self.net(x.contiguous(memory_format=memory_format))

    return Normalized()


def torch_gpu_settings() -> dict[str, bool]:
    """PyTorch at its best on an NVIDIA GPU, for every mode: cuDNN's autotuner picks each
    convolution's algorithm for the fixed shapes (``cudnn.benchmark``; XLA autotunes its own
    by default), and float32 products and convolutions run as TensorFloat-32 where the GPU has
    it, as JAX's default precision runs them there. Returns the settings, for the report."""
    import torch

    torch.backends.cudnn.benchmark = True
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    return {
        "cudnn.benchmark": torch.backends.cudnn.benchmark,
        "cuda.matmul.allow_tf32": torch.backends.cuda.matmul.allow_tf32,
        "cudnn.allow_tf32": torch.backends.cudnn.allow_tf32,
    }


def share_gpu_memory(environ=os.environ) -> dict[str, str]:
    """On a GPU both frameworks share one device: JAX allocates as it needs
    (``XLA_PYTHON_CLIENT_PREALLOCATE=false``) instead of taking 75 % of the GPU's memory when
    it starts, which would leave PyTorch a quarter of it (and cuDNN's autotuner and inductor's
    max-autotune skip what does not fit). Each still keeps what it allocated for reuse (JAX's
    BFC allocator, PyTorch's caching allocator). A value the caller set is kept. It must be
    set before JAX starts its backends (``main`` sets it before any JAX call; the processes it
    starts inherit it); returns the setting, for the report."""
    environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    return {"XLA_PYTHON_CLIENT_PREALLOCATE": environ["XLA_PYTHON_CLIENT_PREALLOCATE"]}


@contextlib.contextmanager
def torch_inference(device_type: str, autocast: bool, frozen: bool):
    """What PyTorch's evaluation runs under: inference mode (``torch.inference_mode``: no
    autograd and, unlike ``torch.no_grad``, no view or version-counter tracking either, as
    PyTorch recommends for inference), bf16 autocast where asked, and for the frozen modes
    inductor's freezing. Freezing is read from inductor's global config when a graph
    compiles, at its first call (``torch.compile``'s ``options={"freezing": True}`` leaves
    the weights unfrozen), so it is set around the call."""
    import torch
    from torch._inductor import config

    freezing = config.patch(freezing=True) if frozen else contextlib.nullcontext()
    with (
        torch.inference_mode(),
        torch.autocast(device_type, dtype=torch.bfloat16, enabled=autocast),
        freezing,
    ):
        yield


def crop_average(probabilities, crops: int):
    """Each image's class probabilities: the mean of its ``crops`` consecutive rows of
    ``probabilities`` (its crops' softmaxes), as our eval step averages them."""
    if crops == 1:
        return probabilities
    return probabilities.view(-1, crops, probabilities.shape[-1]).mean(1)


def torch_runner(
    variant: str, precision: str, batch: int, mode: str, gpu: bool, groups: int = 1,
    eval_crops: int = 1,
):  # fmt: skip
    """PyTorch's train and eval steps in ``mode`` (see ``TORCH_MODES``), each a function of
    a step count that returns the last step's loss or probabilities; the train steps are None
    in a mode of ``EVAL_ONLY_MODES``. Evaluation runs over ``batch x eval_crops`` rows."""
    import torch

    torch.manual_seed(0)
    device = torch.device("cuda" if gpu else "cpu")
    size = IMAGE_SIZE[variant]
    net = torch_alexnet(variant, groups=groups).to(device)
    channels_last = mode == "channels_last" or "+cl" in mode
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    net = net.to(memory_format=memory_format)
    optimizer = torch_sgd(net.parameters())
    loss_fn = torch.nn.CrossEntropyLoss()
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8,
                           generator=generator).to(device)  # fmt: skip
    labels = torch.randint(0, 1000, (batch,), generator=generator).to(device)
    eval_images = images
    if eval_crops > 1:  # each image's crops in consecutive rows
        eval_images = torch.randint(0, 256, (batch * eval_crops, 3, size, size), dtype=torch.uint8,
                              generator=generator).to(device)  # fmt: skip
    autocast = precision == "bf16"
    frozen = mode in EVAL_ONLY_MODES
    model = normalized(net, memory_format).to(device)
    autotune = mode == "compile+autotune"
    compiled = model
    if mode.startswith("compile"):
        compiled = torch.compile(model, mode="max-autotune" if autotune else None)

    def call(x):
        if autotune:  # a new step: its CUDA graphs may overwrite the previous step's outputs
            torch.compiler.cudagraph_mark_step_begin()
        return compiled(x)

    def step(x, y):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            loss = loss_fn(call(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss

    def forward(x):
        with torch_inference(device.type, autocast, frozen):
            return crop_average(call(x).float().softmax(-1), eval_crops)

    def sync():
        if gpu:
            torch.cuda.synchronize()

    def train_steps(n: int):
        net.train()
        for _ in range(n):
            loss = step(images, labels)
        loss.item()
        sync()
        # Free the gradients now, not at the next turn's first step: between turns no runner
        # holds memory the others' steps would take from the shared heap.
        optimizer.zero_grad(set_to_none=True)
        return loss

    def eval_steps(n: int):
        net.eval()
        for _ in range(n):
            out = forward(eval_images)
        out.sum().item()
        sync()
        return out

    return (None if frozen else train_steps), eval_steps


# --- the comparison --------------------------------------------------------------------------


def minor_faults() -> int:
    """This process's minor page faults so far (memory the kernel maps in on first touch)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def measure(runners: dict, steps_: int, repeats: int, warmup: int, batch: int, which: int):
    """Median images/s of each runner's train (which=0) or eval (which=1) steps, and the
    median of each one's minor page faults per step.

    Warm-up alternates the runners as the timed repeats do (the first round compiles): the
    runners share one process and its heap, and until the heap has grown to hold every
    runner's buffers side by side, a step maps fresh pages in (tens of thousands of page
    faults a step) that no later step pays. Runners without that phase (None) are left out."""
    runners = {name: runner for name, runner in runners.items() if runner[which] is not None}
    for _ in range(warmup):
        for runner in runners.values():
            runner[which](steps_)
    times: dict[str, list[float]] = {name: [] for name in runners}
    faults: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(repeats):
        for name, runner in runners.items():  # alternate: machine noise hits all of them
            time.sleep(PAUSE_S)  # the previous runner's threads (OpenMP spins) are idle
            before = minor_faults()
            times[name].append(time_repeats(runner[which], steps_))
            faults[name].append((minor_faults() - before) / steps_)
    rates = {name: steps_ * batch / statistics.median(t) for name, t in times.items()}
    return rates, {name: statistics.median(f) for name, f in faults.items()}


def fresh_torch_compiler() -> None:
    """Forgets earlier torch.compile graphs and allows enough of them: each compiled mode
    compiles for training and evaluation (grad mode, autocast), and past the default limit
    of 8 TorchDynamo silently runs the network eagerly."""
    import torch

    torch._dynamo.reset()
    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    setattr(config, name, max(64, getattr(config, name)))


def compare(variant, precision, args, platform_name, gpu, peak) -> dict:
    fresh_torch_compiler()  # the previous variant's graphs are not run again
    crops = args.eval_crops
    runners = {"jax": jax_runner(variant, precision, args.batch, platform_name, args.groups, crops)}
    for mode in args.torch_modes:
        runners[f"torch_{mode}"] = torch_runner(
            variant, precision, args.batch, mode, gpu, args.groups, crops
        )
    train, train_faults = measure(runners, args.steps, args.repeats, args.warmup, args.batch, 0)
    evaluation, eval_faults = measure(runners, args.steps, args.repeats, args.warmup, args.batch, 1)
    best_train = max((n for n in train if n != "jax"), key=train.get)
    best_eval = max((n for n in evaluation if n != "jax"), key=evaluation.get)
    fwd = forward_flops(variant, IMAGE_SIZE[variant], groups=args.groups)
    result = {
        "variant": variant,
        "precision": precision,
        "groups": args.groups,
        "eval_crops": crops,
        "train_img_s": {n: round(v, 2) for n, v in train.items()},
        "eval_img_s": {n: round(v, 2) for n, v in evaluation.items()},
        "best_torch_train": best_train,
        "best_torch_eval": best_eval,
        "ratio": round(train["jax"] / train[best_train], 3),
        "eval_ratio": round(evaluation["jax"] / evaluation[best_eval], 3),
        "train_gflops": {n: round(v * 3 * fwd / 1e9, 1) for n, v in train.items()},
        "eval_gflops": {n: round(v * crops * fwd / 1e9, 1) for n, v in evaluation.items()},
        "train_faults_per_step": {n: round(v) for n, v in train_faults.items()},
        "eval_faults_per_step": {n: round(v) for n, v in eval_faults.items()},
    }
    result["train_peak_share"] = {
        n: round(g / peak[precision], 3) for n, g in result["train_gflops"].items()
    }
    return result


def print_result(result: dict) -> None:
    towers = f", groups {result['groups']}" if result["groups"] > 1 else ""
    print(f"\n{result['variant']}{towers}, {result['precision']}: images/s (GFLOP/s, share of "
          f"the {result['precision']} peak)")  # fmt: skip
    width = max(map(len, result["eval_img_s"])) + 2
    crops = result["eval_crops"]
    title = "eval" if crops == 1 else f"eval, {crops} crops"
    column = max(10, len(title) + 2)
    print(f"  {'':{width}}{'train':>24}{title:>{column}}{'page faults/step':>20}")
    for name, evaluation in result["eval_img_s"].items():
        if name in result["train_img_s"]:
            rate, share = result["train_img_s"][name], result["train_peak_share"][name]
            train = f"{rate:7.1f} ({result['train_gflops'][name]:6.1f}, {share:5.1%})"
            faults = f"{result['train_faults_per_step'][name]}, "
        else:  # an evaluation-only mode
            train, faults = f"{'-':>7}{'':17}", "-, "
        faults += str(result["eval_faults_per_step"][name])
        print(f"  {name:{width}}{train}{evaluation:{column}.1f}{faults:>20}")
    print(f"  ours / PyTorch's best: train {result['ratio']:.3f} (against "
          f"{result['best_torch_train']}), eval {result['eval_ratio']:.3f} (against "
          f"{result['best_torch_eval']})")  # fmt: skip


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=["cpu", "gpu"], default="cpu")
    parser.add_argument("--variant", default="paper,torchvision", help="comma-separated")
    parser.add_argument("--precision", default="auto",
                        help="comma-separated; auto: fp32, and bf16 where native")  # fmt: skip
    parser.add_argument("--groups", type=int, default=1,
                        help="towers of conv2, conv4, conv5 (2: the paper's)")  # fmt: skip
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--eval_crops", type=int, choices=[1, 10], default=1,
                        help="crops per evaluated image (10: --mode=eval's 10 crops)")  # fmt: skip
    parser.add_argument("--steps", type=int, default=5, help="steps per timed repeat")
    parser.add_argument("--repeats", type=int, default=5)
    rounds = "untimed rounds of --steps steps, alternating (the first compiles)"
    parser.add_argument("--warmup", type=int, default=3, help=rounds)
    parser.add_argument("--torch_modes", default=",".join(TORCH_MODES), help="comma-separated")
    parser.add_argument("--peak_size", type=int, default=0, help="matmul side (0: by device)")
    parser.add_argument("--host_memory", choices=host_memory.MODES, default="auto",
                        help="config.host_memory, for both frameworks")  # fmt: skip
    parser.add_argument("--json", action="store_true", help="end with one JSON line")
    parser.add_argument("--same_process", action="store_true",
                        help="every comparison in this process, not one process each")  # fmt: skip
    args = parser.parse_args(argv)
    variants = args.variant.split(",")
    if args.precision == "auto":
        native = args.device == "gpu" or cpu_has_native_bf16()
        precisions = ["fp32", "bf16"] if native else ["fp32"]
        if not native:
            print("--precision auto: fp32 only; this CPU has no native bf16 (none of the flags "
                  f"{', '.join(BF16_FLAGS)}), where PyTorch's bf16 is emulated or runs on "
                  "reference kernels; --precision fp32,bf16 compares it anyway",
                  flush=True)  # fmt: skip
    else:
        precisions = args.precision.split(",")
    args.torch_modes = [m for m in args.torch_modes.split(",") if m]
    for value, allowed, flag in ((variants, IMAGE_SIZE, "--variant"),
                                 (precisions, ("fp32", "bf16"), "--precision"),
                                 (args.torch_modes, TORCH_MODES, "--torch_modes")):  # fmt: skip
        bad = [v for v in value if v not in allowed]
        if bad:
            parser.error(f"{flag}: {bad} not among {list(allowed)}")
    if not set(args.torch_modes) - set(EVAL_ONLY_MODES):
        parser.error(f"--torch_modes: {args.torch_modes} has no mode that trains (the frozen "
                     f"ones, {list(EVAL_ONLY_MODES)}, only evaluate); add one of "
                     f"{[m for m in TORCH_MODES if m not in EVAL_ONLY_MODES]}")  # fmt: skip
    for variant in variants:
        spec = model_lib.SPECS[variant]
        channels = [3] + [conv.features for conv in spec.convs]
        grouped = [n for conv, c in zip(spec.convs, channels, strict=False) if conv.grouped
                   for n in (c, conv.features)]  # fmt: skip
        if args.groups < 1 or any(n % args.groups for n in grouped):
            parser.error(f"--groups {args.groups}: must be >= 1 and divide the {variant} "
                         f"variant's grouped channels {sorted(set(grouped))}")  # fmt: skip

    jax_settings = share_gpu_memory() if args.device == "gpu" else {}
    if len(variants) * len(precisions) > 1 and not args.same_process:
        return compare_in_own_processes(args, variants, precisions)
    reused = host_memory.configure(args.host_memory)  # before JAX and PyTorch start threads
    import torch

    gpu = args.device == "gpu"
    if gpu and not torch.cuda.is_available():
        raise SystemExit("--device gpu: PyTorch sees no CUDA device (the GPU modes are skipped)")
    torch_settings = {"optimizer": "SGD(fused=True)", **(torch_gpu_settings() if gpu else {})}
    platform_name = "gpu" if gpu else "cpu"
    try:
        jax_device = jax.devices(platform_name)[0]
    except RuntimeError as error:
        raise SystemExit(f"--device {args.device}: JAX has no such device ({error})") from error
    torch_device = (
        torch.cuda.get_device_name() if gpu else f"CPU, {torch.get_num_threads()} threads"
    )
    if not gpu:  # config.cpu_convolutions and cpu_matmuls "auto", as main.py runs: oneDNN's
        # convolutions and dense products where the handlers build
        kernels = "onednn" if onednn.available("auto") else "xla"
        jax_settings.update(cpu_convolutions=kernels, cpu_matmuls=kernels)
    memory = "kept for reuse" if reused else "glibc's defaults"
    crops = "" if args.eval_crops == 1 else f" (evaluation: {args.eval_crops} crops an image)"
    print(f"JAX {jax.__version__} on {jax_device.device_kind}; PyTorch {torch.__version__} on "
          f"{torch_device}; batch {args.batch}{crops}; host memory {memory} (--host_memory "
          f"{args.host_memory})")  # fmt: skip
    if not gpu:
        print(f"our CPU convolutions and dense products: {jax_settings['cpu_convolutions']} "
              "(config.cpu_convolutions=auto, config.cpu_matmuls=auto)")  # fmt: skip
    peak = matmul_peak(platform_name, args.peak_size or (8192 if gpu else 2048), precisions)
    print("matmul peak, GFLOP/s: " + ", ".join(f"{k} {v:.3g}" for k, v in peak.items()))
    results = []
    for variant in variants:
        for precision in precisions:
            result = compare(variant, precision, args, platform_name, gpu, peak)
            print_result(result)
            results.append(result)
    summary = {
        "processes": "one",
        "device": args.device,
        "jax_device": jax_device.device_kind,
        "torch_device": torch_device,
        "batch": args.batch,
        "eval_crops": args.eval_crops,
        "host_memory": {"mode": args.host_memory, "reused": reused},
        "torch_settings": torch_settings,
        "jax_settings": jax_settings,
        "peak_gflops": {k: round(v, 1) for k, v in peak.items()},
        "results": results,
        "ratio": min(r["ratio"] for r in results),  # the worst case over what was measured
        "versions": {
            "python": platform.python_version(),
            "jax": jax.__version__,
            "torch": torch.__version__,
        },  # fmt: skip
    }
    if args.json:
        print(json.dumps(summary))
    return summary


def child_command(args: argparse.Namespace, variant: str, precision: str) -> list[str]:
    """The command line that compares ``variant`` in ``precision`` alone, with ``args``'s
    settings, ending with its JSON line."""
    return [
        sys.executable, os.path.abspath(__file__), "--device", args.device,
        "--variant", variant, "--precision", precision, "--groups", str(args.groups),
        "--batch", str(args.batch), "--eval_crops", str(args.eval_crops),
        "--steps", str(args.steps), "--repeats", str(args.repeats), "--warmup", str(args.warmup),
        "--torch_modes", ",".join(args.torch_modes),
        "--peak_size", str(args.peak_size), "--host_memory", args.host_memory, "--json",
    ]  # fmt: skip


def run_child(command: list[str]) -> dict:
    """Runs one comparison's process, passes its report through and returns its summary."""
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines or not lines[-1].startswith("{"):
        raise SystemExit(
            f"{' '.join(command[2:])} failed (exit {done.returncode}):\n{done.stderr[-3000:]}"
        )
    print("\n".join(lines[:-1]), flush=True)
    return json.loads(lines[-1])


def compare_in_own_processes(args, variants, precisions) -> dict:
    """Each variant and precision compared by a process of its own (``child_command``); the
    summary gathers their results, the matmul peak as the best any of them measured (each
    measures its own precision's; each result's shares are of its own process's peak,
    ``peak_gflops`` in the result)."""
    children = []
    for variant in variants:
        for precision in precisions:
            children.append(run_child(child_command(args, variant, precision)))
    summary = dict(children[0])
    summary["processes"] = "one per comparison"
    summary["results"] = []
    for child in children:
        for result in child["results"]:
            summary["results"].append({**result, "peak_gflops": child["peak_gflops"]})
    keys = dict.fromkeys(key for child in children for key in child["peak_gflops"])
    summary["peak_gflops"] = {
        key: max(child["peak_gflops"][key] for child in children if key in child["peak_gflops"])
        for key in keys
    }
    summary["ratio"] = min(r["ratio"] for r in summary["results"])
    if args.json:
        print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
