"""The Transformer language model as pure-functional flax.linen modules, every option of the
experiment's config written once.

Shape convention, used in every comment below:
  B batch, L sequence length, D d_model, H heads, K head_dim = D // H, F d_ff, V vocab size.
Attention weights are (B, H, L, L): query positions on axis 2, key positions on axis 3.

Every module takes the `ExperimentConfig` whole (`cfg`) and reads the options it needs; with the
config's defaults the model is the reference's (RMSNorm, sinusoidal positions, GELU, an untied
head, no dropout). Parameters are float32 and initialised like PyTorch's defaults for the same
layers (the reference's model), not flax's: Linear weights and biases U(+-1/sqrt(fan_in)),
embeddings N(0, 1) (`embed_init_std`), norm scales 1.

`dtype` is the compute dtype of the matrix products. In bfloat16 (mixed precision) every product,
forward and backward, takes bf16 operands and accumulates in float32 (`bf16`), as the reference's
autocast runs its products in half precision; unlike autocast, which hands on half-precision
outputs, the products' outputs, the residual stream, norms, activations, attention scores,
softmax and logits stay float32. `kernels` says where those products run (`bf16`): a GPU's
libraries ("plain"), XLA:CPU's fast kernels in their canonical layouts ("canonical": the CPU fast
path), or a vendor GEMM on a CPU ("mkl"); it is set from the platform the program is built for
and the products asked for (`build_model`), so a GPU's program can be built and checked on a CPU
machine. Only the products differ between the paths (`Dense`, `attention_core`, `tied_head`):
every option is written once, around them.
Submodule names mirror the reference's PyTorch attribute names so that `interop` maps them one
to one.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from tinylm_jax.core.bf16 import bf16_dense, causal_attention, causal_softmax, swap_last_two
from tinylm_jax.core.config import ExperimentConfig

LAYERNORM_EPS = 1e-5  # torch.nn.LayerNorm's


def torch_linear_init(fan_in: int) -> nn.initializers.Initializer:
    """PyTorch's nn.Linear default, for weights and biases alike: U(+-1/sqrt(fan_in))."""
    bound = 1.0 / math.sqrt(fan_in)

    def init(key: jax.Array, shape: tuple[int, ...], dtype=jnp.float32) -> jax.Array:
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def is_mixed(dtype: Any) -> bool:
    """bfloat16 compute: the mixed-precision products of `bf16`."""
    return np.dtype(dtype) == np.dtype(jnp.bfloat16)


class Dense(nn.Module):
    """A Linear layer (`kernel` (D, F), `bias` (F,), as flax's Dense names them): float32 out,
    from float32 products, or from `bf16.bf16_dense` in mixed precision. With `splits` > 1, a
    tuple of that many outputs, one per equal column block of the kernel (a fused projection;
    in mixed precision each block is a product of its own, with no (B, L, splits * F) split)."""

    features: int
    use_bias: bool
    dtype: Any = jnp.float32
    kernels: str = "plain"
    splits: int = 1

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array | tuple[jax.Array, ...]:
        init = torch_linear_init(x.shape[-1])
        kernel = self.param("kernel", init, (x.shape[-1], self.features), jnp.float32)
        bias = self.param("bias", init, (self.features,), jnp.float32) if self.use_bias else None
        if is_mixed(self.dtype):
            blocks = jnp.split(kernel, self.splits, axis=-1)
            biases = jnp.split(bias, self.splits) if bias is not None else [None] * self.splits
            outs = [bf16_dense(x, w, b, self.kernels)
                    for w, b in zip(blocks, biases, strict=True)]
        else:  # flax's nn.Dense, op for op
            y = jax.lax.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())))
            outs = jnp.split(y if bias is None else y + bias, self.splits, axis=-1)
        return outs[0] if self.splits == 1 else tuple(outs)


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


