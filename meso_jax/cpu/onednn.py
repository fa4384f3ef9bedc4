"""oneDNN convolutions for XLA:CPU: an optional, faster backend for the models' 2-D convolutions.

On the CPU, XLA runs the models' convolutions with few channels well below the machine's speed (Meso-4's
5x5 8-channel layers at 2/3 of oneDNN's rate, MesoInception-4's dilated 3x3 convolutions on 1-4
channels at ~1 GFLOP/s, weight gradients 2-4x slower than oneDNN's). This module runs those
convolutions (stride 1, SAME padding, any dilation, float32, NHWC/HWIO) with Intel's oneDNN library
through XLA's FFI: ``onednn_conv.cc`` is compiled on first use against the oneDNN wheel
(``onednn-cpu-gomp`` / ``onednn-devel-cpu-gomp``, in requirements.txt for Linux x86-64) and jaxlib's
FFI headers, and kept under $XDG_CACHE_HOME (or ~/.cache)/meso_jax/onednn. The same library offers
``materialize``, a pass-through call that makes XLA compute a value once instead of inside each of
its consumers, and meso_jax.cpu.fast_training's kernels (through ``native_call``): Meso-4's first block in
training (``first_block.cc``) and the later blocks' ReLU, statistics and pooling selection after their
convolution and its gradient (``pool_select.cc``). It is compiled for the CPU it runs on
(``-march=native``; the cache is kept per CPU).

Optional: when the library or a C++ compiler is missing, or the build fails, one info line says why
and XLA's convolution is used (same results to float32 rounding). The engine switch
(meso_jax.engine, ``--engine=xla``) turns it off. Only a single CPU device uses it.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import importlib.metadata
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from meso_jax import engine
from meso_jax.user_cache import cache_root

_SOURCES = tuple(Path(__file__).with_name(name) for name in ("onednn_conv.cc", "first_block.cc", "pool_select.cc"))
_HEADERS = (Path(__file__).with_name("vector8.h"),)  # included by the sources: part of the cache key too
_LIBRARY_DISTRIBUTION, _HEADERS_DISTRIBUTION = "onednn-cpu-gomp", "onednn-devel-cpu-gomp"
_FORWARD, _BACKWARD_DATA, _BACKWARD_WEIGHTS = (
    "MesoOnednnConvForward", "MesoOnednnConvBackwardData", "MesoOnednnConvBackwardWeights")
_MATERIALIZE = "MesoMaterialize"
FIRST_BLOCK_FORWARD, FIRST_BLOCK_BACKWARD = "MesoFirstBlockForward", "MesoFirstBlockBackward"
POOL_SELECT_FORWARD, POOL_SELECT_BACKWARD = "MesoPoolSelectForward", "MesoPoolSelectBackward"
_CONV_DIMENSIONS = ("NHWC", "HWIO", "NHWC")


class BackendUnavailable(Exception):
    """The oneDNN backend cannot be built or loaded here (one-line reason)."""


def _distribution_file(distribution: str, suffix: str) -> Path:
    try:
        files = importlib.metadata.files(distribution) or []
    except importlib.metadata.PackageNotFoundError:
        raise BackendUnavailable(f"the {distribution} package is not installed") from None
    for file in files:
        path = Path(file.locate()).resolve()
        if path.as_posix().endswith(suffix):
            return path
    raise BackendUnavailable(f"the {distribution} package has no {suffix}")


def _source_names() -> str:
    return ", ".join(source.name for source in _SOURCES)


# How the sources are compiled (for the CPU this runs on); tests build variants with the same flags.
COMPILE_FLAGS = ("-O3", "-march=native", "-fopenmp", "-std=c++17", "-shared", "-fPIC", "-w")


def find_compiler() -> str:
    """The C++ compiler the library is built with: $CXX, else g++ or c++ on the PATH."""
    compiler = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if not compiler:
        raise BackendUnavailable("no C++ compiler found (install g++ or set CXX)")
    return compiler


def _build(library: Path, include_dir: Path, library_dir: Path) -> None:
    compiler = find_compiler()
    try:
        library.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=library.parent) as build_dir:
            output = Path(build_dir) / library.name
            command = [compiler, *COMPILE_FLAGS, f"-I{jax.ffi.include_dir()}", f"-I{include_dir}", *map(str, _SOURCES),
                       "-o", str(output), f"-L{library_dir}", "-ldnnl", f"-Wl,-rpath,{library_dir}"]
            result = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)
            if result.returncode != 0:
                first_error = next((line for line in result.stderr.splitlines() if "error" in line),
                                   result.stderr.strip()[:200])
                raise BackendUnavailable(f"building {_source_names()} failed: {first_error}")
            os.replace(output, library)  # atomic: concurrent builders each install a complete file
    except (OSError, subprocess.TimeoutExpired) as error:
        raise BackendUnavailable(f"building {_source_names()} failed: {error}") from None


def _cpu_features() -> bytes:
    """What -march=native compiles for (the CPU's model and instruction-set flags), for the cache key."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor().encode()
    return "\n".join(sorted({line for line in lines if line.startswith(("model name", "flags"))})).encode()


@functools.cache
def _load() -> None:
    """Builds (once per source and library versions) and loads the library, registering its calls."""
    header = _distribution_file(_HEADERS_DISTRIBUTION, "oneapi/dnnl/dnnl.hpp")
    shared_object = _distribution_file(_LIBRARY_DISTRIBUTION, "lib/libdnnl.so")
    key = hashlib.sha256(b"\0".join([
        *(source.read_bytes() for source in (*_SOURCES, *_HEADERS)), jax.ffi.include_dir().encode(),
        importlib.metadata.version("jaxlib").encode(), importlib.metadata.version(_LIBRARY_DISTRIBUTION).encode(),
        str(shared_object).encode(), _cpu_features()])).hexdigest()[:16]
    library = cache_root() / "onednn" / key / "libmeso_onednn.so"
    if not library.exists():
        _build(library, header.parents[2], shared_object.parent)
    try:
        handle = ctypes.cdll.LoadLibrary(str(library))
    except OSError as error:
        raise BackendUnavailable(f"loading {library} failed: {error}") from None
    for target in (_FORWARD, _BACKWARD_DATA, _BACKWARD_WEIGHTS, _MATERIALIZE, FIRST_BLOCK_FORWARD,
                   FIRST_BLOCK_BACKWARD, POOL_SELECT_FORWARD, POOL_SELECT_BACKWARD):
        jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(handle, target)), platform="cpu")


