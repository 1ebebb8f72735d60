"""GGUF tokenizer metadata (`tokenizer.ggml.*`) -> a moekit Tokenizer over the `tokenizers` library.

"gpt2" vocabs (byte-level BPE: moekit's own exports, Qwen, OLMoE) become a byte-level BPE with the
stored merges (merges whose parts or result are not tokens, e.g. the placeholder moekit writes for a
merge-less byte vocab, are dropped); "llama" (SentencePiece) vocabs a Unigram over the stored scores
with byte fallback, which segments like SentencePiece's BPE in most but not all cases. Control tokens
become special tokens. Not here: writing (writer.py), model weights (reader.py).
"""

from __future__ import annotations

from ..errors import CheckpointError

CONTROL, USER_DEFINED = 3, 4


def tokenizer_from_metadata(meta: dict):
    from tokenizers import AddedToken
    from tokenizers import Tokenizer as Backend

    from ..data.text import Tokenizer

    kind = meta.get("tokenizer.ggml.model")
    tokens = meta.get("tokenizer.ggml.tokens")
    if kind is None or not tokens:
        return None
    types = list(meta.get("tokenizer.ggml.token_type") or [1] * len(tokens))
    if kind == "gpt2":
        backend = _byte_level(tokens, types, meta.get("tokenizer.ggml.merges") or [])
    elif kind == "llama":
        backend = _sentencepiece(tokens, meta.get("tokenizer.ggml.scores") or [0.0] * len(tokens))
    else:
        raise CheckpointError(f"GGUF tokenizer.ggml.model={kind!r} is not supported: moekit reads 'gpt2' and 'llama' vocabs")
    special = [AddedToken(t, special=True, normalized=False) for t, ty in zip(tokens, types) if ty in (CONTROL, USER_DEFINED)]
    backend.add_special_tokens(special)
    assert isinstance(backend, Backend)
    return Tokenizer(backend)


def _byte_level(tokens: list[str], types: list[int], merges: list[str]):
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models, pre_tokenizers

    vocab = {t: i for i, t in enumerate(tokens) if types[i] not in (CONTROL, USER_DEFINED)}
    pairs = []
    for m in merges:
        a, _, b = m.partition(" ")
        if a in vocab and b in vocab and a + b in vocab:
            pairs.append((a, b))
    tok = Backend(models.BPE(vocab=vocab, merges=pairs))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    return tok


def _sentencepiece(tokens: list[str], scores: list[float]):
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models, normalizers

    unk = next((i for i, t in enumerate(tokens) if t == "<unk>"), None)
    tok = Backend(models.Unigram([(t, float(s)) for t, s in zip(tokens, scores)], unk_id=unk, byte_fallback=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    return tok
