"""A GPT-OSS-like model for the generate benchmark: `gpt_oss_like()` returns its transformers config.

GPT-OSS-20B scaled down to about 100M parameters, keeping what makes the
family different: 16 experts top-4 with biases and the clamped SwiGLU, a
router with bias, per-head attention sinks, alternating sliding-window (128)
and full layers, q/k/v/o biases, head_dim 64 with 8 query and 2 key/value
heads, and YaRN. Widths are multiples of 32, so an MXFP4 copy is possible.

Not here: the timing, the peers and the targets (benchmarks/generate.py wires this in).
Run this file to print the parameter count.
"""

from __future__ import annotations

VOCAB = 8192


def gpt_oss_like():
    """The transformers GptOssConfig of a ~100M-parameter GPT-OSS-like model (float32, no EOS)."""
    from transformers import AutoConfig

    layers = 8
    return AutoConfig.for_model(
        "gpt_oss",
        vocab_size=VOCAB, hidden_size=512, num_hidden_layers=layers, num_attention_heads=8, num_key_value_heads=2,
        head_dim=64, intermediate_size=448, num_local_experts=16, num_experts_per_tok=4,
        sliding_window=128, layer_types=["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers)],
        max_position_embeddings=4096, attention_bias=True, swiglu_limit=7.0,
        rope_parameters=dict(rope_type="yarn", rope_theta=150000.0, factor=32.0, beta_fast=32.0, beta_slow=1.0,
                             truncate=False, original_max_position_embeddings=4096 // 32),
        tie_word_embeddings=False, eos_token_id=None, bos_token_id=None, pad_token_id=0, dtype="float32",
    )


if __name__ == "__main__":
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(gpt_oss_like())
    print(f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters")
