"""Corpus, tokenizer and batches.

The corpus is found through `--data`, `$TINYLM_DATA` or a verified download cache. It is tokenised
with a 500-entry BPE (the reference's recipe) into one int32 array that stays on the device;
windows are never materialised. Window `i` is `x = ids[i:i+L]`, `y = ids[i+1:i+L+1]`; the first
`int(train_fraction * N)` of the `N = len(ids) - L` windows train, the rest validate.

A batch is a fixed-shape set of window starts plus a weight per window (1 real, 0 padding), so the
last partial batch of a split needs no new compilation and counts every window exactly once.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import tempfile
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

from tinylm_jax.core.config import ExperimentConfig, UserError

CORPUS_URL = ("https://raw.githubusercontent.com/karpathy/char-rnn/master/"
              "data/tinyshakespeare/input.txt")
CORPUS_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
SPECIAL_TOKENS = ["[PAD]", "[UNK]"]


def default_cache_path() -> Path:
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return root / "tinylm_jax" / "tinyshakespeare" / "input.txt"


def file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def download_corpus(dest: Path, url: str = CORPUS_URL, sha256: str = CORPUS_SHA256) -> Path:
    """Fetch the corpus into `dest`, keeping it only if its checksum matches."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=dest.parent, delete=False) as tmp:
        tmp_path = Path(tmp.name)
    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            tmp_path.write_bytes(response.read())
        digest = file_sha256(tmp_path)
        if digest != sha256:
            raise UserError(f"downloaded corpus from {url} has sha256 {digest}, "
                            f"expected {sha256}; not used")
        tmp_path.replace(dest)
    finally:
        tmp_path.unlink(missing_ok=True)
    return dest


def resolve_corpus(data: str | None = None) -> Path:
    """`data`, else `$TINYLM_DATA`, else the cache (downloaded and verified on first use)."""
    chosen = data or os.environ.get("TINYLM_DATA")
    if chosen:
        return Path(chosen)
    cached = default_cache_path()
    if cached.is_file() and file_sha256(cached) == CORPUS_SHA256:
        return cached
    try:
        return download_corpus(cached, url=CORPUS_URL)
    except (OSError, http.client.HTTPException) as err:
        raise UserError(f"no corpus: pass --data PATH, set TINYLM_DATA=PATH, or allow the "
                        f"download to {cached} (it failed: {err})") from None


def read_corpus(path: Path) -> str:
    """The corpus as text, read strictly as UTF-8."""
    if not path.exists():
        raise UserError(f"{path}: corpus file not found")
    if not path.is_file():
        raise UserError(f"{path}: corpus path is not a regular file")
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise UserError(f"{path}: cannot read corpus ({err.strerror})") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise UserError(f"{path}: not valid UTF-8 at byte offset {err.start}") from None
    if not text.strip():
        raise UserError(f"{path}: corpus is empty")
    return text


