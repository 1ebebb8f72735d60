"""Offloading statistics: per-layer counters, their summary, and the `moekit generate --stats` report."""

from __future__ import annotations

from dataclasses import asdict, dataclass


from .budget import format_bytes


# ---------------------------------------------------------------- statistics


@dataclass
class LayerStats:
    steps: int = 0
    accesses: int = 0  # experts demanded, summed over steps
    hits: int = 0  # demanded and already in a slot (or on its way there) when the gate fired
    misses: int = 0  # demanded and fetched only after the gate fired
    prefetches: int = 0  # transfers started by the predictor
    prefetch_used: int = 0  # ... whose expert the step then used
    predicted: int = 0  # experts the predictor asked to have in the fast tier
    predicted_correct: int = 0  # ... that the step used
    demanded_predicted: int = 0  # experts demanded in steps that had a prediction
    prefetches_cancelled: int = 0  # wrong prefetches dropped before they started (not counted as transfers)
    transfers: int = 0
    bytes_moved: int = 0  # bytes of the experts' stored form in the slow tier (quantized: codes + scales; GGUF: its blocks)
    fallbacks: int = 0  # misses computed from the resident int4 copy instead of waiting (low-bit fallback)
    stall_s: float = 0.0  # time the computation waited for experts

    def add(self, other: "LayerStats") -> None:
        for name, value in asdict(other).items():
            setattr(self, name, getattr(self, name) + value)


def summarize(layers: list[LayerStats]) -> dict:
    total = LayerStats()
    for s in layers:
        total.add(s)
    out = asdict(total)
    out["miss_rate"] = total.misses / total.accesses if total.accesses else 0.0
    out["hit_rate"] = total.hits / total.accesses if total.accesses else 0.0
    out["prefetch_precision"] = total.predicted_correct / total.predicted if total.predicted else None
    out["prefetch_recall"] = total.predicted_correct / total.demanded_predicted if total.demanded_predicted else None
    out["prefetch_useful_fraction"] = total.prefetch_used / total.prefetches if total.prefetches else None
    return out



def format_stats(stats: dict, timing: dict | None = None) -> str:
    """The `moekit generate --stats` report."""
    def pct(v):
        return "n/a" if v is None else f"{100 * v:.1f}%"

    lines = [
        f"expert offloading: {stats['tier']}",
        f"  fast tier: budget {stats['budget']} = {format_bytes(stats['fast_bytes'])} of {format_bytes(stats['total_expert_bytes'])} "
        f"of experts; slots per MoE layer {stats['slots_per_layer']} (of {stats['experts_per_layer']})",
        f"  cache {stats['policy']}, prefetch {stats['predictor']}",
        f"  expert accesses {stats['accesses']}: hits {stats['hits']}, misses {stats['misses']} (miss rate {pct(stats['miss_rate'])})",
        f"  prefetch: {stats['prefetches']} transfers, {stats['prefetch_used']} used; "
        f"precision {pct(stats['prefetch_precision'])}, recall {pct(stats['prefetch_recall'])}",
        f"  moved {format_bytes(stats['bytes_moved'])} in {stats['transfers']} transfers; "
        f"stalled {1000 * stats['stall_s']:.1f} ms waiting for experts",
    ]
    if stats.get("quantization"):
        lines.append(f"  experts stored as {stats['quantization']} ({format_bytes(stats['bytes_per_expert'][0])} per expert "
                     f"in MoE layer 0) in every tier")
    if stats.get("low_bit_fallback"):
        lines.append(f"  low-bit fallback: {stats['fallbacks']} misses computed from the resident int4 copy "
                     f"({format_bytes(stats['fallback_bytes'])}) instead of waiting")
    if timing:
        lines.append(
            f"  {timing['new_tokens']} new tokens; prefill {1000 * timing['prefill_s']:.1f} ms, "
            f"decode {timing['decode_tokens_per_s']:.2f} tokens/s"
        )
    if stats["emulated"]:
        lines.append("  (the slow tier is an EMULATED link: its timings are a model, not a measurement of real hardware)")
    return "\n".join(lines)
