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
products. Where a vendor GEMM is loaded (`cpu_gemm`), the dense products and their gradients run
on it instead, reading the transposes in place. `kernels` names which: "plain" (a GPU's or TPU's
program), "canonical" (XLA:CPU) or "mkl". docs/performance.md gives the measurements behind
each choice.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import math

import jax
import jax.numpy as jnp

from tinylm_jax.core import cpu_gemm

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


def swap_last_two(x: jax.Array, kernels: str) -> jax.Array:
    """The last two dims of x swapped: a real copy for XLA:CPU's canonical kernels, else a plain
    transpose (folded into the product by a GPU's libraries; materialised for the FFI GEMM)."""
    if kernels != "canonical":
        return jnp.swapaxes(x, -1, -2)
    return transposed(x) if x.ndim == 2 else jax.vmap(transposed)(x)


def _dot_f32(lhs: jax.Array, rhs: jax.Array) -> jax.Array:
    """lhs (..., A, C) @ rhs (..., C, E) -> (..., A, E) float32, any leading dims batched."""
    batch = tuple(range(lhs.ndim - 2))
    return jax.lax.dot_general(lhs, rhs, (((lhs.ndim - 1,), (lhs.ndim - 2,)), (batch, batch)),
                               preferred_element_type=jnp.float32)


def product(lhs: jax.Array, rhs: jax.Array, kernels: str, trans_lhs: bool = False,
            trans_rhs: bool = False) -> jax.Array:
    """op(lhs) @ op(rhs) -> float32 from bfloat16 operands, op transposing the last two dims where
    asked: on the vendor GEMM (`cpu_gemm`), which reads a transpose in place, or on XLA's dot
    with the transposes `swap_last_two` writes for `kernels`."""
    if kernels == "mkl":
        return cpu_gemm.gemm(lhs, rhs, trans_lhs, trans_rhs)
    lhs = swap_last_two(lhs, kernels) if trans_lhs else lhs
    rhs = swap_last_two(rhs, kernels) if trans_rhs else rhs
    return _dot_f32(lhs, rhs)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def bf16_matmul(x: jax.Array, kernel: jax.Array, kernels: str) -> jax.Array:
    """x (N, D) @ kernel (D, F) -> (N, F) float32, from bfloat16 operands, on `kernels`.

    The gradients are bf16 products accumulated in float32 on the same kernels; the kernel's
    gradient comes back float32 (the parameter's dtype), x's in x's dtype.
    """
    return product(x.astype(jnp.bfloat16), kernel.astype(jnp.bfloat16), kernels)


def _matmul_fwd(x: jax.Array, kernel: jax.Array, kernels: str):
    x_bf16, kernel_bf16 = x.astype(jnp.bfloat16), kernel.astype(jnp.bfloat16)
    # A zero-size array carries x's dtype to the backward pass (residuals must be arrays).
    return product(x_bf16, kernel_bf16, kernels), (x_bf16, kernel_bf16, jnp.zeros((0,), x.dtype))


def _matmul_bwd(kernels: str, residuals, grad: jax.Array):
    x_bf16, kernel_bf16, x_dtype = residuals
    grad_bf16 = grad.astype(jnp.bfloat16)
    d_x = product(grad_bf16, kernel_bf16, kernels, trans_rhs=True).astype(x_dtype.dtype)  # (N, D)
    d_kernel = product(x_bf16, grad_bf16, kernels, trans_lhs=True)  # (D, F)
    return d_x, d_kernel


bf16_matmul.defvjp(_matmul_fwd, _matmul_bwd)


def bf16_dense(x: jax.Array, kernel: jax.Array, bias: jax.Array | None = None,
               kernels: str = "canonical") -> jax.Array:
    """x (..., D) @ kernel (D, F) (+ bias) -> (..., F) float32, through `bf16_matmul`."""
    flat = bf16_matmul(x.reshape(-1, x.shape[-1]), kernel, kernels)
    if bias is not None:
        flat = flat + bias
    return flat.reshape(*x.shape[:-1], kernel.shape[-1])


def causal_softmax(scores: jax.Array, head_dim: int) -> jax.Array:
    """Attention weights (..., L, L) from float32 query-key products (..., L, L): scaled by
    1/sqrt(K), each query masked to itself and the keys before it. Every path of the model."""
    length = scores.shape[-1]
    causal = jnp.tril(jnp.ones((length, length), dtype=bool))
    return jax.nn.softmax(jnp.where(causal, scores / math.sqrt(head_dim), -jnp.inf), axis=-1)


def attention_kernels(kernels: str) -> str:
    """The attention core's: XLA's batched products, in canonical layouts on a CPU, whatever the
    dense products run on (a vendor GEMM per head measured several times slower)."""
    return "canonical" if kernels == "mkl" else kernels


def _attention_forward(q: jax.Array, k: jax.Array, v: jax.Array, keep: jax.Array | None,
                       kernels: str) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(output, weights, the weights that mix v: after the dropout's `keep`, if any)."""
    kernels = attention_kernels(kernels)
    weights = causal_softmax(product(q, k, kernels, trans_rhs=True), q.shape[2])  # (N, L, L)
    mixing = weights if keep is None else weights * keep
    return product(mixing.astype(jnp.bfloat16), v, kernels), weights, mixing


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def causal_attention(q: jax.Array, k: jax.Array, v: jax.Array, keep: jax.Array | None,
                     kernels: str) -> tuple[jax.Array, jax.Array]:
    """Causal softmax attention over N = B*H independent heads: q, k, v (N, L, K) bfloat16 ->
    the output (N, L, K) and the attention weights (N, L, L), both float32. `keep` (N, L, L)
    float32, the dropout's mask scaled by 1/(1 - rate), multiplies the weights before they mix
    v (None: no dropout); the weights returned are those before it.

    Every product takes bf16 operands (on `attention_kernels(kernels)`) and accumulates in
    float32; the scores, the mask and the softmax (and its gradient) stay float32.
    """
    return _attention_forward(q, k, v, keep, kernels)[:2]


def _attention_fwd(q: jax.Array, k: jax.Array, v: jax.Array, keep: jax.Array | None,
                   kernels: str):
    out, weights, mixing = _attention_forward(q, k, v, keep, kernels)
    return (out, weights), (q, k, v, keep, weights, mixing)


def _attention_bwd(kernels: str, residuals, grads):
    kernels = attention_kernels(kernels)
    q, k, v, keep, weights, mixing = residuals
    d_out, d_weights = grads  # d_weights: nonzero only where a loss reads the weights themselves
    d_out = d_out.astype(jnp.bfloat16)
    d_v = product(mixing.astype(jnp.bfloat16), d_out, kernels, trans_lhs=True)  # (N, L, K)
    d_mixing = product(d_out, v, kernels, trans_rhs=True)  # (N, L, L)
    d_weights = (d_mixing if keep is None else d_mixing * keep) + d_weights
    # The softmax's gradient, then the scores' 1/sqrt(K); masked entries have weight 0.
    d_scores = weights * (d_weights - jnp.sum(d_weights * weights, axis=-1, keepdims=True))
    d_scores = (d_scores / math.sqrt(q.shape[2])).astype(jnp.bfloat16)
    d_q = product(d_scores, k, kernels)  # (N, L, K)
    d_k = product(d_scores, q, kernels, trans_lhs=True)  # (N, L, K)
    d_keep = None if keep is None else jnp.zeros_like(keep)  # a mask is no parameter
    return d_q.astype(q.dtype), d_k.astype(k.dtype), d_v.astype(v.dtype), d_keep


causal_attention.defvjp(_attention_fwd, _attention_bwd)
