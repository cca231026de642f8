"""The training loop's epochs and validation passes: chunking, stopping, continuing, the rates
and the bars. Whole runs through the loop (resume, signals, hooks) are test_cli's and
test_reliability's."""

import functools
import io
import json
import re
import signal
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from tqdm import tqdm

from tinylm_jax.core.data import batches, build_dataset, gather_windows, train_order
from tinylm_jax.core.parallel import data_mesh
from tinylm_jax.core.protocol import Clock
from tinylm_jax.core.train import (
    TrainingDiverged,
    create_train_state,
    eval_step,
    make_batch,
    train_step,
)
from tinylm_jax.run import loop
from tinylm_jax.run.loop import EpochProgress, Loop, evaluate, train_epoch


class AskedAfter:
    """Stop signals that ask for a stop from the `calls`-th poll on."""

    received = signal.SIGTERM
    signal_name = "SIGTERM"

    def __init__(self, calls: int):
        self.calls, self.polled = calls, 0

    def requested(self) -> bool:
        self.polled += 1
        return self.polled >= self.calls


def _loop(cfg, data, steps_per_chunk=None, asked_after=None, show_progress=False):
    signals = AskedAfter(asked_after) if asked_after else AskedAfter(10**9)
    return Loop(cfg=cfg, data=data, mesh=data_mesh(), clock=Clock.of(cfg, data.splits),
                steps_per_chunk=steps_per_chunk, show_progress=show_progress, signals=signals)


