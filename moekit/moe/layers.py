"""MoE layers: the router -> dispatch -> experts -> combine path, and its variants.

`MoELayer` is the one MoE used by every moekit model (language models,
Time-MoE, models loaded from Hugging Face). Variants wrap or extend it:

- shared experts: a dense MLP every token passes through, optionally scaled
  by a sigmoid gate (Qwen2-MoE, Time-MoE);
- `ResidualMoE` (DeepSpeed-MoE): a dense MLP plus a routed expert, mixed by a
  learned per-token coefficient;
- `pyramid_schedule` (PR-MoE): expert counts per layer, more in later layers;
- `MixtureOfDepths`: only the top-capacity tokens of a sequence pass through
  a block, the others skip it; a causal predictor replaces the (non-causal)
  top-k choice at inference. `DepthRouter` is the same choice for the
  decoder's Mixture-of-Depths blocks (models/blocks.py `MoDBlock`,
  `ModelConfig.mod_layers`).

Every forward returns `(output, routing)`: losses travel with the routing
record, nothing is stored on the module.

Shape legend: B batch, T tokens (or time steps), D hidden, C selected tokens.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import MoEConfig
from .dispatch import LocalDispatcher
from .experts import Experts
from ..modules import build_mlp
from .routing import Routing, build_router
from .task_routing import TaskRouter


class MoELayer(nn.Module):
    """Routed experts (+ optional shared experts) behind one router."""

    def __init__(self, cfg: MoEConfig):
        super().__init__()
        self.cfg = cfg
        self.router = TaskRouter(cfg) if cfg.router == "task" else build_router(cfg)  # task_routing.py builds on routing.py
        self.dispatcher = LocalDispatcher()
        self.experts = Experts(cfg.num_experts, cfg.hidden_size, cfg.expert_hidden, cfg.activation, cfg.kernel,
                               bias=cfg.expert_biases, swiglu_alpha=cfg.swiglu_alpha, swiglu_limit=cfg.swiglu_limit)
        self.generator: torch.Generator | None = None  # Random Token Selection; None = the global RNG
        if cfg.num_shared_experts > 0:
            width = (cfg.shared_expert_hidden or cfg.expert_hidden) * cfg.num_shared_experts
            self.shared = build_mlp(cfg.activation, cfg.hidden_size, width)
            self.shared_gate = nn.Linear(cfg.hidden_size, 1, bias=False) if cfg.shared_expert_gate else None

    def forward(self, x: torch.Tensor, group_ids: torch.Tensor | None = None,
                causal: bool | None = None) -> tuple[torch.Tensor, Routing]:
        """group_ids: one per token or None; causal: the router's causal mode (None: its default)."""
        cfg = self.cfg
        if x.shape[-1] != cfg.hidden_size:
            raise ValueError(f"input has hidden size {x.shape[-1]} but the MoE layer has hidden_size={cfg.hidden_size}")
        x_TD = x.reshape(-1, cfg.hidden_size)
        batch_size = x.shape[0] if x.dim() == 3 else 1
        routing = self.router(x_TD, batch_size=batch_size, group_ids_T=group_ids, causal=causal)
        if cfg.router != "expert_choice":
            factor = cfg.capacity_factor if self.training else cfg.eval_capacity_factor
            routing = self.dispatcher.limit(routing, cfg.top_k, factor, cfg.min_capacity, cfg.drop_policy, self.generator)
        y_TD = self.dispatcher.run(x_TD, routing, self.experts)
        if cfg.num_shared_experts > 0:
            y_TD = y_TD + self.shared_output(x_TD)
        return y_TD.view(x.shape), routing

    def shared_output(self, x_TD: torch.Tensor) -> torch.Tensor:
        out = self.shared(x_TD)
        if self.shared_gate is not None:
            out = torch.sigmoid(self.shared_gate(x_TD)) * out
        return out


class ResidualMoE(nn.Module):
    """Residual-MoE (DeepSpeed-MoE): a dense MLP and an MoE, mixed per token.

    out = a * moe(x) + (1 - a) * mlp(x), with (a, 1 - a) a softmax over a
    learned linear map of x. The MoE is usually top-1: the dense MLP carries
    the shared work, the expert a correction.
    """

    def __init__(self, cfg: MoEConfig, mlp_hidden: int):
        super().__init__()
        self.moe = MoELayer(cfg)
        self.mlp = build_mlp(cfg.activation, cfg.hidden_size, mlp_hidden)
        self.coefficient = nn.Linear(cfg.hidden_size, 2)

    def forward(self, x: torch.Tensor, group_ids: torch.Tensor | None = None,
                causal: bool | None = None) -> tuple[torch.Tensor, Routing]:
        moe_out, routing = self.moe(x, group_ids, causal)
        mix = self.coefficient(x).softmax(-1)
        return moe_out * mix[..., :1] + self.mlp(x) * mix[..., 1:], routing


def pyramid_schedule(num_layers: int, experts: Sequence[int], layers_per_stage: Sequence[int] | None = None) -> list[int]:
    """PR-MoE expert counts per layer: stages of (usually growing) expert counts.

    `pyramid_schedule(12, [32, 64], [10, 2])` gives DeepSpeed-MoE's PR-MoE:
    32 experts in the first 10 layers, 64 in the last 2. Without
    `layers_per_stage` the layers are split as evenly as possible, the later
    stages taking any remainder.
    """
    if num_layers < 1 or not experts or any(int(e) < 1 for e in experts):
        raise ValueError(f"pyramid_schedule needs num_layers >= 1 and expert counts >= 1, got {num_layers}, {list(experts)}")
    if layers_per_stage is None:
        base, extra = divmod(num_layers, len(experts))
        layers_per_stage = [base + (i >= len(experts) - extra) for i in range(len(experts))]
    if len(layers_per_stage) != len(experts) or sum(layers_per_stage) != num_layers:
        raise ValueError(f"layers_per_stage={list(layers_per_stage)} must have one entry per stage and sum to num_layers={num_layers}")
    return [int(e) for e, n in zip(experts, layers_per_stage) for _ in range(n)]


