"""The token cache: a corpus's trained tokenizer and its token ids, kept on disk, so that a corpus
is tokenised once rather than at every start, resume and analysis (minutes and gigabytes for a
100 MB text).

Under the cache root (`$TINYLM_CACHE`, else `$XDG_CACHE_HOME/tinylm_jax`, else
`~/.cache/tinylm_jax`):

  tokenizers/<key>.json  a trained tokenizer; key: the corpus's sha256 and the tokenizer settings
  tokens/<key>.npy       the corpus's ids, uint16 where the vocabulary fits in it, else int32;
                         key: the corpus's sha256 and the tokenizer's own JSON
  tokens/<key>.json      written after the ids: their count, dtype and file size, and the pieces
                         they were encoded in (where each begins, in characters and in tokens)

This module is the cache's only reader and writer. Every file is written under a temporary name
of its own and renamed into place, so two processes writing the same entry at once each leave a
whole one (the same bytes). Ids whose file does not match their sidecar (a crash, a truncated
copy) are not trusted: they read as absent and are rebuilt. A cache that cannot be written is
one line, `CacheUnwritable`, before training starts.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
import tokenizers
from tokenizers import Tokenizer

from tinylm_jax.core.config import UserError
from tinylm_jax.core.files import disk_full

# Bumped when what a key names changes (how the text is cut into pieces, the sidecar's fields),
# so that entries of an earlier layout are rebuilt rather than misread.
CACHE_FORMAT = 1


class CacheUnwritable(UserError):
    """The token cache cannot be written (read-only folder, full disk): said in one line."""


def user_cache_root() -> Path:
    """The package's folder in the user's cache (`$XDG_CACHE_HOME` honoured): the corpus
    download's home, and the token cache's unless `$TINYLM_CACHE` says otherwise."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "tinylm_jax"


def cache_root() -> Path:
    """`$TINYLM_CACHE`, else `user_cache_root()`."""
    if os.environ.get("TINYLM_CACHE"):
        return Path(os.environ["TINYLM_CACHE"])
    return user_cache_root()


def _digest(*parts: Any) -> str:
    return hashlib.sha256(json.dumps([CACHE_FORMAT, *parts]).encode()).hexdigest()


def tokenizer_key(corpus_sha256: str, settings: dict[str, Any]) -> str:
    """The key of a tokenizer trained on a corpus with `settings` (every field that shapes it)
    by this version of the tokenizers library (another may learn other merges)."""
    return _digest(corpus_sha256, sorted(settings.items()), tokenizers.__version__)


def ids_key(corpus_sha256: str, tokenizer: Tokenizer) -> str:
    """The key of a corpus's ids under `tokenizer`: its JSON, so that any tokenizer (a run's own,
    read back from its folder) finds the ids it gives."""
    return _digest(corpus_sha256, tokenizer.to_str())


@dataclass(frozen=True)
class CorpusTokens:
    """A corpus's token ids, and the pieces it was encoded in."""

    ids: np.ndarray  # (T,) uint16 or int32; memory-mapped when read from the cache
    pieces: np.ndarray  # (P, 2) int64: per piece, its first character and its first token


class TokenCache:
    """The cache's files under one root (default `cache_root()`)."""

    def __init__(self, root: Path | None = None) -> None:
        self.root = root or cache_root()

    def _path(self, kind: str, key: str, suffix: str) -> Path:
        return self.root / kind / f"{key}{suffix}"

    def read_tokenizer(self, key: str) -> Tokenizer | None:
        """The tokenizer cached under `key`, or None (absent or unreadable: train it again)."""
        try:
            return Tokenizer.from_str(self._path("tokenizers", key, ".json").read_text("utf-8"))
        except Exception:  # noqa: BLE001  absent, unreadable or malformed: all mean "not cached"
            return None

    def write_tokenizer(self, key: str, tokenizer: Tokenizer) -> None:
        text = tokenizer.to_str()
        self._write(self._path("tokenizers", key, ".json"), lambda f: f.write(text.encode()))

    def read_tokens(self, key: str) -> CorpusTokens | None:
        """The ids cached under `key`, memory-mapped, or None when absent or not matching their
        sidecar (then the caller rebuilds them)."""
        ids_path = self._path("tokens", key, ".npy")
        try:
            record = json.loads(self._path("tokens", key, ".json").read_text("utf-8"))
            if ids_path.stat().st_size != record["bytes"]:
                return None
            ids = np.load(ids_path, mmap_mode="r", allow_pickle=False)
            pieces = np.asarray(record["pieces"], dtype=np.int64).reshape(-1, 2)
            if (ids.shape != (record["num_tokens"],) or ids.dtype != np.dtype(record["dtype"])
                    or _sha256(ids) != record["sha256"]):
                return None
        except (OSError, ValueError, KeyError, TypeError):
            return None
        return CorpusTokens(ids, pieces)

    def write_tokens(self, key: str, tokens: CorpusTokens) -> None:
        """Cache `tokens` under `key`: the ids, then the sidecar that vouches for them."""
        ids_path = self._path("tokens", key, ".npy")
        self._write(ids_path, lambda f: np.save(f, tokens.ids, allow_pickle=False))
        record = {"num_tokens": len(tokens.ids), "dtype": tokens.ids.dtype.name,
                  "bytes": ids_path.stat().st_size, "sha256": _sha256(tokens.ids),
                  "pieces": tokens.pieces.tolist()}
        self._write(self._path("tokens", key, ".json"),
                    lambda f: f.write(json.dumps(record).encode()))

    def _write(self, path: Path, write: Callable[[IO[bytes]], Any]) -> None:
        """`write` into a temporary file of this process's own beside `path`, renamed onto it;
        an OSError is one line that names the folder and what to do."""
        temporary = None
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
            with os.fdopen(handle, "wb") as f:
                write(f)
            os.chmod(temporary, 0o644)  # mkstemp's 0600 would keep the cache from other users
            os.replace(temporary, path)
            temporary = None
        except OSError as err:
            why, fix = err.strerror or str(err), "set TINYLM_CACHE to a writable folder"
            if disk_full(err):
                why = "the disk is full"
                fix = "free some space, or set TINYLM_CACHE to a folder on another disk"
            raise CacheUnwritable(f"{path.parent}: cannot write the token cache ({why}); "
                                  f"{fix}") from None
        finally:
            if temporary is not None:
                Path(temporary).unlink(missing_ok=True)


def _sha256(ids: np.ndarray) -> str:
    """The ids' checksum (a 100 MB corpus's 57 MB of ids hash in a fraction of a second)."""
    return hashlib.sha256(memoryview(np.ascontiguousarray(ids))).hexdigest()
