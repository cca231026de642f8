"""Train state, optimiser, and the jitted train/eval steps: the pure core of training.

`train_step(state, batch) -> (state, metrics)` and `eval_step(state, batch) -> metrics` are pure,
module-level and jitted once per model; `train_step` donates its state. A batch is a dict:
  inputs (B, L) int32, targets (B, L) int32, weights (B,) float32 (0 marks a padding window).
Metrics are sums, `loss_sum` over real target tokens and `tokens` their count, so that means over
a split are token-weighted however its last batch is padded. `train_chunk` and `eval_chunk` are
the same steps, scanned over C batches per compiled call; the loop that chains them is
`run.loop`'s.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct
from flax.training import train_state

from tinylm_jax.core.config import ExperimentConfig, UserError
from tinylm_jax.core.data import gather_windows
from tinylm_jax.core.model import build_model, init_params

PRECISIONS = ("auto", "bf16", "fp32")


class TrainState(train_state.TrainState):
    """flax's TrainState plus the plateau schedule, whose scale multiplies every update.

    What a resume must restore is exactly this class's array fields (`arrays`): the params, the
    optimiser's state (its step count drives a per-step schedule), the plateau's state, the
    weights' moving average and the step (which, with the seed, fixes the dropout stream). New
    loop state that must survive a resume is declared here, as one more array field, and nowhere
    else.
    """

    plateau_state: optax.contrib.ReduceLROnPlateauState
    plateau: optax.GradientTransformationExtraArgs = struct.field(pytree_node=False)
    ema_params: Any  # the weights' moving average (`ema_decay`); {} when it is off
    lr_schedule: optax.Schedule = struct.field(pytree_node=False)  # the peak-lr-relative curve
    seed: int = struct.field(pytree_node=False, default=0)  # of the dropout stream
    ema_decay: float = struct.field(pytree_node=False, default=0.0)

    @property
    def learning_rate(self) -> float:
        """The rate of the next step (AdamW's; with muon, that of the parameters AdamW keeps)."""
        return float(self.lr_schedule(self.step)) * float(self.plateau_state.scale)

    def step_plateau(self, val_loss: float) -> TrainState:
        """Advance the plateau schedule by one epoch's validation loss."""
        _, plateau_state = self.plateau.update({}, self.plateau_state, value=jnp.float32(val_loss))
        return self.replace(plateau_state=plateau_state)

    def dropout_key(self) -> jax.Array:
        """The dropout stream's key for the next step: a pure function of (seed, step). Its bits
        come from XLA's RngBitGenerator ("rbg"), which draws them several times faster than
        threefry on a CPU."""
        stream = jax.random.fold_in(jax.random.key(self.seed, impl="rbg"), DROPOUT_STREAM)
        return jax.random.fold_in(stream, self.step)

    def eval_params(self) -> Any:
        """The weights that validation and the analyses use: the average where there is one."""
        return self.ema_params if self.ema_decay else self.params

    def with_eval_params(self, params: Any) -> TrainState:
        """This state evaluating `params` (a checkpoint's `eval_params`)."""
        return self.replace(params=params, ema_params=params if self.ema_decay else {})

    def averaged(self) -> TrainState:
        """The moving average advanced by this step's params (a no-op when it is off)."""
        if not self.ema_decay:
            return self
        step = self.step.astype(jnp.float32)
        decay = jnp.minimum(self.ema_decay, (1.0 + step) / (10.0 + step))
        ema = jax.tree.map(lambda avg, new: decay * avg + (1.0 - decay) * new, self.ema_params,
                           self.params)
        return self.replace(ema_params=ema)

    def arrays(self) -> dict[str, Any]:
        """Every array field that holds arrays, by name: what a checkpoint saves and a restore
        puts back (one that holds none, as `ema_params` without averaging, is not saved, so
        checkpoints from before a field still restore)."""
        fields = (field.name for field in dataclasses.fields(self)
                  if field.metadata.get("pytree_node", True))
        return {name: getattr(self, name) for name in fields
                if jax.tree.leaves(getattr(self, name))}


DROPOUT_STREAM = 1  # folded into the seed's key, apart from the parameters' initialisation


def compute_dtype(precision: str) -> jnp.dtype:
    """The compute dtype of `precision`.

    `auto` is the fastest precision whose full protocol has been shown to stay within 2% of the
    reference at every epoch: bfloat16, on every platform (on a CPU, the fast path; the speeds
    are in docs/performance.md, the protocols in results/README.md).
    """
    if precision not in PRECISIONS:
        raise UserError(f"unknown precision '{precision}'; choose one of {', '.join(PRECISIONS)}")
    return jnp.float32 if precision == "fp32" else jnp.bfloat16


def compute_dtype_name(precision: str) -> str:
    """The compute dtype's name ("float32", "bfloat16"): what config.json and summaries record."""
    return str(np.dtype(compute_dtype(precision)))


def clip_norm_schedule(cfg: ExperimentConfig) -> optax.Schedule:
    """The global-norm bound on the true gradient at each step.

    The reference's notebook, on CUDA, clipped gradients still multiplied by GradScaler's scale (no
    `unscale_` first): clip(scale * g, c) / scale = clip(g, c / scale). Its scale starts at 2^16
    and doubles every 2,000 steps without overflow, so with Adam's eps of 1e-8 this damps learning.
    """
    def max_norm(count: jax.Array) -> jax.Array:
        doublings = (count // cfg.grad_scale_growth_interval
                     if cfg.grad_scale_growth_interval else 0)
        return cfg.grad_clip_norm / (cfg.grad_scale * 2.0 ** doublings)

    return max_norm


def check_schedule(cfg: ExperimentConfig, total_steps: int) -> None:
    """Refuse a per-step schedule that does not fit in the run's `total_steps`."""
    if cfg.schedule == "plateau":
        return
    decay = round(cfg.decay_fraction * total_steps) if cfg.schedule == "wsd" else 0
    if cfg.warmup_steps + decay >= total_steps:
        parts = f"warmup_steps ({cfg.warmup_steps})" + (f" and the decay ({decay} steps)"
                                                         if decay else "")
        raise UserError(f"{parts} must leave steps over in the run's {total_steps} steps "
                        f"(schedule = {cfg.schedule!r})")


def lr_schedule(cfg: ExperimentConfig, total_steps: int, peak: float) -> optax.ScalarOrSchedule:
    """The learning rate at each optimiser step, peaking at `peak`, for a run of `total_steps`
    (`check_schedule` has passed; a shorter length only shapes a template state).

    The plateau's is the constant `peak` itself (the reference's), after any warmup; cosine and
    wsd reach `peak * lr_floor` at step `total_steps`, one after the run's last.
    """
    floor, warmup = peak * cfg.lr_floor, cfg.warmup_steps
    if cfg.schedule == "plateau":
        return optax.warmup_constant_schedule(0.0, peak, warmup) if warmup else peak
    total_steps = max(total_steps, warmup + 1)
    if cfg.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(0.0, peak, warmup, total_steps, floor)
    decay = min(round(cfg.decay_fraction * total_steps), total_steps - warmup)
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup),
                                 optax.constant_schedule(peak),
                                 optax.linear_schedule(peak, floor, max(decay, 1))],
                                [warmup, total_steps - decay])


