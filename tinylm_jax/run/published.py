"""Publishing a run: its evaluation weights (the average where the run keeps one) from its best or
latest checkpoint as one safetensors file (`core.weights`), beside copies of its config.json,
tokenizer.json and summary.json and of every table it wrote (history.csv, metrics.csv, the
epoch hooks' records such as attention_by_epoch.csv). The folder reads like a run folder:
`tinylm evaluate`, `generate`, `analyze` and `load_run` take it as they take the run
(`checkpoint.load_run`), and it is small enough to commit (4 bytes a parameter)."""

from __future__ import annotations

from pathlib import Path

from tinylm_jax.core.config import UserError
from tinylm_jax.core.files import write_bytes_atomic
from tinylm_jax.core.weights import write_weights
from tinylm_jax.run.checkpoint import load_run
from tinylm_jax.run.folder import RunFolder

COPIED = (RunFolder.CONFIG, RunFolder.TOKENIZER, RunFolder.HISTORY, RunFolder.SUMMARY)


def publish(run_dir: Path, out: Path, which: str = "best") -> list[Path]:
    """Write the published model of the run at `run_dir` into the folder `out` (created, or
    replaced if it holds an earlier publication); returns the files written."""
    source, dest = RunFolder(run_dir), RunFolder(out)
    if out.exists() and (not out.is_dir() or (any(out.iterdir())
                                             and not dest.file(dest.MODEL).is_file())):
        raise UserError(f"{out}: exists and is not a published model; choose another --out")
    run = load_run(run_dir, which)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    tables = sorted(path.name for path in source.path.glob("*.csv"))
    for name in dict.fromkeys([*COPIED, *tables]):
        if source.file(name).is_file():
            write_bytes_atomic(dest.file(name), source.file(name).read_bytes())
            written.append(dest.file(name))
    write_weights(dest.file(dest.MODEL), run.params,
                  {"which": which, "checkpoint": str(run.checkpoint), "epochs": str(run.epoch),
                   "position": run.position})
    return [*written, dest.file(dest.MODEL)]
