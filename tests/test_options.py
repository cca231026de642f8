"""The model's and the recipe's options, each against an independent formula: RoPE against a
plain rotation, the norms and MLPs against NumPy, tying, learned positions and dropout by their
defining properties, the parameter count of every combination by hand, the schedules against
their closed forms, Muon's share of the parameters; and every option on the CPU fast path against
float32, and lowered for a GPU."""

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import tiny_config
from test_bf16 import FAST_PATH_PIECES, _batch, _lowered, _names

from tinylm_jax.core.config import CHOICES
from tinylm_jax.core.model import build_model, count_params, init_params, keep_mask, rotary
from tinylm_jax.core.train import (
    check_schedule,
    create_train_state,
    eval_step,
    lr_schedule,
    muon_matrices,
    train_step,
    weighted_loss,
)

# Every option away from the reference, in three groups, so that each is compiled on both paths
# without a compile per option.
GROUPS = {
    "rope+layernorm+qk_norm+swiglu+tied+dropout": dict(
        positions="rope", norm="layernorm", qk_norm=True, mlp="swiglu", tie_embeddings=True,
        dropout=0.1, attention_dropout=0.1),
    "learned+relu2": dict(positions="learned", mlp="relu2"),
    "none": dict(positions="none"),
}
OPTION_GROUPS = pytest.mark.parametrize("options", GROUPS.values(), ids=GROUPS.keys())


def _apply(cfg, params, ids, dtype=jnp.float32, **kwargs):
    return build_model(cfg, dtype).apply({"params": params}, ids, **kwargs)


def _ids(cfg, batch=3, seed=1):
    return jax.random.randint(jax.random.key(seed), (batch, cfg.seq_len), 0, cfg.vocab_size)


# --- each option against an independent formula -------------------------------------------


def test_rope_rotates_each_pair_by_its_position_times_its_frequency():
    length, width, base = 6, 8, 100.0
    x = np.random.default_rng(0).normal(size=(2, length, width)).astype(np.float32)
    expected = np.empty_like(x)
    half = width // 2
    for position in range(length):
        for i in range(half):
            angle = position * base ** (-2 * i / width)
            rotation = np.array([[math.cos(angle), -math.sin(angle)],
                                 [math.sin(angle), math.cos(angle)]])
            pair = np.stack([x[:, position, i], x[:, position, i + half]])  # (2, batch)
            expected[:, position, i], expected[:, position, i + half] = rotation @ pair
    np.testing.assert_allclose(rotary(jnp.asarray(x), base), expected, rtol=1e-5, atol=1e-5)


def test_rope_scores_depend_only_on_the_offset():
    """The property RoPE exists for: q_m . k_n is a function of m - n alone."""
    rng = np.random.default_rng(1)
    q, k = rng.normal(size=8).astype(np.float32), rng.normal(size=8).astype(np.float32)
    qs = rotary(jnp.broadcast_to(q, (12, 8)), 10000.0)
    ks = rotary(jnp.broadcast_to(k, (12, 8)), 10000.0)
    scores = np.asarray(qs @ ks.T)
    for offset in range(4):
        np.testing.assert_allclose(np.diagonal(scores, -offset),
                                   scores[offset, 0], rtol=1e-4)


def _first_block(cfg, params, ids):
    """The first block's input (the embedded ids) and its intermediates, captured by flax."""
    _, state = build_model(cfg).apply({"params": params}, ids, capture_intermediates=True,
                                      mutable=["intermediates"])
    return state["intermediates"]


def test_layernorm_and_qk_norm_follow_their_formulas():
    cfg = tiny_config(norm="layernorm", qk_norm=True, positions="none")
    params = init_params(build_model(cfg), 0)
    ids = _ids(cfg)
    caught = _first_block(cfg, params, ids)["layers_0"]
    x = np.asarray(params["token_embedding"]["embedding"])[np.asarray(ids)]  # (B, L, D)
    mean, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
    np.testing.assert_allclose(caught["norm1"]["__call__"][0], (x - mean) / np.sqrt(var + 1e-5),
                               rtol=1e-4, atol=1e-5)  # scale 1, bias 0 at initialisation
    q = caught["attn"]["q_norm"]["__call__"][0]  # (B, H, L, K), after the norm
    np.testing.assert_allclose(np.sqrt(np.mean(np.square(q), -1)), 1.0, rtol=1e-4)


