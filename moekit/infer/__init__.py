"""Inference: the generation engine, and (beside it) expert offloading, caching and prefetching.

`Engine` (engine.py) runs batched prefill + decode with a preallocated KV
cache; `SamplingConfig` (sampling.py) holds and checks the sampling settings.
"""

from .engine import Completion, Engine
from .sampling import SamplingConfig

__all__ = ["Engine", "Completion", "SamplingConfig"]
