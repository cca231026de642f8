"""Train state, optimiser, the jitted train/eval steps and the epoch loops that chain them.

`train_step(state, batch) -> (state, metrics)` and `eval_step(state, batch) -> metrics` are pure,
module-level and jitted once per model; `train_step` donates its state. A batch is a dict:
  inputs (B, L) int32, targets (B, L) int32, weights (B,) float32 (0 marks a padding window).
Metrics are sums, `loss_sum` over real target tokens and `tokens` their count, so that means over
a split are token-weighted however its last batch is padded. Epochs run `train_chunk` and
`eval_chunk`: the same steps, scanned over C batches per compiled call.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct
from flax.training import train_state
from jax.sharding import Mesh
from tqdm import tqdm

from tinylm_jax.core.config import ExperimentConfig, UserError
from tinylm_jax.core.data import Dataset, batch_rows, gather_windows, num_batches, train_order
from tinylm_jax.core.model import build_model, init_params
from tinylm_jax.core.parallel import shard_batch_rows

PRECISIONS = ("auto", "bf16", "fp32")
T = TypeVar("T")


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


def compute_dtype(precision: str, platform: str | None = None) -> jnp.dtype:
    """The compute dtype of `precision` on `platform` (default: jax's default backend).
    `auto` is bfloat16 on GPU/TPU and float32 on CPU (the seed autocasts only on CUDA)."""
    if precision not in PRECISIONS:
        raise UserError(f"unknown precision '{precision}'; choose one of {', '.join(PRECISIONS)}")
    if precision == "auto":
        precision = "fp32" if (platform or jax.default_backend()) == "cpu" else "bf16"
    return jnp.bfloat16 if precision == "bf16" else jnp.float32


def compute_dtype_name(precision: str) -> str:
    """The compute dtype's name ("float32", "bfloat16"): what config.json and summaries record."""
    return str(np.dtype(compute_dtype(precision)))


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


def create_train_state(cfg: ExperimentConfig, precision: str = "auto",
                       platform: str | None = None) -> TrainState:
    """A fresh state: the model for `platform` (default: jax's default backend) in `precision`,
    its initial params, AdamW and the plateau schedule."""
    model = build_model(cfg, compute_dtype(precision, platform), platform)
    params = init_params(model, cfg.seed)
    plateau = make_plateau(cfg)
    state = TrainState.create(apply_fn=model.apply, params=params, tx=make_optimizer(cfg),
                              plateau=plateau, plateau_state=plateau.init(params), base_lr=cfg.lr)
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


def token_weighted_mean(loss_sums: Any, token_counts: Any) -> float:
    """Mean loss per token from per-step sums, summed in float64 in their given order."""
    return (float(np.sum(np.asarray(loss_sums, np.float64)))
            / float(np.sum(np.asarray(token_counts, np.float64))))


class TrainingDiverged(Exception):
    """A non-finite loss: the run stops, and the broken state is never checkpointed."""


@dataclasses.dataclass
class EpochProgress:
    """How far one epoch has got: enough to continue it mid-way with nothing changed.

    The per-step sums are kept, not a running total, so that an epoch continued after a stop sums
    exactly the same numbers in the same order as one that ran straight through.
    """

    epoch: int  # 1-based epoch number; it fixes the order of the training windows
    steps_total: int  # optimiser steps this epoch takes when it runs to its end
    steps_done: int = 0  # steps taken so far
    loss_sums: list[float] = dataclasses.field(default_factory=list)  # summed CE, one per step
    token_counts: list[float] = dataclasses.field(default_factory=list)  # its tokens, per step
    seconds: float = 0.0  # training time spent on this epoch so far, over every session
    tokens_per_s: float = math.nan  # throughput of the latest session, first chunk excluded

    @property
    def finished(self) -> bool:
        return self.steps_done == self.steps_total

    @property
    def train_loss(self) -> float:
        """Token-weighted mean training loss over the steps done."""
        return token_weighted_mean(self.loss_sums, self.token_counts)

    def to_record(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> EpochProgress:
        return cls(**record)


def epoch_steps(cfg: ExperimentConfig, data: Dataset, max_steps: int | None = None) -> int:
    """Optimiser steps per epoch: every training window once, or `max_steps` if fewer."""
    steps = num_batches(data.splits.num_train, cfg.batch_size)
    return steps if max_steps is None else min(steps, max_steps)


# tqdm's layout less its own rate (s/step), so that the throughput in the postfix still fits
# an 80-column terminal.
BAR_FORMAT = "{desc} {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}{postfix}]"


def progress_bar(show: bool, total: int, desc: str, initial: int = 0) -> tqdm:
    """A bar on a terminal only (tqdm's disable=None: logs stay clean), cleared when done so that
    the epoch's summary line stands alone."""
    return tqdm(total=total, initial=initial, desc=desc, disable=not show or None, leave=False,
                dynamic_ncols=True, bar_format=BAR_FORMAT)


@dataclasses.dataclass
class Throughput:
    """Items per second from the end of the first chunk on: the first one compiles."""

    since: float | None = None  # when the first chunk was seen done
    items: float = 0.0  # items of the chunks done after it

    def chunk_done(self, items: float) -> None:
        if self.since is None:
            self.since = time.perf_counter()
        else:
            self.items += items

    def per_second(self, now: float) -> float:
        if self.since is None or not self.items:
            return math.nan
        return self.items / (now - self.since)

    def text(self, unit: str) -> str:
        """The rate so far as "32,768 tok/s", or "" before there is a fair figure."""
        rate = self.per_second(time.perf_counter())
        return f"{rate:,.0f} {unit}/s" if math.isfinite(rate) else ""


def _never() -> bool:
    return False


@dataclasses.dataclass(frozen=True)
class LoopOptions:
    """How `train_epoch` and `evaluate` run; nothing here changes a result."""

    steps_per_chunk: int | None = None  # steps per compiled call; None: the backend's default
    # Split each batch over this mesh's devices; the state and tokens must then be replicated on
    # it (`parallel.replicate`).
    mesh: Mesh | None = None
    show_progress: bool = True  # a bar, on a terminal only
    stop_requested: Callable[[], bool] = _never  # polled between chunks

    def chunks(self, rows: dict[str, np.ndarray], begin: int, end: int
               ) -> Iterator[tuple[int, dict[str, Any]]]:
        """Rows [begin, end) of batch `rows` (N, B) in chunks of at most `steps_per_chunk`,
        each with its first row's index and placed on the mesh."""
        size = self.steps_per_chunk or default_steps_per_chunk()
        for first in range(begin, end, size):
            chunk = {key: value[first:min(first + size, end)] for key, value in rows.items()}
            yield first, chunk if self.mesh is None else shard_batch_rows(chunk, self.mesh)


def _collect_one_behind(launched: Iterable[T], collect: Callable[[T], None]) -> None:
    """`collect` each launched chunk once the next one is launched, and the last at the end:
    the host waits on a chunk while the device already runs the next."""
    previous: list[T] = []
    for item in launched:
        if previous:
            collect(previous.pop())
        previous.append(item)
    if previous:
        collect(previous.pop())


def _checked_losses(progress: EpochProgress, first: int, metrics: dict[str, Any]
                    ) -> dict[str, np.ndarray]:
    """A chunk's metrics on the host; a non-finite loss raises before anything can save it."""
    host = jax.device_get(metrics)
    if not np.all(np.isfinite(host["loss_sum"])):
        raise TrainingDiverged(f"epoch {progress.epoch}, steps {first + 1}-"
                               f"{first + len(host['loss_sum'])}: non-finite training loss; "
                               "stopped without checkpointing it")
    return host


def train_epoch(state: TrainState, data: Dataset, cfg: ExperimentConfig,
                progress: EpochProgress, until: int | None = None,
                options: LoopOptions = LoopOptions()) -> tuple[TrainState, EpochProgress]:
    """Continue an epoch from `progress.steps_done` in the window order of (seed, epoch).

    It runs to the epoch's end, to step `until` of it, or to the first chunk boundary at which
    `options.stop_requested()` is true, whichever comes first. There is no host sync inside a
    chunk: each chunk's losses are fetched and checked while the next one runs, so a non-finite
    loss raises `TrainingDiverged` a chunk late, before anything can save it.
    """
    rows = batch_rows(train_order(cfg.seed, progress.epoch, data.splits.num_train),
                      cfg.batch_size)
    end = progress.steps_total if until is None else min(progress.steps_total, until)
    throughput = Throughput()  # tokens per second
    bar = progress_bar(options.show_progress, progress.steps_total, f"epoch {progress.epoch}",
                       progress.steps_done)

    def launched() -> Iterator[tuple[int, dict[str, jax.Array]]]:
        nonlocal state
        for first, chunk in options.chunks(rows, progress.steps_done, end):
            if options.stop_requested():
                return
            state, metrics = train_chunk(state, data.tokens, chunk["starts"], chunk["weights"],
                                         seq_len=cfg.seq_len)
            yield first, metrics

    def collect(item: tuple[int, dict[str, jax.Array]]) -> None:
        host = _checked_losses(progress, *item)
        steps = len(host["loss_sum"])
        progress.loss_sums.extend(float(x) for x in host["loss_sum"])
        progress.token_counts.extend(float(x) for x in host["tokens"])
        progress.steps_done += steps
        throughput.chunk_done(steps * cfg.batch_size * cfg.seq_len)
        loss = progress.loss_sums[-1] / progress.token_counts[-1]
        bar.set_postfix_str(f"loss={loss:.4f} {throughput.text('tok')}".rstrip(), refresh=False)
        bar.update(steps)

    began = time.perf_counter()
    with bar:
        _collect_one_behind(launched(), collect)
    ended = time.perf_counter()
    progress.seconds += ended - began
    if throughput.items:
        progress.tokens_per_s = throughput.per_second(ended)
    return state, progress


def evaluate(state: TrainState, data: Dataset, cfg: ExperimentConfig,
             options: LoopOptions = LoopOptions()) -> float | None:
    """Token-weighted mean loss over every validation window, in order, in compiled chunks.

    None if `options.stop_requested()` turned true first: the pass is abandoned between chunks.
    Each chunk is waited for while the next one runs, so that the bar counts batches actually
    done.
    """
    rows = batch_rows(data.splits.validation_starts(), cfg.batch_size)
    metrics: list[dict[str, jax.Array]] = []
    throughput = Throughput()  # windows per second
    bar = progress_bar(options.show_progress, len(rows["starts"]), "validation")
    stopped = False

    def launched() -> Iterator[tuple[int, dict[str, jax.Array]]]:
        nonlocal stopped
        for first, chunk in options.chunks(rows, 0, len(rows["starts"])):
            if metrics and options.stop_requested():
                stopped = True
                return
            metrics.append(eval_chunk(state, data.tokens, chunk["starts"], chunk["weights"],
                                      seq_len=cfg.seq_len))
            yield first, metrics[-1]

    def collect(item: tuple[int, dict[str, jax.Array]]) -> None:
        first, chunk_metrics = item
        jax.block_until_ready(chunk_metrics)
        weights = rows["weights"][first:first + len(chunk_metrics["tokens"])]
        throughput.chunk_done(float(weights.sum()))  # padding windows weigh 0
        bar.set_postfix_str(throughput.text("windows"), refresh=False)
        bar.update(len(weights))

    with bar:
        _collect_one_behind(launched(), collect)
    if stopped:
        return None
    host = jax.device_get(metrics)
    return token_weighted_mean(np.concatenate([m["loss_sum"] for m in host]),
                               np.concatenate([m["tokens"] for m in host]))