@pytest.mark.parametrize("mlp", ["swiglu", "relu2"])
def test_the_mlps_follow_their_formulas(mlp):
    cfg = tiny_config(mlp=mlp)
    params = init_params(build_model(cfg), 0)
    block = params["layers_0"]
    caught = _first_block(cfg, params, _ids(cfg))["layers_0"]
    x = np.asarray(caught["norm2"]["__call__"][0], np.float64)  # the MLP's input
    h = x @ np.asarray(block["ff_in"]["kernel"]) + np.asarray(block["ff_in"]["bias"])
    if mlp == "swiglu":
        gate, up = np.split(h, 2, axis=-1)
        h = gate / (1 + np.exp(-gate)) * up
    else:
        h = np.maximum(h, 0) ** 2
    expected = h @ np.asarray(block["ff_out"]["kernel"]) + np.asarray(block["ff_out"]["bias"])
    np.testing.assert_allclose(caught["ff_out"]["__call__"][0], expected, rtol=1e-4, atol=1e-5)


def test_a_tied_head_is_the_embedding_transposed():
    cfg = tiny_config(tie_embeddings=True)
    params = init_params(build_model(cfg), 0)
    assert "head" not in params
    ids = _ids(cfg)
    logits = _apply(cfg, params, ids)
    final = np.asarray(_first_block(cfg, params, ids)["norm"]["__call__"][0], np.float64)
    expected = final @ np.asarray(params["token_embedding"]["embedding"], np.float64).T
    np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-4)


def test_learned_positions_are_a_trained_table_added_to_the_embeddings():
    cfg = tiny_config(positions="learned")
    params = init_params(build_model(cfg), 0)
    table = params["position_embedding"]["embedding"]
    assert table.shape == (cfg.seq_len, cfg.d_model)
    ids = _ids(cfg)
    moved = jax.tree.map(lambda x: x, params)
    moved["position_embedding"]["embedding"] = table.at[3].add(1.0)
    before, after = _apply(cfg, params, ids), _apply(cfg, moved, ids)
    np.testing.assert_array_equal(before[:, :3], after[:, :3])  # causal: earlier positions
    assert not np.allclose(before[:, 3:], after[:, 3:])


def test_dropout_is_off_at_evaluation_and_a_pure_function_of_seed_and_step():
    cfg = tiny_config(dropout=0.3, attention_dropout=0.3)
    plain = tiny_config()
    params = init_params(build_model(cfg), 0)
    ids = _ids(cfg)
    np.testing.assert_array_equal(_apply(cfg, params, ids), _apply(plain, params, ids))
    state = create_train_state(cfg, "fp32")

    def train_logits(state):
        return _apply(cfg, params, ids, train=True, rngs={"dropout": state.dropout_key()})

    first = train_logits(state)
    np.testing.assert_array_equal(first, train_logits(create_train_state(cfg, "fp32")))
    assert not np.allclose(first, _apply(cfg, params, ids))
    assert not np.allclose(first, train_logits(state.replace(step=state.step + 1)))
    other_seed = create_train_state(cfg.replace(seed=1), "fp32")
    assert not np.allclose(first, train_logits(other_seed))


@pytest.mark.parametrize("rate", [0.1, 0.3])
def test_the_dropout_mask_drops_at_its_rate_and_keeps_the_mean(rate):
    mask = np.asarray(keep_mask(jax.random.key(0, impl="rbg"), rate, (1001, 999)))
    kept = mask[mask > 0]
    assert set(np.unique(mask)) == {0.0, kept[0]}
    assert kept[0] == pytest.approx(1 / (1 - rate), rel=1e-4)  # the rate on a 1/65536 grid
    assert (mask == 0).mean() == pytest.approx(rate, abs=0.002)  # 1e6 draws: sd 0.0005
    assert mask.mean() == pytest.approx(1.0, abs=0.003)


def test_the_embeddings_start_at_their_init_std():
    cfg = tiny_config(positions="learned", embed_init_std=0.02)
    params = init_params(build_model(cfg), 0)
    for table in ("token_embedding", "position_embedding"):
        assert np.std(params[table]["embedding"]) == pytest.approx(0.02, rel=0.1)


