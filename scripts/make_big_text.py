"""Build a large real text for measuring the kit on a corpus of your own.

`python scripts/make_big_text.py --out /work/bigtext/big.txt --megabytes 100` concatenates the
source code and documentation (.py, .md, .rst, .txt, .c, .h) found under the installed Pythons'
libraries, site-packages included, in sorted path order, skipping any file that is not UTF-8,
until the next file would pass the size asked for. Real text, not generated: code, prose and
many scripts' characters, so it needs what a corpus of one's own needs (byte-level BPE).
"""

from __future__ import annotations

import argparse
import glob
import os
import sys
from collections.abc import Iterator
from pathlib import Path

DEFAULT_ROOTS = ("/root/.pyenv/versions/*/lib/python3*/",)
SUFFIXES = (".py", ".md", ".rst", ".txt", ".c", ".h")


def source_files(roots: list[str]) -> list[str]:
    """Every regular file with one of SUFFIXES under the folders `roots` (glob patterns) match,
    in sorted path order; symbolic links are not followed, so nothing is counted twice."""
    found = set()
    for pattern in roots:
        for root in glob.glob(pattern):
            for folder, _, names in os.walk(root):
                found.update(os.path.join(folder, name) for name in names
                             if name.endswith(SUFFIXES))
    return sorted(path for path in found if not os.path.islink(path) and os.path.isfile(path))


def utf8_texts(paths: list[str]) -> Iterator[bytes]:
    """Each file's bytes, ending in a newline, when they are valid UTF-8 (the rest are skipped)."""
    for path in paths:
        try:
            raw = Path(path).read_bytes()
            raw.decode("utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        if raw:
            yield raw if raw.endswith(b"\n") else raw + b"\n"


def make_big_text(out: Path, megabytes: float, roots: list[str]) -> int:
    """Write the text to `out` (at most `megabytes` * 10^6 bytes); returns its size in bytes."""
    limit, written = int(megabytes * 1_000_000), 0
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("wb") as sink:
        for raw in utf8_texts(source_files(roots)):
            if written + len(raw) > limit:
                break
            sink.write(raw)
            written += len(raw)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="the text file to write")
    parser.add_argument("--megabytes", type=float, default=100.0,
                        help="size to reach, in 10^6 bytes (default 100)")
    parser.add_argument("--root", action="append", dest="roots",
                        help="a folder (glob pattern) to take files from; repeatable (default "
                             f"{DEFAULT_ROOTS[0]})")
    args = parser.parse_args(argv)
    size = make_big_text(args.out, args.megabytes, args.roots or list(DEFAULT_ROOTS))
    print(f"wrote {args.out}: {size:,} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