def muon_matrices(params: Any) -> Any:
    """Muon's share of the params: the blocks' weight matrices, orthogonalised as (in, out); the
    embeddings, the head, biases and norms (None) stay with AdamW, as Muon's authors keep them."""
    def spec(path: tuple[Any, ...], leaf: jax.Array) -> optax.contrib.MuonDimensionNumbers | None:
        names = [getattr(key, "key", "") for key in path]
        in_block = any(str(name).startswith("layers_") for name in names)
        return (optax.contrib.MuonDimensionNumbers()
                if in_block and names[-1] == "kernel" and leaf.ndim == 2 else None)

    return jax.tree_util.tree_map_with_path(spec, params)


def make_optimizer(cfg: ExperimentConfig, total_steps: int = 1) -> optax.GradientTransformation:
    """Clip, then AdamW with torch's defaults (optax's default weight decay differs), or Muon
    for the blocks' matrices beside AdamW for the rest; each at its schedule."""
    clip = optax.inject_hyperparams(optax.clip_by_global_norm)(max_norm=clip_norm_schedule(cfg))
    adam_lr = lr_schedule(cfg, total_steps, cfg.lr)
    if cfg.optimizer == "muon":
        return optax.chain(clip, optax.contrib.muon(
            lr_schedule(cfg, total_steps, cfg.muon_lr), eps=cfg.adam_eps,
            weight_decay=cfg.weight_decay,
            adam_b1=cfg.adam_b1, adam_b2=cfg.adam_b2, adam_weight_decay=cfg.weight_decay,
            adam_learning_rate=adam_lr, muon_weight_dimension_numbers=muon_matrices))
    return optax.chain(clip, optax.adamw(adam_lr, b1=cfg.adam_b1, b2=cfg.adam_b2,
                                         eps=cfg.adam_eps, weight_decay=cfg.weight_decay))


def make_plateau(cfg: ExperimentConfig) -> optax.GradientTransformationExtraArgs:
    """torch's ReduceLROnPlateau(mode="min", threshold_mode="rel") in optax; under a per-step
    schedule (cosine, wsd) its scale is held at 1 (min_scale): it never cuts.

    torch cuts the rate once the count of bad epochs *exceeds* its patience; optax cuts when the
    count *reaches* its own, hence the +1.
    """
    per_step = {} if cfg.schedule == "plateau" else {"min_scale": 1.0}
    return optax.contrib.reduce_on_plateau(factor=cfg.plateau_factor,
                                           patience=cfg.plateau_patience + 1,
                                           rtol=cfg.plateau_threshold, atol=0.0, **per_step)


