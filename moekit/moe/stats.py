"""Routing statistics and plots: expert load per layer, dead and overloaded experts.

Reads only `Routing` records (or the per-layer token counts taken from them),
so it serves every model: trained LMs, loaded HF checkpoints, Time-MoE.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .routing import Routing

OVERLOADED = 2.0  # an expert taking more than this multiple of the mean load


class LoadTracker:
    """Accumulates tokens per expert for each MoE layer over many batches."""

    def __init__(self) -> None:
        self.counts: dict[int, torch.Tensor] = {}

    def add(self, routings: list[Routing | None]) -> None:
        for layer, r in enumerate(routings):
            if r is not None:
                c = r.counts_E.detach().cpu().long()
                self.counts[layer] = self.counts.get(layer, torch.zeros_like(c)) + c

    def max_over_mean(self) -> float:
        """Mean over layers of (busiest expert's load / mean load)."""
        ratios = [float(c.max() / c.float().mean().clamp_min(1e-9)) for c in self.counts.values()]
        return sum(ratios) / len(ratios) if ratios else 1.0

    def summary_rows(self) -> list[dict]:
        rows = []
        for layer, c in sorted(self.counts.items()):
            mean = c.float().mean().clamp_min(1e-9)
            rows.append({
                "layer": layer,
                "experts": c.numel(),
                "tokens": int(c.sum()),
                "max_over_mean": float(c.max() / mean),
                "min_over_mean": float(c.min() / mean),
                "dead": [int(e) for e in (c == 0).nonzero().flatten()],
                "overloaded": [int(e) for e in (c > OVERLOADED * mean).nonzero().flatten()],
            })
        return rows

    def summary(self) -> str:
        if not self.counts:
            return "no MoE layers"
        lines = ["layer  experts  max/mean  min/mean  dead  overloaded(>2x mean)"]
        for r in self.summary_rows():
            lines.append(
                f"{r['layer']:>5}  {r['experts']:>7}  {r['max_over_mean']:>8.2f}  {r['min_over_mean']:>8.2f}  "
                f"{_ids(r['dead']):>4}  {_ids(r['overloaded'])}"
            )
        return "\n".join(lines)

    def plot(self, path: str | Path, title: str = "expert load") -> Path:
        return plot_expert_load({k: v.tolist() for k, v in self.counts.items()}, path, title)


def _ids(ids: list[int]) -> str:
    return ",".join(map(str, ids)) if ids else "-"


def plot_expert_load(counts: dict[int, list[int]], path: str | Path, title: str = "expert load") -> Path:
    """Heatmap: one row per MoE layer, one column per expert, colour = load / mean load."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    layers = sorted(counts)
    width = max(len(counts[l]) for l in layers)
    grid = np.full((len(layers), width), np.nan)
    for row, layer in enumerate(layers):
        c = np.asarray(counts[layer], dtype=float)
        grid[row, : len(c)] = c / max(c.mean(), 1e-9)
    fig, ax = plt.subplots(figsize=(min(2 + 0.35 * width, 16), 1.2 + 0.45 * len(layers)))
    image = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=0, vmax=max(2.0, np.nanmax(grid)))
    ax.set_xlabel("expert")
    ax.set_ylabel("layer")
    ax.set_yticks(range(len(layers)), [str(l) for l in layers])
    ax.set_title(title)
    fig.colorbar(image, ax=ax, label="tokens / mean tokens per expert")
    fig.tight_layout()
    return save_figure(fig, path)


def save_figure(fig, path: str | Path) -> Path:
    """Write a matplotlib figure as a PNG atomically (a temporary file renamed into place) and close it."""
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)
    return path