@functools.cache
def unavailable_reason() -> str | None:
    """Why the library cannot be built or loaded here (tried once), None when it can."""
    try:
        _load()
    except BackendUnavailable as reason:
        return str(reason)
    return None


@functools.cache
def available() -> bool:
    """Whether the library builds and loads here (tried once; when it does not, one info line says why
    and XLA's convolutions are used)."""
    reason = unavailable_reason()
    if reason is not None:
        logging.info("oneDNN convolutions unavailable (%s); using XLA's, which is slower on a CPU", reason)
    return reason is None


def enabled() -> bool:
    """Whether convolutions traced now go through oneDNN: on the CPU backend with one device when the
    engine allows the native paths (meso_jax.engine) and ``available()``. With several devices XLA would
    gather a sharded batch onto every device before the call (it cannot split a custom call), so XLA's
    convolution is used there."""
    if jax.default_backend() != "cpu" or jax.device_count() > 1:
        return False
    return engine.native() and available()


@jax.custom_jvp
def materialize(x: jax.Array) -> jax.Array:
    """``x`` unchanged, computed once into memory: XLA cannot fuse its producer into its consumers.
    Differentiable (the identity's derivative)."""
    _load()
    return jax.ffi.ffi_call(_MATERIALIZE, jax.ShapeDtypeStruct(x.shape, x.dtype), vmap_method="sequential",
                            input_output_aliases={0: 0})(x)


@materialize.defjvp
def _materialize_jvp(primals, tangents):
    return materialize(primals[0]), tangents[0]


def native_call(target: str, result_shapes: tuple[jax.ShapeDtypeStruct, ...], *operands: jax.Array
                ) -> tuple[jax.Array, ...]:
    """Calls one of the library's other FFI targets (e.g. FIRST_BLOCK_FORWARD) on float32 operands."""
    _load()
    return jax.ffi.ffi_call(target, result_shapes, vmap_method="sequential")(*operands)


