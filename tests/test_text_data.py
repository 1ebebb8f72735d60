"""Tests for moekit.data.text: corpus loading and splits, tokenizers, token batches.

Oracles: UTF-8 bytes (the byte-level tokenizer is the identity on bytes), the
whole-text encoding (for chunked encoding), transformers' fast tokenizer loading
our tokenizer.json, and arange token streams (for batch windows).
"""

import os
import random
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch

from moekit.data import text as text_mod
from moekit.data.text import Corpus, Tokenizer, batch_at, encode_corpus, load_corpus
from moekit.errors import ConfigError, DataError

SHAKESPEARE = Path(__file__).resolve().parents[2] / "shared" / "data" / "text" / "tinyshakespeare.txt"
REPO = Path(__file__).resolve().parents[1]


def random_unicode(rng: random.Random, n: int) -> str:
    """Arbitrary text: ASCII, controls, accents, combining marks, CJK, emoji, astral planes."""
    pools = [(0x20, 0x7E), (0x00, 0x1F), (0xA0, 0x17F), (0x300, 0x36F), (0x4E00, 0x4FFF), (0x1F600, 0x1F64F), (0x10000, 0x10FFF)]
    out = []
    for _ in range(n):
        lo, hi = rng.choice(pools)
        out.append(chr(rng.randint(lo, hi)))
    return "".join(out)


# ---------------------------------------------------------------- corpora


def test_default_corpus_is_stdlib_source_without_packages():
    root = Path(sysconfig.get_paths()["stdlib"])
    files = text_mod._list_files(root, python_only=True)
    assert files == sorted(files) and len(files) > 200
    assert all(f.endswith(".py") for f in files)
    assert not any(part in ("site-packages", "dist-packages") for f in files for part in f.split("/"))
    assert "os.py" in files
    val = [f for f in files if text_mod._stable_hash("split", f) % 1000 < text_mod.VAL_PER_MILLE]
    assert 0.02 < len(val) / len(files) < 0.09  # ~5% by file


def test_default_corpus_cap_is_deterministic_and_respected():
    a = load_corpus(max_bytes=200_000)
    b = load_corpus(max_bytes=200_000)
    assert a == b
    assert a.source.startswith("python-stdlib:")
    size = len(a.train.encode()) + len(a.val.encode())
    assert 150_000 < size <= 200_000 + a.num_files  # documents are joined with one newline each
    assert a.val and a.train


def test_split_does_not_depend_on_python_hash_seed():
    code = "import hashlib; from moekit.data.text import load_corpus; c = load_corpus(max_bytes=50_000); " \
           "print(hashlib.sha256((c.train + '|' + c.val).encode()).hexdigest())"
    digests = set()
    for seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": seed, "PYTHONPATH": str(REPO)}
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
        digests.add(out.stdout.strip())
    assert len(digests) == 1


def test_folder_split_by_file_skips_venvs_packages_and_binaries(tmp_path):
    docs = {f"pkg{i % 3}/doc{i}.txt": f"document number {i}\n" * 3 for i in range(60)}
    for rel, body in docs.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(body)
    (tmp_path / "venv").mkdir()
    (tmp_path / "venv" / "pyvenv.cfg").write_text("home = /usr\n")
    (tmp_path / "venv" / "inside.txt").write_text("VENV TEXT\n")
    (tmp_path / "site-packages").mkdir()
    (tmp_path / "site-packages" / "lib.py").write_text("PACKAGE TEXT\n")
    (tmp_path / "blob.bin").write_bytes(b"\x00\x01\x02binary")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))

    corpus = load_corpus(tmp_path)
    assert corpus.num_files == 60
    for body in docs.values():
        # every document lands in exactly one side
        assert (body in corpus.train) != (body in corpus.val)
    for foreign in ("VENV TEXT", "PACKAGE TEXT", "binary", "caf"):
        assert foreign not in corpus.train + corpus.val
    assert 0 < corpus.val.count("document number") < corpus.train.count("document number")


def test_text_file_keeps_last_tenth_for_val(tmp_path):
    path = tmp_path / "t.txt"
    body = "".join(f"line {i}\n" for i in range(1000))
    path.write_text(body)
    corpus = load_corpus(str(path))
    assert corpus.train + corpus.val == body
    assert len(corpus.val) == len(body) - int(len(body) * 0.9)
    capped = load_corpus(str(path), max_bytes=1000)
    assert capped.train + capped.val == body[:1000]


@pytest.mark.shared
@pytest.mark.skipif(not SHAKESPEARE.is_file(), reason="../shared/data/text/tinyshakespeare.txt is absent")
def test_tinyshakespeare_loads():
    corpus = load_corpus(SHAKESPEARE)
    assert corpus.train.startswith("First Citizen")
    assert abs(len(corpus.val) / (len(corpus.train) + len(corpus.val)) - 0.1) < 1e-3


