"""The side-by-side benchmark compares like with like: the same network in both frameworks."""

import argparse
import os
import subprocess
import sys
import types

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import compare_pytorch  # noqa: E402

from alexnet_jax import model, onednn  # noqa: E402


@pytest.mark.slow
@pytest.mark.parametrize(
    "variant,size,groups,params",
    [("paper", 227, 1, 62_378_344), ("paper", 227, 2, 60_965_224),  # 2: the paper's towers
     ("torchvision", 224, 1, 61_100_840)],
)  # fmt: skip
def test_the_pytorch_network_is_ours(variant, size, groups, params):
    net = compare_pytorch.torch_alexnet(variant, groups=groups)
    assert sum(p.numel() for p in net.parameters()) == params
    ours = model.AlexNet(variant=variant, groups=groups).init(
        jax.random.PRNGKey(0), np.zeros((1, size, size, 3), np.float32)
    )
    assert model.count_params(ours["params"]) == params
    shapes = [tuple(p.shape) for p in net.parameters() if p.ndim == 4]  # conv kernels, OIHW
    kernels = [ours["params"][f"conv{i}"]["kernel"].shape for i in range(1, 6)]  # HWIO
    assert shapes == [(k[3], k[2], k[0], k[1]) for k in kernels]
    with torch.no_grad():
        out = net.eval()(torch.zeros(1, 3, size, size))
    assert tuple(out.shape) == (1, 1000)


def test_forward_flops_are_the_layer_arithmetic():
    # multiply-adds, layer by layer: out_h * out_w * filters * (k * k * in_channels), fc in*out
    paper = (55 * 55 * 96 * 363 + 27 * 27 * 256 * 2400 + 13 * 13 * 384 * 2304
             + 13 * 13 * 384 * 3456 + 13 * 13 * 256 * 3456 + 9216 * 4096 + 4096 * 4096
             + 4096 * 1000)  # fmt: skip
    assert compare_pytorch.forward_flops("paper", 227) == 2 * paper == 2_270_512_192
    assert compare_pytorch.forward_flops("torchvision", 224) == 1_428_376_960
    # the paper's two towers: conv2, conv4 and conv5's filters see half the channels
    towers = paper - (27 * 27 * 256 * 2400 + 13 * 13 * 384 * 3456 + 13 * 13 * 256 * 3456) // 2
    assert compare_pytorch.forward_flops("paper", 227, groups=2) == 2 * towers


def test_groups_that_do_not_divide_the_channels_are_refused():
    with pytest.raises(SystemExit):
        compare_pytorch.main(["--groups", "5", "--host_memory", "system"])
    with pytest.raises(SystemExit):
        compare_pytorch.main(["--groups", "0", "--host_memory", "system"])


def test_each_comparison_runs_in_a_process_of_its_own(monkeypatch, capsys):
    """Several variants or precisions: one child process each, with the same settings; the
    summary gathers their results and takes the best peak any of them measured."""
    commands = []

    def child(command):
        commands.append(command)
        variant = command[command.index("--variant") + 1]
        precision = command[command.index("--precision") + 1]
        n = len(commands)
        result = {"variant": variant, "precision": precision, "ratio": 1.0 - 0.1 * n}
        peak = {precision: 100.0 * n if precision == "fp32" else 900.0 / n, "torch_fp32": 1.0}
        return {"device": "cpu", "peak_gflops": peak, "results": [result],
                "ratio": result["ratio"]}  # fmt: skip

    monkeypatch.setattr(compare_pytorch, "run_child", child)
    summary = compare_pytorch.main(
        ["--variant", "paper,torchvision", "--precision", "fp32,bf16", "--batch", "4",
         "--torch_modes", "eager,compile", "--groups", "2", "--eval_crops", "10", "--json"]
    )  # fmt: skip
    assert [(c[c.index("--variant") + 1], c[c.index("--precision") + 1]) for c in commands] == [
        ("paper", "fp32"), ("paper", "bf16"), ("torchvision", "fp32"), ("torchvision", "bf16")
    ]  # fmt: skip
    for command in commands:
        assert command[0] == sys.executable and command[-1] == "--json"
        for flag, value in (("--batch", "4"), ("--torch_modes", "eager,compile"),
                            ("--groups", "2"), ("--eval_crops", "10"),
                            ("--host_memory", "auto")):  # fmt: skip
            assert command[command.index(flag) + 1] == value
    assert summary["processes"] == "one per comparison"
    assert [r["ratio"] for r in summary["results"]] == pytest.approx([0.9, 0.8, 0.7, 0.6])
    assert summary["ratio"] == pytest.approx(0.6)
    assert summary["peak_gflops"] == {"fp32": 300.0, "torch_fp32": 1.0, "bf16": 450.0}
    assert summary["results"][1]["peak_gflops"] == {"bf16": 450.0, "torch_fp32": 1.0}
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("{")