def _call(target: str, result_shape: tuple[int, ...], dilation: int, *operands: jax.Array) -> jax.Array:
    _load()  # registers the targets (once); raises BackendUnavailable where it cannot
    return jax.ffi.ffi_call(target, jax.ShapeDtypeStruct(result_shape, jnp.float32), vmap_method="sequential")(
        *operands, dilation=np.int64(dilation))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def conv2d_same(x_bhwc: jax.Array, kernel_hwio: jax.Array, dilation: int = 1) -> jax.Array:
    """SAME, stride-1 convolution of float32 ``x_bhwc`` with ``kernel_hwio`` (k, k, Cin, Cout) dilated by
    ``dilation``, computed by oneDNN (forward and both gradients). Raises BackendUnavailable where
    ``available()`` is false; ``conv_general_dilated`` picks it or XLA's by itself."""
    return _call(_FORWARD, (*x_bhwc.shape[:3], kernel_hwio.shape[3]), dilation, x_bhwc, kernel_hwio)


def _conv2d_forward(x_bhwc, kernel_hwio, dilation):
    return conv2d_same(x_bhwc, kernel_hwio, dilation), (x_bhwc, kernel_hwio)


def _conv2d_backward(dilation, residuals, grad_y):
    x_bhwc, kernel_hwio = residuals
    if dilation == 1 and _column_pairs_pay_for_the_data_gradient(x_bhwc.shape, kernel_hwio.shape):
        grad_x = _data_gradient_on_column_pairs(grad_y, kernel_hwio, x_bhwc.shape)
    else:
        grad_x = _call(_BACKWARD_DATA, x_bhwc.shape, dilation, grad_y, kernel_hwio)
    grad_kernel = _call(_BACKWARD_WEIGHTS, kernel_hwio.shape, dilation, x_bhwc, grad_y)
    return grad_x, grad_kernel


conv2d_same.defvjp(_conv2d_forward, _conv2d_backward)


# oneDNN's AVX-512 convolutions compute channels in blocks of 16: with 8 output channels (Meso-4's second
# block) half of each block is padding, and the forward and both gradients run at half the machine's rate.
# Seen with two neighbouring columns side by side in the channel axis (a free reshape in NHWC), the same
# convolution has 16 output channels (see _column_pair_kernel).
_COLUMN_PAIRED_CHANNELS = 8


def _column_pair_kernel(kernel_hwio: jax.Array) -> jax.Array:
    """The kernel of the same SAME, stride-1 convolution on column pairs: an input (B, H, W, Cin) read as
    (B, H, W/2, 2*Cin) and an output (B, H, W/2, 2*Cout), channel index = column parity * C + channel.
    (kh, kw, Cin, Cout) with kw odd -> (kh, 2*r + 1, 2*Cin, 2*Cout), r = ((kw - 1) // 2 + 1) // 2: output
    column 2j + po reads input column 2(j + q) + pi with kernel column kx = 2q + pi - po + (kw - 1) // 2,
    zero where that falls outside the kernel. Built by a 0/1 selection (exact; its gradient sums the
    copies of each kernel entry)."""
    kernel_h, kernel_w, in_channels, out_channels = kernel_hwio.shape
    half, reach = (kernel_w - 1) // 2, ((kernel_w - 1) // 2 + 1) // 2
    selection = np.zeros((2 * reach + 1, kernel_w, 2, 2), np.float32)  # [pair tap, kernel column, pi, po]
    for pair_tap in range(2 * reach + 1):
        for in_parity in range(2):
            for out_parity in range(2):
                column = 2 * (pair_tap - reach) + in_parity - out_parity + half
                if 0 <= column < kernel_w:
                    selection[pair_tap, column, in_parity, out_parity] = 1.0
    paired = jnp.einsum("yxio,qxpr->yqpiro", kernel_hwio, selection)
    return paired.reshape(kernel_h, 2 * reach + 1, 2 * in_channels, 2 * out_channels)


def _column_pairs_pay(x_shape: tuple[int, ...], kernel_shape: tuple[int, ...]) -> bool:
    """Whether an undilated convolution runs faster on column pairs: 8 input and output channels, odd
    kernel width, even image width."""
    return (x_shape[3] == kernel_shape[3] == _COLUMN_PAIRED_CHANNELS and kernel_shape[1] % 2 == 1
            and x_shape[2] % 2 == 0)


