"""quantize_model: the transform that swaps a built model's weights for weight-only quantized ones.

`quantize_model(model, bits=8|4, group_size=32|64|128, symmetric=True,
scope="experts"|"all")` replaces every MoE layer's `Experts` with a
`QuantizedExperts` (moekit.moe.quantized) and, with scope="all", every
nn.Linear of the attention blocks, the dense MLPs (dense layers, shared
experts, Residual-MoE's MLP) and the output head with a `QuantizedLinear`.
It stays in full precision: every router and gate (the routing decision is
cheap and sensitive), the norms, and the token embedding (a lookup reads one
row per token, so quantizing it would save memory but no time; an untied
head is quantized, a head tied to the embedding stays tied and full
precision). The spec is recorded on the model (`model.quantization`), and
`quantization_section(model)` is what a quantized checkpoint's config.json
stores under "quantization"; `moekit.models.build.load_model` applies the
transform to the meta-built model from that section before reading the
integer tensors.

Checks happen before anything is replaced: an unknown bit width or scope, or
an int4 group size that does not divide a weight's input width, is one
ConfigError and the model is left as it was.

Not here: the formats and kernels (moekit.moe.quant_format / quant_kernels /
quantized), checkpoint files (moekit.cli.quantize writes them).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .errors import ConfigError
from .modules import Attention
from .moe.layers import MoELayer
from .moe.quant_format import QuantSpec, check_width
from .moe.quantized import QUANT_KERNELS, QuantizedExperts, QuantizedLinear

SCOPES = ("experts", "all")
LOAD_TIME = {"int8": dict(bits=8), "int4": dict(bits=4, group_size=32)}  # Engine.load(quantize=...) / --quantize


def quantize_model(model: nn.Module, bits: int = 8, group_size: int | None = None, symmetric: bool = True,
                   scope: str = "experts", kernel: str = "auto") -> nn.Module:
    """Quantize `model` in place (see the module docstring) and return it. int4 defaults to group_size 32."""
    if getattr(model, "quantization", None) is not None:
        raise ConfigError(f"this model is already quantized ({model.quantization['spec'].name}): quantize the fp32 model instead")
    if bits == 4 and group_size is None:
        group_size = 32
    spec = QuantSpec(bits=bits, group_size=group_size, symmetric=symmetric)
    if scope not in SCOPES:
        raise ConfigError(f"scope={scope!r} is unknown: accepted values are {', '.join(SCOPES)}")
    if kernel not in QUANT_KERNELS:
        raise ConfigError(f"kernel={kernel!r} is unknown for quantized weights: accepted values are {', '.join(QUANT_KERNELS)}")
    experts, linears = _targets(model, scope)
    for name, module in experts:  # all checks before the first swap: a refusal leaves the model unchanged
        check_width(spec, module.w_in_EHD.shape[2], f"{name} (w_in)")
        check_width(spec, module.w_out_EDF.shape[2], f"{name} (w_out)")
    for name, module in linears:
        check_width(spec, module.in_features, name)
    for name, module in experts:
        _replace(model, name, QuantizedExperts(module, spec, kernel))
    for name, module in linears:
        _replace(model, name, QuantizedLinear(module, spec, kernel, what=name))
    model.quantization = {"spec": spec, "scope": scope}
    return model


def quantization_section(model: nn.Module) -> dict | None:
    """The config.json "quantization" section of a quantized model (None for a full-precision one)."""
    q = getattr(model, "quantization", None)
    return None if q is None else {**q["spec"].to_dict(), "scope": q["scope"]}


def quantize_from_section(model: nn.Module, section: dict, where: str = "quantization") -> nn.Module:
    """Apply the transform a checkpoint's "quantization" section describes (on a meta-built model, shapes only)."""
    spec = QuantSpec.from_dict(section, where)
    return quantize_model(model, spec.bits, spec.group_size, spec.symmetric, section.get("scope", "experts"))


def load_time_options(name: str | None) -> dict | None:
    """quantize_model's options for Engine.load(quantize=...) / --quantize: None, "int8" or "int4" (group 32)."""
    if name is None:
        return None
    if name not in LOAD_TIME:
        raise ConfigError(f"quantize={name!r} is unknown: accepted values are {', '.join(LOAD_TIME)} (or none)")
    return dict(LOAD_TIME[name])


def set_kernel(model: nn.Module, kernel: str) -> None:
    """Use `kernel` (auto, dequant, numba) in every quantized module of the model."""
    if kernel not in QUANT_KERNELS:
        raise ConfigError(f"kernel={kernel!r} is unknown for quantized weights: accepted values are {', '.join(QUANT_KERNELS)}")
    for module in model.modules():
        if getattr(module, "quantized_weights", False):
            module.kernel = kernel


def _targets(model: nn.Module, scope: str) -> tuple[list, list]:
    """(MoE experts, Linears) to quantize, by qualified name."""
    experts = []
    for n, layer in model.named_modules():
        if isinstance(layer, MoELayer):
            if not isinstance(getattr(layer.experts, "w_in_EHD", None), torch.Tensor):
                raise ConfigError(f"the experts of {n or 'the MoE layer'} are not resident full-precision weights (offloaded "
                                  f"or sharded?): quantize the model before offloading or sharding it")
            experts.append((f"{n}.experts" if n else "experts", layer.experts))
    if scope == "experts":
        return experts, []
    containers = [(n, m) for n, m in model.named_modules() if isinstance(m, Attention) or _is_dense_mlp(m)]
    linears = [(f"{n}.{c}", child) for n, m in containers for c, child in m.named_children() if isinstance(child, nn.Linear)]
    head = getattr(model, "lm_head", None)
    embed = getattr(model, "embed_tokens", None)
    if isinstance(head, nn.Linear) and not (embed is not None and head.weight is getattr(embed, "weight", None)):
        linears.append(("lm_head", head))
    return experts, linears


def _is_dense_mlp(module: nn.Module) -> bool:
    """The MLPs moekit.modules.build_mlp makes (SwiGLU gate/up/down, or GELU up/down)."""
    return type(module).__module__ == "moekit.modules" and hasattr(module, "down_proj") and hasattr(module, "up_proj")


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)
