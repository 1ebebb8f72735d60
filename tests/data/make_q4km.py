"""Makes tests/data/tiny-mixtral-Q4_K_M.gguf: a tiny random Mixtral quantized by llama.cpp's own quantizer.

A transformers Mixtral (hidden 256, intermediate 512, 2 layers, 4 experts top-2, vocab 512, seed 0) is saved,
read by moekit.hf, exported with moekit.gguf.save(..., dtype="F32") and quantized with llama-cpp-python's
`llama_model_quantize` at LLAMA_FTYPE_MOSTLY_Q4_K_M, so the file holds the block types a user's Q4_K_M file
does (Q4_K and Q6_K; every width here is a multiple of 256). tests/test_gguf_blocks.py reads the committed
file; only this script needs llama-cpp-python (and transformers):

    .venv/bin/python tests/data/make_q4km.py

Not here: the tests (tests/test_gguf_blocks.py).
"""

from __future__ import annotations

import ctypes
import sys
import tempfile
from pathlib import Path

OUT = Path(__file__).resolve().parent / "tiny-mixtral-Q4_K_M.gguf"
CONFIG = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_local_experts=4, num_experts_per_tok=2,
              vocab_size=512, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)


def export_f32(directory: Path) -> Path:
    """The random Mixtral as moekit's F32 GGUF export."""
    import torch
    from transformers import MixtralConfig, MixtralForCausalLM

    import moekit.gguf as G
    from moekit import hf
    from moekit.data.text import Tokenizer

    torch.manual_seed(0)
    MixtralForCausalLM(MixtralConfig(**CONFIG)).save_pretrained(directory / "hf")
    return G.save(hf.load(directory / "hf"), directory / "f32.gguf", Tokenizer.byte_level(), dtype="F32")


def quantize(src: Path, dst: Path) -> None:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M
    params.nthread = 1
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if rc != 0:
        sys.exit(f"llama_model_quantize failed ({rc})")


def main() -> None:
    with tempfile.TemporaryDirectory() as d:
        src = export_f32(Path(d))
        tmp = Path(d) / "q4km.gguf"
        quantize(src, tmp)
        OUT.write_bytes(tmp.read_bytes())
    print(f"wrote {OUT} ({OUT.stat().st_size / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
