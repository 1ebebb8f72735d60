"""Mixed-modal (text + image) token streams for early-fusion models (MoMa), built offline.

Images are scikit-learn's bundled handwritten digits (`load_digits`: 1,797
8x8 images), turned into discrete tokens by a VQ tokenizer moekit trains on
the training images (vq.py). Each digit becomes a document with its caption
in words, in either order ("a handwritten seven: <img..>" or "<img..> this is
a seven."); documents are shuffled together with chunks of the text corpus
(the Python standard library by default) and joined by EOS. Text ids are
byte-level (0..256), image ids follow (257 + code), so a token's modality is
its id range: `group_of_token` = [[0, 257, 0], [257, 257 + codes, 1]].

Training images are repeated with 1-pixel shifts (`repeats`); validation
images are other digits. Not here: text corpora (text.py), training (moekit.train).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import DataError
from .text import Tokenizer, load_corpus
from .vq import VQTokenizer

DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
TEXT, IMAGE = 0, 1  # modality group ids


@dataclass
class MixedModalData:
    tokenizer: Tokenizer  # byte-level text + one added token <imgK> per code
    vq: VQTokenizer
    train: torch.Tensor  # token streams
    val: torch.Tensor
    source: str
    group_of_token: list[list[int]]  # the modality of each id range


def load_digit_images() -> tuple[np.ndarray, np.ndarray]:
    """(images [1797, 8, 8] in 0..16, labels) from scikit-learn's bundled data set (no download).

    The CSV scikit-learn ships (datasets/data/digits.csv.gz: 64 pixels + the label per row) is read
    directly, which is what `sklearn.datasets.load_digits` does, without importing scikit-learn.
    """
    import importlib.util

    spec = importlib.util.find_spec("sklearn")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("mixed-modal data needs scikit-learn (its bundled load_digits images): pip install scikit-learn")
    path = Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data" / "digits.csv.gz"
    if not path.is_file():
        from sklearn.datasets import load_digits  # a layout without the CSV: the library's own loader

        digits = load_digits()
        return digits.images.astype(np.float64), digits.target.astype(np.int64)
    rows = np.loadtxt(path, delimiter=",")
    return rows[:, :64].reshape(-1, 8, 8), rows[:, 64].astype(np.int64)


def mixed_tokenizer(codes: int) -> Tokenizer:
    """Byte-level text (ids 0..256) plus image tokens <img0> .. <img{codes-1}> at ids 257 ..."""
    tok = Tokenizer.byte_level()
    text_vocab = tok.vocab_size
    tok.backend.add_special_tokens([f"<img{k}>" for k in range(codes)])
    if tok.backend.token_to_id("<img0>") != text_vocab:
        raise DataError("the image tokens did not land right after the text vocabulary")
    return tok


def prepare_mixed_modal(patch: int = 2, codes: int = 64, text_max_bytes: int = 400_000, text_ratio: float = 1.0,
                        repeats: int = 4, seed: int = 0, tokenizer: Tokenizer | None = None,
                        vq: VQTokenizer | None = None, text_path: str | None = None) -> MixedModalData:
    """Train (or take) the VQ codebook and build the train / val streams.

    text_ratio: text-corpus tokens per digit-document token. A given `tokenizer` (a resumed run's) or
    `vq` (a saved codebook) must agree with each other: one clear message otherwise.
    """
    images, labels = load_digit_images()
    order = np.random.default_rng(seed).permutation(len(images))
    n_val = len(images) // 5
    val_idx, train_idx = order[:n_val], order[n_val:]
    text_vocab = Tokenizer.byte_level().vocab_size
    if vq is None:
        vq = VQTokenizer.train(images[train_idx], patch=patch, codes=codes, offset=text_vocab, seed=seed)
    tok = tokenizer if tokenizer is not None else mixed_tokenizer(vq.codes)
    vq.check_vocab(tok.vocab_size, text_vocab, where="the tokenizer")
    corpus = load_corpus(text_path, text_max_bytes)
    rng = np.random.default_rng(seed + 1)
    train_images = np.concatenate([images[train_idx]] + [_shift(images[train_idx], rng) for _ in range(repeats - 1)])
    train_labels = np.tile(labels[train_idx], repeats)
    train = _stream(tok, vq, train_images, train_labels, corpus.train, text_ratio, rng)
    val = _stream(tok, vq, images[val_idx], labels[val_idx], corpus.val or corpus.train, text_ratio, rng)
    ranges = [[0, text_vocab, TEXT], [text_vocab, text_vocab + vq.codes, IMAGE]]
    source = f"sklearn load_digits ({len(train_idx)} train / {n_val} val images, VQ {patch}x{patch} x {vq.codes}) + {corpus.source}"
    return MixedModalData(tok, vq, train, val, source, ranges)


def digit_documents(tok: Tokenizer, vq: VQTokenizer, images: np.ndarray, labels: np.ndarray,
                    rng: np.random.Generator) -> list[list[int]]:
    """One token list per image: caption then image, or image then caption (chosen at random)."""
    image_ids = vq.encode(images).tolist()
    docs = []
    for ids, label in zip(image_ids, labels.tolist()):
        name = DIGIT_NAMES[label]
        if rng.random() < 0.5:
            docs.append(tok.encode(f"a handwritten {name}: ") + ids + tok.encode("\n"))
        else:
            docs.append(ids + tok.encode(f" this is {'an' if name == 'eight' else 'a'} {name}.\n"))
    return docs


def _stream(tok, vq, images, labels, text: str, text_ratio: float, rng) -> torch.Tensor:
    docs = digit_documents(tok, vq, images, labels, rng)
    want = int(text_ratio * sum(len(d) for d in docs))
    text_ids = tok.encode(text[: max(0, want * 2)])[:want] if want > 0 else []
    chunk = 192
    docs += [text_ids[i: i + chunk] for i in range(0, len(text_ids), chunk)]
    eos = [tok.eos_id if tok.eos_id is not None else 256]
    out: list[int] = []
    for i in rng.permutation(len(docs)):
        out += docs[i] + eos
    return torch.tensor(out, dtype=torch.long)


def _shift(images_NHW: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Each image moved by a random 1-pixel shift (dy, dx in -1..1), zero-filled."""
    out = np.zeros_like(images_NHW)
    h = images_NHW.shape[1]
    for i, (dy, dx) in enumerate(rng.integers(-1, 2, size=(len(images_NHW), 2))):
        src = images_NHW[i, max(0, -dy): h - max(0, dy), max(0, -dx): h - max(0, dx)]
        out[i, max(0, dy): max(0, dy) + src.shape[0], max(0, dx): max(0, dx) + src.shape[1]] = src
    return out


def prepare_lm_data(cfg, tokenizer: Tokenizer | None = None) -> dict:
    """The mixed-modal recipe's data (moekit.train.recipes.LMData fields; lm.py's MixedModalRecipe) for `data.kind=mixed_modal`.

    cfg: the recipe's DataConfig (path, max_bytes, vq_patch, vq_codes, vq_path). The model takes the
    tokenizer's vocabulary (text + image codes) and the modality id ranges as `group_of_token`.
    """
    vq = VQTokenizer.load(cfg.vq_path) if cfg.vq_path else None
    data = prepare_mixed_modal(patch=cfg.vq_patch, codes=cfg.vq_codes, text_max_bytes=cfg.max_bytes,
                               tokenizer=tokenizer, vq=vq, text_path=cfg.path)
    return {"tokenizer": data.tokenizer, "train": data.train, "val": data.val, "source": data.source,
            "model_overrides": {"group_of_token": data.group_of_token}, "files": {"vq.json": data.vq}}
