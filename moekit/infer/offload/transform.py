"""`offload_model`: the transform that offloads the experts of every MoE layer of a built model.

Everything is checked (budget, policy, predictor, tier, that the checkpoint's
experts are the model's) before the model is changed.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from ...meta import empty_on
from ...moe.layers import MoELayer
from ..expert_cache import POLICIES, RoutingTrace
from ..prefetch import PREDICTORS, Predictor, build_predictor
from .budget import Budget, LayerShape, OffloadError
from .disk import DiskTier, has_tensor
from .experts import check_offloadable
from .fallback import build_fallback, check_fallback_widths
from .gguf_tier import GGUFTier
from .offloader import Offloader
from .requant import ConvertingTier, spill, staging
from .tiers import CudaHostTier, EmulatedLinkTier, MemoryTier, SlowTier

TIERS = ("disk", "emulated", "memory", "cuda-host")


# ---------------------------------------------------------------- the transform


def find_moe_layers(model: nn.Module) -> list[tuple[str, MoELayer]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, MoELayer)]


def layer_shapes(moe_layers: list[tuple[str, MoELayer]]) -> list[LayerShape]:
    shapes = []
    for _, m in moe_layers:
        experts = m.experts
        k = 1 if m.cfg.router == "expert_choice" else m.cfg.top_k
        spec = getattr(experts, "spec", None)  # QuantizedExperts carry their QuantSpec; full-precision Experts none
        qtypes = getattr(experts, "qtypes", None)  # GGUFExperts their block types
        if qtypes is not None:
            E, H, D, F = experts.shape_EHDF
            shapes.append(LayerShape(E, H, D, F, torch.float32, k, gguf=tuple(qtypes)))
        elif spec is not None:
            E, H, D, F = experts.shape_EHDF
            shapes.append(LayerShape(E, H, D, F, torch.float32, k, spec))
        else:
            E, H, D = experts.w_in_EHD.shape
            shapes.append(LayerShape(E, H, D, experts.w_out_EDF.shape[2], experts.w_in_EHD.dtype, k))
    return shapes


def expert_stacks(moe_layers, shapes: list[LayerShape]) -> list[tuple[torch.Tensor, ...]]:
    """Each layer's resident stacked expert tensors, in LayerShape.parts() order."""
    return [tuple(getattr(m.experts, name).detach() for name, _, _ in shape.parts()) for (_, m), shape in zip(moe_layers, shapes)]


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
    low_bit_fallback: bool = False,
    spill_dir: str | Path | None = None,
) -> Offloader:
    """Offload the experts of every MoE layer of `model`; returns the `Offloader` (stats, configure, close).

    tier: "disk" (reads `checkpoint`'s safetensors, or a GGUF file's memory map), "emulated" (host
    memory behind a link of `link_bandwidth` and `link_latency`), "memory", "cuda-host" (pinned host
    -> CUDA), or a SlowTier. The model's own expert weights are dropped from it (they live in the slow
    tier from now on). Quantized experts (moekit.quantize) are offloaded quantized: every tier holds the
    codes and scales, the slots compute with the quantized kernels. When the checkpoint holds them in
    full precision (quantized at load), the disk tier is a spill file of the quantized experts in
    `spill_dir` (default: the temporary directory), written one expert at a time.
    low_bit_fallback (HOBBIT): keep a resident int4 (group 32) copy of every expert and compute a miss
    from it instead of waiting; the full copy comes in the background. Everything is checked before the
    model is changed.
    """
    moe_layers = find_moe_layers(model)
    _check_options(model, moe_layers, policy, predictor, trace)
    shapes = layer_shapes(moe_layers)
    Budget.parse(budget).slots(shapes)  # a budget that is too small fails before anything is changed
    if low_bit_fallback:
        check_fallback_widths(shapes)
    pred = predictor if isinstance(predictor, Predictor) else build_predictor(predictor, pregate, model, trace=trace)
    first = getattr(moe_layers[0][1].experts, shapes[0].parts()[0][0])
    lazy = first.is_meta  # loaded without its experts (Engine.load with expert_budget)
    real = next(p for p in model.parameters() if not p.is_meta)
    device = real.device
    if lazy and tier != "disk":
        raise OffloadError(f"the model was loaded without its experts, so they can only come from its checkpoint: "
                           f"use tier 'disk', not {tier!r}")
    slow, from_checkpoint = _build_tier(tier, moe_layers, shapes, checkpoint, link_bandwidth, link_latency, device,
                                        lazy, spill_dir, real.dtype)
    if verify and from_checkpoint and not lazy:  # lazily loaded: the tier is the file the model came from
        _verify_tier(slow, moe_layers, shapes)
    fallback = build_fallback(slow, moe_layers, shapes, device) if low_bit_fallback else None
    offloader = Offloader(model, moe_layers, slow, shapes, device, fallback=fallback)
    return offloader.configure(budget, policy, pred, trace=trace, lfru_half_life=lfru_half_life)


def _check_options(model, moe_layers, policy, predictor, trace) -> None:
    if not moe_layers:
        raise OffloadError("the model has no MoE layers, so there are no experts to offload")
    for name, m in moe_layers:
        check_offloadable(m.experts, f"MoE layer {name!r}")
    if policy not in POLICIES:
        raise OffloadError(f"unknown cache policy {policy!r}: accepted policies are {', '.join(POLICIES)}")
    if isinstance(predictor, str) and predictor not in PREDICTORS:
        raise OffloadError(f"unknown predictor {predictor!r}: accepted predictors are {', '.join(PREDICTORS)}")
    if getattr(model, "_moekit_offloader", None) is not None:
        raise OffloadError("the model's experts are already offloaded: close its Offloader first, or load the model again")
    if policy == "belady" and trace is None:
        raise OffloadError("the belady cache policy needs a routing trace of the same generation (record one first)")


