"""oneDNN's convolutions and products on the CPU (``alexnet_jax/onednn.py``) against XLA's own.

The convolutions' reference is ``lax.conv_general_dilated`` in float32 (on the bfloat16
values, for bfloat16): forward and both gradients, every geometry the products' tests cover
(strides, per-axis and asymmetric padding, groups), in the network and in a train step. Then
what a user meets around it: the lowering chosen per platform, ``cpu_convolutions="xla"``,
``vmap``, the build cache, and the errors when oneDNN or a compiler is missing. The dense
layers' products (``onednn.matmul``) are checked against float64 products, and their packed
kernels (``onednn.pack``, ``steps.inference_state``) against the unpacked products and XLA's.
bfloat16 is tested both ways oneDNN computes it, whatever this CPU has: on oneDNN's bfloat16
kernels (``native``; emulated, slowly but exactly, where the CPU lacks bfloat16 arithmetic)
and widened to float32 (``widened``, what a CPU without bfloat16 arithmetic runs).
"""

import os
import re
import subprocess
import sys
import time

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_shifted_conv import EPS, GEOMETRIES, _relative_error

from alexnet_jax import layers, onednn, shifted_conv, steps
from alexnet_jax.defaults import default_config
from alexnet_jax.layers import Dense
from alexnet_jax.model import AlexNet

ON_CPU = jax.default_backend() == "cpu"


def _onednn_here() -> bool:
    try:
        return onednn.available("onednn")
    except onednn.OnednnUnavailable:
        if os.environ.get("CI"):
            raise  # CI installs oneDNN and has a compiler: the path must be tested there
        return False


needs_onednn = pytest.mark.skipif(
    not (ON_CPU and _onednn_here()), reason="oneDNN's handler cannot be built here"
)


def _compiled_text(fn, *args):
    return jax.jit(fn).lower(*args).compile().as_text()


# Each case: a dtype, and for bfloat16 the kernels oneDNN computes it on.
DTYPES = [
    pytest.param(jnp.float32, None, id="float32"),
    pytest.param(jnp.bfloat16, True, id="bfloat16-native"),
    pytest.param(jnp.bfloat16, False, id="bfloat16-widened"),
]


def _pin_bf16(monkeypatch, native):
    """Has oneDNN compute bfloat16 on its bfloat16 kernels (``native``) or widened to float32
    (``not native``), whatever this CPU has; ``None`` leaves this CPU's own choice."""
    if native is not None:
        monkeypatch.setattr(onednn, "native_bf16", lambda: native)


def _custom_calls(text, target):
    """(result element type, [operand element types]) of each ``target`` custom call in
    compiled HLO text."""
    calls = []
    for line in text.splitlines():
        if f'custom_call_target="{target}"' in line:
            result = re.search(r"= (\w+)\[", line).group(1)
            operands = line.split("operand_layout_constraints={", 1)[1].split("}, api_version")[0]
            calls.append((result, re.findall(r"(\w+)\[", operands)))
    return calls


