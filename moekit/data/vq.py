"""A VQ image tokenizer that moekit trains: a k-means codebook over image patches.

`VQTokenizer.train(images_NHW, patch=2, codes=64)` cuts every image into
patch x patch tiles and clusters them (k-means++ start, Lloyd iterations,
numpy, seeded); `encode` maps each tile to its nearest code (raster order),
`decode` rebuilds images from codes. Token ids are `offset + code`: image
tokens live in their own id range after the text vocabulary, which is how
mixed-modal models tell modalities apart (`ModelConfig.group_of_token`).
`check_vocab` gives one clear message when a codebook does not fit a model.

Not here: the mixed-modal corpus (mixed_modal.py), text tokenizers (text.py).

Shape legend: N images, H/W pixels, P patch values (patch * patch), K codes, L tokens per image.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import DataError


@dataclass
class VQTokenizer:
    codebook_KP: np.ndarray  # [K, patch * patch] cluster centres
    patch: int
    image_size: int  # square images, image_size x image_size pixels
    offset: int  # the id of code 0 (the text vocabulary's size)

    @property
    def codes(self) -> int:
        return int(self.codebook_KP.shape[0])

    @property
    def tokens_per_image(self) -> int:
        return (self.image_size // self.patch) ** 2

    @classmethod
    def train(cls, images_NHW: np.ndarray, patch: int = 2, codes: int = 64, offset: int = 257,
              iters: int = 25, seed: int = 0) -> "VQTokenizer":
        """k-means over the images' patch x patch tiles."""
        images_NHW = np.asarray(images_NHW, dtype=np.float64)
        if images_NHW.ndim != 3 or images_NHW.shape[1] != images_NHW.shape[2] or images_NHW.shape[1] % patch:
            raise DataError(f"images must be square [N, H, H] with H divisible by patch={patch}; got {images_NHW.shape}")
        x_MP = _patches(images_NHW, patch)
        if codes < 1 or codes > len(x_MP):
            raise DataError(f"codes={codes} is invalid: it must be between 1 and the number of patches ({len(x_MP)})")
        rng = np.random.default_rng(seed)
        centres = _kmeans_pp(x_MP, codes, rng)
        for _ in range(iters):
            assign = _nearest(x_MP, centres)
            for k in range(codes):
                members = x_MP[assign == k]
                centres[k] = members.mean(0) if len(members) else x_MP[rng.integers(len(x_MP))]
        return cls(centres, patch, images_NHW.shape[1], offset)

    def encode(self, images_NHW: np.ndarray) -> np.ndarray:
        """[N, L] token ids (offset + code), tiles in raster order."""
        images_NHW = np.asarray(images_NHW, dtype=np.float64)
        if images_NHW.shape[1:] != (self.image_size, self.image_size):
            raise DataError(f"images are {images_NHW.shape[1:]} but this VQ tokenizer encodes "
                            f"{self.image_size}x{self.image_size} images")
        codes = _nearest(_patches(images_NHW, self.patch), self.codebook_KP)
        return codes.reshape(len(images_NHW), self.tokens_per_image) + self.offset

    def decode(self, ids_NL: np.ndarray) -> np.ndarray:
        """[N, H, W] images from token ids."""
        ids_NL = np.asarray(ids_NL)
        self.check_ids(ids_NL)
        n, g, p = len(ids_NL), self.image_size // self.patch, self.patch
        tiles = self.codebook_KP[ids_NL - self.offset].reshape(n, g, g, p, p)
        return tiles.transpose(0, 1, 3, 2, 4).reshape(n, self.image_size, self.image_size)

    def check_ids(self, ids: np.ndarray) -> None:
        bad = ids[(ids < self.offset) | (ids >= self.offset + self.codes)]
        if bad.size:
            raise DataError(f"token id {int(bad.flat[0])} is not an image token of this VQ tokenizer "
                            f"(ids [{self.offset}, {self.offset + self.codes}))")

    def check_vocab(self, vocab_size: int, text_vocab: int | None = None, where: str = "the model") -> None:
        """One clear message when the codebook's id range is not the image range of a vocabulary."""
        end = self.offset + self.codes
        if (text_vocab is not None and self.offset != text_vocab) or end != vocab_size:
            expect = f"image ids [{text_vocab}, {vocab_size})" if text_vocab is not None else f"vocab_size={vocab_size}"
            raise DataError(
                f"the VQ codebook ({self.codes} codes at ids [{self.offset}, {end})) does not match {where}'s "
                f"vocabulary ({expect}): use the codebook the model was trained with, or a model whose vocab_size "
                f"is text vocabulary + codes")

    # ------------------------------------------------------------ files

    def save(self, path: str | Path) -> Path:
        """Write the codebook as JSON (atomically: a temporary file renamed into place)."""
        p = Path(path)
        data = {"kind": "moekit-vq", "patch": self.patch, "image_size": self.image_size, "offset": self.offset,
                "codebook": self.codebook_KP.tolist()}
        tmp = p.with_name(p.name + ".tmp")
        tmp.write_text(json.dumps(data) + "\n")
        tmp.replace(p)
        return p

    @classmethod
    def load(cls, path: str | Path) -> "VQTokenizer":
        from ..fileio import read_json

        p = Path(path)
        data = read_json(p, DataError, missing=f"VQ codebook {p} does not exist", invalid=f"VQ codebook {p} is not valid JSON")
        try:
            if data.get("kind") != "moekit-vq":
                raise ValueError("not a moekit VQ codebook")
            book = np.asarray(data["codebook"], dtype=np.float64)
            patch, size, offset = int(data["patch"]), int(data["image_size"]), int(data["offset"])
            if book.ndim != 2 or book.shape[1] != patch * patch or size % patch:
                raise ValueError("codebook shape does not match its patch size")
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise DataError(f"VQ codebook {p} cannot be used: {e}") from None
        return cls(book, patch, size, offset)


def _patches(images_NHW: np.ndarray, p: int) -> np.ndarray:
    """[N * L, p * p] tiles in raster order."""
    n, h, _ = images_NHW.shape
    g = h // p
    return images_NHW.reshape(n, g, p, g, p).transpose(0, 1, 3, 2, 4).reshape(n * g * g, p * p)


def _nearest(x_MP: np.ndarray, centres_KP: np.ndarray) -> np.ndarray:
    d = (x_MP ** 2).sum(1)[:, None] - 2 * x_MP @ centres_KP.T + (centres_KP ** 2).sum(1)[None, :]
    return d.argmin(1)


def _kmeans_pp(x_MP: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    centres = [x_MP[rng.integers(len(x_MP))]]
    d2 = ((x_MP - centres[0]) ** 2).sum(1)
    for _ in range(1, k):
        total = d2.sum()
        idx = rng.choice(len(x_MP), p=d2 / total) if total > 0 else rng.integers(len(x_MP))
        centres.append(x_MP[idx])
        d2 = np.minimum(d2, ((x_MP - x_MP[idx]) ** 2).sum(1))
    return np.array(centres, dtype=np.float64)