def _build_tier(tier, moe_layers, shapes, checkpoint, link_bandwidth, link_latency, device, lazy, spill_dir, dtype):
    """(the slow tier, whether it reads the user's checkpoint as it is); dtype: the model's (full-precision experts
    quantized at load are read in it, as the resident model had them before quantizing)."""
    if isinstance(tier, SlowTier):
        return tier, isinstance(tier, DiskTier)
    if tier not in TIERS:
        raise OffloadError(f"unknown slow tier {tier!r}: accepted tiers are {', '.join(TIERS)}")
    paths = [p for p, _ in moe_layers]
    if lazy:  # tier == "disk" (checked): the experts come from the checkpoint, in the model's form
        return _checkpoint_tier(checkpoint, paths, shapes, spill_dir, dtype)
    weights = expert_stacks(moe_layers, shapes)
    if device.type == "cuda":
        if tier != "cuda-host":
            raise OffloadError(f"on CUDA the slow tier is pinned host memory (tier 'cuda-host'), not {tier!r}")
        return CudaHostTier(weights), False
    if tier == "cuda-host":
        raise OffloadError("tier 'cuda-host' needs a model on a CUDA device; on CPU use 'disk' or 'emulated'")
    if tier == "disk":
        if checkpoint is None:
            raise OffloadError("the disk tier needs the checkpoint the model was loaded from")
        if _holds_model_form(checkpoint, paths, shapes):
            return (GGUFTier if is_gguf(checkpoint) else DiskTier)(checkpoint, paths, shapes), True
        return spill(MemoryTier(weights), paths, shapes, spill_dir), False  # quantized in memory, fp32 on disk
    if tier == "memory":
        return MemoryTier(weights), False
    if link_bandwidth is None:
        raise OffloadError("the emulated tier needs a link bandwidth (e.g. 2GB/s)")
    return EmulatedLinkTier(MemoryTier(weights), link_bandwidth, link_latency), False


def is_gguf(path) -> bool:
    from ...gguf.reader import is_gguf as check  # (moekit.gguf only when a path is given)

    return check(path)


def _holds_model_form(checkpoint, paths, shapes) -> bool:
    """Whether the checkpoint stores the experts as the model holds them (a GGUF: its blocks, or full precision)."""
    if checkpoint is None:
        raise OffloadError("the disk tier needs the checkpoint the model was loaded from")
    if shapes[0].gguf is not None:
        return is_gguf(checkpoint)
    if shapes[0].spec is None:
        return True
    return not is_gguf(checkpoint) and has_tensor(checkpoint, f"{paths[0]}.experts.{shapes[0].parts()[0][0]}")


def _checkpoint_tier(checkpoint, paths, shapes, spill_dir, dtype=torch.float32):
    """The experts of a lazily loaded model, from its checkpoint: read as stored, or quantized into a spill file."""
    source, as_stored = _source_tier(checkpoint, paths, shapes, dtype)
    if as_stored:
        return source, True
    try:
        return spill(source, paths, shapes, spill_dir), False
    finally:
        source.close()


def _source_tier(checkpoint, paths, shapes, dtype):
    """(a tier giving the checkpoint's experts in `shapes`' form, whether it reads them as stored).

    Not as stored: full-precision experts (safetensors in their own dtype, read as `dtype`, or a GGUF's
    dequantized blocks) quantized on every read."""
    if _holds_model_form(checkpoint, paths, shapes):
        return (GGUFTier if is_gguf(checkpoint) else DiskTier)(checkpoint, paths, shapes), True
    full = [s.full_precision(dtype) for s in shapes]
    source = GGUFTier(checkpoint, paths, full) if is_gguf(checkpoint) else DiskTier(checkpoint, paths, full, drop_cache=False)
    return ConvertingTier(source, full, shapes), False


def load_experts(model: nn.Module, checkpoint: str | Path) -> None:
    """Fill a model's unread (meta) experts from its checkpoint one expert at a time, in the model's form.

    How a GGUF file is requantized at load (Engine.load(x.gguf, quantize="int8")) without a full-precision
    copy of its experts: each expert is dequantized by gguf and quantized by moekit as it is read.
    """
    moe_layers = find_moe_layers(model)
    shapes = layer_shapes(moe_layers)
    real = next(p for p in model.parameters() if not p.is_meta)
    source, _ = _source_tier(checkpoint, [p for p, _ in moe_layers], shapes, real.dtype)
    try:
        for j, ((_, m), shape) in enumerate(zip(moe_layers, shapes)):
            experts = empty_on(m.experts, real.device)
            m.experts = experts
            parts = [getattr(experts, name).data for name, _, _ in shape.parts()]
            with torch.no_grad():
                for e in range(shape.num_experts):
                    source.read(j, e, *(t[e] for t in parts))
    finally:
        source.close()


def _verify_tier(tier: SlowTier, moe_layers, shapes) -> None:
    """The checkpoint's first expert of each layer must equal the model's: a wrong file must not give wrong tokens."""
    for j, ((path, m), shape) in enumerate(zip(moe_layers, shapes)):
        parts = staging(shape)
        tier.read(j, 0, *parts)
        if not all(torch.equal(t, getattr(m.experts, name)[0].detach().cpu()) for t, (name, _, _) in zip(parts, shape.parts())):
            tier.close()
            where = getattr(tier, "files", [getattr(tier, "path", "the checkpoint")])[0]
            raise OffloadError(
                f"the expert weights of {path} in {where} differ from the model's: offload from the checkpoint "
                f"the model was loaded from"
            )
