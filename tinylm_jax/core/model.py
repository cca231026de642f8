"""The seed's TinyTransformerLM as pure-functional flax.linen modules.

Shape convention, used in every comment below:
  B batch, L sequence length, D d_model, H heads, K head_dim = D // H, F d_ff, V vocab size.
Attention weights are (B, H, L, L): query positions on axis 2, key positions on axis 3.

Parameters are float32 and initialised like PyTorch's defaults for the same layers (the seed's
model), not flax's: Linear weights and biases U(+-1/sqrt(fan_in)), embeddings N(0, 1), norm
scales 1.
`dtype` is the compute dtype of the matrix products (bfloat16 for mixed precision). As under the
seed's autocast, the residual stream, norms, attention scores, softmax and logits stay float32.
`cpu_fast_path` (bfloat16 on CPU) computes the same function with the products in the layouts the
CPU's bf16 kernels take (`cpu_bf16`), each accumulated in float32, and the GELU in float32.
Submodule names mirror the seed's PyTorch attribute names so that `interop` maps them one to one.
"""

from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from tinylm_jax.core.config import ExperimentConfig
from tinylm_jax.core.cpu_bf16 import bf16_dense


def torch_linear_init(fan_in: int) -> nn.initializers.Initializer:
    """PyTorch's nn.Linear default, for weights and biases alike: U(+-1/sqrt(fan_in))."""
    bound = 1.0 / math.sqrt(fan_in)

    def init(key: jax.Array, shape: tuple[int, ...], dtype=jnp.float32) -> jax.Array:
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


class Bf16Dense(nn.Module):
    """nn.Dense's parameters (`kernel` (D, F), `bias` (F,)) over `cpu_bf16.bf16_dense`: float32
    out, whatever the caller casts it to next. With `splits` > 1, a tuple of that many outputs,
    one per equal column block of the kernel (the products of a fused projection, unfused)."""

    features: int
    fan_in: int
    use_bias: bool
    splits: int = 1

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array | tuple[jax.Array, ...]:
        init = torch_linear_init(self.fan_in)
        kernel = self.param("kernel", init, (x.shape[-1], self.features), jnp.float32)
        bias = self.param("bias", init, (self.features,), jnp.float32) if self.use_bias else None
        if self.splits == 1:
            return bf16_dense(x, kernel, bias)
        kernels = jnp.split(kernel, self.splits, axis=-1)
        biases = jnp.split(bias, self.splits) if bias is not None else [None] * self.splits
        return tuple(bf16_dense(x, w, b) for w, b in zip(kernels, biases, strict=True))


def dense(features: int, fan_in: int, use_bias: bool, dtype, name: str,
          float32_output: bool = False, cpu_fast_path: bool = False) -> nn.Module:
    if cpu_fast_path:
        return Bf16Dense(features, fan_in, use_bias, name=name)
    init = torch_linear_init(fan_in)
    dot_general = (functools.partial(jax.lax.dot_general, preferred_element_type=jnp.float32)
                   if float32_output else None)
    return nn.Dense(features, use_bias=use_bias, dtype=dtype, param_dtype=jnp.float32,
                    kernel_init=init, bias_init=init, dot_general=dot_general, name=name)