def _column_pairs_pay_for_the_data_gradient(x_shape: tuple[int, ...], kernel_shape: tuple[int, ...]) -> bool:
    """Whether the input's gradient of an undilated convolution runs faster on column pairs: it has 8
    channels (e.g. Meso-4's 8 -> 16 block: 4.8 -> 3.4 ms at batch 32; its forward and kernel gradient,
    with 16 output channels, are faster as they are), odd kernel width, even image width."""
    return x_shape[3] == _COLUMN_PAIRED_CHANNELS and kernel_shape[1] % 2 == 1 and x_shape[2] % 2 == 0


def _data_gradient_on_column_pairs(grad_y: jax.Array, kernel_hwio: jax.Array, x_shape: tuple[int, ...]
                                   ) -> jax.Array:
    """conv2d_same's gradient with respect to its input, computed on column pairs (_column_pair_kernel)."""
    batch, height, width, in_channels = x_shape
    pairs = materialize(grad_y).reshape(batch, height, width // 2, 2 * grad_y.shape[3])
    grad_pairs = _call(_BACKWARD_DATA, (batch, height, width // 2, 2 * in_channels), 1, pairs,
                       _column_pair_kernel(kernel_hwio))
    return grad_pairs.reshape(x_shape)


def _conv_on_column_pairs(x_bhwc: jax.Array, kernel_hwio: jax.Array) -> jax.Array:
    """conv2d_same(x_bhwc, kernel_hwio), computed on column pairs (_column_pair_kernel)."""
    batch, height, width, in_channels = x_bhwc.shape
    # In memory first: XLA would otherwise fuse the reshape into the producer's loop, slowing it down
    # several times (Meso-4's first block: 7 -> 57 ms).
    pairs = materialize(x_bhwc).reshape(batch, height, width // 2, 2 * in_channels)
    y = conv2d_same(pairs, _column_pair_kernel(kernel_hwio), 1)
    return y.reshape(batch, height, width, kernel_hwio.shape[3])


def _same_padding(padding, kernel_shape: tuple[int, ...], dilation: int) -> bool:
    if isinstance(padding, str):
        return padding.upper() == "SAME"
    extents = [dilation * (size - 1) for size in kernel_shape]
    return [tuple(pair) for pair in padding] == [(extent // 2, extent - extent // 2) for extent in extents]


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                         dimension_numbers=None, feature_group_count=1, batch_group_count=1, precision=None,
                         preferred_element_type=None) -> jax.Array:
    """``jax.lax.conv_general_dilated`` (a drop-in, e.g. for ``flax.linen.Conv(conv_general_dilated=...)``)
    that runs on oneDNN when ``enabled()`` and the call is one it computes: 2-D, float32, stride 1, SAME,
    equal dilation on both axes, no input dilation or groups, NHWC/HWIO. Anything else goes to XLA."""
    arguments = dict(lhs_dilation=lhs_dilation, rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
                     feature_group_count=feature_group_count, batch_group_count=batch_group_count,
                     precision=precision, preferred_element_type=preferred_element_type)
    if lhs.ndim == 4 and rhs.ndim == 4 and enabled():
        dilations = tuple(rhs_dilation or (1, 1))
        expected_dimensions = jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, _CONV_DIMENSIONS)
        if (lhs.dtype == rhs.dtype == jnp.float32 and preferred_element_type in (None, jnp.float32)
                and tuple(window_strides) == (1, 1) and tuple(lhs_dilation or (1, 1)) == (1, 1)
                and dilations[0] == dilations[1] and feature_group_count == batch_group_count == 1
                and jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers) == expected_dimensions
                and _same_padding(padding, rhs.shape[:2], dilations[0])):
            if dilations[0] == 1 and _column_pairs_pay(lhs.shape, rhs.shape):
                return _conv_on_column_pairs(lhs, rhs)
            return conv2d_same(lhs, rhs, dilations[0])
    return jax.lax.conv_general_dilated(lhs, rhs, window_strides, padding, **arguments)


__all__ = ["BackendUnavailable", "available", "conv2d_same", "conv_general_dilated", "enabled", "unavailable_reason"]
