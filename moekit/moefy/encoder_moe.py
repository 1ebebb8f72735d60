"""The MoE FFN of converted BERT-family encoders: experts with biases, as slices of a GELU FFN.

moekit's `Experts` have no biases; BERT's FFN has an input bias per neuron and
one output bias. `EncoderMoE` keeps the per-neuron input bias with each
expert's slice, adds the output bias once, and runs an always-on shared slice.
Its router is moekit's TopKRouter (upcycle: renormalised top-k, so step 0
equals the dense FFN) or a moefy router (selector / fixed, weight 1).

Not here: the encoder itself (encoder.py), the partition (partition.py).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import MoEConfig
from ..moe.routing import TopKRouter
from .ffn import FFNWeights
from .partition import Partition
from .routers import build_router


class EncoderMoE(nn.Module):
    def __init__(self, hidden: int, experts: int, top_k: int, expert_width: int, shared_width: int, router: str):
        super().__init__()
        self.cfg = MoEConfig(hidden_size=hidden, num_experts=experts, top_k=top_k, expert_hidden=expert_width,
                             activation="gelu", norm_topk_prob=True)
        self.router = build_router(router, hidden, experts, top_k) or TopKRouter(self.cfg)
        self.w_in_EWD = nn.Parameter(torch.zeros(experts, expert_width, hidden))
        self.b_in_EW = nn.Parameter(torch.zeros(experts, expert_width))
        self.w_out_EDW = nn.Parameter(torch.zeros(experts, hidden, expert_width))
        self.b_out_D = nn.Parameter(torch.zeros(hidden))
        self.shared_in = nn.Linear(hidden, shared_width) if shared_width else None
        self.shared_out = nn.Linear(shared_width, hidden, bias=False) if shared_width else None

    def forward(self, x: torch.Tensor, group_ids: torch.Tensor | None = None) -> torch.Tensor:
        x_TD = x.reshape(-1, x.shape[-1])
        routing = self.router(x_TD, batch_size=1, group_ids_T=group_ids)
        y_TD = x_TD.new_zeros(x_TD.shape)
        for e in torch.unique(routing.expert_idx_N).tolist():
            pick = routing.expert_idx_N == e
            tok = routing.token_idx_N[pick]
            h = F.gelu(F.linear(x_TD[tok], self.w_in_EWD[e], self.b_in_EW[e]))
            y_TD.index_add_(0, tok, F.linear(h, self.w_out_EDW[e]) * routing.weight_N[pick, None].to(x.dtype))
        if self.shared_in is not None:
            y_TD = y_TD + self.shared_out(F.gelu(self.shared_in(x_TD)))
        return (y_TD + self.b_out_D).view(x.shape)

    @torch.no_grad()
    def fill(self, fw: FFNWeights, part: Partition | None) -> None:
        """Copy the dense GELU FFN in: whole into every expert (part None) or sliced by `part`."""
        E = self.w_in_EWD.shape[0]
        experts = torch.arange(fw.width).expand(E, fw.width) if part is None else part.experts_EW
        self.w_in_EWD.copy_(fw.w_up_FD[experts])
        self.b_in_EW.copy_(fw.b_up_F[experts])
        self.w_out_EDW.copy_(torch.stack([fw.w_down_DF[:, idx] for idx in experts]))
        self.b_out_D.copy_(fw.b_down_D)
        if self.shared_in is not None:
            s = part.shared_S
            self.shared_in.weight.copy_(fw.w_up_FD[s])
            self.shared_in.bias.copy_(fw.b_up_F[s])
            self.shared_out.weight.copy_(fw.w_down_DF[:, s])
