"""The reference's TinyTransformerLM as pure-functional flax.linen modules.

Shape convention, used in every comment below:
  B batch, L sequence length, D d_model, H heads, K head_dim = D // H, F d_ff, V vocab size.
Attention weights are (B, H, L, L): query positions on axis 2, key positions on axis 3.

Parameters are float32 and initialised like PyTorch's defaults for the same layers (the reference's
model), not flax's: Linear weights and biases U(+-1/sqrt(fan_in)), embeddings N(0, 1), norm
scales 1.
`dtype` is the compute dtype of the matrix products. In bfloat16 (mixed precision) every product,
forward and backward, takes bf16 operands and accumulates in float32 (`bf16`), as the reference's
autocast runs its products in half precision; unlike autocast, which hands on half-precision
outputs, the products' outputs, the residual stream, norms, GELU, attention scores, softmax and
logits stay float32. `canonical_layouts` writes those products in the layouts a CPU's bf16
kernels take (`bf16`: the CPU fast path); it is set from the platform the program is built for
(`build_model`), so a GPU's program can be built and checked on a CPU machine.
Submodule names mirror the reference's PyTorch attribute names so that `interop` maps them one
to one.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from tinylm_jax.core.bf16 import bf16_dense, causal_attention, causal_softmax
from tinylm_jax.core.config import ExperimentConfig


def torch_linear_init(fan_in: int) -> nn.initializers.Initializer:
    """PyTorch's nn.Linear default, for weights and biases alike: U(+-1/sqrt(fan_in))."""
    bound = 1.0 / math.sqrt(fan_in)

    def init(key: jax.Array, shape: tuple[int, ...], dtype=jnp.float32) -> jax.Array:
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def is_mixed(dtype: jnp.dtype) -> bool:
    """bfloat16 compute: the mixed-precision products of `bf16`."""
    return np.dtype(dtype) == np.dtype(jnp.bfloat16)


class Bf16Dense(nn.Module):
    """nn.Dense's parameters (`kernel` (D, F), `bias` (F,)) over `bf16.bf16_dense`: float32
    out, whatever the caller casts it to next. With `splits` > 1, a tuple of that many outputs,
    one per equal column block of the kernel (the products of a fused projection, unfused)."""

    features: int
    fan_in: int
    use_bias: bool
    canonical_layouts: bool
    splits: int = 1

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array | tuple[jax.Array, ...]:
        init = torch_linear_init(self.fan_in)
        kernel = self.param("kernel", init, (x.shape[-1], self.features), jnp.float32)
        bias = self.param("bias", init, (self.features,), jnp.float32) if self.use_bias else None
        if self.splits == 1:
            return bf16_dense(x, kernel, bias, self.canonical_layouts)
        kernels = jnp.split(kernel, self.splits, axis=-1)
        biases = jnp.split(bias, self.splits) if bias is not None else [None] * self.splits
        return tuple(bf16_dense(x, w, b, self.canonical_layouts)
                     for w, b in zip(kernels, biases, strict=True))


def dense(features: int, fan_in: int, use_bias: bool, dtype: jnp.dtype, canonical_layouts: bool,
          name: str) -> nn.Module:
    """A Linear layer: `Bf16Dense` in mixed precision, flax's float32 Dense otherwise."""
    if is_mixed(dtype):
        return Bf16Dense(features, fan_in, use_bias, canonical_layouts, name=name)
    init = torch_linear_init(fan_in)
    return nn.Dense(features, use_bias=use_bias, param_dtype=jnp.float32, kernel_init=init,
                    bias_init=init, name=name)


