"""Corpus, tokenizer and batches.

The corpus is found through `--data`, `$TINYLM_DATA` or a verified download cache. It is tokenised
with a 500-entry BPE (the reference's recipe; `tokenizer = "byte_bpe"` for any other text) into one
int32 array that stays on the device; windows are never materialised. The tokenizer and the ids
are cached on disk (`core.token_cache`), so a corpus is tokenised once, in pieces of about 1 MB.
Window `i` is `x = ids[i:i+L]`, `y = ids[i+1:i+L+1]`; the first `int(train_fraction * N)` of the
`N = len(ids) - L` windows train, the rest validate.

A batch is a fixed-shape set of window starts plus a weight per window (1 real, 0 padding), so the
last partial batch of a split needs no new compilation and counts every window exactly once.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import re
import tempfile
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from tinylm_jax.core.config import ExperimentConfig, UserError
from tinylm_jax.core.token_cache import (
    CorpusTokens,
    TokenCache,
    ids_key,
    tokenizer_key,
    user_cache_root,
)

CORPUS_URL = ("https://raw.githubusercontent.com/karpathy/char-rnn/master/"
              "data/tinyshakespeare/input.txt")
CORPUS_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
SPECIAL_TOKENS = ["[PAD]", "[UNK]"]
BYTE_ALPHABET = 256  # the byte-level BPE's initial vocabulary: one entry per byte
PIECE_CHARS = 1 << 20  # about how many characters of text are encoded (or sampled) at a time
ENCODE_BATCH = 8  # pieces per `encode_batch_fast` call: the tokenizer spreads them over the cores
# Where the text may be cut into pieces: after a newline between two non-whitespace characters,
# or inside such a CRLF. Both pre-tokenizers make that newline (or that \r and that \n) a
# pre-token of its own wherever the text is cut, so the pieces' ids are exactly the whole text's.
# (After a blank line they are not: byte-level BPE joins a run of newlines that ends a text.)
SAFE_CUT = re.compile(r"(?<=\S)\n(?=\S)|(?<=\S\r)(?=\n\S)")


def default_cache_path() -> Path:
    return user_cache_root() / "tinyshakespeare" / "input.txt"


def file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def text_sha256(text: str) -> str:
    """The sha256 of `text`'s UTF-8 bytes: its file's, for a corpus read by `read_corpus`."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


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


def train_tokenizer(text: str | list[str], vocab_size: int, kind: str = "bpe") -> Tokenizer:
    """A tokenizer trained on `text` (one string, or pieces of one): "bpe" is the reference's (BPE
    over the Whitespace pre-tokenizer, [PAD] and [UNK]); "byte_bpe" is GPT-2's byte-level BPE,
    whose 256 bytes spell any UTF-8 text, so that no character is unknown at any vocab_size."""
    if kind == "byte_bpe":
        smallest = BYTE_ALPHABET + len(SPECIAL_TOKENS)
        if vocab_size < smallest:
            raise UserError(f"vocab_size {vocab_size} is too small for byte_bpe: it needs at least "
                            f"{smallest} (the 256 bytes, [PAD] and [UNK])")
        tokenizer = Tokenizer(models.BPE())
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = decoders.ByteLevel()
        alphabet = {"initial_alphabet": pre_tokenizers.ByteLevel.alphabet()}
    else:
        tokenizer = Tokenizer(models.BPE(unk_token="[UNK]"))
        tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
        alphabet = {}
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  show_progress=False, **alphabet)
    tokenizer.train_from_iterator([text] if isinstance(text, str) else text, trainer=trainer)
    return tokenizer


def is_byte_level(tokenizer: Tokenizer) -> bool:
    """Whether `tokenizer` is byte-level: its tokens carry their own whitespace, and its decoder
    restores the text exactly."""
    return isinstance(tokenizer.pre_tokenizer, pre_tokenizers.ByteLevel)


def tokenizer_settings(cfg: ExperimentConfig) -> dict[str, object]:
    """The fields of `cfg` that shape its tokenizer (train_fraction only where it cuts the text)."""
    settings: dict[str, object] = {"tokenizer": cfg.tokenizer, "vocab_size": cfg.vocab_size,
                                   "tokenizer_text": cfg.tokenizer_text,
                                   "tokenizer_sample": cfg.tokenizer_sample}
    if cfg.tokenizer_text == "train":
        settings["train_fraction"] = cfg.train_fraction
    return settings


def tokenizer_training_text(text: str, cfg: ExperimentConfig) -> list[str]:
    """What `cfg`'s tokenizer learns from: the whole text or its first train_fraction of
    characters, sampled down to tokenizer_sample characters when that is set and smaller."""
    part = text if cfg.tokenizer_text == "all" else text[:int(cfg.train_fraction * len(text))]
    if not cfg.tokenizer_sample or len(part) <= cfg.tokenizer_sample:
        return [part]
    return sample_pieces(part, cfg.tokenizer_sample)


def sample_pieces(text: str, max_chars: int, size: int = PIECE_CHARS) -> list[str]:
    """At most `max_chars` characters of `text`, as evenly spaced pieces of about `size`
    characters from its start to its end, each from a line start to a line end where it has
    them: a sample that sees the whole text's kinds of content, in a bounded memory."""
    count = max(1, round(max_chars / size))
    length = max_chars // count
    stride = (len(text) - length) / max(count - 1, 1)
    pieces = []
    for index in range(count):
        begin = _line_start(text, int(index * stride))
        end = text.rfind("\n", begin, begin + length) + 1 or min(begin + length, len(text))
        pieces.append(text[begin:end])
    return [piece for piece in pieces if piece]


