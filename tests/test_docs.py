"""The Python examples of docs/running.md run as written."""

import re

from conftest import REPO

RUNNING = REPO / "docs" / "running.md"


def _examples() -> list[str]:
    return re.findall(r"```python\n(.*?)```", RUNNING.read_text(encoding="utf-8"), re.S)


def test_there_are_the_two_examples():
    api, steps = _examples()
    assert "tinylm_jax.train(" in api and "train_step(state, batch)" in steps


def test_the_api_example_runs(tmp_path, tiny_corpus, monkeypatch, capsys):
    """On a slice of the corpus (the example trains the real baseline's model and protocol, cut
    to a few steps), in a folder of the test's own."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TINYLM_DATA", str(tiny_corpus))
    exec(compile(_examples()[0], str(RUNNING), "exec"), {})
    printed = [line for line in capsys.readouterr().out.splitlines() if "StopReason" in line]
    best, last, reason = printed[0].split()  # the example's print, among the runs' logs
    assert float(best) <= float(last) and reason == "StopReason.FINISHED"
    assert sorted(p.name for p in (tmp_path / "runs" / "spread").iterdir()) == \
        ["seed-0", "seed-1"]


def test_the_train_state_example_runs(corpus_path, monkeypatch, capsys):
    monkeypatch.setenv("TINYLM_DATA", str(corpus_path))
    exec(compile(_examples()[1], str(RUNNING), "exec"), {})
    lines = capsys.readouterr().out.splitlines()
    assert 2.0 < float(lines[0]) < 7.0  # a cross-entropy near log(500) = 6.2 or below
    assert lines[1] == "(64, 64, 500) (64, 4, 64, 64)"
