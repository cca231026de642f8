"""The training and validation bars: shown on a terminal only, and readable at 80 columns."""

import functools
import io
import re
import sys

import pytest
from tqdm import tqdm

from tinylm_jax.core import train


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture
def run_both(tiny_data, tiny_cfg):
    """Train 6 steps and validate once, one step per chunk, so that the bars move often."""

    def run() -> None:
        state = train.create_train_state(tiny_cfg, "fp32")
        options = train.LoopOptions(steps_per_chunk=1)
        state, _ = train.train_epoch(state, tiny_data, tiny_cfg, train.EpochProgress(1, 6),
                                     options=options)
        train.evaluate(state, tiny_data, tiny_cfg, options)

    return run


def test_on_an_80_column_terminal_both_bars_show_their_throughput(run_both, monkeypatch):
    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    # A stream without a tty size: tqdm then takes its width from these, less one.
    monkeypatch.setenv("COLUMNS", "81")
    monkeypatch.setenv("LINES", "24")
    monkeypatch.setattr(train, "tqdm", functools.partial(tqdm, mininterval=0))  # every update
    run_both()
    frames = [frame for frame in re.split(r"[\r\n]", terminal.getvalue()) if frame.strip()]
    assert frames and all(len(frame) <= 80 for frame in frames)
    training = [frame for frame in frames if frame.startswith("epoch 1 ")]
    assert re.search(r"\| 6/6 \[.*, loss=\d\.\d{4} [\d,]+ tok/s\]$", training[-1])
    validation = [frame for frame in frames if frame.startswith("validation ")]
    assert re.search(r"\| (\d+)/\1 \[.*<00:00, [\d,]+ windows/s\]$", validation[-1])


def test_off_a_terminal_the_bars_write_nothing(run_both, capsys):
    run_both()
    assert capsys.readouterr() == ("", "")
