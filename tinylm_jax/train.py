"""Train state, optimiser, the jitted train/eval steps and the epoch loops that chain them.

`train_step(state, batch) -> (state, metrics)` and `eval_step(state, batch) -> metrics` are pure,
module-level and jitted once per model; `train_step` donates its state. A batch is a dict:
  inputs (B, L) int32, targets (B, L) int32, weights (B,) float32 (0 marks a padding window).
Metrics are sums, `loss_sum` over real target tokens and `tokens` their count, so that means over
a split are token-weighted however its last batch is padded. Epochs run `train_chunk` and
`eval_chunk`: the same steps, scanned over C batches per compiled call.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct
from flax.training import train_state
from jax.sharding import Mesh
from tqdm import tqdm

from tinylm_jax.config import ExperimentConfig, UserError
from tinylm_jax.data import Dataset, batch_rows, gather_windows, train_order
from tinylm_jax.model import build_model, init_params
from tinylm_jax.parallel import shard_batch_rows

PRECISIONS = ("auto", "bf16", "fp32")


class TrainState(train_state.TrainState):
    """flax's TrainState plus the plateau schedule, whose scale multiplies every update."""

    plateau_state: optax.contrib.ReduceLROnPlateauState
    plateau: optax.GradientTransformationExtraArgs = struct.field(pytree_node=False)
    base_lr: float = struct.field(pytree_node=False)

    @property
    def learning_rate(self) -> float:
        return self.base_lr * float(self.plateau_state.scale)

    def step_plateau(self, val_loss: float) -> TrainState:
        """Advance the plateau schedule by one epoch's validation loss."""
        _, plateau_state = self.plateau.update({}, self.plateau_state, value=jnp.float32(val_loss))
        return self.replace(plateau_state=plateau_state)


def compute_dtype(precision: str) -> jnp.dtype:
    """`auto` is bfloat16 on GPU/TPU and float32 on CPU (the seed autocasts only on CUDA)."""
    if precision not in PRECISIONS:
        raise UserError(f"unknown precision '{precision}'; choose one of {', '.join(PRECISIONS)}")
    if precision == "auto":
        precision = "fp32" if jax.default_backend() == "cpu" else "bf16"
    return jnp.bfloat16 if precision == "bf16" else jnp.float32


def clip_norm_schedule(cfg: ExperimentConfig) -> optax.Schedule:
    """The global-norm bound on the true gradient at each step.

    The seed's notebook, on CUDA, clipped gradients still multiplied by GradScaler's scale (no
    `unscale_` first): clip(scale * g, c) / scale = clip(g, c / scale). Its scale starts at 2^16
    and doubles every 2,000 steps without overflow, so with Adam's eps of 1e-8 this damps learning.
    """
    def max_norm(count: jax.Array) -> jax.Array:
        doublings = (count // cfg.grad_scale_growth_interval
                     if cfg.grad_scale_growth_interval else 0)
        return cfg.grad_clip_norm / (cfg.grad_scale * 2.0 ** doublings)

    return max_norm


def make_optimizer(cfg: ExperimentConfig) -> optax.GradientTransformation:
    """Clip, then AdamW with torch's defaults (optax's default weight decay differs)."""
    return optax.chain(
        optax.inject_hyperparams(optax.clip_by_global_norm)(max_norm=clip_norm_schedule(cfg)),
        optax.adamw(cfg.lr, b1=cfg.adam_b1, b2=cfg.adam_b2, eps=cfg.adam_eps,
                    weight_decay=cfg.weight_decay),
    )


def make_plateau(cfg: ExperimentConfig) -> optax.GradientTransformationExtraArgs:
    """torch's ReduceLROnPlateau(mode="min", threshold_mode="rel") in optax.

    torch cuts the rate once the count of bad epochs *exceeds* its patience; optax cuts when the
    count *reaches* its own, hence the +1.
    """
    return optax.contrib.reduce_on_plateau(factor=cfg.plateau_factor,
                                           patience=cfg.plateau_patience + 1,
                                           rtol=cfg.plateau_threshold, atol=0.0)


def create_train_state(cfg: ExperimentConfig, precision: str = "auto") -> TrainState:
    model = build_model(cfg, compute_dtype(precision))
    params = init_params(model, cfg.seed)
    plateau = make_plateau(cfg)
    return TrainState.create(apply_fn=model.apply, params=params, tx=make_optimizer(cfg),
                             plateau=plateau, plateau_state=plateau.init(params), base_lr=cfg.lr)


def weighted_loss(logits: jax.Array, targets: jax.Array, weights: jax.Array
                  ) -> tuple[jax.Array, jax.Array]:
    """Summed cross-entropy over the real windows' tokens (float32) and the token count."""
    ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)
    token_weights = jnp.broadcast_to(weights[:, None], ce.shape)  # (B, L)
    return jnp.sum(ce * token_weights), jnp.sum(token_weights)


