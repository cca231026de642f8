"""Tokenise once: the token cache, the streamed encoding it is filled by, the byte-level
tokenizer and the tokenizer's training text, and the analyses' prompts on a corpus of one's own.
Tiny texts, except the reference's count (the real corpus, skipped without it)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, refused, tiny_config, tiny_toml_file

from tinylm_jax.analysis.corpus import RunCorpus
from tinylm_jax.analysis.inference import REFERENCE_PROMPTS, corpus_prompts
from tinylm_jax.cli.run_experiment import main as train_main
from tinylm_jax.core import data
from tinylm_jax.core.config import UserError, load_config
from tinylm_jax.core.data import (
    build_dataset,
    corpus_tokenizer,
    encode_text,
    file_sha256,
    piece_starts,
    sample_pieces,
    text_sha256,
    token_offsets,
    tokenizer_training_text,
    train_tokenizer,
)
from tinylm_jax.core.token_cache import CacheUnwritable, TokenCache

# Blank lines (runs of them), indentation, tabs, CRLF line ends and non-ASCII text: every way a
# cut between pieces could change what either pre-tokenizer sees.
BLOCK = ("def f(x):\n    return x  # café\n\n\n\nclass Ünïcode:\n\tpass\n\n"
         "Привет, мир! Καλημέρα κόσμε. 你好，世界。 🙂🚀\n  indented line\n"
         "end\r\nwindows line\r\n\r\nnext\n \n")
TEXT = "".join(f"{BLOCK}item {i} of the text\n" for i in range(60))


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch) -> Path:
    """Each test's own, empty token cache."""
    root = tmp_path / "token-cache"
    monkeypatch.setenv("TINYLM_CACHE", str(root))
    return root


@pytest.fixture(scope="module", params=["bpe", "byte_bpe"])
def tokenizer(request):
    return train_tokenizer(TEXT, 400, request.param)


def test_pieces_encode_to_exactly_the_whole_text_s_ids_and_offsets(tokenizer):
    tokens = encode_text(tokenizer, TEXT, size=200)  # 200 characters: many pieces
    whole = tokenizer.encode(TEXT)
    assert len(tokens.pieces) > 20
    assert tokens.ids.dtype == np.uint16 and tokens.ids.tolist() == whole.ids
    assert np.array_equal(token_offsets(tokenizer, TEXT, tokens, 0, len(whole.ids)),
                          np.asarray(whole.offsets))
    first, stop = 1000, 1400  # a span across pieces, from re-encoding only those
    assert np.array_equal(token_offsets(tokenizer, TEXT, tokens, first, stop),
                          np.asarray(whole.offsets[first:stop]))


def test_pieces_are_cut_only_between_non_whitespace_lines():
    for start in piece_starts(TEXT, size=100)[1:]:
        assert not TEXT[start].isspace() and not TEXT[start - 2].isspace()
        assert TEXT[start - 1] == "\n" or TEXT[start - 1:start + 1] == "\r\n"


def test_byte_bpe_round_trips_any_utf8_text_at_its_smallest_vocabulary():
    text = ("Москва — столица России. Η Αθήνα είναι η πρωτεύουσα της Ελλάδας. "
            "東京は日本の首都です。 北京是中国的首都。 👩‍💻🎉🌍\n") * 20
    for vocab_size in (258, 600):
        tokenizer = train_tokenizer(text, vocab_size, "byte_bpe")
        assert tokenizer.get_vocab_size() <= vocab_size
        for sample in (text, "Ünseen: ಕನ್ನಡ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 ✓"):  # characters it never saw, too
            assert tokenizer.decode(tokenizer.encode(sample).ids) == sample
    with pytest.raises(UserError, match="vocab_size 257 is too small for byte_bpe: it needs at "
                                        "least 258") as refusal:
        train_tokenizer(text, 257, "byte_bpe")
    assert "\n" not in str(refusal.value)


def test_a_tokenizer_trained_on_the_training_text_never_sees_the_validation_text():
    text = "the cat sat on the mat\n" * 200 + "zyzzyva quokka\n" * 50  # the last 7%: validation
    for kind in ("bpe", "byte_bpe"):
        cfg = tiny_config(vocab_size=400, tokenizer=kind)
        leaky = corpus_tokenizer(text, cfg, text_sha256(text)).get_vocab()
        held_out = corpus_tokenizer(text, cfg.replace(tokenizer_text="train"),
                                    text_sha256(text)).get_vocab()
        assert any("zyzzyva" in token for token in leaky)
        assert not any("zyz" in token or "quok" in token for token in held_out)


