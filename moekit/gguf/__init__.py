"""GGUF in and out (llama.cpp's file format), through the `gguf` package from PyPI.

- `moekit.gguf.load(path)` / `load_tokenizer(path)`: a GGUF MoE file (llama with experts = Mixtral's
  layout, qwen2moe, qwen3moe, olmoe) as a DecoderLM (reader.py). Q8_0, Q4_0, Q5_0, Q4_K, Q5_K and Q6_K weights stay
  in their blocks (blocks.py: the formats; storage.py: `GGUFExperts`, `GGUFLinear`; block_load.py: reading
  them), resident at their file size; other types gguf dequantizes are read as floats (blocks=False: all);
- `moekit.gguf.save(model, path, tokenizer, dtype="F32"|"F16"|"Q8_0"|"Q4_0")`, `convert(src, out)`:
  a moekit model as a GGUF file llama.cpp loads (writer.py);
- arch.py: the architecture and tensor-name maps; tokenizer.py: `tokenizer.ggml.*` -> tokenizers.

This file only re-exports. Not here: the Hugging Face layouts (moekit.hf), running the model (moekit.infer).
"""

from .arch import ARCH_TO_FAMILY, UnsupportedGGUFError
from .reader import is_gguf, load, load_tokenizer
from .storage import GGUFExperts, GGUFLinear
from .writer import GGUF_TYPES, convert, save

__all__ = ["load", "load_tokenizer", "is_gguf", "save", "convert", "GGUF_TYPES", "ARCH_TO_FAMILY", "UnsupportedGGUFError",
           "GGUFExperts", "GGUFLinear"]