def test_an_epoch_lowers_the_loss_and_counts_every_window(tiny_data, tiny_cfg):
    run = _loop(tiny_cfg, tiny_data)
    state = create_train_state(tiny_cfg, "fp32")
    before = evaluate(run, state)
    progress = EpochProgress(1, run.steps_per_epoch)
    state = train_epoch(run, state, progress)
    assert sum(progress.token_counts) == tiny_data.splits.num_train * tiny_cfg.seq_len
    assert progress.finished
    assert progress.steps_done == len(progress.loss_sums) == -(-tiny_data.splits.num_train
                                                                // tiny_cfg.batch_size)
    assert evaluate(run, state) < before


def test_masked_validation_mean_equals_the_unpadded_mean(tiny_cfg, corpus_text):
    cfg = tiny_cfg.replace(batch_size=37)  # the validation split is not a multiple of 37
    data = build_dataset(corpus_text[:8000], cfg)
    assert data.splits.num_val % cfg.batch_size
    state = create_train_state(cfg, "fp32")
    starts = jnp.arange(data.splits.num_train, data.splits.num_train + data.splits.num_val)
    inputs, targets = gather_windows(data.tokens, starts, cfg.seq_len)
    logits = state.apply_fn({"params": state.params}, inputs)
    direct = optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()
    assert evaluate(_loop(cfg, data), state) == pytest.approx(float(direct), rel=1e-6)


def _stepwise_eval(state, data, cfg):
    sums = [eval_step(state, make_batch(data.tokens, rows["starts"], rows["weights"],
                                        seq_len=cfg.seq_len))
            for rows in batches(data.splits.validation_starts(), cfg.batch_size)]
    return (float(np.sum([m["loss_sum"] for m in sums], dtype=np.float64))
            / float(np.sum([m["tokens"] for m in sums], dtype=np.float64)))


def test_compiled_chunks_equal_the_step_by_step_path(tiny_data, tiny_cfg):
    stepwise, losses = create_train_state(tiny_cfg, "fp32"), []
    num_train = tiny_data.splits.num_train
    for rows in batches(train_order(tiny_cfg.seed, 1, num_train), tiny_cfg.batch_size):
        batch = make_batch(tiny_data.tokens, rows["starts"], rows["weights"],
                           seq_len=tiny_cfg.seq_len)
        stepwise, metrics = train_step(stepwise, batch)
        losses.append(metrics["loss_sum"])
    expected = float(np.sum(losses, dtype=np.float64)) / (num_train * tiny_cfg.seq_len)
    for steps_per_chunk in (7, 1000):  # a remainder chunk, the whole epoch
        run = _loop(tiny_cfg, tiny_data, steps_per_chunk)
        progress = EpochProgress(1, run.steps_per_epoch)
        chunked = train_epoch(run, create_train_state(tiny_cfg, "fp32"), progress)
        assert progress.train_loss == pytest.approx(expected, rel=1e-12)  # float64 sums
        for a, b in zip(jax.tree.leaves(chunked.params), jax.tree.leaves(stepwise.params),
                        strict=True):
            np.testing.assert_array_equal(a, b)
        assert evaluate(run, chunked) == pytest.approx(_stepwise_eval(stepwise, tiny_data,
                                                                      tiny_cfg), rel=1e-12)


def test_an_epoch_stopped_and_continued_equals_one_run_straight_through(tiny_data, tiny_cfg):
    """Stop at step 5 (not a chunk boundary) and at a requested stop, continue from a JSON round
    trip of the progress: params, optimiser state and the epoch's loss are bit-identical. In bf16,
    the fast path's precision; test_cli's resume proves the same for fp32 through the CLI."""
    precision = "bf16"
    steps = Clock.of(tiny_cfg, tiny_data.splits).steps_per_pass
    whole = EpochProgress(2, steps)
    straight = train_epoch(_loop(tiny_cfg, tiny_data, 3), create_train_state(tiny_cfg, precision),
                           whole)
    part = EpochProgress(2, steps)
    state = train_epoch(_loop(tiny_cfg, tiny_data, 3), create_train_state(tiny_cfg, precision),
                        part, until=5)
    assert (part.steps_done, part.finished) == (5, False)
    part = EpochProgress.from_record(json.loads(json.dumps(part.to_record())))
    state = train_epoch(_loop(tiny_cfg, tiny_data, 2, asked_after=3), state, part)
    assert part.steps_done == 9  # two chunks of 2, then the stop
    state = train_epoch(_loop(tiny_cfg, tiny_data), state, part)
    assert part.finished and part.train_loss == whole.train_loss
    assert part.loss_sums == whole.loss_sums
    for a, b in zip(jax.tree.leaves((state.params, state.opt_state)),
                    jax.tree.leaves((straight.params, straight.opt_state)), strict=True):
        np.testing.assert_array_equal(a, b)


def test_a_non_finite_loss_stops_the_epoch(tiny_data, tiny_cfg):
    state = create_train_state(tiny_cfg, "fp32")
    state = state.replace(params=jax.tree.map(lambda x: x * jnp.nan, state.params))
    with pytest.raises(TrainingDiverged, match="epoch 1, steps 1-2: non-finite training loss"):
        train_epoch(_loop(tiny_cfg, tiny_data, 2), state,
                    EpochProgress(1, Clock.of(tiny_cfg, tiny_data.splits).steps_per_pass))


def test_evaluation_stops_between_chunks_when_asked(tiny_data, tiny_cfg):
    """Asked before its second chunk, the pass stops there; never asked, it is the mean over the
    whole split."""
    state = create_train_state(tiny_cfg, "fp32")
    assert evaluate(_loop(tiny_cfg, tiny_data, 1, asked_after=1), state) is None
    assert evaluate(_loop(tiny_cfg, tiny_data, 1), state) == \
        pytest.approx(_stepwise_eval(state, tiny_data, tiny_cfg), rel=1e-12)


def test_an_epoch_of_one_chunk_has_a_rate_without_its_compilation(tiny_data, tiny_cfg):
    """The chunk is compiled before the clock starts: the rate is finite for a single chunk,
    and higher than the rate over the epoch's seconds, which count the compilation too."""
    progress = EpochProgress(1, 2)
    train_epoch(_loop(tiny_cfg, tiny_data, 4), create_train_state(tiny_cfg, "fp32"), progress)
    assert progress.steps_done == 2 and np.isfinite(progress.tokens_per_s)
    tokens = sum(progress.token_counts)
    assert progress.tokens_per_s > tokens / progress.seconds


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture
def run_both(tiny_data, tiny_cfg):
    """Train 6 steps and validate once, one step per chunk, so that the bars move often."""

    def run() -> None:
        run = _loop(tiny_cfg, tiny_data, 1, show_progress=True)
        state = train_epoch(run, create_train_state(tiny_cfg, "fp32"), EpochProgress(1, 6))
        evaluate(run, state)

    return run


def test_on_an_80_column_terminal_both_bars_show_their_throughput(run_both, monkeypatch):
    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    # A stream without a tty size: tqdm then takes its width from these, less one.
    monkeypatch.setenv("COLUMNS", "81")
    monkeypatch.setenv("LINES", "24")
    monkeypatch.setattr(loop, "tqdm", functools.partial(tqdm, mininterval=0))  # every update
    run_both()
    frames = [frame for frame in re.split(r"[\r\n]", terminal.getvalue()) if frame.strip()]
    assert frames and all(len(frame) <= 80 for frame in frames)
    # tqdm pads a frame shorter than the one before it with spaces to blank the old text
    # ("10,240 windows/s" then "9,536 windows/s"), so the text ends where the spaces begin.
    shown = [frame.rstrip() for frame in frames]
    training = [frame for frame in shown if frame.startswith("epoch 1 ")]
    assert re.search(r"\| 6/6 \[.*, loss=\d\.\d{4} [\d,]+ tok/s\]$", training[-1])
    validation = [frame for frame in shown if frame.startswith("validation ")]
    assert re.search(r"\| (\d+)/\1 \[.*<00:00, [\d,]+ windows/s\]$", validation[-1])


def test_off_a_terminal_the_bars_write_nothing(run_both, capsys):
    run_both()
    assert capsys.readouterr() == ("", "")
