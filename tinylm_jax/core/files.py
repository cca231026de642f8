"""Files written whole or not at all: a temporary name, then a rename, so that a crash or a full
disk never leaves one half-written. Every writer of the package's text, CSV and binary outputs
goes through these; `disk_full` tells their callers a full disk from other failures."""

from __future__ import annotations

import csv
import errno
import io
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def disk_full(err: BaseException | None) -> bool:
    """Whether `err` is a full disk: ENOSPC anywhere in its chain, as an OSError, or in the text
    of tensorstore's `RESOURCE_EXHAUSTED: ... [OS error: No space left on device]` (not XLA's
    out-of-memory, which says RESOURCE_EXHAUSTED too)."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and err.errno == errno.ENOSPC:
            return True
        if "No space left on device" in str(err):
            return True
        err = err.__cause__ or err.__context__
    return False


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Write `data` to `path` whole or not at all."""
    temporary = path.with_name(f".{path.name}.tmp")
    try:
        temporary.write_bytes(data)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def write_text_atomic(path: Path, text: str) -> None:
    """Write `text` (UTF-8) to `path` whole or not at all."""
    write_bytes_atomic(path, text.encode("utf-8"))


def write_csv_atomic(path: Path, fields: Sequence[str], rows: list[dict[str, Any]]) -> None:
    """`rows` as a CSV with a header of `fields`, written whole or not at all."""
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=fields)
    writer.writeheader()
    writer.writerows(rows)
    write_text_atomic(path, text.getvalue())
