"""GGUF block formats in torch: the block sizes of the types moekit runs as blocks, and their dequantization.

A GGUF quantized matrix is stored row by row; each row is a run of fixed-size blocks (llama.cpp's
ggml-quants layout, "file order"). The types moekit keeps in block form (`BLOCK_TYPES`):

- Q8_0: 32 weights in 34 bytes: an fp16 scale d, then 32 int8 codes (w = d * q);
- Q4_0: 32 weights in 18 bytes: d, then 16 bytes of nibbles (low nibbles = weights 0..15, high = 16..31;
  w = d * (q - 8));
- Q5_0: 32 weights in 22 bytes: d, a 32-bit little-endian word of fifth bits, 16 bytes of nibbles
  (w = d * (q - 16));
- Q4_K: 256 weights in 144 bytes: d, dmin, 12 bytes of eight packed 6-bit (scale, min) pairs, 128 bytes
  of nibbles (w = d * scale_j * q - dmin * min_j per 32-weight sub-block j);
- Q5_K: 256 weights in 176 bytes: d, dmin, Q4_K's 12 scale bytes, 32 bytes of fifth bits (bit j of byte l:
  weight l of sub-block j), 128 bytes of nibbles as Q4_K's;
- Q6_K: 256 weights in 210 bytes: 128 bytes of low nibbles, 64 bytes of high 2-bit pairs, sixteen int8
  scales, d (w = d * scale_j * (q - 32) per 16-weight sub-block j).

`dequantize(raw_RB, qtype)` turns uint8 rows [..., row_bytes] into fp32 rows [..., row_bytes / type_size *
block_size], vectorized over all blocks, with the same float operations in the same order as gguf-py's
`gguf.quants.dequantize` (so the results are bit-identical; tests/test_gguf_blocks.py holds it to that).

Not here: the modules that hold blocks (storage.py), reading files (reader.py), the compiled kernels
(moekit.moe.native).
"""

from __future__ import annotations

import torch

from ..moe.native import GGUF_BLOCKS

# qtype name -> (weights per block, bytes per block): the block formats the native kernels read, one table
BLOCK_TYPES = GGUF_BLOCKS
FLOAT_TYPES = ("F32", "F16", "BF16")  # read as floats (not blocks)


def is_block_type(qtype: str) -> bool:
    return qtype in BLOCK_TYPES


def row_bytes(qtype: str, cols: int, where: str = "a row") -> int:
    """Bytes of one row of `cols` weights in `qtype` blocks (ValueError when cols does not split into blocks)."""
    block, size = BLOCK_TYPES[qtype]
    if cols % block:
        raise ValueError(f"{where} has {cols} columns, which do not split into {qtype}'s {block}-weight blocks")
    return cols // block * size


def row_width(qtype: str, nbytes: int) -> int:
    """Weights in a row of `nbytes` bytes of `qtype` blocks."""
    block, size = BLOCK_TYPES[qtype]
    return nbytes // size * block


def dequantize(raw_RB: torch.Tensor, qtype: str) -> torch.Tensor:
    """fp32 [..., cols] from uint8 rows of `qtype` blocks [..., row_bytes]."""
    block, size = BLOCK_TYPES[qtype]
    lead, nbytes = raw_RB.shape[:-1], raw_RB.shape[-1]
    blocks = raw_RB.reshape(-1, size)
    return _DEQUANT[qtype](blocks).reshape(*lead, nbytes // size * block)


def _f16(blocks: torch.Tensor, at: int) -> torch.Tensor:
    """The fp16 at byte `at` of each block, as fp32 [n, 1]."""
    return blocks[:, at : at + 2].contiguous().view(torch.float16).float()


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """[n, m] bytes -> [n, 2, m]: the low nibbles, then the high ones."""
    return torch.stack((qs & 0x0F, qs >> 4), dim=1)


def _q8_0(blocks: torch.Tensor) -> torch.Tensor:
    return blocks[:, 2:].contiguous().view(torch.int8).float() * _f16(blocks, 0)


def _q4_0(blocks: torch.Tensor) -> torch.Tensor:
    q = _nibbles(blocks[:, 2:]).reshape(blocks.shape[0], 32).to(torch.int8) - 8
    return _f16(blocks, 0) * q.float()


_BITS8 = torch.arange(8, dtype=torch.uint8)


def _q5_0(blocks: torch.Tensor) -> torch.Tensor:
    n = blocks.shape[0]
    high = ((blocks[:, 2:6, None] >> _BITS8.to(blocks.device)) & 1).reshape(n, 32)  # bit j of the little-endian word: weight j
    low = _nibbles(blocks[:, 6:]).reshape(n, 32)
    q = (low | (high << 4)).to(torch.int8) - 16
    return _f16(blocks, 0) * q.float()


def _k_scale_min(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K's 12 packed bytes -> (eight 6-bit scales, eight 6-bit mins), each [n, 8] uint8."""
    d, m, m_d = scales[:, 0:4], scales[:, 4:8], scales[:, 8:12]
    sc = torch.cat((d & 0x3F, (m_d & 0x0F) | ((d >> 2) & 0x30)), dim=1)
    mn = torch.cat((m & 0x3F, (m_d >> 4) | ((m >> 2) & 0x30)), dim=1)
    return sc, mn


def _q4_k(blocks: torch.Tensor) -> torch.Tensor:
    n = blocks.shape[0]
    sc, mn = _k_scale_min(blocks[:, 4:16])
    d = (_f16(blocks, 0) * sc.float()).reshape(n, 8, 1)
    dm = (_f16(blocks, 2) * mn.float()).reshape(n, 8, 1)
    q = _nibbles(blocks[:, 16:].reshape(n * 4, 32)).reshape(n, 8, 32).float()  # 32 bytes: sub-blocks 2c, 2c + 1
    return (d * q - dm).reshape(n, 256)


def _q5_k(blocks: torch.Tensor) -> torch.Tensor:
    n = blocks.shape[0]
    sc, mn = _k_scale_min(blocks[:, 4:16])
    d = (_f16(blocks, 0) * sc.float()).reshape(n, 8, 1)
    dm = (_f16(blocks, 2) * mn.float()).reshape(n, 8, 1)
    low = _nibbles(blocks[:, 48:].reshape(n * 4, 32)).reshape(n, 8, 32)
    high = (blocks[:, 16:48].reshape(n, 1, 32) >> _BITS8.to(blocks.device).reshape(1, 8, 1)) & 1  # bit j: sub-block j
    return (d * (low | (high << 4)).float() - dm).reshape(n, 256)


_PAIRS = torch.tensor([0, 2, 4, 6], dtype=torch.uint8).reshape(1, 1, 4, 1)


def _q6_k(blocks: torch.Tensor) -> torch.Tensor:
    n = blocks.shape[0]
    ql = _nibbles(blocks[:, :128].reshape(n * 2, 64)).reshape(n, 8, 32)
    qh = ((blocks[:, 128:192].reshape(n, 2, 1, 32) >> _PAIRS.to(blocks.device)) & 0x03).reshape(n, 8, 32)
    scales = blocks[:, 192:208].contiguous().view(torch.int8).float()
    d = (_f16(blocks, 208) * scales).reshape(n, 16, 1)
    q = ((ql | (qh << 4)).to(torch.int8) - 32).reshape(n, 16, 16).float()
    return (d * q).reshape(n, 256)


_DEQUANT = {"Q8_0": _q8_0, "Q4_0": _q4_0, "Q5_0": _q5_0, "Q4_K": _q4_k, "Q6_K": _q6_k, "Q5_K": _q5_k}
