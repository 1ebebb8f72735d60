"""Hugging Face checkpoints in and out: Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE.

`load(path)` reads a Hugging Face model directory (config.json, one
model.safetensors or shards named by model.safetensors.index.json) into a
`DecoderLM`: the config maps onto `ModelConfig` / `MoEConfig`, the model is
built on the meta device and allocated once in the target dtype and device,
and each tensor is copied in straight from the memory-mapped file (expert
tensors into their stacked `[E, ...]` slots), so the weights are never held
twice. `save(model, out_dir, arch=...)` writes a DecoderLM in the layout of a
family it fits, as transformers itself writes it (per-expert tensors), so
`transformers.AutoModelForCausalLM.from_pretrained(out_dir)` gives the same
logits; a model that fits no family gets an error naming the feature.

Each family is only a table of names and config keys; the MoE math is the
foundation's (TopKRouter, Experts, shared expert with sigmoid gate).

Also here: the tokenizer, chat template and stop ids stored beside a
Hugging Face model. Not here: generation (moekit.infer), moekit's own
checkpoint format (moekit.checkpoints).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import Any

import torch

from ..config import MoEConfig
from ..models.decoder import DecoderLM, ModelConfig
from ..errors import CheckpointError, ConfigError, MoekitError
from ..modules import RotaryEmbedding

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
CONFIG_FILE = "config.json"
PICKLE_FILES = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.pt", "model.bin")
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16, "half": torch.float16}
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)  # buffers some older checkpoints stored


@dataclass(frozen=True)
class Family:
    """How one Hugging Face MoE family names its config keys and tensors."""

    model_type: str
    architecture: str
    moe_module: str  # the MoE block's name inside a layer
    expert_names: tuple[str, str, str]  # gate, up, down projections of one expert
    qk_norm: str  # none | head | full
    shared_expert: bool  # Qwen2-MoE: one shared expert behind a sigmoid gate
    dense_layers: bool  # mlp_only_layers / decoder_sparse_step exist
    expert_width_key: str
    bias_key: str | None  # the config key for q/k/v biases; None: never biased


FAMILIES = {
    "mixtral": Family("mixtral", "MixtralForCausalLM", "block_sparse_moe", ("w1", "w3", "w2"), "none", False, False,
                      "intermediate_size", None),
    "qwen2_moe": Family("qwen2_moe", "Qwen2MoeForCausalLM", "mlp", ("gate_proj", "up_proj", "down_proj"), "none", True, True,
                        "moe_intermediate_size", "qkv_bias"),
    "qwen3_moe": Family("qwen3_moe", "Qwen3MoeForCausalLM", "mlp", ("gate_proj", "up_proj", "down_proj"), "head", False, True,
                        "moe_intermediate_size", "attention_bias"),
    "olmoe": Family("olmoe", "OlmoeForCausalLM", "mlp", ("gate_proj", "up_proj", "down_proj"), "full", False, False,
                    "intermediate_size", "attention_bias"),
}
SUPPORTED_MODEL_TYPES = tuple(FAMILIES)


class UnsupportedModelError(MoekitError):
    """A Hugging Face model (or a moekit model for export) that no supported family describes."""


# ---------------------------------------------------------------- config: Hugging Face -> moekit


def is_hf_dir(path: str | Path) -> bool:
    """A directory with a config.json that names a `model_type` (moekit's own config.json has 'model')."""
    p = Path(path) / CONFIG_FILE
    if not p.is_file():
        return False
    try:
        data = json.loads(p.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return isinstance(data, dict) and "model_type" in data


def read_config(path: str | Path) -> dict:
    d = Path(path)
    if not d.is_dir():
        raise CheckpointError(f"model directory {d} does not exist")
    p = d / CONFIG_FILE
    if not p.is_file():
        raise CheckpointError(f"{d} has no {CONFIG_FILE}: a Hugging Face model directory needs one")
    try:
        data = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{p} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{p} must hold a JSON object")
    return data


def family_of(hf: dict, where: str = CONFIG_FILE) -> Family:
    model_type = hf.get("model_type")
    if model_type not in FAMILIES:
        raise UnsupportedModelError(
            f"{where}: model_type={model_type!r} is not supported; supported model types are {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    return FAMILIES[model_type]


def model_config_from_hf(hf: dict, where: str = CONFIG_FILE) -> ModelConfig:
    """The ModelConfig (and MoEConfig) of a supported Hugging Face config dict."""
    fam = family_of(hf, where)

    def need(key: str, *alternatives: str) -> Any:
        for k in (key, *alternatives):
            if hf.get(k) is not None:
                return hf[k]
        raise CheckpointError(f"{where} lacks {key!r}, which a {fam.model_type} config needs")

    def unsupported(what: str) -> UnsupportedModelError:
        return UnsupportedModelError(f"{where}: {what} is not supported by moekit's {fam.model_type} loader")

    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise unsupported(f"hidden_act={act!r} (only 'silu', i.e. SwiGLU experts)")
    if hf.get("clip_qkv") is not None:
        raise unsupported(f"clip_qkv={hf['clip_qkv']}")
    qkv_bias = bool(hf.get(fam.bias_key, fam.model_type == "qwen2_moe")) if fam.bias_key else False
    if fam.bias_key == "attention_bias" and qkv_bias:
        raise unsupported("attention_bias=true (a bias on o_proj)")
    num_heads = int(need("num_attention_heads"))
    hidden = int(need("hidden_size"))
    head_dim = hf.get("head_dim") or 0
    if fam.qk_norm == "full" and head_dim not in (0, hidden // num_heads):
        raise unsupported(f"head_dim={head_dim} != hidden_size / num_attention_heads")
    num_experts = int(need("num_experts", "num_local_experts"))
    dense_layers, freq = [], 1
    if fam.dense_layers:
        dense_layers = [int(i) for i in (hf.get("mlp_only_layers") or [])]
        freq = int(hf.get("decoder_sparse_step") or 1)
    moe = MoEConfig(
        hidden_size=hidden,
        num_experts=num_experts,
        top_k=int(need("num_experts_per_tok")),
        expert_hidden=int(need(fam.expert_width_key)),
        norm_topk_prob=True if fam.model_type == "mixtral" else bool(hf.get("norm_topk_prob", False)),
        num_shared_experts=1 if fam.shared_expert else 0,
        shared_expert_hidden=int(need("shared_expert_intermediate_size")) if fam.shared_expert else 0,
        shared_expert_gate=fam.shared_expert,
    )
    max_len = int(hf.get("max_position_embeddings") or 4096)
    window = _sliding_window(hf, fam)
    if window is not None:
        # Within its window sliding attention equals full attention; beyond it moekit would differ, so stop there.
        max_len = min(max_len, window)
    return ModelConfig(
        vocab_size=int(need("vocab_size")),
        hidden_size=hidden,
        num_layers=int(need("num_hidden_layers")),
        num_heads=num_heads,
        num_kv_heads=int(hf.get("num_key_value_heads") or num_heads),
        head_dim=int(head_dim),
        max_seq_len=max_len,
        rope_theta=_rope_theta(hf, where, fam),
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        qkv_bias=qkv_bias,
        qk_norm=fam.qk_norm,
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        ffn="moe",
        dense_hidden=int(hf.get("intermediate_size") or moe.expert_hidden),
        dense_layers=dense_layers,
        moe_layer_freq=freq,
        moe=moe,
    )


def _rope_theta(hf: dict, where: str, fam: Family) -> float:
    params = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    kind = params.get("rope_type", params.get("type", "default"))
    if kind not in ("default", None):
        raise UnsupportedModelError(f"{where}: rope_type={kind!r} is not supported by moekit's {fam.model_type} loader (only 'default')")
    theta = params.get("rope_theta", hf.get("rope_theta"))
    return float(theta if theta is not None else 10000.0)


def _sliding_window(hf: dict, fam: Family) -> int | None:
    window = hf.get("sliding_window")
    if not window:
        return None
    if fam.model_type in ("qwen2_moe", "qwen3_moe") and not hf.get("use_sliding_window", False):
        return None
    return int(window)


# ---------------------------------------------------------------- weight names


def _expected_names(cfg: ModelConfig, fam: Family, fused: bool) -> dict[str, tuple[str, tuple]]:
    """Hugging Face tensor name -> (moekit parameter name, index into that parameter; () = all of it)."""
    names: dict[str, tuple[str, tuple]] = {"model.embed_tokens.weight": ("embed_tokens.weight", ()), "model.norm.weight": ("norm.weight", ())}
    if not cfg.tie_embeddings:
        names["lm_head.weight"] = ("lm_head.weight", ())
    attn = ["q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight"]
    if cfg.qkv_bias:
        attn += ["q_proj.bias", "k_proj.bias", "v_proj.bias"]
    if cfg.qk_norm != "none":
        attn += ["q_norm.weight", "k_norm.weight"]
    for i in range(cfg.num_layers):
        hp, mp = f"model.layers.{i}.", f"layers.{i}."
        for n in ("input_layernorm.weight", "post_attention_layernorm.weight", *(f"self_attn.{a}" for a in attn)):
            names[hp + n] = (mp + n, ())
        if not cfg.is_moe_layer(i):
            for p in ("gate_proj", "up_proj", "down_proj"):
                names[f"{hp}mlp.{p}.weight"] = (f"{mp}mlp.{p}.weight", ())
            continue
        moe, hm = cfg.moe_for_layer(i), f"{hp}{fam.moe_module}."
        names[hm + "gate.weight"] = (mp + "mlp.router.gate.weight", ())
        w_in, w_out, F = mp + "mlp.experts.w_in_EHD", mp + "mlp.experts.w_out_EDF", moe.expert_hidden
        if fused:
            names[hm + "experts.gate_up_proj"] = (w_in, ())
            names[hm + "experts.down_proj"] = (w_out, ())
        else:
            gate, up, down = fam.expert_names
            for e in range(moe.num_experts):
                names[f"{hm}experts.{e}.{gate}.weight"] = (w_in, (e, slice(0, F)))
                names[f"{hm}experts.{e}.{up}.weight"] = (w_in, (e, slice(F, 2 * F)))
                names[f"{hm}experts.{e}.{down}.weight"] = (w_out, (e,))
        if fam.shared_expert:
            for p in ("gate_proj", "up_proj", "down_proj"):
                names[f"{hm}shared_expert.{p}.weight"] = (f"{mp}mlp.shared.{p}.weight", ())
            names[hm + "shared_expert_gate.weight"] = (mp + "mlp.shared_gate.weight", ())
    return names


# ---------------------------------------------------------------- loading


def weight_files(path: str | Path) -> dict[str, Path]:
    """Tensor name -> the safetensors file holding it (single file or the shards of an index)."""
    d = Path(path)
    index = d / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index} is not a valid safetensors index (it needs a 'weight_map'): {e}") from None
        files = {name: d / shard for name, shard in weight_map.items()}
        missing = sorted({str(p.name) for p in files.values() if not p.is_file()})
        if missing:
            raise CheckpointError(f"{d}: shard(s) {', '.join(missing)} named in {INDEX_FILE} are missing")
        return files
    single = d / SINGLE_FILE
    if single.is_file():
        from safetensors import safe_open

        try:
            with safe_open(str(single), framework="pt") as f:
                return {name: single for name in f.keys()}
        except Exception as e:  # the Rust binding raises a bare SafetensorError
            raise CheckpointError(f"{single} is not a readable safetensors file (truncated or corrupt?): {e}") from None
    pickles = [n for n in PICKLE_FILES if (d / n).exists()]
    if pickles:
        raise CheckpointError(f"{d} holds only pickle weights ({', '.join(pickles)}); moekit refuses pickles: convert them to safetensors")
    raise CheckpointError(f"{d} has no {SINGLE_FILE} and no {INDEX_FILE}")


def resolve_dtype(dtype: str | torch.dtype | None, hf: dict | None = None) -> torch.dtype:
    """A torch dtype from a name; None = float32, "auto" = the dtype config.json records."""
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        if dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ConfigError(f"dtype={dtype} is not supported: use float32, bfloat16 or float16")
        return dtype
    if dtype == "auto":
        stored = (hf or {}).get("dtype") or (hf or {}).get("torch_dtype") or "float32"
        return DTYPES.get(str(stored), torch.float32)
    if dtype not in DTYPES:
        raise ConfigError(f"dtype={dtype!r} is unknown: accepted values are float32, bfloat16, float16, auto")
    return DTYPES[dtype]


def resolve_device(device: str | torch.device | None) -> torch.device:
    """A torch device from a name; None = cpu. An unavailable or malformed device is a ConfigError."""
    try:
        dev = torch.device(device or "cpu")
    except RuntimeError as e:
        raise ConfigError(f"device={device!r} is invalid: {e}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={device!r} was asked for but CUDA is not available on this machine: use cpu")
    if dev.type not in ("cpu", "cuda"):
        raise ConfigError(f"device={device!r} is not supported: use cpu or cuda")
    return dev


@torch.no_grad()
def load(path: str | Path, dtype: str | torch.dtype | None = None, device: str | torch.device | None = None,
         kernel: str = "auto") -> DecoderLM:
    """A Hugging Face MoE model directory as an eval-mode DecoderLM (float32 on CPU unless told otherwise)."""
    d = Path(path)
    hf = read_config(d)
    cfg = model_config_from_hf(hf, f"{d.name}/{CONFIG_FILE}")
    if kernel != "auto":
        cfg = replace(cfg, moe=replace(cfg.moe, kernel=kernel))
    torch_dtype = resolve_dtype(dtype, hf)
    device = resolve_device(device)
    files = weight_files(d)
    fam = family_of(hf)
    fused = any(n.endswith("experts.gate_up_proj") for n in files)
    plan = _expected_names(cfg, fam, fused)
    ignored = {n for n in files if n.endswith(IGNORED_SUFFIXES) or (cfg.tie_embeddings and n == "lm_head.weight")}
    _check_names(plan, set(files) - ignored, d)

    model = _empty_model(cfg, torch_dtype, device)
    params = dict(model.named_parameters(remove_duplicate=False))
    by_file: dict[Path, list[str]] = {}
    for name in plan:
        by_file.setdefault(files[name], []).append(name)
    from safetensors import safe_open

    for file, names in by_file.items():
        try:
            with safe_open(str(file), framework="pt", device="cpu") as f:
                for name in names:
                    target_name, index = plan[name]
                    target = params[target_name].data[index] if index else params[target_name].data
                    shape = tuple(f.get_slice(name).get_shape())
                    if shape != tuple(target.shape):
                        raise CheckpointError(
                            f"{file.name}: tensor {name} has shape {list(shape)} but the config needs {list(target.shape)}"
                            f" (config.json disagrees with the weights)"
                        )
                    target.copy_(f.get_tensor(name))
        except MoekitError:
            raise
        except Exception as e:
            raise CheckpointError(f"{file} is not a readable safetensors file (truncated or corrupt?): {e}") from None
    if cfg.tie_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    return model.eval()


def _check_names(plan: dict, present: set[str], d: Path) -> None:
    missing = sorted(set(plan) - present)
    if missing:
        raise CheckpointError(
            f"{d}: {len(missing)} tensor(s) the config needs are missing from the weights, e.g. {', '.join(missing[:3])}"
        )
    extra = sorted(present - set(plan))
    if extra:
        raise CheckpointError(
            f"{d}: {len(extra)} tensor(s) in the weights do not fit the config (config.json disagrees with the weights), "
            f"e.g. {', '.join(extra[:3])}"
        )


def _empty_model(cfg: ModelConfig, dtype: torch.dtype, device: torch.device) -> DecoderLM:
    """A DecoderLM allocated once, uninitialised, in its final dtype and device; buffers recomputed."""
    with torch.device("meta"):
        model = DecoderLM(cfg)
    model = model.to(dtype).to_empty(device=device)
    for module in model.modules():
        if isinstance(module, RotaryEmbedding):
            fresh = RotaryEmbedding(module.head_dim, module.theta)
            module.inv_freq = fresh.inv_freq.to(device)
        elif hasattr(module, "expert_bias"):
            module.expert_bias = torch.zeros(module.expert_bias.shape, device=device)
    return model


# ---------------------------------------------------------------- tokenizer, chat template, stop ids


def load_tokenizer(path: str | Path):
    """The directory's tokenizer.json as a moekit Tokenizer, or None when there is none."""
    from ..data.text import Tokenizer

    p = Path(path) / "tokenizer.json"
    return Tokenizer.from_file(p) if p.is_file() else None


def tokenizer_config(path: str | Path) -> dict:
    p = Path(path) / "tokenizer_config.json"
    if not p.is_file():
        return {}
    try:
        data = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{p} is not valid JSON: {e}") from None
    return data if isinstance(data, dict) else {}


def load_chat_template(path: str | Path) -> str | None:
    """The chat template of a model directory: chat_template.jinja, or tokenizer_config.json's entry."""
    d = Path(path)
    if (d / "chat_template.jinja").is_file():
        return (d / "chat_template.jinja").read_text()
    template = tokenizer_config(d).get("chat_template")
    if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default") or next(iter(named.values()), None)
    return template if isinstance(template, str) else None


def special_tokens(path: str | Path) -> dict[str, str]:
    """bos/eos/pad/unk token strings from tokenizer_config.json (what chat templates refer to)."""
    out = {}
    for key, value in tokenizer_config(path).items():
        if key.endswith("_token") and value is not None:
            out[key] = value["content"] if isinstance(value, dict) else str(value)
    return out


def stop_token_ids(path: str | Path, tokenizer=None) -> list[int]:
    """End-of-sequence ids: generation_config.json, then config.json, then the tokenizer's EOS."""
    d = Path(path)
    for name in ("generation_config.json", CONFIG_FILE):
        p = d / name
        if p.is_file():
            try:
                eos = json.loads(p.read_text()).get("eos_token_id")
            except (json.JSONDecodeError, AttributeError):
                eos = None
            if eos is not None:
                ids = [eos] if isinstance(eos, int) else [int(i) for i in eos]
                vocab = tokenizer.vocab_size if tokenizer is not None else None
                return [i for i in ids if vocab is None or 0 <= i < vocab] or ids
    if tokenizer is not None and tokenizer.eos_id is not None:
        return [tokenizer.eos_id]
    return []


def render_chat(template: str, messages: list[dict], add_generation_prompt: bool = True, **tokens: str) -> str:
    """A chat template (jinja2, as transformers renders it) applied to a list of {role, content} messages."""
    try:
        from jinja2.exceptions import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:  # pragma: no cover - jinja2 comes with transformers
        raise ConfigError("chat templates need the jinja2 package: pip install jinja2") from None

    def raise_exception(message):
        raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)  # used by some templates, as in transformers
    env.filters["tojson"] = lambda x, indent=None, **_: json.dumps(x, indent=indent, ensure_ascii=False)
    try:
        return env.from_string(template).render(messages=messages, add_generation_prompt=add_generation_prompt, **tokens)
    except TemplateError as e:
        raise ConfigError(f"the chat template failed: {e}") from None


# ---------------------------------------------------------------- export: moekit -> Hugging Face


def fit_problems(model: DecoderLM, arch: str) -> list[str]:
    """Why `model` does not fit family `arch` (empty: it fits)."""
    if arch not in FAMILIES:
        raise ConfigError(f"arch={arch!r} is unknown: accepted values are {', '.join(SUPPORTED_MODEL_TYPES)}")
    fam, cfg = FAMILIES[arch], model.cfg
    problems = []
    if cfg.ffn != "moe":
        problems.append(f"ffn={cfg.ffn!r} (only plain MoE layers)")
    if cfg.experts_per_layer and len(set(cfg.experts_per_layer)) > 1:
        problems.append("a pyramid of expert counts per layer (experts_per_layer)")
    m = cfg.moe
    if m.activation != "swiglu":
        problems.append(f"activation={m.activation!r} (only swiglu)")
    if m.router not in ("topk", "group") or (m.router == "group" and m.num_groups > 1):
        problems.append(f"router={m.router!r} (only top-k token choice)")
    if m.score_func != "softmax":
        problems.append(f"score_func={m.score_func!r} (only softmax)")
    if m.routed_scaling_factor != 1.0:
        problems.append(f"routed_scaling_factor={m.routed_scaling_factor}")
    if m.router_bias:
        problems.append("router_bias=true")
    if m.n_group > 1:
        problems.append(f"group-limited routing (n_group={m.n_group})")
    if m.bias_update_rate > 0:
        problems.append("aux-loss-free balancing bias (bias_update_rate > 0)")
    if m.eval_capacity_factor > 0:
        problems.append(f"eval_capacity_factor={m.eval_capacity_factor} (tokens dropped at inference)")
    if fam.model_type == "mixtral" and not m.norm_topk_prob:
        problems.append("norm_topk_prob=false (mixtral always renormalises the top-k weights)")
    if fam.shared_expert:
        if m.num_shared_experts == 0 or not m.shared_expert_gate:
            problems.append("no gated shared expert (qwen2_moe needs num_shared_experts >= 1 and shared_expert_gate=true)")
    elif m.num_shared_experts:
        problems.append(f"num_shared_experts={m.num_shared_experts} (this family has no shared expert)")
    if cfg.qk_norm != fam.qk_norm:
        problems.append(f"qk_norm={cfg.qk_norm!r} (this family uses {fam.qk_norm!r})")
    if cfg.qkv_bias and fam.bias_key != "qkv_bias":
        problems.append("qkv_bias=true (this family has no q/k/v bias)")
    if fam.qk_norm == "full" and cfg.head_dim not in (0, cfg.hidden_size // cfg.num_heads):
        problems.append(f"head_dim={cfg.head_dim} != hidden_size / num_heads")
    if not fam.dense_layers and any(not cfg.is_moe_layer(i) for i in range(cfg.num_layers)):
        problems.append("dense layers (first_k_dense / dense_layers / moe_layer_freq); this family makes every layer MoE")
    return problems


def hf_config(cfg: ModelConfig, arch: str, dtype: torch.dtype = torch.float32) -> dict:
    """The config.json of family `arch` describing `cfg` (which must fit it)."""
    fam, m = FAMILIES[arch], cfg.moe
    data: dict[str, Any] = {
        "architectures": [fam.architecture],
        "model_type": fam.model_type,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "tie_word_embeddings": cfg.tie_embeddings,
        "hidden_act": "silu",
        "num_experts_per_tok": m.top_k,
        "dtype": str(dtype).removeprefix("torch."),
        "use_cache": True,
    }
    if cfg.head_dim and fam.model_type != "olmoe":
        data["head_dim"] = cfg.head_dim
    moe_layers = [i for i in range(cfg.num_layers) if cfg.is_moe_layer(i)]
    num_experts = cfg.moe_for_layer(moe_layers[0]).num_experts if moe_layers else m.num_experts
    if fam.model_type == "mixtral":
        data.update(num_local_experts=num_experts, intermediate_size=m.expert_hidden, sliding_window=None)
    elif fam.model_type == "olmoe":
        data.update(num_experts=num_experts, intermediate_size=m.expert_hidden, norm_topk_prob=m.norm_topk_prob,
                    clip_qkv=None, attention_bias=False)
    else:
        data.update(num_experts=num_experts, moe_intermediate_size=m.expert_hidden, intermediate_size=cfg.dense_hidden,
                    norm_topk_prob=m.norm_topk_prob, decoder_sparse_step=cfg.moe_layer_freq, use_sliding_window=False,
                    mlp_only_layers=sorted(set(range(cfg.first_k_dense)) | set(cfg.dense_layers)))
        if fam.model_type == "qwen2_moe":
            data.update(qkv_bias=cfg.qkv_bias, shared_expert_intermediate_size=(m.shared_expert_hidden or m.expert_hidden) * m.num_shared_experts)
        else:
            data.update(attention_bias=False)
    # Keys transformers reads but moekit has no counterpart for: fixed to what moekit computes.
    data.update(attention_dropout=0.0, router_aux_loss_coef=0.0, output_router_logits=False)
    return data


def state_to_hf(model: DecoderLM, arch: str) -> dict[str, torch.Tensor]:
    """The model's tensors under the family's Hugging Face names, experts split per expert."""
    params = dict(model.named_parameters(remove_duplicate=False))
    out: dict[str, torch.Tensor] = {}
    for hf_name, (name, index) in _expected_names(model.cfg, FAMILIES[arch], fused=False).items():
        t = params[name].detach()
        out[hf_name] = (t[index] if index else t).contiguous().cpu()
    return out


def save(model: DecoderLM, out_dir: str | Path, arch: str = "auto", tokenizer=None,
         max_shard_bytes: int = 4 * 1024**3, chat_template: str | None = None) -> Path:
    """Write `model` as a Hugging Face checkpoint of family `arch` ("auto": the first family it fits).

    The directory is written atomically (temporary sibling, then rename);
    weights go to one model.safetensors, or to shards plus an index when they
    exceed `max_shard_bytes`.
    """
    arch = _choose_arch(model, arch)
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"output directory {out} exists and is not empty: choose a new directory")
    dtype = next(model.parameters()).dtype
    state = state_to_hf(model, arch)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{out.name}-", dir=out.parent))
    try:
        (tmp / CONFIG_FILE).write_text(json.dumps(hf_config(model.cfg, arch, dtype), indent=2) + "\n")
        _write_weights(tmp, state, max_shard_bytes)
        if tokenizer is not None:
            _write_tokenizer(tmp, tokenizer, chat_template)
            eos = tokenizer.eos_id
            gen = {"eos_token_id": eos} if eos is not None else {}
            (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
        if out.exists():
            out.rmdir()
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _choose_arch(model: DecoderLM, arch: str) -> str:
    if arch != "auto":
        problems = fit_problems(model, arch)
        if problems:
            raise UnsupportedModelError(f"the model does not fit arch={arch!r}: {'; '.join(problems)}")
        return arch
    reasons = {a: fit_problems(model, a) for a in FAMILIES}
    for a, problems in reasons.items():
        if not problems:
            return a
    detail = "; ".join(f"{a}: {', '.join(p)}" for a, p in reasons.items())
    raise UnsupportedModelError(f"the model fits no Hugging Face family moekit exports ({detail})")


def _write_weights(d: Path, state: dict[str, torch.Tensor], max_shard_bytes: int) -> None:
    from safetensors.torch import save_file

    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in state.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], str(d / SINGLE_FILE), metadata={"format": "pt"})
        return
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(d / fname), metadata={"format": "pt"})
        weight_map.update({name: fname for name in shard})
    total = sum(t.numel() * t.element_size() for t in state.values())
    (d / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")


def _write_tokenizer(d: Path, tokenizer, chat_template: str | None) -> None:
    tokenizer.save(d)
    tok_cfg: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast"}
    if tokenizer.eos_id is not None:
        eos = tokenizer.backend.id_to_token(tokenizer.eos_id)
        tok_cfg.update(eos_token=eos, pad_token=eos)
    if chat_template:
        tok_cfg["chat_template"] = chat_template
    (d / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2) + "\n")


def convert(checkpoint: str | Path, out_dir: str | Path, arch: str = "auto") -> Path:
    """A moekit run/checkpoint directory written as a Hugging Face model directory."""
    from ..models.build import load_model

    model, tokenizer, _ = load_model(checkpoint)
    return save(model, out_dir, arch=arch, tokenizer=tokenizer)