def test_bad_data_paths_raise_data_error_naming_the_path(tmp_path):
    missing = tmp_path / "nope.txt"
    with pytest.raises(DataError, match="nope.txt does not exist"):
        load_corpus(missing)
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(DataError, match="empty.txt is empty"):
        load_corpus(tmp_path / "empty.txt")
    (tmp_path / "bin.dat").write_bytes(b"\xff\xfe\x00\x00")
    with pytest.raises(DataError, match="bin.dat is not UTF-8 text"):
        load_corpus(tmp_path / "bin.dat")
    (tmp_path / "d").mkdir()
    with pytest.raises(DataError, match="holds no readable text"):
        load_corpus(tmp_path / "d")
    with pytest.raises(ConfigError, match="max_bytes"):
        load_corpus(tmp_path / "empty.txt", max_bytes=0)


# ---------------------------------------------------------------- tokenizers


def test_byte_level_tokenizer_is_bytes_and_round_trips():
    tok = Tokenizer.byte_level()
    assert tok.vocab_size == 257 and tok.eos_id == 256
    rng = random.Random(0)
    for n in (0, 1, 17, 300):
        s = random_unicode(rng, n) + " \r\n\t  x  \n\n"
        ids = tok.encode(s)
        assert ids == list(s.encode("utf-8"))
        assert tok.decode(ids) == s
    assert tok.encode("a<|endoftext|>") == [97, 256]
    assert tok.decode(torch.tensor([104, 105, 256])) == "hi<|endoftext|>"


def test_trained_bpe_round_trips_and_compresses(tmp_path):
    corpus = load_corpus(max_bytes=300_000)
    tok = Tokenizer.train_bpe([corpus.train], vocab_size=600)
    assert tok.vocab_size == 600 and tok.eos_id is not None
    rng = random.Random(1)
    for s in [random_unicode(rng, 200) for _ in range(5)] + [corpus.val[:5000]]:
        assert tok.decode(tok.encode(s)) == s
    sample = corpus.val[:20000]
    assert len(tok.encode(sample)) < 0.6 * len(sample.encode())

    path = tok.save(tmp_path / "tok")
    assert path == tmp_path / "tok" / "tokenizer.json"
    for source in (tmp_path / "tok", path):
        again = Tokenizer.from_file(source)
        assert again.encode(sample) == tok.encode(sample) and again.eos_id == tok.eos_id


def test_saved_tokenizer_is_a_standard_tokenizer_json(tmp_path):
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer.byte_level()
    path = tok.save(tmp_path)
    hf = PreTrainedTokenizerFast(tokenizer_file=str(path))
    s = "naïve café — 東京 🚀\n"
    assert hf.encode(s, add_special_tokens=False) == tok.encode(s)


def test_tokenizer_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        Tokenizer.from_file(tmp_path)
    bad = tmp_path / "tokenizer.json"
    bad.write_text("{not json")
    with pytest.raises(DataError, match="tokenizer.json cannot be read"):
        Tokenizer.from_file(bad)
    with pytest.raises(ConfigError, match="vocab_size=100"):
        Tokenizer.train_bpe(["abc"], vocab_size=100)


# ---------------------------------------------------------------- token streams and batches


def test_encode_corpus_in_chunks_equals_whole_text(monkeypatch):
    corpus = load_corpus(max_bytes=100_000)
    tok = Tokenizer.train_bpe([corpus.train], vocab_size=400)
    monkeypatch.setattr(text_mod, "CHUNK_CHARS", 500)  # force many chunk boundaries
    ids = encode_corpus(tok, corpus.train)
    assert ids.dtype == torch.long and ids.ndim == 1
    assert ids.tolist() == tok.encode(corpus.train)


def test_batch_at_is_deterministic_shifted_and_step_dependent():
    tokens = torch.arange(10_000)
    x, y = batch_at(tokens, step=7, batch_size=4, seq_len=32, seed=3)
    assert x.shape == y.shape == (4, 32) and x.dtype == torch.long
    assert torch.equal(y, x + 1)  # with an arange stream: y is x shifted by one, windows contiguous
    assert torch.equal(x[:, 1:] - x[:, :-1], torch.ones(4, 31, dtype=torch.long))
    x2, y2 = batch_at(tokens, step=7, batch_size=4, seq_len=32, seed=3)
    assert torch.equal(x, x2) and torch.equal(y, y2)
    torch.manual_seed(123)  # the global RNG plays no part
    assert torch.equal(batch_at(tokens, 7, 4, 32, 3)[0], x)
    assert not torch.equal(batch_at(tokens, 8, 4, 32, 3)[0], x)
    assert not torch.equal(batch_at(tokens, 7, 4, 32, 4)[0], x)


def test_batch_at_covers_the_last_token_and_rejects_short_corpora():
    tokens = torch.arange(5)
    x, y = batch_at(tokens, 0, 8, 4, 0)
    assert torch.equal(x, torch.arange(4).expand(8, 4)) and torch.equal(y, torch.arange(1, 5).expand(8, 4))
    with pytest.raises(DataError, match="seq_len=5"):
        batch_at(tokens, 0, 1, 5, 0)


def test_corpus_is_a_plain_dataclass():
    c = Corpus(train="a", val="b", source="x")
    assert c.num_files == 1