def sinusoidal_positions(max_len: int, d_model: int) -> np.ndarray:
    """(max_len, D) float32: sin on even dims, cos on odd dims, base 10000 (the reference's
    table)."""
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
    canonical_layouts: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        batch, length, _ = x.shape
        head_dim = self.d_model // self.n_heads
        # The reference's fused layout: the 3D features split as (3, H, K).
        if is_mixed(self.dtype):  # three products from the kernel's thirds: no (B, L, 3D) split
            parts = Bf16Dense(3 * self.d_model, self.d_model, False, self.canonical_layouts,
                              splits=3, name="qkv_proj")(x)  # 3 x (B, L, D) float32
            q, k, v = (part.astype(jnp.bfloat16).reshape(batch, length, self.n_heads, head_dim)
                       .transpose(0, 2, 1, 3).reshape(batch * self.n_heads, length, head_dim)
                       for part in parts)  # each (B*H, L, K)
            out, weights = causal_attention(q, k, v, self.canonical_layouts)  # float32
            out = out.reshape(batch, self.n_heads, length, head_dim).transpose(0, 2, 1, 3)
            weights = weights.reshape(batch, self.n_heads, length, length)  # (B, H, L, L)
        else:
            qkv = dense(3 * self.d_model, self.d_model, False, self.dtype, False, "qkv_proj")(x)
            parts = jnp.split(qkv, 3, axis=-1)  # (B, L, 3D) -> 3 x (B, L, D)
            q, k, v = (part.reshape(batch, length, self.n_heads, head_dim).transpose(0, 2, 1, 3)
                       for part in parts)  # each (B, H, L, K)
            weights = causal_softmax(jnp.einsum("bhqk,bhsk->bhqs", q, k),
                                     head_dim)  # (B, H, L, L)
            out = jnp.einsum("bhqs,bhsk->bqhk", weights, v)  # (B, L, H, K)
        out = out.reshape(batch, length, self.d_model)
        out_proj = dense(self.d_model, self.d_model, False, self.dtype, self.canonical_layouts,
                         "out_proj")
        return out_proj(out), weights


class TransformerBlock(nn.Module):
    d_model: int
    n_heads: int
    d_ff: int
    dtype: jnp.dtype = jnp.float32
    canonical_layouts: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """x: the float32 residual stream (B, L, D); the sublayers' products compute in `dtype`
        and return float32."""
        h = RMSNorm(name="norm1")(x)
        attn_out, weights = MultiHeadSelfAttention(self.d_model, self.n_heads, self.dtype,
                                                   self.canonical_layouts, name="attn")(h)
        x = x + attn_out
        h = RMSNorm(name="norm2")(x)
        h = dense(self.d_ff, self.d_model, True, self.dtype, self.canonical_layouts,
                  "ff_in")(h)  # (B, L, F) float32
        # float32 in mixed precision too: XLA:CPU's bf16 erf measured slower than float32's.
        h = nn.gelu(h, approximate=False)
        h = dense(self.d_model, self.d_ff, True, self.dtype, self.canonical_layouts,
                  "ff_out")(h)  # (B, L, D)
        return x + h, weights


class TinyTransformerLM(nn.Module):
    vocab_size: int
    d_model: int
    n_heads: int
    d_ff: int
    max_seq_len: int
    n_layers: int
    dtype: jnp.dtype = jnp.float32  # compute dtype; parameters are always float32
    positional_encoding: str = "sinusoidal"  # or "none": embeddings without positions
    canonical_layouts: bool = False  # bf16 products in the CPU kernels' layouts (`bf16`)

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
                                          self.canonical_layouts, name=f"layers_{i}")(h)
            attention.append(weights)
        h = RMSNorm(name="norm")(h)
        logits = dense(self.vocab_size, self.d_model, False, self.dtype, self.canonical_layouts,
                       "head")(h)  # (B, L, V) float32
        return (logits, attention) if return_attention else logits


def build_model(cfg: ExperimentConfig, dtype: jnp.dtype = jnp.float32,
                platform: str | None = None) -> TinyTransformerLM:
    """The experiment's model computing in `dtype`, for `platform` ("cpu", "cuda", "tpu"...;
    default: jax's default backend)."""
    return TinyTransformerLM(vocab_size=cfg.vocab_size, d_model=cfg.d_model, n_heads=cfg.n_heads,
                             d_ff=cfg.d_ff, max_seq_len=cfg.seq_len, n_layers=cfg.n_layers,
                             dtype=dtype, positional_encoding=cfg.positional_encoding,
                             canonical_layouts=on_cpu(platform))


def on_cpu(platform: str | None = None) -> bool:
    """Whether a program for `platform` (default: jax's default backend) runs on a CPU: there
    the products take the CPU kernels' canonical layouts; GPUs' and TPUs' libraries take any."""
    return (platform or jax.default_backend()) == "cpu"


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
