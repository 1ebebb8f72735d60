"""`offload_model`: the transform that offloads the experts of every MoE layer of a built model.

Everything is checked (budget, policy, predictor, tier, that the checkpoint's
experts are the model's) before the model is changed.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from ...moe.layers import MoELayer
from ..expert_cache import POLICIES, RoutingTrace
from ..prefetch import PREDICTORS, Predictor, build_predictor
from .budget import Budget, LayerShape, OffloadError
from .disk import DiskTier
from .offloader import Offloader
from .tiers import CudaHostTier, EmulatedLinkTier, MemoryTier, SlowTier

TIERS = ("disk", "emulated", "memory", "cuda-host")


# ---------------------------------------------------------------- the transform


def find_moe_layers(model: nn.Module) -> list[tuple[str, MoELayer]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, MoELayer)]


def layer_shapes(moe_layers: list[tuple[str, MoELayer]]) -> list[LayerShape]:
    shapes = []
    for _, m in moe_layers:
        w_in, w_out = m.experts.w_in_EHD, m.experts.w_out_EDF
        E, H, D = w_in.shape
        k = 1 if m.cfg.router == "expert_choice" else m.cfg.top_k
        shapes.append(LayerShape(E, H, D, w_out.shape[2], w_in.dtype, k))
    return shapes


def offload_model(
    model: nn.Module,
    budget: str | float | Budget,
    *,
    tier: str | SlowTier = "disk",
    checkpoint: str | Path | None = None,
    policy: str = "lru",
    predictor: str | Predictor = "none",
    pregate: str | Path | None = None,
    trace: RoutingTrace | None = None,
    link_bandwidth: str | float | None = None,
    link_latency: str | float = 0.0,
    lfru_half_life: float = 8.0,
    verify: bool = True,
) -> Offloader:
    """Offload the experts of every MoE layer of `model`; returns the `Offloader` (stats, configure, close).

    tier: "disk" (reads `checkpoint`'s safetensors), "emulated" (host memory
    behind a link of `link_bandwidth` and `link_latency`), "memory",
    "cuda-host" (pinned host -> CUDA), or a SlowTier. The model's own expert
    weights are dropped from it (they live in the slow tier from now on).
    Everything is checked before the model is changed.
    """
    moe_layers = find_moe_layers(model)
    if not moe_layers:
        raise OffloadError("the model has no MoE layers, so there are no experts to offload")
    if policy not in POLICIES:
        raise OffloadError(f"unknown cache policy {policy!r}: accepted policies are {', '.join(POLICIES)}")
    if isinstance(predictor, str) and predictor not in PREDICTORS:
        raise OffloadError(f"unknown predictor {predictor!r}: accepted predictors are {', '.join(PREDICTORS)}")
    if getattr(model, "_moekit_offloader", None) is not None:
        raise OffloadError("the model's experts are already offloaded: close its Offloader first, or load the model again")
    if policy == "belady" and trace is None:
        raise OffloadError("the belady cache policy needs a routing trace of the same generation (record one first)")
    shapes = layer_shapes(moe_layers)
    Budget.parse(budget).slots(shapes)  # a budget that is too small fails before anything is changed
    pred = predictor if isinstance(predictor, Predictor) else build_predictor(predictor, pregate, model, trace=trace)
    lazy = moe_layers[0][1].experts.w_in_EHD.is_meta  # loaded without its experts (Engine.load with expert_budget)
    device = next(p.device for p in model.parameters() if not p.is_meta)
    if lazy and tier != "disk":
        raise OffloadError(f"the model was loaded without its experts, so they can only come from its checkpoint: "
                           f"use tier 'disk', not {tier!r}")
    slow = _build_tier(tier, moe_layers, shapes, checkpoint, link_bandwidth, link_latency, device)
    if verify and isinstance(slow, DiskTier) and not lazy:  # lazily loaded: the tier is the file the model came from
        _verify_tier(slow, moe_layers, shapes)
    offloader = Offloader(model, moe_layers, slow, shapes, device)
    return offloader.configure(budget, policy, pred, trace=trace, lfru_half_life=lfru_half_life)


def _build_tier(tier, moe_layers, shapes, checkpoint, link_bandwidth, link_latency, device) -> SlowTier:
    if isinstance(tier, SlowTier):
        return tier
    if tier not in TIERS:
        raise OffloadError(f"unknown slow tier {tier!r}: accepted tiers are {', '.join(TIERS)}")
    weights = [(m.experts.w_in_EHD.detach(), m.experts.w_out_EDF.detach()) for _, m in moe_layers]
    if device.type == "cuda":
        if tier != "cuda-host":
            raise OffloadError(f"on CUDA the slow tier is pinned host memory (tier 'cuda-host'), not {tier!r}")
        return CudaHostTier(weights)
    if tier == "cuda-host":
        raise OffloadError("tier 'cuda-host' needs a model on a CUDA device; on CPU use 'disk' or 'emulated'")
    if tier == "disk":
        if checkpoint is None:
            raise OffloadError("the disk tier needs the checkpoint the model was loaded from")
        return DiskTier(checkpoint, [p for p, _ in moe_layers], shapes)
    if tier == "memory":
        return MemoryTier(weights)
    if link_bandwidth is None:
        raise OffloadError("the emulated tier needs a link bandwidth (e.g. 2GB/s)")
    return EmulatedLinkTier(MemoryTier(weights), link_bandwidth, link_latency)


def _verify_tier(tier: DiskTier, moe_layers, shapes) -> None:
    """The checkpoint's first expert of each layer must equal the model's: a wrong file must not give wrong tokens."""
    for j, ((path, m), shape) in enumerate(zip(moe_layers, shapes)):
        w_in = torch.empty(shape.H, shape.D, dtype=shape.dtype)
        w_out = torch.empty(shape.D, shape.F, dtype=shape.dtype)
        tier.read(j, 0, w_in, w_out)
        if not (torch.equal(w_in, m.experts.w_in_EHD[0].detach().cpu()) and torch.equal(w_out, m.experts.w_out_EDF[0].detach().cpu())):
            tier.close()
            raise OffloadError(
                f"the expert weights of {path} in {tier.files[0]} differ from the model's: offload from the checkpoint "
                f"the model was loaded from"
            )
