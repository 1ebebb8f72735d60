"""Routing by task: a task x expert load table per MoE layer, per-task routing entropy, and its heatmap.

Reads `Routing` records and the per-token task ids that went with them, so it
serves any model routed with group ids (tasks here; modalities work the same).
Specialisation is the entropy of a task's expert-load distribution: log2(E) bits
when the task spreads evenly over all E experts, 0 when it uses one expert.

Not here: the overall expert-load statistics (stats.py), the task data or models.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from .routing import Routing
from .stats import save_figure


class TaskLoadTracker:
    """Accumulates assignments per (task, expert) for each MoE layer."""

    def __init__(self, tasks: list[str]) -> None:
        self.tasks = list(tasks)
        self.counts: dict[int, torch.Tensor] = {}  # layer -> [G, E]

    def add(self, routings: list[Routing | None], task_T: torch.Tensor) -> None:
        task_T = task_T.reshape(-1).cpu().long()
        G = len(self.tasks)
        for layer, r in enumerate(routings):
            if r is None:
                continue
            E = r.num_experts
            task_N = task_T[r.token_idx_N.cpu()]
            flat = torch.bincount(task_N * E + r.expert_idx_N.cpu(), minlength=G * E).view(G, E)
            self.counts[layer] = self.counts.get(layer, torch.zeros_like(flat)) + flat

    def entropy_bits(self) -> dict[int, list[float]]:
        """Per layer, per task: the entropy (bits) of the task's share of assignments over the experts."""
        out = {}
        for layer, c_GE in sorted(self.counts.items()):
            p_GE = c_GE.double() / c_GE.sum(-1, keepdim=True).clamp_min(1)
            out[layer] = [float(-(p[p > 0] * p[p > 0].log2()).sum()) for p in p_GE]
        return out

    def summary(self) -> str:
        if not self.counts:
            return "no MoE layers"
        E = next(iter(self.counts.values())).shape[1]
        width = max(len(t) for t in self.tasks)
        head = "  ".join(f"L{layer:<5}" for layer in sorted(self.counts))
        lines = [f"routing entropy by task (bits; {math.log2(E):.2f} = spread over all {E} experts, 0 = one expert)",
                 f"{'task':<{width}}  {head}"]
        ent = self.entropy_bits()
        for g, task in enumerate(self.tasks):
            lines.append(f"{task:<{width}}  " + "  ".join(f"{ent[layer][g]:<6.2f}" for layer in sorted(ent)))
        return "\n".join(lines)

    def plot(self, path: str | Path, title: str = "routing by task") -> Path:
        return plot_task_expert(self.counts, self.tasks, path, title)


def plot_task_expert(counts: dict[int, torch.Tensor], tasks: list[str], path: str | Path, title: str) -> Path:
    """One panel per MoE layer: rows tasks, columns experts, colour = the task's share of its assignments."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = sorted(counts)
    fig, axes = plt.subplots(1, len(layers), figsize=(1.5 + 3.2 * len(layers), 1.6 + 0.45 * len(tasks)), squeeze=False,
                             constrained_layout=True)
    image = None
    for ax, layer in zip(axes[0], layers):
        c = counts[layer].double()
        share = (c / c.sum(-1, keepdim=True).clamp_min(1)).numpy()
        image = ax.imshow(share, aspect="auto", cmap="magma", vmin=0, vmax=1)
        ax.set_title(f"layer {layer}")
        ax.set_xlabel("expert")
        ax.set_yticks(range(len(tasks)), tasks if ax is axes[0][0] else [""] * len(tasks))
    fig.suptitle(title)
    fig.colorbar(image, ax=list(axes[0]), label="share of the task's assignments")
    return save_figure(fig, path)
