"""Text corpora, tokenizers and training batches for language models.

- `load_corpus`: a train/val text split from a file, a folder, or by default the
  Python standard library's own source (present on every machine, no download).
- `Tokenizer`: byte-level BPE built on the `tokenizers` library, either untrained
  (every byte is one token) or trained on a corpus; saved as a standard
  `tokenizer.json`.
- `encode_corpus` / `batch_at`: a corpus as one token tensor, and the random
  training windows of a given step, recomputable after a resume with no saved
  RNG state.

Not here: time-series data (`moekit.data.timeseries`), chat templates, or any
download.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import ConfigError, DataError

EOS_TOKEN = "<|endoftext|>"
# EOS spellings of common Hugging Face tokenizers, tried when a loaded tokenizer lacks ours.
KNOWN_EOS_TOKENS = (EOS_TOKEN, "</s>", "<|im_end|>", "<eos>", "<|end_of_text|>")
VAL_PER_MILLE = 50  # ~5% of files go to validation
TEXT_FILE_VAL_FRACTION = 0.1  # a single file: the last 10% of its characters
SKIPPED_DIRS = {"site-packages", "dist-packages", "__pycache__"}
SNIFF_BYTES = 8192


@dataclass
class Corpus:
    """A train/val split of text; `source` says where it came from, for logs and configs."""

    train: str
    val: str
    source: str
    num_files: int = 1


# ---------------------------------------------------------------- corpora


def load_corpus(data: str | Path | None = None, max_bytes: int | None = None) -> Corpus:
    """Train/val text from a file, a folder, or (data=None) the Python standard library's source.

    Folders are split by file (a stable hash of each relative path sends ~5% to
    val); a single file keeps its last 10% of characters for val. `max_bytes`
    caps the UTF-8 size read, taking files in a fixed hash-shuffled order.
    """
    if max_bytes is not None and (not isinstance(max_bytes, int) or max_bytes < 1):
        raise ConfigError(f"max_bytes={max_bytes!r} is invalid: it must be a positive integer or None")
    if data is None:
        root = Path(sysconfig.get_paths()["stdlib"])
        return _load_folder(root, max_bytes, python_only=True, source=f"python-stdlib:{root}")
    path = Path(data)
    if path.is_file():
        return _load_file(path, max_bytes)
    if path.is_dir():
        return _load_folder(path, max_bytes, python_only=False, source=str(path))
    raise DataError(f"data path {path} does not exist: give a text file or a folder of text files")


def _load_file(path: Path, max_bytes: int | None) -> Corpus:
    text = _read_text(path)
    if text is None:
        raise DataError(f"data file {path} is not UTF-8 text: give a text file or a folder of text files")
    text = _truncate_utf8(text, max_bytes)
    if not text.strip():
        raise DataError(f"data file {path} is empty: it must contain some text")
    cut = int(len(text) * (1 - TEXT_FILE_VAL_FRACTION))
    return Corpus(train=text[:cut], val=text[cut:], source=str(path), num_files=1)


def _load_folder(root: Path, max_bytes: int | None, python_only: bool, source: str) -> Corpus:
    rel_paths = _list_files(root, python_only)
    # A fixed pseudo-random order, so a byte cap samples across the whole tree, not only its first folders.
    order = sorted(rel_paths, key=lambda rel: _stable_hash("order", rel))
    docs: dict[str, str] = {}
    total = 0
    for rel in order:
        text = _read_text(root / rel)
        if not text or not text.strip():
            continue
        if max_bytes is not None:
            text = _truncate_utf8(text, max_bytes - total)
        docs[rel] = text
        total += len(text.encode("utf-8"))
        if max_bytes is not None and total >= max_bytes:
            break
    if not docs:
        raise DataError(f"data folder {root} holds no readable text files (UTF-8, non-empty)")
    train, val = _split_by_file(docs)
    return Corpus(train=train, val=val, source=source, num_files=len(docs))


def _list_files(root: Path, python_only: bool) -> list[str]:
    """Relative paths (POSIX style) of candidate files, sorted; skips packages, venvs and hidden entries."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        # Prune in place so os.walk never descends into installed packages or virtual environments.
        dirnames[:] = sorted(
            d for d in dirnames
            if d not in SKIPPED_DIRS and not d.startswith(".") and not (here / d / "pyvenv.cfg").exists()
        )
        for name in filenames:
            if name.startswith(".") or (python_only and not name.endswith(".py")):
                continue
            path = here / name
            if path.is_file() and not path.is_symlink():
                found.append(path.relative_to(root).as_posix())
    return sorted(found)


def _split_by_file(docs: dict[str, str]) -> tuple[str, str]:
    """Join documents in relative-path order into (train, val); both sides are kept non-empty."""
    names = sorted(docs)
    if len(names) == 1:
        text = docs[names[0]]
        cut = int(len(text) * (1 - TEXT_FILE_VAL_FRACTION))
        return text[:cut], text[cut:]
    val_names = {n for n in names if _stable_hash("split", n) % 1000 < VAL_PER_MILLE}
    if not val_names or len(val_names) == len(names):
        # Small selections may miss (or fill) the 5% bucket; the lowest hash then goes to val alone.
        val_names = {min(names, key=lambda n: _stable_hash("split", n))}
    train = "\n".join(docs[n] for n in names if n not in val_names)
    val = "\n".join(docs[n] for n in names if n in val_names)
    return train, val


def _stable_hash(salt: str, rel_path: str) -> int:
    """A hash that is the same in every process (Python's hash() is randomised per process)."""
    digest = hashlib.sha256(f"{salt}:{rel_path}".encode()).digest()
    return int.from_bytes(digest[:8], "big")


