"""Our train step against PyTorch's, side by side, in one run on one machine.

    python benchmarks/compare_pytorch.py [--device cpu|gpu] [--variant paper|torchvision]
        [--batch 32] [--precision fp32|bf16] [--steps 10] [--repeats 5] [--json]

JAX: the real pmap-ed steps of ``alexnet_jax.steps`` (``make_train_step``,
``make_eval_step``: what ``main.py`` runs), on one device of the platform (PyTorch runs on
one), on uint8 images already on the device (normalized inside the step, as in training).
PyTorch: the same architecture (LRN as ``nn.LocalResponseNorm(5, alpha=5e-4, beta=0.75,
k=2)``, the paper's alpha x size), the same batch, SGD with momentum 0.9 and weight decay
5e-4, cross-entropy; on a GPU at its best: channels_last, AMP bfloat16 autocast and
``torch.compile``. Both are warmed up, then each repeat times ``--steps`` steps; the median
repeat is reported, alternating the frameworks so that a slower machine phase hits both.
Evaluation (forward only, center crop) is timed the same way.

On a GPU it also prints the achieved TFLOP/s (3x the forward FLOPs for a train step,
counted from the layer shapes) and the share of the device's dense bfloat16 peak.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import jax
import numpy as np

from alexnet_jax import model as model_lib
from alexnet_jax import normalization, optim, steps
from alexnet_jax.defaults import default_config

IMAGE_SIZE = {"paper": 227, "torchvision": 224}
# Dense bfloat16 peaks (no sparsity), TFLOP/s, by a substring of the device name.
BF16_PEAK_TFLOPS = {"H200": 989.0, "H100 PCIe": 756.0, "H100": 989.0, "A100": 312.0}


def jax_config(args):
    config = default_config()
    config.dataset = "synthetic"
    config.num_classes = 1000
    config.channels = 3
    config.image_size = IMAGE_SIZE[args.variant]
    config.batch_size = config.eval_batch_size = args.batch
    config.half_precision = args.precision == "bf16"
    config.model.variant = args.variant
    config.model.initializer = None  # the variant's own
    config.input.normalization = "mean_std"
    config.lr_schedule = "constant"
    return config


def forward_flops(variant: str, size: int, num_classes: int = 1000) -> float:
    """Multiply-adds x 2 of one image's forward pass through the convs and dense layers."""
    spec = model_lib.SPECS[variant]
    flops, channels = 0.0, 3
    for conv in spec.convs:
        out = (size + 2 * conv.padding - conv.kernel) // conv.stride + 1
        flops += 2.0 * out * out * conv.features * conv.kernel**2 * channels
        size = (out - 3) // 2 + 1 if conv.pool else out
        channels = conv.features
    features = (spec.adaptive_pool or size) ** 2 * channels
    for width in spec.fc_features + (num_classes,):
        flops += 2.0 * features * width
        features = width
    return flops


def time_repeats(run, steps: int) -> float:
    """Seconds for ``steps`` calls of ``run`` (which blocks at its end)."""
    start = time.perf_counter()
    run(steps)
    return time.perf_counter() - start


# --- JAX -------------------------------------------------------------------------------------


def jax_runner(args, platform_name: str):
    # One device, as PyTorch gets: the pmap-ed step over 1 GPU against PyTorch on 1 GPU (on a
    # CPU, one XLA device uses every core, as PyTorch's threads do).
    devices = jax.devices(platform_name)[:1]
    config = jax_config(args)
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
    per = args.batch // len(devices)
    images = rng.integers(0, 256, (len(devices), per, size, size, 3), dtype=np.uint8)
    labels = rng.integers(0, 1000, (len(devices), per), dtype=np.int32)
    batch = jax.device_put({"image": images, "label": labels}, sharding)
    eval_batch = jax.device_put(
        {"image": images, "label": labels, "mask": np.ones((len(devices), per), np.float32)},
        sharding,
    )
    holder = {"state": state}

    def train_steps(n: int) -> None:
        metrics = None
        for _ in range(n):
            holder["state"], metrics = p_train(holder["state"], batch)
        jax.block_until_ready((holder["state"].params, metrics))

    def eval_steps(n: int) -> None:
        out = None
        for _ in range(n):
            out = p_eval(holder["state"], eval_batch)
        jax.block_until_ready(out)

    return train_steps, eval_steps, f"{len(devices)} x {devices[0].device_kind}"


# --- PyTorch ---------------------------------------------------------------------------------


