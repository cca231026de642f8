"""The README's Python example runs as written."""

import re
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def test_python_example_runs(corpus_path, monkeypatch, capsys):
    monkeypatch.setenv("TINYLM_DATA", str(corpus_path))
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), re.S)
    assert len(blocks) == 1
    exec(compile(blocks[0], "README.md", "exec"), {})
    lines = capsys.readouterr().out.splitlines()
    assert 2.0 < float(lines[0]) < 7.0  # a cross-entropy near log(500) = 6.2 or below
    assert lines[1] == "(64, 64, 500) (64, 4, 64, 64)"