CPUINFO = "processor\t: {n}\nvendor_id\t: AuthenticAMD\nflags\t\t: fpu avx avx2 fma {extra}\n\n"


@pytest.mark.parametrize(
    "extra, native",
    [("", False), ("avx512f avx512bw", False),
     ("avx512f avx512dq avx512bw avx512vl avx512_vnni", False),  # Ice Lake: emulated bf16
     ("avx512f avx512dq avx512bw avx512vl avx512_bf16", True),  # Zen 4, Cooper Lake
     ("avx512f avx512dq avx512bw avx512vl avx512_bf16 amx_bf16", True),  # Sapphire Rapids
     ("avx_vnni avx_vnni_int8 avx_ne_convert", True)],  # oneDNN's AVX2-VNNI-2
)  # fmt: skip
def test_native_bf16_is_read_from_the_cpu_flags(extra, native):
    cpuinfo = "".join(CPUINFO.format(n=n, extra=extra) for n in range(2))
    assert compare_pytorch.cpu_has_native_bf16(cpuinfo) is native
    arm = "processor\t: 0\nFeatures\t: fp asimd sve {}\n"
    assert compare_pytorch.cpu_has_native_bf16(arm.format("bf16 i8mm")) is True
    assert compare_pytorch.cpu_has_native_bf16(arm.format("")) is False
    assert compare_pytorch.cpu_has_native_bf16("nothing that names flags") is True


def test_onednn_computes_bf16_natively_where_the_cpu_flags_say():
    """oneDNN's own reading of this CPU (``onednn.native_bf16``, its ISA) and the benchmark's
    (``/proc/cpuinfo``'s flags) agree: bf16 is compared with PyTorch, and computed on
    oneDNN's bf16 kernels, on the same CPUs; elsewhere ours is widened to fp32."""
    if jax.default_backend() != "cpu" or not onednn.available("auto"):
        pytest.skip("oneDNN's handlers are not built here")
    native = compare_pytorch.cpu_has_native_bf16()
    assert onednn.native_bf16() is native
    assert onednn.compute_dtype(jnp.bfloat16) == (jnp.bfloat16 if native else jnp.float32)
    assert onednn.compute_dtype(jnp.float32) == jnp.float32


@pytest.mark.parametrize("native", [False, True])
def test_auto_precision_leaves_bf16_out_where_the_cpu_lacks_it(monkeypatch, capsys, native):
    """``--precision auto``: fp32 alone, said so, on a CPU without native bf16 (where PyTorch's
    bf16 is emulated or runs on reference kernels); both elsewhere; a named precision is
    always run."""
    precisions = []

    def child(command):
        precision = command[command.index("--precision") + 1]
        precisions.append(precision)
        result = {"variant": "paper", "precision": precision, "ratio": 1.0}
        return {"peak_gflops": {precision: 1.0}, "results": [result], "ratio": 1.0}

    monkeypatch.setattr(compare_pytorch, "run_child", child)
    monkeypatch.setattr(compare_pytorch, "cpu_has_native_bf16", lambda: native)
    compare_pytorch.main(["--variant", "paper,torchvision"])
    assert precisions == (["fp32", "bf16"] * 2 if native else ["fp32"] * 2)
    assert ("no native bf16" in capsys.readouterr().out) is not native
    precisions.clear()
    compare_pytorch.main(["--variant", "paper", "--precision", "fp32,bf16"])
    assert precisions == ["fp32", "bf16"]


