"""The CPU bf16 fast path: its custom gradient, its parameters, and one step against float32."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tinylm_jax.core.cpu_bf16 import bf16_dense, bf16_matmul, transposed
from tinylm_jax.core.model import build_model, init_params
from tinylm_jax.core.train import create_train_state, weighted_loss


@pytest.mark.parametrize("shape", [(4096, 32), (96, 7), (13, 5)])  # 64-row blocks, 32, prime
def test_transposed_is_the_transpose(shape):
    x = np.arange(np.prod(shape), dtype=np.float32).reshape(shape)
    np.testing.assert_array_equal(jax.jit(transposed)(x), x.T)


def _bf16_exact(key, shape):
    """Small integers times 1/8: exact in bfloat16, and their products and sums (short ones)
    exact in float32, so the bf16 path and float32 must agree to rounding of the sums alone."""
    return jax.random.randint(key, shape, -8, 9).astype(jnp.float32) / 8


def test_the_custom_gradient_equals_jax_grad_of_the_plain_product():
    keys = jax.random.split(jax.random.key(0), 4)
    x, kernel, bias = (_bf16_exact(k, s) for k, s in zip(keys, [(64, 48), (48, 24), (24,)],
                                                           strict=False))
    cotangent = _bf16_exact(keys[3], (64, 24))

    def plain(x, kernel, bias):
        return jnp.sum(cotangent * (jnp.dot(x, kernel, precision="highest") + bias))

    def fast(x, kernel, bias):
        return jnp.sum(cotangent * bf16_dense(x, kernel, bias))

    expected = jax.grad(plain, argnums=(0, 1, 2))(x, kernel, bias)
    got = jax.grad(fast, argnums=(0, 1, 2))(x, kernel, bias)
    for a, b in zip(got, expected, strict=True):
        assert a.dtype == jnp.float32
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


def test_the_input_gradient_keeps_the_input_dtype():
    x = jnp.ones((8, 4), jnp.bfloat16)
    grad = jax.grad(lambda x: jnp.sum(bf16_matmul(x, jnp.ones((4, 2)))))(x)
    assert grad.dtype == jnp.bfloat16


def test_the_fast_path_has_the_same_parameters_as_float32(tiny_cfg):
    """Same names, shapes and initial values: checkpoints move between the two paths."""
    fast = build_model(tiny_cfg, jnp.bfloat16)
    assert fast.cpu_fast_path  # these tests run on a CPU backend
    plain = init_params(build_model(tiny_cfg), tiny_cfg.seed)
    assert jax.tree.structure(init_params(fast, tiny_cfg.seed)) == jax.tree.structure(plain)
    for a, b in zip(jax.tree.leaves(init_params(fast, tiny_cfg.seed)), jax.tree.leaves(plain),
                    strict=True):
        np.testing.assert_array_equal(a, b)


def _loss_and_grads(state, ids):
    def loss(params):
        logits = state.apply_fn({"params": params}, ids[:, :-1])
        loss_sum, tokens = weighted_loss(logits, ids[:, 1:], jnp.ones((ids.shape[0],)))
        return loss_sum / tokens

    # Jitted: eager, each op of the backward pass compiles on its own (about 45 s here).
    return jax.jit(jax.value_and_grad(loss))(state.params)


def test_one_fast_path_step_tracks_float32_within_bf16_rounding(tiny_cfg):
    """bfloat16 keeps 8 significant bits: each rounded operand is off by at most 2^-9 relative.
    A gradient here passes through about a dozen rounded products (5 per block, 2 blocks, the
    head, their backward twins); independent roundings add in quadrature, so about
    sqrt(12) * 2^-9 = 0.7% relative error is expected (measured: 0.68% at most, on ff_out's
    kernel), and 3% is allowed. The loss, a mean of logsumexp terms, moves far less (measured
    1.5e-5 relative; 1e-3 allowed)."""
    ids = jax.random.randint(jax.random.key(5), (16, tiny_cfg.seq_len + 1), 0,
                             tiny_cfg.vocab_size)
    loss32, grads32 = _loss_and_grads(create_train_state(tiny_cfg, "fp32"), ids)
    loss16, grads16 = _loss_and_grads(create_train_state(tiny_cfg, "bf16"), ids)
    assert float(loss16) == pytest.approx(float(loss32), rel=1e-3)
    for path, g32 in jax.tree_util.tree_leaves_with_path(grads32):
        g16 = dict(jax.tree_util.tree_leaves_with_path(grads16))[path]
        assert g16.dtype == jnp.float32
        error = float(jnp.linalg.norm(g16 - g32) / jnp.linalg.norm(g32))
        assert error < 0.03, (jax.tree_util.keystr(path), error)
