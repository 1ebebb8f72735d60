"""Training-compute estimates of a DecoderLM config: FLOPs per token, compute to a loss, model FLOPs utilisation.

Two accountings, each the one a benchmark has always reported with:
  - `training_flops_per_token` (moe_vs_dense, deepspeed_moe): 6 x the weights a
    token multiplies with (`active_matmul_params`: 2 forward + 4 backward per
    weight) + Kaplan et al.'s attention term 6 x L x T x d_attn (causal mean
    context T/2, two products forward, backward twice the forward);
  - `routed_training_flops_per_token` (moma): per layer 6 x (projections,
    3 x T x d_attn for scores and values, the FFN a token runs: expert choice
    at its capacity factor), a mixture-of-depths layer at its capacity, its
    router and predictor and the auxiliary routers counted in full.
Embedding lookups, norms, softmax and routing bookkeeping are not counted.

`crossing_flops` reads off a loss-vs-FLOPs curve the compute at which a loss
level is first reached; `mfu` is achieved over peak FLOPs per second.

Not here: timing (the benchmarks), the models (moekit.models).
"""

from __future__ import annotations


def active_matmul_params(cfg) -> int:
    """Weights a token multiplies with: attention, router, the top-k experts (or the dense MLP), the head.

    Embedding lookups and norm scales do no matmul and are left out.
    """
    D = cfg.hidden_size
    head_dim = cfg.head_dim or D // cfg.num_heads
    q, kv = cfg.num_heads * head_dim, cfg.num_kv_heads * head_dim
    mlp_per_width = 3 if cfg.moe.activation == "swiglu" else 2  # gate+up+down, or up+down
    total = D * cfg.vocab_size  # lm_head
    for i in range(cfg.num_layers):
        total += D * q + 2 * D * kv + q * D  # q, k, v, o projections
        if not cfg.is_moe_layer(i):
            total += mlp_per_width * D * cfg.dense_hidden
            continue
        moe = cfg.moe_for_layer(i)
        k = max(1, round(moe.capacity_factor)) if moe.router == "expert_choice" else moe.top_k
        total += D * moe.num_experts + k * mlp_per_width * D * moe.expert_hidden  # router + active experts
        if moe.num_shared_experts:
            total += moe.num_shared_experts * mlp_per_width * D * (moe.shared_expert_hidden or moe.expert_hidden)
            total += D if moe.shared_expert_gate else 0
        if cfg.ffn == "residual_moe":
            total += mlp_per_width * D * cfg.dense_hidden + 2 * D  # the dense MLP and its mixing coefficient
    return total


def attention_flops_per_token(cfg, seq_len: int) -> int:
    """Training FLOPs of the score and value products (Kaplan et al.): 3 x 2 * layers * seq_len * d_attn."""
    d_attn = cfg.num_heads * (cfg.head_dim or cfg.hidden_size // cfg.num_heads)
    return 6 * cfg.num_layers * seq_len * d_attn


def training_flops_per_token(cfg, seq_len: int) -> int:
    """6 x active matmul params (2 forward + 4 backward per weight) + the attention term."""
    return 6 * active_matmul_params(cfg) + attention_flops_per_token(cfg, seq_len)


def forward_flops_per_token(cfg, seq_len: int) -> int:
    """A third of the training FLOPs: the forward alone (e.g. a distillation teacher's)."""
    return training_flops_per_token(cfg, seq_len) // 3


def routed_training_flops_per_token(cfg, seq_len: int) -> float:
    """moma's accounting (see the module docstring): expert choice, mixture-of-depths and auxiliary routers."""
    D, head = cfg.hidden_size, cfg.hidden_size // cfg.num_heads
    total = 6 * D * cfg.vocab_size
    for i in range(cfg.num_layers):
        layer = 4 * D * cfg.num_heads * head + 3 * seq_len * cfg.num_heads * head  # projections; scores+values (x2 fwd, /2 causal)
        if cfg.is_moe_layer(i):
            moe = cfg.moe
            layer += moe.capacity_factor * 3 * D * moe.expert_hidden + D * moe.num_experts
            extra = moe.num_experts * (D * moe.aux_router_hidden + moe.aux_router_hidden)
        else:
            layer += 3 * D * cfg.dense_hidden
            extra = 0
        if i in cfg.mod_layers:
            layer = cfg.mod_capacity * layer
            extra += D + D * cfg.mod_predictor_hidden + cfg.mod_predictor_hidden
        total += 6 * (layer + extra)
    return float(total)


def crossing_flops(points: list[tuple[float, float]], level: float) -> float | None:
    """The first FLOPs at which a (flops, loss) curve reaches `level`, linear between points; None if never."""
    for i, (flops, loss) in enumerate(points):
        if loss <= level:
            if i == 0:
                return flops
            f0, l0 = points[i - 1]
            return f0 + (l0 - level) / (l0 - loss) * (flops - f0)
    return None


def mfu(tokens_per_s: float, flops_per_token: float, peak_flops_per_s: float) -> float:
    """Model FLOPs utilisation: the training FLOPs per second achieved over the hardware's peak."""
    if peak_flops_per_s <= 0:
        raise ValueError(f"peak_flops_per_s={peak_flops_per_s} is invalid: it must be > 0")
    return tokens_per_s * flops_per_token / peak_flops_per_s


__all__ = ["active_matmul_params", "attention_flops_per_token", "training_flops_per_token", "forward_flops_per_token",
           "routed_training_flops_per_token", "crossing_flops", "mfu"]
