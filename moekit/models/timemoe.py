"""Time-MoE: a decoder-only Mixture-of-Experts time-series forecaster (Shi et al., ICLR 2025).

Holds `ForecasterConfig` and its presets (`tiny`, `base` = TimeMoE-50M,
`large` = TimeMoE-200M), the model `TimeMoE` (one token per time point, a
bias-free SwiGLU embedding, pre-norm decoder blocks whose FFN is moekit's
`MoELayer` of 8 experts top-2 plus a sigmoid-gated shared expert, and
multi-resolution output heads), its training loss (Huber over every head +
0.02 x the all-layer load-balance loss), autoregressive multi-head inference
with a KV cache, parameter counts, and the moekit checkpoint format of a
forecaster (`checkpoint_config`, `load_moekit_forecaster`).

Not here: the Hugging Face format and `load_forecaster`, which accepts either
format (`moekit.hf.timemoe`); the training recipe and its optimiser settings
(`moekit.train.forecaster`); forecasting a CSV and plotting
(`moekit.infer.forecast`); the evaluation harness and baselines
(`moekit.infer.forecast_eval`); data handling (`moekit.data.timeseries`).
Nothing here imports moekit.train.

Shape suffixes: B batch, T time points (tokens), D hidden, E experts, L layers,
H forecast horizon, I input size (values per time point, 1 for the published models).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..config import MoEConfig, _check_int, field_list, from_dict, to_dict
from ..errors import CheckpointError, ConfigError, DataError
from ..modules import Attention, KVCache, RMSNorm, RotaryEmbedding, SwiGLU

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
    kernel: str = "auto"  # expert kernel, see moekit.moe.experts

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


# ---------------------------------------------------------------- moekit checkpoints


def checkpoint_config(cfg: ForecasterConfig, **extra) -> dict:
    """The config dict saved beside a forecaster checkpoint (marks it as a forecaster)."""
    return {"model_type": MODEL_TYPE, "forecaster": to_dict(cfg), **extra}


def load_moekit_forecaster(path: str | Path) -> TimeMoE:
    """A forecaster from a moekit run or checkpoint directory (the output of `moekit train-forecaster`)."""
    from ..checkpoints import load_checkpoint, load_model_state

    p = Path(path)
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
