"""The CPU bf16 fast path's building blocks: matrix products the fast kernels take, and a host
allocator that keeps XLA's buffers.

XLA:CPU (jaxlib 0.10) sends a bf16 x bf16 -> f32 dot to YNNPACK's AMX/AVX512-BF16 kernels only
when both operands sit in the canonical layout: the lhs contracts its last dim, the rhs its first.
Measured at the baseline's shapes ((32768 x 128) @ (128 x 384), 2 cores): such a dot runs at
280-470 GFLOP/s, against 70-140 for the same product in float32. A plain `x.T @ g` or `g @ w.T`
is folded into the dot as a transposed operand, which the fast kernels refuse; XLA then converts
the operands to float32 and the dot runs at 50-70 GFLOP/s, slower than float32 itself. The weight
and input gradients below therefore transpose through a reshape, which XLA cannot fold, so the
transpose becomes a real copy (3-6 ms for 8 MiB) and the dot a fast one.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import math

import jax
import jax.numpy as jnp

# glibc mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4


def keep_host_buffers() -> bool:
    """On a CPU backend, let glibc keep freed memory instead of returning it to the kernel; True
    if it did. It reads the backend, so call it after `jax.distributed.initialize`.

    XLA:CPU allocates each compiled call's temporary buffers anew, and glibc serves blocks over
    32 MiB with fresh mmaps, so every step page-faults its hundreds of MiB of activations in again:
    an elementwise add over a (32768 x 256) float32 array measured 14.8 ms that way, 5.6 ms with
    the memory kept. Nothing numerical changes. Call it before the first compiled call.
    """
    name = ctypes.util.find_library("c")
    if name is None or jax.default_backend() != "cpu":  # device buffers are not malloc's
        return False
    try:
        libc = ctypes.CDLL(name)
        return bool(libc.mallopt(_M_MMAP_MAX, 0)) and bool(libc.mallopt(_M_TRIM_THRESHOLD,
                                                                         2**62))
    except (OSError, AttributeError):  # not glibc
        return False


def transposed(x: jax.Array) -> jax.Array:
    """x (N, M) -> (M, N) as a real copy in row-major layout: see the module's docstring.

    Splitting N in two before the transpose keeps XLA from folding it into the next dot; 64-row
    blocks measured fastest for the copy at the baseline's shapes.
    """
    rows, cols = x.shape
    blocks = math.gcd(rows, 64)
    return x.reshape(blocks, rows // blocks, cols).transpose(2, 0, 1).reshape(cols, rows)


def _dot_f32(lhs: jax.Array, rhs: jax.Array) -> jax.Array:
    return jnp.dot(lhs, rhs, preferred_element_type=jnp.float32)


@jax.custom_vjp
def bf16_matmul(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """x (N, D) @ kernel (D, F) -> (N, F) float32, from bfloat16 operands.

    The gradients are bf16 products accumulated in float32, in canonical layouts; the kernel's
    gradient comes back float32 (the parameter's dtype), x's in x's dtype.
    """
    return _dot_f32(x.astype(jnp.bfloat16), kernel.astype(jnp.bfloat16))


def _matmul_fwd(x: jax.Array, kernel: jax.Array):
    x_bf16, kernel_bf16 = x.astype(jnp.bfloat16), kernel.astype(jnp.bfloat16)
    # A zero-size array carries x's dtype to the backward pass (residuals must be arrays).
    return _dot_f32(x_bf16, kernel_bf16), (x_bf16, kernel_bf16, jnp.zeros((0,), x.dtype))


def _matmul_bwd(residuals, grad: jax.Array):
    x_bf16, kernel_bf16, x_dtype = residuals
    grad_bf16 = grad.astype(jnp.bfloat16)
    d_x = _dot_f32(grad_bf16, transposed(kernel_bf16)).astype(x_dtype.dtype)  # (N, D)
    d_kernel = _dot_f32(transposed(x_bf16), grad_bf16)  # (D, F)
    return d_x, d_kernel


bf16_matmul.defvjp(_matmul_fwd, _matmul_bwd)


def bf16_dense(x: jax.Array, kernel: jax.Array, bias: jax.Array | None = None) -> jax.Array:
    """x (..., D) @ kernel (D, F) (+ bias) -> (..., F) float32, through `bf16_matmul`."""
    flat = bf16_matmul(x.reshape(-1, x.shape[-1]), kernel)
    if bias is not None:
        flat = flat + bias
    return flat.reshape(*x.shape[:-1], kernel.shape[-1])
