import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tinylm_jax.core import model as model_module
from tinylm_jax.core.config import EXPERIMENTS_DIR, load_config
from tinylm_jax.core.model import build_model, count_params, init_params, sinusoidal_positions

NO_POSITIONS = str(EXPERIMENTS_DIR / "baseline_no_positions.toml")


@pytest.mark.parametrize("name, expected", [("baseline", 391_552), ("medium", 391_552),
                                            ("wider", 1_307_392), (NO_POSITIONS, 391_552)])
def test_parameter_counts_match_the_reference(name, expected):
    cfg = load_config(name)
    params = jax.eval_shape(lambda: init_params(build_model(cfg), cfg.seed))
    assert count_params(params) == expected


def test_attention_is_causal_and_normalised(tiny_cfg):
    model = build_model(tiny_cfg)
    params = init_params(model, 0)
    ids = jax.random.randint(jax.random.key(1), (3, tiny_cfg.seq_len), 0, tiny_cfg.vocab_size)
    logits, attention = model.apply({"params": params}, ids, return_attention=True)
    assert logits.shape == (3, tiny_cfg.seq_len, tiny_cfg.vocab_size)
    assert len(attention) == tiny_cfg.n_layers
    for weights in attention:
        assert weights.shape == (3, tiny_cfg.n_heads, tiny_cfg.seq_len, tiny_cfg.seq_len)
        assert weights.dtype == jnp.float32
        np.testing.assert_allclose(weights.sum(-1), 1.0, rtol=1e-5)
        upper = np.triu(np.ones((tiny_cfg.seq_len,) * 2, dtype=bool), k=1)
        assert np.all(np.asarray(weights)[..., upper] == 0.0)


def test_future_tokens_do_not_change_past_logits(tiny_cfg):
    model = build_model(tiny_cfg)
    params = init_params(model, 0)
    ids = jax.random.randint(jax.random.key(2), (2, tiny_cfg.seq_len), 0, tiny_cfg.vocab_size)
    cut = 7
    changed = ids.at[:, cut:].set((ids[:, cut:] + 1) % tiny_cfg.vocab_size)
    before = model.apply({"params": params}, ids)
    after = model.apply({"params": params}, changed)
    np.testing.assert_array_equal(before[:, :cut], after[:, :cut])
    assert not np.allclose(before[:, cut:], after[:, cut:])


def test_attention_is_opt_in(tiny_cfg):
    model = build_model(tiny_cfg)
    params = init_params(model, 0)
    out = model.apply({"params": params}, jnp.zeros((1, 4), jnp.int32))
    assert isinstance(out, jax.Array)


def test_initialisation_follows_pytorch_defaults():
    cfg = load_config("wider")
    # Jitted init draws the same numbers as eager init, in one compile instead of one per op.
    params = jax.jit(lambda: init_params(build_model(cfg), 0))()
    emb = np.asarray(params["token_embedding"]["embedding"])
    assert abs(emb.std() - 1.0) < 0.02 and abs(emb.mean()) < 0.02  # N(0, 1)
    layer = params["layers_0"]
    fed_by_d_model = [layer["ff_in"]["kernel"], layer["ff_in"]["bias"],
                      layer["attn"]["qkv_proj"]["kernel"], layer["attn"]["out_proj"]["kernel"],
                      params["head"]["kernel"]]
    for leaf, fan_in in [(x, cfg.d_model) for x in fed_by_d_model] + [
            (layer["ff_out"]["kernel"], cfg.d_ff), (layer["ff_out"]["bias"], cfg.d_ff)]:
        bound = 1 / np.sqrt(fan_in)  # U(+-1/sqrt(fan_in)) fills its whole range
        assert bound * 0.9 < np.abs(leaf).max() <= bound
    np.testing.assert_array_equal(params["norm"]["weight"], 1.0)


def test_the_no_position_model_differs_from_the_default_only_in_the_missing_addition(
        tiny_cfg, monkeypatch):
    default, bare = build_model(tiny_cfg), build_model(tiny_cfg.replace(positions="none"))
    params = init_params(default, 0)
    assert jax.tree.map(jnp.shape, init_params(bare, 0)) == jax.tree.map(jnp.shape, params)
    ids = jax.random.randint(jax.random.key(4), (2, tiny_cfg.seq_len), 0, tiny_cfg.vocab_size)
    without = bare.apply({"params": params}, ids)
    assert not np.allclose(default.apply({"params": params}, ids), without)
    monkeypatch.setattr(model_module, "sinusoidal_positions",
                        lambda length, width: np.zeros((length, width), np.float32))
    np.testing.assert_array_equal(default.apply({"params": params}, ids), without)


def test_sinusoidal_table_alternates_sin_and_cos():
    table = sinusoidal_positions(10, 8)
    np.testing.assert_allclose(table[:, 0], np.sin(np.arange(10)), rtol=1e-6)
    np.testing.assert_allclose(table[:, 1], np.cos(np.arange(10)), rtol=1e-6)
    np.testing.assert_allclose(table[3, 2], np.sin(3 / 10000 ** (2 / 8)), rtol=1e-6)


# On a CPU, bf16 takes the canonical layouts (the fast path); GPUs and TPUs the plain ones.
BF16_FORMULATIONS = pytest.mark.parametrize("kernels", ["canonical", "plain"],
                                            ids=["cpu-fast-path", "plain-layouts"])


@BF16_FORMULATIONS
def test_bf16_compute_keeps_float32_params_and_outputs(tiny_cfg, kernels):
    model = build_model(tiny_cfg, jnp.bfloat16).clone(kernels=kernels)
    params = init_params(model, 0)
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(params))
    logits, attention = model.apply({"params": params}, jnp.zeros((1, 8), jnp.int32),
                                    return_attention=True)
    assert logits.dtype == jnp.float32 and attention[0].dtype == jnp.float32


@BF16_FORMULATIONS
def test_bf16_compute_tracks_fp32(tiny_cfg, kernels):
    params = init_params(build_model(tiny_cfg), 0)
    ids = jax.random.randint(jax.random.key(3), (2, tiny_cfg.seq_len), 0, tiny_cfg.vocab_size)
    full = build_model(tiny_cfg).apply({"params": params}, ids)
    mixed = build_model(tiny_cfg, jnp.bfloat16).clone(kernels=kernels).apply(
        {"params": params}, ids)
    assert float(jnp.max(jnp.abs(full - mixed))) < 0.1
    assert float(jnp.max(jnp.abs(jax.nn.softmax(full) - jax.nn.softmax(mixed)))) < 0.01
