"""Group ids (a task, a modality) of served requests: who may give one, and the ids each token routes with.

A request routed by group carries one `group_id` for all its tokens (prompt
and generated), as `Engine.generate_ids(group_ids=[g])` routes a prompt; a
request without one takes each token's group from the model's token ranges
(`model.group_of_token`), or 0. `check_group_id` says which requests a model
accepts (one clear message naming `group_id`); `prompt_groups` and
`token_groups_of` build the [B, T] ids a forward of several requests gets.

Not here: the routers that read the ids (moekit.moe), the one-shot engine's
rules for per-token ids (engine.request_groups), the request field (moekit.server.schemas).
"""

from __future__ import annotations

import torch

from ..errors import ConfigError
from ..models.decoder import token_groups


def check_group_id(cfg, group_id) -> None:
    """A ConfigError unless `group_id` suits the model: only a model that routes by group takes one, in
    [0, moe.num_groups); one without token ranges (model.group_of_token) needs one."""
    takes = bool(getattr(cfg, "routes_by_group", False))
    G = cfg.moe.num_groups if takes else 1
    if group_id is None:
        if takes and not cfg.group_of_token:
            raise ConfigError(f"group_id is required: this model routes by group (task, modality; moe.router="
                              f"{cfg.moe.router!r}) and has no token ranges; give an integer in [0, {G})")
        return
    if not takes:
        raise ConfigError(f"group_id={group_id!r} is not accepted: this model does not route by group (task, "
                          f"modality); leave group_id out")
    if not isinstance(group_id, int) or isinstance(group_id, bool) or not 0 <= group_id < G:
        raise ConfigError(f"group_id={group_id!r} is out of range: accepted values are integers in [0, {G}) "
                          f"(moe.num_groups={G})")


def groups_of(cfg, group_id: int | None, ids: list[int]) -> list[int]:
    """The request's group for every token, else each token's by the model's ranges (else 0)."""
    if group_id is not None:
        return [group_id] * len(ids)
    groups = token_groups(cfg, torch.tensor(ids, dtype=torch.long))
    return groups.tolist() if groups is not None else [0] * len(ids)


def prompt_groups(cfg, requests, P: int, device) -> torch.Tensor | None:
    """[k, P] the left-padded prompts' group ids (a pad takes its prompt's first id), or None when no
    request gives a group id (the model then takes its own ranges)."""
    if all(r.group_id is None for r in requests):
        return None
    rows = []
    for r in requests:
        g = groups_of(cfg, r.group_id, r.prompt_ids)
        rows.append([g[0]] * (P - len(g)) + g)
    return torch.tensor(rows, dtype=torch.long, device=device)


def token_groups_of(cfg, group_ids: list[int | None], tokens: list[list[int]], device) -> torch.Tensor | None:
    """[b, T] group ids of equally long token lists, one request each, or None (no request gives one)."""
    if all(g is None for g in group_ids):
        return None
    return torch.tensor([groups_of(cfg, g, t) for g, t in zip(group_ids, tokens)], dtype=torch.long, device=device)


__all__ = ["check_group_id", "prompt_groups", "token_groups_of", "groups_of"]
