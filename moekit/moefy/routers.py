"""Routers for converted models: the MoEfication selector and the fixed (decoupled) router.

Both answer an MoE layer's router call `router(x_TD, batch_size, group_ids_T)`
with a `moekit.moe.routing.Routing`, so `MoELayer` runs them unchanged. Their
chosen experts are combined with weight 1: experts are slices of one dense
FFN, and the sum of all slices is the FFN itself.

- `SelectorRouter`: a small MLP predicting each expert's activation mass
  (sum of |activation| over its neurons); top-k of the prediction. Trained by
  `fit_selector` (plain regression, a few hundred steps).
- `FixedRouter`: the experts come with the tokens (`group_ids_T`, K per token)
  from a router outside the layer (router.py's decoupled router).

`install_routers` is the transform that puts them into a built model. Not
here: upcycling's router (moekit's own TopKRouter), the decoupled router.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ..moe.routing import Routing


def routing_from(idx_TK: torch.Tensor, logits_TE: torch.Tensor, dtype: torch.dtype) -> Routing:
    T, K = idx_TK.shape
    E = logits_TE.shape[1]
    return Routing(
        token_idx_N=torch.arange(T, device=idx_TK.device).repeat_interleave(K),
        expert_idx_N=idx_TK.reshape(-1),
        weight_N=torch.ones(T * K, dtype=dtype, device=idx_TK.device),
        num_tokens=T, num_experts=E, logits_TE=logits_TE, probs_TE=logits_TE.float().softmax(-1),
        selected_E=torch.bincount(idx_TK.reshape(-1), minlength=E),
    )


class SelectorRouter(nn.Module):
    """MoEfication's expert selector: MLP(x) -> predicted activation mass per expert, top-k, weight 1."""

    def __init__(self, hidden_size: int, num_experts: int, top_k: int, selector_hidden: int = 64):
        super().__init__()
        self.num_experts, self.top_k = num_experts, top_k
        self.net = nn.Sequential(nn.Linear(hidden_size, selector_hidden), nn.ReLU(), nn.Linear(selector_hidden, num_experts))

    def forward(self, x_TD: torch.Tensor, batch_size: int = 1, group_ids_T: torch.Tensor | None = None,
                causal: bool | None = None) -> Routing:
        logits_TE = self.net(x_TD)
        return routing_from(logits_TE.topk(self.top_k, dim=-1).indices, logits_TE, x_TD.dtype)


class FixedRouter(nn.Module):
    """Experts chosen outside the layer, passed as group ids (K per token, token-major)."""

    def __init__(self, num_experts: int, top_k: int = 1):
        super().__init__()
        self.num_experts, self.top_k = num_experts, top_k

    def forward(self, x_TD: torch.Tensor, batch_size: int = 1, group_ids_T: torch.Tensor | None = None,
                causal: bool | None = None) -> Routing:
        T = x_TD.shape[0]
        if group_ids_T is None or group_ids_T.numel() != T * self.top_k:
            raise ValueError(f"a decoupled-router layer needs {self.top_k} expert id(s) per token as group ids for {T} tokens")
        idx_TK = group_ids_T.reshape(T, self.top_k).to(x_TD.device).long()
        logits_TE = torch.zeros(T, self.num_experts, device=x_TD.device).scatter_(1, idx_TK, 1.0)
        return routing_from(idx_TK, logits_TE, x_TD.dtype)


def build_router(kind: str, hidden_size: int, num_experts: int, top_k: int) -> nn.Module | None:
    """The router of a converted layer; None for "topk" (the MoE layer's own)."""
    if kind == "selector":
        return SelectorRouter(hidden_size, num_experts, top_k)
    if kind == "fixed":
        return FixedRouter(num_experts, top_k)
    return None


def install_routers(moe_layers, kind: str) -> None:
    """Replace the router of each MoE layer (anything with `.router` and `.cfg`) by a `kind` router."""
    for moe in moe_layers:
        router = build_router(kind, moe.cfg.hidden_size, moe.cfg.num_experts, moe.cfg.top_k)
        if router is not None:
            moe.router = router


def expert_mass(acts_TF: torch.Tensor, experts_EW: torch.Tensor) -> torch.Tensor:
    """[T, E] each expert's activation mass: sum of |activation| over its neurons."""
    return acts_TF.abs()[:, experts_EW].sum(-1)


def fit_selector(router: SelectorRouter, x_TD: torch.Tensor, mass_TE: torch.Tensor, steps: int = 300, seed: int = 0) -> float:
    """Regress the selector onto the (standardised) expert masses; returns the final MSE."""
    g = torch.Generator().manual_seed(seed)
    target = (mass_TE - mass_TE.mean()) / mass_TE.std().clamp_min(1e-6)
    opt = torch.optim.Adam(router.parameters(), lr=3e-3)
    loss = torch.tensor(0.0)
    with torch.enable_grad():
        for _ in range(steps):
            pick = torch.randint(0, x_TD.shape[0], (min(512, x_TD.shape[0]),), generator=g)
            loss = (router.net(x_TD[pick]) - target[pick]).square().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
    return float(loss)
