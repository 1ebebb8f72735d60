"""The MoE FFN of converted BERT-family encoders: experts with biases, as slices of a GELU FFN.

BERT's FFN has an input bias per neuron and one output bias. `EncoderMoE` keeps
its experts in moekit's experts storage (`Experts`, GELU with biases: each
expert's slice carries its neurons' input biases; the experts' own output
biases stay zero, a buffer), runs them through the MoE layer's dispatcher, adds
the dense output bias once (the routing weights need not sum to 1) and runs an
always-on shared slice. Its router is moekit's TopKRouter (upcycle:
renormalised top-k, so step 0 equals the dense FFN) or a moefy router
(selector / fixed, weight 1). State written before the experts moved into
`Experts` (`w_in_EWD`, `b_in_EW`, `w_out_EDW`) loads under the new names.

Not here: the encoder itself (encoder.py), the partition (partition.py).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import MoEConfig
from ..moe.dispatch import LocalDispatcher
from ..moe.experts import Experts
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
        self.dispatcher = LocalDispatcher()
        self.experts = Experts(experts, hidden, expert_width, activation="gelu", kernel=self.cfg.kernel, bias=True)
        del self.experts.b_out_ED  # the dense output bias is added once, below: the experts' own stay zero
        self.experts.register_buffer("b_out_ED", torch.zeros(experts, hidden), persistent=False)
        self.b_out_D = nn.Parameter(torch.zeros(hidden))
        self.shared_in = nn.Linear(hidden, shared_width) if shared_width else None
        self.shared_out = nn.Linear(shared_width, hidden, bias=False) if shared_width else None
        self._register_load_state_dict_pre_hook(_rename_old_state)

    def forward(self, x: torch.Tensor, group_ids: torch.Tensor | None = None) -> torch.Tensor:
        x_TD = x.reshape(-1, x.shape[-1])
        routing = self.router(x_TD, batch_size=1, group_ids_T=group_ids)
        y_TD = self.dispatcher.run(x_TD, routing, self.experts)
        if self.shared_in is not None:
            y_TD = y_TD + self.shared_out(F.gelu(self.shared_in(x_TD)))
        return (y_TD + self.b_out_D).view(x.shape)

    @torch.no_grad()
    def fill(self, fw: FFNWeights, part: Partition | None) -> None:
        """Copy the dense GELU FFN in: whole into every expert (part None) or sliced by `part`."""
        ex = self.experts
        experts = torch.arange(fw.width).expand(ex.num_experts, fw.width) if part is None else part.experts_EW
        ex.w_in_EHD.copy_(fw.w_up_FD[experts])
        ex.b_in_EH.copy_(fw.b_up_F[experts])
        ex.w_out_EDF.copy_(torch.stack([fw.w_down_DF[:, idx] for idx in experts]))
        self.b_out_D.copy_(fw.b_down_D)
        if self.shared_in is not None:
            s = part.shared_S
            self.shared_in.weight.copy_(fw.w_up_FD[s])
            self.shared_in.bias.copy_(fw.b_up_F[s])
            self.shared_out.weight.copy_(fw.w_down_DF[:, s])


_OLD_NAMES = {"w_in_EWD": "experts.w_in_EHD", "b_in_EW": "experts.b_in_EH", "w_out_EDW": "experts.w_out_EDF"}


def _rename_old_state(state: dict, prefix: str, *args) -> None:
    """State saved before the experts moved into `Experts` loads under the new names."""
    for old, new in _OLD_NAMES.items():
        if prefix + old in state:
            state[prefix + new] = state.pop(prefix + old)