def test_the_benchmark_does_not_import_tensorflow():
    """The GPU machines have no TensorFlow: the benchmark and the train step must not need it."""
    code = (
        "import sys; sys.path.insert(0, 'benchmarks'); import compare_pytorch;"
        "assert 'tensorflow' not in sys.modules, 'TensorFlow was imported'"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-2000:]


def test_the_gpu_path_parses_and_stops_cleanly_without_a_gpu(monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("a GPU is here: the GPU path runs for real")
    monkeypatch.delenv("XLA_PYTHON_CLIENT_PREALLOCATE", raising=False)
    with pytest.raises(SystemExit, match="PyTorch sees no CUDA device"):
        compare_pytorch.main(
            ["--device", "gpu", "--precision", "bf16", "--batch", "512", "--host_memory", "system"]
        )
    assert os.environ["XLA_PYTHON_CLIENT_PREALLOCATE"] == "false"  # set before JAX's backends
    with pytest.raises(SystemExit):
        compare_pytorch.main(["--torch_modes", "eager,jit"])  # not a PyTorch mode here


@pytest.mark.parametrize("modes", ["compile+freeze,compile+cl+freeze", ""])
def test_a_comparison_needs_a_pytorch_mode_that_trains(modes, capsys):
    with pytest.raises(SystemExit):
        compare_pytorch.main(["--torch_modes", modes, "--host_memory", "system"])
    assert "has no mode that trains" in capsys.readouterr().err


@pytest.mark.slow
def test_the_frozen_modes_evaluate_with_the_weights_frozen():
    """Under ``torch_inference(frozen=True)`` the compiled network's weights are constants:
    changing them after the first call changes nothing. Unfrozen, the change shows. Both run
    in PyTorch's inference mode."""
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    for frozen in (True, False):
        torch._dynamo.reset()
        net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Flatten(),
                                  torch.nn.Linear(8 * 14 * 14, 4)).eval()  # fmt: skip
        compiled = torch.compile(net)
        with compare_pytorch.torch_inference("cpu", False, frozen):
            first = compiled(x)
            assert first.is_inference()  # made in inference mode: no autograd bookkeeping
            with torch.no_grad():
                net[0].weight.mul_(2.0)
                net[3].bias.add_(1.0)
            second = compiled(x)
        with torch.no_grad():
            expected = net(x)
        if frozen:
            np.testing.assert_allclose(second.numpy(), first.numpy(), rtol=1e-6, atol=1e-6)
            assert not torch.allclose(second, expected, atol=1e-3)
        else:
            np.testing.assert_allclose(second.numpy(), expected.numpy(), rtol=1e-5, atol=1e-5)


def test_on_a_gpu_jax_leaves_pytorch_its_share_of_the_memory():
    environ = {}
    assert compare_pytorch.share_gpu_memory(environ) == {"XLA_PYTHON_CLIENT_PREALLOCATE": "false"}
    assert environ == {"XLA_PYTHON_CLIENT_PREALLOCATE": "false"}
    mine = {"XLA_PYTHON_CLIENT_PREALLOCATE": "true"}  # the caller's own choice is kept
    assert compare_pytorch.share_gpu_memory(mine) == {"XLA_PYTHON_CLIENT_PREALLOCATE": "true"}


def test_pytorch_on_a_gpu_autotunes_and_takes_tensorfloat32_as_jax_does():
    """cuDNN's autotuner and TF32 products, set before any PyTorch runner (on a CPU-only
    build the flags are settable and read back)."""
    flags = (torch.backends.cudnn, "benchmark"), (torch.backends.cuda.matmul, "allow_tf32"), (
        torch.backends.cudnn, "allow_tf32")  # fmt: skip
    before = [getattr(module, name) for module, name in flags]
    try:
        for module, name in flags:
            setattr(module, name, False)
        settings = compare_pytorch.torch_gpu_settings()
        assert all(getattr(module, name) is True for module, name in flags)
        assert settings == {
            "cudnn.benchmark": True, "cuda.matmul.allow_tf32": True, "cudnn.allow_tf32": True
        }  # fmt: skip
    finally:
        for (module, name), value in zip(flags, before, strict=True):
            setattr(module, name, value)


