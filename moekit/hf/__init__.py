"""Hugging Face checkpoints in and out: `moekit.hf.load(dir)` and `moekit.hf.save(model, dir, arch=...)`."""

from .core import *  # noqa: F401,F403
from .core import convert, is_hf_dir, load, load_tokenizer, save  # noqa: F401