def sinusoidal_positions(max_len: int, d_model: int) -> np.ndarray:
    """(max_len, D) float32: sin on even dims, cos on odd dims, base 10000 (the seed's table)."""
    position = np.arange(max_len, dtype=np.float32)[:, None]
    div_term = np.exp(np.arange(0, d_model, 2, dtype=np.float32)
                      * np.float32(-math.log(10000.0) / d_model))
    table = np.zeros((max_len, d_model), dtype=np.float32)
    table[:, 0::2] = np.sin(position * div_term)
    table[:, 1::2] = np.cos(position * div_term)
    return table


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight, computed and returned in float32."""

    eps: float = 1e-8

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        weight = self.param("weight", nn.initializers.ones, (x.shape[-1],), jnp.float32)
        x = x.astype(jnp.float32)
        normed = x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + self.eps)
        return normed * weight


class MultiHeadSelfAttention(nn.Module):
    d_model: int
    n_heads: int
    dtype: jnp.dtype = jnp.float32
    cpu_fast_path: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        batch, length, _ = x.shape
        head_dim = self.d_model // self.n_heads
        # The seed's fused layout: the 3D features split as (3, H, K).
        if self.cpu_fast_path:  # three products from the kernel's thirds: no (B, L, 3D) split
            parts = Bf16Dense(3 * self.d_model, self.d_model, False, splits=3,
                              name="qkv_proj")(x)  # 3 x (B, L, D) float32
        else:
            qkv = dense(3 * self.d_model, self.d_model, False, self.dtype, "qkv_proj")(x)
            parts = jnp.split(qkv, 3, axis=-1)  # (B, L, 3D) -> 3 x (B, L, D)
        q, k, v = (part.astype(self.dtype).reshape(batch, length, self.n_heads, head_dim)
                   .transpose(0, 2, 1, 3) for part in parts)  # each (B, H, L, K)
        scores = jnp.einsum("bhqk,bhsk->bhqs", q, k, preferred_element_type=jnp.float32)
        scores = scores / math.sqrt(head_dim)  # (B, H, L, L)
        causal = jnp.tril(jnp.ones((length, length), dtype=bool))
        weights = jax.nn.softmax(jnp.where(causal, scores, -jnp.inf), axis=-1)  # (B, H, L, L)
        out = jnp.einsum("bhqs,bhsk->bqhk", weights.astype(self.dtype), v)  # (B, L, H, K)
        out = out.reshape(batch, length, self.d_model)
        out_proj = dense(self.d_model, self.d_model, False, self.dtype, "out_proj",
                         cpu_fast_path=self.cpu_fast_path)
        return out_proj(out), weights


class TransformerBlock(nn.Module):
    d_model: int
    n_heads: int
    d_ff: int
    dtype: jnp.dtype = jnp.float32
    cpu_fast_path: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """x: the float32 residual stream (B, L, D); the sublayers compute in `dtype`."""
        h = RMSNorm(name="norm1")(x)
        attn_out, weights = MultiHeadSelfAttention(self.d_model, self.n_heads, self.dtype,
                                                   self.cpu_fast_path, name="attn")(h)
        x = x + attn_out.astype(jnp.float32)
        h = RMSNorm(name="norm2")(x)
        fast = self.cpu_fast_path
        h = dense(self.d_ff, self.d_model, True, self.dtype, "ff_in",
                  cpu_fast_path=fast)(h)  # (B, L, F)
        # The fast path's GELU stays float32: XLA:CPU's bf16 erf measured slower than float32's.
        h = nn.gelu(h, approximate=False)
        h = dense(self.d_model, self.d_ff, True, self.dtype, "ff_out",
                  cpu_fast_path=fast)(h)  # (B, L, D)
        return x + h.astype(jnp.float32), weights


class TinyTransformerLM(nn.Module):
    vocab_size: int
    d_model: int
    n_heads: int
    d_ff: int
    max_seq_len: int
    n_layers: int
    dtype: jnp.dtype = jnp.float32  # compute dtype; parameters are always float32
    positional_encoding: str = "sinusoidal"  # or "none": embeddings without positions
    cpu_fast_path: bool = False  # bf16 products in the CPU kernels' layouts (`cpu_bf16`)

    @nn.compact
    def __call__(self, ids: jax.Array, return_attention: bool = False
                 ) -> jax.Array | tuple[jax.Array, list[jax.Array]]:
        """Logits (B, L, V) float32 for token ids (B, L); with `return_attention`, also the
        attention weights of every layer, a list of (B, H, L, L) float32 arrays."""
        length = ids.shape[-1]
        embed = nn.Embed(self.vocab_size, self.d_model, param_dtype=jnp.float32,
                         embedding_init=nn.initializers.normal(1.0), name="token_embedding")
        h = embed(ids)  # (B, L, D) float32
        if self.positional_encoding == "sinusoidal":
            h = h + sinusoidal_positions(self.max_seq_len, self.d_model)[:length]  # (L, D)
        attention = []
        for i in range(self.n_layers):
            h, weights = TransformerBlock(self.d_model, self.n_heads, self.d_ff, self.dtype,
                                          self.cpu_fast_path, name=f"layers_{i}")(h)
            attention.append(weights)
        h = RMSNorm(name="norm")(h)
        logits = dense(self.vocab_size, self.d_model, False, self.dtype, "head",
                       float32_output=True, cpu_fast_path=self.cpu_fast_path)(h)  # (B, L, V) f32
        return (logits, attention) if return_attention else logits


def build_model(cfg: ExperimentConfig, dtype: jnp.dtype = jnp.float32) -> TinyTransformerLM:
    return TinyTransformerLM(vocab_size=cfg.vocab_size, d_model=cfg.d_model, n_heads=cfg.n_heads,
                             d_ff=cfg.d_ff, max_seq_len=cfg.seq_len, n_layers=cfg.n_layers,
                             dtype=dtype, positional_encoding=cfg.positional_encoding,
                             cpu_fast_path=uses_cpu_fast_path(dtype))


def uses_cpu_fast_path(dtype: jnp.dtype) -> bool:
    """bfloat16 compute on a CPU backend takes the fast path; GPUs and TPUs keep flax's Dense."""
    return np.dtype(dtype) == np.dtype(jnp.bfloat16) and jax.default_backend() == "cpu"


def init_params(model: TinyTransformerLM, seed: int) -> dict:
    ids = jnp.zeros((1, model.max_seq_len), jnp.int32)
    return model.init(jax.random.key(seed), ids)["params"]


def count_params(params) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))


def model_flops_per_step(cfg: ExperimentConfig) -> float:
    """Training FLOPs of one batch: 6 per matmul parameter per token, plus attention's
    12 * layers * L * D per token (the PaLM paper's accounting; embeddings are lookups)."""
    params = count_params(jax.eval_shape(lambda: init_params(build_model(cfg), 0)))
    matmul_params = params - cfg.vocab_size * cfg.d_model
    per_token = 6 * matmul_params + 12 * cfg.n_layers * cfg.seq_len * cfg.d_model
    return float(per_token * cfg.batch_size * cfg.seq_len)