def train_tokenizer(text: str, vocab_size: int) -> Tokenizer:
    """The reference's tokenizer: BPE on the whole text, Whitespace pre-tokenizer."""
    tokenizer = Tokenizer(models.BPE(unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  show_progress=False)
    tokenizer.train_from_iterator([text], trainer=trainer)
    return tokenizer


def encode(tokenizer: Tokenizer, text: str) -> np.ndarray:
    return np.asarray(tokenizer.encode(text).ids, dtype=np.int32)


@dataclass(frozen=True)
class Splits:
    """Window bookkeeping for one token array and one sequence length."""

    num_tokens: int
    seq_len: int
    num_train: int  # windows [0, num_train) train
    num_val: int  # windows [num_train, num_train + num_val) validate

    @classmethod
    def of(cls, num_tokens: int, seq_len: int, train_fraction: float) -> Splits:
        num_windows = num_tokens - seq_len
        num_train = int(train_fraction * num_windows)
        splits = cls(num_tokens, seq_len, num_train, num_windows - num_train)
        if splits.num_train < 1 or splits.num_val < 1:
            raise UserError(f"corpus too short: {num_tokens} tokens give {max(num_windows, 0)} "
                            f"windows of seq_len {seq_len}; need at least one to train and one "
                            "to validate")
        return splits

    def validation_starts(self, indices: np.ndarray | None = None) -> np.ndarray:
        """Token positions (int32) where validation windows begin: every one in order, or those
        of `indices` (0: the first validation window, the reference's first validation batch's)."""
        indices = np.arange(self.num_val) if indices is None else np.asarray(indices)
        return (self.num_train + indices).astype(np.int32)


@dataclass(frozen=True)
class EncodedCorpus:
    """A corpus as token ids, with where each token came from and how the windows split."""

    ids: np.ndarray  # (T,) int32
    offsets: np.ndarray  # (T, 2) character span of each token in the text
    splits: Splits


def encode_corpus(text: str, tokenizer: Tokenizer, cfg: ExperimentConfig) -> EncodedCorpus:
    """`text` tokenised, and its windows of `cfg.seq_len` split into training and validation."""
    encoding = tokenizer.encode(text)
    ids = np.asarray(encoding.ids, dtype=np.int32)
    offsets = np.asarray(encoding.offsets, dtype=np.int64).reshape(-1, 2)
    return EncodedCorpus(ids, offsets, Splits.of(len(ids), cfg.seq_len, cfg.train_fraction))


@dataclass(frozen=True)
class Dataset:
    """Everything the training loop needs to know about the data."""

    tokens: jax.Array  # (T,) int32, resident on the device
    splits: Splits
    tokenizer: Tokenizer


def build_dataset(text: str, cfg: ExperimentConfig, tokenizer: Tokenizer | None = None) -> Dataset:
    """Tokenise `text` (training a tokenizer unless one is given) and check it fits `cfg`."""
    tokenizer = tokenizer or train_tokenizer(text, cfg.vocab_size)
    if tokenizer.get_vocab_size() > cfg.vocab_size:
        # BPE keeps every character of the text, whatever vocab_size asks for.
        raise UserError(f"vocab_size {cfg.vocab_size} is too small: the tokenizer needs "
                        f"{tokenizer.get_vocab_size()} entries for this corpus")
    encoded = encode_corpus(text, tokenizer, cfg)
    return Dataset(jnp.asarray(encoded.ids), encoded.splits, tokenizer)


def train_order(seed: int, epoch: int, num_train: int) -> np.ndarray:
    """The training windows of `epoch` (1-based) in shuffled order: a pure function of both."""
    return np.random.default_rng([seed, epoch]).permutation(num_train).astype(np.int32)


def padded_batches(arrays: tuple[np.ndarray, ...], batch_size: int
                   ) -> Iterator[tuple[int, list[np.ndarray]]]:
    """The rows of `arrays` (each (N, ...)) in batches of `batch_size` rows, the last padded with
    zeros so that one compiled shape serves them all, each with its count of real rows."""
    for begin in range(0, len(arrays[0]), batch_size):
        parts = [array[begin:begin + batch_size] for array in arrays]
        keep = len(parts[0])
        yield keep, [np.pad(part, ((0, batch_size - keep),) + ((0, 0),) * (part.ndim - 1))
                     for part in parts]


def batches(starts: np.ndarray, batch_size: int) -> Iterator[dict[str, np.ndarray]]:
    """Fixed-shape batches of window starts; the last one is padded with weight-0 windows."""
    weights = np.ones(len(starts), np.float32)
    for _, (chunk, chunk_weights) in padded_batches((starts, weights), batch_size):
        yield {"starts": chunk.astype(np.int32), "weights": chunk_weights}  # (B,) each


def num_batches(num_windows: int, batch_size: int) -> int:
    return -(-num_windows // batch_size)


def batch_rows(starts: np.ndarray, batch_size: int) -> dict[str, np.ndarray]:
    """All of `batches(starts, batch_size)` stacked: starts and weights, each (N, B)."""
    rows = list(batches(starts, batch_size))
    return {key: np.stack([row[key] for row in rows]) for key in ("starts", "weights")}


def gather_windows(tokens: jax.Array, starts: jax.Array, seq_len: int
                   ) -> tuple[jax.Array, jax.Array]:
    """Inputs and targets, each (B, L) int32, for the windows beginning at `starts` (B,)."""
    idx = starts[:, None] + jnp.arange(seq_len + 1)[None, :]  # (B, L+1)
    window = tokens[idx]
    return window[:, :-1], window[:, 1:]
