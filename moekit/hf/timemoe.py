"""Time-MoE's Hugging Face format: config.json + safetensors in, and out.

Holds the config and state-dict translation between a published Time-MoE
checkpoint (`model_type: time_moe`, the reference `TimeMoeForPrediction`
names, one tensor per expert) and moekit's `TimeMoE` (stacked experts),
`load_hf` / `save_hf`, and `load_forecaster`, which accepts either a Time-MoE
Hugging Face directory or a moekit forecaster checkpoint.

Not here: the model and its moekit checkpoint format (`moekit.models.timemoe`),
the language-model Hugging Face families (`moekit.hf.families`), training
(`moekit.train.forecaster`), forecasting CSVs (`moekit.infer.forecast`).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..errors import CheckpointError
from ..fileio import read_json
from ..models.timemoe import HF_MODEL_TYPE, MODEL_TYPE, ForecasterConfig, TimeMoE, load_moekit_forecaster

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
    data = read_json(cfg_path, CheckpointError,
                     missing=f"{d} has no config.json: a Time-MoE Hugging Face directory holds config.json + model.safetensors")
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

    from ..fileio import honour_umask

    d = Path(path)
    d.mkdir(parents=True, exist_ok=True)
    save_file(state_to_hf(model.state_dict(), model.cfg), str(d / "model.safetensors"), metadata={"format": "pt"})
    honour_umask(d / "model.safetensors")  # safetensors writes 0600
    (d / "config.json").write_text(json.dumps(config_to_hf(model.cfg), indent=2) + "\n")
    return d


SHIPPED_DIR = Path(__file__).resolve().parent.parent / "pretrained" / "timemoe"  # the default forecaster


def forecaster_dir(path: str | Path | None) -> Path:
    """The directory a forecaster path names: None is the forecaster that ships with moekit (`SHIPPED_DIR`)."""
    return SHIPPED_DIR if path is None else Path(path)


def load_forecaster(path: str | Path | None = None) -> TimeMoE:
    """A forecaster from a moekit checkpoint (a run or checkpoint directory) or a Time-MoE HF directory.

    None: the forecaster that ships with moekit (`SHIPPED_DIR`, Time-MoE's layout).
    """
    if path is None:
        if not (SHIPPED_DIR / "model.safetensors").is_file():
            raise CheckpointError(f"the forecaster that ships with moekit is missing from this install ({SHIPPED_DIR}); "
                                  f"reinstall moekit, or pass --model DIR")
        return load_hf(SHIPPED_DIR)
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
    return load_moekit_forecaster(p)