def _line_start(text: str, position: int) -> int:
    """The start of the first line at or after `position`."""
    if position == 0 or text[position - 1] == "\n":
        return position
    return text.find("\n", position) + 1 or len(text)


def piece_starts(text: str, size: int = PIECE_CHARS) -> list[int]:
    """Where the pieces of `text` begin: each about `size` characters, cut where `SAFE_CUT` says
    (a text with no such place in a stretch makes a longer piece, never a wrong one)."""
    starts = [0]
    while (cut := SAFE_CUT.search(text, starts[-1] + size)) is not None:
        starts.append(cut.end())
    return starts


def encode_text(tokenizer: Tokenizer, text: str, size: int = PIECE_CHARS) -> CorpusTokens:
    """`text`'s ids, encoded a few pieces at a time (memory bounded by the pieces, not the text),
    uint16 where the vocabulary fits in it: exactly `tokenizer.encode(text).ids`."""
    starts = piece_starts(text, size)
    bounds = [*starts, len(text)]
    dtype = np.uint16 if tokenizer.get_vocab_size() <= 1 << 16 else np.int32
    parts, token_starts, count = [], [], 0
    for first in range(0, len(starts), ENCODE_BATCH):
        batch = [text[bounds[i]:bounds[i + 1]]
                 for i in range(first, min(first + ENCODE_BATCH, len(starts)))]
        for encoding in tokenizer.encode_batch_fast(batch):  # no offsets: half the time
            parts.append(np.asarray(encoding.ids, dtype=dtype))
            token_starts.append(count)
            count += len(parts[-1])
    pieces = np.stack([np.asarray(starts), np.asarray(token_starts)], axis=1).astype(np.int64)
    return CorpusTokens(np.concatenate(parts), pieces)


def token_offsets(tokenizer: Tokenizer, text: str, tokens: CorpusTokens, first: int, stop: int
                  ) -> np.ndarray:
    """The character spans (stop - first, 2) of tokens [first, stop) in `text`, from encoding
    only the pieces that hold them, a few at a time: the analyses need offsets for what they
    show, not for a whole corpus (the reference's 23 GB for a 100 MB text)."""
    if stop <= first:
        return np.zeros((0, 2), np.int64)
    token_starts = tokens.pieces[:, 1]
    begin = int(np.searchsorted(token_starts, first, side="right")) - 1
    end = int(np.searchsorted(token_starts, stop, side="left"))  # pieces [begin, end) hold them
    bounds = [*tokens.pieces[:, 0].tolist(), len(text)]
    spans = []
    for batch in range(begin, end, ENCODE_BATCH):
        which = range(batch, min(batch + ENCODE_BATCH, end))
        encodings = tokenizer.encode_batch([text[bounds[i]:bounds[i + 1]] for i in which])
        spans += [np.asarray(encoding.offsets, dtype=np.int64).reshape(-1, 2) + bounds[i]
                  for i, encoding in zip(which, encodings, strict=True)]
    skip = first - int(token_starts[begin])
    return np.concatenate(spans)[skip:skip + stop - first]


def corpus_tokenizer(text: str, cfg: ExperimentConfig, corpus_sha256: str,
                     cache: TokenCache | None = None) -> Tokenizer:
    """`cfg`'s tokenizer for the corpus `text`: from the cache, else trained and cached."""
    cache = cache or TokenCache()
    key = tokenizer_key(corpus_sha256, tokenizer_settings(cfg))
    tokenizer = cache.read_tokenizer(key)
    if tokenizer is None:
        tokenizer = train_tokenizer(tokenizer_training_text(text, cfg), cfg.vocab_size,
                                    cfg.tokenizer)
        cache.write_tokenizer(key, tokenizer)
    return tokenizer


def corpus_tokens(text: str, tokenizer: Tokenizer, corpus_sha256: str,
                  cache: TokenCache | None = None) -> CorpusTokens:
    """The corpus's ids under `tokenizer`: from the cache (memory-mapped, nothing re-tokenised),
    else encoded in pieces and cached."""
    cache = cache or TokenCache()
    key = ids_key(corpus_sha256, tokenizer)
    tokens = cache.read_tokens(key)
    if tokens is None:
        tokens = encode_text(tokenizer, text)
        cache.write_tokens(key, tokens)
    return tokens


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
class Dataset:
    """Everything the training loop needs to know about the data."""

    tokens: jax.Array  # (T,) int32, resident on the device
    splits: Splits
    tokenizer: Tokenizer


def build_dataset(text: str, cfg: ExperimentConfig, tokenizer: Tokenizer | None = None,
                  corpus_sha256: str | None = None) -> Dataset:
    """The corpus `text` (whose sha256 is `corpus_sha256`, computed if not given) as `cfg`'s
    dataset: its ids under `tokenizer` (a resume's own) or `cfg`'s tokenizer, both from the
    token cache where it has them, checked to fit `cfg`."""
    corpus_sha256 = corpus_sha256 or text_sha256(text)
    cache = TokenCache()
    tokenizer = tokenizer or corpus_tokenizer(text, cfg, corpus_sha256, cache)
    if tokenizer.get_vocab_size() > cfg.vocab_size:
        # BPE keeps every character of the text, whatever vocab_size asks for.
        raise UserError(f"vocab_size {cfg.vocab_size} is too small: the tokenizer needs "
                        f"{tokenizer.get_vocab_size()} entries for this corpus"
                        + ("" if cfg.tokenizer == "byte_bpe" else
                           " (tokenizer = \"byte_bpe\" needs only 258)"))
    ids = corpus_tokens(text, tokenizer, corpus_sha256, cache).ids
    return Dataset(jnp.asarray(np.asarray(ids, dtype=np.int32)),
                   Splits.of(len(ids), cfg.seq_len, cfg.train_fraction), tokenizer)


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
