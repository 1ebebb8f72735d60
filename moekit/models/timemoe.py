"""Time-MoE: a decoder-only Mixture-of-Experts time-series forecaster (Shi et al., ICLR 2025).

Holds `ForecasterConfig` and its presets (`tiny`, `base` = TimeMoE-50M,
`large` = TimeMoE-200M), the model `TimeMoE` (one token per time point, a
bias-free SwiGLU embedding, pre-norm decoder blocks whose FFN is moekit's
`MoELayer` of 8 experts top-2 plus a sigmoid-gated shared expert, and
multi-resolution output heads), its training loss (Huber over every head +
0.02 x the all-layer load-balance loss), autoregressive multi-head inference
with a KV cache, and loading of Time-MoE checkpoints in their Hugging Face
format (config.json + safetensors) and of moekit forecaster checkpoints.

Not here: data handling (`moekit.data.timeseries`), the evaluation harness and
baselines (`moekit.forecast_eval`), the training loop (`moekit.train`).

Shape suffixes: B batch, T time points (tokens), D hidden, E experts, L layers,
H forecast horizon, I input size (values per time point, 1 for the published models).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..config import MoEConfig, _check_int, field_list, from_dict, to_dict
from ..errors import CheckpointError, ConfigError, DataError
from ..modules import Attention, KVCache, RMSNorm, RotaryEmbedding, SwiGLU
from ..train.loop import TrainConfig

MODEL_TYPE = "moekit-forecaster"  # the marker in a moekit checkpoint's config
HF_MODEL_TYPE = "time_moe"


@dataclass
class ForecasterConfig:
    """Time-MoE's architecture; field names follow the published config.json where they exist."""

    hidden_size: int = 64
    intermediate_size: int = 256  # shared expert width; each routed expert gets intermediate_size // top_k
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 0  # 0: same as num_heads
    num_experts: int = 8
    top_k: int = 2
    use_dense: bool = False  # dense SwiGLU FFN of intermediate_size instead of the MoE (the paper's dense baseline)
    horizon_lengths: list[int] = field_list([1, 8, 32, 64])
    input_size: int = 1
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    aux_loss_factor: float = 0.02
    huber_delta: float = 2.0
    kernel: str = "auto"  # expert kernel, see moekit.experts

    def __post_init__(self) -> None:
        for name in ("hidden_size", "intermediate_size", "num_layers", "num_heads", "num_experts", "input_size"):
            _check_int(self, name, 1)
        _check_int(self, "num_kv_heads", 0)
        if not self.horizon_lengths or any(not isinstance(h, int) or isinstance(h, bool) or h < 1
                                           for h in self.horizon_lengths):
            raise ConfigError(f"horizon_lengths={self.horizon_lengths!r} is invalid: it must be a non-empty list of positive integers")
        if self.hidden_size % self.num_heads:
            raise ConfigError(f"hidden_size={self.hidden_size} must be divisible by num_heads={self.num_heads}")
        if (self.hidden_size // self.num_heads) % 2:
            raise ConfigError(f"head size hidden_size/num_heads={self.hidden_size // self.num_heads} must be even for RoPE")
        if not self.use_dense:
            if not 1 <= self.top_k <= self.num_experts:
                raise ConfigError(f"top_k={self.top_k} must be between 1 and num_experts={self.num_experts}")
            if self.intermediate_size // self.top_k < 1:
                raise ConfigError(f"intermediate_size={self.intermediate_size} is too small for top_k={self.top_k}")

    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads or self.num_heads

    @property
    def max_horizon(self) -> int:
        return max(self.horizon_lengths)

    def moe_config(self) -> MoEConfig:
        """The MoE layer of one block, exactly as Time-MoE's TimeMoeSparseExpertsLayer."""
        return MoEConfig(
            hidden_size=self.hidden_size,
            num_experts=self.num_experts,
            top_k=self.top_k,
            expert_hidden=self.intermediate_size // self.top_k,
            score_func="softmax",
            norm_topk_prob=False,
            num_shared_experts=1,
            shared_expert_hidden=self.intermediate_size,
            shared_expert_gate=True,
            balance_loss="none",  # Time-MoE's balance loss spans all layers; computed in TimeMoE.loss
            kernel=self.kernel,
        )


PRESETS: dict[str, ForecasterConfig] = {
    "tiny": ForecasterConfig(hidden_size=64, intermediate_size=256, num_layers=4, num_heads=4),
    "base": ForecasterConfig(hidden_size=384, intermediate_size=1536, num_layers=12, num_heads=12),  # TimeMoE-50M
    "large": ForecasterConfig(hidden_size=768, intermediate_size=3072, num_layers=12, num_heads=12),  # TimeMoE-200M
}


def preset(name: str, overrides: list[str] | tuple[str, ...] = ()) -> ForecasterConfig:
    """A preset by name, with optional `key=value` overrides."""
    if name not in PRESETS:
        raise ConfigError(f"forecaster preset {name!r} is unknown: accepted presets are {', '.join(PRESETS)}")
    from ..config import apply_overrides

    return apply_overrides(replace(PRESETS[name]), list(overrides))


def dense_equivalent(cfg: ForecasterConfig) -> ForecasterConfig:
    """A dense model with the MoE's active FFN parameters (top_k experts of I/k plus the I-wide shared one)."""
    width = (cfg.intermediate_size // cfg.top_k) * cfg.top_k + cfg.intermediate_size
    return replace(cfg, use_dense=True, intermediate_size=width)


# ---------------------------------------------------------------- the model


class InputEmbedding(nn.Module):
    """silu(gate_layer(x)) * emb_layer(x): one token per time point, no bias."""

    def __init__(self, input_size: int, hidden_size: int) -> None:
        super().__init__()
        self.emb_layer = nn.Linear(input_size, hidden_size, bias=False)
        self.gate_layer = nn.Linear(input_size, hidden_size, bias=False)

    def forward(self, x_BTI: torch.Tensor) -> torch.Tensor:
        return F.silu(self.gate_layer(x_BTI)) * self.emb_layer(x_BTI)


class DenseFFN(nn.Module):
    """The dense baseline's FFN, returning no routing so blocks treat both kinds alike."""

    def __init__(self, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.mlp = SwiGLU(hidden_size, intermediate_size)

    def forward(self, x_BTD: torch.Tensor):
        return self.mlp(x_BTD), None


class Block(nn.Module):
    """Pre-norm decoder block: x + attn(norm(x)), then h + ffn(norm(h))."""

    def __init__(self, cfg: ForecasterConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg.hidden_size, cfg.num_heads, cfg.kv_heads, qkv_bias=True, o_bias=False)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        if cfg.use_dense:
            self.ffn_layer = DenseFFN(cfg.hidden_size, cfg.intermediate_size)
        else:
            from ..moe.layers import MoELayer

            self.ffn_layer = MoELayer(cfg.moe_config())

    def forward(self, x_BTD, cos, sin, kv_cache=None, layer_idx=0, start=0):
        h = x_BTD + self.self_attn(self.input_layernorm(x_BTD), cos, sin, kv_cache=kv_cache,
                                   layer_idx=layer_idx, cache_start=start)
        y, routing = self.ffn_layer(self.post_attention_layernorm(h))
        return h + y, routing


class TimeMoE(nn.Module):
    """The Time-MoE forecaster: embedding, decoder blocks, final norm, one linear head per horizon."""

    def __init__(self, cfg: ForecasterConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = InputEmbedding(cfg.input_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.heads = nn.ModuleList(
            nn.Linear(cfg.hidden_size, cfg.input_size * h, bias=False) for h in cfg.horizon_lengths
        )
        self.rotary = RotaryEmbedding(cfg.hidden_size // cfg.num_heads, cfg.rope_theta)
        self.reset_parameters()

    def reset_parameters(self, std: float = 0.02) -> None:
        """Time-MoE's init (linear weights N(0, 0.02), biases zero, norms one), except the input embedding."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, 0.0, std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)
        for name, p in self.named_parameters():
            if name.endswith(("w_in_EHD", "w_out_EDF")):
                nn.init.normal_(p, 0.0, std)
        # The embedding sees one scalar per token: at std 0.02, silu(a x) * b x ~ (a b / 2) x^2 loses the
        # sign of x and the first RMSNorm maps every token to the same vector, a plateau small models
        # take thousands of steps to leave. std 1 / sqrt(fan_in) keeps x's sign and scale from step 0.
        for layer in (self.embed.emb_layer, self.embed.gate_layer):
            nn.init.normal_(layer.weight, 0.0, self.cfg.input_size**-0.5)

    # -------------------------------------------------------- forward

    def forward(self, x_BT: torch.Tensor, kv_cache: KVCache | None = None, start: int = 0):
        """Final hidden states [B, T, D] and each MoE layer's raw router logits [B*T, E].

        `x_BT` is [B, T] (or [B, T, I]); with a cache, its tokens sit at positions start..start+T-1.
        """
        x_BTI = x_BT.unsqueeze(-1) if x_BT.dim() == 2 else x_BT
        if x_BTI.shape[-1] != self.cfg.input_size:
            raise DataError(f"expected {self.cfg.input_size} value(s) per time point, got {x_BTI.shape[-1]}")
        batch, t, _ = x_BTI.shape
        h = self.embed(x_BTI.to(self.embed.emb_layer.weight.dtype))
        positions = torch.arange(start, start + t, device=h.device).expand(batch, t)
        cos, sin = self.rotary(positions, dtype=h.dtype)
        logits = []
        for i, block in enumerate(self.layers):
            h, routing = block(h, cos, sin, kv_cache=kv_cache, layer_idx=i, start=start)
            if routing is not None:
                logits.append(routing.logits_TE)
        return self.norm(h), logits

    def head_for(self, remaining: int) -> int:
        """Index of the head Time-MoE uses when `remaining` steps are left (its exact rule)."""
        lengths = self.cfg.horizon_lengths
        chosen = lengths[0]
        for h in lengths[1:]:
            if h > remaining:
                break
            chosen = h
        return lengths.index(chosen)

    # -------------------------------------------------------- training

    def loss(self, x_BW: torch.Tensor, mask_BW: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, float]]:
        """Time-MoE's objective on windows of W points: inputs x[:, :-1], labels x[:, 1:].

        Every head predicts, from each position, the next h points; targets past
        the window end are masked. Loss = mean over heads of the masked Huber
        (delta 2) + aux_loss_factor x the load-balance loss over all layers.
        """
        inputs, labels = x_BW[:, :-1], x_BW[:, 1:]
        mask = torch.ones_like(labels) if mask_BW is None else mask_BW[:, 1:].to(labels.dtype)
        hidden, logits = self(inputs)
        losses = [self._head_loss(head(hidden), labels, mask, h)
                  for head, h in zip(self.heads, self.cfg.horizon_lengths)]
        ar = torch.stack(losses).mean()
        metrics = {"huber": float(ar.detach())}
        total = ar
        if logits:
            aux = time_moe_balance_loss(logits, self.cfg.top_k, self.cfg.num_experts)
            total = total + self.cfg.aux_loss_factor * aux
            metrics["balance"] = float(aux.detach())
        return total, metrics

    def _head_loss(self, pred_BTX, labels_BT, mask_BT, horizon):
        batch, t, _ = pred_BTX.shape
        pred = pred_BTX.view(batch, t, horizon, self.cfg.input_size)
        lab = labels_BT if labels_BT.dim() == 3 else labels_BT.unsqueeze(-1)
        msk = mask_BT if mask_BT.dim() == 3 else mask_BT.unsqueeze(-1)
        # [B, T, I] -> [B, I, T + h - 1] -> [B, I, T, h] -> [B, T, h, I]
        lab = F.pad(lab.transpose(1, 2), (0, horizon - 1)).unfold(-1, horizon, 1).permute(0, 2, 3, 1)
        msk = F.pad(msk.transpose(1, 2), (0, horizon - 1)).unfold(-1, horizon, 1).permute(0, 2, 3, 1)
        err = F.huber_loss(pred, lab, reduction="none", delta=self.cfg.huber_delta)
        return (err * msk).sum() / msk.sum().clamp_min(1.0)

    # -------------------------------------------------------- inference

    @torch.no_grad()
    def generate(self, context_BT: torch.Tensor, horizon: int) -> torch.Tensor:
        """Raw autoregressive forecast [B, horizon] (or [B, horizon, I]) of already-normalised contexts.

        Each step uses the largest head that fits the remaining horizon, appends
        its prediction, and feeds only the new points through the KV cache.
        """
        return self.generate_many(context_BT, [horizon])[horizon]

    @torch.no_grad()
    def generate_many(self, context_BT: torch.Tensor, horizons: list[int] | dict[int, int]) -> dict[int, torch.Tensor]:
        """Forecasts for several horizons from one prefill of the contexts.

        `horizons` is a list, or {horizon: n} to forecast that horizon for the first n rows only
        (evaluation windows near the end of a split fit the short horizons but not the long ones).
        """
        rows = dict(horizons) if isinstance(horizons, dict) else {h: None for h in horizons}
        for h in rows:
            if not isinstance(h, int) or isinstance(h, bool) or h < 1:
                raise DataError(f"horizon={h!r} is invalid: it must be a positive integer")
        squeeze = context_BT.dim() == 2
        x = context_BT.unsqueeze(-1) if squeeze else context_BT
        batch, t, _ = x.shape
        if t < 1:
            raise DataError("the context is empty: at least one time point is needed")
        p = next(self.parameters())
        x = x.to(device=p.device, dtype=p.dtype)
        cache = KVCache(batch, self.cfg.num_layers, self.cfg.kv_heads, t + max(rows),
                        self.cfg.hidden_size // self.cfg.num_heads, dtype=p.dtype, device=p.device)
        hidden, _ = self(x, kv_cache=cache, start=0)
        out = {}
        for h, n in rows.items():
            n = batch if n is None else min(n, batch)
            pred = self._continue(cache, hidden[:n, -1], t, h) if n > 0 else x.new_zeros(0, h, x.shape[-1])
            out[h] = pred.squeeze(-1) if squeeze else pred
        return out

    def _continue(self, cache: KVCache, last_BD: torch.Tensor, start: int, horizon: int) -> torch.Tensor:
        """Decode `horizon` points after a prefill of `start` points (cache rows 0..B-1)."""
        batch, n_in = last_BD.shape[0], self.cfg.input_size
        outputs, produced = [], 0
        while True:
            remaining = horizon - produced
            idx = self.head_for(remaining)
            steps = min(self.cfg.horizon_lengths[idx], remaining)
            pred = self.heads[idx](last_BD).view(batch, -1, n_in)[:, :steps]
            outputs.append(pred)
            produced += steps
            if produced >= horizon:
                return torch.cat(outputs, dim=1)
            hidden, _ = self(pred, kv_cache=cache, start=start)
            start += steps
            last_BD = hidden[:, -1]

    @torch.no_grad()
    def predict(self, context_BT: torch.Tensor, horizon: int, normalize: bool = True) -> torch.Tensor:
        """Forecast [B, horizon] from raw contexts [B, T], instance-normalising each context."""
        return self.predict_many(context_BT, [horizon], normalize)[horizon]

    @torch.no_grad()
    def predict_many(self, context_BT: torch.Tensor, horizons: list[int] | dict[int, int],
                     normalize: bool = True) -> dict[int, torch.Tensor]:
        """`generate_many` on raw univariate contexts [B, T], with instance normalisation by default."""
        x = context_BT.float()
        if not normalize:
            return {h: v.float() for h, v in self.generate_many(x, horizons).items()}
        mean = x.mean(dim=1, keepdim=True)
        std = x.std(dim=1, keepdim=True, unbiased=False).clamp_min(1e-5)
        out = self.generate_many((x - mean) / std, horizons)
        return {h: v.float() * std[: v.shape[0]] + mean[: v.shape[0]] for h, v in out.items()}


def time_moe_balance_loss(logits: list[torch.Tensor], top_k: int, num_experts: int) -> torch.Tensor:
    """Time-MoE's load-balance loss: the Switch loss over the router logits of all layers concatenated."""
    all_TE = torch.cat(logits, dim=0).float()
    probs = all_TE.softmax(dim=-1)
    _, chosen = torch.topk(probs, top_k, dim=-1)
    tokens_per_expert = F.one_hot(chosen, num_experts).float().mean(dim=0)  # [K, E]
    return (tokens_per_expert * probs.mean(dim=0).unsqueeze(0)).sum() * num_experts


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def active_parameters(model: TimeMoE) -> int:
    """Parameters used per time point: routed experts count top_k / num_experts of their weights."""
    total = count_parameters(model)
    cfg = model.cfg
    if cfg.use_dense:
        return total
    inactive = 0
    for name, p in model.named_parameters():
        if name.endswith(("w_in_EHD", "w_out_EDF")):
            inactive += p.numel() * (cfg.num_experts - cfg.top_k) // cfg.num_experts
    return total - inactive


def build(cfg: ForecasterConfig, device: str | torch.device | None = None) -> TimeMoE:
    """Build a model (on the meta device for parameter counting without memory)."""
    if device is None:
        return TimeMoE(cfg)
    with torch.device(device):
        return TimeMoE(cfg)


# ---------------------------------------------------------------- Hugging Face format


def config_from_hf(data: dict, where: str = "config.json") -> ForecasterConfig:
    """A ForecasterConfig from a Time-MoE config.json."""
    if data.get("model_type") != HF_MODEL_TYPE:
        raise CheckpointError(f"{where} has model_type={data.get('model_type')!r}; a Time-MoE checkpoint has "
                              f"model_type={HF_MODEL_TYPE!r}")
    act = data.get("hidden_act", "silu")
    if act != "silu":
        raise CheckpointError(f"{where} has hidden_act={act!r}; moekit's Time-MoE supports 'silu' (the published models)")
    horizons = data.get("horizon_lengths", [1])
    try:
        return ForecasterConfig(
            hidden_size=int(data["hidden_size"]),
            intermediate_size=int(data["intermediate_size"]),
            num_layers=int(data["num_hidden_layers"]),
            num_heads=int(data["num_attention_heads"]),
            num_kv_heads=int(data.get("num_key_value_heads") or data["num_attention_heads"]),
            num_experts=int(data.get("num_experts", 1)),
            top_k=int(data.get("num_experts_per_tok", 2)),
            use_dense=bool(data.get("use_dense", False)),
            horizon_lengths=[int(h) for h in ([horizons] if isinstance(horizons, int) else horizons)],
            input_size=int(data.get("input_size", 1)),
            rms_norm_eps=float(data.get("rms_norm_eps", 1e-6)),
            rope_theta=float(data.get("rope_theta", 10000)),
            aux_loss_factor=float(data.get("router_aux_loss_factor", 0.02)),
        )
    except KeyError as e:
        raise CheckpointError(f"{where} lacks the key {e.args[0]!r} that a Time-MoE config has") from None


def config_to_hf(cfg: ForecasterConfig) -> dict:
    """A Time-MoE config.json for this config (loadable by the reference implementation)."""
    return {
        "architectures": ["TimeMoeForPrediction"],
        "model_type": HF_MODEL_TYPE,
        "input_size": cfg.input_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "horizon_lengths": list(cfg.horizon_lengths),
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.kv_heads,
        "hidden_act": "silu",
        "num_experts_per_tok": cfg.top_k,
        "num_experts": cfg.num_experts,
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta,
        "use_dense": cfg.use_dense,
        "apply_aux_loss": not cfg.use_dense,
        "router_aux_loss_factor": cfg.aux_loss_factor,
        "torch_dtype": "float32",
    }


def state_from_hf(hf: dict[str, torch.Tensor], cfg: ForecasterConfig) -> dict[str, torch.Tensor]:
    """Rename (and stack experts of) a Time-MoE state dict into moekit's layout."""
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()

    def take(key: str) -> torch.Tensor:
        if key not in hf:
            raise CheckpointError(f"the checkpoint lacks the tensor {key!r} that this Time-MoE config needs")
        used.add(key)
        return hf[key]

    out["embed.emb_layer.weight"] = take("model.embed_layer.emb_layer.weight")
    out["embed.gate_layer.weight"] = take("model.embed_layer.gate_layer.weight")
    out["norm.weight"] = take("model.norm.weight")
    for j in range(len(cfg.horizon_lengths)):
        out[f"heads.{j}.weight"] = take(f"lm_heads.{j}.out_layer.weight")
    for i in range(cfg.num_layers):
        src, dst = f"model.layers.{i}.", f"layers.{i}."
        for name in ("input_layernorm.weight", "post_attention_layernorm.weight", "self_attn.o_proj.weight"):
            out[dst + name] = take(src + name)
        for proj in ("q_proj", "k_proj", "v_proj"):
            for kind in ("weight", "bias"):
                out[f"{dst}self_attn.{proj}.{kind}"] = take(f"{src}self_attn.{proj}.{kind}")
        ffn = src + "ffn_layer."
        if cfg.use_dense:
            for proj in ("gate_proj", "up_proj", "down_proj"):
                out[f"{dst}ffn_layer.mlp.{proj}.weight"] = take(f"{ffn}{proj}.weight")
            continue
        experts = range(cfg.num_experts)
        out[dst + "ffn_layer.router.gate.weight"] = take(ffn + "gate.weight")
        out[dst + "ffn_layer.experts.w_in_EHD"] = torch.stack([
            torch.cat([take(f"{ffn}experts.{e}.gate_proj.weight"), take(f"{ffn}experts.{e}.up_proj.weight")])
            for e in experts
        ])
        out[dst + "ffn_layer.experts.w_out_EDF"] = torch.stack([take(f"{ffn}experts.{e}.down_proj.weight") for e in experts])
        for proj in ("gate_proj", "up_proj", "down_proj"):
            out[f"{dst}ffn_layer.shared.{proj}.weight"] = take(f"{ffn}shared_expert.{proj}.weight")
        out[dst + "ffn_layer.shared_gate.weight"] = take(ffn + "shared_expert_gate.weight")
    extra = sorted(k for k in set(hf) - used if "rotary_emb" not in k)
    if extra:
        raise CheckpointError(f"the checkpoint has {len(extra)} tensor(s) this Time-MoE config does not use, "
                              f"e.g. {extra[0]!r}: its config.json does not match its weights")
    return out


def state_to_hf(state: dict[str, torch.Tensor], cfg: ForecasterConfig) -> dict[str, torch.Tensor]:
    """moekit's state dict in Time-MoE's names (the inverse of `state_from_hf`)."""
    out = {
        "model.embed_layer.emb_layer.weight": state["embed.emb_layer.weight"],
        "model.embed_layer.gate_layer.weight": state["embed.gate_layer.weight"],
        "model.norm.weight": state["norm.weight"],
    }
    for j in range(len(cfg.horizon_lengths)):
        out[f"lm_heads.{j}.out_layer.weight"] = state[f"heads.{j}.weight"]
    for i in range(cfg.num_layers):
        src, dst = f"layers.{i}.", f"model.layers.{i}."
        for key, value in state.items():
            if key.startswith(src) and (".self_attn." in key or "layernorm" in key):
                out[dst + key[len(src):]] = value
        ffn = dst + "ffn_layer."
        if cfg.use_dense:
            for proj in ("gate_proj", "up_proj", "down_proj"):
                out[f"{ffn}{proj}.weight"] = state[f"{src}ffn_layer.mlp.{proj}.weight"]
            continue
        out[ffn + "gate.weight"] = state[src + "ffn_layer.router.gate.weight"]
        w_in, w_out = state[src + "ffn_layer.experts.w_in_EHD"], state[src + "ffn_layer.experts.w_out_EDF"]
        half = w_in.shape[1] // 2
        for e in range(cfg.num_experts):
            out[f"{ffn}experts.{e}.gate_proj.weight"] = w_in[e, :half]
            out[f"{ffn}experts.{e}.up_proj.weight"] = w_in[e, half:]
            out[f"{ffn}experts.{e}.down_proj.weight"] = w_out[e]
        for proj in ("gate_proj", "up_proj", "down_proj"):
            out[f"{ffn}shared_expert.{proj}.weight"] = state[f"{src}ffn_layer.shared.{proj}.weight"]
        out[ffn + "shared_expert_gate.weight"] = state[src + "ffn_layer.shared_gate.weight"]
    return {k: v.detach().contiguous().clone() for k, v in out.items()}


def is_hf_dir(path: str | Path) -> bool:
    return _hf_model_type(path) == HF_MODEL_TYPE


def _hf_model_type(path: str | Path) -> str | None:
    """The model_type of a Hugging Face directory's config.json (None if it has none)."""
    p = Path(path) / "config.json"
    if not p.is_file():
        return None
    try:
        data = json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    value = data.get("model_type") if isinstance(data, dict) else None
    return value if isinstance(value, str) and value != MODEL_TYPE else None


def load_hf(path: str | Path, dtype: torch.dtype = torch.float32) -> TimeMoE:
    """Load a Time-MoE checkpoint in its Hugging Face format (config.json + *.safetensors)."""
    from safetensors.torch import load_file

    d = Path(path)
    cfg_path = d / "config.json"
    if not cfg_path.is_file():
        raise CheckpointError(f"{d} has no config.json: a Time-MoE Hugging Face directory holds config.json + model.safetensors")
    try:
        data = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{cfg_path} is not valid JSON: {e}") from None
    cfg = config_from_hf(data, str(cfg_path))
    files = sorted(d.glob("*.safetensors"))
    if not files:
        pickles = [f.name for f in d.glob("*.bin")] + [f.name for f in d.glob("*.pt")]
        hint = f" (found {', '.join(pickles)}: pickled weights are refused; convert them to safetensors)" if pickles else ""
        raise CheckpointError(f"{d} has no *.safetensors weights{hint}")
    hf: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            hf.update(load_file(str(f)))
        except Exception as e:  # safetensors raises its own error types for truncated files
            raise CheckpointError(f"{f} is not a readable safetensors file: {e}") from None
    model = TimeMoE(cfg)
    model.load_state_dict(state_from_hf(hf, cfg), strict=True)
    return model.to(dtype).eval()


def save_hf(model: TimeMoE, path: str | Path) -> Path:
    """Write the model as a Time-MoE Hugging Face directory (config.json + model.safetensors)."""
    from safetensors.torch import save_file

    d = Path(path)
    d.mkdir(parents=True, exist_ok=True)
    save_file(state_to_hf(model.state_dict(), model.cfg), str(d / "model.safetensors"), metadata={"format": "pt"})
    (d / "config.json").write_text(json.dumps(config_to_hf(model.cfg), indent=2) + "\n")
    return d


# ---------------------------------------------------------------- moekit checkpoints


def checkpoint_config(cfg: ForecasterConfig, **extra) -> dict:
    """The config dict saved beside a forecaster checkpoint (marks it as a forecaster)."""
    return {"model_type": MODEL_TYPE, "forecaster": to_dict(cfg), **extra}


def load_forecaster(path: str | Path) -> TimeMoE:
    """A forecaster from a moekit checkpoint (a run or checkpoint directory) or a Time-MoE HF directory."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"model path {p} does not exist")
    if is_hf_dir(p):
        return load_hf(p)
    hf_type = _hf_model_type(p)
    if hf_type is not None:
        raise CheckpointError(
            f"{p} is a Hugging Face {hf_type!r} checkpoint, not a forecaster: expected a Time-MoE directory "
            f"(config.json with model_type 'time_moe') or the output of `moekit train-forecaster`"
        )
    from ..checkpoints import load_checkpoint, load_model_state

    ckpt = load_checkpoint(p)
    config = ckpt.config or {}
    if config.get("model_type") != MODEL_TYPE or "forecaster" not in config:
        kind = config.get("model_type") or ("a moekit language model" if "model" in config else "an unknown model")
        raise CheckpointError(
            f"{p} is not a forecaster checkpoint (it holds {kind}); expected the output of "
            f"`moekit train-forecaster` or a Time-MoE Hugging Face directory (config.json with model_type 'time_moe')"
        )
    cfg = from_dict(ForecasterConfig, config["forecaster"], "forecaster config")
    model = TimeMoE(cfg)
    load_model_state(model, ckpt.model_state)
    return model.eval()


# ---------------------------------------------------------------- training and fine-tuning


def default_train_config(fine_tune: bool = False) -> TrainConfig:
    """Time-MoE's optimiser (AdamW, wd 0.1, betas 0.9/0.95, warmup + cosine) at CPU scale.

    From scratch lr 5e-3 (what the tiny model needs to learn in minutes); fine-tuning lr 1e-4.
    """
    return TrainConfig(steps=300, batch_size=16, seq_len=512, lr=1e-4 if fine_tune else 5e-3, min_lr_ratio=0.05,
                       warmup_steps=15, weight_decay=0.1, grad_clip=1.0, eval_every=100, eval_batches=4,
                       save_every=100)


def normalise_windows(x_BW: np.ndarray) -> np.ndarray:
    """Zero mean, unit variance per window (Time-MoE normalises every training sequence)."""
    mean = x_BW.mean(axis=1, keepdims=True)
    std = x_BW.std(axis=1, keepdims=True)
    return ((x_BW - mean) / np.maximum(std, 1e-5)).astype(np.float32)


def train_forecaster(csvs: list[str | Path], out: str | Path, preset_name: str = "tiny",
                     overrides: list[str] | tuple[str, ...] = (), init: str | Path | None = None,
                     resume: bool = False, progress: bool = True, train_cfg=None) -> dict:
    """Pre-train (or, with `init`, fine-tune) a forecaster on the train splits of CSVs.

    Overrides address the model (`model.hidden_size=96`) and the trainer
    (`train.steps=500`, `train.seq_len=256`). Windows of seq_len + 1 points are
    drawn from every channel of every CSV (by size), each normalised, as a pure
    function of the step; the validation loss uses the CSVs' validation splits.
    """
    import time

    from ..config import apply_overrides
    from ..data.timeseries import TimeSeriesMixture, load_training_mixture
    from ..train.loop import fit

    run = Path(out)
    if resume:
        cfg_model, tcfg, dcfg, csvs = _saved_run(run)
        base = None
    else:
        base = load_forecaster(init) if init is not None else None
        cfg_model = base.cfg if base is not None else preset(preset_name)
        tcfg0 = train_cfg or default_train_config(fine_tune=base is not None)
        run_cfg = apply_overrides(_RunOverrides(cfg_model, tcfg0, ForecastDataConfig()),
                                  list(overrides))
        cfg_model, tcfg, dcfg = run_cfg.model, run_cfg.train, run_cfg.data
        if base is not None and replace(cfg_model, kernel=base.cfg.kernel) != base.cfg:
            changed = [k for k, v in to_dict(cfg_model).items() if k != "kernel" and v != getattr(base.cfg, k)]
            raise ConfigError(f"fine-tuning keeps the --init model's architecture: drop the override(s) of "
                              f"{', '.join('model.' + k for k in changed)}")
    mixture, prepared = load_training_mixture(list(csvs), tcfg.seq_len + 1, seed=tcfg.seed, mixture=dcfg.mixture)
    model = TimeMoE(cfg_model)
    if base is not None:
        model.load_state_dict(base.state_dict())

    def batch_fn(step: int) -> torch.Tensor:
        return torch.from_numpy(normalise_windows(mixture.batch(step, tcfg.batch_size)))

    def loss_fn(m, batch):
        return m.loss(batch)

    eval_fn = None
    val_parts = [p.part("val") for p in prepared]
    if all(v.shape[0] >= tcfg.seq_len + 1 for v in val_parts):
        val = TimeSeriesMixture(val_parts, [p.series.name for p in prepared], tcfg.seq_len + 1, seed=tcfg.seed + 1)
        val_batches = [torch.from_numpy(normalise_windows(val.batch(i, tcfg.batch_size))) for i in range(tcfg.eval_batches)]

        def eval_fn(m, step):
            losses = [m.loss(b)[1]["huber"] for b in val_batches]
            return {"val_huber": float(np.mean(losses))}

    config_dict = checkpoint_config(cfg_model, train=to_dict(tcfg),
                                    data={"csvs": [str(Path(c).resolve()) for c in csvs], **to_dict(dcfg)},
                                    init=str(init) if init is not None else None)
    start = time.perf_counter()
    result = fit(model, tcfg, batch_fn=batch_fn, loss_fn=loss_fn, eval_fn=eval_fn, run_dir=run,
                 config_dict=config_dict, resume=resume, progress=progress,
                 tokens_per_batch=tcfg.batch_size * tcfg.seq_len)
    return {"result": result, "model": model.eval(), "seconds": time.perf_counter() - start,
            "parameters": count_parameters(model), "active_parameters": active_parameters(model),
            "datasets": [p.series.name for p in prepared], "points": mixture.num_points}


@dataclass
class ForecastDataConfig:
    """How train-forecaster draws its windows."""

    mixture: str = "size"  # size: series weighted by their points; equal: each CSV alike


@dataclass
class _RunOverrides:
    """What `key=value` overrides of train-forecaster address: the model, the trainer, the data."""

    model: ForecasterConfig
    train: TrainConfig
    data: ForecastDataConfig


def _saved_run(run: Path):
    from ..checkpoints import load_checkpoint
    from ..train.loop import train_config_from

    ckpt = load_checkpoint(run)
    config = ckpt.config
    if config.get("model_type") != MODEL_TYPE:
        raise CheckpointError(f"{run} is not a forecaster run, so --resume cannot continue it")
    cfg = from_dict(ForecasterConfig, config["forecaster"], "forecaster config")
    data = dict(config["data"])
    csvs = data.pop("csvs")
    return cfg, train_config_from(config["train"]), from_dict(ForecastDataConfig, data, "data config"), csvs


# ---------------------------------------------------------------- forecasting a CSV


@dataclass
class CsvForecast:
    """What `forecast_csv` produced."""

    channels: list[str]
    timestamps: list[str]
    values_HC: np.ndarray
    context: int
    out: Path | None
    plot: Path | None


def forecast_csv(model_path: str | Path, csv_path: str | Path, horizon: int, context: int | None = None,
                 out: str | Path | None = None, plot: str | Path | None = None) -> CsvForecast:
    """Forecast every numeric channel `horizon` steps past the end of a CSV.

    Each channel's last `context` points (default: up to 512, at most the
    series length minus the horizon) are instance-normalised, forecast, and
    de-normalised. Writes a CSV with timestamps continued at the file's
    frequency and, with `plot`, a PNG of history and forecast.
    """
    from ..data.timeseries import check_length, read_csv

    if not isinstance(horizon, int) or horizon < 1:
        raise DataError(f"--horizon {horizon} is invalid: it must be a positive integer")
    if context is not None and context < 1:
        raise DataError(f"--context {context} is invalid: it must be a positive integer")
    series = read_csv(csv_path)
    if context is None:
        context = max(1, min(512, series.length - horizon))
    check_length(series.length, context, horizon, f"{Path(csv_path).name}")
    model = load_forecaster(model_path)
    history_CL = torch.from_numpy(series.values_TC[-context:].T.copy())
    values_HC = model.predict(history_CL, horizon).numpy().T
    stamps = series.future_timestamps(horizon)
    result = CsvForecast(series.channels, stamps, values_HC, context, None, None)
    if out is not None:
        result.out = _write_forecast(Path(out), series.date_column or "step", series.channels, stamps, values_HC)
    if plot is not None:
        result.plot = plot_forecast(Path(plot), series, stamps, values_HC, context)
    return result


def _write_forecast(path: Path, date_name: str, channels: list[str], stamps: list[str], values_HC) -> Path:
    import csv

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow([date_name, *channels])
        for stamp, row in zip(stamps, values_HC):
            w.writerow([stamp, *(f"{v:.6g}" for v in row)])
    tmp.replace(path)
    return path


def plot_forecast(path: Path, series, stamps: list[str], values_HC: np.ndarray, context: int) -> Path:
    """One panel per channel: the recent history and the forecast after it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    horizon = values_HC.shape[0]
    shown = min(series.length, max(context, 2 * horizon))
    channels = series.channels
    fig, axes = plt.subplots(len(channels), 1, figsize=(10, 1.8 * len(channels) + 0.6), sharex=True, squeeze=False)
    hist_x = np.arange(-shown, 0)
    fut_x = np.arange(0, horizon)
    for c, ax in enumerate(axes[:, 0]):
        ax.plot(hist_x, series.values_TC[-shown:, c], color="0.3", lw=0.9, label="history")
        ax.plot(fut_x, values_HC[:, c], color="tab:red", lw=1.2, label="forecast")
        ax.axvline(0, color="0.6", lw=0.6, ls="--")
        ax.set_ylabel(channels[c], fontsize=8)
    axes[0, 0].legend(loc="upper left", fontsize=8)
    axes[0, 0].set_title(f"{series.name}: {horizon}-step forecast from {stamps[0]} (context {context})", fontsize=9)
    axes[-1, 0].set_xlabel("steps relative to the end of the file")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
