"""Which FFN neurons go where: a shared always-on part and E experts of equal size.

- `cluster_partition` (MoEfication): balanced k-means of neuron features
  (input weight rows, or co-activation patterns on calibration tokens).
- `readme_partition` (Read-ME): per-domain channel importance (mean |activation|
  at the down-projection input); the shared part is the channels important in
  every domain (the intersection, ranked by their least importance), each
  expert takes its own domain's most important remaining channels.

Only index bookkeeping on tensors; no model, no weights written here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .spec import MoefyError


@dataclass
class Partition:
    shared_S: torch.Tensor  # neuron indices always on (may be empty)
    experts_EW: torch.Tensor  # neuron indices of each expert

    def check(self, width: int) -> "Partition":
        every = torch.cat([self.shared_S, self.experts_EW.reshape(-1)]).sort().values
        assert torch.equal(every, torch.arange(width)), "a partition must cover every neuron exactly once"
        return self


def balanced_assign(dist_FE: torch.Tensor, size: int) -> torch.Tensor:
    """[F] cluster of each neuron: closest pairs first, no cluster above `size` members."""
    F_, E = dist_FE.shape
    order = dist_FE.reshape(-1).argsort()
    assign = [-1] * F_
    fill = [0] * E
    left = F_
    for flat in order.tolist():
        f, e = divmod(flat, E)
        if assign[f] < 0 and fill[e] < size:
            assign[f] = e
            fill[e] += 1
            left -= 1
            if not left:
                break
    return torch.tensor(assign, dtype=torch.long)


def balanced_kmeans(feat_FX: torch.Tensor, E: int, iters: int = 15, seed: int = 0) -> torch.Tensor:
    """[E, F/E] neuron indices: k-means where every cluster has exactly F/E members."""
    F_ = feat_FX.shape[0]
    size = F_ // E
    g = torch.Generator().manual_seed(seed)
    x = feat_FX.float()
    centers = x[torch.randperm(F_, generator=g)[:E]].clone()
    assign = torch.zeros(F_, dtype=torch.long)
    for _ in range(iters):
        new = balanced_assign(torch.cdist(x, centers), size)
        if torch.equal(new, assign):
            break
        assign = new
        centers = torch.stack([x[assign == e].mean(0) for e in range(E)])
    return torch.stack([torch.nonzero(assign == e).flatten() for e in range(E)])


def cluster_partition(fw, E: int, shared: int, acts_TF: torch.Tensor | None, seed: int = 0) -> Partition:
    """MoEfication split: shared = the most active neurons, the rest balanced k-means clusters."""
    if acts_TF is not None:
        score_F = acts_TF.abs().mean(0)
        feat = (acts_TF > 0).float().t() if fw.activation == "gelu" else acts_TF.abs().t()
        feat = feat / feat.norm(dim=1, keepdim=True).clamp_min(1e-6)
    else:
        score_F = fw.input_rows().norm(dim=1) * fw.w_down_DF.norm(dim=0)
        rows = fw.input_rows()
        feat = rows / rows.norm(dim=1, keepdim=True).clamp_min(1e-6)
    shared_S = score_F.topk(shared).indices.sort().values if shared else torch.zeros(0, dtype=torch.long)
    rest = torch.ones(fw.width, dtype=torch.bool)
    rest[shared_S] = False
    rest_idx = torch.nonzero(rest).flatten()
    clusters = balanced_kmeans(feat[rest_idx], E, seed=seed)
    return Partition(shared_S, rest_idx[clusters].sort(dim=1).values).check(fw.width)


def domains_for_experts(groups: list[torch.Tensor], E: int) -> list[torch.Tensor]:
    """E calibration domains from G groups of tokens ([T, ...] each: FFN inputs or activations).

    G >= E: groups are merged round-robin (group g into domain g mod E);
    G < E: each group's tokens are cut into contiguous pieces so that there are E in all.
    """
    if not groups:
        raise MoefyError("the readme method needs calibration data (--calib PATH ..., one group per file or domain); none was given")
    if len(groups) >= E:
        return [torch.cat(groups[e::E]) for e in range(E)]
    pieces = [E // len(groups) + (i < E % len(groups)) for i in range(len(groups))]
    out = []
    for g, n in zip(groups, pieces):
        if g.shape[0] < n:
            raise MoefyError(f"calibration group of {g.shape[0]} tokens is too short to cut into {n} domains; give more text or more files")
        out.extend(torch.tensor_split(g, n))
    return out


def readme_partition(importance_EF: torch.Tensor, shared: int) -> Partition:
    """Read-ME split from each of E domains' channel importance (mean |activation| per neuron)."""
    E, width = importance_EF.shape
    imp_EF = importance_EF / importance_EF.sum(1, keepdim=True).clamp_min(1e-12)
    taken = torch.zeros(width, dtype=torch.bool)
    shared_S = imp_EF.min(0).values.topk(shared).indices.sort().values if shared else torch.zeros(0, dtype=torch.long)
    taken[shared_S] = True
    size = (width - shared) // E
    ranked = [imp_EF[e].argsort(descending=True).tolist() for e in range(E)]
    cursor = [0] * E
    members: list[list[int]] = [[] for _ in range(E)]
    for _ in range(size):  # round-robin: each expert takes its best channel not yet taken
        for e in range(E):
            while taken[ranked[e][cursor[e]]]:
                cursor[e] += 1
            c = ranked[e][cursor[e]]
            taken[c] = True
            members[e].append(c)
    experts = torch.tensor(members, dtype=torch.long).sort(dim=1).values
    return Partition(shared_S, experts).check(width)