def rotary(x: jax.Array, base: float) -> jax.Array:
    """RoPE (RoFormer): x (..., L, K) with each pair of dims (i, i + K/2) rotated by the angle
    position * base^(-2i/K), the half-split layout of GPT-NeoX and LLaMA."""
    length, width = x.shape[-2:]
    inverse_wavelengths = base ** (-np.arange(0, width, 2, dtype=np.float64) / width)  # (K/2,)
    angles = np.arange(length, dtype=np.float64)[:, None] * inverse_wavelengths  # (L, K/2)
    cos, sin = np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)
    first, second = x[..., :width // 2], x[..., width // 2:]
    return jnp.concatenate([first * cos - second * sin, first * sin + second * cos], axis=-1)


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight, computed and returned in float32."""

    eps: float = 1e-8

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        weight = self.param("weight", nn.initializers.ones, (x.shape[-1],), jnp.float32)
        x = x.astype(jnp.float32)
        normed = x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + self.eps)
        return normed * weight


def norm(cfg: ExperimentConfig, name: str) -> nn.Module:
    """The config's normalisation layer, in float32."""
    if cfg.norm == "layernorm":
        return nn.LayerNorm(epsilon=LAYERNORM_EPS, param_dtype=jnp.float32, name=name)
    return RMSNorm(name=name)


def attention_core(q: jax.Array, k: jax.Array, v: jax.Array, keep: jax.Array | None,
                   dtype: Any, kernels: str) -> tuple[jax.Array, jax.Array]:
    """Causal softmax attention: q, k, v (B, H, L, K) float32 -> the output (B, L, H, K) and the
    weights (B, H, L, L), both float32. `keep` (B, H, L, L): the dropout's scaled mask on the
    weights (None: no dropout); the weights returned are those before it."""
    batch, heads, length, width = q.shape
    if is_mixed(dtype):
        def flat(x: jax.Array) -> jax.Array:  # (B*H, ...): the batched products' one batch dim
            return x.reshape(batch * heads, *x.shape[2:])

        out, weights = causal_attention(
            *(flat(x.astype(jnp.bfloat16)) for x in (q, k, v)),
            None if keep is None else flat(keep), kernels)  # (B*H, L, K) float32
        out = out.reshape(batch, heads, length, width).transpose(0, 2, 1, 3)
        return out, weights.reshape(batch, heads, length, length)
    weights = causal_softmax(jnp.einsum("bhqk,bhsk->bhqs", q, k), width)  # (B, H, L, L)
    mixing = weights if keep is None else weights * keep
    return jnp.einsum("bhqs,bhsk->bqhk", mixing, v), weights  # (B, L, H, K)


class MultiHeadSelfAttention(nn.Module):
    cfg: ExperimentConfig
    dtype: Any = jnp.float32
    kernels: str = "plain"

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> tuple[jax.Array, jax.Array]:
        cfg = self.cfg
        batch, length, _ = x.shape
        # The reference's fused layout: the 3D features split as (3, H, K).
        parts = Dense(3 * cfg.d_model, False, self.dtype, self.kernels, splits=3,
                      name="qkv_proj")(x)  # 3 x (B, L, D) float32
        q, k, v = (part.reshape(batch, length, cfg.n_heads, cfg.head_dim).transpose(0, 2, 1, 3)
                   for part in parts)  # each (B, H, L, K)
        if cfg.qk_norm:
            q, k = RMSNorm(name="q_norm")(q), RMSNorm(name="k_norm")(k)
        if cfg.positions == "rope":
            q, k = rotary(q, cfg.rope_base), rotary(k, cfg.rope_base)
        keep = None
        if train and cfg.attention_dropout > 0:
            keep = keep_mask(self.make_rng("dropout"), cfg.attention_dropout,
                             (batch, cfg.n_heads, length, length))  # (B, H, L, L)
        out, weights = attention_core(q, k, v, keep, self.dtype, self.kernels)
        out = out.reshape(batch, length, cfg.d_model)
        out_proj = Dense(cfg.d_model, False, self.dtype, self.kernels, name="out_proj")
        return out_proj(out), weights


def feed_forward(x: jax.Array, cfg: ExperimentConfig, dtype: Any, kernels: str
                 ) -> jax.Array:
    """The block's MLP, (B, L, D) -> (B, L, D) float32: ff_in and ff_out with biases, as layers of
    the block that calls it (their names are the reference's)."""
    if cfg.mlp == "swiglu":
        gate, up = Dense(2 * cfg.d_ff, True, dtype, kernels, splits=2,
                         name="ff_in")(x)  # 2 x (B, L, F)
        h = nn.silu(gate) * up
    else:
        h = Dense(cfg.d_ff, True, dtype, kernels, name="ff_in")(x)  # (B, L, F)
        # float32 in mixed precision too: XLA:CPU's bf16 erf is slower (docs/performance.md).
        h = jnp.square(nn.relu(h)) if cfg.mlp == "relu2" else nn.gelu(h, approximate=False)
    return Dense(cfg.d_model, True, dtype, kernels, name="ff_out")(h)


class TransformerBlock(nn.Module):
    cfg: ExperimentConfig
    dtype: Any = jnp.float32
    kernels: str = "plain"

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> tuple[jax.Array, jax.Array]:
        """x: the float32 residual stream (B, L, D); the sublayers' products compute in `dtype`
        and return float32."""
        attn_out, weights = MultiHeadSelfAttention(self.cfg, self.dtype, self.kernels,
                                                   name="attn")(norm(self.cfg, "norm1")(x), train)
        x = x + dropout(self, attn_out, self.cfg.dropout, train)
        ff_out = feed_forward(norm(self.cfg, "norm2")(x), self.cfg, self.dtype,
                              self.kernels)
        return x + dropout(self, ff_out, self.cfg.dropout, train), weights


def keep_mask(key: jax.Array, rate: float, shape: tuple[int, ...]) -> jax.Array:
    """The dropout's scaled mask, float32 of `shape`: each element kept with probability 1 - rate
    and then scaled by the inverse of that probability, so the mean is unchanged. Drawn from 16
    random bits an element (the rate rounded to a multiple of 1/65536) where `bernoulli` draws 32:
    on a CPU the random bits, not the arithmetic, are what dropout costs (docs/performance.md)."""
    cut = round(rate * 65536)
    size = math.prod(shape)
    words = jax.random.bits(key, ((size + 1) // 2,), jnp.uint32)
    halves = jax.lax.bitcast_convert_type(words, jnp.uint16).reshape(-1)[:size].reshape(shape)
    return jnp.where(halves >= cut, jnp.float32(65536 / (65536 - cut)), jnp.float32(0))


def dropout(module: nn.Module, x: jax.Array, rate: float, train: bool) -> jax.Array:
    """`x` with dropout at `rate` in training (a mask from the module's "dropout" stream); as it
    is otherwise."""
    if not train or rate == 0:
        return x
    return x * keep_mask(module.make_rng("dropout"), rate, x.shape)


def tied_head(h: jax.Array, embedding: jax.Array, dtype: Any, kernels: str
              ) -> jax.Array:
    """Logits (B, L, V) float32 from the token embedding (V, D) as the output head: h @ E^T."""
    if is_mixed(dtype):
        return bf16_dense(h, swap_last_two(embedding, kernels), None, kernels)
    return jax.lax.dot_general(h, embedding, (((h.ndim - 1,), (1,)), ((), ())))


class TinyTransformerLM(nn.Module):
    cfg: ExperimentConfig
    dtype: Any = jnp.float32  # compute dtype; parameters are always float32
    kernels: str = "plain"  # where the bf16 products run (`bf16`): plain, canonical, mkl

    @property
    def max_seq_len(self) -> int:
        return self.cfg.seq_len

    @nn.compact
    def __call__(self, ids: jax.Array, return_attention: bool = False, train: bool = False
                 ) -> jax.Array | tuple[jax.Array, list[jax.Array]]:
        """Logits (B, L, V) float32 for token ids (B, L); with `return_attention`, also the
        attention weights of every layer, a list of (B, H, L, L) float32 arrays. `train` turns
        dropout on (it then draws from the "dropout" rng stream)."""
        cfg = self.cfg
        length = ids.shape[-1]
        embed = nn.Embed(cfg.vocab_size, cfg.d_model, param_dtype=jnp.float32,
                         embedding_init=nn.initializers.normal(cfg.embed_init_std),
                         name="token_embedding")
        h = embed(ids)  # (B, L, D) float32
        if cfg.positions == "sinusoidal":
            h = h + sinusoidal_positions(cfg.seq_len, cfg.d_model)[:length]  # (L, D)
        elif cfg.positions == "learned":
            h = h + nn.Embed(cfg.seq_len, cfg.d_model, param_dtype=jnp.float32,
                             embedding_init=nn.initializers.normal(cfg.embed_init_std),
                             name="position_embedding")(jnp.arange(length))  # (L, D)
        h = dropout(self, h, cfg.dropout, train)
        attention = []
        for i in range(cfg.n_layers):
            h, weights = TransformerBlock(cfg, self.dtype, self.kernels,
                                          name=f"layers_{i}")(h, train)
            attention.append(weights)
        h = norm(cfg, "norm")(h)
        if cfg.tie_embeddings:
            logits = tied_head(h, embed.embedding, self.dtype, self.kernels)
        else:
            logits = Dense(cfg.vocab_size, False, self.dtype, self.kernels,
                           name="head")(h)  # (B, L, V) float32
        return (logits, attention) if return_attention else logits


def build_model(cfg: ExperimentConfig, dtype: Any = jnp.float32,
                platform: str | None = None, products: str = "xla") -> TinyTransformerLM:
    """The experiment's model computing in `dtype`, for `platform` ("cpu", "cuda", "tpu"...;
    default: jax's default backend), its bf16 products on `products` ("xla" or "mkl")."""
    return TinyTransformerLM(cfg, dtype, kernels=model_kernels(platform, products))


def model_kernels(platform: str | None = None, products: str = "xla") -> str:
    """Where a model's bf16 products run: a GPU's or TPU's libraries ("plain"), XLA:CPU's
    canonical kernels, or the vendor GEMM on a CPU (`products` "mkl", as resolved by
    `run.products.resolve_products`)."""
    if not on_cpu(platform):
        return "plain"
    return "mkl" if products == "mkl" else "canonical"


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
    12 * layers * L * D per token (the PaLM paper's accounting; embeddings are lookups, but a
    tied head is a product)."""
    params = count_params(jax.eval_shape(lambda: init_params(build_model(cfg), 0)))
    lookups = (0 if cfg.tie_embeddings else cfg.vocab_size * cfg.d_model) + (
        cfg.seq_len * cfg.d_model if cfg.positions == "learned" else 0)
    per_token = 6 * (params - lookups) + 12 * cfg.n_layers * cfg.seq_len * cfg.d_model
    return float(per_token * cfg.batch_size * cfg.seq_len)