def test_pytorch_updates_with_fused_sgd_as_plain_sgd_would():
    """The benchmark's PyTorch optimizer is the fused one, a PyTorch user's fastest, and it
    computes the plain optimizer's update (momentum and weight decay included)."""
    generator = torch.Generator().manual_seed(0)
    weights = [torch.randn(64, 32, generator=generator), torch.randn(64, generator=generator)]
    fused, plain = [[w.clone().requires_grad_() for w in weights] for _ in range(2)]
    optimizers = compare_pytorch.torch_sgd(fused), torch.optim.SGD(
        plain, lr=0.01, momentum=0.9, weight_decay=5e-4)  # fmt: skip
    assert optimizers[0].defaults["fused"] is True
    for _ in range(3):  # the momentum buffers come into play from the second step on
        grads = [torch.randn(w.shape, generator=generator) for w in weights]
        for params, optimizer in zip((fused, plain), optimizers, strict=True):
            for param, grad in zip(params, grads, strict=True):
                param.grad = grad.clone()
            optimizer.step()
    for a, b in zip(fused, plain, strict=True):
        np.testing.assert_allclose(a.detach().numpy(), b.detach().numpy(), rtol=1e-6, atol=1e-7)
    assert not torch.equal(fused[0], weights[0])


def test_pytorch_holds_no_gradients_between_its_turns(monkeypatch):
    """A PyTorch runner frees its gradients when its turn ends, so that between turns it
    holds none of the shared heap's memory that the next runner's step would reuse (held,
    they made our steps fault fresh pages in at every step in some runs)."""
    created = []

    def recording_sgd(params):
        created.append(torch.optim.SGD(params, lr=0.01, momentum=0.9, weight_decay=5e-4))
        return created[-1]

    monkeypatch.setattr(compare_pytorch, "torch_sgd", recording_sgd)
    train, _ = compare_pytorch.torch_runner("torchvision", "fp32", 2, "eager", False)
    (optimizer,) = created
    params = [p for group in optimizer.param_groups for p in group["params"]]
    before = [p.detach().clone() for p in params]
    train(1)
    assert all(p.grad is None for p in params)
    assert not all(torch.equal(a, b) for a, b in zip(params, before, strict=True))  # trained


@pytest.mark.parametrize("memory_format", ["contiguous_format", "channels_last"])
def test_pytorch_sees_the_images_our_step_sees(memory_format):
    """PyTorch's network gets uint8 images normalized as our step normalizes them (our own
    normalizer, NHWC, is the reference), in the mode's memory format."""
    images = np.random.default_rng(0).integers(0, 256, (2, 8, 8, 3), dtype=np.uint8)
    seen = []

    class Network(torch.nn.Module):
        def forward(self, x):
            seen.append(x)
            return x.sum()

    fmt = getattr(torch, memory_format)
    compare_pytorch.normalized(Network(), fmt)(torch.from_numpy(images).permute(0, 3, 1, 2))
    config = compare_pytorch.jax_config("torchvision", "fp32", 2)
    ours = compare_pytorch.normalization.make_normalizer(config.input)(images)
    (x,) = seen
    assert x.dtype == torch.float32 and x.is_contiguous(memory_format=fmt)
    np.testing.assert_allclose(x.permute(0, 2, 3, 1).numpy(), np.asarray(ours), rtol=1e-6)