@needs_onednn
@pytest.mark.parametrize("dtype, native", DTYPES)
@pytest.mark.parametrize("image, kernel_shape, strides, pad, groups", GEOMETRIES)
def test_forward_and_gradients_match_xla(
    image, kernel_shape, strides, pad, groups, dtype, native, monkeypatch
):
    _pin_bf16(monkeypatch, native)
    rng = np.random.default_rng(0)
    kh, kw, features = kernel_shape
    x = jnp.asarray(rng.standard_normal(image), dtype)
    kernel = jnp.asarray(rng.standard_normal((kh, kw, image[-1] // groups, features)) * 0.2, dtype)
    # per-axis, and on one axis asymmetric (which the products leave to XLA)
    padding = ((pad[0], pad[0]), (pad[1], pad[1] + 1))

    def ours(x, kernel):
        return shifted_conv.conv2d(x, kernel, strides, padding, groups)

    def reference(x, kernel):
        x, kernel = x.astype(jnp.float32), kernel.astype(jnp.float32)
        return shifted_conv.lax_conv2d(x, kernel, strides, padding, groups)

    # float32: oneDNN sums in another order; bfloat16: one rounding of the result
    tolerance = 1e-5 if dtype == jnp.float32 else EPS
    y = jax.jit(ours)(x, kernel)
    expected = reference(x, kernel)
    chex.assert_equal_shape([y, expected])
    assert y.dtype == dtype
    assert _relative_error(y, expected) <= tolerance

    cotangent = jnp.asarray(rng.standard_normal(y.shape), dtype)
    backward = jax.jit(lambda x, k, g: jax.vjp(ours, x, k)[1](g))
    d_x, d_kernel = backward(x, kernel, cotangent)
    ref_x, ref_kernel = jax.vjp(reference, x, kernel)[1](cotangent.astype(jnp.float32))
    chex.assert_trees_all_equal_dtypes((d_x, d_kernel), (x, kernel))
    assert _relative_error(d_x, ref_x) <= tolerance
    assert _relative_error(d_kernel, ref_kernel) <= tolerance

    # all three passes are oneDNN's, none XLA's, in bfloat16 or widened to float32
    text = _compiled_text(lambda x, k, g: (ours(x, k), backward(x, k, g)), x, kernel, cotangent)
    assert text.count(onednn.TARGET) == 3 and "convolution(" not in text
    computed = "bf16" if native else "f32"
    assert _custom_calls(text, onednn.TARGET) == [(computed, [computed] * 2)] * 3


@needs_onednn
def test_xla_mode_and_other_platforms_hold_no_custom_call():
    """``cpu_convolutions="xla"`` (exports) lowers to XLA's operations alone; lowered for a
    GPU (no GPU needed to lower), ``auto`` is one plain convolution per pass: cuDNN's path
    is untouched by the CPU's handler."""
    x = jnp.zeros((2, 13, 13, 16), jnp.float32)
    kernel = jnp.zeros((3, 3, 16, 8), jnp.float32)

    def grads(mode):
        def loss(x, kernel):
            y = shifted_conv.conv2d(x, kernel, (1, 1), ((1, 1), (1, 1)), 1, mode)
            return jnp.sum(y**2)

        return jax.jit(jax.grad(loss, argnums=(0, 1)))

    cpu = grads("auto").lower(x, kernel).as_text()
    assert onednn.TARGET in cpu and "stablehlo.convolution" not in cpu
    assert onednn.TARGET not in grads("xla").lower(x, kernel).as_text()
    gpu = jax.export.export(grads("auto"), platforms=["cuda"])(x, kernel).mlir_module()
    assert onednn.TARGET not in gpu and gpu.count("stablehlo.convolution") == 3


@needs_onednn
def test_vmap_convolves_each_example():
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((3, 2, 9, 9, 4)), jnp.float32)
    kernel = jnp.asarray(rng.standard_normal((3, 3, 3, 4, 6)), jnp.float32)

    def conv(x, kernel):
        return shifted_conv.conv2d(x, kernel, (1, 1), ((1, 1), (1, 1)))

    expected = jnp.stack(
        [
            shifted_conv.lax_conv2d(a, b, (1, 1), ((1, 1), (1, 1)))
            for a, b in zip(x, kernel, strict=True)
        ]
    )
    chex.assert_trees_all_close(jax.jit(jax.vmap(conv))(x, kernel), expected, rtol=1e-5, atol=1e-5)


@needs_onednn
@pytest.mark.parametrize("dtype, native", DTYPES)
def test_the_network_and_its_gradients_match_xlas_convolutions(dtype, native, monkeypatch):
    """The paper's two-tower AlexNet (LRN, grouped conv2/4/5), narrowed: logits and every
    parameter's gradient with oneDNN's convolutions against the same with XLA's."""
    _pin_bf16(monkeypatch, native)
    images = jax.random.normal(jax.random.PRNGKey(0), (2, 67, 67, 3))
    labels = jnp.array([1, 3])

    def model(mode):
        return AlexNet(num_classes=5, groups=2, width_divisor=8, dtype=dtype, dropout_rate=0.0,
                       cpu_convolutions=mode)  # fmt: skip

    params = model("xla").init(jax.random.PRNGKey(1), images)["params"]

    def loss_and_grads(mode):
        def loss(params):
            logits = model(mode).apply({"params": params}, images, train=True)
            onehot = jax.nn.one_hot(labels, 5)
            return -jnp.mean(jnp.sum(onehot * jax.nn.log_softmax(logits.astype(jnp.float32)), -1))

        return jax.jit(jax.value_and_grad(loss))(params)

    (ours_loss, ours), (ref_loss, ref) = loss_and_grads("auto"), loss_and_grads("xla")
    rtol = 1e-4 if dtype == jnp.float32 else 0.05
    np.testing.assert_allclose(ours_loss, ref_loss, rtol=rtol)
    for path, got, expected in zip(
        jax.tree_util.tree_leaves_with_path(ours),
        jax.tree_util.tree_leaves(ours),
        jax.tree_util.tree_leaves(ref),
        strict=True,
    ):
        scale = float(jnp.max(jnp.abs(expected))) or 1.0
        error = float(jnp.max(jnp.abs(got - expected))) / scale
        assert error <= (1e-4 if dtype == jnp.float32 else 0.08), (path[0], error)


def test_the_build_is_cached_and_reused(tmp_path):
    if not ON_CPU:
        pytest.skip("the handler is the CPU's")
    try:
        onednn.find_onednn()
    except onednn.OnednnUnavailable as e:
        pytest.skip(str(e))
    path = onednn.build(str(tmp_path))
    assert os.path.dirname(path) == str(tmp_path) and path.endswith(".so")
    built = os.stat(path).st_mtime_ns
    start = time.perf_counter()
    assert onednn.build(str(tmp_path)) == path
    assert time.perf_counter() - start < 1.0  # found, not compiled again
    assert os.stat(path).st_mtime_ns == built
    assert sorted(os.listdir(tmp_path)) == sorted(
        [os.path.basename(path), os.path.basename(path) + ".sha256"]
    )


def test_missing_onednn_or_compiler_is_named(tmp_path, monkeypatch):
    monkeypatch.setattr(onednn, "_prefixes", lambda: [str(tmp_path)])
    with pytest.raises(onednn.OnednnUnavailable, match="pip install onednn-cpu-gomp"):
        onednn.build(str(tmp_path))
    monkeypatch.undo()
    try:
        onednn.find_onednn()
    except onednn.OnednnUnavailable as e:
        pytest.skip(str(e))
    monkeypatch.setenv("CXX", "no-such-compiler")
    with pytest.raises(onednn.OnednnUnavailable, match="'no-such-compiler' is not on PATH"):
        onednn.build(str(tmp_path / "cache"))


def test_auto_falls_back_to_xla_with_one_warning_and_onednn_raises(monkeypatch, caplog):
    if not ON_CPU:
        pytest.skip("the handler is the CPU's")

    def unavailable():
        raise onednn.OnednnUnavailable("no C++ compiler (test)")

    monkeypatch.setattr(onednn, "_load", unavailable)
    onednn._warn_once.cache_clear()
    x = jnp.ones((1, 8, 8, 4), jnp.float32)
    kernel = jnp.ones((3, 3, 4, 4), jnp.float32)
    with caplog.at_level("WARNING", logger=onednn.__name__):
        for _ in range(2):
            text = (
                jax.jit(lambda x, k: shifted_conv.conv2d(x, k, (1, 1), ((1, 1), (1, 1))))
                .lower(x, kernel)
                .as_text()
            )
            assert onednn.TARGET not in text and "stablehlo.convolution" in text
    warnings = [r for r in caplog.records if "no C++ compiler (test)" in r.getMessage()]
    assert len(warnings) == 1
    with pytest.raises(onednn.OnednnUnavailable, match="no C.. compiler"):
        shifted_conv.conv2d(x, kernel, (1, 1), ((1, 1), (1, 1)), 1, "onednn")
    with pytest.raises(ValueError, match="cpu_convolutions='mkl'"):
        shifted_conv.conv2d(x, kernel, (1, 1), ((1, 1), (1, 1)), 1, "mkl")
    with pytest.raises(ValueError, match="cpu_matmuls='mkl'"):
        Dense(4, cpu_matmuls="mkl").init(jax.random.PRNGKey(0), jnp.ones((2, 3)))


@needs_onednn
@pytest.mark.parametrize("user_policy", [None, "ACTIVE"])
def test_openmp_threads_sleep_between_convolutions_unless_the_user_says(user_policy):
    """oneDNN's GNU OpenMP threads are loaded with ``OMP_WAIT_POLICY=PASSIVE`` (they sleep
    after each convolution instead of spinning on the cores XLA's threads need), unless the
    user set a policy; the process's environment is left as it was."""
    code = (
        "import os; from alexnet_jax import onednn; assert onednn.available('onednn');"
        "print('AFTER', os.environ.get('OMP_WAIT_POLICY'))"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    env.update(OMP_DISPLAY_ENV="VERBOSE", JAX_PLATFORMS="cpu")  # libgomp prints its settings
    if user_policy:
        env["OMP_WAIT_POLICY"] = user_policy
    result = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-2000:]
    # GNU OpenMP's display reads "PASSIVE" when no policy is set too; the spin count tells
    # (300,000 spins by default, none when passive, more when active)
    spins = re.search(r"GOMP_SPINCOUNT = '(\d+)'", result.stderr)
    assert spins, result.stderr[-2000:]
    if user_policy is None:
        assert "OMP_WAIT_POLICY = 'PASSIVE'" in result.stderr and spins[1] == "0"
    else:
        assert "OMP_WAIT_POLICY = 'ACTIVE'" in result.stderr and int(spins[1]) > 300_000
    assert f"AFTER {user_policy}" in result.stdout


@needs_onednn
def test_a_damaged_cached_build_is_built_again(tmp_path):
    """A cached handler cut short (a full disk, a copied cache) is built again before it is
    loaded: loading it would kill the process (SIGBUS)."""
    env = dict(os.environ, ALEXNET_JAX_CACHE=str(tmp_path), JAX_PLATFORMS="cpu")
    code = "from alexnet_jax import onednn; print(onednn.build())"
    path = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                          text=True, timeout=300, check=True).stdout.strip()  # fmt: skip
    whole = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(whole[: len(whole) // 3])
    code = "from alexnet_jax import onednn; assert onednn.available('onednn');print(onednn.build())"
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                            text=True, timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == path and os.path.getsize(path) == len(whole)


# --- the dense layers' products (onednn.matmul, packed kernels) -------------------------------


@needs_onednn
@pytest.mark.parametrize("rows, depth, features", [(1, 7, 5), (32, 300, 130), (97, 64, 1000)])
@pytest.mark.parametrize(
    "dtype, kernel_dtype, native",
    [
        pytest.param(jnp.float32, jnp.float32, None, id="float32"),
        pytest.param(jnp.bfloat16, jnp.float32, True, id="bfloat16-float32-kernel-native"),
        pytest.param(jnp.bfloat16, jnp.float32, False, id="bfloat16-float32-kernel-widened"),
        pytest.param(jnp.bfloat16, jnp.bfloat16, True, id="bfloat16-native"),
        pytest.param(jnp.bfloat16, jnp.bfloat16, False, id="bfloat16-widened"),
    ],
)
def test_products_and_gradients_match_a_float64_reference(
    rows, depth, features, dtype, kernel_dtype, native, monkeypatch
):
    """``x @ kernel`` and both gradients (``g @ kernel.T``, ``x.T @ g``, read transposed in
    place) against float64 products of the same values: within float32's summation error,
    or one bfloat16 rounding; the kernel's gradient in the kernel's dtype, unrounded for a
    float32 kernel. All three products are oneDNN's, bfloat16 ones on its bfloat16 kernels or
    widened to float32."""
    _pin_bf16(monkeypatch, native)
    rng = np.random.default_rng(rows)
    x = jnp.asarray(rng.standard_normal((rows, depth)), dtype)
    kernel = jnp.asarray(rng.standard_normal((depth, features)) * 0.2, kernel_dtype)
    assert onednn.takes_matmul("onednn", x, kernel)
    y, vjp = jax.vjp(jax.jit(onednn.matmul), x, kernel)
    assert y.dtype == dtype
    cotangent = jnp.asarray(rng.standard_normal((rows, features)), dtype)
    d_x, d_kernel = jax.jit(vjp)(cotangent)
    chex.assert_trees_all_equal_dtypes((d_x, d_kernel), (x, kernel))

    x64 = np.asarray(x, np.float64)
    k64 = np.asarray(kernel.astype(dtype), np.float64)  # the product's (rounded) kernel
    g64 = np.asarray(cotangent, np.float64)
    rounded = 1e-5 if dtype == jnp.float32 else EPS
    assert _relative_error(y, x64 @ k64) <= rounded
    assert _relative_error(d_x, g64 @ k64.T) <= rounded
    kernel_rounding = 1e-5 if kernel_dtype == jnp.float32 else EPS
    assert _relative_error(d_kernel, x64.T @ g64) <= kernel_rounding

    text = _compiled_text(lambda x, k, g: jax.vjp(onednn.matmul, x, k)[1](g), x, kernel, cotangent)
    assert text.count(onednn.MATMUL_TARGET) == 2 and " dot(" not in text
    operands = "bf16" if native else "f32"
    results = [operands, "f32" if kernel_dtype == jnp.float32 else operands]  # dx, dkernel
    calls = _custom_calls(text, onednn.MATMUL_TARGET)
    assert sorted(calls) == sorted((r, [operands] * 2) for r in results)
    forward = _compiled_text(onednn.matmul, x, kernel)
    assert forward.count(onednn.MATMUL_TARGET) == 1


@needs_onednn
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["float32", "bfloat16"])
def test_dense_reads_pooled_images_as_their_flattened_rows_in_place(dtype):
    """``Dense`` on (N, H, W, C) images is ``Dense`` on their (N, H*W*C) rows: the same
    parameters, outputs and gradients (the input's in its own shape), on oneDNN's products,
    XLA's, and packed kernels. On oneDNN the program never reshapes the images (XLA:CPU would
    fuse the reshape into the pooling that produces them, several times slower); AlexNet's
    fc6 reads its pooled (N, 6, 6, C) features so."""
    rng = np.random.default_rng(5)
    images = jnp.asarray(rng.standard_normal((5, 3, 3, 8)), dtype)
    rows = images.reshape(5, 72)
    cotangent = jnp.asarray(rng.standard_normal((5, 10)), dtype)
    for mode in ("onednn", "xla"):
        dense = Dense(10, dtype=dtype, cpu_matmuls=mode)
        variables = dense.init(jax.random.PRNGKey(0), images)
        chex.assert_trees_all_equal(variables, dense.init(jax.random.PRNGKey(0), rows))
        chex.assert_shape(variables["params"]["kernel"], (72, 10))

        def loss(variables, x, dense=dense):
            return jnp.sum(dense.apply(variables, x).astype(jnp.float32) * cotangent)

        grad = jax.jit(jax.grad(loss, argnums=(0, 1)))
        (d_vars, d_images), (d_vars_rows, d_rows) = grad(variables, images), grad(variables, rows)
        chex.assert_shape(d_images, images.shape)
        chex.assert_trees_all_equal(d_images.reshape(5, 72), d_rows)
        chex.assert_trees_all_equal(d_vars, d_vars_rows)
        chex.assert_trees_all_equal(dense.apply(variables, images), dense.apply(variables, rows))
        compiled = grad.lower(variables, images).compile().as_text()
        assert ("[5,72]" in compiled) == (mode == "xla"), mode  # the images as rows
    kernel = variables["params"]["kernel"].astype(dtype)
    packed = onednn.pack(kernel)
    chex.assert_trees_all_equal(
        onednn.packed_matmul(images, packed, 10), onednn.packed_matmul(rows, packed, 10)
    )
    assert onednn.takes_matmul("onednn", images, kernel)
    assert not onednn.takes_matmul("onednn", images[:, :2], kernel)  # 48 values a row, not 72

    model = AlexNet(num_classes=10, variant="torchvision", width_divisor=8, dtype=dtype)
    x = jnp.zeros((2, 64, 64, 3), dtype)
    model_vars = model.init(jax.random.PRNGKey(0), x)
    chex.assert_shape(model_vars["params"]["fc6"]["kernel"], (6 * 6 * 32, 512))
    assert "[2,1152]" not in _compiled_text(model.apply, model_vars, x)


@needs_onednn
def test_dense_xla_mode_and_other_platforms_hold_no_custom_call():
    """``layers.Dense(cpu_matmuls="xla")`` (exports) lowers to XLA's products alone; lowered
    for a GPU, ``auto`` is plain ``dot_general``s (cuBLAS), forward and backward."""
    x = jnp.zeros((4, 24), jnp.float32)

    def grads(mode):
        dense = Dense(8, cpu_matmuls=mode)
        variables = dense.init(jax.random.PRNGKey(0), x)

        def loss(variables, x):
            return jnp.sum(dense.apply(variables, x) ** 2)

        return jax.jit(jax.grad(loss, argnums=(0, 1))), variables

    fn, variables = grads("auto")
    assert onednn.MATMUL_TARGET in fn.lower(variables, x).as_text()
    fn_xla, _ = grads("xla")
    assert onednn.MATMUL_TARGET not in fn_xla.lower(variables, x).as_text()
    gpu = jax.export.export(fn, platforms=["cuda"])(variables, x).mlir_module()
    assert onednn.MATMUL_TARGET not in gpu and gpu.count("stablehlo.dot_general") >= 3


@needs_onednn
@pytest.mark.parametrize("dtype, native", DTYPES)
def test_packed_kernels_give_the_unpacked_products(dtype, native, monkeypatch):
    """A kernel packed once (``onednn.pack``, laid out for ``PACK_ROWS`` rows, in the dtype its
    products compute in: a bfloat16 kernel widened to float32 where oneDNN's bfloat16 kernels
    are not native) multiplies any number of rows as the unpacked product does, its features
    padded or not; under ``vmap`` each example in turn."""
    _pin_bf16(monkeypatch, native)
    rng = np.random.default_rng(3)
    kernel = jnp.asarray(rng.standard_normal((300, 100)) * 0.2, dtype)
    assert onednn.takes_packing("onednn", kernel)
    packed = onednn.pack(kernel)
    computed = jnp.bfloat16 if native else jnp.float32
    assert packed.ndim == 1 and packed.dtype == computed and packed.size >= kernel.size
    for rows in (1, onednn.PACK_ROWS, 320):
        x = jnp.asarray(rng.standard_normal((rows, 300)), dtype)
        got = jax.jit(onednn.packed_matmul, static_argnums=2)(x, packed, 100)
        expected = onednn.matmul(x, kernel)
        chex.assert_shape(got, (rows, 100))
        assert got.dtype == computed
        assert _relative_error(got, expected) <= (1e-6 if dtype == jnp.float32 else EPS)
    xs = jnp.asarray(rng.standard_normal((3, 5, 300)), dtype)
    by_example = jax.vmap(lambda x: onednn.packed_matmul(x, packed, 100))(xs).astype(dtype)
    expected = jnp.stack([onednn.matmul(x, kernel) for x in xs])
    assert _relative_error(by_example, expected) <= (1e-6 if dtype == jnp.float32 else EPS)


@needs_onednn
@pytest.mark.parametrize("dtype, native", DTYPES)
def test_inference_state_packs_the_dense_kernels_and_keeps_the_logits(dtype, native, monkeypatch):
    """``steps.inference_state`` packs AlexNet's fc6-fc8 kernels for oneDNN (on this CPU),
    and evaluation logits and 10-crop probabilities stay those of XLA's own products; with
    ``config.cpu_matmuls="xla"`` nothing is packed, and VGG-11 (``flax.linen.Dense``) never.
    A network computing in another dtype than the packed kernels' is refused, unless both
    compute in float32 (bfloat16 widened)."""
    _pin_bf16(monkeypatch, native)
    half_precision = dtype == jnp.bfloat16
    config = default_config()
    config.model.variant = "torchvision"
    config.model.width_divisor = 8
    config.image_size = 64
    config.half_precision = half_precision
    model = steps.create_model(config, 10)
    state = steps.create_train_state(jax.random.PRNGKey(0), config, model, (64, 64, 3))
    packed = steps.inference_state(state, config)
    for name in ("fc6", "fc7", "fc8"):
        assert set(packed.params[name]) == {"bias", layers.PACKED_KERNEL}
    images = jax.random.normal(jax.random.PRNGKey(1), (3, 64, 64, 3))
    plain_config = config.copy_and_resolve_references()
    plain_config.cpu_matmuls = "xla"
    plain_model = steps.create_model(plain_config, 10)
    plain = steps.inference_state(state.replace(apply_fn=plain_model.apply), plain_config)
    assert "kernel" in plain.params["fc6"]  # not packed
    got, expected = steps.eval_logits(packed, images), steps.eval_logits(plain, images)
    tolerance = 1e-5 if not half_precision else 0.02
    chex.assert_trees_all_close(got, expected, rtol=tolerance, atol=tolerance)
    crops = images.reshape(1, 3, 64, 64, 3)  # one image's crops, as the 10-crop evaluation
    chex.assert_trees_all_close(
        steps.eval_logits(packed, crops), steps.eval_logits(plain, crops), rtol=0.05, atol=0.05
    )
    packed_dtype = packed.params["fc6"][layers.PACKED_KERNEL].dtype
    assert packed_dtype == (jnp.bfloat16 if half_precision and native else jnp.float32)
    other_dtype = jnp.float32 if half_precision else jnp.bfloat16  # than the network's
    other = AlexNet(num_classes=10, variant="torchvision", width_divisor=8, dtype=other_dtype)
    if onednn.compute_dtype(other_dtype) != packed_dtype:
        with pytest.raises(ValueError, match="cast the parameters before packing"):
            other.apply({"params": packed.params}, images)
    else:  # bfloat16 widened: both networks' products are float32 ones
        chex.assert_shape(other.apply({"params": packed.params}, images), (3, 10))

    vgg = _with(config, half_precision=False)
    vgg.model.name = "vgg11"
    vgg_state = steps.create_train_state(
        jax.random.PRNGKey(0), vgg, steps.create_model(vgg, 10), (64, 64, 3)
    )
    vgg_params = steps.inference_state(vgg_state, vgg).params
    assert all(layers.PACKED_KERNEL not in leaf for leaf in _dicts(vgg_params))


def _with(config, **fields):
    config = config.copy_and_resolve_references()
    for name, value in fields.items():
        config[name] = value
    return config


def _dicts(tree):
    if hasattr(tree, "items"):
        yield tree
        for value in tree.values():
            yield from _dicts(value)