def test_a_sample_is_evenly_spaced_whole_lines_within_its_size():
    text = "".join(f"line {i:05d}\n" for i in range(20_000))  # 220,000 characters
    pieces = sample_pieces(text, 30_000, size=10_000)
    assert len(pieces) == 3 and sum(map(len, pieces)) <= 30_000
    assert pieces[0].startswith("line 00000\n") and pieces[-1].endswith("line 19999\n")
    assert all(piece.startswith("line ") and piece.endswith("\n") for piece in pieces)
    cfg = tiny_config(tokenizer_text="train", tokenizer_sample=30_000)
    sampled = "".join(tokenizer_training_text(text, cfg))
    assert len(sampled) <= 30_000 and "line 1" not in sampled  # the first 80%: below 16000
    sampled = "".join(tokenizer_training_text(text, cfg.replace(tokenizer_sample=200_000)))
    assert len(sampled) == 176_000 and sampled.endswith("line 15999\n")
    assert tokenizer_training_text(text, tiny_config()) == [text]  # the reference's


def test_a_second_build_reads_the_cache_and_tokenises_nothing(monkeypatch, own_cache):
    cfg = tiny_config(tokenizer="byte_bpe", vocab_size=300)
    first = build_dataset(TEXT, cfg)
    assert len(list((own_cache / "tokens").glob("*.npy"))) == 1

    def never(*args, **kwargs):
        raise AssertionError("tokenised again")

    monkeypatch.setattr(data, "train_tokenizer", never)
    monkeypatch.setattr(data, "encode_text", never)
    again = build_dataset(TEXT, cfg)
    resumed = build_dataset(TEXT, cfg, tokenizer=first.tokenizer)  # a resume: the run's own
    for dataset in (again, resumed):
        assert np.array_equal(np.asarray(dataset.tokens), np.asarray(first.tokens))
        assert dataset.tokenizer.to_str() == first.tokenizer.to_str()


@pytest.mark.parametrize("damage", ["truncated", "no sidecar", "sidecar disagrees",
                                    "sidecar unreadable", "an id changed"])
def test_a_damaged_cache_entry_is_rebuilt_not_trusted(own_cache, damage):
    cfg = tiny_config(vocab_size=200)
    expected = np.asarray(build_dataset(TEXT, cfg).tokens)
    ids_file = next((own_cache / "tokens").glob("*.npy"))
    sidecar = ids_file.with_suffix(".json")
    if damage == "truncated":
        ids_file.write_bytes(ids_file.read_bytes()[:-10])
    elif damage == "no sidecar":
        sidecar.unlink()
    elif damage == "sidecar disagrees":
        record = json.loads(sidecar.read_text())
        sidecar.write_text(json.dumps({**record, "num_tokens": record["num_tokens"] - 1}))
    elif damage == "sidecar unreadable":
        sidecar.write_text(json.dumps({"dtype": None}))
    else:  # the same size, one id flipped
        raw = bytearray(ids_file.read_bytes())
        raw[-1] ^= 0xFF
        ids_file.write_bytes(bytes(raw))
    for tokenizer_file in (own_cache / "tokenizers").glob("*.json"):
        tokenizer_file.write_text('{"version": "1.0", "trunc')
    assert TokenCache().read_tokens(ids_file.stem) is None
    assert np.array_equal(np.asarray(build_dataset(TEXT, cfg).tokens), expected)
    assert TokenCache().read_tokens(ids_file.stem) is not None  # whole again


def test_an_unwritable_cache_is_one_line_and_training_does_not_start(tmp_path, monkeypatch,
                                                                     capsys):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TEXT, encoding="utf-8")
    toml = tiny_toml_file(tmp_path / "tiny.toml", vocab_size=200)
    blocked = tmp_path / "a-file"
    blocked.write_text("not a folder")
    monkeypatch.setenv("TINYLM_CACHE", str(blocked / "cache"))
    out = tmp_path / "run"
    line = refused(train_main, [str(toml), "--data", str(corpus), "--out", str(out),
                                "--no-progress"], capsys)
    assert f"{blocked / 'cache' / 'tokenizers'}: cannot write the token cache" in line
    assert "set TINYLM_CACHE to a writable folder" in line and not out.exists()