class MixtureOfDepths(nn.Module):
    """Mixture-of-Depths: a block computes only for the top-capacity tokens.

    `block(x_BCD, positions_BC)` must return the new hidden states of the
    tokens it is given (residual included), attending causally among them by
    their original positions. Chosen tokens become x + w * (block(x) - x) with
    w = sigmoid(router score), so the router learns through w; the rest pass
    through unchanged. Top-k over a sequence looks at future tokens, so a
    small predictor (trained on detached inputs to tell whether a token would
    be chosen) makes the choice at inference, token by token.
    """

    def __init__(self, block: nn.Module, hidden_size: int, capacity: float = 0.125, predictor_hidden: int = 64):
        super().__init__()
        if not 0 < capacity <= 1 or math.isnan(capacity):
            raise ValueError(f"capacity={capacity} is invalid: it must be in (0, 1]")
        self.block = block
        self.capacity = capacity
        self.router = nn.Linear(hidden_size, 1, bias=False)
        self.predictor = nn.Sequential(nn.Linear(hidden_size, predictor_hidden), nn.SiLU(), nn.Linear(predictor_hidden, 1))

    def forward(self, x_BTD: torch.Tensor, causal: bool | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """causal=None: top-k while training, the predictor in eval mode."""
        causal = (not self.training) if causal is None else causal
        score_BT = self.router(x_BTD).squeeze(-1)
        predicted_BT = self.predictor(x_BTD.detach()).squeeze(-1)
        topk_BT = self._topk_mask(score_BT)
        chosen_BT = predicted_BT > 0 if causal else topk_BT
        aux = {"mod_predictor": F.binary_cross_entropy_with_logits(predicted_BT, topk_BT.float())}
        out = x_BTD.clone()
        for b in range(x_BTD.shape[0]):  # sequences may choose different numbers of tokens
            idx_C = chosen_BT[b].nonzero().squeeze(-1)
            if idx_C.numel() == 0:
                continue
            x_CD = x_BTD[b, idx_C]
            new_CD = self.block(x_CD[None], idx_C[None])[0]
            w_C1 = torch.sigmoid(score_BT[b, idx_C])[:, None]
            out[b, idx_C] = x_CD + w_C1 * (new_CD - x_CD)
        return out, aux

    def _topk_mask(self, score_BT: torch.Tensor) -> torch.Tensor:
        T = score_BT.shape[1]
        C = max(1, math.ceil(self.capacity * T))
        mask = torch.zeros_like(score_BT, dtype=torch.bool)
        return mask.scatter(1, score_BT.topk(C, dim=-1).indices, True)


class DepthRouter(nn.Module):
    """Mixture-of-Depths' choice for a decoder block (models/blocks.py's MoDBlock runs the block on the chosen tokens).

    Non-causal (training): each sequence's top ceil(capacity * T) tokens by a linear score. Causal
    (default: not training): a small predictor on the detached input, trained with BCE to tell
    whether a token would be in that top-k, decides token by token. Chosen tokens are weighted by
    sigmoid(score), so the score learns through the block's output.
    """

    def __init__(self, hidden_size: int, capacity: float = 0.25, predictor_hidden: int = 64):
        super().__init__()
        if not 0 < capacity <= 1 or math.isnan(capacity):
            raise ValueError(f"capacity={capacity} is invalid: it must be in (0, 1]")
        self.capacity = capacity
        self.router = nn.Linear(hidden_size, 1, bias=False)
        self.predictor = nn.Sequential(nn.Linear(hidden_size, predictor_hidden), nn.SiLU(), nn.Linear(predictor_hidden, 1))

    def forward(self, x_BTD: torch.Tensor, causal: bool | None = None):
        """(chosen_BT bool, weight_BT, aux): aux has "mod_predictor" (BCE, when losses are wanted) and its accuracy."""
        causal = (not self.training) if causal is None else causal
        score_BT = self.router(x_BTD).squeeze(-1)
        predicted_BT = self.predictor(x_BTD.detach()).squeeze(-1)
        aux = {}
        if not causal or x_BTD.shape[1] > 1:  # one decoded token has no top-k to learn from
            topk_BT = self._topk_mask(score_BT)
            aux["mod_predictor_accuracy"] = ((predicted_BT > 0) == topk_BT).float().mean().detach()
            if self.training or torch.is_grad_enabled():
                aux["mod_predictor"] = F.binary_cross_entropy_with_logits(predicted_BT.float(), topk_BT.float())
        chosen_BT = predicted_BT > 0 if causal else topk_BT
        return chosen_BT, torch.sigmoid(score_BT), aux

    def _topk_mask(self, score_BT: torch.Tensor) -> torch.Tensor:
        C = max(1, math.ceil(self.capacity * score_BT.shape[1]))
        return torch.zeros_like(score_BT, dtype=torch.bool).scatter(1, score_BT.topk(C, dim=-1).indices, True)
