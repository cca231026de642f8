"""Mixed precision's products: bfloat16 operands, float32 accumulation and outputs, and gradients
whose products take bfloat16 operands too (the reference's autocast ran every product in half
precision, forward and backward); and a host allocator that keeps XLA's buffers on a CPU.

On a CPU each product is also written in the layout the fast kernels take (`canonical`).
XLA:CPU (jaxlib 0.10 and 0.12 alike) sends a bf16 x bf16 -> f32 dot to YNNPACK's
AVX512-BF16/AMX kernels only when both operands sit in the canonical layout: the lhs contracts its
last dim, the rhs its first (after the batch dims, which lead). Measured at the baseline's shapes
((32768 x 128) @ (128 x 384), 2 cores, jaxlib 0.10): such a dot runs at 280-470 GFLOP/s, against
70-140 for the same product in float32. A plain `x.T @ g` or `g @ w.T` is folded into the dot as
a transposed operand, which the fast kernels refuse; XLA then converts the operands to float32
and the dot runs at 50-70 GFLOP/s, slower than float32 itself. So on a CPU the transposes go
through a reshape, which XLA cannot fold: the transpose becomes a real copy (3-6 ms for 8 MiB)
and the dot a fast one. jax 0.12 did not change this: the same model with plain bf16 dots,
differentiated by jax, took 1.7x (wider) and 1.8x (baseline) the step time of this one. The
attention core's batched products, written as einsums over (B, H, L, K), ran in float32 on XLA's
own kernels at 18-40 GFLOP/s (jax 0.12, wider); `causal_attention` writes them as canonical
batched products over (B*H, L, K). A GPU's libraries take any layout, so there the transposes
stay plain and XLA folds them into the products.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
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


def _transpose(x: jax.Array, canonical: bool) -> jax.Array:
    """The last two dims of x swapped: a real copy where `canonical`, else a plain transpose."""
    if not canonical:
        return jnp.swapaxes(x, -1, -2)
    return transposed(x) if x.ndim == 2 else jax.vmap(transposed)(x)


def _dot_f32(lhs: jax.Array, rhs: jax.Array) -> jax.Array:
    """lhs (..., A, C) @ rhs (..., C, E) -> (..., A, E) float32, any leading dims batched."""
    batch = tuple(range(lhs.ndim - 2))
    return jax.lax.dot_general(lhs, rhs, (((lhs.ndim - 1,), (lhs.ndim - 2,)), (batch, batch)),
                               preferred_element_type=jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def bf16_matmul(x: jax.Array, kernel: jax.Array, canonical: bool) -> jax.Array:
    """x (N, D) @ kernel (D, F) -> (N, F) float32, from bfloat16 operands.

    The gradients are bf16 products accumulated in float32 (in canonical layouts where
    `canonical`); the kernel's gradient comes back float32 (the parameter's dtype), x's in x's
    dtype.
    """
    return _dot_f32(x.astype(jnp.bfloat16), kernel.astype(jnp.bfloat16))


def _matmul_fwd(x: jax.Array, kernel: jax.Array, canonical: bool):
    x_bf16, kernel_bf16 = x.astype(jnp.bfloat16), kernel.astype(jnp.bfloat16)
    # A zero-size array carries x's dtype to the backward pass (residuals must be arrays).
    return _dot_f32(x_bf16, kernel_bf16), (x_bf16, kernel_bf16, jnp.zeros((0,), x.dtype))


def _matmul_bwd(canonical: bool, residuals, grad: jax.Array):
    x_bf16, kernel_bf16, x_dtype = residuals
    grad_bf16 = grad.astype(jnp.bfloat16)
    d_x = _dot_f32(grad_bf16, _transpose(kernel_bf16, canonical)).astype(x_dtype.dtype)  # (N, D)
    d_kernel = _dot_f32(_transpose(x_bf16, canonical), grad_bf16)  # (D, F)
    return d_x, d_kernel


bf16_matmul.defvjp(_matmul_fwd, _matmul_bwd)


def bf16_dense(x: jax.Array, kernel: jax.Array, bias: jax.Array | None = None,
               canonical: bool = True) -> jax.Array:
    """x (..., D) @ kernel (D, F) (+ bias) -> (..., F) float32, through `bf16_matmul`."""
    flat = bf16_matmul(x.reshape(-1, x.shape[-1]), kernel, canonical)
    if bias is not None:
        flat = flat + bias
    return flat.reshape(*x.shape[:-1], kernel.shape[-1])


def causal_softmax(scores: jax.Array, head_dim: int) -> jax.Array:
    """Attention weights (..., L, L) from float32 query-key products (..., L, L): scaled by
    1/sqrt(K), each query masked to itself and the keys before it. Every path of the model."""
    length = scores.shape[-1]
    causal = jnp.tril(jnp.ones((length, length), dtype=bool))
    return jax.nn.softmax(jnp.where(causal, scores / math.sqrt(head_dim), -jnp.inf), axis=-1)


def _attention_forward(q: jax.Array, k: jax.Array, v: jax.Array, canonical: bool
                       ) -> tuple[jax.Array, jax.Array]:
    weights = causal_softmax(_dot_f32(q, _transpose(k, canonical)), q.shape[2])  # (N, L, L)
    return _dot_f32(weights.astype(jnp.bfloat16), v), weights


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def causal_attention(q: jax.Array, k: jax.Array, v: jax.Array, canonical: bool
                     ) -> tuple[jax.Array, jax.Array]:
    """Causal softmax attention over N = B*H independent heads: q, k, v (N, L, K) bfloat16 ->
    the output (N, L, K) and the attention weights (N, L, L), both float32.

    Every product takes bf16 operands (in canonical layouts where `canonical`) and accumulates in
    float32; the scores, the mask and the softmax (and its gradient) stay float32.
    """
    return _attention_forward(q, k, v, canonical)


def _attention_fwd(q: jax.Array, k: jax.Array, v: jax.Array, canonical: bool):
    out, weights = _attention_forward(q, k, v, canonical)
    return (out, weights), (q, k, v, weights)


def _attention_bwd(canonical: bool, residuals, grads):
    q, k, v, weights = residuals
    d_out, d_weights = grads  # d_weights: nonzero only where a loss reads the weights themselves
    d_out = d_out.astype(jnp.bfloat16)
    weights_bf16 = weights.astype(jnp.bfloat16)
    d_v = _dot_f32(_transpose(weights_bf16, canonical), d_out)  # (N, L, K)
    d_weights = _dot_f32(d_out, _transpose(v, canonical)) + d_weights  # (N, L, L)
    # The softmax's gradient, then the scores' 1/sqrt(K); masked entries have weight 0.
    d_scores = weights * (d_weights - jnp.sum(d_weights * weights, axis=-1, keepdims=True))
    d_scores = (d_scores / math.sqrt(q.shape[2])).astype(jnp.bfloat16)
    d_q = _dot_f32(d_scores, k)  # (N, L, K)
    d_k = _dot_f32(_transpose(d_scores, canonical), q)  # (N, L, K)
    return d_q.astype(q.dtype), d_k.astype(k.dtype), d_v.astype(v.dtype)


causal_attention.defvjp(_attention_fwd, _attention_bwd)