def test_frozen_modes_are_timed_for_evaluation_only(monkeypatch, capsys):
    """Inductor's freezing inlines the weights as constants, so its modes have no train step;
    the train ratio is against the trainable modes, the eval ratio against all of them."""
    assert set(compare_pytorch.EVAL_ONLY_MODES) < set(compare_pytorch.TORCH_MODES)
    for mode in compare_pytorch.TORCH_MODES:  # torch.compile compiles at the first call only
        train, evaluation = compare_pytorch.torch_runner("torchvision", "fp32", 2, mode, False)
        assert callable(evaluation)
        assert (train is None) == (mode in compare_pytorch.EVAL_ONLY_MODES)

    seconds = {  # (train, eval) seconds a step, per runner
        "jax": (1.0, 0.5), "torch_eager": (2.0, 0.8), "torch_compile": (1.25, 0.6),
        "torch_compile+cl+freeze": (None, 0.4),
    }  # fmt: skip

    def runner(name):
        def phase(which):
            if seconds[name][which] is None:
                return None
            step = lambda n: None  # noqa: E731
            step.seconds = seconds[name][which]
            return step

        return phase(0), phase(1)

    monkeypatch.setattr(compare_pytorch, "jax_runner", lambda *a: runner("jax"))
    monkeypatch.setattr(compare_pytorch, "torch_runner",
                        lambda v, p, b, mode, *a: runner(f"torch_{mode}"))  # fmt: skip
    monkeypatch.setattr(compare_pytorch, "time_repeats", lambda run, n: run.seconds * n)
    monkeypatch.setattr(compare_pytorch, "PAUSE_S", 0.0)
    args = argparse.Namespace(groups=1, batch=4, eval_crops=1, steps=2, repeats=3, warmup=1,
                              torch_modes=["eager", "compile", "compile+cl+freeze"])  # fmt: skip
    result = compare_pytorch.compare("torchvision", "fp32", args, "cpu", False, {"fp32": 100.0})
    assert set(result["train_img_s"]) == {"jax", "torch_eager", "torch_compile"}
    assert set(result["eval_img_s"]) == set(seconds) == set(result["eval_faults_per_step"])
    assert result["train_img_s"]["torch_compile"] == pytest.approx(4 / 1.25)
    assert result["best_torch_train"] == "torch_compile" and result["ratio"] == 1.25
    assert result["best_torch_eval"] == "torch_compile+cl+freeze"
    assert result["eval_ratio"] == 0.8
    compare_pytorch.print_result(result)
    rows = {line.split()[0]: line.split() for line in capsys.readouterr().out.splitlines()[2:]}
    assert rows["torch_compile+cl+freeze"][1:3] == ["-", "10.0"]  # no train figure, eval 4/0.4
    assert rows["torch_compile"][1] == "3.2"


def test_pytorch_averages_crops_as_our_eval_step_does():
    """With ``--eval_crops``, PyTorch's probabilities are each image's crops' softmaxes
    averaged, what our eval step computes (``steps.eval_logits``, the reference) from the
    same logits."""
    rng = np.random.default_rng(0)
    images = rng.normal(size=(3, 10, 4, 4, 2)).astype(np.float32)  # 3 images x 10 crops
    kernel = rng.normal(size=(32, 7)).astype(np.float32)
    dense = lambda variables, x: x.reshape(len(x), -1) @ variables["params"]  # noqa: E731
    state = types.SimpleNamespace(params=kernel, apply_fn=dense)
    ours = jax.nn.softmax(compare_pytorch.steps.eval_logits(state, images))
    logits = torch.from_numpy(images.reshape(30, -1) @ kernel)  # the crops as rows, in order
    theirs = compare_pytorch.crop_average(logits.softmax(-1), 10)
    assert theirs.shape == (3, 7)
    np.testing.assert_allclose(theirs.numpy(), np.asarray(ours), rtol=1e-5, atol=1e-7)
    assert compare_pytorch.crop_average(logits, 1) is logits


@pytest.mark.slow
def test_both_frameworks_evaluate_ten_crops_an_image():
    """``eval_crops=10``: our eval step gets (batch, 10, H, W, 3) images and returns one
    prediction per image; PyTorch's evaluation runs the 10 x batch crops and returns one
    distribution per image."""
    _, ours = compare_pytorch.jax_runner("torchvision", "fp32", 2, "cpu", 1, 10)
    out = ours(1)
    chex.assert_shape(out["top5"], (1, 2, 5))
    chex.assert_shape(out["loss"], (1, 2))
    _, theirs = compare_pytorch.torch_runner("torchvision", "fp32", 2, "eager", False, 1, 10)
    probabilities = theirs(1)
    assert probabilities.shape == (2, 1000)
    np.testing.assert_allclose(probabilities.sum(-1).numpy(), 1.0, rtol=1e-5)


