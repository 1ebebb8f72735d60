"""ReadMeLM: a converted DecoderLM whose every MoE layer follows one decoupled router.

The router (router.py) picks each token's experts from the token ids; the
choice reaches every layer's `FixedRouter` as the layers' group ids, so the
DecoderLM's forward is unchanged. `new_cache` returns the LM's KV cache with
the router's own cache attached, so prefill and decode route incrementally;
forward hands the router the LM's padding mask and positions too, so a
left-padded batch routes each row as if alone.
`route_ahead` + `new_router_cache` let a server know each token's experts
before the step (moekit.infer.scheduler batches and caches by them).
`readme_skeleton` rebuilds one from a saved manifest (io.py).

Not here: training (tune.py), conversion (decoder.py).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from ..config import from_dict, to_dict
from ..models.build import build_model
from ..models.decoder import DecoderLM, DecoderOutput, ModelConfig
from .router import DecoupledRouter, RouterConfig
from .routers import install_routers


class ReadMeLM(nn.Module):
    def __init__(self, lm: DecoderLM, router: DecoupledRouter):
        super().__init__()
        self.lm, self.router = lm, router

    @property
    def cfg(self) -> ModelConfig:
        return self.lm.cfg

    def experts_for(self, ids_BT: torch.Tensor, kv_cache=None, cache_start: int = 0,
                    attention_mask_BK=None, positions_BT=None) -> torch.Tensor:
        """[B, T, K] every token's experts, known before the LM runs (padding masked, positions per row)."""
        router_cache = getattr(kv_cache, "router_cache", None) if kv_cache is not None else None
        return self.router.route(ids_BT, router_cache, cache_start, attention_mask_BK, positions_BT)

    def route_ahead(self, ids_BT: torch.Tensor, router_cache=None, cache_start: int = 0) -> torch.Tensor:
        """[B, T, K] the experts (the same in every layer) of tokens the LM has not run yet.

        The serving side's capability for known routes: it routes each sequence ahead with its own
        `new_router_cache`, batches and caches by expert, then passes the experts back to `forward`
        as `group_ids_BT` (the router is not run twice).
        """
        return self.router.route(ids_BT, router_cache, cache_start)

    def new_router_cache(self, batch_size: int = 1, max_len: int | None = None):
        return self.router.new_cache(batch_size, max_len or self.lm.cfg.max_seq_len)

    def forward(self, input_ids_BT, attention_mask_BK=None, positions_BT=None, kv_cache=None, cache_start: int = 0,
                group_ids_BT=None, last_only: bool = False) -> DecoderOutput:
        experts = group_ids_BT
        if experts is None:  # the router sees the LM's padding mask and positions: a padded row routes as if alone
            experts = self.experts_for(input_ids_BT, kv_cache, cache_start, attention_mask_BK, positions_BT)
        return self.lm(input_ids_BT, attention_mask_BK, positions_BT, kv_cache, cache_start, experts, last_only)

    def new_cache(self, batch_size: int, max_len: int | None = None, dtype=None, device=None):
        cache = self.lm.new_cache(batch_size, max_len, dtype, device)
        cache.router_cache = self.router.new_cache(batch_size, max_len or self.lm.cfg.max_seq_len)
        return cache

    def manifest_extra(self) -> dict:
        return {"kind": "readme_lm", "model": to_dict(self.lm.cfg), "router_config": self.router.cfg.to_dict()}


def make_readme_lm(moe: DecoderLM, router_cfg: dict | None = None) -> ReadMeLM:
    """Wrap a converted (fixed-router) DecoderLM with a new decoupled router initialised from its embeddings."""
    moe_cfg = moe.cfg.moe
    cfg = RouterConfig(vocab_size=moe.cfg.vocab_size, host_hidden=moe.cfg.hidden_size, num_experts=moe_cfg.num_experts,
                       top_k=moe_cfg.top_k, max_seq_len=moe.cfg.max_seq_len, **(router_cfg or {}))
    model = ReadMeLM(moe, DecoupledRouter(cfg, moe.embed_tokens.weight.detach()))
    model.moefy_manifest = getattr(moe, "moefy_manifest", None)
    return model


def readme_skeleton(manifest: dict, d: Path) -> ReadMeLM:
    lm = build_model(from_dict(ModelConfig, manifest["model"], f"{d.name}/moefy.json: model"))
    install_routers([layer.mlp for layer in lm.layers], "fixed")
    return ReadMeLM(lm, DecoupledRouter(RouterConfig(**manifest["router_config"])))
