"""The seed's TinyTransformerLM as pure-functional flax.linen modules.

Shape convention, used in every comment below:
  B batch, L sequence length, D d_model, H heads, K head_dim = D // H, F d_ff, V vocab size.
Attention weights are (B, H, L, L): query positions on axis 2, key positions on axis 3.

Parameters are float32 and initialised like PyTorch's defaults for the same layers (the seed's
model), not flax's: Linear weights and biases U(+-1/sqrt(fan_in)), embeddings N(0, 1), norm
scales 1.
`dtype` is the compute dtype of the matrix products (bfloat16 for mixed precision). As under the
seed's autocast, the residual stream, norms, attention scores, softmax and logits stay float32.
Submodule names mirror the seed's PyTorch attribute names so that `interop` maps them one to one.
"""

from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from tinylm_jax.config import ExperimentConfig


def torch_linear_init(fan_in: int) -> nn.initializers.Initializer:
    """PyTorch's nn.Linear default, for weights and biases alike: U(+-1/sqrt(fan_in))."""
    bound = 1.0 / math.sqrt(fan_in)

    def init(key: jax.Array, shape: tuple[int, ...], dtype=jnp.float32) -> jax.Array:
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def dense(features: int, fan_in: int, use_bias: bool, dtype, name: str,
          float32_output: bool = False) -> nn.Dense:
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

    @nn.compact
    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        batch, length, _ = x.shape
        head_dim = self.d_model // self.n_heads
        qkv = dense(3 * self.d_model, self.d_model, False, self.dtype, "qkv_proj")(x)  # (B, L, 3D)
        # The seed's fused layout: the 3D features split as (3, H, K).
        qkv = qkv.reshape(batch, length, 3, self.n_heads, head_dim)
        q, k, v = (qkv[:, :, i].transpose(0, 2, 1, 3) for i in range(3))  # each (B, H, L, K)
        scores = jnp.einsum("bhqk,bhsk->bhqs", q, k, preferred_element_type=jnp.float32)
        scores = scores / math.sqrt(head_dim)  # (B, H, L, L)
        causal = jnp.tril(jnp.ones((length, length), dtype=bool))
        weights = jax.nn.softmax(jnp.where(causal, scores, -jnp.inf), axis=-1)  # (B, H, L, L)
        out = jnp.einsum("bhqs,bhsk->bqhk", weights.astype(self.dtype), v)  # (B, L, H, K)
        out = out.reshape(batch, length, self.d_model)
        return dense(self.d_model, self.d_model, False, self.dtype, "out_proj")(out), weights


class TransformerBlock(nn.Module):
    d_model: int
    n_heads: int
    d_ff: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """x: the float32 residual stream (B, L, D); the sublayers compute in `dtype`."""
        h = RMSNorm(name="norm1")(x)
        attn_out, weights = MultiHeadSelfAttention(self.d_model, self.n_heads, self.dtype,
                                                   name="attn")(h)
        x = x + attn_out.astype(jnp.float32)
        h = RMSNorm(name="norm2")(x)
        h = dense(self.d_ff, self.d_model, True, self.dtype, "ff_in")(h)  # (B, L, F)
        h = nn.gelu(h, approximate=False)
        h = dense(self.d_model, self.d_ff, True, self.dtype, "ff_out")(h)  # (B, L, D)
        return x + h.astype(jnp.float32), weights


class TinyTransformerLM(nn.Module):
    vocab_size: int
    d_model: int
    n_heads: int
    d_ff: int
    max_seq_len: int
    n_layers: int
    dtype: jnp.dtype = jnp.float32  # compute dtype; parameters are always float32

    @nn.compact
    def __call__(self, ids: jax.Array, return_attention: bool = False
                 ) -> jax.Array | tuple[jax.Array, list[jax.Array]]:
        """Logits (B, L, V) float32 for token ids (B, L); with `return_attention`, also the
        attention weights of every layer, a list of (B, H, L, L) float32 arrays."""
        length = ids.shape[-1]
        embed = nn.Embed(self.vocab_size, self.d_model, param_dtype=jnp.float32,
                         embedding_init=nn.initializers.normal(1.0), name="token_embedding")
        positions = sinusoidal_positions(self.max_seq_len, self.d_model)[:length]  # (L, D)
        h = embed(ids) + positions  # (B, L, D) float32
        attention = []
        for i in range(self.n_layers):
            h, weights = TransformerBlock(self.d_model, self.n_heads, self.d_ff, self.dtype,
                                          name=f"layers_{i}")(h)
            attention.append(weights)
        h = RMSNorm(name="norm")(h)
        logits = dense(self.vocab_size, self.d_model, False, self.dtype, "head",
                       float32_output=True)(h)  # (B, L, V) float32
        return (logits, attention) if return_attention else logits


def build_model(cfg: ExperimentConfig, dtype: jnp.dtype = jnp.float32) -> TinyTransformerLM:
    return TinyTransformerLM(vocab_size=cfg.vocab_size, d_model=cfg.d_model, n_heads=cfg.n_heads,
                             d_ff=cfg.d_ff, max_seq_len=cfg.seq_len, n_layers=cfg.n_layers,
                             dtype=dtype)


def init_params(model: TinyTransformerLM, seed: int) -> dict:
    ids = jnp.zeros((1, model.max_seq_len), jnp.int32)
    return model.init(jax.random.key(seed), ids)["params"]


def count_params(params) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
