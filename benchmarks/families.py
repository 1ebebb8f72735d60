"""Benchmark model builders for the newer Hugging Face families, and the MLA cache-size comparison.

`deepseek_v3_like()` is the transformers config of a ~100M-parameter
DeepSeek-V3-like model (hidden 512, 8 layers of which the first is dense, 16
heads of multi-head latent attention with q_lora_rank 192 and kv_lora_rank
128, 64 routed experts top-8 in 8 groups of which 4 are used, one shared
expert, sigmoid scores with routed scaling 2.5), for benchmarks/generate.py to
time next to its Mixtral-like and Qwen3-MoE-like models (same vocabulary and
the same `COMMON` keys it passes). `mla_cache_bytes(...)` gives the cache
bytes per token of such a model three ways: moekit's latent cache, a
per-head K/V cache (every head's expanded key and value, as a standard KV
cache or the original DeepSeek remote code keeps them), and transformers'
own `DynamicCache` measured after a forward pass. `cache_targets` turns them
into the benchmark's targets (latent <= 1/8 of per-head K/V; the ratio to
transformers' measured cache is reported too). `attention_weights(layer)`
lists the attention matrices a decode step reads (for the weight-read floor),
for grouped-query and latent attention alike.

Run alone, it prints the comparison for the DeepSeek-V3-like model (no timing):
    python benchmarks/families.py

Not here: timing, the engine comparison, result files (benchmarks/generate.py).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import target  # noqa: E402

VOCAB = 8192
DEEPSEEK_V3_LIKE = dict(
    vocab_size=VOCAB, hidden_size=512, num_hidden_layers=8, num_attention_heads=16, num_key_value_heads=16,
    max_position_embeddings=1024, eos_token_id=None, bos_token_id=None, pad_token_id=0,
    intermediate_size=1024, moe_intermediate_size=128, n_routed_experts=64, num_experts_per_tok=8,
    n_shared_experts=1, n_group=8, topk_group=4, first_k_dense_replace=1, routed_scaling_factor=2.5,
    norm_topk_prob=True, q_lora_rank=192, kv_lora_rank=128, qk_nope_head_dim=64, qk_rope_head_dim=32,
    v_head_dim=64, num_nextn_predict_layers=0,
)
LATENT_GOAL = 1 / 8  # latent cache bytes per token over a per-head K/V cache's


def deepseek_v3_like(**overrides):
    """The transformers DeepseekV3Config of the ~100M-parameter benchmark model."""
    from transformers import AutoConfig

    return AutoConfig.for_model("deepseek_v3", **{**DEEPSEEK_V3_LIKE, **overrides})


def mla_cache_bytes(hf_config, dtype_bytes: int = 4, hf_model=None, tokens: int = 16) -> dict[str, float]:
    """Cache bytes per token (all layers) of a DeepSeek config: latent, per-head K/V and (given a model) transformers'."""
    from moekit.hf import model_config_from_hf
    from moekit.models.mla import cache_bytes_per_token

    cfg = model_config_from_hf(hf_config.to_dict() if hasattr(hf_config, "to_dict") else dict(hf_config))
    sizes: dict[str, float] = dict(cache_bytes_per_token(cfg.num_layers, cfg.num_heads, cfg.mla, dtype_bytes))
    if hf_model is not None:
        sizes["transformers_dynamic_cache"] = transformers_cache_bytes_per_token(hf_model, tokens)
    return sizes


@torch.no_grad()
def transformers_cache_bytes_per_token(hf_model, tokens: int = 16) -> float:
    """Bytes per token transformers' DynamicCache holds after a forward pass over `tokens` tokens."""
    ids = torch.arange(1, tokens + 1)[None] % hf_model.config.vocab_size
    cache = hf_model(input_ids=ids, use_cache=True).past_key_values
    total = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
    return total / tokens


def cache_targets(sizes: dict[str, float]) -> list[dict]:
    """The MLA cache targets: latent <= 1/8 of a per-head K/V cache (and the ratio to transformers', reported)."""
    out = [target("mla_cache_bytes_per_token_vs_per_head_kv", sizes["latent"] / sizes["per_head_kv"], LATENT_GOAL, "<=")]
    if "transformers_dynamic_cache" in sizes:
        # transformers 5 already caches the compressed latents for deepseek_v2/v3, so equality (1.0) is the goal here
        out.append(target("mla_cache_bytes_per_token_vs_transformers", sizes["latent"] / sizes["transformers_dynamic_cache"],
                          1.0, "<="))
    return out


def attention_weights(layer) -> list[torch.Tensor]:
    """Every matrix of a layer's attention (q/k/v/o, or MLA's q_a/q_b/kv_a/kv_b/o): what one decode step reads."""
    return [m.weight for m in layer.self_attn.modules() if isinstance(m, torch.nn.Linear)]


def main() -> None:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    config = deepseek_v3_like()
    model = AutoModelForCausalLM.from_config(config).eval()
    params = sum(p.numel() for p in model.parameters())
    sizes = mla_cache_bytes(config, dtype_bytes=4, hf_model=model)
    print(f"DeepSeek-V3-like: {params / 1e6:.1f}M parameters; cache bytes per token (fp32, all layers): "
          + ", ".join(f"{k}={v:g}" for k, v in sizes.items()))
    for t in cache_targets(sizes):
        print(t)


if __name__ == "__main__":
    main()