def _read_text(path: Path) -> str | None:
    """The file as UTF-8 text, or None for binary, undecodable or unreadable files."""
    try:
        raw = path.read_bytes()
    except OSError:
        return None
    if b"\x00" in raw[:SNIFF_BYTES]:
        return None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return None


def _truncate_utf8(text: str, max_bytes: int | None) -> str:
    if max_bytes is None:
        return text
    raw = text.encode("utf-8")
    if len(raw) <= max_bytes:
        return text
    return raw[:max_bytes].decode("utf-8", errors="ignore")  # drop a split trailing character


# ---------------------------------------------------------------- tokenizers


class Tokenizer:
    """Byte-level BPE (the `tokenizers` library), saved and loaded as a standard tokenizer.json."""

    def __init__(self, backend) -> None:
        self.backend = backend
        self.eos_id = _find_eos(backend)

    @classmethod
    def byte_level(cls) -> Tokenizer:
        """Every byte is one token, id == byte value; `<|endoftext|>` (id 256) is EOS."""
        from tokenizers import models

        byte_to_char = _bytes_to_unicode()
        vocab = {byte_to_char[b]: b for b in range(256)}
        return cls(_byte_level_pipeline(models.BPE(vocab=vocab, merges=[])))

    @classmethod
    def train_bpe(cls, texts: list[str] | tuple[str, ...] | str, vocab_size: int) -> Tokenizer:
        """A byte-level BPE trained on `texts` with `vocab_size` tokens (256 bytes + EOS + merges)."""
        from tokenizers import models, pre_tokenizers, trainers

        if not isinstance(vocab_size, int) or vocab_size < 257:
            raise ConfigError(f"vocab_size={vocab_size!r} is invalid for byte-level BPE: it must be >= 257 (256 bytes + EOS)")
        if isinstance(texts, str):
            texts = [texts]
        tok = _byte_level_pipeline(models.BPE())
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=[EOS_TOKEN],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tok.train_from_iterator(texts, trainer=trainer)
        return cls(tok)

    @classmethod
    def from_file(cls, path: str | Path) -> Tokenizer:
        """Load a tokenizer.json file, or the tokenizer.json inside a directory."""
        from tokenizers import Tokenizer as Backend

        p = Path(path)
        if p.is_dir():
            p = p / "tokenizer.json"
        if not p.is_file():
            raise DataError(f"tokenizer file {p} does not exist: give a tokenizer.json or a folder holding one")
        try:
            return cls(Backend.from_file(str(p)))
        except Exception as e:  # the library raises a bare Exception for malformed JSON
            raise DataError(f"tokenizer file {p} cannot be read as a tokenizers JSON file: {e}") from None

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self.backend.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.backend.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: list[int] | torch.Tensor) -> str:
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        return self.backend.decode(list(ids), skip_special_tokens=False)

    def save(self, directory: str | Path) -> Path:
        """Write directory/tokenizer.json and return its path."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        path = d / "tokenizer.json"
        self.backend.save(str(path))
        return path


def _byte_level_pipeline(model):
    """Wrap a BPE model with the byte-level pre-tokenizer/decoder and the EOS special token."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, pre_tokenizers

    tok = Backend(model)
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([EOS_TOKEN])
    return tok


def _find_eos(backend) -> int | None:
    for token in KNOWN_EOS_TOKENS:
        token_id = backend.token_to_id(token)
        if token_id is not None:
            return token_id
    return None


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table, the alphabet of the ByteLevel pre-tokenizer."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


# ---------------------------------------------------------------- token streams and batches

CHUNK_CHARS = 1 << 16
# Chunks end after a newline that sits between two non-space characters: the byte-level
# pre-tokenizer always splits there, so chunked encoding equals encoding the whole text.
_SAFE_BOUNDARY = re.compile(r"(?<=\S)\n(?=\S)")


def encode_corpus(tokenizer: Tokenizer, text: str) -> torch.Tensor:
    """The whole text as a 1-D LongTensor of token ids, encoded in parallel chunks."""
    chunks = _chunks(text, CHUNK_CHARS)
    ids: list[int] = []
    for encoded in tokenizer.encode_batch(chunks):
        ids.extend(encoded)
    return torch.tensor(ids, dtype=torch.long)


def _chunks(text: str, size: int) -> list[str]:
    chunks, start = [], 0
    while start < len(text):
        match = _SAFE_BOUNDARY.search(text, start + size) if start + size < len(text) else None
        end = match.end() if match else len(text)
        chunks.append(text[start:end])
        start = end
    return chunks


def batch_at(
    tokens_1d: torch.Tensor, step: int, batch_size: int, seq_len: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random windows (x_BT, y_BT = x shifted by one) for one training step.

    The window starts depend only on (seed, step), so any step's batch can be
    recomputed after a resume without saving RNG state.
    """
    n = tokens_1d.numel()
    if n < seq_len + 1:
        raise DataError(
            f"the corpus has {n} tokens, too few for seq_len={seq_len}: it needs at least {seq_len + 1}; "
            "use more data or a shorter seq_len"
        )
    gen = torch.Generator().manual_seed(_step_seed(seed, step))
    starts = torch.randint(0, n - seq_len, (batch_size,), generator=gen)
    windows = tokens_1d[starts[:, None] + torch.arange(seq_len + 1)]
    return windows[:, :-1], windows[:, 1:]


def _step_seed(seed: int, step: int) -> int:
    digest = hashlib.sha256(json.dumps([seed, step]).encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1  # manual_seed takes a non-negative 63-bit value
