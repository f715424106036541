"""oneDNN's convolutions and matrix products on the CPU, called from XLA through FFI handlers.

XLA:CPU (jax 0.10-0.11) runs convolutions on Eigen's kernels, and bfloat16 ones in float32;
PyTorch runs them on oneDNN's, with AVX-512 and AVX512-BF16 (or AMX) where the CPU has them.
``conv2d`` hands each pass of a convolution (forward, input gradient, kernel gradient) to
oneDNN instead: the same kernels PyTorch's ``channels_last`` convolutions run, on our NHWC
images, with the kernel reordered into oneDNN's layout at each call (as PyTorch's eager mode
does). ``matmul`` does the same for the dense layers' products, which XLA:CPU hands to
YNNPACK or Eigen: oneDNN's matmul, as PyTorch's ``linear`` runs, reads the operands where
they lie (the gradients' transposes included) and writes a float32 kernel gradient of
bfloat16 operands without rounding it. ``benchmarks/README.md`` has the measurements.

bfloat16 runs on oneDNN's bfloat16 kernels where the CPU has bfloat16 arithmetic
(AVX512-BF16, AMX, AVX2-VNNI-2: ``native_bf16``). Elsewhere oneDNN would emulate it, 2.5-4x
slower than its own float32 kernels (an AVX-512 Ice Lake Xeon without AVX512-BF16), so the
bfloat16 operands are widened to float32, exactly, multiplied on the float32 kernels and the
result rounded once to bfloat16: the numbers a native bfloat16 kernel gives (which also
accumulates in float32 and rounds once), at float32 speed (``compute_dtype``).

The handlers (``csrc/onednn.cc``) are compiled on first use with the machine's C++
compiler (``$CXX``, else ``c++``) against the jaxlib headers and the oneDNN the
``onednn-cpu-gomp`` and ``onednn-devel-cpu-gomp`` packages install (or ``$DNNLROOT``), and
kept in ``$ALEXNET_JAX_CACHE`` (default ``~/.cache/alexnet_jax``) under a name that changes
with the source, jaxlib and oneDNN, beside its SHA-256 (a file that does not match is built
again); later processes load it in milliseconds. oneDNN's GNU OpenMP threads are loaded to
sleep between calls (``OMP_WAIT_POLICY=PASSIVE``, unless the user set a policy), so they
leave the cores to XLA's threads between them.

``config.cpu_convolutions`` (``layers.Conv``'s ``cpu_convolutions``) and
``config.cpu_matmuls`` (``layers.Dense``'s ``cpu_matmuls``) each choose:

- ``auto``: oneDNN where it can be built and loaded, on a machine whose default JAX backend
  is the CPU; otherwise XLA's own, with one warning that says why.
- ``onednn``: the same, but a handler that cannot be built is an error.
- ``xla``: never; only XLA's own operations. ``python -m alexnet_jax.export`` uses this: a
  custom call cannot be serialized to StableHLO, a SavedModel or ONNX.

The choice is made per platform when a program is lowered (``lax.platform_dependent``): a
program lowered for a GPU runs ``lax.conv_general_dilated`` (cuDNN) and ``lax.dot_general``
(cuBLAS) and holds no custom call.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import math
import os
import shutil
import site
import subprocess
import sys
import sysconfig
import tempfile
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import jaxlib

from alexnet_jax.errors import UserError
from alexnet_jax.files import atomic_write

MODES = ("auto", "onednn", "xla")
TARGET = "alexnet_jax_onednn_conv"
MATMUL_TARGET = "alexnet_jax_onednn_matmul"
PACK_TARGET = "alexnet_jax_onednn_pack"
PACKED_MATMUL_TARGET = "alexnet_jax_onednn_packed_matmul"
SOURCE = os.path.join(os.path.dirname(__file__), "csrc", "onednn.cc")

log = logging.getLogger(__name__)


class OnednnUnavailable(UserError, RuntimeError):
    """The oneDNN handler cannot be built or loaded here (the message says why)."""


def cache_dir() -> str:
    """Where built handlers are kept: ``$ALEXNET_JAX_CACHE`` or ``~/.cache/alexnet_jax``."""
    root = os.environ.get("ALEXNET_JAX_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "alexnet_jax"
    )
    return os.path.join(root, "onednn")


def _prefixes() -> list[str]:
    """Install prefixes that may hold oneDNN's ``include/`` and ``lib/``, first match wins."""
    prefixes = [os.environ.get("DNNLROOT", ""), sysconfig.get_path("data"), sys.prefix]
    prefixes.append(site.getuserbase())  # pip install --user
    return [p for p in dict.fromkeys(prefixes) if p]