@pytest.mark.slow
def test_the_comparison_reports_every_mode_the_peak_and_the_ratio(capsys):
    summary = compare_pytorch.main(
        ["--variant", "torchvision", "--precision", "fp32", "--batch", "2", "--steps", "1",
         "--repeats", "1", "--warmup", "1",
         "--torch_modes", "eager,compile+autotune,compile+cl+freeze", "--peak_size", "256",
         "--host_memory", "system", "--json"]
    )  # fmt: skip
    (result,) = summary["results"]
    assert set(result["train_img_s"]) == {"jax", "torch_eager", "torch_compile+autotune"}
    frozen = "torch_compile+cl+freeze"  # inductor's freezing compiles and runs, for eval only
    assert set(result["eval_img_s"]) == set(result["train_img_s"]) | {frozen}
    assert result["eval_img_s"][frozen] > 0
    assert summary["torch_settings"] == {"optimizer": "SGD(fused=True)"}  # no GPU flags here
    # on the CPU: whose convolutions our steps ran (config.cpu_convolutions="auto")
    expected = "onednn" if onednn.available("auto") else "xla"
    assert summary["jax_settings"] == {"cpu_convolutions": expected, "cpu_matmuls": expected}
    best = max(("torch_eager", "torch_compile+autotune"), key=result["train_img_s"].get)
    assert result["best_torch_train"] == best
    # The figures are rounded to 0.01 images/s (the ratio to 0.001): at this size, under load,
    # a step can run at 0.2 images/s, so the check allows exactly that rounding.
    jax_rate, best_rate = (result["train_img_s"][n] for n in ("jax", best))
    assert (jax_rate - 0.005) / (best_rate + 0.005) - 5e-4 <= result["ratio"]
    assert result["ratio"] <= (jax_rate + 0.005) / (best_rate - 0.005) + 5e-4
    assert summary["peak_gflops"]["fp32"] >= summary["peak_gflops"]["torch_fp32"] > 0
    for faults, rates in ((result["train_faults_per_step"], result["train_img_s"]),
                          (result["eval_faults_per_step"], result["eval_img_s"])):  # fmt: skip
        assert set(faults) == set(rates) and min(faults.values()) >= 0
    assert summary["host_memory"] == {"mode": "system", "reused": False}
    flops = 3 * compare_pytorch.forward_flops("torchvision", 224)
    low, high = ((jax_rate + d) * flops / 1e9 for d in (-0.005, 0.005))
    assert low - 0.05 <= result["train_gflops"]["jax"] <= high + 0.05  # 0.1 GFLOP/s rounding
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert '"ratio"' in last and last.startswith("{")


def test_the_conv_layer_benchmark_times_the_networks_own_layers():
    import conv_layers

    for variant, size in (("paper", 227), ("torchvision", 224)):
        net = model.AlexNet(variant=variant)
        images = np.zeros((1, size, size, 3), np.float32)
        variables = net.init(jax.random.PRNGKey(0), images)
        _, state = net.apply(variables, images, mutable=["intermediates"])
        outputs = {k: v[0].shape[1:] for k, v in state["intermediates"].items()}
        previous = (size, size, 3)
        for index, (name, image, kernel, stride, pad) in enumerate(
            conv_layers.layer_shapes(variant)
        ):
            assert name == f"conv{index + 1}"
            assert image == previous  # what the layer before gives it (after its pool)
            assert kernel == variables["params"][name]["kernel"].shape
            y = jax.eval_shape(
                lambda x, k, s=stride, p=pad: jax.lax.conv_general_dilated(
                    x, k, (s, s), [(p, p)] * 2, dimension_numbers=("NHWC", "HWIO", "NHWC")
                ),
                jax.ShapeDtypeStruct((1, *image), np.float32),
                jax.ShapeDtypeStruct(kernel, np.float32),
            )
            assert y.shape[-1] == kernel[-1]
            previous = outputs[f"{name}_out"]
        # the dense layers: the network's own kernels (1,000 classes)
        for name, inputs, features in conv_layers.dense_shapes(variant):
            assert variables["params"][name]["kernel"].shape == (inputs, features), name