def create_train_state(cfg: ExperimentConfig, precision: str = "auto",
                       platform: str | None = None, total_steps: int = 1,
                       products: str = "xla") -> TrainState:
    """A fresh state: the model for `platform` (default: jax's default backend) in `precision`,
    its bf16 products on `products` ("xla", or "mkl" as `products_for` resolves it), its initial
    params, the optimiser and the plateau schedule. `total_steps`, the optimiser steps of the
    whole run, sets the length of a per-step schedule (cosine, wsd)."""
    model = build_model(cfg, compute_dtype(precision), platform, products)
    params = init_params(model, cfg.seed)
    plateau = make_plateau(cfg)
    schedule = lr_schedule(cfg, total_steps, cfg.lr)
    state = TrainState.create(apply_fn=model.apply, params=params,
                              tx=make_optimizer(cfg, total_steps), plateau=plateau,
                              plateau_state=plateau.init(params), seed=cfg.seed,
                              ema_params=jax.tree.map(jnp.copy, params) if cfg.ema_decay else {},
                              ema_decay=cfg.ema_decay,
                              lr_schedule=schedule if callable(schedule) else lambda _: schedule)
    return state.replace(step=jnp.zeros((), jnp.int32))  # the dtype training gives it


def weighted_loss(logits: jax.Array, targets: jax.Array, weights: jax.Array
                  ) -> tuple[jax.Array, jax.Array]:
    """Summed cross-entropy over the real windows' tokens (float32) and the token count."""
    ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)
    token_weights = jnp.broadcast_to(weights[:, None], ce.shape)  # (B, L)
    return jnp.sum(ce * token_weights), jnp.sum(token_weights)


def _train_step(state: TrainState, batch: dict[str, jax.Array]
                ) -> tuple[TrainState, dict[str, jax.Array]]:
    def loss_fn(params):
        logits = state.apply_fn({"params": params}, batch["inputs"], train=True,
                                rngs={"dropout": state.dropout_key()})
        loss_sum, tokens = weighted_loss(logits, batch["targets"], batch["weights"])
        return loss_sum / tokens, (loss_sum, tokens)

    (_, (loss_sum, tokens)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = state.tx.update(grads, state.opt_state, state.params)
    updates = optax.tree.scale(state.plateau_state.scale, updates)
    params = optax.apply_updates(state.params, updates)
    # What the metrics writer shows: this step's rate and its gradient's norm before clipping.
    lr = state.lr_schedule(state.step) * state.plateau_state.scale
    metrics = {"loss_sum": loss_sum, "tokens": tokens, "lr": jnp.asarray(lr, jnp.float32),
               "grad_norm": optax.tree.norm(grads)}
    state = state.replace(step=state.step + 1, params=params, opt_state=opt_state).averaged()
    return state, metrics


def _eval_step(state: TrainState, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
    logits = state.apply_fn({"params": state.eval_params()}, batch["inputs"])
    loss_sum, tokens = weighted_loss(logits, batch["targets"], batch["weights"])
    return {"loss_sum": loss_sum, "tokens": tokens}


train_step = jax.jit(_train_step, donate_argnums=0)
eval_step = jax.jit(_eval_step)


@functools.partial(jax.jit, static_argnames="seq_len")
def make_batch(tokens: jax.Array, starts: jax.Array, weights: jax.Array, seq_len: int
               ) -> dict[str, jax.Array]:
    inputs, targets = gather_windows(tokens, starts, seq_len)
    return {"inputs": inputs, "targets": targets, "weights": weights}


def _scan_batches(step, carry: Any, tokens: jax.Array, starts: jax.Array, weights: jax.Array,
                  seq_len: int) -> tuple[Any, dict[str, jax.Array]]:
    """Run `step(carry, batch)` over the batches whose window starts and weights are the rows of
    `starts` and `weights` (C, B); the windows are gathered on the device, batch by batch."""
    def body(carry, rows):
        return step(carry, make_batch(tokens, *rows, seq_len=seq_len))

    return jax.lax.scan(body, carry, (starts, weights))


@functools.partial(jax.jit, donate_argnums=0, static_argnames="seq_len")
def train_chunk(state: TrainState, tokens: jax.Array, starts: jax.Array, weights: jax.Array,
                seq_len: int) -> tuple[TrainState, dict[str, jax.Array]]:
    """`train_step` over C batches in one compiled call: metrics come back stacked, (C,) each."""
    return _scan_batches(_train_step, state, tokens, starts, weights, seq_len)


@functools.partial(jax.jit, static_argnames="seq_len")
def eval_chunk(state: TrainState, tokens: jax.Array, starts: jax.Array, weights: jax.Array,
               seq_len: int) -> dict[str, jax.Array]:
    """`eval_step` over C batches in one compiled call, metrics stacked (C,)."""
    return _scan_batches(lambda st, batch: (st, _eval_step(st, batch)), state, tokens, starts,
                         weights, seq_len)[1]


def default_steps_per_chunk() -> int:
    """Steps per compiled call: many where dispatch dominates, few where a step takes a second."""
    return 10 if jax.default_backend() == "cpu" else 100


def token_weighted_mean(loss_sums: Any, token_counts: Any) -> float:
    """Mean loss per token from per-step sums, summed in float64 in their given order."""
    return (float(np.sum(np.asarray(loss_sums, np.float64)))
            / float(np.sum(np.asarray(token_counts, np.float64))))


class TrainingDiverged(Exception):
    """A non-finite loss: the run stops, and the broken state is never checkpointed."""