def find_onednn() -> tuple[str, str]:
    """``(include directory, libdnnl.so path)`` of oneDNN 3, or ``OnednnUnavailable``."""
    for prefix in _prefixes():
        include = os.path.join(prefix, "include")
        header = os.path.join(include, "oneapi", "dnnl", "dnnl.hpp")
        for lib in ("lib", "lib64"):
            library = os.path.join(prefix, lib, "libdnnl.so.3")
            if os.path.isfile(header) and os.path.isfile(library):
                return include, library
    raise OnednnUnavailable(
        "oneDNN 3 (include/oneapi/dnnl/dnnl.hpp and lib/libdnnl.so.3) was not found under "
        f"{', '.join(_prefixes())}; pip install onednn-cpu-gomp onednn-devel-cpu-gomp, or "
        "set DNNLROOT"
    )


def build(out_dir: str | None = None) -> str:
    """The handlers' shared library for this source, jaxlib and oneDNN: compiled once into
    ``out_dir`` (default ``cache_dir()``), atomically, and reused after."""
    include, library = find_onednn()
    compiler = shutil.which(os.environ.get("CXX", "c++"))
    if compiler is None:
        raise OnednnUnavailable(
            f"no C++ compiler ({os.environ.get('CXX', 'c++')!r} is not on PATH; set CXX or "
            "install g++) to build oneDNN's handlers"
        )
    with open(SOURCE, "rb") as f:
        source = f.read()
    stat = os.stat(library)
    fingerprint = hashlib.sha256(
        b"\0".join(
            [
                source,
                jax.ffi.include_dir().encode(),
                jaxlib.__version__.encode(),
                jax.__version__.encode(),
                os.path.realpath(library).encode(),
                str((stat.st_size, stat.st_mtime_ns)).encode(),
                compiler.encode(),
            ]
        )
    ).hexdigest()[:16]
    out_dir = out_dir or cache_dir()
    path = os.path.join(out_dir, f"onednn-{fingerprint}.so")
    if _intact(path):
        return path
    try:
        os.makedirs(out_dir, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=out_dir, suffix=".so.tmp", delete=False)
    except OSError:  # a read-only cache: build in a private temporary folder instead
        out_dir = tempfile.mkdtemp(prefix="alexnet_jax_onednn_")
        path = os.path.join(out_dir, os.path.basename(path))
        probe = tempfile.NamedTemporaryFile(dir=out_dir, suffix=".so.tmp", delete=False)
    probe.close()
    command = [
        compiler, "-O2", "-std=c++17", "-shared", "-fPIC", "-Wno-return-type",
        f"-I{jax.ffi.include_dir()}", f"-I{include}", SOURCE, "-o", probe.name,
        library, f"-Wl,-rpath,{os.path.dirname(library)}",
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        os.unlink(probe.name)
        tail = "\n".join(result.stderr.strip().splitlines()[-15:])
        raise OnednnUnavailable(f"building {SOURCE} failed ({' '.join(command)}):\n{tail}")
    with open(probe.name, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    os.replace(probe.name, path)  # atomic: concurrent builders each leave a whole file
    atomic_write(path + ".sha256", digest)  # then its digest: a build without one is redone
    return path


def _intact(path: str) -> bool:
    """Whether ``path`` is a whole build: its bytes match the digest written after it. A
    cached file cut short or overwritten (a full disk, a copied cache) would crash the
    process that loads it (SIGBUS), so it is built again instead."""
    try:
        with open(path, "rb") as f, open(path + ".sha256") as digest:
            return hashlib.sha256(f.read()).hexdigest() == digest.read().strip()
    except OSError:
        return False


@functools.cache
def _library() -> ctypes.CDLL:
    """Builds (once per machine) and loads the handlers, registering them with XLA for the
    CPU. Raises ``OnednnUnavailable`` (again on each call: the failure is not cached)."""
    path = build()
    # GNU OpenMP reads its settings once, when it is loaded (here, with oneDNN, unless another
    # library loaded it first). By default its threads spin after each parallel region, on
    # the cores XLA's own threads need for the next operations: the torchvision fp32 train
    # step ran 34 images/s with spinning threads, 40-42 with sleeping ones (benchmarks/
    # README.md). A user's own OMP_WAIT_POLICY or GOMP_SPINCOUNT is kept, and the process's
    # environment is restored after loading.
    passive = not any(os.environ.get(v) for v in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT"))
    if passive:
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    try:
        library = ctypes.CDLL(path)
    except OSError as e:
        raise OnednnUnavailable(f"cannot load {path}: {e}") from e
    finally:
        if passive:
            del os.environ["OMP_WAIT_POLICY"]
    handlers = {
        TARGET: library.AlexnetOnednnConv,
        MATMUL_TARGET: library.AlexnetOnednnMatmul,
        PACK_TARGET: library.AlexnetOnednnPack,
        PACKED_MATMUL_TARGET: library.AlexnetOnednnPackedMatmul,
    }
    for name, handler in handlers.items():
        jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(handler), "cpu")
    library.AlexnetOnednnPackedBytes.restype = ctypes.c_int64
    library.AlexnetOnednnPackedBytes.argtypes = [ctypes.c_int64] * 3 + [ctypes.c_int]
    return library


@functools.cache
def _load() -> bool:
    """``_library()``, then whether this CPU computes bfloat16 natively in oneDNN (its
    bfloat16 instructions, and kernels of oneDNN's own for them: not emulation, not its
    reference loops)."""
    return bool(_library().AlexnetOnednnNativeBf16())


def native_bf16() -> bool:
    """Whether oneDNN multiplies bfloat16 on this CPU's own bfloat16 instructions (AVX512-BF16,
    AMX or AVX2-VNNI-2). Needs the handlers ``available``."""
    return _load()


def compute_dtype(dtype) -> jnp.dtype:
    """The dtype oneDNN computes ``dtype`` operands in here: ``dtype`` itself, but float32 for
    bfloat16 on a CPU without bfloat16 arithmetic (``native_bf16``), where oneDNN's bfloat16
    kernels emulate it 2.5-4x slower than its float32 ones. Widening bfloat16 is exact and
    the result is rounded once, so the numbers are a bfloat16 kernel's (float32 sums, one
    rounding), in another order of summation. Needs the handlers ``available``."""
    dtype = jnp.dtype(dtype)
    if dtype == jnp.bfloat16 and not native_bf16():
        return jnp.dtype(jnp.float32)
    return dtype


@functools.cache
def _warn_once(reason: str) -> None:
    log.warning(
        "oneDNN's convolutions and products are unavailable, XLA's are used (slower): %s", reason
    )


def available(mode: str = "onednn", field: str = "cpu_convolutions") -> bool:
    """Whether the handlers are built and loaded (building them on first use) under ``mode``
    (``config.cpu_convolutions`` or ``config.cpu_matmuls``, the ``field`` an unknown mode is
    named by), on a machine whose default backend is the CPU. With ``onednn`` a handler that
    cannot be built raises ``OnednnUnavailable``; with ``auto`` it is one logged warning and
    ``False``; ``xla`` is always ``False``."""
    if mode not in MODES:
        raise ValueError(f"{field}={mode!r}: choose one of {MODES}")
    if mode == "xla" or jax.default_backend() != "cpu":
        return False
    try:
        _load()
    except OnednnUnavailable as e:
        if mode == "onednn":
            raise
        _warn_once(str(e))
        return False
    return True


def _runs(mode: str, field: str, shaped: bool) -> bool:
    """The tail of the ``takes`` checks: an operation ``shaped`` for a handler runs on it when
    the handlers are ``available`` under ``mode`` (bfloat16 in ``compute_dtype``)."""
    return shaped and available(mode, field)


def takes(
    mode: str,
    x: jax.Array,
    kernel: jax.Array,
    strides: Sequence[int],
    padding: Sequence[Sequence[int]],
    feature_group_count: int,
) -> bool:
    """Whether ``conv2d`` should run this convolution on the CPU under ``mode``: the handler
    is ``available``, and the convolution is 4-D, float32 or bfloat16 in both operands, in
    whole groups, with non-negative padding and at least one output pixel."""
    types = (jnp.float32, jnp.bfloat16)
    shaped = (
        x.ndim == 4
        and kernel.ndim == 4
        and x.dtype == kernel.dtype
        and x.dtype in types
        and len(strides) == 2
        and all(s >= 1 for s in strides)
        and len(padding) == 2
        and all(lo >= 0 and hi >= 0 for lo, hi in padding)
        and feature_group_count >= 1
        and kernel.shape[2] * feature_group_count == x.shape[-1]
        and kernel.shape[-1] % feature_group_count == 0
        and all(
            size + lo + hi >= k
            for size, (lo, hi), k in zip(x.shape[1:3], padding, kernel.shape[:2], strict=True)
        )
    )
    return _runs(mode, "cpu_convolutions", shaped)


def _handler(target, shape, dtype, a, b, **attributes):
    """The ``target`` handler on operands ``a`` and ``b`` of one dtype, computed in its
    ``compute_dtype`` (bfloat16 widened to float32 where the CPU lacks bfloat16 arithmetic),
    its result ``shape`` in ``dtype``. Under ``vmap`` each example in turn."""
    compute = compute_dtype(a.dtype)
    result = jax.ShapeDtypeStruct(shape, compute if compute != a.dtype else dtype)
    out = jax.ffi.ffi_call(target, result, vmap_method="sequential")(
        a.astype(compute), b.astype(compute), **attributes
    )
    return out.astype(dtype)


def _call(which, a, b, result, strides, padding, groups):
    """Pass ``which`` of the handler (0 forward, 1 input gradient, 2 kernel gradient), its
    result shaped and typed as ``result``."""
    (top, bottom), (left, right) = padding
    return _handler(
        TARGET, result.shape, result.dtype, a, b, which=which, stride_h=strides[0],
        stride_w=strides[1], pad_top=top, pad_bottom=bottom, pad_left=left, pad_right=right,
        groups=groups,
    )  # fmt: skip


def _output_shape(x, kernel, strides, padding):
    n, h, w, _ = x.shape
    kh, kw, _, features = kernel.shape
    (top, bottom), (left, right) = padding
    return (
        n,
        (h + top + bottom - kh) // strides[0] + 1,
        (w + left + right - kw) // strides[1] + 1,
        features,
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def conv2d(
    x: jax.Array,
    kernel: jax.Array,
    strides: Sequence[int],
    padding: Sequence[Sequence[int]],
    feature_group_count: int = 1,
) -> jax.Array:
    """``lax.conv_general_dilated`` (NHWC, HWIO, NHWC) on oneDNN, its result in ``x``'s dtype.
    Needs the handler loaded first (``takes``); lowers for the CPU only."""
    return _forward(x, kernel, strides, padding, feature_group_count)[0]


def _forward(x, kernel, strides, padding, groups):
    y = jax.ShapeDtypeStruct(_output_shape(x, kernel, strides, padding), x.dtype)
    return _call(0, x, kernel, y, strides, padding, groups), (x, kernel)


def _backward(strides, padding, groups, residuals, g):
    x, kernel = residuals
    g = g.astype(x.dtype)
    # XLA drops whichever pass nobody reads (conv1's input gradient).
    dx = _call(1, g, kernel, x, strides, padding, groups)
    dkernel = _call(2, x, g, kernel, strides, padding, groups)
    return dx, dkernel


conv2d.defvjp(_forward, _backward)


def takes_matmul(mode: str, x: jax.Array, kernel: jax.Array) -> bool:
    """Whether ``matmul`` should run ``x @ kernel`` on the CPU under ``mode``: the handler is
    ``available``, ``x`` is ``(rows, K)`` (or ``(rows, ...)``, read as its rows flattened, of
    K values each) and ``kernel`` ``(K, features)``, none of them 0, and ``x`` is float32 with
    a float32 kernel or bfloat16 with a float32 or bfloat16 one."""
    shaped = (
        x.ndim >= 2
        and kernel.ndim == 2
        and all(isinstance(d, int) and d > 0 for d in (*x.shape, kernel.shape[1]))
        and math.prod(x.shape[1:]) == kernel.shape[0]
        and (
            (x.dtype == jnp.float32 and kernel.dtype == jnp.float32)
            or (x.dtype == jnp.bfloat16 and kernel.dtype in (jnp.float32, jnp.bfloat16))
        )
    )
    return _runs(mode, "cpu_matmuls", shaped)


def _as_matrix(shape):
    return shape[0], math.prod(shape[1:])


def _multiply(a, b, result_dtype, transpose_a=False, transpose_b=False, result_shape=None):
    """``op(a) @ op(b)`` on oneDNN, ``op`` transposing where asked, each operand read as the
    matrix of its rows flattened (the handler's ``AsMatrix``); the result in
    ``result_dtype``, shaped ``result_shape`` (by default the product's ``(rows, columns)``)."""
    a_rows, a_cols = _as_matrix(a.shape)
    b_rows, b_cols = _as_matrix(b.shape)
    shape = (a_cols if transpose_a else a_rows, b_rows if transpose_b else b_cols)
    return _handler(
        MATMUL_TARGET, result_shape or shape, result_dtype, a, b,
        transpose_a=int(transpose_a), transpose_b=int(transpose_b),
    )  # fmt: skip


@jax.custom_vjp
def matmul(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """``x @ kernel`` on oneDNN, in ``x``'s dtype: a float32 kernel for bfloat16 ``x`` is
    rounded to bfloat16 first, and the product accumulates in float32. ``x`` may have more
    than two dimensions: ``(rows, ...)`` multiplies as ``x.reshape(rows, -1)``, with no reshape
    in the program. The kernel's gradient comes back in the kernel's own dtype (for a float32
    kernel, unrounded), the input's in ``x``'s dtype and shape. Needs the handler loaded first
    (``takes_matmul``); lowers for the CPU only."""
    return _matmul_forward(x, kernel)[0]


def _matmul_forward(x, kernel):
    narrow = kernel.astype(x.dtype)
    # The last residual carries only the kernel's dtype.
    return _multiply(x, narrow, x.dtype), (x, narrow, jnp.zeros((0,), kernel.dtype))


def _matmul_backward(residuals, g):
    x, narrow, kernel_dtype = residuals
    g = g.astype(x.dtype)
    dx = _multiply(g, narrow, x.dtype, transpose_b=True, result_shape=x.shape)  # g @ kernel.T
    dkernel = _multiply(x, g, kernel_dtype.dtype, transpose_a=True)  # x.T @ g
    return dx, dkernel


matmul.defvjp(_matmul_forward, _matmul_backward)


# Packed kernels are laid out for products of this many rows; oneDNN's optimized kernels
# take the same layout for other row counts (else ``packed_matmul`` reorders at each call).
PACK_ROWS = 32


def takes_packing(mode: str, kernel: jax.Array) -> bool:
    """Whether ``pack`` should pack ``kernel`` for inference under ``mode``: a concrete 2-D
    float32 or bfloat16 array, on a machine where the handler is ``available``."""
    shaped = (
        kernel.ndim == 2
        and all(isinstance(d, int) and d > 0 for d in kernel.shape)
        and kernel.dtype in (jnp.float32, jnp.bfloat16)
    )
    return _runs(mode, "cpu_matmuls", shaped)


def pack(kernel: jax.Array) -> jax.Array:
    """A ``(K, N)`` kernel in the layout oneDNN's matmul reads fastest, for inference: a flat
    array that only ``packed_matmul`` reads (PyTorch's frozen inference prepacks its weights
    likewise), of the dtype its products compute in (``compute_dtype``: a bfloat16 kernel is
    packed widened to float32 on a CPU without bfloat16 arithmetic). Needs
    ``takes_packing``; runs on the CPU."""
    return _pack(kernel.astype(compute_dtype(kernel.dtype)))


@jax.jit
def _pack(kernel: jax.Array) -> jax.Array:
    k, n = kernel.shape
    size = _library().AlexnetOnednnPackedBytes(PACK_ROWS, k, n, int(kernel.dtype == jnp.bfloat16))
    if size <= 0:
        raise OnednnUnavailable(f"oneDNN cannot pack a {kernel.dtype} kernel of shape {(k, n)}")
    result = jax.ShapeDtypeStruct((size // kernel.dtype.itemsize,), kernel.dtype)
    return jax.ffi.ffi_call(PACK_TARGET, result)(kernel, rows=PACK_ROWS)


def packed_matmul(x: jax.Array, packed: jax.Array, features: int) -> jax.Array:
    """``x @ kernel`` for ``packed = pack(kernel)`` of a ``(K, features)`` kernel, in the packed
    kernel's dtype (``x`` is cast to it: for a kernel packed widened, the result is float32,
    to be rounded by the caller); ``x`` is ``(rows, K)``, or ``(rows, ...)`` read as its rows
    flattened (as ``matmul``). Inference only: it has no gradient. Lowers for the CPU
    only."""
    x = x.astype(packed.dtype)
    result = jax.ShapeDtypeStruct((x.shape[0], features), packed.dtype)
    return jax.ffi.ffi_call(PACKED_MATMUL_TARGET, result, vmap_method="sequential")(
        x, packed, rows=PACK_ROWS, features=features
    )