def _train_step(state: TrainState, batch: dict[str, jax.Array]
                ) -> tuple[TrainState, dict[str, jax.Array]]:
    def loss_fn(params):
        logits = state.apply_fn({"params": params}, batch["inputs"])
        loss_sum, tokens = weighted_loss(logits, batch["targets"], batch["weights"])
        return loss_sum / tokens, (loss_sum, tokens)

    (_, (loss_sum, tokens)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = state.tx.update(grads, state.opt_state, state.params)
    updates = optax.tree.scale(state.plateau_state.scale, updates)
    params = optax.apply_updates(state.params, updates)
    state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
    return state, {"loss_sum": loss_sum, "tokens": tokens}


def _eval_step(state: TrainState, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
    logits = state.apply_fn({"params": state.params}, batch["inputs"])
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


def _chunks(batch_rows: dict[str, np.ndarray], size: int) -> Iterator[dict[str, np.ndarray]]:
    for begin in range(0, len(batch_rows["starts"]), size):
        yield {key: rows[begin:begin + size] for key, rows in batch_rows.items()}


def _mean_loss(metrics: list[dict[str, jax.Array]]) -> tuple[float, int]:
    """Token-weighted mean loss over stacked step metrics (summed in float64 on the host)."""
    host = jax.device_get(metrics)
    loss_sum = float(np.sum([np.sum(m["loss_sum"], dtype=np.float64) for m in host]))
    tokens = int(np.sum([np.sum(m["tokens"], dtype=np.float64) for m in host]))
    return loss_sum / tokens, tokens


def _placed(chunk: dict[str, np.ndarray], mesh: Mesh | None) -> dict[str, Any]:
    return chunk if mesh is None else shard_batch_rows(chunk, mesh)


def train_epoch(state: TrainState, data: Dataset, cfg: ExperimentConfig, epoch: int,
                max_steps: int | None = None, progress: bool = True,
                steps_per_chunk: int | None = None, mesh: Mesh | None = None
                ) -> tuple[TrainState, dict[str, Any]]:
    """One pass over the training windows in the order of (seed, epoch); `max_steps` cuts it.

    The steps run in compiled chunks of `steps_per_chunk` with no host sync inside a chunk; the
    progress bar moves between chunks. Throughput is measured from the end of the first chunk, so
    its compilation does not count unless it is the only chunk; a shorter last chunk compiles
    once inside the measured time. With a `mesh`, each batch is split over its devices
    (the state and tokens must then be replicated on it: `parallel.replicate`).
    """
    rows = batch_rows(train_order(cfg.seed, epoch, data.splits.num_train), cfg.batch_size)
    total = len(rows["starts"]) if max_steps is None else min(len(rows["starts"]), max_steps)
    rows = {key: value[:total] for key, value in rows.items()}
    chunk_size = steps_per_chunk or default_steps_per_chunk()
    metrics: list[dict[str, jax.Array]] = []
    began = time.perf_counter()
    steady_from, first_tokens, first_steps = began, 0.0, 0
    with tqdm(total=total, desc=f"epoch {epoch}", unit="step", disable=not progress or None,
              leave=False, dynamic_ncols=True) as bar:
        for chunk in _chunks(rows, chunk_size):
            placed = _placed(chunk, mesh)
            state, chunk_metrics = train_chunk(state, data.tokens, placed["starts"],
                                               placed["weights"], seq_len=cfg.seq_len)
            metrics.append(chunk_metrics)
            if len(metrics) == 1 and total > len(chunk["starts"]):
                first_tokens = float(np.sum(jax.device_get(chunk_metrics)["tokens"]))
                steady_from, first_steps = time.perf_counter(), len(chunk["starts"])
            elif not bar.disable:
                last = jax.device_get(chunk_metrics)  # syncs, for the bar only
                done = (bar.n + len(chunk["starts"]) - first_steps) * cfg.batch_size * cfg.seq_len
                bar.set_postfix(loss=f"{last['loss_sum'][-1] / last['tokens'][-1]:.4f}",
                                tok_s=f"{done / (time.perf_counter() - steady_from):,.0f}")
            bar.update(len(chunk["starts"]))
    loss, tokens = _mean_loss(metrics)
    ended = time.perf_counter()
    return state, {"train_loss": loss, "steps": total, "train_tokens": tokens,
                   "epoch_seconds": ended - began,
                   "train_tokens_per_s": (tokens - first_tokens) / (ended - steady_from)}


def evaluate(state: TrainState, data: Dataset, cfg: ExperimentConfig,
             steps_per_chunk: int | None = None, mesh: Mesh | None = None) -> float:
    """Token-weighted mean loss over every validation window, in order, in compiled chunks."""
    rows = batch_rows(data.splits.validation_starts(), cfg.batch_size)
    chunk_size = steps_per_chunk or default_steps_per_chunk()
    metrics = []
    for chunk in _chunks(rows, chunk_size):
        placed = _placed(chunk, mesh)
        metrics.append(eval_chunk(state, data.tokens, placed["starts"], placed["weights"],
                                  seq_len=cfg.seq_len))
    return _mean_loss(metrics)[0]