def test_a_full_disk_is_one_line_and_leaves_no_partial_file(tmp_path, own_cache, monkeypatch):
    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("tinylm_jax.core.token_cache.np.save", full)
    with pytest.raises(CacheUnwritable, match=r"\(the disk is full\); free some space") as refusal:
        build_dataset(TEXT, tiny_config(vocab_size=200))
    assert str(own_cache / "tokens") in str(refusal.value) and "\n" not in str(refusal.value)
    assert list((own_cache / "tokens").iterdir()) == []


def test_two_processes_filling_the_same_entry_at_once_both_succeed(tmp_path, own_cache):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TEXT * 20, encoding="utf-8")
    script = ("import sys, numpy as np\nfrom tinylm_jax.core.config import load_config\n"
              "from tinylm_jax.core.data import build_dataset, read_corpus\nfrom pathlib import "
              "Path\ncfg = load_config('baseline').replace(tokenizer='byte_bpe', vocab_size=300)\n"
              "ids = np.asarray(build_dataset(read_corpus(Path(sys.argv[1])), cfg).tokens)\n"
              "print(len(ids), int(ids.sum()))\n")
    env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu"}
    runs = [subprocess.Popen([sys.executable, "-c", script, str(corpus)], env=env, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(2)]
    results = [run.communicate(timeout=300) for run in runs]
    assert all(run.returncode == 0 for run in runs), results
    assert results[0][0] == results[1][0]
    assert not list(own_cache.rglob(".*"))  # no temporary file left behind
    assert len(list((own_cache / "tokens").glob("*.npy"))) == 1


def test_the_reference_s_token_count_is_unchanged_through_the_cache(corpus_path):
    text, sha256 = corpus_path.read_text(encoding="utf-8"), file_sha256(corpus_path)
    cfg = load_config("baseline")
    built = build_dataset(text, cfg, corpus_sha256=sha256)
    cached = build_dataset(text, cfg, corpus_sha256=sha256)
    assert built.splits.num_tokens == cached.splits.num_tokens == 447_717
    assert np.asarray(cached.tokens).tolist() == built.tokenizer.encode(text).ids


def test_prompts_come_from_the_corpus_s_own_validation_text():
    text = "".join(f"Sprecher {i % 7}:\nDas ist Zeile {i} der Geschichte.\n\n"
                   for i in range(400))
    for kind in ("bpe", "byte_bpe"):
        cfg = tiny_config(tokenizer=kind, vocab_size=300)
        corpus = RunCorpus.build(cfg, build_dataset(text, cfg).tokenizer, text)
        prompts = corpus_prompts(corpus)
        assert prompts == corpus_prompts(corpus) and 1 <= len(prompts) <= 3
        validation = text[corpus.offsets(corpus.splits.num_train,
                                         corpus.splits.num_train + 1)[0, 0]:]
        assert all(f"\n{prompt}" in validation for prompt in prompts), prompts
        start = corpus.window_start(5)
        assert corpus.source_text(start, 16) in text
        if kind == "byte_bpe":  # exact decoding, no spacing model needed
            assert corpus.spacing is None
            assert corpus.decode(corpus.ids[start:start + 16]) == corpus.source_text(start, 16)
    assert not set(REFERENCE_PROMPTS) & set(prompts)


def test_make_big_text_concatenates_utf8_files_in_path_order(tmp_path):
    root = tmp_path / "lib"
    (root / "b").mkdir(parents=True)
    (root / "b" / "z.py").write_text("print('z')\n")
    (root / "a.md").write_text("# ä\n")
    (root / "b" / "latin1.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    (root / "b" / "skip.bin").write_text("not a source file\n")
    (root / "c.rst").write_text("x" * 5000)
    out = tmp_path / "big" / "big.txt"
    done = subprocess.run([sys.executable, str(REPO / "scripts" / "make_big_text.py"), "--out",
                           str(out), "--megabytes", "0.001", "--root", str(root)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert out.read_text(encoding="utf-8") == "# ä\nprint('z')\n"  # c.rst would pass the size
