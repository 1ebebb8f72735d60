"""moekit: Mixture-of-Experts models in PyTorch.

Public API re-exports only, resolved lazily (a module `__getattr__`), so that
`import moekit` (and `moekit --help`) does not import torch; `from moekit
import MoEConfig, MoELayer` works as before. Not here: any implementation.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "MoEConfig": ".config",
    "MoELayer": ".moe.layers",
    "ResidualMoE": ".moe.layers",
    "MixtureOfDepths": ".moe.layers",
    "pyramid_schedule": ".moe.layers",
    "Routing": ".moe.routing",
    "load": ".infer.load",  # one loader for every format (Hugging Face, moekit run, GGUF, moefy)
    "Loaded": ".infer.load",
}

__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'moekit' has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
