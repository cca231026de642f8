"""Files written whole or not at all: a temporary name, then a rename, so that a crash or a full
disk never leaves one half-written. Every writer of the package's text, CSV and binary outputs
goes through these."""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any


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