def _expected_count(cfg):
    """The parameter count worked by hand from the options."""
    d, f, v, k = cfg.d_model, cfg.d_ff, cfg.vocab_size, cfg.head_dim
    norm = 2 * d if cfg.norm == "layernorm" else d
    ff_in = d * 2 * f + 2 * f if cfg.mlp == "swiglu" else d * f + f
    block = (2 * norm + 3 * d * d + d * d + (2 * k if cfg.qk_norm else 0) + ff_in
             + f * d + d)
    return (v * d + (cfg.seq_len * d if cfg.positions == "learned" else 0)
            + cfg.n_layers * block + norm + (0 if cfg.tie_embeddings else d * v))


def test_the_parameter_count_is_right_for_every_combination():
    base = tiny_config()
    for positions, norm, mlp, qk_norm, tied in itertools.product(
            CHOICES["positions"], CHOICES["norm"], CHOICES["mlp"], (False, True),
            (False, True)):
        cfg = base.replace(positions=positions, norm=norm, mlp=mlp, qk_norm=qk_norm,
                           tie_embeddings=tied)
        params = jax.eval_shape(lambda cfg=cfg: init_params(build_model(cfg), 0))
        assert count_params(params) == _expected_count(cfg), cfg


# --- every option on the fast path and for a GPU ---------------------------------------------


@OPTION_GROUPS
def test_every_option_on_the_fast_path_tracks_float32(options):
    """The loss and every gradient of a training-mode step (the same dropout masks on both
    paths), within bf16's rounding as test_bf16's step test bounds it (3% of each gradient's
    norm; 1e-3 of the loss)."""
    cfg = tiny_config(**options)
    ids = jax.random.randint(jax.random.key(5), (16, cfg.seq_len + 1), 0, cfg.vocab_size)

    def loss_and_grads(state):
        def loss(params):
            logits = state.apply_fn({"params": params}, ids[:, :-1], train=True,
                                    rngs={"dropout": state.dropout_key()})
            loss_sum, tokens = weighted_loss(logits, ids[:, 1:], jnp.ones((ids.shape[0],)))
            return loss_sum / tokens

        return jax.jit(jax.value_and_grad(loss))(state.params)

    loss32, grads32 = loss_and_grads(create_train_state(cfg, "fp32"))
    loss16, grads16 = loss_and_grads(create_train_state(cfg, "bf16"))
    assert float(loss16) == pytest.approx(float(loss32), rel=1e-3)
    fast = dict(jax.tree_util.tree_leaves_with_path(grads16))
    for path, g32 in jax.tree_util.tree_leaves_with_path(grads32):
        error = float(jnp.linalg.norm(fast[path] - g32) / jnp.linalg.norm(g32))
        assert error < 0.03, (jax.tree_util.keystr(path), error)


@OPTION_GROUPS
def test_every_option_lowers_for_the_gpu_without_the_cpu_copies(options):
    cfg = tiny_config(**options)
    state = create_train_state(cfg, "bf16", platform="cuda")
    for step in (train_step, eval_step):
        gpu = _lowered(step, state, _batch(cfg), "cuda")
        assert not FAST_PATH_PIECES & _names(gpu)
        assert "stablehlo.dot_general" in gpu


# --- the recipe ----------------------------------------------------------------------------


def test_the_schedules_follow_their_closed_forms():
    total, warmup, peak, floor = 100, 10, 1e-3, 0.1
    cosine = lr_schedule(tiny_config(schedule="cosine", warmup_steps=warmup, lr_floor=floor),
                         total, peak)
    wsd = lr_schedule(tiny_config(schedule="wsd", warmup_steps=warmup, lr_floor=floor,
                                  decay_fraction=0.2), total, peak)
    for step in (0, 5, 10, 40, 79, 80, 90, 99, 100):
        ramp = peak * step / warmup
        progress = (step - warmup) / (total - warmup)
        want_cosine = ramp if step < warmup else (
            peak * floor + (peak - peak * floor) * 0.5 * (1 + math.cos(math.pi * progress)))
        want_wsd = ramp if step < warmup else (
            peak if step < 80 else peak + (peak * floor - peak) * min((step - 80) / 20, 1))
        assert float(cosine(step)) == pytest.approx(want_cosine, rel=1e-5, abs=1e-9), step
        assert float(wsd(step)) == pytest.approx(want_wsd, rel=1e-5, abs=1e-9), step
    assert lr_schedule(tiny_config(), total, peak) == peak  # the reference's: a constant
    plateau = lr_schedule(tiny_config(warmup_steps=4), total, peak)
    assert [float(plateau(s)) for s in (0, 2, 4, 50)] == pytest.approx([0, peak / 2, peak, peak])