def test_the_conv_layer_benchmark_times_bf16_only_where_it_is_native():
    import conv_layers

    assert conv_layers.resolve_precision("auto", native_bf16=True) == "bf16"
    assert conv_layers.resolve_precision("auto", native_bf16=False) == "fp32"
    for asked in ("bf16", "fp32"):  # an explicit precision is kept either way
        for native in (True, False):
            assert conv_layers.resolve_precision(asked, native_bf16=native) == asked


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_the_conv_layer_benchmark_times_pytorch_backward_without_its_forward(
    precision, monkeypatch
):
    # Ours is timed without the forward (XLA drops the primal output nobody reads), so
    # PyTorch's backward must be too: the same gradients, again and again, and no conv2d.
    import conv_layers

    layers = {"conv1": ("conv1", (19, 19, 3), (11, 11, 3, 4), 4, 2),
              "conv3": ("conv3", (5, 5, 8), (3, 3, 8, 16), 1, 1)}  # fmt: skip
    calls, conv2d = [], torch.nn.functional.conv2d

    def counted(*args, **kwargs):
        calls.append(1)
        return conv2d(*args, **kwargs)

    for name, layer in layers.items():
        runners = conv_layers.torch_runners(layer, 2, precision)  # runs the forward once
        calls.clear()
        monkeypatch.setattr(torch.nn.functional, "conv2d", counted)
        first, second = runners["torch backward"](), runners["torch backward"]()
        assert calls == [], name
        runners["torch forward"]()
        assert calls == [1], name
        monkeypatch.undo()
        # conv1's image needs no gradient (as in training); the others' both gradients.
        assert len(first) == (1 if name == "conv1" else 2)
        assert first[-1].shape == (layer[2][3], layer[2][2], layer[2][0], layer[2][1])
        for a, b in zip(first, second, strict=True):
            assert torch.equal(a, b) and bool(a.abs().sum() > 0)


@pytest.mark.slow
def test_the_conv_layer_benchmark_runs_and_ends_with_json():
    import json

    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "conv_layers.py"), "--variant",
         "torchvision", "--batch", "1", "--repeats", "1", "--layers", "conv1,conv3,fc8",
         "--json"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    table = json.loads(result.stdout.strip().splitlines()[-1])
    native = jax.default_backend() != "cpu" or compare_pytorch.cpu_has_native_bf16()
    assert table["precision"] == ("bf16" if native else "fp32")  # --precision auto
    assert [row["layer"] for row in table["layers"]] == ["conv1", "conv3", "fc8"]
    for row in table["layers"]:
        for runner in ("ours", "xla", "torch"):
            assert row[f"{runner} forward"] > 0 and row[f"{runner} backward"] > 0
            assert (f"{runner} eval" in row) == (row["layer"] == "fc8")
    bad = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "conv_layers.py"), "--layers", "fc9"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert bad.returncode == 2 and "--layers 'fc9': choose from conv1" in bad.stderr


@pytest.mark.slow
def test_the_lrn_benchmark_runs_as_the_train_step_compiles():
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "lrn.py"), "--batch", "2",
         "--repeats", "1"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.strip().splitlines()
    assert "the train step's compile options" in lines[0]
    times = {line[:15].strip(): float(line[15:].split()[0]) for line in lines[1:5]}
    assert list(times) == ["conv1 forward", "LRN forward", "conv1 fwd+bwd", "LRN fwd+bwd"]
    assert all(ms > 0 for ms in times.values())
    assert float(lines[-1].split(":")[1]) == pytest.approx(
        times["LRN fwd+bwd"] / times["conv1 fwd+bwd"],
        rel=0.1,
        abs=1e-3,  # ms to 2 decimals
    )
