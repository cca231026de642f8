"""Mixed precision's products: bfloat16 operands, float32 accumulation and outputs, and gradients
whose products take bfloat16 operands too (the reference's autocast ran every product in half
precision, forward and backward); and a host allocator that keeps XLA's buffers on a CPU.

On a CPU each product is also written in the layout the fast kernels take (`canonical`):
XLA:CPU sends a bf16 x bf16 -> f32 dot to its fast bf16 kernels only when both operands sit in
the canonical layout, the lhs contracting its last dim and the rhs its first (after the batch
dims, which lead). A plain `x.T @ g` or `g @ w.T` is folded into the dot as a transposed operand,
which those kernels refuse, and the dot then runs slower than float32. So on a CPU the transposes
go through a reshape that XLA cannot fold: the transpose becomes a real copy and the dot a fast
one; the attention core's batched products run as canonical batched products over (B*H, L, K).
A GPU's libraries take any layout, so there the transposes stay plain and XLA folds them into the
products. docs/performance.md gives the measurements behind each choice.
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
    32 MiB with fresh mmaps, so every step would page-fault its hundreds of MiB of activations in
    again (docs/performance.md). Nothing numerical changes. Call it before the first compiled
    call.
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

    Splitting the rows into blocks before the transpose keeps XLA from folding it into the next
    dot; 64 blocks copy fastest at the reference's shapes (docs/performance.md).
    """
    rows, cols = x.shape
    blocks = math.gcd(rows, 64)
    return x.reshape(blocks, rows // blocks, cols).transpose(2, 0, 1).reshape(cols, rows)


def swap_last_two(x: jax.Array, canonical: bool) -> jax.Array:
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
    d_x = _dot_f32(grad_bf16, swap_last_two(kernel_bf16, canonical)).astype(x_dtype.dtype)  # (N, D)
    d_kernel = _dot_f32(swap_last_two(x_bf16, canonical), grad_bf16)  # (D, F)
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


def _attention_forward(q: jax.Array, k: jax.Array, v: jax.Array, keep: jax.Array | None,
                       canonical: bool) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(output, weights, the weights that mix v: after the dropout's `keep`, if any)."""
    weights = causal_softmax(_dot_f32(q, swap_last_two(k, canonical)), q.shape[2])  # (N, L, L)
    mixing = weights if keep is None else weights * keep
    return _dot_f32(mixing.astype(jnp.bfloat16), v), weights, mixing


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def causal_attention(q: jax.Array, k: jax.Array, v: jax.Array, keep: jax.Array | None,
                     canonical: bool) -> tuple[jax.Array, jax.Array]:
    """Causal softmax attention over N = B*H independent heads: q, k, v (N, L, K) bfloat16 ->
    the output (N, L, K) and the attention weights (N, L, L), both float32. `keep` (N, L, L)
    float32, the dropout's mask scaled by 1/(1 - rate), multiplies the weights before they mix
    v (None: no dropout); the weights returned are those before it.

    Every product takes bf16 operands (in canonical layouts where `canonical`) and accumulates in
    float32; the scores, the mask and the softmax (and its gradient) stay float32.
    """
    return _attention_forward(q, k, v, keep, canonical)[:2]


def _attention_fwd(q: jax.Array, k: jax.Array, v: jax.Array, keep: jax.Array | None,
                   canonical: bool):
    out, weights, mixing = _attention_forward(q, k, v, keep, canonical)
    return (out, weights), (q, k, v, keep, weights, mixing)


def _attention_bwd(canonical: bool, residuals, grads):
    q, k, v, keep, weights, mixing = residuals
    d_out, d_weights = grads  # d_weights: nonzero only where a loss reads the weights themselves
    d_out = d_out.astype(jnp.bfloat16)
    d_v = _dot_f32(swap_last_two(mixing.astype(jnp.bfloat16), canonical), d_out)  # (N, L, K)
    d_mixing = _dot_f32(d_out, swap_last_two(v, canonical))  # (N, L, L)
    d_weights = (d_mixing if keep is None else d_mixing * keep) + d_weights
    # The softmax's gradient, then the scores' 1/sqrt(K); masked entries have weight 0.
    d_scores = weights * (d_weights - jnp.sum(d_weights * weights, axis=-1, keepdims=True))
    d_scores = (d_scores / math.sqrt(q.shape[2])).astype(jnp.bfloat16)
    d_q = _dot_f32(d_scores, k)  # (N, L, K)
    d_k = _dot_f32(swap_last_two(d_scores, canonical), q)  # (N, L, K)
    d_keep = None if keep is None else jnp.zeros_like(keep)  # a mask is no parameter
    return d_q.astype(q.dtype), d_k.astype(k.dtype), d_v.astype(v.dtype), d_keep


causal_attention.defvjp(_attention_fwd, _attention_bwd)