@pytest.mark.parametrize("changes, total", [
    (dict(schedule="cosine", warmup_steps=10), 10),
    (dict(schedule="wsd", warmup_steps=8, decay_fraction=0.2), 10),
])
def test_a_schedule_that_does_not_fit_the_run_is_refused(changes, total):
    with pytest.raises(Exception, match="warmup_steps"):
        check_schedule(tiny_config(**changes), total)


def test_a_per_step_schedule_turns_the_plateau_off():
    state = create_train_state(tiny_config(schedule="cosine"), "fp32", total_steps=50)
    for loss in (1.0, 2.0, 3.0, 4.0):
        state = state.step_plateau(loss)
    assert float(state.plateau_state.scale) == 1.0


def test_muon_takes_the_blocks_matrices_and_adamw_the_rest():
    cfg = tiny_config(optimizer="muon")
    params = init_params(build_model(cfg), 0)
    specs = jax.tree_util.tree_leaves_with_path(
        muon_matrices(params),
        is_leaf=lambda x: x is None or isinstance(x, optax.contrib.MuonDimensionNumbers))
    muon = {jax.tree_util.keystr(path) for path, spec in specs if spec is not None}
    assert muon == {f"['layers_{i}']['{layer}']['{part}']['kernel']"
                    for i in range(cfg.n_layers)
                    for layer, part in (("attn", "qkv_proj"), ("attn", "out_proj"))} | {
        f"['layers_{i}']['{name}']['kernel']" for i in range(cfg.n_layers)
        for name in ("ff_in", "ff_out")}


def test_a_muon_step_orthogonalises_a_block_matrix_update():
    """Muon's update of a matrix has its singular values pulled together (Newton-Schulz); AdamW's
    of the same gradient does not. Measured by the ratio of the largest to the median."""
    ids = jnp.asarray(np.arange(4 * 17).reshape(4, 17) % 100, jnp.int32)
    batch = {"inputs": ids[:, :-1], "targets": ids[:, 1:], "weights": jnp.ones((4,))}

    def spread_of_update(optimizer):
        state = create_train_state(tiny_config(optimizer=optimizer, weight_decay=0.0), "fp32")
        before = np.asarray(state.params["layers_0"]["ff_in"]["kernel"])  # donated next
        after = train_step(state, batch)[0].params["layers_0"]["ff_in"]["kernel"]
        singular = np.linalg.svd(np.asarray(after - before), compute_uv=False)
        return singular[0] / np.median(singular)

    assert spread_of_update("muon") < 2.0 < spread_of_update("adamw")



def test_the_weights_moving_average_follows_its_recurrence_and_is_what_evaluation_reads():
    """avg_t = d_t avg_{t-1} + (1 - d_t) params_t with d_t = min(decay, (1 + t) / (10 + t)),
    from the initial weights; eval_step scores the average, not the latest weights."""
    cfg = tiny_config(ema_decay=0.9)
    ids = jnp.asarray(np.arange(4 * 17).reshape(4, 17) % cfg.vocab_size, jnp.int32)
    batch = {"inputs": ids[:, :-1], "targets": ids[:, 1:], "weights": jnp.ones((4,))}
    state = create_train_state(cfg, "fp32")
    average = jax.tree.map(np.asarray, state.params)
    for step in (1, 2, 3):
        state, _ = train_step(state, batch)
        decay = min(0.9, (1 + step) / (10 + step))
        average = jax.tree.map(lambda a, p, d=decay: d * a + (1 - d) * np.asarray(p), average,
                               state.params)
    for got, want in zip(jax.tree.leaves(state.ema_params), jax.tree.leaves(average),
                         strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
    scored = eval_step(state, batch)["loss_sum"]
    on_average = eval_step(state.replace(params=state.ema_params, ema_decay=0.0), batch)
    on_latest = eval_step(state.replace(ema_decay=0.0), batch)
    assert float(scored) == pytest.approx(float(on_average["loss_sum"]), rel=1e-6)
    assert float(scored) != pytest.approx(float(on_latest["loss_sum"]), rel=1e-6)
