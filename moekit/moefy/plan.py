"""Method-independent steps of a conversion: calibration inputs, a layer's partition, its selector.

`collect_ffn_inputs` runs the dense model on calibration batches and keeps
what enters each FFN; `plan_layer` turns one FFN (and those inputs) into a
`Partition` for the chosen method; `trained_selector` fits a layer's
MoEfication selector. Model-specific assembly lives in decoder.py / encoder.py.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

from .ffn import FFNWeights, neuron_acts
from .partition import Partition, cluster_partition, domains_for_experts, readme_partition
from .routers import SelectorRouter, expert_mass, fit_selector
from .spec import MoefySpec

MAX_TOKENS_PER_GROUP = 4096


@torch.no_grad()
def collect_ffn_inputs(mlps: list, groups: list[Iterable[tuple[Callable[[], None], torch.Tensor | None]]]) -> list[list[torch.Tensor]]:
    """[group][layer] -> [T, D] FFN inputs; each group yields (run one batch, keep mask [B, T] or None)."""
    captured: list[torch.Tensor | None] = [None] * len(mlps)

    def hook(i):
        def pre(module, args):
            captured[i] = args[0].detach()
        return pre

    handles = [m.register_forward_pre_hook(hook(i)) for i, m in enumerate(mlps)]
    out = []
    try:
        for group in groups:
            per_layer: list[list[torch.Tensor]] = [[] for _ in mlps]
            for run, keep_BT in group:
                run()
                for i, x in enumerate(captured):
                    x_TD = x[keep_BT.bool()] if keep_BT is not None else x.reshape(-1, x.shape[-1])
                    per_layer[i].append(x_TD.float())
            out.append([_cap(torch.cat(xs)) for xs in per_layer])
    finally:
        for h in handles:
            h.remove()
    return out


def _cap(x_TD: torch.Tensor) -> torch.Tensor:
    if x_TD.shape[0] <= MAX_TOKENS_PER_GROUP:
        return x_TD
    g = torch.Generator().manual_seed(0)
    return x_TD[torch.randperm(x_TD.shape[0], generator=g)[:MAX_TOKENS_PER_GROUP]]


@torch.no_grad()
def plan_layer(fw: FFNWeights, spec: MoefySpec, shared: int, groups: list[torch.Tensor] | None) -> Partition | None:
    """The layer's split: None for upcycle (every expert the whole FFN). groups: [T, D] FFN inputs per calibration group."""
    if spec.method == "upcycle":
        return None
    fw32 = _float(fw)
    if spec.method == "cluster":
        acts = neuron_acts(fw32, _cap(torch.cat(groups))) if groups else None
        return cluster_partition(fw32, spec.experts, shared, acts, spec.seed)
    domains = domains_for_experts(groups or [], spec.experts)
    importance_EF = torch.stack([neuron_acts(fw32, x_TD).abs().mean(0) for x_TD in domains])
    return readme_partition(importance_EF, shared)


def trained_selector(fw: FFNWeights, part: Partition, spec: MoefySpec, x_TD: torch.Tensor, steps: int = 300) -> SelectorRouter:
    """A selector for one layer, fitted to predict its experts' activation mass on x_TD."""
    torch.manual_seed(spec.seed)
    router = SelectorRouter(x_TD.shape[1], spec.experts, spec.top_k)
    with torch.no_grad():
        mass_TE = expert_mass(neuron_acts(_float(fw), x_TD), part.experts_EW)
    fit_selector(router, x_TD, mass_TE, steps=steps, seed=spec.seed)
    return router


def _float(fw: FFNWeights) -> FFNWeights:
    conv = lambda t: None if t is None else t.float()  # noqa: E731
    return FFNWeights(fw.activation, conv(fw.w_gate_FD), conv(fw.w_up_FD), conv(fw.w_down_DF), conv(fw.b_up_F), conv(fw.b_down_D))
