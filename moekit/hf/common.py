"""What every Hugging Face family module shares: the `Family` table row, `Convert`, the error and two helpers.

`Family` is the row of names and quirks one family is described by;
`Convert` describes a tensor that is not stored the way moekit holds it
(transposed, interleaved, MXFP4-packed); `need` reads a required config key
and `unsupported` builds the refusal that names a feature.

Not here: the families themselves (families.py, families_more.py), reading
and writing files (reader.py, writer.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..errors import CheckpointError, MoekitError

CONFIG_FILE = "config.json"


@dataclass(frozen=True)
class Family:
    """How one Hugging Face MoE family names its config keys and tensors."""

    model_type: str
    architecture: str
    moe_module: str  # the MoE block's name inside a layer
    expert_names: tuple[str, str, str]  # gate, up, down projections of one expert
    qk_norm: str  # none | head | full
    shared_expert: bool  # Qwen2-MoE: one shared expert behind a sigmoid gate
    dense_layers: bool  # mlp_only_layers / decoder_sparse_step exist
    expert_width_key: str
    bias_key: str | None  # the config key for q/k/v biases; None: never biased


@dataclass(frozen=True)
class Convert:
    """A stored tensor that is not moekit's value as it is.

    load(stored, *companions) -> moekit's tensor; `companions` names further stored tensors it needs
    (an MXFP4 weight's scales). save(moekit tensor) -> the stored tensor; None: moekit cannot write it.
    """

    load: Callable
    save: Callable | None = None
    companions: tuple[str, ...] = ()


class UnsupportedModelError(MoekitError):
    """A Hugging Face model (or a moekit model for export) that no supported family describes."""


def need(hf: dict, where: str, fam: Family, key: str, *alternatives: str) -> Any:
    for k in (key, *alternatives):
        if hf.get(k) is not None:
            return hf[k]
    raise CheckpointError(f"{where} lacks {key!r}, which a {fam.model_type} config needs")


def unsupported(where: str, fam: Family, what: str) -> UnsupportedModelError:
    return UnsupportedModelError(f"{where}: {what} is not supported by moekit's {fam.model_type} loader")
