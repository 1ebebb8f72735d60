"""Calibration data from files: each path (or each file of a folder) is one group / domain.

`read_groups` reads the text, `groups_for(model, texts, source)` turns it into
what `moefy.convert` takes for that model: lists of sentences (one per
non-empty line) for encoders, token-id tensors for decoders (the source's
tokenizer: moekit's tokenizer.json or a Hugging Face tokenizer beside it).
"""

from __future__ import annotations

from pathlib import Path

import torch

from .spec import MoefyError

MAX_BYTES_PER_GROUP = 200_000


def read_groups(paths: list[str] | None) -> list[str]:
    texts = []
    for raw in paths or []:
        p = Path(raw)
        if not p.exists():
            raise MoefyError(f"calibration path {p} does not exist")
        files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
        for f in files:
            text = f.read_bytes()[:MAX_BYTES_PER_GROUP].decode("utf-8", errors="ignore")
            if text.strip():
                texts.append(text)
    if paths and not texts:
        raise MoefyError(f"calibration paths {', '.join(paths)} hold no text")
    return texts


def groups_for(model, texts: list[str], source: str | Path | None):
    """Calibration groups in the form the model's conversion reads."""
    if not texts:
        return None
    if hasattr(model, "encode"):
        return [[line.strip() for line in t.splitlines() if line.strip()] for t in texts]
    encode = _decoder_tokenizer(model, source)
    groups = []
    for t in texts:
        ids = torch.tensor(encode(t), dtype=torch.long).clamp_max(model.cfg.vocab_size - 1)
        if ids.numel() < 2:
            raise MoefyError("a calibration file gives fewer than 2 tokens")
        groups.append(ids)
    return groups


def _decoder_tokenizer(model, source):
    tok = getattr(model, "tokenizer", None)
    if tok is not None:
        return tok.encode
    if source is not None and (Path(source) / "tokenizer.json").is_file():
        from tokenizers import Tokenizer

        backend = Tokenizer.from_file(str(Path(source) / "tokenizer.json"))
        return lambda text: backend.encode(text).ids
    raise MoefyError(f"{source} has no tokenizer (tokenizer.json), so calibration text cannot be turned into token ids")
