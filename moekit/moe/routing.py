"""Routers: who goes to which expert, with what weight, and at what cost.

Every router returns one `Routing` record. Dispatch, experts, statistics and
the offload cache read only this record, so a new router needs nothing else.
Losses and statistics are returned in the record, never kept on the module.
(The one piece of state, the aux-loss-free balancing bias, is a buffer that
steers selection, as in DeepSeek-V3. Training forwards only count the load
into `expert_counts`; the bias is updated from those counts before each
optimizer step, by moe/balance.py's hook, never inside a forward.)

Capacity limits and token dropping live in dispatch.py: they depend on where
the tokens go (one process or many), not on how they were scored.

Shape legend: T tokens, D hidden, E experts, K top-k, N assignments, G groups.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import MoEConfig


@dataclass
class Routing:
    """Flat token -> expert assignments plus the router's losses and statistics.

    Assignment n sends token `token_idx_N[n]` to expert `expert_idx_N[n]`, whose
    output is scaled by `weight_N[n]`. For token-choice routers the assignments
    are token-major (token t's k choices at t*K .. t*K+K-1) until capacity drops some.
    """

    token_idx_N: torch.Tensor
    expert_idx_N: torch.Tensor
    weight_N: torch.Tensor
    num_tokens: int
    num_experts: int
    logits_TE: torch.Tensor  # raw router logits
    probs_TE: torch.Tensor  # scores after softmax / sigmoid (masked to the allowed experts)
    aux_losses: dict[str, torch.Tensor] = field(default_factory=dict)
    selected_E: torch.Tensor | None = None  # assignments per expert chosen by the router, before capacity
    num_dropped: int = 0  # assignments removed by the capacity limit

    @property
    def counts_E(self) -> torch.Tensor:
        """Tokens per expert after capacity (what the experts actually compute); counted once per record."""
        counts = self.__dict__.get("_counts_E")
        if counts is None or counts[0] is not self.expert_idx_N:
            return self.seed_counts(torch.bincount(self.expert_idx_N, minlength=self.num_experts))
        return counts[1]

    def seed_counts(self, counts_E: torch.Tensor) -> torch.Tensor:
        """Cache counts_E for the current expert_idx_N, when the builder already counted it (it must equal
        bincount(expert_idx_N)); a later expert_idx_N is counted afresh."""
        self.__dict__["_counts_E"] = (self.expert_idx_N, counts_E)
        return counts_E

    def stats(self) -> dict[str, float]:
        """Plain-number statistics for logs: load, drops, entropy."""
        counts = self.counts_E.float()
        total = float(counts.sum()) + self.num_dropped or 1.0
        p = self.probs_TE.detach().float().clamp_min(1e-12)
        p = p / p.sum(-1, keepdim=True)
        mean = counts.mean().clamp_min(1e-12)
        return {
            "dropped_fraction": self.num_dropped / total,
            "max_over_mean_load": float(counts.max() / mean),
            "router_entropy": float(-(p * p.log()).sum(-1).mean()),
        }

    def without(self, keep_N: torch.Tensor) -> "Routing":
        """The same routing with only the assignments where keep_N is True."""
        return replace(
            self,
            token_idx_N=self.token_idx_N[keep_N],
            expert_idx_N=self.expert_idx_N[keep_N],
            weight_N=self.weight_N[keep_N],
            num_dropped=self.num_dropped + int((~keep_N).sum()),
        )


# ---------------------------------------------------------------- losses


def load_balance_loss(probs_TE: torch.Tensor, expert_idx_TK: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Switch / GShard balance loss: E * sum_e f_e * P_e.

    f_e is the fraction of tokens that chose expert e (any of their k slots) and
    P_e the mean router probability of e. A perfectly balanced router scores k,
    the convention of transformers' MoE models (and 1 for top-1, as in Switch).
    """
    T = probs_TE.shape[0]
    counts_E = torch.bincount(expert_idx_TK.reshape(-1), minlength=num_experts).to(probs_TE.dtype)
    f_E = counts_E / max(T, 1)
    P_E = probs_TE.mean(0)
    return num_experts * (f_E * P_E).sum()


def sequence_balance_loss(
    probs_TE: torch.Tensor, expert_idx_TK: torch.Tensor, num_experts: int, batch_size: int
) -> torch.Tensor:
    """The balance loss computed per sequence and averaged (DeepSeek-V3's sequence-wise loss)."""
    T = probs_TE.shape[0]
    if batch_size <= 1 or T % batch_size:
        return load_balance_loss(probs_TE, expert_idx_TK, num_experts)
    seqs = zip(probs_TE.chunk(batch_size), expert_idx_TK.chunk(batch_size))
    return torch.stack([load_balance_loss(p, i, num_experts) for p, i in seqs]).mean()


def z_loss(logits_TE: torch.Tensor) -> torch.Tensor:
    """ST-MoE router z-loss: mean squared log-partition, keeps logits small (0 for no tokens)."""
    if logits_TE.shape[0] == 0:
        return logits_TE.float().sum()
    return torch.logsumexp(logits_TE.float(), dim=-1).square().mean()


# ---------------------------------------------------------------- routers


class TopKRouter(nn.Module):
    """Token choice: each token picks its k best experts.

    Options cover the families moekit loads: softmax or sigmoid scores,
    renormalised or raw top-k weights, a routed scaling factor, DeepSpeed-MoE's
    input jitter and noisy (RSample) selection, DeepSeek-V3's group-limited
    routing and its aux-loss-free balancing bias.
    """

    def __init__(self, cfg: MoEConfig):
        super().__init__()
        self.cfg = cfg
        self.gate = nn.Linear(cfg.hidden_size, cfg.num_experts, bias=cfg.router_bias)
        # Steers which experts are selected, never the weights (DeepSeek-V3).
        persistent = cfg.bias_update_rate > 0 or cfg.selection_bias  # a loaded DeepSeek-V3 bias must survive checkpoints
        self.register_buffer("expert_bias", torch.zeros(cfg.num_experts), persistent=persistent)
        if cfg.bias_update_rate > 0:  # tokens per expert (before capacity) since the last optimizer step: moe/balance.py
            self.register_buffer("expert_counts", torch.zeros(cfg.num_experts, dtype=torch.long), persistent=False)

    def forward(self, x_TD: torch.Tensor, batch_size: int = 1, group_ids_T: torch.Tensor | None = None,
                causal: bool | None = None) -> Routing:
        """causal is accepted for the common router call and ignored: token choice is causal already."""
        cfg = self.cfg
        logits_TE, scores_TE, expert_idx_TK, weight_TK = self._decide(x_TD, group_ids_T)
        if self.training and cfg.bias_update_rate > 0:
            self._count_load(expert_idx_TK)
        return _token_choice_routing(cfg, logits_TE, scores_TE, expert_idx_TK, weight_TK, batch_size, wants_losses(self))

    def select(self, x_TD: torch.Tensor, group_ids_T: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(expert_idx_TK, weight_TK) alone: the same decision as `forward`, without losses or statistics (inference)."""
        return self._decide(x_TD, group_ids_T)[2:]

    def _decide(self, x_TD: torch.Tensor, group_ids_T: torch.Tensor | None):
        cfg = self.cfg
        if self.training and cfg.noise_policy == "jitter":
            x_TD = x_TD * torch.empty_like(x_TD).uniform_(1 - cfg.noise_eps, 1 + cfg.noise_eps)
        logits_TE = self._logits(x_TD, group_ids_T)
        allowed_TE = self._allowed_experts(group_ids_T, x_TD.shape[0], x_TD.device)
        scores_TE = _scores(logits_TE, cfg.score_func, allowed_TE)
        choice_TE = self._selection_scores(scores_TE, logits_TE, allowed_TE)
        expert_idx_TK = choice_TE.topk(cfg.top_k, dim=-1).indices
        if cfg.score_func == "topk_softmax":
            # Granite-MoE, GPT-OSS: the k best logits win and a softmax over those k alone weighs them.
            weight_TK = logits_TE.float().gather(-1, expert_idx_TK).softmax(-1)
        else:
            weight_TK = scores_TE.gather(-1, expert_idx_TK)
        if cfg.norm_topk_prob:
            weight_TK = weight_TK / weight_TK.sum(-1, keepdim=True).clamp_min(1e-20)
        if cfg.routed_scaling_factor != 1.0:
            weight_TK = weight_TK * cfg.routed_scaling_factor
        return logits_TE, scores_TE, expert_idx_TK, weight_TK.to(x_TD.dtype)

    def _logits(self, x_TD: torch.Tensor, group_ids_T: torch.Tensor | None) -> torch.Tensor:
        return self.gate(x_TD)

    def _allowed_experts(self, group_ids_T, T, device) -> torch.Tensor | None:
        return None

    def _selection_scores(self, scores_TE, logits_TE, allowed_TE) -> torch.Tensor:
        """Scores that decide *which* experts win; the weights come from the clean scores."""
        cfg = self.cfg
        choice = scores_TE + self.expert_bias.to(scores_TE.dtype)
        if self.training and cfg.noise_policy == "rsample":
            # DeepSpeed-MoE RSample: noisy logits pick the experts, clean ones weigh them.
            noisy = logits_TE.float() + torch.randn_like(logits_TE, dtype=torch.float32) / cfg.num_experts
            choice = _scores(noisy, cfg.score_func, allowed_TE) + self.expert_bias
        if allowed_TE is not None:
            choice = choice.masked_fill(~allowed_TE, float("-inf"))
        if cfg.n_group > 1:
            choice = _limit_to_groups(choice, cfg.n_group, cfg.topk_group, cfg.group_score_experts)
        return choice

    @torch.no_grad()
    def _count_load(self, expert_idx_TK: torch.Tensor) -> None:
        """Add this forward's selections to `expert_counts` (the bias moves at the optimizer step, moe/balance.py)."""
        self.expert_counts += torch.bincount(expert_idx_TK.reshape(-1), minlength=self.cfg.num_experts)

    def reset_buffers(self, device) -> None:
        """Fresh buffers on `device` for a model built on the meta device: a zero bias (a checkpoint may fill it), no counts."""
        self.expert_bias = torch.zeros(self.cfg.num_experts, device=device)
        if self.cfg.bias_update_rate > 0:
            self.expert_counts = torch.zeros(self.cfg.num_experts, dtype=torch.long, device=device)


class GroupRouter(TopKRouter):
    """Experts split into `num_groups` groups (`group_sizes`, equal by default); a token routes only inside its group.

    The group id comes with each token (a modality as in MoMa, a task as in
    JiuZhang 2.0). Without group ids every token may use every expert.
    """

    def _allowed_experts(self, group_ids_T, T, device) -> torch.Tensor | None:
        return group_mask(self.cfg, group_ids_T, T, device)


class ExpertChoiceRouter(nn.Module):
    """Expert choice (Zhou et al. 2022): each expert takes its top-C tokens; MoMa's modality-aware form.

    C = ceil(tokens * capacity_factor / experts), at most the number of tokens.
    Every expert is exactly full, so no balance loss is needed; a token may be
    taken by several experts or by none. With `num_groups` > 1 (MoMa) a token
    competes only for its group's experts and each expert of group g takes
    ceil(T_g * capacity_factor / |g|) of the T_g tokens of that group
    (capacity_factor=1: 1/|g| of them). `noise_policy="gumbel"` adds
    Gumbel-sigmoid (logistic) noise to the selection logits in training.

    The choice looks at every token of the batch, later ones included. With
    `aux_router_hidden` > 0, causal auxiliary routers (one small MLP per
    expert, on detached inputs, trained with BCE to predict the choice) decide
    instead when `causal` (default: not training): expert e takes token t when
    its auxiliary logit is > 0. aux_losses carry their BCE ("aux_router") and
    accuracy ("aux_router_accuracy", a detached number, not a loss).
    """

    def __init__(self, cfg: MoEConfig):
        super().__init__()
        self.cfg = cfg
        self.gate = nn.Linear(cfg.hidden_size, cfg.num_experts, bias=cfg.router_bias)
        self.aux_routers = CausalAuxRouters(cfg.hidden_size, cfg.num_experts, cfg.aux_router_hidden) \
            if cfg.aux_router_hidden > 0 else None

    def forward(self, x_TD: torch.Tensor, batch_size: int = 1, group_ids_T: torch.Tensor | None = None,
                causal: bool | None = None) -> Routing:
        cfg = self.cfg
        T, E = x_TD.shape[0], cfg.num_experts
        logits_TE = self.gate(x_TD)
        allowed_TE = group_mask(cfg, group_ids_T, T, x_TD.device)
        scores_TE = _scores(logits_TE, cfg.score_func, allowed_TE)
        aux_TE = self.aux_routers(x_TD.detach()) if self.aux_routers is not None else None
        use_aux = aux_TE is not None and ((not self.training) if causal is None else causal)
        losses = wants_losses(self)
        # the non-causal choice: what the experts take, or (causal) what the auxiliary routers learn and are scored on
        chosen_TE = self._choose(scores_TE, logits_TE, allowed_TE, group_ids_T) if not use_aux or T > 1 else None
        selected_TE = chosen_TE if not use_aux else (aux_TE > 0) & (allowed_TE if allowed_TE is not None else True)
        expert_idx_N, token_idx_N = selected_TE.t().nonzero(as_tuple=True)  # expert-major
        weight_N = (scores_TE[token_idx_N, expert_idx_N] * cfg.routed_scaling_factor).to(x_TD.dtype)
        aux = {"z": z_loss(logits_TE)} if losses else {}
        if aux_TE is not None and chosen_TE is not None:
            aux.update(aux_router_losses(aux_TE, chosen_TE, allowed_TE, losses))
        return Routing(
            token_idx_N=token_idx_N, expert_idx_N=expert_idx_N, weight_N=weight_N, num_tokens=T, num_experts=E,
            logits_TE=logits_TE, probs_TE=scores_TE, aux_losses=aux,
            selected_E=(chosen_TE if chosen_TE is not None else selected_TE).sum(0),
        )

    def _choose(self, scores_TE, logits_TE, allowed_TE, group_ids_T) -> torch.Tensor:
        """[T, E] bool: expert e takes token t (each expert its top-C tokens of its group)."""
        cfg = self.cfg
        T, E = scores_TE.shape
        factor = cfg.capacity_factor if self.training or cfg.eval_capacity_factor <= 0 else cfg.eval_capacity_factor
        choice_TE = scores_TE
        if self.training and cfg.noise_policy == "gumbel":
            u = torch.rand_like(logits_TE, dtype=torch.float32).clamp(1e-6, 1 - 1e-6)
            choice_TE = _scores(logits_TE.float() + u.log() - (1 - u).log(), cfg.score_func, allowed_TE)
        if allowed_TE is None:
            C_E = torch.full((E,), expert_choice_capacity(T, E, factor), device=scores_TE.device)
        else:
            choice_TE = choice_TE.masked_fill(~allowed_TE, float("-inf"))
            group_E = expert_groups(cfg, scores_TE.device)
            tokens_G = torch.bincount(group_ids_T.reshape(-1).to(scores_TE.device), minlength=cfg.num_groups)
            sizes_G = torch.bincount(group_E, minlength=cfg.num_groups)
            C_G = torch.minimum(torch.ceil(tokens_G * factor / sizes_G).long(), tokens_G)
            C_E = C_G[group_E]
        selected_TE = torch.zeros(T, E, dtype=torch.bool, device=scores_TE.device)
        top = int(C_E.max()) if E else 0
        if top == 0:
            return selected_TE
        token_idx_EC = choice_TE.t().topk(top, dim=-1).indices
        keep_EC = torch.arange(top, device=scores_TE.device)[None, :] < C_E[:, None]
        expert_idx_EC = torch.arange(E, device=scores_TE.device)[:, None].expand(E, top)
        selected_TE[token_idx_EC[keep_EC], expert_idx_EC[keep_EC]] = True
        return selected_TE


class CausalAuxRouters(nn.Module):
    """MoMa's auxiliary routers: one 2-layer MLP per expert predicting "expert e takes token t" from x_t alone."""

    def __init__(self, hidden_size: int, num_experts: int, hidden: int):
        super().__init__()
        self.w_in_EDH = nn.Parameter(torch.randn(num_experts, hidden_size, hidden) / math.sqrt(hidden_size))
        self.b_in_EH = nn.Parameter(torch.zeros(num_experts, hidden))
        self.w_out_EH = nn.Parameter(torch.randn(num_experts, hidden) / math.sqrt(hidden))
        self.b_out_E = nn.Parameter(torch.zeros(num_experts))

    def forward(self, x_TD: torch.Tensor) -> torch.Tensor:
        """Logits [T, E]: > 0 means the expert is predicted to take the token."""
        h_TEH = F.silu(torch.einsum("td,edh->teh", x_TD, self.w_in_EDH) + self.b_in_EH)
        return (h_TEH * self.w_out_EH).sum(-1) + self.b_out_E


def aux_router_losses(aux_TE, chosen_TE, allowed_TE, losses: bool = True) -> dict[str, torch.Tensor]:
    """BCE of the auxiliary routers against the non-causal choice, and their accuracy, over allowed pairs."""
    keep = allowed_TE if allowed_TE is not None else torch.ones_like(chosen_TE)
    logits, target = aux_TE[keep], chosen_TE[keep].float()
    out = {"aux_router_accuracy": ((logits > 0).float() == target).float().mean().detach()}
    if losses:
        out["aux_router"] = F.binary_cross_entropy_with_logits(logits.float(), target)
    return out


class SparseMixerRouter(TopKRouter):
    """PhiMoE's sparsemixer top-2 routing, in its inference form (transformers' `sparsemixer` with training=False).

    The first expert is the best logit; its weight is a softmax over the experts whose logit lies within
    2 * eps (relative) of it. The second is the best of the rest, weighed the same way among the rest. In
    training the same deterministic choice is used (no Gumbel sampling or Heun gradient estimator).
    """

    def _decide(self, x_TD: torch.Tensor, group_ids_T: torch.Tensor | None):
        logits_TE = self.gate(x_TD)
        scores = logits_TE.float()
        eps = self.cfg.sparsemixer_eps
        first_T1, w_first_T1 = _sparsemixer_pick(scores, scores, eps)
        rest = scores.scatter(-1, first_T1, float("-inf"))
        second_T1, w_second_T1 = _sparsemixer_pick(rest, scores, eps)
        expert_idx_TK = torch.cat([first_T1, second_T1], dim=-1)
        weight_TK = torch.cat([w_first_T1, w_second_T1], dim=-1)
        return logits_TE, scores.softmax(-1), expert_idx_TK, weight_TK.to(x_TD.dtype)


def _sparsemixer_pick(candidates_TE: torch.Tensor, scores_TE: torch.Tensor, eps: float):
    """(best expert [T, 1], its weight [T, 1]): softmax over the candidates within 2*eps (relative) of the best."""
    best_T1, idx_T1 = candidates_TE.max(dim=-1, keepdim=True)
    factor_TE = scores_TE.abs().clamp(min=best_T1)
    far_TE = ((best_T1 - scores_TE) / factor_TE) > (2 * eps)
    weights_TE = candidates_TE.masked_fill(far_TE, float("-inf")).softmax(-1)
    return idx_T1, weights_TE.gather(-1, idx_T1)


def expert_groups(cfg: MoEConfig, device=None) -> torch.Tensor:
    """[E] the group of each expert: `group_sizes` consecutive experts per group, or equal groups."""
    sizes = cfg.group_sizes or [cfg.num_experts // cfg.num_groups] * cfg.num_groups
    return torch.repeat_interleave(torch.arange(len(sizes), device=device), torch.tensor(sizes, device=device))


def group_mask(cfg: MoEConfig, group_ids_T: torch.Tensor | None, T: int, device) -> torch.Tensor | None:
    """[T, E] True where token t may use expert e (its group's experts); None without group ids or groups."""
    if group_ids_T is None or cfg.num_groups == 1:
        return None
    group_ids_T = group_ids_T.reshape(-1).to(device)
    if group_ids_T.numel() != T:
        raise ValueError(f"group_ids has {group_ids_T.numel()} entries for {T} tokens")
    G = cfg.num_groups
    if group_ids_T.numel() and (group_ids_T.min() < 0 or group_ids_T.max() >= G):
        raise ValueError(f"group ids must be in [0, {G}); got values in [{group_ids_T.min()}, {group_ids_T.max()}]")
    return expert_groups(cfg, device)[None, :] == group_ids_T[:, None]


def expert_choice_capacity(num_tokens: int, num_experts: int, factor: float) -> int:
    return min(num_tokens, math.ceil(num_tokens * factor / num_experts))


def build_router(cfg: MoEConfig) -> nn.Module:
    routers = {"topk": TopKRouter, "group": GroupRouter, "expert_choice": ExpertChoiceRouter, "sparsemixer": SparseMixerRouter}
    return routers[cfg.router](cfg)


# ---------------------------------------------------------------- helpers


def _scores(logits_TE: torch.Tensor, score_func: str, allowed_TE: torch.Tensor | None) -> torch.Tensor:
    """Router scores in fp32; experts a token may not use score exactly 0."""
    logits = logits_TE.float()
    if allowed_TE is not None:
        logits = logits.masked_fill(~allowed_TE, float("-inf"))
    return logits.sigmoid() if score_func == "sigmoid" else logits.softmax(-1)


def _limit_to_groups(choice_TE: torch.Tensor, n_group: int, topk_group: int, per_group: int = 2) -> torch.Tensor:
    """DeepSeek group-limited routing: keep only the `topk_group` best groups per token.

    A group's score is the sum of its `per_group` best expert scores: two in
    DeepSeek-V3, one (the maximum) in DeepSeek-V2's group_limited_greedy;
    capped at the group's size.
    """
    T, E = choice_TE.shape
    grouped = choice_TE.view(T, n_group, E // n_group)
    best = min(per_group, E // n_group)
    group_score_TG = grouped.topk(best, dim=-1).values.sum(-1)
    keep_TG = torch.zeros_like(group_score_TG, dtype=torch.bool)
    keep_TG.scatter_(1, group_score_TG.topk(topk_group, dim=-1).indices, True)
    keep_TE = keep_TG[:, :, None].expand_as(grouped).reshape(T, E)
    return choice_TE.masked_fill(~keep_TE, float("-inf"))


def wants_losses(router: nn.Module) -> bool:
    """Aux losses are computed where they can be used: in training, or wherever gradients are on.

    Inference under torch.no_grad (generation, serving) skips them: nothing
    would read them, and at one token per step they cost as much as the routing.
    """
    return router.training or torch.is_grad_enabled()


def _token_choice_routing(cfg, logits_TE, scores_TE, expert_idx_TK, weight_TK, batch_size, losses=True) -> Routing:
    T, K = expert_idx_TK.shape
    E = cfg.num_experts
    probs_TE = scores_TE if cfg.score_func != "sigmoid" else scores_TE / scores_TE.sum(-1, keepdim=True).clamp_min(1e-20)
    aux = {"z": z_loss(logits_TE)} if losses else {}
    if losses and cfg.balance_loss == "batch":
        aux["balance"] = load_balance_loss(probs_TE, expert_idx_TK, E)
    elif losses and cfg.balance_loss == "sequence":
        aux["balance"] = sequence_balance_loss(probs_TE, expert_idx_TK, E, batch_size)
    expert_idx_N = expert_idx_TK.reshape(-1)
    selected_E = torch.bincount(expert_idx_N, minlength=E)
    routing = Routing(
        token_idx_N=torch.arange(T, device=logits_TE.device).repeat_interleave(K),
        expert_idx_N=expert_idx_N,
        weight_N=weight_TK.reshape(-1),
        num_tokens=T,
        num_experts=E,
        logits_TE=logits_TE,
        probs_TE=probs_TE,
        aux_losses=aux,
        selected_E=selected_E,
    )
    routing.seed_counts(selected_E)  # before capacity the counts are the selection: one bincount
    return routing