def torch_alexnet(variant: str, num_classes: int = 1000):
    """The variant built from torch.nn, layer for layer as ``alexnet_jax.model.SPECS``."""
    from torch import nn

    spec = model_lib.SPECS[variant]
    layers, channels = [], 3
    for conv in spec.convs:
        layers += [
            nn.Conv2d(channels, conv.features, conv.kernel, conv.stride, conv.padding),
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


def torch_runner(args, gpu: bool):
    import torch

    torch.manual_seed(0)
    device = torch.device("cuda" if gpu else "cpu")
    size = IMAGE_SIZE[args.variant]
    net = torch_alexnet(args.variant).to(device)
    memory_format = torch.channels_last if gpu else torch.contiguous_format
    net = net.to(memory_format=memory_format)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    loss_fn = torch.nn.CrossEntropyLoss()
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (args.batch, 3, size, size), dtype=torch.uint8,
                           generator=generator).to(device)  # fmt: skip
    labels = torch.randint(0, 1000, (args.batch,), generator=generator).to(device)
    mean = torch.tensor([0.485, 0.456, 0.406], device=device).view(1, 3, 1, 1) * 255
    std = torch.tensor([0.229, 0.224, 0.225], device=device).view(1, 3, 1, 1) * 255
    autocast = args.precision == "bf16"

    def normalize(x):
        return ((x.float() - mean) / std).contiguous(memory_format=memory_format)

    def step(x, y):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            loss = loss_fn(net(normalize(x)), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss

    def forward(x):
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            return net(normalize(x)).float().softmax(-1)

    if gpu:
        step = torch.compile(step)
        forward = torch.compile(forward)

    def sync():
        if gpu:
            torch.cuda.synchronize()

    def train_steps(n: int) -> None:
        net.train()
        for _ in range(n):
            loss = step(images, labels)
        loss.item()
        sync()

    def eval_steps(n: int) -> None:
        net.eval()
        for _ in range(n):
            out = forward(images)
        out.sum().item()
        sync()

    name = torch.cuda.get_device_name() if gpu else f"CPU, {torch.get_num_threads()} threads"
    return train_steps, eval_steps, name


# --- the comparison --------------------------------------------------------------------------


def measure(runners: dict, args, which: int) -> dict[str, float]:
    """Median images/s of each runner's train (which=0) or eval (which=1) steps."""
    for runner in runners.values():
        runner[which](args.warmup)  # compile and warm up
    times: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(args.repeats):
        for name, runner in runners.items():  # alternate: machine noise hits both
            times[name].append(time_repeats(runner[which], args.steps))
    return {name: args.steps * args.batch / statistics.median(t) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=["cpu", "gpu"], default="cpu")
    parser.add_argument("--variant", choices=["paper", "torchvision"], default="paper")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--steps", type=int, default=10, help="steps per timed repeat")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--json", action="store_true", help="end with one JSON line")
    args = parser.parse_args()

    import torch

    gpu = args.device == "gpu"
    if gpu and not torch.cuda.is_available():
        raise SystemExit("--device gpu: PyTorch sees no CUDA device")
    platform_name = "gpu" if gpu else "cpu"
    try:
        jax.devices(platform_name)
    except RuntimeError as error:
        raise SystemExit(f"--device {args.device}: JAX has no such device ({error})") from error

    jax_train, jax_eval, jax_device = jax_runner(args, platform_name)
    torch_train, torch_eval, torch_device = torch_runner(args, gpu)
    runners = {"jax": (jax_train, jax_eval), "torch": (torch_train, torch_eval)}
    train_speed = measure(runners, args, 0)
    eval_speed = measure(runners, args, 1)

    result = {
        "device": args.device,
        "variant": args.variant,
        "batch": args.batch,
        "precision": args.precision,
        "jax_img_s": round(train_speed["jax"], 1),
        "torch_img_s": round(train_speed["torch"], 1),
        "ratio": round(train_speed["jax"] / train_speed["torch"], 3),
        "jax_eval_img_s": round(eval_speed["jax"], 1),
        "torch_eval_img_s": round(eval_speed["torch"], 1),
        "eval_ratio": round(eval_speed["jax"] / eval_speed["torch"], 3),
        "jax_device": jax_device,
        "torch_device": torch_device,
        "versions": {
            "python": platform.python_version(),
            "jax": jax.__version__,
            "torch": torch.__version__,
        },
    }
    if gpu:
        flops = 3 * forward_flops(args.variant, IMAGE_SIZE[args.variant])
        peak = next((v for k, v in BF16_PEAK_TFLOPS.items() if k in torch_device), None)
        for name in ("jax", "torch"):
            tflops = train_speed[name] * flops / 1e12
            result[f"{name}_tflops"] = round(tflops, 1)
            if peak:
                result[f"{name}_peak_fraction"] = round(tflops / peak, 3)

    print(f"AlexNet {args.variant}, batch {args.batch}, {args.precision}, {args.device}")
    print(f"  JAX:     {jax_device} (jax {jax.__version__})")
    print(f"  PyTorch: {torch_device} (torch {torch.__version__})")
    print(f"{'':8}{'train img/s':>14}{'eval img/s':>14}")
    for name in ("jax", "torch"):
        print(f"{name:8}{train_speed[name]:14.1f}{eval_speed[name]:14.1f}")
    print(f"{'ratio':8}{result['ratio']:14.3f}{result['eval_ratio']:14.3f}")
    if gpu:
        for name in ("jax", "torch"):
            share = result.get(f"{name}_peak_fraction")
            print(f"{name}: {result[f'{name}_tflops']} TFLOP/s"
                  + (f", {share:.1%} of the bf16 peak" if share else ""))  # fmt: skip
    if args.json:
        print(json.dumps(result))


if __name__ == "__main__":
    main()
