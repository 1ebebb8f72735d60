"""Task-conditioned routing (JiuZhang 2.0): a learned task embedding steers a token-choice router.

`TaskRouter` is a `TopKRouter` whose gate also sees the token's task: the task
embedding is added to the router input (`task_router_input="add"`: logits =
gate(x + e_task)) or concatenated with it (`"concat"`: logits = gate([x, e_task]),
kept as gate(x) + task_gate(e_task) so the token half stays the plain gate).
Every expert stays open to every task; the hard variant, where a task may use
only its own experts, is the `GroupRouter` with task ids as group ids
(router="group", num_groups = number of tasks).

Task ids arrive per token as `group_ids_T`; `MoEConfig.num_groups` is the number
of tasks the router was built for. A task router without task ids, or with an id
outside that range, is refused with one message naming the accepted range.

Not here: the task data (moekit.data.mathtasks), multi-task training (moekit.train.multitask),
routing statistics by task (moekit.moe.stats).

Shape legend: T tokens, D hidden, E experts.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ..config import MoEConfig
from ..errors import ConfigError
from .routing import TopKRouter


class TaskRouter(TopKRouter):
    """Top-k routing on the token's hidden state and a learned embedding of its task."""

    def __init__(self, cfg: MoEConfig):
        super().__init__(cfg)
        self.task_embed = nn.Embedding(cfg.num_groups, cfg.hidden_size)
        nn.init.normal_(self.task_embed.weight, std=0.02)
        self.task_gate = nn.Linear(cfg.hidden_size, cfg.num_experts, bias=False) if cfg.task_router_input == "concat" else None

    def _logits(self, x_TD: torch.Tensor, group_ids_T: torch.Tensor | None) -> torch.Tensor:
        task_TD = self.task_embed(check_task_ids(group_ids_T, x_TD.shape[0], self.cfg.num_groups, x_TD.device))
        if self.task_gate is None:
            return self.gate(x_TD + task_TD.to(x_TD.dtype))
        return self.gate(x_TD) + self.task_gate(task_TD.to(x_TD.dtype))


def check_task_ids(group_ids_T: torch.Tensor | None, num_tokens: int, num_tasks: int, device) -> torch.Tensor:
    """The task ids as a flat long tensor on `device`, or one clear error naming what is accepted."""
    if group_ids_T is None:
        raise ConfigError(f"this model routes by task (moe.router='task', {num_tasks} tasks): give a task id per token "
                          f"(group_ids in [0, {num_tasks}))")
    ids_T = group_ids_T.reshape(-1).to(device=device, dtype=torch.long)
    if ids_T.numel() != num_tokens:
        raise ConfigError(f"task ids: {ids_T.numel()} given for {num_tokens} tokens; give one per token")
    if ids_T.numel() and (int(ids_T.min()) < 0 or int(ids_T.max()) >= num_tasks):
        raise ConfigError(f"task id {int(ids_T.max()) if int(ids_T.max()) >= num_tasks else int(ids_T.min())} is out "
                          f"of range: the model was trained on {num_tasks} tasks (ids 0..{num_tasks - 1})")
    return ids_T
