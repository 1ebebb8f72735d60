"""Upcycling modality experts (MoMa): one FFN per modality into several experts per modality.

`upcycle_modality_experts(model, [4, 4])` takes a DecoderLM whose MoE layers
hold one expert per group (e.g. 1 text + 1 image FFN, trained with the group
router or grouped expert choice) and returns a new DecoderLM whose groups hold
4 + 4 experts: each new expert starts as a copy of its group's FFN, its router
row as a copy of the group's row plus small noise (identical rows would tie
every expert-choice selection). Everything else is copied as it is.

Not here: dense -> MoE conversion (decoder.py), training (moekit.train).
"""

from __future__ import annotations

from dataclasses import replace

import torch

from ..errors import ConfigError
from ..models.build import build_model
from ..models.decoder import DecoderLM


def upcycle_modality_experts(model: DecoderLM, sizes: list[int], noise: float = 0.01, seed: int = 0,
                             **moe_overrides) -> DecoderLM:
    """A copy of `model` with `sizes[g]` experts in group g, each a copy of group g's one expert.

    moe_overrides change the new MoE config too (e.g. router="expert_choice", aux_router_hidden=64).
    """
    src = model.cfg.moe
    if model.cfg.ffn == "dense" or src.num_experts != src.num_groups:
        raise ConfigError(f"upcycling modality experts needs one expert per group (moe.num_experts == moe.num_groups); "
                          f"this model has {src.num_experts} experts in {src.num_groups} groups")
    if len(sizes) != src.num_groups or any(int(n) < 1 for n in sizes):
        raise ConfigError(f"sizes={list(sizes)} is invalid: give one expert count >= 1 per group ({src.num_groups})")
    moe = replace(src, num_experts=sum(sizes), group_sizes=[int(n) for n in sizes], **moe_overrides)
    new = build_model(replace(model.cfg, moe=moe))
    source_E = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))  # new expert -> its group's expert
    gen = torch.Generator().manual_seed(seed)
    state = model.state_dict()
    target = new.state_dict()
    with torch.no_grad():
        for name, value in target.items():
            old = state.get(name)
            if old is None:
                continue  # e.g. auxiliary routers the source did not have: they keep their initialisation
            if _is_per_expert(name, old, src.num_experts) and value.shape[0] == len(source_E):
                copied = old[source_E].clone()
                if name.endswith("router.gate.weight"):
                    copied += noise * old.std().clamp_min(1e-3) * torch.randn(copied.shape, generator=gen)
                value.copy_(copied)
            elif old.shape == value.shape:
                value.copy_(old)
    return new


def _is_per_expert(name: str, tensor: torch.Tensor, num_experts: int) -> bool:
    """Expert weights, router rows and auxiliary routers: stacked over the experts in their first dimension."""
    return (".mlp.experts." in name or ".mlp.router." in name or ".mlp.moe." in name) and tensor.dim() >= 1 \
        and tensor.shape[0] == num_experts
